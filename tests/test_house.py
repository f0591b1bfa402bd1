"""House rules that a linter does not check: no private name crosses a module boundary inside bnfold.

A name that another module needs is a public name of the module that owns it (and listed in its
``__all__``); a ``_name`` is used only in the file that defines it. The check reads every module of
``bnfold/`` with :mod:`ast` (nothing is imported) and reports each offence as ``file:line: what``:

* ``from bnfold.x import _name`` (relative imports resolved too: ``from .x import _name``);
* an import of a private module (``bnfold._x``, ``from . import _x``, ``from ._x import name``);
* ``alias._name`` where ``alias`` was bound by an import from bnfold (a module or an object of another
  module: ``from bnfold.nn import batchnorm as bnb; bnb._Base``).

Dunder names (``__version__``, ``__future__``) are not private; imports from outside bnfold are not
checked (``torch.nn.modules.batchnorm._BatchNorm`` is torch's business).

Every name is imported from the module that owns it (defines it), never through an ordinary module
that only imports it too (:func:`borrowed_imports`): ``from bnfold.records import HealthReport`` is an
offence, the owner being ``bnfold.health_records``. A package ``__init__`` is its package's interface:
importing from it is fine (``from bnfold.fold_math import cast_exact``; tests patch such seams, e.g.
``bnfold.onnx.fold_model``). An ordinary module's ``__all__`` lists only what it defines, save the few
public aliases of :data:`PUBLIC_ALIASES`.

The ONNX backend never loads torch: ``bnfold recalibrate`` of an ONNX file runs in a process where
torch stays unloaded (the import-linter contracts in ``pyproject.toml`` check the imports statically;
``tests/test_cli.py`` checks ``bnfold fold``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

PACKAGE = Path(__file__).resolve().parent.parent / "bnfold"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def private_imports(source: str, module: str, is_package: bool, label: str) -> list[str]:
    """Every use of another module's private name in ``source`` (the module ``module``)."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    found: list[str] = []
    bound: set[str] = set()  # local names bound by an import from bnfold
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != "bnfold":
                continue
            for alias in node.names:
                if any(_private(part) for part in origin.split(".")):
                    found.append(
                        f"{label}:{node.lineno}: from {origin} import {alias.name} (a private module)"
                    )
                elif _private(alias.name):
                    found.append(f"{label}:{node.lineno}: from {origin} import {alias.name}")
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "bnfold":
                    continue
                if any(_private(part) for part in alias.name.split(".")):
                    found.append(f"{label}:{node.lineno}: import {alias.name} (a private module)")
                bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            value = node.value
            while isinstance(value, ast.Attribute):  # bnfold.io.stream._x: the chain's root name
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                found.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_name_crosses_a_module_boundary() -> None:
    offences: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        offences += private_imports(
            path.read_text(encoding="utf-8"),
            _module_name(path, PACKAGE),
            path.name == "__init__.py",
            str(path.relative_to(PACKAGE.parent)),
        )
    assert offences == [], (
        "private names used across modules (make them public in their owner):\n" + "\n".join(offences)
    )


@pytest.mark.parametrize(
    "source",
    [
        "from bnfold.io.stream import _copy_field\n",
        "from .stream import _copy_field\n",
        "from ..verification.runners import onnx_runner, _Runner\n",
        "from bnfold import _dtypes\n",
        "from bnfold._dtypes import to_numpy\n",
        "from ._function import batch_norm_train\n",
        "import bnfold._dtypes\n",
        "from bnfold.nn import batchnorm as bnb\nx = bnb._BnfoldBatchNorm\n",
        "from bnfold.io import stream\nstream._write_onnx_stream(1)\n",
        "import bnfold.io.stream\nbnfold.io.stream._copy_field(1)\n",
    ],
)
def test_the_check_sees_each_kind_of_offence(source: str) -> None:
    assert len(private_imports(source, "bnfold.io.saver", False, "saver.py")) == 1


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations\n",
        "from bnfold import __version__\n",
        "from torch.nn.modules.batchnorm import _BatchNorm\n",
        "import torch\nx = torch._C\n",
        "from bnfold.io.stream import copy_field\n",
        "class A:\n    def f(self) -> None:\n        self._x = 1\n",
        "from bnfold.records import Site\nx = Site.__name__\n",
    ],
)
def test_the_check_lets_public_and_foreign_names_pass(source: str) -> None:
    assert private_imports(source, "bnfold.io.saver", False, "saver.py") == []


# ------------------------------------------------------------------ names come from their owner
# Names an ordinary module lists in ``__all__`` without defining them: kept for users (and their tests).
PUBLIC_ALIASES = {
    ("bnfold.freezing", "recalibrate"),  # bnfold.freezing.recalibrate is bnfold.recalibrate
    ("bnfold.dtypes", "is_bfloat16"),  # the torch <-> NumPy bridge names the pure NumPy dtype tests
    ("bnfold.dtypes", "is_floating"),
    ("bnfold.denormals", "count_subnormal"),  # the denormal concept's counting and flushing of arrays
    ("bnfold.denormals", "flush_array"),
}


@dataclass
class _Module:
    is_package: bool
    defined: set[str] = field(default_factory=set)
    imported: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, name)
    exported: list[str] = field(default_factory=list)  # __all__
    tree: ast.Module | None = None


def _origin(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = (module if is_package else module.rpartition(".")[0]).split(".")
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_modules(sources: dict[str, tuple[str, bool]]) -> dict[str, _Module]:
    """``{module: (source, is_package)}`` -> what each module defines, imports and exports."""
    mods: dict[str, _Module] = {}
    for name, (source, is_package) in sources.items():
        m = _Module(is_package, tree=ast.parse(source))
        assert m.tree is not None
        for node in m.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                m.defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    m.defined.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
                    if isinstance(target, ast.Name) and target.id == "__all__" and node.value is not None:
                        m.exported = [e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)]
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom):
                origin = _origin(node, name, is_package)
                for alias in node.names:
                    m.imported.setdefault(alias.asname or alias.name, (origin, alias.name))
        mods[name] = m
    return mods


def _owner(mods: dict[str, _Module], module: str, name: str) -> str:
    seen = {module}
    while module in mods and name not in mods[module].defined and name in mods[module].imported:
        module, name = mods[module].imported[name]
        if module in seen:
            break
        seen.add(module)
    return module


def borrowed_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import of a bnfold name through a module that does not own it, and every re-export."""
    mods = read_modules(sources)
    found: list[str] = []
    for name, m in sorted(mods.items()):
        assert m.tree is not None
        for node in ast.walk(m.tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            origin = _origin(node, name, m.is_package)
            source = mods.get(origin)
            if source is None or source.is_package:  # a package's interface
                continue
            for alias in node.names:
                imported = alias.name
                if f"{origin}.{imported}" in mods or imported in source.defined:
                    continue
                if imported in source.imported:
                    owner = _owner(mods, origin, imported)
                    found.append(f"{name}:{node.lineno}: {imported} from {origin} (owned by {owner})")
        if not m.is_package:
            for exported in m.exported:
                if exported not in m.defined and (name, exported) not in PUBLIC_ALIASES:
                    found.append(
                        f"{name}: __all__ re-exports {exported} (owned by {_owner(mods, name, exported)})"
                    )
    return found


def _package_sources() -> dict[str, tuple[str, bool]]:
    return {
        _module_name(path, PACKAGE): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_name_is_imported_from_its_owner() -> None:
    offences = borrowed_imports(_package_sources())
    assert offences == [], (
        "names imported through a module that does not own them (import them from the owner):\n"
        + "\n".join(offences)
    )


_OWNER = ("bnfold.a.owner", ("def f() -> None: ...\nclass C: ...\n", False))
_PLAIN = ("bnfold.a.plain", ("from .owner import C, f\n\ndef g() -> C:\n    return C()\n", False))
_PKG = ("bnfold.a", ("from .owner import C, f\n", True))


@pytest.mark.parametrize(
    ("module", "source", "is_package"),
    [
        ("bnfold.b.user", "from bnfold.a.plain import f\n", False),  # through an ordinary module
        ("bnfold.a.user", "from .plain import C\n", False),  # relative
        ("bnfold.a.user", "def g() -> None:\n    from .plain import f\n", False),  # lazy
        ("bnfold.b", "from bnfold.a.plain import C\n", True),  # a package __init__ through a module
        ("bnfold.b.user", "from ..a.plain import C\n", False),
        ("bnfold.a.user", "from .owner import f\n__all__ = ['f']\n", False),  # an ordinary re-export
    ],
)
def test_the_owner_check_sees_each_borrowed_name(module: str, source: str, is_package: bool) -> None:
    sources = dict([_OWNER, _PLAIN, _PKG, (module, (source, is_package))])
    found = borrowed_imports(sources)
    assert len(found) == 1 and found[0].startswith(module), found


@pytest.mark.parametrize(
    ("module", "source", "is_package"),
    [
        ("bnfold.b.user", "from bnfold.a.owner import C, f\n", False),
        ("bnfold.a.user", "from . import owner\nfrom .owner import f\n", False),  # a submodule
        ("bnfold.b", "from bnfold.a import C\n", True),  # one package __init__ composing another's API
        ("bnfold.b.user", "from bnfold.a import f\n", False),  # through the package's interface
        ("bnfold.b.user", "from torch import nn\nfrom bnfold.a.plain import g\n", False),
        ("bnfold.a.user", "from .owner import f\n__all__ = ['g']\ndef g() -> None: ...\n", False),
    ],
)
def test_the_owner_check_lets_owned_names_pass(module: str, source: str, is_package: bool) -> None:
    sources = dict([_OWNER, _PLAIN, _PKG, (module, (source, is_package))])
    assert borrowed_imports(sources) == []


# ---------------------------------------------------------------- the ONNX backend without torch
def test_onnx_recalibrate_never_imports_torch(tmp_path: Path) -> None:
    """``bnfold recalibrate x.onnx``: the statistics of the data, computed without loading torch."""
    rng = np.random.default_rng(3)
    c = 3
    stats = {
        "gamma": rng.uniform(0.5, 1.5, c),
        "beta": rng.uniform(-0.5, 0.5, c),
        "mean": rng.uniform(-1.0, 1.0, c),
        "var": rng.uniform(0.5, 2.0, c),
    }
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-5)],
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 4, 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items()],
    )
    src, out, data = tmp_path / "m.onnx", tmp_path / "r.onnx", tmp_path / "d.npz"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(src))
    x = (rng.normal(2.0, 3.0, (20, c, 4, 4)) * np.arange(1, c + 1)[:, None, None]).astype(np.float32)
    np.savez(data, x=x)
    before = src.read_bytes()
    argv = ["bnfold", "recalibrate", str(src), str(out), "--data", str(data), "--batch-size", "5"]
    code = (
        "import sys\n"
        "from bnfold.cli import main\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked[:5]\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE.parent), env.get("PYTHONPATH", "")) if p)
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert src.read_bytes() == before
    # the default estimator: per channel, the mean of the batch means and of the unbiased batch variances
    batches = x.astype(np.float64).reshape(4, 5, c, 4, 4)
    mean = batches.mean(axis=(1, 3, 4)).mean(axis=0)
    var = batches.var(axis=(1, 3, 4), ddof=1).mean(axis=0)
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(got["var"], var, rtol=1e-6)
    assert not np.allclose(got["mean"], stats["mean"], rtol=0.1)  # the statistics did change

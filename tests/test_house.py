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
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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

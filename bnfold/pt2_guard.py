"""Refuse a ``torch.export`` archive (``.pt2``) that could run code when loaded, before torch sees it.

``torch.export.load`` runs code from the file in several places; every one is closed here, from the
archive's bytes, before ``torch.export.load`` is called (unless the user passed ``--trust-pickle``):

    1. Pickled weights and constants (``use_pickle`` in ``data/*/..._config.json``): torch unpickles them
       with ``weights_only=False``. Each must load with ``torch.load(weights_only=True)`` here first.
    2. Sample inputs (``data/sample_inputs/*.pt``): torch tries ``weights_only=True`` and falls back to a
       full unpickle. They must load with ``weights_only=True`` here.
    3. Custom (TorchBind) and opaque objects among the constants: unpickled with no restriction.
       Refused.
    4. AOTInductor members (``data/aotinductor/``): compiled shared libraries that torch ``dlopen``\\ s.
       Refused.
    5. Symbolic shape expressions (``expr_str`` in ``models/*.json``): torch hands them to
       ``sympy.sympify``, which ``eval``\\ s its input. Each must parse as a Python expression built only
       of sympy constructors, symbol names, numbers, and arithmetic/comparison/boolean operators.
    6. Node targets (``target`` in ``models/*.json``): torch resolves ``torch.<a>.<b>...`` by
       ``getattr``, so ``torch.serialization.os.system`` becomes a graph node that runs when the program
       runs. Each must be an operator (``torch.ops.<ns>.<op>[.<overload>]``), a ``torch.sym_*`` helper, or
       a pure function of ``_operator`` / ``math``.
    7. Guards (``guards_code``): turned into Python source and executed by ``ExportedProgram.module()``.
       Each must be a comparison over input sizes (``L['x'].size()[0] <= 1024``).
    8. The legacy archive layout (no ``archive_version``, ``serialized_*.pt`` members): deserialised with
       a pickle fallback. Refused.

After loading, :func:`check_program` checks again that every ``call_function`` target of the loaded
graph (and its subgraphs) is an operator or one of the allowed functions: a second, independent line.
"""

from __future__ import annotations

import ast
import io as _io
import json
import math
import operator
import re
import zipfile
from collections.abc import Iterator
from typing import Any

from .errors import ModelFormatError
from .hints import TRUST_PICKLE

__all__ = ["check_pt2", "check_program"]


# ``torch.ops.<namespace>.<op>[.<overload>]``: no dunders, so no ``__class__`` walks.
_OP_TARGET = re.compile(r"^torch\.ops\.(?!__)\w+\.(?!__)\w+(\.(?!__)\w+)?$")
_PURE_OPERATOR = frozenset(
    {
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "pos",
        "abs",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "xor",
        "not_",
        "invert",
        "lshift",
        "rshift",
        "matmul",
        "truth",
    }
)
_PURE_MATH = frozenset(n for n in dir(math) if not n.startswith("_") and callable(getattr(math, n)))
_TORCH_FUNCTIONS = frozenset({"_C._set_grad_enabled", "_assert", "_assert_async", "_check", "_check_is_size"})

# Names a sympy shape expression may call or mention (sympy's own and torch's shape functions).
_SYMPY_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "true",
        "false",
        "True",
        "False",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "One",
        "Zero",
        "NegativeOne",
        "Half",
        "BooleanTrue",
        "BooleanFalse",
        "sqrt",
        "int_oo",
        "IntInfinity",
        "NegativeIntInfinity",
        "S",
    }
)
_SYMBOL = re.compile(r"^[a-z][a-z_]*\d+$")  # s0, u12, zuf3: what torch names its shape symbols
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_ALLOWED_EXPR_NODES = (
    ast.Expression,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.keyword,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
    ast.Tuple,
)
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})


def _torch_function_names() -> frozenset[str]:
    """torch's sympy shape functions (``FloorDiv``, ``ModularIndexing``, ``OpaqueUnaryFn_*``, ...)."""
    try:
        import sympy
        import torch.utils._sympy.functions as f
    except Exception:  # pragma: no cover - torch always ships them
        return frozenset()
    return frozenset(
        n
        for n in dir(f)
        if not n.startswith("_")
        and isinstance(getattr(f, n), type)
        and issubclass(getattr(f, n), sympy.Basic)
    )


def _refuse(path: str, problem: str) -> ModelFormatError:
    return ModelFormatError(
        f"{path}: {problem}; loading it could run code from the file", hints=[TRUST_PICKLE]
    )


def _expr_ok(text: str, names: frozenset[str]) -> bool:
    """A sympy expression (``srepr`` or ``str`` form) with no way to reach anything but sympy."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_EXPR_NODES):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in names):
            return False
        if isinstance(node, ast.Name) and node.id not in names and not _SYMBOL.match(node.id):
            return False
        if isinstance(node, ast.keyword) and not (
            node.arg and _IDENT.match(node.arg) and isinstance(node.value, ast.Constant)
        ):
            return False
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, str) and not _SYMBOL.match(v):
                return False
            if not isinstance(v, (str, int, float, bool)) and v is not None:
                return False
    return True


def _guard_ok(text: str) -> bool:
    """A guard over input sizes: ``L['x'].size()[0] <= 1024``, ``L['x'].size()[1] % 8 == 0``."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    allowed = (
        ast.Expression,
        ast.Compare,
        ast.BoolOp,
        ast.UnaryOp,
        ast.BinOp,
        ast.Constant,
        ast.Subscript,
        ast.Name,
        ast.Load,
        ast.Attribute,
        ast.Call,
        ast.operator,
        ast.unaryop,
        ast.boolop,
        ast.cmpop,
    )
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            return False
        if isinstance(node, ast.Name) and node.id != "L":
            return False
        if isinstance(node, ast.Attribute) and node.attr not in _GUARD_METHODS:
            return False
        if isinstance(node, ast.Call) and (
            node.args or node.keywords or not isinstance(node.func, ast.Attribute)
        ):
            return False
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, bool, str)):
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _IDENT.match(node.value):
            return False
    return True


def _target_ok(target: str) -> bool:
    if _OP_TARGET.match(target):
        return True
    head, _, rest = target.partition(".")
    if head == "_operator":
        return rest in _PURE_OPERATOR
    if head == "math":
        return rest in _PURE_MATH
    if head == "torch":
        return rest in _TORCH_FUNCTIONS or re.fullmatch(r"_?sym_\w+", rest) is not None
    return False


def _walk(obj: Any) -> Iterator[dict[str, Any]]:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            yield o
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def _check_program_json(path: str, member: str, data: bytes) -> None:
    try:
        program = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: {member} is not valid JSON ({e})") from e
    names = _SYMPY_NAMES | _torch_function_names()
    for d in _walk(program):
        expr = d.get("expr_str")
        if isinstance(expr, str) and not _expr_ok(expr, names):
            raise _refuse(
                path, f"{member} holds a shape expression that is not plain arithmetic ({expr[:80]!r})"
            )
        target = d.get("target")
        if isinstance(target, str) and "inputs" in d and not _target_ok(target):
            raise _refuse(path, f"{member} calls {target[:80]!r}, which is not an operator")
    guards = program.get("guards_code", []) if isinstance(program, dict) else []
    for g in guards if isinstance(guards, list) else [guards]:
        if not isinstance(g, str) or not _guard_ok(g):
            raise _refuse(path, f"{member} holds a guard that is not a size comparison ({str(g)[:80]!r})")


def _weights_only(path: str, member: str, data: bytes) -> None:
    import torch

    try:
        torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _refuse(path, f"{member} is a pickle that does not load as weights only ({first[:160]})") from e


def _payload_config(path: str, member: str, data: bytes) -> dict[str, Any]:
    try:
        config = json.loads(data).get("config", {})
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ModelFormatError(f"{path}: {member} is not a valid torch.export payload config") from e
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: {member} is not a valid torch.export payload config")
    return config


def check_pt2(path: str) -> None:
    """Raise unless loading the ``.pt2`` archive at ``path`` with ``torch.export.load`` runs no code from it.

    Raises:
        ModelFormatError: one line naming the member that could run code (and ``--trust-pickle``), or a
            malformed archive.
    """
    try:
        with zipfile.ZipFile(path) as z:
            full = z.namelist()
            roots = {n.split("/", 1)[0] for n in full}
            prefix = f"{roots.pop()}/" if len(roots) == 1 and all("/" in n for n in full) else ""
            names = {n[len(prefix) :]: n for n in full}

            def read(rel: str) -> bytes:
                return z.read(names[rel])

            if "archive_version" not in names:
                raise _refuse(
                    path,
                    "an old or unknown torch.export layout (no archive_version), which torch "
                    "deserialises with a pickle fallback",
                )
            for rel in names:
                if rel.startswith(("data/aotinductor/", "data/mtia")):
                    raise _refuse(path, "holds AOTInductor compiled code (shared libraries torch would load)")
            models = [r for r in names if r.startswith("models/") and r.endswith(".json")]
            if not models:
                raise ModelFormatError(f"{path}: a torch.export archive without a program (no models/*.json)")
            for rel in models:
                model = rel[len("models/") : -len(".json")]
                _check_program_json(path, rel, read(rel))
                for legacy in (f"data/weights/{model}.pt", f"data/constants/{model}.pt"):
                    if legacy in names:
                        _weights_only(path, legacy, read(legacy))
                for kind, folder in (("weights", "data/weights/"), ("constants", "data/constants/")):
                    cfg_name = f"{folder}{model}_{kind}_config.json"
                    if cfg_name not in names:
                        continue
                    for meta in _payload_config(path, cfg_name, read(cfg_name)).values():
                        p_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
                        member = f"{folder}{p_name}"
                        if kind == "constants" and not p_name.startswith("tensor_"):
                            raise _refuse(path, f"{member} is a pickled custom object")
                        if isinstance(meta, dict) and meta.get("use_pickle") and member in names:
                            _weights_only(path, member, read(member))
                sample = f"data/sample_inputs/{model}.pt"
                if sample in names:
                    _weights_only(path, sample, read(sample))
    except ModelFormatError:
        raise
    except (zipfile.BadZipFile, OSError, KeyError, RuntimeError) as e:
        raise ModelFormatError(f"{path}: a truncated or corrupt torch.export archive ({e})") from e


def check_program(path: str, program: Any) -> None:
    """Every ``call_function`` target of a loaded ExportedProgram is an operator or an allowed function.

    Raises:
        ModelFormatError: a target that is not.
    """
    import torch

    allowed_py = {getattr(operator, n) for n in _PURE_OPERATOR} | {getattr(math, n) for n in _PURE_MATH}
    op_types = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    seen: set[int] = set()
    stack = [program.graph_module]
    while stack:
        gm = stack.pop()
        if id(gm) in seen:
            continue
        seen.add(id(gm))
        for node in gm.graph.nodes:
            if node.op == "call_function":
                t = node.target
                name = getattr(t, "__name__", "")
                if isinstance(t, op_types) or t in allowed_py:
                    continue
                if getattr(t, "__module__", "") in ("torch", "torch._C") and (
                    name.startswith(("sym_", "_sym_"))
                    or name in ("_set_grad_enabled", "_assert", "_assert_async")
                ):
                    continue
                raise _refuse(
                    path, f"the program calls {name or type(t).__name__!r}, which is not an operator"
                )
        stack.extend(m for m in gm.children() if isinstance(m, torch.fx.GraphModule))

"""Is it safe to fold inside a submodule whose untraceable ancestors run Python code we cannot trace?

When a model does not trace, bnfold folds inside the submodules that do (module mode: weights changed,
BN replaced by ``nn.Identity()``). That is exact only if every untraceable ancestor uses the
submodule as a whole -- calls it -- and never reaches into it (``self.block[0](x)``,
``self.block.bn.running_mean``), since the folded internals no longer compute what they did.

The check reads the source of each ancestor's class (every method, through its bases up to
``nn.Module``) and collects the attribute chains rooted at ``self``. For the submodule at relative path
``r`` a chain ``c`` is acceptable when it does not overlap ``r``, or when:

1. ``c == r`` and ``c`` is called: ``self.r(...)``;
2. ``c`` is a proper prefix of ``r`` and called (``c``'s own forward is checked in turn, as an
   ancestor), or iterated by a ``for`` loop whose variable is only called, with ``r`` one level
   below ``c`` (``for layer in self.layers: x = layer(x)``).

3. ``c`` is handed as first argument to a known checkpointing runner: ``torch.utils.checkpoint.
   checkpoint(self.c, x)`` calls it whole (as rule 1/2); timm's ``checkpoint_seq(self.c, x)`` and
   ``checkpoint_sequential`` call its children in order, which is calling ``c`` itself when ``c`` is an
   ``nn.Sequential`` and a loop over its children otherwise (more: :func:`register_checkpoint_runner`).

"self" is each method's first parameter, whatever it is called. Methods and properties named as
``self.m`` are scanned too, called or not (a bound method handed to ``checkpoint`` runs later).
Anything else that overlaps -- a chain reaching below ``r``, passing a module as a value, ``self``
itself handed to a helper function (``helper(self, x)``, ``type(self)``, ``getattr(self, ...)``),
dynamic access (``self._modules``, ``self.children()``, ``self.modules()``...) or source that cannot be
read -- makes the submodule unsafe: its BNs are left with the reason.
Classes defined by torch itself (``nn.Sequential``, ``nn.ModuleList``...) call their children whole.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["unsafe_use", "register_checkpoint_runner", "direct_pairs"]

_DYNAMIC = frozenset(
    {
        "_modules",
        "__dict__",
        "children",
        "named_children",
        "modules",
        "named_modules",
        "get_submodule",
        "_parameters",
        "_buffers",
    }
)
_WILD = "*"


_RUNNERS: dict[Any, str] = {}
"""Functions that run a module passed as their first argument: "call" (the module whole) or
"children" (its children in order, as ``nn.Sequential`` does)."""


def register_checkpoint_runner(fn: Callable[..., Any], runs: str = "children") -> None:
    """Declare a gradient-checkpointing helper whose first argument is a module it runs.

    ``runs="call"``: it calls the module whole (like ``torch.utils.checkpoint.checkpoint``);
    ``runs="children"``: it calls the module's children in order, each whole (like timm's
    ``checkpoint_seq`` or ``torch.utils.checkpoint.checkpoint_sequential``). A parent whose code
    hands ``self.stages`` to such a helper then still "calls the part whole" for the fold's safety
    proof. timm's ``checkpoint_seq`` and torch's two helpers are known already.

    Raises:
        OptionError: ``fn`` is not a (hashable) callable, or ``runs`` is neither value.
    """
    from bnfold.errors import OptionError

    if runs not in ("call", "children"):
        raise OptionError(
            f"register_checkpoint_runner: runs must be 'call' or 'children', not {str(runs)[:40]!r}"
        )
    if not callable(fn):
        raise OptionError(f"register_checkpoint_runner expects a function, got {type(fn).__name__}")
    try:
        hash(fn)
    except TypeError as e:
        raise OptionError(
            f"register_checkpoint_runner expects a hashable function, got {type(fn).__name__}"
        ) from e
    _RUNNERS[fn] = runs
    _chains.cache_clear()


def _runner_kind(fn: Any) -> str | None:
    import torch.utils.checkpoint as ckpt

    if fn is ckpt.checkpoint:
        return "call"
    if fn is ckpt.checkpoint_sequential:
        return "children"
    if fn in _RUNNERS:
        return _RUNNERS[fn]
    if getattr(fn, "__name__", "") == "checkpoint_seq" and str(getattr(fn, "__module__", "")).startswith(
        "timm."
    ):
        return "children"
    return None


@functools.lru_cache(maxsize=256)
def _chains(cls: type) -> tuple[tuple[tuple[str, ...], str], ...] | str:
    """``(chain, use)`` for every maximal ``self``-rooted chain in the code ``forward`` runs; why not if unsafe.

    The code is ``forward`` and every method or property it names as ``self.name`` (called or
    handed on, e.g. to ``torch.utils.checkpoint``), transitively, looked up through the class's
    bases like Python does; methods defined by torch itself are trusted. "self" is the method's
    first parameter, whatever its name; that name used other than as the root of an attribute chain
    (handed to a helper, ``type(self)``...) is unsafe.
    """
    if cls.__module__.startswith("torch."):
        return ()  # torch's own modules and containers call their children whole
    methods: dict[str, tuple[ast.FunctionDef | ast.AsyncFunctionDef, dict[str, Any], bool] | str] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            continue
        trusted = klass.__module__.startswith("torch.")
        try:
            tree = None if trusted else ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return f"cannot be read ({klass.__name__}'s source is not available)"
        mod = sys.modules.get(klass.__module__)
        glb: dict[str, Any] = dict(vars(mod)) if mod is not None else {}
        entries = {
            n: v
            for n, v in vars(klass).items()
            if callable(v) or isinstance(v, (staticmethod, classmethod, property, functools.cached_property))
        }
        defs = (
            {}
            if tree is None
            else {f.name: f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        )
        for n, v in entries.items():
            if trusted:
                methods.setdefault(n, "trusted")
            elif n in defs:
                methods.setdefault(n, (defs[n], glb, isinstance(v, staticmethod)))
            else:
                methods.setdefault(n, "missing")
    out: list[tuple[tuple[str, ...], str]] = []
    seen: set[str] = set()
    todo = ["forward"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        fn = methods.get(name, "missing")
        if fn == "trusted":
            continue  # torch's own method
        if isinstance(fn, str):  # defined somewhere we cannot read (e.g. assigned at run time)
            return f"calls '{name}', whose code cannot be read"
        found = _scan(*fn)
        if isinstance(found, str):
            return f"{found} (in {name})"
        for chain, use in found:
            if chain[0] in methods:
                todo.append(chain[0])  # its code runs (called now, or later by whoever gets it)
                if len(chain) == 1 and use == "call":
                    continue
            out.append((chain, use))
    return tuple(out)


def _chain_of(node: ast.AST, me: str = "self") -> tuple[str, ...] | None:
    """The path of an Attribute/Subscript chain rooted at ``me`` (the method's self), or None."""
    parts: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            idx = node.slice
            parts.append(str(idx.value) if isinstance(idx, ast.Constant) else _WILD)
            node = node.value
        elif isinstance(node, ast.Name):
            return tuple(reversed(parts)) if node.id == me and parts else None
        else:
            return None


def _self_name(fn: ast.FunctionDef | ast.AsyncFunctionDef, static: bool) -> str | None:
    args = [*fn.args.posonlyargs, *fn.args.args]
    return None if static or not args else args[0].arg


def _resolve(func: ast.AST, glb: dict[str, Any]) -> Any:
    """The object a call's function expression names in the module's globals (None if unknown)."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name) or func.id not in glb:
        return None
    obj = glb[func.id]
    for p in reversed(parts):
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj


def _scan(
    tree: ast.FunctionDef | ast.AsyncFunctionDef, glb: dict[str, Any] | None = None, static: bool = False
) -> list[tuple[tuple[str, ...], str]] | str:
    glb = glb or {}
    me = _self_name(tree, static)
    parents: dict[int, ast.AST] = {}
    for p in ast.walk(tree):
        for ch in ast.iter_child_nodes(p):
            parents[id(ch)] = p
    out: list[tuple[tuple[str, ...], str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and me is not None and node.id == me:
            parent = parents.get(id(node))
            if not (isinstance(parent, (ast.Attribute, ast.Subscript)) and parent.value is node):
                # self handed on as a value: whoever gets it may reach anywhere
                return f"hands '{me}' itself on to other code, which may reach into its parts"
        if not isinstance(node, (ast.Attribute, ast.Subscript)) or me is None:
            continue
        chain = _chain_of(node, me)
        if chain is None:
            continue
        parent = parents.get(id(node))
        if isinstance(parent, (ast.Attribute, ast.Subscript)) and getattr(parent, "value", None) is node:
            if _chain_of(parent, me) is not None:
                continue  # not maximal: the longer chain is recorded
        if chain[0] in _DYNAMIC or (len(chain) > 1 and chain[-1] in _DYNAMIC):
            return f"accesses its submodules dynamically ({me}.{'.'.join(chain)})"
        out.append((chain, _use(node, parent, glb)))
    return out


def _use(node: ast.AST, parent: ast.AST | None, glb: dict[str, Any]) -> str:
    if isinstance(parent, ast.Call) and parent.func is node:
        return "call"
    if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node:
        kind = _runner_kind(_resolve(parent.func, glb))
        flatten = any(
            k.arg == "flatten" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
            for k in parent.keywords
        )
        if kind == "call":
            return "call"
        if kind == "children":
            return "grandchildren" if flatten else "children"
    if isinstance(parent, ast.For) and parent.iter is node and isinstance(parent.target, ast.Name):
        var = parent.target.id
        ok = True
        for stmt in parent.body + parent.orelse:
            loop_parents = {id(c): p for p in ast.walk(stmt) for c in ast.iter_child_nodes(p)}
            for sub in ast.walk(stmt):
                if isinstance(sub, ast.Name) and sub.id == var:
                    p = loop_parents.get(id(sub))
                    if not (isinstance(p, ast.Call) and p.func is sub):
                        ok = False
        return "iter_call" if ok else "other"
    return "other"


def _match(a: str, b: str) -> bool:
    return a == b or a == _WILD or b == _WILD


def _prefix(short: tuple[str, ...], long: tuple[str, ...]) -> bool:
    return len(short) <= len(long) and all(_match(x, y) for x, y in zip(short, long))


def unsafe_use(ancestor: nn.Module, rel: str) -> str:
    """Why folding inside ``ancestor.<rel>`` could change what ``ancestor``'s own code computes ("" if safe).

    Args:
        ancestor: an untraceable module above the submodule.
        rel: the submodule's dotted path relative to ``ancestor``.
    """
    cls = type(ancestor)
    chains = _chains(cls)  # type: ignore[arg-type]
    if isinstance(chains, str):
        return f"the code of {cls.__name__} {chains}"
    r = tuple(rel.split("."))
    for chain, use in chains:
        if use == "children":
            # A runner calls the children of self.<chain> in order: the same as calling it when it
            # is an nn.Sequential; otherwise each child is called whole (like a for loop).
            try:
                held = ancestor.get_submodule(".".join(chain)) if _WILD not in chain else None
            except AttributeError:
                held = None
            use = "call" if type(held) is nn.Sequential else "iter_call"
        elif use == "grandchildren":
            # timm's checkpoint_seq(..., flatten=True): the children of each child, in order; the
            # same as calling a Sequential of Sequentials.
            try:
                held = ancestor.get_submodule(".".join(chain)) if _WILD not in chain else None
            except AttributeError:
                held = None
            whole = type(held) is nn.Sequential and all(type(c) is nn.Sequential for c in held.children())
            use = "call" if whole else "other"
        if not (_prefix(chain, r) or _prefix(r, chain)):
            continue
        if len(chain) == len(r) and _prefix(chain, r) and use == "call":
            continue  # rule 1
        if len(chain) < len(r) and (use == "call" or (use == "iter_call" and len(r) == len(chain) + 1)):
            continue  # rule 2
        shown = "self." + ".".join(chain)
        return f"{cls.__name__}'s code uses {shown!s} otherwise than calling '{rel}' whole"
    return ""


@functools.lru_cache(maxsize=256)
def _forward_def(cls: type) -> tuple[ast.FunctionDef, str] | None:
    """The AST of the ``forward`` Python runs for ``cls`` and its self name (None if torch's/unreadable)."""
    for klass in cls.__mro__:
        if "forward" not in vars(klass):
            continue
        if klass.__module__.startswith("torch."):
            return None
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return None
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "forward":
                me = _self_name(node, False)
                return (node, me) if me else None
        return None
    return None


def _called_attr(node: ast.AST, me: str) -> str | None:
    """``"a"`` for a call ``self.a(...)``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        chain = _chain_of(node.func, me)
        if chain is not None and len(chain) == 1:
            return chain[0]
    return None


def direct_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(layer, bn)`` child pairs an untraceable ``forward`` provably runs as ``bn(layer(...))`` only.

    Two shapes, each child named exactly once in all the code ``forward`` runs (and nowhere else):
    ``self.bn(self.layer(...))``, or the consecutive statements ``v = self.layer(...)`` and
    ``v = self.bn(v)`` (the layer's output is bound to ``v`` alone and ``v`` is rebound at once, so
    nothing else can read it). Then the layer's output feeds only that BN: folding them in module
    mode is exact, whatever else the forward does.
    """
    found = _forward_def(type(module))  # type: ignore[arg-type]
    chains = _chains(type(module))  # type: ignore[arg-type]
    if found is None or isinstance(chains, str):
        return []
    fn, me = found
    uses = Counter(c[0] for c, _ in chains if c)
    exact = Counter(c for c, u in chains if len(c) == 1 and u == "call")
    pairs: list[tuple[str, str]] = []
    for node in ast.walk(fn):
        bn = _called_attr(node, me)
        if bn is not None and isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
            layer = _called_attr(node.args[0], me)
            if layer is not None:
                pairs.append((layer, bn))
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if not isinstance(stmts, list):
                continue
            for s1, s2 in zip(stmts, stmts[1:]):
                if not (isinstance(s1, ast.Assign) and isinstance(s2, ast.Assign)):
                    continue
                if len(s1.targets) != 1 or len(s2.targets) != 1:
                    continue
                t1, t2 = s1.targets[0], s2.targets[0]
                if not (isinstance(t1, ast.Name) and isinstance(t2, ast.Name) and t1.id == t2.id):
                    continue
                layer, bn = _called_attr(s1.value, me), _called_attr(s2.value, me)
                call = s2.value
                if layer is None or bn is None or not isinstance(call, ast.Call):
                    continue
                if (
                    len(call.args) == 1
                    and not call.keywords
                    and isinstance(call.args[0], ast.Name)
                    and (call.args[0].id == t1.id)
                ):
                    pairs.append((layer, bn))
    return [
        (a, b)
        for a, b in pairs
        if a != b and uses[a] == 1 and uses[b] == 1 and exact[(a,)] == 1 and exact[(b,)] == 1
    ]

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

Anything else that overlaps -- a chain reaching below ``r``, passing a module as a value, dynamic
access (``getattr(self, ...)``, ``self._modules``, ``self.children()``, ``self.modules()``...) or source
that cannot be read -- makes the submodule unsafe: its BNs are left with the reason.
Classes defined by torch itself (``nn.Sequential``, ``nn.ModuleList``...) call their children whole.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

__all__ = ["unsafe_use"]

_DYNAMIC = frozenset(
    {"_modules", "__dict__", "children", "named_children", "modules", "named_modules", "get_submodule",
     "_parameters", "_buffers"}
)
_WILD = "*"


@functools.lru_cache(maxsize=256)
def _chains(cls: type) -> tuple[tuple[tuple[str, ...], str], ...] | None:
    """``(chain, use)`` for every maximal ``self``-rooted chain in the code ``forward`` runs; None if unsafe.

    The code is ``forward`` and the methods it calls as ``self.name(...)``, transitively, looked up
    through the class's bases like Python does; methods defined by torch itself are trusted.
    """
    if cls.__module__.startswith("torch."):
        return ()  # torch's own modules and containers call their children whole
    methods: dict[str, ast.FunctionDef | ast.AsyncFunctionDef | str] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            continue
        trusted = klass.__module__.startswith("torch.")
        try:
            tree = None if trusted else ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return None
        names = [n for n, v in vars(klass).items() if callable(v) or isinstance(v, (staticmethod, classmethod))]
        defs = {} if tree is None else {
            f.name: f
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        for n in names:
            methods.setdefault(n, "trusted" if trusted else defs.get(n, "missing"))
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
        if isinstance(fn, str):
            return None  # defined somewhere we cannot read (e.g. assigned at run time)
        found = _scan(fn)
        if found is None:
            return None
        for chain, use in found:
            if len(chain) == 1 and use == "call" and chain[0] in methods:
                todo.append(chain[0])
            else:
                out.append((chain, use))
    return tuple(out)


def _chain_of(node: ast.AST) -> tuple[str, ...] | None:
    """The path of an Attribute/Subscript chain rooted at ``self``, or None."""
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
            return tuple(reversed(parts)) if node.id == "self" and parts else None
        else:
            return None


def _scan(tree: ast.AST) -> list[tuple[tuple[str, ...], str]] | None:
    parents: dict[int, ast.AST] = {}
    for p in ast.walk(tree):
        for ch in ast.iter_child_nodes(p):
            parents[id(ch)] = p
    out: list[tuple[tuple[str, ...], str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
            "getattr", "setattr", "vars"
        ):
            if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "self":
                return None
        if not isinstance(node, (ast.Attribute, ast.Subscript)):
            continue
        chain = _chain_of(node)
        if chain is None:
            continue
        parent = parents.get(id(node))
        if isinstance(parent, (ast.Attribute, ast.Subscript)) and getattr(parent, "value", None) is node:
            if _chain_of(parent) is not None:
                continue  # not maximal: the longer chain is recorded
        if chain[0] in _DYNAMIC or (len(chain) > 1 and chain[-1] in _DYNAMIC):
            return None
        out.append((chain, _use(node, parent)))
    return out


def _use(node: ast.AST, parent: ast.AST | None) -> str:
    if isinstance(parent, ast.Call) and parent.func is node:
        return "call"
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
    if chains is None:
        return f"the code of {cls.__name__} cannot be read or accesses its submodules dynamically"
    r = tuple(rel.split("."))
    for chain, use in chains:
        if not (_prefix(chain, r) or _prefix(r, chain)):
            continue
        if len(chain) == len(r) and _prefix(chain, r) and use == "call":
            continue  # rule 1
        if len(chain) < len(r) and (use == "call" or (use == "iter_call" and len(r) == len(chain) + 1)):
            continue  # rule 2
        shown = "self." + ".".join(chain)
        return f"{cls.__name__}'s code uses {shown!s} otherwise than calling '{rel}' whole"
    return ""

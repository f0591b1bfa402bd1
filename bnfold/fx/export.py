"""Fold BatchNorm in a ``torch.export`` program, in its ATen graph.

Pattern (Rule 1): a convolution or linear op whose weight (and bias, if any) are model attributes,
followed by an inference batch norm whose parameters are model attributes:

* producers: ``aten.conv1d/2d/3d`` (also the ``.padding`` overloads), ``aten.conv_transpose1d/2d/3d``,
  ``aten.convolution`` (``transposed`` flag), ``aten.linear``;
* BN: ``aten.batch_norm`` with ``training=False`` (pre-dispatch graphs) or
  ``aten._native_batch_norm_legit_no_training`` whose only used output is item 0 (decomposed graphs).
  Training-mode BN ops: ``TRAINING_MODE``.

Rule 2: the producer's output has this one user (``OTHER_CONSUMERS`` otherwise). Rule 3: ``linear`` meets
BN only on a 2-D tensor (read from the node's recorded ``val``; ``LAYOUT`` otherwise).

Rewrite: on the unlifted module (``ep.module()``) the folded weight and bias become *new* attributes
(``_bnfold_w0``/``_bnfold_b0``), so a weight shared with another op is never changed; the BN's users
read the producer; the program is exported again (non-strict) with the program's own example inputs.
Dynamic dimensions of the original program are not carried over (a note says so).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import UnsupportedModelError
from bnfold.fold_math import WeightLayout, bn_affine, fold_forward
from bnfold.records import Direction, FoldReport, Site, Skip, SkipReason, Verdict

from .match import fetch_attr
from .rewrite import _fits, from_f64, to_f64

__all__ = ["fold_exported", "find_export_sites"]

log = logging.getLogger(__name__)

aten = torch.ops.aten

# target -> (kind, index of groups arg or None, transposed flag index or fixed bool)
_CONV = {
    aten.conv1d.default: ("Conv1d", 6, False),
    aten.conv2d.default: ("Conv2d", 6, False),
    aten.conv3d.default: ("Conv3d", 6, False),
    aten.conv1d.padding: ("Conv1d", 6, False),
    aten.conv2d.padding: ("Conv2d", 6, False),
    aten.conv3d.padding: ("Conv3d", 6, False),
    aten.conv_transpose1d.default: ("ConvTranspose1d", 6, True),
    aten.conv_transpose2d.input: ("ConvTranspose2d", 6, True),
    aten.conv_transpose3d.input: ("ConvTranspose3d", 6, True),
    aten.convolution.default: ("Convolution", 8, None),
    aten.linear.default: ("Linear", None, False),
}
_BN = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
_BN_TRAIN = (aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default)


def _arg(node: fx.Node, i: int, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else default


def _is_attr(a: Any) -> bool:
    return isinstance(a, fx.Node) and a.op == "get_attr"


def _bn_outputs_ok(bn: fx.Node) -> bool:
    if bn.target is aten.batch_norm.default:
        return True
    return all(u.target is operator.getitem and u.args[1] == 0 for u in bn.users)


def find_export_sites(gm: fx.GraphModule) -> tuple[list[Verdict], list[tuple[Site, fx.Node, fx.Node]]]:
    """One verdict per BN op in an unlifted exported graph, and ``(site, bn, producer)`` per site."""
    verdicts: list[Verdict] = []
    sites: list[tuple[Site, fx.Node, fx.Node]] = []
    for bn in gm.graph.nodes:
        if bn.op != "call_function":
            continue
        if bn.target in _BN_TRAIN or (bn.target is aten.batch_norm.default and _arg(bn, 5) is not False):
            verdicts.append(
                Skip(bn.name, SkipReason.TRAINING_MODE, "the batch norm op uses batch statistics")
            )
            continue
        if bn.target not in _BN:
            continue
        if not _bn_outputs_ok(bn):
            verdicts.append(
                Skip(bn.name, SkipReason.TRAINING_MODE, "the batch norm's mean/var outputs are used")
            )
            continue
        params = [_arg(bn, i) for i in (1, 2, 3, 4)]
        if not (
            _is_attr(params[2]) and _is_attr(params[3]) and all(p is None or _is_attr(p) for p in params[:2])
        ):
            verdicts.append(
                Skip(bn.name, SkipReason.NON_CONSTANT, "a batch norm parameter is computed at run time")
            )
            continue
        src = bn.args[0]
        if _addmm_weight(src) is not None:
            src = _as_linear(gm, src)
        if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target in _CONV):
            verdicts.append(
                Skip(bn.name, SkipReason.NO_PRODUCER, "its input is not a convolution or linear op")
            )
            continue
        kind = _CONV[src.target][0]
        w, b = _arg(src, 1), _arg(src, 2, src.kwargs.get("bias"))
        if not (_is_attr(w) and (b is None or _is_attr(b))):
            verdicts.append(
                Skip(bn.name, SkipReason.NON_CONSTANT, f"the {kind} weight is computed at run time")
            )
            continue
        if len(src.users) != 1:
            verdicts.append(
                Skip(bn.name, SkipReason.OTHER_CONSUMERS, f"the output of {src.name} is also used elsewhere")
            )
            continue
        if kind == "Linear":
            val = src.meta.get("val")
            if not (isinstance(val, torch.Tensor) and val.dim() == 2):
                verdicts.append(
                    Skip(
                        bn.name,
                        SkipReason.LAYOUT,
                        "linear meets batch norm on a tensor that is not 2-D (N, C)",
                    )
                )
                continue
        weight = fetch_attr(gm, str(w.target))
        if not weight.is_floating_point():
            verdicts.append(Skip(bn.name, SkipReason.UNSUPPORTED_DTYPE, "the weight is not floating point"))
            continue
        site = Site(bn.name, src.name, kind, Direction.FORWARD)
        verdicts.append(site)
        sites.append((site, bn, src))
    return verdicts, sites


def _addmm_weight(node: Any) -> fx.Node | None:
    """The weight of ``addmm(bias, x, permute(weight, [1, 0]))`` (a decomposed linear), else None."""
    if not (isinstance(node, fx.Node) and node.target is aten.addmm.default and not node.kwargs):
        return None
    if len(node.args) != 3 or not _is_attr(node.args[0]):
        return None
    p = node.args[2]
    if not (isinstance(p, fx.Node) and len(p.users) == 1 and _is_attr(p.args[0])):
        return None
    if p.target is aten.permute.default and list(p.args[1]) == [1, 0]:  # type: ignore[arg-type]
        return p.args[0]  # type: ignore[return-value]
    if p.target in (aten.t.default, aten.numpy_T.default):
        return p.args[0]  # type: ignore[return-value]
    return None


def _as_linear(gm: fx.GraphModule, addmm: fx.Node) -> fx.Node:
    """Rewrite a decomposed ``addmm`` linear as ``aten.linear`` (same math) so one path folds it."""
    w = _addmm_weight(addmm)
    with gm.graph.inserting_before(addmm):
        lin = gm.graph.call_function(aten.linear.default, (addmm.args[1], w, addmm.args[0]))
    lin.meta = dict(addmm.meta)
    perm = addmm.args[2]
    addmm.replace_all_uses_with(lin)
    gm.graph.erase_node(addmm)
    gm.graph.erase_node(perm)  # type: ignore[arg-type]
    return lin


def _layout(src: fx.Node) -> WeightLayout:
    kind, gi, tr = _CONV[src.target]  # type: ignore[index]
    if kind == "Linear":
        return WeightLayout.linear()
    groups = int(_arg(src, gi, 1)) if gi is not None else 1
    transposed = bool(_arg(src, 6, False)) if tr is None else tr
    return WeightLayout.conv_transpose(groups) if transposed else WeightLayout.conv(groups)


def fold_exported(
    ep: torch.export.ExportedProgram, *, dry_run: bool = False
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold every exactly-foldable BN of an exported program; return a new program and the report.

    Args:
        ep: the program (not changed).
        dry_run: decide only; ``ep`` comes back as given.

    Returns:
        ``(program, report)``: the program runs, re-exports and saves with ``torch.export.save``.

    Raises:
        UnsupportedModelError: the program carries no example inputs to export it again with.
    """
    gm = ep.module()
    verdicts, sites = find_export_sites(gm)
    report = FoldReport(backend="export", verdicts=verdicts)
    report.nodes_before = sum(1 for _ in ep.graph.nodes)
    report.params_before = sum(t.numel() for t in ep.state_dict.values())
    report.bn_before = len(verdicts)
    report.dry_run = dry_run
    kept: list[Verdict] = []
    todo = []
    for v in verdicts:
        match = next((s for s in sites if s[0] is v), None)
        if match is None:
            kept.append(v)
            continue
        _, bn, src = match
        w_node = src.args[1]
        b_node = _arg(src, 2, src.kwargs.get("bias"))
        weight = fetch_attr(gm, str(w_node.target))  # type: ignore[union-attr]
        bias = fetch_attr(gm, str(b_node.target)) if b_node is not None else None
        g, beta, mean, var = (None if a is None else fetch_attr(gm, str(a.target)) for a in bn.args[1:5])  # type: ignore[union-attr]
        eps = float(_arg(bn, 7) if bn.target is aten.batch_norm.default else _arg(bn, 6))
        scale, shift = bn_affine(to_f64(g), to_f64(beta), to_f64(mean), to_f64(var), eps)  # type: ignore[arg-type]
        w_new, b_new = fold_forward(to_f64(weight), to_f64(bias), scale, shift, _layout(src))  # type: ignore[arg-type]
        b_like = bias if bias is not None else weight
        if not (_fits(w_new, weight.dtype) and _fits(b_new, b_like.dtype)):
            kept.append(
                Skip(v.bn, SkipReason.OVERFLOW, f"the folded weights would not be finite in {weight.dtype}")
            )
            continue
        kept.append(v)
        todo.append((bn, src, from_f64(w_new, weight), from_f64(b_new, b_like.new_empty(0))))
    report.verdicts = kept
    report.bn_after = len(report.skips) if not dry_run else report.bn_before
    if dry_run or not todo:
        report.nodes_after, report.params_after = report.nodes_before, report.params_before
        return ep, report
    for k, (bn, src, w_t, b_t) in enumerate(todo):
        wn, bname = f"_bnfold_w{k}", f"_bnfold_b{k}"
        gm.register_parameter(wn, nn.Parameter(w_t, requires_grad=False))
        gm.register_parameter(bname, nn.Parameter(b_t, requires_grad=False))
        with gm.graph.inserting_before(src):
            w_attr = gm.graph.get_attr(wn)
            b_attr = gm.graph.get_attr(bname)
        args = list(src.args)
        while len(args) < 3:
            args.append(None)
        args[1], args[2] = w_attr, b_attr
        kwargs = {k2: v2 for k2, v2 in src.kwargs.items() if k2 != "bias"}
        src.args, src.kwargs = tuple(args), kwargs
        if bn.target is aten.batch_norm.default:
            bn.replace_all_uses_with(src)
        else:
            for u in list(bn.users):
                u.replace_all_uses_with(src)
                gm.graph.erase_node(u)
        gm.graph.erase_node(bn)
    dropped: set[str] = set()
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            dropped.add(str(n.target))
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    _drop_unused_attrs(gm, dropped)
    if ep.example_inputs is None:
        raise UnsupportedModelError(
            "the exported program has no example inputs to export the folded graph with"
        )
    args_in, kwargs_in = ep.example_inputs
    dynamic = _dynamic_shapes(ep) if any(True for _ in ep.range_constraints) else None
    new_ep = None
    if dynamic is not None:
        try:
            new_ep = torch.export.export(gm, tuple(args_in), dict(kwargs_in), dynamic_shapes=dynamic, strict=False)
        except Exception as e:  # the dims could not be re-derived: fall back to static shapes, say so
            log.debug("re-export with dynamic shapes failed: %s", e)
    if new_ep is None:
        new_ep = torch.export.export(gm, tuple(args_in), dict(kwargs_in), strict=False)
        if any(True for _ in ep.range_constraints):
            report.notes.append(
                "the folded program was exported again with static shapes (its dynamic dims could not "
                "be carried over)"
            )
    report.nodes_after = sum(1 for _ in new_ep.graph.nodes)
    report.params_after = sum(t.numel() for t in new_ep.state_dict.values())
    return new_ep, report


def _dynamic_shapes(ep: torch.export.ExportedProgram) -> tuple[Any, ...] | None:
    """``dynamic_shapes`` for exporting again with the program's own dynamic dims, or None.

    Each user input's placeholder carries a fake tensor whose symbolic dims name the program's range
    constraints; a plain symbol becomes one ``torch.export.Dim`` with the same bounds (shared where the
    symbol is shared). Only positional tensor inputs and plain symbols are handled.
    """
    import sympy

    if ep.example_inputs is None or ep.example_inputs[1]:
        return None
    user = set(ep.graph_signature.user_inputs)
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    dims: dict[str, Any] = {}
    spec: list[Any] = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        entry: dict[int, Any] = {}
        for i, d in enumerate(val.shape):
            if isinstance(d, int):
                continue
            expr = d.node.expr
            if not isinstance(expr, sympy.Symbol) or str(expr) not in ranges:
                return None
            name = str(expr)
            if name not in dims:
                vr = ranges[name]
                lo, hi = int(vr.lower), vr.upper
                hi_i = _finite_int(hi)
                dims[name] = torch.export.Dim(f"d_{name}", min=lo, max=hi_i) if hi_i is not None else (
                    torch.export.Dim(f"d_{name}", min=lo)
                )
            entry[i] = dims[name]
        spec.append(entry or None)
    return tuple(spec)


def _finite_int(v: Any) -> int | None:
    """``int(v)`` for a finite bound; None for sympy's ``oo`` and torch's ``int_oo`` (whose
    ``is_finite`` is True although it is unbounded)."""
    if getattr(v, "is_infinite", False) or "Infinity" in type(v).__name__:
        return None
    try:
        return int(v)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def _drop_unused_attrs(gm: fx.GraphModule, dropped: set[str]) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used or name not in dropped:
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_name) if mod_name else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]

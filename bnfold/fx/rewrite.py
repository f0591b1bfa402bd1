"""Apply the sites :func:`bnfold.fx.match.find_sites` found, on a model the caller already copied.

Math (float64, through :mod:`bnfold.fold_math`, one correctly rounded cast back per tensor): the BN's
eval map ``y = scale * x + shift`` goes into the layer's output channels (forward) or input channels
(backward). A layer that absorbs two BNs (one before, one after) accumulates both in float64 and is
cast once. Tensors keep the layer's dtype, device and memory format (channels_last stays
channels_last); a result that would not be finite in the layer's dtype is refused (``OVERFLOW``).

Two ways to apply:

* module mode: the layer's ``weight``/``bias`` become new ``nn.Parameter`` s and the BN module is
  replaced by ``nn.Identity()`` in its parent: the model keeps its class and its own ``forward``.
* graph mode (a ``torch.fx.GraphModule``): each folded BN node is removed (its users read its input);
  a layer module called at several places is cloned per folded call site (``conv__bnfold1``), so the
  shared module keeps its weights for the other calls::

      Before:  x -> conv -> bn1 -> ...       y -> conv -> bn2 -> ...
      After:   x -> conv__bnfold1 -> ...     y -> conv__bnfold2 -> ...   (conv itself unchanged)
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold.fold_math import F64, WeightLayout, bn_affine, cast_exact, fits_dtype, fold_backward, fold_forward
from bnfold.records import Direction, Skip, SkipReason, Verdict

from .custom import BnSpec, describe_bn
from .match import Candidate, fetch_attr, functional_bn_args

__all__ = ["bn_scale_shift", "plan_sites", "apply_module_mode", "apply_graph_mode", "to_f64", "from_f64"]


def to_f64(t: torch.Tensor | None) -> F64 | None:
    """A tensor as a float64 NumPy array (None stays None)."""
    if t is None:
        return None
    return t.detach().cpu().to(torch.float64).numpy()


def from_f64(a: Any, like: torch.Tensor) -> torch.Tensor:
    """Float64 values rounded once to ``like``'s dtype, on its device, in its memory format."""
    dt = like.dtype
    if dt == torch.bfloat16:
        import ml_dtypes

        arr = cast_exact(a, ml_dtypes.bfloat16)
        t = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    else:
        np_dt = torch.empty((), dtype=dt).numpy().dtype
        t = torch.from_numpy(np.ascontiguousarray(cast_exact(a, np_dt)))
    t = t.to(like.device)
    for rank, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == rank and like.dim() == rank and like.is_contiguous(memory_format=fmt) and not like.is_contiguous():
            return t.contiguous(memory_format=fmt)
    return t


def _np_dtype(dt: torch.dtype) -> Any:
    if dt == torch.bfloat16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return torch.empty((), dtype=dt).numpy().dtype


def bn_scale_shift(bn_node: fx.Node, root: nn.Module, spec: BnSpec | None = None) -> tuple[F64, F64]:
    """The eval map of the BN called at ``bn_node`` as float64 ``(scale, shift)``."""
    if bn_node.op == "call_module":
        if spec is None:
            got = describe_bn(fetch_attr(root, str(bn_node.target)))
            assert isinstance(got, BnSpec)  # match refused the others
            spec = got
        return spec.affine64()
    a = functional_bn_args(bn_node)

    def get(key: str) -> F64 | None:
        v = a[key]
        return None if v is None else to_f64(fetch_attr(root, str(v.target)))

    return bn_affine(get("weight"), get("bias"), get("running_mean"), get("running_var"), float(a["eps"]))  # type: ignore[arg-type]


def _layout(layer: nn.Module) -> WeightLayout:
    if isinstance(layer, nn.Linear):
        return WeightLayout.linear()
    groups = int(layer.groups)  # type: ignore[arg-type]
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return WeightLayout.conv_transpose(groups)
    return WeightLayout.conv(groups)


def plan_sites(
    root: nn.Module, cands: list[Candidate], verdicts: list[Verdict]
) -> tuple[dict[fx.Node, tuple[F64, F64]], list[Candidate], list[Verdict]]:
    """Compute every folded weight in float64, per layer call; refuse overflowing sites.

    Returns:
        ``(new weights per layer node, candidates kept, verdicts with OVERFLOW skips swapped in)``.
    """
    state: dict[fx.Node, tuple[F64, F64]] = {}
    kept: list[Candidate] = []
    swapped: dict[str, Verdict] = {}
    for c in cands:
        scale, shift = bn_scale_shift(c.bn_node, root, c.spec)
        if c.repeat > 1:  # BN -> Flatten -> Linear: channel c covers features c*k .. c*k + k - 1
            scale, shift = np.repeat(scale, c.repeat), np.repeat(shift, c.repeat)
        fold = fold_forward if c.site.direction is Direction.FORWARD else fold_backward
        # One layer, or the branches of a channel route: a slice of the BN per concatenated input,
        # or the whole BN per summed branch with the shift going into the first branch only.
        parts = c.parts or [(c.layer_node, 0, scale.shape[0], True)]
        new: dict[fx.Node, tuple[F64, F64]] = {}
        why: Skip | None = None
        for node, lo, hi, with_shift in parts:
            layer = fetch_attr(root, str(node.target))
            w0 = layer.weight
            w0_64 = to_f64(w0)
            assert w0_64 is not None
            w, b = state[node] if node in state else (w0_64, to_f64(layer.bias))
            t = shift[lo:hi] if with_shift else np.zeros(hi - lo)
            try:
                w_new, b_new = fold(w, b, scale[lo:hi], t, _layout(layer))
            except ValueError as e:
                why = Skip(c.site.bn, SkipReason.LAYOUT, f"channels do not line up ({e})")
                break
            b_dt = layer.bias.dtype if layer.bias is not None else w0.dtype
            if not (_fits(w_new, w0.dtype) and _fits(b_new, b_dt)):
                why = Skip(c.site.bn, SkipReason.OVERFLOW, f"the folded weights would not be finite in {w0.dtype}")
                break
            new[node] = (w_new, b_new)
        if why is not None:
            swapped[c.site.bn] = why
            continue
        state.update(new)
        kept.append(c)
    return state, kept, [swapped.get(v.bn, v) for v in verdicts]


def _fits(a: F64, dtype: torch.dtype) -> bool:
    """``fits_dtype`` on the extremes only: rounding is monotonic, and min/max propagate NaN."""
    if a.size == 0:
        return True
    return fits_dtype(np.array([a.min(), a.max()]), _np_dtype(dtype))


def _set_layer(layer: nn.Module, w: F64, b: F64) -> None:
    w0: torch.Tensor = layer.weight  # type: ignore[assignment]
    b0: torch.Tensor | None = layer.bias  # type: ignore[assignment]
    b_like = b0 if b0 is not None else w0.new_empty(0)
    layer.weight = nn.Parameter(from_f64(w, w0), requires_grad=w0.requires_grad)
    layer.bias = nn.Parameter(from_f64(b, b_like), requires_grad=w0.requires_grad)


def _replace_module(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _tail_of(root: nn.Module, c: Candidate) -> nn.Module:
    """What replaces a folded BN module: its tail (activation, dropout...) or ``nn.Identity()``."""
    if c.spec is None or not c.spec.has_tail:
        return nn.Identity()
    tail = c.spec.make_tail(fetch_attr(root, str(c.bn_node.target)))
    return nn.Identity() if tail is None else tail


def apply_module_mode(root: nn.Module, state: dict[fx.Node, tuple[F64, F64]], cands: list[Candidate]) -> None:
    """Write the folded weights into the layers and put its tail or ``nn.Identity()`` in place of each BN."""
    for node, (w, b) in state.items():
        _set_layer(fetch_attr(root, str(node.target)), w, b)
    for c in cands:
        _replace_module(root, str(c.bn_node.target), _tail_of(root, c))


def apply_graph_mode(
    gm: fx.GraphModule, state: dict[fx.Node, tuple[F64, F64]], cands: list[Candidate], clone_targets: set[str]
) -> None:
    """Fold in a GraphModule: clone shared layers per call site, drop the BN nodes."""
    counter = 0
    for node, (w, b) in state.items():
        target = str(node.target)
        layer = fetch_attr(gm, target)
        if target in clone_targets:
            counter += 1
            new_name = f"{target}__bnfold{counter}"
            while _has_attr(gm, new_name):
                counter += 1
                new_name = f"{target}__bnfold{counter}"
            layer = copy.deepcopy(layer)
            gm.add_submodule(new_name, layer)
            node.target = new_name
        _set_layer(layer, w, b)
    bn_targets: set[str] = set()
    for c in cands:
        bn = c.bn_node
        if bn.op == "call_module" and c.spec is not None and c.spec.has_tail:
            # Keep the call, pointed at the BN's tail (the BN module itself may serve other calls).
            target = str(bn.target)
            new_name = f"{target}__bnfold_tail"
            k = 0
            while _has_attr(gm, new_name):
                k += 1
                new_name = f"{target}__bnfold_tail{k}"
            gm.add_submodule(new_name, _tail_of(gm, c))
            bn.target = new_name
            bn_targets.add(target)
            continue
        bn.replace_all_uses_with(bn.args[0])  # type: ignore[arg-type]
        attr_inputs = [n for n in bn.all_input_nodes if n.op == "get_attr"]
        gm.graph.erase_node(bn)
        for n in attr_inputs:
            if not n.users:
                gm.graph.erase_node(n)
        if bn.op == "call_module":
            bn_targets.add(str(bn.target))
    still_called = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for t in bn_targets:
        if t not in still_called and not any(s.startswith(t + ".") for s in still_called):
            gm.delete_submodule(t)
    gm.graph.lint()
    gm.recompile()


def _has_attr(root: nn.Module, target: str) -> bool:
    try:
        fetch_attr(root, target)
    except AttributeError:
        return False
    return True

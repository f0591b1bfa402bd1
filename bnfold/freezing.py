"""Freeze BatchNorm into its inference affine map, turn it back, and re-estimate its statistics.

Freezing (for fine-tuning with batches too small for batch statistics) replaces each selected
BatchNorm by a :class:`~bnfold.nn.frozen.FrozenBatchNorm` computing, per channel::

    y = x * scale + shift,   scale = gamma / sqrt(var + eps),   shift = beta - mean * scale

in float64, cast once to the layer dtype. Rules:

    1. Layers frozen: every BN-like layer whose eval map bnfold knows (:mod:`bnfold.fx.custom`):
       ``torch.nn`` and ``bnfold.nn`` BatchNorm1d/2d/3d and SyncBatchNorm and subclasses that keep
       their forward; subclasses whose forward is "BN, then ops on its output" (timm's
       ``BatchNormAct2d``: the frozen layer is the affine followed by the same activation/dropout);
       classes declared with :func:`bnfold.register_bn_like`. Left: other subclasses, and traced
       subclasses whose post-processing differs between train and eval mode (``SkipReason.CUSTOM_BN``), BNs without running statistics (``SkipReason.NO_RUNNING_STATS``:
       they have no inference map), BNs whose scale/shift are not finite in their dtype
       (``SkipReason.OVERFLOW``). With ``strict=True`` (the default of :func:`freeze`) any BN left
       is an error naming the layers; ``strict=False`` returns the partial freeze with the report.
    2. Selection: every such BN, or those whose qualified name is (under) one of ``prefix``, and/or
       for which ``predicate(name, module)`` is true. Unselected BNs are named in the report's notes.
    3. Functional: the model is deep-copied unless ``inplace=True``; the new root is returned (it is a
       new module when the root itself is a BN). A module registered at several names is replaced by
       one frozen layer registered at the same names (it stays shared).
    4. ``unfreeze`` maps a frozen layer back to the BN class it came from (``torch.nn.BatchNorm2d``
       when unknown), see :meth:`FrozenBatchNorm.bn_state`: a layer unchanged since it was frozen
       gives back the BN's own gamma, beta, mean and var, bit for bit; a layer whose scale/shift
       changed (fine-tuned) gives a BN whose gamma/beta are rounded once to the dtype, so its eval
       output agrees with the frozen layer's to a few ulp.
    5. ``recalibrate`` re-estimates the running statistics of every BN as the cumulative average over
       the given batches (PyTorch ``momentum=None``) with only the BNs in train mode and no gradient;
       nothing else changes.

Checkpoints, both directions:

    * BN -> frozen: ``frozen_model.load_state_dict(bn_checkpoint)`` works as is (``weight``, ``bias``,
      ``running_mean``, ``running_var``, ``num_batches_tracked`` are converted with each frozen layer's
      ``eps``; ``affine=False`` BNs have no weight/bias); frozen checkpoints (``scale``/``shift``) load
      too.
    * frozen -> BN: ``bn_model.load_state_dict(bn_state_dict(frozen_model))``, or
      :func:`to_bn_state_dict` on a saved frozen state_dict, with the BN ``eps`` given or read from
      the model the result loads into.

The module is named ``freezing`` (not ``freeze``) so that importing it never rebinds the package
attribute ``bnfold.freeze``, which is the function.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .dtypes import numpy_dtype, to_float64
from .errors import InputError, OptionError, UnsupportedModelError
from .fold_math import bn_affine, fits_dtype
from .fx.bnspec import BnSpec
from .fx.copying import copy_model
from .fx.custom import describe_bn, registered_bn_like, tail_same_in_train
from .nn.frozen import SOURCE_KEYS, FrozenBatchNorm
from .records import Direction, FoldReport, Site, Skip, SkipReason, Verdict

__all__ = [
    "freeze",
    "freeze_with_report",
    "unfreeze",
    "recalibrate",
    "bn_state_dict",
    "to_bn_state_dict",
]

log = logging.getLogger(__name__)

Predicate = Callable[[str, nn.Module], bool]


def _freezable_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
    try:
        from . import nn as bnn

        types += [bnn.BatchNorm1d, bnn.BatchNorm2d, bnn.BatchNorm3d, bnn.SyncBatchNorm]
    except ImportError:  # pragma: no cover - bnfold.nn always ships; keep freeze usable regardless
        log.debug("bnfold.nn not importable; freezing torch BatchNorm only")
    return tuple(types)


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = new


def _selected(
    names: Sequence[str], module: nn.Module, prefixes: tuple[str, ...] | None, predicate: Predicate | None
) -> bool:
    if prefixes is not None and not any(
        p == "" or n == p or n.startswith(p + ".") for n in names for p in prefixes
    ):
        return False
    return predicate is None or any(predicate(n, module) for n in names)


def _is_bn_like(m: nn.Module) -> bool:
    return (isinstance(m, _BatchNorm) or registered_bn_like(m)) and not isinstance(m, FrozenBatchNorm)


def _verdict(name: str, bn: nn.Module) -> Skip | BnSpec:
    """A reason to leave ``bn`` as it is, or its spec when it can be frozen."""
    spec = describe_bn(bn)
    if isinstance(spec, str):
        if spec.startswith("no_running_stats: "):
            return Skip(
                name,
                SkipReason.NO_RUNNING_STATS,
                "track_running_stats=False: it normalises with batch statistics even in eval mode, so it "
                "has no fixed affine map to freeze",
            )
        return Skip(name, SkipReason.CUSTOM_BN, spec)
    if not tail_same_in_train(bn):
        return Skip(
            name,
            SkipReason.CUSTOM_BN,
            f"{type(bn).__name__} post-processes its output differently in train mode; a frozen layer "
            "would keep only the eval-mode version",
        )
    mean, var, weight, bias = spec.mean, spec.var, spec.weight, spec.bias
    assert mean is not None and var is not None
    dtype = weight.dtype if weight is not None else mean.dtype
    if not dtype.is_floating_point:
        return Skip(name, SkipReason.UNSUPPORTED_DTYPE, f"parameters are {dtype}, not floating point")
    if not spec.eps > 0:
        return Skip(name, SkipReason.UNSUPPORTED_LAYER, f"eps={spec.eps} <= 0; set eps > 0 before freezing")
    scale, shift = bn_affine(
        to_float64(weight), to_float64(bias), to_float64(mean), to_float64(var), spec.eps
    )
    np_dtype = numpy_dtype(dtype)  # bfloat16 exactly: the dtype FrozenBatchNorm stores the affine in
    if not (fits_dtype(scale, np_dtype) and fits_dtype(shift, np_dtype)):
        return Skip(name, SkipReason.OVERFLOW, f"scale or shift would not be finite in {dtype}")
    return spec


def freeze_with_report(
    model: nn.Module,
    *,
    learnable: bool = False,
    inplace: bool = False,
    prefix: str | Sequence[str] | None = None,
    predicate: Predicate | None = None,
    strict: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Freeze BatchNorm layers; return the new root and a report with one verdict per selected BN.

    Args and return value as :func:`freeze`, plus a :class:`~bnfold.records.FoldReport`
    (``backend="freeze"``): a ``Site`` (direction ``AFFINE``, target_kind ``"FrozenBatchNorm"``) per
    frozen BN, a ``Skip`` per selected BN that was left, the unselected BNs in ``notes``. Unlike
    :func:`freeze`, ``strict`` defaults to False here: the report says what was left.

    Raises:
        UnsupportedModelError: a lazy module has not been initialised yet, or ``strict`` and a
            selected BN cannot be frozen (the message names each one and why).
        InputError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"freeze expects a torch.nn.Module, got {type(model).__name__}")
    t0 = time.perf_counter()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[misc]
            raise UnsupportedModelError(
                f"{name or type(m).__name__}: uninitialised lazy module; run one forward pass first"
            )
    prefixes = (prefix,) if isinstance(prefix, str) else (None if prefix is None else tuple(prefix))
    root = model if inplace else copy_model(model)
    types = _freezable_types()
    names = _names_by_module(root)
    bns = [(n, m) for n, m in root.named_modules() if _is_bn_like(m)]
    params_before = sum(p.numel() for p in root.parameters())
    verdicts: list[Verdict] = []
    unselected: list[str] = []
    new_root = root
    for name, bn in bns:
        all_names = names[id(bn)]
        if not _selected(all_names, bn, prefixes, predicate):
            unselected.append(name)
            continue
        spec = _verdict(name, bn)
        if isinstance(spec, Skip):
            verdicts.append(spec)
            continue
        assert spec.mean is not None and spec.var is not None
        try:
            frozen = FrozenBatchNorm.from_bn(
                bn,
                learnable=learnable,
                stats=(spec.weight, spec.bias, spec.mean, spec.var, spec.eps),
                tail=spec.make_tail(bn),
                # a class it cannot rebuild from (num_features, eps, ...) comes back from a copy
                template=None if type(bn) in types else _template(bn),
            )
        except ValueError as e:  # e.g. bfloat16 rounding up to inf at the edge of the range
            verdicts.append(Skip(name, SkipReason.OVERFLOW, str(e)))
            continue
        for n in all_names:
            if n == "":
                new_root = frozen
            else:
                _replace(root, n, frozen)
        detail = "learnable scale/shift" if learnable else "fixed scale/shift"
        if frozen.tail is not None:
            detail += f"; {type(bn).__name__}'s activation/dropout kept"
        if len(all_names) > 1:
            detail += f"; shared at {', '.join(all_names)}"
        verdicts.append(Site(name, "", "FrozenBatchNorm", Direction.AFFINE, detail, "bn-freeze"))
    notes = (f"{len(unselected)} BatchNorm not selected: {', '.join(unselected)}",) if unselected else ()
    left = [v for v in verdicts if isinstance(v, Skip)]
    if strict and left:
        shown = "; ".join(f"'{v.bn}' ({v.reason.value}: {v.detail})" for v in left[:5])
        more = f"; and {len(left) - 5} more" if len(left) > 5 else ""
        raise UnsupportedModelError(
            f"{len(left)} BatchNorm cannot be frozen: {shown}{more}. Pass strict=False to accept a "
            "partial freeze (the report names what was left)"
        )
    report = FoldReport(
        backend="freeze",
        verdicts=verdicts,
        notes=notes,
        bn_before=len(bns),
        params_before=params_before,
        bn_after=sum(1 for _, m in new_root.named_modules() if _is_bn_like(m)),
        params_after=sum(p.numel() for p in new_root.parameters()),
        seconds=time.perf_counter() - t0,
    )
    return new_root, report


def freeze(
    model: nn.Module,
    *,
    learnable: bool = False,
    inplace: bool = False,
    prefix: str | Sequence[str] | None = None,
    predicate: Predicate | None = None,
    report: list[Verdict] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Replace BatchNorm layers by frozen affine layers ``y = x * scale + shift``.

    Frozen: output in ``train()`` equals the eval output, no running statistics change, and (by
    default) ``scale``/``shift`` are buffers with no gradient.

    Args:
        model: the model (not changed unless ``inplace``).
        learnable: make ``scale``/``shift`` trainable parameters initialised at the folded values.
        inplace: change ``model`` itself (the returned root is still the one to use: a BN root is
            replaced by a new module).
        prefix: freeze only BNs whose qualified name is one of these, or lies under one
            (``"layer1"`` selects ``layer1.0.bn1``, not ``layer10.bn``); ``""`` selects all.
        predicate: ``predicate(name, module) -> bool``; freeze only BNs for which it is true
            (combined with ``prefix`` by AND).
        report: if given, a list that receives one ``Site`` or ``Skip`` per selected BN.
        strict: a selected BN that cannot be frozen is an error naming it (default); with False the
            partial freeze is returned and ``report`` says what was left and why.

    Returns:
        The new root module.

    Raises:
        UnsupportedModelError: ``strict`` and some selected BN cannot be frozen.

    Example:
        >>> model = bnfold.freeze(model)                  # fine-tune with batch 2
        >>> model = bnfold.freeze(model, learnable=True)  # statistics fixed, affine trained
    """
    out, rep = freeze_with_report(
        model, learnable=learnable, inplace=inplace, prefix=prefix, predicate=predicate, strict=strict
    )
    if report is not None:
        report.extend(rep.verdicts)
    return out


def _template(bn: nn.Module) -> nn.Module:
    """A copy of ``bn`` for :func:`unfreeze`, without the hooks or graph state of the live model."""
    return copy.deepcopy(bn)


@torch.no_grad()
def _from_template(layer: FrozenBatchNorm, template: nn.Module) -> nn.Module:
    """The source layer back: a copy of the template with this layer's BN state and its tail modules."""
    out = copy.deepcopy(template)
    state = layer.bn_state(affine=getattr(out, "weight", None) is not None)
    for key, value in state.items():
        t = getattr(out, key, None)
        if isinstance(t, Tensor) and t.shape == value.shape:
            t.copy_(value.to(t.dtype))
    if layer.tail is not None:
        for n, child in layer.tail.named_children():
            old = out._modules.get(n)
            if old is not None and type(old) is type(child):
                out._modules[n] = child
    out.to(layer.scale.device)
    out.train(layer.training)
    return out


def _bn_class(layer: FrozenBatchNorm) -> type[_BatchNorm]:
    src = layer.source
    if isinstance(src, type) and issubclass(src, _BatchNorm):
        return src
    return {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}.get(layer.dim or 2, nn.BatchNorm2d)


@torch.no_grad()
def _to_bn(layer: FrozenBatchNorm) -> nn.Module:
    template = getattr(layer, "source_template", None)
    if template is not None:
        return _from_template(layer, template)
    cls = _bn_class(layer)
    momentum = layer.momentum
    affine = True
    if not layer.source_affine:  # as the source BN, unless its map no longer fits a BN without gamma/beta
        try:
            state, affine = layer.bn_state(affine=False), False
        except ValueError:
            pass
    if affine:
        state = layer.bn_state(affine=True)
    bn = cls(
        layer.num_features,
        eps=layer.eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=True,
        device=layer.scale.device,
        dtype=layer.scale.dtype,
    )
    if affine:
        bn.weight.copy_(state["weight"])
        bn.bias.copy_(state["bias"])
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    bn.running_mean.copy_(state["running_mean"])
    bn.running_var.copy_(state["running_var"])
    bn.num_batches_tracked.copy_(state["num_batches_tracked"])
    bn.train(layer.training)
    return bn


def unfreeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turn every :class:`FrozenBatchNorm` back into a trainable BatchNorm with identical eval output.

    The BN class is the one the layer was frozen from (``SyncBatchNorm`` stays ``SyncBatchNorm``;
    ``BatchNorm{dim}d`` when only the ``dim`` hint is known, ``BatchNorm2d`` otherwise). Statistics
    and affine parameters follow :meth:`FrozenBatchNorm.bn_state`: a layer frozen from a BN and
    unchanged since comes back as that BN, bit for bit (also after a ``state_dict`` save and load);
    a fine-tuned layer comes back with gamma/beta rounded once to the dtype (eval output within a
    few ulp of the frozen layer's).

    Args:
        model: the model (not changed unless ``inplace``).
        inplace: change ``model`` itself.

    Returns:
        The new root module.
    """
    root = model if inplace else copy_model(model)
    names = _names_by_module(root)
    new_root = root
    for _, layer in list(root.named_modules()):
        if not isinstance(layer, FrozenBatchNorm):
            continue
        bn = _to_bn(layer)
        for n in names[id(layer)]:
            if n == "":
                new_root = bn
            else:
                _replace(root, n, bn)
    return new_root


# Moved to bnfold.recalibration (distributed reduction, prior, pooled estimator); re-exported here so
# that ``bnfold.freezing.recalibrate`` keeps working.
from .recalibration import recalibrate  # noqa: E402


def bn_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict of ``model`` with every frozen layer's entries in BatchNorm format.

    Loads into the original (unfrozen) model and gives the same eval output: per frozen layer,
    ``scale``/``shift`` become ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (see :meth:`FrozenBatchNorm.bn_state`); other entries are unchanged.
    """
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    frozen = {
        name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, FrozenBatchNorm)
    }
    for key, value in state.items():
        mod, _, leaf = key.rpartition(".")
        if mod in frozen and leaf in ("scale", "shift", *SOURCE_KEYS):
            if leaf == "scale":
                pre = mod + "." if mod else ""
                out.update({pre + k: v for k, v in frozen[mod].bn_state().items()})
            continue
        owner = next((m for m in frozen if key.startswith((m + "." if m else "") + "tail.")), None)
        if owner is not None:  # a kept activation's entries go back where the BN-like layer had them
            pre = owner + "." if owner else ""
            out[pre + key[len(pre) + len("tail.") :]] = value
            continue
        out[key] = value
    return out


def to_bn_state_dict(
    state_dict: Mapping[str, Tensor],
    eps: float | Mapping[str, float] | None = None,
    affine: bool | Mapping[str, bool] | None = None,
    *,
    model: nn.Module | None = None,
) -> dict[str, Tensor]:
    """Convert a saved frozen state_dict to BatchNorm format.

    Every pair ``<m>.scale`` / ``<m>.shift`` of equal 1-D shape is taken as a frozen layer ``<m>`` and
    mapped as :meth:`FrozenBatchNorm.bn_state` does: the source BN's own values when the state_dict
    holds them (``<m>.source_*``) and ``scale``/``shift`` are still their fold with ``eps``; otherwise
    derived (``running_mean = 0``, ``running_var = 1 - eps`` (0 if ``eps >= 1``), ``weight = scale *
    sqrt(running_var + eps)``, ``bias = shift`` when the statistics are unknown). A BN with that
    ``eps`` gives the same eval output. The state_dict does not record ``eps`` and the output
    depends on it, so it is given or read from ``model``; never assumed.

    Args:
        state_dict: the frozen model's state_dict.
        eps: the BN epsilon, one for all layers or per layer name ``<m>``.
        affine: whether the target BN has weight and bias, for all layers or per layer name (default:
            as ``model``'s layer, else True); for ``affine=False`` see :meth:`FrozenBatchNorm.bn_state`.
        model: the model the result will load into (BN or frozen layers at the names ``<m>``): gives
            each layer's ``eps`` (and ``affine``) where ``eps`` (``affine``) does not.

    Raises:
        OptionError: a layer's ``eps`` is neither given nor found in ``model``.
        ValueError: a layer cannot be written as a BN with ``affine=False``.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        mod, _, leaf = key.rpartition(".")
        pre = mod + "." if mod else ""
        if leaf in SOURCE_KEYS and pre + "scale" in state_dict:
            continue  # read with the layer's scale below
        other = state_dict.get(pre + ("shift" if leaf == "scale" else "scale"))
        if (
            leaf in ("scale", "shift")
            and other is not None
            and value.dim() == 1
            and other.shape == value.shape
        ):
            if leaf == "shift":
                continue
            e, a = _layer_eps_affine(mod, eps, affine, model)
            layer = FrozenBatchNorm(value.numel(), e, dtype=value.dtype, device=value.device)
            entries = {"scale": value, "shift": other}
            for k in SOURCE_KEYS:
                if pre + k in state_dict:
                    entries[k] = state_dict[pre + k]
            layer.load_state_dict(entries)
            out.update({pre + k: v for k, v in layer.bn_state(affine=a).items()})
            continue
        out[key] = value
    return out


def _layer_eps_affine(
    name: str,
    eps: float | Mapping[str, float] | None,
    affine: bool | Mapping[str, bool] | None,
    model: nn.Module | None,
) -> tuple[float, bool]:
    """Layer ``name``'s ``(eps, affine)`` for :func:`to_bn_state_dict`: as given, else from ``model``."""
    layer: nn.Module | None = None
    if model is not None:
        try:
            layer = model.get_submodule(name) if name else model
        except AttributeError:
            layer = None
    e: float | None = None
    if isinstance(eps, Mapping):
        e = None if name not in eps else float(eps[name])
    elif eps is not None:
        e = float(eps)
    layer_eps = getattr(layer, "eps", None)
    if e is None and isinstance(layer_eps, (int, float)) and not isinstance(layer_eps, bool):
        e = float(layer_eps)
    if e is None:
        where = "" if model is None else f" and the model has no BatchNorm or frozen layer '{name}'"
        raise OptionError(
            f"to_bn_state_dict: the epsilon of layer '{name}' is unknown (a state_dict does not record it)"
            f"{where}: pass eps= (the BatchNorm eps) or model= (the model the result will load into)"
        )
    a: bool | None = None
    if isinstance(affine, Mapping):
        a = None if name not in affine else bool(affine[name])
    elif affine is not None:
        a = bool(affine)
    if a is None and layer is not None:
        a = (
            bool(layer.source_affine)
            if isinstance(layer, FrozenBatchNorm)
            else getattr(layer, "weight", None) is not None
        )
    return e, True if a is None else a

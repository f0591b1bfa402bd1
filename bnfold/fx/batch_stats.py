"""PyTorch BatchNorms without running statistics -> InstanceNorm, on request (``batch_stats="instance"``).

``nn.BatchNorm{1,2,3}d(track_running_stats=False)`` computes ``F.batch_norm(x, None, None, weight, bias,
training=True, eps=eps)`` in train and eval mode alike: statistics over every axis but the channel axis 1,
batch included, biased variance. At batch 1 these are the per-sample, per-channel statistics over the
spatial axes, with the same ``eps``: exactly ``nn.InstanceNorm{1,2,3}d(C, eps, affine, track_running_stats=False)``
with the BN's weight and bias. The conversion is a module swap (same name, same parameters, same device and
dtype, same ``training`` flag); at batch > 1 the model then normalises each sample on its own, which the
verdict says. Only the three plain classes are swapped (a subclass may compute something else); a BN with
running statistics is never touched (in ``train()`` mode it is refused as before).

A BatchNorm1d on 2-D data (N, C) has no spatial axes: at batch 1 the original raises (one value per
channel), and the InstanceNorm1d that replaces an affine BN raises as well (it reads (1, C) as an unbatched
(C=1, L) input whose channel count does not match), so nothing is silently changed there.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from torch import nn

from bnfold.records import Direction, FoldReport, Site

__all__ = ["convertible", "convert_batch_stats", "copy_for", "with_conversions", "INSTANCE_DETAIL", "NOTE"]

INSTANCE_DETAIL = (
    "track_running_stats=False: replaced by InstanceNorm (batch_stats='instance'), exact at batch 1; at "
    "batch > 1 each sample is normalised on its own (the model computes something else)"
)

_PAIRS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nn.InstanceNorm1d,
    nn.BatchNorm2d: nn.InstanceNorm2d,
    nn.BatchNorm3d: nn.InstanceNorm3d,
}


def convertible(m: nn.Module) -> bool:
    """A plain BatchNorm{1,2,3}d that normalises with its batch in every mode."""
    return type(m) in _PAIRS and (
        not getattr(m, "track_running_stats", True)
        and getattr(m, "running_mean", None) is None
        and getattr(m, "running_var", None) is None
    )


def _instance(bn: Any) -> nn.Module:
    cls = _PAIRS[type(bn)]
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=False)
    if bn.affine:
        new.weight = bn.weight  # the parameter objects themselves (the model given is a copy, or in place)
        new.bias = bn.bias
    new.train(bn.training)
    return new


def convert_batch_stats(module: nn.Module, *, dry_run: bool = False) -> tuple[nn.Module, list[Site]]:
    """Swap every convertible BN of ``module`` (in place) for an InstanceNorm; the verdicts, in module order.

    ``dry_run``: change nothing, return the verdicts only. The root module itself is swapped into a new one.
    """
    names = [name for name, m in module.named_modules() if convertible(m)]
    sites = [
        Site(
            name or "<root>",
            name or "<root>",
            f"InstanceNorm{type(module.get_submodule(name)).__name__[-2:]}",
            Direction.CONVERTED,
            INSTANCE_DETAIL,
            "bn-instance",
        )
        for name in names
    ]
    if dry_run or not names:
        return module, sites
    if names == [""]:
        return _instance(module), sites
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, attr, _instance(parent.get_submodule(attr)))
    return module, sites


def copy_for(module: nn.Module, inplace: bool) -> nn.Module:
    """The module to convert: ``module`` itself with ``inplace``, else a deep copy."""
    return module if inplace else copy.deepcopy(module)


NOTE = (
    "{n} batch-statistics BN(s) replaced by InstanceNorm (batch_stats='instance'): equal at batch 1 only; "
    "at batch > 1 the model now normalises each sample on its own"
)


def with_conversions(report: FoldReport, sites: list[Site], original: nn.Module, dry_run: bool) -> FoldReport:
    """``report`` of the fold of the converted model, with the conversions' verdicts and note.

    A dry run folded the model as given: its verdicts for the converted BNs (left, no running statistics)
    are replaced. A fold saw InstanceNorms instead: the verdicts are added and counted as BNs before.
    """
    if not sites:
        return report
    names = {s.bn for s in sites}
    order = {name or "<root>": i for i, (name, _) in enumerate(original.named_modules())}
    verdicts = sorted(
        [v for v in report.verdicts if v.bn not in names] + list(sites),
        key=lambda v: order.get(v.bn, len(order)),
    )
    extra = 0 if dry_run else len(sites)
    return replace(
        report,
        verdicts=verdicts,
        bn_before=report.bn_before + extra,
        notes=(*report.notes, NOTE.format(n=len(sites))),
    )

"""Kernel math of branch merging (structural re-parameterisation), shared by the ONNX and fx backends.

Every function works on float64 NumPy arrays in the merged conv's layout ``[C_out, C_in/g, *K]`` and
raises :class:`MergeRefusal` (with a :class:`~bnfold.records.MergeReason`) where a branch cannot be
expressed exactly as a kernel of the merged conv. Pads are ONNX-style: begins of every axis, then ends.
Nothing here imports torch or onnx.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from bnfold.records import BranchVerdict, Merge, MergeReason

__all__ = [
    "F64",
    "MergeRef",
    "MergeRefusal",
    "MergeBranch",
    "SumBranch",
    "ConvRead",
    "blocker_refusal",
    "pick_reference",
    "pick_input",
    "check_conv",
    "sum_kernels",
    "identity_kernel",
    "pool_kernel",
    "refuse_open",
    "refuse_odd",
    "absorb_constants",
    "merge_record",
    "placement",
    "embed",
    "diagonal",
    "identity_checks",
    "compose_pointwise",
    "scale_branch",
    "same_dilation",
]

F64 = npt.NDArray[np.float64]


class MergeRefusal(Exception):
    """A branch cannot be merged: ``reason`` and a one-line ``detail``."""

    def __init__(self, reason: MergeReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def blocker_refusal(ops: str, nonlinear: bool, x: str) -> MergeRefusal:
    """The refusal of a branch that holds ``ops`` (named for the user) between ``x`` and the sum."""
    if nonlinear:
        return MergeRefusal(MergeReason.NONLINEAR, f"{ops} inside the branch: it is not linear in '{x}'")
    return MergeRefusal(MergeReason.UNSUPPORTED, f"{ops} inside the branch: not a form bnfold merges")


@dataclass(slots=True)
class MergeRef:
    """The merged conv's geometry (from the reference conv)."""

    node: Any
    kernel: tuple[int, ...]
    strides: list[int]
    dilations: list[int]
    pads: list[int]  # begins then ends, as ONNX
    group: int
    c_out: int
    c_in_g: int
    dtype: Any

    @property
    def rank(self) -> int:
        return len(self.kernel)


@dataclass(slots=True)
class ConvRead:
    """A conv branch as read by a backend: float64 weight ``[C_out, C_in/g, *K]`` and bias, the weight's
    dtype (the backend's own dtype object) and the geometry (pads ONNX-style)."""

    w: F64
    bias: F64 | None
    dtype: Any
    strides: list[int]
    dilations: list[int]
    pads: list[int]
    group: int


class MergeBranch(Protocol):
    """What the shared steps read and write of a backend's branch."""

    label: str
    kind: str  # conv | seq | identity | bn | avgpool | other
    reason: MergeReason | None
    detail: str


class SumBranch(MergeBranch, Protocol):
    """A branch that is a leaf of a sum chain: the leaf's sign and the chain's scales over it."""

    sign: int
    chain_muls: tuple[Any, ...]


B = TypeVar("B", bound=MergeBranch)
S = TypeVar("S", bound=SumBranch)
X = TypeVar("X", bound=Hashable)
L = TypeVar("L")
C = TypeVar("C", bound=tuple[int, tuple[Any, ...]])


def pick_input(
    leaves: Sequence[L],
    coefs: Sequence[C],
    per_leaf: Sequence[Sequence[tuple[X, S]]],
    is_conv: Callable[[S], bool],
) -> tuple[X, list[S], list[tuple[L, C]]] | None:
    """The shared input ``x`` read by the most leaves (at least two, one through a conv): the branch of each
    leaf that reaches it (a linear reading first), given the leaf's coefficient ``(sign, chain scales)``,
    and the other leaves with theirs.

    ``per_leaf[i]``: the readings of leaf ``i`` as ``(input, branch)``; ``is_conv``: the branch is a conv."""
    score: dict[X, int] = {}
    convs: dict[X, int] = {}
    for interp in per_leaf:
        seen: set[X] = set()
        for x, b in interp:
            if x in seen:
                continue
            seen.add(x)
            score[x] = score.get(x, 0) + 1
            if is_conv(b):
                convs[x] = convs.get(x, 0) + 1
    best = [x for x in score if score[x] >= 2 and convs.get(x, 0) >= 1]
    if not best:
        return None
    x = max(best, key=lambda k: (score[k], convs.get(k, 0)))
    branches: list[S] = []
    rest: list[tuple[L, C]] = []
    for leaf, coef, interp in zip(leaves, coefs, per_leaf):
        cand = [b for xx, b in interp if xx == x]
        if not cand:
            rest.append((leaf, coef))
            continue
        good = [b for b in cand if b.kind != "other"]
        branch = (good or cand)[0]
        branch.sign, branch.chain_muls = coef
        branches.append(branch)
    return x, branches, rest


def pick_reference(candidates: Iterable[B], read: Callable[[B], tuple[Any, ConvRead]]) -> MergeRef | None:
    """The merged conv's geometry: the candidate conv with the largest kernel (first on ties).

    ``read`` gives a candidate's reference node and its conv, or raises MergeRefusal (recorded on the
    branch, which drops out)."""
    ref: MergeRef | None = None
    best = -1
    for b in candidates:
        try:
            node, cr = read(b)
        except MergeRefusal as e:
            b.reason, b.detail = e.reason, e.detail
            continue
        w = cr.w
        vol = int(np.prod(w.shape[2:]))
        if vol > best:
            best = vol
            ref = MergeRef(
                node,
                tuple(int(k) for k in w.shape[2:]),
                cr.strides,
                cr.dilations,
                cr.pads,
                cr.group,
                int(w.shape[0]),
                int(w.shape[1]),
                cr.dtype,
            )
    return ref


def check_conv(
    ref: MergeRef, cr: ConvRead, what: str, *, any_one_tap_dilation: bool = True
) -> tuple[int, ...]:
    """The offsets of a conv branch ``cr`` inside the merged conv, or MergeRefusal why it does not fit
    (dtype, rank, stride, dilation, groups, placement). ``any_one_tap_dilation``: dilations compare as
    :func:`same_dilation` (else they must be equal)."""
    w = cr.w
    if cr.dtype != ref.dtype:
        raise MergeRefusal(
            MergeReason.UNSUPPORTED, f"{what}: weight dtype {cr.dtype}, the merged conv {ref.dtype}"
        )
    if w.ndim - 2 != ref.rank:
        raise MergeRefusal(
            MergeReason.KERNEL, f"{what}: {w.ndim - 2} spatial axes, the merged conv {ref.rank}"
        )
    if cr.strides != ref.strides:
        raise MergeRefusal(MergeReason.STRIDE, f"{what}: stride {cr.strides} differs from {ref.strides}")
    k = tuple(int(kk) for kk in w.shape[2:])
    dil_ok = same_dilation(ref, k, cr.dilations) if any_one_tap_dilation else cr.dilations == ref.dilations
    if not dil_ok:
        raise MergeRefusal(
            MergeReason.DILATION, f"{what}: dilation {cr.dilations} differs from {ref.dilations}"
        )
    if cr.group != ref.group or w.shape[0] != ref.c_out or w.shape[1] != ref.c_in_g:
        raise MergeRefusal(
            MergeReason.GROUPS,
            f"{what}: groups {cr.group}, weight {list(w.shape[:2])} differ "
            f"from groups {ref.group}, weight {[ref.c_out, ref.c_in_g]}",
        )
    return placement(ref, k, cr.pads, what)


def sum_kernels(
    ref: MergeRef, branches: Iterable[B], kernel: Callable[[B], tuple[F64, F64]]
) -> tuple[F64, F64]:
    """The float64 sum of the kernels and biases of the branches not refused; a branch whose ``kernel``
    raises MergeRefusal records why and drops out."""
    w_sum = np.zeros((ref.c_out, ref.c_in_g, *ref.kernel), dtype=np.float64)
    b_sum = np.zeros(ref.c_out, dtype=np.float64)
    for b in branches:
        if b.reason is not None:
            continue
        try:
            w64, b64 = kernel(b)
        except MergeRefusal as e:
            b.reason, b.detail = e.reason, e.detail
            continue
        w_sum += w64
        b_sum += b64
    return w_sum, b_sum


def absorb_constants(
    b_sum: F64,
    leaves: Iterable[tuple[L, int, Sequence[Any]]],
    constant: Callable[[L, Sequence[Any]], F64 | None],
) -> tuple[F64, list[L], list[L]]:
    """The leaves of a sum that are not merged branches: ``(leaf, sign, chain scales)``. A constant one
    (``constant`` gives its per-channel vector, chain scales applied; None or MergeRefusal where it has
    none) joins the bias ``b_sum`` (in order); the others are kept, and those also subtracted or scaled
    are odd (one conv plus an add cannot replace them).

    Returns:
        ``(b_sum, kept, odd)``.
    """
    kept: list[L] = []
    odd: list[L] = []
    for leaf, sign, factors in leaves:
        try:
            vec = constant(leaf, factors)
        except MergeRefusal:
            vec = None
        if vec is not None:
            b_sum = b_sum + sign * vec
            continue
        if sign < 0 or factors:
            odd.append(leaf)
        kept.append(leaf)
    return b_sum, kept, odd


def refuse_open(branches: Iterable[MergeBranch], reason: MergeReason, detail: str) -> None:
    """Refuse every branch not refused yet, with ``reason`` and ``detail``."""
    for b in branches:
        if b.reason is None:
            b.reason, b.detail = reason, detail


def refuse_odd(
    branches: Iterable[MergeBranch], odd: Sequence[str], x: str, ops: str = "conv plus an add"
) -> None:
    """Refuse every open branch of a sum that also subtracts or scales ``odd`` (leaves that are not branches
    of ``x``, as shown): one conv plus an add (``ops``, in the backend's words) cannot replace it."""
    refuse_open(
        branches,
        MergeReason.UNSUPPORTED,
        f"the sum also subtracts or scales {', '.join(odd)}, which is not a branch of '{x}': one {ops} cannot "
        "replace it",
    )


def _n_convs(b: MergeBranch) -> int:
    return {"conv": 1, "seq": 2}.get(b.kind, 0)


def merge_record(sum_label: str, x: str, target: str, branches: Iterable[MergeBranch]) -> Merge:
    """The record of a sum: merged into ``target`` (the branches not refused), or refused where ``target``
    is "" (a branch without a reason of its own had no partner)."""
    verdicts = []
    branches = list(branches)
    for b in branches:
        reason, detail = b.reason, b.detail
        if not target and reason is None:
            reason, detail = MergeReason.NO_PARTNER, "no other branch of the sum can be merged with it"
        verdicts.append(BranchVerdict(b.label, b.kind, bool(target) and b.reason is None, reason, detail))
    before = sum(_n_convs(b) for b in branches)
    after = before if not target else 1 + sum(_n_convs(b) for b in branches if b.reason is not None)
    return Merge(sum_label, x, target, bool(target), tuple(verdicts), before, after)


def placement(ref: MergeRef, k: tuple[int, ...], pads: list[int], what: str) -> tuple[int, ...]:
    """Offsets of a kernel ``k`` with ``pads`` inside the reference kernel, or MergeRefusal why it has none.

    Per axis, with ``d`` the dilation: the small kernel's tap ``j`` reads the pixel of the large one's tap
    ``j + c`` when ``P_begin - p_begin = d * c``; the output sizes agree for every input size when also
    ``P_end - p_end = d * (K - k - c)``. A centred odd kernel has ``c = (K - k) / 2``.
    """
    r = ref.rank
    if len(k) != r or len(pads) != 2 * r:
        raise MergeRefusal(MergeReason.KERNEL, f"{what} has {len(k)} spatial axes, the merged conv {r}")
    offs = []
    for a in range(r):
        d = ref.dilations[a]
        if k[a] > ref.kernel[a]:
            raise MergeRefusal(
                MergeReason.KERNEL, f"{what}: kernel {list(k)} is larger than {list(ref.kernel)} on axis {a}"
            )
        db, de = ref.pads[a] - pads[a], ref.pads[a + r] - pads[a + r]
        if db % d or de % d:
            raise MergeRefusal(
                MergeReason.KERNEL,
                f"{what}: kernel {list(k)} with pads {pads} does not fall on the taps of kernel {list(ref.kernel)} "
                f"with pads {ref.pads} and dilation {d} (axis {a}): it cannot be centred",
            )
        c = db // d
        if c < 0 or c + k[a] > ref.kernel[a]:
            raise MergeRefusal(
                MergeReason.KERNEL,
                f"{what}: kernel {list(k)} with pads {pads} reads outside kernel {list(ref.kernel)} with pads "
                f"{ref.pads} (axis {a}): it cannot be centred",
            )
        if de // d != ref.kernel[a] - k[a] - c:
            raise MergeRefusal(
                MergeReason.PADDING,
                f"{what}: pads {pads} with kernel {list(k)} give another output size than pads {ref.pads} with "
                f"kernel {list(ref.kernel)} (axis {a})",
            )
        offs.append(c)
    return tuple(offs)


def same_dilation(ref: MergeRef, k: tuple[int, ...], dilations: list[int]) -> bool:
    """A kernel ``k`` with ``dilations`` reads like the merged conv's dilation: equal on every axis where the
    kernel has more than one tap (a one-tap axis reads one pixel whatever its dilation, e.g. timm's 1x1
    branch of a dilated RepVGG block)."""
    return len(dilations) == ref.rank and all(
        d == rd or kk == 1 for d, rd, kk in zip(dilations, ref.dilations, k)
    )


def embed(ref: MergeRef, w: F64, offs: tuple[int, ...]) -> F64:
    """``w`` zero-padded to the reference kernel, placed at ``offs``."""
    out = np.zeros((ref.c_out, ref.c_in_g, *ref.kernel), dtype=np.float64)
    idx = (slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offs, w.shape[2:])))
    out[idx] = w
    return out


def diagonal(ref: MergeRef, k: tuple[int, ...], offs: tuple[int, ...], value: float) -> F64:
    """``value`` on a ``k`` window of input channel ``o mod (C_in/g)`` for each output channel ``o``."""
    out = np.zeros((ref.c_out, ref.c_in_g, *ref.kernel), dtype=np.float64)
    o = np.arange(ref.c_out)
    win = tuple(slice(c, c + kk) for c, kk in zip(offs, k))
    for ch in range(ref.c_out):  # small: one window per channel
        out[(o[ch], o[ch] % ref.c_in_g, *win)] = value
    return out


def identity_checks(ref: MergeRef, what: str) -> None:
    """MergeRefusal unless an identity (stride 1, as many channels in as out) fits the merged conv."""
    if any(s != 1 for s in ref.strides):
        raise MergeRefusal(
            MergeReason.STRIDE, f"{what} on a sum with stride {ref.strides}: an identity has stride 1"
        )
    if ref.c_in_g * ref.group != ref.c_out:
        raise MergeRefusal(
            MergeReason.GROUPS,
            f"{what}: the merged conv maps {ref.c_in_g * ref.group} channels to {ref.c_out} (an identity needs equal)",
        )


def identity_kernel(ref: MergeRef, what: str, scale: F64 | None = None) -> F64:
    """The kernel of an identity branch (times a per-channel ``scale``: a BN on ``x``), or MergeRefusal
    where an identity does not fit the merged conv."""
    identity_checks(ref, what)
    one = (1,) * ref.rank
    w = diagonal(ref, one, placement(ref, one, [0] * (2 * ref.rank), what), 1.0)
    return w if scale is None else w * scale.reshape((-1,) + (1,) * (ref.rank + 1))


def pool_kernel(
    ref: MergeRef, k: tuple[int, ...], strides: list[int], pads: list[int], dilated: bool, what: str
) -> F64:
    """The kernel of an average pool (window ``k``, pads ONNX-style, counting padded zeros) on ``x``, or
    MergeRefusal where it does not fit the merged conv (``dilated``: the pool reads with another dilation)."""
    if strides != ref.strides:
        raise MergeRefusal(MergeReason.STRIDE, f"{what}: stride {strides} differs from {ref.strides}")
    if dilated:
        raise MergeRefusal(MergeReason.DILATION, f"{what}: dilation differs from {ref.dilations}")
    if ref.c_in_g * ref.group != ref.c_out:
        raise MergeRefusal(MergeReason.GROUPS, f"{what}: a pool keeps channels; the merged conv changes them")
    offs = placement(ref, k, pads, what)
    return diagonal(ref, k, offs, 1.0 / float(np.prod(k)))


def scale_branch(ref: MergeRef, w: F64, b: F64, factors: Iterable[F64], sign: int) -> tuple[F64, F64]:
    """A branch's kernel and bias times its constant scales (``factors``, per output channel of the merged
    conv or per tensor; taken in order, so the first that raises MergeRefusal refuses) and its sign in the sum."""
    for f in factors:
        w = w * f.reshape((-1,) + (1,) * (ref.rank + 1))
        b = b * f
    return (-w, -b) if sign < 0 else (w, b)


def compose_pointwise(
    w2: F64, b2: F64 | None, w1: F64, b1: F64 | None, pads: list[int], what: str
) -> tuple[F64, F64 | None]:
    """``Conv kxk (w2, b2)`` with ``pads`` after an ungrouped ``Conv 1x1 (w1, b1)`` as one conv:
    ``W[o, i] = sum_m W2[o, m] W1[m, i]``, ``b = b2 + sum_{m, taps} W2[o, m] b1[m]``; or MergeRefusal
    (PADDING) where the kxk pads and ``b1`` is not zero (at a padded border ``b1`` would be missing)."""
    if any(pads) and b1 is not None and np.any(b1 != 0):
        raise MergeRefusal(
            MergeReason.PADDING,
            f"{what}: the kxk conv pads {pads} with zeros, where the 1x1 conv's bias would not be added: "
            "one conv cannot compute it",
        )
    m1 = w1.reshape(w1.shape[0], w1.shape[1])
    comp = np.moveaxis(np.tensordot(w2, m1, axes=([1], [0])), -1, 1)
    b = b2
    if b1 is not None:
        extra = w2.sum(axis=tuple(range(2, w2.ndim))) @ b1
        b = extra if b is None else b + extra
    return comp, b

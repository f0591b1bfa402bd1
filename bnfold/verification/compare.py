"""Compare one output of a reference run with the same output of a candidate run.

Per output and sample, in float64 (``r`` reference, ``c`` candidate, ``d = |c - r|`` elementwise)::

    scale       = max |r| over finite elements        (1 when the reference is all zero)
    tol         = atol + rtol * scale                 (atol/rtol: per output, else per dtype)
    mismatches  = #{ d > tol }
    statistic   = max(d) | mean(d) | median(d) | quantile(d, q)     (``error_stat``, default max)
    cosine      = <r, c> / (|r| |c|)                  (1 when both are all zero)
    snr_db      = 10 log10( sum r^2 / sum d^2 )       (None: no error at all, an infinite SNR)

An output passes when none of these fails, checked in this order (``OutputCheck.failure`` names the
first that does):

1. ``"nan"`` / ``"inf"``: the candidate is NaN / infinite where the reference is finite;
2. ``"tolerance"``: with ``error_stat="max"`` (the default) any element outside ``tol``; with another
   statistic, ``statistic(d) > tol`` (a few outliers may pass, as in Polygraphy's ``--check-error-stat``);
3. ``"cosine"``: ``cosine < min_cosine`` (only when a threshold is given);
4. ``"snr"``: ``snr_db < min_snr_db`` (only when a threshold is given).

NaN on both sides at the same place, and equal infinities, count as equal; NaN on one side only counts
as an infinite error. Integer and boolean outputs compare exactly (atol = rtol = 0, statistic max), so a
changed class index is never averaged away.

Heat summary (where the errors are): the index of the largest error, and for outputs of rank >= 2 the
channels (axis 1) with the largest errors, at most :data:`TOP_CHANNELS` of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.errors import NotComparableError, OptionError
from bnfold.fold_math.cast import is_floating
from bnfold.records import OutputCheck

__all__ = [
    "Tolerance",
    "Comparator",
    "DEFAULT_TOLERANCES",
    "EXACT",
    "ERROR_STATS",
    "TOP_CHANNELS",
    "default_tolerance",
    "parse_tolerances",
    "compare_output",
]

TOP_CHANNELS = 3
"""How many channels the heat summary names per output."""

ERROR_STATS = ("max", "mean", "median")
"""Named error statistics; a quantile is written ``q0.99`` (or ``p99``)."""


@dataclass(frozen=True, slots=True)
class Tolerance:
    """``|c - r| <= atol + rtol * scale``, scale = max |reference| of the output."""

    atol: float
    rtol: float


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # atol is the dtype's smallest normal number: only denormal noise passes on its own; every real
    # error is judged relative to the output's scale (rtol).
    # float64: eps 2.2e-16; 1e-9 leaves ~4e6 roundings of room yet catches any real difference.
    "float64": Tolerance(atol=2.2e-308, rtol=1e-9),
    # float32: eps 1.19e-7; an exact fold moves outputs by 2-7e-7 of their scale, 1e-5 is ~20-50x that.
    "float32": Tolerance(atol=1.2e-38, rtol=1e-5),
    # float16: eps 9.8e-4; folded weights are rounded once more to fp16 and the output a few times.
    "float16": Tolerance(atol=6.1e-5, rtol=2e-3),
    # bfloat16: eps 7.8e-3 (8 mantissa bits); same few roundings as float16.
    "bfloat16": Tolerance(atol=1.2e-38, rtol=2e-2),
}
"""Default tolerance per floating dtype; integer and boolean outputs compare exactly."""

EXACT = Tolerance(atol=0.0, rtol=0.0)

_PRECISION_ORDER = ("float64", "float32", "float16", "bfloat16")


def default_tolerance(*dtypes: np.dtype[Any]) -> Tolerance:
    """The default tolerance for outputs of these dtypes: the least precise one decides."""
    names = [d.name for d in dtypes]
    if any(n not in DEFAULT_TOLERANCES for n in names):
        return EXACT
    return DEFAULT_TOLERANCES[max(names, key=_PRECISION_ORDER.index)]


ToleranceArg = float | Mapping[str, float] | None
"""A tolerance option: one value for every output, or ``{output: value}`` (key ``"*"``: the others)."""


def _check_value(label: str, v: float) -> float:
    if not (v >= 0 and math.isfinite(v)):
        raise OptionError(f"{label} must be a finite number >= 0, got {v}")
    return float(v)


def parse_tolerances(label: str, values: Iterable[str] | float | None) -> ToleranceArg:
    """``["1e-4", "logits=1e-3"]`` -> ``{"*": 1e-4, "logits": 1e-3}`` (a lone number stays a float).

    Raises:
        OptionError: a value that is not a number >= 0, or an output named twice.
    """
    if values is None or isinstance(values, (int, float)):
        return None if values is None else _check_value(label, float(values))
    out: dict[str, float] = {}
    for item in values:
        name, sep, num = str(item).rpartition("=")
        key = name.strip() if sep else "*"
        if sep and not key:
            raise OptionError(f"{label} {item!r}: expected VALUE or OUTPUT=VALUE")
        try:
            v = float(num)
        except ValueError:
            raise OptionError(
                f"{label} {item!r}: {num!r} is not a number (expected VALUE or OUTPUT=VALUE)"
            ) from None
        if key in out:
            raise OptionError(f"{label}: {key if key != '*' else 'the default'} given twice")
        out[key] = _check_value(f"{label} {item!r}", v)
    if not out:
        return None
    if set(out) == {"*"}:
        return out["*"]
    return out


def _for_output(arg: ToleranceArg, name: str) -> float | None:
    if arg is None or isinstance(arg, (int, float)):
        return arg
    return arg.get(name, arg.get("*"))


def _parse_stat(stat: str) -> float | None:
    """The quantile of an error statistic (1.0 for max, None for mean); raises OptionError."""
    s = stat.strip().lower()
    if s == "max":
        return 1.0
    if s == "median":
        return 0.5
    if s == "mean":
        return None
    try:
        q = float(s[1:]) / (100.0 if s.startswith("p") else 1.0) if s[:1] in ("q", "p") else float("nan")
    except ValueError:
        q = float("nan")
    if not (0.0 <= q <= 1.0):
        raise OptionError(
            f"error statistic {stat!r}: use max, mean, median or a quantile such as q0.99 / p99"
        )
    return q


@dataclass(frozen=True, slots=True)
class Comparator:
    """How outputs are compared (see the module docstring). The defaults are bnfold's own checks.

    Attributes:
        atol: absolute tolerance: one value, or ``{output: value}`` (``"*"`` for the rest); None: per dtype.
        rtol: tolerance relative to the output's scale, same forms.
        error_stat: "max" (every element), "mean", "median", or a quantile "q0.99" / "p99".
        min_cosine: fail an output whose cosine similarity with the reference is below this.
        min_snr_db: fail an output whose signal-to-noise ratio (dB) is below this.
    """

    atol: ToleranceArg = None
    rtol: ToleranceArg = None
    error_stat: str = "max"
    min_cosine: float | None = None
    min_snr_db: float | None = None

    def validate(self, outputs: Iterable[str] | None = None) -> None:
        """Raise :class:`~bnfold.errors.OptionError` on a bad setting or an unknown output name."""
        _parse_stat(self.error_stat)
        for label, arg in (("atol", self.atol), ("rtol", self.rtol)):
            if isinstance(arg, Mapping):
                for k, v in arg.items():
                    _check_value(f"{label} {k}", v)
                if outputs is not None:
                    unknown = sorted(set(arg) - set(outputs) - {"*"})
                    if unknown:
                        raise OptionError(
                            f"{label}: the models have no output {unknown[0]!r} (outputs: {', '.join(outputs)})"
                        )
            elif arg is not None:
                _check_value(label, arg)
        if self.min_cosine is not None and not (-1.0 <= self.min_cosine <= 1.0):
            raise OptionError(f"min cosine similarity must be in [-1, 1], got {self.min_cosine}")
        if self.min_snr_db is not None and not math.isfinite(self.min_snr_db):
            raise OptionError(f"min SNR must be a finite number of dB, got {self.min_snr_db}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tolerance mappings as dicts)."""

        def tol(a: ToleranceArg) -> Any:
            return dict(a) if isinstance(a, Mapping) else a

        return {
            "atol": tol(self.atol),
            "rtol": tol(self.rtol),
            "error_stat": self.error_stat,
            "min_cosine": self.min_cosine,
            "min_snr_db": self.min_snr_db,
        }


def _heat(diff: np.ndarray) -> tuple[tuple[int, ...], tuple[tuple[int, float], ...]]:
    """Index of the largest error and the channels (axis 1) with the largest errors."""
    if diff.size == 0 or not np.any(diff > 0):
        return (), ()
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    if diff.ndim < 2:
        return index, ()
    per_channel = np.moveaxis(diff, 1, 0).reshape(diff.shape[1], -1).max(axis=1)
    order = np.argsort(-per_channel, kind="stable")[:TOP_CHANNELS]
    return index, tuple((int(ch), float(per_channel[ch])) for ch in order if per_channel[ch] > 0)


def compare_output(
    name: str, sample: int, r: np.ndarray, c: np.ndarray, comparator: Comparator
) -> OutputCheck:
    """Compare one output on one sample (see the module docstring for the rules).

    Raises:
        NotComparableError: different shapes, or a floating output on one side only.
    """
    if r.shape != c.shape:
        raise NotComparableError(
            f"output {name!r} has shape {list(r.shape)} in the reference and {list(c.shape)} in the candidate"
        )
    r_float = is_floating(r.dtype)
    if r_float != is_floating(c.dtype):
        raise NotComparableError(
            f"output {name!r} is {r.dtype} in the reference and {c.dtype} in the candidate"
        )
    quantile: float | None = 1.0
    stat = "max"
    if r_float:
        tol = default_tolerance(r.dtype, c.dtype)
        atol, rtol = _for_output(comparator.atol, name), _for_output(comparator.rtol, name)
        tol = Tolerance(tol.atol if atol is None else atol, tol.rtol if rtol is None else rtol)
        quantile, stat = _parse_stat(comparator.error_stat), comparator.error_stat
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
    else:
        tol = EXACT  # integer and boolean outputs: exact, whatever the options say
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        if r.dtype.kind in "iu" and np.abs(r).max(initial=0) >= 2**53:
            r64, c64 = r.astype(np.int64).astype(object), c.astype(np.int64).astype(object)
    same = (r64 == c64) | (np.isnan(r64) & np.isnan(c64)) if r_float else (r64 == c64)
    finite = np.abs(r64[np.isfinite(r64)]) if r_float else np.abs(r64)
    scale = float(finite.max()) if finite.size else 0.0
    if scale == 0.0:
        scale = 1.0  # all-zero reference: errors are absolute
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(c64 - r64).astype(np.float64))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only, or inf - inf of opposite signs
    max_abs = float(diff.max(initial=0.0))
    bound = tol.atol + tol.rtol * scale
    mismatches = int(np.count_nonzero(diff > bound))

    nan = inf = 0
    cosine, snr = 1.0, None
    if r_float:
        ref_finite = np.isfinite(r64)
        nan = int(np.count_nonzero(np.isnan(c64) & ref_finite))
        inf = int(np.count_nonzero(np.isinf(c64) & ref_finite))
        cosine, snr = _cosine_snr(r64, c64, diff, ref_finite & np.isfinite(c64))
    if quantile is None:
        value = float(diff.mean()) if diff.size else 0.0
    elif quantile == 1.0:
        value = max_abs
    else:
        value = float(np.quantile(diff, quantile)) if diff.size else 0.0
    within = mismatches == 0 if quantile == 1.0 else value <= bound
    failure = ""
    if nan:
        failure = "nan"
    elif inf:
        failure = "inf"
    elif not within:
        failure = "tolerance"
    elif comparator.min_cosine is not None and cosine < comparator.min_cosine:
        failure = "cosine"
    elif comparator.min_snr_db is not None and snr is not None and snr < comparator.min_snr_db:
        failure = "snr"
    index, channels = _heat(diff)
    return OutputCheck(
        name=name,
        sample=sample,
        dtype=str(r.dtype),
        shape=tuple(int(d) for d in r.shape),
        max_abs_error=max_abs,
        max_rel_error=max_abs / scale,
        mismatches=mismatches,
        atol=tol.atol,
        rtol=tol.rtol,
        passed=not failure,
        error_stat=stat,
        error_value=value,
        cosine=cosine,
        snr_db=snr,
        nan=nan,
        inf=inf,
        failure=failure,
        worst_index=index,
        worst_channels=channels,
    )


def _cosine_snr(
    r64: np.ndarray, c64: np.ndarray, diff: np.ndarray, both_finite: np.ndarray
) -> tuple[float, float | None]:
    """Cosine similarity and SNR (dB) over the elements finite on both sides."""
    r, c = r64[both_finite], c64[both_finite]
    nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if nr == 0.0 and nc == 0.0:
        cosine = 1.0
    elif nr == 0.0 or nc == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.clip(np.dot(r, c) / (nr * nc), -1.0, 1.0))
    noise = float(np.sum(np.square(diff[np.isfinite(diff)]))) + (
        math.inf if not np.all(np.isfinite(diff)) else 0.0
    )
    if noise == 0.0:
        return cosine, None
    signal = float(np.sum(np.square(r)))
    if noise == math.inf or signal == 0.0:
        return cosine, -math.inf  # errors on an all-zero reference, or infinite errors: no signal left
    return cosine, 10.0 * math.log10(signal / noise)

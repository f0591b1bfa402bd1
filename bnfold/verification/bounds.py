"""Upper bounds on the numbers a command takes, so that a short command cannot ask for unbounded time or memory.

Each bound is far above real use and is checked before anything is loaded (one :class:`OptionError` line,
exit 2): ``--samples`` (each sample runs both models), ``--input-shape`` (the values drawn per input and
over all samples), and ``bnfold bench``'s ``--runs``, ``--warmup`` and ``--threads``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from bnfold.errors import OptionError

__all__ = [
    "MAX_SAMPLES",
    "MAX_INPUT_VALUES",
    "MAX_DRAWN_VALUES",
    "MAX_RUNS",
    "MAX_WARMUP",
    "MAX_THREADS",
    "check_at_most",
    "check_shape_sizes",
]

MAX_SAMPLES = 1000
"""``--samples``: random samples compared (each runs the reference and the candidate)."""
MAX_INPUT_VALUES = 1 << 28
"""``--input-shape``: values of one input (1 GiB of float32)."""
MAX_DRAWN_VALUES = 1 << 30
"""``--input-shape`` x ``--samples``: values drawn in all, every input of every sample."""
MAX_RUNS = 10_000
"""``bnfold bench --runs``: timed runs per measurement."""
MAX_WARMUP = 10_000
"""``bnfold bench --warmup``: untimed runs before timing."""
MAX_THREADS = 1024
"""``bnfold bench --threads``: intra-op threads."""


def check_at_most(flag: str, value: int, bound: int) -> None:
    """Raise :class:`OptionError` when ``value`` is over ``bound``."""
    if value > bound:
        raise OptionError(f"{flag} {value}: must be at most {bound}")


def check_shape_sizes(specs: Sequence[str] | Mapping[str, tuple[int, ...]], samples: int = 1) -> None:
    """``--input-shape`` specs: at most :data:`MAX_INPUT_VALUES` values per input and :data:`MAX_DRAWN_VALUES`
    over all inputs and ``samples``. A spec that does not parse is left to the parser (its own error)."""
    from .inputs import parse_input_shapes

    try:
        shapes = dict(specs) if isinstance(specs, Mapping) else parse_input_shapes(specs)
    except OptionError:
        return
    total = 0
    for name, dims in shapes.items():
        n = math.prod(dims)
        if n > MAX_INPUT_VALUES:
            shown = "x".join(str(d) for d in dims)
            raise OptionError(
                f"--input-shape {name}={shown}: {n} values, at most {MAX_INPUT_VALUES} (2^28) per input"
            )
        total += n
    if total * samples > MAX_DRAWN_VALUES:
        raise OptionError(
            f"--samples {samples} of {total} input values: {total * samples} values drawn, "
            f"at most {MAX_DRAWN_VALUES} (2^30) in all"
        )

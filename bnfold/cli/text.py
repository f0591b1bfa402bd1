"""Model strings made safe to print: every control character escaped (no rich, no typer here).

Imported by every CLI module that writes a model's strings (error lines, rendering), so that a run that
prints nothing but errors (``-q``) never loads rich.
"""

from __future__ import annotations

import re

__all__ = ["clean"]

# C0 and C1 control characters, DEL, and the bidirectional overrides that reorder what a terminal shows.
# Lone surrogates U+DC80..U+DCFF are the bytes of a name that is not UTF-8 (decoded with surrogateescape
# by the ONNX backend): shown as the byte they stand for, ``\\xNN``.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\udc80-\udcff]")


def clean(value: object) -> str:
    """``value`` as a single line with every control character escaped (``ESC`` -> ``\\x1b``)."""

    def esc(m: re.Match[str]) -> str:
        c = ord(m.group())
        if 0xDC80 <= c <= 0xDCFF:
            c -= 0xDC00
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _CONTROL.sub(esc, str(value))

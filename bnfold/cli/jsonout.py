"""The ``--json`` documents (schema ``bnfold/schemas/report-v1.json``): one per command, and one for errors.

Rules: a document is built from the record a job returned, never from printed text; keys are only
added within schema 1 (a removal or rename bumps :data:`SCHEMA_VERSION`); the top-level counts of the
0.1.0 documents stay as aliases of ``summary.*``. Nothing here prints or imports rich.
"""

from __future__ import annotations

import math
from typing import Any

from bnfold.records import file_entry

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "json_document",
    "error_document",
    "finite_json",
    "NON_FINITE",
]

SCHEMA = "bnfold.report"
SCHEMA_VERSION = 1
"""Bumped on any change that removes or renames a key (new keys do not bump it)."""


NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
"""How a number JSON cannot hold is written: the strings ``"inf"``, ``"-inf"``, ``"nan"`` (schema ``real``)."""


def finite_json(value: Any) -> Any:
    """``value`` with every float that JSON cannot hold (inf, -inf, nan) replaced by its string.

    ``json.dumps`` would write the bare ``Infinity``/``NaN`` tokens, which are not JSON: a strict
    parser (``jq``, JavaScript's ``JSON.parse``) rejects the whole document. Numpy scalars become
    Python numbers; containers are copied, never changed in place.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float) or (
        hasattr(value, "dtype")
        and getattr(value, "ndim", None) == 0
        and getattr(value.dtype, "kind", "") == "f"
    ):
        f = float(value)
        if math.isfinite(f):
            return f
        return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _head(command: str, exit_code: int) -> dict[str, Any]:
    from bnfold import __version__

    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "bnfold_version": __version__,
    }


_LEGACY_COUNTS = (
    "bn_before",
    "bn_after",
    "folded",
    "nodes_before",
    "nodes_after",
    "params_before",
    "params_after",
)
"""Top-level keys of the 0.1.0 documents, kept in schema 1 as aliases of ``summary.*`` (removed in 2)."""
_LEGACY_VERIFY = ("passed", "samples", "max_abs_error", "max_rel_error", "outputs")
"""Top-level keys of 0.1.0's ``verify --json``, kept in schema 1 as aliases of ``verification.*``."""


def json_document(command: str, result: Any, *, exit_code: int = 0, **files: Any) -> dict[str, Any]:
    """The ``--json`` document of ``command`` (schema ``bnfold/schemas/report-v1.json``).

    Args:
        command: "fold", "inspect", "verify", "freeze" or "bench".
        result: the record the job returned (``FoldReport``, ``VerifyReport``, ``BenchReport``, freeze dict).
        exit_code: the exit code the command ends with (``ok`` is ``exit_code == 0``).
        files: ``verify`` only: ``reference=`` and ``candidate=`` paths.
    """
    doc = _head(command, exit_code)
    if command == "verify":
        doc.update(
            reference=file_entry(files.get("reference")),
            candidate=file_entry(files.get("candidate")),
            verification={**result.to_dict(), "inputs": None},
        )
        doc.update({k: doc["verification"][k] for k in _LEGACY_VERIFY})
        return doc
    if command not in ("fold", "inspect", "freeze", "bench", "recalibrate"):  # pragma: no cover
        raise ValueError(f"unknown command {command!r}")
    doc.update(result.to_dict())
    if command in ("fold", "inspect"):
        doc.update({k: doc["summary"][k] for k in _LEGACY_COUNTS})
    elif command == "bench":
        doc.update({k: doc["summary"][k] for k in ("bn_before", "bn_after", "folded")})
    return doc


def error_document(command: str, error_type: str, message: str, exit_code: int) -> dict[str, Any]:
    """The ``--json`` document of a command that failed: the common head and an ``error`` object."""
    doc = _head(command, exit_code)
    doc["error"] = {"type": error_type, "message": message, "exit_code": exit_code}
    return doc

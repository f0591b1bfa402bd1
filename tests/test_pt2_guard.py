"""Tampered ``.pt2`` archives: no code from the file runs without ``--trust-pickle``.

Each test builds a real archive with ``torch.export.save``, plants a payload that writes a marker file
(and, where torch would need it, still returns a valid value, so that an unguarded load "works"), and
checks that the API and the CLI refuse it with one line naming ``--trust-pickle`` and that the marker
was never written. Where the payload can run at all, the trusted load shows that it is real.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import ModelFormatError

ROOT = Path(__file__).resolve().parents[1]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _archive(tmp_path: Path, dynamic: bool = False) -> Path:
    x = torch.randn(2, 3, 8, 8)
    shapes = ({0: torch.export.Dim("batch", max=64)},) if dynamic else None
    ep = torch.export.export(_Net().eval(), (x,), dynamic_shapes=shapes)
    path = tmp_path / "clean.pt2"
    torch.export.save(ep, path)
    return path


class _Payload:
    """Unpickles to ``value`` after writing ``marker``: what an attacker's weight would do."""

    def __init__(self, marker: Path, value: str) -> None:
        self.marker, self.value = str(marker), value

    def __reduce__(self) -> tuple[Any, ...]:
        code = f"(open({self.marker!r}, 'w').write('ran'), {self.value})[1]"
        return (eval, (code,))


def _pickled(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rewrite(
    src: Path, dst: Path, change: dict[str, bytes | None], add: dict[str, bytes] | None = None
) -> Path:
    """Copy the archive, replacing (or dropping, with None) members named relative to its root folder."""
    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    root = members[0][0].split("/", 1)[0]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for name, data in members:
            rel = name.split("/", 1)[1]
            if rel in change:
                if change[rel] is None:
                    continue
                data = change[rel]  # type: ignore[assignment]
            out.writestr(name, data)
        for rel, data in (add or {}).items():
            out.writestr(f"{root}/{rel}", data)
    return dst


def _member(path: Path, rel: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/", 1)[0]
        return z.read(f"{root}/{rel}")


def _weights_payload(tmp_path: Path, marker: Path) -> Path:
    clean = _archive(tmp_path)
    cfg = json.loads(_member(clean, "data/weights/model_weights_config.json"))
    entry = cfg["config"]["conv.weight"]
    entry["use_pickle"] = True
    evil = _pickled(_Payload(marker, "torch.nn.Parameter(torch.randn(4, 3, 3, 3))"))
    return _rewrite(
        clean,
        tmp_path / "evil.pt2",
        {
            "data/weights/model_weights_config.json": json.dumps(cfg).encode(),
            f"data/weights/{entry['path_name']}": evil,
        },
    )


def _constants_payload(tmp_path: Path, marker: Path) -> Path:
    clean = _archive(tmp_path)
    cfg = {
        "config": {
            "evil": {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        }
    }
    return _rewrite(
        clean,
        tmp_path / "evil.pt2",
        {
            "data/constants/model_constants_config.json": json.dumps(cfg).encode(),
        },
        add={"data/constants/tensor_0": _pickled(_Payload(marker, "torch.zeros(1)"))},
    )


def _sample_inputs_payload(tmp_path: Path, marker: Path) -> Path:
    clean = _archive(tmp_path)
    evil = _pickled(_Payload(marker, "((torch.randn(2, 3, 8, 8),), {})"))
    return _rewrite(clean, tmp_path / "evil.pt2", {"data/sample_inputs/model.pt": evil})


RUNNABLE = {
    "weights": _weights_payload,
    "constants": _constants_payload,
    "sample_inputs": _sample_inputs_payload,
}


@pytest.mark.parametrize("where", sorted(RUNNABLE))
def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    evil = RUNNABLE[where](tmp_path, marker)
    with pytest.raises(ModelFormatError, match="trust_pickle=True") as e:
        bnfold.load(evil)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    with pytest.raises(ModelFormatError, match="trust_pickle=True"):
        bnfold.verify(evil, evil)
    assert not marker.exists()
    # The payload is real: trusting the file runs it, and torch then loads a working program.
    program = bnfold.load(evil, trust_pickle=True)
    assert marker.exists()
    assert isinstance(program, torch.export.ExportedProgram)


@pytest.mark.parametrize("command", ["inspect", "fold", "verify", "bench"])
def test_cli_refuses_payload_in_one_line(tmp_path: Path, command: str) -> None:
    marker = tmp_path / "pwned"
    evil = _weights_payload(tmp_path, marker)
    before = evil.read_bytes()
    args = {
        "inspect": ["inspect", str(evil)],
        "fold": ["fold", str(evil), "-o", str(tmp_path / "out.pt2")],
        "verify": ["verify", str(evil), str(evil)],
        "bench": ["bench", str(evil)],
    }[command]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "bnfold", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
    )
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--trust-pickle" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not marker.exists()
    assert evil.read_bytes() == before
    assert not (tmp_path / "out.pt2").exists()


def _program_json(path: Path) -> dict[str, Any]:
    return json.loads(_member(path, "models/model.json"))  # type: ignore[no-any-return]


def _with_program(tmp_path: Path, clean: Path, program: dict[str, Any]) -> Path:
    return _rewrite(clean, tmp_path / "evil.pt2", {"models/model.json": json.dumps(program).encode()})


def _exprs(obj: Any) -> list[dict[str, Any]]:
    found = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if isinstance(o.get("expr_str"), str):
                found.append(o)
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return found


def test_shape_expression_payload_is_refused(tmp_path: Path) -> None:
    # torch hands every expr_str to sympy.sympify, which evals it.
    marker = tmp_path / "pwned"
    clean = _archive(tmp_path, dynamic=True)
    program = _program_json(clean)
    exprs = _exprs(program)
    assert exprs, "a dynamic-batch program has symbolic shapes"
    sym = exprs[0]["expr_str"]
    exprs[0]["expr_str"] = f"(open({str(marker)!r}, 'w').write('ran'), {sym})[1]"
    evil = _with_program(tmp_path, clean, program)
    with pytest.raises(ModelFormatError, match="shape expression.*trust_pickle=True"):
        bnfold.load(evil)
    assert not marker.exists()
    # The same clean program still loads: the check accepts what torch writes.
    assert isinstance(bnfold.load(clean), torch.export.ExportedProgram)


def test_builtin_names_in_shape_expressions_are_refused(tmp_path: Path) -> None:
    # No quotes, dots or dunders: sympy still puts builtins like exec and chr in reach.
    clean = _archive(tmp_path, dynamic=True)
    program = _program_json(clean)
    _exprs(program)[0]["expr_str"] = "exec(chr(49))"
    with pytest.raises(ModelFormatError, match="shape expression"):
        bnfold.load(_with_program(tmp_path, clean, program))


def test_node_target_outside_operators_is_refused(tmp_path: Path) -> None:
    # torch resolves "torch.<a>.<b>" by getattr: this would become a graph node calling os.system.
    clean = _archive(tmp_path)
    program = _program_json(clean)
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.system"
    with pytest.raises(ModelFormatError, match="not an operator.*trust_pickle=True"):
        bnfold.load(_with_program(tmp_path, clean, program))


def test_guard_code_payload_is_refused(tmp_path: Path) -> None:
    # ExportedProgram.module() turns guards into Python source and executes it.
    clean = _archive(tmp_path)
    program = _program_json(clean)
    program["guards_code"] = ["__import__('os').system('true') == 0"]
    with pytest.raises(ModelFormatError, match="guard"):
        bnfold.load(_with_program(tmp_path, clean, program))


def test_custom_object_constant_is_refused(tmp_path: Path) -> None:
    clean = _archive(tmp_path)
    cfg = {
        "config": {
            "obj": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        }
    }
    evil = _rewrite(
        clean,
        tmp_path / "evil.pt2",
        {
            "data/constants/model_constants_config.json": json.dumps(cfg).encode(),
        },
        add={"data/constants/opaque_obj_0": b"\x80\x04N."},
    )
    with pytest.raises(ModelFormatError, match="custom object.*trust_pickle=True"):
        bnfold.load(evil)


def test_aotinductor_member_is_refused(tmp_path: Path) -> None:
    clean = _archive(tmp_path)
    evil = _rewrite(clean, tmp_path / "evil.pt2", {}, add={"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(ModelFormatError, match="AOTInductor"):
        bnfold.load(evil)


def test_archive_without_version_is_refused_in_one_line(tmp_path: Path) -> None:
    clean = _archive(tmp_path)
    evil = _rewrite(clean, tmp_path / "evil.pt2", {"archive_version": None})
    with pytest.raises(ModelFormatError, match="archive_version") as e:
        bnfold.load(evil)
    assert "\n" not in str(e.value)


def test_clean_archive_folds_without_trust(tmp_path: Path) -> None:
    clean = _archive(tmp_path, dynamic=True)
    program = bnfold.load(clean)
    folded, report = bnfold.fold_with_report(program)
    assert report.folded == 1
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(folded.module()(x), program.module()(x), rtol=1e-5, atol=1e-5)

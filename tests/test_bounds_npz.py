"""Small files never cost gigabytes: ``.npz`` inputs and golden files are checked before decompressing.

Every hostile file is built here: a deflated entry of zeros (a compression bomb), a header that
declares a larger array than its entry holds, a malformed golden file. The CLI refuses each with exit
2 and one line on stderr; the refusal happens before the data are allocated (measured with tracemalloc,
which sees NumPy's allocations).
"""

from __future__ import annotations

import hashlib
import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.errors import OptionError
from bnfold.verification.golden import Recording, load_outputs, save_outputs
from bnfold.verification.inputs import NPZ_FREE_BYTES, load_inputs, onnx_input_specs, user_inputs

runner = CliRunner()

BOMB_BYTES = 3 * NPZ_FREE_BYTES  # 192 MiB of zeros: deflates to ~190 KB


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _bomb(
    path: Path, name: str = "x", nbytes: int = BOMB_BYTES, extra: dict[str, np.ndarray] | None = None
) -> Path:
    """An .npz whose entry ``name`` is ``nbytes`` of float32 zeros, deflated (written in 8 MiB chunks)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((nbytes // 4,)))
            chunk = bytes(8 << 20)
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
        for k, v in (extra or {}).items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, v)
            zf.writestr(f"{k}.npy", buf.getvalue())
    return path


def _lying_header(path: Path, shape: tuple[int, ...]) -> Path:
    """A stored (uncompressed) entry whose header declares ``shape`` but that holds 16 bytes."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", _npy_header(shape) + bytes(16))
    return path


def _model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
        nh.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
        nh.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), "b"),
        nh.from_array(rng.uniform(-0.8, 0.8, 4).astype(np.float32), "m"),
        nh.from_array(rng.uniform(0.3, 2.5, 4).astype(np.float32), "v"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    g = h.make_graph(
        nodes,
        "m",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, "H", "W"])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.save(m, str(path))
    return path


def _peak_of(fn: object) -> int:
    tracemalloc.start()
    try:
        fn()  # type: ignore[operator]
    except OptionError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def _one_line_exit_2(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.output
    return lines[0]


# ---------------------------------------------------------------------------------------- --inputs
def test_inputs_compression_bomb_is_refused_before_decompressing(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 2 << 20  # a small file...
    with pytest.raises(OptionError, match="compression bomb"):
        load_inputs(bomb)
    assert _peak_of(lambda: load_inputs(bomb)) < 8 << 20  # ... that never costs its 192 MiB


def test_cli_refuses_the_inputs_bomb_in_one_line(tmp_path: Path) -> None:
    src, out = _model(tmp_path / "m.onnx"), tmp_path / "out.onnx"
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    bomb = _bomb(tmp_path / "bomb.npz")
    line = _one_line_exit_2(["fold", str(src), "-o", str(out), "--inputs", str(bomb)])
    assert "bomb.npz" in line and "compression bomb" in line
    assert not out.exists() and hashlib.sha256(src.read_bytes()).hexdigest() == before
    line = _one_line_exit_2(["verify", str(src), str(src), "--inputs", str(bomb)])
    assert "compression bomb" in line


def test_a_header_larger_than_its_entry_is_refused(tmp_path: Path) -> None:
    lying = _lying_header(tmp_path / "lie.npz", (1 << 40,))  # 4 TiB declared, 16 bytes present
    with pytest.raises(OptionError, match=r"declares shape \[1099511627776\].*holds 16 bytes"):
        load_inputs(lying)
    assert _peak_of(lambda: load_inputs(lying)) < 1 << 20


def test_api_inputs_checked_against_the_model_before_reading(tmp_path: Path) -> None:
    """A path given to the API: each array's declared rank/fixed dims is checked before it is read."""
    m = onnx.load(str(_model(tmp_path / "m.onnx")))
    specs = onnx_input_specs(m)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 3, 8), np.float32))
    with pytest.raises(OptionError, match="rank 3, the model expects rank 4"):
        user_inputs(specs, bad)
    good = tmp_path / "good.npz"
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.savez_compressed(good, x=x)
    (got,) = user_inputs(specs, good)
    np.testing.assert_array_equal(got["x"], x)


def test_real_inputs_still_load(tmp_path: Path) -> None:
    """Ordinary data, compressed or not, up to the free bound and past it uncompressed, load unchanged."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    mask = np.ones((2, 4096), np.int64)  # compresses ~1000x but is small: allowed
    p = tmp_path / "c.npz"
    np.savez_compressed(p, x=x, mask=mask)
    got = load_inputs(p)
    assert got is not None
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_array_equal(got["mask"], mask)


def test_not_an_npz_is_one_typed_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(OptionError, match="not a readable NumPy .npz"):
        load_inputs(junk)
    src = _model(tmp_path / "m.onnx")
    line = _one_line_exit_2(["verify", str(src), str(src), "--inputs", str(junk)])
    assert "junk.npz" in line


# ----------------------------------------------------------------------------------- golden files
def _golden(path: Path) -> Path:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    save_outputs(path, Recording(["x"], ["y"], [{"x": x}], [{"y": y}]))
    return path


def test_golden_compression_bomb_is_refused(tmp_path: Path) -> None:
    good = _golden(tmp_path / "good.npz")
    with zipfile.ZipFile(good) as zf:
        meta = {
            n.removesuffix(".npy"): np.lib.format.read_array(io.BytesIO(zf.read(n))) for n in zf.namelist()
        }
    bomb = _bomb(
        tmp_path / "gbomb.npz", name="ref_0_0", extra={"__meta__": meta["__meta__"], "in_0_0": meta["in_0_0"]}
    )
    with pytest.raises(OptionError, match="compression bomb"):
        load_outputs(bomb)
    assert _peak_of(lambda: load_outputs(bomb)) < 8 << 20
    src = _model(tmp_path / "m.onnx")
    line = _one_line_exit_2(["verify", "--load-outputs", str(bomb), str(src)])
    assert "compression bomb" in line


@pytest.mark.parametrize(
    "meta",
    [
        "[1, 2]",  # not an object
        json.dumps(
            {
                "format": "bnfold-golden",
                "version": 1,
                "dtypes": [],
                "inputs": ["x"],
                "outputs": ["y"],
                "samples": 1,
            }
        ),  # dtypes not a mapping
        json.dumps(
            {
                "format": "bnfold-golden",
                "version": 1,
                "dtypes": {},
                "inputs": ["x"],
                "outputs": ["y"],
                "samples": 1,
                "runtimes": {"reference": ["\x1b]0;x\x07"]},
            }
        ),  # runtimes not strings
        json.dumps(
            {
                "format": "bnfold-golden",
                "version": 1,
                "dtypes": {},
                "inputs": [1],
                "outputs": [{}],
                "samples": 1,
            }
        ),  # names not strings
    ],
)
def test_malformed_golden_is_one_typed_line(tmp_path: Path, meta: str) -> None:
    p = tmp_path / "g.npz"
    np.savez(p, __meta__=np.array(meta), in_0_0=np.zeros(2, np.float32), ref_0_0=np.zeros(2, np.float32))
    with pytest.raises(OptionError):
        load_outputs(p)
    src = _model(tmp_path / "m.onnx")
    line = _one_line_exit_2(["verify", "--load-outputs", str(p), str(src)])
    assert "g.npz" in line

"""What the CLI adds to a job is small: a quiet ONNX fold loads no torch, no pydantic, no rich, and
converts its option values exactly as typer does (the same values, the same error lines).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
import typer.main
from test_cli import ROOT, count_bn, digest, tiny_onnx
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.cli.run import plain_coercion

runner = CliRunner()


def _env() -> dict[str, str]:
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    )


def test_quiet_onnx_fold_imports_no_torch_pydantic_or_rich(tmp_path: Path) -> None:
    src, out = tmp_path / "tiny.onnx", tmp_path / "out.onnx"
    onnx.save(tiny_onnx(), str(src))
    before = digest(src)
    code = (
        "import sys\n"
        "from bnfold.cli import main\n"
        f"sys.argv = ['bnfold', 'fold', '--no-verify', '-q', {str(src)!r}, {str(out)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = ('torch', 'pydantic', 'pydantic_core', 'rich')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout
    assert p.stderr == ""
    assert count_bn(out) == 1
    assert digest(src) == before


def _convert(param: Any, value: Any) -> tuple[str, Any]:
    """("ok", converted value) or ("error", typer's message) for one parameter and one value."""
    ctx = typer.main.get_command(app).make_context("bnfold", ["--help"], resilient_parsing=True)
    try:
        return "ok", param.process_value(ctx, value)
    except Exception as e:  # typer's BadParameter: its message is what the user reads
        return "error", f"{type(e).__name__}: {e}"


VALUES: tuple[Any, ...] = (
    None,
    "m.onnx",
    "",
    "3",
    "-1",
    "2.5",
    "abc",
    "1e-3",
    "basic",
    4,
    0.5,
    (),
    ("a", "b"),
    ("x=1",),
)


@pytest.mark.parametrize("command", ["fold", "inspect", "verify", "freeze", "bench", "recalibrate"])
def test_option_values_convert_as_typer_converts_them(command: str) -> None:
    """Every parameter of every command, with values of every kind: the fast conversion gives what
    typer's own gives (value and type), or the same error."""
    group = typer.main.get_command(app)
    plain = group.commands[command]
    plain_coercion(plain.params)
    own = typer.main.get_command(app).commands[command]
    assert [p.name for p in plain.params] == [p.name for p in own.params]
    checked = 0
    for fast, slow in zip(plain.params, own.params, strict=True):
        assert type(fast._runtime_param).__name__ == "_PlainParam", fast.name
        for value in VALUES:
            multi = fast.multiple or fast.nargs == -1
            if multi != isinstance(value, tuple) and value is not None:
                continue  # click hands a tuple to a repeatable option, a single value otherwise
            got, want = _convert(fast, value), _convert(slow, value)
            assert got == want, (command, fast.name, value, got, want)
            assert type(got[1]) is type(want[1]), (command, fast.name, value)
            checked += 1
    assert checked > 20


def test_paths_and_numbers_given_on_the_command_line(tmp_path: Path) -> None:
    """Values that take the fast path (MODEL, -o, repeatable strings) and values that do not (numbers,
    a choice) reach the job: the fold runs with them."""
    src, out = tmp_path / "tiny.onnx", tmp_path / "out.onnx"
    onnx.save(tiny_onnx(), str(src))
    r = runner.invoke(
        app, ["fold", str(src), "-o", str(out), "--samples", "2", "--seed", "3", "--opt-level", "basic", "-q"]
    )
    assert r.exit_code == 0, r.output
    assert count_bn(out) == 1
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--samples", "two"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "bnfold: error: Invalid value for '--samples' / '-n': expected an integer (got 'two') "
        "(see bnfold fold --help)"
    ]


def test_spilled_weights_written_inline_are_the_bytes_protobuf_would_write(tmp_path: Path) -> None:
    """The streamed writer copies a spilled (or lazily loaded) weight from its file straight into OUT:
    OUT is byte for byte what serialising the model with the weights in memory gives, doc strings and
    empty tensors included, and it loads back to the same values."""
    import numpy as np
    from onnx import helper, numpy_helper

    from bnfold.io.stream import spill_tensor, spilling, write_onnx_stream

    rng = np.random.default_rng(0)
    values = {
        "w": rng.normal(0.5, 2.0, (64, 32, 3, 3)).astype(np.float32),  # 72 KiB: stays in memory
        "big": rng.normal(-1.0, 0.3, (512, 1024)).astype(np.float32),  # 2 MiB: spilled
        "b": rng.normal(0.1, 0.2, (7,)).astype(np.float32),
    }
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [7])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [7])],
        initializer=[numpy_helper.from_array(v, k) for k, v in values.items()],
    )
    graph.initializer[1].doc_string = "a weight with a doc string"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    in_memory = tmp_path / "in_memory.onnx"
    with open(in_memory, "wb") as f:
        write_onnx_stream(model, f, None, "")
    out = tmp_path / "out.onnx"
    with spilling(tmp_path) as on:
        assert on
        for t in model.graph.initializer:
            assert spill_tensor(t, numpy_helper.to_array(t)) == (t.name == "big")
        assert model.graph.initializer[1].data_location == onnx.TensorProto.EXTERNAL
        with open(out, "wb") as f:
            write_onnx_stream(model, f, None, "")
    back = onnx.load(str(out))
    for t in back.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), values[t.name])
    assert back.graph.initializer[1].doc_string == "a weight with a doc string"
    assert out.read_bytes() == in_memory.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in_memory.onnx",
        "out.onnx",
    ]  # the spill has no name

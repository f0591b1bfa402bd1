"""CLI and report defects found by outside users (issue 22 items 7, 15, 16, 17, 19; issue 28 items 7, 11).

Each test drives the command line as a user would (CliRunner, or a real subprocess where a pipe or the
process exit matters) and checks what the user sees: exit code, the one stderr line, what is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from bnfold.cli import app
from models.stats import bn_stats

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "samples" / "lenet5.onnx"
runner = CliRunner()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "80"
    return env


def _strict_json(text: str) -> Any:
    """Parse as JSON proper: ``Infinity``/``NaN`` tokens are not JSON (jq and JSON.parse reject them)."""

    def reject(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=reject)


def _conv_bn_onnx(c: int = 4, *, seed: int = 0, conv: str = "conv", bn: str = "bn") -> onnx.ModelProto:
    """x -> Conv -> BN -> y with trained-looking BN statistics."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    gamma, beta, mean, var = (a.astype(np.float32) for a in bn_stats(c, rng))
    inits = [numpy_helper.from_array(w, "W")] + [
        numpy_helper.from_array(a, n) for a, n in zip((gamma, beta, mean, var), ("g", "b", "m", "v"))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name=conv, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name=bn, epsilon=1e-5),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------------ 22.7: a reader that stops early
@pytest.mark.parametrize("args", [["inspect", str(LENET), "-v"], ["--help"], ["inspect", "--help"]])
def test_closed_pipe_ends_quietly(args: list[str]) -> None:
    """``bnfold inspect m.onnx -v | head -1`` and ``bnfold --help | true``: no traceback, no message."""
    p = subprocess.Popen(
        [sys.executable, "-m", "bnfold", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before bnfold writes a byte
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert err == ""
    assert rc == 141  # 128 + SIGPIPE, what the shell reports for a Unix tool stopped by a closed pipe


# ---------------------------------------------------------- 22.17: --json and -q before the command
def test_json_and_quiet_before_the_command(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn_onnx(), str(src))
    r = runner.invoke(app, ["--json", "inspect", str(src)])
    assert r.exit_code == 0, r.output
    doc = _strict_json(r.stdout)
    assert doc["command"] == "inspect" and doc["summary"]["folded"] == 1
    out = tmp_path / "o.onnx"
    r = runner.invoke(app, ["-q", "fold", str(src), str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and out.exists()
    r = runner.invoke(app, ["--quiet", "inspect", str(src)])
    assert r.exit_code == 0 and r.stdout == ""
    # the same refusal as after the command
    r = runner.invoke(app, ["--json", "-q", "inspect", str(src)])
    assert r.exit_code == 2 and "choose one" in r.stderr


# ------------------------------------------------------------- 28.11: --json never emits Infinity
def _identity_and_inf(tmp_path: Path) -> tuple[Path, Path]:
    """Reference y = x; candidate y = x / 0 (inf everywhere): the errors are infinite."""

    def model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
        g = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
            inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(model([helper.make_node("Identity", ["x"], ["y"])], []), str(ref))
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "z")
    one = numpy_helper.from_array(np.ones((1,), np.float32), "o")
    onnx.save(
        model(
            [
                helper.make_node("Abs", ["x"], ["a"]),
                helper.make_node("Add", ["a", "o"], ["p"]),
                helper.make_node("Div", ["p", "z"], ["y"]),
            ],
            [zero, one],
        ),
        str(cand),
    )
    return ref, cand


def test_json_has_no_infinity_token(tmp_path: Path) -> None:
    ref, cand = _identity_and_inf(tmp_path)
    r = runner.invoke(app, ["verify", str(ref), str(cand), "--json"])
    assert r.exit_code == 1
    assert "Infinity" not in r.stdout and "NaN" not in r.stdout
    doc = _strict_json(r.stdout)
    assert doc["verification"]["max_abs_error"] == "inf"
    assert doc["passed"] is False
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(
        resources.files("bnfold").joinpath("schemas/report-v1.json").read_text(encoding="utf-8")
    )
    jsonschema.validate(doc, schema)


# ------------------------------------------------ 28.7: strings from a golden file reach the terminal escaped
def test_golden_runtimes_are_escaped(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn_onnx(), str(src))
    golden = tmp_path / "g.npz"
    r = runner.invoke(app, ["verify", str(src), str(src), "--save-outputs", str(golden)])
    assert r.exit_code == 0, r.output
    with np.load(golden, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["__meta__"]))
    meta["runtimes"] = {"reference": "\x1b]0;owned\x07\x1b[2J", "candidate": "ort\x1b[31m"}
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(golden, **arrays)  # type: ignore[arg-type]
    r = runner.invoke(app, ["verify", "--load-outputs", str(golden), str(src)])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "\\x1b]0;owned\\x07" in r.stdout  # shown, escaped


# ------------------------------------------- 22.16 / 22.19: names are never cut; no trailing spaces
def _long_named_bns(n: int = 3) -> onnx.ModelProto:
    """Relu -> BN chains (left: no producer) whose names differ only in the middle, as exporters name them."""
    rng = np.random.default_rng(1)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        inits += [
            numpy_helper.from_array(a.astype(np.float32), f"{k}{i}") for a, k in zip(bn_stats(3, rng), "gbmv")
        ]
        nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"relu{i}"))
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"r{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"],
                [f"y{i}"],
                name=f"/stages/stage.{i}/blocks/blocks.0/conv2/bn/BatchNormalization_of_the_block",
            )
        )
        prev = f"y{i}"
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 3, 4, 4])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("verbose", [[], ["-v"], ["-v", "--health"]])
def test_names_are_whole_at_80_columns(tmp_path: Path, verbose: list[str]) -> None:
    src = tmp_path / "m.onnx"
    model = _long_named_bns()
    onnx.save(model, str(src))
    r = runner.invoke(app, ["inspect", str(src), *verbose], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            assert sum(node.name in line for line in lines) == (2 if "--health" in verbose else 1), node.name
    assert "…" not in r.stdout
    assert not [line for line in lines if line != line.rstrip()]  # no padding to column 80


# ------------------------------------------------ 22.15: inspect says what fold does, counts compare
def _verdicts(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(v["bn"], v["status"], v["target"], v["target_kind"], v["reason"]) for v in doc["verdicts"]]


def _inspect_and_fold(src: Path, out: Path, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
    r1 = runner.invoke(app, ["inspect", str(src), "--json", *extra])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, ["fold", str(src), str(out), "--json", *extra])
    assert r2.exit_code == 0, r2.output
    return _strict_json(r1.stdout), _strict_json(r2.stdout)


@pytest.mark.parametrize(
    "sample",
    [
        "lenet5.onnx",
        "cnn_opset6.onnx",
        "conv1d_net.onnx",
        "mnist_mlp.onnx",
        "preact_net.onnx",
        "unet_decoder.onnx",
    ],
)
def test_inspect_verdicts_are_folds_onnx(sample: str, tmp_path: Path) -> None:
    seen, done = _inspect_and_fold(ROOT / "models" / "samples" / sample, tmp_path / "o.onnx")
    assert _verdicts(seen) == _verdicts(done)
    for key in (
        "bn_before",
        "bn_after",
        "folded",
        "left",
        "by_reason",
        "nodes_before",
        "nodes_after",
        "params_before",
        "params_after",
    ):
        assert seen["summary"][key] == done["summary"][key], key
    assert done["summary"]["left"] == done["summary"]["bn_after"]


_UNTRACEABLE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if float(y.sum()) > -1e30:  # data-dependent control flow: torch.fx cannot trace it
            y = torch.relu(y)
        return self.bn2(self.conv2(y))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.bn1d = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn1d(self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def _trained(m):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                mod.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.25)
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return m.eval()


def net():
    torch.manual_seed(0)
    return _trained(Net())


def plain():
    torch.manual_seed(0)
    return _trained(Plain())


net.example_input_shape = (3, 8, 8)
plain.example_input_shape = (3, 8, 8)
"""


@pytest.fixture()
def factory_file(tmp_path: Path) -> Path:
    import torch

    f = tmp_path / "arch.py"
    f.write_text(_UNTRACEABLE)
    ns: dict[str, Any] = {}
    exec(compile(_UNTRACEABLE, str(f), "exec"), ns)  # noqa: S102 - the test's own source
    torch.save(ns["net"]().state_dict(), tmp_path / "net.pt")
    torch.save(ns["plain"]().state_dict(), tmp_path / "plain.pt")
    return f


@pytest.mark.parametrize(
    ("factory", "fmt", "form"),
    [
        ("net", "pt", "dotted"),
        ("plain", "pt", "dotted"),
        ("plain", "pt2", "file"),
    ],
)
def test_inspect_verdicts_are_folds_pytorch(
    factory_file: Path, factory: str, fmt: str, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = factory_file.parent
    monkeypatch.chdir(tmp)  # the current folder is importable: "arch:net" names tmp/arch.py
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "arch", raising=False)
    spec = f"arch:{factory}" if form == "dotted" else f"{factory_file}:{factory}"
    seen, done = _inspect_and_fold(tmp / f"{factory}.pt", tmp / f"o.{fmt}", "-m", spec)
    assert _verdicts(seen) == _verdicts(done)
    for key in ("bn_before", "bn_after", "folded", "left", "by_reason", "params_before", "params_after"):
        assert seen["summary"][key] == done["summary"][key], key
    s = done["summary"]
    if fmt == "pt":  # a folded BN leaves the module tree (an nn.Identity is no module left to run)
        assert seen["summary"]["nodes_after"] == s["nodes_after"]
        assert s["nodes_after"] == s["nodes_before"] - s["folded"]


@pytest.mark.parametrize("factory", ["net", "plain"])
def test_inspect_to_onnx_verdicts_are_folds(
    factory_file: Path, factory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PyTorch file written to .onnx: inspect --to onnx gives fold's verdicts (exporter folds included)."""
    tmp = factory_file.parent
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "arch", raising=False)  # another test's arch.py (one process here)
    spec = f"{factory_file}:{factory}"
    r = runner.invoke(app, ["fold", str(tmp / f"{factory}.pt"), str(tmp / "o.onnx"), "-m", spec, "--json"])
    assert r.exit_code == 0, r.output
    done = _strict_json(r.stdout)
    r = runner.invoke(app, ["inspect", str(tmp / f"{factory}.pt"), "-m", spec, "--to", "onnx", "--json"])
    assert r.exit_code == 0, r.output
    seen = _strict_json(r.stdout)
    assert _verdicts(seen) == _verdicts(done)
    for key in (
        "bn_before",
        "bn_after",
        "folded",
        "left",
        "by_reason",
        "nodes_before",
        "nodes_after",
        "params_before",
        "params_after",
    ):
        assert seen["summary"][key] == done["summary"][key], key


def test_export_report_counts_agree(factory_file: Path) -> None:
    """A BN the exporter removed is not "left"; nodes compare ONNX with ONNX."""
    tmp = factory_file.parent
    r = runner.invoke(
        app, ["fold", str(tmp / "net.pt"), str(tmp / "o.onnx"), "--json", "-m", f"{factory_file}:net"]
    )
    assert r.exit_code == 0, r.output
    s = _strict_json(r.stdout)["summary"]
    out = onnx.load(str(tmp / "o.onnx"))
    assert s["bn_after"] == s["left"] == sum(n.op_type == "BatchNormalization" for n in out.graph.node)
    assert s["folded"] + s["left"] == s["bn_before"] == 2
    assert s["nodes_after"] == len(out.graph.node)


# ------------------------------------------------------- 22.19: progress stages numbered in order
def test_progress_stages_count_up(tmp_path: Path) -> None:
    """A real fold reports saving (staging OUT) before verifying it: the numbers still count up."""
    import io
    import re

    from rich.console import Console

    from bnfold import files
    from bnfold.cli.render import progress_callback

    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn_onnx(), str(src))
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80, color_system=None)
    with progress_callback(console, stages=("load", "fold", "verify", "save")) as update:
        files.fold_file(src, tmp_path / "o.onnx", files.FoldSettings(), update)
    shown = [(int(a), int(b), name) for a, b, name in re.findall(r"\[(\d)/(\d)\] (\w+)", buf.getvalue())]
    firsts: list[tuple[int, int, str]] = []
    for item in shown:
        if item[2] not in [f[2] for f in firsts]:
            firsts.append(item)
    assert [f[0] for f in firsts] == list(range(1, len(firsts) + 1)), firsts
    assert {f[2] for f in firsts} == {"loading", "folding", "verifying", "saving"}


def test_freeze_help_names_only_what_freeze_takes() -> None:
    r = runner.invoke(app, ["freeze", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    model_line = next(line for line in r.stdout.splitlines() if line.strip().startswith("MODEL"))
    assert ".onnx" not in model_line and ".pt2" not in model_line and ".pt" in model_line


def test_verify_shows_the_default_tolerance_as_it_is(tmp_path: Path) -> None:
    """float32's default atol is its smallest normal, 1.2e-38: not shown rounded to another number."""
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn_onnx(), str(src))
    r = runner.invoke(app, ["verify", str(src), str(src)], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if line.split()[:1] == ["y"])
    assert "1.18e-38" in row.split() or "1.2e-38" in row.split()
    assert "1e-38" not in row.split()


def test_cli_md_names_the_culprits_key() -> None:
    text = (ROOT / "cli.md").read_text(encoding="utf-8")
    assert "extra.culprits" not in text and "`culprits`" in text


_PRUNABLE = '''
import torch
from torch import nn


class Net(nn.Module):
    """conv1 -> bn1 (gamma = 0 on two channels) -> relu -> conv2 (padded: the constant is not exact there)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def net():
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.3, 2.0)
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.uniform_(0.2, 0.5)
        m.bn1.weight[[1, 4]] = 0.0
    return m


net.example_input_shape = (3, 8, 8)
'''


def test_prune_reasons_are_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    (tmp_path / "prunable.py").write_text(_PRUNABLE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "prunable", raising=False)
    ns: dict[str, Any] = {}
    exec(compile(_PRUNABLE, "prunable.py", "exec"), ns)  # noqa: S102 - the test's own source
    torch.save(ns["net"]().state_dict(), tmp_path / "net.pt")
    args = ["fold", "net.pt", "out.pt", "-m", "prunable:net", "--prune-constant-channels"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    entries = _strict_json(r.stdout)["pruned_channels"]
    assert entries and all(e["detail"] for e in entries if not e["pruned"])
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for e in entries:
        assert e["layer"] in r.stdout
        if not e["pruned"]:
            assert " ".join(e["detail"].split()) in " ".join(r.stdout.split())


def test_folded_bias_keeps_its_requires_grad() -> None:
    """A frozen bias (requires_grad False) next to a trainable weight stays frozen after the fold."""
    import torch
    from torch import nn

    import bnfold
    from models.stats import randomize_bn

    torch.manual_seed(0)
    m = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    ).eval()
    m[0].bias.requires_grad_(False)
    m[2].weight.requires_grad_(False)  # and the other way round
    x = torch.randn(2, 3, 8, 8)
    folded = bnfold.fold(m)
    convs = [mod for mod in folded.modules() if isinstance(mod, nn.Conv2d)]
    assert [(c.weight.requires_grad, c.bias.requires_grad) for c in convs] == [(True, False), (False, True)]
    torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)


def test_ir3_model_the_checker_rejects_is_bad_input(tmp_path: Path) -> None:
    """IR < 4 lists every initializer as a graph input; onnx.checker rejects a file that does not."""
    m = _conv_bn_onnx()
    m.ir_version = 3
    m.opset_import[0].version = 7
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)
    src = tmp_path / "ir3.onnx"
    onnx.save(m, str(src))
    before = src.read_bytes()
    for args in (["inspect", str(src)], ["fold", str(src), str(tmp_path / "o.onnx")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "onnx.checker" in lines[0] and "ir3.onnx" in lines[0]
    assert not (tmp_path / "o.onnx").exists() and src.read_bytes() == before


# ------------------------------------------- 22.19: checkpoints as users have them; errors in CLI words
def _lenet_checkpoints(tmp_path: Path) -> tuple[Path, Path, Any]:
    """A Lightning-style checkpoint: weights under 'state_dict' with the LightningModule's 'model.' prefix,
    plain metadata (loads weights-only) and one that pickles an argparse.Namespace (hyper-parameters)."""
    import argparse

    import torch

    from models.lenet import lenet5
    from models.stats import randomize_bn

    torch.manual_seed(0)
    m = randomize_bn(lenet5()).eval()
    sd = {f"model.{k}": v for k, v in m.state_dict().items()}
    plain = {
        "epoch": 3,
        "global_step": 10,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": sd,
        "hyper_parameters": {"lr": 0.1},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    torch.save(plain, tmp_path / "plain.ckpt")
    torch.save({**plain, "hyper_parameters": argparse.Namespace(lr=0.1)}, tmp_path / "hparams.ckpt")
    return tmp_path / "plain.ckpt", tmp_path / "hparams.ckpt", m


def test_lightning_checkpoint(tmp_path: Path) -> None:
    import torch

    plain, pickled, m = _lenet_checkpoints(tmp_path)
    out = tmp_path / "o.pt"
    r = runner.invoke(app, ["fold", str(plain), str(out), "-m", "models.lenet:lenet5", "--json"])
    assert r.exit_code == 0, r.output
    assert _strict_json(r.stdout)["summary"]["folded"] == 4
    folded = torch.load(out, weights_only=False)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)

    r = runner.invoke(app, ["inspect", str(pickled), "-m", "models.lenet:lenet5"])
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "pickled PyTorch module" not in line and "training checkpoint" in line
    assert "--trust-pickle" in line and "trust_pickle=" not in line
    # trusted, its weights go into the factory's module
    r = runner.invoke(
        app, ["fold", str(pickled), str(out), "-m", "models.lenet:lenet5", "--trust-pickle", "--json"]
    )
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(torch.load(out, weights_only=False)(x), m(x), rtol=1e-5, atol=1e-5)


def test_errors_use_cli_words(tmp_path: Path) -> None:
    import torch
    from torch import nn

    sd = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 2).state_dict(), sd)
    r = runner.invoke(app, ["inspect", str(sd), "-m", "models.lenet:lenet5"])
    assert r.exit_code == 2
    assert "models.lenet:lenet5" in r.stderr and "<function" not in r.stderr and " at 0x" not in r.stderr
    r = runner.invoke(app, ["inspect", str(sd)])
    assert r.exit_code == 2
    assert "model_factory" not in r.stderr and "--model" in r.stderr


# ------------------------------------------------------------ 22.19: bench shows spread and warns
def test_bench_reports_spread(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn_onnx(), str(src))
    r = runner.invoke(app, ["bench", str(src), "--runs", "5", "--warmup", "1", "--json"])
    assert r.exit_code == 0, r.output
    for t in _strict_json(r.stdout)["timings"]:
        for side in ("original", "folded"):
            s = t[f"{side}_spread_ms"]
            assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
            assert s["median"] == t[f"{side}_ms"]
    r = runner.invoke(app, ["bench", str(src), "--runs", "5", "--warmup", "1"], env={"COLUMNS": "120"})
    assert r.exit_code == 0 and "interquartile" in r.stdout


def test_bench_warns_when_runs_disagree() -> None:
    import io

    from rich.console import Console

    from bnfold.bench import BenchReport, Spread, Timing
    from bnfold.cli.render import render_bench_report

    steady = Spread.of([1.0, 1.01, 1.0, 0.99, 1.0])
    faster = Spread.of([0.5, 0.51, 0.5, 0.49, 0.5])
    noisy = Spread.of([0.5, 2.0, 0.6, 1.5, 0.9])
    assert Timing("a", steady.median, faster.median, steady, faster).disagreement() is None
    assert "runs disagree" in (Timing("b", steady.median, noisy.median, steady, noisy).disagreement() or "")
    close = Spread.of([0.97, 0.98, 0.99, 1.0, 1.01])
    assert "within noise" in (Timing("c", steady.median, close.median, steady, close).disagreement() or "")

    from bnfold import bench

    timings = [Timing("b", steady.median, noisy.median, steady, noisy)]
    report = BenchReport(
        "m.onnx", "onnx", 5, 1, 0, {"x": (1, 3)}, timings, notes=bench._spread_notes(timings)
    )
    buf = io.StringIO()
    render_bench_report(Console(file=buf, width=100), report)
    assert "runs disagree" in buf.getvalue() and "[" in buf.getvalue()


# ---------------------------------------------------- 22.19: verify models whose names differ
def test_verify_maps_names(tmp_path: Path) -> None:
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(_conv_bn_onnx(), str(ref))
    m = _conv_bn_onnx()  # the same model, its input named "input.1" and output "logits"
    for n in m.graph.node:
        n.input[:] = ["input.1" if i == "x" else i for i in n.input]
        n.output[:] = ["logits" if o == "y" else o for o in n.output]
    m.graph.input[0].name, m.graph.output[0].name = "input.1", "logits"
    onnx.save(m, str(cand))
    before = cand.read_bytes()
    r = runner.invoke(app, ["verify", str(ref), str(cand)])
    assert r.exit_code == 2  # cannot compare: different names
    r = runner.invoke(
        app, ["verify", str(ref), str(cand), "--map", "x=input.1", "--map", "y=logits", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert _strict_json(r.stdout)["passed"] is True
    assert cand.read_bytes() == before
    r = runner.invoke(app, ["verify", str(ref), str(cand), "--map", "x=nope"])
    assert r.exit_code == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["verify", str(ref), str(cand), "--map", "x"])
    assert r.exit_code == 2 and "REF=CAND" in r.stderr


# ------------------------------------------------------- 22.19: .safetensors weights with --model
def _write_safetensors(
    path: Path, tensors: dict[str, Any], *, header_patch: dict[str, Any] | None = None
) -> None:
    """The safetensors layout written by hand: 8-byte header size, JSON header, raw little-endian data."""
    names = {"float32": "F32", "float64": "F64", "int64": "I64"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, at = [], 0
    for name, t in tensors.items():
        arr = t.detach().cpu().numpy()
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": names[str(arr.dtype)],
            "shape": list(arr.shape),
            "data_offsets": [at, at + len(raw)],
        }
        blobs.append(raw)
        at += len(raw)
    header.update(header_patch or {})
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_safetensors_weights_fold(tmp_path: Path) -> None:
    import torch

    from models.lenet import lenet5
    from models.stats import randomize_bn

    torch.manual_seed(0)
    m = randomize_bn(lenet5()).eval()
    src = tmp_path / "lenet.safetensors"
    _write_safetensors(src, dict(m.state_dict()))
    before = src.read_bytes()
    out = tmp_path / "o.pt"
    r = runner.invoke(app, ["fold", str(src), str(out), "-m", "models.lenet:lenet5", "--json"])
    assert r.exit_code == 0, r.output
    doc = _strict_json(r.stdout)
    assert doc["summary"]["folded"] == 4 and doc["verification"]["passed"] is True
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(torch.load(out, weights_only=False)(x), m(x), rtol=1e-5, atol=1e-5)
    assert src.read_bytes() == before
    r = runner.invoke(app, ["inspect", str(src)])  # weights only: the architecture is needed
    assert r.exit_code == 2 and "--model" in r.stderr


def test_safetensors_lying_header_is_refused(tmp_path: Path) -> None:
    import torch

    from models.lenet import lenet5

    sd = dict(lenet5().state_dict())
    first = next(iter(sd))
    bad = tmp_path / "bad.safetensors"
    _write_safetensors(
        bad, sd, header_patch={first: {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}
    )
    r = runner.invoke(app, ["inspect", str(bad), "-m", "models.lenet:lenet5"])
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "bad.safetensors" in line and "data_offsets" in line
    del torch


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--opt-level", "bogus"], "'bogus' is not one of"),
        (["--samples", "abc"], "expected an integer (got 'abc')"),
        (["-n", "1.5"], "expected an integer (got '1.5')"),
    ],
)
def test_usage_errors_in_bnfold_words(tmp_path: Path, args: list[str], want: str) -> None:
    """typer validates with pydantic; its phrasing ("Value error,", "Input should be") stays out."""
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn_onnx(), str(src))
    r = runner.invoke(app, ["fold", str(src), str(tmp_path / "o.onnx"), *args])
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and want in line
    assert "Value error" not in line and "Input should be" not in line

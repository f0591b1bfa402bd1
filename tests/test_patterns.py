"""The catalogue of fold patterns (:mod:`bnfold.patterns`) is the one vocabulary of every verdict.

What a user relies on: every BN folded carries a pattern id from the catalogue, on each backend; the
same BN gets the same id through PyTorch and through ONNX; ``--json`` carries it; the README's table is
the catalogue's; the schema names every id.
"""

from __future__ import annotations

import io
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from typer.testing import CliRunner

import bnfold
from bnfold import patterns
from bnfold.cli import app
from bnfold.records import Direction, FoldReport, Site
from models.lenet import lenet5
from models.preact import preact_net
from models.reparam import RepVGGBlock, RepVGGDW
from models.resnet import resnet18
from models.stats import randomize_bn

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "models" / "samples"
README = ROOT / "README.md"


# ---- the catalogue itself ------------------------------------------------------------------------------


def test_ids_are_unique_short_and_well_formed() -> None:
    ids = patterns.ids()
    assert len(ids) == len(set(ids)) == len(patterns.CATALOGUE)
    for p in patterns.CATALOGUE:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", p.id) and len(p.id) <= 20, p.id
        assert p.title and p.math and p.example, p.id
        assert Direction(p.direction), p.id  # a direction a Site can carry
        assert p.backends, f"{p.id} is matched by no backend"
        assert patterns.get(p.id) is p


def test_unknown_id_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        patterns.get("conv_bn")


def test_readme_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- patterns:begin[^\n]*-->\n(.*?)<!-- patterns:end -->", text, re.S)
    assert found is not None, "README.md lost its <!-- patterns:begin --> / <!-- patterns:end --> markers"
    assert found.group(1) == patterns.markdown_table()


def test_table_has_one_row_per_pattern() -> None:
    rows = [line for line in patterns.markdown_table().splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(patterns.ids())
    assert all(r.count(" | ") == 5 for r in rows)  # a "|" inside a cell is escaped


def test_schema_names_every_pattern_id() -> None:
    text = resources.files("bnfold").joinpath("schemas/report-v1.json").read_text(encoding="utf-8")
    verdict = json.loads(text)["$defs"]["verdict"]
    assert "pattern" in verdict["required"]
    assert verdict["properties"]["pattern"]["enum"] == [*patterns.ids(), None]


# ---- every verdict carries its pattern, on both backends ------------------------------------------------


def _check_sites(report: FoldReport, backend: str) -> dict[str, str]:
    """{bn: pattern} of the sites; each id in the catalogue, matched on ``backend``, same direction."""
    out = {}
    for v in report.verdicts:
        if not isinstance(v, Site):
            assert v.pattern is None or v.pattern in patterns.ids(), v
            continue
        assert v.pattern is not None, f"{backend}: {v.bn} folded without a pattern"
        p = patterns.get(v.pattern)
        assert backend in p.backends, f"{v.bn}: {p.id} is not listed for {backend}"
        assert v.direction.value == p.direction, v
        out[v.bn] = v.pattern
    return out


def _torch(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(model, seed).eval()


def _onnx(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """The model exported as the samples are (legacy exporter, BN nodes kept, opset 17)."""
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, do_constant_folding=False, opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def _module_of(node_name: str) -> str:
    """``/layer1/layer1.0/bn1/BatchNormalization`` -> ``layer1.0.bn1`` (the exporter's scope names)."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(p.rsplit(".", 1)[-1] for p in parts[:-1]) if len(parts) >= 2 else node_name


def test_lenet_patterns_on_every_backend() -> None:
    """LeNet-5: three Conv -> BN2d and one Linear -> BN1d on (N, 84), the same ids on all three backends."""
    model, x = _torch(lenet5()), torch.randn(2, 1, 32, 32)
    want = {"1": "conv-bn", "5": "conv-bn", "9": "conv-bn", "13": "gemm-bn"}
    assert _check_sites(bnfold.inspect(model, example_inputs=(x,)), "fx") == want
    exported = torch.export.export(model, (x,))
    assert _check_sites(bnfold.inspect(exported), "export") == want
    onnx_sites = _check_sites(bnfold.inspect(_onnx(model, x)), "onnx")
    assert {_module_of(k): v for k, v in onnx_sites.items()} == want


@pytest.mark.parametrize(
    "name, build, shape",
    [
        ("resnet18", lambda: resnet18(width=8), (1, 3, 32, 32)),
        ("preact", preact_net, (1, 3, 32, 32)),
        ("repvgg", lambda: RepVGGBlock(8, 8), (1, 8, 12, 12)),
        ("repvit", lambda: RepVGGDW(8), (1, 8, 12, 12)),
    ],
)
def test_same_bn_same_pattern_through_pytorch_and_onnx(name: str, build: Any, shape: tuple[int, ...]) -> None:
    model = _torch(build())
    x = torch.randn(*shape)
    fx_sites = _check_sites(bnfold.inspect(model, example_inputs=(x,)), "fx")
    onnx_sites = {_module_of(k): v for k, v in _check_sites(bnfold.inspect(_onnx(model, x)), "onnx").items()}
    both = set(fx_sites) & set(onnx_sites)
    assert both, f"{name}: no BN folded by both backends"
    assert {k: fx_sites[k] for k in both} == {k: onnx_sites[k] for k in both}


def test_preact_folds_forward_backward_and_propagated() -> None:
    """The pre-activation net: its BN -> ReLU -> Conv pairs are propagated in ONNX, and the BNs that fold
    on both backends (models.preact.FOLDABLE) name the pattern of their direction."""
    from models.preact import FOLDABLE

    model, x = _torch(preact_net()), torch.randn(1, 3, 32, 32)
    fx_sites = _check_sites(bnfold.inspect(model, example_inputs=(x,)), "fx")
    for bn, (direction, _) in FOLDABLE.items():
        assert patterns.get(fx_sites[bn]).direction == direction
    onnx_sites = _check_sites(bnfold.inspect(_onnx(model, x)), "onnx")
    assert "scale-propagation" in onnx_sites.values()


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.onnx")))
def test_onnx_samples_carry_catalogue_ids(sample: str) -> None:
    report = bnfold.inspect(onnx.load(str(SAMPLES / sample)), affine=True)
    assert _check_sites(report, "onnx"), f"{sample}: nothing folded"


def test_pattern_is_in_json_for_every_verdict() -> None:
    r = CliRunner().invoke(app, ["inspect", str(SAMPLES / "preact_net.onnx"), "--json"])
    assert r.exit_code == 0, r.stdout
    verdicts = json.loads(r.stdout)["verdicts"]
    assert verdicts and all("pattern" in v for v in verdicts)
    for v in verdicts:
        if v["status"] == "left":
            assert v["pattern"] is None or v["pattern"] in patterns.ids()
        else:
            assert patterns.get(v["pattern"]).direction == v["direction"]


def test_freeze_and_batch_stats_name_their_pattern() -> None:
    model = _torch(lenet5())
    _, report = bnfold.freeze_with_report(model)
    assert _check_sites(report, "fx") == dict.fromkeys(("1", "5", "9", "13"), "bn-freeze")
    stats = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False))
    conv = bnfold.inspect(stats.eval(), batch_stats="instance")
    assert _check_sites(conv, "fx") == {"1": "bn-instance"}


def test_a_refusal_names_the_pattern_it_was_tried_as() -> None:
    """A Conv -> BN whose folded weight would overflow float32 is left (OVERFLOW), tried as conv-bn,
    on every backend; a BN with no neighbour at all was tried as nothing."""
    model = _torch(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].eps, model[1].running_var[2] = 1e-12, 1e-12
        model[1].weight[2] = 1e35  # scale ~7e40: the folded weight is not a float32
    x = torch.randn(1, 3, 8, 8)
    reports = {  # folded, not inspected: the PyTorch backends decide overflow when they compute
        "fx": bnfold.fold_with_report(model)[1],
        "export": bnfold.fold_with_report(torch.export.export(model, (x,)))[1],
        "onnx": bnfold.fold_with_report(_onnx(model, x), propagate=False)[1],
    }
    for backend, report in reports.items():
        (v,) = report.verdicts
        assert not v.folded and v.reason.value == "overflow", (backend, v)
        assert v.pattern == "conv-bn", backend
        assert json.loads(json.dumps(report.to_dict()))["verdicts"][0]["pattern"] == "conv-bn"
    alone = _torch(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    (v,) = bnfold.inspect(_onnx(alone, x), propagate=False).verdicts
    assert v.reason.value == "no_producer" and v.pattern is None


# ---- the catalogue's backend columns are true: each id is produced where it says --------------------------

nn = torch.nn


class _Net(nn.Module):
    """One tiny model per pattern: ``body`` is the forward of ``x`` with the modules given."""

    def __init__(self, body: Any, **mods: nn.Module) -> None:
        super().__init__()
        self.body = body
        for k, m in mods.items():
            self.add_module(k, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self, x)  # type: ignore[no-any-return]


def _tokens(m: _Net, x: torch.Tensor) -> torch.Tensor:  # LeViT's LinearNorm
    y = m.fc(x)
    return m.bn(y.flatten(0, 1)).reshape_as(y)  # type: ignore[no-any-return]


def _weight_standardised() -> nn.Module:
    from models.batch_stats import torch_weight_standardised_net

    return torch_weight_standardised_net()  # type: ignore[no-any-return]


TORCH_CASES: dict[str, tuple[Any, tuple[int, ...]]] = {
    "conv-bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 8, 8)),
    "gemm-bn": (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), (3, 6)),
    "linear-norm": (lambda: _Net(_tokens, fc=nn.Linear(6, 5), bn=nn.BatchNorm1d(5)), (2, 7, 6)),
    "concat-split": (
        lambda: _Net(
            lambda m, x: m.bn(torch.cat([m.a(x), m.b(x)], 1)),
            a=nn.Conv2d(3, 2, 1),
            b=nn.Conv2d(3, 3, 3, padding=1),
            bn=nn.BatchNorm2d(5),
        ),
        (2, 3, 6, 6),
    ),
    "branch-sum": (  # branches of different tensors: a sum branch merging cannot take first
        lambda: _Net(
            lambda m, x: m.bn(m.a(x) + m.b(torch.relu(x))),
            a=nn.Conv2d(3, 4, 1),
            b=nn.Conv2d(3, 4, 1),
            bn=nn.BatchNorm2d(4),
        ),
        (2, 3, 6, 6),
    ),
    "bn-conv": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), (2, 3, 8, 8)),
    "bn-gemm": (lambda: nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 5)), (3, 6)),
    "bn-flatten-gemm": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)),
        (2, 3, 4, 4),
    ),
    "branch-merge": (lambda: RepVGGBlock(4, 4), (1, 4, 6, 6)),
    "scale-propagation": (preact_net, (1, 3, 32, 32)),
    "bn-instance": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        (1, 3, 8, 8),
    ),
    "bn-constant": (_weight_standardised, (1, 3, 16, 16)),
}


def _onnx_cases() -> dict[str, onnx.ModelProto]:
    from test_qdq_backward import pre_bn

    from models.batch_stats import onnx_training_bn, onnx_weight_standardised
    from models.onnx_graphs import G, qdq_layer

    def one_bn(g: G, x: str, c: int) -> onnx.ModelProto:
        g.bn(x, "y", c, "bn")
        g.output("y")
        return g.model(opset=17)

    const_add = G()
    const_add.node(
        "Conv", [const_add.input("x", [2, 3, 6, 6]), const_add.rand("w", (4, 3, 3, 3))], ["c"], "conv"
    )
    const_add.node("Add", ["c", const_add.rand("k", (1, 4, 1, 1))], ["t"], "add")
    frozen = G()
    frozen.node("Conv", [frozen.input("x", [2, 3, 6, 6]), frozen.rand("w", (4, 3, 3, 3))], ["c"], "conv")
    frozen.node("Mul", ["c", frozen.init("m", frozen.rng.uniform(0.5, 1.5, (1, 4, 1, 1)))], ["p"], "mul")
    frozen.node("Add", ["p", frozen.rand("a", (1, 4, 1, 1))], ["y"], "add")
    frozen.output("y")
    affine = G()
    return {
        "const-add-bn": one_bn(const_add, "t", 4),
        "frozen-bn": frozen.model(opset=17),
        "qdq-bn": one_bn(qdq_layer("Conv"), "t", 6),
        "bn-qdq": pre_bn(quant="in"),
        "bn-constant": onnx_weight_standardised(),
        "bn-affine": one_bn(affine, affine.input("x", [2, 3, 4, 4]), 3),
        "bn-instance": onnx_training_bn(),
    }


def _produced(model: Any, backend: str, x: torch.Tensor | None, pattern: str) -> set[str]:
    opts: dict[str, Any] = {"batch_stats": "instance"} if pattern == "bn-instance" else {}
    if backend == "onnx":
        opts["affine"] = pattern == "bn-affine"
    elif backend == "fx":
        opts["example_inputs"] = (x,)
    report = bnfold.fold_with_report(model, **opts)[1]
    sites = [v for v in report.verdicts if isinstance(v, Site)] + list(report.mul_add)
    return {v.pattern for v in sites if v.pattern is not None}


@pytest.mark.parametrize("pattern, backend", [(p.id, b) for p in patterns.CATALOGUE for b in p.backends])
def test_every_backend_column_of_the_catalogue_is_true(pattern: str, backend: str) -> None:
    """Each id is produced by each backend its row names (a tiny model per pattern, realistic BN stats)."""
    if pattern == "bn-freeze":
        _, rep = bnfold.freeze_with_report(_torch(lenet5()))
        assert {v.pattern for v in rep.verdicts if isinstance(v, Site)} == {"bn-freeze"}
        return
    onnx_cases = _onnx_cases() if backend == "onnx" else {}
    if pattern in onnx_cases:
        assert pattern in _produced(onnx_cases[pattern], "onnx", None, pattern)
        return
    build, shape = TORCH_CASES[pattern]
    model, x = _torch(build()), torch.randn(*shape)
    if pattern == "scale-propagation":
        with torch.no_grad():  # an exact move through Relu needs a positive scale
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.abs_()
    target: Any = model
    if backend == "export":
        target = torch.export.export(model, (x,))
    elif backend == "onnx":
        target = _onnx(model, x)
    assert pattern in _produced(target, backend, x, pattern)


def test_a_shared_module_refusal_names_the_pattern() -> None:
    """One conv called twice, each call followed by its own BN: without a GraphModule both are left
    (SHARED_MODULE), each tried as conv-bn; the model comes back unchanged."""
    from bnfold.fx import fold_module

    class TwoCalls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn1, self.bn2 = (
                nn.Conv2d(4, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.BatchNorm2d(4),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))  # type: ignore[no-any-return]

    model, x = _torch(TwoCalls()), torch.randn(2, 4, 6, 6)
    out, rep = fold_module(model, graph=False)
    assert [(v.reason.value, v.pattern) for v in rep.skips] == [("shared_module", "conv-bn")] * 2
    assert torch.equal(out(x), model(x))


def test_a_refusal_keeps_its_pattern_through_the_cli(tmp_path: Path) -> None:
    """The CLI rewords a refusal's advice for its flags; the verdict must keep the pattern it was tried
    as (``--json``), as the Python API reports it."""
    model = _torch(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].eps, model[1].running_var[2] = 1e-12, 1e-12
        model[1].weight[2] = 1e35  # the folded weight is not a float32: left, tried as conv-bn
    src = tmp_path / "m.onnx"
    onnx.save(_onnx(model, torch.randn(1, 3, 8, 8)), str(src))
    r = CliRunner().invoke(app, ["--json", "inspect", str(src), "--no-propagate"])
    assert r.exit_code == 0, r.output
    (v,) = json.loads(r.stdout)["verdicts"]
    assert v["status"] == "left" and v["pattern"] == "conv-bn", v

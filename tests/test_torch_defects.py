"""PyTorch-side defects of issue 22, each checked the way a user would meet it.

- 22.9: a factory given as a file path (``-m dir/net.py:factory``) loads as a registered module, like
  the dotted form: a ``.pt`` output pickles the class defined in that file, and a model that does not
  trace folds the same as with ``-m net:factory``.
- 22.12: LeViT (Linear on (B, N, C) -> flatten -> BatchNorm1d -> reshape back) as ``.pt2`` folds as
  every other path does, and the ``.pt2`` BNs are named by module path.
- 22.18: ``unfreeze`` gives back the BN's own values, bit for bit; ``to_bn_state_dict`` takes eps from
  the model.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnfold.cli import app
from models.testing import ATOL_F32

runner = CliRunner()

FP32_ATOL = ATOL_F32  # models.testing: the one tolerance table
"""float32 fold error floor on outputs of scale ~1-10 (a few ulp of the accumulated sums)."""


# ------------------------------------------------------------------------ 22.9 file-path factories
_FACTORY = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))


    class Net(nn.Module):
        """Python control flow on a tensor value: the whole model does not trace, ``block`` does."""

        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            y = self.block(x)
            if float(y.mean()) > 1e9:
                return -y
            return y


    def factory():
        torch.manual_seed(0)
        m = Net()
        bn = m.block.bn
        with torch.no_grad():
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        return m.eval()


    factory.example_input_shape = (3, 8, 8)
''')


@pytest.fixture()
def factory_file(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``tmp_path/src/<stem>.py`` with the factory, and a state_dict of it; the import undone afterwards."""
    stem = f"bnfold_factory_{tmp_path.name.replace('-', '_')}"
    src = tmp_path / "src"
    src.mkdir()
    py = src / f"{stem}.py"
    py.write_text(_FACTORY)
    path = list(sys.path)
    try:
        ns: dict[str, object] = {}
        exec(compile(_FACTORY, "<factory>", "exec"), ns)  # a copy of the model, never registered
        weights = tmp_path / "weights.pt"
        torch.save(ns["factory"]().state_dict(), weights)  # type: ignore[operator]
        yield py, weights
    finally:
        sys.modules.pop(stem, None)
        sys.path[:] = path


def _reference(py: Path) -> torch.nn.Module:
    ns: dict[str, object] = {}
    exec(compile(py.read_text(), str(py), "exec"), ns)
    return ns["factory"]()  # type: ignore[operator,no-any-return]


def test_file_factory_pt_output_pickles_the_class_from_that_file(
    factory_file: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    py, weights = factory_file
    work = tmp_path / "elsewhere"  # the factory's folder is not the current one
    work.mkdir()
    monkeypatch.chdir(work)
    before = weights.read_bytes()
    out = work / "folded.pt"
    # --no-verify: the written model is loaded and compared below
    r = runner.invoke(
        app, ["fold", str(weights), "-m", f"{py}:factory", "-o", str(out), "--json", "--no-verify"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["summary"]["bn_before"] == 1 and data["summary"]["bn_after"] == 0
    assert weights.read_bytes() == before
    folded = torch.load(out, weights_only=False)
    assert type(folded).__module__ == py.stem and type(folded).__name__ == "Net"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), _reference(py)(x), atol=FP32_ATOL, rtol=0)


def test_file_factory_folds_an_untraceable_model_like_the_dotted_form(
    factory_file: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    py, weights = factory_file
    monkeypatch.chdir(py.parent)  # the dotted form finds the module in the current folder
    verdicts = {}
    for form in (f"{py}:factory", f"{py.stem}:factory"):
        r = runner.invoke(app, ["inspect", str(weights), "-m", form, "--json"])
        assert r.exit_code == 0, r.output
        data = json.loads(r.stdout)
        verdicts[form] = [(v["bn"], v["status"], v["target"]) for v in data["verdicts"]]
    assert list(verdicts.values()) == [[("block.bn", "folded", "block.conv")]] * 2, verdicts


def test_file_factory_named_like_an_imported_module_is_refused(tmp_path: Path) -> None:
    py = tmp_path / "json.py"  # `json` is imported already: loading this file as `json` would shadow it
    py.write_text("def factory():\n    raise AssertionError('must not run')\n")
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    r = runner.invoke(app, ["fold", str(weights), "-m", f"{py}:factory", "-o", str(tmp_path / "o.pt")])
    assert r.exit_code == 2
    assert "module name 'json' is already taken" in r.stderr and "Traceback" not in r.output
    assert sys.modules["json"] is json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["json.py", "w.pt"]


# ------------------------------------------------------------------ 22.18 unfreeze, to_bn_state_dict
def _bn_net() -> torch.nn.Module:
    """Conv -> BN(eps 1e-3) -> ReLU -> BN(affine=False) -> flatten -> Linear -> BN1d(eps 1e-5)."""
    from torch import nn

    from models.stats import randomize_bn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8, eps=1e-3),
        nn.ReLU(),
        nn.BatchNorm2d(8, affine=False),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nn.BatchNorm1d(6),
    )
    return randomize_bn(net, seed=5).eval()


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))


def _assert_same_bn_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    g, w = got.state_dict(), want.state_dict()
    assert g.keys() == w.keys()
    for k, v in w.items():
        assert g[k].dtype == v.dtype and torch.equal(g[k], v), k  # bit for bit, not "close"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_unfreeze_gives_the_bn_back_bit_for_bit(dtype: torch.dtype) -> None:
    import bnfold

    net = _bn_net().to(dtype)
    back = bnfold.unfreeze(bnfold.freeze(net)).eval()
    _assert_same_bn_state(back, net)
    with torch.no_grad():
        assert torch.equal(back(_x().to(dtype)), net(_x().to(dtype)))


def test_unfreeze_after_a_state_dict_round_trip_is_exact(tmp_path: Path) -> None:
    import bnfold

    net = _bn_net()
    path = tmp_path / "frozen.pt"
    torch.save(bnfold.freeze(net).state_dict(), path)
    other = _bn_net()
    with torch.no_grad():  # other statistics before loading
        for m in other.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.add_(0.25)
    fresh = bnfold.freeze(other)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    back = bnfold.unfreeze(fresh).eval()
    _assert_same_bn_state(back, net)
    with torch.no_grad():
        assert torch.equal(back(_x()), net(_x()))


def test_fine_tuned_frozen_layer_maps_back_within_the_stated_bound() -> None:
    import bnfold

    net = _bn_net()
    frozen = bnfold.freeze(net, learnable=True)
    with torch.no_grad():  # as after fine-tuning the affine
        frozen[1].scale.mul_(1.25)
        frozen[1].shift.add_(0.125)
        expected = frozen.eval()(_x())
        got = bnfold.unfreeze(frozen).eval()(_x())
    # gamma/beta rounded once to float32: a few float32 ulp of the output's scale
    assert (got - expected).abs().max() <= 8 * torch.finfo(torch.float32).eps * expected.abs().max()


def test_to_bn_state_dict_requires_eps_or_takes_it_from_the_model() -> None:
    import bnfold
    from bnfold.freezing import to_bn_state_dict

    net = _bn_net()
    frozen = bnfold.freeze(net, learnable=True)
    with torch.no_grad():  # fine-tuned: the BN values must be derived with the right eps
        for i in (1, 6):
            frozen[i].scale.mul_(1.25)
        expected = frozen.eval()(_x())
    saved = {k: v.clone() for k, v in frozen.state_dict().items()}
    with pytest.raises(bnfold.OptionError, match="epsilon of layer '1' is unknown"):
        to_bn_state_dict(saved)
    target = _bn_net()
    target.load_state_dict(to_bn_state_dict(saved, model=target), strict=True)
    with torch.no_grad():
        got = target(_x())
    assert (got - expected).abs().max() <= 8 * torch.finfo(torch.float32).eps * expected.abs().max()
    # a frozen model gives eps as well; an unfine-tuned layer comes back bit for bit
    exact = to_bn_state_dict(bnfold.freeze(net).state_dict(), model=bnfold.freeze(_bn_net()))
    assert all(torch.equal(exact[k], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------- 22.12 torch.export programs
def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


@pytest.fixture(scope="module")
def levit_program() -> tuple[torch.nn.Module, torch.Tensor, torch.export.ExportedProgram]:
    """The small LeViT of models/levit.py, an input, and its torch.export program (exported once)."""
    from models.levit import levit

    m = levit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return m, x, torch.export.export(m, (x,))


def test_levit_pt2_folds_every_bn_as_the_module_backend_does(
    levit_program: tuple[torch.nn.Module, torch.Tensor, torch.export.ExportedProgram], tmp_path: Path
) -> None:
    import bnfold
    from bnfold.fx import fold_exported

    m, x, ep = levit_program
    _, by_module = bnfold.fold_with_report(m)
    out, rep = fold_exported(ep)
    assert (rep.bn_before, rep.folded, rep.bn_after) == (19, 19, 0)
    # named by module path, the same verdicts as the module backend (LinearNorm forward, heads backward)
    assert [(v.bn, v.target, v.direction) for v in rep.sites] == [
        (v.bn, v.target, v.direction) for v in by_module.sites
    ]
    assert {v.bn for v in rep.sites} >= {"stage1.attn.qkv.bn", "down.q.1.bn", "head.bn", "head_dist.bn"}
    torch.export.save(out, tmp_path / "levit.pt2")
    again = torch.export.load(tmp_path / "levit.pt2").module()
    with torch.no_grad():
        assert _err(again(x), m(x)) <= FP32_ATOL
    assert not any("batch_norm" in str(n.target) for n in out.graph.nodes)


def test_levit_pt2_through_the_cli(
    levit_program: tuple[torch.nn.Module, torch.Tensor, torch.export.ExportedProgram], tmp_path: Path
) -> None:
    m, x, ep = levit_program
    src = tmp_path / "levit.pt2"
    torch.export.save(ep, src)
    before = src.read_bytes()
    out = tmp_path / "out.pt2"
    # --no-verify: the output is compared here, once (verification doubles this test's time)
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--json", "--no-verify"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["summary"]["bn_before"], data["summary"]["folded"], data["summary"]["bn_after"]) == (
        19,
        19,
        0,
    )
    assert {v["bn"] for v in data["verdicts"]} >= {"stem.0.bn", "stage2.mlp.ln2.bn", "head_dist.bn"}
    assert src.read_bytes() == before
    with torch.no_grad():
        assert _err(torch.export.load(out).module()(x), m(x)) <= FP32_ATOL


class _TokenLinearNorm(torch.nn.Module):
    """Conv feature map -> tokens (a transpose: not contiguous) -> LeViT's LinearNorm."""

    def __init__(self) -> None:
        from models.levit import LinearNorm

        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.ln = LinearNorm(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.conv(x).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("decompose", [False, True])
def test_pt2_linear_norm_on_non_contiguous_tokens(decompose: bool) -> None:
    from bnfold.fx import fold_exported
    from models.stats import randomize_bn

    torch.manual_seed(0)
    m = randomize_bn(_TokenLinearNorm(), seed=6).eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ep = torch.export.export(m, (x,))
    if decompose:  # the linear becomes bmm(x, view(expand(permute(w))))
        ep = ep.run_decompositions()
        assert any(n.target is torch.ops.aten.bmm.default for n in ep.graph.nodes)
    out, rep = fold_exported(ep)
    assert [(v.bn, v.target) for v in rep.sites] == [("ln.bn", "ln.linear")] and rep.bn_after == 0
    with torch.no_grad():
        assert _err(out.module()(x), m(x)) <= FP32_ATOL


class _Routes(torch.nn.Module):
    """bn0 -> conv (no padding) -> bn1 (two folds in one conv); cat and sum of convs -> BN; a padded conv."""

    def __init__(self) -> None:
        from torch import nn

        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 1, bias=False)
        self.cat_bn = nn.BatchNorm2d(8)
        self.c, self.d = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3, padding=1)
        self.sum_bn = nn.BatchNorm2d(6)
        self.pre_pad = nn.BatchNorm2d(6)
        self.padded = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv(self.bn0(x)))
        y = self.cat_bn(torch.cat([self.a(y), self.b(y)], 1))
        y = self.sum_bn(self.c(y) + self.d(y))
        return self.padded(self.pre_pad(torch.relu(y)))


@pytest.mark.parametrize("decompose", [False, True])
def test_pt2_channel_routes_and_backward_folds(decompose: bool) -> None:
    from bnfold.fx import fold_exported
    from bnfold.records import Direction, SkipReason
    from models.stats import randomize_bn

    torch.manual_seed(0)
    m = randomize_bn(_Routes(), seed=4).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    ep = torch.export.export(m, (x,))
    if decompose:
        ep = ep.run_decompositions()
    out, rep = fold_exported(ep)
    got = {
        v.bn: (getattr(v, "target", None), getattr(v, "direction", None), getattr(v, "reason", None))
        for v in rep.verdicts
    }
    assert got == {
        "bn0": ("conv", Direction.BACKWARD, None),
        "bn1": ("conv", Direction.FORWARD, None),
        "cat_bn": ("a", Direction.FORWARD, None),
        "sum_bn": ("c", Direction.FORWARD, None),
        "pre_pad": (None, None, SkipReason.PADDING),  # the padded zeros would not be shifted
    }
    with torch.no_grad():
        assert _err(out.module()(x), m(x)) <= FP32_ATOL
        assert _err(ep.module()(x), m(x)) <= FP32_ATOL  # the given program is untouched
    _, dry = fold_exported(ep, dry_run=True)
    assert (dry.bn_after, dry.params_after) == (rep.bn_after, rep.params_after) == (1, rep.params_after)


class _Refused(torch.nn.Module):
    """Linear on tokens -> BN1d over the tokens (not the Linear's channels); a residual tap; a reshape
    that moves the channel axis."""

    def __init__(self) -> None:
        from torch import nn

        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.token_bn = nn.BatchNorm1d(5)
        self.conv = nn.Conv2d(5, 6, 1)
        self.tap_bn = nn.BatchNorm2d(6)
        self.fc2 = nn.Linear(24, 8)
        self.moved_bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.token_bn(self.fc(x))  # (B, 5, 4): BN1d channels are the 5 tokens
        z = self.conv(y.unsqueeze(-1))
        z = self.tap_bn(z) + z
        w = self.fc2(z.flatten(1))  # (B, 8)
        return self.moved_bn(w.reshape(-1, 4))  # each row mixes two of fc2's channels per BN channel


def test_pt2_refusals_keep_their_reasons() -> None:
    from bnfold.fx import fold_exported
    from bnfold.records import SkipReason
    from models.stats import randomize_bn

    torch.manual_seed(0)
    m = randomize_bn(_Refused(), seed=2).eval()
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    out, rep = fold_exported(torch.export.export(m, (x,)))
    assert {v.bn: v.reason for v in rep.skips} == {
        "token_bn": SkipReason.LAYOUT,
        "tap_bn": SkipReason.OTHER_CONSUMERS,
        "moved_bn": SkipReason.LAYOUT,
    }
    assert rep.folded == 0


class _PadThenConv(torch.nn.Module):
    """BN -> F.pad (zeros, at run time, as timm's Conv2dSame) -> conv without padding of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.pad(self.bn(x), (1, 1, 1, 1)))


def test_pt2_bn_before_zeros_padded_at_run_time_is_left() -> None:
    from bnfold.fx import fold_exported
    from bnfold.records import SkipReason
    from models.stats import randomize_bn

    m = randomize_bn(_PadThenConv(), seed=3).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    out, rep = fold_exported(torch.export.export(m, (x,)))
    assert [(v.bn, v.reason) for v in rep.skips] == [("bn", SkipReason.PADDING)]
    assert "padded at run time" in rep.skips[0].detail
    with torch.no_grad():
        assert _err(out.module()(x), m(x)) <= FP32_ATOL

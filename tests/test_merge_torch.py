"""Branch merging for PyTorch modules (bnfold.fx.merge): re-parameterisable blocks become one conv.

Each block of models/reparam.py, with realistic BN statistics, is folded by ``bnfold.fold``; the result
must have as many conv modules as the block's own hand-written ``reparameterize()`` leaves, no BN, outputs
equal to the original's, the merged weights equal to the hand-written ones (to their rounding), and the
original model untouched. Refusals are built so that a merge would be wrong.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold.records import MergeReason  # noqa: E402
from models import reparam  # noqa: E402
from models.stats import randomize_bn  # noqa: E402
from models.testing import ATOL_F32, ATOL_F64  # noqa: E402

nn = torch.nn

# float32: the merged conv sums the branches' products in one accumulation instead of several plus an
# add: a few ulps of the output scale over a 3x3xC dot product.
TOL32 = ATOL_F32  # models.testing: the one tolerance table
TOL64 = ATOL_F64  # models.testing: the one tolerance table


class RepVGGStage(nn.Module):
    """A RepVGG-A stage: a strided block (no identity) then blocks with the identity BN, one grouped."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            reparam.RepVGGBlock(4, 8, stride=2),
            reparam.RepVGGBlock(8, 8),
            reparam.RepVGGBlock(8, 8, groups=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def reparameterize(self) -> None:
        for b in self.blocks:
            b.reparameterize()


class MobileOneS0Unit(nn.Module):
    """MobileOne-S0's unit: a depthwise block then a pointwise block."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = reparam.MobileOneBlock(c, c, 3, groups=c, branches=4)
        self.pw = reparam.MobileOneBlock(c, c, 1, branches=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))

    def reparameterize(self) -> None:
        self.dw.reparameterize()
        self.pw.reparameterize()


class RepViTLike(nn.Module):
    """A small RepViT-style network: stem conv+BN, two RepVGGDW mixers with a 1x1 conv+BN between."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = reparam.conv_bn(4, c, 3, 1, 1)
        self.mix1 = reparam.RepVGGDW(c)
        self.ffn = reparam.conv_bn(c, c, 1)
        self.act = nn.GELU()
        self.mix2 = reparam.RepVGGDW(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix2(self.act(self.ffn(self.mix1(self.stem(x)))))

    def reparameterize(self) -> None:
        self.mix1.reparameterize()
        self.mix2.reparameterize()
        self.stem = nn.Sequential(*self.stem)  # the stem's BN: folded by bnfold in both
        self.ffn = nn.Sequential(*self.ffn)


BLOCKS: dict[str, Any] = {
    "repvgg": lambda: reparam.RepVGGBlock(8, 8),
    "repvgg_groups": lambda: reparam.RepVGGBlock(8, 8, groups=4),
    "repvgg_stage": RepVGGStage,
    "mobileone_dw": lambda: reparam.MobileOneBlock(8, 8, 3, groups=8),
    "mobileone_pw_widen": lambda: reparam.MobileOneBlock(8, 16, 1),
    "mobileone_s0_unit": MobileOneS0Unit,
    "ppyoloe_alpha": lambda: reparam.PPYoloeRepVggBlock(8, 8),
    "repvit_bn_on_sum": lambda: reparam.RepVGGDW(8),
    "repvit_net": RepViTLike,
    "fastvit_repmixer": lambda: reparam.RepMixer(8),
    "dbb_avgpool": lambda: reparam.AvgBranchBlock(8),
    "dbb_four_branches": lambda: reparam.DBBLike(8),
    "acnet": lambda: reparam.ACBlock(4, 8),
}
_CIN4 = ("acnet", "repvgg_stage", "repvit_net")


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(BLOCKS[name](), seed=1).eval().to(dtype)
    x = torch.randn(
        2, 4 if name in _CIN4 else 8, 7, 7, generator=torch.Generator().manual_seed(2), dtype=dtype
    )
    return model, x


def hand_merged(model: nn.Module) -> nn.Module:
    """The block's own re-parameterisation, on a copy, then bnfold's BN fold only (no merge)."""
    hand = copy.deepcopy(model)
    hand.reparameterize()  # type: ignore[operator]
    return bnfold.fold(hand, merge_branches=False)


def convs(m: nn.Module) -> list[nn.Conv2d]:
    return [c for c in m.modules() if isinstance(c, nn.Conv2d)]


def bns(m: nn.Module) -> int:
    return sum(1 for c in m.modules() if isinstance(c, nn.modules.batchnorm._BatchNorm))


def snapshot(m: nn.Module) -> list[tuple[str, str, dict[str, Any], dict[str, torch.Tensor]]]:
    """Every submodule: name, type, plain attributes, and its own tensors (cloned)."""
    out = []
    for name, mod in m.named_modules():
        plain = {
            k: v for k, v in vars(mod).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)
        }
        tensors = {
            k: v.detach().clone()
            for k, v in [*mod._parameters.items(), *mod._buffers.items()]
            if v is not None
        }
        out.append((name, type(mod).__qualname__, plain, tensors))
    return out


def assert_same_snapshot(a: list[Any], b: list[Any]) -> None:
    assert [(n, t, p) for n, t, p, _ in a] == [(n, t, p) for n, t, p, _ in b]
    for (_, _, _, ta), (_, _, _, tb) in zip(a, b):
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def close(want: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    scale = float(want.abs().max())
    assert float((want - got).abs().max()) <= tol * max(scale, 1.0)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_merges_like_its_own_reparameterisation(name: str) -> None:
    model, x = build(name)
    before = snapshot(model)
    with torch.no_grad():
        want = model(x)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert_same_snapshot(before, snapshot(model))  # the original: same modules, attributes and tensors
    hand = hand_merged(model)
    assert len(convs(out)) == len(convs(hand)) == rep.convs_after <= rep.convs_before == len(convs(model))
    assert bns(out) == 0 and rep.bn_after == 0
    assert rep.merges and all(mg.merged for mg in rep.merges)
    with torch.no_grad():
        got, ref = out(x), hand(x)
    close(want, got, TOL32)
    close(want, ref, TOL32)  # the hand-written merge agrees too
    if name == "repvit_net":
        # mix1's BN on the sum folds backward into ffn's 1x1 conv (unpadded: exact) in bnfold's first
        # pass, where the hand-written merge puts it into mix1's conv: same function, other weights.
        return
    for a, b in pairs(out, hand):  # the same convs, the same weights (to float32 rounding)
        assert torch.allclose(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        assert (
            a.bias is not None and b.bias is not None and torch.allclose(a.bias, b.bias, rtol=1e-5, atol=1e-5)
        )


def pairs(out: nn.Module, hand: nn.Module) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
    """Each conv of the hand-merged model with the conv of ``out`` of the same geometry and closest weight."""
    left = convs(out)
    got = []
    for b in convs(hand):
        same = [
            a
            for a in left
            if (a.weight.shape, a.stride, a.padding, a.dilation, a.groups)
            == (b.weight.shape, b.stride, b.padding, b.dilation, b.groups)
        ]
        assert same, f"no conv like {b} in the merged model"
        a = min(
            same, key=lambda c: float((c.weight.detach().double() - b.weight.detach().double()).abs().max())
        )
        left.remove(a)
        got.append((a, b))
    assert not left
    return got


@pytest.mark.parametrize(
    "name",
    [
        "repvgg_stage",
        "mobileone_s0_unit",
        "repvit_bn_on_sum",
        "ppyoloe_alpha",
        "fastvit_repmixer",
        "dbb_four_branches",
    ],
)
def test_float64_merge_equals_the_original_and_the_hand_merge_to_rounding(name: str) -> None:
    model, x = build(name, torch.float64)
    with torch.no_grad():
        want = model(x)
    out = bnfold.fold(model, example_inputs=x)
    hand = hand_merged(model)
    assert bns(out) == 0 and len(convs(out)) == len(convs(hand))
    with torch.no_grad():
        close(want, out(x), TOL64)
    for a, b in pairs(out, hand):
        assert a.weight.dtype == torch.float64
        assert torch.allclose(a.weight, b.weight, rtol=1e-12, atol=1e-13)


def test_float16_model_merges() -> None:
    model, x = build("repvgg", torch.float64)
    half = copy.deepcopy(model).half()
    out = bnfold.fold(half, example_inputs=x.half())
    (conv,) = convs(out)
    assert conv.weight.dtype == torch.float16 and bns(out) == 0
    with torch.no_grad():
        want = half.double()(x)  # the float16 model's own parameters, computed exactly
        hand = hand_merged(copy.deepcopy(half))
        err = float((out.double()(x) - want).abs().max())
        err_hand = float((hand.double()(x) - want).abs().max())
    # the merged weights are float16 values: no further from the model than the hand-written fp16 merge
    assert err <= max(2 * err_hand, 1e-3 * float(want.abs().max()))


def test_merge_report_names_every_branch_and_the_absorbed_bn() -> None:
    model, x = build("repvgg")
    _, rep = bnfold.fold_with_report(model, example_inputs=x)
    (mg,) = rep.merges
    assert mg.merged and mg.convs_before == 2 and mg.convs_after == 1 and mg.branches_merged == 3
    assert sorted(b.branch for b in mg.branches) == ["rbr_1x1.0", "rbr_dense.0", "rbr_identity"]
    (identity_bn,) = [v for v in rep.sites if v.bn == "rbr_identity"]
    assert identity_bn.target == mg.target and "merged" in identity_bn.detail
    assert any("reparameterize()" in n for n in rep.notes)  # it exists; bnfold did not call it
    assert rep.to_dict()["merges"][0]["branches_merged"] == 3


def test_own_reparameterize_is_never_called() -> None:
    class Guarded(reparam.RepVGGBlock):
        def reparameterize(self) -> None:
            raise AssertionError("bnfold called the block's own reparameterize()")

        switch_to_deploy = fuse = reparameterize

    torch.manual_seed(0)
    model = randomize_bn(Guarded(8, 8), seed=1).eval()
    x = torch.randn(1, 8, 5, 5)
    out = bnfold.fold(model, example_inputs=x)
    assert len(convs(out)) == 1
    with torch.no_grad():
        close(model(x), out(x), TOL32)


def test_merge_branches_false_and_inplace_keep_the_branches() -> None:
    model, x = build("repvgg")
    out, rep = bnfold.fold_with_report(model, merge_branches=False)
    assert type(out) is reparam.RepVGGBlock and len(convs(out)) == 2 and bns(out) == 1 and rep.merges == ()
    work = copy.deepcopy(model)
    out2 = bnfold.fold(work, inplace=True)
    assert out2 is work and len(convs(work)) == 2


def test_inspect_predicts_the_merge_and_changes_nothing() -> None:
    model, x = build("repvit_bn_on_sum")
    before = snapshot(model)
    rep = bnfold.inspect(model, example_inputs=x)
    assert_same_snapshot(before, snapshot(model))
    _, real = bnfold.fold_with_report(model, example_inputs=x)
    assert rep.dry_run and rep.bn_after == real.bn_after == 0 and rep.convs_after == real.convs_after == 1
    assert [g.to_dict() for g in rep.merges] == [g.to_dict() for g in real.merges]


# ---- refusals ---------------------------------------------------------------------------------------


def reasons(rep: Any) -> dict[str, str]:
    return {b.branch: (b.reason.value if b.reason else "merged") for mg in rep.merges for b in mg.branches}


def check_refused(model: nn.Module, x: torch.Tensor, want: dict[str, str]) -> None:
    model = randomize_bn(model, seed=3).eval()
    n_convs = len(convs(model))
    with torch.no_grad():
        expect = model(x)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert reasons(rep) == want
    assert len(convs(out)) == n_convs and all(not mg.merged for mg in rep.merges)
    with torch.no_grad():
        got = out(x)
    if isinstance(expect, tuple):
        for a, b in zip(expect, got):
            close(a, b, TOL32)
    else:
        close(expect, got, TOL32)


def test_refused_branch_read_elsewhere() -> None:
    torch.manual_seed(0)
    check_refused(
        reparam.BranchReadElsewhere(8),
        torch.randn(2, 8, 6, 6),
        {"a.0": "no_partner", "b.0": "other_consumers"},
    )


def test_refused_activation_inside_a_branch() -> None:
    torch.manual_seed(0)
    check_refused(
        reparam.ActivationInBranch(8), torch.randn(2, 8, 6, 6), {"a.0": "no_partner", "b.0": "nonlinear"}
    )


class TwoConvs(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(
    ("b", "reason"),
    [
        (nn.Conv2d(8, 8, 3, 1, 2, dilation=2), "dilation"),
        (nn.Conv2d(8, 8, 3, 1, 1, groups=2), "groups"),
        (nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect"), "padding"),
        (nn.AvgPool2d(3, 1, 1, count_include_pad=False), "padding"),
        (nn.AvgPool2d(3, 1, 1, ceil_mode=True), "padding"),
    ],
)
def test_refused_branch_forms(b: nn.Module, reason: str) -> None:
    torch.manual_seed(0)
    check_refused(
        TwoConvs(nn.Conv2d(8, 8, 3, 1, 1), b), torch.randn(2, 8, 6, 6), {"a": "no_partner", "b": reason}
    )


def test_strided_sum_refuses_the_identity_branch_only() -> None:
    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, 1, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x) + x

    torch.manual_seed(0)
    model = Strided().eval()
    x = torch.randn(2, 8, 6, 6)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert reasons(rep) == {"a": "merged", "b": "merged", "x": "merged"}
    with torch.no_grad():
        close(model(x), out(x), TOL32)


def test_merged_result_keeps_other_leaves_and_hooks_refuse() -> None:
    class WithOther(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 6, 3, 1, 1)
            self.b = nn.Conv2d(4, 6, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + y + 0.5 * self.b(x)

    torch.manual_seed(0)
    model = WithOther().eval()
    x, y = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    out, rep = bnfold.fold_with_report(model, example_inputs=(x, y))
    assert reasons(rep) == {"a": "merged", "b": "merged"} and len(convs(out)) == 1
    with torch.no_grad():
        close(model(x, y), out(x, y), TOL32)
    hooked = copy.deepcopy(model)
    hooked.b.register_forward_hook(lambda m, i, o: o * 2)
    out, rep = bnfold.fold_with_report(hooked, example_inputs=(x, y))
    assert reasons(rep)["b"] == "unsupported" and len(convs(out)) == 2
    with torch.no_grad():
        close(hooked(x, y), out(x, y), TOL32)


def test_merge_reason_values_are_the_onnx_ones() -> None:
    assert {r.value for r in MergeReason} >= {"dilation", "groups", "padding", "other_consumers", "nonlinear"}


class InPlaceSum(nn.Module):
    """MobileOne's own forward accumulates with ``+=``; optionally ``x`` itself is changed in place after
    the branches read it (then the merged conv, placed at the sum, would read another x)."""

    def __init__(self, mutate_x: bool = False) -> None:
        super().__init__()
        self.a = reparam.conv_bn(8, 8, 3, 1, 1)
        self.b = reparam.conv_bn(8, 8, 1)
        self.mutate_x = mutate_x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.a(x)
        out += self.b(x)
        if self.mutate_x:
            x.mul_(2)
        return out, x


def test_in_place_accumulation_merges() -> None:
    torch.manual_seed(0)
    model = randomize_bn(InPlaceSum(), seed=1).eval()
    x = torch.randn(2, 8, 6, 6)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert reasons(rep) == {"a.0": "merged", "b.0": "merged"} and len(convs(out)) == 1
    with torch.no_grad():
        close(model(x.clone())[0], out(x.clone())[0], TOL32)


def test_input_changed_in_place_is_refused() -> None:
    torch.manual_seed(0)
    model = randomize_bn(InPlaceSum(mutate_x=True), seed=1).eval()
    x = torch.randn(2, 8, 6, 6)
    out, rep = bnfold.fold_with_report(model, example_inputs=x.clone())
    assert set(reasons(rep).values()) <= {"unsupported"} and len(convs(out)) == 2
    with torch.no_grad():
        close(model(x.clone())[0], out(x.clone())[0], TOL32)


def test_scale_of_another_dtype_is_refused() -> None:
    class Promoting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, 1, 1)
            self.b = nn.Conv2d(4, 4, 1)
            self.register_buffer("s", torch.linspace(0.5, 1.5, 4, dtype=torch.float64).reshape(4, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.s * self.b(x)  # float64 result: one float32 conv cannot give it

    torch.manual_seed(0)
    model = Promoting().eval()
    x = torch.randn(1, 4, 5, 5)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert reasons(rep) == {"a": "no_partner", "b": "unsupported"}
    with torch.no_grad():
        want, got = model(x), out(x)
    assert got.dtype == want.dtype == torch.float64 and torch.equal(want, got)


@pytest.mark.parametrize("merge", [True, False])
def test_export_onnx_passes_merge_branches(tmp_path: Any, merge: bool) -> None:
    import onnx

    model, x = build("repvgg")
    before = snapshot(model)
    path = tmp_path / "m.onnx"
    rep = bnfold.export_onnx(model, x, str(path), merge_branches=merge)  # verified in onnxruntime
    assert_same_snapshot(before, snapshot(model))
    g = onnx.load(str(path)).graph
    n_conv = sum(1 for n in g.node if n.op_type == "Conv")
    n_bn = sum(1 for n in g.node if n.op_type == "BatchNormalization")
    assert rep.verification is not None and rep.verification.passed
    if merge:
        assert n_conv == 1 and n_bn == 0 and rep.merges and all(m.merged for m in rep.merges)
    else:
        assert n_conv == 2 and rep.merges == ()


def test_merged_module_saves_and_loads(tmp_path: Any) -> None:
    # models/reparam.py annotates forward with strings (from __future__ import annotations)
    model, x = build("repvgg")
    out = bnfold.fold(model, example_inputs=x)
    torch.save(out, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(x), out(x))


def test_sequence_with_a_wider_middle_merges() -> None:
    # DBB's 1x1 -> kxk branch with 6 middle channels between 4 in and 5 out; the kxk is the first branch
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Conv2d(4, 6, 1, bias=False)
            self.k = reparam.conv_bn(6, 5, 3, 1, 1)
            self.one = reparam.conv_bn(4, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.k(self.p(x)) + self.one(x)

    torch.manual_seed(0)
    model = randomize_bn(Seq(), seed=1).eval()
    x = torch.randn(2, 4, 6, 6)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert reasons(rep) == {"k.0": "merged", "one.0": "merged"} and len(convs(out)) == 1
    with torch.no_grad():
        close(model(x), out(x), TOL32)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, on the model
@pytest.mark.parametrize(("k_big", "k_small"), [(3, 1), (4, 2), (4, 1), (3, 2)])
def test_padding_same_branches(k_big: int, k_small: int) -> None:
    # padding="same" pads k-1 per axis, the odd one at the end: any two such kernels fall on the same taps
    # (even ones included), and the merged conv keeps padding="same"
    torch.manual_seed(0)
    model = TwoConvs(nn.Conv2d(4, 4, k_big, padding="same"), nn.Conv2d(4, 4, k_small, padding="same")).eval()
    x = torch.randn(2, 4, 7, 6)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert reasons(rep) == {"a": "merged", "b": "merged"}
    (conv,) = convs(out)
    assert conv.kernel_size == (k_big, k_big)
    with torch.no_grad():
        close(model(x), out(x), TOL32)
        y = torch.randn(1, 4, 9, 4)  # another size: the same output (the pads do not depend on it)
        close(model(y), out(y), TOL32)


def test_builtin_sum_and_torch_add_merge() -> None:
    class Sums(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(
                [reparam.conv_bn(6, 6, 3, 1, 1), reparam.conv_bn(6, 6, 1), nn.BatchNorm2d(6)]
            )
            self.extra = reparam.conv_bn(6, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.add(sum(b(x) for b in self.branches), torch.sub(self.extra(x), x))

    torch.manual_seed(0)
    model = randomize_bn(Sums(), seed=2).eval()
    x = torch.randn(2, 6, 5, 5)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert set(reasons(rep).values()) == {"merged"} and len(reasons(rep)) == 5
    assert len(convs(out)) == 1 and bns(out) == 0 and rep.bn_after == 0
    with torch.no_grad():
        close(model(x), out(x), TOL32)


@pytest.mark.parametrize("name", ["repvgg", "mobileone_dw", "repvit_bn_on_sum", "ppyoloe_alpha"])
def test_float16_merge_is_the_float64_merge_rounded_once(name: str) -> None:
    """A float16 model's merged conv is the block's own merge computed in float64 from the float16
    parameters (conv weights and BN statistics, also a BN on the sum), rounded once: bit for bit or within
    one float16 ulp (the float64 sums may differ in their order), nearly all bit for bit. Summing the
    folded float16 weights instead rounds twice and is off by more."""
    m16, x = build(name, torch.float16)
    (ref,) = convs(hand_merged(copy.deepcopy(m16).double()))  # the hand formula on the same values, float64
    assert ref.bias is not None
    out = bnfold.fold(m16, example_inputs=x)
    (conv,) = convs(out)
    assert bns(out) == 0 and conv.bias is not None
    for got, want64 in ((conv.weight.detach(), ref.weight.detach()), (conv.bias.detach(), ref.bias.detach())):
        want = want64.to(torch.float16)
        ulp = torch.from_numpy(np.spacing(np.abs(want.numpy()))).double()
        assert ((got.double() - want.double()).abs() <= ulp).all()
        assert (got != want).sum() <= got.numel() // 20


def test_pytorch_file_bisection_leaves_the_failing_merge_and_keeps_the_rest(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bnfold fold --model x.pt``: a merge whose verification fails is left (its branches folded, not
    merged), the other merge kept. The verification fails exactly when the second block is merged (the real
    comparison is tested elsewhere; here the wiring)."""
    from test_verify_culprit import _report

    from bnfold.files import FoldSettings, InputSettings, LoadSettings, fold_file
    from bnfold.files import fold as fold_job
    from bnfold.files import fold_torch as fold_torch_job
    from bnfold.records import VerifyReport

    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(reparam.RepVGGBlock(8, 8), reparam.RepVGGBlock(8, 8)), seed=2).eval()
    src, out = tmp_path / "two.pt", tmp_path / "out.pt"
    torch.save(model, src)
    before = src.read_bytes()
    seen: list[bool] = []

    def second_merged(m: nn.Module) -> bool:
        return any(name.startswith("1_") and name.endswith("_merged") for name, _ in m.named_modules())

    def fake_verify(reference: nn.Module, candidate: nn.Module, *a: object, **k: object) -> VerifyReport:
        assert bns(reference) == 6  # the reference is never the folded model
        seen.append(second_merged(candidate))
        return _report(passed=not seen[-1])

    monkeypatch.setattr(fold_job, "run_verify", fake_verify)
    monkeypatch.setattr(fold_torch_job, "run_verify", fake_verify)
    rep = fold_file(
        src, out, FoldSettings(load=LoadSettings(trust_pickle=True), inputs=InputSettings(["x=2x8x7x7"]))
    )
    assert seen[0] and len(seen) >= 2  # the full fold failed, then the bisection
    assert rep.verification is not None and rep.verification.passed
    done = {m.sum: m for m in rep.merges}
    assert sum(m.merged for m in done.values()) == 1
    (left,) = [m for m in done.values() if not m.merged]
    assert {b.reason for b in left.branches} == {MergeReason.VERIFICATION}
    written = torch.load(out, weights_only=False)
    assert not second_merged(written) and len(convs(written)) == 3
    assert src.read_bytes() == before
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        close(model(x), written(x), TOL32)

"""bnfold.nn.BatchNorm* against torch.nn.BatchNorm*: same outputs, gradients and running statistics.

The reference is torch's layer *run* on the same inputs from the same state_dict.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import bnfold.nn as bnn
from bnfold.nn import kernel
from models.stats import randomize_bn

# float32: the batch statistics are reductions over up to a few hundred values, summed in a different
# order than torch's kernel; a few ulps of the tensor's scale (its largest magnitude) remain.
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}
STEPS = 5

PAIRS = {
    "1d-2D": (nn.BatchNorm1d, bnn.BatchNorm1d, (6, 4)),
    "1d-3D": (nn.BatchNorm1d, bnn.BatchNorm1d, (5, 4, 7)),
    "2d": (nn.BatchNorm2d, bnn.BatchNorm2d, (4, 3, 5, 6)),
    "3d": (nn.BatchNorm3d, bnn.BatchNorm3d, (3, 3, 4, 3, 5)),
}


def _close(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is not None and b is not None:
        scale = max(1.0, float(a.detach().abs().max())) if a.numel() else 1.0
        torch.testing.assert_close(
            b, a, atol=ATOL[dtype] * scale, rtol=RTOL[dtype], msg=lambda m: f"{what}: {m}"
        )


def _pair(kind: str, dtype: torch.dtype, **kw: object) -> tuple[nn.Module, nn.Module]:
    ref_cls, our_cls, shape = PAIRS[kind]
    ref = ref_cls(shape[1], dtype=dtype, **kw)
    randomize_bn(ref, seed=3)
    ours = our_cls(shape[1], dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int, channels_last: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # offset and spread differ per step so the running statistics move
    x = torch.randn(shape, generator=g, dtype=dtype) * (1.0 + seed) + 0.5 * seed
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


CASES = [
    (kind, affine, track, momentum, dtype, cl)
    for kind, affine, track, momentum, dtype, cl in itertools.product(
        PAIRS, [True, False], [True, False], [0.1, None], [torch.float32, torch.float64], [False, True]
    )
    if not (cl and kind.startswith("1d"))
]


@pytest.mark.parametrize("kind,affine,track,momentum,dtype,channels_last", CASES)
def test_training_and_eval_match_torch(
    kind: str, affine: bool, track: bool, momentum: float | None, dtype: torch.dtype, channels_last: bool
) -> None:
    ref, ours = _pair(kind, dtype, affine=affine, track_running_stats=track, momentum=momentum)
    shape = PAIRS[kind][2]
    for step in range(STEPS):
        x = _inputs(shape, dtype, step, channels_last)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(100 + step), dtype=dtype)
        if channels_last:
            g = g.to(memory_format=torch.channels_last if g.dim() == 4 else torch.channels_last_3d)
        ref.zero_grad()
        ours.zero_grad()
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        yr.backward(g)
        yo.backward(g)
        _close(yr, yo, dtype, f"step {step} output")
        _close(xr.grad, xo.grad, dtype, f"step {step} input grad")
        if affine:
            _close(ref.weight.grad, ours.weight.grad, dtype, "weight grad")
            _close(ref.bias.grad, ours.bias.grad, dtype, "bias grad")
        _close(ref.running_mean, ours.running_mean, dtype, "running_mean")
        _close(ref.running_var, ours.running_var, dtype, "running_var")
        if track:
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1000 + step + 1
        if channels_last:
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert yo.is_contiguous(memory_format=fmt)
            assert xo.grad is not None and xo.grad.is_contiguous(memory_format=fmt)
    ref.eval()
    ours.eval()
    x = _inputs(shape, dtype, 7, channels_last)
    _close(ref(x), ours(x), dtype, "eval output")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_every_memory_layout_matches_torch(layout: str) -> None:
    """The kernel picks its passes by layout (bmm dot when contiguous); all of them match torch."""
    ref, ours = _pair("2d", torch.float64)
    x = _inputs((5, 3, 4, 4), torch.float64, 2, layout == "channels_last")
    g = _inputs((5, 3, 4, 4), torch.float64, 9, layout == "channels_last")
    base = _inputs((5, 3, 4, 8), torch.float64, 2, False) if layout == "strided" else x
    br, bo = base.clone().requires_grad_(), base.clone().requires_grad_()
    xr, xo = br, bo
    if layout == "strided":  # a non-contiguous view of a bigger tensor, g in yet another layout
        xr, xo = br[..., ::2], bo[..., ::2]
        g = g.to(memory_format=torch.channels_last)
        assert not xo.is_contiguous() and not xo.is_contiguous(memory_format=torch.channels_last)
    yr, yo = ref(xr), ours(xo)
    yr.backward(g)
    yo.backward(g)
    _close(yr, yo, torch.float64, "output")
    _close(br.grad, bo.grad, torch.float64, "input grad")
    _close(ref.weight.grad, ours.weight.grad, torch.float64, "weight grad")
    _close(ref.running_var, ours.running_var, torch.float64, "running_var")


def test_large_mean_small_spread_float32() -> None:
    """|mean| = 1e3 std: a one-pass E[x^2] - E[x]^2 would lose every digit; the centred passes do not.

    Reference: torch's layer in float64. bnfold's float32 error stays within a small factor of torch's
    own float32 error (the input itself only carries ~1e-4 of the spread in float32).
    """
    errors = {"torch": [0.0, 0.0], "bnfold": [0.0, 0.0]}
    for seed in range(3):
        ref, ours = _pair("2d", torch.float32)
        exact = nn.BatchNorm2d(3, dtype=torch.float64)
        exact.load_state_dict(ref.state_dict())
        x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 0.01 + 10.0
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + seed))
        x64 = x.double().requires_grad_()
        y64 = exact(x64)
        y64.backward(g.double())
        for name, m in (("torch", ref), ("bnfold", ours)):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(g)
            errors[name][0] = max(errors[name][0], float((y.detach().double() - y64.detach()).abs().max()))
            errors[name][1] = max(errors[name][1], float((xi.grad.double() - x64.grad).abs().max()))
    assert errors["bnfold"][0] <= 4 * errors["torch"][0] + 1e-6, errors
    assert errors["bnfold"][1] <= 4 * errors["torch"][1] + 1e-6, errors
    # and far from catastrophic: the outputs are O(1), the input gradients O(100)
    assert errors["bnfold"][0] < 1e-3 and errors["bnfold"][1] < 5e-2, errors


@pytest.mark.parametrize("offset", [0.0, 3.5, 4.5, 30.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_and_centred_paths_match_torch(offset: float, channels_last: bool) -> None:
    """|mean| / std below FAST_MEAN_RATIO takes the one-pass sums, above it the centred ones."""
    ref, ours = _pair("2d", torch.float32)
    gen = torch.Generator().manual_seed(int(offset * 10))
    x = torch.randn(6, 3, 5, 5, generator=gen) + offset
    g = torch.randn(6, 3, 5, 5, generator=gen)
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    yr.backward(g)
    yo.backward(g)
    # the float32 inputs carry |offset| * 2^-24 of absolute rounding: scale the tolerance with it
    tol = max(1.0, offset / 4)
    torch.testing.assert_close(yo, yr, atol=ATOL[torch.float32] * tol, rtol=RTOL[torch.float32] * tol)
    _close(xr.grad, xo.grad, torch.float32, "input grad")
    _close(ref.weight.grad, ours.weight.grad, torch.float32, "weight grad")
    _close(ref.running_var, ours.running_var, torch.float32, "running_var")


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return kernel.BatchNormFunction.apply(x, w, b, 1e-5)[0]  # type: ignore[no-any-return]

    assert torch.autograd.gradcheck(f, (x, w, b))
    x4 = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: kernel.BatchNormFunction.apply(x, None, None, 1e-3)[0], (x4,))


def test_double_backward_raises_clear_error() -> None:
    m = bnn.BatchNorm1d(3, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@pytest.mark.parametrize(
    "kind,shape",
    [("1d-2D", (1, 4)), ("1d-3D", (1, 4, 1)), ("2d", (1, 3, 1, 1)), ("3d", (1, 3, 1, 1, 1))],
)
def test_one_value_per_channel_raises_like_torch(kind: str, shape: tuple[int, ...]) -> None:
    ref_cls, our_cls, _ = PAIRS[kind]
    x = torch.randn(shape)
    with pytest.raises(ValueError) as ref_err:
        ref_cls(shape[1])(x)
    with pytest.raises(ValueError) as our_err:
        our_cls(shape[1])(x)
    assert str(our_err.value) == str(ref_err.value)
    # eval with running statistics is defined for a single value, as in torch
    torch.testing.assert_close(our_cls(shape[1]).eval()(x), ref_cls(shape[1]).eval()(x))


def test_batch_size_one_with_spatial_extent_matches_torch() -> None:
    ref, ours = _pair("2d", torch.float64)
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    _close(ref(x), ours(x), torch.float64, "output")
    _close(ref.running_var, ours.running_var, torch.float64, "running_var")


def test_wrong_rank_raises_like_torch() -> None:
    with pytest.raises(ValueError, match="expected 4D input"):
        bnn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        bnn.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_state_dict_keys_identical_and_cross_loadable(kind: str) -> None:
    ref, ours = _pair(kind, torch.float32)
    assert list(ref.state_dict()) == list(ours.state_dict())
    fresh_torch = PAIRS[kind][0](PAIRS[kind][2][1])
    fresh_torch.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh_torch.state_dict()[k], v), k
    # old checkpoint (version < 2) without num_batches_tracked: loads with 0, as torch does
    old = {k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"}
    old_sd = type(ref.state_dict())(old)
    old_sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    fresh_ours = PAIRS[kind][1](PAIRS[kind][2][1])
    fresh_ours.load_state_dict(old_sd)
    assert int(fresh_ours.num_batches_tracked) == 0
    torch.testing.assert_close(fresh_ours.running_var, ref.running_var)


def test_bias_false_and_repr_match_torch() -> None:
    ref = nn.BatchNorm2d(3, bias=False)
    ours = bnn.BatchNorm2d(3, bias=False)
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    with torch.no_grad():  # randomize_bn expects a bias; set statistics and gamma by hand
        ref.weight.uniform_(0.5, 1.5)
        ref.running_mean.uniform_(-0.5, 0.5)
        ref.running_var.uniform_(0.25, 2.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 2, 2)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).sum().backward()
    ours(xo).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_bfloat16_input_close_to_torch() -> None:
    ref, ours = _pair("2d", torch.float32)
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    yr, yo = ref(x), ours(x)
    assert yo.dtype == yr.dtype == torch.bfloat16
    # bfloat16 has 8 bits of mantissa: one rounding of an O(1) output is <= 2^-8
    torch.testing.assert_close(yo.float(), yr.float(), atol=1e-2, rtol=1e-2)


def test_saved_tensors_no_larger_than_torch() -> None:
    """Memory: what backward keeps alive is no more than torch's native kernel keeps."""

    def saved_bytes(m: nn.Module) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(8, 16, 10, 10, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        return sum(seen.values())

    assert saved_bytes(bnn.BatchNorm2d(16)) <= saved_bytes(nn.BatchNorm2d(16))


@pytest.mark.parametrize("shape", [(0, 4), (0, 3, 4, 4)])
def test_empty_batch_matches_torch(shape: tuple[int, ...]) -> None:
    kind = "1d-2D" if len(shape) == 2 else "2d"
    ref, ours = _pair(kind, torch.float32)
    xr, xo = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    yr, yo = ref(xr), ours(xo)
    assert yo.shape == yr.shape
    yr.sum().backward()
    yo.sum().backward()
    _close(ref.running_mean, ours.running_mean, torch.float32, "running_mean")
    _close(ref.running_var, ours.running_var, torch.float32, "running_var")
    _close(ref.weight.grad, ours.weight.grad, torch.float32, "weight grad")
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)

"""The one blocked weight product (``fold_math.scale_cast`` / ``fold_forward_cast``) against the reference
it replaces: the whole weight multiplied in float64, then rounded once with ``cast_exact``.

Bit for bit over float16, bfloat16, float32 and float64 results, single-block, multi-block and threaded
sizes, per-row and broadcast factors (grouped ConvTranspose), and whatever the number of threads.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bnfold.fold_math import (
    Scratch,
    WeightLayout,
    blocked,
    bn_affine,
    cast_exact,
    channel_factor,
    fold_backward,
    fold_forward,
    fold_forward_cast,
    fold_gemm_forward,
    scale_cast,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)]
# (shape, layout): one block; several blocks; above the threading threshold (2**18 elements)
CASES = [
    ((6, 3, 3, 3), WeightLayout.conv()),
    ((96, 64, 3, 3), WeightLayout.conv(4)),
    ((8, 6, 5, 5), WeightLayout.conv_transpose(2)),
    ((520, 64, 3, 3), WeightLayout.conv()),
    ((256, 72, 4, 4), WeightLayout.conv_transpose(8)),
    ((300, 17), WeightLayout.matmul()),
]


def _stats(c: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    gamma = rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.1, -1.0, 1.0)
    return bn_affine(
        gamma, rng.uniform(-0.5, 0.5, c), rng.uniform(-0.5, 0.5, c), np.exp(rng.uniform(-1.4, 0.9, c)), 1e-5
    )


def _reference(w: np.ndarray, fac: np.ndarray, dt: np.dtype) -> np.ndarray:
    return cast_exact(w.astype(np.float64) * fac, dt)


def _out_channels(shape: tuple[int, ...], layout: WeightLayout) -> int:
    ax = layout.out_axis % len(shape)
    return shape[ax] * (layout.groups if layout.transposed else 1)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,layout", CASES, ids=[str(s) for s, _ in CASES])
def test_scale_cast_is_the_reference_bit_for_bit(
    dt: np.dtype, shape: tuple[int, ...], layout: WeightLayout
) -> None:
    rng = np.random.default_rng(len(shape) * 7 + shape[0])
    w = (rng.standard_normal(shape) * 0.3).astype(np.float32 if dt.itemsize >= 4 else dt)
    s, _ = _stats(_out_channels(shape, layout), rng)
    fac = channel_factor(s, shape, layout, "out")
    got, finite = scale_cast(w, fac, dt)
    ref = _reference(w, fac, dt)
    assert got.dtype == dt and finite
    assert got.tobytes() == ref.tobytes()


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: d.name)
def test_fold_forward_cast_equals_fold_forward_then_cast(dt: np.dtype) -> None:
    rng = np.random.default_rng(3)
    for shape, layout in CASES:
        w = (rng.standard_normal(shape) * 0.3).astype(dt)
        c = _out_channels(shape, layout)
        s, t = _stats(c, rng)
        for bias in (None, rng.standard_normal(c).astype(dt)):
            w_new, b_new, finite = fold_forward_cast(w, bias, s, t, layout)
            w64 = w.astype(np.float64) * channel_factor(s, shape, layout, "out")
            b64 = (np.zeros(c) if bias is None else bias.astype(np.float64)) * s + t
            assert finite
            assert w_new.tobytes() == cast_exact(w64, dt).tobytes()
            assert b_new.tobytes() == cast_exact(b64, dt).tobytes()
            # the float64 route is the plain product, unrounded
            f64_w, f64_b = fold_forward(w, bias, s, t, layout)
            assert f64_w.dtype == np.float64 and f64_w.tobytes() == w64.tobytes()
            assert f64_b.tobytes() == b64.tobytes()


def test_threads_do_not_change_a_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((600, 64, 3, 3)).astype(np.float32)
    fac = channel_factor(_stats(600, rng)[0], w.shape, WeightLayout.conv(), "out")
    results = []
    for workers in (1, 2, 4):
        monkeypatch.setattr(blocked, "_workers", lambda n=workers: n)
        for dt in (np.float16, BF16, np.float32):
            results.append((workers, np.dtype(dt).name, scale_cast(w, fac, dt)[0].tobytes()))
    for dt in ("float16", "bfloat16", "float32"):
        got = {r for k, d, r in results if d == dt}
        assert len(got) == 1, dt


@pytest.mark.parametrize("dt", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_overflow_is_reported_not_hidden(dt: np.dtype) -> None:
    w = np.full((400, 32, 3, 3), 60000.0 if dt == np.float16 else 3e38, np.float32)
    s = np.ones(400)
    s[123] = 4.0
    fac = channel_factor(s, w.shape, WeightLayout.conv(), "out")
    got, finite = scale_cast(w, fac, dt)
    assert not finite and not np.isfinite(got[123].astype(np.float64)).all()
    _, _, finite2 = fold_forward_cast(w.astype(np.float32), None, s, np.zeros(400), WeightLayout.conv(), dt)
    assert not finite2


def test_scratch_buffer_reuse_gives_the_same_result() -> None:
    rng = np.random.default_rng(9)
    sc = Scratch()
    outs = []
    for shape in ((64, 32, 3, 3), (16, 8, 1, 1), (64, 32, 3, 3)):
        w = rng.standard_normal(shape).astype(np.float32)
        fac = channel_factor(_stats(shape[0], rng)[0], shape, WeightLayout.conv(), "out")
        got, _ = scale_cast(w, fac, np.float32, out=sc.get(shape, np.float32))
        assert got.tobytes() == _reference(w, fac, np.dtype(np.float32)).tobytes()
        outs.append(got.tobytes())
    assert outs[0] != outs[2]  # the second use of the buffer really rewrote it


def test_backward_and_gemm_go_through_the_same_product() -> None:
    rng = np.random.default_rng(11)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    s, t = _stats(6, rng)
    w_new, b_new = fold_backward(w, None, s, t, WeightLayout.conv())
    lay = WeightLayout.conv()
    assert w_new.tobytes() == (w.astype(np.float64) * channel_factor(s, w.shape, lay, "in")).tobytes()
    contrib = w.astype(np.float64) * channel_factor(t, w.shape, lay, "in")
    assert b_new.tobytes() == contrib.reshape(8, -1).sum(axis=1).tobytes()
    b = rng.standard_normal((6, 5)).astype(np.float32)
    s5, t5 = _stats(5, rng)
    b_fold, c_fold = fold_gemm_forward(b, None, 1.0, 1.0, s5, t5, False)
    assert b_fold.tobytes() == (b.astype(np.float64) * s5[None, :]).tobytes()

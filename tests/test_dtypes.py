"""The torch <-> NumPy bridge (bnfold.dtypes): exact both ways, bfloat16 included, one rounding from float64."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from bnfold.dtypes import (
    from_float64,
    from_numpy,
    is_bfloat16,
    is_floating,
    numpy_dtype,
    to_float64,
    to_numpy,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_keeps_every_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, generator=g) * 100).to(dtype)
    a = to_numpy(t)
    assert a.dtype == numpy_dtype(dtype) and a.shape == (3, 5)
    back = from_numpy(a)
    assert back.dtype == dtype
    assert torch.equal(
        back.view(torch.uint8) if dtype != torch.bool else back,
        t.view(torch.uint8) if dtype != torch.bool else t,
    )
    if dtype.is_floating_point:
        assert np.array_equal(a.astype(np.float64), t.double().numpy())  # the values, read as numbers


def test_bfloat16_is_ml_dtypes_and_floating() -> None:
    assert numpy_dtype(torch.bfloat16) == np.dtype(ml_dtypes.bfloat16)
    assert is_bfloat16(ml_dtypes.bfloat16) and not is_bfloat16(np.float16)
    assert is_floating(ml_dtypes.bfloat16) and is_floating(np.float16) and not is_floating(np.int32)


def test_from_float64_rounds_once_to_bfloat16() -> None:
    # 1 + 2^-8 + 2^-30 lies just above the midpoint of the bfloat16 neighbours 1 and 1 + 2^-7: the
    # nearest is 1 + 2^-7. Rounding through float32 first lands on the midpoint (2^-30 is below
    # float32's ulp) and then ties to even, 1.0: the double rounding this must avoid.
    x = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 3.0], np.float64)
    t = from_float64(x, torch.bfloat16)
    assert t.dtype == torch.bfloat16
    assert t.double().tolist() == [1 + 2**-7, -(1 + 2**-7), 3.0]
    assert torch.tensor(x).float().to(torch.bfloat16).double().tolist()[0] == 1.0  # the naive path is off


def test_to_float64_is_exact_and_keeps_none() -> None:
    t = torch.tensor([0.1, 1e-40, 3e38], dtype=torch.float32)
    assert to_float64(None) is None
    got = to_float64(t)
    assert got.dtype == np.float64 and np.array_equal(got, t.numpy().astype(np.float64))

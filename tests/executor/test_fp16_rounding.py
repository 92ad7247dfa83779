"""The executor's bit-level fp16 rounding against numpy's float16 conversion (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_coreml.executor._fp16 import round_to_fp16


def _same_bits(got: np.ndarray, x: np.ndarray) -> None:
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def _round(x: np.ndarray, inplace: bool) -> np.ndarray:
    """round_to_fp16 on a private copy when in place (the oracle still reads ``x``)."""
    if not inplace:
        before = x.copy()
        got = round_to_fp16(x)
        np.testing.assert_array_equal(x.view(np.uint32), before.view(np.uint32))  # input untouched
        return got
    work = x.copy()
    got = round_to_fp16(work, inplace=True)
    assert got is work
    return got


@pytest.mark.parametrize("inplace", [False, True])
def test_edge_values_mixed_with_subnormals(inplace: bool) -> None:
    """Edge values where the subnormal pass runs: -0.0 and signs must survive it."""
    x = np.tile(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 2**-25, 2**-24 * 2.5,
                          1 + 2**-11, 1 + 3 * 2**-11, -(2**-24) * 0.5, -(2**-24) * 1.5, 2**-14 * (1 - 2**-12)],
                         np.float32), 5000)
    _same_bits(_round(x, inplace), x)


def test_inplace_refuses_views_and_other_dtypes() -> None:
    """inplace=True only reuses a contiguous float32 array that owns its memory."""
    base = np.full(8, 1 + 2**-12, np.float32)
    view = base[::2]
    got = round_to_fp16(view, inplace=True)
    assert got is not view and np.all(base == np.float32(1 + 2**-12)) and np.all(got == 1.0)
    x64 = np.full(4, 1 + 2**-12)
    got64 = round_to_fp16(x64, inplace=True)
    assert got64.dtype == np.float32 and x64[0] == 1 + 2**-12


@pytest.mark.parametrize("inplace", [False, True])
def test_edge_values(inplace: bool) -> None:
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 65535, 1e9, -65520,
                  2**-14, 2**-14 * 0.99, 2**-25, 2**-24 * 1.5, 2**-24 * 2.5, 1 + 2**-11, 1 + 3 * 2**-11,
                  2**-26, -(2**-24) * 0.5, 3.4e38], np.float32)
    _same_bits(_round(x, inplace), x)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("scale", [1e-7, 1e-4, 1.0, 300.0, 3e4, 1e5])
def test_random_values(scale: float, inplace: bool) -> None:
    x = (np.random.default_rng(1).standard_normal(200_000) * scale).astype(np.float32)
    _same_bits(_round(x, inplace), x)


@pytest.mark.parametrize("inplace", [False, True])
def test_random_bit_patterns(inplace: bool) -> None:
    bits = np.random.default_rng(2).integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    _same_bits(_round(x, inplace), x)


def test_every_fp16_boundary() -> None:
    """Every fp16 value, the midpoints between neighbours and one float32 ulp either side of them:
    all the places where rounding half to even, carries and the subnormal grid decide."""
    h = np.arange(0, 0x7C01, dtype=np.uint16).view(np.float16).astype(np.float32)  # 0 .. inf
    mid = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)  # exact in float32
    pts = np.concatenate([h, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))])
    x = np.concatenate([pts, -pts])
    for inplace in (False, True):
        _same_bits(_round(x, inplace), x)

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


def test_edge_values_large_path() -> None:
    """The bit-arithmetic path (large arrays): edge values tiled past the small-array cut-off."""
    x = np.tile(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 2**-25, 2**-24 * 2.5,
                          1 + 2**-11, 1 + 3 * 2**-11, -(2**-24) * 0.5], np.float32), 5000)
    _same_bits(round_to_fp16(x), x)


def test_edge_values() -> None:
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 65535, 1e9, -65520,
                  2**-14, 2**-14 * 0.99, 2**-25, 2**-24 * 1.5, 2**-24 * 2.5, 1 + 2**-11, 1 + 3 * 2**-11,
                  2**-26, -(2**-24) * 0.5, 3.4e38], np.float32)
    _same_bits(round_to_fp16(x), x)


@pytest.mark.parametrize("scale", [1e-7, 1e-4, 1.0, 300.0, 3e4, 1e5])
def test_random_values(scale: float) -> None:
    x = (np.random.default_rng(1).standard_normal(200_000) * scale).astype(np.float32)
    _same_bits(round_to_fp16(x), x)


def test_random_bit_patterns() -> None:
    bits = np.random.default_rng(2).integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    _same_bits(round_to_fp16(x), x)

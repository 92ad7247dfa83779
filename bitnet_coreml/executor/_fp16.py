"""Round float32 values to the nearest fp16 value, keeping them in float32 containers.

numpy's float32 -> float16 -> float32 round trip costs ~10 ns per element (no vectorised F16C path),
a hundred times an add; the executor rounds every fp16-typed op result, so it does the rounding with
integer arithmetic on the float32 bits instead: round-half-to-even to 10 mantissa bits, fp16's
subnormal grid (2**-24) below 2**-14, and +-inf above the largest finite fp16 (65504). The result is
bit-for-bit the fp16 value (tests compare it with ``astype(float16)`` on edge cases and random data).
"""

from __future__ import annotations

import numpy as np

F16_MIN_NORMAL = np.float32(2.0**-14)
F16_MAX = np.float32(65504.0)
_HALF_ULP = np.uint32(0xFFF)
_ONE = np.uint32(1)
_SHIFT = np.uint32(13)
_MASK = np.uint32(0xFFFFE000)
_SUBNORMAL_SCALE = np.float32(2.0**24)


# Below this size the fixed cost of the ~10 numpy calls here exceeds numpy's own conversion.
_SMALL = 4096


def round_to_fp16(x: np.ndarray) -> np.ndarray:
    """A new float32 array holding ``x`` rounded to fp16 (as ``x.astype(float16).astype(float32)``)."""
    if x.size <= _SMALL:
        return np.asarray(x).astype(np.float16).astype(np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    r = (u >> _SHIFT) & _ONE
    r += _HALF_ULP
    r += u
    r &= _MASK
    out = r.view(np.float32)
    nan = np.isnan(x)
    if nan.any():  # carries can turn a NaN payload into another value; NaN stays NaN in fp16
        out[nan] = np.nan
    a = np.abs(x)
    big = a > F16_MAX
    if big.any():  # anything that rounded past 65504 is inf in fp16 (65504 < x < 65520 rounds down)
        over = np.abs(out) > F16_MAX
        out[over] = np.copysign(np.float32(np.inf), x[over])
    small = a < F16_MIN_NORMAL
    small &= a != 0  # zeros (every relu output has many) are already exact
    if small.any():  # fp16 subnormals: a fixed grid of 2**-24, round half to even
        out[small] = np.round(x[small] * _SUBNORMAL_SCALE) / _SUBNORMAL_SCALE
    return out

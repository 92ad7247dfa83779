"""Round float32 values to the nearest fp16 value, keeping them in float32 containers.

The executor rounds the result of every fp16-typed op, so this is its hottest loop. numpy's
float32 -> float16 -> float32 round trip costs ~4 ns per element (no vectorised path) and a numpy
bit-arithmetic version needs ~10 passes over memory; a numba-compiled loop does it in one pass,
in place when the op's result is a fresh array (~10x faster than either).

Per element, on the float32 bits: round half to even to fp16's 10 mantissa bits; fp16's subnormal
grid (2**-24) below 2**-14; +-inf from 65520 up (65504 is the largest finite fp16); inf and NaN kept.
The result is bit-for-bit ``x.astype(float16).astype(float32)`` (tests compare them on edge values,
random data and random bit patterns).
"""

from __future__ import annotations

import numba
import numpy as np

# Two branch-free loops (LLVM vectorises them): the first rounds everything in fp16's normal range on
# the bits and counts the values in its subnormal range, which it leaves alone; the second (only when
# there are any) rounds those in float arithmetic.


@numba.njit(inline="always")
def _normal_bits(u: np.uint32) -> tuple[np.uint32, int]:  # pragma: no cover - compiled
    """fp16's normal range rounded half to even to 10 mantissa bits, >= 65520 to +-inf, inf/NaN and
    |x| < 2**-14 unchanged; second value 1 for a non-zero |x| < 2**-14 (left to _round_subnormal)."""
    a = u & np.uint32(0x7FFFFFFF)
    r = np.uint32((u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000))
    inf = (u & np.uint32(0x80000000)) | np.uint32(0x7F800000)
    r = inf if a >= np.uint32(0x477FF000) else r
    sub = a < np.uint32(0x38800000)
    r = u if (a >= np.uint32(0x7F800000)) or sub else r
    return np.uint32(r), 1 if (sub and a != np.uint32(0)) else 0


# Separate copying and in-place loops: LLVM vectorises a loop over two arrays only after a run-time
# check that they do not overlap, so one loop called with aliased arguments would run scalar.


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _round_normal(src: np.ndarray, dst: np.ndarray) -> int:  # pragma: no cover - compiled
    n_sub = 0
    for i in range(src.size):
        r, sub = _normal_bits(src[i])
        dst[i] = r
        n_sub += sub
    return n_sub


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _round_normal_inplace(buf: np.ndarray) -> int:  # pragma: no cover - compiled
    n_sub = 0
    for i in range(buf.size):
        r, sub = _normal_bits(buf[i])
        buf[i] = r
        n_sub += sub
    return n_sub


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _round_subnormal(x: np.ndarray) -> None:  # pragma: no cover - compiled
    """float32, in place: |x| < 2**-14 to a multiple of 2**-24, half to even. Adding and removing
    0.5 does it: float32's spacing in [0.5, 1) is exactly 2**-24 and IEEE addition rounds half to even."""
    for i in range(x.size):
        v = x[i]
        av = abs(v)
        s = (av + np.float32(0.5)) - np.float32(0.5)
        s = -s if v < np.float32(0) else s
        x[i] = s if (av < np.float32(2.0**-14) and av != np.float32(0)) else v  # -0.0 stays -0.0


def round_to_fp16(x: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """``x`` rounded to fp16, as float32 (as ``x.astype(float16).astype(float32)``).

    ``inplace=True`` reuses ``x``'s memory when it is a writable, contiguous float32 array that owns
    its data (an op's fresh result); otherwise a new array is returned and ``x`` is left alone.
    """
    x = np.asarray(x)
    if (inplace and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable
            and x.flags.owndata):
        out = x
    else:
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
    if out.size:
        dst = out.reshape(-1)
        bits = dst.view(np.uint32)
        n_sub = _round_normal_inplace(bits) if out is x else _round_normal(x.reshape(-1).view(np.uint32), bits)
        if n_sub:
            _round_subnormal(dst)
    return out

"""Numeric ternary-weight detection.

A weight is ternary when every value is in {-a, 0, a}, for one ``a`` per tensor or one per output
channel. Names carry no meaning in dynamo exports (``val_123``), so detection is purely numeric.
Folded WeightQuant subgraphs produce ``round(W*s)/s`` in float, which is exact up to the last bit,
so a relative tolerance of 1e-3 on the magnitudes is ample and still rejects real float weights.

Speed matters (a 2B model has 2 billion weights): magnitudes are compared as the integer bit
patterns of the float32 values (monotonic for non-negative floats), the work stays in the source's
contiguous layout, a few output channels reject ordinary float weights before any full pass, and only
the int8 codes are transposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RTOL = 1e-3
MIN_ELEMENTS = 16


@dataclass(frozen=True)
class Ternary:
    """Ternary codes ``[N, K]`` (int8, out x in) and the magnitude ``a`` (scalar or ``[N]``)."""

    codes: np.ndarray
    scale: np.ndarray
    per_channel: bool


def _sample_rejects(w: np.ndarray, out_axis: int, rtol: float) -> bool:
    """Cheap early exit: if one of the first few output channels has magnitudes spread beyond rtol,
    the weight is neither per-tensor nor per-channel ternary (exact for those channels)."""
    for j in range(min(4, w.shape[out_axis])):
        ch = np.abs(w[j] if out_axis == 0 else w[:, j]).astype(np.float32)
        ch = ch[ch > 0]
        if ch.size and float(ch.max() - ch.min()) > rtol * float(ch.max()):
            return True
    return False


def detect_ternary(w: np.ndarray, out_axis: int, rtol: float = RTOL) -> Ternary | None:
    """Return the ternary decomposition of the 2-D weight ``w`` or None when it is not ternary.

    ``out_axis`` is the axis of output channels (1 for a MatMul ``B[K, N]``, 0 for ``W[N, K]``).
    """
    if w.ndim != 2 or w.size < MIN_ELEMENTS or min(w.shape) < 2 or not np.issubdtype(w.dtype, np.floating):
        return None
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    if _sample_rejects(w32, out_axis, rtol):
        return None
    u = w32.view(np.int32)
    bits = u & np.int32(0x7FFFFFFF)  # |w| as ordered integers (monotonic for non-negative floats)
    amax_bits = int(bits.max())
    if amax_bits == 0:
        return None
    amax = float(np.int32(amax_bits).view(np.float32))
    lo_bits = int(np.float32(amax * (1 - rtol)).view(np.int32))
    # bits - 1 as uint32 maps 0 (a zero weight) to 2^32-1, so one unsigned compare finds 0 < |w| < lo
    np.subtract(bits, 1, out=bits)
    b1 = bits.view(np.uint32)
    too_small = int(np.count_nonzero(b1 < np.uint32(lo_bits - 1)))
    nonzero = b1 != np.uint32(0xFFFFFFFF)
    negative = u < 0
    np.logical_and(negative, nonzero, out=negative)
    codes_src = nonzero.view(np.int8) - (negative.view(np.int8) << 1)
    codes = np.ascontiguousarray(codes_src if out_axis == 0 else codes_src.T)
    if too_small == 0:
        exact = int(np.count_nonzero(b1 < np.uint32(amax_bits - 1))) == 0
        if exact:
            scale = np.asarray(amax, np.float32)
        else:
            n = int(np.count_nonzero(nonzero))
            scale = np.asarray(np.abs(w32).sum(dtype=np.float64) / n, np.float32)
        return Ternary(codes=codes, scale=scale, per_channel=False)
    bits = u & np.int32(0x7FFFFFFF)
    # per output channel
    red = 1 - out_axis
    cmax_bits = bits.max(axis=red)
    cmin_bits = np.where(nonzero, bits, np.int32(0x7FFFFFFF)).min(axis=red)
    live = cmax_bits > 0
    cmax = cmax_bits.view(np.float32)
    cmin = cmin_bits.view(np.float32)
    if not np.all(cmax[live] - cmin[live] <= rtol * cmax[live]):
        return None
    a = np.abs(w32).sum(axis=red, dtype=np.float64)
    counts = nonzero.sum(axis=red)
    scale = np.where(live, a / np.maximum(counts, 1), 1.0).astype(np.float32)
    return Ternary(codes=codes, scale=scale, per_channel=True)

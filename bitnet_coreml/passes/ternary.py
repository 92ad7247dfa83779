"""Numeric ternary-weight detection.

A weight is ternary when every value is in {-a, 0, a}, for one ``a`` per tensor or one per output
channel. Names carry no meaning in dynamo exports (``val_123``), so detection is purely numeric.
Folded WeightQuant subgraphs produce ``round(W*s)/s`` in float, which is exact up to the last bit,
so a relative tolerance of 1e-3 on the magnitudes is ample and still rejects real float weights.
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


def detect_ternary(w: np.ndarray, out_axis: int, rtol: float = RTOL) -> Ternary | None:
    """Return the ternary decomposition of the 2-D weight ``w`` or None when it is not ternary.

    ``out_axis`` is the axis of output channels (1 for a MatMul ``B[K, N]``, 0 for ``W[N, K]``).
    """
    if w.ndim != 2 or w.size < MIN_ELEMENTS or min(w.shape) < 2 or not np.issubdtype(w.dtype, np.floating):
        return None
    wt = w if out_axis == 0 else w.T  # [N, K] view
    a = np.abs(wt, dtype=np.float32)
    nz = a > 0
    if not nz.any():
        return None
    amax = float(a.max())
    amin = float(np.min(a, where=nz, initial=np.inf))
    codes = np.sign(wt).astype(np.int8)
    if amax - amin <= rtol * amax:
        # one magnitude for the tensor; use the mean of the nonzero magnitudes (exact when all equal)
        scale = np.asarray(a.sum(dtype=np.float64) / nz.sum(), dtype=np.float32)
        return Ternary(codes=np.ascontiguousarray(codes), scale=scale, per_channel=False)
    cmax = a.max(axis=1)
    cmin = np.min(a, axis=1, where=nz, initial=np.inf)
    live = cmax > 0
    if not np.all(cmax[live] - cmin[live] <= rtol * cmax[live]):
        return None
    counts = nz.sum(axis=1)
    scale = np.where(live, a.sum(axis=1, dtype=np.float64) / np.maximum(counts, 1), 1.0).astype(np.float32)
    return Ternary(codes=np.ascontiguousarray(codes), scale=scale, per_channel=True)

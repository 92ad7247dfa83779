"""``--embed-bits``: palettize the large non-ternary weights (embedding, lm_head) to a 4/6/8-bit LUT.

Runs on the built MIL program, before ``ct.convert``: every float ``const`` with at least
``min_size`` elements that feeds a ``gather``/``linear``/``matmul`` becomes a
``constexpr_lut_to_dense`` (iOS16 form: one LUT per tensor). The LUT is a 1-D k-means of the
tensor's values computed on a histogram (Lloyd iterations over weighted bin centres), so the cost
is linear in the tensor size and needs no scikit-learn. The ANE accelerates 1/2/4/6/8-bit LUTs.

The reconstruction error (relative L2 of the palettized tensor against the original) is returned
per tensor: that is the parity cost the report shows.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_CONSUMERS = {"gather", "gather_along_axis", "linear", "matmul", "conv"}
_BINS = 1 << 16
_ITERS = 25
_CHUNK = 1 << 22


def kmeans_1d(values: np.ndarray, k: int) -> np.ndarray:
    """A sorted LUT of ``k`` centres for ``values`` (1-D k-means over a fine histogram)."""
    flat = values.reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return np.full(k, lo, dtype=np.float64)
    counts = np.zeros(_BINS, np.int64)
    for a in range(0, flat.size, _CHUNK):
        c, _ = np.histogram(flat[a:a + _CHUNK].astype(np.float32), bins=_BINS, range=(lo, hi))
        counts += c
    centres = lo + (np.arange(_BINS) + 0.5) * (hi - lo) / _BINS
    w = counts.astype(np.float64)
    cdf = np.cumsum(w) / w.sum()
    lut = np.interp((np.arange(k) + 0.5) / k, cdf, centres)  # quantile initialisation
    for _ in range(_ITERS):
        edges = (lut[1:] + lut[:-1]) / 2
        idx = np.searchsorted(edges, centres)
        s = np.bincount(idx, weights=w * centres, minlength=k)
        n = np.bincount(idx, weights=w, minlength=k)
        new = np.where(n > 0, s / np.maximum(n, 1e-300), lut)
        new.sort()
        if np.allclose(new, lut, rtol=0, atol=(hi - lo) * 1e-9):
            lut = new
            break
        lut = new
    return lut


def lut_indices(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Index of the nearest LUT entry for every value (``lut`` sorted), uint8."""
    edges = ((lut[1:] + lut[:-1]) / 2).astype(values.dtype)
    flat = values.reshape(-1)
    out = np.empty(flat.size, np.uint8)
    for a in range(0, flat.size, _CHUNK):
        out[a:a + _CHUNK] = np.searchsorted(edges, flat[a:a + _CHUNK])
    return out


def pack_bits(indices: np.ndarray, nbits: int) -> np.ndarray:
    """Pack uint8 indices LSB-first into ``ceil(n * nbits / 8)`` bytes (constexpr_lut_to_dense layout)."""
    n = indices.size
    if nbits == 8:
        return indices.astype(np.uint8, copy=True)
    out = np.zeros((n * nbits + 7) // 8, np.uint8)
    step = 8 * (_CHUNK // 8)  # chunks of a multiple of 8 elements start on a byte boundary
    for a in range(0, n, step):
        chunk = indices[a:a + step]
        bits = np.unpackbits(chunk[:, None], axis=1, bitorder="little")[:, :nbits].reshape(-1)
        packed = np.packbits(bits, bitorder="little")
        start = a * nbits // 8
        out[start:start + packed.size] = packed
    return out


def palettize_program(program: Any, nbits: int, min_size: int = 1 << 16) -> dict[str, Any]:
    """Replace big float consts feeding gather/linear/matmul by ``nbits`` LUTs, in every function (in place)."""
    from bitnet_coreml._quiet import coremltools

    ct = coremltools()
    done: list[dict[str, Any]] = []
    # Functions of a multifunction program hold equal copies of the same weights: palettize each
    # distinct tensor once, so they stay equal (and are stored once, see lower/state.py).
    memo: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, float]] = {}
    for func in program.functions.values():
        _palettize_function(func, nbits, min_size, ct, memo, done)
    return {"bits": nbits, "weights": done, "max_rel_l2": max((d["rel_l2"] for d in done), default=0.0)}


def _palettize_function(func: Any, nbits: int, min_size: int, ct: Any,
                        memo: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, float]],
                        done: list[dict[str, Any]]) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    ios18 = func.opset_version is not None and func.opset_version >= ct.target.iOS18
    for op in list(func.operations):
        if op.op_type != "const":
            continue
        var = op.outputs[0]
        val = var.val
        if not isinstance(val, np.ndarray) or val.dtype.kind != "f" or val.size < min_size:
            continue
        if not var.child_ops or not all(c.op_type in _CONSUMERS for c in var.child_ops):
            continue
        key = (val.shape, val.dtype.str, hashlib.sha1(np.ascontiguousarray(val).view(np.uint8).data).hexdigest())
        if key not in memo:
            lut = kmeans_1d(val, 1 << nbits)
            idx = lut_indices(val, lut)
            recon = lut.astype(val.dtype)[idx].reshape(val.shape)
            err = float(np.linalg.norm((recon - val).astype(np.float64)))
            memo[key] = (lut, idx, err / max(float(np.linalg.norm(val.astype(np.float64))), 1e-30))
            del recon
        lut, idx, rel = memo[key]
        with func, mb.set_before_op(op):
            if ios18:  # iOS18 redefined the op: typed sub-byte indices in the weight's shape, rank+2 LUT
                typed = idx.reshape(val.shape).astype(types.nptype_from_builtin(types.string_to_builtin(f"uint{nbits}")))
                new = mb.constexpr_lut_to_dense(indices=typed, lut=lut.astype(val.dtype).reshape(
                    *([1] * val.ndim), 1 << nbits, 1), name=f"{op.name}_lut{nbits}")
            else:
                new = mb.constexpr_lut_to_dense(indices=pack_bits(idx, nbits), lut=lut.astype(val.dtype),
                                                shape=np.array(val.shape, np.uint32), name=f"{op.name}_lut{nbits}")
        op.enclosing_block.replace_uses_of_var_after_op(anchor_op=new.op, old_var=var, new_var=new,
                                                        no_check_var_types=True)
        op.enclosing_block.remove_ops([op])
        done.append({"name": op.name, "shape": list(val.shape), "rel_l2": rel})
        log.info("palettized %s %s to %d bits (rel L2 %.3g)", op.name, list(val.shape), nbits, rel)

"""Weight decompression ops (``constexpr_*``, iOS16 and iOS18 forms), evaluated once at load.

Written from the MIL op specs (coremltools ``iOS16/constexpr_ops.py`` and ``iOS18/compression.py``
docstrings); the tests check them against coremltools' own ``materialized_val_inference``.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from bitnet_coreml.errors import ModelError
from bitnet_coreml.executor.blobs import PackedBits
from bitnet_coreml.executor.ops._util import scalar
from bitnet_coreml.executor.registry import OpContext, register
from bitnet_coreml.executor.ternary import from_lut


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Unsigned ``nbits``-bit fields packed LSB-first into bytes (the iOS16 layout) -> uint8 array of ``count``."""
    raw = np.asarray(packed).astype(np.uint8).reshape(-1)
    if nbits in (1, 2, 4, 8):
        # whole fields per byte: shift-and-mask, no per-bit expansion (this is the ternary 2-bit path)
        per = 8 // nbits
        if raw.size * per < count:
            raise ModelError(f"corrupt package: packed data holds {raw.size * per} {nbits}-bit values, {count} needed")
        shifts = (np.arange(per, dtype=np.uint8) * nbits).astype(np.uint8)
        fields = (raw[:, None] >> shifts[None, :]) & np.uint8((1 << nbits) - 1)
        return fields.reshape(-1)[:count]
    bits = np.unpackbits(raw, bitorder="little")
    need = count * nbits
    if bits.size < need:
        raise ModelError(f"corrupt package: packed data holds {bits.size} bits, {count} x {nbits}-bit values need {need}")
    fields = bits[:need].reshape(count, nbits).astype(np.uint16)
    weights = (1 << np.arange(nbits, dtype=np.uint16))
    return (fields @ weights).astype(np.uint8)


def along_axis(param: Any, rank: int, axis: int) -> np.ndarray:
    """A scalar or 1-D per-channel parameter shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    p = np.asarray(param)
    if p.ndim == 0 or p.size == 1 and p.ndim <= 1:
        return p.reshape(())
    if p.ndim == 1:
        shape = [1] * rank
        shape[axis % rank] = p.size
        return p.reshape(shape)
    return p


@register("constexpr_affine_dequantize")
def op_constexpr_affine_dequantize(ctx: OpContext, a: dict[str, Any]) -> Any:
    q = np.asarray(a["quantized_data"])
    axis = int(scalar(a.get("axis", 0)))
    zp = along_axis(a["zero_point"], q.ndim, axis).astype(np.float32)
    scale = along_axis(a["scale"], q.ndim, axis).astype(np.float32)
    return (q.astype(np.float32) - zp) * scale


@register("constexpr_cast")
def op_constexpr_cast(ctx: OpContext, a: dict[str, Any]) -> Any:
    return a["source_val"]


def _lut_dense_ios18(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    shape = indices.shape
    rank = len(shape)
    groups = lut.shape[:rank]
    vec = lut.shape[-1]
    grids = []
    for i, (s, g) in enumerate(zip(shape, groups, strict=False)):
        view = [1] * rank
        view[i] = s
        grids.append((np.arange(s) // (s // g)).reshape(view))
    out = lut[tuple(grids) + (indices.astype(np.intp),)]  # shape + (vec,)
    if vec == 1:
        return out[..., 0]
    axis = (vector_axis if vector_axis is not None else 0) % rank
    out = np.moveaxis(out, -1, axis + 1)
    new_shape = list(shape)
    new_shape[axis] *= vec
    return out.reshape(new_shape)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _decode_bytes(raw: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i*per:(i+1)*per] = table[raw[i]]``: every packed byte replaced by the values it holds."""
    per = table.shape[1]
    for i in range(raw.size):
        row = table[raw[i]]
        for j in range(per):
            out[i * per + j] = row[j]


@register("constexpr_lut_to_dense")
def op_constexpr_lut_to_dense(ctx: OpContext, a: dict[str, Any]) -> Any:
    ternary = from_lut(a)  # a BitNet weight stays at 2 bits; matmuls read it directly
    if ternary is not None:
        return ternary
    if a["indices"].__class__ is PackedBits:  # iOS18 indices as stored (executor/blobs.py)
        a = {**a, "indices": a["indices"].unpack()}
    lut = np.asarray(a["lut"])
    if "shape" in a:  # iOS16: packed uint8 indices, flat LUT, explicit shape
        shape = [int(s) for s in np.asarray(a["shape"]).reshape(-1)]
        nbits = int(np.log2(lut.size))
        count = int(np.prod(shape))
        flat_lut = lut.reshape(-1)
        if nbits in (1, 2, 4):
            # decode whole bytes through a 256-row table (each row: the values packed in that byte),
            # a quarter (2-bit) of the gathers of a per-element lookup
            per = 8 // nbits
            table = flat_lut[unpack_bits(np.arange(256, dtype=np.uint8), nbits, 256 * per)].reshape(256, per)
            if table.dtype == np.float16:
                # straight into the executor's float32 compute form (exact): numpy's float16 ->
                # float32 conversion of a whole weight costs more than the decoding itself
                table = table.astype(np.float32)
            raw = np.ascontiguousarray(np.asarray(a["indices"]).astype(np.uint8, copy=False).reshape(-1))
            if raw.size * per < count:
                raise ModelError(f"corrupt package: packed data holds {raw.size * per} {nbits}-bit values, {count} needed")
            out = np.empty(raw.size * per, dtype=table.dtype)
            _decode_bytes(raw, np.ascontiguousarray(table), out)  # one pass, ~6x np.take of row records
            return out[:count].reshape(shape)
        return flat_lut[unpack_bits(a["indices"], nbits, count)].reshape(shape)
    va = a.get("vector_axis")
    return _lut_dense_ios18(np.asarray(a["indices"]), lut, None if va is None else int(scalar(va)))


def _sparse_dense(nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=nonzero.dtype)
    out[mask != 0] = nonzero
    return out


@register("constexpr_sparse_to_dense")
def op_constexpr_sparse_to_dense(ctx: OpContext, a: dict[str, Any]) -> Any:
    nz = np.asarray(a["nonzero_data"])
    if "shape" in a:  # iOS16: mask packed LSB-first in bytes
        shape = [int(s) for s in np.asarray(a["shape"]).reshape(-1)]
        mask = unpack_bits(a["mask"], 1, int(np.prod(shape))).reshape(shape)
        return _sparse_dense(nz, mask)
    return _sparse_dense(nz, np.asarray(a["mask"]))


def _blockwise(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    d = data.astype(np.float32)
    reps = [ds // ss for ds, ss in zip(d.shape, scale.shape, strict=False)]
    s = scale.astype(np.float32)
    o = None if offset is None else offset.astype(np.float32)
    for axis, r in enumerate(reps):
        if r > 1:
            s = np.repeat(s, r, axis=axis)
            if o is not None:
                o = np.repeat(o, r, axis=axis)
    return s * (d - o) if o is not None else s * d


@register("constexpr_blockwise_shift_scale")
def op_constexpr_blockwise_shift_scale(ctx: OpContext, a: dict[str, Any]) -> Any:
    off = a.get("offset")
    return _blockwise(np.asarray(a["data"]), np.asarray(a["scale"]), None if off is None else np.asarray(off))


@register("constexpr_lut_to_sparse")
def op_constexpr_lut_to_sparse(ctx: OpContext, a: dict[str, Any]) -> Any:
    mask = np.asarray(a["indices_mask"])
    idx = _sparse_dense(np.asarray(a["indices_nonzero_data"]), mask)
    va = a.get("vector_axis")
    axis = None if va is None else int(scalar(va))
    lut = np.asarray(a["lut"])
    dense = _lut_dense_ios18(idx, lut, axis)
    out_mask = mask
    if lut.shape[-1] > 1:
        out_mask = np.repeat(mask, lut.shape[-1], axis=axis if axis is not None else 0)
    return out_mask, dense[out_mask != 0].reshape(-1)


@register("constexpr_sparse_blockwise_shift_scale")
def op_constexpr_sparse_blockwise_shift_scale(ctx: OpContext, a: dict[str, Any]) -> Any:
    mask = np.asarray(a["data_mask"])
    data = _sparse_dense(np.asarray(a["nonzero_data"]), mask)
    off = a.get("offset")
    dense = _blockwise(data, np.asarray(a["scale"]), None if off is None else np.asarray(off))
    return mask, dense[mask != 0].reshape(-1)

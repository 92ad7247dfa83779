"""Ternary weights kept at 2 bits in the executor, and the matmul that reads them directly.

A BitNet layer's weight arrives as ``constexpr_lut_to_dense`` with the LUT ``[-1, 0, 1, *]`` (see
``lower/bitnet.py``). Decoding it to a dense float32 copy at load costs 16x the weight's bytes in
memory and, per decoded token, 16x the bytes read. Instead the load keeps a :class:`TernaryWeight`:
the 2-bit codes, four to a byte, in Core ML's own layout (element ``4j+i`` of the row-major weight in
bits ``2i..2i+1`` of byte ``j``): the iOS16/17 form's packed indices as they are, the iOS18 form's
packed indices as the weight file stores them (read by ``executor/blobs.py``), or its
one-index-per-byte array (a program built in memory) packed once.

``matmul(x, W^T)`` with such a weight:

* **integer path** (decode, small batches): when every activation is ``q / 2**s`` with ``q`` an int8
  (what BitLinear's activation quantisation produces: ``xn = xq * 2**-7``), the product is computed
  in integers, ``sum_k q[k] * code[n, k]``, straight from the 2-bit codes by a numba kernel
  (LLVM vectorises it; with AVX-512 VNNI ``executor/_vnni.py``, 2.6x faster), and scaled by ``2**-s``. The float matmul it replaces sums multiples of
  ``2**-s`` below ``2**(24-s)`` in magnitude, which float32 does exactly in any order, so both give
  the same bits.
* **dense path** (prefill, other activations): row blocks of the weight are decoded to float32 into a
  small reused buffer and multiplied by BLAS; the same products and sums as with the whole dense
  weight, without keeping it.

Any other consumer of the weight (a transpose, a gather) gets the dense array (:meth:`dense`). The
numba kernels live in ``executor/_ternary_kernels.py``, imported on first use: holding a TernaryWeight
loads no numba.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.blobs import PackedBits

__all__ = ["TernaryWeight", "from_lut", "keeps_packed", "dense_for", "matmul_t", "INT_PATH_MAX_ROWS"]

# Rows of activations up to which the integer kernel beats decode + BLAS (measured on the 200M shapes).
INT_PATH_MAX_ROWS = 8
# Bytes of float32 weight decoded per BLAS call on the dense path.
_BLOCK_BYTES = 1 << 22
_LUT = np.array([-1.0, 0.0, 1.0], dtype=np.float64)
# byte -> its four weights (index 3 never occurs: from_lut refuses weights that use it)
_BYTE_TABLE = _LUT[np.minimum((np.arange(256)[:, None] >> (2 * np.arange(4))[None, :]) & 3, 2)].astype(np.float32)


class TernaryWeight:
    """A ``[N, K]`` weight with values in {-1, 0, 1}, held as 2-bit codes ``[N, K/4]`` (uint8)."""

    __slots__ = ("codes", "shape", "_dense")

    def __init__(self, codes: np.ndarray, shape: tuple[int, int]) -> None:
        self.codes = codes
        self.shape = shape
        self._dense: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes)

    def dense(self) -> np.ndarray:
        """The float32 ``[N, K]`` array (kept once made: only consumers other than matmul ask)."""
        if self._dense is None:
            n, k = self.shape
            from bitnet_coreml.executor._ternary_kernels import _decode_rows

            out = np.empty((n, k), dtype=np.float32)
            _decode_rows(self.codes, _BYTE_TABLE, out)
            self._dense = out
        return self._dense

    def __repr__(self) -> str:
        return f"TernaryWeight(shape={self.shape}, {self.nbytes} bytes)"


def _no_index_3(packed: np.ndarray) -> bool:
    """True when no 2-bit field of ``packed`` holds 3 (the LUT's padding entry)."""
    flat = packed.reshape(-1)
    step = 1 << 24
    for i in range(0, flat.size, step):
        b = flat[i:i + step]
        if np.any(b & (b >> 1) & np.uint8(0x55)):
            return False
    return True


def from_lut(args: dict[str, Any]) -> TernaryWeight | None:
    """The :class:`TernaryWeight` of a ``constexpr_lut_to_dense``'s arguments, or None when it is not one.

    Accepted: a 2-D weight whose K is a multiple of 4, a LUT equal to ``[-1, 0, 1, x]`` (one LUT for
    the whole tensor), and no index 3. Anything else is decoded densely as before.
    """
    lut = np.asarray(args.get("lut"))
    if lut.size != 4:
        return None
    flat = lut.reshape(-1).astype(np.float64)
    if not np.array_equal(flat[:3], _LUT):
        return None
    raw = args.get("indices")
    if raw.__class__ is PackedBits:  # iOS18 indices read packed from the weight file (executor/blobs.py)
        n_k = raw.shape
        if (raw.nbits != 2 or len(n_k) != 2 or n_k[1] % 4 or lut.shape != (1, 1, 4, 1)
                or raw.packed.size * 4 < n_k[0] * n_k[1]):
            return None
        codes = raw.packed[: n_k[0] * n_k[1] // 4].reshape(n_k[0], n_k[1] // 4)  # Core ML's layout already
        return TernaryWeight(codes, (int(n_k[0]), int(n_k[1]))) if _no_index_3(codes) else None
    idx = np.asarray(raw)
    if "shape" in args:  # iOS16/17: packed bytes + explicit shape
        shape = tuple(int(s) for s in np.asarray(args["shape"]).reshape(-1))
        if len(shape) != 2 or shape[1] % 4 or idx.dtype != np.uint8 or idx.size * 4 < shape[0] * shape[1]:
            return None
        codes = idx.reshape(-1)[: shape[0] * shape[1] // 4].reshape(shape[0], shape[1] // 4)
    else:  # iOS18: one index per element, LUT [1, 1, 4, 1]
        if idx.ndim != 2 or idx.shape[1] % 4 or lut.shape != (1, 1, 4, 1) or idx.dtype.kind not in "ui":
            return None
        shape = (int(idx.shape[0]), int(idx.shape[1]))
        from bitnet_coreml.executor._ternary_kernels import _pack_rows

        codes = np.empty((shape[0], shape[1] // 4), dtype=np.uint8)
        _pack_rows(np.ascontiguousarray(idx).astype(np.uint8, copy=False), codes)
    codes = np.ascontiguousarray(codes)
    if not _no_index_3(codes):
        return None
    return TernaryWeight(codes, shape)


def keeps_packed(op: Any, input_name: str) -> bool:
    """True when MIL ``op`` reads its input ``input_name`` as a weight :func:`matmul_t` computes with."""
    if op.op_type == "linear":
        return input_name == "weight"
    if op.op_type == "matmul" and input_name == "y":
        ty = op.inputs.get("transpose_y")
        return ty is not None and ty.val is not None and bool(ty.val)
    return False


def dense_for(value: Any) -> Any:
    """``value`` itself, or the dense array when it is a TernaryWeight (for consumers that need one)."""
    return value.dense() if isinstance(value, TernaryWeight) else value


def _int_scale(x: np.ndarray) -> tuple[np.ndarray, float] | None:
    """``(q, 2**-7)`` with int8 ``q`` and ``x == q * 2**-7`` exactly (BitLinear's ``xn``); else None."""
    if x.dtype != np.float32 or not x.size:
        return None
    m = float(np.max(np.abs(x)))
    if not np.isfinite(m) or m > 1.0:
        return None
    scaled = x * np.float32(128.0)
    q = np.rint(scaled)
    if not np.array_equal(q, scaled) or float(q.max()) > 127.0:
        return None
    return q.astype(np.int8), 1.0 / 128.0


def matmul_t(x: np.ndarray, w: TernaryWeight) -> np.ndarray:
    """``x @ w.T`` for float32 ``x`` ``[..., K]``; float32 ``[..., N]``, bit-identical to the dense product."""
    from bitnet_coreml.executor._ternary_kernels import _decode_rows, int_matmul

    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"matmul: x has {x.shape[-1]} columns, the ternary weight {list(w.shape)} needs {k}")
    lead = x.shape[:-1]
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, k)
    out = np.empty((rows.shape[0], n), dtype=np.float32)
    quant = _int_scale(rows) if rows.shape[0] <= INT_PATH_MAX_ROWS else None
    if quant is not None:
        q, scale = quant
        # deinterleave: plane i holds the activations of element 4j+i, matching byte j's field i
        planes = np.ascontiguousarray(q.reshape(q.shape[0], k // 4, 4).transpose(0, 2, 1))
        acc = np.empty((rows.shape[0], n), dtype=np.int32)
        int_matmul(w.codes, planes, acc)
        acc -= q.sum(axis=1, dtype=np.int32)[:, None]  # codes are weight + 1
        np.multiply(acc, np.float32(scale), out=out, casting="unsafe")
    else:
        block = max(1, _BLOCK_BYTES // (4 * k))
        buf = np.empty((min(block, n), k), dtype=np.float32)
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            wb = buf[: r1 - r0]
            _decode_rows(w.codes[r0:r1], _BYTE_TABLE, wb)
            out[:, r0:r1] = np.matmul(wb, rows.T).T
    return out.reshape(lead + (n,))

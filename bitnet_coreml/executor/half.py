"""fp16 weights kept at 2 bytes in the executor, and the products that read them directly.

The executor computes in float32 and used to widen every fp16 constant to a float32 copy at load:
for a language model's embedding / lm_head (vocab x hidden, the largest tensor of a BitNet model,
whose other weights are 2-bit) that doubles its memory and, since the lm_head runs on every decoded
token, doubles the bytes each token reads. A :class:`HalfWeight` keeps the fp16 bits instead and
widens them where they are used, inside the kernels:

* ``x @ W^T`` with few rows of ``x`` (decode): a numba kernel reads the fp16 bits, widens each to
  float32 exactly (LLVM's ``fpext half -> float``: ``vcvtph2ps`` on x86 with F16C) and accumulates
  in float32, **in index order** ``k = 0, 1, ..., K-1`` for every output: ``acc = acc + x[k] * w[k]``,
  one rounding per multiply and per add, no fused multiply-add. That order is the definition the
  tests check bit for bit against numpy (``np.add.accumulate`` of the products). In an fp16 package
  the activations hold fp16 values, so every product of two fp16 values is exact in float32 and
  only the additions round, as in any float32 accumulation of the package's fp16 arithmetic
  (BLAS sums in its own order: the results agree to float32 rounding, and after the op's rounding
  to fp16 they are equal except at rounding ties).
* many rows (prefill): blocks of the weight are widened into a small float32 buffer and multiplied
  by BLAS, without keeping the float32 copy.
* ``gather`` of rows (the embedding lookup): the selected rows are widened.

Layout: the ``[N, K]`` weight is stored as ``[ceil(N/B), K, B]`` uint16 (``B`` = :data:`BLOCK`
rows side by side, zero-padded): the kernel then walks memory sequentially and vectorises over the
``B`` outputs of a block (each output keeps its own sequential sum). Any other consumer of the
weight gets the dense float32 array (:meth:`HalfWeight.dense`). The numba kernels live in
``executor/_half_kernels.py``, imported on first use: holding a HalfWeight loads no numba.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HalfWeight", "matmul_t", "MIN_BYTES", "BLOCK", "KERNEL_MAX_ROWS"]

# fp16 constants of at least this many bytes (2-D) are kept as HalfWeight; smaller ones are widened.
MIN_BYTES = 1 << 20
# Rows of the weight side by side in the kernel's layout (a multiple of the SIMD width).
BLOCK = 64
# Rows of activations up to which the kernel beats widening blocks + BLAS (200M shapes: 1.8 ms per
# 16000 x 1024 weight at 1 row, vs BLAS's 3.7 ms on the float32 copy; BLAS wins from ~8 rows on).
KERNEL_MAX_ROWS = 8
# Bytes of float32 weight widened per BLAS call on the many-rows path.
_BUF_BYTES = 1 << 22


class HalfWeight:
    """A ``[N, K]`` fp16 weight held as its fp16 bits (uint16) in the blocked layout."""

    __slots__ = ("blocks", "shape", "_dense")

    def __init__(self, w16: np.ndarray) -> None:
        if w16.dtype != np.float16 or w16.ndim != 2:
            raise ValueError(f"HalfWeight takes a 2-D float16 array, got {w16.ndim}-D {w16.dtype}")
        n, k = w16.shape
        nb = -(-n // BLOCK)
        bits = np.zeros((nb * BLOCK, k), dtype=np.uint16)
        bits[:n] = w16.view(np.uint16)
        self.blocks = np.ascontiguousarray(bits.reshape(nb, BLOCK, k).transpose(0, 2, 1))
        self.shape = (int(n), int(k))
        self._dense: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)

    def dense(self) -> np.ndarray:
        """The float32 ``[N, K]`` array (kept once made: only consumers other than matmul / gather ask)."""
        if self._dense is None:
            n, k = self.shape
            from bitnet_coreml.executor._half_kernels import _widen_blocks

            out = np.empty((k, self.blocks.shape[0] * BLOCK), dtype=np.float32)
            _widen_blocks(self.blocks, out)
            self._dense = np.ascontiguousarray(out[:, :n].T)
        return self._dense

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (int, any shape, already within ``[0, N)``) widened to float32: ``idx.shape + (K,)``."""
        from bitnet_coreml.executor._half_kernels import _gather_rows

        flat = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((flat.size, self.shape[1]), dtype=np.float32)
        _gather_rows(self.blocks, flat, out)
        return out.reshape(tuple(np.shape(idx)) + (self.shape[1],))

    def __repr__(self) -> str:
        return f"HalfWeight(shape={self.shape}, {self.nbytes} bytes)"


def matmul_t(x: np.ndarray, w: HalfWeight) -> np.ndarray:
    """``x @ w.T`` for float32 ``x`` ``[..., K]``; float32 ``[..., N]`` (see the module docstring)."""
    from bitnet_coreml.executor._half_kernels import _matvec, _widen_blocks

    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"matmul: x has {x.shape[-1]} columns, the fp16 weight {list(w.shape)} needs {k}")
    lead = x.shape[:-1]
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, k)
    nb = w.blocks.shape[0]
    out = np.empty((rows.shape[0], nb * BLOCK), dtype=np.float32)
    if rows.shape[0] <= KERNEL_MAX_ROWS:
        _matvec(w.blocks, rows, out)
    else:
        per = max(1, _BUF_BYTES // (4 * k * BLOCK))  # blocks widened per BLAS call
        buf = np.empty((k, min(per, nb) * BLOCK), dtype=np.float32)
        for b0 in range(0, nb, per):
            b1 = min(nb, b0 + per)
            wb = buf[:, : (b1 - b0) * BLOCK]
            _widen_blocks(w.blocks[b0:b1], wb)
            np.matmul(rows, wb, out=out[:, b0 * BLOCK:b1 * BLOCK])
    if out.shape[1] != n:
        out = out[:, :n]
    return np.ascontiguousarray(out).reshape(lead + (n,))

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
weight gets the dense float32 array (:meth:`HalfWeight.dense`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

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
            out = np.empty((k, self.blocks.shape[0] * BLOCK), dtype=np.float32)
            _widen_blocks(self.blocks, out)
            self._dense = np.ascontiguousarray(out[:, :n].T)
        return self._dense

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (int, any shape, already within ``[0, N)``) widened to float32: ``idx.shape + (K,)``."""
        flat = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((flat.size, self.shape[1]), dtype=np.float32)
        _gather_rows(self.blocks, flat, out)
        return out.reshape(tuple(np.shape(idx)) + (self.shape[1],))

    def __repr__(self) -> str:
        return f"HalfWeight(shape={self.shape}, {self.nbytes} bytes)"


def matmul_t(x: np.ndarray, w: HalfWeight) -> np.ndarray:
    """``x @ w.T`` for float32 ``x`` ``[..., K]``; float32 ``[..., N]`` (see the module docstring)."""
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


# --- kernels ----------------------------------------------------------------------------------------


@intrinsic
def _widen(typingctx, h):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The float32 value of the fp16 bits ``h`` (uint16): IEEE widening, exact for every input."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


# rows of the weight (k) one _block_steps call adds, with the 64 running sums held in registers
_STEPS = 8


@intrinsic
def _block_steps(typingctx, acc, blocks, b, j0, x, xo):  # type: ignore[no-untyped-def]  # pragma: no cover
    """``acc[l] += x[xo + t] * w(blocks[b, j0 + t, l])`` for t = 0.._STEPS-1 in order, l < 64 (= BLOCK).

    LLVM IR on <64 x float> values (numba has no vector type): one load and store of ``acc`` per
    _STEPS rows instead of one per row; a multiply then an add (no fused multiply-add), as the scalar loop.
    """
    sig = types.void(acc, blocks, types.intp, types.intp, x, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        acc_a = context.make_array(signature.args[0])(context, builder, args[0])
        w_a = context.make_array(signature.args[1])(context, builder, args[1])
        x_a = context.make_array(signature.args[4])(context, builder, args[4])
        vf = ir.VectorType(ir.FloatType(), BLOCK)
        vh = ir.VectorType(ir.HalfType(), BLOCK)
        accp = builder.bitcast(acc_a.data, vf.as_pointer())
        a = builder.load(accp, align=4)
        per_block = builder.extract_value(w_a.strides, 0)
        per_row = builder.extract_value(w_a.strides, 1)
        base = builder.bitcast(w_a.data, ir.IntType(8).as_pointer())
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), BLOCK), [0] * BLOCK)
        for t in range(_STEPS):
            j = builder.add(args[3], ir.Constant(args[3].type, t))
            at = builder.add(builder.mul(args[2], per_block), builder.mul(j, per_row))
            w = builder.fpext(builder.load(builder.bitcast(builder.gep(base, [at]), vh.as_pointer()), align=2), vf)
            xv = builder.load(builder.gep(x_a.data, [builder.add(args[5], ir.Constant(args[5].type, t))]))
            one = builder.insert_element(ir.Constant(vf, ir.Undefined), xv, ir.Constant(ir.IntType(32), 0))
            a = builder.fadd(a, builder.fmul(builder.shuffle_vector(one, ir.Constant(vf, ir.Undefined), zeros), w))
        builder.store(a, accp, align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _matvec(blocks: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[m, b*B + l] = sum_k x[m, k] * w(blocks[b, k, l])``, summed in order k = 0..K-1 in float32."""
    nb, k, bw = blocks.shape
    kv = k - k % _STEPS
    acc = np.empty(bw, dtype=np.float32)
    for m in range(x.shape[0]):
        xm = x[m]
        for b in range(nb):
            acc[:] = 0
            for j0 in range(0, kv, _STEPS):
                _block_steps(acc, blocks, b, j0, xm, j0)
            for j in range(kv, k):
                xj = xm[j]
                wj = blocks[b, j]
                for lane in range(bw):
                    acc[lane] += xj * _widen(wj[lane])  # type: ignore[call-arg]  # numba intrinsic
            out[m, b * bw:(b + 1) * bw] = acc


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _widen_blocks(blocks: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[k, b*B + l] = w(blocks[b, k, l])``: blocks as a float32 ``[K, nb*B]`` matrix (W^T)."""
    nb, k, bw = blocks.shape
    for j in range(k):
        dst = out[j]
        for b in range(nb):
            src = blocks[b, j]
            for lane in range(bw):
                dst[b * bw + lane] = _widen(src[lane])  # type: ignore[call-arg]  # numba intrinsic


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _gather_rows(blocks: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i, k] = w(row idx[i], column k)``."""
    bw = blocks.shape[2]
    for i in range(idx.size):
        b = idx[i] // bw
        lane = idx[i] % bw
        for j in range(blocks.shape[1]):
            out[i, j] = _widen(blocks[b, j, lane])  # type: ignore[call-arg]  # numba intrinsic

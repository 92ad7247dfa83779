"""The numba kernels of ``executor/half.py`` (fp16 weights in the ``[nb, K, 64]`` blocked layout).

Imported by ``half.py`` on first use, so that a process which only holds fp16 weights (the fused decode
on the C kernel, ``executor/native.py``) loads no numba. The arithmetic is described in ``half.py``.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from bitnet_coreml.executor.half import BLOCK


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

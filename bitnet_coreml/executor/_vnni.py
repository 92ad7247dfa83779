"""The ternary integer matmul with AVX-512 VNNI (``vpdpbusd``), for CPUs that have it.

``executor/ternary.py``'s portable kernel multiplies the 2-bit codes with int8 activations in int32
lanes (LLVM vectorises it with ``vpmaddwd``: ~25 GMAC/s on one core). On a CPU with AVX-512 VNNI one
``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of four products to
a 32-bit lane: here the bytes are one 2-bit field of 64 code bytes (weight + 1, i.e. 0..2) and the
64 activations of that field's plane, four instructions per 64 code bytes (256 weights). Integer
arithmetic: the result equals the portable kernel's exactly. numba has no vector types, so the step
is an LLVM intrinsic call emitted by :func:`_dp64`; :data:`HAS_VNNI` says whether this process may
use it (the host CPU has ``avx512vnni`` / ``avx512bw`` and numba compiles for the host).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["HAS_VNNI", "int_matmul_vnni"]


def _host_has_vnni() -> bool:
    try:
        import llvmlite.binding as ll

        if numba.config.CPU_NAME not in (None, "host"):  # compiling for another CPU than this one
            return False
        feats = ll.get_host_cpu_features()
        return bool(feats.get("avx512vnni")) and bool(feats.get("avx512bw"))
    except Exception:  # noqa: BLE001 - no feature list: use the portable kernel
        return False


HAS_VNNI = _host_has_vnni()


@intrinsic
def _row_dot(typingctx, codes, planes, steps):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``sum_i sum_j field_i(codes[j]) * planes[i, j]`` over the first ``64 * steps`` code bytes of a row.

    A loop in LLVM IR: per 64 code bytes, each of the 4 fields (shift, mask) goes through one
    ``vpdpbusd`` into its own accumulator (four independent chains, held in registers); the four are
    added and reduced to one int32 at the end. Integer arithmetic: exact in any order.
    """
    sig = types.int32(codes, planes, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        c_a = context.make_array(signature.args[0])(context, builder, args[0])
        p_a = context.make_array(signature.args[1])(context, builder, args[1])
        v16 = ir.VectorType(ir.IntType(32), 16)
        v64 = ir.VectorType(ir.IntType(8), 64)
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        slots = [cgutils.alloca_once_value(builder, ir.Constant(v16, [0] * 16)) for _ in range(4)]
        row_bytes = builder.extract_value(p_a.strides, 0)
        three = ir.Constant(v64, [3] * 64)
        with cgutils.for_range(builder, args[2]) as loop:
            at = builder.mul(loop.index, ir.Constant(loop.index.type, 64))
            c = builder.load(builder.bitcast(builder.gep(c_a.data, [at]), v64.as_pointer()), align=1)
            for i in range(4):
                f = c if i == 0 else builder.lshr(c, ir.Constant(v64, [2 * i] * 64))
                if i < 3:
                    f = builder.and_(f, three)
                pat = builder.add(builder.mul(row_bytes, ir.Constant(row_bytes.type, i)), at)
                q = builder.load(builder.bitcast(builder.gep(p_a.data, [pat]), v64.as_pointer()), align=1)
                acc = builder.call(dp, [builder.load(slots[i]), builder.bitcast(f, v16), builder.bitcast(q, v16)])
                builder.store(acc, slots[i])
        vs = [builder.load(slot) for slot in slots]
        total = builder.add(builder.add(vs[0], vs[1]), builder.add(vs[2], vs[3]))
        red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [v16]),
                                             "llvm.vector.reduce.add.v16i32")
        return builder.call(red, [total])

    return sig, codegen


@numba.njit(cache=True, nogil=True, boundscheck=False)
def int_matmul_vnni(codes: np.ndarray, planes: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[m, n] = sum_j sum_i planes[m, i, j] * field_i(codes[n, j])``: ``ternary._int_matmul``'s result."""
    n_rows, kb = codes.shape
    steps = kb // 64
    kv = 64 * steps
    for m in range(planes.shape[0]):
        p = planes[m]
        for n in range(n_rows):
            row = codes[n]
            s = _row_dot(row, p, steps)
            for j in range(kv, kb):
                b = np.int32(row[j])
                s += (np.int32(p[0, j]) * (b & 3) + np.int32(p[1, j]) * ((b >> 2) & 3)
                      + np.int32(p[2, j]) * ((b >> 4) & 3) + np.int32(p[3, j]) * (b >> 6))
            out[m, n] = s

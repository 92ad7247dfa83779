"""The numba kernel of the fused decode path: one compiled loop over a decode function's instructions.

``executor/_vm.c`` is the same kernel in C, used instead when it is built (``executor/native.py``);
the two compute the same bits. This one runs where no C compiler built that one.

``executor/fused.py`` translates the compiled decode function of a stateful package into a table of
instructions (one row of :data:`WIDTH` int64 per op); :func:`run` walks that table in one numba call,
so a decode call costs a few microseconds of dispatch instead of one Python round trip per MIL op.

Every value lives in a float32 buffer (buffer 0 the arena of per-call values and small
constants, then the KV states, then large dense constants): fp16-typed results are rounded to fp16
after the op (:func:`_to_f16`, IEEE round-to-nearest-even, as the interpreter's ``finish``), integer
and bool values are held exactly as floats (|v| < 2**24, checked at load and on the inputs). An
operand is ``(buffer, offset, 4 strides)``; broadcasting and transposes are zero / permuted strides.
The arithmetic follows the interpreter op by op: float32 on fp16 values, numpy's pairwise summation
for ``reduce_mean`` / ``softmax`` sums, ternary matmuls in integers from the 2-bit codes when the
activations are int8 multiples of ``2**-7`` (exact, as ``executor/ternary.py``), fp16 weight matvecs
in the order of ``executor/half.py``. Where the interpreter calls BLAS (attention's small matmuls, a
float32 weight) the sums here run in another order (the attention scores' dot products in SIMD lanes,
the attention context in index order with fused multiply-adds as OpenBLAS, other products in index
order): results agree to float32 rounding.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from bitnet_coreml.executor._half_kernels import _matvec, _widen
from bitnet_coreml.executor._layout import (  # noqa: F401 - re-exported: the layout's names as before
    ABS,
    ADD,
    AND,
    BINARY_LAST,
    CEIL,
    CLIP,
    COPY,
    DIV,
    E_INDEX,
    E_OK,
    E_SLICE,
    EQ,
    EXP,
    FLOOR,
    GATHER,
    GATHER_HALF,
    GE,
    GT,
    LE,
    LT,
    MATMUL,
    MAX,
    MIN,
    MM_HALF,
    MM_TERN,
    MUL,
    NE,
    NEG,
    NOT,
    OP,
    OR,
    OUT,
    R_BOOL,
    R_F16,
    R_INT,
    R_NONE,
    R_UINT,
    RELU,
    RMAX,
    RMEAN,
    RMIN,
    RND,
    RSQRT,
    RSUM,
    SCATTER,
    SELECT,
    SIGMOID,
    SILU,
    SOFTMAX,
    SQRT,
    SQUARE,
    SUB,
    TERNARY_LAST,
    TRUNC,
    UNARY_LAST,
    WIDTH,
    XOR,
    A,
    B,
    C,
    D,
    P,
)
from bitnet_coreml.executor._ternary_kernels import int_matmul


@intrinsic
def _f16(typingctx, x):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``float32(float16(x))``: IEEE round to nearest even, overflow to inf (fptrunc / fpext)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.float32), codegen


@numba.njit(inline="always")
def _round(v, mode, bits):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    if mode == R_NONE:
        return v
    if mode == R_F16:
        return _f16(np.float32(v))
    if mode == R_BOOL:
        return np.float32(1.0) if v != 0 else np.float32(0.0)
    t = np.trunc(v) if np.isfinite(v) else np.float32(0.0)
    if mode == R_UINT:
        t = np.float32(np.int64(t) & ((np.int64(1) << bits) - 1))
    return np.float32(t)


@numba.njit(inline="always")
def _bin(op, x, y):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    if op == ADD:
        return x + y
    if op == SUB:
        return x - y
    if op == MUL:
        return x * y
    if op == DIV:
        return x / y
    if op == MAX:
        return x if (x >= y or x != x) else y
    if op == MIN:
        return x if (x <= y or x != x) else y
    if op == EQ:
        return np.float32(x == y)
    if op == NE:
        return np.float32(x != y)
    if op == LT:
        return np.float32(x < y)
    if op == LE:
        return np.float32(x <= y)
    if op == GT:
        return np.float32(x > y)
    if op == GE:
        return np.float32(x >= y)
    if op == AND:
        return np.float32(x != 0 and y != 0)
    if op == OR:
        return np.float32(x != 0 or y != 0)
    return np.float32((x != 0) != (y != 0))  # XOR


@numba.njit(inline="always")
def _un(op, x, e):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    if op == ABS:
        return abs(x)
    if op == FLOOR:
        return np.floor(x)
    if op == CEIL:
        return np.ceil(x)
    if op == RELU:
        return x if x > 0 else (x if x != x else np.float32(0.0))
    if op == RSQRT:
        return np.float32(1.0) / np.float32(math.sqrt(np.float32(x + e)))
    if op == COPY:
        return x
    if op == SQRT:
        return np.float32(math.sqrt(x))
    if op == EXP:
        return np.float32(math.exp(x))
    if op == NEG:
        return -x
    if op == SIGMOID:
        return np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-x)))
    if op == SILU:
        return x * (np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-x))))
    if op == SQUARE:
        return x * x
    if op == NOT:
        return np.float32(x == 0)
    return np.trunc(x)  # TRUNC


@numba.njit(inline="always")
def _leaf(buf, off, n, st):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """numpy's pairwise sum of ``n <= 128`` values: sequential below 8, else 8 partial sums."""
    if n < 8:
        res = buf[off] * np.float32(0.0)  # a float32 zero
        for i in range(n):
            res += buf[off + i * st]
        return res
    r0 = buf[off]
    r1 = buf[off + st]
    r2 = buf[off + 2 * st]
    r3 = buf[off + 3 * st]
    r4 = buf[off + 4 * st]
    r5 = buf[off + 5 * st]
    r6 = buf[off + 6 * st]
    r7 = buf[off + 7 * st]
    i = 8
    while i < n - (n % 8):
        b = off + i * st
        r0 += buf[b]
        r1 += buf[b + st]
        r2 += buf[b + 2 * st]
        r3 += buf[b + 3 * st]
        r4 += buf[b + 4 * st]
        r5 += buf[b + 5 * st]
        r6 += buf[b + 6 * st]
        r7 += buf[b + 7 * st]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += buf[off + i * st]
        i += 1
    return res


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _pairwise(buf, off, n, st):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """numpy's float32 pairwise sum of ``n`` values (``sum(first n2) + sum(rest)`` above 128, n2 a
    multiple of 8 near n/2), evaluated with an explicit stack (numba's cache mishandles recursion)."""
    if n <= 128:
        return _leaf(buf, off, n, st)
    offs = np.empty(64, dtype=np.int64)
    ns = np.empty(64, dtype=np.int64)
    stage = np.zeros(64, dtype=np.int8)
    vals = np.empty(64, dtype=np.float32)
    nv = 0
    offs[0], ns[0], sp = off, n, 1
    while sp > 0:
        top = sp - 1
        o, m = offs[top], ns[top]
        if m <= 128:
            vals[nv] = _leaf(buf, o, m, st)
            nv += 1
            sp -= 1
            continue
        m2 = m // 2
        m2 -= m2 % 8
        if stage[top] == 0:  # the first part
            stage[top] = 1
            offs[sp], ns[sp], stage[sp] = o, m2, 0
            sp += 1
        elif stage[top] == 1:  # the rest
            stage[top] = 2
            offs[sp], ns[sp], stage[sp] = o + m2 * st, m - m2, 0
            sp += 1
        else:  # both done: their sum replaces them
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
            sp -= 1
    return vals[0]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def pairwise_sum(x: np.ndarray) -> np.float32:  # pragma: no cover - compiled
    """The kernel's sum of a float32 vector (tests compare it with numpy's)."""
    return _pairwise(x, 0, x.size, 1)


# --- contiguous elementwise loops (LLVM vectorises them: one loop per op, no strides) -------------


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _ew_vv(op, o, a, b):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``o = a <op> b`` elementwise, all three contiguous and of one size."""
    n = o.size
    if op == ADD:
        for i in range(n):
            o[i] = a[i] + b[i]
    elif op == SUB:
        for i in range(n):
            o[i] = a[i] - b[i]
    elif op == MUL:
        for i in range(n):
            o[i] = a[i] * b[i]
    elif op == DIV:
        for i in range(n):
            o[i] = a[i] / b[i]
    elif op == AND:
        for i in range(n):
            o[i] = np.float32(a[i] != 0 and b[i] != 0)
    elif op == OR:
        for i in range(n):
            o[i] = np.float32(a[i] != 0 or b[i] != 0)
    else:
        for i in range(n):
            o[i] = _bin(op, a[i], b[i])


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _ew_vs(op, o, a, y):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``o = a <op> y`` elementwise with a scalar ``y``."""
    n = o.size
    if op == ADD:
        for i in range(n):
            o[i] = a[i] + y
    elif op == SUB:
        for i in range(n):
            o[i] = a[i] - y
    elif op == MUL:
        for i in range(n):
            o[i] = a[i] * y
    elif op == DIV:
        for i in range(n):
            o[i] = a[i] / y
    elif op == MAX:
        for i in range(n):
            x = a[i]
            o[i] = x if (x >= y or x != x) else y
    elif op == MIN:
        for i in range(n):
            x = a[i]
            o[i] = x if (x <= y or x != x) else y
    elif op == EQ:
        for i in range(n):
            o[i] = np.float32(a[i] == y)
    elif op == GT:
        for i in range(n):
            o[i] = np.float32(a[i] > y)
    elif op == LT:
        for i in range(n):
            o[i] = np.float32(a[i] < y)
    else:
        for i in range(n):
            o[i] = _bin(op, a[i], y)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _un_v(op, o, a, e):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``o = <op>(a)`` elementwise, both contiguous."""
    n = o.size
    if op == ABS:
        for i in range(n):
            o[i] = abs(a[i])
    elif op == FLOOR:
        for i in range(n):
            o[i] = np.floor(a[i])
    elif op == COPY:
        for i in range(n):
            o[i] = a[i]
    elif op == RELU:
        for i in range(n):
            x = a[i]
            o[i] = x if (x > 0 or x != x) else np.float32(0.0)
    else:
        for i in range(n):
            o[i] = _un(op, a[i], e)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _clip_v(o, a, lo, hi):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``o = minimum(maximum(a, lo), hi)`` with scalar bounds."""
    for i in range(o.size):
        x = a[i]
        x = x if (x >= lo or x != x) else lo
        o[i] = x if (x <= hi or x != x) else hi


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _extreme(x, smallest):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The maximum (``smallest``: minimum) of a contiguous vector, NaN if it holds one (numpy's max /
    min): 16 running extremes side by side, then combined."""
    n = x.size
    lanes = np.empty(16, dtype=np.float32)
    lanes[:] = x[0]
    nan = 0
    nv = n - n % 16
    for i0 in range(0, nv, 16):
        for lane in range(16):
            v = x[i0 + lane]
            nan += v != v
            if smallest:
                lanes[lane] = v if v < lanes[lane] else lanes[lane]
            else:
                lanes[lane] = v if v > lanes[lane] else lanes[lane]
    r = lanes[0]
    for lane in range(1, 16):
        r = _bin(MIN if smallest else MAX, r, lanes[lane])
    for i in range(nv, n):
        r = _bin(MIN if smallest else MAX, r, x[i])
    return np.float32(np.nan) if nan else r


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _quantized(x, planes, qsum):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """True when every ``x`` is ``q / 128`` with ``q`` an int8 (BitLinear's quantised activations, as
    ``ternary._int_scale`` asks); then ``planes[m, i, j] = q[m, 4j + i]`` and ``qsum[m] = sum q[m]``."""
    m_rows, k = x.shape
    bad = 0
    for m in range(m_rows):
        xm = x[m]
        for j in range(k):
            v = xm[j] * np.float32(128.0)
            bad += (v != np.floor(v)) | (v < -128.0) | (v > 127.0)
    if bad:
        return False
    for m in range(m_rows):
        xm = x[m]
        s = np.int32(0)
        for jb in range(k // 4):
            for i in range(4):
                q = np.int8(xm[4 * jb + i] * np.float32(128.0))
                planes[m, i, jb] = q
                s += q
        qsum[m] = s
    return True


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _tern_f32(codes, x, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``out[m, n] = sum_j x[m, j] * w(codes[n, j])`` (w = field - 1, each product exact) in the C
    kernel's fixed order (``tern_f32`` in ``_vm_ops.h``): 64 running sums, element j of the first
    k - k % 64 into sum j % 64, s[l] = (a[l] + a[16 + l]) + (a[32 + l] + a[48 + l]), then
    s[l] += s[l + h] for h = 8, 4, 2, 1, plus the rest summed in index order."""
    m_rows, k = x.shape
    k64 = k - k % 64
    a = np.empty(64, dtype=np.float32)
    s = np.empty(16, dtype=np.float32)
    for n in range(codes.shape[0]):
        row = codes[n]
        for m in range(m_rows):
            xm = x[m]
            a[:] = 0.0
            for j in range(0, k64, 64):
                for ll in range(64):
                    jj = j + ll
                    a[ll] += xm[jj] * np.float32(np.int32((row[jj >> 2] >> (2 * (jj & 3))) & 3) - 1)
            for ll in range(16):
                s[ll] = (a[ll] + a[16 + ll]) + (a[32 + ll] + a[48 + ll])
            h = 8
            while h >= 1:
                for ll in range(h):
                    s[ll] += s[ll + h]
                h //= 2
            t = np.float32(0.0)
            for j in range(k64, k):
                t += xm[j] * np.float32(np.int32((row[j >> 2] >> (2 * (j & 3))) & 3) - 1)
            out[m, n] = s[0] + t


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _round_v(o, mode, bits):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """Round ``o`` in place to the output dtype (fp16: one vectorised fptrunc / fpext pass)."""
    if mode == R_F16:
        for i in range(o.size):
            o[i] = _f16(o[i])
    elif mode != R_NONE:
        for i in range(o.size):
            o[i] = _round(o[i], mode, bits)



@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "contract"})
def _dot(a, b):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``sum(a * b)`` in float32, vectorised: LLVM may reorder the sum into SIMD lanes and fuse the
    multiply-adds (``reassoc`` / ``contract`` only: NaN / inf semantics stay IEEE), so the result
    differs from an in-order sum by float32 rounding (|err| <= k * 2**-24 * sum(|a * b|) for any order)."""
    acc = np.float32(0.0)
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _mm_nt(x, y, out, mode):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``out = x @ y.T`` (float32; attention scores: the query heads of a KV head against each cache
    position), each output a :func:`_dot` over a contiguous row pair; a row of ``y`` is read once."""
    m_rows = x.shape[0]
    for n in range(y.shape[0]):
        yn = y[n]
        for m in range(m_rows):
            out[m, n] = _round(_dot(x[m], yn), mode, 0)


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"contract"})
def _mm_nn(x, y, out, mode):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``out = x @ y`` (float32; attention context: probabilities times the cached values): each
    output's sum over k in index order with fused multiply-adds (``contract``: as OpenBLAS's sgemm,
    which gives numpy's ``x @ y`` bit for bit on AVX-512), the outputs of a row side by side in
    contiguous (vectorised) runs, all rows of ``x`` against one row of ``y`` so ``y`` is read once."""
    m_rows, k = x.shape
    n_cols = y.shape[1]
    acc = np.zeros((m_rows, n_cols), dtype=np.float32)
    for j in range(k):
        yj = y[j]
        for m in range(m_rows):
            xv = x[m, j]
            am = acc[m]
            for n in range(n_cols):
                am[n] += xv * yj[n]
    for m in range(m_rows):
        for n in range(n_cols):
            out[m, n] = _round(acc[m, n], mode, 0)


@numba.njit(inline="always")
def _off(ins, base, i0, i1, i2, i3):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    return ins[base + 1] + i0 * ins[base + 2] + i1 * ins[base + 3] + i2 * ins[base + 4] + i3 * ins[base + 5]


@intrinsic
def _ptr(typingctx, addr, dtype):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """The int64 ``addr`` as a pointer to ``dtype`` (a numba type given as a literal class)."""
    ty = dtype.dtype if isinstance(dtype, types.DTypeSpec) else dtype.instance_type
    sig = types.CPointer(ty)(types.int64, dtype)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@numba.njit(inline="always")
def _f32(bufs, i):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """Buffer ``i`` as a float32 array (addresses, not a typed list: numba would compile the list's
    methods in every process, ~20 MiB of LLVM memory)."""
    return numba.carray(_ptr(bufs[i, 0], types.float32), (bufs[i, 1],))


@numba.njit(inline="always")
def _u8(terns, i):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    return numba.carray(_ptr(terns[i, 0], types.uint8), (terns[i, 1], terns[i, 2]))


@numba.njit(inline="always")
def _u16(halves, i):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    return numba.carray(_ptr(halves[i, 0], types.uint16), (halves[i, 1], halves[i, 2], halves[i, 3]))


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def run(prog, bufs, terns, halves):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """Run every instruction of ``prog``; returns (error code, instruction index).

    ``bufs``: ``[address, length]`` of each float32 buffer; ``terns``: ``[address, N, K/4]`` of each
    ternary weight's codes; ``halves``: ``[address, blocks, K, 64]`` of each fp16 weight (see :func:`_f32`).
    """
    for pc in range(prog.shape[0]):
        ins = prog[pc]
        op = ins[OP]
        mode = ins[RND]
        bits = ins[P + 9]
        d0, d1, d2, d3 = ins[D], ins[D + 1], ins[D + 2], ins[D + 3]
        out = _f32(bufs, ins[OUT])
        fast = ins[P + 8]  # 1: operands contiguous like the output; 2: B a scalar (3: B, C scalars)
        if fast != 0 and op <= TERNARY_LAST:
            n = d0 * d1 * d2 * d3
            oo, ao = ins[OUT + 1], ins[A + 1]
            o = out[oo:oo + n]
            a = _f32(bufs, ins[A])[ao:ao + n]
            if op <= BINARY_LAST:
                if fast == 1:
                    _ew_vv(op, o, a, _f32(bufs, ins[B])[ins[B + 1]:ins[B + 1] + n])
                else:
                    _ew_vs(op, o, a, _f32(bufs, ins[B])[ins[B + 1]])
            elif op <= UNARY_LAST:
                _un_v(op, o, a, _f32(bufs, ins[B])[ins[B + 1]] if op == RSQRT else np.float32(0.0))
            else:
                _clip_v(o, a, _f32(bufs, ins[B])[ins[B + 1]], _f32(bufs, ins[C])[ins[C + 1]])
            if not (mode == R_BOOL and ((EQ <= op <= XOR) or op == NOT)):  # comparisons give 0 / 1 already
                _round_v(o, mode, bits)
        elif op <= BINARY_LAST:
            xa = _f32(bufs, ins[A])
            xb = _f32(bufs, ins[B])
            for i0 in range(d0):
                for i1 in range(d1):
                    for i2 in range(d2):
                        oo = _off(ins, OUT, i0, i1, i2, 0)
                        ao = _off(ins, A, i0, i1, i2, 0)
                        bo = _off(ins, B, i0, i1, i2, 0)
                        so, sa, sb = ins[OUT + 5], ins[A + 5], ins[B + 5]
                        for i3 in range(d3):
                            out[oo + i3 * so] = _round(_bin(op, xa[ao + i3 * sa], xb[bo + i3 * sb]), mode, bits)
        elif op <= UNARY_LAST:
            xa = _f32(bufs, ins[A])
            eps = _f32(bufs, ins[B])[ins[B + 1]] if op == RSQRT else np.float32(0.0)
            for i0 in range(d0):
                for i1 in range(d1):
                    for i2 in range(d2):
                        oo = _off(ins, OUT, i0, i1, i2, 0)
                        ao = _off(ins, A, i0, i1, i2, 0)
                        so, sa = ins[OUT + 5], ins[A + 5]
                        for i3 in range(d3):
                            out[oo + i3 * so] = _round(_un(op, xa[ao + i3 * sa], eps), mode, bits)
        elif op <= TERNARY_LAST:
            xa = _f32(bufs, ins[A])
            xb = _f32(bufs, ins[B])
            xc = _f32(bufs, ins[C])
            for i0 in range(d0):
                for i1 in range(d1):
                    for i2 in range(d2):
                        for i3 in range(d3):
                            a = xa[_off(ins, A, i0, i1, i2, i3)]
                            b = xb[_off(ins, B, i0, i1, i2, i3)]
                            c = xc[_off(ins, C, i0, i1, i2, i3)]
                            if op == SELECT:
                                v = b if a != 0 else c
                            else:  # CLIP: minimum(maximum(x, alpha), beta)
                                v = _bin(MIN, _bin(MAX, a, b), c)
                            out[_off(ins, OUT, i0, i1, i2, i3)] = _round(v, mode, bits)
        elif op <= SOFTMAX:
            # the input's last axis (P: its length n and stride) reduced; output dims d0..d2 (d3 = 1),
            # or for SOFTMAX the same shape as the input
            xa = _f32(bufs, ins[A])
            n = ins[P]
            st = ins[A + 5]
            for i0 in range(d0):
                for i1 in range(d1):
                    for i2 in range(d2):
                        ao = _off(ins, A, i0, i1, i2, 0)
                        if op == RMAX or op == RMIN or op == SOFTMAX:
                            if st == 1:
                                r = _extreme(xa[ao:ao + n], op == RMIN)
                            else:
                                r = xa[ao]
                                for i in range(1, n):
                                    r = _bin(MAX if op != RMIN else MIN, r, xa[ao + i * st])
                            if op == SOFTMAX:
                                so = ins[OUT + 5]
                                oo = _off(ins, OUT, i0, i1, i2, 0)
                                for i in range(n):  # e = exp(x - m) as float32, into the output
                                    out[oo + i * so] = np.float32(math.exp(np.float32(xa[ao + i * st] - r)))
                                s = _pairwise(out, oo, n, so)
                                for i in range(n):
                                    out[oo + i * so] = _round(out[oo + i * so] / s, mode, bits)
                                continue
                        else:
                            r = _pairwise(xa, ao, n, st)
                            if op == RMEAN:
                                r = r / np.float32(n)
                        out[_off(ins, OUT, i0, i1, i2, 0)] = _round(r, mode, bits)
        elif op == MM_TERN or op == MM_HALF:
            # A: rows [M, K] (row stride A+4, column stride A+5); output rows contiguous [M, N]
            xa = _f32(bufs, ins[A])
            m_rows, k, n_out = ins[P], ins[P + 1], ins[P + 2]
            oo = ins[OUT + 1]
            if op == MM_TERN:
                codes = _u8(terns, ins[P + 3])
                x2 = xa[ins[A + 1]:ins[A + 1] + m_rows * k].reshape((m_rows, k))  # rows are contiguous
                planes = np.empty((m_rows, 4, k // 4), dtype=np.int8)
                qsum = np.zeros(m_rows, dtype=np.int32)
                exact = _quantized(x2, planes, qsum)
                if exact:  # executor/ternary.py's integer path, same kernel
                    acc = np.empty((m_rows, n_out), dtype=np.int32)
                    int_matmul(codes, planes, acc)
                    for m in range(m_rows):
                        for nn in range(n_out):
                            out[oo + m * n_out + nn] = np.float32(acc[m, nn] - qsum[m]) * np.float32(0.0078125)
                else:  # other activations (weight-only linears): the float matvec on the codes
                    _tern_f32(codes, x2, out[oo:oo + m_rows * n_out].reshape((m_rows, n_out)))
            else:  # executor/half.py's kernel
                blocks = _u16(halves, ins[P + 3])
                xr = np.empty((m_rows, k), dtype=np.float32)
                for m in range(m_rows):
                    for j in range(k):
                        xr[m, j] = xa[ins[A + 1] + m * ins[A + 4] + j * ins[A + 5]]
                res = np.empty((m_rows, blocks.shape[0] * blocks.shape[2]), dtype=np.float32)
                _matvec(blocks, xr, res)
                for m in range(m_rows):
                    for nn in range(n_out):
                        out[oo + m * n_out + nn] = res[m, nn]
            if mode != R_NONE:
                for i in range(m_rows * n_out):
                    out[oo + i] = _round(out[oo + i], mode, bits)
        elif op == MATMUL:
            # out[i0, i1, m, n] = sum_k A[i0, i1, m, k] * B[i0, i1, k, n]; P: K, and the k strides of A, B
            xa = _f32(bufs, ins[A])
            xb = _f32(bufs, ins[B])
            k = ins[P]
            ska, skb = ins[P + 1], ins[P + 2]
            sna, sma = ins[B + 5], ins[A + 4]
            for i0 in range(d0):
                for i1 in range(d1):
                    ao = ins[A + 1] + i0 * ins[A + 2] + i1 * ins[A + 3]
                    bo = ins[B + 1] + i0 * ins[B + 2] + i1 * ins[B + 3]
                    oo = ins[OUT + 1] + i0 * ins[OUT + 2] + i1 * ins[OUT + 3]
                    dense = ska == 1 and sma == k and ins[OUT + 5] == 1 and ins[OUT + 4] == d3
                    if dense and skb == 1 and sna == k:  # x @ y^T, y rows contiguous (attention scores)
                        _mm_nt(xa[ao:ao + d2 * k].reshape((d2, k)), xb[bo:bo + d3 * k].reshape((d3, k)),
                               out[oo:oo + d2 * d3].reshape((d2, d3)), mode)
                    elif dense and sna == 1 and skb == d3:  # x @ y, y rows contiguous (attention values)
                        _mm_nn(xa[ao:ao + d2 * k].reshape((d2, k)), xb[bo:bo + k * d3].reshape((k, d3)),
                               out[oo:oo + d2 * d3].reshape((d2, d3)), mode)
                    else:
                        for m in range(d2):
                            for nn in range(d3):
                                acc0 = np.float32(0.0)
                                for j in range(k):
                                    acc0 += xa[ao + m * sma + j * ska] * xb[bo + j * skb + nn * sna]
                                out[oo + m * ins[OUT + 4] + nn * ins[OUT + 5]] = _round(acc0, mode, bits)
        elif op == GATHER_HALF or op == GATHER:
            # rows of a table [R, W] (P: R, W, half index or -1); indices in A (d0*d1*d2 of them)
            xa = _f32(bufs, ins[A])
            n_rows, width = ins[P], ins[P + 1]
            validate = ins[P + 3]
            cnt = 0
            for i0 in range(d0):
                for i1 in range(d1):
                    for i2 in range(d2):
                        idx = np.int64(xa[_off(ins, A, i0, i1, i2, 0)])
                        if idx < 0:
                            if validate:
                                return E_INDEX, pc
                            idx += n_rows
                        if idx < 0 or idx >= n_rows:
                            return E_INDEX, pc
                        oo = ins[OUT + 1] + cnt * width
                        if op == GATHER_HALF:
                            blocks = _u16(halves, ins[P + 2])
                            bw = blocks.shape[2]
                            bb, lane = idx // bw, idx % bw
                            for j in range(width):
                                out[oo + j] = _round(_widen(blocks[bb, j, lane]), mode, bits)
                        else:
                            xt = _f32(bufs, ins[B])
                            to = ins[B + 1] + idx * ins[B + 4]
                            for j in range(width):
                                out[oo + j] = _round(xt[to + j * ins[B + 5]], mode, bits)
                        cnt += 1
        elif op == SCATTER:
            # update A (shape d0..d3) into O at begin (B: 4 values; C: end, checked); P..P+3: O's full shape
            xa = _f32(bufs, ins[A])
            xb = _f32(bufs, ins[B])
            base = ins[OUT + 1]
            for i in range(4):
                bgn = np.int64(xb[ins[B + 1] + i * ins[B + 5]])
                if bgn < 0:
                    bgn += ins[P + i]
                end = np.int64(_f32(bufs, ins[C])[ins[C + 1] + i * ins[C + 5]])
                if end < 0:
                    end += ins[P + i]
                if bgn < 0 or bgn + ins[D + i] > ins[P + i] or end != bgn + ins[D + i]:
                    return E_SLICE, pc
                base += bgn * ins[OUT + 2 + i]
            so0, so1, so2, so3 = ins[OUT + 2], ins[OUT + 3], ins[OUT + 4], ins[OUT + 5]
            for i0 in range(d0):
                for i1 in range(d1):
                    for i2 in range(d2):
                        for i3 in range(d3):
                            out[base + i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3] = _round(
                                xa[_off(ins, A, i0, i1, i2, i3)], mode, bits)
    return E_OK, -1

/* The C kernel of the fused decode path: executor/_vm.py's numba kernel, op for op, in C.
 *
 * executor/fused.py translates a stateful package's decode function into a table of instructions (one
 * row of VM_WIDTH int64 per op, layout in executor/_layout.py, which generates _vm_layout.h);
 * vm_run() walks it in one call. Built by executor/native.py (`make setup`, or
 * `python -m bitnet_coreml.executor.native build`) with -O3 -march=native -ffp-contract=off, loaded
 * with ctypes; nothing here calls back into Python.
 *
 * Same semantics and the same arithmetic order as the numba kernel (the tests compare the two bit for
 * bit): float32 on fp16 values rounded to fp16 after fp16-typed ops (round to nearest even), numpy's
 * pairwise summation for reduce_mean / reduce_sum / softmax sums, the ternary matmul in integers from
 * the 2-bit codes when the activations are int8 multiples of 2**-7 (AVX-512 VNNI when the compiler
 * targets it, a portable loop otherwise: integer sums, equal in any order), other activations (weight-only
 * linears) times the codes in float32 in tern_f32's fixed 64-lane order, the fp16 matvec in index
 * order (a multiply then an add, F16C / AVX-512 widening), the attention scores' dot products in the
 * lane order LLVM gives the numba kernel on AVX-512 (4 x 16 lanes of fused multiply-adds, then a
 * fixed reduction tree, written out here so every machine sums in that order), the attention context
 * in index order with fused multiply-adds, exp / sqrt from the C library as numba calls them (exp of
 * an argument below -104 is +0 without the call: the masked attention positions; softmax's exp 8 at a
 * time on glibc, computed as glibc's expf computes it: exp_shifted).
 * One addition: a buffer may hold fp16 bits (an fp16 package's KV cache, executor/fused.py decides),
 * written only by SCATTER and read only as y by the attention MATMULs (see vm_run): the same values,
 * half the bytes.
 */
#include "_vm_ops.h"

/* ---- the instruction loop ---------------------------------------------------------------------------- */

/* bufs rows: [address, length, kind]; kind 1: the buffer holds fp16 bits (a KV state; see vm_run) */
#define BUF(i) ((float *)(intptr_t)bufs[3 * (i)])
#define HBUF(i) ((uint16_t *)(intptr_t)bufs[3 * (i)])
#define HALF(i) (bufs[3 * (i) + 2] == 1)

static inline i64 off4(const i64 *ins, int base, i64 i0, i64 i1, i64 i2, i64 i3) {
    return ins[base + 1] + i0 * ins[base + 2] + i1 * ins[base + 3] + i2 * ins[base + 4] + i3 * ins[base + 5];
}

/* one loop per op (the op's switch outside the loop, so each loop vectorises) */
#define EW_BIN(EXPR)                                                                   \
    switch (op) {                                                                      \
    case VM_ADD: EXPR(x + y); break;                                                   \
    case VM_SUB: EXPR(x - y); break;                                                   \
    case VM_MUL: EXPR(x * y); break;                                                   \
    case VM_DIV: EXPR(x / y); break;                                                   \
    case VM_MAX: EXPR((x >= y || x != x) ? x : y); break;                              \
    case VM_MIN: EXPR((x <= y || x != x) ? x : y); break;                              \
    case VM_EQ: EXPR((float)(x == y)); break;                                          \
    case VM_NE: EXPR((float)(x != y)); break;                                          \
    case VM_LT: EXPR((float)(x < y)); break;                                           \
    case VM_LE: EXPR((float)(x <= y)); break;                                          \
    case VM_GT: EXPR((float)(x > y)); break;                                           \
    case VM_GE: EXPR((float)(x >= y)); break;                                          \
    case VM_AND: EXPR((float)(x != 0 && y != 0)); break;                               \
    case VM_OR: EXPR((float)(x != 0 || y != 0)); break;                                \
    default: EXPR((float)((x != 0) != (y != 0))); break;                               \
    }

static void ew_vv(i64 op, float *o, const float *a, const float *b, i64 n) {
#define VV(E) for (i64 i = 0; i < n; i++) { float x = a[i], y = b[i]; o[i] = (E); }
    EW_BIN(VV)
#undef VV
}

static void ew_vs(i64 op, float *o, const float *a, float y, i64 n) {
#define VS(E) for (i64 i = 0; i < n; i++) { float x = a[i]; o[i] = (E); }
    EW_BIN(VS)
#undef VS
}

static void un_v(i64 op, float *o, const float *a, float e, i64 n) {
    switch (op) {
    case VM_COPY: for (i64 i = 0; i < n; i++) o[i] = a[i]; break;
    case VM_ABS: for (i64 i = 0; i < n; i++) o[i] = fabsf(a[i]); break;
    case VM_FLOOR: for (i64 i = 0; i < n; i++) o[i] = floorf(a[i]); break;
    case VM_CEIL: for (i64 i = 0; i < n; i++) o[i] = ceilf(a[i]); break;
    case VM_TRUNC: for (i64 i = 0; i < n; i++) o[i] = truncf(a[i]); break;
    case VM_NEG: for (i64 i = 0; i < n; i++) o[i] = -a[i]; break;
    case VM_SQUARE: for (i64 i = 0; i < n; i++) o[i] = a[i] * a[i]; break;
    case VM_SQRT: for (i64 i = 0; i < n; i++) o[i] = sqrtf(a[i]); break;
    case VM_RSQRT: for (i64 i = 0; i < n; i++) o[i] = 1.0f / sqrtf(a[i] + e); break;
    case VM_NOT: for (i64 i = 0; i < n; i++) o[i] = (float)(a[i] == 0); break;
    case VM_RELU: for (i64 i = 0; i < n; i++) { float x = a[i]; o[i] = (x > 0 || x != x) ? x : 0.0f; } break;
    default: for (i64 i = 0; i < n; i++) o[i] = un(op, a[i], e);
    }
}


/* Run every instruction of prog (n_ins rows of VM_WIDTH); returns an error code (VM_E_*), the failing
 * instruction in *pc (-1 when none), -1 if memory ran out, -2 if an instruction other than the two below
 * meets an fp16 buffer.
 * bufs: [address, length, kind] of each buffer: kind 0 float32, kind 1 fp16 bits, which only a SCATTER
 * writes (its values rounded to fp16 anyway: exact) and only the dense attention MATMULs read (as y,
 * widened: exact), so a KV state held in fp16 gives the same results at half the bytes read;
 * terns: [address, N, K/4] of each ternary weight's codes; halves: [address, blocks, K, 64] of each
 * fp16 weight (as executor/_vm.py's run, whose bufs are [address, length]). */
i64 vm_run(const i64 *prog, i64 n_ins, const i64 *bufs, const i64 *terns, const i64 *halves, i64 *pc_out) {
    *pc_out = -1;
    for (i64 pc = 0; pc < n_ins; pc++) {
        const i64 *ins = prog + pc * VM_WIDTH;
        i64 op = ins[VM_OP], mode = ins[VM_RND], bits = ins[VM_P + 9];
        i64 d0 = ins[VM_D], d1 = ins[VM_D + 1], d2 = ins[VM_D + 2], d3 = ins[VM_D + 3];
        float *out = BUF(ins[VM_OUT]);
        i64 fast = ins[VM_P + 8]; /* 1: operands contiguous like the output; 2: B a scalar (3: B, C scalars) */
        if ((HALF(ins[VM_OUT]) && op != VM_SCATTER) || HALF(ins[VM_A]) || HALF(ins[VM_C])
            || (HALF(ins[VM_B]) && op != VM_MATMUL)) {
            *pc_out = pc;
            return -2;
        }
        if (fast != 0 && op <= VM_TERNARY_LAST) {
            i64 n = d0 * d1 * d2 * d3;
            float *o = out + ins[VM_OUT + 1];
            const float *a = BUF(ins[VM_A]) + ins[VM_A + 1];
            if (op <= VM_BINARY_LAST) {
                if (fast == 1) ew_vv(op, o, a, BUF(ins[VM_B]) + ins[VM_B + 1], n);
                else ew_vs(op, o, a, BUF(ins[VM_B])[ins[VM_B + 1]], n);
            } else if (op <= VM_UNARY_LAST) {
                un_v(op, o, a, op == VM_RSQRT ? BUF(ins[VM_B])[ins[VM_B + 1]] : 0.0f, n);
            } else {
                float lo = BUF(ins[VM_B])[ins[VM_B + 1]], hi = BUF(ins[VM_C])[ins[VM_C + 1]];
                for (i64 i = 0; i < n; i++) {
                    float x = a[i];
                    x = (x >= lo || x != x) ? x : lo;
                    o[i] = (x <= hi || x != x) ? x : hi;
                }
            }
            if (!(mode == VM_R_BOOL && ((VM_EQ <= op && op <= VM_XOR) || op == VM_NOT))) round_v(o, n, mode, bits);
        } else if (op <= VM_BINARY_LAST) {
            const float *xa = BUF(ins[VM_A]), *xb = BUF(ins[VM_B]);
            i64 so = ins[VM_OUT + 5], sa = ins[VM_A + 5], sb = ins[VM_B + 5];
            for (i64 i0 = 0; i0 < d0; i0++)
                for (i64 i1 = 0; i1 < d1; i1++)
                    for (i64 i2 = 0; i2 < d2; i2++) {
                        i64 oo = off4(ins, VM_OUT, i0, i1, i2, 0), ao = off4(ins, VM_A, i0, i1, i2, 0);
                        i64 bo = off4(ins, VM_B, i0, i1, i2, 0);
                        for (i64 i3 = 0; i3 < d3; i3++)
                            out[oo + i3 * so] = rnd(bin(op, xa[ao + i3 * sa], xb[bo + i3 * sb]), mode, bits);
                    }
        } else if (op <= VM_UNARY_LAST) {
            const float *xa = BUF(ins[VM_A]);
            float eps = op == VM_RSQRT ? BUF(ins[VM_B])[ins[VM_B + 1]] : 0.0f;
            i64 so = ins[VM_OUT + 5], sa = ins[VM_A + 5];
            for (i64 i0 = 0; i0 < d0; i0++)
                for (i64 i1 = 0; i1 < d1; i1++)
                    for (i64 i2 = 0; i2 < d2; i2++) {
                        i64 oo = off4(ins, VM_OUT, i0, i1, i2, 0), ao = off4(ins, VM_A, i0, i1, i2, 0);
                        for (i64 i3 = 0; i3 < d3; i3++) out[oo + i3 * so] = rnd(un(op, xa[ao + i3 * sa], eps), mode, bits);
                    }
        } else if (op <= VM_TERNARY_LAST) {
            const float *xa = BUF(ins[VM_A]), *xb = BUF(ins[VM_B]), *xc = BUF(ins[VM_C]);
            for (i64 i0 = 0; i0 < d0; i0++)
                for (i64 i1 = 0; i1 < d1; i1++)
                    for (i64 i2 = 0; i2 < d2; i2++)
                        for (i64 i3 = 0; i3 < d3; i3++) {
                            float a = xa[off4(ins, VM_A, i0, i1, i2, i3)];
                            float b = xb[off4(ins, VM_B, i0, i1, i2, i3)];
                            float c = xc[off4(ins, VM_C, i0, i1, i2, i3)];
                            float v = op == VM_SELECT ? (a != 0 ? b : c) : bin(VM_MIN, bin(VM_MAX, a, b), c);
                            out[off4(ins, VM_OUT, i0, i1, i2, i3)] = rnd(v, mode, bits);
                        }
        } else if (op <= VM_SOFTMAX) {
            /* the input's last axis (P: its length n; stride A+5) reduced; output dims d0..d2 (d3 = 1),
             * or for SOFTMAX the input's shape */
            const float *xa = BUF(ins[VM_A]);
            i64 n = ins[VM_P], st = ins[VM_A + 5];
            for (i64 i0 = 0; i0 < d0; i0++)
                for (i64 i1 = 0; i1 < d1; i1++)
                    for (i64 i2 = 0; i2 < d2; i2++) {
                        i64 ao = off4(ins, VM_A, i0, i1, i2, 0);
                        float r;
                        if (op == VM_RMAX || op == VM_RMIN || op == VM_SOFTMAX) {
                            if (st == 1) {
                                r = extreme(xa + ao, n, op == VM_RMIN);
                            } else {
                                r = xa[ao];
                                for (i64 i = 1; i < n; i++) r = bin(op != VM_RMIN ? VM_MAX : VM_MIN, r, xa[ao + i * st]);
                            }
                            if (op == VM_SOFTMAX) {
                                i64 so = ins[VM_OUT + 5], oo = off4(ins, VM_OUT, i0, i1, i2, 0);
                                if (st == 1 && so == 1) {
                                    exp_shifted(xa + ao, r, out + oo, n); /* e = exp(x - m), as below */
                                } else {
                                    for (i64 i = 0; i < n; i++) { /* e = exp(x - m); below -104 it rounds to +0 */
                                        float d = xa[ao + i * st] - r;  /* (the masked positions: no libm call) */
                                        out[oo + i * so] = d < -104.0f ? 0.0f : expf(d);
                                    }
                                }
                                float s = pairwise(out, oo, n, so);
                                for (i64 i = 0; i < n; i++) out[oo + i * so] = rnd(out[oo + i * so] / s, mode, bits);
                                continue;
                            }
                        } else {
                            r = pairwise(xa, ao, n, st);
                            if (op == VM_RMEAN) r = r / (float)n;
                        }
                        out[off4(ins, VM_OUT, i0, i1, i2, 0)] = rnd(r, mode, bits);
                    }
        } else if (op == VM_MM_TERN || op == VM_MM_HALF) {
            /* A: rows [M, K] (row stride A+4, column stride A+5); output rows contiguous [M, N] */
            const float *xa = BUF(ins[VM_A]);
            i64 m_rows = ins[VM_P], k = ins[VM_P + 1], n_out = ins[VM_P + 2];
            i64 oo = ins[VM_OUT + 1], ao = ins[VM_A + 1], sm = ins[VM_A + 4], sk = ins[VM_A + 5];
            if (op == VM_MM_TERN) {
                const i64 *t = terns + 3 * ins[VM_P + 3];
                const uint8_t *codes = (const uint8_t *)(intptr_t)t[0];
                i64 kb = t[2];
                int8_t *planes = (int8_t *)malloc((size_t)(m_rows * k > 0 ? m_rows * k : 1));
                int32_t *qsum = (int32_t *)malloc((size_t)(m_rows > 0 ? m_rows : 1) * sizeof(int32_t));
                int32_t *acc = (int32_t *)malloc((size_t)(n_out > 0 ? n_out : 1) * sizeof(int32_t));
                if (!planes || !qsum || !acc) { free(planes); free(qsum); free(acc); *pc_out = pc; return -1; }
                if (quantized(xa + ao, m_rows, k, planes, qsum)) { /* rows are contiguous */
                    for (i64 m = 0; m < m_rows; m++) {
                        int_matvec(codes, n_out, kb, planes + m * 4 * kb, acc);
                        for (i64 nn = 0; nn < n_out; nn++)
                            out[oo + m * n_out + nn] = (float)(acc[nn] - qsum[m]) * 0.0078125f;
                    }
                } else { /* other activations (weight-only linears): the float matvec on the codes */
                    tern_f32(codes, n_out, kb, k, xa + ao, m_rows, out + oo);
                }
                free(planes); free(qsum); free(acc);
            } else {
                const i64 *h = halves + 4 * ins[VM_P + 3];
                const uint16_t *blocks = (const uint16_t *)(intptr_t)h[0];
                i64 nb = h[1], bw = h[3];
                float *xr = (float *)malloc((size_t)(k > 0 ? k : 1) * sizeof(float));
                float *res = (float *)malloc((size_t)(nb * bw > 0 ? nb * bw : 1) * sizeof(float));
                if (!xr || !res) { free(xr); free(res); *pc_out = pc; return -1; }
                for (i64 m = 0; m < m_rows; m++) {
                    for (i64 j = 0; j < k; j++) xr[j] = xa[ao + m * sm + j * sk];
                    half_matvec(blocks, nb, h[2], bw, xr, res);
                    memcpy(out + oo + m * n_out, res, (size_t)n_out * sizeof(float));
                }
                free(xr); free(res);
            }
            if (mode != VM_R_NONE) round_v(out + oo, m_rows * n_out, mode, bits);
        } else if (op == VM_MATMUL) {
            /* out[i0, i1, m, n] = sum_k A[i0, i1, m, k] * B[i0, i1, k, n]; P: K, and the k strides of A, B */
            const float *xa = BUF(ins[VM_A]), *xb = BUF(ins[VM_B]);
            const int bh = HALF(ins[VM_B]);
            i64 k = ins[VM_P], ska = ins[VM_P + 1], skb = ins[VM_P + 2];
            i64 sna = ins[VM_B + 5], sma = ins[VM_A + 4];
            for (i64 i0 = 0; i0 < d0; i0++)
                for (i64 i1 = 0; i1 < d1; i1++) {
                    i64 ao = ins[VM_A + 1] + i0 * ins[VM_A + 2] + i1 * ins[VM_A + 3];
                    i64 bo = ins[VM_B + 1] + i0 * ins[VM_B + 2] + i1 * ins[VM_B + 3];
                    i64 oo = ins[VM_OUT + 1] + i0 * ins[VM_OUT + 2] + i1 * ins[VM_OUT + 3];
                    int dense = ska == 1 && sma == k && ins[VM_OUT + 5] == 1 && ins[VM_OUT + 4] == d3;
                    if (dense && skb == 1 && sna == k) { /* x @ y^T, y rows contiguous (attention scores) */
                        if (bh) mm_nt_any(xa + ao, HBUF(ins[VM_B]) + bo, out + oo, d2, k, d3, mode, 1);
                        else mm_nt_any(xa + ao, xb + bo, out + oo, d2, k, d3, mode, 0);
                    } else if (dense && sna == 1 && skb == d3) { /* x @ y (attention values) */
                        int bad = bh ? mm_nn_any(xa + ao, HBUF(ins[VM_B]) + bo, out + oo, d2, k, d3, mode, 1)
                                     : mm_nn_any(xa + ao, xb + bo, out + oo, d2, k, d3, mode, 0);
                        if (bad) { *pc_out = pc; return -1; }
                    } else if (bh) {
                        *pc_out = pc;
                        return -2;
                    } else {
                        for (i64 m = 0; m < d2; m++)
                            for (i64 nn = 0; nn < d3; nn++) {
                                float acc0 = 0.0f;
                                for (i64 j = 0; j < k; j++) acc0 += xa[ao + m * sma + j * ska] * xb[bo + j * skb + nn * sna];
                                out[oo + m * ins[VM_OUT + 4] + nn * ins[VM_OUT + 5]] = rnd(acc0, mode, bits);
                            }
                    }
                }
        } else if (op == VM_GATHER_HALF || op == VM_GATHER) {
            /* rows of a table [R, W] (P: R, W, half index or -1, validate); indices in A (d0*d1*d2 of them) */
            const float *xa = BUF(ins[VM_A]);
            i64 n_rows = ins[VM_P], width = ins[VM_P + 1], validate = ins[VM_P + 3], cnt = 0;
            for (i64 i0 = 0; i0 < d0; i0++)
                for (i64 i1 = 0; i1 < d1; i1++)
                    for (i64 i2 = 0; i2 < d2; i2++) {
                        float fi = xa[off4(ins, VM_A, i0, i1, i2, 0)];
                        if (!(fi > -9.3e18f && fi < 9.3e18f)) { *pc_out = pc; return VM_E_INDEX; }
                        i64 idx = (i64)fi;
                        if (idx < 0) {
                            if (validate) { *pc_out = pc; return VM_E_INDEX; }
                            idx += n_rows;
                        }
                        if (idx < 0 || idx >= n_rows) { *pc_out = pc; return VM_E_INDEX; }
                        i64 oo = ins[VM_OUT + 1] + cnt * width;
                        if (op == VM_GATHER_HALF) {
                            const i64 *h = halves + 4 * ins[VM_P + 2];
                            const uint16_t *blocks = (const uint16_t *)(intptr_t)h[0];
                            i64 kk = h[2], bw = h[3], bb = idx / bw, lane = idx % bw;
                            for (i64 j = 0; j < width; j++) out[oo + j] = rnd(widen(blocks[(bb * kk + j) * bw + lane]), mode, bits);
                        } else {
                            const float *xt = BUF(ins[VM_B]);
                            i64 to = ins[VM_B + 1] + idx * ins[VM_B + 4];
                            for (i64 j = 0; j < width; j++) out[oo + j] = rnd(xt[to + j * ins[VM_B + 5]], mode, bits);
                        }
                        cnt++;
                    }
        } else if (op == VM_SCATTER) {
            /* update A (shape d0..d3) into O at begin (B: 4 values; C: end, checked); P..P+3: O's full shape */
            const float *xa = BUF(ins[VM_A]), *xb = BUF(ins[VM_B]), *xc = BUF(ins[VM_C]);
            i64 base = ins[VM_OUT + 1];
            for (int i = 0; i < 4; i++) {
                float fb = xb[ins[VM_B + 1] + i * ins[VM_B + 5]], fe = xc[ins[VM_C + 1] + i * ins[VM_C + 5]];
                if (!(fb > -9.3e18f && fb < 9.3e18f && fe > -9.3e18f && fe < 9.3e18f)) { *pc_out = pc; return VM_E_SLICE; }
                i64 bgn = (i64)fb, end = (i64)fe;
                if (bgn < 0) bgn += ins[VM_P + i];
                if (end < 0) end += ins[VM_P + i];
                if (bgn < 0 || bgn + ins[VM_D + i] > ins[VM_P + i] || end != bgn + ins[VM_D + i]) {
                    *pc_out = pc;
                    return VM_E_SLICE;
                }
                base += bgn * ins[VM_OUT + 2 + i];
            }
            i64 so0 = ins[VM_OUT + 2], so1 = ins[VM_OUT + 3], so2 = ins[VM_OUT + 4], so3 = ins[VM_OUT + 5];
            if (HALF(ins[VM_OUT])) {
                uint16_t *oh = HBUF(ins[VM_OUT]);
                for (i64 i0 = 0; i0 < d0; i0++)
                    for (i64 i1 = 0; i1 < d1; i1++)
                        for (i64 i2 = 0; i2 < d2; i2++)
                            for (i64 i3 = 0; i3 < d3; i3++)
                                oh[base + i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3] =
                                    f16_bits(rnd(xa[off4(ins, VM_A, i0, i1, i2, i3)], mode, bits));
                continue;
            }
            for (i64 i0 = 0; i0 < d0; i0++)
                for (i64 i1 = 0; i1 < d1; i1++)
                    for (i64 i2 = 0; i2 < d2; i2++)
                        for (i64 i3 = 0; i3 < d3; i3++)
                            out[base + i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3] =
                                rnd(xa[off4(ins, VM_A, i0, i1, i2, i3)], mode, bits);
        }
    }
    return VM_E_OK;
}

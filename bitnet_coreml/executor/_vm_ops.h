/* The building blocks of the fused decode's C kernel (executor/_vm.c includes this file; one translation
 * unit): fp16 rounding and widening, the scalar ops, exp, numpy's pairwise sum, the attention products,
 * the ternary integer matvec, the fp16 weight matvec and the elementwise loops. Semantics and summation
 * orders: the comment at the top of _vm.c. */
#ifndef BITNET_COREML_VM_OPS_H
#define BITNET_COREML_VM_OPS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "_vm_layout.h"

typedef int64_t i64;

/* ---- fp16 ---------------------------------------------------------------------------------------- */

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float32(float16(v)): IEEE round to nearest even, overflow to inf, NaN stays NaN */
static inline float f16_round(float v) {
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    uint32_t u = f32_bits(v), a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return v;                          /* inf, NaN */
    if (a >= 0x477FF000u) return bits_f32((u & 0x80000000u) | 0x7F800000u);
    if (a < 0x38800000u) {                                  /* fp16 subnormal range: a multiple of 2**-24 */
        if (a == 0) return v;
        float av = fabsf(v);
        volatile float t = av + 0.5f;                       /* float32's spacing in [0.5, 1) is 2**-24 */
        float s = t - 0.5f;
        return v < 0 ? -s : s;
    }
    return bits_f32((u + 0xFFFu + ((u >> 13) & 1u)) & 0xFFFFE000u);
#endif
}

/* the fp16 bits of v rounded to fp16 (round to nearest even) */
static inline uint16_t f16_bits(float v) {
#if defined(__F16C__)
    return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    float r = f16_round(v);
    uint32_t u = f32_bits(r), a = u & 0x7FFFFFFFu;
    uint16_t s = (uint16_t)((u >> 16) & 0x8000u);
    if (a > 0x7F800000u) return (uint16_t)(s | 0x7E00u | ((a >> 13) & 0x3FFu));   /* NaN */
    if (a == 0x7F800000u) return (uint16_t)(s | 0x7C00u);                         /* inf */
    if (a < 0x38800000u) return (uint16_t)(s | (uint16_t)(bits_f32(a) * 16777216.0f)); /* m * 2**-24 */
    return (uint16_t)(s | (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3FFu));
#endif
}

/* the float32 value of fp16 bits h (exact) */
static inline float widen(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-08f;       /* m * 2**-24, exact */
        return s ? -f : f;
    }
    if (e == 31) return bits_f32(s | 0x7F800000u | (m << 13));
    return bits_f32(s | ((e + 112u) << 23) | (m << 13));
#endif
}

/* ---- scalar ops ---------------------------------------------------------------------------------- */

static inline float rnd(float v, i64 mode, i64 bits) {
    if (mode == VM_R_NONE) return v;
    if (mode == VM_R_F16) return f16_round(v);
    if (mode == VM_R_BOOL) return v != 0 ? 1.0f : 0.0f;
    float t = isfinite(v) ? truncf(v) : 0.0f;
    if (mode == VM_R_UINT) t = (float)((i64)t & ((((i64)1) << bits) - 1));
    return t;
}

static inline float bin(i64 op, float x, float y) {
    switch (op) {
    case VM_ADD: return x + y;
    case VM_SUB: return x - y;
    case VM_MUL: return x * y;
    case VM_DIV: return x / y;
    case VM_MAX: return (x >= y || x != x) ? x : y;
    case VM_MIN: return (x <= y || x != x) ? x : y;
    case VM_EQ: return (float)(x == y);
    case VM_NE: return (float)(x != y);
    case VM_LT: return (float)(x < y);
    case VM_LE: return (float)(x <= y);
    case VM_GT: return (float)(x > y);
    case VM_GE: return (float)(x >= y);
    case VM_AND: return (float)(x != 0 && y != 0);
    case VM_OR: return (float)(x != 0 || y != 0);
    default: return (float)((x != 0) != (y != 0)); /* XOR */
    }
}

static inline float un(i64 op, float x, float e) {
    switch (op) {
    case VM_ABS: return fabsf(x);
    case VM_FLOOR: return floorf(x);
    case VM_CEIL: return ceilf(x);
    case VM_RELU: return x > 0 ? x : (x != x ? x : 0.0f);
    case VM_RSQRT: return 1.0f / sqrtf(x + e);
    case VM_COPY: return x;
    case VM_SQRT: return sqrtf(x);
    case VM_EXP: return expf(x);
    case VM_NEG: return -x;
    case VM_SIGMOID: return 1.0f / (1.0f + expf(-x));
    case VM_SILU: return x * (1.0f / (1.0f + expf(-x)));
    case VM_SQUARE: return x * x;
    case VM_NOT: return (float)(x == 0);
    default: return truncf(x); /* TRUNC */
    }
}

static void round_v(float *o, i64 n, i64 mode, i64 bits) {
    if (mode == VM_R_NONE) return;
    if (mode == VM_R_F16) {
        i64 i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(o + i, _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_loadu_ps(o + i), _MM_FROUND_TO_NEAREST_INT)));
#endif
        for (; i < n; i++) o[i] = f16_round(o[i]);
        return;
    }
    for (i64 i = 0; i < n; i++) o[i] = rnd(o[i], mode, bits);
}

/* ---- exp ------------------------------------------------------------------------------------------ */

/* exp(x - m) of n contiguous floats into out: the C library's expf, as numba calls it, below -104 +0
 * without the call (the masked attention positions). With AVX-512 on glibc >= 2.28, 8 at a time the way
 * glibc's expf computes one (its FMA variant, the one it runs on such a CPU): x * 32/ln2 = k + r, 2^(k/32)
 * from a table of 2^(i/32), a degree-3 polynomial in r with fused multiply-adds, in double, one rounding
 * to float; equal to glibc's expf for every float in [-103.9, 88] (checked exhaustively against it; the
 * tests compare samples), other lanes go to expf. */
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__FMA__) && defined(__GLIBC__) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 28)
#define VM_VEXP 1
#endif
#endif

#ifdef VM_VEXP
static uint64_t vexp_tab[32]; /* bits of 2^(i/32) minus i << 47 (so that adding k << 47 scales by 2^(k/32)) */

__attribute__((constructor)) static void vexp_init(void) {
    for (int i = 0; i < 32; i++) {
        double v = (double)exp2l((long double)i / 32.0L);
        uint64_t u;
        memcpy(&u, &v, 8);
        vexp_tab[i] = u - ((uint64_t)i << 47);
    }
}

static inline __m256 vexp8(__m256 x) {
    const __m512d inv = _mm512_set1_pd(0x1.71547652b82fep+0 * 32), shift = _mm512_set1_pd(0x1.8p+52);
    const __m512d c0 = _mm512_set1_pd(0x1.c6af84b912394p-5 / 32 / 32 / 32);
    const __m512d c1 = _mm512_set1_pd(0x1.ebfce50fac4f3p-3 / 32 / 32), c2 = _mm512_set1_pd(0x1.62e42ff0c52d6p-1 / 32);
    __m512d xd = _mm512_cvtps_pd(x);
    __m512d kd = _mm512_add_pd(_mm512_mul_pd(inv, xd), shift); /* k rounded to an integer, in the low bits */
    __m512i ki = _mm512_castpd_si512(kd);
    kd = _mm512_sub_pd(kd, shift);
    __m512d r = _mm512_fmsub_pd(inv, xd, kd); /* x * 32/ln2 - k, the product not rounded (as the library's) */
    __m512i t = _mm512_i64gather_epi64(_mm512_and_si512(ki, _mm512_set1_epi64(31)), (const void *)vexp_tab, 8);
    __m512d s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64(ki, 47)));
    __m512d p = _mm512_fmadd_pd(c0, r, c1);
    __m512d y = _mm512_fmadd_pd(c2, r, _mm512_set1_pd(1.0));
    y = _mm512_fmadd_pd(p, _mm512_mul_pd(r, r), y);
    return _mm512_cvtpd_ps(_mm512_mul_pd(y, s));
}
#endif

static void exp_shifted(const float *x, float m, float *out, i64 n) {
    i64 i = 0;
#ifdef VM_VEXP
    const __m256 lo = _mm256_set1_ps(-103.9f), hi = _mm256_set1_ps(88.0f), mv = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv);
        __mmask8 in = _mm256_cmp_ps_mask(d, lo, _CMP_GE_OQ) & _mm256_cmp_ps_mask(d, hi, _CMP_LE_OQ);
        if (in == 0xFF) {
            _mm256_storeu_ps(out + i, vexp8(d));
        } else {
            for (int l = 0; l < 8; l++) {
                float dl = x[i + l] - m;
                out[i + l] = dl < -104.0f ? 0.0f : expf(dl);
            }
        }
    }
#endif
    for (; i < n; i++) {
        float d = x[i] - m;
        out[i] = d < -104.0f ? 0.0f : expf(d);
    }
}

void vm_exp_shifted(const float *x, float m, float *out, i64 n) { exp_shifted(x, m, out, n); }

/* ---- sums and extremes --------------------------------------------------------------------------- */

/* numpy's pairwise sum of n <= 128 values: sequential below 8, else 8 partial sums */
static float leaf(const float *buf, i64 off, i64 n, i64 st) {
    if (n < 8) {
        float res = n > 0 ? buf[off] * 0.0f : 0.0f; /* a float32 zero of the first value's sign (as _vm) */
        for (i64 i = 0; i < n; i++) res += buf[off + i * st];
        return res;
    }
    float r[8];
    for (int l = 0; l < 8; l++) r[l] = buf[off + l * st];
    i64 i = 8;
    for (; i < n - (n % 8); i += 8) {
        i64 b = off + i * st;
        for (int l = 0; l < 8; l++) r[l] += buf[b + l * st];
    }
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += buf[off + i * st];
    return res;
}

/* numpy's float32 pairwise sum: sum(first n2) + sum(rest) above 128, n2 a multiple of 8 near n/2 */
static float pairwise(const float *buf, i64 off, i64 n, i64 st) {
    if (n <= 128) return leaf(buf, off, n, st);
    i64 m2 = n / 2;
    m2 -= m2 % 8;
    float first = pairwise(buf, off, m2, st);
    return first + pairwise(buf, off + m2 * st, n - m2, st);
}

float vm_pairwise_sum(const float *x, i64 n) { return pairwise(x, 0, n, 1); }

/* max (smallest: min) of a contiguous vector, NaN if it holds one: 16 running extremes, then combined */
static float extreme(const float *x, i64 n, int smallest) {
    float lanes[16];
    for (int l = 0; l < 16; l++) lanes[l] = x[0];
    i64 nan = 0, nv = n - n % 16;
    for (i64 i0 = 0; i0 < nv; i0 += 16) {
        for (int l = 0; l < 16; l++) {
            float v = x[i0 + l];
            nan += v != v;
            if (smallest) lanes[l] = v < lanes[l] ? v : lanes[l];
            else lanes[l] = v > lanes[l] ? v : lanes[l];
        }
    }
    i64 op = smallest ? VM_MIN : VM_MAX;
    float r = lanes[0];
    for (int l = 1; l < 16; l++) r = bin(op, r, lanes[l]);
    for (i64 i = nv; i < n; i++) r = bin(op, r, x[i]);
    return nan ? NAN : r;
}

float vm_extreme(const float *x, i64 n, i64 smallest) { return extreme(x, n, (int)smallest); }

/* ---- attention products -------------------------------------------------------------------------- */

/* sum(a * b) in float32 in the order LLVM vectorises the numba kernel's _dot on AVX-512: 4 x 16 lanes
 * of fused multiply-adds over the multiples of 64 (lane 0 of the first starting at +0, every other lane
 * at -0), the four added (((1 + 0) + 2) + 3), halved down to one value (16 -> 8 -> 4 -> 2 -> 1); then
 * 8 lanes over the multiples of 8 (lane 0 starting at the sum so far), halved down the same way; then
 * one at a time. Written with lane arrays so every machine sums in this order (fmaf: exact fused). */
#define INLINE static inline __attribute__((always_inline))
/* y[i] of a float32 (h = 0) or fp16 (h = 1, widened: exact) array */
#define Y1(y, i, h) ((h) ? widen(((const uint16_t *)(y))[i]) : ((const float *)(y))[i])
#if defined(__AVX512F__) && defined(__F16C__)
#define Y16(y, i, h) ((h) ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(y) + (i)))) \
                          : _mm512_loadu_ps((const float *)(y) + (i)))
#define Y8(y, i, h) ((h) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(y) + (i)))) \
                         : _mm256_loadu_ps((const float *)(y) + (i)))

static inline float reduce8(__m256 v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

INLINE float dot_any(const float *a, const void *b, i64 n, const int h) {
    float acc = 0.0f;
    i64 i = 0;
    if (n >= 8) {
        if (n >= 64) {
            __m512 p1 = _mm512_set1_ps(-0.0f), p2 = p1, p3 = p1;
            __m512 p0 = _mm512_mask_mov_ps(p1, 1, _mm512_setzero_ps());
            for (; i + 64 <= n; i += 64) {
                p0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), Y16(b, i, h), p0);
                p1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), Y16(b, i + 16, h), p1);
                p2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), Y16(b, i + 32, h), p2);
                p3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), Y16(b, i + 48, h), p3);
            }
            __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(p1, p0), p2), p3);
            __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
            acc = reduce8(_mm256_add_ps(_mm512_castps512_ps256(s), hi));
        }
        if (i < n && ((n - i) & 56) != 0) {
            __m256 q = _mm256_blend_ps(_mm256_set1_ps(-0.0f), _mm256_castps128_ps256(_mm_set_ss(acc)), 1);
            for (; i + 8 <= n; i += 8) q = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), Y8(b, i, h), q);
            acc = reduce8(q);
        }
    }
    for (; i < n; i++) acc = fmaf(a[i], Y1(b, i, h), acc);
    return acc;
}
#else
static inline float reduce_lanes(float *v, int w) {
    for (; w > 1; w /= 2)
        for (int l = 0; l < w / 2; l++) v[l] = v[l] + v[l + w / 2];
    return v[0];
}

INLINE float dot_any(const float *a, const void *b, i64 n, const int h) {
    float acc = 0.0f;
    i64 i = 0;
    if (n >= 8) {
        if (n >= 64) {
            float p[4][16];
            for (int u = 0; u < 4; u++)
                for (int l = 0; l < 16; l++) p[u][l] = -0.0f;
            p[0][0] = 0.0f;
            for (; i + 64 <= n; i += 64)
                for (int u = 0; u < 4; u++)
                    for (int l = 0; l < 16; l++) p[u][l] = fmaf(a[i + 16 * u + l], Y1(b, i + 16 * u + l, h), p[u][l]);
            float s[16];
            for (int l = 0; l < 16; l++) s[l] = ((p[1][l] + p[0][l]) + p[2][l]) + p[3][l];
            acc = reduce_lanes(s, 16);
        }
        if (i < n && ((n - i) & 56) != 0) {
            float q[8];
            for (int l = 0; l < 8; l++) q[l] = -0.0f;
            q[0] = acc;
            for (; i + 8 <= n; i += 8)
                for (int l = 0; l < 8; l++) q[l] = fmaf(a[i + l], Y1(b, i + l, h), q[l]);
            acc = reduce_lanes(q, 8);
        }
    }
    for (; i < n; i++) acc = fmaf(a[i], Y1(b, i, h), acc);
    return acc;
}
#endif

/* out = x @ y.T (x [m, k], y [n, k], rows contiguous; y float32 or, h, fp16): each output a dot() */
INLINE void mm_nt_any(const float *x, const void *y, float *out, i64 m_rows, i64 k, i64 n_rows, i64 mode,
                      const int h) {
    for (i64 n = 0; n < n_rows; n++) {
        const void *yn = h ? (const void *)((const uint16_t *)y + n * k) : (const void *)((const float *)y + n * k);
        for (i64 m = 0; m < m_rows; m++) out[m * n_rows + n] = rnd(dot_any(x + m * k, yn, k, h), mode, 0);
    }
}

/* out = x @ y (x [m, k], y [k, n]; y float32 or, h, fp16): each output's sum over k in index order
 * with fused multiply-adds; with AVX-512 4 rows x 64 columns of sums held in registers at a time */
INLINE int mm_nn_any(const float *x, const void *y, float *out, i64 m_rows, i64 k, i64 n_cols, i64 mode,
                     const int h) {
#if defined(__AVX512F__) && defined(__F16C__)
    if (m_rows % 4 == 0 && n_cols % 64 == 0) {
        for (i64 m0 = 0; m0 < m_rows; m0 += 4)
            for (i64 n0 = 0; n0 < n_cols; n0 += 64) {
                __m512 acc[4][4];
                for (int r = 0; r < 4; r++)
                    for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
                for (i64 j = 0; j < k; j++) {
                    __m512 yv[4];
                    for (int v = 0; v < 4; v++) yv[v] = Y16(y, j * n_cols + n0 + 16 * v, h);
                    for (int r = 0; r < 4; r++) {
                        __m512 xv = _mm512_set1_ps(x[(m0 + r) * k + j]);
                        for (int v = 0; v < 4; v++) acc[r][v] = _mm512_fmadd_ps(xv, yv[v], acc[r][v]);
                    }
                }
                for (int r = 0; r < 4; r++)
                    for (int v = 0; v < 4; v++) _mm512_storeu_ps(out + (m0 + r) * n_cols + n0 + 16 * v, acc[r][v]);
            }
        round_v(out, m_rows * n_cols, mode, 0);
        return 0;
    }
#endif
    float *acc = (float *)calloc((size_t)(m_rows * n_cols > 0 ? m_rows * n_cols : 1), sizeof(float));
    if (!acc) return -1;
    for (i64 j = 0; j < k; j++) {
        for (i64 m = 0; m < m_rows; m++) {
            float xv = x[m * k + j];
            float *am = acc + m * n_cols;
            for (i64 n = 0; n < n_cols; n++) am[n] = fmaf(xv, Y1(y, j * n_cols + n, h), am[n]);
        }
    }
    for (i64 i = 0; i < m_rows * n_cols; i++) out[i] = rnd(acc[i], mode, 0);
    free(acc);
    return 0;
}

void vm_mm_nt(const float *x, const float *y, float *out, i64 m_rows, i64 k, i64 n_rows, i64 mode) {
    mm_nt_any(x, y, out, m_rows, k, n_rows, mode, 0);
}

int vm_mm_nn(const float *x, const float *y, float *out, i64 m_rows, i64 k, i64 n_cols, i64 mode) {
    return mm_nn_any(x, y, out, m_rows, k, n_cols, mode, 0);
}

/* ---- ternary weights: integer matmul from the 2-bit codes ------------------------------------------ */

/* sum over the code bytes of one row of field_i(byte) * plane_i, one at a time */
static inline int32_t codes_dot(const uint8_t *row, const int8_t *planes, i64 kb) {
    const int8_t *x0 = planes, *x1 = planes + kb, *x2 = planes + 2 * kb, *x3 = planes + 3 * kb;
    int32_t s = 0;
    for (i64 j = 0; j < kb; j++) {
        int32_t b = row[j];
        s += x0[j] * (b & 3) + x1[j] * ((b >> 2) & 3) + x2[j] * ((b >> 4) & 3) + x3[j] * (b >> 6);
    }
    return s;
}

/* out[n] = sum_j sum_i plane_i[j] * field_i(codes[n, j]) for one row of activations (fields 0..2:
 * weight + 1); integer arithmetic, exact in any order */
static void int_matvec(const uint8_t *codes, i64 n_rows, i64 kb, const int8_t *planes, int32_t *out) {
    /* the weight's first 4 KB requested at once: the hardware prefetcher starts cold on each weight, a
     * stream of 64-704 KB here (7-9% of a 200M decode call) */
    for (i64 q = 0; q < 4096 && q < n_rows * kb; q += 64) __builtin_prefetch((const char *)codes + q, 0, 3);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const int8_t *x0 = planes, *x1 = planes + kb, *x2 = planes + 2 * kb, *x3 = planes + 3 * kb;
    /* vpdpbusd multiplies 64 unsigned code bytes by 64 int8 activations, four products into each int32
     * lane: field i masked in place (c & (3 << 2i)) is 4**i times the field, so its sum is divided by
     * 4**i at the end (exact: a multiple of 4**i). Four rows at a time, reduced together. */
    i64 n = 0;
    const __mmask64 tail = kb % 64 ? (((__mmask64)1) << (kb % 64)) - 1 : ~(__mmask64)0;
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C), m2 = _mm512_set1_epi8(0x30),
                  m3 = _mm512_set1_epi8((char)0xC0);
    for (; n + 4 <= n_rows; n += 4) {
        __m512i acc[4];
        for (int r = 0; r < 4; r++) {
            const uint8_t *row = codes + (n + r) * kb;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (i64 j = 0; j < kb; j += 64) { /* the last step masked: its missing bytes read as 0 */
                __mmask64 mk = j + 64 <= kb ? ~(__mmask64)0 : tail;
                __m512i c = _mm512_maskz_loadu_epi8(mk, row + j);
                a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(c, m0), _mm512_maskz_loadu_epi8(mk, x0 + j));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(c, m1), _mm512_maskz_loadu_epi8(mk, x1 + j));
                a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(c, m2), _mm512_maskz_loadu_epi8(mk, x2 + j));
                a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(c, m3), _mm512_maskz_loadu_epi8(mk, x3 + j));
            }
            acc[r] = _mm512_add_epi32(_mm512_add_epi32(a0, _mm512_srai_epi32(a1, 2)),
                                      _mm512_add_epi32(_mm512_srai_epi32(a2, 4), _mm512_srai_epi32(a3, 6)));
        }
        __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[0], acc[1]), _mm512_unpackhi_epi32(acc[0], acc[1]));
        __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[2], acc[3]), _mm512_unpackhi_epi32(acc[2], acc[3]));
        __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
        __m256i v = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
        __m128i w = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        int32_t s4[4];
        _mm_storeu_si128((__m128i *)s4, w);
        for (int r = 0; r < 4; r++) {
            out[n + r] = s4[r];
        }
    }
    for (; n < n_rows; n++) {
        out[n] = codes_dot(codes + n * kb, planes, kb);
    }
#else
    for (i64 n = 0; n < n_rows; n++) {
        out[n] = codes_dot(codes + n * kb, planes, kb);
    }
#endif
}

int vm_has_vnni(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

/* true when every x (m rows of k) is q / 128 with q an int8; then planes[m][i][j] = q[m][4j + i] and
 * qsum[m] = sum q[m] (BitLinear's quantised activations, as ternary._int_scale asks) */
static int quantized(const float *x, i64 m_rows, i64 k, int8_t *planes, int32_t *qsum) {
    i64 bad = 0;
    for (i64 i = 0; i < m_rows * k; i++) {
        float v = x[i] * 128.0f;
        bad += (v != floorf(v)) | (v < -128.0f) | (v > 127.0f);
    }
    if (bad) return 0;
    i64 kb = k / 4;
    for (i64 m = 0; m < m_rows; m++) {
        const float *xm = x + m * k;
        int8_t *pm = planes + m * 4 * kb;
        int32_t s = 0;
        for (i64 jb = 0; jb < kb; jb++)
            for (int i = 0; i < 4; i++) {
                int8_t q = (int8_t)(xm[4 * jb + i] * 128.0f);
                pm[i * kb + jb] = q;
                s += q;
            }
        qsum[m] = s;
    }
    return 1;
}

/* ---- ternary weights times float activations (weight-only linears) -------------------------------- */

/* out[m, n] = sum_j x[m, j] * w(codes[n, j]) with w = field - 1 in {-1, 0, 1} (each product exact), in one
 * fixed order: 64 running sums, element j of the first k - k % 64 into sum j % 64, combined as
 * s[l] = (a[l] + a[16 + l]) + (a[32 + l] + a[48 + l]), then s[l] += s[l + h] for h = 8, 4, 2, 1, plus the
 * rest (j >= k - k % 64) summed in index order; the code bytes are read directly, 4 weights a byte.
 * codes [n_rows, kb] (kb >= k / 4); x rows contiguous [m_rows, k]; out rows contiguous [m_rows, n_rows]. */
static void tern_f32(const uint8_t *codes, i64 n_rows, i64 kb, i64 k, const float *x, i64 m_rows, float *out) {
    i64 k64 = k - k % 64;
    for (i64 n = 0; n < n_rows; n++) {
        const uint8_t *row = codes + n * kb;
        for (i64 m = 0; m < m_rows; m++) {
            const float *xm = x + m * k;
            float s[16];
#if defined(__AVX512F__)
            const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            const __m512i three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1);
            __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (i64 j = 0; j < k64; j += 64)
                for (int v = 0; v < 4; v++) {
                    uint32_t word;
                    memcpy(&word, row + (j + 16 * v) / 4, 4);
                    __m512i f = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)word), sh), three);
                    __m512 w = _mm512_cvtepi32_ps(_mm512_sub_epi32(f, one));
                    a[v] = _mm512_add_ps(a[v], _mm512_mul_ps(_mm512_loadu_ps(xm + j + 16 * v), w));
                }
            _mm512_storeu_ps(s, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
#else
            float a[64] = {0};
            for (i64 j = 0; j < k64; j += 64)
                for (int l = 0; l < 64; l++) {
                    i64 jj = j + l;
                    a[l] += xm[jj] * (float)((int)((row[jj >> 2] >> (2 * (jj & 3))) & 3) - 1);
                }
            for (int l = 0; l < 16; l++) s[l] = (a[l] + a[16 + l]) + (a[32 + l] + a[48 + l]);
#endif
            for (int h = 8; h >= 1; h /= 2)
                for (int l = 0; l < h; l++) s[l] += s[l + h];
            float t = 0.0f;
            for (i64 j = k64; j < k; j++) t += xm[j] * (float)((int)((row[j >> 2] >> (2 * (j & 3))) & 3) - 1);
            out[m * n_rows + n] = s[0] + t;
        }
    }
}

void vm_tern_f32(const uint8_t *codes, i64 n_rows, i64 kb, i64 k, const float *x, i64 m_rows, float *out) {
    tern_f32(codes, n_rows, kb, k, x, m_rows, out);
}

/* ---- fp16 weights: the [nb, K, 64] blocked matvec -------------------------------------------------- */

/* out[b*64 + l] = sum_k x[k] * w(blocks[b, k, l]), summed in order k = 0..K-1 (a multiply, then an add) */
static void half_matvec(const uint16_t *blocks, i64 nb, i64 k, i64 bw, const float *x, float *out) {
#if defined(__AVX512F__)
    if (bw == 64) {
        for (i64 b = 0; b < nb; b++) {
            const uint16_t *w = blocks + b * k * 64;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (i64 j = 0; j < k; j++) {
                const uint16_t *wj = w + j * 64;
                __m512 xv = _mm512_set1_ps(x[j]);
                a0 = _mm512_add_ps(a0, _mm512_mul_ps(xv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)wj))));
                a1 = _mm512_add_ps(a1, _mm512_mul_ps(xv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wj + 16)))));
                a2 = _mm512_add_ps(a2, _mm512_mul_ps(xv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wj + 32)))));
                a3 = _mm512_add_ps(a3, _mm512_mul_ps(xv, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wj + 48)))));
            }
            _mm512_storeu_ps(out + b * 64, a0);
            _mm512_storeu_ps(out + b * 64 + 16, a1);
            _mm512_storeu_ps(out + b * 64 + 32, a2);
            _mm512_storeu_ps(out + b * 64 + 48, a3);
        }
        return;
    }
#endif
    float acc[256];
    for (i64 b = 0; b < nb; b++) {
        const uint16_t *w = blocks + b * k * bw;
        for (i64 l0 = 0; l0 < bw; l0 += 256) {
            i64 nl = bw - l0 < 256 ? bw - l0 : 256;
            for (i64 l = 0; l < nl; l++) acc[l] = 0.0f;
            for (i64 j = 0; j < k; j++) {
                const uint16_t *wj = w + j * bw + l0;
                float xj = x[j];
                for (i64 l = 0; l < nl; l++) acc[l] = acc[l] + xj * widen(wj[l]);
            }
            memcpy(out + b * bw + l0, acc, (size_t)nl * sizeof(float));
        }
    }
}

#endif /* BITNET_COREML_VM_OPS_H */

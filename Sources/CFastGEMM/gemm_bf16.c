/* See include/cfastgemm.h. Two paths chosen at run time: AVX-512F (16 lanes, 4x4 register
 * block) and AVX2+FMA (8 lanes, 2x4 register block). Both convert 4 weight rows at a time to
 * float32 into a small buffer (zero-padded to the vector width, so the k tail needs no special
 * case on the weight side) and sweep all rows of X against it; X's k tail is a masked load. */
#include "cfastgemm.h"
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define MC_ROWS_W 4

static int mc_has(int path) {
    __builtin_cpu_init();
    if (path == MC_PATH_AVX512) return __builtin_cpu_supports("avx512f");
    if (path == MC_PATH_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return 0;
}

int mc_gemm_best_path(void) {
    if (mc_has(MC_PATH_AVX512)) return MC_PATH_AVX512;
    if (mc_has(MC_PATH_AVX2)) return MC_PATH_AVX2;
    return 0;
}

/* Widens rows j0..j0+jn-1 of W into buf [MC_ROWS_W][kpad] (zeros past k and past jn); returns
 * the OR over elements of (exponent bits + lowest exponent bit): its bit 15 is set iff some
 * element is NaN/Inf. Scalar: it touches each weight once per 4-row group; the GEMM loop below
 * reads the buffer m/4 (or m/2) times. */
static inline __attribute__((always_inline)) uint32_t mc_widen(const void *w, long ldw, long k, long j0, long jn, long kpad, float *buf) {
    uint32_t acc = 0;
    for (long r = 0; r < MC_ROWS_W; ++r) {
        float *dst = buf + r * kpad;
        if (r < jn) {
            const unsigned char *src = (const unsigned char *)w + 2 * (j0 + r) * ldw;
            for (long q = 0; q < k; ++q) {
                uint16_t b;
                memcpy(&b, src + 2 * q, 2);   /* the mapped file's tensor may be unaligned */
                uint32_t u = (uint32_t)b << 16;
                memcpy(dst + q, &u, 4);
                acc |= (uint32_t)(b & 0x7F80u) + 0x0080u;
            }
            for (long q = k; q < kpad; ++q) dst[q] = 0.0f;
        } else {
            memset(dst, 0, (size_t)kpad * sizeof(float));
        }
    }
    return acc;
}

__attribute__((target("avx512f")))
static int mc_gemm_avx512(const float *x, long m, long k, const void *w, long ldw, long n, float *c, long ldc) {
    const long kfull = k / 16 * 16, kpad = (k + 15) / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k - kfull)) - 1u);
    float *buf = aligned_alloc(64, (size_t)MC_ROWS_W * (size_t)kpad * sizeof(float) + 64);
    if (!buf) return -2;
    uint32_t bad = 0;
    for (long j0 = 0; j0 < n; j0 += MC_ROWS_W) {
        const long jn = n - j0 < MC_ROWS_W ? n - j0 : MC_ROWS_W;
        bad |= mc_widen(w, ldw, k, j0, jn, kpad, buf);
        const float *b0 = buf, *b1 = buf + kpad, *b2 = buf + 2 * kpad, *b3 = buf + 3 * kpad;
        for (long i0 = 0; i0 < m; i0 += 4) {
            const long in = m - i0 < 4 ? m - i0 : 4;
            /* rows past m repeat the last row; their results are not stored */
            const float *x0 = x + i0 * k;
            const float *x1 = x + (in > 1 ? i0 + 1 : i0) * k;
            const float *x2 = x + (in > 2 ? i0 + 2 : i0) * k;
            const float *x3 = x + (in > 3 ? i0 + 3 : i0) * k;
            __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
            __m512 a30 = a00, a31 = a00, a32 = a00, a33 = a00;
#define MC_STEP512(LOADX)                                                                   \
            {                                                                               \
                __m512 w0 = _mm512_load_ps(b0 + q), w1 = _mm512_load_ps(b1 + q);           \
                __m512 w2 = _mm512_load_ps(b2 + q), w3 = _mm512_load_ps(b3 + q);           \
                __m512 v = LOADX(x0);                                                       \
                a00 = _mm512_fmadd_ps(v, w0, a00); a01 = _mm512_fmadd_ps(v, w1, a01);       \
                a02 = _mm512_fmadd_ps(v, w2, a02); a03 = _mm512_fmadd_ps(v, w3, a03);       \
                v = LOADX(x1);                                                              \
                a10 = _mm512_fmadd_ps(v, w0, a10); a11 = _mm512_fmadd_ps(v, w1, a11);       \
                a12 = _mm512_fmadd_ps(v, w2, a12); a13 = _mm512_fmadd_ps(v, w3, a13);       \
                v = LOADX(x2);                                                              \
                a20 = _mm512_fmadd_ps(v, w0, a20); a21 = _mm512_fmadd_ps(v, w1, a21);       \
                a22 = _mm512_fmadd_ps(v, w2, a22); a23 = _mm512_fmadd_ps(v, w3, a23);       \
                v = LOADX(x3);                                                              \
                a30 = _mm512_fmadd_ps(v, w0, a30); a31 = _mm512_fmadd_ps(v, w1, a31);       \
                a32 = _mm512_fmadd_ps(v, w2, a32); a33 = _mm512_fmadd_ps(v, w3, a33);       \
            }
#define MC_LOADU512(p) _mm512_loadu_ps((p) + q)
#define MC_LOADT512(p) _mm512_maskz_loadu_ps(tail, (p) + q)
            long q = 0;
            for (; q < kfull; q += 16) MC_STEP512(MC_LOADU512)
            if (kfull < k) MC_STEP512(MC_LOADT512)
            float r[4][4] = {
                {_mm512_reduce_add_ps(a00), _mm512_reduce_add_ps(a01), _mm512_reduce_add_ps(a02), _mm512_reduce_add_ps(a03)},
                {_mm512_reduce_add_ps(a10), _mm512_reduce_add_ps(a11), _mm512_reduce_add_ps(a12), _mm512_reduce_add_ps(a13)},
                {_mm512_reduce_add_ps(a20), _mm512_reduce_add_ps(a21), _mm512_reduce_add_ps(a22), _mm512_reduce_add_ps(a23)},
                {_mm512_reduce_add_ps(a30), _mm512_reduce_add_ps(a31), _mm512_reduce_add_ps(a32), _mm512_reduce_add_ps(a33)},
            };
            for (long i = 0; i < in; ++i)
                for (long j = 0; j < jn; ++j) c[(i0 + i) * ldc + j0 + j] = r[i][j];
        }
    }
    free(buf);
    return (bad & 0x8000u) ? 0 : 1;
}

static inline float mc_hsum256(__m256 v) __attribute__((target("avx2,fma")));
static inline float mc_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma")))
static int mc_gemm_avx2(const float *x, long m, long k, const void *w, long ldw, long n, float *c, long ldc) {
    const long kfull = k / 8 * 8, kpad = (k + 7) / 8 * 8;
    int32_t lanes[8];
    for (int i = 0; i < 8; ++i) lanes[i] = i < k - kfull ? -1 : 0;
    const __m256i tail = _mm256_loadu_si256((const __m256i *)lanes);
    float *buf = aligned_alloc(32, (size_t)MC_ROWS_W * (size_t)kpad * sizeof(float) + 32);
    if (!buf) return -2;
    uint32_t bad = 0;
    for (long j0 = 0; j0 < n; j0 += MC_ROWS_W) {
        const long jn = n - j0 < MC_ROWS_W ? n - j0 : MC_ROWS_W;
        bad |= mc_widen(w, ldw, k, j0, jn, kpad, buf);
        const float *b0 = buf, *b1 = buf + kpad, *b2 = buf + 2 * kpad, *b3 = buf + 3 * kpad;
        for (long i0 = 0; i0 < m; i0 += 2) {
            const long in = m - i0 < 2 ? m - i0 : 2;
            const float *x0 = x + i0 * k, *x1 = x + (in > 1 ? i0 + 1 : i0) * k;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
#define MC_STEP256(LOADX)                                                                   \
            {                                                                               \
                __m256 w0 = _mm256_load_ps(b0 + q), w1 = _mm256_load_ps(b1 + q);           \
                __m256 w2 = _mm256_load_ps(b2 + q), w3 = _mm256_load_ps(b3 + q);           \
                __m256 v = LOADX(x0);                                                       \
                a00 = _mm256_fmadd_ps(v, w0, a00); a01 = _mm256_fmadd_ps(v, w1, a01);       \
                a02 = _mm256_fmadd_ps(v, w2, a02); a03 = _mm256_fmadd_ps(v, w3, a03);       \
                v = LOADX(x1);                                                              \
                a10 = _mm256_fmadd_ps(v, w0, a10); a11 = _mm256_fmadd_ps(v, w1, a11);       \
                a12 = _mm256_fmadd_ps(v, w2, a12); a13 = _mm256_fmadd_ps(v, w3, a13);       \
            }
#define MC_LOADU256(p) _mm256_loadu_ps((p) + q)
#define MC_LOADT256(p) _mm256_maskload_ps((p) + q, tail)
            long q = 0;
            for (; q < kfull; q += 8) MC_STEP256(MC_LOADU256)
            if (kfull < k) MC_STEP256(MC_LOADT256)
            float r[2][4] = {
                {mc_hsum256(a00), mc_hsum256(a01), mc_hsum256(a02), mc_hsum256(a03)},
                {mc_hsum256(a10), mc_hsum256(a11), mc_hsum256(a12), mc_hsum256(a13)},
            };
            for (long i = 0; i < in; ++i)
                for (long j = 0; j < jn; ++j) c[(i0 + i) * ldc + j0 + j] = r[i][j];
        }
    }
    free(buf);
    return (bad & 0x8000u) ? 0 : 1;
}

int mc_gemm_xwt_bf16(const float *x, long m, long k, const void *w, long ldw, long n,
                     float *c, long ldc, int path) {
    if (path == MC_PATH_AUTO) path = mc_gemm_best_path();
    if (path == 0 || !mc_has(path)) return -1;
    if (m <= 0 || n <= 0) return 1;
    if (k <= 0) {
        for (long i = 0; i < m; ++i) for (long j = 0; j < n; ++j) c[i * ldc + j] = 0.0f;
        return 1;
    }
    return path == MC_PATH_AVX512 ? mc_gemm_avx512(x, m, k, w, ldw, n, c, ldc)
                                  : mc_gemm_avx2(x, m, k, w, ldw, n, c, ldc);
}

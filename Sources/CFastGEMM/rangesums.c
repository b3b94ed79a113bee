/* See include/rangesums.h. B is packed in panels of 8 columns ([k][8] each) so that one vector
 * load gives column j..j+7's weight at one q. The AVX2 path keeps the state of two panels (16
 * dot products: prefix sum, its max and min, the block partial, the positive and negative sums of
 * block partials) in registers for a whole row of A, walking q in order; the portable path does
 * the same operations one column at a time. Both are the index-order float32 arithmetic of the
 * definition, operation for operation: no contraction into FMA (pragma below), max/min written
 * as the comparisons they replace. */
#include "rangesums.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MC_RANGE_X86 1
#endif

#pragma STDC FP_CONTRACT OFF
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#define MC_LANES 8

long mc_range_packed_count(long n, long k) {
    long panels = (n + MC_LANES - 1) / MC_LANES;
    return panels * (k > 0 ? k : 0) * MC_LANES;
}

/* Packs rows j0..j0+7 of B (those below n) into one panel, zeros past n. */
static void pack_panel_f32(const float *b, long ldb, long n, long k, long j0, float *panel) {
    long lanes = n - j0 < MC_LANES ? n - j0 : MC_LANES;
    for (long q = 0; q < k; ++q) {
        float *dst = panel + q * MC_LANES;
        long l = 0;
        for (; l < lanes; ++l) dst[l] = b[(j0 + l) * ldb + q];
        for (; l < MC_LANES; ++l) dst[l] = 0;
    }
}

static void range_portable(const float *a, long lda, long m, long k, const float *packed, long n, long block,
                           float *range, float *split, long ldc) {
    long panels = (n + MC_LANES - 1) / MC_LANES;
    for (long p = 0; p < panels; ++p) {
        const float *w = packed + p * k * MC_LANES;
        long lanes = n - p * MC_LANES < MC_LANES ? n - p * MC_LANES : MC_LANES;
        for (long i = 0; i < m; ++i) {
            const float *ai = a + i * lda;
            for (long l = 0; l < lanes; ++l) {
                float s = 0, hi = 0, lo = 0, pos = 0, neg = 0;
                for (long q0 = 0; q0 < k; q0 += block) {
                    long q1 = q0 + block < k ? q0 + block : k;
                    float bp = 0;
                    for (long q = q0; q < q1; ++q) {
                        const float t = ai[q] * w[q * MC_LANES + l];
                        const float v = s + t;
                        s = v;
                        bp = bp + t;
                        hi = v > hi ? v : hi;
                        lo = v < lo ? v : lo;
                    }
                    pos = pos + (bp > 0 ? bp : 0);
                    neg = neg + (bp < 0 ? -bp : 0);
                }
                range[i * ldc + p * MC_LANES + l] = hi - lo;
                split[i * ldc + p * MC_LANES + l] = pos > neg ? pos : neg;
            }
        }
    }
}

#ifdef MC_RANGE_X86
/* _mm256_max_ps(a, b) is `a > b ? a : b` and _mm256_min_ps(a, b) `a < b ? a : b` per lane (the
 * instructions' definition), the portable path's comparisons with a = the new prefix sum. */
__attribute__((target("avx2")))
static void range_avx2(const float *a, long lda, long m, long k, const float *packed, long n, long block,
                       float *range, float *split, long ldc) {
    long panels = (n + MC_LANES - 1) / MC_LANES;
    const __m256 zero = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (long p = 0; p < panels; p += 2) {
        /* a lone last panel runs as its own pair (its twin's results are not stored) */
        const int pair = p + 1 < panels;
        const float *w0 = packed + p * k * MC_LANES;
        const float *w1 = pair ? w0 + k * MC_LANES : w0;
        for (long i = 0; i < m; ++i) {
            const float *ai = a + i * lda;
            __m256 s0 = zero, hi0 = zero, lo0 = zero, pos0 = zero, neg0 = zero;
            __m256 s1 = zero, hi1 = zero, lo1 = zero, pos1 = zero, neg1 = zero;
            for (long q0 = 0; q0 < k; q0 += block) {
                long q1 = q0 + block < k ? q0 + block : k;
                __m256 b0 = zero, b1 = zero;
                for (long q = q0; q < q1; ++q) {
                    const __m256 x = _mm256_broadcast_ss(ai + q);
                    const __m256 t0 = _mm256_mul_ps(x, _mm256_loadu_ps(w0 + q * MC_LANES));
                    const __m256 t1 = _mm256_mul_ps(x, _mm256_loadu_ps(w1 + q * MC_LANES));
                    s0 = _mm256_add_ps(s0, t0);
                    s1 = _mm256_add_ps(s1, t1);
                    b0 = _mm256_add_ps(b0, t0);
                    b1 = _mm256_add_ps(b1, t1);
                    hi0 = _mm256_max_ps(s0, hi0);
                    hi1 = _mm256_max_ps(s1, hi1);
                    lo0 = _mm256_min_ps(s0, lo0);
                    lo1 = _mm256_min_ps(s1, lo1);
                }
                /* pos += b > 0 ? b : 0;  neg += b < 0 ? -b : 0 */
                pos0 = _mm256_add_ps(pos0, _mm256_and_ps(_mm256_cmp_ps(b0, zero, _CMP_GT_OQ), b0));
                pos1 = _mm256_add_ps(pos1, _mm256_and_ps(_mm256_cmp_ps(b1, zero, _CMP_GT_OQ), b1));
                neg0 = _mm256_add_ps(neg0, _mm256_and_ps(_mm256_cmp_ps(b0, zero, _CMP_LT_OQ), _mm256_xor_ps(b0, sign)));
                neg1 = _mm256_add_ps(neg1, _mm256_and_ps(_mm256_cmp_ps(b1, zero, _CMP_LT_OQ), _mm256_xor_ps(b1, sign)));
            }
            float r[2 * MC_LANES], sp[2 * MC_LANES];
            _mm256_storeu_ps(r, _mm256_sub_ps(hi0, lo0));
            _mm256_storeu_ps(r + MC_LANES, _mm256_sub_ps(hi1, lo1));
            _mm256_storeu_ps(sp, _mm256_max_ps(pos0, neg0));
            _mm256_storeu_ps(sp + MC_LANES, _mm256_max_ps(pos1, neg1));
            long cols = n - p * MC_LANES;
            if (cols > (pair ? 2 : 1) * MC_LANES) cols = (pair ? 2 : 1) * MC_LANES;
            memcpy(range + i * ldc + p * MC_LANES, r, sizeof(float) * (size_t)cols);
            memcpy(split + i * ldc + p * MC_LANES, sp, sizeof(float) * (size_t)cols);
        }
    }
}
#endif

static int have_avx2(void) {
#ifdef MC_RANGE_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return cached;
#else
    return 0;
#endif
}

int mc_range_stats_packed(const float *a, long lda, long m, long k, const float *packed, long n, long block,
                          float *range, float *split, long ldc, int path) {
    if (m <= 0 || n <= 0) return 1;
    if (block <= 0) block = k > 0 ? k : 1;
    if (path == MC_RANGE_PATH_AUTO) path = have_avx2() ? MC_RANGE_PATH_AVX2 : MC_RANGE_PATH_PORTABLE;
    switch (path) {
    case MC_RANGE_PATH_PORTABLE:
        range_portable(a, lda, m, k, packed, n, block, range, split, ldc);
        return 1;
#ifdef MC_RANGE_X86
    case MC_RANGE_PATH_AVX2:
        if (!have_avx2()) return -1;
        range_avx2(a, lda, m, k, packed, n, block, range, split, ldc);
        return 1;
#endif
    default:
        return -1;
    }
}

int mc_range_stats(const float *a, long m, long k, const float *b, long ldb, long n, long block,
                   float *range, float *split) {
    if (m <= 0 || n <= 0) return 1;
    long count = mc_range_packed_count(n, k);
    float *packed = malloc(sizeof(float) * (size_t)(count > 0 ? count : 1));
    if (!packed) return 0;
    for (long j0 = 0; j0 < n; j0 += MC_LANES) pack_panel_f32(b, ldb, n, k, j0, packed + j0 * k);
    mc_range_stats_packed(a, k, m, k, packed, n, block, range, split, n, MC_RANGE_PATH_AUTO);
    free(packed);
    return 1;
}

/* The weight preparation, 8 rows at a time: the row-major outputs and the column norms row by
 * row (contiguous, vectorizable; each column norm adds row j's square before row j+1's, as a
 * row-by-row loop does), then the panel from the same 8 rows while they are in cache. */
#define MC_PREPARE(NAME, T, SQUARE)                                                                        \
    void NAME(const T *w, long n, long k, float *absolute, float *values, float *square, float *packed,  \
              double *columnNorm2) {                                                                       \
        if (columnNorm2) for (long q = 0; q < k; ++q) columnNorm2[q] = 0;                                  \
        for (long j0 = 0; j0 < n; j0 += MC_LANES) {                                                       \
            long lanes = n - j0 < MC_LANES ? n - j0 : MC_LANES;                                            \
            for (long j = j0; j < j0 + lanes; ++j) {                                                       \
                const T *restrict row = w + j * k;                                                         \
                if (absolute) { float *restrict o = absolute + j * k; for (long q = 0; q < k; ++q) o[q] = fabsf((float)row[q]); } \
                if (values) { float *restrict o = values + j * k; for (long q = 0; q < k; ++q) o[q] = (float)row[q]; } \
                if (square) { float *restrict o = square + j * k; for (long q = 0; q < k; ++q) { const T x = row[q]; o[q] = SQUARE; } } \
                if (columnNorm2) {                                                                         \
                    double *restrict o = columnNorm2;                                                      \
                    for (long q = 0; q < k; ++q) { const double d = (double)row[q]; const double d2 = d * d; o[q] = o[q] + d2; } \
                }                                                                                          \
            }                                                                                              \
            if (packed) {                                                                                  \
                float *restrict panel = packed + j0 * k;                                                   \
                for (long q = 0; q < k; ++q) {                                                             \
                    long l = 0;                                                                            \
                    for (; l < lanes; ++l) panel[q * MC_LANES + l] = (float)w[(j0 + l) * k + q];           \
                    for (; l < MC_LANES; ++l) panel[q * MC_LANES + l] = 0;                                 \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }

MC_PREPARE(mc_prepare_weights_f64, double, (float)(x * x))
MC_PREPARE(mc_prepare_weights_f32, float, x * x)

/* See include/rangesums.h. The scalar definition, then the AVX2 path four at a time with the same
 * operations (sqrt is correctly rounded at any width; the pragma above keeps every product and
 * sum a separate rounding; min and the finiteness test are the comparisons they replace): the
 * same bits. */
static double accumulation_variance_1(double a, double r0, double s0, double oldFactor, double marginFactor, double terms,
                                      double splits, double u, int contiguous) {
    const double old = oldFactor * a;
    if (!contiguous || !isfinite(a)) return old * old;
    const double margin = marginFactor * a;
    const double r = r0 + margin, s = s0 + margin;
    const double v = sqrt(terms * r * r + splits * s * s) * u;
    const double sigma = v < old ? v : old;
    return sigma * sigma;
}

#ifdef MC_RANGE_X86
__attribute__((target("avx2")))
static long accumulation_variance_avx2(const double *absSum, const float *range, const float *split, long count, double oldFactor,
                                       double marginFactor, double terms, double splits, double u, double *out) {
    const __m256d of = _mm256_set1_pd(oldFactor), mf = _mm256_set1_pd(marginFactor), tm = _mm256_set1_pd(terms);
    const __m256d sp = _mm256_set1_pd(splits), uu = _mm256_set1_pd(u), inf = _mm256_set1_pd(INFINITY);
    const __m256d sign = _mm256_set1_pd(-0.0), zero = _mm256_setzero_pd();
    long i = 0;
    for (; i + 4 <= count; i += 4) {
        const __m256d a = _mm256_loadu_pd(absSum + i);
        const __m256d old = _mm256_mul_pd(of, a);
        const __m256d margin = _mm256_mul_pd(mf, a);
        const __m256d r = _mm256_add_pd(range ? _mm256_cvtps_pd(_mm_loadu_ps(range + i)) : zero, margin);
        const __m256d s = _mm256_add_pd(split ? _mm256_cvtps_pd(_mm_loadu_ps(split + i)) : zero, margin);
        const __m256d sum = _mm256_add_pd(_mm256_mul_pd(_mm256_mul_pd(tm, r), r), _mm256_mul_pd(_mm256_mul_pd(sp, s), s));
        const __m256d v = _mm256_mul_pd(_mm256_sqrt_pd(sum), uu);
        __m256d sigma = _mm256_blendv_pd(old, v, _mm256_cmp_pd(v, old, _CMP_LT_OQ));            /* v < old ? v : old */
        const __m256d finite = _mm256_cmp_pd(_mm256_andnot_pd(sign, a), inf, _CMP_LT_OQ);       /* |a| < inf: not NaN/Inf */
        sigma = _mm256_blendv_pd(old, sigma, finite);
        _mm256_storeu_pd(out + i, _mm256_mul_pd(sigma, sigma));
    }
    return i;
}
#endif

void mc_accumulation_variance(const double *absSum, const float *range, const float *split, long count, double oldFactor,
                              double marginFactor, double terms, double splits, double u, int contiguous, double *out) {
    long i = 0;
#ifdef MC_RANGE_X86
    if (contiguous && have_avx2())
        i = accumulation_variance_avx2(absSum, range, split, count, oldFactor, marginFactor, terms, splits, u, out);
#endif
    for (; i < count; ++i)
        out[i] = accumulation_variance_1(absSum[i], range ? (double)range[i] : 0.0, split ? (double)split[i] : 0.0, oldFactor,
                                         marginFactor, terms, splits, u, contiguous);
}

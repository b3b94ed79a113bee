/* Range statistics of dot products for the statistical model's accumulation noise (MoEReference,
 * StatisticalModel.accumulationSigma; docs/error-bounds.md, "Accumulation noise").
 *
 * For i < m, j < n, the terms t_q = A[i*k + q] * B[j*ldb + q] (q < k) in float32:
 *   range[i*n + j] = max_q P_q - min_q P_q over the prefix sums P_0 = 0, P_q = t_0 + ... + t_{q-1}:
 *                    the largest |sum| of a contiguous run of terms;
 *   split[i*n + j] = max(sum of the positive, sum of the negative) block partials, blocks
 *                    [b*block, (b+1)*block): the largest |sum| of any set of whole blocks.
 * Float32 arithmetic in index order (the caller adds the margin of that arithmetic): each term
 * rounded, then added to the prefix sum and to its block's partial, each rounded; the block
 * partials added to the positive or negative sum in block order. Every path below computes
 * exactly these operations, so every path gives the same bits. */
#ifndef MC_RANGESUMS_H
#define MC_RANGESUMS_H

/* The statistics of A [m, k] (row length k) against B [n, k] (row length ldb). Scratch: one packed
 * copy of B (mc_range_pack), allocated here. Returns 0 when allocation fails. */
int mc_range_stats(const float *a, long m, long k, const float *b, long ldb, long n, long block,
                   float *range, float *split);

/* B [n, k] packed for mc_range_stats_packed: ceil(n/8) panels of k rows of 8 columns,
 * panels[((j/8)*k + q)*8 + j%8] = B[j][q], columns past n zero. Its size in floats. */
long mc_range_packed_count(long n, long k);

/* The statistics of A [m, k] (row length lda) against packed B, into range/split [m, n] (row
 * length ldc). path: MC_RANGE_PATH_AUTO (the best this CPU has), _PORTABLE (plain C), _AVX2.
 * Returns 1, or -1 when the path asked for is not available on this CPU. */
enum { MC_RANGE_PATH_AUTO = 0, MC_RANGE_PATH_PORTABLE = 1, MC_RANGE_PATH_AVX2 = 2 };
int mc_range_stats_packed(const float *a, long lda, long m, long k, const float *packed, long n, long block,
                          float *range, float *split, long ldc, int path);

/* One pass over an expert's weight matrix W [n, k] (row-major, float64 or float32) producing what
 * the reference's bound and statistics GEMMs read, each output optional (NULL: skipped):
 *   absolute[j*k+q] = |float(W[j][q])|         (the bound GEMMs' |W|)
 *   values[j*k+q]   = float(W[j][q])
 *   square[j*k+q]   = float(W[j][q]·W[j][q])   (the product in W's precision, then rounded)
 *   packed          = mc_range_pack of float(W)
 *   columnNorm2[q]  = Σ_j W[j][q]² in float64, j in order (zeroed first)
 * float(x) rounds to nearest even, as Swift's Float(x). */
void mc_prepare_weights_f64(const double *w, long n, long k, float *absolute, float *values, float *square,
                            float *packed, double *columnNorm2);
void mc_prepare_weights_f32(const float *w, long n, long k, float *absolute, float *values, float *square,
                            float *packed, double *columnNorm2);

/* The squared accumulation sigma (StatisticalModel.AccumulationSigma) of `count` dot products of
 * one shape, from their absSum (float64) and range/split (float32, NULL: 0), the shape's
 * constants given: sigma = old = oldFactor*absSum when !contiguous or absSum is not finite,
 * else min(old, sqrt(terms*r*r + splits*s*s)*u) with r = range + marginFactor*absSum,
 * s = split + marginFactor*absSum; out[i] = sigma*sigma. */
void mc_accumulation_variance(const double *absSum, const float *range, const float *split, long count, double oldFactor,
                              double marginFactor, double terms, double splits, double u, int contiguous, double *out);

#endif

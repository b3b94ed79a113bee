/* Range statistics of dot products for the statistical model's accumulation noise (MoEReference,
 * StatisticalModel.accumulationSigma; docs/error-bounds.md, "Accumulation noise").
 *
 * For i < m, j < n, the terms t_q = A[i*k + q] * B[j*ldb + q] (q < k) in float32:
 *   range[i*n + j] = max_q P_q - min_q P_q over the prefix sums P_0 = 0, P_q = t_0 + ... + t_{q-1}:
 *                    the largest |sum| of a contiguous run of terms;
 *   split[i*n + j] = max(sum of the positive, sum of the negative) block partials, blocks
 *                    [b*block, (b+1)*block): the largest |sum| of any set of whole blocks.
 * Float32 arithmetic in index order (the caller adds the margin of that arithmetic). Scratch:
 * one transposed copy of B's block of columns, allocated here. Returns 0 when allocation fails. */
#ifndef MC_RANGESUMS_H
#define MC_RANGESUMS_H

int mc_range_stats(const float *a, long m, long k, const float *b, long ldb, long n, long block,
                   float *range, float *split);

#endif

/* See include/rangesums.h. B's columns are taken MC_RS_COLS at a time and transposed into a
 * [k][cols] buffer so that for one row of A and one q the update of every column is a unit-stride
 * loop the compiler vectorizes; the per-column state (prefix, its max and min, the block
 * partial and the positive/negative sums of block partials) stays in L1. */
#include "rangesums.h"
#include <stdlib.h>

#define MC_RS_COLS 128

__attribute__((target_clones("avx2", "default")))
static void mc_rs_rows(const float *a, long m, long k, const float *bt, long cols, long block,
                       float *range, float *split, long ldc) {
    float s[MC_RS_COLS], hi[MC_RS_COLS], lo[MC_RS_COLS], bp[MC_RS_COLS], pos[MC_RS_COLS], neg[MC_RS_COLS];
    for (long i = 0; i < m; ++i) {
        const float *ai = a + i * k;
        for (long j = 0; j < cols; ++j) { s[j] = 0; hi[j] = 0; lo[j] = 0; bp[j] = 0; pos[j] = 0; neg[j] = 0; }
        for (long q0 = 0; q0 < k; q0 += block) {
            long q1 = q0 + block < k ? q0 + block : k;
            for (long q = q0; q < q1; ++q) {
                const float x = ai[q];
                const float *restrict w = bt + q * cols;
                for (long j = 0; j < cols; ++j) {
                    const float t = x * w[j];
                    const float v = s[j] + t;
                    s[j] = v;
                    bp[j] += t;
                    hi[j] = v > hi[j] ? v : hi[j];
                    lo[j] = v < lo[j] ? v : lo[j];
                }
            }
            for (long j = 0; j < cols; ++j) {
                const float p = bp[j];
                pos[j] += p > 0 ? p : 0;
                neg[j] += p < 0 ? -p : 0;
                bp[j] = 0;
            }
        }
        for (long j = 0; j < cols; ++j) {
            range[i * ldc + j] = hi[j] - lo[j];
            split[i * ldc + j] = pos[j] > neg[j] ? pos[j] : neg[j];
        }
    }
}

int mc_range_stats(const float *a, long m, long k, const float *b, long ldb, long n, long block,
                   float *range, float *split) {
    if (m <= 0 || n <= 0) return 1;
    if (block <= 0) block = k > 0 ? k : 1;
    float *bt = malloc(sizeof(float) * (size_t)(k > 0 ? k : 1) * MC_RS_COLS);
    if (!bt) return 0;
    for (long j0 = 0; j0 < n; j0 += MC_RS_COLS) {
        long cols = n - j0 < MC_RS_COLS ? n - j0 : MC_RS_COLS;
        /* 16x16 tiles: both sides stay within a few cache lines per tile */
        for (long q0 = 0; q0 < k; q0 += 16) {
            long q1 = q0 + 16 < k ? q0 + 16 : k;
            for (long jj = 0; jj < cols; jj += 16) {
                long j1 = jj + 16 < cols ? jj + 16 : cols;
                for (long j = jj; j < j1; ++j)
                    for (long q = q0; q < q1; ++q) bt[q * cols + j] = b[(j0 + j) * ldb + q];
            }
        }
        mc_rs_rows(a, m, k, bt, cols, block, range + j0, split + j0, n);
    }
    free(bt);
    return 1;
}

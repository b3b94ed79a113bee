/* Fused bf16-weight GEMM for the reference's float32 mode (MoEReference).
 *
 *   C[i*ldc + j] = sum_{q<k} X[i*k + q] * bf16(W[j*ldw + q])      i < m, j < n
 *
 * X is float32 row-major [m, k]; W points to raw bfloat16 bits (any alignment), row-major [n, ldw] (only the first k
 * columns are read); products and sums in float32 (FMA), each dot product over all of k. The
 * weights are widened to float32 4 rows at a time into a buffer that stays in cache while every
 * row of X passes over it: no decoded copy of the matrix and no packing pass, which is where a BLAS sgemm spends half its time when m is small (an
 * expert's few dozen tokens against thousands of weight rows).
 *
 * Returns 1 when every weight element read is finite, 0 when one is NaN/Inf (C is then
 * unspecified; the caller reports the element through its own decoder), -1 when the path is not
 * available on this CPU. */
#ifndef CFASTGEMM_H
#define CFASTGEMM_H
#include <stdint.h>
#include "rangesums.h"  /* one module: an incremental build re-reads this header (a new file in the umbrella directory alone did not invalidate the cached module) */

enum { MC_PATH_AUTO = 0, MC_PATH_AVX2 = 2, MC_PATH_AVX512 = 3 };

/* The best available path (MC_PATH_AVX512, MC_PATH_AVX2), or 0 when neither is. */
int mc_gemm_best_path(void);

int mc_gemm_xwt_bf16(const float *x, long m, long k, const void *w, long ldw, long n,
                     float *c, long ldc, int path);

#endif

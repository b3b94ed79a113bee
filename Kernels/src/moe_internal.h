/* moe_internal.h — declarations shared by moe_api.hip (host API) and moe_kernels_dev.hip. */
#ifndef MOE_INTERNAL_H
#define MOE_INTERNAL_H

#include <stdint.h>

#define MOE_MAX_EXPERTS 1023 /* E + 1 <= 1024 (one align block keeps a counter per expert) */

struct MoeGemmArgs {
    const uint16_t* A;        /* bf16 bits (x, quantized x, intermediate or its fp8 values) */
    const float* A_scale;     /* fp8: [rowsA, nKB] */
    const void* B;            /* [n_experts, b_rows, K] bf16 bits or fp8 codes */
    const float* B_scale;     /* fp8: [n_experts, nNB, nKB] */
    const int32_t* sorted;
    const int32_t* block_experts;
    const int32_t* padded_count;
    int64_t K;                /* reduction length: H (stage 1) or I (stage 2) */
    int64_t N;                /* I (stage 1; tile = gate and up of the same columns) or H */
    int64_t nKB;              /* ceil(K / 128) */
    int64_t nNB;              /* scale rows per expert: 2*ceil(I/128) or ceil(H/128) */
    int64_t b_rows;           /* weight rows per expert: 2I or H */
    int64_t pairs;            /* T*S; sentinel = pairs */
    int32_t S;
    int32_t n_experts;        /* E' */
    int32_t split;            /* stage 1 fp8 split-K count (1 = off) */
    int32_t fnuz_decode;      /* decode weight codes as e4m3fnuz */
    int32_t fault;
    int32_t reverse;          /* accumulate K in reverse order (benign fault) */
    uint16_t* out_bf16;       /* stage 1, split 1: intermediate [pairs, I] */
    float* out_f32;           /* stage 1 split > 1: workspace [pairs, 2I]; stage 2: y [pairs, H] */
};

/* 1-D grid for grid-stride loops (host) */
static inline unsigned moe_grid1d(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b < 1) b = 1;
    if (b > 65535 * 8) b = 65535 * 8;
    return (unsigned)b;
}

/* Align blocks that can hold pairs: sum_e ceil(c_e / BM) <= floor(pairs / BM) + min(pairs, E')
 * (host). Every block at or past it lies past padded_count, where the GEMMs return at once, so
 * the grid stops there (at T = 1 the full capacity grid was ~30k CTAs that only exit). Stage 2
 * under the padding_expert_zero fault computes blocks past padded_count: the full grid. */
static inline int64_t moe_gemm_grid_blocks(const MoeGemmArgs& a, bool stage1, int64_t nblocks, int64_t bm,
                                           int32_t pad_fault) {
    if (!stage1 && a.fault == pad_fault) return nblocks;
    const int64_t bound = a.pairs / bm + (a.pairs < a.n_experts ? a.pairs : a.n_experts);
    const int64_t nb = bound < nblocks ? bound : nblocks;
    return nb < 1 ? 1 : nb;
}

void moe_launch_router_logits(const void* x, const void* wg, const void* ws, int64_t T, int64_t H,
                              int32_t E, int32_t fuse, float* logits, float* gate, int32_t fault);
void moe_launch_topk(const float* logits, const float* gate, int64_t T, int32_t E, int32_t K,
                     int32_t renorm, int32_t fuse, int32_t* ids, float* weights, int32_t fault);
void moe_launch_align(const int32_t* ids, int64_t pairs, int32_t E1, int64_t capacity,
                      int32_t* sorted, int32_t* block_experts, int32_t* padded, int32_t fault);
void moe_launch_quant(const void* in, int64_t rows, int64_t cols, int32_t fnuz, uint16_t* q,
                      float* scales);
void moe_launch_gemm(const MoeGemmArgs& a, bool fp8, bool stage1, int64_t nblocks);
void moe_launch_swiglu(const float* ws, int64_t pairs, int64_t I, void* inter, int32_t fault);
void moe_launch_combine(const float* y, const float* w, int64_t T, int64_t H, int32_t S, void* out);
void moe_launch_fill(void* dst, int32_t kind, int64_t count, uint64_t seed, uint64_t stream,
                     int64_t offset, int32_t param);

#endif /* MOE_INTERNAL_H */

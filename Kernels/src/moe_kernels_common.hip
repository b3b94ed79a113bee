/*
 * moe_kernels_common.hip — device kernels shared by both implementations (IMPL=fma and
 * IMPL=mma): alignment into expert blocks, dynamic fp8 quantization, the split-K SwiGLU pass,
 * the weighted combine and the counter-based test data. The router, top-k and the expert
 * GEMMs live in moe_kernels_dev.hip (fp32 FMA) or moe_kernels_mma.hip (matrix cores).
 */
#include "moe_device.h"
#include "moe_internal.h"

/* ------------------------------------------------------------------------------------------ */
/* Align: one block. Count pairs per expert, prefix sum of block-padded counts, scatter.       */
/* ------------------------------------------------------------------------------------------ */
__global__ void __launch_bounds__(1024)
moe_align_kernel(const int32_t* __restrict__ ids, int64_t pairs, int32_t E1, int64_t capacity,
                 int32_t* __restrict__ sorted, int32_t* __restrict__ block_experts,
                 int32_t* __restrict__ padded_count, int32_t fault) {
    __shared__ int32_t cnt[MOE_MAX_EXPERTS + 1];
    __shared__ int32_t off[MOE_MAX_EXPERTS + 1];
    __shared__ int32_t total;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int BM = MOE_BLOCK_M;
    for (int e = tid; e < E1; e += nt) cnt[e] = 0;
    __syncthreads();
    for (int64_t p = tid; p < pairs; p += nt) {
        int32_t e = ids[p];
        if (e >= 0 && e < E1) atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    if (tid == 0) {
        int32_t run = 0;
        for (int e = 0; e < E1; ++e) {
            off[e] = run;
            run += (cnt[e] + BM - 1) / BM * BM;
        }
        total = run;
        *padded_count = run;
    }
    __syncthreads();
    const bool pad_fault = fault == MOE_FAULT_PADDING_EXPERT_ZERO;
    for (int64_t i = tid; i < capacity; i += nt)
        sorted[i] = (i >= total && pad_fault) ? 0 : (int32_t)pairs;
    const int64_t nblocks = capacity / BM;
    for (int64_t b = (int64_t)total / BM + tid; b < nblocks; b += nt)
        block_experts[b] = pad_fault ? 0 : -1;
    for (int e = tid; e < E1; e += nt) {
        int32_t nb = (cnt[e] + BM - 1) / BM;
        for (int32_t b = 0; b < nb; ++b) block_experts[off[e] / BM + b] = e;
    }
    __syncthreads();
    /* cursors: reuse cnt as the running position */
    for (int e = tid; e < E1; e += nt) cnt[e] = off[e];
    __syncthreads();
    for (int64_t p = tid; p < pairs; p += nt) {
        int32_t e = ids[p];
        if (e >= 0 && e < E1) {
            int32_t pos = atomicAdd(&cnt[e], 1);
            sorted[pos] = (int32_t)p;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Dynamic fp8 quantization per row per 128-column group: amax = max(1e-10, max|v|),           */
/* scale = amax * (1/FP8_MAX), inv = 1/scale, q = fp8_rne(clamp(v*inv)). q stored as bf16 bits */
/* (every e4m3 value is exact in bf16), scale as float [rows, ngroups].                        */
/* ------------------------------------------------------------------------------------------ */
__global__ void __launch_bounds__(128)
moe_quant_kernel(const uint16_t* __restrict__ in, int64_t cols, int64_t ngroups, int32_t fnuz,
                 uint16_t* __restrict__ q, float* __restrict__ scales) {
    __shared__ float red[128];
    const int tid = threadIdx.x;
    const int64_t row = blockIdx.x, g = blockIdx.y;
    const int64_t c = g * MOE_QGROUP + tid;
    float v = (c < cols) ? moe_bf16_to_f(in[row * cols + c]) : 0.0f;
    red[tid] = fabsf(v);
    __syncthreads();
    for (int s = 64; s > 0; s >>= 1) {
        if (tid < s) red[tid] = fmaxf(red[tid], red[tid + s]);
        __syncthreads();
    }
    const float fmax8 = fnuz ? 240.0f : 448.0f;
    const float amax = fmaxf(1e-10f, red[0]);
    const float scale = amax * (1.0f / fmax8);
    const float inv = 1.0f / scale;
    if (c < cols) {
        float s = fminf(fmaxf(v * inv, -fmax8), fmax8);
        q[row * cols + c] = moe_f_to_bf16(moe_fp8_round(s, fnuz != 0));
    }
    if (tid == 0) scales[row * ngroups + g] = scale;
}

/* split-K second pass: intermediate = bf16(silu(gate) * up) from the fp32 workspace */
__global__ void moe_swiglu_kernel(const float* __restrict__ ws, int64_t pairs, int64_t I,
                                  uint16_t* __restrict__ inter, int32_t fault) {
    const int64_t n = pairs * I;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t p = i / I, j = i - p * I;
        float gt = ws[p * 2 * I + j], up = ws[p * 2 * I + I + j];
        /* fault: the fp32 workspace sums rounded to bf16 after the atomics */
        if (fault == MOE_FAULT_SPLITK_BF16_AFTER_ATOMIC) { gt = moe_round_bf16(gt); up = moe_round_bf16(up); }
        float silu = gt / (1.0f + expf(-gt));
        if (fault == MOE_FAULT_INTERMEDIATE_ROUNDED_TWICE) silu = moe_round_bf16(silu);
        inter[i] = moe_f_to_bf16(silu * up);
    }
}

/* combine: out[t,h] = bf16( sum_{s ascending} w[t,s] * y[t*S+s, h] ), fp32, no atomics */
__global__ void moe_combine_kernel(const float* __restrict__ y, const float* __restrict__ w,
                                   int64_t T, int64_t H, int32_t S, uint16_t* __restrict__ out) {
    const int64_t n = T * H;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / H, h = i - t * H;
        float sum = 0.0f;
        for (int s = 0; s < S; ++s) sum = fmaf(w[t * S + s], y[(t * S + s) * H + h], sum);
        out[i] = moe_f_to_bf16(sum);
    }
}

/* counter-based test data, bit for bit as MoECheck's host generator */
__device__ __forceinline__ uint64_t moe_mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__global__ void moe_fill_kernel(void* dst, int32_t kind, int64_t count, uint64_t seed,
                                uint64_t stream, int64_t offset, int32_t param) {
    const uint64_t base = moe_mix64(seed ^ (stream * 0xD1B54A32D192ED03ull));
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (int64_t)gridDim.x * blockDim.x) {
        const uint64_t z = moe_mix64(base + ((uint64_t)offset + (uint64_t)i));
        if (kind == 0) {
            int m = (int)((z >> 32) % 255ull) - 127;
            ((uint16_t*)dst)[i] = moe_f_to_bf16(ldexpf((float)m, -param));
        } else if (kind == 1) {
            ((uint8_t*)dst)[i] =
                (uint8_t)(((z >> 63) << 7) | ((4ull + (z >> 32) % 5ull) << 3) | ((z >> 40) & 7ull));
        } else {
            ((float*)dst)[i] = ldexpf(1.0f, -(param + (int)((z >> 32) % 4ull)));
        }
    }
}
/* ------------------------------------------------------------------------------------------ */
/* launchers (host)                                                                            */
/* ------------------------------------------------------------------------------------------ */
void moe_launch_align(const int32_t* ids, int64_t pairs, int32_t E1, int64_t capacity,
                      int32_t* sorted, int32_t* block_experts, int32_t* padded, int32_t fault) {
    moe_align_kernel<<<1, 1024>>>(ids, pairs, E1, capacity, sorted, block_experts, padded, fault);
}

void moe_launch_quant(const void* in, int64_t rows, int64_t cols, int32_t fnuz, uint16_t* q,
                      float* scales) {
    const int64_t ng = (cols + MOE_QGROUP - 1) / MOE_QGROUP;
    dim3 grid((unsigned)rows, (unsigned)ng);
    moe_quant_kernel<<<grid, 128>>>((const uint16_t*)in, cols, ng, fnuz, q, scales);
}

void moe_launch_swiglu(const float* ws, int64_t pairs, int64_t I, void* inter, int32_t fault) {
    moe_swiglu_kernel<<<moe_grid1d(pairs * I, 256), 256>>>(ws, pairs, I, (uint16_t*)inter, fault);
}

void moe_launch_combine(const float* y, const float* w, int64_t T, int64_t H, int32_t S, void* out) {
    moe_combine_kernel<<<moe_grid1d(T * H, 256), 256>>>(y, w, T, H, S, (uint16_t*)out);
}

void moe_launch_fill(void* dst, int32_t kind, int64_t count, uint64_t seed, uint64_t stream,
                     int64_t offset, int32_t param) {
    moe_fill_kernel<<<moe_grid1d(count, 256), 256>>>(dst, kind, count, seed, stream, offset, param);
}

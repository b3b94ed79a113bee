/*
 * moe_kernels_common.hip — device kernels shared by both implementations (IMPL=fma and
 * IMPL=mma): alignment into expert blocks, dynamic fp8 quantization, the split-K SwiGLU pass,
 * the weighted combine and the counter-based test data. The router, top-k and the expert
 * GEMMs live in moe_kernels_dev.hip (fp32 FMA) or moe_kernels_mma.hip (matrix cores).
 */
#include "moe_device.h"
#include "moe_internal.h"

/* ------------------------------------------------------------------------------------------ */
/* Align: one 1024-thread block. Count pairs per expert (8 loads in flight per thread; NVIDIA:  */
/* warp-aggregated shared atomics via __match_any_sync), block-wide exclusive scan of the        */
/* block-padded counts (warp shuffles), block_experts by binary search in the offsets, scatter   */
/* (aggregated the same way: one atomic per (warp, expert), ranks by popcount).                  */
/* ------------------------------------------------------------------------------------------ */
#define MOE_ALIGN_THREADS 1024
#define MOE_ALIGN_UNROLL 8
static_assert(MOE_MAX_EXPERTS + 1 <= MOE_ALIGN_THREADS, "one scan element per thread");

/* adds 1 to counter[e] for every lane's e >= 0; returns each lane's old value + its rank among
 * the lanes of the same e (i.e. a distinct slot per lane). Whole warp must call it. */
__device__ __forceinline__ int32_t moe_align_claim(int32_t* counter, int32_t e) {
#if !(defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__))
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int lane = threadIdx.x & 31;
    const int leader = __ffs(peers) - 1;
    int32_t base = 0;
    if (e >= 0 && lane == leader) base = atomicAdd(&counter[e], __popc(peers));
    base = __shfl_sync(0xffffffffu, base, leader);
    return base + __popc(peers & ((1u << lane) - 1u));
#else
    return e >= 0 ? atomicAdd(&counter[e], 1) : 0;
#endif
}

__global__ void __launch_bounds__(MOE_ALIGN_THREADS)
moe_align_kernel(const int32_t* __restrict__ ids, int64_t pairs, int32_t E1, int64_t capacity,
                 int32_t* __restrict__ sorted, int32_t* __restrict__ block_experts,
                 int32_t* __restrict__ padded_count, int32_t fault) {
    constexpr int W = MOE_WARP_SIZE, NW = MOE_ALIGN_THREADS / MOE_WARP_SIZE, U = MOE_ALIGN_UNROLL;
    __shared__ int32_t cnt[MOE_MAX_EXPERTS + 1];
    __shared__ int32_t off[MOE_MAX_EXPERTS + 2];
    __shared__ int32_t wsum[NW];
    const int tid = threadIdx.x, nt = MOE_ALIGN_THREADS;
    const int lane = tid % W, wid = tid / W;
    const int BM = MOE_BLOCK_M;
    for (int e = tid; e < E1; e += nt) cnt[e] = 0;
    __syncthreads();
    /* count (the loop bound is uniform, so every lane of a warp reaches moe_align_claim) */
    for (int64_t p0 = 0; p0 < pairs; p0 += (int64_t)U * nt) {
        int32_t ev[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            const int64_t p = p0 + (int64_t)k * nt + tid;
            const int32_t e = p < pairs ? ids[p] : -1;
            ev[k] = (e >= 0 && e < E1) ? e : -1;
        }
#pragma unroll
        for (int k = 0; k < U; ++k) (void)moe_align_claim(cnt, ev[k]);
    }
    __syncthreads();
    /* exclusive scan of the padded counts, one expert per thread */
    const int32_t v = tid < E1 ? (cnt[tid] + BM - 1) / BM * BM : 0;
    int32_t x = v;
    for (int d = 1; d < W; d <<= 1) {
        const int32_t y = moe_shfl_up(x, d);
        if (lane >= d) x += y;
    }
    if (lane == W - 1) wsum[wid] = x;
    __syncthreads();
    if (wid == 0) {
        int32_t s = lane < NW ? wsum[lane] : 0;
        for (int d = 1; d < W; d <<= 1) {
            const int32_t y = moe_shfl_up(s, d);
            if (lane >= d) s += y;
        }
        if (lane < NW) wsum[lane] = s; /* inclusive warp totals */
    }
    __syncthreads();
    const int32_t excl = x - v + (wid > 0 ? wsum[wid - 1] : 0);
    if (tid < E1) off[tid] = excl;
    if (tid == E1 - 1) {
        off[E1] = excl + v;
        *padded_count = excl + v;
    }
    __syncthreads();
    const int32_t total = off[E1];
    const bool pad_fault = fault == MOE_FAULT_PADDING_EXPERT_ZERO;
    for (int64_t i = tid; i < capacity; i += nt)
        sorted[i] = (i >= total && pad_fault) ? 0 : (int32_t)pairs;
    const int64_t nblocks = capacity / BM;
    for (int64_t b = tid; b < nblocks; b += nt) {
        if (b * BM < total) {
            int lo = 0, hi = E1 - 1; /* largest e with off[e] <= b*BM (its run holds the block) */
            while (lo < hi) {
                const int mid = (lo + hi + 1) >> 1;
                if ((int64_t)off[mid] <= b * BM) lo = mid;
                else hi = mid - 1;
            }
            block_experts[b] = lo;
        } else {
            block_experts[b] = pad_fault ? 0 : -1;
        }
    }
    /* cursors: reuse cnt as the running position */
    for (int e = tid; e < E1; e += nt) cnt[e] = off[e];
    __syncthreads(); /* also orders the sentinel fill above before the scatter below */
    for (int64_t p0 = 0; p0 < pairs; p0 += (int64_t)U * nt) {
        int32_t ev[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            const int64_t p = p0 + (int64_t)k * nt + tid;
            const int32_t e = p < pairs ? ids[p] : -1;
            ev[k] = (e >= 0 && e < E1) ? e : -1;
        }
#pragma unroll
        for (int k = 0; k < U; ++k) {
            const int32_t pos = moe_align_claim(cnt, ev[k]);
            if (ev[k] >= 0) sorted[pos] = (int32_t)(p0 + (int64_t)k * nt + tid);
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
    moe_align_kernel<<<1, MOE_ALIGN_THREADS>>>(ids, pairs, E1, capacity, sorted, block_experts, padded, fault);
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

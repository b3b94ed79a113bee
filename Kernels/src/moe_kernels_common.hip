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
/* Multi-block align (pairs >= MOE_ALIGN_MB_MIN_PAIRS). The single-block kernel above runs on   */
/* one SM (0.12 ms at 45k pairs on the H200). Three launches instead:                         */
/*  1. hist: block b counts its contiguous chunk of pairs in shared memory and writes          */
/*     hist[b][e]; it also writes the sentinel into its share of sorted[0, capacity).          */
/*  2. scan (one block, one expert per thread): per-expert running sums over the blocks turn   */
/*     hist[b][e] into block b's rank base within expert e; the padded counts' exclusive scan  */
/*     gives off[e], padded_count and block_experts; padding_expert_zero's 0 past the total.   */
/*  3. scatter: block b claims positions off[e] + hist[b][e] + (shared atomic rank).           */
/* No global atomics, nothing to zero. Within an expert the order of pairs of one chunk is the */
/* shared atomics' order, as in the single-block kernel (a row's GEMM result does not depend   */
/* on its position in the tile).                                                               */
/* ------------------------------------------------------------------------------------------ */
#define MOE_ALIGN_MB_THREADS 256
#define MOE_ALIGN_MB_MAX_BLOCKS 64
#define MOE_ALIGN_MB_MIN_PAIRS 2048
__device__ int32_t g_moe_align_hist[MOE_ALIGN_MB_MAX_BLOCKS * (MOE_MAX_EXPERTS + 1)];
__device__ int32_t g_moe_align_off[MOE_MAX_EXPERTS + 1];

__global__ void __launch_bounds__(MOE_ALIGN_MB_THREADS)
moe_align_hist_kernel(const int32_t* __restrict__ ids, int64_t pairs, int32_t E1, int64_t chunk, int64_t capacity,
                      int32_t* __restrict__ sorted) {
    constexpr int NT = MOE_ALIGN_MB_THREADS, U = MOE_ALIGN_UNROLL;
    __shared__ int32_t cnt[MOE_MAX_EXPERTS + 1];
    const int tid = threadIdx.x;
    const int64_t b = blockIdx.x;
    for (int e = tid; e < E1; e += NT) cnt[e] = 0;
    /* sentinel fill, spread over the grid (the scatter, a later launch, overwrites pair slots) */
    for (int64_t i = b * NT + tid; i < capacity; i += (int64_t)gridDim.x * NT) sorted[i] = (int32_t)pairs;
    __syncthreads();
    const int64_t p_begin = b * chunk, p_end = p_begin + chunk < pairs ? p_begin + chunk : pairs;
    for (int64_t p0 = p_begin; p0 < p_end; p0 += (int64_t)U * NT) {
        int32_t ev[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            const int64_t p = p0 + (int64_t)k * NT + tid;
            const int32_t e = p < p_end ? ids[p] : -1;
            ev[k] = (e >= 0 && e < E1) ? e : -1;
        }
#pragma unroll
        for (int k = 0; k < U; ++k)
            if (ev[k] >= 0) atomicAdd(&cnt[ev[k]], 1);
    }
    __syncthreads();
    for (int e = tid; e < E1; e += NT) g_moe_align_hist[b * E1 + e] = cnt[e];
}

__global__ void __launch_bounds__(MOE_ALIGN_THREADS)
moe_align_scan_kernel(int64_t pairs, int32_t E1, int32_t nb, int64_t capacity, int32_t* __restrict__ sorted,
                      int32_t* __restrict__ block_experts, int32_t* __restrict__ padded_count, int32_t fault) {
    constexpr int W = MOE_WARP_SIZE, NW = MOE_ALIGN_THREADS / MOE_WARP_SIZE, U = 8;
    __shared__ int32_t off[MOE_MAX_EXPERTS + 2];
    __shared__ int32_t wsum[NW];
    const int tid = threadIdx.x, nt = MOE_ALIGN_THREADS;
    const int lane = tid % W, wid = tid / W;
    const int BM = MOE_BLOCK_M;
    /* per-expert running sum over the blocks: hist[b][e] becomes block b's base within e */
    int32_t c = 0;
    if (tid < E1) {
        for (int b0 = 0; b0 < nb; b0 += U) {
            int32_t h[U];
#pragma unroll
            for (int k = 0; k < U; ++k) h[k] = b0 + k < nb ? g_moe_align_hist[(int64_t)(b0 + k) * E1 + tid] : 0;
#pragma unroll
            for (int k = 0; k < U; ++k)
                if (b0 + k < nb) {
                    g_moe_align_hist[(int64_t)(b0 + k) * E1 + tid] = c;
                    c += h[k];
                }
        }
    }
    /* exclusive scan of the padded counts (as in moe_align_kernel) */
    const int32_t v = tid < E1 ? (c + BM - 1) / BM * BM : 0;
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
        if (lane < NW) wsum[lane] = s;
    }
    __syncthreads();
    const int32_t excl = x - v + (wid > 0 ? wsum[wid - 1] : 0);
    if (tid < E1) {
        off[tid] = excl;
        g_moe_align_off[tid] = excl;
    }
    if (tid == E1 - 1) {
        off[E1] = excl + v;
        *padded_count = excl + v;
    }
    __syncthreads();
    const int32_t total = off[E1];
    const bool pad_fault = fault == MOE_FAULT_PADDING_EXPERT_ZERO;
    if (pad_fault) /* the hist launch wrote the sentinel everywhere; past the total it is 0 */
        for (int64_t i = (int64_t)total + tid; i < capacity; i += nt) sorted[i] = 0;
    const int64_t nblocks = capacity / BM;
    for (int64_t b = tid; b < nblocks; b += nt) {
        if (b * BM < total) {
            int lo = 0, hi = E1 - 1;
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
}

__global__ void __launch_bounds__(MOE_ALIGN_MB_THREADS)
moe_align_scatter_kernel(const int32_t* __restrict__ ids, int64_t pairs, int32_t E1, int64_t chunk,
                         int32_t* __restrict__ sorted) {
    constexpr int NT = MOE_ALIGN_MB_THREADS, U = MOE_ALIGN_UNROLL;
    __shared__ int32_t cur[MOE_MAX_EXPERTS + 1];
    const int tid = threadIdx.x;
    const int64_t b = blockIdx.x;
    for (int e = tid; e < E1; e += NT) cur[e] = g_moe_align_off[e] + g_moe_align_hist[b * E1 + e];
    __syncthreads();
    const int64_t p_begin = b * chunk, p_end = p_begin + chunk < pairs ? p_begin + chunk : pairs;
    for (int64_t p0 = p_begin; p0 < p_end; p0 += (int64_t)U * NT) {
        int32_t ev[U];
#pragma unroll
        for (int k = 0; k < U; ++k) {
            const int64_t p = p0 + (int64_t)k * NT + tid;
            const int32_t e = p < p_end ? ids[p] : -1;
            ev[k] = (e >= 0 && e < E1) ? e : -1;
        }
#pragma unroll
        for (int k = 0; k < U; ++k)
            if (ev[k] >= 0) sorted[atomicAdd(&cur[ev[k]], 1)] = (int32_t)(p0 + (int64_t)k * NT + tid);
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
    if (pairs < MOE_ALIGN_MB_MIN_PAIRS) {
        moe_align_kernel<<<1, MOE_ALIGN_THREADS>>>(ids, pairs, E1, capacity, sorted, block_experts, padded, fault);
        return;
    }
    /* about 2048 pairs (256 threads x 8 loads) per block, at most 64 blocks */
    int64_t nb = (pairs + MOE_ALIGN_MB_THREADS * MOE_ALIGN_UNROLL - 1) / (MOE_ALIGN_MB_THREADS * MOE_ALIGN_UNROLL);
    if (nb > MOE_ALIGN_MB_MAX_BLOCKS) nb = MOE_ALIGN_MB_MAX_BLOCKS;
    const int64_t chunk = (pairs + nb - 1) / nb;
    nb = (pairs + chunk - 1) / chunk; /* every block owns at least one pair */
    moe_align_hist_kernel<<<(unsigned)nb, MOE_ALIGN_MB_THREADS>>>(ids, pairs, E1, chunk, capacity, sorted);
    moe_align_scan_kernel<<<1, MOE_ALIGN_THREADS>>>(pairs, E1, (int32_t)nb, capacity, sorted, block_experts, padded,
                                                    fault);
    moe_align_scatter_kernel<<<(unsigned)nb, MOE_ALIGN_MB_THREADS>>>(ids, pairs, E1, chunk, sorted);
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

/*
 * moe_kernels_dev.hip — the device kernels of libmoekernels (portable HIP / CUDA source).
 * The host API, argument checking and the numeric recipe comment live in moe_api.hip.
 * This file holds the IMPL=fma router, top-k and expert GEMMs (fp32 FMA, no matrix cores);
 * the kernels both implementations share are in moe_kernels_common.hip.
 */
#include "moe_device.h"
#include "moe_internal.h"

/* ------------------------------------------------------------------------------------------ */
/* Router: logits = bf16(fp32 sum x*Wg) ; shared gate g = bf16(sigmoid(bf16(fp32 sum x*ws)))   */
/* 16 tokens x 16 rows (experts, row E = shared gate) per block, K tiles of 32 in shared memory. */
/* ------------------------------------------------------------------------------------------ */
__global__ void __launch_bounds__(256)
moe_router_logits_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ wg,
                         const uint16_t* __restrict__ ws, int64_t T, int64_t H, int32_t E,
                         int32_t fuse, float* __restrict__ logits, float* __restrict__ gate,
                         int32_t fault) {
    __shared__ float xs[16][33];
    __shared__ float gs[16][33];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int64_t t0 = (int64_t)blockIdx.x * 16, e0 = (int64_t)blockIdx.y * 16;
    const int64_t rows = (int64_t)E + (fuse ? 1 : 0);
    float acc = 0.0f;
    for (int64_t k0 = 0; k0 < H; k0 += 32) {
        for (int i = 0; i < 2; ++i) {
            int idx = tid + 256 * i, r = idx >> 5, k = idx & 31;
            int64_t gk = k0 + k;
            int64_t t = t0 + r, e = e0 + r;
            float xv = 0.0f, gv = 0.0f;
            if (t < T && gk < H) xv = moe_bf16_to_f(x[t * H + gk]);
            if (gk < H) {
                if (e < E) gv = moe_bf16_to_f(wg[e * H + gk]);
                else if (e < rows) gv = moe_bf16_to_f(ws[gk]);
            }
            xs[r][k] = xv;
            gs[r][k] = gv;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < 32; ++k) acc = fmaf(xs[ty][k], gs[tx][k], acc);
        __syncthreads();
    }
    const int64_t t = t0 + ty, e = e0 + tx;
    if (t >= T) return;
    if (e < E) {
        logits[t * E + e] = moe_round_bf16(acc);
    } else if (e < rows) {
        float d = moe_round_bf16(acc);
        float g = 1.0f / (1.0f + expf(-d));
        if (fault == MOE_FAULT_SHARED_GATE_NO_SIGMOID) g = d;
        if (fault != MOE_FAULT_BENIGN_FP32_SHARED_GATE) g = moe_round_bf16(g);
        gate[t] = g;
    }
}

/* One thread per token: softmax over E in fp32, top-K, renormalize, append shared slot. */
__global__ void moe_topk_kernel(const float* __restrict__ logits, const float* __restrict__ gate,
                                int64_t T, int32_t E, int32_t K, int32_t renorm, int32_t fuse,
                                int32_t* __restrict__ ids, float* __restrict__ weights,
                                int32_t fault) {
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int S = K + (fuse ? 1 : 0);
    const float* l = logits + t * E;
    int32_t* id = ids + t * S;
    float* w = weights + t * S;
    float mx = -__uint_as_float(0x7F800000u);
    for (int e = 0; e < E; ++e) mx = fmaxf(mx, l[e]);
    float sum = 0.0f;
    for (int e = 0; e < E; ++e) sum += expf(l[e] - mx);
    const bool tie_high = fault == MOE_FAULT_BENIGN_TIE_ORDER_HIGH;
    float prevp = 0.0f;
    int preve = -1;
    for (int s = 0; s < K; ++s) {
        int best = -1;
        float bp = 0.0f;
        for (int e = 0; e < E; ++e) {
            float pe = expf(l[e] - mx) / sum;
            if (pe != pe) pe = -1.0f;
            if (preve >= 0 && !moe_before(prevp, preve, pe, e, tie_high)) continue;
            if (best < 0 || moe_before(pe, e, bp, best, tie_high)) { best = e; bp = pe; }
        }
        if (best < 0) { best = 0; bp = 0.0f; } /* unreachable for K <= E */
        id[s] = best;
        w[s] = bp;
        prevp = bp;
        preve = best;
    }
    float g = fuse ? gate[t] : 0.0f;
    if (renorm && fault != MOE_FAULT_RENORMALIZE_IGNORED) {
        float denom = 0.0f;
        for (int s = 0; s < K; ++s) denom += w[s];
        if (fuse && fault == MOE_FAULT_SHARED_IN_RENORMALIZATION) {
            denom += g;
            g = g / denom;
        }
        for (int s = 0; s < K; ++s) w[s] = w[s] / denom;
    }
    if (fuse) {
        id[K] = (fault == MOE_FAULT_SHARED_ID_E_MINUS_1) ? E - 1 : E;
        w[K] = (fault == MOE_FAULT_SHARED_SLOT_DROPPED) ? 0.0f : g;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Grouped GEMM over expert blocks (stage 1 and stage 2), fp32 FMA, shared-memory tiles.       */
/* Block: 32 rows (one align block, all the same expert) x 128 output columns; 256 threads,   */
/* each 4 rows x 4 columns. Stage 1 columns: [gate n0..n0+63 | up n0..n0+63] so a thread owns  */
/* gate and up of the same j and applies SwiGLU in registers.                                 */
/* FP8: per 128-K-block partial sum in fp32, then acc += (a_scale*b_scale) * partial.         */
/* ------------------------------------------------------------------------------------------ */
template <bool FP8, bool STAGE1>
__global__ void __launch_bounds__(MOE_THREADS) moe_gemm_kernel(MoeGemmArgs a) {
    constexpr int BM = MOE_BLOCK_M, BN = MOE_TILE_N, BK = MOE_TILE_K;
    __shared__ float As[BM][BK + 1];
    __shared__ float Bs[BK][BN + 1];
    __shared__ int64_t rowA[BM];
    __shared__ int32_t rowPair[BM];
    __shared__ float sAsc[BM];
    __shared__ float sBsc[BN];
    __shared__ float lut[256];
    __shared__ int anyInvalid;

    const int tid = threadIdx.x, ty = tid >> 5, tx = tid & 31;
    const int64_t blk = blockIdx.x;
    const bool pad_fault = !STAGE1 && a.fault == MOE_FAULT_PADDING_EXPERT_ZERO;
    if (!pad_fault && blk * BM >= (int64_t)(*a.padded_count)) return;
    const int32_t e = a.block_experts[blk];
    if (e < 0 || e >= a.n_experts) return;
    const int64_t n0 = (int64_t)blockIdx.y * (STAGE1 ? BN / 2 : BN);

    if (tid == 0) anyInvalid = 0;
    __syncthreads();
    if (tid < BM) {
        int32_t pr = a.sorted[blk * BM + tid];
        bool valid = pr >= 0 && (int64_t)pr < a.pairs;
        rowPair[tid] = valid ? pr : -1;
        rowA[tid] = valid ? (STAGE1 ? (int64_t)pr / a.S : (int64_t)pr) : -1;
        if (!valid) atomicAdd(&anyInvalid, 1);
    }
    if (FP8) lut[tid] = moe_fp8_decode((uint32_t)tid, a.fnuz_decode != 0);
    __syncthreads();

    /* fault: the last, partially filled block of an expert's run is skipped (rows stay 0) */
    if (!STAGE1 && a.fault == MOE_FAULT_LAST_PARTIAL_M_TILE_SKIPPED && anyInvalid) {
        for (int i = 0; i < 4; ++i) {
            int r = ty * 4 + i;
            if (rowPair[r] < 0) continue;
            for (int q = 0; q < 4; ++q) {
                int64_t h = n0 + tx + 32 * q;
                if (h < a.N) a.out_f32[(int64_t)rowPair[r] * a.N + h] = 0.0f;
            }
        }
        return;
    }

    const uint16_t* Bh = (const uint16_t*)a.B;
    const uint8_t* Bb = (const uint8_t*)a.B;
    const int64_t nIB = (a.N + MOE_QGROUP - 1) / MOE_QGROUP; /* stage 1: gate scale rows */

    /* K-block range of this split */
    int64_t kb_begin = 0, kb_end = a.nKB;
    if (a.split > 1) {
        kb_begin = (int64_t)blockIdx.z * a.nKB / a.split;
        kb_end = ((int64_t)blockIdx.z + 1) * a.nKB / a.split;
    }

    float acc[16];
    float part[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) { acc[i] = 0.0f; part[i] = 0.0f; }

    const int64_t nkb = kb_end - kb_begin;
    for (int64_t kbi = 0; kbi < nkb; ++kbi) {
        const int64_t kb = a.reverse ? kb_end - 1 - kbi : kb_begin + kbi;
        if (FP8) {
            __syncthreads();
            if (tid < BM) {
                int64_t kba = kb;
                if (STAGE1 && a.fault == MOE_FAULT_WRONG_KBLOCK_SCALE) kba = (kb + 1) % a.nKB;
                sAsc[tid] = rowA[tid] >= 0 ? a.A_scale[rowA[tid] * a.nKB + kba] : 0.0f;
            }
            if (tid < BN) {
                int c = tid;
                bool valid;
                int64_t srow;
                if (STAGE1) {
                    int64_t j = n0 + (c & 63);
                    valid = j < a.N;
                    srow = (c < 64) ? j / MOE_QGROUP : nIB + j / MOE_QGROUP;
                } else {
                    int64_t h = n0 + c;
                    valid = h < a.N;
                    srow = h / MOE_QGROUP;
                }
                sBsc[c] = valid ? a.B_scale[((int64_t)e * a.nNB + srow) * a.nKB + kb] : 0.0f;
            }
        }
        for (int sub = 0; sub < MOE_QGROUP / BK; ++sub) {
            const int64_t k0 = kb * MOE_QGROUP + (int64_t)(a.reverse ? (MOE_QGROUP / BK - 1 - sub) : sub) * BK;
            if (k0 >= a.K) continue; /* uniform across the block */
            for (int i = 0; i < (BM * BK) / MOE_THREADS; ++i) {
                int idx = tid + MOE_THREADS * i, r = idx >> 5, k = idx & 31;
                int64_t gk = k0 + k;
                float v = 0.0f;
                if (rowA[r] >= 0 && gk < a.K) v = moe_bf16_to_f(a.A[rowA[r] * a.K + gk]);
                As[r][k] = v;
            }
            for (int i = 0; i < (BN * BK) / MOE_THREADS; ++i) {
                int idx = tid + MOE_THREADS * i, c = idx >> 5, k = idx & 31;
                int64_t gk = k0 + k;
                bool valid;
                int64_t brow;
                if (STAGE1) {
                    int64_t j = n0 + (c & 63);
                    valid = j < a.N;
                    brow = (c < 64) ? j : a.N + j;
                } else {
                    brow = n0 + c;
                    valid = brow < a.N;
                }
                float v = 0.0f;
                if (valid && gk < a.K) {
                    int64_t o = ((int64_t)e * a.b_rows + brow) * a.K + gk;
                    v = FP8 ? lut[Bb[o]] : moe_bf16_to_f(Bh[o]);
                }
                Bs[k][c] = v;
            }
            __syncthreads();
            float* dst = FP8 ? part : acc;
            if (!a.reverse) {
#pragma unroll 4
                for (int k = 0; k < BK; ++k) {
                    float av[4], bv[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) av[i] = As[ty * 4 + i][k];
#pragma unroll
                    for (int q = 0; q < 4; ++q) bv[q] = Bs[k][tx + 32 * q];
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int q = 0; q < 4; ++q) dst[i * 4 + q] = fmaf(av[i], bv[q], dst[i * 4 + q]);
                }
            } else {
                for (int k = BK - 1; k >= 0; --k) {
                    float av[4], bv[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) av[i] = As[ty * 4 + i][k];
#pragma unroll
                    for (int q = 0; q < 4; ++q) bv[q] = Bs[k][tx + 32 * q];
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int q = 0; q < 4; ++q) dst[i * 4 + q] = fmaf(av[i], bv[q], dst[i * 4 + q]);
                }
            }
            __syncthreads();
            /* fault: the fp8 running sums kept in ~14 significant bits (rounded every 32 K) */
            if (FP8 && a.fault == MOE_FAULT_FP8_ACCUMULATION_14BIT) {
#pragma unroll
                for (int i = 0; i < 16; ++i) part[i] = moe_round14(part[i]);
            }
        }
        if (FP8) {
            const bool low = a.fault == MOE_FAULT_FP8_ACCUMULATION_14BIT;
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    acc[i * 4 + q] += (sAsc[ty * 4 + i] * sBsc[tx + 32 * q]) * part[i * 4 + q];
                    if (low) acc[i * 4 + q] = moe_round14(acc[i * 4 + q]);
                    part[i * 4 + q] = 0.0f;
                }
        }
    }

    /* epilogues */
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int32_t pr = rowPair[ty * 4 + i];
        if (pr < 0) continue;
        if (STAGE1) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int64_t j = n0 + tx + 32 * q;
                if (j >= a.N) continue;
                float gt = acc[i * 4 + q], up = acc[i * 4 + q + 2];
                if (a.split > 1) {
                    if (a.fault == MOE_FAULT_SPLITK_BF16_PARTIALS) {
                        gt = moe_round_bf16(gt); up = moe_round_bf16(up);
                    } else if (a.fault == MOE_FAULT_SPLITK_FP16_PARTIALS) {
                        gt = moe_fp16_round(gt); up = moe_fp16_round(up);
                    }
                    float* ws = a.out_f32 + (int64_t)pr * 2 * a.N;
                    atomicAdd(ws + j, gt);
                    atomicAdd(ws + a.N + j, up);
                } else {
                    float silu = gt / (1.0f + expf(-gt));
                    if (a.fault == MOE_FAULT_INTERMEDIATE_ROUNDED_TWICE) silu = moe_round_bf16(silu);
                    a.out_bf16[(int64_t)pr * a.N + j] = moe_f_to_bf16(silu * up);
                }
            }
        } else {
            /* fault: the lowest used expert (block 0's) computes its output x (1 + 2^-6) */
            const float scale = (a.fault == MOE_FAULT_EXPERT_SCALED_1P2M6 && e == a.block_experts[0]) ? 1.015625f : 1.0f;
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i * 4 + q] *= scale;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int64_t h = n0 + tx + 32 * q;
                if (h >= a.N) continue;
                if (pad_fault) atomicAdd(a.out_f32 + (int64_t)pr * a.N + h, acc[i * 4 + q]);
                else a.out_f32[(int64_t)pr * a.N + h] = acc[i * 4 + q];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* launchers (host)                                                                            */
/* ------------------------------------------------------------------------------------------ */
void moe_launch_router_logits(const void* x, const void* wg, const void* ws, int64_t T, int64_t H,
                              int32_t E, int32_t fuse, float* logits, float* gate, int32_t fault) {
    dim3 grid((unsigned)((T + 15) / 16), (unsigned)((E + fuse + 15) / 16));
    moe_router_logits_kernel<<<grid, 256>>>((const uint16_t*)x, (const uint16_t*)wg,
                                             (const uint16_t*)ws, T, H, E, fuse, logits, gate, fault);
}

void moe_launch_topk(const float* logits, const float* gate, int64_t T, int32_t E, int32_t K,
                     int32_t renorm, int32_t fuse, int32_t* ids, float* weights, int32_t fault) {
    moe_topk_kernel<<<(unsigned)((T + 127) / 128), 128>>>(logits, gate, T, E, K, renorm, fuse, ids,
                                                          weights, fault);
}

void moe_launch_gemm(const MoeGemmArgs& a, bool fp8, bool stage1, int64_t nblocks) {
    nblocks = moe_gemm_grid_blocks(a, stage1, nblocks, MOE_BLOCK_M, MOE_FAULT_PADDING_EXPERT_ZERO);
    const int64_t ncols = stage1 ? MOE_TILE_N / 2 : MOE_TILE_N;
    dim3 grid((unsigned)nblocks, (unsigned)((a.N + ncols - 1) / ncols),
              (unsigned)(a.split > 1 ? a.split : 1));
    if (fp8 && stage1) moe_gemm_kernel<true, true><<<grid, MOE_THREADS>>>(a);
    else if (fp8) moe_gemm_kernel<true, false><<<grid, MOE_THREADS>>>(a);
    else if (stage1) moe_gemm_kernel<false, true><<<grid, MOE_THREADS>>>(a);
    else moe_gemm_kernel<false, false><<<grid, MOE_THREADS>>>(a);
}

/*
 * moe_kernels_mma.hip — IMPL=mma: the router, top-k and the expert GEMMs of libmoekernels on
 * matrix cores (NVIDIA mma.sync m16n8k16 bf16, AMD MFMA v_mfma_f32_32x32x8bf16_1k).
 * Alignment, quantization, the split-K SwiGLU pass, the combine and the test data are the
 * shared kernels of moe_kernels_common.hip; the host API and the recipe are in moe_api.hip.
 *
 * STATUS: compiled for sm_90 (nvcc 13.0) and gfx90a/gfx940 (hipcc, clang 15); not yet run on
 * any GPU when written. The AMD path has never run anywhere (no AMD GPU available).
 *
 * FP8 choice: the fp8 weight codes are decoded to bf16 (through a 256-entry table) while they
 * are stored into shared memory, and the quantized activations already arrive as the bf16 bits
 * of their fp8 values (moe_quant_kernel). Every e4m3fn / e4m3fnuz value is exact in bf16 and the
 * product of two of them (4-bit significands) is exact in fp32, so a bf16 mma computes the very
 * same products as an fp8 mma would. We do NOT use the fp8 mma (m16n8k32 e4m3 on sm_89+): Hopper
 * accumulates fp8 products in a reduced-precision (~14-bit) sum (DeepSeek-V3 report 3.3.2,
 * FACTS.md 8), which would be a different recipe; the bf16 path accumulates in fp32 (see the
 * matrix-core note in moe_api.hip) and treats e4m3fnuz codes, whose values differ from e4m3fn
 * (bias 8, NaN 0x80), through the same table with no instruction-level format dependence.
 * Exception (branch amdfp8): on gfx940/941/942, whose fp8 MFMA takes e4m3fnuz, e4m3fnuz weights x
 * fnuz-quantized activations run on v_mfma_f32_32x32x16_fp8_fp8 (mma_k32_fp8); per MMA-Sim its
 * k16 sum is truncated fixed point then RNE to fp32, not exact (Kernels/README "FP8 MFMA on
 * gfx94x"). Compiled by Debian's hipcc (clang 15) for gfx940, never run: no AMD GPU here.
 *
 * Tile (both platforms): 32 rows (one align block, one expert) x 128 output columns per
 * 256-thread workgroup, K staged through shared memory 64 at a time (two stages per 128-wide
 * fp8 scale block). FP8: each 128-K block's partial sum is accumulated from zero on the matrix
 * core in fp32 and then promoted: acc += (x_scale[row,kb] * w_scale[col-block,kb]) * partial,
 * as DeepGEMM / aiter do. Split-K (fp8 stage 1): blockIdx.z owns a contiguous range of 128-K
 * blocks and atomically adds its fp32 gate/up partials into the zeroed workspace; the shared
 * moe_swiglu_kernel finishes. The epilogue goes through an fp32 tile in shared memory, so the
 * SwiGLU pairing, the split-K atomics and every fault are plain per-element code shared by
 * both platforms.
 */
#include "moe_device.h"
#include "moe_internal.h"

#include <string.h>

#define MMA_BM 32            /* rows per tile: one align block */
#define MMA_BN 128           /* output columns per tile (stage 1: 64 gate + 64 up) */
#define MMA_BK 64            /* K per shared-memory stage */
#define MMA_LDS (MMA_BK + 8) /* bf16 row stride: +16 bytes keeps the fragment loads conflict-free */
#define MMA_LDC (MMA_BN + 4) /* fp32 epilogue tile row stride */
#define MMA_LDS8 (MMA_BK + 8) /* AMD fp8-MFMA tiles: byte row stride (8-byte aligned fragment loads) */
#define MMA_THREADS 256

static_assert(MMA_BM == MOE_BLOCK_M, "a GEMM tile is one align block");
static_assert(MOE_QGROUP % MMA_BK == 0 && MMA_BK % 32 == 0, "K stages tile the 128 scale block");

struct alignas(16) MmaSmem {
    union {
        struct {
            uint16_t A[MMA_BM][MMA_LDS]; /* A[row][k]: activations (bf16 bits) */
            uint16_t B[MMA_BN][MMA_LDS]; /* B[col][k]: weight rows (bf16 bits, fp8 decoded) */
        } t;
        float C[MMA_BM][MMA_LDC];        /* epilogue: the fp32 tile */
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
        struct {
            uint8_t A[MMA_BM][MMA_LDS8]; /* A[row][k]: e4m3fnuz codes of the quantized activations */
            uint8_t B[MMA_BN][MMA_LDS8]; /* B[col][k]: raw e4m3fnuz weight codes */
        } f8;                            /* gfx94x fp8 MFMA path only */
#endif
    } u;
};

/* ------------------------------------------------------------------------------------------ */
/* Matrix-core tile: 256 threads compute C[32][128] += A[32][k..k+32] * B[128][k..k+32]^T.     */
/* MmaAcc holds a thread's 16 fp32 accumulators; mma_acc_row / mma_acc_col give the tile      */
/* coordinates of accumulator i. Only this section is vendor specific.                        */
/* ------------------------------------------------------------------------------------------ */
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
/*
 * AMD v_mfma_f32_32x32x8bf16_1k, wave64; 4 waves, wave w owns columns [32w, 32w+32), all 32 rows.
 * Operand layouts (AMD Matrix Instruction Calculator for CDNA2/CDNA3, "v_mfma_f32_32x32x8bf16_1k";
 * the same numbers are in composable_kernel's xdlops_gemm.hpp mfma_type<mfma_f32_32x32x8bf16_1k>:
 * k_per_blk 4, num_input_blks 2, group_size 4, num_groups_per_blk 4, num_threads_per_blk 32):
 *   A[i][k] (32x8):  lane = i + 32*(k/4), element k%4 of the lane's 4 bf16
 *   B[k][j] (8x32):  lane = j + 32*(k/4), element k%4
 *   D[i][j] (32x32): lane = j + 32*((i/4)%2), register 4*(i/8) + i%4
 * so lane l, register r holds D[8*(r/4) + 4*(l/32) + r%4][l%32].
 */
struct MmaAcc { moe_floatx16 v; };

__device__ __forceinline__ int mma_acc_row(int r) {
    const int lane = threadIdx.x & 63;
    return 8 * (r >> 2) + 4 * (lane >> 5) + (r & 3);
}
__device__ __forceinline__ int mma_acc_col(int r) {
    (void)r;
    return 32 * (threadIdx.x >> 6) + (threadIdx.x & 31);
}
/* K columns [koff, koff+32) of the staged tile, in 4 MFMA steps of 8 (reversed on request). */
__device__ __forceinline__ void mma_k32(const MmaSmem& s, int koff, MmaAcc& d, bool reverse) {
    const int lane = threadIdx.x & 63, wave = threadIdx.x >> 6;
    const int i = lane & 31, kq = 4 * (lane >> 5);
#pragma unroll
    for (int step = 0; step < 4; ++step) {
        const int kk = koff + 8 * (reverse ? 3 - step : step);
        const moe_shortx4 a = *(const moe_shortx4*)&s.u.t.A[i][kk + kq];
        const moe_shortx4 b = *(const moe_shortx4*)&s.u.t.B[32 * wave + i][kk + kq];
        d.v = moe_mfma_32x32x8_bf16(a, b, d.v);
    }
}

/*
 * gfx940/941/942 only (MOE_MFMA_FP8_FNUZ): v_mfma_f32_32x32x16_fp8_fp8 on e4m3fnuz codes, same
 * wave/column split and the same D layout as above. Operand layouts (AMD Matrix Instruction
 * Calculator for CDNA3, "v_mfma_f32_32x32x16_fp8_fp8"; composable_kernel xdlops_gemm.hpp
 * mfma_type<mfma_f32_32x32x16f8f8>: k_per_blk 8, num_input_blks 2, num_threads_per_blk 32,
 * is_k_reduction, i.e. the bf16_1k layout with 8 K per lane instead of 4):
 *   A[i][k] (32x16): lane = i + 32*(k/8), byte k%8 of the lane's 64-bit operand (low byte first)
 *   B[k][j] (16x32): lane = j + 32*(k/8), byte k%8
 *   D[i][j] (32x32): as v_mfma_f32_32x32x8bf16_1k (mma_acc_row / mma_acc_col).
 * K columns [koff, koff+32) of the staged fp8 tile in 2 MFMA steps of 16 (reversed on request).
 * Compiled (clang 15, gfx940), never run: no AMD GPU here.
 */
__device__ __forceinline__ void mma_k32_fp8(const MmaSmem& s, int koff, MmaAcc& d, bool reverse) {
    const int lane = threadIdx.x & 63, wave = threadIdx.x >> 6;
    const int i = lane & 31, kq = 8 * (lane >> 5);
#pragma unroll
    for (int step = 0; step < 2; ++step) {
        const int kk = koff + 16 * (reverse ? 1 - step : step);
        const long a = *(const long*)&s.u.f8.A[i][kk + kq];
        const long b = *(const long*)&s.u.f8.B[32 * wave + i][kk + kq];
        d.v = moe_mfma_32x32x16_fp8fnuz(a, b, d.v);
    }
}

/* bf16 bits of an e4m3fnuz value -> its e4m3fnuz code, exactly (moe_quant_kernel stores every
 * quantized activation as the bf16 bits of an fnuz value; each is exact in bf16). +-0 -> 0x00
 * (fnuz has no -0: 0x80 is its NaN); NaN / inf / |v| >= 256 -> 0x80; |v| < 2^-10 (never an fnuz
 * value, never produced) -> 0x00. Normal fnuz: exponent field e8 = bf16 exponent - 119 (1..15),
 * mantissa = the top 3 of bf16's 7 bits; subnormal fnuz (bf16 exponent 117..119): m * 2^-10. */
__device__ __forceinline__ uint32_t moe_bf16_to_fnuz(uint32_t h) {
    const uint32_t sgn = (h >> 8) & 0x80u, e = (h >> 7) & 0xFFu, m = h & 0x7Fu;
    if (e > 134u) return 0x80u;
    if (e >= 120u) return sgn | ((e - 119u) << 3) | (m >> 4);
    if (e >= 117u) return sgn | (((0x80u | m) << (e - 117u)) >> 7);
    return 0u;
}
#else
/*
 * NVIDIA mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32; 8 warps, warp w owns rows
 * [16*(w&1), +16) and columns [32*(w>>1), +32) as four n8 tiles. Fragment layouts from the PTX ISA,
 * section "Matrix Fragments for mma.m16n8k16 with floating point type" (9.7.14.5.8 in ISA 8.x),
 * with groupID = lane>>2, tig = lane%4:
 *   A (16x16, 4 x .b32 = a0..a7, low half first): a0,a1: (groupID,   2*tig + 0/1)
 *                                                  a2,a3: (groupID+8, 2*tig + 0/1)
 *                                                  a4,a5: (groupID,   2*tig + 8 + 0/1)
 *                                                  a6,a7: (groupID+8, 2*tig + 8 + 0/1)
 *   B (16x8, 2 x .b32 = b0..b3):  b0,b1: (k = 2*tig + 0/1, n = groupID); b2,b3: k + 8
 *   C/D (16x8, 4 f32):            c0,c1: (groupID, 2*tig + 0/1); c2,c3: (groupID+8, same)
 * A is stored row-major [row][k] and B as [n][k] (k contiguous, ".col"), so every .b32 above is
 * one aligned 32-bit shared-memory load of two consecutive k.
 * Accumulator i = 4*ntile + c.
 */
struct MmaAcc { float v[16]; };

__device__ __forceinline__ int mma_acc_row(int i) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    return 16 * (warp & 1) + (lane >> 2) + 8 * ((i & 3) >> 1);
}
__device__ __forceinline__ int mma_acc_col(int i) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    return 32 * (warp >> 1) + 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
}
/* K columns [koff, koff+32) of the staged tile, in 2 mma steps of 16 (reversed on request). */
__device__ __forceinline__ void mma_k32(const MmaSmem& s, int koff, MmaAcc& d, bool reverse) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int r0 = 16 * (warp & 1) + g, c0 = 32 * (warp >> 1) + g;
#pragma unroll
    for (int step = 0; step < 2; ++step) {
        const int kk = koff + 16 * (reverse ? 1 - step : step) + 2 * tig;
        uint32_t a[4];
        a[0] = *(const uint32_t*)&s.u.t.A[r0][kk];
        a[1] = *(const uint32_t*)&s.u.t.A[r0 + 8][kk];
        a[2] = *(const uint32_t*)&s.u.t.A[r0][kk + 8];
        a[3] = *(const uint32_t*)&s.u.t.A[r0 + 8][kk + 8];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            uint32_t b[2];
            b[0] = *(const uint32_t*)&s.u.t.B[c0 + 8 * nt][kk];
            b[1] = *(const uint32_t*)&s.u.t.B[c0 + 8 * nt][kk + 8];
            moe_mma_16x8x16_bf16(&d.v[4 * nt], a, b);
        }
    }
}
#endif

__device__ __forceinline__ void mma_zero(MmaAcc& d) {
#pragma unroll
    for (int i = 0; i < 16; ++i) d.v[i] = 0.0f;
}

/* ------------------------------------------------------------------------------------------ */
/* Staging, in two halves so that the next stage's global loads are in flight while the       */
/* current stage is on the matrix cores: fetch (global -> registers) and store (registers ->  */
/* shared, fp8 decoded to bf16 here). rowp[r] points at row r's first element (NULL: a row of  */
/* zeros); the K columns [k0, k0+64) are fetched, zero past K. vec: 16-byte loads allowed (K a */
/* multiple of 8 (bf16) or 16 (fp8) and 16-byte-aligned bases, checked on the host).           */
/* ------------------------------------------------------------------------------------------ */
template <int NR> struct MmaChunks {                       /* 16-byte chunks per thread */
    static constexpr int BF16 = NR * (MMA_BK / 8) / MMA_THREADS;
    static constexpr int FP8 = NR * (MMA_BK / 16) / MMA_THREADS;
};

template <int NR>
__device__ __forceinline__ void mma_fetch_bf16(uint4* v, const uint16_t* const* rowp, int64_t k0, int64_t K, bool vec) {
    constexpr int CH = MMA_BK / 8;
#pragma unroll
    for (int it = 0; it < MmaChunks<NR>::BF16; ++it) {
        const int i = threadIdx.x + MMA_THREADS * it, r = i / CH, c = (i % CH) * 8;
        const uint16_t* p = rowp[r];
        const int64_t gk = k0 + c;
        v[it] = make_uint4(0u, 0u, 0u, 0u);
        if (p != nullptr && gk < K) {
            if (vec) {
                v[it] = *(const uint4*)(p + gk);
            } else {
                uint32_t w[4] = {0u, 0u, 0u, 0u};
                for (int j = 0; j < 8; ++j)
                    if (gk + j < K) w[j >> 1] |= (uint32_t)p[gk + j] << (16 * (j & 1));
                v[it] = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
    }
}

template <int NR>
__device__ __forceinline__ void mma_store_bf16(uint16_t (*S)[MMA_LDS], const uint4* v) {
    constexpr int CH = MMA_BK / 8;
#pragma unroll
    for (int it = 0; it < MmaChunks<NR>::BF16; ++it) {
        const int i = threadIdx.x + MMA_THREADS * it;
        *(uint4*)&S[i / CH][(i % CH) * 8] = v[it];
    }
}

/* fp8: 16 raw codes per chunk; bytes past K are 0 (never read as a product: A is 0 there too) */
template <int NR>
__device__ __forceinline__ void mma_fetch_fp8(uint4* v, const uint8_t* const* rowp, int64_t k0, int64_t K, bool vec) {
    constexpr int CH = MMA_BK / 16;
#pragma unroll
    for (int it = 0; it < MmaChunks<NR>::FP8; ++it) {
        const int i = threadIdx.x + MMA_THREADS * it, r = i / CH, c = (i % CH) * 16;
        const uint8_t* p = rowp[r];
        const int64_t gk = k0 + c;
        v[it] = make_uint4(0u, 0u, 0u, 0u);
        if (p != nullptr && gk < K) {
            if (vec) {
                v[it] = *(const uint4*)(p + gk);
            } else {
                uint32_t w[4] = {0u, 0u, 0u, 0u};
                for (int j = 0; j < 16; ++j)
                    if (gk + j < K) w[j >> 2] |= (uint32_t)p[gk + j] << (8 * (j & 3));
                v[it] = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
    }
}

template <int NR>
__device__ __forceinline__ void mma_store_fp8(uint16_t (*S)[MMA_LDS], const uint4* v, const uint16_t* __restrict__ lut) {
    constexpr int CH = MMA_BK / 16;
#pragma unroll
    for (int it = 0; it < MmaChunks<NR>::FP8; ++it) {
        const int i = threadIdx.x + MMA_THREADS * it, r = i / CH, c = (i % CH) * 16;
        const uint32_t qw[4] = {v[it].x, v[it].y, v[it].z, v[it].w};
        uint32_t w[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
#pragma unroll
        for (int j = 0; j < 16; ++j)
            w[j >> 1] |= (uint32_t)lut[(qw[j >> 2] >> (8 * (j & 3))) & 0xFFu] << (16 * (j & 1));
        *(uint4*)&S[r][c] = make_uint4(w[0], w[1], w[2], w[3]);
        *(uint4*)&S[r][c + 8] = make_uint4(w[4], w[5], w[6], w[7]);
    }
}

#if defined(MOE_MFMA_FP8_FNUZ) && MOE_MFMA_FP8_FNUZ
/* gfx94x fp8-MFMA staging (e4m3fnuz weights only). A: each 8-bf16 chunk of quantized activations
 * becomes 8 fnuz codes (one 8-byte store, exact: moe_bf16_to_fnuz). B: the 16 raw weight codes of
 * a chunk are stored as they are (two 8-byte stores; no table). Zero-filled chunks (sentinel rows,
 * columns >= N, K >= K) stay 0x00 = +0 in both. Byte order: code of k at byte k%8, low first. */
template <int NR>
__device__ __forceinline__ void mma_store_a_fnuz(uint8_t (*S)[MMA_LDS8], const uint4* v) {
    constexpr int CH = MMA_BK / 8;
#pragma unroll
    for (int it = 0; it < MmaChunks<NR>::BF16; ++it) {
        const int i = threadIdx.x + MMA_THREADS * it;
        const uint32_t w[4] = {v[it].x, v[it].y, v[it].z, v[it].w};
        uint32_t q[2] = {0u, 0u};
#pragma unroll
        for (int j = 0; j < 8; ++j)
            q[j >> 2] |= moe_bf16_to_fnuz((w[j >> 1] >> (16 * (j & 1))) & 0xFFFFu) << (8 * (j & 3));
        *(uint2*)&S[i / CH][(i % CH) * 8] = make_uint2(q[0], q[1]);
    }
}

template <int NR>
__device__ __forceinline__ void mma_store_fp8_raw(uint8_t (*S)[MMA_LDS8], const uint4* v) {
    constexpr int CH = MMA_BK / 16;
#pragma unroll
    for (int it = 0; it < MmaChunks<NR>::FP8; ++it) {
        const int i = threadIdx.x + MMA_THREADS * it, r = i / CH, c = (i % CH) * 16;
        *(uint2*)&S[r][c] = make_uint2(v[it].x, v[it].y);
        *(uint2*)&S[r][c + 8] = make_uint2(v[it].z, v[it].w);
    }
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* Router                                                                                      */
/* logits = bf16(fp32 sum x*Wg); shared gate g = bf16(sigmoid(bf16(fp32 sum x*ws))).           */
/* T <= MOE_ROUTER_GEMV_MAX_T: one warp per (router row, 8 tokens), 16-byte loads, warp tree   */
/* reduction. Larger T: a dense matrix-core GEMM, 32 tokens x 128 rows per workgroup.          */
/* Row E of the router is the shared gate ws when fuse_shared.                                 */
/* ------------------------------------------------------------------------------------------ */
#define MOE_ROUTER_GEMV_MAX_T 32
#define MOE_ROUTER_GEMV_TOKENS 8

__device__ __forceinline__ void moe_router_store(int64_t t, int64_t e, int32_t E, int64_t rows, float acc,
                                                 float* __restrict__ logits, float* __restrict__ gate,
                                                 int32_t fault) {
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

__device__ __forceinline__ void moe_bf16x8_to_f(uint4 v, float f[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
    }
}

__global__ void __launch_bounds__(256)
moe_router_gemv_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ wg,
                       const uint16_t* __restrict__ ws, int64_t T, int64_t H, int32_t E, int32_t fuse,
                       float* __restrict__ logits, float* __restrict__ gate, int32_t fault, int32_t vec) {
    constexpr int W = MOE_WARP_SIZE, NTOK = MOE_ROUTER_GEMV_TOKENS;
    const int warp = threadIdx.x / W, lane = threadIdx.x % W;
    const int64_t rows = (int64_t)E + (fuse ? 1 : 0);
    const int64_t row = (int64_t)blockIdx.x * (256 / W) + warp;
    if (row >= rows) return; /* no block-wide synchronization below */
    const uint16_t* w = row < E ? wg + row * H : ws;
    const int64_t t0 = (int64_t)blockIdx.y * NTOK;
    const int nt = (int)(T - t0 < NTOK ? T - t0 : NTOK);
    float acc[NTOK];
#pragma unroll
    for (int i = 0; i < NTOK; ++i) acc[i] = 0.0f;
    if (vec) {
        /* RB 16-byte router chunks per lane in flight before any arithmetic (a decode router
         * row is H/256 chunks per lane; one dependent load per iteration was latency bound) */
        constexpr int RB = 4;
        for (int64_t hb = (int64_t)lane * 8; hb < H; hb += (int64_t)W * 8 * RB) {
            uint4 wv[RB];
#pragma unroll
            for (int u = 0; u < RB; ++u) {
                const int64_t h = hb + (int64_t)u * W * 8;
                wv[u] = h < H ? *(const uint4*)(w + h) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int i = 0; i < NTOK; ++i) {
                if (i < nt) {
                    uint4 xv[RB];
#pragma unroll
                    for (int u = 0; u < RB; ++u) {
                        const int64_t h = hb + (int64_t)u * W * 8;
                        xv[u] = h < H ? *(const uint4*)(x + (t0 + i) * H + h) : make_uint4(0u, 0u, 0u, 0u);
                    }
#pragma unroll
                    for (int u = 0; u < RB; ++u) {
                        if (hb + (int64_t)u * W * 8 >= H) break;
                        float wf[8], xf[8];
                        moe_bf16x8_to_f(wv[u], wf);
                        moe_bf16x8_to_f(xv[u], xf);
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[i] = fmaf(xf[j], wf[j], acc[i]);
                    }
                }
            }
        }
    } else {
        for (int64_t h = lane; h < H; h += W) {
            const float wf = moe_bf16_to_f(w[h]);
#pragma unroll
            for (int i = 0; i < NTOK; ++i)
                if (i < nt) acc[i] = fmaf(moe_bf16_to_f(x[(t0 + i) * H + h]), wf, acc[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < NTOK; ++i)
        for (int m = W / 2; m > 0; m >>= 1) acc[i] += moe_shfl_xor(acc[i], m);
    if (lane == 0)
        for (int i = 0; i < nt; ++i) moe_router_store(t0 + i, row, E, rows, acc[i], logits, gate, fault);
}

__global__ void __launch_bounds__(MMA_THREADS)
moe_router_mma_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ wg,
                      const uint16_t* __restrict__ ws, int64_t T, int64_t H, int32_t E, int32_t fuse,
                      float* __restrict__ logits, float* __restrict__ gate, int32_t fault, int32_t vec) {
    __shared__ MmaSmem sm;
    __shared__ const uint16_t* aRow[MMA_BM];
    __shared__ const uint16_t* bRow[MMA_BN];
    const int tid = threadIdx.x;
    const int64_t t0 = (int64_t)blockIdx.x * MMA_BM, e0 = (int64_t)blockIdx.y * MMA_BN;
    const int64_t rows = (int64_t)E + (fuse ? 1 : 0);
    if (tid < MMA_BM) aRow[tid] = t0 + tid < T ? x + (t0 + tid) * H : nullptr;
    if (tid < MMA_BN) {
        const int64_t e = e0 + tid;
        bRow[tid] = e < E ? wg + e * H : (e < rows ? ws : nullptr);
    }
    MmaAcc acc;
    mma_zero(acc);
    uint4 ra[MmaChunks<MMA_BM>::BF16], rb[MmaChunks<MMA_BN>::BF16];
    __syncthreads(); /* aRow / bRow */
    mma_fetch_bf16<MMA_BM>(ra, aRow, 0, H, vec != 0);
    mma_fetch_bf16<MMA_BN>(rb, bRow, 0, H, vec != 0);
    for (int64_t k0 = 0; k0 < H; k0 += MMA_BK) {
        __syncthreads(); /* the previous stage's fragments have been read */
        mma_store_bf16<MMA_BM>(sm.u.t.A, ra);
        mma_store_bf16<MMA_BN>(sm.u.t.B, rb);
        __syncthreads();
        if (k0 + MMA_BK < H) { /* next stage's loads in flight during this stage's MMAs */
            mma_fetch_bf16<MMA_BM>(ra, aRow, k0 + MMA_BK, H, vec != 0);
            mma_fetch_bf16<MMA_BN>(rb, bRow, k0 + MMA_BK, H, vec != 0);
        }
        mma_k32(sm, 0, acc, false);
        mma_k32(sm, 32, acc, false);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 16; ++i) sm.u.C[mma_acc_row(i)][mma_acc_col(i)] = acc.v[i];
    __syncthreads();
    for (int idx = tid; idx < MMA_BM * MMA_BN; idx += MMA_THREADS) {
        const int r = idx / MMA_BN, c = idx % MMA_BN;
        if (t0 + r < T) moe_router_store(t0 + r, e0 + c, E, rows, sm.u.C[r][c], logits, gate, fault);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Top-K: one warp per token. Each lane holds the probabilities of experts lane + W*j; softmax */
/* max and sum are warp tree reductions (fp32; the sum's order is the tree's, not ascending);   */
/* K rounds of a warp arg-max under moe_before (larger p, exact ties to the lower index). The   */
/* renormalization sums the selected weights in slot order and divides, as the IMPL=fma kernel. */
/* ------------------------------------------------------------------------------------------ */
#define MOE_TOPK_PER_LANE ((MOE_MAX_EXPERTS + 1 + MOE_WARP_SIZE - 1) / MOE_WARP_SIZE)
static_assert(MOE_TOPK_PER_LANE <= 32, "a lane's taken-mask is one 32-bit word");

/* one level of the lane's arg-max tree: entry j takes j + H when that one comes first */
template <int H>
__device__ __forceinline__ void moe_topk_tree(float* tp, int* te, bool tie_high) {
    if constexpr (H >= 1) {
#pragma unroll
        for (int j = 0; j < H; ++j)
            if (te[j + H] >= 0 && (te[j] < 0 || moe_before(tp[j + H], te[j + H], tp[j], te[j], tie_high))) {
                tp[j] = tp[j + H];
                te[j] = te[j + H];
            }
        moe_topk_tree<H / 2>(tp, te, tie_high);
    }
}

template <int PER>
__global__ void __launch_bounds__(256)
moe_topk_warp_kernel(const float* __restrict__ logits, const float* __restrict__ gate, int64_t T,
                     int32_t E, int32_t K, int32_t renorm, int32_t fuse, int32_t* __restrict__ ids,
                     float* __restrict__ weights, int32_t fault) {
    constexpr int W = MOE_WARP_SIZE;
    static_assert(PER >= 1 && PER <= MOE_TOPK_PER_LANE && (PER & (PER - 1)) == 0, "entries per lane");
    const int warp = threadIdx.x / W, lane = threadIdx.x % W;
    const int64_t t = (int64_t)blockIdx.x * (256 / W) + warp;
    if (t >= T) return; /* no block-wide synchronization below */
    const int S = K + (fuse ? 1 : 0);
    const float* l = logits + t * E;
    int32_t* id = ids + t * S;
    float* w = weights + t * S;
    const bool tie_high = fault == MOE_FAULT_BENIGN_TIE_ORDER_HIGH;

    float p[PER];
    float mx = -__uint_as_float(0x7F800000u);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int e = lane + W * j;
        p[j] = e < E ? l[e] : 0.0f;
        if (e < E) mx = fmaxf(mx, p[j]);
    }
    for (int m = W / 2; m > 0; m >>= 1) mx = fmaxf(mx, moe_shfl_xor(mx, m));
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < PER; ++j)
        if (lane + W * j < E) sum += expf(p[j] - mx);
    for (int m = W / 2; m > 0; m >>= 1) sum += moe_shfl_xor(sum, m);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        float pe = expf(p[j] - mx) / sum;
        if (pe != pe) pe = -1.0f;
        p[j] = pe;
    }

    uint32_t taken = 0u;
    float denom = 0.0f; /* sum of the selected weights in slot order, identical in every lane */
    for (int s = 0; s < K; ++s) {
        /* the lane's best untaken entry by a pairwise tree (depth log2 PER instead of a chain of
         * PER dependent selects); moe_before is a strict total order on (p, e) with distinct e
         * and p never NaN, so the winner is the chain's winner */
        float tp[PER];
        int te[PER];
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int e = lane + W * j;
            tp[j] = p[j];
            te[j] = (e < E && !((taken >> j) & 1u)) ? e : -1;
        }
        moe_topk_tree<PER / 2>(tp, te, tie_high);
        float bp = te[0] >= 0 ? tp[0] : 0.0f;
        int be = te[0];
        for (int m = W / 2; m > 0; m >>= 1) {
            const float op = moe_shfl_xor(bp, m);
            const int oe = moe_shfl_xor(be, m);
            if (oe >= 0 && (be < 0 || moe_before(op, oe, bp, be, tie_high))) { bp = op; be = oe; }
        }
        if (be < 0) { be = 0; bp = 0.0f; } /* unreachable for K <= E */
        if (be % W == lane) taken |= 1u << (be / W);
        if (lane == 0) { id[s] = be; w[s] = bp; }
        denom += bp;
    }
    if (lane != 0) return;
    float g = fuse ? gate[t] : 0.0f;
    if (renorm && fault != MOE_FAULT_RENORMALIZE_IGNORED) {
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
/* Grouped GEMM over expert blocks on matrix cores (stage 1 and stage 2).                      */
/* Workgroup: one 32-row align block (one expert) x 128 output columns; blockIdx.z = split.    */
/* Stage 1 columns: [gate n0..n0+63 | up n0..n0+63].                                           */
/* ------------------------------------------------------------------------------------------ */
template <bool FP8, bool STAGE1>
__global__ void __launch_bounds__(MMA_THREADS) moe_mma_gemm_kernel(MoeGemmArgs a, int32_t vecA, int32_t vecB) {
    constexpr int BM = MMA_BM, BN = MMA_BN;
    __shared__ MmaSmem sm;
    __shared__ const uint16_t* aRow[BM];
    __shared__ const void* bRow[BN];
    __shared__ int64_t rowA[BM];
    __shared__ int32_t rowPair[BM];
    __shared__ float sAsc[BM];
    __shared__ float sBsc[BN];
    __shared__ uint16_t lut[256];
    __shared__ int anyInvalid;

    const int tid = threadIdx.x;
    const int64_t blk = blockIdx.x;
    const bool pad_fault = !STAGE1 && a.fault == MOE_FAULT_PADDING_EXPERT_ZERO;
    if (!pad_fault && blk * BM >= (int64_t)(*a.padded_count)) return;
    const int32_t e = a.block_experts[blk];
    if (e < 0 || e >= a.n_experts) return;
    const int64_t n0 = (int64_t)blockIdx.y * (STAGE1 ? BN / 2 : BN);
    const int64_t nIB = (a.N + MOE_QGROUP - 1) / MOE_QGROUP; /* stage 1: gate scale rows */

    if (tid == 0) anyInvalid = 0;
    __syncthreads();
    if (tid < BM) {
        const int32_t pr = a.sorted[blk * BM + tid];
        const bool valid = pr >= 0 && (int64_t)pr < a.pairs;
        rowPair[tid] = valid ? pr : -1;
        const int64_t ra = valid ? (STAGE1 ? (int64_t)pr / a.S : (int64_t)pr) : -1;
        rowA[tid] = ra;
        aRow[tid] = valid ? a.A + ra * a.K : nullptr;
        if (!valid) atomicAdd(&anyInvalid, 1);
    }
    if (tid < BN) {
        const int c = tid;
        int64_t brow;
        bool valid;
        if (STAGE1) {
            const int64_t j = n0 + (c & 63);
            valid = j < a.N;
            brow = (c < 64) ? j : a.N + j;
        } else {
            brow = n0 + c;
            valid = brow < a.N;
        }
        const int64_t o = ((int64_t)e * a.b_rows + brow) * a.K;
        bRow[c] = !valid ? nullptr
                         : (FP8 ? (const void*)((const uint8_t*)a.B + o) : (const void*)((const uint16_t*)a.B + o));
    }
    if (FP8) lut[tid] = moe_f_to_bf16(moe_fp8_decode((uint32_t)tid, a.fnuz_decode != 0));
    __syncthreads();

    /* fault: the last, partially filled block of an expert's run is skipped (rows stay 0) */
    if (!STAGE1 && a.fault == MOE_FAULT_LAST_PARTIAL_M_TILE_SKIPPED && anyInvalid) {
        for (int idx = tid; idx < BM * BN; idx += MMA_THREADS) {
            const int r = idx / BN, c = idx % BN;
            const int64_t h = n0 + c;
            if (rowPair[r] >= 0 && h < a.N) a.out_f32[(int64_t)rowPair[r] * a.N + h] = 0.0f;
        }
        return;
    }

    /* K-block range of this split */
    int64_t kb_begin = 0, kb_end = a.nKB;
    if (a.split > 1) {
        kb_begin = (int64_t)blockIdx.z * a.nKB / a.split;
        kb_end = ((int64_t)blockIdx.z + 1) * a.nKB / a.split;
    }
    const bool rev = a.reverse != 0;
    const bool low = FP8 && a.fault == MOE_FAULT_FP8_ACCUMULATION_14BIT;
#if defined(MOE_MFMA_FP8_FNUZ) && MOE_MFMA_FP8_FNUZ
    /* gfx94x: e4m3fnuz weights x fnuz-quantized activations on the fp8 MFMA (uniform per launch;
     * fnuz_decode is 0 for e4m3fn weights and under the fnuz_as_fn fault, which keep the bf16
     * decode path). Same stages, same 128-K partials and promotion, same fault hooks. */
    const bool f8mma = FP8 && a.fnuz_decode != 0;
#endif

    MmaAcc acc, part;
    mma_zero(acc);
    mma_zero(part);
    /* Stages q = 0 .. nq-1: (128-K block, 64-wide half) in processing order (reversed for the
     * benign reverse-accumulation fault); halves at or past K are skipped. */
    constexpr int SUBS = MOE_QGROUP / MMA_BK;
    const int64_t nq = (kb_end - kb_begin) * SUBS;
    auto q_kb = [&](int64_t q) { const int64_t kbi = q / SUBS; return rev ? kb_end - 1 - kbi : kb_begin + kbi; };
    auto q_k0 = [&](int64_t q) {
        const int sub = (int)(q % SUBS);
        return q_kb(q) * MOE_QGROUP + (int64_t)(rev ? SUBS - 1 - sub : sub) * MMA_BK;
    };
    auto next_valid = [&](int64_t q) {
        while (q < nq && q_k0(q) >= a.K) ++q;
        return q;
    };
    constexpr int NB = FP8 ? MmaChunks<BN>::FP8 : MmaChunks<BN>::BF16;
    uint4 ra[MmaChunks<BM>::BF16], rb[NB];
    auto fetch = [&](int64_t k0) {
        mma_fetch_bf16<BM>(ra, aRow, k0, a.K, vecA != 0);
        if (FP8) mma_fetch_fp8<BN>(rb, (const uint8_t* const*)bRow, k0, a.K, vecB != 0);
        else mma_fetch_bf16<BN>(rb, (const uint16_t* const*)bRow, k0, a.K, vecB != 0);
    };
    int64_t qn = next_valid(0);
    if (qn < nq) fetch(q_k0(qn));
    for (int64_t q = 0; q < nq; ++q) {
        const int64_t kb = q_kb(q);
        const int sub = (int)(q % SUBS);
        if (FP8 && sub == 0) {
            __syncthreads(); /* the previous block's promotion has read sAsc / sBsc */
            if (tid < BM) {
                int64_t kba = kb;
                if (STAGE1 && a.fault == MOE_FAULT_WRONG_KBLOCK_SCALE) kba = (kb + 1) % a.nKB;
                sAsc[tid] = rowA[tid] >= 0 ? a.A_scale[rowA[tid] * a.nKB + kba] : 0.0f;
            }
            if (tid < BN) {
                const int c = tid;
                int64_t srow;
                if (STAGE1) {
                    const int64_t j = n0 + (c & 63);
                    srow = (c < 64) ? j / MOE_QGROUP : nIB + j / MOE_QGROUP;
                } else {
                    srow = (n0 + c) / MOE_QGROUP;
                }
                sBsc[c] = bRow[c] != nullptr ? a.B_scale[((int64_t)e * a.nNB + srow) * a.nKB + kb] : 0.0f;
            }
        }
        if (q == qn) { /* uniform: this stage's data is in ra / rb */
            __syncthreads(); /* the previous stage's fragments have been read */
#if defined(MOE_MFMA_FP8_FNUZ) && MOE_MFMA_FP8_FNUZ
            if (f8mma) {
                mma_store_a_fnuz<BM>(sm.u.f8.A, ra);
                mma_store_fp8_raw<BN>(sm.u.f8.B, rb);
            } else
#endif
            {
                mma_store_bf16<BM>(sm.u.t.A, ra);
                if (FP8) mma_store_fp8<BN>(sm.u.t.B, rb, lut);
                else mma_store_bf16<BN>(sm.u.t.B, rb);
            }
            __syncthreads();
            qn = next_valid(q + 1);
            if (qn < nq) fetch(q_k0(qn)); /* in flight during this stage's MMAs */
            MmaAcc& dst = FP8 ? part : acc;
            for (int h = 0; h < MMA_BK / 32; ++h) {
#if defined(MOE_MFMA_FP8_FNUZ) && MOE_MFMA_FP8_FNUZ
                if (f8mma) mma_k32_fp8(sm, 32 * (rev ? MMA_BK / 32 - 1 - h : h), dst, rev);
                else
#endif
                mma_k32(sm, 32 * (rev ? MMA_BK / 32 - 1 - h : h), dst, rev);
                /* fault: the fp8 running sums kept in ~14 significant bits (rounded every 32 K) */
                if (low) {
#pragma unroll
                    for (int i = 0; i < 16; ++i) part.v[i] = moe_round14(part.v[i]);
                }
            }
        }
        if (FP8 && sub == SUBS - 1) { /* promotion of the 128-K block partial, fp32 */
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const float s = sAsc[mma_acc_row(i)] * sBsc[mma_acc_col(i)];
                acc.v[i] += s * part.v[i];
                if (low) acc.v[i] = moe_round14(acc.v[i]);
                part.v[i] = 0.0f;
            }
        }
    }

    /* epilogue through the fp32 tile in shared memory */
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 16; ++i) sm.u.C[mma_acc_row(i)][mma_acc_col(i)] = acc.v[i];
    __syncthreads();
    if (STAGE1) {
        for (int idx = tid; idx < BM * (BN / 2); idx += MMA_THREADS) {
            const int r = idx / (BN / 2), jj = idx % (BN / 2);
            const int32_t pr = rowPair[r];
            const int64_t j = n0 + jj;
            if (pr < 0 || j >= a.N) continue;
            float gt = sm.u.C[r][jj], up = sm.u.C[r][BN / 2 + jj];
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
        for (int idx = tid; idx < BM * BN; idx += MMA_THREADS) {
            const int r = idx / BN, c = idx % BN;
            const int32_t pr = rowPair[r];
            const int64_t h = n0 + c;
            if (pr < 0 || h >= a.N) continue;
            const float v = sm.u.C[r][c] * scale;
            if (pad_fault) atomicAdd(a.out_f32 + (int64_t)pr * a.N + h, v);
            else a.out_f32[(int64_t)pr * a.N + h] = v;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* NVIDIA (sm_80+) pipelined grouped GEMM ("gemm2"), used whenever K is a multiple of 8 (bf16)  */
/* or 16 (fp8) and the operands are 16-byte aligned (else moe_mma_gemm_kernel above).          */
/*                                                                                              */
/* - A multi-stage cp.async ring in dynamic shared memory (K = 64 per stage, row stride 144 B:  */
/*   conflict-free ldmatrix); every global load is a 16-byte cp.async whose src-size is 0 for   */
/*   rows outside the tile (sentinel pairs, columns >= N) and for K >= K (zero fill).           */
/* - Fragments through ldmatrix.x4 (A: one m16k16 tile, B: two n8k16 tiles per instruction).    */
/* - Tiles per shape (G2Cfg): 64 rows = two align blocks of the same expert (the pairing starts */
/*   at the expert's first block; an odd last block runs with the second row half idle) x 128   */
/*   columns for prefill; 32 x 128 for medium T; 32 x 32 with 4 warps for decode (many CTAs     */
/*   stream the weights). One CTA may walk several consecutive N tiles (persistent in N) when   */
/*   K is short, the ring running on across tile boundaries.                                    */
/* - Stage 1 B rows are interleaved in groups of 8: tile column group 2i = gate j, 2i+1 = up j  */
/*   of the same 8 columns, so a thread holds gate and up of its columns in registers and the   */
/*   epilogue (SwiGLU, split-K atomics, every fault) runs from registers.                       */
/* - FP8: raw codes ride the ring; each stage is decoded once through the 256-entry table into  */
/*   a bf16 tile; 128-K partials and their promotion exactly as moe_mma_gemm_kernel (same       */
/*   k16 order, so both kernels give the same bits).                                            */
/* ------------------------------------------------------------------------------------------ */
#if !(defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__))
#define G2_BK 64
#define G2_LDS (G2_BK + 8) /* bf16 elements per shared row: 144 bytes */

template <int BM_, int BN_, int WM_, int WN_, int STAGES_, int MINB_> struct G2Cfg {
    static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
    static constexpr int MINB = MINB_;                            /* CTAs per SM we ask registers for */
    static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN, WARPS = WARPS_M * WARPS_N;
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int FM = WM / 16, FN = WN / 8;
    static constexpr int MT = BM / MOE_BLOCK_M;                   /* align blocks per tile */
    static constexpr int A_BYTES = BM * G2_LDS * 2;
    static constexpr int B_BYTES = BN * G2_LDS * 2;               /* bf16 stage / decoded fp8 tile */
    static constexpr int B8_BYTES = BN * G2_BK;                   /* raw fp8 stage */
    static constexpr int ITA = BM * (G2_BK / 8) / THREADS;        /* 16-byte chunks per thread */
    static constexpr int ITB16 = BN * (G2_BK / 8) / THREADS;
    static constexpr int ITB8 = BN * (G2_BK / 16) / THREADS;
    static constexpr size_t smem(bool fp8) {
        return fp8 ? (size_t)STAGES * (A_BYTES + B8_BYTES) + B_BYTES : (size_t)STAGES * (A_BYTES + B_BYTES);
    }
    static_assert(BM % MOE_BLOCK_M == 0 && MT <= 2, "a tile is one or two align blocks");
    static_assert(MOE_BLOCK_M % WM == 0 && WM % 16 == 0, "a warp's rows lie in one align block");
    static_assert(FN % 2 == 0, "B fragments come in pairs (ldmatrix.x4; gate/up pairs)");
    static_assert(THREADS >= BM && THREADS >= 64, "row setup: one thread per row; flags by threads 0..3, 32..33");
    static_assert(ITA >= 1 && ITB16 >= 1 && ITB8 >= 1, "chunk split");
    static_assert(ITA * THREADS == BM * 8 && ITB16 * THREADS == BN * 8 && ITB8 * THREADS == BN * 4, "chunk split");
};
typedef G2Cfg<64, 128, 32, 32, 3, 2> G2Prefill; /* 8 warps 2x4, warp 32x32; 81 KB (bf16) */
typedef G2Cfg<32, 128, 16, 32, 4, 2> G2Medium;  /* 8 warps 2x4, warp 16x32; 90 KB (bf16) */
typedef G2Cfg<32, 32, 16, 16, 4, 4> G2Decode;   /* 4 warps 2x2, warp 16x16; 36 KB (bf16) */

/* Tile column c (B shared row) -> weight row of expert e, or -1 outside N. Stage 1: column     */
/* group F = c/8 holds gate (F even) or up (F odd) of j = n0 + (F/2)*8 + c%8.                   */
template <int BN, bool STAGE1>
__device__ __forceinline__ int64_t g2_brow(int64_t nt, int c, int64_t N) {
    if (STAGE1) {
        const int F = c >> 3;
        const int64_t j = nt * (BN / 2) + (int64_t)(F >> 1) * 8 + (c & 7);
        if (j >= N) return -1;
        return (F & 1) ? N + j : j;
    } else {
        const int64_t n = nt * BN + c;
        return n < N ? n : -1;
    }
}

template <class C, bool FP8, bool STAGE1>
__global__ void __launch_bounds__(C::THREADS, C::MINB) moe_gemm2_kernel(MoeGemmArgs a, int32_t nl) {
    constexpr int BM = C::BM, BN = C::BN, NT = C::THREADS, ST = C::STAGES, FM = C::FM, FN = C::FN, MT = C::MT;
    extern __shared__ __align__(16) unsigned char g2_smem[];
    __shared__ int32_t rowPair[BM];
    __shared__ int64_t rowA[BM];
    __shared__ int32_t blkInvalid[MT];
    __shared__ int32_t grpValid[BM / 16];
    __shared__ uint16_t lut[256];
    __shared__ int32_t sLead[2];

    uint16_t* sA = (uint16_t*)g2_smem;                                /* [ST][BM][G2_LDS] */
    unsigned char* sB = g2_smem + (size_t)ST * C::A_BYTES;            /* [ST][BN][G2_LDS] or [ST][BN][64] */
    uint16_t* sBc = (uint16_t*)(sB + (size_t)ST * C::B8_BYTES);       /* fp8: decoded [BN][G2_LDS] */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
    const int g = lane >> 2, tig = lane & 3;
    const int64_t blk = blockIdx.x;
    const bool pad_fault = !STAGE1 && a.fault == MOE_FAULT_PADDING_EXPERT_ZERO;
    const int64_t padded = *a.padded_count;
    if (!pad_fault && blk * MOE_BLOCK_M >= padded) return;
    const int32_t e = a.block_experts[blk];
    if (e < 0 || e >= a.n_experts) return;
    const int64_t pblocks = padded / MOE_BLOCK_M;

    /* 64-row tiles: block b leads iff it is an even block of its expert's run (found by a      */
    /* 32-way search in the ascending block_experts); it takes b+1 when b+1 is the same expert. */
    int nsub = 1;
    if (MT == 2) {
        if (warp == 0) {
            int lead = 1, partner = 0;
            if (blk < pblocks) {
                int64_t lo = 0, hi = blk; /* block_experts[hi] == e; first index of e in [lo, hi] */
                while (lo < hi) {
                    const int64_t span = hi - lo;
                    const int64_t pos = lo + (span * lane) / 32;
                    const bool lt = a.block_experts[pos] < e;
                    const int L = __popc(__ballot_sync(0xffffffffu, lt));
                    if (L == 0) break;
                    const int64_t last = lo + (span * (L - 1)) / 32;
                    if (L < 32) hi = lo + (span * L) / 32;
                    lo = last + 1;
                }
                lead = ((blk - lo) & 1) == 0;
                partner = lead && blk + 1 < pblocks && a.block_experts[blk + 1] == e;
            }
            if (lane == 0) { sLead[0] = lead; sLead[1] = partner; }
        }
        __syncthreads();
        if (!sLead[0]) return; /* uniform: the previous even block owns this one */
        nsub = 1 + sLead[1];
    }

    if (tid < BM) {
        int32_t pr = -1;
        if (tid / MOE_BLOCK_M < nsub) {
            const int32_t v = a.sorted[blk * MOE_BLOCK_M + tid];
            if (v >= 0 && (int64_t)v < a.pairs) pr = v;
        }
        rowPair[tid] = pr;
        rowA[tid] = pr >= 0 ? (STAGE1 ? (int64_t)pr / a.S : (int64_t)pr) : -1;
    }
    if (FP8)
        for (int i = tid; i < 256; i += NT) lut[i] = moe_f_to_bf16(moe_fp8_decode((uint32_t)i, a.fnuz_decode != 0));
    __syncthreads();
    if (tid < BM / 16) {
        int any = 0;
        for (int r = 0; r < 16; ++r) any |= rowPair[16 * tid + r] >= 0;
        grpValid[tid] = any;
    } else if (tid >= 32 && tid < 32 + MT) {
        const int sb = tid - 32;
        int inv = 0; /* the align block has a sentinel / invalid entry (last_partial fault) */
        for (int r = 0; r < MOE_BLOCK_M; ++r) inv |= rowPair[MOE_BLOCK_M * sb + r] < 0;
        blkInvalid[sb] = sb < nsub ? inv : 0;
    }

    /* per-thread A chunk sources (fixed for the whole CTA) */
    const uint16_t* aSrc[C::ITA];
#pragma unroll
    for (int i = 0; i < C::ITA; ++i) {
        const int r = (tid + NT * i) >> 3;
        const int64_t ra = rowA[r];
        aSrc[i] = ra >= 0 ? a.A + ra * a.K : nullptr;
    }

    /* K-block range of this split, and the 64-wide steps in processing order */
    int64_t kb_begin = 0, kb_end = a.nKB;
    if (a.split > 1) {
        kb_begin = (int64_t)blockIdx.z * a.nKB / a.split;
        kb_end = ((int64_t)blockIdx.z + 1) * a.nKB / a.split;
    }
    const bool rev = a.reverse != 0;
    const bool low = FP8 && a.fault == MOE_FAULT_FP8_ACCUMULATION_14BIT;
    const bool skip_last = kb_end == a.nKB && (a.nKB - 1) * MOE_QGROUP + G2_BK >= a.K; /* 2nd half past K */
    const int64_t nsteps = (kb_end - kb_begin) * 2 - (skip_last ? 1 : 0);
    const int64_t ntiles = STAGE1 ? (a.N + BN / 2 - 1) / (BN / 2) : (a.N + BN - 1) / BN;
    const int64_t nt0 = (int64_t)blockIdx.y * nl;
    const int64_t nlh = ntiles - nt0 < nl ? ntiles - nt0 : nl;
    const int64_t total = nlh * nsteps;
    const int64_t nIB = (a.N + MOE_QGROUP - 1) / MOE_QGROUP;

    /* step s -> (kb, k0, first / last step of its 128-K block), the order of the old kernel */
    auto step_of = [&](int64_t s, int64_t& kb, int64_t& k0, bool& first, bool& last) {
        int sub;
        if (!rev) {
            kb = kb_begin + s / 2;
            sub = (int)(s % 2);
            first = sub == 0;
            last = sub == 1 || (skip_last && kb == a.nKB - 1);
        } else {
            const int64_t s2 = s + (skip_last ? 1 : 0);
            kb = kb_end - 1 - s2 / 2;
            const int pos = (int)(s2 % 2);
            sub = 1 - pos;
            first = pos == 0 || (skip_last && kb == a.nKB - 1);
            last = pos == 1;
        }
        k0 = kb * MOE_QGROUP + (int64_t)sub * G2_BK;
    };

    auto load = [&](int64_t it, int slot) {
        const int64_t lt = it / nsteps, s = it - lt * nsteps;
        int64_t kb, k0;
        bool f, l;
        step_of(s, kb, k0, f, l);
        const int64_t nt = nt0 + lt;
        uint16_t* dA = sA + (size_t)slot * BM * G2_LDS;
#pragma unroll
        for (int i = 0; i < C::ITA; ++i) {
            const int idx = tid + NT * i, r = idx >> 3, c = idx & 7;
            const int64_t gk = k0 + 8 * c;
            const bool ok = aSrc[i] != nullptr && gk < a.K;
            moe_cp_async16(moe_smem_u32(dA + r * G2_LDS + 8 * c), ok ? (const void*)(aSrc[i] + gk) : (const void*)a.A,
                           ok ? 16 : 0);
        }
        if (FP8) {
            unsigned char* dB = sB + (size_t)slot * C::B8_BYTES;
#pragma unroll
            for (int i = 0; i < C::ITB8; ++i) {
                const int idx = tid + NT * i, r = idx >> 2, c = idx & 3;
                const int64_t gk = k0 + 16 * c;
                const int64_t br = g2_brow<BN, STAGE1>(nt, r, a.N);
                const bool ok = br >= 0 && gk < a.K;
                const uint8_t* src = (const uint8_t*)a.B + ((int64_t)e * a.b_rows + (ok ? br : 0)) * a.K + (ok ? gk : 0);
                moe_cp_async16(moe_smem_u32(dB + r * G2_BK + 16 * c), src, ok ? 16 : 0);
            }
        } else {
            uint16_t* dB = (uint16_t*)(sB + (size_t)slot * C::B_BYTES);
#pragma unroll
            for (int i = 0; i < C::ITB16; ++i) {
                const int idx = tid + NT * i, r = idx >> 3, c = idx & 7;
                const int64_t gk = k0 + 8 * c;
                const int64_t br = g2_brow<BN, STAGE1>(nt, r, a.N);
                const bool ok = br >= 0 && gk < a.K;
                const uint16_t* src = (const uint16_t*)a.B + ((int64_t)e * a.b_rows + (ok ? br : 0)) * a.K + (ok ? gk : 0);
                moe_cp_async16(moe_smem_u32(dB + r * G2_LDS + 8 * c), src, ok ? 16 : 0);
            }
        }
    };

    float acc[FM][FN][4], part[FM][FN][4];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) { acc[i][j][q] = 0.0f; part[i][j][q] = 0.0f; }
    float asc[FM][2], bsc[FN];

    /* warps whose rows are all invalid (decode, odd last block) skip the matrix-core work */
    __syncthreads(); /* grpValid, blkInvalid */
    bool wactive = false;
#pragma unroll
    for (int q = 0; q < C::WM / 16; ++q) wactive |= grpValid[wm * (C::WM / 16) + q] != 0;

#pragma unroll
    for (int p = 0; p < ST - 1; ++p) {
        if (p < total) load(p, p);
        moe_cp_async_commit();
    }
    for (int64_t it = 0; it < total; ++it) {
        moe_cp_async_wait<ST - 2>();
        __syncthreads(); /* stage `it` landed for every thread; everyone is done with stage it-1 */
        {
            const int64_t nx = it + ST - 1;
            if (nx < total) load(nx, (int)(nx % ST));
            moe_cp_async_commit();
        }
        const int slot = (int)(it % ST);
        const int64_t lt = it / nsteps, s = it - lt * nsteps;
        const int64_t nt = nt0 + lt;
        int64_t kb, k0;
        bool first, last;
        step_of(s, kb, k0, first, last);
        (void)k0;
        const uint16_t* tA = sA + (size_t)slot * BM * G2_LDS;
        const uint16_t* tB;
        if (FP8) {
            const unsigned char* raw = sB + (size_t)slot * C::B8_BYTES;
#pragma unroll
            for (int i = 0; i < C::ITB8; ++i) {
                const int idx = tid + NT * i, r = idx >> 2, c = idx & 3;
                const uint4 v = *(const uint4*)(raw + r * G2_BK + 16 * c);
                const uint32_t qw[4] = {v.x, v.y, v.z, v.w};
                uint32_t w[8];
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    w[j] = (uint32_t)lut[(qw[j >> 1] >> (16 * (j & 1))) & 0xFFu] |
                           ((uint32_t)lut[(qw[j >> 1] >> (16 * (j & 1) + 8)) & 0xFFu] << 16);
                *(uint4*)(sBc + r * G2_LDS + 16 * c) = make_uint4(w[0], w[1], w[2], w[3]);
                *(uint4*)(sBc + r * G2_LDS + 16 * c + 8) = make_uint4(w[4], w[5], w[6], w[7]);
            }
            if (first) { /* this 128-K block's scales, used at its promotion */
#pragma unroll
                for (int fm = 0; fm < FM; ++fm)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int64_t ra = rowA[wm * C::WM + fm * 16 + g + 8 * h];
                        int64_t kba = kb;
                        if (STAGE1 && a.fault == MOE_FAULT_WRONG_KBLOCK_SCALE) kba = (kb + 1) % a.nKB;
                        asc[fm][h] = ra >= 0 ? a.A_scale[ra * a.nKB + kba] : 0.0f;
                    }
#pragma unroll
                for (int fn = 0; fn < FN; ++fn) {
                    const int c = wn * C::WN + fn * 8 + 2 * tig;
                    const int64_t br = g2_brow<BN, STAGE1>(nt, c, a.N);
                    int64_t srow = 0;
                    if (STAGE1) {
                        const int64_t j = br >= a.N ? br - a.N : br;
                        srow = br >= a.N ? nIB + j / MOE_QGROUP : j / MOE_QGROUP;
                    } else {
                        srow = br / MOE_QGROUP;
                    }
                    bsc[fn] = br >= 0 ? a.B_scale[((int64_t)e * a.nNB + srow) * a.nKB + kb] : 0.0f;
                }
            }
            __syncthreads(); /* decoded tile complete */
            tB = sBc;
        } else {
            tB = (const uint16_t*)(sB + (size_t)slot * C::B_BYTES);
        }

        if (wactive) {
#pragma unroll
            for (int kk = 0; kk < G2_BK / 16; ++kk) {
                const int k16 = 16 * (rev ? G2_BK / 16 - 1 - kk : kk);
                uint32_t af[FM][4], bfr[FN][2];
#pragma unroll
                for (int fm = 0; fm < FM; ++fm) {
                    const int r = wm * C::WM + fm * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                    moe_ldmatrix_x4(af[fm], moe_smem_u32(tA + r * G2_LDS + k16 + 8 * (lane >> 4)));
                }
#pragma unroll
                for (int fp = 0; fp < FN / 2; ++fp) {
                    const int c = wn * C::WN + fp * 16 + (lane & 7) + 8 * (lane >> 4);
                    uint32_t r4[4];
                    moe_ldmatrix_x4(r4, moe_smem_u32(tB + c * G2_LDS + k16 + 8 * ((lane >> 3) & 1)));
                    bfr[2 * fp][0] = r4[0];
                    bfr[2 * fp][1] = r4[1];
                    bfr[2 * fp + 1][0] = r4[2];
                    bfr[2 * fp + 1][1] = r4[3];
                }
#pragma unroll
                for (int fm = 0; fm < FM; ++fm)
#pragma unroll
                    for (int fn = 0; fn < FN; ++fn) moe_mma_16x8x16_bf16(FP8 ? part[fm][fn] : acc[fm][fn], af[fm], bfr[fn]);
                /* fault: the fp8 running sums kept in ~14 significant bits (rounded every 32 K) */
                if (low && (kk & 1)) {
#pragma unroll
                    for (int fm = 0; fm < FM; ++fm)
#pragma unroll
                        for (int fn = 0; fn < FN; ++fn)
#pragma unroll
                            for (int q = 0; q < 4; ++q) part[fm][fn][q] = moe_round14(part[fm][fn][q]);
                }
            }
        }
        if (FP8 && last) { /* promotion of the 128-K block partial, fp32 */
#pragma unroll
            for (int fm = 0; fm < FM; ++fm)
#pragma unroll
                for (int fn = 0; fn < FN; ++fn)
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float sc = asc[fm][q >> 1] * bsc[fn];
                        acc[fm][fn][q] += sc * part[fm][fn][q];
                        if (low) acc[fm][fn][q] = moe_round14(acc[fm][fn][q]);
                        part[fm][fn][q] = 0.0f;
                    }
        }
        if (s != nsteps - 1) continue;

        /* ---- epilogue of N tile nt, from registers ---- */
        if (STAGE1) {
#pragma unroll
            for (int fm = 0; fm < FM; ++fm)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int32_t pr = rowPair[wm * C::WM + fm * 16 + g + 8 * h];
                    if (pr < 0) continue;
#pragma unroll
                    for (int fn = 0; fn < FN; fn += 2) {
                        const int F = (wn * C::WN) / 8 + fn; /* even: gate group; fn+1: up */
                        const int64_t j = nt * (BN / 2) + (int64_t)(F >> 1) * 8 + 2 * tig;
                        if (j >= a.N) continue;
                        float gt[2] = {acc[fm][fn][2 * h], acc[fm][fn][2 * h + 1]};
                        float up[2] = {acc[fm][fn + 1][2 * h], acc[fm][fn + 1][2 * h + 1]};
                        const int ncol = j + 1 < a.N ? 2 : 1;
                        if (a.split > 1) {
                            float* ws = a.out_f32 + (int64_t)pr * 2 * a.N;
#pragma unroll
                            for (int cc = 0; cc < 2; ++cc) {
                                if (cc >= ncol) break;
                                float gv = gt[cc], uv = up[cc];
                                if (a.fault == MOE_FAULT_SPLITK_BF16_PARTIALS) {
                                    gv = moe_round_bf16(gv); uv = moe_round_bf16(uv);
                                } else if (a.fault == MOE_FAULT_SPLITK_FP16_PARTIALS) {
                                    gv = moe_fp16_round(gv); uv = moe_fp16_round(uv);
                                }
                                atomicAdd(ws + j + cc, gv);
                                atomicAdd(ws + a.N + j + cc, uv);
                            }
                        } else {
                            uint16_t o[2] = {0, 0};
#pragma unroll
                            for (int cc = 0; cc < 2; ++cc) {
                                if (cc >= ncol) break;
                                float silu = gt[cc] / (1.0f + expf(-gt[cc]));
                                if (a.fault == MOE_FAULT_INTERMEDIATE_ROUNDED_TWICE) silu = moe_round_bf16(silu);
                                o[cc] = moe_f_to_bf16(silu * up[cc]);
                            }
                            uint16_t* dst = a.out_bf16 + (int64_t)pr * a.N + j;
                            if (ncol == 2 && (a.N & 1) == 0) *(uint32_t*)dst = (uint32_t)o[0] | ((uint32_t)o[1] << 16);
                            else {
                                dst[0] = o[0];
                                if (ncol == 2) dst[1] = o[1];
                            }
                        }
                    }
                }
        } else {
            /* fault: the lowest used expert (block 0's) computes its output x (1 + 2^-6) */
            const float scale = (a.fault == MOE_FAULT_EXPERT_SCALED_1P2M6 && e == a.block_experts[0]) ? 1.015625f : 1.0f;
            /* fault: the last, partially filled block of an expert's run is skipped (rows = 0) */
            const bool skipped = a.fault == MOE_FAULT_LAST_PARTIAL_M_TILE_SKIPPED &&
                                 blkInvalid[(wm * C::WM) / MOE_BLOCK_M] != 0;
#pragma unroll
            for (int fm = 0; fm < FM; ++fm)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int32_t pr = rowPair[wm * C::WM + fm * 16 + g + 8 * h];
                    if (pr < 0) continue;
                    float* yrow = a.out_f32 + (int64_t)pr * a.N;
#pragma unroll
                    for (int fn = 0; fn < FN; ++fn) {
                        const int64_t n = nt * BN + wn * C::WN + fn * 8 + 2 * tig;
                        if (n >= a.N) continue;
                        float v0 = skipped ? 0.0f : acc[fm][fn][2 * h] * scale;
                        float v1 = skipped ? 0.0f : acc[fm][fn][2 * h + 1] * scale;
                        const bool two = n + 1 < a.N;
                        if (pad_fault) {
                            atomicAdd(yrow + n, v0);
                            if (two) atomicAdd(yrow + n + 1, v1);
                        } else if (two && (a.N & 1) == 0) {
                            *(float2*)(yrow + n) = make_float2(v0, v1);
                        } else {
                            yrow[n] = v0;
                            if (two) yrow[n + 1] = v1;
                        }
                    }
                }
        }
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
            for (int j = 0; j < FN; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
    }
    moe_cp_async_wait<0>(); /* nothing may be in flight at exit (only empty groups remain) */
}
#endif /* NVIDIA gemm2 */

/* ------------------------------------------------------------------------------------------ */
/* launchers (host)                                                                            */
/* ------------------------------------------------------------------------------------------ */
static bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }

void moe_launch_router_logits(const void* x, const void* wg, const void* ws, int64_t T, int64_t H,
                              int32_t E, int32_t fuse, float* logits, float* gate, int32_t fault) {
    const int32_t vec = H % 8 == 0 && aligned16(x) && aligned16(wg) && (!fuse || aligned16(ws));
    const int64_t rows = (int64_t)E + fuse;
    if (T <= MOE_ROUTER_GEMV_MAX_T) {
        const int warps = 256 / MOE_WARP_SIZE;
        dim3 grid((unsigned)((rows + warps - 1) / warps),
                  (unsigned)((T + MOE_ROUTER_GEMV_TOKENS - 1) / MOE_ROUTER_GEMV_TOKENS));
        moe_router_gemv_kernel<<<grid, 256>>>((const uint16_t*)x, (const uint16_t*)wg, (const uint16_t*)ws, T,
                                              H, E, fuse, logits, gate, fault, vec);
    } else {
        /* A router mode of the pipelined GEMM (moe_gemm2_kernel, 32 x 128 tiles) measured slower
         * on the H200 than this kernel (397B T = 4096: router stage 0.301 vs 0.246 ms; T = 64:
         * 0.100 vs 0.094 ms); it was not dispatched, and its code was removed. */
        dim3 grid((unsigned)((T + MMA_BM - 1) / MMA_BM), (unsigned)((rows + MMA_BN - 1) / MMA_BN));
        moe_router_mma_kernel<<<grid, MMA_THREADS>>>((const uint16_t*)x, (const uint16_t*)wg, (const uint16_t*)ws,
                                                     T, H, E, fuse, logits, gate, fault, vec);
    }
}

void moe_launch_topk(const float* logits, const float* gate, int64_t T, int32_t E, int32_t K,
                     int32_t renorm, int32_t fuse, int32_t* ids, float* weights, int32_t fault) {
    const int per_block = 256 / MOE_WARP_SIZE;
    const unsigned nb = (unsigned)((T + per_block - 1) / per_block);
    /* entries per lane: the smallest power of two covering E (the loops past E were all masked) */
    if (E <= 4 * MOE_WARP_SIZE) moe_topk_warp_kernel<4><<<nb, 256>>>(logits, gate, T, E, K, renorm, fuse, ids, weights, fault);
    else if (E <= 8 * MOE_WARP_SIZE) moe_topk_warp_kernel<8><<<nb, 256>>>(logits, gate, T, E, K, renorm, fuse, ids, weights, fault);
    else if (E <= 16 * MOE_WARP_SIZE) moe_topk_warp_kernel<16><<<nb, 256>>>(logits, gate, T, E, K, renorm, fuse, ids, weights, fault);
    else moe_topk_warp_kernel<MOE_TOPK_PER_LANE><<<nb, 256>>>(logits, gate, T, E, K, renorm, fuse, ids, weights, fault);
}

#if !(defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__))
static int g2_sm_count(void) {
    static int cached[64] = {0};
    int dev = 0;
    if (hipGetDevice(&dev) != hipSuccess || dev < 0 || dev >= 64) return 132;
    if (cached[dev] == 0) {
        int n = 0;
        if (moe_multiprocessor_count(dev, &n) != hipSuccess || n <= 0) n = 132;
        cached[dev] = n;
    }
    return cached[dev];
}

/* Launch one gemm2 instantiation: opt in to its dynamic shared memory once per device. */
template <class C, bool FP8, bool STAGE1>
static void g2_launch(const MoeGemmArgs& a, int64_t nblocks, int sms) {
    static bool opted[64] = {false};
    int dev = 0;
    if (hipGetDevice(&dev) != hipSuccess || dev < 0 || dev >= 64) dev = 0;
    const size_t smem = C::smem(FP8);
    if (!opted[dev]) {
        (void)moe_func_max_dynamic_smem((const void*)moe_gemm2_kernel<C, FP8, STAGE1>, (int)smem);
        opted[dev] = true;
    }
    const int64_t bn = STAGE1 ? C::BN / 2 : C::BN;
    const int64_t ntiles = (a.N + bn - 1) / bn;
    /* persistent in N when K is short: about 8 K-steps of 64 per CTA, while keeping >= 2 CTAs
     * per SM (estimated from the pairs: tiles actually used, not the capacity) */
    const int64_t ksteps = ((a.K + 63) / 64 + (a.split > 1 ? a.split - 1 : 0)) / (a.split > 1 ? a.split : 1);
    const int64_t used = (C::MT == 2 ? a.pairs / 64 + a.n_experts : a.pairs / 32 + (a.pairs < a.n_experts ? a.pairs : a.n_experts));
    int64_t nl = 1;
    if (ksteps < 8) {
        nl = (8 + ksteps - 1) / ksteps;
        while (nl > 1 && used * ((ntiles + nl - 1) / nl) * (a.split > 1 ? a.split : 1) < 2 * (int64_t)sms) nl /= 2;
        if (nl > ntiles) nl = ntiles;
        if (nl < 1) nl = 1;
    }
    dim3 grid((unsigned)nblocks, (unsigned)((ntiles + nl - 1) / nl), (unsigned)(a.split > 1 ? a.split : 1));
    moe_gemm2_kernel<C, FP8, STAGE1><<<grid, C::THREADS, smem>>>(a, (int32_t)nl);
}

template <class C>
static void g2_dispatch(const MoeGemmArgs& a, bool fp8, bool stage1, int64_t nblocks, int sms) {
    if (fp8 && stage1) g2_launch<C, true, true>(a, nblocks, sms);
    else if (fp8) g2_launch<C, true, false>(a, nblocks, sms);
    else if (stage1) g2_launch<C, false, true>(a, nblocks, sms);
    else g2_launch<C, false, false>(a, nblocks, sms);
}
#endif

void moe_launch_gemm(const MoeGemmArgs& a, bool fp8, bool stage1, int64_t nblocks) {
    nblocks = moe_gemm_grid_blocks(a, stage1, nblocks, MOE_BLOCK_M, MOE_FAULT_PADDING_EXPERT_ZERO);
#if !(defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__))
    /* The pipelined kernel needs 16-byte rows: K a multiple of 8 (bf16) / 16 (fp8 codes). The
     * choice depends on the problem only (allocations are 256-byte aligned), so a forward and a
     * staged run of the same problem always take the same kernel and tile. */
    if (a.K % (fp8 ? 16 : 8) == 0 && aligned16(a.A) && aligned16(a.B)) {
        const int sms = g2_sm_count();
        const int64_t ncols = stage1 ? 2 * a.N : a.N;
        const int64_t E1 = a.n_experts;
        if (a.pairs >= 32 * E1) {
            g2_dispatch<G2Prefill>(a, fp8, stage1, nblocks, sms);           /* >= one full block per expert */
        } else {
            const int64_t used = a.pairs / 32 + (a.pairs < E1 ? a.pairs : E1); /* align blocks in use (about) */
            if (used * ((ncols + 127) / 128) >= 3 * (int64_t)sms) g2_dispatch<G2Medium>(a, fp8, stage1, nblocks, sms);
            else g2_dispatch<G2Decode>(a, fp8, stage1, nblocks, sms);       /* decode: many narrow CTAs */
        }
        return;
    }
#endif
    const int64_t ncols = stage1 ? MMA_BN / 2 : MMA_BN;
    dim3 grid((unsigned)nblocks, (unsigned)((a.N + ncols - 1) / ncols), (unsigned)(a.split > 1 ? a.split : 1));
    const int32_t vecA = a.K % 8 == 0 && aligned16(a.A);
    const int32_t vecB = a.K % (fp8 ? 16 : 8) == 0 && aligned16(a.B);
    if (fp8 && stage1) moe_mma_gemm_kernel<true, true><<<grid, MMA_THREADS>>>(a, vecA, vecB);
    else if (fp8) moe_mma_gemm_kernel<true, false><<<grid, MMA_THREADS>>>(a, vecA, vecB);
    else if (stage1) moe_mma_gemm_kernel<false, true><<<grid, MMA_THREADS>>>(a, vecA, vecB);
    else moe_mma_gemm_kernel<false, false><<<grid, MMA_THREADS>>>(a, vecA, vecB);
}

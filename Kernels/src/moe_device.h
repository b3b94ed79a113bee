/* moe_device.h — device helpers shared by the kernels: bf16 / fp8 / fp16 rounding, fp8 decode. */
#ifndef MOE_DEVICE_H
#define MOE_DEVICE_H

#include "moe_portability.h"
#include <stdint.h>

#define MOE_BLOCK_M 32   /* rows per expert block (moe_align_block_size) */
#define MOE_TILE_N 128   /* output columns per GEMM tile (stage 1: 64 gate + 64 up) */
#define MOE_TILE_K 32    /* reduction step held in shared memory */
#define MOE_QGROUP 128   /* fp8 scale block / activation quantization group */
#define MOE_THREADS 256

/* Faults (selected at run time in a FAULTS=1 build; always MOE_FAULT_NONE otherwise). */
enum {
    MOE_FAULT_NONE = 0,
    MOE_FAULT_SPLITK_WORKSPACE_NOT_ZEROED,
    MOE_FAULT_SPLITK_BF16_PARTIALS,
    MOE_FAULT_SPLITK_FP16_PARTIALS,
    MOE_FAULT_WRONG_KBLOCK_SCALE,
    MOE_FAULT_SHARED_SLOT_DROPPED,
    MOE_FAULT_SHARED_GATE_NO_SIGMOID,
    MOE_FAULT_SHARED_IN_RENORMALIZATION,
    MOE_FAULT_SHARED_ID_E_MINUS_1,
    MOE_FAULT_PADDING_EXPERT_ZERO,
    MOE_FAULT_LAST_PARTIAL_M_TILE_SKIPPED,
    MOE_FAULT_FNUZ_AS_FN,
    MOE_FAULT_RENORMALIZE_IGNORED,
    MOE_FAULT_BENIGN_REVERSE_ACCUMULATION,
    MOE_FAULT_BENIGN_TIE_ORDER_HIGH,
    MOE_FAULT_BENIGN_FP32_SHARED_GATE,
    /* precision faults: inside a worst-case bound on ordinary data */
    MOE_FAULT_FP8_ACCUMULATION_14BIT,   /* fp8 sums kept in ~14 significant bits, never promoted */
    MOE_FAULT_INTERMEDIATE_ROUNDED_TWICE, /* bf16(bf16(silu(g)) * up) */
    MOE_FAULT_EXPERT_SCALED_1P2M6,      /* the lowest used expert's stage-2 output x (1 + 2^-6) */
    MOE_FAULT_SPLITK_BF16_AFTER_ATOMIC, /* split-K workspace sums rounded to bf16 before silu*up */
    MOE_FAULT_COUNT
};

__device__ __forceinline__ float moe_bf16_to_f(uint16_t b) {
    return __uint_as_float(((uint32_t)b) << 16);
}

/* fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0. */
__device__ __forceinline__ uint16_t moe_f_to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float moe_round_bf16(float f) { return moe_bf16_to_f(moe_f_to_bf16(f)); }

/* Round to 14 significant bits, nearest even (a tensor core's reduced accumulator). */
__device__ __forceinline__ float moe_round14(float f) {
    uint32_t u = __float_as_uint(f);
    return __uint_as_float((u + 0x1FFu + ((u >> 10) & 1u)) & ~0x3FFu);
}

__device__ __forceinline__ float moe_nan(void) { return __uint_as_float(0x7FC00000u); }

/* Round v to nearest even on a floating grid with `mbits` stored mantissa bits and minimum
 * normal exponent `emin` (subnormals below it). Results above maxv saturate to maxv, or become
 * inf when inf_on_overflow (fp16). Used for fp8 e4m3fn (3, -6, 448), e4m3fnuz (3, -7, 240) and
 * fp16 (10, -14, 65504, inf). */
__device__ __forceinline__ float moe_round_grid(float v, int mbits, int emin, float maxv,
                                                bool inf_on_overflow) {
    if (v != v) return v;
    float a = fabsf(v);
    if (a > 3.0e38f) return inf_on_overflow ? v : copysignf(maxv, v);
    int e = 0;
    frexpf(a, &e);
    int ex = e - 1;
    if (ex < emin) ex = emin;
    float r = ldexpf(rintf(ldexpf(a, mbits - ex)), ex - mbits);
    if (r > maxv) r = inf_on_overflow ? __uint_as_float(0x7F800000u) : maxv;
    return copysignf(r, v);
}

/* Value of the fp8 code nearest (RNE, saturating) to v. fnuz never yields -0 (no 0x80). */
__device__ __forceinline__ float moe_fp8_round(float v, bool fnuz) {
    float r = fnuz ? moe_round_grid(v, 3, -7, 240.0f, false) : moe_round_grid(v, 3, -6, 448.0f, false);
    if (fnuz && r == 0.0f) r = 0.0f; /* -0 -> +0 */
    return r;
}

__device__ __forceinline__ float moe_fp16_round(float v) {
    return moe_round_grid(v, 10, -14, 65504.0f, true);
}

/* e4m3fn: bias 7, NaN 0x7F/0xFF, no inf. e4m3fnuz: bias 8, NaN 0x80 only, no -0. */
__device__ __forceinline__ float moe_fp8_decode(uint32_t c, bool fnuz) {
    uint32_t s = (c >> 7) & 1u, e = (c >> 3) & 15u, m = c & 7u;
    float v;
    if (!fnuz) {
        if (e == 15u && m == 7u) return moe_nan();
        v = (e == 0u) ? ldexpf((float)m, -9) : ldexpf((float)(8u + m), (int)e - 10);
    } else {
        if ((c & 0xFFu) == 0x80u) return moe_nan();
        v = (e == 0u) ? ldexpf((float)m, -10) : ldexpf((float)(8u + m), (int)e - 11);
    }
    return s ? -v : v;
}

/* ordering of routed experts: larger p first, ties to the lower index (fault: higher index) */
__device__ __forceinline__ bool moe_before(float p1, int e1, float p2, int e2, bool tie_high) {
    return p1 > p2 || (p1 == p2 && (tie_high ? e1 > e2 : e1 < e2));
}

#endif /* MOE_DEVICE_H */

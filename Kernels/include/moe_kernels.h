/*
 * moe_kernels.h — the C ABI between MoECheck and a fused Mixture-of-Experts kernel library.
 *
 * Plain C99. Any kernel library (HIP, CUDA, Triton via a C shim, ...) that exports these
 * symbols can be tested by `moecheck verify --kernels libfoo.so` unchanged.
 *
 * The layer (Qwen2-MoE / Qwen3-Next / Qwen3.5-MoE) with the shared expert fused as one more
 * routed expert (id E, weight sigmoid(ws . x)), top-k + 1 slots per token:
 *
 *   logits = Wg x                       [E]
 *   p      = softmax_fp32(logits)       over all E routed experts
 *   S      = top-K of p                 ties: the lower expert index wins
 *   w_e    = p_e / sum_{j in S} p_j     if renormalize, else p_e
 *   g      = sigmoid(ws . x)            never renormalized
 *   slots  = S (in descending weight order) then, if fuse_shared, id E with weight g
 *   y      = sum_slots w_s * Down_s( silu(Gate_s x) * (Up_s x) )
 *
 * Conventions
 * - All pointers passed to stage and layer functions are DEVICE pointers from moe_malloc.
 * - Activations (x, output) are bf16 (uint16 bit patterns), row-major [T, H].
 * - Weights, with E' = E + (fuse_shared ? 1 : 0) experts (slot E holds the shared expert):
 *     w13  [E', 2I, H]  rows [0, I) gate, rows [I, 2I) up      (bf16 or fp8 bytes)
 *     w2   [E', H, I]                                           (bf16 or fp8 bytes)
 *     fp8 only, float32 block scales (multipliers, dequant = q * s), 128x128 blocks:
 *     w13_scale [E', 2*ceil(I/128), ceil(H/128)]  gate blocks first, then up blocks
 *     w2_scale  [E', ceil(H/128), ceil(I/128)]
 *     router [E, H] bf16; shared_gate [H] bf16 (may be NULL when fuse_shared == 0).
 * - Routing: topk_ids int32 [T, S], topk_weights float32 [T, S], S = K + fuse_shared.
 * - Every size is 64-bit; functions return moe_status; on failure moe_last_error() tells why.
 * - Functions are asynchronous on the library's stream unless stated; moe_synchronize waits.
 */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_ABI_VERSION 1

typedef enum {
    MOE_OK = 0,
    MOE_ERR_INVALID_ARGUMENT = 1,
    MOE_ERR_DEVICE = 2,
    MOE_ERR_UNSUPPORTED = 3,
    MOE_ERR_OUT_OF_MEMORY = 4
} moe_status;

typedef enum {
    MOE_WEIGHTS_BF16 = 0,
    MOE_WEIGHTS_FP8_E4M3FN = 1,   /* OCP e4m3fn, max 448 */
    MOE_WEIGHTS_FP8_E4M3FNUZ = 2  /* MI300 e4m3fnuz, max 240 */
} moe_weight_format;

/* Where the kernel rounds, declared so the reference can model it (see MoECheck's Recipe). */
typedef enum { MOE_PREC_FP32 = 0, MOE_PREC_BF16 = 1 } moe_precision;
typedef enum { MOE_SCALE_DIVIDE = 0, MOE_SCALE_MULTIPLY_RECIPROCAL = 1 } moe_scale_convention;
typedef enum { MOE_INTER_BF16 = 0, MOE_INTER_FP8_GROUP128 = 1 } moe_intermediate;

typedef struct {
    int32_t router_logits;        /* moe_precision: logits rounded to bf16 before softmax? */
    int32_t routing_weights;      /* moe_precision of the routed weights at the multiply */
    int32_t shared_gate;          /* MOE_PREC_BF16: g = bf16(sigmoid(bf16(ws . x))) */
    int32_t activation_fp8;       /* 1: x quantized per token per 1x128 group to the weights' fp8 */
    int32_t activation_scale;     /* moe_scale_convention for every dynamic fp8 scale */
    int32_t intermediate;         /* moe_intermediate: silu(g)*u rounded to bf16, then (fp8) requantized */
    int32_t combine;              /* moe_precision of the weighted sum over slots */
    int32_t output;               /* moe_precision of the output buffer (bf16 here) */
} moe_recipe;

typedef struct {
    int64_t tokens;        /* T >= 1 */
    int64_t hidden;        /* H >= 1 */
    int64_t intermediate;  /* I >= 1, routed and (fused) shared */
    int32_t experts;       /* E >= 1 routed experts */
    int32_t top_k;         /* 1 <= K <= E */
    int32_t renormalize;   /* 0 / 1 */
    int32_t fuse_shared;   /* 0 / 1: append shared expert as slot id E */
    int32_t weight_format; /* moe_weight_format */
    int32_t split_k;       /* FP8 stage 1 split count along H (1 = off); ignored for bf16 */
} moe_problem;

typedef struct {
    const void*  w13;
    const void*  w2;
    const float* w13_scale;   /* fp8 only, else NULL */
    const float* w2_scale;    /* fp8 only, else NULL */
    const void*  router;
    const void*  shared_gate; /* NULL when fuse_shared == 0 */
} moe_weights;

/* ---- identity ---------------------------------------------------------------------------- */
int32_t     moe_abi_version(void);
const char* moe_library_name(void);
/* Fills *out with the rounding points used for this weight format. */
moe_status  moe_declared_recipe(int32_t weight_format, moe_recipe* out);
/* Thread-local description of the last failure ("" if none). */
const char* moe_last_error(void);

/* ---- device ------------------------------------------------------------------------------ */
moe_status moe_device_count(int32_t* count);
moe_status moe_device_name(int32_t device, char* buffer, size_t capacity);
moe_status moe_set_device(int32_t device);
moe_status moe_malloc(void** pointer, size_t bytes);
moe_status moe_free(void* pointer);
moe_status moe_copy_to_device(void* device_dst, const void* host_src, size_t bytes);
moe_status moe_copy_to_host(void* host_dst, const void* device_src, size_t bytes);
moe_status moe_memset(void* device_dst, int32_t byte_value, size_t bytes);
moe_status moe_synchronize(void);
/* Milliseconds of device time taken by the work enqueued between begin and end. */
moe_status moe_timer_begin(void);
moe_status moe_timer_end(float* milliseconds);

/* ---- scratch ----------------------------------------------------------------------------- */
/* Bytes of device workspace the stages and the layer need for this problem; the caller
 * allocates it and may fill it with anything (MoECheck poisons it). The kernel must not
 * assume any content. */
moe_status moe_workspace_size(const moe_problem* problem, size_t* bytes);
/* Block size used by moe_align (rows per expert block). */
int32_t    moe_align_block_size(void);

/* ---- stages ------------------------------------------------------------------------------ */
/* Router: logits [T,E] float32 (after the recipe's rounding), topk ids/weights [T,S],
 * shared gate g [T] float32 (only when fuse_shared). */
moe_status moe_router(const moe_problem* problem, const moe_weights* weights, const void* x,
                      float* logits, int32_t* topk_ids, float* topk_weights, float* shared_gate);

/* Sorting / alignment of the T*S (token, slot) pairs into expert blocks of
 * moe_align_block_size() rows. sorted_pairs [capacity] receives pair indices t*S+s grouped by
 * expert in ascending expert id, each expert's run padded to a block multiple with the sentinel
 * T*S; block_experts [capacity / block] receives the expert id of each block, -1 past the end;
 * *padded_count (device int32) receives the number of used entries.
 * capacity = T*S + (E+1)*(block-1), rounded up to a block multiple. */
moe_status moe_align(const moe_problem* problem, const int32_t* topk_ids, int32_t* sorted_pairs,
                     int32_t* block_experts, int32_t* padded_count);

/* Stage 1: for every pair, intermediate[pair, 0:I] = bf16( silu(gate) * up ), gate/up computed
 * from x[token] and w13[expert]; fp8 weights quantize x per 1x128 group in-kernel and use
 * split_k partial sums in a workspace the kernel zeroes itself. intermediate is bf16 [T*S, I]. */
moe_status moe_stage1(const moe_problem* problem, const moe_weights* weights, const void* x,
                      const int32_t* topk_ids, const int32_t* sorted_pairs,
                      const int32_t* block_experts, const int32_t* padded_count,
                      void* intermediate, void* workspace);

/* Stage 2: down projection of every pair's intermediate (fp8 weights: requantized per 1x128
 * group in-kernel) and the weighted combine over slots into output bf16 [T, H]. */
moe_status moe_stage2(const moe_problem* problem, const moe_weights* weights,
                      const void* intermediate, const int32_t* topk_ids,
                      const float* topk_weights, const int32_t* sorted_pairs,
                      const int32_t* block_experts, const int32_t* padded_count,
                      void* output, void* workspace);

/* The whole layer: router, align, stage 1, stage 2, all scratch in workspace. */
moe_status moe_forward(const moe_problem* problem, const moe_weights* weights, const void* x,
                       void* output, void* workspace);

/* ---- counter-based test data (optional symbol: MoECheck falls back to host data) -------- */
/* Fills dst[i], i in [0, count), with value(seed, stream, offset + i) of the given kind, bit for bit
 * as MoECheck's host generator does, so huge layers need not be made on the host:
 *   mix64(z): z += 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
 *             z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31);     (uint64 wraparound)
 *   z(n) = mix64(mix64(seed ^ (stream * 0xD1B54A32D192ED03)) + n)
 * kinds (param is an integer exponent):
 *   MOE_FILL_BF16_INT  uint16 bf16 bits of m * 2^-param, m = (int)((z >> 32) % 255) - 127  (exact)
 *   MOE_FILL_FP8_CODE  uint8 (z >> 63) << 7 | (4 + (z >> 32) % 5) << 3 | (z >> 40) & 7
 *                      exponent field 4..8: never NaN, never 0x80, same bits for fn and fnuz
 *   MOE_FILL_F32_POW2  float 2^-(param + (z >> 32) % 4)                                 (scales)
 */
typedef enum { MOE_FILL_BF16_INT = 0, MOE_FILL_FP8_CODE = 1, MOE_FILL_F32_POW2 = 2 } moe_fill_kind;
moe_status moe_fill_counter(void* dst, int32_t kind, int64_t count, uint64_t seed, uint64_t stream,
                            int64_t offset, int32_t param);

/* ---- fault injection (a build with FAULTS=1; others return MOE_ERR_UNSUPPORTED) ----------- */
/* Comma-separated names of the faults this build can inject. */
const char* moe_fault_names(void);
/* Select one fault by name for the following launches; NULL or "" turns faults off. */
moe_status  moe_set_fault(const char* name);

#ifdef __cplusplus
}
#endif
#endif /* MOE_KERNELS_H */

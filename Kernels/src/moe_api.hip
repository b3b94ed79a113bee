/*
 * moe_api.hip — host side of libmoekernels: the C ABI of include/moe_kernels.h.
 *
 * NUMERIC RECIPE (declared through moe_declared_recipe; MoECheck's reference models it)
 * ---------------------------------------------------------------------------------------
 * router   logits[t,e] = bf16( fp32 sum_h bf16(x)*bf16(Wg) )     (router_logits = BF16),
 *          stored as float. p = softmax in fp32 over all E (subtract max, expf, sum
 *          ascending, divide). Top-K by p, exact ties -> the LOWER expert index. renormalize:
 *          w = p / (fp32 sum of the K selected p, slot order), else w = p. Slots ordered by
 *          descending weight (tie: lower id first). routing_weights = FP32.
 *          fuse_shared: dot = fp32 sum x*ws, g = bf16(1/(1+expf(-bf16(dot)))) (shared_gate =
 *          BF16) stored as float; slot K = (id E, weight g); g is never renormalized.
 * stage 1  BF16: gate/up fp32 accumulation; h = gate/(1+expf(-gate))*up in fp32;
 *          intermediate = bf16(h), RNE (intermediate = MOE_INTER_BF16).
 *          FP8 (e4m3fn FP8_MAX 448, e4m3fnuz FP8_MAX 240), activation_fp8 = 1: x quantized per
 *          token per 128-column group (last group may be shorter): amax = max(1e-10f, max|x|),
 *          scale = amax * (1.0f/FP8_MAX) (MOE_SCALE_MULTIPLY_RECIPROCAL), inv = 1.0f/scale
 *          (IEEE), q = fp8_rne(clamp(x*inv, -FP8_MAX, FP8_MAX)).
 *          gate/up[j] = sum_kb (x_scale[kb] * w_scale[jb,kb]) * (fp32 sum over the block of
 *          q_x*q_w), fp32, kb ascending.
 *          split_k = s > 1: the nKB = ceil(H/128) K-blocks are cut into s contiguous ranges
 *          [floor(i*nKB/s), floor((i+1)*nKB/s)) (uneven ranges allowed; requires s <= nKB);
 *          each split's fp32 partial of gate and up is atomicAdd'ed into an fp32 workspace
 *          [T*S, 2I] that the kernel memsets to zero first; a second pass computes
 *          bf16(silu(gate)*up). Not deterministic in the last bit for s > 1.
 * stage 2  y_pair[h] = fp32 sum over I of intermediate * W2 (bf16). FP8: the intermediate is
 *          requantized per (pair, 128-group of I) exactly like activations (same scale
 *          convention); block-scaled sum like stage 1, no split (intermediate =
 *          MOE_INTER_FP8_GROUP128).
 * combine  out[t,h] = bf16( fp32 sum over slots s = 0..S-1 ascending of w[t,s]*y[t*S+s,h] )
 *          (combine = FP32, output = BF16). No atomics: deterministic for split_k = 1.
 * fp8      decode e4m3fn bias 7, NaN 0x7F/0xFF, no inf; e4m3fnuz bias 8, NaN 0x80 only, no -0;
 *          subnormals. Encode RNE with saturation to +-FP8_MAX; fnuz never yields 0x80.
 * bf16     (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0.
 *
 * IMPL=mma (moe_kernels_mma.hip) keeps every rounding point above. It differs in (a) summation
 * order (router dots and expert GEMMs in matrix-core tiles and warp trees; the softmax sum is a
 * warp tree, not ascending) and (b) the fp32 accumulation inside the matrix core, which is not
 * IEEE fp32 FMA (NVIDIA: aligned, truncated multi-operand adds, round-toward-zero; Kernels/README
 * "Recipe under IMPL=mma" says what the reference would need to model it). fp8 products are
 * formed in bf16 (exact) and accumulated per 128-K block in fp32 on the matrix core, then
 * scaled and promoted in fp32 registers exactly as written above. On gfx940/941/942 e4m3fnuz
 * weights run on the fp8 MFMA instead (same blocks and promotion; per MMA-Sim its k16 sum is
 * truncated fixed point, then RNE to fp32: Kernels/README "FP8 MFMA on gfx94x"; compiled by
 * Debian's hipcc (clang 15), never run: no AMD GPU).
 */
#include "moe_portability.h"
#include "moe_device.h"
#include "moe_internal.h"
#include "../include/moe_kernels.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ---- errors ---------------------------------------------------------------------------- */
static thread_local char g_error[1024] = "";

static moe_status fail(moe_status st, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof(g_error), fmt, ap);
    va_end(ap);
    return st;
}
static moe_status ok(void) {
    g_error[0] = '\0';
    return MOE_OK;
}
static moe_status dev_fail(const char* fn, const char* what, hipError_t e) {
    return fail(e == hipErrorMemoryAllocation ? MOE_ERR_OUT_OF_MEMORY : MOE_ERR_DEVICE,
                "%s: %s failed: %s", fn, what, hipGetErrorString(e));
}
#define MOE_CHECK(fn, what, call)                                                             \
    do {                                                                                      \
        hipError_t e_ = (call);                                                               \
        if (e_ != hipSuccess) return dev_fail(fn, what, e_);                                  \
    } while (0)
#define MOE_CHECK_LAUNCH(fn, what)                                                            \
    do {                                                                                      \
        hipError_t e_ = hipGetLastError();                                                    \
        if (e_ != hipSuccess) return dev_fail(fn, "launch of " what, e_);                     \
    } while (0)

/* ---- faults ---------------------------------------------------------------------------- */
#ifdef MOE_FAULTS
static const char* const k_fault_names[MOE_FAULT_COUNT] = {
    "",
    "splitk_workspace_not_zeroed",
    "splitk_bf16_partials",
    "splitk_fp16_partials",
    "wrong_kblock_scale",
    "shared_slot_dropped",
    "shared_gate_no_sigmoid",
    "shared_in_renormalization",
    "shared_id_e_minus_1",
    "padding_expert_zero",
    "last_partial_m_tile_skipped",
    "fnuz_as_fn",
    "renormalize_ignored",
    "benign_reverse_accumulation",
    "benign_tie_order_high",
    "benign_fp32_shared_gate",
    "fp8_accumulation_14bit",
    "intermediate_rounded_twice",
    "expert_scaled_1p2m6",
    "splitk_bf16_after_atomic",
};
#endif
static int32_t g_fault = MOE_FAULT_NONE;

#ifdef MOE_FAULTS
static const char* fault_list(void) {
    static char buf[1024] = "";
    if (!buf[0]) {
        for (int i = 1; i < MOE_FAULT_COUNT; ++i) {
            if (i > 1) strncat(buf, ",", sizeof(buf) - strlen(buf) - 1);
            strncat(buf, k_fault_names[i], sizeof(buf) - strlen(buf) - 1);
        }
    }
    return buf;
}
#endif

extern "C" const char* moe_fault_names(void) {
#ifdef MOE_FAULTS
    return fault_list();
#else
    return "";
#endif
}

extern "C" moe_status moe_set_fault(const char* name) {
#ifdef MOE_FAULTS
    if (name == NULL || name[0] == '\0') {
        g_fault = MOE_FAULT_NONE;
        return ok();
    }
    for (int i = 1; i < MOE_FAULT_COUNT; ++i) {
        if (strcmp(name, k_fault_names[i]) == 0) {
            g_fault = i;
            return ok();
        }
    }
    return fail(MOE_ERR_INVALID_ARGUMENT, "moe_set_fault: unknown fault '%s'; valid names: %s", name,
                fault_list());
#else
    /* The header's contract: builds without FAULTS=1 answer MOE_ERR_UNSUPPORTED to every call
     * (also NULL / ""), so a harness can probe for fault support. */
    return fail(MOE_ERR_UNSUPPORTED,
                "moe_set_fault: this library was built without fault injection (make FAULTS=1 "
                "builds libmoekernels_faults.so); cannot select '%s'",
                name ? name : "(null)");
#endif
}

/* ---- identity -------------------------------------------------------------------------- */
extern "C" int32_t moe_abi_version(void) { return MOE_ABI_VERSION; }

#ifdef MOE_IMPL_MMA
#  define MOE_IMPL_NAME "matrix-core tiles"
#else
#  define MOE_IMPL_NAME "fp32-fma tiles"
#endif

extern "C" const char* moe_library_name(void) {
#ifdef MOE_FAULTS
    return "moecheck-kernels 0.1 (" MOE_PLATFORM_NAME ", " MOE_IMPL_NAME ", FAULTS)";
#else
    return "moecheck-kernels 0.1 (" MOE_PLATFORM_NAME ", " MOE_IMPL_NAME ")";
#endif
}

extern "C" moe_status moe_declared_recipe(int32_t weight_format, moe_recipe* out) {
    if (out == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "moe_declared_recipe: out is NULL");
    if (weight_format < MOE_WEIGHTS_BF16 || weight_format > MOE_WEIGHTS_FP8_E4M3FNUZ)
        return fail(MOE_ERR_INVALID_ARGUMENT,
                    "moe_declared_recipe: unknown weight_format %d (0 bf16, 1 e4m3fn, 2 e4m3fnuz)",
                    weight_format);
    const bool fp8 = weight_format != MOE_WEIGHTS_BF16;
    out->router_logits = MOE_PREC_BF16;
    out->routing_weights = MOE_PREC_FP32;
    out->shared_gate = MOE_PREC_BF16;
    out->activation_fp8 = fp8 ? 1 : 0;
    out->activation_scale = MOE_SCALE_MULTIPLY_RECIPROCAL;
    out->intermediate = fp8 ? MOE_INTER_FP8_GROUP128 : MOE_INTER_BF16;
    out->combine = MOE_PREC_FP32;
    out->output = MOE_PREC_BF16;
    return ok();
}

extern "C" const char* moe_last_error(void) { return g_error; }

/* ---- device ---------------------------------------------------------------------------- */
extern "C" moe_status moe_device_count(int32_t* count) {
    if (count == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "moe_device_count: count is NULL");
    int n = 0;
    hipError_t e = hipGetDeviceCount(&n);
    if (e != hipSuccess) {
        *count = 0;
        return dev_fail("moe_device_count", "hipGetDeviceCount", e);
    }
    *count = n;
    return ok();
}

extern "C" moe_status moe_device_name(int32_t device, char* buffer, size_t capacity) {
    if (buffer == NULL || capacity == 0)
        return fail(MOE_ERR_INVALID_ARGUMENT, "moe_device_name: buffer is NULL or capacity 0");
    hipDeviceProp_t prop;
    MOE_CHECK("moe_device_name", "hipGetDeviceProperties", hipGetDeviceProperties(&prop, device));
    snprintf(buffer, capacity, "%s", prop.name);
    return ok();
}

extern "C" moe_status moe_set_device(int32_t device) {
    MOE_CHECK("moe_set_device", "hipSetDevice", hipSetDevice(device));
    return ok();
}

extern "C" moe_status moe_malloc(void** pointer, size_t bytes) {
    if (pointer == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "moe_malloc: pointer is NULL");
    *pointer = NULL;
    if (bytes == 0) return ok();
    hipError_t e = hipMalloc(pointer, bytes);
    if (e != hipSuccess) {
        *pointer = NULL;
        (void)hipGetLastError();
        return fail(e == hipErrorMemoryAllocation ? MOE_ERR_OUT_OF_MEMORY : MOE_ERR_DEVICE,
                    "moe_malloc: hipMalloc of %zu bytes failed: %s", bytes, hipGetErrorString(e));
    }
    return ok();
}

extern "C" moe_status moe_free(void* pointer) {
    if (pointer == NULL) return ok();
    MOE_CHECK("moe_free", "hipFree", hipFree(pointer));
    return ok();
}

extern "C" moe_status moe_copy_to_device(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return ok();
    if (dst == NULL || src == NULL)
        return fail(MOE_ERR_INVALID_ARGUMENT, "moe_copy_to_device: NULL pointer (dst %p, src %p)", dst,
                    src);
    MOE_CHECK("moe_copy_to_device", "hipMemcpy", hipMemcpy(dst, src, bytes, hipMemcpyHostToDevice));
    return ok();
}

extern "C" moe_status moe_copy_to_host(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return ok();
    if (dst == NULL || src == NULL)
        return fail(MOE_ERR_INVALID_ARGUMENT, "moe_copy_to_host: NULL pointer (dst %p, src %p)", dst,
                    src);
    MOE_CHECK("moe_copy_to_host", "hipMemcpy", hipMemcpy(dst, src, bytes, hipMemcpyDeviceToHost));
    return ok();
}

extern "C" moe_status moe_memset(void* dst, int32_t byte_value, size_t bytes) {
    if (bytes == 0) return ok();
    if (dst == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "moe_memset: dst is NULL");
    MOE_CHECK("moe_memset", "hipMemset", hipMemset(dst, byte_value & 0xFF, bytes));
    return ok();
}

extern "C" moe_status moe_synchronize(void) {
    MOE_CHECK("moe_synchronize", "hipDeviceSynchronize", hipDeviceSynchronize());
    return ok();
}

static hipEvent_t g_ev_begin = NULL, g_ev_end = NULL;

extern "C" moe_status moe_timer_begin(void) {
    if (g_ev_begin == NULL) {
        MOE_CHECK("moe_timer_begin", "hipEventCreate", hipEventCreate(&g_ev_begin));
        MOE_CHECK("moe_timer_begin", "hipEventCreate", hipEventCreate(&g_ev_end));
    }
    MOE_CHECK("moe_timer_begin", "hipEventRecord", hipEventRecord(g_ev_begin, 0));
    return ok();
}

extern "C" moe_status moe_timer_end(float* milliseconds) {
    if (milliseconds == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "moe_timer_end: milliseconds is NULL");
    if (g_ev_begin == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "moe_timer_end: moe_timer_begin was not called");
    MOE_CHECK("moe_timer_end", "hipEventRecord", hipEventRecord(g_ev_end, 0));
    MOE_CHECK("moe_timer_end", "hipEventSynchronize", hipEventSynchronize(g_ev_end));
    float ms = 0.0f;
    MOE_CHECK("moe_timer_end", "hipEventElapsedTime", hipEventElapsedTime(&ms, g_ev_begin, g_ev_end));
    *milliseconds = ms;
    return ok();
}

/* ---- problem checks and workspace layout ------------------------------------------------ */
static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static size_t al256(size_t x) { return (x + 255) & ~(size_t)255; }

struct Layout {
    int64_t S, pairs, nKB, nIB, capacity, nblocks;
    bool fp8;
    int32_t split;
    /* stage scratch (offsets from workspace start; stage 1 and 2 overlap) */
    size_t xq, xsc, acc, y, iq, isc, scratch;
    /* forward buffers */
    size_t logits, ids, w, g, sorted, bexp, pad, inter, total;
};

static Layout layout_of(const moe_problem* p) {
    Layout L;
    const int64_t T = p->tokens, H = p->hidden, I = p->intermediate;
    L.fp8 = p->weight_format != MOE_WEIGHTS_BF16;
    L.split = L.fp8 ? p->split_k : 1;
    L.S = p->top_k + (p->fuse_shared ? 1 : 0);
    L.pairs = T * L.S;
    L.nKB = cdiv(H, MOE_QGROUP);
    L.nIB = cdiv(I, MOE_QGROUP);
    const int64_t BM = MOE_BLOCK_M;
    L.capacity = cdiv(L.pairs + (int64_t)(p->experts + 1) * (BM - 1), BM) * BM;
    L.nblocks = L.capacity / BM;
    size_t o = 0;
    L.xq = o;  o += al256(L.fp8 ? (size_t)(T * H) * 2 : 0);
    L.xsc = o; o += al256(L.fp8 ? (size_t)(T * L.nKB) * 4 : 0);
    L.acc = o; o += al256(L.fp8 && L.split > 1 ? (size_t)(L.pairs * 2 * I) * 4 : 0);
    size_t s1 = o;
    o = 0;
    L.y = o;   o += al256((size_t)(L.pairs * H) * 4);
    L.iq = o;  o += al256(L.fp8 ? (size_t)(L.pairs * I) * 2 : 0);
    L.isc = o; o += al256(L.fp8 ? (size_t)(L.pairs * L.nIB) * 4 : 0);
    L.scratch = s1 > o ? s1 : o;
    o = L.scratch;
    L.logits = o; o += al256((size_t)(T * p->experts) * 4);
    L.ids = o;    o += al256((size_t)L.pairs * 4);
    L.w = o;      o += al256((size_t)L.pairs * 4);
    L.g = o;      o += al256((size_t)T * 4);
    L.sorted = o; o += al256((size_t)L.capacity * 4);
    L.bexp = o;   o += al256((size_t)L.nblocks * 4);
    L.pad = o;    o += al256(4);
    L.inter = o;  o += al256((size_t)(L.pairs * I) * 2);
    L.total = o;
    return L;
}

static moe_status check_problem(const char* fn, const moe_problem* p) {
    if (p == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: problem is NULL", fn);
    const int64_t LIM = (int64_t)1 << 40;
    if (p->tokens < 1 || p->tokens > LIM)
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: tokens %lld out of range (>= 1)", fn, (long long)p->tokens);
    if (p->hidden < 1 || p->hidden > ((int64_t)1 << 24))
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: hidden %lld out of range [1, 2^24]", fn, (long long)p->hidden);
    if (p->intermediate < 1 || p->intermediate > ((int64_t)1 << 24))
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: intermediate %lld out of range [1, 2^24]", fn,
                    (long long)p->intermediate);
    if (p->experts < 1 || p->experts > MOE_MAX_EXPERTS)
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: experts %d out of range [1, %d]", fn, p->experts,
                    MOE_MAX_EXPERTS);
    if (p->top_k < 1) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: top_k %d < 1", fn, p->top_k);
    if (p->top_k > p->experts)
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: top_k %d > experts %d", fn, p->top_k, p->experts);
    if (p->renormalize != 0 && p->renormalize != 1)
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: renormalize %d is not 0 or 1", fn, p->renormalize);
    if (p->fuse_shared != 0 && p->fuse_shared != 1)
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: fuse_shared %d is not 0 or 1", fn, p->fuse_shared);
    if (p->weight_format < MOE_WEIGHTS_BF16 || p->weight_format > MOE_WEIGHTS_FP8_E4M3FNUZ)
        return fail(MOE_ERR_INVALID_ARGUMENT,
                    "%s: unknown weight_format %d (0 bf16, 1 fp8 e4m3fn, 2 fp8 e4m3fnuz)", fn,
                    p->weight_format);
    if (p->weight_format != MOE_WEIGHTS_BF16) {
        const int64_t nKB = cdiv(p->hidden, MOE_QGROUP);
        if (p->split_k < 1) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: split_k=%d < 1", fn, p->split_k);
        if (p->split_k > nKB)
            return fail(MOE_ERR_INVALID_ARGUMENT,
                        "%s: split_k=%d exceeds the %lld K-blocks (128 wide) of H=%lld", fn, p->split_k,
                        (long long)nKB, (long long)p->hidden);
        if (p->split_k > 65535)
            return fail(MOE_ERR_INVALID_ARGUMENT, "%s: split_k=%d > 65535", fn, p->split_k);
    }
    const int64_t S = p->top_k + p->fuse_shared;
    const int64_t cap = p->tokens * S + (int64_t)(p->experts + 1) * MOE_BLOCK_M;
    if (cap >= ((int64_t)1 << 31) - 1)
        return fail(MOE_ERR_INVALID_ARGUMENT,
                    "%s: T*S = %lld (token, slot) pairs plus padding exceed the int32 pair index", fn,
                    (long long)(p->tokens * S));
    if (p->tokens * S > ((int64_t)1 << 31) / 2)
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: too many pairs", fn);
    return MOE_OK;
}

static moe_status check_weights(const char* fn, const moe_problem* p, const moe_weights* w,
                                bool need_router, bool need_experts) {
    if (w == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: weights is NULL", fn);
    if (need_router) {
        if (w->router == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: weights->router is NULL", fn);
        if (p->fuse_shared && w->shared_gate == NULL)
            return fail(MOE_ERR_INVALID_ARGUMENT, "%s: fuse_shared=1 but weights->shared_gate is NULL", fn);
    }
    if (need_experts) {
        if (w->w13 == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: weights->w13 is NULL", fn);
        if (w->w2 == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: weights->w2 is NULL", fn);
        if (p->weight_format != MOE_WEIGHTS_BF16) {
            if (w->w13_scale == NULL)
                return fail(MOE_ERR_INVALID_ARGUMENT, "%s: fp8 weights but weights->w13_scale is NULL", fn);
            if (w->w2_scale == NULL)
                return fail(MOE_ERR_INVALID_ARGUMENT, "%s: fp8 weights but weights->w2_scale is NULL", fn);
        }
    }
    return MOE_OK;
}

#define MOE_REQUIRE(fn, ptr)                                                                  \
    do {                                                                                      \
        if ((ptr) == NULL) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn, #ptr);  \
    } while (0)

extern "C" moe_status moe_workspace_size(const moe_problem* problem, size_t* bytes) {
    moe_status st = check_problem("moe_workspace_size", problem);
    if (st != MOE_OK) return st;
    MOE_REQUIRE("moe_workspace_size", bytes);
    *bytes = layout_of(problem).total;
    return ok();
}

extern "C" int32_t moe_align_block_size(void) { return MOE_BLOCK_M; }

/* ---- stages ---------------------------------------------------------------------------- */
static moe_status run_router(const char* fn, const moe_problem* p, const moe_weights* w, const void* x,
                             float* logits, int32_t* ids, float* weights, float* gate) {
    moe_launch_router_logits(x, w->router, w->shared_gate, p->tokens, p->hidden, p->experts,
                             p->fuse_shared, logits, gate, g_fault);
    MOE_CHECK_LAUNCH(fn, "moe_router_logits_kernel");
    moe_launch_topk(logits, gate, p->tokens, p->experts, p->top_k, p->renormalize, p->fuse_shared,
                    ids, weights, g_fault);
    MOE_CHECK_LAUNCH(fn, "moe_topk_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_router(const moe_problem* problem, const moe_weights* weights, const void* x,
                                 float* logits, int32_t* topk_ids, float* topk_weights,
                                 float* shared_gate) {
    const char* fn = "moe_router";
    moe_status st = check_problem(fn, problem);
    if (st != MOE_OK) return st;
    if ((st = check_weights(fn, problem, weights, true, false)) != MOE_OK) return st;
    MOE_REQUIRE(fn, x);
    MOE_REQUIRE(fn, logits);
    MOE_REQUIRE(fn, topk_ids);
    MOE_REQUIRE(fn, topk_weights);
    if (problem->fuse_shared) MOE_REQUIRE(fn, shared_gate);
    if ((st = run_router(fn, problem, weights, x, logits, topk_ids, topk_weights, shared_gate)) != MOE_OK)
        return st;
    return ok();
}

extern "C" moe_status moe_align(const moe_problem* problem, const int32_t* topk_ids, int32_t* sorted_pairs,
                                int32_t* block_experts, int32_t* padded_count) {
    const char* fn = "moe_align";
    moe_status st = check_problem(fn, problem);
    if (st != MOE_OK) return st;
    MOE_REQUIRE(fn, topk_ids);
    MOE_REQUIRE(fn, sorted_pairs);
    MOE_REQUIRE(fn, block_experts);
    MOE_REQUIRE(fn, padded_count);
    Layout L = layout_of(problem);
    moe_launch_align(topk_ids, L.pairs, problem->experts + problem->fuse_shared, L.capacity, sorted_pairs,
                     block_experts, padded_count, g_fault);
    MOE_CHECK_LAUNCH(fn, "moe_align_kernel");
    return ok();
}

static MoeGemmArgs gemm_args(const moe_problem* p, const Layout& L, const int32_t* sorted,
                             const int32_t* bexp, const int32_t* padded) {
    MoeGemmArgs a;
    memset(&a, 0, sizeof(a));
    a.sorted = sorted;
    a.block_experts = bexp;
    a.padded_count = padded;
    a.pairs = L.pairs;
    a.S = (int32_t)L.S;
    a.n_experts = p->experts + p->fuse_shared;
    a.split = 1;
    a.fault = g_fault;
    a.fnuz_decode = p->weight_format == MOE_WEIGHTS_FP8_E4M3FNUZ && g_fault != MOE_FAULT_FNUZ_AS_FN;
    return a;
}

static moe_status run_stage1(const char* fn, const moe_problem* p, const moe_weights* w, const void* x,
                             const int32_t* sorted, const int32_t* bexp, const int32_t* padded,
                             void* inter, void* workspace) {
    Layout L = layout_of(p);
    char* ws = (char*)workspace;
    const int64_t T = p->tokens, H = p->hidden, I = p->intermediate;
    MoeGemmArgs a = gemm_args(p, L, sorted, bexp, padded);
    a.K = H;
    a.N = I;
    a.nKB = L.nKB;
    a.nNB = 2 * L.nIB;
    a.b_rows = 2 * I;
    a.B = w->w13;
    a.out_bf16 = (uint16_t*)inter;
    if (!L.fp8) {
        a.A = (const uint16_t*)x;
        moe_launch_gemm(a, false, true, L.nblocks);
        MOE_CHECK_LAUNCH(fn, "moe_gemm_kernel<bf16, stage1>");
        return MOE_OK;
    }
    const int32_t fnuz = p->weight_format == MOE_WEIGHTS_FP8_E4M3FNUZ;
    uint16_t* xq = (uint16_t*)(ws + L.xq);
    float* xsc = (float*)(ws + L.xsc);
    moe_launch_quant(x, T, H, fnuz, xq, xsc);
    MOE_CHECK_LAUNCH(fn, "moe_quant_kernel (activations)");
    a.A = xq;
    a.A_scale = xsc;
    a.B_scale = w->w13_scale;
    a.split = L.split;
    if (L.split > 1) {
        float* acc = (float*)(ws + L.acc);
        a.out_f32 = acc;
        const bool skip_memset = g_fault == MOE_FAULT_SPLITK_WORKSPACE_NOT_ZEROED && L.split == L.nKB;
        if (!skip_memset)
            MOE_CHECK(fn, "hipMemsetAsync of the split-K workspace",
                      hipMemsetAsync(acc, 0, (size_t)(L.pairs * 2 * I) * 4, 0));
        moe_launch_gemm(a, true, true, L.nblocks);
        MOE_CHECK_LAUNCH(fn, "moe_gemm_kernel<fp8, stage1, split-K>");
        moe_launch_swiglu(acc, L.pairs, I, inter, g_fault);
        MOE_CHECK_LAUNCH(fn, "moe_swiglu_kernel");
    } else {
        moe_launch_gemm(a, true, true, L.nblocks);
        MOE_CHECK_LAUNCH(fn, "moe_gemm_kernel<fp8, stage1>");
    }
    return MOE_OK;
}

static moe_status run_stage2(const char* fn, const moe_problem* p, const moe_weights* w, const void* inter,
                             const float* topk_weights, const int32_t* sorted, const int32_t* bexp,
                             const int32_t* padded, void* output, void* workspace) {
    Layout L = layout_of(p);
    char* ws = (char*)workspace;
    const int64_t T = p->tokens, H = p->hidden, I = p->intermediate;
    MoeGemmArgs a = gemm_args(p, L, sorted, bexp, padded);
    a.K = I;
    a.N = H;
    a.nKB = L.nIB;
    a.nNB = cdiv(H, MOE_QGROUP);
    a.b_rows = H;
    a.B = w->w2;
    a.reverse = g_fault == MOE_FAULT_BENIGN_REVERSE_ACCUMULATION;
    float* y = (float*)(ws + L.y);
    a.out_f32 = y;
    if (g_fault == MOE_FAULT_PADDING_EXPERT_ZERO)
        MOE_CHECK(fn, "hipMemsetAsync of y", hipMemsetAsync(y, 0, (size_t)(L.pairs * H) * 4, 0));
    if (!L.fp8) {
        a.A = (const uint16_t*)inter;
        moe_launch_gemm(a, false, false, L.nblocks);
        MOE_CHECK_LAUNCH(fn, "moe_gemm_kernel<bf16, stage2>");
    } else {
        const int32_t fnuz = p->weight_format == MOE_WEIGHTS_FP8_E4M3FNUZ;
        uint16_t* iq = (uint16_t*)(ws + L.iq);
        float* isc = (float*)(ws + L.isc);
        moe_launch_quant(inter, L.pairs, I, fnuz, iq, isc);
        MOE_CHECK_LAUNCH(fn, "moe_quant_kernel (intermediate)");
        a.A = iq;
        a.A_scale = isc;
        a.B_scale = w->w2_scale;
        moe_launch_gemm(a, true, false, L.nblocks);
        MOE_CHECK_LAUNCH(fn, "moe_gemm_kernel<fp8, stage2>");
    }
    moe_launch_combine(y, topk_weights, T, H, (int32_t)L.S, output);
    MOE_CHECK_LAUNCH(fn, "moe_combine_kernel");
    return MOE_OK;
}

extern "C" moe_status moe_stage1(const moe_problem* problem, const moe_weights* weights, const void* x,
                                 const int32_t* topk_ids, const int32_t* sorted_pairs,
                                 const int32_t* block_experts, const int32_t* padded_count,
                                 void* intermediate, void* workspace) {
    const char* fn = "moe_stage1";
    moe_status st = check_problem(fn, problem);
    if (st != MOE_OK) return st;
    if ((st = check_weights(fn, problem, weights, false, true)) != MOE_OK) return st;
    MOE_REQUIRE(fn, x);
    MOE_REQUIRE(fn, topk_ids);
    MOE_REQUIRE(fn, sorted_pairs);
    MOE_REQUIRE(fn, block_experts);
    MOE_REQUIRE(fn, padded_count);
    MOE_REQUIRE(fn, intermediate);
    if (problem->weight_format != MOE_WEIGHTS_BF16) MOE_REQUIRE(fn, workspace);
    if ((st = run_stage1(fn, problem, weights, x, sorted_pairs, block_experts, padded_count, intermediate,
                         workspace)) != MOE_OK)
        return st;
    return ok();
}

extern "C" moe_status moe_stage2(const moe_problem* problem, const moe_weights* weights,
                                 const void* intermediate, const int32_t* topk_ids,
                                 const float* topk_weights, const int32_t* sorted_pairs,
                                 const int32_t* block_experts, const int32_t* padded_count, void* output,
                                 void* workspace) {
    const char* fn = "moe_stage2";
    moe_status st = check_problem(fn, problem);
    if (st != MOE_OK) return st;
    if ((st = check_weights(fn, problem, weights, false, true)) != MOE_OK) return st;
    MOE_REQUIRE(fn, intermediate);
    MOE_REQUIRE(fn, topk_ids);
    MOE_REQUIRE(fn, topk_weights);
    MOE_REQUIRE(fn, sorted_pairs);
    MOE_REQUIRE(fn, block_experts);
    MOE_REQUIRE(fn, padded_count);
    MOE_REQUIRE(fn, output);
    MOE_REQUIRE(fn, workspace);
    if ((st = run_stage2(fn, problem, weights, intermediate, topk_weights, sorted_pairs, block_experts,
                         padded_count, output, workspace)) != MOE_OK)
        return st;
    return ok();
}

extern "C" moe_status moe_forward(const moe_problem* problem, const moe_weights* weights, const void* x,
                                  void* output, void* workspace) {
    const char* fn = "moe_forward";
    moe_status st = check_problem(fn, problem);
    if (st != MOE_OK) return st;
    if ((st = check_weights(fn, problem, weights, true, true)) != MOE_OK) return st;
    MOE_REQUIRE(fn, x);
    MOE_REQUIRE(fn, output);
    MOE_REQUIRE(fn, workspace);
    Layout L = layout_of(problem);
    char* ws = (char*)workspace;
    float* logits = (float*)(ws + L.logits);
    int32_t* ids = (int32_t*)(ws + L.ids);
    float* w = (float*)(ws + L.w);
    float* g = (float*)(ws + L.g);
    int32_t* sorted = (int32_t*)(ws + L.sorted);
    int32_t* bexp = (int32_t*)(ws + L.bexp);
    int32_t* pad = (int32_t*)(ws + L.pad);
    void* inter = ws + L.inter;
    if ((st = run_router(fn, problem, weights, x, logits, ids, w, g)) != MOE_OK) return st;
    moe_launch_align(ids, L.pairs, problem->experts + problem->fuse_shared, L.capacity, sorted, bexp, pad,
                     g_fault);
    MOE_CHECK_LAUNCH(fn, "moe_align_kernel");
    if ((st = run_stage1(fn, problem, weights, x, sorted, bexp, pad, inter, workspace)) != MOE_OK) return st;
    if ((st = run_stage2(fn, problem, weights, inter, w, sorted, bexp, pad, output, workspace)) != MOE_OK)
        return st;
    return ok();
}

/* ---- counter-based data ------------------------------------------------------------------ */
extern "C" moe_status moe_fill_counter(void* dst, int32_t kind, int64_t count, uint64_t seed,
                                       uint64_t stream, int64_t offset, int32_t param) {
    const char* fn = "moe_fill_counter";
    if (kind < MOE_FILL_BF16_INT || kind > MOE_FILL_F32_POW2)
        return fail(MOE_ERR_INVALID_ARGUMENT, "%s: unknown kind %d (0 bf16_int, 1 fp8_code, 2 f32_pow2)", fn,
                    kind);
    if (count < 0) return fail(MOE_ERR_INVALID_ARGUMENT, "%s: count %lld < 0", fn, (long long)count);
    if (count == 0) return ok();
    MOE_REQUIRE(fn, dst);
    moe_launch_fill(dst, kind, count, seed, stream, offset, param);
    MOE_CHECK_LAUNCH(fn, "moe_fill_kernel");
    return ok();
}

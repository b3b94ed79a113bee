/*
 * moe_portability.h — MoECheck's own HIP/CUDA portability layer.
 *
 * The kernel sources are written against the hip* runtime names. On AMD (hipcc) this header
 * includes <hip/hip_runtime.h>; on NVIDIA (nvcc) it includes <cuda_runtime.h> and maps the
 * few hip* names we use onto CUDA. The distribution's HIP-on-NVIDIA headers are deliberately
 * NOT used: they do not build with CUDA 13.
 *
 * Device-side names we use (__global__, __shared__, __syncthreads, atomicAdd, __float_as_uint,
 * __uint_as_float, expf, rintf, frexpf, ldexpf, threadIdx/blockIdx/...) are spelled the same
 * in both dialects, so they need no mapping. Vendor intrinsics only inside #if blocks.
 */
#ifndef MOE_PORTABILITY_H
#define MOE_PORTABILITY_H

#include <stdint.h>

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#  include <hip/hip_runtime.h>
#  define MOE_PLATFORM_NAME "hip-amd"
#elif defined(__CUDACC__)
#  include <cuda_runtime.h>
#  define MOE_PLATFORM_NAME "cuda-nvidia"

typedef cudaError_t      hipError_t;
typedef cudaStream_t     hipStream_t;
typedef cudaEvent_t      hipEvent_t;
typedef cudaDeviceProp   hipDeviceProp_t;

#  define hipSuccess                 cudaSuccess
#  define hipErrorMemoryAllocation   cudaErrorMemoryAllocation
#  define hipMemcpyHostToDevice      cudaMemcpyHostToDevice
#  define hipMemcpyDeviceToHost      cudaMemcpyDeviceToHost
#  define hipMemcpyDeviceToDevice    cudaMemcpyDeviceToDevice

static inline hipError_t hipMalloc(void** p, size_t n) { return cudaMalloc(p, n); }
static inline hipError_t hipFree(void* p) { return cudaFree(p); }
static inline hipError_t hipMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) {
    return cudaMemcpy(d, s, n, k);
}
static inline hipError_t hipMemset(void* d, int v, size_t n) { return cudaMemset(d, v, n); }
static inline hipError_t hipMemsetAsync(void* d, int v, size_t n, hipStream_t s) {
    return cudaMemsetAsync(d, v, n, s);
}
static inline hipError_t hipDeviceSynchronize(void) { return cudaDeviceSynchronize(); }
static inline hipError_t hipGetLastError(void) { return cudaGetLastError(); }
static inline const char* hipGetErrorString(hipError_t e) { return cudaGetErrorString(e); }
static inline hipError_t hipGetDeviceCount(int* n) { return cudaGetDeviceCount(n); }
static inline hipError_t hipGetDeviceProperties(hipDeviceProp_t* p, int d) {
    return cudaGetDeviceProperties(p, d);
}
static inline hipError_t hipSetDevice(int d) { return cudaSetDevice(d); }
static inline hipError_t hipEventCreate(hipEvent_t* e) { return cudaEventCreate(e); }
static inline hipError_t hipEventDestroy(hipEvent_t e) { return cudaEventDestroy(e); }
static inline hipError_t hipEventRecord(hipEvent_t e, hipStream_t s) { return cudaEventRecord(e, s); }
static inline hipError_t hipEventSynchronize(hipEvent_t e) { return cudaEventSynchronize(e); }
static inline hipError_t hipEventElapsedTime(float* ms, hipEvent_t a, hipEvent_t b) {
    return cudaEventElapsedTime(ms, a, b);
}
static inline hipError_t hipGetDevice(int* d) { return cudaGetDevice(d); }
/* Kernels with more than 48 KB of dynamic shared memory must opt in once per device. */
static inline hipError_t moe_func_max_dynamic_smem(const void* func, int bytes) {
    return cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
static inline hipError_t moe_multiprocessor_count(int device, int* n) {
    return cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, device);
}
#else
#  error "moe_portability.h: compile with hipcc (AMD) or nvcc (NVIDIA)"
#endif

/* ---- warp-level primitives ----------------------------------------------------------------
 * MOE_WARP_SIZE: lanes that execute in lock step (32 on NVIDIA, 64 on the gfx9 CDNA parts we
 * target). moe_shfl_xor: butterfly exchange among all lanes of the warp. */
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#  define MOE_WARP_SIZE 64
__device__ __forceinline__ float moe_shfl_xor(float v, int m) { return __shfl_xor(v, m, 64); }
__device__ __forceinline__ int moe_shfl_xor(int v, int m) { return __shfl_xor(v, m, 64); }
__device__ __forceinline__ int moe_shfl_up(int v, int d) { return __shfl_up(v, (unsigned)d, 64); }
#else
#  define MOE_WARP_SIZE 32
__device__ __forceinline__ float moe_shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ int moe_shfl_xor(int v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ int moe_shfl_up(int v, int d) { return __shfl_up_sync(0xffffffffu, v, (unsigned)d); }
#endif

/* ---- matrix-core instructions (IMPL=mma) ---------------------------------------------------
 * One wrapper per instruction, each inside an #if naming its target; the fragment layouts that
 * feed them are written down where they are used (moe_kernels_mma.hip). Both take bf16 inputs
 * and accumulate in fp32; products of two bf16 values are exact in fp32.
 *
 * NVIDIA sm_80+ (sm_90 here): mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, one warp:
 *   D[16x8] = A[16x16] * B[16x8] + C; a: 4 x .b32 (8 bf16), b: 2 x .b32 (4 bf16), c/d: 4 f32.
 * AMD gfx90a / gfx94x (CDNA2/3): v_mfma_f32_32x32x8bf16_1k, one wave64:
 *   D[32x32] = A[32x8] * B[8x32] + C; a, b: 4 bf16 per lane, c/d: 16 f32 per lane. */
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
typedef float moe_floatx16 __attribute__((ext_vector_type(16)));
typedef short moe_shortx4 __attribute__((ext_vector_type(4)));
__device__ __forceinline__ moe_floatx16 moe_mfma_32x32x8_bf16(moe_shortx4 a, moe_shortx4 b, moe_floatx16 c) {
#  if defined(__HIP_DEVICE_COMPILE__)
#    if defined(__gfx90a__) || defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__) || defined(__gfx950__)
    return __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(a, b, c, 0, 0, 0);
#    else
#      error "IMPL=mma on AMD needs MFMA bf16_1k (gfx90a, gfx940, gfx941, gfx942, gfx950)"
#    endif
#  else
    (void)a; (void)b;
    return c; /* host pass: never called */
#  endif
}

/* AMD gfx940 / gfx941 / gfx942 (CDNA3) only: v_mfma_f32_32x32x16_fp8_fp8, one wave64:
 *   D[32x32] = A[32x16] * B[16x32] + C; a, b: 8 fp8 bytes per lane (one 64-bit operand), c/d:
 *   16 f32 per lane. On these targets the instruction's fp8 is E4M3FNUZ (bias 8, NaN 0x80, no
 *   inf, no -0: ROCm HIP "FP8 numbers" reference, gfx940/941/942 support FNUZ only). gfx950
 *   (CDNA4) is NOT enabled: its fp8 is OCP e4m3fn as far as we know (not verified here), and
 *   clang 15 does not know gfx950. Its accumulation is not an IEEE fp32 sum: see Kernels/README.md "FP8 MFMA".
 *   Compiled by Debian's hipcc (clang 15) for gfx940; never run (no AMD GPU here).
 * MOE_MFMA_FP8_FNUZ is 1 only in a device pass for those targets; callers test it so that the
 * wrapper is never reached elsewhere. */
#if defined(__HIP_DEVICE_COMPILE__) && (defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__))
#  define MOE_MFMA_FP8_FNUZ 1
#else
#  define MOE_MFMA_FP8_FNUZ 0
#endif
__device__ __forceinline__ moe_floatx16 moe_mfma_32x32x16_fp8fnuz(long a, long b, moe_floatx16 c) {
#  if MOE_MFMA_FP8_FNUZ
    return __builtin_amdgcn_mfma_f32_32x32x16_fp8_fp8(a, b, c, 0, 0, 0);
#  else
    (void)a; (void)b;
#    if defined(__HIP_DEVICE_COMPILE__)
    __builtin_trap(); /* unreachable: only called under MOE_MFMA_FP8_FNUZ */
#    endif
    return c;
#  endif
}
#else
__device__ __forceinline__ void moe_mma_16x8x16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#  if defined(__CUDA_ARCH__)
#    if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#    else
#      error "IMPL=mma on NVIDIA needs sm_80 or newer (mma.sync m16n8k16 bf16)"
#    endif
#  else
    (void)d; (void)a; (void)b; /* host pass: never called */
#  endif
}

/* ---- NVIDIA sm_80+ asynchronous copies and ldmatrix (IMPL=mma pipelined GEMM) ---------------
 * cp.async.cg.shared.global [dst], [src], 16, src_size: copies src_size (0 or 16 here) bytes
 *   from global memory and zero-fills the rest of the 16-byte shared-memory destination
 *   (PTX ISA "cp.async"); src must be a valid global address even when src_size is 0.
 * ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l gives the shared address of row l%8 of 8x8
 *   matrix l/8 (16 contiguous bytes); register i of lane t receives row t/4, elements
 *   2*(t%4), 2*(t%4)+1 of matrix i (PTX ISA "ldmatrix"). */
__device__ __forceinline__ uint32_t moe_smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void moe_cp_async16(uint32_t dst, const void* src, int src_bytes) {
#  if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#  else
    (void)dst; (void)src; (void)src_bytes;
#  endif
}
__device__ __forceinline__ void moe_cp_async_commit(void) {
#  if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#  endif
}
template <int N> __device__ __forceinline__ void moe_cp_async_wait(void) {
#  if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#  endif
}
__device__ __forceinline__ void moe_ldmatrix_x4(uint32_t r[4], uint32_t addr) {
#  if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#  else
    (void)addr; r[0] = r[1] = r[2] = r[3] = 0u;
#  endif
}
#endif

#endif /* MOE_PORTABILITY_H */

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
#else
#  error "moe_portability.h: compile with hipcc (AMD) or nvcc (NVIDIA)"
#endif

#endif /* MOE_PORTABILITY_H */

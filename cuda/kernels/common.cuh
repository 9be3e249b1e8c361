// Shared helpers of the video-infinity kernels: storage-type conversions (fp32 compute everywhere),
// the dims struct used for strided indexing, grid-stride loops.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(f16 x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
// Round to nearest even, like PyTorch's .to(bfloat16) / .half().
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 from_f<f16>(float x) { return __float2half_rn(x); }

// Up to 8 dims / strides, passed by value (mirrors `Dims` in runtime/src/cuda/layout.rs).
#define VI_MAX_DIMS 8
struct Dims {
    int64_t d[VI_MAX_DIMS];
};

#define GRID_STRIDE(i, n)                                                                        \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n);            \
         i += (int64_t)blockDim.x * gridDim.x)

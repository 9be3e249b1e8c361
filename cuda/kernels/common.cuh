// The one kernel header every .cu includes (directly or through reduce.cuh / mma.cuh): storage
// types and their conversions (fp32 compute everywhere), aligned vector types, the by-value `Dims`
// of strided kernels, grid-stride loops and float constants.
// Storage types: float, bf16 (__nv_bfloat16), f16 (__half); all arithmetic is fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

#define VI_INF __int_as_float(0x7f800000)
#define VI_LOG2E 1.4426950408889634f

// ---- conversions: storage -> fp32 exactly; fp32 -> storage rounded to nearest even (like
// PyTorch's .to(bfloat16) / .half()) ----------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(f16 x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 from_f<f16>(float x) { return __float2half_rn(x); }

// ---- vectors ----------------------------------------------------------------------------------
// VEC consecutive elements, aligned to their total size (VEC * sizeof(T) <= 16 bytes), so that a
// load/store of the struct is one vector memory instruction.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) VecT {
    T v[VEC];
};
// Elements per 16-byte vector (8 x bf16/f16, 4 x f32) and that vector: the `_vec` kernels' unit.
template <typename T> struct VecOf { static constexpr int V = 16 / sizeof(T); };
template <typename T> using Vec16 = VecT<T, VecOf<T>::V>;

template <typename T, int VEC>
__device__ __forceinline__ VecT<T, VEC> vi_load(const T* p) {
    return *reinterpret_cast<const VecT<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void vi_store(T* p, const VecT<T, VEC>& v) {
    *reinterpret_cast<VecT<T, VEC>*>(p) = v;
}

// ---- strided indexing and loops ---------------------------------------------------------------
// Up to 8 dims / strides, passed by value (mirrors `Dims` in runtime/src/cuda/launch.rs).
#define VI_MAX_DIMS 8
struct Dims {
    int64_t d[VI_MAX_DIMS];
};

#define GRID_STRIDE(i, n)                                                                        \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n);            \
         i += (int64_t)blockDim.x * gridDim.x)

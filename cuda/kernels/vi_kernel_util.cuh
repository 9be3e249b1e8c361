// Small device helpers shared by norm.cu, attention.cu and dual_scope.cu (owned with them).
// Storage types: float, __nv_bfloat16, __half. All arithmetic is fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define VI_INF __int_as_float(0x7f800000)
#define VI_LOG2E 1.4426950408889634f

__device__ __forceinline__ float vi_to_f(float x) { return x; }
__device__ __forceinline__ float vi_to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float vi_to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T vi_from_f(float x);
template <> __device__ __forceinline__ float vi_from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 vi_from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half vi_from_f<__half>(float x) { return __float2half_rn(x); }

// VEC consecutive elements, aligned to their total size (VEC * sizeof(T) <= 16 bytes), so that a
// load/store of the struct is one vector memory instruction.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) VecT {
    T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ VecT<T, VEC> vi_load(const T* p) {
    return *reinterpret_cast<const VecT<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void vi_store(T* p, const VecT<T, VEC>& v) {
    *reinterpret_cast<VecT<T, VEC>*>(p) = v;
}

__device__ __forceinline__ float vi_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float vi_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Running (count, mean, M2) statistics; `merge` is Chan et al.'s parallel combination.
struct ViMoments {
    float n, mean, m2;
};
__device__ __forceinline__ ViMoments vi_merge(ViMoments a, ViMoments b) {
    float n = a.n + b.n;
    if (n == 0.f) return ViMoments{0.f, 0.f, 0.f};
    float delta = b.mean - a.mean;
    float fb = b.n / n;
    return ViMoments{n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// Warp reductions and running moments shared by norm.cu, attention.cu and dual_scope.cu.
#pragma once

#include "common.cuh"

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

// Precision helpers: finish an fp32 accumulation with a single rounding to the storage dtype.
//   out[r, c] = T(acc[r, c] + bias[c])   (bias optional: null pointer = no bias)
// acc [rows, n] f32 row-major; bias [n] of dtype T; out [rows, n] of dtype T. The sum is formed in
// fp32 and rounded once (round-to-nearest-even), so a multi-GEMM accumulation (temporal conv taps)
// plus its bias costs one bf16/f16 rounding instead of one per partial sum.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void bias_round_body(const float* __restrict__ acc,
                                                const T* __restrict__ bias, T* __restrict__ out,
                                                int64_t total, int64_t n) {
    GRID_STRIDE(i, total) {
        float v = acc[i];
        if (bias != nullptr) {
            v += to_f(bias[i % n]);
        }
        out[i] = from_f<T>(v);
    }
}

#define BIAS_ROUND(SN, T)                                                                        \
    extern "C" __global__ void bias_round_##SN(const float* __restrict__ acc,                    \
                                               const T* __restrict__ bias, T* __restrict__ out,  \
                                               int64_t total, int64_t n) {                       \
        bias_round_body<T>(acc, bias, out, total, n);                                            \
    }

BIAS_ROUND(f32, float)
BIAS_ROUND(bf16, bf16)
BIAS_ROUND(f16, f16)

// Precision helpers: finish an fp32 accumulation with a single rounding to the storage dtype.
//   out[r, c] = T(acc[r, c] + bias[c])   (bias optional: null pointer = no bias)
// acc [rows, n] f32 row-major; bias [n] of dtype T; out [rows, n] of dtype T. The sum is formed in
// fp32 and rounded once (round-to-nearest-even), so a multi-GEMM accumulation (temporal conv taps)
// plus its bias costs one bf16/f16 rounding instead of one per partial sum. `bias_round_f32b_<T>`
// takes an fp32 bias with a bf16/f16 output.
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

// The same with an fp32 bias (the precision policy keeps 1-D parameters fp32 under bf16/f16
// activations): out[r, c] = T(acc[r, c] + bias[c]), bias [n] f32 (optional: null = no bias).
#define BIAS_ROUND_F32B(SN, T)                                                                   \
    extern "C" __global__ void bias_round_f32b_##SN(const float* __restrict__ acc,               \
                                                    const float* __restrict__ bias,              \
                                                    T* __restrict__ out, int64_t total,          \
                                                    int64_t n) {                                 \
        GRID_STRIDE(i, total) {                                                                  \
            float v = acc[i];                                                                    \
            if (bias != nullptr) v += bias[i % n];                                               \
            out[i] = from_f<T>(v);                                                               \
        }                                                                                        \
    }

BIAS_ROUND_F32B(bf16, bf16)
BIAS_ROUND_F32B(f16, f16)

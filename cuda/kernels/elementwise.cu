// Elementwise kernels: dtype conversion, unary ops, affine, clamp, GEGLU, broadcasting binary ops,
// fill and deterministic random fill. Storage f32 / bf16 / f16, compute f32. Memory bound: exact
// math functions (erff, expf, sqrtf), no fast-math. Grid-stride loops; n may exceed 2^31.
#include "common.cuh"

// ---- conversion ---------------------------------------------------------------------------------
#define CONVERT(SN, S, DN, D)                                                                    \
    extern "C" __global__ void convert_##SN##_##DN(const S* __restrict__ x, D* __restrict__ y,  \
                                                   int64_t n) {                                  \
        GRID_STRIDE(i, n) { y[i] = from_f<D>(to_f(x[i])); }                                      \
    }
#define CONVERT_FROM(SN, S)                                                                      \
    CONVERT(SN, S, f32, float) CONVERT(SN, S, bf16, bf16) CONVERT(SN, S, f16, f16)
CONVERT_FROM(f32, float)
CONVERT_FROM(bf16, bf16)
CONVERT_FROM(f16, f16)

// ---- unary ----------------------------------------------------------------------------------------
// op codes mirror `UnaryOp` (runtime/src/cuda/elementwise.rs): 0 silu, 1 gelu (erf), 2 exp, 3 sqrt,
// 4 neg.
__device__ __forceinline__ float gelu_erf(float v) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}
__device__ __forceinline__ float apply_unary(float v, int op) {
    switch (op) {
    case 0: return v / (1.0f + expf(-v));
    case 1: return gelu_erf(v);
    case 2: return expf(v);
    case 3: return sqrtf(v);
    default: return -v;
    }
}

// Offsets into a and b of output element `i` (out dims `shape`, rank <= VI_MAX_DIMS, element
// strides sa / sb, 0 on broadcast dims). The loop is fully unrolled so every `d[k]` index is a
// compile-time constant: the Dims stay in the kernel parameter bank. A runtime index (the old
// `for (d = rank - 1; ...)` loop) makes nvcc copy all three Dims (192 bytes) into per-thread local
// memory at kernel start (24 st.local per thread: ptxas "192 bytes stack frame"), which on the UNet's
// residual adds cost ~5x the kernel's DRAM traffic. `I`: index type (uint32_t when every element
// index < 2^31, int64_t otherwise).
template <typename I>
__device__ __forceinline__ void broadcast_offsets(I i, int rank, const Dims& shape, const Dims& sa,
                                                  const Dims& sb, I& ia, I& ib) {
    I rem = i;
#pragma unroll
    for (int d = VI_MAX_DIMS - 1; d >= 0; --d) {
        if (d < rank) {
            I dim = (I)shape.d[d];
            I c = rem % dim;
            rem /= dim;
            ia += c * (I)sa.d[d];
            ib += c * (I)sb.d[d];
        }
    }
}

#define ELEMWISE(TN, T)                                                                          \
    extern "C" __global__ void unary_##TN(const T* __restrict__ x, T* __restrict__ y, int64_t n, \
                                          int op) {                                              \
        GRID_STRIDE(i, n) { y[i] = from_f<T>(apply_unary(to_f(x[i]), op)); }                     \
    }                                                                                            \
    extern "C" __global__ void affine_##TN(const T* __restrict__ x, T* __restrict__ y, int64_t n, \
                                           float mul, float add) {                               \
        GRID_STRIDE(i, n) { y[i] = from_f<T>(fmaf(to_f(x[i]), mul, add)); }                      \
    }                                                                                            \
    extern "C" __global__ void clamp_##TN(const T* __restrict__ x, T* __restrict__ y, int64_t n, \
                                          float lo, float hi) {                                  \
        GRID_STRIDE(i, n) { y[i] = from_f<T>(fminf(fmaxf(to_f(x[i]), lo), hi)); }                \
    }                                                                                            \
    /* x [rows, 2h] -> y [rows, h] = x[:, :h] * gelu(x[:, h:]) */                                \
    extern "C" __global__ void geglu_##TN(const T* __restrict__ x, T* __restrict__ y,            \
                                          int64_t rows, int64_t h) {                             \
        GRID_STRIDE(i, rows * h) {                                                               \
            int64_t r = i / h, j = i - r * h;                                                    \
            float a = to_f(x[r * 2 * h + j]);                                                    \
            float g = to_f(x[r * 2 * h + h + j]);                                                \
            y[i] = from_f<T>(a * gelu_erf(g));                                                   \
        }                                                                                        \
    }                                                                                            \
    /* Broadcasting binary op; op codes mirror `BinaryOp`: 0 add, 1 sub, 2 mul, 3 div.          \
       out dims `shape` (rank <= 8, already coalesced), element strides of a and b per out dim   \
       (0 on broadcast dims). */                                                                 \
    extern "C" __global__ void binary_##TN(const T* __restrict__ a, const T* __restrict__ b,     \
                                           T* __restrict__ y, int64_t n, int op, int rank,       \
                                           Dims shape, Dims sa, Dims sb) {                       \
        GRID_STRIDE(i, n) {                                                                      \
            int64_t ia = 0, ib = 0;                                                              \
            broadcast_offsets<int64_t>(i, rank, shape, sa, sb, ia, ib);                          \
            float u = to_f(a[ia]), v = to_f(b[ib]), r;                                           \
            switch (op) {                                                                        \
            case 0: r = u + v; break;                                                            \
            case 1: r = u - v; break;                                                            \
            case 2: r = u * v; break;                                                            \
            default: r = u / v; break;                                                           \
            }                                                                                    \
            y[i] = from_f<T>(r);                                                                 \
        }                                                                                        \
    }                                                                                            \
    /* Same-shape fast path. */                                                                  \
    extern "C" __global__ void binary_same_##TN(const T* __restrict__ a, const T* __restrict__ b, \
                                                T* __restrict__ y, int64_t n, int op) {          \
        GRID_STRIDE(i, n) {                                                                      \
            float u = to_f(a[i]), v = to_f(b[i]), r;                                             \
            switch (op) {                                                                        \
            case 0: r = u + v; break;                                                            \
            case 1: r = u - v; break;                                                            \
            case 2: r = u * v; break;                                                            \
            default: r = u / v; break;                                                           \
            }                                                                                    \
            y[i] = from_f<T>(r);                                                                 \
        }                                                                                        \
    }                                                                                            \
    extern "C" __global__ void fill_##TN(T* __restrict__ y, int64_t n, float v) {               \
        GRID_STRIDE(i, n) { y[i] = from_f<T>(v); }                                               \
    }                                                                                            \
    /* Deterministic N(0, std^2) values from (seed, index) (splitmix64 + Box-Muller), for      \
       benchmark weights generated on the device. */                                             \
    extern "C" __global__ void random_normal_##TN(T* __restrict__ y, int64_t n, uint64_t seed,   \
                                                  float std) {                                   \
        GRID_STRIDE(i, n) { y[i] = from_f<T>(std * normal_hash(seed, (uint64_t)i)); }            \
    }

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ float normal_hash(uint64_t seed, uint64_t i) {
    uint64_t h = splitmix64(seed ^ splitmix64(i));
    // Two 24-bit uniforms in (0, 1].
    float u1 = ((float)(h >> 40) + 1.0f) * (1.0f / 16777216.0f);
    float u2 = (float)((h >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

ELEMWISE(f32, float)
ELEMWISE(bf16, bf16)
ELEMWISE(f16, f16)

// ---- vectorised variants: 16 bytes per thread (8 x bf16/f16, 4 x f32) -------------------------
// Used when the element counts (and, for binary, the innermost dim) are multiples of the vector
// width; buffers come from the pool (256-byte aligned) and every vector offset is a multiple of V.
// Vec16 / VecOf: common.cuh.

__device__ __forceinline__ float apply_binary(float u, float v, int op) {
    switch (op) {
    case 0: return u + v;
    case 1: return u - v;
    case 2: return u * v;
    default: return u / v;
    }
}

template <typename T, typename I>
__device__ __forceinline__ void binary_vec_body(const T* __restrict__ a, const T* __restrict__ b,
                                                T* __restrict__ y, int64_t n_vec, int op, int rank,
                                                const Dims& shape, const Dims& sa, const Dims& sb) {
    GRID_STRIDE(iv, n_vec) {
        I ia = 0, ib = 0;
        broadcast_offsets<I>((I)(iv * VecOf<T>::V), rank, shape, sa, sb, ia, ib);
        Vec16<T> u = *reinterpret_cast<const Vec16<T>*>(a + ia);
        Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(b + ib), r;
#pragma unroll
        for (int k = 0; k < VecOf<T>::V; ++k)
            r.v[k] = from_f<T>(apply_binary(to_f(u.v[k]), to_f(v.v[k]), op));
        reinterpret_cast<Vec16<T>*>(y)[iv] = r;
    }
}

#define ELEMWISE_VEC(TN, T)                                                                      \
    /* n_vec vectors; same op codes as unary_##TN */                                            \
    extern "C" __global__ void unary_vec_##TN(const Vec16<T>* __restrict__ x,                    \
                                              Vec16<T>* __restrict__ y, int64_t n_vec, int op) { \
        GRID_STRIDE(i, n_vec) {                                                                  \
            Vec16<T> a = x[i], r;                                                                \
            _Pragma("unroll") for (int k = 0; k < VecOf<T>::V; ++k)                              \
                r.v[k] = from_f<T>(apply_unary(to_f(a.v[k]), op));                               \
            y[i] = r;                                                                            \
        }                                                                                        \
    }                                                                                            \
    extern "C" __global__ void affine_vec_##TN(const Vec16<T>* __restrict__ x,                   \
                                               Vec16<T>* __restrict__ y, int64_t n_vec,          \
                                               float mul, float add) {                           \
        GRID_STRIDE(i, n_vec) {                                                                  \
            Vec16<T> a = x[i], r;                                                                \
            _Pragma("unroll") for (int k = 0; k < VecOf<T>::V; ++k)                              \
                r.v[k] = from_f<T>(fmaf(to_f(a.v[k]), mul, add));                                \
            y[i] = r;                                                                            \
        }                                                                                        \
    }                                                                                            \
    /* x [rows, 2h] -> y [rows, h], h a multiple of the vector width; hv = h / V */             \
    extern "C" __global__ void geglu_vec_##TN(const Vec16<T>* __restrict__ x,                    \
                                              Vec16<T>* __restrict__ y, int64_t rows,            \
                                              int64_t hv) {                                      \
        GRID_STRIDE(i, rows * hv) {                                                              \
            int64_t r = i / hv, j = i - r * hv;                                                  \
            Vec16<T> a = x[r * 2 * hv + j], g = x[r * 2 * hv + hv + j], o;                       \
            _Pragma("unroll") for (int k = 0; k < VecOf<T>::V; ++k)                              \
                o.v[k] = from_f<T>(to_f(a.v[k]) * gelu_erf(to_f(g.v[k])));                       \
            y[i] = o;                                                                            \
        }                                                                                        \
    }                                                                                            \
    /* Broadcasting binary op on vectors: innermost dim contiguous (stride 1) in a and b and a   \
       multiple of V; element strides as in binary_##TN. */                                      \
    extern "C" __global__ void binary_vec_##TN(const T* __restrict__ a, const T* __restrict__ b, \
                                               T* __restrict__ y, int64_t n_vec, int op,         \
                                               int rank, Dims shape, Dims sa, Dims sb) {         \
        binary_vec_body<T, int64_t>(a, b, y, n_vec, op, rank, shape, sa, sb);                    \
    }                                                                                            \
    /* The same with 32-bit index math (every element index < 2^31): far cheaper div/mod. */     \
    extern "C" __global__ void binary_vec32_##TN(const T* __restrict__ a,                        \
                                                 const T* __restrict__ b, T* __restrict__ y,     \
                                                 int64_t n_vec, int op, int rank, Dims shape,    \
                                                 Dims sa, Dims sb) {                             \
        binary_vec_body<T, uint32_t>(a, b, y, n_vec, op, rank, shape, sa, sb);                   \
    }                                                                                            \
    /* Same shape, both contiguous: no index math at all. */                                     \
    extern "C" __global__ void binary_same_vec_##TN(const Vec16<T>* __restrict__ a,              \
                                                    const Vec16<T>* __restrict__ b,              \
                                                    Vec16<T>* __restrict__ y, int64_t n_vec,     \
                                                    int op) {                                    \
        GRID_STRIDE(i, n_vec) {                                                                  \
            Vec16<T> u = a[i], v = b[i], r;                                                      \
            _Pragma("unroll") for (int k = 0; k < VecOf<T>::V; ++k)                              \
                r.v[k] = from_f<T>(apply_binary(to_f(u.v[k]), to_f(v.v[k]), op));                \
            y[i] = r;                                                                            \
        }                                                                                        \
    }

ELEMWISE_VEC(f32, float)
ELEMWISE_VEC(bf16, bf16)
ELEMWISE_VEC(f16, f16)

// ---- in-place per-channel bias: y[r, c] += bias[c] (after a cuDNN convolution) ---------------
#define BIAS_ADD(TN, T)                                                                          \
    extern "C" __global__ void bias_add_##TN(T* __restrict__ y, const T* __restrict__ bias,      \
                                             int64_t rows, int64_t c) {                          \
        GRID_STRIDE(i, rows * c) { y[i] = from_f<T>(to_f(y[i]) + to_f(bias[i % c])); }           \
    }
/* Vectorised: c a multiple of the vector width V; y holds n_vec vectors, bias cv = c / V. 32-bit
   index math (n_vec < 2^32). */
#define BIAS_ADD_VEC(TN, T)                                                                      \
    extern "C" __global__ void bias_add_vec_##TN(Vec16<T>* __restrict__ y,                       \
                                                 const Vec16<T>* __restrict__ bias,              \
                                                 int64_t n_vec, uint32_t cv) {                   \
        GRID_STRIDE(i, n_vec) {                                                                  \
            Vec16<T> u = y[i], v = bias[(uint32_t)i % cv], r;                                    \
            _Pragma("unroll") for (int k = 0; k < VecOf<T>::V; ++k)                              \
                r.v[k] = from_f<T>(to_f(u.v[k]) + to_f(v.v[k]));                                 \
            y[i] = r;                                                                            \
        }                                                                                        \
    }
BIAS_ADD_VEC(f32, float)
BIAS_ADD_VEC(bf16, bf16)
BIAS_ADD_VEC(f16, f16)
BIAS_ADD(f32, float)
BIAS_ADD(bf16, bf16)
BIAS_ADD(f16, f16)

// ---- in-place f32 bias into bf16/f16 storage: y[r, c] = T(y[r, c] + bias[c]) -----------------
// The precision policy keeps 1-D parameters (biases) in fp32 under bf16/f16 activations; this adds
// one after a cuDNN convolution (or a GEMM whose epilogue could not take it) without widening the
// bias or the output first.
#define BIAS_ADD_F32B(TN, T)                                                                     \
    extern "C" __global__ void bias_add_f32b_##TN(T* __restrict__ y,                             \
                                                  const float* __restrict__ bias, int64_t rows,  \
                                                  int64_t c) {                                   \
        GRID_STRIDE(i, rows * c) { y[i] = from_f<T>(to_f(y[i]) + bias[i % c]); }                 \
    }                                                                                            \
    /* Vectorised: c a multiple of V = 8; y holds n_vec 16-byte vectors, bias cv = c / V rows of \
       two 16-byte float vectors each (bias 16-byte aligned). 32-bit index math (n_vec < 2^32). */\
    extern "C" __global__ void bias_add_vec_f32b_##TN(Vec16<T>* __restrict__ y,                  \
                                                      const Vec16<float>* __restrict__ bias,     \
                                                      int64_t n_vec, uint32_t cv) {              \
        constexpr int V = VecOf<T>::V;                                                           \
        constexpr int P = V / VecOf<float>::V; /* float vectors per T vector */                  \
        GRID_STRIDE(i, n_vec) {                                                                  \
            const uint32_t j = (uint32_t)i % cv;                                                 \
            Vec16<T> u = y[i], r;                                                                \
            _Pragma("unroll") for (int p = 0; p < P; ++p) {                                      \
                Vec16<float> b = bias[(size_t)j * P + p];                                        \
                _Pragma("unroll") for (int k = 0; k < VecOf<float>::V; ++k) {                    \
                    const int e = p * VecOf<float>::V + k;                                       \
                    r.v[e] = from_f<T>(to_f(u.v[e]) + b.v[k]);                                   \
                }                                                                                \
            }                                                                                    \
            y[i] = r;                                                                            \
        }                                                                                        \
    }
BIAS_ADD_F32B(bf16, bf16)
BIAS_ADD_F32B(f16, f16)

// ---- mixed-dtype binary ops (precision policy: f32 residual stream, bf16/f16 branches) ----------
// (a, b -> y) in {(f32, T -> f32), (T, f32 -> f32), (T, T -> f32)}, T = bf16 / f16: each operand is
// read in its own type, the op runs in fp32 and y is written once, so a residual add costs one pass
// (no widening copies). Same structure as the same-dtype kernels above: broadcast offsets from the
// compile-time-indexed `broadcast_offsets` (the Dims stay in the parameter bank, no local memory).
// Vectors (VecT, common.cuh) of MX_V = 4 elements: 16 bytes of an f32 operand, 8 bytes of a 16-bit one; each pointer
// is aligned to its own vector (buffers are pool-allocated, 256-byte aligned; the launcher checks).
#define MX_V 4

template <typename TA, typename TB, typename TO, typename I>
__device__ __forceinline__ void binary_mx_vec_body(const TA* __restrict__ a,
                                                   const TB* __restrict__ b, TO* __restrict__ y,
                                                   int64_t n_vec, int op, int rank,
                                                   const Dims& shape, const Dims& sa,
                                                   const Dims& sb) {
    GRID_STRIDE(iv, n_vec) {
        I ia = 0, ib = 0;
        broadcast_offsets<I>((I)(iv * MX_V), rank, shape, sa, sb, ia, ib);
        VecT<TA, MX_V> u = *reinterpret_cast<const VecT<TA, MX_V>*>(a + ia);
        VecT<TB, MX_V> v = *reinterpret_cast<const VecT<TB, MX_V>*>(b + ib);
        VecT<TO, MX_V> r;
#pragma unroll
        for (int k = 0; k < MX_V; ++k) r.v[k] = from_f<TO>(apply_binary(to_f(u.v[k]), to_f(v.v[k]), op));
        reinterpret_cast<VecT<TO, MX_V>*>(y)[iv] = r;
    }
}

#define BINARY_MX(AN, TA, BN, TB, ON, TO)                                                        \
    /* Any broadcast, one element per thread (tails, unaligned or non-contiguous inner dims). */ \
    extern "C" __global__ void binary_mx_##AN##_##BN##_##ON(                                     \
        const TA* __restrict__ a, const TB* __restrict__ b, TO* __restrict__ y, int64_t n, int op, \
        int rank, Dims shape, Dims sa, Dims sb) {                                                \
        GRID_STRIDE(i, n) {                                                                      \
            int64_t ia = 0, ib = 0;                                                              \
            broadcast_offsets<int64_t>(i, rank, shape, sa, sb, ia, ib);                          \
            y[i] = from_f<TO>(apply_binary(to_f(a[ia]), to_f(b[ib]), op));                       \
        }                                                                                        \
    }                                                                                            \
    /* Vectors of MX_V: innermost dim contiguous in a and b and a multiple of MX_V. */           \
    extern "C" __global__ void binary_mx_vec_##AN##_##BN##_##ON(                                 \
        const TA* __restrict__ a, const TB* __restrict__ b, TO* __restrict__ y, int64_t n_vec,   \
        int op, int rank, Dims shape, Dims sa, Dims sb) {                                        \
        binary_mx_vec_body<TA, TB, TO, int64_t>(a, b, y, n_vec, op, rank, shape, sa, sb);        \
    }                                                                                            \
    /* The same with 32-bit index math (every element index < 2^31). */                         \
    extern "C" __global__ void binary_mx_vec32_##AN##_##BN##_##ON(                               \
        const TA* __restrict__ a, const TB* __restrict__ b, TO* __restrict__ y, int64_t n_vec,   \
        int op, int rank, Dims shape, Dims sa, Dims sb) {                                        \
        binary_mx_vec_body<TA, TB, TO, uint32_t>(a, b, y, n_vec, op, rank, shape, sa, sb);       \
    }                                                                                            \
    /* Same shape, both contiguous (residual adds): no index math. */                            \
    extern "C" __global__ void binary_mx_same_vec_##AN##_##BN##_##ON(                            \
        const VecT<TA, MX_V>* __restrict__ a, const VecT<TB, MX_V>* __restrict__ b,              \
        VecT<TO, MX_V>* __restrict__ y, int64_t n_vec, int op) {                                 \
        GRID_STRIDE(i, n_vec) {                                                                  \
            VecT<TA, MX_V> u = a[i];                                                             \
            VecT<TB, MX_V> v = b[i];                                                             \
            VecT<TO, MX_V> r;                                                                    \
            _Pragma("unroll") for (int k = 0; k < MX_V; ++k)                                     \
                r.v[k] = from_f<TO>(apply_binary(to_f(u.v[k]), to_f(v.v[k]), op));               \
            y[i] = r;                                                                            \
        }                                                                                        \
    }
BINARY_MX(f32, float, bf16, bf16, f32, float)
BINARY_MX(bf16, bf16, f32, float, f32, float)
BINARY_MX(bf16, bf16, bf16, bf16, f32, float)
BINARY_MX(f32, float, f16, f16, f32, float)
BINARY_MX(f16, f16, f32, float, f32, float)
BINARY_MX(f16, f16, f16, f16, f32, float)

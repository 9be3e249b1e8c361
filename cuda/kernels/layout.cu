// Data-movement kernels. They never look at values, so they are instantiated per unit size:
// `_b2` (bf16/f16), `_b4` (f32) and `_b16` (16-byte vectors of either, chosen by the launcher when
// the innermost contiguous run, every stride and every address allow it). Grid-stride loops over
// the OUTPUT so writes are coalesced.
#include "common.cuh"

// Up to 64 indices by value (mirrors `Idx64` in runtime/src/cuda/layout.rs).
struct Idx64 {
    uint32_t v[64];
};

#define LAYOUT(SN, T)                                                                            \
    /* y = permute(x): y has dims `shape` (rank <= 8, coalesced); `in_strides[d]` is the x       \
       element stride of y's dim d. */                                                           \
    extern "C" __global__ void permute_##SN(const T* __restrict__ x, T* __restrict__ y,          \
                                            int64_t n, int rank, Dims shape, Dims in_strides) {  \
        GRID_STRIDE(i, n) {                                                                      \
            int64_t rem = i, src = 0;                                                            \
            for (int d = rank - 1; d >= 0; --d) {                                                \
                int64_t c = rem % shape.d[d];                                                    \
                rem /= shape.d[d];                                                               \
                src += c * in_strides.d[d];                                                      \
            }                                                                                    \
            y[i] = x[src];                                                                       \
        }                                                                                        \
    }                                                                                            \
    /* 2-D strided copy: y[r * ldy + c] = x[r * ldx + c], r < rows, c < cols. */                 \
    extern "C" __global__ void copy2d_##SN(const T* __restrict__ x, T* __restrict__ y,           \
                                           int64_t rows, int64_t cols, int64_t ldx, int64_t ldy) { \
        GRID_STRIDE(i, rows * cols) {                                                            \
            int64_t r = i / cols, c = i - r * cols;                                              \
            y[r * ldy + c] = x[r * ldx + c];                                                     \
        }                                                                                        \
    }                                                                                            \
    /* x viewed as [outer, axis, inner] -> y [outer, n_idx, inner], y[o, j, :] = x[o, idx[j], :] */ \
    extern "C" __global__ void index_select_##SN(const T* __restrict__ x, T* __restrict__ y,     \
                                                 const uint32_t* __restrict__ idx, int64_t outer, \
                                                 int64_t axis, int64_t n_idx, int64_t inner) {   \
        GRID_STRIDE(i, outer * n_idx * inner) {                                                  \
            int64_t c = i % inner;                                                               \
            int64_t t = i / inner;                                                               \
            int64_t j = t % n_idx, o = t / n_idx;                                                \
            y[i] = x[(o * axis + idx[j]) * inner + c];                                           \
        }                                                                                        \
    }                                                                                            \
    /* index_select with at most 64 indices passed by value (no host->device copy, which from   \
       pageable memory may synchronise the stream). */                                           \
    extern "C" __global__ void index_select_small_##SN(const T* __restrict__ x,                  \
                                                       T* __restrict__ y, Idx64 idx,             \
                                                       int64_t outer, int64_t axis,              \
                                                       int64_t n_idx, int64_t inner) {           \
        GRID_STRIDE(i, outer * n_idx * inner) {                                                  \
            int64_t c = i % inner;                                                               \
            int64_t t = i / inner;                                                               \
            int64_t j = t % n_idx, o = t / n_idx;                                                \
            y[i] = x[(o * axis + idx.v[j]) * inner + c];                                         \
        }                                                                                        \
    }                                                                                            \
    /* Nearest 2x upsampling, channels-last: x [N, H, W, C] -> y [N, 2H, 2W, C]. */              \
    extern "C" __global__ void upsample2x_##SN(const T* __restrict__ x, T* __restrict__ y,       \
                                               int64_t nimg, int64_t h, int64_t w, int64_t c) {  \
        GRID_STRIDE(i, nimg * 4 * h * w * c) {                                                   \
            int64_t ch = i % c;                                                                  \
            int64_t t = i / c;                                                                   \
            int64_t ox = t % (2 * w);                                                            \
            t /= 2 * w;                                                                          \
            int64_t oy = t % (2 * h), img = t / (2 * h);                                         \
            y[i] = x[((img * h + oy / 2) * w + ox / 2) * c + ch];                                \
        }                                                                                        \
    }

LAYOUT(b2, uint16_t)
LAYOUT(b4, uint32_t)
LAYOUT(b16, uint4)

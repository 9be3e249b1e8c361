// im2col for channels-last convolutions (the GEMM runs in cuBLASLt):
//   x [N, H, W, C] -> cols [N * Ho * Wo, kh * kw * C], column order (ky, kx, c), zero padding.
// The column order matches the weight re-laid once to [Cout, kh, kw, Cin], so each output row of the
// GEMM is one output pixel and its reduction reads kh * kw contiguous runs of C channels.
// Work unit: V bytes (16 / 8 / 4 / 2) so a bf16 row of C channels moves in 16-byte vectors when
// C * elem_size is a multiple of 16 (all UNet convolutions; the first conv with C = 4 uses 8 bytes).
#include "common.cuh"

template <typename V>
__device__ __forceinline__ void im2col_body(const V* __restrict__ x, V* __restrict__ cols,
                                            int64_t n, int64_t h, int64_t w, int64_t cu,
                                            int64_t ho, int64_t wo, int kh, int kw, int stride,
                                            int pad) {
    const int64_t row_units = (int64_t)kh * kw * cu;
    const int64_t total = n * ho * wo * row_units;
    GRID_STRIDE(i, total) {
        int64_t col = i % row_units;
        int64_t pix = i / row_units;
        int64_t c = col % cu;
        int64_t k = col / cu;
        int kx = (int)(k % kw), ky = (int)(k / kw);
        int64_t ox = pix % wo;
        int64_t t = pix / wo;
        int64_t oy = t % ho, img = t / ho;
        int64_t iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        V v;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
            v = x[((img * h + iy) * w + ix) * cu + c];
        } else {
            v = V{};
        }
        cols[i] = v;
    }
}

#define IM2COL(SN, V)                                                                            \
    extern "C" __global__ void im2col_##SN(const V* __restrict__ x, V* __restrict__ cols,       \
                                           int64_t n, int64_t h, int64_t w, int64_t cu,          \
                                           int64_t ho, int64_t wo, int kh, int kw, int stride,   \
                                           int pad) {                                            \
        im2col_body<V>(x, cols, n, h, w, cu, ho, wo, kh, kw, stride, pad);                       \
    }

IM2COL(v16, uint4)
IM2COL(v8, uint2)
IM2COL(v4, uint32_t)
IM2COL(v2, uint16_t)

// GroupNorm (statistics + apply, optional fused SiLU), LayerNorm and softmax over the last dim.
// Storage float / bf16 / f16 (suffixes _f32, _bf16, _f16); all statistics and arithmetic in fp32.
// The norms read x as f32 or bf16/f16 and may write a different output type (see the entry points);
// gamma/beta are always fp32.
// Layouts are channels-last and contiguous: GroupNorm x [N, S, C]; LayerNorm/softmax x [rows, C].
// Launch contracts are written above each kernel; the launchers are runtime/src/cuda/norm.rs.

#include "reduce.cuh"

// ---------------------------------------------------------------------------------------------------
// GroupNorm statistics, pass 1: partial moments per (n, row chunk, column vector).
//
// A "column vector" cv covers channels [cv*VEC, cv*VEC + VEC); VEC divides C/G, so it lies in exactly
// one group (g = cv*VEC / cg). Block (blockIdx.x = chunk, blockIdx.y = n) reads rows
// [chunk*rows_per_chunk, min(S, (chunk+1)*rows_per_chunk)) of x[n] (a contiguous slab of whole rows:
// coalesced), thread (tx, ty) owns column vectors cv = cv0 + tx and rows r = r0 + ty, r0 + ty + bdy, ...
// Each thread sums (x - shift) and (x - shift)^2 with shift = the column's first value in the chunk
// (exact algebra, avoids cancellation), the bdy threads of a column are merged with Chan's formula.
// Output part[((n * nchunks + chunk) * nvec + cv) * 3 + {0,1,2}] = (count, mean, M2), fp32.
// Grid (nchunks, N); block (bdx, bdy); dynamic smem bdx*bdy*3 floats.
// ---------------------------------------------------------------------------------------------------
template <typename T, int VEC>
__device__ void gn_partial(const T* __restrict__ x, float* __restrict__ part, int S, int C,
                           int rows_per_chunk) {
    extern __shared__ float sh[];
    const int n = blockIdx.y, chunk = blockIdx.x, nchunks = gridDim.x;
    const int tx = threadIdx.x, ty = threadIdx.y, bdx = blockDim.x, bdy = blockDim.y;
    const int r0 = chunk * rows_per_chunk;
    const int r1 = min(S, r0 + rows_per_chunk);
    const int nvec = C / VEC;
    const T* xn = x + (size_t)n * S * C;
    for (int cv0 = 0; cv0 < nvec; cv0 += bdx) {
        const int cv = cv0 + tx;
        float cnt = 0.f, s1 = 0.f, s2 = 0.f, shift = 0.f;
        if (cv < nvec && r0 < r1) {
            const T* col = xn + (size_t)cv * VEC;
            shift = to_f(col[(size_t)r0 * C]);
#pragma unroll 4
            for (int r = r0 + ty; r < r1; r += bdy) {
                VecT<T, VEC> v = vi_load<T, VEC>(col + (size_t)r * C);
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    float d = to_f(v.v[i]) - shift;
                    s1 += d;
                    s2 = fmaf(d, d, s2);
                }
                cnt += (float)VEC;
            }
        }
        float mean = 0.f, m2 = 0.f;
        if (cnt > 0.f) {
            mean = shift + s1 / cnt;
            m2 = fmaxf(s2 - s1 * (s1 / cnt), 0.f);
        }
        float* mine = sh + (ty * bdx + tx) * 3;
        mine[0] = cnt;
        mine[1] = mean;
        mine[2] = m2;
        __syncthreads();
        if (ty == 0 && cv < nvec) {
            ViMoments acc{cnt, mean, m2};
            for (int y = 1; y < bdy; ++y) {
                const float* o = sh + (y * bdx + tx) * 3;
                acc = vi_merge(acc, ViMoments{o[0], o[1], o[2]});
            }
            float* dst = part + (((size_t)n * nchunks + chunk) * nvec + cv) * 3;
            dst[0] = acc.n;
            dst[1] = acc.mean;
            dst[2] = acc.m2;
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------------
// GroupNorm statistics, pass 2: merge the partials of one (n, g): nchunks * (cg/VEC) entries
// (column vectors g*vpg .. g*vpg + vpg - 1 of every chunk, vpg = cg / VEC).
// mode 0: out[(n*G + g)*3 + {0,1,2}] = (count, mean, M2)   (the group_norm_stats contract)
// mode 1: out[(n*G + g)*2 + {0,1}]   = (mean, biased var = M2 / count)
// Grid (G, N); block 256 threads (a power of two); static smem.
// ---------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
    gn_finalize(const float* __restrict__ part, float* __restrict__ out, int nchunks, int nvec,
                int vpg, int mode) {
    __shared__ float sh[256 * 3];
    const int g = blockIdx.x, G = gridDim.x, n = blockIdx.y, tid = threadIdx.x;
    const int entries = nchunks * vpg;
    ViMoments acc{0.f, 0.f, 0.f};
    for (int e = tid; e < entries; e += blockDim.x) {
        const int chunk = e / vpg, cv = g * vpg + e % vpg;
        const float* p = part + (((size_t)n * nchunks + chunk) * nvec + cv) * 3;
        acc = vi_merge(acc, ViMoments{p[0], p[1], p[2]});
    }
    sh[tid * 3] = acc.n;
    sh[tid * 3 + 1] = acc.mean;
    sh[tid * 3 + 2] = acc.m2;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) {
            ViMoments a{sh[tid * 3], sh[tid * 3 + 1], sh[tid * 3 + 2]};
            ViMoments b{sh[(tid + s) * 3], sh[(tid + s) * 3 + 1], sh[(tid + s) * 3 + 2]};
            a = vi_merge(a, b);
            sh[tid * 3] = a.n;
            sh[tid * 3 + 1] = a.mean;
            sh[tid * 3 + 2] = a.m2;
        }
        __syncthreads();
    }
    if (tid == 0) {
        const size_t i = (size_t)n * G + g;
        if (mode == 0) {
            out[i * 3] = sh[0];
            out[i * 3 + 1] = sh[1];
            out[i * 3 + 2] = sh[2];
        } else {
            out[i * 2] = sh[1];
            out[i * 2 + 1] = sh[0] > 0.f ? sh[2] / sh[0] : 0.f;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// GroupNorm apply: y = (x - mean) * rstd * gamma + beta (then SiLU if `silu`), rstd = 1/sqrt(var+eps).
// x of type TI (the f32 residual stream or the storage type), y of type TO (TI, or bf16/f16 from an
// f32 x: the norm writes the next GEMM's reduced-precision operand directly, one rounding).
// gamma/beta [C] are always fp32 (the launcher widens bf16/f16 parameters once, C elements).
// stats [N, G, 2] = (mean, var) of type TS (float, or the storage type). Block (blockIdx.y = n) first
// builds per-channel a[c] = gamma[c]*rstd, b[c] = beta[c] - mean*a[c] in smem (2*C floats), then
// grid-strides over the S*C/VEC vectors of x[n] (VEC divides C, so a vector stays in one row).
// VEC * sizeof(wider of TI, TO) <= 16; both x and y are aligned to their own VEC-element vectors.
// Grid (bx, N); block 256; dynamic smem 2*C floats.
// ---------------------------------------------------------------------------------------------------
template <typename TI, typename TO, typename TS, int VEC>
__device__ void gn_apply(const TI* __restrict__ x, const TS* __restrict__ stats,
                         const float* __restrict__ gamma, const float* __restrict__ beta,
                         TO* __restrict__ y, int S, int C, int G, float eps, int silu) {
    extern __shared__ float sh[];
    float* sa = sh;
    float* sb = sh + C;
    const int n = blockIdx.y;
    const int cg = C / G;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const int g = c / cg;
        const float mean = to_f(stats[((size_t)n * G + g) * 2]);
        const float var = to_f(stats[((size_t)n * G + g) * 2 + 1]);
        const float a = gamma[c] * rsqrtf(var + eps);
        sa[c] = a;
        sb[c] = beta[c] - mean * a;
    }
    __syncthreads();
    // 32-bit indices within x[n]: the launcher guarantees S*C < 2^31.
    const unsigned nv = (unsigned)S * (unsigned)C / VEC;
    const TI* xn = x + (size_t)n * S * C;
    TO* yn = y + (size_t)n * S * C;
#pragma unroll 4
    for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < nv; v += gridDim.x * blockDim.x) {
        const unsigned e = v * VEC;
        const int c0 = (int)(e % (unsigned)C);
        VecT<TI, VEC> in = vi_load<TI, VEC>(xn + e);
        VecT<TO, VEC> out;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            float t = fmaf(to_f(in.v[i]), sa[c0 + i], sb[c0 + i]);
            if (silu) t = t / (1.f + __expf(-t));
            out.v[i] = from_f<TO>(t);
        }
        vi_store<TO, VEC>(yn + e, out);
    }
}

// VEC consecutive fp32 parameters (gamma/beta) in 16-byte pieces: VEC <= 4 is one load, VEC = 8 two
// (the launcher keeps the parameter pointers 16-byte aligned when VEC >= 4).
template <int VEC>
__device__ __forceinline__ void vi_load_params(const float* __restrict__ p, float (&out)[VEC]) {
    constexpr int P = VEC < 4 ? VEC : 4;
#pragma unroll
    for (int j = 0; j < VEC; j += P) {
        VecT<float, P> t = vi_load<float, P>(p + j);
#pragma unroll
        for (int i = 0; i < P; ++i) out[j + i] = t.v[i];
    }
}

// ---------------------------------------------------------------------------------------------------
// LayerNorm over the last dim: one warp per row of C elements, fp32 two-pass statistics (mean, then
// sum of squared deviations; the re-reads of the row hit L1/L2), then the normalised write.
// rows = total / C. Grid ceil(rows / 4); block 128 (4 warps). VEC divides C. x of type TI, y of type TO
// (TI, or bf16/f16 from an f32 x), gamma/beta fp32 (16-byte aligned when VEC >= 4).
// ---------------------------------------------------------------------------------------------------
template <typename TI, typename TO, int VEC>
__device__ void layer_norm_rows(const TI* __restrict__ x, const float* __restrict__ gamma,
                                const float* __restrict__ beta, TO* __restrict__ y, int rows, int C,
                                float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warp exits together: no block-level sync below
    const TI* xr = x + (size_t)row * C;
    TO* yr = y + (size_t)row * C;
    const int nvec = C / VEC;
    float s = 0.f;
    for (int v = lane; v < nvec; v += 32) {
        VecT<TI, VEC> in = vi_load<TI, VEC>(xr + v * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) s += to_f(in.v[i]);
    }
    const float mean = vi_warp_sum(s) / (float)C;
    float m2 = 0.f;
    for (int v = lane; v < nvec; v += 32) {
        VecT<TI, VEC> in = vi_load<TI, VEC>(xr + v * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            float d = to_f(in.v[i]) - mean;
            m2 = fmaf(d, d, m2);
        }
    }
    const float rstd = rsqrtf(vi_warp_sum(m2) / (float)C + eps);
    for (int v = lane; v < nvec; v += 32) {
        VecT<TI, VEC> in = vi_load<TI, VEC>(xr + v * VEC);
        float gm[VEC], bt[VEC];
        vi_load_params<VEC>(gamma + v * VEC, gm);
        vi_load_params<VEC>(beta + v * VEC, bt);
        VecT<TO, VEC> out;
#pragma unroll
        for (int i = 0; i < VEC; ++i)
            out.v[i] = from_f<TO>((to_f(in.v[i]) - mean) * rstd * gm[i] + bt[i]);
        vi_store<TO, VEC>(yr + v * VEC, out);
    }
}

// ---------------------------------------------------------------------------------------------------
// Softmax over the last dim: one warp per row; pass 1 keeps a per-lane running (max, sum of exp)
// merged across the warp, pass 2 writes exp(x - max) / sum. A row of all -inf gives zeros (as the CPU
// reference). Grid ceil(rows / 4); block 128. VEC divides C.
// ---------------------------------------------------------------------------------------------------
template <typename T, int VEC>
__device__ void softmax_rows(const T* __restrict__ x, T* __restrict__ y, int rows, int C) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const T* xr = x + (size_t)row * C;
    T* yr = y + (size_t)row * C;
    const int nvec = C / VEC;
    float m = -VI_INF, s = 0.f;
    for (int v = lane; v < nvec; v += 32) {
        VecT<T, VEC> in = vi_load<T, VEC>(xr + v * VEC);
        float vm = -VI_INF;
#pragma unroll
        for (int i = 0; i < VEC; ++i) vm = fmaxf(vm, to_f(in.v[i]));
        const float mn = fmaxf(m, vm);
        if (mn == -VI_INF) continue;  // everything so far is -inf: nothing to add
        s *= __expf(m - mn);          // m = -inf -> factor 0 (s is 0 then anyway)
#pragma unroll
        for (int i = 0; i < VEC; ++i) s += __expf(to_f(in.v[i]) - mn);
        m = mn;
    }
    const float gm = vi_warp_max(m);
    const float sc = (gm == -VI_INF) ? 0.f : s * __expf(m - gm);  // lanes with m=-inf have s=0
    const float tot = vi_warp_sum(sc);
    const float inv = (gm == -VI_INF) ? 0.f : 1.f / tot;
    for (int v = lane; v < nvec; v += 32) {
        VecT<T, VEC> in = vi_load<T, VEC>(xr + v * VEC);
        VecT<T, VEC> out;
#pragma unroll
        for (int i = 0; i < VEC; ++i)
            out.v[i] = from_f<T>(gm == -VI_INF ? 0.f : __expf(to_f(in.v[i]) - gm) * inv);
        vi_store<T, VEC>(yr + v * VEC, out);
    }
}

// ---------------------------------------------------------------------------------------------------
// extern "C" entry points. Names: gn_partial_<x>_v<VEC>, gn_apply_<x>_<y>_s<stats>_v<VEC>,
// layer_norm_<x>_<y>_v<VEC>, softmax_<x>_v<VEC> (x / y: input / output storage type). The launcher
// picks the largest VEC with VEC * sizeof(wider of x, y) <= 16 bytes that divides the channel counts
// named in each contract above and keeps every vector access aligned (base pointers are
// allocator-aligned). Instantiated (x, y) pairs: (f32, f32), (bf16, bf16), (f16, f16) and the
// precision policy's f32 residual stream normalised into a bf16/f16 operand: (f32, bf16), (f32, f16).
// ---------------------------------------------------------------------------------------------------
#define VI_GN_PARTIAL(T, NAME, VEC)                                                               \
    extern "C" __global__ void __launch_bounds__(1024)                                           \
        gn_partial_##NAME##_v##VEC(const T* x, float* part, int S, int C, int rows_per_chunk) { \
        gn_partial<T, VEC>(x, part, S, C, rows_per_chunk);                                       \
    }
#define VI_GN_APPLY(TI, TO, TS, IN, ON, SN, VEC)                                                 \
    extern "C" __global__ void __launch_bounds__(256) gn_apply_##IN##_##ON##_s##SN##_v##VEC(    \
        const TI* x, const TS* stats, const float* gamma, const float* beta, TO* y, int S, int C, \
        int G, float eps, int silu) {                                                            \
        gn_apply<TI, TO, TS, VEC>(x, stats, gamma, beta, y, S, C, G, eps, silu);                 \
    }
#define VI_LN(TI, TO, IN, ON, VEC)                                                               \
    extern "C" __global__ void __launch_bounds__(128) layer_norm_##IN##_##ON##_v##VEC(          \
        const TI* x, const float* gamma, const float* beta, TO* y, int rows, int C, float eps) { \
        layer_norm_rows<TI, TO, VEC>(x, gamma, beta, y, rows, C, eps);                           \
    }
#define VI_SOFTMAX(T, NAME, VEC)                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        softmax_##NAME##_v##VEC(const T* x, T* y, int rows, int C) {                             \
        softmax_rows<T, VEC>(x, y, rows, C);                                                     \
    }

#define VI_ALL_VECS(M, T, NAME) M(T, NAME, 1) M(T, NAME, 2) M(T, NAME, 4)
VI_ALL_VECS(VI_GN_PARTIAL, float, f32)
VI_ALL_VECS(VI_GN_PARTIAL, __nv_bfloat16, bf16)
VI_ALL_VECS(VI_GN_PARTIAL, __half, f16)
VI_GN_PARTIAL(__nv_bfloat16, bf16, 8)
VI_GN_PARTIAL(__half, f16, 8)
VI_ALL_VECS(VI_SOFTMAX, float, f32)
VI_ALL_VECS(VI_SOFTMAX, __nv_bfloat16, bf16)
VI_ALL_VECS(VI_SOFTMAX, __half, f16)
VI_SOFTMAX(__nv_bfloat16, bf16, 8)
VI_SOFTMAX(__half, f16, 8)

// LayerNorm: VEC 1/2/4 for every pair, 8 where both sides are 16-bit.
#define VI_LN_VECS(TI, TO, IN, ON) VI_LN(TI, TO, IN, ON, 1) VI_LN(TI, TO, IN, ON, 2) VI_LN(TI, TO, IN, ON, 4)
VI_LN_VECS(float, float, f32, f32)
VI_LN_VECS(__nv_bfloat16, __nv_bfloat16, bf16, bf16)
VI_LN_VECS(__half, __half, f16, f16)
VI_LN_VECS(float, __nv_bfloat16, f32, bf16)
VI_LN_VECS(float, __half, f32, f16)
VI_LN(__nv_bfloat16, __nv_bfloat16, bf16, bf16, 8)
VI_LN(__half, __half, f16, f16, 8)

// Apply: stats either fp32 (what group_norm_stats/the fused path produce) or the storage type of x.
#define VI_GN_APPLY_VECS(TI, TO, TS, IN, ON, SN)                                                 \
    VI_GN_APPLY(TI, TO, TS, IN, ON, SN, 1)                                                       \
    VI_GN_APPLY(TI, TO, TS, IN, ON, SN, 2) VI_GN_APPLY(TI, TO, TS, IN, ON, SN, 4)
VI_GN_APPLY_VECS(float, float, float, f32, f32, f32)
VI_GN_APPLY_VECS(__nv_bfloat16, __nv_bfloat16, float, bf16, bf16, f32)
VI_GN_APPLY_VECS(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, bf16, bf16, bf16)
VI_GN_APPLY_VECS(__half, __half, float, f16, f16, f32)
VI_GN_APPLY_VECS(__half, __half, __half, f16, f16, f16)
VI_GN_APPLY_VECS(float, __nv_bfloat16, float, f32, bf16, f32)
VI_GN_APPLY_VECS(float, __half, float, f32, f16, f32)
VI_GN_APPLY(__nv_bfloat16, __nv_bfloat16, float, bf16, bf16, f32, 8)
VI_GN_APPLY(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, bf16, bf16, bf16, 8)
VI_GN_APPLY(__half, __half, float, f16, f16, f32, 8)
VI_GN_APPLY(__half, __half, __half, f16, f16, f16, 8)

// Dual-scope temporal attention of Video-Infinity (banded local window + global keys), without a mask:
//   q [b, n, H, D]; k_local / v_local [b, n + 2p, H, D]; k_glob / v_glob [b, G, H, D] -> o [b, n, H, D]
//   query i sees local rows i ..= i + 2p (logit + local_bias) and all G global rows (+ global_bias);
//   logits = (q . k) * scale_eff + bias; softmax over exactly those 2p + 1 + G keys.
// (scale_eff = scale * ln(2p+1+G)/ln(16) with token_num_scale is computed by the launcher.)
// Kernels (launchers in runtime/src/cuda/attention.rs):
//   dual_generic_<dt>_l4:   any dtype, any D <= 128; fp32 math; one warp per (bi, i, h).
//   dual_mma_<dt>_d<D>:     bf16/f16, D in {32, 64, 128}; one warp per (bi, h, 16-query tile) with the
//                           tile's keys staged in shared memory, tensor cores (mma.cuh).

#include "reduce.cuh"
#include "mma.cuh"

// ---------------------------------------------------------------------------------------------------
// Generic kernel. Warp w -> h = w % H, i = (w / H) % n, bi = w / (H * n). Key t in 0 .. 2p+1+G:
// t <= 2p -> local row i + t (bias local), else global row t - (2p+1) (bias global). Lanes own keys in
// the logit phase (tiles of 32, online softmax) and channels d = lane + 32*u in the output phase.
// Grid ceil(b*n*H / 4); block 128; dynamic smem 4*D floats.
// ---------------------------------------------------------------------------------------------------
template <typename T, int L>
__device__ void dual_generic(const T* __restrict__ q, const T* __restrict__ kl,
                             const T* __restrict__ vl, const T* __restrict__ kg,
                             const T* __restrict__ vg, T* __restrict__ o, int nb, int n, int H,
                             int D, int pad, int G, float scale, float local_bias,
                             float global_bias) {
    extern __shared__ float sq_all[];
    const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + wib;
    if (w >= (long long)nb * n * H) return;  // whole warp; only __syncwarp below
    const int h = (int)(w % H);
    const int i = (int)((w / H) % n);
    const int bi = (int)(w / ((long long)H * n));
    float* sq = sq_all + wib * D;
    const size_t rs = (size_t)H * D;
    const int nl = n + 2 * pad;
    const T* qr = q + ((size_t)bi * n + i) * rs + (size_t)h * D;
    for (int d = lane; d < D; d += 32) sq[d] = to_f(qr[d]) * scale;
    __syncwarp();

    const int win = 2 * pad + 1, nk = win + G;
    float m = -VI_INF, l = 0.f;
    float acc[L];
#pragma unroll
    for (int u = 0; u < L; ++u) acc[u] = 0.f;
    for (int t0 = 0; t0 < nk; t0 += 32) {
        const int t = t0 + lane;
        float s = -VI_INF;
        if (t < nk) {
            const T* kr = t < win ? kl + ((size_t)bi * nl + i + t) * rs + (size_t)h * D
                                  : kg + ((size_t)bi * G + (t - win)) * rs + (size_t)h * D;
            float dot = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) dot = fmaf(sq[d], to_f(kr[d]), dot);
            s = dot + (t < win ? local_bias : global_bias);
        }
        const float mn = fmaxf(m, vi_warp_max(s));
        if (mn == -VI_INF) continue;
        const float alpha = __expf(m - mn);
        const float p = __expf(s - mn);
        l = l * alpha + vi_warp_sum(p);
#pragma unroll
        for (int u = 0; u < L; ++u) acc[u] *= alpha;
        const int nj = min(32, nk - t0);
#pragma unroll 1
        for (int jj = 0; jj < nj; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const int tj = t0 + jj;
            const T* vr = tj < win ? vl + ((size_t)bi * nl + i + tj) * rs + (size_t)h * D
                                   : vg + ((size_t)bi * G + (tj - win)) * rs + (size_t)h * D;
#pragma unroll
            for (int u = 0; u < L; ++u) {
                const int d = lane + 32 * u;
                if (d < D) acc[u] = fmaf(pj, to_f(vr[d]), acc[u]);
            }
        }
        m = mn;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = o + ((size_t)bi * n + i) * rs + (size_t)h * D;
#pragma unroll
    for (int u = 0; u < L; ++u) {
        const int d = lane + 32 * u;
        if (d < D) orow[d] = from_f<T>(acc[u] * inv);
    }
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core kernel. Warp task w -> h = w % H, mt = (w / H) % ntq, bi = w / (H * ntq), ntq =
// ceil(n / 16) (h fastest: neighbouring warps read neighbouring 2*D-byte pieces of the same rows).
// Queries i0 + r, r < 16, i0 = 16 mt. The warp's virtual key list t (kept in shared memory, pitch
// LD = D + 8 elements):
//   t <  NL            : local row i0 + t,  NL = min(16 + 2p, n + 2p - i0)   (visible iff r <= t <= r + 2p)
//   NL <= t < NL + G   : global row t - NL                                  (always visible)
//   NL + G <= t < NK16 : zero rows, masked;   NK16 = roundup(NL + G, 16) <= nkp (the launcher's bound,
//                        nkp = roundup(min(16, n) + 2p + G, 16), sizes the shared memory).
// Query rows i0 + r >= n load zeros, are fully masked and not stored.
// Grid ceil(b * H * ntq / WPB); block 32 * WPB; dynamic smem WPB * (16 + 2 nkp) * LD * sizeof(T).
// ---------------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ void dual_mma(const T* __restrict__ q, const T* __restrict__ kl,
                         const T* __restrict__ vl, const T* __restrict__ kg,
                         const T* __restrict__ vg, T* __restrict__ o, int nb, int n, int H, int pad,
                         int G, int nkp, float scale_log2, float lbias_log2, float gbias_log2) {
    constexpr int LD = D + 8, CH = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    const int ntq = (n + 15) / 16;
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + wib;
    if (w >= (long long)nb * H * ntq) return;  // whole warp; warp-level sync only
    const int h = (int)(w % H);
    const int mt = (int)((w / H) % ntq);
    const int bi = (int)(w / ((long long)H * ntq));
    T* sQ = reinterpret_cast<T*>(smem_raw) + (size_t)wib * (16 + 2 * nkp) * LD;
    T* sK = sQ + 16 * LD;
    T* sV = sK + nkp * LD;

    const size_t rs = (size_t)H * D;
    const int nl = n + 2 * pad;
    const int i0 = mt * 16;
    const int NL = min(16 + 2 * pad, nl - i0);
    const int nk = NL + G;
    const int nk16 = (nk + 15) & ~15;
    const T* qb = q + (size_t)bi * n * rs + (size_t)h * D;
    const T* klb = kl + (size_t)bi * nl * rs + (size_t)h * D;
    const T* vlb = vl + (size_t)bi * nl * rs + (size_t)h * D;
    const T* kgb = kg + (size_t)bi * G * rs + (size_t)h * D;
    const T* vgb = vg + (size_t)bi * G * rs + (size_t)h * D;

    for (int c = lane; c < 16 * CH; c += 32) {
        const int r = c / CH, cc = c % CH;
        const bool ok = i0 + r < n;
        vi_cp_async16(sQ + r * LD + cc * 8, ok ? qb + (size_t)(i0 + r) * rs + cc * 8 : qb, ok);
    }
    for (int c = lane; c < nk16 * CH; c += 32) {
        const int t = c / CH, cc = c % CH;
        const T* ks = kgb;  // any valid address when zero-filling
        const T* vs = vgb;
        bool ok = true;
        if (t < NL) {
            ks = klb + (size_t)(i0 + t) * rs + cc * 8;
            vs = vlb + (size_t)(i0 + t) * rs + cc * 8;
        } else if (t < nk) {
            ks = kgb + (size_t)(t - NL) * rs + cc * 8;
            vs = vgb + (size_t)(t - NL) * rs + cc * 8;
        } else {
            ok = false;
            ks = qb;
            vs = qb;
        }
        vi_cp_async16(sK + t * LD + cc * 8, ks, ok);
        vi_cp_async16(sV + t * LD + cc * 8, vs, ok);
    }
    vi_cp_async_commit();
    vi_cp_async_wait<0>();
    __syncwarp();

    ViWarpAttn<T, D> wa;
    wa.init();
    wa.load_q(sQ, LD, lane);
    const int rows = min(16, n - i0);
    const int p2 = 2 * pad;
    for (int k0 = 0; k0 < nk16; k0 += 16) {
        wa.template step<16>(sK + k0 * LD, sV + k0 * LD, LD, scale_log2, lane,
                             [&](int r, int j) -> float {
                                 const int t = k0 + j;
                                 if (r >= rows) return -VI_INF;
                                 if (t < NL) return (t >= r && t <= r + p2) ? lbias_log2 : -VI_INF;
                                 return t < nk ? gbias_log2 : -VI_INF;
                             });
    }
    T* ob = o + (size_t)bi * n * rs + (size_t)h * D;
    wa.store(rows, lane, [&](int r) { return ob + (size_t)(i0 + r) * rs; });
}

#define VI_DUAL_GENERIC(T, NAME, L)                                                              \
    extern "C" __global__ void __launch_bounds__(128) dual_generic_##NAME##_l##L(              \
        const T* q, const T* kl, const T* vl, const T* kg, const T* vg, T* o, int nb, int n,     \
        int H, int D, int pad, int G, float scale, float local_bias, float global_bias) {       \
        dual_generic<T, L>(q, kl, vl, kg, vg, o, nb, n, H, D, pad, G, scale, local_bias,        \
                           global_bias);                                                         \
    }
#define VI_DUAL_MMA(T, NAME, D)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) dual_mma_##NAME##_d##D(                  \
        const T* q, const T* kl, const T* vl, const T* kg, const T* vg, T* o, int nb, int n,     \
        int H, int pad, int G, int nkp, float scale_log2, float lbias_log2, float gbias_log2) {  \
        dual_mma<T, D>(q, kl, vl, kg, vg, o, nb, n, H, pad, G, nkp, scale_log2, lbias_log2,     \
                       gbias_log2);                                                              \
    }

VI_DUAL_GENERIC(float, f32, 4)
VI_DUAL_GENERIC(__nv_bfloat16, bf16, 4)
VI_DUAL_GENERIC(__half, f16, 4)

VI_DUAL_MMA(__nv_bfloat16, bf16, 32)
VI_DUAL_MMA(__nv_bfloat16, bf16, 64)
VI_DUAL_MMA(__nv_bfloat16, bf16, 128)
VI_DUAL_MMA(__half, f16, 32)
VI_DUAL_MMA(__half, f16, 64)
VI_DUAL_MMA(__half, f16, 128)

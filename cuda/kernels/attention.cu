// Scaled-dot-product attention, layout [B, S, H, D] (row stride H*D, read in place: no transposes).
//   q [B, Sq, H, D], k [B, Sk, H, D], v [B, Sk, H, Dv] -> o [B, Sq, H, Dv]
//   logits = (q . k) * scale (+ bias[Sq, Sk]) (causal: key j > query i masked); softmax over keys.
// Two kernels (launchers in runtime/src/cuda/attention.rs):
//   attn_generic_<dt>_l4_k<KV>: any D and Dv, any dtype, fp32 math. One warp per (b, i, h); key rows
//                           read with KV-element vector loads (KV = 16 bytes when D allows, else 1).
//   attn_small_<dt>_d<D>:   bf16/f16, D = Dv in {32, 64, 128}, Sk <= 64 (temporal attention over
//                           frames): one warp per (b, h, 16 queries), keys staged per warp.
//   attn_wide_<dt>_d<D>_w2: bf16/f16, D = Dv in {256, 512} (VAE mid-block): value dim in chunks of 128.
//   attn_flash_<dt>_d<D>_w<W>: bf16/f16, D = Dv in {32, 64, 128}; tensor cores (mma.sync m16n8k16,
//                           fp32 accumulation), online softmax; W warps = 16*W queries per block,
//                           64 keys per step (W = 8 for D <= 64, also W = 4 for comparison / D = 128).

#include "reduce.cuh"
#include "mma.cuh"

// ---------------------------------------------------------------------------------------------------
// Generic kernel. Warp w (global) -> h = w % H, i = (w / H) % Sq, b = w / (H * Sq).
// Per tile of 32 keys: lane j computes logit s_j = sum_d (scale*q[d]) * k[j][d] (+ bias[i][j]);
// online softmax over tiles; output phase: lane owns channels d = c0 + lane + 32*t (t < L) and
// accumulates sum_j p_j v[j][d] (p_j broadcast by shuffle; v rows read coalesced); channel chunks
// c0 = 0, 32L, ... each make one pass over the keys.
// Grid ceil(B*Sq*H / 4); block 128 (4 warps); dynamic smem 4*D floats (the scaled q rows).
// A row with every key masked (possible only through -inf bias) outputs 0, like the CPU softmax.
// ---------------------------------------------------------------------------------------------------
template <typename T, int L, int KV>
__device__ void attn_generic(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const T* __restrict__ bias,
                             T* __restrict__ o, int B, int Sq, int Sk, int H, int D, int Dv,
                             float scale, int causal) {
    extern __shared__ float sq_all[];
    const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + wib;
    if (w >= (long long)B * Sq * H) return;  // whole warp; only __syncwarp below
    const int h = (int)(w % H);
    const int i = (int)((w / H) % Sq);
    const int b = (int)(w / ((long long)H * Sq));
    float* sq = sq_all + wib * D;
    const T* qr = q + (((size_t)b * Sq + i) * H + h) * D;
    for (int d = lane; d < D; d += 32) sq[d] = to_f(qr[d]) * scale;
    __syncwarp();

    const size_t kstride = (size_t)H * D, vstride = (size_t)H * Dv;
    const T* kb = k + (size_t)b * Sk * kstride + (size_t)h * D;
    const T* vb = v + (size_t)b * Sk * vstride + (size_t)h * Dv;
    const int kend = causal ? min(Sk, i + 1) : Sk;
    T* orow = o + (((size_t)b * Sq + i) * H + h) * Dv;
    // Output channels in chunks of 32*L (one pass over the keys per chunk; the logits are
    // recomputed per chunk, which only matters for Dv > 32*L).
    for (int c0 = 0; c0 < Dv; c0 += 32 * L) {
        float m = -VI_INF, l = 0.f;
        float acc[L];
#pragma unroll
        for (int t = 0; t < L; ++t) acc[t] = 0.f;
        for (int j0 = 0; j0 < kend; j0 += 32) {
            const int j = j0 + lane;
            float s = -VI_INF;
            if (j < kend) {
                const T* kr = kb + (size_t)j * kstride;
                float dot = 0.f;
                // KV-element vector loads of the key row (KV divides D, rows KV-aligned).
#pragma unroll 2
                for (int d = 0; d < D; d += KV) {
                    const VecT<T, KV> kv = vi_load<T, KV>(kr + d);
#pragma unroll
                    for (int e = 0; e < KV; ++e) dot = fmaf(sq[d + e], to_f(kv.v[e]), dot);
                }
                s = dot;
                if (bias) s += to_f(bias[(size_t)i * Sk + j]);
            }
            const float mn = fmaxf(m, vi_warp_max(s));
            if (mn == -VI_INF) continue;  // warp-uniform: every key so far masked
            const float alpha = __expf(m - mn);  // m = -inf -> 0
            const float p = __expf(s - mn);      // s = -inf -> 0
            l = l * alpha + vi_warp_sum(p);
#pragma unroll
            for (int t = 0; t < L; ++t) acc[t] *= alpha;
            const int nj = min(32, kend - j0);
#pragma unroll 1
            for (int jj = 0; jj < nj; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                const T* vr = vb + (size_t)(j0 + jj) * vstride + c0;
#pragma unroll
                for (int t = 0; t < L; ++t) {
                    const int d = lane + 32 * t;
                    if (c0 + d < Dv) acc[t] = fmaf(pj, to_f(vr[d]), acc[t]);
                }
            }
            m = mn;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int t = 0; t < L; ++t) {
            const int d = c0 + lane + 32 * t;
            if (d < Dv) orow[d] = from_f<T>(acc[t] * inv);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Flash kernel. Block (blockIdx.x = query tile of BM = 16*WARPS, blockIdx.y = h, blockIdx.z = b),
// WARPS warps; warp w owns queries q0 + 16w .. q0 + 16w + 15. Per step the block stages 64 keys of K and V in shared
// memory (cp.async 16-byte chunks, zero-filled beyond Sk; double-buffered: the next tile is in flight
// while the current one is consumed), each warp runs the tile engine (mma.cuh).
// Shared rows are padded to D + 8 elements (row pitch = 16 bytes mod 128) so the 8 row addresses of
// every ldmatrix hit distinct banks.
// Masks: key j >= Sk -> -inf (tail tile); causal: j > i -> -inf; bias added in the log2 domain.
// Query rows >= Sq compute on zero q and are never stored (nor is their bias read).
// Grid (ceil(Sq/BM), H, B); block 32*WARPS; dynamic smem (BM + 2*2*64) * (D+8) * sizeof(T)
// (> 48 KB for WARPS = 8 or D = 128: the launcher opts in).
// ---------------------------------------------------------------------------------------------------
template <typename T, int D, int WARPS>
__device__ void attn_flash(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const T* __restrict__ bias,
                           T* __restrict__ o, int Sq, int Sk, int H, float scale_log2,
                           int causal) {
    constexpr int BM = 16 * WARPS, BN = 64, LD = D + 8, CH = D / 8;  // CH: 16-byte chunks per row
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BM * LD;  // [2][BN][LD]
    T* sV = sK + 2 * BN * LD;  // [2][BN][LD]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const size_t rs = (size_t)H * D;  // row stride of q, k, v, o
    const T* qb = q + (size_t)b * Sq * rs + (size_t)h * D;
    const T* kb = k + (size_t)b * Sk * rs + (size_t)h * D;
    const T* vb = v + (size_t)b * Sk * rs + (size_t)h * D;

    // Stage Q (rows q0..q0+63) and the first K/V tile.
    for (int c = tid; c < BM * CH; c += blockDim.x) {
        const int r = c / CH, cc = c % CH;
        const bool ok = q0 + r < Sq;
        vi_cp_async16(sQ + r * LD + cc * 8, ok ? qb + (size_t)(q0 + r) * rs + cc * 8 : qb, ok);
    }
    // Keys beyond the block's last query are all masked under causal: stop there.
    const int kend = causal ? min(Sk, q0 + BM) : Sk;
    const int ntiles = (kend + BN - 1) / BN;
    auto load_kv = [&](int tile, int buf) {
        const int k0 = tile * BN;
        T* dK = sK + buf * BN * LD;
        T* dV = sV + buf * BN * LD;
        for (int c = tid; c < BN * CH; c += blockDim.x) {
            const int r = c / CH, cc = c % CH;
            const bool ok = k0 + r < Sk;
            const size_t off = (size_t)(k0 + r) * rs + cc * 8;
            vi_cp_async16(dK + r * LD + cc * 8, ok ? kb + off : kb, ok);
            vi_cp_async16(dV + r * LD + cc * 8, ok ? vb + off : vb, ok);
        }
    };
    if (ntiles > 0) load_kv(0, 0);
    vi_cp_async_commit();

    ViWarpAttn<T, D> wa;
    wa.init();
    const int qw = q0 + warp * 16;  // this warp's first query
    for (int t = 0; t < ntiles; ++t) {
        // Prefetch tile t+1 into the other buffer (it was consumed in step t-1, guarded by the
        // trailing __syncthreads of that step), then wait for tile t (and Q) only.
        if (t + 1 < ntiles) load_kv(t + 1, (t + 1) & 1);
        vi_cp_async_commit();
        vi_cp_async_wait<1>();
        __syncthreads();
        if (t == 0) wa.load_q(sQ + warp * 16 * LD, LD, lane);
        const int k0 = t * BN;
        const T* cK = sK + (t & 1) * BN * LD;
        const T* cV = sV + (t & 1) * BN * LD;
        // Warp-uniform skips: a warp entirely past Sq has nothing to compute; under causal, a tile
        // entirely after this warp's last query adds nothing.
        if (qw < Sq && !(causal && k0 > qw + 15)) {
            wa.template step<BN>(cK, cV, LD, scale_log2, lane, [&](int r, int j) -> float {
                const int qi = qw + r, kj = k0 + j;
                if (kj >= Sk || (causal && kj > qi)) return -VI_INF;
                if (bias != nullptr && qi < Sq) return to_f(bias[(size_t)qi * Sk + kj]) * VI_LOG2E;
                return 0.f;
            });
        }
        __syncthreads();  // everyone done with buffer t&1 before it is refilled at step t+1
    }
    if (ntiles == 0) {  // Sk == 0: nothing to attend to; outputs 0 (Q was still loaded: drain it)
        vi_cp_async_wait<0>();
    }
    T* ob = o + (size_t)b * Sq * rs + (size_t)h * D;
    wa.store(min(16, Sq - qw), lane, [&](int r) { return ob + (size_t)(qw + r) * rs; });
}

// ---------------------------------------------------------------------------------------------------
// Small-sequence kernel (Sk <= 64 keys, e.g. temporal attention over 16 frames with b = B*H*W rows):
// one warp per (b, h, 16-query tile), independent warps (no block barrier), like dual_mma.
// Warp task w -> h = w % H, mt = (w / H) % ntq, b = w / (H * ntq), ntq = ceil(Sq / 16) (h fastest:
// neighbouring warps read neighbouring 2*D-byte pieces of the same rows). The warp stages its 16 query
// rows and ALL Sk keys/values of (b, h) (zero rows up to nk16 = roundup(Sk, 16)) in its own smem slice
// with cp.async, then runs the tile engine over key steps of 16. Masks: j >= Sk, causal j > i; bias.
// Query rows >= Sq load zeros, are fully masked and not stored.
// Grid ceil(B * H * ntq / WPB); block 32 * WPB; dynamic smem WPB * (16 + 2 * nk16) * (D+8) * sizeof(T).
// ---------------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ void attn_small(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const T* __restrict__ bias,
                           T* __restrict__ o, int B, int Sq, int Sk, int H, float scale_log2,
                           int causal) {
    constexpr int LD = D + 8, CH = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
    const int ntq = (Sq + 15) / 16;
    const int nk16 = (Sk + 15) & ~15;
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + wib;
    if (w >= (long long)B * H * ntq) return;  // whole warp; warp-level sync only
    const int h = (int)(w % H);
    const int mt = (int)((w / H) % ntq);
    const int b = (int)(w / ((long long)H * ntq));
    T* sQ = reinterpret_cast<T*>(smem_raw) + (size_t)wib * (16 + 2 * nk16) * LD;
    T* sK = sQ + 16 * LD;
    T* sV = sK + nk16 * LD;
    const size_t rs = (size_t)H * D;
    const int i0 = mt * 16;
    const T* qb = q + (size_t)b * Sq * rs + (size_t)h * D;
    const T* kb = k + (size_t)b * Sk * rs + (size_t)h * D;
    const T* vb = v + (size_t)b * Sk * rs + (size_t)h * D;
    for (int c = lane; c < 16 * CH; c += 32) {
        const int r = c / CH, cc = c % CH;
        const bool ok = i0 + r < Sq;
        vi_cp_async16(sQ + r * LD + cc * 8, ok ? qb + (size_t)(i0 + r) * rs + cc * 8 : qb, ok);
    }
    for (int c = lane; c < nk16 * CH; c += 32) {
        const int j = c / CH, cc = c % CH;
        const bool ok = j < Sk;
        const size_t off = (size_t)j * rs + cc * 8;
        vi_cp_async16(sK + j * LD + cc * 8, ok ? kb + off : kb, ok);
        vi_cp_async16(sV + j * LD + cc * 8, ok ? vb + off : vb, ok);
    }
    vi_cp_async_commit();
    vi_cp_async_wait<0>();
    __syncwarp();

    ViWarpAttn<T, D> wa;
    wa.init();
    wa.load_q(sQ, LD, lane);
    const int rows = min(16, Sq - i0);
    for (int k0 = 0; k0 < nk16; k0 += 16) {
        wa.template step<16>(sK + k0 * LD, sV + k0 * LD, LD, scale_log2, lane,
                             [&](int r, int j) -> float {
                                 const int qi = i0 + r, kj = k0 + j;
                                 if (r >= rows || kj >= Sk || (causal && kj > qi)) return -VI_INF;
                                 if (bias != nullptr)
                                     return to_f(bias[(size_t)qi * Sk + kj]) * VI_LOG2E;
                                 return 0.f;
                             });
    }
    T* ob = o + (size_t)b * Sq * rs + (size_t)h * D;
    wa.store(rows, lane, [&](int r) { return ob + (size_t)(i0 + r) * rs; });
}

// ---------------------------------------------------------------------------------------------------
// Wide-head kernel (D = Dv = DK in {256, 512}: the VAE mid-block attention, 1 head of 512 channels).
// The 16 x D output of a warp does not fit in registers, so the value dim is split in chunks of 128:
// block (blockIdx.x = query tile of BM = 16*WARPS, blockIdx.y = h * (DK/128) + chunk, blockIdx.z = b)
// computes O[:, chunk*128 .. +128] and recomputes the full-width scores (QK^T costs DK/128 times,
// still on tensor cores). Q stays in shared memory (A fragments are loaded per 16-wide k-step);
// per step the block stages 32 keys (full width) and the 32 x 128 value chunk (single-buffered
// cp.async, zero-filled beyond Sk), each warp computes S (16 x 32) with mma and hands it to the tile
// engine (ViWarpAttn<T, 128>::softmax_pv) for the online softmax and O += P V.
// Grid (ceil(Sq/BM), H * DK/128, B); block 32*WARPS; dynamic smem
// ((BM + 32) * (DK+8) + 32 * 136) * sizeof(T) (75 KB for DK = 512, WARPS = 2: the launcher opts in).
// ---------------------------------------------------------------------------------------------------
template <typename T, int DK, int WARPS>
__device__ void attn_wide(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const T* __restrict__ bias,
                          T* __restrict__ o, int Sq, int Sk, int H, float scale_log2, int causal) {
    constexpr int BM = 16 * WARPS, BN = 32, DV = 128, LDQ = DK + 8, LDV = DV + 8;
    constexpr int CHQ = DK / 8, CHV = DV / 8, NCH = DK / DV;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LDQ]
    T* sK = sQ + BM * LDQ;                     // [BN][LDQ]
    T* sV = sK + BN * LDQ;                     // [BN][LDV]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q0 = blockIdx.x * BM, h = blockIdx.y / NCH, ch = blockIdx.y % NCH, b = blockIdx.z;
    const size_t rs = (size_t)H * DK;  // row stride of q, k, v, o (D = Dv = DK)
    const T* qb = q + (size_t)b * Sq * rs + (size_t)h * DK;
    const T* kb = k + (size_t)b * Sk * rs + (size_t)h * DK;
    const T* vb = v + (size_t)b * Sk * rs + (size_t)h * DK + ch * DV;
    for (int c = tid; c < BM * CHQ; c += blockDim.x) {
        const int r = c / CHQ, cc = c % CHQ;
        const bool ok = q0 + r < Sq;
        vi_cp_async16(sQ + r * LDQ + cc * 8, ok ? qb + (size_t)(q0 + r) * rs + cc * 8 : qb, ok);
    }
    vi_cp_async_commit();
    const int kend = causal ? min(Sk, q0 + BM) : Sk;
    const int qw = q0 + warp * 16;
    ViWarpAttn<T, DV> wa;
    wa.init();
    for (int k0 = 0; k0 < kend; k0 += BN) {
        __syncthreads();  // the previous K/V tile is consumed
        for (int c = tid; c < BN * CHQ; c += blockDim.x) {
            const int r = c / CHQ, cc = c % CHQ;
            const bool ok = k0 + r < Sk;
            vi_cp_async16(sK + r * LDQ + cc * 8, ok ? kb + (size_t)(k0 + r) * rs + cc * 8 : kb, ok);
        }
        for (int c = tid; c < BN * CHV; c += blockDim.x) {
            const int r = c / CHV, cc = c % CHV;
            const bool ok = k0 + r < Sk;
            vi_cp_async16(sV + r * LDV + cc * 8, ok ? vb + (size_t)(k0 + r) * rs + cc * 8 : vb, ok);
        }
        vi_cp_async_commit();
        vi_cp_async_wait<0>();
        __syncthreads();
        if (qw < Sq && !(causal && k0 > qw + 15)) {
            float s[BN / 8][4];
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            const T* sQw = sQ + warp * 16 * LDQ;
#pragma unroll 4
            for (int ks = 0; ks < DK / 16; ++ks) {
                uint32_t a[4];
                vi_ldsm_x4(a, vi_smem_addr(sQw + (lane & 15) * LDQ + ks * 16 + (lane >> 4) * 8));
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    uint32_t bf[4];
                    const int mi = lane >> 3;
                    vi_ldsm_x4(bf, vi_smem_addr(sK + (np * 16 + (mi >> 1) * 8 + (lane & 7)) * LDQ +
                                                ks * 16 + (mi & 1) * 8));
                    ViMma<T>::mma(s[2 * np], a, bf[0], bf[1]);
                    ViMma<T>::mma(s[2 * np + 1], a, bf[2], bf[3]);
                }
            }
            wa.template softmax_pv<BN>(s, sV, LDV, scale_log2, lane, [&](int r, int j) -> float {
                const int qi = qw + r, kj = k0 + j;
                if (kj >= Sk || (causal && kj > qi)) return -VI_INF;
                if (bias != nullptr && qi < Sq) return to_f(bias[(size_t)qi * Sk + kj]) * VI_LOG2E;
                return 0.f;
            });
        }
    }
    vi_cp_async_wait<0>();  // Sk == 0: the Q copies are still to be drained
    T* ob = o + (size_t)b * Sq * rs + (size_t)h * DK + ch * DV;
    wa.store(min(16, Sq - qw), lane, [&](int r) { return ob + (size_t)(qw + r) * rs; });
}

#define VI_ATTN_WIDE(T, NAME, DK, W)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * W) attn_wide_##NAME##_d##DK##_w##W(       \
        const T* q, const T* k, const T* v, const T* bias, T* o, int Sq, int Sk, int H,         \
        float scale_log2, int causal) {                                                          \
        attn_wide<T, DK, W>(q, k, v, bias, o, Sq, Sk, H, scale_log2, causal);                    \
    }

#define VI_ATTN_GENERIC(T, NAME, L, KV)                                                          \
    extern "C" __global__ void __launch_bounds__(128) attn_generic_##NAME##_l##L##_k##KV(      \
        const T* q, const T* k, const T* v, const T* bias, T* o, int B, int Sq, int Sk, int H,  \
        int D, int Dv, float scale, int causal) {                                               \
        attn_generic<T, L, KV>(q, k, v, bias, o, B, Sq, Sk, H, D, Dv, scale, causal);           \
    }
#define VI_ATTN_SMALL(T, NAME, D)                                                                \
    extern "C" __global__ void __launch_bounds__(128) attn_small_##NAME##_d##D(                \
        const T* q, const T* k, const T* v, const T* bias, T* o, int B, int Sq, int Sk, int H,  \
        float scale_log2, int causal) {                                                          \
        attn_small<T, D>(q, k, v, bias, o, B, Sq, Sk, H, scale_log2, causal);                    \
    }
#define VI_ATTN_FLASH(T, NAME, D, W)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * W) attn_flash_##NAME##_d##D##_w##W(       \
        const T* q, const T* k, const T* v, const T* bias, T* o, int Sq, int Sk, int H,         \
        float scale_log2, int causal) {                                                          \
        attn_flash<T, D, W>(q, k, v, bias, o, Sq, Sk, H, scale_log2, causal);                    \
    }

VI_ATTN_GENERIC(float, f32, 4, 1)
VI_ATTN_GENERIC(float, f32, 4, 4)
VI_ATTN_GENERIC(__nv_bfloat16, bf16, 4, 1)
VI_ATTN_GENERIC(__nv_bfloat16, bf16, 4, 8)
VI_ATTN_GENERIC(__half, f16, 4, 1)
VI_ATTN_GENERIC(__half, f16, 4, 8)

VI_ATTN_FLASH(__nv_bfloat16, bf16, 32, 8)
VI_ATTN_FLASH(__nv_bfloat16, bf16, 32, 4)
VI_ATTN_FLASH(__nv_bfloat16, bf16, 64, 8)
VI_ATTN_FLASH(__nv_bfloat16, bf16, 64, 4)
VI_ATTN_FLASH(__nv_bfloat16, bf16, 128, 4)
VI_ATTN_FLASH(__half, f16, 32, 8)
VI_ATTN_FLASH(__half, f16, 32, 4)
VI_ATTN_FLASH(__half, f16, 64, 8)
VI_ATTN_FLASH(__half, f16, 64, 4)
VI_ATTN_FLASH(__half, f16, 128, 4)

VI_ATTN_SMALL(__nv_bfloat16, bf16, 32)
VI_ATTN_SMALL(__nv_bfloat16, bf16, 64)
VI_ATTN_SMALL(__nv_bfloat16, bf16, 128)
VI_ATTN_SMALL(__half, f16, 32)
VI_ATTN_SMALL(__half, f16, 64)
VI_ATTN_SMALL(__half, f16, 128)

VI_ATTN_WIDE(__nv_bfloat16, bf16, 256, 2)
VI_ATTN_WIDE(__nv_bfloat16, bf16, 512, 2)
VI_ATTN_WIDE(__half, f16, 256, 2)
VI_ATTN_WIDE(__half, f16, 512, 2)

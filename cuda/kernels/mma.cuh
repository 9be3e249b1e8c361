// Warp-level tensor-core helpers (sm_80+: ldmatrix, mma.sync m16n8k16 with fp32 accumulation,
// cp.async) and the 16-query online-softmax "tile engine" shared by attention.cu (flash attention)
// and dual_scope.cu (banded + global temporal attention).
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16x16, row-major), 4 regs of 2 halves: a0 (row g, k 2t..2t+1), a1 (row g+8, k 2t..),
//     a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..).
//   B (16x8, "col"), 2 regs: b0 (k 2t..2t+1, col g), b1 (k 2t+8.., col g).
//   C/D (16x8 fp32), 4 regs: c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, cols 2t, 2t+1).
// The C layout of two adjacent n-tiles equals the A layout of one 16-wide k-step, which lets the
// probabilities P (C of Q K^T) feed P V directly from registers.
#pragma once

#include "common.cuh"

template <typename T> struct ViMma;

template <> struct ViMma<__nv_bfloat16> {
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo = low 16 bits
        return *reinterpret_cast<uint32_t*>(&h);
    }
    __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <> struct ViMma<__half> {
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ uint32_t vi_smem_addr(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i; r[i] = matrix i fragment
// (thread l holds row l/4, elements 2(l%4), 2(l%4)+1; with .trans the transposed matrix's).
__device__ __forceinline__ void vi_ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void vi_ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16-byte global -> shared copy; `valid` false zero-fills the 16 bytes without reading `src`.
__device__ __forceinline__ void vi_cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(vi_smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void vi_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void vi_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// One warp's share of an attention: 16 query rows (Q fragments in registers), the running
// online-softmax state (row max m and partial row sum l, both in the log2 domain) and the output
// accumulator O [16 x D] as C fragments. Thread rows: g = lane/4 (half 0) and g + 8 (half 1).
template <typename T, int D> struct ViWarpAttn {
    static_assert(D % 16 == 0 && D <= 128, "tile engine: D must be a multiple of 16, <= 128");
    uint32_t qf[D / 16][4];
    float o[D / 8][4];
    float m[2], l[2];

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
        m[0] = m[1] = -VI_INF;
        l[0] = l[1] = 0.f;
    }

    // sQ: 16 rows of this warp's queries, row stride ldq elements (16-byte aligned rows).
    __device__ __forceinline__ void load_q(const T* sQ, int ldq, int lane) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks)
            vi_ldsm_x4(qf[ks], vi_smem_addr(sQ + (lane & 15) * ldq + ks * 16 + (lane >> 4) * 8));
    }

    // Process NKEYS (multiple of 16) keys: sK, sV row-major [NKEYS][ld] in shared memory.
    // logit(r, j) = (q_r . k_j) * scale_log2 + add(r, j), where add returns the additive term in the
    // log2 domain (bias * log2e) or -inf for a masked key; r in 0..15 (this warp's row), j in 0..NKEYS.
    template <int NKEYS, class Add>
    __device__ __forceinline__ void step(const T* sK, const T* sV, int ld, float scale_log2,
                                         int lane, Add add) {
        float s[NKEYS / 8][4];
#pragma unroll
        for (int i = 0; i < NKEYS / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        // S = Q K^T. ldmatrix x4 (non-trans) matrices: (keys n0..+7, d k0..+7), (n0, k0+8),
        // (n0+8, k0), (n0+8, k0+8) -> b0/b1 of n-tile n0/8 and of n-tile n0/8 + 1.
#pragma unroll
        for (int np = 0; np < NKEYS / 16; ++np) {
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                uint32_t b[4];
                const int mi = lane >> 3;
                vi_ldsm_x4(b, vi_smem_addr(sK + (np * 16 + (mi >> 1) * 8 + (lane & 7)) * ld +
                                           ks * 16 + (mi & 1) * 8));
                ViMma<T>::mma(s[2 * np], qf[ks], b[0], b[1]);
                ViMma<T>::mma(s[2 * np + 1], qf[ks], b[2], b[3]);
            }
        }
        softmax_pv<NKEYS>(s, sV, ld, scale_log2, lane, add);
    }

    // The rest of a step given the raw scores S (C fragments of 16 x NKEYS): scale + bias/mask,
    // online softmax update, O += P V with V row-major [NKEYS][ldv] (its first D columns).
    template <int NKEYS, class Add>
    __device__ __forceinline__ void softmax_pv(float (&s)[NKEYS / 8][4], const T* sV, int ldv,
                                               float scale_log2, int lane, Add add) {
        // Scale, bias/mask, running max per row half.
        float mx[2] = {-VI_INF, -VI_INF};
#pragma unroll
        for (int nt = 0; nt < NKEYS / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = (lane >> 2) + (e >> 1) * 8;
                const int j = nt * 8 + (lane & 3) * 2 + (e & 1);
                const float x = s[nt][e] * scale_log2 + add(r, j);  // -inf stays -inf
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float alpha[2], base[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float mn = fmaxf(m[h], mx[h]);
            // All keys of this row masked so far: keep everything at 0 (exp2(-inf) = 0), no NaN.
            base[h] = (mn == -VI_INF) ? 0.f : mn;
            alpha[h] = exp2f(m[h] - base[h]);  // m = -inf -> 0 (o, l are 0 then anyway)
            m[h] = mn;
            l[h] *= alpha[h];
        }
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            o[i][0] *= alpha[0];
            o[i][1] *= alpha[0];
            o[i][2] *= alpha[1];
            o[i][3] *= alpha[1];
        }
        // P = exp2(x - base) as A fragments of the k-steps of P V (n-tiles 2kk, 2kk+1 -> k-step kk).
        uint32_t pa[NKEYS / 16][4];
#pragma unroll
        for (int kk = 0; kk < NKEYS / 16; ++kk) {
            float p[2][4];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    p[u][e] = exp2f(s[2 * kk + u][e] - base[e >> 1]);
                    l[e >> 1] += p[u][e];
                }
            }
            pa[kk][0] = ViMma<T>::pack(p[0][0], p[0][1]);
            pa[kk][1] = ViMma<T>::pack(p[0][2], p[0][3]);
            pa[kk][2] = ViMma<T>::pack(p[1][0], p[1][1]);
            pa[kk][3] = ViMma<T>::pack(p[1][2], p[1][3]);
        }
        // O += P V. ldmatrix x4 .trans matrices: (keys k0..+7, d d0..+7), (k0+8, d0), (k0, d0+8),
        // (k0+8, d0+8) -> b0/b1 of d-tile d0/8 and of d-tile d0/8 + 1.
#pragma unroll
        for (int kk = 0; kk < NKEYS / 16; ++kk) {
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b[4];
                const int mi = lane >> 3;
                vi_ldsm_x4_t(b, vi_smem_addr(sV + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * ldv +
                                             dp * 16 + (mi >> 1) * 8));
                ViMma<T>::mma(o[2 * dp], pa[kk], b[0], b[1]);
                ViMma<T>::mma(o[2 * dp + 1], pa[kk], b[2], b[3]);
            }
        }
    }

    // Full row sums (the 4 threads of a quad hold disjoint columns) and 1/l. A row whose keys were
    // all masked has l = 0 and gets output 0 (the CPU softmax of an all -inf row is all zeros).
    __device__ __forceinline__ void finish(float (&inv)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float t = l[h];
            t += __shfl_xor_sync(0xffffffffu, t, 1);
            t += __shfl_xor_sync(0xffffffffu, t, 2);
            inv[h] = t > 0.f ? 1.f / t : 0.f;
        }
    }

    // Store row r (0..15) of O / l to `out_row(r)` (a pointer to D contiguous elements) if r < rows.
    template <class RowPtr>
    __device__ __forceinline__ void store(int rows, int lane, RowPtr out_row) {
        float inv[2];
        finish(inv);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = (lane >> 2) + h * 8;
            if (r < rows) {
                T* dst = out_row(r);
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    const int d = dt * 8 + (lane & 3) * 2;
                    const uint32_t v =
                        ViMma<T>::pack(o[dt][2 * h] * inv[h], o[dt][2 * h + 1] * inv[h]);
                    *reinterpret_cast<uint32_t*>(dst + d) = v;
                }
            }
        }
    }
};

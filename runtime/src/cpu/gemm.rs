//! Safe wrapper over `gemm::gemm` (f32, arbitrary strides) and the matmul / linear ops.

use gemm::Parallelism;
use rayon::prelude::*;

use super::out;
use crate::{Result, Tensor};

/// A strided matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major view with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }
    /// The transpose of a row-major [cols, rows] matrix with row stride `rs`.
    pub fn trans(data: &'a [f32], rs: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: rs,
        }
    }
}

/// Highest element index touched by an r x c strided matrix, +1 (0 when empty).
fn extent(r: usize, c: usize, rs: usize, cs: usize) -> usize {
    if r == 0 || c == 0 {
        0
    } else {
        (r - 1) * rs + (c - 1) * cs + 1
    }
}

/// Depth of one `gemm::gemm` call: every call sees k <= KC, so the crate uses one depth block
/// (its kc = k) whatever m and n are. The crate's own kc depends on the size class of (m, n)
/// (min(k, 512) for m, n <= 64, a cache-derived split otherwise): an element's summation order, and
/// so its rounding, would depend on how many rows the call holds.
const KC: usize = 512;

/// Fewest rows a `gemm::gemm` call gets: below it (m <= 1, or m * n <= 256) the crate takes its
/// gemv / horizontal-kernel paths, which sum in another order than its main microkernel.
fn min_rows(n: usize) -> usize {
    (256 / n.max(1) + 1).max(2)
}

/// dst[m, n] (row stride `dst_rs`, contiguous rows) = (accumulate ? dst : 0) + lhs[m, k] · rhs[k, n].
/// `parallel`: let gemm use the rayon pool (only from outside a rayon task).
///
/// Batch invariance: row r of the result depends only on row r of lhs, rhs and k, never on m
/// (the bounded-memory schedules chunk frames and CFG rows and must give the same bits;
/// tests/batch_invariance.rs): k is cut into fixed KC blocks accumulated in order, and calls
/// with too few rows for the crate's main kernel are padded with zero rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        extent(m, n, dst_rs, 1) <= dst.len()
            && extent(m, k, lhs.rs, lhs.cs) <= lhs.data.len()
            && extent(k, n, rhs.rs, rhs.cs) <= rhs.data.len(),
        "sgemm: operand slices too short for {m}x{k}x{n}"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let rows = min_rows(n);
    if m < rows {
        // Padded copy: lhs [rows, k] (zero rows below m), dst [rows, n].
        let mut l = vec![0f32; rows * k];
        for r in 0..m {
            for c in 0..k {
                l[r * k + c] = lhs.data[r * lhs.rs + c * lhs.cs];
            }
        }
        let mut d = vec![0f32; rows * n];
        if accumulate {
            for r in 0..m {
                d[r * n..(r + 1) * n].copy_from_slice(&dst[r * dst_rs..r * dst_rs + n]);
            }
        }
        sgemm_blocks(
            rows,
            n,
            k,
            &mut d,
            n,
            Mat::rows(&l, k),
            rhs,
            accumulate,
            parallel,
        );
        for r in 0..m {
            dst[r * dst_rs..r * dst_rs + n].copy_from_slice(&d[r * n..(r + 1) * n]);
        }
        return;
    }
    sgemm_blocks(m, n, k, dst, dst_rs, lhs, rhs, accumulate, parallel);
}

/// [`sgemm`] over depth blocks of KC (m >= [`min_rows`], k >= 1, operands checked).
#[allow(clippy::too_many_arguments)]
fn sgemm_blocks(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    parallel: bool,
) {
    let par = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    let mut k0 = 0;
    while k0 < k {
        let kb = KC.min(k - k0);
        let acc = accumulate || k0 > 0;
        // Offsets of this depth block: lhs columns k0.., rhs rows k0.. (inside the checked
        // extents: k0 + kb <= k).
        let (lo, ro) = (k0 * lhs.cs, k0 * rhs.rs);
        // SAFETY: `sgemm` checked that every element of the m x k lhs, k x n rhs and m x n dst
        // (with their strides) lies inside the corresponding slice; this call touches the
        // sub-block of depth k0..k0 + kb only, starting at the offsets above. `dst` is
        // exclusively borrowed and cannot alias the shared `lhs`/`rhs` slices.
        unsafe {
            gemm::gemm(
                m,
                n,
                kb,
                dst.as_mut_ptr(),
                1,
                dst_rs as isize,
                acc,
                lhs.data.as_ptr().add(lo),
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.data.as_ptr().add(ro),
                rhs.cs as isize,
                rhs.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
        k0 += kb;
    }
}

/// a [batch, M, K] x b [batch_b, K, N] (or [batch_b, N, K] with `trans_b`) -> [batch, M, N].
pub(crate) fn matmul(a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
    let (batch, m, k) = (a.dim(0), a.dim(1), a.dim(2));
    let batch_b = b.dim(0);
    let n = if trans_b { b.dim(1) } else { b.dim(2) };
    let (ad, bd) = (a.as_cpu_f32()?, b.as_cpu_f32()?);
    let (ad, bd) = (&*ad, &*bd);
    let rhs_of = |bi: usize| {
        let s = &bd[bi * k * n..(bi + 1) * k * n];
        if trans_b {
            Mat::trans(s, k)
        } else {
            Mat::rows(s, n)
        }
    };
    let mut o = vec![0f32; batch * m * n];
    if batch_b == 1 || batch == 1 {
        // One GEMM: the batches of `a` stack into rows when b is shared.
        sgemm(
            batch * m,
            n,
            k,
            &mut o,
            n,
            Mat::rows(ad, k),
            rhs_of(0),
            false,
            true,
        );
    } else if batch >= rayon::current_num_threads() && m * n * k < (1 << 21) {
        o.par_chunks_mut(m * n).enumerate().for_each(|(bi, ob)| {
            let lhs = Mat::rows(&ad[bi * m * k..(bi + 1) * m * k], k);
            sgemm(m, n, k, ob, n, lhs, rhs_of(bi), false, false);
        });
    } else {
        for (bi, ob) in o.chunks_mut(m * n).enumerate() {
            let lhs = Mat::rows(&ad[bi * m * k..(bi + 1) * m * k], k);
            sgemm(m, n, k, ob, n, lhs, rhs_of(bi), false, true);
        }
    }
    out(o, &[batch, m, n])
}

/// Fill each row of `dst` ([rows, n]) with `bias` (or zeros).
pub(crate) fn fill_bias(dst: &mut [f32], n: usize, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        dst.par_chunks_mut(n.max(1) * 64)
            .for_each(|c| c.chunks_mut(n).for_each(|r| r.copy_from_slice(b)));
    }
}

/// x [rows, K] · w[N, K]^T + bias[N] -> [rows, N].
pub(crate) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, k) = (x.dim(0), x.dim(1));
    let n = w.dim(0);
    let bias = bias.map(|b| b.as_cpu_f32()).transpose()?;
    let bias = bias.as_deref();
    let mut o = vec![0f32; rows * n];
    fill_bias(&mut o, n, bias);
    sgemm(
        rows,
        n,
        k,
        &mut o,
        n,
        Mat::rows(&x.as_cpu_f32()?, k),
        Mat::trans(&w.as_cpu_f32()?, k),
        bias.is_some(),
        true,
    );
    out(o, &[rows, n])
}

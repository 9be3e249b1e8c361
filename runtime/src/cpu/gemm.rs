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

/// dst[m, n] (row stride `dst_rs`, contiguous rows) = (accumulate ? dst : 0) + lhs[m, k] · rhs[k, n].
/// `parallel`: let gemm use the rayon pool (only from outside a rayon task).
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
    let par = if parallel {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the assert above proves every element gemm reads or writes through these pointers
    // and strides lies inside the corresponding slice; `dst` is exclusively borrowed and cannot
    // alias the shared `lhs`/`rhs` slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
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
}

/// a [batch, M, K] x b [batch_b, K, N] (or [batch_b, N, K] with `trans_b`) -> [batch, M, N].
pub(crate) fn matmul(a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
    let (batch, m, k) = (a.dim(0), a.dim(1), a.dim(2));
    let batch_b = b.dim(0);
    let n = if trans_b { b.dim(1) } else { b.dim(2) };
    let (ad, bd) = (a.as_cpu_f32()?, b.as_cpu_f32()?);
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
    let mut o = vec![0f32; rows * n];
    fill_bias(&mut o, n, bias);
    sgemm(
        rows,
        n,
        k,
        &mut o,
        n,
        Mat::rows(x.as_cpu_f32()?, k),
        Mat::trans(w.as_cpu_f32()?, k),
        bias.is_some(),
        true,
    );
    out(o, &[rows, n])
}

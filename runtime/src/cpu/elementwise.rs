//! Unary ops, GEGLU, affine, clamp and numpy-broadcasting binary ops.

use rayon::prelude::*;

use super::{out, PAR_MIN};
use crate::ops::{geglu_shape, BinaryOp, UnaryOp};
use crate::{Result, Tensor};

/// Exact GELU: x/2 * (1 + erf(x/√2)), written as x/2 * erfc(-x/√2) (no cancellation for x < 0).
#[inline]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * libm::erfcf(-x * std::f32::consts::FRAC_1_SQRT_2)
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// out[i] = f(x[i]), in parallel chunks.
fn map(xd: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut o = vec![0f32; xd.len()];
    o.par_chunks_mut(PAR_MIN)
        .zip(xd.par_chunks(PAR_MIN))
        .for_each(|(oc, xc)| oc.iter_mut().zip(xc).for_each(|(o, &x)| *o = f(x)));
    o
}

pub(crate) fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let o = match op {
        UnaryOp::Silu => map(xd, silu),
        UnaryOp::Gelu => map(xd, gelu),
        UnaryOp::Exp => map(xd, f32::exp),
        UnaryOp::Sqrt => map(xd, f32::sqrt),
        UnaryOp::Neg => map(xd, |v| -v),
    };
    out(o, x.shape())
}

pub(crate) fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    out(map(&x.as_cpu_f32()?, |v| v * mul + add), x.shape())
}

pub(crate) fn clamp(x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    out(map(&x.as_cpu_f32()?, |v| v.max(lo).min(hi)), x.shape())
}

/// x [.., 2N] -> [.., N] = x[.., :N] * gelu(x[.., N:]).
pub(crate) fn geglu(x: &Tensor) -> Result<Tensor> {
    let c2 = x.dim(x.rank() - 1);
    let c = c2 / 2;
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let mut o = vec![0f32; xd.len() / 2];
    if c > 0 {
        o.par_chunks_mut(c)
            .zip(xd.par_chunks(c2))
            .with_min_len((PAR_MIN / c).max(1))
            .for_each(|(orow, xrow)| {
                let (a, g) = xrow.split_at(c);
                for i in 0..c {
                    orow[i] = a[i] * gelu(g[i]);
                }
            });
    }
    out(o, &geglu_shape(x))
}

/// Row-major strides of `shape` aligned to the rank of `out_shape`, 0 on broadcast dims.
fn bcast_strides(shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let r = out_shape.len();
    let off = r - shape.len();
    let mut st = vec![0usize; r];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        st[off + i] = if shape[i] == 1 { 0 } else { acc };
        acc *= shape[i];
    }
    st
}

/// Elementwise a ∘ b with numpy broadcasting to `out_shape`.
pub(crate) fn binary(a: &Tensor, b: &Tensor, op: BinaryOp, out_shape: &[usize]) -> Result<Tensor> {
    // One monomorphised kernel per op (no per-element indirect call).
    match op {
        BinaryOp::Add => binary_with(a, b, out_shape, |x, y| x + y),
        BinaryOp::Sub => binary_with(a, b, out_shape, |x, y| x - y),
        BinaryOp::Mul => binary_with(a, b, out_shape, |x, y| x * y),
        BinaryOp::Div => binary_with(a, b, out_shape, |x, y| x / y),
    }
}

fn binary_with(
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
    f: impl Fn(f32, f32) -> f32 + Sync + Copy,
) -> Result<Tensor> {
    let (ad, bd) = (a.as_cpu_f32()?, b.as_cpu_f32()?);
    let (ad, bd) = (&*ad, &*bd);
    let total: usize = out_shape.iter().product();
    let mut o = vec![0f32; total];
    if total == 0 {
        return out(o, out_shape);
    }
    if ad.len() == total && bd.len() == total {
        // Same shape.
        o.par_chunks_mut(PAR_MIN)
            .zip(ad.par_chunks(PAR_MIN).zip(bd.par_chunks(PAR_MIN)))
            .for_each(|(oc, (ac, bc))| {
                for i in 0..oc.len() {
                    oc[i] = f(ac[i], bc[i]);
                }
            });
        return out(o, out_shape);
    }
    if ad.len() == total && out_shape.ends_with(strip_ones(b.shape())) {
        // b is a trailing block repeated over the leading dims (e.g. a bias vector).
        let m = bd.len();
        o.par_chunks_mut(m)
            .zip(ad.par_chunks(m))
            .with_min_len((PAR_MIN / m).max(1))
            .for_each(|(oc, ac)| {
                for i in 0..m {
                    oc[i] = f(ac[i], bd[i]);
                }
            });
        return out(o, out_shape);
    }
    if bd.len() == total && out_shape.ends_with(strip_ones(a.shape())) {
        let m = ad.len();
        o.par_chunks_mut(m)
            .zip(bd.par_chunks(m))
            .with_min_len((PAR_MIN / m).max(1))
            .for_each(|(oc, bc)| {
                for i in 0..m {
                    oc[i] = f(ad[i], bc[i]);
                }
            });
        return out(o, out_shape);
    }
    // General: rows of the last output dim, each with its own base offsets into a and b.
    let r = out_shape.len();
    let (sa, sb) = (
        bcast_strides(a.shape(), out_shape),
        bcast_strides(b.shape(), out_shape),
    );
    let last = out_shape[r - 1];
    let (la, lb) = (sa[r - 1], sb[r - 1]);
    o.par_chunks_mut(last)
        .enumerate()
        .with_min_len((PAR_MIN / last).max(1))
        .for_each(|(row, oc)| {
            let (mut oa, mut ob) = (0usize, 0usize);
            let mut rem = row;
            for dim in (0..r - 1).rev() {
                let idx = rem % out_shape[dim];
                rem /= out_shape[dim];
                oa += idx * sa[dim];
                ob += idx * sb[dim];
            }
            match (la, lb) {
                (1, 1) => {
                    let (ar, br) = (&ad[oa..oa + last], &bd[ob..ob + last]);
                    for i in 0..last {
                        oc[i] = f(ar[i], br[i]);
                    }
                }
                (1, 0) => {
                    let (ar, bv) = (&ad[oa..oa + last], bd[ob]);
                    for i in 0..last {
                        oc[i] = f(ar[i], bv);
                    }
                }
                (0, 1) => {
                    let (av, br) = (ad[oa], &bd[ob..ob + last]);
                    for i in 0..last {
                        oc[i] = f(av, br[i]);
                    }
                }
                _ => {
                    for (i, x) in oc.iter_mut().enumerate() {
                        *x = f(ad[oa + i * la], bd[ob + i * lb]);
                    }
                }
            }
        });
    out(o, out_shape)
}

/// The shape without its leading size-1 dims.
fn strip_ones(shape: &[usize]) -> &[usize] {
    let lead = shape.iter().take_while(|&&d| d == 1).count();
    &shape[lead..]
}

//! conv2d (im2col on NHWC + GEMM) and temporal_conv (k shifted GEMMs accumulated).

use rayon::prelude::*;

use super::gemm::{fill_bias, sgemm, Mat};
use super::out;
use crate::ops::{Conv2dGeom, TemporalConvGeom};
use crate::{Result, Tensor};

/// Elements of one im2col block; bounds the scratch memory of a convolution (8 MiB).
const COL_BUDGET: usize = 1 << 21;

/// x [N, H, W, Cin], w [Cout, Cin, kh, kw] -> [N, Ho, Wo, Cout], zero padding `g.pad`.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: &Conv2dGeom,
) -> Result<Tensor> {
    let Conv2dGeom {
        n,
        h,
        w: wd,
        cin,
        cout,
        kh,
        kw,
        stride,
        pad,
        ho,
        wo,
    } = *g;
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let wdat = w.as_cpu_f32()?;
    let wdat = &*wdat;
    let bias = bias.map(|b| b.as_cpu_f32()).transpose()?;
    let bias = bias.as_deref();
    let rows = n * ho * wo;
    let mut o = vec![0f32; rows * cout];
    fill_bias(&mut o, cout, bias);
    let acc = bias.is_some();

    if g.is_pointwise() {
        // Pointwise: a plain GEMM against the [Cout, Cin] weight, transposed by strides.
        sgemm(
            rows,
            cout,
            cin,
            &mut o,
            cout,
            Mat::rows(xd, cin),
            Mat::trans(wdat, cin),
            acc,
            true,
        );
        return out(o, &g.out_shape());
    }

    // Weight reordered to [Cout, kh, kw, Cin] so that one im2col row is kh*kw contiguous Cin runs.
    let kk = kh * kw * cin;
    let mut wt = vec![0f32; cout * kk];
    wt.par_chunks_mut(kk).enumerate().for_each(|(co, dst)| {
        let src = &wdat[co * kk..(co + 1) * kk];
        for ci in 0..cin {
            for ky in 0..kh {
                for kx in 0..kw {
                    dst[(ky * kw + kx) * cin + ci] = src[(ci * kh + ky) * kw + kx];
                }
            }
        }
    });

    let block = (COL_BUDGET / kk.max(1)).max(64).min(rows.max(1));
    let mut col = vec![0f32; block * kk];
    for r0 in (0..rows).step_by(block) {
        let mr = block.min(rows - r0);
        col[..mr * kk]
            .par_chunks_mut(kk)
            .enumerate()
            .for_each(|(i, crow)| {
                let r = r0 + i;
                let (ni, rem) = (r / (ho * wo), r % (ho * wo));
                let (oy, ox) = (rem / wo, rem % wo);
                for ky in 0..kh {
                    let iy = (oy * stride + ky) as isize - pad as isize;
                    for kx in 0..kw {
                        let ix = (ox * stride + kx) as isize - pad as isize;
                        let dst = &mut crow[(ky * kw + kx) * cin..(ky * kw + kx + 1) * cin];
                        if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < wd {
                            let s = ((ni * h + iy as usize) * wd + ix as usize) * cin;
                            dst.copy_from_slice(&xd[s..s + cin]);
                        } else {
                            dst.fill(0.0);
                        }
                    }
                }
            });
        sgemm(
            mr,
            cout,
            kk,
            &mut o[r0 * cout..(r0 + mr) * cout],
            cout,
            Mat::rows(&col[..mr * kk], kk),
            Mat::trans(&wt, kk),
            acc,
            true,
        );
    }
    out(o, &g.out_shape())
}

/// x [B, F, S, Cin], w [Cout, Cin, k] (odd k) -> [B, F, S, Cout]; zero padding (k-1)/2 frames.
/// out[b, f] = bias + sum_t x[b, f + t - pad] · w[:, :, t]^T, one GEMM per (b, t) over the valid frames.
pub(crate) fn temporal_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: &TemporalConvGeom,
) -> Result<Tensor> {
    let TemporalConvGeom {
        b,
        f,
        s,
        cin,
        cout,
        k,
        pad,
    } = *g;
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let wdat = w.as_cpu_f32()?;
    let wdat = &*wdat;
    let bias = bias.map(|b| b.as_cpu_f32()).transpose()?;
    let bias = bias.as_deref();
    let mut o = vec![0f32; b * f * s * cout];
    fill_bias(&mut o, cout, bias);
    // `o` starts as bias (or zeros) and every tap accumulates into it.
    for t in 0..k {
        // Output frames fo with 0 <= fo + t - pad < f.
        let f0 = pad.saturating_sub(t);
        let f1 = (f + pad).saturating_sub(t).min(f);
        if f0 >= f1 {
            continue;
        }
        let fi0 = f0 + t - pad;
        // rhs[ci, co] = w[co, ci, t]: row stride k, column stride cin*k.
        let rhs = Mat {
            data: &wdat[t..],
            rs: k,
            cs: cin * k,
        };
        for bi in 0..b {
            let xs = &xd[((bi * f + fi0) * s) * cin..((bi * f + fi0 + f1 - f0) * s) * cin];
            let os = &mut o[((bi * f + f0) * s) * cout..((bi * f + f1) * s) * cout];
            sgemm(
                (f1 - f0) * s,
                cout,
                cin,
                os,
                cout,
                Mat::rows(xs, cin),
                rhs,
                true,
                true,
            );
        }
    }
    out(o, &g.out_shape())
}

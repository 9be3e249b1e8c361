//! Scaled-dot-product attention (blocked per (batch, query block), one [bq, Sk] score block per
//! task) and the dual-scope (banded local + global) attention of Video-Infinity.

use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
use super::norm::softmax_row;
use super::out;
use crate::ops::DualScopeParams;
use crate::{Result, Tensor};

/// Queries per attention task: the score block is at most QBLOCK x Sk floats.
const QBLOCK: usize = 64;

/// q [B, Sq, H, D], k [B, Sk, H, D], v [B, Sk, H, Dv] -> [B, Sq, H, Dv];
/// softmax(q·k * scale + bias[Sq, Sk], causal: keys j > i masked) · v.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    bias: Option<&Tensor>,
    causal: bool,
) -> Result<Tensor> {
    let (b, sq, h, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (sk, dv) = (k.dim(1), v.dim(3));
    let (qd, kd, vd) = (q.as_cpu_f32()?, k.as_cpu_f32()?, v.as_cpu_f32()?);
    let bias = bias.map(|t| t.as_cpu_f32()).transpose()?;
    let mut o = vec![0f32; b * sq * h * dv];
    if o.is_empty() {
        return out(o, &[b, sq, h, dv]);
    }
    let qrow = h * d;
    let orow = h * dv;
    o.par_chunks_mut(sq * orow)
        .enumerate()
        .for_each(|(bi, ob)| {
            ob.par_chunks_mut(QBLOCK * orow)
                .enumerate()
                .for_each(|(blk, oblk)| {
                    let i0 = blk * QBLOCK;
                    let bq = oblk.len() / orow;
                    // Causal: no query of this block sees keys >= i0 + bq.
                    let nk = if causal { sk.min(i0 + bq) } else { sk };
                    let mut s = vec![0f32; bq * nk];
                    for hi in 0..h {
                        let qs = &qd[(bi * sq + i0) * qrow + hi * d..];
                        let ks = &kd[bi * sk * qrow + hi * d..];
                        sgemm(
                            bq,
                            nk,
                            d,
                            &mut s,
                            nk,
                            Mat::rows(qs, qrow),
                            Mat::trans(ks, qrow),
                            false,
                            false,
                        );
                        for (r, srow) in s.chunks_exact_mut(nk.max(1)).enumerate() {
                            let i = i0 + r;
                            match bias {
                                Some(bm) => {
                                    let brow = &bm[i * sk..i * sk + nk];
                                    for (x, &bb) in srow.iter_mut().zip(brow) {
                                        *x = *x * scale + bb;
                                    }
                                }
                                None => srow.iter_mut().for_each(|x| *x *= scale),
                            }
                            if causal {
                                srow[(i + 1).min(nk)..].fill(f32::NEG_INFINITY);
                            }
                            softmax_row(srow);
                        }
                        let vs = &vd[bi * sk * orow + hi * dv..];
                        sgemm(
                            bq,
                            dv,
                            nk,
                            &mut oblk[hi * dv..],
                            orow,
                            Mat::rows(&s, nk),
                            Mat::rows(vs, orow),
                            false,
                            false,
                        );
                    }
                });
        });
    out(o, &[b, sq, h, dv])
}

/// Dot product with 8 independent accumulators (vectorisable).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// q [b, n, H, D]; k_local/v_local [b, n + 2p, H, D]; k_glob/v_glob [b, G, H, D] -> [b, n, H, D].
/// Query i sees local rows i ..= i+2p (+local_bias) and all G global rows (+global_bias); logits use
/// scale * ln(2p+1+G)/ln(16) with `token_num_scale`. Only the 2p+1+G visible logits are formed.
pub(crate) fn dual_scope_attention(
    q: &Tensor,
    k_local: &Tensor,
    v_local: &Tensor,
    k_glob: &Tensor,
    v_glob: &Tensor,
    p: &DualScopeParams,
) -> Result<Tensor> {
    let (b, n, h, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let g = k_glob.dim(1);
    let win = 2 * p.pad + 1;
    let nl = n + 2 * p.pad;
    let visible = win + g;
    let scale = if p.token_num_scale {
        p.scale * ((visible as f32).ln() / 16f32.ln())
    } else {
        p.scale
    };
    let (qd, kl, vl) = (
        q.as_cpu_f32()?,
        k_local.as_cpu_f32()?,
        v_local.as_cpu_f32()?,
    );
    let (kg, vg) = (k_glob.as_cpu_f32()?, v_glob.as_cpu_f32()?);
    let row = h * d;
    let mut o = vec![0f32; b * n * row];
    if o.is_empty() {
        return out(o, &[b, n, h, d]);
    }
    o.par_chunks_mut(n * row).enumerate().for_each(|(bi, ob)| {
        let mut logits = vec![0f32; visible];
        for i in 0..n {
            for hi in 0..h {
                let qv = &qd[(bi * n + i) * row + hi * d..][..d];
                let local = |t: usize| (bi * nl + i + t) * row + hi * d;
                let glob = |j: usize| (bi * g + j) * row + hi * d;
                for t in 0..win {
                    logits[t] = dot(qv, &kl[local(t)..][..d]) * scale + p.local_bias;
                }
                for j in 0..g {
                    logits[win + j] = dot(qv, &kg[glob(j)..][..d]) * scale + p.global_bias;
                }
                softmax_row(&mut logits);
                let dst = &mut ob[i * row + hi * d..][..d];
                dst.fill(0.0);
                for t in 0..win {
                    let (w, vr) = (logits[t], &vl[local(t)..][..d]);
                    dst.iter_mut().zip(vr).for_each(|(o, &x)| *o += w * x);
                }
                for j in 0..g {
                    let (w, vr) = (logits[win + j], &vg[glob(j)..][..d]);
                    dst.iter_mut().zip(vr).for_each(|(o, &x)| *o += w * x);
                }
            }
        }
    });
    out(o, &[b, n, h, d])
}

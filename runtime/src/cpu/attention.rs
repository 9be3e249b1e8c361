//! Scaled-dot-product attention (blocked per (batch, query block), one [bq, Sk] score block per
//! task) and the dual-scope (banded local + global) attention of Video-Infinity.

use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
use super::norm::softmax_row;
use super::out;
use crate::ops::{attention_shape, DualScopeParams};
use crate::{Result, Tensor};

/// Floats of one attention score block ([bq, Sk], one per task at a time).
const SCORE_BLOCK: usize = 1 << 16;

/// Queries per attention task: about SCORE_BLOCK / Sk (16..=256), smaller while there would be
/// fewer than 4 tasks per thread.
fn query_block(b: usize, sq: usize, sk: usize) -> usize {
    let mut bq = (SCORE_BLOCK / sk.max(1)).clamp(16, 256);
    let want = 4 * rayon::current_num_threads();
    while bq > 16 && b * sq.div_ceil(bq) < want {
        bq /= 2;
    }
    bq.min(sq.max(1))
}

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
    let (qd, kd, vd) = (&*qd, &*kd, &*vd);
    let bias = bias.map(|t| t.as_cpu_f32()).transpose()?;
    let bias = bias.as_deref();
    let mut o = vec![0f32; b * sq * h * dv];
    if o.is_empty() {
        return out(o, &attention_shape(q, v));
    }
    let qrow = h * d;
    let orow = h * dv;
    let qblock = query_block(b, sq, sk);
    o.par_chunks_mut(sq * orow)
        .enumerate()
        .for_each(|(bi, ob)| {
            ob.par_chunks_mut(qblock * orow)
                .enumerate()
                .for_each(|(blk, oblk)| {
                    let i0 = blk * qblock;
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
    out(o, &attention_shape(q, v))
}

/// Queries per dual-scope block: the block's local keys are the QBLOCK_DS + 2p rows it can see.
const QBLOCK_DS: usize = 16;

/// q [b, n, H, D]; k_local/v_local [b, n + 2p, H, D]; k_glob/v_glob [b, G, H, D] -> [b, n, H, D].
/// Query i sees local rows i ..= i+2p (+local_bias) and all G global rows (+global_bias); logits use
/// scale * ln(2p+1+G)/ln(16) with `token_num_scale`; the softmax runs over those 2p+1+G logits only.
/// Per (b, head, block of queries) the scores against the block's local window and the global rows
/// come from GEMMs; columns outside each query's band are zeroed before the P·V GEMM (no dense mask
/// over the whole sequence is ever formed).
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
    let scale = if p.token_num_scale {
        p.scale * (((win + g) as f32).ln() / 16f32.ln())
    } else {
        p.scale
    };
    let (qd, kl, vl) = (
        q.as_cpu_f32()?,
        k_local.as_cpu_f32()?,
        v_local.as_cpu_f32()?,
    );
    let (qd, kl, vl) = (&*qd, &*kl, &*vl);
    let (kg, vg) = (k_glob.as_cpu_f32()?, v_glob.as_cpu_f32()?);
    let (kg, vg) = (&*kg, &*vg);
    let row = h * d;
    let mut o = vec![0f32; b * n * row];
    if o.is_empty() {
        return out(o, &[b, n, h, d]);
    }
    o.par_chunks_mut(n * row).enumerate().for_each(|(bi, ob)| {
        let wl = QBLOCK_DS.min(n) + 2 * p.pad; // local rows seen by a full block
        let mut sl = vec![0f32; QBLOCK_DS.min(n) * wl];
        let mut sg = vec![0f32; QBLOCK_DS.min(n) * g];
        let mut logits = vec![0f32; win + g];
        for i0 in (0..n).step_by(QBLOCK_DS) {
            let nb = QBLOCK_DS.min(n - i0);
            let w = nb + 2 * p.pad; // local rows i0 .. i0 + w
            let qs = &qd[(bi * n + i0) * row..];
            let ob = &mut ob[i0 * row..];
            for hi in 0..h {
                let lq = Mat::rows(&qs[hi * d..], row);
                let kls = &kl[(bi * nl + i0) * row + hi * d..];
                let vls = &vl[(bi * nl + i0) * row + hi * d..];
                sgemm(nb, w, d, &mut sl, w, lq, Mat::trans(kls, row), false, false);
                if g > 0 {
                    let kgs = &kg[bi * g * row + hi * d..];
                    sgemm(nb, g, d, &mut sg, g, lq, Mat::trans(kgs, row), false, false);
                }
                for r in 0..nb {
                    // Query i0 + r sees local columns r ..= r + 2p of this block's window.
                    let srow = &mut sl[r * w..(r + 1) * w];
                    let grow = &mut sg[r * g..(r + 1) * g];
                    for t in 0..win {
                        logits[t] = srow[r + t] * scale + p.local_bias;
                    }
                    for j in 0..g {
                        logits[win + j] = grow[j] * scale + p.global_bias;
                    }
                    softmax_row(&mut logits);
                    srow.fill(0.0);
                    srow[r..r + win].copy_from_slice(&logits[..win]);
                    grow.copy_from_slice(&logits[win..]);
                }
                let dst = &mut ob[hi * d..];
                sgemm(
                    nb,
                    d,
                    w,
                    dst,
                    row,
                    Mat::rows(&sl, w),
                    Mat::rows(vls, row),
                    false,
                    false,
                );
                if g > 0 {
                    let vgs = &vg[bi * g * row + hi * d..];
                    sgemm(
                        nb,
                        d,
                        g,
                        dst,
                        row,
                        Mat::rows(&sg, g),
                        Mat::rows(vgs, row),
                        true,
                        false,
                    );
                }
            }
        }
    });
    out(o, &[b, n, h, d])
}

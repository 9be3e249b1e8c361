//! GroupNorm (statistics in f64, chunked two-pass + Chan merge), LayerNorm, softmax.

use rayon::prelude::*;

use super::{out, PAR_MIN};
use crate::ops::GroupNormParams;
use crate::{Result, Tensor};

/// Elements per statistics chunk (one chunk is read twice while it is in cache).
const STAT_CHUNK: usize = 1 << 14;

/// (count, mean, M2) of one group, f64.
#[derive(Clone, Copy, Default)]
struct Moments {
    count: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// Chan et al. parallel combination.
    fn merge(self, o: Moments) -> Moments {
        let count = self.count + o.count;
        if count == 0.0 {
            return Moments::default();
        }
        let delta = o.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * o.count / count,
            m2: self.m2 + o.m2 + delta * delta * self.count * o.count / count,
        }
    }
}

/// Per (n, group) moments of x [N, S, C] over S x C/G, returned as N*G entries.
fn moments(xd: &[f32], n: usize, s: usize, c: usize, g: usize) -> Vec<Moments> {
    let cg = c / g;
    let chunk_rows = (STAT_CHUNK / c.max(1)).max(1);
    let chunks = s.div_ceil(chunk_rows).max(1);
    // One entry per (n, chunk): G moments each, computed by two passes over the chunk.
    let parts: Vec<Vec<Moments>> = (0..n * chunks)
        .into_par_iter()
        .map(|job| {
            let (ni, ci) = (job / chunks, job % chunks);
            let r0 = ci * chunk_rows;
            let r1 = (r0 + chunk_rows).min(s);
            let rows = &xd[(ni * s + r0) * c..(ni * s + r1) * c];
            let mut sum = vec![0f64; g];
            for row in rows.chunks_exact(c) {
                for (gi, grp) in row.chunks_exact(cg).enumerate() {
                    sum[gi] += grp.iter().map(|&v| v as f64).sum::<f64>();
                }
            }
            let count = ((r1 - r0) * cg) as f64;
            let mean: Vec<f64> = sum
                .iter()
                .map(|&t| if count > 0.0 { t / count } else { 0.0 })
                .collect();
            let mut m2 = vec![0f64; g];
            for row in rows.chunks_exact(c) {
                for (gi, grp) in row.chunks_exact(cg).enumerate() {
                    let m = mean[gi];
                    m2[gi] += grp
                        .iter()
                        .map(|&v| {
                            let d = v as f64 - m;
                            d * d
                        })
                        .sum::<f64>();
                }
            }
            (0..g)
                .map(|gi| Moments {
                    count,
                    mean: mean[gi],
                    m2: m2[gi],
                })
                .collect()
        })
        .collect();
    let mut res = vec![Moments::default(); n * g];
    for (job, part) in parts.iter().enumerate() {
        let ni = job / chunks;
        for gi in 0..g {
            res[ni * g + gi] = res[ni * g + gi].merge(part[gi]);
        }
    }
    res
}

/// x [N, S, C] -> [N, G, 3] = (count, mean, M2).
pub(crate) fn group_norm_stats(x: &Tensor, groups: usize) -> Result<Tensor> {
    let (n, s, c) = (x.dim(0), x.dim(1), x.dim(2));
    let m = moments(&x.as_cpu_f32()?, n, s, c, groups);
    let o = m
        .iter()
        .flat_map(|m| [m.count as f32, m.mean as f32, m.m2 as f32])
        .collect();
    out(o, &[n, groups, 3])
}

/// y = (x - mean) * (gamma / sqrt(var + eps)) + beta, optional SiLU; `mv` = (mean, biased var) per (n, g).
fn apply(
    xd: &[f32],
    (n, s, c): (usize, usize, usize),
    g: usize,
    mv: &[(f64, f64)],
    p: &GroupNormParams,
) -> Result<Vec<f32>> {
    let (gamma, beta) = (p.gamma.as_cpu_f32()?, p.beta.as_cpu_f32()?);
    let (gamma, beta) = (&*gamma, &*beta);
    let (eps, silu) = (p.eps, p.silu);
    let cg = c / g;
    // Per (n, channel): the mean and the scale gamma * rstd.
    let mut mean = vec![0f32; n * c];
    let mut scale = vec![0f32; n * c];
    for ni in 0..n {
        for ch in 0..c {
            let (m, v) = mv[ni * g + ch / cg];
            mean[ni * c + ch] = m as f32;
            scale[ni * c + ch] = (gamma[ch] as f64 / (v + eps as f64).sqrt()) as f32;
        }
    }
    let mut o = vec![0f32; n * s * c];
    if c == 0 {
        return Ok(o);
    }
    let rows_per_task = (PAR_MIN / c).max(1);
    o.par_chunks_mut(rows_per_task * c)
        .enumerate()
        .for_each(|(t, oc)| {
            let r0 = t * rows_per_task;
            for (i, orow) in oc.chunks_exact_mut(c).enumerate() {
                let r = r0 + i;
                let ni = r / s.max(1);
                let xrow = &xd[r * c..(r + 1) * c];
                let (m, a) = (&mean[ni * c..(ni + 1) * c], &scale[ni * c..(ni + 1) * c]);
                for ch in 0..c {
                    let y = (xrow[ch] - m[ch]) * a[ch] + beta[ch];
                    orow[ch] = if silu { y / (1.0 + (-y).exp()) } else { y };
                }
            }
        });
    Ok(o)
}

/// Normalise x [N, S, C] with stats [N, G, 2] = (mean, biased var).
pub(crate) fn group_norm_apply(x: &Tensor, stats: &Tensor, p: &GroupNormParams) -> Result<Tensor> {
    let (n, s, c) = (x.dim(0), x.dim(1), x.dim(2));
    let g = stats.dim(1);
    let mv: Vec<(f64, f64)> = stats
        .as_cpu_f32()?
        .chunks_exact(2)
        .map(|p| (p[0] as f64, p[1] as f64))
        .collect();
    let o = apply(&x.as_cpu_f32()?, (n, s, c), g, &mv, p)?;
    out(o, &[n, s, c])
}

/// GroupNorm of x [N, S, C] (statistics per n and group over S x C/G), optionally fused SiLU.
pub(crate) fn group_norm(x: &Tensor, groups: usize, p: &GroupNormParams) -> Result<Tensor> {
    let (n, s, c) = (x.dim(0), x.dim(1), x.dim(2));
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let mv: Vec<(f64, f64)> = moments(xd, n, s, c, groups)
        .iter()
        .map(|m| {
            let var = if m.count > 0.0 { m.m2 / m.count } else { 0.0 };
            (m.mean, var)
        })
        .collect();
    let o = apply(xd, (n, s, c), groups, &mv, p)?;
    out(o, &[n, s, c])
}

/// LayerNorm over the last dim (f64 two-pass statistics per row).
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let c = x.dim(x.rank() - 1);
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let (gm, bt) = (gamma.as_cpu_f32()?, beta.as_cpu_f32()?);
    let (gm, bt) = (&*gm, &*bt);
    let mut o = vec![0f32; xd.len()];
    if c > 0 {
        o.par_chunks_mut(c)
            .zip(xd.par_chunks(c))
            .with_min_len((PAR_MIN / c).max(1))
            .for_each(|(orow, xrow)| {
                let mean = xrow.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                let var = xrow
                    .iter()
                    .map(|&v| {
                        let d = v as f64 - mean;
                        d * d
                    })
                    .sum::<f64>()
                    / c as f64;
                let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
                let mean = mean as f32;
                for i in 0..c {
                    orow[i] = (xrow[i] - mean) * rstd * gm[i] + bt[i];
                }
            });
    }
    out(o, x.shape())
}

/// Numerically stable softmax of one row, in place (a row of all -inf becomes zeros).
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Softmax over the last dim.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let mut o = x.as_cpu_f32()?.to_vec();
    let c = if x.rank() == 0 {
        1
    } else {
        x.dim(x.rank() - 1)
    };
    if c > 0 {
        o.par_chunks_mut(c)
            .with_min_len((PAR_MIN / c).max(1))
            .for_each(softmax_row);
    }
    out(o, x.shape())
}

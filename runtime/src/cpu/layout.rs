//! Data movement: concat, index_select, permute, nearest x2 upsampling, embedding.

use rayon::prelude::*;

use super::{out, PAR_MIN};
use crate::ops::{concat_shape, index_select_shape, permute_shape, upsample_nearest2x_shape};
use crate::{Result, Tensor};

/// Concatenate along `axis`: per outer index, each input contributes dim_i * inner contiguous elements.
pub(crate) fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    let shape0 = xs[0].shape();
    let outer: usize = shape0[..axis].iter().product();
    let inner: usize = shape0[axis + 1..].iter().product();
    let datas = xs
        .iter()
        .map(|t| t.as_cpu_f32())
        .collect::<Result<Vec<_>>>()?;
    let parts: Vec<usize> = xs.iter().map(|t| t.dim(axis) * inner).collect();
    let row: usize = parts.iter().sum();
    let mut o = vec![0f32; outer * row];
    if row > 0 {
        o.par_chunks_mut(row)
            .enumerate()
            .with_min_len((PAR_MIN / row).max(1))
            .for_each(|(i, orow)| {
                let mut off = 0;
                for (d, &len) in datas.iter().zip(&parts) {
                    orow[off..off + len].copy_from_slice(&d[i * len..(i + 1) * len]);
                    off += len;
                }
            });
    }
    out(o, &concat_shape(xs, axis))
}

/// Take `indices` along `axis`.
pub(crate) fn index_select(x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor> {
    let shape = x.shape();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let dim = shape[axis];
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let row = indices.len() * inner;
    let mut o = vec![0f32; outer * row];
    if row > 0 {
        o.par_chunks_mut(row)
            .enumerate()
            .with_min_len((PAR_MIN / row).max(1))
            .for_each(|(i, orow)| {
                for (j, &idx) in indices.iter().enumerate() {
                    let s = (i * dim + idx) * inner;
                    orow[j * inner..(j + 1) * inner].copy_from_slice(&xd[s..s + inner]);
                }
            });
    }
    out(o, &index_select_shape(x, axis, indices.len()))
}

/// Contiguous copy with out.dim(i) = x.dim(perm[i]).
pub(crate) fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let shape = x.shape();
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let oshape = permute_shape(x, perm);
    let total = xd.len();
    let mut o = vec![0f32; total];
    if total == 0 {
        return out(o, &oshape);
    }
    // Input strides, then merge output dims that stay adjacent and in order in the input
    // (fewer, longer loops); dims of size 1 are dropped.
    let mut in_st = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        in_st[i] = in_st[i + 1] * shape[i + 1];
    }
    let mut dims: Vec<(usize, usize)> = Vec::new(); // (size, input stride), output order
    for &p in perm {
        let (sz, st) = (shape[p], in_st[p]);
        if sz == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == st * sz => *last = (last.0 * sz, st),
            _ => dims.push((sz, st)),
        }
    }
    if dims.is_empty() {
        o.copy_from_slice(xd);
        return out(o, &oshape);
    }
    let r = dims.len();
    let (last, lst) = dims[r - 1];
    o.par_chunks_mut(last)
        .enumerate()
        .with_min_len((PAR_MIN / last).max(1))
        .for_each(|(row, oc)| {
            let mut base = 0usize;
            let mut rem = row;
            for &(sz, st) in dims[..r - 1].iter().rev() {
                base += (rem % sz) * st;
                rem /= sz;
            }
            if lst == 1 {
                oc.copy_from_slice(&xd[base..base + last]);
            } else {
                for (i, v) in oc.iter_mut().enumerate() {
                    *v = xd[base + i * lst];
                }
            }
        });
    out(o, &oshape)
}

/// x [N, H, W, C] -> [N, 2H, 2W, C], nearest.
pub(crate) fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let xd = x.as_cpu_f32()?;
    let xd = &*xd;
    let orow = 2 * w * c;
    let mut o = vec![0f32; n * 2 * h * orow];
    if orow > 0 {
        o.par_chunks_mut(orow)
            .enumerate()
            .with_min_len((PAR_MIN / orow).max(1))
            .for_each(|(r, oc)| {
                let (ni, oy) = (r / (2 * h), r % (2 * h));
                let src = &xd[(ni * h + oy / 2) * w * c..][..w * c];
                for (ox, px) in oc.chunks_exact_mut(c.max(1)).enumerate() {
                    px.copy_from_slice(&src[(ox / 2) * c..(ox / 2 + 1) * c]);
                }
            });
    }
    out(o, &upsample_nearest2x_shape(x))
}

/// Rows of `table` [V, C] -> [ids.len(), C].
pub(crate) fn embedding(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    let c = table.dim(1);
    let td = table.as_cpu_f32()?;
    let td = &*td;
    let mut o = vec![0f32; ids.len() * c];
    for (orow, &id) in o.chunks_exact_mut(c.max(1)).zip(ids) {
        let s = id as usize * c;
        orow.copy_from_slice(&td[s..s + c]);
    }
    out(o, &[ids.len(), c])
}

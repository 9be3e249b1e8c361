//! Data movement: concat, index_select/narrow/split, permute, upsampling, embedding lookup, and the
//! sinusoidal timestep embedding.

use super::{backend, expect_rank, same_device_dtype};
use crate::{DType, Device, Error, Result, Tensor};

/// Output shape of [`concat`]: the inputs' common shape with `axis` the sum of theirs.
pub(crate) fn concat_shape(xs: &[&Tensor], axis: usize) -> Vec<usize> {
    let mut shape = xs[0].shape().to_vec();
    shape[axis] = xs.iter().map(|t| t.dim(axis)).sum();
    shape
}

/// Output shape of [`index_select`]: x's shape with `axis` of length `len` (the number of indices).
pub(crate) fn index_select_shape(x: &Tensor, axis: usize, len: usize) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    shape
}

/// Output shape of [`permute`]: out.dim(i) = x.dim(perm[i]).
pub(crate) fn permute_shape(x: &Tensor, perm: &[usize]) -> Vec<usize> {
    perm.iter().map(|&p| x.dim(p)).collect()
}

/// Output shape of [`upsample_nearest2x`]: [N, H, W, C] -> [N, 2H, 2W, C].
pub(crate) fn upsample_nearest2x_shape(x: &Tensor) -> [usize; 4] {
    [x.dim(0), 2 * x.dim(1), 2 * x.dim(2), x.dim(3)]
}

/// Concatenate along `axis`.
pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    const OP: &str = "concat";
    let first = xs.first().ok_or_else(|| Error::shape(OP, "no tensors"))?;
    same_device_dtype(OP, xs)?;
    if axis >= first.rank() {
        return Err(Error::shape(
            OP,
            format!("axis {axis} for {:?}", first.shape()),
        ));
    }
    for t in xs {
        let ok = t.rank() == first.rank()
            && (0..t.rank()).all(|d| d == axis || t.dim(d) == first.dim(d));
        if !ok {
            return Err(Error::shape(
                OP,
                format!("{:?} vs {:?} along axis {axis}", first.shape(), t.shape()),
            ));
        }
    }
    if xs.len() == 1 {
        return Ok((*first).clone());
    }
    backend(first, OP)?.concat(xs, axis)
}

/// Take `indices` along `axis`.
pub fn index_select(x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor> {
    const OP: &str = "index_select";
    if axis >= x.rank() || indices.iter().any(|&i| i >= x.dim(axis)) {
        return Err(Error::shape(
            OP,
            format!("indices {indices:?} on axis {axis} of {:?}", x.shape()),
        ));
    }
    backend(x, OP)?.index_select(x, axis, indices)
}

/// Elements start .. start+len along `axis` (a copy).
pub fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    if axis >= x.rank() || start + len > x.dim(axis) {
        return Err(Error::shape(
            "narrow",
            format!("{start}+{len} on axis {axis} of {:?}", x.shape()),
        ));
    }
    if start == 0 && len == x.dim(axis) {
        return Ok(x.clone());
    }
    if x.device() == crate::Device::Meta {
        // Read like the real copy does (an offloaded x is restored: crate::offload).
        crate::meta::touch(&[x])?;
        // What index_select returns on meta, without an index list as long as the range (the
        // planner's dry runs narrow huge shape-only tensors).
        let mut shape = x.shape().to_vec();
        shape[axis] = len;
        return Ok(crate::meta::tracked(&shape, x.dtype()));
    }
    let idx: Vec<usize> = (start..start + len).collect();
    index_select(x, axis, &idx)
}

/// Split into pieces of the given sizes along `axis`.
pub fn split(x: &Tensor, axis: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for &s in sizes {
        out.push(narrow(x, axis, start, s)?);
        start += s;
    }
    if axis < x.rank() && start != x.dim(axis) {
        return Err(Error::shape(
            "split",
            format!(
                "sizes {sizes:?} do not cover axis {axis} of {:?}",
                x.shape()
            ),
        ));
    }
    Ok(out)
}

/// Contiguous copy with permuted dims: out.dim(i) = x.dim(perm[i]).
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    const OP: &str = "permute";
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank()
        || perm
            .iter()
            .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
    {
        return Err(Error::shape(
            OP,
            format!("perm {perm:?} for {:?}", x.shape()),
        ));
    }
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(x.clone());
    }
    backend(x, OP)?.permute(x, perm)
}

/// Nearest-neighbour x2 upsampling, channels-last: [N, H, W, C] -> [N, 2H, 2W, C].
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    expect_rank("upsample_nearest2x", "x", x, 4)?;
    backend(x, "upsample_nearest2x")?.upsample_nearest2x(x)
}

/// Embedding lookup: rows of table [V, C] -> [ids.len(), C].
pub fn embedding(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    expect_rank(OP, "table", table, 2)?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= table.dim(0)) {
        return Err(Error::shape(
            OP,
            format!("id {bad} out of range for a table of {} rows", table.dim(0)),
        ));
    }
    backend(table, OP)?.embedding(ids, table)
}

/// The sinusoids of [`timestep_embedding`] (diffusers `get_timestep_embedding`, float32): `dim`
/// channels, half = dim/2, freq_i = exp(-ln(10000) * i / (half - shift)), arg = t * freq_i; each
/// row [sin, cos], or [cos, sin] with `flip_sin_to_cos`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimestepEmbedding {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub shift: f32,
}

/// Sinusoidal embedding of the timesteps `t` (see [`TimestepEmbedding`]): [t.len(), p.dim] on
/// `device`, computed in f32 and stored as `dtype`.
pub fn timestep_embedding(
    t: &[f32],
    p: &TimestepEmbedding,
    device: Device,
    dtype: DType,
) -> Result<Tensor> {
    let TimestepEmbedding {
        dim,
        flip_sin_to_cos,
        shift,
    } = *p;
    let half = dim / 2;
    let mut out = vec![0f32; t.len() * dim];
    for (r, &tv) in t.iter().enumerate() {
        for i in 0..half {
            let exponent = -(10000f32.ln()) * i as f32 / (half as f32 - shift);
            let arg = tv * exponent.exp();
            let (s, c) = (arg.sin(), arg.cos());
            let row = &mut out[r * dim..(r + 1) * dim];
            if flip_sin_to_cos {
                row[i] = c;
                row[half + i] = s;
            } else {
                row[i] = s;
                row[half + i] = c;
            }
        }
    }
    Tensor::from_slice_on(&out, &[t.len(), dim], device, dtype)
}

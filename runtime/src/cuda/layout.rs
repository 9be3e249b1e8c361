//! Launchers of `cuda/kernels/layout.cu`: permute, concat, index_select / narrow, nearest 2x
//! upsampling, embedding. The kernels only move bytes, so they are selected by unit size: `_b2` for
//! bf16/f16, `_b4` for f32, `_b16` (16-byte vectors) whenever the innermost contiguous run, every
//! stride and every address are multiples of 16 bytes (channels-last tensors with C % 8 == 0).

use cudarc::driver::PushKernelArg;

use super::device::{cuda_err, storage, CudaDevice};
use super::launch::{cfg_1d, coalesce, divisible, launch, Dims};
use crate::ops::{concat_shape, index_select_shape, permute_shape, upsample_nearest2x_shape};
use crate::{DType, Result, Tensor};

const MODULE: &str = "layout";
const BLOCK: u32 = 256;

fn sfx(d: DType) -> &'static str {
    match d.size_in_bytes() {
        2 => "b2",
        _ => "b4",
    }
}

/// (kernel suffix, elements per unit): 16-byte units when `vec_ok(elements per 16 bytes)` holds.
fn unit(dtype: DType, vec_ok: impl Fn(usize) -> bool) -> (&'static str, usize) {
    let v = 16 / dtype.size_in_bytes();
    if vec_ok(v) {
        ("b16", v)
    } else {
        (sfx(dtype), 1)
    }
}

/// y[r * ldy + c] = x[r * ldx + c] for r < rows, c < cols (addresses in bytes, sizes in elements).
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy2d(
    dev: &CudaDevice,
    dtype: DType,
    x: u64,
    y: u64,
    rows: usize,
    cols: usize,
    ldx: usize,
    ldy: usize,
) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let (s, v) = unit(dtype, |v| {
        divisible(cols, v)
            && divisible(ldx, v)
            && divisible(ldy, v)
            && divisible(x as usize, 16)
            && divisible(y as usize, 16)
    });
    let (cols, ldx, ldy) = (cols / v, ldx / v, ldy / v);
    let n = rows * cols;
    let k = format!("copy2d_{s}");
    let f = dev.func(MODULE, &k)?;
    let (r, c, lx, ly) = (rows as i64, cols as i64, ldx as i64, ldy as i64);
    // SAFETY: the callers guarantee both 2-D regions lie inside their buffers.
    unsafe {
        launch(dev, &f, cfg_1d(n, BLOCK), &k, |b| {
            b.arg(&x).arg(&y).arg(&r).arg(&c).arg(&lx).arg(&ly);
        })
    }?;
    Ok(())
}

pub(crate) fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    const OP: &str = "concat";
    let first = xs[0];
    let dev = storage(first, OP)?.dev().clone();
    let outer: usize = first.shape()[..axis].iter().product();
    let inner: usize = first.shape()[axis + 1..].iter().product();
    let shape = concat_shape(xs, axis);
    let total = shape[axis];
    let out = dev.alloc(first.dtype(), outer * total * inner)?;
    let mut offset = 0;
    for t in xs {
        let s = storage(t, OP)?;
        let cols = t.dim(axis) * inner;
        copy2d(
            &dev,
            t.dtype(),
            s.ptr(),
            out.ptr_at(offset),
            outer,
            cols,
            cols,
            total * inner,
        )?;
        offset += cols;
    }
    Ok(out.into_tensor(&shape))
}

pub(crate) fn index_select(x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor> {
    const OP: &str = "index_select";
    let sx = storage(x, OP)?;
    let dev = sx.dev().clone();
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis + 1..].iter().product();
    let len = indices.len();
    let shape = index_select_shape(x, axis, len);
    let out = dev.alloc(x.dtype(), outer * len * inner)?;
    if outer * len * inner == 0 {
        return Ok(out.into_tensor(&shape));
    }
    let contiguous = indices.windows(2).all(|w| w[1] == w[0] + 1);
    if contiguous {
        // narrow: one strided 2-D copy.
        copy2d(
            &dev,
            x.dtype(),
            sx.ptr_at(indices[0] * inner),
            out.ptr(),
            outer,
            len * inner,
            x.dim(axis) * inner,
            len * inner,
        )?;
    } else {
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        gather(
            &dev,
            x.dtype(),
            sx.ptr(),
            out.ptr(),
            &idx,
            outer,
            x.dim(axis),
            inner,
        )?;
    }
    Ok(out.into_tensor(&shape))
}

/// Up to 64 gather indices passed by value (`struct Idx64` in cuda/kernels/layout.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct Idx64 {
    v: [u32; 64],
}

// SAFETY: plain-old-data with exactly the layout of the C struct `Idx64 { uint32_t v[64]; }`.
unsafe impl cudarc::driver::DeviceRepr for Idx64 {}

/// y[o, j, :] = x[o, idx[j], :] with x viewed as [outer, axis, inner].
#[allow(clippy::too_many_arguments)]
fn gather(
    dev: &CudaDevice,
    dtype: DType,
    x: u64,
    y: u64,
    idx: &[u32],
    outer: usize,
    axis: usize,
    inner: usize,
) -> Result<()> {
    let (s, v) = unit(dtype, |v| {
        divisible(inner, v) && divisible(x as usize, 16) && divisible(y as usize, 16)
    });
    let inner = inner / v;
    let n = outer * idx.len() * inner;
    let (o, a, ni, inn) = (outer as i64, axis as i64, idx.len() as i64, inner as i64);
    if idx.len() <= 64 {
        let mut small = Idx64 { v: [0; 64] };
        small.v[..idx.len()].copy_from_slice(idx);
        let k = format!("index_select_small_{s}");
        let f = dev.func(MODULE, &k)?;
        // SAFETY: every index is < axis (validated by ops); y holds outer * n_idx * inner units.
        unsafe {
            launch(dev, &f, cfg_1d(n, BLOCK), &k, |b| {
                b.arg(&x)
                    .arg(&y)
                    .arg(&small)
                    .arg(&o)
                    .arg(&a)
                    .arg(&ni)
                    .arg(&inn);
            })
        }?;
        return Ok(());
    }
    let ids = dev
        .stream()
        .clone_htod(idx)
        .map_err(|e| cuda_err("uploading indices", e))?;
    let ip = {
        use cudarc::driver::DevicePtr;
        ids.device_ptr(dev.stream()).0
    };
    let k = format!("index_select_{s}");
    let f = dev.func(MODULE, &k)?;
    // SAFETY: every index is < axis (validated by ops); y holds outer * n_idx * inner elements.
    // `ids` is freed stream-ordered after the kernel.
    unsafe {
        launch(dev, &f, cfg_1d(n, BLOCK), &k, |b| {
            b.arg(&x)
                .arg(&y)
                .arg(&ip)
                .arg(&o)
                .arg(&a)
                .arg(&ni)
                .arg(&inn);
        })
    }?;
    drop(ids);
    Ok(())
}

pub(crate) fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    const OP: &str = "permute";
    let sx = storage(x, OP)?;
    let dev = sx.dev().clone();
    let rank = x.rank();
    let mut in_strides = vec![1i64; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * x.dim(d + 1) as i64;
    }
    let shape = permute_shape(x, perm);
    let strides: Vec<i64> = perm.iter().map(|&p| in_strides[p]).collect();
    let n = x.elem_count();
    let out = dev.alloc(x.dtype(), n)?;
    if n == 0 {
        return Ok(out.into_tensor(&shape));
    }
    let (dims, st) = coalesce(&shape, &[strides]);
    if dims.len() == 1 && st[0][0] == 1 {
        copy2d(&dev, x.dtype(), sx.ptr(), out.ptr(), 1, n, n, n)?;
        return Ok(out.into_tensor(&shape));
    }
    let (mut dims, mut strides) = (dims, st.into_iter().next().unwrap());
    let last = dims.len() - 1;
    let (s, v) = unit(x.dtype(), |v| {
        strides[last] == 1
            && divisible(dims[last] as usize, v)
            && strides[..last].iter().all(|&st| divisible(st as usize, v))
    });
    if v > 1 {
        dims[last] /= v as i64;
        for st in strides[..last].iter_mut() {
            *st /= v as i64;
        }
    }
    let units = n / v;
    let k = format!("permute_{s}");
    let f = dev.func(MODULE, &k)?;
    let (xp, yp, n64, r) = (sx.ptr(), out.ptr(), units as i64, dims.len() as i32);
    let (dd, sd) = (Dims::new(&dims)?, Dims::new(&strides)?);
    // SAFETY: the strides describe a permutation of x's own elements (in units of v elements);
    // out holds n elements.
    unsafe {
        launch(&dev, &f, cfg_1d(units, BLOCK), &k, |b| {
            b.arg(&xp).arg(&yp).arg(&n64).arg(&r).arg(&dd).arg(&sd);
        })
    }?;
    Ok(out.into_tensor(&shape))
}

pub(crate) fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "upsample_nearest2x";
    let sx = storage(x, OP)?;
    let dev = sx.dev().clone();
    let (n, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let total = n * 4 * h * w * c;
    let out = dev.alloc(x.dtype(), total)?;
    if total > 0 {
        let (s, v) = unit(x.dtype(), |v| divisible(c, v));
        let k = format!("upsample2x_{s}");
        let f = dev.func(MODULE, &k)?;
        let (xp, yp) = (sx.ptr(), out.ptr());
        let (n64, h64, w64, c64) = (n as i64, h as i64, w as i64, (c / v) as i64);
        // SAFETY: x holds n*h*w*c elements, out 4x that (moved in units of v elements).
        unsafe {
            launch(&dev, &f, cfg_1d(total / v, BLOCK), &k, |b| {
                b.arg(&xp).arg(&yp).arg(&n64).arg(&h64).arg(&w64).arg(&c64);
            })
        }?;
    }
    Ok(out.into_tensor(&upsample_nearest2x_shape(x)))
}

pub(crate) fn embedding(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let st = storage(table, OP)?;
    let dev = st.dev().clone();
    let (v, c) = (table.dim(0), table.dim(1));
    let out = dev.alloc(table.dtype(), ids.len() * c)?;
    if !ids.is_empty() && c > 0 {
        gather(&dev, table.dtype(), st.ptr(), out.ptr(), ids, 1, v, c)?;
    }
    Ok(out.into_tensor(&[ids.len(), c]))
}

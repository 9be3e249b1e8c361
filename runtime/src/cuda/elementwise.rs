//! Launchers of `cuda/kernels/elementwise.cu`: unary, affine, clamp, GEGLU, broadcasting binary
//! ops, fill and deterministic random fill. Storage f32 / bf16 / f16, math in f32. Binary ops also
//! take the precision policy's mixed operands (an f32 residual stream next to a bf16/f16 branch,
//! f32 output) in one pass (`binary_mx_*`). The module's conversion and bias-add kernels are
//! launched from `epilogue.rs`.

use cudarc::driver::PushKernelArg;

use super::device::{device, storage};
use super::launch::{
    broadcast_strides, cfg_1d, coalesce, divisible, dtype_suffix, launch, vec16, Dims,
};
use crate::ops::{geglu_shape, BinaryOp, UnaryOp};
use crate::{DType, Error, Result, Tensor};

const MODULE: &str = "elementwise";
const BLOCK: u32 = 256;

/// Run an elementwise kernel `name_<dtype>(x, y, n, ints..., floats...)` producing a tensor shaped
/// like x.
fn map1(
    x: &Tensor,
    op: &'static str,
    name: &'static str,
    ints: &[i32],
    floats: &[f32],
) -> Result<Tensor> {
    let vectorised = ["unary", "affine"];
    let sx = storage(x, op)?;
    let dev = sx.dev().clone();
    let n = x.elem_count();
    let out = dev.alloc(x.dtype(), n)?;
    if n > 0 {
        // 16-byte vectors when the count allows (buffers are 256-byte aligned).
        let v = vec16(x.dtype());
        let vec = vectorised.contains(&name) && divisible(n, v);
        let (k, units) = if vec {
            (format!("{name}_vec_{}", dtype_suffix(x.dtype())), n / v)
        } else {
            (format!("{name}_{}", dtype_suffix(x.dtype())), n)
        };
        let f = dev.func(MODULE, &k)?;
        let (xp, yp, n64) = (sx.ptr(), out.ptr(), units as i64);
        // SAFETY: x and out hold n elements of x's dtype (units vectors of them); extra args match
        // the kernel signature.
        unsafe {
            launch(&dev, &f, cfg_1d(units, BLOCK), &k, |b| {
                b.arg(&xp).arg(&yp).arg(&n64);
                for v in ints {
                    b.arg(v);
                }
                for v in floats {
                    b.arg(v);
                }
            })
        }?;
    }
    Ok(out.into_tensor(x.shape()))
}

pub(crate) fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    let code: i32 = match op {
        UnaryOp::Silu => 0,
        UnaryOp::Gelu => 1,
        UnaryOp::Exp => 2,
        UnaryOp::Sqrt => 3,
        UnaryOp::Neg => 4,
    };
    map1(x, "unary", "unary", &[code], &[])
}

pub(crate) fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    map1(x, "affine", "affine", &[], &[mul, add])
}

pub(crate) fn clamp(x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    map1(x, "clamp", "clamp", &[], &[lo, hi])
}

/// x [.., 2h] -> [.., h] = x[.., :h] * gelu(x[.., h:]).
pub(crate) fn geglu(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "geglu";
    let sx = storage(x, OP)?;
    let dev = sx.dev().clone();
    let h = x.dim(x.rank() - 1) / 2;
    let rows = if h == 0 { 0 } else { x.elem_count() / (2 * h) };
    let shape = geglu_shape(x);
    let out = dev.alloc(x.dtype(), rows * h)?;
    if rows * h > 0 {
        let v = vec16(x.dtype());
        let (k, hu) = if divisible(h, v) {
            (format!("geglu_vec_{}", dtype_suffix(x.dtype())), h / v)
        } else {
            (format!("geglu_{}", dtype_suffix(x.dtype())), h)
        };
        let f = dev.func(MODULE, &k)?;
        let (xp, yp, r64, h64) = (sx.ptr(), out.ptr(), rows as i64, hu as i64);
        // SAFETY: x holds rows * 2h elements, out rows * h (hu units of h / hu elements per row).
        unsafe {
            launch(&dev, &f, cfg_1d(rows * hu, BLOCK), &k, |b| {
                b.arg(&xp).arg(&yp).arg(&r64).arg(&h64);
            })
        }?;
    }
    Ok(out.into_tensor(&shape))
}

fn binary_code(op: BinaryOp) -> i32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
    }
}

/// The dtype combinations the `binary_mx_*` kernels are instantiated for (a, b -> out): out F32,
/// a and b each F32 or one 16-bit type T, not both F32.
fn mixed_binary_fused(a: DType, b: DType, out: DType) -> bool {
    let half = |d: DType| d != DType::F32;
    out == DType::F32 && (half(a) || half(b)) && !(half(a) && half(b) && a != b)
}

/// Elementwise a op b broadcast to `out_shape`, written as `out`: one dtype throughout (the tuned
/// same-dtype kernels), or a mixed combination of [`mixed_binary_fused`] (`binary_mx_*` kernels).
pub(crate) fn binary(
    a: &Tensor,
    b: &Tensor,
    op: BinaryOp,
    out_shape: &[usize],
    out: DType,
) -> Result<Tensor> {
    if a.dtype() == out && b.dtype() == out {
        binary_same_dtype(a, b, op, out_shape)
    } else if mixed_binary_fused(a.dtype(), b.dtype(), out) {
        binary_mixed(a, b, op, out_shape, out)
    } else {
        Err(Error::Cuda(format!(
            "binary: no kernel for {:?} {op:?} {:?} -> {out:?}",
            a.dtype(),
            b.dtype()
        )))
    }
}

/// Elements per vector of the `binary_mx_*` kernels (16 bytes of the f32 side).
const MX_V: usize = 4;

fn binary_mixed(
    a: &Tensor,
    b: &Tensor,
    op: BinaryOp,
    out_shape: &[usize],
    out_dt: DType,
) -> Result<Tensor> {
    const OP: &str = "binary";
    let (sa, sb) = (storage(a, OP)?, storage(b, OP)?);
    let dev = sa.dev().clone();
    let n: usize = out_shape.iter().product();
    let out = dev.alloc(out_dt, n)?;
    if n == 0 {
        return Ok(out.into_tensor(out_shape));
    }
    let code = binary_code(op);
    let sfx = format!(
        "{}_{}_{}",
        dtype_suffix(a.dtype()),
        dtype_suffix(b.dtype()),
        dtype_suffix(out_dt)
    );
    let (ap, bp, yp) = (sa.ptr(), sb.ptr(), out.ptr());
    let strides = [
        broadcast_strides(a.shape(), out_shape),
        broadcast_strides(b.shape(), out_shape),
    ];
    let (dims, st) = coalesce(out_shape, &strides);
    // Every pointer aligned to a vector of its own type (pool buffers are 256-byte aligned).
    let aligned = [(ap, a.dtype()), (bp, b.dtype()), (yp, out_dt)]
        .iter()
        .all(|&(p, d)| p.is_multiple_of((MX_V * d.size_in_bytes()) as u64));
    let vec_ok = aligned
        && divisible(*dims.last().unwrap() as usize, MX_V)
        && *st[0].last().unwrap() == 1
        && *st[1].last().unwrap() == 1;
    if vec_ok && dims.len() == 1 {
        // Same shape, both contiguous (the residual adds): no index math.
        let k = format!("binary_mx_same_vec_{sfx}");
        let f = dev.func(MODULE, &k)?;
        let nv = (n / MX_V) as i64;
        // SAFETY: a, b and out hold n elements of their dtypes, n a multiple of MX_V, every pointer
        // aligned to MX_V elements of its type (checked above).
        unsafe {
            launch(&dev, &f, cfg_1d(n / MX_V, BLOCK), &k, |l| {
                l.arg(&ap).arg(&bp).arg(&yp).arg(&nv).arg(&code);
            })
        }?;
        return Ok(out.into_tensor(out_shape));
    }
    let rank = dims.len() as i32;
    let (shape_d, sa_d, sb_d) = (Dims::new(&dims)?, Dims::new(&st[0])?, Dims::new(&st[1])?);
    let (k, units) = if vec_ok {
        // 32-bit index math when every element index fits (all UNet tensors).
        let name = if n < (1usize << 31) {
            "binary_mx_vec32"
        } else {
            "binary_mx_vec"
        };
        (format!("{name}_{sfx}"), n / MX_V)
    } else {
        (format!("binary_mx_{sfx}"), n)
    };
    let f = dev.func(MODULE, &k)?;
    let units64 = units as i64;
    // SAFETY: the strides address only elements inside a and b (broadcast shapes validated by
    // ops::binary_to); out holds n elements. On the vector path the innermost dim is contiguous in
    // a and b and a multiple of MX_V, and every pointer is aligned to MX_V elements of its type, so
    // every vector lies inside its operand and is aligned.
    unsafe {
        launch(&dev, &f, cfg_1d(units, BLOCK), &k, |l| {
            l.arg(&ap)
                .arg(&bp)
                .arg(&yp)
                .arg(&units64)
                .arg(&code)
                .arg(&rank)
                .arg(&shape_d)
                .arg(&sa_d)
                .arg(&sb_d);
        })
    }?;
    Ok(out.into_tensor(out_shape))
}

/// The same-dtype binary op (output in the inputs' dtype).
fn binary_same_dtype(a: &Tensor, b: &Tensor, op: BinaryOp, out_shape: &[usize]) -> Result<Tensor> {
    const OP: &str = "binary";
    let (sa, sb) = (storage(a, OP)?, storage(b, OP)?);
    let dev = sa.dev().clone();
    let n: usize = out_shape.iter().product();
    let out = dev.alloc(a.dtype(), n)?;
    if n == 0 {
        return Ok(out.into_tensor(out_shape));
    }
    let code = binary_code(op);
    let sfx = dtype_suffix(a.dtype());
    let (ap, bp, yp, n64) = (sa.ptr(), sb.ptr(), out.ptr(), n as i64);
    let v = vec16(a.dtype());
    let strides = [
        broadcast_strides(a.shape(), out_shape),
        broadcast_strides(b.shape(), out_shape),
    ];
    let (dims, st) = coalesce(out_shape, &strides);
    let vec_ok = divisible(*dims.last().unwrap() as usize, v)
        && *st[0].last().unwrap() == 1
        && *st[1].last().unwrap() == 1;
    if vec_ok && dims.len() == 1 {
        // Same shape, both contiguous (e.g. residual adds): no index math.
        let k = format!("binary_same_vec_{sfx}");
        let f = dev.func(MODULE, &k)?;
        let nv = (n / v) as i64;
        // SAFETY: a, b and out hold n elements, n a multiple of the vector width.
        unsafe {
            launch(&dev, &f, cfg_1d(n / v, BLOCK), &k, |l| {
                l.arg(&ap).arg(&bp).arg(&yp).arg(&nv).arg(&code);
            })
        }?;
    } else if vec_ok {
        let rank = dims.len() as i32;
        let (shape_d, sa_d, sb_d) = (Dims::new(&dims)?, Dims::new(&st[0])?, Dims::new(&st[1])?);
        // 32-bit index math when every element index fits (all UNet tensors).
        let k = if n < (1usize << 31) {
            format!("binary_vec32_{sfx}")
        } else {
            format!("binary_vec_{sfx}")
        };
        let f = dev.func(MODULE, &k)?;
        let nv = (n / v) as i64;
        // SAFETY: the strides address only elements inside a and b (broadcast shapes validated by
        // ops::binary); out holds n elements; the innermost dim is contiguous in a and b and a
        // multiple of the vector width, so every vector lies inside its operand and is 16-byte
        // aligned.
        unsafe {
            launch(&dev, &f, cfg_1d(n / v, BLOCK), &k, |l| {
                l.arg(&ap)
                    .arg(&bp)
                    .arg(&yp)
                    .arg(&nv)
                    .arg(&code)
                    .arg(&rank)
                    .arg(&shape_d)
                    .arg(&sa_d)
                    .arg(&sb_d);
            })
        }?;
    } else if a.shape() == out_shape && b.shape() == out_shape {
        let k = format!("binary_same_{sfx}");
        let f = dev.func(MODULE, &k)?;
        // SAFETY: a, b and out hold n elements.
        unsafe {
            launch(&dev, &f, cfg_1d(n, BLOCK), &k, |l| {
                l.arg(&ap).arg(&bp).arg(&yp).arg(&n64).arg(&code);
            })
        }?;
    } else {
        let rank = dims.len() as i32;
        let (shape_d, sa_d, sb_d) = (Dims::new(&dims)?, Dims::new(&st[0])?, Dims::new(&st[1])?);
        let k = format!("binary_{sfx}");
        let f = dev.func(MODULE, &k)?;
        // SAFETY: the strides address only elements inside a and b (broadcast shapes validated by
        // ops::binary); out holds n elements.
        unsafe {
            launch(&dev, &f, cfg_1d(n, BLOCK), &k, |l| {
                l.arg(&ap)
                    .arg(&bp)
                    .arg(&yp)
                    .arg(&n64)
                    .arg(&code)
                    .arg(&rank)
                    .arg(&shape_d)
                    .arg(&sa_d)
                    .arg(&sb_d);
            })
        }?;
    }
    Ok(out.into_tensor(out_shape))
}

/// A fresh tensor of `shape` filled with `value`.
pub fn full(ordinal: usize, shape: &[usize], dtype: DType, value: f32) -> Result<Tensor> {
    let dev = device(ordinal)?;
    let n: usize = shape.iter().product();
    let out = dev.alloc(dtype, n)?;
    if n > 0 {
        let k = format!("fill_{}", dtype_suffix(dtype));
        let f = dev.func(MODULE, &k)?;
        let (yp, n64) = (out.ptr(), n as i64);
        // SAFETY: out holds n elements.
        unsafe {
            launch(&dev, &f, cfg_1d(n, BLOCK), &k, |b| {
                b.arg(&yp).arg(&n64).arg(&value);
            })
        }?;
    }
    Ok(out.into_tensor(shape))
}

/// A fresh tensor of `shape` with N(0, std^2) values generated on the device from (seed, index):
/// deterministic, no host transfer (benchmark weights).
pub fn random_normal(
    ordinal: usize,
    shape: &[usize],
    dtype: DType,
    seed: u64,
    std: f32,
) -> Result<Tensor> {
    let dev = device(ordinal)?;
    let n: usize = shape.iter().product();
    let out = dev.alloc(dtype, n)?;
    if n > 0 {
        let k = format!("random_normal_{}", dtype_suffix(dtype));
        let f = dev.func(MODULE, &k)?;
        let (yp, n64) = (out.ptr(), n as i64);
        // SAFETY: out holds n elements.
        unsafe {
            launch(&dev, &f, cfg_1d(n, BLOCK), &k, |b| {
                b.arg(&yp).arg(&n64).arg(&seed).arg(&std);
            })
        }?;
    }
    Ok(out.into_tensor(shape))
}

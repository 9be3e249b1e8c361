//! Launchers of `cuda/kernels/elementwise.cu`: dtype conversion, unary, affine, clamp, GEGLU,
//! broadcasting binary ops, fill and deterministic random fill. Storage f32 / bf16 / f16, math in f32.
//! Binary ops also take the precision policy's mixed operands (an f32 residual stream next to a
//! bf16/f16 branch, f32 output) in one pass (`binary_mx_*`), and the in-place bias add takes an
//! f32 bias into bf16/f16 storage (`bias_add[_vec]_f32b_*`).

use cudarc::driver::PushKernelArg;

use super::{cfg_1d, cuda_err, dtype_suffix, storage, CudaDevice, CudaStorage, Dims};
use crate::ops::{BinaryOp, UnaryOp};
use crate::{DType, Error, Result, Tensor};

const MODULE: &str = "elementwise";
const BLOCK: u32 = 256;

/// Elements per 16-byte vector (4 or 8: a power of two).
fn vec_width(d: DType) -> usize {
    16 / d.size_in_bytes()
}

/// `n` is a multiple of the power of two `v`.
fn divisible(n: usize, v: usize) -> bool {
    n & (v - 1) == 0
}

fn launch_err(k: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| cuda_err(&format!("launching {k}"), e)
}

/// `VI_BINARY_KERNEL=old` selects the binary / bias-add kernels of commit b98c570 (runtime-indexed
/// broadcast strides copied to local memory, 64-bit div/mod; scalar bias add) so one GPU run can
/// time before and after; unset or `new`: the current kernels. Read once per process.
fn old_kernels() -> Result<bool> {
    static OLD: std::sync::OnceLock<std::result::Result<bool, String>> = std::sync::OnceLock::new();
    OLD.get_or_init(|| match std::env::var("VI_BINARY_KERNEL") {
        Err(_) => Ok(false),
        Ok(v) if v.is_empty() || v == "new" => Ok(false),
        Ok(v) if v == "old" => Ok(true),
        Ok(v) => Err(format!(
            "VI_BINARY_KERNEL={v:?}: expected `old` or `new` (or unset)"
        )),
    })
    .clone()
    .map_err(Error::Cuda)
}

/// Convert `x` to `dtype` (a fresh buffer; a plain copy when the dtype is unchanged).
pub(crate) fn convert(x: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    let dev = x.dev().clone();
    let n = x.len();
    let out = dev.alloc(dtype, n)?;
    if n == 0 {
        return Ok(out);
    }
    let k = format!(
        "convert_{}_{}",
        dtype_suffix(x.dtype()),
        dtype_suffix(dtype)
    );
    let f = dev.func(MODULE, &k)?;
    let (xp, yp, n64) = (x.ptr(), out.ptr(), n as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&xp).arg(&yp).arg(&n64);
    // SAFETY: x and out hold n elements of the kernel's source / destination types.
    unsafe { b.launch(cfg_1d(n, BLOCK)) }.map_err(launch_err(&k))?;
    Ok(out)
}

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
        let v = vec_width(x.dtype());
        let vec = vectorised.contains(&name) && divisible(n, v);
        let (k, units) = if vec {
            (format!("{name}_vec_{}", dtype_suffix(x.dtype())), n / v)
        } else {
            (format!("{name}_{}", dtype_suffix(x.dtype())), n)
        };
        let f = dev.func(MODULE, &k)?;
        let (xp, yp, n64) = (sx.ptr(), out.ptr(), units as i64);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&xp).arg(&yp).arg(&n64);
        for v in ints {
            b.arg(v);
        }
        for v in floats {
            b.arg(v);
        }
        // SAFETY: x and out hold n elements of x's dtype (units vectors of them); extra args match
        // the kernel signature.
        unsafe { b.launch(cfg_1d(units, BLOCK)) }.map_err(launch_err(&k))?;
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
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = h;
    let out = dev.alloc(x.dtype(), rows * h)?;
    if rows * h > 0 {
        let v = vec_width(x.dtype());
        let (k, hu) = if divisible(h, v) {
            (format!("geglu_vec_{}", dtype_suffix(x.dtype())), h / v)
        } else {
            (format!("geglu_{}", dtype_suffix(x.dtype())), h)
        };
        let f = dev.func(MODULE, &k)?;
        let (xp, yp, r64, h64) = (sx.ptr(), out.ptr(), rows as i64, hu as i64);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&xp).arg(&yp).arg(&r64).arg(&h64);
        // SAFETY: x holds rows * 2h elements, out rows * h (hu units of h / hu elements per row).
        unsafe { b.launch(cfg_1d(rows * hu, BLOCK)) }.map_err(launch_err(&k))?;
    }
    Ok(out.into_tensor(&shape))
}

/// Element strides of `shape` broadcast to `out` (right-aligned; 0 on broadcast dims).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<i64> {
    let r = out.len();
    let mut strides = vec![0i64; r];
    let mut s = 1i64;
    for i in (0..shape.len()).rev() {
        let o = i + r - shape.len();
        strides[o] = if shape[i] == 1 { 0 } else { s };
        s *= shape[i] as i64;
    }
    strides
}

/// Merge adjacent output dims whose strides are contiguous in every operand (or broadcast in both
/// places), dropping size-1 dims, so most broadcasts reduce to rank 1 or 2.
pub(crate) fn coalesce(shape: &[usize], strides: &[Vec<i64>]) -> (Vec<i64>, Vec<Vec<i64>>) {
    let mut dims: Vec<i64> = Vec::new();
    let mut st: Vec<Vec<i64>> = vec![Vec::new(); strides.len()];
    for (d, &size) in shape.iter().enumerate() {
        if size == 1 {
            continue;
        }
        let mergeable = !dims.is_empty()
            && strides.iter().enumerate().all(|(j, s)| {
                let prev = *st[j].last().unwrap();
                prev == s[d] * size as i64
            });
        if mergeable {
            *dims.last_mut().unwrap() *= size as i64;
            for (j, s) in strides.iter().enumerate() {
                *st[j].last_mut().unwrap() = s[d];
            }
        } else {
            dims.push(size as i64);
            for (j, s) in strides.iter().enumerate() {
                st[j].push(s[d]);
            }
        }
    }
    if dims.is_empty() {
        dims.push(1);
        for s in st.iter_mut() {
            s.push(0);
        }
    }
    (dims, st)
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
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&ap).arg(&bp).arg(&yp).arg(&nv).arg(&code);
        // SAFETY: a, b and out hold n elements of their dtypes, n a multiple of MX_V, every pointer
        // aligned to MX_V elements of its type (checked above).
        unsafe { l.launch(cfg_1d(n / MX_V, BLOCK)) }.map_err(launch_err(&k))?;
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
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&ap)
        .arg(&bp)
        .arg(&yp)
        .arg(&units64)
        .arg(&code)
        .arg(&rank)
        .arg(&shape_d)
        .arg(&sa_d)
        .arg(&sb_d);
    // SAFETY: the strides address only elements inside a and b (broadcast shapes validated by
    // ops::binary_to); out holds n elements. On the vector path the innermost dim is contiguous in
    // a and b and a multiple of MX_V, and every pointer is aligned to MX_V elements of its type, so
    // every vector lies inside its operand and is aligned.
    unsafe { l.launch(cfg_1d(units, BLOCK)) }.map_err(launch_err(&k))?;
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
    let v = vec_width(a.dtype());
    let strides = [
        broadcast_strides(a.shape(), out_shape),
        broadcast_strides(b.shape(), out_shape),
    ];
    let (dims, st) = coalesce(out_shape, &strides);
    let vec_ok = divisible(*dims.last().unwrap() as usize, v)
        && *st[0].last().unwrap() == 1
        && *st[1].last().unwrap() == 1;
    let old = old_kernels()?;
    if vec_ok && old {
        // The b98c570 kernel (VI_BINARY_KERNEL=old), for before/after timing only.
        let rank = dims.len() as i32;
        let (shape_d, sa_d, sb_d) = (Dims::new(&dims)?, Dims::new(&st[0])?, Dims::new(&st[1])?);
        let k = format!("binary_vec_old_{sfx}");
        let f = dev.func(MODULE, &k)?;
        let nv = (n / v) as i64;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&ap)
            .arg(&bp)
            .arg(&yp)
            .arg(&nv)
            .arg(&code)
            .arg(&rank)
            .arg(&shape_d)
            .arg(&sa_d)
            .arg(&sb_d);
        // SAFETY: as for binary_vec below (same arguments, same index math).
        unsafe { l.launch(cfg_1d(n / v, BLOCK)) }.map_err(launch_err(&k))?;
    } else if vec_ok && dims.len() == 1 {
        // Same shape, both contiguous (e.g. residual adds): no index math.
        let k = format!("binary_same_vec_{sfx}");
        let f = dev.func(MODULE, &k)?;
        let nv = (n / v) as i64;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&ap).arg(&bp).arg(&yp).arg(&nv).arg(&code);
        // SAFETY: a, b and out hold n elements, n a multiple of the vector width.
        unsafe { l.launch(cfg_1d(n / v, BLOCK)) }.map_err(launch_err(&k))?;
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
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&ap)
            .arg(&bp)
            .arg(&yp)
            .arg(&nv)
            .arg(&code)
            .arg(&rank)
            .arg(&shape_d)
            .arg(&sa_d)
            .arg(&sb_d);
        // SAFETY: as below; additionally the innermost dim is contiguous in a and b and a multiple
        // of the vector width, so every vector lies inside its operand and is 16-byte aligned.
        unsafe { l.launch(cfg_1d(n / v, BLOCK)) }.map_err(launch_err(&k))?;
    } else if a.shape() == out_shape && b.shape() == out_shape {
        let k = format!("binary_same_{sfx}");
        let f = dev.func(MODULE, &k)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&ap).arg(&bp).arg(&yp).arg(&n64).arg(&code);
        // SAFETY: a, b and out hold n elements.
        unsafe { l.launch(cfg_1d(n, BLOCK)) }.map_err(launch_err(&k))?;
    } else {
        let rank = dims.len() as i32;
        let (shape_d, sa_d, sb_d) = (Dims::new(&dims)?, Dims::new(&st[0])?, Dims::new(&st[1])?);
        let k = format!("binary_{sfx}");
        let f = dev.func(MODULE, &k)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&ap)
            .arg(&bp)
            .arg(&yp)
            .arg(&n64)
            .arg(&code)
            .arg(&rank)
            .arg(&shape_d)
            .arg(&sa_d)
            .arg(&sb_d);
        // SAFETY: the strides address only elements inside a and b (broadcast shapes validated by
        // ops::binary); out holds n elements.
        unsafe { l.launch(cfg_1d(n, BLOCK)) }.map_err(launch_err(&k))?;
    }
    Ok(out.into_tensor(out_shape))
}

/// A fresh tensor of `shape` filled with `value`.
pub fn full(ordinal: usize, shape: &[usize], dtype: DType, value: f32) -> Result<Tensor> {
    let dev = super::device(ordinal)?;
    let n: usize = shape.iter().product();
    let out = dev.alloc(dtype, n)?;
    if n > 0 {
        let k = format!("fill_{}", dtype_suffix(dtype));
        let f = dev.func(MODULE, &k)?;
        let (yp, n64) = (out.ptr(), n as i64);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&yp).arg(&n64).arg(&value);
        // SAFETY: out holds n elements.
        unsafe { b.launch(cfg_1d(n, BLOCK)) }.map_err(launch_err(&k))?;
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
    let dev = super::device(ordinal)?;
    let n: usize = shape.iter().product();
    let out = dev.alloc(dtype, n)?;
    if n > 0 {
        let k = format!("random_normal_{}", dtype_suffix(dtype));
        let f = dev.func(MODULE, &k)?;
        let (yp, n64) = (out.ptr(), n as i64);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&yp).arg(&n64).arg(&seed).arg(&std);
        // SAFETY: out holds n elements.
        unsafe { b.launch(cfg_1d(n, BLOCK)) }.map_err(launch_err(&k))?;
    }
    Ok(out.into_tensor(shape))
}

/// In place: y[r, c] += bias[c] for y [rows, c] (raw buffer of `dtype`), bias of `bias_dtype`
/// (`dtype`, or F32 under bf16/f16 storage: the fp32 sum is rounded once to `dtype`).
pub(crate) fn bias_add_rows(
    dev: &CudaDevice,
    dtype: DType,
    y: u64,
    bias: u64,
    bias_dtype: DType,
    rows: usize,
    c: usize,
) -> Result<()> {
    let n = rows * c;
    if n == 0 {
        return Ok(());
    }
    if bias_dtype != dtype {
        return bias_add_rows_f32b(dev, dtype, y, bias, bias_dtype, rows, c);
    }
    let v = vec_width(dtype);
    let n_vec = n / v;
    // 16-byte vectors when c is a multiple of V and both buffers are 16-byte aligned (32-bit index
    // math in the kernel: n_vec < 2^32).
    let vec = !old_kernels()?
        && divisible(c, v)
        && y.is_multiple_of(16)
        && bias.is_multiple_of(16)
        && u32::try_from(n_vec).is_ok();
    if vec {
        let k = format!("bias_add_vec_{}", dtype_suffix(dtype));
        let f = dev.func(MODULE, &k)?;
        let (nv64, cv) = (n_vec as i64, (c / v) as u32);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&y).arg(&bias).arg(&nv64).arg(&cv);
        // SAFETY: y holds rows * c elements (n_vec 16-byte vectors) and bias c elements (c / V
        // vectors) of `dtype`; both addresses are 16-byte aligned (checked above).
        unsafe { b.launch(cfg_1d(n_vec, BLOCK)) }.map_err(launch_err(&k))?;
        return Ok(());
    }
    let k = format!("bias_add_{}", dtype_suffix(dtype));
    let f = dev.func(MODULE, &k)?;
    let (r64, c64) = (rows as i64, c as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&y).arg(&bias).arg(&r64).arg(&c64);
    // SAFETY: y holds rows * c elements and bias c elements of `dtype`.
    unsafe { b.launch(cfg_1d(n, BLOCK)) }.map_err(launch_err(&k))?;
    Ok(())
}

/// [`bias_add_rows`] with an f32 bias into bf16/f16 `y` (`bias_add[_vec]_f32b_<dtype>`).
fn bias_add_rows_f32b(
    dev: &CudaDevice,
    dtype: DType,
    y: u64,
    bias: u64,
    bias_dtype: DType,
    rows: usize,
    c: usize,
) -> Result<()> {
    if bias_dtype != DType::F32 || dtype == DType::F32 {
        return Err(Error::Cuda(format!(
            "bias add: {bias_dtype:?} bias into {dtype:?} output (must match, or be F32 into \
             bf16/f16)"
        )));
    }
    let n = rows * c;
    let v = vec_width(dtype);
    let n_vec = n / v;
    // 16-byte vectors of y (v elements) and of the bias (v / 4 float vectors per y vector).
    let vec = divisible(c, v)
        && y.is_multiple_of(16)
        && bias.is_multiple_of(16)
        && u32::try_from(n_vec).is_ok();
    let sfx = dtype_suffix(dtype);
    if vec {
        let k = format!("bias_add_vec_f32b_{sfx}");
        let f = dev.func(MODULE, &k)?;
        let (nv64, cv) = (n_vec as i64, (c / v) as u32);
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&y).arg(&bias).arg(&nv64).arg(&cv);
        // SAFETY: y holds rows * c elements of `dtype` (n_vec 16-byte vectors), bias c f32 (c / v
        // groups of v floats); both 16-byte aligned (checked above).
        unsafe { b.launch(cfg_1d(n_vec, BLOCK)) }.map_err(launch_err(&k))?;
        return Ok(());
    }
    let k = format!("bias_add_f32b_{sfx}");
    let f = dev.func(MODULE, &k)?;
    let (r64, c64) = (rows as i64, c as i64);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&y).arg(&bias).arg(&r64).arg(&c64);
    // SAFETY: y holds rows * c elements of `dtype`, bias c f32.
    unsafe { b.launch(cfg_1d(n, BLOCK)) }.map_err(launch_err(&k))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{broadcast_strides, coalesce};

    #[test]
    fn broadcast_strides_are_right_aligned_with_zero_on_broadcast_dims() {
        assert_eq!(broadcast_strides(&[4, 6, 10], &[4, 6, 10]), [60, 10, 1]);
        assert_eq!(broadcast_strides(&[10], &[4, 6, 10]), [0, 0, 1]);
        assert_eq!(broadcast_strides(&[4, 1, 10], &[4, 6, 10]), [10, 0, 1]);
        assert_eq!(broadcast_strides(&[1], &[3, 5]), [0, 0]);
    }

    #[test]
    fn coalesce_merges_contiguous_and_jointly_broadcast_dims() {
        // Same shape: one dim.
        let s = [4, 6, 10];
        let st = vec![broadcast_strides(&s, &s), broadcast_strides(&s, &s)];
        assert_eq!(coalesce(&s, &st), (vec![240], vec![vec![1], vec![1]]));
        // Per-channel bias over [N, H, W, C]: [N*H*W, C] with b strides [0, 1].
        let out = [2, 3, 4, 8];
        let st = vec![broadcast_strides(&out, &out), broadcast_strides(&[8], &out)];
        assert_eq!(
            coalesce(&out, &st),
            (vec![24, 8], vec![vec![8, 1], vec![0, 1]])
        );
        // Per-row scalar: [4, 6, 10] * [4, 6, 1] -> [24, 10] with b strides [1, 0].
        let out = [4, 6, 10];
        let st = vec![
            broadcast_strides(&out, &out),
            broadcast_strides(&[4, 6, 1], &out),
        ];
        assert_eq!(
            coalesce(&out, &st),
            (vec![24, 10], vec![vec![10, 1], vec![1, 0]])
        );
        // Size-1 dims are dropped; all-ones shapes keep one dim.
        let st = vec![vec![0, 0], vec![0, 0]];
        assert_eq!(coalesce(&[1, 1], &st), (vec![1], vec![vec![0], vec![0]]));
    }
}

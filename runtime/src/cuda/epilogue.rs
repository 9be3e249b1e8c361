//! The passes that finish a GEMM or convolution outside it and the dtype conversion: the in-place
//! per-column bias add (`bias_add[_vec][_f32b]_*` in `cuda/kernels/elementwise.cu`), the
//! bias-and-round-once of an fp32 accumulator (`bias_round[_f32b]_*` in
//! `cuda/kernels/precision.cu`), and `convert_<from>_<to>` (storage dtype conversion, one rounding).
//! Used by the library modules (`blas.rs`, `cudnn.rs`) and the op modules; imports only `device`
//! and `launch`.
//!
//! Bias dtype: the output's dtype, or F32 under bf16/f16 output (the precision policy keeps 1-D
//! parameters in fp32): the sum is formed in fp32 and rounded once to the output dtype.

use cudarc::driver::PushKernelArg;

use super::device::{cuda_err, CudaDevice, CudaStorage};
use super::launch::{cfg_1d, divisible, dtype_suffix, launch, vec16};
use crate::{DType, Error, Result};

const BLOCK: u32 = 256;

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
    let f = dev.func("elementwise", &k)?;
    let (xp, yp, n64) = (x.ptr(), out.ptr(), n as i64);
    // SAFETY: x and out hold n elements of the kernel's source / destination types.
    unsafe {
        launch(&dev, &f, cfg_1d(n, BLOCK), &k, |b| {
            b.arg(&xp).arg(&yp).arg(&n64);
        })
    }?;
    Ok(out)
}

impl CudaStorage {
    /// Convert the element type on the device (a fresh buffer).
    pub fn to_dtype(&self, dtype: DType) -> Result<CudaStorage> {
        convert(self, dtype)
    }
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
    let v = vec16(dtype);
    let n_vec = n / v;
    // 16-byte vectors when c is a multiple of V and both buffers are 16-byte aligned (32-bit index
    // math in the kernel: n_vec < 2^32).
    let vec = divisible(c, v)
        && y.is_multiple_of(16)
        && bias.is_multiple_of(16)
        && u32::try_from(n_vec).is_ok();
    if vec {
        let k = format!("bias_add_vec_{}", dtype_suffix(dtype));
        let f = dev.func("elementwise", &k)?;
        let (nv64, cv) = (n_vec as i64, (c / v) as u32);
        // SAFETY: y holds rows * c elements (n_vec 16-byte vectors) and bias c elements (c / V
        // vectors) of `dtype`; both addresses are 16-byte aligned (checked above).
        unsafe {
            launch(dev, &f, cfg_1d(n_vec, BLOCK), &k, |b| {
                b.arg(&y).arg(&bias).arg(&nv64).arg(&cv);
            })
        }?;
        return Ok(());
    }
    let k = format!("bias_add_{}", dtype_suffix(dtype));
    let f = dev.func("elementwise", &k)?;
    let (r64, c64) = (rows as i64, c as i64);
    // SAFETY: y holds rows * c elements and bias c elements of `dtype`.
    unsafe {
        launch(dev, &f, cfg_1d(n, BLOCK), &k, |b| {
            b.arg(&y).arg(&bias).arg(&r64).arg(&c64);
        })
    }
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
    let v = vec16(dtype);
    let n_vec = n / v;
    // 16-byte vectors of y (v elements) and of the bias (v / 4 float vectors per y vector).
    let vec = divisible(c, v)
        && y.is_multiple_of(16)
        && bias.is_multiple_of(16)
        && u32::try_from(n_vec).is_ok();
    let sfx = dtype_suffix(dtype);
    if vec {
        let k = format!("bias_add_vec_f32b_{sfx}");
        let f = dev.func("elementwise", &k)?;
        let (nv64, cv) = (n_vec as i64, (c / v) as u32);
        // SAFETY: y holds rows * c elements of `dtype` (n_vec 16-byte vectors), bias c f32 (c / v
        // groups of v floats); both 16-byte aligned (checked above).
        unsafe {
            launch(dev, &f, cfg_1d(n_vec, BLOCK), &k, |b| {
                b.arg(&y).arg(&bias).arg(&nv64).arg(&cv);
            })
        }?;
        return Ok(());
    }
    let k = format!("bias_add_f32b_{sfx}");
    let f = dev.func("elementwise", &k)?;
    let (r64, c64) = (rows as i64, c as i64);
    // SAFETY: y holds rows * c elements of `dtype`, bias c f32.
    unsafe {
        launch(dev, &f, cfg_1d(n, BLOCK), &k, |b| {
            b.arg(&y).arg(&bias).arg(&r64).arg(&c64);
        })
    }
}

/// out[rows, n] (dtype `dt`) = round(acc[rows, n] (f32) + bias[n] (optional; dtype `dt` or F32)):
/// one rounding to the storage dtype after an fp32 accumulation (the temporal conv taps, and the
/// f32-bias fallback of blas.rs).
pub(crate) fn bias_round(
    dev: &CudaDevice,
    dt: DType,
    acc: u64,
    bias: Option<(u64, DType)>,
    out: u64,
    rows: usize,
    n: usize,
) -> Result<()> {
    let f32_bias = matches!(bias, Some((_, DType::F32)));
    let kname = match (dt, f32_bias) {
        (DType::F32, _) => "bias_round_f32",
        (DType::BF16, false) => "bias_round_bf16",
        (DType::F16, false) => "bias_round_f16",
        (DType::BF16, true) => "bias_round_f32b_bf16",
        (DType::F16, true) => "bias_round_f32b_f16",
    };
    if let Some((_, bdt)) = bias {
        if bdt != dt && bdt != DType::F32 {
            return Err(cuda_err(
                "temporal_conv",
                format!("{bdt:?} bias with {dt:?} output"),
            ));
        }
    }
    let func = dev.func("precision", kname)?;
    let total = rows * n;
    let (total64, n64) = (total as i64, n as i64);
    let bias_ptr = bias.map_or(0, |b| b.0);
    // SAFETY: acc holds rows*n f32, out rows*n elements of `dt`, bias (when non-null) n elements of
    // the dtype the kernel takes (`dt`, or f32 for `_f32b_`); all are live device buffers and the
    // launch is queued on the device stream.
    unsafe {
        launch(dev, &func, cfg_1d(total, 256), "bias_round", |lb| {
            lb.arg(&acc)
                .arg(&bias_ptr)
                .arg(&out)
                .arg(&total64)
                .arg(&n64);
        })
    }
}

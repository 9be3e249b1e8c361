//! Convolutions as cuBLASLt GEMMs on channels-last activations.
//!
//! Why channels-last ([N, H, W, C]): a 1x1 convolution, a Linear and every temporal-conv tap are then
//! plain row-major GEMMs over pixel rows with no copy at all; a 3x3 convolution's im2col row for one
//! output pixel is kh*kw contiguous runs of C channels (16-byte vector loads/stores); GroupNorm and
//! attention read channels contiguously; and tensor-core GEMMs want K (= channels) innermost.
//!
//! * 1x1, stride 1, no padding: out[N*H*W, Cout] = x[N*H*W, Cin] · w[Cout, Cin]^T + bias.
//! * kh x kw: cuDNN implicit GEMM on the re-laid weight (cudnn.rs) by default, else
//!   im2col (`cuda/kernels/conv.cu`) to cols[N*Ho*Wo, kh*kw*Cin] with column order
//!   (ky, kx, cin), then out = cols · w'^T + bias where w' is the weight re-laid ONCE to
//!   [Cout, kh, kw, Cin] and cached per weight buffer. Chunked over images so the cols buffer stays
//!   below `COLS_BUDGET` bytes.
//! * temporal (kernel k over frames): out[b, f] = sum_t W_t · x[b, f + t - p] + bias: one GEMM per tap
//!   on shifted row ranges of x and out (beta = 1 after the first), no copies; W is re-laid once to
//!   [k, Cout, Cin] so each W_t is a contiguous [Cout, Cin] matrix. For bf16/f16 storage with k > 1
//!   the taps accumulate into an fp32 buffer (cuBLASLt bf16/f16 A/B, f32 C/D) and the bias is added
//!   while rounding once to the storage dtype (`bias_round` in epilogue.rs, `cuda/kernels/precision.cu`), instead of rounding
//!   every partial sum; f32 accumulates in place as before.
//!
//! Biases may be f32 under bf16/f16 activations (the precision policy): the GEMM paths pass them to
//! cuBLASLt's epilogue as CUDA_R_32F (blas.rs), the cuDNN path adds them with the in-place
//! `bias_add_f32b` kernel, the temporal conv's fp32 accumulator with `bias_round_f32b` — no widening
//! or rounding passes over the activations.

use cudarc::driver::PushKernelArg;

use super::blas::{gemm_rows, gemm_rows_to};
use super::cudnn::{conv_algo, set_conv_algo, ConvAlgo, ConvShape};
use super::device::{cuda_err, device, storage, CudaDevice};
use super::epilogue::bias_round;
use super::launch::{cfg_1d, launch};
use crate::ops::{Conv2dGeom, TemporalConvGeom};
use crate::{DType, Result, Tensor};

/// Largest im2col buffer per chunk (bytes).
const COLS_BUDGET: usize = 1 << 30;

/// `w` permuted by `perm`, computed once per weight buffer and cached on the device.
fn relaid(dev: &CudaDevice, w: &Tensor, perm: &[usize], tag: &'static str) -> Result<Tensor> {
    let key = (storage(w, "conv weight")?.ptr(), w.elem_count(), tag);
    if let Some((_, r)) = dev.weight_cache.lock().unwrap().get(&key) {
        return Ok(r.clone());
    }
    // Through `ops` (the op modules do not call each other): the CUDA permute kernel.
    // Cached as long as the weight: never offloaded (crate::offload).
    let r = crate::offload::outside(|| crate::ops::permute(w, perm))?;
    dev.weight_cache
        .lock()
        .unwrap()
        .insert(key, (w.clone(), r.clone()));
    Ok(r)
}

/// Drop every cached weight re-layout of device `ordinal` (the source weights are kept alive by the
/// cache; call this after dropping a model to release them).
pub fn clear_weight_cache(ordinal: usize) -> Result<()> {
    device(ordinal)?.weight_cache.lock().unwrap().clear();
    Ok(())
}

pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: &Conv2dGeom,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let sx = storage(x, OP)?;
    let dev = sx.dev().clone();
    let dt = x.dtype();
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
    // The handle keeps the bias buffer alive until the launch is enqueued.
    let bias_ref = bias.map(|b| storage(b, OP)).transpose()?;
    let bias_ptr = bias_ref.as_ref().map(|s| (s.ptr(), s.dtype()));
    let out = dev.alloc(dt, n * ho * wo * cout)?;
    let shape = g.out_shape();
    if out.is_empty() {
        return Ok(out.into_tensor(&shape));
    }
    if g.is_pointwise() {
        let sw = storage(w, OP)?;
        gemm_rows(
            &dev,
            dt,
            n * h * wd,
            cout,
            cin,
            sx.ptr(),
            cin,
            sw.ptr(),
            out.ptr(),
            cout,
            bias_ptr,
            0.0,
        )?;
        return Ok(out.into_tensor(&shape));
    }
    let wr = relaid(&dev, w, &[0, 2, 3, 1], "conv2d")?;
    let swr = storage(&wr, OP)?;
    if conv_algo() == ConvAlgo::Cudnn {
        let shape_key = ConvShape {
            dtype: dt,
            n,
            h,
            w: wd,
            cin,
            cout,
            kh,
            kw,
            stride,
            pad,
        };
        let r = dev
            .dnn()
            .and_then(|d| d.conv(&dev, &shape_key, sx.ptr(), swr.ptr(), bias_ptr, out.ptr()));
        match r {
            Ok(()) => return Ok(out.into_tensor(&shape)),
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    eprintln!(
                        "warning: cuDNN convolution unavailable, using im2col + cuBLASLt: {e}"
                    )
                });
                if dev.dnn().is_err() {
                    set_conv_algo(ConvAlgo::Im2col);
                }
            }
        }
    }
    let kdim = kh * kw * cin;
    let esz = dt.size_in_bytes();
    let per_image = ho * wo * kdim * esz;
    let chunk = (COLS_BUDGET / per_image.max(1)).clamp(1, n);
    let cols = dev.alloc(dt, chunk * ho * wo * kdim)?;
    // Widest vector unit dividing one pixel's channel run (buffers are 256-byte aligned).
    let row_bytes = cin * esz;
    let (unit, kname) = [
        (16, "im2col_v16"),
        (8, "im2col_v8"),
        (4, "im2col_v4"),
        (2, "im2col_v2"),
    ]
    .into_iter()
    .find(|(u, _)| row_bytes & (u - 1) == 0) // units are powers of two
    .unwrap_or((2, "im2col_v2"));
    if row_bytes & (unit - 1) != 0 {
        return Err(cuda_err(OP, format!("channel row of {row_bytes} bytes")));
    }
    let f = dev.func("conv", kname)?;
    let cu = (row_bytes / unit) as i64;
    let mut n0 = 0;
    while n0 < n {
        let nc = chunk.min(n - n0);
        let xp = sx.ptr_at(n0 * h * wd * cin);
        let cp = cols.ptr();
        let (nc64, h64, w64, ho64, wo64) = (nc as i64, h as i64, wd as i64, ho as i64, wo as i64);
        let (kh32, kw32, s32, p32) = (kh as i32, kw as i32, stride as i32, pad as i32);
        let units = nc * ho * wo * kh * kw * cu as usize;
        // SAFETY: reads images n0..n0+nc of x, writes nc*ho*wo*kdim elements of cols (allocated for
        // `chunk` >= nc images).
        unsafe {
            launch(&dev, &f, cfg_1d(units, 256), "im2col", |b| {
                b.arg(&xp)
                    .arg(&cp)
                    .arg(&nc64)
                    .arg(&h64)
                    .arg(&w64)
                    .arg(&cu)
                    .arg(&ho64)
                    .arg(&wo64)
                    .arg(&kh32)
                    .arg(&kw32)
                    .arg(&s32)
                    .arg(&p32);
            })
        }?;
        gemm_rows(
            &dev,
            dt,
            nc * ho * wo,
            cout,
            kdim,
            cp,
            kdim,
            swr.ptr(),
            out.ptr_at(n0 * ho * wo * cout),
            cout,
            bias_ptr,
            0.0,
        )?;
        n0 += nc;
    }
    drop(cols);
    Ok(out.into_tensor(&shape))
}

pub(crate) fn temporal_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: &TemporalConvGeom,
) -> Result<Tensor> {
    const OP: &str = "temporal_conv";
    let sx = storage(x, OP)?;
    let dev = sx.dev().clone();
    let dt = x.dtype();
    let TemporalConvGeom {
        b,
        f,
        s,
        cin,
        cout,
        k,
        pad: p,
    } = *g;
    // The handle keeps the bias buffer alive until the launch is enqueued.
    let bias_ref = bias.map(|b| storage(b, OP)).transpose()?;
    let bias_ptr = bias_ref.as_ref().map(|s| (s.ptr(), s.dtype()));
    let out = dev.alloc(dt, b * f * s * cout)?;
    let shape = g.out_shape();
    if out.is_empty() {
        return Ok(out.into_tensor(&shape));
    }
    let wt = if k == 1 {
        w.clone()
    } else {
        relaid(&dev, w, &[2, 0, 1], "temporal_conv")?
    };
    let swt = storage(&wt, OP)?;
    // bf16/f16 with several taps: fp32 accumulator, one rounding at the end (with the bias).
    let acc = if dt != DType::F32 && k > 1 {
        Some(dev.alloc(DType::F32, b * f * s * cout)?)
    } else {
        None
    };
    let (c_dtype, c_buf) = match &acc {
        Some(a) => (DType::F32, a),
        None => (dt, &out),
    };
    let gemm_bias = if acc.is_some() { None } else { bias_ptr };
    // Centre tap first: it covers every output frame and writes (with the bias) what the other taps
    // accumulate into.
    let taps = std::iter::once(p).chain((0..k).filter(|&t| t != p));
    for t in taps {
        let shift = t as isize - p as isize;
        let f0 = (-shift).max(0) as usize;
        let f1 = (f as isize - shift).min(f as isize).max(0) as usize;
        if f1 <= f0 {
            continue;
        }
        for bi in 0..b {
            let src_frame = (bi * f + f0) as isize + shift;
            gemm_rows_to(
                &dev,
                dt,
                c_dtype,
                (f1 - f0) * s,
                cout,
                cin,
                sx.ptr_at(src_frame as usize * s * cin),
                cin,
                swt.ptr_at(t * cout * cin),
                c_buf.ptr_at((bi * f + f0) * s * cout),
                cout,
                if t == p { gemm_bias } else { None },
                if t == p { 0.0 } else { 1.0 },
            )?;
        }
    }
    if let Some(acc) = acc {
        bias_round(&dev, dt, acc.ptr(), bias_ptr, out.ptr(), b * f * s, cout)?;
        drop(acc);
    }
    Ok(out.into_tensor(&shape))
}

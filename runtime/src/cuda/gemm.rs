//! Tensor-level GEMM ops: matmul, linear, linear_to (f32 output straight from the fp32
//! accumulator), linear_add (residual as the GEMM's C). Each builds a [`Gemm`] on its tensors'
//! buffers and runs it through the engine in `blas.rs` (cuBLASLt, classic cuBLAS fallback), the
//! bias in the GEMM epilogue (fp32, one rounding; see blas.rs for the bias dtypes).

use super::blas::{gemm_rows, gemm_rows_to, Gemm};
use super::device::{storage, Keep};
use super::epilogue::convert;
use crate::{DType, Error, Result, Tensor};

/// a [batch, M, K] x b [batch_b, K, N] (or [batch_b, N, K] with trans_b) -> [batch, M, N].
pub(crate) fn matmul(a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
    const OP: &str = "matmul";
    let (sa, sb) = (storage(a, OP)?, storage(b, OP)?);
    let dev = sa.dev().clone();
    let (batch, m, k) = (a.dim(0), a.dim(1), a.dim(2));
    let batch_b = b.dim(0);
    let n = if trans_b { b.dim(1) } else { b.dim(2) };
    if k == 0 {
        let z = dev.alloc_zeros(a.dtype(), batch * m * n)?;
        return Ok(z.into_tensor(&[batch, m, n]));
    }
    let out = dev.alloc(a.dtype(), batch * m * n)?;
    let ldb = if trans_b { k } else { n };
    let g = if batch_b == 1 {
        // B shared by every batch: one GEMM with the batches stacked along M.
        Gemm {
            dtype: a.dtype(),
            c_dtype: a.dtype(),
            m: batch * m,
            n,
            k,
            a: sa.ptr(),
            lda: k,
            b: sb.ptr(),
            ldb,
            trans_b,
            c: out.ptr(),
            c_src: out.ptr(),
            ldc: n,
            bias: None,
            beta: 0.0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    } else {
        Gemm {
            dtype: a.dtype(),
            c_dtype: a.dtype(),
            m,
            n,
            k,
            a: sa.ptr(),
            lda: k,
            b: sb.ptr(),
            ldb,
            trans_b,
            c: out.ptr(),
            c_src: out.ptr(),
            ldc: n,
            bias: None,
            beta: 0.0,
            batch,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
        }
    };
    dev.blas()?.run(&dev, &g)?;
    Ok(out.into_tensor(&[batch, m, n]))
}

/// x [rows, K] · w[N, K]^T + bias[N] -> [rows, N]; the bias in x's dtype or F32 (added to the fp32
/// accumulator in the epilogue, D rounded once).
pub(crate) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    let (sx, sw) = (storage(x, OP)?, storage(w, OP)?);
    // The handle keeps the bias buffer alive until the launch is enqueued.
    let bias_ref = bias.map(|b| storage(b, OP)).transpose()?;
    let bias_ptr = bias_ref.as_ref().map(|s| (s.ptr(), s.dtype()));
    let dev = sx.dev().clone();
    let (rows, k) = (x.dim(0), x.dim(1));
    let n = w.dim(0);
    let out = dev.alloc(x.dtype(), rows * n)?;
    gemm_rows(
        &dev,
        x.dtype(),
        rows,
        n,
        k,
        sx.ptr(),
        k,
        sw.ptr(),
        out.ptr(),
        n,
        bias_ptr,
        0.0,
    )?;
    Ok(out.into_tensor(&[rows, n]))
}

/// (device address, dtype) of a GEMM's epilogue bias.
type BiasArg = (u64, DType);

/// The epilogue bias for a GEMM writing D of dtype `d_dtype`: (address, dtype) of the bias when it is
/// `d_dtype` or F32 (what cuBLASLt takes), else of an f32 copy (N elements), returned too so the
/// caller drops it after the GEMM is enqueued (stream-ordered free).
fn epilogue_bias(
    bias: Option<&Tensor>,
    d_dtype: DType,
    op: &'static str,
) -> Result<(Option<BiasArg>, Option<Keep>)> {
    let Some(b) = bias else {
        return Ok((None, None));
    };
    let sb = storage(b, op)?;
    if sb.dtype() == d_dtype || sb.dtype() == DType::F32 {
        return Ok((Some((sb.ptr(), sb.dtype())), Some(Keep::Held(sb))));
    }
    let wb = convert(&sb, DType::F32)?;
    Ok((Some((wb.ptr(), DType::F32)), Some(Keep::Copy(wb))))
}

/// x [rows, K] · w[N, K]^T + bias[N] written as `out` (x's dtype, or F32 straight from the fp32
/// accumulator: C of dtype F32, no rounding to x's dtype and no widening pass). A bias of x's dtype
/// under an f32 output is widened to f32 first (N elements): cuBLASLt takes the bias in D's dtype
/// or F32.
pub(crate) fn linear_to(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out_dt: DType,
) -> Result<Tensor> {
    const OP: &str = "linear_to";
    if out_dt == x.dtype() {
        return linear(x, w, bias);
    }
    if out_dt != DType::F32 {
        return Err(Error::dtype(
            OP,
            format!(
                "output {out_dt:?} from {:?} x (x's dtype or F32)",
                x.dtype()
            ),
        ));
    }
    let (sx, sw) = (storage(x, OP)?, storage(w, OP)?);
    let dev = sx.dev().clone();
    let (rows, k) = (x.dim(0), x.dim(1));
    let n = w.dim(0);
    if k == 0 {
        return linear(x, w, bias)?.to_dtype(out_dt);
    }
    let (bias_arg, widened) = epilogue_bias(bias, DType::F32, OP)?;
    let out = dev.alloc(DType::F32, rows * n)?;
    gemm_rows_to(
        &dev,
        x.dtype(),
        DType::F32,
        rows,
        n,
        k,
        sx.ptr(),
        k,
        sw.ptr(),
        out.ptr(),
        n,
        bias_arg,
        0.0,
    )?;
    drop(widened); // stream-ordered free after the GEMM that reads it
    Ok(out.into_tensor(&[rows, n]))
}

/// residual [rows, N] + (x [rows, K] · w[N, K]^T + bias[N]), written in residual's dtype (x's dtype
/// or F32): ONE GEMM with C = residual (beta = 1), D = a fresh buffer, the bias in the epilogue, so
/// the product is never rounded to x's dtype before the add (the fused form `Backend::linear_add`
/// allows) and no separate add pass runs. A bias of x's dtype under an f32 residual is widened to f32
/// first (N elements): cuBLASLt takes the bias in D's dtype or F32.
pub(crate) fn linear_add(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "linear_add";
    let (sx, sw, sr) = (storage(x, OP)?, storage(w, OP)?, storage(residual, OP)?);
    let dev = sx.dev().clone();
    let (rows, k) = (x.dim(0), x.dim(1));
    let n = w.dim(0);
    let rdt = residual.dtype();
    if residual.shape() != [rows, n] || (rdt != x.dtype() && rdt != DType::F32) {
        return Err(Error::shape(
            OP,
            format!(
                "residual {:?} {rdt:?} for x {:?} {:?} and weight {:?}",
                residual.shape(),
                x.shape(),
                x.dtype(),
                w.shape()
            ),
        ));
    }
    if k == 0 {
        let y = linear(x, w, bias)?;
        // No product to fuse: the plain elementwise add (through `ops`: the op modules do not
        // call each other).
        return crate::ops::add_to(residual, &y, rdt);
    }
    // (address, dtype) of the bias, widened to f32 when it is neither D's dtype nor F32.
    let (bias_arg, widened) = epilogue_bias(bias, rdt, OP)?;
    let out = dev.alloc(rdt, rows * n)?;
    dev.blas()?.run(
        &dev,
        &Gemm {
            dtype: x.dtype(),
            c_dtype: rdt,
            m: rows,
            n,
            k,
            a: sx.ptr(),
            lda: k,
            b: sw.ptr(),
            ldb: k,
            trans_b: true,
            c: out.ptr(),
            c_src: sr.ptr(),
            ldc: n,
            bias: bias_arg,
            beta: 1.0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        },
    )?;
    drop(widened); // stream-ordered free after the GEMM
    Ok(out.into_tensor(&[rows, n]))
}

//! Matrix products: batched matmul and the PyTorch Linear family.

use super::{backend, backend_mixed, check_params, expect_rank, expect_vec, same_device_dtype};
use crate::{DType, Error, Result, Tensor};

/// Batched matmul: a [..., M, K] x b [..., K, N] -> [..., M, N]. `b` may be 2-D (shared by all batches)
/// or have a batch equal to a's.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_impl(a, b, false)
}

/// a [..., M, K] x b[..., N, K]^T -> [..., M, N].
pub fn matmul_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_impl(a, b, true)
}

fn matmul_impl(a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
    const OP: &str = "matmul";
    same_device_dtype(OP, &[a, b])?;
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::shape(
            OP,
            format!("need rank >= 2: {:?} x {:?}", a.shape(), b.shape()),
        ));
    }
    let (m, k) = (a.dim(a.rank() - 2), a.dim(a.rank() - 1));
    let (kb, n) = if trans_b {
        (b.dim(b.rank() - 1), b.dim(b.rank() - 2))
    } else {
        (b.dim(b.rank() - 2), b.dim(b.rank() - 1))
    };
    let batch: usize = a.shape()[..a.rank() - 2].iter().product();
    let batch_b: usize = b.shape()[..b.rank() - 2].iter().product();
    if k != kb || (batch_b != 1 && batch_b != batch) {
        return Err(Error::shape(
            OP,
            format!("{:?} x {:?} (trans_b {trans_b})", a.shape(), b.shape()),
        ));
    }
    let a3 = a.reshape(&[batch, m, k])?;
    let b3 = b.reshape(&[batch_b, b.dim(b.rank() - 2), b.dim(b.rank() - 1)])?;
    let out = backend(a, OP)?.matmul(&a3, &b3, trans_b)?;
    let mut shape = a.shape()[..a.rank() - 2].to_vec();
    shape.extend([m, n]);
    out.reshape(&shape)
}

/// Shared checks of the Linear family: x [..., K], w [N, K], bias [N] (x's dtype or F32) on x's
/// device. Returns (N, K).
fn check_linear(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(usize, usize)> {
    same_device_dtype(op, &[x, w])?;
    expect_rank(op, "weight", w, 2)?;
    let (n, k) = (w.dim(0), w.dim(1));
    if x.rank() == 0 || x.dim(x.rank() - 1) != k {
        return Err(Error::shape(
            op,
            format!("x {:?} vs weight {:?}", x.shape(), w.shape()),
        ));
    }
    if let Some(b) = bias {
        check_params(op, x, x.dtype(), "bias", &[b])?;
        expect_vec(op, "bias", b, n)?;
    }
    Ok((n, k))
}

/// PyTorch Linear: x [..., K], w [N, K], bias [N] -> [..., N].
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    let (n, k) = check_linear(OP, x, w, bias)?;
    let rows = x.elem_count() / k;
    let out = backend(x, OP)?.linear(&x.reshape(&[rows, k])?, w, bias)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    out.reshape(&shape)
}

/// [`linear`] written as `out`: x's dtype or F32 (a bf16 projection entering the f32 residual
/// stream, e.g. a transformer's `proj_in`, without a separate widening pass or a bf16 rounding).
pub fn linear_to(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: DType) -> Result<Tensor> {
    const OP: &str = "linear_to";
    if out != x.dtype() && out != DType::F32 {
        return Err(Error::dtype(
            OP,
            format!("output {out:?} from {:?} x (x's dtype or F32)", x.dtype()),
        ));
    }
    if out == x.dtype() {
        return linear(x, w, bias);
    }
    let (n, k) = check_linear(OP, x, w, bias)?;
    let rows = x.elem_count() / k;
    let y = backend_mixed(x, &[out], OP)?.linear_to(&x.reshape(&[rows, k])?, w, bias, out)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    y.reshape(&shape)
}

/// residual [..., N] + linear(x [..., K], w [N, K], bias [N]), in residual's dtype: x's dtype or F32
/// (an f32 residual stream plus a bf16 branch's output projection, one op).
pub fn linear_add(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "linear_add";
    let (n, k) = check_linear(OP, x, w, bias)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    if residual.shape() != shape.as_slice() {
        return Err(Error::shape(
            OP,
            format!("residual {:?} for an output {shape:?}", residual.shape()),
        ));
    }
    if residual.device() != x.device() {
        return Err(Error::DeviceMismatch {
            op: OP,
            a: x.device(),
            b: residual.device(),
        });
    }
    if residual.dtype() != x.dtype() && residual.dtype() != DType::F32 {
        return Err(Error::dtype(
            OP,
            format!(
                "residual dtype {:?} with {:?} x (must match or be F32)",
                residual.dtype(),
                x.dtype()
            ),
        ));
    }
    let rows = x.elem_count() / k;
    let dts = [residual.dtype()];
    let out = backend_mixed(x, &dts, OP)?.linear_add(
        &x.reshape(&[rows, k])?,
        w,
        bias,
        &residual.reshape(&[rows, n])?,
    )?;
    out.reshape(&shape)
}

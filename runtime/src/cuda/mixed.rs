//! Ops whose operands mix f32 with bf16/f16: the f32 residual stream next to bf16 branches, f32
//! biases and norm parameters next to bf16 activations (the precision policy of `vi_model`).
//!
//! Where no fused kernel covers a combination, it is bridged here with the same-dtype kernels:
//! inputs widened to f32, the f32 kernel, one rounding to the output dtype. The numerics are then
//! exactly the op's contract (fp32 math, one rounding per output), at the cost of the extra
//! conversion passes. Callers route here only when the dtypes actually differ.

use super::{elementwise, norm};
use crate::ops::BinaryOp;
use crate::{DType, Result, Tensor};

fn up(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// True when every tensor has dtype `dt`.
pub(crate) fn all_of(dt: DType, ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == dt)
}

/// y [.., n] (the bias-free op output, dtype of x) + bias [n] (f32), rounded once more to y's dtype.
pub(crate) fn add_f32_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = bias.elem_count();
    let mut bshape = vec![1; y.rank()];
    if let Some(last) = bshape.last_mut() {
        *last = n;
    }
    let y32 = up(y)?;
    elementwise::binary(&y32, &up(bias)?.reshape(&bshape)?, BinaryOp::Add, y.shape())?
        .to_dtype(y.dtype())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_apply(
    x: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
    out: DType,
) -> Result<Tensor> {
    norm::group_norm_apply(&up(x)?, &up(stats)?, &up(gamma)?, &up(beta)?, eps, silu)?.to_dtype(out)
}

pub(crate) fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
    out: DType,
) -> Result<Tensor> {
    norm::group_norm(&up(x)?, groups, &up(gamma)?, &up(beta)?, eps, silu)?.to_dtype(out)
}

pub(crate) fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    out: DType,
) -> Result<Tensor> {
    norm::layer_norm(&up(x)?, &up(gamma)?, &up(beta)?, eps)?.to_dtype(out)
}

pub(crate) fn binary(
    a: &Tensor,
    b: &Tensor,
    op: BinaryOp,
    out_shape: &[usize],
    out: DType,
) -> Result<Tensor> {
    elementwise::binary(&up(a)?, &up(b)?, op, out_shape)?.to_dtype(out)
}

//! The last-resort bridge for dtype combinations that no fused kernel covers.
//!
//! The precision policy of `vi_model` (f32 residual stream next to bf16/f16 branches, f32 biases
//! and norm parameters next to bf16/f16 activations) is fused everywhere:
//! * norms (`norm.rs`): x f32 or T, output x's dtype or bf16/f16 from an f32 x, gamma/beta read as
//!   fp32 (bf16/f16 ones widened once, C elements), stats f32 or x's dtype;
//! * binary ops (`elementwise.rs`, `binary_mx_*`): (F32, T -> F32), (T, F32 -> F32), (T, T -> F32);
//! * biases: F32 bias with bf16/f16 GEMMs (cuBLASLt epilogue), cuDNN convolutions
//!   (`bias_add_f32b`) and temporal convolutions (`bias_round_f32b`) — see gemm.rs / conv.rs.
//!
//! What is left for this module: combinations `crate::ops` does not produce today and no kernel is
//! instantiated for — a norm of a bf16 x written as f16 (or f16 as bf16, or a 16-bit x as f32),
//! and binary ops with one bf16 and one f16 operand. They run here as inputs widened to f32, the
//! f32 kernel, one rounding to the output dtype: the op's numeric contract, at the cost of the
//! conversion passes.

use super::{elementwise, norm};
use crate::ops::BinaryOp;
use crate::{DType, Result, Tensor};

fn up(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
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
    norm::group_norm_apply(&up(x)?, &up(stats)?, gamma, beta, eps, silu, out)
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
    norm::group_norm(&up(x)?, groups, gamma, beta, eps, silu, out)
}

pub(crate) fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    out: DType,
) -> Result<Tensor> {
    norm::layer_norm(&up(x)?, gamma, beta, eps, out)
}

pub(crate) fn binary(
    a: &Tensor,
    b: &Tensor,
    op: BinaryOp,
    out_shape: &[usize],
    out: DType,
) -> Result<Tensor> {
    elementwise::binary(&up(a)?, &up(b)?, op, out_shape, DType::F32)?.to_dtype(out)
}

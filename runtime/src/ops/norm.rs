//! Normalisations: GroupNorm (whole, or statistics + apply across ranks), LayerNorm, softmax.

use super::{backend, backend_mixed, check_params, expect_rank, expect_vec};
use crate::{DType, Error, Result, Tensor};

/// What a GroupNorm backend call applies after the statistics: y = (x - mean) / sqrt(var + eps) *
/// gamma + beta, then SiLU when `silu`, rounded once to `out`. gamma/beta [C] are `out`'s dtype or
/// F32 (validated by [`group_norm_to`] / [`group_norm_apply_to`]).
#[derive(Clone, Copy)]
pub(crate) struct GroupNormParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f32,
    pub silu: bool,
    pub out: DType,
}

/// Output dtypes a normalisation may write: x's own, or bf16/f16 from an f32 input (an f32 residual
/// stream normalised straight into the reduced-precision operand of the next GEMM).
fn check_norm_out(op: &'static str, x: &Tensor, out: DType) -> Result<()> {
    if out != x.dtype() && x.dtype() != DType::F32 {
        return Err(Error::dtype(
            op,
            format!(
                "output {out:?} from {:?} input (only x's dtype, or any from F32)",
                x.dtype()
            ),
        ));
    }
    Ok(())
}

fn check_gn(op: &'static str, x: &Tensor, groups: usize) -> Result<()> {
    expect_rank(op, "x", x, 3)?;
    if groups == 0 || !x.dim(2).is_multiple_of(groups) {
        return Err(Error::shape(
            op,
            format!("{} channels not divisible into {groups} groups", x.dim(2)),
        ));
    }
    Ok(())
}

/// GroupNorm (+ optional fused SiLU) of x [N, S, C]: statistics per n and group over S x C/G.
/// Spatial GroupNorm: N = frames, S = H*W. Temporal GroupNorm: N = batch, S = F*H*W.
/// Output in x's dtype; see [`group_norm_to`].
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    group_norm_to(x, groups, gamma, beta, eps, silu, x.dtype())
}

/// [`group_norm`] writing `out` (x's dtype, or bf16/f16 from an f32 x); gamma/beta F32 or `out`.
pub fn group_norm_to(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
    out: DType,
) -> Result<Tensor> {
    const OP: &str = "group_norm";
    check_norm_out(OP, x, out)?;
    check_params(OP, x, out, "gamma/beta", &[gamma, beta])?;
    check_gn(OP, x, groups)?;
    expect_vec(OP, "gamma", gamma, x.dim(2))?;
    expect_vec(OP, "beta", beta, x.dim(2))?;
    let p = GroupNormParams {
        gamma,
        beta,
        eps,
        silu,
        out,
    };
    backend_mixed(x, &[out, gamma.dtype(), beta.dtype()], OP)?.group_norm(x, groups, &p)
}

/// Partial GroupNorm statistics of x [N, S, C]: [N, G, 3] = (count, mean, M2) per (n, group), to be
/// combined across ranks (Chan's parallel variance) and applied with [`group_norm_apply`].
pub fn group_norm_stats(x: &Tensor, groups: usize) -> Result<Tensor> {
    const OP: &str = "group_norm_stats";
    check_gn(OP, x, groups)?;
    backend(x, OP)?.group_norm_stats(x, groups)
}

/// Normalise x [N, S, C] with given stats [N, G, 2] = (mean, biased variance); stats may be F32 when
/// x is stored in bf16/f16. Output in x's dtype; see [`group_norm_apply_to`].
pub fn group_norm_apply(
    x: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    group_norm_apply_to(x, stats, gamma, beta, eps, silu, x.dtype())
}

/// [`group_norm_apply`] writing `out` (x's dtype, or bf16/f16 from an f32 x).
pub fn group_norm_apply_to(
    x: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
    out: DType,
) -> Result<Tensor> {
    const OP: &str = "group_norm_apply";
    check_norm_out(OP, x, out)?;
    check_params(OP, x, out, "gamma/beta", &[gamma, beta])?;
    // Statistics may be f32 whatever x's storage type (bf16 activations keep f32 statistics).
    if stats.device() != x.device() {
        return Err(Error::DeviceMismatch {
            op: OP,
            a: x.device(),
            b: stats.device(),
        });
    }
    if stats.dtype() != x.dtype() && stats.dtype() != DType::F32 {
        return Err(Error::dtype(
            OP,
            format!(
                "stats {:?} with {:?} x (must match or be F32)",
                stats.dtype(),
                x.dtype()
            ),
        ));
    }
    expect_rank(OP, "x", x, 3)?;
    expect_rank(OP, "stats", stats, 3)?;
    let g = stats.dim(1);
    check_gn(OP, x, g)?;
    if stats.dim(0) != x.dim(0) || stats.dim(2) != 2 {
        return Err(Error::shape(
            OP,
            format!("stats {:?} for x {:?}", stats.shape(), x.shape()),
        ));
    }
    expect_vec(OP, "gamma", gamma, x.dim(2))?;
    expect_vec(OP, "beta", beta, x.dim(2))?;
    let p = GroupNormParams {
        gamma,
        beta,
        eps,
        silu,
        out,
    };
    backend_mixed(x, &[out, stats.dtype(), gamma.dtype(), beta.dtype()], OP)?
        .group_norm_apply(x, stats, &p)
}

/// LayerNorm over the last dim, output in x's dtype; see [`layer_norm_to`].
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    layer_norm_to(x, gamma, beta, eps, x.dtype())
}

/// LayerNorm writing `out` (x's dtype, or bf16/f16 from an f32 x); gamma/beta F32 or `out`.
pub fn layer_norm_to(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    out: DType,
) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    check_norm_out(OP, x, out)?;
    check_params(OP, x, out, "gamma/beta", &[gamma, beta])?;
    let c = *x.shape().last().ok_or_else(|| Error::shape(OP, "scalar"))?;
    expect_vec(OP, "gamma", gamma, c)?;
    expect_vec(OP, "beta", beta, c)?;
    backend_mixed(x, &[out, gamma.dtype(), beta.dtype()], OP)?.layer_norm(x, gamma, beta, eps, out)
}

/// Softmax over the last dim.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    backend(x, "softmax")?.softmax_last(x)
}

//! Reduced-precision storage on the CPU: f16/bf16 tensors are widened to f32, the f32 reference op
//! runs, and the result is rounded once to the storage dtype of the op's first input.
//!
//! This is the numeric contract of the CUDA backend (bf16/f16 storage, fp32 accumulation inside
//! every op, one rounding per output), so the end-to-end error of a reduced-precision run can be
//! measured against the golden files on a machine without a GPU. It is not a fast path: every op
//! converts its inputs. Mixed inputs (f32 statistics, f32 biases/norm parameters, an f32 residual
//! stream next to bf16 activations) are widened alike; ops with an explicit output dtype round to
//! it, the others to their first input's dtype. GroupNorm statistics stay f32.

use super::CpuBackend;
use crate::ops::{
    Backend, BinaryOp, Conv2dGeom, DualScopeParams, GroupNormParams, TemporalConvGeom, UnaryOp,
};
use crate::{DType, Result, Tensor};

pub(crate) struct RoundedCpuBackend;

fn up(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

fn up_opt(t: Option<&Tensor>) -> Result<Option<Tensor>> {
    t.map(up).transpose()
}

const F32: CpuBackend = CpuBackend;

impl Backend for RoundedCpuBackend {
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        F32.matmul(&up(a)?, &up(b)?, trans_b)?.to_dtype(a.dtype())
    }
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        F32.linear(&up(x)?, &up(w)?, up_opt(bias)?.as_ref())?
            .to_dtype(x.dtype())
    }
    /// As on the GPU: `out` straight from the f32 product (one rounding).
    fn linear_to(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: DType,
    ) -> Result<Tensor> {
        F32.linear(&up(x)?, &up(w)?, up_opt(bias)?.as_ref())?
            .to_dtype(out)
    }
    /// Fused as on the GPU (one GEMM with C = residual): the product is not rounded before the
    /// add; one rounding, to residual's dtype.
    fn linear_add(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        F32.linear_add(&up(x)?, &up(w)?, up_opt(bias)?.as_ref(), &up(residual)?)?
            .to_dtype(residual.dtype())
    }
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &Conv2dGeom,
    ) -> Result<Tensor> {
        F32.conv2d(&up(x)?, &up(w)?, up_opt(bias)?.as_ref(), g)?
            .to_dtype(x.dtype())
    }
    fn temporal_conv(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &TemporalConvGeom,
    ) -> Result<Tensor> {
        F32.temporal_conv(&up(x)?, &up(w)?, up_opt(bias)?.as_ref(), g)?
            .to_dtype(x.dtype())
    }
    /// Statistics stay F32 (the op's contract for every dtype).
    fn group_norm_stats(&self, x: &Tensor, groups: usize) -> Result<Tensor> {
        F32.group_norm_stats(&up(x)?, groups)
    }
    fn group_norm_apply(&self, x: &Tensor, stats: &Tensor, p: &GroupNormParams) -> Result<Tensor> {
        let (x, s, g, b) = (up(x)?, up(stats)?, up(p.gamma)?, up(p.beta)?);
        let wide = GroupNormParams {
            gamma: &g,
            beta: &b,
            out: DType::F32,
            ..*p
        };
        F32.group_norm_apply(&x, &s, &wide)?.to_dtype(p.out)
    }
    fn group_norm(&self, x: &Tensor, groups: usize, p: &GroupNormParams) -> Result<Tensor> {
        let (g, b) = (up(p.gamma)?, up(p.beta)?);
        let wide = GroupNormParams {
            gamma: &g,
            beta: &b,
            out: DType::F32,
            ..*p
        };
        F32.group_norm(&up(x)?, groups, &wide)?.to_dtype(p.out)
    }
    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        out: DType,
    ) -> Result<Tensor> {
        F32.layer_norm(&up(x)?, &up(gamma)?, &up(beta)?, eps, DType::F32)?
            .to_dtype(out)
    }
    fn softmax_last(&self, x: &Tensor) -> Result<Tensor> {
        F32.softmax_last(&up(x)?)?.to_dtype(x.dtype())
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        bias: Option<&Tensor>,
        causal: bool,
    ) -> Result<Tensor> {
        F32.attention(
            &up(q)?,
            &up(k)?,
            &up(v)?,
            scale,
            up_opt(bias)?.as_ref(),
            causal,
        )?
        .to_dtype(q.dtype())
    }
    fn dual_scope_attention(
        &self,
        q: &Tensor,
        k_local: &Tensor,
        v_local: &Tensor,
        k_glob: &Tensor,
        v_glob: &Tensor,
        p: &DualScopeParams,
    ) -> Result<Tensor> {
        F32.dual_scope_attention(
            &up(q)?,
            &up(k_local)?,
            &up(v_local)?,
            &up(k_glob)?,
            &up(v_glob)?,
            p,
        )?
        .to_dtype(q.dtype())
    }
    fn unary(&self, x: &Tensor, op: UnaryOp) -> Result<Tensor> {
        F32.unary(&up(x)?, op)?.to_dtype(x.dtype())
    }
    fn geglu(&self, x: &Tensor) -> Result<Tensor> {
        F32.geglu(&up(x)?)?.to_dtype(x.dtype())
    }
    fn binary(
        &self,
        a: &Tensor,
        b: &Tensor,
        op: BinaryOp,
        out_shape: &[usize],
        out: DType,
    ) -> Result<Tensor> {
        F32.binary(&up(a)?, &up(b)?, op, out_shape, DType::F32)?
            .to_dtype(out)
    }
    fn affine(&self, x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
        F32.affine(&up(x)?, mul, add)?.to_dtype(x.dtype())
    }
    fn clamp(&self, x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
        F32.clamp(&up(x)?, lo, hi)?.to_dtype(x.dtype())
    }
    // Layout ops move stored values: widening and rounding back is exact.
    fn concat(&self, xs: &[&Tensor], axis: usize) -> Result<Tensor> {
        let wide = xs.iter().map(|t| up(t)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = wide.iter().collect();
        F32.concat(&refs, axis)?.to_dtype(xs[0].dtype())
    }
    fn index_select(&self, x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor> {
        F32.index_select(&up(x)?, axis, indices)?
            .to_dtype(x.dtype())
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        F32.permute(&up(x)?, perm)?.to_dtype(x.dtype())
    }
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        F32.upsample_nearest2x(&up(x)?)?.to_dtype(x.dtype())
    }
    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        F32.embedding(ids, &up(table)?)?.to_dtype(table.dtype())
    }
}

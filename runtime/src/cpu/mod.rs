//! The CPU reference backend: f32, contiguous row-major, channels-last, multi-threaded with rayon,
//! GEMMs through the `gemm` crate (strided operands, so transposed weights are never copied).
//!
//! Every op is checked against a straightforward f64 reference in `runtime/tests/cpu_ops.rs`.

mod attention;
mod conv;
mod elementwise;
mod gemm;
mod layout;
mod norm;
mod rounded;

pub(crate) use rounded::RoundedCpuBackend;

use crate::ops::{
    Backend, BinaryOp, Conv2dGeom, DualScopeParams, GroupNormParams, TemporalConvGeom, UnaryOp,
};
use crate::{DType, Result, Tensor};

pub(crate) struct CpuBackend;

/// Wrap a freshly computed buffer (always `shape.product()` elements) as a CPU f32 tensor.
pub(crate) fn out(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape)
}

/// Work (in elements) below which an elementwise op runs on the calling thread.
pub(crate) const PAR_MIN: usize = 1 << 15;

impl Backend for CpuBackend {
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        gemm::matmul(a, b, trans_b)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        gemm::linear(x, w, bias)
    }
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &Conv2dGeom,
    ) -> Result<Tensor> {
        conv::conv2d(x, w, bias, g)
    }
    fn temporal_conv(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &TemporalConvGeom,
    ) -> Result<Tensor> {
        conv::temporal_conv(x, w, bias, g)
    }
    fn group_norm_stats(&self, x: &Tensor, groups: usize) -> Result<Tensor> {
        norm::group_norm_stats(x, groups)
    }
    fn group_norm_apply(&self, x: &Tensor, stats: &Tensor, p: &GroupNormParams) -> Result<Tensor> {
        // Dispatched here only when every input and `p.out` are F32 (ops::backend_mixed).
        norm::group_norm_apply(x, stats, p)
    }
    fn group_norm(&self, x: &Tensor, groups: usize, p: &GroupNormParams) -> Result<Tensor> {
        norm::group_norm(x, groups, p)
    }
    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        _out: DType,
    ) -> Result<Tensor> {
        norm::layer_norm(x, gamma, beta, eps)
    }
    fn softmax_last(&self, x: &Tensor) -> Result<Tensor> {
        norm::softmax_last(x)
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
        attention::attention(q, k, v, scale, bias, causal)
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
        attention::dual_scope_attention(q, k_local, v_local, k_glob, v_glob, p)
    }
    fn unary(&self, x: &Tensor, op: UnaryOp) -> Result<Tensor> {
        elementwise::unary(x, op)
    }
    fn geglu(&self, x: &Tensor) -> Result<Tensor> {
        elementwise::geglu(x)
    }
    fn binary(
        &self,
        a: &Tensor,
        b: &Tensor,
        op: BinaryOp,
        out_shape: &[usize],
        _out: DType,
    ) -> Result<Tensor> {
        elementwise::binary(a, b, op, out_shape)
    }
    fn affine(&self, x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
        elementwise::affine(x, mul, add)
    }
    fn clamp(&self, x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
        elementwise::clamp(x, lo, hi)
    }
    fn concat(&self, xs: &[&Tensor], axis: usize) -> Result<Tensor> {
        layout::concat(xs, axis)
    }
    fn index_select(&self, x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor> {
        layout::index_select(x, axis, indices)
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        layout::permute(x, perm)
    }
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        layout::upsample_nearest2x(x)
    }
    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        layout::embedding(ids, table)
    }
}

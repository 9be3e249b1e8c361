//! CUDA backend (feature `cuda`): bf16 activations (f32 and f16 also supported), fp32 accumulation in
//! every kernel and GEMM. This file is the top of the backend: the [`CudaBackend`] dispatch of the op
//! vocabulary and the public API; the modules form a tree (each imports only modules below it):
//!
//! * `device.rs`: [`CudaDevice`] (one per ordinal, cached: the cudarc context, the single stream all
//!   work of this device is queued on, the loaded kernel modules, the memory pool, per-device library
//!   state) and [`CudaStorage`] (one typed device buffer, the `Storage::Cuda` payload of a
//!   [`Tensor`]); `timing.rs` (the per-device profiler it holds).
//! * `launch.rs`: how every kernel is launched (configuration, argument packing, vector widths,
//!   dtype suffixes, by-value `Dims`); `epilogue.rs`: bias add, bias-and-round-once and dtype
//!   conversion passes.
//! * `blas.rs`: the GEMM engine (cuBLASLt with its plan cache, classic cuBLAS fallback);
//!   `cudnn.rs`: kxk convolutions through cuDNN.
//! * op modules, which never import each other: `gemm.rs` (matmul, linear), `conv.rs` (1x1, kxk,
//!   temporal), `elementwise.rs`, `layout.rs`, `norm.rs` (GroupNorm / LayerNorm / softmax),
//!   `attention.rs`; kernels in `cuda/kernels/*.cu` (see docs/kernels.md).
//! * `profile.rs`: the public profiling switches (`VI_PROFILE=1` or [`profile::set_enabled`];
//!   [`profile::take_report`] returns the totals).
//!
//! Robustness: cudarc loads libcuda / libcublasLt / libcudnn lazily and panics when they are
//! missing; every entry here checks for the library first and catches panics of the first
//! initialisation, so a machine without a GPU gets an `Error::Cuda` ("no CUDA driver found ..."),
//! never a panic.

pub(crate) mod attention;
pub(crate) mod blas;
pub(crate) mod conv;
pub mod cudnn;
pub(crate) mod device;
pub(crate) mod elementwise;
pub(crate) mod epilogue;
pub(crate) mod gemm;
pub(crate) mod launch;
pub(crate) mod layout;
pub(crate) mod norm;
pub mod profile;
pub(crate) mod timing;

pub use attention::{attn_kernel, set_attn_kernel, AttnKernel};
pub use blas::lt_refusals;
pub use conv::clear_weight_cache;
pub use cudnn::{conv_algo, set_conv_algo, ConvAlgo};
pub use device::{
    device_count, device_info, is_available, set_poison_allocations, synchronize, CudaBuf,
    CudaDevice, CudaStorage,
};
pub use elementwise::{full, random_normal};

use crate::ops::{
    Backend, BinaryOp, Conv2dGeom, DualScopeParams, GroupNormParams, TemporalConvGeom, UnaryOp,
};
use crate::{DType, Result, Tensor};

/// The CUDA implementation of the op vocabulary.
pub(crate) struct CudaBackend;

impl Backend for CudaBackend {
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        let _p = profile::scope(a, "matmul")?;
        gemm::matmul(a, b, trans_b)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let _p = profile::scope(x, "linear")?;
        // The bias (x's dtype or F32) goes to the GEMM epilogue.
        gemm::linear(x, w, bias)
    }
    fn linear_add(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let _p = profile::scope(x, "linear_add")?;
        // One GEMM: C = residual (beta = 1), D fresh, bias in the epilogue (fp32, one rounding).
        gemm::linear_add(x, w, bias, residual)
    }
    fn linear_to(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: DType,
    ) -> Result<Tensor> {
        let _p = profile::scope(x, "linear")?;
        gemm::linear_to(x, w, bias, out)
    }
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &Conv2dGeom,
    ) -> Result<Tensor> {
        let kind = if g.kh * g.kw == 1 {
            "conv2d_1x1"
        } else {
            "conv2d_kxk"
        };
        let _p = profile::scope(x, kind)?;
        conv::conv2d(x, w, bias, g)
    }
    fn temporal_conv(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &TemporalConvGeom,
    ) -> Result<Tensor> {
        let _p = profile::scope(x, "temporal_conv")?;
        conv::temporal_conv(x, w, bias, g)
    }
    fn group_norm_stats(&self, x: &Tensor, groups: usize) -> Result<Tensor> {
        let _p = profile::scope(x, "group_norm_stats")?;
        norm::group_norm_stats(x, groups)
    }
    fn group_norm_apply(&self, x: &Tensor, stats: &Tensor, p: &GroupNormParams) -> Result<Tensor> {
        let _p = profile::scope(x, "group_norm_apply")?;
        norm::group_norm_apply(x, stats, p)
    }
    fn group_norm(&self, x: &Tensor, groups: usize, p: &GroupNormParams) -> Result<Tensor> {
        let _p = profile::scope(x, "group_norm")?;
        norm::group_norm(x, groups, p)
    }
    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        out: DType,
    ) -> Result<Tensor> {
        let _p = profile::scope(x, "layer_norm")?;
        norm::layer_norm(x, gamma, beta, eps, out)
    }
    fn softmax_last(&self, x: &Tensor) -> Result<Tensor> {
        let _p = profile::scope(x, "softmax")?;
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
        let _p = profile::scope(q, "attention")?;
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
        let _p = profile::scope(q, "dual_scope_attention")?;
        attention::dual_scope_attention(q, k_local, v_local, k_glob, v_glob, p)
    }
    fn unary(&self, x: &Tensor, op: UnaryOp) -> Result<Tensor> {
        let _p = profile::scope(x, "unary")?;
        elementwise::unary(x, op)
    }
    fn geglu(&self, x: &Tensor) -> Result<Tensor> {
        let _p = profile::scope(x, "geglu")?;
        elementwise::geglu(x)
    }
    fn binary(
        &self,
        a: &Tensor,
        b: &Tensor,
        op: BinaryOp,
        out_shape: &[usize],
        out: DType,
    ) -> Result<Tensor> {
        let _p = profile::scope(a, "binary")?;
        // One dtype (the tuned kernels) or the mixed combinations `ops::binary_to` admits.
        elementwise::binary(a, b, op, out_shape, out)
    }
    fn affine(&self, x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
        let _p = profile::scope(x, "affine")?;
        elementwise::affine(x, mul, add)
    }
    fn clamp(&self, x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
        let _p = profile::scope(x, "clamp")?;
        elementwise::clamp(x, lo, hi)
    }
    fn concat(&self, xs: &[&Tensor], axis: usize) -> Result<Tensor> {
        let _p = profile::scope(xs[0], "concat")?;
        layout::concat(xs, axis)
    }
    fn index_select(&self, x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor> {
        let _p = profile::scope(x, "index_select")?;
        layout::index_select(x, axis, indices)
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        let _p = profile::scope(x, "permute")?;
        layout::permute(x, perm)
    }
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        let _p = profile::scope(x, "upsample")?;
        layout::upsample_nearest2x(x)
    }
    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        let _p = profile::scope(table, "embedding")?;
        layout::embedding(ids, table)
    }
}

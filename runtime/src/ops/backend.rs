//! The interface every backend implements (CPU reference, rounded CPU path, CUDA, meta).

use super::{BinaryOp, Conv2dGeom, DualScopeParams, GroupNormParams, TemporalConvGeom, UnaryOp};
use crate::{DType, Result, Tensor};

/// The backend interface. Inputs are already validated by the functions of this module (shapes,
/// same device, dtype supported). Outputs are fresh contiguous tensors on the inputs' device.
pub(crate) trait Backend: Sync {
    /// a [batch, M, K] x b [batch_b, K, N] -> [batch, M, N]; batch_b is `batch` or 1 (broadcast).
    /// With `trans_b`, b is [batch_b, N, K] and the product uses its transpose.
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor>;
    /// x [rows, K] · w[N, K]^T + bias[N] -> [rows, N]  (PyTorch Linear).
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;
    /// x [rows, K] · w[N, K]^T + bias[N] written as `out` (x's dtype or F32), rounded once. The
    /// default rounds to x's dtype first (exact for f32); the CUDA backend and the CPU rounded path
    /// write `out` straight from the fp32 accumulator.
    fn linear_to(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: DType,
    ) -> Result<Tensor> {
        self.linear(x, w, bias)?.to_dtype(out)
    }
    /// residual [rows, N] + (x [rows, K] · w[N, K]^T + bias[N]), written in residual's dtype (the
    /// f32 residual stream taking a bf16 branch's output projection), rounded once. The default
    /// composes `linear` and `binary` (exact for f32, the CPU reference); the CUDA backend and the
    /// CPU rounded path fuse it (GEMM with C = residual, beta = 1: the product is not rounded).
    fn linear_add(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let y = self.linear(x, w, bias)?;
        self.binary(
            residual,
            &y,
            BinaryOp::Add,
            residual.shape(),
            residual.dtype(),
        )
    }
    /// x [N, H, W, Cin], w [Cout, Cin, kh, kw] -> `g.out_shape()` [N, Ho, Wo, Cout]; zero padding
    /// `g.pad` on each side.
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &Conv2dGeom,
    ) -> Result<Tensor>;
    /// x [B, F, S, Cin], w [Cout, Cin, k] (odd k) -> `g.out_shape()` [B, F, S, Cout]; zero padding
    /// `g.pad` = (k-1)/2 frames.
    fn temporal_conv(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &TemporalConvGeom,
    ) -> Result<Tensor>;
    /// Per (n, group) statistics of x [N, S, C]: F32 [N, G, 3] = (count, mean, M2 = sum of squared
    /// deviations), whatever x's dtype.
    fn group_norm_stats(&self, x: &Tensor, groups: usize) -> Result<Tensor>;
    /// y = (x - mean) / sqrt(var + eps) * gamma + beta, optionally SiLU, written as `p.out`;
    /// x [N, S, C], stats [N, G, 2] = (mean, biased variance) per (n, group).
    fn group_norm_apply(&self, x: &Tensor, stats: &Tensor, p: &GroupNormParams) -> Result<Tensor>;
    /// GroupNorm over x [N, S, C] (stats per n and group over S and C/G), optionally fused SiLU,
    /// written as `p.out`.
    fn group_norm(&self, x: &Tensor, groups: usize, p: &GroupNormParams) -> Result<Tensor>;
    /// LayerNorm over the last dim.
    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        out: DType,
    ) -> Result<Tensor>;
    fn softmax_last(&self, x: &Tensor) -> Result<Tensor>;
    /// q [B, Sq, H, D], k [B, Sk, H, D], v [B, Sk, H, Dv] -> [B, Sq, H, Dv].
    /// logits = q·k * scale (+ bias[Sq, Sk]) (causal: key j > query i masked).
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        bias: Option<&Tensor>,
        causal: bool,
    ) -> Result<Tensor>;
    /// q [b, n, H, D]; k_local/v_local [b, n + 2p, H, D]; k_glob/v_glob [b, G, H, D] -> [b, n, H, D].
    /// Query i sees local rows i ..= i+2p (+local_bias) and all G global rows (+global_bias).
    fn dual_scope_attention(
        &self,
        q: &Tensor,
        k_local: &Tensor,
        v_local: &Tensor,
        k_glob: &Tensor,
        v_glob: &Tensor,
        p: &DualScopeParams,
    ) -> Result<Tensor>;
    fn unary(&self, x: &Tensor, op: UnaryOp) -> Result<Tensor>;
    /// x [.., 2N] -> [.., N] = x[.., :N] * gelu(x[.., N:]) (exact erf GELU).
    fn geglu(&self, x: &Tensor) -> Result<Tensor>;
    /// Elementwise with numpy broadcasting; `out_shape` is the broadcast shape.
    /// `out` is the output dtype (see [`super::binary_to`] for the allowed combinations).
    fn binary(
        &self,
        a: &Tensor,
        b: &Tensor,
        op: BinaryOp,
        out_shape: &[usize],
        out: DType,
    ) -> Result<Tensor>;
    /// x * mul + add, elementwise.
    fn affine(&self, x: &Tensor, mul: f32, add: f32) -> Result<Tensor>;
    fn clamp(&self, x: &Tensor, lo: f32, hi: f32) -> Result<Tensor>;
    /// Concatenate along `axis` (shapes equal elsewhere).
    fn concat(&self, xs: &[&Tensor], axis: usize) -> Result<Tensor>;
    /// Take `indices` along `axis` (a slice is a contiguous run of indices).
    fn index_select(&self, x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor>;
    /// Contiguous copy with dims permuted: out.dim(i) = x.dim(perm[i]).
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor>;
    /// x [N, H, W, C] -> [N, 2H, 2W, C], nearest.
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor>;
    /// rows of `table` [V, C] -> [ids.len(), C].
    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor>;
}

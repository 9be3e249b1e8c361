//! The op vocabulary: every computation the UNet3D, the CLIP text encoder and the VAE decoder need.
//!
//! Each function checks shapes/devices here, then dispatches to the backend of its inputs' device
//! (enum dispatch: CPU reference or CUDA). Models call only these functions and never branch on the
//! device. All tensors are contiguous row-major; activations are channels-last.

use crate::{DType, Device, Error, Result, Tensor};

/// Parameters of the dual-scope temporal attention (DESIGN section 3; golden README "AttentionPlugin").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DualScopeParams {
    /// Local half-window `p`: query i sees padded local positions i ..= i + 2p.
    pub pad: usize,
    /// Base logit scale (attn_scale / sqrt(head_dim)).
    pub scale: f32,
    /// Added to the logits of the 2p+1 visible local columns.
    pub local_bias: f32,
    /// Added to the logits of the G global columns.
    pub global_bias: f32,
    /// Multiply the scale by ln(2p+1+G)/ln(16) (the number of unmasked keys per row).
    pub token_num_scale: bool,
}

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
    /// x [N, H, W, Cin], w [Cout, Cin, kh, kw] -> [N, Ho, Wo, Cout]; zero padding `pad` on each side.
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor>;
    /// x [B, F, S, Cin], w [Cout, Cin, k] (odd k) -> [B, F, S, Cout]; zero padding (k-1)/2 frames.
    fn temporal_conv(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;
    /// Per (n, group) statistics of x [N, S, C]: F32 [N, G, 3] = (count, mean, M2 = sum of squared
    /// deviations), whatever x's dtype.
    fn group_norm_stats(&self, x: &Tensor, groups: usize) -> Result<Tensor>;
    /// y = (x - mean) / sqrt(var + eps) * gamma + beta, optionally SiLU; x [N, S, C], stats [N, G, 2]
    /// = (mean, biased variance) per (n, group).
    #[allow(clippy::too_many_arguments)]
    fn group_norm_apply(
        &self,
        x: &Tensor,
        stats: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        silu: bool,
        out: DType,
    ) -> Result<Tensor>;
    /// GroupNorm over x [N, S, C] (stats per n and group over S and C/G), optionally fused SiLU.
    #[allow(clippy::too_many_arguments)]
    fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        silu: bool,
        out: DType,
    ) -> Result<Tensor>;
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
    #[allow(clippy::too_many_arguments)]
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
    /// `out` is the output dtype (see [`binary_to`] for the allowed combinations).
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Silu,
    /// Exact erf GELU.
    Gelu,
    Exp,
    Sqrt,
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

fn backend(t: &Tensor, _op: &'static str) -> Result<&'static dyn Backend> {
    match t.device() {
        // f32 runs the reference directly; f16/bf16 storage runs it through one rounding per
        // output, the CUDA backend's numeric contract (see cpu/rounded.rs).
        Device::Cpu => match t.dtype() {
            DType::F32 => Ok(&crate::cpu::CpuBackend),
            DType::F16 | DType::BF16 => Ok(&crate::cpu::RoundedCpuBackend),
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(&crate::cuda::CudaBackend),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::Cuda(
            "this binary was built without the `cuda` feature".into(),
        )),
        // Shape-only dry run (memory planning): fresh meta tensors of the output shapes.
        Device::Meta => Ok(&crate::meta::MetaBackend),
    }
}

/// The backend of an op whose inputs or output mix dtypes (f32 next to bf16/f16): on the CPU the
/// f32 reference runs only when every input and the output are f32, else the rounded path.
fn backend_mixed(t: &Tensor, dtypes: &[DType], op: &'static str) -> Result<&'static dyn Backend> {
    if t.device() == Device::Cpu && dtypes.iter().any(|&d| d != DType::F32) {
        return Ok(&crate::cpu::RoundedCpuBackend);
    }
    backend(t, op)
}

/// Output dtypes a normalisation may write: x's own, or bf16/f16 from an f32 input (an f32 residual
/// stream normalised straight into the reduced-precision operand of the next GEMM).
fn check_norm_out(op: &'static str, x: &Tensor, out: DType) -> Result<()> {
    if out != x.dtype() && x.dtype() != DType::F32 {
        return Err(Error::shape(
            op,
            format!(
                "output {out:?} from {:?} input (only x's dtype, or any from F32)",
                x.dtype()
            ),
        ));
    }
    Ok(())
}

fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let d = ts[0].device();
    for t in ts {
        if t.device() != d {
            return Err(Error::DeviceMismatch {
                op,
                a: d,
                b: t.device(),
            });
        }
        if t.dtype() != ts[0].dtype() {
            return Err(Error::shape(
                op,
                format!("dtype mismatch {:?} vs {:?}", ts[0].dtype(), t.dtype()),
            ));
        }
    }
    Ok(())
}

/// Per-channel parameters (bias, norm gamma/beta) live on x's device, in `dtype` (x's dtype for a
/// bias, the output dtype for norm gamma/beta) or in f32 (the precision policy keeps 1-D parameters
/// f32 under bf16/f16 activations: they are tiny and their rounding would bias every element of the
/// output channel alike).
fn check_params(
    op: &'static str,
    x: &Tensor,
    dtype: DType,
    what: &str,
    params: &[&Tensor],
) -> Result<()> {
    for t in params {
        if t.device() != x.device() {
            return Err(Error::DeviceMismatch {
                op,
                a: x.device(),
                b: t.device(),
            });
        }
        if t.dtype() != dtype && t.dtype() != DType::F32 {
            return Err(Error::shape(
                op,
                format!(
                    "{what} dtype {:?} with {dtype:?} (must match or be F32)",
                    t.dtype()
                ),
            ));
        }
    }
    Ok(())
}

fn expect_rank(op: &'static str, name: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::shape(
            op,
            format!("{name} must have rank {rank}, got {:?}", t.shape()),
        ));
    }
    Ok(())
}

fn expect_vec(op: &'static str, name: &str, t: &Tensor, len: usize) -> Result<()> {
    if t.shape() != [len] {
        return Err(Error::shape(
            op,
            format!("{name} must be [{len}], got {:?}", t.shape()),
        ));
    }
    Ok(())
}

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
    same_device(OP, &[a, b])?;
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
    same_device(op, &[x, w])?;
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
        return Err(Error::shape(
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
        return Err(Error::shape(
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

/// 2-D convolution, channels-last: x [N, H, W, Cin], w [Cout, Cin, kh, kw] -> [N, Ho, Wo, Cout],
/// Ho = (H + 2 pad - kh) / stride + 1.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    same_device(OP, &[x, w])?;
    expect_rank(OP, "x", x, 4)?;
    expect_rank(OP, "weight", w, 4)?;
    if x.dim(3) != w.dim(1) || stride == 0 {
        return Err(Error::shape(
            OP,
            format!("x {:?} vs weight {:?}", x.shape(), w.shape()),
        ));
    }
    if x.dim(1) + 2 * pad < w.dim(2) || x.dim(2) + 2 * pad < w.dim(3) {
        return Err(Error::shape(
            OP,
            format!("input {:?} smaller than kernel {:?}", x.shape(), w.shape()),
        ));
    }
    if let Some(b) = bias {
        check_params(OP, x, x.dtype(), "bias", &[b])?;
        expect_vec(OP, "bias", b, w.dim(0))?;
    }
    backend(x, OP)?.conv2d(x, w, bias, stride, pad)
}

/// Convolution over frames (kernel k odd, zero padding (k-1)/2): x [B, F, S, Cin],
/// w [Cout, Cin, k] or the Conv3d layout [Cout, Cin, k, 1, 1] -> [B, F, S, Cout].
pub fn temporal_conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "temporal_conv";
    same_device(OP, &[x, w])?;
    expect_rank(OP, "x", x, 4)?;
    let w = match w.rank() {
        3 => w.clone(),
        5 if w.dim(3) == 1 && w.dim(4) == 1 => w.reshape(&[w.dim(0), w.dim(1), w.dim(2)])?,
        _ => {
            return Err(Error::shape(
                OP,
                format!("weight {:?} is not [Cout, Cin, k(,1,1)]", w.shape()),
            ))
        }
    };
    if x.dim(3) != w.dim(1) || w.dim(2) % 2 == 0 {
        return Err(Error::shape(
            OP,
            format!("x {:?} vs weight {:?}", x.shape(), w.shape()),
        ));
    }
    if let Some(b) = bias {
        check_params(OP, x, x.dtype(), "bias", &[b])?;
        expect_vec(OP, "bias", b, w.dim(0))?;
    }
    backend(x, OP)?.temporal_conv(x, &w, bias)
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
    backend_mixed(x, &[out, gamma.dtype(), beta.dtype()], OP)?
        .group_norm(x, groups, gamma, beta, eps, silu, out)
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
    if stats.device() != x.device() || !(stats.dtype() == x.dtype() || stats.dtype() == DType::F32)
    {
        return Err(Error::shape(
            OP,
            format!(
                "stats must be on {:?} as {:?} or F32, got {:?} on {:?}",
                x.device(),
                x.dtype(),
                stats.dtype(),
                stats.device()
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
    backend_mixed(x, &[out, stats.dtype(), gamma.dtype(), beta.dtype()], OP)?
        .group_norm_apply(x, stats, gamma, beta, eps, silu, out)
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

/// Scaled-dot-product attention. q [B, Sq, H, D], k [B, Sk, H, D], v [B, Sk, H, Dv] -> [B, Sq, H, Dv];
/// optional additive bias [Sq, Sk] (shared by batch and heads); `causal` masks keys j > i.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    bias: Option<&Tensor>,
    causal: bool,
) -> Result<Tensor> {
    const OP: &str = "attention";
    same_device(OP, &[q, k, v])?;
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        expect_rank(OP, n, t, 4)?;
    }
    let ok = q.dim(0) == k.dim(0)
        && k.dim(0) == v.dim(0)
        && q.dim(2) == k.dim(2)
        && k.dim(2) == v.dim(2)
        && q.dim(3) == k.dim(3)
        && k.dim(1) == v.dim(1);
    if !ok {
        return Err(Error::shape(
            OP,
            format!("q {:?} k {:?} v {:?}", q.shape(), k.shape(), v.shape()),
        ));
    }
    if let Some(b) = bias {
        same_device(OP, &[q, b])?;
        if b.shape() != [q.dim(1), k.dim(1)] {
            return Err(Error::shape(
                OP,
                format!("bias {:?} for [{}, {}]", b.shape(), q.dim(1), k.dim(1)),
            ));
        }
    }
    if causal && q.dim(1) != k.dim(1) {
        return Err(Error::shape(OP, "causal attention needs Sq == Sk"));
    }
    backend(q, OP)?.attention(q, k, v, scale, bias, causal)
}

/// The dual-scope temporal attention of Video-Infinity, banded local window + global keys, computed
/// without a dense mask. See [`DualScopeParams`] and `Backend::dual_scope_attention`.
pub fn dual_scope_attention(
    q: &Tensor,
    k_local: &Tensor,
    v_local: &Tensor,
    k_glob: &Tensor,
    v_glob: &Tensor,
    p: &DualScopeParams,
) -> Result<Tensor> {
    const OP: &str = "dual_scope_attention";
    same_device(OP, &[q, k_local, v_local, k_glob, v_glob])?;
    for (n, t) in [
        ("q", q),
        ("k_local", k_local),
        ("v_local", v_local),
        ("k_glob", k_glob),
        ("v_glob", v_glob),
    ] {
        expect_rank(OP, n, t, 4)?;
    }
    let (b, n, h, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let loc = [b, n + 2 * p.pad, h, d];
    let ok = k_local.shape() == loc
        && v_local.shape() == loc
        && k_glob.shape() == v_glob.shape()
        && k_glob.dim(0) == b
        && k_glob.dim(2) == h
        && k_glob.dim(3) == d;
    if !ok {
        return Err(Error::shape(
            OP,
            format!(
                "q {:?} k_local {:?} v_local {:?} k_glob {:?} v_glob {:?} pad {}",
                q.shape(),
                k_local.shape(),
                v_local.shape(),
                k_glob.shape(),
                v_glob.shape(),
                p.pad
            ),
        ));
    }
    backend(q, OP)?.dual_scope_attention(q, k_local, v_local, k_glob, v_glob, p)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    backend(x, "silu")?.unary(x, UnaryOp::Silu)
}
/// Exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    backend(x, "gelu")?.unary(x, UnaryOp::Gelu)
}
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    backend(x, "unary")?.unary(x, op)
}

/// GEGLU: x [..., 2N] -> x[..., :N] * gelu(x[..., N:]).
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "geglu";
    if x.rank() == 0 || !x.dim(x.rank() - 1).is_multiple_of(2) {
        return Err(Error::shape(
            OP,
            format!("last dim of {:?} must be even", x.shape()),
        ));
    }
    backend(x, OP)?.geglu(x)
}

/// numpy broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Elementwise a op b with numpy broadcasting. Output dtype: F32 when either input is F32, else the
/// inputs' common dtype (an f32 residual stream plus a bf16 branch stays f32).
pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let out = if a.dtype() == DType::F32 || b.dtype() == DType::F32 {
        DType::F32
    } else {
        a.dtype()
    };
    binary_to(a, b, op, out)
}

/// [`binary`] writing `out`: inputs of one dtype T give T or F32; F32 with T gives F32.
pub fn binary_to(a: &Tensor, b: &Tensor, op: BinaryOp, out: DType) -> Result<Tensor> {
    const OP: &str = "binary";
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch {
            op: OP,
            a: a.device(),
            b: b.device(),
        });
    }
    let ok = if a.dtype() == b.dtype() {
        out == a.dtype() || out == DType::F32
    } else {
        out == DType::F32 && (a.dtype() == DType::F32 || b.dtype() == DType::F32)
    };
    if !ok {
        return Err(Error::shape(
            OP,
            format!(
                "dtypes {:?} {op:?} {:?} -> {out:?} (mixed inputs need an F32 side and output)",
                a.dtype(),
                b.dtype()
            ),
        ));
    }
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
        Error::shape(
            OP,
            format!("{:?} {op:?} {:?} do not broadcast", a.shape(), b.shape()),
        )
    })?;
    backend_mixed(a, &[b.dtype(), out], OP)?.binary(a, b, op, &shape, out)
}
/// a + b written as `out` (see [`binary_to`]).
pub fn add_to(a: &Tensor, b: &Tensor, out: DType) -> Result<Tensor> {
    binary_to(a, b, BinaryOp::Add, out)
}
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Add)
}
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Sub)
}
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Mul)
}
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Div)
}
/// x * mul + add.
pub fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    backend(x, "affine")?.affine(x, mul, add)
}
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    affine(x, s, 0.0)
}
pub fn clamp(x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    backend(x, "clamp")?.clamp(x, lo, hi)
}

/// Concatenate along `axis`.
pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    const OP: &str = "concat";
    let first = xs.first().ok_or_else(|| Error::shape(OP, "no tensors"))?;
    same_device(OP, xs)?;
    if axis >= first.rank() {
        return Err(Error::shape(
            OP,
            format!("axis {axis} for {:?}", first.shape()),
        ));
    }
    for t in xs {
        let ok = t.rank() == first.rank()
            && (0..t.rank()).all(|d| d == axis || t.dim(d) == first.dim(d));
        if !ok {
            return Err(Error::shape(
                OP,
                format!("{:?} vs {:?} along axis {axis}", first.shape(), t.shape()),
            ));
        }
    }
    if xs.len() == 1 {
        return Ok((*first).clone());
    }
    backend(first, OP)?.concat(xs, axis)
}

/// Take `indices` along `axis`.
pub fn index_select(x: &Tensor, axis: usize, indices: &[usize]) -> Result<Tensor> {
    const OP: &str = "index_select";
    if axis >= x.rank() || indices.iter().any(|&i| i >= x.dim(axis)) {
        return Err(Error::shape(
            OP,
            format!("indices {indices:?} on axis {axis} of {:?}", x.shape()),
        ));
    }
    backend(x, OP)?.index_select(x, axis, indices)
}

/// Elements start .. start+len along `axis` (a copy).
pub fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    if axis >= x.rank() || start + len > x.dim(axis) {
        return Err(Error::shape(
            "narrow",
            format!("{start}+{len} on axis {axis} of {:?}", x.shape()),
        ));
    }
    if start == 0 && len == x.dim(axis) {
        return Ok(x.clone());
    }
    let idx: Vec<usize> = (start..start + len).collect();
    index_select(x, axis, &idx)
}

/// Split into pieces of the given sizes along `axis`.
pub fn split(x: &Tensor, axis: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for &s in sizes {
        out.push(narrow(x, axis, start, s)?);
        start += s;
    }
    if axis < x.rank() && start != x.dim(axis) {
        return Err(Error::shape(
            "split",
            format!(
                "sizes {sizes:?} do not cover axis {axis} of {:?}",
                x.shape()
            ),
        ));
    }
    Ok(out)
}

/// Contiguous copy with permuted dims: out.dim(i) = x.dim(perm[i]).
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    const OP: &str = "permute";
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank()
        || perm
            .iter()
            .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
    {
        return Err(Error::shape(
            OP,
            format!("perm {perm:?} for {:?}", x.shape()),
        ));
    }
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(x.clone());
    }
    backend(x, OP)?.permute(x, perm)
}

/// Nearest-neighbour x2 upsampling, channels-last: [N, H, W, C] -> [N, 2H, 2W, C].
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    expect_rank("upsample_nearest2x", "x", x, 4)?;
    backend(x, "upsample_nearest2x")?.upsample_nearest2x(x)
}

/// Embedding lookup: rows of table [V, C] -> [ids.len(), C].
pub fn embedding(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    expect_rank(OP, "table", table, 2)?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= table.dim(0)) {
        return Err(Error::shape(
            OP,
            format!("id {bad} out of range for a table of {} rows", table.dim(0)),
        ));
    }
    backend(table, OP)?.embedding(ids, table)
}

/// Sinusoidal timestep embedding (diffusers `get_timestep_embedding`, float32):
/// half = dim/2, freq_i = exp(-ln(10000) * i / (half - shift)), arg = t * freq_i,
/// out = [sin, cos] or [cos, sin] with `flip_sin_to_cos`. Returns [t.len(), dim] on `device`.
pub fn timestep_embedding(
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f32,
    device: Device,
    dtype: DType,
) -> Result<Tensor> {
    let half = dim / 2;
    let mut out = vec![0f32; t.len() * dim];
    for (r, &tv) in t.iter().enumerate() {
        for i in 0..half {
            let exponent = -(10000f32.ln()) * i as f32 / (half as f32 - shift);
            let arg = tv * exponent.exp();
            let (s, c) = (arg.sin(), arg.cos());
            let row = &mut out[r * dim..(r + 1) * dim];
            if flip_sin_to_cos {
                row[i] = c;
                row[half + i] = s;
            } else {
                row[i] = s;
                row[half + i] = c;
            }
        }
    }
    Tensor::from_slice_on(&out, &[t.len(), dim], device, dtype)
}

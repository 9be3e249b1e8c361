//! The building blocks the UNet, the CLIP text encoder and the VAE decoder share: Linear, Conv2d,
//! the temporal Conv3d, GroupNorm and LayerNorm with their weights (here), the attention and feed-forward blocks
//! ([`attention`]) and the ResNet / up- / downsampling blocks ([`resnet`]).
//!
//! Every layer loads its parameters from a [`Params`] prefix under the PyTorch key names
//! (`{name}.weight`, `{name}.bias`) in the PyTorch layout, so the same code yields the parameter
//! table on a `MetaRecorder` and the weights on a `StoreSource`. Activations are channels-last.
//!
//! Precision policy (docs/precision.md): matrices and kernels are in the storage dtype, 1-D
//! parameters in F32 (`params::param_dtype`). A layer's GEMM operands are in its weights' dtype
//! ([`Linear::dtype`], [`Conv2d::dtype`]); norms read the residual stream (F32 by default) and write
//! the operand dtype they are given; projections return to the stream through
//! [`Linear::forward_add`] / [`Linear::forward_to`].

pub mod attention;
pub mod resnet;

use vi_runtime::{ops, DType, Tensor};

use crate::params::{Params, Result};

/// `nn.Linear`: weight [cout, cin], optional bias [cout]. x [..., cin] -> [..., cout].
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `{name}.weight` [cout, cin] and `{name}.bias` [cout].
    pub fn load(p: Params, name: &str, cin: usize, cout: usize) -> Result<Linear> {
        let q = p.pp(name);
        Ok(Linear {
            weight: q.get("weight", &[cout, cin])?,
            bias: Some(q.get("bias", &[cout])?),
        })
    }

    /// `{name}.weight` [cout, cin] only (`bias=False`).
    pub fn load_no_bias(p: Params, name: &str, cin: usize, cout: usize) -> Result<Linear> {
        Ok(Linear {
            weight: p.pp(name).get("weight", &[cout, cin])?,
            bias: None,
        })
    }

    /// The dtype of the layer's GEMM operand (its weight's dtype).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// x [..., cin] -> [..., cout] in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(x, &self.weight, self.bias.as_ref())?)
    }

    /// [`Linear::forward`] written as `out` (x's dtype, or F32 into the residual stream).
    pub fn forward_to(&self, x: &Tensor, out: DType) -> Result<Tensor> {
        Ok(ops::linear_to(x, &self.weight, self.bias.as_ref(), out)?)
    }

    /// residual [..., cout] + self(x [..., cin]) in residual's dtype: one GEMM into the stream (the
    /// projection is never rounded to x's dtype).
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        Ok(ops::linear_add(
            x,
            &self.weight,
            self.bias.as_ref(),
            residual,
        )?)
    }
}

/// `nn.Conv2d` with a square kernel and "same" padding k/2: weight [cout, cin, k, k], bias [cout].
/// x [N, H, W, cin] -> [N, Ho, Wo, cout] (Ho = H with stride 1, ceil(H/2) with stride 2).
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    /// `{name}.weight` [cout, cin, k, k] and `{name}.bias` [cout]; stride 1, padding k/2.
    pub fn load(p: Params, name: &str, cin: usize, cout: usize, k: usize) -> Result<Conv2d> {
        let q = p.pp(name);
        Ok(Conv2d {
            weight: q.get("weight", &[cout, cin, k, k])?,
            bias: q.get("bias", &[cout])?,
            stride: 1,
            pad: k / 2,
        })
    }

    /// The same layer with `stride`.
    pub fn with_stride(self, stride: usize) -> Conv2d {
        Conv2d { stride, ..self }
    }

    /// The dtype of the layer's operands (its kernel's dtype).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// x [N, H, W, cin] (in [`Conv2d::dtype`]) -> [N, Ho, Wo, cout].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_bias(x, &self.bias)
    }

    /// [`Conv2d::forward`] with `bias` [cout] in place of the layer's own (e.g. the bias with a
    /// per-call term folded in).
    pub fn forward_with_bias(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        Ok(ops::conv2d(
            x,
            &self.weight,
            Some(bias),
            self.stride,
            self.pad,
        )?)
    }
}

/// `nn.Conv3d` with kernel (3, 1, 1) and padding (1, 0, 0): a convolution over frames only.
/// weight [cout, cin, 3, 1, 1], bias [cout]; x [B, F, S, cin] -> [B, F, S, cout], zero padding one
/// frame at each end of F.
pub struct TemporalConv {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl TemporalConv {
    /// `{name}.weight` [c, c, 3, 1, 1] and `{name}.bias` [c].
    pub fn load(p: Params, name: &str, c: usize) -> Result<TemporalConv> {
        let q = p.pp(name);
        Ok(TemporalConv {
            weight: q.get("weight", &[c, c, 3, 1, 1])?,
            bias: q.get("bias", &[c])?,
        })
    }

    /// The dtype of the layer's operands (its kernel's dtype).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// x [B, F, S, C] (in [`TemporalConv::dtype`]) -> [B, F, S, C].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::temporal_conv(x, &self.weight, Some(&self.bias))?)
    }
}

/// `nn.GroupNorm` with affine parameters: gamma (`weight`) and beta (`bias`), each [C].
pub struct GroupNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    /// `{name}.weight` and `{name}.bias`, each [c].
    pub fn load(p: Params, name: &str, c: usize, groups: usize, eps: f32) -> Result<GroupNorm> {
        let q = p.pp(name);
        Ok(GroupNorm {
            gamma: q.get("weight", &[c])?,
            beta: q.get("bias", &[c])?,
            groups,
            eps,
        })
    }

    /// x [N, S, C] with statistics per row n and group, optionally fused SiLU, written as `out`
    /// (the dtype of the layer it feeds).
    pub fn forward(&self, x: &Tensor, silu: bool, out: DType) -> Result<Tensor> {
        Ok(ops::group_norm_to(
            x,
            self.groups,
            &self.gamma,
            &self.beta,
            self.eps,
            silu,
            out,
        )?)
    }

    /// Per image (or frame): x [N, H, W, C] with statistics per n and group -> [N, H, W, C] as
    /// `out`.
    pub fn forward_nhwc(&self, x: &Tensor, silu: bool, out: DType) -> Result<Tensor> {
        let (n, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let y = self.forward(&x.reshape(&[n, h * w, c])?, silu, out)?;
        Ok(y.reshape(&[n, h, w, c])?)
    }
}

/// `nn.LayerNorm` over the last dimension: gamma (`weight`) and beta (`bias`), each [C].
pub struct LayerNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    /// `{name}.weight` and `{name}.bias`, each [c].
    pub fn load(p: Params, name: &str, c: usize, eps: f32) -> Result<LayerNorm> {
        let q = p.pp(name);
        Ok(LayerNorm {
            gamma: q.get("weight", &[c])?,
            beta: q.get("bias", &[c])?,
            eps,
        })
    }

    /// x [..., C] (the residual stream) normalised, written as `out` (the next layer's operand
    /// dtype).
    pub fn forward(&self, x: &Tensor, out: DType) -> Result<Tensor> {
        Ok(ops::layer_norm_to(
            x,
            &self.gamma,
            &self.beta,
            self.eps,
            out,
        )?)
    }
}

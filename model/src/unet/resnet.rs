//! diffusers `ResnetBlock2D` (time_embedding_norm "default", SiLU), `Downsample2D` and `Upsample2D`,
//! all per frame on the channels-last layout [N, H, W, C] (N = B*F).

use vi_runtime::{ops, DType, Tensor};

use crate::params::{Params, Result};

/// Weight and bias of a Linear or a Conv2d.
pub(crate) struct Affine {
    pub w: Tensor,
    pub b: Tensor,
}

impl Affine {
    pub fn linear(p: Params, name: &str, cin: usize, cout: usize) -> Result<Affine> {
        let q = p.pp(name);
        Ok(Affine {
            w: q.get("weight", &[cout, cin])?,
            b: q.get("bias", &[cout])?,
        })
    }
    pub fn conv(p: Params, name: &str, cin: usize, cout: usize, k: usize) -> Result<Affine> {
        let q = p.pp(name);
        Ok(Affine {
            w: q.get("weight", &[cout, cin, k, k])?,
            b: q.get("bias", &[cout])?,
        })
    }
    /// GroupNorm / LayerNorm affine parameters (gamma = weight, beta = bias), each [c].
    pub fn norm(p: Params, name: &str, c: usize) -> Result<Affine> {
        let q = p.pp(name);
        Ok(Affine {
            w: q.get("weight", &[c])?,
            b: q.get("bias", &[c])?,
        })
    }
    /// x [..., cin] -> [..., cout].
    pub fn apply_linear(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(x, &self.w, Some(&self.b))?)
    }
    /// linear(x [..., cin]) written as `out` (x's dtype, or F32 into the residual stream).
    pub fn apply_linear_to(&self, x: &Tensor, out: DType) -> Result<Tensor> {
        Ok(ops::linear_to(x, &self.w, Some(&self.b), out)?)
    }
    /// residual [..., cout] + linear(x [..., cin]), in residual's dtype (f32 stream + bf16 branch).
    pub fn apply_linear_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        Ok(ops::linear_add(x, &self.w, Some(&self.b), residual)?)
    }
    /// x [N, H, W, cin] -> [N, Ho, Wo, cout].
    pub fn apply_conv(&self, x: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
        Ok(ops::conv2d(x, &self.w, Some(&self.b), stride, pad)?)
    }
}

/// Per-frame GroupNorm of x [N, H, W, C] (statistics per frame and group), optionally fused SiLU,
/// written as `out` (the dtype of the layer it feeds).
pub(crate) fn spatial_group_norm(
    x: &Tensor,
    norm: &Affine,
    groups: usize,
    eps: f32,
    silu: bool,
    out: DType,
) -> Result<Tensor> {
    let (n, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let y = ops::group_norm_to(
        &x.reshape(&[n, h * w, c])?,
        groups,
        &norm.w,
        &norm.b,
        eps,
        silu,
        out,
    )?;
    Ok(y.reshape(&[n, h, w, c])?)
}

/// diffusers `ResnetBlock2D`: norm1 -> SiLU -> conv1 -> + time_emb_proj(SiLU(emb)) -> norm2 -> SiLU ->
/// [dropout] -> conv2 -> (+ shortcut(x)) / output_scale_factor.
pub(crate) struct ResnetBlock {
    norm1: Affine,
    conv1: Affine,
    time_emb_proj: Affine,
    norm2: Affine,
    conv2: Affine,
    /// 1x1 conv, present iff in_channels != out_channels (diffusers `use_in_shortcut`).
    conv_shortcut: Option<Affine>,
    groups: usize,
    eps: f32,
    output_scale_factor: f32,
}

impl ResnetBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        p: Params,
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f32,
        output_scale_factor: f32,
    ) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: Affine::norm(p, "norm1", cin)?,
            conv1: Affine::conv(p, "conv1", cin, cout, 3)?,
            time_emb_proj: Affine::linear(p, "time_emb_proj", temb, cout)?,
            norm2: Affine::norm(p, "norm2", cout)?,
            conv2: Affine::conv(p, "conv2", cout, cout, 3)?,
            conv_shortcut: if cin != cout {
                Some(Affine::conv(p, "conv_shortcut", cin, cout, 1)?)
            } else {
                None
            },
            groups,
            eps,
            output_scale_factor,
        })
    }

    /// x [N, H, W, cin] (the residual stream, f32 by default); `emb_silu` = SiLU(emb), [1, temb]
    /// (the same embedding for every frame and batch row: one timestep, one fps per call) ->
    /// x.dtype() [N, H, W, cout]. The branch runs in the weights' dtype.
    pub fn forward(&self, x: &Tensor, emb_silu: &Tensor) -> Result<Tensor> {
        let dt = self.conv1.w.dtype();
        let h = spatial_group_norm(x, &self.norm1, self.groups, self.eps, true, dt)?;
        // time_emb_proj(emb) is one [cout] row for the whole call: folded into conv1's bias (f32),
        // which saves the broadcast add over [N, H, W, cout] and its rounding.
        let t = self.time_emb_proj.apply_linear_to(emb_silu, DType::F32)?;
        let cout = t.dim(t.rank() - 1);
        if t.elem_count() != cout {
            return Err(crate::params::ModelError::Msg(format!(
                "ResnetBlock: the time embedding must be one row [1, temb] per call, got {:?}",
                emb_silu.shape()
            )));
        }
        let bias = ops::add(&self.conv1.b.to_dtype(DType::F32)?, &t.reshape(&[cout])?)?;
        let h = ops::conv2d(&h, &self.conv1.w, Some(&bias), 1, 1)?;
        let h = spatial_group_norm(&h, &self.norm2, self.groups, self.eps, true, dt)?;
        let h = self.conv2.apply_conv(&h, 1, 1)?;
        let shortcut = match &self.conv_shortcut {
            Some(sc) => sc.apply_conv(&x.to_dtype(dt)?, 1, 0)?,
            None => x.clone(),
        };
        let out = ops::add_to(&shortcut, &h, x.dtype())?;
        if self.output_scale_factor != 1.0 {
            Ok(ops::scale(&out, 1.0 / self.output_scale_factor)?)
        } else {
            Ok(out)
        }
    }
}

/// `Downsample2D` with a conv: 3x3, stride 2, padding 1.
pub(crate) struct Downsample {
    conv: Affine,
}

impl Downsample {
    pub fn load(p: Params, c: usize) -> Result<Downsample> {
        Ok(Downsample {
            conv: Affine::conv(p, "conv", c, c, 3)?,
        })
    }
    /// [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), C] in x.dtype() (the conv in the weights' dtype).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self
            .conv
            .apply_conv(&x.to_dtype(self.conv.w.dtype())?, 2, 1)?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// `Upsample2D` with a conv: nearest x2 (or to the skip's size), then 3x3 conv, padding 1.
pub(crate) struct Upsample {
    conv: Affine,
}

impl Upsample {
    pub fn load(p: Params, c: usize) -> Result<Upsample> {
        Ok(Upsample {
            conv: Affine::conv(p, "conv", c, c, 3)?,
        })
    }
    /// x [N, H, W, C] -> [N, th, tw, C] where (th, tw) is the next skip's size (2H or 2H-1 after a
    /// stride-2 downsampling of an odd size). Nearest interpolation to size 2H-1 from H picks source
    /// row floor(i*H/(2H-1)) = floor(i/2), i.e. exactly the x2 upsampling cropped, as diffusers'
    /// `F.interpolate(size=...)` does.
    pub fn forward(&self, x: &Tensor, target_hw: (usize, usize)) -> Result<Tensor> {
        let (h, w) = (x.dim(1), x.dim(2));
        let (th, tw) = target_hw;
        if th > 2 * h || tw > 2 * w || th + 1 < 2 * h || tw + 1 < 2 * w {
            return Err(crate::params::ModelError::Msg(format!(
                "upsampling {h}x{w} to the skip size {th}x{tw}: not a x2 step"
            )));
        }
        // Cast before upsampling: a quarter of the elements.
        let mut u = ops::upsample_nearest2x(&x.to_dtype(self.conv.w.dtype())?)?;
        if th != 2 * h {
            u = ops::narrow(&u, 1, 0, th)?;
        }
        if tw != 2 * w {
            u = ops::narrow(&u, 2, 0, tw)?;
        }
        Ok(self.conv.apply_conv(&u, 1, 1)?.to_dtype(x.dtype())?)
    }
}

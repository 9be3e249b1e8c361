//! diffusers `ResnetBlock2D` (time_embedding_norm "default", SiLU; with a time embedding in the
//! UNet, without one in the VAE), `Downsample2D` and `Upsample2D` with convs, per image on the
//! channels-last layout [N, H, W, C].

use vi_runtime::{ops, DType, Tensor};

use super::{Conv2d, GroupNorm, Linear};
use crate::params::{ModelError, Params, Result};

/// The shape of a [`ResnetBlock`].
pub struct ResnetConfig {
    pub cin: usize,
    pub cout: usize,
    /// Width of the time embedding (`time_emb_proj` [cout, temb]); None: no time embedding (VAE).
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f32,
    pub output_scale_factor: f32,
}

/// diffusers `ResnetBlock2D`: norm1 -> SiLU -> conv1 [-> + time_emb_proj(SiLU(emb))] -> norm2 ->
/// SiLU -> [dropout] -> conv2 -> (+ shortcut(x)) / output_scale_factor.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// 1x1 conv, present iff in_channels != out_channels (diffusers `use_in_shortcut`).
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f32,
}

impl ResnetBlock {
    /// Bytes of the convolutions' weights (what every call of the block reads).
    pub fn conv_weight_bytes(&self) -> usize {
        [
            Some(&self.conv1),
            Some(&self.conv2),
            self.conv_shortcut.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|c| c.weight.elem_count() * c.weight.dtype().size_in_bytes())
        .sum()
    }

    pub fn load(p: Params, cfg: &ResnetConfig) -> Result<ResnetBlock> {
        let (cin, cout, g, eps) = (cfg.cin, cfg.cout, cfg.groups, cfg.eps);
        Ok(ResnetBlock {
            norm1: GroupNorm::load(p, "norm1", cin, g, eps)?,
            conv1: Conv2d::load(p, "conv1", cin, cout, 3)?,
            time_emb_proj: match cfg.temb {
                Some(temb) => Some(Linear::load(p, "time_emb_proj", temb, cout)?),
                None => None,
            },
            norm2: GroupNorm::load(p, "norm2", cout, g, eps)?,
            conv2: Conv2d::load(p, "conv2", cout, cout, 3)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(p, "conv_shortcut", cin, cout, 1)?)
            } else {
                None
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// x [N, H, W, cin] (the residual stream, f32 by default); `emb_silu` = SiLU(emb), [1, temb]
    /// (the same embedding for every image: one timestep, one fps per call), given iff the block
    /// has a time embedding -> x.dtype() [N, H, W, cout]. The branch runs in the weights' dtype;
    /// each norm output is dropped as soon as its conv has read it.
    pub fn forward(&self, x: &Tensor, emb_silu: Option<&Tensor>) -> Result<Tensor> {
        let dt = self.conv1.dtype();
        let h = {
            let n = self.norm1.forward_nhwc(x, true, dt)?;
            match self.conv1_bias(emb_silu)? {
                Some(bias) => self.conv1.forward_with_bias(&n, &bias)?,
                None => self.conv1.forward(&n)?,
            }
        };
        let h = self
            .conv2
            .forward(&self.norm2.forward_nhwc(&h, true, dt)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(sc) => sc.forward(&x.to_dtype(dt)?)?,
            None => x.clone(),
        };
        let out = ops::add_to(&shortcut, &h, x.dtype())?;
        if self.output_scale_factor != 1.0 {
            Ok(ops::scale(&out, 1.0 / self.output_scale_factor)?)
        } else {
            Ok(out)
        }
    }

    /// conv1's bias with time_emb_proj(emb_silu) folded in (f32 [cout]), or None without a time
    /// embedding. time_emb_proj(emb) is one [cout] row for the whole call: adding it to the bias
    /// saves the broadcast add over [N, H, W, cout] and its rounding.
    fn conv1_bias(&self, emb_silu: Option<&Tensor>) -> Result<Option<Tensor>> {
        let (proj, emb_silu) = match (&self.time_emb_proj, emb_silu) {
            (Some(proj), Some(emb_silu)) => (proj, emb_silu),
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(ModelError::Msg(
                    "ResnetBlock: time_emb_proj without a time embedding".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(ModelError::Msg(
                    "ResnetBlock: a time embedding for a block without time_emb_proj".into(),
                ))
            }
        };
        let t = proj.forward_to(emb_silu, DType::F32)?;
        let cout = t.dim(t.rank() - 1);
        if t.elem_count() != cout {
            return Err(ModelError::Msg(format!(
                "ResnetBlock: the time embedding must be one row [1, temb] per call, got {:?}",
                emb_silu.shape()
            )));
        }
        let bias = ops::add(&self.conv1.bias.to_dtype(DType::F32)?, &t.reshape(&[cout])?)?;
        Ok(Some(bias))
    }
}

/// `Downsample2D` with a conv: 3x3, stride 2, padding 1.
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// `conv.*` under `p`.
    pub fn load(p: Params, c: usize) -> Result<Downsample> {
        Ok(Downsample {
            conv: Conv2d::load(p, "conv", c, c, 3)?.with_stride(2),
        })
    }

    /// [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), C] in x.dtype() (the conv in the weights' dtype).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(&x.to_dtype(self.conv.dtype())?)?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// `Upsample2D` with a conv: nearest x2 (or to a given size), then 3x3 conv, padding 1.
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// `conv.*` under `p`.
    pub fn load(p: Params, c: usize) -> Result<Upsample> {
        Ok(Upsample {
            conv: Conv2d::load(p, "conv", c, c, 3)?,
        })
    }

    /// x [N, H, W, C] -> [N, 2H, 2W, C] in x.dtype() (the conv in the weights' dtype).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_to_size(x, (2 * x.dim(1), 2 * x.dim(2)))
    }

    /// x [N, H, W, C] -> [N, th, tw, C] where (th, tw) is 2H or 2H-1 (a skip's size after a stride-2
    /// downsampling of an odd size). Nearest interpolation to size 2H-1 from H picks source row
    /// floor(i*H/(2H-1)) = floor(i/2), i.e. exactly the x2 upsampling cropped, as diffusers'
    /// `F.interpolate(size=...)` does.
    pub fn forward_to_size(&self, x: &Tensor, (th, tw): (usize, usize)) -> Result<Tensor> {
        let (h, w) = (x.dim(1), x.dim(2));
        if th > 2 * h || tw > 2 * w || th + 1 < 2 * h || tw + 1 < 2 * w {
            return Err(ModelError::Msg(format!(
                "upsampling {h}x{w} to the skip size {th}x{tw}: not a x2 step"
            )));
        }
        // Cast before upsampling: a quarter of the elements.
        let mut u = ops::upsample_nearest2x(&x.to_dtype(self.conv.dtype())?)?;
        if th != 2 * h {
            u = ops::narrow(&u, 1, 0, th)?;
        }
        if tw != 2 * w {
            u = ops::narrow(&u, 2, 0, tw)?;
        }
        Ok(self.conv.forward(&u)?.to_dtype(x.dtype())?)
    }
}

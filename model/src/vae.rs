//! The VAE decoder (diffusers `AutoencoderKL`: `post_quant_conv` + `decoder`), channels-last.
//!
//! decode(latents) = decoder(post_quant_conv((1/scaling_factor) * latents)) with the diffusers
//! `Decoder`: conv_in -> mid block (resnet, single-head spatial self-attention, resnet) ->
//! up blocks (channels reversed, layers_per_block+1 resnets each, nearest x2 + conv on all but the
//! last) -> GroupNorm -> SiLU -> conv_out. Every GroupNorm of AutoencoderKL uses eps 1e-6.
//! Images are [N, 8h, 8w, out_channels] in ~[-1, 1]; frames are independent.

use serde_json::Value;
use vi_runtime::{ops, DType, Tensor};

use crate::layers::attention::{Attention, AttentionKeys};
use crate::layers::resnet::{ResnetBlock, ResnetConfig, Upsample};
use crate::layers::{Conv2d, GroupNorm};
use crate::params::{ModelError, Params, Result};

/// GroupNorm eps of every norm in diffusers' AutoencoderKL encoder/decoder.
pub const VAE_NORM_EPS: f32 = 1e-6;

/// diffusers `AutoencoderKL` config: the fields the decoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub out_channels: usize,
    pub norm_num_groups: usize,
    /// Latents are multiplied by 1/scaling_factor (computed in f64, applied as f32) before decoding.
    pub scaling_factor: f64,
    /// `use_post_quant_conv` (default true).
    pub use_post_quant_conv: bool,
    /// `mid_block_add_attention` (default true).
    pub mid_block_add_attention: bool,
}

fn cfg_err(msg: String) -> ModelError {
    ModelError::Config(format!("VAE config: {msg}"))
}

fn get_usize(v: &Value, name: &str, default: Option<usize>) -> Result<usize> {
    match v.get(name) {
        None | Some(Value::Null) => default.ok_or_else(|| cfg_err(format!("missing `{name}`"))),
        Some(x) => x
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| cfg_err(format!("`{name}` must be a positive integer, got {x}"))),
    }
}

fn get_bool(v: &Value, name: &str, default: bool) -> Result<bool> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => Err(cfg_err(format!("`{name}` must be a boolean, got {x}"))),
    }
}

impl VaeConfig {
    /// Parse a diffusers `vae/config.json`. `block_out_channels` and `scaling_factor` are required;
    /// the others take the diffusers defaults when absent (layers_per_block 1, latent_channels 4,
    /// out_channels 3, norm_num_groups 32). Only UpDecoderBlock2D up blocks, SiLU and a null
    /// `shift_factor` are supported (what SD / zeroscope / VideoCrafter2 use).
    pub fn from_json(v: &Value) -> Result<Self> {
        if !v.is_object() {
            return Err(cfg_err("must be a JSON object".into()));
        }
        let block_out_channels: Vec<usize> = v
            .get("block_out_channels")
            .and_then(Value::as_array)
            .ok_or_else(|| cfg_err("missing array `block_out_channels`".into()))?
            .iter()
            .map(|x| x.as_u64().filter(|&n| n > 0).map(|n| n as usize))
            .collect::<Option<_>>()
            .filter(|b: &Vec<usize>| !b.is_empty())
            .ok_or_else(|| cfg_err("`block_out_channels` must be positive integers".into()))?;
        let scaling_factor = v
            .get("scaling_factor")
            .and_then(Value::as_f64)
            .filter(|s| *s > 0.0)
            .ok_or_else(|| cfg_err("missing or non-positive `scaling_factor`".into()))?;
        if let Some(s) = v.get("shift_factor").filter(|s| !s.is_null()) {
            return Err(cfg_err(format!("shift_factor {s} is not supported")));
        }
        if let Some(a) = v.get("act_fn").and_then(Value::as_str) {
            if a != "silu" {
                return Err(cfg_err(format!("act_fn `{a}` is not supported (silu)")));
            }
        }
        if let Some(types) = v.get("up_block_types").and_then(Value::as_array) {
            if types.len() != block_out_channels.len() {
                return Err(cfg_err(format!(
                    "{} up_block_types for {} block_out_channels",
                    types.len(),
                    block_out_channels.len()
                )));
            }
            if let Some(t) = types
                .iter()
                .find(|t| t.as_str() != Some("UpDecoderBlock2D"))
            {
                return Err(cfg_err(format!(
                    "up block type {t} is not supported (UpDecoderBlock2D)"
                )));
            }
        }
        let cfg = VaeConfig {
            layers_per_block: get_usize(v, "layers_per_block", Some(1))?,
            latent_channels: get_usize(v, "latent_channels", Some(4))?,
            out_channels: get_usize(v, "out_channels", Some(3))?,
            norm_num_groups: get_usize(v, "norm_num_groups", Some(32))?,
            use_post_quant_conv: get_bool(v, "use_post_quant_conv", true)?,
            mid_block_add_attention: get_bool(v, "mid_block_add_attention", true)?,
            block_out_channels,
            scaling_factor,
        };
        {
            use crate::limits::*;
            let part = "VAE config:";
            let layers = cfg.layers_per_block as u128;
            let sum_c2: u128 = cfg
                .block_out_channels
                .iter()
                .map(|&c| (c as u128).saturating_mul(c as u128))
                .fold(0, u128::saturating_add);
            let last = *cfg.block_out_channels.last().expect("non-empty") as u128;
            // Parameters: (L + 1) resnets of two 3x3 convs (18 c^2) per level.
            config_field(
                part,
                "block_out_channels (entries)",
                cfg.block_out_channels.len(),
                MAX_LEVELS,
                4,
                |l| l.saturating_mul(18 * 128 * 128),
            )?;
            for &c in &cfg.block_out_channels {
                config_field(part, "block_out_channels", c, MAX_CHANNELS, 512, |c| {
                    (layers + 1)
                        .saturating_mul(18)
                        .saturating_mul(c.saturating_mul(c))
                })?;
            }
            config_field(
                part,
                "layers_per_block",
                cfg.layers_per_block,
                MAX_LAYERS_PER_BLOCK,
                2,
                |l| {
                    l.saturating_add(1)
                        .saturating_mul(18)
                        .saturating_mul(sum_c2)
                },
            )?;
            config_field(
                part,
                "latent_channels",
                cfg.latent_channels,
                MAX_IO_CHANNELS,
                4,
                |v| v.saturating_mul(9).saturating_mul(last),
            )?;
            config_field(
                part,
                "out_channels",
                cfg.out_channels,
                MAX_IO_CHANNELS,
                3,
                |v| v.saturating_mul(9).saturating_mul(last),
            )?;
            config_field(
                part,
                "norm_num_groups",
                cfg.norm_num_groups,
                MAX_GROUPS,
                32,
                |_| 0,
            )?;
        }
        if let Some(c) = cfg
            .block_out_channels
            .iter()
            .find(|&&c| !c.is_multiple_of(cfg.norm_num_groups))
        {
            return Err(cfg_err(format!(
                "{c} channels are not divisible into {} groups",
                cfg.norm_num_groups
            )));
        }
        Ok(cfg)
    }
}

/// A `ResnetBlock2D` of the decoder: no time embedding, eps [`VAE_NORM_EPS`].
fn resnet(p: Params, cin: usize, cout: usize, groups: usize) -> Result<ResnetBlock> {
    ResnetBlock::load(
        p,
        &ResnetConfig {
            cin,
            cout,
            temb: None,
            groups,
            eps: VAE_NORM_EPS,
            output_scale_factor: 1.0,
        },
    )
}

/// diffusers `Attention` of the VAE mid block: GroupNorm -> single-head self-attention of width C
/// over the H*W positions (q/k/v/out Linear with bias, scale 1/sqrt(C)) -> + input.
struct MidAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl MidAttention {
    /// Current key names `to_q/to_k/to_v/to_out.0`, or the old `query/key/value/proj_attn` when
    /// the source has those (and not the new ones).
    fn load(p: Params, c: usize, groups: usize) -> Result<Self> {
        let old = p.contains("query.weight") && !p.contains("to_q.weight");
        let keys = if old {
            &AttentionKeys::DIFFUSERS_LEGACY
        } else {
            &AttentionKeys::DIFFUSERS_BIASED
        };
        Ok(MidAttention {
            group_norm: GroupNorm::load(p, "group_norm", c, groups, VAE_NORM_EPS)?,
            attn: Attention::load(p, keys, c, c, 1, c)?,
        })
    }

    /// x: the residual stream (f32 by default) -> the same dtype; the branch runs in the weights'
    /// dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let hs = self
            .group_norm
            .forward_nhwc(x, false, self.attn.dtype())?
            .reshape(&[n, h * w, c])?;
        // x + out-projection(attention), one op into the stream.
        let y = self
            .attn
            .forward_add(&hs, &hs, &x.reshape(&[n, h * w, c])?, false)?;
        Ok(y.reshape(&[n, h, w, c])?)
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Upsample>,
}

/// diffusers `AutoencoderKL` decoder side: `post_quant_conv` + `decoder`.
pub struct VaeDecoder {
    pub config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attn: Option<MidAttention>,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Dtype of the residual stream: F32 by default (docs/precision.md).
    stream_dtype: DType,
}

impl VaeDecoder {
    /// Run the residual stream in `dtype` instead of F32.
    pub fn set_residual_dtype(&mut self, dtype: DType) {
        self.stream_dtype = dtype;
    }

    /// Load (or enumerate, on a `MetaRecorder`) `post_quant_conv.*` and `decoder.*` from the
    /// AutoencoderKL root `p`. Encoder and `quant_conv` keys are never requested.
    pub fn load(cfg: &VaeConfig, p: Params) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let lat = cfg.latent_channels;
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::load(p, "post_quant_conv", lat, lat, 1)?)
        } else {
            None
        };
        let d = p.pp("decoder");
        let conv_in = Conv2d::load(d.p(), "conv_in", lat, top, 3)?;
        let mid = d.pp("mid_block");
        let mid_resnets = [
            resnet(mid.pp("resnets.0").p(), top, top, g)?,
            resnet(mid.pp("resnets.1").p(), top, top, g)?,
        ];
        let mid_attn = if cfg.mid_block_add_attention {
            Some(MidAttention::load(mid.pp("attentions.0").p(), top, g)?)
        } else {
            None
        };
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut prev = top;
        for (i, &out) in rev.iter().enumerate() {
            let b = d.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    resnet(b.pp("resnets").pp(j).p(), cin, out, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() {
                Some(Upsample::load(b.pp("upsamplers.0").p(), out)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        let bottom = cfg.block_out_channels[0];
        let norm_out = GroupNorm::load(d.p(), "conv_norm_out", bottom, g, VAE_NORM_EPS)?;
        let conv_out = Conv2d::load(d.p(), "conv_out", bottom, cfg.out_channels, 3)?;
        Ok(VaeDecoder {
            stream_dtype: DType::F32,
            config: cfg.clone(),
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attn,
            up_blocks,
            norm_out,
            conv_out,
        })
    }

    fn check_latents(&self, latents: &Tensor) -> Result<()> {
        if latents.rank() != 4 || latents.dim(3) != self.config.latent_channels {
            return Err(ModelError::Msg(format!(
                "VAE decoder: latents must be channels-last [N, h, w, {}], got {:?}",
                self.config.latent_channels,
                latents.shape()
            )));
        }
        Ok(())
    }

    /// `(1/scaling_factor) * latents` exactly as the float32 expression of the pipeline
    /// (1/scaling_factor computed in double precision, rounded to f32, one f32 multiply).
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let inv = (1.0 / self.config.scaling_factor) as f32;
        Ok(ops::scale(latents, inv)?)
    }

    /// `vae.decode(z).sample` for already unscaled latents z [N, h, w, C_lat] -> [N, 8h, 8w, out].
    pub fn decode_unscaled(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latents(z)?;
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        // Precision policy (as in the UNet): the residual stream is `stream_dtype` (f32), the
        // branches run in the weights' dtype.
        let dt = self.conv_in.dtype();
        x = self.conv_in.forward(&x)?.to_dtype(self.stream_dtype)?;
        x = self.mid_resnets[0].forward(&x, None)?;
        if let Some(a) = &self.mid_attn {
            x = a.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x, None)?;
        for b in &self.up_blocks {
            for r in &b.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = &b.upsample {
                x = u.forward(&x)?;
            }
        }
        let x = self.norm_out.forward_nhwc(&x, true, dt)?;
        self.conv_out.forward(&x)
    }

    /// Decode sampler latents [N, h, w, C_lat] (channels-last, frames along N) into images
    /// [N, 8h, 8w, out_channels] (~[-1, 1]): `decode_unscaled(unscale_latents(latents))`.
    /// All N frames at once: see [`VaeDecoder::decode_frames`] to bound memory.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_latents(latents)?;
        self.decode_unscaled(&self.unscale_latents(latents)?)
    }

    /// Decode `chunk` frames at a time (frames are independent, so the result equals
    /// [`VaeDecoder::decode`]), handing each chunk's images [n, 8h, 8w, out] to `sink` with the
    /// index of its first frame. Memory is bounded by one chunk's activations.
    pub fn decode_frames_with(
        &self,
        latents: &Tensor,
        chunk: usize,
        mut sink: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        self.check_latents(latents)?;
        let n = latents.dim(0);
        if n == 0 {
            return Err(ModelError::Msg("VAE decoder: no frames to decode".into()));
        }
        let chunk = chunk.max(1);
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let part = ops::narrow(latents, 0, start, len)?;
            sink(start, self.decode(&part)?)?;
            start += len;
        }
        Ok(())
    }

    /// [`VaeDecoder::decode_frames_with`] collected into one [N, 8h, 8w, out] tensor.
    pub fn decode_frames(&self, latents: &Tensor, chunk: usize) -> Result<Tensor> {
        let mut parts = Vec::new();
        self.decode_frames_with(latents, chunk, |_, t| {
            parts.push(t);
            Ok(())
        })?;
        let refs: Vec<&Tensor> = parts.iter().collect();
        Ok(ops::concat(&refs, 0)?)
    }
}

/// Images in ~[-1, 1] -> [0, 1]: `(x / 2 + 0.5).clamp(0, 1)` (the pipeline's postprocessing).
pub fn to_unit_range(x: &Tensor) -> Result<Tensor> {
    Ok(ops::clamp(&ops::affine(x, 0.5, 0.5)?, 0.0, 1.0)?)
}

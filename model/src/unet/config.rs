//! The diffusers config dict of the VideoCrafter2 UNet (`UNet3DVideoCrafterConditionModel`, or a plain
//! `UNet3DConditionModel`): `unet/config.json` or the golden files' `config` metadata.
//!
//! Every size comes from the config. Structural fields are required; a few behavioural fields take
//! the diffusers defaults when absent (`downsample_padding` 1, `mid_block_scale_factor` 1,
//! `act_fn` "silu", `norm_eps` 1e-5). Fields we cannot honour are rejected with a clear error rather
//! than silently ignored.

use serde_json::Value;

use crate::params::{ModelError, Result};

/// A down block of the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    /// `CrossAttnDownBlock3D`: resnet -> temp_conv -> spatial transformer -> temporal transformer per layer.
    CrossAttn,
    /// `DownBlock3D`: resnet -> temp_conv per layer.
    Plain,
}

/// An up block of the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    /// `CrossAttnUpBlock3D`.
    CrossAttn,
    /// `UpBlock3D`.
    Plain,
}

/// The UNet's configuration (diffusers field names and meanings).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Channels of each level; C0 = `block_out_channels[0]`, time embedding width 4*C0.
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    /// Resnets per down block; up blocks have one more.
    pub layers_per_block: usize,
    /// diffusers naming quirk: the spatial/temporal transformers of a level with C channels get
    /// C / attention_head_dim heads of attention_head_dim each; `transformer_in` gets 8 heads of
    /// attention_head_dim.
    pub attention_head_dim: usize,
    /// Width of the text-encoder states (to_k/to_v input of the spatial cross-attention).
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    /// eps of the resnets' GroupNorms and of `conv_norm_out`.
    pub norm_eps: f32,
    /// Only 1 is supported (Downsample2D conv with symmetric padding 1).
    pub downsample_padding: usize,
    /// output_scale_factor of the mid block's resnets (output = (x + h) / factor).
    pub mid_block_scale_factor: f32,
    /// Whether the model has the VideoCrafter fps embedding (`fps_embedding.linear_1/2`).
    pub fps_cond: bool,
    pub sample_size: Option<usize>,
}

fn cfg_err(msg: impl Into<String>) -> ModelError {
    ModelError::Config(msg.into())
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name).filter(|x| !x.is_null())
}

fn req_usize(v: &Value, name: &str) -> Result<usize> {
    let x = field(v, name).ok_or_else(|| cfg_err(format!("missing field `{name}`")))?;
    x.as_u64()
        .map(|u| u as usize)
        .ok_or_else(|| cfg_err(format!("`{name}` must be a non-negative integer, got {x}")))
}

fn opt_f32(v: &Value, name: &str, default: f32) -> Result<f32> {
    match field(v, name) {
        None => Ok(default),
        Some(x) => x
            .as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| cfg_err(format!("`{name}` must be a number, got {x}"))),
    }
}

fn req_array<'a>(v: &'a Value, name: &str) -> Result<&'a Vec<Value>> {
    let x = field(v, name).ok_or_else(|| cfg_err(format!("missing field `{name}`")))?;
    x.as_array()
        .ok_or_else(|| cfg_err(format!("`{name}` must be a list, got {x}")))
}

impl UNetConfig {
    /// Parse a diffusers UNet config dict.
    pub fn from_json(v: &Value) -> Result<UNetConfig> {
        if !v.is_object() {
            return Err(cfg_err("the UNet config must be a JSON object"));
        }
        if let Some(x) = field(v, "num_attention_heads") {
            // diffusers' UNet3DConditionModel raises here too.
            return Err(cfg_err(format!(
                "`num_attention_heads` must be null (diffusers derives the heads from \
                 `attention_head_dim`), got {x}"
            )));
        }
        if let Some(x) = field(v, "time_cond_proj_dim") {
            return Err(cfg_err(format!(
                "`time_cond_proj_dim` is not supported (must be null), got {x}"
            )));
        }
        let act = field(v, "act_fn")
            .and_then(|x| x.as_str())
            .unwrap_or("silu");
        if act != "silu" {
            return Err(cfg_err(format!(
                "`act_fn` {act:?} is not supported (only \"silu\")"
            )));
        }
        let block_out_channels = req_array(v, "block_out_channels")?
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&u| u > 0)
                    .map(|u| u as usize)
                    .ok_or_else(|| {
                        cfg_err(format!(
                            "`block_out_channels` entry {x} is not a positive integer"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let down_block_types = req_array(v, "down_block_types")?
            .iter()
            .map(|x| match x.as_str() {
                Some("CrossAttnDownBlock3D") => Ok(DownBlockType::CrossAttn),
                Some("DownBlock3D") => Ok(DownBlockType::Plain),
                _ => Err(cfg_err(format!("unsupported down block type {x}"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = req_array(v, "up_block_types")?
            .iter()
            .map(|x| match x.as_str() {
                Some("CrossAttnUpBlock3D") => Ok(UpBlockType::CrossAttn),
                Some("UpBlock3D") => Ok(UpBlockType::Plain),
                _ => Err(cfg_err(format!("unsupported up block type {x}"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let attention_head_dim = match field(v, "attention_head_dim") {
            Some(x) => x
                .as_u64()
                .filter(|&u| u > 0)
                .map(|u| u as usize)
                .ok_or_else(|| {
                    cfg_err(format!(
                        "`attention_head_dim` must be a positive integer (a per-block list is not \
                     supported: diffusers passes it to transformer_in too), got {x}"
                    ))
                })?,
            None => return Err(cfg_err("missing field `attention_head_dim`")),
        };
        let fps_cond = match field(v, "fps_cond") {
            Some(x) => x
                .as_bool()
                .ok_or_else(|| cfg_err(format!("`fps_cond` must be a boolean, got {x}")))?,
            // Video-Infinity's UNetVideoCrafter always carries the fps embedding.
            None => field(v, "_class_name")
                .and_then(|x| x.as_str())
                .is_some_and(|s| s.contains("VideoCrafter")),
        };
        let cfg = UNetConfig {
            in_channels: req_usize(v, "in_channels")?,
            out_channels: req_usize(v, "out_channels")?,
            block_out_channels,
            down_block_types,
            up_block_types,
            layers_per_block: req_usize(v, "layers_per_block")?,
            attention_head_dim,
            cross_attention_dim: req_usize(v, "cross_attention_dim")?,
            norm_num_groups: req_usize(v, "norm_num_groups")?,
            norm_eps: opt_f32(v, "norm_eps", 1e-5)?,
            downsample_padding: match field(v, "downsample_padding") {
                None => 1,
                Some(_) => req_usize(v, "downsample_padding")?,
            },
            mid_block_scale_factor: opt_f32(v, "mid_block_scale_factor", 1.0)?,
            fps_cond,
            sample_size: match field(v, "sample_size") {
                None => None,
                Some(_) => Some(req_usize(v, "sample_size")?),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Consistency checks (diffusers raises on the same conditions, or would build a model we do not support).
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(cfg_err("`block_out_channels` is empty"));
        }
        self.check_sizes()?;
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(cfg_err(format!(
                "{} block_out_channels, {} down_block_types, {} up_block_types: must be equal",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.layers_per_block == 0 {
            return Err(cfg_err("`layers_per_block` must be >= 1"));
        }
        if self.downsample_padding != 1 {
            return Err(cfg_err(format!(
                "`downsample_padding` {} is not supported (only 1)",
                self.downsample_padding
            )));
        }
        if self.norm_num_groups == 0 {
            return Err(cfg_err("`norm_num_groups` must be >= 1"));
        }
        let g = self.norm_num_groups;
        let c0 = self.block_out_channels[0];
        // Every GroupNorm input width: the levels, the up blocks' concatenations (checked at load).
        for &c in &self.block_out_channels {
            if c % g != 0 {
                return Err(cfg_err(format!(
                    "block_out_channels entry {c} is not divisible by norm_num_groups {g}"
                )));
            }
            if c < self.attention_head_dim {
                return Err(cfg_err(format!(
                    "{c} channels give no attention head of attention_head_dim {}",
                    self.attention_head_dim
                )));
            }
        }
        if self.in_channels == 0 || self.out_channels == 0 || c0 == 0 {
            return Err(cfg_err("channel counts must be positive"));
        }
        if self.norm_eps.is_nan() || self.norm_eps < 0.0 || self.mid_block_scale_factor == 0.0 {
            return Err(cfg_err("bad `norm_eps` or `mid_block_scale_factor`"));
        }
        Ok(())
    }

    /// Every size field within [`crate::limits`]' ceilings (before anything is built from them).
    /// The parameter counts in the messages are lower bounds: (2L + 1) resnets of two 3x3 convs
    /// per level of width c, 18 c^2 each.
    fn check_sizes(&self) -> Result<()> {
        use crate::limits::*;
        let part = "UNet config:";
        let layers = self.layers_per_block as u128;
        let sum_c2: u128 = self
            .block_out_channels
            .iter()
            .map(|&c| (c as u128).saturating_mul(c as u128))
            .fold(0, u128::saturating_add);
        let c0 = self.block_out_channels[0] as u128;
        config_field(
            part,
            "block_out_channels (entries)",
            self.block_out_channels.len(),
            MAX_LEVELS,
            4,
            |l| l.saturating_mul(18 * 320 * 320),
        )?;
        for &c in &self.block_out_channels {
            config_field(part, "block_out_channels", c, MAX_CHANNELS, 1280, |c| {
                (2 * layers + 1)
                    .saturating_mul(18)
                    .saturating_mul(c.saturating_mul(c))
            })?;
        }
        config_field(
            part,
            "layers_per_block",
            self.layers_per_block,
            MAX_LAYERS_PER_BLOCK,
            2,
            |l| {
                l.saturating_mul(2)
                    .saturating_add(1)
                    .saturating_mul(18)
                    .saturating_mul(sum_c2)
            },
        )?;
        config_field(
            part,
            "in_channels",
            self.in_channels,
            MAX_IO_CHANNELS,
            4,
            |v| v.saturating_mul(9).saturating_mul(c0),
        )?;
        config_field(
            part,
            "out_channels",
            self.out_channels,
            MAX_IO_CHANNELS,
            4,
            |v| v.saturating_mul(9).saturating_mul(c0),
        )?;
        config_field(
            part,
            "attention_head_dim",
            self.attention_head_dim,
            MAX_HEAD_DIM,
            64,
            |d| {
                // transformer_in: q, k, v, out projections of 8 heads x d.
                d.saturating_mul(d).saturating_mul(256)
            },
        )?;
        config_field(
            part,
            "cross_attention_dim",
            self.cross_attention_dim,
            MAX_CHANNELS,
            1024,
            |x| x.saturating_mul(2).saturating_mul(c0),
        )?;
        config_field(
            part,
            "norm_num_groups",
            self.norm_num_groups,
            MAX_GROUPS,
            32,
            |_| 0,
        )?;
        if let Some(s) = self.sample_size {
            config_field(part, "sample_size", s, MAX_CHANNELS, 40, |_| 0)?;
        }
        Ok(())
    }

    /// Width of the time (and fps) embedding: 4 * C0.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    /// (heads, head_dim) of the spatial and temporal transformers of a level with `channels`
    /// channels: (channels / attention_head_dim, attention_head_dim).
    pub fn level_heads(&self, channels: usize) -> (usize, usize) {
        (channels / self.attention_head_dim, self.attention_head_dim)
    }

    /// (heads, head_dim) of `transformer_in`: (8, attention_head_dim).
    pub fn transformer_in_heads(&self) -> (usize, usize) {
        (8, self.attention_head_dim)
    }

    /// Number of x2 down/upsamplings (every level but the last).
    pub fn num_upsamplers(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

//! The VideoCrafter2 UNet3D (diffusers `UNet3DConditionModel` + VideoCrafter's fps embedding), with
//! the exact diffusers parameter keys.
//!
//! API layout: `sample` is channels-last `[B, F, h, w, C]` (B = CFG batch, F = this clip's frames),
//! `encoder_hidden_states` `[B, L, cross_attention_dim]`. Inside, activations are per frame
//! `[B*F, h, w, C]` (row b*F + f, as diffusers' `[B*F, C, H, W]`); everything that mixes frames
//! (temporal conv layers, the temporal transformers' GroupNorm and attention) goes through the
//! [`TemporalContext`], so the same code runs the whole video ([`crate::temporal::LocalContext`]) or one
//! clip of Video-Infinity. Only `vi_runtime::ops` calls: the same code runs on every backend.

mod blocks;
pub mod config;
mod temporal_transformer;
mod transformer;

use std::collections::BTreeMap;

use vi_runtime::{ops, DType, Device, Tensor};

pub use config::{DownBlockType, UNetConfig, UpBlockType};

use crate::layers::{Conv2d, GroupNorm, Linear};
use crate::params::{MetaRecorder, ModelError, Params, Result};
use crate::temporal::TemporalContext;
use blocks::{DownBlock, Fwd, MidBlock, UpBlock};
use temporal_transformer::TransformerTemporal;

/// Observer of named intermediate tensors: `"<diffusers module path>/<in|out>"` with the tensor in
/// this crate's layout ([B*F, h, w, C] per frame; [B*h*w, F, C] for temporal attention in/out;
/// [1, 4*C0] for `time_embedding/out`).
pub type Trace<'a> = &'a dyn Fn(&str, &Tensor);

/// diffusers `TimestepEmbedding` (linear_1 -> SiLU -> linear_2).
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn load(p: Params, cin: usize, cout: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::load(p, "linear_1", cin, cout)?,
            linear_2: Linear::load(p, "linear_2", cout, cout)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = ops::silu(&self.linear_1.forward(x)?)?;
        self.linear_2.forward(&h)
    }
}

/// The UNet3D with its weights.
pub struct UNet3D {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    fps_embedding: Option<TimestepEmbedding>,
    transformer_in: TransformerTemporal,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Dtype of the residual stream (block inputs/outputs, skips): F32 by default whatever the
    /// weights' dtype (docs/precision.md); every block keeps its input's dtype for its output.
    stream_dtype: DType,
}

impl UNet3D {
    /// Run the residual stream in `dtype` instead of F32 (e.g. the weights' bf16: faster, less
    /// accurate; for measuring what the f32 stream costs).
    pub fn set_residual_dtype(&mut self, dtype: DType) {
        self.stream_dtype = dtype;
    }

    /// Build from `cfg` with parameters under the exact diffusers keys of `p` (optional keys such
    /// as `conv_shortcut` are decided by the config, never by probing `p`).
    pub fn load(cfg: &UNetConfig, p: Params) -> Result<UNet3D> {
        cfg.validate()?;
        let c0 = cfg.block_out_channels[0];
        let temb = cfg.time_embed_dim();
        let g = cfg.norm_num_groups;
        let (tin_heads, tin_hd) = cfg.transformer_in_heads();
        let down_blocks = cfg
            .down_block_types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                DownBlock::load(
                    p.pp("down_blocks").pp(i).p(),
                    cfg,
                    i,
                    *t == DownBlockType::CrossAttn,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = cfg
            .up_block_types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                UpBlock::load(
                    p.pp("up_blocks").pp(i).p(),
                    cfg,
                    i,
                    *t == UpBlockType::CrossAttn,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(UNet3D {
            stream_dtype: DType::F32,
            config: cfg.clone(),
            conv_in: Conv2d::load(p, "conv_in", cfg.in_channels, c0, 3)?,
            time_embedding: TimestepEmbedding::load(p.pp("time_embedding").p(), c0, temb)?,
            fps_embedding: if cfg.fps_cond {
                Some(TimestepEmbedding::load(
                    p.pp("fps_embedding").p(),
                    c0,
                    temb,
                )?)
            } else {
                None
            },
            transformer_in: TransformerTemporal::load(
                p.pp("transformer_in").p(),
                c0,
                tin_heads,
                tin_hd,
                g,
            )?,
            down_blocks,
            mid_block: MidBlock::load(p.pp("mid_block").p(), cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(p, "conv_norm_out", c0, g, cfg.norm_eps)?,
            conv_out: Conv2d::load(p, "conv_out", c0, cfg.out_channels, 3)?,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// emb = time_embedding(sinusoid(t)) + fps_embedding(sinusoid(fps)) (the fps term only with
    /// `fps_cond`); sinusoids of C0 channels, cos half first, shift 0. Returns [1, 4*C0].
    pub fn time_embedding(
        &self,
        timestep: f32,
        fps: f32,
        device: Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let c0 = self.config.block_out_channels[0];
        let sinusoids = ops::TimestepEmbedding {
            dim: c0,
            flip_sin_to_cos: true,
            shift: 0.0,
        };
        let t = ops::timestep_embedding(&[timestep], &sinusoids, device, dtype)?;
        let mut emb = self.time_embedding.forward(&t)?;
        if let Some(fe) = &self.fps_embedding {
            let s = ops::timestep_embedding(&[fps], &sinusoids, device, dtype)?;
            emb = ops::add(&emb, &fe.forward(&s)?)?;
        }
        Ok(emb)
    }

    /// One UNet evaluation: sample [B, F, h, w, in_channels] (channels-last), one timestep and fps
    /// for the whole batch, encoder_hidden_states [B, L, cross_attention_dim] (row b conditions
    /// batch row b) -> [B, F, h, w, out_channels].
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f32,
        fps: f32,
        encoder_hidden_states: &Tensor,
        ctx: &dyn TemporalContext,
    ) -> Result<Tensor> {
        self.forward_inner(sample, timestep, fps, encoder_hidden_states, ctx, None, 0)
    }

    /// [`UNet3D::forward`] with the per-frame blocks (ResNets, spatial transformers) run over
    /// chunks of `frame_chunk` frames of one batch row (0: whole): the same result, smaller
    /// transients (`crate::schedule::Schedule::frame_chunk`).
    pub fn forward_chunked(
        &self,
        sample: &Tensor,
        timestep: f32,
        fps: f32,
        encoder_hidden_states: &Tensor,
        ctx: &dyn TemporalContext,
        frame_chunk: usize,
    ) -> Result<Tensor> {
        self.forward_inner(
            sample,
            timestep,
            fps,
            encoder_hidden_states,
            ctx,
            None,
            frame_chunk,
        )
    }

    /// [`UNet3D::forward`] reporting intermediate tensors to `trace` (see [`Trace`]).
    pub fn forward_traced(
        &self,
        sample: &Tensor,
        timestep: f32,
        fps: f32,
        encoder_hidden_states: &Tensor,
        ctx: &dyn TemporalContext,
        trace: Option<Trace>,
    ) -> Result<Tensor> {
        self.forward_inner(sample, timestep, fps, encoder_hidden_states, ctx, trace, 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_inner(
        &self,
        sample: &Tensor,
        timestep: f32,
        fps: f32,
        encoder_hidden_states: &Tensor,
        ctx: &dyn TemporalContext,
        trace: Option<Trace>,
        frame_chunk: usize,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let ehs = encoder_hidden_states;
        if sample.rank() != 5 || sample.dim(4) != cfg.in_channels {
            return Err(ModelError::Msg(format!(
                "UNet sample must be [B, F, h, w, {}] (channels-last), got {:?}",
                cfg.in_channels,
                sample.shape()
            )));
        }
        let (b, f, hh, ww) = (sample.dim(0), sample.dim(1), sample.dim(2), sample.dim(3));
        if b == 0 || f == 0 || hh == 0 || ww == 0 {
            return Err(ModelError::Msg(format!(
                "UNet sample {:?} is empty",
                sample.shape()
            )));
        }
        if ehs.rank() != 3 || ehs.dim(0) != b || ehs.dim(2) != cfg.cross_attention_dim {
            return Err(ModelError::Msg(format!(
                "encoder_hidden_states must be [{b}, L, {}], got {:?}",
                cfg.cross_attention_dim,
                ehs.shape()
            )));
        }
        let tr = |name: &str, x: &Tensor| {
            if let Some(t) = trace {
                t(name, x);
            }
        };

        let emb = self.time_embedding(timestep, fps, sample.device(), sample.dtype())?;
        tr("time_embedding/out", &emb);
        let emb_silu = ops::silu(&emb)?;
        let fw = Fwd {
            batch: b,
            emb_silu: &emb_silu,
            ehs,
            ctx,
            trace,
            frame_chunk,
        };

        let x = sample.reshape(&[b * f, hh, ww, cfg.in_channels])?;
        // Precision policy: the residual stream (block inputs/outputs, skips) is `stream_dtype` (f32)
        // whatever the weights' dtype; each branch (norm -> GEMM/conv/attention) runs in the
        // weights' dtype and every block returns its input's dtype.
        // Every block takes its input by value, so no activation outlives its last reader (what a
        // rank holds while it waits in an exchange: docs/design.md section 7).
        let mut h = {
            let c = self.conv_in.forward(&x)?.to_dtype(self.stream_dtype)?;
            tr("conv_in/out", &c);
            self.transformer_in
                .forward(&c, b, ctx, "transformer_in", trace, frame_chunk)?
        };
        tr("transformer_in/out", &h);

        let mut skips = vec![h.clone()];
        for (i, blk) in self.down_blocks.iter().enumerate() {
            h = blk.forward(h, &fw, &format!("down_blocks.{i}"), &mut skips)?;
        }
        h = self.mid_block.forward(&h, &fw)?;
        for (i, blk) in self.up_blocks.iter().enumerate() {
            h = blk.forward(h, &fw, &format!("up_blocks.{i}"), &mut skips)?;
        }
        if !skips.is_empty() {
            return Err(ModelError::Msg(format!(
                "{} skip connections left unused",
                skips.len()
            )));
        }
        let h = self
            .conv_norm_out
            .forward_nhwc(&h, true, self.conv_out.dtype())?;
        let out = self.conv_out.forward(&h)?;
        tr("conv_out/out", &out);
        Ok(out.reshape(&[b, f, out.dim(1), out.dim(2), cfg.out_channels])?)
    }
}

/// The parameter table (exact diffusers key -> shape) of the UNet built from `cfg`, without weights.
pub fn parameter_table(cfg: &UNetConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    let rec = MetaRecorder::new();
    UNet3D::load(cfg, Params::new(&rec))?;
    Ok(rec.table())
}

/// [B, C, F, H, W] (diffusers / golden layout) -> [B, F, H, W, C] (this crate's API layout).
pub fn ncfhw_to_channels_last(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 5 {
        return Err(ModelError::Msg(format!(
            "expected a 5-D [B, C, F, H, W] tensor, got {:?}",
            x.shape()
        )));
    }
    Ok(ops::permute(x, &[0, 2, 3, 4, 1])?)
}

/// [B, F, H, W, C] -> [B, C, F, H, W]: inverse of [`ncfhw_to_channels_last`].
pub fn channels_last_to_ncfhw(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 5 {
        return Err(ModelError::Msg(format!(
            "expected a 5-D [B, F, H, W, C] tensor, got {:?}",
            x.shape()
        )));
    }
    Ok(ops::permute(x, &[0, 4, 1, 2, 3])?)
}

//! The down, mid and up blocks of the UNet3D (diffusers `CrossAttnDownBlock3D`, `DownBlock3D`,
//! `UNetMidBlock3DCrossAttn`, `CrossAttnUpBlock3D`, `UpBlock3D`). Activations are per frame
//! [B*F, H, W, C] (row b*F + f); the temporal parts view them as [B, F, H*W, C].

use std::cell::RefCell;

use vi_runtime::{ops, Tensor};

use super::config::UNetConfig;
use super::temporal_transformer::TransformerTemporal;
use super::transformer::Transformer2D;
use super::Trace;
use crate::layers::resnet::{Downsample, ResnetBlock, ResnetConfig, Upsample};
use crate::params::{Params, Result};
use crate::temporal::{FrameBlock, TemporalContext, TemporalConvLayer};

/// GroupNorm eps of TemporalConvLayer (PyTorch's nn.GroupNorm default; not the config's norm_eps).
pub(crate) const TEMP_CONV_GN_EPS: f32 = 1e-5;

/// What every block needs besides its input.
pub(crate) struct Fwd<'a> {
    /// B (CFG batch); the frame count is rows / B.
    pub batch: usize,
    /// SiLU(time + fps embedding), [1, 4*C0].
    pub emb_silu: &'a Tensor,
    /// [B, L, cross_dim].
    pub ehs: &'a Tensor,
    pub ctx: &'a dyn TemporalContext,
    pub trace: Option<Trace<'a>>,
    /// Per-frame blocks run over chunks of this many frames of one batch row (0: all rows in one
    /// call); the result is the same (every op of those blocks is per frame).
    pub frame_chunk: usize,
}

impl Fwd<'_> {
    pub fn trace(&self, name: impl FnOnce() -> String, x: &Tensor) {
        if let Some(t) = self.trace {
            t(&name(), x);
        }
    }

    /// A TemporalConvLayer on x [B*F, H, W, C] through the context.
    pub fn temp_conv(&self, layer: &TemporalConvLayer, x: &Tensor, name: &str) -> Result<Tensor> {
        let (nf, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let f = nf / self.batch;
        self.trace(|| format!("{name}/in"), x);
        let y = self
            .ctx
            .conv_layer(layer, &x.reshape(&[self.batch, f, h * w, c])?)?
            .reshape(&[nf, h, w, c])?;
        self.trace(|| format!("{name}/out"), &y);
        Ok(y)
    }

    /// A per-frame block `f(part, ehs of its batch row)` on x [B*F, H, W, C] (row b*F + f):
    /// whole, or over chunks of `frame_chunk` frames of one batch row, concatenated in row order.
    fn per_frame(
        &self,
        x: &Tensor,
        f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let frames = x.dim(0) / self.batch;
        let chunk = self.frame_chunk;
        if chunk == 0 || (chunk >= frames && self.batch == 1) {
            return f(x, self.ehs);
        }
        let mut parts = Vec::new();
        for b in 0..self.batch {
            let ehs = ops::narrow(self.ehs, 0, b, 1)?;
            let mut s = 0;
            while s < frames {
                let len = chunk.min(frames - s);
                parts.push(f(&ops::narrow(x, 0, b * frames + s, len)?, &ehs)?);
                s += len;
            }
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        Ok(ops::concat(&refs, 0)?)
    }

    /// A ResNet followed by a TemporalConvLayer: x [B*F, H, W, Cin] -> [B*F, H, W, C]. The
    /// context produces the ResNet's frames in the order it needs them
    /// ([`TemporalContext::conv_layer_from`]: the clip-parallel one computes the edge frames its
    /// neighbours need first and the interior while their halo flies). `x` is dropped once every
    /// frame is produced. Traced runs take the plain order (the trace shows the ResNet's output).
    pub fn resnet_temp_conv(
        &self,
        r: &ResnetBlock,
        layer: &TemporalConvLayer,
        x: Tensor,
        res_name: &str,
        conv_name: &str,
    ) -> Result<Tensor> {
        if self.trace.is_some() {
            let h = self.resnet(r, &x, res_name)?;
            drop(x);
            return self.temp_conv(layer, &h, conv_name);
        }
        let (nf, hh, ww) = (x.dim(0), x.dim(1), x.dim(2));
        let (b, f) = (self.batch, nf / self.batch);
        // (input, frames produced so far): the input is dropped with the last frames.
        let input = RefCell::new((Some(x), 0usize));
        let produce = |start: usize, len: usize| -> Result<Tensor> {
            let mut held = input.borrow_mut();
            let x = held.0.as_ref().ok_or_else(|| {
                crate::params::ModelError::Msg(format!(
                    "{res_name}: frames {start}..{} asked for after all {f} were produced",
                    start + len
                ))
            })?;
            // Frames start..start+len of every batch row (rows b*F + f).
            let part = if start == 0 && len == f {
                x.clone()
            } else if b == 1 {
                ops::narrow(x, 0, start, len)?
            } else {
                let rows = (0..b)
                    .map(|i| ops::narrow(x, 0, i * f + start, len))
                    .collect::<vi_runtime::Result<Vec<_>>>()?;
                let refs: Vec<&Tensor> = rows.iter().collect();
                ops::concat(&refs, 0)?
            };
            let y = self.per_frame(&part, &|p, _| r.forward(p, Some(self.emb_silu)))?;
            drop(part);
            held.1 += len;
            if held.1 >= f {
                held.0 = None;
            }
            let c = y.dim(3);
            Ok(y.reshape(&[b, len, hh * ww, c])?)
        };
        let block = FrameBlock {
            frame_rows: b * hh * ww,
            weight_bytes: r.conv_weight_bytes(),
        };
        let y = self.ctx.conv_layer_from(layer, f, block, &produce)?;
        let c = y.dim(3);
        Ok(y.reshape(&[nf, hh, ww, c])?)
    }

    pub fn resnet(&self, r: &ResnetBlock, x: &Tensor, name: &str) -> Result<Tensor> {
        let y = self.per_frame(x, &|p, _| r.forward(p, Some(self.emb_silu)))?;
        self.trace(|| format!("{name}/out"), &y);
        Ok(y)
    }

    pub fn attn(&self, a: &Transformer2D, x: &Tensor, name: &str) -> Result<Tensor> {
        let y = self.per_frame(x, &|p, ehs| a.forward(p, ehs))?;
        self.trace(|| format!("{name}/out"), &y);
        Ok(y)
    }

    pub fn temp_attn(&self, a: &TransformerTemporal, x: &Tensor, name: &str) -> Result<Tensor> {
        let y = a.forward(x, self.batch, self.ctx, name, self.trace, self.frame_chunk)?;
        self.trace(|| format!("{name}/out"), &y);
        Ok(y)
    }
}

/// Spatial + temporal transformer pair of a cross-attention layer.
pub(crate) struct AttnPair {
    pub attn: Transformer2D,
    pub temp_attn: TransformerTemporal,
}

impl AttnPair {
    fn load(p: Params, cfg: &UNetConfig, channels: usize, idx: usize) -> Result<AttnPair> {
        let (heads, hd) = cfg.level_heads(channels);
        let g = cfg.norm_num_groups;
        Ok(AttnPair {
            attn: Transformer2D::load(
                p.pp("attentions").pp(idx).p(),
                channels,
                heads,
                hd,
                cfg.cross_attention_dim,
                g,
            )?,
            temp_attn: TransformerTemporal::load(
                p.pp("temp_attentions").pp(idx).p(),
                channels,
                heads,
                hd,
                g,
            )?,
        })
    }
}

/// One layer of a down/up block: resnet -> temp_conv -> [attention -> temp_attention].
pub(crate) struct Layer {
    resnet: ResnetBlock,
    temp_conv: TemporalConvLayer,
    attn: Option<AttnPair>,
}

impl Layer {
    fn load(
        p: Params,
        cfg: &UNetConfig,
        cin: usize,
        cout: usize,
        idx: usize,
        cross: bool,
    ) -> Result<Layer> {
        let g = cfg.norm_num_groups;
        Ok(Layer {
            resnet: ResnetBlock::load(
                p.pp("resnets").pp(idx).p(),
                &ResnetConfig {
                    cin,
                    cout,
                    temb: Some(cfg.time_embed_dim()),
                    groups: g,
                    eps: cfg.norm_eps,
                    output_scale_factor: 1.0,
                },
            )?,
            temp_conv: TemporalConvLayer::load(
                p.pp("temp_convs").pp(idx).p(),
                cout,
                g,
                TEMP_CONV_GN_EPS,
            )?,
            attn: if cross {
                Some(AttnPair::load(p, cfg, cout, idx)?)
            } else {
                None
            },
        })
    }

    /// Takes its input by value: it is dropped once the ResNet has read it (an up block's
    /// [hidden, skip] concatenation is not kept across the layer's exchanges).
    fn forward(&self, x: Tensor, fw: &Fwd, prefix: &str, idx: usize) -> Result<Tensor> {
        let mut h = fw.resnet_temp_conv(
            &self.resnet,
            &self.temp_conv,
            x,
            &format!("{prefix}.resnets.{idx}"),
            &format!("{prefix}.temp_convs.{idx}"),
        )?;
        if let Some(a) = &self.attn {
            h = fw.attn(&a.attn, &h, &format!("{prefix}.attentions.{idx}"))?;
            h = fw.temp_attn(&a.temp_attn, &h, &format!("{prefix}.temp_attentions.{idx}"))?;
        }
        Ok(h)
    }
}

pub(crate) struct DownBlock {
    layers: Vec<Layer>,
    downsampler: Option<Downsample>,
}

impl DownBlock {
    /// Down block `i` of `cfg`.
    pub fn load(p: Params, cfg: &UNetConfig, i: usize, cross: bool) -> Result<DownBlock> {
        let boc = &cfg.block_out_channels;
        let cin = if i == 0 { boc[0] } else { boc[i - 1] };
        let cout = boc[i];
        let layers = (0..cfg.layers_per_block)
            .map(|l| Layer::load(p, cfg, if l == 0 { cin } else { cout }, cout, l, cross))
            .collect::<Result<Vec<_>>>()?;
        let downsampler = if i + 1 < boc.len() {
            Some(Downsample::load(p.pp("downsamplers").pp(0).p(), cout)?)
        } else {
            None
        };
        Ok(DownBlock {
            layers,
            downsampler,
        })
    }

    /// Appends every layer's output (and the downsampled output) to `skips`; returns the last.
    pub fn forward(
        &self,
        x: Tensor,
        fw: &Fwd,
        prefix: &str,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x;
        for (l, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h, fw, prefix, l)?;
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            fw.trace(|| format!("{prefix}.downsamplers.0/out"), &h);
            skips.push(h.clone());
        }
        fw.trace(|| format!("{prefix}/out"), &h);
        Ok(h)
    }
}

/// `UNetMidBlock3DCrossAttn` with one attention layer: resnet0, temp_conv0, then attention,
/// temp_attention, resnet1, temp_conv1.
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock>,
    temp_convs: Vec<TemporalConvLayer>,
    attns: Vec<AttnPair>,
}

impl MidBlock {
    pub fn load(p: Params, cfg: &UNetConfig) -> Result<MidBlock> {
        let c = *cfg.block_out_channels.last().expect("validated config");
        let g = cfg.norm_num_groups;
        let num_layers = 1;
        let mut resnets = Vec::new();
        let mut temp_convs = Vec::new();
        let mut attns = Vec::new();
        for j in 0..=num_layers {
            resnets.push(ResnetBlock::load(
                p.pp("resnets").pp(j).p(),
                &ResnetConfig {
                    cin: c,
                    cout: c,
                    temb: Some(cfg.time_embed_dim()),
                    groups: g,
                    eps: cfg.norm_eps,
                    output_scale_factor: cfg.mid_block_scale_factor,
                },
            )?);
            temp_convs.push(TemporalConvLayer::load(
                p.pp("temp_convs").pp(j).p(),
                c,
                g,
                TEMP_CONV_GN_EPS,
            )?);
        }
        for j in 0..num_layers {
            attns.push(AttnPair::load(p, cfg, c, j)?);
        }
        Ok(MidBlock {
            resnets,
            temp_convs,
            attns,
        })
    }

    pub fn forward(&self, x: &Tensor, fw: &Fwd) -> Result<Tensor> {
        let pre = "mid_block";
        let mut h = fw.resnet_temp_conv(
            &self.resnets[0],
            &self.temp_convs[0],
            x.clone(),
            &format!("{pre}.resnets.0"),
            &format!("{pre}.temp_convs.0"),
        )?;
        for (j, a) in self.attns.iter().enumerate() {
            h = fw.attn(&a.attn, &h, &format!("{pre}.attentions.{j}"))?;
            h = fw.temp_attn(&a.temp_attn, &h, &format!("{pre}.temp_attentions.{j}"))?;
            h = fw.resnet_temp_conv(
                &self.resnets[j + 1],
                &self.temp_convs[j + 1],
                h,
                &format!("{pre}.resnets.{}", j + 1),
                &format!("{pre}.temp_convs.{}", j + 1),
            )?;
        }
        fw.trace(|| format!("{pre}/out"), &h);
        Ok(h)
    }
}

pub(crate) struct UpBlock {
    layers: Vec<Layer>,
    upsampler: Option<Upsample>,
}

impl UpBlock {
    /// Up block `i` of `cfg` (layers_per_block + 1 layers; layer j's resnet takes the running
    /// hidden states concatenated with a skip).
    pub fn load(p: Params, cfg: &UNetConfig, i: usize, cross: bool) -> Result<UpBlock> {
        let n = cfg.block_out_channels.len();
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let prev_out = if i == 0 { rev[0] } else { rev[i - 1] };
        let cout = rev[i];
        let cin = rev[(i + 1).min(n - 1)];
        let num_layers = cfg.layers_per_block + 1;
        let layers = (0..num_layers)
            .map(|j| {
                let skip = if j == num_layers - 1 { cin } else { cout };
                let res_in = if j == 0 { prev_out } else { cout };
                Layer::load(p, cfg, res_in + skip, cout, j, cross)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = if i + 1 < n {
            Some(Upsample::load(p.pp("upsamplers").pp(0).p(), cout)?)
        } else {
            None
        };
        Ok(UpBlock { layers, upsampler })
    }

    /// Pops one skip per layer from `skips` (last first); the upsampler targets the size of the
    /// skip that the next block will pop first.
    pub fn forward(
        &self,
        x: Tensor,
        fw: &Fwd,
        prefix: &str,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x;
        for (j, layer) in self.layers.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                crate::params::ModelError::Msg(format!("{prefix}: ran out of skip connections"))
            })?;
            // Channel concat with the skip last: [hidden, skip].
            h = vi_runtime::ops::concat(&[&h, &skip], 3)?;
            drop(skip);
            h = layer.forward(h, fw, prefix, j)?;
        }
        if let Some(u) = &self.upsampler {
            let next = skips.last().ok_or_else(|| {
                crate::params::ModelError::Msg(format!(
                    "{prefix}: no skip left to size the upsampling"
                ))
            })?;
            h = u.forward_to_size(&h, (next.dim(1), next.dim(2)))?;
            fw.trace(|| format!("{prefix}.upsamplers.0/out"), &h);
        }
        fw.trace(|| format!("{prefix}/out"), &h);
        Ok(h)
    }
}

//! The CLIP text encoder (transformers `CLIPTextModel`), as the text-to-video pipeline uses it.
//!
//! `last_hidden_state` = final_layer_norm(blocks(token_embedding(ids) + position_embedding(0..S))),
//! each block pre-LayerNorm: `x += out_proj(causal_attention(layer_norm1(x)))`,
//! `x += fc2(act(fc1(layer_norm2(x))))`. No padding mask: the pipeline passes none, so pad tokens
//! are ordinary (causally masked) tokens. Activations are `[n_prompts, S, hidden]`.
//!
//! Keys are the transformers 5 spelling (`embeddings.*`, `encoder.layers.{i}.*`,
//! `final_layer_norm.*`); files written by transformers 4 add a `text_model.` prefix, which callers
//! handle with `StoreSource::with_alt_prefix("text_model.")`. The legacy non-persistent buffer
//! `embeddings.position_ids` is never requested.

use serde_json::Value;
use vi_runtime::{ops, DType, Tensor};

use crate::layers::attention::{Attention, AttentionKeys, FeedForward, FfActivation};
use crate::layers::LayerNorm;
use crate::params::{ModelError, Params, Result};

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `"gelu"`: exact erf GELU (OpenCLIP ViT-H text tower, i.e. VideoCrafter2 / zeroscope).
    Gelu,
    /// `"quick_gelu"`: x * sigmoid(1.702 x) (OpenAI CLIP).
    QuickGelu,
}

/// transformers `CLIPTextConfig`: the fields that shape the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f32,
}

fn get_usize(v: &Value, name: &str, default: Option<usize>) -> Result<usize> {
    match v.get(name) {
        None | Some(Value::Null) => default
            .ok_or_else(|| ModelError::Config(format!("CLIP text config: missing field `{name}`"))),
        Some(x) => x
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                ModelError::Config(format!(
                    "CLIP text config: `{name}` must be a positive integer, got {x}"
                ))
            }),
    }
}

impl ClipTextConfig {
    /// Parse a transformers config dict: a `CLIPTextConfig` (`model_type: clip_text_model`, as in
    /// `text_encoder/config.json`) or a full `CLIPConfig` whose `text_config` holds it.
    /// The structural fields (hidden_size, num_hidden_layers, num_attention_heads,
    /// intermediate_size) are required; the others take the transformers defaults when absent
    /// (max_position_embeddings 77, vocab_size 49408, hidden_act "quick_gelu", layer_norm_eps 1e-5).
    pub fn from_json(v: &Value) -> Result<Self> {
        let v = match v.get("text_config") {
            Some(t) if t.is_object() => t,
            _ => v,
        };
        if !v.is_object() {
            return Err(ModelError::Config(
                "CLIP text config must be a JSON object".into(),
            ));
        }
        let hidden_act = match v.get("hidden_act") {
            None | Some(Value::Null) => ClipActivation::QuickGelu,
            Some(Value::String(s)) if s == "gelu" => ClipActivation::Gelu,
            Some(Value::String(s)) if s == "quick_gelu" => ClipActivation::QuickGelu,
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "CLIP text config: hidden_act {other} is not supported (\"gelu\" or \"quick_gelu\")"
                )))
            }
        };
        let layer_norm_eps = match v.get("layer_norm_eps") {
            None | Some(Value::Null) => 1e-5,
            Some(x) => x.as_f64().filter(|e| *e > 0.0).ok_or_else(|| {
                ModelError::Config(format!(
                    "CLIP text config: layer_norm_eps must be a positive number, got {x}"
                ))
            })? as f32,
        };
        let cfg = ClipTextConfig {
            hidden_size: get_usize(v, "hidden_size", None)?,
            num_hidden_layers: get_usize(v, "num_hidden_layers", None)?,
            num_attention_heads: get_usize(v, "num_attention_heads", None)?,
            intermediate_size: get_usize(v, "intermediate_size", None)?,
            max_position_embeddings: get_usize(v, "max_position_embeddings", Some(77))?,
            vocab_size: get_usize(v, "vocab_size", Some(49408))?,
            hidden_act,
            layer_norm_eps,
        };
        {
            use crate::limits::*;
            let part = "CLIP text config:";
            let h = cfg.hidden_size as u128;
            let layers = cfg.num_hidden_layers as u128;
            let vocab = cfg.vocab_size as u128;
            // Parameters per layer: 4 h^2 attention + 2 h x intermediate MLP.
            let per_layer = |h: u128, i: u128| {
                h.saturating_mul(h)
                    .saturating_mul(4)
                    .saturating_add(h.saturating_mul(i).saturating_mul(2))
            };
            let inter = cfg.intermediate_size as u128;
            config_field(
                part,
                "hidden_size",
                cfg.hidden_size,
                MAX_CHANNELS,
                1024,
                |h| {
                    per_layer(h, inter)
                        .saturating_mul(layers)
                        .saturating_add(h.saturating_mul(vocab))
                },
            )?;
            config_field(
                part,
                "num_hidden_layers",
                cfg.num_hidden_layers,
                MAX_TEXT_LAYERS,
                23,
                |l| l.saturating_mul(per_layer(h, inter)),
            )?;
            config_field(
                part,
                "num_attention_heads",
                cfg.num_attention_heads,
                MAX_TEXT_HEADS,
                16,
                |_| 0,
            )?;
            config_field(
                part,
                "intermediate_size",
                cfg.intermediate_size,
                MAX_INTERMEDIATE,
                4096,
                |i| layers.saturating_mul(per_layer(h, i)),
            )?;
            config_field(
                part,
                "max_position_embeddings",
                cfg.max_position_embeddings,
                MAX_POSITIONS,
                77,
                |p| p.saturating_mul(h),
            )?;
            config_field(part, "vocab_size", cfg.vocab_size, MAX_VOCAB, 49408, |v| {
                v.saturating_mul(h)
            })?;
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(ModelError::Config(format!(
                "CLIP text config: hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl From<ClipActivation> for FfActivation {
    fn from(a: ClipActivation) -> Self {
        match a {
            ClipActivation::Gelu => FfActivation::Gelu,
            ClipActivation::QuickGelu => FfActivation::QuickGelu,
        }
    }
}

/// transformers `CLIPEncoderLayer`.
struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: FeedForward,
}

/// transformers `CLIPTextModel` (text transformer only; no projection head).
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    /// [vocab_size, hidden]
    token_embedding: Tensor,
    /// [max_position_embeddings, hidden]
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_ln: LayerNorm,
}

impl ClipTextModel {
    /// Load (or, on a `MetaRecorder`, just enumerate) every parameter. `p` is the model root:
    /// keys `embeddings.*`, `encoder.layers.{i}.*`, `final_layer_norm.*`.
    pub fn load(cfg: &ClipTextConfig, p: Params) -> Result<Self> {
        let (c, ff, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let emb = p.pp("embeddings");
        let token_embedding = emb.get("token_embedding.weight", &[cfg.vocab_size, c])?;
        let position_embedding = emb.get(
            "position_embedding.weight",
            &[cfg.max_position_embeddings, c],
        )?;
        let (h, d) = (cfg.num_attention_heads, cfg.head_dim());
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let layer = p.pp("encoder.layers").pp(i);
            let l = layer.p();
            layers.push(ClipLayer {
                layer_norm1: LayerNorm::load(l, "layer_norm1", c, eps)?,
                // head_dim^-0.5 with powf, as the CLIP encoder has always computed it (1/sqrt, the
                // default, differs in the last bit for most head_dims).
                self_attn: Attention::load(
                    l.pp("self_attn").p(),
                    &AttentionKeys::CLIP,
                    c,
                    c,
                    h,
                    d,
                )?
                .with_scale((d as f32).powf(-0.5)),
                layer_norm2: LayerNorm::load(l, "layer_norm2", c, eps)?,
                mlp: FeedForward::load(
                    l.pp("mlp").p(),
                    ("fc1", "fc2"),
                    c,
                    ff,
                    cfg.hidden_act.into(),
                )?,
            });
        }
        let final_ln = LayerNorm::load(p, "final_layer_norm", c, eps)?;
        Ok(ClipTextModel {
            config: cfg.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_ln,
        })
    }

    /// `last_hidden_state` [n_prompts, S, hidden] of `ids` (n_prompts rows of S token ids each,
    /// row-major; S = ids.len() / n_prompts, at most max_position_embeddings — 77 for the
    /// pipeline's padded prompts). On the device/dtype of the weights.
    pub fn forward(&self, ids: &[u32], n_prompts: usize) -> Result<Tensor> {
        let cfg = &self.config;
        if n_prompts == 0 || ids.is_empty() || !ids.len().is_multiple_of(n_prompts) {
            return Err(ModelError::Msg(format!(
                "CLIP text encoder: {} token ids do not split into {n_prompts} prompts",
                ids.len()
            )));
        }
        let s = ids.len() / n_prompts;
        if s > cfg.max_position_embeddings {
            return Err(ModelError::Msg(format!(
                "CLIP text encoder: {s} tokens per prompt exceed max_position_embeddings {}",
                cfg.max_position_embeddings
            )));
        }
        let c = cfg.hidden_size;
        let positions: Vec<u32> = (0..s as u32).collect();
        let tok = ops::embedding(ids, &self.token_embedding)?.reshape(&[n_prompts, s, c])?;
        // [S, C], broadcast over the prompts.
        let pos = ops::embedding(&positions, &self.position_embedding)?;
        // Precision policy (docs/precision.md): the residual stream is f32, the layers' operands
        // are in the weights' dtype; the output is in the weights' dtype.
        let dt = self.token_embedding.dtype();
        let mut x = ops::add_to(&tok, &pos, DType::F32)?;
        for l in &self.layers {
            let hs = l.layer_norm1.forward(&x, dt)?;
            x = l.self_attn.forward_add(&hs, &hs, &x, true)?;
            let hs = l.layer_norm2.forward(&x, dt)?;
            x = l.mlp.forward_add(&hs, &x)?;
        }
        self.final_ln.forward(&x, dt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both activations against their scalar definitions.
    #[test]
    fn activations_match_definitions() {
        let xs: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.2).collect();
        let t = Tensor::from_vec(xs.clone(), &[xs.len()]).unwrap();
        let quick = FfActivation::from(ClipActivation::QuickGelu)
            .apply(&t)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let gelu = FfActivation::from(ClipActivation::Gelu)
            .apply(&t)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        for (i, &x) in xs.iter().enumerate() {
            let x64 = x as f64;
            let q = x64 / (1.0 + (-1.702 * x64).exp());
            assert!(
                (quick[i] as f64 - q).abs() <= 1e-6 + 1e-6 * q.abs(),
                "quick_gelu({x})"
            );
            // exact GELU with erf evaluated in f64
            let g = 0.5 * x64 * (1.0 + erf(x64 / std::f64::consts::SQRT_2));
            assert!(
                (gelu[i] as f64 - g).abs() <= 1e-6 + 1e-6 * g.abs(),
                "gelu({x})"
            );
        }
    }

    /// erf in f64: Taylor series for |x| <= 3, erfc's continued fraction beyond.
    fn erf(x: f64) -> f64 {
        if x.abs() > 3.0 {
            // continued fraction for erfc(|x|), evaluated from the tail.
            let a = x.abs();
            let mut f = 0.0;
            for k in (1..=60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            return x.signum() * (1.0 - erfc);
        }
        let (mut sum, mut term) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }
}

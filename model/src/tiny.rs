//! The embedded tiny model (`--model tiny`): VideoCrafter2's architecture at a small width with
//! deterministic RANDOM weights made in-process (no files), and CLIP's public BPE tables.
//!
//! It exercises the whole pipeline (text encoder, clip-parallel UNet, sampler, VAE) on any machine,
//! distributed over simulated ranks; its videos are noise-like by nature, since nothing was
//! trained. Sizes: UNet block_out_channels [32, 64, 64, 64] (attention_head_dim 8, 8 groups,
//! cross-attention 32), CLIP hidden 32 x 2 layers, VAE [32, 32, 64, 64] (8 groups).
//!
//! Weights ([`HashedParams`]): each tensor comes from a `ChaCha8Rng` seeded with the FNV-1a hash
//! of its key (the same key always gives the same values, independent of load order):
//! 1-D `*.weight` (norm gains) 1 + U(-0.1, 0.1); 1-D biases U(-0.05, 0.05); other tensors
//! U(-b, b) with b = 1/sqrt(fan_in), fan_in = product of all dims but the first (PyTorch's default
//! bound for Linear/Conv).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use vi_runtime::{DType, Device, Tensor};
use vi_weights::WDType;

use crate::clip::ClipTextConfig;
use crate::models::{Models, PartKind};
use crate::params::{ModelError, ParamSource, Result};
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

/// CLIP's BPE tables (vocab.json + merges.txt), the same files as `tests/golden/tokenizer/`.
const VOCAB_JSON: &[u8] = include_bytes!("../../tests/golden/tokenizer/vocab.json");
const MERGES_TXT: &[u8] = include_bytes!("../../tests/golden/tokenizer/merges.txt");

/// The tiny UNet's diffusers `config.json`.
pub fn unet_config_json() -> Value {
    json!({
        "_class_name": "UNetVideoCrafter",
        "in_channels": 4, "out_channels": 4,
        "block_out_channels": [32, 64, 64, 64],
        "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D",
                             "CrossAttnDownBlock3D", "DownBlock3D"],
        "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D",
                           "CrossAttnUpBlock3D"],
        "layers_per_block": 2, "attention_head_dim": 8, "num_attention_heads": null,
        "cross_attention_dim": 32, "norm_num_groups": 8, "norm_eps": 1e-5,
        "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1,
        "fps_cond": true, "sample_size": 8
    })
}

/// The tiny UNet's config.
pub fn unet_config() -> UNetConfig {
    UNetConfig::from_json(&unet_config_json()).expect("valid tiny UNet config")
}

/// The tiny text encoder's transformers `config.json`.
pub fn clip_config_json() -> Value {
    json!({
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 77, "vocab_size": 49408,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5
    })
}

/// The tiny text encoder's config.
pub fn clip_config() -> ClipTextConfig {
    ClipTextConfig::from_json(&clip_config_json()).expect("valid tiny CLIP config")
}

/// The tiny VAE's diffusers `config.json`.
pub fn vae_config_json() -> Value {
    json!({
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2,
        "norm_num_groups": 8, "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                           "UpDecoderBlock2D"]
    })
}

/// The tiny VAE's config.
pub fn vae_config() -> VaeConfig {
    VaeConfig::from_json(&vae_config_json()).expect("valid tiny VAE config")
}

/// 64-bit FNV-1a.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Deterministic random parameters keyed by name (module doc), on `device` in `dtype`.
pub struct HashedParams {
    pub device: Device,
    pub dtype: DType,
    /// Mixed into every key's hash (0 for the tiny model).
    pub salt: u64,
}

impl HashedParams {
    pub fn values(&self, key: &str, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(fnv1a(key) ^ self.salt);
        let (lo, hi, offset) = if shape.len() == 1 {
            if key.ends_with("weight") {
                (-0.1, 0.1, 1.0)
            } else {
                (-0.05, 0.05, 0.0)
            }
        } else {
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let b = 1.0 / (fan_in as f32).sqrt();
            (-b, b, 0.0)
        };
        (0..n).map(|_| offset + rng.random_range(lo..hi)).collect()
    }
}

impl ParamSource for HashedParams {
    fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.values(key, shape), shape)?
            .to_device(self.device)?
            .to_dtype(crate::params::param_dtype(shape, self.dtype))?)
    }
    fn contains(&self, _key: &str) -> bool {
        false
    }
}

/// CLIP's tokenizer from the embedded tables.
pub fn tokenizer() -> Result<ClipTokenizer> {
    // Parsed from memory: loading writes no file.
    fn text(b: &'static [u8]) -> &'static str {
        std::str::from_utf8(b).expect("embedded tables are UTF-8")
    }
    ClipTokenizer::from_texts(
        text(VOCAB_JSON),
        text(MERGES_TXT),
        Path::new("<embedded>/vocab.json"),
        Path::new("<embedded>/merges.txt"),
    )
    .map_err(|e| crate::params::ModelError::Msg(format!("tiny tokenizer: {e}")))
}

/// The tiny model on `device` (random weights: `Models::random_weights` is true).
pub fn load(device: Device, dtype: DType) -> Result<Models> {
    let src = HashedParams {
        device,
        dtype,
        salt: 0,
    };
    Models::from_sources(
        (&unet_config(), &clip_config(), &vae_config()),
        (&src, &src, &src),
        tokenizer()?,
        device,
        dtype,
        true,
    )
}

/// Writes the tiny model as a diffusers-layout model folder (`unet/`, `text_encoder/`, `vae/`
/// with `config.json` + f32 safetensors, `tokenizer/`): the same weights as [`load`], so loading
/// the folder gives the same videos. Used by tests and to try `--model DIR` without real weights.
pub fn write_model_dir(dir: &Path) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| ModelError::Msg(format!("{}: {e}", p.display()));
    let src = HashedParams {
        device: Device::Cpu,
        dtype: DType::F32,
        salt: 0,
    };
    let parts = [
        (
            PartKind::Unet,
            unet_config_json(),
            "diffusion_pytorch_model.safetensors",
        ),
        (
            PartKind::TextEncoder,
            clip_config_json(),
            "model.safetensors",
        ),
        (
            PartKind::Vae,
            vae_config_json(),
            "diffusion_pytorch_model.safetensors",
        ),
    ];
    for (kind, config, file) in parts {
        let d = dir.join(kind.folder());
        std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        let cfg_path = d.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("serialisable");
        std::fs::write(&cfg_path, text).map_err(|e| io(&cfg_path, e))?;
        let tensors: Vec<(String, WDType, Vec<usize>, Vec<u8>)> = kind
            .expected_table(&config)?
            .into_iter()
            .map(|(key, shape)| {
                let bytes = src
                    .values(&key, &shape)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                (key, WDType::F32, shape, bytes)
            })
            .collect();
        vi_weights::write_safetensors(d.join(file), &tensors, None)?;
    }
    write_tokenizer(&dir.join("tokenizer"))
}

/// Writes CLIP's BPE tables (`vocab.json`, `merges.txt`: the tokenizer of VideoCrafter2's
/// OpenCLIP text tower and of zeroscope) into `dir` (created).
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    let io = |e: std::io::Error| ModelError::Msg(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("vocab.json"), VOCAB_JSON).map_err(io)?;
    std::fs::write(dir.join("merges.txt"), MERGES_TXT).map_err(io)?;
    Ok(())
}

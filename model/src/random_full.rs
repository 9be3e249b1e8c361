//! The full-size random model (`--model random-full`): VideoCrafter2's FULL architecture
//! (UNet 1.41 B parameters, OpenCLIP-H text tower 340 M, SD VAE decoder) with deterministic
//! RANDOM weights made in-process. It checks the whole pipeline at full size (memory, time,
//! finiteness) on a GPU without any weight file; its videos are noise-like, nothing was trained.
//!
//! Configs: the `config` dicts of the golden manifests (`tests/golden/manifests/`
//! `videocrafter2_unet_diffusers.json`, `zeroscope_text_encoder_clip_h.json`,
//! `sd_vae_autoencoderkl.json`), copied verbatim into `src/configs/`.
//!
//! Weights: on the CPU, the tiny model's [`HashedParams`] (U(-b, b), b = 1/sqrt(fan_in); norm
//! gains 1 + U(-0.1, 0.1); biases U(-0.05, 0.05)) with salt [`SALT`]. On a CUDA device (feature
//! `cuda`) they are drawn on the device, as the UNet bench does: N(0, 1/fan_in) for tensors of
//! rank >= 2 (seeded by the FNV-1a hash of the key), 1-D `*.weight` = 1, 1-D biases = 0 — host
//! generation of ~1.8 G values would take minutes. Both keep activations at unit scale: every
//! Linear/Conv preserves variance (up to a constant), every block starts with a norm.

use serde_json::Value;
use vi_runtime::{DType, Device};

use crate::clip::ClipTextConfig;
use crate::models::Models;
use crate::params::{ParamSource, Result};
use crate::tiny::HashedParams;
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

const UNET_CONFIG: &str = include_str!("configs/videocrafter2_unet.json");
const CLIP_CONFIG: &str = include_str!("configs/clip_h_text.json");
const VAE_CONFIG: &str = include_str!("configs/sd_vae.json");

/// Mixed into every key's hash on the CPU path (different values from the tiny model's).
pub const SALT: u64 = 0x5eed_f011_5123;

fn parse(name: &str, text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("embedded {name}: {e}"))
}

/// VideoCrafter2's UNet `config.json` (diffusers layout).
pub fn unet_config_json() -> Value {
    parse("configs/videocrafter2_unet.json", UNET_CONFIG)
}

/// The OpenCLIP-H text tower's transformers `config.json` (hidden 1024, 23 layers).
pub fn clip_config_json() -> Value {
    parse("configs/clip_h_text.json", CLIP_CONFIG)
}

/// SD's AutoencoderKL `config.json`.
pub fn vae_config_json() -> Value {
    parse("configs/sd_vae.json", VAE_CONFIG)
}

pub fn unet_config() -> Result<UNetConfig> {
    UNetConfig::from_json(&unet_config_json())
}

pub fn clip_config() -> Result<ClipTextConfig> {
    ClipTextConfig::from_json(&clip_config_json())
}

pub fn vae_config() -> Result<VaeConfig> {
    VaeConfig::from_json(&vae_config_json())
}

/// Random parameters drawn on CUDA device `ordinal` (module doc).
#[cfg(feature = "cuda")]
struct CudaRandom {
    ordinal: usize,
    dtype: DType,
}

#[cfg(feature = "cuda")]
impl ParamSource for CudaRandom {
    fn get(&self, key: &str, shape: &[usize]) -> Result<vi_runtime::Tensor> {
        use vi_runtime::cuda;
        let (ord, dt) = (self.ordinal, self.dtype);
        Ok(if shape.len() == 1 {
            let v = if key.ends_with("bias") { 0.0 } else { 1.0 };
            cuda::full(ord, shape, crate::params::param_dtype(shape, dt), v)?
        } else {
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let seed = fnv1a(key) ^ SALT;
            cuda::random_normal(ord, shape, dt, seed, 1.0 / (fan_in as f32).sqrt())?
        })
    }
    fn contains(&self, _key: &str) -> bool {
        false
    }
}

#[cfg(feature = "cuda")]
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The full-size random model on `device` in `dtype` (`Models::random_weights` is true).
pub fn load(device: Device, dtype: DType) -> Result<Models> {
    let configs = (&unet_config()?, &clip_config()?, &vae_config()?);
    let hashed = HashedParams {
        device,
        dtype,
        salt: SALT,
    };
    #[cfg(feature = "cuda")]
    let cuda_src;
    let src: &dyn ParamSource = match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            cuda_src = CudaRandom { ordinal, dtype };
            &cuda_src
        }
        _ => &hashed,
    };
    Models::from_sources(
        configs,
        (src, src, src),
        crate::tiny::tokenizer()?,
        device,
        dtype,
        true,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::models::PartKind;

    fn manifest(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/manifests")
            .join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
    }

    /// The embedded configs are the manifests' configs, and the parameter tables built from them
    /// (MetaRecorder: nothing allocated) are exactly the manifests' keys and shapes (minus the
    /// VAE encoder, which the runtime does not use).
    #[test]
    fn tables_match_manifests() {
        let parts = [
            (
                PartKind::Unet,
                unet_config_json(),
                "videocrafter2_unet_diffusers.json",
            ),
            (
                PartKind::TextEncoder,
                clip_config_json(),
                "zeroscope_text_encoder_clip_h.json",
            ),
            (
                PartKind::Vae,
                vae_config_json(),
                "sd_vae_autoencoderkl.json",
            ),
        ];
        for (kind, config, file) in parts {
            let m = manifest(file);
            assert_eq!(config, m["config"], "{file}: embedded config differs");
            let want: BTreeMap<String, Vec<usize>> = m["keys"]
                .as_object()
                .expect("keys object")
                .iter()
                .filter(|(k, _)| !kind.is_ignored(k))
                .map(|(k, v)| {
                    let shape = v
                        .as_array()
                        .expect("shape")
                        .iter()
                        .map(|d| d.as_u64().expect("dim") as usize)
                        .collect();
                    (k.clone(), shape)
                })
                .collect();
            let got = kind.expected_table(&config).unwrap();
            assert_eq!(got, want, "{file}: parameter table differs");
        }
        // The configs fit together (what `Models::from_sources` checks).
        let cfgs = (
            unet_config().unwrap(),
            clip_config().unwrap(),
            vae_config().unwrap(),
        );
        assert_eq!(cfgs.0.cross_attention_dim, cfgs.1.hidden_size);
        assert_eq!(cfgs.0.in_channels, cfgs.2.latent_channels);
    }
}

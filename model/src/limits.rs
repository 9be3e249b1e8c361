//! Cheap bounds that refuse impossible requests before anything is built, planned or allocated.
//!
//! * Config values ([`config_field`]): every size field of the UNet, text encoder and VAE configs
//!   has a ceiling, a generous margin over the model family this runtime serves (Stable Diffusion /
//!   VideoCrafter2 UNets, OpenCLIP / CLIP text towers, SD's VAE): channel widths up to 16384
//!   (VideoCrafter2: 1280), at most 8 resolution levels (4), 16 layers per block (2), 128 text
//!   layers (23), vocabularies up to 2^20 tokens (49408), 4096 positions (77). A value past its
//!   ceiling is refused when the config is parsed, naming the field, its value, the ceiling and
//!   the parameter bytes it would need, instead of building (or planning) a model of 10^12 layers.
//! * A request's memory ([`lower_bound`]): arithmetic on sizes only (checked, in u128), no model
//!   built, no per-frame or per-layer work. It counts tensors every run certainly holds at once: a
//!   device's f32 latents of all its ranks, plus the largest clip-parallel window of one rank at
//!   the UNet's full resolution (the temporal attention's k and v over `n + 2 attn_pad` frames; the
//!   temporal conv's input over `n + 2 conv_pad` frames; zero frames pad the video's ends). It is a
//!   lower bound of the memory plan (`memory_plan`), so whatever it refuses, the plan (and the run)
//!   would too. Above [`MAX_PLAUSIBLE_BYTES`] it refuses before the plan; compared with the free
//!   memory it replaces the plan under `--no-memory-check` (the plan's refusal, richer, comes
//!   otherwise). It names the flag that drives it.

use std::fmt;

use vi_runtime::{DType, Device};

use crate::memory_plan::{device_name, fmt_bytes, PlanModels, PlanRequest};
use crate::params::{ModelError, Result};

/// Ceiling of a channel width (UNet levels, VAE levels, text hidden size, cross-attention width).
pub const MAX_CHANNELS: usize = 16384;
/// Ceiling of the number of resolution levels (UNet and VAE `block_out_channels` entries).
pub const MAX_LEVELS: usize = 8;
/// Ceiling of `layers_per_block` (UNet and VAE).
pub const MAX_LAYERS_PER_BLOCK: usize = 16;
/// Ceiling of the latent / image channels (`in_channels`, `out_channels`, `latent_channels`).
pub const MAX_IO_CHANNELS: usize = 64;
/// Ceiling of `attention_head_dim` (UNet) and of GroupNorm groups.
pub const MAX_HEAD_DIM: usize = 1024;
pub const MAX_GROUPS: usize = 1024;
/// Text encoder ceilings.
pub const MAX_TEXT_LAYERS: usize = 128;
pub const MAX_TEXT_HEADS: usize = 256;
pub const MAX_INTERMEDIATE: usize = 65536;
pub const MAX_POSITIONS: usize = 4096;
pub const MAX_VOCAB: usize = 1 << 20;

/// Checks one config size field: positive and at most `max`. `family` is what the reference model
/// uses; `params(v)` the parameters the value implies at least (for the message: the bytes it
/// would need in f32).
pub fn config_field(
    part: &str,
    field: &str,
    v: usize,
    max: usize,
    family: usize,
    params: impl FnOnce(u128) -> u128,
) -> Result<()> {
    if v == 0 {
        return Err(ModelError::Config(format!(
            "{part} `{field}` must be positive, got 0"
        )));
    }
    if v > max {
        let bytes = params(v as u128).saturating_mul(4);
        return Err(ModelError::Config(format!(
            "{part} `{field}` {v} is out of range: at most {max} (the reference model has \
             {family}; the ceiling is a generous margin over the SD / VideoCrafter2 family); it \
             would need at least {} of weights in f32",
            fmt_big_bytes(bytes)
        )));
    }
    Ok(())
}

/// Bytes as `12.3 GiB`, or `1.2e18 bytes` past what fits u64.
pub fn fmt_big_bytes(b: u128) -> String {
    match u64::try_from(b) {
        Ok(b) if b < (1 << 50) => fmt_bytes(b),
        _ => format!("{:.1e} bytes", b as f64),
    }
}

/// A certain minimum of a request's memory on one device.
#[derive(Debug, Clone)]
pub struct Need {
    pub device: Device,
    pub bytes: u128,
    /// The flag(s) driving the largest part, e.g. `--attn-pad 1000000`.
    pub culprit: String,
    /// What the bytes hold.
    pub what: String,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} needs at least {} on {} ({})",
            self.culprit,
            fmt_big_bytes(self.bytes),
            device_name(self.device),
            self.what
        )
    }
}

/// Product of sizes, u128 (no overflow for any product of a few usize values below 2^32; the
/// checked multiplication names `culprit` otherwise).
fn product(parts: &[usize], culprit: &str) -> Result<u128> {
    parts.iter().try_fold(1u128, |acc, &p| {
        acc.checked_mul(p as u128).ok_or_else(|| {
            ModelError::Config(format!("{culprit}: the sizes overflow 128-bit arithmetic"))
        })
    })
}

/// The certain minimum of `req`'s memory per device (see the module doc), with the flag behind
/// its largest part. Pure arithmetic: cost independent of the sizes asked for.
pub fn lower_bound(models: &PlanModels, req: &PlanRequest) -> Result<Vec<Need>> {
    let world = req.ranks.len();
    if world == 0 || req.frames < world || req.local.end > world {
        return Ok(Vec::new());
    }
    // Levels are at most MAX_LEVELS (checked when the config is parsed).
    let scale = 1usize
        << models
            .vae
            .block_out_channels
            .len()
            .clamp(1, MAX_LEVELS)
            .saturating_sub(1);
    let (lh, lw) = (req.height / scale, req.width / scale);
    let size = format!("--frames {} at {}x{}", req.frames, req.width, req.height);
    let lat_c = models.unet.in_channels;
    let c0 = models.unet.block_out_channels[0];
    let inner = 8 * models.unet.attention_head_dim;
    // Frames of each rank (split_frames' sizes: the first `frames % world` ranks get one more).
    let n_of = |r: usize| req.frames / world + usize::from(r < req.frames % world);
    // This process's devices (a multi-process job's other ranks are checked by their own).
    let mut devices: Vec<(Device, DType)> = Vec::new();
    for &(d, dt) in &req.ranks[req.local.clone()] {
        if !devices.iter().any(|(x, _)| *x == d) {
            devices.push((d, dt));
        }
    }
    let mut out = Vec::new();
    for (d, dt) in devices {
        let es = if d == Device::Cpu {
            4
        } else {
            dt.size_in_bytes()
        };
        let mut latents = 0u128;
        // (bytes, culprit, what) of the largest window among the device's ranks.
        let mut window: (u128, String, String) = (0, String::new(), String::new());
        for r in req.local.clone().filter(|&r| req.ranks[r].0 == d) {
            let n = n_of(r);
            latents += product(&[n, lat_c, lh, lw, 4], &size)?;
            let (ap, cp) = (req.vi.attn_pad, req.vi.conv_pad);
            let attn_frames = n.saturating_add(ap.saturating_mul(2));
            let conv_frames = n.saturating_add(cp.saturating_mul(2));
            let pick = |pad: usize, flag: &str| {
                if pad.saturating_mul(2) >= n {
                    format!("{flag} {pad}")
                } else {
                    size.clone()
                }
            };
            let attn_who = pick(ap, "--attn-pad");
            let attn = product(&[4, lh, lw, attn_frames, inner, es], &attn_who)?;
            let conv_who = pick(cp, "--conv-pad");
            let conv = product(&[2, lh, lw, conv_frames, c0, es], &conv_who)?;
            if attn > window.0 {
                window = (
                    attn,
                    attn_who,
                    format!(
                        "the temporal attention's k and v over {attn_frames} frames ({n} + 2 x \
                         --attn-pad {ap}) x {lh}x{lw} latent pixels x {inner} channels, CFG \
                         batch 2"
                    ),
                );
            }
            if conv > window.0 {
                window = (
                    conv,
                    conv_who,
                    format!(
                        "a temporal conv layer's input over {conv_frames} frames ({n} + 2 x \
                         --conv-pad {cp}) x {lh}x{lw} latent pixels x {c0} channels, CFG batch 2"
                    ),
                );
            }
        }
        let bytes = latents.saturating_add(window.0);
        let (culprit, what) = if latents >= window.0 {
            (
                size.clone(),
                format!(
                    "the f32 latents of its {} frames, {lh}x{lw} x {lat_c} channels each, plus \
                     one UNet window",
                    req.local
                        .clone()
                        .filter(|&r| req.ranks[r].0 == d)
                        .map(n_of)
                        .sum::<usize>()
                ),
            )
        } else {
            (window.1, format!("{}, plus the latents", window.2))
        };
        out.push(Need {
            device: d,
            bytes,
            culprit,
            what,
        });
    }
    Ok(out)
}

/// A certain minimum above this is refused whatever memory is said to be free: no machine holds it,
/// and the memory plan's dry run (usize byte counts) is kept far from overflow.
pub const MAX_PLAUSIBLE_BYTES: u128 = 1 << 50;

/// Refuses `req` when its certain minimum exceeds [`MAX_PLAUSIBLE_BYTES`] on a device, or that
/// device's free memory (`free_of`: None where it is not to be compared).
pub fn check_lower_bound(
    models: &PlanModels,
    req: &PlanRequest,
    free_of: &dyn Fn(Device) -> Option<u64>,
) -> Result<()> {
    for need in lower_bound(models, req)? {
        if need.bytes > MAX_PLAUSIBLE_BYTES {
            return Err(ModelError::Msg(format!(
                "{need}: more than {}, which no machine holds (refused before planning or \
                 loading anything)",
                fmt_big_bytes(MAX_PLAUSIBLE_BYTES)
            )));
        }
        let Some(free) = free_of(need.device) else {
            continue;
        };
        if need.bytes > free as u128 {
            return Err(ModelError::Msg(format!(
                "{need}, but only {} is free (refused before planning or loading anything)",
                fmt_bytes(free)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_field_names_field_value_and_bytes() {
        let e = config_field("UNet config:", "layers_per_block", 1 << 40, 16, 2, |v| {
            v * 100
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`layers_per_block` 1099511627776 is out of range: at most 16"),
            "{e}"
        );
        // 2^40 x 100 parameters x 4 bytes.
        assert!(e.contains("would need at least 409600.00 GiB"), "{e}");
        let e = config_field("x", "f", 1 << 60, 16, 2, |v| v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4.6e18 bytes"), "{e}");
        let e = config_field("x", "f", 0, 16, 2, |v| v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be positive"), "{e}");
        config_field("x", "f", 16, 16, 2, |v| v).unwrap();
    }
}

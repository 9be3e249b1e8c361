//! Range checks of the command-line flags, done before anything is planned, opened or loaded.
//! Every error names the flag, its value and the accepted range. Ranges are generous bounds around
//! what the model family uses (VideoCrafter2 / Video-Infinity: 24 frames per rank, 30 steps,
//! 320x512, guidance 12, fps 24, pads 8 / 4, top_k 16, phase at t = 800 with bias 10); the flags'
//! help texts state them.

use anyhow::{ensure, Result};

use crate::cli::{BenchArgs, GenerateArgs, ViArgs};

/// Largest `--frames` (the paper's longest video is 2,300 frames).
pub const MAX_FRAMES: usize = 1_000_000;
/// Largest `--steps` (the schedulers' 1000 training timesteps).
pub const MAX_STEPS: usize = 1000;
/// Largest `--height` / `--width` in pixels.
pub const MAX_SIDE: usize = 16384;
/// Largest `--attn-pad`, `--conv-pad`, `--top-k`, `--vae-chunk` (frames).
pub const MAX_FRAME_COUNT_KNOB: usize = MAX_FRAMES;
/// Largest |`--guidance`|.
pub const MAX_GUIDANCE: f32 = 100.0;
/// Largest `--fps-cond`.
pub const MAX_FPS_COND: f32 = 1000.0;
/// Largest |`--phase-bias`| (a logit bias; beyond a few tens it is already a hard choice).
pub const MAX_PHASE_BIAS: f32 = 1000.0;
/// Largest `--phase-t` (the schedulers' timesteps are 0..=999).
pub const MAX_PHASE_T: u32 = 1000;
/// Largest `--out-fps`.
pub const MAX_OUT_FPS: u32 = 1000;

/// A float flag: finite and in `lo..=hi`.
pub fn float_in(flag: &str, v: f32, lo: f32, hi: f32) -> Result<()> {
    ensure!(v.is_finite(), "{flag} {v} must be a finite number");
    ensure!(
        (lo..=hi).contains(&v),
        "{flag} {v} is out of range: must be in [{lo}, {hi}]"
    );
    Ok(())
}

/// An integer flag: at most `hi` (`what` says why).
pub fn at_most(flag: &str, v: usize, hi: usize, what: &str) -> Result<()> {
    ensure!(v <= hi, "{flag} {v} is too large: at most {hi} ({what})");
    Ok(())
}

/// A pixel size: positive, at most [`MAX_SIDE`] (the multiple-of-64 rule is checked after).
pub fn side(flag: &str, v: usize) -> Result<()> {
    ensure!(v > 0, "{flag} 0: must be positive (a multiple of 64)");
    at_most(flag, v, MAX_SIDE, "pixels")
}

/// The Video-Infinity knobs.
pub fn check_vi(a: &ViArgs) -> Result<()> {
    let frames = "frames; the plan checks the memory it needs";
    at_most("--top-k", a.top_k, MAX_FRAME_COUNT_KNOB, frames)?;
    at_most("--attn-pad", a.attn_pad, MAX_FRAME_COUNT_KNOB, frames)?;
    at_most("--conv-pad", a.conv_pad, MAX_FRAME_COUNT_KNOB, frames)?;
    ensure!(
        a.phase_t <= MAX_PHASE_T,
        "--phase-t {} is out of range: must be in [0, {MAX_PHASE_T}] (a diffusion timestep)",
        a.phase_t
    );
    float_in(
        "--phase-bias",
        a.phase_bias,
        -MAX_PHASE_BIAS,
        MAX_PHASE_BIAS,
    )
}

/// Every numeric flag of `generate` whose range does not depend on the model.
pub fn check_generate(a: &GenerateArgs) -> Result<()> {
    if let Some(f) = a.frames {
        ensure!(f >= 1, "--frames must be at least 1");
        at_most("--frames", f, MAX_FRAMES, "frames")?;
    }
    if let Some(s) = a.steps {
        ensure!(s >= 1, "--steps must be at least 1");
        at_most(
            "--steps",
            s,
            MAX_STEPS,
            "the scheduler's training timesteps",
        )?;
    }
    if let Some(h) = a.height {
        side("--height", h)?;
    }
    if let Some(w) = a.width {
        side("--width", w)?;
    }
    float_in("--guidance", a.guidance, 0.0, MAX_GUIDANCE)?;
    float_in("--fps-cond", a.fps_cond, 0.0, MAX_FPS_COND)?;
    ensure!(
        (1..=MAX_OUT_FPS).contains(&a.out_fps),
        "--out-fps {} is out of range: must be in [1, {MAX_OUT_FPS}]",
        a.out_fps
    );
    ensure!(a.vae_chunk >= 1, "--vae-chunk must be at least 1");
    at_most("--vae-chunk", a.vae_chunk, MAX_FRAME_COUNT_KNOB, "frames")?;
    ensure!(
        a.checkpoint_every >= 1,
        "--checkpoint-every must be at least 1"
    );
    at_most("--checkpoint-every", a.checkpoint_every, MAX_STEPS, "steps")?;
    check_vi(&a.vi)
}

/// Every numeric flag of `bench`.
pub fn check_bench(a: &BenchArgs) -> Result<()> {
    if let Some(f) = a.frames {
        ensure!(f >= 1, "--frames must be at least 1");
        at_most("--frames", f, MAX_FRAMES, "frames")?;
    }
    ensure!(a.steps >= 1, "--steps must be at least 1");
    at_most(
        "--steps + --warmup",
        a.steps.saturating_add(a.warmup),
        MAX_STEPS,
        "the scheduler's training timesteps",
    )?;
    if let Some(h) = a.height {
        side("--height", h)?;
    }
    if let Some(w) = a.width {
        side("--width", w)?;
    }
    check_vi(&a.vi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_flags_refuse_nan_inf_and_out_of_range() {
        for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = float_in("--x", v, 0.0, 1.0).unwrap_err().to_string();
            assert!(e.contains("--x") && e.contains("finite"), "{e}");
        }
        let e = float_in("--x", -0.5, 0.0, 1.0).unwrap_err().to_string();
        assert!(e.contains("--x -0.5 is out of range"), "{e}");
        float_in("--x", 0.0, 0.0, 1.0).unwrap();
        float_in("--x", 1.0, 0.0, 1.0).unwrap();
    }
}

//! The text-to-video pipeline: prompts -> text embeddings -> per-rank latents -> clip-parallel
//! denoising with classifier-free guidance -> per-rank VAE decoding -> RGB8 frames in order.
//!
//! Each rank runs [`crate::rank_loop::run_rank`] with the inputs and hooks of a generation; the
//! models come from [`crate::models`].
//!
//! Randomness (documented so runs are reproducible): every normal draw is
//! `rand_distr::StandardNormal` from a `rand_chacha::ChaCha8Rng` whose 32-byte seed is
//! `seed (u64 LE) ++ draw (u64 LE) ++ 16 zero bytes`, on stream `frame` (the frame's index in the
//! whole video), values in the frame's `[h, w, 4]` row-major order. `draw` 0 is the initial
//! latents, `draw` k+1 the SDE noise of step k. Because each frame has its own stream, the noise
//! of a video does not depend on how many ranks share it (the reference seeds per rank).

use std::cell::RefCell;
use std::ops::Range;
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use vi_runtime::comm::Communicator;
use vi_runtime::{ops, DType, Device, Tensor};

use crate::clip_parallel::ViConfig;
use crate::distributed::{prompt_for_clip, run_ranks_on_devices, split_frames};
use crate::models::Models;
use crate::params::{ModelError, Result};
use crate::rank_loop::{run_rank, RankHooks, RankInputs, RankJob, StepDone};
use crate::sampler::{Sampler, SamplerKind};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt segments `(first_frame, prompt)`, sorted, the first at frame 0. A rank uses the
    /// segment holding its clip's first frame.
    pub prompts: Vec<(usize, String)>,
    pub negative_prompt: String,
    /// Total frames of the video.
    pub frames: usize,
    /// Pixel size (a multiple of [`Models::size_multiple`]).
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale g: eps = uncond + g (cond - uncond).
    pub guidance: f32,
    /// fps conditioning of the UNet.
    pub fps_cond: f32,
    pub seed: u64,
    pub vi: ViConfig,
    /// Number of ranks (clips).
    pub world: usize,
    /// A collective call waiting longer than this for a peer fails (hung-rank bound).
    pub rank_timeout: Duration,
    /// Frames decoded by the VAE at a time (memory bound).
    pub vae_chunk: usize,
    /// Run the VAE (false: denoising only, no frames returned; for benchmarks).
    pub decode: bool,
}

/// Progress of a generation, reported from the rank threads.
#[derive(Debug, Clone)]
pub enum Event {
    /// The text encoder ran on `prompts` distinct prompts (+ the negative one).
    TextEncoded { prompts: usize },
    /// Rank 0 finished denoising step `step` (0-based) of `steps`, at timestep `t`.
    Step { step: usize, steps: usize, t: i64 },
    /// A rank decoded `frames` more frames.
    Decoded { rank: usize, frames: usize },
}

/// One RGB8 frame, `[height, width, 3]` row-major.
pub type Rgb8 = Vec<u8>;

/// The 32-byte ChaCha seed of draw `draw` (module doc).
fn chacha_seed(seed: u64, draw: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&draw.to_le_bytes());
    s
}

/// N(0, 1) values of frames `frames` for draw `draw`: `[F, h, w, c]` row-major (module doc).
pub fn frame_noise(
    seed: u64,
    draw: u64,
    frames: Range<usize>,
    h: usize,
    w: usize,
    c: usize,
) -> Vec<f32> {
    let per = h * w * c;
    let mut out = Vec::with_capacity(frames.len() * per);
    for f in frames {
        let mut rng = ChaCha8Rng::from_seed(chacha_seed(seed, draw));
        rng.set_stream(f as u64);
        out.extend((0..per).map(|_| {
            let v: f32 = StandardNormal.sample(&mut rng);
            v
        }));
    }
    out
}

/// Images [n, H, W, 3] in [0, 1] (the VAE's output through [`crate::vae::to_unit_range`], as the
/// rank loop hands them over) -> RGB8 frames on the host: round(255 x).
pub fn unit_to_rgb8(unit: &Tensor) -> Result<Vec<Rgb8>> {
    let n = unit.dim(0);
    let unit = unit.to_vec_f32()?;
    let per = unit.len() / n.max(1);
    Ok(unit
        .chunks(per)
        .map(|c| c.iter().map(|&v| (v * 255.0).round() as u8).collect())
        .collect())
}

/// Checks a request against the models; returns the latent size (h, w).
pub fn check_request(models: &Models, req: &GenerateRequest) -> Result<(usize, usize)> {
    let m = models.size_multiple();
    for (what, v) in [("height", req.height), ("width", req.width)] {
        if v == 0 || v % 8 != 0 {
            return Err(ModelError::Config(format!(
                "{what} {v} is not a multiple of 8"
            )));
        }
        if v % m != 0 {
            return Err(ModelError::Config(format!(
                "{what} {v} must be a multiple of {m}: the latent ({v}/{}) must stay whole \
                 through the UNet's {} downsamplings",
                models.vae_scale(),
                models.unet.config().num_upsamplers()
            )));
        }
    }
    if req.frames == 0 {
        return Err(ModelError::Config("frames must be at least 1".into()));
    }
    split_frames(req.frames, req.world)?;
    if req.steps == 0 {
        return Err(ModelError::Config("steps must be at least 1".into()));
    }
    if req.prompts.is_empty() {
        return Err(ModelError::Config("no prompt given".into()));
    }
    if !req.guidance.is_finite() || !req.fps_cond.is_finite() {
        return Err(ModelError::Config("guidance and fps must be finite".into()));
    }
    Ok((
        req.height / models.vae_scale(),
        req.width / models.vae_scale(),
    ))
}

/// The inputs of one rank of a generation: its conditioning rows (on rank 0's device) and the
/// seeded per-frame noise of the module doc.
struct SeededInputs<'a> {
    /// [uncond, cond] text embeddings [2, L, hidden].
    conditioning: &'a Tensor,
    seed: u64,
}

impl RankInputs for SeededInputs<'_> {
    fn conditioning(&self, device: Device, dtype: DType) -> Result<Tensor> {
        Ok(self.conditioning.to_device(device)?.to_dtype(dtype)?)
    }
    fn noise(
        &self,
        draw: u64,
        clip: &Range<usize>,
        shape: &[usize],
        device: Device,
    ) -> Result<Tensor> {
        let (h, w, c) = (shape[2], shape[3], shape[4]);
        let v = frame_noise(self.seed, draw, clip.clone(), h, w, c);
        Ok(Tensor::from_vec(v, shape)?.to_device(device)?)
    }
}

/// A rank of a generation: reports its steps (rank 0) and decoded chunks as [`Event`]s and keeps
/// its frames as RGB8 in host memory.
struct CollectFrames<'a> {
    rank: usize,
    progress: &'a (dyn Fn(Event) + Sync),
    frames: RefCell<Vec<Rgb8>>,
}

impl RankHooks for CollectFrames<'_> {
    fn step(&self, done: &StepDone<'_>) -> Result<()> {
        if self.rank == 0 {
            (self.progress)(Event::Step {
                step: done.step,
                steps: done.steps,
                t: done.t,
            });
        }
        Ok(())
    }
    fn frames(&self, _first: usize, images: Tensor) -> Result<()> {
        let rgb = unit_to_rgb8(&images)?;
        (self.progress)(Event::Decoded {
            rank: self.rank,
            frames: rgb.len(),
        });
        self.frames.borrow_mut().extend(rgb);
        Ok(())
    }
}

/// Runs the whole pipeline over `req.world` in-process ranks; `models_of(rank)` gives the models
/// on that rank's device (several ranks may share them). Returns the video's frames in order.
pub fn generate<'m>(
    models_of: &(dyn Fn(usize) -> &'m Models + Sync),
    req: &GenerateRequest,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<Vec<Rgb8>> {
    let world = req.world;
    let m0 = models_of(0);
    let latent = check_request(m0, req)?;
    for r in 1..world {
        check_request(models_of(r), req)?;
    }
    let clips = split_frames(req.frames, world)?;

    // Text: [negative, segment prompts...] in one encoder call on rank 0's device.
    let mut texts: Vec<&str> = vec![req.negative_prompt.as_str()];
    texts.extend(req.prompts.iter().map(|(_, p)| p.as_str()));
    let emb = m0.encode_prompts(&texts)?;
    progress(Event::TextEncoded {
        prompts: req.prompts.len(),
    });
    let seq = emb.dim(1);
    let hidden = emb.dim(2);
    // Per rank: [uncond, cond] rows.
    let mut ehs_per_rank = Vec::with_capacity(world);
    for clip in &clips {
        let i = prompt_for_clip(&req.prompts, clip)?;
        let uncond = ops::narrow(&emb, 0, 0, 1)?;
        let cond = ops::narrow(&emb, 0, i + 1, 1)?;
        ehs_per_rank.push(ops::concat(&[&uncond, &cond], 0)?.reshape(&[2, seq, hidden])?);
    }

    let sampler = Sampler::new(req.sampler, req.steps)?;

    // Each rank's device: halos and global tokens from a rank on another GPU are copied over on
    // arrival (ranks sharing a device exchange without copies).
    let devices: Vec<Device> = (0..world).map(|r| models_of(r).device).collect();
    let per_rank = run_ranks_on_devices(
        &devices,
        req.rank_timeout,
        |rank, comm: &dyn Communicator| {
            let job = RankJob {
                sampler: &sampler,
                steps: req.steps,
                clip: clips[rank].clone(),
                latent,
                guidance: req.guidance,
                fps_cond: req.fps_cond,
                vi: &req.vi,
                vae_chunk: req.vae_chunk,
                decode: req.decode,
            };
            let inputs = SeededInputs {
                conditioning: &ehs_per_rank[rank],
                seed: req.seed,
            };
            let hooks = CollectFrames {
                rank,
                progress,
                frames: RefCell::new(Vec::with_capacity(job.clip.len())),
            };
            run_rank(&models_of(rank).rank_models(), comm, &job, &inputs, &hooks)?;
            // Frames reach the caller in rank (= frame) order through the per-rank results (no
            // collective after the last step: a rank that decodes more frames makes no one wait).
            Ok(hooks.frames.into_inner())
        },
    )?;
    Ok(per_rank.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vae::to_unit_range;

    #[test]
    fn frame_noise_does_not_depend_on_the_split() {
        let whole = frame_noise(5, 0, 0..6, 2, 3, 4);
        let mut parts = frame_noise(5, 0, 0..2, 2, 3, 4);
        parts.extend(frame_noise(5, 0, 2..6, 2, 3, 4));
        assert_eq!(whole, parts);
        assert_ne!(
            whole,
            frame_noise(6, 0, 0..6, 2, 3, 4),
            "seed changes the noise"
        );
        assert_ne!(
            whole,
            frame_noise(5, 1, 0..6, 2, 3, 4),
            "draw changes the noise"
        );
        let n = whole.len() as f64;
        let mean = whole.iter().map(|&v| v as f64).sum::<f64>() / n;
        assert!(mean.abs() < 0.5, "mean {mean}");
    }

    #[test]
    fn frame_noise_is_standard_normal() {
        let v = frame_noise(1, 0, 0..64, 8, 8, 4);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn rgb8_conversion() {
        let x = Tensor::from_vec(vec![-1.0, 0.0, 1.0, 2.0, -3.0, 0.5], &[2, 1, 1, 3]).unwrap();
        let f = unit_to_rgb8(&to_unit_range(&x).unwrap()).unwrap();
        // round(255 * clamp(x/2 + 0.5, 0, 1))
        assert_eq!(f, vec![vec![0, 128, 255], vec![255, 0, 191]]);
    }
}

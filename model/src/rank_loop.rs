//! One rank's part of a generation, written once: the denoising loop over its clip (initial noise,
//! per step a [`ClipParallelContext`], the classifier-free-guidance batch, one UNet pass, guidance,
//! the sampler step with its noise) and then the VAE decode of its frames in chunks.
//!
//! Everything that differs between its callers is injected:
//! * [`RankInputs`]: the text conditioning, the noise and where the loop starts.
//!   `pipeline::generate` draws the seeded per-frame noise, and on a resume hands over the latents
//!   and sampler state of a checkpoint ([`Resume`]); the memory plan passes zeros (shape-only
//!   tensors on `Device::Meta`) and starts at step 0 (a resumed run holds no more than a fresh one:
//!   the loaded latents and state stand in for the initial noise and the state the skipped steps
//!   would have made).
//! * [`RankHooks`]: `phase` wraps each phase (the memory plan measures each phase's peak there),
//!   `step` sees the latents and sampler state after every step (progress, and the checkpoints
//!   of [`crate::checkpoint`]), `frames` receives each decoded chunk (collected in memory today; the place for a
//!   streaming writer).
//!
//! Order of operations (the memory plan's byte counts depend on it, and they are tested against
//! real runs): conditioning, initial latents (x `init_noise_sigma` if not 1), then per step: CFG
//! input `[x, x]` in the model dtype, UNet, eps back to f32, guidance, the step's noise, sampler
//! step, `step` hook. The sampler state is dropped before the latents are cast to the model dtype
//! for the VAE; the conditioning and the f32 latents when the denoising phase ends. The sampler's
//! state (latents, noise, guided eps) is f32 on the device; only the UNet and the VAE see the
//! model's storage dtype.

use std::ops::Range;
use std::sync::Arc;

use vi_runtime::comm::Communicator;
use vi_runtime::offload::{self, Tier};
use vi_runtime::{ops, DType, Device, Tensor};

use crate::clip_parallel::{ClipParallelContext, ViConfig};
use crate::params::{ModelError, Result};
use crate::sampler::{Sampler, SamplerState};
use crate::schedule::{DeviceTurn, ParkComm, Schedule, TurnComm};
use crate::unet::UNet3D;
use crate::vae::{to_unit_range, VaeDecoder};

/// What one rank runs with: its models (real or shape-only weights) and where.
#[derive(Clone, Copy)]
pub struct RankModels<'a> {
    pub unet: &'a UNet3D,
    pub vae: &'a VaeDecoder,
    /// The rank's device (`Device::Meta` for the memory plan's dry run).
    pub device: Device,
    /// The models' storage dtype: what the UNet and the VAE are fed.
    pub dtype: DType,
}

/// What one rank does (the same on every rank but `clip`).
#[derive(Debug, Clone)]
pub struct RankJob<'a> {
    pub sampler: &'a Sampler,
    /// Sampler steps to run: the first `steps` of the sampler's timesteps (a generation runs all;
    /// the memory plan a few).
    pub steps: usize,
    /// This rank's frames of the whole video.
    pub clip: Range<usize>,
    /// Latent size (h, w).
    pub latent: (usize, usize),
    /// Classifier-free guidance scale g: eps = uncond + g (cond - uncond).
    pub guidance: f32,
    /// fps conditioning of the UNet.
    pub fps_cond: f32,
    pub vi: &'a ViConfig,
    /// Frames the VAE decodes at a time (at least 1).
    pub vae_chunk: usize,
    /// Run the VAE (false: denoising only).
    pub decode: bool,
    /// The bounded-memory schedule (the memory plan's choice; same result for every schedule).
    pub schedule: Schedule,
    /// The turn of this rank's device, shared by the ranks on it, under
    /// [`Schedule::rank_turns`] (None: the rank computes whenever it can).
    pub turn: Option<&'a DeviceTurn>,
    /// The lower memory tier under [`Schedule::offload`] (required then): the tensors the rank
    /// creates are parked there at each call to the group ([`ParkComm`]).
    pub offload_tier: Option<Arc<Tier>>,
}

/// Where a rank's inputs come from.
pub trait RankInputs {
    /// The rank's text conditioning, rows [uncond, cond]: [2, L, hidden] on `device` in `dtype`.
    fn conditioning(&self, device: Device, dtype: DType) -> Result<Tensor>;
    /// Noise draw `draw` (0: the initial latents; k + 1: the sampler noise of step k) of the
    /// frames `clip`: N(0, 1) values, f32, `shape` = [1, n, h, w, c], on `device`.
    fn noise(
        &self,
        draw: u64,
        clip: &Range<usize>,
        shape: &[usize],
        device: Device,
    ) -> Result<Tensor>;
    /// Where the loop starts on `device`: None (the default) at step 0 from the initial noise
    /// (draw 0); Some after `completed` steps from a checkpoint's latents and sampler state (draw
    /// 0 is then not drawn; the SDE noise of step k is draw k + 1 either way).
    fn resume(&self, _device: Device) -> Result<Option<Resume>> {
        Ok(None)
    }
}

/// A rank's loop state after `completed` steps, as a checkpoint restores it.
pub struct Resume {
    /// Steps done (0..=steps): the loop continues at step index `completed`.
    pub completed: usize,
    /// The clip's latents after those steps, [1, n, h, w, c] f32 on the rank's device.
    pub latents: Tensor,
    pub state: SamplerState,
}

/// The two phases of a rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Conditioning, initial latents and every sampler step; ends with the latents for the VAE.
    Denoise,
    /// The VAE decode in chunks (only when the job decodes).
    Decode,
}

/// A finished sampler step, as the `step` hook sees it.
pub struct StepDone<'a> {
    /// 0-based index of the step.
    pub step: usize,
    /// Steps the rank runs in all.
    pub steps: usize,
    /// The step's timestep.
    pub t: i64,
    /// The clip's latents after the step, [1, n, h, w, c] f32.
    pub latents: &'a Tensor,
    /// The sampler's state after the step.
    pub state: &'a SamplerState,
}

/// What a rank reports, and where its frames go. Every method has a default (run the phase, ignore
/// the step, drop the frames). Hooks run on the rank's own thread, between its collective calls:
/// a hook that blocks holds up every other rank at the next exchange.
pub trait RankHooks {
    /// Runs one phase: must call `body` exactly once and return its result.
    fn phase(&self, _phase: Phase, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        body()
    }
    /// After every sampler step.
    fn step(&self, _done: &StepDone<'_>) -> Result<()> {
        Ok(())
    }
    /// One decoded chunk: the index within the clip of its first frame, and its images
    /// [c, H, W, 3] in [0, 1] on the rank's device ([`to_unit_range`] of the VAE's output).
    fn frames(&self, _first: usize, _images: Tensor) -> Result<()> {
        Ok(())
    }
}

/// Runs one rank: `job.steps` sampler steps on its clip with the clip-parallel exchanges over
/// `comm` (a collective: every rank of the group runs it), then, if `job.decode`, the VAE decode.
/// Under [`Schedule::offload`] both phases run in an offload scope on `job.offload_tier`: the
/// tensors of at least [`offload::MIN_BYTES`] created here are parked at every call to the group.
pub fn run_rank(
    m: &RankModels,
    comm: &dyn Communicator,
    job: &RankJob,
    inputs: &dyn RankInputs,
    hooks: &dyn RankHooks,
) -> Result<()> {
    if !job.schedule.offload {
        return run_rank_body(m, comm, job, inputs, hooks);
    }
    let tier = job.offload_tier.clone().ok_or_else(|| {
        ModelError::Msg("rank loop: the schedule offloads, but no offload tier was given".into())
    })?;
    offload::scope(tier, offload::MIN_BYTES, || {
        run_rank_body(m, comm, job, inputs, hooks)
    })
}

fn run_rank_body(
    m: &RankModels,
    comm: &dyn Communicator,
    job: &RankJob,
    inputs: &dyn RankInputs,
    hooks: &dyn RankHooks,
) -> Result<()> {
    // Under rank turns the rank holds its device's turn from here to its end, except inside
    // collective calls.
    let turn_comm = match job.turn {
        Some(turn) => Some(TurnComm::start(comm, turn)?),
        None => None,
    };
    let comm: &dyn Communicator = match &turn_comm {
        Some(t) => t,
        None => comm,
    };
    // Parks before the turn (if any) is handed on.
    let park_comm = job.schedule.offload.then(|| ParkComm::new(comm));
    let comm: &dyn Communicator = match &park_comm {
        Some(p) => p,
        None => comm,
    };
    let mut latents = None;
    hooks.phase(Phase::Denoise, &mut || {
        latents = Some(denoise(m, comm, job, inputs, hooks)?);
        Ok(())
    })?;
    let latents = latents
        .ok_or_else(|| ModelError::Msg("rank loop: the denoising phase did not run".into()))?;
    if job.decode {
        hooks.phase(Phase::Decode, &mut || {
            m.vae.decode_frames_with(
                &latents,
                job.schedule.vae_chunk(job.vae_chunk),
                |first, images| hooks.frames(first, to_unit_range(&images)?),
            )
        })?;
    }
    Ok(())
}

/// The denoising phase: returns the clip's latents [n, h, w, c] in the model dtype.
fn denoise(
    m: &RankModels,
    comm: &dyn Communicator,
    job: &RankJob,
    inputs: &dyn RankInputs,
    hooks: &dyn RankHooks,
) -> Result<Tensor> {
    let (dev, dt) = (m.device, m.dtype);
    let (lh, lw) = job.latent;
    let lat_c = m.unet.config().in_channels;
    let n = job.clip.len();
    let shape = [1, n, lh, lw, lat_c];
    let sampler = job.sampler;
    let timesteps = sampler.timesteps();
    let steps = job.steps.min(timesteps.len());

    let ehs = inputs.conditioning(dev, dt)?;
    let (mut x, mut state, start) = match inputs.resume(dev)? {
        Some(r) => {
            if r.latents.shape() != shape || r.completed > steps {
                return Err(ModelError::Msg(format!(
                    "rank loop: resumed latents {:?} after {} steps do not fit the clip {:?} of \
                     {steps} steps",
                    r.latents.shape(),
                    r.completed,
                    shape
                )));
            }
            (r.latents, r.state, r.completed)
        }
        None => {
            let mut x = inputs.noise(0, &job.clip, &shape, dev)?;
            let sigma = sampler.init_noise_sigma();
            if sigma != 1.0 {
                x = ops::scale(&x, sigma)?;
            }
            (x, SamplerState::default(), 0)
        }
    };
    for (k, &t) in timesteps.iter().enumerate().take(steps).skip(start) {
        let ctx = ClipParallelContext::new(comm, job.vi, t);
        let chunk = job.schedule.frame_chunk;
        let (uncond, cond) = if job.schedule.sequential_cfg {
            // Two passes of batch 1 (uncond, then cond): every rank runs them in this order, so
            // the exchanges pair up; per-row arithmetic equals the batch-2 pass.
            let input = x.to_dtype(dt)?;
            let pass = |row: usize| -> Result<Tensor> {
                let ehs_row = ops::narrow(&ehs, 0, row, 1)?;
                Ok(m.unet
                    .forward_chunked(&input, t as f32, job.fps_cond, &ehs_row, &ctx, chunk)?
                    .to_dtype(DType::F32)?)
            };
            let uncond = pass(0)?;
            (uncond, pass(1)?)
        } else {
            let input = ops::concat(&[&x, &x], 0)?.to_dtype(dt)?;
            let eps = m
                .unet
                .forward_chunked(&input, t as f32, job.fps_cond, &ehs, &ctx, chunk)?
                .to_dtype(DType::F32)?;
            (ops::narrow(&eps, 0, 0, 1)?, ops::narrow(&eps, 0, 1, 1)?)
        };
        let guided = ops::add(
            &uncond,
            &ops::scale(&ops::sub(&cond, &uncond)?, job.guidance)?,
        )?;
        let noise = if sampler.needs_noise() {
            Some(inputs.noise(k as u64 + 1, &job.clip, &shape, dev)?)
        } else {
            None
        };
        x = sampler.step(&mut state, k, &guided, &x, noise.as_ref())?;
        hooks.step(&StepDone {
            step: k,
            steps,
            t,
            latents: &x,
            state: &state,
        })?;
    }
    drop(state);
    Ok(x.reshape(&[n, lh, lw, lat_c])?.to_dtype(dt)?)
}

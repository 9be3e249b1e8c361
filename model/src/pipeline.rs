//! The text-to-video pipeline: prompts -> text embeddings -> per-rank latents -> clip-parallel
//! denoising with classifier-free guidance -> per-rank VAE decoding -> RGB8 frames in order.
//!
//! [`generate_rank`] is one rank of a generation (the same for ranks that are threads of one
//! process and for ranks that are processes): it runs [`crate::rank_loop::run_rank`] with the
//! inputs and hooks of a generation, and its decoded frames flow to rank 0's [`FrameSink`] in
//! frame order ([`crate::frame_flow`]). [`generate_to`] runs W ranks as threads of one process;
//! the models come from [`crate::models`]. With [`Checkpointing`] every rank saves its latents and
//! sampler state after the due steps, and a resumed rank starts from them ([`crate::checkpoint`]).
//!
//! Randomness (documented so runs are reproducible): every normal draw is
//! `rand_distr::StandardNormal` from a `rand_chacha::ChaCha8Rng` whose 32-byte seed is
//! `seed (u64 LE) ++ draw (u64 LE) ++ 16 zero bytes`, on stream `frame` (the frame's index in the
//! whole video), values in the frame's `[h, w, 4]` row-major order. `draw` 0 is the initial
//! latents, `draw` k+1 the SDE noise of step k. Because each frame has its own stream, the noise
//! of a video does not depend on how many ranks share it (the reference seeds per rank).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use vi_runtime::comm::{CommChoice, Communicator};
use vi_runtime::offload::Tier;
use vi_runtime::{ops, DType, Device, Tensor};

use crate::checkpoint::{Checkpointing, RankFile};
use crate::clip_parallel::ViConfig;
use crate::distributed::{prompt_for_clip, run_ranks_on_devices_with, split_frames};
pub use crate::frame_flow::FrameSink;
use crate::frame_flow::{FrameSender, FrameWriter, FRAMES_IN_FLIGHT};
use crate::models::Models;
use crate::params::{ModelError, Result};
use crate::rank_loop::{run_rank, RankHooks, RankInputs, RankJob, Resume, StepDone};
use crate::sampler::{Sampler, SamplerKind};
use crate::schedule::{DeviceTurn, Schedule, TurnComm};

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
    /// The data plane between ranks (`--comm`): NCCL between GPUs, or the host path.
    pub comm: CommChoice,
    /// Frames decoded by the VAE at a time (memory bound).
    pub vae_chunk: usize,
    /// Run the VAE (false: denoising only, no frames returned; for benchmarks).
    pub decode: bool,
    /// Bounded-memory schedule (`memory_plan::choose_schedule`); the video is the same for all.
    pub schedule: Schedule,
    /// Where a CPU rank's spill file goes under [`Schedule::offload`] (`--offload-dir`; None: the
    /// system temp dir). Not part of the request's identity (the video does not depend on it).
    pub offload_dir: Option<std::path::PathBuf>,
}

/// Progress of a generation, reported from the rank threads. A process sees the events of its
/// own ranks: in-process, every rank's; with one process per rank, rank 0's process sees its own
/// steps and every frame written.
#[derive(Debug, Clone)]
pub enum Event {
    /// Rank 0 ran the text encoder on `prompts` distinct prompts (+ the negative one).
    TextEncoded { prompts: usize },
    /// Rank `rank` finished denoising step `step` (0-based) of `steps`, at timestep `t`.
    Step {
        rank: usize,
        step: usize,
        steps: usize,
        t: i64,
    },
    /// A rank decoded `frames` more frames.
    Decoded { rank: usize, frames: usize },
    /// Rank 0 has passed the video's first `frames` frames to its sink.
    Written { frames: usize },
    /// Rank 0 has put a checkpoint in place (every rank's file and the manifest).
    Checkpointed(crate::checkpoint::Saved),
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

/// The inputs of one rank of a generation: its conditioning rows and the seeded per-frame noise
/// of the module doc.
struct SeededInputs<'a> {
    /// [uncond, cond] text embeddings [2, L, hidden].
    conditioning: Tensor,
    seed: u64,
    /// The rank's checkpoint when resuming.
    resume: Option<&'a RankFile>,
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
    fn resume(&self, device: Device) -> Result<Option<Resume>> {
        self.resume.map(|f| f.to_resume(device)).transpose()
    }
}

/// Where a rank's decoded frames go (module [`crate::frame_flow`]).
enum FrameFlow<'a> {
    /// Rank 0: written in order.
    Writer(FrameWriter<'a>),
    /// Other ranks: sent to rank 0 as it grants credit.
    Sender(FrameSender<'a>),
}

/// A rank of a generation: reports its steps and decoded chunks as [`Event`]s and passes its
/// frames, as RGB8 on the host, to the frame flow.
struct RankReport<'a> {
    rank: usize,
    progress: &'a (dyn Fn(Event) + Sync),
    flow: RefCell<FrameFlow<'a>>,
    /// Checkpoints after the due steps: the settings, the group, the rank's clip and sampler.
    ckpt: Option<(
        &'a Checkpointing<'a>,
        &'a dyn Communicator,
        Range<usize>,
        SamplerKind,
    )>,
}

impl RankHooks for RankReport<'_> {
    fn step(&self, done: &StepDone<'_>) -> Result<()> {
        if let Some((c, comm, clip, kind)) = &self.ckpt {
            if c.due(done.step, done.steps) {
                let saved = c.save(
                    *comm,
                    clip,
                    done.step,
                    done.steps,
                    *kind,
                    done.latents,
                    done.state,
                )?;
                if let Some(s) = saved {
                    (self.progress)(Event::Checkpointed(s));
                }
            }
        }
        (self.progress)(Event::Step {
            rank: self.rank,
            step: done.step,
            steps: done.steps,
            t: done.t,
        });
        Ok(())
    }
    fn frames(&self, _first: usize, images: Tensor) -> Result<()> {
        let rgb = unit_to_rgb8(&images)?;
        drop(images);
        (self.progress)(Event::Decoded {
            rank: self.rank,
            frames: rgb.len(),
        });
        match &mut *self.flow.borrow_mut() {
            FrameFlow::Writer(w) => w.write_own(rgb),
            FrameFlow::Sender(s) => s.push(rgb),
        }
    }
}

/// One rank of a generation; every rank of the group (`comm`, `req.world` ranks, threads of one
/// process or processes) calls it with the same `req`. `models` are the models on this rank's
/// device. Rank 0 encodes the text ([negative, every segment prompt] in one batch, as one
/// process does) and sends the embeddings to every other rank, so every rank conditions on the
/// same bytes wherever it runs. Then every rank denoises and decodes its clip; the frames flow to
/// rank 0, which passes them to `sink` in frame order (module [`crate::frame_flow`]); only rank 0
/// may have a sink (rank 0 without one drops the frames). `progress` sees this rank's events
/// (rank 0 also: text encoded, frames written).
pub fn generate_rank<'a>(
    models: &Models,
    comm: &'a dyn Communicator,
    req: &GenerateRequest,
    sink: Option<&'a mut dyn FrameSink>,
    progress: &'a (dyn Fn(Event) + Sync),
) -> Result<()> {
    generate_rank_with_turn(models, comm, req, sink, progress, None, None)
}

/// [`generate_rank`] for a rank whose device is shared with other ranks of this process under
/// [`Schedule::rank_turns`]: the rank holds `turn` whenever it computes and hands it on for the
/// duration of every call to the group, the frame flow's included ([`TurnComm`]). None: as
/// [`generate_rank`]. `ckpt`: checkpoints after the due steps, and the checkpoint to resume from
/// ([`crate::checkpoint`]; every rank of the group passes the same settings).
pub fn generate_rank_with_turn<'a>(
    models: &Models,
    comm: &'a dyn Communicator,
    req: &GenerateRequest,
    sink: Option<&'a mut dyn FrameSink>,
    progress: &'a (dyn Fn(Event) + Sync),
    turn: Option<&'a DeviceTurn>,
    ckpt: Option<&'a Checkpointing<'a>>,
) -> Result<()> {
    let turn_comm = match turn {
        Some(t) => Some(TurnComm::start(comm, t)?),
        None => None,
    };
    let comm: &dyn Communicator = match &turn_comm {
        Some(t) => t,
        None => comm,
    };
    rank_body(models, comm, req, sink, progress, ckpt)
}

/// The body of [`generate_rank`] over `comm` (the group's, or its [`TurnComm`]).
fn rank_body<'a: 'b, 'b>(
    models: &Models,
    comm: &'b dyn Communicator,
    req: &GenerateRequest,
    sink: Option<&'b mut (dyn FrameSink + 'a)>,
    progress: &'b (dyn Fn(Event) + Sync),
    ckpt: Option<&'b Checkpointing<'b>>,
) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world != req.world {
        return Err(ModelError::Config(format!(
            "rank {rank}: the request has {} ranks, the communicator {world}",
            req.world
        )));
    }
    if rank != 0 && sink.is_some() {
        return Err(ModelError::Config(format!(
            "rank {rank}: only rank 0 writes frames (a sink was given)"
        )));
    }
    let latent = check_request(models, req)?;
    let clips = split_frames(req.frames, world)?;
    let clip = clips[rank].clone();

    // Text: [negative, segment prompts...] in one encoder call on rank 0's device, sent to
    // every other rank (point-to-point: apart from the collective sequence).
    let emb = if rank == 0 {
        let mut texts: Vec<&str> = vec![req.negative_prompt.as_str()];
        texts.extend(req.prompts.iter().map(|(_, p)| p.as_str()));
        let emb = models.encode_prompts(&texts)?;
        progress(Event::TextEncoded {
            prompts: req.prompts.len(),
        });
        for r in 1..world {
            comm.send_to(r, &emb)?;
        }
        emb
    } else {
        let emb = comm.recv_from(0)?;
        if emb.dims().len() != 3 || emb.dim(0) != req.prompts.len() + 1 {
            return Err(ModelError::Msg(format!(
                "rank {rank}: text embeddings from rank 0 have shape {:?}, expected [{}, L, hidden]",
                emb.shape(),
                req.prompts.len() + 1
            )));
        }
        emb
    };
    let (seq, hidden) = (emb.dim(1), emb.dim(2));
    let i = prompt_for_clip(&req.prompts, &clip)?;
    let uncond = ops::narrow(&emb, 0, 0, 1)?;
    let cond = ops::narrow(&emb, 0, i + 1, 1)?;
    let conditioning = ops::concat(&[&uncond, &cond], 0)?.reshape(&[2, seq, hidden])?;
    drop((emb, uncond, cond));

    let sampler = Sampler::new(req.sampler, req.steps)?;
    let job = RankJob {
        sampler: &sampler,
        steps: req.steps,
        clip: clip.clone(),
        latent,
        guidance: req.guidance,
        fps_cond: req.fps_cond,
        vi: &req.vi,
        vae_chunk: req.vae_chunk,
        decode: req.decode,
        schedule: req.schedule,
        // Turns, if any, are in `comm` already (generate_rank_with_turn).
        turn: None,
        offload_tier: if req.schedule.offload {
            Some(Tier::shared(models.device, req.offload_dir.as_deref())?)
        } else {
            None
        },
    };
    let resume = match ckpt {
        Some(c) if !c.resume.is_empty() => Some(c.resume.get(&rank).ok_or_else(|| {
            ModelError::Msg(format!(
                "rank {rank}: resuming, but no checkpoint file was loaded for it"
            ))
        })?),
        _ => None,
    };
    let inputs = SeededInputs {
        conditioning,
        seed: req.seed,
        resume,
    };
    let flow = if rank == 0 {
        FrameFlow::Writer(FrameWriter::new(
            comm,
            sink.map(|s| s as &'b mut (dyn FrameSink + 'b)),
            progress,
            req.vae_chunk,
            (req.height, req.width),
            req.rank_timeout,
        ))
    } else {
        FrameFlow::Sender(FrameSender::new(comm, req.vae_chunk, req.height, req.width))
    };
    let hooks = RankReport {
        rank,
        progress,
        flow: RefCell::new(flow),
        ckpt: ckpt.map(|c| (c, comm, clip.clone(), req.sampler)),
    };
    run_rank(&models.rank_models(), comm, &job, &inputs, &hooks)?;
    drop(inputs);
    if !req.decode {
        return Ok(());
    }
    // No collective after the last step: a rank that decodes more frames makes no one wait but
    // rank 0, which writes in frame order.
    match hooks.flow.into_inner() {
        FrameFlow::Writer(mut w) => {
            for (r, c) in clips.iter().enumerate().skip(1) {
                w.serve(r, c.len())?;
            }
            Ok(())
        }
        FrameFlow::Sender(mut s) => s.finish(),
    }
}

/// Runs the whole pipeline over `req.world` in-process ranks (threads, each running
/// [`generate_rank`]); `models_of(rank)` gives the models on that rank's device (several ranks
/// may share them). The frames reach `sink` on the calling thread, in order, through a bounded
/// channel from rank 0's thread (so the sink need not be `Send`); a sink error stops every rank.
pub fn generate_to<'m>(
    models_of: &(dyn Fn(usize) -> &'m Models + Sync),
    req: &GenerateRequest,
    sink: Option<&mut dyn FrameSink>,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<()> {
    generate_to_checkpointed(models_of, req, None, sink, progress)
}

/// [`generate_to`] with checkpoints (and a resume) as `ckpt` says ([`crate::checkpoint`]).
pub fn generate_to_checkpointed<'m>(
    models_of: &(dyn Fn(usize) -> &'m Models + Sync),
    req: &GenerateRequest,
    ckpt: Option<&Checkpointing<'_>>,
    sink: Option<&mut dyn FrameSink>,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<()> {
    for r in 0..req.world {
        check_request(models_of(r), req)?;
    }
    // Each rank's device: halos and global tokens from a rank on another GPU are copied over on
    // arrival (ranks sharing a device exchange without copies).
    let devices: Vec<Device> = (0..req.world).map(|r| models_of(r).device).collect();
    // Under rank turns: one turn per distinct device, shared by the ranks on it.
    let mut turns: Vec<(Device, DeviceTurn)> = Vec::new();
    if req.schedule.rank_turns {
        for &d in &devices {
            if !turns.iter().any(|(x, _)| *x == d) {
                turns.push((d, DeviceTurn::new(req.rank_timeout)));
            }
        }
    }
    let (tx, rx) = sync_channel::<(usize, Rgb8)>(FRAMES_IN_FLIGHT);
    let tx = Mutex::new(Some(tx));
    std::thread::scope(|s| {
        let ranks = s.spawn(|| {
            run_ranks_on_devices_with(
                &devices,
                req.rank_timeout,
                req.comm,
                |rank, comm: &dyn Communicator| {
                    let mut fwd = if rank == 0 {
                        let tx = tx.lock().unwrap_or_else(|e| e.into_inner()).take();
                        tx.map(|tx| ChannelSink { tx })
                    } else {
                        None
                    };
                    let turn = turns
                        .iter()
                        .find(|(d, _)| *d == devices[rank])
                        .map(|(_, t)| t);
                    generate_rank_with_turn(
                        models_of(rank),
                        comm,
                        req,
                        fwd.as_mut().map(|f| f as &mut dyn FrameSink),
                        progress,
                        turn,
                        ckpt,
                    )
                },
            )
        });
        let mut sink = sink;
        let mut sink_err = None;
        for (index, rgb) in rx.iter() {
            if let Some(s) = sink.as_mut() {
                if let Err(e) = s.frame(index, rgb) {
                    sink_err = Some(e);
                    break;
                }
            }
        }
        // Closing the channel makes rank 0's next frame fail, which aborts every rank.
        drop(rx);
        let ranks = ranks.join().unwrap_or_else(|_| {
            Err(ModelError::Msg(
                "the in-process ranks' driver thread panicked".into(),
            ))
        });
        match sink_err {
            Some(e) => Err(e),
            None => ranks.map(|_| ()),
        }
    })
}

/// Rank 0's sink in [`generate_to`]: forwards frames to the calling thread.
struct ChannelSink {
    tx: SyncSender<(usize, Rgb8)>,
}

impl FrameSink for ChannelSink {
    fn frame(&mut self, index: usize, rgb: Rgb8) -> Result<()> {
        self.tx
            .send((index, rgb))
            .map_err(|_| ModelError::Msg("rank 0: the frame writer stopped".into()))
    }
}

/// Collects every frame (tests and small runs; a video writer streams through [`generate_to`]).
#[derive(Default)]
pub struct CollectFrames(pub Vec<Rgb8>);

impl FrameSink for CollectFrames {
    fn frame(&mut self, index: usize, rgb: Rgb8) -> Result<()> {
        if index != self.0.len() {
            return Err(ModelError::Msg(format!(
                "frame {index} arrived after {} frames",
                self.0.len()
            )));
        }
        self.0.push(rgb);
        Ok(())
    }
}

/// [`generate_to`] collecting the video's frames in order (for tests and benchmarks: it holds
/// every frame; a writer streams through [`generate_to`]).
pub fn generate<'m>(
    models_of: &(dyn Fn(usize) -> &'m Models + Sync),
    req: &GenerateRequest,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<Vec<Rgb8>> {
    let mut all = CollectFrames::default();
    generate_to(models_of, req, Some(&mut all), progress)?;
    Ok(all.0)
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

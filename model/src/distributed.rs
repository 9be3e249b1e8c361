//! Running W ranks of Video-Infinity as threads of one process (in-process communicator), and the
//! rules of the split: which frames and which prompt each rank gets.
//!
//! * [`split_frames`]: T frames over W ranks in contiguous clips, rank order = frame order; when
//!   T % W != 0 the FIRST T % W ranks get one extra frame (clip lengths differ by at most one).
//! * [`prompt_for_clip`]: prompts keyed by frame range, `(first_frame, prompt)` segments; a rank
//!   uses the prompt of the segment that contains its clip's FIRST frame.
//!   [`reference_prompt_index`] is Video-Infinity's rule (rank r uses prompts[floor(r/W * n)]);
//!   [`reference_prompt_segments`] expresses it as segments.
//! * [`run_ranks`]: one scoped thread per rank, each with its communicator; an error or a panic on
//!   any rank aborts the group, so every other rank's pending and future collective calls fail
//!   within the group's timeout; the error names the rank that failed first.
//! * [`run_denoising`]: a denoising driver generic over the step (any model call + update), with
//!   the final latents gathered to rank 0 in rank (= frame) order; the exchange's tests drive toy
//!   steps with it. A generation's ranks run `crate::rank_loop::run_rank`.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::Duration;

use vi_runtime::comm::{nccl_in_process, CommChoice, Communicator, InProcessComm, InProcessGroup};
use vi_runtime::{ops, Device, Tensor};

use crate::clip_parallel::{ClipParallelContext, ViConfig};
use crate::params::{ModelError, Result};
use crate::temporal::TemporalContext;

/// Contiguous clips of `total` frames over `world` ranks, in rank order. The first
/// `total % world` ranks get `total / world + 1` frames, the others `total / world`.
/// Errors when a rank would get no frame (total < world) or world is 0.
pub fn split_frames(total: usize, world: usize) -> Result<Vec<Range<usize>>> {
    if world == 0 {
        return Err(ModelError::Config("world size must be at least 1".into()));
    }
    if total < world {
        return Err(ModelError::Config(format!(
            "{total} frames cannot be split over {world} ranks: every rank needs at least one frame"
        )));
    }
    let (base, extra) = (total / world, total % world);
    let mut start = 0;
    Ok((0..world)
        .map(|r| {
            let len = base + usize::from(r < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect())
}

/// Video-Infinity's prompt rule: rank r of W uses prompts[int(r / W * n)] (the float expression of
/// the reference, evaluated in f64 as Python does).
pub fn reference_prompt_index(rank: usize, world: usize, n_prompts: usize) -> usize {
    ((rank as f64 / world as f64) * n_prompts as f64) as usize
}

/// Index of the segment of `segments` (sorted by first frame, the first starting at frame 0) that
/// contains `clip.start`: the prompt a rank with this clip uses.
pub fn prompt_for_clip<P>(segments: &[(usize, P)], clip: &Range<usize>) -> Result<usize> {
    if segments.is_empty() {
        return Err(ModelError::Config("no prompt given".into()));
    }
    if segments[0].0 != 0 {
        return Err(ModelError::Config(format!(
            "the first prompt segment must start at frame 0, not {}",
            segments[0].0
        )));
    }
    if let Some(w) = segments.windows(2).find(|w| w[1].0 <= w[0].0) {
        return Err(ModelError::Config(format!(
            "prompt segments must start at increasing frames ({} then {})",
            w[0].0, w[1].0
        )));
    }
    Ok(segments
        .iter()
        .rposition(|(first, _)| *first <= clip.start)
        .unwrap_or(0))
}

/// The reference rule as frame-range segments: for each prompt used by some rank, a segment that
/// starts at the first frame of the first rank using it. With these segments,
/// [`prompt_for_clip`] gives every rank `prompts[reference_prompt_index(r, W, n)]`.
pub fn reference_prompt_segments<P: Clone>(
    prompts: &[P],
    clips: &[Range<usize>],
) -> Vec<(usize, P)> {
    let world = clips.len();
    let mut out: Vec<(usize, P)> = Vec::new();
    let mut last = None;
    for (r, clip) in clips.iter().enumerate() {
        let i = reference_prompt_index(r, world, prompts.len());
        if last != Some(i) {
            out.push((clip.start, prompts[i].clone()));
            last = Some(i);
        }
    }
    out
}

/// What a rank's thread gets to know about its place in the run.
#[derive(Debug, Clone)]
pub struct RankInfo {
    pub rank: usize,
    pub world: usize,
    /// This rank's frames of the whole video.
    pub frames: Range<usize>,
}

/// The outcome of every rank of a [`run_ranks_detailed`] call.
pub struct RankResults<T> {
    /// Per rank (index = rank): its value or its error (a panic becomes an error).
    pub per_rank: Vec<Result<T>>,
    /// The first failure recorded by the group (names the rank), if any.
    pub first_failure: Option<String>,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Run `f(rank, comm)` for every rank on its own thread. A rank whose `f` returns an error or
/// panics aborts the group (its peers' collective calls then fail at once; a rank that hangs makes
/// them fail after `timeout`). Every rank's outcome is returned.
pub fn run_ranks_detailed<T: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, &dyn Communicator) -> Result<T> + Sync,
) -> RankResults<T> {
    run_group(
        InProcessGroup::new(world, timeout),
        InProcessComm::abort_reason,
        f,
    )
}

/// [`run_ranks`] with one rank per entry of `devices` (several entries may name the same device):
/// tensors a rank receives from a rank on another device are copied to its own device (through
/// the host). [`run_ranks_on_devices_with`] can use NCCL instead.
pub fn run_ranks_on_devices<T: Send>(
    devices: &[Device],
    timeout: Duration,
    f: impl Fn(usize, &dyn Communicator) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    run_ranks_on_devices_with(devices, timeout, CommChoice::Host, f)
}

/// [`run_ranks_on_devices`] on the data plane `choice` selects (`comm::nccl_in_process`): with
/// NCCL, one communicator per GPU from one `ncclCommInitAll`, the ranks' threads exchanging
/// GPU to GPU; else the in-process communicator.
pub fn run_ranks_on_devices_with<T: Send>(
    devices: &[Device],
    timeout: Duration,
    choice: CommChoice,
    f: impl Fn(usize, &dyn Communicator) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    if nccl_in_process(devices, choice)? {
        #[cfg(feature = "cuda")]
        return collect_results(run_group(
            vi_runtime::comm::nccl::NcclComm::group_in_process(devices, timeout)?,
            vi_runtime::comm::nccl::NcclComm::abort_reason,
            f,
        ));
        #[cfg(not(feature = "cuda"))]
        return Err(ModelError::Msg(
            "NCCL was selected but vi-model was built without its `cuda` feature".into(),
        ));
    }
    collect_results(run_group(
        InProcessGroup::new_on_devices(devices, timeout),
        InProcessComm::abort_reason,
        f,
    ))
}

/// Runs `f` on one thread per communicator of `comms`; `abort_reason` reads the group's first
/// failure from a member.
fn run_group<C: Communicator, T: Send>(
    comms: Vec<C>,
    abort_reason: impl Fn(&C) -> Option<String> + Sync,
    f: impl Fn(usize, &dyn Communicator) -> Result<T> + Sync,
) -> RankResults<T> {
    let first_failure: Mutex<Option<String>> = Mutex::new(None);
    let per_rank = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                let first_failure = &first_failure;
                let abort_reason = &abort_reason;
                std::thread::Builder::new()
                    .name(format!("vi-rank-{rank}"))
                    .spawn_scoped(s, move || {
                        let out = match catch_unwind(AssertUnwindSafe(|| f(rank, &comm))) {
                            Ok(Ok(v)) => return Ok(v),
                            Ok(Err(e)) => {
                                comm.abort(&e.to_string());
                                Err(e)
                            }
                            Err(p) => {
                                let msg = format!("rank {rank} panicked: {}", panic_message(&*p));
                                comm.abort(&msg);
                                Err(ModelError::Msg(msg))
                            }
                        };
                        // The group's first abort reason names the rank that failed first.
                        let mut ff = first_failure.lock().unwrap_or_else(|e| e.into_inner());
                        if ff.is_none() {
                            *ff = abort_reason(&comm);
                        }
                        out
                    })
                    .expect("spawn a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|p| {
                    Err(ModelError::Msg(format!(
                        "rank {rank} thread died: {}",
                        panic_message(&*p)
                    )))
                })
            })
            .collect::<Vec<_>>()
    });
    RankResults {
        per_rank,
        first_failure: first_failure
            .into_inner()
            .unwrap_or_else(|e| e.into_inner()),
    }
}

/// [`run_ranks_detailed`], reduced to the values of all ranks or one error naming the rank that
/// failed first (and what every rank reported).
pub fn run_ranks<T: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, &dyn Communicator) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    collect_results(run_ranks_detailed(world, timeout, f))
}

fn collect_results<T>(res: RankResults<T>) -> Result<Vec<T>> {
    if res.per_rank.iter().all(|r| r.is_ok()) {
        return Ok(res.per_rank.into_iter().map(|r| r.ok().unwrap()).collect());
    }
    let details: Vec<String> = res
        .per_rank
        .iter()
        .enumerate()
        .filter_map(|(r, x)| x.as_ref().err().map(|e| format!("rank {r}: {e}")))
        .collect();
    Err(ModelError::Msg(format!(
        "distributed run failed: {}; {}",
        res.first_failure
            .unwrap_or_else(|| "no failure recorded by the group".into()),
        details.join("; ")
    )))
}

/// One step of the denoising loop of one rank: (rank, step index, timestep, latents of this clip,
/// the clip-parallel context of this step) -> the next latents of this clip.
pub type StepFn<'f> =
    dyn Fn(&RankInfo, usize, i64, &Tensor, &dyn TemporalContext) -> Result<Tensor> + Sync + 'f;

/// The clip-parallel denoising loop over `world` in-process ranks for a video of `total_frames`:
/// each rank gets its clip ([`split_frames`]), builds its initial latents with `init`, runs `step`
/// for every timestep with a [`ClipParallelContext`] of that timestep (the model call and the
/// sampler live in `step`), and sends its final latents to rank 0. Returns the final latents of
/// every rank in rank (= frame) order; [`concat_frames`] assembles them.
pub fn run_denoising(
    world: usize,
    timeout: Duration,
    total_frames: usize,
    cfg: &ViConfig,
    timesteps: &[i64],
    init: &(dyn Fn(&RankInfo) -> Result<Tensor> + Sync),
    step: &StepFn<'_>,
) -> Result<Vec<Tensor>> {
    let clips = split_frames(total_frames, world)?;
    let gathered = run_ranks(world, timeout, |rank, comm| {
        let info = RankInfo {
            rank,
            world,
            frames: clips[rank].clone(),
        };
        let mut x = init(&info)?;
        for (i, &t) in timesteps.iter().enumerate() {
            let ctx = ClipParallelContext::new(comm, cfg, t);
            x = step(&info, i, t, &x, &ctx)?;
        }
        Ok(comm.gather_to_root(&x)?)
    })?;
    gathered
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| ModelError::Msg("rank 0 received no frames".into()))
}

/// Concatenate per-rank tensors along the frame axis `axis` (rank order = frame order).
pub fn concat_frames(parts: &[Tensor], axis: usize) -> Result<Tensor> {
    let refs: Vec<&Tensor> = parts.iter().collect();
    Ok(ops::concat(&refs, axis)?)
}

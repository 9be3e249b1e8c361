//! `generate`: text -> video. Every check that can fail is done before any expensive work, and
//! outputs are opened (as temporary files beside their destination) before the models load.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use vi_model::clip::ClipTextConfig;
use vi_model::clip_parallel::{PhaseBias, ViConfig};
use vi_model::distributed::{reference_prompt_segments, split_frames};
use vi_model::memory_plan::{self, PlanModels, PlanRequest};
use vi_model::models::{ModelPaths, Models};
use vi_model::pipeline::{self, Event, FrameSink, GenerateRequest};
use vi_model::sampler::SamplerKind;
use vi_model::schedule::Schedule;
use vi_model::unet::UNetConfig;
use vi_model::vae::VaeConfig;
use vi_runtime::comm::WorldEnv;
use vi_runtime::{DType, Device};
use vi_weights::input_file::{read_text_bounded, Limit};

use crate::checkpoints;
use crate::cli::{DTypeArg, GenerateArgs, PartArgs, SamplerArg, ViArgs};
use crate::devices::{check_available, parse_devices};
use crate::multiprocess::{self, Placement, DEFAULT_RANK_TIMEOUT};
use crate::video::{Frame, Mp4Writer, PngSequence};

/// Reference clip length per rank (Video-Infinity's per-GPU clip).
const FRAMES_PER_RANK: usize = 24;
/// Tiny-model defaults: small and fast enough for a 2-core CPU.
const TINY_FRAMES_PER_RANK: usize = 16;
const TINY_STEPS: usize = 10;
const TINY_SIZE: usize = 64;
/// Prompt of a tiny-model run that gives none.
const TINY_PROMPT: &str = "a lighthouse on a cliff at sunset, waves crashing";

/// Parses a `--prompts` file: `FIRST_FRAME: prompt` per line.
pub fn read_prompt_file(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = read_text_bounded(path, Limit::PROMPT_FILE)?;
    let mut out: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let (first, prompt) = line
            .split_once(':')
            .with_context(|| format!("{}: expected `FIRST_FRAME: prompt`", at()))?;
        let first: usize = first
            .trim()
            .parse()
            .with_context(|| format!("{}: `{}` is not a frame number", at(), first.trim()))?;
        if let Some((prev, _)) = out.last() {
            ensure!(
                first > *prev,
                "{}: segments must start at increasing frames ({prev} then {first})",
                at()
            );
        } else {
            ensure!(
                first == 0,
                "{}: the first segment must start at frame 0",
                at()
            );
        }
        out.push((first, prompt.trim().to_string()));
    }
    ensure!(
        !out.is_empty(),
        "prompt file {} holds no prompt",
        path.display()
    );
    Ok(out)
}

pub fn vi_config(a: &ViArgs) -> ViConfig {
    ViConfig {
        conv_pad: a.conv_pad,
        attn_pad: a.attn_pad,
        top_k: a.top_k,
        local_phase: Some(PhaseBias {
            t: a.phase_t as i64,
            local_bias: a.phase_bias,
            global_bias: 0.0,
        }),
        global_phase: Some(PhaseBias {
            t: a.phase_t as i64,
            local_bias: 0.0,
            global_bias: a.phase_bias,
        }),
        dynamic_scale: !a.no_dynamic_scale,
        token_num_scale: a.token_num_scale,
        exact_seam: a.exact_seam,
        overlap: !a.sync_exchange,
        ..ViConfig::default()
    }
}

/// The command-line flags that give `a` (for a command this one starts).
pub fn vi_cli_args(a: &ViArgs) -> Vec<String> {
    let mut v: Vec<String> = [
        ("--top-k", a.top_k.to_string()),
        ("--attn-pad", a.attn_pad.to_string()),
        ("--conv-pad", a.conv_pad.to_string()),
        ("--phase-t", a.phase_t.to_string()),
        ("--phase-bias", format!("{:?}", a.phase_bias)),
    ]
    .into_iter()
    .flat_map(|(f, x)| [f.to_string(), x])
    .collect();
    for (flag, on) in [
        ("--no-dynamic-scale", a.no_dynamic_scale),
        ("--token-num-scale", a.token_num_scale),
        ("--exact-seam", a.exact_seam),
        ("--sync-exchange", a.sync_exchange),
    ] {
        if on {
            v.push(flag.to_string());
        }
    }
    v
}

pub fn sampler_kind(s: SamplerArg) -> SamplerKind {
    match s {
        SamplerArg::DpmSde => SamplerKind::DpmSolverSde,
        SamplerArg::Dpm2m => SamplerKind::DpmSolver2M,
        SamplerArg::Ddim => SamplerKind::Ddim,
    }
}

/// One line per stage: `    load: ...`.
fn stage(name: &str, what: String) {
    eprintln!("{name:>8}: {what}");
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Runs `generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let t_all = Instant::now();
    let tiny = a.model == "tiny";
    crate::flags::check_generate(&a)?;
    // Default frames, steps and size: the tiny model's also for a folder that holds it.
    let tiny_sizes = tiny || is_tiny_folder(&a.model, &a.parts);

    // --- Requests that need no model ---------------------------------------------------------
    // One process holds every rank, or a launcher's variables make this one process of a job
    // holding its share of `--devices` (crate::multiprocess).
    let world_env = WorldEnv::from_env()?;
    let node_devices = parse_devices(&a.devices)?;
    let place = match &world_env {
        Some(env) => Some(Placement::new(&node_devices, &a.devices, env)?),
        None => None,
    };
    // This process's ranks: their devices, and their logical ranks.
    let ranks = match &place {
        Some(p) => p.devices.clone(),
        None => node_devices,
    };
    if !a.plan_only {
        // A plan-only run opens no device.
        check_available(&ranks)?;
        if place.is_none() {
            // `--comm nccl` that cannot be served fails here, before any weight or output
            // (a multi-process job decides with its peers at the rendezvous).
            vi_runtime::comm::nccl_in_process(&ranks, a.comm)?;
        }
    }
    let world = place.as_ref().map_or(ranks.len(), |p| p.world);
    let local = place.as_ref().map_or(0..world, |p| p.ranks());
    // Only the process of logical rank 0 opens or writes the outputs.
    let writes = local.start == 0;
    let rank_timeout = match a.rank_timeout {
        Some(s) => {
            ensure!(
                s.is_finite() && s > 0.0,
                "--rank-timeout {s}: a number of seconds above 0"
            );
            Duration::from_secs_f64(s)
        }
        None => DEFAULT_RANK_TIMEOUT,
    };
    let frames = a.frames.unwrap_or(
        world
            * if tiny_sizes {
                TINY_FRAMES_PER_RANK
            } else {
                FRAMES_PER_RANK
            },
    );
    ensure!(frames >= 1, "--frames must be at least 1");
    ensure!(
        frames >= world,
        "--frames {frames} is fewer than the {world} ranks of --devices {}: every rank needs at \
         least one frame",
        a.devices
    );
    let steps = a.steps.unwrap_or(if tiny_sizes { TINY_STEPS } else { 30 });
    ensure!(steps >= 1, "--steps must be at least 1");
    let height = a.height.unwrap_or(if tiny_sizes { TINY_SIZE } else { 320 });
    let width = a.width.unwrap_or(if tiny_sizes { TINY_SIZE } else { 512 });
    for (flag, v) in [("--height", height), ("--width", width)] {
        ensure!(
            v > 0 && v % 8 == 0,
            "{flag} {v} is not a multiple of 8 (the VAE works on 8x8 pixel blocks)"
        );
        ensure!(
            v % 64 == 0,
            "{flag} {v} must be a multiple of 64: the latent ({v}/8 = {}) must stay whole \
             through the UNet's 3 downsamplings",
            v / 8
        );
    }
    ensure!(a.guidance.is_finite(), "--guidance must be a finite number");
    ensure!(a.fps_cond.is_finite(), "--fps-cond must be a finite number");
    ensure!(a.out_fps >= 1, "--out-fps must be at least 1");
    if a.out.is_none() && a.frames_dir.is_none() && !a.plan_only {
        bail!("nothing to write: pass --out FILE.mp4 and/or --frames-dir DIR");
    }
    let clips = split_frames(frames, world)?;
    let segments: Vec<(usize, String)> = match &a.prompts {
        Some(file) => {
            let s = read_prompt_file(file)?;
            if let Some((f, _)) = s.iter().find(|(f, _)| *f >= frames) {
                bail!(
                    "{}: a segment starts at frame {f}, past the video's {frames} frames",
                    file.display()
                );
            }
            s
        }
        None if a.prompt.is_empty() && (tiny || a.model == RANDOM_FULL) => {
            // A random model's video does not depend on the words in any visible way.
            vec![(0, TINY_PROMPT.to_string())]
        }
        None => {
            ensure!(
                !a.prompt.is_empty(),
                "no prompt: pass --prompt TEXT (repeatable) or --prompts FILE"
            );
            reference_prompt_segments(&a.prompt, &clips)
        }
    };

    ensure!(a.vae_chunk >= 1, "--vae-chunk must be at least 1");
    let checkpointed = a.checkpoint_dir.is_some() || a.resume.is_some();
    let ckpt_layout = checkpoints::Layout {
        clips: &clips,
        local: local.clone(),
        // The VAE's 8x8 pixel blocks (height and width are checked multiples of 64).
        latent: (height / 8, width / 8),
        channels: if checkpointed {
            plan_models(&a.model, &a.parts)?.map_or(4, |m| m.unet.in_channels)
        } else {
            4
        },
        sampler: sampler_kind(a.sampler),
        steps,
    };

    // --- Memory plan: before any output is opened or any weight is loaded ---------------------
    let dtype_of = |d: Device| dtype_of(d, a.dtype);
    let req = PlanRequest {
        ranks: plan_ranks(&ranks, world, local.start, a.dtype),
        local: local.clone(),
        frames,
        height,
        width,
        steps,
        sampler: sampler_kind(a.sampler),
        vi: vi_config(&a.vi),
        vae_chunk: a.vae_chunk,
        decode: true,
        prompts: segments.len(),
        schedule: Schedule::UNCONSTRAINED,
    };
    let memory = MemoryArgs {
        assume_free: a.assume_free_memory,
        device_memory: a.device_memory,
        budget: a.memory_budget,
        plan_only: a.plan_only,
        devices: &ranks,
        pinned: a.schedule,
    };
    let (planned, schedule) = match plan_and_choose(
        &a.model,
        &a.parts,
        &req,
        &memory,
        a.no_memory_check && !a.plan_only,
    )? {
        Some((p, s)) => (Some(p), s),
        None => (None, a.schedule.unwrap_or(Schedule::UNCONSTRAINED)),
    };
    if a.plan_only {
        if checkpointed {
            checkpoints::state_size(&ckpt_layout);
        }
        stage(
            "plan",
            "--plan-only: no weights loaded, nothing written".into(),
        );
        return Ok(());
    }

    let plan_req = req;
    let mut req = GenerateRequest {
        prompts: segments.clone(),
        negative_prompt: a.negative_prompt.clone(),
        frames,
        height,
        width,
        steps,
        sampler: sampler_kind(a.sampler),
        guidance: a.guidance,
        fps_cond: a.fps_cond,
        seed: a.seed,
        vi: vi_config(&a.vi),
        world,
        rank_timeout,
        comm: a.comm,
        vae_chunk: a.vae_chunk,
        decode: true,
        schedule,
        offload_dir: None,
    };

    // --- Rendezvous: every process runs the same request, before any output or weight ----------
    // The job's schedule is the merge of every process's choice (each planned its own ranks
    // against its own budget); a process whose choice it is not re-plans under it.
    let replan = |world_schedule: Schedule| {
        replan_for_job(
            &a.model,
            &a.parts,
            &plan_req,
            &memory,
            schedule,
            world_schedule,
            planned.is_some(),
        )
    };
    let job = match world_env {
        Some(env) => Some(multiprocess::rendezvous(
            env,
            place.as_ref().expect("a placement with a world"),
            rank_timeout,
            &mut req,
            &replan,
            &a.model,
            &a.parts,
            dtype_of(ranks[0]),
        )?),
        None => None,
    };

    // --- Offload: the spill directory of CPU ranks under an offloading schedule ---------------
    if req.schedule.offload && ranks.contains(&Device::Cpu) {
        let dir = a.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
        // A spill file made and dropped: the directory takes files (unlinked at once).
        vi_runtime::offload::Tier::spill(&dir)
            .map_err(|e| anyhow::anyhow!("--offload-dir {}: {e}", dir.display()))?;
        let spill = planned.as_ref().map_or(0, |p| {
            p.0.devices
                .iter()
                .filter(|d| d.device == Device::Cpu)
                .map(|d| d.offloaded)
                .sum()
        });
        let free = checkpoints::free_bytes(&dir)
            .map_err(|e| anyhow::anyhow!("--offload-dir {}: {e}", dir.display()))?;
        if spill > free {
            bail!(
                "--offload-dir {}: the plan spills up to {} to disk but only {} is free there \
                 (nothing was written)",
                dir.display(),
                memory_plan::fmt_bytes(spill),
                memory_plan::fmt_bytes(free)
            );
        }
        req.offload_dir = Some(dir);
    } else if let Some(dir) = &a.offload_dir {
        req.offload_dir = Some(dir.clone());
    }

    // --- Checkpoints: the folder, its size against the free space, a resume's files ------------
    let prepared = if checkpointed {
        let digest = multiprocess::request_digest(&req, &a.model, &a.parts, dtype_of(ranks[0]))?;
        let args = checkpoints::CheckpointArgs {
            checkpoint_dir: a.checkpoint_dir.as_deref(),
            every: a.checkpoint_every,
            resume: a.resume.as_deref(),
            assume_free_disk: a.assume_free_disk,
        };
        checkpoints::prepare(&args, digest, &ckpt_layout, writes)?
    } else {
        None
    };
    let checkpointing = prepared.as_ref().map(|p| p.checkpointing());
    let resumed = prepared.as_ref().map_or(0, |p| p.completed);

    // --- Outputs: opened now, so a bad destination fails before any work --------------------
    let mut mp4 = match &a.out {
        Some(p) if writes => Some(Mp4Writer::create(p, width, height, a.out_fps, a.overwrite)?),
        _ => None,
    };
    let mut pngs = match &a.frames_dir {
        Some(d) if writes => Some(PngSequence::create(d, a.overwrite)?),
        _ => None,
    };

    // --- Models: one copy per distinct device -------------------------------------------------
    let t = Instant::now();
    let (models, rank_model) = load_models(&a.model, &a.parts, &ranks, a.dtype)?;
    stage(
        "load",
        format!(
            "{} on {} ({}) in {}",
            if tiny {
                "tiny model".to_string()
            } else if a.model == RANDOM_FULL {
                "full-size model with RANDOM weights".to_string()
            } else {
                format!("model {}", a.model)
            },
            describe_ranks(&ranks),
            format!("{:?}", models[0].dtype).to_lowercase(),
            secs(t.elapsed())
        ),
    );
    if models[0].random_weights {
        eprintln!(
            "    note: the {} model's weights are RANDOM (nothing was trained): this run \
             demonstrates the machinery, its video is noise-like",
            if tiny { "tiny" } else { "random-full" }
        );
    }

    pipeline::check_request(&models[0], &req)?;
    let per_rank: Vec<String> = clips
        .iter()
        .map(|c| format!("{}..{}", c.start, c.end))
        .collect();
    eprintln!(
        "    {frames} frames {width}x{height} over {world} rank(s) [{}], {steps} steps {:?}, \
         guidance {}, fps {}, seed {}",
        per_rank.join(", "),
        a.sampler,
        a.guidance,
        a.fps_cond,
        a.seed
    );
    for (f, p) in &segments {
        eprintln!("    prompt from frame {f}: {p:?}");
    }
    for w in truncation_warnings(
        &models[0].tokenizer,
        segments
            .iter()
            .map(|(_, p)| p.as_str())
            .chain([a.negative_prompt.as_str()]),
    ) {
        eprintln!("    {w}");
    }

    // --- Encode, denoise, decode and write as frames arrive -----------------------------------
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "  denoise [{bar:30}] {pos}/{len} steps  {elapsed_precise} elapsed, ETA {eta_precise}  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let t_enc = Instant::now();
    let lines = !a.quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Reset when rank 0 has encoded the text (other processes do not see that event).
    let t_den = std::sync::Mutex::new(Some(Instant::now()));
    // Steps finished per rank (every rank reports; the bar shows the slowest).
    let rank_steps: Vec<AtomicUsize> = (0..world).map(|_| AtomicUsize::new(0)).collect();
    let denoised = std::sync::atomic::AtomicBool::new(false);
    let t_dec = std::sync::Mutex::new(None::<Instant>);
    // Checkpoints rank 0 put in place: count, bytes, seconds.
    let saved = std::sync::Mutex::new((0usize, 0u64, 0f64));
    let progress = |e: Event| match e {
        Event::TextEncoded { prompts } => {
            bar.suspend(|| {
                stage(
                    "encode",
                    format!(
                        "{} prompt(s) + negative prompt in {}",
                        prompts,
                        secs(t_enc.elapsed())
                    ),
                )
            });
            *t_den.lock().unwrap() = Some(Instant::now());
            bar.reset_elapsed();
        }
        Event::Step { rank, step, t, .. } => {
            rank_steps[rank].store(step + 1, Ordering::Relaxed);
            // The ranks of this process (the others report in their own processes).
            let done: Vec<usize> = rank_steps[local.clone()]
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .collect();
            let slowest = done.iter().copied().min().unwrap_or(0);
            if rank == local.start {
                bar.set_message(if done.iter().all(|&d| d == slowest) {
                    format!("t={t}")
                } else {
                    format!("t={t}, steps per rank {done:?}")
                });
            }
            let before = bar.position();
            bar.set_position(slowest as u64);
            // No terminal (a launcher's pipe, a log file): the bar is hidden; a line at every
            // tenth of the steps instead.
            if lines && slowest as u64 > before && slowest.is_multiple_of((steps / 10).max(1)) {
                eprintln!("  denoise: step {slowest}/{steps} (t={t})");
            }
            if slowest == steps && !denoised.swap(true, Ordering::Relaxed) {
                bar.finish_and_clear();
                let el = t_den
                    .lock()
                    .unwrap()
                    .map(|t| t.elapsed())
                    .unwrap_or_default();
                let ran = steps - resumed;
                stage(
                    "denoise",
                    format!(
                        "{ran} steps in {} ({:.2} s/step){}",
                        secs(el),
                        el.as_secs_f64() / ran.max(1) as f64,
                        if resumed > 0 {
                            format!(" after the {resumed} resumed")
                        } else {
                            String::new()
                        }
                    ),
                );
                *t_dec.lock().unwrap() = Some(Instant::now());
            }
        }
        Event::Checkpointed(c) => {
            let mut s = saved.lock().unwrap();
            s.0 += 1;
            s.1 = c.bytes;
            s.2 += c.elapsed.as_secs_f64();
        }
        Event::Decoded { .. } | Event::Written { .. } => {}
    };
    let write_bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(frames as u64)
    };
    write_bar.set_style(
        ProgressStyle::with_template("    write [{bar:30}] {pos}/{len} frames  {elapsed_precise}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut sink = Outputs {
        width,
        height,
        mp4: mp4.as_mut(),
        pngs: pngs.as_mut(),
        bar: &write_bar,
        written: 0,
    };
    let models_ref = &models;
    let rank_model_ref = &rank_model;
    // Models by logical rank (rank_model is indexed by this process's ranks).
    let first = local.start;
    let models_of = move |r: usize| &models_ref[rank_model_ref[r - first]];
    let out = match &job {
        None => pipeline::generate_to_checkpointed(
            &models_of,
            &req,
            checkpointing.as_ref(),
            Some(&mut sink),
            &progress,
        )
        .context("generation failed"),
        Some(job) => job.run(
            place.as_ref().expect("a placement with a job"),
            &models_of,
            &req,
            writes.then_some(&mut sink as &mut dyn FrameSink),
            &progress,
            checkpointing.as_ref(),
        ),
    };
    let n_frames = sink.written;
    bar.finish_and_clear();
    write_bar.finish_and_clear();
    out.context("generation failed")?;
    if let Some(job) = job {
        job.finish(world)?;
    }
    if !writes {
        let wall = t_all.elapsed();
        eprintln!(
            "    done: rank{} {} of {world} sent {} frames to rank 0 in {}",
            if local.len() == 1 { "" } else { "s" },
            if local.len() == 1 {
                local.start.to_string()
            } else {
                format!("{}..{}", local.start, local.end - 1)
            },
            clips[local.clone()].iter().map(|c| c.len()).sum::<usize>(),
            secs(wall)
        );
        return Ok(());
    }
    ensure!(
        n_frames == frames,
        "the generation ended after {n_frames} of {frames} frames"
    );
    let dec_el = t_dec
        .lock()
        .unwrap()
        .map(|t| t.elapsed())
        .unwrap_or_default();

    // --- Finish the outputs -------------------------------------------------------------------
    let mut written = Vec::new();
    if let Some(w) = mp4.take() {
        w.finish()?;
        written.push(
            a.out
                .as_ref()
                .expect("mp4 implies --out")
                .display()
                .to_string(),
        );
    }
    if let Some(p) = pngs.take() {
        p.finish()?;
        written.push(format!(
            "{}/frame_*.png",
            a.frames_dir
                .as_ref()
                .expect("pngs imply --frames-dir")
                .display()
        ));
    }
    stage(
        "write",
        format!(
            "{n_frames} frames decoded and written to {} in {} (as they were decoded)",
            written.join(" and "),
            secs(dec_el)
        ),
    );
    let (n_ckpt, ckpt_bytes, ckpt_secs) = *saved.lock().unwrap();
    if let Some(p) = &prepared {
        stage(
            "ckpt",
            format!(
                "{n_ckpt} checkpoint{} of {} in {} ({:.3} s each) in {}",
                if n_ckpt == 1 { "" } else { "s" },
                memory_plan::fmt_bytes(ckpt_bytes),
                secs(Duration::from_secs_f64(ckpt_secs)),
                ckpt_secs / n_ckpt.max(1) as f64,
                p.dir.display()
            ),
        );
    }
    let wall = t_all.elapsed();
    eprintln!(
        "    done: {n_frames} frames {width}x{height} in {} ({:.2} frames/s)",
        secs(wall),
        n_frames as f64 / wall.as_secs_f64()
    );
    if let Some(p) = &planned {
        report_cuda_use(p);
    }
    Ok(())
}

/// Rank 0's frame sink: encodes each frame into the MP4 and/or PNG outputs as it arrives (in
/// frame order), so no frame is kept.
struct Outputs<'a> {
    width: usize,
    height: usize,
    mp4: Option<&'a mut Mp4Writer>,
    pngs: Option<&'a mut PngSequence>,
    bar: &'a ProgressBar,
    written: usize,
}

impl Outputs<'_> {
    fn write(&mut self, index: usize, rgb: Vec<u8>) -> Result<()> {
        ensure!(
            index == self.written,
            "frame {index} arrived after {} frames",
            self.written
        );
        let f = Frame::new(self.width, self.height, rgb)?;
        if let Some(w) = self.mp4.as_mut() {
            w.push(&f)?;
        }
        if let Some(p) = self.pngs.as_mut() {
            p.push(&f)?;
        }
        self.written += 1;
        self.bar.inc(1);
        Ok(())
    }
}

impl FrameSink for Outputs<'_> {
    fn frame(&mut self, index: usize, rgb: Vec<u8>) -> vi_model::params::Result<()> {
        self.write(index, rgb)
            .map_err(|e| vi_model::params::ModelError::Msg(format!("{e:#}")))
    }
}

/// A checked memory plan and the free bytes read per device before the run.
pub type Planned = (memory_plan::MemoryPlan, Vec<(Device, u64)>);

/// After a run: each CUDA device's planned bytes next to what the run took from it (free memory
/// before the plan minus free memory now; the memory pool keeps freed blocks, so this is the
/// run's high-water mark, pool rounding and workspaces included).
fn report_cuda_use(planned: &Planned) {
    #[cfg(feature = "cuda")]
    for d in &planned.0.devices {
        let Device::Cuda(i) = d.device else { continue };
        let before = planned.1.iter().find(|(x, _)| *x == d.device).map(|p| p.1);
        if let (Some(before), Ok((_, _, free, _))) = (before, vi_runtime::cuda::device_info(i)) {
            stage(
                "memory",
                format!(
                    "cuda:{i}: planned {} (+ margin), the run took {} (pool high-water)",
                    memory_plan::fmt_bytes(d.total()),
                    memory_plan::fmt_bytes(before.saturating_sub(free as u64))
                ),
            );
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = planned;
}

/// One warning line per distinct prompt longer than the text encoder reads (77 tokens with the
/// start and end tokens): the rest is dropped, as the reference's tokenizer does.
pub fn truncation_warnings<'a>(
    tokenizer: &vi_model::tokenizer::ClipTokenizer,
    prompts: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let keep = vi_model::tokenizer::CONTEXT_LENGTH - 2;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for p in prompts {
        if !seen.insert(p) {
            continue;
        }
        let n = tokenizer.tokenize(p).len();
        if n > keep {
            let shown: String = p.chars().take(40).collect();
            let more = if shown.len() < p.len() { "..." } else { "" };
            out.push(format!(
                "warning: prompt \"{shown}{more}\" is {n} tokens: truncated to its first {keep} \
                 (the text encoder reads {} with the start and end tokens)",
                vi_model::tokenizer::CONTEXT_LENGTH
            ));
        }
    }
    out
}

/// Whether `model` is a folder holding the embedded tiny model (as `write-tiny` writes it): its
/// UNet config is the tiny one. Such a folder takes the tiny model's default frames, steps and size.
pub fn is_tiny_folder(model: &str, parts: &PartArgs) -> bool {
    if model == "tiny" || model == RANDOM_FULL {
        return false;
    }
    let dir = parts
        .unet
        .clone()
        .unwrap_or_else(|| Path::new(model).join("unet"));
    vi_model::models::part_files_in(&dir, vi_model::models::PartKind::Unet)
        .and_then(|f| f.read_config())
        .and_then(|c| UNetConfig::from_json(&c))
        .is_ok_and(|c| c == vi_model::tiny::unet_config())
}

/// `--model random-full`: VideoCrafter2's full-size architecture with random weights.
pub const RANDOM_FULL: &str = "random-full";

/// Loads the models once per distinct device of `ranks` (`model`: a folder, `tiny` or
/// `random-full`); returns
/// them and, per rank, the index of its models.
pub fn load_models(
    model: &str,
    parts: &PartArgs,
    ranks: &[Device],
    dtype: DTypeArg,
) -> Result<(Vec<Models>, Vec<usize>)> {
    let paths = if model == "tiny" || model == RANDOM_FULL {
        ensure!(
            parts.unet.is_none()
                && parts.text_encoder.is_none()
                && parts.vae.is_none()
                && parts.tokenizer.is_none(),
            "--unet/--text-encoder/--vae/--tokenizer replace parts of a model folder, not of \
             the tiny or random-full model"
        );
        None
    } else {
        Some(
            ModelPaths::with_overrides(
                Some(Path::new(model)),
                parts.unet.as_deref(),
                parts.text_encoder.as_deref(),
                parts.vae.as_deref(),
                parts.tokenizer.as_deref(),
            )
            .with_context(|| format!("cannot load model {model}"))?,
        )
    };
    let mut devices: Vec<Device> = Vec::new();
    for d in ranks {
        if !devices.contains(d) {
            devices.push(*d);
        }
    }
    let dtype_of = |d: Device| dtype_of(d, dtype);
    let mut models: Vec<Models> = Vec::new();
    for &d in &devices {
        let m = match &paths {
            None if model == RANDOM_FULL => vi_model::random_full::load(d, dtype_of(d))
                .context("cannot build the random-full model")?,
            None => vi_model::tiny::load(d, dtype_of(d))?,
            Some(p) => Models::load_paths(p, d, dtype_of(d))
                .with_context(|| format!("cannot load model {model}"))?,
        };
        models.push(m);
    }
    let rank_model = ranks
        .iter()
        .map(|d| devices.iter().position(|x| x == d).expect("listed"))
        .collect();
    Ok((models, rank_model))
}

/// The models' storage dtype on `d` (the CPU computes in f32).
pub fn dtype_of(d: Device, dtype: DTypeArg) -> DType {
    match (d, dtype) {
        (Device::Cpu, _) | (_, DTypeArg::F32) => DType::F32,
        (_, DTypeArg::Bf16) => DType::BF16,
        (_, DTypeArg::F16) => DType::F16,
    }
}

/// The three configurations of `model` (no weights read); None when a model folder's parts or
/// config files are missing (loading then reports the problem); an error naming the file when a
/// config file is there but unreadable or invalid (e.g. a size past `vi_model::limits`).
fn plan_models(model: &str, parts: &PartArgs) -> Result<Option<PlanModels>> {
    use vi_model::models::{part_files_in, PartKind};
    if model == "tiny" {
        return Ok(Some(PlanModels {
            unet: vi_model::tiny::unet_config(),
            clip: vi_model::tiny::clip_config(),
            vae: vi_model::tiny::vae_config(),
        }));
    }
    if model == RANDOM_FULL {
        return Ok(Some(PlanModels {
            unet: vi_model::random_full::unet_config()?,
            clip: vi_model::random_full::clip_config()?,
            vae: vi_model::random_full::vae_config()?,
        }));
    }
    let Ok(paths) = ModelPaths::with_overrides(
        Some(Path::new(model)),
        parts.unet.as_deref(),
        parts.text_encoder.as_deref(),
        parts.vae.as_deref(),
        parts.tokenizer.as_deref(),
    ) else {
        return Ok(None);
    };
    let config = |dir: &Path, kind: PartKind| -> Result<Option<(std::path::PathBuf, _)>> {
        let Ok(files) = part_files_in(dir, kind) else {
            return Ok(None);
        };
        Ok(Some((files.config.clone(), files.read_config()?)))
    };
    let (Some(u), Some(c), Some(v)) = (
        config(&paths.unet, PartKind::Unet)?,
        config(&paths.text_encoder, PartKind::TextEncoder)?,
        config(&paths.vae, PartKind::Vae)?,
    ) else {
        return Ok(None);
    };
    let named = |p: &Path| format!("{}", p.display());
    Ok(Some(PlanModels {
        unet: UNetConfig::from_json(&u.1).with_context(|| named(&u.0))?,
        clip: ClipTextConfig::from_json(&c.1).with_context(|| named(&c.0))?,
        vae: VaeConfig::from_json(&v.1).with_context(|| named(&v.0))?,
    }))
}

/// Before any output is opened or any weight loaded: the cheap bound of `vi_model::limits` (always
/// against its absolute ceiling; with `no_check` also against the devices' real free memory, since
/// a run above a certain minimum can only abort in the allocator), then the memory plan (unless
/// `no_check`; `assume_free` replaces its free-memory readings).
pub fn plan_and_check(
    model: &str,
    parts: &PartArgs,
    req: &PlanRequest,
    assume_free: Option<u64>,
    no_check: bool,
) -> Result<Option<(Planned, Schedule)>> {
    let mem = MemoryArgs {
        assume_free,
        device_memory: None,
        budget: None,
        plan_only: false,
        devices: &[],
        pinned: None,
    };
    plan_and_choose(model, parts, req, &mem, no_check)
}

/// [`plan_and_check`] with the budget's sources (`generate`'s --memory-budget, --device-memory,
/// --plan-only): the checked plan and the schedule chosen for the budget.
fn plan_and_choose(
    model: &str,
    parts: &PartArgs,
    req: &PlanRequest,
    mem: &MemoryArgs,
    no_check: bool,
) -> Result<Option<(Planned, Schedule)>> {
    let Some(models) = plan_models(model, parts)? else {
        return Ok(None);
    };
    let free_of = |d: Device| {
        if no_check {
            memory_plan::device_free(d).ok().flatten()
        } else {
            None
        }
    };
    vi_model::limits::check_lower_bound(&models, req, &free_of)?;
    if no_check {
        stage("memory", "check skipped (--no-memory-check)".into());
        return Ok(None);
    }
    check_memory(&models, req, mem)
}

/// Where the memory budget of each device comes from.
struct MemoryArgs<'a> {
    /// Hidden testing flag: free bytes of every device and of the host.
    assume_free: Option<u64>,
    /// `--device-memory`: free bytes of every device of --devices.
    device_memory: Option<u64>,
    /// `--memory-budget`: the budget itself, every device.
    budget: Option<u64>,
    /// No device is opened (CUDA free memory is not read).
    plan_only: bool,
    devices: &'a [Device],
    /// Hidden `--schedule`: the schedule to run instead of the planner's choice.
    pinned: Option<Schedule>,
}

impl MemoryArgs<'_> {
    /// Free bytes of `d` as stated or read (None: unknown; Err: the device could not say).
    fn free(&self, d: Device) -> std::result::Result<Option<u64>, String> {
        if let Some(b) = self.assume_free {
            return Ok(Some(b));
        }
        if let (Some(b), true) = (self.device_memory, self.devices.contains(&d)) {
            return Ok(Some(b));
        }
        if self.plan_only && matches!(d, Device::Cuda(_)) {
            return Ok(None);
        }
        memory_plan::device_free(d)
    }

    /// The budget of `d`: --memory-budget, or its free memory less the margin.
    fn budget(&self, d: Device) -> Option<u64> {
        self.budget.or_else(|| {
            self.free(d)
                .ok()
                .flatten()
                .map(|f| memory_plan::Margin::for_device(d).budget_from_free(f))
        })
    }
}

/// Plans the generation's memory on shape-only tensors (`vi_model::memory_plan`): picks the
/// least constraining schedule whose plan fits every device's budget, prints the plan and the
/// schedule, and refuses the run when no schedule fits or a device's free memory (CUDA: the
/// driver's free bytes; the CPU and the host: MemAvailable) is below plan + margin.
fn check_memory(
    models: &PlanModels,
    req: &PlanRequest,
    mem: &MemoryArgs,
) -> Result<Option<(Planned, Schedule)>> {
    let budget_of = |d: Device| mem.budget(d);
    let chosen = match mem.pinned {
        Some(schedule) => {
            memory_plan::plan_fits(models, req, schedule, &budget_of).map(|(plan, fits)| {
                memory_plan::ScheduleChoice {
                    schedule,
                    plan,
                    fits,
                    tried: 1,
                }
            })
        }
        None => memory_plan::choose_schedule(models, req, &budget_of),
    };
    let choice = match chosen {
        Ok(c) => c,
        Err(e) => {
            eprintln!("    warning: no memory plan ({e}); memory not checked");
            return Ok(None);
        }
    };
    let plan = choice.plan;
    // One line per device (the largest only beyond two devices).
    let mut shown: Vec<&memory_plan::DevicePlan> = plan.devices.iter().collect();
    if shown.len() > 2 {
        shown.sort_by_key(|d| std::cmp::Reverse(d.total()));
        shown.truncate(1);
    }
    for d in &shown {
        stage("memory", d.describe());
    }
    if plan.devices.len() > shown.len() {
        eprintln!(
            "    (largest of {} devices; decoded frames in host memory: {})",
            plan.devices.len(),
            memory_plan::fmt_bytes(plan.host_frames)
        );
    }
    // The schedule line: what was chosen and the planned peak of the device nearest its budget.
    let worst = plan
        .devices
        .iter()
        .max_by_key(|d| {
            let need = memory_plan::device_need(&plan, d);
            match budget_of(d.device) {
                Some(b) => (need as f64 / b.max(1) as f64 * 1e6) as u64,
                None => need,
            }
        })
        .expect("a plan has a device");
    let need = memory_plan::device_need(&plan, worst);
    let budget_text = match budget_of(worst.device) {
        Some(b) => format!("budget {}", memory_plan::fmt_bytes(b)),
        None => "no budget known: pass --memory-budget or --device-memory".to_string(),
    };
    stage(
        "schedule",
        format!(
            "{}: planned peak {} on {} ({budget_text}; {})",
            choice.schedule,
            memory_plan::fmt_bytes(need),
            memory_plan::device_name(worst.device),
            if mem.pinned.is_some() {
                "pinned by --schedule".to_string()
            } else {
                format!(
                    "{} candidate{} planned",
                    choice.tried,
                    if choice.tried == 1 { "" } else { "s" }
                )
            },
        ),
    );
    let readings = std::sync::Mutex::new(Vec::new());
    let free_of = |d: Device| -> std::result::Result<Option<u64>, String> {
        let f = mem.free(d);
        if let Ok(Some(b)) = f {
            readings.lock().unwrap().push((d, b));
        }
        f
    };
    let req = PlanRequest {
        schedule: choice.schedule,
        ..req.clone()
    };
    let fit = memory_plan::check_fit(&plan, &req, &free_of);
    if !choice.fits && mem.budget.is_none() {
        // The budget is the free memory less the margin: say it in those terms.
        if let Err(short) = &fit {
            let texts: Vec<&str> = short.iter().map(|s| s.text.as_str()).collect();
            bail!(
                "the memory plan does not fit, even under the most constrained schedule ({}) \
                 (checked before loading any weights; nothing was written):\n  {}",
                choice.schedule,
                texts.join("\n  ")
            )
        }
    }
    if !choice.fits {
        let over: Vec<String> = plan
            .devices
            .iter()
            .filter_map(|d| {
                let b = budget_of(d.device)?;
                let need = memory_plan::device_need(&plan, d);
                (need > b).then(|| {
                    format!(
                        "{}: needs {} under the most constrained schedule, budget {}\n    {}",
                        memory_plan::device_name(d.device),
                        memory_plan::fmt_bytes(need),
                        memory_plan::fmt_bytes(b),
                        d.describe()
                    )
                })
            })
            .collect();
        bail!(
            "the memory plan does not fit the memory budget under any schedule (checked before \
             loading any weights; nothing was written):\n  {}\n  to fit: a larger \
             --memory-budget, more GPUs in --devices, fewer --frames or a smaller \
             --height/--width; or --no-memory-check to run anyway",
            over.join("\n  ")
        );
    }
    match fit {
        Ok(notes) => {
            eprintln!("    {}", notes.join("; "));
            Ok(Some((
                (plan, readings.into_inner().unwrap()),
                choice.schedule,
            )))
        }
        Err(short) => {
            let texts: Vec<String> = short.into_iter().map(|s| s.text).collect();
            bail!(
                "the memory plan does not fit (checked before loading any weights; nothing was \
                 written):\n  {}",
                texts.join("\n  ")
            )
        }
    }
}

/// The plan's ranks of a job of `world` logical ranks of which this process holds `devices`, from
/// logical rank `first`: the other processes' ranks (planned by their own processes; the dry run
/// runs them for their exchanges with these) are placeholders on [`Device::Meta`] in this
/// process's dtype.
pub fn plan_ranks(
    devices: &[Device],
    world: usize,
    first: usize,
    dtype: DTypeArg,
) -> Vec<(Device, DType)> {
    let here = dtype_of(devices[0], dtype);
    (0..world)
        .map(
            |r| match r.checked_sub(first).and_then(|i| devices.get(i)) {
                Some(&d) => (d, dtype_of(d, dtype)),
                None => (Device::Meta, here),
            },
        )
        .collect()
}

/// A process of a job whose agreed schedule (`job`, the merge of every process's choice) is more
/// constrained than its own choice (`mine`): re-plans its ranks under it and says so; an error
/// when it does not fit this process's budget (a more constrained schedule needing more memory:
/// not seen, but checked). Nothing to do without a plan (`planned`: false, e.g.
/// `--no-memory-check`).
fn replan_for_job(
    model: &str,
    parts: &PartArgs,
    req: &PlanRequest,
    mem: &MemoryArgs,
    mine: Schedule,
    job: Schedule,
    planned: bool,
) -> Result<()> {
    if job == mine || !planned {
        return Ok(());
    }
    let Some(models) = plan_models(model, parts)? else {
        return Ok(());
    };
    let budget_of = |d: Device| mem.budget(d);
    let (plan, fits) = memory_plan::plan_fits(&models, req, job, &budget_of)?;
    let worst = plan
        .devices
        .iter()
        .max_by_key(|d| memory_plan::device_need(&plan, d))
        .expect("a plan has a device");
    let need = memory_plan::device_need(&plan, worst);
    ensure!(
        fits,
        "the job's schedule ({job}, the most constrained of its processes' choices) does not \
         fit this process's budget: {} on {} ({})",
        memory_plan::fmt_bytes(need),
        memory_plan::device_name(worst.device),
        worst.describe()
    );
    stage(
        "schedule",
        format!(
            "the job's: {job} (another process needs it; this one chose {mine}): planned peak \
             {} on {}",
            memory_plan::fmt_bytes(need),
            memory_plan::device_name(worst.device)
        ),
    );
    Ok(())
}

/// [`replan_for_job`] for `bench`, whose budget is `--assume-free-memory` alone (`schedules`:
/// this process's choice and the job's).
pub fn replan_assuming_free(
    model: &str,
    parts: &PartArgs,
    req: &PlanRequest,
    assume_free: Option<u64>,
    (mine, job): (Schedule, Schedule),
    planned: bool,
) -> Result<()> {
    let mem = MemoryArgs {
        assume_free,
        device_memory: None,
        budget: None,
        plan_only: false,
        devices: &[],
        pinned: None,
    };
    replan_for_job(model, parts, req, &mem, mine, job, planned)
}

/// `4 ranks on cpu`, `8 ranks on cuda:0..7`, ...
pub fn describe_ranks(ranks: &[Device]) -> String {
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for d in ranks {
        let name = match d {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(i) => format!("cuda:{i}"),
            Device::Meta => "meta".to_string(),
        };
        *per.entry(name).or_default() += 1;
    }
    let parts: Vec<String> = per.iter().map(|(d, n)| format!("{n}x {d}")).collect();
    format!(
        "{} rank{} ({})",
        ranks.len(),
        if ranks.len() == 1 { "" } else { "s" },
        parts.join(", ")
    )
}

//! `bench`: time the clip-parallel denoising loop alone (text encoder once, no VAE, no output):
//! per-step wall time over all ranks and the resulting frame throughput. It runs
//! `pipeline::generate` without decoding, so every rank runs the generation's own rank loop
//! (`vi_model::rank_loop::run_rank`); the step times come from its per-step events.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use vi_model::distributed::split_frames;
use vi_model::memory_plan::PlanRequest;
use vi_model::pipeline::{self, Event, GenerateRequest};

use crate::cli::BenchArgs;
use crate::devices::{check_available, parse_devices};
use crate::generate::{describe_ranks, load_models, plan_and_check, sampler_kind, vi_config};

pub fn run(a: BenchArgs) -> Result<()> {
    let tiny = a.model == "tiny";
    crate::flags::check_bench(&a)?;
    let ranks = parse_devices(&a.devices)?;
    check_available(&ranks)?;
    let world = ranks.len();
    let tiny = tiny || crate::generate::is_tiny_folder(&a.model, &crate::cli::PartArgs::default());
    let frames = a.frames.unwrap_or(world * if tiny { 16 } else { 24 });
    ensure!(
        frames >= world,
        "--frames {frames} is fewer than the {world} ranks: every rank needs a frame"
    );
    let height = a.height.unwrap_or(if tiny { 64 } else { 320 });
    let width = a.width.unwrap_or(if tiny { 64 } else { 512 });
    let total_steps = a.warmup + a.steps;
    let parts = crate::cli::PartArgs::default();
    // Planned like `generate` (no decoding, one prompt), before any weight is loaded.
    let plan_req = PlanRequest {
        ranks: ranks
            .iter()
            .map(|&d| (d, crate::generate::dtype_of(d, a.dtype)))
            .collect(),
        frames,
        height,
        width,
        steps: total_steps,
        sampler: sampler_kind(a.sampler),
        vi: vi_config(&a.vi),
        vae_chunk: 1,
        decode: false,
        prompts: 1,
    };
    plan_and_check(
        &a.model,
        &parts,
        &plan_req,
        a.assume_free_memory,
        a.no_memory_check,
    )?;
    let t = Instant::now();
    let (models, rank_model) = load_models(&a.model, &parts, &ranks, a.dtype)?;
    eprintln!(
        "loaded {} on {} in {:.1} s",
        a.model,
        describe_ranks(&ranks),
        t.elapsed().as_secs_f64()
    );
    let req = GenerateRequest {
        prompts: vec![(0, "a benchmark".to_string())],
        negative_prompt: String::new(),
        frames,
        height,
        width,
        steps: total_steps,
        sampler: sampler_kind(a.sampler),
        guidance: 12.0,
        fps_cond: 24.0,
        seed: 0,
        vi: vi_config(&a.vi),
        world,
        rank_timeout: Duration::from_secs(600),
        vae_chunk: 1,
        decode: false,
    };
    let marks: Mutex<Vec<Instant>> = Mutex::new(Vec::new());
    let progress = |e: Event| match e {
        Event::TextEncoded { .. } | Event::Step { rank: 0, .. } => {
            marks.lock().unwrap().push(Instant::now());
        }
        Event::Step { .. } | Event::Decoded { .. } | Event::Written { .. } => {}
    };
    let models_of = |r: usize| &models[rank_model[r]];
    pipeline::generate(&models_of, &req, &progress)?;
    let marks = marks.into_inner().unwrap();
    // marks[0]: text encoded; marks[k+1]: rank 0 finished step k.
    let step_times: Vec<f64> = marks
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let timed = &step_times[a.warmup.min(step_times.len())..];
    let mut sorted = timed.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let mean = timed.iter().sum::<f64>() / timed.len() as f64;
    let clips = split_frames(frames, world)?;
    let per_rank: Vec<usize> = clips.iter().map(|c| c.len()).collect();
    say!(
        "bench: {frames} frames {width}x{height} (latent {}x{}) on {}, frames per rank \
         {per_rank:?}, {:?}, CFG batch 2",
        height / models[0].vae_scale(),
        width / models[0].vae_scale(),
        describe_ranks(&ranks),
        a.sampler
    );
    for (k, s) in step_times.iter().enumerate() {
        say!(
            "  step {k:>3}: {s:.3} s{}",
            if k < a.warmup { " (warm-up)" } else { "" }
        );
    }
    say!(
        "bench: denoising step median {median:.3} s, mean {mean:.3} s over {} timed steps; \
         {:.2} video frames per second per step (frames / step time)",
        timed.len(),
        frames as f64 / median
    );
    Ok(())
}

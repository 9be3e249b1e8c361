//! `bench`: time the clip-parallel denoising loop alone (text encoder once, no VAE, no output):
//! per-step wall time over all ranks and the resulting frame throughput. It runs
//! `pipeline::generate` without decoding, so every rank runs the generation's own rank loop
//! (`vi_model::rank_loop::run_rank`); the step times come from its per-step events.
//!
//! Under a launcher's variables it is one process of a multi-process bench (as `generate`:
//! `crate::multiprocess`), and the process holding rank 0 reports. `--processes` runs the same
//! bench as W processes on this machine through `launch` (ranks exchange over TCP on 127.0.0.1),
//! to compare with W in-process ranks: the cost of the process data plane.
//!
//! `--comm-delay` (in-process ranks) times both exchange schedules (overlapped, synchronous),
//! each without and with the injected delay, interleaved over `--rounds` rounds, and prints how
//! much step time the delay adds to each (the comm share of a step), and per configuration the
//! exchanges per rank and step and the time a rank spent blocked waiting for them, in all and
//! per exchange site (conv halo, attention halo, global tokens, norm statistics) and latent level.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::ValueEnum;
use vi_model::clip_parallel::{exchange_tally, ExchangeSite, ExchangeTally, ViConfig};
use vi_model::distributed::split_frames;
use vi_model::memory_plan::PlanRequest;
use vi_model::pipeline::{self, Event, GenerateRequest};
use vi_runtime::comm::{CommChoice, CommDelay, WorldEnv};

use crate::cli::{BenchArgs, PartArgs};
use crate::devices::{check_available, parse_devices};
use crate::generate::{
    describe_ranks, dtype_of, load_models, plan_and_check, sampler_kind, vi_config,
};
use crate::multiprocess::{self, Placement, DEFAULT_RANK_TIMEOUT};

pub fn run(a: BenchArgs) -> Result<()> {
    let tiny = a.model == "tiny";
    crate::flags::check_bench(&a)?;
    let world_env = WorldEnv::from_env()?;
    let comm_delay = a
        .comm_delay
        .as_deref()
        .map(|spec| CommDelay::parse(spec).with_context(|| format!("--comm-delay {spec}")))
        .transpose()?;
    ensure!(
        comm_delay.is_none() || (!a.processes && world_env.is_none()),
        "--comm-delay times in-process ranks: not with --processes or under a launcher"
    );
    if a.processes {
        ensure!(
            world_env.is_none(),
            "bench --processes starts its own processes: run it outside a launcher"
        );
        return run_as_processes(&a);
    }
    let node_devices = parse_devices(&a.devices)?;
    let place = match &world_env {
        Some(env) => Some(Placement::new(&node_devices, &a.devices, env)?),
        None => None,
    };
    let ranks = match &place {
        Some(p) => p.devices.clone(),
        None => node_devices,
    };
    check_available(&ranks)?;
    if place.is_none() {
        let nccl = vi_runtime::comm::nccl_in_process(&ranks, a.comm)?;
        eprintln!(
            "bench: data plane {}",
            if nccl { "NCCL" } else { "host (in-process)" }
        );
    }
    let world = place.as_ref().map_or(ranks.len(), |p| p.world);
    let first = place.as_ref().map_or(0, |p| p.first);
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
        ranks: crate::generate::plan_ranks(&ranks, world, first, a.dtype),
        local: first..first + ranks.len(),
        frames,
        height,
        width,
        steps: total_steps,
        sampler: sampler_kind(a.sampler),
        vi: vi_config(&a.vi),
        vae_chunk: 1,
        decode: false,
        prompts: 1,
        schedule: vi_model::schedule::Schedule::UNCONSTRAINED,
    };
    let schedule = plan_and_check(
        &a.model,
        &parts,
        &plan_req,
        a.assume_free_memory,
        a.no_memory_check,
    )?
    .map(|(_, s)| s);
    let planned = schedule.is_some();
    let schedule = schedule.unwrap_or(vi_model::schedule::Schedule::UNCONSTRAINED);
    let t = Instant::now();
    let (models, rank_model) = load_models(&a.model, &parts, &ranks, a.dtype)?;
    eprintln!(
        "loaded {} on {} in {:.1} s",
        a.model,
        describe_ranks(&ranks),
        t.elapsed().as_secs_f64()
    );
    let mut req = GenerateRequest {
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
        rank_timeout: DEFAULT_RANK_TIMEOUT,
        comm: a.comm,
        vae_chunk: 1,
        decode: false,
        schedule,
        // A spill file (if the schedule offloads on the CPU) in the system temp dir.
        offload_dir: None,
    };
    // Models by logical rank (rank_model: by this process's ranks).
    let models_of = |r: usize| &models[rank_model[r - first]];
    if let Some(delay) = comm_delay {
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
        return compare_schedules(&a, &models_of, &req, delay);
    }
    let marks: Mutex<Vec<Instant>> = Mutex::new(Vec::new());
    let progress = |e: Event| match e {
        Event::TextEncoded { .. } | Event::Step { rank: 0, .. } => {
            marks.lock().unwrap().push(Instant::now());
        }
        Event::Step { .. }
        | Event::Decoded { .. }
        | Event::Written { .. }
        | Event::Checkpointed(_) => {}
    };
    match (world_env, &place) {
        (Some(env), Some(place)) => {
            let replan = |job_schedule| {
                crate::generate::replan_assuming_free(
                    &a.model,
                    &parts,
                    &plan_req,
                    a.assume_free_memory,
                    (schedule, job_schedule),
                    planned,
                )
            };
            let job = multiprocess::rendezvous(
                env,
                place,
                DEFAULT_RANK_TIMEOUT,
                &mut req,
                &replan,
                &a.model,
                &PartArgs::default(),
                dtype_of(ranks[0], a.dtype),
            )?;
            job.run(place, &models_of, &req, None, &progress, None)?;
            job.finish(world)?;
            if first != 0 {
                // The process holding rank 0 reports.
                return Ok(());
            }
        }
        _ => {
            pipeline::generate(&models_of, &req, &progress)?;
        }
    }
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
        match &place {
            Some(p) => format!(
                "{world} processes of {} (ranks over TCP)",
                describe_ranks(&p.devices)
            ),
            None => describe_ranks(&ranks),
        },
        a.sampler
    );
    for (k, s) in step_times.iter().enumerate() {
        say!(
            "  step {k:>3}: {s:.3} s{}",
            if k < a.warmup { " (warm-up)" } else { "" }
        );
    }
    say!(
        "bench: denoising step median {median:.3} s, mean {mean:.3} s over {} timed steps \
         ({} schedule); {:.2} video frames per second per step (frames / step time)",
        timed.len(),
        if req.vi.overlap {
            "overlapped"
        } else {
            "synchronous"
        },
        frames as f64 / median
    );
    Ok(())
}

/// `bench --comm-delay`: both schedules, without and with the injected delay, interleaved over
/// `a.rounds` rounds (so that a change of background load hits every configuration alike); per
/// configuration, the median of all its timed steps.
fn compare_schedules<'m>(
    a: &BenchArgs,
    models_of: &(dyn Fn(usize) -> &'m vi_model::models::Models + Sync),
    req: &GenerateRequest,
    delay: CommDelay,
) -> Result<()> {
    // Rank 0's timed step times of one run, and the run's exchange tally (every rank, every
    // step, warm-up included).
    let time_run = |vi: ViConfig| -> Result<(Vec<f64>, ExchangeTally)> {
        let before = exchange_tally();
        let marks: Mutex<Vec<Instant>> = Mutex::new(Vec::new());
        let progress = |e: Event| match e {
            Event::TextEncoded { .. } | Event::Step { rank: 0, .. } => {
                marks.lock().unwrap().push(Instant::now());
            }
            Event::Step { .. }
            | Event::Decoded { .. }
            | Event::Written { .. }
            | Event::Checkpointed(_) => {}
        };
        let run_req = GenerateRequest { vi, ..req.clone() };
        pipeline::generate(models_of, &run_req, &progress)?;
        let after = exchange_tally();
        let marks = marks.into_inner().unwrap();
        // marks[0]: text encoded; marks[k+1]: rank 0 finished step k.
        let times: Vec<f64> = marks
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        let tally = after.since(&before);
        Ok((times[a.warmup.min(times.len())..].to_vec(), tally))
    };
    say!(
        "bench: injected delay {delay} (every clip-parallel message), {} rounds of the 4 runs",
        a.rounds.max(1)
    );
    // [schedule: overlapped, synchronous][no delay, delay]
    let mut steps = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    let mut tallies: [[ExchangeTally; 2]; 2] = Default::default();
    let mut runs = 0usize;
    for _ in 0..a.rounds.max(1) {
        for (si, overlap) in [true, false].into_iter().enumerate() {
            for (di, d) in [None, Some(delay)].into_iter().enumerate() {
                let vi = ViConfig {
                    overlap,
                    comm_delay: d,
                    ..req.vi.clone()
                };
                let (times, tally) = time_run(vi)?;
                steps[si][di].extend(times);
                tallies[si][di].add(&tally);
            }
        }
        runs += 1;
    }
    // Per rank and step (warm-up included: its exchanges are the same).
    let rank_steps = (runs * req.world * req.steps) as f64;
    let mut median = [[0.0f64; 2]; 2];
    for si in 0..2 {
        for di in 0..2 {
            let mut sorted = steps[si][di].clone();
            sorted.sort_by(f64::total_cmp);
            let m = sorted[sorted.len() / 2];
            let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
            median[si][di] = m;
            let t = tallies[si][di].total();
            let blocked = t.blocked.as_secs_f64() / rank_steps;
            say!(
                "  {:<12} {:<10} step median {m:.3} s, mean {mean:.3} s over {} timed steps; \
                 {:.0} exchanges per rank and step, blocked waiting for them {:.1} ms ({:.1} % \
                 of the mean step)",
                if si == 0 { "overlapped" } else { "synchronous" },
                if di == 1 { "delayed" } else { "no delay" },
                sorted.len(),
                t.calls as f64 / rank_steps,
                blocked * 1e3,
                blocked / mean * 100.0
            );
        }
    }
    let grow = |si: usize| median[si][1] - median[si][0];
    let share = |si: usize| (grow(si) / median[si][1]).max(0.0) * 100.0;
    say!(
        "bench: comm share of a delayed step (step time added by the delay / delayed step): \
         synchronous {:.1} %, overlapped {:.1} %",
        share(1),
        share(0)
    );
    say!(
        "bench: the delay adds {:.3} s per step to the synchronous schedule and {:.3} s to the \
         overlapped one: {:.0} % of the synchronous growth (bar: at most 20 %)",
        grow(1),
        grow(0),
        if grow(1) > 0.0 {
            grow(0) / grow(1) * 100.0
        } else {
            f64::NAN
        }
    );
    // The same comparison on the time blocked in the exchanges' waits (less exposed to the
    // step-to-step noise of a loaded machine, but it counts waiting for a slower peer too).
    let blocked = |si: usize, di: usize| tallies[si][di].total().blocked.as_secs_f64() / rank_steps;
    let bgrow = |si: usize| blocked(si, 1) - blocked(si, 0);
    say!(
        "bench: the delay adds {:.1} ms per rank and step of waiting for exchanges to the \
         synchronous schedule and {:.1} ms to the overlapped one: {:.0} %",
        bgrow(1) * 1e3,
        bgrow(0) * 1e3,
        if bgrow(1) > 0.0 {
            bgrow(0) / bgrow(1) * 100.0
        } else {
            f64::NAN
        }
    );
    say_site_breakdown(&tallies, rank_steps);
    Ok(())
}

/// Per exchange site (and per latent level: rows = batch x spatial positions of the layer), the
/// exchanges per rank and step and the waiting time per rank and step of the four runs, and the
/// delay's growth of the waiting per schedule: where the overlapped schedule's exposure is.
fn say_site_breakdown(tallies: &[[ExchangeTally; 2]; 2], rank_steps: f64) {
    let mut keys: Vec<(ExchangeSite, usize)> = Vec::new();
    for t in tallies.iter().flatten() {
        keys.extend(t.by_site.keys().copied());
    }
    keys.sort();
    keys.dedup();
    let ms = |si: usize, di: usize, k: &(ExchangeSite, usize)| {
        tallies[si][di]
            .by_site
            .get(k)
            .map_or(0.0, |t| t.blocked.as_secs_f64() / rank_steps * 1e3)
    };
    let calls = |si: usize, k: &(ExchangeSite, usize)| {
        tallies[si][1]
            .by_site
            .get(k)
            .map_or(0.0, |t| t.calls as f64 / rank_steps)
    };
    say!(
        "bench: waiting per rank and step by exchange site (rows = batch x latent positions), \
         ms: overlapped no delay / delayed, synchronous no delay / delayed; growth overlapped / \
         synchronous"
    );
    let line = |label: String, ov: [f64; 2], sy: [f64; 2], n: [f64; 2]| {
        let (go, gs) = (ov[1] - ov[0], sy[1] - sy[0]);
        say!(
            "  {label:<28} {:>4.0} / {:>4.0} exchanges  {:>7.1} / {:>7.1}  {:>7.1} / {:>7.1}  \
             growth {:>6.1} / {:>6.1} ms = {}",
            n[0],
            n[1],
            ov[0],
            ov[1],
            sy[0],
            sy[1],
            go,
            gs,
            if gs > 0.0 {
                format!("{:.0} %", go / gs * 100.0)
            } else {
                "-".into()
            }
        );
    };
    let sites: Vec<ExchangeSite> = {
        let mut v: Vec<ExchangeSite> = keys.iter().map(|k| k.0).collect();
        v.dedup();
        v
    };
    for site in sites {
        let mut sum = [[0.0f64; 2]; 2];
        let mut n = [0.0f64; 2];
        for k in keys.iter().filter(|k| k.0 == site) {
            let (ov, sy) = ([ms(0, 0, k), ms(0, 1, k)], [ms(1, 0, k), ms(1, 1, k)]);
            for di in 0..2 {
                sum[0][di] += ov[di];
                sum[1][di] += sy[di];
            }
            let c = [calls(0, k), calls(1, k)];
            n[0] += c[0];
            n[1] += c[1];
            let rows = if k.1 == 0 {
                "?".to_string()
            } else {
                k.1.to_string()
            };
            line(format!("{} rows {rows}", site.name()), ov, sy, c);
        }
        line(format!("{} (all)", site.name()), sum[0], sum[1], n);
    }
}

/// `bench --processes`: this bench as W processes through `launch` on this machine (W: the ranks
/// of `--devices`, split over the processes as `generate` does). Rank 0's report is printed with
/// the launcher's `[rank 0]` prefix.
fn run_as_processes(a: &BenchArgs) -> Result<()> {
    let world = parse_devices(&a.devices)?.len();
    let name = |v: &dyn Fn() -> Option<clap::builder::PossibleValue>| {
        v().expect("every value has a name").get_name().to_string()
    };
    let mut args: Vec<String> = vec![
        "launch".into(),
        "--nproc-per-node".into(),
        world.to_string(),
        "--master-port".into(),
        "0".into(),
        "--".into(),
        "bench".into(),
        "--model".into(),
        a.model.clone(),
        "--devices".into(),
        a.devices.clone(),
        "--steps".into(),
        a.steps.to_string(),
        "--warmup".into(),
        a.warmup.to_string(),
        "--sampler".into(),
        name(&|| a.sampler.to_possible_value()),
        "--dtype".into(),
        name(&|| a.dtype.to_possible_value()),
    ];
    for (flag, v) in [
        ("--frames", a.frames),
        ("--height", a.height),
        ("--width", a.width),
    ] {
        if let Some(v) = v {
            args.extend([flag.to_string(), v.to_string()]);
        }
    }
    if a.no_memory_check {
        args.push("--no-memory-check".into());
    }
    let comm = match a.comm {
        CommChoice::Auto => "auto",
        CommChoice::Host => "host",
        CommChoice::Nccl => "nccl",
    };
    args.extend(["--comm".to_string(), comm.to_string()]);
    if let Some(b) = a.assume_free_memory {
        args.extend(["--assume-free-memory".to_string(), b.to_string()]);
    }
    args.extend(crate::generate::vi_cli_args(&a.vi));
    let exe = std::env::current_exe().context("cannot find this executable")?;
    eprintln!("bench: {world} ranks as {world} processes (launch, TCP over 127.0.0.1)");
    let status = std::process::Command::new(&exe)
        .args(&args)
        .status()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    ensure!(
        status.success(),
        "the multi-process bench failed ({status})"
    );
    Ok(())
}

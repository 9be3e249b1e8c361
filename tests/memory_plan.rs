//! The memory plan (docs/design.md section 7): the shape-only dry run counts exactly the tensor
//! bytes a real CPU run allocates; the planner's numbers are consistent; `generate` refuses a plan
//! that does not fit before loading any weights, writes nothing, and `--no-memory-check` skips it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vi_model::clip_parallel::ViConfig;
use vi_model::distributed::{run_ranks, split_frames};
use vi_model::frame_flow::FRAMES_IN_FLIGHT;
use vi_model::memory_plan::{
    check_fit, choose_schedule, device_need, fmt_bytes, measure_rank, plan, plan_fits, Margin,
    MemoryPlan, MetaModels, PlanModels, PlanRequest, RankPeaks, RechargingComm,
};
use vi_model::models::PartKind;
use vi_model::params::param_dtype;
use vi_model::pipeline::{frame_noise, generate, GenerateRequest};
use vi_model::rank_loop::{run_rank, RankHooks, RankInputs, RankJob, RankModels, StepDone};
use vi_model::sampler::{Sampler, SamplerKind};
use vi_model::schedule::{DeviceTurn, Schedule};
use vi_model::temporal::LocalContext;
use vi_model::{random_full, tiny};
use vi_runtime::offload::Tier;
use vi_runtime::{meta, DType, Device, Tensor};

/// Heap bytes of the whole process, live and peak (a test-only counting allocator): what the real
/// pipeline takes, scratch buffers and host copies included.
struct Counting;
static HEAP_LIVE: AtomicUsize = AtomicUsize::new(0);
static HEAP_PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = HEAP_LIVE.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            HEAP_PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = HEAP_LIVE.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            HEAP_PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) };
        HEAP_LIVE.fetch_sub(l.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            HEAP_LIVE.fetch_sub(l.size(), Ordering::SeqCst);
            let now = HEAP_LIVE.fetch_add(new, Ordering::SeqCst) + new;
            HEAP_PEAK.fetch_max(now, Ordering::SeqCst);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests of this file run one at a time, so the heap counter sees one test's allocations.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn tiny_models() -> PlanModels {
    PlanModels {
        unet: tiny::unet_config(),
        clip: tiny::clip_config(),
        vae: tiny::vae_config(),
    }
}

fn full_models() -> PlanModels {
    PlanModels {
        unet: random_full::unet_config().unwrap(),
        clip: random_full::clip_config().unwrap(),
        vae: random_full::vae_config().unwrap(),
    }
}

/// One UNet pass, the text encoder and the VAE, real (CPU f32) and on meta tensors: the peaks of
/// live tensor bytes are equal.
#[test]
fn dry_run_peak_equals_real_cpu_peak_single_passes() {
    let _serial = serial();
    let real = tiny::load(Device::Cpu, DType::F32).unwrap();
    let fake = MetaModels::build(&tiny_models(), DType::F32).unwrap();
    let hidden = real.clip.config.hidden_size;
    let (f, h, w) = (5, 8, 8);
    let cases: [(&str, Device); 2] = [("real cpu", Device::Cpu), ("meta", Device::Meta)];
    let mut unet = Vec::new();
    for (what, dev) in cases {
        let u = if dev == Device::Cpu {
            &real.unet
        } else {
            &fake.unet
        };
        let x = Tensor::zeros(&[2, f, h, w, 4], dev, DType::F32).unwrap();
        let ehs = Tensor::zeros(&[2, 77, hidden], dev, DType::F32).unwrap();
        let (y, peak) = meta::measure(|| u.forward(&x, 400.0, 8.0, &ehs, &LocalContext).unwrap());
        assert_eq!(y.shape(), [2, f, h, w, 4]);
        assert_eq!(y.device(), dev);
        eprintln!("UNet pass [2, {f}, {h}, {w}, 4] ({what}): peak {peak} bytes");
        unet.push(peak);
    }
    assert!(unet[0] > 0);
    assert_eq!(unet[0], unet[1], "UNet: real vs dry-run peak");

    let ids = vec![0u32; 77 * 3];
    let (_, clip_real) = meta::measure(|| real.clip.forward(&ids, 3).unwrap());
    let (_, clip_meta) = meta::measure(|| fake.clip.forward(&ids, 3).unwrap());
    eprintln!("text encoder, 3 prompts: real {clip_real}, meta {clip_meta}");
    assert_eq!(clip_real, clip_meta);

    let mut vae = Vec::new();
    for (vd, dev) in [(&real.vae, Device::Cpu), (&fake.vae, Device::Meta)] {
        let lat = Tensor::zeros(&[3, h, w, 4], dev, DType::F32).unwrap();
        let (_, peak) = meta::measure(|| vd.decode_frames(&lat, 2).unwrap());
        vae.push(peak);
    }
    eprintln!(
        "VAE decode 3 frames, chunk 2: real {}, meta {}",
        vae[0], vae[1]
    );
    assert_eq!(vae[0], vae[1]);
}

/// The whole rank loop (sampler steps with CFG over the clip-parallel context, then the chunked
/// VAE decode) over 1 and 3 ranks: each rank's peaks are equal, real vs meta; also with
/// long-lived tensors offloaded (a spill file against the meta tier: each restore is charged
/// where the real run makes it, and the tiers' peaks are equal).
#[test]
fn dry_run_peak_equals_real_cpu_peak_rank_loop() {
    let _serial = serial();
    let real = tiny::load(Device::Cpu, DType::F32).unwrap();
    let fake = MetaModels::build(&tiny_models(), DType::F32).unwrap();
    let text = (77, real.clip.config.hidden_size);
    let vi = ViConfig {
        conv_pad: 2,
        attn_pad: 3,
        top_k: 4,
        ..ViConfig::default()
    };
    let exact = ViConfig {
        exact_seam: true,
        ..vi.clone()
    };
    let offload = Schedule {
        offload: true,
        ..Schedule::UNCONSTRAINED
    };
    let offload_chunked = Schedule {
        frame_chunk: 2,
        sequential_cfg: true,
        offload: true,
        ..Schedule::UNCONSTRAINED
    };
    let spill = tempfile::tempdir().unwrap();
    for (world, frames, cfg, schedule) in [
        (1, 5, &vi, Schedule::UNCONSTRAINED),
        (3, 7, &vi, Schedule::UNCONSTRAINED),
        (2, 6, &exact, Schedule::UNCONSTRAINED),
        (3, 7, &vi, offload),
        (3, 7, &vi, offload_chunked),
        (2, 6, &exact, offload),
    ] {
        let clips = split_frames(frames, world).unwrap();
        let sampler = Sampler::new(SamplerKind::DpmSolverSde, 10).unwrap();
        let run = |m: RankModels, tier: Arc<Tier>| -> Vec<RankPeaks> {
            run_ranks(world, Duration::from_secs(120), |rank, comm| {
                let job = RankJob {
                    sampler: &sampler,
                    steps: 3,
                    clip: clips[rank].clone(),
                    latent: (8, 8),
                    guidance: 7.5,
                    fps_cond: 8.0,
                    vi: cfg,
                    vae_chunk: 2,
                    decode: true,
                    schedule,
                    turn: None,
                    offload_tier: Some(tier.clone()),
                };
                measure_rank(&m, text, &RechargingComm::new(comm), &job)
            })
            .unwrap()
        };
        let real_tier = Tier::spill(spill.path()).unwrap();
        let meta_tier = Tier::meta();
        let r = run(
            RankModels {
                unet: &real.unet,
                vae: &real.vae,
                device: Device::Cpu,
                dtype: DType::F32,
            },
            real_tier.clone(),
        );
        let m = run(fake.rank_models(), meta_tier.clone());
        for rank in 0..world {
            eprintln!(
                "world {world} exact_seam {} {schedule} rank {rank} ({} frames): denoise real {} \
                 meta {}, decode real {} meta {}, parked real {} meta {}",
                cfg.exact_seam,
                clips[rank].len(),
                r[rank].denoise,
                m[rank].denoise,
                r[rank].decode,
                m[rank].decode,
                r[rank].parked,
                m[rank].parked,
            );
            assert!(r[rank].denoise > 0 && r[rank].decode > 0);
            assert_eq!(r[rank].denoise, m[rank].denoise, "rank {rank} denoise");
            assert_eq!(r[rank].decode, m[rank].decode, "rank {rank} decode");
            assert_eq!(r[rank].parked, m[rank].parked, "rank {rank} parked");
        }
        eprintln!(
            "  tier peak real {} meta {}; spill file written {} read {}",
            real_tier.peak(),
            meta_tier.peak(),
            real_tier.written(),
            real_tier.read()
        );
        assert_eq!(real_tier.peak(), meta_tier.peak(), "offloaded peak");
        if schedule.offload {
            assert!(
                real_tier.peak() > 0 && real_tier.read() > 0,
                "nothing offloaded"
            );
        }
    }
    assert_eq!(std::fs::read_dir(spill.path()).unwrap().count(), 0);
}

/// The real pipeline (`pipeline::generate`, 2 CPU ranks, tiny model) takes from the heap, above
/// the loaded models, no more than the plan's activations + decoded frames + the CPU margin's
/// fraction; the plan's tensor activations are most of it.
#[test]
fn real_pipeline_heap_peak_is_within_the_plan() {
    let _serial = serial();
    let models = tiny::load(Device::Cpu, DType::F32).unwrap();
    let (world, frames, hw) = (2, 12, 128);
    let req = GenerateRequest {
        prompts: vec![(0, "a cat".into())],
        negative_prompt: String::new(),
        frames,
        height: hw,
        width: hw,
        steps: 3,
        sampler: SamplerKind::DpmSolverSde,
        guidance: 7.5,
        fps_cond: 24.0,
        seed: 1,
        vi: ViConfig::default(),
        world,
        rank_timeout: Duration::from_secs(300),
        comm: Default::default(),
        vae_chunk: 3,
        decode: true,
        schedule: Schedule::UNCONSTRAINED,
        offload_dir: None,
    };
    let mut preq = request(vec![(Device::Cpu, DType::F32); world], frames, hw, hw);
    preq.steps = req.steps;
    preq.vae_chunk = req.vae_chunk;
    let p = plan(&tiny_models(), &preq).unwrap();
    let d = &p.devices[0];
    let planned = d.activations() + p.host_frames;

    let base = HEAP_LIVE.load(Ordering::SeqCst);
    HEAP_PEAK.store(base, Ordering::SeqCst);
    let out = generate(&|_| &models, &req, &|_| {}).unwrap();
    let real = (HEAP_PEAK.load(Ordering::SeqCst) - base) as u64;
    assert_eq!(out.len(), frames);
    eprintln!(
        "real pipeline heap peak above the models: {} ({real} B); plan: activations {} + \
         frames {} = {} ({planned} B); ratio {:.3}",
        fmt_bytes(real),
        fmt_bytes(d.activations()),
        fmt_bytes(p.host_frames),
        fmt_bytes(planned),
        real as f64 / planned as f64
    );
    // Beyond the tensors, the CPU backend's scratch: an im2col block of at most 8 MiB per
    // running convolution (one per rank at a time), its re-ordered kernel and attention score
    // blocks (small here), the host f32 copy of a decoded chunk. The fit check's CPU margin
    // (512 MiB + 10 %) covers these; here they must stay within 8 MiB per rank + 10 %.
    let scratch = world as u64 * (8 << 20) + planned / 10;
    assert!(
        real <= planned + scratch,
        "real {real} > plan {planned} + scratch allowance {scratch}"
    );
    assert!(
        real <= planned + Margin::CPU.of(planned),
        "the fit check's margin would not cover it"
    );
    assert!(
        real * 10 > planned * 9,
        "the plan is a loose bound: real {real}, plan {planned}"
    );
}

fn request(ranks: Vec<(Device, DType)>, frames: usize, h: usize, w: usize) -> PlanRequest {
    PlanRequest {
        local: 0..ranks.len(),
        ranks,
        frames,
        height: h,
        width: w,
        steps: 30,
        sampler: SamplerKind::DpmSolverSde,
        vi: ViConfig::default(),
        vae_chunk: 4,
        decode: true,
        prompts: 1,
        schedule: Schedule::UNCONSTRAINED,
    }
}

/// Weight bytes of a part from its parameter table (independent of the planner's own count).
fn table_bytes(kind: PartKind, config: &serde_json::Value, dt: DType) -> u64 {
    kind.expected_table(config)
        .unwrap()
        .values()
        .map(|s| (s.iter().product::<usize>() * param_dtype(s, dt).size_in_bytes()) as u64)
        .sum()
}

#[test]
fn planner_numbers_are_consistent() {
    let _serial = serial();
    let cpu = |n: usize| vec![(Device::Cpu, DType::F32); n];
    let p = plan(&tiny_models(), &request(cpu(1), 8, 64, 64)).unwrap();
    let d = &p.devices[0];
    eprintln!("tiny 8 frames 64x64 cpu: {}", d.describe());
    for (kind, json, bytes) in [
        (PartKind::Unet, tiny::unet_config_json(), d.unet_weights),
        (
            PartKind::TextEncoder,
            tiny::clip_config_json(),
            d.text_weights,
        ),
        (PartKind::Vae, tiny::vae_config_json(), d.vae_weights),
    ] {
        assert_eq!(bytes, table_bytes(kind, &json, DType::F32), "{kind:?}");
    }
    assert_eq!(d.conv_relayout, 0, "no re-layout cache on the CPU");
    // One rank: its VAE chunk (4 frames) in RGB8 + the writer's channel and frame in hand.
    assert_eq!(
        p.host_frames,
        (4 + FRAMES_IN_FLIGHT as u64 + 1) * 64 * 64 * 3
    );
    assert_eq!(d.total(), d.weights() + d.activations());

    // More frames, more pixels: more activations; same weights.
    let more_frames = plan(&tiny_models(), &request(cpu(1), 16, 64, 64)).unwrap();
    let bigger = plan(&tiny_models(), &request(cpu(1), 8, 128, 128)).unwrap();
    for q in [&more_frames, &bigger] {
        assert_eq!(q.devices[0].weights(), d.weights());
        assert!(q.devices[0].denoise_peaks[0] > d.denoise_peaks[0]);
        assert!(q.devices[0].activations() > d.activations());
    }
    // Two ranks on one device: both peaks add; each clip is half the video.
    let two = plan(&tiny_models(), &request(cpu(2), 16, 64, 64)).unwrap();
    let t = &two.devices[0];
    assert_eq!(t.ranks, vec![0, 1]);
    assert_eq!(t.rank_frames, vec![8, 8]);
    assert_eq!(
        t.ranks_peak(),
        t.denoise_peaks[0].max(t.decode_peaks[0]) * 2
    );
    assert!(t.activations() > d.activations());
    // Halo frames make a clip's pass larger than the same clip alone.
    assert!(t.denoise_peaks[0] > d.denoise_peaks[0]);

    // bf16 on CUDA: matrices halve, 1-D parameters stay f32, conv kernels are cached re-laid.
    let g = plan(
        &tiny_models(),
        &request(vec![(Device::Cuda(0), DType::BF16)], 8, 64, 64),
    )
    .unwrap();
    let gd = &g.devices[0];
    assert_eq!(
        gd.unet_weights,
        table_bytes(PartKind::Unet, &tiny::unet_config_json(), DType::BF16)
    );
    assert!(gd.unet_weights < d.unet_weights && gd.unet_weights * 2 > d.unet_weights);
    assert!(gd.conv_relayout > 0 && gd.conv_relayout < gd.weights());
}

/// One process of a multi-process job plans its own ranks as the one-process plan of the whole
/// job plans them: the dry run runs every rank, so a rank next to another process's still
/// receives its halos and tokens; the text phase is counted only where rank 0 is.
#[test]
fn a_process_plans_its_ranks_with_their_neighbours_elsewhere() {
    let _serial = serial();
    let cpu = |n: usize| vec![(Device::Cpu, DType::F32); n];
    // 11 frames on 4 ranks: clips of 3, 3, 3, 2; processes of 2 ranks.
    let mut whole = request(cpu(4), 11, 64, 64);
    whole.steps = 2;
    let all = plan(&tiny_models(), &whole).unwrap();
    let a = &all.devices[0];
    for local in [0..2, 2..4, 1..3] {
        let mut req = whole.clone();
        // The other processes' ranks: placeholders, as `generate` gives them.
        for r in (0..4).filter(|r| !local.contains(r)) {
            req.ranks[r].0 = Device::Meta;
        }
        req.local = local.clone();
        let p = plan(&tiny_models(), &req).unwrap();
        assert_eq!(p.devices.len(), 1, "{local:?}: only this process's device");
        let d = &p.devices[0];
        assert_eq!(d.ranks, local.clone().collect::<Vec<_>>());
        assert_eq!(
            d.rank_frames,
            local.clone().map(|r| [3, 3, 3, 2][r]).collect::<Vec<_>>()
        );
        for (i, r) in local.clone().enumerate() {
            assert_eq!(
                d.denoise_peaks[i], a.denoise_peaks[r],
                "{local:?}: rank {r}"
            );
            assert_eq!(d.decode_peaks[i], a.decode_peaks[r], "{local:?}: rank {r}");
            assert_eq!(d.parked[i], a.parked[r], "{local:?}: rank {r}");
        }
        assert_eq!(d.text_peak > 0, local.start == 0, "{local:?}");
        assert!(
            p.host_frames > 0 && p.host_frames < all.host_frames,
            "{local:?}"
        );
    }
    let mut bad = whole.clone();
    bad.local = 3..5;
    let e = plan(&tiny_models(), &bad).unwrap_err().to_string();
    assert!(e.contains("3..5") && e.contains("4 ranks"), "{e}");
}

#[test]
fn full_size_plan_320x512() {
    let _serial = serial();
    let t0 = std::time::Instant::now();
    let one = plan(
        &full_models(),
        &request(vec![(Device::Cuda(0), DType::BF16)], 16, 320, 512),
    )
    .unwrap();
    eprintln!(
        "random-full 16 frames 320x512 bf16, 1 rank: {} (planned in {:.2?})",
        one.devices[0].describe(),
        t0.elapsed()
    );
    let d = &one.devices[0];
    for (kind, json, bytes) in [
        (
            PartKind::Unet,
            random_full::unet_config_json(),
            d.unet_weights,
        ),
        (
            PartKind::TextEncoder,
            random_full::clip_config_json(),
            d.text_weights,
        ),
        (PartKind::Vae, random_full::vae_config_json(), d.vae_weights),
    ] {
        assert_eq!(bytes, table_bytes(kind, &json, DType::BF16), "{kind:?}");
    }
    let two = plan(
        &full_models(),
        &request(vec![(Device::Cuda(0), DType::BF16); 2], 16, 320, 512),
    )
    .unwrap();
    eprintln!(
        "random-full 16 frames 320x512 bf16, 2 ranks on one GPU: {}",
        two.devices[0].describe()
    );
    let eight = plan(
        &full_models(),
        &request(
            (0..8).map(|i| (Device::Cuda(i), DType::BF16)).collect(),
            192,
            320,
            512,
        ),
    )
    .unwrap();
    eprintln!(
        "random-full 192 frames 320x512 bf16, 8 GPUs: {}",
        eight.devices[1].describe()
    );
    // An 80 GB card: one rank of 16 frames fits; the check says so.
    let fits = check_fit(
        &one,
        &request(vec![(Device::Cuda(0), DType::BF16)], 16, 320, 512),
        &|d| Ok(Some(if d == Device::Cpu { 64 << 30 } else { 79 << 30 })),
    );
    assert!(fits.is_ok(), "{fits:?}");
    let _ = fmt_bytes(0);
}

#[test]
fn check_fit_explains_a_shortfall() {
    let _serial = serial();
    let req = request(vec![(Device::Cuda(0), DType::BF16); 2], 32, 320, 512);
    let p: MemoryPlan = plan(&full_models(), &req).unwrap();
    let short = check_fit(&p, &req, &|d| {
        Ok(Some(if d == Device::Cpu { 64 << 30 } else { 2 << 30 }))
    })
    .unwrap_err();
    assert_eq!(short.len(), 1);
    let text = &short[0].text;
    eprintln!("{text}");
    assert!(
        text.contains("cuda:0") && text.contains("only 2.00 GiB is free"),
        "{text}"
    );
    assert!(text.contains("fewer ranks per device"), "{text}");
    assert!(text.contains("--devices"), "{text}");
    assert!(text.contains("--no-memory-check"), "{text}");
}

fn run(args: &[&str]) -> Result<(), video_infinity::Error> {
    let mut v = vec!["video-infinity"];
    v.extend_from_slice(args);
    video_infinity::run(v)
}

fn err(args: &[&str]) -> String {
    match run(args) {
        Ok(()) => panic!("expected an error from {args:?}"),
        Err(e) => format!("{e:#}"),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A request far beyond any machine's memory (on the real MemAvailable) fails fast with the
/// device, need vs free and what to change, and writes nothing.
#[test]
fn generate_refuses_a_plan_that_cannot_fit_this_machine() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("huge.mp4");
    let frames = t.path().join("frames");
    let t0 = std::time::Instant::now();
    let e = err(&[
        "generate",
        "--model",
        "tiny",
        "--devices",
        "cpu:2",
        "--frames",
        "256",
        "--height",
        "16384",
        "--width",
        "16384",
        "--steps",
        "1",
        "--quiet",
        "--out",
        s(&out),
        "--frames-dir",
        s(&frames),
    ]);
    let el = t0.elapsed();
    eprintln!("{e}\n(refused in {el:.2?})");
    assert!(e.contains("memory plan does not fit"), "{e}");
    assert!(
        e.contains("host memory (cpu)") && e.contains("is free"),
        "{e}"
    );
    assert!(e.contains("denoising step") && e.contains("weights"), "{e}");
    assert!(e.contains("decoded frames kept in host memory"), "{e}");
    assert!(
        e.contains("fewer ranks per device") && e.contains("--frames"),
        "{e}"
    );
    assert!(e.contains("--no-memory-check"), "{e}");
    assert!(el < Duration::from_secs(60), "not fast: {el:?}");
    assert!(!out.exists() && !frames.exists());
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// An offloading schedule on CPU ranks needs a spill directory that takes files: a missing one
/// is refused before any weight is loaded or frame written, naming the flag and the directory.
#[test]
fn an_unusable_offload_dir_is_refused_up_front() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let frames_dir = t.path().join("frames");
    let missing = t.path().join("no-such-dir");
    let e = err(&[
        "generate",
        "--model",
        "tiny",
        "--devices",
        "cpu:2",
        "--frames",
        "4",
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "1",
        "--quiet",
        "--schedule",
        "chunk=1,sequential-cfg,turns,offload",
        "--offload-dir",
        s(&missing),
        "--frames-dir",
        s(&frames_dir),
    ]);
    assert!(
        e.contains("--offload-dir") && e.contains("no-such-dir"),
        "{e}"
    );
    assert!(!frames_dir.exists(), "frames written before the check");
}

/// The check runs before any weight is read: a model folder with a truncated UNet file fails on
/// memory (pretending 1 MB free), not on the weights; with --no-memory-check the weights error
/// comes. And --no-memory-check lets a small tiny run go through whatever the free memory.
#[test]
fn memory_check_runs_before_loading_and_can_be_skipped() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("model");
    run(&["write-tiny", s(&model)]).unwrap();
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    assert!(unet.is_file(), "{unet:?}");
    let data = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &data[..data.len() / 2]).unwrap();
    let out = t.path().join("v.mp4");
    let base = [
        "generate",
        "--model",
        s(&model),
        "--frames",
        "2",
        "--steps",
        "1",
        "--quiet",
        "--prompt",
        "a cat",
        "--out",
        s(&out),
    ];
    let mut a = base.to_vec();
    a.extend(["--assume-free-memory", "1000000"]);
    let e = err(&a);
    assert!(e.contains("memory plan does not fit"), "{e}");
    assert!(e.contains("only 976.6 KiB is free"), "{e}");
    assert!(!out.exists());
    a.push("--no-memory-check");
    let e = err(&a);
    assert!(!e.contains("memory plan"), "{e}");
    assert!(e.contains("safetensors") || e.contains("unet"), "{e}");
    assert!(!out.exists());

    // The tiny model with 1 MB "free": refused; with --no-memory-check: generated.
    let tiny = [
        "generate",
        "--model",
        "tiny",
        "--frames",
        "2",
        "--steps",
        "1",
        "--quiet",
        "--out",
        s(&out),
        "--assume-free-memory",
        "1000000",
    ];
    let e = err(&tiny);
    assert!(e.contains("memory plan does not fit"), "{e}");
    assert!(!out.exists());
    let mut ok = tiny.to_vec();
    ok.push("--no-memory-check");
    run(&ok).unwrap();
    assert!(out.is_file());
    // And a plain small run passes the real check.
    let out2 = t.path().join("w.mp4");
    run(&[
        "generate",
        "--model",
        "tiny",
        "--frames",
        "2",
        "--steps",
        "1",
        "--quiet",
        "--out",
        s(&out2),
        "--vae-chunk",
        "1",
    ])
    .unwrap();
    assert!(out2.is_file());
}

// ---------------------------------------------------------------- bounded-memory schedules

/// Seeded inputs of the schedule tests: random conditioning rows, per-frame noise.
struct SeededTestInputs {
    cond: Tensor,
    seed: u64,
}

impl RankInputs for SeededTestInputs {
    fn conditioning(&self, device: Device, dtype: DType) -> vi_model::params::Result<Tensor> {
        Ok(self.cond.to_device(device)?.to_dtype(dtype)?)
    }
    fn noise(
        &self,
        draw: u64,
        clip: &std::ops::Range<usize>,
        shape: &[usize],
        device: Device,
    ) -> vi_model::params::Result<Tensor> {
        let v = frame_noise(self.seed, draw, clip.clone(), shape[2], shape[3], shape[4]);
        Ok(Tensor::from_vec(v, shape)?.to_device(device)?)
    }
}

/// What a rank produced, as bits: its latents after every step and its decoded images (all its
/// frames in order, whatever the VAE's chunks), and how many VAE chunks.
#[derive(Default)]
struct CaptureBits {
    latents: RefCell<Vec<Vec<u32>>>,
    images: RefCell<Vec<u32>>,
    chunks: Cell<usize>,
}

fn bits_of(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

impl RankHooks for CaptureBits {
    fn step(&self, done: &StepDone<'_>) -> vi_model::params::Result<()> {
        self.latents.borrow_mut().push(bits_of(done.latents));
        Ok(())
    }
    fn frames(&self, _first: usize, images: Tensor) -> vi_model::params::Result<()> {
        self.images.borrow_mut().extend(bits_of(&images));
        self.chunks.set(self.chunks.get() + 1);
        Ok(())
    }
}

/// (latents after every step, decoded images, VAE chunks).
type RankBits = (Vec<Vec<u32>>, Vec<u32>, usize);

/// The rank loop of every rank of a `world`-rank group on the CPU under `schedule` (ranks take
/// turns on one shared turn when the schedule says so): each rank's latents after every step and
/// its decoded images, as bits.
fn run_schedule(
    models: &vi_model::models::Models,
    world: usize,
    frames: usize,
    vi: &ViConfig,
    schedule: Schedule,
) -> Vec<RankBits> {
    let clips = split_frames(frames, world).unwrap();
    let sampler = Sampler::new(SamplerKind::DpmSolverSde, 10).unwrap();
    let hidden = models.clip.config.hidden_size;
    let cond = Tensor::from_vec(frame_noise(9, 0, 0..1, 2, 77, hidden), &[2, 77, hidden]).unwrap();
    let turn = DeviceTurn::new(Duration::from_secs(120));
    let spill = tempfile::tempdir().unwrap();
    let tier = Tier::spill(spill.path()).unwrap();
    run_ranks(world, Duration::from_secs(120), |rank, comm| {
        let job = RankJob {
            sampler: &sampler,
            steps: 2,
            clip: clips[rank].clone(),
            latent: (8, 8),
            guidance: 7.5,
            fps_cond: 8.0,
            vi,
            vae_chunk: 3,
            decode: true,
            schedule,
            turn: schedule.rank_turns.then_some(&turn),
            offload_tier: schedule.offload.then(|| tier.clone()),
        };
        let inputs = SeededTestInputs {
            cond: cond.clone(),
            seed: 3,
        };
        let hooks = CaptureBits::default();
        run_rank(&models.rank_models(), comm, &job, &inputs, &hooks)?;
        let chunks = hooks.chunks.get();
        Ok((
            hooks.latents.into_inner(),
            hooks.images.into_inner(),
            chunks,
        ))
    })
    .unwrap()
}

/// Every schedule the planner may choose (frames in chunks, the CFG rows one after the other,
/// ranks taking turns, long-lived tensors offloaded to a spill file, all combined) gives the unconstrained run's latents after every step and
/// its decoded images bit for bit, on 3 ranks of unequal clips, in the default and the
/// exact-seam mode.
#[test]
fn every_schedule_gives_the_unconstrained_bits() {
    let _serial = serial();
    let models = tiny::load(Device::Cpu, DType::F32).unwrap();
    let vi = ViConfig {
        conv_pad: 2,
        attn_pad: 3,
        top_k: 4,
        ..ViConfig::default()
    };
    let exact = ViConfig {
        exact_seam: true,
        ..vi.clone()
    };
    let s = |frame_chunk, sequential_cfg, rank_turns, offload| Schedule {
        frame_chunk,
        sequential_cfg,
        rank_turns,
        offload,
    };
    for (cfg, schedules) in [
        (
            &vi,
            vec![
                s(2, false, false, false),
                s(0, true, false, false),
                s(0, false, true, false),
                s(1, true, true, false),
                s(3, true, true, false),
                s(0, false, false, true),
                s(0, false, true, true),
                s(1, true, true, true),
            ],
        ),
        (
            &exact,
            vec![s(1, true, true, false), s(1, true, true, true)],
        ),
    ] {
        let (world, frames) = (3, 7);
        let reference = run_schedule(&models, world, frames, cfg, Schedule::UNCONSTRAINED);
        assert_eq!(reference[0].0.len(), 2, "two steps");
        assert_eq!(reference[0].2, 1, "3 frames in one VAE chunk");
        for schedule in schedules {
            let got = run_schedule(&models, world, frames, cfg, schedule);
            for rank in 0..world {
                assert!(
                    got[rank].0 == reference[rank].0 && got[rank].1 == reference[rank].1,
                    "exact_seam {}: {schedule} differs from the unconstrained run on rank {rank}",
                    cfg.exact_seam
                );
            }
            // The VAE follows the frame chunk: 1-frame chunks decode frame by frame.
            if schedule.frame_chunk == 1 {
                assert_eq!(got[0].2, 3);
            }
        }
    }
}

/// The planner's bound for ranks taking turns: one rank at its peak, every other at its parked
/// bytes; each constraint lowers the planned activations of 3 ranks sharing the CPU; and the
/// choice under a budget is the least constraining candidate that fits.
#[test]
fn schedules_lower_the_plan_and_the_choice_fits_the_budget() {
    let _serial = serial();
    let cpu3 = vec![(Device::Cpu, DType::F32); 3];
    let mut req = request(cpu3, 24, 128, 128);
    req.steps = 2;
    let at = |schedule: Schedule| {
        plan(
            &tiny_models(),
            &PlanRequest {
                schedule,
                ..req.clone()
            },
        )
        .unwrap()
    };
    let free = at(Schedule::UNCONSTRAINED);
    let chunked = at(Schedule {
        frame_chunk: 2,
        ..Schedule::UNCONSTRAINED
    });
    let turns = at(Schedule {
        frame_chunk: 2,
        rank_turns: true,
        ..Schedule::UNCONSTRAINED
    });
    let all = at(Schedule {
        frame_chunk: 1,
        rank_turns: true,
        sequential_cfg: true,
        offload: false,
    });
    let all_offloaded = at(Schedule {
        frame_chunk: 1,
        rank_turns: true,
        sequential_cfg: true,
        offload: true,
    });
    let act = |p: &MemoryPlan| p.devices[0].activations();
    eprintln!(
        "tiny, 3 ranks x 8 frames 128x128: unconstrained {}, chunks of 2 {}, + turns {}, \
         chunks of 1 + turns + sequential CFG {}",
        fmt_bytes(act(&free)),
        fmt_bytes(act(&chunked)),
        fmt_bytes(act(&turns)),
        fmt_bytes(act(&all))
    );
    eprintln!(
        "  + offload: {} (the waiting ranks park {} instead of {}; offloaded up to {})",
        fmt_bytes(act(&all_offloaded)),
        fmt_bytes(all_offloaded.devices[0].parked.iter().sum()),
        fmt_bytes(all.devices[0].parked.iter().sum()),
        fmt_bytes(all_offloaded.devices[0].offloaded)
    );
    assert!(act(&chunked) <= act(&free));
    assert!(act(&turns) < act(&chunked));
    assert!(act(&all) < act(&turns));
    assert!(act(&all_offloaded) < act(&all));
    assert!(all_offloaded.devices[0].offloaded > 0 && all.devices[0].offloaded == 0);
    // Turns: the worst rank at its peak plus every other rank's parked bytes.
    let d = &turns.devices[0];
    assert!(d.rank_turns);
    let peaks: Vec<u64> = (0..3)
        .map(|r| d.denoise_peaks[r].max(d.decode_peaks[r]))
        .collect();
    let parked: u64 = d.parked.iter().sum();
    assert!(d.parked.iter().zip(&peaks).all(|(p, k)| p > &0 && p < k));
    assert_eq!(
        d.ranks_peak(),
        (0..3)
            .map(|r| peaks[r] + parked - d.parked[r])
            .max()
            .unwrap()
    );

    // The choice: no budget -> unconstrained; a budget between two candidates' needs -> the
    // first candidate within it.
    let none = choose_schedule(&tiny_models(), &req, &|_| None).unwrap();
    assert_eq!(none.schedule, Schedule::UNCONSTRAINED);
    assert!(none.fits);
    let need = |p: &MemoryPlan| device_need(p, &p.devices[0]);
    let budget = (need(&turns) + need(&all)) / 2;
    let c = choose_schedule(&tiny_models(), &req, &|_| Some(budget)).unwrap();
    assert!(c.fits && need(&c.plan) <= budget, "{}", c.schedule);
    assert!(
        c.schedule.sequential_cfg && c.schedule.rank_turns,
        "{}",
        c.schedule
    );
    // The least constraining rung that fits: every rung before it does not.
    let ladder = Schedule::ladder(8, true);
    let at_rung = ladder.iter().position(|x| *x == c.schedule).unwrap();
    for x in &ladder[..at_rung] {
        assert!(need(&at(*x)) > budget, "{x} fits {budget} and comes first");
    }
    // A budget below the plan without offload (chunks of 1, turns, sequential CFG) but above
    // the one with it: only offload fits.
    let budget = (need(&all) + need(&all_offloaded)) / 2;
    let c = choose_schedule(&tiny_models(), &req, &|_| Some(budget)).unwrap();
    assert!(c.fits && c.schedule.offload, "{}", c.schedule);
    let c = choose_schedule(&tiny_models(), &req, &|_| Some(need(&all) / 2)).unwrap();
    assert!(!c.fits);
    assert_eq!(c.schedule.frame_chunk, 1, "the most constrained candidate");
}

/// The paper's job on ONE 80 GB card: `generate --plan-only` plans 2,300 frames of the
/// full-size model at 320x512 on 8 logical ranks of cuda:0 without a GPU (no device is opened:
/// this test binary has no CUDA at all), and the schedule it picks fits the card; a budget no
/// schedule fits is refused, naming the budget.
#[test]
fn plan_only_2300_frames_fit_one_80g_card() {
    let _serial = serial();
    let t0 = std::time::Instant::now();
    let args = [
        "generate",
        "--model",
        "random-full",
        "--frames",
        "2300",
        "--devices",
        "cuda:0x8",
        "--plan-only",
    ];
    let mut a = args.to_vec();
    a.extend(["--device-memory", "80G"]);
    run(&a).unwrap();
    // The same choice through the library: what it chose, and that it fits.
    let req = request(vec![(Device::Cuda(0), DType::BF16); 8], 2300, 320, 512);
    // The most constrained schedule (chunks of 1, turns, sequential CFG, offload to host
    // memory) needs far less of the card; half of that fits no schedule and is refused.
    let last = *Schedule::ladder(288, true).last().unwrap();
    let (p_last, _) = plan_fits(&full_models(), &req, last, &|_| None).unwrap();
    let d_last = &p_last.devices[0];
    eprintln!(
        "2300 frames, cuda:0x8, most constrained: {last} -> {}",
        d_last.describe()
    );
    assert!(last.offload && d_last.offloaded > 0);
    let hopeless = device_need(&p_last, d_last) / 2;
    let mut a = args.to_vec();
    let hopeless_arg = hopeless.to_string();
    a.extend(["--memory-budget", &hopeless_arg]);
    let e = err(&a);
    assert!(
        e.contains("does not fit the memory budget under any schedule")
            && e.contains(&fmt_bytes(hopeless)),
        "{e}"
    );
    let budget = Margin::CUDA.budget_from_free(80 << 30);
    let c = choose_schedule(&full_models(), &req, &|_| Some(budget)).unwrap();
    let d = &c.plan.devices[0];
    eprintln!(
        "2300 frames, cuda:0x8, budget {} (80 GiB less the margin): {} -> {} ({:.1?})",
        fmt_bytes(budget),
        c.schedule,
        d.describe(),
        t0.elapsed()
    );
    assert!(c.fits);
    assert!(device_need(&c.plan, d) <= budget);
    assert!(c.schedule.rank_turns, "{}", c.schedule);
    assert_eq!(d.rank_frames.iter().sum::<usize>(), 2300);
}

fn png_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// `generate` under a `--memory-budget` that only frames in chunks, sequential CFG rows, ranks
/// taking turns and long-lived tensors offloaded (to a spill file in --offload-dir) meet writes
/// the same PNG bytes as the unconstrained run, the run's heap (counting allocator, everything
/// the process took from the start of the command: weights, activations, scratch, decoded
/// frames) stays within that budget, and the spill file is gone.
#[test]
fn a_small_budget_forces_a_schedule_with_the_same_frames_within_it() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let (free_dir, tight_dir) = (t.path().join("free"), t.path().join("tight"));
    let spill_dir = t.path().join("spill");
    std::fs::create_dir(&spill_dir).unwrap();
    let base_args = [
        "generate",
        "--model",
        "tiny",
        "--devices",
        "cpu:3",
        "--frames",
        "12",
        "--height",
        "128",
        "--width",
        "128",
        "--steps",
        "2",
        "--quiet",
    ];
    let mut a = base_args.to_vec();
    a.extend(["--frames-dir", s(&free_dir)]);
    run(&a).unwrap();

    // The budget: between the needs of two constrained candidates, so that the planner has to
    // chunk frames, run the CFG rows one after the other and let the ranks take turns.
    let mut req = request(vec![(Device::Cpu, DType::F32); 3], 12, 128, 128);
    req.steps = 2;
    let need = |schedule: Schedule| {
        let p = plan(
            &tiny_models(),
            &PlanRequest {
                schedule,
                ..req.clone()
            },
        )
        .unwrap();
        device_need(&p, &p.devices[0])
    };
    let unconstrained = need(Schedule::UNCONSTRAINED);
    let whole_clips = need(Schedule {
        frame_chunk: 0,
        sequential_cfg: true,
        rank_turns: true,
        offload: true,
    });
    let chunks_of_2 = Schedule {
        frame_chunk: 2,
        sequential_cfg: true,
        rank_turns: true,
        offload: true,
    };
    assert!(need(chunks_of_2) < whole_clips && whole_clips < unconstrained);
    let budget = (need(chunks_of_2) + whole_clips) / 2;
    let c = choose_schedule(&tiny_models(), &req, &|_| Some(budget)).unwrap();
    assert_eq!(c.schedule, chunks_of_2);

    let mut a = base_args.to_vec();
    let budget_arg = budget.to_string();
    a.extend([
        "--frames-dir",
        s(&tight_dir),
        "--memory-budget",
        &budget_arg,
        "--offload-dir",
        s(&spill_dir),
    ]);
    let base = HEAP_LIVE.load(Ordering::SeqCst);
    HEAP_PEAK.store(base, Ordering::SeqCst);
    run(&a).unwrap();
    let real = (HEAP_PEAK.load(Ordering::SeqCst) - base) as u64;
    eprintln!(
        "unconstrained plan {}, budget {}, chosen {} (plan {}), real heap peak {}",
        fmt_bytes(unconstrained),
        fmt_bytes(budget),
        c.schedule,
        fmt_bytes(device_need(&c.plan, &c.plan.devices[0])),
        fmt_bytes(real)
    );
    assert!(real <= budget, "real heap peak {real} > budget {budget}");
    assert_eq!(
        std::fs::read_dir(&spill_dir).unwrap().count(),
        0,
        "spill file left"
    );

    let (x, y) = (png_bytes(&free_dir), png_bytes(&tight_dir));
    assert_eq!(x.len(), 12);
    assert!(
        x == y,
        "the frames differ between the unconstrained and the budgeted run"
    );
}

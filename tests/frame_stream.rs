//! Frames stream to the writer (issue 12, item 5): the writer's memory stays flat in the video's
//! length. Measured with a counting allocator (bytes, not time): the heap peak of the decode and
//! write phase of a tiny-model generation at 512 frames exceeds the one at 64 frames by no more
//! than the extra frames' latents and a small allowance; a writer that kept every frame (or a
//! rank that queued its whole clip) would add 12 KiB per extra frame. The memory plan's count of
//! decoded frames alive on the host is checked against the frames really held when the writer
//! stalls.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vi_model::clip_parallel::ViConfig;
use vi_model::distributed::split_frames;
use vi_model::frame_flow::{window, FRAMES_IN_FLIGHT};
use vi_model::memory_plan::{plan, PlanModels, PlanRequest};
use vi_model::params::{ModelError, Result};
use vi_model::pipeline::{generate_to, Event, FrameSink, GenerateRequest, Rgb8};
use vi_model::sampler::SamplerKind;
use vi_model::tiny;
use vi_runtime::{DType, Device};

/// Live heap bytes of the process and their peak since the last reset.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call goes to the system allocator unchanged; the sizes are only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator (hence from `System`) with layout `l`.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new` is the caller's valid new size.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::SeqCst);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One test at a time: the counter is the whole process's.
static SERIAL: Mutex<()> = Mutex::new(());

/// Checks the order and size of the frames, keeps none.
struct Discard {
    next: usize,
    bytes: usize,
}

impl FrameSink for Discard {
    fn frame(&mut self, index: usize, rgb: Rgb8) -> Result<()> {
        if index != self.next || rgb.len() != self.bytes {
            return Err(ModelError::Msg(format!(
                "frame {index} ({} bytes) where frame {} ({} bytes) was due",
                rgb.len(),
                self.next,
                self.bytes
            )));
        }
        self.next += 1;
        Ok(())
    }
}

fn request(frames: usize, world: usize) -> GenerateRequest {
    GenerateRequest {
        prompts: vec![(0, "a lighthouse".into())],
        negative_prompt: String::new(),
        frames,
        height: 64,
        width: 64,
        steps: 1,
        sampler: SamplerKind::Ddim,
        guidance: 7.5,
        fps_cond: 24.0,
        seed: 3,
        vi: ViConfig::default(),
        world,
        rank_timeout: Duration::from_secs(300),
        comm: Default::default(),
        vae_chunk: 4,
        decode: true,
        schedule: vi_model::schedule::Schedule::UNCONSTRAINED,
        offload_dir: None,
    }
}

/// The heap peak (bytes) from the moment every rank has decoded its first chunk (so every rank
/// has left the denoising phase, whose activations grow with the clip) to the end of the run.
fn decode_phase_peak(models: &vi_model::models::Models, req: &GenerateRequest) -> usize {
    let started: Vec<AtomicBool> = (0..req.world).map(|_| AtomicBool::new(false)).collect();
    let remaining = AtomicUsize::new(req.world);
    let progress = |e: Event| {
        if let Event::Decoded { rank, .. } = e {
            if !started[rank].swap(true, Ordering::SeqCst)
                && remaining.fetch_sub(1, Ordering::SeqCst) == 1
            {
                PEAK.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
            }
        }
    };
    let mut sink = Discard {
        next: 0,
        bytes: req.height * req.width * 3,
    };
    generate_to(&|_| models, req, Some(&mut sink), &progress).unwrap();
    assert_eq!(sink.next, req.frames, "every frame written");
    assert_eq!(remaining.load(Ordering::SeqCst), 0, "every rank decoded");
    PEAK.load(Ordering::SeqCst)
}

#[test]
fn writer_memory_is_flat_in_the_video_length() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let models = tiny::load(Device::Cpu, DType::F32).unwrap();
    // One rank: the writer's process alone, as rank 0 of a multi-process run is (in-process
    // ranks would add each other's VAE transients at moments that vary from run to run; the
    // bound on what ranks > 0 queue is `frame_flow`'s unit test).
    let world = 1;
    let (short, long) = (64, 512);
    let peak_short = decode_phase_peak(&models, &request(short, world));
    let peak_long = decode_phase_peak(&models, &request(long, world));
    let req = request(long, world);
    let frame_bytes = req.height * req.width * 3;
    // Latents [frames, h/8, w/8, 4] f32: the rank holds its clip's until it has decoded it.
    let latent_bytes = (long - short) * (req.height / 8) * (req.width / 8) * 4 * 4;
    // Allowance: frames in flight, whose number varies with the moment of the peak: up to the
    // channel to the caller's thread (FRAMES_IN_FLIGHT), one decoded chunk being handed over and
    // the frame in the sink. 448 extra frames kept would be 5.5 MB.
    let allowance = (FRAMES_IN_FLIGHT + req.vae_chunk + 1) * frame_bytes;
    let growth = peak_long.saturating_sub(peak_short);
    eprintln!(
        "decode+write heap peak: {short} frames {peak_short} B, {long} frames {peak_long} B, \
         growth {growth} B; latents of the {} extra frames {latent_bytes} B + allowance \
         {allowance} B",
        long - short
    );
    assert!(
        growth <= latent_bytes + allowance,
        "the writer's memory grows with the video: +{growth} B for {} more frames (latents \
         {latent_bytes} B + allowance {allowance} B)",
        long - short
    );
}

#[test]
fn a_failing_sink_stops_every_rank() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let models = tiny::load(Device::Cpu, DType::F32).unwrap();
    struct FailAt(usize);
    impl FrameSink for FailAt {
        fn frame(&mut self, index: usize, _: Rgb8) -> Result<()> {
            if index == self.0 {
                return Err(ModelError::Msg(format!("disk full at frame {index}")));
            }
            Ok(())
        }
    }
    // Frame 40 is rank 1's (clips of 20): ranks 2 and 3 wait for credit; the error reaches the
    // caller (no rank waits out the 300 s timeout).
    for at in [3, 40] {
        let mut sink = FailAt(at);
        let e = generate_to(&|_| &models, &request(80, 4), Some(&mut sink), &|_| {})
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("disk full at frame {at}"));
    }
}

/// Stalls at frame `at` until no rank has decoded a frame for `quiet`, then records the live heap.
struct StallAt<'a> {
    at: usize,
    decoded: &'a AtomicUsize,
    quiet: Duration,
    live: Option<usize>,
    next: usize,
}

impl FrameSink for StallAt<'_> {
    fn frame(&mut self, index: usize, _rgb: Rgb8) -> Result<()> {
        if index == self.at {
            let mut seen = self.decoded.load(Ordering::SeqCst);
            let mut still = std::time::Instant::now();
            while still.elapsed() < self.quiet {
                std::thread::sleep(Duration::from_millis(20));
                let now = self.decoded.load(Ordering::SeqCst);
                if now != seen {
                    (seen, still) = (now, std::time::Instant::now());
                }
            }
            self.live = Some(LIVE.load(Ordering::SeqCst));
        }
        self.next += 1;
        Ok(())
    }
}

/// The memory plan's decoded frames on the host (`MemoryPlan::host_frames`) against the frames
/// really alive when the writer stalls at rank 1's first frame, once every rank has stopped
/// decoding: rank 1 has sent a window of frames that fill the writer's channel and rank 0's hand,
/// and every rank > 0 waits with a full queue. The plan covers what is held and is not loose
/// (the count of every decoded frame it made before would be 4 times what is held here).
#[test]
fn plan_counts_the_decoded_frames_really_alive() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let models = tiny::load(Device::Cpu, DType::F32).unwrap();
    let (world, frames) = (4, 4 * 96);
    let mut req = request(frames, world);
    // Chunks of 3: a queue stops one chunk past a window of 16 (18 frames), the most it holds.
    req.vae_chunk = 3;
    let clips = split_frames(frames, world).unwrap();
    let p = plan(
        &PlanModels {
            unet: tiny::unet_config(),
            clip: tiny::clip_config(),
            vae: tiny::vae_config(),
        },
        &PlanRequest {
            ranks: vec![(Device::Cpu, DType::F32); world],
            local: 0..world,
            frames,
            height: req.height,
            width: req.width,
            steps: req.steps,
            sampler: req.sampler,
            vi: req.vi.clone(),
            vae_chunk: req.vae_chunk,
            decode: true,
            prompts: 1,
            schedule: req.schedule,
        },
    )
    .unwrap();

    let decoded = AtomicUsize::new(0);
    let progress = |e: Event| {
        if let Event::Decoded { frames, .. } = e {
            decoded.fetch_add(frames, Ordering::SeqCst);
        }
    };
    let mut sink = StallAt {
        at: clips[1].start,
        decoded: &decoded,
        quiet: Duration::from_millis(500),
        live: None,
        next: 0,
    };
    // A first run creates what the models keep after a run (caches): the base counts it.
    generate_to(&|_| &models, &request(world, world), None, &|_| {}).unwrap();
    let base = LIVE.load(Ordering::SeqCst);
    generate_to(&|_| &models, &req, Some(&mut sink), &progress).unwrap();
    assert_eq!(sink.next, frames);
    let held = sink.live.expect("the sink stalled") as i64 - base as i64;
    // What else is alive at the stall: each rank > 0 is inside its VAE callback with its clip's
    // latents, the chunk's latents and decoded images (f32), and its text conditioning.
    let (lh, lw, c) = (req.height / 8, req.width / 8, 4);
    let cond = 2 * 77 * tiny::clip_config().hidden_size * 4;
    let others: usize = clips[1..]
        .iter()
        .map(|cl| {
            (cl.len() + req.vae_chunk) * lh * lw * c * 4
                + req.vae_chunk * req.height * req.width * 3 * 4
                + cond
        })
        .sum();
    let frames_held = held - others as i64;
    let frame = (req.height * req.width * 3) as i64;
    eprintln!(
        "stalled writer: heap above the models {held} B, of which frames {frames_held} B ({:.1} \
         frames); plan's host frames {} B ({:.1} frames); every frame {} B; window {}",
        frames_held as f64 / frame as f64,
        p.host_frames,
        p.host_frames as f64 / frame as f64,
        frames as i64 * frame,
        window(req.vae_chunk)
    );
    assert!(
        frames_held <= p.host_frames as i64,
        "the plan counts {} B of decoded frames, {frames_held} B are alive",
        p.host_frames
    );
    assert!(
        frames_held * 10 >= p.host_frames as i64 * 6,
        "the plan's {} B of decoded frames is loose: {frames_held} B are alive",
        p.host_frames
    );
}

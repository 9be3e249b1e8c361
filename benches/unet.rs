//! Full-size VideoCrafter2 UNet forward pass on the GPU: `cargo bench --features cuda --bench unet`.
//!
//! Model: the config of `tests/golden/manifests/videocrafter2_unet_diffusers.json` (1.41 B
//! parameters) with deterministic random bf16 weights generated on the device (N(0, 1/fan_in) for
//! matrices and convolutions, ones for norm scales, zeros for biases). Input: 320x512 video ->
//! latent 40x64, a classifier-free-guidance batch of 2, F frames (default 16 and 24; override with
//! `VI_BENCH_FRAMES=16,24`), text states [2, 77, 1024], bf16 activations with the f32 residual
//! stream of docs/precision.md (`VI_RESIDUAL=bf16`: the stream in bf16 too).
//!
//! Timing: `VI_BENCH_WARMUP` (default 1) untimed passes, then `VI_BENCH_ITERS` (default 3) passes,
//! each bracketed by a device synchronisation; the median wall time is reported. Then one pass with
//! per-op-kind CUDA-event timing (the backend's `VI_PROFILE` machinery) gives the breakdown.
//!
//! Work: 786 GFLOP per frame per pass, one latent frame of one batch row (the ~FLOP count of the
//! VideoCrafter2 UNet at 40x64); a CFG batch-2 pass over F frames is 2F frame-passes, i.e.
//! 2 * F * 786 GFLOP. TFLOP/s = that / median time; "% peak" is against 989 TFLOP/s, the dense bf16
//! tensor-core peak of an H100 SXM.
//!
//! Without the `cuda` feature or without a GPU it prints a SKIPPED line and exits 0.
//! Machine-readable lines start with `BENCH ` (parsed by tools/gpu-check.sh).

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("SKIPPED: unet bench needs `--features cuda` and a GPU");
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = gpu::run() {
        eprintln!("unet bench failed: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::Instant;

    use serde_json::Value;
    use vi_model::params::{ParamSource, Params, Result as MResult};
    use vi_model::temporal::LocalContext;
    use vi_model::unet::{UNet3D, UNetConfig};
    use vi_runtime::cuda;
    use vi_runtime::{DType, Tensor};

    const ORD: usize = 0;
    const DT: DType = DType::BF16;
    /// GFLOP per latent frame per UNet pass at 40x64 (see the module doc).
    const GFLOP_PER_FRAME: f64 = 786.0;
    /// Dense bf16 tensor-core peak of an H100 SXM, TFLOP/s.
    const PEAK_TFLOPS: f64 = 989.0;
    const LATENT: (usize, usize) = (40, 64);

    /// Random bf16 parameters generated on the GPU, seeded by the key name.
    struct RandomSource {
        count: std::sync::atomic::AtomicUsize,
    }

    fn seed_of(key: &str) -> u64 {
        // FNV-1a.
        key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    impl ParamSource for RandomSource {
        fn get(&self, key: &str, shape: &[usize]) -> MResult<Tensor> {
            let n: usize = shape.iter().product();
            self.count
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            // 1-D parameters stay f32 (the model's precision policy, params::param_dtype).
            let pdt = vi_model::params::param_dtype(shape, DT);
            let t = if key.ends_with(".bias") {
                cuda::full(ORD, shape, pdt, 0.0)?
            } else if shape.len() == 1 {
                cuda::full(ORD, shape, pdt, 1.0)?
            } else {
                let fan_in: usize = shape[1..].iter().product();
                let std = 1.0 / (fan_in.max(1) as f32).sqrt();
                cuda::random_normal(ORD, shape, DT, seed_of(key), std)?
            };
            Ok(t)
        }
        fn contains(&self, _key: &str) -> bool {
            true
        }
    }

    fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
        std::env::var(name)
            .ok()
            .map(|v| {
                v.split(',')
                    .filter_map(|x| x.trim().parse().ok())
                    .collect::<Vec<_>>()
            })
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_vec())
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    struct Row {
        frames: usize,
        ms: f64,
        min_ms: f64,
        fps: f64,
        tflops: f64,
        peak_frac: f64,
        mem_gib: f64,
        top: Vec<(String, f64, usize)>,
    }

    pub fn run() -> Result<(), Box<dyn std::error::Error>> {
        if !cuda::is_available() {
            println!("SKIPPED: no CUDA device");
            return Ok(());
        }
        let (name, cc, _, total) = cuda::device_info(ORD)?;
        println!(
            "device: {name} (sm_{}{}, {:.1} GiB)",
            cc.0,
            cc.1,
            total as f64 / (1u64 << 30) as f64
        );
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/manifests/videocrafter2_unet_diffusers.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&manifest)?)?;
        let cfg = UNetConfig::from_json(&v["config"])?;
        let src = RandomSource {
            count: Default::default(),
        };
        let t0 = Instant::now();
        let mut unet = UNet3D::load(&cfg, Params::new(&src))?;
        // VI_RESIDUAL=bf16: the residual stream in the weights' dtype instead of f32, to measure
        // what the f32 stream costs (docs/precision.md).
        let stream = match std::env::var("VI_RESIDUAL").as_deref() {
            Ok("bf16") => {
                unet.set_residual_dtype(DT);
                "bf16"
            }
            _ => "f32",
        };
        println!("residual stream: {stream}");
        cuda::synchronize(ORD)?;
        let nparams = src.count.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "model: {:.3} B parameters (bf16, random; manifest: {:.3} B) built in {:.1} s",
            nparams as f64 / 1e9,
            v["num_parameters"].as_f64().unwrap_or(f64::NAN) / 1e9,
            t0.elapsed().as_secs_f64()
        );
        println!("kxk convolutions: {:?}", cuda::conv_algo());
        let warmup = env_list("VI_BENCH_WARMUP", &[1])[0];
        let iters = env_list("VI_BENCH_ITERS", &[3])[0].max(1);
        let frames_list = env_list("VI_BENCH_FRAMES", &[16, 24]);
        let (h, w) = LATENT;
        let mut rows = Vec::new();
        for &frames in &frames_list {
            let sample = cuda::random_normal(ORD, &[2, frames, h, w, 4], DT, 1, 1.0)?;
            let ehs = cuda::random_normal(ORD, &[2, 77, 1024], DT, 2, 1.0)?;
            let pass = || -> Result<Tensor, Box<dyn std::error::Error>> {
                let out = unet.forward(&sample, 500.0, 8.0, &ehs, &LocalContext)?;
                cuda::synchronize(ORD)?;
                Ok(out)
            };
            for _ in 0..warmup {
                pass()?;
            }
            let mut times = Vec::new();
            for i in 0..iters {
                let t = Instant::now();
                let out = pass()?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                if i == 0 {
                    let o = out.to_dtype(DType::F32)?.to_vec_f32()?;
                    let bad = o.iter().filter(|x| !x.is_finite()).count();
                    if bad > 0 {
                        println!("warning: {bad} non-finite outputs (random weights)");
                    }
                    assert_eq!(out.shape(), [2, frames, h, w, 4]);
                }
            }
            let ms = median(times.clone());
            let min_ms = times.iter().cloned().fold(f64::INFINITY, f64::min);
            // Profiled pass (events around every op; slightly slower than the timed passes).
            cuda::profile::set_enabled(ORD, true)?;
            let _ = cuda::profile::take_report(ORD)?;
            pass()?;
            let report = cuda::profile::take_report(ORD)?;
            cuda::profile::set_enabled(ORD, false)?;
            let (_, _, free, total) = cuda::device_info(ORD)?;
            let gflop = GFLOP_PER_FRAME * 2.0 * frames as f64;
            let tflops = gflop / ms; // GFLOP / ms = TFLOP/s
            let row = Row {
                frames,
                ms,
                min_ms,
                fps: 2.0 * frames as f64 / (ms / 1e3),
                tflops,
                peak_frac: tflops / PEAK_TFLOPS,
                mem_gib: (total - free) as f64 / (1u64 << 30) as f64,
                top: report
                    .iter()
                    .map(|r| (r.kind.to_string(), r.ms, r.calls))
                    .collect(),
            };
            let prof_total: f64 = row.top.iter().map(|t| t.1).sum();
            println!(
                "\nF = {frames}: per-op-kind GPU time of one profiled pass (total {prof_total:.1} ms):"
            );
            println!("  {:<22} {:>10} {:>7} {:>7}", "op kind", "ms", "%", "calls");
            for (k, t, c) in &row.top {
                println!(
                    "  {k:<22} {t:>10.2} {:>6.1}% {c:>7}",
                    100.0 * t / prof_total.max(1e-9)
                );
            }
            let top3: Vec<String> = row
                .top
                .iter()
                .take(3)
                .map(|(k, t, _)| format!("{k}:{:.0}%", 100.0 * t / prof_total.max(1e-9)))
                .collect();
            println!(
                "BENCH frames={frames} median_ms={ms:.2} min_ms={min_ms:.2} frames_per_s={:.2} \
                 tflops={tflops:.1} peak_pct={:.1} mem_gib={:.1} top3={}",
                row.fps,
                100.0 * row.peak_frac,
                row.mem_gib,
                top3.join(",")
            );
            rows.push(row);
        }
        println!(
            "\nUNet3D full size, 40x64 latent, CFG batch 2, bf16, {iters} timed passes (median); \
             {GFLOP_PER_FRAME} GFLOP per frame-pass, peak {PEAK_TFLOPS} TFLOP/s"
        );
        println!(
            "{:>6} {:>10} {:>10} {:>12} {:>9} {:>7} {:>8}",
            "frames", "ms/pass", "min ms", "frame-pass/s", "TFLOP/s", "% peak", "mem GiB"
        );
        for r in &rows {
            println!(
                "{:>6} {:>10.1} {:>10.1} {:>12.2} {:>9.1} {:>6.1}% {:>8.1}",
                r.frames,
                r.ms,
                r.min_ms,
                r.fps,
                r.tflops,
                100.0 * r.peak_frac,
                r.mem_gib
            );
        }
        Ok(())
    }
}

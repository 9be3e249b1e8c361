//! Op micro-benchmarks: `cargo bench --bench ops` prints one table row per (op, shape, device).
//!
//! Each case runs once to warm up, then `runs` times (adaptive, ~0.4 s budget, 3..=15 runs); the
//! median wall time is reported with the op's work rate (GFLOP/s for compute-bound ops, GB/s of
//! f32 data read + written for memory-bound ones). The CPU rows always run; with
//! `--features cuda` and a visible GPU, every case also runs on `cuda:0` with bf16 activations
//! (timed with a device synchronisation after each call). Adding a device is one more entry in
//! `devices()`. Optional filter: `cargo bench --bench ops -- attention` runs only the cases whose
//! op name contains the word.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use vi_runtime::ops::{self, DualScopeParams};
use vi_runtime::{DType, Device, Result, Tensor};

/// Where a case runs: inputs are created on `device` in `dtype`; `sync` waits for queued work.
struct Dev {
    label: &'static str,
    device: Device,
    dtype: DType,
    sync: fn() -> Result<()>,
}

fn no_sync() -> Result<()> {
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_sync() -> Result<()> {
    vi_runtime::cuda::synchronize(0)
}

fn devices() -> Vec<Dev> {
    #[allow(unused_mut)]
    let mut v = vec![Dev {
        label: "cpu",
        device: Device::Cpu,
        dtype: DType::F32,
        sync: no_sync,
    }];
    #[cfg(feature = "cuda")]
    if vi_runtime::cuda::is_available() {
        v.push(Dev {
            label: "cuda:0",
            device: Device::Cuda(0),
            dtype: DType::BF16,
            sync: cuda_sync,
        });
    }
    v
}

/// Median seconds of `f` after one warm-up call (the warm-up's error, if any, is returned).
fn time(f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let t0 = Instant::now();
    f()?;
    let first = t0.elapsed().as_secs_f64();
    let runs = ((0.4 / first.max(1e-6)).ceil() as usize).clamp(3, 15);
    let mut ts = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

struct Bench {
    filter: Option<String>,
    rng: StdRng,
    rows: usize,
}

impl Bench {
    fn wanted(&self, op: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| op.contains(f.as_str()))
    }

    fn randn(&mut self, dev: &Dev, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.sample::<f32, _>(StandardNormal))
            .collect();
        Tensor::from_slice_on(&v, shape, dev.device, dev.dtype).expect("creating a bench input")
    }

    /// Time `f` (one op call) on `dev`; `work` is FLOPs (unit "GFLOP/s") or bytes (unit "GB/s").
    fn case(
        &mut self,
        dev: &Dev,
        (op, shape): (&str, String),
        work: f64,
        unit: &'static str,
        mut f: impl FnMut() -> Result<Tensor>,
    ) {
        let mut run = || -> Result<()> {
            f()?;
            (dev.sync)()
        };
        match time(&mut run) {
            Ok(s) => println!(
                "| {:<22} | {:<34} | {:<6} | {:>10.3} | {:>9.2} {:<7} |",
                op,
                shape,
                dev.label,
                s * 1e3,
                work / s / 1e9,
                unit
            ),
            Err(e) => println!(
                "| {:<22} | {:<34} | {:<6} | {:>10} | {:<17} | {e}",
                op, shape, dev.label, "-", "failed"
            ),
        }
        self.rows += 1;
    }
}

const GF: &str = "GFLOP/s";
const GB: &str = "GB/s";

fn run_device(b: &mut Bench, dev: &Dev) {
    // GEMM (matmul, and linear = x · W^T as in every projection of the models).
    if b.wanted("matmul") {
        for &(m, k, n) in &[(256, 256, 256), (1024, 1024, 1024)] {
            let a = b.randn(dev, &[m, k]);
            let w = b.randn(dev, &[k, n]);
            let name = ("matmul", format!("{m}x{k} . {k}x{n}"));
            b.case(dev, name, 2.0 * (m * n * k) as f64, GF, || {
                ops::matmul(&a, &w)
            });
        }
    }
    if b.wanted("linear") {
        for &(rows, k, n) in &[(2560, 320, 320), (2560, 320, 2560)] {
            let x = b.randn(dev, &[rows, k]);
            let w = b.randn(dev, &[n, k]);
            let bias = b.randn(dev, &[n]);
            let name = ("linear", format!("[{rows},{k}] -> {n}"));
            b.case(dev, name, 2.0 * (rows * n * k) as f64, GF, || {
                ops::linear(&x, &w, Some(&bias))
            });
        }
    }

    // Convolutions (channels-last activations, PyTorch weight layout).
    if b.wanted("conv2d") {
        for &(n, h, w, cin, cout, k) in &[(1, 40, 64, 320, 320, 3), (1, 40, 64, 320, 320, 1)] {
            let x = b.randn(dev, &[n, h, w, cin]);
            let wt = b.randn(dev, &[cout, cin, k, k]);
            let bias = b.randn(dev, &[cout]);
            let flops = 2.0 * (n * h * w * cout * cin * k * k) as f64;
            let name = ("conv2d", format!("{n}x{h}x{w}x{cin} -> {cout} k{k}"));
            b.case(dev, name, flops, GF, || {
                ops::conv2d(&x, &wt, Some(&bias), 1, k / 2)
            });
        }
    }
    if b.wanted("temporal_conv") {
        let (bt, f, s, c) = (1, 16, 640, 320);
        let x = b.randn(dev, &[bt, f, s, c]);
        let wt = b.randn(dev, &[c, c, 3]);
        let flops = 2.0 * (bt * f * s * c * c * 3) as f64;
        let name = ("temporal_conv", format!("{bt}x{f}x{s}x{c} k3"));
        b.case(dev, name, flops, GF, || ops::temporal_conv(&x, &wt, None));
    }

    // Attention: spatial self-attention, cross-attention with 77 tokens, temporal (short sequences).
    if b.wanted("attention") {
        for &(bt, sq, sk, h, d) in &[
            (1, 1024, 1024, 5, 64),
            (2, 2560, 77, 5, 64),
            (640, 16, 16, 5, 64),
        ] {
            let q = b.randn(dev, &[bt, sq, h, d]);
            let k = b.randn(dev, &[bt, sk, h, d]);
            let v = b.randn(dev, &[bt, sk, h, d]);
            let flops = 4.0 * (bt * h * sq * sk * d) as f64;
            let name = ("attention", format!("b{bt} sq{sq} sk{sk} h{h} d{d}"));
            b.case(dev, name, flops, GF, || {
                ops::attention(&q, &k, &v, 0.125, None, false)
            });
        }
    }
    if b.wanted("dual_scope_attention") {
        let (bt, n, h, d, pad, g) = (640, 16, 5, 64, 4, 6);
        let q = b.randn(dev, &[bt, n, h, d]);
        let kl = b.randn(dev, &[bt, n + 2 * pad, h, d]);
        let vl = b.randn(dev, &[bt, n + 2 * pad, h, d]);
        let kg = b.randn(dev, &[bt, g, h, d]);
        let vg = b.randn(dev, &[bt, g, h, d]);
        let p = DualScopeParams {
            pad,
            scale: 0.125,
            local_bias: 1.0,
            global_bias: 11.0,
            token_num_scale: false,
        };
        // FLOPs of the visible logits and their weighted sum only.
        let flops = 4.0 * (bt * n * h * (2 * pad + 1 + g) * d) as f64;
        let name = (
            "dual_scope_attention",
            format!("b{bt} n{n} h{h} d{d} p{pad} G{g}"),
        );
        b.case(dev, name, flops, GF, || {
            ops::dual_scope_attention(&q, &kl, &vl, &kg, &vg, &p)
        });
    }

    // Memory-bound ops: bytes = f32 elements read + written, times 4.
    let (n, s, c, g) = (16, 2560, 320, 32);
    let bytes = 2.0 * (n * s * c * 4) as f64;
    let shape = format!("[{n},{s},{c}]");
    if b.wanted("group_norm") {
        let x = b.randn(dev, &[n, s, c]);
        let gamma = b.randn(dev, &[c]);
        let beta = b.randn(dev, &[c]);
        let name = ("group_norm+silu", format!("{shape} G{g}"));
        b.case(dev, name, bytes, GB, || {
            ops::group_norm(&x, g, &gamma, &beta, 1e-6, true)
        });
    }
    if b.wanted("add") {
        let x = b.randn(dev, &[n, s, c]);
        let y = b.randn(dev, &[n, s, c]);
        b.case(dev, ("add", format!("{shape} x2")), 1.5 * bytes, GB, || {
            ops::add(&x, &y)
        });
    }
    if b.wanted("gelu") {
        let x = b.randn(dev, &[n, s, c]);
        b.case(dev, ("gelu", shape.clone()), bytes, GB, || ops::gelu(&x));
    }
    if b.wanted("permute") {
        let x = b.randn(dev, &[n, 40, 64, c]);
        let name = ("permute nhwc->nchw", format!("[{n},40,64,{c}]"));
        b.case(dev, name, bytes, GB, || ops::permute(&x, &[0, 3, 1, 2]));
    }
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .filter(|a| !a.is_empty());
    let mut b = Bench {
        filter,
        rng: StdRng::seed_from_u64(0),
        rows: 0,
    };
    println!(
        "ops bench: {} CPU threads; median of runs after one warm-up",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "| {:<22} | {:<34} | {:<6} | {:>10} | {:>17} |",
        "op", "shape", "device", "median ms", "rate"
    );
    println!(
        "|{:-<24}|{:-<36}|{:-<8}|{:-<12}|{:-<19}|",
        "", "", "", "", ""
    );
    for dev in devices() {
        run_device(&mut b, &dev);
    }
    println!("{} rows", b.rows);
}

//! Op micro-benchmarks: `cargo bench --bench ops` prints one table row per (op, shape, device).
//!
//! Each case runs once to warm up, then `runs` times (adaptive, ~0.4 s budget, 3..=15 runs); the
//! median wall time is reported with the op's work rate (GFLOP/s or GB/s). To add a device (e.g. the
//! CUDA backend), move the inputs with `Tensor::to_device` and push rows with another `device` label.
//! Optional filter: `cargo bench --bench ops -- attention` runs only cases whose name contains it.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use vi_runtime::ops::{self, DualScopeParams};
use vi_runtime::Tensor;

/// One result line of the table.
struct Row {
    op: String,
    shape: String,
    device: &'static str,
    median_ms: f64,
    rate: f64,
    unit: &'static str,
}

/// Median seconds of `f` after one warm-up call.
fn time(mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    f();
    let first = t0.elapsed().as_secs_f64();
    let runs = ((0.4 / first.max(1e-6)).ceil() as usize).clamp(3, 15);
    let mut ts: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[ts.len() / 2]
}

fn randn(r: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect();
    Tensor::from_vec(v, shape).unwrap()
}

struct Bench {
    rows: Vec<Row>,
    filter: Option<String>,
    rng: StdRng,
}

impl Bench {
    /// Time `f`; `work` is FLOPs (unit "GFLOP/s") or bytes moved (unit "GB/s").
    fn case(
        &mut self,
        op: &str,
        shape: &str,
        device: &'static str,
        work: f64,
        unit: &'static str,
        f: impl FnMut(),
    ) {
        if let Some(flt) = &self.filter {
            if !op.contains(flt.as_str()) {
                return;
            }
        }
        let s = time(f);
        let row = Row {
            op: op.to_string(),
            shape: shape.to_string(),
            device,
            median_ms: s * 1e3,
            rate: work / s / 1e9,
            unit,
        };
        print_row(&row);
        self.rows.push(row);
    }
}

fn print_row(r: &Row) {
    println!(
        "| {:<22} | {:<34} | {:<6} | {:>10.3} | {:>9.2} {:<7} |",
        r.op, r.shape, r.device, r.median_ms, r.rate, r.unit
    );
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .filter(|a| !a.is_empty());
    let mut b = Bench {
        rows: Vec::new(),
        filter,
        rng: StdRng::seed_from_u64(0),
    };
    println!(
        "CPU backend, {} hardware threads (median of runs after warm-up)",
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

    // GEMM (matmul, and linear = x · W^T as in every projection of the models).
    for &(m, k, n) in &[(256, 256, 256), (1024, 1024, 1024)] {
        let a = randn(&mut b.rng, &[m, k]);
        let w = randn(&mut b.rng, &[k, n]);
        let flops = 2.0 * (m * n * k) as f64;
        b.case(
            "matmul",
            &format!("{m}x{k} . {k}x{n}"),
            "cpu",
            flops,
            "GFLOP/s",
            || {
                ops::matmul(&a, &w).unwrap();
            },
        );
    }
    for &(rows, k, n) in &[(2560, 320, 320), (2560, 320, 2560)] {
        let x = randn(&mut b.rng, &[rows, k]);
        let w = randn(&mut b.rng, &[n, k]);
        let bias = randn(&mut b.rng, &[n]);
        let flops = 2.0 * (rows * n * k) as f64;
        b.case(
            "linear",
            &format!("[{rows},{k}] -> {n}"),
            "cpu",
            flops,
            "GFLOP/s",
            || {
                ops::linear(&x, &w, Some(&bias)).unwrap();
            },
        );
    }

    // Convolutions.
    for &(n, h, w, cin, cout, k) in &[(1, 40, 64, 320, 320, 3), (1, 40, 64, 320, 320, 1)] {
        let x = randn(&mut b.rng, &[n, h, w, cin]);
        let wt = randn(&mut b.rng, &[cout, cin, k, k]);
        let bias = randn(&mut b.rng, &[cout]);
        let flops = 2.0 * (n * h * w * cout * cin * k * k) as f64;
        let shape = format!("{n}x{h}x{w}x{cin} -> {cout} k{k}");
        b.case("conv2d", &shape, "cpu", flops, "GFLOP/s", || {
            ops::conv2d(&x, &wt, Some(&bias), 1, k / 2).unwrap();
        });
    }
    {
        let (bt, f, s, c) = (1, 16, 640, 320);
        let x = randn(&mut b.rng, &[bt, f, s, c]);
        let wt = randn(&mut b.rng, &[c, c, 3]);
        let flops = 2.0 * (bt * f * s * c * c * 3) as f64;
        b.case(
            "temporal_conv",
            &format!("{bt}x{f}x{s}x{c} k3"),
            "cpu",
            flops,
            "GFLOP/s",
            || {
                ops::temporal_conv(&x, &wt, None).unwrap();
            },
        );
    }

    // Attention: spatial self-attention, cross-attention with 77 tokens, temporal (short sequences).
    for &(bt, sq, sk, h, d) in &[
        (1, 1024, 1024, 5, 64),
        (2, 2560, 77, 5, 64),
        (640, 16, 16, 5, 64),
    ] {
        let q = randn(&mut b.rng, &[bt, sq, h, d]);
        let k = randn(&mut b.rng, &[bt, sk, h, d]);
        let v = randn(&mut b.rng, &[bt, sk, h, d]);
        let flops = 4.0 * (bt * h * sq * sk * d) as f64;
        let shape = format!("b{bt} sq{sq} sk{sk} h{h} d{d}");
        b.case("attention", &shape, "cpu", flops, "GFLOP/s", || {
            ops::attention(&q, &k, &v, 0.125, None, false).unwrap();
        });
    }
    {
        let (bt, n, h, d, pad, g) = (640, 16, 5, 64, 4, 6);
        let q = randn(&mut b.rng, &[bt, n, h, d]);
        let kl = randn(&mut b.rng, &[bt, n + 2 * pad, h, d]);
        let vl = randn(&mut b.rng, &[bt, n + 2 * pad, h, d]);
        let kg = randn(&mut b.rng, &[bt, g, h, d]);
        let vg = randn(&mut b.rng, &[bt, g, h, d]);
        let p = DualScopeParams {
            pad,
            scale: 0.125,
            local_bias: 1.0,
            global_bias: 11.0,
            token_num_scale: false,
        };
        let flops = 4.0 * (bt * n * h * (2 * pad + 1 + g) * d) as f64;
        let shape = format!("b{bt} n{n} h{h} d{d} p{pad} G{g}");
        b.case(
            "dual_scope_attention",
            &shape,
            "cpu",
            flops,
            "GFLOP/s",
            || {
                ops::dual_scope_attention(&q, &kl, &vl, &kg, &vg, &p).unwrap();
            },
        );
    }

    // Memory-bound ops: bytes = read x + write y.
    {
        let (n, s, c, g) = (16, 2560, 320, 32);
        let x = randn(&mut b.rng, &[n, s, c]);
        let gamma = randn(&mut b.rng, &[c]);
        let beta = randn(&mut b.rng, &[c]);
        let bytes = 2.0 * (n * s * c * 4) as f64;
        b.case(
            "group_norm+silu",
            &format!("[{n},{s},{c}] G{g}"),
            "cpu",
            bytes,
            "GB/s",
            || {
                ops::group_norm(&x, g, &gamma, &beta, 1e-6, true).unwrap();
            },
        );
        let y = randn(&mut b.rng, &[n, s, c]);
        b.case(
            "add",
            &format!("[{n},{s},{c}] x2"),
            "cpu",
            1.5 * bytes,
            "GB/s",
            || {
                ops::add(&x, &y).unwrap();
            },
        );
        b.case(
            "gelu",
            &format!("[{n},{s},{c}]"),
            "cpu",
            bytes,
            "GB/s",
            || {
                ops::gelu(&x).unwrap();
            },
        );
        let x4 = x.reshape(&[n, 40, 64, c]).unwrap();
        b.case(
            "permute nhwc->nchw",
            &format!("[{n},40,64,{c}]"),
            "cpu",
            bytes,
            "GB/s",
            || {
                ops::permute(&x4, &[0, 3, 1, 2]).unwrap();
            },
        );
    }
    println!("{} cases", b.rows.len());
}

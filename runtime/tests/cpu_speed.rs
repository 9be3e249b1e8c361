//! Timing probes of single CPU ops (ignored by default; the full table is `cargo bench --bench ops`).
//! Run: `cargo test -p vi-runtime --test cpu_speed -- --ignored --nocapture [name]`.

use std::time::Instant;

use vi_runtime::ops::{self, DualScopeParams};
use vi_runtime::Tensor;

fn t(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
        .collect();
    Tensor::from_vec(v, shape).unwrap()
}

fn time(name: &str, mut f: impl FnMut()) {
    f();
    let mut ts: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    println!("{name:<40} {:>9.3} ms (min {:.3})", ts[2], ts[0]);
}

#[test]
#[ignore]
fn elementwise() {
    let x = t(&[16, 2560, 320]);
    let y = t(&[16, 2560, 320]);
    let c = t(&[320]);
    let g = t(&[320]);
    let xs = t(&[16, 128, 320]);
    let ys = t(&[16, 128, 320]);
    time("small add same 655K", || drop(ops::add(&xs, &ys).unwrap()));
    time("small silu 655K", || drop(ops::silu(&xs).unwrap()));
    time("small gelu 655K", || drop(ops::gelu(&xs).unwrap()));
    time("small group_norm silu 655K", || {
        drop(ops::group_norm(&xs, 32, &g, &c, 1e-6, true).unwrap())
    });
    time("add same", || drop(ops::add(&x, &y).unwrap()));
    time("add bias", || drop(ops::add(&x, &c).unwrap()));
    time("gelu", || drop(ops::gelu(&x).unwrap()));
    time("silu", || drop(ops::silu(&x).unwrap()));
    time("group_norm silu", || {
        drop(ops::group_norm(&x, 32, &g, &c, 1e-6, true).unwrap())
    });
    time("group_norm_stats", || {
        drop(ops::group_norm_stats(&x, 32).unwrap())
    });
    time("layer_norm", || {
        drop(ops::layer_norm(&x, &g, &c, 1e-5).unwrap())
    });
    let x4 = x.reshape(&[16, 40, 64, 320]).unwrap();
    time("permute 0312", || {
        drop(ops::permute(&x4, &[0, 3, 1, 2]).unwrap())
    });
    time("upsample", || drop(ops::upsample_nearest2x(&x4).unwrap()));
}

#[test]
#[ignore]
fn attention() {
    let q = t(&[1, 1024, 5, 64]);
    time("attention 1024", || {
        drop(ops::attention(&q, &q, &q, 0.125, None, false).unwrap())
    });
    let q = t(&[2, 2560, 5, 64]);
    let kv = t(&[2, 77, 5, 64]);
    time("attention cross 2x2560x77", || {
        drop(ops::attention(&q, &kv, &kv, 0.125, None, false).unwrap())
    });
    let q = t(&[640, 16, 5, 64]);
    time("attention temporal 640x16", || {
        drop(ops::attention(&q, &q, &q, 0.125, None, false).unwrap())
    });
    let kl = t(&[640, 24, 5, 64]);
    let kg = t(&[640, 6, 5, 64]);
    let p = DualScopeParams {
        pad: 4,
        scale: 0.125,
        local_bias: 1.0,
        global_bias: 11.0,
        token_num_scale: false,
    };
    time("dual_scope 640x16 p4 G6", || {
        drop(ops::dual_scope_attention(&q, &kl, &kl, &kg, &kg, &p).unwrap())
    });
}

#[test]
#[ignore]
fn conv() {
    let x = t(&[1, 40, 64, 320]);
    let w = t(&[320, 320, 3, 3]);
    time("conv3x3 40x64x320", || {
        drop(ops::conv2d(&x, &w, None, 1, 1).unwrap())
    });
    let a = t(&[1024, 1024]);
    time("matmul 1024", || drop(ops::matmul(&a, &a).unwrap()));
}

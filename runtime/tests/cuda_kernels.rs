//! The hand-written CUDA kernels (GroupNorm, LayerNorm, softmax, attention, dual-scope attention)
//! against the CPU backend on random inputs, including tails (sizes not multiples of the tiles),
//! odd channel counts, bias/causal attention, several head dims, every storage dtype, and both
//! attention kernel families (tensor-core fast paths: `auto` = flash or the small-sequence kernel,
//! `flash`, the 4-warp flash variant `flash4`; and the simple kernels `simple`).
//!
//! The checks run in ONE test function: the kernel choice is switched for the whole process with
//! `vi_runtime::cuda::set_attn_kernel` (what `VI_ATTN_KERNEL` selects at start), which must not
//! change while another test thread runs (the ignored benchmark switches it too: run it alone,
//! `-- --ignored --test-threads=1`).
//! Without a GPU (or without the `cuda` feature) the test prints that it is skipped and passes.

#[cfg(feature = "cuda")]
mod gpu {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;
    use vi_runtime::cuda::{set_attn_kernel, AttnKernel};
    use vi_runtime::ops::{self, DualScopeParams};
    use vi_runtime::testing::{check_close_tensors, Tolerance};
    use vi_runtime::{DType, Device, Tensor};

    const DEV: Device = Device::Cuda(0);

    /// Tolerances (atol, rtol) per storage dtype of the GPU computation. The CPU reference gets the
    /// same dtype-rounded inputs, so these cover only the kernel's own rounding (fp32 math; bf16/f16
    /// output rounding and, in the tensor-core attention, the bf16/f16 probabilities of P·V).
    fn tol(dt: DType, f32_tol: (f64, f64)) -> (f64, f64) {
        match dt {
            DType::F32 => f32_tol,
            DType::F16 => (4e-3, 4e-3),
            DType::BF16 => (2e-2, 1.6e-2),
        }
    }

    /// Random data with a given mean and spread, rounded through `dt` (what the GPU will see).
    fn rand_vec(r: &mut StdRng, n: usize, mean: f32, std: f32, dt: DType) -> Vec<f32> {
        let v: Vec<f32> = (0..n)
            .map(|_| mean + std * r.sample::<f32, _>(StandardNormal))
            .collect();
        round(&v, dt)
    }

    fn round(v: &[f32], dt: DType) -> Vec<f32> {
        Tensor::from_vec(v.to_vec(), &[v.len()])
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_vec_f32()
            .unwrap()
    }

    fn cpu(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape).unwrap()
    }
    fn gpu(v: &[f32], shape: &[usize], dt: DType) -> Tensor {
        Tensor::from_slice_on(v, shape, DEV, dt).unwrap()
    }

    /// |got - want| <= atol + rtol |want| everywhere (NaN fails); prints max error and rel L2.
    /// Recorded, not panicking: one GPU session should report every failing case at once.
    fn check(what: &str, got: &Tensor, want: &Tensor, (atol, rtol): (f64, f64)) {
        let tol = Tolerance::elementwise(atol, rtol);
        if let Err(msg) = check_close_tensors(what, got, want, &tol) {
            println!("FAIL {msg}");
            FAILURES.lock().unwrap().push(msg);
        }
    }

    static FAILURES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    fn group_norms(r: &mut StdRng) {
        // (N, S, C, G): cg = 10, 40, 8, 2, 3 (vector widths 2, 8, 8, 2, 1), a temporal-sized one.
        let cases = [
            (2, 100, 320, 32),
            (1, 2560, 1280, 32),
            (3, 77, 64, 8),
            (2, 33, 6, 3),
            (2, 17, 15, 5),
            (1, 16 * 160, 640, 32),
            (2, 1, 64, 32),
        ];
        for &(n, s, c, g) in &cases {
            for dt in DTYPES {
                for silu in [false, true] {
                    // Offset mean: exercises the shifted sums of the statistics kernel.
                    let x = rand_vec(r, n * s * c, 3.0, 1.5, dt);
                    let gm = rand_vec(r, c, 1.0, 0.3, dt);
                    let bt = rand_vec(r, c, 0.0, 0.3, dt);
                    let want = ops::group_norm(
                        &cpu(&x, &[n, s, c]),
                        g,
                        &cpu(&gm, &[c]),
                        &cpu(&bt, &[c]),
                        1e-5,
                        silu,
                    )
                    .unwrap();
                    let got = ops::group_norm(
                        &gpu(&x, &[n, s, c], dt),
                        g,
                        &gpu(&gm, &[c], dt),
                        &gpu(&bt, &[c], dt),
                        1e-5,
                        silu,
                    )
                    .unwrap();
                    let what = format!("group_norm [{n},{s},{c}] G{g} {dt:?} silu {silu}");
                    check(&what, &got, &want, tol(dt, (1e-4, 1e-4)));
                }
            }
            // Statistics (f32 output) and apply with given stats.
            let x = rand_vec(r, n * s * c, -2.0, 2.0, DType::F32);
            let want = ops::group_norm_stats(&cpu(&x, &[n, s, c]), g).unwrap();
            let got = ops::group_norm_stats(&gpu(&x, &[n, s, c], DType::F32), g).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            check(
                &format!("group_norm_stats [{n},{s},{c}] G{g}"),
                &got,
                &want,
                (1e-4, 1e-4),
            );
            let st = want.to_vec_f32().unwrap();
            let mv: Vec<f32> = st
                .chunks_exact(3)
                .flat_map(|m| [m[1], m[2] / m[0]])
                .collect();
            let gm = rand_vec(r, c, 1.0, 0.3, DType::F32);
            let bt = rand_vec(r, c, 0.0, 0.3, DType::F32);
            for dt in DTYPES {
                let xr = round(&x, dt);
                let mvr = round(&mv, dt);
                let (gmr, btr) = (round(&gm, dt), round(&bt, dt));
                let want = ops::group_norm_apply(
                    &cpu(&xr, &[n, s, c]),
                    &cpu(&mvr, &[n, g, 2]),
                    &cpu(&gmr, &[c]),
                    &cpu(&btr, &[c]),
                    1e-6,
                    true,
                )
                .unwrap();
                let got = ops::group_norm_apply(
                    &gpu(&xr, &[n, s, c], dt),
                    &gpu(&mvr, &[n, g, 2], dt),
                    &gpu(&gmr, &[c], dt),
                    &gpu(&btr, &[c], dt),
                    1e-6,
                    true,
                )
                .unwrap();
                let what = format!("group_norm_apply [{n},{s},{c}] G{g} {dt:?}");
                check(&what, &got, &want, tol(dt, (1e-4, 1e-4)));
            }
        }
    }

    fn layer_norms_and_softmax(r: &mut StdRng) {
        for &(rows, c) in &[(2 * 77, 1280), (15, 7), (2, 1000), (40, 320), (3, 1)] {
            for dt in DTYPES {
                let x = rand_vec(r, rows * c, 1.0, 2.0, dt);
                let gm = rand_vec(r, c, 1.0, 0.3, dt);
                let bt = rand_vec(r, c, 0.0, 0.3, dt);
                let want =
                    ops::layer_norm(&cpu(&x, &[rows, c]), &cpu(&gm, &[c]), &cpu(&bt, &[c]), 1e-5)
                        .unwrap();
                let got = ops::layer_norm(
                    &gpu(&x, &[rows, c], dt),
                    &gpu(&gm, &[c], dt),
                    &gpu(&bt, &[c], dt),
                    1e-5,
                )
                .unwrap();
                check(
                    &format!("layer_norm [{rows},{c}] {dt:?}"),
                    &got,
                    &want,
                    tol(dt, (1e-4, 1e-4)),
                );
                // Softmax, with one row of all -inf and a few -inf entries elsewhere.
                let mut xs = rand_vec(r, rows * c, 0.0, 3.0, dt);
                xs[..c].fill(f32::NEG_INFINITY);
                for i in (c..xs.len()).step_by(5) {
                    xs[i] = f32::NEG_INFINITY;
                }
                let want = ops::softmax_last(&cpu(&xs, &[rows, c])).unwrap();
                let got = ops::softmax_last(&gpu(&xs, &[rows, c], dt)).unwrap();
                check(
                    &format!("softmax [{rows},{c}] {dt:?}"),
                    &got,
                    &want,
                    tol(dt, (1e-6, 1e-4)),
                );
            }
        }
    }

    /// (B, Sq, Sk, H, D, Dv, bias, causal)
    type AttnCase = (usize, usize, usize, usize, usize, usize, bool, bool);

    fn attentions(r: &mut StdRng, label: &str) {
        let cases: [AttnCase; 17] = [
            (2, 130, 77, 5, 64, 64, false, false), // cross-attention, tails on both sides
            (1, 77, 77, 4, 64, 64, true, true),    // CLIP text encoder
            (2, 200, 200, 2, 64, 64, false, true),
            (1, 300, 300, 1, 64, 64, true, false),
            (1, 64, 64, 3, 32, 32, false, false),
            (1, 70, 70, 2, 128, 128, false, true),
            (1, 40, 30, 3, 40, 40, false, false), // generic only (D = 40)
            (1, 20, 33, 2, 8, 16, true, false),   // D != Dv
            (1, 70, 70, 1, 512, 512, false, false), // VAE mid-block attention (wide kernel)
            (2, 45, 45, 2, 256, 256, true, true), // wide kernel with bias + causal
            (1, 1024, 1024, 1, 64, 64, false, false),
            (300, 16, 16, 5, 64, 64, false, false), // temporal attention over frames (small kernel)
            (7, 24, 24, 2, 64, 64, true, true),     // small kernel: two query tiles, bias, causal
            (3, 100, 100, 2, 128, 128, false, true),
            (3, 100, 50, 2, 128, 128, true, false),
            (1, 13, 13, 2, 12, 12, true, true), // generic, scalar key loads for bf16/f16
            (2, 5, 9, 3, 6, 10, false, false),  // generic, scalar key loads for every dtype
        ];
        for &(b, sq, sk, h, d, dv, with_bias, causal) in &cases {
            for dt in DTYPES {
                let scale = 1.0 / (d as f32).sqrt();
                let q = rand_vec(r, b * sq * h * d, 0.0, 1.0, dt);
                let k = rand_vec(r, b * sk * h * d, 0.0, 1.0, dt);
                let v = rand_vec(r, b * sk * h * dv, 0.0, 1.0, dt);
                let bias = rand_vec(r, sq * sk, 0.0, 1.0, dt);
                let (qs, ks, vs) = ([b, sq, h, d], [b, sk, h, d], [b, sk, h, dv]);
                let want = ops::attention(
                    &cpu(&q, &qs),
                    &cpu(&k, &ks),
                    &cpu(&v, &vs),
                    scale,
                    with_bias.then(|| cpu(&bias, &[sq, sk])).as_ref(),
                    causal,
                )
                .unwrap();
                let got = ops::attention(
                    &gpu(&q, &qs, dt),
                    &gpu(&k, &ks, dt),
                    &gpu(&v, &vs, dt),
                    scale,
                    with_bias.then(|| gpu(&bias, &[sq, sk], dt)).as_ref(),
                    causal,
                )
                .unwrap();
                let what = format!(
                    "attention[{label}] B{b} Sq{sq} Sk{sk} H{h} D{d} Dv{dv} bias {with_bias} \
                     causal {causal} {dt:?}"
                );
                check(&what, &got, &want, tol(dt, (2e-5, 1e-4)));
            }
        }
    }

    /// (b, n, H, D, pad, G, token_num_scale)
    type DualCase = (usize, usize, usize, usize, usize, usize, bool);

    fn dual_scopes(r: &mut StdRng, label: &str) {
        let cases: [DualCase; 6] = [
            (37, 16, 5, 64, 4, 6, false),
            (10, 24, 2, 64, 2, 4, true), // two query tiles, the second one partial
            (5, 7, 3, 32, 1, 0, false),  // no global tokens
            (3, 40, 1, 128, 3, 9, true),
            (4, 9, 2, 40, 2, 3, false),   // generic only (D = 40)
            (2, 16, 1, 64, 8, 20, false), // wide window: several key tiles
        ];
        for &(b, n, h, d, pad, g, tns) in &cases {
            for dt in DTYPES {
                let p = DualScopeParams {
                    pad,
                    scale: 1.0 / (d as f32).sqrt(),
                    local_bias: 11.0,
                    global_bias: 1.0,
                    token_num_scale: tns,
                };
                let nl = n + 2 * pad;
                let q = rand_vec(r, b * n * h * d, 0.0, 1.0, dt);
                let mut kl = rand_vec(r, b * nl * h * d, 0.0, 1.0, dt);
                let vl = rand_vec(r, b * nl * h * d, 0.0, 1.0, dt);
                // Zero keys at the video ends, as the clip-parallel context produces.
                kl[..pad * h * d].fill(0.0);
                let kg = rand_vec(r, b * g * h * d, 0.0, 1.0, dt);
                let vg = rand_vec(r, b * g * h * d, 0.0, 1.0, dt);
                let (qs, ls, gs) = ([b, n, h, d], [b, nl, h, d], [b, g, h, d]);
                let want = ops::dual_scope_attention(
                    &cpu(&q, &qs),
                    &cpu(&kl, &ls),
                    &cpu(&vl, &ls),
                    &cpu(&kg, &gs),
                    &cpu(&vg, &gs),
                    &p,
                )
                .unwrap();
                let got = ops::dual_scope_attention(
                    &gpu(&q, &qs, dt),
                    &gpu(&kl, &ls, dt),
                    &gpu(&vl, &ls, dt),
                    &gpu(&kg, &gs, dt),
                    &gpu(&vg, &gs, dt),
                    &p,
                )
                .unwrap();
                let what = format!(
                    "dual_scope[{label}] b{b} n{n} H{h} D{d} pad{pad} G{g} tns {tns} {dt:?}"
                );
                check(&what, &got, &want, tol(dt, (2e-5, 1e-4)));
            }
        }
    }

    /// Wait for all queued work of the device.
    fn sync() {
        vi_runtime::cuda::synchronize(0).unwrap();
    }

    /// Mean time of `f` over a few runs after a warm-up, in seconds.
    fn time(f: &dyn Fn() -> Tensor) -> f64 {
        drop(f());
        sync();
        let iters = 10;
        let t0 = std::time::Instant::now();
        let mut last = None;
        for _ in 0..iters {
            last = Some(f());
        }
        drop(last);
        sync();
        t0.elapsed().as_secs_f64() / iters as f64
    }

    fn report_bw(what: &str, bytes: f64, f: &dyn Fn() -> Tensor) {
        let t = time(f);
        println!(
            "BENCH {what}: {:.1} us, {:.0} GB/s",
            t * 1e6,
            bytes / t / 1e9
        );
    }

    fn report_flops(what: &str, flops: f64, f: &dyn Fn() -> Tensor) {
        let t = time(f);
        println!(
            "BENCH {what}: {:.1} us, {:.1} TFLOP/s",
            t * 1e6,
            flops / t / 1e12
        );
    }

    /// Throughput of the kernels at UNet sizes (320x512 video: 40x64 latents, 16 frames), bf16.
    /// Memory-bound kernels report GB/s (bytes = the minimal traffic), attention TFLOP/s.
    pub fn bench() {
        if !vi_runtime::cuda::is_available() {
            println!("SKIPPED cuda_kernels bench: no CUDA device available");
            return;
        }
        let dt = DType::BF16;
        let mut r = StdRng::seed_from_u64(7);
        let es = dt.size_in_bytes() as f64;
        // GroupNorm (+SiLU): spatial [16, 2560, 320], [16, 640, 640]; temporal [2, 16*2560, 320].
        for &(n, s, c) in &[
            (16, 2560, 320),
            (16, 640, 640),
            (2, 16 * 2560, 320),
            (16, 160, 1280),
        ] {
            let x = gpu(&rand_vec(&mut r, n * s * c, 0.5, 1.0, dt), &[n, s, c], dt);
            let gm = gpu(&rand_vec(&mut r, c, 1.0, 0.1, dt), &[c], dt);
            let bt = gpu(&rand_vec(&mut r, c, 0.0, 0.1, dt), &[c], dt);
            let bytes = 3.0 * (n * s * c) as f64 * es;
            report_bw(
                &format!("group_norm+silu [{n},{s},{c}] (3 passes)"),
                bytes,
                &|| ops::group_norm(&x, 32, &gm, &bt, 1e-5, true).unwrap(),
            );
            report_bw(
                &format!("group_norm_stats [{n},{s},{c}] (1 pass)"),
                bytes / 3.0,
                &|| ops::group_norm_stats(&x, 32).unwrap(),
            );
        }
        for &(rows, c) in &[(16 * 2560, 320), (16 * 640, 640), (2 * 77, 1024)] {
            let x = gpu(&rand_vec(&mut r, rows * c, 0.5, 1.0, dt), &[rows, c], dt);
            let gm = gpu(&rand_vec(&mut r, c, 1.0, 0.1, dt), &[c], dt);
            let bt = gpu(&rand_vec(&mut r, c, 0.0, 0.1, dt), &[c], dt);
            let bytes = 2.0 * (rows * c) as f64 * es;
            report_bw(&format!("layer_norm [{rows},{c}]"), bytes, &|| {
                ops::layer_norm(&x, &gm, &bt, 1e-5).unwrap()
            });
            report_bw(&format!("softmax [{rows},{c}]"), bytes, &|| {
                ops::softmax_last(&x).unwrap()
            });
        }
        // Attention: spatial self-attention, cross-attention (77 keys), level-1 self-attention.
        for &(b, sq, sk, h, d) in &[
            (16, 2560, 2560, 5, 64),
            (16, 2560, 77, 5, 64),
            (16, 640, 640, 10, 64),
            (5120, 16, 16, 5, 64), // temporal attention over 16 frames (LocalContext)
            (4, 2560, 2560, 1, 512), // VAE mid-block attention (4 frames)
        ] {
            let q = gpu(
                &rand_vec(&mut r, b * sq * h * d, 0.0, 1.0, dt),
                &[b, sq, h, d],
                dt,
            );
            let k = gpu(
                &rand_vec(&mut r, b * sk * h * d, 0.0, 1.0, dt),
                &[b, sk, h, d],
                dt,
            );
            let v = gpu(
                &rand_vec(&mut r, b * sk * h * d, 0.0, 1.0, dt),
                &[b, sk, h, d],
                dt,
            );
            let flops = 4.0 * (b * h * sq * sk * d) as f64;
            for (kind, choice) in [
                ("auto", AttnKernel::Auto),
                ("flash", AttnKernel::Flash),
                ("flash4", AttnKernel::Flash4),
                ("simple", AttnKernel::Simple),
            ] {
                set_attn_kernel(choice);
                report_flops(
                    &format!("attention[{kind}] B{b} Sq{sq} Sk{sk} H{h} D{d}"),
                    flops,
                    &|| ops::attention(&q, &k, &v, 0.125, None, false).unwrap(),
                );
            }
        }
        // Dual-scope temporal attention: b = 2*40*64 rows, n = 16 frames, 5 heads, p = 4, G = 6.
        let (b, n, h, d, pad, g) = (5120, 16, 5, 64, 4, 6);
        let nl = n + 2 * pad;
        let q = gpu(
            &rand_vec(&mut r, b * n * h * d, 0.0, 1.0, dt),
            &[b, n, h, d],
            dt,
        );
        let kl = gpu(
            &rand_vec(&mut r, b * nl * h * d, 0.0, 1.0, dt),
            &[b, nl, h, d],
            dt,
        );
        let vl = gpu(
            &rand_vec(&mut r, b * nl * h * d, 0.0, 1.0, dt),
            &[b, nl, h, d],
            dt,
        );
        let kg = gpu(
            &rand_vec(&mut r, b * g * h * d, 0.0, 1.0, dt),
            &[b, g, h, d],
            dt,
        );
        let vg = gpu(
            &rand_vec(&mut r, b * g * h * d, 0.0, 1.0, dt),
            &[b, g, h, d],
            dt,
        );
        let p = DualScopeParams {
            pad,
            scale: 0.125,
            local_bias: 11.0,
            global_bias: 1.0,
            token_num_scale: false,
        };
        let bytes = ((2 * n + 2 * nl + 2 * g) * b * h * d) as f64 * es;
        for (kind, choice) in [("auto", AttnKernel::Auto), ("simple", AttnKernel::Simple)] {
            set_attn_kernel(choice);
            report_bw(
                &format!("dual_scope[{kind}] b{b} n{n} H{h} D{d} p{pad} G{g}"),
                bytes,
                &|| ops::dual_scope_attention(&q, &kl, &vl, &kg, &vg, &p).unwrap(),
            );
        }
        set_attn_kernel(AttnKernel::Auto);
    }

    pub fn run() {
        if !vi_runtime::cuda::is_available() {
            println!("SKIPPED cuda_kernels: no CUDA device available");
            return;
        }
        vi_runtime::cuda::set_poison_allocations(true);
        let mut r = StdRng::seed_from_u64(0x5eed_cafe);
        group_norms(&mut r);
        layer_norms_and_softmax(&mut r);
        // The kernel choice is process-wide; this is the only test of the binary (module docs).
        set_attn_kernel(AttnKernel::Auto);
        attentions(&mut r, "auto");
        dual_scopes(&mut r, "auto");
        set_attn_kernel(AttnKernel::Flash);
        attentions(&mut r, "flash");
        set_attn_kernel(AttnKernel::Flash4);
        attentions(&mut r, "flash4");
        set_attn_kernel(AttnKernel::Simple);
        attentions(&mut r, "simple");
        dual_scopes(&mut r, "simple");
        set_attn_kernel(AttnKernel::Auto);
        let failures = FAILURES.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} kernel case(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// Kernel throughput at model sizes (GPU only):
/// `cargo test -p vi-runtime --features cuda --test cuda_kernels -- --ignored --nocapture --test-threads=1`
#[test]
#[ignore]
fn cuda_kernels_bench() {
    #[cfg(feature = "cuda")]
    gpu::bench();
}

#[test]
fn cuda_kernels_vs_cpu() {
    #[cfg(feature = "cuda")]
    gpu::run();
    #[cfg(not(feature = "cuda"))]
    println!("SKIPPED cuda_kernels: built without the `cuda` feature");
}

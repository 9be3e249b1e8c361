//! Clip parallelism over in-process ranks: the split and prompt rules, the denoising driver
//! (W = 1..4, frames complete and in order, failures propagate within a bound), the dual-scope
//! attention against a dense masked attention built from the whole video, and the exact-seam mode
//! (temporal conv layer and temporal GroupNorm over W ranks == the whole-video computation).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use vi_model::clip_parallel::{
    edge_first_pays, global_token_indices, ClipParallelContext, ViConfig, EDGE_FIRST_MIN_ROWS,
};
use vi_model::distributed::{
    concat_frames, prompt_for_clip, reference_prompt_index, reference_prompt_segments,
    run_denoising, run_ranks, split_frames, RankInfo,
};
use vi_model::params::{ModelError, Params, Result, StoreSource};
use vi_model::temporal::{FrameBlock, LocalContext, TemporalContext, TemporalConvLayer};
use vi_model::unet::{UNet3D, UNetConfig};
use vi_runtime::comm::{Communicator, Halos, Pending};
use vi_runtime::testing::{assert_close_tensors, closeness, Tolerance};
use vi_runtime::{ops, DType, Device, Result as RtResult, Tensor};
use vi_suite::golden_dir;
use vi_weights::WeightStore;

const TIMEOUT: Duration = Duration::from_secs(60);

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_vec(v, shape).unwrap()
}

fn weights() -> WeightStore {
    WeightStore::open(golden_dir().join("unet_tiny_seed0.weights.safetensors")).unwrap()
}

/// Panics naming `what` unless `got` is within atol + rtol |want| of `want` everywhere.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64, rtol: f64) {
    assert_close_tensors(what, got, want, &Tolerance::elementwise(atol, rtol));
}

/// max |a - b| (the reference modes must differ from the whole-video computation).
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    closeness(&a, &b, &Tolerance::EXACT).max_abs
}

// ---------------------------------------------------------------- split and prompt rules

#[test]
fn split_gives_the_first_ranks_one_extra_frame() {
    assert_eq!(split_frames(24, 3).unwrap(), vec![0..8, 8..16, 16..24]);
    assert_eq!(split_frames(10, 4).unwrap(), vec![0..3, 3..6, 6..8, 8..10]);
    assert_eq!(split_frames(7, 3).unwrap(), vec![0..3, 3..5, 5..7]);
    assert_eq!(split_frames(5, 1).unwrap(), vec![0..5]);
    assert_eq!(split_frames(4, 4).unwrap(), vec![0..1, 1..2, 2..3, 3..4]);
    for t in 1..40 {
        for w in 1..=t.min(9) {
            let s = split_frames(t, w).unwrap();
            assert_eq!(s.len(), w);
            assert_eq!(s[0].start, 0);
            assert_eq!(s[w - 1].end, t);
            for (i, r) in s.iter().enumerate() {
                assert!(!r.is_empty());
                if i > 0 {
                    assert_eq!(s[i - 1].end, r.start);
                    assert!(s[i - 1].len() >= r.len() && s[i - 1].len() - r.len() <= 1);
                }
            }
        }
    }
    assert!(split_frames(3, 4).is_err());
    assert!(split_frames(3, 0).is_err());
}

#[test]
fn prompts_by_frame_range_use_the_segment_of_the_first_frame() {
    let segs = vec![(0, "a"), (10, "b"), (25, "c")];
    let clips = split_frames(32, 4).unwrap(); // 0..8, 8..16, 16..24, 24..32
    let got: Vec<&str> = clips
        .iter()
        .map(|c| segs[prompt_for_clip(&segs, c).unwrap()].1)
        .collect();
    assert_eq!(got, ["a", "a", "b", "b"]);
    assert!(prompt_for_clip::<&str>(&[], &(0..1)).is_err());
    assert!(prompt_for_clip(&[(3, "x")], &(0..1)).is_err());
    assert!(prompt_for_clip(&[(0, "x"), (5, "y"), (5, "z")], &(0..1)).is_err());
}

#[test]
fn the_reference_prompt_rule_is_expressible_as_segments() {
    let prompts: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    for n in 1..=8 {
        for w in 1..=12 {
            let clips = split_frames(w * 3 + 1, w).unwrap();
            let segs = reference_prompt_segments(&prompts[..n], &clips);
            for (r, clip) in clips.iter().enumerate() {
                // Python: int(rank / world_size * len(prompts))
                let want = reference_prompt_index(r, w, n);
                assert_eq!(want, ((r as f64 / w as f64) * n as f64).floor() as usize);
                let i = prompt_for_clip(&segs, clip).unwrap();
                assert_eq!(segs[i].1, prompts[want], "n={n} w={w} r={r}");
            }
        }
    }
    // The golden multi-prompt cases: W=3 with 2 prompts -> ranks use [0, 0, 1]; W=2 -> [0, 1].
    let idx: Vec<usize> = (0..3).map(|r| reference_prompt_index(r, 3, 2)).collect();
    assert_eq!(idx, [0, 0, 1]);
    let idx: Vec<usize> = (0..2).map(|r| reference_prompt_index(r, 2, 2)).collect();
    assert_eq!(idx, [0, 1]);
}

// ---------------------------------------------------------------- config

#[test]
fn config_defaults_parsing_and_phases() {
    let d = ViConfig::default();
    assert_eq!((d.conv_pad, d.attn_pad, d.top_k), (4, 8, 16));
    assert!(d.dynamic_scale && !d.token_num_scale && !d.exact_seam);
    assert_eq!(d.phase_biases(900), (0.0, 10.0));
    assert_eq!(d.phase_biases(800), (0.0, 10.0)); // t = 800 is the global phase
    assert_eq!(d.phase_biases(799), (10.0, 0.0));

    let c = ViConfig::from_json_str(
        r#"{"attn": {"padding": 8, "top_k": 16, "top_k_chunk_size": 24, "attn_scale": 0.5,
            "token_num_scale": true, "dynamic_scale": true,
            "local_phase": {"t": 850, "local_biase": 10, "global_biase": 0},
            "global_phase": {"t": 850, "local_biase": 0, "global_biase": 10}},
            "conv_3d": {"padding": 1}, "conv_layer": {"padding": 2}, "exact_seam": true}"#,
    )
    .unwrap();
    assert_eq!((c.conv_pad, c.attn_pad, c.top_k), (2, 8, 16));
    assert!(c.token_num_scale && c.exact_seam && c.attn_scale == 0.5);
    assert_eq!(c.phase_biases(850), (0.0, 10.0));
    assert_eq!(c.phase_biases(849), (10.0, 0.0));
    // {} keeps every default (the reference's hard-coded conv padding 4).
    assert_eq!(ViConfig::from_json_str("{}").unwrap(), ViConfig::default());

    // Thresholds that differ: both phases or neither apply, as the reference's two `if`s.
    let c = ViConfig::from_json_str(
        r#"{"attn": {"local_phase": {"t": 900, "local_biase": 3, "global_biase": 1},
                     "global_phase": {"t": 700, "local_biase": 2, "global_biase": 5}}}"#,
    )
    .unwrap();
    assert_eq!(c.phase_biases(800), (5.0, 6.0));
    assert_eq!(c.phase_biases(950), (2.0, 5.0));
    assert_eq!(c.phase_biases(600), (3.0, 1.0));
    let mut nodyn = c.clone();
    nodyn.dynamic_scale = false;
    assert_eq!(nodyn.phase_biases(800), (0.0, 0.0));

    for bad in [
        r#"{"attn": {"paddin": 3}}"#,
        r#"{"attn": {"padding": -1}}"#,
        r#"{"attn": {"dynamic_scale": "yes"}}"#,
        r#"{"attn": {"local_phase": {"local_biase": 1}}}"#,
        r#"{"attn": {"dynamic_attn_tokens": true}}"#,
        r#"{"conv_layer": {"pad": 3}}"#,
        r#"{"convlayer": {}}"#,
        r#"[1]"#,
    ] {
        let e = ViConfig::from_json_str(bad).unwrap_err().to_string();
        assert!(e.contains("plugin_configs"), "{bad}: {e}");
    }
}

#[test]
fn global_token_indices_follow_the_reference() {
    // share = top_k // W; stride = max(n // share, 1), or only frame 0 when share = 0.
    assert_eq!(global_token_indices(8, 6, 3), vec![0, 4]);
    assert_eq!(global_token_indices(6, 4, 2), vec![0, 3]);
    assert_eq!(global_token_indices(8, 16, 1), (0..8).collect::<Vec<_>>());
    assert_eq!(global_token_indices(7, 6, 2), vec![0, 2, 4, 6]); // ceil(n/stride) > share
    assert_eq!(
        global_token_indices(24, 16, 8),
        (0..24).step_by(12).collect::<Vec<_>>()
    );
    assert_eq!(global_token_indices(5, 3, 4), vec![0]);
}

// ---------------------------------------------------------------- dual-scope attention

/// Dense reference of rank r's dual-scope attention, built from the WHOLE video's q/k/v
/// [b, T, H, D] and the clip boundaries, with an explicit [n, n+2p+G] bias matrix: `glob` are the
/// global key frames (video indices) and `(local_bias, global_bias)` the logit biases of the
/// unmasked local and global columns, both given as independent expectations.
#[allow(clippy::too_many_arguments)]
fn dense_dual_scope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    clips: &[std::ops::Range<usize>],
    r: usize,
    cfg: &ViConfig,
    glob: &[usize],
    (lb, gb): (f32, f32),
    scale: f32,
) -> Tensor {
    let (b, h, d) = (q.dim(0), q.dim(2), q.dim(3));
    let clip = clips[r].clone();
    let n = clip.len();
    let p = cfg.attn_pad;
    let w = clips.len();
    // Local columns: p slots left, n own, p right; a slot holds a frame or zeros.
    let mut local: Vec<Option<usize>> = vec![None; p];
    if r > 0 {
        let prev = &clips[r - 1];
        let m = p.min(prev.len());
        for j in 0..m {
            local[p - m + j] = Some(prev.end - m + j);
        }
    }
    local.extend(clip.clone().map(Some));
    let mut right: Vec<Option<usize>> = vec![None; p];
    if r + 1 < w {
        let next = &clips[r + 1];
        for (j, slot) in right.iter_mut().enumerate().take(p.min(next.len())) {
            *slot = Some(next.start + j);
        }
    }
    local.extend(right);
    let cols: Vec<Option<usize>> = local
        .iter()
        .cloned()
        .chain(glob.iter().map(|&g| Some(g)))
        .collect();
    let gather = |x: &Tensor| {
        let parts: Vec<Tensor> = cols
            .iter()
            .map(|c| match c {
                Some(f) => ops::narrow(x, 1, *f, 1).unwrap(),
                None => Tensor::zeros(&[b, 1, h, d], Device::Cpu, DType::F32).unwrap(),
            })
            .collect();
        let refs: Vec<&Tensor> = parts.iter().collect();
        ops::concat(&refs, 1).unwrap()
    };
    let (kk, vv) = (gather(k), gather(v));
    let s = cols.len();
    let mut bias = vec![0f32; n * s];
    for i in 0..n {
        for j in 0..s {
            bias[i * s + j] = if j < n + 2 * p {
                if j >= i && j <= i + 2 * p {
                    lb
                } else {
                    -1e30
                }
            } else {
                gb
            };
        }
    }
    let bias = Tensor::from_vec(bias, &[n, s]).unwrap();
    let qr = ops::narrow(q, 1, clip.start, n).unwrap();
    ops::attention(&qr, &kk, &vv, scale * cfg.attn_scale, Some(&bias), false).unwrap()
}

/// The global key frames (video indices) of the 13-frame video below, written out by hand from the
/// golden README "AttentionPlugin" rule, not computed with the code under test: share = top_k / W;
/// stride = max(n / share, 1) if share > 0, else only frame 0; each rank contributes its frames
/// 0, stride, 2*stride.. (ceil(n / stride) of them); concatenated in rank order; first top_k kept.
/// Clips of 13 frames: W=1 [0..13]; W=2 [0..7, 7..13]; W=3 [0..5, 5..9, 9..13];
/// W=4 [0..4, 4..7, 7..10, 10..13].
fn expected_global_frames(w: usize, top_k: usize) -> Vec<usize> {
    match (w, top_k) {
        // share 6: n=13 stride 2 -> 0,2,..,12 (7 frames) -> first 6.
        (1, 6) => vec![0, 2, 4, 6, 8, 10],
        // share 3: n=7 stride 2 -> 0,2,4,6; n=6 stride 2 -> 7,9,11 -> first 6.
        (2, 6) => vec![0, 2, 4, 6, 7, 9],
        // share 2: n=5 stride 2 -> 0,2,4; n=4 stride 2 -> 5,7 and 9,11 -> first 6.
        (3, 6) => vec![0, 2, 4, 5, 7, 9],
        // share 1: stride n -> each clip's first frame.
        (4, 6) => vec![0, 4, 7, 10],
        // share 4: n=13 stride 3 -> 0,3,6,9,12 -> first 4.
        (1, 4) => vec![0, 3, 6, 9],
        // share 2: n=7 stride 3 -> 0,3,6; n=6 stride 3 -> 7,10 -> first 4.
        (2, 4) => vec![0, 3, 6, 7],
        // share 1: each clip's first frame.
        (3, 4) => vec![0, 5, 9],
        // share 1 (4 / 4): each clip's first frame.
        (4, 4) => vec![0, 4, 7, 10],
        // share 16, 8, 5, 4: stride max(n / share, 1) = 1 everywhere -> every frame, 13 <= 16.
        (_, 16) => (0..13).collect(),
        // share 0: frame 0 of every clip, then the first 0 kept -> none.
        (_, 0) => vec![],
        _ => unreachable!("no expectation for W={w} top_k={top_k}"),
    }
}

#[test]
fn dual_scope_attention_equals_dense_masked_attention() {
    let (b, h, d) = (3, 2, 4);
    let t_total = 13;
    let q = randn(&[b, t_total, h, d], 1);
    let k = randn(&[b, t_total, h, d], 2);
    let v = randn(&[b, t_total, h, d], 3);
    let scale = 0.5;
    let mut tested = 0;
    for w in 1..=4 {
        // (pad, top_k, dynamic_scale, t, (local bias, global bias)). The biases by the golden
        // README rule, with ViConfig::default()'s phases (local_phase t 800: local +10;
        // global_phase t 800: global +10): +1 base on every unmasked column; with dynamic_scale,
        // t >= 800 (global phase) adds 10 to the global columns, t < 800 (local phase) adds 10 to
        // the local ones; without dynamic_scale nothing is added.
        for (pad, top_k, dynamic, t, biases) in [
            (2usize, 6usize, true, 900i64, (1.0, 11.0)),
            (4, 6, true, 500, (11.0, 1.0)),
            (3, 4, false, 700, (1.0, 1.0)),
            // pad larger than every clip: zero completion; t = 800 is the global phase
            // (t >= global_phase.t), not the local one (t < local_phase.t).
            (8, 16, true, 800, (1.0, 11.0)),
            (1, 0, true, 100, (11.0, 1.0)), // no global token
        ] {
            let cfg = ViConfig {
                attn_pad: pad,
                top_k,
                dynamic_scale: dynamic,
                ..ViConfig::default()
            };
            let clips = split_frames(t_total, w).unwrap();
            let outs = run_ranks(w, TIMEOUT, |r, comm| {
                let c = &clips[r];
                let sl = |x: &Tensor| ops::narrow(x, 1, c.start, c.len());
                let ctx = ClipParallelContext::new(comm, &cfg, t);
                ctx.attention(&sl(&q)?, &sl(&k)?, &sl(&v)?, scale)
            })
            .unwrap();
            let glob = expected_global_frames(w, top_k);
            for (r, out) in outs.iter().enumerate() {
                let want = dense_dual_scope(&q, &k, &v, &clips, r, &cfg, &glob, biases, scale);
                let what = format!("W={w} pad={pad} top_k={top_k} t={t} rank {r}");
                assert_close(&what, out, &want, 1e-5, 1e-5);
                tested += 1;
            }
        }
    }
    assert_eq!(tested, 5 * (1 + 2 + 3 + 4));
}

// ---------------------------------------------------------------- conv layer (reference mode)

#[test]
fn conv_layer_halo_uses_neighbour_frames_and_clamps_short_clips() {
    let store = weights();
    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32);
    let layer = TemporalConvLayer::load(
        Params::new(&src).pp("down_blocks.0.temp_convs.0").p(),
        32,
        8,
        1e-5,
    )
    .unwrap();
    let (b, s, c) = (2, 6, 32);
    for (t_total, w) in [(16usize, 2usize), (10, 3), (7, 3), (4, 4)] {
        let x = randn(&[b, t_total, s, c], 10 + t_total as u64);
        let clips = split_frames(t_total, w).unwrap();
        let cfg = ViConfig::default();
        let outs = run_ranks(w, TIMEOUT, |r, comm| {
            let cl = &clips[r];
            let ctx = ClipParallelContext::new(comm, &cfg, 900);
            ctx.conv_layer(&layer, &ops::narrow(&x, 1, cl.start, cl.len())?)
        })
        .unwrap();
        let p = cfg.conv_pad;
        for (r, out) in outs.iter().enumerate() {
            // The window by the stated rule: min(P, n_neighbour) frames from each neighbour,
            // P zero frames at the video's ends; body on it; centre kept; residual added.
            let cl = clips[r].clone();
            let zeros = Tensor::zeros(&[b, p, s, c], Device::Cpu, DType::F32).unwrap();
            let left = if r == 0 {
                zeros.clone()
            } else {
                let m = p.min(clips[r - 1].len());
                ops::narrow(&x, 1, cl.start - m, m).unwrap()
            };
            let right = if r + 1 == w {
                zeros
            } else {
                let m = p.min(clips[r + 1].len());
                ops::narrow(&x, 1, cl.end, m).unwrap()
            };
            let own = ops::narrow(&x, 1, cl.start, cl.len()).unwrap();
            let win = ops::concat(&[&left, &own, &right], 1).unwrap();
            let body = layer.body(&win).unwrap();
            let want =
                ops::add(&own, &ops::narrow(&body, 1, left.dim(1), cl.len()).unwrap()).unwrap();
            assert_close(
                &format!("T={t_total} W={w} rank {r}"),
                out,
                &want,
                1e-6,
                1e-6,
            );
        }
    }
}

// ---------------------------------------------------------------- exact-seam mode

#[test]
fn exact_seam_conv_layer_and_group_norm_equal_the_whole_video() {
    let store = weights();
    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32);
    let p = Params::new(&src);
    let layer =
        TemporalConvLayer::load(p.pp("down_blocks.0.temp_convs.0").p(), 32, 8, 1e-5).unwrap();
    let gamma = p
        .get("down_blocks.0.temp_attentions.0.norm.weight", &[32])
        .unwrap();
    let beta = p
        .get("down_blocks.0.temp_attentions.0.norm.bias", &[32])
        .unwrap();
    let cfg = ViConfig {
        exact_seam: true,
        ..ViConfig::default()
    };
    let (b, s, c) = (2, 5, 32);
    let mut cases = 0;
    // Equal clips (12 over 2, 3, 4) and unequal ones (11 over 2, 3, 4; 5 over 4: clips of 1-2).
    for t_total in [12usize, 11, 5] {
        // Non-zero mean, so that the statistics really need the Chan combination.
        let x = ops::affine(&randn(&[b, t_total, s, c], 40 + t_total as u64), 1.5, 0.7).unwrap();
        let whole_conv = LocalContext.conv_layer(&layer, &x).unwrap();
        let xs = x.reshape(&[b, t_total * s, c]).unwrap();
        let whole_gn = LocalContext
            .temporal_group_norm(&xs, 8, &gamma, &beta, 1e-6, DType::F32)
            .unwrap()
            .reshape(&[b, t_total, s, c])
            .unwrap();
        for w in [2usize, 3, 4] {
            let clips = split_frames(t_total, w).unwrap();
            let outs = run_ranks(w, TIMEOUT, |r, comm| {
                let cl = &clips[r];
                let xr = ops::narrow(&x, 1, cl.start, cl.len())?;
                let ctx = ClipParallelContext::new(comm, &cfg, 900);
                let conv = ctx.conv_layer(&layer, &xr)?;
                let gn = ctx
                    .temporal_group_norm(
                        &xr.reshape(&[b, cl.len() * s, c])?,
                        8,
                        &gamma,
                        &beta,
                        1e-6,
                        DType::F32,
                    )?
                    .reshape(&[b, cl.len(), s, c])?;
                Ok((conv, gn))
            })
            .unwrap();
            let convs: Vec<Tensor> = outs.iter().map(|o| o.0.clone()).collect();
            let gns: Vec<Tensor> = outs.iter().map(|o| o.1.clone()).collect();
            let conv = concat_frames(&convs, 1).unwrap();
            let gn = concat_frames(&gns, 1).unwrap();
            // float32 rounding: a few ulp of values of order 1-10.
            assert_close(
                &format!("exact-seam conv layer T={t_total} W={w}"),
                &conv,
                &whole_conv,
                2e-6,
                2e-6,
            );
            assert_close(
                &format!("exact-seam group norm T={t_total} W={w}"),
                &gn,
                &whole_gn,
                2e-6,
                2e-6,
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 9);

    // Reference mode is NOT the whole-video computation (GroupNorm over the padded window).
    let x = randn(&[b, 12, s, c], 52);
    let whole = LocalContext.conv_layer(&layer, &x).unwrap();
    let clips = split_frames(12, 2).unwrap();
    let outs = run_ranks(2, TIMEOUT, |r, comm| {
        let ctx = ClipParallelContext::new(comm, &ViConfig::default(), 900);
        ctx.conv_layer(&layer, &ops::narrow(&x, 1, clips[r].start, clips[r].len())?)
    })
    .unwrap();
    let m = max_diff(&concat_frames(&outs, 1).unwrap(), &whole);
    assert!(
        m > 1e-3,
        "reference mode unexpectedly equals the whole video ({m})"
    );
}

// ---------------------------------------------------------------- denoising driver

#[test]
fn gathered_frames_are_complete_and_in_order() {
    // init = the global frame index in every element; step adds nothing frame-dependent.
    for t_total in [1usize, 4, 7, 12] {
        for w in 1..=t_total.min(6) {
            let init = |info: &RankInfo| -> Result<Tensor> {
                let n = info.frames.len();
                let v: Vec<f32> = info.frames.clone().flat_map(|f| [f as f32; 3]).collect();
                Ok(Tensor::from_vec(v, &[1, n, 3])?)
            };
            let step = |_: &RankInfo,
                        _: usize,
                        _: i64,
                        x: &Tensor,
                        _: &dyn TemporalContext|
             -> Result<Tensor> { Ok(ops::affine(x, 1.0, 0.0)?) };
            let parts = run_denoising(
                w,
                TIMEOUT,
                t_total,
                &ViConfig::default(),
                &[900, 500],
                &init,
                &step,
            )
            .unwrap();
            assert_eq!(parts.len(), w);
            let all = concat_frames(&parts, 1).unwrap();
            assert_eq!(all.shape(), [1, t_total, 3]);
            let want: Vec<f32> = (0..t_total).flat_map(|f| [f as f32; 3]).collect();
            assert_eq!(all.to_vec_f32().unwrap(), want, "T={t_total} W={w}");
        }
    }
}

struct Tiny {
    store: WeightStore,
    cfg: UNetConfig,
}

fn tiny() -> Tiny {
    let meta_store = WeightStore::open(golden_dir().join("unet_vi_w2_nodyn.safetensors")).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&meta_store.metadata(0)["config"]).unwrap();
    Tiny {
        store: weights(),
        cfg: UNetConfig::from_json(&config).unwrap(),
    }
}

#[test]
fn tiny_unet_denoising_over_1_to_4_ranks() {
    let tiny = tiny();
    let src = StoreSource::new(&tiny.store, "weight/", Device::Cpu, DType::F32);
    let unet = UNet3D::load(&tiny.cfg, Params::new(&src)).unwrap();
    let t_total = 10; // 10 over 3 or 4 ranks: unequal clips, some shorter than both halos
    let (h, w_lat) = (8, 8);
    let noise = randn(&[2, t_total, h, w_lat, 4], 7); // the whole video's initial latents
    let ehs = randn(&[2, 77, tiny.cfg.cross_attention_dim], 8);
    let timesteps = [900i64, 700];
    let cfg = ViConfig::default();
    for world in 1..=4 {
        let per_rank: Mutex<Vec<Option<Tensor>>> = Mutex::new(vec![None; world]);
        let init = |info: &RankInfo| -> Result<Tensor> {
            Ok(ops::narrow(
                &noise,
                1,
                info.frames.start,
                info.frames.len(),
            )?)
        };
        let step = |info: &RankInfo,
                    _: usize,
                    t: i64,
                    x: &Tensor,
                    ctx: &dyn TemporalContext|
         -> Result<Tensor> {
            let eps = unet.forward(x, t as f32, 24.0, &ehs, ctx)?;
            let next = ops::sub(x, &ops::scale(&eps, 0.1)?)?; // a toy sampler step
            per_rank.lock().unwrap()[info.rank] = Some(next.clone());
            Ok(next)
        };
        let parts = run_denoising(world, TIMEOUT, t_total, &cfg, &timesteps, &init, &step).unwrap();
        let clips = split_frames(t_total, world).unwrap();
        assert_eq!(parts.len(), world);
        let recorded = per_rank.into_inner().unwrap();
        for (r, part) in parts.iter().enumerate() {
            assert_eq!(part.shape(), [2, clips[r].len(), h, w_lat, 4]);
            // Rank 0 received exactly what rank r computed.
            let mine = recorded[r].as_ref().unwrap();
            assert_eq!(part.to_vec_f32().unwrap(), mine.to_vec_f32().unwrap());
            assert!(part.to_vec_f32().unwrap().iter().all(|v| v.is_finite()));
        }
        let video = concat_frames(&parts, 1).unwrap();
        assert_eq!(video.shape(), [2, t_total, h, w_lat, 4]);
        if world == 1 {
            // One rank: the same as the UNet called directly with a 1-rank context.
            let direct = run_ranks(1, TIMEOUT, |_, comm| {
                let mut x = noise.clone();
                for &t in &timesteps {
                    let ctx = ClipParallelContext::new(comm, &cfg, t);
                    let eps = unet.forward(&x, t as f32, 24.0, &ehs, &ctx)?;
                    x = ops::sub(&x, &ops::scale(&eps, 0.1)?)?;
                }
                Ok(x)
            })
            .unwrap();
            assert_eq!(video.to_vec_f32().unwrap(), direct[0].to_vec_f32().unwrap());
        }
    }
}

// ---------------------------------------------------------------- failures

fn conv_layer() -> (WeightStore, UNetConfig) {
    let t = tiny();
    (t.store, t.cfg)
}

#[test]
fn a_rank_failing_mid_step_stops_every_rank_within_the_bound() {
    let (store, _) = conv_layer();
    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32);
    let layer = TemporalConvLayer::load(
        Params::new(&src).pp("down_blocks.0.temp_convs.0").p(),
        32,
        8,
        1e-5,
    )
    .unwrap();
    let x = randn(&[1, 12, 4, 32], 3);
    let init = |info: &RankInfo| -> Result<Tensor> {
        Ok(ops::narrow(&x, 1, info.frames.start, info.frames.len())?)
    };
    for mode in ["error", "panic"] {
        let t0 = Instant::now();
        let step = |info: &RankInfo,
                    i: usize,
                    _: i64,
                    x: &Tensor,
                    ctx: &dyn TemporalContext|
         -> Result<Tensor> {
            let y = ctx.conv_layer(&layer, x)?;
            if info.rank == 1 && i == 2 {
                if mode == "panic" {
                    panic!("simulated crash in the model");
                }
                return Err(ModelError::Msg("simulated model failure".into()));
            }
            ctx.conv_layer(&layer, &y)
        };
        // A long timeout: the failure must propagate by abort, not by timing out.
        let err = run_denoising(
            3,
            Duration::from_secs(120),
            12,
            &ViConfig::default(),
            &[900, 800, 700, 600, 500],
            &init,
            &step,
        )
        .unwrap_err()
        .to_string();
        let elapsed = t0.elapsed();
        println!("{mode}: {elapsed:?}: {err}");
        assert!(
            elapsed < Duration::from_secs(30),
            "{mode}: took {elapsed:?}"
        );
        assert!(err.contains("rank 1"), "{err}");
        let want = if mode == "panic" {
            "simulated crash in the model"
        } else {
            "simulated model failure"
        };
        assert!(err.contains(want), "{err}");
        // Every rank reported an error (ranks 0 and 2 were stopped by the abort).
        assert!(
            err.contains("rank 0: ") && err.contains("rank 2: "),
            "{err}"
        );
    }
}

#[test]
fn a_hung_rank_makes_the_others_fail_after_the_timeout() {
    let t0 = Instant::now();
    let res = run_ranks(3, Duration::from_millis(400), |r, comm| {
        comm.barrier()?;
        if r == 2 {
            std::thread::sleep(Duration::from_millis(3000)); // hangs past the timeout
        }
        comm.barrier()?;
        Ok(r)
    });
    let elapsed = t0.elapsed();
    let err = res.unwrap_err().to_string();
    assert!(err.contains("timed out") && err.contains("rank 2"), "{err}");
    // Ranks 0 and 1 fail after ~0.4 s; the run returns once the hung rank wakes up.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

/// With exact-seam statistics and halos, no global token (top_k 0) and clips of at least
/// `attn_pad` frames, every frame sees exactly the same keys whether the video is split or not:
/// the whole UNet over W ranks equals the 1-rank run on the whole video to float32 rounding.
#[test]
fn exact_seam_unet_over_w_ranks_equals_one_rank() {
    let tiny = tiny();
    let src = StoreSource::new(&tiny.store, "weight/", Device::Cpu, DType::F32);
    let unet = UNet3D::load(&tiny.cfg, Params::new(&src)).unwrap();
    let cfg = ViConfig {
        exact_seam: true,
        top_k: 0,
        attn_pad: 2,
        ..ViConfig::default()
    };
    let t_total = 11;
    let x = randn(&[2, t_total, 8, 8, 4], 21);
    let ehs = randn(&[2, 77, tiny.cfg.cross_attention_dim], 22);
    let run = |world: usize| -> Tensor {
        let clips = split_frames(t_total, world).unwrap();
        let outs = run_ranks(world, TIMEOUT, |r, comm| {
            let xr = ops::narrow(&x, 1, clips[r].start, clips[r].len())?;
            let ctx = ClipParallelContext::new(comm, &cfg, 900);
            unet.forward(&xr, 900.0, 24.0, &ehs, &ctx)
        })
        .unwrap();
        concat_frames(&outs, 1).unwrap()
    };
    let whole = run(1);
    for world in [2, 3, 4] {
        // 11 frames: clips 6/5, 4/4/3, 3/3/3/2 -- all >= attn_pad.
        let split = run(world);
        assert_close(
            &format!("exact-seam UNet W={world} vs W=1"),
            &split,
            &whole,
            2e-5,
            1e-4,
        );
    }
    // The reference mode differs (GroupNorm over padded windows, local statistics).
    let ref_cfg = ViConfig {
        top_k: 0,
        attn_pad: 2,
        ..ViConfig::default()
    };
    let clips = split_frames(t_total, 2).unwrap();
    let outs = run_ranks(2, TIMEOUT, |r, comm| {
        let xr = ops::narrow(&x, 1, clips[r].start, clips[r].len())?;
        let ctx = ClipParallelContext::new(comm, &ref_cfg, 900);
        unet.forward(&xr, 900.0, 24.0, &ehs, &ctx)
    })
    .unwrap();
    let m = max_diff(&concat_frames(&outs, 1).unwrap(), &whole);
    assert!(
        m > 1e-4,
        "reference mode unexpectedly equals the exact-seam whole video ({m})"
    );
}

#[test]
fn ranks_on_explicit_devices() {
    use vi_model::distributed::run_ranks_on_devices;
    let out = run_ranks_on_devices(&[Device::Cpu; 3], TIMEOUT, |r, comm| {
        let s = comm.all_reduce_sum(&Tensor::from_vec(vec![r as f32 + 1.0], &[1])?)?;
        Ok((r, s.to_vec_f32()?[0]))
    })
    .unwrap();
    assert_eq!(out, vec![(0, 6.0), (1, 6.0), (2, 6.0)]);
    let err = run_ranks_on_devices(&[Device::Cpu; 2], TIMEOUT, |r, comm| {
        if r == 0 {
            return Err(ModelError::Msg("no".into()));
        }
        comm.barrier()?;
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 0 aborted: no"), "{err}");
}

// ---------------------------------------------------------------- schedules

/// The overlapped schedule (exchanges started early, independent work meanwhile) gives the
/// synchronous schedule's UNet output bit for bit, in the reference and exact-seam modes, for
/// equal and unequal clips (some shorter than the halos), with and without an injected delay
/// (which changes how the waits interleave, never the values).
#[test]
fn overlapped_and_synchronous_schedules_are_bit_identical() {
    use vi_runtime::comm::CommDelay;
    let tiny = tiny();
    let src = StoreSource::new(&tiny.store, "weight/", Device::Cpu, DType::F32);
    let unet = UNet3D::load(&tiny.cfg, Params::new(&src)).unwrap();
    let ehs = randn(&[2, 77, tiny.cfg.cross_attention_dim], 32);
    let run = |t_total: usize, world: usize, cfg: &ViConfig| -> Vec<Vec<f32>> {
        let x = randn(&[2, t_total, 8, 8, 4], 31);
        let clips = split_frames(t_total, world).unwrap();
        run_ranks(world, TIMEOUT, |r, comm| {
            let xr = ops::narrow(&x, 1, clips[r].start, clips[r].len())?;
            let ctx = ClipParallelContext::new(comm, cfg, 900);
            Ok(unet.forward(&xr, 900.0, 24.0, &ehs, &ctx)?.to_vec_f32()?)
        })
        .unwrap()
    };
    for exact_seam in [false, true] {
        // (frames, ranks, conv halo): clips 5/4, 3/3/3 (shorter than the halos), 7/7/6.
        for (t_total, world, conv_pad) in [(9, 2, 4), (9, 3, 4), (20, 3, 2)] {
            let base = ViConfig {
                exact_seam,
                conv_pad,
                attn_pad: 2,
                top_k: 4,
                ..ViConfig::default()
            };
            let sync = run(
                t_total,
                world,
                &ViConfig {
                    overlap: false,
                    ..base.clone()
                },
            );
            let overlapped = run(
                t_total,
                world,
                &ViConfig {
                    overlap: true,
                    ..base.clone()
                },
            );
            let delayed = run(
                t_total,
                world,
                &ViConfig {
                    overlap: true,
                    comm_delay: Some(CommDelay::parse("1ms").unwrap()),
                    ..base.clone()
                },
            );
            for r in 0..world {
                let what = format!("exact_seam={exact_seam} T={t_total} W={world} rank {r}");
                assert!(sync[r] == overlapped[r], "{what}: overlapped differs");
                assert!(sync[r] == delayed[r], "{what}: overlapped + delay differs");
            }
        }
    }
}

/// A rank's communicator that logs when each neighbour exchange starts (`log`, shared with the
/// test's per-frame block, which logs what it produces).
struct LoggingComm<'a> {
    inner: &'a dyn Communicator,
    log: &'a Mutex<Vec<String>>,
}

impl Communicator for LoggingComm<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn exchange_neighbors(&self, l: Option<&Tensor>, r: Option<&Tensor>) -> RtResult<Halos> {
        self.log.lock().unwrap().push("exchange".into());
        self.inner.exchange_neighbors(l, r)
    }
    fn start_exchange_neighbors(
        &self,
        l: Option<&Tensor>,
        r: Option<&Tensor>,
    ) -> RtResult<Pending<Halos>> {
        self.log.lock().unwrap().push("exchange".into());
        self.inner.start_exchange_neighbors(l, r)
    }
    fn all_gather(&self, t: &Tensor) -> RtResult<Vec<Tensor>> {
        self.inner.all_gather(t)
    }
    fn start_all_gather(&self, t: &Tensor) -> RtResult<Pending<Vec<Tensor>>> {
        self.inner.start_all_gather(t)
    }
    fn all_reduce_sum(&self, t: &Tensor) -> RtResult<Tensor> {
        self.inner.all_reduce_sum(t)
    }
    fn gather_to_root(&self, t: &Tensor) -> RtResult<Option<Vec<Tensor>>> {
        self.inner.gather_to_root(t)
    }
    fn barrier(&self) -> RtResult<()> {
        self.inner.barrier()
    }
    fn send_to(&self, dst: usize, t: &Tensor) -> RtResult<()> {
        self.inner.send_to(dst, t)
    }
    fn recv_from(&self, src: usize) -> RtResult<Tensor> {
        self.inner.recv_from(src)
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

/// The overlapped reference conv layer produces the frames its neighbours need first (rank 0
/// its last P, a middle rank its first and last P, the last rank its first P), starts their
/// halo exchange, and produces the other frames while it flies; the synchronous schedule
/// produces every frame before the exchange. Same output bit for bit, equal to the plain
/// conv layer on the whole produced clip; a middle clip of at most 2P frames is produced whole.
#[test]
fn overlapped_conv_layer_sends_the_edge_frames_before_producing_the_rest() {
    let (store, _) = conv_layer();
    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32);
    let layer = TemporalConvLayer::load(
        Params::new(&src).pp("down_blocks.0.temp_convs.0").p(),
        32,
        8,
        1e-5,
    )
    .unwrap();
    // (frames, ranks): clips 10/10/10 (P = 4: interiors of 6, 2, 6 frames), 8/8/8 (the middle
    // rank's neighbours need all its frames).
    for (t_total, world) in [(30, 3), (24, 3)] {
        let x = randn(&[2, t_total, 4, 32], 5);
        let clips = split_frames(t_total, world).unwrap();
        let run = |overlap: bool, block: FrameBlock| {
            run_ranks(world, TIMEOUT, |r, comm| {
                let log = Mutex::new(Vec::new());
                let logging = LoggingComm {
                    inner: comm,
                    log: &log,
                };
                let cfg = ViConfig {
                    overlap,
                    conv_pad: 4,
                    ..ViConfig::default()
                };
                let ctx = ClipParallelContext::new(&logging, &cfg, 900);
                let xr = ops::narrow(&x, 1, clips[r].start, clips[r].len())?;
                // A per-frame block: SiLU of the frames asked for.
                let produce = |s: usize, len: usize| -> Result<Tensor> {
                    log.lock().unwrap().push(format!("frames {s}+{len}"));
                    Ok(ops::silu(&ops::narrow(&xr, 1, s, len)?)?)
                };
                let y = ctx.conv_layer_from(&layer, xr.dim(1), block, &produce)?;
                let plain = ctx.conv_layer(&layer, &ops::silu(&xr)?)?;
                assert!(
                    y.to_vec_f32()? == plain.to_vec_f32()?,
                    "rank {r}: differs from the layer on the whole clip"
                );
                Ok((y.to_vec_f32()?, log.into_inner().unwrap()))
            })
            .unwrap()
        };
        // A block whose split pays (weights that stay in cache), and one whose split does not
        // (few rows per frame, weights read from memory at every call): produced whole.
        let cheap = FrameBlock {
            frame_rows: 8,
            weight_bytes: 1 << 10,
        };
        let heavy = FrameBlock {
            frame_rows: 8,
            weight_bytes: 64 << 20,
        };
        assert!(edge_first_pays(4, 10, cheap) && !edge_first_pays(4, 10, heavy));
        assert!(edge_first_pays(
            4,
            10,
            FrameBlock {
                frame_rows: EDGE_FIRST_MIN_ROWS / 4,
                ..heavy
            }
        ));
        let (sync, overlapped) = (run(false, cheap), run(true, cheap));
        let whole = run(true, heavy);
        let n = clips[1].len();
        for r in 0..world {
            let what = format!("T={t_total} W={world} rank {r}");
            assert!(sync[r].0 == overlapped[r].0, "{what}: schedules differ");
            // Both logs end with the plain conv layer's exchange.
            let want_sync = [format!("frames 0+{n}"), "exchange".into()];
            assert_eq!(sync[r].1[..2], want_sync, "{what}: synchronous");
            let want: Vec<String> = match (r, n) {
                (1, 8) => vec!["frames 0+8".into(), "exchange".into()],
                (0, _) => vec![
                    format!("frames {}+4", n - 4),
                    "exchange".into(),
                    format!("frames 0+{}", n - 4),
                ],
                (1, _) => vec![
                    "frames 0+4".into(),
                    format!("frames {}+4", n - 4),
                    "exchange".into(),
                    format!("frames 4+{}", n - 8),
                ],
                _ => vec![
                    "frames 0+4".into(),
                    "exchange".into(),
                    format!("frames 4+{}", n - 4),
                ],
            };
            assert_eq!(overlapped[r].1[..want.len()], want, "{what}: overlapped");
            assert!(whole[r].0 == sync[r].0, "{what}: whole block differs");
            assert_eq!(
                whole[r].1[..2],
                want_sync,
                "{what}: a heavy block is produced whole"
            );
        }
    }
}

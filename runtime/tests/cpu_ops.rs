//! The CPU backend against straightforward f64 references on random inputs (fixed seeds), including
//! odd and non-square sizes, plus a few shape-check error paths of `ops`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use vi_runtime::ops::{self, BinaryOp, DualScopeParams, UnaryOp};
use vi_runtime::testing::{assert_close, Tolerance};
use vi_runtime::Tensor;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard-normal data and the tensor holding it.
fn randn(r: &mut StdRng, shape: &[usize]) -> (Vec<f32>, Tensor) {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect();
    let t = Tensor::from_vec(v.clone(), shape).unwrap();
    (v, t)
}

fn data(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// ---------------------------------------------------------------- matmul / linear

/// a [batch, m, k] · b [batch_b, k, n] (or [batch_b, n, k] transposed), f64.
#[allow(clippy::too_many_arguments)]
fn ref_matmul(
    a: &[f32],
    b: &[f32],
    batch: usize,
    batch_b: usize,
    m: usize,
    k: usize,
    n: usize,
    trans_b: bool,
) -> Vec<f64> {
    let mut o = vec![0f64; batch * m * n];
    for bi in 0..batch {
        let bb = if batch_b == 1 { 0 } else { bi };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for l in 0..k {
                    let bv = if trans_b {
                        b[(bb * n + j) * k + l]
                    } else {
                        b[(bb * k + l) * n + j]
                    };
                    s += a[(bi * m + i) * k + l] as f64 * bv as f64;
                }
                o[(bi * m + i) * n + j] = s;
            }
        }
    }
    o
}

#[test]
fn matmul_shapes_and_broadcast() {
    let mut r = rng(1);
    let (m, k, n) = (37, 19, 23);
    for &(batch, batch_b, trans) in &[
        (3, 1, false),
        (3, 1, true),
        (3, 3, false),
        (3, 3, true),
        (8, 8, false),
        (1, 1, true),
    ] {
        let (av, a) = randn(&mut r, &[batch, m, k]);
        let bshape = if trans {
            [batch_b, n, k]
        } else {
            [batch_b, k, n]
        };
        let (bv, b) = randn(&mut r, &bshape);
        let b = if batch_b == 1 {
            b.reshape(&bshape[1..]).unwrap()
        } else {
            b
        };
        let got = if trans {
            ops::matmul_t(&a, &b).unwrap()
        } else {
            ops::matmul(&a, &b).unwrap()
        };
        assert_eq!(got.shape(), &[batch, m, n]);
        let want = ref_matmul(&av, &bv, batch, batch_b, m, k, n, trans);
        assert_close(
            "matmul",
            &data(&got),
            &want,
            &Tolerance::elementwise(1e-5, 1e-5),
        );
    }
    // 4-D batch dims.
    let (av, a) = randn(&mut r, &[2, 3, 5, 7]);
    let (bv, b) = randn(&mut r, &[2, 3, 7, 4]);
    let got = ops::matmul(&a, &b).unwrap();
    assert_eq!(got.shape(), &[2, 3, 5, 4]);
    assert_close(
        "matmul 4d",
        &data(&got),
        &ref_matmul(&av, &bv, 6, 6, 5, 7, 4, false),
        &Tolerance::elementwise(1e-5, 1e-5),
    );
    // A larger product (exercises gemm blocking and threading).
    let (av, a) = randn(&mut r, &[1, 130, 300]);
    let (bv, b) = randn(&mut r, &[300, 70]);
    let got = ops::matmul(&a, &b).unwrap();
    assert_close(
        "matmul big",
        &data(&got),
        &ref_matmul(&av, &bv, 1, 1, 130, 300, 70, false),
        &Tolerance::elementwise(1e-4, 1e-5),
    );
}

#[test]
fn linear_with_and_without_bias() {
    let mut r = rng(2);
    let (k, n) = (19, 23);
    let (xv, x) = randn(&mut r, &[2, 5, k]);
    let (wv, w) = randn(&mut r, &[n, k]);
    let (bv, b) = randn(&mut r, &[n]);
    let plain = ref_matmul(&xv, &wv, 1, 1, 10, k, n, true);
    let got = ops::linear(&x, &w, None).unwrap();
    assert_eq!(got.shape(), &[2, 5, n]);
    assert_close(
        "linear",
        &data(&got),
        &plain,
        &Tolerance::elementwise(1e-5, 1e-5),
    );
    let got = ops::linear(&x, &w, Some(&b)).unwrap();
    let want: Vec<f64> = plain
        .iter()
        .enumerate()
        .map(|(i, &v)| v + bv[i % n] as f64)
        .collect();
    assert_close(
        "linear+bias",
        &data(&got),
        &want,
        &Tolerance::elementwise(1e-5, 1e-5),
    );
}

// ---------------------------------------------------------------- convolutions

/// NHWC conv, PyTorch weight layout, f64.
#[allow(clippy::too_many_arguments)]
fn ref_conv2d(
    x: &[f32],
    [n, h, w, cin]: [usize; 4],
    wt: &[f32],
    [cout, kh, kw]: [usize; 3],
    bias: Option<&[f32]>,
    stride: usize,
    pad: usize,
) -> (Vec<f64>, [usize; 4]) {
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (w + 2 * pad - kw) / stride + 1;
    let mut o = vec![0f64; n * ho * wo * cout];
    for ni in 0..n {
        for oy in 0..ho {
            for ox in 0..wo {
                for co in 0..cout {
                    let mut s = bias.map_or(0.0, |b| b[co] as f64);
                    for ci in 0..cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((ni * h + iy as usize) * w + ix as usize) * cin + ci];
                                let wv = wt[((co * cin + ci) * kh + ky) * kw + kx];
                                s += xv as f64 * wv as f64;
                            }
                        }
                    }
                    o[((ni * ho + oy) * wo + ox) * cout + co] = s;
                }
            }
        }
    }
    (o, [n, ho, wo, cout])
}

#[test]
fn conv2d_matches_reference() {
    let mut r = rng(3);
    // (n, h, w, cin, cout, kh, kw, stride, pad, bias)
    let cases = [
        (2, 7, 5, 3, 4, 3, 3, 1, 1, true),
        (2, 7, 5, 3, 4, 3, 3, 2, 1, true),
        (1, 7, 5, 6, 5, 3, 3, 2, 0, false),
        (2, 7, 5, 3, 4, 1, 1, 1, 0, true),
        (1, 7, 5, 3, 4, 1, 1, 2, 0, false),
        (1, 6, 6, 2, 3, 3, 3, 1, 0, true),
        (1, 4, 9, 3, 2, 2, 3, 1, 2, true),
        // Enough im2col rows (1024) with K = 2304 to need several column blocks.
        (1, 32, 32, 256, 8, 3, 3, 1, 1, true),
    ];
    for (n, h, w, cin, cout, kh, kw, stride, pad, with_bias) in cases {
        let (xv, x) = randn(&mut r, &[n, h, w, cin]);
        let (wv, wt) = randn(&mut r, &[cout, cin, kh, kw]);
        let (bv, b) = randn(&mut r, &[cout]);
        let bias = with_bias.then_some(&b);
        let got = ops::conv2d(&x, &wt, bias, stride, pad).unwrap();
        let (want, shape) = ref_conv2d(
            &xv,
            [n, h, w, cin],
            &wv,
            [cout, kh, kw],
            with_bias.then_some(&bv[..]),
            stride,
            pad,
        );
        assert_eq!(got.shape(), &shape);
        let what = format!("conv2d {h}x{w} {cin}->{cout} k{kh}x{kw} s{stride} p{pad}");
        assert_close(
            &what,
            &data(&got),
            &want,
            &Tolerance::elementwise(1e-4, 1e-5),
        );
    }
}

#[test]
fn temporal_conv_matches_reference() {
    let mut r = rng(4);
    for &(b, f, s, cin, cout, k, five_d) in &[
        (2, 5, 3, 4, 6, 3, false),
        (1, 4, 2, 3, 5, 1, false),
        (1, 2, 3, 4, 3, 5, true),
        (2, 7, 6, 5, 4, 3, true),
    ] {
        let (xv, x) = randn(&mut r, &[b, f, s, cin]);
        let (wv, w) = randn(&mut r, &[cout, cin, k]);
        let (bv, bias) = randn(&mut r, &[cout]);
        let w = if five_d {
            w.reshape(&[cout, cin, k, 1, 1]).unwrap()
        } else {
            w
        };
        let got = ops::temporal_conv(&x, &w, Some(&bias)).unwrap();
        assert_eq!(got.shape(), &[b, f, s, cout]);
        let pad = (k - 1) / 2;
        let mut want = vec![0f64; b * f * s * cout];
        for bi in 0..b {
            for fo in 0..f {
                for si in 0..s {
                    for co in 0..cout {
                        let mut acc = bv[co] as f64;
                        for t in 0..k {
                            let fi = fo as isize + t as isize - pad as isize;
                            if fi < 0 || fi >= f as isize {
                                continue;
                            }
                            for ci in 0..cin {
                                let xval = xv[((bi * f + fi as usize) * s + si) * cin + ci];
                                acc += xval as f64 * wv[(co * cin + ci) * k + t] as f64;
                            }
                        }
                        want[((bi * f + fo) * s + si) * cout + co] = acc;
                    }
                }
            }
        }
        assert_close(
            "temporal_conv",
            &data(&got),
            &want,
            &Tolerance::elementwise(1e-5, 1e-5),
        );
    }
    // Without bias.
    let (xv, x) = randn(&mut r, &[1, 3, 2, 2]);
    let (wv, w) = randn(&mut r, &[1, 2, 3]);
    let got = data(&ops::temporal_conv(&x, &w, None).unwrap());
    // Frame 0 sees frames 0, 1 with taps 1, 2 at s = 0.
    let mut want0 = 0f64;
    for (t, fi) in [(1, 0), (2, 1)] {
        for ci in 0..2 {
            want0 += xv[(fi * 2) * 2 + ci] as f64 * wv[ci * 3 + t] as f64;
        }
    }
    assert_close(
        "temporal_conv nobias",
        &got[..1],
        &[want0],
        &Tolerance::elementwise(1e-6, 1e-6),
    );
}

// ---------------------------------------------------------------- norms

/// Per (n, g): (count, mean, M2) in f64.
fn ref_gn_stats(x: &[f32], n: usize, s: usize, c: usize, g: usize) -> Vec<(f64, f64, f64)> {
    let cg = c / g;
    let mut res = Vec::new();
    for ni in 0..n {
        for gi in 0..g {
            let vals: Vec<f64> = (0..s)
                .flat_map(|si| (0..cg).map(move |j| (si, j)))
                .map(|(si, j)| x[(ni * s + si) * c + gi * cg + j] as f64)
                .collect();
            let cnt = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / cnt;
            let m2 = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>();
            res.push((cnt, mean, m2));
        }
    }
    res
}

#[allow(clippy::too_many_arguments)]
fn ref_gn_apply(
    x: &[f32],
    n: usize,
    s: usize,
    c: usize,
    stats: &[(f64, f64)],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) -> Vec<f64> {
    let g = stats.len() / n;
    let cg = c / g;
    let mut o = vec![0f64; n * s * c];
    for ni in 0..n {
        for si in 0..s {
            for ch in 0..c {
                let (m, v) = stats[ni * g + ch / cg];
                let i = (ni * s + si) * c + ch;
                let y = (x[i] as f64 - m) / (v + eps).sqrt() * gamma[ch] as f64 + beta[ch] as f64;
                o[i] = if silu { y / (1.0 + (-y).exp()) } else { y };
            }
        }
    }
    o
}

/// The norms' tolerance: what the f32 ops reach (worst measured: rel L2 8e-7, max abs 2.3e-6 on the
/// offset-100 GroupNorm, 6e-8 elsewhere) with margin. The ceiling and the small-spread groups make
/// an epsilon off by 2x (1.1x on the small groups) fail (docs/testing.md "Mutation checks").
const NORM_TOL: Tolerance = Tolerance::elementwise(5e-6, 2e-5).with_max_rel_l2(2e-6);

/// Spread of group/row `i` of the norm tests: every other one small (variance ~1e-5, the order of
/// eps), so that the output depends on eps at first order.
fn spread(i: usize, small: bool) -> f32 {
    if small && i % 2 == 1 {
        3e-3
    } else {
        1.0
    }
}

#[test]
fn group_norm_stats_apply_and_fused() {
    let mut r = rng(5);
    // (n, s, c, g, offset, small): S not a multiple of anything; S = 3000 spans several statistic
    // chunks; an offset of 100 checks the stability of the variance; `small` groups of spread 3e-3.
    for &(n, s, c, g, offset, small) in &[
        (2, 13, 12, 4, 0.0, false),
        (3, 7, 10, 5, 0.0, false),
        (1, 3000, 12, 3, 100.0, false),
        (2, 1, 8, 8, 0.0, false),
        (2, 13, 12, 4, 0.0, true),
        (1, 3000, 12, 3, 0.0, true),
    ] {
        let (mut xv, _) = randn(&mut r, &[n, s, c]);
        let cg = c / g;
        for (i, v) in xv.iter_mut().enumerate() {
            *v = *v * spread(i % c / cg, small) + offset;
        }
        let x = Tensor::from_vec(xv.clone(), &[n, s, c]).unwrap();
        let (gv, gamma) = randn(&mut r, &[c]);
        let (bv, beta) = randn(&mut r, &[c]);
        let eps = 1e-5;
        let case = format!("n{n} s{s} c{c} g{g} offset {offset} small groups {small}");

        let rs = ref_gn_stats(&xv, n, s, c, g);
        let got = ops::group_norm_stats(&x, g).unwrap();
        assert_eq!(got.shape(), &[n, g, 3]);
        let want: Vec<f64> = rs.iter().flat_map(|&(a, b, m)| [a, b, m]).collect();
        assert_close(
            &format!("group_norm_stats {case}"),
            &data(&got),
            &want,
            &Tolerance::elementwise(1e-5, 1e-6),
        );

        let mv: Vec<(f64, f64)> = rs.iter().map(|&(cnt, m, m2)| (m, m2 / cnt)).collect();
        for silu in [false, true] {
            let want = ref_gn_apply(&xv, n, s, c, &mv, &gv, &bv, eps, silu);
            let got = ops::group_norm(&x, g, &gamma, &beta, eps as f32, silu).unwrap();
            assert_close(
                &format!("group_norm silu {silu} {case}"),
                &data(&got),
                &want,
                &NORM_TOL,
            );

            let st: Vec<f32> = mv.iter().flat_map(|&(m, v)| [m as f32, v as f32]).collect();
            let st = Tensor::from_vec(st, &[n, g, 2]).unwrap();
            let got = ops::group_norm_apply(&x, &st, &gamma, &beta, eps as f32, silu).unwrap();
            assert_close(
                &format!("group_norm_apply silu {silu} {case}"),
                &data(&got),
                &want,
                &NORM_TOL,
            );
        }
    }
}

#[test]
fn layer_norm_and_softmax() {
    let mut r = rng(6);
    let (xv, _) = randn(&mut r, &[3, 7, 33]);
    let (gv, gamma) = randn(&mut r, &[33]);
    let (bv, beta) = randn(&mut r, &[33]);
    for small in [false, true] {
        // Every other row of spread 3e-3 (variance ~ eps) when `small`.
        let xv: Vec<f32> = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| v * spread(i / 33, small))
            .collect();
        let x = Tensor::from_vec(xv.clone(), &[3, 7, 33]).unwrap();
        let got = ops::layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
        let mut want = vec![0f64; xv.len()];
        for (row, orow) in xv.chunks(33).zip(want.chunks_mut(33)) {
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / 33.0;
            let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / 33.0;
            for i in 0..33 {
                orow[i] = (row[i] as f64 - m) / (var + 1e-5).sqrt() * gv[i] as f64 + bv[i] as f64;
            }
        }
        let what = format!("layer_norm small rows {small}");
        assert_close(&what, &data(&got), &want, &NORM_TOL);
    }

    // Large logits: the max subtraction must keep this finite.
    let (mut sv, _) = randn(&mut r, &[4, 9]);
    sv.iter_mut().for_each(|v| *v *= 40.0);
    let s = Tensor::from_vec(sv.clone(), &[4, 9]).unwrap();
    let got = ops::softmax_last(&s).unwrap();
    let mut want = vec![0f64; sv.len()];
    for (row, orow) in sv.chunks(9).zip(want.chunks_mut(9)) {
        let m = row.iter().fold(f64::MIN, |a, &v| a.max(v as f64));
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for i in 0..9 {
            orow[i] = e[i] / z;
        }
    }
    assert_close(
        "softmax",
        &data(&got),
        &want,
        &Tolerance::elementwise(1e-6, 1e-5),
    );
}

// ---------------------------------------------------------------- attention

/// Softmax over `logits` (f64, -inf allowed) then the weighted sum of `values(j)`.
fn softmax_mix(logits: &[f64], dv: usize, values: impl Fn(usize) -> Vec<f64>) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&l| (l - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut o = vec![0f64; dv];
    for (j, &w) in e.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        for (oo, vv) in o.iter_mut().zip(values(j)) {
            *oo += w / z * vv;
        }
    }
    o
}

#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [b, sq, sk, h, d, dv]: [usize; 6],
    scale: f64,
    bias: Option<&[f32]>,
    causal: bool,
) -> Vec<f64> {
    let mut o = vec![0f64; b * sq * h * dv];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..sq {
                let logits: Vec<f64> = (0..sk)
                    .map(|j| {
                        if causal && j > i {
                            return f64::NEG_INFINITY;
                        }
                        let mut s = 0f64;
                        for l in 0..d {
                            s += q[((bi * sq + i) * h + hi) * d + l] as f64
                                * k[((bi * sk + j) * h + hi) * d + l] as f64;
                        }
                        s * scale + bias.map_or(0.0, |bm| bm[i * sk + j] as f64)
                    })
                    .collect();
                let row = softmax_mix(&logits, dv, |j| {
                    (0..dv)
                        .map(|l| v[((bi * sk + j) * h + hi) * dv + l] as f64)
                        .collect()
                });
                let base = ((bi * sq + i) * h + hi) * dv;
                o[base..base + dv].copy_from_slice(&row);
            }
        }
    }
    o
}

#[test]
fn attention_matches_reference() {
    let mut r = rng(7);
    // (b, sq, sk, h, d, dv, bias, causal); sq = 130 spans three query blocks (last one partial).
    let cases = [
        (2, 5, 7, 3, 4, 6, true, false),
        (2, 5, 7, 3, 4, 4, false, false),
        (1, 9, 9, 2, 8, 8, true, true),
        (2, 9, 9, 2, 8, 8, false, true),
        (1, 130, 70, 2, 16, 16, true, false),
        (1, 130, 130, 1, 8, 8, false, true),
        (3, 1, 77, 2, 5, 3, false, false),
        // Full-size spatial sequence (40x64 latent): query blocks of 25 rows against 2560 keys.
        (1, 2560, 2560, 1, 4, 4, false, false),
    ];
    for (b, sq, sk, h, d, dv, with_bias, causal) in cases {
        let (qv, q) = randn(&mut r, &[b, sq, h, d]);
        let (kv, k) = randn(&mut r, &[b, sk, h, d]);
        let (vv, v) = randn(&mut r, &[b, sk, h, dv]);
        let (bv, bias) = randn(&mut r, &[sq, sk]);
        let scale = 1.0 / (d as f32).sqrt();
        let got = ops::attention(&q, &k, &v, scale, with_bias.then_some(&bias), causal).unwrap();
        assert_eq!(got.shape(), &[b, sq, h, dv]);
        let want = ref_attention(
            &qv,
            &kv,
            &vv,
            [b, sq, sk, h, d, dv],
            scale as f64,
            with_bias.then_some(&bv[..]),
            causal,
        );
        let what = format!("attention b{b} sq{sq} sk{sk} bias {with_bias} causal {causal}");
        assert_close(
            &what,
            &data(&got),
            &want,
            &Tolerance::elementwise(1e-5, 1e-4),
        );
    }
}

#[test]
fn dual_scope_attention_matches_reference() {
    let mut r = rng(8);
    // (b, n, h, d, pad, g, token_num_scale)
    let cases = [
        (3, 5, 2, 8, 0, 0, false),
        (3, 5, 2, 8, 1, 2, true),
        (2, 6, 3, 11, 2, 3, false),
        (2, 8, 2, 16, 4, 6, true),
        (1, 4, 1, 5, 4, 1, false),
        // n > 16: several query blocks, the last one partial.
        (2, 37, 2, 8, 2, 3, true),
        (1, 20, 1, 4, 4, 0, false),
    ];
    for (b, n, h, d, pad, g, tns) in cases {
        let nl = n + 2 * pad;
        let (qv, q) = randn(&mut r, &[b, n, h, d]);
        let (klv, kl) = randn(&mut r, &[b, nl, h, d]);
        let (vlv, vl) = randn(&mut r, &[b, nl, h, d]);
        let (kgv, kg) = randn(&mut r, &[b, g, h, d]);
        let (vgv, vg) = randn(&mut r, &[b, g, h, d]);
        let p = DualScopeParams {
            pad,
            scale: 0.7 / (d as f32).sqrt(),
            local_bias: 1.0,
            global_bias: 11.0 - 3.0 * (pad % 2) as f32,
            token_num_scale: tns,
        };
        let got = ops::dual_scope_attention(&q, &kl, &vl, &kg, &vg, &p).unwrap();
        assert_eq!(got.shape(), &[b, n, h, d]);
        // Dense reference: keys [local (n + 2p) ; global (G)], masked outside i..=i+2p.
        let visible = (2 * pad + 1 + g) as f64;
        let scale = p.scale as f64 * if tns { visible.ln() / 16f64.ln() } else { 1.0 };
        let mut want = vec![0f64; b * n * h * d];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..n {
                    let qrow = |l: usize| qv[((bi * n + i) * h + hi) * d + l] as f64;
                    let key = |j: usize, l: usize| {
                        if j < nl {
                            klv[((bi * nl + j) * h + hi) * d + l] as f64
                        } else {
                            kgv[((bi * g + j - nl) * h + hi) * d + l] as f64
                        }
                    };
                    let logits: Vec<f64> = (0..nl + g)
                        .map(|j| {
                            if j < nl && (j < i || j > i + 2 * pad) {
                                return f64::NEG_INFINITY;
                            }
                            let s: f64 = (0..d).map(|l| qrow(l) * key(j, l)).sum();
                            let bias = if j < nl { p.local_bias } else { p.global_bias };
                            s * scale + bias as f64
                        })
                        .collect();
                    let row = softmax_mix(&logits, d, |j| {
                        (0..d)
                            .map(|l| {
                                if j < nl {
                                    vlv[((bi * nl + j) * h + hi) * d + l] as f64
                                } else {
                                    vgv[((bi * g + j - nl) * h + hi) * d + l] as f64
                                }
                            })
                            .collect()
                    });
                    let base = ((bi * n + i) * h + hi) * d;
                    want[base..base + d].copy_from_slice(&row);
                }
            }
        }
        let what = format!("dual_scope n{n} p{pad} G{g} tns {tns}");
        assert_close(
            &what,
            &data(&got),
            &want,
            &Tolerance::elementwise(1e-5, 1e-4),
        );
    }
}

// ---------------------------------------------------------------- elementwise

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

#[test]
fn unary_geglu_affine_clamp() {
    let mut r = rng(9);
    let (mut xv, _) = randn(&mut r, &[5, 41]);
    xv.iter_mut().for_each(|v| *v *= 3.0);
    let x = Tensor::from_vec(xv.clone(), &[5, 41]).unwrap();
    let x64 = f64s(&xv);
    type Ref = fn(f64) -> f64;
    let cases: [(UnaryOp, Ref); 4] = [
        (UnaryOp::Silu, |v| v / (1.0 + (-v).exp())),
        (UnaryOp::Gelu, gelu64),
        (UnaryOp::Exp, f64::exp),
        (UnaryOp::Neg, |v| -v),
    ];
    for (op, f) in cases {
        let got = ops::unary(&x, op).unwrap();
        let want: Vec<f64> = x64.iter().map(|&v| f(v)).collect();
        assert_close(
            &format!("{op:?}"),
            &data(&got),
            &want,
            &Tolerance::elementwise(1e-6, 1e-6),
        );
    }
    let ax: Vec<f32> = xv.iter().map(|v| v.abs()).collect();
    let got = ops::unary(
        &Tensor::from_vec(ax.clone(), &[5, 41]).unwrap(),
        UnaryOp::Sqrt,
    )
    .unwrap();
    let want: Vec<f64> = ax.iter().map(|&v| (v as f64).sqrt()).collect();
    assert_close(
        "sqrt",
        &data(&got),
        &want,
        &Tolerance::elementwise(1e-7, 1e-6),
    );
    // GELU at known points: erf(1/√2) = 0.6826894921370859, and deep in the negative tail.
    let pts = Tensor::from_vec(vec![1.0, -1.0, 0.0, -6.0, 8.0], &[5]).unwrap();
    let got = data(&ops::gelu(&pts).unwrap());
    let want = [
        0.8413447460685429,
        -0.15865525393145707,
        0.0,
        -6.0 * 0.5 * libm::erfc(6.0 / std::f64::consts::SQRT_2),
        8.0,
    ];
    assert_close(
        "gelu points",
        &got,
        &want,
        &Tolerance::elementwise(1e-9, 1e-6),
    );

    let (gv, g) = randn(&mut r, &[3, 2, 14]);
    let got = ops::geglu(&g).unwrap();
    assert_eq!(got.shape(), &[3, 2, 7]);
    let want: Vec<f64> = gv
        .chunks(14)
        .flat_map(|row| {
            (0..7)
                .map(|i| row[i] as f64 * gelu64(row[7 + i] as f64))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_close(
        "geglu",
        &data(&got),
        &want,
        &Tolerance::elementwise(1e-6, 1e-5),
    );

    let got = ops::affine(&x, 0.5, -2.0).unwrap();
    let want: Vec<f64> = x64.iter().map(|v| v * 0.5 - 2.0).collect();
    assert_close(
        "affine",
        &data(&got),
        &want,
        &Tolerance::elementwise(1e-6, 1e-7),
    );
    let got = ops::clamp(&x, -1.0, 2.5).unwrap();
    let want: Vec<f64> = x64.iter().map(|v| v.clamp(-1.0, 2.5)).collect();
    assert_close(
        "clamp",
        &data(&got),
        &want,
        &Tolerance::elementwise(0.0, 0.0),
    );
}

/// Reference numpy broadcasting via explicit multi-indices.
fn ref_binary(a: &[f32], ash: &[usize], b: &[f32], bsh: &[usize], op: BinaryOp) -> Vec<f64> {
    let out = ops::broadcast_shape(ash, bsh).unwrap();
    let r = out.len();
    let total: usize = out.iter().product();
    let offset = |sh: &[usize], idx: &[usize]| {
        let mut o = 0;
        for (i, &d) in sh.iter().enumerate() {
            let oi = idx[r - sh.len() + i];
            o = o * d + if d == 1 { 0 } else { oi };
        }
        o
    };
    (0..total)
        .map(|lin| {
            let mut idx = vec![0; r];
            let mut rem = lin;
            for dim in (0..r).rev() {
                idx[dim] = rem % out[dim];
                rem /= out[dim];
            }
            let (x, y) = (a[offset(ash, &idx)] as f64, b[offset(bsh, &idx)] as f64);
            match op {
                BinaryOp::Add => x + y,
                BinaryOp::Sub => x - y,
                BinaryOp::Mul => x * y,
                BinaryOp::Div => x / y,
            }
        })
        .collect()
}

#[test]
fn binary_broadcasting() {
    let mut r = rng(10);
    let shapes: [(&[usize], &[usize]); 9] = [
        (&[4, 5, 6], &[4, 5, 6]),
        (&[4, 5, 6], &[6]),
        (&[4, 5, 6], &[4, 1, 6]),
        (&[4, 5, 6], &[4, 5, 1]),
        (&[6], &[4, 5, 6]),
        (&[3, 1, 5], &[1, 4, 1]),
        (&[2, 3], &[1]),
        (&[1, 1, 6], &[3, 6]),
        (&[2, 1, 3, 1], &[5, 1, 4]),
    ];
    for (ash, bsh) in shapes {
        let (av, a) = randn(&mut r, ash);
        let (mut bv, _) = randn(&mut r, bsh);
        bv.iter_mut().for_each(|v| *v += v.signum() * 0.5); // keep divisors away from 0
        let b = Tensor::from_vec(bv.clone(), bsh).unwrap();
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
            let got = ops::binary(&a, &b, op).unwrap();
            let want = ref_binary(&av, ash, &bv, bsh, op);
            assert_eq!(got.shape(), &ops::broadcast_shape(ash, bsh).unwrap()[..]);
            assert_close(
                &format!("{op:?} {ash:?} {bsh:?}"),
                &data(&got),
                &want,
                &Tolerance::elementwise(1e-6, 1e-6),
            );
        }
    }
}

// ---------------------------------------------------------------- layout

#[test]
fn concat_index_select_narrow_split() {
    let mut r = rng(11);
    for axis in 0..3 {
        let mut shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]];
        for (i, s) in shapes.iter_mut().enumerate() {
            s[axis] = i + 1;
        }
        let ts: Vec<(Vec<f32>, Tensor)> = shapes.iter().map(|s| randn(&mut r, s)).collect();
        let refs: Vec<&Tensor> = ts.iter().map(|t| &t.1).collect();
        let got = ops::concat(&refs, axis).unwrap();
        let mut oshape = [2, 3, 4];
        oshape[axis] = 6;
        assert_eq!(got.shape(), &oshape);
        let gd = data(&got);
        // Element by element: find the source of every output index.
        for (lin, &gv) in gd.iter().enumerate() {
            let idx = [
                lin / (oshape[1] * oshape[2]),
                (lin / oshape[2]) % oshape[1],
                lin % oshape[2],
            ];
            let (mut src, mut pos) = (0, idx[axis]);
            while pos >= shapes[src][axis] {
                pos -= shapes[src][axis];
                src += 1;
            }
            let mut sidx = idx;
            sidx[axis] = pos;
            let s = shapes[src];
            assert_eq!(
                gv,
                ts[src].0[(sidx[0] * s[1] + sidx[1]) * s[2] + sidx[2]],
                "concat axis {axis}"
            );
        }
    }

    let (xv, x) = randn(&mut r, &[3, 5, 2]);
    let idx = [4, 0, 0, 2];
    let got = ops::index_select(&x, 1, &idx).unwrap();
    assert_eq!(got.shape(), &[3, 4, 2]);
    let want: Vec<f64> = (0..3)
        .flat_map(|a| {
            idx.iter()
                .flat_map(move |&i| (0..2).map(move |c| (a, i, c)))
        })
        .map(|(a, i, c)| xv[(a * 5 + i) * 2 + c] as f64)
        .collect();
    assert_close(
        "index_select",
        &data(&got),
        &want,
        &Tolerance::elementwise(0.0, 0.0),
    );

    let parts = ops::split(&x, 0, &[1, 2]).unwrap();
    assert_eq!(parts[1].shape(), &[2, 5, 2]);
    assert_close(
        "split",
        &data(&parts[1]),
        &f64s(&xv[10..]),
        &Tolerance::elementwise(0.0, 0.0),
    );
    let last = ops::narrow(&x, 2, 1, 1).unwrap();
    let want: Vec<f64> = xv.iter().skip(1).step_by(2).map(|&v| v as f64).collect();
    assert_close(
        "narrow",
        &data(&last),
        &want,
        &Tolerance::elementwise(0.0, 0.0),
    );
}

#[test]
fn permute_general() {
    let mut r = rng(12);
    let shape = [2, 3, 1, 4, 5];
    let (xv, x) = randn(&mut r, &shape);
    let perms: [[usize; 5]; 6] = [
        [4, 3, 2, 1, 0],
        [0, 2, 3, 1, 4],
        [1, 0, 2, 3, 4],
        [0, 1, 3, 4, 2],
        [3, 4, 0, 1, 2],
        [2, 0, 4, 1, 3],
    ];
    let strides = [60, 20, 20, 5, 1];
    for perm in perms {
        let got = ops::permute(&x, &perm).unwrap();
        let oshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        assert_eq!(got.shape(), &oshape[..]);
        let total: usize = oshape.iter().product();
        let want: Vec<f64> = (0..total)
            .map(|lin| {
                let mut rem = lin;
                let mut off = 0;
                for d in (0..5).rev() {
                    off += (rem % oshape[d]) * strides[perm[d]];
                    rem /= oshape[d];
                }
                xv[off] as f64
            })
            .collect();
        assert_close(
            &format!("permute {perm:?}"),
            &data(&got),
            &want,
            &Tolerance::elementwise(0.0, 0.0),
        );
    }
    // 2-D transpose.
    let (tv, t) = randn(&mut r, &[7, 3]);
    let got = data(&ops::permute(&t, &[1, 0]).unwrap());
    let want: Vec<f64> = (0..21).map(|i| tv[(i % 7) * 3 + i / 7] as f64).collect();
    assert_close("transpose", &got, &want, &Tolerance::elementwise(0.0, 0.0));
}

#[test]
fn upsample_and_embedding() {
    let mut r = rng(13);
    let (xv, x) = randn(&mut r, &[2, 3, 4, 5]);
    let got = ops::upsample_nearest2x(&x).unwrap();
    assert_eq!(got.shape(), &[2, 6, 8, 5]);
    let want: Vec<f64> = (0..2 * 6 * 8 * 5)
        .map(|lin| {
            let (c, ox, oy, n) = (lin % 5, (lin / 5) % 8, (lin / 40) % 6, lin / 240);
            xv[((n * 3 + oy / 2) * 4 + ox / 2) * 5 + c] as f64
        })
        .collect();
    assert_close(
        "upsample",
        &data(&got),
        &want,
        &Tolerance::elementwise(0.0, 0.0),
    );

    let (tv, table) = randn(&mut r, &[10, 6]);
    let ids = [3u32, 9, 0, 3];
    let got = ops::embedding(&ids, &table).unwrap();
    assert_eq!(got.shape(), &[4, 6]);
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&i| {
            tv[i as usize * 6..(i as usize + 1) * 6]
                .iter()
                .map(|&v| v as f64)
        })
        .collect();
    assert_close(
        "embedding",
        &data(&got),
        &want,
        &Tolerance::elementwise(0.0, 0.0),
    );
}

// ---------------------------------------------------------------- shape-check errors

#[test]
fn shape_errors_are_reported() {
    let z = |s: &[usize]| Tensor::from_vec(vec![0.0; s.iter().product()], s).unwrap();
    let err = |r: vi_runtime::Result<Tensor>| r.unwrap_err().to_string();
    assert!(err(ops::matmul(&z(&[2, 3, 4]), &z(&[5, 6]))).contains("matmul"));
    assert!(err(ops::matmul(&z(&[2, 3, 4]), &z(&[3, 4, 6]))).contains("matmul"));
    assert!(err(ops::conv2d(
        &z(&[1, 4, 4, 3]),
        &z(&[2, 5, 3, 3]),
        None,
        1,
        1
    ))
    .contains("conv2d"));
    assert!(err(ops::linear(&z(&[2, 4]), &z(&[3, 4]), Some(&z(&[4])))).contains("bias"));
    assert!(err(ops::group_norm(
        &z(&[1, 4, 6]),
        4,
        &z(&[6]),
        &z(&[6]),
        1e-5,
        false
    ))
    .contains("groups"));
    assert!(err(ops::attention(
        &z(&[1, 3, 1, 4]),
        &z(&[1, 5, 1, 4]),
        &z(&[1, 5, 1, 4]),
        1.0,
        None,
        true
    ))
    .contains("causal"));
    let p = DualScopeParams {
        pad: 2,
        scale: 1.0,
        local_bias: 0.0,
        global_bias: 0.0,
        token_num_scale: false,
    };
    let q = z(&[1, 4, 1, 8]);
    let short = z(&[1, 6, 1, 8]); // needs n + 2p = 8 rows
    let g = z(&[1, 2, 1, 8]);
    assert!(err(ops::dual_scope_attention(&q, &short, &short, &g, &g, &p)).contains("dual_scope"));
    assert!(err(ops::embedding(&[10], &z(&[10, 3]))).contains("out of range"));
    assert!(err(ops::add(&z(&[2, 3]), &z(&[4]))).contains("broadcast"));
    assert!(err(ops::permute(&z(&[2, 3]), &[0, 0])).contains("perm"));
}

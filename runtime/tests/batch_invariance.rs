//! The CPU backend's per-row results do not depend on how many rows one call computes: a GEMM
//! row, an image of a convolution, an attention batch row and a norm row come out bit-identical
//! whether computed alone, in a chunk or in the whole batch. The bounded-memory schedules rely on
//! it (docs/design.md section 7: per-frame blocks over chunks of frames, the CFG rows one after
//! the other give the same bits as the unconstrained run).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use vi_runtime::{ops, Tensor};

fn randn(r: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect();
    Tensor::from_vec(v, shape).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// `f` on the whole of `x` (split along axis 0) equals `f` on each chunk of `chunk` rows,
/// concatenated, bit for bit.
fn check_chunked(what: &str, x: &Tensor, chunk: usize, f: &dyn Fn(&Tensor) -> Tensor) {
    let whole = f(x);
    let n = x.dim(0);
    let mut parts = Vec::new();
    let mut s = 0;
    while s < n {
        let len = chunk.min(n - s);
        parts.push(f(&ops::narrow(x, 0, s, len).unwrap()));
        s += len;
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    let joined = ops::concat(&refs, 0).unwrap();
    assert_eq!(whole.shape(), joined.shape(), "{what}");
    let (a, b) = (bits(&whole), bits(&joined));
    let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(
        diff,
        0,
        "{what}, chunks of {chunk}: {diff} of {} differ",
        a.len()
    );
}

#[test]
fn linear_rows_do_not_depend_on_the_row_count() {
    let mut r = StdRng::seed_from_u64(1);
    // (rows, K, N): the tiny model's widths and a full-size-like K (accumulation blocks over K).
    for (rows, k, n) in [(6 * 64, 32, 256), (5 * 40, 640, 96), (3 * 77, 1280, 48)] {
        let x = randn(&mut r, &[rows, k]);
        let w = randn(&mut r, &[n, k]);
        let b = randn(&mut r, &[n]);
        for chunk in [1, 7, 64, rows / 2 + 1] {
            check_chunked(&format!("linear {rows}x{k}x{n}"), &x, chunk, &|x| {
                ops::linear(x, &w, Some(&b)).unwrap()
            });
        }
    }
}

#[test]
fn conv2d_images_do_not_depend_on_the_batch() {
    let mut r = StdRng::seed_from_u64(2);
    for (n, hw, cin, cout, k, stride) in [
        (6, 8, 32, 64, 3, 1),
        (5, 16, 64, 32, 3, 2),
        (4, 8, 96, 64, 1, 1),
    ] {
        let x = randn(&mut r, &[n, hw, hw, cin]);
        let w = randn(&mut r, &[cout, cin, k, k]);
        let b = randn(&mut r, &[cout]);
        for chunk in [1, 2, 4] {
            check_chunked(
                &format!("conv2d {n}x{hw}x{hw}x{cin} k{k}"),
                &x,
                chunk,
                &|x| ops::conv2d(x, &w, Some(&b), stride, k / 2).unwrap(),
            );
        }
    }
}

#[test]
fn attention_and_norm_rows_do_not_depend_on_the_batch() {
    let mut r = StdRng::seed_from_u64(3);
    // Self-attention per frame: [frames, S, heads, head_dim].
    let q = randn(&mut r, &[6, 64, 2, 16]);
    for chunk in [1, 4] {
        check_chunked("self-attention", &q, chunk, &|x| {
            ops::attention(x, x, x, 0.25, None, false).unwrap()
        });
    }
    // Cross-attention: each chunk of queries against the same keys (one batch row).
    let ctx = randn(&mut r, &[1, 77, 2, 16]);
    let qs = randn(&mut r, &[1, 6 * 64, 2, 16]);
    let whole = ops::attention(&qs, &ctx, &ctx, 0.25, None, false).unwrap();
    let rows = ops::narrow(&qs, 1, 64, 128).unwrap();
    let part = ops::attention(&rows, &ctx, &ctx, 0.25, None, false).unwrap();
    assert_eq!(
        bits(&ops::narrow(&whole, 1, 64, 128).unwrap()),
        bits(&part),
        "cross-attention over a chunk of queries"
    );
    let x = randn(&mut r, &[6, 64, 32]);
    let g = randn(&mut r, &[32]);
    let b = randn(&mut r, &[32]);
    for chunk in [1, 4] {
        check_chunked("group_norm", &x, chunk, &|x| {
            ops::group_norm(x, 8, &g, &b, 1e-5, true).unwrap()
        });
        check_chunked("layer_norm", &x, chunk, &|x| {
            ops::layer_norm(x, &g, &b, 1e-5).unwrap()
        });
    }
}

//! The reduced-precision contract on the CPU backend: bf16/f16 tensors are computed in f32 and
//! rounded once per op output (runtime/src/cpu/rounded.rs), and the mixed-dtype ops of the
//! precision policy (docs/precision.md): norms writing a narrower dtype, binary ops writing f32,
//! f32 biases / norm parameters next to bf16 activations, `linear_add` into an f32 residual, f32
//! GroupNorm statistics. Each is checked bit-exactly against "widen, f32 op, round" or against an
//! f64 reference, plus the dtype combinations that must be refused.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use vi_runtime::ops::{self, BinaryOp};
use vi_runtime::{DType, Tensor};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    let mut r = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// `t` rounded to `dt` (the inputs of a reduced-precision op are already representable).
fn as_dt(t: &Tensor, dt: DType) -> Tensor {
    t.to_dtype(dt).unwrap()
}

fn bits_equal(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            a.to_bits() == b.to_bits(),
            "{what}: element {i}: {a} vs {b}"
        );
    }
}

const REDUCED: [DType; 2] = [DType::BF16, DType::F16];

#[test]
fn reduced_ops_are_the_f32_op_rounded_once() {
    for dt in REDUCED {
        let x = as_dt(&randn(1, &[2, 6, 5, 16]), dt);
        let w = as_dt(&randn(2, &[8, 16, 3, 3]), dt);
        let b = randn(3, &[8]); // f32 bias (the policy)
        let y = ops::conv2d(&x, &w, Some(&b), 1, 1).unwrap();
        let want = ops::conv2d(
            &as_dt(&x, DType::F32),
            &as_dt(&w, DType::F32),
            Some(&b),
            1,
            1,
        )
        .unwrap()
        .to_dtype(dt)
        .unwrap();
        bits_equal(&format!("conv2d {dt:?}"), &y, &want);

        let q = as_dt(&randn(4, &[2, 7, 2, 8]), dt);
        let k = as_dt(&randn(5, &[2, 9, 2, 8]), dt);
        let v = as_dt(&randn(6, &[2, 9, 2, 8]), dt);
        let o = ops::attention(&q, &k, &v, 0.3, None, false).unwrap();
        let f = |t: &Tensor| as_dt(t, DType::F32);
        let want = ops::attention(&f(&q), &f(&k), &f(&v), 0.3, None, false)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        bits_equal(&format!("attention {dt:?}"), &o, &want);

        let g = ops::geglu(&as_dt(&randn(7, &[3, 10]), dt)).unwrap();
        assert_eq!(g.dtype(), dt);
    }
}

#[test]
fn norms_write_the_requested_dtype_from_f32_or_reduced_input() {
    let x = ops::affine(&randn(10, &[3, 20, 16]), 2.0, 0.5).unwrap();
    let (gamma, beta) = (randn(11, &[16]), randn(12, &[16]));
    for dt in REDUCED {
        // f32 stream -> reduced operand, f32 parameters: the f32 op rounded once.
        let y = ops::group_norm_to(&x, 4, &gamma, &beta, 1e-5, true, dt).unwrap();
        let want = ops::group_norm(&x, 4, &gamma, &beta, 1e-5, true)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        bits_equal(&format!("group_norm_to {dt:?}"), &y, &want);
        let y = ops::layer_norm_to(&x, &gamma, &beta, 1e-5, dt).unwrap();
        let want = ops::layer_norm(&x, &gamma, &beta, 1e-5)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        bits_equal(&format!("layer_norm_to {dt:?}"), &y, &want);

        // Reduced input, f32 parameters, reduced output; statistics f32.
        let xr = as_dt(&x, dt);
        let stats = ops::group_norm_stats(&xr, 4).unwrap();
        assert_eq!(stats.dtype(), DType::F32, "stats of {dt:?} input");
        let y = ops::group_norm(&xr, 4, &gamma, &beta, 1e-5, false).unwrap();
        let want = ops::group_norm(&as_dt(&xr, DType::F32), 4, &gamma, &beta, 1e-5, false)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        bits_equal(&format!("group_norm {dt:?} in/out"), &y, &want);
    }
}

#[test]
fn binary_output_dtype_rules() {
    let a = randn(20, &[4, 6]);
    let bias = randn(21, &[6]);
    for dt in REDUCED {
        let b = as_dt(&randn(22, &[4, 6]), dt);
        // f32 stream + reduced branch -> f32, either order; no rounding of the sum.
        let want = ops::add(&a, &as_dt(&b, DType::F32)).unwrap();
        bits_equal("f32 + reduced", &ops::add(&a, &b).unwrap(), &want);
        bits_equal("reduced + f32", &ops::add(&b, &a).unwrap(), &want);
        // Two reduced inputs: their dtype by default, f32 on request.
        assert_eq!(ops::add(&b, &b).unwrap().dtype(), dt);
        let wide = ops::add_to(&b, &b, DType::F32).unwrap();
        bits_equal(
            "reduced + reduced -> f32",
            &wide,
            &ops::add(&as_dt(&b, DType::F32), &as_dt(&b, DType::F32)).unwrap(),
        );
        // Broadcast with an f32 row.
        let y = ops::binary(&b, &bias, BinaryOp::Mul).unwrap();
        assert_eq!((y.dtype(), y.shape()), (DType::F32, &[4usize, 6][..]));
        // Refused: a narrow output from an f32 input; two different reduced dtypes.
        assert!(ops::add_to(&a, &b, dt).is_err());
        let other = if dt == DType::BF16 {
            DType::F16
        } else {
            DType::BF16
        };
        let err = ops::add(&b, &as_dt(&b, other)).unwrap_err().to_string();
        assert!(err.contains("binary"), "{err}");
    }
}

#[test]
fn linear_add_into_an_f32_residual() {
    let (rows, k, n) = (10, 12, 9);
    let x = randn(30, &[2, 5, k]);
    let w = randn(31, &[n, k]);
    let bias = randn(32, &[n]);
    let res = randn(33, &[2, 5, n]);
    // f32: residual + linear, as two ops.
    let y = ops::linear_add(&x, &w, Some(&bias), &res).unwrap();
    let want = ops::add(&res, &ops::linear(&x, &w, Some(&bias)).unwrap()).unwrap();
    bits_equal("linear_add f32", &y, &want);
    for dt in REDUCED {
        let (xr, wr) = (as_dt(&x, dt), as_dt(&w, dt));
        let y = ops::linear_add(&xr, &wr, Some(&bias), &res).unwrap();
        assert_eq!(y.dtype(), DType::F32, "f32 residual keeps f32");
        // Fused (as on the GPU): the product is not rounded to `dt` before the add.
        let (x32, w32) = (as_dt(&xr, DType::F32), as_dt(&wr, DType::F32));
        let want = ops::add(&res, &ops::linear(&x32, &w32, Some(&bias)).unwrap()).unwrap();
        bits_equal(&format!("linear_add {dt:?} -> f32"), &y, &want);
        // A residual of x's dtype gives x's dtype.
        let y = ops::linear_add(&xr, &wr, None, &as_dt(&res, dt)).unwrap();
        assert_eq!(y.dtype(), dt);
    }
    // Refused: a residual of the wrong shape, or of a third dtype.
    assert!(ops::linear_add(&x, &w, None, &randn(34, &[rows, n + 1])).is_err());
    let xr = as_dt(&x, DType::BF16);
    let wr = as_dt(&w, DType::BF16);
    assert!(ops::linear_add(&xr, &wr, None, &as_dt(&res, DType::F16)).is_err());
}

#[test]
fn linear_to_writes_f32_from_the_unrounded_product() {
    let x = randn(50, &[2, 3, 12]);
    let w = randn(51, &[7, 12]);
    let bias = randn(52, &[7]);
    for dt in REDUCED {
        let (xr, wr) = (as_dt(&x, dt), as_dt(&w, dt));
        let y = ops::linear_to(&xr, &wr, Some(&bias), DType::F32).unwrap();
        let (x32, w32) = (as_dt(&xr, DType::F32), as_dt(&wr, DType::F32));
        let want = ops::linear(&x32, &w32, Some(&bias)).unwrap();
        bits_equal(&format!("linear_to {dt:?} -> F32"), &y, &want);
        // x's own dtype is plain `linear`; a third dtype is refused.
        bits_equal(
            "linear_to own dtype",
            &ops::linear_to(&xr, &wr, None, dt).unwrap(),
            &ops::linear(&xr, &wr, None).unwrap(),
        );
        let other = if dt == DType::BF16 {
            DType::F16
        } else {
            DType::BF16
        };
        assert!(ops::linear_to(&xr, &wr, None, other).is_err());
    }
}

#[test]
fn parameter_dtype_rules() {
    let x = as_dt(&randn(40, &[3, 8]), DType::BF16);
    let w = as_dt(&randn(41, &[4, 8]), DType::BF16);
    // Bias: x's dtype or f32; never a third dtype, never narrower than an f32 x.
    assert!(ops::linear(&x, &w, Some(&randn(42, &[4]))).is_ok());
    assert!(ops::linear(&x, &w, Some(&as_dt(&randn(42, &[4]), DType::BF16))).is_ok());
    let err = ops::linear(&x, &w, Some(&as_dt(&randn(42, &[4]), DType::F16)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("linear") && err.contains("F16"), "{err}");
    let xf = randn(43, &[3, 8]);
    let wf = randn(44, &[4, 8]);
    assert!(ops::linear(&xf, &wf, Some(&as_dt(&randn(42, &[4]), DType::BF16))).is_err());
    // Norm gamma/beta: f32 or the output dtype.
    let xs = randn(45, &[2, 4, 8]);
    let g16 = as_dt(&randn(46, &[8]), DType::F16);
    let bf = randn(47, &[8]);
    assert!(ops::layer_norm_to(&xs, &g16, &bf, 1e-5, DType::F16).is_ok());
    let err = ops::layer_norm_to(&xs, &g16, &bf, 1e-5, DType::BF16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer_norm"), "{err}");
    // Norm output: x's dtype, or any from f32; never widening a reduced x.
    let xr = as_dt(&xs, DType::BF16);
    assert!(ops::group_norm_to(&xr, 2, &bf, &bf, 1e-5, false, DType::F32).is_err());
}

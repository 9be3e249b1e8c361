//! Operands whose dtypes an op does not combine are reported as dtype errors naming the op, not as
//! shape mismatches; wrong shapes with matching dtypes stay shape errors.

use vi_runtime::ops::{self, BinaryOp, DualScopeParams};
use vi_runtime::{DType, Device, Error, Result, Tensor};

fn t(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(shape, Device::Cpu, dtype).unwrap()
}

/// Asserts a dtype error of `op` whose message mentions every string of `names`.
fn expect_dtype_error<T: std::fmt::Debug>(r: Result<T>, op: &str, names: &[&str]) {
    let e = r.expect_err("a dtype mismatch must be refused");
    let msg = e.to_string();
    assert!(
        matches!(&e, Error::DTypeMismatch { op: o, .. } if *o == op),
        "expected a dtype error of {op}, got {e:?}"
    );
    assert!(
        msg.contains("dtype mismatch") && !msg.contains("shape"),
        "{msg}"
    );
    for n in names {
        assert!(msg.contains(n), "{msg} should name {n}");
    }
}

#[test]
fn dtype_mismatches_are_dtype_errors() {
    use DType::{BF16, F16, F32};
    // Operands that must share one dtype.
    expect_dtype_error(
        ops::matmul(&t(&[2, 3], F32), &t(&[3, 4], BF16)),
        "matmul",
        &["F32", "BF16"],
    );
    let bf = t(&[1, 4, 2, 8], BF16);
    expect_dtype_error(
        ops::attention(&t(&[1, 4, 2, 8], F32), &bf, &bf, 1.0, None, false),
        "attention",
        &["BF16"],
    );
    expect_dtype_error(
        ops::concat(&[&t(&[2, 3], F32), &t(&[2, 3], F16)], 0),
        "concat",
        &["F16"],
    );
    let p = DualScopeParams {
        pad: 1,
        scale: 1.0,
        local_bias: 0.0,
        global_bias: 0.0,
        token_num_scale: false,
    };
    let q = t(&[1, 4, 1, 8], BF16);
    let loc = t(&[1, 6, 1, 8], BF16);
    expect_dtype_error(
        ops::dual_scope_attention(&q, &loc, &loc, &t(&[1, 2, 1, 8], F16), &loc, &p),
        "dual_scope_attention",
        &["F16"],
    );
    expect_dtype_error(
        ops::conv2d(&t(&[1, 4, 4, 3], BF16), &t(&[2, 3, 3, 3], F16), None, 1, 1),
        "conv2d",
        &["F16"],
    );
    // Biases and norm parameters: the activation's (or output's) dtype or F32.
    let x = t(&[3, 8], BF16);
    let w = t(&[4, 8], BF16);
    expect_dtype_error(
        ops::linear(&x, &w, Some(&t(&[4], F16))),
        "linear",
        &["bias", "F16"],
    );
    let xs = t(&[2, 4, 8], F32);
    expect_dtype_error(
        ops::layer_norm_to(&xs, &t(&[8], F16), &t(&[8], F32), 1e-5, BF16),
        "layer_norm",
        &["gamma/beta", "F16"],
    );
    // Output dtypes: x's own or F32 for a GEMM; never widening a reduced norm input.
    expect_dtype_error(ops::linear_to(&x, &w, None, F16), "linear_to", &["F16"]);
    expect_dtype_error(
        ops::linear_add(&x, &w, None, &t(&[3, 4], F16)),
        "linear_add",
        &["residual", "F16"],
    );
    let g = t(&[8], F32);
    expect_dtype_error(
        ops::group_norm_to(&t(&[2, 4, 8], BF16), 2, &g, &g, 1e-5, false, F32),
        "group_norm",
        &["F32", "BF16"],
    );
    expect_dtype_error(
        ops::group_norm_apply(
            &t(&[2, 4, 8], BF16),
            &t(&[2, 2, 2], F16),
            &g,
            &g,
            1e-5,
            false,
        ),
        "group_norm_apply",
        &["stats", "F16"],
    );
    // Mixed elementwise inputs need an F32 side and an F32 output.
    expect_dtype_error(
        ops::binary(&t(&[2, 3], BF16), &t(&[2, 3], F16), BinaryOp::Add),
        "binary",
        &["BF16", "F16"],
    );
    expect_dtype_error(
        ops::add_to(&t(&[2, 3], F32), &t(&[2, 3], BF16), BF16),
        "binary",
        &["BF16"],
    );
}

#[test]
fn shape_mismatches_stay_shape_errors() {
    let f = |s: &[usize]| t(s, DType::F32);
    let e = ops::matmul(&f(&[2, 3]), &f(&[4, 5])).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "matmul", .. }), "{e:?}");
    let e = ops::linear(&f(&[2, 4]), &f(&[3, 4]), Some(&f(&[4]))).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "linear", .. }), "{e:?}");
    assert!(e.to_string().contains("shape mismatch"), "{e}");
}

#[test]
fn stats_on_another_device_is_a_device_error() {
    let x = t(&[2, 4, 8], DType::F32);
    let g = t(&[8], DType::F32);
    let stats = Tensor::meta(&[2, 2, 2], DType::F32);
    let e = ops::group_norm_apply(&x, &stats, &g, &g, 1e-5, false).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DeviceMismatch {
                op: "group_norm_apply",
                ..
            }
        ),
        "{e:?}"
    );
}

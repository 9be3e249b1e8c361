//! Elementwise ops: unary activations, GEGLU, broadcasting binary ops, affine, clamp.

use super::{backend, backend_mixed};
use crate::{DType, Error, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Silu,
    /// Exact erf GELU.
    Gelu,
    Exp,
    Sqrt,
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    backend(x, "silu")?.unary(x, UnaryOp::Silu)
}
/// Exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    backend(x, "gelu")?.unary(x, UnaryOp::Gelu)
}
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    backend(x, "unary")?.unary(x, op)
}

/// Output shape of [`geglu`]: x [..., 2N] -> [..., N].
pub(crate) fn geglu_shape(x: &Tensor) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last /= 2;
    }
    shape
}

/// GEGLU: x [..., 2N] -> x[..., :N] * gelu(x[..., N:]).
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "geglu";
    if x.rank() == 0 || !x.dim(x.rank() - 1).is_multiple_of(2) {
        return Err(Error::shape(
            OP,
            format!("last dim of {:?} must be even", x.shape()),
        ));
    }
    backend(x, OP)?.geglu(x)
}

/// numpy broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Elementwise a op b with numpy broadcasting. Output dtype: F32 when either input is F32, else the
/// inputs' common dtype (an f32 residual stream plus a bf16 branch stays f32).
pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let out = if a.dtype() == DType::F32 || b.dtype() == DType::F32 {
        DType::F32
    } else {
        a.dtype()
    };
    binary_to(a, b, op, out)
}

/// [`binary`] writing `out`: inputs of one dtype T give T or F32; F32 with T gives F32.
pub fn binary_to(a: &Tensor, b: &Tensor, op: BinaryOp, out: DType) -> Result<Tensor> {
    const OP: &str = "binary";
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch {
            op: OP,
            a: a.device(),
            b: b.device(),
        });
    }
    let ok = if a.dtype() == b.dtype() {
        out == a.dtype() || out == DType::F32
    } else {
        out == DType::F32 && (a.dtype() == DType::F32 || b.dtype() == DType::F32)
    };
    if !ok {
        return Err(Error::dtype(
            OP,
            format!(
                "dtypes {:?} {op:?} {:?} -> {out:?} (mixed inputs need an F32 side and output)",
                a.dtype(),
                b.dtype()
            ),
        ));
    }
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
        Error::shape(
            OP,
            format!("{:?} {op:?} {:?} do not broadcast", a.shape(), b.shape()),
        )
    })?;
    backend_mixed(a, &[b.dtype(), out], OP)?.binary(a, b, op, &shape, out)
}
/// a + b written as `out` (see [`binary_to`]).
pub fn add_to(a: &Tensor, b: &Tensor, out: DType) -> Result<Tensor> {
    binary_to(a, b, BinaryOp::Add, out)
}
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Add)
}
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Sub)
}
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Mul)
}
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Div)
}
/// x * mul + add.
pub fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    backend(x, "affine")?.affine(x, mul, add)
}
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    affine(x, s, 0.0)
}
pub fn clamp(x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    backend(x, "clamp")?.clamp(x, lo, hi)
}

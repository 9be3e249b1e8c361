//! The one tolerance check of the project's tests (this crate's, the workspace suite's, the
//! benches'): got vs a reference, elementwise `|got - want| <= atol + rtol |want|` and/or a
//! whole-tensor ceiling `||got - want|| / ||want|| <= max_rel_l2`, any non-finite `got` failing.
//! A failure names the tensor, the worst element (multi-index for tensors), the max abs error
//! and the rel L2. The runtime itself never calls this.

use crate::{DType, Device, Tensor};

/// What "close" means for one comparison; every part that is set must hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Elementwise absolute part (infinite: no elementwise check).
    pub atol: f64,
    /// Elementwise relative part, times |want|.
    pub rtol: f64,
    /// Whole-tensor ceiling on ||got - want|| / ||want|| (||got - want|| when want is all zeros);
    /// infinite: none.
    pub max_rel_l2: f64,
}

impl Tolerance {
    /// `|got - want| <= atol + rtol |want|` for every element.
    pub const fn elementwise(atol: f64, rtol: f64) -> Self {
        Tolerance {
            atol,
            rtol,
            max_rel_l2: f64::INFINITY,
        }
    }

    /// Bit-for-bit equal values (f32 `got` against the reference's value).
    pub const EXACT: Tolerance = Tolerance::elementwise(0.0, 0.0);

    /// Only the whole-tensor ceiling (reduced-precision runs).
    pub const fn rel_l2(max_rel_l2: f64) -> Self {
        Tolerance {
            atol: f64::INFINITY,
            rtol: 0.0,
            max_rel_l2,
        }
    }

    /// This tolerance plus the whole-tensor ceiling `max_rel_l2`.
    pub const fn with_max_rel_l2(self, max_rel_l2: f64) -> Self {
        Tolerance { max_rel_l2, ..self }
    }

    fn has_elementwise(&self) -> bool {
        self.atol.is_finite()
    }
}

/// The error numbers of one comparison (differences taken in f64).
#[derive(Debug, Clone, PartialEq)]
pub struct Closeness {
    pub len: usize,
    /// max |got - want| (NaN when some difference is NaN) and its index.
    pub max_abs: f64,
    pub max_abs_at: usize,
    /// ||got - want|| / ||want|| (||got - want|| when want is all zeros).
    pub rel_l2: f64,
    /// max of |got - want| - (atol + rtol |want|) (+inf for a NaN difference) and its index.
    pub worst_excess: f64,
    pub worst_at: usize,
    /// Elements over atol + rtol |want| (NaN differences count).
    pub n_over: usize,
    /// Non-finite elements of `got`.
    pub n_nonfinite: usize,
}

impl Closeness {
    /// Whether `tol` holds (and `got` is all finite).
    pub fn passed(&self, tol: &Tolerance) -> bool {
        self.n_nonfinite == 0 && self.n_over == 0 && self.rel_l2 <= tol.max_rel_l2
    }
}

/// The numbers of `got` against `want` (same length), without judging them.
pub fn closeness<W: Copy + Into<f64>>(got: &[f32], want: &[W], tol: &Tolerance) -> Closeness {
    assert_eq!(got.len(), want.len(), "closeness: lengths differ");
    let mut c = Closeness {
        len: got.len(),
        max_abs: 0.0,
        max_abs_at: 0,
        rel_l2: 0.0,
        worst_excess: f64::NEG_INFINITY,
        worst_at: 0,
        n_over: 0,
        n_nonfinite: 0,
    };
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = (g.into(), w.into());
        if !g.is_finite() {
            c.n_nonfinite += 1;
        }
        let d = (g - w).abs();
        num += d * d;
        den += w * w;
        let excess = if d.is_nan() {
            f64::INFINITY
        } else {
            d - (tol.atol + tol.rtol * w.abs())
        };
        if excess > 0.0 {
            c.n_over += 1;
        }
        if excess > c.worst_excess {
            (c.worst_excess, c.worst_at) = (excess, i);
        }
        if d.is_nan() {
            if !c.max_abs.is_nan() {
                (c.max_abs, c.max_abs_at) = (f64::NAN, i);
            }
        } else if d > c.max_abs {
            (c.max_abs, c.max_abs_at) = (d, i);
        }
    }
    c.rel_l2 = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    c
}

/// Relative L2 error ||got - want|| / ||want|| (||got - want|| when want is all zeros), in f64.
pub fn rel_l2<W: Copy + Into<f64>>(got: &[f32], want: &[W]) -> f64 {
    closeness(got, want, &Tolerance::rel_l2(f64::INFINITY)).rel_l2
}

/// Checks `got` against `want` under `tol`; prints one line of numbers either way and returns them,
/// or the failure message naming `what`.
pub fn check_close<W: Copy + Into<f64>>(
    what: &str,
    got: &[f32],
    want: &[W],
    tol: &Tolerance,
) -> Result<Closeness, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, reference {}",
            got.len(),
            want.len()
        ));
    }
    judge(what, &[got.len()], got, want, tol)
}

/// [`check_close`] that panics with the failure message.
pub fn assert_close<W: Copy + Into<f64>>(
    what: &str,
    got: &[f32],
    want: &[W],
    tol: &Tolerance,
) -> Closeness {
    check_close(what, got, want, tol).unwrap_or_else(|e| panic!("{e}"))
}

/// [`check_close`] on tensors of any device and dtype (compared as host f32): the shapes must be
/// equal, and the worst elements are named by their multi-index.
pub fn check_close_tensors(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    tol: &Tolerance,
) -> Result<Closeness, String> {
    if got.shape() != want.shape() {
        return Err(format!(
            "{what}: shape {:?}, reference {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let host = |t: &Tensor| {
        t.to_device(Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec_f32())
            .unwrap_or_else(|e| panic!("{what}: reading the tensor back: {e}"))
    };
    judge(what, want.shape(), &host(got), &host(want), tol)
}

/// [`check_close_tensors`] that panics with the failure message.
pub fn assert_close_tensors(what: &str, got: &Tensor, want: &Tensor, tol: &Tolerance) -> Closeness {
    check_close_tensors(what, got, want, tol).unwrap_or_else(|e| panic!("{e}"))
}

fn judge<W: Copy + Into<f64>>(
    what: &str,
    shape: &[usize],
    got: &[f32],
    want: &[W],
    tol: &Tolerance,
) -> Result<Closeness, String> {
    let c = closeness(got, want, tol);
    if c.len == 0 {
        return Ok(c);
    }
    let at = |i: usize| {
        format!(
            "{:?} (got {}, ref {})",
            unravel(i, shape),
            got[i],
            want[i].into()
        )
    };
    let numbers = format!(
        "rel L2 {:.3e}, max abs err {:.3e} at {}",
        c.rel_l2,
        c.max_abs,
        at(c.max_abs_at)
    );
    println!("{what}: {numbers}");
    if c.passed(tol) {
        return Ok(c);
    }
    let mut why = Vec::new();
    if c.n_nonfinite > 0 {
        why.push(format!("{} non-finite elements", c.n_nonfinite));
    }
    if c.n_over > 0 && tol.has_elementwise() {
        why.push(format!(
            "{} of {} elements over atol {:e} + rtol {:e}, worst {} excess {:.3e}",
            c.n_over,
            c.len,
            tol.atol,
            tol.rtol,
            at(c.worst_at),
            c.worst_excess
        ));
    }
    if c.rel_l2.is_nan() || c.rel_l2 > tol.max_rel_l2 {
        why.push(format!(
            "rel L2 {:.3e} over the ceiling {:e}",
            c.rel_l2, tol.max_rel_l2
        ));
    }
    Err(format!("{what}: {}; {numbers}", why.join("; ")))
}

/// Row-major multi-index of flat index `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            idx[d] = i % n;
            i /= n;
        }
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_verdicts() {
        let tol = Tolerance::elementwise(1e-3, 1e-2);
        let c = assert_close("same", &[1.0, 2.0, 0.0], &[1.0f32, 2.0, 0.0], &tol);
        assert_eq!((c.rel_l2, c.max_abs, c.n_over), (0.0, 0.0, 0));
        assert!((c.worst_excess + 1e-3).abs() < 1e-12);
        // 2.05 vs 2.0: 0.05 > 1e-3 + 2e-2 -> one over, excess 0.029; rel L2 0.05 / sqrt(5).
        let e = check_close("x", &[1.0, 2.05, 0.0], &[1.0f64, 2.0, 0.0], &tol).unwrap_err();
        assert!(
            e.starts_with("x: 1 of 3 elements over") && e.contains("[1]"),
            "{e}"
        );
        let c = closeness(&[1.0, 2.05, 0.0], &[1.0f64, 2.0, 0.0], &tol);
        assert_eq!((c.n_over, c.worst_at, c.max_abs_at), (1, 1, 1));
        assert!((c.worst_excess - 0.029).abs() < 1e-6);
        assert!((c.rel_l2 - 0.05 / 5f64.sqrt()).abs() < 1e-7);
        // The ceiling alone, and on top of the elementwise check.
        let got = [1.0, 2.03, 0.0];
        assert!(check_close("x", &got, &[1.0f32, 2.0, 0.0], &Tolerance::rel_l2(2e-2)).is_ok());
        let e = check_close("x", &got, &[1.0f32, 2.0, 0.0], &Tolerance::rel_l2(1e-2)).unwrap_err();
        assert!(e.contains("over the ceiling 1e-2"), "{e}");
        let loose = Tolerance::elementwise(1.0, 0.0);
        assert!(check_close("x", &got, &[1.0f32, 2.0, 0.0], &loose).is_ok());
        let e = check_close("x", &got, &[1.0f32, 2.0, 0.0], &loose.with_max_rel_l2(1e-5));
        assert!(e.unwrap_err().contains("rel L2 1.342e-2 over the ceiling"));
        // Non-finite output fails every tolerance; all-zero reference: absolute L2.
        for tol in [Tolerance::rel_l2(f64::INFINITY), loose] {
            let c = closeness(&[f32::NAN, 0.0], &[1.0f32, 0.0], &tol);
            assert!(!c.passed(&tol) && c.n_nonfinite == 1 && c.max_abs.is_nan());
            assert!(check_close("x", &[f32::INFINITY], &[1.0f32], &tol).is_err());
        }
        assert_eq!(rel_l2(&[3.0, 4.0], &[0.0f32, 0.0]), 5.0);
    }

    #[test]
    fn tensors_name_the_multi_index() {
        let want = Tensor::from_vec(vec![0.0; 24], &[2, 3, 4]).unwrap();
        let mut v = vec![0.0; 24];
        v[17] = 1.0; // [1, 1, 1]
        let got = Tensor::from_vec(v, &[2, 3, 4]).unwrap();
        let e = check_close_tensors("t", &got, &want, &Tolerance::EXACT).unwrap_err();
        assert!(e.contains("worst [1, 1, 1] (got 1, ref 0)"), "{e}");
        let other = Tensor::from_vec(vec![0.0; 24], &[4, 3, 2]).unwrap();
        let e = check_close_tensors("t", &other, &want, &Tolerance::EXACT).unwrap_err();
        assert!(e.contains("shape [4, 3, 2], reference [2, 3, 4]"), "{e}");
    }
}

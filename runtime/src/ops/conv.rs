//! Convolutions: 2-D (spatial) and over frames (temporal).

use super::{backend, check_params, expect_rank, expect_vec, same_device_dtype};
use crate::{Error, Result, Tensor};

/// The geometry of one 2-D convolution, computed once by [`conv2d`] for every backend: x [n, h, w,
/// cin], weight [cout, cin, kh, kw], zero padding `pad` on each side, output [n, ho, wo, cout] with
/// ho = (h + 2 pad - kh) / stride + 1 and wo likewise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conv2dGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Conv2dGeom {
    /// Of validated operands (stride > 0, the padded input at least the kernel's size).
    fn new(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Conv2dGeom {
        let (n, h, wd, cin) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let (cout, kh, kw) = (w.dim(0), w.dim(2), w.dim(3));
        Conv2dGeom {
            n,
            h,
            w: wd,
            cin,
            cout,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (wd + 2 * pad - kw) / stride + 1,
        }
    }
    /// [n, ho, wo, cout].
    pub(crate) fn out_shape(&self) -> [usize; 4] {
        [self.n, self.ho, self.wo, self.cout]
    }
    /// A 1x1 kernel, stride 1, no padding: one GEMM over the pixel rows.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

/// The geometry of one convolution over frames, computed once by [`temporal_conv`]: x [b, f, s,
/// cin], weight [cout, cin, k] (k odd), zero padding `pad` = (k - 1) / 2 frames on each side, output
/// [b, f, s, cout].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TemporalConvGeom {
    pub b: usize,
    pub f: usize,
    pub s: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub pad: usize,
}

impl TemporalConvGeom {
    /// Of validated operands (w [cout, cin, k], k odd).
    fn new(x: &Tensor, w: &Tensor) -> TemporalConvGeom {
        let k = w.dim(2);
        TemporalConvGeom {
            b: x.dim(0),
            f: x.dim(1),
            s: x.dim(2),
            cin: x.dim(3),
            cout: w.dim(0),
            k,
            pad: (k - 1) / 2,
        }
    }
    /// [b, f, s, cout].
    pub(crate) fn out_shape(&self) -> [usize; 4] {
        [self.b, self.f, self.s, self.cout]
    }
}

/// 2-D convolution, channels-last: x [N, H, W, Cin], w [Cout, Cin, kh, kw] -> [N, Ho, Wo, Cout],
/// Ho = (H + 2 pad - kh) / stride + 1.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    same_device_dtype(OP, &[x, w])?;
    expect_rank(OP, "x", x, 4)?;
    expect_rank(OP, "weight", w, 4)?;
    if x.dim(3) != w.dim(1) || stride == 0 {
        return Err(Error::shape(
            OP,
            format!("x {:?} vs weight {:?}", x.shape(), w.shape()),
        ));
    }
    if x.dim(1) + 2 * pad < w.dim(2) || x.dim(2) + 2 * pad < w.dim(3) {
        return Err(Error::shape(
            OP,
            format!("input {:?} smaller than kernel {:?}", x.shape(), w.shape()),
        ));
    }
    if let Some(b) = bias {
        check_params(OP, x, x.dtype(), "bias", &[b])?;
        expect_vec(OP, "bias", b, w.dim(0))?;
    }
    backend(x, OP)?.conv2d(x, w, bias, &Conv2dGeom::new(x, w, stride, pad))
}

/// Convolution over frames (kernel k odd, zero padding (k-1)/2): x [B, F, S, Cin],
/// w [Cout, Cin, k] or the Conv3d layout [Cout, Cin, k, 1, 1] -> [B, F, S, Cout].
pub fn temporal_conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "temporal_conv";
    same_device_dtype(OP, &[x, w])?;
    expect_rank(OP, "x", x, 4)?;
    let w = match w.rank() {
        3 => w.clone(),
        5 if w.dim(3) == 1 && w.dim(4) == 1 => w.reshape(&[w.dim(0), w.dim(1), w.dim(2)])?,
        _ => {
            return Err(Error::shape(
                OP,
                format!("weight {:?} is not [Cout, Cin, k(,1,1)]", w.shape()),
            ))
        }
    };
    if x.dim(3) != w.dim(1) || w.dim(2) % 2 == 0 {
        return Err(Error::shape(
            OP,
            format!("x {:?} vs weight {:?}", x.shape(), w.shape()),
        ));
    }
    if let Some(b) = bias {
        check_params(OP, x, x.dtype(), "bias", &[b])?;
        expect_vec(OP, "bias", b, w.dim(0))?;
    }
    backend(x, OP)?.temporal_conv(x, &w, bias, &TemporalConvGeom::new(x, &w))
}

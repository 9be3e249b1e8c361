//! Convolutions: 2-D (spatial) and over frames (temporal).

use super::{backend, check_params, expect_rank, expect_vec, same_device_dtype};
use crate::{Error, Result, Tensor};

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
    backend(x, OP)?.conv2d(x, w, bias, stride, pad)
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
    backend(x, OP)?.temporal_conv(x, &w, bias)
}

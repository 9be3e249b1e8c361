//! Attention: scaled-dot-product and the dual-scope temporal attention of Video-Infinity.

use super::{backend, expect_rank, same_device_dtype};
use crate::{Error, Result, Tensor};

/// Parameters of the dual-scope temporal attention (docs/design.md section 5.3; golden README
/// "AttentionPlugin").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DualScopeParams {
    /// Local half-window `p`: query i sees padded local positions i ..= i + 2p.
    pub pad: usize,
    /// Base logit scale (attn_scale / sqrt(head_dim)).
    pub scale: f32,
    /// Added to the logits of the 2p+1 visible local columns.
    pub local_bias: f32,
    /// Added to the logits of the G global columns.
    pub global_bias: f32,
    /// Multiply the scale by ln(2p+1+G)/ln(16) (the number of unmasked keys per row).
    pub token_num_scale: bool,
}

/// Output shape of [`attention`]: q [B, Sq, H, D], v [B, Sk, H, Dv] -> [B, Sq, H, Dv].
pub(crate) fn attention_shape(q: &Tensor, v: &Tensor) -> [usize; 4] {
    [q.dim(0), q.dim(1), q.dim(2), v.dim(3)]
}

/// Scaled-dot-product attention. q [B, Sq, H, D], k [B, Sk, H, D], v [B, Sk, H, Dv] -> [B, Sq, H, Dv];
/// optional additive bias [Sq, Sk] (shared by batch and heads); `causal` masks keys j > i.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    bias: Option<&Tensor>,
    causal: bool,
) -> Result<Tensor> {
    const OP: &str = "attention";
    same_device_dtype(OP, &[q, k, v])?;
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        expect_rank(OP, n, t, 4)?;
    }
    let ok = q.dim(0) == k.dim(0)
        && k.dim(0) == v.dim(0)
        && q.dim(2) == k.dim(2)
        && k.dim(2) == v.dim(2)
        && q.dim(3) == k.dim(3)
        && k.dim(1) == v.dim(1);
    if !ok {
        return Err(Error::shape(
            OP,
            format!("q {:?} k {:?} v {:?}", q.shape(), k.shape(), v.shape()),
        ));
    }
    if let Some(b) = bias {
        same_device_dtype(OP, &[q, b])?;
        if b.shape() != [q.dim(1), k.dim(1)] {
            return Err(Error::shape(
                OP,
                format!("bias {:?} for [{}, {}]", b.shape(), q.dim(1), k.dim(1)),
            ));
        }
    }
    if causal && q.dim(1) != k.dim(1) {
        return Err(Error::shape(OP, "causal attention needs Sq == Sk"));
    }
    backend(q, OP)?.attention(q, k, v, scale, bias, causal)
}

/// The dual-scope temporal attention of Video-Infinity, banded local window + global keys, computed
/// without a dense mask. See [`DualScopeParams`] and `Backend::dual_scope_attention`.
pub fn dual_scope_attention(
    q: &Tensor,
    k_local: &Tensor,
    v_local: &Tensor,
    k_glob: &Tensor,
    v_glob: &Tensor,
    p: &DualScopeParams,
) -> Result<Tensor> {
    const OP: &str = "dual_scope_attention";
    same_device_dtype(OP, &[q, k_local, v_local, k_glob, v_glob])?;
    for (n, t) in [
        ("q", q),
        ("k_local", k_local),
        ("v_local", v_local),
        ("k_glob", k_glob),
        ("v_glob", v_glob),
    ] {
        expect_rank(OP, n, t, 4)?;
    }
    let (b, n, h, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let loc = [b, n + 2 * p.pad, h, d];
    let ok = k_local.shape() == loc
        && v_local.shape() == loc
        && k_glob.shape() == v_glob.shape()
        && k_glob.dim(0) == b
        && k_glob.dim(2) == h
        && k_glob.dim(3) == d;
    if !ok {
        return Err(Error::shape(
            OP,
            format!(
                "q {:?} k_local {:?} v_local {:?} k_glob {:?} v_glob {:?} pad {}",
                q.shape(),
                k_local.shape(),
                v_local.shape(),
                k_glob.shape(),
                v_glob.shape(),
                p.pad
            ),
        ));
    }
    backend(q, OP)?.dual_scope_attention(q, k_local, v_local, k_glob, v_glob, p)
}

//! The spatial transformer (diffusers `Transformer2DModel` with linear projections, one
//! `BasicTransformerBlock`), and the block it shares with the temporal transformer.

use vi_runtime::{ops, DType, Tensor};

use crate::layers::attention::{Attention, AttentionKeys, FeedForward, FfActivation};
use crate::layers::{GroupNorm, LayerNorm, Linear};
use crate::params::{Params, Result};

/// GroupNorm eps of Transformer2DModel and TransformerTemporalModel (hard-coded in diffusers).
pub(crate) const TRANSFORMER_GN_EPS: f32 = 1e-6;
/// LayerNorm eps of BasicTransformerBlock (norm_eps default of the block).
pub(crate) const LAYER_NORM_EPS: f32 = 1e-5;

/// diffusers `BasicTransformerBlock` (layer_norm, pre-norm, residual after each part): the
/// parameters; the two forward variants live with their transformers.
pub(crate) struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    /// GEGLU, inner width 4*dim (`net.0.proj`, `net.2`).
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    /// `attn2_kv_dim`: cross_attention_dim for the spatial blocks; `dim` for the temporal ones
    /// (double self-attention).
    pub fn load(
        p: Params,
        dim: usize,
        heads: usize,
        head_dim: usize,
        attn2_kv_dim: usize,
    ) -> Result<BasicTransformerBlock> {
        let keys = &AttentionKeys::DIFFUSERS;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(p, "norm1", dim, LAYER_NORM_EPS)?,
            attn1: Attention::load(p.pp("attn1").p(), keys, dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(p, "norm2", dim, LAYER_NORM_EPS)?,
            attn2: Attention::load(p.pp("attn2").p(), keys, dim, attn2_kv_dim, heads, head_dim)?,
            norm3: LayerNorm::load(p, "norm3", dim, LAYER_NORM_EPS)?,
            ff: FeedForward::load(
                p.pp("ff").p(),
                ("net.0.proj", "net.2"),
                dim,
                4 * dim,
                FfActivation::Geglu,
            )?,
        })
    }

    /// The dtype of the block's GEMM operands (its weights' dtype).
    pub fn dtype(&self) -> DType {
        self.attn1.dtype()
    }

    /// LayerNorm of the (f32) stream h, written in the operand dtype.
    pub fn ln(&self, x: &Tensor, norm: &LayerNorm) -> Result<Tensor> {
        norm.forward(x, self.dtype())
    }

    /// h (f32) + ff(norm3(h)) -> f32.
    pub fn ff_residual(&self, h: &Tensor) -> Result<Tensor> {
        let n = self.ln(h, &self.norm3)?;
        self.ff.forward_add(&n, h)
    }

    /// [`BasicTransformerBlock::ff_residual`] over chunks of `rows` tokens (0: all at once): the
    /// norm and the feed-forward work per token, so the result is the same with the transients
    /// (the GEGLU's 8x-wide projection) of one chunk alive at a time. h [..., C].
    pub fn ff_residual_chunked(&self, h: &Tensor, rows: usize) -> Result<Tensor> {
        let c = h.dim(h.rank() - 1);
        let total = h.elem_count() / c.max(1);
        if rows == 0 || rows >= total {
            return self.ff_residual(h);
        }
        let flat = h.reshape(&[total, c])?;
        let mut parts = Vec::new();
        let mut s = 0;
        while s < total {
            let len = rows.min(total - s);
            parts.push(self.ff_residual(&ops::narrow(&flat, 0, s, len)?)?);
            s += len;
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        Ok(ops::concat(&refs, 0)?.reshape(h.shape())?)
    }
}

/// What a one-layer transformer of the UNet holds (diffusers `Transformer2DModel` and
/// `TransformerTemporalModel` alike): GroupNorm (eps 1e-6) -> proj_in (channels -> heads*head_dim)
/// -> one BasicTransformerBlock -> proj_out (back to channels).
pub(crate) struct TransformerParts {
    pub norm: GroupNorm,
    pub proj_in: Linear,
    pub block: BasicTransformerBlock,
    pub proj_out: Linear,
}

impl TransformerParts {
    /// `attn2_kv_dim`: see [`BasicTransformerBlock::load`].
    pub fn load(
        p: Params,
        channels: usize,
        heads: usize,
        head_dim: usize,
        attn2_kv_dim: usize,
        groups: usize,
    ) -> Result<TransformerParts> {
        let inner = heads * head_dim;
        Ok(TransformerParts {
            norm: GroupNorm::load(p, "norm", channels, groups, TRANSFORMER_GN_EPS)?,
            proj_in: Linear::load(p, "proj_in", channels, inner)?,
            block: BasicTransformerBlock::load(
                p.pp("transformer_blocks").pp(0).p(),
                inner,
                heads,
                head_dim,
                attn2_kv_dim,
            )?,
            proj_out: Linear::load(p, "proj_out", inner, channels)?,
        })
    }
}

/// diffusers `Transformer2DModel` (continuous input, linear projections, 1 layer): per frame,
/// GroupNorm(eps 1e-6) -> proj_in -> BasicTransformerBlock (self-attn, cross-attn to the text,
/// GEGLU FF) -> proj_out -> + input.
pub(crate) struct Transformer2D(TransformerParts);

impl Transformer2D {
    pub fn load(
        p: Params,
        channels: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
        groups: usize,
    ) -> Result<Transformer2D> {
        Ok(Transformer2D(TransformerParts::load(
            p, channels, heads, head_dim, cross_dim, groups,
        )?))
    }

    /// x [B*F, H, W, C] (row b*F + f); `ehs` [B, L, cross_dim]: frame rows of batch b attend to
    /// ehs[b] (diffusers repeat_interleaves ehs over frames; here the queries of one batch element's
    /// F frames are one attention batch row, which computes the same without copying ehs).
    pub fn forward(&self, x: &Tensor, ehs: &Tensor) -> Result<Tensor> {
        let (n, hh, ww, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let b = ehs.dim(0);
        let s = hh * ww;
        let parts = &self.0;
        let blk = &parts.block;
        let dt = blk.dtype();
        let h = parts.norm.forward_nhwc(x, false, dt)?;
        // The block's residual stream [N, S, inner] has x's dtype (f32 by default); branches `dt`.
        let h = parts
            .proj_in
            .forward_to(&h.reshape(&[n, s, c])?, x.dtype())?;
        let inner = h.dim(2);

        // attn1: self-attention within each frame.
        let nh = blk.ln(&h, &blk.norm1)?;
        let h = blk.attn1.forward_add(&nh, &nh, &h, false)?;

        // attn2: cross-attention; batch element b's F*S queries share the keys of ehs[b].
        // Cross-attention rows are per batch element: [b, (n/b)*s, inner], the same memory as h.
        let nh = blk.ln(&h, &blk.norm2)?;
        let h = blk
            .attn2
            .forward_add(
                &nh.reshape(&[b, (n / b) * s, inner])?,
                ehs,
                &h.reshape(&[b, (n / b) * s, inner])?,
                false,
            )?
            .reshape(&[n, s, inner])?;

        let h = blk.ff_residual(&h)?;
        let out = parts
            .proj_out
            .forward_add(&h.to_dtype(dt)?, &x.reshape(&[n, s, c])?)?; // [N, S, C]
        Ok(out.reshape(&[n, hh, ww, c])?)
    }
}

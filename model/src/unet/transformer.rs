//! The spatial transformer (diffusers `Transformer2DModel` with linear projections, one
//! `BasicTransformerBlock`), and the pieces it shares with the temporal transformer: `Attention`
//! projections and the GEGLU feed-forward.

use vi_runtime::{ops, DType, Tensor};

use super::resnet::{spatial_group_norm, Affine};
use crate::params::{Params, Result};

/// GroupNorm eps of Transformer2DModel and TransformerTemporalModel (hard-coded in diffusers).
pub(crate) const TRANSFORMER_GN_EPS: f32 = 1e-6;
/// LayerNorm eps of BasicTransformerBlock (norm_eps default of the block).
pub(crate) const LAYER_NORM_EPS: f32 = 1e-5;

/// diffusers `Attention` projections: to_q/to_k/to_v without bias, to_out.0 with bias.
pub(crate) struct Attention {
    to_q: Tensor,
    to_k: Tensor,
    to_v: Tensor,
    to_out: Affine,
    pub heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// query_dim -> heads*head_dim; keys/values from `kv_dim` (= query_dim for self-attention).
    pub fn load(
        p: Params,
        query_dim: usize,
        kv_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Attention> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: p.get("to_q.weight", &[inner, query_dim])?,
            to_k: p.get("to_k.weight", &[inner, kv_dim])?,
            to_v: p.get("to_v.weight", &[inner, kv_dim])?,
            to_out: Affine::linear(p.pp("to_out").p(), "0", inner, query_dim)?,
            heads,
            head_dim,
        })
    }

    /// 1/sqrt(head_dim).
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// x [b, n, inner] -> [b, n, heads, head_dim] (free reshape: heads outer, head_dim inner, as
    /// diffusers' head split).
    fn split(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.reshape(&[x.dim(0), x.dim(1), self.heads, self.head_dim])?)
    }

    /// q from x [b, n, query_dim] -> [b, n, heads, head_dim].
    pub fn q(&self, x: &Tensor) -> Result<Tensor> {
        self.split(&ops::linear(x, &self.to_q, None)?)
    }
    /// k and v from ctx [b, m, kv_dim] -> each [b, m, heads, head_dim].
    pub fn kv(&self, ctx: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split(&ops::linear(ctx, &self.to_k, None)?)?,
            self.split(&ops::linear(ctx, &self.to_v, None)?)?,
        ))
    }
    /// Attention output o [b, n, heads, head_dim] -> to_out.0 -> [b, n, query_dim].
    /// residual [b, s, query_dim] + to_out(o [b, s, H, D]), in residual's dtype.
    pub fn out_add(&self, o: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let o = o.reshape(&[o.dim(0), o.dim(1), self.heads * self.head_dim])?;
        self.to_out.apply_linear_add(&o, residual)
    }
    pub fn out(&self, o: &Tensor) -> Result<Tensor> {
        let o = o.reshape(&[o.dim(0), o.dim(1), self.heads * self.head_dim])?;
        self.to_out.apply_linear(&o)
    }
}

/// diffusers `FeedForward` with GEGLU: net.0.proj (dim -> 2*inner) -> x * gelu(gate) -> net.2.
pub(crate) struct FeedForward {
    proj: Affine,
    out: Affine,
}

impl FeedForward {
    /// inner = 4*dim (mult 4).
    pub fn load(p: Params, dim: usize) -> Result<FeedForward> {
        let inner = 4 * dim;
        let net = p.pp("net");
        Ok(FeedForward {
            proj: Affine::linear(net.pp("0").p(), "proj", dim, 2 * inner)?,
            out: Affine::linear(net.p(), "2", inner, dim)?,
        })
    }
    /// residual + ff(x), in residual's dtype.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = ops::geglu(&self.proj.apply_linear(x)?)?;
        self.out.apply_linear_add(&h, residual)
    }
}

/// diffusers `BasicTransformerBlock` (layer_norm, pre-norm, residual after each part): the
/// parameters; the two forward variants live with their transformers.
pub(crate) struct BasicTransformerBlock {
    pub norm1: Affine,
    pub attn1: Attention,
    pub norm2: Affine,
    pub attn2: Attention,
    pub norm3: Affine,
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
        Ok(BasicTransformerBlock {
            norm1: Affine::norm(p, "norm1", dim)?,
            attn1: Attention::load(p.pp("attn1").p(), dim, dim, heads, head_dim)?,
            norm2: Affine::norm(p, "norm2", dim)?,
            attn2: Attention::load(p.pp("attn2").p(), dim, attn2_kv_dim, heads, head_dim)?,
            norm3: Affine::norm(p, "norm3", dim)?,
            ff: FeedForward::load(p.pp("ff").p(), dim)?,
        })
    }

    /// The dtype of the block's GEMM operands (its weights' dtype).
    pub fn dtype(&self) -> DType {
        self.attn1.to_q.dtype()
    }

    /// LayerNorm of the (f32) stream h, written in the operand dtype.
    pub fn ln(&self, x: &Tensor, norm: &Affine) -> Result<Tensor> {
        Ok(ops::layer_norm_to(
            x,
            &norm.w,
            &norm.b,
            LAYER_NORM_EPS,
            self.dtype(),
        )?)
    }

    /// h (f32) + ff(norm3(h)) -> f32.
    pub fn ff_residual(&self, h: &Tensor) -> Result<Tensor> {
        let n = self.ln(h, &self.norm3)?;
        self.ff.forward_add(&n, h)
    }
}

/// diffusers `Transformer2DModel` (continuous input, linear projections, 1 layer): per frame,
/// GroupNorm(eps 1e-6) -> proj_in -> BasicTransformerBlock (self-attn, cross-attn to the text,
/// GEGLU FF) -> proj_out -> + input.
pub(crate) struct Transformer2D {
    norm: Affine,
    groups: usize,
    proj_in: Affine,
    block: BasicTransformerBlock,
    proj_out: Affine,
}

impl Transformer2D {
    pub fn load(
        p: Params,
        channels: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
        groups: usize,
    ) -> Result<Transformer2D> {
        let inner = heads * head_dim;
        Ok(Transformer2D {
            norm: Affine::norm(p, "norm", channels)?,
            groups,
            proj_in: Affine::linear(p, "proj_in", channels, inner)?,
            block: BasicTransformerBlock::load(
                p.pp("transformer_blocks").pp(0).p(),
                inner,
                heads,
                head_dim,
                cross_dim,
            )?,
            proj_out: Affine::linear(p, "proj_out", inner, channels)?,
        })
    }

    /// x [B*F, H, W, C] (row b*F + f); `ehs` [B, L, cross_dim]: frame rows of batch b attend to
    /// ehs[b] (diffusers repeat_interleaves ehs over frames; here the queries of one batch element's
    /// F frames are one attention batch row, which computes the same without copying ehs).
    pub fn forward(&self, x: &Tensor, ehs: &Tensor) -> Result<Tensor> {
        let (n, hh, ww, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let b = ehs.dim(0);
        let s = hh * ww;
        let blk = &self.block;
        let dt = blk.dtype();
        let h = spatial_group_norm(x, &self.norm, self.groups, TRANSFORMER_GN_EPS, false, dt)?;
        // The block's residual stream [N, S, inner] has x's dtype (f32 by default); branches `dt`.
        let h = self
            .proj_in
            .apply_linear_to(&h.reshape(&[n, s, c])?, x.dtype())?;
        let inner = h.dim(2);

        // attn1: self-attention within each frame.
        let a = &blk.attn1;
        let nh = blk.ln(&h, &blk.norm1)?;
        let q = a.q(&nh)?;
        let (k, v) = a.kv(&nh)?;
        let o = ops::attention(&q, &k, &v, a.scale(), None, false)?;
        let h = a.out_add(&o, &h)?;

        // attn2: cross-attention; batch element b's F*S queries share the keys of ehs[b].
        let a = &blk.attn2;
        let nh = blk.ln(&h, &blk.norm2)?;
        let q = a.q(&nh.reshape(&[b, (n / b) * s, inner])?)?;
        let (k, v) = a.kv(ehs)?;
        let o = ops::attention(&q, &k, &v, a.scale(), None, false)?;
        // Cross-attention rows are per batch element: [b, (n/b)*s, inner], the same memory as h.
        let h = a
            .out_add(&o, &h.reshape(&[b, (n / b) * s, inner])?)?
            .reshape(&[n, s, inner])?;

        let h = blk.ff_residual(&h)?;
        let out = self
            .proj_out
            .apply_linear_add(&h.to_dtype(dt)?, &x.reshape(&[n, s, c])?)?; // [N, S, C]
        Ok(out.reshape(&[n, hh, ww, c])?)
    }
}

//! diffusers `TransformerTemporalModel` (`temp_attentions.*` and `transformer_in`): attention over
//! the frames at each spatial position. Its GroupNorm and both of its attentions (attn1 and attn2
//! are self-attention over frames: double_self_attention) go through the [`TemporalContext`].

use vi_runtime::{ops, Tensor};

use super::transformer::TransformerParts;
use super::Trace;
use crate::layers::attention::Attention;
use crate::params::{Params, Result};
use crate::temporal::TemporalContext;

/// diffusers `TransformerTemporalModel` (1 layer, double self-attention).
pub(crate) struct TransformerTemporal(TransformerParts);

impl TransformerTemporal {
    /// `channels` in/out, `heads` x `head_dim` inner width (may differ from `channels`:
    /// transformer_in is C0 -> 8*attention_head_dim).
    pub fn load(
        p: Params,
        channels: usize,
        heads: usize,
        head_dim: usize,
        groups: usize,
    ) -> Result<TransformerTemporal> {
        let inner = heads * head_dim;
        Ok(TransformerTemporal(TransformerParts::load(
            p, channels, heads, head_dim, inner, groups,
        )?))
    }

    /// Self-attention over frames: x [b, n, inner] -> to_q/k/v -> ctx.attention_from -> to_out.
    fn attend(&self, a: &Attention, x: &Tensor, ctx: &dyn TemporalContext) -> Result<Tensor> {
        let o = ctx.attention_from(&|| a.q(x), &|| a.kv(x), a.scale())?;
        a.out(&o)
    }

    /// residual + attend(x), in residual's dtype (to_out fused with the residual add).
    fn attend_add(
        &self,
        a: &Attention,
        x: &Tensor,
        ctx: &dyn TemporalContext,
        residual: &Tensor,
    ) -> Result<Tensor> {
        // The context decides the order of the projections (it may exchange k, v while q runs).
        let o = ctx.attention_from(&|| a.q(x), &|| a.kv(x), a.scale())?;
        a.out_add(&o, residual)
    }

    /// x [B*F, H, W, C] (row b*F + f) -> same. `batch` = B. `name` (the module path) and `trace`
    /// report the first block's attn1 input/output ([B*S, F, inner]). `frame_chunk` > 0: the
    /// feed-forward runs over chunks of frame_chunk x H x W tokens.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: usize,
        ctx: &dyn TemporalContext,
        name: &str,
        trace: Option<Trace>,
        frame_chunk: usize,
    ) -> Result<Tensor> {
        let (nf, hh, ww, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let (b, f, s) = (batch, nf / batch, hh * ww);
        let parts = &self.0;
        let blk = &parts.block;
        let dt = blk.dtype();
        // GroupNorm over the 5-D [B, C, F, H, W] tensor = per batch element over F*S positions.
        // (The norm and the permuted copy are dropped once proj_in has read them.)
        let h = {
            let g = ctx.temporal_group_norm(
                &x.reshape(&[b, f * s, c])?,
                parts.norm.groups,
                &parts.norm.gamma,
                &parts.norm.beta,
                parts.norm.eps,
                dt,
            )?;
            // Rows ordered (b, y, x), frames as the sequence: [B, F, S, C] -> [B*S, F, C].
            let g = ops::permute(&g.reshape(&[b, f, s, c])?, &[0, 2, 1, 3])?;
            // The block's residual stream [B*S, F, inner] has x's dtype (f32 by default);
            // branches `dt`.
            parts
                .proj_in
                .forward_to(&g.reshape(&[b * s, f, c])?, x.dtype())?
        };
        let n1 = blk.ln(&h, &blk.norm1)?;
        // Traced runs materialise attn1's output for the trace; the others fuse to_out with the add.
        let h = match trace {
            Some(t) => {
                let a1 = self.attend(&blk.attn1, &n1, ctx)?;
                t(&format!("{name}.transformer_blocks.0.attn1/in"), &n1);
                t(&format!("{name}.transformer_blocks.0.attn1/out"), &a1);
                ops::add_to(&h, &a1, x.dtype())?
            }
            None => self.attend_add(&blk.attn1, &n1, ctx, &h)?,
        };
        let n2 = blk.ln(&h, &blk.norm2)?;
        let h = self.attend_add(&blk.attn2, &n2, ctx, &h)?;
        let h = blk.ff_residual_chunked(&h, frame_chunk * s)?;
        let h = parts.proj_out.forward(&h.to_dtype(dt)?)?; // [B*S, F, C]
        let h = ops::permute(&h.reshape(&[b, s, f, c])?, &[0, 2, 1, 3])?;
        Ok(ops::add_to(x, &h.reshape(&[nf, hh, ww, c])?, x.dtype())?)
    }
}

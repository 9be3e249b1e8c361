//! The three parts of the UNet that mix frames, behind one interface.
//!
//! Everything else in the UNet works frame by frame. The temporal conv layers, the temporal
//! transformers' GroupNorm and the temporal attention call a [`TemporalContext`]: [`LocalContext`]
//! is the plain whole-video model (diffusers semantics, one clip = the whole video); the
//! clip-parallel context of Video-Infinity (`crate::clip_parallel`) exchanges halos and global
//! tokens with the other ranks. The exchange lives there and nowhere else.

use vi_runtime::{ops, DType, Tensor};

use crate::layers::{GroupNorm, TemporalConv};
use crate::params::{Params, Result};

/// diffusers `TemporalConvLayer`: conv1..conv4, each GroupNorm -> SiLU -> Conv3d kernel (3,1,1),
/// zero padding 1 frame; output = input + conv4(conv3(conv2(conv1(x)))).
pub struct TemporalConvLayer {
    /// The GroupNorm of conv1..conv4, each over [C].
    pub norms: Vec<GroupNorm>,
    /// The Conv3d of conv1..conv4, each [C, C, 3, 1, 1].
    pub convs: Vec<TemporalConv>,
}

impl TemporalConvLayer {
    /// Keys `conv{1..4}.0.{weight,bias}` (GroupNorm) and `conv1.2.*` / `conv{2..4}.3.*` (Conv3d).
    pub fn load(p: Params, channels: usize, groups: usize, eps: f32) -> Result<Self> {
        let mut norms = Vec::new();
        let mut convs = Vec::new();
        for i in 1..=4 {
            let c = p.pp(format!("conv{i}"));
            norms.push(GroupNorm::load(c.p(), "0", channels, groups, eps)?);
            let conv_idx = if i == 1 { "2" } else { "3" };
            convs.push(TemporalConv::load(c.p(), conv_idx, channels)?);
        }
        Ok(TemporalConvLayer { norms, convs })
    }

    /// The dtype of the layer's conv operands (its weights' dtype).
    pub fn dtype(&self) -> DType {
        self.convs[0].dtype()
    }

    /// One block i (0..4) on a window h [B, F, S, C] (f32 or the operand dtype): GroupNorm over
    /// the whole window per batch (statistics over F x S x C/G) -> SiLU -> Conv3d with 1-frame zero
    /// padding at the window ends; output in the operand dtype.
    pub fn block(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        let (b, f, s, c) = (h.dim(0), h.dim(1), h.dim(2), h.dim(3));
        let conv = &self.convs[i];
        let n = self.norms[i].forward(&h.reshape(&[b, f * s, c])?, true, conv.dtype())?;
        conv.forward(&n.reshape(&[b, f, s, c])?)
    }

    /// conv4(conv3(conv2(conv1(h)))) on a window h [B, F, S, C] (no residual).
    pub fn body(&self, h: &Tensor) -> Result<Tensor> {
        let mut h = h.clone();
        for i in 0..4 {
            h = self.block(i, &h)?;
        }
        Ok(h)
    }
}

/// The per-frame block feeding a temporal conv layer, as [`TemporalContext::conv_layer_from`]
/// weighs splitting it by frames: every call reads all its weights, whatever its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameBlock {
    /// GEMM rows one frame holds across the batch: batch rows x spatial positions.
    pub frame_rows: usize,
    /// Bytes of the block's matrix weights (its convolutions).
    pub weight_bytes: usize,
}

/// How the frame-mixing parts of the UNet see the rest of the video.
/// Layouts: x [B, F, S, C] (S = H*W, channels-last); attention q/k/v [b, n, heads, head_dim]
/// with b = B*S rows (one per batch element and spatial position), n = this clip's frames.
pub trait TemporalContext: Sync {
    /// A whole TemporalConvLayer: x [B, F, S, C] (the residual stream, f32 by default) -> x.dtype()
    /// x + body(window) restricted to this clip.
    fn conv_layer(&self, layer: &TemporalConvLayer, x: &Tensor) -> Result<Tensor>;
    /// [`TemporalContext::conv_layer`] on the output of a per-frame block (the ResNet before
    /// every temporal conv layer): `frames` = F, `block` what a call of the block costs (a
    /// piece of fewer frames is a smaller GEMM over the same weights), and `produce(start, len)`
    /// computes the block's output for frames `start..start + len` of every batch row,
    /// [B, len, S, C]. A context may produce the frames in any order and pieces (the
    /// clip-parallel one produces the edge frames its neighbours need first and sends them while
    /// it produces the interior, where [`FrameBlock`] says that pays); the result is the same,
    /// since a per-frame block's frames do not depend on which other frames one call holds.
    /// Default: all frames at once, then [`TemporalContext::conv_layer`].
    fn conv_layer_from(
        &self,
        layer: &TemporalConvLayer,
        frames: usize,
        _block: FrameBlock,
        produce: &dyn Fn(usize, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.conv_layer(layer, &produce(0, frames)?)
    }
    /// GroupNorm at the entry of a temporal transformer: x [B, F*S, C] -> written as `out`.
    fn temporal_group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        out: DType,
    ) -> Result<Tensor>;
    /// Self-attention over frames (attn1 and attn2 of every temporal transformer and of
    /// `transformer_in`): q, k, v [b, n, H, D] after projection -> [b, n, H, D] before to_out.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor>;
    /// [`TemporalContext::attention`] given the projections: `q()` and `kv()` compute q and
    /// (k, v). A context may run them in any order (the clip-parallel one projects k, v first and
    /// exchanges them while q is projected); the result is the same. Default: q, k, v, attention.
    fn attention_from(
        &self,
        q: &dyn Fn() -> Result<Tensor>,
        kv: &dyn Fn() -> Result<(Tensor, Tensor)>,
        scale: f32,
    ) -> Result<Tensor> {
        let q = q()?;
        let (k, v) = kv()?;
        self.attention(&q, &k, &v, scale)
    }
}

/// The plain model: this clip is the whole video (diffusers `UNet3DConditionModel` semantics).
pub struct LocalContext;

impl TemporalContext for LocalContext {
    fn conv_layer(&self, layer: &TemporalConvLayer, x: &Tensor) -> Result<Tensor> {
        Ok(ops::add_to(x, &layer.body(x)?, x.dtype())?)
    }
    fn temporal_group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        out: DType,
    ) -> Result<Tensor> {
        Ok(ops::group_norm_to(x, groups, gamma, beta, eps, false, out)?)
    }
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        Ok(ops::attention(q, k, v, scale, None, false)?)
    }
}

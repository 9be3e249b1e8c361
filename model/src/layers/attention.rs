//! Multi-head attention projections (diffusers `Attention`, transformers `CLIPAttention`) and the
//! two-layer feed-forward (diffusers `FeedForward` with GEGLU, transformers `CLIPMLP`).

use vi_runtime::{ops, DType, Tensor};

use super::Linear;
use crate::params::{Params, Result};

/// Key names of an attention's four projections and whether q/k/v have a bias (to_out always has).
pub struct AttentionKeys {
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub out: &'static str,
    pub qkv_bias: bool,
}

impl AttentionKeys {
    /// diffusers `Attention` in the UNet's transformers: to_q/to_k/to_v without bias.
    pub const DIFFUSERS: AttentionKeys = AttentionKeys {
        q: "to_q",
        k: "to_k",
        v: "to_v",
        out: "to_out.0",
        qkv_bias: false,
    };
    /// diffusers `Attention` with biased q/k/v (the VAE's mid-block attention).
    pub const DIFFUSERS_BIASED: AttentionKeys = AttentionKeys {
        qkv_bias: true,
        ..AttentionKeys::DIFFUSERS
    };
    /// The VAE's mid-block attention as diffusers < 0.15 wrote it.
    pub const DIFFUSERS_LEGACY: AttentionKeys = AttentionKeys {
        q: "query",
        k: "key",
        v: "value",
        out: "proj_attn",
        qkv_bias: true,
    };
    /// transformers `CLIPAttention`.
    pub const CLIP: AttentionKeys = AttentionKeys {
        q: "q_proj",
        k: "k_proj",
        v: "v_proj",
        out: "out_proj",
        qkv_bias: true,
    };
}

/// Attention projections: q from query_dim, k/v from kv_dim, each to heads*head_dim, and the output
/// projection back to query_dim. Heads split as diffusers and transformers do (heads outer,
/// head_dim inner): [b, n, heads*head_dim] -> [b, n, heads, head_dim] is a free reshape.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f32,
}

impl Attention {
    /// Scale 1/sqrt(head_dim) (computed in f32; see [`Attention::with_scale`]).
    pub fn load(
        p: Params,
        keys: &AttentionKeys,
        query_dim: usize,
        kv_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Attention> {
        let inner = heads * head_dim;
        let proj = |name: &str, cin: usize| {
            if keys.qkv_bias {
                Linear::load(p, name, cin, inner)
            } else {
                Linear::load_no_bias(p, name, cin, inner)
            }
        };
        Ok(Attention {
            to_q: proj(keys.q, query_dim)?,
            to_k: proj(keys.k, kv_dim)?,
            to_v: proj(keys.v, kv_dim)?,
            to_out: Linear::load(p, keys.out, inner, query_dim)?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }

    /// The same attention with the softmax scale `scale` (a model whose reference computes
    /// head_dim^-0.5 another way: the f32 results differ in the last bit for most head_dims).
    pub fn with_scale(self, scale: f32) -> Attention {
        Attention { scale, ..self }
    }

    /// The softmax scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The dtype of the projections' operands (the weights' dtype).
    pub fn dtype(&self) -> DType {
        self.to_q.dtype()
    }

    /// x [b, n, inner] -> [b, n, heads, head_dim].
    fn split(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.reshape(&[x.dim(0), x.dim(1), self.heads, self.head_dim])?)
    }

    /// q of x [b, n, query_dim] -> [b, n, heads, head_dim].
    pub fn q(&self, x: &Tensor) -> Result<Tensor> {
        self.split(&self.to_q.forward(x)?)
    }

    /// k and v of ctx [b, m, kv_dim] -> each [b, m, heads, head_dim].
    pub fn kv(&self, ctx: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split(&self.to_k.forward(ctx)?)?,
            self.split(&self.to_v.forward(ctx)?)?,
        ))
    }

    /// Attention output o [b, n, heads, head_dim] -> to_out -> [b, n, query_dim] in o's dtype.
    pub fn out(&self, o: &Tensor) -> Result<Tensor> {
        self.to_out.forward(&self.merge(o)?)
    }

    /// residual [b, n, query_dim] + to_out(o [b, n, heads, head_dim]), in residual's dtype.
    pub fn out_add(&self, o: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.to_out.forward_add(&self.merge(o)?, residual)
    }

    fn merge(&self, o: &Tensor) -> Result<Tensor> {
        Ok(o.reshape(&[o.dim(0), o.dim(1), self.heads * self.head_dim])?)
    }

    /// residual + to_out(attention(q(x), k(ctx), v(ctx))) with `ops::attention` (no bias; causal
    /// or not): x [b, n, query_dim] and ctx [b, m, kv_dim] in the operand dtype, residual
    /// [b, n, query_dim] (the stream) -> residual's dtype.
    pub fn forward_add(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        residual: &Tensor,
        causal: bool,
    ) -> Result<Tensor> {
        let q = self.q(x)?;
        let (k, v) = self.kv(ctx)?;
        let o = ops::attention(&q, &k, &v, self.scale, None, causal)?;
        self.out_add(&o, residual)
    }
}

/// The activation between a feed-forward's two linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfActivation {
    /// x * gelu(gate) over the two halves of the first linear's output (diffusers `GEGLU`).
    Geglu,
    /// Exact erf GELU.
    Gelu,
    /// x * sigmoid(1.702 x) (OpenAI CLIP's `quick_gelu`).
    QuickGelu,
}

impl FfActivation {
    /// [..., n] -> [..., n/2] for GEGLU, [..., n] otherwise; in x's dtype.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            FfActivation::Geglu => ops::geglu(x)?,
            FfActivation::Gelu => ops::gelu(x)?,
            // x * sigmoid(1.702 x) = silu(1.702 x) / 1.702
            FfActivation::QuickGelu => {
                ops::scale(&ops::silu(&ops::scale(x, 1.702)?)?, 1.0 / 1.702)?
            }
        })
    }
}

/// Two linears with an activation between them: fc1 (dim -> inner, 2*inner for GEGLU), act, fc2
/// (inner -> dim) fused into the residual stream.
pub struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    act: FfActivation,
}

impl FeedForward {
    /// fc1 under `fc1` and fc2 under `fc2` (both with bias).
    pub fn load(
        p: Params,
        (fc1, fc2): (&str, &str),
        dim: usize,
        inner: usize,
        act: FfActivation,
    ) -> Result<FeedForward> {
        let fc1_out = match act {
            FfActivation::Geglu => 2 * inner,
            FfActivation::Gelu | FfActivation::QuickGelu => inner,
        };
        Ok(FeedForward {
            fc1: Linear::load(p, fc1, dim, fc1_out)?,
            fc2: Linear::load(p, fc2, inner, dim)?,
            act,
        })
    }

    /// residual [..., dim] + fc2(act(fc1(x [..., dim]))), in residual's dtype; x in the operand
    /// dtype.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.fc1.forward(x)?)?;
        self.fc2.forward_add(&h, residual)
    }
}

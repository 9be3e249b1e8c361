//! Video-Infinity's clip parallelism: the [`TemporalContext`] of one rank holding one clip of the
//! video (docs/design.md section 5; golden README "What the plugins compute (exact)").
//!
//! Every exchange between ranks of the UNet lives here:
//! * temporal conv layers: a halo of `conv_pad` frames of the layer INPUT from each neighbour
//!   (zeros at the video's ends); the whole 4-block body runs on the padded window (GroupNorm
//!   statistics over the window) and the centre is kept (reference ConvLayerPlugin);
//! * temporal attention: dual-scope keys/values = `attn_pad` neighbour frames on each side (zero
//!   vectors at the ends, not masked) + up to `top_k` global frames all-gathered from every rank,
//!   with a logit bias by phase (reference AttentionPlugin);
//! * temporal transformers' GroupNorm: local statistics (reference), or, in exact-seam mode,
//!   statistics over the whole video.
//!
//! Exact-seam mode (the paper's option, off in the reference code): every Conv3d of a temporal
//! conv layer gets a 1-frame halo of its own input from the neighbours and every GroupNorm of the
//! temporal layers takes its statistics across all ranks. The UNet over W ranks then equals the
//! whole-video model ([`crate::temporal::LocalContext`] on the concatenated video) up to float32
//! rounding, for equal and unequal clips -- except the temporal attention, which stays dual-scope
//! by design.
//!
//! Schedules (`ViConfig::overlap`; both give the same values bit for bit on the CPU, tests
//! check it): the synchronous one completes each exchange where its result is needed. The
//! overlapped one (default) starts exchanges early and computes meanwhile what does not depend
//! on them; where it splits an op, it splits only per-frame work by frames, whose rows the CPU
//! backend computes alike in any batch (runtime/tests/batch_invariance.rs):
//! * reference conv layers: the halo exchange of the layer's input overlaps the ResNet that
//!   feeds it: the ResNet computes the frames the neighbours need first (the first and last
//!   `conv_pad` frames; only one edge at the video's ends), the exchange starts, and the other
//!   frames are computed while it flies ([`TemporalContext::conv_layer_from`]). A middle clip of
//!   at most 2 x `conv_pad` frames has no frame its neighbours do not need: nothing overlaps.
//!   The split is made only where it pays ([`edge_first_pays`]: two calls of a weight-bound
//!   block cost nearly twice one);
//! * temporal attention: k and v are projected first; the global tokens' all-gather and the
//!   local windows' halo exchange start (in that order, as in the synchronous schedule); q is
//!   projected while both fly;
//! * exact-seam conv layers, per block: the GroupNorm statistics' all-gather and the halo
//!   exchange of the block's raw (unnormalised) edge frames start together, so their round
//!   trips overlap; the clip is normalised while the halo flies and the received frames are
//!   normalised on arrival with the same statistics (elementwise: the values the neighbour
//!   would have sent). The first block's statistics need every frame of the ResNet before it,
//!   so the ResNet is not split there;
//! * not overlapped: the exact-seam GroupNorm of the temporal transformers (nothing before its
//!   use is independent of it).
//!
//! Rules where the reference is undefined (it crashes or is wrong; our own choice, stated):
//! * conv halo when a neighbour holds fewer than `conv_pad` frames (reference: wrong for n < 4):
//!   the halo is clamped to what the neighbour has (its whole clip); frames are never fetched from
//!   ranks further away. The window is then [min(P, n_left) | n | min(P, n_right)] frames (P zero
//!   frames at the video's ends, as the reference), and the centre n frames are kept. For clips of
//!   at least `conv_pad` frames this is exactly the reference.
//! * attention window when a neighbour holds fewer than `attn_pad` frames (reference: crash): the
//!   neighbour's whole clip, completed with zero keys/values on the outer side (as at the video's
//!   ends), so the band keeps its 2p+1 width. Identical to the reference when n >= `attn_pad`.
//! * clips may differ in length between ranks (the reference requires equal lengths): each rank
//!   computes its global-token stride from its own n.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use vi_runtime::comm::{CommDelay, Communicator, DelayComm, Halos, Pending, PendingOp};
use vi_runtime::ops::{self, DualScopeParams};
use vi_runtime::{DType, Tensor};

use crate::params::{ModelError, Result};
use crate::temporal::{FrameBlock, TemporalContext, TemporalConvLayer};

/// The overlapped schedule splits the per-frame block before a reference conv layer (edge
/// frames first) only when it pays: when an edge piece holds at least this many GEMM rows
/// (frames x batch x spatial positions), or when the block's weights are small enough to stay
/// in cache ([`EDGE_FIRST_CACHED_WEIGHTS`]). Otherwise the block's GEMMs are bound by reading
/// their weights (the full-size model's deepest latents: a few rows against up to
/// 1280 x 1280 x 9 weights per convolution), so two calls cost nearly twice one: measured on the
/// full-size model on the CPU (BENCHMARKS.md), splitting at every level made a step 20-30 %
/// slower than not splitting at all.
pub const EDGE_FIRST_MIN_ROWS: usize = 512;

/// See [`EDGE_FIRST_MIN_ROWS`]: a block whose weights take at most this many bytes is split
/// whatever its rows (a second pass over them is a cache read).
pub const EDGE_FIRST_CACHED_WEIGHTS: usize = 4 << 20;

/// Whether producing the edge frames of `block` apart pays (see [`EDGE_FIRST_MIN_ROWS`]).
pub fn edge_first_pays(conv_pad: usize, frames: usize, block: FrameBlock) -> bool {
    conv_pad.min(frames) * block.frame_rows >= EDGE_FIRST_MIN_ROWS
        || block.weight_bytes <= EDGE_FIRST_CACHED_WEIGHTS
}

/// Logit biases of one phase of the dual-scope attention (reference `local_phase` /
/// `global_phase`: `{t, local_biase, global_biase}`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseBias {
    /// Threshold timestep: the local phase applies when t < `t`, the global phase when t >= `t`.
    pub t: i64,
    /// Added to the logits of the local window columns.
    pub local_bias: f32,
    /// Added to the logits of the global columns.
    pub global_bias: f32,
}

/// The Video-Infinity plugin configuration (reference `plugin_configs`), plus our exact-seam option.
#[derive(Debug, Clone, PartialEq)]
pub struct ViConfig {
    /// Frames of halo on each side of a temporal conv layer (reference `conv_layer.padding`, 4).
    pub conv_pad: usize,
    /// Neighbour frames on each side of the local attention window (reference `attn.padding`).
    pub attn_pad: usize,
    /// Number of global key/value frames kept (reference `attn.top_k`).
    pub top_k: usize,
    /// Applied when t < local_phase.t (if `dynamic_scale`).
    pub local_phase: Option<PhaseBias>,
    /// Applied when t >= global_phase.t (if `dynamic_scale`).
    pub global_phase: Option<PhaseBias>,
    /// Whether the phase biases are applied at all.
    pub dynamic_scale: bool,
    /// Multiplies the logit scale 1/sqrt(head_dim).
    pub attn_scale: f32,
    /// Scale the logits per row by ln(#visible keys)/ln(16).
    pub token_num_scale: bool,
    /// Exact-seam mode (see the module doc). Off in the reference.
    pub exact_seam: bool,
    /// The overlapped schedule (default): every exchange starts as soon as its data exists and
    /// what does not depend on it is computed while it flies (see "Schedules" in the module
    /// doc); bit-identical results on the CPU. false: the synchronous schedule (each exchange
    /// completes where its result is needed), kept for comparison (`--sync-exchange`).
    pub overlap: bool,
    /// Benchmarks and tests: a latency / bandwidth injected into every message of the
    /// clip-parallel exchange ([`DelayComm`] over the rank's communicator, one per UNet call).
    pub comm_delay: Option<CommDelay>,
}

impl Default for ViConfig {
    /// The reference configuration (examples/config.json of Video-Infinity with the phase
    /// thresholds of the golden cases): conv halo 4, attention halo 8, 16 global tokens, local
    /// phase (t < 800) local +10, global phase (t >= 800) global +10.
    fn default() -> Self {
        ViConfig {
            conv_pad: 4,
            attn_pad: 8,
            top_k: 16,
            local_phase: Some(PhaseBias {
                t: 800,
                local_bias: 10.0,
                global_bias: 0.0,
            }),
            global_phase: Some(PhaseBias {
                t: 800,
                local_bias: 0.0,
                global_bias: 10.0,
            }),
            dynamic_scale: true,
            attn_scale: 1.0,
            token_num_scale: false,
            exact_seam: false,
            overlap: true,
            comm_delay: None,
        }
    }
}

fn cfg_err(msg: impl Into<String>) -> ModelError {
    ModelError::Config(format!("plugin_configs: {}", msg.into()))
}

fn as_usize(v: &Value, key: &str) -> Result<usize> {
    v.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| cfg_err(format!("`{key}` must be a non-negative integer, got {v}")))
}
fn as_f32(v: &Value, key: &str) -> Result<f32> {
    v.as_f64()
        .map(|x| x as f32)
        .ok_or_else(|| cfg_err(format!("`{key}` must be a number, got {v}")))
}
fn as_bool(v: &Value, key: &str) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| cfg_err(format!("`{key}` must be true or false, got {v}")))
}
fn as_object<'v>(v: &'v Value, key: &str) -> Result<&'v serde_json::Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| cfg_err(format!("`{key}` must be an object, got {v}")))
}

fn parse_phase(v: &Value, key: &str) -> Result<Option<PhaseBias>> {
    if v.is_null() {
        return Ok(None);
    }
    let o = as_object(v, key)?;
    let mut p = PhaseBias {
        t: 0,
        local_bias: 0.0,
        global_bias: 0.0,
    };
    let mut has_t = false;
    for (k, x) in o {
        match k.as_str() {
            "t" => {
                p.t = x
                    .as_i64()
                    .ok_or_else(|| cfg_err(format!("`{key}.t` must be an integer, got {x}")))?;
                has_t = true;
            }
            "local_biase" => p.local_bias = as_f32(x, &format!("{key}.local_biase"))?,
            "global_biase" => p.global_bias = as_f32(x, &format!("{key}.global_biase"))?,
            other => return Err(cfg_err(format!("unknown key `{key}.{other}`"))),
        }
    }
    if !has_t {
        return Err(cfg_err(format!("`{key}` needs a threshold `t`")));
    }
    Ok(Some(p))
}

impl ViConfig {
    /// Parse the reference `plugin_configs` object, e.g.
    /// `{"attn": {"padding": 4, "top_k": 6, "attn_scale": 1.0, "token_num_scale": false,
    ///   "dynamic_scale": true, "local_phase": {"t": 800, "local_biase": 10, "global_biase": 0},
    ///   "global_phase": {...}}, "conv_layer": {}}`.
    /// Missing keys keep the [`Default`] (reference) values. Keys the reference accepts but never
    /// uses (`attn.top_k_chunk_size`, the unmounted `conv_3d` / `group_norm` plugins) are
    /// ignored; unknown keys are an error. Our extension: top-level `"exact_seam": bool`.
    pub fn from_plugin_configs(v: &Value) -> Result<ViConfig> {
        let mut cfg = ViConfig::default();
        let top = as_object(v, "plugin_configs")?;
        for (kind, body) in top {
            match kind.as_str() {
                "attn" => {
                    for (k, x) in as_object(body, "attn")? {
                        match k.as_str() {
                            "padding" => cfg.attn_pad = as_usize(x, "attn.padding")?,
                            "top_k" => cfg.top_k = as_usize(x, "attn.top_k")?,
                            "attn_scale" => cfg.attn_scale = as_f32(x, "attn.attn_scale")?,
                            "token_num_scale" => {
                                cfg.token_num_scale = as_bool(x, "attn.token_num_scale")?
                            }
                            "dynamic_scale" => {
                                cfg.dynamic_scale = as_bool(x, "attn.dynamic_scale")?
                            }
                            "local_phase" => cfg.local_phase = parse_phase(x, "attn.local_phase")?,
                            "global_phase" => {
                                cfg.global_phase = parse_phase(x, "attn.global_phase")?
                            }
                            "top_k_chunk_size" => {}
                            "dynamic_attn_tokens" => {
                                if as_bool(x, "attn.dynamic_attn_tokens")? {
                                    return Err(cfg_err(
                                        "`attn.dynamic_attn_tokens: true` is not supported",
                                    ));
                                }
                            }
                            other => return Err(cfg_err(format!("unknown key `attn.{other}`"))),
                        }
                    }
                }
                "conv_layer" => {
                    for (k, x) in as_object(body, "conv_layer")? {
                        match k.as_str() {
                            "padding" => cfg.conv_pad = as_usize(x, "conv_layer.padding")?,
                            other => {
                                return Err(cfg_err(format!("unknown key `conv_layer.{other}`")))
                            }
                        }
                    }
                }
                "conv_3d" | "group_norm" => {}
                "exact_seam" => cfg.exact_seam = as_bool(body, "exact_seam")?,
                other => return Err(cfg_err(format!("unknown plugin kind `{other}`"))),
            }
        }
        Ok(cfg)
    }

    /// Parse `plugin_configs` from JSON text.
    pub fn from_json_str(s: &str) -> Result<ViConfig> {
        let v: Value =
            serde_json::from_str(s).map_err(|e| cfg_err(format!("invalid JSON: {e}")))?;
        Self::from_plugin_configs(&v)
    }

    /// (local bias, global bias) of the attention logits at timestep `t`: with `dynamic_scale`,
    /// the local phase's biases are added when t < local_phase.t and the global phase's when
    /// t >= global_phase.t (both, or neither, if the thresholds differ); none otherwise.
    /// (The reference's +1 base on every unmasked logit is softmax-invariant and omitted.)
    pub fn phase_biases(&self, t: i64) -> (f32, f32) {
        let (mut local, mut global) = (0.0f32, 0.0f32);
        if !self.dynamic_scale {
            return (local, global);
        }
        // The reference applies the phases only when both are configured.
        if let (Some(lp), Some(gp)) = (&self.local_phase, &self.global_phase) {
            if t < lp.t {
                local += lp.local_bias;
                global += lp.global_bias;
            }
            if t >= gp.t {
                local += gp.local_bias;
                global += gp.global_bias;
            }
        }
        (local, global)
    }
}

/// Indices of the frames a rank of `n` frames contributes as global tokens: 0, stride, 2*stride..
/// with share = top_k / W, stride = max(n / share, 1) (share > 0) or only frame 0 (share = 0).
pub fn global_token_indices(n: usize, top_k: usize, world: usize) -> Vec<usize> {
    let share = top_k / world;
    // share = 0: a stride past the clip, i.e. only frame 0.
    let stride = n.checked_div(share).map_or(n.max(1), |s| s.max(1));
    (0..n).step_by(stride).collect()
}

/// Which kind of exchange a tally entry counts (the bench's breakdown of the waiting time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExchangeSite {
    /// The halo of a temporal conv layer (reference mode: one per layer; exact-seam: one per block).
    ConvHalo,
    /// The k/v halo of a temporal attention's local window.
    AttnHalo,
    /// The all-gather of a temporal attention's global tokens.
    GlobalTokens,
    /// The all-gather of GroupNorm statistics (exact-seam mode).
    NormStats,
}

impl ExchangeSite {
    pub fn name(self) -> &'static str {
        match self {
            ExchangeSite::ConvHalo => "conv halo",
            ExchangeSite::AttnHalo => "attention halo",
            ExchangeSite::GlobalTokens => "global tokens",
            ExchangeSite::NormStats => "norm statistics",
        }
    }
}

/// Exchanges of one kind and their waiting time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SiteTally {
    /// Exchanges started.
    pub calls: u64,
    /// Summed over ranks: wall time inside their `wait`.
    pub blocked: Duration,
}

/// Exchanges started by the clip-parallel contexts of this process (all ranks, all UNet calls)
/// and the time their ranks spent blocked waiting for the results: what `bench` reports as the
/// exchange's visible cost (a snapshot; [`ExchangeTally::since`] tallies a run).
///
/// The breakdown is per (site, rows), rows = the layer's batch x spatial positions (B x H x W of
/// its latent level; 0 where the context does not know it: the temporal transformers'
/// statistics). Where one wait covers several exchanges in flight (the overlapped attention waits
/// for its global tokens, then its halo), the time is charged to the wait that blocked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeTally {
    pub by_site: BTreeMap<(ExchangeSite, usize), SiteTally>,
}

impl ExchangeTally {
    /// All sites together.
    pub fn total(&self) -> SiteTally {
        let mut t = SiteTally::default();
        for s in self.by_site.values() {
            t.calls += s.calls;
            t.blocked += s.blocked;
        }
        t
    }

    /// Per site (all rows together).
    pub fn per_site(&self) -> BTreeMap<ExchangeSite, SiteTally> {
        let mut m: BTreeMap<ExchangeSite, SiteTally> = BTreeMap::new();
        for (&(site, _), s) in &self.by_site {
            let t = m.entry(site).or_default();
            t.calls += s.calls;
            t.blocked += s.blocked;
        }
        m
    }

    /// What happened between the snapshot `before` and this one.
    pub fn since(&self, before: &ExchangeTally) -> ExchangeTally {
        let mut by_site = BTreeMap::new();
        for (k, s) in &self.by_site {
            let b = before.by_site.get(k).copied().unwrap_or_default();
            let d = SiteTally {
                calls: s.calls - b.calls,
                blocked: s.blocked.saturating_sub(b.blocked),
            };
            if d.calls > 0 || !d.blocked.is_zero() {
                by_site.insert(*k, d);
            }
        }
        ExchangeTally { by_site }
    }

    /// Adds `other` into this tally.
    pub fn add(&mut self, other: &ExchangeTally) {
        for (k, s) in &other.by_site {
            let t = self.by_site.entry(*k).or_default();
            t.calls += s.calls;
            t.blocked += s.blocked;
        }
    }
}

static TALLY: Mutex<BTreeMap<(ExchangeSite, usize), SiteTally>> = Mutex::new(BTreeMap::new());

fn tally_mut<R>(f: impl FnOnce(&mut BTreeMap<(ExchangeSite, usize), SiteTally>) -> R) -> R {
    // A panicking holder leaves the map consistent (plain additions): ignore the poison.
    let mut g = TALLY.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g)
}

/// The process's [`ExchangeTally`] so far.
pub fn exchange_tally() -> ExchangeTally {
    ExchangeTally {
        by_site: tally_mut(|m| m.clone()),
    }
}

/// An exchange in flight whose `wait` is timed into the tally under its key.
struct Tallied<T> {
    inner: Pending<T>,
    key: (ExchangeSite, usize),
}

impl<T: Send> PendingOp<T> for Tallied<T> {
    fn wait(self: Box<Self>) -> vi_runtime::Result<T> {
        let t = Instant::now();
        let r = self.inner.wait();
        let dt = t.elapsed();
        tally_mut(|m| m.entry(self.key).or_default().blocked += dt);
        r
    }
}

/// Counts a started exchange of `site` at `rows` (see [`ExchangeTally`]) into the tally and
/// times its wait.
fn tallied<T: Send + 'static>(p: Pending<T>, site: ExchangeSite, rows: usize) -> Pending<T> {
    let key = (site, rows);
    tally_mut(|m| m.entry(key).or_default().calls += 1);
    Pending::from_op(Tallied { inner: p, key })
}

/// The [`TemporalContext`] of one rank: its clip plus the exchanges with the other ranks.
/// One context per UNet call (it carries the call's timestep, which selects the attention phase).
///
/// Every method is a collective call: all ranks must run the same UNet (same layer sequence) so
/// that their calls pair up, and one rank calls its context from one thread at a time.
pub struct ClipParallelContext<'a> {
    comm: &'a dyn Communicator,
    /// `comm` behind the configured delay (`cfg.comm_delay`).
    delayed: Option<DelayComm<&'a dyn Communicator>>,
    cfg: ViConfig,
    timestep: i64,
}

impl<'a> ClipParallelContext<'a> {
    pub fn new(comm: &'a dyn Communicator, cfg: &ViConfig, timestep: i64) -> Self {
        ClipParallelContext {
            comm,
            delayed: cfg.comm_delay.map(|d| DelayComm::new(comm, d)),
            cfg: cfg.clone(),
            timestep,
        }
    }

    /// The communicator every exchange goes through.
    fn comm(&self) -> &dyn Communicator {
        match &self.delayed {
            Some(d) => d,
            None => self.comm,
        }
    }

    pub fn config(&self) -> &ViConfig {
        &self.cfg
    }

    /// The halo exchange, started: sends the first min(p, n) frames of `edges` to the left
    /// neighbour and the last min(p, n) to the right one. None when min(p, n) = 0: nothing is
    /// exchanged (every rank then skips the call alike). `site`, `rows`: its tally key.
    fn start_exchange<const N: usize>(
        &self,
        edges: &Edges<N>,
        p: usize,
        site: ExchangeSite,
        rows: usize,
    ) -> Result<Option<Pending<Halos>>> {
        let n = edges.frames();
        let m = p.min(n);
        if m == 0 {
            return Ok(None);
        }
        let comm = self.comm();
        let (r, w) = (comm.rank(), comm.world_size());
        let to_left = if r > 0 {
            Some(edges.message(0, m)?)
        } else {
            None
        };
        let to_right = if r + 1 < w {
            Some(edges.message(n - m, m)?)
        } else {
            None
        };
        Ok(Some(tallied(
            comm.start_exchange_neighbors(to_left.as_ref(), to_right.as_ref())?,
            site,
            rows,
        )))
    }

    /// What the neighbours sent (None at the video's ends or when nothing was exchanged).
    fn finish_exchange(pending: Option<Pending<Halos>>) -> Result<Halos> {
        Ok(match pending {
            Some(p) => p.wait()?,
            None => (None, None),
        })
    }

    /// The halo exchange, blocking ([`Self::start_exchange`] + wait).
    fn exchange<const N: usize>(
        &self,
        edges: &Edges<N>,
        p: usize,
        site: ExchangeSite,
        rows: usize,
    ) -> Result<Halos> {
        Self::finish_exchange(self.start_exchange(edges, p, site, rows)?)
    }

    /// GroupNorm of x [N, S, C] (+ SiLU) with statistics over every rank's x (Chan's parallel
    /// combination of (count, mean, M2) in rank order, weighted by counts: exact for unequal clips).
    /// Statistics travel and are applied in f32; the output is written as `out`. `rows`: the
    /// exchange's tally key ([`ExchangeTally`]; 0: unknown).
    #[allow(clippy::too_many_arguments)]
    pub fn global_group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        silu: bool,
        out: DType,
        rows: usize,
    ) -> Result<Tensor> {
        let stats = self.start_global_stats(x, groups, rows)?.wait()?;
        Ok(ops::group_norm_apply_to(
            x, &stats, gamma, beta, eps, silu, out,
        )?)
    }

    /// The whole-video GroupNorm statistics of x [N, S, C], started: this rank's (count, mean,
    /// M2) per (n, group) are all-gathered; `wait` merges them into [N, G, 2] = (mean, biased var)
    /// f32 on x's device, bit-identical on every rank. `rows`: the tally key (0: unknown).
    fn start_global_stats(
        &self,
        x: &Tensor,
        groups: usize,
        rows: usize,
    ) -> Result<Pending<Tensor>> {
        let local = ops::group_norm_stats(x, groups)?; // [N, G, 3]
        let shape = local.shape().to_vec();
        let device = x.device();
        Ok(tallied(
            self.comm().start_all_gather(&local)?,
            ExchangeSite::NormStats,
            rows,
        )
        .map(move |all| {
            merge_stats(&all, &shape, device).map_err(|e| match e {
                ModelError::Runtime(e) => e,
                other => vi_runtime::Error::Msg(other.to_string()),
            })
        }))
    }

    /// Reference ConvLayerPlugin: halo of P frames of the input, body on the padded window.
    fn conv_layer_reference(&self, layer: &TemporalConvLayer, x: &Tensor) -> Result<Tensor> {
        let p = self.cfg.conv_pad;
        if p == 0 {
            return Ok(ops::add_to(x, &layer.body(x)?, x.dtype())?);
        }
        let edges = Edges::new([x], 1);
        let received = self.exchange(&edges, p, ExchangeSite::ConvHalo, x.dim(0) * x.dim(2))?;
        self.conv_layer_reference_body(layer, x, received)
    }

    /// [`Self::conv_layer_reference`] on the output of a per-frame block, edge frames first
    /// (overlapped schedule): the m = min(P, n) frames each neighbour needs (the first m for
    /// rank-1, the last m for rank+1) are produced and their halo exchange started; the other
    /// frames are produced while it flies. The messages are the frames the synchronous schedule
    /// sends (a frame of a per-frame block is the same computed alone or with others, bit for
    /// bit on the CPU). When the neighbours need every frame (both exist and n <= 2m), all are
    /// produced first.
    fn conv_layer_reference_from(
        &self,
        layer: &TemporalConvLayer,
        n: usize,
        produce: &dyn Fn(usize, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let m = self.cfg.conv_pad.min(n);
        let comm = self.comm();
        let (r, w) = (comm.rank(), comm.world_size());
        let (to_l, to_r) = (r > 0, r + 1 < w);
        // [left edge | rest | right edge] as frame counts (an edge is 0 when no neighbour needs it).
        let (lm, rm) = (if to_l { m } else { 0 }, if to_r { m } else { 0 });
        if m == 0 || lm + rm == 0 || lm + rm >= n {
            return self.conv_layer(layer, &produce(0, n)?);
        }
        let left = if to_l { Some(produce(0, m)?) } else { None };
        let right = if to_r { Some(produce(n - m, m)?) } else { None };
        let rows = left
            .as_ref()
            .or(right.as_ref())
            .map_or(0, |t| t.dim(0) * t.dim(2));
        let pending = tallied(
            comm.start_exchange_neighbors(left.as_ref(), right.as_ref())?,
            ExchangeSite::ConvHalo,
            rows,
        );
        // Overlaps the halo exchange.
        let rest = produce(lm, n - lm - rm)?;
        let pieces: Vec<&Tensor> = left.iter().chain([&rest]).chain(right.iter()).collect();
        let x = ops::concat(&pieces, 1)?;
        drop((left, rest, right));
        let received = pending.wait()?;
        self.conv_layer_reference_body(layer, &x, received)
    }

    /// The rest of [`Self::conv_layer_reference`] once the halos `(l, r)` are there.
    fn conv_layer_reference_body(
        &self,
        layer: &TemporalConvLayer,
        x: &Tensor,
        (l, r): Halos,
    ) -> Result<Tensor> {
        let (n, p) = (x.dim(1), self.cfg.conv_pad);
        let edges = Edges::new([x], 1);
        let left = edges.halo(l, p, Side::Left, ShortHalo::Keep)?;
        let right = edges.halo(r, p, Side::Right, ShortHalo::Keep)?;
        let [window] = edges.windows(&left, &right)?;
        let h = layer.body(&window)?;
        let centre = ops::narrow(&h, 1, left.dim(1), n)?;
        Ok(ops::add_to(x, &centre, x.dtype())?)
    }

    /// Exact-seam temporal conv layer: per block, GroupNorm with whole-video statistics + SiLU,
    /// then the Conv3d on [1 halo frame | clip | 1 halo frame] (zero frames at the video's ends =
    /// the Conv3d's own zero padding); = the whole-video layer restricted to this clip.
    ///
    /// Overlapped schedule, per block: the statistics' all-gather and the exchange of the edge
    /// frames of the block's raw input start together (one round trip instead of two in a row);
    /// the clip is normalised while the halo flies, and the received halo frames are normalised
    /// here with the same statistics (an elementwise op: the same values the neighbour would
    /// have sent).
    fn conv_layer_exact(&self, layer: &TemporalConvLayer, x: &Tensor) -> Result<Tensor> {
        let (b, f, s, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let mut h = x.clone();
        for (norm, conv) in layer.norms.iter().zip(&layer.convs) {
            let flat = h.reshape(&[b, f * s, c])?;
            let apply = |t: &Tensor, stats: &Tensor| -> Result<Tensor> {
                let n = t.dim(1);
                Ok(ops::group_norm_apply_to(
                    &t.reshape(&[b, n * s, c])?,
                    stats,
                    &norm.gamma,
                    &norm.beta,
                    norm.eps,
                    true,
                    layer.dtype(),
                )?
                .reshape(&[b, n, s, c])?)
            };
            let (hn, left, right) = if self.cfg.overlap {
                let stats = self.start_global_stats(&flat, norm.groups, b * s)?;
                let raw = Edges::new([&h], 1);
                let halos = self.start_exchange(&raw, 1, ExchangeSite::ConvHalo, b * s)?;
                let stats = stats.wait()?;
                // Overlaps the halo exchange.
                let hn = apply(&h, &stats)?;
                let (l, r) = Self::finish_exchange(halos)?;
                let (l, r) = (
                    l.map(|t| apply(&t, &stats)).transpose()?,
                    r.map(|t| apply(&t, &stats)).transpose()?,
                );
                let edges = Edges::new([&hn], 1);
                let left = edges.halo(l, 1, Side::Left, ShortHalo::Keep)?;
                let right = edges.halo(r, 1, Side::Right, ShortHalo::Keep)?;
                (hn, left, right)
            } else {
                let hn = self
                    .global_group_norm(
                        &flat,
                        norm.groups,
                        &norm.gamma,
                        &norm.beta,
                        norm.eps,
                        true,
                        layer.dtype(),
                        b * s,
                    )?
                    .reshape(&[b, f, s, c])?;
                let edges = Edges::new([&hn], 1);
                let (l, r) = self.exchange(&edges, 1, ExchangeSite::ConvHalo, b * s)?;
                let left = edges.halo(l, 1, Side::Left, ShortHalo::Keep)?;
                let right = edges.halo(r, 1, Side::Right, ShortHalo::Keep)?;
                (hn, left, right)
            };
            let [window] = Edges::new([&hn], 1).windows(&left, &right)?;
            let y = conv.forward(&window)?;
            h = ops::narrow(&y, 1, 1, f)?;
        }
        Ok(ops::add_to(x, &h, x.dtype())?)
    }

    /// Local attention windows of k, v [b, n, H, D] -> each [b, n + 2p, H, D]: [p frames of
    /// rank-1 | own n | p frames of rank+1], zero frames at the video's ends and, where a neighbour
    /// has fewer than p frames, on the outer side. The k and v halos travel together as
    /// [2b, min(p, n), H, D] (only the halo frames are copied for the exchange). Started here;
    /// [`Self::finish_local_windows`] completes it (p = 0: no exchange).
    fn start_local_windows(
        &self,
        k: &Tensor,
        v: &Tensor,
        p: usize,
    ) -> Result<Option<Pending<Halos>>> {
        if p == 0 {
            return Ok(None);
        }
        self.start_exchange(&Edges::new([k, v], 1), p, ExchangeSite::AttnHalo, k.dim(0))
    }

    fn finish_local_windows(
        k: &Tensor,
        v: &Tensor,
        p: usize,
        pending: Option<Pending<Halos>>,
    ) -> Result<(Tensor, Tensor)> {
        if p == 0 {
            return Ok((k.clone(), v.clone()));
        }
        let edges = Edges::new([k, v], 1);
        let (l, r) = Self::finish_exchange(pending)?;
        let left = edges.halo(l, p, Side::Left, ShortHalo::ZeroFill)?;
        let right = edges.halo(r, p, Side::Right, ShortHalo::ZeroFill)?;
        let b2 = 2 * k.dim(0);
        if left.dim(1) != p || right.dim(1) != p || left.dim(0) != b2 || right.dim(0) != b2 {
            return Err(ModelError::Msg(format!(
                "clip-parallel attention: neighbour halos {:?} / {:?} do not fit k {:?} (pad {p})",
                left.shape(),
                right.shape(),
                k.shape()
            )));
        }
        let [k_local, v_local] = edges.windows(&left, &right)?;
        Ok((k_local, v_local))
    }

    /// The global tokens, started: this rank's k/v at frames 0, stride, ... (k and v together as
    /// [2b, g, H, D]) all-gathered; [`Self::finish_global_tokens`] keeps the first top_k frames of
    /// all ranks' in rank order.
    fn start_global_tokens(&self, k: &Tensor, v: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        let idx = global_token_indices(k.dim(1), self.cfg.top_k, self.comm().world_size());
        let mine = ops::concat(
            &[
                &ops::index_select(k, 1, &idx)?,
                &ops::index_select(v, 1, &idx)?,
            ],
            0,
        )?;
        Ok(tallied(
            self.comm().start_all_gather(&mine)?,
            ExchangeSite::GlobalTokens,
            k.dim(0),
        ))
    }

    /// (k_glob, v_glob), each [b, min(top_k, all), H, D].
    fn finish_global_tokens(&self, b: usize, gathered: Vec<Tensor>) -> Result<(Tensor, Tensor)> {
        let refs: Vec<&Tensor> = gathered.iter().collect();
        let all = ops::concat(&refs, 1)?;
        let g = self.cfg.top_k.min(all.dim(1));
        let glob = ops::narrow(&all, 1, 0, g)?;
        Ok((ops::narrow(&glob, 0, 0, b)?, ops::narrow(&glob, 0, b, b)?))
    }

    /// The dual-scope attention of q over the local windows and the global tokens.
    fn dual_scope(
        &self,
        q: &Tensor,
        (k_local, v_local): (Tensor, Tensor),
        (k_glob, v_glob): (Tensor, Tensor),
        scale: f32,
    ) -> Result<Tensor> {
        let (local_bias, global_bias) = self.cfg.phase_biases(self.timestep);
        let params = DualScopeParams {
            pad: self.cfg.attn_pad,
            scale: scale * self.cfg.attn_scale,
            local_bias,
            global_bias,
            token_num_scale: self.cfg.token_num_scale,
        };
        Ok(ops::dual_scope_attention(
            q, &k_local, &v_local, &k_glob, &v_glob, &params,
        )?)
    }
}

fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    if q.rank() != 4 || k.shape() != q.shape() || v.shape() != q.shape() {
        return Err(ModelError::Msg(format!(
            "clip-parallel attention: q, k, v must be equal [b, n, H, D], got {:?} {:?} {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    Ok(())
}

/// Chan's merge, in rank order, of every rank's GroupNorm statistics `all` ([N, G, 3] each,
/// `shape`) -> [N, G, 2] (mean, biased var) in f32 on `device`.
fn merge_stats(all: &[Tensor], shape: &[usize], device: vi_runtime::Device) -> Result<Tensor> {
    let (n, g) = (shape[0], shape[1]);
    let mut acc: Vec<(f64, f64, f64)> = vec![(0.0, 0.0, 0.0); n * g];
    for (src, t) in all.iter().enumerate() {
        if t.shape() != shape {
            return Err(ModelError::Msg(format!(
                "exact-seam GroupNorm: rank {src} has statistics {:?}, this rank {shape:?} \
                 (batch, channels and groups must agree)",
                t.shape(),
            )));
        }
        let v = t.to_vec_f32()?;
        for (i, a) in acc.iter_mut().enumerate() {
            let (cb, mb, m2b) = (v[3 * i] as f64, v[3 * i + 1] as f64, v[3 * i + 2] as f64);
            let (ca, ma, m2a) = *a;
            let c = ca + cb;
            if c == 0.0 {
                continue;
            }
            let d = mb - ma;
            *a = (c, ma + d * cb / c, m2a + m2b + d * d * ca * cb / c);
        }
    }
    let mut stats = Vec::with_capacity(n * g * 2);
    for &(c, m, m2) in &acc {
        stats.push(m as f32);
        stats.push(if c > 0.0 { (m2 / c) as f32 } else { 0.0 });
    }
    Ok(Tensor::from_slice_on(
        &stats,
        &[n, g, 2],
        device,
        DType::F32,
    )?)
}

/// Which side of a clip a halo sits on; its outer side faces away from the clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Left,
    Right,
}

/// What a halo of fewer than `p` frames (from a neighbour holding fewer frames) becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShortHalo {
    /// Kept as received: the window is clamped (temporal conv layers).
    Keep,
    /// Completed to `p` frames with zero frames on its outer side (attention windows).
    ZeroFill,
}

/// The tensors of one halo exchange. Their edge frames along `axis` travel as one message,
/// concatenated along axis 0 (an attention layer's k and v together, [2b, m, H, D]); only the
/// edge frames are copied. Every part has the same shape except along axis 0.
struct Edges<'t, const N: usize> {
    parts: [&'t Tensor; N],
    axis: usize,
}

impl<'t, const N: usize> Edges<'t, N> {
    fn new(parts: [&'t Tensor; N], axis: usize) -> Self {
        Edges { parts, axis }
    }

    /// Frames of this rank's clip.
    fn frames(&self) -> usize {
        self.parts[0].dim(self.axis)
    }

    /// Frames `start..start + len` of every part, as one message.
    fn message(&self, start: usize, len: usize) -> Result<Tensor> {
        if N == 1 {
            return Ok(ops::narrow(self.parts[0], self.axis, start, len)?);
        }
        let slices = self
            .parts
            .iter()
            .map(|x| ops::narrow(x, self.axis, start, len))
            .collect::<vi_runtime::Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = slices.iter().collect();
        Ok(ops::concat(&refs, 0)?)
    }

    /// The padding rule, one place for every exchange: a halo of `p` frames for `side` is what the
    /// neighbour sent, or `p` zero frames (shape, dtype and device of a message) at the video's
    /// end; a shorter halo is kept or zero-filled on its outer side as `short` says.
    fn halo(
        &self,
        received: Option<Tensor>,
        p: usize,
        side: Side,
        short: ShortHalo,
    ) -> Result<Tensor> {
        let zeros = |len: usize| -> Result<Tensor> {
            let x = self.parts[0];
            let mut shape = x.shape().to_vec();
            shape[0] = self.parts.iter().map(|t| t.dim(0)).sum();
            shape[self.axis] = len;
            Ok(Tensor::zeros(&shape, x.device(), x.dtype())?)
        };
        let t = match received {
            None => return zeros(p),
            Some(t) => t,
        };
        let got = t.dim(self.axis);
        if short == ShortHalo::Keep || got >= p {
            return Ok(t);
        }
        let fill = zeros(p - got)?;
        let pair = match side {
            Side::Left => [&fill, &t],
            Side::Right => [&t, &fill],
        };
        Ok(ops::concat(&pair, self.axis)?)
    }

    /// The windows [left halo | part | right halo] along `axis`, one per part (each part's rows
    /// of the halos).
    fn windows(&self, left: &Tensor, right: &Tensor) -> Result<[Tensor; N]> {
        let mut row = 0;
        let mut out = Vec::with_capacity(N);
        for x in self.parts {
            let w = if N == 1 {
                ops::concat(&[left, x, right], self.axis)?
            } else {
                let b = x.dim(0);
                let l = ops::narrow(left, 0, row, b)?;
                let r = ops::narrow(right, 0, row, b)?;
                row += b;
                ops::concat(&[&l, x, &r], self.axis)?
            };
            out.push(w);
        }
        Ok(out
            .try_into()
            .unwrap_or_else(|_| unreachable!("one window per part")))
    }
}

impl TemporalContext for ClipParallelContext<'_> {
    fn conv_layer(&self, layer: &TemporalConvLayer, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 {
            return Err(ModelError::Msg(format!(
                "clip-parallel conv layer: x must be [B, F, S, C], got {:?}",
                x.shape()
            )));
        }
        if self.cfg.exact_seam {
            self.conv_layer_exact(layer, x)
        } else {
            self.conv_layer_reference(layer, x)
        }
    }

    /// Overlapped schedule, reference mode, where [`edge_first_pays`]: edge frames first, their
    /// halo exchange overlaps the production of the interior frames
    /// ([`Self::conv_layer_reference_from`]). Otherwise (the synchronous schedule; exact-seam
    /// mode, whose first exchange needs statistics over the whole clip; a weight-bound block)
    /// all frames are produced first.
    fn conv_layer_from(
        &self,
        layer: &TemporalConvLayer,
        frames: usize,
        block: FrameBlock,
        produce: &dyn Fn(usize, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.cfg.overlap
            && !self.cfg.exact_seam
            && edge_first_pays(self.cfg.conv_pad, frames, block)
        {
            self.conv_layer_reference_from(layer, frames, produce)
        } else {
            self.conv_layer(layer, &produce(0, frames)?)
        }
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
        if self.cfg.exact_seam {
            self.global_group_norm(x, groups, gamma, beta, eps, false, out, 0)
        } else {
            Ok(ops::group_norm_to(x, groups, gamma, beta, eps, false, out)?)
        }
    }

    /// Synchronous: global tokens gathered, then the local windows exchanged, then attention.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        check_qkv(q, k, v)?;
        let glob = self.start_global_tokens(k, v)?.wait()?;
        let glob = self.finish_global_tokens(q.dim(0), glob)?;
        let p = self.cfg.attn_pad;
        let local = Self::finish_local_windows(k, v, p, self.start_local_windows(k, v, p)?)?;
        self.dual_scope(q, local, glob, scale)
    }

    /// Overlapped (same calls in the same order as [`Self::attention`]): k and v are projected
    /// first, the global tokens' all-gather and the local windows' exchange start, and q is
    /// projected while both fly.
    fn attention_from(
        &self,
        q: &dyn Fn() -> Result<Tensor>,
        kv: &dyn Fn() -> Result<(Tensor, Tensor)>,
        scale: f32,
    ) -> Result<Tensor> {
        if !self.cfg.overlap {
            let q = q()?;
            let (k, v) = kv()?;
            return self.attention(&q, &k, &v, scale);
        }
        let (k, v) = kv()?;
        check_qkv(&k, &k, &v)?;
        let glob = self.start_global_tokens(&k, &v)?;
        let p = self.cfg.attn_pad;
        let local = self.start_local_windows(&k, &v, p)?;
        // Overlaps both exchanges.
        let q = q()?;
        check_qkv(&q, &k, &v)?;
        let glob = self.finish_global_tokens(q.dim(0), glob.wait()?)?;
        let local = Self::finish_local_windows(&k, &v, p, local)?;
        self.dual_scope(&q, local, glob, scale)
    }
}

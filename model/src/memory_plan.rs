//! The memory plan of a generation (docs/design.md section 7: a plan that would not fit is refused
//! before any weight is loaded).
//!
//! Exact by construction where it can be: the activations are not estimated from formulas but
//! measured by running the generation's own code on shape-only tensors (`Device::Meta`, see
//! `vi_runtime::meta`): the same UNet, clip-parallel context, sampler and VAE code, over the same
//! ranks (threads exchanging meta halos and global tokens), counting the bytes of every tensor alive
//! ([`vi_runtime::meta::measure`]). A real CPU f32 run of the tiny model allocates exactly the
//! tensors the dry run counts (tests/memory_plan.rs checks equality).
//!
//! Per device the plan is: weights (parameter tables x storage dtype; 1-D parameters f32,
//! [`param_dtype`]; on CUDA also the cached re-layout copy of every kxk and temporal conv kernel,
//! `cuda/conv.rs`) plus the activations at the device's worst moment: the larger of the text phase
//! (encoder pass, on rank 0's device) and the text embeddings kept + the sum over the device's ranks
//! of each rank's peak. A rank's peak is the larger of its denoising phase (sampler state + CFG
//! batch of 2 + one UNet pass on its clip, with the halos and global tokens it receives) and its
//! decoding phase (latents + one VAE chunk).
//!
//! Why the clip-parallel pass is simulated rather than bounded by a whole-video pass on n + 2 halo
//! frames: the clip-parallel context holds its clip *and* the padded window at once (x, halos,
//! window, body on the window), which a plain pass on n + 2P frames does not (it holds one
//! (n + 2P)-frame input): that bound can be short by one activation. Running the real context
//! over all ranks counts exactly what each rank holds: its own tensors, a charged copy of every
//! tensor it receives ([`RechargingComm`]), and what it sent until its next exchange. Each rank's
//! peak is therefore >= its real tensor high-water mark, whatever the thread timing.
//!
//! Ranks sharing a device are threads that run concurrently, so their peaks add (a bound: they do
//! not all peak at once). The dry run runs `pipeline::generate`'s own rank loop
//! ([`crate::rank_loop::run_rank`], through [`measure_rank`]) on zero inputs; it simulates
//! `min(steps, 3)` sampler steps, enough to reach the second-order state (`prev_x0`) every later
//! step has too. What tensors cannot show (cuBLASLt and
//! cuDNN workspaces, the CUDA memory pool's rounding and fragmentation, CPU GEMM packing) is the
//! margin [`Margin`] of the fit check.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vi_runtime::comm::Communicator;
use vi_runtime::meta::{self, Measured};
use vi_runtime::offload::Tier;
use vi_runtime::{ops, DType, Device, Tensor};

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::clip_parallel::ViConfig;
use crate::distributed::{run_ranks, split_frames};
use crate::params::{param_dtype, ModelError, ParamSource, Params, Result};
use crate::rank_loop::{run_rank, Phase, RankHooks, RankInputs, RankJob, RankModels};
use crate::sampler::{Sampler, SamplerKind};
use crate::schedule::Schedule;
use crate::tokenizer::CONTEXT_LENGTH;
use crate::unet::{UNet3D, UNetConfig};
use crate::vae::{VaeConfig, VaeDecoder};

const GIB: f64 = (1u64 << 30) as f64;

/// `12.3 GiB` / `45.6 MiB`.
pub fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / GIB)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

/// The three model configurations (no weights needed).
#[derive(Debug, Clone)]
pub struct PlanModels {
    pub unet: UNetConfig,
    pub clip: ClipTextConfig,
    pub vae: VaeConfig,
}

/// What a generation will do, as far as memory is concerned.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Per rank of the whole job (index = logical rank): its device and the models' storage
    /// dtype there. Only the entries of `local` name this process's devices.
    pub ranks: Vec<(Device, DType)>,
    /// The ranks this process holds and plans (`0..ranks.len()` for one process). The dry run
    /// runs every rank, so that these receive the halos and tokens of their neighbours in other
    /// processes, but plans only these: the others are planned by their own processes (their
    /// entries in `ranks` give the dtype; their devices are not this process's).
    pub local: Range<usize>,
    /// Frames of the whole video.
    pub frames: usize,
    /// Pixel size.
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub sampler: SamplerKind,
    pub vi: ViConfig,
    /// Frames the VAE decodes at a time.
    pub vae_chunk: usize,
    pub decode: bool,
    /// Distinct prompts (the text encoder runs on these + the negative prompt).
    pub prompts: usize,
    /// The bounded-memory schedule to plan for ([`choose_schedule`] tries several).
    pub schedule: Schedule,
}

/// The plan of one device.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    pub device: Device,
    pub dtype: DType,
    /// Ranks on this device.
    pub ranks: Vec<usize>,
    /// Frames of each of those ranks.
    pub rank_frames: Vec<usize>,
    /// Weight bytes of the UNet, text encoder, VAE.
    pub unet_weights: u64,
    pub text_weights: u64,
    pub vae_weights: u64,
    /// CUDA's cached re-layout copies of the kxk / temporal conv kernels (0 elsewhere).
    pub conv_relayout: u64,
    /// CPU backend scratch that is not a tensor, for the ranks computing at once (0 elsewhere):
    /// per rank an im2col block (8 MiB), the re-ordered kernel of the largest kxk convolution
    /// and attention score blocks ([`cpu_scratch_per_rank`]). Part of [`device_need`].
    pub scratch: u64,
    /// Text phase peak (rank 0's device only) and the embeddings it leaves on the device.
    pub text_peak: u64,
    pub text_kept: u64,
    /// Per rank of this device: denoising peak (state + one UNet pass, CFG batch 2).
    pub denoise_peaks: Vec<u64>,
    /// Per rank: latents kept + one VAE chunk's peak (0 without decoding).
    pub decode_peaks: Vec<u64>,
    /// Per rank: the most it holds while waiting in a collective call (see [`RankPeaks::parked`]).
    pub parked: Vec<u64>,
    /// The ranks of this device take turns ([`Schedule::rank_turns`]): only one holds its
    /// transients at a time, the others hold at most their parked bytes.
    pub rank_turns: bool,
    /// Under [`Schedule::offload`]: the most bytes this device's ranks hold in the lower tier at
    /// once (host memory for CUDA, the spill file for the CPU); not part of [`Self::total`].
    pub offloaded: u64,
    /// Largest fp32 buffer of the CUDA GEMM f32-bias fallback (taken only if cuBLASLt refuses a
    /// bias epilogue; one op at a time per device, since a device's ranks share one stream and
    /// stream-ordered frees precede later allocations). Added to the CUDA margin.
    pub gemm_fallback: u64,
}

impl DevicePlan {
    pub fn weights(&self) -> u64 {
        self.unet_weights + self.text_weights + self.vae_weights + self.conv_relayout
    }
    /// The device's ranks together at their worst moment. Concurrent ranks: the sum over them
    /// of max(denoising, decoding) peaks (a bound: they do not all peak at once). Ranks taking
    /// turns: one rank at its peak while every other waits with at most its parked bytes, the
    /// worst such rank.
    pub fn ranks_peak(&self) -> u64 {
        let peaks = self
            .denoise_peaks
            .iter()
            .zip(&self.decode_peaks)
            .map(|(a, b)| *a.max(b));
        if !self.rank_turns {
            return peaks.sum();
        }
        let parked: u64 = self.parked.iter().sum();
        peaks
            .zip(&self.parked)
            .map(|(p, own)| p + (parked - own))
            .max()
            .unwrap_or(0)
    }
    /// Activation bytes at the device's worst moment.
    pub fn activations(&self) -> u64 {
        self.text_peak.max(self.text_kept + self.ranks_peak())
    }
    pub fn total(&self) -> u64 {
        self.weights() + self.activations()
    }

    /// `cuda:0 (2 ranks x 12 frames, bf16): weights 3.10 GiB + activations 2 x 4.02 GiB ...`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let frames: Vec<String> = self.rank_frames.iter().map(|f| f.to_string()).collect();
        let _ = write!(
            s,
            "{} ({} rank{} of {} frames, {}): weights {} (UNet {}, text {}, VAE {}",
            device_name(self.device),
            self.ranks.len(),
            if self.ranks.len() == 1 { "" } else { "s" },
            frames.join("/"),
            format!("{:?}", self.dtype).to_lowercase(),
            fmt_bytes(self.weights()),
            fmt_bytes(self.unet_weights),
            fmt_bytes(self.text_weights),
            fmt_bytes(self.vae_weights),
        );
        if self.conv_relayout > 0 {
            let _ = write!(s, ", conv re-layouts {}", fmt_bytes(self.conv_relayout));
        }
        let max_den = self.denoise_peaks.iter().copied().max().unwrap_or(0);
        let max_dec = self.decode_peaks.iter().copied().max().unwrap_or(0);
        let _ = write!(
            s,
            ") + activations {} ({} x denoising step {}, VAE chunk {}",
            fmt_bytes(self.activations()),
            self.ranks.len(),
            fmt_bytes(max_den),
            fmt_bytes(max_dec),
        );
        if self.rank_turns && self.ranks.len() > 1 {
            let max_parked = self.parked.iter().copied().max().unwrap_or(0);
            let _ = write!(
                s,
                "; ranks take turns, each waiting one holds up to {}",
                fmt_bytes(max_parked)
            );
        }
        if self.text_peak > 0 {
            let _ = write!(s, ", text encoder {}", fmt_bytes(self.text_peak));
        }
        let _ = write!(s, ") = {}", fmt_bytes(self.total()));
        if self.offloaded > 0 {
            let _ = write!(
                s,
                "; offloaded up to {} to {}",
                fmt_bytes(self.offloaded),
                match self.device {
                    Device::Cpu => "the spill file",
                    _ => "host memory",
                }
            );
        }
        if self.gemm_fallback > 0 {
            let _ = write!(
                s,
                " (+ up to {} if cuBLASLt refuses an f32-bias epilogue)",
                fmt_bytes(self.gemm_fallback)
            );
        }
        s
    }
}

/// The plan of a generation: per device, plus the host memory of the decoded frames.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub devices: Vec<DevicePlan>,
    /// Decoded frames alive in host memory at once: the frame flow's queues and message in
    /// flight and the writer's buffer ([`crate::frame_flow::frames_alive_bytes`]): flat in the
    /// video's length.
    pub host_frames: u64,
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Meta => "meta".into(),
    }
}

/// Weights of the dry run: uncharged meta tensors in the storage dtype the real loaders use
/// ([`param_dtype`]); records each parameter's bytes.
struct MetaWeights {
    dtype: DType,
    /// key -> (shape, bytes)
    table: Mutex<BTreeMap<String, (Vec<usize>, u64)>>,
}

impl MetaWeights {
    fn new(dtype: DType) -> Self {
        MetaWeights {
            dtype,
            table: Mutex::new(BTreeMap::new()),
        }
    }
    fn bytes(&self) -> u64 {
        self.table.lock().unwrap().values().map(|(_, b)| b).sum()
    }
    /// Bytes of the conv kernels the CUDA backend re-lays once and caches (a second copy):
    /// kxk Conv2d kernels [Cout, Cin, kh, kw] with kh*kw > 1, and temporal kernels
    /// [Cout, Cin, k, 1, 1] with k > 1 (`cuda/conv.rs`, `relaid`).
    fn relayout_bytes(&self) -> u64 {
        self.table
            .lock()
            .unwrap()
            .values()
            .filter(|(s, _)| match s.len() {
                4 => s[2] * s[3] > 1,
                5 => s[2] > 1,
                3 => s[2] > 1,
                _ => false,
            })
            .map(|(_, b)| b)
            .sum()
    }
}

impl ParamSource for MetaWeights {
    fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let dt = param_dtype(shape, self.dtype);
        let bytes = (shape.iter().product::<usize>() * dt.size_in_bytes()) as u64;
        self.table
            .lock()
            .unwrap()
            .insert(key.to_string(), (shape.to_vec(), bytes));
        Ok(Tensor::meta(shape, dt))
    }
    fn contains(&self, _key: &str) -> bool {
        false
    }
}

/// The three models on meta weights of `dtype`, and their weight tables.
pub struct MetaModels {
    pub unet: UNet3D,
    pub clip: ClipTextModel,
    pub vae: VaeDecoder,
    pub dtype: DType,
    unet_w: MetaWeights,
    clip_w: MetaWeights,
    vae_w: MetaWeights,
}

impl MetaModels {
    pub fn build(m: &PlanModels, dtype: DType) -> Result<MetaModels> {
        let (unet_w, clip_w, vae_w) = (
            MetaWeights::new(dtype),
            MetaWeights::new(dtype),
            MetaWeights::new(dtype),
        );
        let unet = UNet3D::load(&m.unet, Params::new(&unet_w))?;
        let clip = ClipTextModel::load(&m.clip, Params::new(&clip_w))?;
        let vae = VaeDecoder::load(&m.vae, Params::new(&vae_w))?;
        Ok(MetaModels {
            unet,
            clip,
            vae,
            dtype,
            unet_w,
            clip_w,
            vae_w,
        })
    }
    /// Weight bytes (UNet, text encoder, VAE).
    pub fn weight_bytes(&self) -> (u64, u64, u64) {
        (self.unet_w.bytes(), self.clip_w.bytes(), self.vae_w.bytes())
    }
    /// The largest kxk conv kernel in f32 (what the CPU backend re-orders per call).
    pub fn largest_conv_kernel_f32(&self) -> u64 {
        [&self.unet_w, &self.clip_w, &self.vae_w]
            .iter()
            .flat_map(|w| {
                w.table
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|(s, _)| s.len() == 4 && s[2] * s[3] > 1)
                    .map(|(s, _)| (s.iter().product::<usize>() * 4) as u64)
                    .collect::<Vec<_>>()
            })
            .max()
            .unwrap_or(0)
    }
    /// Bytes of the CUDA backend's cached conv kernel re-layouts (all three models).
    pub fn relayout_bytes(&self) -> u64 {
        self.unet_w.relayout_bytes() + self.clip_w.relayout_bytes() + self.vae_w.relayout_bytes()
    }
    /// The rank view of these models on `Device::Meta`.
    pub fn rank_models(&self) -> RankModels<'_> {
        RankModels {
            unet: &self.unet,
            vae: &self.vae,
            device: Device::Meta,
            dtype: self.dtype,
        }
    }
    /// The text conditioning's (sequence length, hidden size).
    pub fn text_dims(&self) -> (usize, usize) {
        (
            CONTEXT_LENGTH.min(self.clip.config.max_position_embeddings),
            self.clip.config.hidden_size,
        )
    }
    /// Pixels per latent pixel.
    pub fn vae_scale(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len() - 1)
    }
}

/// A communicator for the dry run: every tensor received from another rank becomes a fresh
/// charged copy on the receiving thread, so it counts against the receiver's peak (what a real
/// rank holds: the CUDA path copies between devices; between ranks of one device it may share the
/// sender's buffer, and the plan then counts it twice, an over-estimate). Each exchange ends with
/// a barrier, so the per-rank peaks do not depend on thread timing. A real sender can return from
/// an exchange before its neighbour has taken what it sent (the tensor is still alive in the
/// mailbox, on the sender's device), at the latest until the neighbour's next collective call:
/// so the dry run keeps a charged copy of what this rank sent until its next exchange.
pub struct RechargingComm<'a> {
    inner: &'a dyn Communicator,
    in_flight: Mutex<Vec<Tensor>>,
}

impl<'a> RechargingComm<'a> {
    pub fn new(inner: &'a dyn Communicator) -> Self {
        RechargingComm {
            inner,
            in_flight: Mutex::new(Vec::new()),
        }
    }

    /// Ends an exchange: waits for every rank to have taken its messages, then keeps copies of
    /// what this rank sent (see the type doc), dropping the previous exchange's.
    fn settle(&self, sent: &[Option<&Tensor>]) -> vi_runtime::Result<()> {
        self.inner.barrier()?;
        let mut kept = Vec::new();
        for t in sent.iter().flatten() {
            kept.push(recharge((*t).clone())?);
        }
        *self.in_flight.lock().unwrap() = kept;
        Ok(())
    }
}

/// A fresh copy of a received tensor, created (and charged) on the receiving thread: a meta
/// tensor on the dry run, a real copy (same values) in the CPU validation runs.
fn recharge(t: Tensor) -> vi_runtime::Result<Tensor> {
    if t.device() == Device::Meta && t.rank() == 3 {
        // Exact-seam GroupNorm statistics [N, G, 3] (the only rank-3 tensors the UNet
        // all-gathers; global tokens are rank 4) are read on the host with `to_vec_f32`, which
        // a meta tensor refuses: on the dry run they arrive as host zeros of the same shape
        // (values never change a shape). A few bytes.
        return Tensor::zeros(t.shape(), Device::Cpu, t.dtype());
    }
    ops::affine(&t, 1.0, 0.0)
}

impl Communicator for RechargingComm<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> vi_runtime::Result<(Option<Tensor>, Option<Tensor>)> {
        let (l, r) = self.inner.exchange_neighbors(to_left, to_right)?;
        let out = (l.map(recharge).transpose()?, r.map(recharge).transpose()?);
        self.settle(&[to_left, to_right])?;
        Ok(out)
    }
    fn all_gather(&self, t: &Tensor) -> vi_runtime::Result<Vec<Tensor>> {
        let me = self.rank();
        let out = self
            .inner
            .all_gather(t)?
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                if i == me && !(x.device() == Device::Meta && x.rank() == 3) {
                    Ok(x)
                } else {
                    recharge(x)
                }
            })
            .collect::<vi_runtime::Result<Vec<Tensor>>>()?;
        self.settle(&[Some(t)])?;
        Ok(out)
    }
    fn all_reduce_sum(&self, t: &Tensor) -> vi_runtime::Result<Tensor> {
        recharge(self.inner.all_reduce_sum(t)?)
    }
    fn gather_to_root(&self, t: &Tensor) -> vi_runtime::Result<Option<Vec<Tensor>>> {
        self.inner
            .gather_to_root(t)?
            .map(|v| v.into_iter().map(recharge).collect())
            .transpose()
    }
    fn barrier(&self) -> vi_runtime::Result<()> {
        self.inner.barrier()
    }
    fn send_to(&self, dst: usize, t: &Tensor) -> vi_runtime::Result<()> {
        self.inner.send_to(dst, t)
    }
    fn recv_from(&self, src: usize) -> vi_runtime::Result<Tensor> {
        recharge(self.inner.recv_from(src)?)
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

/// Peaks of one rank of the dry run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RankPeaks {
    /// Denoising phase: sampler state, the CFG batch and one UNet pass (with received halos).
    pub denoise: u64,
    /// Decoding phase: what the denoising phase left alive + one VAE chunk's peak.
    pub decode: u64,
    /// Largest CUDA GEMM f32-bias fallback buffer of either phase (`meta::Measured::fallback`).
    pub fallback: u64,
    /// The most the rank holds at the entry to or the return from any call to the group (where
    /// a rank under [`Schedule::rank_turns`] waits without its device's turn): its state, the
    /// activations it keeps across the exchange (skips), what it sent and received.
    pub parked: u64,
}

/// The dry run's inputs: zeros of the real inputs' shapes, placed on the rank's device (shape-only
/// tensors on `Device::Meta`; real zeros in the CPU validation runs).
pub struct ZeroInputs {
    /// Text conditioning rows: (sequence length, hidden size).
    pub text: (usize, usize),
}

impl RankInputs for ZeroInputs {
    fn conditioning(&self, device: Device, dtype: DType) -> Result<Tensor> {
        // The rank's own copy of its conditioning (`generate`: moved to its device and dtype).
        let (seq, hidden) = self.text;
        Ok(Tensor::zeros(&[2, seq, hidden], device, dtype)?)
    }
    fn noise(
        &self,
        _draw: u64,
        _clip: &Range<usize>,
        shape: &[usize],
        device: Device,
    ) -> Result<Tensor> {
        Ok(Tensor::zeros(shape, device, DType::F32)?)
    }
}

/// A communicator that records the rank's live tensor bytes (+ `base`, what an enclosing phase
/// keeps alive) at the entry to and the return from every call to the group: [`RankPeaks::parked`].
struct ParkProbe<'a> {
    inner: &'a dyn Communicator,
    base: AtomicU64,
    parked: AtomicU64,
}

impl ParkProbe<'_> {
    fn note(&self) {
        let now = self.base.load(Ordering::SeqCst) + meta::live_bytes() as u64;
        self.parked.fetch_max(now, Ordering::SeqCst);
    }
    fn around<R>(&self, call: impl FnOnce() -> vi_runtime::Result<R>) -> vi_runtime::Result<R> {
        self.note();
        let r = call()?;
        self.note();
        Ok(r)
    }
}

impl Communicator for ParkProbe<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> vi_runtime::Result<(Option<Tensor>, Option<Tensor>)> {
        self.around(|| self.inner.exchange_neighbors(to_left, to_right))
    }
    fn all_gather(&self, t: &Tensor) -> vi_runtime::Result<Vec<Tensor>> {
        self.around(|| self.inner.all_gather(t))
    }
    fn all_reduce_sum(&self, t: &Tensor) -> vi_runtime::Result<Tensor> {
        self.around(|| self.inner.all_reduce_sum(t))
    }
    fn gather_to_root(&self, t: &Tensor) -> vi_runtime::Result<Option<Vec<Tensor>>> {
        self.around(|| self.inner.gather_to_root(t))
    }
    fn barrier(&self) -> vi_runtime::Result<()> {
        self.around(|| self.inner.barrier())
    }
    fn send_to(&self, dst: usize, t: &Tensor) -> vi_runtime::Result<()> {
        self.around(|| self.inner.send_to(dst, t))
    }
    fn recv_from(&self, src: usize) -> vi_runtime::Result<Tensor> {
        self.around(|| self.inner.recv_from(src))
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

/// Hooks that measure each phase of the rank loop (tensor bytes of this rank's thread).
struct MeasurePhases<'a> {
    denoise: Cell<Measured>,
    decode: Cell<Option<Measured>>,
    probe: &'a ParkProbe<'a>,
}

impl RankHooks for MeasurePhases<'_> {
    fn phase(&self, phase: Phase, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        // The decode phase runs with the latents the denoising phase left alive.
        let base = match phase {
            Phase::Denoise => 0,
            Phase::Decode => self.denoise.get().live_end as u64,
        };
        self.probe.base.store(base, Ordering::SeqCst);
        let (r, m) = meta::measure_full(body);
        match phase {
            Phase::Denoise => self.denoise.set(m),
            Phase::Decode => self.decode.set(Some(m)),
        }
        r
    }
    // Decoded chunks are dropped: their RGB8 bytes are host memory ([`MemoryPlan::host_frames`]).
}

/// Guidance and fps conditioning of the dry run: values change no shape, so no byte count.
const DRY_RUN_GUIDANCE: f32 = 7.5;
const DRY_RUN_FPS: f32 = 8.0;

/// The rank loop of a generation ([`run_rank`], the function `pipeline::generate` runs) on
/// [`ZeroInputs`] placed on `m.device` (meta tensors on the dry run; real ones for the CPU
/// validation), each phase measured: the rank's peaks (the models' weights are not counted).
/// `text` is the conditioning's (sequence length, hidden size).
pub fn measure_rank(
    m: &RankModels,
    text: (usize, usize),
    comm: &dyn Communicator,
    job: &RankJob,
) -> Result<RankPeaks> {
    let probe = ParkProbe {
        inner: comm,
        base: AtomicU64::new(0),
        parked: AtomicU64::new(0),
    };
    let hooks = MeasurePhases {
        denoise: Cell::new(Measured::default()),
        decode: Cell::new(None),
        probe: &probe,
    };
    run_rank(m, &probe, job, &ZeroInputs { text }, &hooks)?;
    let den = hooks.denoise.get();
    let mut peaks = RankPeaks {
        denoise: den.peak as u64,
        decode: 0,
        fallback: den.fallback as u64,
        parked: probe.parked.load(Ordering::SeqCst),
    };
    if let Some(vae) = hooks.decode.get() {
        // The latents the denoising phase left alive + one VAE chunk's peak.
        peaks.decode = (den.live_end + vae.peak) as u64;
        peaks.fallback = peaks.fallback.max(vae.fallback as u64);
    }
    Ok(peaks)
}

/// Text phase on meta weights: the encoder on `prompts + 1` prompts, then one [2, L, hidden]
/// conditioning per rank (kept for the whole run). Returns (peak, bytes kept, largest GEMM
/// fallback buffer).
pub fn text_phase(models: &MetaModels, prompts: usize, world: usize) -> Result<(u64, u64, u64)> {
    let seq = CONTEXT_LENGTH.min(models.clip.config.max_position_embeddings);
    let ids = vec![0u32; seq * (prompts + 1)];
    let (r, m) = meta::measure_full(|| -> Result<(Tensor, Vec<Tensor>)> {
        let emb = models.clip.forward(&ids, prompts + 1)?;
        let (s, h) = (emb.dim(1), emb.dim(2));
        let mut per_rank = Vec::with_capacity(world);
        for _ in 0..world {
            let uncond = ops::narrow(&emb, 0, 0, 1)?;
            let cond = ops::narrow(&emb, 0, prompts.min(1), 1)?;
            per_rank.push(ops::concat(&[&uncond, &cond], 0)?.reshape(&[2, s, h])?);
        }
        Ok((emb, per_rank))
    });
    drop(r?);
    Ok((m.peak as u64, m.live_end as u64, m.fallback as u64))
}

/// Sampler steps the dry run simulates: enough for the second-order state of every later step.
const SIM_STEPS: usize = 3;

/// Plans `req`: one meta dry run of the whole generation (all ranks, as threads).
pub fn plan(models: &PlanModels, req: &PlanRequest) -> Result<MemoryPlan> {
    let world = req.ranks.len();
    if req.local.is_empty() || req.local.end > world {
        return Err(ModelError::Config(format!(
            "the planned ranks {:?} are not a part of the {world} ranks",
            req.local
        )));
    }
    let clips = split_frames(req.frames, world)?;
    // This process's devices in order of first appearance, with their dtype.
    let mut devs: Vec<(Device, DType)> = Vec::new();
    for &(d, dt) in &req.ranks[req.local.clone()] {
        match devs.iter().find(|(x, _)| *x == d) {
            Some((_, t)) if *t != dt => {
                return Err(ModelError::Config(format!(
                    "{}: ranks of one device must share a dtype",
                    device_name(d)
                )))
            }
            Some(_) => {}
            None => devs.push((d, dt)),
        }
    }
    let mut built: Vec<(DType, MetaModels)> = Vec::new();
    for &(_, dt) in &req.ranks {
        if !built.iter().any(|(t, _)| *t == dt) {
            built.push((dt, MetaModels::build(models, dt)?));
        }
    }
    let of = |dt: DType| &built.iter().find(|(t, _)| *t == dt).expect("built").1;
    let m0 = of(req.ranks[0].1);
    let scale = m0.vae_scale();
    if !req.height.is_multiple_of(scale) || !req.width.is_multiple_of(scale) {
        return Err(ModelError::Config(format!(
            "{}x{} is not a multiple of the VAE's {scale}",
            req.width, req.height
        )));
    }
    let (lh, lw) = (req.height / scale, req.width / scale);
    let sampler = Sampler::new(req.sampler, req.steps)?;
    // Rank 0 encodes the text; its process keeps a conditioning per rank it holds.
    let text_here = req.local.start == 0;
    let (text_peak, text_kept, text_fallback) = text_phase(m0, req.prompts, req.local.len())?;

    // Under offload: one accounting-only tier per local device, shared by its ranks (what they
    // move off the device at once); the ranks of other processes get one of their own.
    let tiers: Vec<(Device, Arc<Tier>)> = devs.iter().map(|&(d, _)| (d, Tier::meta())).collect();
    let peaks = run_ranks(world, Duration::from_secs(600), |rank, comm| {
        let comm = RechargingComm::new(comm);
        let tier = if !req.local.contains(&rank) {
            Tier::meta()
        } else {
            tiers
                .iter()
                .find(|(d, _)| *d == req.ranks[rank].0)
                .map(|(_, t)| t.clone())
                .expect("a tier per local device")
        };
        let mm = of(req.ranks[rank].1);
        let job = RankJob {
            sampler: &sampler,
            steps: req.steps.min(SIM_STEPS),
            clip: clips[rank].clone(),
            latent: (lh, lw),
            guidance: DRY_RUN_GUIDANCE,
            fps_cond: DRY_RUN_FPS,
            vi: &req.vi,
            vae_chunk: req.vae_chunk,
            decode: req.decode,
            schedule: req.schedule,
            // The dry run keeps every exchange in lockstep (RechargingComm); turns enter the
            // device's sum through the parked bytes (DevicePlan::ranks_peak).
            turn: None,
            offload_tier: req.schedule.offload.then_some(tier),
        };
        measure_rank(&mm.rank_models(), mm.text_dims(), &comm, &job)
    })?;

    let mut out = Vec::new();
    for (i, &(d, dt)) in devs.iter().enumerate() {
        let m = of(dt);
        let ranks: Vec<usize> = req.local.clone().filter(|&r| req.ranks[r].0 == d).collect();
        let (u, c, v) = m.weight_bytes();
        out.push(DevicePlan {
            device: d,
            dtype: dt,
            rank_frames: ranks.iter().map(|&r| clips[r].len()).collect(),
            unet_weights: u,
            text_weights: c,
            vae_weights: v,
            conv_relayout: if matches!(d, Device::Cuda(_)) {
                m.relayout_bytes()
            } else {
                0
            },
            scratch: if d == Device::Cpu {
                let computing = if req.schedule.rank_turns {
                    1
                } else {
                    ranks.len()
                };
                computing as u64 * cpu_scratch_per_rank(m.largest_conv_kernel_f32())
            } else {
                0
            },
            text_peak: if i == 0 && text_here { text_peak } else { 0 },
            text_kept: if i == 0 && text_here { text_kept } else { 0 },
            denoise_peaks: ranks.iter().map(|&r| peaks[r].denoise).collect(),
            decode_peaks: ranks.iter().map(|&r| peaks[r].decode).collect(),
            parked: ranks.iter().map(|&r| peaks[r].parked).collect(),
            rank_turns: req.schedule.rank_turns,
            offloaded: if req.schedule.offload {
                tiers[i].1.peak()
            } else {
                0
            },
            gemm_fallback: ranks
                .iter()
                .map(|&r| peaks[r].fallback)
                .chain((i == 0 && text_here).then_some(text_fallback))
                .max()
                .unwrap_or(0),
            ranks,
        });
    }
    let host_frames = if req.decode {
        crate::frame_flow::frames_alive_bytes(
            &clips,
            req.local.clone(),
            req.vae_chunk,
            req.height * req.width,
        )
    } else {
        0
    };
    Ok(MemoryPlan {
        devices: out,
        host_frames,
    })
}

/// Host memory the CUDA devices' offloaded tensors take (their tiers' peaks, a bound: they need
/// not peak at once). The CPU device's offloaded tensors go to a spill file on disk instead.
pub fn host_offloaded(plan: &MemoryPlan) -> u64 {
    plan.devices
        .iter()
        .filter(|d| matches!(d.device, Device::Cuda(_)))
        .map(|d| d.offloaded)
        .sum()
}

/// The bytes of `d` that a budget bounds: its weights and activations, and on the CPU device
/// (the host) also the decoded frames kept in host memory and the backend's scratch.
pub fn device_need(plan: &MemoryPlan, d: &DevicePlan) -> u64 {
    d.total()
        + d.scratch
        + if d.device == Device::Cpu {
            plan.host_frames
        } else {
            0
        }
}

/// CPU backend scratch of one computing rank (not tensors, so not in the dry run): an im2col
/// block (at most 8 MiB, `cpu/conv.rs`), the f32 re-ordered kernel of a kxk convolution
/// (`largest_kernel`), 1 MiB of attention score blocks and GEMM packing.
pub fn cpu_scratch_per_rank(largest_kernel: u64) -> u64 {
    (8 << 20) + largest_kernel + (1 << 20)
}

/// What [`choose_schedule`] chose.
#[derive(Debug, Clone)]
pub struct ScheduleChoice {
    /// The least constraining candidate that fits (or the most constraining one when none does).
    pub schedule: Schedule,
    /// Its plan.
    pub plan: MemoryPlan,
    /// Whether every device's [`device_need`] is within its budget (true when no budget is known).
    pub fits: bool,
    /// Candidates planned (each one dry run).
    pub tried: usize,
}

/// Picks the least constraining schedule of [`Schedule::ladder`] whose plan fits every device's
/// budget (`budget_of(device)`: the bytes [`device_need`] may reach; None: unbounded), by one
/// shape-only dry run per candidate (`req.schedule` is ignored). With no budget anywhere, the
/// unconstrained schedule.
pub fn choose_schedule(
    models: &PlanModels,
    req: &PlanRequest,
    budget_of: &dyn Fn(Device) -> Option<u64>,
) -> Result<ScheduleChoice> {
    // The whole job's longest clip: every process of a job walks the same ladder (but for
    // turns, which only a process with a shared device tries), so their choices merge into one
    // of its rungs ([`Schedule::merge`]).
    let clips = split_frames(req.frames, req.ranks.len())?;
    let longest = clips.iter().map(|c| c.len()).max().unwrap_or(1);
    let local = &req.ranks[req.local.clone()];
    let shared = local
        .iter()
        .any(|(d, _)| local.iter().filter(|(x, _)| x == d).count() > 1);
    let ladder = Schedule::ladder(longest, shared);
    let bounded = local.iter().any(|(d, _)| budget_of(*d).is_some());
    let run = |schedule: Schedule| plan_fits(models, req, schedule, budget_of);
    if !bounded {
        let (plan, _) = run(ladder[0])?;
        return Ok(ScheduleChoice {
            schedule: ladder[0],
            plan,
            fits: true,
            tried: 1,
        });
    }
    // The most constraining candidate first: when even it does not fit, no other does (one dry
    // run to refuse a hopeless request).
    let last = *ladder.last().expect("the ladder is never empty");
    let (last_plan, last_fits) = run(last)?;
    if !last_fits {
        return Ok(ScheduleChoice {
            schedule: last,
            plan: last_plan,
            fits: false,
            tried: 1,
        });
    }
    for (i, &schedule) in ladder[..ladder.len() - 1].iter().enumerate() {
        let (plan, fits) = run(schedule)?;
        if fits {
            return Ok(ScheduleChoice {
                schedule,
                plan,
                fits: true,
                tried: i + 2,
            });
        }
    }
    Ok(ScheduleChoice {
        schedule: last,
        plan: last_plan,
        fits: true,
        tried: ladder.len(),
    })
}

/// The plan of `req` under `schedule` (`req.schedule` is ignored) and whether every device's
/// [`device_need`] is within its budget (`budget_of`, None: unbounded).
pub fn plan_fits(
    models: &PlanModels,
    req: &PlanRequest,
    schedule: Schedule,
    budget_of: &dyn Fn(Device) -> Option<u64>,
) -> Result<(MemoryPlan, bool)> {
    let p = plan(
        models,
        &PlanRequest {
            schedule,
            ..req.clone()
        },
    )?;
    let fits = p
        .devices
        .iter()
        .all(|d| budget_of(d.device).is_none_or(|b| device_need(&p, d) <= b));
    Ok((p, fits))
}

/// Headroom the fit check keeps on top of the plan, for what tensors do not show.
#[derive(Debug, Clone, Copy)]
pub struct Margin {
    pub fixed: u64,
    /// Fraction of the planned bytes.
    pub fraction: f64,
}

impl Margin {
    /// CUDA: 1 GiB fixed (cuBLASLt workspace 32 MiB per device, cuDNN handles and convolution
    /// workspaces, which are allocated per call and freed stream-ordered, our kernel modules; the
    /// im2col path, used only without cuDNN, chunks its buffer to at most 1 GiB) plus 10 % of the
    /// plan (the memory pool rounds allocations up and keeps freed blocks cached: a fragmented
    /// pool can hold more than the live bytes); [`check_fit`] adds the device's largest GEMM
    /// fallback buffer ([`DevicePlan::gemm_fallback`]). Not measured on a GPU here: a conservative
    /// choice, to be tuned from `device_info` high-water marks.
    pub const CUDA: Margin = Margin {
        fixed: 1 << 30,
        fraction: 0.10,
    };
    /// CPU: 512 MiB fixed (GEMM packing and im2col scratch, thread stacks, the binary) plus 10 %
    /// (allocator overhead). The weights here are converted from memory-mapped files, whose page
    /// cache the kernel can drop, so MemAvailable is the right comparison.
    pub const CPU: Margin = Margin {
        fixed: 512 << 20,
        fraction: 0.10,
    };
    pub fn of(self, planned: u64) -> u64 {
        self.fixed + (planned as f64 * self.fraction) as u64
    }
    /// The largest plan that fits `free` bytes with this margin: planned + of(planned) <= free.
    pub fn budget_from_free(self, free: u64) -> u64 {
        (free.saturating_sub(self.fixed) as f64 / (1.0 + self.fraction)) as u64
    }
    /// The margin of `device`'s kind.
    pub fn for_device(device: Device) -> Margin {
        match device {
            Device::Cpu => Margin::CPU,
            _ => Margin::CUDA,
        }
    }
}

/// MemAvailable of /proc/meminfo in bytes (None where unreadable).
pub fn host_available() -> Option<u64> {
    let text = vi_weights::input_file::read_text_bounded(
        std::path::Path::new("/proc/meminfo"),
        vi_weights::input_file::Limit::SYSTEM_FILE,
    )
    .ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Free bytes of `device` right now (None where it cannot be asked: CPU uses [`host_available`]).
pub fn device_free(device: Device) -> std::result::Result<Option<u64>, String> {
    match device {
        Device::Cpu => Ok(host_available()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => vi_runtime::cuda::device_info(i)
            .map(|(_, _, free, _)| Some(free as u64))
            .map_err(|e| format!("cuda:{i}: cannot read free memory: {e}")),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Ok(None),
        Device::Meta => Ok(None),
    }
}

/// One device that does not fit: (device, needed with margin, free).
#[derive(Debug, Clone)]
pub struct Shortfall {
    pub device: Device,
    pub need: u64,
    pub margin: u64,
    pub free: u64,
    pub text: String,
}

/// Compares the plan with free memory (`free_of(device)`; the host is [`Device::Cpu`]): the host
/// holds the CPU device's plan plus the decoded frames. Returns one note per device (fits with
/// how much, or could not be checked), or the devices that do not fit, each with an explanation
/// and what to change.
pub fn check_fit(
    plan: &MemoryPlan,
    req: &PlanRequest,
    free_of: &dyn Fn(Device) -> std::result::Result<Option<u64>, String>,
) -> std::result::Result<Vec<String>, Vec<Shortfall>> {
    let mut notes = Vec::new();
    let mut short = Vec::new();
    // The host holds the decoded frames in flight and what CUDA devices offload to it.
    let host_extra = plan.host_frames + host_offloaded(plan);
    let mut entries: Vec<(Device, u64, Option<&DevicePlan>)> = plan
        .devices
        .iter()
        .map(|d| {
            let extra = if d.device == Device::Cpu {
                host_extra
            } else {
                0
            };
            (d.device, d.total() + extra, Some(d))
        })
        .collect();
    if !entries.iter().any(|(d, _, _)| *d == Device::Cpu) && host_extra > 0 {
        entries.push((Device::Cpu, host_extra, None));
    }
    for (device, planned, dp) in entries {
        let margin = match device {
            Device::Cpu => Margin::CPU.of(planned),
            _ => Margin::CUDA.of(planned) + dp.map_or(0, |d| d.gemm_fallback),
        };
        let free = match free_of(device) {
            Ok(Some(f)) => f,
            Ok(None) => {
                notes.push(format!(
                    "{}: free memory unknown, not checked",
                    device_name(device)
                ));
                continue;
            }
            Err(e) => {
                notes.push(format!("{e}; not checked"));
                continue;
            }
        };
        let need = planned + margin;
        if need <= free {
            notes.push(format!(
                "{}: fits ({} with margin, {} free)",
                device_name(device),
                fmt_bytes(need),
                fmt_bytes(free)
            ));
            continue;
        }
        let mut text = format!(
            "{}: the plan needs {} ({} + margin {}) but only {} is free",
            if device == Device::Cpu {
                "host memory (cpu)".to_string()
            } else {
                device_name(device)
            },
            fmt_bytes(need),
            fmt_bytes(planned),
            fmt_bytes(margin),
            fmt_bytes(free),
        );
        if let Some(d) = dp {
            let _ = write!(text, "\n    {}", d.describe());
        }
        if device == Device::Cpu && plan.host_frames > 0 {
            let _ = write!(
                text,
                "\n    decoded frames kept in host memory (in flight to the writer): {}",
                fmt_bytes(plan.host_frames)
            );
        }
        if device == Device::Cpu && host_offloaded(plan) > 0 {
            let _ = write!(
                text,
                "\n    tensors the GPUs offload to host memory: {}",
                fmt_bytes(host_offloaded(plan))
            );
        }
        let _ = write!(text, "\n    {}", advice(dp, req));
        short.push(Shortfall {
            device,
            need,
            margin,
            free,
            text,
        });
    }
    if short.is_empty() {
        Ok(notes)
    } else {
        Err(short)
    }
}

/// What to change, from the biggest part of a device's plan.
fn advice(d: Option<&DevicePlan>, req: &PlanRequest) -> String {
    let Some(d) = d else {
        return "to fit: a smaller --height/--width or --vae-chunk (the decoded frames in flight \
                to the writer are held in host memory)"
            .into();
    };
    let mut tips: Vec<String> = Vec::new();
    // A pad of more frames than a clip holds (window >= 3x the clip) makes the clip-parallel windows (zero frames at the
    // video's ends) outweigh the clip itself: the pad, not the frame count, is the cause.
    let n = d.rank_frames.iter().copied().max().unwrap_or(0);
    for (flag, pad) in [
        ("--attn-pad", req.vi.attn_pad),
        ("--conv-pad", req.vi.conv_pad),
    ] {
        if pad > n {
            tips.push(format!(
                "a smaller {flag} (now {pad}: every rank's window holds {n} + 2 x {pad} frames, \
                 more than its clip of {n})"
            ));
        }
    }
    if d.weights() > d.activations() {
        tips.push(format!(
            "a smaller model: its weights ({}) outweigh the activations, and their sizes come \
             from the model's config.json files (block_out_channels, layers_per_block, \
             hidden_size, ...)",
            fmt_bytes(d.weights())
        ));
    }
    if d.ranks.len() > 1 {
        tips.push(format!(
            "fewer ranks per device ({} ranks share {}: their activations add up)",
            d.ranks.len(),
            device_name(d.device)
        ));
    }
    tips.push(match d.device {
        Device::Cuda(_) => {
            "more GPUs in --devices (e.g. cuda:0-7) so each rank holds fewer frames".into()
        }
        _ => "fewer frames per rank (fewer --frames, or more ranks on more devices)".into(),
    });
    tips.push("fewer --frames or a smaller --height/--width".into());
    let max_den = d.denoise_peaks.iter().copied().max().unwrap_or(0);
    let max_dec = d.decode_peaks.iter().copied().max().unwrap_or(0);
    if req.decode && max_dec > max_den && req.vae_chunk > 1 {
        tips.push(format!(
            "a smaller --vae-chunk (now {}: the VAE decode is this device's largest phase)",
            req.vae_chunk
        ));
    }
    if d.weights() > d.activations() && d.dtype == DType::F32 && d.device != Device::Cpu {
        tips.push("--dtype bf16 (halves the weights)".into());
    }
    format!(
        "to fit: {}; or --no-memory-check to run anyway",
        tips.join("; ")
    )
}

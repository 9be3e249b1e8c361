//! Command-line interface (clap derive). Defaults are the reference's (Video-Infinity on
//! VideoCrafter2) unless stated.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vi_runtime::comm::CommChoice;

#[derive(Debug, Parser)]
#[command(
    name = "video-infinity",
    version,
    about = "Long text-to-video generation with VideoCrafter2 and Video-Infinity clip parallelism",
    long_about = "Generates long videos from text by running the VideoCrafter2 text-to-video model \
                  with the Video-Infinity method: the video is split into one clip per rank, ranks \
                  exchange temporal halos and global tokens at every step.\n\n\
                  Without weights at hand, `--model tiny` runs an embedded tiny model with random \
                  weights (a demo of the machinery; its video is noise-like); `--model \
                  random-full` builds the full-size architecture with random weights."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a video from text prompts.
    Generate(Box<GenerateArgs>),
    /// Show what a safetensors file or a model folder holds (tensors, dtypes, shapes, missing keys).
    Inspect(InspectArgs),
    /// Run a golden reference dump and report the error against its reference outputs.
    Verify(VerifyArgs),
    /// Convert an original VideoCrafter2 checkpoint into the diffusers/transformers folder layout.
    Convert(ConvertArgs),
    /// Time the clip-parallel denoising loop (no VAE, no output).
    Bench(Box<BenchArgs>),
    /// Write the embedded tiny model (random weights) as a model folder, to try `--model DIR`
    /// and `inspect` without real weights.
    WriteTiny(WriteTinyArgs),
    /// Start this node's worker processes (one per GPU) for a multi-process run, like torchrun:
    /// `launch --nproc-per-node 4 -- generate ...`.
    Launch(LaunchArgs),
}

/// `launch`: every worker runs this executable with the arguments after `--`, with torchrun's
/// variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT). Rank = node rank x nproc-per-node + local rank.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Worker processes on this node (usually one per GPU).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: usize,
    /// Nodes taking part (run `launch` once on each, with its --node-rank).
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub nnodes: usize,
    /// This node's index, 0..M-1; node 0 holds rank 0, which serves the rendezvous store.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub node_rank: usize,
    /// Address of node 0 as the other nodes reach it [default with one node: 127.0.0.1;
    /// required with several].
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,
    /// Port of the rendezvous store on node 0; 0 picks a free port (one node only).
    #[arg(long, default_value_t = 29500, value_name = "PORT")]
    pub master_port: u16,
    /// Seconds the other workers get to exit after SIGTERM (when one fails, or on SIGINT/SIGTERM
    /// to the launcher) before SIGKILL.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub grace_period: f64,
    /// The workers' subcommand and its arguments, e.g. `generate --model DIR ...`.
    #[arg(last = true, value_name = "SUBCOMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct WriteTinyArgs {
    /// Folder to create (must not exist, or be empty).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SamplerArg {
    /// DPM-Solver++ SDE, order 2 (what Video-Infinity runs).
    DpmSde,
    /// DPM-Solver++ 2M (deterministic).
    Dpm2m,
    /// DDIM, eta 0 (VideoCrafter2's own sampler).
    Ddim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model folder (unet/, text_encoder/, tokenizer/, vae/ in diffusers layout), `tiny` for
    /// the embedded tiny model with random weights, or `random-full` for VideoCrafter2's
    /// full-size architecture with random weights (checks memory/time at full size).
    #[arg(long, value_name = "DIR|tiny|random-full")]
    pub model: String,

    #[command(flatten)]
    pub parts: PartArgs,

    /// Text prompt. Repeat for several segments: with n prompts and W ranks, rank r uses
    /// prompt floor(r * n / W) (the reference's mapping). Optional with `--model tiny`.
    #[arg(long, value_name = "TEXT", conflicts_with = "prompts")]
    pub prompt: Vec<String>,

    /// File of prompt segments keyed by frame: one `FIRST_FRAME: prompt` per line (first line at
    /// frame 0, increasing; `#` comments and blank lines ignored). Each rank uses the segment that
    /// holds its first frame.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,

    /// Negative prompt (the unconditional branch of classifier-free guidance).
    #[arg(long, default_value = "", value_name = "TEXT")]
    pub negative_prompt: String,

    /// Total number of frames of the video, 1 to 1,000,000 [default: 24 per rank (the reference
    /// clip length); tiny model, or a folder written by write-tiny: 16 per rank].
    #[arg(long)]
    pub frames: Option<usize>,

    /// Ranks and their devices: `cpu`, `cpu:N` (N ranks on the CPU), `cuda:0`, `cuda:0-7`,
    /// `cuda:0x4` (4 ranks time-sharing GPU 0); a bare `0-7` means `cuda:0-7`.
    #[arg(long, default_value = "cpu", value_name = "SPEC")]
    pub devices: String,

    /// Denoising steps, 1 to 1000 [default: 30; tiny model (or its folder): 10].
    #[arg(long)]
    pub steps: Option<usize>,

    /// Classifier-free guidance scale: eps = uncond + g * (cond - uncond); finite, 0 to 100 (0:
    /// the negative prompt alone, 1: the prompt alone; negative values are refused).
    #[arg(long, default_value_t = 12.0, allow_negative_numbers = true)]
    pub guidance: f32,

    /// Frame-rate conditioning passed to the UNet's fps embedding; finite, 0 to 1000.
    #[arg(long, default_value_t = 24.0, allow_negative_numbers = true)]
    pub fps_cond: f32,

    /// Seed of the initial latents and of the SDE noise. Every frame draws from its own ChaCha8
    /// stream keyed by (seed, draw, frame index), so a video does not depend on the number of ranks
    /// (the reference seeds each rank with seed + rank instead).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Sampler.
    #[arg(long, value_enum, default_value_t = SamplerArg::DpmSde)]
    pub sampler: SamplerArg,

    /// Video height in pixels, a positive multiple of 64, at most 16384 [default: 320; tiny
    /// model or its folder: 64].
    #[arg(long)]
    pub height: Option<usize>,

    /// Video width in pixels, a positive multiple of 64, at most 16384 [default: 512; tiny
    /// model or its folder: 64].
    #[arg(long)]
    pub width: Option<usize>,

    /// Write an H.264 MP4 file here.
    #[arg(long, value_name = "FILE.mp4")]
    pub out: Option<PathBuf>,

    /// Write the frames as PNG files `frame_00000.png`, ... into this folder.
    #[arg(long, value_name = "DIR")]
    pub frames_dir: Option<PathBuf>,

    /// Frame rate of the MP4 file, 1 to 1000.
    #[arg(long, default_value_t = 8)]
    pub out_fps: u32,

    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,

    /// Storage precision of weights and activations on CUDA (the CPU backend computes in f32).
    #[arg(long, value_enum, default_value_t = DTypeArg::Bf16)]
    pub dtype: DTypeArg,

    #[command(flatten)]
    pub vi: ViArgs,

    /// No progress bar (stage lines and the summary are still printed).
    #[arg(long)]
    pub quiet: bool,

    /// Frames the VAE decodes at a time (its memory grows with this), 1 to 1,000,000.
    #[arg(long, default_value_t = 4)]
    pub vae_chunk: usize,

    /// Skip the memory plan check (by default a generation whose planned memory exceeds a
    /// device's free memory is refused before any weight is loaded).
    #[arg(long)]
    pub no_memory_check: bool,

    /// Save a checkpoint into DIR (created if missing) after every --checkpoint-every steps and
    /// after the last step: per rank `rank-R-step-S.ckpt` (its clip's latents and sampler state,
    /// f32, with a SHA-256), then `manifest.json` (the request, the world size, S, each file's
    /// size and SHA-256), each written to a temporary name and renamed; the previous checkpoint
    /// is removed only once the new manifest is in place. Its size is stated before the run and
    /// checked against DIR's free space (twice a checkpoint: old and new coexist). With several
    /// processes DIR must be the same folder for all (a shared file system across nodes). A
    /// folder that already holds a checkpoint is refused: continue it with --resume.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,

    /// Where CPU ranks put their spill file when the schedule offloads long-lived tensors (the
    /// planner's choice under a small --memory-budget): one file per process, unlinked as soon
    /// as it is created (nothing is left behind), checked writable and for the plan's spill size
    /// before any weight is loaded. GPU ranks offload to host memory instead [default: the
    /// system temp dir].
    #[arg(long, value_name = "DIR")]
    pub offload_dir: Option<PathBuf>,

    /// Steps between checkpoints, 1 to 1000 (the last step is always checkpointed).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub checkpoint_every: usize,

    /// Continue the generation checkpointed in DIR (and keep checkpointing there): the request
    /// (every flag that changes the video: model files, frames, size, steps, seed, sampler,
    /// prompts, ...) and the world size must equal the checkpoint's (an error names each field
    /// that differs), and each rank file must match the manifest's size and SHA-256 (an error
    /// names the file); nothing is ever silently restarted. The completed steps are skipped; the
    /// video is bit-identical to an uninterrupted run. Frames are decoded only after the last
    /// step, so the output files are written anew from the saved latents (a run stopped while
    /// decoding resumes from the checkpoint after the last step: decoding only).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,

    /// Testing: take this many bytes as free in the checkpoint folder's file system.
    #[arg(long, hide = true, value_name = "BYTES")]
    pub assume_free_disk: Option<u64>,

    /// Bound in seconds on every wait for another rank (the rendezvous, each exchange): a rank
    /// that does not answer within it fails the run, naming that rank [default: 630, i.e. 30 s
    /// past a generous 600 s bound on the slowest step; raise it for the full-size model on CPUs].
    #[arg(long, value_name = "SECONDS")]
    pub rank_timeout: Option<f64>,

    /// How ranks exchange tensors: `nccl` (GPU to GPU through NCCL: every rank needs a CUDA
    /// device of its own and the NCCL library, found as libnccl.so.2 or at VI_NCCL_LIBRARY; an
    /// error otherwise), `host` (in-process hand-over or TCP, copies through the host between
    /// GPUs), or `auto` (NCCL where every rank can use it, else the host path). The video is the
    /// same on both.
    #[arg(long, default_value = "auto", value_name = "auto|host|nccl", value_parser = parse_comm)]
    pub comm: CommChoice,

    /// Testing: take this many bytes as free on every device and on the host.
    #[arg(long, hide = true, value_name = "BYTES")]
    pub assume_free_memory: Option<u64>,

    /// Testing and benchmarks: run this schedule instead of the planner's choice (still planned
    /// and checked against the budget): `unconstrained`, or comma-separated `chunk=N`,
    /// `sequential-cfg`, `turns`, `offload`.
    #[arg(long, hide = true, value_name = "SPEC", value_parser = parse_schedule)]
    pub schedule: Option<vi_model::schedule::Schedule>,

    /// Plan only: print the memory plan and the schedule chosen for the budget, then exit. Loads
    /// no weights, writes nothing and opens no GPU (CUDA devices need --memory-budget or
    /// --device-memory for a budget).
    #[arg(long)]
    pub plan_only: bool,

    /// Memory the plan may take on each device: weights + activations (on the CPU also the
    /// decoded frames), e.g. `20G`, `512MiB`, `80GB` (K/M/G/T and KiB..TiB are powers of 1024,
    /// KB..TB of 1000). The planner picks the least constraining schedule that fits (frames in
    /// chunks, CFG rows one after the other, ranks of a device taking turns) [default: each
    /// device's free memory less the margin].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory_budget: Option<u64>,

    /// Take SIZE as the free memory of every device of --devices instead of asking the device
    /// (plan for a card that is not at hand, or --plan-only without a GPU); the default budget is
    /// then SIZE less the margin. Same units as --memory-budget.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub device_memory: Option<u64>,
}

/// A `--schedule` spec ([`vi_model::schedule::Schedule::parse`]).
fn parse_schedule(text: &str) -> Result<vi_model::schedule::Schedule, String> {
    vi_model::schedule::Schedule::parse(text)
}

/// A byte size: a number (decimals allowed) with an optional unit: B; K, M, G, T or KiB, MiB,
/// GiB, TiB (powers of 1024); KB, MB, GB, TB (powers of 1000). Case-insensitive.
/// `--comm`: auto | host | nccl.
pub fn parse_comm(text: &str) -> Result<CommChoice, String> {
    text.parse()
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 80G, 512MiB, 20GB, 1000000)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (B, K, M, G, T, KiB..TiB, KB..TB)"
            ))
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a usable size (at least 1 byte)"));
    }
    Ok(bytes as u64)
}

/// Video-Infinity knobs (defaults: the reference's plugin configuration).
#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Video-Infinity options")]
pub struct ViArgs {
    /// Global tokens per temporal attention (the first top_k of all ranks' strided frames); 0
    /// (allowed) turns the global tokens off, leaving the local window. At most 1,000,000.
    #[arg(long, default_value_t = 16)]
    pub top_k: usize,

    /// Neighbour frames on each side of a clip in temporal attention (local window 2p+1), at most
    /// 1,000,000 (the memory plan checks what it costs: zero frames pad the video's ends).
    #[arg(long, default_value_t = 8)]
    pub attn_pad: usize,

    /// Neighbour frames on each side of a clip for the temporal conv layers, at most 1,000,000
    /// (checked by the memory plan like --attn-pad).
    #[arg(long, default_value_t = 4)]
    pub conv_pad: usize,

    /// Timestep at and above which the global tokens are favoured (global phase); below it the
    /// local window is; 0 to 1000.
    #[arg(long, default_value_t = 800)]
    pub phase_t: u32,

    /// Logit bias added to the favoured token group (the other group gets +0; the reference's
    /// common +1 on all keys cancels in the softmax); finite, -1000 to 1000.
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    pub phase_bias: f32,

    /// Turn off the phase bias (`dynamic_scale: false`).
    #[arg(long)]
    pub no_dynamic_scale: bool,

    /// Scale each query's logits by ln(visible keys)/ln(16) (`token_num_scale`).
    #[arg(long)]
    pub token_num_scale: bool,

    /// Exact seams (the paper's option, off in the reference code): every Conv3d of a temporal
    /// conv layer gets a halo of its own input, and the temporal layers' GroupNorm statistics are
    /// taken across all ranks, so the W-rank UNet equals the whole-video model except for the
    /// dual-scope attention.
    #[arg(long)]
    pub exact_seam: bool,

    /// The synchronous exchange schedule (each exchange completes where its result is needed)
    /// instead of the overlapped one (exchanges started early, independent work meanwhile); the
    /// video is the same bit for bit on the CPU. For comparisons.
    #[arg(long)]
    pub sync_exchange: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A `.safetensors` file, or a model folder (unet/, text_encoder/, vae/, tokenizer/).
    pub path: PathBuf,
    /// List every tensor (default for a file: the first 50 and a summary).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A golden reference file (`kind` metadata: unet3d, clip_text, vae_decoder, scheduler), or a
    /// tokenizer case file (`tokenizer_cases.json`, with --tokenizer).
    #[arg(long, value_name = "FILE")]
    pub golden: PathBuf,
    /// Tokenizer folder (vocab.json, merges.txt) for a tokenizer case file.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Device to run on: `cpu`, or `cuda:N`.
    #[arg(long, default_value = "cpu", value_name = "SPEC")]
    pub device: String,
    /// Storage precision of weights and activations [default: f32 on cpu, bf16 on cuda]. bf16/f16
    /// on the CPU round every op output to that dtype (the GPU's numeric contract, slow). With
    /// bf16/f16 the pass criterion is rel L2 <= 2e-2 per output.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Absolute tolerance [default: 2e-5 UNet/CLIP, 5e-5 VAE, 2e-4 scheduler].
    #[arg(long)]
    pub atol: Option<f64>,
    /// Relative tolerance [default: 1e-4; scheduler 1e-5].
    #[arg(long)]
    pub rtol: Option<f64>,
    /// Ceiling on each output's rel L2 ||out - ref|| / ||ref|| [default: 1e-5 for f32 on the CPU
    /// (on top of atol/rtol), 2e-2 bf16, 5e-3 f16].
    #[arg(long)]
    pub max_rel_l2: Option<f64>,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The original checkpoint (`model.ckpt`: a PyTorch zip archive holding UNet + OpenCLIP text
    /// tower + VAE in lvdm naming). Read without executing any pickle code.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// Output model folder (created): unet/, text_encoder/, vae/ (safetensors + config.json) and
    /// tokenizer/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace files in an existing, non-empty output folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Element type of the written weights.
    #[arg(long, value_enum, default_value_t = ConvertDType::F32)]
    pub dtype: ConvertDType,
    /// Tokenizer folder to copy (vocab.json, merges.txt) [default: CLIP's BPE tables, built in].
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// GroupNorm groups of the UNet and VAE (not stored in the checkpoint).
    #[arg(long, default_value_t = 32)]
    pub norm_groups: usize,
    /// UNet attention head width (not stored in the checkpoint).
    #[arg(long, default_value_t = 64)]
    pub attention_head_dim: usize,
    /// Text encoder attention heads (not stored in the checkpoint).
    #[arg(long, default_value_t = 16)]
    pub text_heads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConvertDType {
    F32,
    F16,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model folder, `tiny` or `random-full` (full-size architecture, random weights).
    #[arg(long, value_name = "DIR|tiny|random-full", default_value = "tiny")]
    pub model: String,
    /// Ranks and devices (as for `generate`).
    #[arg(long, default_value = "cpu", value_name = "SPEC")]
    pub devices: String,
    /// Total frames, 1 to 1,000,000 [default: 24 per rank; tiny model or its folder: 16 per
    /// rank].
    #[arg(long)]
    pub frames: Option<usize>,
    /// Height in pixels, at most 16384 [default: 320; tiny model or its folder: 64].
    #[arg(long)]
    pub height: Option<usize>,
    /// Width in pixels, at most 16384 [default: 512; tiny model or its folder: 64].
    #[arg(long)]
    pub width: Option<usize>,
    /// Timed denoising steps (with --warmup at most 1000 in all).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed warm-up steps before them.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Sampler.
    #[arg(long, value_enum, default_value_t = SamplerArg::DpmSde)]
    pub sampler: SamplerArg,
    /// Storage precision on CUDA.
    #[arg(long, value_enum, default_value_t = DTypeArg::Bf16)]
    pub dtype: DTypeArg,
    /// Run the ranks as processes on this machine (through `launch`; they exchange over TCP on
    /// 127.0.0.1) instead of threads of this process: compare with the same bench without it
    /// for the cost of the process data plane.
    #[arg(long)]
    pub processes: bool,
    /// Inject LATENCY per message (and a BANDWIDTH limit per rank's incoming link) into the
    /// clip-parallel exchange, e.g. `2ms` or `500us,1GB/s`, and time both schedules (overlapped,
    /// synchronous) with and without it (threads only, not with --processes): how much of the
    /// exchange the overlap hides.
    #[arg(long, value_name = "LATENCY[,BANDWIDTH]")]
    pub comm_delay: Option<String>,
    /// The data plane between ranks (as for `generate`): compare `--comm nccl` with `--comm host`
    /// for what NCCL saves on a step.
    #[arg(long, default_value = "auto", value_name = "auto|host|nccl", value_parser = parse_comm)]
    pub comm: CommChoice,
    /// With --comm-delay: rounds of the four runs, interleaved (each run: warm-up + timed steps).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    #[command(flatten)]
    pub vi: ViArgs,
    /// Skip the memory plan check (as for `generate`: the plan runs before any weight is loaded;
    /// a request whose certain minimum exceeds free memory is refused even so).
    #[arg(long)]
    pub no_memory_check: bool,
    /// Testing: take this many bytes as free on every device and on the host.
    #[arg(long, hide = true, value_name = "BYTES")]
    pub assume_free_memory: Option<u64>,
}

/// Parts taken from other folders than `--model DIR` (e.g. a diffusers VideoCrafter2 UNet with
/// zeroscope's text encoder, tokenizer and VAE).
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Model parts from other folders")]
pub struct PartArgs {
    /// UNet folder (config.json + *.safetensors) instead of `<model>/unet`.
    #[arg(long, value_name = "DIR")]
    pub unet: Option<PathBuf>,
    /// Text encoder folder instead of `<model>/text_encoder`.
    #[arg(long, value_name = "DIR")]
    pub text_encoder: Option<PathBuf>,
    /// VAE folder instead of `<model>/vae`.
    #[arg(long, value_name = "DIR")]
    pub vae: Option<PathBuf>,
    /// Tokenizer folder (vocab.json, merges.txt) instead of `<model>/tokenizer`.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
}

#[cfg(test)]
mod random_full_tests {
    use clap::Parser;

    use super::{Cli, Command};

    /// `--model random-full` parses for `generate` and `bench` (the value is dispatched by
    /// `generate::load_models`, tested there by name).
    #[test]
    fn random_full_is_accepted() {
        let g = Cli::try_parse_from([
            "video-infinity",
            "generate",
            "--model",
            "random-full",
            "--devices",
            "cuda:0",
            "--frames",
            "16",
            "--steps",
            "2",
            "--prompt",
            "a test",
            "--out",
            "/tmp/full.mp4",
        ])
        .unwrap();
        match g.command {
            Command::Generate(a) => assert_eq!(a.model, crate::generate::RANDOM_FULL),
            other => panic!("parsed as {other:?}"),
        }
        let b = Cli::try_parse_from(["video-infinity", "bench", "--model", "random-full"]).unwrap();
        match b.command {
            Command::Bench(a) => assert_eq!(a.model, crate::generate::RANDOM_FULL),
            other => panic!("parsed as {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000000"), Ok(1_000_000));
        assert_eq!(parse_size("80G"), Ok(80 << 30));
        assert_eq!(parse_size("80GiB"), Ok(80 << 30));
        assert_eq!(parse_size("80GB"), Ok(80_000_000_000));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("2 MB"), Ok(2_000_000));
        for bad in ["", "G", "80X", "-1G", "0", "1..2G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}

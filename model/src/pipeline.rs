//! The text-to-video pipeline: prompts -> text embeddings -> per-rank latents -> clip-parallel
//! denoising with classifier-free guidance -> per-rank VAE decoding -> RGB8 frames in order.
//!
//! Also the model folder: where each part's files are ([`locate_part`]), what a part is expected
//! to hold ([`PartKind::expected_table`], built from its config on a [`MetaRecorder`]), a
//! key-by-key comparison with the files ([`check_part`]) and loading ([`Models::load_dir`]).
//!
//! Randomness (documented so runs are reproducible): every normal draw is
//! `rand_distr::StandardNormal` from a `rand_chacha::ChaCha8Rng` whose 32-byte seed is
//! `seed (u64 LE) ++ draw (u64 LE) ++ 16 zero bytes`, on stream `frame` (the frame's index in the
//! whole video), values in the frame's `[h, w, 4]` row-major order. `draw` 0 is the initial
//! latents, `draw` k+1 the SDE noise of step k. Because each frame has its own stream, the noise
//! of a video does not depend on how many ranks share it (the reference seeds per rank).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value;
use vi_runtime::comm::Communicator;
use vi_runtime::{ops, DType, Device, Tensor};
use vi_weights::WeightStore;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::clip_parallel::{ClipParallelContext, ViConfig};
use crate::distributed::{prompt_for_clip, run_ranks_on_devices, split_frames};
use crate::params::{MetaRecorder, ModelError, ParamSource, Params, Result, StoreSource};
use crate::sampler::{Sampler, SamplerKind, SamplerState};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet3D, UNetConfig};
use crate::vae::{to_unit_range, VaeConfig, VaeDecoder};

fn msg(s: impl Into<String>) -> ModelError {
    ModelError::Msg(s.into())
}

/// The three weight-holding parts of a model folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PartKind {
    Unet,
    TextEncoder,
    Vae,
}

impl PartKind {
    pub const ALL: [PartKind; 3] = [PartKind::Unet, PartKind::TextEncoder, PartKind::Vae];

    /// The part's folder name in a diffusers model folder.
    pub fn folder(self) -> &'static str {
        match self {
            PartKind::Unet => "unet",
            PartKind::TextEncoder => "text_encoder",
            PartKind::Vae => "vae",
        }
    }

    /// Prefix tried when a key is not found as is (transformers < 5 text encoders).
    pub fn alt_prefix(self) -> Option<&'static str> {
        match self {
            PartKind::TextEncoder => Some("text_model."),
            _ => None,
        }
    }

    /// Tensors a file may hold that this runtime does not need (not reported as unexpected):
    /// the VAE encoder, old position_ids buffers.
    pub fn is_ignored(self, key: &str) -> bool {
        match self {
            PartKind::Vae => key.starts_with("encoder.") || key.starts_with("quant_conv."),
            PartKind::TextEncoder => key.ends_with("embeddings.position_ids"),
            PartKind::Unet => false,
        }
    }

    /// Every parameter (exact key -> shape) the model built from `config` reads.
    pub fn expected_table(self, config: &Value) -> Result<BTreeMap<String, Vec<usize>>> {
        let rec = MetaRecorder::new();
        let p = Params::new(&rec);
        match self {
            PartKind::Unet => {
                UNet3D::load(&UNetConfig::from_json(config)?, p)?;
            }
            PartKind::TextEncoder => {
                ClipTextModel::load(&ClipTextConfig::from_json(config)?, p)?;
            }
            PartKind::Vae => {
                VaeDecoder::load(&VaeConfig::from_json(config)?, p)?;
            }
        }
        Ok(rec.table())
    }
}

/// Where one part's files are.
#[derive(Debug, Clone)]
pub struct PartFiles {
    pub kind: PartKind,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The `.safetensors` files (one, or the shards of a split checkpoint).
    pub weights: Vec<PathBuf>,
}

impl PartFiles {
    pub fn read_config(&self) -> Result<Value> {
        let text = std::fs::read_to_string(&self.config)
            .map_err(|e| msg(format!("{}: cannot read: {e}", self.config.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| msg(format!("{}: not valid JSON: {e}", self.config.display())))
    }
}

/// Finds `<model_dir>/<part>/config.json` and the part's `.safetensors` files. When a folder holds
/// both full-precision files and `*.fp16.safetensors` variants, the full-precision ones are used.
pub fn locate_part(model_dir: &Path, kind: PartKind) -> Result<PartFiles> {
    let dir = model_dir.join(kind.folder());
    if !dir.is_dir() {
        return Err(msg(format!(
            "model folder {} has no {}/ folder (expected {}/config.json and {}/*.safetensors)",
            model_dir.display(),
            kind.folder(),
            kind.folder(),
            kind.folder()
        )));
    }
    part_files_in(&dir, kind)
}

/// The files of a part folder itself (`config.json` + `*.safetensors`), wherever it is.
pub fn part_files_in(dir: &Path, kind: PartKind) -> Result<PartFiles> {
    let dir = dir.to_path_buf();
    if !dir.is_dir() {
        return Err(msg(format!(
            "{} folder {} does not exist",
            kind.folder(),
            dir.display()
        )));
    }
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(msg(format!("{} is missing", config.display())));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| msg(format!("{}: cannot list: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let is_variant = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".fp16.safetensors") || n.ends_with(".bf16.safetensors"))
    };
    if files.iter().any(|p| !is_variant(p)) {
        files.retain(|p| !is_variant(p));
    }
    if files.is_empty() {
        return Err(msg(format!(
            "{} holds no .safetensors weights (a PyTorch .bin/.ckpt must be converted first: \
             `video-infinity convert`)",
            dir.display()
        )));
    }
    Ok(PartFiles {
        kind,
        dir,
        config,
        weights: files,
    })
}

/// A part's files compared with what its config makes the model read.
#[derive(Debug, Clone, Default)]
pub struct PartCheck {
    /// Expected key -> shape.
    pub expected: BTreeMap<String, Vec<usize>>,
    /// Expected keys absent from the files.
    pub missing: Vec<String>,
    /// (key, expected shape, shape in the file).
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Tensors in the files that the model does not read (not counting ignored ones).
    pub unexpected: Vec<String>,
    /// Tensors in the files that are known and not needed (VAE encoder, position_ids).
    pub ignored: Vec<String>,
    /// Tensor count per dtype name over the files' used tensors.
    pub dtypes: BTreeMap<String, usize>,
    /// Parameters and bytes of the expected tensors found.
    pub params: u64,
    pub bytes: u64,
}

impl PartCheck {
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.wrong_shape.is_empty()
    }
}

/// Compares a part's files with its expected parameter table (headers only: no data is read).
pub fn check_part(files: &PartFiles) -> Result<PartCheck> {
    let config = files.read_config()?;
    let expected = files.kind.expected_table(&config)?;
    let store = WeightStore::open_many(&files.weights)?;
    let mut check = PartCheck::default();
    let mut seen = BTreeSet::new();
    for (key, shape) in &expected {
        let name = [Some(""), files.kind.alt_prefix()]
            .into_iter()
            .flatten()
            .map(|p| format!("{p}{key}"))
            .find(|n| store.contains(n));
        let Some(name) = name else {
            check.missing.push(key.clone());
            continue;
        };
        let info = store.info(&name).expect("contains");
        seen.insert(name.clone());
        if &info.shape != shape {
            check
                .wrong_shape
                .push((key.clone(), shape.clone(), info.shape.clone()));
            continue;
        }
        *check
            .dtypes
            .entry(info.dtype.name().to_string())
            .or_default() += 1;
        check.params += shape.iter().product::<usize>() as u64;
        check.bytes += (info.data_offsets.1 - info.data_offsets.0) as u64;
    }
    for name in store.names() {
        if seen.contains(name) {
            continue;
        }
        let bare = files
            .kind
            .alt_prefix()
            .and_then(|p| name.strip_prefix(p))
            .unwrap_or(name);
        if files.kind.is_ignored(bare) {
            check.ignored.push(name.to_string());
        } else {
            check.unexpected.push(name.to_string());
        }
    }
    check.expected = expected;
    Ok(check)
}

/// The folder of each part of a model.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    pub unet: PathBuf,
    pub text_encoder: PathBuf,
    pub vae: PathBuf,
    /// Holds `vocab.json` and `merges.txt`.
    pub tokenizer: PathBuf,
}

impl ModelPaths {
    /// The parts of a diffusers-layout model folder (`unet/`, `text_encoder/`, `vae/`,
    /// `tokenizer/`); every part folder must exist.
    pub fn in_dir(dir: &Path) -> Result<ModelPaths> {
        if !dir.is_dir() {
            return Err(msg(format!(
                "model folder {} does not exist",
                dir.display()
            )));
        }
        for k in PartKind::ALL {
            locate_part(dir, k)?;
        }
        let tokenizer = dir.join("tokenizer");
        if !tokenizer.is_dir() {
            return Err(msg(format!(
                "model folder {} has no tokenizer/ folder (expected tokenizer/vocab.json and \
                 tokenizer/merges.txt)",
                dir.display()
            )));
        }
        Ok(ModelPaths {
            unet: dir.join("unet"),
            text_encoder: dir.join("text_encoder"),
            vae: dir.join("vae"),
            tokenizer,
        })
    }

    /// Like [`ModelPaths::in_dir`], with any part taken from elsewhere instead; `dir` may be
    /// absent when all four are given.
    pub fn with_overrides(
        dir: Option<&Path>,
        unet: Option<&Path>,
        text_encoder: Option<&Path>,
        vae: Option<&Path>,
        tokenizer: Option<&Path>,
    ) -> Result<ModelPaths> {
        let pick = |o: Option<&Path>, name: &str| -> Result<PathBuf> {
            match (o, dir) {
                (Some(p), _) => Ok(p.to_path_buf()),
                (None, Some(d)) => {
                    if !d.is_dir() {
                        return Err(msg(format!("model folder {} does not exist", d.display())));
                    }
                    let p = d.join(name);
                    if !p.is_dir() {
                        return Err(msg(format!(
                            "model folder {} has no {name}/ folder",
                            d.display()
                        )));
                    }
                    Ok(p)
                }
                (None, None) => Err(msg(format!("no {name} folder given"))),
            }
        };
        Ok(ModelPaths {
            unet: pick(unet, "unet")?,
            text_encoder: pick(text_encoder, "text_encoder")?,
            vae: pick(vae, "vae")?,
            tokenizer: pick(tokenizer, "tokenizer")?,
        })
    }
}

/// Everything a generation needs, on one device.
pub struct Models {
    pub unet: UNet3D,
    pub clip: ClipTextModel,
    pub vae: VaeDecoder,
    pub tokenizer: ClipTokenizer,
    pub device: Device,
    pub dtype: DType,
    /// True for the embedded tiny model: its weights are random, its videos noise-like.
    pub random_weights: bool,
}

fn load_part<T>(
    files: &PartFiles,
    device: Device,
    dtype: DType,
    build: impl FnOnce(&Value, Params) -> Result<T>,
) -> Result<T> {
    let config = files.read_config()?;
    let store = WeightStore::open_many(&files.weights)?;
    let mut src = StoreSource::new(&store, "", device, dtype);
    if let Some(alt) = files.kind.alt_prefix() {
        src = src.with_alt_prefix(alt);
    }
    let where_ = files.dir.display().to_string();
    let part = build(&config, Params::new(&src)).map_err(|e| msg(format!("{where_}: {e}")))?;
    Ok(part)
}

impl Models {
    /// Loads a diffusers-layout model folder (unet/, text_encoder/, vae/, tokenizer/). Every
    /// tensor is checked: present, shape, finite.
    pub fn load_dir(dir: &Path, device: Device, dtype: DType) -> Result<Models> {
        Models::load_paths(&ModelPaths::in_dir(dir)?, device, dtype)
    }

    /// Loads the parts from their own folders (e.g. a VideoCrafter2 UNet next to zeroscope's
    /// text encoder, tokenizer and VAE).
    pub fn load_paths(paths: &ModelPaths, device: Device, dtype: DType) -> Result<Models> {
        let parts = [
            part_files_in(&paths.unet, PartKind::Unet)?,
            part_files_in(&paths.text_encoder, PartKind::TextEncoder)?,
            part_files_in(&paths.vae, PartKind::Vae)?,
        ];
        let tokenizer = ClipTokenizer::from_dir(&paths.tokenizer)
            .map_err(|e| msg(format!("tokenizer: {e}")))?;
        let unet = load_part(&parts[0], device, dtype, |c, p| {
            UNet3D::load(&UNetConfig::from_json(c)?, p)
        })?;
        let clip = load_part(&parts[1], device, dtype, |c, p| {
            ClipTextModel::load(&ClipTextConfig::from_json(c)?, p)
        })?;
        let vae = load_part(&parts[2], device, dtype, |c, p| {
            VaeDecoder::load(&VaeConfig::from_json(c)?, p)
        })?;
        Models::assemble(unet, clip, vae, tokenizer, device, dtype, false)
    }

    /// Builds the models from any parameter source (one per part) and checks they fit together.
    pub fn from_sources(
        configs: (&UNetConfig, &ClipTextConfig, &VaeConfig),
        sources: (&dyn ParamSource, &dyn ParamSource, &dyn ParamSource),
        tokenizer: ClipTokenizer,
        device: Device,
        dtype: DType,
        random_weights: bool,
    ) -> Result<Models> {
        let unet = UNet3D::load(configs.0, Params::new(sources.0))?;
        let clip = ClipTextModel::load(configs.1, Params::new(sources.1))?;
        let vae = VaeDecoder::load(configs.2, Params::new(sources.2))?;
        Models::assemble(unet, clip, vae, tokenizer, device, dtype, random_weights)
    }

    fn assemble(
        unet: UNet3D,
        clip: ClipTextModel,
        vae: VaeDecoder,
        tokenizer: ClipTokenizer,
        device: Device,
        dtype: DType,
        random_weights: bool,
    ) -> Result<Models> {
        let (uc, cc, vc) = (unet.config(), &clip.config, &vae.config);
        if uc.cross_attention_dim != cc.hidden_size {
            return Err(msg(format!(
                "the UNet's cross_attention_dim {} differs from the text encoder's hidden_size {}",
                uc.cross_attention_dim, cc.hidden_size
            )));
        }
        if uc.out_channels != vc.latent_channels || uc.in_channels != vc.latent_channels {
            return Err(msg(format!(
                "the UNet's in/out channels {}/{} differ from the VAE's latent_channels {}",
                uc.in_channels, uc.out_channels, vc.latent_channels
            )));
        }
        Ok(Models {
            unet,
            clip,
            vae,
            tokenizer,
            device,
            dtype,
            random_weights,
        })
    }

    /// Pixels per latent pixel (8 for SD's VAE: one per up block but the last).
    pub fn vae_scale(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len() - 1)
    }

    /// Pixel height/width must be a multiple of this (VAE factor x 2^(UNet downsamplings)).
    pub fn size_multiple(&self) -> usize {
        self.vae_scale() * (1 << self.unet.config().num_upsamplers())
    }

    /// Text embeddings [n, 77, hidden] of `prompts`, in order.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * 77);
        for p in prompts {
            ids.extend(self.tokenizer.encode(p));
        }
        self.clip.forward(&ids, prompts.len())
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt segments `(first_frame, prompt)`, sorted, the first at frame 0. A rank uses the
    /// segment holding its clip's first frame.
    pub prompts: Vec<(usize, String)>,
    pub negative_prompt: String,
    /// Total frames of the video.
    pub frames: usize,
    /// Pixel size (a multiple of [`Models::size_multiple`]).
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale g: eps = uncond + g (cond - uncond).
    pub guidance: f32,
    /// fps conditioning of the UNet.
    pub fps_cond: f32,
    pub seed: u64,
    pub vi: ViConfig,
    /// Number of ranks (clips).
    pub world: usize,
    /// A collective call waiting longer than this for a peer fails (hung-rank bound).
    pub rank_timeout: Duration,
    /// Frames decoded by the VAE at a time (memory bound).
    pub vae_chunk: usize,
    /// Run the VAE (false: denoising only, no frames returned; for benchmarks).
    pub decode: bool,
}

/// Progress of a generation, reported from the rank threads.
#[derive(Debug, Clone)]
pub enum Event {
    /// The text encoder ran on `prompts` distinct prompts (+ the negative one).
    TextEncoded { prompts: usize },
    /// Rank 0 finished denoising step `step` (0-based) of `steps`, at timestep `t`.
    Step { step: usize, steps: usize, t: i64 },
    /// A rank decoded `frames` more frames.
    Decoded { rank: usize, frames: usize },
}

/// One RGB8 frame, `[height, width, 3]` row-major.
pub type Rgb8 = Vec<u8>;

/// The 32-byte ChaCha seed of draw `draw` (module doc).
fn chacha_seed(seed: u64, draw: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&draw.to_le_bytes());
    s
}

/// N(0, 1) values of frames `frames` for draw `draw`: `[F, h, w, c]` row-major (module doc).
pub fn frame_noise(
    seed: u64,
    draw: u64,
    frames: Range<usize>,
    h: usize,
    w: usize,
    c: usize,
) -> Vec<f32> {
    let per = h * w * c;
    let mut out = Vec::with_capacity(frames.len() * per);
    for f in frames {
        let mut rng = ChaCha8Rng::from_seed(chacha_seed(seed, draw));
        rng.set_stream(f as u64);
        out.extend((0..per).map(|_| {
            let v: f32 = StandardNormal.sample(&mut rng);
            v
        }));
    }
    out
}

/// Images [n, H, W, 3] in ~[-1, 1] -> RGB8 frames: round(255 * clamp(x/2 + 0.5, 0, 1)).
pub fn images_to_rgb8(images: &Tensor) -> Result<Vec<Rgb8>> {
    let n = images.dim(0);
    let unit = to_unit_range(images)?.to_vec_f32()?;
    let per = unit.len() / n.max(1);
    Ok(unit
        .chunks(per)
        .map(|c| c.iter().map(|&v| (v * 255.0).round() as u8).collect())
        .collect())
}

/// Checks a request against the models; returns the latent size (h, w).
pub fn check_request(models: &Models, req: &GenerateRequest) -> Result<(usize, usize)> {
    let m = models.size_multiple();
    for (what, v) in [("height", req.height), ("width", req.width)] {
        if v == 0 || v % 8 != 0 {
            return Err(ModelError::Config(format!(
                "{what} {v} is not a multiple of 8"
            )));
        }
        if v % m != 0 {
            return Err(ModelError::Config(format!(
                "{what} {v} must be a multiple of {m}: the latent ({v}/{}) must stay whole \
                 through the UNet's {} downsamplings",
                models.vae_scale(),
                models.unet.config().num_upsamplers()
            )));
        }
    }
    if req.frames == 0 {
        return Err(ModelError::Config("frames must be at least 1".into()));
    }
    split_frames(req.frames, req.world)?;
    if req.steps == 0 {
        return Err(ModelError::Config("steps must be at least 1".into()));
    }
    if req.prompts.is_empty() {
        return Err(ModelError::Config("no prompt given".into()));
    }
    if !req.guidance.is_finite() || !req.fps_cond.is_finite() {
        return Err(ModelError::Config("guidance and fps must be finite".into()));
    }
    Ok((
        req.height / models.vae_scale(),
        req.width / models.vae_scale(),
    ))
}

/// Runs the whole pipeline over `req.world` in-process ranks; `models_of(rank)` gives the models
/// on that rank's device (several ranks may share them). Returns the video's frames in order.
pub fn generate<'m>(
    models_of: &(dyn Fn(usize) -> &'m Models + Sync),
    req: &GenerateRequest,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<Vec<Rgb8>> {
    let world = req.world;
    let m0 = models_of(0);
    let (lh, lw) = check_request(m0, req)?;
    for r in 1..world {
        check_request(models_of(r), req)?;
    }
    let clips = split_frames(req.frames, world)?;
    let lat_c = m0.unet.config().in_channels;

    // Text: [negative, segment prompts...] in one encoder call on rank 0's device.
    let mut texts: Vec<&str> = vec![req.negative_prompt.as_str()];
    texts.extend(req.prompts.iter().map(|(_, p)| p.as_str()));
    let emb = m0.encode_prompts(&texts)?;
    progress(Event::TextEncoded {
        prompts: req.prompts.len(),
    });
    let seq = emb.dim(1);
    let hidden = emb.dim(2);
    // Per rank: [uncond, cond] rows.
    let mut ehs_per_rank = Vec::with_capacity(world);
    for clip in &clips {
        let i = prompt_for_clip(&req.prompts, clip)?;
        let uncond = ops::narrow(&emb, 0, 0, 1)?;
        let cond = ops::narrow(&emb, 0, i + 1, 1)?;
        ehs_per_rank.push(ops::concat(&[&uncond, &cond], 0)?.reshape(&[2, seq, hidden])?);
    }

    let sampler = Sampler::new(req.sampler, req.steps)?;
    let timesteps = sampler.timesteps().to_vec();

    // Each rank's device: halos and global tokens from a rank on another GPU are copied over on
    // arrival (ranks sharing a device exchange without copies).
    let devices: Vec<Device> = (0..world).map(|r| models_of(r).device).collect();
    let per_rank = run_ranks_on_devices(
        &devices,
        req.rank_timeout,
        |rank, comm: &dyn Communicator| {
            let m = models_of(rank);
            let (dev, dt) = (m.device, m.dtype);
            let clip = clips[rank].clone();
            let n = clip.len();
            // The sampler's state (latents, noise, guided eps) stays f32 on the device; only the
            // UNet and the VAE see the model's storage dtype (bf16/f16 on CUDA; f32 on the CPU).
            let to_dev = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
                Ok(Tensor::from_vec(v, shape)?.to_device(dev)?)
            };
            let shape = [1, n, lh, lw, lat_c];
            let ehs = ehs_per_rank[rank].to_device(dev)?.to_dtype(dt)?;
            let mut x = to_dev(
                frame_noise(req.seed, 0, clip.clone(), lh, lw, lat_c),
                &shape,
            )?;
            let sigma = sampler.init_noise_sigma();
            if sigma != 1.0 {
                x = ops::scale(&x, sigma)?;
            }
            let mut state = SamplerState::default();
            for (k, &t) in timesteps.iter().enumerate() {
                let ctx = ClipParallelContext::new(comm, &req.vi, t);
                let input = ops::concat(&[&x, &x], 0)?.to_dtype(dt)?;
                let eps = m
                    .unet
                    .forward(&input, t as f32, req.fps_cond, &ehs, &ctx)?
                    .to_dtype(DType::F32)?;
                let uncond = ops::narrow(&eps, 0, 0, 1)?;
                let cond = ops::narrow(&eps, 0, 1, 1)?;
                let guided = ops::add(
                    &uncond,
                    &ops::scale(&ops::sub(&cond, &uncond)?, req.guidance)?,
                )?;
                let noise = if sampler.needs_noise() {
                    Some(to_dev(
                        frame_noise(req.seed, k as u64 + 1, clip.clone(), lh, lw, lat_c),
                        &shape,
                    )?)
                } else {
                    None
                };
                x = sampler.step(&mut state, k, &guided, &x, noise.as_ref())?;
                if rank == 0 {
                    progress(Event::Step {
                        step: k,
                        steps: timesteps.len(),
                        t,
                    });
                }
            }
            // Each rank decodes its own frames.
            let latents = x.reshape(&[n, lh, lw, lat_c])?.to_dtype(dt)?;
            let mut frames = Vec::with_capacity(n);
            if !req.decode {
                return Ok(frames);
            }
            m.vae
                .decode_frames_with(&latents, req.vae_chunk.max(1), |_, images| {
                    let rgb = images_to_rgb8(&images)?;
                    progress(Event::Decoded {
                        rank,
                        frames: rgb.len(),
                    });
                    frames.extend(rgb);
                    Ok(())
                })?;
            // Frames reach the caller in rank (= frame) order through the per-rank results (no
            // collective after the last step: a rank that decodes more frames makes no one wait).
            Ok(frames)
        },
    )?;
    Ok(per_rank.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_noise_does_not_depend_on_the_split() {
        let whole = frame_noise(5, 0, 0..6, 2, 3, 4);
        let mut parts = frame_noise(5, 0, 0..2, 2, 3, 4);
        parts.extend(frame_noise(5, 0, 2..6, 2, 3, 4));
        assert_eq!(whole, parts);
        assert_ne!(
            whole,
            frame_noise(6, 0, 0..6, 2, 3, 4),
            "seed changes the noise"
        );
        assert_ne!(
            whole,
            frame_noise(5, 1, 0..6, 2, 3, 4),
            "draw changes the noise"
        );
        let n = whole.len() as f64;
        let mean = whole.iter().map(|&v| v as f64).sum::<f64>() / n;
        assert!(mean.abs() < 0.5, "mean {mean}");
    }

    #[test]
    fn frame_noise_is_standard_normal() {
        let v = frame_noise(1, 0, 0..64, 8, 8, 4);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn rgb8_conversion() {
        let x = Tensor::from_vec(vec![-1.0, 0.0, 1.0, 2.0, -3.0, 0.5], &[2, 1, 1, 3]).unwrap();
        let f = images_to_rgb8(&x).unwrap();
        // round(255 * clamp(x/2 + 0.5, 0, 1))
        assert_eq!(f, vec![vec![0, 128, 255], vec![255, 0, 191]]);
    }
}

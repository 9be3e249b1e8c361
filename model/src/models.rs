//! The model folder and the loaded models: where each part's files are ([`locate_part`]), what a
//! part is expected to hold ([`PartKind::expected_table`], built from its config on a
//! [`MetaRecorder`]), a key-by-key comparison with the files ([`check_part`]) and loading
//! ([`Models::load_dir`]) into the [`Models`] a generation runs with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use vi_runtime::{DType, Device, Tensor};
use vi_weights::input_file::{read_text_bounded, wrong_kind, Limit};
use vi_weights::WeightStore;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::params::{MetaRecorder, ModelError, ParamSource, Params, Result, StoreSource};
use crate::rank_loop::RankModels;
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet3D, UNetConfig};
use crate::vae::{VaeConfig, VaeDecoder};

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
        let text =
            read_text_bounded(&self.config, Limit::CONFIG_JSON).map_err(|e| msg(e.to_string()))?;
        serde_json::from_str(&text)
            .map_err(|e| msg(format!("{}: not valid JSON: {e}", self.config.display())))
    }
}

/// Finds `<model_dir>/<part>/config.json` and the part's `.safetensors` files. When a folder holds
/// both full-precision files and `*.fp16.safetensors` variants, the full-precision ones are used.
pub fn locate_part(model_dir: &Path, kind: PartKind) -> Result<PartFiles> {
    let dir = model_dir.join(kind.folder());
    if let Some(k) = wrong_kind(model_dir, true) {
        return Err(msg(format!(
            "model folder {} is {k}, expected a folder",
            model_dir.display()
        )));
    }
    if let Some(k) = wrong_kind(&dir, true) {
        return Err(msg(format!(
            "{} is {k}, expected the model's {}/ folder",
            dir.display(),
            kind.folder()
        )));
    }
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
    if let Some(k) = wrong_kind(&dir, true) {
        return Err(msg(format!(
            "{} folder {} is {k}, expected a folder",
            kind.folder(),
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(msg(format!(
            "{} folder {} does not exist",
            kind.folder(),
            dir.display()
        )));
    }
    let config = dir.join("config.json");
    if let Some(k) = wrong_kind(&config, false) {
        return Err(msg(format!(
            "{} is {k}, expected a JSON file",
            config.display()
        )));
    }
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
    /// (key, problem) of tensors of the right shape that loading refuses
    /// ([`crate::params::check_weight`]: a non-float dtype, a non-finite value).
    pub bad: Vec<(String, String)>,
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
        self.missing.is_empty() && self.wrong_shape.is_empty() && self.bad.is_empty()
    }
}

/// Compares a part's files with its expected parameter table, and applies to every expected
/// tensor the checks loading does ([`crate::params::check_weight`]: dtype, shape, finite values;
/// the data of every used tensor is read).
pub fn check_part(files: &PartFiles) -> Result<PartCheck> {
    let config = files.read_config()?;
    let expected = files
        .kind
        .expected_table(&config)
        .map_err(|e| msg(format!("{}: {e}", files.config.display())))?;
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
        let view = store.view(&name)?;
        if let Err(problem) =
            crate::params::check_weight(info.dtype, &info.dtype_name, view.shape, shape, view.data)
        {
            check.bad.push((key.clone(), problem));
        }
        *check.dtypes.entry(info.dtype_name.clone()).or_default() += 1;
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
        if let Some(k) = wrong_kind(dir, true) {
            return Err(msg(format!(
                "model folder {} is {k}, expected a folder",
                dir.display()
            )));
        }
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
        if let Some(k) = wrong_kind(&tokenizer, true) {
            return Err(msg(format!(
                "{} is {k}, expected the tokenizer/ folder",
                tokenizer.display()
            )));
        }
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
                    if let Some(k) = wrong_kind(d, true) {
                        return Err(msg(format!(
                            "model folder {} is {k}, expected a folder",
                            d.display()
                        )));
                    }
                    if !d.is_dir() {
                        return Err(msg(format!("model folder {} does not exist", d.display())));
                    }
                    let p = d.join(name);
                    if let Some(k) = wrong_kind(&p, true) {
                        return Err(msg(format!(
                            "{} is {k}, expected the model's {name}/ folder",
                            p.display()
                        )));
                    }
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
        if tokenizer.vocab_size() > clip.config.vocab_size {
            return Err(msg(format!(
                "{}: {} tokens, more than the text encoder's vocab_size {} ({}): ids past {} \
                 would index beyond its embedding table",
                paths.tokenizer.join("vocab.json").display(),
                tokenizer.vocab_size(),
                clip.config.vocab_size,
                parts[1].config.display(),
                clip.config.vocab_size - 1
            )));
        }
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

    /// The UNet and the VAE as one rank runs them ([`crate::rank_loop::run_rank`]).
    pub fn rank_models(&self) -> RankModels<'_> {
        RankModels {
            unet: &self.unet,
            vae: &self.vae,
            device: self.device,
            dtype: self.dtype,
        }
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

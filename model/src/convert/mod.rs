//! `video-infinity convert`: the original VideoCrafter2 `model.ckpt` (a PyTorch zip checkpoint)
//! -> diffusers/transformers folders `unet/`, `text_encoder/`, `vae/` (safetensors + config.json).
//!
//! - UNet (`model.diffusion_model.*`): lvdm -> diffusers `UNetVideoCrafter` names
//!   ([`keymap::unet_key`]); `init_attn.0.proj_{in,out}.weight` Conv1d [o, i, 1] -> Linear [o, i].
//! - Text (`cond_stage_model.model.*`): open_clip -> `CLIPTextModel`; the last block, `text_projection`
//!   and `logit_scale` are dropped (VideoCrafter2 uses the penultimate layer), `in_proj_*` split into
//!   q/k/v; keys are written with the `text_model.` prefix (transformers 4 spelling) by default.
//! - VAE (`first_stage_model.*`): ldm -> diffusers `AutoencoderKL` (decoder levels reversed,
//!   attention 1x1 convs -> Linear).
//! - The 13 schedule buffers are ignored; any other key is an error.
//!
//! Configs are inferred from the shapes; the fields the weights do not determine
//! (`norm_num_groups`, UNet `attention_head_dim`, text heads, sample sizes, VAE scaling factor) come
//! from [`ConvertOptions`], whose defaults are VideoCrafter2's. Output is f32 or f16 (IEEE
//! round-to-nearest-even, subnormals kept, via `half`).

pub mod ckpt;
pub mod keymap;
pub mod pickle;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use half::f16;
use serde_json::{json, Value};
use vi_weights::input_file::{read_bounded, Limit};
use vi_weights::{write_safetensors, WDType};

use ckpt::{Checkpoint, CkptTensor};
use keymap::{Op, TextTarget, UnetLayout};

/// Conversion failure; the message names the file and key involved.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(pub String);

impl From<String> for ConvertError {
    fn from(s: String) -> Self {
        ConvertError(s)
    }
}

pub type Result<T> = std::result::Result<T, ConvertError>;

/// Element type of the written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDType {
    F32,
    F16,
}

/// Options for the config fields the weights do not determine, and the output format.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub dtype: OutDType,
    /// GroupNorm groups of the UNet and the VAE (VideoCrafter2: 32).
    pub norm_num_groups: usize,
    /// UNet attention head width (VideoCrafter2: 64).
    pub attention_head_dim: usize,
    /// Text encoder attention heads (VideoCrafter2 / ViT-H-14: 16).
    pub text_num_heads: usize,
    /// UNet `sample_size` (latent side; VideoCrafter2 config: 64).
    pub unet_sample_size: usize,
    /// VAE `sample_size` (ddconfig resolution: 512).
    pub vae_sample_size: usize,
    /// VAE `scaling_factor` (the yaml's `scale_factor`: 0.18215).
    pub vae_scaling_factor: f64,
    /// Write text encoder keys as `text_model.<key>` (transformers 4 spelling, what Hub folders
    /// use); `false` writes the bare transformers 5 names.
    pub text_model_prefix: bool,
    /// A CLIP tokenizer folder (`vocab.json`, `merges.txt`) to validate and copy to
    /// `out_dir/tokenizer/` (the checkpoint holds no tokenizer; the runtime needs one).
    pub tokenizer_dir: Option<PathBuf>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            dtype: OutDType::F32,
            norm_num_groups: 32,
            attention_head_dim: 64,
            text_num_heads: 16,
            unet_sample_size: 64,
            vae_sample_size: 512,
            vae_scaling_factor: 0.18215,
            text_model_prefix: true,
            tokenizer_dir: None,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub unet_tensors: usize,
    pub text_tensors: usize,
    pub vae_tensors: usize,
    /// Schedule buffers skipped.
    pub ignored: Vec<String>,
    /// Text tower tensors dropped (last block, `text_projection`, `logit_scale`).
    pub discarded: Vec<String>,
    pub unet_config: Value,
    pub text_config: Value,
    pub vae_config: Value,
    /// Files written.
    pub written: Vec<PathBuf>,
}

const UNET_PREFIX: &str = "model.diffusion_model.";
const TEXT_PREFIX: &str = "cond_stage_model.model.";
const VAE_PREFIX: &str = "first_stage_model.";
impl std::fmt::Display for ConvertReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "unet: {} tensors, text_encoder: {} tensors ({} dropped: last block, text_projection, \
             logit_scale), vae: {} tensors; {} schedule buffers ignored",
            self.unet_tensors,
            self.text_tensors,
            self.discarded.len(),
            self.vae_tensors,
            self.ignored.len()
        )?;
        for p in &self.written {
            writeln!(f, "wrote {}", p.display())?;
        }
        Ok(())
    }
}

/// Schedule buffers of lvdm's LatentDiffusion (ignored).
pub const IGNORED_KEYS: [&str; 13] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "scale_arr",
];

/// One output tensor: name, dtype, shape, bytes (borrowed from the checkpoint where possible).
type OutTensor<'a> = (String, WDType, Vec<usize>, Cow<'a, [u8]>);

/// Source bytes -> output dtype bytes (borrowed when nothing changes).
fn encode<'a>(
    ck: &'a Checkpoint,
    t: &CkptTensor,
    out: OutDType,
) -> Result<(WDType, Cow<'a, [u8]>)> {
    let src = t.tensor.storage.ty.dtype;
    let want = match out {
        OutDType::F32 => WDType::F32,
        OutDType::F16 => WDType::F16,
    };
    if src == want {
        return Ok((want, ck.bytes(t)?));
    }
    let v = ck.read_f32(t)?;
    let bytes: Vec<u8> = match out {
        OutDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        OutDType::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
    };
    Ok((want, Cow::Owned(bytes)))
}

fn to_linear_shape(name: &str, shape: &[usize]) -> Result<Vec<usize>> {
    match shape {
        [o, i, rest @ ..] if rest.iter().all(|&d| d == 1) => Ok(vec![*o, *i]),
        _ => Err(ConvertError(format!(
            "`{name}`: shape {shape:?} is not a 1x1 convolution that can become a Linear weight"
        ))),
    }
}

/// Split a borrowed-or-owned buffer into `n` equal consecutive parts.
fn split_n<'a>(b: Cow<'a, [u8]>, n: usize) -> Vec<Cow<'a, [u8]>> {
    let len = b.len() / n;
    match b {
        Cow::Borrowed(s) => s.chunks_exact(len).map(Cow::Borrowed).collect(),
        Cow::Owned(v) => v
            .chunks_exact(len)
            .map(|c| Cow::Owned(c.to_vec()))
            .collect(),
    }
}

fn push_unique<'a>(
    out: &mut Vec<OutTensor<'a>>,
    seen: &mut BTreeSet<String>,
    t: OutTensor<'a>,
    src: &str,
) -> Result<()> {
    if !seen.insert(t.0.clone()) {
        return Err(ConvertError(format!(
            "`{src}` maps to `{}`, which another key already produced",
            t.0
        )));
    }
    out.push(t);
    Ok(())
}

fn shape_of<'a>(
    shapes: &'a HashMap<&str, &'a [usize]>,
    key: &str,
    what: &str,
) -> Result<&'a [usize]> {
    shapes
        .get(key)
        .copied()
        .ok_or_else(|| ConvertError(format!("`{key}` missing: needed to infer {what}")))
}

fn dim(shape: &[usize], i: usize, key: &str) -> Result<usize> {
    shape
        .get(i)
        .copied()
        .ok_or_else(|| ConvertError(format!("`{key}`: shape {shape:?} has no dimension {i}")))
}

/// Convert `ckpt` into `out_dir/{unet,text_encoder,vae}`.
pub fn convert_checkpoint(
    ckpt: &Path,
    out_dir: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let ck = Checkpoint::open(ckpt)?;
    let cerr = |msg: String| ConvertError(format!("{}: {msg}", ckpt.display()));

    // Partition the keys; anything unknown stops the conversion.
    let mut unet: Vec<&CkptTensor> = Vec::new();
    let mut text: Vec<&CkptTensor> = Vec::new();
    let mut vae: Vec<&CkptTensor> = Vec::new();
    let mut ignored = Vec::new();
    let mut unknown = Vec::new();
    for t in &ck.tensors {
        if t.name.starts_with(UNET_PREFIX) {
            unet.push(t);
        } else if t.name.starts_with(TEXT_PREFIX) {
            text.push(t);
        } else if t.name.starts_with(VAE_PREFIX) {
            vae.push(t);
        } else if IGNORED_KEYS.contains(&t.name.as_str()) {
            ignored.push(t.name.clone());
        } else {
            unknown.push(t.name.clone());
        }
    }
    if !unknown.is_empty() {
        return Err(cerr(format!(
            "{} unknown key(s) (not UNet/text/VAE/schedule): {}",
            unknown.len(),
            unknown
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for (part, v) in [("UNet", &unet), ("text encoder", &text), ("VAE", &vae)] {
        if v.is_empty() {
            return Err(cerr(format!("no {part} tensors in the checkpoint")));
        }
    }
    for t in unet.iter().chain(&text).chain(&vae) {
        if !matches!(
            t.tensor.storage.ty.dtype,
            WDType::F32 | WDType::F16 | WDType::BF16
        ) {
            return Err(cerr(format!(
                "tensor `{}` is stored as {}, not a float type",
                t.name, t.tensor.storage.ty.name
            )));
        }
    }
    let shapes: HashMap<&str, &[usize]> = ck
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.tensor.shape.as_slice()))
        .collect();
    let kerr = |e: String| cerr(e);

    // ---- UNet
    let unet_keys: Vec<&str> = unet.iter().map(|t| &t.name[UNET_PREFIX.len()..]).collect();
    let layout = UnetLayout::from_keys(unet_keys.iter().copied()).map_err(kerr)?;
    let mut unet_out = Vec::with_capacity(unet.len());
    let mut seen = BTreeSet::new();
    for (t, k) in unet.iter().zip(&unet_keys) {
        let (target, op) = keymap::unet_key(k, &layout).map_err(kerr)?;
        let shape = match op {
            Op::Copy => t.tensor.shape.clone(),
            Op::ToLinear => to_linear_shape(&t.name, &t.tensor.shape).map_err(|e| cerr(e.0))?,
        };
        let (dt, bytes) = encode(&ck, t, opts.dtype)?;
        push_unique(
            &mut unet_out,
            &mut seen,
            (target, dt, shape, bytes),
            &t.name,
        )
        .map_err(|e| cerr(e.0))?;
    }
    let unet_config = unet_config(&shapes, &layout, opts).map_err(|e| cerr(e.0))?;

    // ---- text encoder
    let text_keys: Vec<&str> = text.iter().map(|t| &t.name[TEXT_PREFIX.len()..]).collect();
    let blocks = text_keys
        .iter()
        .filter_map(|k| k.strip_prefix("transformer.resblocks."))
        .filter_map(|r| r.split_once('.').and_then(|(i, _)| i.parse::<usize>().ok()))
        .map(|i| i + 1)
        .max()
        .ok_or_else(|| cerr("no text transformer blocks (`transformer.resblocks.*`)".into()))?;
    if blocks < 2 {
        return Err(cerr(format!(
            "text tower has {blocks} block(s); the penultimate-layer encoder needs at least 2"
        )));
    }
    for i in 0..blocks {
        for sub in keymap::TEXT_BLOCK_KEYS {
            let k = format!("{TEXT_PREFIX}transformer.resblocks.{i}.{sub}");
            if !shapes.contains_key(k.as_str()) {
                return Err(cerr(format!("text block {i} incomplete: `{k}` missing")));
            }
        }
    }
    let tprefix = if opts.text_model_prefix {
        "text_model."
    } else {
        ""
    };
    let mut text_out = Vec::new();
    let mut discarded = Vec::new();
    let mut seen = BTreeSet::new();
    for (t, k) in text.iter().zip(&text_keys) {
        match keymap::text_key(k, blocks).map_err(kerr)? {
            TextTarget::Discard => discarded.push(t.name.clone()),
            TextTarget::One(target, _) => {
                let (dt, bytes) = encode(&ck, t, opts.dtype)?;
                let item = (
                    format!("{tprefix}{target}"),
                    dt,
                    t.tensor.shape.clone(),
                    bytes,
                );
                push_unique(&mut text_out, &mut seen, item, &t.name).map_err(|e| cerr(e.0))?;
            }
            TextTarget::SplitQkv(targets) => {
                let s = &t.tensor.shape;
                if s.is_empty() || s[0] == 0 || !s[0].is_multiple_of(3) {
                    return Err(cerr(format!(
                        "`{}`: shape {s:?} cannot be split into q, k, v",
                        t.name
                    )));
                }
                let mut part_shape = s.clone();
                part_shape[0] /= 3;
                let (dt, bytes) = encode(&ck, t, opts.dtype)?;
                for (target, b) in targets.into_iter().zip(split_n(bytes, 3)) {
                    let item = (format!("{tprefix}{target}"), dt, part_shape.clone(), b);
                    push_unique(&mut text_out, &mut seen, item, &t.name).map_err(|e| cerr(e.0))?;
                }
            }
        }
    }
    let text_config = text_config(&shapes, blocks, opts).map_err(|e| cerr(e.0))?;

    // ---- VAE
    let vae_keys: Vec<&str> = vae.iter().map(|t| &t.name[VAE_PREFIX.len()..]).collect();
    let up_levels = vae_keys
        .iter()
        .filter_map(|k| k.strip_prefix("decoder.up."))
        .filter_map(|r| r.split_once('.').and_then(|(i, _)| i.parse::<usize>().ok()))
        .map(|i| i + 1)
        .max()
        .ok_or_else(|| cerr("no VAE decoder levels (`decoder.up.*`)".into()))?;
    let mut vae_out = Vec::with_capacity(vae.len());
    let mut seen = BTreeSet::new();
    for (t, k) in vae.iter().zip(&vae_keys) {
        let (target, op) = keymap::vae_key(k, up_levels).map_err(kerr)?;
        let shape = match op {
            Op::Copy => t.tensor.shape.clone(),
            Op::ToLinear => to_linear_shape(&t.name, &t.tensor.shape).map_err(|e| cerr(e.0))?,
        };
        let (dt, bytes) = encode(&ck, t, opts.dtype)?;
        push_unique(&mut vae_out, &mut seen, (target, dt, shape, bytes), &t.name)
            .map_err(|e| cerr(e.0))?;
    }
    let vae_config = vae_config(&shapes, &vae_keys, up_levels, opts).map_err(|e| cerr(e.0))?;

    // ---- tokenizer (validated before anything is written)
    if let Some(tdir) = &opts.tokenizer_dir {
        crate::tokenizer::ClipTokenizer::from_dir(tdir)
            .map_err(|e| ConvertError(format!("tokenizer: {e}")))?;
    }

    // ---- the checks loading applies (dtype, shape from the written config, finite values),
    // before anything is written
    for (kind, tensors, config) in [
        (crate::models::PartKind::Unet, &unet_out, &unet_config),
        (
            crate::models::PartKind::TextEncoder,
            &text_out,
            &text_config,
        ),
        (crate::models::PartKind::Vae, &vae_out, &vae_config),
    ] {
        let expected = kind
            .expected_table(config)
            .map_err(|e| cerr(format!("{}/config.json: {e}", kind.folder())))?;
        for (name, dt, shape, bytes) in tensors.iter() {
            let bare = kind
                .alt_prefix()
                .and_then(|p| name.strip_prefix(p))
                .unwrap_or(name);
            let want = expected.get(bare).map_or(shape.as_slice(), Vec::as_slice);
            crate::params::check_weight(*dt, dt.name(), shape, want, bytes).map_err(|e| {
                cerr(format!(
                    "{}/ tensor `{name}`: {e}; nothing was written",
                    kind.folder()
                ))
            })?;
        }
    }

    // ---- write
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut written = Vec::new();
    for (dir, file, tensors, config) in [
        (
            "unet",
            "diffusion_pytorch_model.safetensors",
            &unet_out,
            &unet_config,
        ),
        ("text_encoder", "model.safetensors", &text_out, &text_config),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            &vae_out,
            &vae_config,
        ),
    ] {
        let d = out_dir.join(dir);
        std::fs::create_dir_all(&d)
            .map_err(|e| ConvertError(format!("{}: cannot create: {e}", d.display())))?;
        let st = d.join(file);
        write_safetensors(&st, tensors, Some(&meta)).map_err(|e| ConvertError(e.to_string()))?;
        let cfg = d.join("config.json");
        write_json_atomic(&cfg, config)?;
        written.push(st);
        written.push(cfg);
    }
    if let Some(tdir) = &opts.tokenizer_dir {
        let d = out_dir.join("tokenizer");
        std::fs::create_dir_all(&d)
            .map_err(|e| ConvertError(format!("{}: cannot create: {e}", d.display())))?;
        for f in [
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let src = tdir.join(f);
            if !src.exists() && !matches!(f, "vocab.json" | "merges.txt") {
                continue;
            }
            let limit = match f {
                "vocab.json" => Limit::VOCAB_JSON,
                "merges.txt" => Limit::MERGES_TXT,
                _ => Limit::CONFIG_JSON,
            };
            // Bounded, regular files only (a symlink to a device is refused).
            let bytes = read_bounded(&src, limit).map_err(|e| ConvertError(e.to_string()))?;
            std::fs::write(d.join(f), bytes)
                .map_err(|e| ConvertError(format!("{}: cannot write: {e}", d.join(f).display())))?;
            written.push(d.join(f));
        }
    }
    Ok(ConvertReport {
        unet_tensors: unet_out.len(),
        text_tensors: text_out.len(),
        vae_tensors: vae_out.len(),
        ignored,
        discarded,
        unet_config,
        text_config,
        vae_config,
        written,
    })
}

fn write_json_atomic(path: &Path, v: &Value) -> Result<()> {
    let e = |m: String| ConvertError(format!("{}: {m}", path.display()));
    let text = serde_json::to_string_pretty(v).map_err(|x| e(x.to_string()))? + "\n";
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(|x| e(format!("cannot write: {x}")))?;
    std::fs::rename(&tmp, path).map_err(|x| {
        let _ = std::fs::remove_file(&tmp);
        e(format!("cannot rename into place: {x}"))
    })
}

fn check_divides(what: &str, n: usize, by: usize, option: &str) -> Result<()> {
    if by == 0 || !n.is_multiple_of(by) {
        return Err(ConvertError(format!(
            "{what} {n} is not divisible by {option} = {by}; pass the model's value"
        )));
    }
    Ok(())
}

/// diffusers `UNet3DConditionModel` (+ VideoCrafter fps conditioning) config.
pub fn unet_config(
    shapes: &HashMap<&str, &[usize]>,
    lay: &UnetLayout,
    opts: &ConvertOptions,
) -> Result<Value> {
    let p = |k: String| format!("{UNET_PREFIX}{k}");
    let conv_in = p("input_blocks.0.0.weight".into());
    let conv_in_s = shape_of(shapes, &conv_in, "in_channels")?;
    let in_channels = dim(conv_in_s, 1, &conv_in)?;
    let conv_out = p("out.2.weight".into());
    let out_channels = dim(shape_of(shapes, &conv_out, "out_channels")?, 0, &conv_out)?;
    let mut block_out = Vec::new();
    for l in 0..lay.levels {
        let k = p(format!(
            "input_blocks.{}.0.out_layers.3.weight",
            1 + l * (lay.layers_per_block + 1)
        ));
        block_out.push(dim(shape_of(shapes, &k, "block_out_channels")?, 0, &k)?);
    }
    if dim(conv_in_s, 0, &conv_in)? != block_out[0] {
        return Err(ConvertError(format!(
            "conv_in has {} channels but the first level {}: not a diffusers UNet layout",
            conv_in_s[0], block_out[0]
        )));
    }
    let first_attn = lay
        .attn_input_blocks
        .first()
        .ok_or_else(|| ConvertError("the UNet has no cross-attention block".into()))?;
    let to_k = p(format!(
        "input_blocks.{first_attn}.1.transformer_blocks.0.attn2.to_k.weight"
    ));
    let cross = dim(shape_of(shapes, &to_k, "cross_attention_dim")?, 1, &to_k)?;
    for (l, &c) in block_out.iter().enumerate() {
        check_divides("UNet channels", c, opts.norm_num_groups, "norm_num_groups")?;
        if lay.down_level_has_attn(l) {
            check_divides(
                "UNet attention channels",
                c,
                opts.attention_head_dim,
                "attention_head_dim",
            )?;
        }
    }
    let down: Vec<&str> = (0..lay.levels)
        .map(|l| {
            if lay.down_level_has_attn(l) {
                "CrossAttnDownBlock3D"
            } else {
                "DownBlock3D"
            }
        })
        .collect();
    let up: Vec<&str> = (0..lay.levels)
        .map(|i| {
            if lay.up_block_has_attn(i) {
                "CrossAttnUpBlock3D"
            } else {
                "UpBlock3D"
            }
        })
        .collect();
    let fps = shapes.contains_key(p("fps_embedding.0.weight".into()).as_str());
    Ok(json!({
        "_class_name": "UNet3DVideoCrafterConditionModel",
        "act_fn": "silu",
        "attention_head_dim": opts.attention_head_dim,
        "block_out_channels": block_out,
        "cross_attention_dim": cross,
        "down_block_types": down,
        "downsample_padding": 1,
        "in_channels": in_channels,
        "layers_per_block": lay.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": opts.norm_num_groups,
        "num_attention_heads": null,
        "out_channels": out_channels,
        "sample_size": opts.unet_sample_size,
        "up_block_types": up,
        "fps_cond": fps,
        "_diffusers_version": "0.42.1"
    }))
}

/// transformers `CLIPTextConfig` for the penultimate-layer text encoder.
pub fn text_config(
    shapes: &HashMap<&str, &[usize]>,
    blocks: usize,
    opts: &ConvertOptions,
) -> Result<Value> {
    let p = |k: &str| format!("{TEXT_PREFIX}{k}");
    let tok = p("token_embedding.weight");
    let tok_s = shape_of(shapes, &tok, "vocab_size / hidden_size")?;
    let (vocab, hidden) = (dim(tok_s, 0, &tok)?, dim(tok_s, 1, &tok)?);
    let pos = p("positional_embedding");
    let max_pos = dim(shape_of(shapes, &pos, "max_position_embeddings")?, 0, &pos)?;
    let fc = p("transformer.resblocks.0.mlp.c_fc.weight");
    let inter = dim(shape_of(shapes, &fc, "intermediate_size")?, 0, &fc)?;
    check_divides(
        "text hidden size",
        hidden,
        opts.text_num_heads,
        "text_num_heads",
    )?;
    Ok(json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": max_pos,
        "model_type": "clip_text_model",
        "num_attention_heads": opts.text_num_heads,
        "num_hidden_layers": blocks - 1,
        "pad_token_id": 1,
        "projection_dim": 512,
        "transformers_version": "5.24.0",
        "vocab_size": vocab
    }))
}

/// diffusers `AutoencoderKL` config.
pub fn vae_config(
    shapes: &HashMap<&str, &[usize]>,
    vae_keys: &[&str],
    up_levels: usize,
    opts: &ConvertOptions,
) -> Result<Value> {
    let p = |k: &str| format!("{VAE_PREFIX}{k}");
    let mut levels: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for k in vae_keys {
        if let Some(r) = k.strip_prefix("encoder.down.") {
            let mut it = r.split('.');
            if let (Some(i), Some("block"), Some(j)) = (it.next(), it.next(), it.next()) {
                if let (Ok(i), Ok(j)) = (i.parse(), j.parse()) {
                    levels.entry(i).or_default().insert(j);
                }
            }
        }
    }
    let lpb = levels.get(&0).map_or(0, |s| s.len());
    if levels.len() != up_levels || lpb == 0 || levels.values().any(|s| s.len() != lpb) {
        return Err(ConvertError(format!(
            "VAE encoder levels {levels:?} do not match {up_levels} decoder levels"
        )));
    }
    let mut block_out = Vec::new();
    for i in 0..up_levels {
        let k = p(&format!("encoder.down.{i}.block.0.conv1.weight"));
        block_out.push(dim(shape_of(shapes, &k, "block_out_channels")?, 0, &k)?);
    }
    for &c in &block_out {
        check_divides("VAE channels", c, opts.norm_num_groups, "norm_num_groups")?;
    }
    let cin = p("encoder.conv_in.weight");
    let cout = p("decoder.conv_out.weight");
    let pq = p("post_quant_conv.weight");
    let n = up_levels;
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": block_out,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "force_upcast": true,
        "in_channels": dim(shape_of(shapes, &cin, "in_channels")?, 1, &cin)?,
        "latent_channels": dim(shape_of(shapes, &pq, "latent_channels")?, 0, &pq)?,
        "latents_mean": null,
        "latents_std": null,
        "layers_per_block": lpb,
        "mid_block_add_attention": true,
        "norm_num_groups": opts.norm_num_groups,
        "out_channels": dim(shape_of(shapes, &cout, "out_channels")?, 0, &cout)?,
        "sample_size": opts.vae_sample_size,
        "scaling_factor": opts.vae_scaling_factor,
        "shift_factor": null,
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "use_post_quant_conv": true,
        "use_quant_conv": true
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A state dict entry for the test pickler: a float tensor (storage index, shape) or raw
    /// pickle ops producing the value.
    type Entry = (String, std::result::Result<(usize, Vec<usize>), Vec<u8>>);

    /// Pickle (protocol 2) of `{"state_dict": OrderedDict([(name, tensor_or_raw), ...])}`, the
    /// layout `torch.save` writes; `Err(raw)` entries splice raw pickle ops as the value.
    fn pickle(entries: &[Entry]) -> Vec<u8> {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.push(b'X');
            out.extend((v.len() as u32).to_le_bytes());
            out.extend(v.as_bytes());
        }
        fn int(out: &mut Vec<u8>, v: usize) {
            out.push(b'J');
            out.extend((v as i32).to_le_bytes());
        }
        let mut p = b"\x80\x02}".to_vec();
        s(&mut p, "state_dict");
        p.extend(b"ccollections\nOrderedDict\n)R(");
        for (name, v) in entries {
            s(&mut p, name);
            match v {
                Ok((storage, shape)) => {
                    let numel: usize = shape.iter().product();
                    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
                    s(&mut p, "storage");
                    p.extend(b"ctorch\nFloatStorage\n");
                    s(&mut p, &storage.to_string());
                    s(&mut p, "cpu");
                    int(&mut p, numel);
                    p.extend(b"tQ");
                    int(&mut p, 0);
                    p.push(b'(');
                    shape.iter().for_each(|&d| int(&mut p, d));
                    p.push(b't');
                    p.push(b'(');
                    let mut st = 1;
                    let mut strides: Vec<usize> = shape
                        .iter()
                        .rev()
                        .map(|&d| {
                            let r = st;
                            st *= d;
                            r
                        })
                        .collect();
                    strides.reverse();
                    strides.iter().for_each(|&d| int(&mut p, d));
                    p.push(b't');
                    p.extend(b"\x89ccollections\nOrderedDict\n)RtR");
                }
                Err(raw) => p.extend(raw),
            }
        }
        p.extend(b"us.");
        p
    }

    fn write_ckpt(path: &Path, pkl: &[u8], storages: &[Vec<u8>]) {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", o).unwrap();
        z.write_all(pkl).unwrap();
        for (i, b) in storages.iter().enumerate() {
            z.start_file(format!("archive/data/{i}"), o).unwrap();
            z.write_all(b).unwrap();
        }
        z.start_file("archive/byteorder", o).unwrap();
        z.write_all(b"little").unwrap();
        z.finish().unwrap();
    }

    fn golden_ckpt() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/convert/model.ckpt")
    }

    /// The golden checkpoint's tensors, re-written with `extra` appended.
    fn golden_plus(dir: &Path, extra: Vec<Entry>) -> PathBuf {
        let ck = Checkpoint::open(&golden_ckpt()).unwrap();
        let mut entries = Vec::new();
        let mut storages = Vec::new();
        for t in &ck.tensors {
            entries.push((t.name.clone(), Ok((storages.len(), t.tensor.shape.clone()))));
            storages.push(ck.bytes(t).unwrap().into_owned());
        }
        for (name, v) in extra {
            if let Ok((_, shape)) = &v {
                let n: usize = shape.iter().product();
                entries.push((name, Ok((storages.len(), shape.clone()))));
                storages.push(vec![0u8; n * 4]);
            } else {
                entries.push((name, v));
            }
        }
        let p = dir.join("model.ckpt");
        write_ckpt(&p, &pickle(&entries), &storages);
        p
    }

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vi-convert-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn tiny() -> ConvertOptions {
        ConvertOptions {
            norm_num_groups: 4,
            attention_head_dim: 8,
            text_num_heads: 2,
            ..Default::default()
        }
    }

    /// A NaN in one weight of the checkpoint: convert refuses with the tensor named (the check
    /// loading applies, `params::check_weight`) and writes nothing.
    #[test]
    fn non_finite_weight_is_refused_before_writing() {
        let d = scratch("nan");
        let ck = Checkpoint::open(&golden_ckpt()).unwrap();
        let mut entries = Vec::new();
        let mut storages = Vec::new();
        let victim = "first_stage_model.decoder.conv_in.bias";
        for t in &ck.tensors {
            entries.push((t.name.clone(), Ok((storages.len(), t.tensor.shape.clone()))));
            let mut b = ck.bytes(t).unwrap().into_owned();
            if t.name == victim {
                b[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            storages.push(b);
        }
        assert!(
            ck.tensors.iter().any(|t| t.name == victim),
            "{victim} not in the checkpoint"
        );
        let p = d.join("model.ckpt");
        write_ckpt(&p, &pickle(&entries), &storages);
        let out = d.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let e = convert_checkpoint(&p, &out, &tiny()).unwrap_err().0;
        assert!(
            e.contains("decoder.conv_in.bias") && e.contains("non-finite value NaN at element 1"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            0,
            "something was written"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rewritten_checkpoint_converts_like_the_original() {
        let d = scratch("same");
        let p = golden_plus(&d, vec![]);
        let r = convert_checkpoint(&p, &d.join("out"), &tiny()).unwrap();
        assert_eq!(
            (r.unet_tensors, r.text_tensors, r.vae_tensors),
            (1484, 36, 248)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unknown_keys_fail_loudly() {
        for (tag, key) in [
            ("top", "some_buffer"),
            (
                "unet",
                "model.diffusion_model.input_blocks.1.0.bogus.weight",
            ),
            ("text", "cond_stage_model.model.attn_mask"),
            ("vae", "first_stage_model.loss.logvar"),
        ] {
            let d = scratch(tag);
            let p = golden_plus(&d, vec![(key.to_string(), Ok((0, vec![2])))]);
            let e = convert_checkpoint(&p, &d.join("out"), &tiny())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains("model.ckpt"), "{e}");
            assert!(!d.join("out").exists(), "wrote output despite the error");
            std::fs::remove_dir_all(&d).unwrap();
        }
    }

    #[test]
    fn foreign_globals_never_run_and_are_rejected_in_the_state_dict() {
        let d = scratch("global");
        let raw = b"cos\nsystem\nX\x04\x00\x00\x00echo\x85R".to_vec();
        let p = golden_plus(&d, vec![("betas_evil".to_string(), Err(raw))]);
        let e = convert_checkpoint(&p, &d.join("out"), &tiny())
            .unwrap_err()
            .to_string();
        assert!(e.contains("os.system") && e.contains("betas_evil"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn out_of_range_tensor_view_is_rejected() {
        let d = scratch("range");
        // A 4-element tensor whose storage record holds only 8 bytes (2 elements).
        let pkl = pickle(&[("betas".into(), Ok((0, vec![4])))]);
        let p = d.join("model.ckpt");
        write_ckpt(&p, &pkl, &[vec![0u8; 8]]);
        let ck = Checkpoint::open(&p).unwrap();
        let e = ck.bytes(&ck.tensors[0]).unwrap_err();
        assert!(e.contains("betas") && e.contains("8 bytes"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

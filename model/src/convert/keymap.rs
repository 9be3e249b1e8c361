//! Key mappings from the original VideoCrafter2 checkpoint to diffusers / transformers names.
//! Each function takes a key without its group prefix and returns the target name and the
//! transform to apply, or an error for a key it does not know (the converter fails loudly).

/// What to do with a source tensor besides renaming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Copy,
    /// Drop trailing size-1 dimensions down to rank 2 (Conv1d/Conv2d 1x1 -> Linear).
    ToLinear,
}

fn parse_idx(s: &str) -> Option<usize> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// Layout facts of an lvdm UNet found from its key set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// ResBlocks per down level (up levels have one more).
    pub layers_per_block: usize,
    /// Number of resolution levels.
    pub levels: usize,
    /// `input_blocks` indices that hold a spatial transformer at sub-index 1.
    pub attn_input_blocks: Vec<usize>,
    /// `output_blocks` indices that hold a spatial transformer at sub-index 1.
    pub attn_output_blocks: Vec<usize>,
}

impl UnetLayout {
    /// From the lvdm keys (without `model.diffusion_model.`).
    pub fn from_keys<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Result<Self, String> {
        let block_idx = |prefix: &str, k: &'a str| -> Option<(usize, &'a str)> {
            let rest = k.strip_prefix(prefix)?;
            let (n, tail) = rest.split_once('.')?;
            Some((parse_idx(n)?, tail))
        };
        // First downsampler (`input_blocks.N.0.op`) sits at N = layers_per_block + 1.
        let first_down = keys
            .clone()
            .filter_map(|k| block_idx("input_blocks.", k))
            .filter(|(_, t)| t.starts_with("0.op."))
            .map(|(n, _)| n)
            .min()
            .ok_or("no downsampler (`input_blocks.N.0.op`) found")?;
        let lpb = first_down - 1;
        if lpb == 0 {
            return Err("layers_per_block would be 0".into());
        }
        let n_in = keys
            .clone()
            .filter_map(|k| block_idx("input_blocks.", k))
            .map(|(n, _)| n + 1)
            .max()
            .unwrap_or(0);
        let n_out = keys
            .clone()
            .filter_map(|k| block_idx("output_blocks.", k))
            .map(|(n, _)| n + 1)
            .max()
            .unwrap_or(0);
        // Input: conv_in + lpb ResBlocks per level + a downsampler between levels;
        // output: lpb + 1 ResBlocks per level.
        if n_in % (lpb + 1) != 0 || n_out != n_in {
            return Err(format!(
                "{n_in} input blocks and {n_out} output blocks do not fit layers_per_block {lpb}"
            ));
        }
        let levels = n_in / (lpb + 1);
        let has_attn = |prefix: &str| {
            let mut v: Vec<usize> = keys
                .clone()
                .filter_map(|k| block_idx(prefix, k))
                .filter(|(_, t)| t.starts_with("1.transformer_blocks."))
                .map(|(n, _)| n)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        Ok(UnetLayout {
            layers_per_block: lpb,
            levels,
            attn_input_blocks: has_attn("input_blocks."),
            attn_output_blocks: has_attn("output_blocks."),
        })
    }

    /// Whether down level `l` has attention (its first ResBlock's input block has one).
    pub fn down_level_has_attn(&self, l: usize) -> bool {
        self.attn_input_blocks
            .contains(&(1 + l * (self.layers_per_block + 1)))
    }

    /// Whether up block `i` (execution order) has attention.
    pub fn up_block_has_attn(&self, i: usize) -> bool {
        self.attn_output_blocks
            .contains(&(i * (self.layers_per_block + 1)))
    }
}

/// lvdm ResBlock sub-key -> diffusers resnet/temp_conv sub-key, given the resnet and temp-conv
/// prefixes.
fn resblock(rest: &str, resnet: &str, temp: &str) -> Option<String> {
    let (head, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let name = match head {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "emb_layers.1" => "time_emb_proj",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "skip_connection" => "conv_shortcut",
        _ => {
            // temopral_conv.convK.S (sic)
            let t = head.strip_prefix("temopral_conv.")?;
            let (conv, sub) = t.split_once('.')?;
            let k = conv.strip_prefix("conv").and_then(parse_idx)?;
            let s = parse_idx(sub)?;
            // conv1: GroupNorm .0, Conv3d .2; conv2..4: GroupNorm .0, (SiLU, Dropout), Conv3d .3
            if !matches!((k, s), (1, 0 | 2) | (2..=4, 0 | 3)) {
                return None;
            }
            return Some(format!("{temp}.{head_t}.{param}", head_t = t));
        }
    };
    Some(format!("{resnet}.{name}.{param}"))
}

/// Keys inside a spatial/temporal transformer keep their names and shapes.
fn transformer_inner(rest: &str) -> bool {
    const TOP: [&str; 6] = [
        "norm.weight",
        "norm.bias",
        "proj_in.weight",
        "proj_in.bias",
        "proj_out.weight",
        "proj_out.bias",
    ];
    if TOP.contains(&rest) {
        return true;
    }
    let Some(t) = rest.strip_prefix("transformer_blocks.") else {
        return false;
    };
    let Some((i, sub)) = t.split_once('.') else {
        return false;
    };
    if parse_idx(i).is_none() {
        return false;
    }
    matches!(
        sub,
        "attn1.to_q.weight"
            | "attn1.to_k.weight"
            | "attn1.to_v.weight"
            | "attn1.to_out.0.weight"
            | "attn1.to_out.0.bias"
            | "attn2.to_q.weight"
            | "attn2.to_k.weight"
            | "attn2.to_v.weight"
            | "attn2.to_out.0.weight"
            | "attn2.to_out.0.bias"
            | "norm1.weight"
            | "norm1.bias"
            | "norm2.weight"
            | "norm2.bias"
            | "norm3.weight"
            | "norm3.bias"
            | "ff.net.0.proj.weight"
            | "ff.net.0.proj.bias"
            | "ff.net.2.weight"
            | "ff.net.2.bias"
    )
}

/// lvdm UNet key (without `model.diffusion_model.`) -> diffusers `UNetVideoCrafter` key.
pub fn unet_key(k: &str, lay: &UnetLayout) -> Result<(String, Op), String> {
    let unknown = || format!("unknown UNet key `model.diffusion_model.{k}`");
    let simple = |a: &str, b: &str| -> Option<String> {
        let p = k.strip_prefix(a)?;
        matches!(p, "weight" | "bias").then(|| format!("{b}.{p}"))
    };
    for (a, b) in [
        ("time_embed.0.", "time_embedding.linear_1"),
        ("time_embed.2.", "time_embedding.linear_2"),
        ("fps_embedding.0.", "fps_embedding.linear_1"),
        ("fps_embedding.2.", "fps_embedding.linear_2"),
        ("input_blocks.0.0.", "conv_in"),
        ("out.0.", "conv_norm_out"),
        ("out.2.", "conv_out"),
    ] {
        if let Some(t) = simple(a, b) {
            return Ok((t, Op::Copy));
        }
    }
    if let Some(rest) = k.strip_prefix("init_attn.0.") {
        if !transformer_inner(rest) {
            return Err(unknown());
        }
        let op = if matches!(rest, "proj_in.weight" | "proj_out.weight") {
            Op::ToLinear
        } else {
            Op::Copy
        };
        return Ok((format!("transformer_in.{rest}"), op));
    }
    let lpb = lay.layers_per_block;
    let split3 = |p: &str| -> Option<(usize, usize, String)> {
        let rest = k.strip_prefix(p)?;
        let (n, rest) = rest.split_once('.')?;
        let (m, rest) = rest.split_once('.')?;
        Some((parse_idx(n)?, parse_idx(m)?, rest.to_string()))
    };
    if let Some((n, m, rest)) = split3("input_blocks.") {
        if n == 0 || n >= lay.levels * (lpb + 1) {
            return Err(unknown());
        }
        let level = (n - 1) / (lpb + 1);
        let r = (n - 1) % (lpb + 1);
        let base = format!("down_blocks.{level}");
        let t = if r < lpb {
            match m {
                0 => resblock(
                    &rest,
                    &format!("{base}.resnets.{r}"),
                    &format!("{base}.temp_convs.{r}"),
                ),
                1 if transformer_inner(&rest) => Some(format!("{base}.attentions.{r}.{rest}")),
                2 if transformer_inner(&rest) => Some(format!("{base}.temp_attentions.{r}.{rest}")),
                _ => None,
            }
        } else {
            match (m, rest.as_str()) {
                (0, "op.weight" | "op.bias") => Some(format!(
                    "{base}.downsamplers.0.conv.{}",
                    &rest["op.".len()..]
                )),
                _ => None,
            }
        };
        return t.map(|t| (t, Op::Copy)).ok_or_else(unknown);
    }
    if let Some(rest) = k.strip_prefix("middle_block.") {
        let (m, rest) = rest.split_once('.').ok_or_else(unknown)?;
        let t = match parse_idx(m) {
            Some(0) => resblock(rest, "mid_block.resnets.0", "mid_block.temp_convs.0"),
            Some(1) if transformer_inner(rest) => Some(format!("mid_block.attentions.0.{rest}")),
            Some(2) if transformer_inner(rest) => {
                Some(format!("mid_block.temp_attentions.0.{rest}"))
            }
            Some(3) => resblock(rest, "mid_block.resnets.1", "mid_block.temp_convs.1"),
            _ => None,
        };
        return t.map(|t| (t, Op::Copy)).ok_or_else(unknown);
    }
    if let Some((n, m, rest)) = split3("output_blocks.") {
        if n >= lay.levels * (lpb + 1) {
            return Err(unknown());
        }
        let i = n / (lpb + 1);
        let j = n % (lpb + 1);
        let base = format!("up_blocks.{i}");
        let attn = lay.up_block_has_attn(i);
        let is_up = |mm: usize| {
            // The upsampler follows the ResBlock (and the transformers where there are some),
            // on the last ResBlock of every level but the last.
            j == lpb && i + 1 < lay.levels && mm == if attn { 3 } else { 1 }
        };
        let t = match m {
            0 => resblock(
                &rest,
                &format!("{base}.resnets.{j}"),
                &format!("{base}.temp_convs.{j}"),
            ),
            mm if is_up(mm) => match rest.as_str() {
                "conv.weight" | "conv.bias" => Some(format!("{base}.upsamplers.0.{rest}")),
                _ => None,
            },
            1 if attn && transformer_inner(&rest) => Some(format!("{base}.attentions.{j}.{rest}")),
            2 if attn && transformer_inner(&rest) => {
                Some(format!("{base}.temp_attentions.{j}.{rest}"))
            }
            _ => None,
        };
        return t.map(|t| (t, Op::Copy)).ok_or_else(unknown);
    }
    Err(unknown())
}

/// Where an open_clip text-tower key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextTarget {
    One(String, Op),
    /// `in_proj_*` [3W, ...] split along rows into q, k, v.
    SplitQkv([String; 3]),
    /// Not part of CLIPTextModel (last block, text_projection, logit_scale).
    Discard,
}

/// open_clip text key (without `cond_stage_model.model.`) -> CLIPTextModel key (no `text_model.`
/// prefix), with `blocks` = number of open_clip resblocks (the last one is discarded).
pub fn text_key(k: &str, blocks: usize) -> Result<TextTarget, String> {
    let unknown = || format!("unknown text encoder key `cond_stage_model.model.{k}`");
    let one = |s: &str| Ok(TextTarget::One(s.to_string(), Op::Copy));
    match k {
        "token_embedding.weight" => return one("embeddings.token_embedding.weight"),
        "positional_embedding" => return one("embeddings.position_embedding.weight"),
        "ln_final.weight" => return one("final_layer_norm.weight"),
        "ln_final.bias" => return one("final_layer_norm.bias"),
        "text_projection" | "logit_scale" => return Ok(TextTarget::Discard),
        _ => {}
    }
    let rest = k
        .strip_prefix("transformer.resblocks.")
        .ok_or_else(unknown)?;
    let (i, sub) = rest.split_once('.').ok_or_else(unknown)?;
    let i = parse_idx(i).ok_or_else(unknown)?;
    if i >= blocks {
        return Err(unknown());
    }
    let p = format!("encoder.layers.{i}");
    let t = match sub {
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            let param = if sub.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            TextTarget::SplitQkv(["q", "k", "v"].map(|x| format!("{p}.self_attn.{x}_proj.{param}")))
        }
        "ln_1.weight" | "ln_1.bias" => {
            TextTarget::One(format!("{p}.layer_norm1.{}", &sub[5..]), Op::Copy)
        }
        "ln_2.weight" | "ln_2.bias" => {
            TextTarget::One(format!("{p}.layer_norm2.{}", &sub[5..]), Op::Copy)
        }
        "attn.out_proj.weight" | "attn.out_proj.bias" => {
            TextTarget::One(format!("{p}.self_attn.{}", &sub[5..]), Op::Copy)
        }
        "mlp.c_fc.weight" | "mlp.c_fc.bias" => {
            TextTarget::One(format!("{p}.mlp.fc1.{}", &sub[9..]), Op::Copy)
        }
        "mlp.c_proj.weight" | "mlp.c_proj.bias" => {
            TextTarget::One(format!("{p}.mlp.fc2.{}", &sub[11..]), Op::Copy)
        }
        _ => return Err(unknown()),
    };
    Ok(if i + 1 == blocks {
        TextTarget::Discard
    } else {
        t
    })
}

/// Number of sub-tensors of one open_clip resblock (every one must be present).
pub const TEXT_BLOCK_KEYS: [&str; 12] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];

fn vae_resnet_sub(x: &str) -> Option<String> {
    let (head, param) = x.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let h = match head {
        "norm1" | "conv1" | "norm2" | "conv2" => head,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{h}.{param}"))
}

/// ldm VAE key (without `first_stage_model.`) -> diffusers AutoencoderKL key; `up_levels` is
/// the number of decoder levels (for the index reversal).
pub fn vae_key(k: &str, up_levels: usize) -> Result<(String, Op), String> {
    let unknown = || format!("unknown VAE key `first_stage_model.{k}`");
    let wb = |s: &str| matches!(s, "weight" | "bias");
    // Same name.
    for p in [
        "quant_conv.",
        "post_quant_conv.",
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
    ] {
        if k.strip_prefix(p).is_some_and(wb) {
            return Ok((k.to_string(), Op::Copy));
        }
    }
    let (part, rest) = k.split_once('.').ok_or_else(unknown)?;
    if part != "encoder" && part != "decoder" {
        return Err(unknown());
    }
    if let Some(p) = rest.strip_prefix("norm_out.").filter(|p| wb(p)) {
        return Ok((format!("{part}.conv_norm_out.{p}"), Op::Copy));
    }
    if let Some(mid) = rest.strip_prefix("mid.") {
        let (blk, x) = mid.split_once('.').ok_or_else(unknown)?;
        let t = match blk {
            "block_1" => vae_resnet_sub(x).map(|s| (format!("mid_block.resnets.0.{s}"), Op::Copy)),
            "block_2" => vae_resnet_sub(x).map(|s| (format!("mid_block.resnets.1.{s}"), Op::Copy)),
            "attn_1" => {
                let (h, param) = x.rsplit_once('.').ok_or_else(unknown)?;
                if !wb(param) {
                    return Err(unknown());
                }
                let name = match h {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return Err(unknown()),
                };
                let op = if h != "norm" && param == "weight" {
                    Op::ToLinear
                } else {
                    Op::Copy
                };
                Some((format!("mid_block.attentions.0.{name}.{param}"), op))
            }
            _ => None,
        };
        return t
            .map(|(s, op)| (format!("{part}.{s}"), op))
            .ok_or_else(unknown);
    }
    let (lvl_kw, blocks_kw, sampler_kw, sampler_target) = if part == "encoder" {
        ("down.", "down_blocks", "downsample.conv.", "downsamplers")
    } else {
        ("up.", "up_blocks", "upsample.conv.", "upsamplers")
    };
    let r = rest.strip_prefix(lvl_kw).ok_or_else(unknown)?;
    let (i, x) = r.split_once('.').ok_or_else(unknown)?;
    let i = parse_idx(i).ok_or_else(unknown)?;
    let level = if part == "encoder" {
        i
    } else {
        if i >= up_levels {
            return Err(unknown());
        }
        up_levels - 1 - i
    };
    if let Some(p) = x.strip_prefix(sampler_kw).filter(|p| wb(p)) {
        return Ok((
            format!("{part}.{blocks_kw}.{level}.{sampler_target}.0.conv.{p}"),
            Op::Copy,
        ));
    }
    let b = x.strip_prefix("block.").ok_or_else(unknown)?;
    let (j, y) = b.split_once('.').ok_or_else(unknown)?;
    let j = parse_idx(j).ok_or_else(unknown)?;
    let s = vae_resnet_sub(y).ok_or_else(unknown)?;
    Ok((
        format!("{part}.{blocks_kw}.{level}.resnets.{j}.{s}"),
        Op::Copy,
    ))
}

//! `convert`: original VideoCrafter2 checkpoint -> diffusers/transformers folders.
//! - key rules against the FULL-SIZE mapping manifests (UNet, text, VAE);
//! - the tiny `tests/golden/convert/model.ckpt` converted and compared with `expected/` tensor by
//!   tensor, bit for bit (f32), and against `expected.to(float16)` (f16); configs equal the expected
//!   ones when the fields the weights do not determine are passed as options.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vi_model::convert::keymap::{self, Op, TextTarget, UnetLayout};
use vi_model::convert::{convert_checkpoint, ConvertOptions, OutDType};
use vi_weights::{WDType, WeightStore};

fn golden() -> PathBuf {
    vi_suite::golden_dir()
}

fn manifest(name: &str) -> Value {
    let p = golden().join("manifests").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// A fresh scratch directory under the system temp dir (removed by `Drop`).
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vi-convert-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn unet_rules_match_full_size_manifest() {
    let m = manifest("lvdm_to_diffusers_unet_mapping.json");
    let map = m["mapping"].as_object().unwrap();
    assert_eq!(map.len(), 1484);
    let keys: Vec<&str> = map
        .keys()
        .map(|k| k.strip_prefix("model.diffusion_model.").unwrap())
        .collect();
    let lay = UnetLayout::from_keys(keys.iter().copied()).unwrap();
    assert_eq!((lay.layers_per_block, lay.levels), (2, 4));
    for (full, k) in map.keys().zip(&keys) {
        let e = &map[full];
        let (target, op) = keymap::unet_key(k, &lay).unwrap();
        assert_eq!(target, e["diffusers_key"].as_str().unwrap(), "{full}");
        assert_eq!(op == Op::ToLinear, !e["transform"].is_null(), "{full}");
    }
    assert!(keymap::unet_key("input_blocks.1.0.in_layers.1.weight", &lay).is_err());
    assert!(keymap::unet_key("output_blocks.11.3.conv.weight", &lay).is_err());
}

#[test]
fn text_rules_match_full_size_manifest() {
    let m = manifest("openclip_to_clip_text_mapping.json");
    let map = m["mapping"].as_object().unwrap();
    assert_eq!(map.len(), 294);
    for (full, e) in map {
        let k = full.strip_prefix("cond_stage_model.model.").unwrap();
        let got = keymap::text_key(k, 24).unwrap();
        match &e["target"] {
            Value::Null => assert_eq!(got, TextTarget::Discard, "{full}"),
            Value::String(s) => assert_eq!(got, TextTarget::One(s.clone(), Op::Copy), "{full}"),
            Value::Array(a) => {
                let want: Vec<String> = a.iter().map(|x| x.as_str().unwrap().into()).collect();
                match got {
                    TextTarget::SplitQkv(t) => assert_eq!(t.to_vec(), want, "{full}"),
                    other => panic!("{full}: {other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(keymap::text_key("attn_mask", 24).is_err());
    assert!(keymap::text_key("transformer.resblocks.24.ln_1.weight", 24).is_err());
}

#[test]
fn vae_rules_match_full_size_manifest() {
    let m = manifest("ldm_vae_to_diffusers_mapping.json");
    let map = m["mapping"].as_object().unwrap();
    assert_eq!(map.len(), 248);
    let reshaped: Vec<&str> = m["needs_reshape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for (full, e) in map {
        let k = full.strip_prefix("first_stage_model.").unwrap();
        let (target, op) = keymap::vae_key(k, 4).unwrap();
        assert_eq!(target, e["target"].as_str().unwrap(), "{full}");
        assert_eq!(
            op == Op::ToLinear,
            reshaped.contains(&full.as_str()),
            "{full}"
        );
    }
    assert!(keymap::vae_key("decoder.up.4.block.0.conv1.weight", 4).is_err());
    assert!(keymap::vae_key("loss.logvar", 4).is_err());
}

/// IEEE binary32 -> binary16, round to nearest even, subnormals kept (independent of `half`).
fn f32_to_f16_rne(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 255 {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    // Round `m >> shift` to nearest, ties to even.
    let round = |m: u32, shift: u32| -> u32 {
        let r = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r + 1
        } else {
            r
        }
    };
    if e <= 0 {
        if e < -10 {
            return sign; // below half the smallest subnormal
        }
        // value = m * 2^(e - 38); binary16 subnormal unit 2^-24
        return sign | round(man | 0x80_0000, (14 - e) as u32) as u16;
    }
    // The carry of a rounded-up mantissa moves into the exponent (up to infinity), as IEEE does.
    sign | round(((e as u32) << 23) | man, 13) as u16
}

#[test]
fn f16_reference_rounding() {
    assert_eq!(f32_to_f16_rne(1.0), 0x3c00);
    assert_eq!(f32_to_f16_rne(-2.0), 0xc000);
    assert_eq!(f32_to_f16_rne(65504.0), 0x7bff);
    assert_eq!(f32_to_f16_rne(65520.0), 0x7c00);
    assert_eq!(f32_to_f16_rne(2f32.powi(-24)), 0x0001);
    assert_eq!(f32_to_f16_rne(2f32.powi(-25)), 0x0000); // tie -> even (0)
    assert_eq!(f32_to_f16_rne(1.5 * 2f32.powi(-24)), 0x0002); // tie -> even (2)
    assert_eq!(f32_to_f16_rne(2f32.powi(-14)), 0x0400);
    assert_eq!(f32_to_f16_rne(1.0 + 2f32.powi(-11)), 0x3c00); // tie -> even
    assert_eq!(f32_to_f16_rne(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
    assert_eq!(f32_to_f16_rne(0.1), 0x2e66);
}

fn tiny_options(dtype: OutDType) -> ConvertOptions {
    ConvertOptions {
        dtype,
        norm_num_groups: 4,
        attention_head_dim: 8,
        text_num_heads: 2,
        ..ConvertOptions::default()
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every tensor of `got` equals `want` after `f` (bytes of the expected f32 values, re-encoded).
fn compare_part(got: &Path, want: &Path, dtype: WDType, strip: &str) -> usize {
    let g = WeightStore::open(got).unwrap();
    let w = WeightStore::open(want).unwrap();
    assert_eq!(g.metadata(0).get("format").map(String::as_str), Some("pt"));
    let gnames: BTreeMap<String, String> = g
        .names()
        .map(|n| {
            (
                n.strip_prefix(strip).unwrap_or(n).to_string(),
                n.to_string(),
            )
        })
        .collect();
    let wnames: Vec<&str> = w.names().collect();
    assert_eq!(
        gnames.keys().map(String::as_str).collect::<Vec<_>>(),
        wnames,
        "{}: tensor names differ",
        got.display()
    );
    for n in wnames {
        let gv = g.view(&gnames[n]).unwrap();
        let wv = w.view(n).unwrap();
        assert_eq!(wv.dtype, WDType::F32);
        assert_eq!(gv.dtype, dtype, "{n}");
        assert_eq!(gv.shape, wv.shape, "{n}");
        let want_bytes: Vec<u8> = match dtype {
            WDType::F32 => wv.data.to_vec(),
            WDType::F16 => w
                .read_f32(n, None)
                .unwrap()
                .iter()
                .flat_map(|&x| f32_to_f16_rne(x).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        };
        assert!(gv.data == want_bytes.as_slice(), "{n}: values differ");
    }
    g.len()
}

fn convert_and_compare(dtype: OutDType) {
    let wdt = match dtype {
        OutDType::F32 => WDType::F32,
        OutDType::F16 => WDType::F16,
    };
    let out = Scratch::new(&format!("{dtype:?}"));
    let ckpt = golden().join("convert").join("model.ckpt");
    let exp = golden().join("convert").join("expected");
    let rep = convert_checkpoint(&ckpt, &out.0, &tiny_options(dtype)).unwrap();
    assert_eq!(
        (rep.unet_tensors, rep.text_tensors, rep.vae_tensors),
        (1484, 36, 248)
    );
    assert_eq!(rep.ignored.len(), 13);
    // Last block (12 tensors) + text_projection + logit_scale.
    assert_eq!(rep.discarded.len(), 14);
    assert!(rep.discarded.iter().all(|k| k.contains("resblocks.2.")
        || k.ends_with("text_projection")
        || k.ends_with("logit_scale")));
    let parts = [
        ("unet", "diffusion_pytorch_model.safetensors", ""),
        ("text_encoder", "model.safetensors", "text_model."),
        ("vae", "diffusion_pytorch_model.safetensors", ""),
    ];
    for (dir, file, strip) in parts {
        let n = compare_part(
            &out.0.join(dir).join(file),
            &exp.join(dir).join(file),
            wdt,
            strip,
        );
        assert!(n > 0);
        let got_cfg = read_json(&out.0.join(dir).join("config.json"));
        let want_cfg = read_json(&exp.join(dir).join("config.json"));
        assert_eq!(got_cfg, want_cfg, "{dir}/config.json");
    }
    assert_eq!(rep.unet_config, read_json(&exp.join("unet/config.json")));
    // Written keys carry the transformers 4 prefix.
    let te = WeightStore::open(out.0.join("text_encoder/model.safetensors")).unwrap();
    assert!(te.names().all(|n| n.starts_with("text_model.")));
}

#[test]
fn tiny_checkpoint_converts_exactly_f32() {
    convert_and_compare(OutDType::F32);
}

#[test]
fn tiny_checkpoint_converts_exactly_f16() {
    convert_and_compare(OutDType::F16);
}

#[test]
fn videocrafter_defaults_reject_tiny_widths_loudly() {
    // VideoCrafter2's 32 groups cannot divide the tiny model's 8 channels: the converter refuses
    // rather than writing an unusable config.
    let out = Scratch::new("defaults");
    let ckpt = golden().join("convert").join("model.ckpt");
    let err = convert_checkpoint(&ckpt, &out.0, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm_num_groups"), "{err}");
    assert!(err.contains("model.ckpt"), "{err}");
}

#[test]
fn not_a_checkpoint_is_an_error_naming_the_file() {
    let out = Scratch::new("bad");
    let bogus = out.0.join("bogus.ckpt");
    std::fs::write(&bogus, b"not a zip").unwrap();
    let err = convert_checkpoint(&bogus, &out.0, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("bogus.ckpt"), "{err}");
}

#[test]
fn bad_tokenizer_folder_fails_before_writing() {
    let out = Scratch::new("badtok");
    let ckpt = golden().join("convert").join("model.ckpt");
    let opts = ConvertOptions {
        tokenizer_dir: Some(out.0.join("missing-tokenizer")),
        ..tiny_options(OutDType::F32)
    };
    let err = convert_checkpoint(&ckpt, &out.0.join("o"), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab.json"), "{err}");
    assert!(!out.0.join("o").exists());
}

/// The converted folder (plus a tokenizer) loads into this runtime's own models: configs parse,
/// every tensor the models need is present with the right shape, parts fit together.
#[test]
fn converted_folder_loads_into_the_runtime() {
    use vi_model::models::Models;
    use vi_runtime::{DType, Device};
    for dtype in [OutDType::F32, OutDType::F16] {
        let out = Scratch::new(&format!("load-{dtype:?}"));
        let ckpt = golden().join("convert").join("model.ckpt");
        let opts = ConvertOptions {
            tokenizer_dir: Some(golden().join("tokenizer")),
            ..tiny_options(dtype)
        };
        let rep = convert_checkpoint(&ckpt, &out.0, &opts).unwrap();
        assert!(rep.to_string().contains("tokenizer/vocab.json"), "{rep}");
        let m = Models::load_dir(&out.0, Device::Cpu, DType::F32).unwrap();
        assert_eq!(m.clip.config.hidden_size, 16);
        assert_eq!(m.vae_scale(), 8);
    }
}

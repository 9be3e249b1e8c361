//! Parameter tables of the FULL-SIZE text encoder (zeroscope / VideoCrafter2 OpenCLIP-H text tower as
//! transformers CLIPTextModel) and the SD AutoencoderKL decoder, built from the manifests' own configs
//! on a `MetaRecorder` (no allocation), compared key by key and shape by shape with the manifests.
//! Plus: the converted tiny folders of `convert/expected/` load with every decoder-side tensor used.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::Value;
use vi_model::clip::{ClipActivation, ClipTextConfig, ClipTextModel};
use vi_model::params::{MetaRecorder, Params, StoreSource};
use vi_model::vae::{VaeConfig, VaeDecoder};
use vi_runtime::{DType, Device};
use vi_weights::WeightStore;

fn manifest(name: &str) -> Value {
    let path = vi_suite::golden_dir().join("manifests").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn manifest_keys(m: &Value) -> BTreeMap<String, Vec<usize>> {
    m["keys"]
        .as_object()
        .expect("manifest `keys` object")
        .iter()
        .map(|(k, v)| {
            let shape = v
                .as_array()
                .expect("shape array")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            (k.clone(), shape)
        })
        .collect()
}

fn n_params(t: &BTreeMap<String, Vec<usize>>) -> u64 {
    t.values().map(|s| s.iter().product::<usize>() as u64).sum()
}

/// Keys of `a` missing from `b` or with another shape there.
fn diff(a: &BTreeMap<String, Vec<usize>>, b: &BTreeMap<String, Vec<usize>>) -> Vec<String> {
    a.iter()
        .filter(|(k, s)| b.get(*k) != Some(*s))
        .map(|(k, s)| format!("{k} {s:?} (other: {:?})", b.get(k)))
        .collect()
}

#[test]
fn text_encoder_matches_full_size_manifest() {
    let m = manifest("zeroscope_text_encoder_clip_h.json");
    let cfg = ClipTextConfig::from_json(&m["config"]).unwrap();
    assert_eq!(cfg.hidden_size, 1024);
    assert_eq!(cfg.num_hidden_layers, 23);
    assert_eq!(cfg.num_attention_heads, 16);
    assert_eq!(cfg.hidden_act, ClipActivation::Gelu);
    let rec = MetaRecorder::new();
    ClipTextModel::load(&cfg, Params::new(&rec)).unwrap();
    let table = rec.table();
    let want = manifest_keys(&m);
    let missing = diff(&want, &table);
    let extra = diff(&table, &want);
    assert!(
        missing.is_empty(),
        "manifest keys not requested: {missing:#?}"
    );
    assert!(
        extra.is_empty(),
        "requested keys not in manifest: {extra:#?}"
    );
    assert_eq!(table.len() as u64, m["num_tensors"].as_u64().unwrap());
    assert_eq!(n_params(&table), m["num_parameters"].as_u64().unwrap());
    println!(
        "text encoder: {} tensors, {} parameters, equal to the manifest",
        table.len(),
        n_params(&table)
    );
}

fn is_encoder_side(key: &str) -> bool {
    key.starts_with("encoder.") || key.starts_with("quant_conv.")
}

#[test]
fn vae_decoder_matches_full_size_manifest() {
    let m = manifest("sd_vae_autoencoderkl.json");
    let cfg = VaeConfig::from_json(&m["config"]).unwrap();
    assert_eq!(cfg.block_out_channels, vec![128, 256, 512, 512]);
    assert_eq!(cfg.norm_num_groups, 32);
    let rec = MetaRecorder::new();
    VaeDecoder::load(&cfg, Params::new(&rec)).unwrap();
    let table = rec.table();
    let all = manifest_keys(&m);
    assert_eq!(all.len() as u64, m["num_tensors"].as_u64().unwrap());
    assert_eq!(n_params(&all), m["num_parameters"].as_u64().unwrap());

    // Everything the decoder requests is in the manifest with the same shape.
    let extra = diff(&table, &all);
    assert!(
        extra.is_empty(),
        "requested keys not in manifest: {extra:#?}"
    );
    // The manifest keys it does not request are exactly the encoder side (encoder.*, quant_conv.*),
    // which a decoder legitimately never uses; all decoder-side keys are requested.
    let unused: BTreeSet<&String> = all.keys().filter(|k| !table.contains_key(*k)).collect();
    let encoder_side: BTreeSet<&String> = all.keys().filter(|k| is_encoder_side(k)).collect();
    assert!(!encoder_side.is_empty());
    assert_eq!(
        unused, encoder_side,
        "unused manifest keys must be exactly the encoder side (encoder.*, quant_conv.*)"
    );
    assert!(table.contains_key("post_quant_conv.weight"));
    println!(
        "VAE: decoder requests {} tensors ({} parameters); {} encoder-side tensors unused",
        table.len(),
        n_params(&table),
        unused.len()
    );
}

#[test]
fn vae_decoder_accepts_old_attention_key_names() {
    let m = manifest("sd_vae_autoencoderkl.json");
    let cfg = VaeConfig::from_json(&m["config"]).unwrap();
    let root = "decoder.mid_block.attentions.0";
    let mut rec = MetaRecorder::new();
    rec.present = Some(HashSet::from([format!("{root}.query.weight")]));
    VaeDecoder::load(&cfg, Params::new(&rec)).unwrap();
    let table = rec.table();
    for (old, new) in [
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("proj_attn", "to_out.0"),
    ] {
        for t in ["weight", "bias"] {
            let want = m["keys"][format!("{root}.{new}.{t}")].clone();
            let got = table
                .get(&format!("{root}.{old}.{t}"))
                .unwrap_or_else(|| panic!("{root}.{old}.{t} not requested"));
            assert_eq!(serde_json::to_value(got).unwrap(), want);
            assert!(!table.contains_key(&format!("{root}.{new}.{t}")));
        }
    }
}

/// `use_post_quant_conv: false` / `mid_block_add_attention: false` drop exactly those keys.
#[test]
fn vae_optional_parts_follow_config() {
    let m = manifest("sd_vae_autoencoderkl.json");
    let mut j = m["config"].clone();
    j["use_post_quant_conv"] = Value::Bool(false);
    j["mid_block_add_attention"] = Value::Bool(false);
    let cfg = VaeConfig::from_json(&j).unwrap();
    let rec = MetaRecorder::new();
    VaeDecoder::load(&cfg, Params::new(&rec)).unwrap();
    let table = rec.table();
    let full: BTreeSet<String> = manifest_keys(&m)
        .into_keys()
        .filter(|k| {
            !is_encoder_side(k)
                && !k.starts_with("post_quant_conv.")
                && !k.starts_with("decoder.mid_block.attentions.")
        })
        .collect();
    assert_eq!(table.keys().cloned().collect::<BTreeSet<_>>(), full);
}

#[test]
fn config_errors_are_clear() {
    let e = ClipTextConfig::from_json(&serde_json::json!({"hidden_size": 32})).unwrap_err();
    assert!(e.to_string().contains("num_hidden_layers"), "{e}");
    let e = ClipTextConfig::from_json(&serde_json::json!({
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 8, "hidden_act": "relu"
    }))
    .unwrap_err();
    assert!(e.to_string().contains("relu"), "{e}");
    let e = VaeConfig::from_json(&serde_json::json!({"block_out_channels": [32]})).unwrap_err();
    assert!(e.to_string().contains("scaling_factor"), "{e}");
}

/// The converted tiny folders (`convert/expected/`): text encoder and VAE load from their own
/// config.json, and every tensor of the file is used except the VAE's encoder side.
#[test]
fn converted_folders_load_completely() {
    let dir = vi_suite::golden_dir().join("convert").join("expected");
    let read_cfg = |p: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(p)).unwrap()).unwrap()
    };

    let store = WeightStore::open(dir.join("text_encoder/model.safetensors")).unwrap();
    let cfg = ClipTextConfig::from_json(&read_cfg("text_encoder/config.json")).unwrap();
    let src = StoreSource::new(&store, "", Device::Cpu, DType::F32).with_alt_prefix("text_model.");
    ClipTextModel::load(&cfg, Params::new(&src)).unwrap();
    let names: BTreeSet<String> = store.names().map(str::to_string).collect();
    assert_eq!(src.used(), names, "every text encoder tensor is used");

    let store = WeightStore::open(dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let cfg = VaeConfig::from_json(&read_cfg("vae/config.json")).unwrap();
    let src = StoreSource::new(&store, "", Device::Cpu, DType::F32);
    VaeDecoder::load(&cfg, Params::new(&src)).unwrap();
    let decoder_side: BTreeSet<String> = store
        .names()
        .filter(|k| !is_encoder_side(k))
        .map(str::to_string)
        .collect();
    assert_eq!(
        src.used(),
        decoder_side,
        "every decoder-side VAE tensor is used"
    );
}

//! The UNet3D's parameter table (built from the config alone, no weights) against the golden
//! manifests: the full-size diffusers VideoCrafter2 UNet (1,484 keys) and the tiny golden model's
//! weights file (1,482 keys), exactly, both ways.

use std::collections::BTreeMap;

use serde_json::Value;
use vi_model::unet::{parameter_table, UNetConfig};
use vi_suite::golden_dir;
use vi_weights::WeightStore;

/// Fails listing every key missing on either side and every shape mismatch.
fn assert_same_table(
    what: &str,
    got: &BTreeMap<String, Vec<usize>>,
    want: &BTreeMap<String, Vec<usize>>,
) {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let wrong: Vec<_> = want
        .iter()
        .filter_map(|(k, s)| {
            got.get(k)
                .filter(|g| *g != s)
                .map(|g| format!("{k}: built {g:?}, expected {s:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "{what}: {} keys missing {missing:?}\n{} unexpected keys {extra:?}\n{} shape mismatches {wrong:?}",
        missing.len(),
        extra.len(),
        wrong.len()
    );
}

fn manifest() -> Value {
    let path = golden_dir().join("manifests/videocrafter2_unet_diffusers.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn manifest_table(m: &Value) -> BTreeMap<String, Vec<usize>> {
    m["keys"]
        .as_object()
        .expect("manifest `keys` is an object")
        .iter()
        .map(|(k, v)| {
            let shape = v
                .as_array()
                .expect("shape list")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            (k.clone(), shape)
        })
        .collect()
}

#[test]
fn full_size_unet_matches_diffusers_manifest() {
    let m = manifest();
    let cfg = UNetConfig::from_json(&m["config"]).unwrap();
    assert_eq!(cfg.block_out_channels, [320, 640, 1280, 1280]);
    assert!(cfg.fps_cond);
    let got = parameter_table(&cfg).unwrap();
    let want = manifest_table(&m);
    assert_eq!(want.len(), m["num_tensors"].as_u64().unwrap() as usize);
    assert_eq!(want.len(), 1484);
    assert_same_table("full-size UNet", &got, &want);
    let params: u64 = got
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(params, m["num_parameters"].as_u64().unwrap());
    assert_eq!(params, 1_413_284_420);
}

#[test]
fn heads_match_diffusers() {
    // `attention_heads_[heads, head_dim]` of the manifest: levels C/ahd x ahd, transformer_in 8 x ahd.
    let m = manifest();
    let cfg = UNetConfig::from_json(&m["config"]).unwrap();
    let heads = &m["attention_heads_[heads, head_dim]"];
    let pair = |name: &str| -> (usize, usize) {
        let v = &heads[name][0];
        (
            v[0].as_u64().unwrap() as usize,
            v[1].as_u64().unwrap() as usize,
        )
    };
    assert_eq!(cfg.transformer_in_heads(), pair("transformer_in"));
    for (i, &c) in cfg.block_out_channels.iter().enumerate().take(3) {
        assert_eq!(
            cfg.level_heads(c),
            pair(&format!("down_blocks.{i}.spatial"))
        );
        assert_eq!(
            cfg.level_heads(c),
            pair(&format!("down_blocks.{i}.temporal"))
        );
        let up = cfg.block_out_channels.len() - 1 - i;
        assert_eq!(cfg.level_heads(c), pair(&format!("up_blocks.{up}.spatial")));
    }
    let c3 = *cfg.block_out_channels.last().unwrap();
    assert_eq!(cfg.level_heads(c3), pair("mid_block.temporal"));
}

#[test]
fn tiny_unet_matches_golden_weights_file() {
    let store =
        WeightStore::open(golden_dir().join("unet_tiny_seed0.weights.safetensors")).unwrap();
    let config: Value = serde_json::from_str(&store.metadata(0)["config"]).unwrap();
    let cfg = UNetConfig::from_json(&config).unwrap();
    let got = parameter_table(&cfg).unwrap();
    let want: BTreeMap<String, Vec<usize>> = store
        .names()
        .map(|n| {
            let key = n
                .strip_prefix("weight/")
                .unwrap_or_else(|| panic!("{n}: no `weight/` prefix"));
            (key.to_string(), store.info(n).unwrap().shape.clone())
        })
        .collect();
    assert_eq!(want.len(), 1482);
    assert_same_table("tiny golden UNet", &got, &want);
}

#[test]
fn tiny_config_with_real_channel_pattern_has_real_key_set() {
    // Golden README: a tiny config with the channel pattern [a, b, c, c] has exactly the real key set.
    let m = manifest();
    let mut config = m["config"].clone();
    config["block_out_channels"] = serde_json::json!([16, 32, 64, 64]);
    config["attention_head_dim"] = serde_json::json!(8);
    config["norm_num_groups"] = serde_json::json!(8);
    config["cross_attention_dim"] = serde_json::json!(24);
    let got = parameter_table(&UNetConfig::from_json(&config).unwrap()).unwrap();
    let want = manifest_table(&m);
    let got_keys: Vec<_> = got.keys().collect();
    let want_keys: Vec<_> = want.keys().collect();
    assert_eq!(got_keys, want_keys);
}

#[test]
fn config_rejects_what_diffusers_rejects() {
    let m = manifest();
    let mut config = m["config"].clone();
    config["num_attention_heads"] = serde_json::json!(8);
    let err = UNetConfig::from_json(&config).unwrap_err().to_string();
    assert!(err.contains("num_attention_heads"), "{err}");

    let mut config = m["config"].clone();
    config["up_block_types"] = serde_json::json!(["UpBlock3D"]);
    assert!(UNetConfig::from_json(&config).is_err());

    let mut config = m["config"].clone();
    config.as_object_mut().unwrap().remove("block_out_channels");
    let err = UNetConfig::from_json(&config).unwrap_err().to_string();
    assert!(err.contains("block_out_channels"), "{err}");
}

//! Golden case 4: tiny transformers CLIPTextModel (`tests/golden/clip_text.safetensors`), 6 prompts
//! -> last_hidden_state [6, 77, 32]. Tolerance (golden README): |out - ref| <= 2e-5 + 1e-4 |ref|
//! and rel L2 <= 1e-5.

use std::collections::BTreeSet;

use vi_model::clip::{ClipTextConfig, ClipTextModel};
use vi_model::params::{Params, StoreSource};
use vi_runtime::testing::assert_close;
use vi_runtime::{DType, Device};
use vi_weights::{write_safetensors, WDType, WeightStore};

#[test]
fn clip_text_last_hidden_state_matches_golden() {
    let path = vi_suite::golden_dir().join("clip_text.safetensors");
    let store = WeightStore::open(&path).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(store.metadata(0).get("config").expect("config metadata")).unwrap();
    let cfg = ClipTextConfig::from_json(&cfg_json).unwrap();
    // The file spells keys as transformers 5 does; `text_model.` is the transformers 4 spelling.
    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32)
        .with_alt_prefix("weight/text_model.");
    let model = ClipTextModel::load(&cfg, Params::new(&src)).unwrap();
    let weights: BTreeSet<String> = store
        .names()
        .filter(|n| n.starts_with("weight/"))
        .map(str::to_string)
        .collect();
    assert_eq!(src.used(), weights, "every weight of the file is used");

    let ids: Vec<u32> = store
        .read_i64("in/input_ids")
        .unwrap()
        .into_iter()
        .map(|i| u32::try_from(i).expect("token id"))
        .collect();
    let n = ids.len() / 77;
    assert_eq!(n, 6);
    let out = model.forward(&ids, n).unwrap();
    assert_eq!(out.shape(), &[n, 77, cfg.hidden_size]);
    let got = out.to_vec_f32().unwrap();
    let want = store
        .read_f32("out/last_hidden_state", Some(&[n, 77, cfg.hidden_size]))
        .unwrap();

    assert_close(
        "clip_text last_hidden_state",
        &got,
        &want,
        &vi_suite::GOLDEN_MODEL,
    );
}

/// The same weights spelled as transformers 4 writes them (`text_model.` prefix, plus the legacy
/// `text_model.embeddings.position_ids` buffer, which must be ignored) give the same output, bit
/// for bit.
#[test]
fn clip_text_loads_transformers4_spelling() {
    let path = vi_suite::golden_dir().join("clip_text.safetensors");
    let store = WeightStore::open(&path).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(store.metadata(0).get("config").expect("config metadata")).unwrap();
    let cfg = ClipTextConfig::from_json(&cfg_json).unwrap();

    let mut tensors: Vec<(String, WDType, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in store.names().filter(|n| n.starts_with("weight/")) {
        let shape = store.info(name).unwrap().shape.clone();
        let bytes = store
            .read_f32(name, None)
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let key = format!("text_model.{}", name.strip_prefix("weight/").unwrap());
        tensors.push((key, WDType::F32, shape, bytes));
    }
    let pos_ids: Vec<u8> = (0..77i64).flat_map(|v| v.to_le_bytes()).collect();
    tensors.push((
        "text_model.embeddings.position_ids".into(),
        WDType::I64,
        vec![1, 77],
        pos_ids,
    ));
    let dir = std::env::temp_dir().join(format!("vi_golden_clip_tf4_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tf4 = dir.join("model.safetensors");
    write_safetensors(&tf4, &tensors, None).unwrap();
    let store4 = WeightStore::open(&tf4).unwrap();

    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32);
    let src4 =
        StoreSource::new(&store4, "", Device::Cpu, DType::F32).with_alt_prefix("text_model.");
    let model = ClipTextModel::load(&cfg, Params::new(&src)).unwrap();
    let model4 = ClipTextModel::load(&cfg, Params::new(&src4)).unwrap();
    let used4 = src4.used();
    let unused: Vec<&str> = store4.names().filter(|n| !used4.contains(*n)).collect();
    assert_eq!(unused, vec!["text_model.embeddings.position_ids"]);

    let ids: Vec<u32> = store
        .read_i64("in/input_ids")
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let a = model.forward(&ids, 6).unwrap().to_vec_f32().unwrap();
    let b = model4.forward(&ids, 6).unwrap().to_vec_f32().unwrap();
    drop(store4);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
}

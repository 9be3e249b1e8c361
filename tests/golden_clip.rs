//! Golden case 4: tiny transformers CLIPTextModel (`tests/golden/clip_text.safetensors`), 6 prompts
//! -> last_hidden_state [6, 77, 32]. Tolerance (golden README): |out - ref| <= 2e-5 + 1e-4 |ref|.

use std::collections::BTreeSet;

use vi_model::clip::{ClipTextConfig, ClipTextModel};
use vi_model::params::{Params, StoreSource};
use vi_runtime::{DType, Device};
use vi_weights::WeightStore;

const ATOL: f32 = 2e-5;
const RTOL: f32 = 1e-4;

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

    let rel = vi_suite::rel_l2(&got, &want);
    let (mut max_abs, mut worst) = (0f32, 0usize);
    let mut bad = 0usize;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let d = (g - w).abs();
        if d > max_abs {
            max_abs = d;
            worst = i;
        }
        if d.is_nan() || d > ATOL + RTOL * w.abs() {
            bad += 1;
        }
    }
    println!(
        "clip_text last_hidden_state: rel L2 {rel:.3e}, max abs err {max_abs:.3e} at {worst} \
         (got {}, ref {}), {bad} of {} outside atol {ATOL} + rtol {RTOL}",
        got[worst],
        want[worst],
        got.len()
    );
    assert_eq!(bad, 0, "elements outside tolerance");
}

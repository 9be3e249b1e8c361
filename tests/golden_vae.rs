//! Golden case 6: tiny diffusers AutoencoderKL (`tests/golden/vae_decoder.safetensors`), latents
//! [3, 4, 8, 12] -> images [3, 3, 64, 96] (NCHW in the file; the model is channels-last).
//! Tolerance (golden README): |out - ref| <= 5e-5 + 1e-4 |ref| and rel L2 <= 1e-5.

use std::collections::BTreeSet;

use vi_model::params::{Params, StoreSource};
use vi_model::vae::{to_unit_range, VaeConfig, VaeDecoder};
use vi_runtime::testing::assert_close;
use vi_runtime::{DType, Device, Tensor};
use vi_weights::WeightStore;

/// [N, C, H, W] data -> [N, H, W, C] data.
fn nchw_to_nhwc(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for ni in 0..n {
        for ci in 0..c {
            for y in 0..h {
                for xi in 0..w {
                    out[((ni * h + y) * w + xi) * c + ci] = x[((ni * c + ci) * h + y) * w + xi];
                }
            }
        }
    }
    out
}

/// Panics naming `name` unless `got` is within the golden VAE tolerance of `want`.
fn check(name: &str, got: &[f32], want: &[f32]) {
    assert_close(name, got, want, &vi_suite::GOLDEN_VAE);
}

struct Case {
    store: WeightStore,
    cfg: VaeConfig,
}

fn case() -> Case {
    let path = vi_suite::golden_dir().join("vae_decoder.safetensors");
    let store = WeightStore::open(&path).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(store.metadata(0).get("config").expect("config metadata")).unwrap();
    let cfg = VaeConfig::from_json(&cfg_json).unwrap();
    Case { store, cfg }
}

#[test]
fn vae_decoder_matches_golden() {
    let Case { store, cfg } = case();
    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32);
    let vae = VaeDecoder::load(&cfg, Params::new(&src)).unwrap();
    // Exactly post_quant_conv.* and decoder.* are used.
    let decoder_side: BTreeSet<String> = store
        .names()
        .filter(|n| n.starts_with("weight/decoder.") || n.starts_with("weight/post_quant_conv."))
        .map(str::to_string)
        .collect();
    assert_eq!(src.used(), decoder_side);

    let shape = [3, 4, 8, 12];
    let lat = nchw_to_nhwc(&store.read_f32("in/latents", Some(&shape)).unwrap(), shape);
    let latents = Tensor::from_vec(lat, &[3, 8, 12, 4]).unwrap();

    // The 1/scaling_factor multiply is the pipeline's float32 expression, bit for bit.
    let scaled_ref = nchw_to_nhwc(
        &store.read_f32("in/latents_scaled", Some(&shape)).unwrap(),
        shape,
    );
    let scaled = vae.unscale_latents(&latents).unwrap().to_vec_f32().unwrap();
    let differ = scaled
        .iter()
        .zip(&scaled_ref)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differ, 0, "unscaled latents differ from in/latents_scaled");

    let out_shape = [3, 3, 64, 96];
    let sample = vae.decode(&latents).unwrap();
    assert_eq!(sample.shape(), &[3, 64, 96, 3]);
    let want = nchw_to_nhwc(
        &store.read_f32("out/sample", Some(&out_shape)).unwrap(),
        out_shape,
    );
    check("vae out/sample", &sample.to_vec_f32().unwrap(), &want);

    let frames = to_unit_range(&sample).unwrap().to_vec_f32().unwrap();
    let want01 = nchw_to_nhwc(
        &store.read_f32("out/frames_01", Some(&out_shape)).unwrap(),
        out_shape,
    );
    check("vae out/frames_01", &frames, &want01);
    assert!(frames.iter().all(|v| (0.0..=1.0).contains(v)));
}

/// Frame-by-frame decoding (chunks of 2 over 3 frames) gives the golden images too, and the
/// streaming variant reports each chunk with its first frame index.
#[test]
fn vae_decode_frames_in_chunks_matches_golden() {
    let Case { store, cfg } = case();
    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32);
    let vae = VaeDecoder::load(&cfg, Params::new(&src)).unwrap();
    let shape = [3, 4, 8, 12];
    let lat = nchw_to_nhwc(&store.read_f32("in/latents", Some(&shape)).unwrap(), shape);
    let latents = Tensor::from_vec(lat, &[3, 8, 12, 4]).unwrap();
    let out_shape = [3, 3, 64, 96];
    let want = nchw_to_nhwc(
        &store.read_f32("out/sample", Some(&out_shape)).unwrap(),
        out_shape,
    );

    let all = vae.decode_frames(&latents, 2).unwrap();
    assert_eq!(all.shape(), &[3, 64, 96, 3]);
    check(
        "vae decode_frames(chunk 2)",
        &all.to_vec_f32().unwrap(),
        &want,
    );

    let mut starts = Vec::new();
    vae.decode_frames_with(&latents, 2, |start, t| {
        starts.push((start, t.dim(0)));
        Ok(())
    })
    .unwrap();
    assert_eq!(starts, vec![(0, 2), (2, 1)]);
}

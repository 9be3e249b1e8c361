//! The clip-parallel exchange tally that `bench --comm-delay` breaks down by site: every exchange
//! of a UNet pass is counted under its kind (conv halo, attention halo, global tokens, norm
//! statistics) and latent level, alike in both schedules (docs/design.md section 5.5: 22 conv
//! halos, 34 attention halos and 34 global-token all-gathers per pass and rank; exact-seam mode:
//! 4 one-frame halos and 4 statistics all-gathers per conv layer, plus 17 for the temporal
//! transformers' GroupNorm). The tally is process-wide: this binary holds this one test only.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use vi_model::clip_parallel::{exchange_tally, ClipParallelContext, ExchangeSite, ViConfig};
use vi_model::distributed::{run_ranks, split_frames};
use vi_model::params::{Params, StoreSource};
use vi_model::unet::{UNet3D, UNetConfig};
use vi_runtime::{ops, DType, Device, Tensor};
use vi_suite::golden_dir;
use vi_weights::WeightStore;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_vec(v, shape).unwrap()
}

#[test]
fn every_exchange_of_a_pass_is_tallied_under_its_site_and_level() {
    let store =
        WeightStore::open(golden_dir().join("unet_tiny_seed0.weights.safetensors")).unwrap();
    let meta = WeightStore::open(golden_dir().join("unet_vi_w2_nodyn.safetensors")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&meta.metadata(0)["config"]).unwrap();
    let cfg = UNetConfig::from_json(&config).unwrap();
    let src = StoreSource::new(&store, "weight/", Device::Cpu, DType::F32);
    let unet = UNet3D::load(&cfg, Params::new(&src)).unwrap();
    let ehs = randn(&[2, 77, cfg.cross_attention_dim], 32);
    // CFG batch 2, 12 frames of an 8x8 latent over 2 ranks: rows (batch x positions) of the
    // tiny UNet's four levels 8x8, 4x4, 2x2, 1x1.
    let (t_total, world) = (12, 2);
    let x = randn(&[2, t_total, 8, 8, 4], 31);
    let clips = split_frames(t_total, world).unwrap();
    let levels = [128, 32, 8, 2];
    for exact_seam in [false, true] {
        let mut per_schedule = Vec::new();
        for overlap in [false, true] {
            let vi = ViConfig {
                exact_seam,
                overlap,
                attn_pad: 2,
                top_k: 4,
                ..ViConfig::default()
            };
            let before = exchange_tally();
            run_ranks(world, Duration::from_secs(60), |r, comm| {
                let xr = ops::narrow(&x, 1, clips[r].start, clips[r].len())?;
                let ctx = ClipParallelContext::new(comm, &vi, 900);
                unet.forward(&xr, 900.0, 24.0, &ehs, &ctx)
            })
            .unwrap();
            let t = exchange_tally().since(&before);
            let what = format!("exact_seam={exact_seam} overlap={overlap}");
            let calls: BTreeMap<ExchangeSite, u64> = t
                .per_site()
                .into_iter()
                .map(|(s, st)| (s, st.calls))
                .collect();
            let w = world as u64;
            let want: BTreeMap<ExchangeSite, u64> = if exact_seam {
                [
                    (ExchangeSite::ConvHalo, 88 * w),
                    (ExchangeSite::AttnHalo, 34 * w),
                    (ExchangeSite::GlobalTokens, 34 * w),
                    (ExchangeSite::NormStats, (88 + 17) * w),
                ]
                .into()
            } else {
                [
                    (ExchangeSite::ConvHalo, 22 * w),
                    (ExchangeSite::AttnHalo, 34 * w),
                    (ExchangeSite::GlobalTokens, 34 * w),
                ]
                .into()
            };
            assert_eq!(calls, want, "{what}: exchanges per site");
            assert_eq!(t.total().calls, want.values().sum::<u64>(), "{what}");
            for (&(site, rows), st) in &t.by_site {
                // Only the temporal transformers' statistics have no known level.
                let known = levels.contains(&rows);
                let unknown_ok = site == ExchangeSite::NormStats && rows == 0;
                assert!(
                    known || unknown_ok,
                    "{what}: {site:?} tallied at rows {rows}"
                );
                assert!(st.calls > 0, "{what}: {site:?} rows {rows} without calls");
            }
            // Every level has its attention exchanges.
            for rows in levels {
                assert!(
                    t.by_site.contains_key(&(ExchangeSite::GlobalTokens, rows)),
                    "{what}: no global tokens at rows {rows}"
                );
            }
            let keys: BTreeMap<(ExchangeSite, usize), u64> =
                t.by_site.iter().map(|(k, s)| (*k, s.calls)).collect();
            per_schedule.push(keys);
        }
        assert_eq!(
            per_schedule[0], per_schedule[1],
            "exact_seam={exact_seam}: the schedules make the same exchanges"
        );
    }
}

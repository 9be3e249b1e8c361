//! The tiny golden UNet with reduced-precision storage (bf16 or f16 activations and weights, fp32
//! accumulation inside every op) against the diffusers / Video-Infinity golden outputs, which were
//! computed in f32. Shared by `gpu_golden` (CUDA backend) and `golden_reduced_precision` (the CPU
//! backend's rounded-storage path, the same numeric contract without a GPU).
//!
//! * `unet_plain.safetensors`: whole video in one clip ([`LocalContext`]).
//! * `unet_vi_*`: the clip-parallel context on W in-process ranks (threads; on a GPU they share it).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use vi_model::clip_parallel::{ClipParallelContext, ViConfig};
use vi_model::distributed::run_ranks;
use vi_model::params::{Params, StoreSource};
use vi_model::temporal::LocalContext;
use vi_model::unet::{channels_last_to_ncfhw, ncfhw_to_channels_last, UNet3D, UNetConfig};
use vi_runtime::testing::{check_close_tensors, Tolerance};
use vi_runtime::{DType, Device, Tensor};
use vi_suite::{golden_dir, reduced_max_rel_l2, rel_l2};
use vi_weights::WeightStore;

const TIMEOUT: Duration = Duration::from_secs(600);

fn load_cpu(store: &WeightStore, name: &str) -> Tensor {
    let info = store.info(name).unwrap_or_else(|| panic!("{name} missing"));
    let shape = info.shape.clone();
    Tensor::from_vec(store.read_f32(name, None).unwrap(), &shape).unwrap()
}

/// A golden input on `dev` as `dt`; 5-D samples converted to channels-last on the host.
fn load_on(store: &WeightStore, name: &str, dev: Device, dt: DType) -> Tensor {
    let mut t = load_cpu(store, name);
    if t.rank() == 5 {
        t = ncfhw_to_channels_last(&t).unwrap();
    }
    t.to_device(dev).unwrap().to_dtype(dt).unwrap()
}

/// (None when `got` (channels-last, on `dev`, stored as `dt`) is within the bar of `dt`
/// ([`reduced_max_rel_l2`]: bf16 2e-2, f16 5e-3) of `want` and all finite, else why not; the rel L2).
fn check(what: &str, dev: Device, dt: DType, got: &Tensor, want: &Tensor) -> (Option<String>, f64) {
    assert_eq!(got.device(), dev, "{what}: output device");
    let got = channels_last_to_ncfhw(
        &got.to_device(Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )
    .unwrap();
    let tol = Tolerance::rel_l2(reduced_max_rel_l2(dt));
    match check_close_tensors(&format!("{what} (vs the f32 golden)"), &got, want, &tol) {
        Ok(c) => (None, c.rel_l2),
        Err(why) => {
            let rel = if got.shape() == want.shape() {
                rel_l2(&got.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap())
            } else {
                f64::NAN
            };
            (Some(why), rel)
        }
    }
}

struct Case {
    store: WeightStore,
    weights: WeightStore,
    cfg: UNetConfig,
    meta_case: Option<Value>,
}

fn open_case(dir: &Path, file: &str) -> Case {
    let store = WeightStore::open(dir.join(file)).unwrap();
    let meta = store.metadata(0);
    assert_eq!(meta["kind"], "unet3d");
    let config: Value = serde_json::from_str(&meta["config"]).unwrap();
    let cfg = UNetConfig::from_json(&config).unwrap();
    let meta_case = meta.get("case").map(|c| serde_json::from_str(c).unwrap());
    let weights = WeightStore::open(dir.join(&meta["weights_file"])).unwrap();
    Case {
        store,
        weights,
        cfg,
        meta_case,
    }
}

/// `unet_plain` on `dev` with `dt` storage; panics with the failure when over the bound.
pub fn run_plain(dev: Device, dt: DType) {
    let (f, _) = plain(dev, dt, None);
    assert!(f.is_none(), "{f:?}");
}

/// rel L2 of `unet_plain` on `dev` with `dt` storage and the residual stream in `stream` (None: the
/// model's default, f32), and whether it stayed within the bar of `dt`.
#[allow(dead_code)] // used by the CPU test only
pub fn plain_rel_l2(dev: Device, dt: DType, stream: Option<DType>) -> (bool, f64) {
    let (f, rel) = plain(dev, dt, stream);
    (f.is_none(), rel)
}

fn plain(dev: Device, dt: DType, stream: Option<DType>) -> (Option<String>, f64) {
    let c = open_case(&golden_dir(), "unet_plain.safetensors");
    let src = StoreSource::new(&c.weights, "weight/", dev, dt);
    let mut unet = UNet3D::load(&c.cfg, Params::new(&src)).unwrap();
    if let Some(s) = stream {
        unet.set_residual_dtype(s);
    }
    let s = &c.store;
    let sample = load_on(s, "in/sample", dev, dt);
    let ehs = load_on(s, "in/encoder_hidden_states", dev, dt);
    let t = s.read_i64("in/timestep").unwrap()[0] as f32;
    let fps = s.read_i64("in/fps").unwrap()[0] as f32;
    let out = unet.forward(&sample, t, fps, &ehs, &LocalContext).unwrap();
    check(
        &format!("unet_plain {dev:?} {dt:?} (stream {stream:?}) out/sample"),
        dev,
        dt,
        &out,
        &load_cpu(s, "out/sample"),
    )
}

/// A `unet_vi_*` case on its W ranks (threads sharing `dev`); every rank's output is checked.
pub fn run_vi(file: &str, dev: Device, dt: DType) {
    let c = open_case(&golden_dir(), file);
    let case = c.meta_case.as_ref().expect("case metadata");
    let vi_cfg = ViConfig::from_plugin_configs(&case["plugin_configs"]).unwrap();
    let world = case["world_size"].as_u64().unwrap() as usize;
    let timestep = c.store.read_i64("in/timestep").unwrap()[0];
    let fps = c.store.read_i64("in/fps").unwrap()[0];
    let src = StoreSource::new(&c.weights, "weight/", dev, dt);
    let unet = UNet3D::load(&c.cfg, Params::new(&src)).unwrap();
    let outs = run_ranks(world, TIMEOUT, |r, comm| {
        let sample = load_on(&c.store, &format!("in/sample/rank{r}"), dev, dt);
        let ehs = load_on(
            &c.store,
            &format!("in/encoder_hidden_states/rank{r}"),
            dev,
            dt,
        );
        let ctx = ClipParallelContext::new(comm, &vi_cfg, timestep);
        unet.forward(&sample, timestep as f32, fps as f32, &ehs, &ctx)
    })
    .unwrap_or_else(|e| panic!("{file}: {e}"));
    let failures: Vec<String> = outs
        .iter()
        .enumerate()
        .filter_map(|(r, out)| {
            let want = load_cpu(&c.store, &format!("out/sample/rank{r}"));
            check(
                &format!("{file} {dev:?} {dt:?} rank {r}"),
                dev,
                dt,
                out,
                &want,
            )
            .0
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

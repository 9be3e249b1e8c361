//! Video-Infinity against the reference plugins (golden `unet_vi_*.safetensors`, kind unet3d): the
//! tiny VideoCrafter2 UNet with the clip-parallel context on W in-process ranks (threads), each
//! rank fed its own clip and prompt; every rank's output within atol 2e-5 + rtol 1e-4 and rel L2
//! 1e-5 of the reference (golden README "Cases 2, 3 and extra", "Tolerances"). Each case runs in
//! the overlapped exchange schedule (the default); the synchronous schedule, and the overlapped
//! one over TCP ranks, must give its outputs bit for bit.
//!
//! Unit tests of the two plugins against the `dbg/*` tensors of the FULL golden files (stripped
//! from the copies in `tests/golden/`): ConvLayerPlugin (`down_blocks.0.temp_convs.0`) and
//! AttentionPlugin (`down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1`). They are
//! ignored by default; run them with
//! `VI_GOLDEN_DBG=/path/to/full/golden cargo test --test golden_unet_vi -- --ignored`.
//! CI relies on the end-to-end cases in `tests/golden/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vi_model::clip_parallel::{ClipParallelContext, ViConfig};
use vi_model::distributed::run_ranks;
use vi_model::params::{Params, StoreSource};
use vi_model::temporal::{LocalContext, TemporalContext, TemporalConvLayer};
use vi_model::unet::{channels_last_to_ncfhw, ncfhw_to_channels_last, UNet3D, UNetConfig};
use vi_runtime::comm::{Communicator, MemoryStore, TcpComm, TcpConfig};
use vi_runtime::testing::check_close_tensors;
use vi_runtime::{ops, DType, Device, Tensor};
use vi_suite::{dbg_golden_file, golden_dir, rel_l2, GOLDEN_MODEL};
use vi_weights::WeightStore;

const TIMEOUT: Duration = Duration::from_secs(120);

fn load(store: &WeightStore, name: &str) -> Tensor {
    let info = store.info(name).unwrap_or_else(|| panic!("{name} missing"));
    let shape = info.shape.clone();
    Tensor::from_vec(store.read_f32(name, None).unwrap(), &shape).unwrap()
}

/// None when `got` is within the golden tolerance of `want`, else why not.
fn compare(what: &str, got: &Tensor, want: &Tensor) -> Option<String> {
    check_close_tensors(what, got, want, &GOLDEN_MODEL).err()
}

struct Case {
    name: String,
    store: WeightStore,
    weights: WeightStore,
    unet_cfg: UNetConfig,
    vi_cfg: ViConfig,
    world: usize,
    timestep: i64,
    fps: i64,
}

fn open_case(path: &Path) -> Case {
    let store = WeightStore::open(path).unwrap();
    let meta = store.metadata(0);
    assert_eq!(meta["kind"], "unet3d", "{}", path.display());
    let config: Value = serde_json::from_str(&meta["config"]).unwrap();
    let case: Value = serde_json::from_str(&meta["case"]).unwrap();
    let unet_cfg = UNetConfig::from_json(&config).unwrap();
    let vi_cfg = ViConfig::from_plugin_configs(&case["plugin_configs"])
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let world = case["world_size"].as_u64().unwrap() as usize;
    let weights = WeightStore::open(path.parent().unwrap().join(&meta["weights_file"])).unwrap();
    let timestep = store.read_i64("in/timestep").unwrap()[0];
    let fps = store.read_i64("in/fps").unwrap()[0];
    assert_eq!(case["timestep"].as_i64(), Some(timestep));
    Case {
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        store,
        weights,
        unet_cfg,
        vi_cfg,
        world,
        timestep,
        fps,
    }
}

fn vi_cases(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("unet_vi_") && n.ends_with(".safetensors")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn plugin_configs_of_the_golden_cases_parse() {
    let cases = vi_cases(&golden_dir());
    assert_eq!(cases.len(), 4, "{cases:?}");
    for p in cases {
        let c = open_case(&p);
        let v = &c.vi_cfg;
        // conv_layer: {} keeps the hard-coded 4; every case sets padding/top_k explicitly.
        assert_eq!(v.conv_pad, 4, "{}", c.name);
        assert!(!v.exact_seam && !v.token_num_scale && v.attn_scale == 1.0);
        match c.name.as_str() {
            "unet_vi_w1_nodyn.safetensors" | "unet_vi_w2_nodyn.safetensors" => {
                assert_eq!((v.attn_pad, v.top_k, v.dynamic_scale), (2, 4, false));
                assert_eq!(v.phase_biases(c.timestep), (0.0, 0.0));
            }
            "unet_vi_w3_t900.safetensors" => {
                assert_eq!((v.attn_pad, v.top_k, v.dynamic_scale), (4, 6, true));
                assert_eq!(v.phase_biases(c.timestep), (0.0, 10.0));
            }
            "unet_vi_w3_t500.safetensors" => {
                assert_eq!((v.attn_pad, v.top_k, v.dynamic_scale), (4, 6, true));
                assert_eq!(v.phase_biases(c.timestep), (10.0, 0.0));
            }
            other => panic!("unexpected case {other}"),
        }
    }
}

/// Every rank's output (NCFHW) of the whole UNet with the plugins under `cfg`, one thread per
/// rank; the ranks exchange in-process, or (`tcp`) through `TcpComm` over 127.0.0.1, the data
/// plane of multi-process runs.
fn unet_outputs(c: &Case, cfg: &ViConfig, tcp: bool) -> Vec<Tensor> {
    let src = StoreSource::new(&c.weights, "weight/", Device::Cpu, DType::F32);
    let unet = UNet3D::load(&c.unet_cfg, Params::new(&src)).unwrap();
    let rank = |r: usize, comm: &dyn Communicator| -> vi_model::params::Result<Tensor> {
        let sample = ncfhw_to_channels_last(&load(&c.store, &format!("in/sample/rank{r}")))?;
        let ehs = load(&c.store, &format!("in/encoder_hidden_states/rank{r}"));
        let ctx = ClipParallelContext::new(comm, cfg, c.timestep);
        let out = unet.forward(&sample, c.timestep as f32, c.fps as f32, &ehs, &ctx)?;
        channels_last_to_ncfhw(&out)
    };
    if !tcp {
        return run_ranks(c.world, TIMEOUT, rank).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    }
    let store = MemoryStore::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..c.world)
            .map(|r| {
                let (store, rank) = (&store, &rank);
                s.spawn(move || {
                    let comm = TcpComm::connect(r, c.world, store, &TcpConfig::loopback(TIMEOUT))
                        .unwrap_or_else(|e| panic!("{} rank {r}: {e}", c.name));
                    rank(r, &comm).unwrap_or_else(|e| panic!("{} rank {r}: {e}", c.name))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The whole UNet with the plugins (the case's configuration: the overlapped schedule), one
/// thread per rank, against the golden outputs; the synchronous schedule in-process and the
/// overlapped one over TCP ranks give the same outputs bit for bit.
fn run_unet_case(path: &Path) -> Vec<String> {
    let c = open_case(path);
    assert!(c.vi_cfg.overlap, "the overlapped schedule is the default");
    let outs = unet_outputs(&c, &c.vi_cfg, false);
    let mut failures = Vec::new();
    for (r, out) in outs.iter().enumerate() {
        let want = load(&c.store, &format!("out/sample/rank{r}"));
        if let Some(f) = compare(&format!("{} rank {r} out/sample", c.name), out, &want) {
            failures.push(f);
        }
    }
    let sync = ViConfig {
        overlap: false,
        ..c.vi_cfg.clone()
    };
    for (what, other) in [
        ("synchronous schedule", unet_outputs(&c, &sync, false)),
        (
            "overlapped schedule over TCP",
            unet_outputs(&c, &c.vi_cfg, true),
        ),
    ] {
        for (r, (a, b)) in outs.iter().zip(&other).enumerate() {
            if a.to_vec_f32().unwrap() != b.to_vec_f32().unwrap() {
                failures.push(format!("{} rank {r}: the {what} differs", c.name));
            }
        }
    }
    failures
}

#[test]
fn unet_vi_w3_t900_matches_reference() {
    let f = run_unet_case(&golden_dir().join("unet_vi_w3_t900.safetensors"));
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn unet_vi_w3_t500_matches_reference() {
    let f = run_unet_case(&golden_dir().join("unet_vi_w3_t500.safetensors"));
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn unet_vi_w2_nodyn_matches_reference() {
    let f = run_unet_case(&golden_dir().join("unet_vi_w2_nodyn.safetensors"));
    assert!(f.is_empty(), "{f:#?}");
}

/// World size 1 (tools/golden/make_unet_vi_case.py): the one rank's neighbours are zero frames and
/// its global tokens are its own frames 0, 2, 4, 6.
#[test]
fn unet_vi_w1_nodyn_matches_reference() {
    let path = golden_dir().join("unet_vi_w1_nodyn.safetensors");
    assert_eq!(open_case(&path).world, 1);
    let f = run_unet_case(&path);
    assert!(f.is_empty(), "{f:#?}");
}

/// The one-rank case really exercises the plugins: the plain UNet on the same clip is far from it.
#[test]
fn unet_vi_w1_nodyn_is_not_the_plain_unet() {
    let c = open_case(&golden_dir().join("unet_vi_w1_nodyn.safetensors"));
    let src = StoreSource::new(&c.weights, "weight/", Device::Cpu, DType::F32);
    let unet = UNet3D::load(&c.unet_cfg, Params::new(&src)).unwrap();
    let sample = ncfhw_to_channels_last(&load(&c.store, "in/sample/rank0")).unwrap();
    let ehs = load(&c.store, "in/encoder_hidden_states/rank0");
    let out = unet
        .forward(
            &sample,
            c.timestep as f32,
            c.fps as f32,
            &ehs,
            &LocalContext,
        )
        .unwrap();
    let got = channels_last_to_ncfhw(&out).unwrap().to_vec_f32().unwrap();
    let want = load(&c.store, "out/sample/rank0").to_vec_f32().unwrap();
    let rel = rel_l2(&got, &want);
    assert!(
        rel > 1e-2,
        "plain UNet vs the plugins' output: rel L2 {rel:.3e}"
    );
}

/// Every `unet_vi_*` file of tests/golden is one of the four cases above (a new file must get
/// its own test).
#[test]
fn every_vi_case_is_covered() {
    let names: Vec<String> = vi_cases(&golden_dir())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "unet_vi_w1_nodyn.safetensors",
            "unet_vi_w2_nodyn.safetensors",
            "unet_vi_w3_t500.safetensors",
            "unet_vi_w3_t900.safetensors"
        ]
    );
}

// ---- plugin unit tests on the dbg tensors of the full golden files ----

/// The full golden files with dbg tensors (panics when they are not there).
fn dbg_dir() -> PathBuf {
    let t900 = dbg_golden_file("unet_vi_w3_t900.safetensors");
    t900.parent().unwrap().to_path_buf()
}

/// [B*F, C, h, w] (row b*F + f) -> [B, F, h*w, C].
fn bf_nchw_to_bfsc(x: &Tensor, b: usize) -> Tensor {
    let (bf, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let y = x.reshape(&[b, bf / b, c, h * w]).unwrap();
    ops::permute(&y, &[0, 1, 3, 2]).unwrap()
}

const CONV: &str = "down_blocks.0.temp_convs.0";
const ATTN: &str = "down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1";

#[test]
#[ignore = "needs the full golden files with dbg/* tensors: set VI_GOLDEN_DBG and run with --ignored"]
fn conv_layer_plugin_matches_dbg() {
    let dir = dbg_dir();
    let mut failures = Vec::new();
    let mut tested = 0;
    for path in vi_cases(&dir) {
        let c = open_case(&path);
        if !c.store.contains(&format!("dbg/{CONV}/in/rank0")) {
            println!("{}: no {CONV} dbg tensors", c.name);
            continue;
        }
        let src = StoreSource::new(&c.weights, "weight/", Device::Cpu, DType::F32);
        let ch = c.unet_cfg.block_out_channels[0];
        let layer = TemporalConvLayer::load(
            Params::new(&src).pp(CONV).p(),
            ch,
            c.unet_cfg.norm_num_groups,
            1e-5,
        )
        .unwrap();
        let batch = 2;
        let outs = run_ranks(c.world, TIMEOUT, |r, comm| {
            let x = bf_nchw_to_bfsc(&load(&c.store, &format!("dbg/{CONV}/in/rank{r}")), batch);
            let ctx = ClipParallelContext::new(comm, &c.vi_cfg, c.timestep);
            ctx.conv_layer(&layer, &x)
        })
        .unwrap();
        for (r, out) in outs.iter().enumerate() {
            let want = bf_nchw_to_bfsc(&load(&c.store, &format!("dbg/{CONV}/out/rank{r}")), batch);
            failures.extend(compare(&format!("{} rank {r} {CONV}", c.name), out, &want));
        }
        tested += 1;
    }
    assert!(tested >= 2, "expected the t900 and nodyn conv dbg tensors");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
#[ignore = "needs the full golden files with dbg/* tensors: set VI_GOLDEN_DBG and run with --ignored"]
fn attention_plugin_matches_dbg() {
    let dir = dbg_dir();
    let mut failures = Vec::new();
    for path in vi_cases(&dir) {
        let c = open_case(&path);
        let ch = c.unet_cfg.block_out_channels[0];
        let head_dim = c.unet_cfg.attention_head_dim;
        let heads = ch / head_dim;
        let w = |n: &str| load(&c.weights, &format!("weight/{ATTN}.{n}"));
        let (wq, wk, wv, wo, bo) = (
            w("to_q.weight"),
            w("to_k.weight"),
            w("to_v.weight"),
            w("to_out.0.weight"),
            w("to_out.0.bias"),
        );
        let outs = run_ranks(c.world, TIMEOUT, |r, comm| {
            let x = load(&c.store, &format!("dbg/{ATTN}/in/rank{r}")); // [b, n, C]
            let (b, n) = (x.dim(0), x.dim(1));
            let split = |t: Tensor| t.reshape(&[b, n, heads, head_dim]);
            let q = split(ops::linear(&x, &wq, None)?)?;
            let k = split(ops::linear(&x, &wk, None)?)?;
            let v = split(ops::linear(&x, &wv, None)?)?;
            let ctx = ClipParallelContext::new(comm, &c.vi_cfg, c.timestep);
            let o = ctx.attention(&q, &k, &v, 1.0 / (head_dim as f32).sqrt())?;
            let o = o.reshape(&[b, n, heads * head_dim])?;
            Ok(ops::linear(&o, &wo, Some(&bo))?)
        })
        .unwrap();
        for (r, out) in outs.iter().enumerate() {
            let want = load(&c.store, &format!("dbg/{ATTN}/out/rank{r}"));
            failures.extend(compare(&format!("{} rank {r} {ATTN}", c.name), out, &want));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

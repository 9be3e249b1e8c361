//! Shared helpers of the integration tests and benches: golden-file paths and the golden bars
//! (the check itself is [`vi_runtime::testing`]).

use std::path::PathBuf;

use vi_runtime::testing::Tolerance;
use vi_runtime::DType;

pub use vi_runtime::testing::rel_l2;

/// `tests/golden/` of this checkout.
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

/// The folder of the full golden files, with the `dbg/*` intermediate tensors that the copies in
/// `tests/golden/` have stripped: `$VI_GOLDEN_DBG`, else `tests/golden/`. The dbg tests are
/// `#[ignore]`d; run them with
/// `VI_GOLDEN_DBG=/path/to/full/golden cargo test --test golden_unet --test golden_unet_vi -- --ignored`.
pub fn dbg_golden_dir() -> PathBuf {
    std::env::var_os("VI_GOLDEN_DBG").map_or_else(golden_dir, PathBuf::from)
}

/// `file` of [`dbg_golden_dir`], which must hold `dbg/*` tensors: panics naming the folder and
/// the variable otherwise (an ignored test that was asked for must not pass on absent data).
pub fn dbg_golden_file(file: &str) -> PathBuf {
    let path = dbg_golden_dir().join(file);
    let has_dbg = vi_weights::WeightStore::open(&path)
        .map(|s| s.names().any(|n| n.starts_with("dbg/")))
        .unwrap_or(false);
    assert!(
        has_dbg,
        "{} has no dbg/* tensors (the copies in tests/golden/ are stripped): set VI_GOLDEN_DBG to \
         the folder of the full golden files",
        path.display()
    );
    path
}

/// Whole-tensor ceiling of an f32 CPU run against a golden output (golden README "Tolerances"):
/// a correct implementation reaches ~1e-6 on every case; one GroupNorm family with a wrong epsilon
/// reaches 1.3e-5.
pub const F32_MAX_REL_L2: f64 = 1e-5;

/// UNet and CLIP outputs, f32 CPU (golden README "Tolerances").
pub const GOLDEN_MODEL: Tolerance =
    Tolerance::elementwise(2e-5, 1e-4).with_max_rel_l2(F32_MAX_REL_L2);
/// VAE decoder outputs, f32 CPU.
pub const GOLDEN_VAE: Tolerance =
    Tolerance::elementwise(5e-5, 1e-4).with_max_rel_l2(F32_MAX_REL_L2);
/// Scheduler trajectories, f32 CPU.
pub const GOLDEN_SCHEDULER: Tolerance =
    Tolerance::elementwise(2e-4, 1e-5).with_max_rel_l2(F32_MAX_REL_L2);

/// bf16 storage (fp32 accumulation) end to end vs the f32 goldens (docs/precision.md).
pub const BF16_MAX_REL_L2: f64 = 2e-2;
/// f16 storage end to end: its own bar, a quarter of bf16's (docs/precision.md "Bars").
pub const F16_MAX_REL_L2: f64 = 5e-3;

/// The end-to-end rel L2 bar of a run storing activations and weights in `dt` (bf16 or f16).
pub fn reduced_max_rel_l2(dt: DType) -> f64 {
    match dt {
        DType::F16 => F16_MAX_REL_L2,
        DType::BF16 => BF16_MAX_REL_L2,
        DType::F32 => panic!("f32 runs are held to the golden tolerances, not a reduced bar"),
    }
}

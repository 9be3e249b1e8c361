//! `verify`: run a golden reference dump (golden README, `tests/golden/`) through this runtime and
//! report the error of every reference output.
//!
//! What runs is read from the file's `kind` metadata:
//! * `unet3d` — [`UNet3D`] (NCFHW in the file, channels-last here). A case whose metadata `case`
//!   has `plugin_configs` ran the Video-Infinity plugins: it runs on `world_size` in-process ranks
//!   (1 included: zero neighbours, own frames as global tokens) with the [`ClipParallelContext`],
//!   each rank on `in/sample/rank<r>`, every rank's `out/sample/rank<r>` checked; a case without
//!   them is the plain UNet on `in/sample` with [`LocalContext`] (see [`UNetCase`]);
//! * `clip_text` — [`ClipTextModel`]: `out/last_hidden_state` (and `out/pooler_output`, the state
//!   at each prompt's first eos id);
//! * `vae_decoder` — [`VaeDecoder`]: `out/sample` and `out/frames_01` ([`to_unit_range`]);
//! * `scheduler` — [`Sampler`]: `in/timesteps` exactly, then every step's `out/prev_sample/step<k>`
//!   along the whole trajectory;
//! * a tokenizer case file (`*.json`, with `--tokenizer DIR`) — [`ClipTokenizer`] ids against
//!   `ids_open_clip` of every case.
//!
//! Weights come from the file itself (`weight/<key>`) or from the `weights_file` its metadata names,
//! in the same folder. The pass criterion of an f32 run on the CPU is elementwise
//! `|out - ref| <= atol + rtol |ref|` AND rel L2 <= 1e-5 per output (golden README "Tolerances"),
//! no NaN; a reduced-precision run (or any run on CUDA) is judged by rel L2 per output alone:
//! <= 2e-2 (bf16, CUDA f32), <= 5e-3 (f16; docs/precision.md "Bars"). Exit codes (see
//! [`exit_code`]): 0 pass, 1 fail, 2 the file cannot be verified.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use vi_model::clip::{ClipTextConfig, ClipTextModel};
use vi_model::clip_parallel::{ClipParallelContext, ViConfig};
use vi_model::distributed::run_ranks;
use vi_model::params::{Params, StoreSource};
use vi_model::sampler::{NoiseSchedule, Sampler, SamplerKind, SamplerState};
use vi_model::temporal::LocalContext;
use vi_model::tokenizer::{ClipTokenizer, CONTEXT_LENGTH};
use vi_model::unet::{channels_last_to_ncfhw, ncfhw_to_channels_last, UNet3D, UNetConfig};
use vi_model::vae::{to_unit_range, VaeConfig, VaeDecoder};
use vi_runtime::{ops, DType, Device, Tensor};
use vi_weights::WeightStore;

use crate::cli::VerifyArgs;
use crate::VerifyFailed;

/// Pass criterion of reduced-precision runs (bf16 storage, or f32 on CUDA): rel L2 per output vs the
/// f32 references.
pub const REDUCED_MAX_REL_L2: f64 = 2e-2;
/// The same for f16 storage: its own bar (docs/precision.md "Bars").
pub const F16_MAX_REL_L2: f64 = 5e-3;
/// Whole-tensor ceiling of an f32 run on the CPU, on top of the elementwise tolerance (golden README
/// "Tolerances": a correct implementation reaches ~1e-6; a wrong GroupNorm epsilon 1.3e-5).
pub const F32_MAX_REL_L2: f64 = 1e-5;
/// How long a rank waits for its peers in a collective before the run fails.
const RANK_TIMEOUT: Duration = Duration::from_secs(600);

/// `verify` could not run: bad file, unknown kind, missing weights or tensor, bad flag. Exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct VerifyError(pub anyhow::Error);

/// Process exit code for an error of [`crate::execute`]: 1 for [`VerifyFailed`] (outputs out of
/// tolerance), 2 for [`VerifyError`] (nothing could be verified), 1 for any other error.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<VerifyError>().is_some() {
        2
    } else {
        1
    }
}

/// Elementwise tolerance `|out - ref| <= atol + rtol |ref|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    /// UNet and CLIP (golden README).
    pub const MODEL: Tolerance = Tolerance {
        atol: 2e-5,
        rtol: 1e-4,
    };
    /// VAE decoder.
    pub const VAE: Tolerance = Tolerance {
        atol: 5e-5,
        rtol: 1e-4,
    };
    /// Scheduler trajectories.
    pub const SCHEDULER: Tolerance = Tolerance {
        atol: 2e-4,
        rtol: 1e-5,
    };
}

/// How an output passes: elementwise (`|out - ref| <= atol + rtol |ref|`, f32 CPU runs) or not
/// (reduced precision: rel L2 alone), and rel L2 <= `max_rel_l2` always; never with a NaN.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Criterion {
    pub elementwise: bool,
    pub max_rel_l2: f64,
}

impl Criterion {
    /// f32 on the CPU: the elementwise tolerance and the whole-tensor ceiling.
    pub const F32: Criterion = Criterion {
        elementwise: true,
        max_rel_l2: F32_MAX_REL_L2,
    };
}

/// The error of one output against its reference.
#[derive(Debug, Clone)]
pub struct OutputCheck {
    pub name: String,
    pub shape: Vec<usize>,
    /// ||out - ref|| / ||ref|| (||out - ref|| when ref is all zeros).
    pub rel_l2: f64,
    pub max_abs: f64,
    /// max over elements of |out - ref| - (atol + rtol |ref|); <= 0 when all are within tolerance.
    pub worst_excess: f64,
    /// Elements over atol + rtol |ref| (NaN counts).
    pub n_over: usize,
    pub n_nonfinite: usize,
    pub passed: bool,
}

/// The result of a verify run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub kind: String,
    pub checks: Vec<OutputCheck>,
    /// Failures that are not one output's numbers (e.g. timesteps or token ids that differ).
    pub other_failures: Vec<String>,
    pub passed: bool,
    /// Worst rel L2 over the checked outputs.
    pub worst_rel_l2: f64,
}

impl Outcome {
    /// The report's last line: `verify: PASS rel_l2=<worst>` or `verify: FAIL <what failed> ...`.
    pub fn summary(&self) -> String {
        if self.passed {
            return format!("verify: PASS rel_l2={:.3e}", self.worst_rel_l2);
        }
        let mut what: Vec<String> = self.other_failures.clone();
        for c in self.checks.iter().filter(|c| !c.passed) {
            what.push(if c.n_nonfinite > 0 {
                format!(
                    "{} ({} non-finite, rel_l2={:.3e})",
                    c.name, c.n_nonfinite, c.rel_l2
                )
            } else if self.kind == "tokenizer" {
                format!("{} ({} ids differ)", c.name, c.n_over)
            } else if c.n_over == 0 {
                format!(
                    "{} (rel_l2={:.3e} over the whole-tensor ceiling)",
                    c.name, c.rel_l2
                )
            } else {
                format!(
                    "{} ({} of {} over tolerance, worst excess {:.3e}, rel_l2={:.3e})",
                    c.name,
                    c.n_over,
                    c.shape.iter().product::<usize>(),
                    c.worst_excess,
                    c.rel_l2
                )
            });
        }
        const SHOWN: usize = 4;
        let more = what.len().saturating_sub(SHOWN);
        what.truncate(SHOWN);
        let mut s = format!("verify: FAIL {}", what.join("; "));
        if more > 0 {
            s.push_str(&format!("; and {more} more"));
        }
        s.push_str(&format!(" (worst rel_l2={:.3e})", self.worst_rel_l2));
        s
    }
}

/// The CLI entry: writes the report to stdout; a failed verification returns [`VerifyFailed`]
/// (its message is the last line, printed by `main`), anything that prevents verifying returns
/// [`VerifyError`].
pub fn run(a: VerifyArgs) -> Result<()> {
    let mut out = std::io::stdout();
    let outcome = verify_to(&a, &mut out).map_err(|e| anyhow::Error::new(VerifyError(e)))?;
    if outcome.passed {
        crate::say!("{}", outcome.summary());
        Ok(())
    } else {
        Err(VerifyFailed(outcome.summary()).into())
    }
}

/// Runs the verification and writes every report line except the last ([`Outcome::summary`]) to
/// `out`. An `Err` means nothing could be verified (exit 2).
pub fn verify_to(a: &VerifyArgs, out: &mut dyn Write) -> Result<Outcome> {
    let path = &a.golden;
    ensure!(
        path.exists(),
        "golden file {} does not exist",
        path.display()
    );
    if let Some(k) = vi_weights::input_file::wrong_kind(path, false) {
        bail!(
            "golden file {} is {k}, expected a regular file",
            path.display()
        );
    }
    let dev = DeviceChoice::parse(&a.device, a.dtype, a.max_rel_l2)?;
    let override_tol = |t: Tolerance| Tolerance {
        atol: a.atol.unwrap_or(t.atol),
        rtol: a.rtol.unwrap_or(t.rtol),
    };
    for (flag, v) in [
        ("--atol", a.atol),
        ("--rtol", a.rtol),
        ("--max-rel-l2", a.max_rel_l2),
    ] {
        if let Some(v) = v {
            ensure!(v.is_finite() && v >= 0.0, "{flag} {v}: must be >= 0");
        }
    }

    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        let dir = a.tokenizer.as_deref().ok_or_else(|| {
            anyhow!(
                "{} is a tokenizer case file: give the tokenizer folder with --tokenizer DIR",
                path.display()
            )
        })?;
        return verify_tokenizer(path, dir, out);
    }
    if let Some(t) = &a.tokenizer {
        bail!(
            "--tokenizer {} only applies to a tokenizer case file (*.json); {} is not one",
            t.display(),
            path.display()
        );
    }

    let store = WeightStore::open(path)
        .with_context(|| format!("{} is not a golden safetensors file", path.display()))?;
    let meta = store.metadata(0).clone();
    let kind = meta
        .get("kind")
        .ok_or_else(|| {
            anyhow!(
                "{} has no `kind` metadata: not a golden reference file",
                path.display()
            )
        })?
        .clone();
    let g = Golden {
        path: path.clone(),
        store,
        meta,
    };
    writeln!(out, "golden: {} (kind {kind})", path.display())?;
    let (checks, other) = match kind.as_str() {
        "unet3d" => {
            let tol = override_tol(Tolerance::MODEL);
            dev.describe(out, tol)?;
            verify_unet(&g, &dev, tol, out)?
        }
        "clip_text" => {
            let tol = override_tol(Tolerance::MODEL);
            dev.describe(out, tol)?;
            verify_clip(&g, &dev, tol, out)?
        }
        "vae_decoder" => {
            let tol = override_tol(Tolerance::VAE);
            dev.describe(out, tol)?;
            verify_vae(&g, &dev, tol, out)?
        }
        "scheduler" => {
            let tol = override_tol(Tolerance::SCHEDULER);
            dev.describe(out, tol)?;
            verify_scheduler(&g, &dev, tol, out)?
        }
        "unet3d_weights" => bail!(
            "{} holds UNet weights only (kind unet3d_weights), no reference outputs: verify one of \
             the unet3d case files that name it in their `weights_file` metadata",
            path.display()
        ),
        other => bail!(
            "{}: unknown golden kind `{other}` (expected unet3d, clip_text, vae_decoder or \
             scheduler; a tokenizer case file is a .json)",
            path.display()
        ),
    };
    Ok(finish(kind, checks, other))
}

fn finish(kind: String, checks: Vec<OutputCheck>, other_failures: Vec<String>) -> Outcome {
    let worst_rel_l2 = checks.iter().map(|c| c.rel_l2).fold(0f64, |a, b| {
        // NaN propagates as the worst.
        if b.is_nan() || a.is_nan() {
            f64::NAN
        } else {
            a.max(b)
        }
    });
    let passed = other_failures.is_empty() && !checks.is_empty() && checks.iter().all(|c| c.passed);
    Outcome {
        kind,
        checks,
        other_failures,
        passed,
        worst_rel_l2,
    }
}

/// The checked outputs and the failures that are not one output's numbers.
type Checked = (Vec<OutputCheck>, Vec<String>);

// ---- device ----

/// Where the model runs, and the storage dtype there.
struct DeviceChoice {
    spec: String,
    device: Device,
    dtype: DType,
    /// `--max-rel-l2`: replaces the run's whole-tensor ceiling.
    max_rel_l2: Option<f64>,
}

impl DeviceChoice {
    fn parse(
        spec: &str,
        dtype: Option<crate::cli::DTypeArg>,
        max_rel_l2: Option<f64>,
    ) -> Result<Self> {
        use crate::cli::DTypeArg;
        let devs =
            crate::devices::parse_devices(spec).with_context(|| format!("--device {spec}"))?;
        ensure!(
            devs.len() == 1,
            "--device {spec}: verify runs on one device (cpu or cuda:N); the ranks of a \
             multi-rank case share it"
        );
        let device = devs[0];
        ensure!(
            device == Device::Cpu || cfg!(feature = "cuda"),
            "--device {spec}: this binary was built without CUDA support (rebuild with \
             `cargo build -p video-infinity --features cuda`), or use --device cpu"
        );
        let dtype = match (dtype, device) {
            (Some(DTypeArg::F32), _) => DType::F32,
            (Some(DTypeArg::Bf16), _) => DType::BF16,
            (Some(DTypeArg::F16), _) => DType::F16,
            (None, Device::Cuda(_)) => DType::BF16,
            (None, _) => DType::F32,
        };
        Ok(DeviceChoice {
            spec: spec.to_string(),
            device,
            dtype,
            max_rel_l2,
        })
    }

    /// The pass criterion of this run: f32 on the CPU elementwise plus the [`F32_MAX_REL_L2`]
    /// ceiling; reduced precision or any run on the GPU by rel L2 alone, [`F16_MAX_REL_L2`] for f16
    /// storage, [`REDUCED_MAX_REL_L2`] otherwise. `--max-rel-l2` replaces the ceiling.
    fn rel_l2_criterion(&self) -> Criterion {
        let reduced = matches!(self.device, Device::Cuda(_)) || self.dtype != DType::F32;
        let bar = match self.dtype {
            _ if !reduced => F32_MAX_REL_L2,
            DType::F16 => F16_MAX_REL_L2,
            _ => REDUCED_MAX_REL_L2,
        };
        Criterion {
            elementwise: !reduced,
            max_rel_l2: self.max_rel_l2.unwrap_or(bar),
        }
    }

    fn describe(&self, out: &mut dyn Write, tol: Tolerance) -> Result<()> {
        let c = self.rel_l2_criterion();
        if !c.elementwise {
            writeln!(
                out,
                "device: {} ({:?} weights and activations); pass criterion: rel L2 <= {:.0e} \
                 per output and no NaN (reduced-precision criterion; atol {:e} + rtol {:e} excess reported only)",
                self.spec, self.dtype, c.max_rel_l2, tol.atol, tol.rtol
            )?;
        } else {
            writeln!(
                out,
                "device: {} (f32); pass criterion: |out - ref| <= atol + rtol*|ref| with atol {:e}, \
                 rtol {:e}, and rel L2 <= {:.0e} per output, no NaN",
                self.spec, tol.atol, tol.rtol, c.max_rel_l2
            )?;
        }
        Ok(())
    }

    /// A host f32 tensor on the device, in its dtype.
    fn put(&self, t: Tensor) -> Result<Tensor> {
        if self.device == Device::Cpu && self.dtype == DType::F32 {
            return Ok(t);
        }
        Ok(t.to_device(self.device)?.to_dtype(self.dtype)?)
    }
}

/// Any tensor back on the host in f32.
fn host(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(Device::Cpu)?.to_dtype(DType::F32)?)
}

// ---- golden file access ----

struct Golden {
    path: PathBuf,
    store: WeightStore,
    meta: HashMap<String, String>,
}

impl Golden {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn json_meta(&self, key: &str) -> Result<Value> {
        let s = self
            .meta
            .get(key)
            .ok_or_else(|| anyhow!("{}: no `{key}` metadata", self.name()))?;
        serde_json::from_str(&python_json(s))
            .with_context(|| format!("{}: `{key}` metadata is not valid JSON", self.name()))
    }

    fn info_shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self
            .store
            .info(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` missing", self.name()))?
            .shape
            .clone())
    }

    /// A float tensor of the file as host f32.
    fn f32(&self, name: &str) -> Result<Tensor> {
        let shape = self.info_shape(name)?;
        let data = self
            .store
            .read_f32(name, None)
            .with_context(|| format!("{}: tensor `{name}`", self.name()))?;
        Ok(Tensor::from_vec(data, &shape)?)
    }

    fn i64s(&self, name: &str) -> Result<Vec<i64>> {
        self.info_shape(name)?;
        self.store
            .read_i64(name)
            .with_context(|| format!("{}: tensor `{name}`", self.name()))
    }

    fn scalar_i64(&self, name: &str) -> Result<i64> {
        let v = self.i64s(name)?;
        ensure!(
            v.len() == 1,
            "{}: tensor `{name}` should hold one value, holds {}",
            self.name(),
            v.len()
        );
        Ok(v[0])
    }

    /// The store holding the model's `weight/<key>` tensors: this file when it has any, else the
    /// `weights_file` its metadata names (resolved beside this file).
    fn weights(&self, out: &mut dyn Write) -> Result<Option<WeightStore>> {
        if self.store.names().any(|n| n.starts_with("weight/")) {
            let n = self
                .store
                .names()
                .filter(|n| n.starts_with("weight/"))
                .count();
            writeln!(out, "weights: {n} tensors in the golden file")?;
            return Ok(None);
        }
        let Some(file) = self.meta.get("weights_file") else {
            bail!(
                "{}: no `weight/*` tensors and no `weights_file` metadata: no weights to build the \
                 model from",
                self.name()
            );
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let wpath = dir.join(file);
        if let Some(k) = vi_weights::input_file::wrong_kind(&wpath, false) {
            bail!(
                "weights file {} (named by the `weights_file` metadata of {}) is {k}, expected a \
                 regular file",
                wpath.display(),
                self.name()
            );
        }
        ensure!(
            wpath.is_file(),
            "weights file {} (named by the `weights_file` metadata of {}) not found",
            wpath.display(),
            self.name()
        );
        let ws = WeightStore::open(&wpath)
            .with_context(|| format!("weights file {}", wpath.display()))?;
        let n = ws.names().filter(|n| n.starts_with("weight/")).count();
        ensure!(
            n > 0,
            "weights file {} holds no `weight/*` tensors",
            wpath.display()
        );
        writeln!(out, "weights: {n} tensors in {}", wpath.display())?;
        Ok(Some(ws))
    }
}

/// Python's `json.dumps` writes the non-JSON tokens `NaN`, `Infinity` and `-Infinity` (e.g.
/// diffusers' `lambda_min_clipped: -inf`); they become the strings `"NaN"`, `"Infinity"`,
/// `"-Infinity"` so that serde_json reads the rest. String literals are left untouched.
fn python_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

// ---- comparison ----

fn compare(
    name: &str,
    got: &Tensor,
    want: &Tensor,
    tol: Tolerance,
    crit: Criterion,
    out: &mut dyn Write,
) -> Result<OutputCheck> {
    let got = host(got)?;
    if got.shape() != want.shape() {
        // A shape mismatch is a failed output, reported with the shapes.
        writeln!(
            out,
            "{name}: shape {:?} but the reference is {:?}  FAIL",
            got.shape(),
            want.shape()
        )?;
        return Ok(OutputCheck {
            name: format!("{name} (shape {:?} vs {:?})", got.shape(), want.shape()),
            shape: want.shape().to_vec(),
            rel_l2: f64::INFINITY,
            max_abs: f64::INFINITY,
            worst_excess: f64::INFINITY,
            n_over: want.elem_count(),
            n_nonfinite: 0,
            passed: false,
        });
    }
    let (g, w) = (got.to_vec_f32()?, want.to_vec_f32()?);
    let c = compare_slices(name, want.shape(), &g, &w, tol, crit);
    writeln!(
        out,
        "{:<34} shape {:<18} rel_l2 {:.3e}  max_abs {:.3e}  worst_excess {:+.3e}  {}",
        c.name,
        format!("{:?}", c.shape),
        c.rel_l2,
        c.max_abs,
        c.worst_excess,
        if c.passed {
            "ok".to_string()
        } else if c.n_nonfinite > 0 {
            format!("FAIL ({} non-finite)", c.n_nonfinite)
        } else if crit.elementwise && c.n_over > 0 {
            format!("FAIL ({} of {} over tolerance)", c.n_over, g.len())
        } else {
            format!("FAIL (rel L2 > {:.0e})", crit.max_rel_l2)
        }
    )?;
    Ok(c)
}

/// The error numbers of `got` against `want` (same length). Every difference is taken in f64.
pub fn compare_slices(
    name: &str,
    shape: &[usize],
    got: &[f32],
    want: &[f32],
    tol: Tolerance,
    crit: Criterion,
) -> OutputCheck {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let (mut num, mut den) = (0f64, 0f64);
    let (mut max_abs, mut worst_excess) = (0f64, f64::NEG_INFINITY);
    let (mut n_over, mut n_nonfinite) = (0usize, 0usize);
    for (&a, &b) in got.iter().zip(want) {
        let (a, b) = (a as f64, b as f64);
        if !a.is_finite() {
            n_nonfinite += 1;
        }
        let d = (a - b).abs();
        num += d * d;
        den += b * b;
        let excess = d - (tol.atol + tol.rtol * b.abs());
        if d.is_nan() {
            n_over += 1;
            max_abs = f64::NAN;
            worst_excess = f64::NAN;
            continue;
        }
        max_abs = max_abs.max(d);
        worst_excess = worst_excess.max(excess);
        if excess > 0.0 {
            n_over += 1;
        }
    }
    let rel_l2 = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    let passed =
        n_nonfinite == 0 && (!crit.elementwise || n_over == 0) && rel_l2 <= crit.max_rel_l2;
    OutputCheck {
        name: name.to_string(),
        shape: shape.to_vec(),
        rel_l2,
        max_abs,
        worst_excess,
        n_over,
        n_nonfinite,
        passed,
    }
}

// ---- kinds ----

fn verify_unet(
    g: &Golden,
    dev: &DeviceChoice,
    tol: Tolerance,
    out: &mut dyn Write,
) -> Result<Checked> {
    let config = g.json_meta("config")?;
    let cfg = UNetConfig::from_json(&config)
        .map_err(|e| anyhow!("{}: `config` metadata: {e}", g.name()))?;
    let case = if g.meta.contains_key("case") {
        g.json_meta("case")?
    } else {
        Value::Null
    };
    let run = UNetCase::from_case(&case).map_err(|e| anyhow!("{}: {e:#}", g.name()))?;
    let own = g.weights(out)?;
    let ws = own.as_ref().unwrap_or(&g.store);
    let timestep = g.scalar_i64("in/timestep")?;
    let fps = g.scalar_i64("in/fps")?;
    let src = StoreSource::new(ws, "weight/", dev.device, dev.dtype);
    let unet = UNet3D::load(&cfg, Params::new(&src))
        .map_err(|e| anyhow!("{}: building the UNet: {e}", g.name()))?;
    let mut checks = Vec::new();
    match run {
        UNetCase::Plain => {
            writeln!(
                out,
                "unet3d: whole video in one clip, t={timestep}, fps={fps}"
            )?;
            let sample = dev.put(ncfhw_to_channels_last(&g.f32("in/sample")?)?)?;
            let ehs = dev.put(g.f32("in/encoder_hidden_states")?)?;
            let want = g.f32("out/sample")?;
            let t0 = Instant::now();
            let y = unet
                .forward(&sample, timestep as f32, fps as f32, &ehs, &LocalContext)
                .map_err(|e| anyhow!("{}: UNet forward: {e}", g.name()))?;
            let y = channels_last_to_ncfhw(&host(&y)?)?;
            writeln!(out, "ran in {:.2} s", t0.elapsed().as_secs_f64())?;
            checks.push(compare(
                "out/sample",
                &y,
                &want,
                tol,
                dev.rel_l2_criterion(),
                out,
            )?);
        }
        UNetCase::ClipParallel { world, vi } => {
            // Every rank's inputs and references must be present before any rank starts.
            let mut wants = Vec::new();
            for r in 0..world {
                g.info_shape(&format!("in/encoder_hidden_states/rank{r}"))?;
                let s = g.info_shape(&format!("in/sample/rank{r}"))?;
                if let Some(n) = case["frames_per_rank"].as_u64() {
                    ensure!(
                        s.len() == 5 && s[2] == n as usize,
                        "{}: in/sample/rank{r} has shape {s:?}, but case.frames_per_rank is {n}",
                        g.name()
                    );
                }
                wants.push(g.f32(&format!("out/sample/rank{r}"))?);
            }
            writeln!(
                out,
                "unet3d: Video-Infinity clip parallelism on {world} in-process ranks, t={timestep}, \
                 fps={fps}, {vi:?}"
            )?;
            let t0 = Instant::now();
            let outs = run_ranks(world, RANK_TIMEOUT, |r, comm| {
                let sample =
                    ncfhw_to_channels_last(&load_model_input(g, &format!("in/sample/rank{r}"))?)?;
                let ehs = load_model_input(g, &format!("in/encoder_hidden_states/rank{r}"))?;
                let (sample, ehs) = (put_model(dev, sample)?, put_model(dev, ehs)?);
                let ctx = ClipParallelContext::new(comm, &vi, timestep);
                let y = unet.forward(&sample, timestep as f32, fps as f32, &ehs, &ctx)?;
                Ok(y.to_device(Device::Cpu)?.to_dtype(DType::F32)?)
            })
            .map_err(|e| anyhow!("{}: {e}", g.name()))?;
            writeln!(out, "ran in {:.2} s", t0.elapsed().as_secs_f64())?;
            for (r, (y, want)) in outs.iter().zip(&wants).enumerate() {
                let y = channels_last_to_ncfhw(y)?;
                checks.push(compare(
                    &format!("out/sample/rank{r}"),
                    &y,
                    want,
                    tol,
                    dev.rel_l2_criterion(),
                    out,
                )?);
            }
        }
    }
    let unused = ws
        .names()
        .filter(|n| n.starts_with("weight/") && !src.used().contains(*n))
        .count();
    if unused > 0 {
        writeln!(
            out,
            "note: {unused} weight tensors of the file were not used by the model"
        )?;
    }
    Ok((checks, Vec::new()))
}

/// What the reference ran for a `unet3d` case, read from its `case` metadata.
#[derive(Debug)]
enum UNetCase {
    /// No `plugin_configs`: the unmodified UNet on the whole clip (`in/sample`, `out/sample`).
    Plain,
    /// `plugin_configs` present: the Video-Infinity plugins on `world` ranks, whatever `world` is
    /// (`in/sample/rank<r>`, `out/sample/rank<r>`). With one rank both neighbours are zero frames
    /// and the global tokens are the rank's own frames.
    ClipParallel { world: usize, vi: ViConfig },
}

impl UNetCase {
    fn from_case(case: &Value) -> Result<UNetCase> {
        let world = match &case["world_size"] {
            Value::Null => 1,
            v => v
                .as_u64()
                .filter(|&w| w >= 1)
                .ok_or_else(|| anyhow!("case.world_size {v} is not a rank count"))?
                as usize,
        };
        match &case["plugin_configs"] {
            Value::Null if world == 1 => Ok(UNetCase::Plain),
            Value::Null => bail!(
                "case.world_size is {world} but the case has no plugin_configs: a multi-rank case \
                 runs the Video-Infinity plugins"
            ),
            p => Ok(UNetCase::ClipParallel {
                world,
                vi: ViConfig::from_plugin_configs(p)
                    .map_err(|e| anyhow!("case.plugin_configs: {e}"))?,
            }),
        }
    }
}

/// Inside a rank thread: errors as the model's error type (shapes were checked before).
fn load_model_input(g: &Golden, name: &str) -> vi_model::params::Result<Tensor> {
    g.f32(name)
        .map_err(|e| vi_model::params::ModelError::Msg(format!("{e:#}")))
}

fn put_model(dev: &DeviceChoice, t: Tensor) -> vi_model::params::Result<Tensor> {
    dev.put(t)
        .map_err(|e| vi_model::params::ModelError::Msg(format!("{e:#}")))
}

fn verify_clip(
    g: &Golden,
    dev: &DeviceChoice,
    tol: Tolerance,
    out: &mut dyn Write,
) -> Result<Checked> {
    let config = g.json_meta("config")?;
    let cfg = ClipTextConfig::from_json(&config)
        .map_err(|e| anyhow!("{}: `config` metadata: {e}", g.name()))?;
    let own = g.weights(out)?;
    let ws = own.as_ref().unwrap_or(&g.store);
    // transformers 5 spelling first, the transformers 4 `text_model.` prefix as the alternative.
    let src = StoreSource::new(ws, "weight/", dev.device, dev.dtype)
        .with_alt_prefix("weight/text_model.");
    let model = ClipTextModel::load(&cfg, Params::new(&src))
        .map_err(|e| anyhow!("{}: building the CLIP text encoder: {e}", g.name()))?;
    let shape = g.info_shape("in/input_ids")?;
    ensure!(
        shape.len() == 2,
        "{}: in/input_ids has shape {shape:?}, expected [prompts, tokens]",
        g.name()
    );
    let ids: Vec<u32> = g
        .i64s("in/input_ids")?
        .into_iter()
        .map(|i| u32::try_from(i).map_err(|_| anyhow!("{}: in/input_ids: bad id {i}", g.name())))
        .collect::<Result<_>>()?;
    let want = g.f32("out/last_hidden_state")?;
    let t0 = Instant::now();
    let y = model
        .forward(&ids, shape[0])
        .map_err(|e| anyhow!("{}: CLIP forward: {e}", g.name()))?;
    let y = host(&y)?;
    writeln!(out, "ran in {:.2} s", t0.elapsed().as_secs_f64())?;
    let mut checks = vec![compare(
        "out/last_hidden_state",
        &y,
        &want,
        tol,
        dev.rel_l2_criterion(),
        out,
    )?];
    if g.store.contains("out/pooler_output") {
        // transformers: last_hidden_state at each prompt's first eos id (argmax of `ids == eos`,
        // i.e. position 0 when a prompt has none).
        let eos = config["eos_token_id"]
            .as_u64()
            .ok_or_else(|| anyhow!("{}: config.eos_token_id missing", g.name()))?
            as u32;
        let (n, s, c) = (y.dim(0), y.dim(1), y.dim(2));
        let hs = y.to_vec_f32()?;
        let mut pooled = Vec::with_capacity(n * c);
        for p in 0..n {
            let row = &ids[p * s..(p + 1) * s];
            let at = row.iter().position(|&i| i == eos).unwrap_or(0);
            pooled.extend_from_slice(&hs[(p * s + at) * c..(p * s + at + 1) * c]);
        }
        let pooled = Tensor::from_vec(pooled, &[n, c])?;
        checks.push(compare(
            "out/pooler_output",
            &pooled,
            &g.f32("out/pooler_output")?,
            tol,
            dev.rel_l2_criterion(),
            out,
        )?);
    }
    Ok((checks, Vec::new()))
}

fn verify_vae(
    g: &Golden,
    dev: &DeviceChoice,
    tol: Tolerance,
    out: &mut dyn Write,
) -> Result<Checked> {
    let config = g.json_meta("config")?;
    let cfg = VaeConfig::from_json(&config)
        .map_err(|e| anyhow!("{}: `config` metadata: {e}", g.name()))?;
    let own = g.weights(out)?;
    let ws = own.as_ref().unwrap_or(&g.store);
    let src = StoreSource::new(ws, "weight/", dev.device, dev.dtype);
    let vae = VaeDecoder::load(&cfg, Params::new(&src))
        .map_err(|e| anyhow!("{}: building the VAE decoder: {e}", g.name()))?;
    let lat = g.f32("in/latents")?; // [N, C, h, w]
    ensure!(
        lat.rank() == 4,
        "{}: in/latents has shape {:?}, expected [frames, channels, h, w]",
        g.name(),
        lat.shape()
    );
    let want = g.f32("out/sample")?;
    let want01 = g.f32("out/frames_01")?;
    let latents = dev.put(ops::permute(&lat, &[0, 2, 3, 1])?)?;
    let t0 = Instant::now();
    let sample = vae
        .decode(&latents)
        .map_err(|e| anyhow!("{}: VAE decode: {e}", g.name()))?;
    let frames = to_unit_range(&sample)?;
    writeln!(out, "ran in {:.2} s", t0.elapsed().as_secs_f64())?;
    // [N, H, W, C] -> [N, C, H, W] as the file stores images.
    let nchw = |t: &Tensor| -> Result<Tensor> { Ok(ops::permute(&host(t)?, &[0, 3, 1, 2])?) };
    let checks = vec![
        compare(
            "out/sample",
            &nchw(&sample)?,
            &want,
            tol,
            dev.rel_l2_criterion(),
            out,
        )?,
        compare(
            "out/frames_01",
            &nchw(&frames)?,
            &want01,
            tol,
            dev.rel_l2_criterion(),
            out,
        )?,
    ];
    Ok((checks, Vec::new()))
}

/// The sampler the scheduler config describes; an error names any field whose value
/// `vi_model::sampler` does not implement.
fn sampler_from_config(g: &Golden, config: &Value, case: &Value, steps: usize) -> Result<Sampler> {
    let field = |k: &str| config.get(k).cloned().unwrap_or(Value::Null);
    let need = |k: &str, ok: &dyn Fn(&Value) -> bool, what: &str| -> Result<()> {
        let v = field(k);
        ensure!(
            ok(&v),
            "{}: scheduler config `{k}` = {v} is not supported (vi_model::sampler implements {what})",
            g.name()
        );
        Ok(())
    };
    let is_str = |s: &'static str| move |v: &Value| v.as_str() == Some(s);
    let absent_or = |b: bool| move |v: &Value| v.is_null() || v.as_bool() == Some(b);
    need(
        "beta_schedule",
        &is_str("scaled_linear"),
        "\"scaled_linear\"",
    )?;
    need("prediction_type", &is_str("epsilon"), "\"epsilon\"")?;
    need("trained_betas", &|v: &Value| v.is_null(), "null")?;
    need("thresholding", &absent_or(false), "false")?;
    let class = field("_class_name");
    let kind = match class.as_str() {
        Some("DDIMScheduler") => {
            need(
                "timestep_spacing",
                &|v: &Value| v.is_null() || v.as_str() == Some("leading"),
                "\"leading\"",
            )?;
            need("steps_offset", &|v: &Value| v.as_u64() == Some(1), "1")?;
            need("set_alpha_to_one", &absent_or(false), "false")?;
            need("clip_sample", &absent_or(false), "false")?;
            let eta = case.get("eta").and_then(Value::as_f64).unwrap_or(0.0);
            ensure!(
                eta == 0.0,
                "{}: case.eta {eta}: only DDIM eta 0 is implemented",
                g.name()
            );
            SamplerKind::Ddim
        }
        Some("DPMSolverMultistepScheduler") => {
            need("solver_order", &|v: &Value| v.as_u64() == Some(2), "2")?;
            need("solver_type", &is_str("midpoint"), "\"midpoint\"")?;
            need("lower_order_final", &absent_or(true), "true")?;
            need("euler_at_final", &absent_or(false), "false")?;
            need(
                "final_sigmas_type",
                &|v: &Value| v.is_null() || v.as_str() == Some("zero"),
                "\"zero\"",
            )?;
            need(
                "timestep_spacing",
                &|v: &Value| v.is_null() || v.as_str() == Some("linspace"),
                "\"linspace\"",
            )?;
            for k in [
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "use_flow_sigmas",
            ] {
                need(k, &absent_or(false), "false")?;
            }
            need(
                "lambda_min_clipped",
                &|v: &Value| v.is_null() || v.as_str() == Some("-Infinity"),
                "-inf (no clipping)",
            )?;
            need("variance_type", &|v: &Value| v.is_null(), "null")?;
            match field("algorithm_type").as_str() {
                Some("sde-dpmsolver++") => SamplerKind::DpmSolverSde,
                Some("dpmsolver++") => SamplerKind::DpmSolver2M,
                _ => bail!(
                    "{}: scheduler config `algorithm_type` = {} is not supported (sde-dpmsolver++ \
                     or dpmsolver++)",
                    g.name(),
                    field("algorithm_type")
                ),
            }
        }
        _ => bail!(
            "{}: scheduler config `_class_name` = {class} is not supported (DDIMScheduler or \
             DPMSolverMultistepScheduler)",
            g.name()
        ),
    };
    let num = |k: &str| -> Result<f64> {
        field(k)
            .as_f64()
            .ok_or_else(|| anyhow!("{}: scheduler config `{k}` missing", g.name()))
    };
    let n_train = field("num_train_timesteps").as_u64().ok_or_else(|| {
        anyhow!(
            "{}: scheduler config `num_train_timesteps` missing",
            g.name()
        )
    })? as usize;
    let schedule = NoiseSchedule::scaled_linear(num("beta_start")?, num("beta_end")?, n_train);
    Sampler::with_schedule(kind, steps, schedule).map_err(|e| anyhow!("{}: {e}", g.name()))
}

fn verify_scheduler(
    g: &Golden,
    dev: &DeviceChoice,
    tol: Tolerance,
    out: &mut dyn Write,
) -> Result<Checked> {
    let config = g.json_meta("config")?;
    let case = if g.meta.contains_key("case") {
        g.json_meta("case")?
    } else {
        Value::Null
    };
    let ts = g.i64s("in/timesteps")?;
    ensure!(!ts.is_empty(), "{}: in/timesteps is empty", g.name());
    let sampler = sampler_from_config(g, &config, &case, ts.len())?;
    writeln!(out, "scheduler: {:?}, {} steps", sampler.kind, ts.len())?;
    let mut other = Vec::new();
    if sampler.timesteps() == &ts[..] {
        writeln!(
            out,
            "{:<34} shape {:<18} exact",
            "in/timesteps",
            format!("[{}]", ts.len())
        )?;
    } else {
        let first = ts
            .iter()
            .zip(sampler.timesteps())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        writeln!(
            out,
            "in/timesteps: FAIL: ours {:?} vs reference {:?} (first difference at step {first})",
            sampler.timesteps(),
            ts
        )?;
        other.push(format!("in/timesteps (first difference at step {first})"));
    }
    let x_t = g.f32("in/x_T")?;
    let shape = x_t.shape().to_vec();
    ensure!(
        shape.len() == 5,
        "{}: in/x_T has shape {shape:?}, expected [b, c, f, h, w]",
        g.name()
    );
    // As in the pipeline: the sampler state (latents, noise) is f32 on the device whatever the
    // model dtype; the model output arrives in the model dtype and is widened.
    let f32_on = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(dev.device)?) };
    let mut x = f32_on(x_t)?;
    let mut state = SamplerState::default();
    let mut checks = Vec::new();
    for (k, t) in ts.iter().enumerate() {
        let eps = dev
            .put(g.f32(&format!("in/model_output/step{k}"))?)?
            .to_dtype(DType::F32)?;
        let noise = if sampler.needs_noise() {
            // Stored in the scheduler's layout [b*f, c, h, w]: -> [b, f, c, h, w] -> [b, c, f, h, w].
            let name = format!("in/noise/step{k}");
            let z = g.f32(&name)?;
            let z = z
                .reshape(&[shape[0], shape[2], shape[1], shape[3], shape[4]])
                .with_context(|| format!("{}: {name} does not match in/x_T {shape:?}", g.name()))?;
            Some(f32_on(ops::permute(&z, &[0, 2, 1, 3, 4])?)?)
        } else {
            None
        };
        let want = g.f32(&format!("out/prev_sample/step{k}"))?;
        x = sampler
            .step(&mut state, k, &eps, &x, noise.as_ref())
            .map_err(|e| anyhow!("{}: step {k}: {e}", g.name()))?;
        checks.push(compare(
            &format!("out/prev_sample/step{k} (t={t})"),
            &x,
            &want,
            tol,
            dev.rel_l2_criterion(),
            out,
        )?);
    }
    Ok((checks, other))
}

fn verify_tokenizer(cases_path: &Path, dir: &Path, out: &mut dyn Write) -> Result<Outcome> {
    writeln!(
        out,
        "golden: {} (tokenizer cases), tokenizer {}",
        cases_path.display(),
        dir.display()
    )?;
    let text = vi_weights::input_file::read_text_bounded(
        cases_path,
        vi_weights::input_file::Limit::CASE_FILE,
    )?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", cases_path.display()))?;
    let cases = v["cases"].as_array().ok_or_else(|| {
        anyhow!(
            "{}: no `cases` array: not a tokenizer case file",
            cases_path.display()
        )
    })?;
    ensure!(
        !cases.is_empty(),
        "{}: `cases` is empty",
        cases_path.display()
    );
    let tok =
        ClipTokenizer::from_dir(dir).map_err(|e| anyhow!("tokenizer {}: {e}", dir.display()))?;
    writeln!(
        out,
        "expected ids: `ids_open_clip` (open_clip.tokenize) of every case"
    )?;
    let mut checks = Vec::new();
    let other = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let prompt = c["prompt"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: cases[{i}].prompt missing", cases_path.display()))?;
        let want: Vec<u32> = c["ids_open_clip"]
            .as_array()
            .ok_or_else(|| anyhow!("{}: cases[{i}].ids_open_clip missing", cases_path.display()))?
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| {
                        anyhow!(
                            "{}: cases[{i}].ids_open_clip: bad id {x}",
                            cases_path.display()
                        )
                    })
            })
            .collect::<Result<_>>()?;
        ensure!(
            want.len() == CONTEXT_LENGTH,
            "{}: cases[{i}].ids_open_clip has {} ids, expected {CONTEXT_LENGTH}",
            cases_path.display(),
            want.len()
        );
        let mut got = tok.encode(prompt);
        // The tokenizer always gives CONTEXT_LENGTH ids; a shorter/longer result differs anyway.
        got.resize(CONTEXT_LENGTH, u32::MAX);
        let short: String = prompt.chars().take(40).collect();
        let name = format!("case {i} {short:?}");
        // Exact: atol = rtol = 0, so `n_over` counts the ids that differ.
        let exact = Tolerance {
            atol: 0.0,
            rtol: 0.0,
        };
        let g: Vec<f32> = got.iter().map(|&i| i as f32).collect();
        let w: Vec<f32> = want.iter().map(|&i| i as f32).collect();
        let chk = compare_slices(&name, &[CONTEXT_LENGTH], &g, &w, exact, Criterion::F32);
        if chk.passed {
            writeln!(out, "{name:<50} {CONTEXT_LENGTH} ids exact")?;
        } else {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            writeln!(
                out,
                "{name}: FAIL: {} of {CONTEXT_LENGTH} ids differ, first at position {at}\n  \
                 ours      {got:?}\n  open_clip {want:?}",
                chk.n_over
            )?;
        }
        checks.push(chk);
    }
    Ok(finish("tokenizer".into(), checks, other))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_tokens() {
        let v: Value = serde_json::from_str(&python_json(
            r#"{"a": -Infinity, "b": [Infinity, NaN, 1.5], "c": "x -Infinity \" NaN", "d": null}"#,
        ))
        .unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"][0], "Infinity");
        assert_eq!(v["b"][1], "NaN");
        assert_eq!(v["b"][2], 1.5);
        assert_eq!(v["c"], "x -Infinity \" NaN");
        assert!(v["d"].is_null());
    }

    /// Plugin settings make a Video-Infinity case whatever the world size; none, the plain UNet.
    #[test]
    fn unet_case_from_metadata() {
        let case = |s: &str| UNetCase::from_case(&serde_json::from_str(s).unwrap());
        let pc =
            r#"{"attn": {"padding": 2, "top_k": 4, "dynamic_scale": false}, "conv_layer": {}}"#;
        for (json, want_world) in [
            (format!(r#"{{"world_size": 1, "plugin_configs": {pc}}}"#), 1),
            (format!(r#"{{"plugin_configs": {pc}}}"#), 1),
            (format!(r#"{{"world_size": 3, "plugin_configs": {pc}}}"#), 3),
        ] {
            match case(&json).unwrap() {
                UNetCase::ClipParallel { world, vi } => {
                    assert_eq!(world, want_world, "{json}");
                    assert_eq!((vi.attn_pad, vi.top_k, vi.dynamic_scale), (2, 4, false));
                }
                UNetCase::Plain => panic!("{json}: taken as the plain UNet"),
            }
        }
        for json in [
            r#"{"plugins": false, "frames": 6}"#,
            r#"{"world_size": 1}"#,
            r#"{"world_size": 1, "plugin_configs": null}"#,
            "null",
        ] {
            assert!(matches!(case(json).unwrap(), UNetCase::Plain), "{json}");
        }
        let e = format!("{:#}", case(r#"{"world_size": 2}"#).unwrap_err());
        assert!(e.contains("no plugin_configs"), "{e}");
        let e = format!(
            "{:#}",
            case(r#"{"world_size": 0, "plugin_configs": {}}"#).unwrap_err()
        );
        assert!(e.contains("not a rank count"), "{e}");
        let e = format!(
            "{:#}",
            case(r#"{"plugin_configs": {"attn": {"bogus": 1}}}"#).unwrap_err()
        );
        assert!(e.contains("case.plugin_configs"), "{e}");
    }

    #[test]
    fn comparison_numbers() {
        let tol = Tolerance {
            atol: 1e-3,
            rtol: 1e-2,
        };
        // Elementwise only (no ceiling), as the f32 criterion with an infinite one.
        let elementwise = Criterion {
            elementwise: true,
            max_rel_l2: f64::INFINITY,
        };
        let bf16 = Criterion {
            elementwise: false,
            max_rel_l2: REDUCED_MAX_REL_L2,
        };
        let want = [1.0, 2.0, 0.0];
        let c = compare_slices("x", &[3], &want, &want, tol, Criterion::F32);
        assert!(c.passed && c.rel_l2 == 0.0 && c.max_abs == 0.0);
        assert!((c.worst_excess + 1e-3).abs() < 1e-12);
        // 2.05 vs 2.0: |d| 0.05 > 1e-3 + 2e-2 -> over, excess 0.029.
        let c = compare_slices("x", &[3], &[1.0, 2.05, 0.0], &want, tol, elementwise);
        assert!(!c.passed && c.n_over == 1);
        assert!((c.worst_excess - 0.029).abs() < 1e-6, "{}", c.worst_excess);
        assert!((c.rel_l2 - 0.05 / 5f64.sqrt()).abs() < 1e-7);
        // The reduced criterion is rel L2 only; NaN always fails.
        // 2.03 vs 2.0: over the elementwise tolerance, but rel L2 0.03/sqrt(5) = 1.3e-2 <= 2e-2.
        let got = [1.0, 2.03, 0.0];
        assert!(!compare_slices("x", &[3], &got, &want, tol, elementwise).passed);
        assert!(compare_slices("x", &[3], &got, &want, tol, bf16).passed);
        let c = compare_slices("x", &[1], &[f32::NAN], &[1.0], tol, bf16);
        assert!(!c.passed && c.n_nonfinite == 1 && c.n_over == 1);
        // f16 has its own, tighter bar: 1.3e-2 fails it.
        let f16 = Criterion {
            max_rel_l2: F16_MAX_REL_L2,
            ..bf16
        };
        assert!(!compare_slices("x", &[3], &got, &want, tol, f16).passed);
        // f32: within atol/rtol everywhere but over the whole-tensor ceiling (rel L2 ~3e-5).
        let got = [1.0, 2.0001, 0.0];
        let c = compare_slices("x", &[3], &got, &want, tol, elementwise);
        assert!(c.passed && c.n_over == 0);
        let c = compare_slices("x", &[3], &got, &want, tol, Criterion::F32);
        assert!(!c.passed && c.n_over == 0 && c.rel_l2 > F32_MAX_REL_L2);
    }
}

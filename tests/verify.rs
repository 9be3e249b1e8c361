//! `video-infinity verify` on every golden file of `tests/golden/` (all must PASS on the CPU), on a
//! golden case whose weights were perturbed (must FAIL with exit code 1 and a `verify: FAIL` line),
//! and on files it cannot verify (clear errors naming the file or tensor, exit code 2).

use std::collections::HashMap;
use std::path::Path;

use vi_suite::{golden_dir, BF16_MAX_REL_L2, F16_MAX_REL_L2, F32_MAX_REL_L2};
use vi_weights::{write_safetensors, WDType, WeightStore};
use video_infinity::cli::{Command, VerifyArgs};
use video_infinity::verify::{self, exit_code, verify_to, Outcome};
use video_infinity::{Cli, VerifyFailed};

/// `video-infinity verify <extra...>` parsed by the real CLI.
fn args(extra: &[&str]) -> VerifyArgs {
    use clap::Parser as _;
    let mut argv = vec!["video-infinity", "verify"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Verify(a) => a,
        other => panic!("parsed as {other:?}"),
    }
}

fn golden(file: &str) -> String {
    golden_dir().join(file).to_string_lossy().into_owned()
}

/// Runs verify, prints its report, returns the outcome and the report text.
fn report(a: &VerifyArgs) -> (Outcome, String) {
    let mut buf = Vec::new();
    let outcome = verify_to(a, &mut buf).unwrap_or_else(|e| panic!("verify errored: {e:#}"));
    let text = String::from_utf8(buf).unwrap();
    println!("{text}{}", outcome.summary());
    (outcome, text)
}

/// Verify passes on `file`; every output named in `outputs` was checked and reported.
fn assert_pass(extra: &[&str], outputs: &[String]) -> Outcome {
    let (o, text) = report(&args(extra));
    assert!(o.passed, "{}", o.summary());
    let s = o.summary();
    assert!(s.starts_with("verify: PASS rel_l2="), "{s}");
    let worst: f64 = s["verify: PASS rel_l2=".len()..].parse().unwrap();
    assert!(
        (worst - o.worst_rel_l2).abs() <= 1e-3 * o.worst_rel_l2,
        "{s}"
    );
    let names: Vec<&str> = o.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), outputs.len(), "{names:?}");
    for (n, want) in names.iter().zip(outputs) {
        assert!(n.starts_with(want.as_str()), "{n} vs {want}");
        assert!(text.contains(want.as_str()), "report lacks {want}");
    }
    for c in &o.checks {
        assert!(c.passed && c.n_over == 0 && c.worst_excess <= 0.0, "{c:?}");
        assert!(c.rel_l2 <= o.worst_rel_l2);
    }
    o
}

#[test]
fn unet_plain_passes() {
    let o = assert_pass(
        &["--golden", &golden("unet_plain.safetensors")],
        &["out/sample".into()],
    );
    assert_eq!(o.checks[0].shape, [2, 4, 6, 8, 16]);
    // The golden test measured 1.2e-6; a broken model would be orders of magnitude worse.
    assert!(o.worst_rel_l2 < 1e-4, "{}", o.worst_rel_l2);
}

fn vi_case(file: &str, world: usize) {
    let outs: Vec<String> = (0..world).map(|r| format!("out/sample/rank{r}")).collect();
    let o = assert_pass(&["--golden", &golden(file)], &outs);
    assert!(o.worst_rel_l2 < 1e-4, "{}", o.worst_rel_l2);
}

#[test]
fn unet_vi_w3_t900_passes_on_every_rank() {
    vi_case("unet_vi_w3_t900.safetensors", 3);
}

#[test]
fn unet_vi_w3_t500_passes_on_every_rank() {
    vi_case("unet_vi_w3_t500.safetensors", 3);
}

#[test]
fn unet_vi_w2_nodyn_passes_on_every_rank() {
    vi_case("unet_vi_w2_nodyn.safetensors", 2);
}

/// One rank with plugin settings: the Video-Infinity plugins with zero neighbours and the rank's own
/// frames as global tokens (`in/sample/rank0`), not the plain UNet.
#[test]
fn unet_vi_w1_nodyn_passes_on_its_one_rank() {
    let file = "unet_vi_w1_nodyn.safetensors";
    let (_, text) = report(&args(&["--golden", &golden(file)]));
    assert!(
        text.contains("Video-Infinity clip parallelism on 1 in-process ranks"),
        "{text}"
    );
    vi_case(file, 1);
}

#[test]
fn clip_text_passes() {
    let o = assert_pass(
        &["--golden", &golden("clip_text.safetensors")],
        &["out/last_hidden_state".into(), "out/pooler_output".into()],
    );
    assert_eq!(o.checks[0].shape, [6, 77, 32]);
}

#[test]
fn vae_decoder_passes() {
    let o = assert_pass(
        &["--golden", &golden("vae_decoder.safetensors")],
        &["out/sample".into(), "out/frames_01".into()],
    );
    assert_eq!(o.checks[0].shape, [3, 3, 64, 96]);
}

fn scheduler_case(file: &str, steps: usize) {
    let outs: Vec<String> = (0..steps)
        .map(|k| format!("out/prev_sample/step{k} "))
        .collect();
    let (o, text) = report(&args(&["--golden", &golden(file)]));
    assert!(o.passed, "{}", o.summary());
    assert!(
        text.contains("in/timesteps") && text.contains("exact"),
        "{text}"
    );
    assert_eq!(o.checks.len(), steps);
    for (c, want) in o.checks.iter().zip(&outs) {
        assert!(c.name.starts_with(want.as_str()) && c.passed, "{c:?}");
    }
    assert!(o.summary().starts_with("verify: PASS rel_l2="));
}

#[test]
fn scheduler_sde_dpmpp_30_passes() {
    scheduler_case("scheduler_sde_dpmpp_30.safetensors", 30);
}

#[test]
fn scheduler_dpmpp_30_passes() {
    scheduler_case("scheduler_dpmpp_30.safetensors", 30);
}

#[test]
fn scheduler_ddim_50_passes() {
    scheduler_case("scheduler_ddim_50.safetensors", 50);
}

/// `--dtype bf16/f16` on the CPU (every op output rounded to that dtype: the GPU's numeric
/// contract) passes every model golden under the reduced-precision criterion (rel L2 <= 2e-2 in
/// bf16, <= 5e-3 in f16), and really runs reduced (errors well above f32 round-off).
#[test]
fn reduced_precision_on_cpu_passes() {
    let files = [
        "unet_plain",
        "unet_vi_w3_t500",
        "clip_text",
        "vae_decoder",
        "scheduler_sde_dpmpp_30",
    ];
    for (dt, bar, bar_text) in [
        ("bf16", BF16_MAX_REL_L2, "2e-2"),
        ("f16", F16_MAX_REL_L2, "5e-3"),
    ] {
        for f in files {
            let file = format!("{f}.safetensors");
            let (o, text) = report(&args(&["--golden", &golden(&file), "--dtype", dt]));
            assert!(o.passed, "{file} {dt}: {}", o.summary());
            let criterion = format!("pass criterion: rel L2 <= {bar_text} per output");
            assert!(text.contains(&criterion), "{text}");
            assert!(
                o.worst_rel_l2 > 1e-5 && o.worst_rel_l2 <= bar,
                "{file} {dt}: worst rel L2 {:.3e}",
                o.worst_rel_l2
            );
        }
    }
}

#[test]
fn tokenizer_cases_pass() {
    let (o, text) = report(&args(&[
        "--golden",
        &golden("tokenizer_cases.json"),
        "--tokenizer",
        &golden("tokenizer"),
    ]));
    assert!(o.passed, "{}", o.summary());
    assert_eq!(o.checks.len(), 25);
    assert_eq!(text.matches("ids exact").count(), 25, "{text}");
    assert_eq!(o.summary(), "verify: PASS rel_l2=0.000e0");
}

/// Every golden case file of tests/golden/ is covered by a test above.
#[test]
fn every_golden_file_is_covered() {
    let mut names: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n.ends_with("_cases.json"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "clip_text.safetensors",
            "scheduler_ddim_50.safetensors",
            "scheduler_dpmpp_30.safetensors",
            "scheduler_sde_dpmpp_30.safetensors",
            "tokenizer_cases.json",
            "unet_plain.safetensors",
            "unet_tiny_seed0.weights.safetensors", // weights only: see `non_golden_files_error`
            "unet_vi_w1_nodyn.safetensors",
            "unet_vi_w2_nodyn.safetensors",
            "unet_vi_w3_t500.safetensors",
            "unet_vi_w3_t900.safetensors",
            "vae_decoder.safetensors",
        ]
    );
}

// ---- failures and errors ----

/// Copies every tensor of `src` (and its metadata) into `dst`, except those `edit` drops
/// (returns None) or changes.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>,
    meta: impl Fn(&mut HashMap<String, String>),
) {
    let store = WeightStore::open(src).unwrap();
    let mut tensors: Vec<(String, WDType, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in store.names() {
        let v = store.view(name).unwrap();
        if let Some(bytes) = edit(name, v.data.to_vec()) {
            tensors.push((name.to_string(), v.dtype, v.shape.to_vec(), bytes));
        }
    }
    let mut m = store.metadata(0).clone();
    meta(&mut m);
    write_safetensors(dst, &tensors, Some(&m)).unwrap();
}

fn run_cli(extra: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["video-infinity", "verify"];
    argv.extend_from_slice(extra);
    video_infinity::run(argv)
}

const PERTURBED: &str = "weight/mid_block.resnets.0.conv1.weight";

/// One UNet weight tensor changed by 1% (every element scaled by 1.01): verify fails with exit
/// code 1 and a `verify: FAIL` line naming the output.
#[test]
fn perturbed_weight_fails() {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("unet_plain.safetensors");
    std::fs::copy(golden_dir().join("unet_plain.safetensors"), &case).unwrap();
    let wname = "unet_tiny_seed0.weights.safetensors";
    let found = std::sync::atomic::AtomicBool::new(false);
    rewrite(
        &golden_dir().join(wname),
        &dir.path().join(wname),
        |name, bytes| {
            if name != PERTURBED {
                return Some(bytes);
            }
            found.store(true, std::sync::atomic::Ordering::Relaxed);
            Some(
                bytes
                    .chunks_exact(4)
                    .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 1.01).to_le_bytes())
                    .collect(),
            )
        },
        |_| {},
    );
    assert!(
        found.load(std::sync::atomic::Ordering::Relaxed),
        "{PERTURBED} not in the weights file"
    );

    let path = case.to_string_lossy().into_owned();
    let (o, _) = report(&args(&["--golden", &path]));
    assert!(!o.passed);
    let c = &o.checks[0];
    assert!(!c.passed && c.n_over > 0 && c.worst_excess > 0.0, "{c:?}");
    assert!(
        o.summary().starts_with("verify: FAIL out/sample"),
        "{}",
        o.summary()
    );

    let err = run_cli(&["--golden", &path]).unwrap_err();
    let failed = err
        .downcast_ref::<VerifyFailed>()
        .unwrap_or_else(|| panic!("not a VerifyFailed: {err:#}"));
    assert!(failed.0.starts_with("verify: FAIL "), "{}", failed.0);
    assert_eq!(exit_code(&err), 1);

    // A looser tolerance from the flags can accept it (the flags are honoured), the default not.
    let loose = ["--golden", &path, "--atol", "1", "--rtol", "1"];
    let (o, _) = report(&args(&loose));
    assert!(!o.passed && o.checks[0].n_over == 0, "{}", o.summary());
    let (loose, _) = report(&args(&[&loose[..], &["--max-rel-l2", "1"]].concat()));
    assert!(loose.passed, "{}", loose.summary());
}

/// The f32 criterion's whole-tensor ceiling (golden README "Tolerances"): a reference output
/// scaled by 1 + 3e-5 is within atol 2e-5 + rtol 1e-4 everywhere, but rel L2 3e-5 > 1e-5: FAIL,
/// named as a ceiling failure.
#[test]
fn f32_ceiling_fails_a_uniform_3e_5_error() {
    let dir = tempfile::tempdir().unwrap();
    let wname = "unet_tiny_seed0.weights.safetensors";
    std::fs::copy(golden_dir().join(wname), dir.path().join(wname)).unwrap();
    let case = dir.path().join("unet_plain.safetensors");
    rewrite(
        &golden_dir().join("unet_plain.safetensors"),
        &case,
        |name, bytes| {
            if name != "out/sample" {
                return Some(bytes);
            }
            Some(
                bytes
                    .chunks_exact(4)
                    .flat_map(|c| {
                        (f32::from_le_bytes(c.try_into().unwrap()) * (1.0 + 3e-5)).to_le_bytes()
                    })
                    .collect(),
            )
        },
        |_| {},
    );
    let path = case.to_string_lossy().into_owned();
    let (o, text) = report(&args(&["--golden", &path]));
    assert!(text.contains("and rel L2 <= 1e-5 per output"), "{text}");
    let c = &o.checks[0];
    assert!(!o.passed && c.n_over == 0 && c.worst_excess <= 0.0, "{c:?}");
    assert!(c.rel_l2 > 2e-5 && c.rel_l2 < 4e-5, "{c:?}");
    assert!(
        o.summary().contains("over the whole-tensor ceiling"),
        "{}",
        o.summary()
    );
}

/// verify's bars are the test suite's bars.
#[test]
fn verify_bars_are_the_suite_bars() {
    assert_eq!(verify::F32_MAX_REL_L2, F32_MAX_REL_L2);
    assert_eq!(verify::REDUCED_MAX_REL_L2, BF16_MAX_REL_L2);
    assert_eq!(verify::F16_MAX_REL_L2, F16_MAX_REL_L2);
}

/// The error of a verify that cannot run: exit code 2, message checked by `check`.
fn expect_error(extra: &[&str], check: impl Fn(&str) -> bool) {
    let err = verify_to(&args(extra), &mut Vec::new()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(check(&msg), "unexpected message: {msg}");
    let err = run_cli(extra).unwrap_err();
    assert!(err.downcast_ref::<VerifyFailed>().is_none());
    assert_eq!(exit_code(&err), 2, "{err:#}");
}

#[test]
fn missing_weights_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("unet_vi_w2_nodyn.safetensors");
    std::fs::copy(golden_dir().join("unet_vi_w2_nodyn.safetensors"), &case).unwrap();
    let path = case.to_string_lossy().into_owned();
    expect_error(&["--golden", &path], |m| {
        m.contains("unet_tiny_seed0.weights.safetensors")
            && m.contains("not found")
            && m.contains("weights_file")
    });
}

#[test]
fn non_golden_files_error() {
    // The shared UNet weights: a golden file, but no outputs to check.
    expect_error(
        &["--golden", &golden("unet_tiny_seed0.weights.safetensors")],
        |m| m.contains("unet3d_weights") && m.contains("unet_tiny_seed0.weights.safetensors"),
    );
    // Not safetensors at all.
    expect_error(&["--golden", &golden("README.md")], |m| {
        m.contains("README.md") && m.contains("not a golden safetensors file")
    });
    // Does not exist.
    expect_error(&["--golden", &golden("no_such_case.safetensors")], |m| {
        m.contains("no_such_case.safetensors") && m.contains("does not exist")
    });
    // A tokenizer case file without --tokenizer.
    expect_error(&["--golden", &golden("tokenizer_cases.json")], |m| {
        m.contains("--tokenizer")
    });

    let dir = tempfile::tempdir().unwrap();
    let src = golden_dir().join("scheduler_ddim_50.safetensors");
    // An unknown kind.
    let unknown = dir.path().join("unknown.safetensors");
    rewrite(
        &src,
        &unknown,
        |_, b| Some(b),
        |m| {
            m.insert("kind".into(), "flux_transformer".into());
        },
    );
    expect_error(&["--golden", &unknown.to_string_lossy()], |m| {
        m.contains("unknown golden kind `flux_transformer`") && m.contains("unknown.safetensors")
    });
    // No kind at all.
    let nokind = dir.path().join("nokind.safetensors");
    rewrite(
        &src,
        &nokind,
        |_, b| Some(b),
        |m| {
            m.remove("kind");
        },
    );
    expect_error(&["--golden", &nokind.to_string_lossy()], |m| {
        m.contains("no `kind` metadata") && m.contains("nokind.safetensors")
    });
    // A reference tensor missing.
    let missing = dir.path().join("missing.safetensors");
    rewrite(
        &src,
        &missing,
        |n, b| (n != "out/prev_sample/step7").then_some(b),
        |_| {},
    );
    expect_error(&["--golden", &missing.to_string_lossy()], |m| {
        m.contains("out/prev_sample/step7") && m.contains("missing.safetensors")
    });
}

#[test]
fn unknown_device_is_an_error() {
    expect_error(
        &[
            "--golden",
            &golden("scheduler_ddim_50.safetensors"),
            "--device",
            "tpu",
        ],
        |m| m.contains("--device tpu"),
    );
}

/// A tokenizer whose merges are cut short tokenizes differently: verify names the cases that differ.
#[test]
fn wrong_tokenizer_fails() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden_dir().join("tokenizer");
    std::fs::copy(src.join("vocab.json"), dir.path().join("vocab.json")).unwrap();
    // Keep the header and the first 1000 merges only: longer words stay split.
    let merges = std::fs::read_to_string(src.join("merges.txt")).unwrap();
    let cut: Vec<&str> = merges.lines().take(1001).collect();
    std::fs::write(dir.path().join("merges.txt"), cut.join("\n") + "\n").unwrap();
    let tok = dir.path().to_string_lossy().into_owned();
    let (o, text) = report(&args(&[
        "--golden",
        &golden("tokenizer_cases.json"),
        "--tokenizer",
        &tok,
    ]));
    assert!(!o.passed);
    assert!(text.contains("ids differ, first at position"), "{text}");
    let s = o.summary();
    assert!(
        s.starts_with("verify: FAIL case ") && s.contains("ids differ"),
        "{s}"
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_the_feature_is_an_error() {
    expect_error(
        &[
            "--golden",
            &golden("scheduler_ddim_50.safetensors"),
            "--device",
            "cuda:0",
        ],
        |m| m.contains("--device cuda:0") && m.contains("without CUDA support"),
    );
}

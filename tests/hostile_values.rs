//! Hostile values (issue 15, items 3, 5, 6, 7): absurd config sizes, impossible requests, NaN and
//! out-of-range flags, weights that loading refuses, broken vocabularies, long prompts. Each is
//! refused before anything is planned, allocated or written, with one message naming the culprit
//! (the file and field, the flag, the tensor, the token); `inspect`, `convert` and `generate` give
//! one verdict on the same weights. Driven in-process through `video_infinity::run`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vi_model::clip::ClipTextConfig;
use vi_model::models::{check_part, locate_part, PartKind};
use vi_model::tokenizer::ClipTokenizer;
use vi_model::unet::UNetConfig;
use vi_model::vae::VaeConfig;
use vi_suite::golden_dir;
use vi_weights::{write_safetensors, WDType, WeightStore};

fn run(args: &[&str]) -> Result<(), video_infinity::Error> {
    let mut v = vec!["video-infinity"];
    v.extend_from_slice(args);
    video_infinity::run(v)
}

fn err(args: &[&str]) -> String {
    match run(args) {
        Ok(()) => panic!("expected an error from {args:?}"),
        Err(e) => format!("{e:#}"),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tiny_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    run(&["write-tiny", s(&d)]).unwrap();
    d
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrites a safetensors file in place, letting `edit` change its (name, dtype, shape, bytes).
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, WDType, Vec<usize>, Vec<u8>)>)) {
    let store = WeightStore::open(path).unwrap();
    let mut tensors: Vec<(String, WDType, Vec<usize>, Vec<u8>)> = store
        .names()
        .map(|n| {
            let v = store.view(n).unwrap();
            (n.to_string(), v.dtype, v.shape.to_vec(), v.data.to_vec())
        })
        .collect();
    let meta: HashMap<String, String> = store.metadata(0).clone();
    drop(store);
    edit(&mut tensors);
    write_safetensors(path, &tensors, Some(&meta)).unwrap();
}

const GIB: u64 = 1 << 30;

/// Absurd config sizes are refused when the config is parsed (before any model or plan is built
/// from them), naming the field, its value, the ceiling and the bytes the value would need.
#[test]
fn absurd_config_values_are_refused_at_parse() {
    let bounded = |e: String, field: &str, v: &str| {
        assert!(
            e.contains(&format!("`{field}` {v} is out of range: at most"))
                && e.contains("would need at least"),
            "{e}"
        );
    };
    let mut u = vi_model::tiny::unet_config_json();
    u["layers_per_block"] = 1_000_000_000_000u64.into();
    bounded(
        UNetConfig::from_json(&u).unwrap_err().to_string(),
        "layers_per_block",
        "1000000000000",
    );
    let mut u = vi_model::tiny::unet_config_json();
    u["block_out_channels"] = serde_json::json!([32, 64, 64, 1_000_000_000u64]);
    bounded(
        UNetConfig::from_json(&u).unwrap_err().to_string(),
        "block_out_channels",
        "1000000000",
    );
    let mut c = vi_model::tiny::clip_config_json();
    c["num_hidden_layers"] = 1_000_000_000_000u64.into();
    bounded(
        ClipTextConfig::from_json(&c).unwrap_err().to_string(),
        "num_hidden_layers",
        "1000000000000",
    );
    let mut c = vi_model::tiny::clip_config_json();
    c["vocab_size"] = 4_000_000_000u64.into();
    bounded(
        ClipTextConfig::from_json(&c).unwrap_err().to_string(),
        "vocab_size",
        "4000000000",
    );
    let mut v = vi_model::tiny::vae_config_json();
    v["layers_per_block"] = 1_000_000u64.into();
    bounded(
        VaeConfig::from_json(&v).unwrap_err().to_string(),
        "layers_per_block",
        "1000000",
    );
    // The full-size reference configs are within every ceiling.
    vi_model::random_full::unet_config().unwrap();
    vi_model::random_full::clip_config().unwrap();
    vi_model::random_full::vae_config().unwrap();
}

/// A config value past its ceiling in a model folder: `generate` and `inspect`'s check name the
/// config file and the field.
#[test]
fn config_past_its_ceiling_names_the_file_and_field() {
    let t = tempfile::tempdir().unwrap();
    let d = tiny_dir(t.path(), "model");
    edit_json(&d.join("unet/config.json"), |c| {
        c.insert("layers_per_block".into(), 17.into());
    });
    let out = t.path().join("x.mp4");
    let e = err(&[
        "generate",
        "--model",
        s(&d),
        "--prompt",
        "p",
        "--out",
        s(&out),
    ]);
    assert!(
        e.contains("unet/config.json") && e.contains("`layers_per_block` 17 is out of range"),
        "{e}"
    );
    assert!(!out.exists());
    let e = check_part(&locate_part(&d, PartKind::Unet).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unet/config.json") && e.contains("`layers_per_block` 17"),
        "{e}"
    );
    let e = err(&["inspect", s(&d)]);
    assert!(e.contains("unet/ unreadable"), "{e}");
}

/// Impossible requests are refused at once, naming the flag and the bytes: above what any machine
/// holds before the plan; under `--no-memory-check` against the real free memory (the run could
/// only abort in the allocator); otherwise the plan refuses, naming a pad that drives it. `bench`
/// plans like `generate`. Nothing is written.
#[test]
fn impossible_requests_are_refused_before_planning() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.mp4");
    let gen = |extra: &[&str]| {
        let mut v = vec!["generate", "--model", "tiny", "--out", s(&out)];
        v.extend_from_slice(extra);
        err(&v)
    };
    // Below what --attn-pad 100000 needs even under the most constrained schedule (frames in
    // chunks of 1, sequential CFG rows: 15.3 GiB + margin; the planner would otherwise pick that
    // schedule and run).
    let ten = (10 * GIB).to_string();

    // Certain minimum past 1 PiB: refused before the plan, with or without the check.
    for extra in [
        &[
            "--frames", "1000000", "--height", "16384", "--width", "16384",
        ][..],
        &[
            "--frames",
            "1000000",
            "--height",
            "16384",
            "--width",
            "16384",
            "--no-memory-check",
        ],
    ] {
        let e = gen(extra);
        assert!(
            e.contains("--frames 1000000 at 16384x16384 needs at least")
                && e.contains("which no machine holds"),
            "{e}"
        );
    }
    // --no-memory-check: the certain minimum against the real free memory (hundreds of TiB here).
    let big = ["--height", "4096", "--width", "4096", "--no-memory-check"];
    for (pad, flag) in [
        ("--attn-pad", "--attn-pad 1000000 needs at least"),
        ("--conv-pad", "--conv-pad 1000000 needs at least"),
    ] {
        let mut v = vec![pad, "1000000"];
        v.extend_from_slice(&big);
        let e = gen(&v);
        assert!(e.contains(flag) && e.contains("is free"), "{e}");
    }
    let mut v = vec!["--frames", "1000000"];
    v.extend_from_slice(&big);
    let e = gen(&v);
    assert!(
        e.contains("--frames 1000000 at 4096x4096 needs at least"),
        "{e}"
    );

    // Within reach of a machine: the plan refuses, naming the pad first.
    let e = gen(&["--attn-pad", "100000", "--assume-free-memory", &ten]);
    assert!(
        e.contains("the memory plan does not fit")
            && e.contains("a smaller --attn-pad (now 100000"),
        "{e}"
    );

    // Absurd values: refused by the flag's own range.
    let e = gen(&["--frames", "1000000000"]);
    assert!(e.contains("--frames 1000000000 is too large"), "{e}");
    let e = gen(&["--height", "100032"]);
    assert!(e.contains("--height 100032 is too large"), "{e}");
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);

    // `bench`: the same bound and the same plan.
    let mut v = vec!["bench", "--attn-pad", "1000000"];
    v.extend_from_slice(&big);
    let e = err(&v);
    assert!(e.contains("--attn-pad 1000000 needs at least"), "{e}");
    let e = err(&[
        "bench",
        "--attn-pad",
        "100000",
        "--assume-free-memory",
        &ten,
    ]);
    assert!(
        e.contains("the memory plan does not fit")
            && e.contains("a smaller --attn-pad (now 100000"),
        "{e}"
    );
}

/// Every float flag must be finite and in its range, absurd integers are refused, each with the
/// flag named; nothing is written.
#[test]
fn numeric_flags_are_checked_with_the_flag_named() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.mp4");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--phase-bias", "NaN"],
            "--phase-bias NaN must be a finite number",
        ),
        (
            &["--phase-bias", "inf"],
            "--phase-bias inf must be a finite number",
        ),
        (
            &["--phase-bias", "-5000"],
            "--phase-bias -5000 is out of range",
        ),
        (
            &["--guidance", "NaN"],
            "--guidance NaN must be a finite number",
        ),
        (&["--guidance", "-1"], "--guidance -1 is out of range"),
        (
            &["--guidance", "1e30"],
            "--guidance 1000000000000000000000000000000 is out of range",
        ),
        (
            &["--fps-cond", "inf"],
            "--fps-cond inf must be a finite number",
        ),
        (&["--fps-cond", "-2"], "--fps-cond -2 is out of range"),
        (&["--phase-t", "5000"], "--phase-t 5000 is out of range"),
        (&["--steps", "5000"], "--steps 5000 is too large"),
        (&["--out-fps", "100000"], "--out-fps 100000 is out of range"),
        (
            &["--vae-chunk", "100000000000"],
            "--vae-chunk 100000000000 is too large",
        ),
        (
            &["--top-k", "100000000000"],
            "--top-k 100000000000 is too large",
        ),
        (&["--height", "0"], "--height 0: must be positive"),
        (&["--width", "0"], "--width 0: must be positive"),
    ];
    for (extra, want) in cases {
        let mut v = vec!["generate", "--model", "tiny", "--out", s(&out)];
        v.extend_from_slice(extra);
        let e = err(&v);
        assert!(e.contains(want), "{extra:?}: {e}");
        assert!(!e.contains('\n'), "{extra:?}: more than one line: {e}");
    }
    let e = err(&["bench", "--phase-bias", "NaN"]);
    assert!(
        e.contains("--phase-bias NaN must be a finite number"),
        "{e}"
    );
    let e = err(&["bench", "--steps", "999", "--warmup", "2"]);
    assert!(e.contains("--steps + --warmup 1001 is too large"), "{e}");
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);

    // Documented as allowed: --top-k 0 (no global tokens) and --guidance 0.
    run(&[
        "generate",
        "--model",
        "tiny",
        "--out",
        s(&out),
        "--frames",
        "2",
        "--steps",
        "1",
        "--top-k",
        "0",
        "--guidance",
        "0",
        "--quiet",
    ])
    .unwrap();
    assert!(out.is_file());
}

/// A weight of a non-float dtype or with a NaN: `inspect` refuses the folder as `generate` does,
/// both naming the tensor.
#[test]
fn inspect_and_generate_give_one_verdict_on_weights() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.mp4");
    for (name, part_file, tensor, kind) in [
        (
            "i32",
            "vae/diffusion_pytorch_model.safetensors",
            "decoder.conv_in.bias",
            "dtype I32 is not a float type",
        ),
        (
            "nan",
            "unet/diffusion_pytorch_model.safetensors",
            "conv_in.bias",
            "non-finite value NaN",
        ),
        (
            "inf",
            "text_encoder/model.safetensors",
            "final_layer_norm.weight",
            "non-finite value inf",
        ),
    ] {
        let d = tiny_dir(t.path(), name);
        rewrite(&d.join(part_file), |ts| {
            let e = ts.iter_mut().find(|(n, ..)| n.ends_with(tensor)).unwrap();
            match name {
                "i32" => e.1 = WDType::I32,
                "nan" => e.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes()),
                _ => e.3[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes()),
            }
        });
        let e = err(&["inspect", s(&d)]);
        assert!(
            e.contains(tensor) && e.contains(kind),
            "inspect {name}: {e}"
        );
        let e = err(&[
            "generate",
            "--model",
            s(&d),
            "--prompt",
            "p",
            "--out",
            s(&out),
            "--frames",
            "2",
            "--steps",
            "1",
        ]);
        assert!(
            e.contains(tensor) && e.contains(kind),
            "generate {name}: {e}"
        );
        assert!(!out.exists());
    }
}

/// A token id past the vocabulary is caught when the tokenizer loads, naming the file and the
/// token; a vocabulary larger than the text encoder's embedding table when the model loads.
#[test]
fn vocab_ids_out_of_range_are_caught_at_load() {
    let t = tempfile::tempdir().unwrap();
    let tok = t.path().join("tok");
    std::fs::create_dir(&tok).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(golden_dir().join("tokenizer").join(f), tok.join(f)).unwrap();
    }
    edit_json(&tok.join("vocab.json"), |v| {
        v.insert("a</w>".into(), 99999.into());
    });
    let e = match ClipTokenizer::from_dir(&tok) {
        Ok(_) => panic!("a vocabulary with an id past its size loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("vocab.json") && e.contains("token `a</w>` has id 99999, out of range"),
        "{e}"
    );

    // One more token (dense ids) than the tiny text encoder's 49408 embedding rows.
    let d = tiny_dir(t.path(), "model");
    edit_json(&d.join("tokenizer/vocab.json"), |v| {
        let n = v.len();
        v.insert("zzzqqq</w>".into(), n.into());
    });
    let e = err(&[
        "generate",
        "--model",
        s(&d),
        "--prompt",
        "p",
        "--frames-dir",
        s(&t.path().join("frames")),
        "--frames",
        "2",
        "--steps",
        "1",
    ]);
    assert!(
        e.contains("tokenizer/vocab.json") && e.contains("49409 tokens") && e.contains("49408"),
        "{e}"
    );
}

/// A prompt longer than the text encoder reads gets one warning line, once however often it is
/// used; a short one none.
#[test]
fn long_prompt_is_reported_truncated_once() {
    let tok = ClipTokenizer::from_dir(golden_dir().join("tokenizer")).unwrap();
    let long = vec!["lighthouse"; 100].join(" ");
    let w = video_infinity::generate::truncation_warnings(
        &tok,
        [long.as_str(), "a short prompt", long.as_str()].into_iter(),
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("100 tokens") && w[0].contains("truncated to its first 75"),
        "{w:?}"
    );
}

/// `--model DIR` of a folder written by `write-tiny` takes the tiny model's default frames and
/// size (detected from its UNet config, not from the folder's name).
#[test]
fn write_tiny_folder_takes_the_tiny_defaults() {
    let t = tempfile::tempdir().unwrap();
    let d = tiny_dir(t.path(), "some_name");
    let parts = video_infinity::cli::PartArgs::default();
    assert!(video_infinity::generate::is_tiny_folder(s(&d), &parts));
    let frames = t.path().join("frames");
    run(&[
        "generate",
        "--model",
        s(&d),
        "--prompt",
        "p",
        "--steps",
        "1",
        "--frames-dir",
        s(&frames),
        "--quiet",
    ])
    .unwrap();
    let names: Vec<_> = std::fs::read_dir(&frames).unwrap().collect();
    assert_eq!(names.len(), 16, "the tiny model's 16 frames per rank");
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(frames.join("frame_00000.png")).unwrap(),
    ));
    let info = dec.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (64, 64));

    // Another UNet config (a different sample_size): not the tiny model.
    edit_json(&d.join("unet/config.json"), |c| {
        c.insert("sample_size".into(), 9.into());
    });
    assert!(!video_infinity::generate::is_tiny_folder(s(&d), &parts));
}

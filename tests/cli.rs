//! The `video-infinity` command, driven in-process through `video_infinity::run`: generation with
//! the embedded tiny model and with a model folder, `inspect`, `verify` (passes on the golden files,
//! fails when one weight tensor is perturbed), and every bad-input error: the message names the
//! problem, and nothing is written or lost.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

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

/// Files in `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Rewrites a safetensors file, letting `edit` change (name, dtype, shape, bytes) entries;
/// metadata is kept.
fn rewrite(
    path: &Path,
    dest: &Path,
    edit: impl FnOnce(&mut Vec<(String, WDType, Vec<usize>, Vec<u8>)>),
) {
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
    write_safetensors(dest, &tensors, Some(&meta)).unwrap();
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tiny_dir(root: &Path) -> PathBuf {
    let d = root.join("model");
    run(&["write-tiny", s(&d)]).unwrap();
    d
}

const FAST: [&str; 8] = [
    "--prompt",
    "a red panda",
    "--steps",
    "2",
    "--seed",
    "7",
    "--quiet",
    "--overwrite",
];

#[test]
fn generate_tiny_writes_mp4_and_pngs() {
    let t = tempfile::tempdir().unwrap();
    let mp4_path = t.path().join("demo.mp4");
    let frames = t.path().join("frames");
    let mut args = vec![
        "generate",
        "--model",
        "tiny",
        "--frames",
        "6",
        "--devices",
        "cpu:2",
        "--out",
        s(&mp4_path),
        "--frames-dir",
        s(&frames),
    ];
    args.extend_from_slice(&FAST);
    run(&args).unwrap();

    let data = std::fs::read(&mp4_path).unwrap();
    let rd = mp4::Mp4Reader::read_header(Cursor::new(&data), data.len() as u64).unwrap();
    assert_eq!(rd.tracks().len(), 1);
    let track = rd.tracks().values().next().unwrap();
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    assert_eq!((track.width(), track.height()), (64, 64));
    assert_eq!(track.sample_count(), 6);
    let pngs = listing(&frames);
    assert_eq!(
        pngs,
        (0..6)
            .map(|i| format!("frame_{i:05}.png"))
            .collect::<Vec<_>>()
    );
    // Not a constant picture.
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(frames.join("frame_00000.png")).unwrap(),
    ));
    let mut rd = dec.read_info().unwrap();
    let mut buf = vec![0; rd.output_buffer_size().unwrap()];
    rd.next_frame(&mut buf).unwrap();
    let (lo, hi) = (buf.iter().min().unwrap(), buf.iter().max().unwrap());
    assert!(hi > lo, "frame is constant");
    assert!(listing(t.path()).iter().all(|n| !n.ends_with(".partial")));
}

/// `write-tiny` + `--model DIR` (loading and checking real files) gives exactly the frames of the
/// embedded tiny model; the same seed gives the same video, another seed another one.
#[test]
fn model_folder_matches_embedded_tiny_and_seed_is_reproducible() {
    let t = tempfile::tempdir().unwrap();
    let dir = tiny_dir(t.path());
    let gen = |model: &str, out: &Path, seed: &str| {
        run(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "a red panda",
            "--frames",
            "3",
            "--steps",
            "2",
            "--seed",
            seed,
            "--sampler",
            "dpm-sde",
            "--height",
            "64",
            "--width",
            "64",
            "--frames-dir",
            s(out),
            "--quiet",
        ])
        .unwrap();
        (0..3)
            .map(|i| std::fs::read(out.join(format!("frame_{i:05}.png"))).unwrap())
            .collect::<Vec<_>>()
    };
    let a = gen("tiny", &t.path().join("a"), "3");
    let b = gen(s(&dir), &t.path().join("b"), "3");
    let c = gen("tiny", &t.path().join("c"), "4");
    assert!(a == b, "model folder and embedded tiny model differ");
    assert!(a != c, "another seed gives the same video");
}

#[test]
fn prompt_file_segments() {
    let t = tempfile::tempdir().unwrap();
    let pf = t.path().join("prompts.txt");
    std::fs::write(&pf, "# segments\n0: a cat\n3: a dog\n").unwrap();
    let out = t.path().join("f");
    run(&[
        "generate",
        "--model",
        "tiny",
        "--prompts",
        s(&pf),
        "--frames",
        "4",
        "--devices",
        "cpu:2",
        "--steps",
        "1",
        "--frames-dir",
        s(&out),
        "--quiet",
    ])
    .unwrap();
    assert_eq!(listing(&out).len(), 4);
    std::fs::write(&pf, "2: a cat\n").unwrap();
    let e = err(&[
        "generate",
        "--model",
        "tiny",
        "--prompts",
        s(&pf),
        "--frames",
        "4",
        "--frames-dir",
        s(&out),
        "--overwrite",
    ]);
    assert!(e.contains("must start at frame 0"), "{e}");
    std::fs::write(&pf, "0 a cat\n").unwrap();
    let e = err(&[
        "generate",
        "--model",
        "tiny",
        "--prompts",
        s(&pf),
        "--frames",
        "4",
        "--frames-dir",
        s(&out),
        "--overwrite",
    ]);
    assert!(
        e.contains("prompts.txt:1") && e.contains("FIRST_FRAME"),
        "{e}"
    );
}

#[test]
fn inspect_file_and_model_folder() {
    let t = tempfile::tempdir().unwrap();
    let dir = tiny_dir(t.path());
    run(&["inspect", s(&dir)]).unwrap();
    run(&["inspect", s(&golden_dir().join("vae_decoder.safetensors"))]).unwrap();

    // Drop one VAE tensor, add an unexpected one: inspect reports the folder as unusable.
    let vae = dir.join("vae/diffusion_pytorch_model.safetensors");
    rewrite(&vae, &vae, |ts| {
        ts.retain(|(n, ..)| n != "decoder.conv_out.bias");
        ts.push(("decoder.extra".into(), WDType::F32, vec![1], bytes(&[0.0])));
    });
    let e = err(&["inspect", s(&dir)]);
    assert!(e.contains("vae/ lacks 1 tensors"), "{e}");
    let e = err(&["inspect", s(&t.path().join("nothing"))]);
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn verify_passes_on_golden_files() {
    for f in [
        "unet_plain.safetensors",
        "unet_vi_w2_nodyn.safetensors",
        "clip_text.safetensors",
        "vae_decoder.safetensors",
        "scheduler_sde_dpmpp_30.safetensors",
    ] {
        run(&["verify", "--golden", s(&golden_dir().join(f))])
            .unwrap_or_else(|e| panic!("{f}: {e:#}"));
    }
    run(&[
        "verify",
        "--golden",
        s(&golden_dir().join("tokenizer_cases.json")),
        "--tokenizer",
        s(&golden_dir().join("tokenizer")),
    ])
    .unwrap();
}

/// One perturbed weight tensor makes verify FAIL (exit 1 through `VerifyFailed`).
#[test]
fn verify_fails_with_a_perturbed_weight() {
    let t = tempfile::tempdir().unwrap();
    // UNet: weights in the file named by `weights_file`, beside the case file.
    let case = golden_dir().join("unet_plain.safetensors");
    std::fs::copy(&case, t.path().join("unet_plain.safetensors")).unwrap();
    let wname = "unet_tiny_seed0.weights.safetensors";
    rewrite(&golden_dir().join(wname), &t.path().join(wname), |ts| {
        let e = ts
            .iter_mut()
            .find(|(n, ..)| n == "weight/down_blocks.1.resnets.0.conv1.weight")
            .expect("tensor present");
        let mut v = f32s(&e.3);
        v[0] += 0.05;
        e.3 = bytes(&v);
    });
    let r = run(&[
        "verify",
        "--golden",
        s(&t.path().join("unet_plain.safetensors")),
    ]);
    let e = r.expect_err("verify must fail on perturbed UNet weights");
    let f = e
        .downcast_ref::<video_infinity::VerifyFailed>()
        .unwrap_or_else(|| panic!("not a verify failure: {e:#}"));
    assert!(f.to_string().starts_with("verify: FAIL"), "{f}");

    // CLIP: weights inside the golden file.
    let clip = t.path().join("clip_text.safetensors");
    rewrite(&golden_dir().join("clip_text.safetensors"), &clip, |ts| {
        let e = ts
            .iter_mut()
            .find(|(n, ..)| n.ends_with("encoder.layers.1.mlp.fc2.bias"))
            .expect("tensor present");
        let mut v = f32s(&e.3);
        v[3] -= 0.01;
        e.3 = bytes(&v);
    });
    let e = run(&["verify", "--golden", s(&clip)]).expect_err("perturbed CLIP must fail");
    assert!(
        e.downcast_ref::<video_infinity::VerifyFailed>().is_some(),
        "{e:#}"
    );
}

/// Bad requests: each error names the problem, and no output file appears or is lost.
#[test]
fn generate_rejects_bad_requests_before_writing() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.mp4");
    let o = s(&out);
    let base = |extra: &[&'static str]| {
        let mut v: Vec<String> = ["generate", "--model", "tiny", "--prompt", "p", "--out", o]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let err_of = |v: Vec<String>| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        err(&v)
    };
    let e = err_of(base(&["--frames", "0"]));
    assert!(e.contains("--frames must be at least 1"), "{e}");
    let e = err_of(base(&["--frames", "3", "--devices", "cpu:4"]));
    assert!(e.contains("fewer than the 4 ranks"), "{e}");
    let e = err_of(base(&["--height", "100"]));
    assert!(e.contains("--height 100 is not a multiple of 8"), "{e}");
    let e = err_of(base(&["--width", "72"]));
    assert!(e.contains("--width 72 must be a multiple of 64"), "{e}");
    let e = err_of(base(&["--devices", "cuda:0-1"]));
    assert!(
        e.contains("without CUDA support") || e.contains("CUDA"),
        "{e}"
    );
    let e = err_of(base(&["--devices", "gpu"]));
    assert!(e.contains("--devices `gpu`"), "{e}");
    // NCCL needs a GPU per rank: refused before anything is loaded or written.
    let e = err_of(base(&[
        "--frames",
        "4",
        "--devices",
        "cpu:2",
        "--comm",
        "nccl",
    ]));
    assert!(e.contains("--comm nccl"), "{e}");
    let e = err_of(base(&["--comm", "mpi"]));
    assert!(e.contains("auto, host or nccl"), "{e}");
    let e = err(&["generate", "--model", "tiny", "--prompt", "p"]);
    assert!(e.contains("nothing to write"), "{e}");
    let e = err(&["generate", "--model", "/no/such/model", "--out", o]);
    assert!(e.contains("no prompt"), "{e}");
    assert!(!out.exists());

    // Unwritable destination: reported at once.
    let bad = t.path().join("no/such/folder/x.mp4");
    let e = err(&[
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "p",
        "--out",
        s(&bad),
    ]);
    assert!(e.contains("does not exist"), "{e}");
    let ro = t.path().join("readonly");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&ro, perm).unwrap();
    // (root ignores directory write bits; only check where the OS enforces them)
    if std::fs::write(ro.join("probe"), b"x").is_err() {
        let e = err(&[
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "p",
            "--out",
            s(&ro.join("x.mp4")),
        ]);
        assert!(e.contains("cannot write"), "{e}");
    }

    // Existing output: refused without --overwrite, and left intact.
    std::fs::write(&out, b"precious").unwrap();
    let e = err_of(base(&["--frames", "2", "--steps", "1"]));
    assert!(
        e.contains("already exists") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    assert!(listing(t.path()).iter().all(|n| !n.ends_with(".partial")));
}

/// Broken model folders: missing part, missing weights, corrupt file, wrong shape, NaN.
#[test]
fn generate_rejects_broken_model_folders() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out.mp4");
    std::fs::write(&out, b"old video").unwrap();
    let gen = |dir: &Path| {
        err(&[
            "generate",
            "--model",
            s(dir),
            "--prompt",
            "p",
            "--frames",
            "2",
            "--steps",
            "1",
            "--out",
            s(&out),
            "--overwrite",
        ])
    };
    let fresh = |name: &str| {
        let d = t.path().join(name);
        run(&["write-tiny", s(&d)]).unwrap();
        d
    };

    let e = gen(&t.path().join("absent"));
    assert!(e.contains("does not exist"), "{e}");

    let d = fresh("no_vae");
    std::fs::remove_dir_all(d.join("vae")).unwrap();
    let e = gen(&d);
    assert!(e.contains("has no vae/ folder"), "{e}");

    let d = fresh("no_weights");
    std::fs::remove_file(d.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let e = gen(&d);
    assert!(e.contains("holds no .safetensors"), "{e}");

    let d = fresh("corrupt");
    let f = d.join("text_encoder/model.safetensors");
    let data = std::fs::read(&f).unwrap();
    std::fs::write(&f, &data[..data.len() / 2]).unwrap();
    let e = gen(&d);
    assert!(e.contains("model.safetensors"), "{e}");

    let d = fresh("wrong_shape");
    let f = d.join("text_encoder/model.safetensors");
    rewrite(&f, &f, |ts| {
        let e = ts
            .iter_mut()
            .find(|(n, ..)| n == "final_layer_norm.weight")
            .unwrap();
        e.2 = vec![16];
        e.3.truncate(16 * 4);
    });
    let e = gen(&d);
    assert!(
        e.contains("final_layer_norm.weight") && e.contains("[16]") && e.contains("[32]"),
        "{e}"
    );

    let d = fresh("nan");
    let f = d.join("vae/diffusion_pytorch_model.safetensors");
    rewrite(&f, &f, |ts| {
        let e = ts
            .iter_mut()
            .find(|(n, ..)| n == "decoder.conv_in.bias")
            .unwrap();
        let mut v = f32s(&e.3);
        v[1] = f32::NAN;
        e.3 = bytes(&v);
    });
    let e = gen(&d);
    assert!(
        e.contains("decoder.conv_in.bias") && e.contains("non-finite"),
        "{e}"
    );

    // A frames folder that a failed run created is removed again.
    let fd = t.path().join("never");
    let e = err(&[
        "generate",
        "--model",
        s(&t.path().join("absent")),
        "--prompt",
        "p",
        "--frames-dir",
        s(&fd),
    ]);
    assert!(e.contains("does not exist"), "{e}");
    assert!(!fd.exists(), "empty frames folder left behind");

    // None of these touched the existing output.
    assert_eq!(std::fs::read(&out).unwrap(), b"old video");
    assert!(listing(t.path()).iter().all(|n| !n.ends_with(".partial")));
}

/// `convert` on the tiny original-format checkpoint, then `inspect` and `generate` on the result:
/// the whole path from a VideoCrafter2 `model.ckpt` to a video.
#[test]
fn convert_then_inspect_then_generate() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("vc2");
    let ckpt = golden_dir().join("convert/model.ckpt");
    // The tiny checkpoint's GroupNorm groups / head sizes are not stored in it (golden convert
    // README): 4 groups, head width 8, 2 text heads.
    let args = [
        "convert",
        "--checkpoint",
        s(&ckpt),
        "--out",
        s(&model),
        "--norm-groups",
        "4",
        "--attention-head-dim",
        "8",
        "--text-heads",
        "2",
    ];
    run(&args).unwrap();
    run(&["inspect", s(&model)]).unwrap();
    // A second conversion into the same, now non-empty folder needs --overwrite.
    let e = err(&args);
    assert!(e.contains("--overwrite"), "{e}");
    let frames = t.path().join("frames");
    run(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a lighthouse",
        "--frames",
        "4",
        "--devices",
        "cpu:2",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--frames-dir",
        s(&frames),
        "--quiet",
    ])
    .unwrap();
    assert_eq!(listing(&frames).len(), 4);
}

#[test]
fn bench_runs_denoising_only() {
    run(&[
        "bench",
        "--model",
        "tiny",
        "--devices",
        "cpu:2",
        "--frames",
        "4",
        "--steps",
        "1",
        "--warmup",
        "1",
    ])
    .unwrap();
    let e = err(&["bench", "--devices", "cpu:3", "--frames", "2"]);
    assert!(e.contains("fewer than the 3 ranks"), "{e}");
}

/// `--vae`/`--tokenizer` take parts from other folders than `--model DIR`.
#[test]
fn model_parts_from_other_folders() {
    let t = tempfile::tempdir().unwrap();
    let dir = tiny_dir(t.path());
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::rename(dir.join("vae"), elsewhere.join("my_vae")).unwrap();
    std::fs::rename(dir.join("tokenizer"), elsewhere.join("tok")).unwrap();
    let out = t.path().join("f");
    let mut args = vec![
        "generate",
        "--model",
        s(&dir),
        "--frames",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--frames-dir",
        s(&out),
    ];
    args.extend_from_slice(&FAST);
    let e = err(&args);
    assert!(e.contains("has no vae/ folder"), "{e}");
    let vae = elsewhere.join("my_vae");
    let tok = elsewhere.join("tok");
    args.extend_from_slice(&["--vae", s(&vae), "--tokenizer", s(&tok)]);
    run(&args).unwrap();
    assert_eq!(listing(&out).len(), 2);
    let e = err(&[
        "generate",
        "--model",
        "tiny",
        "--vae",
        s(&vae),
        "--frames-dir",
        s(&out),
        "--overwrite",
    ]);
    assert!(e.contains("not of the tiny or random-full model"), "{e}");
}

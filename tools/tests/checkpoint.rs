//! Checkpoint and resume (issue 18), with the built binary on the tiny model (2 ranks, 4 frames,
//! 3 steps, 64x64): for each sampler and k = the first, middle and last step, a run stopped after
//! step k (a real SIGTERM from here to the in-process run; `kill -9` of worker 1 of a 2-process
//! `launch`) and resumed writes frames bit-identical to an uninterrupted run without checkpoints.
//! The stop lands exactly after step k through the test knob `VI_TEST_PAUSE_AFTER_STEP=k` (rank 0
//! sleeps once that checkpoint is in place). A resume of another request (seed, frames, weights
//! file, world size) is refused naming the field; a corrupt or truncated rank file naming the
//! file; nothing is restarted from scratch, and DIR's free space is checked before any work.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{exe, frames, Launched};

const STEPS: usize = 3;
const LIMIT: Duration = Duration::from_secs(120);

/// 2 ranks (`devices`), 4 frames, 3 steps, 64x64, frames into `frames_dir`.
fn gen_args(sampler: &str, devices: &str, frames_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "generate",
        "--model",
        "tiny",
        "--frames",
        "4",
        "--steps",
        "3",
        "--height",
        "64",
        "--width",
        "64",
        "--sampler",
        sampler,
        "--devices",
        devices,
        "--prompt",
        "a lighthouse",
        "--quiet",
        "--frames-dir",
        frames_dir.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Runs the binary to its end; returns its output (panics when it fails).
fn run_ok(args: &[String]) -> String {
    let mut l = Launched::spawn({
        let mut c = Command::new(exe());
        c.args(args);
        c
    });
    let st = l.wait(LIMIT);
    let text = l.text();
    assert!(st.success(), "{args:?} failed:\n{text}");
    text
}

/// Steps done by the checkpoint in `dir` (its manifest's `completed`).
fn completed(dir: &Path) -> usize {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    m["completed"].as_u64().unwrap() as usize
}

/// The names in the checkpoint folder `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// What a checkpoint folder holds after the checkpoint of `completed` steps: the manifest and
/// the two ranks' files of that step; no older file, no temporary.
fn only_checkpoint(dir: &Path, completed: usize) {
    assert_eq!(
        listing(dir),
        vec![
            "manifest.json".to_string(),
            format!("rank-0-step-{completed}.ckpt"),
            format!("rank-1-step-{completed}.ckpt"),
        ]
    );
}

/// `cmd` with the pause after step k; returns once rank 0 sleeps there.
fn start_paused(mut cmd: Command, k: usize) -> Launched {
    cmd.env("VI_TEST_PAUSE_AFTER_STEP", k.to_string());
    let l = Launched::spawn(cmd);
    l.wait_for_line(&format!("test pause after step {k} "), LIMIT);
    l
}

/// For `sampler`: the uninterrupted reference, then for each k a run in one process stopped by
/// SIGTERM after step k and resumed, and a 2-process `launch` whose worker 1 is killed with
/// SIGKILL after step k, resumed under `launch`: all frames equal the reference's.
fn stop_and_resume(sampler: &str) {
    let t = tempfile::tempdir().unwrap();
    let want = {
        let d = t.path().join("reference");
        run_ok(&gen_args(sampler, "cpu:2", &d, &[]));
        frames(&d)
    };
    assert_eq!(want.len(), 4);
    for k in 0..STEPS {
        // In-process, SIGTERM after step k.
        let ck = t.path().join(format!("ck-term-{k}"));
        let out = t.path().join(format!("term-{k}"));
        let ck_s = ck.to_str().unwrap();
        let mut cmd = Command::new(exe());
        cmd.args(gen_args(
            sampler,
            "cpu:2",
            &out,
            &["--checkpoint-dir", ck_s],
        ));
        let mut l = start_paused(cmd, k);
        support::signal(l.pid(), libc::SIGTERM);
        let st = l.wait(LIMIT);
        assert_eq!(st.code(), Some(143), "{}", l.text());
        assert!(!out.exists(), "an interrupted run left {}", out.display());
        assert_eq!(completed(&ck), k + 1);
        only_checkpoint(&ck, k + 1);
        let text = run_ok(&gen_args(sampler, "cpu:2", &out, &["--resume", ck_s]));
        assert!(
            text.contains(&format!("resume: {} of {STEPS} steps done", k + 1)),
            "{text}"
        );
        assert!(
            frames(&out) == want,
            "{sampler}: stopped by SIGTERM after step {k} and resumed: frames differ from the \
             uninterrupted run"
        );
        only_checkpoint(&ck, STEPS);

        // Two processes under launch, worker 1 killed with SIGKILL after step k.
        let ck = t.path().join(format!("ck-kill-{k}"));
        let out = t.path().join(format!("kill-{k}"));
        let ck_s = ck.to_str().unwrap();
        let launch = |extra: &[&str]| {
            let mut c = Command::new(exe());
            c.args([
                "launch",
                "--nproc-per-node",
                "2",
                "--master-port",
                "0",
                "--grace-period",
                "5",
                "--",
            ])
            .args(gen_args(sampler, "cpu", &out, extra));
            c
        };
        let mut l = start_paused(launch(&["--checkpoint-dir", ck_s]), k);
        let pids = l.worker_pids(2);
        support::signal(pids[1], libc::SIGKILL);
        let st = l.wait(LIMIT);
        let text = l.text();
        assert!(!st.success(), "{text}");
        assert!(text.contains("rank 1 was killed by signal 9"), "{text}");
        assert!(!out.exists(), "an interrupted run left {}", out.display());
        assert_eq!(completed(&ck), k + 1);
        only_checkpoint(&ck, k + 1);
        let mut l = Launched::spawn(launch(&["--resume", ck_s]));
        let st = l.wait(LIMIT);
        assert!(st.success(), "{}", l.text());
        assert!(
            frames(&out) == want,
            "{sampler}: worker 1 killed after step {k}, resumed under launch: frames differ from \
             the uninterrupted run"
        );
    }
}

#[test]
fn dpm_sde_stopped_after_each_step_resumes_bit_identical() {
    stop_and_resume("dpm-sde");
}

#[test]
fn dpm2m_stopped_after_each_step_resumes_bit_identical() {
    stop_and_resume("dpm2m");
}

#[test]
fn ddim_stopped_after_each_step_resumes_bit_identical() {
    stop_and_resume("ddim");
}

/// `--checkpoint-every 2` of 3 steps: checkpoints after step 2 and after the last (no pause
/// after step 0: no checkpoint there); stopped after step 2 and resumed, the frames are the
/// uninterrupted run's.
#[test]
fn checkpoint_every_second_step_and_the_last() {
    let t = tempfile::tempdir().unwrap();
    let reference = t.path().join("reference");
    run_ok(&gen_args("dpm2m", "cpu:2", &reference, &[]));
    let ck = t.path().join("ck");
    let ck_s = ck.to_str().unwrap();
    let out = t.path().join("out");
    let every = ["--checkpoint-every", "2"];
    let mut cmd = Command::new(exe());
    cmd.args(gen_args(
        "dpm2m",
        "cpu:2",
        &out,
        &[&every[..], &["--checkpoint-dir", ck_s]].concat(),
    ));
    let mut l = start_paused(cmd, 1);
    assert_eq!(completed(&ck), 2);
    support::signal(l.pid(), libc::SIGTERM);
    assert_eq!(l.wait(LIMIT).code(), Some(143), "{}", l.text());
    only_checkpoint(&ck, 2);
    let text = run_ok(&gen_args(
        "dpm2m",
        "cpu:2",
        &out,
        &[&every[..], &["--resume", ck_s]].concat(),
    ));
    assert!(text.contains("ckpt: 1 checkpoint of "), "{text}");
    assert!(frames(&out) == frames(&reference));
    only_checkpoint(&ck, STEPS);
    // A whole run: checkpoints after steps 2 and 3 only.
    let ck2 = t.path().join("ck2");
    let out2 = t.path().join("out2");
    let text = run_ok(&gen_args(
        "dpm2m",
        "cpu:2",
        &out2,
        &[&every[..], &["--checkpoint-dir", ck2.to_str().unwrap()]].concat(),
    ));
    assert!(text.contains("ckpt: 2 checkpoints of "), "{text}");
}

fn run(args: &[String]) -> Result<(), video_infinity::Error> {
    let mut v = vec!["video-infinity".to_string()];
    v.extend_from_slice(args);
    video_infinity::run(v)
}

fn err(args: &[String]) -> String {
    match run(args) {
        Ok(()) => panic!("expected an error from {args:?}"),
        Err(e) => format!("{e:#}"),
    }
}

/// `--model DIR` (a write-tiny folder) in place of `--model tiny`.
fn with_model(mut args: Vec<String>, model: &Path) -> Vec<String> {
    let i = args.iter().position(|a| a == "--model").unwrap();
    args[i + 1] = model.to_str().unwrap().to_string();
    args
}

fn set(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.to_string();
    args
}

/// Writes the tiny model's folder; returns its path.
fn tiny_folder(dir: &Path) -> PathBuf {
    run(&["write-tiny".to_string(), dir.to_str().unwrap().to_string()]).unwrap();
    dir.to_path_buf()
}

/// The folder's only `.safetensors` file under `unet/`.
fn unet_file(model: &Path) -> PathBuf {
    std::fs::read_dir(model.join("unet"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap()
}

/// Another UNet weights file with the same tensors: its header padded with 8 spaces (allowed
/// by the format; the tensors' offsets are relative to the header's end).
fn pad_header(file: &Path) {
    let b = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut out = ((n + 8) as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&b[8..8 + n]);
    out.extend_from_slice(b"        ");
    out.extend_from_slice(&b[8 + n..]);
    std::fs::write(file, out).unwrap();
}

/// A resume of another request is refused naming the field; a damaged rank file naming the file;
/// a missing checkpoint, a folder that already holds one and a disk too small are refused. No
/// refused run writes an output or changes the checkpoint.
#[test]
fn resume_refuses_another_request_or_a_damaged_file() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_folder(&t.path().join("tiny-a"));
    let other = tiny_folder(&t.path().join("tiny-b"));
    pad_header(&unet_file(&other));
    let out = t.path().join("out");
    let ck = t.path().join("ck");
    let ck_s = ck.to_str().unwrap().to_string();
    let base = with_model(gen_args("dpm-sde", "cpu:2", &out, &[]), &model);
    let mut first = base.clone();
    first.extend(["--checkpoint-dir".to_string(), ck_s.clone()]);
    run(&first).unwrap();
    assert_eq!(completed(&ck), STEPS);
    std::fs::remove_dir_all(&out).unwrap();
    let snapshot = |d: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&ck);
    let mut resume = base.clone();
    resume.extend(["--resume".to_string(), ck_s.clone()]);

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            [resume.clone(), vec!["--seed".into(), "1".into()]].concat(),
            "field `seed`: the checkpoint has 0, this run has 1",
        ),
        (
            set(resume.clone(), "--frames", "6"),
            "field `frames`: the checkpoint has 4, this run has 6",
        ),
        (with_model(resume.clone(), &other), "field `model.unet`"),
        (
            set(resume.clone(), "--devices", "cpu:1"),
            "field `world`: the checkpoint has 2 ranks, this run has 1 ranks",
        ),
    ];
    for (args, want) in cases {
        let e = err(&args);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(e.contains("the checkpoint is of another request"), "{e}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
        assert!(snapshot(&ck) == before, "{args:?} changed the checkpoint");
    }

    // A flipped byte, then a truncated file: refused naming the file.
    let rank1 = ck.join(format!("rank-1-step-{STEPS}.ckpt"));
    let good = std::fs::read(&rank1).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&rank1, &bad).unwrap();
    let e = err(&resume);
    assert!(
        e.contains(rank1.to_str().unwrap()) && e.contains("checksum mismatch"),
        "{e}"
    );
    std::fs::write(&rank1, &good[..good.len() - 100]).unwrap();
    let e = err(&resume);
    assert!(
        e.contains(rank1.to_str().unwrap()) && e.contains("truncated"),
        "{e}"
    );
    assert!(!out.exists());
    std::fs::write(&rank1, &good).unwrap();
    // A damaged manifest is named too.
    let manifest = ck.join("manifest.json");
    let m = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &m[..m.len() / 2]).unwrap();
    let e = err(&resume);
    assert!(e.contains(manifest.to_str().unwrap()), "{e}");
    std::fs::write(&manifest, &m).unwrap();

    // A fresh run into a folder holding a checkpoint, and a resume of a folder without one.
    let e = err(&first);
    assert!(
        e.contains("already holds a checkpoint") && e.contains("--resume"),
        "{e}"
    );
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let mut none = base.clone();
    none.extend(["--resume".to_string(), empty.to_str().unwrap().to_string()]);
    let e = err(&none);
    assert!(e.contains("nothing to resume"), "{e}");
    assert!(snapshot(&ck) == before);

    // Free space below two checkpoints: refused before any work, naming the folder.
    let small = t.path().join("small");
    let mut args = base.clone();
    args.extend(
        [
            "--checkpoint-dir",
            small.to_str().unwrap(),
            "--assume-free-disk",
            "1000",
        ]
        .map(String::from),
    );
    let e = err(&args);
    assert!(
        e.contains(small.to_str().unwrap()) && e.contains("needs") && e.contains("1.0 KiB"),
        "{e}"
    );
    assert!(!out.exists());

    // The intact checkpoint still resumes (decoding only: all steps were done); a temporary left
    // by a killed process is removed, one of a running process is kept.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let stale = format!(".rank-1-step-{STEPS}.ckpt.{dead}.0.partial");
    let live = format!(
        ".manifest.json.{}.0.partial",
        std::os::unix::process::parent_id()
    );
    for n in [&stale, &live] {
        std::fs::write(ck.join(n), b"partial").unwrap();
    }
    run(&resume).unwrap();
    assert_eq!(frames(&out).len(), 4);
    let l = listing(&ck);
    assert!(!l.contains(&stale) && l.contains(&live), "{l:?}");
}

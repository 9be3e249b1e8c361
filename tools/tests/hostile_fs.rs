//! Hostile file-system inputs and interrupted runs (issue 15, items 1, 2 and 4): output paths that
//! are not regular files, inputs that are FIFOs, devices or too large, signals during a run, stale
//! temporary files, a full disk. Cases that could block or grow without bound on a regression run
//! the real binary as a child process, with a deadline and a 4 GiB address-space limit.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn no_partials(dir: &Path) {
    let l = listing(dir);
    assert!(
        l.iter().all(|n| !n.contains(".partial")),
        "temporary files left in {}: {l:?}",
        dir.display()
    );
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().expect("mkfifo runs");
    assert!(st.success(), "mkfifo {}", p.display());
}

/// A child `video-infinity` process, killed when dropped (every path of a test).
struct Proc {
    child: Child,
    /// Outside the test's folder, which is listed.
    stderr: tempfile::TempPath,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts the binary under `sh` with `prelude` (shell commands, e.g. limits) run first; the
    /// address space is limited to 4 GiB so a regression cannot exhaust the machine.
    fn start(dir: &Path, prelude: &str, args: &[&str]) -> Proc {
        let stderr = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v 4194304; {prelude} exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_video-infinity"))
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn video-infinity");
        Proc { child, stderr }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `limit`; panics (after killing it) when it is still running.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "video-infinity still running after {limit:?} (blocked?); stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: sends a signal to our own child process; no memory is passed.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }
}

/// Runs the binary to completion within `limit`: (exit code, stderr).
fn child(dir: &Path, args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut p = Proc::start(dir, "", args);
    let code = p.wait(limit);
    (code, p.stderr())
}

const TINY_QUICK: [&str; 9] = [
    "generate", "--model", "tiny", "--frames", "2", "--steps", "1", "--prompt", "p",
];

/// A quick tiny-model generation taking its prompts from `file`.
fn prompts_args<'a>(file: &'a str, out: &'a str) -> Vec<&'a str> {
    let mut v: Vec<&str> = TINY_QUICK[..7].to_vec();
    v.extend_from_slice(&["--prompts", file, "--out", out]);
    v
}

fn tiny_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = TINY_QUICK.to_vec();
    v.extend_from_slice(extra);
    v
}

// --- 1. Never damage what is not ours -------------------------------------------------------------

/// `--out` naming a device (through a link), a FIFO, a socket, a folder or a dangling link is
/// refused, with --overwrite too, naming the path and its kind; nothing is touched.
#[test]
fn out_refuses_what_is_not_a_regular_file() {
    let t = tempfile::tempdir().unwrap();
    let dev = t.path().join("null.mp4");
    std::os::unix::fs::symlink("/dev/null", &dev).unwrap();
    let fifo = t.path().join("fifo.mp4");
    mkfifo(&fifo);
    let sock = t.path().join("sock.mp4");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let dir = t.path().join("dir.mp4");
    fs::create_dir(&dir).unwrap();
    let dangling = t.path().join("dangling.mp4");
    std::os::unix::fs::symlink(t.path().join("nowhere/x.mp4"), &dangling).unwrap();

    for (path, kind) in [
        (&dev, "symbolic link to a character device"),
        (&fifo, "FIFO"),
        (&sock, "socket"),
        (&dir, "directory"),
        (&dangling, "dangling symbolic link"),
    ] {
        for overwrite in [true, false] {
            let mut args = tiny_args(&["--out", s(path)]);
            if overwrite {
                args.push("--overwrite");
            }
            let e = err(&args);
            assert!(
                e.contains(s(path)) && e.contains(kind),
                "{} (--overwrite {overwrite}): {e}",
                path.display()
            );
        }
    }
    assert!(fs::symlink_metadata(&dev).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_link(&dev).unwrap(), Path::new("/dev/null"));
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(fs::metadata(&sock).unwrap().file_type().is_socket());
    assert!(fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(listing(&dir).is_empty());
    no_partials(t.path());

    // A frames folder that is a FIFO or a file is refused as such.
    let e = err(&tiny_args(&["--frames-dir", s(&fifo)]));
    assert!(e.contains(s(&fifo)) && e.contains("FIFO"), "{e}");
    let file = t.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = err(&tiny_args(&["--frames-dir", s(&file.join("frames"))]));
    assert!(
        e.contains("regular file") && e.contains("not a folder"),
        "{e}"
    );
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

/// A link to a regular file is still replaced with --overwrite (the link, not its target).
#[test]
fn out_overwrites_a_link_to_a_regular_file() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("target.mp4");
    fs::write(&target, b"old").unwrap();
    let link = t.path().join("link.mp4");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = err(&tiny_args(&["--out", s(&link)]));
    assert!(
        e.contains("already exists") && e.contains("--overwrite"),
        "{e}"
    );
    run(&tiny_args(&["--out", s(&link), "--overwrite"])).unwrap();
    assert!(fs::symlink_metadata(&link).unwrap().is_file());
    assert_eq!(fs::read(&target).unwrap(), b"old");
    no_partials(t.path());
}

// --- 2. Bounded reads, regular files only ---------------------------------------------------------

/// A prompt file that is a device, too large, or a FIFO is refused at once, naming the file.
#[test]
fn prompt_file_bounded_and_regular() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o.mp4");
    let (code, e) = child(
        t.path(),
        &prompts_args("/dev/urandom", s(&out)),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{e}");
    assert!(
        e.contains("/dev/urandom") && e.contains("character device"),
        "{e}"
    );
    let zero = t.path().join("zero.txt");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let (code, e) = child(
        t.path(),
        &prompts_args(s(&zero), s(&out)),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{e}");
    assert!(
        e.contains(s(&zero)) && e.contains("character device"),
        "{e}"
    );
    let big = t.path().join("big.txt");
    let mut text = String::from("0: a prompt\n");
    while text.len() <= 1 << 20 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    fs::write(&big, &text).unwrap();
    let e = err(&prompts_args(s(&big), s(&out)));
    assert!(
        e.contains(s(&big)) && e.contains("prompt file") && e.contains("limit of 1048576 bytes"),
        "{e}"
    );
    let fifo = t.path().join("prompts.fifo");
    mkfifo(&fifo);
    let (code, e) = child(
        t.path(),
        &prompts_args(s(&fifo), s(&out)),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains(s(&fifo)) && e.contains("FIFO"), "{e}");
    assert!(!out.exists());
    no_partials(t.path());
}

/// Weights, config and tokenizer files that are links to /dev/zero or FIFOs are refused without
/// blocking or reading them, naming the file and its kind; `inspect` and `convert` too.
#[test]
fn model_files_must_be_regular() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("m");
    run(&["write-tiny", s(&model)]).unwrap();
    let out = t.path().join("o.mp4");
    let cases: [(&str, bool); 4] = [
        ("unet/diffusion_pytorch_model.safetensors", false),
        ("vae/diffusion_pytorch_model.safetensors", true),
        ("text_encoder/config.json", true),
        ("tokenizer/vocab.json", false),
    ];
    for (rel, fifo) in cases {
        let p = model.join(rel);
        let saved = fs::read(&p).unwrap();
        fs::remove_file(&p).unwrap();
        let kind = if fifo {
            mkfifo(&p);
            "FIFO"
        } else {
            std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
            "character device"
        };
        let mut args = vec!["generate", "--model", s(&model), "--prompt", "p"];
        args.extend_from_slice(&["--frames", "2", "--steps", "1", "--out", s(&out)]);
        let (code, e) = child(t.path(), &args, Duration::from_secs(120));
        assert_eq!(code, Some(1), "{rel}: {e}");
        assert!(e.contains(rel) && e.contains(kind), "{rel}: {e}");
        if rel.ends_with(".safetensors") {
            let (code, e) = child(t.path(), &["inspect", s(&p)], Duration::from_secs(60));
            assert_ne!(code, Some(0), "{rel}: {e}");
            assert!(e.contains(rel) && e.contains(kind), "inspect {rel}: {e}");
        }
        fs::remove_file(&p).unwrap();
        fs::write(&p, saved).unwrap();
    }
    assert!(!out.exists());
    no_partials(t.path());

    // convert: a FIFO checkpoint is refused without blocking; nothing is created.
    let ckpt = t.path().join("model.ckpt");
    mkfifo(&ckpt);
    let conv = t.path().join("converted");
    let (code, e) = child(
        t.path(),
        &["convert", "--checkpoint", s(&ckpt), "--out", s(&conv)],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("model.ckpt") && e.contains("FIFO"), "{e}");
    assert!(!conv.exists());
}

/// Paths of the wrong kind say so instead of "does not exist" / "missing".
#[test]
fn wrong_kind_paths_are_named() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("m");
    run(&["write-tiny", s(&model)]).unwrap();
    let out = t.path().join("o.mp4");
    let gen = |m: &Path| {
        err(&[
            "generate",
            "--model",
            s(m),
            "--prompt",
            "p",
            "--frames",
            "2",
            "--steps",
            "1",
            "--out",
            s(&out),
        ])
    };
    let file = t.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = gen(&file);
    assert!(e.contains("is a regular file, expected a folder"), "{e}");
    let cfg = model.join("unet/config.json");
    let saved = fs::read(&cfg).unwrap();
    fs::remove_file(&cfg).unwrap();
    fs::create_dir(&cfg).unwrap();
    let e = gen(&model);
    assert!(e.contains("config.json is a directory"), "{e}");
    fs::remove_dir(&cfg).unwrap();
    fs::write(&cfg, saved).unwrap();
    fs::remove_dir_all(model.join("vae")).unwrap();
    fs::write(model.join("vae"), b"x").unwrap();
    let e = gen(&model);
    assert!(e.contains("vae is a regular file"), "{e}");
    let e = err(&[
        "convert",
        "--checkpoint",
        s(&t.path().join("m")),
        "--out",
        s(&t.path().join("c")),
    ]);
    assert!(e.contains("checkpoint is a directory"), "{e}");
    assert!(!out.exists());
}

// --- 4. Interrupted runs clean up -----------------------------------------------------------------

/// Waits until `cond` holds (polling), up to `limit`.
fn poll(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// SIGINT during denoising: no output was started, the one line says so, exit 130.
#[test]
fn sigint_during_denoising_exits_130_leaving_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mut p = Proc::start(
        t.path(),
        "",
        &[
            "generate",
            "--model",
            "tiny",
            "--frames",
            "4",
            "--steps",
            "200",
            "--prompt",
            "p",
            "--out",
            "x.mp4",
            "--frames-dir",
            "frames",
            "--quiet",
        ],
    );
    assert!(
        poll(Duration::from_secs(120), || p.stderr().contains("encode:")),
        "denoising never started: {}",
        p.stderr()
    );
    p.signal(libc::SIGINT);
    let code = p.wait(Duration::from_secs(60));
    let e = p.stderr();
    assert_eq!(code, Some(130), "{e}");
    assert!(
        e.lines()
            .any(|l| l == "interrupted by SIGINT: nothing had been written"),
        "{e}"
    );
    assert!(listing(t.path()).is_empty(), "{:?}", listing(t.path()));
}

/// SIGTERM while frames are written: the temporary file and folder are removed, named in the one
/// line; exit 143; an earlier output is left as it was.
#[test]
fn sigterm_while_writing_removes_temporaries() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("x.mp4"), b"old video").unwrap();
    let mut p = Proc::start(
        t.path(),
        "",
        &[
            "generate",
            "--model",
            "tiny",
            "--frames",
            "48",
            "--steps",
            "1",
            "--prompt",
            "p",
            "--out",
            "x.mp4",
            "--frames-dir",
            "frames",
            "--overwrite",
            "--quiet",
        ],
    );
    let partial = |d: &Path, stem: &str| {
        listing(d)
            .into_iter()
            .find(|n| n.starts_with(stem) && n.ends_with(".partial"))
    };
    // Both temporaries exist from the first frame written on.
    let seen = poll(Duration::from_secs(300), || {
        (partial(t.path(), ".x.mp4.").is_some() && partial(t.path(), ".frames.").is_some())
            || p.child.try_wait().unwrap().is_some()
    });
    let name = partial(t.path(), ".x.mp4.")
        .unwrap_or_else(|| panic!("no temporary file seen (seen={seen}): {}", p.stderr()));
    p.signal(libc::SIGTERM);
    let code = p.wait(Duration::from_secs(60));
    let e = p.stderr();
    assert_eq!(code, Some(143), "{e}");
    let line = e
        .lines()
        .find(|l| l.starts_with("interrupted by SIGTERM: removed "))
        .unwrap_or_else(|| panic!("{e}"));
    assert!(line.contains(&name) && line.contains(".frames."), "{line}");
    assert_eq!(listing(t.path()), vec!["x.mp4"]);
    assert_eq!(fs::read(t.path().join("x.mp4")).unwrap(), b"old video");
}

/// A pid that no longer runs.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// A later run removes the stale temporaries of its own destination left by a process that is
/// gone, and keeps those of a running process and other names.
#[test]
fn stale_partials_of_dead_processes_are_removed() {
    let t = tempfile::tempdir().unwrap();
    let dead = dead_pid();
    let alive = std::os::unix::process::parent_id();
    let stale_file = format!(".x.mp4.{dead}.0.partial");
    let stale_dir = format!(".frames.{dead}.3.partial");
    let live = format!(".x.mp4.{alive}.0.partial");
    let other = format!(".y.mp4.{dead}.0.partial");
    for n in [&stale_file, &live, &other] {
        fs::write(t.path().join(n), b"partial").unwrap();
    }
    fs::create_dir(t.path().join(&stale_dir)).unwrap();
    fs::write(t.path().join(&stale_dir).join("frame_00000.png"), b"x").unwrap();
    let out = t.path().join("x.mp4");
    let frames = t.path().join("frames");
    run(&tiny_args(&["--out", s(&out), "--frames-dir", s(&frames)])).unwrap();
    let l = listing(t.path());
    assert!(!l.contains(&stale_file) && !l.contains(&stale_dir), "{l:?}");
    assert!(l.contains(&live) && l.contains(&other), "{l:?}");
    assert_eq!(listing(&frames), vec!["frame_00000.png", "frame_00001.png"]);
}

/// `--frames-dir --overwrite` with fewer frames leaves exactly the new frames (and other files).
#[test]
fn frames_dir_overwrite_leaves_only_new_frames() {
    let t = tempfile::tempdir().unwrap();
    let frames = t.path().join("frames");
    let mut four = tiny_args(&["--frames-dir", s(&frames)]);
    four[4] = "4";
    run(&four).unwrap();
    fs::write(frames.join("notes.txt"), b"mine").unwrap();
    let first = fs::read(frames.join("frame_00000.png")).unwrap();
    run(&tiny_args(&[
        "--frames-dir",
        s(&frames),
        "--overwrite",
        "--seed",
        "7",
    ]))
    .unwrap();
    assert_eq!(
        listing(&frames),
        vec!["frame_00000.png", "frame_00001.png", "notes.txt"]
    );
    assert_ne!(fs::read(frames.join("frame_00000.png")).unwrap(), first);
}

/// A full disk (RLIMIT_FSIZE: a write past the size limit fails with EFBIG) names the path,
/// states the OS error once and leaves nothing half-written: the MP4 outgrows the limit midway,
/// after many frames were written (each PNG alone fits), and the frames folder keeps its old frame.
#[test]
fn full_disk_names_the_path_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir(t.path().join("frames")).unwrap();
    fs::write(t.path().join("frames/frame_00000.png"), b"old frame").unwrap();
    let old = || {
        assert_eq!(listing(&t.path().join("frames")), vec!["frame_00000.png"]);
        assert_eq!(
            fs::read(t.path().join("frames/frame_00000.png")).unwrap(),
            b"old frame"
        );
        no_partials(t.path());
        no_partials(&t.path().join("frames"));
    };
    // 40 blocks of 512 bytes (dash) or 1 KiB (bash): a 64x64 PNG (~9 KiB) fits, the MP4 of 48
    // frames (~60 KiB) does not.
    let mut p = Proc::start(
        t.path(),
        "trap '' XFSZ; ulimit -f 40;",
        &[
            "generate",
            "--model",
            "tiny",
            "--frames",
            "48",
            "--steps",
            "1",
            "--prompt",
            "p",
            "--out",
            "x.mp4",
            "--frames-dir",
            "frames",
            "--overwrite",
            "--quiet",
        ],
    );
    let code = p.wait(Duration::from_secs(120));
    let e = p.stderr();
    assert_eq!(code, Some(1), "{e}");
    let line = e.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(line.contains("x.mp4"), "{line}");
    assert_eq!(line.matches("File too large").count(), 1, "{line}");
    assert!(!t.path().join("x.mp4").exists());
    old();

    // A PNG larger than the limit: its final path is named.
    let mut p = Proc::start(
        t.path(),
        "trap '' XFSZ; ulimit -f 4;",
        &[
            "generate",
            "--model",
            "tiny",
            "--frames",
            "2",
            "--steps",
            "1",
            "--prompt",
            "p",
            "--frames-dir",
            "frames",
            "--overwrite",
            "--quiet",
        ],
    );
    let code = p.wait(Duration::from_secs(120));
    let e = p.stderr();
    assert_eq!(code, Some(1), "{e}");
    let line = e.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(line.contains("frames/frame_00000.png"), "{line}");
    assert_eq!(line.matches("File too large").count(), 1, "{line}");
    old();
}

/// Failed `write-tiny` and `convert` remove what they created.
#[test]
fn failed_write_tiny_and_convert_leave_nothing() {
    let t = tempfile::tempdir().unwrap();
    // The tiny model's weights are megabytes: a 1 MiB file size limit stops write-tiny midway.
    let mut p = Proc::start(
        t.path(),
        "trap '' XFSZ; ulimit -f 1024;",
        &["write-tiny", "a/b/m"],
    );
    let code = p.wait(Duration::from_secs(120));
    let e = p.stderr();
    assert_eq!(code, Some(1), "{e}");
    assert!(
        e.contains("cannot write the tiny model to a/b/m") && e.contains("File too large"),
        "{e}"
    );
    assert!(listing(t.path()).is_empty(), "{:?}", listing(t.path()));

    // convert of a file that is no checkpoint, into a new folder and into an existing one.
    let bogus = t.path().join("bogus.ckpt");
    fs::write(&bogus, b"not a zip file at all").unwrap();
    let e = err(&[
        "convert",
        "--checkpoint",
        s(&bogus),
        "--out",
        s(&t.path().join("new/out")),
    ]);
    assert!(e.contains("bogus.ckpt"), "{e}");
    assert!(!t.path().join("new").exists());
    let existing = t.path().join("existing");
    fs::create_dir(&existing).unwrap();
    let e = err(&["convert", "--checkpoint", s(&bogus), "--out", s(&existing)]);
    assert!(e.contains("bogus.ckpt"), "{e}");
    assert!(listing(&existing).is_empty());
}

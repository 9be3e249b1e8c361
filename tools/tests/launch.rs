//! The `launch` subcommand as a user runs it (the built binary, real worker processes): output
//! prefixed by rank, a failing or killed worker stops the others and is named, SIGTERM to the
//! launcher reaches every worker; and the binary links the C++ runtime statically.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{exe, Launched};

/// `ldd` of the binary lists only the C library's own parts (tools/build.rs links libstdc++ and
/// libgcc statically; the test binary's build links the same way as `--release`).
#[test]
fn binary_needs_only_the_c_library() {
    let out = match Command::new("ldd").arg(exe()).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: cannot run ldd ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd failed: {text}");
    let allowed = [
        "linux-vdso",
        "libc.so",
        "libm.so",
        "ld-linux",
        "libdl.so",
        "libpthread.so",
        "librt.so",
    ];
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        assert!(
            allowed
                .iter()
                .any(|a| line.starts_with(a) || line.contains(&format!("/{a}"))),
            "video-infinity needs a library beyond the C library's own: {line}\n{text}"
        );
    }
}

/// Every worker's lines come out prefixed with its rank; all succeed: the launcher succeeds.
#[test]
fn output_is_prefixed_by_rank() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let st = Command::new(exe())
        .args(["write-tiny", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(st.status.success());
    let out = Command::new(exe())
        .args([
            "launch",
            "--nproc-per-node",
            "3",
            "--master-port",
            "0",
            "--",
        ])
        .args(["inspect", model.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for rank in 0..3 {
        assert!(
            stdout.contains(&format!("[rank {rank}] ")),
            "no line of rank {rank}:\n{stdout}"
        );
    }
    assert!(
        stdout.lines().all(|l| l.starts_with("[rank ")),
        "a worker line without its rank:\n{stdout}"
    );
    // Each rank printed the same report.
    let count = |r: usize| {
        stdout
            .lines()
            .filter(|l| l.starts_with(&format!("[rank {r}] ")))
            .count()
    };
    assert_eq!(count(0), count(2), "{stdout}");
}

/// A worker that fails makes the launcher fail, naming a rank and how it ended.
#[test]
fn failing_worker_fails_the_launch() {
    let out = Command::new(exe())
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            "0",
            "--",
        ])
        .args(["inspect", "/nonexistent/model"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("error: rank 0 exited with status 1")
            || stderr.contains("error: rank 1 exited with status 1"),
        "{stderr}"
    );
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
}

/// Arguments the launcher refuses before starting anything.
#[test]
fn bad_launch_arguments() {
    let run = |args: &[&str]| {
        let out = Command::new(exe()).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--",
        "inspect",
        "x",
    ]);
    assert!(e.contains("--master-addr"), "{e}");
    let e = run(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "2",
        "--master-addr",
        "h",
        "--",
        "inspect",
        "x",
    ]);
    assert!(e.contains("--node-rank 2"), "{e}");
    let e = run(&["launch", "--nproc-per-node", "2", "--"]);
    assert!(e.contains("nothing to launch"), "{e}");
    let e = run(&["launch", "--nproc-per-node", "2", "--", "launch"]);
    assert!(e.contains("cannot be `launch`"), "{e}");
}

/// A long worker run for the signal tests (never reaches its end in the test's time).
fn long_generate(dir: &std::path::Path) -> Vec<String> {
    [
        "generate",
        "--model",
        "tiny",
        "--frames",
        "8",
        "--steps",
        "1000",
        "--quiet",
        "--frames-dir",
        dir.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// `kill -9` of one worker: the launcher stops the others and exits non-zero naming that rank.
#[test]
fn killed_worker_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Launched::start(
        &["--nproc-per-node", "3"],
        &long_generate(&dir.path().join("f")),
    );
    let pids = l.worker_pids(3);
    // Let the workers get into their steps.
    l.wait_for_line("encode:", Duration::from_secs(20));
    support::signal(pids[1], libc::SIGKILL);
    let t = Instant::now();
    let status = l.wait(Duration::from_secs(30));
    assert!(!status.success());
    let text = l.text();
    assert!(
        text.contains("error: rank 1 was killed by signal 9 (SIGKILL)"),
        "{text}"
    );
    for (r, &p) in pids.iter().enumerate() {
        assert!(!support::alive(p), "rank {r} (pid {p}) still runs\n{text}");
    }
    assert!(t.elapsed() < Duration::from_secs(30));
}

/// SIGTERM to the launcher is forwarded: every worker ends, the launcher exits non-zero.
#[test]
fn sigterm_is_forwarded_to_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Launched::start(
        &["--nproc-per-node", "2"],
        &long_generate(&dir.path().join("f")),
    );
    let pids = l.worker_pids(2);
    l.wait_for_line("encode:", Duration::from_secs(20));
    support::signal(l.pid(), libc::SIGTERM);
    let status = l.wait(Duration::from_secs(30));
    assert!(!status.success());
    let text = l.text();
    assert!(text.contains("received SIGTERM: forwarding it"), "{text}");
    assert!(text.contains("interrupted by SIGTERM"), "{text}");
    for (r, &p) in pids.iter().enumerate() {
        assert!(!support::alive(p), "rank {r} (pid {p}) still runs\n{text}");
    }
}

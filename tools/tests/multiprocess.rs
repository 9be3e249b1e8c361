//! `generate` as one process per rank (the built binary, real processes over 127.0.0.1, the tiny
//! model on the CPU): through `launch` and through a plain shell loop that sets torchrun's
//! variables, the decoded frames (overlapped exchange schedule, the default) are bit-identical to
//! the in-process run with the same number of ranks and the synchronous schedule; a mismatched
//! request fails on every rank naming the field; an unreachable store fails within the timeout
//! naming host:port; a port in use is a clear error; `kill -9` of a worker mid-step makes every
//! other process exit non-zero naming the dead rank, leaving no partial output.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{exe, frames, Launched};

/// Small and quick: 2 frames per rank, 2 steps, 64x64.
fn gen_args(world: usize, devices: &str, frames_dir: &Path) -> Vec<String> {
    [
        "generate",
        "--model",
        "tiny",
        "--frames",
        &(2 * world).to_string(),
        "--steps",
        "2",
        "--devices",
        devices,
        "--prompt",
        "a lighthouse",
        "--quiet",
        "--frames-dir",
        frames_dir.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// The reference: the same request as one process, with the synchronous exchange schedule
/// (`--sync-exchange`), so that the processes' overlapped schedule (the default: TCP exchanges
/// started early and waited later) is checked against the blocking one, bit for bit.
fn in_process(world: usize, dir: &Path) -> Vec<Vec<u8>> {
    in_process_with(world, dir, &[])
}

/// [`in_process`] with `extra` arguments.
fn in_process_with(world: usize, dir: &Path, extra: &[&str]) -> Vec<Vec<u8>> {
    let out = Command::new(exe())
        .args(gen_args(world, &format!("cpu:{world}"), dir))
        .args(extra)
        .arg("--sync-exchange")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    frames(dir)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A port nobody listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `world` processes started directly with torchrun's variables (what a shell loop does);
/// `args(rank)` gives each its arguments. Returns each process's output, in rank order.
fn by_hand(world: usize, args: impl Fn(usize) -> Vec<String>) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<Launched> = (0..world)
        .map(|r| {
            let mut c = Command::new(exe());
            c.args(args(r))
                .env("VI_HEAP_PEAK", "1")
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port);
            Launched::spawn(c)
        })
        .collect();
    children
        .into_iter()
        .map(|mut l| {
            let status = l.wait(Duration::from_secs(120));
            Output {
                status,
                stdout: Vec::new(),
                stderr: l.text().into_bytes(),
            }
        })
        .collect()
}

/// Runs `launch --nproc-per-node N -- generate ... --devices cpu EXTRA` for W = N and checks the
/// frames.
fn through_launch(world: usize, extra: &[&str]) {
    let t = tempfile::tempdir().unwrap();
    let want = in_process_with(world, &t.path().join("in"), extra);
    assert_eq!(want.len(), 2 * world);
    let got_dir = t.path().join("launch");
    let out = Command::new(exe())
        .args([
            "launch",
            "--nproc-per-node",
            &world.to_string(),
            "--master-port",
            "0",
            "--",
        ])
        .args(gen_args(world, "cpu", &got_dir))
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        frames(&got_dir) == want,
        "W={world} {extra:?}: frames differ from the in-process run"
    );
}

#[test]
fn launch_2_workers_match_in_process() {
    through_launch(2, &[]);
}

#[test]
fn launch_3_workers_match_in_process() {
    through_launch(3, &[]);
}

/// Exact-seam GroupNorm: the overlapped schedule also has a statistics all-gather and a raw-edge
/// halo exchange in flight together (over TCP here).
#[test]
fn launch_3_workers_with_exact_seam_match_in_process() {
    through_launch(3, &["--exact-seam"]);
}

#[test]
fn launch_4_workers_match_in_process() {
    through_launch(4, &[]);
}

/// Two processes in the overlapped exchange schedule (the default) on clips of 10 frames (the
/// conv layers' edge frames are sent before the rest of each clip is computed) give the video of
/// two in-process ranks in the synchronous schedule (`--sync-exchange`), bit for bit.
#[test]
fn overlapped_processes_match_the_synchronous_schedule_in_process() {
    let t = tempfile::tempdir().unwrap();
    let args = |devices: &str, dir: &Path| {
        let mut a = gen_args(2, devices, dir);
        set_flag(&mut a, "--frames", "20");
        set_flag(&mut a, "--steps", "1");
        a
    };
    let sync_dir = t.path().join("sync");
    let out = Command::new(exe())
        .args(args("cpu:2", &sync_dir))
        .arg("--sync-exchange")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let want = frames(&sync_dir);
    assert_eq!(want.len(), 20);
    let got_dir = t.path().join("launch");
    let out = Command::new(exe())
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            "0",
            "--",
        ])
        .args(args("cpu", &got_dir))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        frames(&got_dir) == want,
        "frames differ from the synchronous in-process run"
    );
}

/// Two processes of two logical ranks each (`--devices cpu:4` split over the node's processes)
/// give the 4-rank in-process video.
#[test]
fn processes_holding_two_ranks_each_match_in_process() {
    let t = tempfile::tempdir().unwrap();
    let want = in_process(4, &t.path().join("in"));
    let got_dir = t.path().join("launch");
    let out = Command::new(exe())
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            "0",
            "--",
        ])
        .args(gen_args(4, "cpu:4", &got_dir))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        frames(&got_dir) == want,
        "frames differ from the in-process run"
    );
}

/// Two processes of two logical ranks each under a budget whose schedule makes the ranks of a
/// device take turns (each process plans its own two ranks: unconstrained about 80 MiB, with
/// turns about 45 MiB): the turns are shared by the process's ranks over the TCP exchanges
/// (no rank waits for a turn held by a rank blocked in a collective) and the video is the
/// 4-rank in-process one.
#[test]
fn processes_whose_ranks_take_turns_match_in_process() {
    let t = tempfile::tempdir().unwrap();
    let want = in_process(4, &t.path().join("in"));
    let got_dir = t.path().join("launch");
    let out = Command::new(exe())
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            "0",
            "--",
        ])
        .args(gen_args(4, "cpu:4", &got_dir))
        .args(["--memory-budget", "50M", "--rank-timeout", "60"])
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("schedule: ranks of a device take turns")),
        "the budget no longer selects rank turns (re-derive it from the plan):\n{log}"
    );
    assert!(
        frames(&got_dir) == want,
        "frames differ from the in-process run"
    );
}

/// The peak of the live heap a process printed (`VI_HEAP_PEAK=1`: `heap peak: N bytes`).
fn heap_peak(o: &Output) -> u64 {
    let t = text(o);
    t.lines()
        .find_map(|l| {
            l.strip_prefix("heap peak: ")?
                .strip_suffix(" bytes")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no heap peak printed:\n{t}"))
}

/// Two processes of two logical ranks each (`--devices cpu:4`), each run under a schedule pinned
/// with and without turns, each process reporting its heap peak (`VI_HEAP_PEAK`): with turns,
/// only one of a process's two ranks holds its transients at a time, so each process's peak is
/// lower by a good part of a rank's transients; a process that ignored the turns would peak as
/// high as without them. The videos are the same.
#[test]
fn processes_taking_turns_hold_less_than_without_turns() {
    let t = tempfile::tempdir().unwrap();
    let run = |schedule: &str, dir: &Path| -> Vec<u64> {
        let outs = by_hand(2, |_| {
            let mut a = gen_args(4, "cpu:4", dir);
            set_flag(&mut a, "--frames", "16");
            a.extend(
                [
                    "--height",
                    "128",
                    "--width",
                    "128",
                    "--schedule",
                    schedule,
                    "--rank-timeout",
                    "60",
                ]
                .map(String::from),
            );
            a
        });
        outs.iter()
            .enumerate()
            .map(|(r, o)| {
                assert!(o.status.success(), "process {r}, {schedule}:\n{}", text(o));
                heap_peak(o)
            })
            .collect()
    };
    // Chunks of 1 frame and sequential CFG rows: a rank's transients are small, so what turns
    // save (the other rank's pass) is what separates the two runs.
    let (with_dir, without_dir) = (t.path().join("turns"), t.path().join("concurrent"));
    let with = run("chunk=1,sequential-cfg,turns", &with_dir);
    let without = run("chunk=1,sequential-cfg", &without_dir);
    eprintln!("heap peaks per process: with turns {with:?}, without {without:?}");
    for p in 0..2 {
        assert!(
            with[p] * 10 < without[p] * 9,
            "process {p}: with turns {} B, without {} B: the turns save less than 10 %",
            with[p],
            without[p]
        );
    }
    assert!(
        frames(&with_dir) == frames(&without_dir),
        "the videos differ"
    );
}

/// Unequal clips (5 frames over 2 processes: 3 and 2) under a budget where the process of the
/// 3-frame clip needs frames in chunks, sequential CFG rows and offload (a spill file each) and
/// the other needs nothing: the
/// job runs the merge of the two choices on both (before, each ran its own choice and the
/// digests differed: `request differs between ranks: field sequential_cfg`), and the video is
/// the in-process one.
#[test]
fn processes_with_unequal_clips_run_one_schedule() {
    let t = tempfile::tempdir().unwrap();
    let (want_dir, got_dir) = (t.path().join("in"), t.path().join("by-hand"));
    let mut a = gen_args(2, "cpu:2", &want_dir);
    set_flag(&mut a, "--frames", "5");
    let o = Command::new(exe()).args(&a).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let outs = by_hand(2, |_| {
        let mut a = gen_args(2, "cpu", &got_dir);
        set_flag(&mut a, "--frames", "5");
        a.extend(["--memory-budget", "45M", "--rank-timeout", "60"].map(String::from));
        a
    });
    let logs: Vec<String> = outs.iter().map(text).collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "process {r}:\n{}", logs[r]);
    }
    let chosen =
        "frames in chunks of 2, CFG rows sequential, long-lived tensors offloaded (to host \
                  memory; a spill file on the CPU)";
    assert!(
        logs[0].contains(&format!("schedule: {chosen}: planned peak")),
        "process 0 (3 frames) no longer needs {chosen} under 45M (re-derive the budget from \
         `--plan-only` with RANK=0/1):\n{}",
        logs[0]
    );
    assert!(
        logs[1].contains(&format!(
            "the job's: {chosen} (another process needs it; this one chose unconstrained"
        )),
        "process 1 (2 frames) does not run the job's schedule:\n{}",
        logs[1]
    );
    assert!(
        frames(&got_dir) == frames(&want_dir),
        "frames differ from the in-process run"
    );
}

/// The README's shell loop: `RANK=$r ... video-infinity generate ... &` for each rank, then wait.
fn through_shell_loop(world: usize) {
    let t = tempfile::tempdir().unwrap();
    let want = in_process(world, &t.path().join("in"));
    let got_dir = t.path().join("loop");
    // Single-quoted for sh (no argument holds a quote).
    let args: Vec<String> = gen_args(world, "cpu", &got_dir)
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    let args = args.join(" ");
    let script = format!(
        "export WORLD_SIZE={world} LOCAL_WORLD_SIZE={world} MASTER_ADDR=127.0.0.1 MASTER_PORT={port}
         pids=
         for r in $(seq 0 {last}); do
           RANK=$r LOCAL_RANK=$r '{exe}' {args} &
           pids=\"$pids $!\"
         done
         fail=0
         for p in $pids; do wait $p || fail=1; done
         exit $fail",
        port = free_port(),
        last = world - 1,
        exe = exe().display(),
    );
    let mut l = Launched::spawn({
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    });
    let status = l.wait(Duration::from_secs(120));
    assert!(status.success(), "{}", l.text());
    assert!(
        frames(&got_dir) == want,
        "W={world}: frames differ from the in-process run"
    );
}

#[test]
fn shell_loop_2_processes_match_in_process() {
    through_shell_loop(2);
}

#[test]
fn shell_loop_3_processes_match_in_process() {
    through_shell_loop(3);
}

#[test]
fn shell_loop_4_processes_match_in_process() {
    through_shell_loop(4);
}

/// SLURM's and Open MPI's variables (no torchrun variable set) start the same 2-rank job: srun's
/// compressed node list gives the store's host, mpirun's needs MASTER_ADDR/MASTER_PORT.
#[test]
fn slurm_and_open_mpi_variables_match_in_process() {
    let t = tempfile::tempdir().unwrap();
    let want = in_process(2, &t.path().join("in"));
    let slurm_port = free_port().to_string();
    let ompi_port = free_port().to_string();
    for (name, vars) in [
        (
            "slurm",
            vec![
                ("SLURM_PROCID", "{r}"),
                ("SLURM_LOCALID", "{r}"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_NODEID", "0"),
                ("SLURM_STEP_TASKS_PER_NODE", "2(x1)"),
                ("SLURM_STEP_NODELIST", "localhost"),
                ("MASTER_PORT", slurm_port.as_str()),
            ],
        ),
        (
            "ompi",
            vec![
                ("OMPI_COMM_WORLD_RANK", "{r}"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "{r}"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", ompi_port.as_str()),
            ],
        ),
    ] {
        let dir = t.path().join(name);
        let procs: Vec<Launched> = (0..2)
            .map(|r| {
                let mut c = Command::new(exe());
                c.args(gen_args(2, "cpu", &dir))
                    .args(["--rank-timeout", "60"]);
                for (k, v) in &vars {
                    c.env(k, v.replace("{r}", &r.to_string()));
                }
                Launched::spawn(c)
            })
            .collect();
        for (r, mut p) in procs.into_iter().enumerate() {
            let status = p.wait(Duration::from_secs(120));
            assert!(status.success(), "{name} rank {r}:\n{}", p.text());
        }
        assert!(
            frames(&dir) == want,
            "{name}: frames differ from the in-process run"
        );
    }
}

/// Each process of a 2-process run where rank 1 was given other settings fails, naming the field;
/// nothing was written.
#[test]
fn mismatched_request_fails_on_every_rank() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("tiny");
    let st = Command::new(exe())
        .args(["write-tiny", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(st.status.success());
    let out_dir = t.path().join("out");
    let cases: [(&str, &[&str]); 3] = [
        ("frames", &["--frames", "6"]),
        ("seed", &["--seed", "7"]),
        ("model", &["--model", model.to_str().unwrap()]),
    ];
    for (field, change) in cases {
        let outs = by_hand(2, |r| {
            let mut a = gen_args(2, "cpu", &out_dir);
            a.extend(["--rank-timeout", "20"].map(String::from));
            if r == 1 {
                set_flag(&mut a, change[0], change[1]);
            }
            a
        });
        for (r, o) in outs.iter().enumerate() {
            let e = text(o);
            assert!(
                !o.status.success(),
                "rank {r} succeeded with {change:?}:\n{e}"
            );
            assert!(
                e.contains(&format!("field `{field}`")),
                "rank {r}, {change:?}: the field is not named:\n{e}"
            );
        }
        assert!(!out_dir.exists(), "{change:?}: outputs were written");
    }
}

/// Replaces the value of `flag` in `args` (appends the pair if absent).
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
}

/// A rank whose store never answers fails within its timeout, naming host:port.
#[test]
fn unreachable_store_fails_within_the_timeout() {
    let t = tempfile::tempdir().unwrap();
    let port = free_port();
    let start = Instant::now();
    let out = Command::new(exe())
        .args(gen_args(2, "cpu", &t.path().join("f")))
        .args(["--rank-timeout", "2"])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "1")
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .output()
        .unwrap();
    let e = text(&out);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
}

/// Rank 0 cannot serve the store on a port already taken: a clear error naming it.
#[test]
fn port_in_use_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(exe())
        .args(gen_args(2, "cpu", &t.path().join("f")))
        .args(["--rank-timeout", "5"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .output()
        .unwrap();
    let e = text(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains(&format!("127.0.0.1:{port} is in use")),
        "the error does not say the port is in use:\n{e}"
    );
    drop(taken);
}

/// A long run (never reaches its end within the test).
fn long_run(world: usize, out: &Path) -> Vec<String> {
    [
        "generate",
        "--model",
        "tiny",
        "--frames",
        &(4 * world).to_string(),
        "--steps",
        "1000",
        "--devices",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Files left in `dir` (the output's folder).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// `kill -9` of rank 1 mid-step under `launch`: the launcher and every worker exit non-zero within
/// 30 s, the launcher names rank 1; no output file (partial or not) is left.
#[test]
fn kill_9_of_a_worker_under_launch() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("video.mp4");
    let mut l = Launched::start(&["--nproc-per-node", "3"], &long_run(3, &out));
    let pids = l.worker_pids(3);
    l.wait_for_line("[rank 0]   encode:", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    support::signal(pids[1], libc::SIGKILL);
    let start = Instant::now();
    let status = l.wait(Duration::from_secs(30));
    assert!(!status.success());
    let text = l.text();
    assert!(
        text.contains("error: rank 1 was killed by signal 9 (SIGKILL)"),
        "{text}"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    for (r, &p) in pids.iter().enumerate() {
        assert!(!support::alive(p), "rank {r} still runs\n{text}");
    }
    assert!(
        leftovers(t.path()).is_empty(),
        "left: {:?}\n{text}",
        leftovers(t.path())
    );
}

/// `kill -9` of rank 1 of processes started by hand (no launcher to stop the others): ranks 0
/// and 2 fail on their own within 30 s, each naming rank 1; rank 0 leaves no output file.
#[test]
fn kill_9_of_a_process_without_launcher() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("video.mp4");
    let port = free_port().to_string();
    let mut procs: Vec<Launched> = (0..3)
        .map(|r| {
            let mut c = Command::new(exe());
            c.args(long_run(3, &out))
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "3")
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", "3")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port);
            Launched::spawn(c)
        })
        .collect();
    procs[0].wait_for_line("  encode:", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    support::signal(procs[1].pid(), libc::SIGKILL);
    let start = Instant::now();
    for r in [0, 2] {
        let status = procs[r].wait(Duration::from_secs(30));
        let text = procs[r].text();
        assert!(!status.success(), "rank {r}:\n{text}");
        assert!(
            text.contains("rank 1"),
            "rank {r} does not name rank 1:\n{text}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(
        leftovers(t.path()).is_empty(),
        "left: {:?}",
        leftovers(t.path())
    );
}

//! `launch`: starts this node's worker processes (the current executable, running the subcommand
//! after `--`) with torchrun's environment, prefixes their output with their rank, and supervises
//! them: the first worker that fails or is killed stops the others (SIGTERM, then SIGKILL after
//! the grace period) and the launcher exits non-zero with a line naming that rank. SIGINT/SIGTERM
//! sent to the launcher are forwarded to every worker, and the launcher waits for them.
//!
//! Workers run in their own process group (a terminal's Ctrl-C reaches them once, through the
//! launcher) and get SIGTERM should the launcher itself die.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cli::LaunchArgs;

/// How often the launcher looks at its workers and at received signals.
const POLL: Duration = Duration::from_millis(20);

/// The environment torchrun gives worker `local_rank` of node `node_rank`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub group_rank: usize,
    pub group_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl WorkerEnv {
    /// Global rank = node_rank * nproc_per_node + local_rank (nodes hold equal numbers of workers).
    pub fn new(
        nproc_per_node: usize,
        nnodes: usize,
        node_rank: usize,
        local_rank: usize,
        master_addr: &str,
        master_port: u16,
    ) -> WorkerEnv {
        WorkerEnv {
            rank: node_rank * nproc_per_node + local_rank,
            world_size: nnodes * nproc_per_node,
            local_rank,
            local_world_size: nproc_per_node,
            group_rank: node_rank,
            group_world_size: nnodes,
            master_addr: master_addr.to_string(),
            master_port,
        }
    }

    /// The variables, as torchrun names them.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("GROUP_RANK", self.group_rank.to_string()),
            ("GROUP_WORLD_SIZE", self.group_world_size.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }
}

/// How a worker ended, in words: `exited with status 1`, `was killed by signal 9 (SIGKILL)`.
pub fn describe_exit(s: &ExitStatus) -> String {
    if let Some(code) = s.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = s.signal() {
        format!("was killed by signal {sig} ({})", signal_name(sig))
    } else {
        format!("ended ({s})")
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// A port on `addr` that was free a moment ago (bound to port 0, then released).
fn free_port(addr: &str) -> Result<u16> {
    let l = TcpListener::bind((addr, 0))
        .with_context(|| format!("--master-port 0: cannot bind a port on {addr}"))?;
    Ok(l.local_addr()?.port())
}

struct Worker {
    env: WorkerEnv,
    child: Child,
    status: Option<ExitStatus>,
    /// The launcher signalled it (its end is a consequence, not a cause).
    stopped: bool,
}

impl Worker {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&mut self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) with the pid of a child not yet reaped (its status is unknown, so the
            // pid cannot have been reused); no memory is passed.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// Reaps the worker if it has ended; true when it had not ended before this call.
    fn poll(&mut self) -> Result<bool> {
        if self.status.is_some() {
            return Ok(false);
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.status = Some(s);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot wait for rank {}", self.env.rank)),
        }
    }
}

/// Copies `from` line by line to the launcher's stdout or stderr, each line prefixed `[rank R] `
/// (a line is written whole, under the stream's lock). Carriage returns also end a line, so a
/// progress bar redrawn in place becomes a sequence of lines.
fn pump(rank: usize, from: impl Read + Send + 'static, to_stderr: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let prefix = format!("[rank {rank}] ");
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match read_line(&mut r, &mut line) {
                Ok(n) => n,
                Err(_) => return,
            };
            if n == 0 {
                return;
            }
            if line.iter().all(|&b| b == b'\r' || b == b'\n') {
                // A bare carriage return (a redraw); keep real empty lines.
                if line != b"\n" {
                    continue;
                }
            }
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            let mut out = Vec::with_capacity(prefix.len() + line.len() + 1);
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(&line);
            out.push(b'\n');
            // A closed launcher stream (e.g. piped into `head`) must not stop the worker: keep
            // draining its pipe.
            let _ = if to_stderr {
                std::io::stderr().lock().write_all(&out)
            } else {
                std::io::stdout().lock().write_all(&out)
            };
        }
    })
}

/// Reads up to and including the next `\n` or `\r` into `buf`; the number of bytes read.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut n = 0;
    loop {
        let (done, used) = {
            let avail = match r.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                return Ok(n);
            }
            match avail.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    buf.extend_from_slice(&avail[..=i]);
                    (true, i + 1)
                }
                None => {
                    buf.extend_from_slice(avail);
                    (false, avail.len())
                }
            }
        };
        r.consume(used);
        n += used;
        if done {
            return Ok(n);
        }
    }
}

fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "launch: {line}");
}

/// Runs `launch`.
pub fn run(a: LaunchArgs) -> Result<()> {
    ensure!(a.nproc_per_node >= 1, "--nproc-per-node must be at least 1");
    ensure!(a.nnodes >= 1, "--nnodes must be at least 1");
    ensure!(
        a.node_rank < a.nnodes,
        "--node-rank {} is not below --nnodes {}",
        a.node_rank,
        a.nnodes
    );
    ensure!(
        a.grace_period.is_finite() && a.grace_period >= 0.0,
        "--grace-period must be a number of seconds >= 0"
    );
    let master_addr = match (&a.master_addr, a.nnodes) {
        (Some(h), _) => h.clone(),
        (None, 1) => "127.0.0.1".to_string(),
        (None, _) => bail!(
            "--nnodes {} needs --master-addr: the address of node 0 (where rank 0 serves the \
             rendezvous store), the same on every node",
            a.nnodes
        ),
    };
    let master_port = match a.master_port {
        0 if a.nnodes > 1 => bail!(
            "--master-port 0 (a free port) works on one node only: with --nnodes {} every node \
             must be given the same port",
            a.nnodes
        ),
        0 => free_port(&master_addr)?,
        p => p,
    };
    let Some(sub) = a.command.first() else {
        bail!("nothing to launch: give the worker's subcommand after `--`, e.g. `-- generate ...`");
    };
    ensure!(
        sub != "launch",
        "`launch -- launch ...`: the workers' subcommand cannot be `launch` itself"
    );
    let exe = std::env::current_exe().context("cannot find this executable to start workers")?;

    // Signals received by the launcher (the number of the last one, 0: none).
    let got = Arc::new(AtomicUsize::new(0));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        signal_hook::flag::register_usize(sig, Arc::clone(&got), sig as usize)
            .context("cannot install the SIGINT/SIGTERM handler")?;
    }

    let world = a.nnodes * a.nproc_per_node;
    say(&format!(
        "{} worker(s) on node {} of {} (ranks {}..{} of {world}), rendezvous {master_addr}:{master_port}",
        a.nproc_per_node,
        a.node_rank,
        a.nnodes,
        a.node_rank * a.nproc_per_node,
        (a.node_rank + 1) * a.nproc_per_node - 1,
    ));

    let mut workers: Vec<Worker> = Vec::new();
    let mut pumps = Vec::new();
    for local in 0..a.nproc_per_node {
        let env = WorkerEnv::new(
            a.nproc_per_node,
            a.nnodes,
            a.node_rank,
            local,
            &master_addr,
            master_port,
        );
        let mut cmd = Command::new(&exe);
        cmd.args(&a.command)
            .envs(env.vars())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: runs in the forked child before exec; prctl(2) is async-signal-safe and touches
        // no memory of the parent. The worker gets SIGTERM when the launcher's thread that forked
        // it (this, the main thread, which lives until every worker is reaped) ends.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(mut child) => {
                let out = child.stdout.take().expect("piped");
                let err = child.stderr.take().expect("piped");
                say(&format!("rank {} is pid {}", env.rank, child.id()));
                pumps.push(pump(env.rank, out, false));
                pumps.push(pump(env.rank, err, true));
                workers.push(Worker {
                    env,
                    child,
                    status: None,
                    stopped: false,
                });
            }
            Err(e) => {
                stop_all(&mut workers, libc::SIGTERM, a.grace_period, &got);
                return Err(e).with_context(|| {
                    format!("cannot start rank {} ({})", env.rank, exe.display())
                });
            }
        }
    }

    let outcome = supervise(&mut workers, a.grace_period, &got);
    for p in pumps {
        let _ = p.join();
    }
    outcome
}

/// Waits for the workers; see the module comment.
fn supervise(workers: &mut [Worker], grace: f64, got: &AtomicUsize) -> Result<()> {
    loop {
        let sig = got.swap(0, Ordering::SeqCst) as i32;
        if sig != 0 {
            say(&format!(
                "received {}: forwarding it to the workers",
                signal_name(sig)
            ));
            stop_all(workers, sig, grace, got);
            report(workers);
            bail!(
                "interrupted by {}: the workers were stopped",
                signal_name(sig)
            );
        }
        let mut ended = Vec::new();
        for (i, w) in workers.iter_mut().enumerate() {
            if w.poll()? {
                ended.push(i);
            }
        }
        // Of the workers that failed since the last look, the cause is most likely one killed by
        // a signal (its peers fail because it is gone), else the lowest rank.
        let failed = ended
            .iter()
            .copied()
            .filter(|&i| !workers[i].status.expect("reaped").success())
            .min_by_key(|&i| {
                (
                    workers[i].status.expect("reaped").signal().is_none(),
                    workers[i].env.rank,
                )
            });
        if let Some(i) = failed {
            let (rank, pid) = (workers[i].env.rank, workers[i].pid());
            let how = describe_exit(&workers[i].status.expect("reaped"));
            say(&format!(
                "rank {rank} (pid {pid}) {how}: stopping the other workers"
            ));
            stop_all(workers, libc::SIGTERM, grace, got);
            report(workers);
            bail!("rank {rank} {how}; the other workers were stopped");
        }
        if workers.iter().all(|w| w.status.is_some()) {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `sig` to every running worker, waits up to `grace` seconds for them (a further SIGINT or
/// SIGTERM to the launcher cuts the wait short), then SIGKILLs and reaps the rest.
fn stop_all(workers: &mut [Worker], sig: i32, grace: f64, got: &AtomicUsize) {
    for w in workers.iter_mut() {
        if w.status.is_none() {
            w.stopped = true;
            w.signal(sig);
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(grace);
    loop {
        let mut running = 0;
        for w in workers.iter_mut() {
            let _ = w.poll();
            running += w.status.is_none() as usize;
        }
        if running == 0 {
            return;
        }
        if Instant::now() >= deadline || got.swap(0, Ordering::SeqCst) != 0 {
            break;
        }
        std::thread::sleep(POLL);
    }
    for w in workers.iter_mut() {
        if w.status.is_none() {
            say(&format!(
                "rank {} (pid {}) still running: SIGKILL",
                w.env.rank,
                w.pid()
            ));
            w.signal(libc::SIGKILL);
            match w.child.wait() {
                Ok(s) => w.status = Some(s),
                Err(e) => say(&format!("cannot wait for rank {}: {e}", w.env.rank)),
            }
        }
    }
}

/// One line per worker that did not end cleanly on its own.
fn report(workers: &[Worker]) {
    for w in workers {
        if let Some(s) = &w.status {
            if !s.success() {
                say(&format!(
                    "rank {} {}{}",
                    w.env.rank,
                    describe_exit(s),
                    if w.stopped { " (stopped)" } else { "" }
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_env_is_torchruns() {
        let e = WorkerEnv::new(4, 3, 2, 1, "node0", 29500);
        let v: std::collections::HashMap<_, _> = e.vars().into_iter().collect();
        assert_eq!(v["RANK"], "9");
        assert_eq!(v["WORLD_SIZE"], "12");
        assert_eq!(v["LOCAL_RANK"], "1");
        assert_eq!(v["LOCAL_WORLD_SIZE"], "4");
        assert_eq!(v["GROUP_RANK"], "2");
        assert_eq!(v["GROUP_WORLD_SIZE"], "3");
        assert_eq!(v["MASTER_ADDR"], "node0");
        assert_eq!(v["MASTER_PORT"], "29500");
    }

    #[test]
    fn lines_end_at_newline_or_carriage_return() {
        let mut r = BufReader::with_capacity(3, &b"ab\rcdef\nlast"[..]);
        let mut lines = Vec::new();
        loop {
            let mut buf = Vec::new();
            if read_line(&mut r, &mut buf).unwrap() == 0 {
                break;
            }
            lines.push(String::from_utf8(buf).unwrap());
        }
        assert_eq!(lines, ["ab\r", "cdef\n", "last"]);
    }
}

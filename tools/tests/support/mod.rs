//! Running the built `video-infinity` binary as child processes: a launcher whose output is
//! collected as it comes, killed (with its workers) when the test ends on any path.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_video-infinity"))
}

/// The decoded RGB8 pixels of every `frame_*.png` in `dir`, in order.
pub fn frames(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
            let mut r = dec.read_info().unwrap();
            let mut buf = vec![0; r.output_buffer_size().unwrap()];
            let info = r.next_frame(&mut buf).unwrap();
            buf.truncate(info.buffer_size());
            buf
        })
        .collect()
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (a worker or the launcher); no memory is passed.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether `pid` is a live process (a zombie counts as ended).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; the command name before it is in parentheses.
        Ok(s) => !matches!(
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

/// Collects the lines of `from` into `into`.
fn collect(from: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            into.lock().unwrap().push(line);
        }
    })
}

/// A child process (usually `launch ...`) with its stdout and stderr lines collected.
pub struct Launched {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Launched {
    /// `video-infinity launch --master-port 0 LAUNCH_ARGS -- WORKER_ARGS`.
    pub fn start(launch_args: &[&str], worker_args: &[String]) -> Launched {
        let mut cmd = Command::new(exe());
        cmd.args(["launch", "--master-port", "0", "--grace-period", "5"])
            .args(launch_args)
            .arg("--")
            .args(worker_args);
        Launched::spawn(cmd)
    }

    /// Any command, output collected.
    pub fn spawn(mut cmd: Command) -> Launched {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start video-infinity");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&lines)),
            collect(child.stderr.take().unwrap(), Arc::clone(&lines)),
        ];
        Launched {
            child: Some(child),
            lines,
            readers,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Everything printed so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a line contains `pat` (panics after `limit`, with the output).
    pub fn wait_for_line(&self, pat: &str, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(pat)) {
                return l.clone();
            }
            assert!(
                t.elapsed() < limit,
                "no line with {pat:?} within {limit:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The workers' pids in rank order, from the launcher's `rank R is pid P` lines.
    pub fn worker_pids(&self, n: usize) -> Vec<i32> {
        (0..n)
            .map(|r| {
                let l = self.wait_for_line(&format!("rank {r} is pid "), Duration::from_secs(20));
                l.rsplit(' ').next().unwrap().parse().unwrap()
            })
            .collect()
    }

    /// Waits for the process to end (panics after `limit`); its output is then complete.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let t = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return s;
            }
            if t.elapsed() > limit {
                let text = self.text();
                panic!("still running after {limit:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Launched {
    /// Kills the process on every path (a launcher's workers then get SIGTERM from the kernel:
    /// they are started with PR_SET_PDEATHSIG).
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

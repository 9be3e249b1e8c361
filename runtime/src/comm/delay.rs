//! A communicator that delays every message: a wrapper over any [`Communicator`] adding a fixed
//! latency per message and a bandwidth limit, so that hiding the exchange behind compute
//! (docs/design.md section 5.5) can be measured on one machine (`video-infinity bench
//! --comm-delay`) and tested.
//!
//! Model: each rank has one incoming link. A message that arrived from the inner communicator at
//! time `a` (for the in-process one: when its sender started the exchange) occupies the link for
//! `bytes / bandwidth` after max(a, the end of the link's previous message) and is available
//! `latency` later. Asynchronous forms are delivered late, without a thread of their own: the
//! rank computes after the start, and `Pending::wait` waits for the inner exchange, then sleeps
//! until the messages are available, counted from their arrival (`Pending::wait_arrived`; the
//! in-process and TCP communicators time each message into the mailbox), so the time the rank
//! computed meanwhile is deducted. The link is booked in the order the rank waits (with a
//! bandwidth limit, exchanges waited for out of their arrival order cross in wait order).
//! Blocking calls sleep the same time on the calling thread. Sending never blocks. (An earlier
//! version delivered each started exchange on a thread of its own: on a machine whose cores the
//! ranks keep busy, waking those threads cost about 0.6-0.9 ms per exchange even at zero
//! latency, which the overlapped schedule paid inside its compute.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Communicator, Halos, Pending, PendingOp};
use crate::{Error, Result, Tensor};

/// The injected cost of one message: `latency` plus `bytes / bytes_per_sec` (no limit: None).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommDelay {
    pub latency: Duration,
    pub bytes_per_sec: Option<f64>,
}

fn parse_err(spec: &str, msg: impl std::fmt::Display) -> Error {
    Error::Msg(format!(
        "communication delay `{spec}`: {msg} (expected LATENCY[,BANDWIDTH], e.g. `2ms` or \
         `500us,1GB/s`; latency in ns/us/ms/s, bandwidth in B/s, KB/s, MB/s, GB/s, KiB/s, \
         MiB/s, GiB/s)"
    ))
}

/// "12.5ms" -> (12.5, "ms").
fn split_number(s: &str) -> Option<(f64, &str)> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let x: f64 = s[..end].parse().ok()?;
    Some((x, s[end..].trim()))
}

impl CommDelay {
    /// No delay at all.
    pub const NONE: CommDelay = CommDelay {
        latency: Duration::ZERO,
        bytes_per_sec: None,
    };

    /// `LATENCY[,BANDWIDTH]`: `2ms`, `500us,1GB/s`, `0,100MiB/s` (a bare 0 latency is allowed).
    pub fn parse(spec: &str) -> Result<CommDelay> {
        let mut parts = spec.split(',');
        let lat = parts.next().unwrap_or("").trim();
        let bw = parts.next().map(str::trim);
        if parts.next().is_some() {
            return Err(parse_err(spec, "more than two parts"));
        }
        let (x, unit) = split_number(lat).ok_or_else(|| parse_err(spec, "no latency"))?;
        let secs = match unit {
            "ns" => x * 1e-9,
            "us" | "µs" => x * 1e-6,
            "ms" => x * 1e-3,
            "s" => x,
            "" if x == 0.0 => 0.0,
            _ => return Err(parse_err(spec, format!("unknown latency unit `{unit}`"))),
        };
        if !secs.is_finite() || secs > 3600.0 {
            return Err(parse_err(spec, "latency out of range (at most 1 hour)"));
        }
        let bytes_per_sec = match bw {
            None => None,
            Some(b) => {
                let (x, unit) = split_number(b).ok_or_else(|| parse_err(spec, "no bandwidth"))?;
                let scale = match unit {
                    "B/s" => 1.0,
                    "KB/s" | "kB/s" => 1e3,
                    "MB/s" => 1e6,
                    "GB/s" => 1e9,
                    "KiB/s" => 1024.0,
                    "MiB/s" => 1024.0 * 1024.0,
                    "GiB/s" => 1024.0 * 1024.0 * 1024.0,
                    _ => return Err(parse_err(spec, format!("unknown bandwidth unit `{unit}`"))),
                };
                let v = x * scale;
                if !(v.is_finite() && v > 0.0) {
                    return Err(parse_err(spec, "bandwidth must be positive"));
                }
                Some(v)
            }
        };
        Ok(CommDelay {
            latency: Duration::from_secs_f64(secs),
            bytes_per_sec,
        })
    }

    /// How long `bytes` occupy the link (without the latency).
    pub fn occupancy(&self, bytes: usize) -> Duration {
        match self.bytes_per_sec {
            Some(bw) => Duration::from_secs_f64(bytes as f64 / bw),
            None => Duration::ZERO,
        }
    }
}

impl std::fmt::Display for CommDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} per message", self.latency)?;
        if let Some(bw) = self.bytes_per_sec {
            write!(f, ", {:.3} GB/s", bw / 1e9)?;
        }
        Ok(())
    }
}

fn bytes_of<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> usize {
    ts.into_iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// The incoming link of one rank: when its last message has finished crossing.
struct Link {
    delay: CommDelay,
    free_at: Mutex<Instant>,
}

impl Link {
    /// When `bytes` that arrived at `arrived` are available (and book the link).
    fn available_at(&self, arrived: Instant, bytes: usize) -> Instant {
        let mut free = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*free).max(arrived);
        *free = start + self.delay.occupancy(bytes);
        *free + self.delay.latency
    }

    fn sleep_until(t: Instant) {
        let now = Instant::now();
        if t > now {
            std::thread::sleep(t - now);
        }
    }
}

/// [`Communicator`] `C` with every received message delayed by a [`CommDelay`] (module doc).
/// Call matching, errors, timeouts and aborts are the inner communicator's.
pub struct DelayComm<C> {
    inner: C,
    link: Arc<Link>,
}

impl<C: Communicator> DelayComm<C> {
    pub fn new(inner: C, delay: CommDelay) -> Self {
        DelayComm {
            inner,
            link: Arc::new(Link {
                delay,
                free_at: Mutex::new(Instant::now()),
            }),
        }
    }

    pub fn delay(&self) -> CommDelay {
        self.link.delay
    }

    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// Delivers the inner exchange `p` late: its `wait` waits for the inner exchange, then
    /// sleeps until its `bytes(result)` are available on this rank's link, counting from when
    /// the last message arrived (`Pending::wait_arrived`; for an exchange the inner communicator
    /// completed at start: the start; when the inner one does not say: the end of its wait).
    fn deliver<T: Send + 'static>(
        &self,
        p: Pending<T>,
        bytes: impl FnOnce(&T) -> usize + Send + 'static,
    ) -> Result<Pending<T>> {
        let started = Instant::now();
        let done_at_start = p.is_done();
        Ok(Pending::from_op(Delivery {
            inner: p,
            link: self.link.clone(),
            bytes,
            arrived_by: done_at_start.then_some(started),
        }))
    }

    /// Sleep on this thread as if `bytes` had just arrived.
    fn delay_now(&self, bytes: usize) {
        Link::sleep_until(self.link.available_at(Instant::now(), bytes));
    }
}

/// A delayed exchange (dropped without `wait`: the inner exchange is dropped, which the inner
/// communicator allows).
struct Delivery<T, F> {
    inner: Pending<T>,
    link: Arc<Link>,
    bytes: F,
    /// When the inner exchange had certainly arrived, if known at start.
    arrived_by: Option<Instant>,
}

impl<T: Send, F: FnOnce(&T) -> usize + Send> PendingOp<T> for Delivery<T, F> {
    fn wait(self: Box<Self>) -> Result<T> {
        Ok(self.wait_arrived()?.0)
    }
    fn wait_arrived(self: Box<Self>) -> Result<(T, Option<Instant>)> {
        let (r, at) = self.inner.wait_arrived()?;
        let arrived = at.or(self.arrived_by).unwrap_or_else(Instant::now);
        let available = self.link.available_at(arrived, (self.bytes)(&r));
        Link::sleep_until(available);
        Ok((r, Some(available)))
    }
}

fn halo_bytes(h: &Halos) -> usize {
    bytes_of(h.0.iter().chain(h.1.iter()))
}

impl<C: Communicator> Communicator for DelayComm<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<Halos> {
        self.start_exchange_neighbors(to_left, to_right)?.wait()
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.start_all_gather(t)?.wait()
    }
    fn start_exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<Pending<Halos>> {
        let p = self.inner.start_exchange_neighbors(to_left, to_right)?;
        self.deliver(p, halo_bytes)
    }
    fn start_all_gather(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        let p = self.inner.start_all_gather(t)?;
        let rank = self.rank();
        // What crossed the link: every tensor but this rank's own.
        self.deliver(p, move |all: &Vec<Tensor>| {
            bytes_of(
                all.iter()
                    .enumerate()
                    .filter(|(r, _)| *r != rank)
                    .map(|(_, t)| t),
            )
        })
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let r = self.inner.all_reduce_sum(t)?;
        self.delay_now(bytes_of([t]) * self.world_size().saturating_sub(1));
        Ok(r)
    }
    fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>> {
        let r = self.inner.gather_to_root(t)?;
        if let Some(all) = &r {
            self.delay_now(bytes_of(all.iter().skip(1)));
        }
        Ok(r)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()?;
        self.delay_now(0);
        Ok(())
    }
    fn send_to(&self, dst: usize, t: &Tensor) -> Result<()> {
        self.inner.send_to(dst, t)
    }
    fn recv_from(&self, src: usize) -> Result<Tensor> {
        let t = self.inner.recv_from(src)?;
        self.delay_now(bytes_of([&t]));
        Ok(t)
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

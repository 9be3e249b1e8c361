//! Bounded-memory schedules of a rank (docs/design.md section 7): what the memory planner may
//! choose so that a generation fits a device's budget, and the per-device turn that lets ranks
//! sharing a device hold their transients one at a time.
//!
//! Every schedule computes the same video as the unconstrained one, bit for bit on the CPU backend
//! (its GEMMs are batch-invariant: `vi_runtime` `cpu/gemm.rs`, tests/batch_invariance.rs); on CUDA
//! a different row count can pick another GEMM algorithm, so there the result stays within the
//! precision bar rather than bit-identical.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vi_runtime::comm::Communicator;
use vi_runtime::{Error as RtError, Result as RtResult, Tensor};

/// How a rank trades memory for speed. The default is unconstrained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Schedule {
    /// Per-frame blocks (the UNet's ResNets and spatial transformers, the VAE) run over chunks of
    /// this many frames of one CFG row (0: the whole clip, both rows, in one call). The VAE
    /// decodes min(this, `--vae-chunk`) frames at a time.
    pub frame_chunk: usize,
    /// The two classifier-free-guidance rows run as two UNet passes of batch 1 (uncond, then
    /// cond) instead of one pass of batch 2.
    pub sequential_cfg: bool,
    /// Ranks sharing a device take turns ([`DeviceTurn`]): a rank computes only while it holds its
    /// device's turn and hands it on while it waits in a collective call, so only one rank's
    /// transients are alive on the device at a time.
    pub rank_turns: bool,
    /// Long-lived tensors move to a lower memory tier at each of the rank's calls to the group
    /// ([`ParkComm`], `vi_runtime::offload`): host memory for CUDA, a spill file for the CPU.
    /// What the rank keeps across an exchange (skips, layer state, latents, sampler state) is
    /// then not on the device while it waits (and, under turns, while others compute); each
    /// tensor comes back at its first use.
    pub offload: bool,
}

impl Schedule {
    /// Everything at once (the fastest, the largest peak).
    pub const UNCONSTRAINED: Schedule = Schedule {
        frame_chunk: 0,
        sequential_cfg: false,
        rank_turns: false,
        offload: false,
    };

    /// The VAE's frames per call under this schedule, given the requested `--vae-chunk`.
    pub fn vae_chunk(&self, requested: usize) -> usize {
        let r = requested.max(1);
        if self.frame_chunk > 0 {
            r.min(self.frame_chunk)
        } else {
            r
        }
    }

    /// The candidates the planner tries, least constraining first: whole clips; frames in chunks
    /// of 8; + ranks of a device taking turns (when a device holds several ranks); + the CFG rows
    /// one after the other; + long-lived tensors offloaded; then chunks of 4, 2 and 1 frames. A
    /// chunk at least as long as the longest clip is the whole clip, so such candidates are
    /// skipped. Offload comes after the sequential CFG rows: it costs a copy of every long-lived
    /// tensor each way, and with CFG batch 2 the lower tier must hold twice the skips (the
    /// 2,300-frame job on one card would put ~106 GiB in host memory where sequential rows fit
    /// the card without offloading). Every rung is at least as constrained as the one before in every part (a chain:
    /// [`Schedule::merge`] of two rungs is the later one).
    pub fn ladder(longest_clip: usize, shared_device: bool) -> Vec<Schedule> {
        let mut out = vec![Schedule::UNCONSTRAINED];
        let mut push = |s: Schedule| {
            let s = Schedule {
                frame_chunk: if s.frame_chunk >= longest_clip {
                    0
                } else {
                    s.frame_chunk
                },
                rank_turns: s.rank_turns && shared_device,
                ..s
            };
            if !out.contains(&s) {
                out.push(s);
            }
        };
        push(Schedule {
            frame_chunk: 8,
            ..Schedule::UNCONSTRAINED
        });
        push(Schedule {
            frame_chunk: 8,
            rank_turns: true,
            ..Schedule::UNCONSTRAINED
        });
        push(Schedule {
            frame_chunk: 8,
            rank_turns: true,
            sequential_cfg: true,
            offload: false,
        });
        for chunk in [8, 4, 2, 1] {
            push(Schedule {
                frame_chunk: chunk,
                rank_turns: true,
                sequential_cfg: true,
                offload: true,
            });
        }
        out
    }
}

impl Schedule {
    /// The schedule at least as constrained as `self` and `other` in every part: the smaller
    /// frame chunk (0, the whole clip, is the largest), sequential CFG rows if either has them,
    /// turns if either takes them, offload if either offloads. The processes of a job run the merge of their choices: each
    /// planned its own ranks against its own budget, and a more constrained schedule needs no
    /// more memory (the ladder is a chain in every part), so the merge fits every process.
    pub fn merge(self, other: Schedule) -> Schedule {
        Schedule {
            frame_chunk: match (self.frame_chunk, other.frame_chunk) {
                (0, c) | (c, 0) => c,
                (a, b) => a.min(b),
            },
            sequential_cfg: self.sequential_cfg || other.sequential_cfg,
            rank_turns: self.rank_turns || other.rank_turns,
            offload: self.offload || other.offload,
        }
    }

    /// The text [`Schedule::parse`] reads back: `unconstrained`, or e.g. `chunk=2,sequential-cfg`.
    pub fn spec(&self) -> String {
        let mut parts = Vec::new();
        if self.frame_chunk > 0 {
            parts.push(format!("chunk={}", self.frame_chunk));
        }
        if self.sequential_cfg {
            parts.push("sequential-cfg".to_string());
        }
        if self.rank_turns {
            parts.push("turns".to_string());
        }
        if self.offload {
            parts.push("offload".to_string());
        }
        if parts.is_empty() {
            "unconstrained".to_string()
        } else {
            parts.join(",")
        }
    }

    /// Parses `unconstrained`, or comma-separated parts `chunk=N`, `sequential-cfg`, `turns`,
    /// `offload` (generate's hidden `--schedule`: a pinned schedule for tests and benchmarks).
    pub fn parse(spec: &str) -> Result<Schedule, String> {
        let mut s = Schedule::UNCONSTRAINED;
        if spec.trim() == "unconstrained" {
            return Ok(s);
        }
        for part in spec.split(',').map(str::trim) {
            match part {
                "sequential-cfg" => s.sequential_cfg = true,
                "turns" => s.rank_turns = true,
                "offload" => s.offload = true,
                _ => match part.strip_prefix("chunk=").map(str::parse::<usize>) {
                    Some(Ok(n)) => s.frame_chunk = n,
                    _ => {
                        return Err(format!(
                            "`{part}` in schedule `{spec}`: expected `unconstrained` or \
                             comma-separated `chunk=N`, `sequential-cfg`, `turns`, `offload`"
                        ))
                    }
                },
            }
        }
        Ok(s)
    }
}

impl fmt::Display for Schedule {
    /// `unconstrained`, or e.g. `frames in chunks of 8, CFG rows sequential, ranks take turns`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.frame_chunk > 0 {
            parts.push(format!("frames in chunks of {}", self.frame_chunk));
        }
        if self.sequential_cfg {
            parts.push("CFG rows sequential".to_string());
        }
        if self.rank_turns {
            parts.push("ranks of a device take turns".to_string());
        }
        if self.offload {
            parts.push(
                "long-lived tensors offloaded (to host memory; a spill file on the CPU)"
                    .to_string(),
            );
        }
        if parts.is_empty() {
            write!(
                f,
                "unconstrained (whole clips, CFG batch of 2, ranks concurrent)"
            )
        } else {
            write!(f, "{}", parts.join(", "))
        }
    }
}

/// The turn of one device: at most one of the ranks sharing it computes at a time.
#[derive(Debug)]
pub struct DeviceTurn {
    busy: Mutex<bool>,
    freed: Condvar,
    /// Longest wait for the turn (a rank computing longer than this between two collective
    /// calls makes the waiting ranks fail, like the group's timeout).
    timeout: Duration,
}

/// How often a rank waiting for its turn looks whether the group was aborted.
const TURN_POLL: Duration = Duration::from_millis(50);

impl DeviceTurn {
    pub fn new(timeout: Duration) -> DeviceTurn {
        DeviceTurn {
            busy: Mutex::new(false),
            freed: Condvar::new(),
            timeout,
        }
    }

    /// Waits for the turn; fails when `comm`'s group is aborted or after the turn's timeout.
    fn acquire(&self, comm: &dyn Communicator) -> RtResult<()> {
        let timeout = self.timeout;
        let t0 = Instant::now();
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy {
            if comm.is_aborted() {
                return Err(RtError::Comm(format!(
                    "rank {}: group aborted while waiting for its device's turn",
                    comm.rank()
                )));
            }
            if t0.elapsed() > timeout {
                return Err(RtError::Comm(format!(
                    "rank {}: waited more than {timeout:?} for its device's turn",
                    comm.rank()
                )));
            }
            busy = self
                .freed
                .wait_timeout(busy, TURN_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *busy = true;
        Ok(())
    }

    fn release(&self) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.freed.notify_one();
    }
}

/// A rank's communicator under [`Schedule::rank_turns`]: the rank holds its device's turn from
/// [`TurnComm::start`] on, hands it on for the duration of every call to the group (where it
/// would wait for its peers) and takes it back before returning; dropping it (also on unwind)
/// hands the turn on.
pub struct TurnComm<'a> {
    inner: &'a dyn Communicator,
    turn: &'a DeviceTurn,
    held: AtomicBool,
}

impl<'a> TurnComm<'a> {
    /// Takes the turn (waiting for it) and returns the wrapped communicator.
    pub fn start(inner: &'a dyn Communicator, turn: &'a DeviceTurn) -> RtResult<TurnComm<'a>> {
        turn.acquire(inner)?;
        Ok(TurnComm {
            inner,
            turn,
            held: AtomicBool::new(true),
        })
    }

    /// Runs `call` without the turn, then takes it back.
    fn away<R>(&self, call: impl FnOnce() -> RtResult<R>) -> RtResult<R> {
        if self.held.swap(false, Ordering::SeqCst) {
            self.turn.release();
        }
        let r = call();
        self.turn.acquire(self.inner)?;
        self.held.store(true, Ordering::SeqCst);
        r
    }
}

impl Drop for TurnComm<'_> {
    fn drop(&mut self) {
        if self.held.swap(false, Ordering::SeqCst) {
            self.turn.release();
        }
    }
}

impl Communicator for TurnComm<'_> {
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
    ) -> RtResult<(Option<Tensor>, Option<Tensor>)> {
        self.away(|| self.inner.exchange_neighbors(to_left, to_right))
    }
    fn all_gather(&self, t: &Tensor) -> RtResult<Vec<Tensor>> {
        self.away(|| self.inner.all_gather(t))
    }
    fn all_reduce_sum(&self, t: &Tensor) -> RtResult<Tensor> {
        self.away(|| self.inner.all_reduce_sum(t))
    }
    fn gather_to_root(&self, t: &Tensor) -> RtResult<Option<Vec<Tensor>>> {
        self.away(|| self.inner.gather_to_root(t))
    }
    fn barrier(&self) -> RtResult<()> {
        self.away(|| self.inner.barrier())
    }
    fn send_to(&self, dst: usize, t: &Tensor) -> RtResult<()> {
        self.away(|| self.inner.send_to(dst, t))
    }
    fn recv_from(&self, src: usize) -> RtResult<Tensor> {
        self.away(|| self.inner.recv_from(src))
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

/// A rank's communicator under [`Schedule::offload`]: before each call to the group (where the
/// rank waits for its peers, and under turns hands its device on) it parks its long-lived
/// tensors ([`vi_runtime::offload::park_except`]; a no-op outside an offload scope), keeping
/// resident what it is about to send. It wraps the [`TurnComm`], so the tensors leave the device
/// before the turn does.
pub struct ParkComm<'a> {
    inner: &'a dyn Communicator,
}

impl<'a> ParkComm<'a> {
    pub fn new(inner: &'a dyn Communicator) -> ParkComm<'a> {
        ParkComm { inner }
    }
}

fn park(keep: &[&Tensor]) -> RtResult<()> {
    vi_runtime::offload::park_except(keep).map(|_| ())
}

impl Communicator for ParkComm<'_> {
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
    ) -> RtResult<(Option<Tensor>, Option<Tensor>)> {
        let keep: Vec<&Tensor> = to_left.into_iter().chain(to_right).collect();
        park(&keep)?;
        self.inner.exchange_neighbors(to_left, to_right)
    }
    fn all_gather(&self, t: &Tensor) -> RtResult<Vec<Tensor>> {
        park(&[t])?;
        self.inner.all_gather(t)
    }
    fn all_reduce_sum(&self, t: &Tensor) -> RtResult<Tensor> {
        park(&[t])?;
        self.inner.all_reduce_sum(t)
    }
    fn gather_to_root(&self, t: &Tensor) -> RtResult<Option<Vec<Tensor>>> {
        park(&[t])?;
        self.inner.gather_to_root(t)
    }
    fn barrier(&self) -> RtResult<()> {
        park(&[])?;
        self.inner.barrier()
    }
    fn send_to(&self, dst: usize, t: &Tensor) -> RtResult<()> {
        park(&[t])?;
        self.inner.send_to(dst, t)
    }
    fn recv_from(&self, src: usize) -> RtResult<Tensor> {
        park(&[])?;
        self.inner.recv_from(src)
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_is_least_constraining_first_and_skips_equivalents() {
        let l = Schedule::ladder(24, true);
        assert_eq!(l[0], Schedule::UNCONSTRAINED);
        assert_eq!(l[1].frame_chunk, 8);
        assert!(l[2].rank_turns && !l[2].sequential_cfg && !l[2].offload);
        assert!(l[3].rank_turns && l[3].sequential_cfg && !l[3].offload);
        assert!(l[4].sequential_cfg && l[4].offload && l[4].frame_chunk == 8);
        assert_eq!(l.last().unwrap().frame_chunk, 1);
        // One rank per device: no turns; a 4-frame clip: chunks of 8 are the whole clip.
        let l = Schedule::ladder(4, false);
        assert!(l.iter().all(|s| !s.rank_turns));
        assert!(l.iter().all(|s| s.frame_chunk < 4));
        // unconstrained, sequential CFG, + offload, chunks of 2, of 1.
        assert_eq!(l.len(), 5, "{l:?}");
        assert!(l[1].sequential_cfg && !l[1].offload && l[1].frame_chunk == 0);
        assert!(l[2].sequential_cfg && l[2].offload && l[2].frame_chunk == 0);
        assert_eq!(Schedule::UNCONSTRAINED.vae_chunk(4), 4);
        let s = Schedule {
            frame_chunk: 2,
            ..Schedule::UNCONSTRAINED
        };
        assert_eq!(s.vae_chunk(4), 2);
        assert!(s.to_string().contains("chunks of 2"));
    }

    #[test]
    fn merge_takes_the_most_constrained_part_and_parse_reads_every_part() {
        let a = Schedule {
            frame_chunk: 8,
            sequential_cfg: false,
            rank_turns: true,
            offload: false,
        };
        let b = Schedule {
            frame_chunk: 2,
            sequential_cfg: true,
            rank_turns: false,
            offload: true,
        };
        let m = Schedule {
            frame_chunk: 2,
            sequential_cfg: true,
            rank_turns: true,
            offload: true,
        };
        assert_eq!(a.merge(b), m);
        assert_eq!(b.merge(a), m);
        // A whole clip (0) is the least constrained chunk.
        assert_eq!(Schedule::UNCONSTRAINED.merge(a), a);
        assert_eq!(a.merge(Schedule::UNCONSTRAINED), a);
        // The ladder is a chain: merging two of its rungs gives the later one.
        let l = Schedule::ladder(24, true);
        for (i, x) in l.iter().enumerate() {
            for y in &l[i..] {
                assert_eq!(x.merge(*y), *y);
            }
        }
        assert_eq!(
            Schedule::parse("chunk=2,sequential-cfg,turns,offload"),
            Ok(m)
        );
        assert!(m.to_string().contains("offloaded"));
        for x in Schedule::ladder(24, true) {
            assert_eq!(Schedule::parse(&x.spec()), Ok(x));
        }
        assert_eq!(
            Schedule::parse("unconstrained"),
            Ok(Schedule::UNCONSTRAINED)
        );
        let e = Schedule::parse("chunk=x").unwrap_err();
        assert!(e.contains("`chunk=x`"), "{e}");
    }
}

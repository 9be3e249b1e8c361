//! Ranks that are threads of one process.
//!
//! [`InProcessGroup`] builds one [`InProcessComm`] per rank for ranks that are threads of one
//! process (CPU ranks, or several clips sharing one GPU). Tensors are handed over as they are (an
//! `Arc` clone: no copy, no device transfer), so a CUDA tensor stays on its device; ranks that
//! share a CUDA device also share its single stream, so a received tensor is ordered after the
//! kernels that produced it. [`InProcessGroup::new_on_devices`] gives each rank a device, and a
//! tensor received from a rank on another device is copied over (through the host).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{sum_in_order, Communicator, Halos, Pending, PendingOp};
use crate::{Device, Error, Result, Tensor};

/// The kind of a collective call; carried with every message so that mismatched call sequences
/// are reported instead of silently pairing unrelated tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OpKind {
    Neighbors,
    AllGather,
    AllReduce,
    Gather,
    Barrier,
    /// A `send_to` / `recv_from` pair (its own index space, per ordered pair of ranks).
    PointToPoint,
}

/// Key of one message: (whether it is point-to-point, call index of the sender (collective: the
/// rank's call index; point-to-point: the index of the send on its (source, destination) pair),
/// source rank, destination rank).
type MsgKey = (bool, u64, usize, usize);

struct Message {
    kind: OpKind,
    payload: Option<Tensor>,
}

#[derive(Default)]
struct State {
    /// Set once: the first failure (abort, panic, timeout), as a message naming the rank.
    aborted: Option<String>,
    mailbox: HashMap<MsgKey, Message>,
    /// Messages a rank will never receive (its pending handle was dropped without `wait`):
    /// discarded when they arrive.
    abandoned: HashSet<MsgKey>,
    /// Ranks whose communicator was dropped: they will never send again.
    departed: Vec<bool>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
    /// Mirror of `state.aborted.is_some()` readable without the lock.
    aborted_flag: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a thread panicked while holding it; the state itself is a
        // plain map that is never left half-updated, so keep going (the panic aborts the group).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn abort(&self, reason: String) {
        let mut st = self.lock();
        if st.aborted.is_none() {
            st.aborted = Some(reason);
            self.aborted_flag.store(true, Ordering::SeqCst);
        }
        drop(st);
        self.cv.notify_all();
    }
}

/// Constructor of a group of in-process ranks.
pub struct InProcessGroup;

impl InProcessGroup {
    /// How long a call waits for a peer before it fails (and aborts the group).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// One communicator per rank (index = rank). Each is `Send`: move it to its rank's thread.
    /// A call that waits longer than `timeout` for a peer fails and aborts the whole group.
    // A group is nothing but its members: `new` hands out the per-rank communicators.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize, timeout: Duration) -> Vec<InProcessComm> {
        Self::build(world_size, None, timeout)
    }

    /// Like [`InProcessGroup::new`], one rank per entry of `devices`: a tensor a rank receives that
    /// lives on another device is copied to the rank's device (through the host). Ranks sharing a
    /// device get the sender's tensor as is.
    pub fn new_on_devices(devices: &[Device], timeout: Duration) -> Vec<InProcessComm> {
        Self::build(devices.len(), Some(devices), timeout)
    }

    fn build(
        world_size: usize,
        devices: Option<&[Device]>,
        timeout: Duration,
    ) -> Vec<InProcessComm> {
        assert!(world_size >= 1, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            world: world_size,
            timeout,
            state: Mutex::new(State {
                departed: vec![false; world_size],
                ..Default::default()
            }),
            cv: Condvar::new(),
            aborted_flag: AtomicBool::new(false),
        });
        (0..world_size)
            .map(|rank| InProcessComm {
                rank,
                shared: shared.clone(),
                seq: AtomicU64::new(0),
                p2p_sent: Mutex::new(vec![0; world_size]),
                p2p_received: Mutex::new(vec![0; world_size]),
                device: devices.map(|d| d[rank]),
            })
            .collect()
    }

    /// [`InProcessGroup::new`] with [`InProcessGroup::DEFAULT_TIMEOUT`].
    pub fn with_default_timeout(world_size: usize) -> Vec<InProcessComm> {
        Self::new(world_size, Self::DEFAULT_TIMEOUT)
    }
}

/// One rank of an [`InProcessGroup`]. Dropping it while its thread unwinds from a panic aborts the
/// group; dropping it otherwise marks the rank as departed, so a peer waiting for a message it
/// never sent fails at once instead of waiting for the timeout.
pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Index of the next collective call of this rank.
    seq: AtomicU64,
    /// Per peer: point-to-point messages sent to it / received from it so far.
    p2p_sent: Mutex<Vec<u64>>,
    p2p_received: Mutex<Vec<u64>>,
    /// Where received tensors must live (None: as sent).
    device: Option<Device>,
}

impl InProcessComm {
    /// The timeout of this group.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// The reason the group was aborted, if it was.
    pub fn abort_reason(&self) -> Option<String> {
        self.shared.lock().aborted.clone()
    }

    fn aborted_error(reason: &str, rank: usize, what: &str) -> Error {
        Error::Comm(format!("rank {rank}: {what}: group aborted: {reason}"))
    }

    /// Start a call: check the group is alive and take the call index.
    fn begin(&self, kind: OpKind) -> Result<u64> {
        if self.shared.aborted_flag.load(Ordering::SeqCst) {
            let st = self.shared.lock();
            let reason = st.aborted.clone().unwrap_or_default();
            return Err(Self::aborted_error(
                &reason,
                self.rank,
                &format!("{kind:?}"),
            ));
        }
        Ok(self.seq.fetch_add(1, Ordering::SeqCst))
    }

    fn send(&self, seq: u64, kind: OpKind, dst: usize, payload: Option<Tensor>) -> Result<()> {
        let mut st = self.shared.lock();
        if let Some(reason) = &st.aborted {
            return Err(Self::aborted_error(reason, self.rank, &format!("{kind:?}")));
        }
        let key = (kind == OpKind::PointToPoint, seq, self.rank, dst);
        if st.abandoned.remove(&key) {
            return Ok(());
        }
        st.mailbox.insert(key, Message { kind, payload });
        drop(st);
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Wait for the message of call `seq` from `src` (see [`recv_msg`]).
    fn recv(&self, seq: u64, kind: OpKind, src: usize) -> Result<Option<Tensor>> {
        recv_msg(&self.shared, self.rank, self.device, seq, kind, src)
    }

    /// The receiving half of call `seq`, completed later (see [`PendingRecv`]).
    fn pending_recv(&self, seq: u64, kind: OpKind, srcs: Vec<usize>) -> PendingRecv {
        PendingRecv {
            shared: self.shared.clone(),
            rank: self.rank,
            device: self.device,
            seq,
            kind,
            srcs,
            waited: false,
        }
    }

    /// The index of the next point-to-point message with `peer` in `counters` (and count it).
    fn p2p_index(&self, counters: &Mutex<Vec<u64>>, peer: usize, what: &str) -> Result<u64> {
        if peer == self.rank || peer >= self.shared.world {
            return Err(Error::Comm(format!(
                "rank {}: {what}: rank {peer} is not a peer in a group of {}",
                self.rank, self.shared.world
            )));
        }
        if self.shared.aborted_flag.load(Ordering::SeqCst) {
            let reason = self.shared.lock().aborted.clone().unwrap_or_default();
            return Err(Self::aborted_error(&reason, self.rank, what));
        }
        let mut c = counters.lock().unwrap_or_else(|e| e.into_inner());
        let i = c[peer];
        c[peer] += 1;
        Ok(i)
    }

    /// Send `t` to every rank (itself included) and receive every rank's tensor, in rank order.
    fn exchange_all(&self, kind: OpKind, t: Option<&Tensor>) -> Result<Vec<Option<Tensor>>> {
        let seq = self.begin(kind)?;
        let w = self.shared.world;
        for dst in 0..w {
            if dst != self.rank {
                self.send(seq, kind, dst, t.cloned())?;
            }
        }
        let mut out = Vec::with_capacity(w);
        for src in 0..w {
            if src == self.rank {
                out.push(t.cloned());
            } else {
                out.push(self.recv(seq, kind, src)?);
            }
        }
        Ok(out)
    }
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
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

    /// Sends both halos now; the receives happen in `wait`.
    fn start_exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<Pending<Halos>> {
        const K: OpKind = OpKind::Neighbors;
        let seq = self.begin(K)?;
        let (r, w) = (self.rank, self.shared.world);
        if r > 0 {
            self.send(seq, K, r - 1, to_left.cloned())?;
        }
        if r + 1 < w {
            self.send(seq, K, r + 1, to_right.cloned())?;
        }
        let mut srcs = Vec::new();
        if r > 0 {
            srcs.push(r - 1);
        }
        if r + 1 < w {
            srcs.push(r + 1);
        }
        Ok(Pending::from_op(NeighborsOp(
            self.pending_recv(seq, K, srcs),
        )))
    }

    /// Sends `t` to every rank now; the receives happen in `wait`.
    fn start_all_gather(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        const K: OpKind = OpKind::AllGather;
        let seq = self.begin(K)?;
        let w = self.shared.world;
        for dst in (0..w).filter(|&d| d != self.rank) {
            self.send(seq, K, dst, Some(t.clone()))?;
        }
        let srcs = (0..w).filter(|&s| s != self.rank).collect();
        Ok(Pending::from_op(GatherOp {
            recv: self.pending_recv(seq, K, srcs),
            own: t.clone(),
        }))
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.exchange_all(OpKind::AllReduce, Some(t))?;
        let all: Vec<Tensor> = all
            .into_iter()
            .enumerate()
            .map(|(src, x)| {
                x.ok_or_else(|| Error::Comm(format!("all_reduce_sum: rank {src} sent nothing")))
            })
            .collect::<Result<_>>()?;
        sum_in_order(&all)
    }

    fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>> {
        const K: OpKind = OpKind::Gather;
        let seq = self.begin(K)?;
        if self.rank != 0 {
            self.send(seq, K, 0, Some(t.clone()))?;
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.shared.world);
        out.push(t.clone());
        for src in 1..self.shared.world {
            let x = self
                .recv(seq, K, src)?
                .ok_or_else(|| Error::Comm(format!("gather_to_root: rank {src} sent nothing")))?;
            out.push(x);
        }
        Ok(Some(out))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange_all(OpKind::Barrier, None).map(|_| ())
    }

    fn send_to(&self, dst: usize, t: &Tensor) -> Result<()> {
        let seq = self.p2p_index(&self.p2p_sent, dst, "send_to")?;
        self.send(seq, OpKind::PointToPoint, dst, Some(t.clone()))
    }

    fn recv_from(&self, src: usize) -> Result<Tensor> {
        let seq = self.p2p_index(&self.p2p_received, src, "recv_from")?;
        self.recv(seq, OpKind::PointToPoint, src)?.ok_or_else(|| {
            Error::Comm(format!(
                "rank {}: recv_from: rank {src} sent nothing",
                self.rank
            ))
        })
    }

    fn abort(&self, reason: &str) {
        self.shared
            .abort(format!("rank {} aborted: {reason}", self.rank));
    }

    fn is_aborted(&self) -> bool {
        self.shared.aborted_flag.load(Ordering::SeqCst)
    }
}

impl Drop for InProcessComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.abort(format!("rank {} panicked", self.rank));
            return;
        }
        let mut st = self.shared.lock();
        st.departed[self.rank] = true;
        drop(st);
        self.shared.cv.notify_all();
    }
}

/// Wait for the message of call `seq` from `src`. Fails when the group is aborted, when `src`
/// departed without sending it, or after the timeout (which aborts the group).
fn recv_msg(
    shared: &Shared,
    rank: usize,
    device: Option<Device>,
    seq: u64,
    kind: OpKind,
    src: usize,
) -> Result<Option<Tensor>> {
    let t = recv_raw(shared, rank, seq, kind, src)?;
    match (t, device) {
        (Some(t), Some(d)) if t.device() != d => Ok(Some(t.to_device(d)?)),
        (t, _) => Ok(t),
    }
}

fn recv_raw(
    shared: &Shared,
    rank: usize,
    seq: u64,
    kind: OpKind,
    src: usize,
) -> Result<Option<Tensor>> {
    let deadline = Instant::now() + shared.timeout;
    let key = (kind == OpKind::PointToPoint, seq, src, rank);
    let mut st = shared.lock();
    loop {
        if let Some(reason) = &st.aborted {
            return Err(InProcessComm::aborted_error(
                reason,
                rank,
                &format!("{kind:?}"),
            ));
        }
        if let Some(msg) = st.mailbox.remove(&key) {
            if msg.kind != kind {
                let reason = format!(
                    "rank {}: collective call #{seq} mismatch: this rank called {kind:?}, \
                     rank {src} called {:?}",
                    rank, msg.kind
                );
                drop(st);
                shared.abort(reason.clone());
                return Err(Error::Comm(reason));
            }
            return Ok(msg.payload);
        }
        if st.departed[src] {
            let reason = format!(
                "rank {}: {kind:?} (call #{seq}): rank {src} left the group without sending",
                rank
            );
            drop(st);
            shared.abort(reason.clone());
            return Err(Error::Comm(reason));
        }
        let now = Instant::now();
        if now >= deadline {
            let reason = format!(
                "rank {}: {kind:?} (call #{seq}): timed out after {:?} waiting for rank {src}",
                rank, shared.timeout
            );
            drop(st);
            shared.abort(reason.clone());
            return Err(Error::Comm(reason));
        }
        st = shared
            .cv
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// The messages of one started call still to be received, from `srcs` in that order. Dropped
/// without `wait`, it removes what already arrived and marks the rest abandoned, so a peer's
/// later message for this call is discarded on arrival (call indices are never reused, so later
/// calls are unaffected either way; this only keeps the mailbox from growing).
struct PendingRecv {
    shared: Arc<Shared>,
    rank: usize,
    device: Option<Device>,
    seq: u64,
    kind: OpKind,
    srcs: Vec<usize>,
    waited: bool,
}

impl PendingRecv {
    fn recv_all(&mut self) -> Result<Vec<Option<Tensor>>> {
        self.waited = true;
        self.srcs
            .iter()
            .map(|&src| {
                recv_msg(
                    &self.shared,
                    self.rank,
                    self.device,
                    self.seq,
                    self.kind,
                    src,
                )
            })
            .collect()
    }
}

impl Drop for PendingRecv {
    fn drop(&mut self) {
        if self.waited {
            return;
        }
        let mut st = self.shared.lock();
        for &src in &self.srcs {
            let key = (false, self.seq, src, self.rank);
            if st.mailbox.remove(&key).is_none() {
                st.abandoned.insert(key);
            }
        }
    }
}

/// A started neighbour exchange: receives from rank-1 and rank+1 (those that exist).
struct NeighborsOp(PendingRecv);

impl PendingOp<Halos> for NeighborsOp {
    fn wait(mut self: Box<Self>) -> Result<Halos> {
        let r = self.0.rank;
        let mut got = self.0.recv_all()?.into_iter();
        let from_left = if r > 0 { got.next().flatten() } else { None };
        let from_right = if r + 1 < self.0.shared.world {
            got.next().flatten()
        } else {
            None
        };
        Ok((from_left, from_right))
    }
}

/// A started all-gather: every other rank's tensor, and this rank's own in its place.
struct GatherOp {
    recv: PendingRecv,
    own: Tensor,
}

impl PendingOp<Vec<Tensor>> for GatherOp {
    fn wait(mut self: Box<Self>) -> Result<Vec<Tensor>> {
        let rank = self.recv.rank;
        let mut got = self
            .recv
            .recv_all()?
            .into_iter()
            .zip(self.recv.srcs.clone());
        let world = self.recv.shared.world;
        let mut out = Vec::with_capacity(world);
        for src in 0..world {
            if src == rank {
                out.push(self.own.clone());
                continue;
            }
            let (t, s) = got.next().expect("one message per other rank");
            debug_assert_eq!(s, src);
            out.push(t.ok_or_else(|| Error::Comm(format!("all_gather: rank {src} sent nothing")))?);
        }
        Ok(out)
    }
}

//! What the in-process and the TCP communicators share: the mailbox messages wait in until their
//! call takes them, the call numbering, and every collective built on "send to a rank" and "take
//! the message of call n from rank r".
//!
//! A [`Transport`] moves a message from one rank towards another: the in-process one drops it
//! straight into the (shared) mailbox, the TCP one queues it for a writer thread (a reader thread
//! at the other end puts it into that rank's mailbox). An [`Endpoint`] is one rank's side: it takes
//! the call indices and implements [`Communicator`] over any transport.
//!
//! Invariants: a message is keyed by (point-to-point, call index, source, destination) and taken
//! exactly once; the first failure (abort, timeout, mismatch, dead peer) is recorded once and every
//! waiter is woken; every wait is bounded by the group's timeout and names the rank it waited for.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{sum_in_order, Communicator, Halos, Pending, PendingOp};
use crate::{Device, Error, Result, Tensor};

/// The kind of a collective call; carried with every message so that mismatched call sequences
/// are reported instead of silently pairing unrelated tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum OpKind {
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

fn key(kind: OpKind, seq: u64, src: usize, dst: usize) -> MsgKey {
    (kind == OpKind::PointToPoint, seq, src, dst)
}

struct Message {
    kind: OpKind,
    payload: Option<Tensor>,
    /// When it was put in the mailbox (its arrival at this rank).
    at: Instant,
}

struct State {
    /// Set once: the first failure (abort, panic, timeout, dead peer), as a message naming the rank.
    aborted: Option<String>,
    messages: HashMap<MsgKey, Message>,
    /// Messages their destination will never take (its pending handle was dropped without
    /// `wait`): discarded when they arrive.
    abandoned: HashSet<MsgKey>,
    /// Ranks that left after a normal run: nothing more will come from them.
    departed: Vec<bool>,
}

/// How messages leave a rank (see the module doc).
pub(crate) trait Transport: Send + Sync + Sized + 'static {
    /// Hands `payload` (message of call `seq` of `kind`) over towards rank `dst`, without waiting
    /// for `dst` to take it. `payload` may be dropped by the caller once this returns.
    fn send(
        &self,
        mb: &Mailbox<Self>,
        src: usize,
        dst: usize,
        kind: OpKind,
        seq: u64,
        payload: Option<&Tensor>,
    ) -> Result<()>;
    /// Told once, with the first failure's reason, after it is recorded (TCP: tells the peers).
    fn tell_abort(&self, _reason: &str) {}
    /// A received tensor as the receiving rank holds it (`device`: the rank's, if it has one).
    fn place(&self, t: Tensor, device: Option<Device>) -> Result<Tensor>;
}

/// Where messages wait for the call that takes them: all ranks' (in-process: one shared by the
/// group) or one rank's (TCP: filled by the reader threads).
pub(crate) struct Mailbox<T> {
    pub(crate) world: usize,
    pub(crate) timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
    /// Mirror of `state.aborted.is_some()` readable without the lock.
    aborted_flag: AtomicBool,
    /// Held while an abort is being recorded and told (see [`Mailbox::abort`]).
    telling: Mutex<()>,
    pub(crate) transport: T,
}

impl<T: Transport> Mailbox<T> {
    pub(crate) fn new(world: usize, timeout: Duration, transport: T) -> Self {
        Mailbox {
            world,
            timeout,
            state: Mutex::new(State {
                aborted: None,
                messages: HashMap::new(),
                abandoned: HashSet::new(),
                departed: vec![false; world],
            }),
            cv: Condvar::new(),
            aborted_flag: AtomicBool::new(false),
            telling: Mutex::new(()),
            transport,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a thread panicked while holding it; the state is plain maps
        // and flags, never left half-updated, so keep going (the panic aborts the group).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the group aborted with `reason` (the first reason wins), wakes every waiter and (the
    /// first time) tells the transport.
    pub(crate) fn abort(&self, reason: String) {
        // Held until the transport has told the peers, so that [`Mailbox::wait_told`] (a TCP rank
        // closing its sockets) waits for it: a peer reads the reason before the connection ends.
        let _telling = self.telling.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        if st.aborted.is_some() {
            return;
        }
        st.aborted = Some(reason.clone());
        self.aborted_flag.store(true, Ordering::SeqCst);
        drop(st);
        self.cv.notify_all();
        self.transport.tell_abort(&reason);
    }

    /// Returns once no abort is being told.
    pub(crate) fn wait_told(&self) {
        drop(self.telling.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted_flag.load(Ordering::SeqCst)
    }

    pub(crate) fn abort_reason(&self) -> Option<String> {
        self.lock().aborted.clone()
    }

    pub(crate) fn aborted_error(&self, rank: usize, what: &str) -> Error {
        let reason = self.abort_reason().unwrap_or_default();
        Error::Comm(format!("rank {rank}: {what}: group aborted: {reason}"))
    }

    /// Puts the message of call `seq` from `src` to `dst` in the mailbox (or discards it when its
    /// handle was dropped). False when that message is already there (a protocol error).
    pub(crate) fn deliver(
        &self,
        src: usize,
        dst: usize,
        kind: OpKind,
        seq: u64,
        payload: Option<Tensor>,
    ) -> bool {
        let k = key(kind, seq, src, dst);
        let mut st = self.lock();
        if st.abandoned.remove(&k) {
            return true;
        }
        if st.messages.contains_key(&k) {
            return false;
        }
        st.messages.insert(
            k,
            Message {
                kind,
                payload,
                at: Instant::now(),
            },
        );
        drop(st);
        self.cv.notify_all();
        true
    }

    /// Rank `r` left after a normal run: a wait for a message it never sent fails at once.
    pub(crate) fn depart(&self, r: usize) {
        self.lock().departed[r] = true;
        self.cv.notify_all();
    }

    /// How many messages wait in the mailbox for rank `dst` (none once every call that `dst`
    /// started has been waited for or dropped and its peers' messages have arrived).
    pub(crate) fn held_for(&self, dst: usize) -> usize {
        self.lock().messages.keys().filter(|k| k.3 == dst).count()
    }

    pub(crate) fn has_departed(&self, r: usize) -> bool {
        self.lock().departed[r]
    }

    /// Waits for the message of call `seq` from `src` to `rank`. Fails when the group is aborted,
    /// when `src` departed without sending it, on a kind mismatch, or after the timeout; the last
    /// three abort the group. Returns the payload and when it arrived.
    fn recv(
        &self,
        rank: usize,
        seq: u64,
        kind: OpKind,
        src: usize,
    ) -> Result<(Option<Tensor>, Instant)> {
        let deadline = Instant::now() + self.timeout;
        let k = key(kind, seq, src, rank);
        let mut st = self.lock();
        loop {
            if st.aborted.is_some() {
                drop(st);
                return Err(self.aborted_error(rank, &format!("{kind:?}")));
            }
            if let Some(msg) = st.messages.remove(&k) {
                if msg.kind == kind {
                    return Ok((msg.payload, msg.at));
                }
                let reason = format!(
                    "rank {rank}: collective call #{seq} mismatch: this rank called {kind:?}, \
                     rank {src} called {:?}",
                    msg.kind
                );
                drop(st);
                self.abort(reason.clone());
                return Err(Error::Comm(reason));
            }
            let reason = if st.departed[src] {
                Some(format!(
                    "rank {rank}: {kind:?} (call #{seq}): rank {src} left the group without sending"
                ))
            } else if Instant::now() >= deadline {
                Some(format!(
                    "rank {rank}: {kind:?} (call #{seq}): timed out after {:?} waiting for rank \
                     {src}",
                    self.timeout
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                drop(st);
                self.abort(reason.clone());
                return Err(Error::Comm(reason));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// One rank's side of a group over transport `T`: its call indices, and the collectives.
pub(crate) struct Endpoint<T> {
    pub(crate) rank: usize,
    pub(crate) mb: Arc<Mailbox<T>>,
    /// Where received tensors must live (None: as they arrive).
    device: Option<Device>,
    /// Index of the next collective call of this rank.
    seq: AtomicU64,
    /// Per peer: point-to-point messages sent to it / received from it so far.
    p2p_sent: Mutex<Vec<u64>>,
    p2p_received: Mutex<Vec<u64>>,
}

impl<T: Transport> Endpoint<T> {
    pub(crate) fn new(rank: usize, mb: Arc<Mailbox<T>>, device: Option<Device>) -> Self {
        let w = mb.world;
        Endpoint {
            rank,
            mb,
            device,
            seq: AtomicU64::new(0),
            p2p_sent: Mutex::new(vec![0; w]),
            p2p_received: Mutex::new(vec![0; w]),
        }
    }

    fn world(&self) -> usize {
        self.mb.world
    }

    /// Start a call: check the group is alive and take the call index.
    fn begin(&self, kind: OpKind) -> Result<u64> {
        if self.mb.is_aborted() {
            return Err(self.mb.aborted_error(self.rank, &format!("{kind:?}")));
        }
        Ok(self.seq.fetch_add(1, Ordering::SeqCst))
    }

    fn send(&self, seq: u64, kind: OpKind, dst: usize, payload: Option<&Tensor>) -> Result<()> {
        if self.mb.is_aborted() {
            return Err(self.mb.aborted_error(self.rank, &format!("{kind:?}")));
        }
        self.mb
            .transport
            .send(&self.mb, self.rank, dst, kind, seq, payload)
    }

    fn recv(&self, seq: u64, kind: OpKind, src: usize) -> Result<Option<Tensor>> {
        Ok(recv_placed(&self.mb, self.rank, self.device, seq, kind, src)?.0)
    }

    /// The receiving half of call `seq`, completed later (see [`PendingRecv`]).
    fn pending_recv(&self, seq: u64, kind: OpKind, srcs: Vec<usize>) -> PendingRecv<T> {
        PendingRecv {
            mb: self.mb.clone(),
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
        if peer == self.rank || peer >= self.world() {
            return Err(Error::Comm(format!(
                "rank {}: {what}: rank {peer} is not a peer in a group of {}",
                self.rank,
                self.world()
            )));
        }
        if self.mb.is_aborted() {
            return Err(self.mb.aborted_error(self.rank, what));
        }
        let mut c = counters.lock().unwrap_or_else(|e| e.into_inner());
        let i = c[peer];
        c[peer] += 1;
        Ok(i)
    }

    /// Send `t` to every other rank and receive every rank's tensor (its own: `t`), in rank order.
    fn exchange_all(&self, kind: OpKind, t: Option<&Tensor>) -> Result<Vec<Option<Tensor>>> {
        let seq = self.begin(kind)?;
        let w = self.world();
        for dst in (0..w).filter(|&d| d != self.rank) {
            self.send(seq, kind, dst, t)?;
        }
        (0..w)
            .map(|src| {
                if src == self.rank {
                    Ok(t.cloned())
                } else {
                    self.recv(seq, kind, src)
                }
            })
            .collect()
    }
}

fn recv_placed<T: Transport>(
    mb: &Mailbox<T>,
    rank: usize,
    device: Option<Device>,
    seq: u64,
    kind: OpKind,
    src: usize,
) -> Result<(Option<Tensor>, Instant)> {
    match mb.recv(rank, seq, kind, src)? {
        (Some(t), at) => Ok((Some(mb.transport.place(t, device)?), at)),
        (None, at) => Ok((None, at)),
    }
}

fn sent_nothing(what: &str, src: usize) -> Error {
    Error::Comm(format!("{what}: rank {src} sent nothing"))
}

impl<T: Transport> Communicator for Endpoint<T> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world()
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

    /// Hands both halos to the transport now; the receives happen in `wait`.
    fn start_exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<Pending<Halos>> {
        const K: OpKind = OpKind::Neighbors;
        let seq = self.begin(K)?;
        let (r, w) = (self.rank, self.world());
        let mut srcs = Vec::new();
        if r > 0 {
            self.send(seq, K, r - 1, to_left)?;
            srcs.push(r - 1);
        }
        if r + 1 < w {
            self.send(seq, K, r + 1, to_right)?;
            srcs.push(r + 1);
        }
        Ok(Pending::from_op(NeighborsOp(
            self.pending_recv(seq, K, srcs),
        )))
    }

    /// Hands `t` to the transport for every other rank now; the receives happen in `wait`.
    fn start_all_gather(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        const K: OpKind = OpKind::AllGather;
        let seq = self.begin(K)?;
        let w = self.world();
        let srcs: Vec<usize> = (0..w).filter(|&s| s != self.rank).collect();
        for &dst in &srcs {
            self.send(seq, K, dst, Some(t))?;
        }
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
            .map(|(src, x)| x.ok_or_else(|| sent_nothing("all_reduce_sum", src)))
            .collect::<Result<_>>()?;
        sum_in_order(&all)
    }

    fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>> {
        const K: OpKind = OpKind::Gather;
        let seq = self.begin(K)?;
        if self.rank != 0 {
            self.send(seq, K, 0, Some(t))?;
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.world());
        out.push(t.clone());
        for src in 1..self.world() {
            let x = self
                .recv(seq, K, src)?
                .ok_or_else(|| sent_nothing("gather_to_root", src))?;
            out.push(x);
        }
        Ok(Some(out))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange_all(OpKind::Barrier, None).map(|_| ())
    }

    fn send_to(&self, dst: usize, t: &Tensor) -> Result<()> {
        let seq = self.p2p_index(&self.p2p_sent, dst, "send_to")?;
        self.send(seq, OpKind::PointToPoint, dst, Some(t))
    }

    fn recv_from(&self, src: usize) -> Result<Tensor> {
        let seq = self.p2p_index(&self.p2p_received, src, "recv_from")?;
        self.recv(seq, OpKind::PointToPoint, src)?
            .ok_or_else(|| sent_nothing(&format!("rank {}: recv_from", self.rank), src))
    }

    fn abort(&self, reason: &str) {
        self.mb
            .abort(format!("rank {} aborted: {reason}", self.rank));
    }

    fn is_aborted(&self) -> bool {
        self.mb.is_aborted()
    }
}

/// The messages of one started call still to be received, from `srcs` in that order. Dropped
/// without `wait`, it removes what already arrived and marks the rest abandoned, so a peer's
/// later message for this call is discarded on arrival (call indices are never reused, so later
/// calls are unaffected either way; this only keeps the mailbox from growing).
struct PendingRecv<T: Transport> {
    mb: Arc<Mailbox<T>>,
    rank: usize,
    device: Option<Device>,
    seq: u64,
    kind: OpKind,
    srcs: Vec<usize>,
    waited: bool,
}

impl<T: Transport> PendingRecv<T> {
    /// Every source's message, in `srcs` order, and when the last of them arrived.
    fn recv_all(&mut self) -> Result<(Vec<Option<Tensor>>, Option<Instant>)> {
        self.waited = true;
        let mut last = None;
        let mut out = Vec::with_capacity(self.srcs.len());
        for &src in &self.srcs {
            let (t, at) = recv_placed(&self.mb, self.rank, self.device, self.seq, self.kind, src)?;
            last = last.max(Some(at));
            out.push(t);
        }
        Ok((out, last))
    }
}

impl<T: Transport> Drop for PendingRecv<T> {
    fn drop(&mut self) {
        if self.waited {
            return;
        }
        let mut st = self.mb.lock();
        for &src in &self.srcs {
            let k = key(self.kind, self.seq, src, self.rank);
            if st.messages.remove(&k).is_none() {
                st.abandoned.insert(k);
            }
        }
    }
}

/// A started neighbour exchange: receives from rank-1 and rank+1 (those that exist).
struct NeighborsOp<T: Transport>(PendingRecv<T>);

impl<T: Transport> PendingOp<Halos> for NeighborsOp<T> {
    fn wait(self: Box<Self>) -> Result<Halos> {
        Ok(self.wait_arrived()?.0)
    }
    fn wait_arrived(mut self: Box<Self>) -> Result<(Halos, Option<Instant>)> {
        let (r, w) = (self.0.rank, self.0.mb.world);
        let (got, at) = self.0.recv_all()?;
        let mut got = got.into_iter();
        let from_left = if r > 0 { got.next().flatten() } else { None };
        let from_right = if r + 1 < w {
            got.next().flatten()
        } else {
            None
        };
        Ok(((from_left, from_right), at))
    }
}

/// A started all-gather: every other rank's tensor, and this rank's own in its place.
struct GatherOp<T: Transport> {
    recv: PendingRecv<T>,
    own: Tensor,
}

impl<T: Transport> PendingOp<Vec<Tensor>> for GatherOp<T> {
    fn wait(self: Box<Self>) -> Result<Vec<Tensor>> {
        Ok(self.wait_arrived()?.0)
    }
    fn wait_arrived(mut self: Box<Self>) -> Result<(Vec<Tensor>, Option<Instant>)> {
        let rank = self.recv.rank;
        let mut out = Vec::with_capacity(self.recv.mb.world);
        let (got, at) = self.recv.recv_all()?;
        for (src, t) in self.recv.srcs.clone().into_iter().zip(got) {
            if out.len() == rank {
                out.push(self.own.clone());
            }
            out.push(t.ok_or_else(|| sent_nothing("all_gather", src))?);
        }
        if out.len() == rank {
            out.push(self.own.clone());
        }
        Ok((out, at))
    }
}

/// Implements [`Communicator`] for a rank type by forwarding every call to its [`Endpoint`]
/// field.
macro_rules! forward_communicator {
    ($ty:ty, $field:ident) => {
        impl $crate::comm::Communicator for $ty {
            fn rank(&self) -> usize {
                self.$field.rank
            }
            fn world_size(&self) -> usize {
                self.$field.mb.world
            }
            fn exchange_neighbors(
                &self,
                to_left: Option<&Tensor>,
                to_right: Option<&Tensor>,
            ) -> Result<$crate::comm::Halos> {
                self.$field.exchange_neighbors(to_left, to_right)
            }
            fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
                self.$field.all_gather(t)
            }
            fn start_exchange_neighbors(
                &self,
                to_left: Option<&Tensor>,
                to_right: Option<&Tensor>,
            ) -> Result<$crate::comm::Pending<$crate::comm::Halos>> {
                self.$field.start_exchange_neighbors(to_left, to_right)
            }
            fn start_all_gather(&self, t: &Tensor) -> Result<$crate::comm::Pending<Vec<Tensor>>> {
                self.$field.start_all_gather(t)
            }
            fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
                self.$field.all_reduce_sum(t)
            }
            fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>> {
                self.$field.gather_to_root(t)
            }
            fn barrier(&self) -> Result<()> {
                self.$field.barrier()
            }
            fn send_to(&self, dst: usize, t: &Tensor) -> Result<()> {
                self.$field.send_to(dst, t)
            }
            fn recv_from(&self, src: usize) -> Result<Tensor> {
                self.$field.recv_from(src)
            }
            fn abort(&self, reason: &str) {
                $crate::comm::Communicator::abort(&self.$field, reason)
            }
            fn is_aborted(&self) -> bool {
                self.$field.mb.is_aborted()
            }
        }
    };
}
pub(crate) use forward_communicator;

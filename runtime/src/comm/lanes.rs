//! Several threads of one rank sharing its communicator: [`Lanes`] splits a rank's communicator
//! into `n` lanes whose collective calls take the underlying call indices in a fixed round robin
//! (lane 0's k-th call, lane 1's k-th call, ..., lane 0's (k+1)-th call), so that the n-th call of
//! every rank still pairs with the n-th call of every other rank however the lanes' threads are
//! scheduled. The model runs the two classifier-free-guidance rows of a UNet pass as two lanes
//! (`Schedule::cfg_chains`): while one row waits for an exchange, the other computes.
//!
//! Invariants:
//! * every rank splits the same way and its lanes issue the same sequence of collective calls as
//!   the same lanes of every other rank (the k-th call of lane i is then the same call on every
//!   rank);
//! * a lane that is dropped is done: the round robin skips it from then on (a lane that makes
//!   fewer calls than the others must be dropped after its last one, which happens at the same
//!   place of the sequence on every rank);
//! * a call that waits for its lane's turn fails when the group is aborted, or after `timeout` if
//!   one is given (without one the wait is bounded by the other lanes: each of their calls is
//!   bounded by the group's timeout, and a lane that fails is dropped); a lane's thread that fails
//!   should abort the group (the peers would otherwise pair the other lanes' next calls with the
//!   failed lane's);
//! * only the start of a call holds the turn: a started exchange (`start_*`) hands the turn on as
//!   soon as its index is taken, a blocking call when it returns;
//! * point-to-point messages are not part of the collective sequence and pass straight through;
//! * at most one lane computes at a time: a lane takes the baton with [`Lane::enter`] and hands it
//!   on whenever it blocks (waiting for its turn to call, for an exchange in flight, in a blocking
//!   call), taking it back before it goes on; a dropped lane hands it on. Two lanes then
//!   alternate: one computes while the other's exchange flies, and each computes with every core
//!   of the rank. (Without the baton, lanes computing at the same time reach their exchanges
//!   together and wait together: measured, it hid nothing.) A baton wait is bounded by the
//!   holder's compute between two of its calls.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Communicator, Halos, Pending, PendingOp};
use crate::{Error, Result, Tensor};

/// How often a lane waiting for its turn looks whether the group was aborted.
const POLL: Duration = Duration::from_millis(50);

struct Turn {
    /// The lane whose call comes next.
    next: usize,
    /// Lanes dropped (done: skipped by the round robin).
    done: Vec<bool>,
}

impl Turn {
    /// The lane after `from` that is not done (`from` itself if every other lane is).
    fn after(&self, from: usize) -> usize {
        let n = self.done.len();
        (1..=n)
            .map(|d| (from + d) % n)
            .find(|&l| !self.done[l])
            .unwrap_or(from)
    }
}

/// Which lane may compute.
struct Baton {
    held: Mutex<Option<usize>>,
    cv: Condvar,
}

impl Baton {
    fn take(&self, lane: usize) {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while h.is_some_and(|l| l != lane) {
            h = self.cv.wait(h).unwrap_or_else(|p| p.into_inner());
        }
        *h = Some(lane);
    }

    fn hand_on(&self, lane: usize) {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if *h == Some(lane) {
            *h = None;
            drop(h);
            self.cv.notify_all();
        }
    }

    /// Runs `f` (which may block) without the baton, then takes it back.
    fn away<R>(&self, lane: usize, f: impl FnOnce() -> R) -> R {
        self.hand_on(lane);
        let r = f();
        self.take(lane);
        r
    }
}

struct Shared<'a> {
    inner: &'a dyn Communicator,
    turn: Mutex<Turn>,
    cv: Condvar,
    timeout: Option<Duration>,
    baton: Arc<Baton>,
}

/// The lanes of one rank's communicator (see the module doc).
pub struct Lanes;

impl Lanes {
    /// `n` (at least 1) lanes over `inner`; a lane waits at most `timeout` (if given) for its
    /// turn to call. Each lane's thread calls [`Lane::enter`] before it computes.
    pub fn split(inner: &dyn Communicator, n: usize, timeout: Option<Duration>) -> Vec<Lane<'_>> {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            inner,
            turn: Mutex::new(Turn {
                next: 0,
                done: vec![false; n],
            }),
            cv: Condvar::new(),
            timeout,
            baton: Arc::new(Baton {
                held: Mutex::new(None),
                cv: Condvar::new(),
            }),
        });
        (0..n)
            .map(|index| Lane {
                shared: Arc::clone(&shared),
                index,
            })
            .collect()
    }
}

/// One lane: a [`Communicator`] for one thread of the rank.
pub struct Lane<'a> {
    shared: Arc<Shared<'a>>,
    index: usize,
}

impl Lane<'_> {
    /// This lane's index (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Takes the baton: call it on the lane's thread before it computes.
    pub fn enter(&self) {
        self.shared.baton.take(self.index)
    }

    /// Waits for this lane's turn to call.
    fn wait_turn(&self) -> Result<()> {
        let s = &*self.shared;
        let t0 = Instant::now();
        let mut turn = s.turn.lock().unwrap_or_else(|p| p.into_inner());
        while turn.next != self.index {
            if s.inner.is_aborted() {
                return Err(Error::Comm(format!(
                    "rank {}, lane {}: group aborted while waiting for the lane's turn",
                    s.inner.rank(),
                    self.index
                )));
            }
            if let Some(t) = s.timeout.filter(|&t| t0.elapsed() > t) {
                return Err(Error::Comm(format!(
                    "rank {}, lane {}: waited more than {t:?} for the lane's turn (lane {} did \
                     not make its call)",
                    s.inner.rank(),
                    self.index,
                    turn.next
                )));
            }
            turn =
                s.cv.wait_timeout(turn, POLL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        }
        Ok(())
    }

    /// Waits for this lane's turn, runs `call` (one collective call on the underlying
    /// communicator) and hands the turn to the next lane.
    fn call_in_turn<R>(&self, call: impl FnOnce(&dyn Communicator) -> Result<R>) -> Result<R> {
        self.wait_turn()?;
        let s = &*self.shared;
        // Only this lane moves the turn on from itself: it is still this lane's.
        let mut turn = s.turn.lock().unwrap_or_else(|p| p.into_inner());
        let r = call(s.inner);
        turn.next = turn.after(self.index);
        drop(turn);
        s.cv.notify_all();
        r
    }

    /// [`Lane::call_in_turn`] for the start of an exchange: a lane that must wait for its turn
    /// hands the baton on meanwhile.
    fn start_in_turn<R>(&self, call: impl FnOnce(&dyn Communicator) -> Result<R>) -> Result<R> {
        let s = &*self.shared;
        let ready = s.turn.lock().unwrap_or_else(|p| p.into_inner()).next == self.index;
        if !ready {
            s.baton.away(self.index, || self.wait_turn())?;
        }
        self.call_in_turn(call)
    }

    /// [`Lane::call_in_turn`] for a blocking call: without the baton until it returns.
    fn block_in_turn<R>(&self, call: impl FnOnce(&dyn Communicator) -> Result<R>) -> Result<R> {
        let b = &self.shared.baton;
        b.away(self.index, || self.call_in_turn(call))
    }

    /// `p` whose wait hands the baton on while it blocks.
    fn released<T: Send + 'static>(&self, p: Pending<T>) -> Pending<T> {
        if p.is_done() {
            return p;
        }
        Pending::from_op(Released {
            inner: p,
            baton: Arc::clone(&self.shared.baton),
            lane: self.index,
        })
    }
}

/// An exchange in flight of a lane with a baton.
struct Released<T> {
    inner: Pending<T>,
    baton: Arc<Baton>,
    lane: usize,
}

impl<T: Send> PendingOp<T> for Released<T> {
    fn wait(self: Box<Self>) -> Result<T> {
        let Released { inner, baton, lane } = *self;
        baton.away(lane, || inner.wait())
    }
}

impl Drop for Lane<'_> {
    fn drop(&mut self) {
        let s = &*self.shared;
        let mut turn = s.turn.lock().unwrap_or_else(|p| p.into_inner());
        turn.done[self.index] = true;
        if turn.next == self.index {
            turn.next = turn.after(self.index);
        }
        drop(turn);
        s.cv.notify_all();
        s.baton.hand_on(self.index);
    }
}

impl Communicator for Lane<'_> {
    fn rank(&self) -> usize {
        self.shared.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.shared.inner.world_size()
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
        let p = self.start_in_turn(|c| c.start_exchange_neighbors(to_left, to_right))?;
        Ok(self.released(p))
    }
    fn start_all_gather(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        let p = self.start_in_turn(|c| c.start_all_gather(t))?;
        Ok(self.released(p))
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.block_in_turn(|c| c.all_reduce_sum(t))
    }
    fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>> {
        self.block_in_turn(|c| c.gather_to_root(t))
    }
    fn barrier(&self) -> Result<()> {
        self.block_in_turn(|c| c.barrier())
    }
    fn send_to(&self, dst: usize, t: &Tensor) -> Result<()> {
        self.shared.inner.send_to(dst, t)
    }
    fn recv_from(&self, src: usize) -> Result<Tensor> {
        self.shared.inner.recv_from(src)
    }
    fn abort(&self, reason: &str) {
        self.shared.inner.abort(reason)
    }
    fn is_aborted(&self) -> bool {
        self.shared.inner.is_aborted()
    }
}

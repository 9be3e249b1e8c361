//! Communication between ranks (logical: several ranks may share one device or one CPU pool).
//!
//! The Video-Infinity exchange needs: neighbour halos (left/right), an all-gather of global tokens,
//! an all-reduce (optional GroupNorm sync), gather to rank 0, point-to-point messages (decoded
//! frames streamed to rank 0's writer), and a barrier.
//! Every call on every rank returns an error within the configured timeout once any rank has failed
//! or aborted: never a hang.
//!
//! Implementations: [`in_process`] (ranks that are threads of one process) and [`tcp`] (ranks in
//! any processes, on any machines, over TCP). Ranks find each other through a [`Rendezvous`]
//! store: [`MemoryStore`] in one process, the TCP [`store`] served by rank 0 between processes; a
//! process learns its rank and the store's address from its launcher's environment ([`world`]).
//! [`delay`] wraps any communicator with an injected latency and bandwidth limit (benchmarks of
//! the overlapped schedules on one machine).
//!
//! Asynchronous forms: `start_exchange_neighbors` and `start_all_gather` start the exchange (the
//! call index is taken then, in program order, like a blocking call's) and return a [`Pending`]
//! handle; `Pending::wait` completes it. A blocking call is start + wait. Between start and wait
//! the rank may compute and issue further calls (they take the next indices). The default forms
//! complete eagerly at start, so every implementation has them; the in-process and TCP ones send
//! at start (TCP: queued for a writer thread per peer) and receive at wait, through the mailbox
//! they share ([`mailbox`]). A pending handle dropped without `wait` does not disturb later
//! calls.
//!
//! Matching: the n-th collective call of a rank pairs with the n-th call of every other rank; the
//! call kind travels with each message, and a mismatch is an error (and aborts the group).
//! Point-to-point messages are matched per ordered pair of ranks: the n-th `send_to(dst)` of rank
//! `src` pairs with the n-th `recv_from(src)` of rank `dst`; they do not take part in the
//! collective call sequence (only the two ranks involved call them).

pub mod delay;
pub mod in_process;
mod mailbox;
pub mod pending;
pub mod rendezvous;
pub mod store;
pub mod tcp;
pub mod world;

pub use delay::{CommDelay, DelayComm};
pub use in_process::{InProcessComm, InProcessGroup};
pub use pending::{Pending, PendingOp};
pub use rendezvous::{MemoryStore, Rendezvous};
pub use store::{StoreClient, StoreServer};
pub use tcp::{TcpComm, TcpConfig};
pub use world::{expand_nodelist, Launcher, WorldEnv};

/// What a neighbour exchange returns: (what rank-1 sent right, what rank+1 sent left), None at
/// the video's ends.
pub type Halos = (Option<Tensor>, Option<Tensor>);

use crate::{Error, Result, Tensor};

/// What a rank can ask of the group. Tensors are exchanged whole; shapes may differ between ranks
/// where noted.
///
/// Every rank must issue the same sequence of collective calls (each call of each kind is matched
/// with the calls of the same index on the other ranks). A communicator belongs to one rank and is
/// used by one thread at a time.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Send `to_left` to rank-1 and `to_right` to rank+1 (None at the video's ends); returns
    /// (what rank-1 sent right, what rank+1 sent left), None at the ends.
    fn exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<Halos>;
    /// Every rank's tensor, in rank order (shapes may differ between ranks).
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
    /// [`Communicator::exchange_neighbors`] started: the call index is taken now and the tensors
    /// are handed over (or copied) before it returns, so the caller may drop them; the result
    /// comes with [`Pending::wait`]. Default: the blocking call, completed at start.
    fn start_exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<Pending<Halos>> {
        Ok(Pending::done(self.exchange_neighbors(to_left, to_right)))
    }
    /// [`Communicator::all_gather`] started (as [`Communicator::start_exchange_neighbors`]).
    fn start_all_gather(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        Ok(Pending::done(self.all_gather(t)))
    }
    /// Elementwise sum over ranks (all shapes equal). The sum is taken in rank order, so every
    /// rank gets the bit-identical result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank 0 gets every rank's tensor in rank order; other ranks get None.
    fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>>;
    fn barrier(&self) -> Result<()>;
    /// Sends `t` to rank `dst` (not this rank). Returns once the message is handed over (it may
    /// not have arrived yet); matched with the receiver's `recv_from(this rank)` of the same index.
    fn send_to(&self, dst: usize, t: &Tensor) -> Result<()>;
    /// The next tensor rank `src` (not this rank) sent to this rank with `send_to`.
    fn recv_from(&self, src: usize) -> Result<Tensor>;
    /// Mark this rank failed: every pending and future call on every rank returns an error.
    fn abort(&self, reason: &str);
    /// Whether the group has been aborted (by any rank, or by a timeout).
    fn is_aborted(&self) -> bool {
        false
    }
}

/// Elementwise sum of equal-shape tensors in the given order. CPU f32 tensors are summed here;
/// other devices/dtypes through the op vocabulary (so a CUDA tensor stays on its device).
pub(crate) fn sum_in_order(ts: &[Tensor]) -> Result<Tensor> {
    let first = &ts[0];
    for t in ts {
        if t.shape() != first.shape() {
            return Err(Error::Comm(format!(
                "all_reduce_sum: shapes differ between ranks: {:?} vs {:?}",
                first.shape(),
                t.shape()
            )));
        }
    }
    if ts.iter().all(|t| t.as_cpu_f32().is_ok()) {
        let mut acc = first.as_cpu_f32()?.to_vec();
        for t in &ts[1..] {
            for (a, b) in acc.iter_mut().zip(t.as_cpu_f32()?) {
                *a += b;
            }
        }
        return Tensor::from_vec(acc, first.shape());
    }
    let mut acc = first.clone();
    for t in &ts[1..] {
        acc = crate::ops::add(&acc, t)?;
    }
    Ok(acc)
}

/// A borrowed communicator is one (e.g. `DelayComm<&dyn Communicator>` over a rank's own).
impl<C: Communicator + ?Sized> Communicator for &C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<Halos> {
        (**self).exchange_neighbors(to_left, to_right)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        (**self).all_gather(t)
    }
    fn start_exchange_neighbors(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<Pending<Halos>> {
        (**self).start_exchange_neighbors(to_left, to_right)
    }
    fn start_all_gather(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        (**self).start_all_gather(t)
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        (**self).all_reduce_sum(t)
    }
    fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>> {
        (**self).gather_to_root(t)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
    fn send_to(&self, dst: usize, t: &Tensor) -> Result<()> {
        (**self).send_to(dst, t)
    }
    fn recv_from(&self, src: usize) -> Result<Tensor> {
        (**self).recv_from(src)
    }
    fn abort(&self, reason: &str) {
        (**self).abort(reason)
    }
    fn is_aborted(&self) -> bool {
        (**self).is_aborted()
    }
}

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
//! store: [`MemoryStore`] in one process, the TCP [`store`] served by rank 0 between processes; a process learns its rank and the store's address from its
//! launcher's environment ([`world`]).
//!
//! Matching: the n-th collective call of a rank pairs with the n-th call of every other rank; the
//! call kind travels with each message, and a mismatch is an error (and aborts the group).
//! Point-to-point messages are matched per ordered pair of ranks: the n-th `send_to(dst)` of rank
//! `src` pairs with the n-th `recv_from(src)` of rank `dst`; they do not take part in the
//! collective call sequence (only the two ranks involved call them).

pub mod in_process;
pub mod rendezvous;
pub mod store;
pub mod tcp;
pub mod world;

pub use in_process::{InProcessComm, InProcessGroup};
pub use rendezvous::{MemoryStore, Rendezvous};
pub use store::{StoreClient, StoreServer};
pub use tcp::{TcpComm, TcpConfig};
pub use world::{expand_nodelist, Launcher, WorldEnv};

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
    ) -> Result<(Option<Tensor>, Option<Tensor>)>;
    /// Every rank's tensor, in rank order (shapes may differ between ranks).
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
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

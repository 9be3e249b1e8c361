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
//! With the `cuda` feature, [`nccl`] moves CUDA tensors between GPUs with NCCL (the library
//! found by [`nccl_lib`]); [`CommChoice`] says which data plane a run uses and
//! [`in_process_group`] / [`agree_on_nccl`] apply it.
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
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod nccl_lib;
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

use std::time::Duration;

use crate::{Device, Error, Result, Tensor};

/// Which data plane carries the ranks' tensors (`--comm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommChoice {
    /// NCCL when every rank has a CUDA device of its own and the library is there (and the
    /// build has the `cuda` feature), else the host path.
    #[default]
    Auto,
    /// The host path: in-process hand-over or TCP, copies through the host between GPUs.
    Host,
    /// NCCL, or an error saying why it cannot be used.
    Nccl,
}

impl std::str::FromStr for CommChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(CommChoice::Auto),
            "host" => Ok(CommChoice::Host),
            "nccl" => Ok(CommChoice::Nccl),
            other => Err(format!(
                "unknown data plane {other:?}: expected auto, host or nccl"
            )),
        }
    }
}

/// Whether ranks that are threads of this process, on `devices`, exchange through NCCL under
/// `choice`: `Auto` when there are several ranks, each with a CUDA device of its own (or NCCL
/// allows sharing) and the library is there; `Nccl` always, or an error saying why it cannot;
/// `Host` never.
pub fn nccl_in_process(devices: &[Device], choice: CommChoice) -> Result<bool> {
    #[cfg(feature = "cuda")]
    {
        match choice {
            CommChoice::Host => Ok(false),
            CommChoice::Auto => Ok(devices.len() > 1 && nccl::usable_for(devices).is_ok()),
            CommChoice::Nccl => nccl::usable_for(devices)
                .map(|()| true)
                .map_err(|why| Error::Comm(format!("--comm nccl: {why}"))),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = devices;
        match choice {
            CommChoice::Nccl => Err(Error::Comm(
                "--comm nccl: this build has no CUDA support (build with --features cuda)".into(),
            )),
            _ => Ok(false),
        }
    }
}

/// One communicator per entry of `devices` (rank = index) for ranks that are threads of this
/// process, on the data plane [`nccl_in_process`] selects (the host path is
/// [`InProcessGroup::new_on_devices`]).
pub fn in_process_group(
    devices: &[Device],
    timeout: Duration,
    choice: CommChoice,
) -> Result<Vec<Box<dyn Communicator>>> {
    if nccl_in_process(devices, choice)? {
        #[cfg(feature = "cuda")]
        return Ok(nccl::NcclComm::group_in_process(devices, timeout)?
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Communicator>)
            .collect());
    }
    Ok(InProcessGroup::new_on_devices(devices, timeout)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect())
}

/// The NCCL communicator of rank `host.rank()` (`nccl::NcclComm::connect`: rank 0 publishes the
/// unique id under `key` in `store`) over the host communicator `host`, which then carries the
/// control plane; for a job [`agree_on_nccl`] put on NCCL. An error without the `cuda` feature.
pub fn connect_nccl(
    host: Box<dyn Communicator>,
    device: Device,
    store: &dyn Rendezvous,
    key: &str,
    timeout: Duration,
) -> Result<Box<dyn Communicator>> {
    #[cfg(feature = "cuda")]
    {
        Ok(Box::new(nccl::NcclComm::connect(
            host, device, store, key, timeout,
        )?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (host, device, store, key, timeout);
        Err(Error::Comm(
            "NCCL: this build has no CUDA support (build with --features cuda)".into(),
        ))
    }
}

/// 0 auto, 1 host, 2 nccl: how a rank's choice travels in its readiness record.
pub(crate) fn choice_code(choice: CommChoice) -> u8 {
    match choice {
        CommChoice::Auto => 0,
        CommChoice::Host => 1,
        CommChoice::Nccl => 2,
    }
}

/// This rank's readiness record for [`agree_on_nccl`] and, when NCCL is unusable here, why.
fn nccl_readiness(device: Device, choice: CommChoice) -> (Vec<u8>, Option<String>) {
    #[cfg(feature = "cuda")]
    {
        nccl::readiness(device, choice)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        let mut v = vec![choice_code(choice), 0, 0];
        v.extend_from_slice(&[0; 16]);
        (
            v,
            Some("this build has no CUDA support (build with --features cuda)".into()),
        )
    }
}

/// Decides, identically on every rank of a multi-process job, whether its data plane is NCCL:
/// each rank publishes its choice and readiness under `prefix/<rank>` in `store` and reads every
/// other rank's (waiting up to `timeout`). NCCL when no rank asked for the host path, every rank
/// can use NCCL and no GPU serves two ranks (unless every rank allows it); an error when a rank
/// asked for NCCL and it cannot be used.
pub fn agree_on_nccl(
    store: &dyn Rendezvous,
    prefix: &str,
    rank: usize,
    world: usize,
    device: Device,
    choice: CommChoice,
    timeout: Duration,
) -> Result<bool> {
    let (mine, why) = nccl_readiness(device, choice);
    store.set(&format!("{prefix}/{rank}"), &mine)?;
    let mut all = Vec::with_capacity(world);
    for r in 0..world {
        let v = store.get(&format!("{prefix}/{r}"), timeout)?;
        if v.len() != mine.len() {
            return Err(Error::Comm(format!(
                "rank {r}'s NCCL readiness under {prefix:?} has {} bytes, not {}",
                v.len(),
                mine.len()
            )));
        }
        all.push(v);
    }
    let any_host = all.iter().any(|v| v[0] == 1);
    let any_nccl = all.iter().any(|v| v[0] == 2);
    let unusable: Vec<usize> = (0..world).filter(|&r| all[r][1] == 0).collect();
    let mut uuids: Vec<&[u8]> = all.iter().map(|v| &v[3..]).collect();
    uuids.sort_unstable();
    let shared_gpu = uuids.windows(2).any(|w| w[0] == w[1]);
    let multi_ok = all.iter().all(|v| v[2] == 1);
    let problem = if !unusable.is_empty() {
        Some(format!(
            "NCCL cannot be used on rank(s) {unusable:?}{}",
            why.map(|w| format!(" (here: {w})")).unwrap_or_default()
        ))
    } else if shared_gpu && !multi_ok {
        Some(format!(
            "several ranks share a GPU, which NCCL refuses (it needs NCCL {} or newer and \
             NCCL_MULTI_RANK_GPU_ENABLE=1 on every rank)",
            nccl_lib::MULTI_RANK_GPU_VERSION
        ))
    } else {
        None
    };
    match (any_host, any_nccl, problem) {
        (true, true, _) => Err(Error::Comm(
            "ranks disagree on the data plane: some ask for --comm host, some for --comm nccl"
                .into(),
        )),
        (true, false, _) => Ok(false),
        (false, true, Some(p)) => Err(Error::Comm(format!("--comm nccl: {p}"))),
        (false, true, None) => Ok(true),
        (false, false, None) => Ok(world > 1),
        (false, false, Some(_)) => Ok(false),
    }
}

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
            for (a, b) in acc.iter_mut().zip(t.as_cpu_f32()?.iter()) {
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

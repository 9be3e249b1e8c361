//! The NCCL data plane (feature `cuda`): [`NcclComm`], a [`Communicator`] whose neighbour
//! exchanges and all-gathers move CUDA tensors between GPUs with `ncclSend` / `ncclRecv`, without
//! a copy through the host and without blocking the host.
//!
//! * Library: opened by [`super::nccl_lib`] (`libnccl.so.2`, `VI_NCCL_LIBRARY`), its functions
//!   bound here with cudarc's NCCL types (cudarc's own loader never tries `libnccl.so.2`).
//! * Construction: one process driving several GPUs ([`NcclComm::group_in_process`],
//!   `ncclCommInitAll`, then one thread per rank) or one communicator per process or rank
//!   ([`NcclComm::connect`]: rank 0 publishes the 128-byte unique id in the rendezvous store).
//! * Streams: each rank has a communication stream of its own (highest priority) beside its
//!   device's compute stream (the one stream all kernels of that device run on). A `start_*` call
//!   records an event on the compute stream, makes the communication stream wait for it, and
//!   enqueues the sends and
//!   receives of the exchange there inside one `ncclGroupStart` / `ncclGroupEnd`; `Pending::wait`
//!   makes the compute stream wait for an event recorded after them. Neither blocks the host: the
//!   kernels issued between start and wait overlap the transfer on the GPU. No device-wide
//!   synchronisation anywhere.
//! * Buffers: receive buffers are allocated on the compute stream before the first event, so the
//!   allocation is ordered before the transfer; the tensors sent and received are held by the
//!   handle until the compute stream has waited for the transfer (also when the handle is dropped
//!   unwaited), so a buffer is never freed (stream-ordered, on the compute stream) while NCCL
//!   still reads or writes it.
//! * Control plane: a host communicator (in-process or TCP) carries what the host must know
//!   before enqueuing a receive: the shape and dtype each peer sends (one small host exchange per
//!   call, in the same call order). Barriers, `gather_to_root`, point-to-point messages (decoded
//!   frames) and aborts go through it too; received tensors land on this rank's device.
//! * Reductions: `all_reduce_sum` is an all-gather then a sum in rank order, so every rank gets
//!   the bit-identical result (no NCCL all-reduce, whose summation order is its own).
//! * Failures: a host-side abort or an NCCL error marks the communicator failed; later calls fail
//!   at once. A watchdog thread per rank aborts the NCCL communicator (`ncclCommAbort`) as soon as
//!   the group is aborted, which ends a transfer whose peer will never take part and so frees a
//!   host thread blocked reading the GPU. On drop the communication stream is given the group
//!   timeout to drain, then the communicator is aborted, never destroyed collectively.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclUniqueId};

use super::nccl_lib::{self, NcclVersion, MULTI_RANK_GPU_VERSION};
use super::{sum_in_order, Communicator, Halos, InProcessComm, InProcessGroup, Pending, PendingOp};
use super::{CommChoice, Rendezvous};
use crate::cuda::device::{self, cuda_err, CudaDevice};
use crate::{DType, Device, Error, Result, Tensor};

/// The NCCL functions the data plane calls (signatures of `nccl.h`, types of cudarc's bindings;
/// `ncclResult_t` and `ncclDataType_t` travel as C ints).
struct Api {
    lib: &'static nccl_lib::NcclLibrary,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int,
    comm_init_all: unsafe extern "C" fn(*mut ncclComm_t, c_int, *const c_int) -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
    send:
        unsafe extern "C" fn(*const c_void, usize, c_int, c_int, ncclComm_t, *mut c_void) -> c_int,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, ncclComm_t, *mut c_void) -> c_int,
}

/// Every transfer moves bytes (no reduction happens in NCCL).
const BYTES: c_int = ncclDataType_t::ncclUint8 as c_int;

impl Api {
    fn load() -> Result<&'static Api> {
        static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
        API.get_or_init(|| Api::bind().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Msg(e.clone()))
    }

    fn bind() -> Result<Api> {
        let lib = nccl_lib::library()?;
        // SAFETY: each type is the C signature of the named function in NCCL >= 2.7 (`nccl.h`;
        // `nccl_lib` refuses older libraries); `lib` is the process-wide library, never unloaded.
        unsafe {
            Ok(Api {
                lib,
                get_error_string: lib.function("ncclGetErrorString")?,
                get_unique_id: lib.function("ncclGetUniqueId")?,
                comm_init_rank: lib.function("ncclCommInitRank")?,
                comm_init_all: lib.function("ncclCommInitAll")?,
                comm_abort: lib.function("ncclCommAbort")?,
                comm_get_async_error: lib.function("ncclCommGetAsyncError")?,
                group_start: lib.function("ncclGroupStart")?,
                group_end: lib.function("ncclGroupEnd")?,
                send: lib.function("ncclSend")?,
                recv: lib.function("ncclRecv")?,
            })
        }
    }

    /// `Ok` for `ncclSuccess`, else an error naming the call and NCCL's description.
    fn check(&self, r: c_int, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe {
            let p = (self.get_error_string)(r);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(Error::Comm(format!(
            "{what} failed: NCCL error {r} ({msg}); NCCL {} from {} (NCCL_DEBUG=WARN says more)",
            self.lib.version(),
            self.lib.name()
        )))
    }
}

/// Whether NCCL can serve ranks on `devices` in one process: every device CUDA, the library
/// present, and no GPU twice (unless the library allows several ranks per GPU). The reason
/// when not.
pub fn usable_for(devices: &[Device]) -> std::result::Result<(), String> {
    let mut ords = Vec::new();
    for d in devices {
        match d {
            Device::Cuda(o) => ords.push(*o),
            other => return Err(format!("a rank is on {other:?}, not a CUDA device")),
        }
    }
    let api = Api::load().map_err(|e| e.to_string())?;
    let mut sorted = ords.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) && !multi_rank_gpu_allowed(api.lib.version()) {
        return Err(format!(
            "several ranks share a GPU (devices {devices:?}); NCCL {} refuses that (it needs NCCL \
             {MULTI_RANK_GPU_VERSION} or newer and NCCL_MULTI_RANK_GPU_ENABLE=1)",
            api.lib.version()
        ));
    }
    for &o in &ords {
        device::device(o).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Several ranks of one communicator may share a GPU: NCCL >= 2.30 with
/// `NCCL_MULTI_RANK_GPU_ENABLE=1` in the environment.
fn multi_rank_gpu_allowed(v: NcclVersion) -> bool {
    v >= MULTI_RANK_GPU_VERSION
        && std::env::var("NCCL_MULTI_RANK_GPU_ENABLE").is_ok_and(|s| s.trim() == "1")
}

/// An NCCL communicator handle, aborted when dropped.
struct RawComm {
    api: &'static Api,
    comm: ncclComm_t,
}

// SAFETY: an NCCL communicator may be used from any thread as long as one thread at a time uses
// it (NCCL's thread-safety rules); `NcclComm` keeps it behind a mutex.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: `comm` is a live communicator owned by this value, aborted exactly once.
        let r = unsafe { (self.api.comm_abort)(self.comm) };
        if let Err(e) = self.api.check(r, "ncclCommAbort") {
            eprintln!("vi-runtime: {e}");
        }
    }
}

/// The host communicator carrying the control plane (see the module doc).
enum Host {
    /// Threads of one process (kept concrete for its abort reason).
    InProcess(InProcessComm),
    Other(Box<dyn Communicator>),
}

impl Host {
    fn comm(&self) -> &dyn Communicator {
        match self {
            Host::InProcess(c) => c,
            Host::Other(c) => &**c,
        }
    }
}

/// One rank's NCCL communicator (see the module doc). Every tensor it sends or receives through
/// NCCL lives on its device; tensors handed to it on another device are copied there first.
pub struct NcclComm {
    rank: usize,
    world: usize,
    api: &'static Api,
    /// The NCCL handle; locked for each group of calls (one thread at a time). Null once the
    /// watchdog has aborted it.
    raw: Arc<Mutex<RawComm>>,
    dev: Arc<CudaDevice>,
    /// The communication stream of this rank (on `dev`).
    comm_stream: Arc<CudaStream>,
    host: Arc<Host>,
    timeout: Duration,
    /// Set once by the first NCCL error: the communicator is not used again.
    failed: Arc<Mutex<Option<String>>>,
    /// Some ranks of this group share a device, hence its compute stream (the one stream of a
    /// `CudaDevice`): see `enqueue_exchange`. The same on every rank of the group.
    shares_stream: bool,
    /// Stops the watchdog (see [`watchdog`]); joined on drop.
    watchdog: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {} of {}, cuda:{})",
            self.rank,
            self.world,
            self.dev.ordinal()
        )
    }
}

impl NcclComm {
    /// One process driving one GPU per rank (`devices[r]` is rank r's; ranks then run as
    /// threads, one communicator each): one `ncclCommInitAll`, and an in-process control plane.
    /// An error (never a panic) when NCCL cannot serve these devices ([`usable_for`]).
    pub fn group_in_process(devices: &[Device], timeout: Duration) -> Result<Vec<NcclComm>> {
        if devices.is_empty() {
            return Err(Error::Comm("an NCCL group needs at least one rank".into()));
        }
        usable_for(devices).map_err(|why| Error::Comm(format!("NCCL cannot be used: {why}")))?;
        let api = Api::load()?;
        let devs: Vec<Arc<CudaDevice>> = devices
            .iter()
            .map(|d| match d {
                Device::Cuda(o) => device::device(*o),
                _ => unreachable!("usable_for checked every device is CUDA"),
            })
            .collect::<Result<_>>()?;
        let ords: Vec<c_int> = devs.iter().map(|d| d.ordinal() as c_int).collect();
        let mut handles: Vec<ncclComm_t> = vec![std::ptr::null_mut(); devs.len()];
        devs[0]
            .ctx()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: `handles` and `ords` hold `devs.len()` entries; NCCL writes one communicator per
        // device (it sets each device current itself).
        let r = unsafe {
            (api.comm_init_all)(handles.as_mut_ptr(), ords.len() as c_int, ords.as_ptr())
        };
        api.check(r, &format!("ncclCommInitAll on devices {devices:?}"))?;
        // Owned from here: dropped (aborted) on any later error.
        let raws: Vec<RawComm> = handles
            .into_iter()
            .map(|comm| RawComm { api, comm })
            .collect();
        let hosts = InProcessGroup::new(devs.len(), timeout);
        // Group-wide (the barrier it implies is a collective call of every rank).
        let shares = (1..devices.len()).any(|i| devices[..i].contains(&devices[i]));
        raws.into_iter()
            .zip(hosts)
            .zip(devs)
            .enumerate()
            .map(|(rank, ((raw, host), dev))| {
                Self::assemble(
                    rank,
                    devices.len(),
                    raw,
                    dev,
                    Host::InProcess(host),
                    timeout,
                    shares,
                )
            })
            .collect()
    }

    /// The communicator of the rank `host.rank()` of `host.world_size()`, one per process (or
    /// per rank thread of a process): rank 0 makes the unique id and publishes its 128 bytes in
    /// `store` under `key`; the others read it (waiting up to `timeout`). Every rank must call
    /// this, with its own device; `host` then carries the control plane (build it with no
    /// device: received metadata must stay on the host).
    pub fn connect(
        host: Box<dyn Communicator>,
        device: Device,
        store: &dyn Rendezvous,
        key: &str,
        timeout: Duration,
    ) -> Result<NcclComm> {
        let (rank, world) = (host.rank(), host.world_size());
        let ordinal = match device {
            Device::Cuda(o) => o,
            other => {
                return Err(Error::Comm(format!(
                    "rank {rank}: NCCL needs a CUDA device, this rank is on {other:?}"
                )))
            }
        };
        let api = Api::load()?;
        let dev = device::device(ordinal)?;
        let id = if rank == 0 {
            let mut id = ncclUniqueId { internal: [0; 128] };
            // SAFETY: writes one ncclUniqueId through a valid pointer.
            let r = unsafe { (api.get_unique_id)(&mut id) };
            api.check(r, "ncclGetUniqueId")?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            store.set(key, &bytes)?;
            id
        } else {
            let bytes = store.get(key, timeout)?;
            if bytes.len() != 128 {
                return Err(Error::Comm(format!(
                    "rank {rank}: the NCCL unique id under rendezvous key {key:?} has {} bytes, \
                     not 128",
                    bytes.len()
                )));
            }
            let mut id = ncclUniqueId { internal: [0; 128] };
            for (d, s) in id.internal.iter_mut().zip(&bytes) {
                *d = *s as c_char;
            }
            id
        };
        // Every rank's GPU (UUID), gathered over the host: also the barrier that makes every rank
        // alive and holding the id before any blocks in ncclCommInitRank (which has no timeout of
        // its own), bounded by the host communicator's timeout.
        let uuid = dev.ctx().uuid().map_err(|e| cuda_err("device UUID", e))?;
        let mine: Vec<f32> = uuid.bytes.iter().map(|&b| b as u8 as f32).collect();
        let gpus = host
            .all_gather(&Tensor::from_vec(mine, &[16])?)?
            .iter()
            .map(|t| t.to_vec_f32())
            .collect::<Result<Vec<_>>>()?;
        // Ranks on one GPU may be threads of one process, sharing its compute stream (one CUDA
        // context per device and process): assumed whenever a GPU serves two ranks. Group-wide,
        // as the barrier it implies is a collective call.
        let shares = (1..gpus.len()).any(|i| gpus[..i].contains(&gpus[i]));
        dev.ctx()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: writes one communicator handle; `id` is a 128-byte unique id by value.
        let r = unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        api.check(
            r,
            &format!("ncclCommInitRank (rank {rank} of {world}, cuda:{ordinal})"),
        )?;
        Self::assemble(
            rank,
            world,
            RawComm { api, comm },
            dev,
            Host::Other(host),
            timeout,
            shares,
        )
    }

    fn assemble(
        rank: usize,
        world: usize,
        raw: RawComm,
        dev: Arc<CudaDevice>,
        host: Host,
        timeout: Duration,
        shares_stream: bool,
    ) -> Result<NcclComm> {
        // The highest priority: when the compute kernels fill the GPU, the blocks of a transfer
        // that became ready are scheduled first, so the exchange is not queued behind them.
        dev.ctx()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let (_, greatest) = cudarc::driver::result::stream::get_priority_range()
            .map_err(|e| cuda_err("stream priority range", e))?;
        let comm_stream = dev
            .ctx()
            .new_stream_with_priority(greatest)
            .map_err(|e| cuda_err("creating the NCCL communication stream", e))?;
        let api = raw.api;
        let raw = Arc::new(Mutex::new(raw));
        let host = Arc::new(host);
        let failed = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (raw, host, failed, stop) =
                (raw.clone(), host.clone(), failed.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("vi-nccl-watchdog-{rank}"))
                .spawn(move || watchdog(rank, &raw, &host, &failed, &stop))
                .map_err(|e| Error::Comm(format!("starting the NCCL watchdog thread: {e}")))?
        };
        Ok(NcclComm {
            rank,
            world,
            api,
            raw,
            dev,
            comm_stream,
            host,
            timeout,
            failed,
            shares_stream,
            watchdog: Some((stop, handle)),
        })
    }

    /// The device this rank's tensors live on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.dev.ordinal())
    }

    /// The NCCL version in use.
    pub fn nccl_version(&self) -> NcclVersion {
        self.api.lib.version()
    }

    /// The reason the group was aborted (in-process groups), if it was.
    pub fn abort_reason(&self) -> Option<String> {
        match &*self.host {
            Host::InProcess(c) => c.abort_reason(),
            Host::Other(_) => self.lock_failed().clone(),
        }
    }

    fn lock_failed(&self) -> MutexGuard<'_, Option<String>> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_raw(&self) -> MutexGuard<'_, RawComm> {
        self.raw.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `e` as this communicator's failure and aborts the group (every peer's next host
    /// call fails).
    /// An error already recorded, or raised while the group is already aborted (a peer failed
    /// first, the host call timed out), is returned as it is.
    fn fail(&self, e: Error) -> Error {
        let mut f = self.lock_failed();
        if f.is_some() || self.host.comm().is_aborted() {
            return e;
        }
        let msg = format!("rank {}: {e}", self.rank);
        *f = Some(msg.clone());
        drop(f);
        self.host.comm().abort(&msg);
        Error::Comm(msg)
    }

    /// Fails when an earlier call failed, the group was aborted, or NCCL reports an
    /// asynchronous error (a peer that vanished, a network failure).
    fn check_usable(&self, what: &str) -> Result<()> {
        if let Some(f) = self.lock_failed().clone() {
            return Err(Error::Comm(format!(
                "rank {}: {what}: the NCCL communicator failed earlier: {f}",
                self.rank
            )));
        }
        if self.host.comm().is_aborted() {
            return Err(Error::Comm(format!(
                "rank {}: {what}: group aborted{}",
                self.rank,
                self.abort_reason()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )));
        }
        let raw = self.lock_raw();
        if raw.comm.is_null() {
            return Err(Error::Comm(format!(
                "rank {}: {what}: the NCCL communicator was aborted",
                self.rank
            )));
        }
        let mut async_err: c_int = 0;
        // SAFETY: queries a live communicator; writes one int.
        let r = unsafe { (self.api.comm_get_async_error)(raw.comm, &mut async_err) };
        drop(raw);
        self.api
            .check(r, "ncclCommGetAsyncError")
            .and_then(|_| self.api.check(async_err, "an earlier NCCL operation"))
            .map_err(|e| self.fail(e))
    }

    /// `t` on this rank's device (a copy through the host when it is elsewhere).
    fn local(&self, t: &Tensor) -> Result<Tensor> {
        let d = self.device();
        if t.device() == d {
            Ok(t.clone())
        } else {
            t.to_device(d)
        }
    }

    /// [`Self::enqueue`], then, when ranks of this process share this device's compute stream,
    /// a host barrier: every rank has recorded its "ready" event on the shared stream before any
    /// rank can queue its wait for the transfer behind it there. (Otherwise rank a's wait could
    /// land on the stream before rank b's ready event, which would then wait for a transfer that
    /// needs b's half: a cycle on the GPU.)
    fn enqueue_exchange(
        &self,
        sends: Vec<(usize, Tensor)>,
        recvs: &[(usize, Meta)],
    ) -> Result<InFlight> {
        let inflight = self.enqueue(sends, recvs)?;
        if self.shares_stream {
            self.host.comm().barrier()?;
        }
        Ok(inflight)
    }

    /// Enqueues one NCCL group: `sends` (peer, tensor on this device) and receives from each
    /// peer of `recvs` into fresh buffers of the announced dtype and shape. Ordered after
    /// everything issued on the compute stream so far; returns without blocking the host.
    fn enqueue(&self, sends: Vec<(usize, Tensor)>, recvs: &[(usize, Meta)]) -> Result<InFlight> {
        let ctx = self.dev.ctx();
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // Receive buffers: allocated on the compute stream, before the event the transfer waits on.
        let mut outs = Vec::with_capacity(recvs.len());
        for (_, m) in recvs {
            let n: usize = m.shape.iter().product();
            outs.push(self.dev.alloc(m.dtype, n)?.into_tensor(&m.shape));
        }
        let compute = self.dev.stream();
        let ready = compute
            .record_event(None)
            .map_err(|e| cuda_err("recording the compute stream's event", e))?;
        self.comm_stream
            .wait(&ready)
            .map_err(|e| cuda_err("ordering the NCCL stream after the compute stream", e))?;
        let stream = self.comm_stream.cu_stream() as *mut c_void;
        // (peer, device address, bytes) of every send and receive, empty ones left out (both
        // sides know the size, so both skip it).
        // The storage handles keep the buffers themselves alive (a tensor offloaded meanwhile,
        // crate::offload, drops only its own reference).
        let mut held = Vec::with_capacity(sends.len() + outs.len());
        let mut send_ops = Vec::with_capacity(sends.len());
        for (peer, t) in &sends {
            let s = device::storage(t, "NCCL send")?;
            send_ops.push((*peer, s.ptr(), byte_len(t)));
            held.push(s);
        }
        let mut recv_ops = Vec::with_capacity(outs.len());
        for ((peer, _), t) in recvs.iter().zip(&outs) {
            let s = device::storage(t, "NCCL receive")?;
            recv_ops.push((*peer, s.ptr(), byte_len(t)));
            held.push(s);
        }
        send_ops.retain(|op| op.2 > 0);
        recv_ops.retain(|op| op.2 > 0);
        let raw = self.lock_raw();
        if raw.comm.is_null() {
            return Err(Error::Comm(format!(
                "rank {}: the NCCL communicator was aborted",
                self.rank
            )));
        }
        // SAFETY: group calls of this thread on a live communicator; each address is that of a
        // live buffer of `bytes` bytes on this communicator's device, kept alive by the returned
        // `InFlight` until the compute stream has waited for the transfer.
        let result = unsafe {
            let mut result = self.api.check((self.api.group_start)(), "ncclGroupStart");
            let started = result.is_ok();
            if result.is_ok() {
                for &(peer, ptr, bytes) in &send_ops {
                    let r = (self.api.send)(
                        ptr as *const c_void,
                        bytes,
                        BYTES,
                        peer as c_int,
                        raw.comm,
                        stream,
                    );
                    result = self.api.check(r, &format!("ncclSend to rank {peer}"));
                    if result.is_err() {
                        break;
                    }
                }
            }
            if result.is_ok() {
                for &(peer, ptr, bytes) in &recv_ops {
                    let r = (self.api.recv)(
                        ptr as *mut c_void,
                        bytes,
                        BYTES,
                        peer as c_int,
                        raw.comm,
                        stream,
                    );
                    result = self.api.check(r, &format!("ncclRecv from rank {peer}"));
                    if result.is_err() {
                        break;
                    }
                }
            }
            // A started group is always ended (also after an error inside it).
            if result.is_ok() {
                self.api.check((self.api.group_end)(), "ncclGroupEnd")
            } else {
                if started {
                    let _ = (self.api.group_end)();
                }
                result
            }
        };
        drop(raw);
        result.map_err(|e| self.fail(e))?;
        let done = self
            .comm_stream
            .record_event(None)
            .map_err(|e| cuda_err("recording the NCCL stream's event", e))?;
        Ok(InFlight {
            compute: compute.clone(),
            done: Some(done),
            keep: sends.into_iter().map(|(_, t)| t).collect(),
            held,
            outs,
        })
    }

    /// Sends to and receives from the listed peers: the host exchange of what each sends comes
    /// first (`metas` from the host call), then the NCCL group.
    fn neighbours(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<NeighborsOp> {
        self.check_usable("exchange_neighbors")?;
        // Any failure from here on leaves peers expecting this rank's half: abort the group.
        self.try_neighbours(to_left, to_right)
            .map_err(|e| self.fail(e))
    }

    fn try_neighbours(
        &self,
        to_left: Option<&Tensor>,
        to_right: Option<&Tensor>,
    ) -> Result<NeighborsOp> {
        let (r, w) = (self.rank, self.world);
        // Only what has a peer to go to is sent (as the host communicators do).
        let to_left = if r > 0 { to_left } else { None };
        let to_right = if r + 1 < w { to_right } else { None };
        let ml = to_left.map(Meta::of).transpose()?;
        let mr = to_right.map(Meta::of).transpose()?;
        let (from_left, from_right) = self
            .host
            .comm()
            .exchange_neighbors(ml.as_ref().map(|m| &m.host), mr.as_ref().map(|m| &m.host))?;
        let mut sends = Vec::new();
        if let Some(t) = to_left {
            sends.push((r - 1, self.local(t)?));
        }
        if let Some(t) = to_right {
            sends.push((r + 1, self.local(t)?));
        }
        let mut recvs = Vec::new();
        let left = match from_left.filter(|_| r > 0) {
            Some(m) => {
                recvs.push((r - 1, Meta::parse(&m, r - 1)?));
                Some(recvs.len() - 1)
            }
            None => None,
        };
        let right = match from_right.filter(|_| r + 1 < w) {
            Some(m) => {
                recvs.push((r + 1, Meta::parse(&m, r + 1)?));
                Some(recvs.len() - 1)
            }
            None => None,
        };
        Ok(NeighborsOp {
            inflight: self.enqueue_exchange(sends, &recvs)?,
            left,
            right,
        })
    }

    fn gather(&self, t: &Tensor) -> Result<GatherOp> {
        self.check_usable("all_gather")?;
        // Any failure from here on leaves peers expecting this rank's half: abort the group.
        self.try_gather(t).map_err(|e| self.fail(e))
    }

    fn try_gather(&self, t: &Tensor) -> Result<GatherOp> {
        let meta = Meta::of(t)?;
        let metas = self.host.comm().all_gather(&meta.host)?;
        if metas.len() != self.world {
            return Err(Error::Comm(format!(
                "rank {}: all_gather: the host communicator returned {} entries for {} ranks",
                self.rank,
                metas.len(),
                self.world
            )));
        }
        let mine = self.local(t)?;
        let peers: Vec<usize> = (0..self.world).filter(|&p| p != self.rank).collect();
        let sends = peers.iter().map(|&p| (p, mine.clone())).collect();
        let recvs = peers
            .iter()
            .map(|&p| Ok((p, Meta::parse(&metas[p], p)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(GatherOp {
            inflight: self.enqueue_exchange(sends, &recvs)?,
            own: t.clone(),
            rank: self.rank,
        })
    }
}

fn byte_len(t: &Tensor) -> usize {
    t.shape().iter().product::<usize>() * t.dtype().size_in_bytes()
}

/// What the receiver must know before it enqueues a receive: the sender's dtype and shape,
/// carried as a small CPU f32 tensor `[dtype code, ndim, dims...]` by the host communicator.
struct Meta {
    dtype: DType,
    shape: Vec<usize>,
    host: Tensor,
}

impl Meta {
    /// Dims travel as f32: exact below 2^24.
    const MAX_DIM: usize = 1 << 24;

    fn of(t: &Tensor) -> Result<Meta> {
        if let Some(d) = t.shape().iter().find(|&&d| d >= Self::MAX_DIM) {
            return Err(Error::Comm(format!(
                "NCCL exchange: a dimension of {d} in shape {:?} is too large to announce",
                t.shape()
            )));
        }
        let code = match t.dtype() {
            DType::F32 => 0.0,
            DType::F16 => 1.0,
            DType::BF16 => 2.0,
        };
        let mut v = vec![code, t.shape().len() as f32];
        v.extend(t.shape().iter().map(|&d| d as f32));
        let n = v.len();
        Ok(Meta {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            host: Tensor::from_vec(v, &[n])?,
        })
    }

    fn parse(m: &Tensor, from: usize) -> Result<Meta> {
        let bad = || {
            Error::Comm(format!(
                "NCCL exchange: malformed announcement from rank {from}"
            ))
        };
        let v = m.as_cpu_f32().map_err(|_| bad())?;
        if v.len() < 2 || v.len() != 2 + v[1] as usize {
            return Err(bad());
        }
        let dtype = match v[0] as u32 {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::BF16,
            _ => return Err(bad()),
        };
        Ok(Meta {
            dtype,
            shape: v[2..].iter().map(|&d| d as usize).collect(),
            host: m.clone(),
        })
    }
}

/// One enqueued NCCL group: the tensors it reads and writes, held until the compute stream has
/// waited for `done` (in `finish`, or on drop).
struct InFlight {
    compute: Arc<CudaStream>,
    /// Recorded on the communication stream after the group.
    done: Option<CudaEvent>,
    /// The tensors sent (NCCL reads them until `done`).
    keep: Vec<Tensor>,
    /// The device buffers of the sends and receives, held until `done` is ordered.
    held: Vec<device::CudaRef>,
    /// The receive buffers, in the order of the receives.
    outs: Vec<Tensor>,
}

impl InFlight {
    /// Orders the compute stream after the transfer; the received tensors are then safe to use
    /// (and the sent ones to free) on it.
    fn finish(mut self) -> Result<Vec<Tensor>> {
        self.order()?;
        self.keep.clear();
        self.held.clear();
        Ok(std::mem::take(&mut self.outs))
    }

    fn order(&mut self) -> Result<()> {
        if let Some(done) = self.done.take() {
            self.compute
                .wait(&done)
                .map_err(|e| cuda_err("ordering the compute stream after NCCL", e))?;
        }
        Ok(())
    }
}

impl Drop for InFlight {
    /// Unwaited (an error path): the compute stream still waits for the transfer before any of
    /// its buffers can be freed and reused.
    fn drop(&mut self) {
        if let Err(e) = self.order() {
            eprintln!("vi-runtime: dropping an NCCL exchange: {e}");
        }
    }
}

struct NeighborsOp {
    inflight: InFlight,
    /// Indices of the halos from rank-1 and rank+1 among the receives.
    left: Option<usize>,
    right: Option<usize>,
}

impl PendingOp<Halos> for NeighborsOp {
    fn wait(self: Box<Self>) -> Result<Halos> {
        let NeighborsOp {
            inflight,
            left,
            right,
        } = *self;
        let outs = inflight.finish()?;
        Ok((
            left.map(|i| outs[i].clone()),
            right.map(|i| outs[i].clone()),
        ))
    }
}

struct GatherOp {
    inflight: InFlight,
    own: Tensor,
    rank: usize,
}

impl PendingOp<Vec<Tensor>> for GatherOp {
    fn wait(self: Box<Self>) -> Result<Vec<Tensor>> {
        let GatherOp {
            inflight,
            own,
            rank,
        } = *self;
        let mut all = inflight.finish()?;
        all.insert(rank, own);
        Ok(all)
    }
}

/// How often the watchdog looks at the group.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(20);

/// Runs beside each rank until `stop`: once the group is aborted (by any rank, a timeout or this
/// communicator's own failure) it aborts the NCCL communicator, so that a transfer whose peer will
/// never take part (a rank that failed after announcing it) ends instead of holding the GPU, and
/// the host thread waiting on it (a read to the host) returns. Later calls then fail at once.
fn watchdog(
    rank: usize,
    raw: &Mutex<RawComm>,
    host: &Host,
    failed: &Mutex<Option<String>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        let failed = failed.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        if failed || host.comm().is_aborted() {
            let mut raw = raw.lock().unwrap_or_else(|e| e.into_inner());
            let comm = std::mem::replace(&mut raw.comm, std::ptr::null_mut());
            if !comm.is_null() {
                // SAFETY: the live communicator, taken out of `raw` under its lock (no other call
                // can use it now or later); aborted once.
                let r = unsafe { (raw.api.comm_abort)(comm) };
                if let Err(e) = raw.api.check(r, "ncclCommAbort") {
                    eprintln!("vi-runtime: rank {rank}: {e}");
                }
            }
            return;
        }
        std::thread::sleep(WATCHDOG_PERIOD);
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
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
        Ok(Pending::from_op(self.neighbours(to_left, to_right)?))
    }

    fn start_all_gather(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        Ok(Pending::from_op(self.gather(t)?))
    }

    /// All-gather, then the sum in rank order on this device: bit-identical on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.all_gather(t)?;
        let all: Vec<Tensor> = all.iter().map(|x| self.local(x)).collect::<Result<_>>()?;
        sum_in_order(&all)
    }

    fn gather_to_root(&self, t: &Tensor) -> Result<Option<Vec<Tensor>>> {
        self.check_usable("gather_to_root")?;
        match self.host.comm().gather_to_root(t)? {
            Some(all) => Ok(Some(
                all.iter().map(|x| self.local(x)).collect::<Result<_>>()?,
            )),
            None => Ok(None),
        }
    }

    fn barrier(&self) -> Result<()> {
        self.check_usable("barrier")?;
        self.host.comm().barrier()
    }

    fn send_to(&self, dst: usize, t: &Tensor) -> Result<()> {
        self.host.comm().send_to(dst, t)
    }

    /// Through the host; the tensor lands on this rank's device (as the host communicators
    /// built for devices do).
    fn recv_from(&self, src: usize) -> Result<Tensor> {
        let t = self.host.comm().recv_from(src)?;
        self.local(&t)
    }

    fn abort(&self, reason: &str) {
        self.host.comm().abort(reason)
    }

    fn is_aborted(&self) -> bool {
        self.host.comm().is_aborted() || self.lock_failed().is_some()
    }
}

impl Drop for NcclComm {
    /// Gives the communication stream up to the group timeout to drain (unless the group
    /// failed), then the communicator is aborted by `RawComm`'s drop.
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.watchdog.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = handle.join();
        }
        if self.is_aborted() || std::thread::panicking() {
            return;
        }
        let drained = self.comm_stream.record_event(None).map(|ev| {
            let deadline = Instant::now() + self.timeout;
            while !ev.is_complete() {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        });
        if !matches!(drained, Ok(true)) {
            eprintln!(
                "vi-runtime: rank {}: NCCL transfers still pending after {:?}; aborting the \
                 communicator",
                self.rank, self.timeout
            );
        }
    }
}

/// What this rank publishes to decide, with every other rank, whether the job uses NCCL:
/// `[choice (0 auto, 1 host, 2 nccl), usable here (0/1), several ranks per GPU allowed (0/1),
/// the GPU's 16-byte UUID]`.
pub(crate) fn readiness(device: Device, choice: CommChoice) -> (Vec<u8>, Option<String>) {
    let c = super::choice_code(choice);
    let mut why = None;
    let mut uuid = [0u8; 16];
    let mut multi = 0u8;
    match usable_for(&[device]) {
        Ok(()) => {
            if let (Device::Cuda(o), Ok(api)) = (device, Api::load()) {
                match device::device(o)
                    .and_then(|d| d.ctx().uuid().map_err(|e| cuda_err("device UUID", e)))
                {
                    Ok(u) => {
                        for (d, s) in uuid.iter_mut().zip(u.bytes) {
                            *d = s as u8;
                        }
                    }
                    Err(e) => why = Some(e.to_string()),
                }
                multi = u8::from(multi_rank_gpu_allowed(api.lib.version()));
            }
        }
        Err(w) => why = Some(w),
    }
    let mut v = vec![c, u8::from(why.is_none()), multi];
    v.extend_from_slice(&uuid);
    (v, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip_and_malformed_ones_are_refused() {
        for (shape, dtype) in [
            (vec![4, 1, 40, 64], DType::BF16),
            (vec![2, 3], DType::F32),
            (vec![], DType::F16),
        ] {
            let t = Tensor::zeros(&shape, Device::Cpu, dtype).unwrap();
            let p = Meta::parse(&Meta::of(&t).unwrap().host, 3).unwrap();
            assert_eq!((p.dtype, p.shape), (dtype, shape));
        }
        let bad = |v: Vec<f32>| {
            let n = v.len();
            Meta::parse(&Tensor::from_vec(v, &[n]).unwrap(), 5)
                .err()
                .map(|e| e.to_string())
        };
        for v in [vec![0.0], vec![0.0, 2.0, 4.0], vec![7.0, 1.0, 4.0]] {
            let e = bad(v.clone()).unwrap_or_else(|| panic!("{v:?} accepted"));
            assert!(e.contains("from rank 5"), "{e}");
        }
        let huge = Tensor::zeros(&[1 << 24, 0], Device::Cpu, DType::F32).unwrap();
        assert!(
            Meta::of(&huge).is_err(),
            "dims from 2^24 are not exact in f32"
        );
    }
}

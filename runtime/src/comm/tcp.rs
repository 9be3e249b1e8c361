//! Ranks that may be in different processes (or on different machines), connected over TCP.
//!
//! [`TcpComm::connect`] builds one rank's communicator: it listens on an ephemeral port, publishes
//! `{prefix}/addr/{rank}` in the [`Rendezvous`] store, and connects a full mesh (the higher rank of
//! each pair connects to the lower one). Each connection starts with a handshake both sides check:
//! a magic number, the group's identity (a nonce rank 0 publishes as `{prefix}/group`), the world
//! size, and the two ranks. Setup is bounded by the configured timeout.
//!
//! Data plane: one socket per peer (TCP_NODELAY), with a writer thread and a reader thread per
//! peer. A send (every start form, every blocking call's sending half) queues the frame for the
//! peer's writer thread and returns: the caller never blocks on a slow or full socket, so a
//! started exchange crosses the wire while the rank computes (a synchronous write would hold the
//! caller for the whole transfer of a large halo on a real network: bytes / link bandwidth). The
//! reader thread reads frames into this rank's [`Mailbox`] as they arrive, and `Pending::wait` (or
//! a blocking call) takes them from there. Messages are matched like [`super::InProcessComm`]'s:
//! collective calls by the rank's call index, point-to-point messages by their index on the
//! (source, destination) pair; frames to one peer leave in the order they were sent.
//!
//! Wire format (little-endian). Frame header, 24 bytes then the shape:
//! `u32 FRAME_MAGIC | u8 kind | u8 flags | u8 dtype | u8 ndim | u64 call index | u64 payload bytes |
//! ndim x u64 shape`, then the payload: the tensor's elements in its dtype (f32/f16/bf16, little
//! endian), or the reason of an abort (UTF-8). Kinds: the collective calls, point-to-point, abort,
//! goodbye. Flags: bit 0 = a tensor is present (`exchange_neighbors` sends None at the video's
//! ends, `barrier` nothing), bit 1 = the tensor is shape-only (`Device::Meta`, dry runs). The
//! header is validated before anything is allocated (kind, dtype, ndim <= [`MAX_NDIM`], payload =
//! elements x dtype size, at most [`TcpConfig::max_payload_bytes`]), and a payload buffer grows only
//! as its bytes arrive. CUDA tensors go through the host (copied at send, on the caller's thread);
//! received tensors are placed on [`TcpConfig::device`] when it is set.
//!
//! Failures: a connection that ends without a goodbye means the peer died: the group is aborted
//! with "rank r died (connection closed)" and every pending and future call fails (a write that
//! fails, or blocks past the timeout, aborts it too, naming the peer). A local abort (an explicit
//! [`Communicator::abort`], a timeout, a mismatch, a bad frame, a dead peer) is sent to every peer
//! (best effort, ahead of queued frames), who report its reason. Dropping the communicator after a
//! normal run flushes the queued frames, then sends a goodbye: a peer waiting for a message the
//! departed rank never sent fails at once.

use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use half::{bf16, f16};

use super::mailbox::{forward_communicator, Endpoint, Mailbox, OpKind, Transport};
use super::Rendezvous;
use crate::{DType, Device, Error, Result, Storage, Tensor};

/// First bytes of every handshake ("VITCPv01").
const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"VITCPv01");
/// First bytes of every frame ("VIFR").
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"VIFR");
/// Handshake: magic u64, group u64, world u32, from-rank u32, to-rank u32.
const HELLO_LEN: usize = 28;
/// Fixed part of a frame header (before the shape).
const HEADER_LEN: usize = 24;
/// Most dimensions a tensor on the wire may have.
pub const MAX_NDIM: usize = 8;
/// Longest abort reason accepted (bytes).
const MAX_REASON_BYTES: u64 = 64 << 10;
/// A payload buffer grows by at most this many bytes (or doubles) per read, so a header claiming
/// a huge payload allocates only as much as actually arrives.
const GROW_BYTES: usize = 16 << 20;

const FLAG_TENSOR: u8 = 1;
const FLAG_META: u8 = 2;

/// Frame kind codes: 1-6 the calls ([`op_code`]), then the control frames.
/// The sender aborted; the payload is its reason.
const KIND_ABORT: u8 = 7;
/// The sender's communicator was dropped after a normal run: nothing more will come.
const KIND_GOODBYE: u8 = 8;

fn op_code(k: OpKind) -> u8 {
    match k {
        OpKind::Neighbors => 1,
        OpKind::AllGather => 2,
        OpKind::AllReduce => 3,
        OpKind::Gather => 4,
        OpKind::Barrier => 5,
        OpKind::PointToPoint => 6,
    }
}

fn op_from_code(c: u8) -> Option<OpKind> {
    Some(match c {
        1 => OpKind::Neighbors,
        2 => OpKind::AllGather,
        3 => OpKind::AllReduce,
        4 => OpKind::Gather,
        5 => OpKind::Barrier,
        6 => OpKind::PointToPoint,
        _ => return None,
    })
}

fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn dtype_from_code(c: u8) -> Option<DType> {
    Some(match c {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::BF16,
        _ => return None,
    })
}

/// How a [`TcpComm`] connects and behaves.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Address the listener binds (port 0: the system picks one), e.g. "0.0.0.0" or "127.0.0.1".
    pub bind_host: String,
    /// Host the peers connect to, published in the store with the port (this machine's address as
    /// the other nodes reach it; "127.0.0.1" on one node).
    pub advertise_host: String,
    /// Bound on every wait: setup (store lookups, connections, handshakes) and each message a call
    /// waits for. A call that waits longer aborts the group, naming the rank it waited for.
    pub timeout: Duration,
    /// Where received tensors are placed (None: on the CPU, or shape-only for meta tensors).
    pub device: Option<Device>,
    /// Store keys are `{key_prefix}/group` and `{key_prefix}/addr/{rank}`.
    pub key_prefix: String,
    /// Largest payload a frame may carry (bytes); a bigger header is an invalid frame.
    pub max_payload_bytes: u64,
}

impl TcpConfig {
    /// Default for [`TcpConfig::max_payload_bytes`]: 16 GiB.
    pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 16 << 30;

    /// Ranks on this machine only: bind and advertise 127.0.0.1, keys under "tcp", received
    /// tensors on the CPU.
    pub fn loopback(timeout: Duration) -> TcpConfig {
        TcpConfig {
            bind_host: "127.0.0.1".into(),
            advertise_host: "127.0.0.1".into(),
            timeout,
            device: None,
            key_prefix: "tcp".into(),
            max_payload_bytes: Self::DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// A frame waiting for its peer's writer thread: the payload is a host or shape-only tensor
/// (shared with the caller, not copied).
struct OutFrame {
    kind: OpKind,
    seq: u64,
    payload: Option<Tensor>,
}

/// One connection to a peer.
struct Peer {
    /// Frames are written whole under this lock (by the writer thread; an abort or a goodbye
    /// directly).
    writer: Mutex<TcpStream>,
    /// A handle on the same socket for shutting it down without the writer lock.
    ctl: TcpStream,
    /// The writer thread's queue (None once closed: the thread then ends after the queued frames).
    queue: Mutex<Option<mpsc::Sender<OutFrame>>>,
}

/// The TCP transport: the connections of one rank (index = peer rank; None for this rank).
pub(crate) struct Wires {
    rank: usize,
    timeout: Duration,
    max_payload: u64,
    peers: Vec<Option<Peer>>,
    /// Set when this rank closes its sockets on purpose (drop, simulated death): readers and
    /// writers then treat a failing connection as expected.
    closing: AtomicBool,
}

impl Wires {
    fn peer(&self, r: usize) -> &Peer {
        self.peers[r].as_ref().expect("a peer, not this rank")
    }

    /// Shuts every connection (both directions): blocked reads and writes return at once.
    fn shut_all(&self) {
        for p in self.peers.iter().flatten() {
            let _ = p.ctl.shutdown(Shutdown::Both);
        }
    }

    /// Closes every writer thread's queue (the threads end after the frames already queued).
    fn close_queues(&self) {
        for p in self.peers.iter().flatten() {
            p.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

impl Transport for Wires {
    /// Queues the frame for `dst`'s writer thread. A CUDA tensor is copied to the host here (on the
    /// caller's thread, ordered after the kernels that made it); a CPU tensor is shared, not copied.
    fn send(
        &self,
        _mb: &Mailbox<Self>,
        src: usize,
        dst: usize,
        kind: OpKind,
        seq: u64,
        payload: Option<&Tensor>,
    ) -> Result<()> {
        debug_assert_eq!(src, self.rank);
        if let Some(t) = payload {
            if t.shape().len() > MAX_NDIM {
                return Err(Error::Comm(format!(
                    "rank {src}: {kind:?}: a tensor of {} dimensions (at most {MAX_NDIM} travel)",
                    t.shape().len()
                )));
            }
        }
        let payload = match payload {
            Some(t) if matches!(t.device(), Device::Cuda(_)) => Some(t.to_device(Device::Cpu)?),
            p => p.cloned(),
        };
        let queue = self
            .peer(dst)
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let sent = queue
            .as_ref()
            .map(|q| q.send(OutFrame { kind, seq, payload }));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(Error::Comm(format!(
                "rank {src}: {kind:?} (call #{seq}): the connection to rank {dst} is closed"
            ))),
        }
    }

    /// Best effort: an abort frame to every peer (ahead of the frames still queued), then this
    /// side's write half is shut (the peer reads the reason, then the end of the stream). A writer
    /// lock held by a stuck write is waited for briefly; after that the socket is shut without
    /// the frame.
    fn tell_abort(&self, reason: &str) {
        let bytes = reason.as_bytes();
        let bytes = &bytes[..bytes.len().min(MAX_REASON_BYTES as usize)];
        let mut frame = header(KIND_ABORT, 0, 0, DType::F32, &[], bytes.len() as u64);
        frame.extend_from_slice(bytes);
        for p in self.peers.iter().flatten() {
            let deadline = Instant::now() + Duration::from_millis(500);
            loop {
                match p.writer.try_lock() {
                    Ok(mut w) => {
                        let _ = w.write_all(&frame);
                        break;
                    }
                    Err(std::sync::TryLockError::Poisoned(e)) => {
                        let _ = e.into_inner().write_all(&frame);
                        break;
                    }
                    Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(std::sync::TryLockError::WouldBlock) => break,
                }
            }
            let _ = p.ctl.shutdown(Shutdown::Write);
        }
    }

    fn place(&self, t: Tensor, device: Option<Device>) -> Result<Tensor> {
        // A shape-only tensor is charged to this thread's measurement, like every tensor this
        // rank makes.
        let t = if t.device() == Device::Meta {
            crate::meta::tracked(t.shape(), t.dtype())
        } else {
            t
        };
        match device {
            Some(d) if t.device() != d => t.to_device(d),
            _ => Ok(t),
        }
    }
}

/// Writes one frame to `w`: header and shape, then the payload (small payloads in the header's
/// write: one segment with TCP_NODELAY).
fn write_frame(w: &mut impl Write, f: &OutFrame) -> io::Result<()> {
    let (flags, dtype, shape, bytes): (u8, DType, &[usize], LeBytes) = match &f.payload {
        None => (0, DType::F32, &[], LeBytes::Owned(Vec::new())),
        Some(t) if t.device() == Device::Meta => (
            FLAG_TENSOR | FLAG_META,
            t.dtype(),
            t.shape(),
            LeBytes::Owned(Vec::new()),
        ),
        Some(t) => (
            FLAG_TENSOR,
            t.dtype(),
            t.shape(),
            le_bytes(t).map_err(|e| io::Error::other(e.to_string()))?,
        ),
    };
    let mut frame = header(
        op_code(f.kind),
        flags,
        f.seq,
        dtype,
        shape,
        bytes.len() as u64,
    );
    let small = bytes.len() <= 64 << 10;
    if small {
        frame.extend_from_slice(&bytes);
    }
    w.write_all(&frame)?;
    if !small {
        w.write_all(&bytes)?;
    }
    Ok(())
}

/// The writer of the connection to `dst`: queued frames onto the socket, in order, until the
/// queue is closed. After a failure (this rank's or the group's) queued frames are dropped.
fn writer_loop(mb: Arc<Mailbox<Wires>>, dst: usize, queue: mpsc::Receiver<OutFrame>) {
    let wires = &mb.transport;
    let peer = wires.peer(dst);
    for f in queue {
        if mb.is_aborted() || wires.closing.load(Ordering::SeqCst) {
            continue;
        }
        let res = {
            let mut w = peer.writer.lock().unwrap_or_else(|e| e.into_inner());
            write_frame(&mut *w, &f)
        };
        let Err(e) = res else { continue };
        if mb.is_aborted() || wires.closing.load(Ordering::SeqCst) {
            continue;
        }
        let (rank, kind, seq) = (wires.rank, f.kind, f.seq);
        let reason = if mb.has_departed(dst) {
            format!("rank {rank}: {kind:?} (call #{seq}): rank {dst} left the group")
        } else if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            format!(
                "rank {rank}: {kind:?} (call #{seq}): timed out after {:?} sending to rank {dst}",
                wires.timeout
            )
        } else {
            format!("rank {dst} died (connection lost while rank {rank} sent: {e})")
        };
        // A frame may be half-written: the stream cannot be used any more.
        mb.abort(reason);
    }
}
/// The fixed header followed by the shape.
/// `kind`: a frame kind code ([`op_code`], [`KIND_ABORT`], [`KIND_GOODBYE`]).
fn header(kind: u8, flags: u8, seq: u64, dtype: DType, shape: &[usize], len: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN + 8 * shape.len());
    h.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    h.extend_from_slice(&[kind, flags, dtype_code(dtype), shape.len() as u8]);
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    for &d in shape {
        h.extend_from_slice(&(d as u64).to_le_bytes());
    }
    h
}

/// The elements of a CPU tensor as little-endian bytes: on a little-endian host the tensor's own
/// buffer (held for as long as the value lives), else a converted copy.
enum LeBytes {
    #[cfg_attr(target_endian = "big", allow(dead_code))]
    Shared(crate::StorageRef),
    Owned(Vec<u8>),
}

impl std::ops::Deref for LeBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            LeBytes::Shared(s) => match &**s {
                Storage::CpuF32(v) => bytemuck::cast_slice(v),
                Storage::CpuF16(v) => bytemuck::cast_slice(v),
                Storage::CpuBF16(v) => bytemuck::cast_slice(v),
                // Checked by le_bytes.
                _ => &[],
            },
            LeBytes::Owned(v) => v,
        }
    }
}

fn le_bytes(t: &Tensor) -> Result<LeBytes> {
    let s = t.storage()?;
    if !matches!(
        &*s,
        Storage::CpuF32(_) | Storage::CpuF16(_) | Storage::CpuBF16(_)
    ) {
        return Err(Error::Comm(format!("cannot send {t:?}: not host data")));
    }
    #[cfg(target_endian = "little")]
    let b = LeBytes::Shared(s);
    #[cfg(target_endian = "big")]
    let b = LeBytes::Owned(match &*s {
        Storage::CpuF32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::CpuF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::CpuBF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => Vec::new(),
    });
    Ok(b)
}

/// Reads `n` elements of `T` (little-endian on the wire). The buffer grows as bytes arrive.
fn read_elems<T: bytemuck::Pod>(r: &mut impl Read, n: usize) -> io::Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    let mut v: Vec<T> = Vec::new();
    while v.len() < n {
        let old = v.len();
        let new = n.min(old.saturating_mul(2).max(GROW_BYTES / size));
        v.resize(new, T::zeroed());
        r.read_exact(bytemuck::cast_slice_mut(&mut v[old..]))?;
    }
    Ok(v)
}

/// Swaps little-endian wire bytes to the host's order (nothing to do on a little-endian host).
#[cfg(target_endian = "big")]
fn from_le_storage(s: Storage) -> Storage {
    match s {
        Storage::CpuF32(v) => Storage::CpuF32(
            v.into_iter()
                .map(|x| f32::from_bits(u32::from_le(x.to_bits())))
                .collect(),
        ),
        Storage::CpuF16(v) => Storage::CpuF16(
            v.into_iter()
                .map(|x| f16::from_bits(u16::from_le(x.to_bits())))
                .collect(),
        ),
        Storage::CpuBF16(v) => Storage::CpuBF16(
            v.into_iter()
                .map(|x| bf16::from_bits(u16::from_le(x.to_bits())))
                .collect(),
        ),
        s => s,
    }
}

/// A frame as read from the wire.
enum Frame {
    Data {
        kind: OpKind,
        seq: u64,
        payload: Option<Tensor>,
    },
    Abort(String),
    Goodbye,
}

/// Why reading a frame failed.
enum ReadError {
    /// The connection ended at a frame boundary.
    Closed,
    Io(io::Error),
    /// The bytes are not a valid frame.
    Invalid(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame",
            ))
        } else {
            ReadError::Io(e)
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and validates one frame. Nothing is allocated from a length before it is checked.
fn read_frame(r: &mut impl Read, max_payload: u64) -> std::result::Result<Frame, ReadError> {
    let mut h = [0u8; HEADER_LEN];
    // The first byte separately: an end of stream here is a clean close.
    match r.read(&mut h[..1]) {
        Ok(0) => return Err(ReadError::Closed),
        Ok(_) => {}
        Err(e) => return Err(ReadError::Io(e)),
    }
    // The magic before the rest: garbage is refused without waiting for a whole header.
    r.read_exact(&mut h[1..4])?;
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != FRAME_MAGIC {
        return Err(ReadError::Invalid(format!(
            "bad frame magic {magic:#010x} (expected {FRAME_MAGIC:#010x})"
        )));
    }
    r.read_exact(&mut h[4..])?;
    let code = h[4];
    if op_from_code(code).is_none() && code != KIND_ABORT && code != KIND_GOODBYE {
        return Err(ReadError::Invalid(format!("unknown frame kind {code}")));
    }
    let flags = h[5];
    let dtype = dtype_from_code(h[6])
        .ok_or_else(|| ReadError::Invalid(format!("unknown dtype code {}", h[6])))?;
    let ndim = h[7] as usize;
    let seq = u64_at(&h, 8);
    let len = u64_at(&h, 16);
    if ndim > MAX_NDIM {
        return Err(ReadError::Invalid(format!(
            "{ndim} dimensions (at most {MAX_NDIM})"
        )));
    }
    let mut sb = [0u8; 8 * MAX_NDIM];
    r.read_exact(&mut sb[..8 * ndim])?;
    let shape: Vec<u64> = (0..ndim).map(|i| u64_at(&sb, 8 * i)).collect();
    match code {
        KIND_GOODBYE => {
            if len != 0 {
                return Err(ReadError::Invalid(format!(
                    "goodbye with {len} payload bytes"
                )));
            }
            return Ok(Frame::Goodbye);
        }
        KIND_ABORT => {
            if len > MAX_REASON_BYTES {
                return Err(ReadError::Invalid(format!(
                    "abort reason of {len} bytes (at most {MAX_REASON_BYTES})"
                )));
            }
            let mut b = vec![0u8; len as usize];
            r.read_exact(&mut b)?;
            return Ok(Frame::Abort(String::from_utf8_lossy(&b).into_owned()));
        }
        _ => {}
    }
    let kind = op_from_code(code).expect("checked above");
    if flags & !(FLAG_TENSOR | FLAG_META) != 0 {
        return Err(ReadError::Invalid(format!("unknown flags {flags:#04x}")));
    }
    if flags & FLAG_TENSOR == 0 {
        if len != 0 || ndim != 0 || flags != 0 {
            return Err(ReadError::Invalid(format!(
                "{kind:?} without a tensor but with {len} payload bytes / {ndim} dimensions"
            )));
        }
        return Ok(Frame::Data {
            kind,
            seq,
            payload: None,
        });
    }
    let elems = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| usize::try_from(n).is_ok());
    let Some(elems) = elems else {
        return Err(ReadError::Invalid(format!("shape {shape:?} overflows")));
    };
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    if flags & FLAG_META != 0 {
        if len != 0 {
            return Err(ReadError::Invalid(format!(
                "shape-only tensor {shape:?} with {len} payload bytes"
            )));
        }
        return Ok(Frame::Data {
            kind,
            seq,
            payload: Some(Tensor::meta(&shape, dtype)),
        });
    }
    let expect = elems.checked_mul(dtype.size_in_bytes() as u64);
    if expect != Some(len) {
        return Err(ReadError::Invalid(format!(
            "payload of {len} bytes for a {dtype:?} tensor of shape {shape:?}"
        )));
    }
    if len > max_payload {
        return Err(ReadError::Invalid(format!(
            "payload of {len} bytes exceeds the limit of {max_payload} bytes (shape {shape:?})"
        )));
    }
    let n = elems as usize;
    let storage = match dtype {
        DType::F32 => Storage::CpuF32(read_elems::<f32>(r, n)?),
        DType::F16 => Storage::CpuF16(read_elems::<f16>(r, n)?),
        DType::BF16 => Storage::CpuBF16(read_elems::<bf16>(r, n)?),
    };
    #[cfg(target_endian = "big")]
    let storage = from_le_storage(storage);
    Ok(Frame::Data {
        kind,
        seq,
        payload: Some(Tensor::from_storage(storage, shape, dtype, Device::Cpu)),
    })
}

/// The reader of the connection from `src`: frames into the mailbox until the connection ends.
fn reader_loop(mb: Arc<Mailbox<Wires>>, src: usize, stream: TcpStream) {
    let rank = mb.transport.rank;
    let mut r = BufReader::with_capacity(64 << 10, stream);
    loop {
        let frame = read_frame(&mut r, mb.transport.max_payload);
        let quiet = mb.transport.closing.load(Ordering::SeqCst) || mb.is_aborted();
        match frame {
            Ok(Frame::Data { kind, seq, payload }) => {
                if !mb.deliver(src, rank, kind, seq, payload) {
                    mb.abort(format!(
                        "rank {rank}: rank {src} sent {kind:?} #{seq} twice (protocol error)"
                    ));
                    return;
                }
            }
            Ok(Frame::Abort(reason)) => {
                mb.abort(reason);
                return;
            }
            Ok(Frame::Goodbye) => {
                mb.depart(src);
                return;
            }
            Err(_) if quiet => return,
            Err(ReadError::Closed) => {
                mb.abort(format!("rank {src} died (connection closed)"));
                return;
            }
            Err(ReadError::Io(e)) => {
                mb.abort(format!("rank {src} died (connection lost: {e})"));
                return;
            }
            Err(ReadError::Invalid(what)) => {
                mb.abort(format!(
                    "rank {rank}: invalid frame from rank {src}: {what}"
                ));
                return;
            }
        }
    }
}

/// The handshake one side sends: who it is, whom it expects, in which group.
fn hello(group: u64, world: usize, from: usize, to: usize) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..8].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&group.to_le_bytes());
    b[16..20].copy_from_slice(&(world as u32).to_le_bytes());
    b[20..24].copy_from_slice(&(from as u32).to_le_bytes());
    b[24..28].copy_from_slice(&(to as u32).to_le_bytes());
    b
}

/// A parsed handshake.
struct Hello {
    group: u64,
    world: usize,
    from: usize,
    to: usize,
}

fn parse_hello(b: &[u8; HELLO_LEN]) -> std::result::Result<Hello, String> {
    let magic = u64_at(b, 0);
    if magic != HELLO_MAGIC {
        return Err(format!(
            "not a video-infinity TCP communicator (handshake magic {magic:#018x})"
        ));
    }
    let u32_at =
        |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize;
    Ok(Hello {
        group: u64_at(b, 8),
        world: u32_at(16),
        from: u32_at(20),
        to: u32_at(24),
    })
}

/// A fresh group identity (rank 0 publishes it): differs between runs, so a process of another
/// job that finds a stale address cannot join.
fn new_group_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// One rank of a group connected over TCP. See the module doc for the protocol.
///
/// Dropping it while its thread unwinds from a panic aborts the group ("rank r panicked");
/// dropping it otherwise sends a goodbye, so a peer waiting for a message it never sent fails at
/// once (after the frames still queued are written). Either way the connections are closed and
/// the reader and writer threads joined.
pub struct TcpComm {
    ep: Endpoint<Wires>,
    readers: Vec<JoinHandle<()>>,
    writers: Vec<JoinHandle<()>>,
}

impl TcpComm {
    /// Connects rank `rank` of a group of `world` ranks: binds `config.bind_host` on port 0,
    /// publishes `{prefix}/addr/{rank}` = "advertise_host:port" in `store` (rank 0 also publishes
    /// the group identity `{prefix}/group`), connects to every lower rank, accepts every higher
    /// rank, and checks each handshake. Every rank of the group must call it (each with its own
    /// rank); it returns once this rank is connected to all the others, or fails after
    /// `config.timeout` naming the rank it could not reach. A group of one needs no store.
    pub fn connect(
        rank: usize,
        world: usize,
        store: &dyn Rendezvous,
        config: &TcpConfig,
    ) -> Result<TcpComm> {
        if world == 0 || rank >= world {
            return Err(Error::Comm(format!(
                "rank {rank} is not in a group of {world} ranks"
            )));
        }
        if world > u32::MAX as usize {
            return Err(Error::Comm(format!(
                "a group of {world} ranks is too large"
            )));
        }
        let err = |msg: String| Error::Comm(format!("rank {rank}: {msg}"));
        let deadline = Instant::now() + config.timeout;
        let prefix = &config.key_prefix;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        if world > 1 {
            let listener = TcpListener::bind((config.bind_host.as_str(), 0)).map_err(|e| {
                err(format!(
                    "cannot listen on {}: {e}",
                    host_port(&config.bind_host, 0)
                ))
            })?;
            let port = listener
                .local_addr()
                .map_err(|e| err(format!("listener address: {e}")))?
                .port();
            let group = if rank == 0 {
                let g = new_group_id();
                store.set(&format!("{prefix}/group"), &g.to_le_bytes())?;
                g
            } else {
                let b = store.get(&format!("{prefix}/group"), remaining(deadline))?;
                let b: [u8; 8] = b.as_slice().try_into().map_err(|_| {
                    err(format!("store key {prefix}/group does not hold a group id"))
                })?;
                u64::from_le_bytes(b)
            };
            let me = host_port(&config.advertise_host, port);
            store.set(&format!("{prefix}/addr/{rank}"), me.as_bytes())?;
            // Lower ranks first: each of them accepts only after connecting to its own lower
            // ranks, so the waits all point downwards and cannot form a cycle.
            for (peer, slot) in streams.iter_mut().enumerate().take(rank) {
                *slot = Some(connect_to(
                    rank, peer, world, group, store, prefix, deadline,
                )?);
            }
            accept_from(rank, world, group, &listener, &mut streams, deadline)?;
        }
        let mut peers = Vec::with_capacity(world);
        let mut readers_in = Vec::new();
        let mut writers_in = Vec::new();
        for (peer, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                peers.push(None);
                continue;
            };
            let setup = |s: &TcpStream| -> io::Result<(TcpStream, TcpStream)> {
                s.set_nodelay(true)?;
                s.set_read_timeout(None)?;
                // A write blocked longer than the timeout (a peer that stopped reading) fails.
                s.set_write_timeout(Some(config.timeout.max(Duration::from_millis(1))))?;
                Ok((s.try_clone()?, s.try_clone()?))
            };
            let (ctl, rd) = setup(&s).map_err(|e| err(format!("socket to rank {peer}: {e}")))?;
            let (tx, rx) = mpsc::channel();
            peers.push(Some(Peer {
                writer: Mutex::new(s),
                ctl,
                queue: Mutex::new(Some(tx)),
            }));
            readers_in.push((peer, rd));
            writers_in.push((peer, rx));
        }
        let wires = Wires {
            rank,
            timeout: config.timeout,
            max_payload: config.max_payload_bytes,
            peers,
            closing: AtomicBool::new(false),
        };
        let mb = Arc::new(Mailbox::new(world, config.timeout, wires));
        let mut comm = TcpComm {
            ep: Endpoint::new(rank, mb.clone(), config.device),
            readers: Vec::new(),
            writers: Vec::new(),
        };
        for (peer, rd) in readers_in {
            let mb = mb.clone();
            let h = std::thread::Builder::new()
                .name(format!("tcp-comm-{rank}<-{peer}"))
                .spawn(move || reader_loop(mb, peer, rd))
                .map_err(|e| err(format!("cannot start a reader thread: {e}")))?;
            comm.readers.push(h);
        }
        for (peer, rx) in writers_in {
            let mb = mb.clone();
            let h = std::thread::Builder::new()
                .name(format!("tcp-comm-{rank}->{peer}"))
                .spawn(move || writer_loop(mb, peer, rx))
                .map_err(|e| err(format!("cannot start a writer thread: {e}")))?;
            comm.writers.push(h);
        }
        // (On an error above, dropping `comm` ends and joins the threads already started.)
        Ok(comm)
    }

    /// The bound on every wait of this communicator.
    pub fn timeout(&self) -> Duration {
        self.ep.mb.timeout
    }

    /// The reason the group was aborted, if it was.
    pub fn abort_reason(&self) -> Option<String> {
        self.ep.mb.abort_reason()
    }

    /// Messages received for this rank that no call has taken yet (tests: a pending handle
    /// dropped without `wait` must not leave its messages behind).
    #[doc(hidden)]
    pub fn held_messages(&self) -> usize {
        self.ep.mb.held_for(self.ep.rank)
    }

    /// Simulates this rank's death (tests): every connection is closed without a goodbye or an
    /// abort frame, as when the process is killed.
    #[doc(hidden)]
    pub fn simulate_death(self) {
        self.ep.mb.transport.closing.store(true, Ordering::SeqCst);
        self.ep.mb.transport.shut_all();
        // Drop joins the threads and sends nothing more (`closing` is set).
    }
}
/// Connects to rank `peer` (lower than `rank`) at the address it published, and handshakes.
fn connect_to(
    rank: usize,
    peer: usize,
    world: usize,
    group: u64,
    store: &dyn Rendezvous,
    prefix: &str,
    deadline: Instant,
) -> Result<TcpStream> {
    let err = |msg: String| Error::Comm(format!("rank {rank}: {msg}"));
    let addr = store.get(&format!("{prefix}/addr/{peer}"), remaining(deadline))?;
    let addr = String::from_utf8_lossy(&addr).into_owned();
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| err(format!("rank {peer}'s address {addr:?}: {e}")))?
        .collect();
    let mut last = None;
    let mut stream = None;
    'retry: loop {
        for a in &addrs {
            let left = remaining(deadline);
            if left.is_zero() {
                break 'retry;
            }
            match TcpStream::connect_timeout(a, left) {
                Ok(s) => {
                    stream = Some(s);
                    break 'retry;
                }
                Err(e) => last = Some(e),
            }
        }
        std::thread::sleep(Duration::from_millis(20).min(remaining(deadline)));
    }
    let Some(mut s) = stream else {
        return Err(err(format!(
            "cannot connect to rank {peer} at {addr}: {}",
            last.map_or_else(|| "timed out".to_string(), |e| e.to_string())
        )));
    };
    let shake = |s: &mut TcpStream| -> io::Result<[u8; HELLO_LEN]> {
        s.set_read_timeout(Some(remaining(deadline).max(Duration::from_millis(1))))?;
        s.write_all(&hello(group, world, rank, peer))?;
        let mut b = [0u8; HELLO_LEN];
        s.read_exact(&mut b)?;
        Ok(b)
    };
    let b = shake(&mut s).map_err(|e| err(format!("handshake with rank {peer} at {addr}: {e}")))?;
    let h = parse_hello(&b).map_err(|m| err(format!("rank {peer} at {addr}: {m}")))?;
    if h.group != group || h.world != world || h.from != peer || h.to != rank {
        return Err(err(format!(
            "the process at {addr} is not rank {peer} of this group (it says: rank {} of {} \
             in group {:#x}, expecting rank {}; this group: {group:#x} of {world})",
            h.from, h.world, h.group, h.to
        )));
    }
    Ok(s)
}

/// Accepts every rank above `rank`, checking each handshake; a connection that is not a member of
/// this group is turned away (and named if the deadline passes).
fn accept_from(
    rank: usize,
    world: usize,
    group: u64,
    listener: &TcpListener,
    streams: &mut [Option<TcpStream>],
    deadline: Instant,
) -> Result<()> {
    let err = |msg: String| Error::Comm(format!("rank {rank}: {msg}"));
    listener
        .set_nonblocking(true)
        .map_err(|e| err(format!("listener: {e}")))?;
    let mut rejected: Vec<String> = Vec::new();
    while streams[rank + 1..].iter().any(|s| s.is_none()) {
        let (mut s, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if remaining(deadline).is_zero() {
                    let missing: Vec<String> = (rank + 1..world)
                        .filter(|&p| streams[p].is_none())
                        .map(|p| p.to_string())
                        .collect();
                    let mut msg = format!(
                        "rank(s) {} did not connect within the timeout",
                        missing.join(", ")
                    );
                    if !rejected.is_empty() {
                        msg += &format!(" (turned away: {})", rejected.join("; "));
                    }
                    return Err(err(msg));
                }
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(err(format!("accept: {e}"))),
        };
        // A stranger that sends nothing holds this loop for at most a few seconds.
        let shake = |s: &mut TcpStream| -> io::Result<[u8; HELLO_LEN]> {
            s.set_nonblocking(false)?;
            let left = remaining(deadline).min(Duration::from_secs(5));
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let mut b = [0u8; HELLO_LEN];
            s.read_exact(&mut b)?;
            Ok(b)
        };
        let h = match shake(&mut s) {
            Ok(b) => parse_hello(&b),
            Err(e) => Err(format!("handshake: {e}")),
        };
        let h = match h {
            Ok(h) if h.group == group => h,
            Ok(h) => {
                rejected.push(format!("{from}: group {:#x}, not {group:#x}", h.group));
                continue;
            }
            Err(m) => {
                rejected.push(format!("{from}: {m}"));
                continue;
            }
        };
        if h.world != world || h.to != rank || h.from <= rank || h.from >= world {
            return Err(err(format!(
                "{from} says it is rank {} of {} connecting to rank {} (this rank: {rank} of \
                 {world})",
                h.from, h.world, h.to
            )));
        }
        if streams[h.from].is_some() {
            return Err(err(format!(
                "rank {} connected twice (from {from})",
                h.from
            )));
        }
        s.write_all(&hello(group, world, rank, h.from))
            .map_err(|e| err(format!("handshake with rank {} at {from}: {e}", h.from)))?;
        streams[h.from] = Some(s);
    }
    Ok(())
}

forward_communicator!(TcpComm, ep);

impl Drop for TcpComm {
    fn drop(&mut self) {
        let mb = &self.ep.mb;
        let wires = &mb.transport;
        if std::thread::panicking() {
            mb.abort(format!("rank {} panicked", self.ep.rank));
        }
        // The writers end once their queues are written (or dropped after a failure; each write
        // is bounded by the timeout).
        wires.close_queues();
        for h in self.writers.drain(..) {
            let _ = h.join();
        }
        if !wires.closing.load(Ordering::SeqCst) && !mb.is_aborted() {
            let bye = header(KIND_GOODBYE, 0, 0, DType::F32, &[], 0);
            for p in wires.peers.iter().flatten() {
                let _ = p
                    .writer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_all(&bye);
            }
        }
        // Wait for an abort being told by another thread to reach the peers before closing.
        mb.wait_told();
        wires.closing.store(true, Ordering::SeqCst);
        // Ends the readers too (a read on a shut socket returns at once).
        wires.shut_all();
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{Communicator, MemoryStore};

    fn vals(len: usize) -> Tensor {
        Tensor::from_vec((0..len).map(|i| i as f32).collect(), &[len]).unwrap()
    }

    #[test]
    fn frames_round_trip_every_dtype_and_the_meta_flag() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::from_vec(vec![1.5, -2.25, 3.0e-3, 7.0, 0.0, -0.0], &[2, 3])
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bytes = le_bytes(&t).unwrap();
            let mut wire = header(
                op_code(OpKind::AllGather),
                FLAG_TENSOR,
                9,
                dtype,
                &[2, 3],
                bytes.len() as u64,
            );
            wire.extend_from_slice(&bytes);
            let Ok(Frame::Data { kind, seq, payload }) = read_frame(&mut &wire[..], 1 << 20) else {
                panic!("frame not read back");
            };
            let p = payload.unwrap();
            assert_eq!(
                (kind, seq, p.shape(), p.dtype()),
                (OpKind::AllGather, 9, &[2usize, 3][..], dtype)
            );
            assert_eq!(*le_bytes(&p).unwrap(), *bytes, "bit-exact in {dtype:?}");
        }
        let wire = header(
            op_code(OpKind::Neighbors),
            FLAG_TENSOR | FLAG_META,
            1,
            DType::BF16,
            &[4, 5],
            0,
        );
        let Ok(Frame::Data {
            payload: Some(p), ..
        }) = read_frame(&mut &wire[..], 0)
        else {
            panic!("meta frame not read back");
        };
        assert_eq!(
            (p.device(), p.shape(), p.dtype()),
            (Device::Meta, &[4usize, 5][..], DType::BF16)
        );
    }

    fn invalid(wire: &[u8], max: u64) -> String {
        match read_frame(&mut &wire[..], max) {
            Err(ReadError::Invalid(m)) => m,
            Err(ReadError::Io(e)) => format!("io: {e}"),
            Err(ReadError::Closed) => "closed".into(),
            Ok(_) => "accepted".into(),
        }
    }

    #[test]
    fn bad_headers_are_refused_before_allocating() {
        // A huge claimed payload (2^50 f32) with no bytes behind it: refused by the limit.
        let h = header(
            op_code(OpKind::AllGather),
            FLAG_TENSOR,
            0,
            DType::F32,
            &[1 << 48, 4],
            1 << 52,
        );
        assert!(
            invalid(&h, 1 << 30).contains("exceeds the limit"),
            "{}",
            invalid(&h, 1 << 30)
        );
        // Length disagreeing with the shape.
        let h = header(
            op_code(OpKind::AllGather),
            FLAG_TENSOR,
            0,
            DType::F32,
            &[3],
            8,
        );
        assert!(invalid(&h, 1 << 30).contains("payload of 8 bytes"));
        // Shape whose element count overflows.
        let h = header(
            op_code(OpKind::AllGather),
            FLAG_TENSOR,
            0,
            DType::F32,
            &[usize::MAX, 3],
            0,
        );
        assert!(invalid(&h, u64::MAX).contains("overflows"));
        let mut h = header(
            op_code(OpKind::AllGather),
            FLAG_TENSOR,
            0,
            DType::F32,
            &[3],
            12,
        );
        h[0] ^= 1;
        assert!(invalid(&h, 1 << 30).contains("magic"));
        let mut h = header(
            op_code(OpKind::AllGather),
            FLAG_TENSOR,
            0,
            DType::F32,
            &[3],
            12,
        );
        h[4] = 99;
        assert!(invalid(&h, 1 << 30).contains("kind"));
        h[4] = op_code(OpKind::AllGather);
        h[6] = 7;
        assert!(invalid(&h, 1 << 30).contains("dtype"));
        h[6] = 0;
        h[7] = 200;
        assert!(invalid(&h, 1 << 30).contains("dimensions"));
        // Within the limit, but the bytes never come: the buffer grows only with what arrives.
        let h = header(
            op_code(OpKind::AllGather),
            FLAG_TENSOR,
            0,
            DType::F32,
            &[1 << 28],
            1 << 30,
        );
        assert!(invalid(&h, 1 << 31).starts_with("io:"));
        let h = header(KIND_ABORT, 0, 0, DType::F32, &[], 1 << 40);
        assert!(invalid(&h, u64::MAX).contains("abort reason"));
        assert_eq!(invalid(&[], 1), "closed");
    }

    #[test]
    fn a_group_of_one_needs_no_peer() {
        let store = MemoryStore::new();
        let c =
            TcpComm::connect(0, 1, &store, &TcpConfig::loopback(Duration::from_secs(5))).unwrap();
        let s = c.all_reduce_sum(&vals(3)).unwrap();
        assert_eq!(s.to_vec_f32().unwrap(), vec![0.0, 1.0, 2.0]);
        assert_eq!(
            c.exchange_neighbors(None, None).unwrap().0.map(|_| ()),
            None
        );
        c.barrier().unwrap();
        assert!(
            TcpComm::connect(1, 1, &store, &TcpConfig::loopback(Duration::from_secs(1))).is_err()
        );
    }
}

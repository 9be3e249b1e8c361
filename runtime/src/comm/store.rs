//! The rendezvous store of a multi-process job: a small TCP key-value store (modelled on torch's
//! TCPStore) served by one thread in the rank-0 process; every process, rank 0 too, is a
//! [`StoreClient`].
//!
//! Protocol (all integers little-endian; one request then one reply, in order, per connection):
//! * handshake: client sends `MAGIC: u64, VERSION: u32`; the server answers the same pair (its
//!   own version) and closes the connection when the magic or the version differs.
//! * request: `op: u8` then its fields; strings and byte strings are `len: u32` + bytes, with
//!   `len <= MAX_KEY_LEN` for keys and `<= MAX_VALUE_LEN` for values (checked before allocating).
//!   - `SET key value` -> `OK`
//!   - `GET key timeout_ms: u64` -> `OK value` | `TIMEOUT` (the server waits for the key)
//!   - `ADD key delta: i64` -> `OK new: i64` | `ERR message` (counters are 8-byte i64 values)
//!   - `WAIT n: u32, n keys, timeout_ms: u64` -> `OK` | `TIMEOUT missing_key`
//!   - `CHECK n: u32, n keys` -> `OK all_present: u8`
//! * reply: `status: u8` (`OK`, `TIMEOUT`, `ERR`) then the fields above.
//!
//! Failure model: a store that cannot be reached is retried until the connect timeout (rank 0 may
//! start after the others), then an error naming `host:port`; a dropped [`StoreServer`] closes
//! every client connection, so a client's pending and later calls fail at once with an error
//! naming the address; a get that times out names the key and the address.
//!
//! Clean shutdown: rank 0 must keep the server alive until every rank is done with the store
//! (a rank may still be reading a key when rank 0 finishes). Each rank calls
//! [`StoreClient::mark_done`] when it needs the store no more; rank 0 calls
//! [`StoreServer::wait_done`]`(world_size, timeout)` (which returns once `world_size` ranks have
//! marked done, or an error after the timeout naming how many did) and then drops the server.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Rendezvous;
use crate::{Error, Result};

/// Sent first on every connection: "VIST0RE\x01" as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VIST0RE\x01");
/// Protocol version; the server refuses clients of another version.
pub const VERSION: u32 = 1;
/// Longest key accepted (bytes of UTF-8).
pub const MAX_KEY_LEN: usize = 4096;
/// Largest value accepted (bytes). The store holds addresses, ids and digests: small values.
pub const MAX_VALUE_LEN: usize = 16 << 20;
/// Most keys in one `wait` / `check`.
pub const MAX_KEYS: usize = 4096;
/// The counter [`StoreClient::mark_done`] increments and [`StoreServer::wait_done`] watches.
pub const DONE_KEY: &str = "vi/store/done";
/// The port torch uses for its store; the launcher's default.
pub const DEFAULT_PORT: u16 = 29500;

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OP_WAIT: u8 = 4;
const OP_CHECK: u8 = 5;

const ST_OK: u8 = 0;
const ST_TIMEOUT: u8 = 1;
const ST_ERR: u8 = 2;

/// How long the server waits for a new connection's handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Extra time a client waits for the reply of a server-side timed wait.
const REPLY_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Wire helpers (shared by server and client).

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A length-prefixed byte string of at most `max` bytes; the length is checked before allocating.
fn read_bytes(r: &mut impl Read, max: usize, what: &str) -> io::Result<Vec<u8>> {
    let len = read_u32(r)? as usize;
    if len > max {
        return Err(invalid(format!(
            "{what} of {len} bytes exceeds the limit of {max} bytes"
        )));
    }
    let mut v = vec![0u8; len];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn read_key(r: &mut impl Read) -> io::Result<String> {
    String::from_utf8(read_bytes(r, MAX_KEY_LEN, "key")?)
        .map_err(|_| invalid("key is not UTF-8".into()))
}

fn read_keys(r: &mut impl Read) -> io::Result<Vec<String>> {
    let n = read_u32(r)? as usize;
    if n > MAX_KEYS {
        return Err(invalid(format!("{n} keys exceed the limit of {MAX_KEYS}")));
    }
    (0..n).map(|_| read_key(r)).collect()
}

fn write_bytes(w: &mut impl Write, b: &[u8]) -> io::Result<()> {
    w.write_all(&(b.len() as u32).to_le_bytes())?;
    w.write_all(b)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

fn check_key(key: &str) -> Result<()> {
    if key.len() > MAX_KEY_LEN {
        return Err(Error::Comm(format!(
            "rendezvous: key of {} bytes exceeds the limit of {MAX_KEY_LEN} bytes",
            key.len()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server.

/// The map every connection thread shares; `cv` wakes blocked gets/waits on every change and on stop.
struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    cv: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // Every update is a single insert: a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready(map)` or the deadline or stop; returns whether `ready` held.
    fn wait_until(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&HashMap<String, Vec<u8>>) -> bool,
    ) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut map = self.lock();
        loop {
            if ready(&map) {
                return true;
            }
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    d - now
                }
                None => Duration::from_secs(3600),
            };
            map = self
                .cv
                .wait_timeout(map, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A live connection: a handle to close its socket on stop, and its thread.
struct Conn {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

/// The store server: one accept thread and one thread per client connection. Dropping it closes
/// every connection (clients then fail at once) and joins its threads.
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<Conn>>>,
}

impl StoreServer {
    /// Listens on `addr` (`"0.0.0.0:29500"`, `"127.0.0.1:0"` for any free port: see
    /// [`StoreServer::port`]). A port already in use is an error naming the address.
    pub fn bind(addr: &str) -> Result<StoreServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                Error::Comm(format!(
                    "rendezvous store: address {addr} is in use: another job? \
                     pass --master-port / MASTER_PORT"
                ))
            } else {
                Error::Comm(format!("rendezvous store: cannot listen on {addr}: {e}"))
            }
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Comm(format!("rendezvous store: {addr}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Comm(format!("rendezvous store: {addr}: {e}")))?;
        let shared = Arc::new(Shared {
            map: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let shared = shared.clone();
            let conns = conns.clone();
            std::thread::Builder::new()
                .name(format!("vi-store-{}", local.port()))
                .spawn(move || accept_loop(listener, shared, conns))
                .map_err(|e| Error::Comm(format!("rendezvous store: spawn: {e}")))?
        };
        Ok(StoreServer {
            addr: local,
            shared,
            accept: Some(accept),
            conns,
        })
    }

    /// The address actually bound (the real port when bound with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits until `world_size` ranks have called [`StoreClient::mark_done`]; an error after
    /// `timeout` naming how many did. Rank 0 calls this before dropping the server.
    pub fn wait_done(&self, world_size: usize, timeout: Duration) -> Result<()> {
        let mut done = 0i64;
        let ok = self.shared.wait_until(timeout, |map| {
            done = map
                .get(DONE_KEY)
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(i64::from_le_bytes)
                .unwrap_or(0);
            done >= world_size as i64
        });
        if ok {
            Ok(())
        } else {
            Err(Error::Comm(format!(
                "rendezvous store at {}: only {done} of {world_size} ranks finished within {timeout:?}",
                self.addr
            )))
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            // Take the lock so no waiter misses the notification between its check and its wait.
            let _map = self.shared.lock();
            self.shared.cv.notify_all();
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // The accept thread has exited: no connection is added after this.
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            let _ = c.thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, conns: Arc<Mutex<Vec<Conn>>>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                let Ok(handle) = stream.try_clone() else {
                    continue;
                };
                let sh = shared.clone();
                let Ok(thread) = std::thread::Builder::new()
                    .name("vi-store-conn".into())
                    .spawn(move || {
                        // A client that breaks the protocol or leaves just loses its connection
                        // (shut down here: the server's handle to it would keep it open).
                        let _ = serve(&stream, &sh);
                        let _ = stream.shutdown(Shutdown::Both);
                    })
                else {
                    continue;
                };
                let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|c| !c.thread.is_finished());
                list.push(Conn {
                    stream: handle,
                    thread,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of descriptors or similar: back off rather than spin.
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Serves one connection until it closes, breaks the protocol, or the server stops.
fn serve(stream: &TcpStream, shared: &Shared) -> io::Result<()> {
    // The listener is non-blocking; its accepted sockets must not be.
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::new(stream.try_clone()?);
    let magic = read_u64(&mut r)?;
    if magic != MAGIC {
        return Ok(()); // not one of ours: close silently
    }
    let version = read_u32(&mut r)?;
    w.write_all(&MAGIC.to_le_bytes())?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.flush()?;
    if version != VERSION {
        return Ok(()); // the client reports the mismatch from our answer
    }
    // Clients may stay idle for the whole generation.
    stream.set_read_timeout(None)?;
    loop {
        let op = match read_u8(&mut r) {
            Ok(op) => op,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        match op {
            OP_SET => {
                let key = read_key(&mut r)?;
                let value = read_bytes(&mut r, MAX_VALUE_LEN, "value")?;
                shared.lock().insert(key, value);
                shared.cv.notify_all();
                w.write_all(&[ST_OK])?;
            }
            OP_GET => {
                let key = read_key(&mut r)?;
                let timeout = Duration::from_millis(read_u64(&mut r)?);
                let mut value = None;
                let ok = shared.wait_until(timeout, |map| {
                    value = map.get(&key).cloned();
                    value.is_some()
                });
                if !ok && shared.stop.load(Ordering::SeqCst) {
                    return Ok(()); // closing: the client sees the server go away
                }
                match value {
                    Some(v) => {
                        w.write_all(&[ST_OK])?;
                        write_bytes(&mut w, &v)?;
                    }
                    None => w.write_all(&[ST_TIMEOUT])?,
                }
            }
            OP_ADD => {
                let key = read_key(&mut r)?;
                let delta = read_u64(&mut r)? as i64;
                let res = {
                    let mut map = shared.lock();
                    let cur = match map.get(&key) {
                        None => Ok(0i64),
                        Some(v) => <[u8; 8]>::try_from(v.as_slice())
                            .map(i64::from_le_bytes)
                            .map_err(|_| format!("key {key:?} does not hold a counter")),
                    };
                    cur.and_then(|c| {
                        c.checked_add(delta)
                            .ok_or_else(|| format!("counter {key:?} overflows"))
                    })
                    .inspect(|&n| {
                        map.insert(key.clone(), n.to_le_bytes().to_vec());
                    })
                };
                shared.cv.notify_all();
                match res {
                    Ok(n) => {
                        w.write_all(&[ST_OK])?;
                        w.write_all(&n.to_le_bytes())?;
                    }
                    Err(msg) => {
                        w.write_all(&[ST_ERR])?;
                        write_bytes(&mut w, msg.as_bytes())?;
                    }
                }
            }
            OP_WAIT => {
                let keys = read_keys(&mut r)?;
                let timeout = Duration::from_millis(read_u64(&mut r)?);
                let mut missing = None;
                let ok = shared.wait_until(timeout, |map| {
                    missing = keys.iter().find(|k| !map.contains_key(*k)).cloned();
                    missing.is_none()
                });
                if !ok && shared.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                if ok {
                    w.write_all(&[ST_OK])?;
                } else {
                    w.write_all(&[ST_TIMEOUT])?;
                    write_bytes(&mut w, missing.unwrap_or_default().as_bytes())?;
                }
            }
            OP_CHECK => {
                let keys = read_keys(&mut r)?;
                let all = {
                    let map = shared.lock();
                    keys.iter().all(|k| map.contains_key(k))
                };
                w.write_all(&[ST_OK, all as u8])?;
            }
            other => return Err(invalid(format!("unknown op {other}"))),
        }
        w.flush()?;
    }
}

// ---------------------------------------------------------------------------------------------
// Client.

struct ClientConn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    /// Set after an I/O error: the stream may be mid-message, so no later call may use it.
    broken: Option<String>,
}

/// A connection to the store. Implements [`Rendezvous`]; one request at a time (calls from
/// several threads are serialised: a thread blocked in `get` holds the connection; give each
/// thread that blocks its own client).
pub struct StoreClient {
    /// `host:port` as given, for messages.
    addr: String,
    /// Bound on replies to set/add/check (and the connect deadline).
    timeout: Duration,
    conn: Mutex<ClientConn>,
}

impl StoreClient {
    /// Connects to the store at `host:port`, retrying until `timeout` (rank 0 may start after the
    /// others); then checks the magic number and protocol version. Errors name `host:port`.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<StoreClient> {
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}") // IPv6 literal
        } else {
            format!("{host}:{port}")
        };
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        let stream = loop {
            let err = match addr.to_socket_addrs() {
                Ok(addrs) => {
                    let mut last = None;
                    let mut found = None;
                    for a in addrs {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(1))) {
                            Ok(s) => {
                                found = Some(s);
                                break;
                            }
                            Err(e) => last = Some(e.to_string()),
                        }
                    }
                    match found {
                        Some(s) => break s,
                        None => last.unwrap_or_else(|| "no address".into()),
                    }
                }
                Err(e) => format!("cannot resolve: {e}"),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Comm(format!(
                    "rendezvous store at {addr} unreachable within {timeout:?} ({err}): is rank 0 \
                     running, and are MASTER_ADDR / MASTER_PORT right?"
                )));
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(Duration::from_millis(200));
        };
        let io_err = |e: io::Error| Error::Comm(format!("rendezvous store at {addr}: {e}"));
        stream.set_nodelay(true).map_err(io_err)?;
        stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(100))))
            .map_err(io_err)?;
        let mut conn = ClientConn {
            r: BufReader::new(stream.try_clone().map_err(io_err)?),
            w: BufWriter::new(stream),
            broken: None,
        };
        let hs = (|| -> io::Result<(u64, u32)> {
            conn.w.write_all(&MAGIC.to_le_bytes())?;
            conn.w.write_all(&VERSION.to_le_bytes())?;
            conn.w.flush()?;
            Ok((read_u64(&mut conn.r)?, read_u32(&mut conn.r)?))
        })();
        match hs {
            Ok((MAGIC, VERSION)) => {}
            Ok((MAGIC, v)) => {
                return Err(Error::Comm(format!(
                    "rendezvous store at {addr} speaks protocol version {v}, this build \
                     {VERSION}: every node must run the same build"
                )))
            }
            Ok(_) => {
                return Err(Error::Comm(format!(
                    "{addr} is not a video-infinity rendezvous store (wrong magic number): \
                     another service on MASTER_PORT?"
                )))
            }
            Err(e) => {
                return Err(Error::Comm(format!(
                    "rendezvous store at {addr}: handshake failed ({e}): another service on \
                     MASTER_PORT, or a store of another build?"
                )))
            }
        }
        Ok(StoreClient {
            addr,
            timeout,
            conn: Mutex::new(conn),
        })
    }

    /// `host:port` of the store.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request (`write`), then reads its reply (`read`) with the socket's read timeout
    /// set to `reply_within`. Any I/O error breaks the connection for good.
    fn call<T>(
        &self,
        what: &str,
        reply_within: Duration,
        write: impl FnOnce(&mut BufWriter<TcpStream>) -> io::Result<()>,
        read: impl FnOnce(&mut BufReader<TcpStream>) -> io::Result<T>,
    ) -> Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = &c.broken {
            return Err(Error::Comm(format!(
                "rendezvous store at {}: {what}: connection unusable after an earlier error: {b}",
                self.addr
            )));
        }
        let res = (|| {
            write(&mut c.w)?;
            c.w.flush()?;
            c.r.get_ref()
                .set_read_timeout(Some(reply_within.max(Duration::from_millis(1))))?;
            read(&mut c.r)
        })();
        res.map_err(|e| {
            let msg = match e.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => {
                    "the server closed the connection (rank 0 exited or failed)".to_string()
                }
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    format!("no reply within {reply_within:?}")
                }
                _ => e.to_string(),
            };
            c.broken = Some(msg.clone());
            Error::Comm(format!("rendezvous store at {}: {what}: {msg}", self.addr))
        })
    }

    /// Waits until every key in `keys` is set; an error after `timeout` naming a missing key.
    pub fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        Self::check_keys(keys)?;
        let missing = self.call(
            "wait",
            timeout + REPLY_GRACE,
            |w| {
                w.write_all(&[OP_WAIT])?;
                w.write_all(&(keys.len() as u32).to_le_bytes())?;
                for k in keys {
                    write_bytes(w, k.as_bytes())?;
                }
                w.write_all(&millis(timeout).to_le_bytes())
            },
            |r| match read_u8(r)? {
                ST_OK => Ok(None),
                ST_TIMEOUT => Ok(Some(read_key(r)?)),
                s => Err(invalid(format!("bad status {s}"))),
            },
        )?;
        match missing {
            None => Ok(()),
            Some(k) => Err(Error::Comm(format!(
                "rendezvous store at {}: key {k:?} not set within {timeout:?}",
                self.addr
            ))),
        }
    }

    /// Whether every key in `keys` is set now (no waiting).
    pub fn check(&self, keys: &[&str]) -> Result<bool> {
        Self::check_keys(keys)?;
        self.call(
            "check",
            self.timeout,
            |w| {
                w.write_all(&[OP_CHECK])?;
                w.write_all(&(keys.len() as u32).to_le_bytes())?;
                for k in keys {
                    write_bytes(w, k.as_bytes())?;
                }
                Ok(())
            },
            |r| match read_u8(r)? {
                ST_OK => Ok(read_u8(r)? != 0),
                s => Err(invalid(format!("bad status {s}"))),
            },
        )
    }

    /// Adds 1 to [`DONE_KEY`]: this rank needs the store no more (see [`StoreServer::wait_done`]).
    pub fn mark_done(&self) -> Result<i64> {
        self.add(DONE_KEY, 1)
    }

    fn check_keys(keys: &[&str]) -> Result<()> {
        if keys.len() > MAX_KEYS {
            return Err(Error::Comm(format!(
                "rendezvous: {} keys exceed the limit of {MAX_KEYS}",
                keys.len()
            )));
        }
        keys.iter().try_for_each(|k| check_key(k))
    }
}

impl Rendezvous for StoreClient {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        check_key(key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::Comm(format!(
                "rendezvous: value of {key:?} ({} bytes) exceeds the limit of {MAX_VALUE_LEN} bytes",
                value.len()
            )));
        }
        self.call(
            &format!("set {key:?}"),
            self.timeout,
            |w| {
                w.write_all(&[OP_SET])?;
                write_bytes(w, key.as_bytes())?;
                write_bytes(w, value)
            },
            |r| match read_u8(r)? {
                ST_OK => Ok(()),
                s => Err(invalid(format!("bad status {s}"))),
            },
        )
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        check_key(key)?;
        let v = self.call(
            &format!("get {key:?}"),
            timeout + REPLY_GRACE,
            |w| {
                w.write_all(&[OP_GET])?;
                write_bytes(w, key.as_bytes())?;
                w.write_all(&millis(timeout).to_le_bytes())
            },
            |r| match read_u8(r)? {
                ST_OK => Ok(Some(read_bytes(r, MAX_VALUE_LEN, "value")?)),
                ST_TIMEOUT => Ok(None),
                s => Err(invalid(format!("bad status {s}"))),
            },
        )?;
        v.ok_or_else(|| {
            Error::Comm(format!(
                "rendezvous store at {}: key {key:?} not set within {timeout:?}",
                self.addr
            ))
        })
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        check_key(key)?;
        let res = self.call(
            &format!("add {key:?}"),
            self.timeout,
            |w| {
                w.write_all(&[OP_ADD])?;
                write_bytes(w, key.as_bytes())?;
                w.write_all(&delta.to_le_bytes())
            },
            |r| match read_u8(r)? {
                ST_OK => Ok(Ok(read_u64(r)? as i64)),
                ST_ERR => Ok(Err(String::from_utf8_lossy(&read_bytes(
                    r,
                    MAX_KEY_LEN + 256,
                    "message",
                )?)
                .into_owned())),
                s => Err(invalid(format!("bad status {s}"))),
            },
        )?;
        res.map_err(|m| Error::Comm(format!("rendezvous store at {}: {m}", self.addr)))
    }
}

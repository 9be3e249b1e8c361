//! Offloading long-lived tensors to a lower memory tier: a transparent pager.
//!
//! What moves: the tensors a rank thread created inside an [`scope`] (of at least `min_bytes`)
//! that are still alive and resident when the rank calls [`park`]: the rank loop parks at each
//! of its calls to the group (docs/design.md section 7), so what moves is what the rank keeps
//! across an exchange: the UNet's skip connections, the layer state of a temporal layer waiting
//! for its halos or tokens, the latents and the sampler state. Weights are created outside any
//! scope and never move.
//!
//! Where to: a [`Tier`] per process and device kind. CUDA: host memory (one `Vec<u8>` per tensor,
//! a synchronous device -> host copy on the compute stream at offload, host -> device at restore).
//! CPU: the "device" is the heap, so the lower tier is a spill file on disk, created in a
//! directory and unlinked at once (nothing is left behind on any exit); the bytes really leave
//! RAM and are read back before use. Meta (the planner's dry run): no bytes, only the accounting.
//!
//! When back: lazily, at the first access after the offload ([`crate::Tensor::storage`]), on the
//! thread that reads (the restored bytes are charged to its [`crate::meta::measure`], like a new
//! tensor). Tensors are immutable, so a copy written once stays valid: a tensor is written to its
//! tier at most once, and read back once per turn in which it is used; offloading it again only
//! drops the resident bytes. The copy's room in the tier is freed when the tensor dies.
//!
//! Costs: the I/O (on the CPU one `pwrite` per tensor at its first park and one `pread` per
//! restore, straight from and into the tensor's own buffer, no scratch; on CUDA a synchronous
//! copy each way, which stalls the compute stream) and, in every tier, the copy's room for as
//! long as the tensor lives. Not built: pinned
//! host memory, a copy stream overlapping the transfers with compute, and prefetching a tensor
//! before its use (the GPU follow-up: today a restore waits for its copy).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::tensor::Held;
use crate::{DType, Device, Error, Result, Storage};

/// Tensors smaller than this stay resident (the rank loop's threshold: below it a tensor's I/O
/// costs more than its bytes are worth).
pub const MIN_BYTES: usize = 16 << 10;

/// Which process-wide tier [`Tier::shared`] returns.
#[derive(PartialEq, Eq)]
enum TierKey {
    Meta,
    Host,
    Spill(PathBuf),
}

/// What a [`Tier`] keeps its copies in.
enum Kind {
    /// Accounting only (the dry run on `Device::Meta`).
    Meta,
    /// One host `Vec<u8>` per copy (the CUDA tier).
    Host,
    /// Ranges of an unlinked spill file (the CPU tier).
    Spill(SpillFile),
}

/// A lower memory tier, shared (`Arc`) by the ranks of a process on one device kind. Counts the
/// bytes of its live copies and their high-water mark.
pub struct Tier {
    kind: Kind,
    live: AtomicU64,
    peak: AtomicU64,
    /// Bytes written to the tier / read back from it, in all.
    written: AtomicU64,
    read: AtomicU64,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tier({}, peak {} bytes)", self.describe(), self.peak())
    }
}

impl Tier {
    /// The tier of `device`'s tensors: a spill file in `spill_dir` (the system temp dir if None)
    /// for the CPU, host memory for CUDA, accounting only for meta.
    pub fn for_device(device: Device, spill_dir: Option<&Path>) -> Result<Arc<Tier>> {
        Ok(match device {
            Device::Cpu => {
                let dir = spill_dir
                    .map(Path::to_path_buf)
                    .unwrap_or_else(std::env::temp_dir);
                Tier::spill(&dir)?
            }
            Device::Cuda(_) => Tier::host(),
            Device::Meta => Tier::meta(),
        })
    }

    /// The process's tier for `device`'s kind: the same one for every caller while any holder
    /// keeps it (the ranks of a process share one spill file, or one host pool), made by
    /// [`Tier::for_device`] at first use. CPU tiers are keyed by their directory too.
    pub fn shared(device: Device, spill_dir: Option<&Path>) -> Result<Arc<Tier>> {
        static TIERS: Mutex<Vec<(TierKey, Weak<Tier>)>> = Mutex::new(Vec::new());
        let key = match device {
            Device::Cpu => TierKey::Spill(
                spill_dir
                    .map(Path::to_path_buf)
                    .unwrap_or_else(std::env::temp_dir),
            ),
            Device::Cuda(_) => TierKey::Host,
            Device::Meta => TierKey::Meta,
        };
        let mut tiers = TIERS.lock().unwrap_or_else(|p| p.into_inner());
        tiers.retain(|(_, w)| w.strong_count() > 0);
        if let Some(t) = tiers
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(t);
        }
        let t = Tier::for_device(device, spill_dir)?;
        tiers.push((key, Arc::downgrade(&t)));
        Ok(t)
    }

    fn new(kind: Kind) -> Arc<Tier> {
        Arc::new(Tier {
            kind,
            live: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
        })
    }

    /// Accounting only: no bytes move (the planner's dry run).
    pub fn meta() -> Arc<Tier> {
        Tier::new(Kind::Meta)
    }

    /// Host memory.
    pub fn host() -> Arc<Tier> {
        Tier::new(Kind::Host)
    }

    /// A spill file in `dir`, unlinked as soon as it is created.
    pub fn spill(dir: &Path) -> Result<Arc<Tier>> {
        Ok(Tier::new(Kind::Spill(SpillFile::create(dir)?)))
    }

    /// Bytes of the copies alive now.
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::SeqCst)
    }
    /// Highest `live` so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
    /// Bytes written to the tier so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }
    /// Bytes read back so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::SeqCst)
    }

    /// `host memory`, `the spill file in DIR`, `nothing (dry run)`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Meta => "nothing (dry run)".into(),
            Kind::Host => "host memory".into(),
            Kind::Spill(s) => format!("the spill file in {}", s.dir.display()),
        }
    }

    /// The spill file's current length (0 for the other tiers): what it takes on disk.
    pub fn file_len(&self) -> u64 {
        match &self.kind {
            Kind::Spill(s) => s.free.lock().unwrap_or_else(|p| p.into_inner()).end,
            _ => 0,
        }
    }

    /// Writes `storage` (`bytes` long) to the tier.
    pub(crate) fn write(self: &Arc<Self>, storage: &Storage, bytes: usize) -> Result<OffloadCopy> {
        let data = match &self.kind {
            Kind::Meta => Data::Meta,
            Kind::Host => Data::Host(host_bytes(storage)?),
            Kind::Spill(f) => {
                let off = f.alloc(bytes as u64);
                let r = match storage {
                    Storage::CpuF32(v) => f.write_at(bytemuck::cast_slice(v), off),
                    Storage::CpuF16(v) => f.write_at(bytemuck::cast_slice(v), off),
                    Storage::CpuBF16(v) => f.write_at(bytemuck::cast_slice(v), off),
                    _ => f.write_at(&host_bytes(storage)?, off),
                };
                if let Err(e) = r {
                    f.release(off, bytes as u64);
                    return Err(e);
                }
                Data::Spill(off)
            }
        };
        let now = self.live.fetch_add(bytes as u64, Ordering::SeqCst) + bytes as u64;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.written.fetch_add(bytes as u64, Ordering::SeqCst);
        Ok(OffloadCopy {
            tier: self.clone(),
            bytes,
            data,
        })
    }
}

/// The raw bytes of `storage` in host memory (the host tier; the spill tier for CUDA storage).
fn host_bytes(storage: &Storage) -> Result<Vec<u8>> {
    Ok(match storage {
        Storage::CpuF32(v) => bytemuck::cast_slice(v).to_vec(),
        Storage::CpuF16(v) => bytemuck::cast_slice(v).to_vec(),
        Storage::CpuBF16(v) => bytemuck::cast_slice(v).to_vec(),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => s.to_raw_bytes()?,
        Storage::Meta => return Err(Error::Meta("offload to host memory")),
    })
}

/// Storage of `dtype` on `device` from raw bytes.
fn from_bytes(bytes: &[u8], dtype: DType, device: Device) -> Result<Storage> {
    match device {
        Device::Cpu => Ok(match dtype {
            DType::F32 => Storage::CpuF32(collect(bytes, 0f32)?),
            DType::F16 => Storage::CpuF16(collect(bytes, half::f16::ZERO)?),
            DType::BF16 => Storage::CpuBF16(collect(bytes, half::bf16::ZERO)?),
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => Ok(Storage::Cuda(crate::cuda::CudaStorage::from_raw_bytes(
            ord, dtype, bytes,
        )?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::Cuda(
            "this binary was built without the `cuda` feature".into(),
        )),
        Device::Meta => Ok(Storage::Meta),
    }
}

/// `bytes` as a vector of `T`.
fn collect<T: bytemuck::Pod>(bytes: &[u8], zero: T) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::Msg(format!(
            "offload: {} bytes are not whole elements of {size} bytes",
            bytes.len()
        )));
    }
    let mut v = vec![zero; bytes.len() / size];
    bytemuck::cast_slice_mut(&mut v).copy_from_slice(bytes);
    Ok(v)
}

enum Data {
    Meta,
    Host(Vec<u8>),
    /// Offset in the spill file (length: the copy's `bytes`).
    Spill(u64),
}

/// A tensor's copy in a tier; returns its room to the tier when dropped (when the tensor dies).
pub(crate) struct OffloadCopy {
    tier: Arc<Tier>,
    bytes: usize,
    data: Data,
}

impl OffloadCopy {
    /// The data back as storage of `dtype` on `device` (`bytes` long).
    pub(crate) fn restore(&self, dtype: DType, device: Device, bytes: usize) -> Result<Storage> {
        debug_assert_eq!(bytes, self.bytes);
        let s = match (&self.data, &self.tier.kind) {
            (Data::Meta, _) => Storage::Meta,
            (Data::Host(v), _) => from_bytes(v, dtype, device)?,
            (Data::Spill(off), Kind::Spill(f)) => {
                let n = bytes / dtype.size_in_bytes();
                match (device, dtype) {
                    (Device::Cpu, DType::F32) => {
                        let mut v = vec![0f32; n];
                        f.read_at(bytemuck::cast_slice_mut(&mut v), *off)?;
                        Storage::CpuF32(v)
                    }
                    (Device::Cpu, DType::F16) => {
                        let mut v = vec![half::f16::ZERO; n];
                        f.read_at(bytemuck::cast_slice_mut(&mut v), *off)?;
                        Storage::CpuF16(v)
                    }
                    (Device::Cpu, DType::BF16) => {
                        let mut v = vec![half::bf16::ZERO; n];
                        f.read_at(bytemuck::cast_slice_mut(&mut v), *off)?;
                        Storage::CpuBF16(v)
                    }
                    _ => {
                        let mut v = vec![0u8; bytes];
                        f.read_at(&mut v, *off)?;
                        from_bytes(&v, dtype, device)?
                    }
                }
            }
            (Data::Spill(_), _) => {
                return Err(Error::Msg(
                    "offload: a spill-file copy without a spill file".into(),
                ))
            }
        };
        self.tier.read.fetch_add(bytes as u64, Ordering::SeqCst);
        Ok(s)
    }
}

impl Drop for OffloadCopy {
    fn drop(&mut self) {
        if let (Data::Spill(off), Kind::Spill(f)) = (&self.data, &self.tier.kind) {
            f.release(*off, self.bytes as u64);
        }
        self.tier
            .live
            .fetch_sub(self.bytes as u64, Ordering::SeqCst);
    }
}

/// An unlinked file of copies: positioned writes and reads, its free ranges reused first fit.
struct SpillFile {
    file: File,
    dir: PathBuf,
    free: Mutex<FreeList>,
}

/// Free ranges of the spill file (offset -> length, never adjacent: freeing coalesces) below
/// `end`, the file's used length.
#[derive(Debug, Default)]
struct FreeList {
    ranges: BTreeMap<u64, u64>,
    end: u64,
}

impl FreeList {
    /// First fit: the lowest free range long enough, else the end of the file.
    fn alloc(&mut self, len: u64) -> u64 {
        let hit = self
            .ranges
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&o, &l)| (o, l));
        match hit {
            Some((off, l)) => {
                self.ranges.remove(&off);
                if l > len {
                    self.ranges.insert(off + len, l - len);
                }
                off
            }
            None => {
                let off = self.end;
                self.end += len;
                off
            }
        }
    }

    /// Returns [off, off + len) (allocated, not free: a double free is a bug, caught in debug
    /// builds), merged with its free neighbours; a range reaching the end shortens the file.
    fn release(&mut self, mut off: u64, mut len: u64) {
        debug_assert!(off + len <= self.end, "spill range past the end");
        if let Some((&po, &pl)) = self.ranges.range(..=off).next_back() {
            debug_assert!(po + pl <= off, "spill range freed twice");
            if po + pl == off {
                self.ranges.remove(&po);
                off = po;
                len += pl;
            }
        }
        if let Some((&no, &nl)) = self.ranges.range(off + len..).next() {
            debug_assert!(no >= off + len, "spill range freed twice");
            if no == off + len {
                self.ranges.remove(&no);
                len += nl;
            }
        }
        if off + len == self.end {
            self.end = off;
        } else {
            self.ranges.insert(off, len);
        }
    }
}

/// Distinguishes the spill files of one process.
static SPILL_SEQ: AtomicUsize = AtomicUsize::new(0);

impl SpillFile {
    fn create(dir: &Path) -> Result<SpillFile> {
        let name = format!(
            ".vi-spill-{}-{}",
            std::process::id(),
            SPILL_SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| {
                Error::Msg(format!(
                    "offload: cannot create a spill file in {}: {e}",
                    dir.display()
                ))
            })?;
        // Unlinked at once: the open handle keeps the data; nothing is left on any exit.
        std::fs::remove_file(&path).map_err(|e| {
            Error::Msg(format!(
                "offload: cannot unlink the spill file {}: {e}",
                path.display()
            ))
        })?;
        Ok(SpillFile {
            file,
            dir: dir.to_path_buf(),
            free: Mutex::new(FreeList::default()),
        })
    }

    fn alloc(&self, len: u64) -> u64 {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc(len)
    }

    fn release(&self, off: u64, len: u64) {
        let mut fl = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let end = fl.end;
        fl.release(off, len);
        if fl.end < end {
            // Give the tail back to the file system (best effort: a failure only keeps disk).
            let _ = self.file.set_len(fl.end);
        }
    }

    fn write_at(&self, b: &[u8], off: u64) -> Result<()> {
        self.file.write_all_at(b, off).map_err(|e| {
            Error::Msg(format!(
                "offload: writing {} bytes to the spill file in {} failed: {e}",
                b.len(),
                self.dir.display()
            ))
        })
    }

    fn read_at(&self, b: &mut [u8], off: u64) -> Result<()> {
        self.file.read_exact_at(b, off).map_err(|e| {
            Error::Msg(format!(
                "offload: reading {} bytes back from the spill file in {} failed: {e}",
                b.len(),
                self.dir.display()
            ))
        })
    }
}

/// The offload registry of a thread inside [`scope`].
struct Registry {
    /// Unique per scope (never 0).
    id: u64,
    tier: Arc<Tier>,
    min_bytes: usize,
    tensors: Vec<Weak<Held>>,
    /// Length at which [`register`] forgets the dead entries (between parks).
    prune_at: usize,
}

/// Registry length below which dead entries wait for the next [`park`].
const PRUNE_MIN: usize = 1024;

thread_local! {
    static REGISTRY: RefCell<Option<Registry>> = const { RefCell::new(None) };
}

/// Restores the thread's previous registry (also on unwind).
struct Installed(Option<Registry>);

impl Drop for Installed {
    fn drop(&mut self) {
        let prev = self.0.take();
        REGISTRY.with(|r| *r.borrow_mut() = prev);
    }
}

/// Runs `f` with an offload registry on this thread: every tensor of at least `min_bytes`
/// created on this thread while `f` runs may be moved to `tier` by [`park`]. A nested scope
/// replaces the outer one while it runs.
pub fn scope<R>(tier: Arc<Tier>, min_bytes: usize, f: impl FnOnce() -> R) -> R {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let reg = Registry {
        id: NEXT_ID.fetch_add(1, Ordering::SeqCst),
        tier,
        min_bytes,
        tensors: Vec::new(),
        prune_at: PRUNE_MIN,
    };
    let prev = REGISTRY.with(|r| r.borrow_mut().replace(reg));
    let _guard = Installed(prev);
    f()
}

/// Runs `f` with this thread's registry set aside: its tensors are never offloaded (caches that
/// live as long as the weights).
pub fn outside<R>(f: impl FnOnce() -> R) -> R {
    let prev = REGISTRY.with(|r| r.borrow_mut().take());
    let _guard = Installed(prev);
    f()
}

/// Whether a [`scope`] runs on this thread.
pub fn active() -> bool {
    REGISTRY.with(|r| r.borrow().is_some())
}

/// Registers a tensor with the thread's scope, if any: a new one (`Tensor::from_storage`), or one
/// this thread restored (`Tensor::storage`; skipped if this scope registered it last).
pub(crate) fn register(held: &Arc<Held>) {
    REGISTRY.with(|r| {
        if let Some(reg) = r.borrow_mut().as_mut() {
            if held.bytes() >= reg.min_bytes && held.bytes() > 0 && held.set_registry(reg.id) {
                if reg.tensors.len() >= reg.prune_at {
                    reg.tensors.retain(|w| w.strong_count() > 0);
                    reg.prune_at = (2 * reg.tensors.len()).max(PRUNE_MIN);
                }
                reg.tensors.push(Arc::downgrade(held));
            }
        }
    });
}

/// Offloads every tensor registered on this thread that is alive and resident (a no-op outside
/// a [`scope`]), and forgets the dead ones. Returns the bytes written to the tier.
pub fn park() -> Result<u64> {
    park_except(&[])
}

/// [`park`], leaving resident the tensors sharing storage with `keep` (what is about to be sent:
/// writing it out only to read it back at once would be wasted I/O).
pub fn park_except(keep: &[&crate::Tensor]) -> Result<u64> {
    // Taken out of the thread-local while parking: a restore or a new tensor during the I/O
    // (none today) must not see a borrowed registry.
    let Some(mut reg) = REGISTRY.with(|r| r.borrow_mut().take()) else {
        return Ok(0);
    };
    let mut written = 0u64;
    let mut result = Ok(());
    reg.tensors.retain(|w| {
        let Some(h) = w.upgrade() else {
            return false;
        };
        if result.is_err() || keep.iter().any(|t| t.holds(&h)) {
            return true;
        }
        match h.offload(&reg.tier) {
            Ok(n) => written += n as u64,
            Err(e) => result = Err(e),
        }
        true
    });
    REGISTRY.with(|r| *r.borrow_mut() = Some(reg));
    result.map(|()| written)
}

/// Tensors registered on this thread and still alive (tests, diagnostics).
pub fn registered() -> usize {
    REGISTRY.with(|r| {
        r.borrow().as_ref().map_or(0, |reg| {
            reg.tensors.iter().filter(|w| w.strong_count() > 0).count()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{meta, Tensor};

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37).sin() * 1e3 + 1e-3)
            .collect()
    }

    /// A fresh empty directory under the system temp dir.
    fn empty_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vi-offload-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_is_bit_exact_in_every_dtype_and_tier() {
        let dir = empty_dir("roundtrip");
        for tier in [Tier::spill(&dir).unwrap(), Tier::host()] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let t = Tensor::from_vec(values(1000), &[10, 100])
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let before: Vec<u32> = t
                    .to_vec_f32()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let view = t.reshape(&[1000]).unwrap();
                assert_eq!(t.offload_to(&tier).unwrap(), 1000 * dtype.size_in_bytes());
                assert!(
                    !t.is_resident() && !view.is_resident(),
                    "shared storage moved"
                );
                let after: Vec<u32> = view
                    .to_vec_f32()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert_eq!(before, after, "{dtype:?} in {}", tier.describe());
                assert!(t.is_resident());
                // The copy stays valid: a second offload writes nothing.
                assert_eq!(t.offload_to(&tier).unwrap(), 0);
                assert_eq!(
                    t.to_dtype(DType::F32).unwrap().to_vec_f32().unwrap().len(),
                    1000
                );
            }
        }
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "spill file left behind"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_offloaded_tensor_is_read_by_another_thread_and_charged_there() {
        let dir = empty_dir("thread");
        let tier = Tier::spill(&dir).unwrap();
        let t = Tensor::from_vec(values(4096), &[4096]).unwrap();
        t.offload_to(&tier).unwrap();
        assert_eq!(tier.live(), 4096 * 4);
        let (sum, peak) = std::thread::scope(|s| {
            s.spawn(|| meta::measure(|| t.as_cpu_f32().unwrap().iter().sum::<f32>()))
                .join()
                .unwrap()
        });
        assert_eq!(sum, values(4096).iter().sum::<f32>());
        assert_eq!(peak, 4096 * 4, "the restore is charged to its reader");
        drop(t);
        assert_eq!(tier.live(), 0, "the copy dies with the tensor");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reader_keeps_the_bytes_while_the_tensor_is_offloaded() {
        let tier = Tier::host();
        let t = Tensor::from_vec(values(64), &[64]).unwrap();
        let held = t.as_cpu_f32().unwrap();
        t.offload_to(&tier).unwrap();
        assert!(!t.is_resident());
        assert_eq!(&held[..], &values(64)[..]);
    }

    #[test]
    fn freed_ranges_are_reused_first_fit_and_coalesced() {
        let mut f = FreeList::default();
        let a = f.alloc(100);
        let b = f.alloc(50);
        let c = f.alloc(10);
        assert_eq!((a, b, c, f.end), (0, 100, 150, 160));
        f.release(a, 100);
        assert_eq!(f.alloc(40), 0, "first fit in a freed range");
        assert_eq!(f.alloc(70), 160, "no free range long enough: the end");
        f.release(b, 50);
        // [40, 150) free: the rest of a and b coalesced.
        assert_eq!(f.ranges.get(&40), Some(&110));
        f.release(0, 40);
        assert_eq!(f.ranges.get(&0), Some(&150));
        f.release(160, 70);
        assert_eq!(f.end, 160, "a range at the end shortens the file");
        f.release(150, 10);
        assert_eq!(
            (f.end, f.ranges.len()),
            (0, 0),
            "everything free: an empty file"
        );
    }

    #[test]
    fn spill_file_reuses_room_of_dead_copies() {
        let dir = empty_dir("reuse");
        let tier = Tier::spill(&dir).unwrap();
        let a = Tensor::from_vec(values(256), &[256]).unwrap();
        let b = Tensor::from_vec(values(256), &[256]).unwrap();
        a.offload_to(&tier).unwrap();
        b.offload_to(&tier).unwrap();
        assert_eq!((tier.file_len(), tier.peak()), (2048, 2048));
        drop(a);
        let c = Tensor::from_vec(vec![7.0; 256], &[256]).unwrap();
        c.offload_to(&tier).unwrap();
        assert_eq!(tier.file_len(), 2048, "c took a's room");
        assert_eq!(c.to_vec_f32().unwrap(), vec![7.0; 256]);
        assert_eq!(
            b.to_vec_f32().unwrap(),
            values(256),
            "b untouched by c's write"
        );
        drop((b, c));
        assert_eq!((tier.live(), tier.file_len()), (0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn park_moves_every_live_registered_tensor_and_prunes_the_dead() {
        let tier = Tier::host();
        let before = Tensor::from_vec(values(64), &[64]).unwrap(); // outside: never registered
        let (kept, sent) = scope(tier.clone(), 16, || {
            let small = Tensor::from_vec(vec![1.0; 2], &[2]).unwrap(); // below min_bytes
            let a = Tensor::from_vec(values(64), &[64]).unwrap();
            let b = Tensor::from_vec(values(32), &[32]).unwrap();
            let dead = Tensor::from_vec(values(16), &[16]).unwrap();
            let sent = Tensor::from_vec(values(8), &[8]).unwrap();
            let cache = outside(|| Tensor::from_vec(values(8), &[8]).unwrap());
            drop(dead);
            assert_eq!(registered(), 3);
            assert_eq!(park_except(&[&sent]).unwrap(), (64 + 32) * 4);
            assert!(!a.is_resident() && !b.is_resident(), "a live tensor stayed");
            assert!(small.is_resident() && sent.is_resident() && cache.is_resident());
            assert_eq!(registered(), 3);
            // Restored by use, parked again without a write.
            assert_eq!(a.to_vec_f32().unwrap(), values(64));
            assert_eq!(park().unwrap(), 8 * 4, "only `sent` is written");
            assert!(!a.is_resident() && !sent.is_resident());
            let n = REGISTRY.with(|r| r.borrow().as_ref().unwrap().tensors.len());
            assert_eq!(n, 3, "the dead entry was pruned");
            (a, sent)
        });
        assert!(before.is_resident());
        assert_eq!(park().unwrap(), 0, "no scope: nothing parked");
        assert_eq!(kept.to_vec_f32().unwrap(), values(64));
        assert_eq!(sent.to_vec_f32().unwrap(), values(8));
    }

    #[test]
    fn a_reader_that_restores_another_threads_tensor_parks_it_again() {
        let tier = Tier::host();
        let t = scope(tier.clone(), 16, || {
            let t = Tensor::from_vec(values(64), &[64]).unwrap();
            park().unwrap();
            t
        });
        assert!(!t.is_resident());
        std::thread::scope(|s| {
            s.spawn(|| {
                scope(tier.clone(), 16, || {
                    assert_eq!(t.to_vec_f32().unwrap(), values(64));
                    assert!(t.is_resident());
                    assert_eq!(registered(), 1, "the restore registers it with the reader");
                    assert_eq!(park().unwrap(), 0, "the copy exists: nothing written");
                    assert!(!t.is_resident());
                })
            })
            .join()
            .unwrap()
        });
    }

    #[test]
    fn meta_tier_moves_only_the_accounting() {
        let tier = Tier::meta();
        let ((), peak) = meta::measure(|| {
            let t = meta::tracked(&[1000], DType::F32);
            t.offload_to(&tier).unwrap();
            assert_eq!(meta::live_bytes(), 0);
            assert_eq!(tier.live(), 4000);
            let u = crate::ops::silu(&t).unwrap(); // restores t, then its output
            assert_eq!(meta::live_bytes(), 8000);
            drop(u);
        });
        assert_eq!(peak, 8000);
        assert_eq!(tier.live(), 0);
        assert_eq!(tier.peak(), 4000);
    }

    #[test]
    fn spill_errors_name_the_directory_and_leave_nothing() {
        let dir = empty_dir("err");
        let missing = dir.join("no-such-dir");
        let e = Tier::spill(&missing).unwrap_err().to_string();
        assert!(e.contains("no-such-dir"), "{e}");
        // A full device: /dev/full refuses every write with ENOSPC.
        if let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
        {
            let tier = Tier::new(Kind::Spill(SpillFile {
                file,
                dir: dir.clone(),
                free: Mutex::new(FreeList::default()),
            }));
            let t = Tensor::from_vec(values(64), &[64]).unwrap();
            let e = t.offload_to(&tier).unwrap_err().to_string();
            assert!(
                e.contains("256 bytes") && e.contains(&*dir.to_string_lossy()),
                "{e}"
            );
            assert!(t.is_resident(), "a failed offload keeps the data");
            assert_eq!(
                (tier.live(), tier.file_len()),
                (0, 0),
                "the range is returned"
            );
        } else {
            eprintln!("SKIP the ENOSPC case: /dev/full cannot be opened");
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

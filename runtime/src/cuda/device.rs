//! The CUDA device and its memory: one cached [`CudaDevice`] per ordinal (context, the single stream,
//! loaded kernel modules, the memory pool, per-device library state) and [`CudaStorage`] (one typed
//! device buffer, the `Storage::Cuda` payload of a tensor). The lowest module of the backend: it
//! imports no sibling but `timing` (the per-device profiler).
//!
//! Memory: allocations are stream-ordered (`cuMemAllocAsync`) from the device's default memory pool
//! whose release threshold is raised to "keep everything": freed blocks stay cached in the pool and are
//! reused by the next allocation of the stream, so a UNet pass does not call the OS-level allocator per
//! op (the driver's pool is the caching allocator; free + alloc of a cached block costs ~1 µs).
//!
//! Synchronisation: cudarc's per-buffer event tracking is disabled (it would create two CUDA events per
//! allocation); it is not needed because every kernel, copy and GEMM of a device runs on its one stream
//! in issue order, and tensors are immutable (outputs are always fresh buffers).

use std::any::Any;
use std::collections::HashMap;
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};

use super::timing::Profiler;
use crate::{DType, Device, Error, Result, Storage, Tensor};

/// Wrap a CUDA-side error with what we were doing.
pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Run a cudarc call that may panic because a shared library or symbol is missing; turn the panic into
/// an error mentioning `what`.
pub(crate) fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Error::Cuda(format!("{what}: {msg}"))
    })
}

/// Number of CUDA devices, or an error when there is no driver. Never panics.
pub fn device_count() -> Result<usize> {
    check_driver()?;
    let n = no_panic("cuDeviceGetCount", || {
        cudarc::driver::result::init()?;
        cudarc::driver::result::device::get_count()
    })?
    .map_err(|e| cuda_err("cuDeviceGetCount", e))?;
    Ok(n as usize)
}

/// True when a CUDA driver and at least one device are present (tests and benches skip otherwise).
pub fn is_available() -> bool {
    matches!(device_count(), Ok(n) if n > 0)
}

/// Wait for all work queued on device `ordinal` (benchmarks; reading a tensor back syncs anyway).
pub fn synchronize(ordinal: usize) -> Result<()> {
    device(ordinal)?.synchronize()
}

/// (name, compute capability, free bytes, total bytes) of device `ordinal`. Freed tensors stay
/// cached in the memory pool, so `total - free` is the high-water mark of the process.
pub fn device_info(ordinal: usize) -> Result<(String, (u32, u32), usize, usize)> {
    let d = device(ordinal)?;
    let name = d.ctx.name().map_err(|e| cuda_err("device name", e))?;
    let (free, total) = d
        .ctx
        .mem_get_info()
        .map_err(|e| cuda_err("memory info", e))?;
    Ok((name, d.cc, free, total))
}

fn check_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the driver library (no CUDA call is made).
    let present = no_panic("loading libcuda", || unsafe {
        cudarc::driver::sys::is_culib_present()
    })?;
    if !present {
        return Err(Error::Cuda(
            "no CUDA driver found (libcuda.so.1 could not be loaded)".into(),
        ));
    }
    Ok(())
}

/// (source buffer address, element count, re-layout tag) of a cached weight re-layout.
pub(crate) type WeightKey = (u64, usize, &'static str);

/// A CUDA device as used by the runtime. Cached per ordinal for the life of the process.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// (major, minor) compute capability.
    cc: (u32, u32),
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<String, CudaFunction>>,
    /// The cuBLASLt state (`blas::Blas`, created on first use by `CudaDevice::blas`).
    pub(crate) blas: Slot,
    /// The cuDNN state (`cudnn::Dnn`, created on first use by `CudaDevice::dnn`).
    pub(crate) dnn: Slot,
    /// Weight re-layouts cached per source buffer address and length (conv weights to
    /// [Cout, kh, kw, Cin], temporal conv weights to [k, Cout, Cin]). The entry keeps the source tensor
    /// alive, so its address cannot be reused by another buffer while the entry exists.
    pub(crate) weight_cache: Mutex<HashMap<WeightKey, (Tensor, Tensor)>>,
    pub(crate) profiler: Arc<Profiler>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({}, sm_{}{})",
            self.ordinal, self.cc.0, self.cc.1
        )
    }
}

static DEVICES: Mutex<Vec<Option<Arc<CudaDevice>>>> = Mutex::new(Vec::new());
static POISON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// When on, every new device buffer is filled with all-ones bytes (NaN in f32/bf16/f16) before use, so
/// elements a kernel fails to write show up as NaN. For tests; off by default.
pub fn set_poison_allocations(on: bool) {
    POISON.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The cached device for `ordinal` (created on first use).
pub(crate) fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    let mut devs = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(Some(d)) = devs.get(ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(CudaDevice::new(ordinal)?);
    if devs.len() <= ordinal {
        devs.resize(ordinal + 1, None);
    }
    devs[ordinal] = Some(d.clone());
    Ok(d)
}

impl CudaDevice {
    fn new(ordinal: usize) -> Result<CudaDevice> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(Error::Cuda(format!(
                "CUDA device {ordinal} requested but {n} device(s) present"
            )));
        }
        let ctx = no_panic("creating the CUDA context", || CudaContext::new(ordinal))?
            .map_err(|e| cuda_err("creating the CUDA context", e))?;
        // SAFETY: all work of this device is issued on `stream` below (single-stream ordering), so the
        // per-buffer events cudarc would otherwise create are unnecessary.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating a stream", e))?;
        if ctx.has_async_alloc() {
            // SAFETY: plain driver calls on this device's default pool; the attribute is a u64.
            unsafe {
                let pool = cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device())
                    .map_err(|e| cuda_err("default memory pool", e))?;
                let mut keep: u64 = u64::MAX;
                cudarc::driver::sys::cuMemPoolSetAttribute(
                    pool,
                    cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut std::ffi::c_void,
                )
                .result()
                .map_err(|e| cuda_err("memory pool release threshold", e))?;
            }
        }
        Ok(CudaDevice {
            ordinal,
            ctx,
            stream,
            cc: (major as u32, minor as u32),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            blas: Slot::default(),
            dnn: Slot::default(),
            weight_cache: Mutex::new(HashMap::new()),
            profiler: Arc::new(Profiler::new(crate::knobs::get().profile)),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }
    pub(crate) fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The one stream all work of this device runs on.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Wait for all queued work of this device.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("stream synchronize", e))
    }

    /// The kernel `kernel` of module `module` (`cuda/kernels/<module>.cu`). The module is loaded once:
    /// the embedded cubin for this device's compute capability, else the PTX (JIT by the driver).
    pub(crate) fn func(&self, module: &str, kernel: &str) -> Result<CudaFunction> {
        let key = format!("{module}::{kernel}");
        if let Some(f) = self.funcs.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(kernel).map_err(|e| {
            cuda_err(
                &format!("kernel `{kernel}` not found in module `{module}`"),
                e,
            )
        })?;
        self.funcs.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, name: &str) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().unwrap();
        let src = vi_kernels::module(name).ok_or_else(|| {
            Error::Cuda(format!(
                "kernel module `{name}` is not embedded (cuda/kernels/{name}.cu missing or vi-kernels \
                 built without its `cuda` feature)"
            ))
        })?;
        if let Some(m) = mods.get(src.name) {
            return Ok(m.clone());
        }
        let image = src.image_for(self.cc.0, self.cc.1).to_vec();
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image))
            .map_err(|e| cuda_err(&format!("loading kernel module `{name}`"), e))?;
        mods.insert(src.name, m.clone());
        Ok(m)
    }

    /// A fresh uninitialised buffer of `len` elements (NaN-filled when poisoning is on).
    pub(crate) fn alloc(self: &Arc<Self>, dtype: DType, len: usize) -> Result<CudaStorage> {
        let what = || format!("allocating {len} x {dtype:?} on cuda:{}", self.ordinal);
        // SAFETY: the buffer is uninitialised; every caller writes all `len` elements before reading
        // (or poisoning fills it below).
        let buf = unsafe {
            match dtype {
                DType::F32 => self.stream.alloc::<f32>(len).map(CudaBuf::F32),
                DType::BF16 => self.stream.alloc::<bf16>(len).map(CudaBuf::BF16),
                DType::F16 => self.stream.alloc::<f16>(len).map(CudaBuf::F16),
            }
        }
        .map_err(|e| cuda_err(&what(), e))?;
        let s = CudaStorage {
            dev: self.clone(),
            buf,
        };
        if POISON.load(std::sync::atomic::Ordering::Relaxed) {
            s.memset_bytes(0xFF)?;
        }
        Ok(s)
    }

    /// A fresh zero-filled buffer.
    pub(crate) fn alloc_zeros(self: &Arc<Self>, dtype: DType, len: usize) -> Result<CudaStorage> {
        let s = self.alloc(dtype, len)?;
        s.memset_bytes(0)?;
        Ok(s)
    }
}

/// Typed device buffer.
pub enum CudaBuf {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

impl CudaBuf {
    fn len(&self) -> usize {
        match self {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::BF16(s) => s.len(),
            CudaBuf::F16(s) => s.len(),
        }
    }
}

/// The data of a CUDA tensor: one contiguous device buffer.
pub struct CudaStorage {
    dev: Arc<CudaDevice>,
    buf: CudaBuf,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage({:?}, {:?} x {})",
            self.dev,
            self.dtype(),
            self.len()
        )
    }
}

impl CudaStorage {
    /// Upload f32 host data to device `ordinal`, stored as `dtype` (converted on the host).
    pub fn from_f32(ordinal: usize, data: &[f32], dtype: DType) -> Result<CudaStorage> {
        let dev = device(ordinal)?;
        let st = dev.stream();
        let what = "host -> device copy";
        let buf = match dtype {
            DType::F32 => CudaBuf::F32(st.clone_htod(data).map_err(|e| cuda_err(what, e))?),
            DType::BF16 => {
                let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                CudaBuf::BF16(st.clone_htod(&h).map_err(|e| cuda_err(what, e))?)
            }
            DType::F16 => {
                let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                CudaBuf::F16(st.clone_htod(&h).map_err(|e| cuda_err(what, e))?)
            }
        };
        Ok(CudaStorage { dev, buf })
    }

    /// Upload bf16 host data (no conversion).
    pub fn from_bf16(ordinal: usize, data: &[bf16]) -> Result<CudaStorage> {
        let dev = device(ordinal)?;
        let buf = dev
            .stream()
            .clone_htod(data)
            .map_err(|e| cuda_err("host -> device copy", e))?;
        Ok(CudaStorage {
            dev,
            buf: CudaBuf::BF16(buf),
        })
    }

    /// Copy to the host as f32 (synchronises the stream).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        let st = self.dev.stream();
        let what = "device -> host copy";
        Ok(match &self.buf {
            CudaBuf::F32(s) => st.clone_dtoh(s).map_err(|e| cuda_err(what, e))?,
            CudaBuf::BF16(s) => st
                .clone_dtoh(s)
                .map_err(|e| cuda_err(what, e))?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            CudaBuf::F16(s) => st
                .clone_dtoh(s)
                .map_err(|e| cuda_err(what, e))?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        })
    }

    /// The raw bytes of the buffer, copied to the host (synchronises the stream): the host tier
    /// of [`crate::offload`].
    pub fn to_raw_bytes(&self) -> Result<Vec<u8>> {
        let st = self.dev.stream();
        let what = "device -> host copy (offload)";
        Ok(match &self.buf {
            CudaBuf::F32(s) => {
                bytemuck::cast_slice(&st.clone_dtoh(s).map_err(|e| cuda_err(what, e))?).to_vec()
            }
            CudaBuf::BF16(s) => {
                bytemuck::cast_slice(&st.clone_dtoh(s).map_err(|e| cuda_err(what, e))?).to_vec()
            }
            CudaBuf::F16(s) => {
                bytemuck::cast_slice(&st.clone_dtoh(s).map_err(|e| cuda_err(what, e))?).to_vec()
            }
        })
    }

    /// A buffer of `dtype` on device `ordinal` holding `bytes` (raw, as [`Self::to_raw_bytes`]
    /// wrote them): the restore of [`crate::offload`].
    pub fn from_raw_bytes(ordinal: usize, dtype: DType, bytes: &[u8]) -> Result<CudaStorage> {
        let dev = device(ordinal)?;
        let st = dev.stream();
        let what = "host -> device copy (restore)";
        if !bytes.len().is_multiple_of(dtype.size_in_bytes()) {
            return Err(Error::Cuda(format!(
                "restore: {} bytes are not whole {dtype:?} elements",
                bytes.len()
            )));
        }
        let n = bytes.len() / dtype.size_in_bytes();
        let buf = match dtype {
            DType::F32 => {
                let mut h = vec![0f32; n];
                bytemuck::cast_slice_mut(&mut h).copy_from_slice(bytes);
                CudaBuf::F32(st.clone_htod(&h).map_err(|e| cuda_err(what, e))?)
            }
            DType::BF16 => {
                let mut h = vec![bf16::ZERO; n];
                bytemuck::cast_slice_mut(&mut h).copy_from_slice(bytes);
                CudaBuf::BF16(st.clone_htod(&h).map_err(|e| cuda_err(what, e))?)
            }
            DType::F16 => {
                let mut h = vec![f16::ZERO; n];
                bytemuck::cast_slice_mut(&mut h).copy_from_slice(bytes);
                CudaBuf::F16(st.clone_htod(&h).map_err(|e| cuda_err(what, e))?)
            }
        };
        Ok(CudaStorage { dev, buf })
    }

    pub fn dtype(&self) -> DType {
        match self.buf {
            CudaBuf::F32(_) => DType::F32,
            CudaBuf::BF16(_) => DType::BF16,
            CudaBuf::F16(_) => DType::F16,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub(crate) fn dev(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// Raw device address of the first element (for kernel arguments and cuBLASLt). Valid while
    /// `self` lives; all users run on the device's single stream, so no extra synchronisation.
    pub(crate) fn ptr(&self) -> u64 {
        let st = self.dev.stream();
        match &self.buf {
            CudaBuf::F32(s) => s.device_ptr(st).0,
            CudaBuf::BF16(s) => s.device_ptr(st).0,
            CudaBuf::F16(s) => s.device_ptr(st).0,
        }
    }
    /// Address of element `elem` (for GEMMs on row ranges).
    pub(crate) fn ptr_at(&self, elem: usize) -> u64 {
        self.ptr() + (elem * self.dtype().size_in_bytes()) as u64
    }
    fn memset_bytes(&self, byte: u8) -> Result<()> {
        let bytes = self.len() * self.dtype().size_in_bytes();
        if bytes == 0 {
            return Ok(());
        }
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: writes exactly the bytes of this buffer, on its stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                self.ptr(),
                byte,
                bytes,
                self.dev.stream.cu_stream(),
            )
        }
        .map_err(|e| cuda_err("memset", e))
    }

    /// Wrap as a tensor of `shape` (must hold `len()` elements).
    pub(crate) fn into_tensor(self, shape: &[usize]) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), self.len());
        let dtype = self.dtype();
        let ordinal = self.dev.ordinal;
        Tensor::from_storage(
            Storage::Cuda(self),
            shape.to_vec(),
            dtype,
            Device::Cuda(ordinal),
        )
    }
}

/// The CUDA storage of a tensor (error if it is not on a CUDA device).
pub(crate) fn storage(t: &Tensor, op: &'static str) -> Result<CudaRef> {
    let s = t.storage()?;
    match &*s {
        Storage::Cuda(_) => Ok(CudaRef(s)),
        _ => Err(Error::DeviceMismatch {
            op,
            a: Device::Cuda(0),
            b: t.device(),
        }),
    }
}

/// Keeps a buffer whose address was handed to a launch alive until the launch is enqueued: the
/// operand's own buffer, or a converted copy.
#[allow(dead_code)] // held for its Drop only
pub(crate) enum Keep {
    Held(CudaRef),
    Copy(CudaStorage),
}

/// A held CUDA storage ([`storage`]): the device buffer stays alive (its address valid) while
/// this handle lives, even if the tensor is offloaded meanwhile ([`crate::offload`]). Keep it
/// alive for as long as a raw pointer taken from it is used (until the op's launches are
/// enqueued: frees are stream-ordered on the device's single stream).
pub(crate) struct CudaRef(crate::StorageRef);

impl std::ops::Deref for CudaRef {
    type Target = CudaStorage;
    fn deref(&self) -> &CudaStorage {
        match &*self.0 {
            Storage::Cuda(s) => s,
            _ => unreachable!("CudaRef is made from CUDA storage only"),
        }
    }
}

/// Per-device state owned by a module above this one (the cuBLASLt and cuDNN handles), created on
/// first use. The device only stores it; its owner names the type (`CudaDevice::blas`, `::dnn`),
/// so this module does not depend on the libraries' modules. A failed creation is stored too (as the
/// owner's `Result`) and reported on every later use.
#[derive(Default)]
pub(crate) struct Slot(OnceLock<Box<SlotValue>>);

/// What a [`Slot`] holds: any thread-safe value that, like the rest of the device, may be observed
/// across a caught panic.
type SlotValue = dyn Any + Send + Sync + UnwindSafe + RefUnwindSafe;

impl Slot {
    /// The value, created by `init` on first use. `T` must be the same type at every call.
    pub(crate) fn get_or_init<T: Any + Send + Sync + UnwindSafe + RefUnwindSafe>(
        &self,
        init: impl FnOnce() -> T,
    ) -> Result<&T> {
        let v: &(dyn Any + Send + Sync) = &**self.0.get_or_init(|| Box::new(init()));
        v.downcast_ref::<T>()
            .ok_or_else(|| Error::Cuda("device slot read as another type".into()))
    }
}

use std::sync::{Arc, Mutex};

use half::{bf16, f16};

use crate::{DType, Device, Error, Result};

/// Backing data of a tensor. Always contiguous, row-major, exactly `elem_count` elements.
pub enum Storage {
    /// CPU: f32 is the compute type; f16/bf16 only hold data until converted.
    CpuF32(Vec<f32>),
    CpuF16(Vec<f16>),
    CpuBF16(Vec<bf16>),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
    /// Shape only (parameter tables).
    Meta,
}

/// The bytes of a resident tensor and, while a [`crate::meta::measure`] runs on the thread that
/// created (or restored) them, their charge (released when the last handle is dropped).
pub(crate) struct Resident {
    storage: Storage,
    _charge: Option<crate::meta::Charge>,
}

/// Where a tensor's data is: resident (on its device), in a lower tier ([`crate::offload`]), or
/// both. Invariant: at least one of the two is `Some`.
struct Residency {
    resident: Option<Arc<Resident>>,
    copy: Option<crate::offload::OffloadCopy>,
}

/// The shared state of every tensor viewing one storage (clones, reshapes). The data never
/// changes (tensors are immutable); only where it lives does. The lock is held only to look at or
/// swap the residency (and during a restore's read-back), never while an op computes: ops hold a
/// [`StorageRef`], which keeps the bytes alive after an offload dropped them here.
pub(crate) struct Held {
    /// elem_count * dtype size.
    bytes: usize,
    dtype: DType,
    device: Device,
    state: Mutex<Residency>,
    /// Id of the offload registry that registered this storage last (0: none): a reader that
    /// restores it registers it with its own ([`crate::offload`]), once.
    registry: std::sync::atomic::AtomicU64,
}

impl Held {
    fn new(storage: Storage, bytes: usize, dtype: DType, device: Device, charged: bool) -> Held {
        Held {
            bytes,
            dtype,
            device,
            state: Mutex::new(Residency {
                resident: Some(Arc::new(Resident {
                    storage,
                    _charge: if charged {
                        crate::meta::Charge::new(bytes)
                    } else {
                        None
                    },
                })),
                copy: None,
            }),
            registry: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Records `id` as the registry of this storage; false if it was already.
    pub(crate) fn set_registry(&self, id: u64) -> bool {
        self.registry.swap(id, std::sync::atomic::Ordering::SeqCst) != id
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Residency> {
        // A panic while the lock was held cannot leave the residency inconsistent (each update
        // is one assignment), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the bytes are on the device now.
    pub(crate) fn is_resident(&self) -> bool {
        self.lock().resident.is_some()
    }

    /// The resident bytes; restores them from the lower tier first if they were offloaded (a
    /// fresh charge on the calling thread's measurement, like a new tensor).
    /// The resident bytes, and whether this call restored them.
    fn resident(&self) -> Result<(Arc<Resident>, bool)> {
        let mut st = self.lock();
        if let Some(r) = &st.resident {
            return Ok((r.clone(), false));
        }
        let copy = st.copy.as_ref().ok_or_else(|| {
            Error::Msg("tensor has neither resident data nor an offloaded copy".into())
        })?;
        let storage = copy.restore(self.dtype, self.device, self.bytes)?;
        let r = Arc::new(Resident {
            storage,
            _charge: crate::meta::Charge::new(self.bytes),
        });
        st.resident = Some(r.clone());
        Ok((r, true))
    }

    /// Moves the data to `tier`: writes a copy unless one exists (the data never changes, so a
    /// copy written once stays valid), then drops the resident bytes (freed when the last
    /// reader's [`StorageRef`] goes). Returns the bytes written (0: already had a copy, or was
    /// not resident).
    pub(crate) fn offload(&self, tier: &Arc<crate::offload::Tier>) -> Result<usize> {
        let (resident, has_copy) = {
            let st = self.lock();
            match &st.resident {
                None => return Ok(0),
                Some(r) => (r.clone(), st.copy.is_some()),
            }
        };
        let mut written = 0;
        let copy = if has_copy {
            None
        } else {
            written = self.bytes;
            Some(tier.write(&resident.storage, self.bytes)?)
        };
        let dropped = {
            let mut st = self.lock();
            if let Some(c) = copy {
                st.copy = Some(c);
            }
            st.resident.take()
        };
        // Released outside the lock (a CUDA free may synchronise).
        drop((dropped, resident));
        Ok(written)
    }
}

/// A handle on a tensor's resident bytes ([`Tensor::storage`]): keeps them alive while held (an
/// offload meanwhile only drops the tensor's own reference). Hold it for one op, not longer.
pub struct StorageRef(Arc<Resident>);

impl std::ops::Deref for StorageRef {
    type Target = Storage;
    fn deref(&self) -> &Storage {
        &self.0.storage
    }
}

/// The f32 data of a resident CPU f32 tensor ([`Tensor::as_cpu_f32`]).
pub struct CpuF32Ref(StorageRef);

impl std::ops::Deref for CpuF32Ref {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.0 {
            Storage::CpuF32(v) => v,
            // Checked when the handle was made.
            _ => &[],
        }
    }
}

/// An immutable, contiguous, row-major n-d array. Cloning is cheap (shared storage).
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Held>,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor{{shape: {:?}, dtype: {:?}, device: {:?}}}",
            self.shape, self.dtype, self.device
        )
    }
}

impl Tensor {
    /// Build from raw parts; `storage` must hold `shape.product()` elements of `dtype` on `device`.
    /// Charged to the thread's [`crate::meta::measure`], if one runs (a `Storage::Meta` storage
    /// too: the dry run's activations).
    pub fn from_storage(storage: Storage, shape: Vec<usize>, dtype: DType, device: Device) -> Self {
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        let held = Arc::new(Held::new(storage, bytes, dtype, device, true));
        crate::offload::register(&held);
        Tensor {
            storage: held,
            shape,
            dtype,
            device,
        }
    }

    /// f32 tensor on the CPU from a vector.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::shape(
                "from_vec",
                format!(
                    "{} elements for shape {:?} ({} needed)",
                    data.len(),
                    shape,
                    n
                ),
            ));
        }
        Ok(Tensor::from_storage(
            Storage::CpuF32(data),
            shape.to_vec(),
            DType::F32,
            Device::Cpu,
        ))
    }

    /// f32 data placed on `device` as `dtype`. On a GPU the conversion happens on the host and only
    /// `dtype`'s bytes cross the bus (weights: bf16 uploads are half the f32 bytes, no device-side
    /// f32 temporary).
    pub fn from_slice_on(
        data: &[f32],
        shape: &[usize],
        device: Device,
        dtype: DType,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(ord) = device {
            let n: usize = shape.iter().product();
            if data.len() != n {
                return Err(Error::shape(
                    "from_slice_on",
                    format!("{} elements for shape {shape:?} ({n} needed)", data.len()),
                ));
            }
            let s = crate::cuda::CudaStorage::from_f32(ord, data, dtype)?;
            return Ok(Tensor::from_storage(
                Storage::Cuda(s),
                shape.to_vec(),
                dtype,
                device,
            ));
        }
        Tensor::from_vec(data.to_vec(), shape)?
            .to_device(device)?
            .to_dtype(dtype)
    }

    pub fn zeros(shape: &[usize], device: Device, dtype: DType) -> Result<Tensor> {
        if device == Device::Meta {
            return Ok(crate::meta::tracked(shape, dtype));
        }
        let n: usize = shape.iter().product();
        Tensor::from_vec(vec![0.0; n], shape)?
            .to_device(device)?
            .to_dtype(dtype)
    }

    /// A shape-only tensor (no data), never charged to a [`crate::meta::measure`]: parameter
    /// tables and dry-run weights. Ops on meta tensors return charged meta tensors
    /// ([`crate::meta::tracked`]).
    pub fn meta(shape: &[usize], dtype: DType) -> Tensor {
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        Tensor {
            storage: Arc::new(Held::new(Storage::Meta, bytes, dtype, Device::Meta, false)),
            shape: shape.to_vec(),
            dtype,
            device: Device::Meta,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Size of dimension `d`; negative-free: panics only on a caller bug (d >= rank).
    pub fn dim(&self, d: usize) -> usize {
        self.shape[d]
    }
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }
    /// The data, restored from its lower tier first if it was offloaded ([`crate::offload`]):
    /// an I/O error of the tier is returned. The handle keeps the bytes alive; drop it after use.
    pub fn storage(&self) -> Result<StorageRef> {
        let (r, restored) = self.storage.resident()?;
        if restored {
            // Parked again at the reader's next park, like the reader's own tensors (a tensor
            // another rank made and parked would otherwise stay resident until its maker's).
            crate::offload::register(&self.storage);
        }
        Ok(StorageRef(r))
    }

    /// Whether the data is on the device now (false: offloaded, restored on next use).
    pub fn is_resident(&self) -> bool {
        self.storage.is_resident()
    }

    /// Moves the data to `tier` now (what [`crate::offload::park`] does to each registered
    /// tensor); the next use restores it. Returns the bytes written (0 if a copy existed).
    pub fn offload_to(&self, tier: &Arc<crate::offload::Tier>) -> Result<usize> {
        self.storage.offload(tier)
    }

    /// Whether this tensor's storage is `held`.
    pub(crate) fn holds(&self, held: &Arc<Held>) -> bool {
        Arc::ptr_eq(&self.storage, held)
    }

    /// Whether `self` and `other` share their storage (clones, reshapes).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// Same data, new shape (free: tensors are contiguous).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.elem_count() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} -> {:?}", self.shape, shape),
            ));
        }
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
            device: self.device,
        })
    }

    /// The f32 data of a CPU f32 tensor (no copy).
    pub fn as_cpu_f32(&self) -> Result<CpuF32Ref> {
        let s = self.storage()?;
        match &*s {
            Storage::CpuF32(_) => Ok(CpuF32Ref(s)),
            _ => Err(Error::DType {
                op: "as_cpu_f32",
                dtype: self.dtype,
                device: self.device,
            }),
        }
    }

    /// Copy the data to a host `Vec<f32>` (any device, any dtype).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        match &*self.storage()? {
            Storage::CpuF32(v) => Ok(v.clone()),
            Storage::CpuF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            Storage::CpuBF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.to_vec_f32(),
            Storage::Meta => Err(Error::Meta("to_vec_f32")),
        }
    }

    /// Convert the element type (on the tensor's device).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        let storage = match &*self.storage()? {
            Storage::Meta => Storage::Meta,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Storage::Cuda(s.to_dtype(dtype)?),
            _ => {
                let v = self.to_vec_f32()?;
                match dtype {
                    DType::F32 => Storage::CpuF32(v),
                    DType::F16 => Storage::CpuF16(v.iter().map(|&x| f16::from_f32(x)).collect()),
                    DType::BF16 => Storage::CpuBF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
                }
            }
        };
        Ok(Tensor::from_storage(
            storage,
            self.shape.clone(),
            dtype,
            self.device,
        ))
    }

    /// Move to another device, keeping the dtype.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device {
            return Ok(self.clone());
        }
        match device {
            // A charged meta tensor (an activation of a dry run, e.g. latents placed on Meta).
            Device::Meta => Ok(crate::meta::tracked(&self.shape, self.dtype)),
            Device::Cpu => match &*self.storage()? {
                #[cfg(feature = "cuda")]
                Storage::Cuda(s) => {
                    let v = s.to_vec_f32()?;
                    Tensor::from_vec(v, &self.shape)?.to_dtype(self.dtype)
                }
                _ => Err(Error::Meta("to_device")),
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(ord) => {
                let v = self.to_vec_f32()?;
                let s = crate::cuda::CudaStorage::from_f32(ord, &v, self.dtype)?;
                Ok(Tensor::from_storage(
                    Storage::Cuda(s),
                    self.shape.clone(),
                    self.dtype,
                    device,
                ))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::Cuda(
                "this binary was built without the `cuda` feature".into(),
            )),
        }
    }
}

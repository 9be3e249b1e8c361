//! vi-runtime: tensors, the op vocabulary the VideoCrafter2 models need, and the backends that run it.
//!
//! * [`Tensor`]: an immutable, contiguous, row-major n-d array on a [`Device`] with a [`DType`].
//! * [`ops`]: the whole op vocabulary (shape checks here, math in the backends). The models call only these.
//! * `cpu`: the f32 reference backend (rayon + `gemm`), used by tests and CI.
//! * `cuda` (feature `cuda`): bf16 storage, fp32 accumulation, our kernels + cuBLASLt/cuDNN.
//! * [`meta`]: shape-only execution on `Device::Meta` and tensor-byte accounting ([`meta::measure`]),
//!   the memory planner's dry run.
//! * [`offload`]: long-lived tensors moved to a lower memory tier while a rank waits (host memory
//!   for CUDA, a spill file for the CPU), brought back on first use.
//! * [`comm`]: the `Communicator` trait (halo and global-token exchange between ranks) and its implementations.
//! * [`testing`]: the tolerance check every test of the workspace uses (elementwise and rel L2).
//!
//! Layout convention of the whole project: activations are channels-last (`[N, H, W, C]`, sequences
//! `[B, S, C]`, attention `[B, S, heads, head_dim]`); weights keep their PyTorch layout.

pub mod comm;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod error;
pub mod knobs;
pub mod meta;
pub mod offload;
pub mod ops;
mod tensor;
pub mod testing;

pub use device::{DType, Device};
pub use error::{Error, Result};
pub use tensor::{CpuF32Ref, Storage, StorageRef, Tensor};

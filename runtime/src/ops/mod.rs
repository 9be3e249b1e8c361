//! The op vocabulary: every computation the UNet3D, the CLIP text encoder and the VAE decoder need.
//!
//! Each function checks shapes/devices here, then dispatches to the backend of its inputs' device
//! (enum dispatch: CPU reference, rounded CPU path, CUDA or meta). Models call only these functions
//! and never branch on the device. All tensors are contiguous row-major; activations are
//! channels-last. The files mirror the backends (`cpu/`, `cuda/`) and the kernels: gemm, conv, norm,
//! attention, elementwise, layout; [`Backend`] is the interface every backend implements.

mod attention;
mod backend;
mod conv;
mod elementwise;
mod gemm;
mod layout;
mod norm;

pub use attention::*;
pub(crate) use backend::Backend;
pub use conv::*;
pub use elementwise::*;
pub use gemm::*;
pub use layout::*;
pub use norm::*;

use crate::{DType, Device, Error, Result, Tensor};

fn backend(t: &Tensor, _op: &'static str) -> Result<&'static dyn Backend> {
    match t.device() {
        // f32 runs the reference directly; f16/bf16 storage runs it through one rounding per
        // output, the CUDA backend's numeric contract (see cpu/rounded.rs).
        Device::Cpu => match t.dtype() {
            DType::F32 => Ok(&crate::cpu::CpuBackend),
            DType::F16 | DType::BF16 => Ok(&crate::cpu::RoundedCpuBackend),
        },
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(&crate::cuda::CudaBackend),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::Cuda(
            "this binary was built without the `cuda` feature".into(),
        )),
        // Shape-only dry run (memory planning): fresh meta tensors of the output shapes.
        Device::Meta => Ok(&crate::meta::MetaBackend),
    }
}

/// The backend of an op whose inputs or output mix dtypes (f32 next to bf16/f16): on the CPU the
/// f32 reference runs only when every input and the output are f32, else the rounded path.
fn backend_mixed(t: &Tensor, dtypes: &[DType], op: &'static str) -> Result<&'static dyn Backend> {
    if t.device() == Device::Cpu && dtypes.iter().any(|&d| d != DType::F32) {
        return Ok(&crate::cpu::RoundedCpuBackend);
    }
    backend(t, op)
}

/// All of `ts` on one device with one dtype (the operands of an op without mixed-dtype rules).
fn same_device_dtype(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let d = ts[0].device();
    for t in ts {
        if t.device() != d {
            return Err(Error::DeviceMismatch {
                op,
                a: d,
                b: t.device(),
            });
        }
        if t.dtype() != ts[0].dtype() {
            return Err(Error::dtype(
                op,
                format!("{:?} vs {:?}", ts[0].dtype(), t.dtype()),
            ));
        }
    }
    Ok(())
}

/// Per-channel parameters (bias, norm gamma/beta) live on x's device, in `dtype` (x's dtype for a
/// bias, the output dtype for norm gamma/beta) or in f32 (the precision policy keeps 1-D parameters
/// f32 under bf16/f16 activations: they are tiny and their rounding would bias every element of the
/// output channel alike).
fn check_params(
    op: &'static str,
    x: &Tensor,
    dtype: DType,
    what: &str,
    params: &[&Tensor],
) -> Result<()> {
    for t in params {
        if t.device() != x.device() {
            return Err(Error::DeviceMismatch {
                op,
                a: x.device(),
                b: t.device(),
            });
        }
        if t.dtype() != dtype && t.dtype() != DType::F32 {
            return Err(Error::dtype(
                op,
                format!(
                    "{what} dtype {:?} with {dtype:?} (must match or be F32)",
                    t.dtype()
                ),
            ));
        }
    }
    Ok(())
}

fn expect_rank(op: &'static str, name: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::shape(
            op,
            format!("{name} must have rank {rank}, got {:?}", t.shape()),
        ));
    }
    Ok(())
}

fn expect_vec(op: &'static str, name: &str, t: &Tensor, len: usize) -> Result<()> {
    if t.shape() != [len] {
        return Err(Error::shape(
            op,
            format!("{name} must be [{len}], got {:?}", t.shape()),
        ));
    }
    Ok(())
}

//! How every kernel of `cuda/kernels/*.cu` is launched: the launch configuration, the argument
//! packing ([`launch`], the one place a kernel is queued), the vector width a launcher picks, the
//! dtype suffix of kernel names, and the by-value `Dims` of strided kernels with the broadcast
//! stride helpers that fill them. Used by every op module; imports only `device`.

use cudarc::driver::{CudaFunction, LaunchArgs, LaunchConfig};

use super::device::{cuda_err, CudaDevice};
use crate::{DType, Error, Result};

/// Kernel-name suffix of a dtype: kernels are instantiated per storage type as `<name>_f32`,
/// `<name>_bf16`, `<name>_f16`.
pub(crate) fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    }
}

/// 1-D launch: `n` threads in blocks of `block`, grid capped (kernels use grid-stride loops).
pub(crate) fn cfg_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, 65535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Queue kernel `f` on the device stream with the arguments pushed by `push`; a launch failure
/// becomes an error naming `what`.
///
/// # Safety
/// `push` must pass exactly the arguments of the kernel's C signature (device addresses of live
/// buffers holding every element the kernel reads or writes for these arguments, scalars of the
/// declared types), and `cfg` must satisfy the launch contract written above the kernel in its
/// `.cu` file (block shape, shared memory).
pub(crate) unsafe fn launch<'a>(
    dev: &'a CudaDevice,
    f: &'a CudaFunction,
    cfg: LaunchConfig,
    what: &str,
    push: impl FnOnce(&mut LaunchArgs<'a>),
) -> Result<()> {
    let mut b = dev.stream().launch_builder(f);
    push(&mut b);
    // SAFETY: the caller's contract (this function's `# Safety`).
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launching {what}"), e))?;
    Ok(())
}

/// A scalar kernel argument that the kernel takes as `int`.
pub(crate) fn i32_arg(op: &'static str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(op, format!("{name} = {v} exceeds the i32 range")))
}

/// `n` is a multiple of the power of two `v`.
pub(crate) fn divisible(n: usize, v: usize) -> bool {
    n & (v - 1) == 0
}

/// Elements of `d` per 16-byte vector (4 or 8: a power of two), the unit of the `_vec` kernels.
pub(crate) fn vec16(d: DType) -> usize {
    16 / d.size_in_bytes()
}

/// Largest vector width (elements) whose bytes are <= 16, that divides `divides` and keeps every
/// pointer in `ptrs` aligned to the vector size (the `_v<VEC>` kernels of norm.cu / attention.cu).
pub(crate) fn vec_width(dtype: DType, divides: usize, ptrs: &[u64]) -> usize {
    let size = dtype.size_in_bytes();
    [8usize, 4, 2, 1]
        .into_iter()
        .find(|&v| {
            // v is a power of two: `divides & (v - 1) == 0` <=> v divides `divides`.
            v * size <= 16
                && divides & (v - 1) == 0
                && ptrs.iter().all(|&p| p % (v * size) as u64 == 0)
        })
        .unwrap_or(1)
}

/// [`vec_width`] for pointers of different element types (x and y of a norm): the width v
/// (elements) keeps v * size <= 16 bytes for the widest type and aligns every pointer to v elements
/// of its own type.
pub(crate) fn vec_width_mixed(divides: usize, ptrs: &[(u64, DType)]) -> usize {
    let widest = ptrs.iter().map(|p| p.1.size_in_bytes()).max().unwrap_or(1);
    [8usize, 4, 2, 1]
        .into_iter()
        .find(|&v| {
            // v is a power of two: `divides & (v - 1) == 0` <=> v divides `divides`.
            v * widest <= 16
                && divides & (v - 1) == 0
                && ptrs
                    .iter()
                    .all(|&(p, d)| p % (v * d.size_in_bytes()) as u64 == 0)
        })
        .unwrap_or(1)
}

/// Up to 8 dims or strides passed by value to a kernel (`struct Dims` in cuda/kernels/common.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    d: [i64; 8],
}

// SAFETY: plain-old-data with exactly the layout of the C struct `Dims { int64_t d[8]; }`.
unsafe impl cudarc::driver::DeviceRepr for Dims {}

impl Dims {
    pub(crate) fn new(v: &[i64]) -> Result<Dims> {
        if v.len() > 8 {
            return Err(Error::Cuda(format!(
                "more than 8 dims after coalescing: {v:?}"
            )));
        }
        let mut d = [0i64; 8];
        d[..v.len()].copy_from_slice(v);
        Ok(Dims { d })
    }
}

/// Element strides of `shape` broadcast to `out` (right-aligned; 0 on broadcast dims).
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<i64> {
    let r = out.len();
    let mut strides = vec![0i64; r];
    let mut s = 1i64;
    for i in (0..shape.len()).rev() {
        let o = i + r - shape.len();
        strides[o] = if shape[i] == 1 { 0 } else { s };
        s *= shape[i] as i64;
    }
    strides
}

/// Merge adjacent output dims whose strides are contiguous in every operand (or broadcast in both
/// places), dropping size-1 dims, so most broadcasts reduce to rank 1 or 2.
pub(crate) fn coalesce(shape: &[usize], strides: &[Vec<i64>]) -> (Vec<i64>, Vec<Vec<i64>>) {
    let mut dims: Vec<i64> = Vec::new();
    let mut st: Vec<Vec<i64>> = vec![Vec::new(); strides.len()];
    for (d, &size) in shape.iter().enumerate() {
        if size == 1 {
            continue;
        }
        let mergeable = !dims.is_empty()
            && strides.iter().enumerate().all(|(j, s)| {
                let prev = *st[j].last().unwrap();
                prev == s[d] * size as i64
            });
        if mergeable {
            *dims.last_mut().unwrap() *= size as i64;
            for (j, s) in strides.iter().enumerate() {
                *st[j].last_mut().unwrap() = s[d];
            }
        } else {
            dims.push(size as i64);
            for (j, s) in strides.iter().enumerate() {
                st[j].push(s[d]);
            }
        }
    }
    if dims.is_empty() {
        dims.push(1);
        for s in st.iter_mut() {
            s.push(0);
        }
    }
    (dims, st)
}

#[cfg(test)]
mod tests {
    use super::{broadcast_strides, coalesce};

    #[test]
    fn broadcast_strides_are_right_aligned_with_zero_on_broadcast_dims() {
        assert_eq!(broadcast_strides(&[4, 6, 10], &[4, 6, 10]), [60, 10, 1]);
        assert_eq!(broadcast_strides(&[10], &[4, 6, 10]), [0, 0, 1]);
        assert_eq!(broadcast_strides(&[4, 1, 10], &[4, 6, 10]), [10, 0, 1]);
        assert_eq!(broadcast_strides(&[1], &[3, 5]), [0, 0]);
    }

    #[test]
    fn coalesce_merges_contiguous_and_jointly_broadcast_dims() {
        // Same shape: one dim.
        let s = [4, 6, 10];
        let st = vec![broadcast_strides(&s, &s), broadcast_strides(&s, &s)];
        assert_eq!(coalesce(&s, &st), (vec![240], vec![vec![1], vec![1]]));
        // Per-channel bias over [N, H, W, C]: [N*H*W, C] with b strides [0, 1].
        let out = [2, 3, 4, 8];
        let st = vec![broadcast_strides(&out, &out), broadcast_strides(&[8], &out)];
        assert_eq!(
            coalesce(&out, &st),
            (vec![24, 8], vec![vec![8, 1], vec![0, 1]])
        );
        // Per-row scalar: [4, 6, 10] * [4, 6, 1] -> [24, 10] with b strides [1, 0].
        let out = [4, 6, 10];
        let st = vec![
            broadcast_strides(&out, &out),
            broadcast_strides(&[4, 6, 1], &out),
        ];
        assert_eq!(
            coalesce(&out, &st),
            (vec![24, 10], vec![vec![10, 1], vec![1, 0]])
        );
        // Size-1 dims are dropped; all-ones shapes keep one dim.
        let st = vec![vec![0, 0], vec![0, 0]];
        assert_eq!(coalesce(&[1, 1], &st), (vec![1], vec![vec![0], vec![0]]));
    }
}

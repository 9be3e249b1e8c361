/// Element type of a tensor's storage. The CPU backend computes in f32 only; f16/bf16 are storage types
/// (weights on disk, CUDA activations) converted with [`crate::Tensor::to_dtype`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Where a tensor lives. `Meta` tensors carry a shape and no data: used to build parameter tables
/// (names and shapes) without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// CUDA device ordinal. Several logical ranks may share one device.
    Cuda(usize),
    Meta,
}

//! CUDA backend (feature `cuda`): bf16 storage, fp32 accumulation. (Being written.)

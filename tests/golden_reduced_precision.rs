//! The tiny golden UNet with bf16 / f16 storage on the CPU backend (rounded-storage path: fp32
//! math, one rounding per op output, the CUDA backend's numeric contract) against the f32 golden
//! outputs: rel L2 <= 2e-2 (DESIGN section 5). The same cases run on the GPU in `gpu_golden`.

mod reduced_precision;

use reduced_precision::{run_plain, run_vi};
use vi_runtime::{DType, Device};

#[test]
fn unet_plain_bf16_on_cpu() {
    run_plain(Device::Cpu, DType::BF16);
}

#[test]
fn unet_plain_f16_on_cpu() {
    run_plain(Device::Cpu, DType::F16);
}

#[test]
fn unet_vi_w3_t900_bf16_on_cpu() {
    run_vi("unet_vi_w3_t900.safetensors", Device::Cpu, DType::BF16);
}

#[test]
fn unet_vi_w2_nodyn_bf16_on_cpu() {
    run_vi("unet_vi_w2_nodyn.safetensors", Device::Cpu, DType::BF16);
}

#[test]
fn unet_vi_w3_t900_f16_on_cpu() {
    run_vi("unet_vi_w3_t900.safetensors", Device::Cpu, DType::F16);
}

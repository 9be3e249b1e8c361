//! The tiny golden UNet with bf16 / f16 storage on the CPU backend (rounded-storage path: fp32
//! math, one rounding per op output, the CUDA backend's numeric contract) against the f32 golden
//! outputs: rel L2 <= 2e-2 in bf16 (docs/design.md section 6), <= 5e-3 in f16 (docs/precision.md
//! "Bars"). The same cases run on the GPU in `gpu_golden`.

mod reduced_precision;

use reduced_precision::{plain_rel_l2, run_plain, run_vi};
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

/// The f32 residual stream is what buys the margin: the same bf16 run with the stream in bf16
/// (`UNet3D::set_residual_dtype`) is measurably further from the golden.
#[test]
fn f32_residual_stream_beats_a_bf16_stream() {
    let (ok, f32_stream) = plain_rel_l2(Device::Cpu, DType::BF16, None);
    let (_, bf16_stream) = plain_rel_l2(Device::Cpu, DType::BF16, Some(DType::BF16));
    println!("bf16 run: rel L2 {f32_stream:.3e} (f32 stream), {bf16_stream:.3e} (bf16 stream)");
    assert!(ok);
    assert!(
        f32_stream < 0.9 * bf16_stream,
        "{f32_stream:.3e} vs {bf16_stream:.3e}"
    );
}

//! The tiny golden UNet on the GPU in bf16 / f16 storage (fp32 accumulation) against the diffusers /
//! Video-Infinity golden outputs (computed in f32): rel L2 <= 2e-2 (bf16) or 5e-3 (f16, its own
//! bar: docs/precision.md "Bars"), no NaN. The cases and checks are shared with
//! `golden_reduced_precision` (the same contract on the CPU backend):
//!
//! * `unet_plain.safetensors`: whole video in one clip.
//! * `unet_vi_w3_t900.safetensors`, `unet_vi_w2_nodyn.safetensors`: the clip-parallel context on W
//!   in-process ranks (threads) that all share the one GPU (its single stream serialises them).
//!
//! Without the `cuda` feature, or without a GPU / driver, the tests print `SKIPPED: ...` and pass.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_golden_skipped_without_feature() {
    eprintln!("SKIPPED: built without the `cuda` feature");
}

#[cfg(feature = "cuda")]
mod reduced_precision;

#[cfg(feature = "cuda")]
mod gpu {
    use super::reduced_precision::{run_plain, run_vi};
    use vi_runtime::{DType, Device};

    const DEV: Device = Device::Cuda(0);

    fn have_gpu() -> bool {
        if !vi_runtime::cuda::is_available() {
            eprintln!("SKIPPED: no CUDA device");
            return false;
        }
        true
    }

    #[test]
    fn unet_plain_bf16_on_gpu() {
        if have_gpu() {
            run_plain(DEV, DType::BF16);
        }
    }

    #[test]
    fn unet_plain_f16_on_gpu() {
        if have_gpu() {
            run_plain(DEV, DType::F16);
        }
    }

    #[test]
    fn unet_vi_w3_t900_bf16_on_gpu() {
        if have_gpu() {
            run_vi("unet_vi_w3_t900.safetensors", DEV, DType::BF16);
        }
    }

    #[test]
    fn unet_vi_w3_t900_f16_on_gpu() {
        if have_gpu() {
            run_vi("unet_vi_w3_t900.safetensors", DEV, DType::F16);
        }
    }

    #[test]
    fn unet_vi_w2_nodyn_bf16_on_gpu() {
        if have_gpu() {
            run_vi("unet_vi_w2_nodyn.safetensors", DEV, DType::BF16);
        }
    }

    #[test]
    fn unet_vi_w2_nodyn_f16_on_gpu() {
        if have_gpu() {
            run_vi("unet_vi_w2_nodyn.safetensors", DEV, DType::F16);
        }
    }
}

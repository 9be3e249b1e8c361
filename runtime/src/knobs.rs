//! The runtime's environment switches (`VI_*`), parsed once per process on first use. The full list
//! of the project's switches, including the build, bench and test ones, is `docs/knobs.md`.
//!
//! An unrecognised value is never ignored silently: it is reported once on stderr, naming the
//! variable, the accepted values and the default used instead.

use std::sync::OnceLock;

/// Which attention kernels a call uses (`VI_ATTN_KERNEL`; `cuda::set_attn_kernel` overrides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnKernel {
    /// Tensor-core kernels where they apply (flash: 8 warps = 128 queries per block for D <= 64,
    /// 4 warps for D = 128; the small-sequence kernel for Sk <= 64, Sq <= 128), else the simple
    /// ones. `VI_ATTN_KERNEL` unset, empty or `auto`.
    #[default]
    Auto,
    /// `flash`: the flash kernel also where the small-sequence kernel would be used.
    Flash,
    /// `flash4`: the flash kernel with 4 warps (64 queries per block) for every D.
    Flash4,
    /// `simple`: always the simple fp32 kernels, for comparisons.
    Simple,
}

/// Which implementation runs kh x kw convolutions (`VI_CONV`; `cuda::set_conv_algo` overrides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgo {
    /// cuDNN implicit GEMM (falls back to im2col when cuDNN is unavailable). `VI_CONV` unset,
    /// empty or `cudnn`.
    #[default]
    Cudnn,
    /// `im2col`: our im2col kernel + a cuBLASLt GEMM.
    Im2col,
}

/// The parsed switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Knobs {
    /// `VI_ATTN_KERNEL`: auto | flash | flash4 | simple (case-insensitive).
    pub attn_kernel: AttnKernel,
    /// `VI_CONV`: cudnn | im2col.
    pub conv: ConvAlgo,
    /// `VI_PROFILE`: per-op-kind CUDA-event timing from the start (`1`; `0` or empty: off).
    pub profile: bool,
}

/// The switches of this process (read from the environment on the first call).
pub fn get() -> &'static Knobs {
    static KNOBS: OnceLock<Knobs> = OnceLock::new();
    KNOBS.get_or_init(|| {
        let (knobs, warnings) = parse(|name| std::env::var(name).ok());
        for w in warnings {
            eprintln!("vi-runtime: {w}");
        }
        knobs
    })
}

/// The switches from `var` (the environment, or a test's map), and one message per unrecognised
/// value.
pub fn parse(var: impl Fn(&str) -> Option<String>) -> (Knobs, Vec<String>) {
    let mut warnings = Vec::new();
    let mut bad = |name: &str, v: &str, accepted: &str, default: &str| {
        warnings.push(format!(
            "{name}={v:?} is not one of {accepted}; using the default ({default})"
        ))
    };
    let mut k = Knobs::default();
    if let Some(v) = var("VI_ATTN_KERNEL") {
        k.attn_kernel = match v.to_ascii_lowercase().as_str() {
            "" | "auto" => AttnKernel::Auto,
            "flash" => AttnKernel::Flash,
            "flash4" => AttnKernel::Flash4,
            "simple" => AttnKernel::Simple,
            _ => {
                bad("VI_ATTN_KERNEL", &v, "auto, flash, flash4, simple", "auto");
                AttnKernel::Auto
            }
        };
    }
    if let Some(v) = var("VI_CONV") {
        k.conv = match v.as_str() {
            "" | "cudnn" => ConvAlgo::Cudnn,
            "im2col" => ConvAlgo::Im2col,
            _ => {
                bad("VI_CONV", &v, "cudnn, im2col", "cudnn");
                ConvAlgo::Cudnn
            }
        };
    }
    if let Some(v) = var("VI_PROFILE") {
        k.profile = match v.as_str() {
            "" | "0" => false,
            "1" => true,
            _ => {
                bad(
                    "VI_PROFILE",
                    &v,
                    "0, 1",
                    "1: any other non-empty value turns it on",
                );
                true
            }
        };
    }
    (k, warnings)
}

#[cfg(test)]
mod tests {
    use super::{parse, AttnKernel, ConvAlgo, Knobs};

    fn with(pairs: &[(&str, &str)]) -> (Knobs, Vec<String>) {
        let map: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(|name| map.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn unset_means_the_defaults() {
        assert_eq!(with(&[]), (Knobs::default(), vec![]));
        let d = Knobs::default();
        assert_eq!(
            (d.attn_kernel, d.conv, d.profile),
            (AttnKernel::Auto, ConvAlgo::Cudnn, false)
        );
    }

    #[test]
    fn accepted_values_parse() {
        let (k, w) = with(&[
            ("VI_ATTN_KERNEL", "Flash4"),
            ("VI_CONV", "im2col"),
            ("VI_PROFILE", "1"),
        ]);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            k,
            Knobs {
                attn_kernel: AttnKernel::Flash4,
                conv: ConvAlgo::Im2col,
                profile: true
            }
        );
        assert_eq!(
            with(&[("VI_ATTN_KERNEL", "simple")]).0.attn_kernel,
            AttnKernel::Simple
        );
        assert!(!with(&[("VI_PROFILE", "0")]).0.profile);
    }

    #[test]
    fn unrecognised_values_are_reported_not_ignored() {
        let (k, w) = with(&[
            ("VI_ATTN_KERNEL", "flsh"),
            ("VI_CONV", "winograd"),
            ("VI_PROFILE", "yes"),
        ]);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("VI_ATTN_KERNEL=\"flsh\""), "{}", w[0]);
        assert!(w[1].contains("VI_CONV=\"winograd\""), "{}", w[1]);
        // Defaults as before this module: auto, cuDNN, and any non-empty VI_PROFILE but 0 is on.
        assert_eq!(
            (k.attn_kernel, k.conv, k.profile),
            (AttnKernel::Auto, ConvAlgo::Cudnn, true)
        );
    }
}

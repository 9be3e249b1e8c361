//! Embedded CUDA kernels of video-infinity.
//!
//! With the `cuda` feature the build script compiles every `kernels/*.cu` with nvcc into one fatbin
//! per file holding native code for sm_80, sm_86, sm_89 and sm_90 plus `compute_80` PTX (JIT-compiled
//! by the driver on GPUs newer than the listed architectures); files that use Hopper-only instructions
//! (`wgmma`, `setmaxnreg`; marked by the line `// vi-kernels: sm_90a` in the source) also get an
//! `sm_90a` cubin. Without the feature [`MODULES`] is empty and nothing needs CUDA.
//!
//! A module is one `.cu` file; its name is the file stem (`elementwise`, `layout`, `norm`, ...).

/// One compiled kernel file.
#[derive(Debug)]
pub struct Module {
    /// File stem of the `.cu` source.
    pub name: &'static str,
    /// Fatbin: cubins for the generic architectures + PTX; the driver picks the best image.
    pub fatbin: &'static [u8],
    /// Arch-specific cubins (`sm_90a`), each runnable only on exactly its compute capability.
    pub arch_specific: &'static [Cubin],
}

/// A cubin for one SM architecture.
#[derive(Debug)]
pub struct Cubin {
    /// Compute capability as major * 10 + minor (90 for sm_90a).
    pub sm: u32,
    pub data: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module compiled from `kernels/<name>.cu`, if any.
pub fn module(name: &str) -> Option<&'static Module> {
    MODULES.iter().find(|m| m.name == name)
}

impl Module {
    /// The image to load on a device of compute capability `major.minor`: its arch-specific cubin if
    /// there is one, else the fatbin (from which the driver picks the native cubin or JITs the PTX).
    pub fn image_for(&self, major: u32, minor: u32) -> &'static [u8] {
        let cc = major * 10 + minor;
        self.arch_specific
            .iter()
            .find(|c| c.sm == cc)
            .map(|c| c.data)
            .unwrap_or(self.fatbin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_embedded_exactly_with_the_feature() {
        if cfg!(feature = "cuda") {
            for name in ["elementwise", "layout", "conv"] {
                let m = module(name).unwrap_or_else(|| panic!("{name} not embedded"));
                // A fatbin starts with its magic 0xBA55ED50 (little endian).
                assert_eq!(&m.fatbin[..4], &[0x50, 0xED, 0x55, 0xBA], "{name}");
                assert_eq!(m.image_for(9, 0).as_ptr(), m.fatbin.as_ptr());
            }
        } else {
            assert!(MODULES.is_empty());
        }
    }

    #[test]
    fn arch_specific_cubin_only_for_its_exact_capability() {
        static CUBIN: [u8; 1] = [1];
        static FAT: [u8; 1] = [2];
        static ARCH: [Cubin; 1] = [Cubin {
            sm: 90,
            data: &CUBIN,
        }];
        let m = Module {
            name: "x",
            fatbin: &FAT,
            arch_specific: &ARCH,
        };
        assert_eq!(m.image_for(9, 0), &CUBIN);
        assert_eq!(m.image_for(8, 9), &FAT);
        assert_eq!(m.image_for(10, 0), &FAT);
    }
}

//! Embedded CUDA kernels of video-infinity.
//!
//! With the `cuda` feature the build script compiles every `kernels/*.cu` with nvcc into one cubin per
//! supported architecture (sm_80, sm_86, sm_89, sm_90, plus sm_90a for files using Hopper-only
//! instructions) and a PTX fallback (compute_80, JIT-compiled by the driver on newer GPUs), and embeds
//! them here. Without the feature [`MODULES`] is empty and nothing needs CUDA.
//!
//! A module is one `.cu` file; its name is the file stem (`elementwise`, `layout`, `norm`, ...).

/// One compiled kernel file.
#[derive(Debug)]
pub struct Module {
    /// File stem of the `.cu` source.
    pub name: &'static str,
    /// Native code per architecture.
    pub cubins: &'static [Cubin],
    /// NUL-terminated PTX text for `compute_80` (forward compatible through the driver JIT).
    pub ptx: &'static [u8],
}

/// A cubin for one SM architecture.
#[derive(Debug)]
pub struct Cubin {
    /// Compute capability as major * 10 + minor (80, 86, 89, 90).
    pub sm: u32,
    /// `sm_90a`-style arch-specific code: runs only on exactly this compute capability.
    pub arch_specific: bool,
    pub data: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module compiled from `kernels/<name>.cu`, if any.
pub fn module(name: &str) -> Option<&'static Module> {
    MODULES.iter().find(|m| m.name == name)
}

impl Module {
    /// The best native code for a device of compute capability `major.minor`: the exact arch-specific
    /// cubin, else the newest cubin of the same major with minor <= the device's (cubins are binary
    /// compatible within a major version). `None`: use [`Module::ptx`].
    pub fn cubin_for(&self, major: u32, minor: u32) -> Option<&'static Cubin> {
        let cc = major * 10 + minor;
        if let Some(c) = self.cubins.iter().find(|c| c.arch_specific && c.sm == cc) {
            return Some(c);
        }
        self.cubins
            .iter()
            .filter(|c| !c.arch_specific && c.sm / 10 == major && c.sm <= cc)
            .max_by_key(|c| c.sm)
    }
}

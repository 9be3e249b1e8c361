//! Finding the NCCL library at run time. Compiled with and without the `cuda` feature, so a
//! CPU-only build can say whether NCCL is there (and the loader's errors are tested everywhere).
//!
//! cudarc's own loader tries `libnccl.so`, `libnccl.so.{13,12,11,10,9,1}` and a few `libnccl64*`
//! names, never `libnccl.so.2`, the name NCCL installs (the `libnccl2` package, the
//! `nvidia-nccl-cu1x` wheels' `nvidia/nccl/lib/`), and it has no override; it panics when none
//! loads. So the NCCL data plane ([`super::nccl`]) opens the library here and binds its symbols
//! itself, with cudarc's NCCL types. Names tried, in order:
//!
//! 1. `VI_NCCL_LIBRARY` when set: that path (or name) only;
//! 2. `libnccl.so.2`, then `libnccl.so` (the development symlink), through the dynamic loader's
//!    search (`LD_LIBRARY_PATH`, the ld.so cache, the system directories).
//!
//! A missing library is an [`Error::Comm`] naming every name tried and the fix, never a panic.

use std::ffi::c_int;
use std::sync::OnceLock;

use crate::{Error, Result};

/// The environment variable naming the NCCL library to load (a path or a file name).
pub const LIBRARY_ENV: &str = "VI_NCCL_LIBRARY";

/// The oldest NCCL the data plane uses: `ncclSend` / `ncclRecv` appeared in 2.7.
pub const MIN_VERSION: NcclVersion = NcclVersion {
    major: 2,
    minor: 7,
    patch: 0,
};

/// The first NCCL with several ranks of one communicator on one GPU (experimental, opt-in with
/// `NCCL_MULTI_RANK_GPU_ENABLE=1`); before it, `ncclCommInitAll` refuses duplicate devices.
pub const MULTI_RANK_GPU_VERSION: NcclVersion = NcclVersion {
    major: 2,
    minor: 30,
    patch: 0,
};

/// A version of NCCL, as `ncclGetVersion` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl NcclVersion {
    /// Decodes `NCCL_VERSION_CODE`: `major*10000 + minor*100 + patch` since 2.9,
    /// `major*1000 + minor*100 + patch` before.
    pub fn from_code(code: i32) -> NcclVersion {
        let c = code.max(0) as u32;
        if c >= 10000 {
            NcclVersion {
                major: c / 10000,
                minor: c % 10000 / 100,
                patch: c % 100,
            }
        } else {
            NcclVersion {
                major: c / 1000,
                minor: c % 1000 / 100,
                patch: c % 100,
            }
        }
    }
}

impl std::fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The names tried for a given value of `VI_NCCL_LIBRARY` (None or empty: unset).
pub fn candidates(env_value: Option<&str>) -> Vec<String> {
    match env_value {
        Some(p) if !p.trim().is_empty() => vec![p.trim().to_string()],
        _ => vec!["libnccl.so.2".into(), "libnccl.so".into()],
    }
}

/// An opened NCCL library.
pub struct NcclLibrary {
    lib: libloading::Library,
    name: String,
    version: NcclVersion,
}

impl std::fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclLibrary({}, {})", self.name, self.version)
    }
}

impl NcclLibrary {
    /// Opens the first of `names` that loads, has `ncclGetVersion` and is at least
    /// [`MIN_VERSION`]. The error names every name tried with why it was refused, and the fix.
    pub fn open(names: &[String]) -> Result<NcclLibrary> {
        let mut refused = Vec::new();
        for name in names {
            match Self::open_one(name) {
                Ok(l) => return Ok(l),
                Err(why) => refused.push(format!("{name}: {why}")),
            }
        }
        Err(Error::Comm(format!(
            "the NCCL library could not be loaded (tried {}). Install NCCL {MIN_VERSION} or newer \
             (e.g. the libnccl2 package, or the nvidia-nccl-cu13 wheel: its nvidia/nccl/lib/ \
             holds libnccl.so.2) and set {LIBRARY_ENV}=/path/to/libnccl.so.2, or add its folder \
             to LD_LIBRARY_PATH; or run with --comm host (the exchange through the host)",
            refused.join("; ")
        )))
    }

    fn open_one(name: &str) -> std::result::Result<NcclLibrary, String> {
        // SAFETY: loading a shared library runs its initialisers; NCCL's have no preconditions
        // (any other library named here is the user's choice, as with LD_PRELOAD).
        let lib = unsafe { libloading::Library::new(name) }.map_err(|e| e.to_string())?;
        type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
        // SAFETY: `ncclGetVersion` has this signature in every NCCL 2.x (`nccl.h`).
        let get_version = unsafe { lib.get::<GetVersion>(b"ncclGetVersion\0") }
            .map_err(|_| "loads, but has no ncclGetVersion: not an NCCL library".to_string())?;
        let mut code: c_int = 0;
        // SAFETY: writes one int through a valid pointer; `lib` is alive.
        let r = unsafe { get_version(&mut code) };
        if r != 0 {
            return Err(format!("ncclGetVersion failed (ncclResult_t {r})"));
        }
        let version = NcclVersion::from_code(code);
        if version < MIN_VERSION {
            return Err(format!(
                "NCCL {version} is too old (the data plane needs {MIN_VERSION} or newer)"
            ));
        }
        Ok(NcclLibrary {
            lib,
            name: name.to_string(),
            version,
        })
    }

    /// The name (or path) it was opened under.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> NcclVersion {
        self.version
    }

    /// The function `symbol` (NUL-free name) of the library, as a function pointer of type `F`.
    ///
    /// # Safety
    /// `F` must be the symbol's C signature, and the pointer must not be called after `self` is
    /// dropped (the data plane only binds the process-wide [`library`], which lives forever).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) unsafe fn function<F: Copy>(&self, symbol: &str) -> Result<F> {
        // SAFETY: the caller guarantees the signature; the symbol is copied out as a plain
        // function pointer.
        unsafe { self.lib.get::<F>(symbol) }
            .map(|s| *s)
            .map_err(|e| {
                Error::Comm(format!(
                    "NCCL {} ({}) has no function {symbol}: {e}",
                    self.version, self.name
                ))
            })
    }
}

/// The NCCL library of this process: opened once, from [`candidates`] of `VI_NCCL_LIBRARY`; the
/// same error on every call when it cannot be.
pub fn library() -> Result<&'static NcclLibrary> {
    static LIB: OnceLock<std::result::Result<NcclLibrary, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let env = std::env::var(LIBRARY_ENV).ok();
        NcclLibrary::open(&candidates(env.as_deref())).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Msg(e.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_of_both_formats() {
        assert_eq!(
            NcclVersion::from_code(23005).to_string(),
            "2.30.5",
            "2.9+ format"
        );
        assert_eq!(NcclVersion::from_code(2708).to_string(), "2.7.8");
        assert!(NcclVersion::from_code(2604) < MIN_VERSION);
        assert!(NcclVersion::from_code(20900) > MIN_VERSION);
    }

    #[test]
    fn the_override_replaces_the_default_names() {
        assert_eq!(candidates(None), ["libnccl.so.2", "libnccl.so"]);
        assert_eq!(candidates(Some("  ")), ["libnccl.so.2", "libnccl.so"]);
        assert_eq!(
            candidates(Some("/opt/nccl/libnccl.so.2")),
            ["/opt/nccl/libnccl.so.2"]
        );
    }
}

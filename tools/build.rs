//! Links the C++ runtime (libstdc++, needed by openh264's C++ code) and libgcc statically into the
//! `video-infinity` binary on Linux/glibc, so that one binary per node needs nothing but the C
//! library's own parts (`ldd` lists libc, libm, ld-linux); CUDA libraries are still opened at run
//! time by cudarc.
//!
//! openh264's build (through the `cc` crate) asks for `-lstdc++` and Rust's std for `-lgcc_s`.
//! Both names are resolved here, in a folder searched before the system's: `libstdc++.a` is the
//! toolchain's static archive, `libgcc_s.a` a linker script naming `libgcc_eh.a` (libgcc's
//! unwinder; `-static-libgcc` makes the compiler driver use it and libgcc.a for the rest). Where
//! the toolchain has no static archives the link stays dynamic, with a warning.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CXX");
    println!("cargo:rerun-if-env-changed=VI_DYNAMIC_CXX");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" || env != "gnu" || std::env::var_os("VI_DYNAMIC_CXX").is_some() {
        return;
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let (Some(stdcxx), Some(gcc_eh)) = (
        toolchain_file(&cxx, "libstdc++.a"),
        toolchain_file(&cxx, "libgcc_eh.a"),
    ) else {
        println!(
            "cargo:warning=no static libstdc++.a/libgcc_eh.a from `{cxx} -print-file-name`: \
             video-infinity links the C++ runtime dynamically"
        );
        return;
    };
    let dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("static");
    std::fs::create_dir_all(&dir).expect("create OUT_DIR/static");
    let link = dir.join("libstdc++.a");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&stdcxx, &link).expect("symlink libstdc++.a");
    // A file the linker does not recognise as an object or archive is read as a linker script.
    std::fs::write(
        dir.join("libgcc_s.a"),
        format!("INPUT({})\n", gcc_eh.display()),
    )
    .expect("write libgcc_s.a");
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-arg-bins=-static-libgcc");
}

/// The absolute path of `name` in the toolchain's library folders, if it exists there.
fn toolchain_file(cxx: &str, name: &str) -> Option<PathBuf> {
    let out = Command::new(cxx)
        .arg(format!("-print-file-name={name}"))
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    // Not found: the compiler prints the bare name back.
    (p.is_absolute() && Path::new(&p).is_file()).then_some(p)
}

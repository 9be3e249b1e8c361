//! Finding the NCCL library (`comm::nccl_lib`), on any machine: a library that is missing, not a
//! shared library, or not NCCL is an error naming every name tried and the fix, never a panic.
//! (Loading a real NCCL is covered by the GPU tests in `nccl_comm.rs`.)

use vi_runtime::comm::nccl_lib::{candidates, NcclLibrary, LIBRARY_ENV};

fn open_err(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    match NcclLibrary::open(&names) {
        Ok(l) => panic!("{l:?} opened from {names:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_library_is_an_error_naming_the_names_and_the_fix() {
    let e = open_err(&["/nonexistent/libnccl.so.2", "libnccl-vi-test-absent.so"]);
    for needle in [
        "/nonexistent/libnccl.so.2",
        "libnccl-vi-test-absent.so",
        LIBRARY_ENV,
        "LD_LIBRARY_PATH",
        "--comm host",
    ] {
        assert!(e.contains(needle), "{needle:?} missing from: {e}");
    }
}

#[test]
fn a_file_that_is_not_a_shared_library_is_refused() {
    let dir = std::env::temp_dir().join(format!("vi-nccl-lib-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("libnccl.so.2");
    std::fs::write(&fake, b"not an ELF file").unwrap();
    let e = open_err(&[fake.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert!(e.contains(fake.to_str().unwrap()), "{e}");
}

#[test]
fn a_shared_library_without_nccl_is_refused() {
    // libm is on every glibc system and has no ncclGetVersion.
    let e = open_err(&["libm.so.6"]);
    assert!(
        e.contains("libm.so.6: loads, but has no ncclGetVersion"),
        "{e}"
    );
}

#[test]
fn the_default_names_start_with_the_installed_soname() {
    assert_eq!(candidates(None)[0], "libnccl.so.2");
    // Whatever this machine has: probing never panics, and an absent NCCL names both defaults.
    match NcclLibrary::open(&candidates(None)) {
        Ok(l) => eprintln!("NCCL {} found as {}", l.version(), l.name()),
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("libnccl.so.2") && e.contains("libnccl.so:"),
                "{e}"
            );
        }
    }
}

#[test]
fn forcing_nccl_for_cpu_ranks_is_an_error_and_auto_falls_back_to_the_host() {
    use std::time::Duration;
    use vi_runtime::comm::{agree_on_nccl, in_process_group, CommChoice, MemoryStore};
    use vi_runtime::{Device, Tensor};
    let devs = [Device::Cpu, Device::Cpu];
    let t = Duration::from_secs(5);
    let e = in_process_group(&devs, t, CommChoice::Nccl)
        .err()
        .expect("--comm nccl with CPU ranks must fail")
        .to_string();
    assert!(e.contains("nccl") || e.contains("NCCL"), "{e}");
    // Auto: the host path, which works.
    let comms = in_process_group(&devs, t, CommChoice::Auto).unwrap();
    let got = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                s.spawn(move || c.all_gather(&Tensor::from_vec(vec![r as f32], &[1]).unwrap()))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect::<Vec<_>>()
    });
    for all in got {
        let v: Vec<f32> = all.iter().map(|x| x.to_vec_f32().unwrap()[0]).collect();
        assert_eq!(v, [0.0, 1.0]);
    }
    // Processes agree through the store: CPU ranks never use NCCL; asking for it is an error.
    let store = MemoryStore::new();
    let decide = |prefix: &str, choices: [CommChoice; 2]| {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let store = &store;
                    s.spawn(move || {
                        agree_on_nccl(store, prefix, r, 2, Device::Cpu, choices[r], t)
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(
        decide("a", [CommChoice::Auto, CommChoice::Auto]),
        [Ok(false), Ok(false)]
    );
    for r in decide("b", [CommChoice::Auto, CommChoice::Nccl]) {
        let e = r.expect_err("a rank asked for NCCL on a CPU rank");
        assert!(e.contains("--comm nccl"), "{e}");
    }
}

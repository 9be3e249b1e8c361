//! The NCCL data plane (`comm::nccl::NcclComm`) against the in-process communicator, bit for bit:
//! neighbour exchanges (blocking and started, overlapped with kernels on the compute stream),
//! all-gathers of unequal shapes and of bf16 / f32 tensors, the rank-order sum, gather to rank 0,
//! point-to-point messages, a handle dropped unwaited; built both ways (`ncclCommInitAll` in one
//! process, and one communicator per rank from a unique id in a rendezvous store).
//!
//! GPU tests: without a GPU, without the NCCL library, or without enough GPUs for the ranks, each
//! test prints `SKIPPED: <why>` and passes. Several ranks need several GPUs, or one GPU with NCCL
//! >= 2.30 and `NCCL_MULTI_RANK_GPU_ENABLE=1`; one rank always runs where a GPU and NCCL are.

#[cfg(not(feature = "cuda"))]
#[test]
fn nccl_comm_skipped_without_feature() {
    eprintln!("SKIPPED: built without the `cuda` feature (NCCL needs it)");
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use vi_runtime::comm::nccl::{usable_for, NcclComm};
    use vi_runtime::comm::{nccl_lib, Communicator, InProcessGroup, MemoryStore, Rendezvous};
    use vi_runtime::{ops, DType, Device, Tensor};

    const TIMEOUT: Duration = Duration::from_secs(60);

    /// Devices for `want` ranks (fewer when fewer GPUs: at least `min`), or None after printing
    /// why the test is skipped.
    fn devices(want: usize, min: usize) -> Option<Vec<Device>> {
        if !vi_runtime::cuda::is_available() {
            eprintln!("SKIPPED: no CUDA device");
            return None;
        }
        match nccl_lib::library() {
            Ok(l) => eprintln!("NCCL {} from {}", l.version(), l.name()),
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                return None;
            }
        }
        vi_runtime::cuda::set_poison_allocations(true);
        let n = vi_runtime::cuda::device_count().unwrap();
        let distinct: Vec<Device> = (0..n.min(want)).map(Device::Cuda).collect();
        if distinct.len() >= min {
            return Some(distinct);
        }
        // One GPU: several ranks on it, where this NCCL allows it.
        let shared = vec![Device::Cuda(0); min];
        match usable_for(&shared) {
            Ok(()) => Some(shared),
            Err(why) => {
                eprintln!("SKIPPED: {min} ranks need {min} GPUs ({n} here), or: {why}");
                None
            }
        }
    }

    /// A random tensor of `shape` on `d`, stored as `dt`, seeded by `seed`.
    fn rand_on(d: Device, shape: &[usize], dt: DType, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        Tensor::from_slice_on(&v, shape, d, dt).unwrap()
    }

    fn bits(t: &Tensor) -> (Vec<usize>, DType, Device, Vec<u32>) {
        let v = t.to_vec_f32().unwrap();
        (
            t.shape().to_vec(),
            t.dtype(),
            t.device(),
            v.iter().map(|x| x.to_bits()).collect(),
        )
    }

    type Seen = Vec<(Vec<usize>, DType, Device, Vec<u32>)>;

    /// One rank's script: every call of the communicator, each result recorded bit for bit.
    /// Rank r's clip has 3 + (r % 2) frames (unequal shapes between ranks).
    fn script(r: usize, comm: &dyn Communicator, d: Device) -> Seen {
        let w = comm.world_size();
        let frames = 3 + r % 2;
        let mut seen = Seen::new();
        let mut note = |t: &Tensor| seen.push(bits(t));
        for (i, dt) in [DType::BF16, DType::F32].into_iter().enumerate() {
            let seed = 1000 * i as u64 + 10 * r as u64;
            // Halos: the first / last frame of a [C, F, H, W] clip.
            let x = rand_on(d, &[4, frames, 5, 6], dt, seed);
            let left = ops::index_select(&x, 1, &[0]).unwrap();
            let right = ops::index_select(&x, 1, &[frames - 1]).unwrap();
            let (a, b) = comm.exchange_neighbors(Some(&left), Some(&right)).unwrap();
            assert_eq!(a.is_some(), r > 0);
            assert_eq!(b.is_some(), r + 1 < w);
            a.iter().chain(b.iter()).for_each(&mut note);
            // Started, with kernels queued on the compute stream between start and wait, and a
            // gather started behind it; the tensors sent are dropped right after the start.
            let p = comm
                .start_exchange_neighbors(Some(&ops::affine(&left, 2.0, 1.0).unwrap()), None)
                .unwrap();
            let g = comm.start_all_gather(&x).unwrap();
            let mut busy = x.clone();
            for _ in 0..20 {
                busy = ops::affine(&busy, 1.0001, 0.5).unwrap();
            }
            note(&busy);
            let (a, b) = p.wait().unwrap();
            assert!(a.is_none(), "nothing was sent right");
            assert_eq!(b.is_some(), r + 1 < w);
            b.iter().for_each(&mut note);
            let all = g.wait().unwrap();
            assert_eq!(all.len(), w);
            all.iter().for_each(&mut note);
            // A handle dropped unwaited; the next call pairs as if it had been waited for.
            drop(comm.start_all_gather(&left).unwrap());
            let stats = rand_on(d, &[2, 3, 3], DType::F32, seed + 7);
            note(&comm.all_reduce_sum(&stats).unwrap());
        }
        let latents = rand_on(d, &[4, frames, 2, 2], DType::F32, 77 + r as u64);
        if let Some(all) = comm.gather_to_root(&latents).unwrap() {
            all.iter().for_each(&mut note);
        }
        if r > 0 {
            comm.send_to(0, &rand_on(d, &[3, 2], DType::BF16, 500 + r as u64))
                .unwrap();
        } else {
            for src in 1..w {
                note(&comm.recv_from(src).unwrap());
            }
        }
        comm.barrier().unwrap();
        seen
    }

    fn run_all<C: Communicator>(comms: Vec<C>, devs: &[Device]) -> Vec<Seen> {
        std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(r, c)| {
                    let d = devs[r];
                    s.spawn(move || script(r, &c, d))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn reference(devs: &[Device]) -> Vec<Seen> {
        run_all(InProcessGroup::new_on_devices(devs, TIMEOUT), devs)
    }

    #[test]
    fn one_rank_group_matches_in_process() {
        let Some(devs) = devices(1, 1) else { return };
        let nccl = NcclComm::group_in_process(&devs, TIMEOUT).unwrap();
        assert_eq!(run_all(nccl, &devs), reference(&devs));
    }

    #[test]
    fn ranks_of_one_process_match_in_process_bit_for_bit() {
        let Some(devs) = devices(4, 2) else { return };
        eprintln!("ranks on {devs:?}");
        let nccl = NcclComm::group_in_process(&devs, TIMEOUT).unwrap();
        let got = run_all(nccl, &devs);
        let want = reference(&devs);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "rank {r}: number of results");
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert_eq!(a, b, "rank {r}, result {i}");
            }
        }
    }

    /// One communicator per rank from a unique id in the store (as processes do), ranks as threads.
    #[test]
    fn ranks_joined_through_the_store_match_in_process() {
        let Some(devs) = devices(2, 1) else { return };
        let store = MemoryStore::new();
        let hosts = InProcessGroup::new(devs.len(), TIMEOUT);
        let got = std::thread::scope(|s| {
            let hs: Vec<_> = hosts
                .into_iter()
                .enumerate()
                .map(|(r, h)| {
                    let (store, d) = (&store, devs[r]);
                    s.spawn(move || {
                        let c =
                            NcclComm::connect(Box::new(h), d, store, "nccl/id", TIMEOUT).unwrap();
                        script(r, &c, d)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(got, reference(&devs));
        assert_eq!(store.get("nccl/id", TIMEOUT).unwrap().len(), 128);
    }

    #[test]
    fn a_malformed_unique_id_is_an_error() {
        let Some(devs) = devices(1, 1) else { return };
        let store = MemoryStore::new();
        store.set("nccl/id", &[7u8; 100]).unwrap();
        // Rank 1 of 2 reads rank 0's id: 100 bytes is refused before NCCL sees it.
        let mut hosts = InProcessGroup::new(2, Duration::from_secs(2));
        let h1 = hosts.pop().unwrap();
        let e = NcclComm::connect(Box::new(h1), devs[0], &store, "nccl/id", TIMEOUT)
            .expect_err("a 100-byte id must be refused")
            .to_string();
        assert!(e.contains("100 bytes, not 128"), "{e}");
    }

    #[test]
    fn cpu_ranks_are_refused_with_the_reason() {
        let Some(_) = devices(1, 1) else { return };
        let e = NcclComm::group_in_process(&[Device::Cpu], TIMEOUT)
            .expect_err("a CPU rank cannot use NCCL")
            .to_string();
        assert!(e.contains("not a CUDA device"), "{e}");
    }
}

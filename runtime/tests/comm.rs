//! What only the in-process communicator does: tensors handed over without a copy, received
//! tensors moved to the rank's device. The behaviour every communicator shares (collectives,
//! failures, asynchronous forms) is tested in `comm_semantics.rs`.

use std::time::Duration;

use vi_runtime::comm::{Communicator, InProcessComm, InProcessGroup};
use vi_runtime::Tensor;

/// Run `f(rank, comm)` on one thread per rank; results in rank order (a panicking rank gives Err).
fn run<T: Send>(
    comms: Vec<InProcessComm>,
    f: impl Fn(usize, &InProcessComm) -> T + Sync,
) -> Vec<std::thread::Result<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, &c))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

/// A rank-specific tensor: `len` values r*100 + i, shape [len].
fn vals(r: usize, len: usize) -> Tensor {
    Tensor::from_vec((0..len).map(|i| (r * 100 + i) as f32).collect(), &[len]).unwrap()
}

#[test]
fn tensors_are_passed_without_copy() {
    // The received tensor shares storage with the sent one (an Arc clone): device-agnostic.
    let results = run(InProcessGroup::new(2, Duration::from_secs(10)), |r, c| {
        let t = vals(r, 8);
        let g = c.all_gather(&t).unwrap();
        (
            t.as_cpu_f32().unwrap().as_ptr() as usize,
            g.iter()
                .map(|x| x.as_cpu_f32().unwrap().as_ptr() as usize)
                .collect::<Vec<_>>(),
        )
    });
    let res: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    for (r, (ptr, _)) in res.iter().enumerate() {
        for (_, gathered) in &res {
            assert_eq!(gathered[r], *ptr);
        }
    }
}

#[test]
fn received_tensors_are_moved_to_the_rank_device() {
    // Rank 1 "lives" on the meta device: what it receives is converted there (shape kept);
    // rank 0 (CPU) gets rank 1's CPU tensor as is.
    use vi_runtime::Device;
    let comms =
        InProcessGroup::new_on_devices(&[Device::Cpu, Device::Meta], Duration::from_secs(10));
    let results = run(comms, |r, c| {
        let g = c.all_gather(&vals(r, 3)).unwrap();
        g.iter()
            .map(|t| (t.device(), t.shape().to_vec()))
            .collect::<Vec<_>>()
    });
    let res: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(res[0], vec![(Device::Cpu, vec![3]), (Device::Cpu, vec![3])]);
    // Its own tensor stays where it was made; the peer's was moved.
    assert_eq!(
        res[1],
        vec![(Device::Meta, vec![3]), (Device::Cpu, vec![3])]
    );
}

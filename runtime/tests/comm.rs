//! The in-process communicator: correctness of every collective for W = 1..4, and failure
//! propagation (abort, panic, a rank that never arrives, a rank that leaves early): every rank
//! gets an error within a bounded time, never a hang.

use std::time::{Duration, Instant};

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

fn data(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().unwrap()
}

#[test]
fn collectives_are_correct_for_1_to_4_ranks() {
    for w in 1..=4usize {
        let results = run(InProcessGroup::new(w, Duration::from_secs(10)), |r, c| {
            assert_eq!(c.rank(), r);
            assert_eq!(c.world_size(), w);
            // Several rounds, so that call indices advance and messages of different calls
            // never mix.
            for round in 0..3usize {
                // Neighbour exchange: send [r, round, 0] left and [r, round, 1] right.
                let l = Tensor::from_vec(vec![r as f32, round as f32, 0.0], &[3]).unwrap();
                let rt = Tensor::from_vec(vec![r as f32, round as f32, 1.0], &[3]).unwrap();
                let to_left = (r > 0).then_some(&l);
                let to_right = (r + 1 < w).then_some(&rt);
                let (from_l, from_r) = c.exchange_neighbors(to_left, to_right).unwrap();
                if r == 0 {
                    assert!(from_l.is_none());
                } else {
                    assert_eq!(
                        data(&from_l.unwrap()),
                        vec![(r - 1) as f32, round as f32, 1.0]
                    );
                }
                if r + 1 == w {
                    assert!(from_r.is_none());
                } else {
                    assert_eq!(
                        data(&from_r.unwrap()),
                        vec![(r + 1) as f32, round as f32, 0.0]
                    );
                }

                // All-gather with a different length per rank.
                let g = c.all_gather(&vals(r, r + 1 + round)).unwrap();
                assert_eq!(g.len(), w);
                for (src, t) in g.iter().enumerate() {
                    assert_eq!(t.shape(), &[src + 1 + round]);
                    assert_eq!(data(t), data(&vals(src, src + 1 + round)));
                }

                // All-reduce: sum over ranks of (r*100 + i), identical on every rank.
                let s = c.all_reduce_sum(&vals(r, 4)).unwrap();
                let expect: Vec<f32> = (0..4)
                    .map(|i| (0..w).map(|q| (q * 100 + i) as f32).sum())
                    .collect();
                assert_eq!(data(&s), expect);

                // Gather to root.
                let got = c.gather_to_root(&vals(r, 2)).unwrap();
                if r == 0 {
                    let got = got.unwrap();
                    assert_eq!(got.len(), w);
                    for (src, t) in got.iter().enumerate() {
                        assert_eq!(data(t), data(&vals(src, 2)));
                    }
                } else {
                    assert!(got.is_none());
                }
                c.barrier().unwrap();
            }
            r
        });
        for (r, res) in results.into_iter().enumerate() {
            assert_eq!(res.unwrap(), r, "W={w}");
        }
    }
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
fn abort_on_one_rank_fails_every_rank_quickly() {
    let t0 = Instant::now();
    let results = run(InProcessGroup::new(4, Duration::from_secs(60)), |r, c| {
        c.barrier()?;
        if r == 2 {
            c.abort("simulated failure");
            return Err(vi_runtime::Error::Comm("rank 2 failed".into()));
        }
        // The others block in a collective that rank 2 never joins.
        c.all_gather(&vals(r, 3)).map(|_| ())
    });
    // Far below the 60 s timeout: the abort wakes the waiting ranks.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    for (r, res) in results.into_iter().enumerate() {
        let err = res.unwrap().unwrap_err().to_string();
        if r != 2 {
            assert!(err.contains("rank 2 aborted: simulated failure"), "{err}");
        }
    }
}

#[test]
fn future_calls_fail_after_abort() {
    let comms = InProcessGroup::new(2, Duration::from_secs(60));
    comms[0].abort("stop");
    assert!(comms[1].is_aborted());
    assert!(comms[1].barrier().is_err());
    assert!(comms[1].all_reduce_sum(&vals(1, 2)).is_err());
    assert!(comms[0]
        .exchange_neighbors(None, Some(&vals(0, 1)))
        .is_err());
    assert!(comms[1]
        .abort_reason()
        .unwrap()
        .contains("rank 0 aborted: stop"));
}

#[test]
fn a_rank_that_never_arrives_times_out() {
    let timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    let results = run(InProcessGroup::new(3, timeout), |r, c| {
        if r == 1 {
            // Hangs (longer than the timeout) without touching the communicator, then tries.
            std::thread::sleep(Duration::from_millis(3000));
            return c.barrier();
        }
        c.barrier()
    });
    let elapsed = t0.elapsed();
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let errs: Vec<String> = results
        .into_iter()
        .map(|r| r.unwrap().unwrap_err().to_string())
        .collect();
    // Ranks 0 and 2 time out waiting for rank 1 (or see the abort of the one that timed out
    // first); rank 1 finds the group aborted when it finally arrives.
    assert!(
        errs.iter()
            .any(|e| e.contains("timed out") && e.contains("waiting for rank 1")),
        "{errs:?}"
    );
    for e in &errs {
        assert!(e.contains("timed out"), "{e}");
    }
}

#[test]
fn a_panicking_rank_aborts_the_group() {
    let t0 = Instant::now();
    let results = run(InProcessGroup::new(3, Duration::from_secs(60)), |r, c| {
        c.barrier().unwrap();
        if r == 0 {
            panic!("rank 0 exploded");
        }
        c.all_gather(&vals(r, 2)).map(|_| ())
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let mut it = results.into_iter();
    assert!(it.next().unwrap().is_err(), "rank 0 panicked");
    for res in it {
        let err = res.unwrap().unwrap_err().to_string();
        assert!(err.contains("rank 0 panicked"), "{err}");
    }
}

#[test]
fn a_rank_that_leaves_early_fails_its_peers_at_once() {
    let t0 = Instant::now();
    let results = run(InProcessGroup::new(2, Duration::from_secs(60)), |r, c| {
        if r == 1 {
            return Ok(()); // returns without joining the collective; its comm is dropped
        }
        c.all_gather(&vals(r, 2)).map(|_| ())
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let err = results.into_iter().next().unwrap().unwrap().unwrap_err();
    assert!(err.to_string().contains("rank 1 left the group"), "{err}");
}

#[test]
fn mismatched_calls_are_reported() {
    let results = run(InProcessGroup::new(2, Duration::from_secs(10)), |r, c| {
        if r == 0 {
            c.barrier()
        } else {
            c.all_gather(&vals(r, 1)).map(|_| ())
        }
    });
    for res in results {
        let err = res.unwrap().unwrap_err().to_string();
        assert!(err.contains("mismatch") || err.contains("aborted"), "{err}");
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

#[test]
fn point_to_point_pairs_in_order_and_apart_from_collectives() {
    let comms = InProcessGroup::new(3, Duration::from_secs(5));
    let out: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let r = c.rank();
                    let mut got = Vec::new();
                    if r == 0 {
                        // Receive from rank 2 first although rank 1 sent first: pairs are separate.
                        for src in [2, 1] {
                            for _ in 0..2 {
                                got.push(c.recv_from(src).unwrap().to_vec_f32().unwrap()[0]);
                            }
                        }
                    } else {
                        for i in 0..2 {
                            let t = Tensor::from_vec(vec![(10 * r + i) as f32], &[1]).unwrap();
                            c.send_to(0, &t).unwrap();
                        }
                    }
                    // A collective after point-to-point traffic still pairs by its own index.
                    let s = c
                        .all_reduce_sum(&Tensor::from_vec(vec![r as f32], &[1]).unwrap())
                        .unwrap();
                    got.push(s.to_vec_f32().unwrap()[0]);
                    got
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(out[0], vec![20.0, 21.0, 10.0, 11.0, 3.0]);
    assert_eq!(out[1], vec![3.0]);
    assert!(InProcessGroup::new(2, Duration::from_secs(1))[0]
        .send_to(0, &Tensor::from_vec(vec![0.0], &[1]).unwrap())
        .is_err());
}

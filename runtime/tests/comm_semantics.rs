//! What every communicator must do, one body run for each: the in-process one (`in_process::*`)
//! and TCP over 127.0.0.1 (`tcp::*`, ranks as threads meeting at a `MemoryStore`).
//!
//! Collectives for W = 1..4, point-to-point ordering, mismatched calls, failure propagation
//! (abort with its reason, panic, a rank that leaves or never arrives: every rank gets an error
//! naming the rank within a bounded time, never a hang), and the asynchronous forms: calls started
//! in program order pair up however their waits interleave (a halo exchange and an all-gather in
//! flight together, as the overlapped clip-parallel schedule issues them), a start does not wait
//! for the peers, a handle dropped without `wait` leaves later calls intact and nothing behind, and
//! errors reach pending handles.
//! Implementation-specific behaviour lives in `comm.rs` (in-process), `tcp_comm.rs` (TCP) and
//! `comm_async.rs` (the delay wrapper).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vi_runtime::comm::{
    CommDelay, Communicator, DelayComm, Halos, InProcessComm, InProcessGroup, MemoryStore, TcpComm,
    TcpConfig,
};
use vi_runtime::{Error, Tensor};

/// A communicator under test: how to make a group of `w` ranks.
trait Group: Communicator + Send + Sized + 'static {
    fn group(w: usize, timeout: Duration) -> Vec<Self>;
    /// Messages received for this rank and not taken by any call.
    fn held_messages(&self) -> usize;
}

impl Group for InProcessComm {
    fn group(w: usize, timeout: Duration) -> Vec<Self> {
        InProcessGroup::new(w, timeout)
    }
    fn held_messages(&self) -> usize {
        InProcessComm::held_messages(self)
    }
}

impl Group for TcpComm {
    fn group(w: usize, timeout: Duration) -> Vec<Self> {
        let store = Arc::new(MemoryStore::new());
        let config = TcpConfig::loopback(timeout);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..w)
                .map(|r| {
                    let (store, config) = (store.clone(), &config);
                    s.spawn(move || TcpComm::connect(r, w, store.as_ref(), config).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }
    fn held_messages(&self) -> usize {
        TcpComm::held_messages(self)
    }
}

/// Run `f(rank, comm)` on one thread per rank; results in rank order (a panicking rank gives
/// Err). The comm is handed over by value (some tests drop it).
fn run<C: Communicator + Send, T: Send>(
    comms: Vec<C>,
    f: impl Fn(usize, C) -> T + Sync,
) -> Vec<std::thread::Result<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

/// [`run`] where every rank must return normally.
fn run_ok<C: Communicator + Send, T: Send>(
    comms: Vec<C>,
    f: impl Fn(usize, C) -> T + Sync,
) -> Vec<T> {
    run(comms, f)
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|_| panic!("rank {r} panicked")))
        .collect()
}

/// A rank-specific tensor: `len` values r*100 + i, shape [len].
fn vals(r: usize, len: usize) -> Tensor {
    Tensor::from_vec((0..len).map(|i| (r * 100 + i) as f32).collect(), &[len]).unwrap()
}

fn data(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().unwrap()
}

/// [tag, r, side].
fn msg(tag: usize, r: usize, side: usize) -> Tensor {
    Tensor::from_vec(vec![tag as f32, r as f32, side as f32], &[3]).unwrap()
}

/// Checks a neighbour exchange's result on rank r of w for messages tagged `tag` (msg(tag, r, 0)
/// sent left, msg(tag, r, 1) right).
fn check_halos(tag: usize, r: usize, w: usize, got: &Halos) {
    match (&got.0, r) {
        (None, 0) => {}
        (Some(t), r) if r > 0 => assert_eq!(data(t), vec![tag as f32, (r - 1) as f32, 1.0]),
        other => panic!("rank {r}: from left {other:?}"),
    }
    match &got.1 {
        None => assert_eq!(r + 1, w),
        Some(t) => assert_eq!(data(t), vec![tag as f32, (r + 1) as f32, 0.0]),
    }
}

/// Checks an all-gather's result for messages msg(tag, src, 9).
fn check_gathered(tag: usize, w: usize, all: &[Tensor]) {
    assert_eq!(all.len(), w);
    for (src, t) in all.iter().enumerate() {
        assert_eq!(data(t), vec![tag as f32, src as f32, 9.0]);
    }
}

fn start_tagged<C: Communicator>(c: &C, tag: usize) -> vi_runtime::Result<Halos> {
    let (r, w) = (c.rank(), c.world_size());
    let (l, rt) = (msg(tag, r, 0), msg(tag, r, 1));
    c.start_exchange_neighbors((r > 0).then_some(&l), (r + 1 < w).then_some(&rt))?
        .wait()
}

fn exchange_tagged<C: Communicator>(c: &C, tag: usize) -> Halos {
    let (r, w) = (c.rank(), c.world_size());
    let (l, rt) = (msg(tag, r, 0), msg(tag, r, 1));
    c.exchange_neighbors((r > 0).then_some(&l), (r + 1 < w).then_some(&rt))
        .unwrap()
}

// ---- collectives and point-to-point ----

fn collectives_are_correct_for_1_to_4_ranks<C: Group>() {
    for w in 1..=4usize {
        let ranks = run_ok(C::group(w, Duration::from_secs(20)), |r, c| {
            assert_eq!(c.rank(), r);
            assert_eq!(c.world_size(), w);
            // Several rounds, so that call indices advance and messages of different calls
            // never mix.
            for round in 0..3usize {
                // Neighbour exchange: send [r, round, 0] left and [r, round, 1] right.
                let l = Tensor::from_vec(vec![r as f32, round as f32, 0.0], &[3]).unwrap();
                let rt = Tensor::from_vec(vec![r as f32, round as f32, 1.0], &[3]).unwrap();
                let (from_l, from_r) = c
                    .exchange_neighbors((r > 0).then_some(&l), (r + 1 < w).then_some(&rt))
                    .unwrap();
                match from_l {
                    None => assert_eq!(r, 0),
                    Some(t) => assert_eq!(data(&t), vec![(r - 1) as f32, round as f32, 1.0]),
                }
                match from_r {
                    None => assert_eq!(r + 1, w),
                    Some(t) => assert_eq!(data(&t), vec![(r + 1) as f32, round as f32, 0.0]),
                }

                // All-gather with a different length (and rank) per rank.
                let n = r + 1 + round;
                let g = c.all_gather(&vals(r, n).reshape(&[1, n]).unwrap()).unwrap();
                assert_eq!(g.len(), w);
                for (src, t) in g.iter().enumerate() {
                    assert_eq!(t.shape(), &[1, src + 1 + round]);
                    assert_eq!(data(t), data(&vals(src, src + 1 + round)));
                }

                // All-reduce: sum over ranks of (r*100 + i), identical on every rank.
                let s = c.all_reduce_sum(&vals(r, 4)).unwrap();
                let expect: Vec<f32> = (0..4)
                    .map(|i| (0..w).map(|q| (q * 100 + i) as f32).sum())
                    .collect();
                assert_eq!(data(&s), expect);

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
        assert_eq!(ranks, (0..w).collect::<Vec<_>>(), "W={w}");
    }
}

fn point_to_point_pairs_in_order_and_apart_from_collectives<C: Group>() {
    let out = run_ok(C::group(3, Duration::from_secs(20)), |r, c| {
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
        assert!(c.send_to(r, &vals(0, 1)).is_err(), "no message to oneself");
        assert!(c.recv_from(3).is_err(), "no rank 3");
        got
    });
    assert_eq!(out[0], vec![20.0, 21.0, 10.0, 11.0, 3.0]);
    assert_eq!(out[1], vec![3.0]);
    assert_eq!(out[2], vec![3.0]);
}

fn mismatched_calls_are_reported_naming_both_ranks_and_kinds<C: Group>() {
    let errs: Vec<String> = run_ok(C::group(2, Duration::from_secs(20)), |r, c| {
        let res = if r == 0 {
            c.barrier()
        } else {
            c.all_gather(&vals(r, 1)).map(|_| ())
        };
        res.unwrap_err().to_string()
    });
    // Each rank detects it (or sees the other's abort); the message names both calls.
    for e in &errs {
        assert!(e.contains("mismatch"), "{errs:?}");
        assert!(e.contains("Barrier") && e.contains("AllGather"), "{errs:?}");
    }
    assert!(
        errs[0].contains("this rank called Barrier, rank 1 called AllGather")
            || errs[1].contains("this rank called AllGather, rank 0 called Barrier"),
        "{errs:?}"
    );
}

// ---- failures ----

fn abort_on_one_rank_fails_every_rank_quickly_with_its_reason<C: Group>() {
    let t0 = Instant::now();
    let results = run_ok(C::group(4, Duration::from_secs(60)), |r, c| {
        c.barrier()?;
        if r == 2 {
            c.abort("simulated failure");
            assert!(c.is_aborted());
            return Err(Error::Comm("rank 2 failed".into()));
        }
        // The others block in a collective that rank 2 never joins.
        c.all_gather(&vals(r, 3)).map(|_| ())
    });
    // Far below the 60 s timeout: the abort wakes the waiting ranks.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    for (r, res) in results.into_iter().enumerate() {
        let err = res.unwrap_err().to_string();
        if r != 2 {
            assert!(err.contains("rank 2 aborted: simulated failure"), "{err}");
        }
    }
}

/// The group's abort reason: a method of each implementation, not of the trait.
trait AbortReason {
    fn reason(&self) -> Option<String>;
}
impl AbortReason for InProcessComm {
    fn reason(&self) -> Option<String> {
        self.abort_reason()
    }
}
impl AbortReason for TcpComm {
    fn reason(&self) -> Option<String> {
        self.abort_reason()
    }
}

fn future_calls_fail_after_abort<C: Group + AbortReason>() {
    let reasons = run_ok(C::group(2, Duration::from_secs(20)), |r, c| {
        c.barrier().unwrap();
        if r == 0 {
            // Rank 1 is past the barrier once it sends this.
            c.recv_from(1).unwrap();
            c.abort("stop");
        } else {
            c.send_to(0, &vals(1, 1)).unwrap();
            // Wait until the abort arrives.
            let t0 = Instant::now();
            while !c.is_aborted() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(c.is_aborted());
        assert!(c.barrier().is_err());
        assert!(c.all_reduce_sum(&vals(1, 2)).is_err());
        assert!(c.send_to(1 - r, &vals(0, 1)).is_err());
        assert!(c.start_all_gather(&vals(0, 1)).is_err());
        assert!(c.exchange_neighbors(None, Some(&vals(0, 1))).is_err());
        c.reason().unwrap()
    });
    for reason in reasons {
        assert!(reason.contains("rank 0 aborted: stop"), "{reason}");
    }
}

fn a_panicking_rank_aborts_the_group<C: Group>() {
    let t0 = Instant::now();
    let results = run(C::group(3, Duration::from_secs(60)), |r, c| {
        // Rank 0's abort may reach a peer still in the barrier: that call fails too.
        c.barrier()?;
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

fn a_rank_that_leaves_early_fails_its_peers_at_once<C: Group>() {
    let t0 = Instant::now();
    let results = run_ok(C::group(2, Duration::from_secs(60)), |r, c| {
        if r == 1 {
            drop(c); // leaves without joining the collective: a goodbye, not a death
            return Ok(());
        }
        c.all_gather(&vals(r, 2)).map(|_| ())
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let err = results[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("rank 1 left the group"), "{err}");
}

fn a_normal_run_ends_without_errors<C: Group + AbortReason>() {
    // Ranks drop their comms at different times after the last call: no failure anywhere.
    let results = run_ok(C::group(3, Duration::from_secs(20)), |r, c| {
        c.barrier().unwrap();
        std::thread::sleep(Duration::from_millis(50 * r as u64));
        c.reason()
    });
    assert_eq!(results, vec![None, None, None]);
}

fn a_rank_that_never_arrives_times_out<C: Group>() {
    let timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    let errs: Vec<String> = run_ok(C::group(3, timeout), |r, c| {
        if r == 1 {
            // Hangs (longer than the timeout) without touching the communicator, then tries.
            std::thread::sleep(Duration::from_millis(2000));
        }
        c.barrier().unwrap_err().to_string()
    });
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
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

// ---- asynchronous forms ----

/// Start two exchanges and an all-gather, run a blocking call in between, wait in another order.
fn interleaved<C: Communicator>(r: usize, c: C) {
    let w = c.world_size();
    let (l, rt) = (msg(1, r, 0), msg(1, r, 1));
    let p1 = c
        .start_exchange_neighbors((r > 0).then_some(&l), (r + 1 < w).then_some(&rt))
        .unwrap();
    drop((l, rt)); // handed over at start
    let g = c.start_all_gather(&msg(2, r, 9)).unwrap();
    let mid = exchange_tagged(&c, 3);
    let (l, rt) = (msg(4, r, 0), msg(4, r, 1));
    let p4 = c
        .start_exchange_neighbors((r > 0).then_some(&l), (r + 1 < w).then_some(&rt))
        .unwrap();
    // Waits in reverse order of starts.
    check_halos(4, r, w, &p4.wait().unwrap());
    check_gathered(2, w, &g.wait().unwrap());
    check_halos(3, r, w, &mid);
    check_halos(1, r, w, &p1.wait().unwrap());
}

fn started_exchanges_pair_in_program_order_for_1_to_4_ranks<C: Group>() {
    for w in 1..=4usize {
        run_ok(C::group(w, Duration::from_secs(20)), interleaved);
        let delayed = C::group(w, Duration::from_secs(20))
            .into_iter()
            .map(|c| DelayComm::new(c, CommDelay::parse("1ms").unwrap()))
            .collect();
        run_ok(delayed, interleaved);
    }
}

/// The overlapped clip-parallel schedule's pattern, several rounds: an all-gather (global tokens,
/// GroupNorm statistics) and a halo exchange started back to back, both in flight while the rank
/// computes, then waited in one order or the other (`gather_first`), a blocking call between
/// rounds. Ranks disagree on the wait order in the mixed case: pairing must not depend on it.
fn halo_and_all_gather_in_flight_together_waited_in_either_order<C: Group>() {
    for w in 1..=4usize {
        run_ok(C::group(w, Duration::from_secs(20)), |r, c| {
            for round in 0..4usize {
                let tag = 10 * round;
                let gather_first = match round {
                    0 => true,
                    1 => false,
                    // Odd ranks one way, even ranks the other.
                    _ => (r + round) % 2 == 0,
                };
                let g = c.start_all_gather(&msg(tag + 1, r, 9)).unwrap();
                let (l, rt) = (msg(tag + 2, r, 0), msg(tag + 2, r, 1));
                let h = c
                    .start_exchange_neighbors((r > 0).then_some(&l), (r + 1 < w).then_some(&rt))
                    .unwrap();
                if gather_first {
                    check_gathered(tag + 1, w, &g.wait().unwrap());
                    check_halos(tag + 2, r, w, &h.wait().unwrap());
                } else {
                    check_halos(tag + 2, r, w, &h.wait().unwrap());
                    check_gathered(tag + 1, w, &g.wait().unwrap());
                }
                let s = c.all_reduce_sum(&vals(r, 2)).unwrap();
                assert_eq!(
                    data(&s),
                    vec![
                        (0..w).map(|q| (q * 100) as f32).sum::<f32>(),
                        (0..w).map(|q| (q * 100 + 1) as f32).sum::<f32>()
                    ]
                );
            }
            c.barrier().unwrap();
            assert_eq!(c.held_messages(), 0, "rank {r}: messages left behind");
        });
    }
}

fn a_start_returns_before_the_peer_arrives<C: Group>() {
    let late = Duration::from_millis(400);
    let times = run_ok(C::group(2, Duration::from_secs(20)), |r, c| {
        if r == 1 {
            std::thread::sleep(late);
        }
        let t0 = Instant::now();
        let p = c.start_all_gather(&msg(0, r, 0)).unwrap();
        let started = t0.elapsed();
        let all = p.wait().unwrap();
        assert_eq!(data(&all[1 - r]), vec![0.0, (1 - r) as f32, 0.0]);
        (started, t0.elapsed())
    });
    // Rank 0 started at once and waited for rank 1 in `wait`.
    assert!(times[0].0 < late / 2, "{times:?}");
    assert!(times[0].1 >= late / 2, "{times:?}");
}

fn a_dropped_pending_exchange_leaves_later_calls_intact<C: Group>() {
    for w in 2..=3usize {
        run_ok(C::group(w, Duration::from_secs(20)), |r, c| {
            let (l, rt) = (msg(1, r, 0), msg(1, r, 1));
            let halos = ((r > 0).then_some(&l), (r + 1 < w).then_some(&rt));
            if r == 0 {
                // Dropped before the peers send (they start late) ...
                drop(c.start_exchange_neighbors(halos.0, halos.1).unwrap());
                drop(c.start_all_gather(&msg(2, r, 9)).unwrap());
            } else {
                std::thread::sleep(Duration::from_millis(50));
                let p = c.start_exchange_neighbors(halos.0, halos.1).unwrap();
                check_halos(1, r, w, &p.wait().unwrap());
                check_gathered(2, w, &c.all_gather(&msg(2, r, 9)).unwrap());
            }
            // ... or after they sent.
            let p = c.start_exchange_neighbors(None, None);
            if r == w - 1 {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(p);
            // The next calls get the next calls' tensors.
            check_halos(3, r, w, &start_tagged(&c, 3).unwrap());
            check_gathered(4, w, &c.all_gather(&msg(4, r, 9)).unwrap());
            // Every peer sent everything above before its barrier message: what the dropped
            // handles would have received is gone, not held.
            c.barrier().unwrap();
            assert_eq!(c.held_messages(), 0, "rank {r}: messages left behind");
        });
    }
}

fn errors_and_aborts_reach_pending_handles<C: Group>() {
    let res = run_ok(C::group(2, Duration::from_secs(30)), |r, c| {
        let t0 = Instant::now();
        let p = c.start_all_gather(&msg(0, r, 0))?;
        if r == 1 {
            c.abort("stop");
            return Ok(t0.elapsed());
        }
        // Rank 0's wait (or, if it got there first, its next call) fails naming the abort.
        p.wait()?;
        let p = c.start_all_gather(&msg(1, r, 0));
        p.and_then(|p| p.wait()).map(|_| t0.elapsed())
    });
    let err = res[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("rank 1 aborted: stop"), "{err}");
    assert!(res[1].is_ok());
}

fn a_pending_wait_for_a_silent_peer_times_out_naming_it<C: Group>() {
    // Rank 1 starts nothing; rank 0's started calls are bounded by the timeout.
    let timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    let res = run_ok(C::group(2, timeout), |r, c| {
        if r == 1 {
            std::thread::sleep(Duration::from_millis(1500));
            return None;
        }
        let g = c.start_all_gather(&msg(0, r, 0)).unwrap();
        let h = c
            .start_exchange_neighbors(None, Some(&msg(1, r, 1)))
            .unwrap();
        let e = h.wait().unwrap_err().to_string();
        Some((e, t0.elapsed(), g.wait().unwrap_err().to_string()))
    });
    let (e, waited, e2) = res[0].clone().unwrap();
    assert!(
        e.contains("timed out") && e.contains("waiting for rank 1"),
        "{e}"
    );
    assert!(
        waited >= timeout && waited < Duration::from_millis(1200),
        "{waited:?}"
    );
    assert!(e2.contains("timed out"), "{e2}");
}

/// One `#[test]` per body and communicator: `in_process::NAME` and `tcp::NAME`.
macro_rules! for_each_communicator {
    ($($name:ident),* $(,)?) => {
        mod in_process {
            $(#[test]
            fn $name() {
                super::$name::<vi_runtime::comm::InProcessComm>()
            })*
        }
        mod tcp {
            $(#[test]
            fn $name() {
                super::$name::<vi_runtime::comm::TcpComm>()
            })*
        }
    };
}

for_each_communicator!(
    collectives_are_correct_for_1_to_4_ranks,
    point_to_point_pairs_in_order_and_apart_from_collectives,
    mismatched_calls_are_reported_naming_both_ranks_and_kinds,
    abort_on_one_rank_fails_every_rank_quickly_with_its_reason,
    future_calls_fail_after_abort,
    a_panicking_rank_aborts_the_group,
    a_rank_that_leaves_early_fails_its_peers_at_once,
    a_normal_run_ends_without_errors,
    a_rank_that_never_arrives_times_out,
    started_exchanges_pair_in_program_order_for_1_to_4_ranks,
    halo_and_all_gather_in_flight_together_waited_in_either_order,
    a_start_returns_before_the_peer_arrives,
    a_dropped_pending_exchange_leaves_later_calls_intact,
    errors_and_aborts_reach_pending_handles,
    a_pending_wait_for_a_silent_peer_times_out_naming_it,
);

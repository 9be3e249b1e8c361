//! `comm::Lanes`: several threads of one rank sharing its communicator (the concurrent CFG rows).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vi_runtime::comm::{CommDelay, Communicator, DelayComm, InProcessGroup, Lane, Lanes};
use vi_runtime::Tensor;

/// Runs `f(rank, lane index, lane)` on one thread per lane of every rank (`lanes` lanes per
/// rank), after `Lane::enter` unless `f` is to enter itself (`enter` false); results by rank,
/// then lane.
fn run_lanes_with<T: Send>(
    comms: &[impl Communicator],
    lanes: usize,
    enter: bool,
    f: impl Fn(usize, usize, &Lane) -> T + Sync,
) -> Vec<Vec<T>> {
    std::thread::scope(|s| {
        let ranks: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                s.spawn(move || {
                    std::thread::scope(|s| {
                        let handles: Vec<_> = Lanes::split(comm, lanes, None)
                            .into_iter()
                            .map(|lane| {
                                s.spawn(move || {
                                    if enter {
                                        lane.enter();
                                    }
                                    f(rank, lane.index(), &lane)
                                })
                            })
                            .collect();
                        handles
                            .into_iter()
                            .map(|h| h.join().unwrap())
                            .collect::<Vec<T>>()
                    })
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn run_lanes<T: Send>(
    comms: &[impl Communicator],
    lanes: usize,
    f: impl Fn(usize, usize, &Lane) -> T + Sync,
) -> Vec<Vec<T>> {
    run_lanes_with(comms, lanes, true, f)
}

/// [rank, lane, k].
fn tag(rank: usize, lane: usize, k: usize) -> Tensor {
    Tensor::from_vec(vec![rank as f32, lane as f32, k as f32], &[3]).unwrap()
}

fn lane_and_k(t: &Tensor) -> (usize, usize) {
    let v = t.to_vec_f32().unwrap();
    (v[1] as usize, v[2] as usize)
}

/// Each lane's k-th all-gather and neighbour exchange pair with the same lane's k-th on every
/// rank, however the lanes' threads are delayed (here the lanes of odd ranks start late on lane
/// 0 and of even ranks on lane 1, and every call is preceded by a rank- and lane-dependent
/// pause). Without the round robin the first call to arrive would take the next index and pair
/// with another lane's call.
#[test]
fn lanes_pair_each_call_with_the_same_lanes_call_on_every_rank() {
    let world = 3;
    let comms = InProcessGroup::new(world, Duration::from_secs(20));
    let calls = 4;
    let got = run_lanes(&comms, 2, |rank, lane, c| {
        if (rank + lane) % 2 == 1 {
            std::thread::sleep(Duration::from_millis(30));
        }
        let mut seen = Vec::new();
        for k in 0..calls {
            std::thread::sleep(Duration::from_millis(
                ((rank * 7 + lane * 5 + k * 3) % 11) as u64,
            ));
            let all = c.all_gather(&tag(rank, lane, k)).unwrap();
            let p = c
                .start_exchange_neighbors(Some(&tag(rank, lane, k)), Some(&tag(rank, lane, k)))
                .unwrap();
            seen.extend(all.iter().map(lane_and_k));
            let (l, r) = p.wait().unwrap();
            seen.extend(l.iter().chain(r.iter()).map(lane_and_k));
        }
        seen
    });
    for (rank, lanes) in got.iter().enumerate() {
        for (lane, seen) in lanes.iter().enumerate() {
            // world gathered tags + 1 or 2 halos per call.
            assert!(seen.len() >= calls * (world + 1), "rank {rank} lane {lane}");
            let mut k = 0;
            for &(l, kk) in seen {
                assert_eq!(l, lane, "rank {rank}: lane {lane} got lane {l}'s tensor");
                assert!(
                    kk == k || kk == k + 1,
                    "rank {rank} lane {lane}: call {kk} after {k}"
                );
                k = kk;
            }
        }
    }
}

/// A lane that is dropped after fewer calls is skipped by the round robin: the other lane's
/// later calls still pair with the same lane's calls on the other ranks.
#[test]
fn a_dropped_lane_is_skipped() {
    let comms = InProcessGroup::new(2, Duration::from_secs(20));
    let got = run_lanes(&comms, 2, |rank, lane, c| {
        let calls = if lane == 0 { 1 } else { 3 };
        (0..calls)
            .map(|k| {
                let all = c.all_gather(&tag(rank, lane, k)).unwrap();
                all.iter().map(lane_and_k).collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    });
    for lanes in &got {
        assert_eq!(lanes[0], vec![vec![(0, 0), (0, 0)]]);
        assert_eq!(
            lanes[1],
            (0..3).map(|k| vec![(1, k), (1, k)]).collect::<Vec<_>>()
        );
    }
}

/// A lane waiting for its turn fails once the group is aborted: on rank 0, lane 1 takes the
/// baton first and calls, which is lane 0's turn; it hands the baton on and waits; lane 0 then
/// computes without calling until rank 1 aborts the group.
#[test]
fn a_lane_waiting_for_its_turn_fails_when_the_group_is_aborted() {
    let comms = InProcessGroup::new(2, Duration::from_secs(20));
    let t0 = Instant::now();
    let got = run_lanes_with(&comms, 2, false, |rank, lane, c| {
        if rank == 1 {
            if lane == 0 {
                std::thread::sleep(Duration::from_millis(200));
                c.abort("rank 1 fails on purpose");
            }
            return None;
        }
        if lane == 1 {
            c.enter();
            return Some(c.all_gather(&tag(rank, lane, 0)).unwrap_err().to_string());
        }
        std::thread::sleep(Duration::from_millis(50));
        c.enter();
        // Stays alive a while after the abort: lane 1 must notice it while waiting, not get
        // the turn from a dropped lane.
        while !c.is_aborted() {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(500));
        None
    });
    let e = got[0][1].clone().unwrap();
    assert!(
        e.contains("lane 1") && e.contains("aborted while waiting for the lane's turn"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// At most one lane of a rank computes at a time, and a lane hands the baton on while its
/// exchange flies: with 50 ms of latency per exchange and 20 ms of compute before each, two
/// lanes of 3 exchanges take about 3 x 70 + 20 ms, not the 6 x 70 ms of one lane after the
/// other.
#[test]
fn one_lane_computes_at_a_time_and_its_exchange_overlaps_the_others_compute() {
    let delay = CommDelay::parse("50ms").unwrap();
    let comms: Vec<_> = InProcessGroup::new(2, Duration::from_secs(20))
        .into_iter()
        .map(|c| DelayComm::new(c, delay))
        .collect();
    let active: Vec<AtomicUsize> = (0..2).map(|_| AtomicUsize::new(0)).collect();
    let most: Vec<AtomicUsize> = (0..2).map(|_| AtomicUsize::new(0)).collect();
    let t0 = Instant::now();
    run_lanes(&comms, 2, |rank, lane, c| {
        for k in 0..3 {
            let now = active[rank].fetch_add(1, Ordering::SeqCst) + 1;
            most[rank].fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            active[rank].fetch_sub(1, Ordering::SeqCst);
            let p = c.start_all_gather(&tag(rank, lane, k)).unwrap();
            let all = p.wait().unwrap();
            assert!(all.iter().all(|t| lane_and_k(t) == (lane, k)));
        }
    });
    let took = t0.elapsed();
    for m in &most {
        assert_eq!(m.load(Ordering::SeqCst), 1, "two lanes computed at once");
    }
    assert!(
        took < Duration::from_millis(350),
        "not overlapped: {took:?}"
    );
}

//! The TCP communicator over real sockets on 127.0.0.1: the collective semantics of
//! `tests/comm.rs` for W = 1..4 (ranks as threads sharing a `MemoryStore`), bit-exact transport of
//! every dtype, point-to-point ordering, and failure propagation (abort with its reason, a rank that
//! dies, panics, leaves or never arrives, a mismatched call, a peer that sends garbage): every rank
//! gets an error naming the rank within a bounded time, never a hang. Two tests run the ranks as
//! real processes (this test binary re-executed; the TCP rendezvous store served by the test), one
//! of them `kill -9`s a rank.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vi_runtime::comm::{
    Communicator, MemoryStore, Rendezvous, StoreClient, StoreServer, TcpComm, TcpConfig,
};
use vi_runtime::{DType, Device, Tensor};

/// Connect `w` ranks (one thread each) and run `f(rank, comm)` on each; results in rank order (a
/// panicking rank gives Err). The comm is handed over by value (some tests drop or kill it).
fn run_with<T: Send>(
    w: usize,
    config: TcpConfig,
    f: impl Fn(usize, TcpComm) -> T + Sync,
) -> Vec<std::thread::Result<T>> {
    let store = Arc::new(MemoryStore::new());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..w)
            .map(|r| {
                let (f, store, config) = (&f, store.clone(), config.clone());
                s.spawn(move || {
                    let c = TcpComm::connect(r, w, store.as_ref(), &config).unwrap();
                    f(r, c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

fn run<T: Send>(
    w: usize,
    timeout: Duration,
    f: impl Fn(usize, TcpComm) -> T + Sync,
) -> Vec<std::thread::Result<T>> {
    run_with(w, TcpConfig::loopback(timeout), f)
}

/// A rank-specific tensor: `len` values r*100 + i, shape [len].
fn vals(r: usize, len: usize) -> Tensor {
    Tensor::from_vec((0..len).map(|i| (r * 100 + i) as f32).collect(), &[len]).unwrap()
}

fn data(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().unwrap()
}

/// The same checks as `collectives_are_correct_for_1_to_4_ranks` in tests/comm.rs.
fn check_collectives(r: usize, w: usize, c: &dyn Communicator) {
    assert_eq!(c.rank(), r);
    assert_eq!(c.world_size(), w);
    for round in 0..3usize {
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

        // All-gather with a different length (and rank) per rank.
        let g = c
            .all_gather(&vals(r, r + 1 + round).reshape(&[1, r + 1 + round]).unwrap())
            .unwrap();
        assert_eq!(g.len(), w);
        for (src, t) in g.iter().enumerate() {
            assert_eq!(t.shape(), &[1, src + 1 + round]);
            assert_eq!(data(t), data(&vals(src, src + 1 + round)));
        }

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
}

#[test]
fn collectives_are_correct_for_1_to_4_ranks() {
    for w in 1..=4usize {
        let results = run(w, Duration::from_secs(20), |r, c| {
            check_collectives(r, w, &c);
            r
        });
        for (r, res) in results.into_iter().enumerate() {
            assert_eq!(res.unwrap(), r, "W={w}");
        }
    }
}

/// Bits of a tensor's elements in its own dtype (f32 widened exactly from f16/bf16).
fn bits(t: &Tensor) -> Vec<u32> {
    data(t).iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_dtype_travels_bit_exactly() {
    // Values that are not exact in f16/bf16 after rounding, NaN-free, with signed zero and
    // subnormals: what arrives must be the sender's bits in the sender's dtype.
    let base: Vec<f32> = (0..1000)
        .map(|i| ((i as f32) * 0.7311).sin() * 10f32.powi(i % 9 - 4))
        .chain([-0.0, 1e-40, f32::MAX, f32::MIN_POSITIVE])
        .collect();
    let n = base.len();
    let results = run(2, Duration::from_secs(20), |r, c| {
        let mut out = Vec::new();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::from_vec(
                base.iter().map(|x| x * (r + 1) as f32).collect(),
                &[2, n / 2],
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            let g = c.all_gather(&t).unwrap();
            let peer = &g[1 - r];
            assert_eq!(
                (peer.dtype(), peer.shape(), peer.device()),
                (dtype, t.shape(), Device::Cpu)
            );
            out.push((bits(&g[0]), bits(&g[1])));
        }
        out
    });
    let res: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(res[0], res[1], "both ranks hold the same bits");
}

#[test]
fn all_reduce_is_bit_identical_and_in_rank_order() {
    // Magnitudes that make float addition order-dependent: the result must equal the sum taken
    // in rank order, bit for bit, on every rank.
    let w = 4;
    let input = |r: usize| -> Vec<f32> {
        (0..4096)
            .map(|i| {
                let x = ((i * 31 + r * 7) as f32 * 0.123).sin();
                x * 10f32.powi(((i + r) % 13) as i32 - 6)
            })
            .collect()
    };
    let results = run(w, Duration::from_secs(20), |r, c| {
        let t = Tensor::from_vec(input(r), &[64, 64]).unwrap();
        bits(&c.all_reduce_sum(&t).unwrap())
    });
    let mut expect = input(0);
    for r in 1..w {
        for (a, b) in expect.iter_mut().zip(input(r)) {
            *a += b;
        }
    }
    let expect: Vec<u32> = expect.iter().map(|x| x.to_bits()).collect();
    for res in results {
        assert_eq!(res.unwrap(), expect);
    }
}

#[test]
fn point_to_point_pairs_in_order_and_apart_from_collectives() {
    let results = run(3, Duration::from_secs(20), |r, c| {
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
    let out: Vec<Vec<f32>> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(out[0], vec![20.0, 21.0, 10.0, 11.0, 3.0]);
    assert_eq!(out[1], vec![3.0]);
    assert_eq!(out[2], vec![3.0]);
}

#[test]
fn sends_do_not_wait_for_the_receiver() {
    // Rank 1 sends 8 MiB messages that rank 0 only receives after a pause: the sends return
    // at once (the reader thread drains the socket into the mailbox).
    let results = run(2, Duration::from_secs(20), |r, c| {
        let big = Tensor::zeros(&[2 << 20], Device::Cpu, DType::F32).unwrap();
        if r == 1 {
            for _ in 0..4 {
                c.send_to(0, &big).unwrap();
            }
            c.barrier().unwrap();
            0
        } else {
            c.barrier().unwrap();
            (0..4).map(|_| c.recv_from(1).unwrap().elem_count()).sum()
        }
    });
    let res: Vec<usize> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(res[0], 4 << 21);
}

#[test]
fn received_tensors_are_placed_on_the_configured_device() {
    let mut config = TcpConfig::loopback(Duration::from_secs(20));
    config.device = Some(Device::Meta);
    let results = run_with(2, config, |r, c| {
        let g = c.all_gather(&vals(r, 3)).unwrap();
        // Shape-only tensors travel too (a dry run over processes).
        let m = c
            .exchange_neighbors(
                (r == 1)
                    .then(|| Tensor::meta(&[2, 5], DType::BF16))
                    .as_ref(),
                (r == 0).then(|| Tensor::meta(&[7], DType::F16)).as_ref(),
            )
            .unwrap();
        let m = m.0.or(m.1).unwrap();
        (
            g.iter()
                .map(|t| (t.device(), t.shape().to_vec()))
                .collect::<Vec<_>>(),
            (m.device(), m.shape().to_vec(), m.dtype()),
        )
    });
    let res: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(
        res[0].0,
        vec![(Device::Cpu, vec![3]), (Device::Meta, vec![3])]
    );
    assert_eq!(
        res[1].0,
        vec![(Device::Meta, vec![3]), (Device::Cpu, vec![3])]
    );
    assert_eq!(res[0].1, (Device::Meta, vec![2, 5], DType::BF16));
    assert_eq!(res[1].1, (Device::Meta, vec![7], DType::F16));
}

#[test]
fn mismatched_calls_are_reported_naming_both_ranks_and_kinds() {
    let results = run(2, Duration::from_secs(20), |r, c| {
        if r == 0 {
            c.barrier()
        } else {
            c.all_gather(&vals(r, 1)).map(|_| ())
        }
    });
    let errs: Vec<String> = results
        .into_iter()
        .map(|r| r.unwrap().unwrap_err().to_string())
        .collect();
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

#[test]
fn abort_on_one_rank_fails_every_rank_quickly_with_its_reason() {
    let t0 = Instant::now();
    let results = run(4, Duration::from_secs(60), |r, c| {
        c.barrier()?;
        if r == 2 {
            c.abort("simulated failure");
            assert!(c.is_aborted());
            return Err(vi_runtime::Error::Comm("rank 2 failed".into()));
        }
        // The others block in a collective that rank 2 never joins.
        c.all_gather(&vals(r, 3)).map(|_| ())
    });
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
    let results = run(2, Duration::from_secs(20), |r, c| {
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
        c.abort_reason().unwrap()
    });
    for res in results {
        assert!(res.unwrap().contains("rank 0 aborted: stop"));
    }
}

#[test]
fn a_rank_that_dies_mid_exchange_is_named_by_every_other_rank() {
    let t0 = Instant::now();
    let results = run(3, Duration::from_secs(60), |r, c| {
        c.barrier()?;
        if r == 1 {
            // Dies (connections closed, no goodbye) while the others wait for it.
            std::thread::sleep(Duration::from_millis(100));
            c.simulate_death();
            return Ok(());
        }
        c.all_gather(&vals(r, 3)).map(|_| ())
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    for r in [0, 2] {
        let err = results[r]
            .as_ref()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 1 died"), "rank {r}: {err}");
    }
}

#[test]
fn a_panicking_rank_aborts_the_group() {
    let t0 = Instant::now();
    let results = run(3, Duration::from_secs(60), |r, c| {
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

#[test]
fn a_rank_that_leaves_early_fails_its_peers_at_once() {
    let t0 = Instant::now();
    let results = run(2, Duration::from_secs(60), |r, c| {
        if r == 1 {
            drop(c); // leaves without joining the collective: a goodbye, not a death
            return Ok(());
        }
        c.all_gather(&vals(r, 2)).map(|_| ())
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let err = results.into_iter().next().unwrap().unwrap().unwrap_err();
    assert!(err.to_string().contains("rank 1 left the group"), "{err}");
}

#[test]
fn a_normal_run_ends_without_errors() {
    // Ranks drop their comms at different times after the last call: goodbyes, no "died".
    let results = run(3, Duration::from_secs(20), |r, c| {
        c.barrier().unwrap();
        std::thread::sleep(Duration::from_millis(50 * r as u64));
        c.abort_reason()
    });
    for res in results {
        assert_eq!(res.unwrap(), None);
    }
}

#[test]
fn a_rank_that_never_arrives_times_out() {
    let timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    let results = run(3, timeout, |r, c| {
        if r == 1 {
            std::thread::sleep(Duration::from_millis(2000));
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
fn connecting_times_out_naming_the_missing_rank() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    // Rank 0 of 3 waits for ranks 1 and 2 to connect; only rank 1 comes.
    let (e0, c1) = std::thread::scope(|s| {
        let h0 = s.spawn(|| {
            TcpComm::connect(
                0,
                3,
                &store,
                &TcpConfig::loopback(Duration::from_millis(500)),
            )
        });
        let h1 = s.spawn(|| {
            TcpComm::connect(
                1,
                3,
                &store,
                &TcpConfig::loopback(Duration::from_millis(500)),
            )
        });
        (h0.join().unwrap(), h1.join().unwrap())
    });
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let e0 = e0.err().expect("rank 0 cannot complete").to_string();
    assert!(e0.contains("rank(s) 2 did not connect"), "{e0}");
    let e1 = c1.err().expect("rank 1 cannot complete").to_string();
    assert!(e1.contains("rank(s) 2 did not connect"), "{e1}");
    // A rank whose lower peer never publishes: the store lookup times out naming the key.
    let e = TcpComm::connect(
        1,
        2,
        &MemoryStore::new(),
        &TcpConfig::loopback(Duration::from_millis(200)),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("tcp/group"), "{e}");
}

/// A handshake as the wire format documents it (see `vi_runtime::comm::tcp`).
fn hello(group: u64, world: u32, from: u32, to: u32) -> Vec<u8> {
    let mut b = b"VITCPv01".to_vec();
    b.extend_from_slice(&group.to_le_bytes());
    b.extend_from_slice(&world.to_le_bytes());
    b.extend_from_slice(&from.to_le_bytes());
    b.extend_from_slice(&to.to_le_bytes());
    b
}

/// Plays rank 0 of a group of 2 from a raw socket: accepts rank 1, answers its handshake with
/// `reply(group)`, then writes `then`; returns rank 1's result of `connect` + `barrier`.
fn fake_rank0(reply: impl Fn(u64) -> Vec<u8>, then: Vec<u8>) -> vi_runtime::Result<()> {
    let store = MemoryStore::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let group = 0x1234_5678_9abc_def0u64;
    store.set("tcp/group", &group.to_le_bytes()).unwrap();
    store
        .set(
            "tcp/addr/0",
            listener.local_addr().unwrap().to_string().as_bytes(),
        )
        .unwrap();
    let reply = reply(group);
    std::thread::scope(|s| {
        let fake = s.spawn(|| {
            let (mut sock, _) = listener.accept().unwrap();
            let mut h = [0u8; 28];
            sock.read_exact(&mut h).unwrap();
            assert_eq!(h.to_vec(), hello(group, 2, 1, 0), "rank 1's handshake");
            let _ = sock.write_all(&reply);
            let _ = sock.write_all(&then);
            // Keep the socket open until rank 1 is done with it.
            let mut sink = Vec::new();
            let _ = sock.read_to_end(&mut sink);
        });
        let config = TcpConfig::loopback(Duration::from_secs(5));
        let res = TcpComm::connect(1, 2, &store, &config).and_then(|c| c.barrier());
        drop(fake);
        res
    })
}

#[test]
fn a_garbage_or_oversized_frame_is_an_error_without_a_huge_allocation() {
    // A header claiming 2^40 f32 elements (4 TiB): refused from the header alone.
    let mut frame = b"VIFR".to_vec();
    frame.extend_from_slice(&[5, 1, 0, 1]); // Barrier, a tensor, f32, 1 dimension
    frame.extend_from_slice(&0u64.to_le_bytes());
    frame.extend_from_slice(&(4u64 << 40).to_le_bytes());
    frame.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let t0 = Instant::now();
    let e = fake_rank0(|g| hello(g, 2, 0, 1), frame)
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid frame from rank 0"), "{e}");
    assert!(e.contains("exceeds the limit"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());

    // Random bytes after a good handshake.
    let e = fake_rank0(|g| hello(g, 2, 0, 1), b"GET / HTTP/1.1\r\n\r\n".to_vec())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("invalid frame from rank 0: bad frame magic"),
        "{e}"
    );

    // Something that is not this protocol at all answers the handshake.
    let e = fake_rank0(
        |_| b"HTTP/1.1 400 Bad Request\r\n\r\nxxxxxx".to_vec(),
        vec![],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a video-infinity TCP communicator"), "{e}");

    // A member of another group (or another rank) answers.
    let e = fake_rank0(|g| hello(g ^ 1, 2, 0, 1), vec![])
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not rank 0 of this group"), "{e}");
}

#[test]
fn strangers_are_turned_away_while_the_group_forms() {
    // A connection that is not a member (wrong magic, or silent) does not take a rank's place.
    let store = Arc::new(MemoryStore::new());
    std::thread::scope(|s| {
        let st = store.clone();
        let r0 = s.spawn(move || {
            let c = TcpComm::connect(
                0,
                2,
                st.as_ref(),
                &TcpConfig::loopback(Duration::from_secs(10)),
            )
            .unwrap();
            c.all_reduce_sum(&vals(0, 2)).map(|t| data(&t))
        });
        let addr =
            String::from_utf8(store.get("tcp/addr/0", Duration::from_secs(10)).unwrap()).unwrap();
        let mut stranger = TcpStream::connect(&addr).unwrap();
        stranger.write_all(&[0xAB; 28]).unwrap();
        let c1 = TcpComm::connect(
            1,
            2,
            store.as_ref(),
            &TcpConfig::loopback(Duration::from_secs(10)),
        )
        .unwrap();
        let s1 = c1.all_reduce_sum(&vals(1, 2)).unwrap();
        assert_eq!(r0.join().unwrap().unwrap(), data(&s1));
        assert_eq!(data(&s1), vec![100.0, 102.0]);
    });
}

// ---- ranks as real processes: this test binary re-executed with CHILD_ENV set ----

/// "rank,world,store_port,mode" for a child process.
const CHILD_ENV: &str = "TCP_COMM_TEST_CHILD";

/// The body of a child process (a no-op when the test runs normally).
#[test]
fn child_process_rank() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let (r, w): (usize, usize) = (parts[0].parse().unwrap(), parts[1].parse().unwrap());
    let port: u16 = parts[2].parse().unwrap();
    let store = StoreClient::connect("127.0.0.1", port, Duration::from_secs(30)).unwrap();
    let c = TcpComm::connect(r, w, &store, &TcpConfig::loopback(Duration::from_secs(30))).unwrap();
    match parts[3] {
        "collectives" => {
            check_collectives(r, w, &c);
            println!("CHILD-OK rank {r}");
        }
        "die" => {
            // Rank 1 may be killed before a peer has finished the barrier: that call fails too.
            let res = c.barrier().and_then(|_| {
                if r == 1 {
                    // The parent kills this process now (SIGKILL), mid-exchange.
                    println!("CHILD-WAITING");
                    std::io::stdout().flush().unwrap();
                    std::thread::sleep(Duration::from_secs(60));
                }
                c.all_gather(&vals(r, 3))
            });
            match res {
                Ok(_) => println!("CHILD-UNEXPECTED-OK"),
                Err(e) => println!("CHILD-ERR {e}"),
            }
        }
        m => panic!("unknown mode {m}"),
    }
}

/// Children killed on every path (the test's end, a failed assertion).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `w` child processes, one per rank, and the store they meet at (drop it after the children).
fn spawn_ranks(w: usize, mode: &str) -> (Children, StoreServer) {
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children = Children(Vec::new());
    for r in 0..w {
        let child = Command::new(&exe)
            .args([
                "child_process_rank",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{r},{w},{},{mode}", server.port()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.0.push(child);
    }
    (children, server)
}

/// Waits (bounded) for child `i` to exit; its status and stdout + stderr.
fn wait_output(children: &mut Children, i: usize, deadline: Instant) -> (bool, String) {
    let c = &mut children.0[i];
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let mut out = String::new();
            c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            c.stderr.take().unwrap().read_to_string(&mut out).unwrap();
            return (status.success(), out);
        }
        assert!(Instant::now() < deadline, "child {i} did not exit in time");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ranks_as_processes_run_the_collectives() {
    let (mut children, _store) = spawn_ranks(3, "collectives");
    let deadline = Instant::now() + Duration::from_secs(60);
    for r in 0..3 {
        let (ok, out) = wait_output(&mut children, r, deadline);
        assert!(
            ok && out.contains(&format!("CHILD-OK rank {r}")),
            "rank {r}: {out}"
        );
    }
}

#[test]
fn a_process_killed_mid_exchange_is_named_by_every_other_process() {
    let (mut children, _store) = spawn_ranks(3, "die");
    // Wait until rank 1 is past the barrier (so every connection is up), then kill -9 it.
    let mut line = String::new();
    let mut out1 = BufReader::new(children.0[1].stdout.take().unwrap());
    while !line.contains("CHILD-WAITING") {
        line.clear();
        assert!(out1.read_line(&mut line).unwrap() > 0, "rank 1 ended early");
    }
    let t0 = Instant::now();
    children.0[1].kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in [0, 2] {
        let (_, out) = wait_output(&mut children, r, deadline);
        assert!(
            out.contains("CHILD-ERR") && out.contains("rank 1 died"),
            "rank {r}: {out}"
        );
    }
    // Far below the 30 s rank timeout: the closed connections are noticed at once.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// Round-trip latency and bandwidth of `exchange_neighbors` over loopback (2 ranks, both
/// directions at once). Prints figures; asserts nothing about speed.
/// `cargo test --release -p vi-runtime --test tcp_comm -- --ignored --nocapture halo_exchange`
#[test]
#[ignore]
fn halo_exchange_latency_and_bandwidth() {
    // Halo sizes: tiny; one latent frame of a 320x512 video at 320 channels (f32); at 1280.
    for (label, elems) in [
        ("16 B", 4usize),
        ("40 x 64 x 320 f32 (3.3 MB)", 40 * 64 * 320),
        ("40 x 64 x 1280 f32 (13 MB)", 40 * 64 * 1280),
    ] {
        let iters = if elems < 1000 { 2000 } else { 40 };
        let res = run(2, Duration::from_secs(60), |r, c| {
            let t = Tensor::zeros(&[elems], Device::Cpu, DType::F32).unwrap();
            let (l, rt) = if r == 0 {
                (None, Some(&t))
            } else {
                (Some(&t), None)
            };
            c.exchange_neighbors(l, rt).unwrap();
            let t0 = Instant::now();
            for _ in 0..iters {
                c.exchange_neighbors(l, rt).unwrap();
            }
            t0.elapsed()
        });
        let dt = res[0].as_ref().unwrap().as_secs_f64() / iters as f64;
        let mb = (elems * 4) as f64 / 1e6;
        println!(
            "exchange_neighbors {label}: {:.1} us per exchange, {:.0} MB/s each way",
            dt * 1e6,
            mb / dt
        );
    }
}

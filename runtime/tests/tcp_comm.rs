//! What only the TCP communicator does, over real sockets on 127.0.0.1: bit-exact transport of
//! every dtype, sends (and starts) that do not wait for the receiver or a stuck socket, received
//! tensors placed on the configured device, a rank that dies (also while a started exchange is
//! outstanding), connection setup and its failures, garbage on the wire. Two tests run the ranks as
//! real processes (this test binary re-executed; the TCP rendezvous store served by the test), one
//! of them `kill -9`s a rank while exchanges are in flight. The behaviour every communicator shares
//! (collectives, point-to-point, aborts, timeouts, start/wait pairing, dropped handles) is tested
//! for TCP and in-process alike in `comm_semantics.rs`. An ignored test measures how much of an
//! exchange a started form hides behind compute.

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

/// One round of what a clip-parallel step does, on rank r of w: an all-gather and a halo exchange
/// in flight together (waited in the order the overlapped schedule waits), then the blocking
/// collectives; checks every value.
fn process_round(r: usize, w: usize, c: &dyn Communicator) {
    let tagged = |tag: usize, r: usize| Tensor::from_vec(vec![tag as f32, r as f32], &[2]).unwrap();
    let g = c.start_all_gather(&tagged(1, r)).unwrap();
    let (l, rt) = (tagged(2, r), tagged(3, r));
    let h = c
        .start_exchange_neighbors((r > 0).then_some(&l), (r + 1 < w).then_some(&rt))
        .unwrap();
    let all = g.wait().unwrap();
    assert_eq!(all.len(), w);
    for (src, t) in all.iter().enumerate() {
        assert_eq!(data(t), vec![1.0, src as f32]);
    }
    let (from_l, from_r) = h.wait().unwrap();
    assert_eq!(
        from_l.map(|t| data(&t)),
        (r > 0).then(|| vec![3.0, (r - 1) as f32])
    );
    assert_eq!(
        from_r.map(|t| data(&t)),
        (r + 1 < w).then(|| vec![2.0, (r + 1) as f32])
    );
    let s = c.all_reduce_sum(&vals(r, 4)).unwrap();
    let expect: Vec<f32> = (0..4)
        .map(|i| (0..w).map(|q| (q * 100 + i) as f32).sum())
        .collect();
    assert_eq!(data(&s), expect);
    let got = c.gather_to_root(&vals(r, 2)).unwrap();
    assert_eq!(
        got.map(|g| g.iter().map(data).collect::<Vec<_>>()),
        (r == 0).then(|| (0..w).map(|q| data(&vals(q, 2))).collect())
    );
    c.barrier().unwrap();
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
fn a_rank_that_dies_with_exchanges_in_flight_is_named_by_every_other_rank() {
    let t0 = Instant::now();
    let results = run(3, Duration::from_secs(60), |r, c| {
        c.barrier()?;
        if r == 1 {
            // Dies (connections closed, no goodbye) while the others wait for it.
            std::thread::sleep(Duration::from_millis(100));
            c.simulate_death();
            return Ok(());
        }
        if r == 0 {
            // In flight when rank 1 dies: the wait reports the death.
            let g = c.start_all_gather(&vals(r, 3))?;
            let h = c.start_exchange_neighbors(None, Some(&vals(r, 1)))?;
            std::thread::sleep(Duration::from_millis(300));
            h.wait()?;
            return g.wait().map(|_| ());
        }
        c.all_gather(&vals(r, 3)).map(|_| ())
    });
    // Far below the 60 s timeout: the closed connections are noticed at once.
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
    let config = TcpConfig::loopback(Duration::from_secs(5));
    fake_rank0_with(reply, then, true, &config, |c| c.and_then(|c| c.barrier()))
}

/// [`fake_rank0`] with rank 1's part given (`rank1` gets its `connect` result) and the fake rank 0
/// reading what rank 1 sends (`reads`) or never reading it (a stuck peer) until `rank1` returns.
fn fake_rank0_with<R>(
    reply: impl Fn(u64) -> Vec<u8>,
    then: Vec<u8>,
    reads: bool,
    config: &TcpConfig,
    rank1: impl FnOnce(vi_runtime::Result<TcpComm>) -> R,
) -> R {
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
    let (done, is_done) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let (listener, reply, then) = (&listener, &reply, &then);
        let fake = s.spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut h = [0u8; 28];
            sock.read_exact(&mut h).unwrap();
            assert_eq!(h.to_vec(), hello(group, 2, 1, 0), "rank 1's handshake");
            let _ = sock.write_all(reply);
            let _ = sock.write_all(then);
            // Keep the socket open until rank 1 is done with it.
            if reads {
                let mut sink = Vec::new();
                let _ = sock.read_to_end(&mut sink);
            } else {
                let _ = is_done.recv_timeout(Duration::from_secs(60));
            }
        });
        let res = rank1(TcpComm::connect(1, 2, &store, config));
        drop(done);
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

#[test]
fn a_start_does_not_block_on_a_peer_that_stops_reading() {
    // Rank 0 (fake) completes the handshake, then never reads: 64 MiB cannot fit in the socket
    // buffers. The start returns at once (the writer thread is the one stuck); the wait fails
    // within the timeout naming rank 0, and dropping the communicator does not hang.
    let timeout = Duration::from_secs(2);
    let config = TcpConfig::loopback(timeout);
    let t0 = Instant::now();
    let (started, waited, err) = fake_rank0_with(
        |g| hello(g, 2, 0, 1),
        vec![],
        false,
        &config,
        |c| {
            let c = c.unwrap();
            let big = Tensor::zeros(&[16 << 20], Device::Cpu, DType::F32).unwrap();
            let t0 = Instant::now();
            let p = c.start_exchange_neighbors(Some(&big), None).unwrap();
            let started = t0.elapsed();
            let err = p.wait().unwrap_err().to_string();
            (started, t0.elapsed(), err)
        },
    );
    assert!(
        started < Duration::from_millis(500),
        "start blocked for {started:?}"
    );
    assert!(err.contains("timed out") && err.contains("rank 0"), "{err}");
    assert!(waited < timeout + Duration::from_secs(2), "{waited:?}");
    assert!(
        t0.elapsed() < timeout * 3 + Duration::from_secs(3),
        "{:?}",
        t0.elapsed()
    );
}

/// A busy loop of `n` dependent steps (its length is a count, not a clock).
fn spin(n: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..n {
        x = std::hint::black_box(x.rotate_left(5) ^ i).wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    x
}

/// Spin steps per millisecond on this machine (measured alone, now).
fn spin_per_ms() -> f64 {
    let t0 = Instant::now();
    spin(20_000_000);
    20_000_000.0 / (t0.elapsed().as_secs_f64() * 1e3)
}

/// Milliseconds per call of `f`, over `iters` calls.
fn ms_per(iters: usize, f: &dyn Fn()) -> f64 {
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    t0.elapsed().as_secs_f64() * 1e3 / iters as f64
}

/// How much of an exchange a started form hides behind compute, 2 ranks on loopback; rank 1's
/// time per iteration of: the exchange alone; a busy loop alone; (a) the blocking exchange then
/// the loop; (b) start, the loop, wait; (c) the eager form (start completes the exchange, what
/// `Communicator`'s default start does and TCP did before it had its own) then the loop. Prints
/// figures; asserts nothing about speed.
/// `cargo test --release -p vi-runtime --test tcp_comm -- --ignored --nocapture overlap_of`
///
/// Two cases. "late peer": rank 0 sends its halo a fixed delay after rank 1 asked for it (a
/// point-to-point request, then a sleep: a stand-in for a link's latency that takes no CPU), so
/// the figures do not depend on free cores. "loopback": rank 0 sends at once and the time is the
/// transfer itself, which on loopback is CPU work (the kernel copying on both ranks' writer and
/// reader threads): it can only overlap with the loop where a core is free for it.
#[test]
#[ignore]
fn overlap_of_a_started_exchange_with_compute() {
    let per_ms = spin_per_ms();
    let iters = 30;
    for (label, elems, late) in [
        (
            "late peer (20 ms), 16 B",
            4usize,
            Some(Duration::from_millis(20)),
        ),
        (
            "late peer (20 ms), 13 MB",
            40 * 64 * 1280,
            Some(Duration::from_millis(20)),
        ),
        ("loopback, 3.3 MB", 40 * 64 * 320, None),
        ("loopback, 13 MB", 40 * 64 * 1280, None),
    ] {
        let res = run(2, Duration::from_secs(60), |r, c| {
            let t = Tensor::zeros(&[elems], Device::Cpu, DType::F32).unwrap();
            let to_right = (r == 0).then_some(&t);
            let ask = Tensor::zeros(&[1], Device::Cpu, DType::F32).unwrap();
            // Rank 0 serves: (a request, the delay,) its halo; rank 1 asks first.
            let start = || {
                if late.is_some() {
                    c.send_to(0, &ask).unwrap();
                }
                c.start_exchange_neighbors(None, to_right).unwrap()
            };
            let exchange = || {
                start().wait().unwrap();
            };
            // Rank 0 serves: as many exchanges as rank 1 makes (4 timed phases + 2).
            if r == 0 {
                for _ in 0..4 * iters + 2 {
                    if let Some(d) = late {
                        c.recv_from(1).unwrap();
                        std::thread::sleep(d);
                    }
                    c.exchange_neighbors(None, to_right).unwrap();
                }
                return None;
            }
            exchange();
            let alone = ms_per(iters, &exchange);
            // Compute as long as the exchange alone.
            let n = (alone * per_ms) as u64;
            let compute = ms_per(iters, &|| {
                std::hint::black_box(spin(n));
            });
            let blocking = ms_per(iters, &|| {
                exchange();
                std::hint::black_box(spin(n));
            });
            let started = ms_per(iters, &|| {
                let p = start();
                std::hint::black_box(spin(n));
                p.wait().unwrap();
            });
            let eager = ms_per(iters, &|| {
                let p = vi_runtime::comm::Pending::done(start().wait());
                std::hint::black_box(spin(n));
                p.wait().unwrap();
            });
            exchange();
            Some([alone, compute, blocking, started, eager])
        });
        let [alone, compute, blocking, started, eager] = res[1].as_ref().unwrap().unwrap();
        println!(
            "{label}: exchange alone {alone:.2} ms, compute alone {compute:.2} ms; blocking + \
             compute {blocking:.2} ms, start + compute + wait {started:.2} ms ({:.0} % of the \
             exchange hidden), eager start + compute + wait {eager:.2} ms",
            100.0 * (blocking - started) / alone
        );
    }
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
            for _ in 0..3 {
                process_round(r, w, &c);
            }
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
                // Both started before rank 1 dies; rank 0 waits in the other order.
                let g = c.start_all_gather(&vals(r, 3))?;
                let h = c.start_exchange_neighbors(Some(&vals(r, 1)), Some(&vals(r, 1)))?;
                if r == 0 {
                    h.wait()?;
                    g.wait()
                } else {
                    g.wait()
                }
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
fn a_process_killed_with_exchanges_in_flight_is_named_by_every_other_process() {
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

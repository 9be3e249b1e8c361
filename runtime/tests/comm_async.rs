//! The delay-injecting wrapper: it delivers after its latency / bandwidth without blocking the
//! sender (a started exchange's delay runs while the rank computes). The asynchronous forms of
//! the communicators themselves are tested in `comm_semantics.rs`.

use std::time::{Duration, Instant};

use vi_runtime::comm::{CommDelay, Communicator, DelayComm, InProcessGroup};
use vi_runtime::Tensor;

/// Run `f(rank, comm)` on one thread per rank; results in rank order (a panic propagates).
fn run<C: Communicator + Send, T: Send>(
    comms: Vec<C>,
    f: impl Fn(usize, &C) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, &c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// [tag, r, side].
fn msg(tag: usize, r: usize, side: usize) -> Tensor {
    Tensor::from_vec(vec![tag as f32, r as f32, side as f32], &[3]).unwrap()
}

fn data(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().unwrap()
}

/// Checks a neighbour exchange's result on rank r of w for messages tagged `tag` (msg(tag, r, 0)
/// sent left, msg(tag, r, 1) right).
fn check_halos(tag: usize, r: usize, w: usize, got: &(Option<Tensor>, Option<Tensor>)) {
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

fn exchange_tagged<C: Communicator>(c: &C, tag: usize) -> (Option<Tensor>, Option<Tensor>) {
    let (r, w) = (c.rank(), c.world_size());
    let (l, rt) = (msg(tag, r, 0), msg(tag, r, 1));
    c.exchange_neighbors((r > 0).then_some(&l), (r + 1 < w).then_some(&rt))
        .unwrap()
}

#[test]
fn delay_wrapper_delivers_after_the_latency_without_blocking_the_sender() {
    let latency = Duration::from_millis(300);
    let comms = InProcessGroup::new(2, Duration::from_secs(10))
        .into_iter()
        .map(|c| {
            DelayComm::new(
                c,
                CommDelay {
                    latency,
                    bytes_per_sec: None,
                },
            )
        })
        .collect();
    let times = run(comms, |r, c| {
        // Blocking: at least the latency.
        let t0 = Instant::now();
        let got = exchange_tagged(c, 1);
        check_halos(1, r, 2, &got);
        let blocking = t0.elapsed();
        // Started, then 300 ms of "compute", then waited: the latency ran meanwhile.
        let t0 = Instant::now();
        let (l, rt) = (msg(2, r, 0), msg(2, r, 1));
        let p = c
            .start_exchange_neighbors((r > 0).then_some(&l), (r == 0).then_some(&rt))
            .unwrap();
        let started = t0.elapsed();
        std::thread::sleep(latency);
        check_halos(2, r, 2, &p.wait().unwrap());
        (blocking, started, t0.elapsed())
    });
    for (blocking, started, overlapped) in times {
        assert!(blocking >= latency, "{blocking:?}");
        assert!(started < latency / 3, "start blocked: {started:?}");
        // Sequential would be 2 x latency; allow generous scheduling slack.
        assert!(
            overlapped < latency * 5 / 3,
            "not overlapped: {overlapped:?}"
        );
    }
}

#[test]
fn delay_wrapper_limits_bandwidth() {
    // 400 KB at 2 MB/s: 200 ms on the link, plus 1 ms latency.
    let delay = CommDelay::parse("1ms,2MB/s").unwrap();
    let comms = InProcessGroup::new(2, Duration::from_secs(10))
        .into_iter()
        .map(|c| DelayComm::new(c, delay))
        .collect();
    let times = run(comms, |r, c| {
        let t = Tensor::from_vec(vec![r as f32; 100_000], &[100_000]).unwrap();
        let t0 = Instant::now();
        let all = c.all_gather(&t).unwrap();
        assert_eq!(all[1 - r].to_vec_f32().unwrap()[0], (1 - r) as f32);
        t0.elapsed()
    });
    for t in times {
        assert!(t >= Duration::from_millis(200), "{t:?}");
    }
}

#[test]
fn comm_delay_parses_latency_and_bandwidth() {
    let d = CommDelay::parse("2ms").unwrap();
    assert_eq!(
        (d.latency, d.bytes_per_sec),
        (Duration::from_millis(2), None)
    );
    let d = CommDelay::parse("500us, 1GB/s").unwrap();
    assert_eq!(d.latency, Duration::from_micros(500));
    assert_eq!(d.bytes_per_sec, Some(1e9));
    let d = CommDelay::parse("0,100MiB/s").unwrap();
    assert_eq!(d.latency, Duration::ZERO);
    assert_eq!(d.bytes_per_sec, Some(100.0 * 1024.0 * 1024.0));
    assert_eq!(
        CommDelay::parse("1.5s").unwrap().latency,
        Duration::from_millis(1500)
    );
    for bad in [
        "",
        "2",
        "2 parsecs",
        "2ms,",
        "2ms,10",
        "2ms,0GB/s",
        "2ms,1GB/s,3",
    ] {
        let e = CommDelay::parse(bad).unwrap_err().to_string();
        assert!(e.contains("LATENCY[,BANDWIDTH]"), "{bad}: {e}");
    }
}

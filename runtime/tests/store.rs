//! The TCP rendezvous store over 127.0.0.1: operations across threads and clients, and every
//! failure a job meets (timeouts naming key and address, an unreachable store, a port in use, the
//! server going away, a foreign service on the port, absurd lengths).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use vi_runtime::comm::store::{StoreClient, StoreServer, MAGIC, MAX_KEY_LEN, VERSION};
use vi_runtime::comm::Rendezvous;

const T: Duration = Duration::from_secs(5);

fn server() -> (StoreServer, u16) {
    let s = StoreServer::bind("127.0.0.1:0").unwrap();
    let p = s.port();
    assert_ne!(p, 0, "bind reports the real port");
    (s, p)
}

fn client(port: u16) -> StoreClient {
    StoreClient::connect("127.0.0.1", port, T).unwrap()
}

#[test]
fn set_get_add_wait_check_across_clients_and_threads() {
    let (_srv, port) = server();
    let a = client(port);
    a.set("k", b"v1").unwrap();
    assert_eq!(a.get("k", T).unwrap(), b"v1");
    a.set("k", b"").unwrap();
    assert_eq!(a.get("k", T).unwrap(), b"", "empty value replaces");
    assert!(a.check(&["k"]).unwrap());
    assert!(!a.check(&["k", "absent"]).unwrap());

    // Four ranks: each adds to a counter, sets its key, and reads everyone's.
    let world = 4;
    std::thread::scope(|sc| {
        for r in 0..world {
            sc.spawn(move || {
                let c = client(port);
                // Stagger the writers so the readers really block in get/wait.
                std::thread::sleep(Duration::from_millis(20 * r as u64));
                c.add("count", 1).unwrap();
                c.set(&format!("rank/{r}"), format!("addr-{r}").as_bytes())
                    .unwrap();
                let keys: Vec<String> = (0..world).map(|i| format!("rank/{i}")).collect();
                let refs: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
                c.wait(&refs, T).unwrap();
                for i in 0..world {
                    assert_eq!(
                        c.get(&format!("rank/{i}"), T).unwrap(),
                        format!("addr-{i}").as_bytes()
                    );
                }
            });
        }
    });
    assert_eq!(a.add("count", 0).unwrap(), world as i64);
    assert_eq!(a.add("count", -5).unwrap(), -1);
    // A non-counter value is refused, naming the key; the connection stays usable.
    let e = a.add("k", 1).unwrap_err().to_string();
    assert!(e.contains("\"k\"") && e.contains("counter"), "{e}");
    assert_eq!(a.get("rank/2", T).unwrap(), b"addr-2");
}

#[test]
fn blocking_get_wakes_when_another_client_sets() {
    let (_srv, port) = server();
    let reader = client(port);
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            client(port).set("late", b"x").unwrap();
        });
        assert_eq!(reader.get("late", T).unwrap(), b"x");
    });
    assert!(t0.elapsed() < T, "woken by the set, not by the timeout");
}

#[test]
fn get_and_wait_time_out_naming_key_and_address() {
    let (_srv, port) = server();
    let c = client(port);
    let t0 = Instant::now();
    let e = c
        .get("nccl/id", Duration::from_millis(100))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"nccl/id\""), "{e}");
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(100));
    c.set("a", b"1").unwrap();
    let e = c
        .wait(&["a", "b"], Duration::from_millis(50))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"b\"") && e.contains(&format!("127.0.0.1:{port}")),
        "{e}"
    );
    // A timeout is a clean reply: the connection still works.
    assert_eq!(c.get("a", T).unwrap(), b"1");
}

#[test]
fn unreachable_store_fails_within_timeout_naming_address() {
    // A port that was free a moment ago and has nobody listening now.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t0 = Instant::now();
    let e = StoreClient::connect("127.0.0.1", port, Duration::from_millis(300))
        .err()
        .unwrap()
        .to_string();
    let took = t0.elapsed();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(e.contains("unreachable"), "{e}");
    assert!(
        took >= Duration::from_millis(300),
        "retried until the deadline: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "bounded: {took:?}");
}

#[test]
fn connect_retries_until_the_server_starts() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    std::thread::scope(|sc| {
        let h = sc.spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            let s = StoreServer::bind(&format!("127.0.0.1:{port}")).unwrap();
            s.wait_done(1, T).unwrap();
        });
        let c = StoreClient::connect("127.0.0.1", port, T).unwrap();
        c.set("x", b"y").unwrap();
        assert_eq!(c.get("x", T).unwrap(), b"y");
        assert_eq!(c.mark_done().unwrap(), 1);
        h.join().unwrap();
    });
}

#[test]
fn port_in_use_is_a_clear_error() {
    let (_srv, port) = server();
    let addr = format!("127.0.0.1:{port}");
    let e = StoreServer::bind(&addr).err().unwrap().to_string();
    assert!(e.contains(&format!("address {addr} is in use")), "{e}");
    assert!(e.contains("MASTER_PORT"), "{e}");
}

#[test]
fn server_drop_fails_clients_at_once_naming_it() {
    let (srv, port) = server();
    let idle = client(port);
    let blocked = client(port);
    idle.set("k", b"v").unwrap();
    let t0 = Instant::now();
    let e = std::thread::scope(|sc| {
        let h = sc.spawn(|| blocked.get("never", Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(100));
        drop(srv);
        h.join().unwrap()
    })
    .unwrap_err()
    .to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a pending get fails at once"
    );
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("closed"),
        "{e}"
    );
    let e = idle.get("k", T).unwrap_err().to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    // And no new connection reaches it.
    assert!(StoreClient::connect("127.0.0.1", port, Duration::from_millis(100)).is_err());
}

#[test]
fn wait_done_counts_ranks_and_times_out() {
    let (srv, port) = server();
    let c = client(port);
    c.mark_done().unwrap();
    let e = srv
        .wait_done(2, Duration::from_millis(50))
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 of 2"), "{e}");
    client(port).mark_done().unwrap();
    srv.wait_done(2, Duration::from_millis(50)).unwrap();
}

#[test]
fn foreign_peers_and_absurd_lengths_are_refused() {
    // A service that is not a store on the port: the handshake fails, naming the address.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 12];
            s.read_exact(&mut b).unwrap();
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        });
        let e = StoreClient::connect("127.0.0.1", port, Duration::from_millis(500))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("not a"),
            "{e}"
        );
    });

    let (_srv, port) = server();
    // A raw client that announces a 4 GiB key: the server closes the connection instead of
    // allocating, and keeps serving others.
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    raw.write_all(&MAGIC.to_le_bytes()).unwrap();
    raw.write_all(&VERSION.to_le_bytes()).unwrap();
    let mut hs = [0u8; 12];
    raw.read_exact(&mut hs).unwrap();
    raw.write_all(&[1u8]).unwrap(); // SET
    raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(raw.read(&mut buf).unwrap(), 0, "connection closed");

    let c = client(port);
    let long = "k".repeat(MAX_KEY_LEN + 1);
    let e = c.set(&long, b"v").unwrap_err().to_string();
    assert!(e.contains("limit"), "{e}");
    c.set("ok", b"v").unwrap();
    assert_eq!(c.get("ok", T).unwrap(), b"v");
}

#[test]
fn other_protocol_version_is_named() {
    let (_srv, port) = server();
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    raw.write_all(&MAGIC.to_le_bytes()).unwrap();
    raw.write_all(&(VERSION + 1).to_le_bytes()).unwrap();
    let mut hs = [0u8; 12];
    raw.read_exact(&mut hs).unwrap();
    assert_eq!(u32::from_le_bytes(hs[8..].try_into().unwrap()), VERSION);
    let mut buf = [0u8; 1];
    assert_eq!(
        raw.read(&mut buf).unwrap(),
        0,
        "server closes after a version mismatch"
    );
}

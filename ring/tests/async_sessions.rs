//! Async sessions and listeners (the `tokio` feature): data both ways, EOF, errors as in
//! the blocking API, split halves, and cancel safety of read and accept.

mod common;

use ivring::tokio::{AsyncListener, AsyncSession};
use ivring::{doorbell::local, Config, Endpoint, Role, SessionOptions, SharedRegion};
use std::future::Future;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Both sides, up (each has acknowledged the other: a connect made before the guest
/// is up could otherwise meet the start of the link).
fn pair(size: usize) -> (Endpoint, Endpoint) {
    let region = SharedRegion::heap(size);
    let (a, b) = local::pair();
    let cfg = Config {
        peer_timeout: Duration::from_secs(60),
        // Openers may run ahead of a slow acceptor (a loaded machine): a full backlog
        // would refuse them.
        backlog: 1024,
        ..Config::default()
    };
    let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
    let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
    assert!(host.wait_up(Duration::from_secs(20)));
    assert!(guest.wait_up(Duration::from_secs(20)));
    (host, guest)
}

/// A byte pattern that a shifted or dropped byte breaks.
/// No task waited for a callback that ran only after the endpoint's thread slept to its
/// 100 ms limit, and no blocked call slept to its own (`Stats::late_wakeups`; one allowed
/// for a thread preempted that long on a loaded machine).
fn assert_woken_by_events(host: &Endpoint, guest: &Endpoint, what: &str) {
    let (h, g) = (host.stats().late_wakeups, guest.stats().late_wakeups);
    assert!(
        h + g <= 1,
        "{what}: {h} host and {g} guest wakeups came at a 100 ms limit: a wakeup was lost"
    );
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_in_both_roles() {
    let _guard = common::watchdog("echo_in_both_roles", Duration::from_secs(60));
    let (host, guest) = pair(1 << 22);
    let (host, guest) = (Arc::new(host), Arc::new(guest));
    for (server, client) in [(guest.clone(), host.clone()), (host.clone(), guest.clone())] {
        let listener = AsyncListener::bind(&server, 7).unwrap();
        let echo = tokio::spawn(async move {
            let mut s = listener.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let data = pattern(3 << 20, 7);
        let s = AsyncSession::connect(&client, 7).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "echo differs");
        writer.await.unwrap();
        echo.await.unwrap();
    }
    assert_woken_by_events(&host, &guest, "echo in both roles");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_those_of_the_blocking_api() {
    let _guard = common::watchdog(
        "errors_are_those_of_the_blocking_api",
        Duration::from_secs(60),
    );
    let (host, guest) = pair(1 << 20);
    // Nobody listens.
    let e = AsyncSession::connect(&host, 99).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);

    // EOF after the peer's close, then BrokenPipe on write.
    let listener = AsyncListener::bind(&guest, 5).unwrap();
    let mut c = AsyncSession::connect(&host, 5).await.unwrap();
    let mut g = listener.accept().await.unwrap();
    g.write_all(b"bye").await.unwrap();
    drop(g);
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    let e = c.write_all(b"x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe);

    // A waiting read fails with ConnectionReset when the peer's endpoint goes (its
    // session still open: a close would be EOF).
    let mut c = AsyncSession::connect(&host, 5).await.unwrap();
    let g = listener.accept().await.unwrap();
    let reader = tokio::spawn(async move {
        let mut b = [0u8; 16];
        c.read(&mut b).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(guest);
    let _still_open = (g, listener);
    let e = reader.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset);

    // Nobody attached: the connect times out (Config::connect_timeout, shortened).
    let region = SharedRegion::heap(1 << 20);
    let (a, _b) = local::pair();
    let cfg = Config {
        connect_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let lonely = Endpoint::host(region, Arc::new(a), cfg).unwrap();
    let e = AsyncSession::connect(&lonely, 1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_waits_for_the_peer_to_attach() {
    let _guard = common::watchdog(
        "a_connect_waits_for_the_peer_to_attach",
        Duration::from_secs(60),
    );
    let region = SharedRegion::heap(1 << 20);
    let (a, b) = local::pair();
    let host = Endpoint::host(region.clone(), Arc::new(a), Config::default()).unwrap();
    let connect = tokio::spawn(async move {
        let mut s = AsyncSession::connect(&host, 3).await.unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        got
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let guest = Endpoint::unattached(Role::Guest, region, Arc::new(b), Config::default()).unwrap();
    let listener = AsyncListener::bind(&guest, 3).unwrap();
    guest.attach();
    let mut s = listener.accept().await.unwrap();
    s.write_all(b"late but there").await.unwrap();
    drop(s);
    assert_eq!(connect.await.unwrap(), "late but there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_vectored_writes() {
    let _guard = common::watchdog("messages_and_vectored_writes", Duration::from_secs(60));
    let (host, guest) = pair(1 << 20);
    let listener = AsyncListener::bind(&guest, 8).unwrap();
    let opts = SessionOptions { message: true };
    let mut c = AsyncSession::connect_with(&host, 8, opts).await.unwrap();
    let mut g = listener.accept().await.unwrap();
    assert!(g.is_message());
    let parts = [
        std::io::IoSlice::new(b"one "),
        std::io::IoSlice::new(b"message"),
    ];
    let n = c.write_vectored(&parts).await.unwrap();
    assert_eq!(n, 11);
    c.write_all(b"two").await.unwrap();
    let mut b = [0u8; 64];
    let n = g.read(&mut b).await.unwrap();
    assert_eq!(&b[..n], b"one message");
    let n = g.read(&mut b).await.unwrap();
    assert_eq!(&b[..n], b"two");

    // A stream session takes the slices in order.
    let listener = AsyncListener::bind(&guest, 9).unwrap();
    let mut c = AsyncSession::connect(&host, 9).await.unwrap();
    let mut g = listener.accept().await.unwrap();
    let a = pattern(100_000, 1);
    let z = pattern(300_000, 2);
    let writer = tokio::spawn(async move {
        let mut bufs = [std::io::IoSlice::new(&a), std::io::IoSlice::new(&z)];
        let mut slices: &mut [std::io::IoSlice<'_>] = &mut bufs;
        while !slices.is_empty() {
            let n = c.write_vectored(slices).await.unwrap();
            std::io::IoSlice::advance_slices(&mut slices, n);
        }
        c.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    g.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    let mut want = pattern(100_000, 1);
    want.extend(pattern(300_000, 2));
    assert!(got == want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_reunite() {
    let _guard = common::watchdog("halves_reunite", Duration::from_secs(60));
    let (host, guest) = pair(1 << 20);
    let listener = AsyncListener::bind(&guest, 4).unwrap();
    let c = AsyncSession::connect(&host, 4).await.unwrap();
    let mut g = listener.accept().await.unwrap();
    let (r, w) = c.into_split();
    let mut c = r.reunite(w).unwrap();
    c.write_all(b"whole again").await.unwrap();
    let mut b = [0u8; 11];
    g.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"whole again");
}

/// Reads are raced against short timers thousands of times while the peer writes in
/// bursts: every cancelled read must have taken nothing, so the bytes arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_read_loses_no_byte() {
    let _guard = common::watchdog("a_cancelled_read_loses_no_byte", Duration::from_secs(60));
    let (host, guest) = pair(1 << 20);
    let listener = AsyncListener::bind(&guest, 6).unwrap();
    let mut c = AsyncSession::connect(&host, 6).await.unwrap();
    let mut g = listener.accept().await.unwrap();
    let data = pattern(2 << 20, 3);
    let sent = data.clone();
    // Bytes the reader has, for the writer's pauses below.
    let read_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader_has = read_so_far.clone();
    let writer = tokio::spawn(async move {
        let mut written = 0;
        for (i, chunk) in sent.chunks(7919).enumerate() {
            c.write_all(chunk).await.unwrap();
            written += chunk.len();
            if i % 32 == 31 {
                // A pause with nothing left to read: at least the reads waiting through
                // it are cancelled, however far behind a loaded machine kept the reader.
                while reader_has.load(std::sync::atomic::Ordering::Relaxed) < written {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            } else if i % 4 == 0 {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        c.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 4096];
    let mut cancelled = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_micros(50)) => cancelled += 1,
            r = g.read(&mut buf) => match r.unwrap() {
                0 => break,
                n => {
                    got.extend_from_slice(&buf[..n]);
                    read_so_far.store(got.len(), std::sync::atomic::Ordering::Relaxed);
                }
            },
        }
    }
    writer.await.unwrap();
    println!("reads cancelled half way: {cancelled}");
    assert!(
        cancelled > 0,
        "no read was cancelled: the test proves nothing"
    );
    assert_eq!(got.len(), data.len());
    assert!(
        got == data,
        "bytes lost or reordered across cancelled reads"
    );
}

/// Accepts are raced against short timers while the peer opens sessions: every session
/// opened is accepted once, none lost to a cancelled accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_accept_loses_no_session() {
    let _guard = common::watchdog(
        "a_cancelled_accept_loses_no_session",
        Duration::from_secs(60),
    );
    const N: u32 = 200;
    let (host, guest) = pair(1 << 21);
    let listener = AsyncListener::bind(&guest, 2).unwrap();
    let host = Arc::new(host);
    // Kept here: the endpoint must outlive the opener task (its drop resets the link).
    let host2 = host.clone();
    let opener = tokio::spawn(async move {
        let mut held = Vec::new();
        for i in 0..N {
            let mut s = AsyncSession::connect(&host, 2).await.unwrap();
            s.write_all(&i.to_le_bytes()).await.unwrap();
            held.push(s);
            if i % 8 == 0 {
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
        }
        held
    });
    let mut seen = vec![false; N as usize];
    let mut cancelled = 0u64;
    let mut accepted = 0;
    while accepted < N {
        let s = tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_micros(50)) => {
                cancelled += 1;
                continue;
            }
            s = listener.accept() => s.unwrap(),
        };
        let mut s = s;
        let mut b = [0u8; 4];
        if let Err(e) = s.read_exact(&mut b).await {
            panic!("{e}: host {:?} guest {:?}", host2.stats(), guest.stats());
        }
        let i = u32::from_le_bytes(b) as usize;
        assert!(!seen[i], "session {i} accepted twice");
        seen[i] = true;
        accepted += 1;
    }
    let _held = opener.await.unwrap();
    println!("accepts cancelled half way: {cancelled}");
    assert!(
        cancelled > 0,
        "no accept was cancelled: the test proves nothing"
    );
    assert!(seen.iter().all(|&s| s));
}

/// A writer that ran out of credit (the reader is slow) is woken when credit comes: the
/// whole transfer completes with the reader pausing between reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waits_for_credit_and_ring_space() {
    let _guard = common::watchdog(
        "a_writer_waits_for_credit_and_ring_space",
        Duration::from_secs(60),
    );
    let (host, guest) = pair(1 << 18);
    let listener = AsyncListener::bind(&guest, 11).unwrap();
    let mut c = AsyncSession::connect(&host, 11).await.unwrap();
    let mut g = listener.accept().await.unwrap();
    let data = pattern(4 << 20, 9);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        c.write_all(&sent).await.unwrap();
        c.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut reads = 0;
    loop {
        let n = g.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        reads += 1;
        if reads % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    writer.await.unwrap();
    assert!(got == data);
    assert_woken_by_events(&host, &guest, "a writer short of credit and space");
}

/// A cancelled connect withdraws its open: the listener's accepted session reads EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_connect_is_withdrawn() {
    let _guard = common::watchdog("a_cancelled_connect_is_withdrawn", Duration::from_secs(60));
    let (host, guest) = pair(1 << 20);
    let listener = AsyncListener::bind(&guest, 12).unwrap();
    // Dropped after its first poll (the open is out), before and after the peer's answer.
    for answered in [false, true] {
        let mut connect = std::pin::pin!(AsyncSession::connect(&host, 12));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(connect.as_mut().poll(&mut cx).is_pending());
        if answered {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for _ in 0..2 {
        let mut s = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            0,
            "the withdrawn session reads EOF"
        );
    }
    assert_eq!(host.session_count(), 0);
}

/// Blocking and async callers on one endpoint: while a blocking reader waits on another
/// session (and may hold the doorbell), async sessions keep moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_sessions_move_beside_a_blocked_blocking_reader() {
    let _guard = common::watchdog(
        "async_sessions_move_beside_a_blocked_blocking_reader",
        Duration::from_secs(60),
    );
    use std::io::Read;
    let (host, guest) = pair(1 << 20);
    let blocking_listener = guest.listen(20).unwrap();
    let mut blocked = host.connect(20).unwrap();
    let quiet = blocking_listener.accept().unwrap();
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        blocked.read(&mut b)
    });
    std::thread::sleep(Duration::from_millis(50));

    let listener = AsyncListener::bind(&guest, 21).unwrap();
    let mut c = AsyncSession::connect(&host, 21).await.unwrap();
    let mut g = listener.accept().await.unwrap();
    let t = std::time::Instant::now();
    let mut b = [0u8; 64];
    for _ in 0..1000 {
        c.write_all(&b).await.unwrap();
        g.read_exact(&mut b).await.unwrap();
        g.write_all(&b).await.unwrap();
        c.read_exact(&mut b).await.unwrap();
    }
    println!(
        "1000 async round trips beside a blocked reader: {:.1} us each",
        t.elapsed().as_secs_f64() * 1e6 / 1000.0
    );
    drop(quiet);
    assert_eq!(reader.join().unwrap().unwrap(), 0);
    assert_woken_by_events(&host, &guest, "async sessions beside a blocked reader");
}

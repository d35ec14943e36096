//! Socket semantics of [`ivring::Session`] on heap memory, with an in-process doorbell
//! pair: one host and one guest [`Endpoint`] in the same process, threads for concurrency.
//!
//! Timeouts are generous (the machine running these is slow and shared); nothing asserts
//! on speed, only on outcomes and on upper bounds far above the expected time.

mod common;

use ivring::doorbell::local::{self, LocalDoorbell};
use ivring::layout::{GUEST_BLOCK, HOST_BLOCK, MAGIC, PEER_ID_VALID};
use ivring::{Config, Endpoint, LayoutError, Session, SessionOptions, SharedRegion, WaitMode};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// Long enough that only a real hang trips it.
const PATIENCE: Duration = Duration::from_secs(60);

struct Pair {
    region: SharedRegion,
    host: Endpoint,
    guest: Endpoint,
    host_bell: Arc<LocalDoorbell>,
    guest_bell: Arc<LocalDoorbell>,
}

/// Every pair gets a long heartbeat timeout unless a test is about heartbeats: on a
/// loaded two-core machine a keeper can be descheduled for longer than the default second.
fn pair_with(size: usize, mut cfg: Config) -> Pair {
    cfg.peer_timeout = cfg.peer_timeout.max(Duration::from_secs(60));
    let region = SharedRegion::heap(size);
    let (a, b) = local::pair();
    let (host_bell, guest_bell) = (Arc::new(a), Arc::new(b));
    let host = Endpoint::host(region.clone(), host_bell.clone(), cfg.clone())
        .unwrap_or_else(|e| panic!("host: {e}"));
    let guest = Endpoint::guest(region.clone(), guest_bell.clone(), cfg)
        .unwrap_or_else(|e| panic!("guest: {e}"));
    assert!(host.wait_up(PATIENCE), "link never came up");
    assert!(guest.wait_up(PATIENCE), "link never came up");
    Pair {
        region,
        host,
        guest,
        host_bell,
        guest_bell,
    }
}

fn pair() -> Pair {
    pair_with(1 << 20, Config::default())
}

/// Connects host -> guest on `port` (listening first), returning (host end, guest end).
fn connect(p: &Pair, port: u32, opts: SessionOptions) -> (Session, Session) {
    let l = p.guest.listen(port).unwrap();
    let mut h = p.host.connect_with(port, opts).unwrap();
    let mut g = l.accept_timeout(PATIENCE).unwrap();
    for s in [&mut h, &mut g] {
        s.set_read_timeout(Some(PATIENCE));
        s.set_write_timeout(Some(PATIENCE));
    }
    (h, g)
}

/// A byte pattern that differs per stream `tag` and per position.
fn pattern(tag: u64, pos: u64) -> u8 {
    let x = (pos ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0x2545_f491_4f6c_dd1d);
    (x >> 56) as u8
}

fn fill(tag: u64, start: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(tag, start + i as u64);
    }
}

fn bytes(tag: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(tag, 0, &mut v);
    v
}

/// Fletcher-style rolling checksum that notices reordering, not only wrong bytes.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct Sum(u64, u64);

impl Sum {
    fn add(&mut self, buf: &[u8]) {
        for &b in buf {
            self.0 = (self.0 + b as u64) % 0xffff_fffb;
            self.1 = (self.1 + self.0) % 0xffff_fffb;
        }
    }
}

fn read_exact_timeout(s: &mut Session, len: usize) -> Vec<u8> {
    s.set_read_timeout(Some(PATIENCE));
    let mut v = vec![0; len];
    s.read_exact(&mut v).unwrap();
    v
}

#[track_caller]
fn expect_err<T>(r: std::io::Result<T>, kind: ErrorKind) {
    match r {
        Err(e) if e.kind() == kind => {}
        Err(e) => panic!("expected {kind:?}, got {:?}: {e}", e.kind()),
        Ok(_) => panic!("expected {kind:?}, got Ok"),
    }
}

#[test]
fn stream_both_ways_with_checksums() {
    let _guard = common::watchdog("stream_both_ways_with_checksums", Duration::from_secs(60));
    let p = pair();
    let (mut h, mut g) = connect(&p, 1, SessionOptions::default());
    const N: usize = 3 << 20;
    let writer = thread::spawn(move || {
        let data = bytes(1, N);
        let mut sum = Sum::default();
        sum.add(&data);
        // Odd write sizes so frames do not line up with anything.
        for chunk in data.chunks(12_345) {
            h.write_all(chunk).unwrap();
        }
        let back = read_exact_timeout(&mut h, N);
        assert_eq!(back, bytes(2, N), "guest-to-host bytes differ");
        sum
    });
    let got = read_exact_timeout(&mut g, N);
    let mut sum = Sum::default();
    sum.add(&got);
    assert!(got == bytes(1, N), "host-to-guest bytes differ");
    g.write_all(&bytes(2, N)).unwrap();
    assert_eq!(writer.join().unwrap(), sum);
}

#[test]
fn messages_keep_boundaries_and_truncate() {
    let _guard = common::watchdog(
        "messages_keep_boundaries_and_truncate",
        Duration::from_secs(60),
    );
    let cfg = Config {
        buf_size: 64 << 10,
        ..Config::default()
    };
    let p = pair_with(1 << 20, cfg);
    let (mut h, mut g) = connect(&p, 2, SessionOptions { message: true });
    assert!(h.is_message() && g.is_message());
    let max = p.host.max_frame();
    // Sizes around the frame limit, so some messages are carried in several frames.
    let sizes = [1, 7, 16, 100, max - 1, max, max + 1, 64 << 10, 3];
    // More than the receive buffer in all: the writer waits for the reader's credit.
    let writer = thread::spawn(move || {
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(h.write(&bytes(i as u64, n)).unwrap(), n);
        }
        h
    });
    for (i, &n) in sizes.iter().enumerate() {
        let mut buf = vec![0u8; 70 << 10];
        let got = g.read(&mut buf).unwrap();
        assert_eq!(got, n, "message {i} came back with another length");
        assert!(buf[..n] == bytes(i as u64, n)[..], "message {i} differs");
    }
    let mut h = writer.join().unwrap();
    // A short buffer truncates the message and the rest of it is gone (SOCK_SEQPACKET).
    h.write_all(&bytes(10, 1000)).unwrap();
    h.write_all(&bytes(11, 50)).unwrap();
    let mut small = [0u8; 10];
    assert_eq!(g.read(&mut small).unwrap(), 10);
    assert_eq!(small[..], bytes(10, 10)[..]);
    let mut buf = [0u8; 100];
    assert_eq!(g.read(&mut buf).unwrap(), 50, "truncated tail leaked");
    assert_eq!(buf[..50], bytes(11, 50)[..]);
    // The other way, too.
    g.write_all(&bytes(12, 5000)).unwrap();
    let mut buf = vec![0u8; 8000];
    assert_eq!(h.read(&mut buf).unwrap(), 5000);
    assert_eq!(buf[..5000], bytes(12, 5000)[..]);
    // Larger than the peer's receive buffer: refused, and the session still works.
    expect_err(h.write(&vec![0u8; (64 << 10) + 1]), ErrorKind::InvalidInput);
    h.write_all(b"after").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(g.read(&mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"after");
}

#[test]
fn eof_after_shutdown_write_and_other_way_still_works() {
    let _guard = common::watchdog(
        "eof_after_shutdown_write_and_other_way_still_works",
        Duration::from_secs(60),
    );
    let p = pair();
    let (mut h, mut g) = connect(&p, 3, SessionOptions::default());
    h.write_all(&bytes(3, 100_000)).unwrap();
    h.shutdown(Shutdown::Write).unwrap();
    expect_err(h.write(b"x"), ErrorKind::BrokenPipe);
    let mut got = Vec::new();
    g.set_read_timeout(Some(PATIENCE));
    g.read_to_end(&mut got).unwrap();
    assert!(got == bytes(3, 100_000));
    let mut buf = [0u8; 8];
    assert_eq!(g.read(&mut buf).unwrap(), 0, "EOF is not sticky");
    // The guest can still write, and the host still read.
    // Less than the receive buffer (256 KiB), as nobody reads while it is written.
    g.write_all(&bytes(4, 200_000)).unwrap();
    assert!(read_exact_timeout(&mut h, 200_000) == bytes(4, 200_000));
    drop(g);
    let mut rest = Vec::new();
    h.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn eof_then_broken_pipe_after_peer_close() {
    let _guard = common::watchdog(
        "eof_then_broken_pipe_after_peer_close",
        Duration::from_secs(60),
    );
    let p = pair();
    let (mut h, mut g) = connect(&p, 4, SessionOptions::default());
    g.write_all(&bytes(5, 200_000)).unwrap();
    drop(g);
    let mut got = Vec::new();
    h.set_read_timeout(Some(PATIENCE));
    h.read_to_end(&mut got).unwrap();
    assert!(got == bytes(5, 200_000));
    let mut buf = [0u8; 8];
    assert_eq!(h.read(&mut buf).unwrap(), 0);
    expect_err(h.write(b"anyone?"), ErrorKind::BrokenPipe);
    drop(h);
    let deadline = Instant::now() + PATIENCE;
    while p.host.session_count() + p.guest.session_count() != 0 {
        assert!(Instant::now() < deadline, "sessions leaked");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn refused_and_addr_in_use() {
    let _guard = common::watchdog("refused_and_addr_in_use", Duration::from_secs(60));
    let p = pair();
    expect_err(p.host.connect(99), ErrorKind::ConnectionRefused);
    expect_err(p.guest.connect(99), ErrorKind::ConnectionRefused);
    let l = p.guest.listen(5).unwrap();
    expect_err(p.guest.listen(5), ErrorKind::AddrInUse);
    // The same port on the other side is another address.
    let _l2 = p.host.listen(5).unwrap();
    drop(l);
    let _l3 = p.guest.listen(5).unwrap();
    // A dropped listener refuses again.
    drop(_l2);
    expect_err(p.guest.connect(5), ErrorKind::ConnectionRefused);
}

#[test]
fn read_timeout_and_nonblocking() {
    let _guard = common::watchdog("read_timeout_and_nonblocking", Duration::from_secs(60));
    let p = pair();
    let (mut h, mut g) = connect(&p, 6, SessionOptions::default());
    g.set_read_timeout(Some(Duration::from_millis(200)));
    let t = Instant::now();
    let mut buf = [0u8; 16];
    expect_err(g.read(&mut buf), ErrorKind::TimedOut);
    assert!(t.elapsed() >= Duration::from_millis(200));
    g.set_nonblocking(true);
    expect_err(g.read(&mut buf), ErrorKind::WouldBlock);
    let l = p.host.listen(6).unwrap();
    let mut l = l;
    l.set_nonblocking(true);
    expect_err(l.accept(), ErrorKind::WouldBlock);
    expect_err(
        l.accept_timeout(Duration::from_millis(100)),
        ErrorKind::WouldBlock,
    );
    // Data that arrives is then readable without blocking.
    h.write_all(b"ping").unwrap();
    let deadline = Instant::now() + PATIENCE;
    let n = loop {
        match g.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "data never arrived");
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(&buf[..n], b"ping");
}

#[test]
fn thousand_sessions_in_turn() {
    let _guard = common::watchdog("thousand_sessions_in_turn", Duration::from_secs(60));
    let p = pair();
    let l = p.guest.listen(7).unwrap();
    for i in 0..1000u64 {
        let mut h = p.host.connect(7).unwrap();
        let mut g = l.accept_timeout(PATIENCE).unwrap();
        let len = 1 + (i as usize * 37) % 3000;
        h.write_all(&bytes(i, len)).unwrap();
        assert!(
            read_exact_timeout(&mut g, len) == bytes(i, len),
            "session {i}"
        );
        g.write_all(&bytes(i + 5000, 17)).unwrap();
        assert!(read_exact_timeout(&mut h, 17) == bytes(i + 5000, 17));
        if i % 2 == 0 {
            drop(h);
            drop(g);
        } else {
            drop(g);
            drop(h);
        }
    }
    let deadline = Instant::now() + PATIENCE;
    while p.host.session_count() + p.guest.session_count() != 0 {
        assert!(Instant::now() < deadline, "sessions leaked");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hundred_sessions_at_once() {
    let _guard = common::watchdog("hundred_sessions_at_once", Duration::from_secs(60));
    let p = pair();
    let lg = p.guest.listen(8).unwrap();
    let lh = p.host.listen(9).unwrap();
    let mut pairs = Vec::new();
    for i in 0..100u64 {
        // Half opened by each side.
        if i % 2 == 0 {
            let h = p.host.connect(8).unwrap();
            pairs.push((h, lg.accept_timeout(PATIENCE).unwrap()));
        } else {
            let g = p.guest.connect(9).unwrap();
            pairs.push((lh.accept_timeout(PATIENCE).unwrap(), g));
        }
    }
    assert_eq!(p.host.session_count(), 100);
    let (hs, gs): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    const LEN: usize = 20_000;
    let host_side = thread::spawn(move || {
        let mut hs = hs;
        for (i, h) in hs.iter_mut().enumerate() {
            h.write_all(&bytes(i as u64, LEN)).unwrap();
        }
        for (i, h) in hs.iter_mut().enumerate().rev() {
            assert!(
                read_exact_timeout(h, LEN) == bytes(1000 + i as u64, LEN),
                "g->h {i}"
            );
        }
    });
    let mut gs = gs;
    for (i, g) in gs.iter_mut().enumerate() {
        g.write_all(&bytes(1000 + i as u64, LEN)).unwrap();
    }
    for (i, g) in gs.iter_mut().enumerate().rev() {
        assert!(
            read_exact_timeout(g, LEN) == bytes(i as u64, LEN),
            "h->g {i}"
        );
    }
    host_side.join().unwrap();
}

#[test]
fn large_transfer_wraps_small_ring() {
    let _guard = common::watchdog("large_transfer_wraps_small_ring", Duration::from_secs(60));
    // 64 KiB region: about 30 KiB per ring, so 64 MiB wraps it some 2000 times.
    let p = pair_with(64 << 10, Config::default());
    let (mut h, mut g) = connect(&p, 10, SessionOptions::default());
    const TOTAL: u64 = 64 << 20;
    let writer = thread::spawn(move || {
        let mut sum = Sum::default();
        let mut buf = vec![0u8; 20_000];
        let mut pos = 0u64;
        let mut step = 0usize;
        while pos < TOTAL {
            // Varying sizes (not multiples of 16) so records end everywhere and padding
            // records are needed at the ring's end.
            let n = (1 + (step * 7919) % buf.len()).min((TOTAL - pos) as usize);
            fill(10, pos, &mut buf[..n]);
            sum.add(&buf[..n]);
            h.write_all(&buf[..n]).unwrap();
            pos += n as u64;
            step += 1;
        }
        h.shutdown(Shutdown::Write).unwrap();
        (sum, h)
    });
    g.set_read_timeout(Some(PATIENCE));
    let mut sum = Sum::default();
    let mut buf = vec![0u8; 9_999];
    let mut pos = 0u64;
    let mut expect = vec![0u8; buf.len()];
    loop {
        let n = g.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        fill(10, pos, &mut expect[..n]);
        assert!(buf[..n] == expect[..n], "bytes differ near offset {pos}");
        sum.add(&buf[..n]);
        pos += n as u64;
    }
    let (wsum, _h) = writer.join().unwrap();
    assert_eq!(pos, TOTAL);
    assert_eq!(sum, wsum);
    assert_eq!(p.host.stats().corruptions + p.guest.stats().corruptions, 0);
}

#[test]
fn stalled_reader_does_not_stall_others() {
    let _guard = common::watchdog(
        "stalled_reader_does_not_stall_others",
        Duration::from_secs(60),
    );
    let cfg = Config {
        buf_size: 128 << 10,
        ..Config::default()
    };
    // Small ring: session A's unread bytes are far more than the ring holds.
    let p = pair_with(64 << 10, cfg);
    let l = p.guest.listen(11).unwrap();
    let mut a = p.host.connect(11).unwrap();
    let mut a_reader = l.accept_timeout(PATIENCE).unwrap();
    let (mut b, mut b_reader) = (
        p.host.connect(11).unwrap(),
        l.accept_timeout(PATIENCE).unwrap(),
    );
    // Fill A until its credit runs out; nobody reads it.
    a.set_nonblocking(true);
    let mut a_sent = 0usize;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let chunk = bytes(20, a_sent + 4096);
        match a.write(&chunk[a_sent..]) {
            Ok(n) => a_sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if a_sent >= 128 << 10 {
                    break;
                }
                assert!(Instant::now() < deadline, "A never got its credit");
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("A: {:?} {e}", e.kind()),
        }
    }
    assert_eq!(a_sent, 128 << 10, "A sent past its credit");
    // Session B moves 16 MiB meanwhile.
    const B: usize = 16 << 20;
    let writer = thread::spawn(move || {
        let data = bytes(21, B);
        for c in data.chunks(50_000) {
            b.write_all(c).unwrap();
        }
        b
    });
    let got = read_exact_timeout(&mut b_reader, B);
    assert!(got == bytes(21, B), "B's bytes differ");
    let _b = writer.join().unwrap();
    // A's bytes were kept all along.
    assert!(read_exact_timeout(&mut a_reader, a_sent) == bytes(20, a_sent));
}

#[test]
fn peer_restart_resets_old_sessions_and_leaks_nothing() {
    let _guard = common::watchdog(
        "peer_restart_resets_old_sessions_and_leaks_nothing",
        Duration::from_secs(60),
    );
    let p = pair();
    let Pair {
        region,
        host,
        guest,
        guest_bell,
        ..
    } = p;
    let lg = guest.listen(12).unwrap();
    let lh = host.listen(13).unwrap();
    let mut h = host.connect(12).unwrap();
    let mut g = lg.accept_timeout(PATIENCE).unwrap();
    h.set_write_timeout(Some(PATIENCE));
    // Another old session, opened by the guest, idle.
    let g2 = guest.connect(13).unwrap();
    let mut h2 = lh.accept_timeout(PATIENCE).unwrap();
    // Host writes pattern 0x01... continuously; the guest reads some, then restarts.
    let (tx, rx) = mpsc::channel();
    let writer = thread::spawn(move || {
        let mut pos = 0u64;
        let mut buf = vec![0u8; 10_000];
        loop {
            fill(100, pos, &mut buf);
            match h.write(&buf) {
                Ok(n) => pos += n as u64,
                Err(e) => return (e.kind(), h),
            }
        }
    });
    let reader = thread::spawn(move || {
        let mut got = 0usize;
        let mut buf = vec![0u8; 10_000];
        g.set_read_timeout(Some(PATIENCE));
        loop {
            match g.read(&mut buf) {
                Ok(0) => return ErrorKind::UnexpectedEof,
                Ok(n) => {
                    got += n;
                    if got >= 1 << 20 {
                        let _ = tx.send(());
                    }
                }
                Err(e) => return e.kind(),
            }
        }
    });
    rx.recv_timeout(PATIENCE).expect("no data flowed");
    drop(lg);
    drop(guest);
    drop(g2);
    let cfg = Config {
        peer_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let guest =
        Endpoint::guest(region.clone(), guest_bell.clone(), cfg).unwrap_or_else(|e| panic!("{e}"));
    let (kind, mut h) = writer.join().unwrap();
    assert_eq!(kind, ErrorKind::ConnectionReset, "old writer");
    let rk = reader.join().unwrap();
    assert!(
        matches!(rk, ErrorKind::ConnectionReset | ErrorKind::NotConnected),
        "old reader got {rk:?}"
    );
    let mut buf = [0u8; 4];
    expect_err(h.read(&mut buf), ErrorKind::ConnectionReset);
    expect_err(h.write(b"x"), ErrorKind::ConnectionReset);
    expect_err(h2.read(&mut buf), ErrorKind::ConnectionReset);
    expect_err(h2.shutdown(Shutdown::Write), ErrorKind::ConnectionReset);
    assert!(host.stats().link_resets >= 1);

    // New sessions both ways on the same region: only their own bytes arrive.
    assert!(guest.wait_up(PATIENCE));
    let lg = guest.listen(12).unwrap();
    let mut nh = host.connect(12).unwrap();
    let mut ng = lg.accept_timeout(PATIENCE).unwrap();
    nh.write_all(&bytes(200, 200_000)).unwrap();
    assert!(read_exact_timeout(&mut ng, 200_000) == bytes(200, 200_000));
    ng.set_nonblocking(true);
    expect_err(ng.read(&mut buf), ErrorKind::WouldBlock);
    let mut g3 = guest
        .connect(13)
        .expect("the restarted guest can open a session to the host");
    let mut h3 = lh.accept_timeout(PATIENCE).unwrap();
    g3.write_all(&bytes(300, 100_000)).unwrap();
    assert!(read_exact_timeout(&mut h3, 100_000) == bytes(300, 100_000));
    h3.set_nonblocking(true);
    expect_err(h3.read(&mut buf), ErrorKind::WouldBlock);
}

#[test]
fn peer_gone_resets_promptly() {
    let _guard = common::watchdog("peer_gone_resets_promptly", Duration::from_secs(60));
    // Only the ivshmem server's word may end this link, not the heartbeat.
    let cfg = Config {
        peer_timeout: Duration::from_secs(3600),
        ..Config::default()
    };
    let p = pair_with(1 << 20, cfg);
    let (mut h, _g) = connect(&p, 14, SessionOptions::default());
    let reader = thread::spawn(move || {
        h.set_read_timeout(Some(PATIENCE));
        let mut buf = [0u8; 16];
        let t = Instant::now();
        (h.read(&mut buf).map_err(|e| e.kind()), t.elapsed())
    });
    thread::sleep(Duration::from_millis(100));
    p.guest_bell.set_present(false);
    let (r, took) = reader.join().unwrap();
    assert_eq!(r, Err(ErrorKind::ConnectionReset));
    // "Promptly": well inside the (huge) heartbeat timeout; generous for a loaded machine.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(p.host.stats().link_resets >= 1);
    let _ = &p.host_bell;
}

/// Side-block word offsets (layout.rs `side`, PROTOCOL.md §1).
const EPOCH: usize = 0;
const PEER_ID: usize = 8;
const HEARTBEAT: usize = 16;
const ACK: usize = 24;

/// A "guest" side block written by hand: attached with epoch 5, acknowledging the host's
/// current epoch, then never touched again (or beaten by hand). Returns once the host
/// has the link up.
fn fake_guest(region: &SharedRegion, host: &Endpoint) {
    let w = |off, v| region.store_u64(GUEST_BLOCK + off, v, Ordering::SeqCst);
    w(PEER_ID, PEER_ID_VALID | 1);
    w(HEARTBEAT, 1);
    w(ACK, region.load_u64(HOST_BLOCK + EPOCH, Ordering::SeqCst));
    w(EPOCH, 5);
    assert!(
        host.wait_up(Duration::from_secs(20)),
        "the fake guest did not look attached"
    );
}

#[test]
fn frozen_peer_is_declared_gone_after_peer_timeout() {
    let _guard = common::watchdog(
        "frozen_peer_is_declared_gone_after_peer_timeout",
        Duration::from_secs(60),
    );
    let region = SharedRegion::heap(1 << 20);
    let (a, _b) = local::pair();
    let cfg = Config {
        heartbeat: Duration::from_millis(50),
        peer_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
    let start = Instant::now();
    fake_guest(&region, &host);
    while host.is_up() {
        assert!(
            start.elapsed() < cfg.peer_timeout + Duration::from_secs(20),
            "a frozen peer was never declared gone"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let took = start.elapsed();
    assert!(took >= cfg.peer_timeout, "declared gone early: {took:?}");
    let st = host.stats();
    assert!(st.link_resets >= 1);
    assert!(
        st.last_error.as_deref().unwrap_or("").contains("heartbeat"),
        "{st:?}"
    );
}

#[test]
fn beating_peer_is_not_declared_gone() {
    let _guard = common::watchdog("beating_peer_is_not_declared_gone", Duration::from_secs(60));
    let region = SharedRegion::heap(1 << 20);
    let (a, _b) = local::pair();
    let cfg = Config {
        heartbeat: Duration::from_millis(50),
        peer_timeout: Duration::from_secs(2),
        ..Config::default()
    };
    let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
    fake_guest(&region, &host);
    // A slow peer: beats well inside the timeout, for several timeouts.
    let start = Instant::now();
    let mut beat = 1;
    while start.elapsed() < Duration::from_secs(6) {
        thread::sleep(Duration::from_millis(200));
        beat += 1;
        region.store_u64(GUEST_BLOCK + HEARTBEAT, beat, Ordering::SeqCst);
        assert!(host.is_up(), "a live peer was declared gone");
    }
    assert_eq!(host.stats().link_resets, 0);
}

#[test]
fn layout_errors() {
    let _guard = common::watchdog("layout_errors", Duration::from_secs(60));
    let err = |r: Result<Endpoint, LayoutError>| match r {
        Ok(_) => panic!("expected a layout error"),
        Err(e) => e,
    };
    let bell = || -> Arc<LocalDoorbell> { Arc::new(local::pair().0) };
    for size in [4096usize, 32 << 10, 96 << 10, (64 << 10) + 8] {
        let r = SharedRegion::heap(size);
        assert_eq!(
            err(Endpoint::host(r.clone(), bell(), Config::default())),
            LayoutError::BadSize(size as u64)
        );
        assert_eq!(
            err(Endpoint::guest(r, bell(), Config::default())),
            LayoutError::BadSize(size as u64)
        );
    }
    // Nobody repairs these: reported after Config::layout_wait.
    let short = Config {
        layout_wait: Duration::from_millis(200),
        ..Config::default()
    };
    let r = SharedRegion::heap(64 << 10);
    r.store_u64(0, 0xdead_beef, Ordering::SeqCst);
    let start = Instant::now();
    assert_eq!(
        err(Endpoint::guest(r, bell(), short.clone())),
        LayoutError::BadMagic(0xdead_beef)
    );
    assert!(start.elapsed() >= short.layout_wait);
    let r = SharedRegion::heap(64 << 10);
    r.store_u64(8, 2 | 4096 << 32, Ordering::SeqCst);
    r.store_u64(0, MAGIC, Ordering::SeqCst);
    assert_eq!(
        err(Endpoint::guest(r, bell(), short)),
        LayoutError::BadVersion(2)
    );
    // A zeroed region is fine for a guest: it waits for the host.
    let g = Endpoint::guest(SharedRegion::heap(64 << 10), bell(), Config::default());
    assert!(g.is_ok());
    assert!(!g.unwrap().is_up());
}

/// After `shutdown(Read)` arriving data is dropped, and still credited: the writer never
/// stalls (PROTOCOL.md §7).
#[test]
fn shutdown_read_keeps_crediting_the_writer() {
    let _guard = common::watchdog(
        "shutdown_read_keeps_crediting_the_writer",
        Duration::from_secs(60),
    );
    let cfg = Config {
        buf_size: 8 << 10,
        ..Config::default()
    };
    let p = pair_with(1 << 20, cfg);
    let (mut h, mut g) = connect(&p, 11, SessionOptions::default());
    g.shutdown(std::net::Shutdown::Read).unwrap();
    // Sixteen times the receive buffer: impossible without credit coming back.
    let chunk = vec![9u8; 4096];
    for _ in 0..32 {
        h.write_all(&chunk).unwrap();
    }
    let mut b = [0u8; 8];
    assert_eq!(
        g.read(&mut b).unwrap(),
        0,
        "reads after shutdown(Read) see EOF"
    );
    // The other direction still works.
    g.write_all(b"still here").unwrap();
    assert_eq!(read_exact_timeout(&mut h, 10), b"still here");
}

/// Every wait mode, with more blocked threads than sessions can share a doorbell: round
/// trips on some sessions, one-way streams on others, accepts in between. In block and
/// adaptive mode one blocked caller at a time waits on the doorbell for everyone (the
/// rest sleep on condvars); any lost hand-off shows as a hang or wrong bytes here.
#[test]
fn every_wait_mode_carries_many_sessions() {
    let _guard = common::watchdog(
        "every_wait_mode_carries_many_sessions",
        Duration::from_secs(60),
    );
    for wait in [WaitMode::Block, WaitMode::Adaptive, WaitMode::Poll] {
        let cfg = Config {
            wait,
            buf_size: 16 << 10,
            ..Config::default()
        };
        let p = pair_with(256 << 10, cfg);
        let listener = Arc::new(p.guest.listen(40).unwrap());
        let served = {
            let listener = listener.clone();
            thread::spawn(move || {
                let mut servers = Vec::new();
                for _ in 0..8 {
                    let mut g = listener.accept_timeout(PATIENCE).unwrap();
                    g.set_read_timeout(Some(PATIENCE));
                    g.set_write_timeout(Some(PATIENCE));
                    // Echo until EOF: round trips and streams alike come back whole.
                    servers.push(thread::spawn(move || {
                        let mut buf = [0u8; 3000];
                        let mut total = 0u64;
                        loop {
                            let n = g.read(&mut buf).unwrap();
                            if n == 0 {
                                return total;
                            }
                            g.write_all(&buf[..n]).unwrap();
                            total += n as u64;
                        }
                    }));
                }
                servers.into_iter().map(|t| t.join().unwrap()).sum::<u64>()
            })
        };
        let clients: Vec<_> = (0..8u8)
            .map(|i| {
                let mut h = p.host.connect(40).unwrap();
                h.set_read_timeout(Some(PATIENCE));
                h.set_write_timeout(Some(PATIENCE));
                thread::spawn(move || {
                    let mut sent = 0u64;
                    let mut back = vec![0u8; 5000];
                    for round in 0..200u32 {
                        // Odd sessions ask one small question at a time; even ones send
                        // a third of the receive buffer, which the echo returns in parts.
                        let len = if i % 2 == 1 { 64 } else { 5000 };
                        let msg: Vec<u8> = (0..len)
                            .map(|k| (k as u32 ^ round ^ u32::from(i) << 8) as u8)
                            .collect();
                        h.write_all(&msg).unwrap();
                        h.read_exact(&mut back[..len]).unwrap();
                        assert_eq!(&back[..len], &msg[..], "{wait:?} session {i} round {round}");
                        sent += len as u64;
                    }
                    h.shutdown(Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    h.read_to_end(&mut rest).unwrap();
                    assert!(rest.is_empty());
                    sent
                })
            })
            .collect();
        let sent: u64 = clients.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(served.join().unwrap(), sent, "{wait:?}");
    }
}

/// Many writers on a ring far smaller than their credit: they wait for ring space, not
/// credit, and are handed the space one at a time. Every byte arrives, in order, on its
/// own session, in every wait mode.
#[test]
fn writers_share_a_full_ring() {
    let _guard = common::watchdog("writers_share_a_full_ring", Duration::from_secs(60));
    for wait in [WaitMode::Block, WaitMode::Adaptive, WaitMode::Poll] {
        let cfg = Config {
            wait,
            buf_size: 256 << 10,
            ..Config::default()
        };
        let p = pair_with(64 << 10, cfg);
        let listener = p.guest.listen(41).unwrap();
        const SESSIONS: u8 = 16;
        const BYTES: usize = 300 << 10;
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for i in 0..SESSIONS {
            let mut h = p.host.connect(41).unwrap_or_else(|e| {
                use ivring::layout::{side, HOST_BLOCK};
                let r = |b: usize, w: usize| p.region.load_u64(b + w, Ordering::SeqCst);
                panic!(
                    "{wait:?} connect {i}: {e}; host head {} guest tail {} host need_space {} guest need_wakeup {} | guest head {} host tail {} guest need_space {} host need_wakeup {}",
                    r(HOST_BLOCK, side::TX_HEAD), r(GUEST_BLOCK, side::RX_TAIL), r(HOST_BLOCK, side::TX_NEED_SPACE), r(GUEST_BLOCK, side::RX_NEED_WAKEUP),
                    r(GUEST_BLOCK, side::TX_HEAD), r(HOST_BLOCK, side::RX_TAIL), r(GUEST_BLOCK, side::TX_NEED_SPACE), r(HOST_BLOCK, side::RX_NEED_WAKEUP),
                )
            });
            let mut g = listener.accept_timeout(PATIENCE).unwrap();
            for s in [&mut h, &mut g] {
                s.set_read_timeout(Some(PATIENCE));
                s.set_write_timeout(Some(PATIENCE));
            }
            let data: Vec<u8> = (0..BYTES)
                .map(|k| (k / 7) as u8 ^ i.wrapping_mul(37))
                .collect();
            let expect = data.clone();
            writers.push(thread::spawn(move || {
                for chunk in data.chunks(3000) {
                    h.write_all(chunk).unwrap();
                }
            }));
            readers.push(thread::spawn(move || {
                let mut got = Vec::with_capacity(BYTES);
                let mut buf = [0u8; 5000];
                while got.len() < BYTES {
                    let n = g.read(&mut buf).unwrap();
                    assert!(n > 0, "{wait:?} session {i}: EOF after {} bytes", got.len());
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got == expect, "{wait:?} session {i}: bytes differ");
            }));
        }
        for t in writers.into_iter().chain(readers) {
            t.join().unwrap();
        }
        assert_woken_by_events(&p, &format!("{wait:?}: writers sharing a full ring"));
    }
}

/// An event loop's `read_any` takes frames of sessions outside its set from the ring on
/// the way to its own, buffering them: it must wake their readers, which sleep on their
/// sessions' stripes while the event loop waits on the doorbell (nobody else pumps those
/// frames, so nobody else would wake them).
#[test]
fn read_any_wakes_the_readers_of_the_frames_it_passes() {
    let _guard = common::watchdog(
        "read_any_wakes_the_readers_of_the_frames_it_passes",
        Duration::from_secs(60),
    );
    let cfg = Config {
        wait: WaitMode::Block,
        heartbeat: Duration::from_millis(20),
        ..Config::default()
    };
    let p = pair_with(1 << 20, cfg);
    let listener = p.guest.listen(43).unwrap();
    let mut host_sides = Vec::new();
    let mut guest_sides = Vec::new();
    for _ in 0..2 {
        host_sides.push(p.host.connect(43).unwrap());
        guest_sides.push(listener.accept_timeout(PATIENCE).unwrap());
    }
    let (mut in_set, mut other) = (&host_sides[0], &host_sides[1]);
    let mut read = guest_sides.pop().unwrap();
    let looped = guest_sides.pop().unwrap();
    read.set_read_timeout(Some(PATIENCE));
    let read = &read;
    for round in 0..5 {
        thread::scope(|t| {
            let event_loop = t.spawn(|| {
                let mut buf = [0u8; 16];
                Session::read_any(&[&looped], &mut buf, Some(PATIENCE))
            });
            // The event loop takes the doorbell within a few of the keeper's rounds.
            thread::sleep(Duration::from_millis(150));
            let reader = t.spawn(move || {
                let mut buf = [0u8; 16];
                let mut read = read;
                read.read(&mut buf)
            });
            thread::sleep(Duration::from_millis(50));
            other.write_all(b"b").unwrap();
            in_set.write_all(b"a").unwrap();
            let (i, r) = event_loop.join().unwrap().unwrap();
            assert_eq!((i, r.unwrap()), (0, 1), "round {round}");
            assert_eq!(reader.join().unwrap().unwrap(), 1, "round {round}");
        });
    }
    assert_woken_by_events(&p, "readers of frames read_any passed");
}

/// Asserts that the pair's blocked calls were woken by what they waited for, not by
/// their 100 ms safety limit ([`ivring::Stats::late_wakeups`]). A lost wakeup leaves
/// every stripe sleeper or space waiter behind it waiting out that limit, dozens of times
/// in these tests; one is allowed, for a notifier preempted for 100 ms on a loaded
/// machine between making data ready and waking its reader.
fn assert_woken_by_events(p: &Pair, what: &str) {
    let (h, g) = (p.host.stats().late_wakeups, p.guest.stats().late_wakeups);
    assert!(
        h + g <= 1,
        "{what}: {h} host and {g} guest calls slept to their limit and then found what \
         they waited for: a wakeup was lost"
    );
}

/// Blocked callers sleep on the doorbell (one of them) or on their session's stripe (the
/// others) and each is woken by its event: data, a listener's connection, EOF. Six
/// sessions echo 40 rounds each, every thread blocked in `read` between rounds, so that
/// the thread on the doorbell keeps waking the others.
#[test]
fn blocked_callers_are_woken_by_their_events_not_their_limit() {
    let _guard = common::watchdog(
        "blocked_callers_are_woken_by_their_events_not_their_limit",
        Duration::from_secs(60),
    );
    let cfg = Config {
        wait: WaitMode::Block,
        ..Config::default()
    };
    let p = pair_with(1 << 20, cfg);
    const SESSIONS: u64 = 6;
    const ROUNDS: u64 = 40;
    let listener = Arc::new(p.guest.listen(77).unwrap());
    // The guest's echo threads wait in accept first: a connection must wake them.
    let echoes: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let l = listener.clone();
            thread::spawn(move || {
                let mut g = l.accept_timeout(PATIENCE).unwrap();
                g.set_read_timeout(Some(PATIENCE));
                let mut buf = [0u8; 64];
                loop {
                    let n = g.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    g.write_all(&buf[..n]).unwrap();
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(20));
    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let mut h = p.host.connect(77).unwrap();
            h.set_read_timeout(Some(PATIENCE));
            thread::spawn(move || {
                for r in 0..ROUNDS {
                    let msg = [(i * ROUNDS + r) as u8; 48];
                    h.write_all(&msg).unwrap();
                    let got = read_exact_timeout(&mut h, msg.len());
                    assert_eq!(got, msg, "session {i} round {r}: the echo differs");
                }
                h.shutdown(Shutdown::Write).unwrap();
            })
        })
        .collect();
    for t in clients.into_iter().chain(echoes) {
        t.join().unwrap();
    }
    assert_woken_by_events(&p, "echo rounds in block mode");
}

/// A stream write that finds a thread waiting for the lock leaves the ring's head to it
/// (one store for many frames), and whoever releases the lock with nobody waiting
/// publishes: when the writers all stop at once, after rounds of 4 KiB writes contended
/// by each other and by threads that only take the lock, every frame of every round must
/// still be published. A frame left behind is never read (nothing else moves that
/// head), and its reader times out.
#[test]
fn writers_that_stop_together_leave_no_frame_unpublished() {
    let _guard = common::watchdog(
        "writers_that_stop_together_leave_no_frame_unpublished",
        Duration::from_secs(120),
    );
    for wait in [WaitMode::Block, WaitMode::Adaptive, WaitMode::Poll] {
        let cfg = Config {
            wait,
            ..Config::default()
        };
        let p = pair_with(4 << 20, cfg);
        let listener = p.guest.listen(43).unwrap();
        const SESSIONS: usize = 12;
        const ROUNDS: usize = 40;
        const FRAMES: usize = 3;
        const LEN: usize = 4096;
        let start = Arc::new(std::sync::Barrier::new(SESSIONS));
        let mut threads = Vec::new();
        for i in 0..SESSIONS {
            let mut h = p.host.connect(43).unwrap();
            let mut g = listener.accept_timeout(PATIENCE).unwrap();
            // Short enough to fail in seconds, long enough for a loaded machine.
            g.set_read_timeout(Some(Duration::from_secs(20)));
            h.set_write_timeout(Some(PATIENCE));
            let start = start.clone();
            let (done_tx, done_rx) = mpsc::channel::<()>();
            threads.push(thread::spawn(move || {
                let chunk = bytes(i as u64, LEN);
                for _ in 0..ROUNDS {
                    start.wait();
                    for _ in 0..FRAMES {
                        h.write_all(&chunk).unwrap();
                    }
                    // The next round starts only once every reader has every byte.
                    done_rx.recv().unwrap();
                }
                h
            }));
            threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; FRAMES * LEN];
                for round in 0..ROUNDS {
                    g.read_exact(&mut buf).unwrap_or_else(|e| {
                        panic!("{wait:?} session {i} round {round}: {e} (a frame unpublished)")
                    });
                    assert!(buf.chunks(LEN).all(|c| c == bytes(i as u64, LEN)));
                    done_tx.send(()).unwrap();
                }
                g
            }));
        }
        // Threads that only take the lock and let it go: the writers often find one of
        // them waiting, and leave the head to it.
        let stop = std::sync::atomic::AtomicBool::new(false);
        thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::black_box(p.host.stats());
                    }
                });
            }
            // Stops the lookers however the joins end (a reader that timed out panics).
            struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = StopOnDrop(&stop);
            for t in threads {
                let _ = t.join().unwrap();
            }
        });
    }
}

/// A non-blocking writer that found the ring full (of another session's frames, so no
/// frame of its own will come back) is told when the space returns.
#[test]
fn nonblocking_writer_is_notified_when_ring_space_returns() {
    let _guard = common::watchdog(
        "nonblocking_writer_is_notified_when_ring_space_returns",
        Duration::from_secs(60),
    );
    let cfg = Config {
        wait: WaitMode::Block,
        buf_size: 1 << 20,
        ..Config::default()
    };
    let p = pair_with(64 << 10, cfg);
    let (mut hy, mut gy) = connect(&p, 1, SessionOptions::default());
    let (mut hx, _gx) = connect(&p, 2, SessionOptions::default());
    // Y's in-place reader holds its first frame: nothing behind it leaves the ring.
    gy.set_nonblocking(true);
    expect_err(gy.recv_in_place().map(|_| ()), ErrorKind::WouldBlock);
    gy.set_nonblocking(false);
    hy.write_all(b"y").unwrap();
    let view = gy.recv_in_place().unwrap().expect("a frame");
    assert!(view.is_in_place(), "the first frame must stay in the ring");
    hy.set_nonblocking(true);
    let chunk = vec![7u8; 1024];
    let mut queued = 0usize;
    loop {
        match hy.write(&chunk) {
            Ok(n) => queued += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("Y write: {e}"),
        }
        assert!(queued < 1 << 20, "the ring never filled");
    }
    let ready = ivring::Readiness::new();
    hx.set_notify(ready.notifier()).unwrap();
    hx.set_nonblocking(true);
    ready.take();
    expect_err(hx.write(&chunk), ErrorKind::WouldBlock);
    drop(view);
    assert!(
        ready.wait(Duration::from_secs(20)),
        "X was never told that ring space came back"
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        match hx.write(&chunk) {
            Ok(n) => {
                assert_eq!(n, chunk.len());
                break;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "X never got ring space");
                ready.wait(Duration::from_millis(50));
            }
            Err(e) => panic!("X write: {e}"),
        }
    }
    // Y's bytes all arrive.
    gy.set_nonblocking(false);
    assert_eq!(read_exact_timeout(&mut gy, queued), vec![7u8; queued]);
}

/// One thread writes and one thread reads many non-blocking sessions, each loop waiting
/// on a single `Readiness` when every session would block, on a ring far smaller than
/// the sessions' credit: every byte arrives in order and no wait goes unanswered.
#[test]
fn one_thread_drives_many_nonblocking_sessions() {
    let _guard = common::watchdog(
        "one_thread_drives_many_nonblocking_sessions",
        Duration::from_secs(60),
    );
    const SESSIONS: usize = 24;
    const BYTES: usize = 96 << 10;
    for wait in [WaitMode::Block, WaitMode::Adaptive, WaitMode::Poll] {
        let cfg = Config {
            wait,
            buf_size: 16 << 10,
            ..Config::default()
        };
        let p = pair_with(64 << 10, cfg);
        let (mut hs, mut gs): (Vec<Session>, Vec<Session>) = (0..SESSIONS)
            .map(|i| connect(&p, 100 + i as u32, SessionOptions::default()))
            .unzip();
        let (hr, gr) = (ivring::Readiness::new(), ivring::Readiness::new());
        for s in &mut hs {
            s.set_notify(hr.notifier()).unwrap();
            s.set_nonblocking(true);
        }
        for s in &mut gs {
            s.set_notify(gr.notifier()).unwrap();
            s.set_nonblocking(true);
        }
        let writer = thread::spawn(move || {
            let mut sent = [0usize; SESSIONS];
            let mut buf = vec![0u8; 3000];
            while sent.iter().any(|&n| n < BYTES) {
                hr.take();
                let mut moved = false;
                for (i, s) in hs.iter_mut().enumerate() {
                    while sent[i] < BYTES {
                        let len = buf.len().min(BYTES - sent[i]);
                        fill(i as u64, sent[i] as u64, &mut buf[..len]);
                        match s.write(&buf[..len]) {
                            Ok(n) => {
                                sent[i] += n;
                                moved = true;
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) => panic!("{wait:?}: write {i}: {e}"),
                        }
                    }
                    if sent[i] == BYTES {
                        s.shutdown(Shutdown::Write).unwrap();
                        sent[i] += 1; // shut once
                    }
                }
                if !moved {
                    assert!(hr.wait(PATIENCE), "{wait:?}: writer never woken");
                }
            }
            hs
        });
        let mut got = vec![0usize; SESSIONS];
        let mut done = [false; SESSIONS];
        let mut buf = vec![0u8; 5000];
        let mut want = vec![0u8; 5000];
        while done.iter().any(|d| !d) {
            gr.take();
            let mut moved = false;
            for (i, s) in gs.iter_mut().enumerate() {
                while !done[i] {
                    match s.read(&mut buf) {
                        Ok(0) => done[i] = true,
                        Ok(n) => {
                            fill(i as u64, got[i] as u64, &mut want[..n]);
                            assert!(buf[..n] == want[..n], "{wait:?}: session {i} corrupt");
                            got[i] += n;
                            moved = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{wait:?}: read {i}: {e}"),
                    }
                }
            }
            if !moved && done.iter().any(|d| !d) {
                assert!(gr.wait(PATIENCE), "{wait:?}: reader never woken");
            }
        }
        assert!(got.iter().all(|&n| n == BYTES), "{wait:?}: {got:?}");
        drop(writer.join().unwrap());
    }
}

/// A header overwritten while no guest is attached (the magic, the version, a ring
/// offset) is rewritten by the host within a heartbeat period: a guest that starts
/// meanwhile waits for it (Config::layout_wait) instead of failing, and gets a link.
#[test]
fn guest_starting_on_an_overwritten_header_waits_for_the_host_to_repair_it() {
    let _guard = common::watchdog(
        "guest_starting_on_an_overwritten_header_waits_for_the_host_to_repair_it",
        Duration::from_secs(60),
    );
    for (word, value) in [(0usize, 0xffu64), (0, 0), (8, 7), (32, u64::MAX)] {
        let region = SharedRegion::heap(64 << 10);
        let (a, b) = local::pair();
        let cfg = Config {
            heartbeat: Duration::from_millis(20),
            ..Config::default()
        };
        let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
        region.store_u64(word, value, Ordering::SeqCst);
        let guest = Endpoint::guest(region, Arc::new(b), cfg)
            .unwrap_or_else(|e| panic!("header word {word} = {value:#x}: {e}"));
        assert!(guest.wait_up(Duration::from_secs(20)), "word {word}");
        let l = guest.listen(3).unwrap();
        let mut s = host.connect(3).unwrap();
        let mut g = l.accept().unwrap();
        s.write_all(b"repaired").unwrap();
        let mut got = [0u8; 8];
        g.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"repaired");
    }
}

/// Vectored writes: a stream session sends every slice, in order, across many calls
/// (partial returns included, as with `writev`), and a message session sends one message
/// of all the slices.
#[test]
fn vectored_writes_keep_order_and_message_boundaries() {
    let _guard = common::watchdog(
        "vectored_writes_keep_order_and_message_boundaries",
        Duration::from_secs(60),
    );
    let p = pair();
    let (mut h, mut g) = connect(&p, 40, SessionOptions::default());
    // Sizes from empty to larger than the receive buffer, so calls return part way.
    let sizes: Vec<usize> = (0..300)
        .map(|i| [0, 1, 7, 64, 1000, 70_000][i % 6])
        .collect();
    let mut pos = 0u64;
    let slices: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| {
            let v: Vec<u8> = (0..n as u64).map(|i| pattern(40, pos + i)).collect();
            pos += n as u64;
            v
        })
        .collect();
    let total = pos;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        g.read_to_end(&mut got).unwrap();
        got
    });
    let mut io: Vec<IoSlice<'_>> = slices.iter().map(|v| IoSlice::new(v)).collect();
    let mut bufs = &mut io[..];
    let mut calls = 0;
    while !bufs.is_empty() {
        let n = h.write_vectored(bufs).unwrap();
        calls += 1;
        IoSlice::advance_slices(&mut bufs, n);
    }
    drop(h);
    let got = reader.join().unwrap();
    assert_eq!(got.len() as u64, total);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(40, i as u64)));
    assert!(
        calls < sizes.len(),
        "{calls} calls for {} slices",
        sizes.len()
    );

    let (mut h, mut g) = connect(&p, 41, SessionOptions { message: true });
    let parts: [&[u8]; 3] = [b"one ", b"", b"message"];
    let io: Vec<IoSlice<'_>> = parts.iter().map(|b| IoSlice::new(b)).collect();
    assert_eq!(h.write_vectored(&io).unwrap(), 11);
    h.write_all(b"next").unwrap();
    let mut buf = [0u8; 64];
    let n = g.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"one message");
    let n = g.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"next");
}

/// While a reader streams straight from the ring (the keeper sits out behind it), a
/// thread blocked in `accept` still gets each new session: the Open stops the reader's
/// direct reads when it reaches the ring's tail, and the reader's side pumps it.
#[test]
fn accept_goes_on_while_a_reader_streams_ahead_of_the_keeper() {
    let _guard = common::watchdog(
        "accept_goes_on_while_a_reader_streams_ahead_of_the_keeper",
        Duration::from_secs(120),
    );
    for wait in [WaitMode::Block, WaitMode::Adaptive, WaitMode::Poll] {
        let p = pair_with(
            1 << 20,
            Config {
                wait,
                connect_timeout: PATIENCE,
                ..Config::default()
            },
        );
        let (mut w, mut r) = connect(&p, 11, SessionOptions::default());
        const OPENS: usize = 20;
        let l = p.guest.listen(12).unwrap();
        let acceptor = thread::spawn(move || {
            (0..OPENS)
                .map(|_| l.accept_timeout(PATIENCE).map(|s| s.id()))
                .collect::<std::io::Result<Vec<u64>>>()
        });
        const TOTAL: usize = 8 << 20;
        let writer = thread::spawn(move || {
            let data = bytes(30, TOTAL);
            for c in data.chunks(4096) {
                w.write_all(c).unwrap();
            }
            w
        });
        let reader = thread::spawn(move || read_exact_timeout(&mut r, TOTAL));
        let mut opened = Vec::new();
        for _ in 0..OPENS {
            let s = p
                .host
                .connect(12)
                .unwrap_or_else(|e| panic!("{wait:?}: {e}"));
            opened.push(s.id());
            thread::sleep(Duration::from_millis(2));
        }
        let accepted = acceptor.join().unwrap().unwrap();
        assert_eq!(accepted, opened, "{wait:?}: accepted other sessions");
        assert!(
            reader.join().unwrap() == bytes(30, TOTAL),
            "{wait:?}: bytes differ"
        );
        drop(writer.join().unwrap());
    }
}

/// How the caller of the other session waits in
/// [`served_when_a_blocked_reader_leaves_the_doorbell`].
#[derive(Clone, Copy, PartialEq)]
enum OtherWaiter {
    /// Non-blocking, for its callback (as an async task).
    Callback,
    /// Blocked in `read`, asleep on its stripe's condvar.
    Condvar,
}

/// A caller blocked in `read` holds the doorbell while the keeper sits out, and the
/// caller of another session waits meanwhile (for its callback, or asleep on a condvar,
/// relying on whoever holds the doorbell). When the blocked reader gets its data and
/// leaves the doorbell, it must recall the keeper: the other session's data, arriving
/// next, is read at once, rather than when the keeper's sit-out (the heartbeat) ends. A
/// wakeup left to the keeper's limit is counted in `late_wakeups`.
fn served_when_a_blocked_reader_leaves_the_doorbell(test: &'static str, waiter: OtherWaiter) {
    let _guard = common::watchdog(test, Duration::from_secs(60));
    let cfg = Config {
        wait: WaitMode::Block,
        ..Config::default()
    };
    let p = pair_with(1 << 20, cfg);
    let (mut host_a, mut guest_a) = connect(&p, 80, SessionOptions::default());
    let (mut host_b, guest_b) = connect(&p, 81, SessionOptions::default());
    // Lent to the second reader's thread in each round, when it is one.
    let mut guest_b = Some(guest_b);
    let (called, calls) = mpsc::channel();
    if let (OtherWaiter::Callback, Some(guest_b)) = (waiter, &mut guest_b) {
        guest_b.set_nonblocking(true);
        guest_b
            .set_notify(Arc::new(move || {
                let _ = called.send(());
            }))
            .unwrap();
    }
    let read_8 = |mut s: Session, round: u8| {
        thread::spawn(move || {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b, [round; 8]);
            s
        })
    };
    const ROUNDS: u8 = 4;
    for round in 0..ROUNDS {
        let first = read_8(guest_a, round);
        // Long enough for the reader to ask for the doorbell, take it at the keeper's
        // next round, and for the keeper to sit out behind it for the heartbeat.
        thread::sleep(Duration::from_millis(250));
        let second = match waiter {
            OtherWaiter::Callback => {
                let e = guest_b.as_mut().unwrap().read(&mut [0u8; 8]).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::WouldBlock, "round {round}");
                while calls.try_recv().is_ok() {}
                None
            }
            OtherWaiter::Condvar => Some(read_8(guest_b.take().unwrap(), round)),
        };
        thread::sleep(Duration::from_millis(5));
        host_a.write_all(&[round; 8]).unwrap();
        guest_a = first.join().unwrap();
        thread::sleep(Duration::from_millis(5));
        host_b.write_all(&[round; 8]).unwrap();
        match second {
            Some(t) => guest_b = Some(t.join().unwrap()),
            None => {
                let guest_b = guest_b.as_mut().unwrap();
                calls
                    .recv_timeout(PATIENCE)
                    .unwrap_or_else(|_| panic!("round {round}: the callback never ran"));
                let (mut got, mut b) = (Vec::new(), [0u8; 8]);
                while got.len() < 8 {
                    match guest_b.read(&mut b) {
                        Ok(n) => got.extend_from_slice(&b[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            calls.recv_timeout(PATIENCE).unwrap();
                        }
                        Err(e) => panic!("round {round}: {e}"),
                    }
                }
                assert_eq!(got, [round; 8]);
            }
        }
    }
    assert_woken_by_events(&p, test);
}

#[test]
fn a_callback_waiter_is_served_when_a_blocked_reader_leaves_the_doorbell() {
    served_when_a_blocked_reader_leaves_the_doorbell(
        "a_callback_waiter_is_served_when_a_blocked_reader_leaves_the_doorbell",
        OtherWaiter::Callback,
    );
}

#[test]
fn a_condvar_sleeper_is_served_when_a_blocked_reader_leaves_the_doorbell() {
    served_when_a_blocked_reader_leaves_the_doorbell(
        "a_condvar_sleeper_is_served_when_a_blocked_reader_leaves_the_doorbell",
        OtherWaiter::Condvar,
    );
}

/// A doorbell whose rings can be silenced: a peer that does not ring when asked.
struct Silenceable {
    inner: LocalDoorbell,
    silent: std::sync::atomic::AtomicBool,
}

impl ivring::Doorbell for Silenceable {
    fn own_id(&self) -> u16 {
        self.inner.own_id()
    }
    fn ring(&self, peer: u16) {
        if !self.silent.load(Ordering::SeqCst) {
            self.inner.ring(peer);
        }
    }
    fn wait(&self, timeout: Option<Duration>) {
        self.inner.wait(timeout)
    }
    fn interrupt(&self) {
        self.inner.interrupt()
    }
}

/// A host and a guest endpoint, up, in block mode, whose host doorbell can be silenced.
fn silenceable_pair() -> (Endpoint, Endpoint, Arc<Silenceable>) {
    let cfg = Config {
        wait: WaitMode::Block,
        peer_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let region = SharedRegion::heap(1 << 20);
    let (a, b) = local::pair();
    let host_bell = Arc::new(Silenceable {
        inner: a,
        silent: false.into(),
    });
    let host = Endpoint::host(region.clone(), host_bell.clone(), cfg.clone()).unwrap();
    let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
    assert!(host.wait_up(PATIENCE) && guest.wait_up(PATIENCE));
    (host, guest, host_bell)
}

/// A peer that stops ringing leaves every wakeup to a 100 ms limit, and `late_wakeups`
/// says so: a callback that ran when the keeper's doorbell wait timed out, and a blocked
/// read served only then. The data still arrives.
#[test]
fn a_peer_that_does_not_ring_is_seen_in_late_wakeups() {
    let _guard = common::watchdog(
        "a_peer_that_does_not_ring_is_seen_in_late_wakeups",
        Duration::from_secs(60),
    );
    let (host, guest, host_bell) = silenceable_pair();
    let listener = guest.listen(90).unwrap();
    let mut host_a = host.connect(90).unwrap();
    let mut guest_a = listener.accept_timeout(PATIENCE).unwrap();
    let mut host_b = host.connect(90).unwrap();
    let mut guest_b = listener.accept_timeout(PATIENCE).unwrap();
    guest_a.set_read_timeout(Some(PATIENCE));
    let (called, calls) = mpsc::channel();
    guest_b.set_nonblocking(true);
    guest_b
        .set_notify(Arc::new(move || {
            let _ = called.send(());
        }))
        .unwrap();
    host_bell.silent.store(true, Ordering::SeqCst);

    // A callback waiter: its data comes in unrung.
    let mut b = [0u8; 8];
    let e = guest_b.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    while calls.try_recv().is_ok() {}
    host_b.write_all(&[2; 8]).unwrap();
    calls
        .recv_timeout(PATIENCE)
        .expect("the callback never ran");
    let after_callback = guest.stats().late_wakeups;
    assert!(
        after_callback >= 1,
        "a callback run only at the keeper's timeout was not counted"
    );
    let mut got = 0;
    while got < 8 {
        match guest_b.read(&mut b) {
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => drop(calls.recv_timeout(PATIENCE)),
            Err(e) => panic!("{e}"),
        }
    }

    // A blocked reader: the same.
    let reader = thread::spawn(move || {
        let mut b = [0u8; 8];
        guest_a.read_exact(&mut b).unwrap();
        b
    });
    thread::sleep(Duration::from_millis(20));
    host_a.write_all(&[1; 8]).unwrap();
    assert_eq!(reader.join().unwrap(), [1; 8]);
    assert!(
        guest.stats().late_wakeups > after_callback,
        "a blocked read served only at a timeout was not counted"
    );
}

/// Only the 100 ms safety limit says a wakeup was lost: a read whose own timeout is
/// shorter wakes at that deadline, and what it finds then is not counted late (a healthy
/// link with short read timeouts meets data at the deadline by chance), even from a peer
/// that does not ring.
#[test]
fn a_wait_cut_short_by_its_deadline_is_not_counted_late() {
    let _guard = common::watchdog(
        "a_wait_cut_short_by_its_deadline_is_not_counted_late",
        Duration::from_secs(60),
    );
    let (host, guest, host_bell) = silenceable_pair();
    let listener = guest.listen(91).unwrap();
    let mut host_s = host.connect(91).unwrap();
    let mut guest_s = listener.accept_timeout(PATIENCE).unwrap();
    guest_s.set_read_timeout(Some(Duration::from_millis(40)));
    host_bell.silent.store(true, Ordering::SeqCst);
    let before = guest.stats().late_wakeups;
    let reader = thread::spawn(move || {
        let mut b = [0u8; 8];
        let mut got = 0;
        // A loaded machine may write after the first deadline: each read is cut short
        // by its own, and none may count.
        while got < b.len() {
            match guest_s.read(&mut b[got..]) {
                Ok(0) => panic!("EOF on an open session"),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
        }
        (b, guest_s)
    });
    thread::sleep(Duration::from_millis(10));
    host_s.write_all(&[3; 8]).unwrap();
    let (b, _guest_s) = reader.join().unwrap();
    // The data came in unrung: the read took it when its deadline woke it.
    assert_eq!(b, [3; 8]);
    assert_eq!(
        guest.stats().late_wakeups,
        before,
        "a wait cut short by the caller's own deadline was counted as a lost wakeup"
    );
}

//! Soak: random sessions, sizes, modes and directions between two processes for a while,
//! every byte checked; fds and memory flat at the end.
//!
//! Short in `cargo test`; for a long run: `IVRING_SOAK_SECS=3600 cargo test --release -p
//! ivring-host --test soak -- --nocapture`.

use ivring::{Config, Endpoint, Role};
use ivring_host::attach::{Attach, HostLink};
use ivring_host::Server;
use ivring_tools::services::{pattern, StreamHash, PORT_CHECK, PORT_ECHO, PORT_SOURCE};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::{connect, Peer};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fds(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One random operation; returns the bytes it moved.
fn op(ep: &Endpoint, rng: &mut Rng, seed: u64) -> u64 {
    let message = rng.below(2) == 0;
    match rng.below(4) {
        // Host to guest, checksummed by the peer.
        0 => {
            let mut s = connect(ep, PORT_CHECK, message);
            let total = rng.below(4 << 20);
            let max_write = if message { 200_000 } else { 1 << 20 };
            let mut h = StreamHash::default();
            let mut buf = vec![0u8; max_write as usize];
            let mut off = 0;
            while off < total {
                let n = (1 + rng.below(max_write)).min(total - off) as usize;
                pattern(seed, off, &mut buf[..n]);
                h.update(&buf[..n]);
                s.write_all(&buf[..n]).unwrap();
                off += n as u64;
            }
            s.shutdown(Shutdown::Write).unwrap();
            let mut reply = [0u8; 16];
            s.read_exact(&mut reply).unwrap();
            assert_eq!(u64::from_le_bytes(reply[..8].try_into().unwrap()), total);
            assert_eq!(
                u64::from_le_bytes(reply[8..].try_into().unwrap()),
                h.finish()
            );
            total
        }
        // Guest to host, every byte checked.
        1 => {
            let mut s = connect(ep, PORT_SOURCE, message);
            let total = rng.below(4 << 20);
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&total.to_le_bytes());
            req[8..].copy_from_slice(&seed.to_le_bytes());
            s.write_all(&req).unwrap();
            // A message-mode read shorter than the message truncates it (as SOCK_SEQPACKET),
            // and the source sends 256 KiB messages.
            let len = if message {
                256 << 10
            } else {
                1 + rng.below(300_000) as usize
            };
            let mut buf = vec![0u8; len];
            let mut want = vec![0u8; buf.len()];
            let mut off = 0;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                pattern(seed, off, &mut want[..n]);
                assert!(
                    buf[..n] == want[..n],
                    "wrong bytes at {off} of stream {seed}"
                );
                off += n as u64;
            }
            assert_eq!(off, total);
            total
        }
        // Round trips through echo, messages compared whole.
        2 => {
            let mut s = connect(ep, PORT_ECHO, message);
            let mut moved = 0;
            for i in 0..rng.below(50) {
                let n = 1 + rng.below(if message { 100_000 } else { 10_000 }) as usize;
                let mut out = vec![0u8; n];
                pattern(seed, i * 1_000_000, &mut out);
                s.write_all(&out).unwrap();
                let mut back = vec![0u8; n];
                s.read_exact(&mut back).unwrap();
                assert!(back == out, "echo of stream {seed} differs");
                moved += 2 * n as u64;
            }
            moved
        }
        // Abandoned mid-transfer: closing with unread data must not leak or confuse.
        _ => {
            let mut s = connect(ep, PORT_SOURCE, message);
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&(1u64 << 30).to_le_bytes());
            s.write_all(&req).unwrap();
            let mut buf = vec![0u8; 4096];
            s.read_exact(&mut buf[..1]).unwrap();
            0
        }
    }
}

#[test]
fn soak() {
    let secs: u64 = std::env::var("IVRING_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let dir = std::env::temp_dir().join(format!("ivring-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("ivshmem.sock");
    let _server = Server::bind(&sock, 4 << 20, 1).unwrap().spawn();
    let host = HostLink::open(Role::Host, &Attach::Join(sock.clone()), Config::default()).unwrap();
    let child = Peer::start(&sock, "guest");
    assert!(host.wait_up(Duration::from_secs(20)));
    let me = std::process::id().to_string();
    let peer = child.0.id().to_string();
    let ops = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let run = |until: Instant, worker: u64| {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (worker + 1).wrapping_mul(0x1234_5678_9abc_def1));
        let mut n = 0;
        while Instant::now() < until {
            let seed = worker << 40 | n;
            bytes.fetch_add(op(&host, &mut rng, seed), Ordering::Relaxed);
            ops.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
    };
    // Warm up, then take the baseline of fds and memory.
    let warm = Instant::now() + Duration::from_secs(1);
    std::thread::scope(|sc| {
        for w in 0..4 {
            sc.spawn(move || run(warm, 100 + w));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let before = (fds(&me), fds(&peer), rss_kib(&me), rss_kib(&peer));
    let until = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|sc| {
        for w in 0..4 {
            sc.spawn(move || run(until, w));
        }
    });
    // Let the peer finish abandoned sessions.
    std::thread::sleep(Duration::from_millis(500));
    let after = (fds(&me), fds(&peer), rss_kib(&me), rss_kib(&peer));
    eprintln!(
        "soak {secs} s: {} operations, {} MiB checked; fds {}/{} -> {}/{}, RSS KiB {}/{} -> {}/{}",
        ops.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) >> 20,
        before.0,
        before.1,
        after.0,
        after.1,
        before.2,
        before.3,
        after.2,
        after.3
    );
    assert_eq!(host.session_count(), 0, "sessions left open");
    assert_eq!(after.0, before.0, "our fds grew");
    assert_eq!(after.1, before.1, "the peer's fds grew");
    assert!(after.2 < before.2 + 64 * 1024, "our memory grew");
    assert!(after.3 < before.3 + 64 * 1024, "the peer's memory grew");
    assert_eq!(host.stats().corruptions, 0);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

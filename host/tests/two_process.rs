//! Two real processes over the ivshmem server protocol: a sealed memfd, eventfd
//! doorbells, and a second `ivring-host` process standing in for the guest (or the host).
//! PROTOCOL.md §3 (epochs), §4 (frames), §7 (sessions and credits).

use ivring::{Config, Endpoint, Role, Session};
use ivring_host::attach::{Attach, HostLink};
use ivring_host::{Server, ServerHandle};
use ivring_tools::services::{pattern, StreamHash, PORT_CHECK, PORT_ECHO, PORT_SOURCE};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{Peer, BIN};

struct Setup {
    dir: PathBuf,
    sock: PathBuf,
    _server: ServerHandle,
}

impl Setup {
    fn new(name: &str, size: u64) -> Setup {
        let dir = std::env::temp_dir().join(format!("ivring-t-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ivshmem.sock");
        let server = Server::bind(&sock, size, 1).unwrap().spawn();
        Setup {
            dir,
            sock,
            _server: server,
        }
    }
    fn join(&self, role: Role) -> HostLink {
        HostLink::open(role, &Attach::Join(self.sock.clone()), Config::default()).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A stream session to the other process's `port`.
fn connect(ep: &Endpoint, port: u32) -> Session {
    common::connect(ep, port, false)
}

fn up(ep: &Endpoint) {
    assert!(ep.wait_up(Duration::from_secs(20)), "link did not come up");
}

/// Sends `len` pattern bytes of stream `seed` to the check service; asserts the peer
/// counted and hashed exactly them.
fn check_send(s: &mut Session, seed: u64, len: u64, chunk: usize) {
    let mut buf = vec![0u8; chunk];
    let mut h = StreamHash::default();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk as u64) as usize;
        pattern(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u64::from_le_bytes(reply[..8].try_into().unwrap()),
        len,
        "count"
    );
    assert_eq!(
        u64::from_le_bytes(reply[8..].try_into().unwrap()),
        h.finish(),
        "checksum of stream {seed}"
    );
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "EOF after the reply");
}

/// Asks the source service for `len` bytes of stream `seed` and checks every byte.
fn source_recv(s: &mut Session, seed: u64, len: u64) -> std::io::Result<()> {
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&len.to_le_bytes());
    req[8..].copy_from_slice(&seed.to_le_bytes());
    s.write_all(&req)?;
    let mut buf = vec![0u8; 128 << 10];
    let mut want = vec![0u8; 128 << 10];
    let mut off = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        pattern(seed, off, &mut want[..n]);
        assert!(buf[..n] == want[..n], "stream {seed}: wrong bytes at {off}");
        off += n as u64;
    }
    assert_eq!(off, len, "stream {seed}: length");
    Ok(())
}

#[test]
fn thousand_sessions_in_turn_and_hundred_at_once() {
    let t = Setup::new("many", 4 << 20);
    let host = t.join(Role::Host);
    let _guest = Peer::start(&t.sock, "guest");
    up(&host);
    for i in 0..1000u64 {
        let mut s = connect(&host, PORT_CHECK);
        check_send(&mut s, i, 100 + i % 700, 333);
    }
    let mut sessions: Vec<Session> = (0..100).map(|_| connect(&host, PORT_CHECK)).collect();
    let ids: std::collections::HashSet<u64> = sessions.iter().map(|s| s.id()).collect();
    assert_eq!(ids.len(), 100, "session ids are unique");
    // Interleave writes across all hundred sessions, then check each.
    let mut hashes = vec![StreamHash::default(); 100];
    let mut buf = vec![0u8; 1000];
    for round in 0..20u64 {
        for (i, s) in sessions.iter_mut().enumerate() {
            let seed = 10_000 + i as u64;
            pattern(seed, round * 1000, &mut buf);
            hashes[i].update(&buf);
            s.write_all(&buf).unwrap();
        }
    }
    for (i, s) in sessions.iter_mut().enumerate() {
        s.shutdown(Shutdown::Write).unwrap();
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(u64::from_le_bytes(reply[..8].try_into().unwrap()), 20_000);
        assert_eq!(
            u64::from_le_bytes(reply[8..].try_into().unwrap()),
            hashes[i].finish(),
            "session {i} got another session's bytes"
        );
    }
    drop(sessions);
    // A hundred concurrent readers from the source service.
    std::thread::scope(|sc| {
        for i in 0..100u64 {
            let host = &host;
            sc.spawn(move || {
                let mut s = connect(host, PORT_SOURCE);
                source_recv(&mut s, 20_000 + i, 50_000 + i * 13).unwrap();
            });
        }
    });
    assert_eq!(host.stats().corruptions, 0);
}

#[test]
fn one_gib_with_checksums() {
    let t = Setup::new("gib", 16 << 20);
    let host = t.join(Role::Host);
    let _guest = Peer::start(&t.sock, "guest");
    up(&host);
    std::thread::scope(|sc| {
        // 768 MiB host to guest on two sessions, 256 MiB guest to host: 1 GiB in all.
        for seed in 0..2u64 {
            let host = &host;
            sc.spawn(move || {
                let mut s = connect(host, PORT_CHECK);
                check_send(&mut s, seed, 384 << 20, 64 << 10);
            });
        }
        let host = &host;
        sc.spawn(move || {
            let mut s = connect(host, PORT_SOURCE);
            source_recv(&mut s, 99, 256 << 20).unwrap();
        });
    });
    assert_eq!(host.stats().corruptions, 0);
}

#[test]
fn stalled_reader_does_not_stall_others() {
    let t = Setup::new("stall", 1 << 20);
    let host = t.join(Role::Host);
    let _guest = Peer::start(&t.sock, "guest");
    up(&host);
    // Session A: we never read the echo, so the peer's echo writes run out of credit.
    let mut a = connect(&host, PORT_ECHO);
    a.set_write_timeout(Some(Duration::from_secs(2)));
    let chunk = vec![1u8; 64 << 10];
    let mut stuck = false;
    for _ in 0..64 {
        match a.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                stuck = true;
                break;
            }
            Err(e) => panic!("session A: {e}"),
        }
    }
    assert!(stuck, "session A should fill both credit windows and block");
    // Session B moves 64 MiB meanwhile.
    let mut b = connect(&host, PORT_CHECK);
    check_send(&mut b, 5, 64 << 20, 64 << 10);
    // And A still works once read.
    let mut got = vec![0u8; 64 << 10];
    a.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|&x| x == 1));
}

/// Kills the other process `rounds` times at a random point of transfers both ways;
/// checks that our sessions reset within a bound, and that new sessions carry only new
/// bytes. `IVRING_KILLS` overrides the round count.
fn restart_case(victim_role: Role, rounds: u64) {
    let rounds = std::env::var("IVRING_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(rounds);
    let name = if victim_role == Role::Host {
        "rg"
    } else {
        "rh"
    };
    let t = Setup::new(name, 4 << 20);
    let other = if victim_role == Role::Host {
        "guest"
    } else {
        "host"
    };
    let me = t.join(victim_role);
    let mut peer = Peer::start(&t.sock, other);
    up(&me);
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ victim_role as u64;
    let mut worst = Duration::ZERO;
    for round in 0..rounds {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Mid-transfer in both directions.
        let mut outgoing = connect(&me, PORT_CHECK);
        let mut incoming = connect(&me, PORT_SOURCE);
        let mut req = [0u8; 16];
        req[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        req[8..].copy_from_slice(&(round + 1000).to_le_bytes());
        incoming.write_all(&req).unwrap();
        let mut buf = vec![0xeeu8; 32 << 10];
        for _ in 0..(rng % 16) {
            outgoing.write_all(&buf).unwrap();
            incoming.read_exact(&mut buf).unwrap();
        }
        std::thread::sleep(Duration::from_micros(rng % 3000));
        peer.kill();
        let killed = Instant::now();
        let e = loop {
            match incoming.read(&mut buf) {
                Ok(n) => assert!(
                    n > 0 && killed.elapsed() < Duration::from_secs(5),
                    "no reset"
                ),
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        worst = worst.max(killed.elapsed());
        let e = outgoing.write_all(&buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        drop((outgoing, incoming));
        peer = Peer::start(&t.sock, other);
        up(&me);
        // New sessions see only new bytes: every byte is checked against its pattern.
        let mut s = connect(&me, PORT_SOURCE);
        source_recv(&mut s, round + 2000, 3 << 20).unwrap();
        drop(s);
        let mut s = connect(&me, PORT_CHECK);
        check_send(&mut s, round + 3000, 1 << 20, 50_000);
        drop(s);
        assert_eq!(
            me.session_count(),
            0,
            "no stale session after round {round}"
        );
    }
    assert_eq!(me.stats().corruptions, 0);
    eprintln!("{rounds} kills of the {other}: slowest reset seen {worst:?}");
}

#[test]
fn guest_killed_mid_transfer() {
    restart_case(Role::Host, 50);
}

#[test]
fn host_killed_mid_transfer() {
    restart_case(Role::Guest, 50);
}

fn run_bin(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("ivring-t-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let one_line = |(code, err): (i32, String)| {
        assert_ne!(code, 0, "should fail: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    // Socket in use.
    let sock = dir.join("s.sock");
    let _server = Server::bind(&sock, 1 << 20, 1).unwrap().spawn();
    let err = one_line(run_bin(&["serve", "--socket", sock.to_str().unwrap()]));
    assert!(err.contains("in use"), "{err}");
    // A regular file where the socket should go is left alone.
    let file = dir.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    one_line(run_bin(&["serve", "--socket", file.to_str().unwrap()]));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // Sizes.
    let s2 = dir.join("s2.sock");
    let err = one_line(run_bin(&[
        "serve",
        "--socket",
        s2.to_str().unwrap(),
        "--size",
        "12345",
    ]));
    assert!(err.contains("power of two"), "{err}");
    // Argument errors: one line too, exit status 2.
    let (code, err) = run_bin(&["serve", "--socket", s2.to_str().unwrap(), "--size", "4Q"]);
    assert_eq!(code, 2);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("use K, M or G"), "{err}");
    let (code, err) = run_bin(&["serve"]);
    assert_eq!((code, err.trim_end().lines().count()), (2, 1), "{err}");
    assert!(err.contains("--socket"), "{err}");
    // A plain file too small, and one with someone else's data in it.
    let small = dir.join("small");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    one_line(run_bin(&[
        "peer",
        "--role",
        "guest",
        "--plain",
        small.to_str().unwrap(),
    ]));
    let foreign = dir.join("foreign");
    std::fs::write(&foreign, vec![0x41u8; 64 << 10]).unwrap();
    // A foreign header may be a peer's scribble that the host is about to repair: the
    // guest says it waits (one line), waits Config::layout_wait, then fails (one line).
    let (code, err) = run_bin(&[
        "peer",
        "--role",
        "guest",
        "--plain",
        foreign.to_str().unwrap(),
    ]);
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_ne!(code, 0, "should fail: {err}");
    assert_eq!(lines.len(), 2, "a notice and an error: {err}");
    assert!(lines[0].contains("waiting up to"), "{err}");
    assert!(lines[1].contains("magic"), "{err}");
    // Joining something that is not an ivshmem server.
    let err = one_line(run_bin(&["peer", "--join", file.to_str().unwrap()]));
    assert!(!err.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A peer that stops without leaving the server (SIGSTOP, a hung VM) is declared gone by
/// heartbeat within `Config::peer_timeout`; once it runs again the link re-forms with
/// fresh sessions (PROTOCOL.md §3).
#[test]
fn frozen_peer_is_reset_by_heartbeat() {
    let t = Setup::new("frozen", 1 << 20);
    let me = t.join(Role::Host);
    let peer = Peer::start(&t.sock, "guest");
    up(&me);
    let mut s = connect(&me, PORT_ECHO);
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    let pid = peer.0.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    let t0 = Instant::now();
    let e = s.read(&mut b).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert!(e.to_string().contains("heartbeat"), "{e}");
    assert!(took < Duration::from_secs(5), "reset took {took:?}");
    eprintln!("frozen peer reset after {took:?} (peer_timeout 1 s)");
    signal("-CONT");
    up(&me);
    let mut s = connect(&me, PORT_SOURCE);
    source_recv(&mut s, 77, 1 << 20).unwrap();
}

/// A session's fd polls readable when data arrives, and not before (PollableSession).
#[test]
fn pollable_session_fd() {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::os::fd::AsFd;
    let t = Setup::new("poll", 1 << 20);
    let me = t.join(Role::Host);
    let _peer = Peer::start(&t.sock, "guest");
    up(&me);
    let mut s = ivring_host::PollableSession::new(connect(&me, PORT_ECHO)).unwrap();
    let ready = |s: &ivring_host::PollableSession, ms: i64| {
        let mut fds = [PollFd::new(s, PollFlags::IN)];
        let t = Timespec {
            tv_sec: ms / 1000,
            tv_nsec: (ms % 1000) * 1_000_000,
        };
        poll(&mut fds, Some(&t)).unwrap() == 1
    };
    assert!(ready(&s, 0), "starts readable");
    s.clear();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    assert!(!ready(&s, 100), "nothing arrived yet");
    s.write_all(b"hello").unwrap();
    assert!(ready(&s, 10_000), "echo arrives");
    s.clear();
    let mut got = Vec::new();
    while got.len() < 5 {
        match s.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => assert!(ready(&s, 10_000)),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, b"hello");
    let _ = s.as_fd();
}

/// ivshmem-plain's setting: a shared file, no doorbells; both sides poll.
#[test]
fn plain_file_two_processes() {
    let dir = std::env::temp_dir().join(format!("ivring-t-plain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("shm");
    let attach = Attach::Plain {
        file: file.clone(),
        size: Some(1 << 20),
    };
    let me = HostLink::open(Role::Host, &attach, Config::default()).unwrap();
    let _peer = Peer(
        Command::new(BIN)
            .args(["peer", "--role", "guest", "--plain"])
            .arg(&file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    up(&me);
    let mut s = connect(&me, PORT_CHECK);
    check_send(&mut s, 1, 8 << 20, 10_000);
    let mut s = connect(&me, PORT_SOURCE);
    source_recv(&mut s, 2, 8 << 20).unwrap();
    drop(s);
    drop(me);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A peer listens before it attaches (`HostLink::open_with`): a connect made the moment
/// the link is up is never refused.
#[test]
fn connect_at_once_after_up_is_not_refused() {
    let t = Setup::new("atonce", 1 << 20);
    let me = t.join(Role::Host);
    for _ in 0..10 {
        let mut peer = Peer::start(&t.sock, "guest");
        up(&me);
        let mut s = me.connect(PORT_ECHO).expect("refused at once after up");
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        drop(s);
        peer.kill();
        // Wait for the reset so the next round's `up` is the new peer's.
        let t0 = Instant::now();
        while me.is_up() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

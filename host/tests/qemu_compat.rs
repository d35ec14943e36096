//! What joining QEMU's own ivshmem-server takes: memory that is not sealed (a plain memfd
//! or POSIX shm object with `-M`, a file with `-m`), accepted only with `--allow-unsealed`,
//! and servers without doorbell vectors (`-n 0`), over which the link polls. A small
//! stand-in server here speaks the protocol as QEMU's does; the command-line flags of
//! `serve` are checked on the real binary.

use ivring::{Config, Doorbell, Role};
use ivring_host::attach::{Attach, HostLink};
use ivring_host::{Client, ConnectOptions, HostError};
use ivring_tools::services;
use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 20;

fn send(sock: &UnixStream, val: i64, fd: Option<BorrowedFd<'_>>) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = fd.map(|f| [f]);
    if let Some(fds) = &fds {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let bytes = val.to_le_bytes();
    // A client that refuses what it got may hang up at any time.
    let _ = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}

/// Shared memory as QEMU's server makes it: an unsealed memfd (as `-M` gives: shmem that
/// cannot be sealed) or an unlinked regular file (`-m DIR`).
fn unsealed_memory(dir: &Path, file: bool) -> OwnedFd {
    if file {
        let path = dir.join("ivshmem.mem");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(SIZE).unwrap();
        std::fs::remove_file(&path).unwrap();
        f.into()
    } else {
        let m = rustix::fs::memfd_create("qemu-like", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&m, SIZE).unwrap();
        m
    }
}

/// A server with no vectors, as `ivshmem-server -n 0`: each peer gets the version, its id
/// (from 0, as QEMU's server counts) and the memory, and nothing else; leaves are
/// announced. Runs until the test ends.
fn zero_vector_server(path: &Path, mem: OwnedFd) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut peers: Vec<(i64, UnixStream)> = Vec::new();
        let mut next = 0i64;
        listener.set_nonblocking(true).unwrap();
        loop {
            while let Ok((s, _)) = listener.accept() {
                s.set_nonblocking(false).unwrap();
                send(&s, 0, None);
                send(&s, next, None);
                send(&s, -1, Some(mem.as_fd()));
                peers.push((next, s));
                next += 1;
            }
            let mut gone = Vec::new();
            peers.retain(|(id, s)| {
                s.set_nonblocking(true).unwrap();
                let alive = matches!(
                    (&*s).read(&mut [0u8; 1]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                );
                if !alive {
                    gone.push(*id);
                }
                alive
            });
            for id in gone {
                for (_, s) in &peers {
                    send(s, id, None);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

fn allow(allow_unsealed: bool) -> ConnectOptions {
    ConnectOptions {
        allow_unsealed,
        ..ConnectOptions::default()
    }
}

#[test]
fn unsealed_memory_is_refused_naming_the_flag_then_joined_when_allowed() {
    for file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        zero_vector_server(&sock, unsealed_memory(dir.path(), file));
        let err = Client::connect(&sock).unwrap_err();
        if file {
            assert!(matches!(err, HostError::NotMemfd { .. }), "{err}");
        } else {
            assert!(matches!(err, HostError::NotSealed { .. }), "{err}");
        }
        assert!(err.to_string().contains("--allow-unsealed"), "{err}");
        let c = Client::connect_with(&sock, &allow(true)).unwrap();
        assert_eq!(c.region().len() as u64, SIZE);
    }
}

#[test]
fn zero_vector_handshake_completes_and_the_doorbell_polls() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    zero_vector_server(&sock, unsealed_memory(dir.path(), false));
    let t = Instant::now();
    let a = Client::connect_with(&sock, &allow(true)).unwrap();
    // Well before the 5 s handshake timeout: the silence after the memory means N = 0.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let b = Client::connect_with(&sock, &allow(true)).unwrap();
    assert_eq!((a.id(), b.id()), (0, 1), "ids as QEMU's server gives them");
    assert_eq!(a.vectors(), 0);
    let bell = a.doorbell();
    assert!(!bell.can_wait(), "nothing rings us: the link must poll");
    // No joins are announced: presence cannot be told, either way.
    assert_eq!(bell.peer_present(b.id()), None);
    assert!(a.peers().is_empty());
    // Waits are short sleeps, cut by interrupt.
    let t = Instant::now();
    bell.wait(Some(Duration::from_millis(30)));
    assert!(t.elapsed() < Duration::from_secs(1));
    bell.interrupt();
    let t = Instant::now();
    bell.wait(Some(Duration::from_secs(5)));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "interrupt did not cut the wait"
    );
    bell.ring(b.id()); // a no-op, not an error
                       // A leave of a peer never announced changes nothing and keeps the server connection.
    drop(b);
    std::thread::sleep(Duration::from_millis(50));
    assert!(a.server_alive());
    assert_eq!(bell.peer_present(1), None);
}

#[test]
fn a_link_over_a_zero_vector_server_polls_and_carries_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    zero_vector_server(&sock, unsealed_memory(dir.path(), true));
    let join = Attach::join(sock.clone(), true);
    let guest =
        HostLink::open_with(Role::Guest, &join, Config::default(), services::spawn_all).unwrap();
    let host = HostLink::open(Role::Host, &join, Config::default()).unwrap();
    for link in [&guest, &host] {
        assert!(link.why().starts_with("polling: "), "{}", link.why());
        assert!(link.why().contains("no doorbell vectors"), "{}", link.why());
    }
    assert!(host.wait_up(Duration::from_secs(10)));
    let mut s = host.connect(services::PORT_ECHO).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    for chunk in data.chunks(16 << 10) {
        s.write_all(chunk).unwrap();
        let mut back = vec![0u8; chunk.len()];
        s.read_exact(&mut back).unwrap();
        assert!(back == chunk, "echo differs");
    }
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0, "EOF after the echo");
}

#[test]
fn a_shrink_under_an_unsealed_mapping_ends_the_link_not_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let mem = unsealed_memory(dir.path(), false);
    let truncate = mem.try_clone().unwrap();
    zero_vector_server(&sock, mem);
    let c = Client::connect_with(&sock, &allow(true)).unwrap();
    let region = c.region();
    region.store_u64(SIZE as usize - 8, 7, std::sync::atomic::Ordering::Release);
    assert!(!c.memory_lost());
    rustix::fs::ftruncate(&truncate, 0).unwrap();
    // Without the guard this load raises SIGBUS and the test binary dies.
    let v = region.load_u64(SIZE as usize - 8, std::sync::atomic::Ordering::Acquire);
    assert_eq!(v, 0, "the shrunk memory reads as private zeroes");
    let t = Instant::now();
    while !c.memory_lost() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the loss was not noticed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(c.doorbell().peer_present(c.id() + 1), Some(false));
}

#[test]
fn a_shrink_resets_open_sessions_and_both_processes_live_on() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let mem = unsealed_memory(dir.path(), false);
    let truncate = mem.try_clone().unwrap();
    zero_vector_server(&sock, mem);
    let s = sock.to_str().unwrap();
    let mut peer = Kill(
        bin()
            .args(["peer", "--role", "guest", "--join", s, "--allow-unsealed"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let host = HostLink::open(
        Role::Host,
        &Attach::join(sock.clone(), true),
        Config::default(),
    )
    .unwrap();
    assert!(host.wait_up(Duration::from_secs(10)));
    let mut echo = host.connect(services::PORT_ECHO).unwrap();
    echo.write_all(b"before").unwrap();
    let mut got = [0u8; 6];
    echo.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before");
    rustix::fs::ftruncate(&truncate, 0).unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(10)));
    let err = echo.read(&mut got).unwrap_err();
    assert!(
        matches!(err.kind(), std::io::ErrorKind::ConnectionReset),
        "{err:?}"
    );
    // The peer process noticed too, said so on one line, and is still running.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        peer.0.try_wait().unwrap().is_none(),
        "the peer process died"
    );
    peer.0.kill().unwrap();
    let mut stderr = String::new();
    peer.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("the shared memory was shrunk"), "{stderr}");
}

// --- The binary ---

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ivring-host"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).stdin(Stdio::null()).output().unwrap()
}

/// The one line on stderr of a refused command line, with its exit status.
fn refused(args: &[&str]) -> (i32, String) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    (out.status.code().unwrap_or(-1), err)
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &Path) {
    let t = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "no server on {p:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serve_takes_max_peers_mode_and_group() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let gid = rustix::process::getegid().as_raw();
    let _serve = Kill(
        bin()
            .arg("serve")
            .arg("--socket")
            .arg(&sock)
            .args(["--size", "1M", "--max-peers", "2", "--mode", "0660"])
            .args(["--group", &gid.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock);
    let md = std::fs::metadata(&sock).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    assert_eq!(md.gid(), gid);
    // The probe connection above has left by the time the leave is processed.
    let a = Client::connect(&sock).unwrap();
    let t = Instant::now();
    let b = loop {
        match Client::connect(&sock) {
            Ok(b) => break b,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(5), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let err = Client::connect(&sock).unwrap_err();
    assert!(matches!(err, HostError::Protocol { .. }), "{err}");
    drop((a, b));
}

#[test]
fn bad_flags_get_one_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let s = sock.to_str().unwrap();
    let (code, err) = refused(&["serve", "--socket", s, "--max-peers", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-peers"), "{err}");
    let (code, err) = refused(&["serve", "--socket", s, "--mode", "0999"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("octal"), "{err}");
    let (code, err) = refused(&["serve", "--socket", s, "--group", "no-such-group-ivring"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no group named"), "{err}");
    assert!(!sock.exists(), "a refused serve leaves no socket");
    let (code, err) = refused(&["peer", "--plain", s, "--allow-unsealed"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--allow-unsealed"), "{err}");
    let (code, err) = refused(&["bridge", "--listen", s, "--serve", s, "--allow-unsealed"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--join only"), "{err}");
}

#[test]
fn check_is_listed_and_passes_against_a_peer_that_only_serves() {
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    assert!(
        help.lines().any(|l| l.trim_start().starts_with("check ")),
        "{help}"
    );

    // QEMU's server with -n 0 and an unsealed memfd: refused without the flag, then a
    // passing exchange against `peer` (services only, as `ivring-guest serve`).
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    zero_vector_server(&sock, unsealed_memory(dir.path(), false));
    let s = sock.to_str().unwrap();
    let (code, err) = refused(&["check", "--join", s, "--timeout", "5"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--allow-unsealed"), "{err}");
    let _peer = Kill(
        bin()
            .args(["peer", "--role", "guest", "--join", s, "--allow-unsealed"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    let out = run(&[
        "check",
        "--join",
        s,
        "--allow-unsealed",
        "--bytes",
        "100000",
        "--latency",
        "0.2",
        "--timeout",
        "20",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.contains("INFO polling: the ivshmem server gives no doorbell vectors"));
    assert!(text.contains("only serves"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

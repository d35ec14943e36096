//! The ivshmem server protocol (`IVSHMEM.md`, "The ivshmem server protocol") end to end:
//! a real server, real clients, memfds, eventfds and UNIX sockets in a temp dir.

use ivring::Doorbell;
use ivring_ivshmem::shm::{check_memfd, create_sealed_memfd, validate_size};
use ivring_ivshmem::{Client, ConnectOptions, HostError, Server, ServerHandle};
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(5);

/// Polls `cond` until it holds or 5 s pass.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + LONG;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

#[test]
fn two_clients_see_each_other_and_share_memory() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = Server::bind(&sock, SIZE, 2).unwrap().spawn();
    let a = Client::connect(&sock).unwrap();
    let b = Client::connect(&sock).unwrap();
    assert_ne!(a.id(), b.id());
    assert!(
        a.id() != 0 && b.id() != 0,
        "id 0 is only given on the VM socket"
    );
    assert_eq!(a.vectors(), 2);
    assert_eq!(b.vectors(), 2);
    // Handshake step 4: b learnt of a. Announcement: a learns of b.
    assert_eq!(b.peers(), vec![a.id()]);
    assert_eq!(a.wait_for_peer(Some(LONG)), Some(b.id()));
    assert_eq!(a.doorbell().peer_present(b.id()), Some(true));
    assert_eq!(b.doorbell().peer_present(a.id()), Some(true));
    assert!(a.server_alive() && b.server_alive());

    let (ra, rb) = (a.region(), b.region());
    assert_eq!(ra.len() as u64, SIZE);
    ra.store_u64(4096, 0xfeed_f00d, Ordering::Release);
    assert_eq!(rb.load_u64(4096, Ordering::Acquire), 0xfeed_f00d);
    rb.store_u64(SIZE as usize - 8, 7, Ordering::Release);
    assert_eq!(ra.load_u64(SIZE as usize - 8, Ordering::Acquire), 7);
    drop((a, b));
    server.shutdown().unwrap();
    assert!(!sock.exists(), "shutdown removes the socket");
}

/// A server (one vector each) and two clients that have seen each other. The caller
/// keeps the temp dir and the server handle for as long as it uses the clients.
fn two_peers() -> (tempfile::TempDir, ServerHandle, Client, Client) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = Server::bind(&sock, SIZE, 1).unwrap().spawn();
    let a = Client::connect(&sock).unwrap();
    let b = Client::connect(&sock).unwrap();
    a.wait_for_peer(Some(LONG)).unwrap();
    (dir, server, a, b)
}

#[test]
fn ring_wakes_and_wait_times_out() {
    let (_dir, _server, a, b) = two_peers();
    let (da, db) = (a.doorbell(), b.doorbell());

    let t = Instant::now();
    db.wait(Some(Duration::from_millis(100)));
    assert!(
        t.elapsed() >= Duration::from_millis(90),
        "wait returned early unrung"
    );

    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        db.wait(Some(LONG));
        t.elapsed()
    });
    std::thread::sleep(Duration::from_millis(50));
    da.ring(b.id());
    let took = waiter.join().unwrap();
    assert!(took < Duration::from_secs(1), "ring took {took:?} to wake");

    // Rings were consumed: the next wait times out again.
    let t = Instant::now();
    b.doorbell().wait(Some(Duration::from_millis(50)));
    assert!(t.elapsed() >= Duration::from_millis(40));
    // Ringing an unknown peer is ignored.
    da.ring(999);
}

/// The doorbell's waits are edge-triggered and never drain the eventfd: a ring while
/// nobody waits is kept for the next wait, and every wait under way wakes on one ring
/// (the keeper and a caller on the bell at a hand-off) and takes it, so that the waits
/// after it sleep. (A wait may also return early, which the doorbell's contract allows:
/// the first on a new epoll instance when the eventfd was rung before, or one whose
/// instance sat in the pool through a ring.)
#[test]
fn a_ring_is_kept_for_the_next_wait_and_wakes_every_waiter() {
    let (_dir, _server, a, b) = two_peers();
    let (da, db) = (a.doorbell(), b.doorbell());
    // Two waits at once, each for at most `limit`, and a ring by `da` after `ring_after`
    // if given: how long each took.
    let two_waits = |limit: Duration, ring_after: Option<Duration>| {
        let started = std::sync::Arc::new(std::sync::Barrier::new(3));
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (d, started) = (db.clone(), started.clone());
                std::thread::spawn(move || {
                    started.wait();
                    let t = Instant::now();
                    d.wait(Some(limit));
                    t.elapsed()
                })
            })
            .collect();
        started.wait();
        if let Some(after) = ring_after {
            std::thread::sleep(after);
            da.ring(b.id());
        }
        waiters
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    };

    // Rung with nobody waiting: the next wait returns at once.
    da.ring(b.id());
    let t = Instant::now();
    db.wait(Some(LONG));
    assert!(t.elapsed() < Duration::from_secs(1), "a ring was lost");
    // Settle: two rounds of two waits with no ring take what earlier rings left on
    // either instance (the second round's waits all sleep).
    two_waits(Duration::from_millis(50), None);
    for took in two_waits(Duration::from_millis(50), None) {
        assert!(
            took >= Duration::from_millis(40),
            "a wait woke unrung: {took:?}"
        );
    }
    // One ring wakes both waits under way.
    for took in two_waits(LONG, Some(Duration::from_millis(100))) {
        assert!(
            (Duration::from_millis(50)..Duration::from_secs(1)).contains(&took),
            "a waiter woke after {took:?}: before the ring, or not for it"
        );
    }
    // Both took it: the waits after it sleep.
    for took in two_waits(Duration::from_millis(50), None) {
        assert!(
            took >= Duration::from_millis(40),
            "a ring woke a later wait"
        );
    }
}

#[test]
fn leave_is_announced_and_interrupts_and_rejoin_gets_new_id() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let _server = Server::bind(&sock, SIZE, 1).unwrap().spawn();
    let a = Client::connect(&sock).unwrap();
    let b = Client::connect(&sock).unwrap();
    a.wait_for_peer(Some(LONG)).unwrap();
    let old_b = b.id();
    let da = a.doorbell();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        da.wait(Some(LONG));
        t.elapsed()
    });
    std::thread::sleep(Duration::from_millis(50));
    drop(b);
    let took = waiter.join().unwrap();
    assert!(
        took < Duration::from_secs(1),
        "leave did not interrupt wait ({took:?})"
    );
    assert!(eventually(
        || a.doorbell().peer_present(old_b) == Some(false)
    ));
    assert!(a.peers().is_empty());

    let b2 = Client::connect(&sock).unwrap();
    assert!(
        b2.id() != a.id() && b2.id() != old_b,
        "rejoin reused id {old_b}"
    );
    assert!(eventually(
        || a.doorbell().peer_present(b2.id()) == Some(true)
    ));
    assert!(b2.peers().contains(&a.id()));
    // Still the same memory.
    a.region().store_u64(64, 99, Ordering::Release);
    assert_eq!(b2.region().load_u64(64, Ordering::Acquire), 99);
}

#[test]
fn server_death_is_noticed_and_memory_stays() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = Server::bind(&sock, SIZE, 1).unwrap().spawn();
    let a = Client::connect(&sock).unwrap();
    server.shutdown().unwrap();
    assert!(eventually(|| !a.server_alive()));
    assert_eq!(a.doorbell().peer_present(a.id() + 1), None);
    a.region().store_u64(0, 1, Ordering::Relaxed);
    assert_eq!(a.region().load_u64(0, Ordering::Relaxed), 1);
}

#[test]
fn socket_is_0600_and_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = Server::bind(&sock, SIZE, 1).unwrap().spawn();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let err = Server::bind(&sock, SIZE, 1).unwrap_err();
    assert!(matches!(err, HostError::SocketInUse { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by a running server"),
        "{err}"
    );
    // The live server is unharmed.
    Client::connect(&sock).unwrap();
    drop(server);
    assert!(!sock.exists());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let _server = Server::bind(&sock, SIZE, 1).unwrap().spawn();
    Client::connect(&sock).unwrap();
}

#[test]
fn regular_file_at_socket_path_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let err = Server::bind(&path, SIZE, 1).unwrap_err();
    assert!(matches!(err, HostError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn bad_sizes_and_vectors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    for size in [12345, 4096, (1 << 20) + 1, 2 << 30] {
        let err = Server::bind(&sock, size, 1).unwrap_err();
        assert!(matches!(err, HostError::BadSize { .. }), "{size}: {err}");
        assert!(err.to_string().contains("power of two"), "{err}");
        assert!(!sock.exists());
    }
    let msg = validate_size("/dev/shm/x", 12345).unwrap_err().to_string();
    assert!(
        msg.contains("/dev/shm/x is 12345 bytes") && msg.contains("size=64K"),
        "{msg}"
    );
    let msg = validate_size("x", 3 << 20).unwrap_err().to_string();
    assert!(msg.contains("size=4M"), "{msg}");
    assert_eq!(validate_size("x", 1 << 16).unwrap(), 1 << 16);
    let err = Server::bind(&sock, SIZE, 0).unwrap_err();
    assert!(matches!(err, HostError::BadVectors { .. }), "{err}");
}

#[test]
fn check_memfd_accepts_only_sealed_memfds() {
    let fd = create_sealed_memfd("t", SIZE).unwrap();
    check_memfd(fd.as_fd()).unwrap();
    ivring_ivshmem::shm::map_memfd(fd.as_fd()).unwrap();

    let (r, _w) = std::io::pipe().unwrap();
    let err = check_memfd(r.as_fd()).unwrap_err();
    assert!(matches!(err, HostError::NotMemfd { .. }), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("f")).unwrap();
    let err = check_memfd(file.as_fd()).unwrap_err();
    // On tmpfs a file is a shmem file without F_SEAL_SHRINK; elsewhere, not a memfd.
    assert!(
        matches!(
            err,
            HostError::NotMemfd { .. } | HostError::NotSealed { .. }
        ),
        "{err}"
    );
}

#[test]
fn plain_file_maps_and_is_shared() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shm");
    let f = ivring_ivshmem::shm::open_or_create_file(&path, 1 << 16).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 16);
    let r1 = ivring_ivshmem::shm::map_file(&path).unwrap();
    let r2 = ivring_ivshmem::shm::map_file(&path).unwrap();
    r1.store_u64(8, 5, Ordering::Release);
    assert_eq!(r2.load_u64(8, Ordering::Acquire), 5);
    // Reopening with another size is refused, and the file keeps its size.
    assert!(ivring_ivshmem::shm::open_or_create_file(&path, 1 << 17).is_err());
    std::fs::write(dir.path().join("small"), b"x").unwrap();
    let err = ivring_ivshmem::shm::map_file(&dir.path().join("small")).unwrap_err();
    assert!(matches!(err, HostError::BadSize { .. }), "{err}");
}

#[test]
fn peer_limit_refuses_the_extra_peer() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let _server = Server::bind(&sock, SIZE, 1)
        .unwrap()
        .with_max_peers(2)
        .spawn();
    let _a = Client::connect(&sock).unwrap();
    let b = Client::connect(&sock).unwrap();
    let err = Client::connect(&sock).unwrap_err();
    assert!(matches!(err, HostError::Protocol { .. }), "{err}");
    drop(b);
    // A slot is free again once the leave is processed.
    assert!(eventually(|| Client::connect(&sock).is_ok()));
}

// --- A scripted server, to test the client against bad or unusual servers. ---

/// Sends raw bytes with optional fds in one sendmsg.
fn send_raw(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    match rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    ) {
        // A client that refuses what it got so far may hang up before the script ends.
        Ok(_) | Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {}
        Err(e) => panic!("scripted server send: {e}"),
    }
}

fn send(sock: &UnixStream, val: i64, fds: &[BorrowedFd<'_>]) {
    send_raw(sock, &val.to_le_bytes(), fds);
}

fn eventfd() -> OwnedFd {
    use rustix::event::EventfdFlags;
    rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
}

/// Runs `script` as the server side of one connection at `path`, then holds the
/// connection open until the client closes it.
fn scripted(
    path: &Path,
    script: impl FnOnce(&UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        script(&s);
        // Hold the socket until the client goes.
        let _ = std::io::Read::read(&mut &s, &mut [0u8; 1]);
    })
}

#[test]
fn client_rejects_other_protocol_versions() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let t = scripted(&sock, |s| send(s, 1, &[]));
    let err = Client::connect(&sock).unwrap_err();
    assert!(
        matches!(err, HostError::BadVersion { version: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("version 1"), "{err}");
    t.join().unwrap();
}

#[test]
fn client_joins_a_foreign_server_with_split_messages() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let mem = create_sealed_memfd("fake", SIZE).unwrap();
    let peer7 = eventfd();
    let own = [eventfd(), eventfd()];
    let own_dup: Vec<OwnedFd> = own.iter().map(|f| f.try_clone().unwrap()).collect();
    let t = scripted(&sock, move |s| {
        // Every message in two pieces: the client must join short reads.
        for (val, fd) in [(0i64, None), (3, None), (-1, Some(mem.as_fd()))] {
            let b = val.to_le_bytes();
            send_raw(s, &b[..5], fd.as_slice());
            send_raw(s, &b[5..], &[]);
        }
        send(s, 7, &[peer7.as_fd()]);
        send(s, 3, &[own_dup[0].as_fd()]);
        send(s, 3, &[own_dup[1].as_fd()]);
        std::thread::sleep(Duration::from_millis(200));
        send(s, 7, &[]); // peer 7 leaves
    });
    let c = Client::connect(&sock).unwrap();
    assert_eq!(c.id(), 3);
    assert_eq!(c.vectors(), 2);
    assert_eq!(c.peers(), vec![7]);
    assert_eq!(c.doorbell().peer_present(7), Some(true));
    // Ringing our vector 0 (as peer 7 would) wakes our wait.
    rustix::io::write(&own[0], &1u64.to_ne_bytes()).unwrap();
    let t0 = Instant::now();
    c.doorbell().wait(Some(LONG));
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(eventually(|| c.doorbell().peer_present(7) == Some(false)));
    drop(c);
    t.join().unwrap();
}

#[test]
fn client_refuses_unsealed_memory_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    for allow in [false, true] {
        let sock = dir.path().join(format!("s{allow}"));
        let mem = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&mem, SIZE).unwrap();
        let own = eventfd();
        let t = scripted(&sock, move |s| {
            send(s, 0, &[]);
            send(s, 1, &[]);
            send(s, -1, &[mem.as_fd()]);
            send(s, 1, &[own.as_fd()]);
        });
        let opts = ConnectOptions {
            allow_unsealed: allow,
            ..Default::default()
        };
        match Client::connect_with(&sock, &opts) {
            Ok(c) => assert!(allow, "unsealed memfd accepted: {c:?}"),
            Err(e) => {
                assert!(!allow, "{e}");
                assert!(matches!(e, HostError::NotSealed { .. }), "{e}");
            }
        }
        t.join().unwrap();
    }
}

#[test]
fn client_times_out_on_a_silent_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let t = scripted(&sock, |_| {});
    let opts = ConnectOptions {
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let err = Client::connect_with(&sock, &opts).unwrap_err();
    assert!(matches!(err, HostError::HandshakeTimeout { .. }), "{err}");
    t.join().unwrap();
}

#[test]
fn client_rejects_two_fds_in_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let t = scripted(&sock, |s| {
        let (e1, e2) = (eventfd(), eventfd());
        send(s, 0, &[]);
        send(s, 1, &[]);
        send(s, -1, &[e1.as_fd(), e2.as_fd()]);
    });
    let err = Client::connect(&sock).unwrap_err();
    assert!(matches!(err, HostError::BadFds { count: 2, .. }), "{err}");
    t.join().unwrap();
}

#[test]
fn vm_socket_gives_id_zero_to_one_vm_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let vm_sock = dir.path().join("vm");
    let server = Server::bind(&sock, SIZE, 1)
        .unwrap()
        .with_vm_socket(&vm_sock)
        .unwrap();
    assert_eq!(server.vm_socket(), Some(vm_sock.as_path()));
    let mode = std::fs::metadata(&vm_sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let server = server.spawn();
    // A host program may join before the VM: it never takes 0.
    let host = Client::connect(&sock).unwrap();
    assert_ne!(host.id(), 0);
    let vm = Client::connect(&vm_sock).unwrap();
    assert_eq!(vm.id(), 0, "QEMU's master=on requires id 0");
    assert_eq!(host.wait_for_peer(Some(LONG)), Some(0));
    assert_eq!(vm.peers(), vec![host.id()]);
    // A second VM while the first is there: refused.
    assert!(Client::connect(&vm_sock).is_err());
    let later = Client::connect(&sock).unwrap();
    assert!(later.id() != 0 && later.id() != host.id());
    // The VM leaves (a migration's source QEMU quits); the next VM gets 0 again.
    drop(vm);
    assert!(eventually(|| host.doorbell().peer_present(0) == Some(false)));
    let vm2 = Client::connect(&vm_sock).unwrap();
    assert_eq!(vm2.id(), 0);
    assert!(eventually(|| host.doorbell().peer_present(0) == Some(true)));
    drop((vm2, host, later));
    server.shutdown().unwrap();
    assert!(
        !sock.exists() && !vm_sock.exists(),
        "shutdown removes both sockets"
    );
}

#[test]
fn vm_socket_must_differ_from_the_main_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let err = Server::bind(&sock, SIZE, 1)
        .unwrap()
        .with_vm_socket(&sock)
        .unwrap_err();
    assert!(err.to_string().contains("path of its own"), "{err}");
}

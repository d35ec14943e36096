//! `ivring-guest --join` against a server like QEMU's own ivshmem-server started with
//! `-M NAME -n 0`: unsealed memory (refused unless `--allow-unsealed`) and no doorbell
//! vectors (the link polls). The host side is `ivring-host`'s library in this process.

use ivring::{Config, Role};
use ivring_ivshmem::attach::{Attach, HostLink};
use ivring_tools::services;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn send(sock: &UnixStream, val: i64, fd: Option<BorrowedFd<'_>>) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = fd.map(|f| [f]);
    if let Some(fds) = &fds {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let _ = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&val.to_le_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}

/// Every peer gets the version, an id from 0 and an unsealed memfd, and nothing else (as
/// `ivshmem-server -M NAME -n 0`). The connections stay open until the test ends.
fn zero_vector_server(path: &Path) {
    let mem: OwnedFd =
        rustix::fs::memfd_create("qemu-like", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&mem, 1 << 20).unwrap();
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for (id, s) in listener.incoming().enumerate() {
            let s = s.unwrap();
            send(&s, 0, None);
            send(&s, id as i64, None);
            send(&s, -1, Some(mem.as_fd()));
            held.push(s);
        }
    });
}

fn guest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ivring-guest"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn allow_unsealed_is_refused_without_join() {
    let out = guest(&["serve", "--plain", "/nonexistent", "--allow-unsealed"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--allow-unsealed"), "{err}");
}

#[test]
fn guest_check_joins_an_unsealed_zero_vector_server_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    zero_vector_server(&sock);
    let s = sock.to_str().unwrap();

    let out = guest(&["check", "--join", s, "--timeout", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not sealed") && err.contains("--allow-unsealed"),
        "{err}"
    );

    // The host side only serves, as `ivring-host peer` does.
    let _host = HostLink::open_with(
        Role::Host,
        &Attach::join(sock.clone(), true),
        Config::default(),
        services::spawn_all,
    )
    .unwrap();
    let out = guest(&[
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
    assert!(
        text.contains("INFO polling: the ivshmem server gives no doorbell vectors"),
        "{text}"
    );
}

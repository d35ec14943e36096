//! `Type=notify`: `serve` and `bridge` tell systemd they are ready (a `READY=1` datagram
//! to `$NOTIFY_SOCKET`) only once their sockets accept connections.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ivring-host");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `args` with `NOTIFY_SOCKET=notify_name`, waits for the datagram on `notify`, and
/// checks that `sock` accepts at that moment. Returns the message.
fn ready_then_accepting(
    args: &[&str],
    notify: &UnixDatagram,
    notify_name: &str,
    sock: &Path,
) -> String {
    let _child = Kill(
        Command::new(BIN)
            .args(args)
            .env("NOTIFY_SOCKET", notify_name)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("no READY=1 within 20 s");
    // No retry: the socket must accept the moment readiness is reported.
    UnixStream::connect(sock).expect("ready, but the socket does not accept");
    // Exactly one message.
    notify
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(notify.recv(&mut buf).is_err(), "a second notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serve_is_ready_once_its_socket_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let sock = dir.path().join("ivshmem.sock");
    let msg = ready_then_accepting(
        &["serve", "--size", "64K", "--socket", sock.to_str().unwrap()],
        &notify,
        notify_path.to_str().unwrap(),
        &sock,
    );
    assert!(msg.starts_with("READY=1\n"), "{msg:?}");
    assert!(msg.contains("STATUS=serving"), "{msg:?}");
}

#[test]
fn bridge_is_ready_once_its_socket_accepts_abstract_notify_socket() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("ivring-notify-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let notify = UnixDatagram::bind_addr(&addr).unwrap();
    let listen = dir.path().join("qga.sock");
    let shm = dir.path().join("shm");
    let msg = ready_then_accepting(
        &[
            "bridge",
            "--listen",
            listen.to_str().unwrap(),
            "--plain",
            shm.to_str().unwrap(),
            "--size",
            "1M",
        ],
        &notify,
        &format!("@{name}"),
        &listen,
    );
    assert!(msg.starts_with("READY=1\n"), "{msg:?}");
}

#[test]
fn nothing_is_sent_without_notify_socket() {
    // Not started by systemd: the daemon runs as usual.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let mut c = Kill(
        Command::new(BIN)
            .args(["serve", "--size", "64K", "--socket", sock.to_str().unwrap()])
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.0.try_wait().unwrap().is_none());
}

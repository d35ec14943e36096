//! `ivring-host bridge` as a program: the socket it offers (mode, group, in use, stale),
//! and bytes carried both ways with half-closes, against the echo service of an
//! in-process "guest" on a plain shared file.

use ivring::{Config, Role};
use ivring_host::attach::{Attach, HostLink};
use ivring_tools::services;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bridge(listen: &Path, plain: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ivring-host"));
    c.arg("bridge")
        .arg("--listen")
        .arg(listen)
        .arg("--plain")
        .arg(plain)
        .args(["--size", "1M"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn wait_listening(p: &Path) {
    let t = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "bridge did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn socket_mode_in_use_stale_and_relay() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    let shm = dir.path().join("shm");

    let first = Kill(bridge(&sock, &shm, &["--port", "1"]).spawn().unwrap());
    wait_listening(&sock);
    let md = std::fs::metadata(&sock).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);

    // In use: a one-line error, exit status 1.
    let out = bridge(&sock, &shm, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("in use"), "{err}");

    // The guest side: echo on port 1 over the same plain file.
    let guest = HostLink::open(
        Role::Guest,
        &Attach::Plain {
            file: shm.clone(),
            size: None,
        },
        Config::default(),
    )
    .unwrap();
    services::spawn_all(&guest).unwrap();

    // 1 MiB through, half-close, all of it back, then EOF.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let w = {
        let mut c = c.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            c.write_all(&data).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    w.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echo differs");

    // Killed, it leaves a stale socket; the next bridge replaces it, with --mode/--group.
    drop(first);
    assert!(sock.exists());
    let gid = std::fs::metadata(dir.path()).unwrap().gid().to_string();
    let second = Kill(
        bridge(&sock, &shm, &["--mode", "0660", "--group", &gid])
            .spawn()
            .unwrap(),
    );
    wait_listening(&sock);
    let md = std::fs::metadata(&sock).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    assert_eq!(md.gid().to_string(), gid);

    // The guest side lived through the host bridge's restart: the new bridge (port 5 by
    // default: nothing listens there) refuses, then a third on port 1 echoes again.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"x").unwrap();
    let mut b = Vec::new();
    assert!(
        matches!(c.read_to_end(&mut b), Ok(0) | Err(_)),
        "EOF for a refused session"
    );
    drop(second);
    let _third = Kill(bridge(&sock, &shm, &["--port", "1"]).spawn().unwrap());
    wait_listening(&sock);
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"after the restart").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut b = Vec::new();
    c.read_to_end(&mut b).unwrap();
    assert_eq!(b, b"after the restart");

    // Not a socket: refused, one line.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = bridge(&file, &shm, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    drop(guest);
}

//! `ivring-host status`: the state of a running link read from outside, in text and JSON,
//! without disturbing it.

use ivring::{Config, Role};
use ivring_host::attach::{Attach, HostLink};
use ivring_host::Server;
use std::io::{BufRead, BufReader};
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

/// Exit status and stdout of `status` with `args`.
fn status(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).arg("status").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "{err}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn json(args: &[&str]) -> (i32, serde_json::Value) {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out) = status(&a);
    (code, serde_json::from_str(out.trim()).unwrap())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn status_of_a_served_link_as_it_forms() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ivshmem.sock");
    let _server = Server::bind(&sock, 1 << 20, 1).unwrap().spawn();
    let (code, out) = status(&["--join", s(&sock)]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("state   empty"), "{out}");

    let mut c = Command::new(BIN)
        .args(["peer", "--role", "host", "--join", s(&sock)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _host = Kill(c);
    let (code, v) = json(&["--join", s(&sock)]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["state"], "waiting", "{v}");
    assert_eq!(v["host"]["alive"], true, "{v}");
    assert!(v["guest"]["peer_id"].is_null(), "{v}");

    let guest =
        HostLink::open(Role::Guest, &Attach::Join(sock.clone()), Config::default()).unwrap();
    assert!(guest.wait_up(Duration::from_secs(10)));
    let resets = guest.stats().link_resets;
    let (code, v) = json(&["--join", s(&sock)]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["state"], "up", "{v}");
    assert_eq!(v["size"], 1 << 20);
    assert_eq!(v["link"], format!("server {}", sock.display()));
    assert_eq!(v["guest"]["peer_id"], guest.peer_id().unwrap(), "{v}");
    assert!(v["host"]["peer_id"].as_u64().is_some(), "{v}");
    assert_eq!(v["host"]["ack"], v["guest"]["epoch"], "{v}");
    assert_eq!(v["guest"]["ack"], v["host"]["epoch"], "{v}");
    // Looking did not disturb the link: no reset, still up.
    std::thread::sleep(Duration::from_millis(500));
    assert!(guest.is_up());
    assert_eq!(guest.stats().link_resets, resets);

    let (code, out) = status(&["--join", s(&sock)]);
    assert_eq!(code, 0);
    assert!(out.contains("state   up"), "{out}");
    assert!(out.contains("rings of 510 KiB each"), "{out}");
}

#[test]
fn status_of_a_plain_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let shm = dir.path().join("shm");
    let host = HostLink::open(
        Role::Host,
        &Attach::Plain {
            file: shm.clone(),
            size: Some(1 << 20),
        },
        Config::default(),
    )
    .unwrap();
    let (code, v) = json(&["--plain", s(&shm)]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["state"], "waiting", "{v}");
    drop(host);
    std::thread::sleep(Duration::from_millis(200));
    let before = std::fs::read(&shm).unwrap();
    let (code, v) = json(&["--plain", s(&shm)]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["state"], "down", "{v}");
    assert_eq!(
        std::fs::read(&shm).unwrap(),
        before,
        "status wrote to the file"
    );
    // Someone else's data.
    std::fs::write(&shm, vec![0x41u8; 64 << 10]).unwrap();
    let (code, v) = json(&["--plain", s(&shm)]);
    assert_eq!((code, &v["state"]), (3, &"unusable".into()), "{v}");
}

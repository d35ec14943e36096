//! `ivring-host daemon` and `ivring-host vm`: the control protocol, and a VM's lifecycle
//! (add, a guest joining, an agent client carried to the guest's port, removal while the
//! client is connected, a daemon restart restoring the VM list, recover).
//!
//! The guest is simulated in this process: a guest-role endpoint joined to the VM's
//! ivshmem socket, echoing on the agent's port.

use ivring::{Config, Endpoint};
use ivring_host::Client;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ivring-host");

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(dir: &Path) -> Daemon {
    let c = Command::new(BIN)
        .args(["daemon", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(dir.join("daemon.log"))
                .unwrap_or_else(|_| std::fs::File::create("/dev/null").expect("/dev/null")),
        )
        .spawn()
        .expect("start the daemon");
    let d = Daemon(c);
    wait_for(&dir.join("control.sock"));
    // The socket file exists a moment before the daemon accepts on it.
    let t = Instant::now();
    while UnixStream::connect(dir.join("control.sock")).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "daemon never accepted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vm(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("vm")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run ivring-host vm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One raw control request, answered with one line.
fn control(dir: &Path, line: &str) -> Value {
    let s = UnixStream::connect(dir.join("control.sock")).expect("connect control.sock");
    (&s).write_all(line.as_bytes()).unwrap();
    (&s).write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).expect("a JSON answer")
}

fn tmpdir() -> PathBuf {
    let d = tempfile::Builder::new()
        .prefix("ivring-daemon-test")
        .tempdir()
        .expect("tempdir");
    d.keep()
}

/// A simulated guest: joins the VM's socket, echoes every session on port 5.
struct Guest {
    _ep: std::sync::Arc<Endpoint>,
    _client: Client,
}

fn start_guest(sock: &Path) -> Guest {
    let client = Client::connect(sock).expect("join the VM's ivshmem socket");
    let ep = std::sync::Arc::new(
        Endpoint::guest(client.region(), client.doorbell(), Config::default()).expect("guest"),
    );
    let l = ep.listen(5).expect("listen on 5");
    std::thread::spawn(move || {
        while let Ok(mut s) = l.accept() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Guest {
        _ep: ep,
        _client: client,
    }
}

fn list(dir: &Path) -> Value {
    let o = vm(dir, &["list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn control_protocol_and_errors() {
    let dir = tmpdir();
    // No daemon: one line that says how to start it, non-zero exit.
    let o = vm(&dir, &["list"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("not running") && e.contains("ivring-host daemon") && e.lines().count() == 1,
        "{e}"
    );

    let _d = start_daemon(&dir);
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&dir.join("control.sock")), 0o600);

    let o = vm(&dir, &["add", "a1", "--size", "256K"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&dir.join("a1.ivshmem.sock")), 0o600);
    assert_eq!(mode(&dir.join("a1.qga.sock")), 0o600);

    // Name taken, bad name, bad size: one line each, non-zero.
    let o = vm(&dir, &["add", "a1"]);
    assert!(
        !o.status.success() && stderr(&o).contains("already served"),
        "{}",
        stderr(&o)
    );
    assert!(vm(&dir, &["add", "a1", "--if-missing"]).status.success());
    let o = vm(&dir, &["add", "../x"]);
    assert!(
        !o.status.success() && stderr(&o).contains("bad VM name"),
        "{}",
        stderr(&o)
    );
    let o = vm(&dir, &["add", "a2", "--size", "3M"]);
    assert!(
        !o.status.success() && stderr(&o).contains("power of two"),
        "{}",
        stderr(&o)
    );
    let o = vm(&dir, &["remove", "nope"]);
    assert!(
        !o.status.success() && stderr(&o).contains("no VM named nope"),
        "{}",
        stderr(&o)
    );
    assert!(vm(&dir, &["remove", "nope", "--if-exists"])
        .status
        .success());

    // The raw protocol: bad JSON and unknown ops are answered, not fatal.
    let a = control(&dir, "not json");
    assert_eq!(a["ok"], json!(false));
    let a = control(&dir, r#"{"op":"frobnicate"}"#);
    assert!(a["error"].as_str().unwrap().contains("unknown request"));
    let a = control(
        &dir,
        r#"{"op":"add","vm":{"name":"raw","size":65536,"agent":false}}"#,
    );
    assert_eq!(a["ok"], json!(true), "{a}");
    assert!(a["vm"]["agent_socket"].is_null());
    assert!(!dir.join("raw.qga.sock").exists());

    let l = list(&dir);
    let names: Vec<&str> = l["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a1", "raw"]);
    // The state file lists them too.
    let st: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vms.json")).unwrap()).unwrap();
    assert_eq!(st["vms"].as_array().unwrap().len(), 2);

    assert!(vm(&dir, &["remove", "a1"]).status.success());
    assert!(!dir.join("a1.ivshmem.sock").exists());
    assert!(!dir.join("a1.qga.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lifecycle_client_removed_restart_recover() {
    let dir = tmpdir();
    let d = start_daemon(&dir);
    let o = vm(&dir, &["add", "g1", "--size", "256K"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let guest = start_guest(&dir.join("g1.ivshmem.sock"));

    // A client of the agent socket reaches the guest's port 5.
    let c = UnixStream::connect(dir.join("g1.qga.sock")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    (&c).write_all(b"{\"execute\":\"guest-ping\"}\n").unwrap();
    let mut r = BufReader::new(&c);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"execute\":\"guest-ping\"}\n");
    let l = list(&dir);
    assert_eq!(l["vms"][0]["link_up"], json!(true), "{l}");
    assert_eq!(l["vms"][0]["peers"], json!(1), "{l}");

    // Removed while the client is connected: the client gets EOF, the sockets go.
    let o = vm(&dir, &["remove", "g1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    line.clear();
    assert_eq!(
        r.read_line(&mut line).unwrap(),
        0,
        "EOF expected, got {line:?}"
    );
    assert!(!dir.join("g1.ivshmem.sock").exists());
    assert!(!dir.join("g1.qga.sock").exists());
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
    assert!(log.contains("removed while client"), "{log}");
    drop(guest);

    // A daemon restart restores the list, with new memory: flagged until recovered.
    assert!(vm(
        &dir,
        &["add", "g2", "--size", "128K", "--max-sessions", "3"]
    )
    .status
    .success());
    drop(d);
    let _d = start_daemon(&dir);
    let l = list(&dir);
    let v = &l["vms"][0];
    assert_eq!(v["name"], json!("g2"));
    assert_eq!(v["size"], json!(128 << 10));
    assert_eq!(v["max_sessions"], json!(3));
    assert_eq!(v["needs_recover"], json!(true));
    let o = vm(&dir, &["recover", "g2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(list(&dir)["vms"][0]["needs_recover"], json!(false));

    // After recover, a guest that joins the same socket path gets a working link.
    let _guest = start_guest(&dir.join("g2.ivshmem.sock"));
    let c = UnixStream::connect(dir.join("g2.qga.sock")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    (&c).write_all(b"hello\n").unwrap();
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).unwrap();
    assert_eq!(line, "hello\n");
    let _ = std::fs::remove_dir_all(&dir);
}

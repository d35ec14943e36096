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
    ep: std::sync::Arc<Endpoint>,
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
        ep,
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
    // The link is driven by the daemon's links thread: no keeper thread of its own.
    assert_eq!(l["keeper_threads"], json!(0), "{l}");
    assert_eq!(l["driven_links"], json!(1), "{l}");

    // Removed while the client is connected: the client gets EOF, the sockets go.
    let o = vm(&dir, &["remove", "g1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The guest sees the host leave (its link resets), and the link is no longer driven.
    let t = Instant::now();
    while guest.ep.is_up() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the guest's link stayed up after the VM was removed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    while list(&dir)["driven_links"] != json!(0) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the removed VM's link is still driven"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// A stand-in for systemd's fd store: keeps what `FDSTORE=1` hands it, forgets what
/// `FDSTOREREMOVE=1` names.
fn fake_store(
    sock: std::os::unix::net::UnixDatagram,
) -> std::sync::Arc<std::sync::Mutex<Vec<(String, std::os::fd::OwnedFd)>>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::mem::MaybeUninit;
    let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let k = kept.clone();
    std::thread::spawn(move || loop {
        let mut buf = [0u8; 4096];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let Ok(m) = rustix::net::recvmsg(&sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
        else {
            return;
        };
        let mut fds = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(it) = msg {
                fds.extend(it);
            }
        }
        let text = String::from_utf8_lossy(&buf[..m.bytes]).into_owned();
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or("stored")
            .to_owned();
        let mut kept = k.lock().unwrap();
        if text.lines().any(|l| l == "FDSTORE=1") {
            kept.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
        } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
            kept.retain(|(n, _)| *n != name);
        }
    });
    kept
}

#[test]
fn restart_with_fd_store_keeps_the_guest() {
    use std::os::fd::{AsRawFd, OwnedFd};
    let dir = tmpdir();
    let notify = dir.join("notify.sock");
    let kept = fake_store(std::os::unix::net::UnixDatagram::bind(&notify).unwrap());
    let start = |fds: Vec<(String, OwnedFd)>| -> Daemon {
        use std::os::unix::process::CommandExt;
        let names: Vec<String> = fds.iter().map(|(n, _)| n.clone()).collect();
        // Above any fd the child might get otherwise: moved to 3.. in the child.
        let high: Vec<OwnedFd> = fds
            .iter()
            .map(|(_, fd)| rustix::io::fcntl_dupfd_cloexec(fd, 1000).unwrap())
            .collect();
        let raw: Vec<i32> = high.iter().map(|f| f.as_raw_fd()).collect();
        let mut c = Command::new("sh");
        // LISTEN_PID is the shell's pid, which exec keeps for the daemon.
        c.args([
            "-c",
            "LISTEN_PID=$$ exec \"$0\" daemon --fd-store --dir \"$1\"",
            BIN,
        ])
        .arg(&dir)
        .env("NOTIFY_SOCKET", &notify)
        .env("LISTEN_FDS", raw.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("daemon.log"))
                .unwrap(),
        );
        // SAFETY: between fork and exec the closure only calls dup2, which is
        // async-signal-safe, on fds this process owns (`high`, alive until spawn returns).
        unsafe {
            c.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = c.spawn().expect("start the daemon");
        drop(high);
        let d = Daemon(child);
        let t = Instant::now();
        while UnixStream::connect(dir.join("control.sock")).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon never accepted"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    };
    let d = start(Vec::new());
    let o = vm(&dir, &["add", "k1", "--size", "256K"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let _guest = start_guest(&dir.join("k1.ivshmem.sock"));
    let echo = |what: &str| {
        let c = UnixStream::connect(dir.join("k1.qga.sock")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        (&c).write_all(what.as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        line
    };
    assert_eq!(echo("before\n"), "before\n");
    let l = list(&dir);
    assert_eq!(l["fd_store"], json!(true), "{l}");
    // Memory, socket, agent socket, our vector, the guest's socket and vector.
    let t = Instant::now();
    while kept.lock().unwrap().len() < 6 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let names: Vec<String> = kept
        .lock()
        .unwrap()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");

    // The daemon dies; the service manager starts it again with what it kept.
    drop(d);
    let fds: Vec<(String, OwnedFd)> = kept
        .lock()
        .unwrap()
        .iter()
        .map(|(n, fd)| (n.clone(), fd.try_clone().unwrap()))
        .collect();
    let _d = start(fds);
    let l = list(&dir);
    let v = &l["vms"][0];
    assert_eq!(v["needs_recover"], json!(false), "{l}");
    assert_eq!(v["peers"], json!(1), "the guest is still connected: {l}");
    // The same guest process, never rejoined, answers through the new daemon.
    assert_eq!(echo("after\n"), "after\n");
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
    assert!(log.contains("taken up again from the fd store"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn threads_do_not_grow_with_the_vms() {
    let dir = tmpdir();
    let _d = start_daemon(&dir);
    let before = list(&dir);
    let threads = before["threads"].as_u64().unwrap();
    for i in 0..20 {
        let o = vm(&dir, &["add", &format!("t{i}"), "--size", "64K"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // One guest, so that one link is up beside nineteen waiting for theirs.
    let guest = start_guest(&dir.join("t0.ivshmem.sock"));
    assert!(
        guest.ep.wait_up(Duration::from_secs(5)),
        "t0's link comes up"
    );
    let l = list(&dir);
    assert_eq!(l["threads"].as_u64().unwrap(), threads, "{before} then {l}");
    assert_eq!(l["keeper_threads"], json!(0), "{l}");
    assert_eq!(l["driven_links"], json!(20), "{l}");
    let o = vm(&dir, &["list"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("0.00 per VM; 20 links driven by one thread"),
        "{out}"
    );
    for i in 0..20 {
        assert!(vm(&dir, &["remove", &format!("t{i}")]).status.success());
    }
    let t = Instant::now();
    while list(&dir)["driven_links"] != json!(0) {
        assert!(t.elapsed() < Duration::from_secs(5), "links still driven");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(list(&dir)["threads"].as_u64().unwrap(), threads);
    let _ = std::fs::remove_dir_all(&dir);
}

//! The binaries' logs: `-q` and `RUST_LOG` silence them, and what happens to a link (up,
//! a refused session, the peer gone) is logged once, naming the link.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ivring-host");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child whose stderr lines are collected as they come.
struct Logged {
    child: Kill,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    fn spawn(cmd: &mut Command) -> Logged {
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Logged {
            child: Kill(child),
            lines,
        }
    }

    fn count(&self, pat: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(pat))
            .count()
    }

    fn wait_for(&self, pat: &str, limit: Duration) {
        let t = Instant::now();
        while self.count(pat) == 0 {
            assert!(
                t.elapsed() < limit,
                "no line with {pat:?} in {limit:?}: {:#?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// Waits for the server's socket to exist (it listens from then on). A probing connect
/// would itself count as a peer that came and went.
fn wait_listening(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "never accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn quiet_and_rust_log_silence_the_informational_lines() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (flag, env)) in [(None, None), (Some("-q"), None), (None, Some("warn"))]
        .into_iter()
        .enumerate()
    {
        let sock = dir.path().join(format!("s{i}.sock"));
        let mut cmd = Command::new(BIN);
        cmd.args(flag)
            .args(["serve", "--size", "64K", "--socket"])
            .arg(&sock)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM");
        if let Some(env) = env {
            cmd.env("RUST_LOG", env);
        }
        let served = Logged::spawn(&mut cmd);
        wait_listening(&sock);
        // A joined and departed peer: logged at info.
        let peer = ivring_host::Client::connect(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(peer);
        std::thread::sleep(Duration::from_millis(300));
        let lines = served.all();
        if flag.is_none() && env.is_none() {
            served.wait_for("serving 64 KiB on", Duration::from_secs(1));
            served.wait_for("peer 1 joined", Duration::from_secs(2));
            served.wait_for("peer 1 left", Duration::from_secs(2));
        } else {
            assert!(lines.is_empty(), "{flag:?} {env:?}: {lines:#?}");
        }
    }
}

#[test]
fn link_events_are_logged_once_with_the_link() {
    use ivring::{Config, Role};
    use ivring_host::attach::{Attach, HostLink};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ivshmem.sock");
    let _server = ivring_host::Server::bind(&sock, 1 << 20, 1)
        .unwrap()
        .spawn();
    let link = format!("server {}", sock.display());
    let host = Logged::spawn(
        Command::new(BIN)
            .args(["peer", "--role", "host", "--join"])
            .arg(&sock)
            .env_remove("RUST_LOG"),
    );
    host.wait_for("waiting for the other side", Duration::from_secs(10));
    // This process is the guest. It opens a session to port 9, where the host's services
    // do not listen: one refusal.
    let guest =
        HostLink::open(Role::Guest, &Attach::Join(sock.clone()), Config::default()).unwrap();
    assert!(guest.wait_up(Duration::from_secs(10)));
    host.wait_for("link up", Duration::from_secs(10));
    for _ in 0..3 {
        let e = guest.connect(9).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    host.wait_for("session opens refused", Duration::from_secs(10));
    // The guest leaves: the server announces it and the host notices once.
    drop(guest);
    host.wait_for("link down", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let lines = host.all();
    for what in [
        "link up",
        "session opens refused",
        "link down",
        "link reset",
    ] {
        let with: Vec<&String> = lines.iter().filter(|l| l.contains(what)).collect();
        assert_eq!(with.len(), 1, "{what}: {lines:#?}");
        assert!(with[0].contains(&link), "{what} names the link: {lines:#?}");
    }
    let refused = lines.iter().find(|l| l.contains("refused")).unwrap();
    assert!(refused.contains("count=3"), "{refused}");
    drop(host.child);
}

#[test]
fn a_journal_stream_without_journald_leaves_the_lines_on_stderr() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let file = std::fs::File::create(&log).unwrap();
    let md = file.metadata().unwrap();
    let sock = dir.path().join("s.sock");
    let mut c = Command::new(BIN)
        .args(["serve", "--size", "64K", "--socket"])
        .arg(&sock)
        .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()))
        .env_remove("RUST_LOG")
        .stderr(file)
        .spawn()
        .unwrap();
    wait_listening(&sock);
    std::thread::sleep(Duration::from_millis(200));
    let _ = c.kill();
    let _ = c.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    if Path::new("/run/systemd/journal/socket").exists() {
        // The lines went to the journal instead.
        assert!(!text.contains("serving 64 KiB"), "{text}");
    } else {
        assert!(text.contains("ivring-host: serving 64 KiB"), "{text}");
    }
}

//! The QEMU guest agent (Debian's qemu-guest-agent, the real one) through both bridges,
//! on this host: a client on the host bridge's socket, the host bridge embedding the
//! ivshmem server, the guest bridge (the `ivring-guest` binary) joined to it, and qemu-ga
//! behind it, run with an allow-list of harmless commands and a private state dir.
//!
//! Checks guest-ping, guest-info and guest-sync, then the reset scenarios, each many
//! times: (a) half a command then a disconnect, (b) guest-info then a disconnect before
//! the reply, (c) both with the reconnect as fast as possible, (d) a second client queued
//! behind a first; then a guest bridge restart. A control run of (a) straight against
//! qemu-ga shows the leak the bridges remove.
//!
//! Skips (loudly) only when qemu-ga is missing and cannot be installed.
//! `QGA_REPS=N` changes the repetitions (default 50).

use ivring_ivshmem::attach::Attach;
use ivring_tools::bridge::{run_host, HostBridgeOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

fn find_qga() -> Option<PathBuf> {
    let known = ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"];
    let find = || known.iter().map(PathBuf::from).find(|p| p.exists());
    if let Some(p) = find() {
        return Some(p);
    }
    eprintln!("qga_bridge: qemu-ga missing; trying apt-get install -y qemu-guest-agent");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "qemu-guest-agent"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status();
    find()
}

/// Children killed when the test ends, however it ends.
struct Procs(Vec<(&'static str, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    fn get(&mut self, name: &str) -> &mut Child {
        &mut self.0.iter_mut().find(|(n, _)| *n == name).unwrap().1
    }
    fn remove(&mut self, name: &str) -> Child {
        let i = self.0.iter().position(|(n, _)| *n == name).unwrap();
        self.0.remove(i).1
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < TIMEOUT, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Client {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects, retrying while the socket does not accept yet (the bridge replaces a
    /// stale socket file, binds, then listens).
    fn connect(p: &Path) -> Client {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(p) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) && t.elapsed() < TIMEOUT =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("connect to the bridge at {}: {e}", p.display()),
            }
        };
        Client { s, buf: Vec::new() }
    }
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }
    /// The next line, or `None` at EOF or after `timeout`.
    fn line(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&l).trim_end().to_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut b = [0u8; 8192];
            match self.s.read(&mut b) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(_) => return None,
            }
        }
    }
    fn eof_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut b = [0u8; 8192];
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
    /// Leaves politely: EOF, then read to the other side's EOF (what qemu-ga needs from
    /// its direct clients so that it does not exit).
    fn leave(mut self) {
        let _ = self.s.shutdown(Shutdown::Write);
        self.eof_within(TIMEOUT);
    }
}

fn sync_cmd(id: u64) -> Vec<u8> {
    format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}\n").into_bytes()
}

fn compact(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

fn is_sync_reply(line: &Option<String>, id: u64) -> bool {
    line.as_deref().map(compact) == Some(format!("{{\"return\":{id}}}"))
}

/// Whether a first reply is the (stale) answer to guest-info.
fn is_info_reply(line: &Option<String>) -> bool {
    line.as_deref()
        .is_some_and(|l| compact(l).starts_with("{\"return\":{\"version\""))
}

#[derive(Default)]
struct Tally {
    ok: u32,
    stale_info: u32,
    other: Vec<String>,
}

impl Tally {
    fn record(&mut self, line: Option<String>, id: u64) {
        if is_sync_reply(&line, id) {
            self.ok += 1;
        } else if is_info_reply(&line) {
            self.stale_info += 1;
        } else if self.other.len() < 5 {
            self.other.push(format!("{line:?} (wanted id {id})"));
        } else {
            self.other.push(String::new());
        }
    }
    fn report(&self, name: &str, reps: u32) -> String {
        format!(
            "{name}: {}/{reps} first replies were the client's own guest-sync; {} stale guest-info replies; {} other{}",
            self.ok,
            self.stale_info,
            self.other.len(),
            if self.other.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {:?})", &self.other[..1])
            }
        )
    }
}

#[test]
fn qga_through_both_bridges() {
    let Some(qga) = find_qga() else {
        eprintln!();
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("!!! qga_bridge SKIPPED: qemu-ga is not installed and apt-get could not");
        eprintln!("!!! install qemu-guest-agent. The qemu-ga bridge tests DID NOT RUN.");
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        return;
    };
    let reps: u32 = std::env::var("QGA_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (qga_sock, ivs_sock, br_sock) = (d.join("qga.sock"), d.join("ivs.sock"), d.join("br.sock"));
    std::fs::create_dir(d.join("state")).unwrap();
    let mut procs = Procs(Vec::new());

    let start_qga = |procs: &mut Procs| {
        let _ = std::fs::remove_file(&qga_sock);
        let c = Command::new(&qga)
            .args(["-m", "unix-listen", "-p"])
            .arg(&qga_sock)
            .arg("-t")
            .arg(d.join("state"))
            .args([
                "-a",
                "guest-sync,guest-sync-delimited,guest-ping,guest-info",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("qga.log")).unwrap())
            .spawn()
            .expect("start qemu-ga");
        procs.0.push(("qga", c));
        wait_for(&qga_sock);
    };
    start_qga(&mut procs);

    // The host bridge, in this process (the library `ivring-host bridge` runs), embedding
    // the ivshmem server.
    let mut hopts = HostBridgeOptions::new(
        br_sock.clone(),
        Attach::Serve {
            socket: ivs_sock.clone(),
            size: 1 << 20,
            vectors: 1,
        },
    );
    hopts.verbose = false;
    std::thread::spawn(move || run_host(&hopts).expect("host bridge"));
    wait_for(&ivs_sock);
    wait_for(&br_sock);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&br_sock).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the bridge socket is created 0600");

    let guest_log = d.join("guest-bridge.log");
    let start_guest_bridge = |procs: &mut Procs| {
        let c = Command::new(env!("CARGO_BIN_EXE_ivring-guest"))
            .arg("bridge")
            .arg("--connect")
            .arg(&qga_sock)
            .arg("--join")
            .arg(&ivs_sock)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&guest_log)
                    .unwrap(),
            )
            .spawn()
            .expect("start ivring-guest bridge");
        procs.0.push(("guest-bridge", c));
    };
    start_guest_bridge(&mut procs);
    let mut next_id = 1000u64;
    let mut id = || {
        next_id += 7;
        next_id
    };

    // --- The commands answered correctly.
    let mut c = Client::connect(&br_sock);
    c.send(b"{\"execute\":\"guest-ping\"}\n");
    assert_eq!(
        c.line(TIMEOUT).as_deref().map(compact).as_deref(),
        Some("{\"return\":{}}")
    );
    c.send(b"{\"execute\":\"guest-info\"}\n");
    let info = c.line(TIMEOUT);
    assert!(is_info_reply(&info), "guest-info: {info:?}");
    let info = info.unwrap();
    assert!(info.contains("\"supported_commands\""), "{info}");
    assert!(info.contains("\"name\": \"guest-ping\""), "{info}");
    let n = id();
    c.send(&sync_cmd(n));
    assert!(is_sync_reply(&c.line(TIMEOUT), n));
    c.leave();
    eprintln!("qga_bridge: guest-ping, guest-info, guest-sync answered through both bridges");

    // --- Control: scenario (a) straight against qemu-ga, no bridge.
    let mut direct = Tally::default();
    let direct_reps = 10;
    for _ in 0..direct_reps {
        let mut c1 = Client::connect(&qga_sock);
        c1.send(b"{\"execute\":\"guest-sy");
        c1.leave();
        let n = id();
        let mut c2 = Client::connect(&qga_sock);
        c2.send(&sync_cmd(n));
        direct.record(c2.line(Duration::from_secs(2)), n);
        c2.leave();
    }
    let direct_report = direct.report("control (a) straight to qemu-ga", direct_reps);
    eprintln!("qga_bridge: {direct_report}");
    assert!(
        direct.ok < direct_reps,
        "qemu-ga alone did not show the stale parser state: the control proves nothing"
    );

    // --- The scenarios through the bridges.
    let half = |fast: bool, n: u64| {
        let mut c1 = Client::connect(&br_sock);
        c1.send(b"{\"execute\":\"guest-sy");
        if !fast {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(c1);
        if !fast {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c2 = Client::connect(&br_sock);
        c2.send(&sync_cmd(n));
        c2.line(TIMEOUT)
    };
    let abandon_info = |fast: bool, n: u64| {
        let mut c1 = Client::connect(&br_sock);
        c1.send(b"{\"execute\":\"guest-info\"}\n");
        drop(c1); // before the reply
        if !fast {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c2 = Client::connect(&br_sock);
        c2.send(&sync_cmd(n));
        c2.line(TIMEOUT)
    };
    let mut results = Vec::new();
    let mut all_ok = true;
    type Scenario<'a> = (&'a str, &'a dyn Fn(bool, u64) -> Option<String>, bool);
    let scenarios: [Scenario; 4] = [
        ("(a) half a command, disconnect, reconnect", &half, false),
        (
            "(b) guest-info, disconnect before the reply, reconnect",
            &abandon_info,
            false,
        ),
        ("(c) = (a) reconnecting at once", &half, true),
        ("(c) = (b) reconnecting at once", &abandon_info, true),
    ];
    for (name, f, fast) in scenarios {
        let t = Instant::now();
        let mut tally = Tally::default();
        for _ in 0..reps {
            let n = id();
            tally.record(f(fast, n), n);
        }
        let r = format!("{} [{:.1?}]", tally.report(name, reps), t.elapsed());
        eprintln!("qga_bridge: {r}");
        all_ok &= tally.ok == reps;
        results.push(r);
    }

    // --- (d) A second client waits until the first leaves, then starts clean.
    let queued_reps = 5.min(reps);
    let mut queued = Tally::default();
    for _ in 0..queued_reps {
        let mut c1 = Client::connect(&br_sock);
        let n1 = id();
        c1.send(&sync_cmd(n1));
        assert!(is_sync_reply(&c1.line(TIMEOUT), n1));
        let mut c2 = Client::connect(&br_sock);
        let n2 = id();
        c2.send(&sync_cmd(n2));
        assert_eq!(
            c2.line(Duration::from_millis(300)),
            None,
            "the second client was served while the first was connected"
        );
        c1.send(b"{\"execute\":\"guest-info\"}\n"); // left unread
        drop(c1);
        queued.record(c2.line(TIMEOUT), n2);
    }
    let r = queued.report("(d) second client queued behind the first", queued_reps);
    eprintln!("qga_bridge: {r}");
    all_ok &= queued.ok == queued_reps;
    results.push(r);

    // --- The guest bridge restarts (as with a guest reboot): the connected client gets
    // EOF, the host bridge stays up, and the next client is served by the new guest bridge.
    let mut c = Client::connect(&br_sock);
    let n = id();
    c.send(&sync_cmd(n));
    assert!(is_sync_reply(&c.line(TIMEOUT), n));
    let mut g = procs.remove("guest-bridge");
    g.kill().unwrap();
    g.wait().unwrap();
    let t = Instant::now();
    assert!(
        c.eof_within(TIMEOUT),
        "no EOF for the client after the guest bridge died"
    );
    let eof_after = t.elapsed();
    start_guest_bridge(&mut procs);
    let mut c = Client::connect(&br_sock);
    let n = id();
    c.send(&sync_cmd(n));
    let got = c.line(TIMEOUT);
    assert!(
        is_sync_reply(&got, n),
        "after the guest bridge restart: {got:?}"
    );
    drop(c);
    let r = format!("guest bridge killed: the client got EOF after {eof_after:.1?}; a new client was served by the restarted guest bridge");
    eprintln!("qga_bridge: {r}");
    results.push(r);

    // --- qemu-ga restarts: the connected client gets EOF; the next one is served.
    let mut c = Client::connect(&br_sock);
    let n = id();
    c.send(&sync_cmd(n));
    assert!(is_sync_reply(&c.line(TIMEOUT), n));
    // Survived every abandoned client so far (it exits on a reset connection).
    assert!(
        procs.get("qga").try_wait().unwrap().is_none(),
        "qemu-ga exited: {}",
        std::fs::read_to_string(d.join("qga.log")).unwrap_or_default()
    );
    let mut q = procs.remove("qga");
    q.kill().unwrap();
    q.wait().unwrap();
    assert!(
        c.eof_within(TIMEOUT),
        "no EOF for the client after qemu-ga died"
    );
    start_qga(&mut procs);
    let mut c = Client::connect(&br_sock);
    let n = id();
    c.send(&sync_cmd(n));
    let got = c.line(TIMEOUT);
    assert!(is_sync_reply(&got, n), "after the qemu-ga restart: {got:?}");
    c.leave();
    let r =
        "qemu-ga killed: the client got EOF; a new client was served by the new qemu-ga".to_owned();
    eprintln!("qga_bridge: {r}");
    results.push(r);

    // qemu-ga survived every abandoned client (it exits on a reset connection).
    assert!(
        procs.get("qga").try_wait().unwrap().is_none(),
        "qemu-ga exited: {}",
        std::fs::read_to_string(d.join("qga.log")).unwrap_or_default()
    );
    let summary = format!(
        "qga_bridge: {} scenario runs in {:.1?}\n  {}\n  {}",
        4 * reps + queued_reps,
        started.elapsed(),
        direct_report,
        results.join("\n  ")
    );
    eprintln!("{summary}");
    if let Ok(p) = std::env::var("QGA_REPORT") {
        let _ = std::fs::write(p, &summary);
    }
    assert!(
        all_ok,
        "{summary}\nguest bridge log:\n{}",
        std::fs::read_to_string(&guest_log).unwrap_or_default()
    );
}

/// The host bridge in this process, embedding the ivshmem server in `d`; returns the
/// ivshmem server's socket and the bridge's socket once both exist.
fn start_host_bridge(d: &Path) -> (PathBuf, PathBuf) {
    let (ivs_sock, br_sock) = (d.join("ivs.sock"), d.join("br.sock"));
    let mut hopts = HostBridgeOptions::new(
        br_sock.clone(),
        Attach::Serve {
            socket: ivs_sock.clone(),
            size: 1 << 20,
            vectors: 1,
        },
    );
    hopts.verbose = false;
    std::thread::spawn(move || run_host(&hopts).expect("host bridge"));
    wait_for(&ivs_sock);
    wait_for(&br_sock);
    (ivs_sock, br_sock)
}

/// The `ivring-guest bridge` binary joined to `ivs_sock`, relaying to `qga_sock`, its
/// stderr in `log`.
fn spawn_guest_bridge(qga_sock: &Path, ivs_sock: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ivring-guest"))
        .arg("bridge")
        .arg("--connect")
        .arg(qga_sock)
        .arg("--join")
        .arg(ivs_sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start ivring-guest bridge")
}

/// Well under the bridge's 10 s wait for the agent's sync reply: the difference between
/// reporting a problem at once and timing out.
const PROMPT: Duration = Duration::from_secs(5);

/// A client of the host bridge sends guest-ping and must read EOF, and nothing else,
/// within `PROMPT`; then the guest bridge's log must hold a line with every one of
/// `wanted`. Returns the time to EOF and that line.
fn expect_prompt_refusal(br_sock: &Path, log: &Path, wanted: &[&str]) -> (Duration, String) {
    let t = Instant::now();
    let mut c = Client::connect(br_sock);
    c.send(b"{\"execute\":\"guest-ping\"}\n");
    let got = c.line(PROMPT);
    let took = t.elapsed();
    assert_eq!(got, None, "the client was answered instead of closed");
    assert!(took < PROMPT, "no EOF for the client within {PROMPT:?}");
    assert!(
        c.buf.is_empty(),
        "the client got bytes: {:?}",
        String::from_utf8_lossy(&c.buf)
    );
    // The log line is written before the session closes; allow for the file's flush.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| wanted.iter().all(|w| l.contains(w))) {
            return (took, l.to_owned());
        }
        assert!(
            Instant::now() < deadline,
            "no line with {wanted:?} in the guest bridge's log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn refused_sync_is_reported_at_once() {
    let Some(qga) = find_qga() else {
        eprintln!("!!! qga_bridge refused_sync_is_reported_at_once SKIPPED: no qemu-ga");
        return;
    };
    // Refused two ways: blocked by name, and left out of an allow-list.
    let configs: [&[&str]; 2] = [
        &[
            "-a",
            "guest-sync,guest-sync-delimited,guest-ping,guest-info",
            "-b",
            "guest-sync-delimited",
        ],
        &["--allow-rpcs=guest-sync,guest-ping,guest-info"],
    ];
    for args in configs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let qga_sock = d.join("qga.sock");
        std::fs::create_dir(d.join("state")).unwrap();
        let mut procs = Procs(Vec::new());
        let c = Command::new(&qga)
            .args(["-m", "unix-listen", "-p"])
            .arg(&qga_sock)
            .arg("-t")
            .arg(d.join("state"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("qga.log")).unwrap())
            .spawn()
            .expect("start qemu-ga");
        procs.0.push(("qga", c));
        wait_for(&qga_sock);
        let (ivs_sock, br_sock) = start_host_bridge(d);
        let log = d.join("guest-bridge.log");
        procs.0.push((
            "guest-bridge",
            spawn_guest_bridge(&qga_sock, &ivs_sock, &log),
        ));
        let wanted = [
            "qemu-ga refuses guest-sync-delimited",
            "has been disabled",
            "allow it in qemu-ga's configuration",
        ];
        let (took, line) = expect_prompt_refusal(&br_sock, &log, &wanted);
        eprintln!("qga_bridge: qemu-ga {args:?}: EOF after {took:.1?}; {line}");
        // The bridge keeps serving: the next client gets the same answer.
        expect_prompt_refusal(&br_sock, &log, &wanted);
        assert!(
            procs.get("guest-bridge").try_wait().unwrap().is_none(),
            "the guest bridge exited"
        );
        assert!(
            procs.get("qga").try_wait().unwrap().is_none(),
            "qemu-ga exited: {}",
            std::fs::read_to_string(d.join("qga.log")).unwrap_or_default()
        );
    }
}

#[test]
fn missing_agent_socket_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let qga_sock = d.join("no-agent-here.sock");
    let (ivs_sock, br_sock) = start_host_bridge(d);
    let log = d.join("guest-bridge.log");
    let mut procs = Procs(vec![(
        "guest-bridge",
        spawn_guest_bridge(&qga_sock, &ivs_sock, &log),
    )]);
    let path = qga_sock.display().to_string();
    let (took, line) = expect_prompt_refusal(
        &br_sock,
        &log,
        &[
            "session",
            &format!("agent at {path}: no such socket"),
            "unix-listen",
        ],
    );
    eprintln!("qga_bridge: missing agent socket: EOF after {took:.1?}; {line}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(&format!("warning: agent at {path}: no such socket")),
        "no start-up warning:\n{text}"
    );
    assert!(
        procs.get("guest-bridge").try_wait().unwrap().is_none(),
        "the guest bridge exited"
    );
}

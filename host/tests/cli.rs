//! `ivring-host` as operators meet it: the help without arguments, sizes in words, every
//! argument checked before any work starts, errors that name the path or the CPUs at
//! fault, one placeholder spelling, and a bridge that waits for its server.

use ivring_host::Server;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ivring-host");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Exit status and stderr of a run, which must end within `limit`.
fn run_within(args: &[&str], limit: Duration) -> (i32, String) {
    let t = Instant::now();
    let out = Command::new(BIN).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        t.elapsed() < limit,
        "{args:?} took {:?}: {err}",
        t.elapsed()
    );
    (out.status.code().unwrap_or(-1), err)
}

/// A usage error: status 2 within a few seconds (no work started), one line.
fn usage_error(args: &[&str]) -> String {
    let (code, err) = run_within(args, Duration::from_secs(5));
    assert_eq!(code, 2, "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line: {err}"
    );
    err
}

/// A run-time error: status 1, one line.
fn error(args: &[&str]) -> String {
    let (code, err) = run_within(args, Duration::from_secs(10));
    assert_eq!(code, 1, "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line: {err}"
    );
    err
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first line a child writes on stderr (it keeps running).
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

fn wait_accepting(p: &Path, limit: Duration) {
    let t = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(t.elapsed() < limit, "{} never accepted", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_arguments_print_the_help_and_exit_2() {
    let out = Command::new(BIN).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Usage: ivring-host [OPTIONS] <COMMAND>"),
        "{err}"
    );
    for sub in ["serve", "peer", "bridge", "bench", "demo", "check"] {
        assert!(
            err.lines().any(|l| l.trim_start().starts_with(sub)),
            "{sub} not listed: {err}"
        );
    }
}

#[test]
fn serve_says_its_size_in_binary_units() {
    let dir = tempdir();
    let sock = dir.path().join("s.sock");
    let mut c = Command::new(BIN)
        .args(["serve", "--socket", s(&sock), "--size", "64K"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut c);
    let _c = Kill(c);
    assert!(line.contains("serving 64 KiB on"), "{line}");
}

#[test]
fn arguments_are_checked_before_any_work() {
    let dir = tempdir();
    // The bench would measure its baselines for seconds before mapping the memory.
    let err = usage_error(&["bench", "--mem-mib", "3"]);
    assert!(
        err.contains("--mem-mib 3: the shared memory must be a power of two from 64 KiB to 1 GiB (try --mem-mib 4)"),
        "{err}"
    );
    assert!(!err.contains("recreate"), "{err}");
    let err = usage_error(&[
        "serve",
        "--socket",
        s(&dir.path().join("a")),
        "--size",
        "3M",
    ]);
    assert!(err.contains("'--size <SIZE>'"), "{err}");
    assert!(
        err.contains("power of two") && err.contains("(try 4M)"),
        "{err}"
    );
    assert!(!err.contains("recreate"), "{err}");
    assert!(!dir.path().join("a").exists());
    for secs in ["0", "-1", "nan"] {
        let secs = &format!("--seconds={secs}");
        let err = usage_error(&["bench", secs]);
        assert!(err.contains("--seconds"), "{err}");
        assert!(err.contains("positive number of seconds"), "{err}");
    }
    // A plot that could never be written is refused at once, not after the run.
    let missing = dir.path().join("no-such-dir").join("plot.svg");
    let err = usage_error(&["bench", "--quick", "--plot", s(&missing)]);
    assert!(err.contains("--plot"), "{err}");
    assert!(err.contains(s(&dir.path().join("no-such-dir"))), "{err}");
    // A plot path that can be written is left as it was.
    let existing = dir.path().join("keep.svg");
    std::fs::write(&existing, b"keep").unwrap();
    let err = usage_error(&["bench", "--plot", s(&existing), "--seconds", "0"]);
    assert!(err.contains("--seconds"), "{err}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
    // Options that the server decides, with --join.
    let listen = dir.path().join("q.sock");
    let join = dir.path().join("s.sock");
    for extra in [["--size", "8M"], ["--vectors", "2"]] {
        let mut args = vec!["bridge", "--listen", s(&listen), "--join", s(&join)];
        args.extend(extra);
        let err = usage_error(&args);
        assert!(
            err.contains("cannot be used with") && err.contains(extra[0]),
            "{err}"
        );
    }
    assert!(!listen.exists());
}

#[test]
fn cpus_that_cannot_be_used_are_named_with_those_that_can() {
    use rustix::thread::{sched_getaffinity, CpuSet};
    let set = sched_getaffinity(None).unwrap();
    let first = (0..CpuSet::MAX_CPU).find(|&c| set.is_set(c)).unwrap();
    let bad = (0..CpuSet::MAX_CPU)
        .rev()
        .find(|&c| !set.is_set(c))
        .unwrap();
    let spec = format!("{first},{bad}");
    let err = usage_error(&["bench", "--cpus", &spec]);
    assert!(
        err.contains(&format!("CPU {bad} is not one this process may use")),
        "{err}"
    );
    assert!(err.contains(&first.to_string()), "{err}");
    assert!(!err.contains("Invalid argument"), "{err}");
    let err = usage_error(&["bench", "--cpus", "zero,one"]);
    assert!(err.contains("not a CPU number"), "{err}");
}

#[test]
fn paths_that_are_not_what_they_should_be_are_named() {
    let dir = tempdir();
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a socket").unwrap();
    let err = error(&["peer", "--join", s(&file)]);
    assert!(err.contains("is not a socket"), "{err}");
    assert!(!err.contains("refused"), "{err}");
    let err = error(&["peer", "--join", s(&dir.path().join("gone.sock"))]);
    assert!(err.contains("no ivshmem server socket at"), "{err}");
    let missing = dir.path().join("missing");
    let err = error(&["serve", "--socket", s(&missing.join("s.sock"))]);
    assert!(
        err.contains(&format!("directory {} does not exist", missing.display())),
        "{err}"
    );
    assert!(err.contains("mkdir -p"), "{err}");
    let err = error(&[
        "bridge",
        "--listen",
        s(&missing.join("q.sock")),
        "--plain",
        s(&dir.path().join("shm")),
    ]);
    assert!(
        err.contains(&format!("directory {}", missing.display())),
        "{err}"
    );
    let err = error(&["peer", "--plain", s(&dir.path().join("none"))]);
    assert!(err.contains("--size"), "{err}");
}

#[test]
fn peer_creates_its_plain_file_with_size() {
    let dir = tempdir();
    let shm = dir.path().join("shm");
    let mut c = Command::new(BIN)
        .args(["peer", "--role", "host", "--plain", s(&shm), "--size", "1M"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut c);
    let _c = Kill(c);
    assert!(line.contains("serving ports"), "{line}");
    let md = std::fs::metadata(&shm).unwrap();
    assert_eq!(md.len(), 1 << 20);
    // An existing file of another size is refused rather than resized.
    let err = error(&["peer", "--plain", s(&shm), "--size", "2M"]);
    assert!(err.contains("not the 2097152 asked for"), "{err}");
    // --size means nothing without --plain.
    let err = usage_error(&["peer", "--join", s(&shm), "--size", "1M"]);
    assert!(err.contains("cannot be used with '--size"), "{err}");
    let err = usage_error(&["peer", "--size", "1M"]);
    assert!(err.contains("--plain <FILE>"), "{err}");
}

#[test]
fn one_placeholder_spelling_for_sockets_and_files() {
    for sub in ["serve", "peer", "bridge", "check", "bench"] {
        let out = Command::new(BIN).args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for odd in [
            "<JOIN>", "<SOCKET>", "<SERVE>", "<LISTEN>", "<PLAIN>", "<PLOT>",
        ] {
            assert!(!help.contains(odd), "{sub} --help shows {odd}:\n{help}");
        }
        assert!(help.contains("<SOCK>"), "{sub} --help:\n{help}");
    }
}

#[test]
fn groups_are_resolved_through_the_name_service() {
    let dir = tempdir();
    let err = error(&[
        "serve",
        "--socket",
        s(&dir.path().join("s.sock")),
        "--group",
        "no-such-group-ivring",
    ]);
    assert!(
        err.contains("no group named \"no-such-group-ivring\""),
        "{err}"
    );
    assert!(!err.contains("/etc/group"), "{err}");
    // The name of this process's own group, as the name service gives it.
    let gid = rustix::process::getgid().as_raw();
    let name = Command::new("getent")
        .args(["group", &gid.to_string()])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(':')
                .next()
                .map(str::to_owned)
        })
        .filter(|n| !n.is_empty());
    let Some(name) = name else {
        panic!("getent group {gid} gave no name");
    };
    let sock = dir.path().join("g.sock");
    let mut c = Command::new(BIN)
        .args([
            "serve",
            "--socket",
            s(&sock),
            "--size",
            "64K",
            "--mode",
            "0660",
        ])
        .args(["--group", &name])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut c);
    let _c = Kill(c);
    assert!(line.contains("serving"), "{line}");
    assert_eq!(std::fs::metadata(&sock).unwrap().gid(), gid);
}

#[test]
fn bridge_waits_for_the_server_socket() {
    let dir = tempdir();
    let server_sock: PathBuf = dir.path().join("ivshmem.sock");
    let qga = dir.path().join("qga.sock");
    let mut c = Command::new(BIN)
        .args(["bridge", "--listen", s(&qga), "--join", s(&server_sock)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(&mut c);
    let mut bridge = Kill(c);
    assert!(line.contains("waiting up to 30 s"), "{line}");
    assert!(line.contains(s(&server_sock)), "{line}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(bridge.0.try_wait().unwrap().is_none(), "the bridge gave up");
    let _server = Server::bind(&server_sock, 1 << 20, 1).unwrap().spawn();
    wait_accepting(&qga, Duration::from_secs(10));
    assert!(bridge.0.try_wait().unwrap().is_none());

    // With a bound that runs out: the waiting line, then one saying what to start.
    let (code, err) = run_within(
        &[
            "bridge",
            "--listen",
            s(&dir.path().join("q2.sock")),
            "--join",
            s(&dir.path().join("never.sock")),
            "--join-wait",
            "0.3",
        ],
        Duration::from_secs(5),
    );
    assert_eq!((code, err.lines().count()), (1, 2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("start the server first"), "{err}");
}

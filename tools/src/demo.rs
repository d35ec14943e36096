//! `ivring-host demo`: the whole transport on this machine with nothing configured.
//!
//! Serves the ivshmem protocol on a temporary socket, starts a second process of this
//! binary in the guest role joined to it (as QEMU would join), and shows sessions opening
//! both ways, EOF, a refused port, a peer killed and restarted, then throughput and
//! round-trip latency.

use crate::services::{self, StreamHash};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use ivring::{Config, Endpoint, Role};
use ivring_ivshmem::attach::{Attach, HostLink};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Port the demo's guest peer connects back to.
pub const PORT_HELLO: u32 = 9;

/// Options of the demo.
pub struct DemoOptions {
    /// Shared memory size.
    pub size: u64,
    /// Seconds per throughput figure.
    pub seconds: f64,
}

fn spawn_guest(sock: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("find own executable")?;
    Command::new(exe)
        .args(["peer", "--role", "guest", "--hello", "--join"])
        .arg(sock)
        .stdin(Stdio::null())
        .spawn()
        .context("start the guest-role process")
}

/// Runs the demo, printing as it goes.
pub fn run(opts: &DemoOptions) -> Result<()> {
    let dir = tempdir()?;
    let sock = dir.join("ivshmem.sock");
    let cfg = Config::default();
    let host = HostLink::open(
        Role::Host,
        &Attach::Serve {
            socket: sock.clone(),
            size: opts.size,
            vectors: 1,
        },
        cfg,
    )?;
    println!(
        "server  {} serving a sealed {} MiB memfd; host joined as peer {}",
        sock.display(),
        opts.size >> 20,
        host.peer_id().unwrap_or(0)
    );
    let hello = host.listen(PORT_HELLO)?;
    let t0 = Instant::now();
    let mut child = ChildGuard(spawn_guest(&sock)?);
    if !host.wait_up(Duration::from_secs(10)) {
        bail!("the guest-role process did not attach within 10 s");
    }
    println!(
        "link    up {:.1} ms after starting the guest-role process (pid {})",
        ms(t0.elapsed()),
        child.0.id()
    );

    // Guest to host.
    let mut g = hello.accept_timeout(Duration::from_secs(10))?;
    let mut greeting = String::new();
    g.read_to_string(&mut greeting)?;
    println!("session guest->host port {PORT_HELLO}: read {greeting:?}, then EOF");

    // Host to guest, with EOF.
    let mut s = host.connect(services::PORT_ECHO)?;
    s.write_all(b"ping over ivshmem")?;
    s.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    println!(
        "session host->guest port {}: echoed {:?}, EOF after our shutdown",
        services::PORT_ECHO,
        String::from_utf8_lossy(&back)
    );
    drop(s);

    match host.connect(99) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            println!("session host->guest port 99: {e}")
        }
        other => bail!("port 99 should be refused, got {other:?}"),
    }

    // Kill the guest mid-session; restart it.
    let mut s = host.connect(services::PORT_ECHO)?;
    s.write_all(b"before the crash")?;
    let mut buf = [0u8; 64];
    s.read_exact(&mut buf[..16])?;
    child.0.kill()?;
    let killed = Instant::now();
    let err = loop {
        match s.read(&mut buf) {
            Err(e) => break e,
            Ok(_) if killed.elapsed() > Duration::from_secs(10) => {
                bail!("no reset within 10 s of killing the guest")
            }
            Ok(_) => continue,
        }
    };
    println!(
        "restart guest killed (SIGKILL): open session got {:?} ({err}) after {:.1} ms",
        err.kind(),
        ms(killed.elapsed())
    );
    let _ = child.0.wait();
    drop(s);
    let restarted = Instant::now();
    child = ChildGuard(spawn_guest(&sock)?);
    let mut g = hello.accept_timeout(Duration::from_secs(10))?;
    g.read_to_string(&mut String::new())?;
    drop(g);
    let mut s = host.connect(services::PORT_CHECK)?;
    s.write_all(b"after the restart")?;
    s.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)?;
    let mut h = StreamHash::default();
    h.update(b"after the restart");
    let ok = reply[8..] == h.finish().to_le_bytes();
    println!(
        "restart new guest (pid {}) up and serving {:.1} ms later; new session checksum {}",
        child.0.id(),
        ms(restarted.elapsed()),
        if ok { "matches" } else { "DIFFERS" }
    );
    if !ok {
        bail!("checksum mismatch after restart");
    }
    drop(s);

    println!(
        "throughput host->guest, one stream session, {:.1} s each:",
        opts.seconds
    );
    for size in [64usize, 4096, 65536] {
        let (bytes, secs) = stream_to_sink(&host, size, opts.seconds)?;
        println!(
            "  {:>6} B writes: {:>9.1} MB/s  {:>11.0} writes/s",
            size,
            bytes as f64 / secs / 1e6,
            bytes as f64 / size as f64 / secs
        );
    }
    let rtts = round_trips(&host, 64, opts.seconds)?;
    println!(
        "latency 64 B round trip over {} trips: p50 {:.1} us  p99 {:.1} us",
        rtts.len(),
        pct(&rtts, 50.0) as f64 / 1e3,
        pct(&rtts, 99.0) as f64 / 1e3
    );
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Streams `size`-byte writes to the guest's sink for `seconds`; returns bytes and time
/// until the sink confirmed the count.
pub fn stream_to_sink(host: &Endpoint, size: usize, seconds: f64) -> Result<(u64, f64)> {
    let mut s = host.connect(services::PORT_SINK)?;
    let buf = vec![0x5au8; size];
    let t0 = Instant::now();
    let until = Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while t0.elapsed() < until {
        for _ in 0..64 {
            s.write_all(&buf)?;
        }
        sent += 64 * size as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply)?;
    let secs = t0.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(reply);
    if got != sent {
        bail!("sink counted {got} bytes, {sent} sent");
    }
    Ok((sent, secs))
}

/// Round trips of `size` bytes through the echo service for `seconds`, in nanoseconds.
pub fn round_trips(host: &Endpoint, size: usize, seconds: f64) -> Result<Histogram<u64>> {
    let mut s = host.connect(services::PORT_ECHO)?;
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut rtts = rtt_histogram();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        record_rtt(&mut rtts, t.elapsed());
    }
    Ok(rtts)
}

/// An empty histogram of round-trip times in nanoseconds: 1 ns to 60 s at 3 significant
/// figures, growing for a longer stall. Its memory is fixed however long the run, and
/// every percentile (p99.9 too) is exact to 0.1%.
pub fn rtt_histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    h.auto(true);
    h
}

/// Records one round trip.
pub fn record_rtt(h: &mut Histogram<u64>, took: Duration) {
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    if h.record(ns).is_err() {
        // Beyond what the histogram can grow to: count it at the top.
        h.saturating_record(ns);
    }
}

/// The `p`th percentile (0 to 100) of the recorded times; 0 when there are none.
pub fn pct(h: &Histogram<u64>, p: f64) -> u64 {
    if h.is_empty() {
        return 0;
    }
    h.value_at_percentile(p)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn tempdir() -> Result<std::path::PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..100 {
        let p = base.join(format!("ivring-demo-{}-{i}", std::process::id()));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(p);
        }
    }
    bail!("cannot create a directory in {}", base.display())
}

/// Kills the child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

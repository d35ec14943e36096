//! End-to-end checks of a live link, run from either side against the other side's
//! [`services`]: `ivring-guest check` inside a VM and `ivring-host check` on the host.
//!
//! Each check prints one line, `PASS name` or `FAIL name: reason`, on stdout (the e2e
//! suite collects them); figures are printed as `INFO ...` lines.

use crate::demo::{pct, round_trips, stream_to_sink};
use crate::services::{self, pattern, StreamHash};
use anyhow::{bail, Context, Result};
use ivring::layout::{side, GUEST_BLOCK, HOST_BLOCK, PEER_ID_VALID};
use ivring::{Endpoint, Role, Session, SharedRegion};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Port on which each side of an [`exchange`] hears that the other side has finished.
pub const PORT_DONE: u32 = 11;
/// Port a side listens on while it runs these checks (not while it only serves), so the
/// other side knows whether to wait for its summary on [`PORT_DONE`].
pub const PORT_CHECKING: u32 = 12;
/// A port nobody listens on.
pub const PORT_UNUSED: u32 = 77;

/// Counts and prints results.
#[derive(Default)]
pub struct Report {
    /// Checks passed.
    pub passed: usize,
    /// Checks failed.
    pub failed: usize,
}

impl Report {
    /// Prints `PASS name` or `FAIL name: reason` for `r`.
    pub fn record<T>(&mut self, name: &str, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => {
                self.passed += 1;
                out(format_args!("PASS {name}"));
                Some(v)
            }
            Err(e) => {
                self.failed += 1;
                out(format_args!("FAIL {name}: {e:#}"));
                None
            }
        }
    }

    /// `Err` when any check failed.
    pub fn result(&self) -> Result<()> {
        if self.failed > 0 {
            bail!(
                "{} of {} checks failed",
                self.failed,
                self.failed + self.passed
            );
        }
        Ok(())
    }
}

/// Prints one line on stdout and flushes it (the serial console may be a file).
pub fn out(line: std::fmt::Arguments<'_>) {
    let mut o = io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// The ivshmem peer id the other side of `role` publishes in `region`, if any.
pub fn published_peer_id(region: &SharedRegion, role: Role) -> Option<u16> {
    let block = match role {
        Role::Host => GUEST_BLOCK,
        Role::Guest => HOST_BLOCK,
    };
    let w = region.load_u64(block + side::PEER_ID, Ordering::Acquire);
    (w & PEER_ID_VALID != 0 && w >> 33 == 0).then_some(w as u16)
}

fn expect_kind<T: std::fmt::Debug>(r: io::Result<T>, kind: ErrorKind) -> Result<()> {
    match r {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => bail!("expected {kind:?}, got {:?} ({e})", e.kind()),
        Ok(v) => bail!("expected {kind:?}, got Ok({v:?})"),
    }
}

/// Waits until the peer's services listen: a peer's link comes up a moment before it
/// starts listening, and an open in between is refused.
fn wait_services(ep: &Endpoint, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        match ep.connect(services::PORT_ECHO) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && t.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).context("the peer's echo service"),
        }
    }
}

/// Echo: `bytes` of the pattern for `seed` in 64 KiB round trips, compared byte for byte.
fn echo_data(s: &mut Session, bytes: u64, seed: u64) -> Result<()> {
    let mut out = vec![0u8; 64 << 10];
    let mut back = vec![0u8; 64 << 10];
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(out.len() as u64) as usize;
        pattern(seed, off, &mut out[..n]);
        s.write_all(&out[..n]).context("write")?;
        s.read_exact(&mut back[..n]).context("read the echo")?;
        if back[..n] != out[..n] {
            bail!("echo differs in bytes {off}..{}", off + n as u64);
        }
        off += n as u64;
    }
    Ok(())
}

/// Check service: sends `bytes` of the pattern for `seed`, shuts down, and compares the
/// peer's count and checksum with ours.
fn check_data(ep: &Endpoint, bytes: u64, seed: u64) -> Result<()> {
    let mut s = ep.connect(services::PORT_CHECK)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut h = StreamHash::default();
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        pattern(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        s.write_all(&buf[..n]).context("write")?;
        off += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)
        .context("read the peer's checksum")?;
    let count = u64::from_le_bytes(reply[..8].try_into().expect("8 bytes"));
    let hash = u64::from_le_bytes(reply[8..].try_into().expect("8 bytes"));
    if count != bytes || hash != h.finish() {
        bail!(
            "peer counted {count} bytes with checksum {hash:#x}; sent {bytes} with {:#x}",
            h.finish()
        );
    }
    Ok(())
}

/// Source service: asks for `bytes` of the pattern for `seed` and checks every byte.
/// Returns the session, which the source has closed after the last byte.
fn source_data(ep: &Endpoint, bytes: u64, seed: u64) -> Result<Session> {
    let mut s = ep.connect(services::PORT_SOURCE)?;
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&bytes.to_le_bytes());
    req[8..].copy_from_slice(&seed.to_le_bytes());
    s.write_all(&req)?;
    let mut got = vec![0u8; 64 << 10];
    let mut want = vec![0u8; 64 << 10];
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(got.len() as u64) as usize;
        s.read_exact(&mut got[..n])
            .with_context(|| format!("read at byte {off}"))?;
        pattern(seed, off, &mut want[..n]);
        if got[..n] != want[..n] {
            bail!("source data differs in bytes {off}..{}", off + n as u64);
        }
        off += n as u64;
    }
    Ok(s)
}

/// What an [`exchange`] does.
#[derive(Clone, Debug)]
pub struct ExchangeOptions {
    /// Bytes moved each way per data check.
    pub bytes: u64,
    /// Seconds for the latency figure (0: none).
    pub latency_secs: f64,
    /// Wait this long for the link and for the peer's own checks to finish.
    pub timeout: Duration,
    /// Wait for the other side's checks (over [`PORT_DONE`]) before returning.
    pub wait_peer: bool,
    /// Our side of the link (the guest says "done" first).
    pub role: Role,
    /// Readers block at once ([`ivring::WaitMode::Block`]): check that the doorbell wakes
    /// them well within the heartbeat.
    pub block: bool,
    /// The heartbeat period, printed beside the latency as the time a blocked reader waits
    /// when no doorbell wakes it.
    pub heartbeat: Duration,
}

/// The full exchange: data both ways with checksums, EOF, `BrokenPipe`,
/// `ConnectionRefused`, several sessions at once, a latency figure. The caller runs
/// [`services::spawn_all`] on `ep` first, so the peer can run its own checks meanwhile.
pub fn exchange(ep: &Endpoint, opts: &ExchangeOptions, r: &mut Report) -> Result<()> {
    // The guest side says "done" first, on a session to the host's PORT_DONE (listening
    // from the start, so the guest may finish first).
    let done = match opts.role {
        Role::Host => Some(ep.listen(PORT_DONE)?),
        Role::Guest => None,
    };
    let t0 = Instant::now();
    if r.record(
        "link-up",
        if ep.wait_up(opts.timeout) {
            wait_services(ep, opts.timeout)
        } else {
            Err(anyhow::anyhow!("no peer within {:?}", opts.timeout))
        },
    )
    .is_none()
    {
        return r.result();
    }
    out(format_args!(
        "INFO link up after {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    let seed = u64::from(std::process::id()) << 16 ^ t0.elapsed().as_nanos() as u64;

    // Us -> peer -> us, then EOF after our shutdown.
    let echo = (|| {
        let mut s = ep.connect(services::PORT_ECHO)?;
        echo_data(&mut s, opts.bytes, seed)?;
        Ok(s)
    })();
    if let Some(mut s) = r.record("echo-data", echo) {
        r.record(
            "eof-after-shutdown",
            (|| {
                s.shutdown(Shutdown::Write)?;
                let mut b = [0u8; 16];
                match s.read(&mut b)? {
                    0 => Ok(()),
                    n => bail!("read {n} bytes after the echo should have ended"),
                }
            })(),
        );
    }
    r.record(
        "send-checksum",
        check_data(ep, opts.bytes, seed.wrapping_add(1)),
    );

    // Peer -> us, then EOF and BrokenPipe after the peer's close.
    if let Some(mut s) = r.record(
        "receive-pattern",
        source_data(ep, opts.bytes, seed.wrapping_add(2)),
    ) {
        r.record(
            "eof-after-peer-close",
            match s.read(&mut [0u8; 16]) {
                Ok(0) => Ok(()),
                other => Err(anyhow::anyhow!("expected EOF, got {other:?}")),
            },
        );
        // The source closes its session at once; allow its Close a moment to arrive.
        let deadline = Instant::now() + Duration::from_secs(5);
        let broken = loop {
            match s.write(b"after close") {
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                other => break other,
            }
        };
        r.record("broken-pipe", expect_kind(broken, ErrorKind::BrokenPipe));
    }
    r.record(
        "refused",
        expect_kind(ep.connect(PORT_UNUSED), ErrorKind::ConnectionRefused),
    );

    // Several sessions at once, each with its own data.
    r.record(
        "parallel-sessions",
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4u64)
                .map(|i| sc.spawn(move || check_data(ep, opts.bytes / 4 + i, seed ^ (i << 40))))
                .collect();
            hs.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a session thread panicked"))?
            })
        }),
    );

    let mut p50 = 0;
    if opts.latency_secs > 0.0 {
        r.record(
            "latency",
            round_trips(ep, 64, opts.latency_secs).map(|rtts| {
                p50 = pct(&rtts, 50.0);
                out(format_args!(
                    "INFO latency 64 B round trip x{}: p50 {:.3} ms p99 {:.3} ms (a reader no doorbell wakes waits up to the {} ms heartbeat)",
                    rtts.len(),
                    pct(&rtts, 50.0) as f64 / 1e6,
                    pct(&rtts, 99.0) as f64 / 1e6,
                    opts.heartbeat.as_millis()
                ))
            }),
        );
        if opts.block {
            // Our readers sleep at once; only the keeper, woken by the doorbell or its
            // heartbeat tick, wakes them. A loose bound: a quarter of the tick.
            let bound = opts.heartbeat / 4;
            r.record(
                "blocked-reader-woken",
                if p50 > 0 && Duration::from_nanos(p50) < bound {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "round trip p50 {:?} not below {bound:?}: is the doorbell waking us?",
                        Duration::from_nanos(p50)
                    ))
                },
            );
        }
    }

    if opts.wait_peer {
        peer_summary(ep, done.as_ref(), opts.timeout, r);
    }
    r.result()
}

/// The peer restarts while we run: open sessions fail with `ConnectionReset`, the new peer
/// incarnation comes up, new sessions work and carry no byte of the old ones.
///
/// Prints `READY peer-restart` when the old peer may be killed.
pub fn peer_restart(
    ep: &Endpoint,
    region: Option<&SharedRegion>,
    role: Role,
    timeout: Duration,
    r: &mut Report,
) -> Result<()> {
    let peer_id = || region.and_then(|reg| published_peer_id(reg, role));
    let Some(mut old) = r.record("old-link-up", {
        let up = ep.wait_up(timeout);
        (|| {
            if !up {
                bail!("no peer within {timeout:?}");
            }
            wait_services(ep, timeout)?;
            let mut s = ep.connect(services::PORT_ECHO)?;
            echo_data(&mut s, 4096, 0xdead)?;
            // Old bytes still on their way: an echo we do not read, and a checked stream we
            // never finish. None of them may show up anywhere after the restart.
            s.write_all(&[0xee; 1000])?;
            let mut c = ep.connect(services::PORT_CHECK)?;
            c.write_all(&[0xee; 100_000])?;
            Ok((s, c))
        })()
    }) else {
        return r.result();
    };
    let old_id = peer_id();
    out(format_args!(
        "INFO old peer id {old_id:?}; sessions open; stats {:?}",
        ep.stats()
    ));
    out(format_args!("READY peer-restart"));

    let t = Instant::now();
    old.0.set_read_timeout(Some(timeout));
    let err = loop {
        // The echo we left unread may arrive first; what matters is the error after it.
        match old.0.read(&mut [0u8; 4096]) {
            Ok(n) if n > 0 => continue,
            other => break other,
        }
    };
    r.record(
        "old-session-reset",
        expect_kind(err, ErrorKind::ConnectionReset),
    );
    out(format_args!(
        "INFO reset seen {:.0} ms after READY",
        t.elapsed().as_secs_f64() * 1e3
    ));
    r.record(
        "old-session-write-reset",
        expect_kind(old.1.write(b"x"), ErrorKind::ConnectionReset),
    );
    r.record(
        "old-session-stays-reset",
        expect_kind(old.0.read(&mut [0u8; 16]), ErrorKind::ConnectionReset),
    );
    drop(old);

    let up = ep.wait_up(timeout);
    let up = r
        .record(
            "new-peer-up",
            if up {
                wait_services(ep, timeout)
            } else {
                Err(anyhow::anyhow!("no new peer within {timeout:?}"))
            },
        )
        .is_some();
    if !up {
        return r.result();
    }
    let new_id = peer_id();
    out(format_args!(
        "INFO new peer up {:.0} ms after READY, peer id {old_id:?} -> {new_id:?}",
        t.elapsed().as_secs_f64() * 1e3
    ));
    if region.is_some() {
        r.record(
            "new-peer-id",
            match (old_id, new_id) {
                (Some(a), Some(b)) if a != b => Ok(()),
                (a, b) => Err(anyhow::anyhow!("peer id {a:?} -> {b:?}")),
            },
        );
    }
    // The new sessions see exactly their own bytes.
    r.record("new-session-checksum", check_data(ep, 300_000, 0xbeef));
    r.record(
        "new-session-echo",
        (|| {
            let mut s = ep.connect(services::PORT_ECHO)?;
            echo_data(&mut s, 100_000, 0xcafe)?;
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            if !rest.is_empty() {
                bail!("{} stray bytes after the echo", rest.len());
            }
            Ok(())
        })(),
    );
    r.record(
        "new-session-receive",
        source_data(ep, 300_000, 0xf00d).map(drop),
    );
    out(format_args!("INFO stats {:?}", ep.stats()));
    r.result()
}

/// Summaries both ways over one session on [`PORT_DONE`]: the guest writes its own and
/// reads the host's (`done`: the host's listener, made before its checks began, so the
/// guest may finish first); each side leaves right after, which must not lose the other's
/// last bytes. A peer that only serves (`ivring-guest serve`, `ivring-host peer`) has no
/// summary: then nothing is waited for.
fn peer_summary(ep: &Endpoint, done: Option<&ivring::Listener>, timeout: Duration, r: &mut Report) {
    let peer_checks = match ep.connect(PORT_CHECKING) {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            out(format_args!(
                "INFO the peer only serves (runs no checks): not waiting for its summary"
            ));
            false
        }
        Err(_) => true,
    };
    if !peer_checks {
        return;
    }
    let summary = format!("{} passed, {} failed", r.passed, r.failed);
    let mut peer = String::new();
    let res = (|| {
        let mut s = match done {
            Some(l) => l.accept_timeout(timeout)?,
            None => ep.connect(PORT_DONE)?,
        };
        s.set_read_timeout(Some(timeout));
        if done.is_some() {
            s.read_to_string(&mut peer)?;
        }
        s.write_all(summary.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        if done.is_none() {
            s.read_to_string(&mut peer)?;
        }
        Ok(())
    })();
    r.record(
        "peer-done",
        res.map(|()| out(format_args!("INFO peer says: {peer}"))),
    );
}

/// How one old session of [`migrate`] went: the bytes it checked, then how it ended.
struct Flow {
    name: &'static str,
    /// Bytes moved and, for `rx` and `echo`, checked against the pattern.
    bytes: u64,
    /// The error that ended it (`ConnectionReset` expected), or what was wrong.
    end: std::result::Result<io::Error, String>,
    /// When it ended.
    at: Instant,
    /// `None` when it could not be opened.
    session: Option<Session>,
}

/// Pace of [`migrate`]'s old sessions: a chunk, then a nap, so that data flows all the
/// time without keeping a TCG guest too busy to migrate.
const FLOW_CHUNK: usize = 8 << 10;
const FLOW_NAP: Duration = Duration::from_millis(3);

/// One old session of [`migrate`], run until it fails: `rx` reads the peer's source and
/// checks every byte, `echo` writes and checks what comes back, `tx` writes to the peer's
/// sink.
fn flow(
    ep: &Endpoint,
    name: &'static str,
    seed: u64,
    progress: &std::sync::atomic::AtomicU64,
    timeout: Duration,
) -> Flow {
    let mut bytes = 0u64;
    let port = match name {
        "rx" => services::PORT_SOURCE,
        "echo" => services::PORT_ECHO,
        _ => services::PORT_SINK,
    };
    // The peer's services start listening one after the other: a port past the echo
    // may refuse for a moment after the echo accepts.
    let t = Instant::now();
    let opened = loop {
        match ep.connect(port) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && t.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => break other,
        }
    };
    let mut s = match opened {
        Ok(s) => s,
        Err(e) => {
            let end = Err(format!("connect to port {port}: {e}"));
            return Flow {
                name,
                bytes,
                end,
                at: Instant::now(),
                session: None,
            };
        }
    };
    s.set_read_timeout(Some(timeout));
    s.set_write_timeout(Some(timeout));
    let mut out = vec![0u8; FLOW_CHUNK];
    let mut back = vec![0u8; FLOW_CHUNK];
    let res: std::result::Result<io::Error, String> = (|| {
        if name == "rx" {
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&(u64::MAX >> 1).to_le_bytes());
            req[8..].copy_from_slice(&seed.to_le_bytes());
            if let Err(e) = s.write_all(&req) {
                return Ok(e);
            }
        }
        loop {
            match name {
                "rx" => {
                    let n = match s.read(&mut back) {
                        Ok(0) => return Err(format!("EOF after {bytes} bytes")),
                        Ok(n) => n,
                        Err(e) => return Ok(e),
                    };
                    pattern(seed, bytes, &mut out[..n]);
                    if back[..n] != out[..n] {
                        return Err(format!(
                            "byte {} differs from the stream's",
                            bytes
                                + back[..n]
                                    .iter()
                                    .zip(&out[..n])
                                    .take_while(|(a, b)| a == b)
                                    .count() as u64
                        ));
                    }
                    bytes += n as u64;
                }
                "echo" => {
                    pattern(seed, bytes, &mut out);
                    if let Err(e) = s.write_all(&out) {
                        return Ok(e);
                    }
                    if let Err(e) = s.read_exact(&mut back) {
                        return Ok(e);
                    }
                    if back != out {
                        return Err(format!(
                            "echo differs in bytes {bytes}..{}",
                            bytes + out.len() as u64
                        ));
                    }
                    bytes += out.len() as u64;
                }
                _ => {
                    pattern(seed, bytes, &mut out);
                    if let Err(e) = s.write_all(&out) {
                        return Ok(e);
                    }
                    bytes += out.len() as u64;
                }
            }
            progress.store(bytes, Ordering::Relaxed);
            std::thread::sleep(FLOW_NAP);
        }
    })();
    Flow {
        name,
        bytes,
        end: res,
        at: Instant::now(),
        session: Some(s),
    }
}

/// The VM is migrated, snapshotted and restored, or paused past the peer timeout while
/// we run: sessions open across it, with data flowing both ways (`rx`: the peer's source,
/// every byte checked; `echo`: ours, checked on its way back; `tx`: to the peer's sink),
/// must fail with `ConnectionReset` with every byte before correct; then (unless
/// `no_return`: the source host of a migration, whose peer went elsewhere) the link
/// re-forms, the peer's listeners take new sessions, and those carry only their own bytes.
///
/// Prints `READY migrate` once data flows on every old session.
pub fn migrate(
    ep: &Endpoint,
    role: Role,
    timeout: Duration,
    no_return: bool,
    r: &mut Report,
) -> Result<()> {
    use std::sync::atomic::AtomicU64;
    // As in the exchange: the host hears the guest's summary at the end.
    let done = match role {
        Role::Host if !no_return => Some(ep.listen(PORT_DONE)?),
        _ => None,
    };
    if r.record(
        "old-link-up",
        if ep.wait_up(timeout) {
            wait_services(ep, timeout)
        } else {
            Err(anyhow::anyhow!("no peer within {timeout:?}"))
        },
    )
    .is_none()
    {
        return r.result();
    }
    let seed = u64::from(std::process::id()) << 20 ^ 0x5eed;
    let names = ["rx", "echo", "tx"];
    let progress: Vec<AtomicU64> = names.iter().map(|_| AtomicU64::new(0)).collect();
    let flows: Vec<Flow> = std::thread::scope(|sc| {
        let hs: Vec<_> = names
            .iter()
            .zip(&progress)
            .enumerate()
            .map(|(i, (&name, p))| {
                sc.spawn(move || flow(ep, name, seed ^ (i as u64) << 32, p, timeout))
            })
            .collect();
        // Data flows on every session: the VM may go.
        let t = Instant::now();
        while progress
            .iter()
            .any(|p| p.load(Ordering::Relaxed) < 4 * FLOW_CHUNK as u64)
            && hs.iter().all(|h| !h.is_finished())
            && t.elapsed() < timeout
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        out(format_args!("READY migrate"));
        hs.into_iter()
            .map(|h| h.join().expect("flow thread panicked"))
            .collect()
    });
    let first_end = flows
        .iter()
        .map(|f| f.at)
        .min()
        .unwrap_or_else(Instant::now);
    for f in &flows {
        out(format_args!(
            "INFO old session {}: {} bytes, then {}",
            f.name,
            f.bytes,
            match &f.end {
                Ok(e) => format!("{:?} ({e})", e.kind()),
                Err(why) => why.clone(),
            }
        ));
    }
    r.record(
        "old-data-intact",
        match flows
            .iter()
            .find_map(|f| f.end.as_ref().err().map(|w| (f.name, w)))
        {
            None => Ok(()),
            Some((name, why)) => Err(anyhow::anyhow!("{name}: {why}")),
        },
    );
    r.record(
        "old-sessions-reset",
        flows.iter().try_for_each(|f| match &f.end {
            Ok(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Ok(e) => Err(anyhow::anyhow!("{}: {:?} ({e})", f.name, e.kind())),
            Err(_) => Ok(()), // counted in old-data-intact
        }),
    );
    r.record(
        "old-sessions-stay-reset",
        flows.into_iter().try_for_each(|f| {
            let Some(mut s) = f.session else {
                return Ok(());
            };
            s.set_read_timeout(Some(Duration::from_millis(100)));
            expect_kind(s.read(&mut [0u8; 16]), ErrorKind::ConnectionReset)
                .with_context(|| format!("{} after the reset", f.name))
        }),
    );
    if no_return {
        out(format_args!("INFO stats {:?}", ep.stats()));
        return r.result();
    }
    let up = ep.wait_up(timeout) && wait_services(ep, timeout).is_ok();
    if r.record(
        "new-link-up",
        if up {
            Ok(())
        } else {
            Err(anyhow::anyhow!("no peer within {timeout:?} of the reset"))
        },
    )
    .is_none()
    {
        return r.result();
    }
    // The first session on the new link: wait_services opened one at the peer's echo.
    out(format_args!(
        "INFO first session on the new link {:.0} ms after the reset",
        first_end.elapsed().as_secs_f64() * 1e3
    ));
    r.record(
        "new-session-checksum",
        check_data(ep, 300_000, seed ^ 0xbeef),
    );
    r.record(
        "new-session-echo",
        ep.connect(services::PORT_ECHO)
            .map_err(anyhow::Error::from)
            .and_then(|mut s| echo_data(&mut s, 100_000, seed ^ 0xcafe)),
    );
    r.record(
        "new-session-receive",
        source_data(ep, 300_000, seed ^ 0xf00d).map(drop),
    );
    // Neither side leaves (which resets the link) before the other is done.
    peer_summary(ep, done.as_ref(), timeout, r);
    out(format_args!("INFO stats {:?}", ep.stats()));
    r.result()
}

/// Throughput to the peer's sink and round-trip latency through its echo, printed.
pub fn bench(ep: &Endpoint, seconds: f64, timeout: Duration, r: &mut Report) -> Result<()> {
    if !ep.wait_up(timeout) || wait_services(ep, timeout).is_err() {
        r.record::<()>("bench-link-up", Err(anyhow::anyhow!("no peer services")));
        return r.result();
    }
    let figures = (|| {
        for size in [64usize, 4096, 65536] {
            let (bytes, secs) = stream_to_sink(ep, size, seconds)?;
            out(format_args!(
                "INFO throughput {size:>6} B writes: {:>9.1} MB/s {:>10.0} writes/s",
                bytes as f64 / secs / 1e6,
                bytes as f64 / size as f64 / secs
            ));
        }
        let rtts = round_trips(ep, 64, seconds)?;
        out(format_args!(
            "INFO latency 64 B round trip x{}: p50 {:.1} us p99 {:.1} us",
            rtts.len(),
            pct(&rtts, 50.0) as f64 / 1e3,
            pct(&rtts, 99.0) as f64 / 1e3
        ));
        Ok(())
    })();
    r.record("bench", figures);
    r.result()
}

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Data both ways with checksums, EOF, BrokenPipe, ConnectionRefused, latency.
    Exchange,
    /// The peer is restarted meanwhile (say `READY peer-restart`, then expect resets).
    PeerRestart,
    /// Throughput to the peer's sink and latency through its echo.
    Bench,
    /// The VM migrates, is restored from a snapshot or paused meanwhile (say `READY
    /// migrate`, then expect resets with every byte before intact, and a new link).
    Migrate,
}

/// Command-line options of `check`, shared by `ivring-guest` and `ivring-host`.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// What to run.
    #[arg(long, value_enum, default_value = "exchange")]
    pub scenario: Scenario,
    /// Bytes moved each way per data check.
    #[arg(long, default_value_t = 1 << 20)]
    pub bytes: u64,
    /// Seconds of round trips for the latency figure of the exchange (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub latency: f64,
    /// Seconds per figure of the bench.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Seconds to wait for the peer (to attach, to restart, to finish its checks).
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Blocked readers and writers sleep at once (no spinning): only a doorbell, or the
    /// heartbeat tick, wakes them.
    #[arg(long)]
    pub block: bool,
    /// Do not wait for the peer's own checks to finish (exchange).
    #[arg(long)]
    pub no_wait_peer: bool,
    /// migrate: end after the reset; the peer does not come back (the source host of a
    /// migration).
    #[arg(long)]
    pub no_return: bool,
}

impl CheckArgs {
    /// The link configuration these options ask for.
    pub fn config(&self) -> ivring::Config {
        let mut cfg = ivring::Config::default();
        if self.block {
            cfg.wait = ivring::WaitMode::Block;
        }
        cfg
    }
}

/// Runs `args.scenario` on `ep`, serving [`services`] meanwhile. `region` (if known) lets
/// the checks read the peer id the other side publishes. `Err` when any check failed.
pub fn run(
    ep: &Endpoint,
    region: Option<&SharedRegion>,
    role: Role,
    args: &CheckArgs,
) -> Result<()> {
    // Before the services, so a peer that sees them sees this too.
    let _checking = ep.listen(PORT_CHECKING)?;
    services::spawn_all(ep)?;
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut r = Report::default();
    let res = match args.scenario {
        Scenario::Exchange => exchange(
            ep,
            &ExchangeOptions {
                bytes: args.bytes,
                latency_secs: args.latency,
                timeout,
                wait_peer: !args.no_wait_peer,
                role,
                block: args.block,
                heartbeat: args.config().heartbeat,
            },
            &mut r,
        ),
        Scenario::PeerRestart => peer_restart(ep, region, role, timeout, &mut r),
        Scenario::Bench => bench(ep, args.seconds, timeout, &mut r),
        Scenario::Migrate => migrate(ep, role, timeout, args.no_return, &mut r),
    };
    out(format_args!(
        "INFO {} passed, {} failed",
        r.passed, r.failed
    ));
    res
}

//! `ivring-host bench`: throughput and latency of ivring beside baselines measured in the
//! same run on the same CPUs (a UNIX socket pair, an eventfd ping-pong, a cache-line
//! ping-pong, memcpy), with every ivring figure given as a ratio to its baseline.
//!
//! With nothing configured it runs the loopback pair: an embedded ivshmem server on a
//! temporary socket and a second process of this binary in the guest role (one per wait
//! mode, since the mode is a per-endpoint setting). With `--serve SOCK` it serves there
//! and measures against the guest that joins (`ivring-guest serve`).
//!
//! The machine's speed drifts, so the baselines are measured again right before each
//! wait mode's block of ivring figures, and ratios use that block's baselines.

mod spsc;
mod uds_threads;

use crate::demo::{pct, record_rtt, rtt_histogram};
use crate::services;
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use ivring::{Config, Endpoint, IdleWait, Readiness, Role, Session, SessionOptions, WaitMode};
use ivring_ivshmem::attach::{Attach, HostLink};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

mod async_figures;

/// Message sizes of the throughput figures.
pub const SIZES: [usize; 5] = [64, 256, 4096, 64 << 10, 1 << 20];
/// Message sizes of the round-trip figures.
pub const RTT_SIZES: [usize; 2] = [64, 64 << 10];
/// Concurrent session counts.
pub const SESSIONS: [usize; 3] = [1, 16, 256];

/// Options of `ivring-host bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Serve the ivshmem protocol on this socket and measure against the guest that joins
    /// (which runs `ivring-guest serve`). Without it: the loopback pair on this machine.
    #[arg(long)]
    pub serve: Option<PathBuf>,
    /// Short figures (0.1 s each): the whole run takes about 40 s on two CPUs.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object per line on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG of throughput against message size (ivring and the UNIX socket).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Seconds per figure (default 1, or 0.1 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Wait modes to measure, comma-separated (poll, block, adaptive).
    #[arg(long, value_delimiter = ',', value_parser = parse_wait, default_value = "poll,block,adaptive")]
    pub modes: Vec<WaitMode>,
    /// The two CPUs to pin everything to, baselines included (default: the first two this
    /// process may use). `none` pins nothing.
    #[arg(long, default_value = "auto")]
    pub cpus: String,
    /// Shared memory size in MiB.
    #[arg(long, default_value_t = 16)]
    pub mem_mib: u64,
    /// Seconds of the idle-cost figure (default 10, or 2 with --quick).
    #[arg(long)]
    pub idle_seconds: Option<f64>,
    /// Only the ivring figures whose "NAME SIZE" contains this (e.g. "stream 64", for
    /// profiling); baselines are always measured.
    #[arg(long)]
    pub only: Option<String>,
    /// Skip the baselines (for profiling ivring alone): no ratios.
    #[arg(long, hide = true)]
    pub no_baselines: bool,
}

/// Parses a wait mode name (for the `bench` and `peer` subcommands).
pub fn parse_wait(s: &str) -> Result<WaitMode, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "poll" => Ok(WaitMode::Poll),
        "block" | "doorbell" => Ok(WaitMode::Block),
        "adaptive" => Ok(WaitMode::Adaptive),
        other => Err(format!(
            "unknown wait mode {other:?}: poll, block or adaptive"
        )),
    }
}

fn mode_name(m: WaitMode) -> &'static str {
    match m {
        WaitMode::Poll => "poll",
        WaitMode::Block => "block",
        WaitMode::Adaptive => "adaptive",
    }
}

/// One figure.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// `ivring/stream`, `baseline/uds`, ...
    pub name: String,
    /// Wait mode (`-` for baselines).
    pub mode: String,
    /// The wait-mode block the figure was measured in.
    pub block: String,
    /// Message size in bytes.
    pub size: usize,
    /// Concurrent sessions.
    pub sessions: usize,
    /// Messages per second.
    pub msgs_per_s: Option<f64>,
    /// Bytes per second.
    pub bytes_per_s: Option<f64>,
    /// Round trip percentiles, nanoseconds.
    pub rtt: Option<[f64; 3]>,
    /// Ratio to the matching baseline, and its name. Throughput: ivring / baseline
    /// (higher is better); round trip: ivring p50 / baseline p50 (lower is better).
    pub ratio: Option<(f64, String)>,
    /// Other figures (name, value).
    pub extra: Vec<(String, f64)>,
}

impl Row {
    /// The extra figure named `name`.
    fn extra_value(&self, name: &str) -> Option<f64> {
        self.extra.iter().find(|(k, _)| k == name).map(|x| x.1)
    }
}

/// A row as one JSON object, fields in a fixed order: the figures, `ratio` and
/// `ratio_to`, then the extra figures as fields of their own. Missing or non-finite
/// numbers are null. Numbers are rounded as the table prints them (0.1 for the figures,
/// 0.001 for the ratio, 0.0001 for the extras) so that rows stay short.
struct JsonRow<'a>(&'a Row);

fn rounded(v: Option<f64>, decimals: i32) -> Option<f64> {
    let scale = 10f64.powi(decimals);
    v.filter(|x| x.is_finite())
        .map(|x| (x * scale).round() / scale)
}

impl serde::Serialize for JsonRow<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.0;
        let mut map = serializer.serialize_map(Some(12 + r.extra.len()))?;
        map.serialize_entry("name", &r.name)?;
        map.serialize_entry("mode", &r.mode)?;
        map.serialize_entry("block", &r.block)?;
        map.serialize_entry("size", &r.size)?;
        map.serialize_entry("sessions", &r.sessions)?;
        map.serialize_entry("msgs_per_s", &rounded(r.msgs_per_s, 1))?;
        map.serialize_entry("bytes_per_s", &rounded(r.bytes_per_s, 1))?;
        map.serialize_entry("rtt_p50_ns", &rounded(r.rtt.map(|x| x[0]), 1))?;
        map.serialize_entry("rtt_p99_ns", &rounded(r.rtt.map(|x| x[1]), 1))?;
        map.serialize_entry("rtt_p999_ns", &rounded(r.rtt.map(|x| x[2]), 1))?;
        map.serialize_entry("ratio", &rounded(r.ratio.as_ref().map(|x| x.0), 3))?;
        map.serialize_entry("ratio_to", &r.ratio.as_ref().map(|x| &x.1))?;
        for (k, v) in &r.extra {
            map.serialize_entry(k, &rounded(Some(*v), 4))?;
        }
        map.end()
    }
}

fn out_row(r: &Row) -> Result<String> {
    Ok(serde_json::to_string(&JsonRow(r))?)
}

fn human_rate(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn human_size(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n >> 10)
    } else {
        format!("{n}")
    }
}

fn us(ns: f64) -> String {
    format!("{:.1}", ns / 1e3)
}

fn table_line(r: &Row) -> String {
    let rtt = r.rtt.map_or_else(
        || format!("{:>8} {:>8} {:>8}", "-", "-", "-"),
        |x| format!("{:>8} {:>8} {:>8}", us(x[0]), us(x[1]), us(x[2])),
    );
    let ratio = r
        .ratio
        .as_ref()
        .map_or_else(String::new, |(v, b)| format!("{v:>7.2}x {b}"));
    let extra: String = r
        .extra
        .iter()
        .map(|(k, v)| {
            if v.abs() >= 1000.0 {
                format!(" {k}={}", human_rate(*v))
            } else {
                format!(" {k}={v:.3}")
            }
        })
        .collect();
    format!(
        "{:<22} {:<8} {:>5} {:>4} {:>9} {:>10} {} {}{}",
        r.name,
        r.mode,
        human_size(r.size),
        r.sessions,
        r.msgs_per_s.map_or("-".into(), human_rate),
        r.bytes_per_s
            .map_or("-".into(), |b| format!("{:.1}", b / 1e6)),
        rtt,
        ratio,
        extra
    )
}

// ---------------------------------------------------------------- CPU pinning and CPU time

/// Pins this thread (and so every thread and process started after) to two CPUs.
fn pin(spec: &str) -> Result<Option<Vec<usize>>> {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    if spec == "none" {
        return Ok(None);
    }
    let cpus: Vec<usize> = if spec == "auto" {
        let set = sched_getaffinity(None).context("sched_getaffinity")?;
        (0..CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .take(2)
            .collect()
    } else {
        spec.split(',')
            .map(|c| c.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .context("--cpus: give CPU numbers, e.g. 0,1, or none")?
    };
    let mut set = CpuSet::new();
    for &c in &cpus {
        set.set(c);
    }
    sched_setaffinity(None, &set).context("sched_setaffinity")?;
    Ok(Some(cpus))
}

/// utime + stime of a process in clock ticks (USER_HZ, 100 on Linux).
fn proc_ticks(pid: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// CPU time of every thread of a process in nanoseconds (from schedstat: finer than ticks).
fn proc_sched_ns(pid: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

// ------------------------------------------------------------------------------ baselines

fn memcpy_rate(size: usize, secs: f64) -> f64 {
    let src = vec![0x5au8; size];
    let mut dst = vec![0u8; size];
    let mut bytes = 0u64;
    let t0 = Instant::now();
    let batch = (1 << 20) / size + 1;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..batch {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        }
        bytes += (batch * size) as u64;
    }
    bytes as f64 / t0.elapsed().as_secs_f64()
}

/// Streams `size`-byte writes through a UNIX stream socket pair to a reader thread.
fn uds_tput(size: usize, secs: f64) -> Result<(f64, f64)> {
    let (mut a, mut b) = UnixStream::pair()?;
    let reader = std::thread::spawn(move || -> u64 {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match b.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k as u64,
            }
        }
    });
    let buf = vec![0x5au8; size];
    let t0 = Instant::now();
    let mut sent = 0u64;
    let batch = ((256 << 10) / size).max(1);
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..batch {
            a.write_all(&buf)?;
        }
        sent += (batch * size) as u64;
    }
    drop(a);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    let el = t0.elapsed().as_secs_f64();
    if got != sent {
        bail!("uds reader got {got} of {sent}");
    }
    Ok((sent as f64 / size as f64 / el, sent as f64 / el))
}

fn uds_rtt(size: usize, secs: f64) -> Result<Histogram<u64>> {
    let (mut a, mut b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; size];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                return;
            }
        }
    });
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut v = rtt_histogram();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        a.write_all(&out)?;
        a.read_exact(&mut back)?;
        record_rtt(&mut v, t.elapsed());
    }
    drop(a);
    let _ = echo.join();
    Ok(v)
}

fn eventfd_rtt(secs: f64) -> Result<Histogram<u64>> {
    use rustix::event::{eventfd, EventfdFlags};
    let ping = Arc::new(eventfd(0, EventfdFlags::empty())?);
    let pong = Arc::new(eventfd(0, EventfdFlags::empty())?);
    let stop = Arc::new(AtomicBool::new(false));
    let (pi, po, st) = (ping.clone(), pong.clone(), stop.clone());
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        loop {
            if rustix::io::read(&*pi, &mut b).is_err() || st.load(Ordering::Relaxed) {
                return;
            }
            let _ = rustix::io::write(&*po, &1u64.to_ne_bytes());
        }
    });
    let mut b = [0u8; 8];
    let mut v = rtt_histogram();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let s = Instant::now();
        rustix::io::write(&*ping, &1u64.to_ne_bytes())?;
        rustix::io::read(&*pong, &mut b)?;
        record_rtt(&mut v, s.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    rustix::io::write(&*ping, &1u64.to_ne_bytes())?;
    let _ = t.join();
    Ok(v)
}

#[repr(align(128))]
struct Line(AtomicU64);

fn cacheline_rtt(secs: f64) -> Histogram<u64> {
    let ping = Arc::new(Line(AtomicU64::new(0)));
    let pong = Arc::new(Line(AtomicU64::new(0)));
    let (pi, po) = (ping.clone(), pong.clone());
    let t = std::thread::spawn(move || {
        let mut seen = 0;
        let mut spins = 0u32;
        loop {
            let v = pi.0.load(Ordering::Acquire);
            if v == u64::MAX {
                return;
            }
            if v != seen {
                seen = v;
                spins = 0;
                po.0.store(v, Ordering::Release);
            } else {
                std::hint::spin_loop();
                spins += 1;
                if spins.is_multiple_of(128) {
                    // As ivring's pollers do: let a thread sharing this CPU run.
                    std::thread::yield_now();
                }
            }
        }
    });
    let mut v = rtt_histogram();
    let t0 = Instant::now();
    let mut i = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        i += 1;
        let s = Instant::now();
        ping.0.store(i, Ordering::Release);
        let mut spins = 0u32;
        while pong.0.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(128) {
                // Two spinners on two shared vCPUs: let the other run if we share one.
                std::thread::yield_now();
            }
        }
        record_rtt(&mut v, s.elapsed());
    }
    ping.0.store(u64::MAX, Ordering::Release);
    let _ = t.join();
    v
}

fn rtt_row(name: &str, mode: &str, size: usize, v: &Histogram<u64>) -> Row {
    let p = [
        pct(v, 50.0) as f64,
        pct(v, 99.0) as f64,
        pct(v, 99.9) as f64,
    ];
    Row {
        name: name.into(),
        mode: mode.into(),
        size,
        sessions: 1,
        msgs_per_s: Some(1e9 / p[0].max(1.0)),
        rtt: Some(p),
        extra: vec![("samples".into(), v.len() as f64)],
        ..Row::default()
    }
}

/// The baselines of one block.
#[derive(Default)]
struct Baselines {
    rows: Vec<Row>,
    /// The baselines measured once per run (in the first block, among whose rows they
    /// print), for this block's ratios too.
    per_run: Vec<Row>,
}

impl Baselines {
    fn find(&self, name: &str, size: usize, rtt: bool) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.name == name && r.size == size && r.rtt.is_some() == rtt)
    }

    /// A many-session baseline measured once per run.
    fn find_per_run(&self, name: &str, size: usize, sessions: usize) -> Option<&Row> {
        self.per_run
            .iter()
            .find(|r| r.name == name && r.size == size && r.sessions == sessions)
    }
}

/// Seconds of each many-session figure, and of its UNIX socket baseline (the same slices).
fn sessions_secs(secs: f64) -> f64 {
    secs.max(0.5)
}

/// The baselines of `block`; with `per_run` empty, the once-per-run ones too, kept there.
fn measure_baselines(
    block: &str,
    secs: f64,
    per_run: &mut Vec<Row>,
    log: &dyn Fn(&str),
) -> Result<Baselines> {
    let mut rows = Vec::new();
    log(&format!(
        "[{block}] baselines: memcpy, UNIX socket, bare SPSC ring (and with a lock per write), \
         eventfd, cache line"
    ));
    let tput_row = |name: &str, size: usize, (m, b): (f64, f64)| Row {
        name: name.into(),
        mode: "-".into(),
        size,
        sessions: 1,
        msgs_per_s: Some(m),
        bytes_per_s: Some(b),
        ..Row::default()
    };
    for &size in &SIZES {
        let b = memcpy_rate(size, secs / 2.0);
        rows.push(tput_row("baseline/memcpy", size, (b / size as f64, b)));
        rows.push(tput_row("baseline/uds", size, uds_tput(size, secs)?));
        rows.push(tput_row(
            "baseline/spsc",
            size,
            spsc::tput(size, secs, spsc::Producer::Bare)?,
        ));
        rows.push(tput_row(
            "baseline/spsc-locked",
            size,
            spsc::tput(size, secs, spsc::Producer::Locked)?,
        ));
    }
    for &size in &RTT_SIZES {
        rows.push(rtt_row("baseline/uds", "-", size, &uds_rtt(size, secs)?));
        rows.push(rtt_row(
            "baseline/spsc",
            "-",
            size,
            &spsc::rtt(size, secs, spsc::Producer::Bare)?,
        ));
        rows.push(rtt_row(
            "baseline/spsc-locked",
            "-",
            size,
            &spsc::rtt(size, secs, spsc::Producer::Locked)?,
        ));
    }
    rows.push(rtt_row("baseline/eventfd", "-", 8, &eventfd_rtt(secs)?));
    rows.push(rtt_row("baseline/cacheline", "-", 8, &cacheline_rtt(secs)));
    for r in &mut rows {
        r.block = block.into();
    }
    if per_run.is_empty() {
        // Once per run: the scheduler's cost is the same in every wait mode, and 512
        // threads take a while to start.
        log(&format!(
            "[{block}] baseline: {} UNIX socket pairs, a thread each side (interleaved with one pair)",
            uds_threads::PAIRS
        ));
        for mut r in uds_threads::measure(sessions_secs(secs))? {
            r.block = block.into();
            per_run.push(r.clone());
            rows.push(r);
        }
        log(&format!(
            "[{block}] baseline: {} bare rings, a thread each side that sleeps when the ring \
             is full or empty (interleaved with one ring)",
            uds_threads::PAIRS
        ));
        for mut r in spsc::measure_threads(sessions_secs(secs))? {
            r.block = block.into();
            per_run.push(r.clone());
            rows.push(r);
        }
    }
    Ok(Baselines {
        rows,
        per_run: per_run.clone(),
    })
}

// ------------------------------------------------------------------- interleaved pairs

/// Slices per paired figure: the ivring figure and its baseline alternate in slices so
/// that the machine's drift (2-3x within minutes here) hits both alike.
const SLICES: usize = 4;

/// Runs each of `fs` for `secs` in all, as `SLICES` alternating slices (f0, f1, .., f0,
/// f1, ..); returns each one's slice results.
fn interleave<R>(secs: f64, fs: &mut [&mut dyn FnMut(f64) -> Result<R>]) -> Result<Vec<Vec<R>>> {
    let mut out: Vec<Vec<R>> = fs.iter().map(|_| Vec::new()).collect();
    for _ in 0..SLICES {
        for (i, f) in fs.iter_mut().enumerate() {
            out[i].push(f(secs / SLICES as f64)?);
        }
    }
    Ok(out)
}

/// Sums throughput slices of (bytes, seconds): (msgs/s, bytes/s).
fn tput_of(slices: &[(f64, f64)], size: usize) -> (f64, f64) {
    let bytes: f64 = slices.iter().map(|s| s.0).sum();
    let secs: f64 = slices.iter().map(|s| s.1).sum::<f64>().max(1e-9);
    (bytes / size as f64 / secs, bytes / secs)
}

/// Merges round-trip slices into one histogram.
fn rtt_of(slices: Vec<Histogram<u64>>) -> Result<Histogram<u64>> {
    let mut all = rtt_histogram();
    for h in slices {
        all.add(h)?;
    }
    Ok(all)
}

// ------------------------------------------------------------------------- ivring figures

/// Streams `size`-byte writes (or messages) to a sink service for `secs`; (msgs/s, bytes/s)
/// up to the sink's confirmation that it read everything.
/// How a throughput figure's writer hands its bytes over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// `write_all` of one buffer, filled once: the bytes cost nothing to make.
    Copied,
    /// `write_all` of a buffer each write's bytes are first made in (copied from a
    /// source, as the zero-copy writer makes them in its slot): the copying path with
    /// the same cost of making the bytes as [`Writes::ZeroCopy`].
    Produced,
    /// `reserve`, the bytes made in the slot (copied from the source), `commit`; the
    /// zero-copy sink reads them in place.
    ZeroCopy,
}

fn ivring_tput(
    ep: &Endpoint,
    size: usize,
    secs: f64,
    message: bool,
    writes: Writes,
) -> Result<(f64, f64)> {
    let port = if writes == Writes::ZeroCopy {
        services::PORT_ZC_SINK
    } else {
        services::PORT_SINK
    };
    let mut s = ep.connect_with(port, SessionOptions { message })?;
    let source = vec![0x5au8; size];
    let mut buf = source.clone();
    let frame = ep.max_frame();
    let batch = ((256 << 10) / size).max(1);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..batch {
            match writes {
                Writes::ZeroCopy => {
                    let mut off = 0;
                    while off < size {
                        let n = (size - off).min(frame);
                        let mut slot = s.reserve(n)?;
                        slot.write_at(0, &source[off..off + n]);
                        slot.commit();
                        off += n;
                    }
                }
                Writes::Produced => {
                    buf.copy_from_slice(std::hint::black_box(&source));
                    s.write_all(&buf)?;
                }
                Writes::Copied => s.write_all(&buf)?,
            }
        }
        sent += (batch * size) as u64;
    }
    sink_rate(&mut s, sent, size, t0)
}

/// Ends a write run to the sink: shuts the session down, checks the sink's count of what
/// it read against `sent`, and gives (writes/s, bytes/s) of `size`-byte writes since `t0`.
fn sink_rate(s: &mut Session, sent: u64, size: usize, t0: Instant) -> Result<(f64, f64)> {
    s.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply)?;
    let el = t0.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(reply);
    if got != sent {
        bail!("sink counted {got} bytes, {sent} sent");
    }
    Ok((sent as f64 / size as f64 / el, sent as f64 / el))
}

/// One session written both ways at once for `secs`: this side writes `size`-byte chunks
/// on this thread while another reads the peer's (the duplex service's) chunks. Gives
/// (bytes sent, bytes received, seconds) up to the peer's EOF after its count of what it
/// read, which must match what was sent.
fn ivring_duplex(ep: &Endpoint, size: usize, secs: f64) -> Result<(f64, f64, f64)> {
    let s = ep.connect(services::PORT_DUPLEX)?;
    (&s).write_all(&(size as u64).to_le_bytes())?;
    let buf = vec![0x5au8; size];
    let batch = ((256 << 10) / size).max(1);
    let t0 = Instant::now();
    let (sent, (received, tail, el)) = std::thread::scope(|t| -> Result<_> {
        let reader = t.spawn(|| -> std::io::Result<(u64, [u8; 8], f64)> {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            // The last 8 bytes of the stream: the peer's count.
            let mut tail = [0u8; 8];
            loop {
                let n = (&s).read(&mut buf)?;
                if n == 0 {
                    return Ok((total, tail, t0.elapsed().as_secs_f64()));
                }
                total += n as u64;
                if n >= 8 {
                    tail.copy_from_slice(&buf[n - 8..n]);
                } else {
                    tail.rotate_left(n);
                    tail[8 - n..].copy_from_slice(&buf[..n]);
                }
            }
        });
        let mut sent = 0u64;
        let wrote = (|| -> std::io::Result<()> {
            while t0.elapsed().as_secs_f64() < secs {
                for _ in 0..batch {
                    (&s).write_all(&buf)?;
                }
                sent += (batch * size) as u64;
            }
            s.shutdown(Shutdown::Write)
        })();
        let read = reader
            .join()
            .map_err(|_| anyhow::anyhow!("duplex reader panicked"))?;
        wrote?;
        Ok((sent, read?))
    })?;
    let counted = u64::from_le_bytes(tail);
    if received < 8 || counted != sent {
        bail!("duplex peer counted {counted} bytes, {sent} sent");
    }
    Ok((sent as f64, (received - 8) as f64, el))
}

/// As `ivring_tput` for a stream, with `per_call` writes of `size` bytes given to each
/// `write_vectored` (published with one store of the head).
fn ivring_tput_vectored(
    ep: &Endpoint,
    size: usize,
    per_call: usize,
    secs: f64,
) -> Result<(f64, f64)> {
    let mut s = ep.connect(services::PORT_SINK)?;
    let bufs: Vec<Vec<u8>> = (0..per_call).map(|_| vec![0x5au8; size]).collect();
    let batch = ((256 << 10) / (size * per_call)).max(1);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..batch {
            let mut io: Vec<std::io::IoSlice<'_>> =
                bufs.iter().map(|b| std::io::IoSlice::new(b)).collect();
            let mut rest = &mut io[..];
            while !rest.is_empty() {
                let n = s.write_vectored(rest)?;
                std::io::IoSlice::advance_slices(&mut rest, n);
            }
        }
        sent += (batch * size * per_call) as u64;
    }
    sink_rate(&mut s, sent, size, t0)
}

fn ivring_rtt(ep: &Endpoint, size: usize, secs: f64, message: bool) -> Result<Histogram<u64>> {
    let mut s = ep.connect_with(services::PORT_ECHO, SessionOptions { message })?;
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut v = rtt_histogram();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        s.write_all(&out)?;
        if message {
            let n = s.read(&mut back)?;
            if n != size {
                bail!("echo returned a message of {n} bytes, not {size}");
            }
        } else {
            s.read_exact(&mut back)?;
        }
        record_rtt(&mut v, t.elapsed());
    }
    Ok(v)
}

/// The frames of the bulk session [`ivring_writes_beside_bulk`] reads.
#[derive(Clone, Copy)]
enum BulkFrames {
    /// The largest frames there are (the source service's 256 KiB writes).
    Largest,
    /// Frames of this many bytes (the peer writes that much at a time).
    Of(usize),
}

/// Writes of `size` bytes to a sink, each timed, 64 at a time with a 50 us pause between
/// (an application's requests, not a stream); with `beside_bulk`, while another thread of
/// this endpoint reads a session of such frames in 1 MiB reads. The writes' latencies and
/// the bulk read's bytes/s: what a large read costs the endpoint's other sessions.
fn ivring_writes_beside_bulk(
    ep: &Endpoint,
    size: usize,
    secs: f64,
    beside_bulk: Option<BulkFrames>,
) -> Result<(Histogram<u64>, f64)> {
    let mut sink = ep.connect(services::PORT_SINK)?;
    let msg = vec![0x5au8; size];
    let mut lat = rtt_histogram();
    let mut sent = 0u64;
    let stop = AtomicBool::new(false);
    let bulk = std::thread::scope(|t| -> Result<f64> {
        let reader = if let Some(frames) = beside_bulk {
            let src = match frames {
                BulkFrames::Largest => {
                    // Far more than the figure reads: the source ends when the session
                    // drops.
                    let src = ep.connect(services::PORT_SOURCE)?;
                    let mut req = [0u8; 16];
                    req[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                    (&src).write_all(&req)?;
                    src
                }
                BulkFrames::Of(n) => {
                    // The duplex service writes `n` bytes at a time until the session
                    // drops (we send it nothing).
                    let src = ep.connect(services::PORT_DUPLEX)?;
                    (&src).write_all(&(n as u64).to_le_bytes())?;
                    src
                }
            };
            let stop = &stop;
            Some(t.spawn(move || -> std::io::Result<f64> {
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0u64;
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    got += (&src).read(&mut buf)? as u64;
                }
                Ok(got as f64 / t0.elapsed().as_secs_f64())
            }))
        } else {
            None
        };
        let t0 = Instant::now();
        let wrote = (|| -> std::io::Result<()> {
            while t0.elapsed().as_secs_f64() < secs {
                for _ in 0..64 {
                    let t = Instant::now();
                    sink.write_all(&msg)?;
                    record_rtt(&mut lat, t.elapsed());
                    sent += size as u64;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let bulk = match reader {
            Some(r) => r
                .join()
                .map_err(|_| anyhow::anyhow!("bulk reader panicked"))??,
            None => 0.0,
        };
        wrote?;
        Ok(bulk)
    })?;
    sink.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 8];
    sink.read_exact(&mut reply)?;
    let got = u64::from_le_bytes(reply);
    if got != sent {
        bail!("sink counted {got} bytes, {sent} sent");
    }
    Ok((lat, bulk))
}

/// Opens a session to `port`. The peer's listener backlog (Config::backlog) can fill
/// while its accept thread waits for a CPU: back off and retry a refused open.
fn connect_patiently(ep: &Endpoint, port: u32) -> Result<Session> {
    let mut tries = 0;
    loop {
        match ep.connect(port) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 500 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return Ok(other?),
        }
    }
}

/// Per-session byte counts over `took`: (aggregate bytes/s, slowest/fastest).
fn aggregate(per_session: &[u64], took: Duration) -> (f64, f64) {
    let total: u64 = per_session.iter().sum();
    let min = *per_session.iter().min().unwrap_or(&0) as f64;
    let max = *per_session.iter().max().unwrap_or(&1) as f64;
    (total as f64 / took.as_secs_f64(), min / max.max(1.0))
}

/// The mean of each half of the slices' (value, value) pairs.
pub(crate) fn mean_pair(v: &[(f64, f64)]) -> (f64, f64) {
    let k = v.len().max(1) as f64;
    (
        v.iter().map(|x| x.0).sum::<f64>() / k,
        v.iter().map(|x| x.1).sum::<f64>() / k,
    )
}

/// The writers' start of the many-session figures: a barrier, timed at its release (by the
/// last writer to arrive), not when the timing thread wakes. The barrier's wakeups queue through one lock; a timing thread among them was
/// seen waking up to 1.4 s after the first of 256 writers had started, and counted their
/// head start in the figure.
pub(crate) struct StartGate {
    all: Barrier,
    at: OnceLock<Instant>,
}

impl StartGate {
    /// A gate for `n` threads.
    pub(crate) fn new(n: usize) -> StartGate {
        StartGate {
            all: Barrier::new(n),
            at: OnceLock::new(),
        }
    }

    /// Waits until all `n` threads have called this.
    pub(crate) fn wait(&self) {
        if self.all.wait().is_leader() {
            let _ = self.at.set(Instant::now());
        }
    }

    /// Waits, without taking part, for the moment the threads were let go.
    pub(crate) fn started(&self) -> Instant {
        *self.at.wait()
    }
}

/// `n` sessions streaming `size`-byte writes at once: (aggregate bytes/s, slowest/fastest).
fn ivring_sessions(ep: &Endpoint, n: usize, size: usize, secs: f64) -> Result<(f64, f64)> {
    let mut sess = Vec::with_capacity(n);
    for _ in 0..n {
        sess.push(connect_patiently(ep, services::PORT_SINK)?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(StartGate::new(n));
    let mut threads = Vec::with_capacity(n);
    for mut s in sess {
        let (stop, go) = (stop.clone(), go.clone());
        threads.push(std::thread::Builder::new().stack_size(256 << 10).spawn(
            move || -> std::io::Result<(u64, Instant)> {
                let buf = vec![0x5au8; size];
                let mut sent = 0u64;
                go.wait();
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf)?;
                    sent += size as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut reply = [0u8; 8];
                s.read_exact(&mut reply)?;
                let done = Instant::now();
                if u64::from_le_bytes(reply) != sent {
                    return Err(std::io::Error::other("sink count differs"));
                }
                Ok((sent, done))
            },
        )?);
    }
    let t0 = go.started();
    std::thread::sleep(Duration::from_secs_f64(secs).saturating_sub(t0.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let mut per = Vec::with_capacity(n);
    let mut last = t0;
    for t in threads {
        let (bytes, done) = t
            .join()
            .map_err(|_| anyhow::anyhow!("session thread panicked"))??;
        per.push(bytes);
        last = last.max(done);
    }
    Ok(aggregate(&per, last.duration_since(t0)))
}

/// As [`ivring_sessions`], with every session on this one thread (an event loop over
/// non-blocking sessions) and on one thread of the peer ([`services::PORT_LOOP_SINK`]).
fn ivring_sessions_loop(ep: &Endpoint, n: usize, size: usize, secs: f64) -> Result<(f64, f64)> {
    let ready = Readiness::new();
    let mut sess = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect_patiently(ep, services::PORT_LOOP_SINK)?;
        s.set_nonblocking(true);
        s.set_notify(ready.notifier())?;
        sess.push(s);
    }
    let mut idle = IdleWait::new(ep);
    let buf = vec![0x5au8; size];
    let mut sent = vec![0u64; n];
    let t0 = Instant::now();
    // Write round-robin, one write per session and round, for `secs`. Each round starts
    // where the last one found the ring full: starting every round at the first session
    // would give the space the peer frees to the same first few sessions each time.
    let mut start = 0;
    while t0.elapsed().as_secs_f64() < secs {
        ready.take();
        let mut moved = false;
        let mut first_blocked = None;
        for k in 0..n {
            let i = (start + k) % n;
            match sess[i].write(&buf) {
                Ok(w) => {
                    sent[i] += w as u64;
                    moved = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    first_blocked.get_or_insert(i);
                }
                Err(e) => return Err(e.into()),
            }
        }
        start = first_blocked.unwrap_or((start + 1) % n);
        if moved {
            idle.progress();
        } else {
            idle.idle(&ready, Duration::from_millis(100));
        }
    }
    for s in &sess {
        s.shutdown(Shutdown::Write)?;
    }
    // Collect each sink's count (8 bytes LE) the same way.
    let mut replies = vec![Vec::with_capacity(8); n];
    let mut last = t0;
    while replies.iter().any(|r| r.len() < 8) {
        ready.take();
        let mut moved = false;
        for (s, r) in sess.iter_mut().zip(&mut replies) {
            let mut b = [0u8; 8];
            while r.len() < 8 {
                match s.read(&mut b[..8 - r.len()]) {
                    Ok(0) => bail!("a sink closed without its count"),
                    Ok(k) => {
                        r.extend_from_slice(&b[..k]);
                        moved = true;
                        last = Instant::now();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if moved {
            idle.progress();
        } else {
            idle.idle(&ready, Duration::from_millis(100));
        }
        if t0.elapsed().as_secs_f64() > secs + 60.0 {
            bail!("the loop sink did not answer within a minute");
        }
    }
    for (r, &sent) in replies.iter().zip(&sent) {
        let got = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
        if got != sent {
            bail!("loop sink counted {got} bytes, {sent} sent");
        }
    }
    Ok(aggregate(&sent, last.duration_since(t0)))
}

// ---------------------------------------------------------------------------- the peer

struct Peer {
    link: HostLink,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The link comes up before the peer's services listen: wait for them (the sink).
fn wait_services(ep: &Endpoint) -> Result<()> {
    let t0 = Instant::now();
    loop {
        match ep.connect(services::PORT_SINK) {
            Ok(mut s) => {
                s.shutdown(Shutdown::Write)?;
                let mut reply = [0u8; 8];
                s.read_exact(&mut reply)?;
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("the peer's services did not start within 10 s");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn start_loopback(mode: WaitMode, mem: u64) -> Result<Peer> {
    let base = std::env::temp_dir();
    let dir = (0..100)
        .map(|i| base.join(format!("ivring-bench-{}-{i}", std::process::id())))
        .find(|p| std::fs::create_dir(p).is_ok())
        .context("create a temporary directory")?;
    let sock = dir.join("ivshmem.sock");
    let link = serve_link(&sock, mode, mem)?;
    let exe = std::env::current_exe().context("find own executable")?;
    let child = Command::new(exe)
        .args([
            "peer",
            "--role",
            "guest",
            "--wait",
            mode_name(mode),
            "--join",
        ])
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .context("start the guest-role process")?;
    let peer = Peer {
        link,
        child: Some(child),
        dir: Some(dir),
    };
    if !peer.link.wait_up(Duration::from_secs(10)) {
        bail!("the guest-role process did not attach within 10 s");
    }
    wait_services(&peer.link)?;
    Ok(peer)
}

/// The host's side, serving the ivshmem protocol on `sock` with one vector per peer.
fn serve_link(sock: &Path, mode: WaitMode, mem: u64) -> Result<HostLink> {
    let cfg = Config {
        wait: mode,
        ..Config::default()
    };
    Ok(HostLink::open(
        Role::Host,
        &Attach::Serve {
            socket: sock.to_path_buf(),
            size: mem,
            vectors: 1,
        },
        cfg,
    )?)
}

fn start_served(sock: &Path, mode: WaitMode, mem: u64) -> Result<Peer> {
    let link = serve_link(sock, mode, mem)?;
    eprintln!(
        "bench: serving on {}; start the guest (QEMU ivshmem-doorbell on this socket, then `ivring-guest serve`)",
        sock.display()
    );
    if !link.wait_up(Duration::from_secs(300)) {
        bail!("no guest attached within 300 s");
    }
    wait_services(&link)?;
    Ok(Peer {
        link,
        child: None,
        dir: None,
    })
}

// ------------------------------------------------------------------------------ the run

fn ratio_tput(r: &mut Row, base: Option<&Row>, name: &str) {
    if let (Some(b), Some(v)) = (base.and_then(|b| b.bytes_per_s), r.bytes_per_s) {
        r.ratio = Some((v / b, name.into()));
    }
}

fn measure_block(
    ep: &Endpoint,
    mode: WaitMode,
    secs: f64,
    base: &Baselines,
    only: Option<&str>,
    log: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    let m = mode_name(mode);
    let skip =
        |name: &str, size: usize| only.is_some_and(|o| !format!("{name} {size}").contains(o));
    let mut rows = Vec::new();
    let frame = ep.max_frame();
    for (name, message, zc) in [
        ("ivring/stream", false, false),
        ("ivring/message", true, false),
        ("ivring/zerocopy", false, true),
    ] {
        for &size in &SIZES {
            if message && size > 256 << 10 {
                // Larger than the default receive buffer (Config::buf_size): refused.
                continue;
            }
            if skip(name, size) {
                continue;
            }
            log(&format!(
                "[{m}] {name} {} B (interleaved with the UNIX socket)",
                size
            ));
            let mut ivr = |t: f64| {
                let writes = if zc { Writes::ZeroCopy } else { Writes::Copied };
                let (_, b) = ivring_tput(ep, size, t, message, writes)?;
                Ok((b * t, t))
            };
            let mut uds = |t: f64| {
                let (_, b) = uds_tput(size, t)?;
                Ok((b * t, t))
            };
            // Zero-copy also alternates with the copying path, for its own ratios: to
            // writes whose bytes cost nothing to make, and to writes that make them as
            // the zero-copy writer does (one copy from a source) before handing them over.
            let mut copy = |t: f64| {
                if !zc {
                    return Ok((0.0, 0.0));
                }
                let (_, b) = ivring_tput(ep, size, t, false, Writes::Copied)?;
                Ok((b * t, t))
            };
            let mut produced = |t: f64| {
                if !zc {
                    return Ok((0.0, 0.0));
                }
                let (_, b) = ivring_tput(ep, size, t, false, Writes::Produced)?;
                Ok((b * t, t))
            };
            let res = match interleave(secs, &mut [&mut ivr, &mut uds, &mut copy, &mut produced]) {
                Err(e)
                    if zc
                        && e.downcast_ref::<std::io::Error>()
                            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused) =>
                {
                    log("the peer has no zero-copy sink (port 5): zero-copy figures skipped");
                    break;
                }
                r => r?,
            };
            let (mps, bps) = tput_of(&res[0], size);
            let (_, ubps) = tput_of(&res[1], size);
            let mut r = Row {
                name: name.into(),
                mode: m.into(),
                size,
                sessions: 1,
                msgs_per_s: Some(mps),
                bytes_per_s: Some(bps),
                ..Row::default()
            };
            r.ratio = Some((bps / ubps.max(1.0), "uds".into()));
            r.extra.push(("uds_bytes_per_s".into(), ubps));
            if let Some(mc) = base
                .find("baseline/memcpy", size, false)
                .and_then(|b| b.bytes_per_s)
            {
                r.extra.push(("vs_memcpy".into(), bps / mc));
            }
            // What the sessions, credits and checks cost against the bare ring (the same
            // writes, each published with its own store).
            if let Some(sp) = base.find("baseline/spsc", size, false) {
                if let (Some(sm), Some(sb)) = (sp.msgs_per_s, sp.bytes_per_s) {
                    r.extra.push(("vs_spsc_msgs".into(), mps / sm));
                    r.extra.push(("vs_spsc_bytes".into(), bps / sb));
                }
            }
            // The ceiling of a design whose sessions share one ring producer.
            if let Some(lm) = base
                .find("baseline/spsc-locked", size, false)
                .and_then(|b| b.msgs_per_s)
            {
                r.extra.push(("vs_spsc_locked_msgs".into(), mps / lm));
            }
            if zc {
                let (_, cbps) = tput_of(&res[2], size);
                r.extra.push(("copy_bytes_per_s".into(), cbps));
                r.extra.push(("vs_copy".into(), bps / cbps.max(1.0)));
                let (_, pbps) = tput_of(&res[3], size);
                r.extra.push(("copy_produced_bytes_per_s".into(), pbps));
                r.extra
                    .push(("vs_copy_produced".into(), bps / pbps.max(1.0)));
                r.extra
                    .push(("frames_per_msg".into(), size.div_ceil(frame) as f64));
            }
            rows.push(r);
        }
    }
    // Small writes handed over 64 at a time (`write_vectored`: one store of the head, one
    // ring at most, per call), against the same writes one call each and the UNIX socket.
    let name = "ivring/stream-writev";
    let (size, per_call) = (64, 64);
    if !skip(name, size) {
        log(&format!(
            "[{m}] {name} {size} B x {per_call} per call (interleaved with single writes and the UNIX socket)"
        ));
        let mut vec_w = |t: f64| {
            let (_, b) = ivring_tput_vectored(ep, size, per_call, t)?;
            Ok((b * t, t))
        };
        let mut single = |t: f64| {
            let (_, b) = ivring_tput(ep, size, t, false, Writes::Copied)?;
            Ok((b * t, t))
        };
        let mut uds = |t: f64| {
            let (_, b) = uds_tput(size, t)?;
            Ok((b * t, t))
        };
        let res = interleave(secs, &mut [&mut vec_w, &mut single, &mut uds])?;
        let (mps, bps) = tput_of(&res[0], size);
        let (_, sbps) = tput_of(&res[1], size);
        let (_, ubps) = tput_of(&res[2], size);
        let mut r = Row {
            name: name.into(),
            mode: m.into(),
            size,
            sessions: 1,
            msgs_per_s: Some(mps),
            bytes_per_s: Some(bps),
            ratio: Some((bps / ubps.max(1.0), "uds".into())),
            ..Row::default()
        };
        r.extra.push(("per_call".into(), per_call as f64));
        r.extra
            .push(("vs_single_writes".into(), bps / sbps.max(1.0)));
        r.extra.push(("uds_bytes_per_s".into(), ubps));
        rows.push(r);
    }
    // One session written both ways at once, against one way alone (the same writes to
    // the sink), slices interleaved.
    let name = "ivring/duplex";
    for size in [64, 64 << 10] {
        if skip(name, size) {
            continue;
        }
        log(&format!(
            "[{m}] {name} {size} B both ways at once (interleaved with one way)"
        ));
        let mut both = |t: f64| {
            let (out, back, el) = ivring_duplex(ep, size, t)?;
            Ok((out + back, out, back, el))
        };
        let mut one = |t: f64| {
            let (_, b) = ivring_tput(ep, size, t, false, Writes::Copied)?;
            Ok((b * t, 0.0, 0.0, t))
        };
        // The bare ring both ways and one way, in the same slices: what the machine's CPUs
        // allow a full-duplex stream (two CPUs run four busy threads).
        let mut ring_both = |t: f64| Ok((spsc::duplex(size, t)? * t, 0.0, 0.0, t));
        let mut ring_one = |t: f64| {
            let (_, b) = spsc::tput(size, t, spsc::Producer::Bare)?;
            Ok((b * t, 0.0, 0.0, t))
        };
        let res = interleave(
            secs,
            &mut [&mut both, &mut one, &mut ring_both, &mut ring_one],
        )?;
        let sum = |v: &[(f64, f64, f64, f64)], f: fn(&(f64, f64, f64, f64)) -> f64| {
            v.iter().map(f).sum::<f64>() / v.iter().map(|x| x.3).sum::<f64>().max(1e-9)
        };
        let agg = sum(&res[0], |x| x.0);
        let out = sum(&res[0], |x| x.1);
        let back = sum(&res[0], |x| x.2);
        let one_way = sum(&res[1], |x| x.0);
        let ring_ratio = sum(&res[2], |x| x.0) / sum(&res[3], |x| x.0).max(1.0);
        let mut r = Row {
            name: name.into(),
            mode: m.into(),
            size,
            sessions: 1,
            msgs_per_s: Some(agg / size as f64),
            bytes_per_s: Some(agg),
            ratio: Some((agg / one_way.max(1.0), "one way".into())),
            ..Row::default()
        };
        r.extra.push(("one_way_bytes_per_s".into(), one_way));
        r.extra.push(("sent_bytes_per_s".into(), out));
        r.extra.push(("received_bytes_per_s".into(), back));
        r.extra.push(("spsc_duplex_vs_one_way".into(), ring_ratio));
        rows.push(r);
    }
    for &size in &RTT_SIZES {
        for (name, message) in [("ivring/rtt/stream", false), ("ivring/rtt/message", true)] {
            if skip(name, size) {
                continue;
            }
            // The floor that matches the mode: polling against the cache-line ping-pong,
            // the doorbell against the eventfd ping-pong; and always the UNIX socket.
            let floor = match mode {
                WaitMode::Poll if size == 64 => Some("cacheline"),
                WaitMode::Block if size == 64 => Some("eventfd"),
                _ => None,
            };
            log(&format!(
                "[{m}] {name} {size} B round trips (interleaved with uds{})",
                floor.map_or(String::new(), |f| format!(" and {f}"))
            ));
            let mut ivr = |t: f64| ivring_rtt(ep, size, t, message);
            let mut uds = |t: f64| uds_rtt(size, t);
            let mut fl = |t: f64| match floor {
                Some("cacheline") => Ok(cacheline_rtt(t)),
                Some(_) => eventfd_rtt(t),
                None => Ok(rtt_histogram()),
            };
            let mut res = interleave(secs, &mut [&mut ivr, &mut uds, &mut fl])?;
            let f = rtt_of(res.pop().unwrap_or_default())?;
            let u = rtt_of(res.pop().unwrap_or_default())?;
            let v = rtt_of(res.pop().unwrap_or_default())?;
            let mut r = rtt_row(name, m, size, &v);
            let p50 = |x: &Histogram<u64>| pct(x, 50.0) as f64;
            r.extra.push(("uds_p50_ns".into(), p50(&u)));
            r.extra.push(("vs_uds".into(), p50(&v) / p50(&u).max(1.0)));
            if let Some(sp) = base.find("baseline/spsc", size, true).and_then(|b| b.rtt) {
                r.extra.push(("spsc_p50_ns".into(), sp[0]));
                r.extra.push(("vs_spsc".into(), p50(&v) / sp[0].max(1.0)));
            }
            if let Some(sp) = base
                .find("baseline/spsc-locked", size, true)
                .and_then(|b| b.rtt)
            {
                r.extra.push(("spsc_locked_p50_ns".into(), sp[0]));
                r.extra
                    .push(("vs_spsc_locked".into(), p50(&v) / sp[0].max(1.0)));
            }
            match floor {
                Some(fname) => {
                    r.extra.push((format!("{fname}_p50_ns"), p50(&f)));
                    r.ratio = Some((p50(&v) / p50(&f).max(1.0), fname.into()));
                }
                None => r.ratio = Some((p50(&v) / p50(&u).max(1.0), "uds".into())),
            }
            rows.push(r);
        }
    }
    for (name, frames) in [
        ("ivring/write-beside-bulk", BulkFrames::Largest),
        ("ivring/write-beside-bulk-4k", BulkFrames::Of(4096)),
    ] {
        if skip(name, 64) {
            continue;
        }
        log(&format!(
            "[{m}] {name} 64 B: writes timed alone and while another session is read in \
             bulk (interleaved)"
        ));
        let mut out = interleave(
            secs,
            &mut [
                &mut |t| ivring_writes_beside_bulk(ep, 64, t, None),
                &mut |t| ivring_writes_beside_bulk(ep, 64, t, Some(frames)),
            ],
        )?;
        let beside = out.pop().unwrap_or_default();
        let alone = out.pop().unwrap_or_default();
        let bulk = beside.iter().map(|x| x.1).sum::<f64>() / beside.len().max(1) as f64;
        let beside = rtt_of(beside.into_iter().map(|x| x.0).collect())?;
        let alone = rtt_of(alone.into_iter().map(|x| x.0).collect())?;
        let mut r = rtt_row(name, m, 64, &beside);
        // Latencies of single writes, not round trips: no rate to give.
        r.msgs_per_s = None;
        let p999 = |x: &Histogram<u64>| pct(x, 99.9) as f64;
        for (k, q) in [
            ("alone_p50_ns", 50.0),
            ("alone_p99_ns", 99.0),
            ("alone_p99_9_ns", 99.9),
        ] {
            r.extra.push((k.into(), pct(&alone, q) as f64));
        }
        r.extra.push(("bulk_bytes_per_s".into(), bulk));
        r.ratio = Some((p999(&beside) / p999(&alone).max(1.0), "alone p99.9".into()));
        rows.push(r);
    }
    // Each many-session figure is measured in slices interleaved with one session's (the
    // same writes, sink and window) and with the other way of serving them, so that the
    // ratios hold when the machine changes speed from one second to the next.
    let mut one_slices = Vec::new();
    let one_at = rows.len();
    for &n in SESSIONS.iter().filter(|&&n| n > 1) {
        if skip(&format!("ivring/sessions/{n}"), 4096) {
            continue;
        }
        log(&format!(
            "[{m}] {n} concurrent sessions, 4 KiB writes: a thread per session, then one \
             thread each side (interleaved with one session)"
        ));
        let out = interleave(
            sessions_secs(secs),
            &mut [
                &mut |t| ivring_sessions(ep, 1, 4096, t),
                &mut |t| ivring_sessions(ep, n, 4096, t),
                &mut |t| ivring_sessions_loop(ep, n, 4096, t),
            ],
        )?;
        let (one, _) = mean_pair(&out[0]);
        one_slices.extend_from_slice(&out[0]);
        for (name, slices) in [
            ("ivring/sessions", &out[1]),
            ("ivring/sessions-loop", &out[2]),
        ] {
            let (bps, fair) = mean_pair(slices);
            let mut r = Row {
                name: name.into(),
                mode: m.into(),
                size: 4096,
                sessions: n,
                msgs_per_s: Some(bps / 4096.0),
                bytes_per_s: Some(bps),
                ..Row::default()
            };
            ratio_tput(&mut r, base.find("baseline/uds", 4096, false), "uds");
            r.extra.push(("slowest_fastest".into(), fair));
            r.extra.push(("vs_one_session".into(), bps / one.max(1.0)));
            r.extra.push(("one_session_bytes_per_s".into(), one));
            // The same many threads over UNIX sockets, and over bare rings of their own:
            // what the scheduler leaves them, with and without the kernel in the path.
            for (baseline, prefix) in [
                ("baseline/uds-threads", "uds_threads"),
                ("baseline/spsc-threads", "spsc_threads"),
            ] {
                let Some(b) = base
                    .find_per_run(baseline, uds_threads::SIZE, n)
                    .filter(|_| name == "ivring/sessions")
                else {
                    continue;
                };
                for (from, to) in [
                    ("vs_one_session", "vs_one"),
                    ("slowest_fastest", "slowest_fastest"),
                ] {
                    if let Some(v) = b.extra_value(from) {
                        r.extra.push((format!("{prefix}_{to}"), v));
                    }
                }
            }
            rows.push(r);
        }
    }
    if !one_slices.is_empty() {
        let bps = one_slices.iter().map(|x| x.0).sum::<f64>() / one_slices.len() as f64;
        let mut r = Row {
            name: "ivring/sessions".into(),
            mode: m.into(),
            size: 4096,
            sessions: 1,
            msgs_per_s: Some(bps / 4096.0),
            bytes_per_s: Some(bps),
            ..Row::default()
        };
        ratio_tput(&mut r, base.find("baseline/uds", 4096, false), "uds");
        rows.insert(one_at, r);
    }
    rows.extend(async_figures::measure(ep, m, secs, &skip, log)?);
    for r in &mut rows {
        r.block = m.into();
    }
    Ok(rows)
}

fn measure_idle(peer: &Peer, block: &str, secs: f64, log: &dyn Fn(&str)) -> Result<Row> {
    const SESSIONS_OPEN: usize = 16;
    log(&format!(
        "[{block}] idle link with {SESSIONS_OPEN} open sessions for {secs:.0} s"
    ));
    let mut open = Vec::new();
    for _ in 0..SESSIONS_OPEN {
        open.push(peer.link.connect(services::PORT_ECHO)?);
    }
    std::thread::sleep(Duration::from_millis(200));
    let child = peer.child.as_ref().map(|c| c.id().to_string());
    let pids: Vec<String> = std::iter::once("self".to_string()).chain(child).collect();
    let ticks0: u64 = pids.iter().map(|p| proc_ticks(p).unwrap_or(0)).sum();
    let ns0: u64 = pids.iter().map(|p| proc_sched_ns(p)).sum();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let el = t0.elapsed().as_secs_f64();
    let ticks1: u64 = pids.iter().map(|p| proc_ticks(p).unwrap_or(0)).sum();
    let ns1: u64 = pids.iter().map(|p| proc_sched_ns(p)).sum();
    drop(open);
    let pct_ticks = (ticks1 - ticks0) as f64 / 100.0 / el * 100.0;
    let pct_ns = (ns1 - ns0) as f64 / 1e9 / el * 100.0;
    Ok(Row {
        name: "ivring/idle".into(),
        mode: block.into(),
        block: block.into(),
        sessions: SESSIONS_OPEN,
        extra: vec![
            ("cpu_pct_of_core".into(), pct_ticks),
            ("cpu_pct_schedstat".into(), pct_ns),
            ("seconds".into(), el),
            ("processes".into(), pids.len() as f64),
        ],
        ..Row::default()
    })
}

/// A speed target of the core and whether it was met.
struct Target {
    what: String,
    value: f64,
    limit: f64,
    at_least: bool,
    /// What a simpler design gets on this machine, in the same units: (which, figure).
    ceiling: Option<(&'static str, f64)>,
}

fn targets(rows: &[Row]) -> Vec<Target> {
    let find = |name: &str, mode: &str, size: usize, sessions: usize| {
        rows.iter()
            .find(|r| r.name == name && r.mode == mode && r.size == size && r.sessions == sessions)
    };
    let mut t = Vec::new();
    let mut push = |what: &str,
                    v: Option<f64>,
                    limit: f64,
                    at_least: bool,
                    ceiling: Option<(&'static str, f64)>| {
        if let Some(value) = v {
            t.push(Target {
                what: what.into(),
                value,
                limit,
                at_least,
                ceiling,
            });
        }
    };
    let ratio = |r: Option<&Row>| r.and_then(|r| r.ratio.as_ref().map(|x| x.0));
    let extra = |r: Option<&Row>, k: &str| {
        r.and_then(|r| r.extra.iter().find(|(n, _)| n == k).map(|x| x.1))
    };
    // The poll block's locked ring over another of its 64 B baselines (measured one after
    // the other): a shared ring producer's ceiling in that baseline's units.
    let locked_over = |name: &str| {
        let msgs = |name: &str| {
            rows.iter()
                .find(|r| r.name == name && r.block == "poll" && r.size == 64 && r.rtt.is_none())
                .and_then(|r| r.msgs_per_s)
        };
        Some((
            "bare ring + one mutex per write",
            msgs("baseline/spsc-locked")? / msgs(name)?,
        ))
    };
    // The same for round trips: the locked ring's p50 over another poll-block baseline's.
    let locked_rtt_over = |name: &str| {
        let p50 = |name: &str| {
            rows.iter()
                .find(|r| r.name == name && r.block == "poll" && r.size <= 64 && r.rtt.is_some())
                .and_then(|r| r.rtt)
                .map(|r| r[0])
        };
        Some((
            "bare ring + one mutex per read and per write",
            p50("baseline/spsc-locked")? / p50(name)?.max(1.0),
        ))
    };
    for (m, limit) in [("poll", 35.0), ("adaptive", 25.0), ("block", 15.0)] {
        push(
            &format!("64 B stream, 1 session, {m}: msgs/s vs UNIX socket"),
            ratio(find("ivring/stream", m, 64, 1)),
            limit,
            true,
            locked_over("baseline/uds").filter(|_| m == "poll"),
        );
    }
    // What the sessions, credits and checks cost against the bare ring.
    push(
        "64 B stream, poll: msgs/s vs bare SPSC ring",
        extra(find("ivring/stream", "poll", 64, 1), "vs_spsc_msgs"),
        0.5,
        true,
        locked_over("baseline/spsc"),
    );
    push(
        "64 KiB stream, poll: bytes/s vs bare SPSC ring",
        extra(find("ivring/stream", "poll", 65536, 1), "vs_spsc_bytes"),
        0.9,
        true,
        None,
    );
    push(
        "64 B round trip, poll: p50 vs bare SPSC ring",
        extra(find("ivring/rtt/stream", "poll", 64, 1), "vs_spsc"),
        1.3,
        false,
        locked_rtt_over("baseline/spsc"),
    );
    push(
        "64 B round trip, poll: p99 / p50",
        find("ivring/rtt/stream", "poll", 64, 1)
            .and_then(|r| r.rtt)
            .map(|[p50, p99, _]| p99 / p50.max(1.0)),
        10.0,
        false,
        None,
    );
    for m in ["poll", "block", "adaptive"] {
        for size in [64, 65536] {
            push(
                &format!("{size} B both ways at once, {m}: aggregate vs one way"),
                ratio(find("ivring/duplex", m, size, 1)),
                1.7,
                true,
                extra(find("ivring/duplex", m, size, 1), "spsc_duplex_vs_one_way")
                    .map(|v| ("bare ring both ways vs one way", v)),
            );
        }
    }
    for m in ["poll", "block", "adaptive"] {
        push(
            &format!("64 KiB stream, {m}: bytes/s vs UNIX socket"),
            ratio(find("ivring/stream", m, 65536, 1)),
            4.0,
            true,
            None,
        );
        push(
            &format!("64 KiB zero-copy vs copying, {m}"),
            extra(find("ivring/zerocopy", m, 65536, 1), "vs_copy"),
            2.0,
            true,
            // The copying writer's bytes cost nothing to make, the zero-copy writer's one
            // copy into its slot: beside it, the copying path that makes them too.
            extra(find("ivring/zerocopy", m, 65536, 1), "vs_copy_produced")
                .map(|v| ("vs copying whose writer makes its bytes too", v)),
        );
    }
    push(
        "64 B round trip, poll: p50 vs cache-line ping-pong",
        ratio(find("ivring/rtt/stream", "poll", 64, 1)),
        2.5,
        false,
        locked_rtt_over("baseline/cacheline"),
    );
    push(
        "64 B round trip, block: p50 vs eventfd ping-pong",
        ratio(find("ivring/rtt/stream", "block", 64, 1)),
        1.2,
        false,
        None,
    );
    for m in ["adaptive", "block", "poll"] {
        for (name, how) in [
            ("ivring/sessions", "a thread per session"),
            ("ivring/sessions-loop", "one thread each side"),
        ] {
            // A thread per session against as many bare rings with a thread at each end
            // (the loop rows have no such baseline; the UNIX socket pairs are in the JSON).
            let bare = |k: &str| {
                Some((
                    "bare rings, a sleeping thread at each end",
                    extra(find(name, m, 4096, 256), k)?,
                ))
            };
            push(
                &format!("256 sessions at 4 KiB, {m}, {how}: aggregate vs one session"),
                extra(find(name, m, 4096, 256), "vs_one_session"),
                0.7,
                true,
                bare("spsc_threads_vs_one"),
            );
            push(
                &format!("256 sessions at 4 KiB, {m}, {how}: slowest/fastest"),
                extra(find(name, m, 4096, 256), "slowest_fastest"),
                0.5,
                true,
                bare("spsc_threads_slowest_fastest"),
            );
        }
    }
    if let Some(r) = rows.iter().find(|r| r.name == "ivring/idle") {
        push(
            &format!(
                "idle link, open sessions: % of one core ({:.0} s)",
                extra(Some(r), "seconds").unwrap_or(0.0)
            ),
            extra(Some(r), "cpu_pct_of_core"),
            1.0,
            false,
            None,
        );
    }
    t
}

/// Runs the bench.
pub fn run(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let secs = args.seconds.unwrap_or(if args.quick { 0.1 } else { 1.0 });
    let idle_secs = args
        .idle_seconds
        .unwrap_or(if args.quick { 2.0 } else { 10.0 });
    let mem = args.mem_mib << 20;
    let log = |s: &str| eprintln!("bench {:>5.1}s {s}", started.elapsed().as_secs_f64());
    let cpus = pin(&args.cpus)?;
    log(&match &cpus {
        Some(c) => format!("pinned to CPUs {c:?} (baselines and both ivring processes)"),
        None => "not pinned".into(),
    });
    let mut rows = Vec::new();
    let mut modes = args.modes.clone();
    modes.dedup();
    let mut per_run = Vec::new();
    for (i, &mode) in modes.iter().enumerate() {
        let m = mode_name(mode);
        let base = if args.no_baselines {
            Baselines::default()
        } else {
            measure_baselines(m, secs, &mut per_run, &log)?
        };
        let peer = match &args.serve {
            None => start_loopback(mode, mem)?,
            Some(sock) => start_served(sock, mode, mem)?,
        };
        let mut block = measure_block(&peer.link, mode, secs, &base, args.only.as_deref(), &log)?;
        rows.extend(base.rows);
        rows.append(&mut block);
        if i + 1 == modes.len() && args.only.is_none() {
            rows.push(measure_idle(&peer, m, idle_secs, &log)?);
        }
        if args.serve.is_some() {
            // A guest can only join the server once; one block is all we get.
            break;
        }
    }
    log("done");

    let mut out = std::io::stdout().lock();
    if args.json {
        for r in &rows {
            writeln!(out, "{}", out_row(r)?)?;
        }
    } else {
        writeln!(
            out,
            "ivring bench ({}; {} CPUs: {}; {:.2} s per figure)",
            if args.serve.is_some() {
                "host <-> guest"
            } else {
                "loopback: two processes, memfd + eventfds"
            },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpus.as_ref()
                .map_or("not pinned".into(), |c| format!("pinned to {c:?}")),
            secs
        )?;
        writeln!(
            out,
            "{:<22} {:<8} {:>5} {:>4} {:>9} {:>10} {:>8} {:>8} {:>8} ratio",
            "name", "mode", "size", "sess", "msgs/s", "MB/s", "p50 us", "p99 us", "p99.9"
        )?;
        let mut last_block = String::new();
        for r in &rows {
            if r.block != last_block {
                writeln!(out, "-- block: {} --", r.block)?;
                last_block = r.block.clone();
            }
            writeln!(out, "{}", table_line(r))?;
        }
        writeln!(out, "targets:")?;
        for t in targets(&rows) {
            let met = if t.at_least {
                t.value >= t.limit
            } else {
                t.value <= t.limit
            };
            writeln!(
                out,
                "  {:<4} {:<58} {:>8.2} (target {} {}){}",
                if met { "MET" } else { "MISS" },
                t.what,
                t.value,
                if t.at_least { ">=" } else { "<=" },
                t.limit,
                t.ceiling
                    .map_or(String::new(), |(what, v)| format!(" ({what}: {v:.2})"))
            )?;
        }
    }
    if let Some(p) = &args.plot {
        std::fs::write(p, plot_svg(&rows)).with_context(|| format!("write {}", p.display()))?;
        log(&format!("plot written to {}", p.display()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- plot

type Series<'a> = (String, &'a str, Vec<(usize, f64)>);

/// Throughput (MB/s, log scale) against message size (log scale): ivring stream per mode,
/// ivring zero-copy (adaptive) and the UNIX socket.
pub fn plot_svg(rows: &[Row]) -> String {
    let (w, h) = (760.0, 460.0);
    let (l, r, t, b) = (70.0, 170.0, 30.0, 50.0);
    let series: Vec<Series> = {
        let mut v = Vec::new();
        let pick = |name: &str, mode: Option<&str>, block: Option<&str>| -> Vec<(usize, f64)> {
            rows.iter()
                .filter(|x| {
                    x.name == name
                        && x.sessions == 1
                        && x.rtt.is_none()
                        && mode.is_none_or(|m| x.mode == m)
                        && block.is_none_or(|bl| x.block == bl)
                })
                .filter_map(|x| Some((x.size, x.bytes_per_s? / 1e6)))
                .collect()
        };
        let colors = ["#d62728", "#1f77b4", "#2ca02c"];
        for (i, m) in ["poll", "block", "adaptive"].iter().enumerate() {
            let s = pick("ivring/stream", Some(m), None);
            if !s.is_empty() {
                v.push((format!("ivring {m}"), colors[i], s));
            }
        }
        let zc = pick("ivring/zerocopy", Some("adaptive"), None);
        if !zc.is_empty() {
            v.push(("ivring zero-copy".into(), "#9467bd", zc));
        }
        // One UNIX socket series: the first block's.
        let first = rows.first().map(|x| x.block.clone()).unwrap_or_default();
        v.push((
            "UNIX socket".into(),
            "#333333",
            pick("baseline/uds", None, Some(&first)),
        ));
        v
    };
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .collect();
    let ymin = all.iter().cloned().fold(f64::INFINITY, f64::min).max(0.1);
    let ymax = all.iter().cloned().fold(0.0, f64::max).max(ymin * 10.0);
    let (ly0, ly1) = (ymin.log10().floor(), ymax.log10().ceil());
    let (lx0, lx1) = ((64f64).log2(), ((1 << 20) as f64).log2());
    let px = |size: usize| l + ((size as f64).log2() - lx0) / (lx1 - lx0) * (w - l - r);
    let py = |v: f64| h - b - (v.max(10f64.powf(ly0)).log10() - ly0) / (ly1 - ly0) * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Throughput against message size (one session, log-log)</text>\n",
        (w - r + l) / 2.0
    );
    let mut e = ly0;
    while e <= ly1 {
        let y = py(10f64.powf(e));
        s += &format!(
            "<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            w - r,
            l - 6.0,
            y + 4.0,
            human_rate(10f64.powf(e) * 1e6).replace('G', " G").replace('M', " M").replace('k', " k") + "B/s"
        );
        e += 1.0;
    }
    for &size in &SIZES {
        let x = px(size);
        s += &format!(
            "<line x1=\"{x:.1}\" y1=\"{t}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} B</text>\n",
            h - b,
            h - b + 18.0,
            human_size(size)
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">message size</text>\n",
        (w - r + l) / 2.0,
        h - 10.0
    );
    for (i, (label, color, pts)) in series.iter().enumerate() {
        let mut pts = pts.clone();
        pts.sort_by_key(|p| p.0);
        let path: Vec<String> = pts
            .iter()
            .map(|&(sz, v)| format!("{:.1},{:.1}", px(sz), py(v)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        );
        for &(sz, v) in &pts {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                px(sz),
                py(v)
            );
        }
        let ly = t + 20.0 + i as f64 * 20.0;
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\">{label}</text>\n",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 35.0,
            ly + 4.0
        );
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::{out_row, rtt_of, rtt_row, Row};
    use crate::demo::{pct, record_rtt, rtt_histogram};
    use serde_json::Value;
    use std::time::Duration;

    #[test]
    fn merged_round_trips_keep_every_sample_and_exact_percentiles() {
        // Two slices: 1..=1000 us and one 30 s stall.
        let mut first = rtt_histogram();
        for us in 1..=1000u64 {
            record_rtt(&mut first, Duration::from_micros(us));
        }
        let mut second = rtt_histogram();
        record_rtt(&mut second, Duration::from_secs(30));
        let all = rtt_of(vec![first, second, rtt_histogram()]).unwrap();
        assert_eq!(all.len(), 1001);
        let close = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(close(pct(&all, 50.0), 501_000), "{}", pct(&all, 50.0));
        assert!(close(pct(&all, 99.0), 991_000), "{}", pct(&all, 99.0));
        assert!(close(pct(&all, 100.0), 30_000_000_000));
        let r = rtt_row("ivring/rtt/stream", "poll", 64, &all);
        assert_eq!(r.extra, vec![("samples".to_string(), 1001.0)]);
        assert!(close(r.rtt.unwrap()[0] as u64, 501_000));
        assert_eq!(pct(&rtt_histogram(), 50.0), 0);
    }

    #[test]
    fn json_row_parses_back_with_every_field() {
        let r = Row {
            name: "ivring/rtt/stream".into(),
            mode: "poll".into(),
            block: "poll".into(),
            size: 64,
            sessions: 1,
            msgs_per_s: Some(250_000.04),
            bytes_per_s: None,
            rtt: Some([4000.0, 9000.0, 12345.67]),
            ratio: Some((1.23456, "cacheline".into())),
            extra: vec![
                ("samples".into(), 1000.0),
                ("vs_uds".into(), 0.123456),
                ("not_a_number".into(), f64::NAN),
            ],
        };
        let line = out_row(&r).unwrap();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        let o = v.as_object().unwrap();
        assert_eq!(o["name"], "ivring/rtt/stream");
        assert_eq!(o["mode"], "poll");
        assert_eq!(o["block"], "poll");
        assert_eq!(o["size"], 64);
        assert_eq!(o["sessions"], 1);
        assert_eq!(o["msgs_per_s"].as_f64(), Some(250_000.0));
        assert!(o["bytes_per_s"].is_null());
        assert_eq!(o["rtt_p50_ns"].as_f64(), Some(4000.0));
        assert_eq!(o["rtt_p99_ns"].as_f64(), Some(9000.0));
        assert_eq!(o["rtt_p999_ns"].as_f64(), Some(12345.7));
        assert_eq!(o["ratio"].as_f64(), Some(1.235));
        assert_eq!(o["ratio_to"], "cacheline");
        assert_eq!(o["samples"].as_f64(), Some(1000.0));
        assert_eq!(o["vs_uds"].as_f64(), Some(0.1235));
        assert!(o["not_a_number"].is_null());
        assert_eq!(o.len(), 15);
        // Field order as readers of the old rows saw it.
        let at = |k: &str| line.find(&format!("\"{k}\":")).unwrap();
        assert!(at("name") < at("size") && at("size") < at("rtt_p999_ns"));
        assert!(at("rtt_p999_ns") < at("ratio") && at("ratio_to") < at("samples"));
    }

    #[test]
    fn json_row_without_figures_has_nulls() {
        let r = Row {
            name: "baseline/uds".into(),
            mode: "-".into(),
            ..Row::default()
        };
        let v: Value = serde_json::from_str(&out_row(&r).unwrap()).unwrap();
        for k in [
            "msgs_per_s",
            "bytes_per_s",
            "rtt_p50_ns",
            "rtt_p99_ns",
            "rtt_p999_ns",
            "ratio",
            "ratio_to",
        ] {
            assert!(v[k].is_null(), "{k}");
        }
        assert_eq!(v["block"], "");
    }
}

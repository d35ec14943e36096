//! `baseline/uds-threads`: UNIX stream socket pairs, each with a writer and a reader thread
//! of this process (pinned as every baseline: they inherit the bench's affinity), streaming
//! 4 KiB writes at once, started and counted as `ivring/sessions` is (but timed from the
//! start itself: [`StartGate`]). The pairs share nothing but the kernel and the two CPUs,
//! so [`PAIRS`] pairs against one (the aggregate over one pair's, the slowest pair's bytes
//! over the fastest's) is what the scheduler does to that many threads here: the reference
//! for a design with a thread per session.

use super::{aggregate, interleave, mean_pair, Row, StartGate};
use anyhow::{bail, Result};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Pairs of the many-pair figure: as many as ivring's largest session count.
pub const PAIRS: usize = 256;
/// Write size, as ivring's many-session figures.
pub const SIZE: usize = 4096;

/// `n` pairs streaming `size`-byte writes for `secs`: (aggregate bytes/s, slowest/fastest),
/// up to the last reader's end of stream, as `ivring_sessions` counts to the last sink's
/// count.
fn pairs(n: usize, size: usize, secs: f64) -> Result<(f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(StartGate::new(n));
    let thread = || std::thread::Builder::new().stack_size(256 << 10);
    let mut writers = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut a, mut b) = UnixStream::pair()?;
        readers.push(thread().spawn(move || -> std::io::Result<(u64, Instant)> {
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0u64;
            loop {
                match b.read(&mut buf) {
                    Ok(0) => return Ok((got, Instant::now())),
                    Ok(k) => got += k as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        })?);
        let (stop, go) = (stop.clone(), go.clone());
        writers.push(thread().spawn(move || -> std::io::Result<u64> {
            let buf = vec![0x5au8; size];
            let mut sent = 0u64;
            go.wait();
            while !stop.load(Ordering::Relaxed) {
                a.write_all(&buf)?;
                sent += size as u64;
            }
            a.shutdown(Shutdown::Write)?;
            Ok(sent)
        })?);
    }
    let ends = writers.into_iter().zip(readers).collect();
    run_pairs("uds", &go, &stop, secs, ends)
}

/// The pairs' writer and reader threads: bytes written; bytes read and when the last came.
pub(super) type PairThreads = (
    JoinHandle<std::io::Result<u64>>,
    JoinHandle<std::io::Result<(u64, Instant)>>,
);

/// Lets the pairs run for `secs` from the moment their writers were let go, stops them,
/// checks that each reader got what its writer wrote: (aggregate bytes/s, slowest/fastest)
/// up to the last reader's end.
pub(super) fn run_pairs(
    what: &str,
    go: &StartGate,
    stop: &AtomicBool,
    secs: f64,
    ends: Vec<PairThreads>,
) -> Result<(f64, f64)> {
    let t0 = go.started();
    std::thread::sleep(
        (t0 + Duration::from_secs_f64(secs)).saturating_duration_since(Instant::now()),
    );
    stop.store(true, Ordering::Relaxed);
    let mut per = Vec::with_capacity(ends.len());
    let mut last = t0;
    for (w, r) in ends {
        let sent = w
            .join()
            .map_err(|_| anyhow::anyhow!("{what} writer thread panicked"))??;
        let (got, done) = r
            .join()
            .map_err(|_| anyhow::anyhow!("{what} reader thread panicked"))??;
        if got != sent {
            bail!("{what} reader got {got} of {sent}");
        }
        per.push(got);
        last = last.max(done);
    }
    Ok(aggregate(&per, last.duration_since(t0)))
}

/// One pair and [`PAIRS`] pairs over `secs` each, in slices interleaved with each other as
/// ivring's many-session figures are with one session's (the same slices, so that
/// slowest/fastest, which grows with the slice, compares): their two rows.
pub fn measure(secs: f64) -> Result<Vec<Row>> {
    one_and_many("baseline/uds-threads", secs, pairs)
}

/// As [`measure`], for any `pairs(n, size, secs)` giving (aggregate bytes/s,
/// slowest/fastest): the rows of one pair and of [`PAIRS`] pairs, named `name`.
pub(super) fn one_and_many(
    name: &str,
    secs: f64,
    pairs: fn(usize, usize, f64) -> Result<(f64, f64)>,
) -> Result<Vec<Row>> {
    let out = interleave(
        secs,
        &mut [&mut |t| pairs(1, SIZE, t), &mut |t| pairs(PAIRS, SIZE, t)],
    )?;
    let (one, _) = mean_pair(&out[0]);
    let (many, fair) = mean_pair(&out[1]);
    let row = |n: usize, bps: f64| Row {
        name: name.into(),
        mode: "-".into(),
        size: SIZE,
        sessions: n,
        msgs_per_s: Some(bps / SIZE as f64),
        bytes_per_s: Some(bps),
        ..Row::default()
    };
    let mut r = row(PAIRS, many);
    r.extra.push(("slowest_fastest".into(), fair));
    r.extra.push(("vs_one_session".into(), many / one.max(1.0)));
    r.extra.push(("one_session_bytes_per_s".into(), one));
    Ok(vec![row(1, one), r])
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_pair_delivers_what_it_wrote() {
        let (bps, fair) = super::pairs(8, 4096, 0.05).unwrap();
        assert!(bps > 0.0 && (0.0..=1.0).contains(&fair));
    }
}

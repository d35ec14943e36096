//! The async figures (`ivring/async-*`): the same sink and echo services driven through
//! `ivring::tokio::AsyncSession` on a current-thread tokio runtime, each interleaved with
//! the blocking API's figure of the same size and given as a ratio to it.

use super::{interleave, ivring_rtt, ivring_tput, rtt_of, rtt_row, tput_of, Row, Writes};
use crate::demo::{pct, record_rtt, rtt_histogram};
use crate::services;
use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use ivring::tokio::AsyncSession;
use ivring::Endpoint;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Stream throughput sizes.
const SIZES: [usize; 2] = [4096, 64 << 10];
/// Round-trip size.
const RTT_SIZE: usize = 64;

/// The async figures of one wait-mode block. `skip(name, size)` filters as `--only`.
pub(super) fn measure(
    ep: &Endpoint,
    mode: &str,
    secs: f64,
    skip: &dyn Fn(&str, usize) -> bool,
    log: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    // One thread, as a small async program has: the task sleeps in the runtime whenever
    // the session would block, and the session's callback wakes it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let mut rows = Vec::new();
    for size in SIZES {
        let name = "ivring/async-stream";
        if skip(name, size) {
            continue;
        }
        log(&format!(
            "[{mode}] {name} {size} B (interleaved with the blocking API)"
        ));
        let mut asy = |t: f64| {
            let (_, b) = rt.block_on(async_tput(ep, size, t))?;
            Ok((b * t, t))
        };
        let mut blocking = |t: f64| {
            let (_, b) = ivring_tput(ep, size, t, false, Writes::Copied)?;
            Ok((b * t, t))
        };
        let res = interleave(secs, &mut [&mut asy, &mut blocking])?;
        let (mps, bps) = tput_of(&res[0], size);
        let (_, blocking_bps) = tput_of(&res[1], size);
        rows.push(Row {
            name: name.into(),
            mode: mode.into(),
            size,
            sessions: 1,
            msgs_per_s: Some(mps),
            bytes_per_s: Some(bps),
            ratio: Some((bps / blocking_bps.max(1.0), "blocking".into())),
            extra: vec![("blocking_bytes_per_s".into(), blocking_bps)],
            ..Row::default()
        });
    }
    let name = "ivring/async-rtt/stream";
    if !skip(name, RTT_SIZE) {
        log(&format!(
            "[{mode}] {name} {RTT_SIZE} B round trips (interleaved with the blocking API)"
        ));
        let mut asy = |t: f64| rt.block_on(async_rtt(ep, RTT_SIZE, t));
        let mut blocking = |t: f64| ivring_rtt(ep, RTT_SIZE, t, false);
        let mut res = interleave(secs, &mut [&mut asy, &mut blocking])?;
        let b = rtt_of(res.pop().unwrap_or_default())?;
        let a = rtt_of(res.pop().unwrap_or_default())?;
        let mut r = rtt_row(name, mode, RTT_SIZE, &a);
        let p50 = |x: &Histogram<u64>| pct(x, 50.0) as f64;
        r.extra.push(("blocking_p50_ns".into(), p50(&b)));
        r.ratio = Some((p50(&a) / p50(&b).max(1.0), "blocking".into()));
        rows.push(r);
    }
    Ok(rows)
}

/// As the blocking `ivring_tput`: `size`-byte writes to the sink for `secs`, then the
/// sink's count of what it read; (msgs/s, bytes/s).
async fn async_tput(ep: &Endpoint, size: usize, secs: f64) -> Result<(f64, f64)> {
    let mut s = AsyncSession::connect(ep, services::PORT_SINK).await?;
    let buf = vec![0x5au8; size];
    let batch = ((256 << 10) / size).max(1);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..batch {
            s.write_all(&buf).await?;
        }
        sent += (batch * size) as u64;
    }
    s.shutdown().await?;
    let mut reply = [0u8; 8];
    s.read_exact(&mut reply).await?;
    let el = t0.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(reply);
    if got != sent {
        bail!("sink counted {got} bytes, {sent} sent");
    }
    Ok((sent as f64 / size as f64 / el, sent as f64 / el))
}

/// As the blocking `ivring_rtt`: `size`-byte round trips through the echo service.
async fn async_rtt(ep: &Endpoint, size: usize, secs: f64) -> Result<Histogram<u64>> {
    let mut s = AsyncSession::connect(ep, services::PORT_ECHO).await?;
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut v = rtt_histogram();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        s.write_all(&out).await?;
        s.read_exact(&mut back).await?;
        record_rtt(&mut v, t.elapsed());
    }
    Ok(v)
}

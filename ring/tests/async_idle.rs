//! What idle async sessions cost (the `tokio` feature): 4,000 sessions, each with a task
//! waiting in a read, measured as the process's CPU time over a few seconds. The figure
//! is printed (`--nocapture`); only a generous bound is checked, since the machine's
//! other work counts too.

mod common;

use ivring::tokio::{AsyncListener, AsyncSession};
use ivring::{doorbell::local, Config, Endpoint, SharedRegion};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const SESSIONS: usize = 4000;

/// CPU time of every thread of this process so far (`/proc/self/task/*/schedstat`,
/// nanoseconds on the CPU).
fn process_cpu() -> Duration {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = task.expect("task").path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(path) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_thousand_idle_sessions_cost_almost_nothing() {
    let _guard = common::watchdog(
        "four_thousand_idle_sessions_cost_almost_nothing",
        Duration::from_secs(60),
    );
    let region = SharedRegion::heap(4 << 20);
    let (a, b) = local::pair();
    let cfg = Config {
        peer_timeout: Duration::from_secs(60),
        // The connects may run ahead of the acceptor task: room for all of them, or a
        // full backlog refuses the rest.
        backlog: SESSIONS,
        ..Config::default()
    };
    let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
    let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
    assert!(host.wait_up(Duration::from_secs(20)));
    assert!(guest.wait_up(Duration::from_secs(20)));

    let listener = AsyncListener::bind(&guest, 1).unwrap();
    let acceptor = tokio::spawn(async move {
        let mut held = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            held.push(listener.accept().await.unwrap());
        }
        held
    });
    let mut readers = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let mut s = AsyncSession::connect(&host, 1).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut b = [0u8; 1];
            s.read(&mut b).await
        }));
    }
    let accepted = acceptor.await.unwrap();
    assert_eq!(host.session_count(), SESSIONS);
    // Let the set-up settle (the keeper's last rounds, the tasks' first polls).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let window = Duration::from_secs(3);
    let (cpu0, t0) = (process_cpu(), Instant::now());
    tokio::time::sleep(window).await;
    let (cpu, wall) = (process_cpu() - cpu0, t0.elapsed());
    let percent = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    println!(
        "{SESSIONS} idle async sessions, each with a pending read: {:.3} % of a core \
         ({:.1} ms of CPU in {:.2} s)",
        percent,
        cpu.as_secs_f64() * 1e3,
        wall.as_secs_f64()
    );
    assert!(
        percent < 20.0,
        "idle sessions cost {percent:.1} % of a core"
    );

    // The reads were pending all along, and end with EOF when the peer closes.
    assert!(readers.iter().all(|r| !r.is_finished()));
    drop(accepted);
    for r in readers {
        assert_eq!(r.await.unwrap().unwrap(), 0);
    }
}

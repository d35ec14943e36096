//! Endpoints driven by the program (`Endpoint::attach_driven`) instead of a keeper thread:
//! sessions work both ways in every wait mode, idle links cost one round per heartbeat,
//! a doorbell flood is paced, and dropping the endpoint detaches it.

mod common;

use ivring::doorbell::local::{self, LocalDoorbell};
use ivring::{Config, Doorbell, Driver, Endpoint, SharedRegion, WaitMode};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A driver loop as a program runs it, on the endpoint's own doorbell (nothing else waits
/// on it): drive, then wait for a ring or the deadline. Counts the rounds.
fn run_driver(mut drv: Driver, bell: Arc<LocalDoorbell>, rounds: Arc<AtomicU64>) -> JoinHandle<()> {
    thread::spawn(move || {
        // Until the endpoint is dropped.
        while let Some(next) = drv.drive(Instant::now()) {
            rounds.fetch_add(1, Ordering::Relaxed);
            if let Some(q) = next.doorbell_quiet_until {
                thread::sleep(q.saturating_duration_since(Instant::now()));
            }
            bell.wait(Some(
                next.deadline.saturating_duration_since(Instant::now()),
            ));
        }
    })
}

struct Pair {
    host: Endpoint,
    guest: Endpoint,
    guest_bell: Arc<LocalDoorbell>,
    rounds: Arc<AtomicU64>,
    driver: JoinHandle<()>,
}

/// A driven host endpoint and a guest endpoint with its keeper thread.
fn pair(wait: WaitMode) -> Pair {
    let region = SharedRegion::heap(1 << 20);
    let (a, b) = local::pair();
    let a = Arc::new(a);
    let cfg = Config {
        wait,
        ..Config::default()
    };
    let host =
        Endpoint::unattached(ivring::Role::Host, region.clone(), a.clone(), cfg.clone()).unwrap();
    let drv = host.attach_driven().expect("not attached yet");
    assert!(host.attach_driven().is_none(), "attached once");
    let rounds = Arc::new(AtomicU64::new(0));
    let driver = run_driver(drv, a, rounds.clone());
    let b = Arc::new(b);
    let guest = Endpoint::guest(region, b.clone(), cfg).unwrap();
    assert!(host.wait_up(Duration::from_secs(5)), "the link comes up");
    Pair {
        host,
        guest,
        guest_bell: b,
        rounds,
        driver,
    }
}

/// `n` bytes from `from` to a listener of `to` on `port`, answered with the count.
fn send_counted(from: &Endpoint, to: &Endpoint, port: u32, n: usize) {
    let l = to.listen(port).unwrap();
    thread::scope(|sc| {
        sc.spawn(|| {
            let mut s = l.accept_timeout(Duration::from_secs(5)).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert!(got.iter().enumerate().all(|(i, &b)| b == i as u8));
            s.write_all(&(got.len() as u64).to_le_bytes()).unwrap();
        });
        let mut c = from.connect(port).unwrap();
        let msg: Vec<u8> = (0..n).map(|i| i as u8).collect();
        c.write_all(&msg).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        c.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_le_bytes(count), n as u64);
    });
}

#[test]
fn sessions_work_both_ways_in_every_wait_mode() {
    let _guard = common::watchdog(
        "sessions_work_both_ways_in_every_wait_mode",
        Duration::from_secs(60),
    );
    for wait in [WaitMode::Adaptive, WaitMode::Block, WaitMode::Poll] {
        let p = pair(wait);
        send_counted(&p.host, &p.guest, 7, 2 << 20);
        send_counted(&p.guest, &p.host, 8, 2 << 20);
    }
}

#[test]
fn an_idle_driven_link_costs_a_round_per_heartbeat() {
    let _guard = common::watchdog(
        "an_idle_driven_link_costs_a_round_per_heartbeat",
        Duration::from_secs(30),
    );
    let p = pair(WaitMode::Adaptive);
    thread::sleep(Duration::from_millis(300));
    let before = p.rounds.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs(1));
    let rounds = p.rounds.load(Ordering::Relaxed) - before;
    eprintln!("idle driven link: {rounds} rounds in a second");
    // The heartbeat is 100 ms: about ten rounds, each woken by the peer's beat or ours.
    assert!(
        (5..=60).contains(&rounds),
        "{rounds} rounds in an idle second"
    );
}

#[test]
fn a_doorbell_flood_is_paced() {
    let _guard = common::watchdog("a_doorbell_flood_is_paced", Duration::from_secs(30));
    let p = pair(WaitMode::Block);
    // Ring the driven side for nothing, as fast as possible, for a second.
    let (flooder, stop) = {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        // The guest's doorbell rings the host's (peer id 0).
        let bell = p.guest_bell.clone();
        (
            thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    bell.ring(0);
                }
            }),
            stop,
        )
    };
    let before = p.rounds.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs(1));
    let rounds = p.rounds.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    eprintln!("flooded driven link: {rounds} rounds in a second");
    // Unpaced, every ring is a round (millions); paced, about one per millisecond.
    assert!(rounds < 5_000, "{rounds} rounds in a flooded second");
    // And the link still works.
    send_counted(&p.host, &p.guest, 9, 64 << 10);
}

#[test]
fn dropping_a_driven_endpoint_detaches_it() {
    let _guard = common::watchdog(
        "dropping_a_driven_endpoint_detaches_it",
        Duration::from_secs(30),
    );
    let Pair {
        host,
        guest,
        driver,
        ..
    } = pair(WaitMode::Adaptive);
    let l = guest.listen(7).unwrap();
    let _c = host.connect(7).unwrap();
    let mut g = l.accept_timeout(Duration::from_secs(5)).unwrap();
    drop(host);
    // The driver sees the endpoint gone and returns.
    driver.join().unwrap();
    // The guest learns at once that its peer left: its session is reset.
    let mut buf = [0u8; 8];
    let err = g.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

//! A victim endpoint against a hostile peer written by hand (PROTOCOL.md, trust section).
//!
//! The hostile peer shakes hands properly so the victim's link comes up, then writes
//! whatever it likes: header words, its side block, its indices, frame headers, frames for
//! the wrong sessions, data past credit, credit for bytes never sent, floods of Open and of
//! doorbell rings. Meanwhile the victim serves a second, honest link that must keep
//! working, and uses sessions on the hostile link too.
//!
//! Asserted: no panic, no hang (every blocking call has a timeout), bounded memory,
//! corruption counted in `Endpoint::stats`, sessions on the hostile link ending with
//! ConnectionReset and never reading bytes the peer did not send for them, and checksummed
//! transfers on the honest link completing intact.
//!
//! `IVRING_HOSTILE_ROUNDS` sets the number of rounds (default 200), `IVRING_HOSTILE_SEED`
//! the seed.

mod common;

use common::{pattern, write_header, Hostile, HostileSess, Rng};
use ivring::doorbell::local;
use ivring::frame::{CreditArgs, Header, Kind, OpenArgs, FLAG_EOR, HEADER_LEN};
use ivring::layout::{side, GUEST_BLOCK};
use ivring::{Config, Endpoint, Role, Session, SharedRegion};
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The tests here measure the process (RSS, CPU): run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const HOSTILE_REGION: usize = 64 << 10;
const PORT: u32 = 7;

fn victim_cfg() -> Config {
    Config {
        heartbeat: Duration::from_millis(20),
        peer_timeout: Duration::from_secs(2),
        buf_size: 8 << 10,
        max_sessions: 16,
        backlog: 4,
        connect_timeout: Duration::from_millis(300),
        ..Config::default()
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// utime + stime of one task, in clock ticks.
fn cpu_ticks(stat_path: &str) -> u64 {
    let s = std::fs::read_to_string(stat_path).unwrap_or_default();
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name start at field 3 (state); utime and stime are fields 14 and 15.
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

fn keeper_tasks() -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let p = e.path();
        if std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            == "ivring-keeper"
        {
            v.push(p.join("stat").to_string_lossy().into_owned());
        }
    }
    v
}

/// Builds a victim of `victim_role` on a heap region and a hostile peer of the other role.
fn setup(victim_role: Role) -> (Endpoint, Hostile) {
    setup_with(victim_role, victim_cfg())
}

/// As [`setup`], with the victim's configuration.
fn setup_with(victim_role: Role, cfg: Config) -> (Endpoint, Hostile) {
    let region = SharedRegion::heap(HOSTILE_REGION);
    let (a, b) = local::pair();
    let (victim_bell, hostile_bell) = match victim_role {
        Role::Host => (a, b),
        Role::Guest => (b, a),
    };
    let hostile_role = match victim_role {
        Role::Host => Role::Guest,
        Role::Guest => Role::Host,
    };
    // A hostile host lays the region out before the victim guest attaches.
    let mut hostile = Hostile::new(region.clone(), hostile_role, Arc::new(hostile_bell));
    let victim = Endpoint::new(victim_role, region, Arc::new(victim_bell), cfg).unwrap();
    hostile.restart();
    let t0 = Instant::now();
    while !(hostile.follow() && victim.is_up()) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "handshake never completed"
        );
        thread::sleep(Duration::from_millis(1));
    }
    (victim, hostile)
}

/// Checksummed transfers over an honest link, in both directions, until told to stop.
fn honest_traffic(victim: Arc<Endpoint>, peer: Arc<Endpoint>, stop: Arc<AtomicBool>) -> u64 {
    let listener = peer.listen(9).unwrap();
    let echo = thread::spawn(move || {
        let mut served = 0u64;
        loop {
            let mut s = match listener.accept_timeout(Duration::from_millis(200)) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::TimedOut => continue,
                Err(e) => panic!("honest accept: {e}"),
            };
            s.set_read_timeout(Some(Duration::from_secs(10)));
            s.set_write_timeout(Some(Duration::from_secs(10)));
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("honest read");
            if got == b"quit" {
                return served;
            }
            let sum = got
                .iter()
                .fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
            s.write_all(&sum.to_le_bytes()).expect("honest reply");
            served += 1;
        }
    });
    let mut rng = Rng(0x5eed);
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) || done == 0 {
        let n = 1 + rng.below(200_000) as usize;
        let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        let sum = data
            .iter()
            .fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
        let mut s = victim.connect(9).expect("honest connect");
        s.set_read_timeout(Some(Duration::from_secs(10)));
        s.set_write_timeout(Some(Duration::from_secs(10)));
        s.write_all(&data).expect("honest write");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("honest read back");
        assert_eq!(back, sum.to_le_bytes(), "honest transfer checksum");
        done += 1;
    }
    let mut q = victim.connect(9).unwrap();
    q.write_all(b"quit").unwrap();
    drop(q);
    let served = echo.join().unwrap();
    assert_eq!(served, done);
    done
}

/// What the victim's sessions on the hostile link saw.
#[derive(Default)]
struct Outcomes {
    bytes_ok: AtomicU64,
    resets: AtomicU64,
    eofs: AtomicU64,
    opened: AtomicU64,
    refused_or_timed_out: AtomicU64,
}

/// Reads a victim session on the hostile link: every byte must be the pattern for its
/// position; errors must be ones a socket would give.
fn use_victim_session(mut s: Session, out: &Outcomes, rng: &mut Rng) {
    s.set_read_timeout(Some(Duration::from_millis(50)));
    s.set_write_timeout(Some(Duration::from_millis(50)));
    let mut pos = 0u64;
    // Larger than any message the victim can hold (its buf_size), so none is truncated
    // (a truncated message drops its tail by design, which would skew the byte check).
    let mut buf = vec![0u8; 2 * victim_cfg().buf_size as usize];
    for _ in 0..4 {
        if rng.chance(2) {
            match s.write_all(&[0x55; 100]) {
                Ok(_) => {}
                Err(e) => match e.kind() {
                    ErrorKind::ConnectionReset => {
                        out.resets.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    ErrorKind::TimedOut | ErrorKind::BrokenPipe => {}
                    k => panic!("victim write on the hostile link: unexpected {k:?}: {e}"),
                },
            }
        }
        match s.read(&mut buf) {
            Ok(0) => {
                out.eofs.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(n) => {
                for (i, &b) in buf[..n].iter().enumerate() {
                    assert_eq!(
                        b,
                        pattern(s.id(), pos + i as u64),
                        "session {} byte {} is not what the peer sent for it",
                        s.id(),
                        pos + i as u64
                    );
                }
                pos += n as u64;
                out.bytes_ok.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => match e.kind() {
                ErrorKind::ConnectionReset => {
                    out.resets.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                ErrorKind::TimedOut => {}
                k => panic!("victim read on the hostile link: unexpected {k:?}: {e}"),
            },
        }
    }
}

fn rounds() -> u64 {
    std::env::var("IVRING_HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

fn seed() -> u64 {
    std::env::var("IVRING_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1234_5678_9abc_def1)
}

/// One hostile action; `ids` are sessions the victim may have open with us.
fn hostile_round(h: &mut Hostile, rng: &mut Rng) {
    let cap = h.cap();
    h.drain();
    // Answer the victim's opens: accept, refuse, or ignore.
    for (id, buf_alloc) in std::mem::take(&mut h.victim_opens) {
        match rng.below(3) {
            0 => {
                let c = CreditArgs {
                    fwd_cnt: 0,
                    buf_alloc: 8 << 10,
                };
                if h.push(Kind::Accept, 0, id, &c.encode()) {
                    h.sessions.insert(
                        id,
                        HostileSess {
                            sent: 0,
                            peer_fwd: 0,
                            buf_alloc,
                        },
                    );
                }
            }
            1 => {
                h.push(Kind::Refuse, 0, id, &[]);
            }
            _ => {}
        }
    }
    let ids: Vec<u64> = h.sessions.keys().copied().collect();
    let pick = |rng: &mut Rng| ids.get(rng.below(ids.len() as u64) as usize).copied();
    match rng.below(20) {
        // Honest-looking pattern data (the victim checks every byte).
        0..=3 => {
            for _ in 0..1 + rng.below(8) {
                if let Some(id) = pick(rng) {
                    let n = rng.below(3000) as usize;
                    h.send_data(id, n, false, rng.chance(2));
                }
            }
        }
        // Data past the credit the victim granted.
        4 => {
            if let Some(id) = pick(rng) {
                h.send_data(id, rng.below(10_000) as usize, true, false);
            }
        }
        // Credit for bytes the victim never sent, or a credit that goes backwards.
        5 => {
            if let Some(id) = pick(rng) {
                let c = CreditArgs {
                    fwd_cnt: if rng.chance(2) { 1 << 40 } else { rng.next() },
                    buf_alloc: rng.next() as u32,
                };
                h.push(Kind::Credit, 0, id, &c.encode());
            }
        }
        // Valid-looking frames for sessions that are not open (pattern payloads).
        6 => {
            for _ in 0..1 + rng.below(16) {
                let id = (1 << 40) + rng.below(1 << 20);
                let kind = [
                    Kind::Data,
                    Kind::Credit,
                    Kind::Accept,
                    Kind::Close,
                    Kind::Reset,
                ][rng.below(5) as usize];
                let payload: Vec<u8> = match kind {
                    Kind::Data => (0..rng.below(500)).map(|i| pattern(id, i)).collect(),
                    Kind::Close | Kind::Reset => Vec::new(),
                    _ => CreditArgs {
                        fwd_cnt: 0,
                        buf_alloc: 1 << 20,
                    }
                    .encode()
                    .to_vec(),
                };
                h.push(kind, 0, id, &payload);
            }
        }
        // A flood of Opens: more than the backlog and than max_sessions.
        7 => {
            for _ in 0..40 {
                let id = h.next_seq << 1 | (h.own == GUEST_BLOCK) as u64;
                h.next_seq += 1;
                let port = if rng.chance(4) { 99 } else { PORT };
                let a = OpenArgs {
                    port,
                    message: rng.chance(3),
                    buf_alloc: 8 << 10,
                };
                if !h.push(Kind::Open, 0, id, &a.encode()) {
                    break;
                }
                h.sessions.insert(
                    id,
                    HostileSess {
                        sent: 0,
                        peer_fwd: 0,
                        buf_alloc: 0,
                    },
                );
            }
        }
        // Unknown kinds, reserved bits, huge and wrapping lengths, bad flags.
        8 => {
            // Always invalid by construction: a header that happened to be valid would
            // make the victim skip the peer's later frames, which the byte checks would
            // (rightly) report as the peer's doing, not the transport's.
            let mut hb = [0u8; HEADER_LEN];
            let len: u32 = match rng.below(4) {
                0 => u32::MAX,
                1 => u32::MAX - 15,
                2 => (cap as u32).wrapping_mul(3),
                _ => rng.next() as u32 | 1 << 20,
            };
            match rng.below(3) {
                0 => hb[0] = 9 + rng.below(247) as u8,
                1 => {
                    hb[0] = rng.below(9) as u8;
                    hb[2 + rng.below(2) as usize] = 1 + rng.below(255) as u8;
                }
                _ => hb[0] = Kind::Data as u8,
            }
            hb[1] = if rng.chance(2) { 0 } else { rng.next() as u8 };
            hb[4..8].copy_from_slice(&len.to_le_bytes());
            hb[8..16].copy_from_slice(&rng.next().to_le_bytes());
            h.push_raw(&hb, &[]);
        }
        // A record crossing the ring's end with no padding, or a pad of the wrong length.
        9 => {
            let off = h.head % cap;
            let to_end = cap - off;
            if to_end >= HEADER_LEN as u64 {
                let len = if rng.chance(2) {
                    (to_end as u32).saturating_add(16 * (1 + rng.below(8) as u32))
                } else {
                    (to_end as u32).saturating_sub(16 * (2 + rng.below(4) as u32))
                };
                let h_ = Header {
                    kind: if rng.chance(2) { Kind::Pad } else { Kind::Data },
                    flags: 0,
                    len,
                    session: 0,
                };
                // The bytes skipped are zeroed, not left stale: a stale frame read back
                // would be a replay by the peer, not an error of the transport.
                let skip = to_end.min(cap / 2).max(HEADER_LEN as u64) & !15;
                h.region
                    .write(h.tx_ring + off as usize, &vec![0; skip as usize]);
                h.region.write(h.tx_ring + off as usize, &h_.encode());
                h.head += skip;
            }
        }
        // Indices: beyond capacity, unaligned, backwards.
        10 => {
            let vt = h.load(h.victim, side::RX_TAIL);
            let bad = match rng.below(4) {
                0 => vt + cap + 16 * (1 + rng.below(100)),
                1 => h.head + 1 + rng.below(15),
                2 => vt.wrapping_sub(16 * (1 + rng.below(100))),
                _ => rng.next(),
            };
            h.store(side::TX_HEAD, bad);
            h.ring();
            // Our own notion of head stays; the victim resets and we follow its new epoch.
        }
        // Our read index: beyond what the victim wrote, backwards, unaligned.
        11 => {
            let v = match rng.below(3) {
                0 => h.tail + cap + 16,
                1 => h.tail.wrapping_sub(16),
                _ => h.tail + 8,
            };
            h.store(side::RX_TAIL, v);
            h.store(side::TX_NEED_SPACE, rng.next());
            h.ring();
        }
        // Any word of our side block (except the epoch, which restarts: see below).
        12 => {
            let word = 8 * (1 + rng.below(63)) as usize;
            h.region
                .store_u64(h.own + word, rng.next(), Ordering::Relaxed);
        }
        // Any header word.
        13 => {
            let word = 8 * rng.below(8) as usize;
            h.region.store_u64(word, rng.next(), Ordering::Relaxed);
            if rng.chance(2) {
                write_header(&h.region, &h.geom);
            }
        }
        // A restart (new epoch), sometimes a garbage one.
        14 => {
            h.restart();
            if rng.chance(4) {
                h.epoch = rng.next();
                h.store(side::EPOCH, h.epoch);
            }
        }
        // A doorbell flood.
        15 => {
            for _ in 0..10_000 {
                h.ring();
            }
        }
        // Empty messages (no credit needed) on one session, many of them.
        16 => {
            if let Some(id) = pick(rng) {
                for _ in 0..rng.below(500) {
                    if !h.push(Kind::Data, FLAG_EOR, id, &[]) {
                        break;
                    }
                }
            }
        }
        // Shutdown, Close or Reset of a session.
        17 => {
            if let Some(id) = pick(rng) {
                let k = [Kind::Shutdown, Kind::Close, Kind::Reset][rng.below(3) as usize];
                h.push(k, 0, id, &[]);
            }
        }
        // Raw garbage written ahead of our head, then published over.
        _ => {
            let n = 16 * (1 + rng.below(64));
            let off = h.head % cap;
            let n = n.min(cap - off);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            h.region.write(h.tx_ring + off as usize, &bytes);
            h.head += n;
        }
    }
    h.publish();
}

fn run(victim_role: Role) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // After the lock: the other role's run may hold it for a while.
    let _guard = common::watchdog(
        match victim_role {
            Role::Host => "hostile_guest_against_victim_host",
            Role::Guest => "hostile_host_against_victim_guest",
        },
        Duration::from_secs(60),
    );
    let rounds = rounds();
    let seed = seed() ^ victim_role as u64;
    let rss0 = rss_bytes();
    let (victim, mut hostile) = setup(victim_role);
    let victim = Arc::new(victim);
    let cfg = victim_cfg();

    // The honest link: the victim is of the same role there.
    let honest_region = SharedRegion::heap(1 << 20);
    let (a, b) = local::pair();
    let (vb, pb) = match victim_role {
        Role::Host => (a, b),
        Role::Guest => (b, a),
    };
    let other = match victim_role {
        Role::Host => Role::Guest,
        Role::Guest => Role::Host,
    };
    let (honest_victim, honest_peer) = if victim_role == Role::Host {
        let v = Endpoint::new(
            Role::Host,
            honest_region.clone(),
            Arc::new(vb),
            Config::default(),
        );
        let p = Endpoint::new(other, honest_region, Arc::new(pb), Config::default());
        (v.unwrap(), p.unwrap())
    } else {
        let p = Endpoint::new(
            other,
            honest_region.clone(),
            Arc::new(pb),
            Config::default(),
        );
        let v = Endpoint::new(Role::Guest, honest_region, Arc::new(vb), Config::default());
        (v.unwrap(), p.unwrap())
    };
    let stop = Arc::new(AtomicBool::new(false));
    let honest = {
        let (v, p, stop) = (Arc::new(honest_victim), Arc::new(honest_peer), stop.clone());
        thread::spawn(move || honest_traffic(v, p, stop))
    };

    // The victim uses the hostile link: connects out and accepts what comes in.
    let out = Arc::new(Outcomes::default());
    let listener = victim.listen(PORT).unwrap();
    let users: Vec<_> = (0..2u64)
        .map(|k| {
            let (victim, out, stop) = (victim.clone(), out.clone(), stop.clone());
            thread::spawn(move || {
                let mut rng = Rng(seed ^ ((k + 1) * 0x1111));
                while !stop.load(Ordering::Relaxed) {
                    match victim.connect(PORT) {
                        Ok(s) => {
                            out.opened.fetch_add(1, Ordering::Relaxed);
                            use_victim_session(s, &out, &mut rng);
                        }
                        Err(e) => match e.kind() {
                            ErrorKind::ConnectionRefused
                            | ErrorKind::TimedOut
                            | ErrorKind::ConnectionReset
                            | ErrorKind::NotConnected => {
                                out.refused_or_timed_out.fetch_add(1, Ordering::Relaxed);
                            }
                            // The session limit (Config::max_sessions) is io::ErrorKind::Other.
                            ErrorKind::Other => {}
                            k => panic!("victim connect on the hostile link: {k:?}: {e}"),
                        },
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    let accepter = {
        let (out, stop) = (out.clone(), stop.clone());
        thread::spawn(move || {
            let mut rng = Rng(seed ^ 0x7777);
            while !stop.load(Ordering::Relaxed) {
                match listener.accept_timeout(Duration::from_millis(20)) {
                    Ok(s) => {
                        out.opened.fetch_add(1, Ordering::Relaxed);
                        use_victim_session(s, &out, &mut rng);
                    }
                    Err(e) => assert!(
                        matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::ConnectionReset),
                        "accept: {e}"
                    ),
                }
            }
        })
    };

    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut max_sessions_seen = 0;
    let mut max_rss = 0;
    for round in 0..rounds {
        hostile.follow();
        hostile_round(&mut hostile, &mut rng);
        // Let the victim's keeper and sessions run against what we wrote.
        thread::sleep(Duration::from_micros(200 + rng.below(2000)));
        let n = victim.session_count();
        assert!(n <= cfg.max_sessions, "round {round}: {n} sessions");
        max_sessions_seen = max_sessions_seen.max(n);
        let rss = rss_bytes();
        max_rss = max_rss.max(rss);
        assert!(
            rss < rss0 + (256 << 20),
            "round {round}: RSS grew from {rss0} to {rss}"
        );
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for u in users {
        u.join().expect("victim session thread");
    }
    accepter.join().expect("victim accept thread");
    let transfers = honest.join().expect("honest link");
    let stats = victim.stats();
    eprintln!(
        "hostile {other:?} vs victim {victim_role:?}: {rounds} rounds in {elapsed:?}; \
         honest transfers {transfers}; victim sessions opened {}, bytes checked {}, resets {}, \
         eofs {}, refused/timed out {}; max sessions {max_sessions_seen}; RSS {} -> max {} MiB; \
         stats {stats:?}",
        out.opened.load(Ordering::Relaxed),
        out.bytes_ok.load(Ordering::Relaxed),
        out.resets.load(Ordering::Relaxed),
        out.eofs.load(Ordering::Relaxed),
        out.refused_or_timed_out.load(Ordering::Relaxed),
        rss0 >> 20,
        max_rss >> 20,
    );
    assert!(transfers > 0);
    if rounds >= 100 {
        assert!(stats.corruptions > 0, "corruption was never counted");
        assert!(stats.last_error.is_some());
        assert!(stats.opens_refused > 0, "the Open floods never hit a limit");
    }
}

#[test]
fn hostile_guest_against_victim_host() {
    run(Role::Host);
}

#[test]
fn hostile_host_against_victim_guest() {
    run(Role::Guest);
}

/// A session open with the hostile peer ends with ConnectionReset when the peer corrupts
/// the ring, and the corruption is counted.
#[test]
fn corruption_resets_open_sessions() {
    let _guard = common::watchdog("corruption_resets_open_sessions", Duration::from_secs(60));
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for role in [Role::Host, Role::Guest] {
        let (victim, mut h) = setup(role);
        let victim = Arc::new(victim);
        let v = victim.clone();
        let conn = thread::spawn(move || v.connect(PORT));
        let t0 = Instant::now();
        let id = loop {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no Open from the victim"
            );
            h.drain();
            if let Some(&(id, buf_alloc)) = h.victim_opens.first() {
                let c = CreditArgs {
                    fwd_cnt: 0,
                    buf_alloc: 4096,
                };
                assert!(h.push(Kind::Accept, 0, id, &c.encode()));
                h.sessions.insert(
                    id,
                    HostileSess {
                        sent: 0,
                        peer_fwd: 0,
                        buf_alloc,
                    },
                );
                h.publish();
                break id;
            }
            thread::sleep(Duration::from_millis(1));
        };
        let mut s = conn.join().unwrap().expect("victim connect");
        assert_eq!(s.id(), id);
        s.set_read_timeout(Some(Duration::from_secs(5)));
        h.send_data(id, 100, false, false);
        h.publish();
        let mut buf = [0u8; 100];
        s.read_exact(&mut buf).unwrap();
        assert!(buf
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(id, i as u64)));
        // An unaligned head: corruption.
        h.store(side::TX_HEAD, h.head + 8);
        h.ring();
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        let st = victim.stats();
        assert_eq!(st.corruptions, 1, "{st:?}");
        assert!(st.last_error.unwrap().contains("corrupt"));
        assert_eq!(
            s.write(b"x").unwrap_err().kind(),
            ErrorKind::ConnectionReset
        );
    }
}

/// Rings with no data must not make the victim's keeper spin.
#[test]
fn doorbell_flood_does_not_spin_the_keeper() {
    let _guard = common::watchdog(
        "doorbell_flood_does_not_spin_the_keeper",
        Duration::from_secs(60),
    );
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (victim, mut h) = setup(Role::Host);
    h.follow();
    let keepers = keeper_tasks();
    assert_eq!(keepers.len(), 1, "expected only the victim's keeper");
    let stop = Arc::new(AtomicBool::new(false));
    let bell = h.bell.clone();
    let victim_id = h.victim_id;
    let flooder = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                bell.ring(victim_id);
                n += 1;
            }
            n
        })
    };
    // The hostile peer keeps its heartbeat going so the link stays up.
    let t0 = Instant::now();
    let c0 = cpu_ticks(&keepers[0]);
    while t0.elapsed() < Duration::from_secs(1) {
        h.follow();
        thread::sleep(Duration::from_millis(10));
    }
    let c1 = cpu_ticks(&keepers[0]);
    let wall = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let rings = flooder.join().unwrap();
    // USER_HZ (sysconf(_SC_CLK_TCK)) is 100 on Linux.
    let cpu = (c1 - c0) as f64 / 100.0;
    let share = cpu / wall.as_secs_f64();
    eprintln!(
        "doorbell flood: {rings} rings in {wall:?}; victim keeper CPU {:.0} ms ({:.1}% of a core)",
        cpu * 1000.0,
        share * 100.0
    );
    assert!(victim.is_up());
    assert!(
        share < 0.5,
        "the keeper used {:.0}% of a core",
        share * 100.0
    );
}

/// Rings with no data must not make a reader that waits on the doorbell itself spin
/// either (a blocked caller takes the doorbell while the keeper sits out).
#[test]
fn doorbell_flood_does_not_spin_a_blocked_reader() {
    let _guard = common::watchdog(
        "doorbell_flood_does_not_spin_a_blocked_reader",
        Duration::from_secs(60),
    );
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (victim, mut h) = setup(Role::Host);
    h.follow();
    let victim = Arc::new(victim);
    let opener = {
        let victim = victim.clone();
        thread::spawn(move || victim.connect(7))
    };
    accept_victim_open(&mut h, 8 << 10);
    let mut s = opener
        .join()
        .unwrap()
        .expect("the victim's connect was accepted");
    s.set_read_timeout(Some(Duration::from_secs(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = thread::spawn(move || {
        let me = "/proc/thread-self/stat";
        let c0 = cpu_ticks(me);
        let t0 = Instant::now();
        let r = s.read(&mut [0u8; 64]);
        let cpu = (cpu_ticks(me) - c0) as f64 / 100.0;
        (r.map_err(|e| e.kind()), cpu / t0.elapsed().as_secs_f64())
    });
    let flooder = {
        let (stop, bell, id) = (stop.clone(), h.bell.clone(), h.victim_id);
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                bell.ring(id);
                n += 1;
            }
            n
        })
    };
    while !reader.is_finished() {
        h.follow();
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let rings = flooder.join().unwrap();
    let (r, share) = reader.join().unwrap();
    eprintln!(
        "doorbell flood: {rings} rings; blocked reader used {:.1}% of a core",
        share * 100.0
    );
    assert_eq!(r.unwrap_err(), ErrorKind::TimedOut, "no data was sent");
    assert!(victim.is_up());
    assert!(
        share < 0.5,
        "the reader used {:.0}% of a core",
        share * 100.0
    );
}

/// Accepts the victim's first Open on the hostile link with `buf_alloc` of credit.
fn accept_victim_open(h: &mut Hostile, buf_alloc: u32) -> u64 {
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no Open from the victim"
        );
        h.follow();
        h.drain();
        if let Some(&(id, victim_buf)) = h.victim_opens.first() {
            let c = CreditArgs {
                fwd_cnt: 0,
                buf_alloc,
            };
            assert!(h.push(Kind::Accept, 0, id, &c.encode()));
            h.sessions.insert(
                id,
                HostileSess {
                    sent: 0,
                    peer_fwd: 0,
                    buf_alloc: victim_buf,
                },
            );
            h.publish();
            return id;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Empty messages take no credit: a flood of them must hit a limit, not our memory.
#[test]
fn empty_message_flood_is_bounded() {
    let _guard = common::watchdog("empty_message_flood_is_bounded", Duration::from_secs(60));
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (victim, mut h) = setup(Role::Host);
    let victim = Arc::new(victim);
    let v = victim.clone();
    let conn =
        thread::spawn(move || v.connect_with(PORT, ivring::SessionOptions { message: true }));
    let id = accept_victim_open(&mut h, 1 << 20);
    let mut s = conn.join().unwrap().expect("victim connect");
    let limit = victim_cfg().buf_size as u64;
    let mut pushed = 0u64;
    let t0 = Instant::now();
    while pushed < 2 * limit + 1000 && t0.elapsed() < Duration::from_secs(20) {
        h.follow();
        h.drain();
        if h.push(Kind::Data, FLAG_EOR, id, &[]) {
            pushed += 1;
        } else {
            h.publish();
            thread::sleep(Duration::from_micros(100));
        }
    }
    h.publish();
    assert_eq!(pushed, 2 * limit + 1000, "the victim stopped reading");
    thread::sleep(Duration::from_millis(100));
    s.set_read_timeout(Some(Duration::from_millis(100)));
    // The victim may hand out the empty messages it kept, then must fail the session.
    let mut buf = [0u8; 16];
    let mut empties = 0u64;
    let e = loop {
        match s.read(&mut buf) {
            Ok(0) => empties += 1,
            Ok(n) => panic!("{n} bytes from empty messages"),
            Err(e) => break e,
        }
        assert!(
            empties <= limit,
            "more than {limit} empty messages were kept"
        );
    };
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
}

/// A peer that grants credit but stops reading the ring must not hang a message write
/// that has a timeout.
#[test]
fn message_write_times_out_when_the_peer_stops_reading() {
    let _guard = common::watchdog(
        "message_write_times_out_when_the_peer_stops_reading",
        Duration::from_secs(60),
    );
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (victim, mut h) = setup(Role::Guest);
    let victim = Arc::new(victim);
    let v = victim.clone();
    let conn =
        thread::spawn(move || v.connect_with(PORT, ivring::SessionOptions { message: true }));
    let _id = accept_victim_open(&mut h, 1 << 24);
    let mut s = conn.join().unwrap().expect("victim connect");
    s.set_write_timeout(Some(Duration::from_millis(200)));
    // Larger than the ring: it cannot all go in while nobody reads.
    let msg = vec![0xa5u8; 4 * HOSTILE_REGION];
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let r = s.write(&msg).map_err(|e| e.kind());
        let _ = tx.send(r);
    });
    // Keep the heartbeat going (a silent peer would be reset anyway) but never read.
    let t0 = Instant::now();
    let r = loop {
        h.follow();
        if let Ok(r) = rx.try_recv() {
            break r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a message write with a 200 ms timeout still blocks after 5 s"
        );
        thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(r, Err(ErrorKind::TimedOut));
    // The half-written message cannot be taken back: the session is reset.
    let st = victim.stats();
    assert!(st.session_resets >= 1, "{st:?}");
}

/// A write that finds the peer's damage (its read tail of our ring beyond what we wrote)
/// resets the link at once, and the caller asleep on the doorbell learns of it at once:
/// the reset interrupts its wait, which the hostile peer, ringing nobody, would otherwise
/// leave to the 100 ms limit (counted in `late_wakeups`). Before, the writer got its
/// error and the link ran on until the peer's heartbeat timed out.
#[test]
fn a_reset_a_writer_finds_wakes_the_caller_on_the_doorbell() {
    let _guard = common::watchdog(
        "a_reset_a_writer_finds_wakes_the_caller_on_the_doorbell",
        Duration::from_secs(60),
    );
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for role in [Role::Host, Role::Guest] {
        let (victim, mut h) = setup(role);
        let victim = Arc::new(victim);
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let v = victim.clone();
            let conn = thread::spawn(move || v.connect(PORT));
            let id = accept_victim_open(&mut h, 1 << 20);
            h.victim_opens.clear();
            let s = conn.join().unwrap().expect("victim connect");
            assert_eq!(s.id(), id);
            sessions.push(s);
        }
        let mut writer = sessions.pop().unwrap();
        let mut reader = sessions.pop().unwrap();
        reader.set_read_timeout(Some(Duration::from_secs(5)));
        writer.set_write_timeout(Some(Duration::from_secs(5)));
        let blocked = thread::spawn(move || {
            let mut b = [0u8; 16];
            reader.read(&mut b)
        });
        // The reader takes the doorbell within a few of the keeper's 20 ms rounds.
        thread::sleep(Duration::from_millis(150));
        // A read tail beyond everything we wrote: the writer finds it when the space it
        // remembers runs out.
        h.store(side::RX_TAIL, 1 << 40);
        let chunk = vec![7u8; 4096];
        let e = loop {
            if let Err(e) = writer.write(&chunk) {
                break e;
            }
        };
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        // Reset for the corruption the writer found, not later for the peer's silence.
        let e = blocked.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert!(e.to_string().contains("corrupted"), "{role:?}: {e}");
        let st = victim.stats();
        assert_eq!(st.corruptions, 1, "{st:?}");
        assert_eq!(
            st.late_wakeups, 0,
            "{role:?}: the reader on the doorbell was left to its limit"
        );
    }
}

/// Writers asleep for ring space are woken one at a time, each passing the turn to the
/// next as it leaves: one report of space serves them all. A writer that kept the turn
/// would leave the rest to their 100 ms limit (`late_wakeups`) when, as here, nothing
/// else reports space: the peer reads everything once and rings once, and the keeper
/// sits out behind the writer on the doorbell for its (long) heartbeat.
#[test]
fn writers_asleep_for_space_pass_the_turn() {
    const WRITERS: usize = 8;
    let _guard = common::watchdog(
        "writers_asleep_for_space_pass_the_turn",
        Duration::from_secs(60),
    );
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for role in [Role::Host, Role::Guest] {
        let cfg = Config {
            heartbeat: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(30),
            ..victim_cfg()
        };
        let (victim, mut h) = setup_with(role, cfg);
        let victim = Arc::new(victim);
        let mut sessions = Vec::new();
        for _ in 0..=WRITERS {
            let v = victim.clone();
            let conn = thread::spawn(move || v.connect(PORT));
            accept_victim_open(&mut h, 1 << 20);
            h.victim_opens.clear();
            sessions.push(conn.join().unwrap().expect("victim connect"));
        }
        // The peer reads nothing yet: fill the ring.
        let mut filler = sessions.remove(0);
        filler.set_nonblocking(true);
        let mut filled = 0;
        loop {
            match filler.write(&[1; 4096]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{role:?}: filling: {e}"),
            }
        }
        assert!(filled > 0);
        let writers: Vec<_> = sessions
            .into_iter()
            .map(|mut s| {
                s.set_write_timeout(Some(Duration::from_secs(10)));
                thread::spawn(move || s.write_all(&[2; 1024]))
            })
            .collect();
        // All asleep for space: one on the doorbell, the rest on the space condvar. They
        // went to sleep together and wake at their 100 ms limit together: ring halfway.
        thread::sleep(Duration::from_millis(250));
        let late_before = victim.stats().late_wakeups;
        // Read everything, and ring once as an honest reader does for the space posted.
        h.drain();
        let need = h.load(h.victim, side::TX_NEED_SPACE);
        assert!(need != 0 && need <= h.tail, "{role:?}: posted {need}");
        h.ring();
        for w in writers {
            w.join().unwrap().expect("a writer waiting for space");
        }
        let late = victim.stats().late_wakeups - late_before;
        assert!(
            late <= 1,
            "{role:?}: {late} writers waited to their limit for the space one ring reported"
        );
    }
}

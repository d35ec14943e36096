//! One test per protocol rule whose breach an honest peer never provokes, driven by the
//! hand-written peer of `common` (PROTOCOL.md §2-§4, §6-§7):
//! - Data for a session that is not open (before Accept, after Shutdown or Close) is
//!   dropped, never delivered;
//! - a link reset drops the control frames queued for the old epoch's sessions;
//! - a peer restart zeroes our read position (no corruption, one reset);
//! - the direct-read path keeps message boundaries (a reader that finds several messages
//!   already in the ring still gets one per read);
//! - a Data frame over the frame limit, and a record published only in part, are
//!   corruption, met by the direct-read path or by `pump` alone (a message's first
//!   fragment).
//!
//! Every test runs under a watchdog: a wait that never ends fails the run in seconds.

mod common;

use common::{pattern, watchdog, Hostile, HostileSess};
use ivring::doorbell::local;
use ivring::frame::{record_len, CreditArgs, Header, Kind, OpenArgs, FLAG_EOR, HEADER_LEN};
use ivring::layout::side;
use ivring::{Config, Endpoint, Role, Session, SharedRegion, WaitMode};
use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const PORT: u32 = 7;
const LIMIT: Duration = Duration::from_secs(30);

fn cfg() -> Config {
    Config {
        heartbeat: Duration::from_millis(20),
        peer_timeout: Duration::from_secs(5),
        buf_size: 8 << 10,
        connect_timeout: Duration::from_secs(10),
        ..Config::default()
    }
}

/// A victim endpoint of `role` and a hand-driven peer of the other role, link up.
fn pair(role: Role, cfg: Config) -> (Endpoint, Hostile) {
    let region = SharedRegion::heap(64 << 10);
    let (a, b) = local::pair();
    let (victim_bell, peer_bell, peer_role) = match role {
        Role::Host => (a, b, Role::Guest),
        Role::Guest => (b, a, Role::Host),
    };
    let mut peer = Hostile::new(region.clone(), peer_role, Arc::new(peer_bell));
    let victim = Endpoint::new(role, region, Arc::new(victim_bell), cfg).unwrap();
    peer.restart();
    bring_up(&victim, &mut peer);
    (victim, peer)
}

fn bring_up(victim: &Endpoint, peer: &mut Hostile) {
    let t0 = Instant::now();
    while !(peer.follow() && victim.is_up()) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no handshake");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (following the victim, draining what it sends) until `done`.
fn until(peer: &mut Hostile, what: &str, mut done: impl FnMut(&mut Hostile) -> bool) {
    let t0 = Instant::now();
    loop {
        peer.follow();
        peer.drain();
        if done(peer) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never: {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// The peer opens a session to the victim's listener on `port` and waits for Accept.
fn peer_opens(peer: &mut Hostile, victim_role: Role, port: u32, message: bool) -> u64 {
    let peer_bit = match victim_role {
        Role::Host => 1,
        Role::Guest => 0,
    };
    let id = peer.next_seq << 1 | peer_bit;
    peer.next_seq += 1;
    let args = OpenArgs {
        port,
        message,
        buf_alloc: 1 << 20,
    };
    assert!(peer.push(Kind::Open, 0, id, &args.encode()));
    peer.sessions.insert(
        id,
        HostileSess {
            sent: 0,
            peer_fwd: 0,
            buf_alloc: 0,
        },
    );
    peer.publish();
    until(peer, "Accept", |p| p.sessions[&id].buf_alloc > 0);
    id
}

/// The pattern bytes `from..to` of session `id`.
fn bytes(id: u64, from: u64, to: u64) -> Vec<u8> {
    (from..to).map(|i| pattern(id, i)).collect()
}

fn read_all(s: &mut Session) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to EOF");
    got
}

/// Data after the peer's Shutdown or Close is dropped: the reader gets what came before,
/// then EOF (PROTOCOL.md §4, §7).
#[test]
fn data_after_shutdown_or_close_is_never_read() {
    let _w = watchdog("data_after_shutdown_or_close_is_never_read", LIMIT);
    for end in [Kind::Shutdown, Kind::Close] {
        let (victim, mut peer) = pair(Role::Host, cfg());
        let l = victim.listen(PORT).unwrap();
        let id = peer_opens(&mut peer, Role::Host, PORT, false);
        let mut s = l.accept_timeout(Duration::from_secs(10)).unwrap();
        assert!(peer.push(Kind::Data, 0, id, &bytes(id, 0, 100)));
        assert!(peer.push(end, 0, id, &[]));
        assert!(peer.push(Kind::Data, 0, id, &bytes(id, 100, 200)));
        peer.publish();
        assert_eq!(read_all(&mut s), bytes(id, 0, 100), "after {end:?}");
        assert!(victim.stats().frames_dropped >= 1, "after {end:?}");
    }
}

/// Data for a session the victim opened, arriving before the peer's Accept, is dropped:
/// the session reads only what was sent once it was open.
#[test]
fn data_before_accept_is_never_read() {
    let _w = watchdog("data_before_accept_is_never_read", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let victim = Arc::new(victim);
    let v = victim.clone();
    let opener = thread::spawn(move || v.connect(PORT));
    until(&mut peer, "the victim's Open", |p| {
        !p.victim_opens.is_empty()
    });
    let (id, _) = peer.victim_opens[0];
    assert!(peer.push(Kind::Data, 0, id, b"early bytes, before Accept"));
    peer.publish();
    // Give the victim time to take the early frame while it is still connecting.
    let t0 = Instant::now();
    while victim.stats().frames_dropped == 0 && t0.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(1));
    }
    let accept = CreditArgs {
        fwd_cnt: 0,
        buf_alloc: 1 << 20,
    };
    assert!(peer.push(Kind::Accept, 0, id, &accept.encode()));
    assert!(peer.push(Kind::Data, 0, id, &bytes(id, 0, 64)));
    assert!(peer.push(Kind::Shutdown, 0, id, &[]));
    peer.publish();
    let mut s = opener.join().unwrap().expect("connect");
    assert_eq!(read_all(&mut s), bytes(id, 0, 64));
    assert!(victim.stats().frames_dropped >= 1);
}

/// The records the victim has published since the peer last read, as (kind, session).
fn scan(peer: &mut Hostile) -> Vec<(Kind, u64)> {
    let cap = peer.cap();
    let head = peer.load(peer.victim, side::TX_HEAD);
    let mut seen = Vec::new();
    while peer.tail < head {
        let off = (peer.tail % cap) as usize;
        let to_end = (cap - off as u64) as usize;
        let mut hb = [0u8; HEADER_LEN];
        peer.region.read(peer.rx_ring + off, &mut hb);
        let contiguous = ((head - peer.tail) as usize).min(to_end);
        let h = Header::decode(&hb, peer.geom.max_payload(), contiguous, to_end)
            .expect("the victim writes well-formed records");
        if h.kind == Kind::Pad {
            peer.tail += to_end as u64;
            continue;
        }
        seen.push((h.kind, h.session));
        peer.tail += record_len(h.len as usize) as u64;
    }
    peer.store(side::RX_TAIL, peer.tail);
    seen
}

/// Control frames queued (the ring full) for sessions of an epoch that then ends are
/// dropped with it: none reaches the peer's next incarnation, which reuses the ids.
#[test]
fn a_reset_drops_the_old_epochs_queued_control_frames() {
    let _w = watchdog("a_reset_drops_the_old_epochs_queued_control_frames", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let ids: Vec<u64> = (0..3)
        .map(|_| peer_opens(&mut peer, Role::Host, PORT, false))
        .collect();
    let mut sessions: Vec<Session> = (0..3)
        .map(|_| l.accept_timeout(Duration::from_secs(10)).unwrap())
        .collect();
    // Fill the victim's ring (the peer stops reading), then close two sessions: their
    // Close frames wait for space.
    let mut filler = sessions.remove(0);
    filler.set_nonblocking(true);
    let t0 = Instant::now();
    // Until not even a one-byte record (32 bytes) fits: at most one 16-byte control
    // record still does.
    for chunk in [vec![0x5au8; 1024], vec![0x5au8; 1]] {
        loop {
            match filler.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the ring: {e}"),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the ring never filled"
            );
        }
    }
    sessions[0].shutdown(std::net::Shutdown::Write).unwrap();
    drop(sessions);
    // The peer restarts: a new epoch, the same session ids again.
    peer.restart();
    bring_up(&victim, &mut peer);
    // Several heartbeats: time for anything still queued to be flushed.
    thread::sleep(Duration::from_millis(200));
    peer.follow();
    let seen = scan(&mut peer);
    assert!(
        seen.is_empty(),
        "the old epoch's queued frames reached the new one: {seen:?}"
    );
    let again: Vec<u64> = (0..3)
        .map(|_| peer_opens(&mut peer, Role::Host, PORT, false))
        .collect();
    assert_eq!(
        again, ids,
        "the new incarnation numbers its sessions afresh"
    );
    let _kept: Vec<Session> = (0..3)
        .map(|_| l.accept_timeout(Duration::from_secs(10)).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(100));
    peer.follow();
    let seen = scan(&mut peer);
    assert!(
        !seen.iter().any(|&(k, _)| k == Kind::Close),
        "a Close reached the new epoch's sessions: {seen:?}"
    );
    assert_eq!(victim.session_count(), 3);
}

/// A peer that restarts (its indices back at 0) is followed with our read position back
/// at 0 too: one reset, no corruption, and the new epoch's data reads correctly.
#[test]
fn a_peer_restart_zeroes_our_read_position() {
    let _w = watchdog("a_peer_restart_zeroes_our_read_position", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let id = peer_opens(&mut peer, Role::Host, PORT, false);
    let mut s = l.accept_timeout(Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10)));
    for round in 0..8u64 {
        assert!(peer.push(
            Kind::Data,
            0,
            id,
            &bytes(id, round * 512, (round + 1) * 512)
        ));
        peer.publish();
        let mut got = vec![0u8; 512];
        s.read_exact(&mut got).unwrap();
    }
    assert!(peer.load(peer.victim, side::RX_TAIL) > 0);
    let before = victim.stats();
    peer.restart();
    bring_up(&victim, &mut peer);
    let err = s.read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    let id = peer_opens(&mut peer, Role::Host, PORT, false);
    let mut s = l.accept_timeout(Duration::from_secs(10)).unwrap();
    assert!(peer.push(Kind::Data, 0, id, &bytes(id, 0, 300)));
    assert!(peer.push(Kind::Shutdown, 0, id, &[]));
    peer.publish();
    assert_eq!(read_all(&mut s), bytes(id, 0, 300));
    let after = victim.stats();
    assert_eq!(after.corruptions, 0, "{after:?}");
    assert_eq!(after.link_resets, before.link_resets + 1, "{after:?}");
}

/// Messages stay whole and apart on every read path, the direct one included (a reader
/// already waiting when several messages are published at once takes them straight from
/// the ring).
#[test]
fn messages_are_never_merged() {
    let _w = watchdog("messages_are_never_merged", LIMIT);
    for wait in [WaitMode::Poll, WaitMode::Adaptive] {
        let (victim, mut peer) = pair(Role::Host, Config { wait, ..cfg() });
        let l = victim.listen(PORT).unwrap();
        let id = peer_opens(&mut peer, Role::Host, PORT, true);
        let mut s = l.accept_timeout(Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10)));
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut sizes = Vec::new();
            loop {
                let n = s.read(&mut buf).expect("read a message");
                if n == 0 {
                    return sizes;
                }
                sizes.push(n);
            }
        });
        let mut pos = 0u64;
        for _ in 0..200 {
            // The reader is (most likely) waiting: publish three messages at once.
            thread::sleep(Duration::from_micros(300));
            for len in [10u64, 20, 30] {
                assert!(peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, pos, pos + len)));
                pos += len;
            }
            peer.publish();
            peer.sessions.get_mut(&id).unwrap().sent = pos;
            until(&mut peer, "credit back", |p| {
                pos - p.sessions[&id].peer_fwd < 1024
            });
        }
        assert!(peer.push(Kind::Shutdown, 0, id, &[]));
        peer.publish();
        let sizes = reader.join().unwrap();
        assert_eq!(sizes.len(), 600, "{wait:?}: messages merged or split");
        assert!(
            sizes.chunks(3).all(|c| c == [10, 20, 30]),
            "{wait:?}: {sizes:?}"
        );
    }
}

/// Messages already in the ring when the reader calls read (published without a ring, so
/// no keeper took them first) are where the direct-read path would serve them: one
/// message per read all the same, never two merged into one.
#[test]
fn messages_waiting_in_the_ring_are_read_one_per_read() {
    let _w = watchdog("messages_waiting_in_the_ring_are_read_one_per_read", LIMIT);
    for wait in [WaitMode::Block, WaitMode::Adaptive, WaitMode::Poll] {
        let cfg = Config {
            wait,
            // The keeper wakes for little else: the reader finds the frames first.
            heartbeat: Duration::from_millis(500),
            ..cfg()
        };
        let (victim, mut peer) = pair(Role::Host, cfg);
        let l = victim.listen(PORT).unwrap();
        let id = peer_opens(&mut peer, Role::Host, PORT, true);
        let mut s = l.accept_timeout(Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buf = vec![0u8; 4096];
        let mut pos = 0u64;
        for round in 0..20 {
            peer.follow();
            let lens = [10u64, 20, 30];
            let first = pos;
            for len in lens {
                assert!(peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, pos, pos + len)));
                pos += len;
            }
            peer.store(side::TX_HEAD, peer.head);
            let mut at = first;
            for len in lens {
                let n = s.read(&mut buf).unwrap();
                assert_eq!(
                    &buf[..n],
                    &bytes(id, at, at + len)[..],
                    "{wait:?}, round {round}: messages merged or split"
                );
                at += len;
            }
        }
        assert_eq!(victim.stats().corruptions, 0);
    }
}

/// A Data frame longer than the frame limit is corruption even where the ring has room
/// for it; nothing of it is read. On a stream session the direct-read path meets it
/// first; as a message's first fragment (which that path leaves to it) only `pump` does.
#[test]
fn data_over_the_frame_limit_is_corruption() {
    let _w = watchdog("data_over_the_frame_limit_is_corruption", LIMIT);
    for message in [false, true] {
        let (victim, mut peer) = pair(Role::Host, cfg());
        let l = victim.listen(PORT).unwrap();
        let id = peer_opens(&mut peer, Role::Host, PORT, message);
        let mut s = l.accept_timeout(Duration::from_secs(10)).unwrap();
        let len = peer.geom.max_payload() as u64 + 16;
        assert!((record_len(len as usize) as u64) < peer.cap() / 2);
        let flags = if message { 0 } else { FLAG_EOR };
        assert!(peer.push(Kind::Data, flags, id, &bytes(id, 0, len)));
        peer.publish();
        s.set_read_timeout(Some(Duration::from_secs(10)));
        let err = s.read(&mut vec![0u8; 1 << 16]).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionReset,
            "message {message}: {err}"
        );
        assert_eq!(victim.stats().corruptions, 1, "message {message}");
    }
}

/// A record whose bytes are not all published is corruption, not data: nothing of it is
/// read, even though the rest of it lies before the ring's end.
#[test]
fn a_record_published_in_part_is_corruption() {
    let _w = watchdog("a_record_published_in_part_is_corruption", LIMIT);
    // As above: the direct-read path first (stream), or only pump (a message's fragment).
    for message in [false, true] {
        let (victim, mut peer) = pair(Role::Host, cfg());
        let l = victim.listen(PORT).unwrap();
        let id = peer_opens(&mut peer, Role::Host, PORT, message);
        let mut s = l.accept_timeout(Duration::from_secs(10)).unwrap();
        let start = peer.head;
        let flags = if message { 0 } else { FLAG_EOR };
        assert!(peer.push(Kind::Data, flags, id, &bytes(id, 0, 256)));
        // Written, never published: a reader that took the Data above would go on to
        // this one, and a session ended by its peer keeps its data through the reset.
        assert!(peer.push(Kind::Shutdown, 0, id, &[]));
        // Publish the header and half the payload only.
        peer.store(side::TX_HEAD, start + HEADER_LEN as u64 + 128);
        peer.ring();
        s.set_read_timeout(Some(Duration::from_secs(10)));
        let err = s.read(&mut [0u8; 512]).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionReset,
            "message {message}: {err}"
        );
        assert_eq!(victim.stats().corruptions, 1, "message {message}");
    }
}

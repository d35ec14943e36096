//! Tests written against the mutants cargo-mutants left alive in the link's receive path
//! (`link/rx.rs`, see docs/MUTANTS.md): one rule of the per-session state machine
//! (PROTOCOL.md §3-§4, §7) per test, checked exactly: which frames are dropped and
//! counted, which reset the session (counted once, with one Reset sent), which are
//! refused, and at which byte the credit and message limits start.
//!
//! The victim is a real endpoint, the peer the crate's hand-driven mock. To know the
//! victim has handled a frame, the peer follows it with a sentinel (an Open to a port
//! nobody listens on) and waits for its Refuse: frames are handled in ring order.
//!
//! Every test runs under a watchdog, and every wait has a limit of seconds.

mod common;

use common::{pattern, watchdog, Hostile, HostileSess};
use ivring::doorbell::local;
use ivring::frame::{record_len, CreditArgs, Header, Kind, OpenArgs, FLAG_EOR, HEADER_LEN};
use ivring::layout::side;
use ivring::{Config, Driver, Endpoint, Listener, Role, Session, SharedRegion, Stats};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const PORT: u32 = 7;
const NOBODY: u32 = 9999;
const LIMIT: Duration = Duration::from_secs(60);
const BUF: u32 = 4096;

fn cfg() -> Config {
    Config {
        heartbeat: Duration::from_millis(20),
        peer_timeout: Duration::from_secs(5),
        buf_size: BUF,
        max_buf_size: BUF,
        connect_timeout: Duration::from_secs(10),
        ..Config::default()
    }
}

/// The victim endpoint and the peer that plays the other side, logging what it reads.
struct Peer {
    h: Hostile,
    victim_role: Role,
    /// Every frame the victim sent: (kind, session, payload if 16 bytes).
    log: Vec<(Kind, u64, Option<[u8; 16]>)>,
    /// A victim without a keeper thread moves only when this drives it (or a caller of
    /// one of its sessions waits).
    driver: Option<Driver>,
}

fn pair(role: Role, cfg: Config) -> (Endpoint, Peer) {
    pair_in(role, cfg, 64 << 10)
}

/// As [`pair`], over a region of `len` bytes.
fn pair_in(role: Role, cfg: Config, len: usize) -> (Endpoint, Peer) {
    let region = SharedRegion::heap(len);
    let (a, b) = local::pair();
    let (victim_bell, peer_bell, peer_role) = match role {
        Role::Host => (a, b, Role::Guest),
        Role::Guest => (b, a, Role::Host),
    };
    let mut h = Hostile::new(region.clone(), peer_role, Arc::new(peer_bell));
    let victim = Endpoint::new(role, region, Arc::new(victim_bell), cfg).unwrap();
    h.restart();
    let t0 = Instant::now();
    while !(h.follow() && victim.is_up()) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no handshake");
        thread::sleep(Duration::from_millis(1));
    }
    let peer = Peer {
        h,
        victim_role: role,
        log: Vec::new(),
        driver: None,
    };
    (victim, peer)
}

/// A host victim without a keeper thread, listening on `PORT`, link up: frames the peer
/// publishes stay in the ring until the test drives it or a reader takes them directly.
fn driven_pair(cfg: Config) -> (Endpoint, Listener, Peer) {
    driven_pair_in(cfg, 64 << 10)
}

/// As [`driven_pair`], over a region of `len` bytes.
fn driven_pair_in(cfg: Config, len: usize) -> (Endpoint, Listener, Peer) {
    let region = SharedRegion::heap(len);
    let (a, b) = local::pair();
    let mut h = Hostile::new(region.clone(), Role::Guest, Arc::new(b));
    let victim = Endpoint::unattached(Role::Host, region, Arc::new(a), cfg).unwrap();
    let l = victim.listen(PORT).unwrap();
    let mut driver = victim.attach_driven().expect("a driver");
    h.restart();
    let t0 = Instant::now();
    loop {
        driver.drive(Instant::now());
        if h.follow() && victim.is_up() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no handshake");
        thread::sleep(Duration::from_millis(1));
    }
    let peer = Peer {
        h,
        victim_role: Role::Host,
        log: Vec::new(),
        driver: Some(driver),
    };
    (victim, l, peer)
}

impl Peer {
    /// The low bit of the ids this peer opens.
    fn bit(&self) -> u64 {
        match self.victim_role {
            Role::Host => 1,
            Role::Guest => 0,
        }
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.h.next_seq << 1 | self.bit();
        self.h.next_seq += 1;
        id
    }

    /// Follows the victim and reads what it published into the log.
    fn poll(&mut self) {
        if let Some(d) = &mut self.driver {
            d.drive(Instant::now());
        }
        self.h.follow();
        let h = &mut self.h;
        let cap = h.cap();
        let head = h.load(h.victim, side::TX_HEAD);
        while h.tail < head {
            let off = (h.tail % cap) as usize;
            let to_end = (cap - off as u64) as usize;
            let mut hb = [0u8; HEADER_LEN];
            h.region.read(h.rx_ring + off, &mut hb);
            let contiguous = ((head - h.tail) as usize).min(to_end);
            let hd = Header::decode(&hb, h.geom.max_payload(), contiguous, to_end)
                .expect("the victim writes well-formed records");
            if hd.kind == Kind::Pad {
                h.tail += to_end as u64;
                continue;
            }
            let mut p = None;
            if hd.len == 16 {
                let mut b = [0u8; 16];
                h.region.read(h.rx_ring + off + HEADER_LEN, &mut b);
                p = Some(b);
            }
            if let (Some(b), Kind::Open) = (p, hd.kind) {
                if let Some(a) = OpenArgs::decode(&b) {
                    h.victim_opens.push((hd.session, a.buf_alloc));
                }
            }
            if let (Some(b), Kind::Accept | Kind::Credit) = (p, hd.kind) {
                if let (Some(c), Some(s)) =
                    (CreditArgs::decode(&b), h.sessions.get_mut(&hd.session))
                {
                    s.buf_alloc = c.buf_alloc;
                    s.peer_fwd = c.fwd_cnt;
                }
            }
            self.log.push((hd.kind, hd.session, p));
            h.tail += record_len(hd.len as usize) as u64;
        }
        h.store(side::RX_TAIL, h.tail);
    }

    fn until(&mut self, what: &str, mut done: impl FnMut(&Peer) -> bool) {
        let t0 = Instant::now();
        loop {
            self.poll();
            if done(self) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "never: {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn count(&self, kind: Kind, id: u64) -> usize {
        self.log
            .iter()
            .filter(|(k, s, _)| *k == kind && *s == id)
            .count()
    }

    fn credits(&self, id: u64) -> Vec<CreditArgs> {
        self.log
            .iter()
            .filter(|(k, s, _)| *k == Kind::Credit && *s == id)
            .filter_map(|(_, _, p)| p.and_then(|b| CreditArgs::decode(&b)))
            .collect()
    }

    fn push(&mut self, kind: Kind, flags: u8, id: u64, payload: &[u8]) {
        assert!(self.h.push(kind, flags, id, payload), "ring full");
        self.h.publish();
    }

    /// Publishes an Open to a port nobody listens on and waits for its Refuse: every
    /// frame pushed before it has been handled. Counts one refused open.
    fn sync(&mut self) {
        let id = self.fresh_id();
        let args = OpenArgs {
            port: NOBODY,
            message: false,
            buf_alloc: 1 << 20,
        };
        self.push(Kind::Open, 0, id, &args.encode());
        self.until("the sentinel's Refuse", |p| p.count(Kind::Refuse, id) == 1);
    }

    /// Opens a session to the victim's `port` and waits for the answer; true if accepted.
    fn open(&mut self, port: u32, message: bool) -> (u64, bool) {
        let id = self.fresh_id();
        let args = OpenArgs {
            port,
            message,
            buf_alloc: 1 << 20,
        };
        self.h.sessions.insert(
            id,
            HostileSess {
                sent: 0,
                peer_fwd: 0,
                buf_alloc: 0,
            },
        );
        self.push(Kind::Open, 0, id, &args.encode());
        self.until("Accept or Refuse", |p| {
            p.count(Kind::Accept, id) + p.count(Kind::Refuse, id) > 0
        });
        (id, self.count(Kind::Accept, id) == 1)
    }
}

/// The change of the counters from `a` to `b`: (dropped, session resets, opens refused).
fn delta(a: &Stats, b: &Stats) -> (u64, u64, u64) {
    (
        b.frames_dropped - a.frames_dropped,
        b.session_resets - a.session_resets,
        b.opens_refused - a.opens_refused,
    )
}

fn bytes(id: u64, from: u64, to: u64) -> Vec<u8> {
    (from..to).map(|i| pattern(id, i)).collect()
}

/// Runs `act`, then a sentinel; returns what the counters did (the sentinel's refusal
/// taken off).
fn counted(victim: &Endpoint, peer: &mut Peer, act: impl FnOnce(&mut Peer)) -> (u64, u64, u64) {
    peer.sync();
    let before = victim.stats();
    act(peer);
    peer.sync();
    let (d, r, o) = delta(&before, &victim.stats());
    (d, r, o - 1)
}

/// As [`counted`], for an act that picks a fresh id after the first sentinel (so that the
/// id's sequence number is above every one seen) and returns it.
fn counted_id(
    victim: &Endpoint,
    peer: &mut Peer,
    act: impl FnOnce(&mut Peer) -> u64,
) -> ((u64, u64, u64), u64) {
    let mut id = 0;
    let got = counted(victim, peer, |p| id = act(p));
    (got, id)
}

/// A session the peer opened to the victim's listener, accepted on both sides.
fn accepted(l: &Listener, peer: &mut Peer, message: bool) -> (u64, Session) {
    let (id, ok) = peer.open(PORT, message);
    assert!(ok, "the victim refused an open it has room for");
    let mut s = l.accept_timeout(Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10)));
    s.set_write_timeout(Some(Duration::from_secs(10)));
    assert_eq!(s.id(), id);
    (id, s)
}

/// Frames for sessions that do not exist (or not in a state to take them) are dropped,
/// each counted once, and nothing else happens.
#[test]
fn frames_for_no_session_are_dropped_and_counted_once() {
    let _w = watchdog("frames_for_no_session_are_dropped_and_counted_once", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let ghost = 1001 << 1 | peer.bit();
    let credit = CreditArgs {
        fwd_cnt: 0,
        buf_alloc: BUF,
    }
    .encode();
    for (kind, payload) in [
        (Kind::Data, &b"ghost bytes"[..]),
        (Kind::Credit, &credit[..]),
        (Kind::Accept, &credit[..]),
        (Kind::Refuse, &[][..]),
        (Kind::Shutdown, &[][..]),
        (Kind::Close, &[][..]),
        (Kind::Reset, &[][..]),
    ] {
        let got = counted(&victim, &mut peer, |p| p.push(kind, 0, ghost, payload));
        assert_eq!(got, (1, 0, 0), "{kind:?} for no session");
    }
    assert_eq!(peer.count(Kind::Reset, ghost), 0);
}

/// Data after the peer's Shutdown is dropped and counted once; the reader gets what came
/// before, then EOF; the session is not reset.
#[test]
fn data_after_shutdown_is_dropped_and_counted_once() {
    let _w = watchdog("data_after_shutdown_is_dropped_and_counted_once", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, false);
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 10));
    peer.push(Kind::Shutdown, 0, id, &[]);
    peer.sync();
    let got = counted(&victim, &mut peer, |p| {
        p.push(Kind::Data, 0, id, &bytes(id, 10, 20))
    });
    assert_eq!(got, (1, 0, 0));
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, bytes(id, 0, 10));
}

/// A frame that fills the credit exactly is taken; one byte more resets the session,
/// counted once, with one Reset sent, and the reader sees ConnectionReset.
#[test]
fn credit_is_exact() {
    let _w = watchdog("credit_is_exact", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, false);
    let got = counted(&victim, &mut peer, |p| {
        p.push(Kind::Data, 0, id, &bytes(id, 0, BUF as u64))
    });
    assert_eq!(got, (0, 0, 0), "a frame within the credit");
    let mut buf = vec![0u8; BUF as usize];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, bytes(id, 0, BUF as u64));
    // All of it consumed: the whole buffer is credit again, whatever was received.
    let got = counted(&victim, &mut peer, |p| {
        p.push(Kind::Data, 0, id, &bytes(id, BUF as u64, 2 * BUF as u64))
    });
    assert_eq!(
        got,
        (0, 0, 0),
        "a full buffer again after the reader took the first"
    );
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, bytes(id, BUF as u64, 2 * BUF as u64));
    assert_eq!(peer.count(Kind::Reset, id), 0);

    let (id2, mut s2) = accepted(&l, &mut peer, false);
    let got = counted(&victim, &mut peer, |p| {
        p.push(Kind::Data, 0, id2, &bytes(id2, 0, BUF as u64 + 1))
    });
    assert_eq!(got, (0, 1, 0), "one byte past the credit");
    assert_eq!(peer.count(Kind::Reset, id2), 1);
    let mut one = [0u8; 1];
    assert_eq!(
        s2.read(&mut one).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
    // The first session goes on.
    let got = counted(&victim, &mut peer, |p| {
        p.push(
            Kind::Data,
            0,
            id,
            &bytes(id, 2 * BUF as u64, 2 * BUF as u64 + 5),
        )
    });
    assert_eq!(got, (0, 0, 0));
    let mut five = [0u8; 5];
    s.read_exact(&mut five).unwrap();
    assert_eq!(five.to_vec(), bytes(id, 2 * BUF as u64, 2 * BUF as u64 + 5));
}

/// A direct read with room for many frames (nothing pumped them: the victim has no keeper
/// thread) takes the large ones out of the ring after the lock (lent) and the small ones
/// under it, all in one call: every byte arrives in order, the ring's space all comes
/// back to the writer when the read returns, and the credit counts each byte once.
#[test]
fn large_frames_read_at_once_arrive_whole_and_credited() {
    let _w = watchdog("large_frames_read_at_once_arrive_whole_and_credited", LIMIT);
    let window = 512 << 10;
    let cfg = Config {
        buf_size: window,
        max_buf_size: window,
        ..cfg()
    };
    let (_victim, l, mut peer) = driven_pair_in(cfg, 2 << 20);
    let (id, mut s) = accepted(&l, &mut peer, false);
    // Lent, copied, lent, copied (one byte under the 1 KiB lent), lent.
    let sizes: [u64; 5] = [48 << 10, 100, 20 << 10, (1 << 10) - 1, 48 << 10];
    let total: u64 = sizes.iter().sum();
    let mut off = 0;
    for n in sizes {
        peer.push(Kind::Data, 0, id, &bytes(id, off, off + n));
        off += n;
    }
    let mut buf = vec![0u8; 1 << 20];
    assert_eq!(
        s.read(&mut buf).unwrap() as u64,
        total,
        "one read takes them all"
    );
    assert!(
        buf[..total as usize] == bytes(id, 0, total)[..],
        "the bytes, in order"
    );
    // Every byte handed back: the victim's tail is at the peer's head.
    assert_eq!(peer.h.load(peer.h.victim, side::RX_TAIL), peer.h.head);
    // The credit granted: within a quarter window of all that was read, none past it.
    peer.poll();
    let credits: Vec<u64> = peer.credits(id).iter().map(|c| c.fwd_cnt).collect();
    let last = credits.last().copied().unwrap_or(0);
    assert!(
        last <= total && total - last < u64::from(window) / 4,
        "{credits:?}"
    );
    // More frames of the size lent than one read lends (64): the rest are copied, same
    // call.
    let frame = 1u64 << 10;
    for i in 0..65 {
        let at = total + i * frame;
        peer.push(Kind::Data, 0, id, &bytes(id, at, at + frame));
    }
    let more = 65 * frame;
    assert_eq!(s.read(&mut buf).unwrap() as u64, more);
    assert!(buf[..more as usize] == bytes(id, total, total + more)[..]);
    assert_eq!(peer.h.load(peer.h.victim, side::RX_TAIL), peer.h.head);
    // The session goes on: a small frame after them is read as usual.
    let total = total + more;
    peer.push(Kind::Data, 0, id, &bytes(id, total, total + 7));
    let mut seven = [0u8; 7];
    s.read_exact(&mut seven).unwrap();
    assert_eq!(seven.to_vec(), bytes(id, total, total + 7));
}

/// A direct read copies at most 16 KiB with the lock held (frames too small to lend, or
/// past the 64 one read lends), then returns what it has: the next read takes the rest.
#[test]
fn a_direct_read_copies_16_kib_at_most_under_the_lock() {
    let _w = watchdog("a_direct_read_copies_16_kib_at_most_under_the_lock", LIMIT);
    let window = 512 << 10;
    let cfg = Config {
        buf_size: window,
        max_buf_size: window,
        ..cfg()
    };
    let (_victim, l, mut peer) = driven_pair_in(cfg, 2 << 20);
    let (id, mut s) = accepted(&l, &mut peer, false);
    let mut buf = vec![0u8; 1 << 20];
    let mut read_and_check = |s: &mut ivring::Session, from: u64, want: u64| {
        assert_eq!(s.read(&mut buf).unwrap() as u64, want, "bytes from {from}");
        assert!(buf[..want as usize] == bytes(id, from, from + want)[..]);
    };
    // 300 frames of 100 bytes, none lent: 163 of them fit 16 KiB.
    for i in 0..300u64 {
        peer.push(Kind::Data, 0, id, &bytes(id, i * 100, (i + 1) * 100));
    }
    read_and_check(&mut s, 0, 16_300);
    read_and_check(&mut s, 16_300, 13_700);
    // 84 frames of 1 KiB: 64 lent, then 16 copied, then the last 4 on the next call.
    let at = 30_000;
    for i in 0..84u64 {
        peer.push(
            Kind::Data,
            0,
            id,
            &bytes(id, at + (i << 10), at + ((i + 1) << 10)),
        );
    }
    read_and_check(&mut s, at, 80 << 10);
    read_and_check(&mut s, at + (80 << 10), 4 << 10);
    assert_eq!(peer.h.load(peer.h.victim, side::RX_TAIL), peer.h.head);
}

/// A reader that sees the session reset by a frame past the credit gets ConnectionReset.
#[test]
fn data_past_credit_resets_the_reader() {
    let _w = watchdog("data_past_credit_resets_the_reader", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, false);
    peer.push(Kind::Data, 0, id, &bytes(id, 0, BUF as u64 + 1));
    peer.sync();
    let mut buf = [0u8; 16];
    let e = s.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset);
    assert_eq!(victim.stats().session_resets, 1);
}

/// Empty messages take no credit; a message session holds at most as many queued
/// messages as its buffer has bytes: the one past that resets it. Frames that do not end
/// a message never count.
#[test]
fn queued_messages_are_capped_at_the_buffer_size() {
    let _w = watchdog("queued_messages_are_capped_at_the_buffer_size", LIMIT);
    const SMALL: u32 = 16;
    let (victim, mut peer) = pair(
        Role::Host,
        Config {
            buf_size: SMALL,
            max_buf_size: SMALL,
            ..cfg()
        },
    );
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, true);
    let got = counted(&victim, &mut peer, |p| {
        for _ in 0..SMALL {
            assert!(p.h.push(Kind::Data, FLAG_EOR, id, &[]));
        }
        p.h.publish();
    });
    assert_eq!(got, (0, 0, 0), "{SMALL} empty messages");
    // Not the end of a message: no new queue entry, so no reset at the cap.
    let got = counted(&victim, &mut peer, |p| {
        p.push(Kind::Data, 0, id, &bytes(id, 0, 1))
    });
    assert_eq!(
        got,
        (0, 0, 0),
        "a frame that does not end a message, at the cap"
    );
    assert_eq!(peer.count(Kind::Reset, id), 0);
    // Ending it would queue one message more than the cap.
    let got = counted(&victim, &mut peer, |p| {
        p.push(Kind::Data, FLAG_EOR, id, &[])
    });
    assert_eq!(got, (0, 1, 0), "one message past the cap");
    assert_eq!(peer.count(Kind::Reset, id), 1);
    let mut buf = [0u8; 64];
    assert_eq!(
        s.read(&mut buf).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
}

/// Under the cap, messages keep their lengths and boundaries, empty ones included.
#[test]
fn messages_keep_their_lengths() {
    let _w = watchdog("messages_keep_their_lengths", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, true);
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 3));
    peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 3, 7));
    peer.push(Kind::Data, FLAG_EOR, id, &[]);
    peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 7, 8));
    peer.push(Kind::Shutdown, 0, id, &[]);
    peer.sync();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    for _ in 0..4 {
        let n = s.read(&mut buf).unwrap();
        got.push(buf[..n].to_vec());
    }
    assert_eq!(
        got,
        vec![bytes(id, 0, 7), vec![], bytes(id, 7, 8), vec![]],
        "messages, then EOF"
    );
}

/// Data arriving after we shut our read side is dropped unread but credited: the peer
/// gets a Credit for every byte of it.
#[test]
fn data_dropped_after_read_shutdown_is_credited() {
    let _w = watchdog("data_dropped_after_read_shutdown_is_credited", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, s) = accepted(&l, &mut peer, false);
    s.shutdown(Shutdown::Read).unwrap();
    let n = BUF as u64 / 2;
    let got = counted(&victim, &mut peer, |p| {
        p.push(Kind::Data, 0, id, &bytes(id, 0, n))
    });
    assert_eq!(got, (0, 0, 0));
    let c = peer.credits(id);
    assert_eq!(c.last().map(|c| c.fwd_cnt), Some(n), "credits: {c:?}");
    drop(s);
}

/// Opens the victim must drop without an answer: ids of its own parity, a reserved byte
/// set, an id not above the highest it has seen.
#[test]
fn bad_opens_are_dropped_unanswered() {
    let _w = watchdog("bad_opens_are_dropped_unanswered", LIMIT);
    for role in [Role::Host, Role::Guest] {
        let (victim, mut peer) = pair(role, cfg());
        let _l = victim.listen(PORT).unwrap();
        let args = OpenArgs {
            port: PORT,
            message: false,
            buf_alloc: BUF,
        }
        .encode();
        // An honest one is accepted, in either role.
        let (_, ok) = peer.open(PORT, false);
        assert!(ok, "{role:?}: an honest open");
        // The victim's own parity, a fresh sequence number.
        let (got, own) = counted_id(&victim, &mut peer, |p| {
            let own = p.fresh_id() ^ 1;
            p.push(Kind::Open, 0, own, &args);
            own
        });
        assert_eq!(got, (1, 0, 0), "{role:?}: an open of the victim's parity");
        // A reserved byte set (port 0 would be refused if it were read), a fresh
        // sequence number.
        let mut bad = OpenArgs {
            port: 0,
            message: false,
            buf_alloc: BUF,
        }
        .encode();
        bad[5] = 1;
        let (got, id) = counted_id(&victim, &mut peer, |p| {
            let id = p.fresh_id();
            p.push(Kind::Open, 0, id, &bad);
            id
        });
        assert_eq!(got, (1, 0, 0), "{role:?}: malformed open args");
        // The same id again.
        let (old, ok) = peer.open(PORT, false);
        assert!(ok);
        let got = counted(&victim, &mut peer, |p| p.push(Kind::Open, 0, old, &args));
        assert_eq!(got, (1, 0, 0), "{role:?}: an id reused");
        for id in [own, id] {
            assert_eq!(peer.count(Kind::Accept, id), 0);
            assert_eq!(peer.count(Kind::Refuse, id), 0);
        }
        assert_eq!(peer.count(Kind::Accept, old), 1);
    }
}

/// Sequence numbers are `id >> 1` and compared whole: an id whose top bit is set raises
/// the highest sequence number seen so high that a small one after it is stale.
#[test]
fn open_sequence_numbers_are_the_id_shifted_right() {
    let _w = watchdog("open_sequence_numbers_are_the_id_shifted_right", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let _l = victim.listen(PORT).unwrap();
    let args = OpenArgs {
        port: PORT,
        message: false,
        buf_alloc: BUF,
    }
    .encode();
    let high = 1 << 63 | 2 | peer.bit();
    peer.push(Kind::Open, 0, high, &args);
    peer.until("Accept of the high id", |p| {
        p.count(Kind::Accept, high) == 1
    });
    let small = 3 << 1 | peer.bit();
    peer.push(Kind::Open, 0, small, &args);
    // Sentinels must be above the high id's sequence number.
    peer.h.next_seq = (high >> 1) + 1;
    peer.sync();
    assert_eq!(
        peer.count(Kind::Accept, small),
        0,
        "a stale id was accepted"
    );
    assert_eq!(peer.count(Kind::Refuse, small), 0);
}

/// At `max_sessions` the next open is refused (counted), not accepted.
#[test]
fn opens_past_max_sessions_are_refused() {
    let _w = watchdog("opens_past_max_sessions_are_refused", LIMIT);
    let (victim, mut peer) = pair(
        Role::Host,
        Config {
            max_sessions: 2,
            backlog: 8,
            ..cfg()
        },
    );
    let l = victim.listen(PORT).unwrap();
    let mut kept = Vec::new();
    for _ in 0..2 {
        let (_, ok) = peer.open(PORT, false);
        assert!(ok);
        kept.push(l.accept_timeout(Duration::from_secs(10)).unwrap());
    }
    let before = victim.stats();
    let (id, ok) = peer.open(PORT, false);
    assert!(!ok, "a third session with max_sessions 2");
    assert_eq!(delta(&before, &victim.stats()), (0, 0, 1));
    assert_eq!(peer.count(Kind::Refuse, id), 1);
}

/// With the backlog full the next open is refused (counted), not accepted.
#[test]
fn opens_past_the_backlog_are_refused() {
    let _w = watchdog("opens_past_the_backlog_are_refused", LIMIT);
    let (victim, mut peer) = pair(
        Role::Host,
        Config {
            max_sessions: 64,
            backlog: 2,
            ..cfg()
        },
    );
    let _l = victim.listen(PORT).unwrap();
    for _ in 0..2 {
        let (_, ok) = peer.open(PORT, false);
        assert!(ok);
    }
    let before = victim.stats();
    let (id, ok) = peer.open(PORT, false);
    assert!(!ok, "a third open with a backlog of 2");
    assert_eq!(delta(&before, &victim.stats()), (0, 0, 1));
    assert_eq!(peer.count(Kind::Refuse, id), 1);
}

/// The victim connects; the peer answers as `answer` says. Returns what connect returned
/// and the id.
fn connect_answered(
    victim: Arc<Endpoint>,
    peer: &mut Peer,
    answer: impl FnOnce(&mut Peer, u64),
) -> (std::io::Result<Session>, u64) {
    let v = victim.clone();
    let opener = thread::spawn(move || v.connect(PORT));
    peer.until("the victim's Open", |p| !p.h.victim_opens.is_empty());
    let (id, _) = peer.h.victim_opens.remove(0);
    answer(peer, id);
    (opener.join().unwrap(), id)
}

/// An Accept must say fwd_cnt 0: any other resets the session it answers.
#[test]
fn an_accept_with_a_nonzero_count_resets() {
    let _w = watchdog("an_accept_with_a_nonzero_count_resets", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let victim = Arc::new(victim);
    let before = victim.stats();
    let (r, id) = connect_answered(victim.clone(), &mut peer, |p, id| {
        let c = CreditArgs {
            fwd_cnt: 5,
            buf_alloc: BUF,
        };
        p.push(Kind::Accept, 0, id, &c.encode());
    });
    assert!(r.is_err(), "connect succeeded on a bad Accept");
    peer.until("the Reset", |p| p.count(Kind::Reset, id) == 1);
    assert_eq!(victim.stats().session_resets - before.session_resets, 1);
}

/// A Refuse answers a connect (ConnectionRefused); for an open session it is dropped.
#[test]
fn refuse_ends_a_connect_and_nothing_else() {
    let _w = watchdog("refuse_ends_a_connect_and_nothing_else", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let victim = Arc::new(victim);
    let (r, _) = connect_answered(victim.clone(), &mut peer, |p, id| {
        p.push(Kind::Refuse, 0, id, &[])
    });
    assert_eq!(
        r.err().map(|e| e.kind()),
        Some(ErrorKind::ConnectionRefused)
    );
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, false);
    let got = counted(&victim, &mut peer, |p| p.push(Kind::Refuse, 0, id, &[]));
    assert_eq!(got, (1, 0, 0), "Refuse on an open session");
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 4));
    let mut four = [0u8; 4];
    s.read_exact(&mut four).unwrap();
    assert_eq!(four.to_vec(), bytes(id, 0, 4));
    s.write_all(b"still open").unwrap();
}

/// An open session on which the victim wrote 100 bytes (its send count is 100).
fn session_with_traffic(l: &Listener, peer: &mut Peer) -> (u64, Session) {
    let (id, mut s) = accepted(l, peer, false);
    s.write_all(&[7u8; 100]).unwrap();
    peer.until("the victim's data", |p| p.count(Kind::Data, id) >= 1);
    (id, s)
}

fn credit(p: &mut Peer, id: u64, fwd_cnt: u64) {
    let c = CreditArgs {
        fwd_cnt,
        buf_alloc: 1 << 20,
    };
    p.push(Kind::Credit, 0, id, &c.encode());
}

/// Credits must move forward and not past what the victim sent; a session already reset
/// drops what comes after, counted, without a second reset.
#[test]
fn credit_must_move_forward_within_what_was_sent() {
    let _w = watchdog("credit_must_move_forward_within_what_was_sent", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, s) = session_with_traffic(&l, &mut peer);
    assert_eq!(
        counted(&victim, &mut peer, |p| credit(p, id, 50)),
        (0, 0, 0)
    );
    assert_eq!(
        counted(&victim, &mut peer, |p| credit(p, id, 100)),
        (0, 0, 0)
    );
    assert_eq!(
        counted(&victim, &mut peer, |p| credit(p, id, 40)),
        (0, 1, 0),
        "a credit going backwards"
    );
    assert_eq!(peer.count(Kind::Reset, id), 1);
    // The session is reset: anything more for it is dropped, not reset again.
    for (kind, payload) in [
        (
            Kind::Credit,
            CreditArgs {
                fwd_cnt: 100,
                buf_alloc: BUF,
            }
            .encode()
            .to_vec(),
        ),
        (Kind::Data, bytes(id, 0, 3)),
        (Kind::Shutdown, vec![]),
        (Kind::Reset, vec![]),
        (Kind::Refuse, vec![]),
    ] {
        let got = counted(&victim, &mut peer, |p| p.push(kind, 0, id, &payload));
        assert_eq!(got, (1, 0, 0), "{kind:?} after the reset");
    }
    assert_eq!(peer.count(Kind::Reset, id), 1, "reset twice");
    drop(s);

    let (id2, _s2) = session_with_traffic(&l, &mut peer);
    assert_eq!(
        counted(&victim, &mut peer, |p| credit(p, id2, 101)),
        (0, 1, 0),
        "a credit for a byte never sent"
    );
}

/// Shutdown before Accept is dropped (the session then opens and reads normally);
/// Shutdown ends reading but not writing, Close ends both.
#[test]
fn shutdown_and_close_apply_to_open_sessions_only() {
    let _w = watchdog("shutdown_and_close_apply_to_open_sessions_only", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let victim = Arc::new(victim);
    let before = victim.stats();
    let (r, id) = connect_answered(victim.clone(), &mut peer, |p, id| {
        p.push(Kind::Shutdown, 0, id, &[]);
        p.sync();
        let c = CreditArgs {
            fwd_cnt: 0,
            buf_alloc: 1 << 20,
        };
        p.push(Kind::Accept, 0, id, &c.encode());
    });
    assert_eq!(victim.stats().frames_dropped - before.frames_dropped, 1);
    let mut s = r.expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)));
    s.set_write_timeout(Some(Duration::from_secs(10)));
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 9));
    peer.push(Kind::Shutdown, 0, id, &[]);
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, bytes(id, 0, 9));
    // After the peer's Shutdown, we may still write.
    s.write_all(b"reply").unwrap();

    let l = victim.listen(PORT).unwrap();
    let (id2, mut s2) = accepted(&l, &mut peer, false);
    peer.push(Kind::Close, 0, id2, &[]);
    peer.sync();
    let mut all = Vec::new();
    s2.read_to_end(&mut all).unwrap();
    assert!(all.is_empty());
    assert_eq!(
        s2.write_all(b"to nobody").unwrap_err().kind(),
        ErrorKind::BrokenPipe
    );
}

/// The peer's Reset ends an open session (ConnectionReset, counted once); a connecting
/// one too.
#[test]
fn reset_ends_open_and_connecting_sessions() {
    let _w = watchdog("reset_ends_open_and_connecting_sessions", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let victim = Arc::new(victim);
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, false);
    let got = counted(&victim, &mut peer, |p| p.push(Kind::Reset, 0, id, &[]));
    assert_eq!(got, (0, 1, 0));
    let mut buf = [0u8; 8];
    assert_eq!(
        s.read(&mut buf).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
    let before = victim.stats();
    let (r, _) = connect_answered(victim.clone(), &mut peer, |p, id| {
        p.push(Kind::Reset, 0, id, &[])
    });
    assert!(r.is_err(), "connect succeeded after a Reset");
    assert_eq!(victim.stats().session_resets - before.session_resets, 1);
}

/// Credit goes back once a quarter of the buffer is consumed, not before, and says
/// exactly what was consumed.
#[test]
fn stream_credit_waits_for_a_quarter_of_the_buffer() {
    let _w = watchdog("stream_credit_waits_for_a_quarter_of_the_buffer", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, false);
    let q = BUF as u64 / 4;
    let mut at = 0;
    let mut read = |peer: &mut Peer, n: u64| {
        peer.push(Kind::Data, 0, id, &bytes(id, at, at + n));
        peer.sync();
        let mut buf = vec![0u8; n as usize];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, bytes(id, at, at + n));
        at += n;
        peer.sync();
    };
    read(&mut peer, q - 1);
    assert_eq!(
        peer.credits(id),
        vec![],
        "a credit before a quarter was read"
    );
    read(&mut peer, 1);
    let want = CreditArgs {
        fwd_cnt: q,
        buf_alloc: BUF,
    };
    assert_eq!(peer.credits(id), vec![want], "a quarter read");
    read(&mut peer, 1);
    assert_eq!(peer.credits(id), vec![want], "a byte after the credit");
}

/// A message reader that empties its buffer reports everything consumed at once.
#[test]
fn message_credit_goes_back_when_the_buffer_empties() {
    let _w = watchdog("message_credit_goes_back_when_the_buffer_empties", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, true);
    peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 0, 100));
    peer.sync();
    let mut buf = [0u8; 256];
    assert_eq!(s.read(&mut buf).unwrap(), 100);
    peer.sync();
    let want = CreditArgs {
        fwd_cnt: 100,
        buf_alloc: BUF,
    };
    assert_eq!(peer.credits(id), vec![want]);
}

/// A run of messages read straight from the ring (nothing pumped them: the victim has no
/// keeper thread) is credited once, by the read that takes its last message, as a run
/// the pump buffered is: not once per message, and not held back by another session's
/// frame behind it.
#[test]
fn a_run_of_messages_read_directly_is_credited_once() {
    let _w = watchdog("a_run_of_messages_read_directly_is_credited_once", LIMIT);
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (id, mut s) = accepted(&l, &mut peer, true);
    // A run longer than a quarter of the buffer is credited at each quarter as well;
    // a short one, with another session's frame behind it, once at its end.
    let ghost = 1001 << 1 | peer.bit();
    for (from, to) in [(0, 15), (15, 18)] {
        for k in from..to {
            peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, k * 100, (k + 1) * 100));
        }
        if to == 18 {
            peer.push(Kind::Data, FLAG_EOR, ghost, b"another session's");
        }
        for k in from..to {
            read_is(&mut s, id, k * 100, (k + 1) * 100);
        }
    }
    peer.sync();
    let credit = |fwd_cnt| CreditArgs {
        fwd_cnt,
        buf_alloc: BUF,
    };
    assert_eq!(BUF / 4, 1024);
    assert_eq!(
        peer.credits(id),
        vec![credit(1100), credit(1500), credit(1800)]
    );
}

/// No credit after the peer said it sends no more.
#[test]
fn no_credit_after_the_peers_shutdown() {
    let _w = watchdog("no_credit_after_the_peers_shutdown", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, false);
    peer.push(Kind::Data, 0, id, &bytes(id, 0, BUF as u64 / 2));
    peer.push(Kind::Shutdown, 0, id, &[]);
    peer.sync();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, bytes(id, 0, BUF as u64 / 2));
    peer.sync();
    assert_eq!(peer.credits(id), vec![]);
}

/// A reader taking frames straight from the ring (nothing pumped them: the victim has
/// no keeper thread) gets what pump would give it: a frame past the credit resets the
/// session, whichever path sees it first.
#[test]
fn a_direct_read_does_not_take_data_past_the_credit() {
    let _w = watchdog("a_direct_read_does_not_take_data_past_the_credit", LIMIT);
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (id, mut s) = accepted(&l, &mut peer, false);
    s.set_read_timeout(Some(Duration::from_secs(5)));
    // Straight from the ring: exactly the credit.
    peer.push(Kind::Data, 0, id, &bytes(id, 0, BUF as u64));
    let mut buf = vec![0u8; 4 * BUF as usize];
    assert_eq!(s.read(&mut buf).unwrap(), BUF as usize);
    assert_eq!(buf[..BUF as usize], bytes(id, 0, BUF as u64)[..]);
    // The victim has not credited it back (the peer has not read its Credit): the
    // whole buffer is held as far as the peer knows, but it was consumed here, so the
    // next full buffer fits; one byte more does not.
    peer.push(
        Kind::Data,
        0,
        id,
        &bytes(id, BUF as u64, 2 * BUF as u64 + 1),
    );
    let e = s.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "read past the credit");
}

/// A direct read stops at anything that is not this session's next Data frame, and
/// never runs ahead of bytes already buffered, of message boundaries, of its own
/// Shutdown(Read) or of the peer's Shutdown.
#[test]
fn a_direct_read_takes_only_this_sessions_data_in_order() {
    let _w = watchdog(
        "a_direct_read_takes_only_this_sessions_data_in_order",
        LIMIT,
    );
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (id, mut s) = accepted(&l, &mut peer, false);
    let (id2, mut s2) = accepted(&l, &mut peer, false);
    let mut buf = [0u8; 256];
    // Another session's frame right after this one's.
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 10));
    peer.push(Kind::Data, 0, id2, &bytes(id2, 0, 10));
    assert_eq!(
        s.read(&mut buf).unwrap(),
        10,
        "a read crossed another session's frame"
    );
    assert_eq!(buf[..10], bytes(id, 0, 10)[..]);
    assert_eq!(s2.read(&mut buf).unwrap(), 10);
    assert_eq!(buf[..10], bytes(id2, 0, 10)[..]);
    peer.sync();
    let (id, mut s) = accepted(&l, &mut peer, false);
    // A control frame of this session, then another session's frame, in between.
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 10));
    credit(&mut peer, id, 0);
    peer.push(Kind::Data, 0, id, &bytes(id, 10, 20));
    peer.push(Kind::Data, 0, id2, &bytes(id2, 10, 20));
    peer.push(Kind::Data, 0, id, &bytes(id, 20, 30));
    assert_eq!(
        s.read(&mut buf).unwrap(),
        10,
        "a read crossed a Credit frame"
    );
    let mut got = buf[..10].to_vec();
    while got.len() < 30 {
        let n = s.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, bytes(id, 0, 30));
    assert_eq!(s2.read(&mut buf).unwrap(), 10);
    assert_eq!(buf[..10], bytes(id2, 10, 20)[..]);
    // Bytes pumped into the buffer come before newer ones still in the ring.
    peer.push(Kind::Data, 0, id, &bytes(id, 30, 40));
    peer.sync();
    peer.push(Kind::Data, 0, id, &bytes(id, 40, 50));
    assert_eq!(s.read(&mut buf).unwrap(), 10);
    assert_eq!(
        buf[..10],
        bytes(id, 30, 40)[..],
        "ring bytes before buffered ones"
    );
    assert_eq!(s.read(&mut buf).unwrap(), 10);
    assert_eq!(buf[..10], bytes(id, 40, 50)[..]);
    // After the peer's Shutdown, data it sends anyway is not read.
    peer.push(Kind::Shutdown, 0, id, &[]);
    peer.sync();
    peer.push(Kind::Data, 0, id, &bytes(id, 50, 60));
    assert_eq!(
        s.read(&mut buf).unwrap(),
        0,
        "data after the peer's Shutdown"
    );
    // Pump that frame away, so the next one is the first in the ring.
    peer.sync();
    // After our Shutdown(Read), nothing is read.
    s2.shutdown(Shutdown::Read).unwrap();
    peer.push(Kind::Data, 0, id2, &bytes(id2, 20, 30));
    assert_eq!(s2.read(&mut buf).unwrap(), 0, "data after Shutdown(Read)");
}

/// Reads once from `s` and checks it returned session `id`'s pattern bytes `from..to`,
/// no more, no less (one message, on a message session).
fn read_is(s: &mut Session, id: u64, from: u64, to: u64) {
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], &bytes(id, from, to)[..], "read {n} bytes");
}

/// A message session's reads return one message each, whole, even straight from the
/// ring: never two merged, never a message's first fragment alone.
#[test]
fn a_message_read_from_the_ring_is_one_whole_message() {
    let _w = watchdog("a_message_read_from_the_ring_is_one_whole_message", LIMIT);
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (id, mut s) = accepted(&l, &mut peer, true);
    peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 0, 3));
    peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 3, 6));
    peer.push(Kind::Data, 0, id, &bytes(id, 6, 8));
    peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 8, 11));
    peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 11, 15));
    read_is(&mut s, id, 0, 3);
    read_is(&mut s, id, 3, 6);
    read_is(&mut s, id, 6, 11);
    read_is(&mut s, id, 11, 15);
}

/// Messages the pump already took come before one still in the ring, an empty message
/// (which buffers no byte) among them: the direct-read path serves a message session only
/// when nothing waits in its buffer.
#[test]
fn messages_already_taken_are_read_before_one_in_the_ring() {
    let _w = watchdog(
        "messages_already_taken_are_read_before_one_in_the_ring",
        LIMIT,
    );
    for first in [0u64, 3] {
        let (_victim, l, mut peer) = driven_pair(cfg());
        let (id, mut s) = accepted(&l, &mut peer, true);
        peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 0, first));
        // The sentinel's answer says the message above is in the session's buffer.
        peer.sync();
        peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, first, first + 4));
        // Not the message in the ring first.
        read_is(&mut s, id, 0, first);
        read_is(&mut s, id, first, first + 4);
    }
}

/// The peer's credit met ahead of a message by a direct read (nothing pumped the ring:
/// the victim has no keeper thread) is taken, not skipped: the writer has it at once.
#[test]
fn a_credit_ahead_of_a_message_read_directly_is_taken() {
    let _w = watchdog("a_credit_ahead_of_a_message_read_directly_is_taken", LIMIT);
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (id, mut s) = accepted(&l, &mut peer, true);
    let grant = |fwd_cnt| {
        CreditArgs {
            fwd_cnt,
            buf_alloc: 100,
        }
        .encode()
    };
    peer.push(Kind::Credit, 0, id, &grant(0));
    peer.sync();
    assert_eq!(s.write(&[7u8; 100]).unwrap(), 100);
    peer.push(Kind::Credit, 0, id, &grant(100));
    peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 0, 3));
    read_is(&mut s, id, 0, 3);
    // Out of credit but for the grant the read met: a write that may not wait.
    s.set_nonblocking(true);
    assert_eq!(s.write(&[8u8; 100]).unwrap(), 100, "the credit was lost");
}

/// Data the peer sends after it reset a session is not read, directly or otherwise: the
/// reader gets `ConnectionReset`, whichever kind of session.
#[test]
fn data_after_the_peers_reset_is_not_read() {
    let _w = watchdog("data_after_the_peers_reset_is_not_read", LIMIT);
    for message in [false, true] {
        let (_victim, l, mut peer) = driven_pair(cfg());
        let (id, mut s) = accepted(&l, &mut peer, message);
        peer.push(Kind::Reset, 0, id, &[]);
        // The sentinel's answer says the Reset was handled: the Data is alone in the ring.
        peer.sync();
        peer.push(Kind::Data, FLAG_EOR, id, &bytes(id, 0, 10));
        let err = s.read(&mut [0u8; 64]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "message {message}");
    }
}

/// A direct read takes only whole frames that fit what is left of the caller's buffer;
/// the rest goes through the session's buffer, cut to the caller's size.
#[test]
fn a_direct_read_takes_only_frames_that_fit() {
    let _w = watchdog("a_direct_read_takes_only_frames_that_fit", LIMIT);
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (id, mut s) = accepted(&l, &mut peer, false);
    // A frame larger than the whole buffer.
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 10));
    let mut small = [0u8; 4];
    let mut got = Vec::new();
    while got.len() < 10 {
        let n = s.read(&mut small).unwrap();
        assert!(n > 0 && n <= 4);
        got.extend_from_slice(&small[..n]);
    }
    assert_eq!(got, bytes(id, 0, 10));
    // Two frames; the second does not fit what the first left.
    peer.push(Kind::Data, 0, id, &bytes(id, 10, 20));
    peer.push(Kind::Data, 0, id, &bytes(id, 20, 30));
    let mut buf = [0u8; 15];
    assert_eq!(s.read(&mut buf).unwrap(), 10);
    assert_eq!(buf[..10], bytes(id, 10, 20)[..]);
    let mut got = Vec::new();
    while got.len() < 10 {
        let n = s.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, bytes(id, 20, 30));
}

/// A peer restart while the link is up is one link reset, counted once, whether or not
/// sessions are open.
#[test]
fn a_peer_restart_is_one_link_reset() {
    let _w = watchdog("a_peer_restart_is_one_link_reset", LIMIT);
    for with_session in [false, true] {
        let (victim, mut peer) = pair(Role::Host, cfg());
        let l = victim.listen(PORT).unwrap();
        let _s = with_session.then(|| accepted(&l, &mut peer, false));
        let before = victim.stats().link_resets;
        peer.h.restart();
        let t0 = Instant::now();
        while !(peer.h.follow() && victim.is_up() && victim.stats().link_resets > before) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no link reset counted (sessions: {with_session})"
            );
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(victim.stats().link_resets, before + 1);
    }
}

/// A session the peer finished (Shutdown) before it restarted keeps what was sent: the
/// reader gets it, then EOF, as from a socket after a FIN. One it did not finish, or one
/// not yet accepted, is reset.
#[test]
fn a_finished_session_outlives_the_peers_restart() {
    let _w = watchdog("a_finished_session_outlives_the_peers_restart", LIMIT);
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut done) = accepted(&l, &mut peer, false);
    let (open_id, mut open) = accepted(&l, &mut peer, false);
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 10));
    peer.push(Kind::Shutdown, 0, id, &[]);
    peer.push(Kind::Data, 0, open_id, &bytes(open_id, 0, 10));
    peer.sync();
    let before = victim.stats().link_resets;
    peer.h.restart();
    let t0 = Instant::now();
    while !(peer.h.follow() && victim.is_up() && victim.stats().link_resets > before) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no link reset");
        thread::sleep(Duration::from_millis(1));
    }
    let mut all = Vec::new();
    done.read_to_end(&mut all).unwrap();
    assert_eq!(all, bytes(id, 0, 10));
    let mut buf = [0u8; 16];
    assert_eq!(
        open.read(&mut buf).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
}

/// A session the peer reset stays reset across the peer's restart, even one the peer had
/// shut down before it reset it: only sessions that are open and finished keep their data.
#[test]
fn a_session_the_peer_reset_stays_reset_across_its_restart() {
    let _w = watchdog(
        "a_session_the_peer_reset_stays_reset_across_its_restart",
        LIMIT,
    );
    let (victim, mut peer) = pair(Role::Host, cfg());
    let l = victim.listen(PORT).unwrap();
    let (id, mut s) = accepted(&l, &mut peer, false);
    peer.push(Kind::Data, 0, id, &bytes(id, 0, 10));
    peer.push(Kind::Shutdown, 0, id, &[]);
    peer.push(Kind::Reset, 0, id, &[]);
    peer.sync();
    assert_eq!(victim.stats().session_resets, 1);
    let before = victim.stats().link_resets;
    peer.h.restart();
    let t0 = Instant::now();
    while !(peer.h.follow() && victim.is_up() && victim.stats().link_resets > before) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no link reset");
        thread::sleep(Duration::from_millis(1));
    }
    let mut buf = [0u8; 16];
    assert_eq!(
        s.read(&mut buf).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
}

/// What one `read_any_many` call returned: (session id, bytes or EOF), and the bytes.
fn batch(set: &[&Session], buf: &mut [u8]) -> (Vec<(u64, usize)>, Vec<u8>) {
    let mut got = Vec::new();
    let n = Session::read_any_many(set, buf, &mut got, Some(Duration::ZERO)).unwrap();
    assert_eq!(n, got.len());
    let mut at = 0;
    let mut out = Vec::new();
    for (i, r) in got {
        let k = r.unwrap();
        out.push((set[i].id(), k));
        at += k;
    }
    (out, buf[..at].to_vec())
}

/// Straight from the ring (nothing pumped the frames: the victim has no keeper thread),
/// a batch takes the set's frames in ring order, each message whole and alone as one
/// result, and ends, unread, at the first frame that would change a session of the set:
/// a Shutdown, a message's first fragment, a frame that does not fit. Those come one to
/// a call, as `read_any` gives them.
#[test]
fn a_batch_takes_stream_frames_and_stops_at_what_changes_a_session() {
    let _w = watchdog(
        "a_batch_takes_stream_frames_and_stops_at_what_changes_a_session",
        LIMIT,
    );
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (a, sa) = accepted(&l, &mut peer, false);
    let (b, sb) = accepted(&l, &mut peer, false);
    let (m, sm) = accepted(&l, &mut peer, true);
    let (c, sc) = accepted(&l, &mut peer, false);
    peer.push(Kind::Data, 0, a, &bytes(a, 0, 10));
    peer.push(Kind::Data, 0, b, &bytes(b, 0, 20));
    peer.push(Kind::Data, 0, a, &bytes(a, 10, 30));
    peer.push(Kind::Data, FLAG_EOR, m, &bytes(m, 0, 5));
    peer.push(Kind::Data, FLAG_EOR, m, &bytes(m, 5, 12));
    peer.push(Kind::Data, 0, c, &bytes(c, 0, 40));
    peer.push(Kind::Shutdown, 0, b, &[]);
    peer.push(Kind::Data, 0, c, &bytes(c, 40, 50));
    let set = [&sa, &sb, &sm, &sc];
    let mut buf = vec![0u8; 1000];
    // The batch ends at B's Shutdown; B's EOF comes alone.
    let (got, data) = batch(&set, &mut buf);
    let firsts = vec![(a, 10), (b, 20), (a, 20), (m, 5), (m, 7), (c, 40)];
    assert_eq!(got, firsts, "the first batch");
    let want: Vec<u8> = [
        bytes(a, 0, 10),
        bytes(b, 0, 20),
        bytes(a, 10, 30),
        bytes(m, 0, 12),
        bytes(c, 0, 40),
    ]
    .concat();
    assert_eq!(data, want);
    assert_eq!(batch(&set, &mut buf), (vec![(b, 0)], vec![]));
    let set = [&sa, &sm, &sc];
    assert_eq!(batch(&set, &mut buf), (vec![(c, 10)], bytes(c, 40, 50)));
    // A message's first fragment ends a batch; its message comes whole, alone.
    peer.push(Kind::Data, 0, c, &bytes(c, 50, 55));
    peer.push(Kind::Data, 0, m, &bytes(m, 12, 15));
    peer.push(Kind::Data, FLAG_EOR, m, &bytes(m, 15, 20));
    assert_eq!(batch(&set, &mut buf), (vec![(c, 5)], bytes(c, 50, 55)));
    assert_eq!(batch(&set, &mut buf), (vec![(m, 8)], bytes(m, 12, 20)));
    // Frames that fit what is left of the buffer, then one that does not: it ends the
    // batch; alone, it goes through its session's buffer, cut to the caller's size.
    peer.push(Kind::Data, 0, c, &bytes(c, 55, 85));
    peer.push(Kind::Data, 0, a, &bytes(a, 30, 130));
    peer.push(Kind::Data, 0, c, &bytes(c, 85, 95));
    let mut small = vec![0u8; 60];
    assert_eq!(batch(&set, &mut small), (vec![(c, 30)], bytes(c, 55, 85)));
    assert_eq!(batch(&set, &mut small), (vec![(a, 60)], bytes(a, 30, 90)));
    // A's rest is held now, C's frame is next in the ring: the ring comes first.
    assert_eq!(batch(&set, &mut small), (vec![(c, 10)], bytes(c, 85, 95)));
    assert_eq!(batch(&set, &mut small), (vec![(a, 40)], bytes(a, 90, 130)));
    // Nothing waits: WouldBlock.
    let mut got = Vec::new();
    let e = Session::read_any_many(&set, &mut buf, &mut got, Some(Duration::ZERO)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    assert!(got.is_empty());
}

/// A batch of messages taken straight from the ring is credited as a run: once, by the
/// result that takes the last of them.
#[test]
fn a_batch_of_messages_is_credited_once() {
    let _w = watchdog("a_batch_of_messages_is_credited_once", LIMIT);
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (m, sm) = accepted(&l, &mut peer, true);
    for k in 0..3 {
        peer.push(Kind::Data, FLAG_EOR, m, &bytes(m, k * 100, (k + 1) * 100));
    }
    let mut buf = vec![0u8; 1000];
    let (got, data) = batch(&[&sm], &mut buf);
    assert_eq!(got, vec![(m, 100); 3]);
    assert_eq!(data, bytes(m, 0, 300));
    peer.sync();
    let want = CreditArgs {
        fwd_cnt: 300,
        buf_alloc: BUF,
    };
    assert_eq!(peer.credits(m), vec![want]);
}

/// What sessions hold (a pump put it there) is served from one session further each
/// call, so that the first of the set cannot take every turn; a batch adds the other
/// sessions' held stream bytes after the first while the buffer has room.
#[test]
fn held_data_is_served_in_turn_and_batched() {
    let _w = watchdog("held_data_is_served_in_turn_and_batched", LIMIT);
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (a, sa) = accepted(&l, &mut peer, false);
    let (b, sb) = accepted(&l, &mut peer, false);
    let (c, sc) = accepted(&l, &mut peer, false);
    let set = [&sa, &sb, &sc];
    let mut one = [0u8; 4];
    let mut buf = vec![0u8; 1000];
    // One read_any at a time, the held data of all three sessions: a different session
    // each call.
    for id in [a, b, c] {
        peer.push(Kind::Data, 0, id, &bytes(id, 0, 8));
    }
    // Pumped into the sessions' buffers by the driven round that sees the sentinel.
    peer.sync();
    let mut order = Vec::new();
    for _ in 0..3 {
        let (i, r) = Session::read_any(&set, &mut one, Some(Duration::ZERO)).unwrap();
        assert_eq!(r.unwrap(), 4);
        order.push(set[i].id());
    }
    order.sort_unstable();
    assert_eq!(order, vec![a, b, c], "each session once in three calls");
    // The rest, 4 bytes each, in one batch.
    let (got, _) = batch(&set, &mut buf);
    let mut ids: Vec<u64> = got
        .iter()
        .map(|&(id, n)| {
            assert_eq!(n, 4);
            id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![a, b, c],
        "one batch takes every session's held bytes"
    );
}

/// An empty Data frame is nobody's EOF: a batch never reports it as a read of 0 bytes;
/// and a session's end held after a pump comes in a call of its own, not after another
/// session's bytes.
#[test]
fn a_batch_reports_no_empty_frame_and_no_end_after_data() {
    let _w = watchdog(
        "a_batch_reports_no_empty_frame_and_no_end_after_data",
        LIMIT,
    );
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (a, sa) = accepted(&l, &mut peer, false);
    let (c, sc) = accepted(&l, &mut peer, false);
    let set = [&sa, &sc];
    let mut buf = vec![0u8; 1000];
    peer.push(Kind::Data, 0, a, &[]);
    peer.push(Kind::Data, 0, a, &bytes(a, 0, 5));
    let (got, data) = batch(&set, &mut buf);
    assert!(
        got.iter().all(|&(_, n)| n > 0),
        "an empty frame read as EOF: {got:?}"
    );
    assert_eq!(data, bytes(a, 0, 5));
    // Held: A's bytes, C's end (the driven round that sees the sentinel pumps them).
    peer.push(Kind::Data, 0, a, &bytes(a, 5, 9));
    peer.push(Kind::Shutdown, 0, c, &[]);
    peer.sync();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (got, _) = batch(&set, &mut buf);
        assert_eq!(got.len(), 1, "an end batched with data: {got:?}");
        seen.extend(got);
    }
    seen.sort_unstable();
    let mut want = vec![(a, 4), (c, 0)];
    want.sort_unstable();
    assert_eq!(seen, want);
}

/// While a zero-copy view holds a frame in place, the frames behind it wait: a batch of
/// other sessions takes none of them (nor the held frame) until the view is dropped.
#[test]
fn a_batch_waits_behind_a_frame_held_in_place() {
    let _w = watchdog("a_batch_waits_behind_a_frame_held_in_place", LIMIT);
    let (_victim, l, mut peer) = driven_pair(cfg());
    let (x, mut sx) = accepted(&l, &mut peer, false);
    let (y, sy) = accepted(&l, &mut peer, false);
    peer.push(Kind::Data, 0, x, &bytes(x, 0, 100));
    peer.push(Kind::Data, 0, y, &bytes(y, 0, 10));
    let mut buf = vec![0u8; 1000];
    {
        let view = sx.recv_in_place().unwrap().expect("x's frame");
        assert!(view.is_in_place());
        let mut got = Vec::new();
        let e =
            Session::read_any_many(&[&sy], &mut buf, &mut got, Some(Duration::ZERO)).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::WouldBlock,
            "read past a frame held in place"
        );
        let mut seen = Vec::new();
        view.copy_to(&mut seen);
        assert_eq!(seen, bytes(x, 0, 100));
    }
    assert_eq!(batch(&[&sy], &mut buf), (vec![(y, 10)], bytes(y, 0, 10)));
}

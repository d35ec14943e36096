//! A deterministic, single-threaded harness over the receive path, for coverage-guided
//! fuzzing (`fuzz/` at the workspace root; docs/FUZZING.md). Built only with the
//! `fuzzing` feature; not a stable API.
//!
//! The fuzz bytes play a hostile peer: they write the peer's side block (epoch, ack,
//! indices) and its ring contents, and between their writes the victim `Link` pumps,
//! flushes, opens, reads and writes as the keeper and sessions would, through every
//! receive path: the ring pump into session buffers, direct reads from the ring, and
//! zero-copy parking with views held across steps. Every fault is
//! handled the way the endpoint handles it (a local reset), after which the peer may
//! shake hands again. Bounds on the victim's memory are asserted after every step.

use crate::config::Config;
use crate::link::park::Taken;
use crate::link::rx::Lent;
use crate::link::tx::Framed;
use crate::link::{Actions, Link, Stripes};
use crate::shm::doorbell::Polling;
use crate::shm::layout::{side, Geometry, Role};
use crate::shm::region::SharedRegion;
use crate::wire::frame::{record_len, Header, Kind, HEADER_LEN};
use crate::wire::mock::MockPeer;
use crate::wire::ring::Loan;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Region size for the harness: the smallest ivring accepts, so the ring wraps often.
const REGION: usize = 64 << 10;
const MAX_SESSIONS: usize = 8;
const BACKLOG: usize = 4;
const BUF: u32 = 4096;
const PORT: u32 = 7;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).first().copied()
    }
    fn u16(&mut self) -> u16 {
        let b = self.bytes(2);
        b.iter().rev().fold(0, |a, &x| a << 8 | x as u16)
    }
    fn u32(&mut self) -> u32 {
        let b = self.bytes(4);
        b.iter().rev().fold(0, |a, &x| a << 8 | x as u32)
    }
    fn u64(&mut self) -> u64 {
        let b = self.bytes(8);
        b.iter().rev().fold(0, |a, &x| a << 8 | x as u64)
    }
}

/// Runs one fuzz input against a victim link. Panics only on a bug in this crate.
#[doc(hidden)]
pub fn fuzz_pump(data: &[u8]) {
    let mut input = Input(data);
    // The first byte picks the victim's role.
    let role = match input.u8() {
        Some(b) if b & 1 == 1 => Role::Guest,
        _ => Role::Host,
    };
    let region = SharedRegion::heap(REGION);
    let geom = Geometry::for_size(REGION).expect("fuzz region size");
    if role == Role::Guest {
        geom.write_header(&region);
    }
    let cfg = Config {
        heartbeat: Duration::from_secs(3600),
        peer_timeout: Duration::from_secs(3600),
        buf_size: BUF,
        max_sessions: MAX_SESSIONS,
        backlog: BACKLOG,
        ..Config::default()
    };
    // The link reads no clock: the harness's clock moves only when the fuzz bytes say.
    let mut now = Instant::now();
    let mut link = Link::new(role, region.clone(), geom, cfg, now);
    link.listen(PORT);
    let mut out = Actions::default();
    link.attach(Some(0), &mut out);
    // The peer: the crate's mock peer, its words and frames written by the fuzz bytes
    // (its own writes stay inside the ring, wherever its maybe bogus head points).
    let peer = MockPeer::laying_out(
        region.clone(),
        role.other(),
        Arc::new(Polling::new()),
        false,
    );
    let cap = peer.cap();
    let w = |word: usize, v: u64| peer.store(word, v);
    let put = |off: u64, bytes: &[u8]| peer.put(off, bytes);
    let victim_epoch = || peer.load(peer.victim, side::EPOCH);
    // The peer's epoch and its write index into the victim's ring.
    let mut epoch = 1u64;
    let mut head = 0u64;
    let handshake = |epoch: u64| {
        w(side::EPOCH, epoch);
        w(side::PEER_ID, crate::shm::layout::PEER_ID_VALID | 1);
        w(side::ACK, victim_epoch());
    };
    handshake(epoch);
    let step = |link: &mut Link, r: Result<bool, crate::link::Fault>, out: &mut Actions| {
        if let Err(f) = r {
            if f.needs_local_reset() {
                link.local_reset(&f.to_string(), out);
            }
        }
    };
    link.check_peer(now, &mut out);
    let mut sessions: Vec<u64> = Vec::new();
    let mut buf = vec![0u8; 2 * BUF as usize];
    // An in-place view held open across the next steps: (session, generation).
    let mut lent: Option<(u64, u64)> = None;
    // Loans of direct reads held across steps.
    let mut loans: Vec<Loan> = Vec::new();
    // Frames reserved by an unlocked write, their payload not yet copied.
    let mut copying: Vec<(crate::wire::ring::CopySlot, usize)> = Vec::new();
    while let Some(op) = input.u8() {
        let resets = link.stats().link_resets;
        let mut out = Actions::default();
        match op % 14 {
            // Raw bytes anywhere in the victim's receive ring.
            0 => {
                let off = input.u16() as u64 % cap;
                let n = input.u8().unwrap_or(0) as u64;
                let bytes = input.bytes(n as usize).to_vec();
                put(off, &bytes);
            }
            // A well-formed-looking frame at the peer's head, then publish it.
            1 => {
                let kind = input.u8().unwrap_or(0) % 10;
                let flags = input.u8().unwrap_or(0) & 3;
                let len = match input.u8().unwrap_or(0) {
                    x @ 0..=200 => x as u32,
                    201..=250 => 16,
                    _ => input.u32(),
                };
                let session = input.u64() % 32;
                let off = head % cap;
                let to_end = cap - off;
                let rec = record_len((len as usize).min(1 << 20)) as u64;
                if rec > to_end && to_end >= HEADER_LEN as u64 {
                    let pad = Header {
                        kind: Kind::Pad,
                        flags: 0,
                        len: (to_end - HEADER_LEN as u64) as u32,
                        session: 0,
                    };
                    put(off, &pad.encode());
                    head += to_end;
                }
                let off = head % cap;
                let mut hb = [0u8; HEADER_LEN];
                hb[0] = kind;
                hb[1] = flags;
                hb[4..8].copy_from_slice(&len.to_le_bytes());
                hb[8..16].copy_from_slice(&session.to_le_bytes());
                put(off, &hb);
                let payload = input.bytes((len as usize).min(64)).to_vec();
                put(off + HEADER_LEN as u64, &payload);
                head += rec.min(cap);
                w(side::TX_HEAD, head);
            }
            // Any head at all, relative to the last one or absolute.
            2 => {
                let v = input.u64();
                head = if v & 1 == 0 {
                    head.wrapping_add(v >> 1 & 0xffff)
                } else {
                    v >> 1
                };
                w(side::TX_HEAD, head);
            }
            // The victim reads the ring.
            // The victim reads the ring, some time later (a parked frame may expire).
            3 => {
                now += Duration::from_micros(u64::from(input.u8().unwrap_or(0)) * 20);
                let r = link.pump(now, &mut out);
                step(&mut link, r, &mut out);
                let r = link.flush(&mut out).map(|_| true);
                step(&mut link, r, &mut out);
            }
            // Any word in the peer's side block.
            4 => {
                let word = (input.u8().unwrap_or(0) as usize % 64) * 8;
                let v = input.u64();
                w(word, v);
            }
            // The peer restarts (or re-acknowledges) and the victim follows.
            5 => {
                if input.u8().unwrap_or(0) & 1 == 1 {
                    epoch += 1;
                    head = 0;
                    w(side::TX_HEAD, 0);
                    w(side::RX_TAIL, 0);
                }
                handshake(epoch);
                link.check_peer(now, &mut out);
            }
            // The victim opens a session, a stream or a message one.
            6 => {
                if link.is_up() {
                    let pick = input.u8().unwrap_or(0);
                    if let Ok(id) = link.open(pick as u32 % 4 + 6, pick & 0x10 != 0, &mut out) {
                        sessions.push(id);
                    }
                }
            }
            // The victim reads from a session (this may send Credit).
            7 => {
                let ids: Vec<u64> = link.session_ids();
                if let Some(&id) = ids.get(input.u8().unwrap_or(0) as usize % ids.len().max(1)) {
                    let n = input.u16() as usize % buf.len() + 1;
                    let _ = link.read(id, &mut buf[..n], &mut out);
                }
            }
            // The victim writes to a session (credit-checked), then publishes; or reserves
            // the frame and copies its payload a step later (a reset may come between).
            8 => {
                for (slot, n) in copying.drain(..) {
                    link.region().write(slot.at, &buf[..n]);
                    link.finish_copy(slot, &mut out);
                }
                let ids: Vec<u64> = link.session_ids();
                if let Some(&id) = ids.get(input.u8().unwrap_or(0) as usize % ids.len().max(1)) {
                    let pick = input.u16() as usize;
                    let n = (pick >> 1) % buf.len();
                    match link.write_frame(id, &buf[..n], false, true, pick & 1 == 1, &mut out) {
                        Ok(Some(Framed::Reserved(slot, n))) => copying.push((slot, n)),
                        _ => link.publish(&mut out),
                    }
                }
            }
            // The victim closes, shuts down or accepts a session.
            9 => {
                let ids: Vec<u64> = link.session_ids();
                if let Some(&id) = ids.get(input.u8().unwrap_or(0) as usize % ids.len().max(1)) {
                    match input.u8().unwrap_or(0) % 3 {
                        0 => link.close(id, &mut out),
                        1 => {
                            let _ = link.shutdown_write(id, &mut out);
                        }
                        _ => {
                            link.accept(PORT);
                        }
                    }
                }
            }
            // The victim arms its wakeup and space posts (the keeper's sleep path).
            10 => {
                let r = link.arm_wakeup(&mut out);
                step(&mut link, r, &mut out);
                if link.has_pending() {
                    let r = link.arm_pending_space(&mut out);
                    step(&mut link, r, &mut out);
                }
                link.disarm_wakeup();
            }
            // The victim reads a session straight from the ring (the direct path), or the
            // next data of any of some sessions in ring order (read_any).
            12 => {
                let ids: Vec<u64> = link.session_ids();
                let pick = input.u8().unwrap_or(0);
                if let Some(&id) = ids.get((pick & 0x7f) as usize % ids.len().max(1)) {
                    let n = input.u16() as usize % buf.len() + 1;
                    if pick & 0x80 == 0 {
                        // Large frames may be lent: copied out through the region,
                        // then given back now or held across the next steps (the ring
                        // reads on; its space waits). A small loan the read may copy
                        // itself at once (the runtime's rule, at the fuzzer's sizes).
                        let keep_from = if pick & 0x20 != 0 { n } else { 0 };
                        let mut lent = (pick & 0x40 != 0).then(|| Lent::new(n / 2, keep_from));
                        let r = link.read_direct(id, &mut buf[..n], lent.as_mut(), &mut out);
                        if let Some((loan, copies)) = lent.as_mut().and_then(Lent::take) {
                            for c in copies {
                                assert!(c.to + c.len <= n, "a lent payload past the read's buffer");
                                region.read(c.at, &mut buf[c.to..c.to + c.len]);
                            }
                            assert!(matches!(r, Ok(Some(k)) if k <= n) || r.is_err());
                            if input.u8().unwrap_or(0) & 1 == 0 {
                                link.give_back(loan, &mut out);
                            } else {
                                loans.push(loan);
                            }
                        }
                    } else {
                        // The sessions from the picked one on (an id not open among them
                        // answers with its error).
                        let from = ids.iter().position(|&x| x == id).unwrap_or(0);
                        let mut set = ids[from..].to_vec();
                        set.push(id ^ 2);
                        // One frame (read_any) or as many as fit (read_any_many).
                        let max = if n.is_multiple_of(2) { 1 } else { usize::MAX };
                        let mut got = Vec::new();
                        link.read_any(&set, &mut buf[..n], max, &mut got, &mut out);
                        let data: usize = got.iter().filter_map(|(_, r)| r.as_ref().ok()).sum();
                        assert!(data <= n, "read_any results overrun the buffer");
                        assert!(got.len() <= max, "read_any returned more than asked");
                    }
                }
            }
            // A loan a direct read holds is given back. Else the victim reads in place
            // (zero-copy): the session's frames are parked in the ring for it; a view is
            // read through the region, then released now or held across the next steps
            // (pumps and resets included).
            13 => {
                if let Some(loan) = loans.pop() {
                    link.give_back(loan, &mut out);
                } else if let Some((id, gen)) = lent.take() {
                    let _ = link.zc_release(id, gen, &mut out);
                } else {
                    let ids: Vec<u64> = link.session_ids();
                    if let Some(&id) = ids.get(input.u8().unwrap_or(0) as usize % ids.len().max(1))
                    {
                        if let Ok(Some(Taken::Ring { at, len, .. })) = link.zc_take(id, &mut out) {
                            // Bounds-checked by the region: a view outside it panics here.
                            let n = len.min(buf.len());
                            region.read(at, &mut buf[..n]);
                            if input.u8().unwrap_or(0) & 1 == 0 {
                                let gen = link.gen();
                                let _ = link.zc_release(id, gen, &mut out);
                            } else {
                                lent = Some((id, link.gen()));
                            }
                        }
                    }
                }
            }
            // The victim's keeper follows the peer.
            _ => {
                link.check_peer(now, &mut out);
                let r = link.beat(now, Some(true)).map(|_| true);
                step(&mut link, r, &mut out);
            }
        }
        link.check_bounds();
        // A reset of the link ends every session: every caller must be woken to see it.
        assert!(
            link.stats().link_resets == resets || out.wake == Stripes::ALL,
            "a link reset that wakes only some sessions' callers"
        );
    }
}

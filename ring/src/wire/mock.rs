//! A peer driven by hand, word by word, through the shared region (PROTOCOL.md §1-§4):
//! the hostile and recovery tests play the other side of a link with it, honest or not,
//! and the fuzzing harness writes the peer's words and frames through it. Not an API:
//! hidden from the docs, and free to change.

use crate::shm::doorbell::Doorbell;
use crate::shm::layout::{
    side, Geometry, Role, GUEST_BLOCK, HOST_BLOCK, MAGIC, PEER_ID_VALID, VERSION,
};
use crate::shm::region::SharedRegion;
use crate::shm::sync::Ordering;
use crate::wire::frame::{record_len, CreditArgs, Header, Kind, OpenArgs, FLAG_EOR, HEADER_LEN};
use std::collections::HashMap;
use std::sync::Arc;

/// The byte a (hostile or honest) sender puts at `pos` of session `id`: a reader can check
/// every byte it gets without the sender telling it anything.
pub fn pattern(id: u64, pos: u64) -> u8 {
    (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
        ^ (pos as u8).wrapping_mul(7)
        ^ (pos >> 8) as u8
}

/// A peer driven by hand, word by word, through the shared region.
pub struct MockPeer {
    pub region: SharedRegion,
    pub geom: Geometry,
    pub own: usize,
    pub victim: usize,
    pub bell: Arc<dyn Doorbell>,
    pub victim_id: u16,
    pub epoch: u64,
    pub acked: u64,
    pub beat: u64,
    /// Our write index into the ring the victim reads.
    pub head: u64,
    /// Our read index into the ring the victim writes.
    pub tail: u64,
    pub tx_ring: usize,
    pub rx_ring: usize,
    pub next_seq: u64,
    /// Sessions open between us and the victim: bytes we sent, credit the victim granted.
    pub sessions: HashMap<u64, MockSess>,
    /// Opens the victim sent us, not yet answered.
    pub victim_opens: Vec<(u64, u32)>,
}

pub struct MockSess {
    pub sent: u64,
    pub peer_fwd: u64,
    pub buf_alloc: u32,
}

impl MockPeer {
    pub fn new(region: SharedRegion, role: Role, bell: Arc<dyn Doorbell>) -> MockPeer {
        MockPeer::laying_out(region, role, bell, true)
    }

    /// As [`MockPeer::new`]; a hostile host lays the region out only if `lay_out`.
    pub fn laying_out(
        region: SharedRegion,
        role: Role,
        bell: Arc<dyn Doorbell>,
        lay_out: bool,
    ) -> MockPeer {
        let geom = Geometry::for_size(region.len()).unwrap();
        let (own, victim, tx_ring, rx_ring) = match role {
            Role::Host => (HOST_BLOCK, GUEST_BLOCK, geom.h2g_offset, geom.g2h_offset),
            Role::Guest => (GUEST_BLOCK, HOST_BLOCK, geom.g2h_offset, geom.h2g_offset),
        };
        if role == Role::Host && lay_out {
            write_header(&region, &geom);
        }
        let victim_id = 1 - bell.own_id();
        MockPeer {
            region,
            geom,
            own,
            victim,
            bell,
            victim_id,
            epoch: 0,
            acked: 0,
            beat: 0,
            head: 0,
            tail: 0,
            tx_ring: tx_ring as usize,
            rx_ring: rx_ring as usize,
            next_seq: 1,
            sessions: HashMap::new(),
            victim_opens: Vec::new(),
        }
    }

    pub fn load(&self, block: usize, word: usize) -> u64 {
        self.region.load_u64(block + word, Ordering::Acquire)
    }
    pub fn store(&self, word: usize, v: u64) {
        self.region.store_u64(self.own + word, v, Ordering::Release)
    }
    pub fn ring(&self) {
        self.bell.ring(self.victim_id);
    }

    /// (Re)starts with a new epoch, as a restarting peer does.
    pub fn restart(&mut self) {
        self.epoch += 1;
        self.head = 0;
        self.tail = 0;
        self.sessions.clear();
        self.victim_opens.clear();
        self.next_seq = 1;
        self.store(side::TX_HEAD, 0);
        self.store(side::RX_TAIL, 0);
        self.store(side::TX_NEED_SPACE, 0);
        self.store(side::RX_NEED_WAKEUP, 0);
        self.store(side::PEER_ID, PEER_ID_VALID | self.bell.own_id() as u64);
        self.acked = 0;
        self.store(side::ACK, 0);
        self.store(side::EPOCH, self.epoch);
        self.ring();
    }

    /// Follows the victim: acknowledges a new victim epoch (zeroing our indices first, as
    /// the protocol says) and keeps our heartbeat going. Returns whether the link is up.
    pub fn follow(&mut self) -> bool {
        self.beat += 1;
        self.store(side::HEARTBEAT, self.beat);
        let ve = self.load(self.victim, side::EPOCH);
        if ve != 0 && ve != self.acked {
            self.head = 0;
            self.tail = 0;
            self.sessions.clear();
            self.victim_opens.clear();
            self.next_seq = 1;
            self.store(side::TX_HEAD, 0);
            self.store(side::RX_TAIL, 0);
            self.acked = ve;
            self.store(side::ACK, ve);
            self.ring();
        }
        ve != 0 && self.load(self.victim, side::ACK) == self.epoch
    }

    pub fn cap(&self) -> u64 {
        self.geom.capacity
    }

    /// Writes one record at our head if the victim has left room; pads at the ring's end.
    pub fn push_raw(&mut self, hb: &[u8; HEADER_LEN], payload: &[u8]) -> bool {
        let cap = self.cap();
        let vt = self.load(self.victim, side::RX_TAIL);
        let used = self.head.wrapping_sub(vt);
        if used > cap {
            return false;
        }
        let rec = record_len(payload.len()) as u64;
        let off = self.head % cap;
        let to_end = cap - off;
        let need = if to_end < rec { to_end + rec } else { rec };
        if cap - used < need || rec > cap / 2 {
            return false;
        }
        if to_end < rec {
            let pad = Header {
                kind: Kind::Pad,
                flags: 0,
                len: (to_end - HEADER_LEN as u64) as u32,
                session: 0,
            };
            self.region
                .write(self.tx_ring + off as usize, &pad.encode());
            self.head += to_end;
        }
        let off = (self.head % cap) as usize;
        self.region.write(self.tx_ring + off, hb);
        self.region.write(self.tx_ring + off + HEADER_LEN, payload);
        self.head += rec;
        true
    }

    pub fn push(&mut self, kind: Kind, flags: u8, session: u64, payload: &[u8]) -> bool {
        let h = Header {
            kind,
            flags,
            len: payload.len() as u32,
            session,
        };
        self.push_raw(&h.encode(), payload)
    }

    pub fn publish(&self) {
        self.store(side::TX_HEAD, self.head);
        self.ring();
    }

    /// Publishes as an honest writer does (PROTOCOL.md §5): stores the head, then rings
    /// only if the victim asked for it in `RX_NEED_WAKEUP`. Returns whether it rang.
    pub fn publish_asked(&self) -> bool {
        self.store(side::TX_HEAD, self.head);
        // WAKEUP fence (publisher side), as in Producer::publish: either the victim's
        // re-check after arming sees the new head, or we see its flag.
        crate::shm::sync::fence(Ordering::SeqCst);
        let asked = self
            .region
            .load_u64(self.victim + side::RX_NEED_WAKEUP, Ordering::Relaxed)
            != 0;
        if asked {
            self.ring();
        }
        asked
    }

    /// Reads what the victim sent: learns its Opens, Accepts and Credits.
    pub fn drain(&mut self) {
        self.drain_each(|_| {});
    }

    /// As [`MockPeer::drain`], and gives the header of every frame read but pads, in
    /// ring order: what a test of the victim's sending checks.
    pub fn drain_frames(&mut self) -> Vec<Header> {
        let mut seen = Vec::new();
        self.drain_each(|h| seen.push(*h));
        seen
    }

    fn drain_each(&mut self, mut seen: impl FnMut(&Header)) {
        let cap = self.cap();
        let vh = self.load(self.victim, side::TX_HEAD);
        if vh.wrapping_sub(self.tail) > cap {
            return;
        }
        while self.tail < vh {
            let off = (self.tail % cap) as usize;
            let to_end = (cap - off as u64) as usize;
            let mut hb = [0u8; HEADER_LEN];
            self.region.read(self.rx_ring + off, &mut hb);
            let contiguous = ((vh - self.tail) as usize).min(to_end);
            let Ok(h) = Header::decode(&hb, self.geom.max_payload(), contiguous, to_end) else {
                self.tail = vh;
                break;
            };
            if h.kind == Kind::Pad {
                self.tail += to_end as u64;
                continue;
            }
            seen(&h);
            let mut p = [0u8; 16];
            if h.len == 16 {
                self.region.read(self.rx_ring + off + HEADER_LEN, &mut p);
            }
            match h.kind {
                Kind::Open => {
                    if let Some(a) = OpenArgs::decode(&p) {
                        self.victim_opens.push((h.session, a.buf_alloc));
                    }
                }
                Kind::Accept => {
                    if let (Some(c), Some(s)) =
                        (CreditArgs::decode(&p), self.sessions.get_mut(&h.session))
                    {
                        s.buf_alloc = c.buf_alloc;
                    }
                }
                Kind::Credit => {
                    if let (Some(c), Some(s)) =
                        (CreditArgs::decode(&p), self.sessions.get_mut(&h.session))
                    {
                        s.peer_fwd = c.fwd_cnt;
                        s.buf_alloc = c.buf_alloc;
                    }
                }
                Kind::Close | Kind::Reset | Kind::Refuse => {
                    self.sessions.remove(&h.session);
                }
                _ => {}
            }
            self.tail += record_len(h.len as usize) as u64;
        }
        self.store(side::RX_TAIL, self.tail);
    }

    /// Pattern data on an open session, within the credit the victim granted (or past it).
    pub fn send_data(&mut self, id: u64, n: usize, past_credit: bool, eor: bool) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        let credit = (s.buf_alloc as u64).saturating_sub(s.sent - s.peer_fwd);
        let n = if past_credit {
            (credit as usize + 1 + n).min(self.geom.max_payload())
        } else {
            n.min(credit as usize)
        };
        let sent = s.sent;
        let payload: Vec<u8> = (0..n as u64).map(|i| pattern(id, sent + i)).collect();
        if self.push(Kind::Data, if eor { FLAG_EOR } else { 0 }, id, &payload) {
            self.sessions.get_mut(&id).unwrap().sent += n as u64;
        }
    }
}

pub fn write_header(r: &SharedRegion, g: &Geometry) {
    let w = |off: usize, v: u64| r.store_u64(off, v, Ordering::Relaxed);
    w(
        8,
        VERSION as u64 | (crate::shm::layout::CONTROL_SIZE as u64) << 32,
    );
    w(16, g.region_size);
    w(24, g.h2g_offset);
    w(32, g.capacity);
    w(40, g.g2h_offset);
    w(48, g.capacity);
    r.store_u64(0, MAGIC, Ordering::Release);
}

impl MockPeer {
    /// Writes `bytes` at `off` of the ring this peer writes (taken modulo its capacity),
    /// cut at the ring's end: raw bytes, wherever the fuzz input says.
    pub fn put(&self, off: u64, bytes: &[u8]) {
        let cap = self.cap();
        let off = off % cap;
        let n = (bytes.len() as u64).min(cap - off) as usize;
        self.region.write(self.tx_ring + off as usize, &bytes[..n]);
    }
}

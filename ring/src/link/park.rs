//! Zero-copy parking, a receive mode of the link: a Data frame for a session whose reader
//! takes frames in place stays in the ring (parked) until the reader's view releases it,
//! or is copied out as usual after [`PARK_MAX`]. Also the slot reservation of in-place
//! writes. The API over it is `crate::api::zerocopy`.

use crate::link::{Actions, Link, State};
use crate::wire::frame::{self, Header, Kind, FLAG_EOR, HEADER_LEN};
use crate::wire::ring::Record;
use std::io;
use std::time::{Duration, Instant};

/// How long a frame stays parked in the ring for an in-place reader that is not there to
/// take it before it is copied out as usual (so a slow reader cannot stall the link).
pub const PARK_MAX: Duration = Duration::from_millis(2);

/// A Data frame left in the ring for an in-place reader.
pub(crate) struct Parked {
    id: u64,
    header: Header,
    at: usize,
    since: Instant,
    gen: u64,
    lent: bool,
}

/// What `pump` must do about a parked frame.
pub(crate) enum ParkState {
    /// Nothing parked.
    None,
    /// Parked, its reader has not taken it yet: wait.
    Waiting,
    /// Parked and lent to a view: wait for its release.
    Lent,
    /// Parked too long (or its session went away): copy it out as usual.
    Expired,
}

pub(crate) enum Taken {
    Ring { at: usize, len: usize, eor: bool },
    Owned(Vec<u8>),
    Eof,
}

impl Link {
    pub(crate) fn parked_state(&mut self, now: Instant) -> ParkState {
        let Some(p) = &self.parked else {
            return ParkState::None;
        };
        if p.gen == self.gen && p.lent {
            return ParkState::Lent;
        }
        let wanted = self
            .sessions
            .get(&p.id)
            .is_some_and(|s| s.in_place && s.state == State::Open);
        if p.gen == self.gen && wanted && now.saturating_duration_since(p.since) < PARK_MAX {
            ParkState::Waiting
        } else {
            self.parked = None;
            ParkState::Expired
        }
    }

    /// Leaves `rec` in the ring for an in-place reader if its session has one and nothing
    /// of the session is buffered before it. Returns whether it was parked.
    pub(crate) fn park(&mut self, rec: &Record, now: Instant, out: &mut Actions) -> bool {
        let h = &rec.header;
        if h.kind != Kind::Data || h.len == 0 {
            return false;
        }
        let Some(s) = self.sessions.get(&h.session) else {
            return false;
        };
        let ok = s.in_place
            && s.state == State::Open
            && !s.rx_eof
            && !s.rd_shut
            && s.buffered() == 0
            && s.msgs.is_empty()
            && s.partial == 0
            && s.received == s.fwd_cnt
            && h.len <= s.buf_alloc
            && (!s.message || h.flags & FLAG_EOR != 0);
        if ok {
            out.wake.add(crate::link::stripe_of(h.session));
            self.parked = Some(Parked {
                id: h.session,
                header: *h,
                at: rec.payload_at,
                since: now,
                gen: self.gen,
                lent: false,
            });
        }
        ok
    }

    pub(crate) fn zc_take(&mut self, id: u64, out: &mut Actions) -> io::Result<Option<Taken>> {
        let s = self.session(id)?;
        s.in_place = true;
        if s.rd_shut {
            return Ok(Some(Taken::Eof));
        }
        if s.buffered() > 0 || !s.msgs.is_empty() {
            let n = match s.msgs.front() {
                Some(&m) if s.message => m,
                _ => s.buffered(),
            };
            let mut v = vec![0u8; n];
            let got = self.read(id, &mut v, out)?.unwrap_or(0);
            v.truncate(got);
            return Ok(Some(Taken::Owned(v)));
        }
        let gen = self.gen;
        if let Some(p) = self.parked.as_mut() {
            if p.id == id && p.gen == gen {
                if p.lent {
                    return Err(io::Error::other(
                        "ivring: the previous in-place view was leaked, not dropped",
                    ));
                }
                p.lent = true;
                return Ok(Some(Taken::Ring {
                    at: p.at,
                    len: p.header.len as usize,
                    eor: p.header.flags & FLAG_EOR != 0,
                }));
            }
        }
        let s = self.session(id)?;
        if s.rx_eof {
            return Ok(Some(Taken::Eof));
        }
        self.grow_window(id, out)
            .map_err(|f| self.fault_to_io(f, out))?;
        Ok(None)
    }

    /// Consumes the frame lent to a view of session `id`, credits it, hands the ring space
    /// back. A link reset since the view was made leaves nothing to release.
    pub(crate) fn zc_release(&mut self, id: u64, gen: u64, out: &mut Actions) -> io::Result<()> {
        if gen != self.gen {
            return Ok(());
        }
        let Some(p) = self
            .parked
            .take_if(|p| p.id == id && p.lent && p.gen == gen)
        else {
            return Ok(());
        };
        self.rx.consume(&p.header);
        if self.rx.release() {
            out.ring_peer = true;
        }
        let len = p.header.len as u64;
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(());
        };
        s.received += len;
        s.fwd_cnt += len;
        // Credit is granted in one place for every receive mode (PROTOCOL.md §7).
        self.grant_credit(id, out)
            .map_err(|f| self.fault_to_io(f, out))
    }

    /// Finds ring space for one Data frame of `len` bytes within the session's credit:
    /// the region offset of its payload, or `None` to wait.
    pub(crate) fn zc_reserve(
        &mut self,
        id: u64,
        len: usize,
        out: &mut Actions,
    ) -> io::Result<Option<usize>> {
        let max = self.max_payload;
        let s = self.session(id)?;
        if s.peer_closed || s.wr_shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "ivring: session closed for writing",
            ));
        }
        if len == 0 || len > max || len > s.peer_buf_alloc() as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "ivring: a slot holds 1 to {} bytes (one frame within the peer's buffer), not {len}",
                    max.min(s.peer_buf_alloc() as usize)
                ),
            ));
        }
        if s.credit() < len as u64 {
            return Ok(None);
        }
        if self.has_pending() && !self.flush(out).map_err(|f| self.fault_to_io(f, out))? {
            out.wait_space = true;
            return Ok(None);
        }
        let rec = frame::record_len(len);
        loop {
            match self.tx.reserve(rec) {
                Ok(Some(at)) => return Ok(Some(at + HEADER_LEN)),
                Ok(None) => match self.arm_space(len, out) {
                    Ok(true) => continue,
                    Ok(false) => return Ok(None),
                    Err(f) => return Err(self.fault_to_io(f, out)),
                },
                Err(bad) => {
                    let f = self.index_fault(bad, out);
                    return Err(self.fault_to_io(f, out));
                }
            }
        }
    }

    /// Publishes a slot reserved by `zc_reserve` at `at`, filled with `len` bytes.
    pub(crate) fn zc_commit(
        &mut self,
        id: u64,
        at: usize,
        len: usize,
        eor: bool,
        out: &mut Actions,
    ) {
        let h = Header {
            kind: Kind::Data,
            flags: if eor { FLAG_EOR } else { 0 },
            len: len as u32,
            session: id,
        };
        self.region.write(at - HEADER_LEN, &h.encode());
        self.tx.commit(frame::record_len(len));
        if let Some(s) = self.sessions.get_mut(&id) {
            s.tx_cnt += len as u64;
        }
        self.publish(out);
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, SessionOptions, WaitMode};
    use std::io::Write;

    use std::time::Duration;

    /// A message writer waits for credit for its whole message. Small messages read in
    /// place leave less than a quarter of the buffer uncredited; a large message after
    /// them needs that too, so once the reader holds nothing, everything it consumed
    /// must be credited, as for a copying reader (the message rule of `grant_credit`).
    #[test]
    fn in_place_reads_credit_a_message_writer_in_full() {
        let _watchdog =
            crate::test_watchdog::watchdog("in_place_reads_credit_a_message_writer_in_full", 20);
        let cfg = Config {
            wait: WaitMode::Block,
            buf_size: 64 << 10,
            ..Config::default()
        };
        let (host, guest) = crate::test_watchdog::endpoint_pair(1 << 20, cfg);
        let l = guest.listen(5).unwrap();
        let mut tx = host
            .connect_with(5, SessionOptions { message: true })
            .unwrap();
        tx.set_write_timeout(Some(Duration::from_secs(10)));
        let mut rx = l.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut sizes = Vec::new();
            while let Some(view) = rx.recv_in_place().unwrap() {
                sizes.push(view.len());
            }
            sizes
        });
        let sizes = [5 << 10, 5 << 10, 5 << 10, 60 << 10];
        for &n in &sizes {
            tx.write_all(&vec![7u8; n])
                .unwrap_or_else(|e| panic!("a {n}-byte message: {e}"));
        }
        drop(tx);
        assert_eq!(reader.join().unwrap(), sizes);
    }

    use super::{ParkState, Taken, PARK_MAX};
    use crate::link::tests::{accepted, accepted_with_data, fill, up, victim_in};
    use crate::link::{Actions, Link};
    use crate::shm::layout::Role;
    use crate::wire::frame::{Header, Kind};
    use crate::wire::mock::MockPeer;
    use crate::wire::ring::Record;
    use std::time::Instant;

    /// The peer sends one Data frame of session `id` and the link pumps at `now`.
    fn deliver(l: &mut Link, peer: &mut MockPeer, id: u64, flags: u8, bytes: &[u8], now: Instant) {
        assert!(peer.push(Kind::Data, flags, id, bytes));
        peer.publish();
        l.pump(now, &mut Actions::default()).unwrap();
    }

    /// An up host link with one session whose reader takes frames in place, and a
    /// 100-byte Data frame of it parked by a pump at `t0`.
    fn parked_frame() -> (Link, MockPeer, u64, Instant) {
        let (mut l, mut peer) = victim_in(Role::Host, true, 1 << 20);
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 0);
        let mut out = Actions::default();
        assert!(l.zc_take(id, &mut out).unwrap().is_none(), "nothing yet");
        let t0 = Instant::now();
        deliver(&mut l, &mut peer, id, 0, &[9; 100], t0);
        assert!(l.parked.is_some(), "parked");
        assert_eq!(l.sessions[&id].buffered(), 0, "not copied");
        (l, peer, id, t0)
    }

    /// A parked frame waits for its in-place reader for `PARK_MAX`, then is copied out
    /// as usual by the next pump.
    #[test]
    fn a_parked_frame_waits_for_its_reader_until_park_max() {
        let _w = crate::test_watchdog::watchdog(
            "a_parked_frame_waits_for_its_reader_until_park_max",
            20,
        );
        let (mut l, _peer, id, t0) = parked_frame();
        let just_before = t0 + PARK_MAX - Duration::from_micros(1);
        for now in [t0, just_before] {
            assert!(matches!(l.parked_state(now), ParkState::Waiting));
        }
        l.pump(t0 + PARK_MAX, &mut Actions::default()).unwrap();
        assert!(l.parked.is_none());
        assert_eq!(l.sessions[&id].buffered(), 100, "copied out");

        let (mut l, _peer, _id, t0) = parked_frame();
        assert!(matches!(l.parked_state(t0 + PARK_MAX), ParkState::Expired));
        assert!(l.parked.is_none());
    }

    /// A frame lent to a view stays however long the view lives, until it is released
    /// (and credited); a reset of the link, or a reader that stopped reading in place,
    /// ends the parking at once.
    #[test]
    fn a_lent_frame_stays_until_released_and_a_frame_nobody_wants_expires() {
        let _w = crate::test_watchdog::watchdog(
            "a_lent_frame_stays_until_released_and_a_frame_nobody_wants_expires",
            20,
        );
        let (mut l, _peer, id, t0) = parked_frame();
        let mut out = Actions::default();
        let taken = l.zc_take(id, &mut out).unwrap();
        assert!(matches!(taken, Some(Taken::Ring { len: 100, .. })));
        assert!(matches!(
            l.parked_state(t0 + 10 * PARK_MAX),
            ParkState::Lent
        ));
        l.zc_release(id, l.gen, &mut out).unwrap();
        assert!(matches!(l.parked_state(t0), ParkState::None));
        assert_eq!(l.sessions[&id].fwd_cnt, 100, "consumed and counted");

        let (mut l, _peer, id, t0) = parked_frame();
        l.sessions.get_mut(&id).unwrap().in_place = false;
        assert!(matches!(l.parked_state(t0), ParkState::Expired));

        let (mut l, _peer, id, t0) = parked_frame();
        let taken = l.zc_take(id, &mut out).unwrap();
        assert!(matches!(taken, Some(Taken::Ring { .. })));
        l.reset_all("a test reset", &mut out);
        assert!(
            matches!(l.parked_state(t0), ParkState::Expired | ParkState::None),
            "lent before the reset: nothing to wait for"
        );
    }

    /// Only a Data frame with bytes in it is parked: a control frame, or an empty Data
    /// frame, is dispatched as usual.
    #[test]
    fn only_a_data_frame_with_bytes_parks() {
        let _w = crate::test_watchdog::watchdog("only_a_data_frame_with_bytes_parks", 20);
        let (mut l, _peer, id, t0) = parked_frame();
        let mut out = Actions::default();
        l.parked = None;
        let rec = |kind, len| Record {
            header: Header {
                kind,
                flags: 0,
                len,
                session: id,
            },
            payload_at: 0,
        };
        assert!(!l.park(&rec(Kind::Credit, 16), t0, &mut out));
        assert!(!l.park(&rec(Kind::Data, 0), t0, &mut out));
        assert!(l.parked.is_none());
        assert!(l.park(&rec(Kind::Data, 16), t0, &mut out));
    }

    /// A session the peer opens on `l` (a message session if `message`), accepted, its
    /// reader taking frames in place.
    fn in_place_session(l: &mut Link, peer: &mut MockPeer, seq: u64, message: bool) -> u64 {
        let id = accepted(l, peer, seq, message);
        peer.drain();
        let mut out = Actions::default();
        assert!(l.zc_take(id, &mut out).unwrap().is_none());
        id
    }

    /// A message session's frame is parked only when it ends its message (a view holds
    /// whole messages), and the view says whether the frame ends one.
    #[test]
    fn a_message_fragment_is_not_parked_and_a_view_knows_a_messages_end() {
        let _w = crate::test_watchdog::watchdog(
            "a_message_fragment_is_not_parked_and_a_view_knows_a_messages_end",
            20,
        );
        use crate::wire::frame::FLAG_EOR;
        let (mut l, mut peer) = victim_in(Role::Host, true, 1 << 20);
        up(&mut l, &mut peer);
        let stream = in_place_session(&mut l, &mut peer, 1, false);
        let message = in_place_session(&mut l, &mut peer, 2, true);
        let mut out = Actions::default();
        let now = Instant::now();

        deliver(&mut l, &mut peer, message, 0, &[1; 64], now);
        assert!(l.parked.is_none(), "a fragment is copied");
        deliver(&mut l, &mut peer, message, FLAG_EOR, &[2; 64], now);
        assert!(l.parked.is_none(), "the rest of a copied message is copied");
        let taken = l.zc_take(message, &mut out).unwrap();
        assert!(
            matches!(taken, Some(Taken::Owned(ref v)) if v.len() == 128),
            "whole"
        );

        for (id, flags) in [(message, FLAG_EOR), (stream, 0)] {
            deliver(&mut l, &mut peer, id, flags, &[3; 64], now);
            assert!(l.parked.is_some(), "parked for {id}");
            let taken = l.zc_take(id, &mut out).unwrap();
            let eor = flags != 0;
            assert!(matches!(taken, Some(Taken::Ring { len: 64, eor: e, .. }) if e == eor));
            l.zc_release(id, l.gen, &mut out).unwrap();
            assert!(l.parked.is_none());
        }
    }

    /// A parked frame belongs to its session alone: another session's take does not get
    /// it, and another session's release (or a release before the take) leaves it.
    #[test]
    fn a_parked_frame_is_taken_and_released_by_its_own_session_only() {
        let _w = crate::test_watchdog::watchdog(
            "a_parked_frame_is_taken_and_released_by_its_own_session_only",
            20,
        );
        let (mut l, mut peer) = victim_in(Role::Host, true, 1 << 20);
        up(&mut l, &mut peer);
        let a = in_place_session(&mut l, &mut peer, 1, false);
        let b = in_place_session(&mut l, &mut peer, 2, false);
        let mut out = Actions::default();
        deliver(&mut l, &mut peer, a, 0, &[4; 64], Instant::now());
        assert!(l.parked.is_some());

        l.zc_release(a, l.gen, &mut out).unwrap();
        assert!(l.parked.is_some(), "not lent yet: nothing to release");
        assert!(l.zc_take(b, &mut out).unwrap().is_none(), "not b's");
        assert!(matches!(
            l.zc_take(a, &mut out).unwrap(),
            Some(Taken::Ring { len: 64, .. })
        ));
        l.zc_release(b, l.gen, &mut out).unwrap();
        assert!(l.parked.is_some(), "b releases nothing of a's");
        assert_eq!(l.sessions[&a].fwd_cnt, 0);
        l.zc_release(a, l.gen, &mut out).unwrap();
        assert!(l.parked.is_none());
        assert_eq!(l.sessions[&a].fwd_cnt, 64);
    }

    /// What was copied for a session before its reader took frames in place is handed
    /// over first, as owned bytes.
    #[test]
    fn bytes_copied_before_are_taken_first_as_owned() {
        let _w = crate::test_watchdog::watchdog("bytes_copied_before_are_taken_first_as_owned", 20);
        let (mut l, mut peer) = victim_in(Role::Host, true, 1 << 20);
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 300);
        let mut out = Actions::default();
        let taken = l.zc_take(id, &mut out).unwrap();
        assert!(matches!(taken, Some(Taken::Owned(ref v)) if v == &[7; 300]));
    }

    /// A slot holds 1 byte to one frame's payload, within the peer's buffer; it waits
    /// for credit (and takes all of it); a session closed for writing has none.
    #[test]
    fn a_slot_is_reserved_within_the_frame_the_peers_buffer_and_the_credit() {
        let _w = crate::test_watchdog::watchdog(
            "a_slot_is_reserved_within_the_frame_the_peers_buffer_and_the_credit",
            20,
        );
        use std::io::ErrorKind;
        let (mut l, mut peer) = victim_in(Role::Host, true, 1 << 20);
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 0);
        let max = l.max_payload;
        let mut out = Actions::default();
        let kind = |r: std::io::Result<Option<usize>>| r.map(|_| ()).unwrap_err().kind();
        let at = l
            .zc_reserve(id, max, &mut out)
            .unwrap()
            .expect("a whole frame");
        l.zc_commit(id, at, max, false, &mut out);
        peer.drain();
        for len in [0, max + 1] {
            assert_eq!(
                kind(l.zc_reserve(id, len, &mut out)),
                ErrorKind::InvalidInput
            );
        }

        let s = l.sessions.get_mut(&id).unwrap();
        s.peer_buf_alloc = 100;
        s.peer_fwd_cnt = s.tx_cnt;
        assert_eq!(
            kind(l.zc_reserve(id, 101, &mut out)),
            ErrorKind::InvalidInput
        );
        assert!(
            l.zc_reserve(id, 100, &mut out).unwrap().is_some(),
            "all the credit"
        );
        l.sessions.get_mut(&id).unwrap().peer_fwd_cnt -= 1;
        assert_eq!(
            l.zc_reserve(id, 100, &mut out).unwrap(),
            None,
            "waits for credit"
        );

        l.shutdown_write(id, &mut out).unwrap();
        assert_eq!(kind(l.zc_reserve(id, 10, &mut out)), ErrorKind::BrokenPipe);
        let other = accepted_with_data(&mut l, &mut peer, 2, 0);
        l.sessions.get_mut(&other).unwrap().peer_closed = true;
        assert_eq!(
            kind(l.zc_reserve(other, 10, &mut out)),
            ErrorKind::BrokenPipe
        );
    }

    /// A slot is not reserved ahead of control frames queued for ring space: it waits
    /// for space with them, then sends them first.
    #[test]
    fn a_slot_waits_behind_queued_control_frames_and_sends_them_first() {
        let _w = crate::test_watchdog::watchdog(
            "a_slot_waits_behind_queued_control_frames_and_sends_them_first",
            20,
        );
        use crate::wire::frame::CreditArgs;
        let (mut l, mut peer) = victim_in(Role::Host, true, 64 << 10);
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 0);
        peer.drain();
        fill(&mut l, id);
        let mut out = Actions::default();
        let args = CreditArgs {
            fwd_cnt: 0,
            buf_alloc: 1 << 20,
        };
        l.send_ctrl(Kind::Credit, id, Some(args.encode()), &mut out)
            .unwrap();
        assert!(l.has_pending());
        assert_eq!(l.zc_reserve(id, 64, &mut out).unwrap(), None);
        assert!(out.wait_space);
        peer.drain();
        let at = l.zc_reserve(id, 64, &mut out).unwrap().expect("space");
        assert!(!l.has_pending(), "the queue went first");
        l.zc_commit(id, at, 64, false, &mut out);
        let kinds: Vec<Kind> = peer.drain_frames().iter().map(|h| h.kind).collect();
        assert_eq!(kinds, [Kind::Credit, Kind::Data]);
    }
}

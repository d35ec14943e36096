//! Receiving: the pump that demultiplexes the ring into the sessions, reads (through the
//! session's buffer, or straight from the ring when nothing else is in the way), and the
//! credit this side grants the peer (PROTOCOL.md §7).
//!
//! The direct path: the general one copies every frame twice, `pump` into the session's
//! buffer, then `read` into the caller's. When the session has nothing buffered and the
//! next frames in the ring are its own Data frames that fit the caller's buffer,
//! [`Link::read_direct`] copies them once, straight out of the ring. Anything else
//! (another session's frame, a control frame, a bad header, a frame past the credit) is
//! left for `pump`, which handles it exactly as before, so ordering and error handling do
//! not change. Frames of 1 KiB or more it consumes but lends ([`Lent`]): the runtime
//! copies them out after releasing its lock, and the ring's tail waits for them, not the
//! ring's readers (under [`LEND_TOTAL_MIN`] lent, it copies them itself at once). What
//! it copies under the lock it bounds ([`LOCKED_COPY_MAX`]), so a bulk read holds the
//! lock for bookkeeping, not for its bytes, whatever its frames' size.

use crate::link::{session_in, Actions, Corruption, Fault, Link, Sess, SessionIds, State};
use crate::wire::frame::{self, CreditArgs, Header, Kind, OpenArgs, FLAG_EOR};
use crate::wire::ring::{Consumer, Loan, Record};
use std::collections::HashMap;
use std::io;
use std::time::Instant;

/// Most frames one direct read lends out: a 1 MiB read of 16 KiB frames, or a quarter
/// of one of 4 KiB frames (the rest on the next call).
pub(crate) const LEND_MAX: usize = 64;

/// Frames from this size up are lent when the read lends ([`Lent::new`], the runtime's
/// choice): below it a frame's copy costs about what recording its loan does.
pub(crate) const LEND_FROM: usize = 1 << 10;

/// A direct read that lent less than this copies what it lent itself, under the lock
/// (the size from which a write copies outside it, for the same reason): the runtime's
/// choice for [`Lent::new`].
pub(crate) const LEND_TOTAL_MIN: usize = crate::link::tx::COPY_UNLOCKED_MIN;

/// Most payload bytes a pump copies into the sessions' buffers with the lock held (and
/// one frame at least). Above a direct read's bound: one pump serves many sessions (256
/// sessions' 4 KiB frames, a thread reading each), and each pump call is a pass through
/// the lock.
pub(crate) const PUMP_COPY_MAX: usize = 64 << 10;

/// Most payload bytes a direct read copies with the lock held (frames too small to lend,
/// or past [`LEND_MAX`]): it returns what it has rather than go on. 16 KiB takes about a
/// microsecond; a 1 MiB read of 4 KiB frames used to hold the lock for 50-100 us, and
/// every writer and pump of the endpoint with it.
pub(crate) const LOCKED_COPY_MAX: usize = 16 << 10;

/// The frames a direct read lent out ([`Link::read_direct`]): their payloads go to the
/// read's buffer without the runtime's lock, then the loan is given back with
/// [`Link::give_back`]. The ring reads on meanwhile; only its space waits.
pub(crate) struct Lent {
    /// Frames from this size up are lent.
    from: usize,
    /// Less than this lent in all, the read copies it at once and keeps no loan.
    keep_from: usize,
    loan: Option<Loan>,
    copies: [LentCopy; LEND_MAX],
    len: usize,
}

/// One lent payload: `len` bytes at region offset `at`, for the read's buffer at `to`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LentCopy {
    pub(crate) at: usize,
    pub(crate) len: usize,
    pub(crate) to: usize,
}

impl Lent {
    /// Lends frames of `from` bytes or more, and keeps the loan for the caller once they
    /// add up to `keep_from` bytes ([`LEND_FROM`] and [`LEND_TOTAL_MIN`] are the
    /// runtime's choice; the fuzzer picks its own, to reach both outcomes).
    pub(crate) fn new(from: usize, keep_from: usize) -> Lent {
        Lent {
            from,
            keep_from,
            loan: None,
            copies: [LentCopy::default(); LEND_MAX],
            len: 0,
        }
    }

    /// Payload bytes lent so far.
    fn bytes(&self) -> usize {
        self.copies[..self.len].iter().map(|c| c.len).sum()
    }

    /// The loan to give back and its payloads to copy, if anything was lent (once).
    pub(crate) fn take(&mut self) -> Option<(Loan, &[LentCopy])> {
        let loan = self.loan.take()?;
        let n = std::mem::take(&mut self.len);
        Some((loan, &self.copies[..n]))
    }
}

impl Link {
    /// Reads the published frames into the sessions, up to [`PUMP_COPY_MAX`] bytes of
    /// data (and at least one frame): the rest waits in the ring for the sessions' own
    /// reads (one copy, not two) or the next call. Returns whether anything arrived.
    pub fn pump(&mut self, now: Instant, out: &mut Actions) -> Result<bool, Fault> {
        if !self.up {
            return Ok(false);
        }
        if !self.rx.has_cached() {
            match self.rx.available() {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(bad) => return Err(self.index_fault(bad, out)),
            }
        }
        let quarter = self.geom.capacity / 4;
        // A peer that publishes as fast as we read must not keep us here (holding the
        // link's lock) for ever: after a ring's worth, stop and let the caller come back.
        let mut budget = self.geom.capacity;
        let mut copied = 0;
        let mut may_park = match self.parked_state(now) {
            crate::link::park::ParkState::Lent => return Ok(false),
            crate::link::park::ParkState::Waiting => return Ok(false),
            crate::link::park::ParkState::Expired => false,
            crate::link::park::ParkState::None => true,
        };
        loop {
            let rec = match self.rx.next(self.max_payload) {
                Ok(Some(rec)) => rec,
                Ok(None) if budget == 0 => break,
                Ok(None) => {
                    // Caught up with what we saw; look once more before stopping.
                    match self.rx.available() {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(bad) => return Err(self.index_fault(bad, out)),
                    }
                }
                Err(e) => return Err(self.corrupt(Corruption::Record(e))),
            };
            if std::mem::replace(&mut may_park, true) && self.park(&rec, now, out) {
                break;
            }
            self.dispatch(&rec.header, rec.payload_at, out)?;
            self.rx.consume(&rec.header);
            budget = budget.saturating_sub(frame::record_len(rec.header.len as usize) as u64);
            if self.rx.unreleased() >= quarter && self.rx.release() {
                out.ring_peer = true;
            }
            // The copies are what holds the lock: a 1 MiB batch of 4 KiB frames held every
            // writer of the endpoint for 50-100 us.
            copied += rec.header.len as usize;
            if copied >= PUMP_COPY_MAX {
                break;
            }
        }
        if self.rx.release() {
            out.ring_peer = true;
        }
        self.flush(out)?;
        Ok(true)
    }

    fn dispatch(&mut self, h: &Header, payload_at: usize, out: &mut Actions) -> Result<(), Fault> {
        out.wake.add(crate::link::stripe_of(h.session));
        self.dispatch_frame(h, payload_at, out)?;
        if let Some(s) = self.sessions.get_mut(&h.session) {
            if let Some(n) = &s.notify {
                out.awaited_callback |= std::mem::take(&mut s.awaited);
                n();
            }
        }
        Ok(())
    }

    fn dispatch_frame(
        &mut self,
        h: &Header,
        payload_at: usize,
        out: &mut Actions,
    ) -> Result<(), Fault> {
        let peer_bit = self.role.id_bit() ^ 1;
        match h.kind {
            Kind::Pad => unreachable!("consumed by Consumer::next"),
            Kind::Data => {
                let len = h.len as usize;
                let Some(s) = self.sessions.get_mut(&h.session) else {
                    self.stats.frames_dropped += 1;
                    return Ok(());
                };
                if s.state != State::Open || s.rx_eof {
                    self.stats.frames_dropped += 1;
                    return Ok(());
                }
                let held = s.received - s.fwd_cnt;
                if held + len as u64 > s.buf_alloc as u64 {
                    let id = h.session;
                    self.reset_session(id, "peer sent past its credit", out)?;
                    return Ok(());
                }
                // Empty messages take no credit, so credit alone does not bound the
                // queue of message lengths: allow as many as one-byte messages could
                // fill (what an honest peer can already make us hold), no more.
                let ends_message = s.message && h.flags & FLAG_EOR != 0 && !s.rd_shut;
                if ends_message && s.msgs.len() >= (s.buf_alloc as usize).max(1) {
                    let id = h.session;
                    self.reset_session(id, "peer queued more messages than its credit", out)?;
                    return Ok(());
                }
                s.received += len as u64;
                if s.rd_shut {
                    // Dropped unread, but credited so the peer is not stalled.
                    s.fwd_cnt += len as u64;
                    self.grant_credit(h.session, out)?;
                } else {
                    self.rx.append_payload(payload_at, len, &mut s.rx);
                    if s.message {
                        s.partial += len;
                        if h.flags & FLAG_EOR != 0 {
                            s.msgs.push_back(s.partial);
                            s.partial = 0;
                        }
                    }
                }
            }
            Kind::Open => {
                let mut p = [0u8; 16];
                self.rx.read_payload(payload_at, &mut p);
                let args = OpenArgs::decode(&p);
                let seq = h.session >> 1;
                if args.is_none() || h.session & 1 != peer_bit || seq <= self.highest_peer_seq {
                    self.stats.frames_dropped += 1;
                    return Ok(());
                }
                let args = args.unwrap_or(OpenArgs {
                    port: 0,
                    message: false,
                    buf_alloc: 0,
                });
                self.highest_peer_seq = seq;
                let fits = self.sessions.len() < self.cfg.max_sessions;
                let backlog = self.cfg.backlog;
                match self.listeners.get_mut(&args.port) {
                    Some(l) if fits && l.backlog.len() < backlog => {
                        l.backlog.push_back(h.session);
                        if let Some(n) = &l.notify {
                            n();
                        }
                        let mut s = self.new_session(args.message, State::Open);
                        s.peer_buf_alloc = args.buf_alloc;
                        self.sessions.insert(h.session, s);
                        let accept = CreditArgs {
                            fwd_cnt: 0,
                            buf_alloc: self.cfg.buf_size,
                        };
                        self.send_ctrl(Kind::Accept, h.session, Some(accept.encode()), out)?;
                    }
                    _ => {
                        self.stats.opens_refused += 1;
                        self.send_ctrl(Kind::Refuse, h.session, None, out)?;
                    }
                }
            }
            Kind::Accept | Kind::Credit => {
                let mut p = [0u8; 16];
                self.rx.read_payload(payload_at, &mut p);
                let Some(s) = self.sessions.get_mut(&h.session) else {
                    self.stats.frames_dropped += 1;
                    return Ok(());
                };
                let Some(c) = CreditArgs::decode(&p) else {
                    self.reset_session(h.session, "peer sent a malformed credit", out)?;
                    return Ok(());
                };
                match (h.kind, &s.state) {
                    (Kind::Accept, State::Connecting) if c.fwd_cnt == 0 => {
                        s.state = State::Open;
                        s.peer_buf_alloc = c.buf_alloc;
                    }
                    (Kind::Credit, State::Open)
                        if c.fwd_cnt >= s.peer_fwd_cnt && c.fwd_cnt <= s.tx_cnt =>
                    {
                        s.peer_fwd_cnt = c.fwd_cnt;
                        s.peer_buf_alloc = c.buf_alloc;
                    }
                    (_, State::Reset(_)) => self.stats.frames_dropped += 1,
                    _ => self.reset_session(h.session, "peer broke the credit protocol", out)?,
                }
            }
            Kind::Refuse => match self.sessions.get_mut(&h.session) {
                Some(s) if s.state == State::Connecting => s.state = State::Refused,
                _ => self.stats.frames_dropped += 1,
            },
            Kind::Shutdown | Kind::Close => match self.sessions.get_mut(&h.session) {
                Some(s) if s.state == State::Open => {
                    s.rx_eof = true;
                    if h.kind == Kind::Close {
                        s.peer_closed = true;
                    }
                }
                _ => self.stats.frames_dropped += 1,
            },
            Kind::Reset => match self.sessions.get_mut(&h.session) {
                Some(s) if matches!(s.state, State::Open | State::Connecting) => {
                    s.state = State::Reset("peer reset the session".into());
                    self.stats.session_resets += 1;
                }
                _ => self.stats.frames_dropped += 1,
            },
        }
        Ok(())
    }

    /// Resets one session for a protocol violation; the link and other sessions go on.
    ///
    /// A full ring queues the Reset; a broken one is the link's fault, returned: the ring
    /// may have been reset under the caller (a pump must stop reading at once).
    pub fn reset_session(&mut self, id: u64, why: &str, out: &mut Actions) -> Result<(), Fault> {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.state = State::Reset(why.to_string());
            s.rx.clear();
            s.rx_pos = 0;
            s.msgs.clear();
            self.stats.session_resets += 1;
            self.send_ctrl(Kind::Reset, id, None, out)?;
        }
        Ok(())
    }

    /// Arms the need-wakeup flag (not when we poll: we promised never to) and re-checks
    /// the peer's head: `Ok(true)` if data is already there.
    pub fn arm_wakeup(&mut self, out: &mut Actions) -> Result<bool, Fault> {
        if !self.up {
            return Ok(false);
        }
        let post = !self.polls();
        self.rx
            .arm_wakeup(post)
            .map_err(|bad| self.index_fault(bad, out))
    }

    pub fn disarm_wakeup(&mut self) {
        self.rx.disarm_wakeup();
    }

    /// Reads from a session: `Ok(Some(n))` when the read completes, `Ok(None)` to wait.
    pub fn read(
        &mut self,
        id: u64,
        buf: &mut [u8],
        out: &mut Actions,
    ) -> io::Result<Option<usize>> {
        let s = self.session(id)?;
        if s.rd_shut {
            return Ok(Some(0));
        }
        if !s.readable() {
            self.grow_window(id, out)
                .map_err(|f| self.fault_to_io(f, out))?;
            return Ok(None);
        }
        let (n, consumed) = s.take(buf);
        s.fwd_cnt += consumed as u64;
        if credit_due(s) {
            self.grant_credit(id, out)
                .map_err(|f| self.fault_to_io(f, out))?;
        }
        Ok(Some(n))
    }

    /// Called when session `id`'s reader runs dry. Doubles its receive buffer (up to
    /// `max_buf_size`, within the link's growth budget) when the reader consumed nearly a
    /// whole buffer since it last ran dry (the peer, not the reader, was held back), and
    /// tells the peer at once (PROTOCOL.md §7).
    pub(crate) fn grow_window(&mut self, id: u64, out: &mut Actions) -> Result<(), Fault> {
        let base = self.cfg.buf_size;
        let max = self.cfg.max_buf_size.max(base);
        let Some(s) = self.sessions.get(&id) else {
            return Ok(());
        };
        // Message sessions keep theirs: it is also the largest message the peer may send.
        if s.message || s.buf_alloc >= max || s.state != State::Open || s.rx_eof {
            return Ok(());
        }
        // A reader that never sleeps (it spins, or the peer is always ahead) gains nothing
        // from a larger buffer, and a buffer larger than the caches loses.
        let consumed = s.fwd_cnt - s.fwd_at_dry;
        let granted = s.buf_alloc as u64;
        if !s.slept || consumed + granted / 8 < granted {
            if let Some(s) = self.sessions.get_mut(&id) {
                if s.fwd_cnt != s.fwd_at_dry {
                    s.fwd_at_dry = s.fwd_cnt;
                    s.slept = false;
                }
            }
            return Ok(());
        }
        // At most once per buffer read by a reader that sleeps: summed, not kept. Each
        // open stream session may take an equal share of the budget: among many sessions
        // the first readers to qualify would otherwise take all of it, and their writers
        // (moving a larger window per wakeup) most of the link.
        let budget = 4 * max as u64;
        let (grown, streams) = self.sessions.values().fold((0u64, 0u64), |(g, n), s| {
            let stream = !s.message && s.state == State::Open;
            (
                g + s.buf_alloc.saturating_sub(base) as u64,
                n + u64::from(stream),
            )
        });
        let share = budget / streams.max(1);
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(());
        };
        s.fwd_at_dry = s.fwd_cnt;
        s.slept = false;
        let room = budget.saturating_sub(grown).min(u32::MAX as u64) as u32;
        let fair = (base as u64 + share).min(u32::MAX as u64) as u32;
        let want = s.buf_alloc.saturating_mul(2).min(max).min(fair);
        let new = want.min(s.buf_alloc.saturating_add(room));
        if new <= s.buf_alloc {
            return Ok(());
        }
        s.buf_alloc = new;
        s.fwd_sent = s.fwd_cnt;
        let c = CreditArgs {
            fwd_cnt: s.fwd_cnt,
            buf_alloc: new,
        };
        self.send_ctrl(Kind::Credit, id, Some(c.encode()), out)
    }

    /// Sends the peer a Credit for session `id` when one is due (PROTOCOL.md §7).
    pub(crate) fn grant_credit(&mut self, id: u64, out: &mut Actions) -> Result<(), Fault> {
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(());
        };
        if !credit_due(s) {
            return Ok(());
        }
        s.fwd_sent = s.fwd_cnt;
        let c = CreditArgs {
            fwd_cnt: s.fwd_cnt,
            buf_alloc: s.buf_alloc,
        };
        self.send_ctrl(Kind::Credit, id, Some(c.encode()), out)
    }

    /// Reads from a session in [`Link::ended`]: its remaining data, then `Some(0)`.
    /// `None` when there is no such session (it was reset).
    pub fn read_ended(&mut self, gen: u64, id: u64, buf: &mut [u8]) -> Option<usize> {
        let s = self.ended.get_mut(&(gen, id))?;
        if s.rd_shut {
            return Some(0);
        }
        Some(s.take(buf).0)
    }

    /// The next Data of any of the sessions `ids`, in ring order (as `recvmsg` on an
    /// unconnected socket), and with `max` above one the frames after it (as `recvmmsg`):
    /// results go to `got` as (index in `ids`, what a read of that session returned), the
    /// bytes of each `Ok(n)` next in `buf`, after those of the results before it. Empty
    /// `got`: wait.
    ///
    /// The ring's next frames are read in order; a frame of one of `ids` that fits what is
    /// left of `buf` is copied once, straight out of the ring; frames of other sessions
    /// and control frames go to their sessions as `pump` sends them. A frame of one of
    /// `ids` that the direct copy cannot take (it does not fit, it ends the session, the
    /// session holds earlier data) ends a batch that has results, unread; as the first,
    /// it goes to its session and that session is read at once. What sessions held
    /// before the call (a pump of the keeper or of a spinning caller put it there) is read
    /// when the ring has nothing more for them, starting one session further each time so
    /// that none is served last for ever. A bad header or index is left for `pump`, as in
    /// `read_direct`.
    pub(crate) fn read_any(
        &mut self,
        ids: &[u64],
        buf: &mut [u8],
        max: usize,
        got: &mut Vec<(usize, io::Result<usize>)>,
        out: &mut Actions,
    ) {
        got.clear();
        let cache = self.set_cache.take();
        let mut index = SetIndex::new(ids, self.sessions.hasher().clone(), cache);
        let used = self.read_any_ring(&mut index, buf, max, got, out);
        self.set_cache = index.into_cache();
        if got.is_empty() {
            self.read_any_held(ids, &mut buf[used..], max, got, out);
        }
    }

    /// The ring's next record, if one is published and sound: the direct paths' look at
    /// the ring. A bad index or header is left for `pump`, which acts on it.
    fn next_published(&mut self) -> Option<Record> {
        next_published_in(&mut self.rx, self.max_payload)
    }

    /// The ring half of [`Link::read_any`]: the bytes of `buf` its results took.
    fn read_any_ring(
        &mut self,
        ids: &mut SetIndex<'_>,
        buf: &mut [u8],
        max: usize,
        got: &mut Vec<(usize, io::Result<usize>)>,
        out: &mut Actions,
    ) -> usize {
        if !self.up || self.parked.is_some() || buf.is_empty() {
            return 0;
        }
        let quarter = self.geom.capacity / 4;
        let max_payload = self.max_payload;
        let mut budget = self.geom.capacity;
        let mut used = 0;
        while budget > 0 && got.len() < max && used < buf.len() {
            let Some(rec) = self.next_published() else {
                break;
            };
            let h = rec.header;
            let len = h.len as usize;
            let at = ids.position(h.session);
            let direct = match (h.kind, at, self.sessions.get(&h.session)) {
                (Kind::Data, Some(_), Some(s)) => {
                    len > 0
                        && len <= buf.len() - used
                        // A message whole in one frame, with none held before it.
                        && (!s.message || (h.flags & FLAG_EOR != 0 && s.msgs.is_empty()))
                        && !s.rd_shut
                        && !s.in_place
                        && s.state == State::Open
                        && !s.rx_eof
                        && s.buffered() == 0
                        && s.received - s.fwd_cnt + len as u64 <= s.buf_alloc as u64
                }
                _ => false,
            };
            if let (true, Some(i)) = (direct, at) {
                self.rx
                    .read_payload(rec.payload_at, &mut buf[used..used + len]);
                self.rx.consume(&h);
                let mut credit_waits = false;
                if let Some(s) = self.sessions.get_mut(&h.session) {
                    s.received += len as u64;
                    s.fwd_cnt += len as u64;
                    credit_waits = credit_waits_for_next(s, &mut self.rx, max_payload, h.session);
                }
                used += len;
                let granted = if credit_waits {
                    Ok(())
                } else {
                    self.grant_credit(h.session, out)
                };
                match granted {
                    Ok(()) => got.push((i, Ok(len))),
                    Err(f) => {
                        got.push((i, Err(self.fault_to_io(f, out))));
                        break;
                    }
                }
            } else if at.is_some() && !got.is_empty() {
                // It changes a session of the set: the next call starts with it.
                break;
            } else {
                // As pump: the frame goes to its session (or changes its state).
                let dispatched = self.dispatch(&h, rec.payload_at, out);
                // Consumed either way: a frame is never acted on twice.
                self.rx.consume(&h);
                if let Err(f) = dispatched {
                    // A bad index of the peer (met sending a control frame): the link
                    // resets now, and every caller wakes to its error.
                    let e = self.fault_to_io(f, out);
                    if let Some(i) = at {
                        got.push((i, Err(e)));
                    }
                    break;
                }
                if let Some(i) = at {
                    let id = h.session;
                    if let Some(r) = self.read_held(id, &mut buf[used..], out) {
                        got.push((i, r));
                        break;
                    }
                }
            }
            budget = budget.saturating_sub(frame::record_len(len) as u64);
            if self.rx.unreleased() >= quarter && self.rx.release() {
                out.ring_peer = true;
            }
        }
        if self.rx.release() {
            out.ring_peer = true;
        }
        used
    }

    /// Session `id`'s read if it would not wait.
    fn read_held(
        &mut self,
        id: u64,
        buf: &mut [u8],
        out: &mut Actions,
    ) -> Option<io::Result<usize>> {
        match self.session(id) {
            Err(e) => Some(Err(e)),
            Ok(s) if s.readable() => match self.read(id, buf, out) {
                Ok(Some(n)) => Some(Ok(n)),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            },
            Ok(_) => None,
        }
    }

    /// What sessions of `ids` held before the call, from the session after the one served
    /// first last time: the first that a read would not wait for, and with `max` above
    /// one the stream data of those after it, while `buf` has room.
    fn read_any_held(
        &mut self,
        ids: &[u64],
        buf: &mut [u8],
        max: usize,
        got: &mut Vec<(usize, io::Result<usize>)>,
        out: &mut Actions,
    ) {
        let n = ids.len();
        let from = self.held_turn % n.max(1);
        let mut used = 0;
        for i in (from..n).chain(0..from) {
            if got.len() >= max || used >= buf.len() {
                break;
            }
            let id = ids[i];
            if !got.is_empty() {
                // After the first, only stream data that is there: a message could be cut
                // by what is left of `buf`, and an end or error is the next call's.
                match self.sessions.get(&id) {
                    Some(s) if !s.message && s.buffered() > 0 && !s.rd_shut => {}
                    _ => continue,
                }
            }
            if let Some(r) = self.read_held(id, &mut buf[used..], out) {
                if got.is_empty() {
                    self.held_turn = i + 1;
                }
                let last = !matches!(r, Ok(k) if k > 0);
                if let Ok(k) = r {
                    used += k;
                }
                got.push((i, r));
                if last {
                    break;
                }
            }
        }
    }

    /// Reads this session's next frames straight from the ring (a message session's next
    /// message, when one frame carries it whole). `Ok(None)` when the general path must
    /// handle the read. Given `lent`, large frames (up to
    /// [`LEND_MAX`]) are consumed but lent instead of copied: the caller copies them out
    /// without the runtime's lock, as a large write copies in. The count covers them.
    /// Past [`LOCKED_COPY_MAX`] bytes copied here it stops: a short read, as a socket's.
    pub(crate) fn read_direct(
        &mut self,
        id: u64,
        buf: &mut [u8],
        mut lent: Option<&mut Lent>,
        out: &mut Actions,
    ) -> io::Result<Option<usize>> {
        if !self.up || self.parked.is_some() || buf.is_empty() {
            return Ok(None);
        }
        let quarter = self.geom.capacity / 4;
        let max_payload = self.max_payload;
        // One lookup for the whole call: the ring and the session map are borrowed apart.
        let mut s = session_in(&mut self.sessions, id)?;
        if s.message {
            // A message reader returns credit after each message (PROTOCOL.md §7), so an
            // exchange of messages alternates the peer's credit and its data: the credit
            // is taken here as the pump takes it, and the data behind it read directly.
            // (A stream's credit comes once a quarter buffer: the pump's.)
            while let Some(rec) = next_published_in(&mut self.rx, max_payload) {
                if rec.header.kind != Kind::Credit || rec.header.session != id {
                    break;
                }
                self.dispatch(&rec.header, rec.payload_at, out)
                    .map_err(|f| self.fault_to_io(f, out))?;
                self.rx.consume(&rec.header);
            }
            s = session_in(&mut self.sessions, id)?;
        }
        if s.rd_shut || s.in_place || s.state != State::Open || s.rx_eof {
            return Ok(None);
        }
        // Anything the pump buffered goes first (an empty message buffers no byte).
        if s.buffered() > 0 || !s.msgs.is_empty() {
            return Ok(None);
        }
        let message = s.message;
        let mut n = 0;
        let mut copied = 0;
        while let Some(rec) = next_published_in(&mut self.rx, max_payload) {
            let h = rec.header;
            let len = h.len as usize;
            if h.kind != Kind::Data || h.session != id || len == 0 || len > buf.len() - n {
                break;
            }
            // A message session's read is one whole message: a frame that ends one, alone
            // (a message of several frames is assembled by the pump).
            if message && h.flags & FLAG_EOR == 0 {
                break;
            }
            if s.received - s.fwd_cnt + len as u64 > s.buf_alloc as u64 {
                break; // past its credit: pump resets the session
            }
            if let Some(lent) = lent
                .as_deref_mut()
                .filter(|l| len >= l.from && l.len < LEND_MAX)
            {
                let loan = lent.loan.get_or_insert_with(|| self.rx.new_loan());
                self.rx.lend(&h, loan);
                lent.copies[lent.len] = LentCopy {
                    at: rec.payload_at,
                    len,
                    to: n,
                };
                lent.len += 1;
            } else {
                if n > 0 && copied + len > LOCKED_COPY_MAX {
                    break;
                }
                self.rx.read_payload(rec.payload_at, &mut buf[n..n + len]);
                self.rx.consume(&h);
                copied += len;
            }
            s.received += len as u64;
            s.fwd_cnt += len as u64;
            n += len;
            if self.rx.unreleased() >= quarter && self.rx.release() {
                out.ring_peer = true;
            }
            if message || n == buf.len() {
                // One message per read; or full: no frame could join (each has a byte at
                // least), and looking would load the peer's head again, a line its writer
                // may be storing to.
                break;
            }
        }
        if n == 0 {
            return Ok(None);
        }
        if let Some(lent) = lent.filter(|l| l.loan.is_some() && l.bytes() < l.keep_from) {
            // Too little lent to pay for the caller's second pass through the lock (with
            // many threads queued on it, a pass is a hand-off): copied now, given back.
            if let Some((loan, copies)) = lent.take() {
                for c in copies {
                    self.rx.read_payload(c.at, &mut buf[c.to..c.to + c.len]);
                }
                self.rx.give_back(loan);
            }
        }
        let due = credit_due(s) && !credit_waits_for_next(s, &mut self.rx, max_payload, id);
        if self.rx.release() {
            out.ring_peer = true;
        }
        if due {
            self.grant_credit(id, out)
                .map_err(|f| self.fault_to_io(f, out))?;
        }
        Ok(Some(n))
    }

    /// The payloads a direct read lent are copied out: the ring's space behind them goes
    /// back to the peer once no loan is left.
    pub(crate) fn give_back(&mut self, loan: Loan, out: &mut Actions) {
        if self.rx.give_back(loan) && self.rx.release() {
            out.ring_peer = true;
        }
    }

    /// How far the ring has been read (it starts again at zero when the peer restarts).
    pub(crate) fn rx_position(&self) -> u64 {
        self.rx.position()
    }

    /// Whether frames arrived that nobody has looked at yet: a spinning caller retries its
    /// own attempt first (which may take them directly) and pumps only what it left.
    pub(crate) fn rx_moved(&mut self) -> bool {
        if !self.up || self.rx.has_cached() {
            return false;
        }
        matches!(self.rx.available(), Ok(n) if n > 0)
    }

    /// Reads and credits buffered data without waiting (used by shutdown(Read)).
    pub fn read_discard(
        &mut self,
        id: u64,
        buf: &mut [u8],
        out: &mut Actions,
    ) -> io::Result<Option<usize>> {
        let s = self.session(id)?;
        if s.buffered() == 0 && s.msgs.is_empty() {
            return Ok(None);
        }
        let was = s.rd_shut;
        s.rd_shut = false;
        let r = self.read(id, buf, out);
        if let Ok(s) = self.session(id) {
            s.rd_shut = was;
        }
        r
    }
}

/// [`Link::next_published`] on the ring alone, so that a session can be borrowed beside it.
fn next_published_in(rx: &mut Consumer, max_payload: usize) -> Option<Record> {
    if !rx.has_cached() && !matches!(rx.available(), Ok(n) if n > 0) {
        return None;
    }
    rx.next(max_payload).ok().flatten()
}

/// Whether session `s` owes its peer a Credit (PROTOCOL.md §7): once a quarter of its
/// buffer has been consumed since the last one. That is enough to never stall the peer:
/// if it is out of credit, everything it sent since our last grant (a whole buffer) is
/// consumed by the time our buffer is empty. A message writer waits for credit for its
/// whole message (up to our whole buffer), so once we hold nothing, everything consumed
/// is reported: otherwise up to a quarter of the buffer stays uncredited and a large
/// message never goes.
fn credit_due(s: &Sess) -> bool {
    let due = quarter_consumed(s) || (s.message && s.buffered() == 0 && s.fwd_cnt != s.fwd_sent);
    due && s.state == State::Open && !s.rx_eof
}

/// Whether session `s` (`id`), read straight from the ring, leaves the Credit it owes to
/// its next read: a message session's credit for an empty buffer waits while its next
/// message is next in the ring, and the read that takes the last of a run sends it (one
/// Credit for a run, as when the pump's buffer held them all), unless a quarter of the
/// buffer is consumed.
fn credit_waits_for_next(s: &Sess, rx: &mut Consumer, max_payload: usize, id: u64) -> bool {
    s.message
        && !quarter_consumed(s)
        && next_published_in(rx, max_payload)
            .is_some_and(|r| r.header.kind == Kind::Data && r.header.session == id)
}

/// Whether a quarter of session `s`'s buffer has been consumed since its last Credit.
fn quarter_consumed(s: &Sess) -> bool {
    s.fwd_cnt - s.fwd_sent >= (s.buf_alloc / 4).max(1) as u64
}

/// Where a session id stands in the set a `read_any` call was given: a scan when the set
/// is small; else a map, built at the second lookup of a call (a batch looks up every
/// frame) and kept for the next call given the same set.
struct SetIndex<'a> {
    ids: &'a [u64],
    looked: bool,
    hasher: SessionIds,
    /// The last call's map, and whether it is this set's (compared once, when needed).
    cache: Option<SetCache>,
    cache_fits: Option<bool>,
}

/// A set of session ids and the place of each in it (an id given twice: its first).
pub(super) struct SetCache {
    ids: Vec<u64>,
    map: HashMap<u64, usize, SessionIds>,
}

impl<'a> SetIndex<'a> {
    /// Sets up to this size are scanned: a map costs more to build than it saves.
    const SCAN_MAX: usize = 16;

    fn new(ids: &'a [u64], hasher: SessionIds, cache: Option<SetCache>) -> Self {
        SetIndex {
            ids,
            looked: false,
            hasher,
            cache,
            cache_fits: None,
        }
    }

    fn position(&mut self, id: u64) -> Option<usize> {
        if self.ids.len() <= Self::SCAN_MAX {
            return self.ids.iter().position(|&x| x == id);
        }
        let ids = self.ids;
        let fits = *self
            .cache_fits
            .get_or_insert_with(|| self.cache.as_ref().is_some_and(|c| c.ids == ids));
        if !fits && !std::mem::replace(&mut self.looked, true) {
            return ids.iter().position(|&x| x == id);
        }
        if !fits {
            let mut map = HashMap::with_capacity_and_hasher(ids.len(), self.hasher.clone());
            // Inserted last to first: an id given twice maps to its first place, as the scan.
            map.extend(ids.iter().enumerate().rev().map(|(i, &x)| (x, i)));
            self.cache = Some(SetCache {
                ids: ids.to_vec(),
                map,
            });
            self.cache_fits = Some(true);
        }
        self.cache.as_ref().and_then(|c| c.map.get(&id).copied())
    }

    /// The map to keep for the next call: this call's, or the one it was given.
    fn into_cache(self) -> Option<SetCache> {
        self.cache
    }
}

#[cfg(test)]
mod window_tests {
    use crate::{Config, Endpoint, Session, WaitMode};
    use std::io::{Read, Write};

    use std::time::Duration;

    fn pair(cfg: Config) -> (Endpoint, Endpoint) {
        let (host, guest) = crate::test_watchdog::endpoint_pair(4 << 20, cfg);
        assert!(host.wait_up(Duration::from_secs(60)));
        (host, guest)
    }

    /// Blocking sessions with 8 KiB buffers growing to 64 KiB: a growth budget of 256 KiB.
    fn small_buffers() -> Config {
        Config {
            wait: WaitMode::Block,
            buf_size: 8 << 10,
            max_buf_size: 64 << 10,
            ..Config::default()
        }
    }

    /// (our buffer for the session, the peer's view of it).
    fn windows(rx_ep: &Endpoint, rx: &Session, tx_ep: &Endpoint, tx: &Session) -> (u32, u32) {
        let ours = rx_ep.shared().lock().sessions[&rx.id()].buf_alloc;
        let theirs = tx_ep.shared().lock().sessions[&tx.id()].peer_buf_alloc;
        (ours, theirs)
    }

    /// Streams `total` bytes host -> guest to a reader that keeps up but wakes late: it
    /// waits for data (runs dry and sleeps), then pauses as a descheduled thread would
    /// while the writer fills its buffer, then reads all of it, and waits again. (A reader
    /// that always wakes at once never holds the writer back, and its buffer need not
    /// grow: how often that happens depends on the machine.)
    fn stream(host: &Endpoint, guest: &Endpoint, port: u32, total: usize) -> (u32, u32) {
        let l = guest.listen(port).unwrap();
        let mut tx = host.connect(port).unwrap();
        let mut rx = l.accept().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![3u8; 64 << 10];
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk.len());
                tx.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
            tx
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < total {
            rx.set_nonblocking(false);
            let n = rx.read(&mut buf).unwrap();
            assert!(n > 0 && buf[..n].iter().all(|&b| b == 3));
            got += n;
            std::thread::sleep(Duration::from_millis(5));
            rx.set_nonblocking(true);
            loop {
                match rx.read(&mut buf) {
                    Ok(n) => {
                        assert!(n > 0 && buf[..n].iter().all(|&b| b == 3));
                        got += n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
        let tx = writer.join().unwrap();
        // The last Credit frame is in flight until the writer's side reads it.
        let mut w = windows(guest, &rx, host, &tx);
        for _ in 0..1000 {
            if w.0 == w.1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            w = windows(guest, &rx, host, &tx);
        }
        let _ = tx.shutdown(std::net::Shutdown::Both);
        drop((tx, rx));
        w
    }

    #[test]
    fn buffer_grows_for_a_reader_that_keeps_up_and_the_peer_learns_it() {
        let _watchdog = crate::test_watchdog::watchdog(
            "buffer_grows_for_a_reader_that_keeps_up_and_the_peer_learns_it",
            20,
        );
        let cfg = Config {
            wait: WaitMode::Block,
            ..Config::default()
        };
        let (host, guest) = pair(cfg.clone());
        let (ours, theirs) = stream(&host, &guest, 1, 64 << 20);
        assert!(ours > cfg.buf_size, "buffer never grew: {ours}");
        assert!(ours <= cfg.max_buf_size, "grew past the limit: {ours}");
        assert_eq!(theirs, ours, "the peer was not told");
    }

    #[test]
    fn buffer_stays_for_a_reader_that_falls_behind() {
        let _watchdog =
            crate::test_watchdog::watchdog("buffer_stays_for_a_reader_that_falls_behind", 20);
        let cfg = Config {
            wait: WaitMode::Block,
            buf_size: 64 << 10,
            ..Config::default()
        };
        let (host, guest) = pair(cfg.clone());
        let l = guest.listen(2).unwrap();
        let mut tx = host.connect(2).unwrap();
        let mut rx = l.accept().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![5u8; 16 << 10];
            for _ in 0..64 {
                tx.write_all(&chunk).unwrap();
            }
        });
        let mut buf = vec![0u8; 4096];
        // The writer is always ahead: the buffer is never empty when the reader comes.
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..64 {
            rx.read_exact(&mut buf).unwrap();
            std::thread::sleep(Duration::from_micros(300));
        }
        let ours = guest.shared().lock().sessions[&rx.id()].buf_alloc;
        assert_eq!(ours, cfg.buf_size, "a slow reader's buffer grew");
        let mut rest = Vec::new();
        rx.read_to_end(&mut rest).unwrap();
        writer.join().unwrap();
        assert_eq!(rest.len() + 64 * 4096, 64 * (16 << 10));
    }

    /// Among many open sessions one busy reader's buffer grows by at most its equal share
    /// of the link's growth budget (4 x max_buf_size), not by all of it.
    #[test]
    fn one_of_many_sessions_grows_by_its_share_only() {
        let _watchdog =
            crate::test_watchdog::watchdog("one_of_many_sessions_grows_by_its_share_only", 20);
        let cfg = small_buffers();
        let (host, guest) = pair(cfg.clone());
        let l = guest.listen(7).unwrap();
        // 15 idle sessions and the busy one: a share of 256 KiB / 16 = 16 KiB of growth.
        let idle: Vec<_> = (0..15)
            .map(|_| (host.connect(7).unwrap(), l.accept().unwrap()))
            .collect();
        let (ours, theirs) = stream(&host, &guest, 1, 2 << 20);
        assert!(ours > cfg.buf_size, "buffer never grew: {ours}");
        assert!(ours <= (8 + 16) << 10, "grew past its share: {ours}");
        assert_eq!(theirs, ours, "the peer was not told");
        drop(idle);
    }

    #[test]
    fn growth_of_all_sessions_stays_within_the_link_budget() {
        let _watchdog = crate::test_watchdog::watchdog(
            "growth_of_all_sessions_stays_within_the_link_budget",
            20,
        );
        let cfg = small_buffers();
        let (host, guest) = pair(cfg.clone());
        let l = guest.listen(3).unwrap();
        let mut kept = Vec::new();
        for _ in 0..12 {
            let mut tx = host.connect(3).unwrap();
            let mut rx = l.accept().unwrap();
            let writer = std::thread::spawn(move || {
                let chunk = vec![9u8; 8 << 10];
                for _ in 0..256 {
                    tx.write_all(&chunk).unwrap();
                }
                tx
            });
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0;
            while got < 256 * (8 << 10) {
                got += rx.read(&mut buf).unwrap();
            }
            kept.push((writer.join().unwrap(), rx));
        }
        let link = guest.shared().lock();
        let grown: u64 = link
            .sessions
            .values()
            .map(|s| (s.buf_alloc - cfg.buf_size) as u64)
            .sum();
        assert!(grown > 0, "no session grew");
        assert!(
            grown <= 4 * cfg.max_buf_size as u64,
            "sessions grew by {grown} in all"
        );
        assert!(link
            .sessions
            .values()
            .all(|s| s.buf_alloc <= cfg.max_buf_size));
    }
}

#[cfg(test)]
mod direct_tests {
    use crate::{doorbell::local, Config, Endpoint, SharedRegion, WaitMode};
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// A writer that waits for ring space (not credit) in Block mode is woken when the
    /// reader frees it: 128 writes of 16 KiB through a ring of 30 KiB all arrive. (How
    /// soon it wakes is the bench's to show: a test asserts no timings.)
    #[test]
    fn block_mode_writer_wakes_for_ring_space() {
        let _watchdog =
            crate::test_watchdog::watchdog("block_mode_writer_wakes_for_ring_space", 20);
        let cfg = Config {
            wait: WaitMode::Block,
            buf_size: 1 << 20,
            ..Config::default()
        };
        let region = SharedRegion::heap(64 << 10);
        let (a, b) = local::pair();
        let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
        let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
        let l = guest.listen(3).unwrap();
        let mut tx = host.connect(3).unwrap();
        let mut rx = l.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            loop {
                match rx.read(&mut buf).unwrap() {
                    0 => return n,
                    k => n += k,
                }
            }
        });
        let chunk = vec![1u8; 16 << 10];
        for _ in 0..128 {
            tx.write_all(&chunk).unwrap();
        }
        drop(tx);
        assert_eq!(reader.join().unwrap(), 128 * chunk.len());
    }

    /// Two sessions interleaved in one ring, read with odd buffer sizes in every wait mode:
    /// the direct path and the general one must hand out the same bytes in order.
    #[test]
    fn direct_reads_keep_order_across_sessions() {
        let _watchdog =
            crate::test_watchdog::watchdog("direct_reads_keep_order_across_sessions", 20);
        for wait in [WaitMode::Poll, WaitMode::Block, WaitMode::Adaptive] {
            let cfg = Config {
                wait,
                buf_size: 8 << 10,
                ..Config::default()
            };
            let region = SharedRegion::heap(256 << 10);
            let (a, b) = local::pair();
            let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
            let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
            let l = guest.listen(3).unwrap();
            let mut tx: Vec<_> = (0..2).map(|_| host.connect(3).unwrap()).collect();
            let rx: Vec<_> = (0..2).map(|_| l.accept().unwrap()).collect();
            let readers: Vec<_> = rx
                .into_iter()
                .enumerate()
                .map(|(k, mut r)| {
                    std::thread::spawn(move || {
                        let mut got = Vec::new();
                        let mut buf = vec![0u8; 5000];
                        let mut i = 0;
                        loop {
                            let want = [1, 7, 100, 5000, 64][i % 5];
                            i += 1;
                            let n = r.read(&mut buf[..want]).unwrap();
                            if n == 0 {
                                return (k, got);
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                    })
                })
                .collect();
            let mut sent = [Vec::new(), Vec::new()];
            for i in 0..3000usize {
                let k = i % 3 % 2;
                let n = 1 + (i * 37) % 900;
                let data: Vec<u8> = (0..n).map(|j| (i * 7 + j + k) as u8).collect();
                tx[k].write_all(&data).unwrap();
                sent[k].extend_from_slice(&data);
            }
            drop(tx);
            for r in readers {
                let (k, got) = r.join().unwrap();
                assert!(got == sent[k], "session {k} differs in {wait:?}");
            }
        }
    }
}

#[cfg(test)]
mod set_index_tests {
    use super::{SessionIds, SetIndex};

    /// Places as a scan gives them (an id given twice: its first), whether the map was
    /// built in this call, kept from the last call for the same set, or not taken for
    /// another set.
    #[test]
    fn a_kept_map_serves_its_own_set_only() {
        let hasher = SessionIds::new();
        let a: Vec<u64> = (0..40).map(|i| i * 2 + 1).chain([11]).collect();
        let scan = |set: &[u64], id: u64| set.iter().position(|&x| x == id);
        let check = |ix: &mut SetIndex<'_>, set: &[u64]| {
            for id in [11, 1, 79, 80, 41, 3] {
                assert_eq!(ix.position(id), scan(set, id), "id {id}");
            }
        };
        let mut ix = SetIndex::new(&a, hasher.clone(), None);
        check(&mut ix, &a);
        let kept = ix.into_cache();
        assert!(kept.is_some(), "no map kept for a large set");
        // The same set: the kept map, from the first lookup on.
        let mut ix = SetIndex::new(&a, hasher.clone(), kept);
        check(&mut ix, &a);
        // A set as long, in another order: its own places, not the kept map's.
        let b: Vec<u64> = a.iter().rev().copied().collect();
        let mut ix = SetIndex::new(&b, hasher.clone(), ix.into_cache());
        check(&mut ix, &b);
        // And back: the map kept is now b's.
        let mut ix = SetIndex::new(&a, hasher.clone(), ix.into_cache());
        check(&mut ix, &a);
        // A small set is scanned, whatever is kept.
        let small = [79, 1, 79];
        let mut ix = SetIndex::new(&small, hasher, ix.into_cache());
        check(&mut ix, &small);
    }
}

/// The window growth rule of [`Link::grow_window`], at the link's level: each case sets a
/// session's counters as a reader that ran dry would leave them.
#[cfg(test)]
mod grow_tests {
    use crate::link::tests::{accepted, up, victim_cfg};
    use crate::link::{Actions, Link, State};
    use crate::shm::layout::Role;
    use crate::wire::frame::Kind;
    use crate::wire::mock::MockPeer;
    use crate::Config;

    const BASE: u32 = 8 << 10;
    const MAX: u32 = 64 << 10;

    /// An up host link with buffers of 8 KiB growing to 64 KiB (a link budget of
    /// 256 KiB), and `streams` stream sessions and `messages` message sessions the peer
    /// opened: their ids, streams first.
    fn link(streams: u64, messages: u64) -> (Link, MockPeer, Vec<u64>) {
        let cfg = Config {
            buf_size: BASE,
            max_buf_size: MAX,
            ..Config::default()
        };
        let (mut l, mut peer) = victim_cfg(Role::Host, true, 1 << 20, cfg);
        up(&mut l, &mut peer);
        let ids = (0..streams + messages)
            .map(|i| accepted(&mut l, &mut peer, i + 1, i >= streams))
            .collect();
        peer.drain();
        (l, peer, ids)
    }

    /// Sets session `id` as a reader that ran dry: `consumed` bytes since it last ran
    /// dry (from `at_dry`), having slept if `slept`; grows, and gives the new buffer and
    /// whether a Credit went to the peer.
    fn dry(
        l: &mut Link,
        peer: &mut MockPeer,
        id: u64,
        at_dry: u64,
        consumed: u64,
        slept: bool,
    ) -> (u32, bool) {
        let s = l.sessions.get_mut(&id).unwrap();
        s.fwd_at_dry = at_dry;
        s.fwd_cnt = at_dry + consumed;
        s.received = s.fwd_cnt;
        s.slept = slept;
        l.grow_window(id, &mut Actions::default()).unwrap();
        let mut out = Actions::default();
        l.publish(&mut out);
        let told = peer
            .drain_frames()
            .iter()
            .any(|h| h.kind == Kind::Credit && h.session == id);
        let s = &l.sessions[&id];
        if told {
            assert_eq!(
                (s.fwd_at_dry, s.slept),
                (s.fwd_cnt, false),
                "a new dry spell"
            );
        }
        (s.buf_alloc, told)
    }

    /// A reader that slept and consumed at least 7/8 of its buffer since it last ran dry
    /// doubles it and tells the peer; one that consumed less, or never slept, keeps it
    /// and starts a new dry spell.
    #[test]
    fn a_buffer_doubles_for_a_reader_that_slept_and_read_seven_eighths_of_it() {
        let (mut l, mut peer, ids) = link(1, 0);
        let id = ids[0];
        assert_eq!(l.sessions[&id].buf_alloc, BASE);
        let most = BASE as u64 * 7 / 8;
        for (at_dry, consumed, slept) in [
            (0, 0, true),
            (100_000, most - 1, true),
            (0, 2 * BASE as u64, false),
        ] {
            assert_eq!(
                dry(&mut l, &mut peer, id, at_dry, consumed, slept),
                (BASE, false)
            );
            let s = &l.sessions[&id];
            // Something consumed: a new dry spell; nothing: the same one goes on.
            let spell = if consumed > 0 {
                (s.fwd_cnt, false)
            } else {
                (at_dry, slept)
            };
            assert_eq!((s.fwd_at_dry, s.slept), spell);
        }
        assert_eq!(dry(&mut l, &mut peer, id, 0, most, true), (2 * BASE, true));
        let s = &l.sessions[&id];
        assert_eq!(s.fwd_sent, s.fwd_cnt, "the Credit counts what was consumed");
        // Up to the maximum, not past it, and not again once there.
        l.sessions.get_mut(&id).unwrap().buf_alloc = 48 << 10;
        assert_eq!(dry(&mut l, &mut peer, id, 0, 48 << 10, true), (MAX, true));
        assert_eq!(
            dry(&mut l, &mut peer, id, 0, MAX as u64, true),
            (MAX, false)
        );
    }

    /// Message sessions keep their buffer (it is the largest message the peer may send),
    /// and so do sessions that are not open or whose peer finished.
    #[test]
    fn message_ended_and_unopened_sessions_keep_their_buffer() {
        let (mut l, mut peer, ids) = link(3, 1);
        let (eof, unopened, message) = (ids[1], ids[2], ids[3]);
        l.sessions.get_mut(&eof).unwrap().rx_eof = true;
        l.sessions.get_mut(&unopened).unwrap().state = State::Connecting;
        for id in [eof, unopened, message] {
            assert_eq!(
                dry(&mut l, &mut peer, id, 0, BASE as u64, true),
                (BASE, false)
            );
        }
        assert_eq!(
            dry(&mut l, &mut peer, ids[0], 0, BASE as u64, true),
            (2 * BASE, true)
        );
    }

    /// Among open stream sessions each may grow by an equal share of the link's budget
    /// (4 x the maximum: message sessions and sessions not open take no share), and all
    /// together by the budget at most.
    #[test]
    fn a_buffer_grows_by_its_share_of_the_link_budget_at_most() {
        // 8 streams and 8 message sessions: a share of 256 KiB / 8 = 32 KiB.
        let (mut l, mut peer, ids) = link(8, 8);
        let id = ids[0];
        l.sessions.get_mut(&id).unwrap().buf_alloc = 16 << 10;
        let share = (4 * MAX) / 8;
        assert_eq!(
            dry(&mut l, &mut peer, id, 0, 16 << 10, true),
            (32 << 10, true)
        );
        assert_eq!(
            dry(&mut l, &mut peer, id, 0, 32 << 10, true),
            (BASE + share, true)
        );

        // Others grew by all but 4 KiB of the budget: 4 KiB is left to grow by.
        let (mut l, mut peer, ids) = link(8, 0);
        for &other in &ids[1..5] {
            l.sessions.get_mut(&other).unwrap().buf_alloc = BASE + MAX - (1 << 10);
        }
        assert_eq!(
            dry(&mut l, &mut peer, ids[0], 0, BASE as u64, true),
            (BASE + (4 << 10), true)
        );
    }
}

/// The receive side's small rules, at the link's level over the mock peer.
#[cfg(test)]
mod rx_tests {
    use crate::link::tests::{accepted_with_data, own, up, victim_cfg};
    use crate::link::{Actions, State};
    use crate::shm::layout::{side, Role};
    use crate::wire::frame::Kind;
    use crate::{Config, WaitMode};
    use std::time::Instant;

    /// A reader about to sleep arms `RX_NEED_WAKEUP` and re-checks the peer's head; a
    /// polling reader promised never to arm, and a down link has nothing to wait on.
    #[test]
    fn a_reader_arms_its_wakeup_unless_it_polls_or_the_link_is_down() {
        for wait in [WaitMode::Adaptive, WaitMode::Poll] {
            let cfg = Config {
                wait,
                ..Config::default()
            };
            let (mut l, mut peer) = victim_cfg(Role::Host, true, 64 << 10, cfg);
            let mut out = Actions::default();
            assert_eq!(l.arm_wakeup(&mut out), Ok(false), "{wait:?}: down");
            assert_eq!(own(&l, side::RX_NEED_WAKEUP), 0);
            up(&mut l, &mut peer);
            assert_eq!(l.arm_wakeup(&mut out), Ok(false), "{wait:?}: nothing there");
            let armed = own(&l, side::RX_NEED_WAKEUP) != 0;
            assert_eq!(armed, wait != WaitMode::Poll, "{wait:?}");
            assert!(peer.push(Kind::Credit, 0, 2, &[0; 16]));
            peer.publish();
            assert_eq!(
                l.arm_wakeup(&mut out),
                Ok(true),
                "{wait:?}: a frame is there"
            );
        }
    }

    /// `rx_moved` says whether frames arrived that nobody has looked at: not on a down
    /// link, not once a pump took them.
    #[test]
    fn rx_moved_says_whether_unread_frames_arrived() {
        let (mut l, mut peer) = victim_cfg(Role::Host, true, 64 << 10, Config::default());
        assert!(peer.push(Kind::Credit, 0, 2, &[0; 16]));
        peer.publish();
        assert!(!l.rx_moved(), "down");
        up(&mut l, &mut peer);
        assert!(!l.rx_moved());
        assert!(peer.push(Kind::Credit, 0, 2, &[0; 16]));
        peer.publish();
        assert!(l.rx_moved());
        l.pump(Instant::now(), &mut Actions::default()).unwrap();
        assert!(!l.rx_moved(), "pumped");
    }

    /// A read side shut down discards (and credits) what is buffered, and stays shut.
    #[test]
    fn a_shut_read_side_discards_and_credits_what_is_buffered() {
        let (mut l, mut peer) = victim_cfg(Role::Host, true, 1 << 20, Config::default());
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 300);
        l.sessions.get_mut(&id).unwrap().rd_shut = true;
        let mut out = Actions::default();
        let mut buf = [0; 100];
        assert_eq!(
            l.read(id, &mut buf, &mut out).unwrap(),
            Some(0),
            "shut: EOF"
        );
        assert_eq!(l.read_discard(id, &mut buf, &mut out).unwrap(), Some(100));
        let s = &l.sessions[&id];
        assert!(s.rd_shut, "still shut");
        assert_eq!((s.fwd_cnt, s.buffered()), (100, 200));
        let mut rest = [0; 1000];
        assert_eq!(l.read_discard(id, &mut rest, &mut out).unwrap(), Some(200));
        assert_eq!(
            l.read_discard(id, &mut rest, &mut out).unwrap(),
            None,
            "empty"
        );
    }

    /// A session reset for a protocol violation drops what it held, counts the reset
    /// and tells the peer; the link goes on.
    #[test]
    fn a_session_reset_drops_its_data_counts_and_tells_the_peer() {
        let (mut l, mut peer) = victim_cfg(Role::Host, true, 1 << 20, Config::default());
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 300);
        peer.drain();
        let mut out = Actions::default();
        let resets = l.stats.session_resets;
        l.reset_session(id, "a test", &mut out).unwrap();
        let s = &l.sessions[&id];
        assert_eq!(s.state, State::Reset("a test".into()));
        assert_eq!(s.buffered(), 0);
        assert_eq!(l.stats.session_resets, resets + 1);
        l.publish(&mut out);
        let kinds: Vec<Kind> = peer.drain_frames().iter().map(|h| h.kind).collect();
        assert_eq!(kinds, [Kind::Reset]);
        assert!(l.is_up());
    }
}

//! Transmitting: control frames (sent at once, or queued in order behind those waiting
//! for ring space), Data frames, publishing the head, and waiting for ring space.

use crate::link::{session_in, Actions, Fault, Link, State, MAX_PENDING_CONTROL};
use crate::wire::frame::{self, Header, Kind, FLAG_EOR};
use crate::wire::ring::{CopyDone, CopySlot};
use std::io;

/// Writes from this size up copy their payload into the ring outside the runtime's lock
/// (the frame is reserved under it, [`Link::finish_copy`] publishes it): a 64 KiB copy
/// takes microseconds, which the reads and the other writers of the endpoint need not
/// wait for. Below it the second pass through the lock would cost more than the copy.
pub(crate) const COPY_UNLOCKED_MIN: usize = 16 << 10;

/// What [`Link::write_frame`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framed {
    /// Wrote this many payload bytes.
    Copied(usize),
    /// Reserved a frame of this many payload bytes: the caller copies them to the slot,
    /// then calls [`Link::finish_copy`].
    Reserved(CopySlot, usize),
}

impl Link {
    /// Sends a control frame now, or queues it behind those already waiting for space.
    pub fn send_ctrl(
        &mut self,
        kind: Kind,
        session: u64,
        payload: Option<[u8; 16]>,
        out: &mut Actions,
    ) -> Result<(), Fault> {
        let h = Header {
            kind,
            flags: 0,
            len: if payload.is_some() { 16 } else { 0 },
            session,
        };
        let p = payload.unwrap_or([0; 16]);
        if self.pending.is_empty() {
            match self.tx.push(&h, &p[..h.len as usize]) {
                Ok(true) => {
                    if self.tx.publish() {
                        out.ring_peer = true;
                    }
                    return Ok(());
                }
                Ok(false) => {}
                Err(bad) => return Err(self.index_fault(bad, out)),
            }
        }
        if self.pending.len() >= MAX_PENDING_CONTROL {
            // Only a peer that floods us without reading can get here: stop answering it.
            self.stats.frames_dropped += 1;
            return Ok(());
        }
        self.pending.push_back((h, p));
        if self.pending.len() == 1 {
            // The first in the queue: post its space (see `flush`).
            self.flush(out)?;
        }
        Ok(())
    }

    /// Sends queued control frames while the ring has room. `Ok(true)` when none is left.
    ///
    /// Frames left queued have the space the first needs posted in `TX_NEED_SPACE`, so
    /// the peer rings when it has read that far: whoever queued them may be the only
    /// one awake, and the caller asleep on the doorbell or the keeper sitting out behind
    /// it would otherwise learn of the space only at its own timeout, while the peer's
    /// writers wait for the credit inside.
    pub fn flush(&mut self, out: &mut Actions) -> Result<bool, Fault> {
        let mut sent = false;
        loop {
            while let Some((h, p)) = self.pending.front() {
                let (h, p) = (*h, *p);
                match self.tx.push(&h, &p[..h.len as usize]) {
                    Ok(true) => {
                        self.pending.pop_front();
                        sent = true;
                    }
                    Ok(false) => break,
                    Err(bad) => return Err(self.index_fault(bad, out)),
                }
            }
            // Posted and found the space already there: send more.
            if self.pending.is_empty() || !self.arm_pending_space(out)? {
                break;
            }
        }
        if sent && self.tx.publish() {
            out.ring_peer = true;
        }
        Ok(self.pending.is_empty())
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Posts the space the first queued control frame needs (see Producer::arm_space).
    pub fn arm_pending_space(&mut self, out: &mut Actions) -> Result<bool, Fault> {
        let Some((h, _)) = self.pending.front() else {
            return Ok(true);
        };
        let rec = frame::record_len(h.len as usize);
        let post = !self.polls();
        self.tx
            .arm_space(rec, post)
            .map_err(|bad| self.index_fault(bad, out))
    }

    /// Writes up to one frame of stream data (or one fragment of a message whose credit
    /// has been checked). `Ok(None)`: no credit or no ring space; wait. With `unlocked`,
    /// the payload is left for the caller to copy ([`Framed::Reserved`]).
    pub(crate) fn write_frame(
        &mut self,
        id: u64,
        data: &[u8],
        eor: bool,
        check_credit: bool,
        unlocked: bool,
        out: &mut Actions,
    ) -> io::Result<Option<Framed>> {
        let max = self.max_payload;
        let pending = self.has_pending();
        let s = session_in(&mut self.sessions, id)?;
        if s.peer_closed || s.wr_shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "ivring: session closed for writing",
            ));
        }
        let mut n = data.len().min(max);
        if check_credit {
            n = n.min(s.credit() as usize);
            if n == 0 && !data.is_empty() {
                return Ok(None);
            }
        }
        if pending {
            return Ok(None);
        }
        let h = Header {
            kind: Kind::Data,
            flags: if eor && n == data.len() { FLAG_EOR } else { 0 },
            len: n as u32,
            session: id,
        };
        let framed = if unlocked {
            self.tx
                .reserve_copy(&h)
                .map(|slot| slot.map(|slot| Framed::Reserved(slot, n)))
        } else {
            self.tx
                .push(&h, &data[..n])
                .map(|done| done.then_some(Framed::Copied(n)))
        };
        match framed {
            Ok(Some(f)) => {
                s.tx_cnt += n as u64;
                Ok(Some(f))
            }
            Ok(None) => Ok(None),
            Err(bad) => {
                let f = self.index_fault(bad, out);
                Err(self.fault_to_io(f, out))
            }
        }
    }

    /// The payload of a frame [`Link::write_frame`] reserved is in the ring: the last
    /// copy to finish stores the head (and rings the peer if it asked).
    pub(crate) fn finish_copy(&mut self, slot: CopySlot, out: &mut Actions) {
        match self.tx.finish_copy(slot) {
            CopyDone::Publish => self.publish(out),
            CopyDone::Running => {}
            CopyDone::SpaceBack => {
                out.space_back = true;
                // Control frames queued while the stale copies ran could post no space
                // (`Producer::arm_space`): nothing would ring for them. They go now.
                if self.has_pending() {
                    if let Err(f) = self.flush(out) {
                        self.fault_to_io(f, out);
                    }
                }
            }
        }
    }

    /// Bytes of frames written that the head does not cover yet.
    pub(crate) fn unpublished_len(&self) -> u64 {
        self.tx.unpublished_len()
    }

    /// Stores the head after writes; the peer is rung after the lock if it asked.
    pub fn publish(&mut self, out: &mut Actions) {
        if self.tx.unpublished() && self.tx.publish() {
            out.ring_peer = true;
        }
    }

    /// Posts the ring space a frame of `len` payload bytes needs; `Ok(true)` if it is there.
    pub fn arm_space(&mut self, len: usize, out: &mut Actions) -> Result<bool, Fault> {
        let rec = frame::record_len(len.min(self.max_payload));
        let post = !self.polls();
        let r = self
            .tx
            .arm_space(rec, post)
            .map_err(|bad| self.index_fault(bad, out));
        out.wait_space |= matches!(r, Ok(false));
        r
    }

    /// A caller of session `id` is about to sleep, or has slept, waiting for it.
    pub(crate) fn slept(&mut self, id: u64) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.slept = true;
        }
    }

    /// Remembers to call session `id`'s notify callback when ring space comes back (its
    /// non-blocking write found the ring full).
    pub(crate) fn notify_on_space(&mut self, id: u64) {
        if let Some(s) = self.sessions.get_mut(&id) {
            if s.notify.is_some() && !std::mem::replace(&mut s.space_notify, true) {
                self.space_notify.push(id);
            }
        }
    }

    /// Ring space came back: runs the callbacks [`Link::notify_on_space`] asked for.
    pub(crate) fn space_came_back(&mut self) {
        for id in std::mem::take(&mut self.space_notify) {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.space_notify = false;
                if let Some(n) = &s.notify {
                    s.awaited = false;
                    n();
                }
            }
        }
    }

    /// A call of session `id` returns `WouldBlock` and its caller waits for the session's
    /// callback: the next callback to run for it is one somebody waited for.
    pub(crate) fn await_callback(&mut self, id: u64) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.awaited = s.notify.is_some();
        }
    }

    /// Ends a session from our side: Close to the peer unless it is already gone.
    pub fn close(&mut self, id: u64, out: &mut Actions) {
        if let Some(s) = self.sessions.remove(&id) {
            if matches!(s.state, State::Open | State::Connecting) && !s.peer_closed && self.up {
                let _ = self.send_ctrl(Kind::Close, id, None, out);
                self.publish(out);
            }
            self.keep_rx(s);
        }
    }

    pub fn shutdown_write(&mut self, id: u64, out: &mut Actions) -> io::Result<()> {
        let s = self.session(id)?;
        if s.wr_shut || s.peer_closed {
            return Ok(());
        }
        s.wr_shut = true;
        self.send_ctrl(Kind::Shutdown, id, None, out)
            .map_err(|f| self.fault_to_io(f, out))?;
        Ok(())
    }

    /// Whether writers waiting for ring space can go on (the keeper then wakes them: the
    /// peer rings us for it, but no frame arrives with it).
    pub(crate) fn space_ready(&mut self) -> bool {
        self.up && self.tx.space_ready()
    }
}

pub(crate) enum WriteStep {
    Wrote(Framed),
    Wait,
}

/// One attempt at writing a frame; on a full ring, posts the space needed first.
pub(crate) fn step(
    l: &mut Link,
    id: u64,
    data: &[u8],
    eor: bool,
    credit: bool,
    unlocked: bool,
    out: &mut Actions,
) -> io::Result<WriteStep> {
    loop {
        match l.write_frame(id, data, eor, credit, unlocked, out)? {
            Some(f) => return Ok(WriteStep::Wrote(f)),
            None => {
                let s = l.session(id)?;
                let no_credit = credit && s.credit() == 0;
                if no_credit || l.has_pending() {
                    if l.has_pending() {
                        match l.flush(out) {
                            Ok(true) => continue,
                            Ok(false) => out.wait_space = !no_credit,
                            Err(f) => return Err(l.fault_to_io(f, out)),
                        }
                    }
                    return Ok(WriteStep::Wait);
                }
                match l.arm_space(data.len(), out) {
                    Ok(true) => continue,
                    Ok(false) => return Ok(WriteStep::Wait),
                    Err(f) => return Err(l.fault_to_io(f, out)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::tests::{accepted_with_data, fill, own, up, victim_cfg};
    use crate::shm::layout::{side, Role};
    use crate::wire::frame::{record_len, CreditArgs};
    use crate::wire::mock::MockPeer;
    use crate::{Config, WaitMode};

    const REGION: usize = 64 << 10;

    /// An up host link over `cfg` with one session the peer opened (1 MiB of credit).
    fn link_with_session(cfg: Config) -> (Link, MockPeer, u64) {
        let (mut l, mut peer) = victim_cfg(Role::Host, true, REGION, cfg);
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 0);
        peer.drain();
        (l, peer, id)
    }

    fn credit(id: u64, l: &mut Link, out: &mut Actions) {
        let args = CreditArgs {
            fwd_cnt: 0,
            buf_alloc: 1 << 20,
        };
        l.send_ctrl(Kind::Credit, id, Some(args.encode()), out)
            .unwrap();
    }

    fn kinds(frames: &[Header]) -> Vec<Kind> {
        frames.iter().map(|h| h.kind).collect()
    }

    /// A control frame that found the ring full waits in the queue; no Data frame
    /// overtakes it once space is back (an Accept must reach the peer before the
    /// session's data), and the flush that sends it publishes it.
    #[test]
    fn queued_control_frames_go_first_and_their_flush_publishes_them() {
        let _w = crate::test_watchdog::watchdog(
            "queued_control_frames_go_first_and_their_flush_publishes_them",
            20,
        );
        let (mut l, mut peer, id) = link_with_session(Config::default());
        let mut out = Actions::default();
        let frames = fill(&mut l, id);
        credit(id, &mut l, &mut out);
        assert!(l.has_pending(), "no room: the Credit waits");
        assert_eq!(kinds(&peer.drain_frames()), vec![Kind::Data; frames]);

        let w = l.write_frame(id, &[2; 64], false, true, false, &mut out);
        assert_eq!(w.unwrap(), None, "the Data waits behind the queued Credit");
        assert!(l.flush(&mut out).unwrap(), "the queue is sent");
        assert!(!l.has_pending());
        assert_eq!(
            kinds(&peer.drain_frames()),
            [Kind::Credit],
            "the flush published what it sent"
        );

        // Once more through `step`, which flushes the queue ahead of its own frame.
        fill(&mut l, id);
        credit(id, &mut l, &mut out);
        peer.drain();
        let w = step(&mut l, id, &[3; 64], false, true, false, &mut out).unwrap();
        assert!(matches!(w, WriteStep::Wrote(Framed::Copied(64))));
        l.publish(&mut out);
        assert_eq!(kinds(&peer.drain_frames()), [Kind::Credit, Kind::Data]);
    }

    /// A control frame past the queue's bound (a peer that floods us and reads
    /// nothing) is dropped and counted, not queued.
    #[test]
    fn control_frames_past_the_queue_bound_are_dropped_and_counted() {
        let _w = crate::test_watchdog::watchdog(
            "control_frames_past_the_queue_bound_are_dropped_and_counted",
            20,
        );
        let (mut l, _peer, id) = link_with_session(Config::default());
        let mut out = Actions::default();
        fill(&mut l, id);
        for _ in 0..MAX_PENDING_CONTROL + 3 {
            credit(id, &mut l, &mut out);
        }
        assert_eq!(l.pending.len(), MAX_PENDING_CONTROL);
        assert_eq!(l.stats.frames_dropped, 3);
    }

    /// A writer, or a control frame, that finds the ring full posts in `TX_NEED_SPACE`
    /// the tail it needs (so the peer rings when it gets there) and says to wait; once
    /// the peer has read, arming finds the space and withdraws the post. A polling link
    /// promised its peer never to post, and does not.
    #[test]
    fn a_full_ring_posts_the_space_a_waiter_needs_unless_the_link_polls() {
        let _w = crate::test_watchdog::watchdog(
            "a_full_ring_posts_the_space_a_waiter_needs_unless_the_link_polls",
            20,
        );
        for wait in [WaitMode::Adaptive, WaitMode::Block, WaitMode::Poll] {
            let cfg = Config {
                wait,
                ..Config::default()
            };
            let (mut l, mut peer, id) = link_with_session(cfg);
            let posts = wait != WaitMode::Poll;
            for control in [false, true] {
                fill(&mut l, id);
                let mut out = Actions::default();
                let armed = if control {
                    credit(id, &mut l, &mut out);
                    l.arm_pending_space(&mut out)
                } else {
                    l.arm_space(1024, &mut out)
                };
                assert!(!armed.unwrap(), "{wait:?}: full");
                assert_eq!(
                    out.wait_space, !control,
                    "{wait:?}: a writer waits for space"
                );
                let posted = own(&l, side::TX_NEED_SPACE);
                let head = own(&l, side::TX_HEAD);
                if posts {
                    assert!(posted > 0 && posted <= head, "{wait:?}: posted {posted}");
                } else {
                    assert_eq!(posted, 0, "{wait:?}: a polling link posts nothing");
                }

                peer.drain();
                let mut out = Actions::default();
                let armed = if control {
                    l.arm_pending_space(&mut out)
                } else {
                    l.arm_space(1024, &mut out)
                };
                assert!(armed.unwrap(), "{wait:?}: the peer read");
                assert!(!out.wait_space, "{wait:?}");
                assert_eq!(own(&l, side::TX_NEED_SPACE), 0, "{wait:?}: withdrawn");
                l.flush(&mut out).unwrap();
                peer.drain();
            }
            let mut out = Actions::default();
            assert!(l.arm_pending_space(&mut out).unwrap(), "nothing queued");
        }
    }

    /// A control frame queued behind a full ring posts the space it needs at once, and
    /// a flush that leaves frames queued posts the space the next one needs: the peer
    /// rings for them when it reads, whoever else sleeps.
    #[test]
    fn queued_control_frames_post_the_space_they_need() {
        let _w =
            crate::test_watchdog::watchdog("queued_control_frames_post_the_space_they_need", 20);
        let (mut l, mut peer, id) = link_with_session(Config::default());
        let mut out = Actions::default();
        fill(&mut l, id);
        assert_eq!(own(&l, side::TX_NEED_SPACE), 0, "filled without waiting");
        credit(id, &mut l, &mut out);
        assert!(l.has_pending(), "no room: the Credit waits");
        let first = own(&l, side::TX_NEED_SPACE);
        let head = own(&l, side::TX_HEAD);
        assert!(first > 0 && first <= head, "posted {first}, head {head}");
        // More than the ring holds: the flush after the peer's read leaves some queued.
        let cap = peer.cap() as usize;
        for _ in 0..cap / record_len(16) {
            credit(id, &mut l, &mut out);
        }
        peer.drain();
        assert!(peer.tail >= first, "the peer read past the post: it rings");
        assert!(!l.flush(&mut out).unwrap(), "some are left");
        let next = own(&l, side::TX_NEED_SPACE);
        let head = own(&l, side::TX_HEAD);
        assert!(
            next > first && next <= head,
            "the next post {next} (first {first}, head {head})"
        );
        // Once the peer has read all, the flush sends the rest and the post is met.
        peer.drain();
        assert!(l.flush(&mut out).unwrap(), "all sent");
        let rest = peer.drain_frames();
        assert!(!rest.is_empty() && rest.iter().all(|h| h.kind == Kind::Credit));
        assert!(l.space_ready(), "the post is met and withdrawn");
        assert_eq!(own(&l, side::TX_NEED_SPACE), 0);
    }

    /// A control frame queued while a reset's stale copy still writes into the ring
    /// (an Open of the new link's first session) goes out when that copy finishes: the
    /// space it waited for was never posted, so no ring of the peer's would send it.
    #[test]
    fn control_frames_queued_behind_stale_copies_go_when_the_last_one_finishes() {
        let _w = crate::test_watchdog::watchdog(
            "control_frames_queued_behind_stale_copies_go_when_the_last_one_finishes",
            20,
        );
        let (mut l, mut peer, id) = link_with_session(Config::default());
        let mut out = Actions::default();
        let big = vec![7; COPY_UNLOCKED_MIN];
        let slot = match l.write_frame(id, &big, false, true, true, &mut out) {
            Ok(Some(Framed::Reserved(slot, _))) => slot,
            other => panic!("{other:?}"),
        };
        l.local_reset("a test", &mut out);
        let opened = l.open(9, false, &mut out).unwrap();
        assert!(l.has_pending(), "no record while the stale copy runs");
        assert_eq!(own(&l, side::TX_NEED_SPACE), 0, "nothing to post for");
        let mut out = Actions::default();
        l.finish_copy(slot, &mut out);
        assert!(out.space_back);
        assert!(!l.has_pending(), "the Open went with the space");
        peer.follow();
        let sent = peer.drain_frames();
        assert!(
            sent.iter()
                .any(|h| h.kind == Kind::Open && h.session == opened),
            "{sent:?}"
        );
    }

    /// `unpublished_len` is the bytes of the records written since the head was last
    /// stored (what the lock's waiters may leave unpublished is bounded by it).
    #[test]
    fn unpublished_len_counts_the_records_past_the_head() {
        let _w =
            crate::test_watchdog::watchdog("unpublished_len_counts_the_records_past_the_head", 20);
        let (mut l, _peer, id) = link_with_session(Config::default());
        let mut out = Actions::default();
        assert_eq!(l.unpublished_len(), 0);
        for n in [100, 1000] {
            let w = l.write_frame(id, &vec![4; n], false, true, false, &mut out);
            assert_eq!(w.unwrap(), Some(Framed::Copied(n)));
        }
        assert_eq!(
            l.unpublished_len(),
            (record_len(100) + record_len(1000)) as u64
        );
        l.publish(&mut out);
        assert_eq!(l.unpublished_len(), 0);
    }

    /// Only a message's last fragment carries the end-of-message flag, and a stream's
    /// frames never do, even one that carries all of its write.
    #[test]
    fn only_a_messages_last_fragment_ends_it() {
        let _w = crate::test_watchdog::watchdog("only_a_messages_last_fragment_ends_it", 20);
        let (mut l, mut peer, id) = link_with_session(Config::default());
        let max = l.max_payload;
        let mut out = Actions::default();
        for (eor, len) in [(true, 2 * max + 10), (false, max + 10), (false, 10)] {
            let data = vec![5; len];
            let mut off = 0;
            while off < len {
                match l.write_frame(id, &data[off..], eor, false, false, &mut out) {
                    Ok(Some(Framed::Copied(n))) => off += n,
                    other => panic!("{other:?}"),
                }
            }
            l.publish(&mut out);
            let flags: Vec<u8> = peer.drain_frames().iter().map(|h| h.flags).collect();
            let mut want = vec![0; len.div_ceil(max)];
            if eor {
                *want.last_mut().unwrap() = FLAG_EOR;
            }
            assert_eq!(flags, want, "eor {eor}, {len} bytes");
        }
    }

    /// A write that finds the ring full with credit left posts the space it needs and
    /// waits for space; one that finds control frames queued and no room for them waits
    /// for space too; one without credit waits for credit, posting nothing.
    #[test]
    fn a_write_that_finds_the_ring_full_waits_for_space_and_one_without_credit_does_not() {
        let _w = crate::test_watchdog::watchdog(
            "a_write_that_finds_the_ring_full_waits_for_space_and_one_without_credit_does_not",
            20,
        );
        let (mut l, mut peer, id) = link_with_session(Config::default());
        fill(&mut l, id);
        let mut out = Actions::default();
        let w = step(&mut l, id, &[6; 1024], false, true, false, &mut out).unwrap();
        assert!(matches!(w, WriteStep::Wait));
        assert!(out.wait_space, "waits for space");
        assert!(own(&l, side::TX_NEED_SPACE) > 0, "posted");

        credit(id, &mut l, &mut out);
        let mut out = Actions::default();
        let w = step(&mut l, id, &[6; 64], false, true, false, &mut out).unwrap();
        assert!(matches!(w, WriteStep::Wait));
        assert!(out.wait_space, "waits for the queue's space");
        peer.drain();
        l.flush(&mut out).unwrap();
        peer.drain();
        assert!(l.space_ready(), "the post is met and withdrawn");
        assert_eq!(own(&l, side::TX_NEED_SPACE), 0);

        let max = l.max_payload;
        l.sessions.get_mut(&id).unwrap().peer_buf_alloc = 0;
        let mut out = Actions::default();
        let w = step(&mut l, id, &vec![6; max], false, true, false, &mut out).unwrap();
        assert!(matches!(w, WriteStep::Wait), "no credit");
        assert!(!out.wait_space, "waits for credit, not space");
        assert_eq!(own(&l, side::TX_NEED_SPACE), 0);
        // A message's fragment is sent on the credit checked for the whole message.
        let w = step(&mut l, id, &[6; 64], true, false, false, &mut out).unwrap();
        assert!(matches!(w, WriteStep::Wrote(Framed::Copied(64))));
    }

    /// `space_ready` says once that the space posted for is back (the keeper then wakes
    /// the writers), and never while the link is down.
    #[test]
    fn space_ready_says_once_that_the_posted_space_is_back() {
        let _w = crate::test_watchdog::watchdog(
            "space_ready_says_once_that_the_posted_space_is_back",
            20,
        );
        let (mut l, mut peer, id) = link_with_session(Config::default());
        assert!(!l.space_ready(), "nothing posted");
        fill(&mut l, id);
        let mut out = Actions::default();
        assert!(!l.arm_space(1024, &mut out).unwrap());
        assert!(!l.space_ready(), "the peer has not read");
        peer.drain();
        l.up = false;
        assert!(!l.space_ready(), "the link is down");
        l.up = true;
        assert!(l.space_ready(), "the peer read");
        assert!(!l.space_ready(), "said once");
    }

    /// A non-blocking write that found the ring full asks for its session's callback
    /// once, however often it asks; the callback runs once when space comes back.
    #[test]
    fn a_session_is_called_back_once_when_ring_space_comes_back() {
        let _w = crate::test_watchdog::watchdog(
            "a_session_is_called_back_once_when_ring_space_comes_back",
            20,
        );
        use std::sync::atomic::{AtomicUsize, Ordering as O};
        use std::sync::Arc;
        let (mut l, _peer, id) = link_with_session(Config::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        l.notify_on_space(id);
        assert!(l.space_notify.is_empty(), "no callback, nothing to call");
        l.sessions.get_mut(&id).unwrap().notify = Some(Arc::new(move || {
            c.fetch_add(1, O::Relaxed);
        }));
        l.notify_on_space(id);
        l.notify_on_space(id);
        assert_eq!(l.space_notify, [id], "listed once");
        l.space_came_back();
        assert_eq!(calls.load(O::Relaxed), 1);
        l.space_came_back();
        assert_eq!(calls.load(O::Relaxed), 1, "called once");
        l.notify_on_space(id);
        l.space_came_back();
        assert_eq!(calls.load(O::Relaxed), 2, "asked again, called again");
    }

    /// Shutdown goes to the peer once, and not after the peer closed; Close goes to the
    /// peer for a session it has not closed, on a link that is up.
    #[test]
    fn shutdown_and_close_are_sent_once_and_only_to_a_peer_that_listens() {
        let _w = crate::test_watchdog::watchdog(
            "shutdown_and_close_are_sent_once_and_only_to_a_peer_that_listens",
            20,
        );
        let sent = |l: &mut Link, peer: &mut MockPeer| {
            let mut out = Actions::default();
            l.publish(&mut out);
            kinds(&peer.drain_frames())
        };
        let (mut l, mut peer, id) = link_with_session(Config::default());
        let mut out = Actions::default();
        l.shutdown_write(id, &mut out).unwrap();
        assert_eq!(sent(&mut l, &mut peer), [Kind::Shutdown]);
        l.shutdown_write(id, &mut out).unwrap();
        assert_eq!(sent(&mut l, &mut peer), [], "once");
        l.close(id, &mut out);
        assert_eq!(sent(&mut l, &mut peer), [Kind::Close]);

        for seq in [2, 3] {
            let id = accepted_with_data(&mut l, &mut peer, seq, 0);
            peer.drain();
            if seq == 2 {
                l.sessions.get_mut(&id).unwrap().peer_closed = true;
                l.shutdown_write(id, &mut out).unwrap();
                l.close(id, &mut out);
                assert_eq!(sent(&mut l, &mut peer), [], "the peer closed");
            } else {
                l.up = false;
                l.close(id, &mut out);
                l.up = true;
                assert_eq!(sent(&mut l, &mut peer), [], "the link is down");
            }
        }
    }
}

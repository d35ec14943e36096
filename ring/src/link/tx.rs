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
        Ok(())
    }

    /// Sends queued control frames while the ring has room. `Ok(true)` when none is left.
    pub fn flush(&mut self, out: &mut Actions) -> Result<bool, Fault> {
        let mut sent = false;
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
                Err(self.fault_to_io(f))
            }
        }
    }

    /// The payload of a frame [`Link::write_frame`] reserved is in the ring: the last
    /// copy to finish stores the head (and rings the peer if it asked).
    pub(crate) fn finish_copy(&mut self, slot: CopySlot, out: &mut Actions) {
        match self.tx.finish_copy(slot) {
            CopyDone::Publish => self.publish(out),
            CopyDone::Running => {}
            CopyDone::SpaceBack => out.space_back = true,
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
                    n();
                }
            }
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
            .map_err(|f| self.fault_to_io(f))?;
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
                            Err(f) => return Err(l.fault_to_io(f)),
                        }
                    }
                    return Ok(WriteStep::Wait);
                }
                match l.arm_space(data.len(), out) {
                    Ok(true) => continue,
                    Ok(false) => return Ok(WriteStep::Wait),
                    Err(f) => return Err(l.fault_to_io(f)),
                }
            }
        }
    }
}

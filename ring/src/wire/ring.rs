//! The two halves of one SPSC byte ring in shared memory (PROTOCOL.md §2).
//!
//! Indices are free-running u64 byte counts; `used = head - tail` and anything with
//! `used > capacity` (or unaligned) is corruption, not data. Each side keeps its own
//! index locally and authoritatively, and reads the peer's index once per operation.
//!
//! Wakeups follow the Dekker shape (PROTOCOL.md §5): a sleeper stores its flag, runs a
//! full fence, then re-reads the index it waits on; a publisher stores its index, runs a
//! full fence, then reads the flag.

use crate::shm::layout::{side, RECORD_ALIGN};
use crate::shm::region::SharedRegion;
use crate::shm::sync::{fence, Ordering};
use crate::wire::frame::{self, Header, Kind, HEADER_LEN};

/// The peer's index broke the ring's invariants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadIndex {
    /// The value read.
    pub peer_index: u64,
    /// Our own index at the time.
    pub own_index: u64,
}

/// The writing half: owns `TX_HEAD` and `TX_NEED_SPACE` in its side block.
pub(crate) struct Producer {
    region: SharedRegion,
    data: usize,
    cap: u64,
    own_block: usize,
    peer_block: usize,
    head: u64,
    head_off: u64,
    cached_tail: u64,
    /// Head as last stored to shared memory.
    published: u64,
    /// Our `TX_NEED_SPACE` as last stored: the word is ours, so it is never read back
    /// (a peer may have written anything there).
    space_posted: u64,
    /// The reader said it polls (side::POLLS, read once per epoch): publish without the
    /// wakeup fence.
    pub(crate) peer_polls: bool,
    /// The reader numbers its armings (side::ARMINGS, read once per epoch): one ring per
    /// number is enough (PROTOCOL.md §5).
    pub(crate) peer_numbers_armings: bool,
    /// The reader's arming we last asked to ring (0: none this epoch).
    rang_for: u64,
    /// Payload copies into committed records still running outside the link's lock
    /// ([`Producer::reserve_copy`]): the head is stored only once none is, so the reader
    /// never sees a record before its bytes.
    copies: u32,
    /// Counts resets: a copy reserved in an earlier round finishes into nothing.
    round: u64,
    /// Copies of an earlier round still running: their bytes land where the new round
    /// writes, so nothing is reserved until they are done.
    stale_copies: u32,
}

/// A record whose header is written and whose payload is copied outside the lock: where
/// the payload goes and which round of the ring reserved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CopySlot {
    pub(crate) at: usize,
    round: u64,
}

/// What finishing a payload copy leaves to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyDone {
    /// No copy is left: store the head.
    Publish,
    /// Other copies are running; the last stores the head.
    Running,
    /// The last copy of an earlier round (before a reset) is done: the ring takes
    /// records again, so wake the writers waiting for space.
    SpaceBack,
}

/// The reading half: owns `RX_TAIL` and `RX_NEED_WAKEUP` in its side block.
pub(crate) struct Consumer {
    region: SharedRegion,
    data: usize,
    cap: u64,
    own_block: usize,
    peer_block: usize,
    tail: u64,
    tail_off: u64,
    cached_head: u64,
    /// Tail as last stored to shared memory.
    released: u64,
    /// Our `RX_NEED_WAKEUP` as last stored: 0, or the number of the arming (never read
    /// back, as `space_posted`).
    wakeup_armed: u64,
    /// Armings so far: each stores a new number (PROTOCOL.md §5), never 0.
    armings: u64,
    /// The writer said it polls: release without the space fence.
    pub(crate) peer_polls: bool,
    /// Records consumed but lent out ([`Consumer::lend`]) whose payloads are still being
    /// copied: the tail stops at `held_from` until the last is given back.
    lent: u32,
    held_from: u64,
    /// Counts resets: a record lent in an earlier round is given back into nothing.
    round: u64,
}

/// Records [`Consumer::lend`] consumed while their payloads are copied out: given back
/// together with [`Consumer::give_back`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loan {
    round: u64,
    records: u32,
}

impl Producer {
    pub(crate) fn new(
        region: SharedRegion,
        data: usize,
        cap: u64,
        own_block: usize,
        peer_block: usize,
    ) -> Self {
        Producer {
            region,
            data,
            cap,
            own_block,
            peer_block,
            head: 0,
            head_off: 0,
            cached_tail: 0,
            published: 0,
            space_posted: 0,
            peer_polls: false,
            peer_numbers_armings: false,
            rang_for: 0,
            copies: 0,
            round: 0,
            stale_copies: 0,
        }
    }

    /// Brings this half to the empty state of a new link epoch and stores index 0.
    pub(crate) fn reset(&mut self) {
        self.stale_copies += std::mem::take(&mut self.copies);
        self.round += 1;
        self.head = 0;
        self.head_off = 0;
        self.cached_tail = 0;
        self.published = 0;
        self.space_posted = 0;
        self.peer_polls = false;
        self.peer_numbers_armings = false;
        self.rang_for = 0;
        self.restore_words();
    }

    /// Stores our words (`TX_HEAD`, `TX_NEED_SPACE`) from their local copies: after a
    /// reset, and whenever the link re-lays what it owns (a peer may have scribbled on
    /// them, PROTOCOL.md §3).
    pub(crate) fn restore_words(&self) {
        let own = self.own_block;
        self.region.store_u64(
            own + side::TX_NEED_SPACE,
            self.space_posted,
            Ordering::Relaxed,
        );
        // SYNC POINT head (as in publish): every record byte below `published` is written.
        // After a reset the Release store of our EPOCH or ACK that follows (SYNC POINT
        // epoch / ack in link.rs) publishes it too.
        self.region
            .store_u64(own + side::TX_HEAD, self.published, Ordering::Release);
    }

    /// Free bytes, re-reading the peer's tail only when the cached one says too few.
    #[inline]
    fn free(&mut self, want: u64) -> Result<u64, BadIndex> {
        let free = self.cap - (self.head - self.cached_tail);
        if free >= want {
            return Ok(free);
        }
        // SYNC POINT tail: Acquire pairs with the Release store of RX_TAIL in
        // Consumer::release: the reader has copied out every byte below it.
        let tail = self
            .region
            .load_u64(self.peer_block + side::RX_TAIL, Ordering::Acquire);
        // Indices never wrap in practice (2^64 bytes), so a tail beyond our head is
        // corruption even where the wrapping difference would look small.
        if tail > self.head
            || self.head - tail > self.cap
            || !(self.head - tail).is_multiple_of(RECORD_ALIGN)
        {
            return Err(BadIndex {
                peer_index: tail,
                own_index: self.head,
            });
        }
        self.cached_tail = tail;
        Ok(self.cap - (self.head - tail))
    }

    /// Finds room for a record of `rec` bytes, padding to the ring's end when it would not
    /// fit contiguously. Returns the region offset to write the record at, or `None` when
    /// the ring is too full (then [`Producer::space_target`] says what to wait for).
    #[inline]
    pub(crate) fn reserve(&mut self, rec: usize) -> Result<Option<usize>, BadIndex> {
        let rec = rec as u64;
        debug_assert!(rec.is_multiple_of(RECORD_ALIGN) && rec <= self.cap / 2);
        if self.stale_copies > 0 {
            return Ok(None);
        }
        let to_end = self.cap - self.head_off;
        let need = if to_end < rec { to_end + rec } else { rec };
        if self.free(need)? < need {
            return Ok(None);
        }
        if to_end < rec {
            let pad = Header {
                kind: Kind::Pad,
                flags: 0,
                len: (to_end - HEADER_LEN as u64) as u32,
                session: 0,
            };
            self.region
                .write(self.data + self.head_off as usize, &pad.encode());
            self.head += to_end;
            self.head_off = 0;
        }
        Ok(Some(self.data + self.head_off as usize))
    }

    /// The peer tail position at which a record of `rec` bytes fits.
    pub(crate) fn space_target(&self, rec: usize) -> u64 {
        let rec = rec as u64;
        let to_end = self.cap - self.head_off;
        let need = if to_end < rec { to_end + rec } else { rec };
        (self.head + need).saturating_sub(self.cap).max(1)
    }

    /// Accounts a record written at the offset [`Producer::reserve`] gave.
    #[inline]
    pub(crate) fn commit(&mut self, rec: usize) {
        self.head += rec as u64;
        self.head_off += rec as u64;
        if self.head_off == self.cap {
            self.head_off = 0;
        }
    }

    /// Writes a whole frame (header and payload) if it fits.
    pub(crate) fn push(&mut self, h: &Header, payload: &[u8]) -> Result<bool, BadIndex> {
        debug_assert_eq!(h.len as usize, payload.len());
        let rec = frame::record_len(payload.len());
        let Some(at) = self.reserve(rec)? else {
            return Ok(false);
        };
        self.region.write(at, &h.encode());
        self.region.write(at + HEADER_LEN, payload);
        self.commit(rec);
        Ok(true)
    }

    /// Writes a frame's header and commits its record, leaving the payload to be copied
    /// to [`CopySlot::at`] by the caller without the link's lock (a long copy then holds
    /// up neither the other writers nor the reads); [`Producer::finish_copy`] follows.
    pub(crate) fn reserve_copy(&mut self, h: &Header) -> Result<Option<CopySlot>, BadIndex> {
        let rec = frame::record_len(h.len as usize);
        let Some(at) = self.reserve(rec)? else {
            return Ok(None);
        };
        self.region.write(at, &h.encode());
        self.commit(rec);
        self.copies += 1;
        Ok(Some(CopySlot {
            at: at + HEADER_LEN,
            round: self.round,
        }))
    }

    /// A payload copy is done: what follows for the ring.
    pub(crate) fn finish_copy(&mut self, slot: CopySlot) -> CopyDone {
        if slot.round != self.round {
            self.stale_copies = self.stale_copies.saturating_sub(1);
            return if self.stale_copies == 0 {
                CopyDone::SpaceBack
            } else {
                CopyDone::Running
            };
        }
        self.copies = self.copies.saturating_sub(1);
        if self.copies == 0 {
            CopyDone::Publish
        } else {
            CopyDone::Running
        }
    }

    /// Whether anything is committed but not yet stored to shared memory.
    pub(crate) fn unpublished(&self) -> bool {
        self.head != self.published
    }

    /// Bytes written that the stored head does not cover yet.
    pub(crate) fn unpublished_len(&self) -> u64 {
        self.head - self.published
    }

    /// Stores the head so the reader sees every committed record, and says whether the
    /// reader asked to be woken.
    #[inline]
    pub(crate) fn publish(&mut self) -> bool {
        if self.head == self.published || self.copies > 0 {
            // With copies running, the last to finish stores the head.
            return false;
        }
        self.published = self.head;
        // SYNC POINT head: Release pairs with the Acquire load of TX_HEAD in
        // Consumer::available: every record byte below it is written.
        self.region
            .store_u64(self.own_block + side::TX_HEAD, self.head, Ordering::Release);
        if self.peer_polls {
            // The reader never sleeps (PROTOCOL.md §5): no flag to read, no fence to
            // order it, so the head store need not wait for the data lines to drain.
            return false;
        }
        // WAKEUP fence (publisher side): orders the head store before the flag load, so
        // either the reader's re-check sees the new head or we see its flag.
        fence(Ordering::SeqCst);
        let arming = self
            .region
            .load_u64(self.peer_block + side::RX_NEED_WAKEUP, Ordering::Relaxed);
        if arming == 0 {
            return false;
        }
        if self.peer_numbers_armings {
            // One ring per arming: a reader rung and not yet awake reads this record too
            // when it wakes, and it arms with a new number (and re-checks the head after
            // a fence) before it sleeps again. Our load missed that number, so its
            // re-check sees this head.
            if arming == self.rang_for {
                return false;
            }
            self.rang_for = arming;
        }
        true
    }

    /// Posts the tail position a blocked writer needs, then re-checks: `true` if the space
    /// is already there (the post is withdrawn), `false` if the caller should sleep.
    /// With `post` false (a polling writer, which promised never to post) it only
    /// re-checks.
    pub(crate) fn arm_space(&mut self, rec: usize, post: bool) -> Result<bool, BadIndex> {
        if self.stale_copies > 0 {
            // No space until the last stale copy is done ([`Producer::finish_copy`] says
            // so to whoever wakes the writers waiting for space).
            return Ok(false);
        }
        let target = self.space_target(rec);
        if post {
            self.space_posted = target;
            self.region.store_u64(
                self.own_block + side::TX_NEED_SPACE,
                target,
                Ordering::Relaxed,
            );
            // SPACE fence (writer side): orders the post before the tail re-read, pairing
            // with the fence in Consumer::release.
            fence(Ordering::SeqCst);
        }
        self.cached_tail = self.head.saturating_sub(self.cap); // force a re-read
        let to_end = self.cap - self.head_off;
        let need = if to_end < rec as u64 {
            to_end + rec as u64
        } else {
            rec as u64
        };
        if self.free(need)? >= need {
            self.disarm_space();
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether a posted space request is now met (the reader rang us for it): withdraws
    /// it, so that the caller wakes the writers waiting for space.
    pub(crate) fn space_ready(&mut self) -> bool {
        let want = self.space_posted;
        if want == 0 {
            return false;
        }
        // SYNC POINT tail (as in Producer::free).
        let tail = self
            .region
            .load_u64(self.peer_block + side::RX_TAIL, Ordering::Acquire);
        if tail < want || tail > self.head {
            return false;
        }
        self.disarm_space();
        true
    }

    /// Withdraws a posted space request.
    pub(crate) fn disarm_space(&mut self) {
        self.space_posted = 0;
        self.region
            .store_u64(self.own_block + side::TX_NEED_SPACE, 0, Ordering::Relaxed);
    }
}

/// A record found by [`Consumer::next`].
pub(crate) struct Record {
    pub header: Header,
    /// Region offset of the payload.
    pub payload_at: usize,
}

impl Consumer {
    /// How far it has read: the local tail (no shared word is read).
    pub(crate) fn position(&self) -> u64 {
        self.tail
    }

    pub(crate) fn new(
        region: SharedRegion,
        data: usize,
        cap: u64,
        own_block: usize,
        peer_block: usize,
    ) -> Self {
        Consumer {
            region,
            data,
            cap,
            own_block,
            peer_block,
            tail: 0,
            tail_off: 0,
            cached_head: 0,
            released: 0,
            wakeup_armed: 0,
            armings: 0,
            peer_polls: false,
            lent: 0,
            held_from: 0,
            round: 0,
        }
    }

    /// Brings this half to the empty state of a new link epoch and stores index 0.
    pub(crate) fn reset(&mut self) {
        self.tail = 0;
        self.tail_off = 0;
        self.cached_head = 0;
        self.released = 0;
        // `armings` goes on counting: a writer that has not yet seen the reset must not
        // find a number it has rung for already.
        self.wakeup_armed = 0;
        self.peer_polls = false;
        // Copies of the old round still running read bytes the new round may overwrite:
        // their readers drop them (the link reset ends their sessions).
        self.lent = 0;
        self.round += 1;
        self.restore_words();
    }

    /// Stores our words (`RX_TAIL`, `RX_NEED_WAKEUP`) from their local copies (as
    /// [`Producer::restore_words`]).
    pub(crate) fn restore_words(&self) {
        let own = self.own_block;
        self.region.store_u64(
            own + side::RX_NEED_WAKEUP,
            self.wakeup_armed,
            Ordering::Relaxed,
        );
        // SYNC POINT tail (as in release): we are done with every byte below `released`.
        self.region
            .store_u64(own + side::RX_TAIL, self.released, Ordering::Release);
    }

    /// Published bytes not yet consumed, re-reading the peer's head once.
    #[inline]
    pub(crate) fn available(&mut self) -> Result<u64, BadIndex> {
        // SYNC POINT head: Acquire pairs with the Release store of TX_HEAD in
        // Producer::publish.
        let head = self
            .region
            .load_u64(self.peer_block + side::TX_HEAD, Ordering::Acquire);
        // As in Producer::free: a head behind our tail is corruption, never a wrap.
        if head < self.tail
            || head - self.tail > self.cap
            || !(head - self.tail).is_multiple_of(RECORD_ALIGN)
        {
            return Err(BadIndex {
                peer_index: head,
                own_index: self.tail,
            });
        }
        self.cached_head = head;
        Ok(head - self.tail)
    }

    /// Whether the cached head says there is more to read (no shared read).
    pub(crate) fn has_cached(&self) -> bool {
        self.cached_head != self.tail
    }

    /// Copies out and checks the next record header within what [`Consumer::available`]
    /// last saw. `Ok(None)` when caught up. Pad records are consumed here.
    #[inline]
    pub(crate) fn next(&mut self, max_payload: usize) -> Result<Option<Record>, frame::FrameError> {
        loop {
            let used = self.cached_head - self.tail;
            if used == 0 {
                return Ok(None);
            }
            let to_end = (self.cap - self.tail_off) as usize;
            let contiguous = (used as usize).min(to_end);
            if contiguous < HEADER_LEN {
                return Err(frame::FrameError::Overrun);
            }
            let mut hb = [0u8; HEADER_LEN];
            let at = self.data + self.tail_off as usize;
            self.region.read(at, &mut hb);
            let header = Header::decode(&hb, max_payload, contiguous, to_end)?;
            if header.kind == Kind::Pad {
                self.tail += to_end as u64;
                self.tail_off = 0;
                continue;
            }
            return Ok(Some(Record {
                header,
                payload_at: at + HEADER_LEN,
            }));
        }
    }

    /// Copies payload bytes out of the ring into a private buffer.
    #[inline]
    pub(crate) fn read_payload(&self, at: usize, buf: &mut [u8]) {
        self.region.read(at, buf);
    }

    /// Appends `len` payload bytes at `at` to `out`.
    #[inline]
    pub(crate) fn append_payload(&self, at: usize, len: usize, out: &mut Vec<u8>) {
        self.region.read_append(at, len, out);
    }

    /// Consumes the record [`Consumer::next`] returned (locally; see release).
    #[inline]
    pub(crate) fn consume(&mut self, header: &Header) {
        let rec = frame::record_len(header.len as usize) as u64;
        self.tail += rec;
        self.tail_off += rec;
        if self.tail_off == self.cap {
            self.tail_off = 0;
        }
    }

    /// Consumes the record [`Consumer::next`] returned, as [`Consumer::consume`] does,
    /// while its payload is still to be copied out (without the caller's lock): the
    /// records after it can be read meanwhile, but no byte from it on is handed back to
    /// the writer until every loan is given back. The record joins `loan` (from
    /// [`Consumer::new_loan`]).
    pub(crate) fn lend(&mut self, header: &Header, loan: &mut Loan) {
        if self.lent == 0 {
            self.held_from = self.tail;
        }
        self.lent += 1;
        loan.records += 1;
        self.consume(header);
    }

    /// An empty loan of this round, for [`Consumer::lend`].
    pub(crate) fn new_loan(&self) -> Loan {
        Loan {
            round: self.round,
            records: 0,
        }
    }

    /// The payloads of `loan` are copied out; `true` when no loan is left (the tail may
    /// move). A loan of a round before a reset gives back nothing.
    pub(crate) fn give_back(&mut self, loan: Loan) -> bool {
        if loan.round == self.round {
            self.lent = self.lent.saturating_sub(loan.records);
        }
        self.lent == 0
    }

    /// Bytes consumed locally but not yet handed back to the writer.
    pub(crate) fn unreleased(&self) -> u64 {
        self.tail - self.released
    }

    /// Hands consumed bytes back to the writer (up to the first lent record while loans
    /// are out); says whether its blocked writer now has the space it posted (ring it).
    #[inline]
    pub(crate) fn release(&mut self) -> bool {
        let upto = if self.lent > 0 {
            self.held_from
        } else {
            self.tail
        };
        if upto <= self.released {
            return false;
        }
        self.released = upto;
        // SYNC POINT tail: Release pairs with the Acquire load of RX_TAIL in
        // Producer::free: we are done reading every byte below it (a lent payload's
        // copy comes before its give_back, under the caller's lock, and so before this).
        self.region
            .store_u64(self.own_block + side::RX_TAIL, upto, Ordering::Release);
        if self.peer_polls {
            // The writer never posts a space need (PROTOCOL.md §5).
            return false;
        }
        // SPACE fence (reader side): orders the tail store before reading the writer's
        // post, pairing with the fence in Producer::arm_space.
        fence(Ordering::SeqCst);
        let want = self
            .region
            .load_u64(self.peer_block + side::TX_NEED_SPACE, Ordering::Relaxed);
        want != 0 && upto >= want
    }

    /// Arms the need-wakeup flag and re-checks the peer's head: `true` if data is already
    /// there (the flag is withdrawn and the caller must not sleep).
    /// With `post` false (a polling reader, which promised never to set the flag) it
    /// only re-checks.
    pub(crate) fn arm_wakeup(&mut self, post: bool) -> Result<bool, BadIndex> {
        if post {
            // A new number for each arming: a writer rings once per number.
            self.armings = self.armings.wrapping_add(1).max(1);
            self.wakeup_armed = self.armings;
            self.region.store_u64(
                self.own_block + side::RX_NEED_WAKEUP,
                self.wakeup_armed,
                Ordering::Relaxed,
            );
            // WAKEUP fence (sleeper side): orders the flag store before the head re-read,
            // pairing with the fence in Producer::publish.
            fence(Ordering::SeqCst);
        }
        if self.available()? != 0 {
            self.disarm_wakeup();
            return Ok(true);
        }
        Ok(false)
    }

    /// Clears the need-wakeup flag (after waking).
    pub(crate) fn disarm_wakeup(&mut self) {
        self.wakeup_armed = 0;
        self.region
            .store_u64(self.own_block + side::RX_NEED_WAKEUP, 0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    //! The two halves over one ring in a heap region, the producer's side block standing
    //! for one side and the consumer's for the other: every index, word and record
    //! position checked exactly, including the ones a peer's bad index must not move.

    use super::*;
    use crate::shm::layout::{GUEST_BLOCK, HOST_BLOCK};
    use crate::wire::frame::FrameError;

    const CAP: u64 = 1024;
    const DATA: usize = 4096;
    const MAX: usize = (CAP / 2) as usize;
    /// The producer's side block (its TX words) and the consumer's (its RX words).
    const P: usize = HOST_BLOCK;
    const C: usize = GUEST_BLOCK;

    // Each test runs under a 20 s watchdog (`crate::test_watchdog`): a miscounted index
    // can make `Consumer::next` itself loop for ever, which must fail the run in seconds,
    // not stall it.

    fn pair() -> (SharedRegion, Producer, Consumer) {
        let r = SharedRegion::heap(16 << 10);
        let p = Producer::new(r.clone(), DATA, CAP, P, C);
        let c = Consumer::new(r.clone(), DATA, CAP, C, P);
        (r, p, c)
    }

    fn word(r: &SharedRegion, at: usize) -> u64 {
        r.load_u64(at, Ordering::Relaxed)
    }

    fn set(r: &SharedRegion, at: usize, v: u64) {
        r.store_u64(at, v, Ordering::Relaxed)
    }

    fn data(len: usize, session: u64) -> (Header, Vec<u8>) {
        let h = Header {
            kind: Kind::Data,
            flags: 0,
            len: len as u32,
            session,
        };
        let payload = (0..len)
            .map(|i| (i as u64 ^ (session * 31)) as u8)
            .collect();
        (h, payload)
    }

    /// Pushes one Data record of `rec` bytes (header included).
    fn push_rec(p: &mut Producer, rec: u64, session: u64) -> bool {
        let (h, payload) = data(rec as usize - HEADER_LEN, session);
        p.push(&h, &payload).unwrap()
    }

    /// Reads every published record, checks each, consumes it; returns (session, len).
    /// Bounded: a ring holds at most CAP / 16 records, so a reader that finds more (a
    /// miscounted index) fails here instead of looping for ever.
    fn drain(c: &mut Consumer) -> Vec<(u64, usize)> {
        c.available().unwrap();
        let mut got = Vec::new();
        loop {
            assert!(
                got.len() as u64 <= CAP / 16,
                "more records than a ring holds"
            );
            let Some(rec) = c.next(MAX).unwrap() else {
                return got;
            };
            let (want_h, want) = data(rec.header.len as usize, rec.header.session);
            assert_eq!(rec.header, want_h);
            let mut buf = vec![0u8; want.len()];
            c.read_payload(rec.payload_at, &mut buf);
            assert_eq!(buf, want, "payload of {:?}", rec.header);
            let mut appended = vec![0xee];
            c.append_payload(rec.payload_at, want.len(), &mut appended);
            assert_eq!(appended[1..], want[..]);
            c.consume(&rec.header);
            got.push((rec.header.session, want.len()));
        }
    }

    #[test]
    fn the_tail_waits_at_a_lent_record_until_every_loan_is_back() {
        let _w = crate::test_watchdog::watchdog(
            "the_tail_waits_at_a_lent_record_until_every_loan_is_back",
            20,
        );
        let (r, mut p, mut c) = pair();
        for id in 0..4 {
            assert!(push_rec(&mut p, 128, id));
        }
        p.publish();
        c.available().unwrap();
        // The first record is copied at once, the second and third lent on two loans.
        let first = c.next(MAX).unwrap().unwrap();
        c.consume(&first.header);
        let mut a = c.new_loan();
        let mut b = c.new_loan();
        let second = c.next(MAX).unwrap().unwrap();
        c.lend(&second.header, &mut a);
        let third = c.next(MAX).unwrap().unwrap();
        c.lend(&third.header, &mut b);
        // The ring reads on past the loans.
        let fourth = c.next(MAX).unwrap().unwrap();
        assert_eq!(fourth.header.session, 3);
        c.consume(&fourth.header);
        assert_eq!(c.position(), 512);
        // Only what is before the first lent record goes back to the writer.
        c.release();
        assert_eq!(word(&r, C + side::RX_TAIL), 128);
        assert!(!c.give_back(a), "a loan is still out");
        c.release();
        assert_eq!(word(&r, C + side::RX_TAIL), 128);
        assert!(c.give_back(b));
        c.release();
        assert_eq!(word(&r, C + side::RX_TAIL), 512);
        assert_eq!(c.unreleased(), 0);
    }

    #[test]
    fn a_loan_from_before_a_reset_gives_back_nothing() {
        let _w =
            crate::test_watchdog::watchdog("a_loan_from_before_a_reset_gives_back_nothing", 20);
        let (r, mut p, mut c) = pair();
        assert!(push_rec(&mut p, 128, 1));
        p.publish();
        c.available().unwrap();
        let mut old = c.new_loan();
        let rec = c.next(MAX).unwrap().unwrap();
        c.lend(&rec.header, &mut old);
        c.reset();
        p.reset();
        // The new round lends a record of its own.
        assert!(push_rec(&mut p, 64, 2));
        assert!(push_rec(&mut p, 64, 3));
        p.publish();
        c.available().unwrap();
        let mut new = c.new_loan();
        let rec = c.next(MAX).unwrap().unwrap();
        c.lend(&rec.header, &mut new);
        let rec = c.next(MAX).unwrap().unwrap();
        c.consume(&rec.header);
        // The old loan coming back does not free the new one's record.
        assert!(!c.give_back(old));
        c.release();
        assert_eq!(word(&r, C + side::RX_TAIL), 0);
        assert!(c.give_back(new));
        c.release();
        assert_eq!(word(&r, C + side::RX_TAIL), 128);
    }

    #[test]
    fn records_cross_the_ring_end_behind_an_exact_pad() {
        let _w =
            crate::test_watchdog::watchdog("records_cross_the_ring_end_behind_an_exact_pad", 20);
        let (r, mut p, mut c) = pair();
        // Sizes chosen so that records end exactly at the ring's end, leave 16, 32 or
        // more bytes before it (a pad of each size), and wrap many times.
        let sizes = [
            64u64, 128, 512, 304, 16, 32, 496, 512, 48, 512, 16, 400, 112, 512, 512, 80,
        ];
        let (mut head, mut tail) = (0u64, 0u64);
        for round in 0..40u64 {
            for (i, &rec) in sizes.iter().enumerate() {
                let id = round * 100 + i as u64;
                let off = head % CAP;
                let to_end = CAP - off;
                let pad = if to_end < rec { to_end } else { 0 };
                if head + pad + rec - tail > CAP {
                    // Full: the reader takes everything, then there is room again.
                    assert!(!push_rec(&mut p, rec, id), "overfilled at {head}");
                    assert_eq!(p.head, head, "a refused push moved the head");
                    assert!(p.publish() || !p.unpublished());
                    let got = drain(&mut c);
                    assert!(!got.is_empty());
                    assert_eq!(c.tail, head);
                    assert_eq!(c.tail_off, head % CAP);
                    assert_eq!(c.unreleased(), head - tail);
                    assert!(!c.release());
                    tail = head;
                    assert_eq!(word(&r, C + side::RX_TAIL), tail);
                    assert_eq!(c.unreleased(), 0);
                }
                let at = p.reserve(rec as usize).unwrap().expect("room");
                if pad > 0 {
                    let mut hb = [0u8; HEADER_LEN];
                    r.read(DATA + off as usize, &mut hb);
                    let h = Header::decode(&hb, MAX, pad as usize, pad as usize).unwrap();
                    assert_eq!((h.kind, h.len as u64), (Kind::Pad, pad - 16));
                    assert_eq!(at, DATA, "a record after a pad starts at offset 0");
                } else {
                    assert_eq!(at, DATA + off as usize);
                }
                // reserve alone does not account the record: push it for real.
                let (h, payload) = data(rec as usize - HEADER_LEN, id);
                r.write(at, &h.encode());
                r.write(at + HEADER_LEN, &payload);
                p.commit(rec as usize);
                head += pad + rec;
                assert_eq!(p.head, head);
                assert_eq!(p.head_off, head % CAP);
                assert!(p.unpublished());
            }
        }
        p.publish();
        drain(&mut c);
        assert_eq!(c.tail, head);
    }

    #[test]
    fn push_writes_header_then_payload_and_publish_stores_the_head() {
        let _w = crate::test_watchdog::watchdog(
            "push_writes_header_then_payload_and_publish_stores_the_head",
            20,
        );
        let (r, mut p, mut c) = pair();
        assert!(!p.unpublished());
        let (h, payload) = data(40, 9);
        assert!(p.push(&h, &payload).unwrap());
        assert_eq!(p.head, 64);
        assert!(p.unpublished());
        assert_eq!(word(&r, P + side::TX_HEAD), 0, "published before publish");
        assert_eq!(c.available().unwrap(), 0);
        assert!(!c.has_cached());
        assert!(!p.publish(), "nobody asked to be woken");
        assert!(!p.unpublished());
        assert_eq!(word(&r, P + side::TX_HEAD), 64);
        assert_eq!(c.available().unwrap(), 64);
        assert!(c.has_cached());
        assert_eq!(drain(&mut c), vec![(9, 40)]);
        assert!(!c.has_cached());
        assert_eq!(c.next(MAX).unwrap().map(|r| r.header), None);
    }

    #[test]
    fn a_header_only_record_and_a_header_only_pad_are_read() {
        let _w = crate::test_watchdog::watchdog(
            "a_header_only_record_and_a_header_only_pad_are_read",
            20,
        );
        let (r, mut p, mut c) = pair();
        let shut = Header {
            kind: Kind::Shutdown,
            flags: 0,
            len: 0,
            session: 5,
        };
        // Alone in the ring: 16 bytes used.
        assert!(p.push(&shut, &[]).unwrap());
        p.publish();
        assert_eq!(c.available().unwrap(), 16);
        let rec = c.next(MAX).unwrap().expect("the Shutdown");
        assert_eq!(rec.header, shut);
        assert_eq!(rec.payload_at, DATA + HEADER_LEN);
        c.consume(&rec.header);
        assert!(c.next(MAX).unwrap().is_none());
        // Up to 16 bytes before the ring's end, then a 32-byte record: a 16-byte pad.
        for _ in 0..8 {
            if p.head_off == CAP - 16 {
                break;
            }
            let rec = (CAP - 16 - p.head_off).min(256);
            assert!(push_rec(&mut p, rec, 1));
            p.publish();
            drain(&mut c);
            c.release();
        }
        assert_eq!(p.head_off, CAP - 16);
        assert!(push_rec(&mut p, 32, 2));
        assert_eq!(p.head_off, 32);
        p.publish();
        assert_eq!(c.available().unwrap(), 48);
        let rec = c.next(MAX).unwrap().expect("the record after the pad");
        assert_eq!(rec.payload_at, DATA + HEADER_LEN);
        assert_eq!(c.tail_off, 0, "the pad is consumed");
        assert_eq!(c.tail, p.head - 32);
        c.consume(&rec.header);
        assert_eq!(c.tail, p.head);
        let _ = r;
    }

    #[test]
    fn a_bad_header_is_an_error_not_a_record() {
        let _w = crate::test_watchdog::watchdog("a_bad_header_is_an_error_not_a_record", 20);
        let (r, mut p, mut c) = pair();
        assert!(push_rec(&mut p, 32, 1));
        p.publish();
        r.write(DATA, &[42]);
        c.available().unwrap();
        assert_eq!(c.next(MAX).err(), Some(FrameError::BadKind(42)));
    }

    /// Fills the ring exactly (16 records of 64 bytes), nothing released.
    fn full() -> (SharedRegion, Producer, Consumer) {
        let (r, mut p, c) = pair();
        for i in 0..16 {
            assert!(push_rec(&mut p, 64, i));
        }
        assert!(!push_rec(&mut p, 64, 99));
        assert!(!push_rec(&mut p, 32, 99));
        assert_eq!(p.reserve(32).unwrap(), None);
        p.publish();
        (r, p, c)
    }

    #[test]
    fn the_free_space_follows_the_readers_tail_and_rejects_bad_ones() {
        let _w = crate::test_watchdog::watchdog(
            "the_free_space_follows_the_readers_tail_and_rejects_bad_ones",
            20,
        );
        let (r, mut p, _c) = full();
        assert_eq!(p.head, CAP);
        let tail_at = C + side::RX_TAIL;
        let probe = |p: &mut Producer, tail: u64| {
            set(&r, tail_at, tail);
            p.cached_tail = 0;
            p.free(16)
        };
        let bad = |tail| {
            Err(BadIndex {
                peer_index: tail,
                own_index: CAP,
            })
        };
        assert_eq!(probe(&mut p, 0), Ok(0), "a full ring is valid");
        assert_eq!(p.cached_tail, 0);
        assert_eq!(probe(&mut p, 16), Ok(16));
        assert_eq!(p.cached_tail, 16);
        assert_eq!(probe(&mut p, 48), Ok(48));
        assert_eq!(probe(&mut p, CAP), Ok(CAP), "a tail at our head: empty");
        assert_eq!(p.cached_tail, CAP);
        assert_eq!(probe(&mut p, CAP + 16), bad(CAP + 16));
        assert_eq!(probe(&mut p, 8), bad(8));
        assert_eq!(probe(&mut p, u64::MAX - 15), bad(u64::MAX - 15));
        // The cached tail answers without a read while it says enough.
        set(&r, tail_at, CAP + 16);
        p.cached_tail = 64;
        assert_eq!(p.free(64), Ok(64));
        assert_eq!(p.free(32), Ok(64));
        assert_eq!(p.free(65), bad(CAP + 16));
        // Then with our head a whole ring further on: a tail more than a ring behind.
        set(&r, tail_at, CAP);
        p.cached_tail = CAP;
        for i in 0..16 {
            assert!(push_rec(&mut p, 64, i));
        }
        assert_eq!(p.head, 2 * CAP);
        let own = 2 * CAP;
        for tail in [CAP - 16, 0, 16] {
            set(&r, tail_at, tail);
            p.cached_tail = CAP;
            assert_eq!(
                p.free(16),
                Err(BadIndex {
                    peer_index: tail,
                    own_index: own,
                })
            );
        }
        set(&r, tail_at, CAP + 32);
        p.cached_tail = CAP;
        assert_eq!(p.free(16), Ok(32));
        assert_eq!(p.cached_tail, CAP + 32);
        set(&r, tail_at, CAP + 40);
        p.cached_tail = CAP;
        assert!(p.free(16).is_err(), "unaligned");
        // A bad index reaches the writer through reserve and push.
        set(&r, tail_at, 3 * CAP);
        p.cached_tail = CAP;
        assert!(p.reserve(64).is_err());
        assert!(p.push(&data(0, 1).0, &[]).is_err());
        assert_eq!(p.head, own, "a bad index moved nothing");
    }

    #[test]
    fn space_targets_count_the_pad_a_record_needs() {
        let _w = crate::test_watchdog::watchdog("space_targets_count_the_pad_a_record_needs", 20);
        let (_r, mut p, _c) = pair();
        assert_eq!(p.space_target(64), 1, "fits now: any tail will do");
        // 960 bytes in: 64 to the end, a 64-byte record fits exactly, no pad.
        for i in 0..15 {
            assert!(push_rec(&mut p, 64, i));
        }
        assert_eq!(p.space_target(64), 1);
        assert_eq!(p.space_target(80), 960 + 64 + 80 - CAP);
        // arm_space's own count agrees: exactly 64 free, exactly 64 to the end.
        assert_eq!(p.arm_space(64, true), Ok(true));
        assert_eq!(p.arm_space(80, false), Ok(false));
        // 992 bytes in: 32 to the end, a 64-byte record needs them too.
        assert!(push_rec(&mut p, 32, 15));
        assert_eq!(p.head_off, 992);
        assert_eq!(p.space_target(64), 992 + 32 + 64 - CAP);
        assert_eq!(p.space_target(32), 1);
        assert_eq!(p.space_target(16), 1);
    }

    #[test]
    fn arm_space_posts_what_the_writer_needs_and_the_reader_rings_for_it() {
        let _w = crate::test_watchdog::watchdog(
            "arm_space_posts_what_the_writer_needs_and_the_reader_rings_for_it",
            20,
        );
        let (r, mut p, mut c) = full();
        let posted = P + side::TX_NEED_SPACE;
        assert!(!p.space_ready(), "nothing posted");
        // Not posting (a polling writer): only the re-check.
        assert_eq!(p.arm_space(64, false), Ok(false));
        assert_eq!(word(&r, posted), 0);
        assert_eq!(p.space_posted, 0);
        assert_eq!(p.arm_space(64, true), Ok(false));
        assert_eq!(word(&r, posted), 64);
        assert_eq!(p.space_posted, 64);
        assert!(!p.space_ready());
        // The reader consumes one record of 48 bytes' worth... not enough yet.
        c.available().unwrap();
        let rec = c.next(MAX).unwrap().unwrap();
        let mut short = rec.header;
        short.len = 16;
        c.consume(&short);
        assert!(!c.release(), "32 freed, 64 posted");
        assert_eq!(word(&r, C + side::RX_TAIL), 32);
        assert!(!p.space_ready());
        assert_eq!(word(&r, posted), 64, "still posted");
        set(&r, C + side::RX_TAIL, 48);
        assert!(!p.space_ready());
        // Exactly the target.
        set(&r, C + side::RX_TAIL, 64);
        assert!(p.space_ready());
        assert_eq!((p.space_posted, word(&r, posted)), (0, 0), "withdrawn");
        assert!(!p.space_ready(), "withdrawn: nothing to report again");
        // Posted again; the whole ring consumed (tail at our head) is ready too.
        set(&r, C + side::RX_TAIL, 32);
        assert_eq!(p.arm_space(64, true), Ok(false));
        set(&r, C + side::RX_TAIL, CAP);
        assert!(p.space_ready());
        // A tail past our head is not space.
        set(&r, C + side::RX_TAIL, 32);
        assert_eq!(p.arm_space(64, true), Ok(false));
        set(&r, C + side::RX_TAIL, CAP + 16);
        assert!(!p.space_ready());
        assert_eq!(word(&r, posted), 64);
        // Space already there: the post is withdrawn at once.
        set(&r, C + side::RX_TAIL, 64);
        assert_eq!(p.arm_space(64, true), Ok(true));
        assert_eq!((p.space_posted, word(&r, posted)), (0, 0));
        set(&r, C + side::RX_TAIL, 48);
        assert_eq!(p.arm_space(64, true), Ok(false));
        p.disarm_space();
        assert_eq!((p.space_posted, word(&r, posted)), (0, 0));
        // A bad tail is an error here too.
        set(&r, C + side::RX_TAIL, CAP + 16);
        assert!(p.arm_space(64, true).is_err());
    }

    #[test]
    fn arm_space_counts_the_pad_and_the_reader_rings_at_the_target() {
        let _w = crate::test_watchdog::watchdog(
            "arm_space_counts_the_pad_and_the_reader_rings_at_the_target",
            20,
        );
        let (r, mut p, mut c) = pair();
        for i in 0..15 {
            assert!(push_rec(&mut p, 64, i));
        }
        assert!(push_rec(&mut p, 32, 15));
        p.publish();
        // 992 in, 32 to the end: a 64-byte record needs 96 free, a tail of 64.
        set(&r, C + side::RX_TAIL, 32);
        assert_eq!(p.arm_space(64, true), Ok(false), "64 free, 96 needed");
        assert_eq!(word(&r, P + side::TX_NEED_SPACE), 64);
        set(&r, C + side::RX_TAIL, 64);
        assert_eq!(p.arm_space(64, true), Ok(true));
        // The reader side: release says whether the posted target is met.
        set(&r, C + side::RX_TAIL, 0);
        assert_eq!(p.arm_space(64, true), Ok(false));
        c.available().unwrap();
        let rec = c.next(MAX).unwrap().unwrap();
        assert_eq!(rec.header.len, 48);
        let mut part = rec.header;
        part.len = 32;
        c.consume(&part);
        assert_eq!(c.unreleased(), 48);
        assert!(!c.release(), "48 < 64");
        assert_eq!(c.unreleased(), 0);
        let rec = c.next(MAX);
        assert!(rec.is_err(), "mid-record: garbage, as expected");
        part.len = 0;
        c.consume(&part);
        assert_eq!(c.tail, 64);
        assert!(c.release(), "64 reached");
        c.peer_polls = true;
        c.consume(&part);
        assert!(!c.release(), "a polling writer is never rung");
        assert_eq!(word(&r, C + side::RX_TAIL), 80);
        c.peer_polls = false;
        assert!(!c.release(), "nothing new released");
    }

    #[test]
    fn the_reader_is_rung_only_when_it_asked() {
        let _w = crate::test_watchdog::watchdog("the_reader_is_rung_only_when_it_asked", 20);
        let (r, mut p, mut c) = pair();
        let flag = C + side::RX_NEED_WAKEUP;
        assert_eq!(c.arm_wakeup(true), Ok(false));
        assert_eq!(c.wakeup_armed, 1);
        assert_eq!(word(&r, flag), 1);
        assert!(!p.publish(), "nothing to publish");
        assert!(push_rec(&mut p, 32, 1));
        assert!(p.publish(), "armed: ring it");
        assert!(!p.publish(), "nothing new");
        assert_eq!(c.arm_wakeup(true), Ok(true), "data already there");
        assert_eq!(c.wakeup_armed, 0);
        assert_eq!(word(&r, flag), 0);
        assert!(push_rec(&mut p, 32, 2));
        assert!(!p.publish(), "not armed");
        drain(&mut c);
        assert_eq!(c.arm_wakeup(false), Ok(false));
        assert_eq!(word(&r, flag), 0, "a polling reader never posts");
        assert_eq!(c.arm_wakeup(true), Ok(false));
        p.peer_polls = true;
        assert!(push_rec(&mut p, 32, 3));
        assert!(!p.publish(), "the reader polls: no wakeup");
        assert_eq!(word(&r, P + side::TX_HEAD), 96);
        c.disarm_wakeup();
        assert_eq!(c.wakeup_armed, 0);
        assert_eq!(word(&r, flag), 0);
        set(&r, P + side::TX_HEAD, 8);
        assert!(c.arm_wakeup(true).is_err());
    }

    /// A reader that numbers its armings is rung once per arming: a second publish before
    /// it arms again finds the number it was rung for. One that does not is rung on every
    /// publish that finds its flag set. A reset forgets the number.
    #[test]
    fn a_numbering_reader_is_rung_once_per_arming() {
        let _w = crate::test_watchdog::watchdog("a_numbering_reader_is_rung_once_per_arming", 20);
        let (r, mut p, mut c) = pair();
        let flag = C + side::RX_NEED_WAKEUP;
        p.peer_numbers_armings = true;
        assert_eq!(c.arm_wakeup(true), Ok(false));
        let first = word(&r, flag);
        assert_ne!(first, 0);
        assert!(push_rec(&mut p, 32, 1));
        assert!(p.publish(), "armed: ring it");
        assert!(push_rec(&mut p, 32, 2));
        assert!(!p.publish(), "rung for this arming already");
        drain(&mut c);
        c.disarm_wakeup();
        assert_eq!(c.arm_wakeup(true), Ok(false));
        assert_ne!(word(&r, flag), first, "a new number");
        assert!(push_rec(&mut p, 32, 3));
        assert!(p.publish(), "a new arming: ring it");
        // A reader that does not number (the peer's ARMINGS is not 1), or a number the
        // writer has not seen since its reset, is rung again.
        p.peer_numbers_armings = false;
        assert!(push_rec(&mut p, 32, 4));
        assert!(p.publish(), "no numbering: every publish");
        drain(&mut c);
        p.reset();
        c.reset();
        assert_eq!(word(&r, flag), 0);
        p.peer_numbers_armings = true;
        assert_eq!(c.arm_wakeup(true), Ok(false));
        assert!(word(&r, flag) > first, "numbers go on across a reset");
        assert!(push_rec(&mut p, 32, 5));
        assert!(p.publish(), "the first ring of the epoch");
    }

    #[test]
    fn the_published_head_is_checked_against_our_tail() {
        let _w =
            crate::test_watchdog::watchdog("the_published_head_is_checked_against_our_tail", 20);
        let (r, mut p, mut c) = pair();
        for i in 0..4 {
            assert!(push_rec(&mut p, 64, i));
        }
        p.publish();
        drain(&mut c);
        assert_eq!(c.tail, 256);
        let head_at = P + side::TX_HEAD;
        let bad = |head| {
            Err(BadIndex {
                peer_index: head,
                own_index: 256,
            })
        };
        for (head, want) in [
            (256, Ok(0)),
            (272, Ok(16)),
            (256 + CAP, Ok(CAP)),
            (240, bad(240)),
            (0, bad(0)),
            (264, bad(264)),
            (256 + CAP + 16, bad(256 + CAP + 16)),
            (u64::MAX - 15, bad(u64::MAX - 15)),
        ] {
            set(&r, head_at, head);
            assert_eq!(c.available(), want, "head {head}");
            if want.is_ok() {
                assert_eq!(c.cached_head, head);
                assert_eq!(c.has_cached(), head != 256);
            }
        }
    }

    #[test]
    fn words_are_restored_from_the_local_copies_and_reset_to_zero() {
        let _w = crate::test_watchdog::watchdog(
            "words_are_restored_from_the_local_copies_and_reset_to_zero",
            20,
        );
        let (r, mut p, mut c) = full();
        assert_eq!(p.arm_space(64, true), Ok(false));
        c.available().unwrap();
        let rec = c.next(MAX).unwrap().unwrap();
        c.consume(&rec.header);
        c.release();
        assert_eq!(c.arm_wakeup(true), Ok(true));
        c.wakeup_armed = 1;
        let words = [
            P + side::TX_HEAD,
            P + side::TX_NEED_SPACE,
            C + side::RX_TAIL,
            C + side::RX_NEED_WAKEUP,
        ];
        // A peer scribbles on every word; the owners write theirs back.
        for w in words {
            set(&r, w, 0xdead_beef);
        }
        p.restore_words();
        c.restore_words();
        let got: Vec<u64> = words.iter().map(|&w| word(&r, w)).collect();
        assert_eq!(got, [CAP, 64, 64, 1]);
        // Reset: everything back to the empty state of a new epoch.
        for w in words {
            set(&r, w, 0xdead_beef);
        }
        p.peer_polls = true;
        c.peer_polls = true;
        p.reset();
        c.reset();
        let got: Vec<u64> = words.iter().map(|&w| word(&r, w)).collect();
        assert_eq!(got, [0, 0, 0, 0]);
        assert!(!p.peer_polls && !c.peer_polls);
        assert_eq!(
            (p.head, p.head_off, p.cached_tail, p.published),
            (0, 0, 0, 0)
        );
        assert_eq!(p.space_posted, 0);
        assert_eq!(
            (c.tail, c.tail_off, c.cached_head, c.released),
            (0, 0, 0, 0)
        );
        assert!(c.wakeup_armed == 0 && !c.has_cached());
        assert_eq!(p.reserve(64).unwrap(), Some(DATA));
        assert_eq!(c.available().unwrap(), 0);
    }

    #[test]
    fn a_record_copied_outside_the_lock_is_published_after_the_last_copy() {
        let _w = crate::test_watchdog::watchdog(
            "a_record_copied_outside_the_lock_is_published_after_the_last_copy",
            20,
        );
        let (r, mut p, mut c) = pair();
        let (h1, big) = data(200, 1);
        let slot1 = p.reserve_copy(&h1).unwrap().expect("room");
        // A small record behind it, copied at once, and a second reserved one.
        assert!(push_rec(&mut p, 64, 2));
        let (h3, big3) = data(100, 3);
        let slot3 = p.reserve_copy(&h3).unwrap().expect("room");
        assert!(!p.publish(), "copies running: nothing stored");
        assert_eq!(word(&r, P + side::TX_HEAD), 0);
        assert!(p.unpublished());
        r.write(slot3.at, &big3);
        assert_eq!(p.finish_copy(slot3), CopyDone::Running);
        assert!(!p.publish());
        assert_eq!(c.available().unwrap(), 0, "the reader sees nothing yet");
        r.write(slot1.at, &big);
        assert_eq!(p.finish_copy(slot1), CopyDone::Publish);
        p.publish();
        assert_eq!(drain(&mut c), [(1, 200), (2, 48), (3, 100)]);
    }

    #[test]
    fn a_copy_running_across_a_reset_holds_the_ring_until_it_is_done() {
        let _w = crate::test_watchdog::watchdog(
            "a_copy_running_across_a_reset_holds_the_ring_until_it_is_done",
            20,
        );
        let (r, mut p, mut c) = pair();
        let (h, big) = data(200, 1);
        let stale = p.reserve_copy(&h).unwrap().expect("room");
        p.reset();
        c.reset();
        // The stale copy still writes where the new round's first record would go.
        assert_eq!(p.reserve(64).unwrap(), None);
        assert_eq!(p.arm_space(64, true), Ok(false));
        assert!(!push_rec(&mut p, 64, 2));
        r.write(stale.at, &big);
        assert_eq!(p.finish_copy(stale), CopyDone::SpaceBack);
        // Nothing of the old round is published; the new round starts at index 0.
        assert!(!p.publish());
        assert_eq!(word(&r, P + side::TX_HEAD), 0);
        assert!(push_rec(&mut p, 64, 2));
        p.publish();
        assert_eq!(drain(&mut c), [(2, 48)]);
    }
}

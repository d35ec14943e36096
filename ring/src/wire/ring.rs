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
    /// Our `RX_NEED_WAKEUP` as last stored (never read back, as `space_posted`).
    wakeup_armed: bool,
    /// The writer said it polls: release without the space fence.
    pub(crate) peer_polls: bool,
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
        }
    }

    /// Brings this half to the empty state of a new link epoch and stores index 0.
    pub(crate) fn reset(&mut self) {
        self.head = 0;
        self.head_off = 0;
        self.cached_tail = 0;
        self.published = 0;
        self.space_posted = 0;
        self.peer_polls = false;
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

    /// Whether anything is committed but not yet stored to shared memory.
    pub(crate) fn unpublished(&self) -> bool {
        self.head != self.published
    }

    /// Stores the head so the reader sees every committed record, and says whether the
    /// reader asked to be woken.
    #[inline]
    pub(crate) fn publish(&mut self) -> bool {
        if self.head == self.published {
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
        self.region
            .load_u64(self.peer_block + side::RX_NEED_WAKEUP, Ordering::Relaxed)
            != 0
    }

    /// Posts the tail position a blocked writer needs, then re-checks: `true` if the space
    /// is already there (the post is withdrawn), `false` if the caller should sleep.
    /// With `post` false (a polling writer, which promised never to post) it only
    /// re-checks.
    pub(crate) fn arm_space(&mut self, rec: usize, post: bool) -> Result<bool, BadIndex> {
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
            wakeup_armed: false,
            peer_polls: false,
        }
    }

    /// Brings this half to the empty state of a new link epoch and stores index 0.
    pub(crate) fn reset(&mut self) {
        self.tail = 0;
        self.tail_off = 0;
        self.cached_head = 0;
        self.released = 0;
        self.wakeup_armed = false;
        self.peer_polls = false;
        self.restore_words();
    }

    /// Stores our words (`RX_TAIL`, `RX_NEED_WAKEUP`) from their local copies (as
    /// [`Producer::restore_words`]).
    pub(crate) fn restore_words(&self) {
        let own = self.own_block;
        self.region.store_u64(
            own + side::RX_NEED_WAKEUP,
            u64::from(self.wakeup_armed),
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

    /// Bytes consumed locally but not yet handed back to the writer.
    pub(crate) fn unreleased(&self) -> u64 {
        self.tail - self.released
    }

    /// Hands consumed bytes back to the writer; says whether its blocked writer now has
    /// the space it posted (ring it).
    #[inline]
    pub(crate) fn release(&mut self) -> bool {
        if self.tail == self.released {
            return false;
        }
        self.released = self.tail;
        // SYNC POINT tail: Release pairs with the Acquire load of RX_TAIL in
        // Producer::free: we are done reading every byte below it.
        self.region
            .store_u64(self.own_block + side::RX_TAIL, self.tail, Ordering::Release);
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
        want != 0 && self.tail >= want
    }

    /// Arms the need-wakeup flag and re-checks the peer's head: `true` if data is already
    /// there (the flag is withdrawn and the caller must not sleep).
    /// With `post` false (a polling reader, which promised never to set the flag) it
    /// only re-checks.
    pub(crate) fn arm_wakeup(&mut self, post: bool) -> Result<bool, BadIndex> {
        if post {
            self.wakeup_armed = true;
            self.region
                .store_u64(self.own_block + side::RX_NEED_WAKEUP, 1, Ordering::Relaxed);
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
        self.wakeup_armed = false;
        self.region
            .store_u64(self.own_block + side::RX_NEED_WAKEUP, 0, Ordering::Relaxed);
    }
}

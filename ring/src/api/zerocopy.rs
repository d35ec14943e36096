//! Zero-copy sends and receives: fill a frame in place in the ring, read one in place.
//!
//! # Writing
//! [`Session::reserve`] waits for credit and ring space for one frame of `len` bytes and
//! returns a [`WriteSlot`]. The slot is filled through bounds-checked copies
//! ([`WriteSlot::write_at`], [`WriteSlot::fill_with`]): no `&mut [u8]` into shared memory
//! is ever handed out, since the peer can read (and a hostile one write) those bytes at
//! any time. [`WriteSlot::commit`] publishes the frame; dropping the slot abandons it
//! (nothing is sent, no credit is used). The link's lock is held while the slot lives:
//! fill it and commit promptly, without blocking on anything else.
//!
//! Bytes of the slot that are not written are sent as whatever the ring held there
//! (earlier frames of this link): write every byte you commit.
//!
//! # Reading
//! [`Session::recv_in_place`] returns a [`ReadView`] of the next frame of the session,
//! left where the peer wrote it. Dropping the view releases the frame (the ring space
//! goes back to the writer and the bytes count as consumed for credit). While a view is
//! held the link's receive side waits behind it: other sessions on the link receive
//! nothing new until it is dropped. A frame parked for an in-place reader that does not
//! come for it within [`PARK_MAX`] is copied out as usual.
//!
//! What a reader may assume about a view, whatever the peer does:
//! - its length is fixed: it was read once from the header, checked against the frame
//!   limit, the session's receive buffer and the published part of the ring;
//! - every access is bounds-checked against that length and stays inside the ring;
//! - nothing else: the bytes can change between two reads of the view (a hostile peer
//!   may keep writing them). Copy once ([`ReadView::read_at`], [`ReadView::copy_to`],
//!   [`ReadView::for_each_chunk`]) and validate the copy, never a second read.
//!
//! In message mode a view is one whole message when it fit one frame
//! ([`crate::Endpoint::max_frame`]); longer messages come as an owned copy. Data that
//! arrived before the session turned to in-place reads also comes as an owned copy.

use crate::api::endpoint::Session;
use crate::link::park::Taken;
pub use crate::link::park::PARK_MAX;
use crate::link::{reset_error, Actions};
use crate::runtime::{Patience, Shared};
use std::io;
impl Session {
    /// Reserves ring space for one frame of `len` bytes (1 to [`crate::Endpoint::max_frame`],
    /// within the peer's receive buffer), waiting for credit and space as `write` does.
    /// In message mode the committed frame is one whole message.
    pub fn reserve(&mut self, len: usize) -> io::Result<WriteSlot<'_>> {
        let (id, gen) = (self.id, self.gen);
        let deadline = Session::deadline(self.write_timeout);
        let sh: &Shared = &self.shared;
        let (link, at) = sh.wait_session_locked(
            id,
            deadline,
            Patience::nonblocking(self.nonblocking),
            |l, out| {
                if l.gen() != gen {
                    return Err(reset_error(l));
                }
                l.zc_reserve(id, len, out)
            },
        )?;
        Ok(WriteSlot {
            link,
            shared: sh,
            id,
            at,
            len,
            eor: self.message,
        })
    }

    /// The next frame of the session, in place in the ring (see the module docs for what
    /// may be assumed of it). `Ok(None)` at EOF. Waits as `read` does.
    pub fn recv_in_place(&mut self) -> io::Result<Option<ReadView<'_>>> {
        let (id, gen) = (self.id, self.gen);
        let deadline = Session::deadline(self.read_timeout);
        let sh: &Shared = &self.shared;
        let (link, taken) = sh.wait_session_locked(
            id,
            deadline,
            Patience::nonblocking(self.nonblocking),
            |l, out| {
                if l.gen() != gen {
                    return Err(reset_error(l));
                }
                l.zc_take(id, out)
            },
        )?;
        let region = link.region().clone();
        drop(link);
        let src = match taken {
            Taken::Eof => return Ok(None),
            Taken::Owned(v) => Src::Owned(v),
            Taken::Ring { at, len, eor } => Src::Ring {
                region,
                at,
                len,
                eor,
            },
        };
        Ok(Some(ReadView {
            shared: sh,
            id,
            gen,
            src,
        }))
    }
}

/// Ring space for one frame, filled in place and then committed (see the module docs).
pub struct WriteSlot<'a> {
    link: crate::runtime::LinkGuard<'a>,
    shared: &'a Shared,
    id: u64,
    /// Region offset of the payload.
    at: usize,
    len: usize,
    eor: bool,
}

impl WriteSlot<'_> {
    /// Bytes in the slot.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slot holds no bytes (never: slots hold at least one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `data` into the slot at `off`. Panics if it runs past the slot.
    #[inline]
    pub fn write_at(&mut self, off: usize, data: &[u8]) {
        assert!(
            off <= self.len && data.len() <= self.len - off,
            "write of {}+{} past a slot of {}",
            off,
            data.len(),
            self.len
        );
        self.link.region().write(self.at + off, data);
    }

    /// Fills the whole slot chunk by chunk: `f(offset, chunk)` fills a private buffer of up
    /// to 512 bytes that is then copied into the ring.
    pub fn fill_with(&mut self, mut f: impl FnMut(usize, &mut [u8])) {
        let mut buf = [0u8; 512];
        let mut off = 0;
        while off < self.len {
            let n = (self.len - off).min(buf.len());
            f(off, &mut buf[..n]);
            self.link.region().write(self.at + off, &buf[..n]);
            off += n;
        }
    }

    /// Sends the frame: all `len` bytes of the slot.
    pub fn commit(mut self) {
        let mut out = Actions::default();
        self.link
            .zc_commit(self.id, self.at, self.len, self.eor, &mut out);
        self.shared.act(&self.link, out);
    }
}

enum Src {
    Ring {
        region: crate::SharedRegion,
        at: usize,
        len: usize,
        eor: bool,
    },
    Owned(Vec<u8>),
}

/// A received frame, borrowed in place (or, for data that was already copied out, owned).
/// Dropping it releases the frame. See the module docs for what may be assumed of it.
pub struct ReadView<'a> {
    shared: &'a Shared,
    id: u64,
    gen: u64,
    src: Src,
}

impl ReadView<'_> {
    /// Bytes in the view, fixed for its life.
    pub fn len(&self) -> usize {
        match &self.src {
            Src::Ring { len, .. } => *len,
            Src::Owned(v) => v.len(),
        }
    }

    /// Whether the view holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the view is the frame itself in the ring (not an owned copy).
    pub fn is_in_place(&self) -> bool {
        matches!(self.src, Src::Ring { .. })
    }

    /// Whether the frame ends a message (always true for an owned message).
    pub fn end_of_record(&self) -> bool {
        match &self.src {
            Src::Ring { eor, .. } => *eor,
            Src::Owned(_) => true,
        }
    }

    /// Copies `buf.len()` bytes at `off` out of the view. Panics if it runs past the view.
    #[inline]
    pub fn read_at(&self, off: usize, buf: &mut [u8]) {
        let len = self.len();
        assert!(
            off <= len && buf.len() <= len - off,
            "read of {}+{} past a view of {}",
            off,
            buf.len(),
            len
        );
        match &self.src {
            Src::Ring { region, at, .. } => region.read(at + off, buf),
            Src::Owned(v) => buf.copy_from_slice(&v[off..off + buf.len()]),
        }
    }

    /// Appends the whole view to `out`.
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.len(), 0);
        self.read_at(0, &mut out[start..]);
    }

    /// Calls `f(offset, chunk)` over the view in private chunks of up to 512 bytes, each
    /// copied out of the ring once.
    pub fn for_each_chunk(&self, mut f: impl FnMut(usize, &[u8])) {
        let mut buf = [0u8; 512];
        let mut off = 0;
        while off < self.len() {
            let n = (self.len() - off).min(buf.len());
            self.read_at(off, &mut buf[..n]);
            f(off, &buf[..n]);
            off += n;
        }
    }
}

impl Drop for ReadView<'_> {
    fn drop(&mut self) {
        if !self.is_in_place() {
            return;
        }
        let sh = self.shared;
        let mut link = sh.lock();
        let mut out = Actions::default();
        if let Err(e) = link.zc_release(self.id, self.gen, &mut out) {
            // The session or link is broken; the next call on the session reports it.
            let _ = e;
        }
        sh.act(&link, out);
        // Keep the receive side moving: the keeper slept while the frame was parked.
        sh.pump_and_wake(&mut link, std::time::Instant::now());
        // The keeper slept unarmed while the frame was parked: it wakes by itself within
        // PARK_MAX / 2, and any caller about to sleep wakes it at once (wait_locked_on).
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, Endpoint, SessionOptions};
    use std::io::{Read, Write};

    fn pair(cfg: Config) -> (Endpoint, Endpoint) {
        crate::test_watchdog::endpoint_pair(1 << 20, cfg)
    }

    #[test]
    fn slots_and_views_round_trip() {
        let _watchdog = crate::test_watchdog::watchdog("slots_and_views_round_trip", 20);
        let (host, guest) = pair(Config::default());
        let l = guest.listen(7).unwrap();
        let mut s = host.connect(7).unwrap();
        let mut g = l.accept().unwrap();
        let total = 3 << 20; // several times the credit: credit must come back
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut in_place = 0;
            while let Some(v) = g.recv_in_place().unwrap() {
                in_place += v.is_in_place() as usize;
                v.for_each_chunk(|off, c| {
                    assert_eq!(off % 512, 0);
                    got.extend_from_slice(c)
                });
            }
            (got, in_place)
        });
        let mut sent = Vec::new();
        let mut i = 0u8;
        while sent.len() < total {
            let n = 1 + (i as usize * 997) % 60000;
            let mut slot = s.reserve(n).unwrap();
            assert_eq!(slot.len(), n);
            slot.fill_with(|off, c| {
                for (k, b) in c.iter_mut().enumerate() {
                    *b = ((off + k) as u8).wrapping_add(i);
                }
            });
            slot.commit();
            sent.extend((0..n).map(|k| (k as u8).wrapping_add(i)));
            i = i.wrapping_add(1);
        }
        // An abandoned slot sends nothing.
        drop(s.reserve(100).unwrap());
        s.write_all(b"tail").unwrap();
        sent.extend_from_slice(b"tail");
        drop(s);
        let (got, in_place) = reader.join().unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent);
        assert!(in_place > 0);
    }

    #[test]
    fn message_views_and_limits() {
        let _watchdog = crate::test_watchdog::watchdog("message_views_and_limits", 20);
        let (host, guest) = pair(Config::default());
        let l = guest.listen(8).unwrap();
        let mut s = host
            .connect_with(8, SessionOptions { message: true })
            .unwrap();
        let mut g = l.accept().unwrap();
        let max = host.max_frame();
        assert!(s.reserve(0).is_err());
        assert!(s.reserve(max + 1).is_err());
        let mut slot = s.reserve(5).unwrap();
        slot.write_at(0, b"hello");
        slot.commit();
        s.write_all(b"second").unwrap();
        let v = g.recv_in_place().unwrap().unwrap();
        assert!(v.end_of_record());
        let mut b = [0u8; 5];
        v.read_at(0, &mut b);
        assert_eq!(&b, b"hello");
        drop(v);
        let mut out = [0u8; 16];
        let n = g.read(&mut out).unwrap();
        assert_eq!(&out[..n], b"second");
        drop(s);
        assert!(g.recv_in_place().unwrap().is_none());
    }

    #[test]
    #[should_panic(expected = "past a slot")]
    fn slot_writes_are_bounds_checked() {
        let _watchdog = crate::test_watchdog::watchdog("slot_writes_are_bounds_checked", 20);
        let (host, guest) = pair(Config::default());
        let l = guest.listen(9).unwrap();
        let mut s = host.connect(9).unwrap();
        let _g = l.accept().unwrap();
        let mut slot = s.reserve(8).unwrap();
        slot.write_at(4, &[0; 5]);
    }
}

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
        self.grow_window(id, out).map_err(|f| self.fault_to_io(f))?;
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
        self.grant_credit(id, out).map_err(|f| self.fault_to_io(f))
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
        if self.has_pending() && !self.flush(out).map_err(|f| self.fault_to_io(f))? {
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
                    Err(f) => return Err(self.fault_to_io(f)),
                },
                Err(bad) => {
                    let f = self.index_fault(bad, out);
                    return Err(self.fault_to_io(f));
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
    use crate::{doorbell::local, Config, Endpoint, SessionOptions, SharedRegion, WaitMode};
    use std::io::Write;
    use std::sync::Arc;
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
        let region = SharedRegion::heap(1 << 20);
        let (a, b) = local::pair();
        let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
        let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
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
}

//! Reads that copy frames straight from the ring into the caller's buffer.
//!
//! The general path copies every frame twice: `pump` into the session's buffer, then
//! `read` into the caller's. When the session has nothing buffered and the next frames in
//! the ring are its own Data frames that fit the caller's buffer, [`Link::read_direct`]
//! copies them once, straight out of the ring. Anything else (another session's frame, a
//! control frame, a bad header, a frame past the credit) is left for `pump`, which
//! handles it exactly as before, so ordering and error handling do not change.

use crate::frame::{CreditArgs, Kind};
use crate::link::{Link, State};
use std::io;

impl Link {
    /// Reads this stream session's next frames straight from the ring. `Ok(None)` when
    /// the general path must handle the read.
    pub(crate) fn read_direct(&mut self, id: u64, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if !self.up || self.parked.is_some() || buf.is_empty() {
            return Ok(None);
        }
        {
            let s = self.session(id)?;
            if s.message || s.rd_shut || s.in_place || s.state != State::Open || s.rx_eof {
                return Ok(None);
            }
            if s.buffered() > 0 {
                return Ok(None);
            }
        }
        let quarter = self.geom.capacity / 4;
        let mut n = 0;
        loop {
            if !self.rx.has_cached() {
                match self.rx.available() {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let Ok(Some(rec)) = self.rx.next(self.max_payload) else {
                break;
            };
            let h = rec.header;
            let len = h.len as usize;
            if h.kind != Kind::Data || h.session != id || len == 0 || len > buf.len() - n {
                break;
            }
            let Some(s) = self.sessions.get_mut(&id) else {
                break;
            };
            if s.received - s.fwd_cnt + len as u64 > s.buf_alloc as u64 {
                break; // past its credit: pump resets the session
            }
            self.rx.read_payload(rec.payload_at, &mut buf[n..n + len]);
            self.rx.consume(&h);
            s.received += len as u64;
            s.fwd_cnt += len as u64;
            n += len;
            if self.rx.unreleased() >= quarter && self.rx.release() {
                self.ring_peer = true;
            }
        }
        if n == 0 {
            return Ok(None);
        }
        if self.rx.release() {
            self.ring_peer = true;
        }
        // As in Link::read: grant credit once a quarter of the buffer is consumed.
        let s = self.session(id)?;
        let due = s.fwd_cnt - s.fwd_sent >= (s.buf_alloc / 4).max(1) as u64;
        if due {
            s.fwd_sent = s.fwd_cnt;
            let c = CreditArgs {
                fwd_cnt: s.fwd_cnt,
                buf_alloc: s.buf_alloc,
            };
            self.send_ctrl(Kind::Credit, id, Some(c.encode()))
                .map_err(|f| self.fault_to_io(f))?;
        }
        Ok(Some(n))
    }
}

impl Link {
    /// Whether frames arrived that nobody has looked at yet: a spinning caller retries its
    /// own attempt first (which may take them directly) and pumps only what it left.
    pub(crate) fn rx_moved(&mut self) -> bool {
        if !self.up || self.rx.has_cached() {
            return false;
        }
        matches!(self.rx.available(), Ok(n) if n > 0)
    }
}

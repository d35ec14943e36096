//! Reads that copy frames straight from the ring into the caller's buffer.
//!
//! The general path copies every frame twice: `pump` into the session's buffer, then
//! `read` into the caller's. When the session has nothing buffered and the next frames in
//! the ring are its own Data frames that fit the caller's buffer, [`Link::read_direct`]
//! copies them once, straight out of the ring. Anything else (another session's frame, a
//! control frame, a bad header, a frame past the credit) is left for `pump`, which
//! handles it exactly as before, so ordering and error handling do not change.

use crate::link::{Link, State};
use crate::wire::frame::Kind;
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
        self.grant_credit(id).map_err(|f| self.fault_to_io(f))?;
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

    /// Whether writers waiting for ring space can go on (the keeper then wakes them: the
    /// peer rings us for it, but no frame arrives with it).
    pub(crate) fn space_ready(&mut self) -> bool {
        self.up && self.tx.space_ready()
    }
}

#[cfg(test)]
mod tests {
    use crate::{doorbell::local, Config, Endpoint, SharedRegion, WaitMode};
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// A writer that waits for ring space (not credit) in Block mode is woken when the
    /// reader frees it, not by its 100 ms wait limit.
    #[test]
    fn block_mode_writer_wakes_for_ring_space() {
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
        let t0 = std::time::Instant::now();
        let chunk = vec![1u8; 16 << 10];
        for _ in 0..128 {
            tx.write_all(&chunk).unwrap();
        }
        drop(tx);
        assert_eq!(reader.join().unwrap(), 128 * chunk.len());
        let took = t0.elapsed();
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
    }

    /// Two sessions interleaved in one ring, read with odd buffer sizes in every wait mode:
    /// the direct path and the general one must hand out the same bytes in order.
    #[test]
    fn direct_reads_keep_order_across_sessions() {
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

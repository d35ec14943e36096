//! Test and bench services a peer offers: echo, sink and source, on fixed ports.
//!
//! The demo, the bench, the tests and the e2e suite run these in the "other" process
//! (a second host process standing in for the guest, or `ivring-guest` in a VM).

use ivring::{Endpoint, Listener, Readiness, Session};
use std::io::{self, Read, Write};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// Echoes every byte (or message) back until EOF, then closes.
pub const PORT_ECHO: u32 = 1;
/// Reads until EOF, then answers with the byte count and [`StreamHash`] (16 bytes LE).
pub const PORT_CHECK: u32 = 2;
/// Reads a 16-byte request (total bytes, seed), writes that many pattern bytes, closes.
pub const PORT_SOURCE: u32 = 3;
/// Reads until EOF, then answers with the byte count only (8 bytes LE): no hashing cost.
pub const PORT_SINK: u32 = 4;
/// As [`PORT_SINK`], reading each frame in place (zero-copy) without touching its bytes.
/// (Port 5 is the guest agent's: `bridge::PORT_QGA`.)
pub const PORT_ZC_SINK: u32 = 6;
/// As [`PORT_SINK`], with every session on one thread (an event loop over non-blocking
/// sessions) instead of a thread per session: for many concurrent sessions.
pub const PORT_LOOP_SINK: u32 = 7;
/// Both ways at once: reads an 8-byte request (the size of its writes, LE), then writes
/// `size`-byte chunks back while it reads; at EOF it stops writing and answers with the
/// count of bytes it read after the request (8 bytes LE, the last of its stream).
pub const PORT_DUPLEX: u32 = 8;

/// A checksum of a byte stream that does not depend on how the stream was split.
#[derive(Clone, Debug)]
pub struct StreamHash {
    h: u64,
    count: u64,
    carry: [u8; 8],
    carried: usize,
}

impl Default for StreamHash {
    fn default() -> Self {
        StreamHash {
            h: 0x9e37_79b9_7f4a_7c15,
            count: 0,
            carry: [0; 8],
            carried: 0,
        }
    }
}

impl StreamHash {
    #[inline]
    fn word(&mut self, w: u64) {
        self.h = (self.h.rotate_left(23) ^ w).wrapping_mul(0x2127_599b_f432_5c37);
    }

    /// Adds bytes.
    pub fn update(&mut self, mut b: &[u8]) {
        self.count += b.len() as u64;
        if self.carried > 0 {
            let n = (8 - self.carried).min(b.len());
            self.carry[self.carried..self.carried + n].copy_from_slice(&b[..n]);
            self.carried += n;
            b = &b[n..];
            if self.carried < 8 {
                return;
            }
            let w = u64::from_le_bytes(self.carry);
            self.word(w);
            self.carried = 0;
        }
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.word(w);
        }
        let rest = chunks.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }

    /// Bytes seen.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The checksum of everything so far.
    pub fn finish(&self) -> u64 {
        let mut h = self.h;
        for &b in &self.carry[..self.carried] {
            h = (h.rotate_left(23) ^ b as u64).wrapping_mul(0x2127_599b_f432_5c37);
        }
        h ^ self.count
    }
}

/// Fills `buf` with the pattern for stream `seed` starting at byte `offset`: every byte
/// depends on both, so a byte delivered to the wrong session or place shows.
pub fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = offset + i as u64;
        *b = (x ^ (x >> 8) ^ seed.wrapping_mul(0x9e37_79b9) ^ (seed >> 8)) as u8;
    }
}

/// Starts every service on `ep`, each accepted session on its own thread. Returns at once;
/// the services run until the endpoint is dropped.
pub fn spawn_all(ep: &Endpoint) -> io::Result<()> {
    spawn(ep.listen(PORT_ECHO)?, echo)?;
    spawn(ep.listen(PORT_CHECK)?, |s| sink(s, true))?;
    spawn(ep.listen(PORT_SOURCE)?, source)?;
    spawn(ep.listen(PORT_SINK)?, |s| sink(s, false))?;
    spawn(ep.listen(PORT_ZC_SINK)?, zc_sink)?;
    spawn_loop_sink(ep)?;
    spawn(ep.listen(PORT_DUPLEX)?, duplex)?;
    Ok(())
}

/// The [`PORT_LOOP_SINK`] service: an accept thread hands each session to one loop thread.
fn spawn_loop_sink(ep: &Endpoint) -> io::Result<()> {
    let listener = ep.listen(PORT_LOOP_SINK)?;
    let ready = Readiness::new();
    let (tx, rx) = mpsc::channel::<Session>();
    let loop_ready = ready.clone();
    thread::Builder::new()
        .name("ivring-svc-loop".into())
        .spawn(move || loop_sink(rx, loop_ready))?;
    thread::Builder::new()
        .name(format!("ivring-svc-{PORT_LOOP_SINK}"))
        .spawn(move || loop {
            match listener.accept() {
                Ok(mut s) => {
                    s.set_nonblocking(true);
                    if tx.send(s).is_err() {
                        continue;
                    }
                    ready.fire();
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        })?;
    Ok(())
}

/// Reads every session it is handed until EOF, then answers with its byte count (8 bytes
/// LE), all on this thread: `Session::read_any_many` over the sessions still reading takes
/// the frames in the order they are in the ring, each copied once, many to a call.
fn loop_sink(sessions: mpsc::Receiver<Session>, ready: Arc<Readiness>) {
    struct Sink {
        s: Session,
        count: u64,
        eof: bool,
        answered: usize,
    }
    let mut open: Vec<Sink> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = Vec::new();
    loop {
        ready.take();
        loop {
            match sessions.try_recv() {
                Ok(s) => open.push(Sink {
                    s,
                    count: 0,
                    eof: false,
                    answered: 0,
                }),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) if open.is_empty() => return,
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        }
        // The answers of sessions at EOF; what does not fit the credit now goes on a
        // later round (the sessions are non-blocking).
        open.retain_mut(|k| {
            if !k.eof {
                return true;
            }
            let answer = k.count.to_le_bytes();
            while k.answered < answer.len() {
                match k.s.write(&answer[k.answered..]) {
                    Ok(n) => k.answered += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(_) => return false,
                }
            }
            false
        });
        let reading: Vec<usize> = (0..open.len()).filter(|&i| !open[i].eof).collect();
        if reading.is_empty() {
            // Nothing to read: sleep until a session is handed over (or a moment, for an
            // answer that waits for credit).
            let nap = if open.is_empty() { 100 } else { 1 };
            ready.wait(Duration::from_millis(nap));
            continue;
        }
        let set: Vec<&Session> = reading.iter().map(|&i| &open[i].s).collect();
        // Read until the set changes (a session ends) or new sessions may be waiting.
        let mut ended = None;
        let mut counts = vec![0u64; set.len()];
        'reads: for _ in 0..1024 {
            if Session::read_any_many(&set, &mut buf, &mut got, Some(Duration::from_millis(1)))
                .is_err()
            {
                break;
            }
            for (j, r) in got.drain(..) {
                match r {
                    Ok(0) => {
                        ended = Some((reading[j], true));
                        break 'reads;
                    }
                    Ok(n) => counts[j] += n as u64,
                    Err(_) => {
                        ended = Some((reading[j], false));
                        break 'reads;
                    }
                }
            }
        }
        drop(set);
        for (j, c) in counts.into_iter().enumerate() {
            open[reading[j]].count += c;
        }
        match ended {
            Some((i, true)) => open[i].eof = true,
            Some((i, false)) => {
                open.remove(i);
            }
            None => {}
        }
    }
}

fn spawn(listener: Listener, serve: fn(Session) -> io::Result<()>) -> io::Result<()> {
    let listener = Arc::new(listener);
    thread::Builder::new()
        .name(format!("ivring-svc-{}", listener.port()))
        .spawn(move || loop {
            match listener.accept() {
                Ok(s) => {
                    let _ = thread::Builder::new()
                        .name("ivring-session".into())
                        .spawn(move || serve(s));
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => thread::sleep(std::time::Duration::from_millis(10)),
            }
        })?;
    Ok(())
}

/// The 1 MiB read buffers of the echo and sink threads, kept between sessions: a
/// thread per session that allocated and zeroed its own spent more of the first
/// 250 ms of 256 new sessions clearing pages than moving bytes, and the figures are of
/// the transport, not of the allocator. A buffer nobody took for
/// [`READ_BUF_IDLE`] is freed (a guest serving the bench once must not hold what its
/// busiest moment needed for good).
struct ReadBuf(Vec<u8>);

/// Kept buffers, each with when it was given back; the most recent last.
static READ_BUFS: std::sync::Mutex<Vec<(Vec<u8>, Instant)>> = std::sync::Mutex::new(Vec::new());
const READ_BUF: usize = 1 << 20;
/// Most buffers kept (a thread per session of the many-session figures).
const READ_BUFS_KEPT: usize = 512;
/// How long a kept buffer may go untaken before it is freed.
const READ_BUF_IDLE: Duration = Duration::from_secs(10);

impl ReadBuf {
    fn take() -> ReadBuf {
        let kept = kept_read_bufs().pop();
        ReadBuf(kept.map_or_else(|| vec![0u8; READ_BUF], |(b, _)| b))
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        let mut kept = kept_read_bufs();
        if kept.len() < READ_BUFS_KEPT {
            kept.push((std::mem::take(&mut self.0), Instant::now()));
            drop(kept);
            start_read_buf_reaper();
        }
    }
}

fn kept_read_bufs() -> std::sync::MutexGuard<'static, Vec<(Vec<u8>, Instant)>> {
    READ_BUFS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frees the buffers of `kept` given back `idle` or longer before `now`; how many.
fn free_idle_read_bufs(kept: &mut Vec<(Vec<u8>, Instant)>, now: Instant, idle: Duration) -> usize {
    // The oldest come first: takes pop the most recent.
    let stale = kept
        .iter()
        .take_while(|(_, at)| now.saturating_duration_since(*at) >= idle)
        .count();
    kept.drain(..stale);
    stale
}

/// One thread per process, started with the first kept buffer, frees idle ones.
fn start_read_buf_reaper() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = thread::Builder::new()
            .name("ivring-readbufs".into())
            .spawn(|| loop {
                thread::sleep(READ_BUF_IDLE / 2);
                free_idle_read_bufs(&mut kept_read_bufs(), Instant::now(), READ_BUF_IDLE);
            });
    });
}

fn echo(mut s: Session) -> io::Result<()> {
    let mut buf = ReadBuf::take();
    let buf = &mut buf.0[..];
    loop {
        let n = s.read(buf)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n])?;
    }
}

fn sink(mut s: Session, hash: bool) -> io::Result<()> {
    let mut buf = ReadBuf::take();
    let buf = &mut buf.0[..];
    let mut h = StreamHash::default();
    let mut count = 0u64;
    loop {
        let n = s.read(buf)?;
        if n == 0 {
            break;
        }
        count += n as u64;
        if hash {
            h.update(&buf[..n]);
        }
    }
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&count.to_le_bytes());
    reply[8..].copy_from_slice(&h.finish().to_le_bytes());
    s.write_all(if hash { &reply } else { &reply[..8] })
}

fn duplex(s: Session) -> io::Result<()> {
    let mut req = [0u8; 8];
    (&s).read_exact(&mut req)?;
    let size = (u64::from_le_bytes(req) as usize).clamp(1, 1 << 20);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let count = thread::scope(|t| {
        let writer = t.spawn(|| -> io::Result<()> {
            let chunk = vec![0xa5u8; size];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                (&s).write_all(&chunk)?;
            }
            Ok(())
        });
        let mut buf = ReadBuf::take();
        let buf = &mut buf.0[..];
        let mut count = 0u64;
        let read = loop {
            match (&s).read(buf) {
                Ok(0) => break Ok(count),
                Ok(n) => count += n as u64,
                Err(e) => break Err(e),
            }
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
        wrote.and(read)
    })?;
    (&s).write_all(&count.to_le_bytes())
}

fn zc_sink(mut s: Session) -> io::Result<()> {
    let mut count = 0u64;
    while let Some(view) = s.recv_in_place()? {
        count += view.len() as u64;
    }
    s.write_all(&count.to_le_bytes())
}

fn source(mut s: Session) -> io::Result<()> {
    let mut req = [0u8; 16];
    s.read_exact(&mut req)?;
    let total = u64::from_le_bytes(req[..8].try_into().expect("8 bytes"));
    let seed = u64::from_le_bytes(req[8..].try_into().expect("8 bytes"));
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0u64;
    while off < total {
        let n = (total - off).min(buf.len() as u64) as usize;
        pattern(seed, off, &mut buf[..n]);
        s.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_ignores_split() {
        let mut data = vec![0u8; 1000];
        pattern(7, 0, &mut data);
        let mut a = StreamHash::default();
        a.update(&data);
        for split in [1, 3, 7, 8, 9, 500] {
            let mut b = StreamHash::default();
            for c in data.chunks(split) {
                b.update(c);
            }
            assert_eq!(a.finish(), b.finish());
        }
        let mut c = StreamHash::default();
        data[500] ^= 1;
        c.update(&data);
        assert_ne!(a.finish(), c.finish());
    }

    #[test]
    fn idle_read_buffers_are_freed_oldest_first() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut kept: Vec<(Vec<u8>, Instant)> =
            [0, 3, 8].iter().map(|&s| (vec![s as u8], at(s))).collect();
        // Nothing is idle long enough yet.
        assert_eq!(free_idle_read_bufs(&mut kept, at(9), READ_BUF_IDLE), 0);
        assert_eq!(kept.len(), 3);
        // The two oldest are; the one given back at 8 s stays, and is the one taken.
        assert_eq!(free_idle_read_bufs(&mut kept, at(13), READ_BUF_IDLE), 2);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, vec![8]);
        assert_eq!(free_idle_read_bufs(&mut kept, at(100), READ_BUF_IDLE), 1);
        assert!(kept.is_empty());
    }
}

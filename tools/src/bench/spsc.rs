//! `baseline/spsc`: a bare single-producer single-consumer ring in a sealed memfd mapping,
//! the memory ivring's own rings live in, between two threads of this process (pinned to
//! the bench's two CPUs like everything else). Records are a 16-byte header (length, kind)
//! and the payload padded to 16, as ivring's; there are no sessions, credits, wakeups or
//! checks beyond what keeps the two threads in step. Its figures are what the memory
//! allows: ivring's ratio to them is what the sessions, credits and the hostile-peer checks
//! cost. `baseline/spsc-locked` is the same ring with an uncontended mutex around each
//! write: what a design whose sessions share one ring producer cannot beat.
//! `baseline/spsc-threads` is 256 such rings, each with a writer and a reader thread that
//! sleep when it is full or empty: what a thread per session gets over shared memory when
//! the sessions share nothing.

use super::{uds_threads, Row, StartGate};
use crate::demo::{record_rtt, rtt_histogram};
use anyhow::Result;
use hdrhistogram::Histogram;
use ivring::SharedRegion;
use ivring_ivshmem::shm;
use std::os::fd::AsFd;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::Instant;

/// Largest payload of one record (as ivring's frame limit on a 16 MiB region).
const MAX_RECORD: usize = 64 << 10;
const KIND_DATA: u8 = 1;
const KIND_PAD: u8 = 2;
const KIND_STOP: u8 = 3;
/// Spins between yields while waiting, as ivring's pollers do (two spinners on two shared
/// vCPUs must let each other run).
const SPINS_PER_YIELD: u32 = 128;

/// One direction: the writer's head and the reader's tail on lines of their own, then data.
struct Ring {
    region: SharedRegion,
    head_at: usize,
    tail_at: usize,
    data: usize,
    cap: u64,
}

impl Ring {
    /// The ring occupying `len` bytes at `base` of `region`.
    fn new(region: SharedRegion, base: usize, len: usize) -> Ring {
        region.store_u64(base, 0, Ordering::Relaxed);
        region.store_u64(base + 128, 0, Ordering::Relaxed);
        Ring {
            region,
            head_at: base,
            tail_at: base + 128,
            data: base + 4096,
            cap: ((len - 4096) as u64) & !15,
        }
    }
}

impl Ring {
    /// The same ring, for the thread at its other end.
    fn other_end(&self) -> Ring {
        Ring {
            region: self.region.clone(),
            head_at: self.head_at,
            tail_at: self.tail_at,
            data: self.data,
            cap: self.cap,
        }
    }
}

fn record_len(len: usize) -> u64 {
    16 + ((len as u64 + 15) & !15)
}

fn wait(spins: &mut u32) {
    std::hint::spin_loop();
    *spins += 1;
    if spins.is_multiple_of(SPINS_PER_YIELD) {
        std::thread::yield_now();
    }
}

struct Writer {
    ring: Ring,
    head: u64,
    cached_tail: u64,
    /// Sleep instead of spinning when the ring is full (`baseline/spsc-threads`).
    ends: Option<Arc<Ends>>,
}

/// The two ends of a ring whose threads sleep instead of spinning: each says it is about
/// to sleep, looks once more, and sleeps; the other side, after moving its index, wakes
/// a side that said so. The flag is stored, then the index loaded, with a SeqCst fence
/// between (and the other way round on the other side): at least one of the two sees the
/// other's store, so no wakeup is lost.
#[derive(Default)]
struct Ends {
    reader_asleep: AtomicBool,
    writer_asleep: AtomicBool,
    reader: OnceLock<Thread>,
    writer: OnceLock<Thread>,
}

impl Ends {
    /// Wakes the side behind `asleep` (after our index store) if it said it sleeps.
    fn wake(asleep: &AtomicBool, who: &OnceLock<Thread>) {
        fence(Ordering::SeqCst);
        if asleep.load(Ordering::Relaxed) && asleep.swap(false, Ordering::Relaxed) {
            if let Some(t) = who.get() {
                t.unpark();
            }
        }
    }

    /// Sleeps on `asleep` unless `ready` (an index load) says there is no need.
    fn sleep(asleep: &AtomicBool, who: &OnceLock<Thread>, ready: impl Fn() -> bool) {
        let _ = who.set(std::thread::current());
        asleep.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !ready() {
            std::thread::park();
        }
        asleep.store(false, Ordering::Relaxed);
    }
}

impl Writer {
    fn new(ring: Ring) -> Writer {
        Writer {
            ring,
            head: 0,
            cached_tail: 0,
            ends: None,
        }
    }

    fn room(&mut self, need: u64) {
        let mut spins = 0;
        while self.ring.cap - (self.head - self.cached_tail) < need {
            // Pairs with the reader's Release store of the tail: it is done with the bytes.
            self.cached_tail = self
                .ring
                .region
                .load_u64(self.ring.tail_at, Ordering::Acquire);
            if self.ring.cap - (self.head - self.cached_tail) < need {
                match &self.ends {
                    None => wait(&mut spins),
                    Some(e) => Ends::sleep(&e.writer_asleep, &e.writer, || {
                        let tail = self
                            .ring
                            .region
                            .load_u64(self.ring.tail_at, Ordering::Acquire);
                        self.ring.cap - (self.head - tail) >= need
                    }),
                }
            }
        }
    }

    fn push(&mut self, kind: u8, payload: &[u8]) {
        let rec = record_len(payload.len());
        let off = self.head % self.ring.cap;
        let to_end = self.ring.cap - off;
        if to_end < rec {
            self.room(to_end + rec);
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&((to_end - 16) as u32).to_le_bytes());
            h[4] = KIND_PAD;
            self.ring.region.write(self.ring.data + off as usize, &h);
            self.head += to_end;
        } else {
            self.room(rec);
        }
        let off = (self.head % self.ring.cap) as usize;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[4] = kind;
        self.ring.region.write(self.ring.data + off, &h);
        self.ring.region.write(self.ring.data + off + 16, payload);
        self.head += rec;
    }

    /// Writes `buf` as records of at most [`MAX_RECORD`] and publishes them with one store.
    fn send(&mut self, kind: u8, buf: &[u8]) {
        if buf.is_empty() {
            self.push(kind, buf);
        }
        for chunk in buf.chunks(MAX_RECORD) {
            self.push(kind, chunk);
        }
        // Pairs with the reader's Acquire load of the head: the records are written.
        self.ring
            .region
            .store_u64(self.ring.head_at, self.head, Ordering::Release);
        if let Some(e) = &self.ends {
            Ends::wake(&e.reader_asleep, &e.reader);
        }
    }
}

struct Reader {
    ring: Ring,
    tail: u64,
    cached_head: u64,
    released: u64,
    ends: Option<Arc<Ends>>,
}

impl Reader {
    fn new(ring: Ring) -> Reader {
        Reader {
            ring,
            tail: 0,
            cached_head: 0,
            released: 0,
            ends: None,
        }
    }

    fn release(&mut self) {
        if self.released != self.tail {
            self.released = self.tail;
            // Pairs with the writer's Acquire load of the tail.
            self.ring
                .region
                .store_u64(self.ring.tail_at, self.tail, Ordering::Release);
            if let Some(e) = &self.ends {
                Ends::wake(&e.writer_asleep, &e.writer);
            }
        }
    }

    /// Appends the next record's payload to `out` (one copy out of the ring); its kind.
    fn next(&mut self, out: &mut Vec<u8>) -> u8 {
        let mut spins = 0;
        loop {
            if self.cached_head == self.tail {
                // Caught up: hand the space back before waiting for more.
                self.release();
                self.cached_head = self
                    .ring
                    .region
                    .load_u64(self.ring.head_at, Ordering::Acquire);
                if self.cached_head == self.tail {
                    match &self.ends {
                        None => wait(&mut spins),
                        Some(e) => Ends::sleep(&e.reader_asleep, &e.reader, || {
                            self.ring
                                .region
                                .load_u64(self.ring.head_at, Ordering::Acquire)
                                != self.tail
                        }),
                    }
                    continue;
                }
            }
            let off = (self.tail % self.ring.cap) as usize;
            let mut h = [0u8; 16];
            self.ring.region.read(self.ring.data + off, &mut h);
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let kind = h[4];
            if kind == KIND_PAD {
                self.tail += 16 + len as u64;
                continue;
            }
            self.ring
                .region
                .read_append(self.ring.data + off + 16, len.min(MAX_RECORD), out);
            self.tail += record_len(len);
            if self.tail - self.released >= self.ring.cap / 4 {
                self.release();
            }
            return kind;
        }
    }
}

/// A sealed memfd of `size` bytes, mapped.
fn memory(size: u64) -> Result<SharedRegion> {
    let fd = shm::create_sealed_memfd("ivring-bench-spsc", size)?;
    Ok(shm::map_memfd(fd.as_fd())?)
}

/// What the writer pays around each write, besides the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Producer {
    /// The ring's only writer: nothing (`baseline/spsc`).
    Bare,
    /// An uncontended `Mutex` taken and released around each write (`baseline/spsc-locked`):
    /// the least that writers sharing one ring producer (the sessions of a link) pay.
    Locked,
}

/// Writes of `size` bytes for `secs`, each published with its own store: (writes/s, bytes/s).
pub fn tput(size: usize, secs: f64, producer: Producer) -> Result<(f64, f64)> {
    let region = memory(16 << 20)?;
    let writer = Writer::new(Ring::new(region.clone(), 0, 16 << 20));
    let mut reader = Reader::new(writer.ring.other_end());
    let mut writer = Mutex::new(writer);
    let sink = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(MAX_RECORD);
        let mut got = 0u64;
        loop {
            buf.clear();
            if reader.next(&mut buf) == KIND_STOP {
                reader.release();
                return got;
            }
            got += std::hint::black_box(&buf).len() as u64;
        }
    });
    let payload = vec![0x5au8; size];
    let t0 = Instant::now();
    let mut sent = 0u64;
    let batch = ((256 << 10) / size).max(1);
    while t0.elapsed().as_secs_f64() < secs {
        match producer {
            Producer::Bare => {
                // No lock: `get_mut` only checks the poison flag, once per batch.
                let w = writer.get_mut().unwrap_or_else(PoisonError::into_inner);
                for _ in 0..batch {
                    w.send(KIND_DATA, &payload);
                }
            }
            Producer::Locked => {
                for _ in 0..batch {
                    writer
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .send(KIND_DATA, &payload);
                }
            }
        }
        sent += (batch * size) as u64;
    }
    writer
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .send(KIND_STOP, &[]);
    let got = sink
        .join()
        .map_err(|_| anyhow::anyhow!("spsc reader panicked"))?;
    let el = t0.elapsed().as_secs_f64();
    anyhow::ensure!(got == sent, "spsc reader got {got} of {sent}");
    Ok((sent as f64 / size as f64 / el, sent as f64 / el))
}

/// Both ways at once: two rings, each with its own writer and reader thread (four busy
/// threads on the bench's two CPUs, as ivring's duplex figure has), `size`-byte writes
/// for `secs`: the aggregate bytes/s. Over [`tput`]'s one way it is what two CPUs allow
/// a full-duplex stream.
pub fn duplex(size: usize, secs: f64) -> Result<f64> {
    let back = std::thread::spawn(move || tput(size, secs, Producer::Bare));
    let (_, out) = tput(size, secs, Producer::Bare)?;
    let (_, back) = back
        .join()
        .map_err(|_| anyhow::anyhow!("spsc duplex thread panicked"))??;
    Ok(out + back)
}

/// Round trips of `size` bytes over two rings for `secs`: the times in ns. With
/// [`Producer::Locked`] (`baseline/spsc-locked`), each side takes an uncontended mutex
/// around each read and each write, as a link's callers take its lock, and watches the
/// head without it: what four lock round trips cost a round trip, with nothing else.
pub fn rtt(size: usize, secs: f64, producer: Producer) -> Result<Histogram<u64>> {
    let half = 8 << 20;
    let region = memory(2 * half as u64)?;
    let ping = Writer::new(Ring::new(region.clone(), 0, half));
    let pong_in = Reader::new(Ring::new(region.clone(), half, half));
    let mut echo_in = End::new(Reader::new(ping.ring.other_end()), producer);
    let mut echo_out = End::new(Writer::new(pong_in.ring.other_end()), producer);
    let (mut ping, mut pong_in) = (End::new(ping, producer), End::new(pong_in, producer));
    let echo = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(size);
        loop {
            buf.clear();
            if echo_in.read(&mut buf) == KIND_STOP {
                return;
            }
            echo_out.write(KIND_DATA, &buf);
        }
    });
    let out = vec![7u8; size];
    let mut back = Vec::with_capacity(size);
    let mut v = rtt_histogram();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        ping.write(KIND_DATA, &out);
        back.clear();
        while back.len() < size {
            pong_in.read(&mut back);
        }
        record_rtt(&mut v, t.elapsed());
    }
    ping.write(KIND_STOP, &[]);
    echo.join()
        .map_err(|_| anyhow::anyhow!("spsc echo panicked"))?;
    Ok(v)
}

/// One end of a round-trip ring: owned outright, or behind a mutex taken around each
/// read and write (never contended: one thread uses it).
enum End<T> {
    Bare(T),
    Locked(Mutex<T>),
}

impl<T> End<T> {
    fn new(end: T, producer: Producer) -> End<T> {
        match producer {
            Producer::Bare => End::Bare(end),
            Producer::Locked => End::Locked(Mutex::new(end)),
        }
    }

    #[expect(
        clippy::mut_mutex_lock,
        reason = "the lock taken and released is what the locked end measures"
    )]
    fn with<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        match self {
            End::Bare(t) => f(t),
            End::Locked(m) => f(&mut m.lock().unwrap_or_else(PoisonError::into_inner)),
        }
    }
}

impl End<Writer> {
    fn write(&mut self, kind: u8, buf: &[u8]) {
        self.with(|w| w.send(kind, buf));
    }
}

impl End<Reader> {
    /// The next record; a locked end watches the head without its lock (as a link's
    /// spinning callers do) and takes the lock to read.
    fn read(&mut self, out: &mut Vec<u8>) -> u8 {
        if let End::Locked(m) = self {
            let r = m.get_mut().unwrap_or_else(PoisonError::into_inner);
            let mut spins = 0;
            while r.cached_head == r.tail
                && r.ring.region.load_u64(r.ring.head_at, Ordering::Acquire) == r.tail
            {
                wait(&mut spins);
            }
        }
        self.with(|r| r.next(out))
    }
}

/// Ring bytes per pair of `baseline/spsc-threads`: as much as an ivring session's
/// receive buffer (its credit) when it opens.
const PAIR_RING: usize = 256 << 10;

/// `baseline/spsc-threads`: `n` bare rings in one sealed memfd, each with a writer and a
/// reader thread that sleep (park) when the ring is full or empty and wake each other
/// after moving an index, streaming `size`-byte writes for `secs`, started and counted as
/// `ivring/sessions` is: (aggregate bytes/s, slowest/fastest). The rings share nothing
/// but the two CPUs: against one pair it is what the scheduler leaves a thread per session
/// over shared memory, with no kernel in the data path.
fn threads(n: usize, size: usize, secs: f64) -> Result<(f64, f64)> {
    let region = memory((n * PAIR_RING) as u64)?;
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(StartGate::new(n));
    let thread = || std::thread::Builder::new().stack_size(256 << 10);
    let mut ends = Vec::with_capacity(n);
    for i in 0..n {
        let both = Arc::new(Ends::default());
        let mut w = Writer::new(Ring::new(region.clone(), i * PAIR_RING, PAIR_RING));
        let mut r = Reader::new(w.ring.other_end());
        w.ends = Some(both.clone());
        r.ends = Some(both);
        let reader = thread().spawn(move || -> std::io::Result<(u64, Instant)> {
            let mut buf = Vec::with_capacity(MAX_RECORD);
            let mut got = 0u64;
            loop {
                buf.clear();
                if r.next(&mut buf) == KIND_STOP {
                    return Ok((got, Instant::now()));
                }
                got += std::hint::black_box(&buf).len() as u64;
            }
        })?;
        let (stop, go) = (stop.clone(), go.clone());
        let writer = thread().spawn(move || -> std::io::Result<u64> {
            let payload = vec![0x5au8; size];
            let mut sent = 0u64;
            go.wait();
            while !stop.load(Ordering::Relaxed) {
                w.send(KIND_DATA, &payload);
                sent += size as u64;
            }
            w.send(KIND_STOP, &[]);
            Ok(sent)
        })?;
        ends.push((writer, reader));
    }
    uds_threads::run_pairs("spsc", &go, &stop, secs, ends)
}

/// One pair and [`uds_threads::PAIRS`] pairs of [`threads`] over `secs` each,
/// interleaved as `baseline/uds-threads` is: their two rows.
pub fn measure_threads(secs: f64) -> Result<Vec<Row>> {
    uds_threads::one_and_many("baseline/spsc-threads", secs, threads)
}

#[cfg(test)]
mod tests {
    use super::Producer;

    #[test]
    fn moves_every_byte_and_answers_every_round_trip() {
        for size in [64, 4096, 64 << 10, 1 << 20] {
            let (mps, bps) = super::tput(size, 0.05, Producer::Bare).unwrap();
            assert!(mps > 0.0 && bps > 0.0);
        }
        for size in [64, 1 << 20] {
            let (mps, bps) = super::tput(size, 0.05, Producer::Locked).unwrap();
            assert!(mps > 0.0 && bps > 0.0);
        }
        for size in [64, 64 << 10] {
            for producer in [Producer::Bare, Producer::Locked] {
                // Each round trip waits for all `size` bytes back: a count is an answer.
                assert!(!super::rtt(size, 0.05, producer).unwrap().is_empty());
            }
        }
    }

    #[test]
    fn sleeping_pairs_deliver_what_they_wrote() {
        // `threads` checks every reader's count against its writer's.
        let (bps, fair) = super::threads(16, 4096, 0.05).unwrap();
        assert!(bps > 0.0 && (0.0..=1.0).contains(&fair));
    }
}

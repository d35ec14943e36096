//! Loom models of the ring's memory ordering (PROTOCOL.md §2 indices, §5 wakeups).
//! The last two run the real link against the crate's mock peer (`wire::mock`), the one
//! peer the hostile tests and the fuzzer also use: without the sleeper-side WAKEUP fence
//! in `Consumer::arm_wakeup` the first of them fails with a deadlock (a lost wakeup).
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p ivring --release --lib loom
//! ```
//!
//! The preemption bound defaults to 2 here; `LOOM_MAX_PREEMPTIONS` overrides it.
//!
//! The region is a small heap block whose words are loom atomics (see `region.rs`): the
//! two side blocks sit at 0 and 512 (each needs the 400 bytes of `layout::side`), and the
//! ring data follows at 1024, so every model stays a few hundred loom operations long.

use crate::shm::region::SharedRegion;
use crate::wire::frame::{Header, Kind, HEADER_LEN};
use crate::wire::ring::{Consumer, Producer};
use loom::thread;

/// The writer's side block (TX_HEAD, TX_NEED_SPACE live here).
const WRITER: usize = 0;
/// The reader's side block (RX_TAIL, RX_NEED_WAKEUP live here).
const READER: usize = 512;
/// Ring data.
const DATA: usize = 1024;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if std::env::var("LOOM_MAX_PREEMPTIONS").is_err() {
        b.preemption_bound = Some(2);
    }
    b.max_branches = 100_000;
    b.check(f);
}

fn halves(cap: u64) -> (Producer, Consumer) {
    let region = SharedRegion::heap(DATA + cap as usize);
    let p = Producer::new(region.clone(), DATA, cap, WRITER, READER);
    let c = Consumer::new(region, DATA, cap, READER, WRITER);
    (p, c)
}

fn data_header(session: u64, len: usize) -> Header {
    Header {
        kind: Kind::Data,
        flags: 0,
        len: len as u32,
        session,
    }
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (0x10 * (i as u8 + 1)) | j as u8).collect()
}

/// Pushes `frames` (session id, payload length) from one thread and pops them from
/// another; every header and payload byte read is what was written, in order, and no
/// index ever looks corrupt. `cap` small enough makes the writer wait for the reader and
/// write a padding record at the ring's end.
fn index_model(cap: u64, frames: &'static [(u64, usize)]) {
    model(move || {
        let (mut p, mut c) = halves(cap);
        let writer = thread::spawn(move || {
            for (i, &(sess, len)) in frames.iter().enumerate() {
                let h = data_header(sess, len);
                let data = payload(i, len);
                while !p.push(&h, &data).expect("reader index corrupt") {
                    p.publish();
                    thread::yield_now();
                }
                p.publish();
            }
        });
        for (i, &(sess, len)) in frames.iter().enumerate() {
            let rec = loop {
                if let Some(rec) = c.next(64).expect("frame corrupt") {
                    break rec;
                }
                if c.available().expect("writer index corrupt") == 0 {
                    thread::yield_now();
                }
            };
            assert_eq!(rec.header, data_header(sess, len), "frame {i}");
            let mut got = vec![0u8; len];
            c.read_payload(rec.payload_at, &mut got);
            assert_eq!(got, payload(i, len), "payload of frame {i}");
            c.consume(&rec.header);
            c.release();
        }
        writer.join().unwrap();
        assert_eq!(c.available().unwrap(), 0);
    });
}

#[test]
fn loom_index_two_frames() {
    // 32 + 32 bytes of records in a 64-byte ring: fills it exactly, no waiting.
    index_model(64, &[(3, 2), (5, 3)]);
}

#[test]
fn loom_index_wrap_with_padding() {
    // Records of 32, 48, then 32 bytes in a 96-byte ring: the third does not fit the 16
    // bytes left before the end, so it waits for the reader and goes behind a padding
    // record.
    index_model(96, &[(3, 1), (5, 17), (7, 2)]);
}

/// The reader arms need-wakeup and re-checks while the writer publishes: either the
/// re-check sees the data or the writer decides to ring. Never neither.
#[test]
fn loom_no_lost_data_wakeup() {
    model(|| {
        let (mut p, mut c) = halves(64);
        let writer = thread::spawn(move || {
            let at = p.reserve(HEADER_LEN).unwrap().expect("empty ring has room");
            let _ = at; // the record's bytes do not matter to the wakeup protocol
            p.commit(HEADER_LEN);
            p.publish()
        });
        let saw_data = c.arm_wakeup(true).expect("writer index corrupt");
        let rings = writer.join().unwrap();
        assert!(
            saw_data || rings,
            "lost wakeup: data published, reader asleep"
        );
    });
}

/// A reader that numbers its armings, rung once for its first arming and woken: while it
/// disarms, reads the first record and arms again, the writer publishes a second record
/// and rings only if it finds a number it has not rung for. Either the reader's re-check
/// after its second arming sees the record, or the writer rings. Never neither. (With the
/// number not renewed at the second arming, this fails: the writer, finding the number it
/// rang for, stays quiet while the reader's re-check misses the record.)
#[test]
fn loom_no_lost_data_wakeup_with_one_ring_per_arming() {
    model(|| {
        let (mut p, mut c) = halves(64);
        p.peer_numbers_armings = true;
        assert!(!c.arm_wakeup(true).unwrap(), "nothing yet");
        p.reserve(HEADER_LEN).unwrap().expect("empty ring has room");
        p.commit(HEADER_LEN);
        assert!(p.publish(), "the first arming is rung");
        let writer = thread::spawn(move || {
            p.reserve(HEADER_LEN)
                .unwrap()
                .expect("room for a second record");
            p.commit(HEADER_LEN);
            p.publish()
        });
        // Woken by the first ring: reads the first record (its bytes do not matter here).
        c.disarm_wakeup();
        assert!(c.available().unwrap() >= HEADER_LEN as u64);
        c.consume(&data_header(0, 0));
        let saw_data = c.available().unwrap() > 0 || c.arm_wakeup(true).unwrap();
        let rings = writer.join().unwrap();
        assert!(
            saw_data || rings,
            "lost wakeup: second record published, reader asleep"
        );
    });
}

/// The writer posts the space it needs and re-checks while the reader frees space:
/// either the re-check sees the space or the reader decides to ring. Never neither.
#[test]
fn loom_no_lost_space_wakeup() {
    model(|| {
        let (mut p, mut c) = halves(64);
        // Fill the ring with two 32-byte records and let the reader see them.
        for _ in 0..2 {
            p.reserve(32).unwrap().expect("room");
            p.commit(32);
        }
        p.publish();
        assert_eq!(c.available().unwrap(), 64);
        assert_eq!(p.reserve(32).unwrap(), None, "ring should be full");
        let reader = thread::spawn(move || {
            c.consume(&data_header(1, 16));
            c.release()
        });
        let has_space = p.arm_space(32, true).expect("reader index corrupt");
        let rings = reader.join().unwrap();
        assert!(
            has_space || rings,
            "lost wakeup: space freed, writer asleep"
        );
    });
}

/// A doorbell for the link models: a ring sets a flag that `wait_rung` sleeps for, so a
/// ring that never comes leaves the sleeper blocked for ever, which loom reports as a
/// deadlock.
struct ModelBell {
    rung: loom::sync::Mutex<bool>,
    cv: loom::sync::Condvar,
}

impl ModelBell {
    fn new() -> ModelBell {
        ModelBell {
            rung: loom::sync::Mutex::new(false),
            cv: loom::sync::Condvar::new(),
        }
    }

    fn wait_rung(&self) {
        let mut rung = self.rung.lock().unwrap();
        while !*rung {
            rung = self.cv.wait(rung).unwrap();
        }
        *rung = false;
    }
}

impl crate::Doorbell for ModelBell {
    fn own_id(&self) -> u16 {
        0
    }
    fn ring(&self, _peer: u16) {
        *self.rung.lock().unwrap() = true;
        self.cv.notify_one();
    }
    fn wait(&self, _timeout: Option<std::time::Duration>) {
        self.wait_rung();
    }
    fn interrupt(&self) {}
}

/// The real link (the guest) receiving from the crate's mock peer (the host) as the
/// keeper does: pump, arm the wakeup (which re-checks), sleep on the doorbell. The peer
/// opens a session and publishes as an honest writer, ringing only if asked. The link
/// must get the Open (the session waits in its listener's backlog) and never sleep
/// through it. With `arm` false the link sleeps without arming, a planted lost wakeup
/// that the model must catch.
fn link_receive_model(arm: bool) {
    use crate::config::{Config, WaitMode};
    use crate::link::{Actions, Link};
    use crate::shm::layout::{Geometry, Role, MIN_REGION};
    use crate::wire::frame::OpenArgs;
    use crate::wire::mock::MockPeer;
    use std::sync::Arc;
    use std::time::Instant;

    model(move || {
        let region = SharedRegion::heap(MIN_REGION);
        let bell = Arc::new(ModelBell::new());
        let mut peer = MockPeer::laying_out(region.clone(), Role::Host, bell.clone(), true);
        let geom = Geometry::for_size(MIN_REGION).unwrap();
        let cfg = Config {
            wait: WaitMode::Block,
            ..Config::default()
        };
        let now = Instant::now();
        let mut link = Link::new(Role::Guest, region, geom, cfg, now);
        let mut out = Actions::default();
        assert!(link.listen(7));
        link.attach(Some(1), &mut out);
        // The handshake, before the threads: each side acknowledges the other's epoch.
        peer.restart();
        peer.follow();
        link.check_peer(now, &mut out);
        assert!(peer.follow());
        link.check_peer(now, &mut out);
        assert!(link.is_up(), "handshake with the mock peer");
        // Forget the handshake's rings: only the Open's may wake the link.
        *bell.rung.lock().unwrap() = false;
        let opener = thread::spawn(move || {
            let args = OpenArgs {
                port: 7,
                message: false,
                buf_alloc: 4096,
            };
            assert!(peer.push(crate::wire::frame::Kind::Open, 0, 2, &args.encode()));
            peer.publish_asked();
        });
        loop {
            let mut out = Actions::default();
            if link.pump(now, &mut out).expect("an honest peer") && link.accept(7).is_some() {
                break;
            }
            if arm && link.arm_wakeup(&mut out).expect("an honest peer") {
                continue;
            }
            bell.wait_rung();
            link.disarm_wakeup();
        }
        opener.join().unwrap();
    });
}

#[test]
fn loom_link_gets_the_mock_peers_open_without_a_lost_wakeup() {
    link_receive_model(true);
}

#[test]
#[should_panic(expected = "deadlock")]
fn loom_link_model_catches_sleeping_without_arming() {
    link_receive_model(false);
}

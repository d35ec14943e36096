//! A loom model of the bell hand-off: the real [`Bell`] transitions, driven by a keeper
//! and blocked callers shaped as the runtime's (`keeper` and `wait_locked_on` in
//! `runtime/mod.rs`, in `Block` mode), against a peer that publishes frames and rings
//! when asked to, once per arming (PROTOCOL.md §5, with `ARMINGS` = 1).
//!
//! Nothing here has a timeout: where the runtime sleeps with one (the keeper's naps, a
//! caller's condvar, the doorbell), the model sleeps until woken. So an interleaving in
//! which a published frame waits while every thread sleeps is a loom deadlock, and the
//! model fails: that is a wakeup the runtime would only recover from by a timeout.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p ivring --release --lib loom_model
//! ```

use super::{Bell, CallerWait, Holder};
use loom::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
use loom::thread;

/// The doorbell: a counting event, as an eventfd (a ring before the wait is kept).
#[derive(Default)]
struct Doorbell {
    rings: Mutex<u32>,
    cv: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        *self.rings.lock().unwrap() += 1;
        self.cv.notify_one();
    }

    fn wait(&self) {
        let mut n = self.rings.lock().unwrap();
        while *n == 0 {
            n = self.cv.wait(n).unwrap();
        }
        *n = 0;
    }
}

/// The keeper's park and unpark: one permit, as `std::thread::park`.
#[derive(Default)]
struct Parker {
    permit: Mutex<bool>,
    cv: Condvar,
}

impl Parker {
    fn park(&self) {
        let mut p = self.permit.lock().unwrap();
        while !*p {
            p = self.cv.wait(p).unwrap();
        }
        *p = false;
    }

    fn unpark(&self) {
        *self.permit.lock().unwrap() = true;
        self.cv.notify_one();
    }
}

/// What the link's lock guards: frames pumped from the ring into each session's buffer
/// (and not read yet), and the pump's position.
#[derive(Default)]
struct Link {
    pumped: [bool; 2],
    delivered: [bool; 2],
    stop: bool,
    /// Armings so far: each stores a new number in `need_wakeup`.
    armings: usize,
    /// A caller unparked the keeper (`keeper_recalled`, set under the lock here).
    recalled: bool,
}

/// One endpoint's runtime and the shared memory it reads.
struct World {
    link: Mutex<Link>,
    /// The ring: a frame for session `i` published by the peer (its head index).
    published: [AtomicBool; 2],
    /// Our side's "ring me" word in shared memory (RX_NEED_WAKEUP): 0, or the number of
    /// the arming.
    need_wakeup: AtomicUsize,
    /// The peer's memory of the arming it last rang for (only the peer's thread uses it).
    rang_for: AtomicUsize,
    /// Where callers without the bell sleep (the stripes, folded into one).
    cv: Condvar,
    /// Callers asleep on `cv` (changed under the lock).
    sleepers: AtomicUsize,
    bell: Bell,
    doorbell: Doorbell,
    keeper: Parker,
    /// A bug planted to show that the model sees the lost wakeup it causes.
    plant: Plant,
    /// Which callers may take the bell: the runtime's `lead` declines it while the link
    /// is down or a frame is parked for an in-place reader, and its caller sleeps on a
    /// condvar even with the bell free.
    may_lead: [bool; 2],
}

/// Bugs the model must catch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plant {
    None,
    /// Arming without looking at the ring again.
    ArmWithoutSecondLook,
    /// A caller giving the bell up without recalling the benched keeper for the callers
    /// asleep on condvars.
    NoRecall,
    /// Arming with the number of the first arming every time: the peer, which rings once
    /// per number, stays quiet.
    ArmWithAUsedNumber,
    /// A caller that may not take the free bell sleeping without recalling the benched
    /// keeper.
    NoRecallWhenFree,
}

impl World {
    fn new(plant: Plant, may_lead: [bool; 2]) -> World {
        World {
            link: Mutex::new(Link::default()),
            published: [AtomicBool::new(false), AtomicBool::new(false)],
            need_wakeup: AtomicUsize::new(0),
            rang_for: AtomicUsize::new(0),
            cv: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            bell: Bell::new(),
            doorbell: Doorbell::default(),
            keeper: Parker::default(),
            plant,
            may_lead,
        }
    }

    /// The peer: publish, then ring if asked and not rung for that arming yet: the
    /// store-load pattern of PROTOCOL.md §5, with a SeqCst fence on each side as the ring
    /// has (loom models fences, and takes SeqCst loads and stores for AcqRel).
    fn publish(&self, session: usize) {
        self.published[session].store(true, Ordering::Release);
        fence(Ordering::SeqCst);
        let arming = self.need_wakeup.load(Ordering::Relaxed);
        if arming != 0 && arming != self.rang_for.load(Ordering::Relaxed) {
            self.rang_for.store(arming, Ordering::Relaxed);
            self.doorbell.ring();
        }
    }

    /// Moves what the peer published into the sessions; whether anything came.
    fn pump(&self, l: &mut Link) -> bool {
        let mut any = false;
        for i in 0..2 {
            if !l.pumped[i] && self.published[i].load(Ordering::Acquire) {
                l.pumped[i] = true;
                l.delivered[i] = true;
                any = true;
            }
        }
        any
    }

    /// Asks the peer to ring, then looks again: whether something came meanwhile (then
    /// the caller must not sleep).
    fn arm(&self, l: &mut Link) -> bool {
        if self.plant != Plant::ArmWithAUsedNumber || l.armings == 0 {
            l.armings += 1;
        }
        self.need_wakeup.store(l.armings, Ordering::Relaxed);
        if self.plant == Plant::ArmWithoutSecondLook {
            return false;
        }
        fence(Ordering::SeqCst);
        (0..2).any(|i| !l.pumped[i] && self.published[i].load(Ordering::Acquire))
    }

    fn disarm(&self) {
        self.need_wakeup.store(0, Ordering::Relaxed);
    }

    fn notify(&self) {
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            self.cv.notify_all();
        }
    }

    /// As `Shared::resign`.
    fn resign(&self, l: &mut Link, leading: &mut bool) {
        if std::mem::take(leading) {
            let sleepers = self.sleepers.load(Ordering::Relaxed) > 0;
            if self.bell.caller_give_up(sleepers) && self.plant != Plant::NoRecall {
                l.recalled = true;
                self.keeper.unpark();
            }
        }
    }

    /// A blocked read of session `i`, as `wait_locked_on` with `lead`.
    fn caller(&self, i: usize) {
        let mut leading = false;
        let mut g: MutexGuard<'_, Link> = self.link.lock().unwrap();
        loop {
            if std::mem::take(&mut g.delivered[i]) {
                self.resign(&mut g, &mut leading);
                return;
            }
            // lead()
            if self.may_lead[i] && (leading || self.bell.holder() == Holder::Free) {
                if self.pump(&mut g) {
                    self.notify();
                    continue;
                }
                if self.arm(&mut g) {
                    continue;
                }
                if !leading {
                    leading = self.bell.caller_take();
                    assert!(leading, "the bell was free under the same lock");
                }
                drop(g);
                self.doorbell.wait();
                g = self.link.lock().unwrap();
                self.disarm();
                continue;
            }
            if self.bell.caller_wait(i, true) == CallerWait::RecallKeeper
                && self.plant != Plant::NoRecallWhenFree
            {
                g.recalled = true;
                self.keeper.unpark();
            }
            self.resign(&mut g, &mut leading);
            self.sleepers.fetch_add(1, Ordering::Relaxed);
            g = self.cv.wait(g).unwrap();
            self.sleepers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The keeper's loop, as `keeper` in `Block` mode.
    fn keeper(&self) {
        let mut benched = false;
        let mut last_takes = 0;
        loop {
            let mut g = self.link.lock().unwrap();
            if g.stop {
                return;
            }
            if !self.bell.keeper_round() {
                self.disarm();
            }
            let changed = self.pump(&mut g);
            let wanted = self.bell.take_wanted();
            let takes = self.bell.caller_takes();
            let callers_took = std::mem::replace(&mut last_takes, takes) != takes;
            // Recalled, the runtime's keeper naps briefly (`HANDOFF_MAX`) rather than for
            // the heartbeat; without timeouts here, that is a round at once.
            let recalled = std::mem::take(&mut g.recalled);
            let mut wake = changed;
            let bench = if self.bell.holder() == Holder::Caller
                || (callers_took && benched && !changed && !recalled)
            {
                true
            } else if wanted != 0 {
                wake = true;
                true
            } else {
                false
            };
            if bench {
                self.bell.set_keeper_benched(true);
                drop(g);
                if wake {
                    self.notify();
                }
                self.keeper.park();
                self.bell.set_keeper_benched(false);
                benched = true;
                continue;
            }
            benched = false;
            let sleep = !self.arm(&mut g);
            if sleep {
                self.bell.keeper_take();
            }
            drop(g);
            if wake {
                self.notify();
            }
            if sleep {
                self.doorbell.wait();
            }
        }
    }

    fn stop(&self) {
        self.link.lock().unwrap().stop = true;
        self.doorbell.ring();
        self.keeper.unpark();
    }
}

/// `callers` blocked readers (sessions 0 and 1), a keeper and a peer that publishes one
/// frame for each: every caller gets its frame with no timeout to help.
fn run(callers: usize, plant: Plant) {
    run_leading(callers, plant, [true; 2]);
}

/// As `run`, with only the callers `may_lead` says taking the bell.
fn run_leading(callers: usize, plant: Plant, may_lead: [bool; 2]) {
    let mut b = loom::model::Builder::new();
    if std::env::var("LOOM_MAX_PREEMPTIONS").is_err() {
        b.preemption_bound = Some(2);
    }
    b.check(move || {
        let w = Arc::new(World::new(plant, may_lead));
        let keeper = {
            let w = w.clone();
            thread::spawn(move || w.keeper())
        };
        let readers: Vec<_> = (0..callers)
            .map(|i| {
                let w = w.clone();
                thread::spawn(move || w.caller(i))
            })
            .collect();
        for i in 0..callers {
            w.publish(i);
        }
        for r in readers {
            r.join().unwrap();
        }
        w.stop();
        keeper.join().unwrap();
    });
}

#[test]
fn loom_model_one_caller_gets_its_frame() {
    run(1, Plant::None);
}

#[test]
fn loom_model_two_callers_hand_the_bell_on() {
    run(2, Plant::None);
}

/// One caller holds the bell and leaves it (the keeper sitting out); the other may not
/// take it (in the runtime: the link down, or a frame parked) and sleeps on a condvar,
/// so it must recall the keeper itself.
#[test]
fn loom_model_a_caller_that_may_not_lead_recalls_the_keeper() {
    run_leading(2, Plant::None, [true, false]);
}

/// Runs the model with `plant` in a child process of this test binary (a loom deadlock
/// aborts the process) and checks that it reports the deadlock.
fn catches(test: &str, plant: &str) {
    if let Ok(p) = std::env::var("IVRING_LOOM_PLANT") {
        match p.as_str() {
            "arm" => run(1, Plant::ArmWithoutSecondLook),
            "recall" => run(2, Plant::NoRecall),
            "number" => run(2, Plant::ArmWithAUsedNumber),
            "free" => run_leading(2, Plant::NoRecallWhenFree, [true, false]),
            _ => unreachable!("unknown plant {p}"),
        }
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env("IVRING_LOOM_PLANT", plant)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the test binary");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("deadlock"),
        "the model missed the planted bug ({plant}): {}\n{err}",
        out.status
    );
}

/// Arming without a second look lets a frame published between the last look and the
/// arming wait for ever.
#[test]
fn loom_model_catches_arming_without_a_second_look() {
    catches(
        "runtime::bell::loom_model::loom_model_catches_arming_without_a_second_look",
        "arm",
    );
}

/// A caller that leaves the doorbell without recalling the keeper leaves another caller
/// asleep on a condvar with nobody to read the ring for it.
#[test]
fn loom_model_catches_a_caller_that_does_not_recall_the_keeper() {
    catches(
        "runtime::bell::loom_model::loom_model_catches_a_caller_that_does_not_recall_the_keeper",
        "recall",
    );
}

/// Arming with a number the peer has rung for already leaves a frame published after
/// the arming's second look unrung: every wait must arm afresh.
#[test]
fn loom_model_catches_arming_with_a_used_number() {
    catches(
        "runtime::bell::loom_model::loom_model_catches_arming_with_a_used_number",
        "number",
    );
}

/// A caller that may not take the free bell and sleeps without recalling the benched
/// keeper leaves its frame unread.
#[test]
fn loom_model_catches_a_caller_that_may_not_lead_and_does_not_recall() {
    catches(
        "runtime::bell::loom_model::loom_model_catches_a_caller_that_may_not_lead_and_does_not_recall",
        "free",
    );
}

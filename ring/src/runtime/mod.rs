//! The runtime: the only owner of locks, threads, spinning and the doorbell. It drives
//! one link (`crate::link`) for the API's handles (`crate::api`).
//!
//! One mutex guards the link. A keeper thread per endpoint follows the peer (epoch,
//! heartbeat), reads the ring and sleeps on the doorbell when there is nothing to do;
//! blocked readers and writers spin briefly reading the ring themselves, then sleep.
//!
//! One thread at a time waits on the doorbell (the "bell"): a blocked caller takes it
//! when it is free, so that the peer's ring wakes the thread that wants the data (one
//! wakeup, not two: doorbell to keeper, keeper to caller), and the keeper sits out
//! meanwhile. Other blocked callers sleep on condition variables that whoever reads the
//! ring signals. A caller that finds the keeper on the bell marks that it wants it, and
//! the keeper leaves it free after its next wakeup.

mod bell;

use self::bell::{Bell, CallerWait, Holder};
use crate::config::{Config, WaitMode};
use crate::link::rx::LentCopy;
use crate::link::{Actions, Fault, Link, Stripes};
use crate::shm::doorbell::Doorbell;
use crate::shm::layout::{Geometry, LayoutError, Role};
use crate::shm::region::SharedRegion;
use crate::shm::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering as StdOrdering};
use crate::wire::ring::{CopySlot, Loan};
use crossbeam_utils::CachePadded;
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

pub(crate) struct Shared {
    link: Mutex<Link>,
    pub(crate) cv: Condvar,
    /// Where `accept` sleeps: woken only when a backlog has something (or on faults), not
    /// by every byte of traffic.
    accept_cv: Condvar,
    /// Threads asleep on `cv` / `accept_cv` (changed under the lock): no waiter, no notify.
    sleepers: AtomicUsize,
    accept_sleepers: AtomicUsize,
    /// Where callers of a session sleep, by session id (`link::stripe_of`), so that
    /// traffic on one session wakes only the few that share its stripe (not all of them).
    /// Each on its own cache lines: callers of different sessions count themselves in
    /// and out of neighbouring stripes at once.
    stripes: Box<[CachePadded<Stripe>]>,
    /// Callers asleep on any stripe (so that nobody scans them all to find out).
    stripe_sleepers: AtomicUsize,
    /// Waiters spinning on the ring right now: they pump it themselves, so the keeper
    /// need not ask the peer to ring (each ring is a syscall on the writer's side).
    spinners: AtomicUsize,
    /// Most adaptive waiters that spin at once (the CPUs this process may use).
    max_spinners: usize,
    /// The region and the offset of the peer's head index: spinners watch it without the
    /// lock and take the lock when it moves (or every few microseconds for the rest).
    region: SharedRegion,
    peer_head: usize,
    pub(crate) doorbell: Arc<dyn Doorbell>,
    own_id: u16,
    pub(crate) cfg: Config,
    stop: AtomicBool,
    /// The keeper sleeps without asking the peer to ring (spinners, or a frame parked for
    /// an in-place reader): whoever stops spinning or releases the frame wakes it.
    pub(crate) keeper_unarmed: AtomicBool,
    /// Someone woke the keeper because it relies on it: its next round reads the ring,
    /// even if callers were reading it (see `readers_ahead` in `keeper_round`).
    keeper_recalled: AtomicBool,
    /// Who waits on the doorbell (`bell.rs`).
    bell: Bell,
    keeper_thread: OnceLock<Thread>,
    /// No keeper thread: the program drives the keeper's rounds (`Driver`).
    driven: AtomicBool,
    /// Some session has a notify callback: its reader waits outside the endpoint, so the
    /// keeper must be back on the bell whenever no caller is.
    notifiers: AtomicBool,
    /// Whether a blocked caller may wait on the doorbell itself (the doorbell wakes).
    direct_wait: AtomicBool,
    /// Where writers that found the ring full sleep. Space is handed on one writer at a
    /// time: each space report wakes one, and a writer woken here wakes the next when it
    /// leaves. Waking them all (256 writers on two CPUs) made three of four wakeups
    /// useless.
    space_cv: Condvar,
    space_sleepers: AtomicUsize,
    /// Threads that found the link lock taken and have not got it yet ([`LinkGuard`]).
    lock_waiters: CachePadded<AtomicUsize>,
    /// Waits that slept to their [`WAIT_LIMIT`] and then found what they waited for: a
    /// wakeup that never came ([`Stats::late_wakeups`](crate::Stats::late_wakeups)).
    late_wakeups: AtomicU64,
}

/// The longest a blocked caller sleeps before it looks again by itself. Every event a
/// caller waits for wakes it (the doorbell, a notify, a hand-off): this limit is a safety
/// net, and a wait that runs into it and then finds its data is counted as a lost wakeup.
const WAIT_LIMIT: Duration = Duration::from_millis(100);

/// Threads waiting for the lock from which a stream write leaves the head to them
/// ([`LinkGuard`]). One is often the keeper or a reader, which a lone writer's stream
/// of small writes would then wait on for every head.
const LEAVE_HEAD_WAITERS: usize = 2;

/// Most bytes left unpublished for waiters: a lock that stays contended (many writers)
/// must not hold the reader back until the ring is full. 16 frames of 4 KiB.
const LEAVE_HEAD_MAX: u64 = 64 << 10;

/// How long the keeper sits out at most after leaving the bell to a caller that wanted
/// it: if no caller took it by then, the keeper takes it back.
const HANDOFF_MAX: Duration = Duration::from_millis(1);

/// How long the keeper sits out at most while callers read the ring ahead of it. What
/// nobody recalls it for waits this long: with 1 ms, a stream both ways in block mode
/// moved 0.35-0.50x one way's bytes against 0.58-0.67x with a keeper that never sat
/// out; with 100 us, 0.49-0.58x, and the event loop over 256 sessions kept its gain.
const READERS_AHEAD_NAP: Duration = Duration::from_micros(100);

/// The same on a polling endpoint while callers spin on the ring: they read it ahead and
/// need no keeper, and its wakeup every 100 us took a CPU from one of them (on two CPUs,
/// the 64-byte round trip's tail: p99.9 28-31 us, 14-24 us with this nap). As long as
/// the keeper sleeps unarmed behind spinners.
const SPINNERS_AHEAD_NAP: Duration = crate::link::park::PARK_MAX.checked_div(2).unwrap();

/// Which sleepers to wake.
#[derive(Clone, Copy, Default)]
struct Wake {
    link: bool,
    accept: bool,
    stripes: Stripes,
    /// Ring space came back: wake one writer waiting for it (all: `space_all`).
    space: bool,
    space_all: bool,
}

/// The link, locked. A stream write that finds another thread waiting for the lock
/// leaves the ring's head unpublished ([`Shared::leave_head`]); whoever releases the
/// lock with nobody waiting publishes it, here. Each head store is followed, lock held,
/// by the wakeup rule's fence, which waits for the store to reach the reader's CPU, and
/// the reader loads the moved line once per head: writers queued on the lock share one
/// store, one fence and one line transfer (what that gives a thread per session was
/// within the bench's spread: benches/README.md). One writer alone finds nobody waiting
/// and publishes every frame at once, as before.
pub(crate) struct LinkGuard<'a> {
    shared: &'a Shared,
    /// `None` only inside [`LinkGuard::wait_on`], while a condvar holds the guard.
    link: Option<MutexGuard<'a, Link>>,
}

impl Deref for LinkGuard<'_> {
    type Target = Link;
    fn deref(&self) -> &Link {
        match &self.link {
            Some(l) => l,
            None => unreachable!("a link guard is used only while it holds the lock"),
        }
    }
}

impl DerefMut for LinkGuard<'_> {
    fn deref_mut(&mut self) -> &mut Link {
        match &mut self.link {
            Some(l) => l,
            None => unreachable!("a link guard is used only while it holds the lock"),
        }
    }
}

impl Drop for LinkGuard<'_> {
    fn drop(&mut self) {
        if let Some(mut l) = self.link.take() {
            self.shared.publish_on_release(&mut l);
        }
    }
}

impl<'a> LinkGuard<'a> {
    /// Sleeps on `cv` for at most `limit`, the lock released meanwhile (and released as
    /// any other release is: the head published if nobody waits for the lock). Whether
    /// the wait ran to its limit.
    fn wait_on(mut self, cv: &Condvar, limit: Duration) -> (LinkGuard<'a>, bool) {
        let shared = self.shared;
        let Some(mut l) = self.link.take() else {
            unreachable!("a link guard is used only while it holds the lock")
        };
        shared.publish_on_release(&mut l);
        let (l, waited) = cv.wait_timeout(l, limit).unwrap_or_else(|e| e.into_inner());
        (
            LinkGuard {
                shared,
                link: Some(l),
            },
            waited.timed_out(),
        )
    }
}

/// Gives a loan back if [`Shared::copy_lent`] unwinds before it does.
struct GiveBack<'a> {
    shared: &'a Shared,
    loan: Loan,
}

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        drop(self.shared.give_back(self.loan));
    }
}

/// Where some sessions' callers sleep.
#[derive(Default)]
struct Stripe {
    cv: Condvar,
    sleepers: AtomicUsize,
}

/// What a waiting caller waits for, so that it is woken for that.
#[derive(Clone, Copy)]
pub(crate) enum WaitOn {
    /// Link state (up, an open answered): woken by any progress.
    Link,
    /// An accepted session.
    Accept,
    /// Progress of one session (data, credit, EOF, ring space).
    Session(u64),
}

/// What [`Shared::lead`] did.
enum Led {
    /// Nothing: the bell is not free (or cannot wake us); sleep on the condvar.
    No,
    /// Read the ring, or found data or a fault while arming: try again.
    Progress,
    /// Waited on the doorbell; `early` when it returned before half the time, `to_limit`
    /// when it ran to the limit.
    Waited { early: bool, to_limit: bool },
}

/// Counts a spinning waiter while it lives.
struct Spinning<'a>(&'a AtomicUsize);

impl Drop for Spinning<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, StdOrdering::SeqCst);
    }
}

impl Shared {
    pub(crate) fn lock(&self) -> LinkGuard<'_> {
        let link = match self.link.try_lock() {
            Ok(l) => l,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                // Counted while waiting: the holder may leave the head to us (Relaxed:
                // a holder that sees the count reads it before its release, which our
                // acquire follows, so it cannot see our decrement; one that does not
                // see it yet publishes).
                self.lock_waiters.fetch_add(1, StdOrdering::Relaxed);
                let l = self.link.lock().unwrap_or_else(|e| e.into_inner());
                self.lock_waiters.fetch_sub(1, StdOrdering::Relaxed);
                l
            }
        };
        LinkGuard {
            shared: self,
            link: Some(link),
        }
    }

    /// Whether a stream write (lock held) may leave the head it moved unpublished: a
    /// thread waiting for the lock takes it after us and publishes at its release, or
    /// leaves it to the next (up to [`LEAVE_HEAD_MAX`] bytes).
    pub(crate) fn leave_head(&self, link: &Link) -> bool {
        link.unpublished_len() < LEAVE_HEAD_MAX
            && self.lock_waiters.load(StdOrdering::Relaxed) >= LEAVE_HEAD_WAITERS
    }

    /// At each release of the lock: publishes what writes left unpublished, unless a
    /// thread waits for the lock (then it does, at its own release).
    fn publish_on_release(&self, link: &mut Link) {
        if link.unpublished_len() > 0 && !self.leave_head(link) {
            let mut out = Actions::default();
            link.publish(&mut out);
            self.ring(link, &mut out);
        }
    }

    /// Rings the peer if the link's calls asked for it. Called with the lock held:
    /// ringing is one eventfd write or one MMIO store, and it keeps the order of ring and
    /// state simple.
    pub(crate) fn ring(&self, link: &Link, out: &mut Actions) {
        if std::mem::take(&mut out.ring_peer) {
            if let Some(peer) = link.doorbell_target() {
                self.doorbell.ring(peer);
            }
        }
    }

    /// Does what the link's calls asked for: rings the peer (with the lock held) and
    /// wakes the callers of the sessions they concerned.
    pub(crate) fn act(&self, link: &Link, mut out: Actions) {
        self.ring(link, &mut out);
        if out.reset {
            // A call found the peer's damage and reset the link: everyone's calls end.
            self.notify_all();
        } else if !out.wake.is_empty() || out.space_back {
            self.notify_unlocked(Wake {
                stripes: out.wake,
                space_all: out.space_back,
                ..Wake::default()
            });
        }
    }

    /// Copies the payload of a frame reserved by `Link::write_frame` (without the lock:
    /// the bytes are ours until the head is stored), then finishes it under the lock.
    pub(crate) fn copy_reserved(&self, slot: CopySlot, payload: &[u8]) {
        self.region.write(slot.at, payload);
        let mut link = self.lock();
        let mut out = Actions::default();
        link.finish_copy(slot, &mut out);
        self.act(&link, out);
    }

    /// Copies the payloads a direct read of generation `gen` lent (`Link::read_direct`)
    /// into its buffer, without the lock, then gives the loan back under it; `read` is
    /// what the read returned. A link reset meanwhile: the bytes may be a restarted
    /// peer's, so they are dropped and the reset reported.
    pub(crate) fn copy_lent(
        &self,
        gen: u64,
        loan: Loan,
        copies: &[LentCopy],
        buf: &mut [u8],
        read: io::Result<usize>,
    ) -> io::Result<usize> {
        // Given back even if a copy unwinds: the ring's space would never come back.
        let on_unwind = GiveBack { shared: self, loan };
        if read.is_ok() {
            for c in copies {
                self.region.read(c.at, &mut buf[c.to..c.to + c.len]);
            }
        }
        // It holds nothing to free: forgetting it only skips its drop.
        std::mem::forget(on_unwind);
        let link = self.give_back(loan);
        if read.is_ok() && link.gen() != gen {
            return Err(crate::link::reset_error(&link));
        }
        read
    }

    /// Gives a direct read's loan back (the ring's space behind it may go back to the
    /// peer); the lock stays held for the caller.
    fn give_back(&self, loan: Loan) -> LinkGuard<'_> {
        let mut link = self.lock();
        let mut out = Actions::default();
        link.give_back(loan, &mut out);
        self.act(&link, out);
        link
    }

    /// A link fault: every session is reset; a new epoch starts unless the peer's
    /// restart already started one. Rings the peer and wakes every sleeper.
    pub(crate) fn fault(&self, link: &mut Link, f: Fault) {
        let mut out = Actions::default();
        if f.needs_local_reset() {
            link.local_reset(&f.to_string(), &mut out);
        }
        self.ring(link, &mut out);
        self.notify_all();
    }

    /// Wakes every sleeper, the caller waiting on the doorbell too (the peer that broke
    /// the link may never ring it).
    fn notify_all(&self) {
        if self.bell.holder() == Holder::Caller {
            self.doorbell.interrupt();
        }
        self.cv.notify_all();
        self.space_cv.notify_all();
        self.accept_cv.notify_all();
        for s in self.stripes.iter() {
            s.cv.notify_all();
        }
    }

    /// Which sleepers progress concerns (decided under the lock): the link waiters, the
    /// accept waiters, and the session stripes the frames of the calls behind `out`
    /// concerned.
    fn to_notify(&self, link: &Link, out: &mut Actions) -> Wake {
        let touched = std::mem::take(&mut out.wake);
        Wake {
            link: self.sleepers.load(StdOrdering::Relaxed) > 0,
            accept: self.accept_sleepers.load(StdOrdering::Relaxed) > 0
                && (!link.is_up() || link.backlog_waiting()),
            // Progress that names no session (a pad, a state change) concerns them all
            // (writers waiting for space pass the news on one by one).
            stripes: if touched.is_empty() {
                Stripes::ALL
            } else {
                touched
            },
            space: touched.is_empty(),
            space_all: false,
        }
    }

    /// Notifies what `to_notify` said, after the lock is released so that the woken
    /// threads do not block on it at once.
    fn notify_unlocked(&self, w: Wake) {
        if w.link {
            self.cv.notify_all();
        }
        if w.accept {
            self.accept_cv.notify_all();
        }
        if (w.space || w.space_all) && self.space_sleepers.load(StdOrdering::Relaxed) > 0 {
            if w.space_all {
                self.space_cv.notify_all();
            } else {
                self.space_cv.notify_one();
            }
        }
        if self.stripe_sleepers.load(StdOrdering::Relaxed) == 0 {
            return;
        }
        for i in w.stripes.iter() {
            if let Some(s) = self.stripes.get(i) {
                if s.sleepers.load(StdOrdering::Relaxed) > 0 {
                    s.cv.notify_all();
                }
            }
        }
    }

    /// Callers asleep on a condvar that rely on whoever reads the ring. Not those in
    /// `accept`: an Open stops the direct reads of the callers that read the ring ahead
    /// of the keeper when it reaches the ring's tail, and a caller that finds it there
    /// pumps it (or sleeps on a condvar, which recalls the keeper). A server with
    /// listeners always has threads in `accept`; counting them kept the keeper copying
    /// every frame a second time behind the readers.
    fn condvar_sleepers(&self) -> usize {
        [&self.sleepers, &self.stripe_sleepers, &self.space_sleepers]
            .iter()
            .map(|n| n.load(StdOrdering::Relaxed))
            .sum()
    }

    /// A caller returns `WouldBlock` and waits for a callback, which only the keeper runs:
    /// the keeper's next round reads the ring even though callers were reading it, and a
    /// keeper that sits out meanwhile comes back to it now.
    fn recall_keeper_for_callbacks(&self) {
        if self.bell.keeper_benched() {
            self.unpark_keeper();
        } else {
            self.keeper_recalled.store(true, StdOrdering::SeqCst);
        }
    }

    /// Wakes the keeper: its thread, or a driven keeper's driver (through the doorbell,
    /// which the driver watches).
    fn unpark_keeper(&self) {
        self.keeper_recalled.store(true, StdOrdering::SeqCst);
        if let Some(t) = self.keeper_thread.get() {
            t.unpark();
        } else if self.driven.load(StdOrdering::Relaxed) {
            self.doorbell.interrupt();
        }
    }

    /// Whether a blocked caller may wait on the doorbell itself.
    fn direct_wait(&self) -> bool {
        self.direct_wait.load(StdOrdering::Relaxed)
    }

    /// Makes the keeper a driven one (before attaching): the program's driver watches
    /// the doorbell, so no caller may wait on it.
    pub(crate) fn set_driven(&self) {
        self.driven.store(true, StdOrdering::Relaxed);
        self.direct_wait.store(false, StdOrdering::Relaxed);
    }

    /// Waits on the doorbell in the keeper's place, with the lock held on entry and on
    /// return. `flooded`: the last waits ended early with nothing for us (a peer ringing
    /// for nothing), so pause first, as the keeper does.
    fn lead<'a>(
        &'a self,
        mut link: LinkGuard<'a>,
        limit: Duration,
        flooded: bool,
        leading: &mut bool,
    ) -> (LinkGuard<'a>, Led) {
        // A frame parked for an in-place reader stays in the ring until it is released:
        // the ring would look readable for ever. Its release wakes the condvar sleepers.
        if !self.direct_wait() || !link.is_up() || link.has_parked() {
            self.resign(leading);
            return (link, Led::No);
        }
        if !*leading && self.bell.holder() != Holder::Free {
            return (link, Led::No);
        }
        // Whatever is in the ring goes to its sessions first (ours included); then arm
        // and re-check (the lost-wakeup rule) as the keeper does.
        if self.pump_and_wake(&mut link, Instant::now()) {
            return (link, Led::Progress);
        }
        let mut out = Actions::default();
        // Control frames queued for ring space go out first: arming below only reports
        // that space is there, and nobody else may be awake to send them.
        if link.has_pending() {
            match link.flush(&mut out) {
                Ok(true) => {
                    link.space_came_back();
                    self.ring(&link, &mut out);
                    self.notify_unlocked(Wake {
                        space: true,
                        ..Wake::default()
                    });
                    return (link, Led::Progress);
                }
                Ok(false) => {}
                Err(f) => {
                    self.fault(&mut link, f);
                    return (link, Led::Progress);
                }
            }
        }
        let armed = match link.arm_wakeup(&mut out) {
            Ok(false) if link.has_pending() => link.arm_pending_space(&mut out),
            r => r,
        };
        match armed {
            Ok(false) => {}
            Ok(true) => {
                self.act(&link, out);
                return (link, Led::Progress);
            }
            Err(f) => {
                self.fault(&mut link, f);
                return (link, Led::Progress);
            }
        }
        if !*leading {
            // Free: checked above, under the same lock.
            *leading = self.bell.caller_take();
            debug_assert!(*leading);
        }
        self.ring(&link, &mut out);
        drop(link);
        if flooded {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        self.doorbell.wait(Some(limit));
        let slept = t.elapsed();
        let (early, to_limit) = (slept < limit / 2, slept >= limit);
        let mut link = self.lock();
        // Awake: the peer need not ring while we read (the keeper does the same). We keep
        // the bell until we return (or sleep on a condvar): woken for other sessions'
        // data, we wait again without a hand-off.
        link.disarm_wakeup();
        // What the keeper would do on this wakeup, since it sits out.
        let mut out = Actions::default();
        let followed = self.follow_peer(&mut link, Instant::now(), &mut out);
        if followed {
            self.ring(&link, &mut out);
            self.notify_all();
        }
        // A change found by this look (the peer gone, or restarted) was nobody's to ring
        // for: not a lost wakeup.
        let to_limit = to_limit && !followed;
        if self.send_queued(&mut link, &mut out) {
            self.ring(&link, &mut out);
            self.notify_unlocked(Wake {
                space: true,
                ..Wake::default()
            });
        }
        (link, Led::Waited { early, to_limit })
    }

    /// Follows the peer on a wakeup: its epoch (a restart), its heartbeat, and what the
    /// transport says of it (the ivshmem server's news that it left). Whether the link
    /// changed (a fault, reported and acted on here, counts).
    fn follow_peer(&self, link: &mut Link, now: Instant, out: &mut Actions) -> bool {
        let mut changed = link.check_peer(now, out);
        let present = link.peer_id().and_then(|id| self.doorbell.peer_present(id));
        if let Err(f) = link.beat(now, present) {
            self.fault(link, f);
            changed = true;
        }
        changed
    }

    /// Sends control frames queued for ring space; whether space came back for the
    /// writers waiting for it (which concerns only them, not every stripe).
    fn send_queued(&self, link: &mut Link, out: &mut Actions) -> bool {
        let had_pending = link.has_pending();
        if had_pending {
            if let Err(f) = link.flush(out) {
                self.fault(link, f);
            }
        }
        let space = link.space_ready() || (had_pending && !link.has_pending());
        if space {
            link.space_came_back();
        }
        space
    }

    /// Reads what the peer sent into the sessions and wakes whom it concerns. Whether the
    /// caller should try again: something arrived, or a fault changed the link.
    pub(crate) fn pump_and_wake(&self, link: &mut Link, now: Instant) -> bool {
        let mut out = Actions::default();
        match link.pump(now, &mut out) {
            Ok(true) => {
                self.ring(link, &mut out);
                let w = self.to_notify(link, &mut out);
                self.notify_unlocked(w);
                true
            }
            Ok(false) => {
                self.act(link, out);
                false
            }
            Err(f) => {
                self.fault(link, f);
                true
            }
        }
    }

    /// Gives the bell up (with the lock held) if we have it, recalling the keeper if
    /// callers asleep on condvars need someone on it.
    fn resign(&self, leading: &mut bool) {
        if std::mem::take(leading) {
            // Callers asleep on condvars rely on whoever is on the doorbell: writers
            // waiting for ring space too (the peer rings for the space they posted). So
            // do callers waiting for a callback: a keeper that sat out behind a caller
            // that held the bell for long sits out for the heartbeat, and a callback left
            // to it ran up to 100 ms late. What else needs the keeper (accepts, frames
            // waiting for space) can wait for its short nap: recalling it on every
            // give-up would cost a thread switch each time.
            let notifiers = self.notifiers.load(StdOrdering::Relaxed);
            if self
                .bell
                .caller_give_up(notifiers || self.condvar_sleepers() > 0)
            {
                self.unpark_keeper();
            }
        }
    }

    /// Whether frames a keeper's pump read after it slept to its limit were waited for:
    /// a callback somebody awaited ran, or callers sleep on the stripes they concern.
    /// Nobody rang or recalled the keeper for them: a wakeup was lost.
    fn came_late(&self, pumped: &Actions) -> bool {
        pumped.awaited_callback
            || (self.stripe_sleepers.load(StdOrdering::Relaxed) > 0
                && pumped.wake.iter().any(|i| {
                    self.stripes
                        .get(i)
                        .is_some_and(|s| s.sleepers.load(StdOrdering::Relaxed) > 0)
                }))
    }

    /// Waits that slept to the safety net's limit and then found what they waited for.
    pub(crate) fn late_wakeups(&self) -> u64 {
        self.late_wakeups.load(StdOrdering::Relaxed)
    }

    /// Counts an event loop that polls its sessions as a spinner (the keeper then stops
    /// asking the peer to ring), or stops counting it, waking the keeper to ask again.
    pub(crate) fn set_loop_spinning(&self, spinning: bool) {
        if spinning {
            self.spinners.fetch_add(1, StdOrdering::SeqCst);
        } else {
            self.spinners.fetch_sub(1, StdOrdering::SeqCst);
            self.wake_unarmed_keeper();
        }
    }

    /// A callback waits outside the endpoint (a session's, a listener's or a connect's):
    /// the keeper must follow the ring for it from now on.
    pub(crate) fn watch_for_callbacks(&self) {
        self.notifiers.store(true, StdOrdering::Relaxed);
        self.unpark_keeper();
    }

    /// Wakes a keeper that sleeps unarmed, so that it asks the peer to ring again.
    pub(crate) fn wake_unarmed_keeper(&self) {
        if self.keeper_unarmed.swap(false, StdOrdering::SeqCst) {
            self.doorbell.interrupt();
        }
    }

    /// As `wait_for`, for a caller of session `id`.
    pub(crate) fn wait_session<T>(
        &self,
        id: u64,
        deadline: Option<Instant>,
        patience: Patience,
        attempt: impl FnMut(&mut Link, &mut Actions) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        self.wait_unlocked_on(WaitOn::Session(id), deadline, patience, attempt)
    }

    /// As [`Shared::wait_locked_on`], for a caller of session `id`.
    pub(crate) fn wait_session_locked<T>(
        &self,
        id: u64,
        deadline: Option<Instant>,
        patience: Patience,
        attempt: impl FnMut(&mut Link, &mut Actions) -> io::Result<Option<T>>,
    ) -> io::Result<(LinkGuard<'_>, T)> {
        self.wait_locked_on(WaitOn::Session(id), deadline, patience, attempt)
    }

    /// Runs `attempt` until it returns a value, waiting between tries as the config says.
    pub(crate) fn wait_for<T>(
        &self,
        deadline: Option<Instant>,
        patience: Patience,
        attempt: impl FnMut(&mut Link, &mut Actions) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        self.wait_unlocked_on(WaitOn::Link, deadline, patience, attempt)
    }

    /// As [`Shared::wait_locked_on`], releasing the lock before it returns. The guard
    /// is dropped where the first attempt succeeds rather than moved out with the value:
    /// a 64-byte write spent about a tenth of its time moving it through the stack.
    #[inline]
    fn wait_unlocked_on<T>(
        &self,
        on: WaitOn,
        deadline: Option<Instant>,
        patience: Patience,
        mut attempt: impl FnMut(&mut Link, &mut Actions) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        let mut link = self.lock();
        let mut out = Actions::default();
        let r = attempt(&mut link, &mut out);
        // Read, not taken (`act` ignores it): a byte stored into `out` just before `act`
        // moves it makes the move's wide loads wait for the store (a failed store
        // forward), which cost a 64-byte write and its read 5-10% of their time.
        let for_space = out.wait_space;
        self.act(&link, out);
        match r {
            Ok(Some(v)) => Ok(v),
            Err(e) => Err(e),
            Ok(None) => self
                .wait_loop(on, deadline, patience, link, for_space, attempt)
                .map(|(_, v)| v),
        }
    }

    /// Runs `attempt` once under the lock, and on a miss waits in [`Shared::wait_loop`];
    /// `accept` waits never poll for ever and sleep on `accept_cv`. The first attempt is
    /// kept apart from the loop: a 64-byte write or read that succeeds at once spent a
    /// sixth of its time moving the loop's state through the stack.
    #[inline]
    pub(crate) fn wait_locked_on<T>(
        &self,
        on: WaitOn,
        deadline: Option<Instant>,
        patience: Patience,
        mut attempt: impl FnMut(&mut Link, &mut Actions) -> io::Result<Option<T>>,
    ) -> io::Result<(LinkGuard<'_>, T)> {
        let mut link = self.lock();
        let mut out = Actions::default();
        let r = attempt(&mut link, &mut out);
        // Read, not taken: as in `wait_unlocked_on`.
        let for_space = out.wait_space;
        self.act(&link, out);
        match r {
            Ok(Some(v)) => Ok((link, v)),
            Err(e) => Err(e),
            Ok(None) => self.wait_loop(on, deadline, patience, link, for_space, attempt),
        }
    }

    /// The wait loop, entered after a first attempt missed (`for_space`: it found the
    /// ring full).
    #[inline(never)]
    fn wait_loop<'a, T>(
        &'a self,
        on: WaitOn,
        deadline: Option<Instant>,
        patience: Patience,
        mut link: LinkGuard<'a>,
        for_space: bool,
        mut attempt: impl FnMut(&mut Link, &mut Actions) -> io::Result<Option<T>>,
    ) -> io::Result<(LinkGuard<'a>, T)> {
        // Set at the first miss: reading the clock costs as much as a write.
        let mut spin_until: Option<Option<Instant>> = None;
        let mut missed = Some(for_space);
        let mut spins = 0u32;
        let mut spinning: Option<Spinning<'_>> = None;
        // Wakeups on the doorbell in a row that brought us nothing (a ringing flood).
        let mut early_wakes = 0u32;
        // Whether we have the bell (we give it up, under the lock, before returning).
        let mut leading = false;
        // Woken on the space condvar: pass the turn on when leaving.
        let mut space_turn = false;
        let mut pumped_once = false;
        // The last sleep ran to the safety net's limit.
        let mut slept_to_limit = false;
        let r = loop {
            let for_space = match missed.take() {
                Some(for_space) => for_space,
                None => {
                    let mut out = Actions::default();
                    let r = attempt(&mut link, &mut out);
                    let for_space = out.wait_space;
                    self.act(&link, out);
                    if std::mem::take(&mut slept_to_limit) && !matches!(r, Ok(None)) {
                        self.late_wakeups.fetch_add(1, StdOrdering::Relaxed);
                    }
                    match r {
                        Ok(Some(v)) => break Ok((link, v)),
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    }
                    for_space
                }
            };
            if patience != Patience::Wait && link.is_closed() {
                break Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "ivring: endpoint closed",
                ));
            }
            if patience == Patience::Now {
                // What the peer sent may be what this call waits for (credit, data): an
                // event loop's calls move the ring themselves rather than wait for the
                // keeper. Once: after that the answer is WouldBlock.
                if !std::mem::replace(&mut pumped_once, true)
                    && self.pump_and_wake(&mut link, Instant::now())
                {
                    continue;
                }
                if let WaitOn::Session(id) = on {
                    if for_space {
                        link.notify_on_space(id);
                    }
                    link.await_callback(id);
                }
                self.recall_keeper_for_callbacks();
                break Err(io::ErrorKind::WouldBlock.into());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break Err(io::Error::new(io::ErrorKind::TimedOut, "ivring: timed out"));
            }
            if link.is_closed() {
                break Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "ivring: endpoint closed",
                ));
            }
            let spin_until = *spin_until.get_or_insert(match self.cfg.wait {
                WaitMode::Poll if !matches!(on, WaitOn::Accept) && patience == Patience::Wait => {
                    None
                }
                WaitMode::Block => Some(now),
                WaitMode::Adaptive | WaitMode::Poll => Some(now + self.cfg.spin),
            });
            // A few spinners keep the ring moving; more only fight over the lock and the
            // CPUs (many sessions): the rest sleep until progress wakes them.
            // (Polling too: more spinners than CPUs starve the threads they wait for.)
            let crowded = spinning.is_none()
                && self.cfg.wait != WaitMode::Block
                && self.spinners.load(StdOrdering::Relaxed) >= self.max_spinners;
            if !crowded && spin_until.is_none_or(|s| now < s) {
                self.resign(&mut leading);
                if spinning.is_none() {
                    self.spinners.fetch_add(1, StdOrdering::SeqCst);
                    spinning = Some(Spinning(&self.spinners));
                }
                link.beat_own(now);
                if link.rx_moved() || self.pump_and_wake(&mut link, now) {
                    continue;
                }
                drop(link);
                // Watch the peer's head without the lock (a plain load of a line the
                // writer owns), back to the lock when it moves or after a while.
                let seen = self
                    .region
                    .load_u64(self.peer_head, crate::shm::sync::Ordering::Relaxed);
                let mut moved = false;
                // One pause between loads: a pause is long on this machine's CPUs (16 of
                // them cost a 64-byte round trip 0.2 us; 4 between loads cost 0.1 us of
                // each 0.35 us round trip), and until the writer stores to the line
                // again each load hits the reader's own cache.
                for _ in 0..64 {
                    std::hint::spin_loop();
                    if self
                        .region
                        .load_u64(self.peer_head, crate::shm::sync::Ordering::Relaxed)
                        != seen
                    {
                        moved = true;
                        break;
                    }
                }
                spins += 1;
                if !moved && spins.is_multiple_of(2) {
                    // Let a starved keeper or peer thread run (more runnable threads than
                    // CPUs: the peer we wait for may be waiting for this one).
                    std::thread::yield_now();
                }
                link = self.lock();
            } else if patience == Patience::Spin {
                // Spun without luck: the caller sleeps elsewhere (its runtime), woken by
                // the session's callback.
                if let WaitOn::Session(id) = on {
                    if for_space {
                        link.notify_on_space(id);
                    }
                    link.await_callback(id);
                }
                self.recall_keeper_for_callbacks();
                break Err(io::ErrorKind::WouldBlock.into());
            } else {
                // Nobody pumps the ring while we sleep but the keeper: it must be armed.
                drop(spinning.take());
                self.wake_unarmed_keeper();
                let mut limit = WAIT_LIMIT;
                if let Some(d) = deadline {
                    limit = limit.min(d.saturating_duration_since(now));
                }
                // Only the safety net's limit says a wakeup was missed, not a deadline.
                let net = limit == WAIT_LIMIT;
                // A thread waiting in accept does not take the bell: it would be woken
                // by every ring for the sessions' traffic and pass it on to them.
                let mut led = Led::No;
                if !matches!(on, WaitOn::Accept) {
                    (link, led) = self.lead(link, limit, early_wakes > 64, &mut leading);
                }
                match led {
                    Led::No => {}
                    Led::Progress => {
                        early_wakes = 0;
                        continue;
                    }
                    Led::Waited { early, to_limit } => {
                        early_wakes = if early { early_wakes + 1 } else { 0 };
                        slept_to_limit = net && to_limit;
                        if let WaitOn::Session(id) = on {
                            link.slept(id);
                        }
                        continue;
                    }
                }
                let stripe = match on {
                    WaitOn::Session(id) => crate::link::stripe_of(id),
                    WaitOn::Link | WaitOn::Accept => 0,
                };
                // Ask the keeper for the bell, or recall it if nobody is on the doorbell
                // and it sits out (say the link is down, so we may not take it): it must
                // follow the ring for us now, not after its nap.
                if self.bell.caller_wait(stripe, self.direct_wait()) == CallerWait::RecallKeeper {
                    self.unpark_keeper();
                }
                let (cv, n) = match on {
                    _ if for_space => (&self.space_cv, &self.space_sleepers),
                    WaitOn::Accept => (&self.accept_cv, &self.accept_sleepers),
                    WaitOn::Link => (&self.cv, &self.sleepers),
                    WaitOn::Session(_) => {
                        (&self.stripes[stripe].cv, &self.stripes[stripe].sleepers)
                    }
                };
                space_turn |= for_space;
                self.resign(&mut leading);
                let on_stripe = !for_space && matches!(on, WaitOn::Session(_));
                n.fetch_add(1, StdOrdering::Relaxed);
                if on_stripe {
                    self.stripe_sleepers.fetch_add(1, StdOrdering::Relaxed);
                }
                if let WaitOn::Session(id) = on {
                    link.slept(id);
                }
                let to_limit;
                (link, to_limit) = link.wait_on(cv, limit);
                slept_to_limit = net && to_limit;
                n.fetch_sub(1, StdOrdering::Relaxed);
                if on_stripe {
                    self.stripe_sleepers.fetch_sub(1, StdOrdering::Relaxed);
                }
            }
        };
        self.resign(&mut leading);
        if space_turn && self.space_sleepers.load(StdOrdering::Relaxed) > 0 {
            self.space_cv.notify_one();
        }
        r
    }
}

/// How long a call may wait for what it needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Patience {
    /// Until the deadline, spinning and sleeping as the wait mode says.
    Wait,
    /// Spin as the wait mode says (not at all under `Block`), then `WouldBlock` rather
    /// than sleep: for an async task, which sleeps in its runtime, woken by the session's
    /// callback. Streaming keeps the ring moving without the keeper's wakeups.
    Spin,
    /// One attempt (and one pump of the ring), then `WouldBlock`.
    Now,
}

impl Patience {
    pub(crate) fn nonblocking(nonblocking: bool) -> Patience {
        if nonblocking {
            Patience::Now
        } else {
            Patience::Wait
        }
    }
}

impl Shared {
    /// The runtime of one side of a link, not attached yet.
    pub(crate) fn new(
        role: Role,
        region: SharedRegion,
        doorbell: Arc<dyn Doorbell>,
        cfg: Config,
    ) -> Result<Arc<Shared>, LayoutError> {
        let geom = Geometry::for_size(region.len())?;
        if role == Role::Guest {
            Geometry::await_header(&region, cfg.layout_wait)?;
        }
        let own_id = doorbell.own_id();
        // A polling endpoint never asks the peer to ring (PROTOCOL.md §5): nobody may
        // wait on its doorbell.
        let direct_wait = doorbell.can_wait() && cfg.wait != WaitMode::Poll;
        let peer_head = role.peer_block() + crate::shm::layout::side::TX_HEAD;
        let link = Link::new(role, region.clone(), geom, cfg.clone(), Instant::now());
        Ok(Arc::new(Shared {
            link: Mutex::new(link),
            cv: Condvar::new(),
            doorbell,
            own_id,
            cfg,
            stop: AtomicBool::new(false),
            accept_cv: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            accept_sleepers: AtomicUsize::new(0),
            stripes: (0..crate::link::STRIPES)
                .map(|_| CachePadded::new(Stripe::default()))
                .collect(),
            stripe_sleepers: AtomicUsize::new(0),
            spinners: AtomicUsize::new(0),
            max_spinners: std::thread::available_parallelism().map_or(2, |n| n.get()),
            region,
            peer_head,
            keeper_unarmed: AtomicBool::new(false),
            keeper_recalled: AtomicBool::new(false),
            bell: Bell::new(),
            keeper_thread: OnceLock::new(),
            driven: AtomicBool::new(false),
            notifiers: AtomicBool::new(false),
            direct_wait: AtomicBool::new(direct_wait),
            space_cv: Condvar::new(),
            space_sleepers: AtomicUsize::new(0),
            lock_waiters: CachePadded::new(AtomicUsize::new(0)),
            late_wakeups: AtomicU64::new(0),
        }))
    }

    /// Attaches the link (PROTOCOL.md §3).
    pub(crate) fn attach(&self) {
        let mut link = self.lock();
        let mut out = Actions::default();
        link.attach(Some(self.own_id), &mut out);
        link.check_peer(Instant::now(), &mut out);
        self.act(&link, out);
    }

    /// Starts the keeper thread.
    pub(crate) fn spawn_keeper(self: &Arc<Self>) -> JoinHandle<()> {
        let sh = self.clone();
        std::thread::Builder::new()
            .name("ivring-keeper".into())
            .spawn(move || keeper(sh))
            .expect("spawn ivring keeper thread")
    }

    /// Stops the keeper and, if the link was attached, detaches it and wakes every
    /// sleeper (their calls fail).
    pub(crate) fn shut_down(&self, keeper: Keeper) {
        self.stop.store(true, StdOrdering::SeqCst);
        self.doorbell.interrupt();
        self.unpark_keeper();
        match keeper {
            Keeper::None => return, // never attached: nothing to tell the peer
            Keeper::Thread(k) => {
                let _ = k.join();
            }
            // A round in progress holds the lock; the next one sees `stop` under it and
            // does nothing.
            Keeper::Driven => {}
        }
        let mut link = self.lock();
        let mut out = Actions::default();
        link.detach(&mut out);
        self.ring(&link, &mut out);
        self.notify_all();
    }
}

/// Who runs an endpoint's keeper.
pub(crate) enum Keeper {
    /// Nobody yet: not attached.
    None,
    /// Its own thread.
    Thread(JoinHandle<()>),
    /// The program, through a [`Driver`](crate::Driver).
    Driven,
}

/// The keeper's memory between rounds.
pub(crate) struct KeeperState {
    /// The peer can be asked to ring: a polling endpoint's keeper polls too (backing off
    /// to 1 ms apart) rather than asking the peer to ring (each ring is a syscall on the
    /// writer's path, and readers that poll need none).
    can_wait: bool,
    /// The polling period of a doorbell-less link, backing off while idle.
    poll: Duration,
    /// Early wakeups in a row that found nothing to do (a doorbell flood).
    early_idle: u32,
    /// The last wait on the doorbell ended before half its timeout.
    woke_early: bool,
    /// Whether the last wait was sitting out, and the callers' takes of the bell then.
    benched: bool,
    last_takes: u64,
    /// Where the ring's reader stood when the last round ended.
    rx_seen: u64,
    /// A driven keeper: when its last doorbell wait began, and its timeout.
    waiting: Option<(Instant, Duration)>,
    /// When a sleep of the keeper thread (sitting out, or on the doorbell) that lasted
    /// its whole time, at least [`WAIT_LIMIT`], ended, if no round has read the ring since
    /// (callers read it ahead of us): frames somebody waited for that a read of the ring
    /// finds soon after ([`Shared::came_late`]) were due to a wakeup that never came.
    slept_to_limit: Option<Instant>,
}

const POLL_MIN: Duration = Duration::from_micros(20);
const POLL_MAX: Duration = Duration::from_millis(1);
/// After this many early wakeups in a row that found nothing, the keeper stops listening
/// to the doorbell for `FLOOD_PAUSE` (rings coalesce, so none is lost; new data is at
/// most that late meanwhile).
const FLOOD_WAKES: u32 = 64;
const FLOOD_PAUSE: Duration = Duration::from_millis(1);

/// What a keeper round asks for next.
enum KeeperNext {
    /// Sit out (a caller has the bell, or callers wanted it): park at most this long.
    Bench(Duration),
    /// Sleep on the doorbell without having asked the peer to ring (spinners, or a frame
    /// parked for an in-place reader): whoever ends that wakes the keeper.
    Unarmed(Duration),
    /// Sleep on the doorbell, the peer asked to ring; `flooded`: pause first.
    Doorbell { timeout: Duration, flooded: bool },
    /// Something came in while arming: another round at once.
    Again,
    /// The endpoint is gone.
    Stopped,
}

/// When a driven endpoint's [`Driver::drive`](crate::Driver::drive) wants to run next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriveNext {
    /// Call `drive` again no later than this (the heartbeat, or a short nap).
    pub deadline: Instant,
    /// Do not call it for the doorbell before this instant (a peer ringing for nothing,
    /// again and again): leave the doorbell unread until then. Rings coalesce, so none is
    /// lost.
    pub doorbell_quiet_until: Option<Instant>,
}

impl KeeperState {
    pub(crate) fn new(sh: &Shared) -> KeeperState {
        KeeperState {
            can_wait: sh.doorbell.can_wait() && sh.cfg.wait != WaitMode::Poll,
            poll: POLL_MIN,
            early_idle: 0,
            woke_early: false,
            benched: false,
            last_takes: 0,
            rx_seen: 0,
            waiting: None,
            slept_to_limit: None,
        }
    }
}

impl Shared {
    /// One round of the keeper's work, up to where it would wait: follows the peer,
    /// reads the ring, sends queued control frames, wakes whom it concerns, arms the
    /// doorbell. Says how to wait.
    fn keeper_round(&self, st: &mut KeeperState) -> KeeperNext {
        let sh = self;
        let now = Instant::now();
        let mut link = sh.lock();
        // Read under the lock, which the shut-down's detach takes after setting it: no
        // round runs after the detach.
        if sh.stop.load(StdOrdering::SeqCst) {
            return KeeperNext::Stopped;
        }
        // A caller waiting on the doorbell has armed it: leave its flag alone.
        if !sh.bell.keeper_round() {
            link.disarm_wakeup();
        }
        let mut out = Actions::default();
        let mut changed = sh.follow_peer(&mut link, now, &mut out);
        // Callers took frames from the ring since our last round: they are reading it
        // (their direct reads copy once, a pump here would copy twice and take the lock
        // from them). Sit out a moment and leave the ring to them, unless someone waits
        // on us: a caller asleep on a condvar, control frames waiting for ring space (the
        // peer's writers wait for those credits), or a caller that went to wait for a
        // callback since. A caller that must sleep later takes the bell or recalls us,
        // and the nap bounds what nobody reads.
        let recalled = sh.keeper_recalled.swap(false, StdOrdering::SeqCst);
        let readers_ahead = st.rx_seen != link.rx_position()
            && !changed
            && !recalled
            && !link.has_pending()
            && !link.has_parked()
            && sh.condvar_sleepers() == 0;
        if !readers_ahead {
            let followed = changed;
            match link.pump(now, &mut out) {
                Ok(p) => changed |= p,
                Err(f) => {
                    sh.fault(&mut link, f);
                    changed = true;
                }
            }
            // Within a nap of the long sleep: later, the frames are today's traffic.
            let late = st
                .slept_to_limit
                .take()
                .is_some_and(|at| now.saturating_duration_since(at) <= HANDOFF_MAX);
            if late && !followed && sh.came_late(&out) {
                sh.late_wakeups.fetch_add(1, StdOrdering::Relaxed);
            }
        }
        st.rx_seen = link.rx_position();
        let space = sh.send_queued(&mut link, &mut out);
        let mut wake = if changed {
            sh.to_notify(&link, &mut out)
        } else {
            Wake::default()
        };
        wake.space |= space;
        if link.polls() {
            // Writers asleep for ring space (more pollers than CPUs) posted nothing the
            // peer could ring for: let them look again each time round (and the
            // non-blocking ones' callbacks run).
            wake.space_all = true;
            link.space_came_back();
        }
        // Sit out while a caller waits on the doorbell (it reads the ring for everyone
        // and recalls us when it leaves with others still waiting), or for a moment to
        // leave the bell to callers that found us on it.
        let wanted = if sh.direct_wait() {
            sh.bell.take_wanted()
        } else {
            0
        };
        let takes = sh.bell.caller_takes();
        let callers_lead = std::mem::replace(&mut st.last_takes, takes) != takes;
        let bench = if readers_ahead && wanted == 0 {
            Some(
                if link.polls() && sh.spinners.load(StdOrdering::SeqCst) > 0 {
                    SPINNERS_AHEAD_NAP
                } else {
                    READERS_AHEAD_NAP
                },
            )
        } else if sh.bell.holder() == Holder::Caller || (callers_lead && st.benched && !changed) {
            // Between two of the callers' waits nobody is on the bell, and what does not
            // recall us (accepts, notify callbacks, frames waiting for space) must not
            // wait long: while callers come and go, nap briefly; while one caller keeps
            // the bell (an idle link), sleep as long as the heartbeat allows. Recalled, we
            // nap briefly too: a caller that left the bell with others asleep on condvars
            // recalled us to be on it for them, and a sit-out for the heartbeat left them
            // to their 100 ms limit (`Stats::late_wakeups`).
            let others = recalled
                || sh.accept_sleepers.load(StdOrdering::Relaxed) > 0
                || sh.notifiers.load(StdOrdering::Relaxed)
                || link.has_pending()
                || link.has_parked();
            Some(if others && callers_lead {
                HANDOFF_MAX
            } else {
                sh.cfg.heartbeat
            })
        } else if wanted != 0 {
            // Wake them so that one takes the bell now rather than after its timeout.
            // Bit b stands for stripes b, b + 64, b + 128, ...
            for b in (0..64).filter(|b| wanted & 1 << b != 0) {
                for stripe in (b..crate::link::STRIPES).step_by(64) {
                    wake.stripes.add(stripe);
                }
            }
            wake.link |= wanted & 1 != 0 && sh.sleepers.load(StdOrdering::Relaxed) > 0;
            wake.accept |= wanted & 1 != 0 && sh.accept_sleepers.load(StdOrdering::Relaxed) > 0;
            Some(HANDOFF_MAX)
        } else {
            None
        };
        if let Some(t) = bench {
            sh.bell.set_keeper_benched(true);
            sh.ring(&link, &mut out);
            drop(link);
            sh.notify_unlocked(wake);
            st.benched = true;
            return KeeperNext::Bench(t);
        }
        st.benched = false;
        if link.has_parked() || sh.spinners.load(StdOrdering::SeqCst) > 0 {
            // A waiter spins on the ring (or a frame waits for an in-place reader, which
            // pumps on release): no need for the peer to ring us. Whoever stops spinning
            // or releases the frame wakes us to arm again; the timeout bounds the rest.
            sh.keeper_unarmed.store(true, StdOrdering::SeqCst);
            sh.bell.keeper_take();
            sh.ring(&link, &mut out);
            drop(link);
            sh.notify_unlocked(wake);
            return KeeperNext::Unarmed(crate::link::park::PARK_MAX / 2);
        }
        // Arm, then re-check (the lost-wakeup rule): sleep only if nothing came in since.
        let mut sleep = true;
        match if st.can_wait {
            link.arm_wakeup(&mut out)
        } else {
            Ok(false)
        } {
            Ok(true) => sleep = false,
            Ok(false) => {}
            Err(f) => {
                sh.fault(&mut link, f);
                sleep = false;
            }
        }
        if st.can_wait && link.has_pending() {
            match link.arm_pending_space(&mut out) {
                Ok(true) => sleep = false,
                Ok(false) => {}
                Err(f) => sh.fault(&mut link, f),
            }
        }
        // Doorbell-less links poll, backing off while idle.
        st.poll = if changed || space {
            POLL_MIN
        } else {
            (st.poll * 2).min(POLL_MAX)
        };
        let timeout = if st.can_wait {
            sh.cfg.heartbeat
        } else {
            st.poll.min(sh.cfg.heartbeat)
        };
        if sleep {
            sh.bell.keeper_take();
        }
        sh.ring(&link, &mut out);
        drop(link);
        sh.notify_unlocked(wake);
        // Doorbells are hints: a peer ringing with nothing to read must not make us spin.
        // After a run of early wakeups that found nothing, pause before listening again.
        st.early_idle = if st.woke_early && !changed {
            st.early_idle.saturating_add(1)
        } else {
            0
        };
        if sleep {
            KeeperNext::Doorbell {
                timeout,
                flooded: st.early_idle > FLOOD_WAKES,
            }
        } else {
            KeeperNext::Again
        }
    }

    /// Runs a driven keeper's rounds until one would wait; `None` once the endpoint is
    /// gone. See [`Driver::drive`](crate::Driver::drive).
    pub(crate) fn drive(&self, st: &mut KeeperState, now: Instant) -> Option<DriveNext> {
        if self.stop.load(StdOrdering::SeqCst) {
            return None;
        }
        // Back from whatever the last round asked for.
        if let Some((since, timeout)) = st.waiting.take() {
            st.woke_early = st.can_wait && now.saturating_duration_since(since) < timeout / 2;
        }
        self.bell.set_keeper_benched(false);
        self.keeper_unarmed.store(false, StdOrdering::SeqCst);
        // A link that keeps finding work gives the thread back after a while, so that one
        // busy link cannot starve the others its driver serves.
        for _ in 0..FLOOD_WAKES {
            let next = match self.keeper_round(st) {
                KeeperNext::Again => {
                    st.woke_early = false;
                    continue;
                }
                KeeperNext::Stopped => return None,
                KeeperNext::Bench(t) | KeeperNext::Unarmed(t) => DriveNext {
                    deadline: now + t,
                    doorbell_quiet_until: None,
                },
                KeeperNext::Doorbell { timeout, flooded } => {
                    st.waiting = Some((now, timeout));
                    let quiet = flooded.then(|| now + FLOOD_PAUSE);
                    DriveNext {
                        deadline: quiet.unwrap_or(now) + timeout,
                        doorbell_quiet_until: quiet,
                    }
                }
            };
            return Some(next);
        }
        Some(DriveNext {
            deadline: now,
            doorbell_quiet_until: None,
        })
    }
}

/// The keeper thread: follows the peer, reads the ring, and sleeps on the doorbell when
/// idle.
fn keeper(sh: Arc<Shared>) {
    let mut st = KeeperState::new(&sh);
    let _ = sh.keeper_thread.set(std::thread::current());
    while !sh.stop.load(StdOrdering::SeqCst) {
        match sh.keeper_round(&mut st) {
            KeeperNext::Bench(t) => {
                let since = Instant::now();
                std::thread::park_timeout(t);
                if t >= WAIT_LIMIT && since.elapsed() >= t {
                    st.slept_to_limit = Some(Instant::now());
                }
                sh.bell.set_keeper_benched(false);
            }
            KeeperNext::Unarmed(t) => {
                sh.doorbell.wait(Some(t));
                sh.keeper_unarmed.store(false, StdOrdering::SeqCst);
            }
            KeeperNext::Doorbell { timeout, flooded } => {
                if flooded {
                    std::thread::sleep(FLOOD_PAUSE);
                }
                let t = Instant::now();
                sh.doorbell.wait(Some(timeout));
                let slept = t.elapsed();
                st.woke_early = st.can_wait && slept < timeout / 2;
                if st.can_wait && timeout >= WAIT_LIMIT && slept >= timeout {
                    st.slept_to_limit = Some(Instant::now());
                }
            }
            KeeperNext::Again => st.woke_early = false,
            KeeperNext::Stopped => return,
        }
    }
}

//! Sockets over the link: [`Endpoint`], [`Listener`] and [`Session`].
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

use crate::config::{Config, WaitMode};
use crate::doorbell::Doorbell;
use crate::layout::{Geometry, LayoutError, Role};
use crate::link::{Fault, Link, Listen, State, Stats, Stripes};
use crate::region::SharedRegion;
use crossbeam_utils::CachePadded;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering as StdOrdering};
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
    /// Who waits on the doorbell: `BELL_FREE`, `BELL_KEEPER` or `BELL_CALLER`. Changed
    /// under the lock, so that two threads never wait on (and drain) it at once: a ring
    /// drained by one would be lost to the other.
    bell: AtomicU8,
    /// Callers sleeping on a condvar because the keeper had the bell, by stripe (bit 0
    /// also stands for link and accept waiters): the keeper leaves the bell to them.
    bell_wanted: AtomicU64,
    /// The keeper sits out while a caller has the bell (parked, not on the doorbell).
    keeper_benched: AtomicBool,
    keeper_thread: OnceLock<Thread>,
    /// Times a caller took the bell: a keeper that sat out and sees callers using the
    /// bell keeps out of their way (they recall it when they need it).
    caller_leads: AtomicU64,
    /// Some session has a notify callback: its reader waits outside the endpoint, so the
    /// keeper must be back on the bell whenever no caller is.
    notifiers: AtomicBool,
    /// Whether a blocked caller may wait on the doorbell itself (the doorbell wakes).
    direct_wait: bool,
    /// Where writers that found the ring full sleep. Space is handed on one writer at a
    /// time: each space report wakes one, and a writer woken here wakes the next when it
    /// leaves. Waking them all (256 writers on two CPUs) made three of four wakeups
    /// useless.
    space_cv: Condvar,
    space_sleepers: AtomicUsize,
}

const BELL_FREE: u8 = 0;
const BELL_KEEPER: u8 = 1;
const BELL_CALLER: u8 = 2;
/// How long the keeper sits out at most after leaving the bell to a caller that wanted
/// it: if no caller took it by then, the keeper takes it back.
const HANDOFF_MAX: Duration = Duration::from_millis(1);

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

/// Where some sessions' callers sleep.
#[derive(Default)]
struct Stripe {
    cv: Condvar,
    sleepers: AtomicUsize,
}

/// What a waiting caller waits for, so that it is woken for that.
#[derive(Clone, Copy)]
enum WaitOn {
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
    /// Waited on the doorbell; `early` when it returned before half the time.
    Waited { early: bool },
}

/// Counts a spinning waiter while it lives.
struct Spinning<'a>(&'a AtomicUsize);

impl Drop for Spinning<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, StdOrdering::SeqCst);
    }
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rings the peer if the link asked for it. Called with the lock held: ringing is one
    /// eventfd write or one MMIO store, and it keeps the order of ring and state simple.
    pub(crate) fn ring(&self, link: &mut Link) {
        if let Some(peer) = link.take_ring() {
            self.doorbell.ring(peer);
        }
    }

    /// A link fault: every session is reset; a new epoch starts unless the peer's
    /// restart already started one.
    pub(crate) fn fault(&self, link: &mut Link, f: Fault) {
        if f.needs_local_reset() {
            link.local_reset(&f.to_string());
        }
        self.notify_all();
    }

    /// Wakes every sleeper.
    fn notify_all(&self) {
        self.cv.notify_all();
        self.space_cv.notify_all();
        self.accept_cv.notify_all();
        for s in self.stripes.iter() {
            s.cv.notify_all();
        }
    }

    /// Wakes the sleepers that progress may concern. Called with the lock held.
    pub(crate) fn notify(&self, link: &mut Link) {
        let w = self.to_notify(link);
        self.notify_unlocked(w);
    }

    /// Which sleepers progress concerns (decided under the lock): the link waiters, the
    /// accept waiters, and the session stripes the frames since the last call touched.
    fn to_notify(&self, link: &mut Link) -> Wake {
        let touched = std::mem::take(&mut link.touched);
        Wake {
            link: self.sleepers.load(StdOrdering::Relaxed) > 0,
            accept: self.accept_sleepers.load(StdOrdering::Relaxed) > 0
                && (!link.up || link.listeners.values().any(|l| !l.backlog.is_empty())),
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

    /// Wakes a benched keeper if callers asleep on condvars need someone to read the ring
    /// (called with the lock held, by a caller that just gave the bell up). What else
    /// needs the keeper (accepts, notify callbacks, frames waiting for space) can wait for
    /// its short nap: waking it on every give-up would cost a thread switch each time.
    fn recall_keeper(&self) {
        if !self.keeper_benched.load(StdOrdering::SeqCst) {
            return;
        }
        let needed = self.sleepers.load(StdOrdering::Relaxed) > 0
            || self.stripe_sleepers.load(StdOrdering::Relaxed) > 0;
        if needed {
            self.unpark_keeper();
        }
    }

    fn unpark_keeper(&self) {
        if let Some(t) = self.keeper_thread.get() {
            t.unpark();
        }
    }

    /// Waits on the doorbell in the keeper's place, with the lock held on entry and on
    /// return. `flooded`: the last waits ended early with nothing for us (a peer ringing
    /// for nothing), so pause first, as the keeper does.
    fn lead<'a>(
        &'a self,
        mut link: MutexGuard<'a, Link>,
        limit: Duration,
        flooded: bool,
        leading: &mut bool,
    ) -> (MutexGuard<'a, Link>, Led) {
        // A frame parked for an in-place reader stays in the ring until it is released:
        // the ring would look readable for ever. Its release wakes the condvar sleepers.
        if !self.direct_wait || !link.up || link.parked.is_some() {
            self.resign(leading);
            return (link, Led::No);
        }
        if !*leading && self.bell.load(StdOrdering::Relaxed) != BELL_FREE {
            return (link, Led::No);
        }
        // Whatever is in the ring goes to its sessions first (ours included); then arm
        // and re-check (the lost-wakeup rule) as the keeper does.
        if self.pump_and_wake(&mut link) {
            return (link, Led::Progress);
        }
        // Control frames queued for ring space go out first: arming below only reports
        // that space is there, and nobody else may be awake to send them.
        if link.has_pending() {
            match link.flush() {
                Ok(true) => {
                    link.space_came_back();
                    self.ring(&mut link);
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
        let armed = match link.arm_wakeup() {
            Ok(false) if link.has_pending() => link.arm_pending_space(),
            r => r,
        };
        match armed {
            Ok(false) => {}
            Ok(true) => return (link, Led::Progress),
            Err(f) => {
                self.fault(&mut link, f);
                return (link, Led::Progress);
            }
        }
        if !*leading {
            *leading = true;
            self.bell.store(BELL_CALLER, StdOrdering::SeqCst);
            self.caller_leads.fetch_add(1, StdOrdering::Relaxed);
        }
        self.ring(&mut link);
        drop(link);
        if flooded {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        self.doorbell.wait(Some(limit));
        let early = t.elapsed() < limit / 2;
        let mut link = self.lock();
        // Awake: the peer need not ring while we read (the keeper does the same). We keep
        // the bell until we return (or sleep on a condvar): woken for other sessions'
        // data, we wait again without a hand-off.
        link.disarm_wakeup();
        // What the keeper would do on this wakeup, since it sits out.
        if self.follow_peer(&mut link, Instant::now()) {
            self.notify_all();
        }
        if self.send_queued(&mut link) {
            self.ring(&mut link);
            self.notify_unlocked(Wake {
                space: true,
                ..Wake::default()
            });
        }
        (link, Led::Waited { early })
    }

    /// Follows the peer on a wakeup: its epoch (a restart), its heartbeat, and what the
    /// transport says of it (the ivshmem server's news that it left). Whether the link
    /// changed (a fault, reported and acted on here, counts).
    fn follow_peer(&self, link: &mut Link, now: Instant) -> bool {
        let mut changed = link.check_peer(now);
        let present = link.peer_id.and_then(|id| self.doorbell.peer_present(id));
        if let Err(f) = link.beat(now, present) {
            self.fault(link, f);
            changed = true;
        }
        changed
    }

    /// Sends control frames queued for ring space; whether space came back for the
    /// writers waiting for it (which concerns only them, not every stripe).
    fn send_queued(&self, link: &mut Link) -> bool {
        let had_pending = link.has_pending();
        if had_pending {
            if let Err(f) = link.flush() {
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
    pub(crate) fn pump_and_wake(&self, link: &mut Link) -> bool {
        match link.pump() {
            Ok(true) => {
                self.ring(link);
                self.notify(link);
                true
            }
            Ok(false) => false,
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
            self.bell.store(BELL_FREE, StdOrdering::SeqCst);
            self.recall_keeper();
        }
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
    fn wait_session<T>(
        &self,
        id: u64,
        deadline: Option<Instant>,
        patience: Patience,
        attempt: impl FnMut(&mut Link) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        self.wait_locked_on(WaitOn::Session(id), deadline, patience, attempt)
            .map(|(_, v)| v)
    }

    /// As `wait_locked`, for a caller of session `id`.
    pub(crate) fn wait_session_locked<T>(
        &self,
        id: u64,
        deadline: Option<Instant>,
        patience: Patience,
        attempt: impl FnMut(&mut Link) -> io::Result<Option<T>>,
    ) -> io::Result<(MutexGuard<'_, Link>, T)> {
        self.wait_locked_on(WaitOn::Session(id), deadline, patience, attempt)
    }

    /// Runs `attempt` until it returns a value, waiting between tries as the config says.
    fn wait_for<T>(
        &self,
        deadline: Option<Instant>,
        patience: Patience,
        attempt: impl FnMut(&mut Link) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        self.wait_locked(deadline, patience, attempt)
            .map(|(_, v)| v)
    }

    /// As `wait_for`, keeping the lock held when `attempt` succeeds.
    pub(crate) fn wait_locked<T>(
        &self,
        deadline: Option<Instant>,
        patience: Patience,
        attempt: impl FnMut(&mut Link) -> io::Result<Option<T>>,
    ) -> io::Result<(MutexGuard<'_, Link>, T)> {
        self.wait_locked_on(WaitOn::Link, deadline, patience, attempt)
    }

    /// The wait loop; `accept` waits never poll for ever and sleep on `accept_cv`.
    fn wait_locked_on<T>(
        &self,
        on: WaitOn,
        deadline: Option<Instant>,
        patience: Patience,
        mut attempt: impl FnMut(&mut Link) -> io::Result<Option<T>>,
    ) -> io::Result<(MutexGuard<'_, Link>, T)> {
        // Set at the first miss: reading the clock costs as much as a write.
        let mut spin_until: Option<Option<Instant>> = None;
        let mut link = self.lock();
        let mut spins = 0u32;
        let mut spinning: Option<Spinning<'_>> = None;
        // Wakeups on the doorbell in a row that brought us nothing (a ringing flood).
        let mut early_wakes = 0u32;
        // Whether we have the bell (we give it up, under the lock, before returning).
        let mut leading = false;
        // Woken on the space condvar: pass the turn on when leaving.
        let mut space_turn = false;
        let mut pumped_once = false;
        let r = loop {
            let r = attempt(&mut link);
            let for_space = std::mem::take(&mut link.waiting_space);
            self.ring(&mut link);
            match r {
                Ok(Some(v)) => break Ok((link, v)),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            if patience != Patience::Wait && link.closed {
                break Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "ivring: endpoint closed",
                ));
            }
            if patience == Patience::Now {
                // What the peer sent may be what this call waits for (credit, data): an
                // event loop's calls move the ring themselves rather than wait for the
                // keeper. Once: after that the answer is WouldBlock.
                if !std::mem::replace(&mut pumped_once, true) && self.pump_and_wake(&mut link) {
                    continue;
                }
                if let (true, WaitOn::Session(id)) = (for_space, on) {
                    link.notify_on_space(id);
                }
                break Err(io::ErrorKind::WouldBlock.into());
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break Err(io::Error::new(io::ErrorKind::TimedOut, "ivring: timed out"));
            }
            if link.closed {
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
                if link.rx_moved() || self.pump_and_wake(&mut link) {
                    continue;
                }
                drop(link);
                // Watch the peer's head without the lock (a plain load of a line the
                // writer owns), back to the lock when it moves or after a while.
                let seen = self
                    .region
                    .load_u64(self.peer_head, crate::sync::Ordering::Relaxed);
                let mut moved = false;
                // One pause between loads: a pause is long on this machine's CPUs (16 of
                // them cost a 64-byte round trip 0.2 us; 4 between loads cost 0.1 us of
                // each 0.35 us round trip), and until the writer stores to the line
                // again each load hits the reader's own cache.
                for _ in 0..64 {
                    std::hint::spin_loop();
                    if self
                        .region
                        .load_u64(self.peer_head, crate::sync::Ordering::Relaxed)
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
                if let (true, WaitOn::Session(id)) = (for_space, on) {
                    link.notify_on_space(id);
                }
                break Err(io::ErrorKind::WouldBlock.into());
            } else {
                // Nobody pumps the ring while we sleep but the keeper: it must be armed.
                drop(spinning.take());
                self.wake_unarmed_keeper();
                let mut limit = Duration::from_millis(100);
                if let Some(d) = deadline {
                    limit = limit.min(d.saturating_duration_since(now));
                }
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
                    Led::Waited { early } => {
                        early_wakes = if early { early_wakes + 1 } else { 0 };
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
                match self.bell.load(StdOrdering::Relaxed) {
                    BELL_KEEPER if self.direct_wait => {
                        self.bell_wanted
                            .fetch_or(1 << (stripe % 64), StdOrdering::Relaxed);
                    }
                    // Nobody is on the doorbell and the keeper sits out (say the link is
                    // down, so we may not take it): it must follow the ring for us now,
                    // not after its nap.
                    BELL_FREE if self.keeper_benched.load(StdOrdering::SeqCst) => {
                        self.unpark_keeper();
                    }
                    _ => {}
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
                link = cv
                    .wait_timeout(link, limit)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
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

/// One side of a link: listens and connects, as a socket library does.
///
/// ```
/// use ivring::{doorbell::local, Config, Endpoint, SharedRegion};
/// use std::io::{Read, Write};
/// use std::sync::Arc;
///
/// let region = SharedRegion::heap(1 << 20);
/// let (a, b) = local::pair();
/// let host = Endpoint::host(region.clone(), Arc::new(a), Config::default()).unwrap();
/// let guest = Endpoint::guest(region, Arc::new(b), Config::default()).unwrap();
/// let listener = guest.listen(7).unwrap();
/// let mut s = host.connect(7).unwrap();
/// let mut g = listener.accept().unwrap();
/// s.write_all(b"hello").unwrap();
/// drop(s);
/// let mut got = Vec::new();
/// g.read_to_end(&mut got).unwrap();
/// assert_eq!(got, b"hello");
/// ```
pub struct Endpoint {
    shared: Arc<Shared>,
    /// The keeper thread, once attached.
    keeper: Mutex<Option<JoinHandle<()>>>,
}

/// Options for one session.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionOptions {
    /// Keep message boundaries (as SOCK_SEQPACKET) instead of a byte stream.
    pub message: bool,
}

impl Endpoint {
    /// The host side: lays the region out and attaches.
    pub fn host(
        region: SharedRegion,
        doorbell: Arc<dyn Doorbell>,
        cfg: Config,
    ) -> Result<Endpoint, LayoutError> {
        Endpoint::new(Role::Host, region, doorbell, cfg)
    }

    /// The guest side: attaches, and waits for the host to lay the region out if it has
    /// not yet. A header that is not ivring's is waited on for up to
    /// [`Config::layout_wait`] (the host repairs one a peer overwrote), then reported.
    pub fn guest(
        region: SharedRegion,
        doorbell: Arc<dyn Doorbell>,
        cfg: Config,
    ) -> Result<Endpoint, LayoutError> {
        Endpoint::new(Role::Guest, region, doorbell, cfg)
    }

    /// Either side.
    pub fn new(
        role: Role,
        region: SharedRegion,
        doorbell: Arc<dyn Doorbell>,
        cfg: Config,
    ) -> Result<Endpoint, LayoutError> {
        let ep = Endpoint::unattached(role, region, doorbell, cfg)?;
        ep.attach();
        Ok(ep)
    }

    /// An endpoint that has not attached yet: the peer cannot see it, so listeners made
    /// now are in place before any connect can arrive (as a server listens before it
    /// announces itself). Call [`Endpoint::attach`] next.
    pub fn unattached(
        role: Role,
        region: SharedRegion,
        doorbell: Arc<dyn Doorbell>,
        cfg: Config,
    ) -> Result<Endpoint, LayoutError> {
        let geom = Geometry::for_size(region.len())?;
        if role == Role::Guest {
            Geometry::await_header(&region, cfg.layout_wait)?;
        }
        let own_id = doorbell.own_id();
        // A polling endpoint never asks the peer to ring (PROTOCOL.md §5): nobody may
        // wait on its doorbell.
        let direct_wait = doorbell.can_wait() && cfg.wait != WaitMode::Poll;
        let peer_head = role.peer_block() + crate::layout::side::TX_HEAD;
        let link = Link::new(role, region.clone(), geom, cfg.clone());
        let shared = Arc::new(Shared {
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
            bell: AtomicU8::new(BELL_FREE),
            bell_wanted: AtomicU64::new(0),
            keeper_benched: AtomicBool::new(false),
            keeper_thread: OnceLock::new(),
            caller_leads: AtomicU64::new(0),
            notifiers: AtomicBool::new(false),
            direct_wait,
            space_cv: Condvar::new(),
            space_sleepers: AtomicUsize::new(0),
        });
        Ok(Endpoint {
            shared,
            keeper: Mutex::new(None),
        })
    }

    /// Attaches (PROTOCOL.md §3) and starts following the peer. Does nothing if attached.
    pub fn attach(&self) {
        let mut keeper_slot = self.keeper.lock().unwrap_or_else(|e| e.into_inner());
        if keeper_slot.is_some() {
            return;
        }
        {
            let mut link = self.shared.lock();
            link.attach(Some(self.shared.own_id));
            link.check_peer(Instant::now());
            self.shared.ring(&mut link);
        }
        let keeper_shared = self.shared.clone();
        let keeper = std::thread::Builder::new()
            .name("ivring-keeper".into())
            .spawn(move || keeper(keeper_shared))
            .expect("spawn ivring keeper thread");
        *keeper_slot = Some(keeper);
    }

    /// Whether both sides are attached and have acknowledged each other.
    pub fn is_up(&self) -> bool {
        self.shared.lock().up
    }

    /// Waits until the link is up; `false` on timeout.
    pub fn wait_up(&self, timeout: Duration) -> bool {
        self.shared
            .wait_for(Some(Instant::now() + timeout), Patience::Wait, |l| {
                Ok(l.up.then_some(()))
            })
            .is_ok()
    }

    /// Counters about the peer's behaviour, and the last link error.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// Number of sessions open (or opening) on this link.
    pub fn session_count(&self) -> usize {
        self.shared.lock().sessions.len()
    }

    /// The configuration the endpoint was made with.
    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Largest payload of one frame on this link.
    pub fn max_frame(&self) -> usize {
        self.shared.lock().max_payload
    }

    /// Accepts sessions opened by the peer on `port`.
    pub fn listen(&self, port: u32) -> io::Result<Listener> {
        let mut link = self.shared.lock();
        if link.listeners.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("ivring: port {port} already has a listener"),
            ));
        }
        link.listeners.insert(port, Listen::default());
        Ok(Listener {
            shared: self.shared.clone(),
            port,
            nonblocking: false,
        })
    }

    /// Opens a stream session to the peer's listener on `port`.
    pub fn connect(&self, port: u32) -> io::Result<Session> {
        self.connect_with(port, SessionOptions::default())
    }

    /// Opens a session with options. Waits up to `Config::connect_timeout` for the peer
    /// to attach and answer; `ConnectionRefused` when nobody listens there.
    pub fn connect_with(&self, port: u32, opts: SessionOptions) -> io::Result<Session> {
        let sh = &self.shared;
        let deadline = Instant::now() + sh.cfg.connect_timeout;
        sh.wait_for(Some(deadline), Patience::Wait, |l| Ok(l.up.then_some(())))
            .map_err(|e| match e.kind() {
                io::ErrorKind::TimedOut => io::Error::new(
                    io::ErrorKind::TimedOut,
                    "ivring: the peer is not attached to the shared region",
                ),
                _ => e,
            })?;
        let (id, gen) = {
            let mut link = sh.lock();
            let id = link.open(port, opts.message)?;
            let gen = link.gen;
            sh.ring(&mut link);
            (id, gen)
        };
        let r = sh.wait_for(Some(deadline), Patience::Wait, |l| {
            if l.gen != gen {
                return Err(reset_error(l));
            }
            let s = l.session(id)?;
            match s.state {
                State::Open => Ok(Some(())),
                State::Connecting => Ok(None),
                State::Refused => Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("ivring: port {port} refused the session (nothing listens there, or its backlog or the session limit is full)"),
                )),
                State::Reset(_) => unreachable!("session() reports resets"),
            }
        });
        match r {
            Ok(()) => Ok(Session::new(sh.clone(), id, gen, port, opts.message)),
            Err(e) => {
                let mut link = sh.lock();
                if link.gen == gen {
                    link.close(id);
                    sh.ring(&mut link);
                }
                Err(e)
            }
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shared.stop.store(true, StdOrdering::SeqCst);
        self.shared.doorbell.interrupt();
        self.shared.unpark_keeper();
        let keeper = self
            .keeper
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(k) = keeper else {
            return; // never attached: nothing to tell the peer
        };
        let _ = k.join();
        let mut link = self.shared.lock();
        link.detach();
        self.shared.ring(&mut link);
        self.shared.notify_all();
    }
}

pub(crate) fn reset_error(l: &Link) -> io::Error {
    let why = l
        .stats
        .last_error
        .clone()
        .unwrap_or_else(|| "link reset".into());
    io::Error::new(io::ErrorKind::ConnectionReset, format!("ivring: {why}"))
}

/// The keeper: follows the peer, reads the ring, and sleeps on the doorbell when idle.
fn keeper(sh: Arc<Shared>) {
    // A polling endpoint's keeper polls too (backing off to 1 ms apart) rather than
    // asking the peer to ring: each ring is a syscall on the writer's path, and readers
    // that poll need none.
    let can_wait = sh.doorbell.can_wait() && sh.cfg.wait != WaitMode::Poll;
    const POLL_MIN: Duration = Duration::from_micros(20);
    const POLL_MAX: Duration = Duration::from_millis(1);
    let mut poll = POLL_MIN;
    // Early wakeups in a row that found nothing to do (a doorbell flood).
    let mut early_idle = 0u32;
    let mut woke_early = false;
    let _ = sh.keeper_thread.set(std::thread::current());
    // Whether the last wait was sitting out, and the callers' leads counted then.
    let mut benched = false;
    let mut last_leads = 0u64;
    while !sh.stop.load(StdOrdering::SeqCst) {
        let now = Instant::now();
        let mut link = sh.lock();
        if sh.bell.load(StdOrdering::Relaxed) == BELL_KEEPER {
            sh.bell.store(BELL_FREE, StdOrdering::SeqCst);
        }
        // A caller waiting on the doorbell has armed it: leave its flag alone.
        if sh.bell.load(StdOrdering::Relaxed) != BELL_CALLER {
            link.disarm_wakeup();
        }
        let mut changed = sh.follow_peer(&mut link, now);
        match link.pump() {
            Ok(p) => changed |= p,
            Err(f) => {
                sh.fault(&mut link, f);
                changed = true;
            }
        }
        let space = sh.send_queued(&mut link);
        let mut wake = if changed {
            sh.to_notify(&mut link)
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
        let wanted = if sh.direct_wait {
            sh.bell_wanted.swap(0, StdOrdering::Relaxed)
        } else {
            0
        };
        let leads = sh.caller_leads.load(StdOrdering::Relaxed);
        let callers_lead = std::mem::replace(&mut last_leads, leads) != leads;
        let bench = if sh.bell.load(StdOrdering::Relaxed) == BELL_CALLER
            || (callers_lead && benched && !changed)
        {
            // Between two of the callers' waits nobody is on the bell, and what does not
            // recall us (accepts, notify callbacks, frames waiting for space) must not
            // wait long: while callers come and go, nap briefly; while one caller keeps
            // the bell (an idle link), sleep as long as the heartbeat allows.
            let others = sh.accept_sleepers.load(StdOrdering::Relaxed) > 0
                || sh.notifiers.load(StdOrdering::Relaxed)
                || link.has_pending()
                || link.parked.is_some();
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
            sh.keeper_benched.store(true, StdOrdering::SeqCst);
            sh.ring(&mut link);
            drop(link);
            sh.notify_unlocked(wake);
            std::thread::park_timeout(t);
            sh.keeper_benched.store(false, StdOrdering::SeqCst);
            benched = true;
            continue;
        }
        benched = false;
        if link.parked.is_some() || sh.spinners.load(StdOrdering::SeqCst) > 0 {
            // A waiter spins on the ring (or a frame waits for an in-place reader, which
            // pumps on release): no need for the peer to ring us. Whoever stops spinning
            // or releases the frame wakes us to arm again; the timeout bounds the rest.
            sh.keeper_unarmed.store(true, StdOrdering::SeqCst);
            sh.bell.store(BELL_KEEPER, StdOrdering::SeqCst);
            sh.ring(&mut link);
            drop(link);
            sh.notify_unlocked(wake);
            sh.doorbell.wait(Some(crate::zerocopy::PARK_MAX / 2));
            sh.keeper_unarmed.store(false, StdOrdering::SeqCst);
            continue;
        }
        // Arm, then re-check (the lost-wakeup rule): sleep only if nothing came in since.
        let mut sleep = true;
        match if can_wait {
            link.arm_wakeup()
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
        if can_wait && link.has_pending() {
            match link.arm_pending_space() {
                Ok(true) => sleep = false,
                Ok(false) => {}
                Err(f) => sh.fault(&mut link, f),
            }
        }
        // Doorbell-less links poll, backing off while idle.
        poll = if changed || space {
            POLL_MIN
        } else {
            (poll * 2).min(POLL_MAX)
        };
        let timeout = if can_wait {
            sh.cfg.heartbeat
        } else {
            poll.min(sh.cfg.heartbeat)
        };
        if sleep {
            sh.bell.store(BELL_KEEPER, StdOrdering::SeqCst);
        }
        sh.ring(&mut link);
        drop(link);
        sh.notify_unlocked(wake);
        // Doorbells are hints: a peer ringing with nothing to read must not make us spin.
        // After a run of early wakeups that found nothing, pause before listening again
        // (rings coalesce, so none is lost; new data is at most 1 ms late meanwhile).
        early_idle = if woke_early && !changed {
            early_idle.saturating_add(1)
        } else {
            0
        };
        if sleep {
            if early_idle > 64 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let t = Instant::now();
            sh.doorbell.wait(Some(timeout));
            woke_early = can_wait && t.elapsed() < timeout / 2;
        } else {
            woke_early = false;
        }
    }
}

/// Accepts sessions the peer opens on one port. Dropping it stops listening and closes
/// the sessions not yet accepted.
pub struct Listener {
    shared: Arc<Shared>,
    port: u32,
    nonblocking: bool,
}

impl Listener {
    /// The port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits for the next session.
    pub fn accept(&self) -> io::Result<Session> {
        self.accept_inner(None)
    }

    /// Waits for the next session at most `timeout` (`TimedOut` after).
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Session> {
        self.accept_inner(Some(Instant::now() + timeout))
    }

    /// `accept` returns `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&mut self, nonblocking: bool) {
        self.nonblocking = nonblocking;
    }

    /// Calls `notify` whenever an `accept` that would block may succeed now: a session
    /// joined the backlog, the link reset, or the endpoint closed. As
    /// [`Session::set_notify`], it runs with the link locked, so it must be cheap and must
    /// not call into the endpoint. It replaces any earlier callback.
    pub fn set_notify(&self, notify: Arc<dyn Fn() + Send + Sync>) {
        let mut link = self.shared.lock();
        if let Some(l) = link.listeners.get_mut(&self.port) {
            l.notify = Some(notify);
        }
        self.shared.watch_for_callbacks();
    }

    fn accept_inner(&self, deadline: Option<Instant>) -> io::Result<Session> {
        let port = self.port;
        let sh = &self.shared;
        sh.wait_locked_on(
            WaitOn::Accept,
            deadline,
            Patience::nonblocking(self.nonblocking),
            |l| {
                let gen = l.gen;
                let Some(id) = l
                    .listeners
                    .get_mut(&port)
                    .and_then(|x| x.backlog.pop_front())
                else {
                    return Ok(None);
                };
                let Some(s) = l.sessions.get(&id) else {
                    return Ok(None);
                };
                let message = s.message;
                Ok(Some(Session::new(sh.clone(), id, gen, port, message)))
            },
        )
        .map(|(_, s)| s)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut link = self.shared.lock();
        if let Some(l) = link.listeners.remove(&self.port) {
            for id in l.backlog {
                link.close(id);
            }
        }
        self.shared.ring(&mut link);
    }
}

/// One session: a socket-like byte stream (or message pipe) to the peer.
///
/// Reads return the data the peer sent, then `Ok(0)` after its shutdown or close; writes
/// after the peer's close fail with `BrokenPipe`; when the link resets (the peer restarted,
/// left, or corrupted the ring) every operation fails with `ConnectionReset`, except reads
/// of a session the peer had already shut down or closed: those still return what it sent,
/// then EOF (a peer may close and exit at once). Dropping the session closes it.
pub struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u64,
    pub(crate) gen: u64,
    port: u32,
    pub(crate) message: bool,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) write_timeout: Option<Duration>,
    pub(crate) nonblocking: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("port", &self.port)
            .field("message", &self.message)
            .finish()
    }
}

enum WriteStep {
    Wrote(usize),
    Wait,
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, id: u64, gen: u64, port: u32, message: bool) -> Session {
        Session {
            shared,
            id,
            gen,
            port,
            message,
            read_timeout: None,
            write_timeout: None,
            nonblocking: false,
        }
    }

    /// The session id (unique on this link for the life of the process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The port the session was opened on.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Whether message boundaries are kept.
    pub fn is_message(&self) -> bool {
        self.message
    }

    /// Reads time out after this long (`None`: wait for ever).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.read_timeout = t;
    }

    /// Writes time out after this long (`None`: wait for ever).
    pub fn set_write_timeout(&mut self, t: Option<Duration>) {
        self.write_timeout = t;
    }

    /// Reads and writes return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&mut self, nonblocking: bool) {
        self.nonblocking = nonblocking;
    }

    /// Calls `notify` whenever the session may have become readable or writable: data,
    /// EOF, credit, or a reset arrived. It runs on whichever thread reads the ring, with
    /// the link locked, so it must be cheap (signal an eventfd, wake a task) and must not
    /// call into the endpoint. `ivring_host::PollableSession` builds a pollable fd on it.
    pub fn set_notify(&self, notify: Arc<dyn Fn() + Send + Sync>) -> io::Result<()> {
        let mut link = self.shared.lock();
        self.check(&link)?;
        link.session(self.id)?.notify = Some(notify);
        self.shared.watch_for_callbacks();
        Ok(())
    }

    fn check(&self, l: &Link) -> io::Result<()> {
        if l.gen != self.gen {
            return Err(reset_error(l));
        }
        Ok(())
    }

    /// Closes the read half, the write half, or both (as `TcpStream::shutdown`).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut link = self.shared.lock();
        self.check(&link)?;
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            link.shutdown_write(self.id)?;
        }
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            let s = link.session(self.id)?;
            s.rd_shut = true;
            // Discard and credit what is buffered.
            let mut sink = vec![0u8; 64 << 10];
            while let Some(n) = link.read_discard(self.id, &mut sink)? {
                if n == 0 {
                    break;
                }
            }
        }
        self.shared.ring(&mut link);
        Ok(())
    }

    pub(crate) fn deadline(t: Option<Duration>) -> Option<Instant> {
        t.map(|t| Instant::now() + t)
    }

    fn write_stream(&self, buf: &[u8], patience: Patience) -> io::Result<usize> {
        let id = self.id;
        let gen = self.gen;
        self.shared
            .wait_session(id, Self::deadline(self.write_timeout), patience, |l| {
                if l.gen != gen {
                    return Err(reset_error(l));
                }
                match step(l, id, buf, false, true)? {
                    WriteStep::Wrote(n) => {
                        l.publish();
                        Ok(Some(n))
                    }
                    WriteStep::Wait => Ok(None),
                }
            })
    }

    fn write_message(&self, buf: &[u8], patience: Patience) -> io::Result<usize> {
        let id = self.id;
        let gen = self.gen;
        let sh = self.shared.clone();
        let deadline = Self::deadline(self.write_timeout);
        // The whole message's credit first, so the peer can always take all of it.
        sh.wait_session(id, deadline, patience, |l| {
            if l.gen != gen {
                return Err(reset_error(l));
            }
            let s = l.session(id)?;
            if s.peer_closed || s.wr_shut {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "ivring: session closed for writing",
                ));
            }
            if buf.len() > s.peer_buf_alloc() as usize {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "ivring: message of {} bytes exceeds the peer's receive buffer of {}",
                        buf.len(),
                        s.peer_buf_alloc()
                    ),
                ));
            }
            Ok((s.credit() >= buf.len() as u64).then_some(()))
        })?;
        let mut off = 0;
        loop {
            // A message may not be abandoned half way, yet a peer that granted credit
            // and then stopped reading must not hold us past the deadline: at the
            // deadline with part of the message sent, the session is reset.
            let r = sh.wait_session(id, deadline, Patience::Wait, |l| {
                if l.gen != gen {
                    return Err(reset_error(l));
                }
                match step(l, id, &buf[off..], true, false)? {
                    WriteStep::Wrote(n) => Ok(Some(n)),
                    WriteStep::Wait => {
                        l.publish();
                        Ok(None)
                    }
                }
            });
            let n = match r {
                Ok(n) => n,
                Err(e) => {
                    let mut link = sh.lock();
                    if off > 0 && e.kind() == io::ErrorKind::TimedOut && link.gen == gen {
                        link.reset_session(id, "message write timed out half way");
                        link.publish();
                        sh.ring(&mut link);
                    }
                    return Err(e);
                }
            };
            off += n;
            if off == buf.len() {
                break;
            }
        }
        let mut link = sh.lock();
        link.publish();
        sh.ring(&mut link);
        Ok(buf.len())
    }
}

/// One attempt at writing a frame; on a full ring, posts the space needed first.
fn step(l: &mut Link, id: u64, data: &[u8], eor: bool, credit: bool) -> io::Result<WriteStep> {
    loop {
        match l.write_frame(id, data, eor, credit)? {
            Some(n) => return Ok(WriteStep::Wrote(n)),
            None => {
                let s = l.session(id)?;
                let no_credit = credit && s.credit() == 0;
                if no_credit || l.has_pending() {
                    if l.has_pending() {
                        match l.flush() {
                            Ok(true) => continue,
                            Ok(false) => l.waiting_space = !no_credit,
                            Err(f) => return Err(l.fault_to_io(f)),
                        }
                    }
                    return Ok(WriteStep::Wait);
                }
                match l.arm_space(data.len()) {
                    Ok(true) => continue,
                    Ok(false) => return Ok(WriteStep::Wait),
                    Err(f) => return Err(l.fault_to_io(f)),
                }
            }
        }
    }
}

impl Session {
    /// A read through a shared reference, for the async and event-loop wrappers (whose
    /// read and write halves work one session from two tasks).
    pub(crate) fn read_shared(&self, buf: &mut [u8], patience: Patience) -> io::Result<usize> {
        let id = self.id;
        let gen = self.gen;
        self.shared
            .wait_session(id, Self::deadline(self.read_timeout), patience, |l| {
                if l.gen != gen {
                    // Data and EOF the peer sent before the link reset are still read.
                    return match l.read_ended(gen, id, buf) {
                        Some(n) => Ok(Some(n)),
                        None => Err(reset_error(l)),
                    };
                }
                if let Some(n) = l.read_direct(id, buf)? {
                    return Ok(Some(n));
                }
                l.read(id, buf)
            })
    }

    /// A write through a shared reference (as `read_shared`).
    pub(crate) fn write_shared(&self, buf: &[u8], patience: Patience) -> io::Result<usize> {
        // Nothing is sent for an empty buffer, in either mode, so that a read of 0 bytes
        // always means EOF.
        if buf.is_empty() {
            Ok(0)
        } else if self.message {
            self.write_message(buf, patience)
        } else {
            self.write_stream(buf, patience)
        }
    }
}

impl io::Read for Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_shared(buf, Patience::nonblocking(self.nonblocking))
    }
}

impl io::Write for Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_shared(buf, Patience::nonblocking(self.nonblocking))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut link = self.shared.lock();
        if link.gen == self.gen {
            link.close(self.id);
            self.shared.ring(&mut link);
        } else {
            link.ended.remove(&(self.gen, self.id));
        }
    }
}

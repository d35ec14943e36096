//! The keeper of every VM's link, on one thread ("ivring-links").
//!
//! The daemon attaches each VM's endpoint with [`ivring::Endpoint::attach_driven`] (no
//! keeper thread) and hands its [`Driver`] here, with the endpoint's doorbell
//! ([`HubBell`]). One epoll instance watches, for every link, the doorbell's vector 0 (the
//! guest rings it) and its interrupt (the ring's call for its keeper, joins and leaves);
//! one ordered set of deadlines holds every link's next heartbeat. A wakeup drains the
//! eventfds that fired, drives those links and the ones whose deadline came, and
//! reschedules them: its work is the ready links plus O(log n) per timer, whatever the
//! number of links.
//!
//! Idle links share wakeups: a deadline at least [`ROUND_FROM`] away (a heartbeat) is
//! put off to the next tick of one [`TICK`] grid for all links, so the idle links of the
//! host wake together, at most once per tick, rather than each on its own (heartbeats
//! then go out up to one tick late: 32 ms on 100 ms, far inside a peer's timeout of a
//! second). An idle daemon's cost is mostly its wakeups, not the links it drives in each
//! (at 100 idle VMs, 8 ms ticks cost 0.6-0.8 % of a core at about 125 wakeups a second,
//! and 0.4 % where the links had fallen into fewer phases). Nearer deadlines (the ring's
//! naps of a millisecond or two) are kept as they are.
//!
//! A guest that rings for nothing, again and again, gets a pause from its driver
//! (`doorbell_quiet_until`): its vector 0 is then unwatched (`EPOLL_CTL_MOD` with no
//! events) until the pause ends, so that a flood costs the shared thread about one round
//! per millisecond, not one per ring. Its interrupt stays watched.
//!
//! A link leaves when its endpoint is dropped (the VM removed): the drop interrupts the
//! doorbell, the next drive returns `None`, and the link's fds are unregistered.

use super::hub::HubBell;
use ivring::Driver;
use ivring_ivshmem::sys::{Epoll, EventFd};
use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// The grid idle links' deadlines are put off to, so that they wake together.
pub const TICK: Duration = Duration::from_millis(32);
/// Deadlines at least this far away are put off to the grid; nearer ones are kept.
pub const ROUND_FROM: Duration = Duration::from_millis(32);

/// The epoll key of the command eventfd; a link's are [`key`].
const WAKE: u64 = 0;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The epoll key of slot `slot`'s vector 0 (`intr`: its interrupt).
fn key(slot: usize, intr: bool) -> u64 {
    (slot as u64 + 1) * 2 + u64::from(intr)
}

enum Cmd {
    Add {
        name: String,
        driver: Driver,
        bell: Arc<HubBell>,
    },
    Stop,
}

/// The thread driving every VM's link.
pub(crate) struct Links {
    cmds: Arc<Mutex<Vec<Cmd>>>,
    wake: Arc<EventFd>,
    driven: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Links {
    pub fn start() -> ivring_ivshmem::Result<Links> {
        let epoll = Epoll::new()?;
        let wake = Arc::new(EventFd::new()?);
        epoll.add(wake.as_fd(), WAKE).map_err(|e| {
            ivring_ivshmem::HostError::io("epoll_ctl the links' command eventfd", e)
        })?;
        let cmds = Arc::new(Mutex::new(Vec::new()));
        let driven = Arc::new(AtomicUsize::new(0));
        let lp = Loop {
            epoll,
            wake: wake.clone(),
            cmds: cmds.clone(),
            driven: driven.clone(),
            links: Vec::new(),
            free: Vec::new(),
            timers: BTreeSet::new(),
            epoch: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("ivring-links".into())
            .spawn(move || lp.run())
            .map_err(|e| ivring_ivshmem::HostError::io("spawn the links thread", e))?;
        Ok(Links {
            cmds,
            wake,
            driven,
            thread: Some(thread),
        })
    }

    fn send(&self, c: Cmd) {
        lock(&self.cmds).push(c);
        self.wake.signal();
    }

    /// Starts driving a VM's endpoint (`driver` from its `attach_driven`, `bell` its
    /// doorbell) until the endpoint is dropped.
    pub fn add(&self, name: &str, driver: Driver, bell: Arc<HubBell>) {
        self.send(Cmd::Add {
            name: name.into(),
            driver,
            bell,
        });
    }

    /// How many links are driven now.
    pub fn count(&self) -> usize {
        self.driven.load(Ordering::Relaxed)
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One link, as the loop drives it.
struct Link {
    name: String,
    driver: Driver,
    bell: Arc<HubBell>,
    /// Drive no later than this (the ring's deadline).
    deadline: Instant,
    /// Vector 0 is unwatched until then (a flood's pause).
    quiet_until: Option<Instant>,
    /// Its entry in the timers: the deadline put off to the grid, or the pause's end.
    timer: Instant,
    /// Already in this wakeup's list of links to drive.
    queued: bool,
}

struct Loop {
    epoll: Epoll,
    wake: Arc<EventFd>,
    cmds: Arc<Mutex<Vec<Cmd>>>,
    driven: Arc<AtomicUsize>,
    /// By slot (a slot is reused once its link has left).
    links: Vec<Option<Link>>,
    free: Vec<usize>,
    /// (when, slot): one entry per link.
    timers: BTreeSet<(Instant, usize)>,
    /// The grid's origin.
    epoch: Instant,
}

impl Loop {
    fn run(mut self) {
        let mut keys = Vec::new();
        let mut ready: Vec<usize> = Vec::new();
        loop {
            let timeout = self
                .timers
                .first()
                .map(|&(t, _)| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.epoll.wait(&mut keys, timeout) {
                warn!("links: {e}; retrying");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let now = Instant::now();
            let mut cmds = false;
            for &k in &keys {
                if k == WAKE {
                    cmds = true;
                    continue;
                }
                let (slot, intr) = ((k / 2 - 1) as usize, k % 2 == 1);
                let Some(Some(l)) = self.links.get_mut(slot) else {
                    continue;
                };
                // Drained before the drive: a ring during it shows at the next wait.
                if intr {
                    l.bell.drain_interrupt();
                } else {
                    l.bell.drain_vector0();
                }
                if !std::mem::replace(&mut l.queued, true) {
                    ready.push(slot);
                }
            }
            while let Some(&(t, slot)) = self.timers.first() {
                if t > now {
                    break;
                }
                self.timers.pop_first();
                let Some(Some(l)) = self.links.get_mut(slot) else {
                    continue;
                };
                if l.quiet_until.is_some_and(|q| q <= now) {
                    l.quiet_until = None;
                    // Rung meanwhile: the next wait reports it.
                    watch(&self.epoll, l, slot, true);
                }
                if l.deadline <= now {
                    if !std::mem::replace(&mut l.queued, true) {
                        ready.push(slot);
                    }
                } else {
                    l.timer = fire_at(self.epoch, l.deadline, now);
                    self.timers.insert((l.timer, slot));
                }
            }
            for slot in ready.drain(..) {
                self.drive(slot, now);
            }
            if cmds {
                self.wake.drain();
                let todo = std::mem::take(&mut *lock(&self.cmds));
                for c in todo {
                    match c {
                        Cmd::Add { name, driver, bell } => self.add(name, driver, bell, now),
                        Cmd::Stop => return,
                    }
                }
            }
        }
    }

    fn add(&mut self, name: String, driver: Driver, bell: Arc<HubBell>, now: Instant) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.links.push(None);
            self.links.len() - 1
        });
        for intr in [false, true] {
            let fd = if intr {
                bell.interrupt_fd()
            } else {
                bell.vector0_fd()
            };
            if let Err(e) = self.epoll.add(fd, key(slot, intr)) {
                // The heartbeat still drives it; doorbells wait for the next one.
                warn!(
                    "vm {name}: cannot watch its doorbell (epoll_ctl: {e}): its link runs \
                     on heartbeats only (raise fs.epoll.max_user_watches)"
                );
            }
        }
        // Driven at once: the first round follows the peer.
        self.links[slot] = Some(Link {
            name,
            driver,
            bell,
            deadline: now,
            quiet_until: None,
            timer: now,
            queued: false,
        });
        self.timers.insert((now, slot));
        self.driven.fetch_add(1, Ordering::Relaxed);
    }

    fn drive(&mut self, slot: usize, now: Instant) {
        let Some(Some(l)) = self.links.get_mut(slot) else {
            return;
        };
        l.queued = false;
        self.timers.remove(&(l.timer, slot));
        let Some(next) = l.driver.drive(now) else {
            self.remove(slot);
            return;
        };
        l.deadline = next.deadline;
        let quiet = next.doorbell_quiet_until.filter(|&q| q > now);
        if quiet.is_some() != l.quiet_until.is_some() {
            watch(&self.epoll, l, slot, quiet.is_none());
        }
        l.quiet_until = quiet;
        let t = fire_at(self.epoch, l.deadline, now);
        l.timer = quiet.map_or(t, |q| q.min(t));
        self.timers.insert((l.timer, slot));
    }

    /// The endpoint is gone: forget the link.
    fn remove(&mut self, slot: usize) {
        let Some(l) = self.links.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.timers.remove(&(l.timer, slot));
        // Unregistered before the fds can close (the link holds the doorbell until here).
        let _ = self.epoll.delete(l.bell.vector0_fd());
        let _ = self.epoll.delete(l.bell.interrupt_fd());
        self.free.push(slot);
        self.driven.fetch_sub(1, Ordering::Relaxed);
        debug!("vm {}: link detached; no longer driven", l.name);
    }
}

/// Starts (`on`) or stops watching a link's vector 0.
fn watch(epoll: &Epoll, l: &Link, slot: usize, on: bool) {
    if let Err(e) = epoll.watch(l.bell.vector0_fd(), key(slot, false), on) {
        warn!(
            "vm {}: cannot {} its doorbell (epoll_ctl: {e})",
            l.name,
            if on { "watch" } else { "pause" }
        );
    }
}

/// When to drive a link whose deadline is `deadline`: a deadline at least [`ROUND_FROM`]
/// away is put off to the next tick of the grid from `epoch`, so that idle links wake
/// together; a nearer one is kept.
fn fire_at(epoch: Instant, deadline: Instant, now: Instant) -> Instant {
    if deadline.saturating_duration_since(now) < ROUND_FROM {
        return deadline;
    }
    let tick = TICK.as_nanos();
    let ticks = deadline
        .saturating_duration_since(epoch)
        .as_nanos()
        .div_ceil(tick);
    u64::try_from(ticks * tick)
        .ok()
        .and_then(|ns| epoch.checked_add(Duration::from_nanos(ns)))
        .unwrap_or(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_deadlines_go_to_the_next_tick_near_ones_stay() {
        let epoch = Instant::now();
        let now = epoch + Duration::from_millis(3);
        let near = now + Duration::from_millis(1);
        assert_eq!(fire_at(epoch, near, now), near);
        let far = now + Duration::from_millis(100);
        let f = fire_at(epoch, far, now);
        assert!(f >= far && f - far < TICK);
        assert_eq!((f - epoch).as_nanos() % TICK.as_nanos(), 0);
        // Two links a few milliseconds apart wake together.
        let other = fire_at(
            epoch,
            far + Duration::from_millis(2),
            now + Duration::from_millis(2),
        );
        assert!(other == f || other == f + TICK);
    }

    #[test]
    fn keys_name_a_slot_and_a_fd() {
        for slot in [0usize, 1, 7, 100_000] {
            for intr in [false, true] {
                let k = key(slot, intr);
                assert_ne!(k, WAKE);
                assert_eq!(((k / 2 - 1) as usize, k % 2 == 1), (slot, intr));
            }
        }
    }
}

//! One wakeup for many sessions: the readiness an event loop waits on.
//!
//! A thread that serves many non-blocking sessions gives every one of them the same
//! [`Readiness::notifier`] (through [`crate::Session::set_notify`]), works each session
//! until it would block, and when all of them would, waits on the [`Readiness`]. A
//! notification that comes while the loop is working is kept, so none is lost between
//! the last `WouldBlock` and the wait.

use crate::runtime::Shared;
use crate::shm::sync::{AtomicBool, Ordering};
use crate::{Endpoint, WaitMode};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A sticky wakeup flag that session callbacks set and one event loop waits on.
#[derive(Default)]
pub struct Readiness {
    fired: AtomicBool,
    waiting: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Readiness {
    /// A new, unfired readiness.
    pub fn new() -> Arc<Readiness> {
        Arc::new(Readiness::default())
    }

    /// The callback to give each session's `set_notify`. It runs with the link locked,
    /// so it only sets the flag, and takes the lock only when the loop is asleep.
    pub fn notifier(self: &Arc<Readiness>) -> Arc<dyn Fn() + Send + Sync> {
        let me = self.clone();
        Arc::new(move || me.fire())
    }

    /// Sets the flag and wakes the waiter.
    pub fn fire(&self) {
        // Already set: the waiter's next swap takes it, or the thread that set it after
        // that swap did the check below. (A SeqCst load is a plain load on x86; the swap
        // and fence below cost a full barrier for every frame of a busy loop.)
        if self.fired.load(Ordering::SeqCst) {
            return;
        }
        // Dekker pair with `wait`: the flag store is ordered before the `waiting` load,
        // and the waiter's `waiting` store before its swap of the flag, so either the
        // waiter sees the flag or we see the waiter (and notify under its lock).
        self.fired.store(true, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
    }

    /// Consumes the flag without waiting: whether anything fired since the last take.
    pub fn take(&self) -> bool {
        self.fired.swap(false, Ordering::SeqCst)
    }

    /// Waits until the flag is set (or `timeout` passes), then clears it. `true` if it was
    /// set: some session may have become readable or writable.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + timeout;
        let fired = loop {
            if self.fired.swap(false, Ordering::SeqCst) {
                break true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break false;
            }
            held = self
                .cv
                .wait_timeout(held, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        self.waiting.store(false, Ordering::SeqCst);
        fired
    }
}

/// What an event loop does when every session of one endpoint would block, as the
/// endpoint's wait mode says: spin (`Poll`), spin for `Config::spin` and then sleep
/// (`Adaptive`), or sleep on the [`Readiness`] (`Block`). While it spins it counts as a
/// polling caller, so the peer need not ring for it: the loop's own non-blocking calls
/// move the ring.
pub struct IdleWait {
    shared: Arc<Shared>,
    wait: WaitMode,
    spin: Duration,
    since: Option<Instant>,
    spinning: bool,
}

impl IdleWait {
    /// For the sessions of `ep`.
    pub fn new(ep: &Endpoint) -> IdleWait {
        IdleWait {
            shared: ep.shared().clone(),
            wait: ep.config().wait,
            spin: ep.config().spin,
            since: None,
            spinning: false,
        }
    }

    /// The loop got something done: the next idle round starts spinning afresh.
    pub fn progress(&mut self) {
        self.since = None;
    }

    /// The loop found every session blocked: spin a little or wait for `ready` (at most
    /// `limit`, so that the loop can look at other work).
    pub fn idle(&mut self, ready: &Readiness, limit: Duration) {
        let spin = match self.wait {
            WaitMode::Poll => true,
            WaitMode::Block => false,
            WaitMode::Adaptive => {
                let since = *self.since.get_or_insert_with(Instant::now);
                since.elapsed() < self.spin
            }
        };
        if spin {
            self.set_spinning(true);
            for _ in 0..16 {
                if ready.fired.load(Ordering::Relaxed) {
                    return;
                }
                std::hint::spin_loop();
            }
        } else {
            self.set_spinning(false);
            ready.wait(limit);
        }
    }

    fn set_spinning(&mut self, on: bool) {
        if self.spinning != on {
            self.spinning = on;
            self.shared.set_loop_spinning(on);
        }
    }
}

impl Drop for IdleWait {
    fn drop(&mut self) {
        self.set_spinning(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fire_before_the_wait_is_kept() {
        let _watchdog = crate::test_watchdog::watchdog("a_fire_before_the_wait_is_kept", 20);
        let r = Readiness::new();
        (r.notifier())();
        assert!(r.wait(Duration::from_secs(10)));
        assert!(!r.wait(Duration::from_millis(1)));
    }

    #[test]
    fn a_fire_from_another_thread_wakes_the_wait() {
        let _watchdog =
            crate::test_watchdog::watchdog("a_fire_from_another_thread_wakes_the_wait", 20);
        for _ in 0..200 {
            let r = Readiness::new();
            let n = r.notifier();
            let t = std::thread::spawn(move || n());
            assert!(r.wait(Duration::from_secs(30)));
            t.join().unwrap();
        }
    }
}

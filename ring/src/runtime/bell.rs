//! Who waits on the doorbell: the hand-off between the keeper and blocked callers.
//!
//! One thread at a time waits on the doorbell, because a ring drained by one waiter is
//! lost to another. The bell is held by one of:
//! - nobody ([`Holder::Free`]);
//! - the keeper ([`Holder::Keeper`]), asleep on the doorbell with the peer asked to ring;
//! - a blocked caller ([`Holder::Caller`]), so that the peer's ring wakes the thread that
//!   wants the data (one wakeup, not two: doorbell to keeper, keeper to caller). The
//!   keeper sits out (is benched) meanwhile.
//!
//! The transitions, each made with the link's lock held:
//!
//! | who | from | to | when |
//! |---|---|---|---|
//! | caller | Free | Caller | it must sleep, the link is up and nothing came in since it armed ([`Bell::caller_take`]) |
//! | caller | Caller | Free | it returns, or sleeps on a condvar instead ([`Bell::caller_give_up`]): the keeper is recalled if other callers sleep on condvars |
//! | keeper | Free | Keeper | it sleeps on the doorbell ([`Bell::keeper_take`]) |
//! | keeper | Keeper | Free | it woke, at the top of its round ([`Bell::keeper_round`]) |
//!
//! A caller that must sleep while the keeper has the bell sleeps on a condvar and marks
//! its stripe as wanting the bell ([`Bell::caller_wait`]); the keeper's next round wakes
//! that stripe's sleepers and leaves the bell free for a moment, so that one of them
//! takes it. A caller that finds the bell free while the keeper is benched recalls the
//! keeper, so someone follows the ring while it sleeps on a condvar.
//!
//! Every change is made under the link's lock, and every read that decides something
//! too, except one: the keeper clears its benched flag after its nap, without the lock.
//! A caller that reads the flag still set then unparks a keeper that is already awake,
//! which costs nothing. So the lock orders everything here, and the atomics are
//! `Relaxed`: they are atomics only so that the keeper's unlocked store is not a data
//! race. The loom model below runs these transitions against a peer, a keeper and
//! blocked callers, with no timeouts, and fails on any interleaving in which data sits
//! in the ring while every thread sleeps.

use crate::shm::sync::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// Who holds the bell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    Free,
    Keeper,
    Caller,
}

const FREE: u8 = 0;
const KEEPER: u8 = 1;
const CALLER: u8 = 2;

/// What a caller about to sleep on a condvar must do about the bell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallerWait {
    /// Nothing: a caller holds the bell and reads the ring for everyone.
    Nothing,
    /// Its stripe was marked as wanting the bell: the keeper's next round wakes it.
    Asked,
    /// Nobody is on the doorbell and the keeper sits out: unpark it now.
    RecallKeeper,
}

/// The bell's state. See the module docs.
pub(crate) struct Bell {
    holder: AtomicU8,
    /// Stripes whose callers sleep on condvars because the keeper had the bell (bit `b`
    /// stands for stripes `b`, `b + 64`, ...; bit 0 also for link and accept waiters).
    wanted: AtomicU64,
    /// The keeper sits out (parked, not on the doorbell).
    keeper_benched: AtomicBool,
    /// Times a caller took the bell: a keeper that sat out and sees callers using the bell
    /// keeps out of their way (they recall it when they need it).
    caller_takes: AtomicU64,
}

impl Bell {
    pub(crate) fn new() -> Bell {
        Bell {
            holder: AtomicU8::new(FREE),
            wanted: AtomicU64::new(0),
            keeper_benched: AtomicBool::new(false),
            caller_takes: AtomicU64::new(0),
        }
    }

    /// Who holds it.
    pub(crate) fn holder(&self) -> Holder {
        match self.holder.load(Ordering::Relaxed) {
            KEEPER => Holder::Keeper,
            CALLER => Holder::Caller,
            _ => Holder::Free,
        }
    }

    /// A caller takes the bell if it is free; whether it did.
    pub(crate) fn caller_take(&self) -> bool {
        if self.holder() != Holder::Free {
            return false;
        }
        self.holder.store(CALLER, Ordering::Relaxed);
        self.caller_takes.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The caller that holds the bell gives it up; `sleepers`: other callers sleep on
    /// condvars. Whether the keeper must be unparked (it sits out, and those sleepers
    /// need someone on the doorbell).
    pub(crate) fn caller_give_up(&self, sleepers: bool) -> bool {
        self.holder.store(FREE, Ordering::Relaxed);
        sleepers && self.keeper_benched.load(Ordering::Relaxed)
    }

    /// A caller of `stripe` is about to sleep on a condvar without the bell.
    /// `direct_wait`: callers may wait on this doorbell at all.
    pub(crate) fn caller_wait(&self, stripe: usize, direct_wait: bool) -> CallerWait {
        match self.holder() {
            Holder::Keeper if direct_wait => {
                self.wanted.fetch_or(1 << (stripe % 64), Ordering::Relaxed);
                CallerWait::Asked
            }
            Holder::Free if self.keeper_benched.load(Ordering::Relaxed) => CallerWait::RecallKeeper,
            _ => CallerWait::Nothing,
        }
    }

    /// The top of the keeper's round: it gives the bell up if it had it. Whether a caller
    /// holds it now.
    pub(crate) fn keeper_round(&self) -> bool {
        if self.holder() == Holder::Keeper {
            self.holder.store(FREE, Ordering::Relaxed);
        }
        self.holder() == Holder::Caller
    }

    /// The keeper takes the bell to sleep on the doorbell (only ever from `Free`: its
    /// round started by freeing it, and no caller took it since, under the same lock).
    pub(crate) fn keeper_take(&self) {
        debug_assert_eq!(self.holder(), Holder::Free);
        self.holder.store(KEEPER, Ordering::Relaxed);
    }

    /// The stripes that asked for the bell since the last call.
    pub(crate) fn take_wanted(&self) -> u64 {
        self.wanted.swap(0, Ordering::Relaxed)
    }

    /// How many times callers took the bell.
    pub(crate) fn caller_takes(&self) -> u64 {
        self.caller_takes.load(Ordering::Relaxed)
    }

    /// Whether the keeper sits out.
    pub(crate) fn keeper_benched(&self) -> bool {
        self.keeper_benched.load(Ordering::Relaxed)
    }

    /// The keeper sits out (before it parks, with the lock held) or is back (after).
    pub(crate) fn set_keeper_benched(&self, benched: bool) {
        self.keeper_benched.store(benched, Ordering::Relaxed);
    }
}

#[cfg(all(test, loom))]
mod loom_model;

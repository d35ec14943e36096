//! Surviving shared memory that someone shrinks under our mapping.
//!
//! Memory from a server that does not seal it (QEMU's `ivshmem-server`, joined with
//! `allow_unsealed`) can be truncated by any process holding its fd. The kernel applies a
//! truncation at once, and the next access to a page past the new end raises SIGBUS,
//! whichever of our threads makes it: no check made beforehand (an `fstat` of the fd) can
//! close that window, because our threads touch the memory all the time.
//!
//! So the fault itself is handled: a SIGBUS handler, installed the first time such memory
//! is mapped, looks the faulting address up among the registered mappings. For one of
//! ours it maps private zeroed memory over the whole mapping (so the faulting access, and
//! every later one, completes on memory no other process sees), prints one line on
//! stderr and rings an eventfd, by which the client ends the link: every session fails
//! with `ConnectionReset`, as when the peer leaves. A fault elsewhere goes to the handler
//! that was installed before (Rust's own, or the default action).

use crate::sys::EventFd;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Once, OnceLock};

/// How many guarded mappings may exist at once; more are mapped unguarded.
const SLOTS: usize = 16;

struct Slot {
    /// Start of the mapping; 0 when the slot is free.
    base: AtomicUsize,
    len: AtomicUsize,
    /// The eventfd rung when the mapping was replaced (-1: none).
    notify: AtomicI32,
    /// Handlers now reading this slot: a mapping is unmapped only once none is.
    readers: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below
const FREE: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    notify: AtomicI32::new(-1),
    readers: AtomicUsize::new(0),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static INSTALL: Once = Once::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

const MESSAGE: &[u8] = b"ivring: the shared memory was shrunk under this process (its server \
did not seal it; joined with --allow-unsealed): the link is ended and the memory replaced \
by private zeroes\n";

/// A registered mapping; dropping it unregisters it (before the mapping is unmapped).
pub(crate) struct Guard {
    slot: usize,
    /// Kept open while registered: the handler writes to its fd number.
    _notify: Arc<EventFd>,
}

/// Registers `len` bytes mapped at `base`, ringing `notify` if they are ever replaced.
/// `None` when every slot is taken (the mapping then stays unguarded).
pub(crate) fn register(base: *mut u8, len: usize, notify: Arc<EventFd>) -> Option<Guard> {
    INSTALL.call_once(install);
    for (i, slot) in TABLE.iter().enumerate() {
        if slot
            .base
            .compare_exchange(0, usize::MAX, SeqCst, SeqCst)
            .is_ok()
        {
            // Claimed (usize::MAX covers no address); fill it in, then publish the base.
            slot.len.store(len, SeqCst);
            slot.notify.store(notify.as_fd().as_raw_fd(), SeqCst);
            slot.base.store(base as usize, SeqCst);
            return Some(Guard {
                slot: i,
                _notify: notify,
            });
        }
    }
    None
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &TABLE[self.slot];
        // Hide the mapping from new faults, then wait out any handler that saw it.
        slot.base.store(usize::MAX, SeqCst);
        while slot.readers.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        slot.notify.store(-1, SeqCst);
        slot.len.store(0, SeqCst);
        slot.base.store(0, SeqCst);
    }
}

fn install() {
    // SAFETY: a zeroed `sigaction` is a valid value (no handler, empty mask, no flags);
    // every field that matters is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: both pointers are valid for the calls; `on_sigbus` has the signature
    // SA_SIGINFO asks for and only makes async-signal-safe calls.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
            let _ = PREVIOUS.set(previous);
        }
    }
}

/// The SIGBUS handler: only atomics and system calls (mmap, write, sigaction).
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a SA_SIGINFO handler a valid siginfo; for SIGBUS `si_addr`
    // is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &TABLE {
        slot.readers.fetch_add(1, SeqCst);
        let base = slot.base.load(SeqCst);
        let len = slot.len.load(SeqCst);
        if base != 0 && base != usize::MAX && (base..base + len).contains(&addr) {
            // SAFETY: [base, base + len) is our own registered mapping, still mapped (its
            // `Guard` waits for `readers` before it is unmapped). MAP_FIXED replaces it in
            // place with private zeroed pages, so the access that faulted, and every later
            // one through the region, touches valid memory that no other process sees.
            let replaced = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            } != libc::MAP_FAILED;
            let notify = slot.notify.load(SeqCst);
            slot.readers.fetch_sub(1, SeqCst);
            if replaced {
                let one = 1u64.to_ne_bytes();
                // SAFETY: plain writes of valid buffers; `notify` stays open while the
                // slot is registered (the `Guard` owns it), and a failed write is harmless.
                unsafe {
                    if notify >= 0 {
                        libc::write(notify, one.as_ptr().cast(), one.len());
                    }
                    libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
                }
                return;
            }
            break;
        }
        slot.readers.fetch_sub(1, SeqCst);
    }
    // Not ours (or not replaceable): put back the handler from before us and return; the
    // access faults again and that handler (or the default action) deals with it.
    // SAFETY: `previous` is the action the kernel gave us at install; SIG_DFL otherwise.
    unsafe {
        match PREVIOUS.get() {
            Some(previous) => libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()),
            None => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
                0
            }
        };
    }
}

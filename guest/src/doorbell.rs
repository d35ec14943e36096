//! [`GuestDoorbell`]: the ivshmem Doorbell register to ring the peer, and MSI-X eventfds
//! (through VFIO) or polling with backoff to be woken.

use crate::device::Registers;
use crate::vfio::VfioDevice;
use ivring::Doorbell;
use rustix::event::{epoll, eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::time::Timespec;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// First sleep of a polling wait.
pub const POLL_MIN: Duration = Duration::from_micros(50);
/// Longest sleep of a polling wait.
pub const POLL_MAX: Duration = Duration::from_millis(2);

enum Wake {
    /// MSI-X through VFIO: the device owns the vector eventfds.
    Msix(VfioDevice),
    /// No interrupts: sleep, doubling from [`POLL_MIN`] to [`POLL_MAX`].
    Polling {
        /// The next sleep in nanoseconds; reset by `ring` and `interrupt`.
        backoff_ns: AtomicU64,
    },
}

/// The guest's doorbell: rings peers through the Doorbell register, waits on MSI-X (VFIO
/// mode) or by polling.
pub struct GuestDoorbell {
    regs: Registers,
    own_id: u16,
    wake: Wake,
    /// Private eventfd that [`Doorbell::interrupt`] signals to end a wait.
    interrupt: OwnedFd,
    /// Epoll instances watching the MSI-X vectors and `interrupt` edge-triggered, one
    /// per waiter at a time (the keeper and a caller on the bell may wait at once): a
    /// wait is one `epoll_wait` instead of a `poll` and a `read` to drain (as the host's
    /// doorbell waits; the eventfds are never drained). Each instance sees every
    /// interrupt, as each `poll` did.
    waits: Mutex<Vec<OwnedFd>>,
}

impl std::fmt::Debug for GuestDoorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDoorbell")
            .field("own_id", &self.own_id)
            .field("interrupts", &self.can_wait())
            .finish()
    }
}

fn new_eventfd() -> std::io::Result<OwnedFd> {
    Ok(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
}

/// Reads an eventfd until empty (it is non-blocking).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8];
    while rustix::io::read(fd, &mut buf).is_ok() {}
}

fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as _,
    }
}

impl GuestDoorbell {
    /// A doorbell woken by polling (ivshmem-plain, or no VFIO).
    pub fn polling(regs: Registers) -> std::io::Result<Self> {
        Ok(GuestDoorbell {
            own_id: regs.iv_position(),
            regs,
            wake: Wake::Polling {
                backoff_ns: AtomicU64::new(POLL_MIN.as_nanos() as u64),
            },
            interrupt: new_eventfd()?,
            waits: Mutex::new(Vec::new()),
        })
    }

    /// A doorbell woken by the MSI-X vectors of `vfio`.
    pub fn msix(regs: Registers, vfio: VfioDevice) -> std::io::Result<Self> {
        Ok(GuestDoorbell {
            own_id: regs.iv_position(),
            regs,
            wake: Wake::Msix(vfio),
            interrupt: new_eventfd()?,
            waits: Mutex::new(Vec::new()),
        })
    }

    /// The registers (for IVPosition, or rings of other vectors).
    pub fn registers(&self) -> &Registers {
        &self.regs
    }

    fn reset_backoff(&self) {
        if let Wake::Polling { backoff_ns } = &self.wake {
            backoff_ns.store(POLL_MIN.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// An epoll instance for one wait on `fds` and the interrupt eventfd: one of
    /// `waits`, or a new one; `None` if none can be made.
    fn take_wait(&self, fds: &[&OwnedFd]) -> Option<OwnedFd> {
        if let Some(ep) = self
            .waits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            return Some(ep);
        }
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).ok()?;
        let edge = epoll::EventFlags::IN | epoll::EventFlags::ET;
        for (i, fd) in fds.iter().copied().chain([&self.interrupt]).enumerate() {
            epoll::add(&ep, fd, epoll::EventData::new_u64(i as u64), edge).ok()?;
        }
        Some(ep)
    }

    /// Waits on `fds` and the interrupt eventfd edge-triggered for at most `timeout`
    /// (rounded up to the millisecond), or as [`GuestDoorbell::poll_fds`] does if no
    /// epoll instance can be had. An early return (EINTR, an instance that sat in the
    /// pool through an interrupt) is allowed by the doorbell's contract.
    fn wait_edges(&self, fds: &[&OwnedFd], timeout: Option<Duration>) {
        let Some(ep) = self.take_wait(fds) else {
            return self.poll_fds(fds, timeout);
        };
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); 4];
        // A timeout too long to represent is no timeout.
        let ts = timeout
            .filter(|t| t.as_secs() < i32::MAX as u64 / 1000)
            .map(timespec);
        let _ = epoll::wait(&ep, &mut events, ts.as_ref());
        self.waits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ep);
    }

    /// Polls the given fds plus the interrupt eventfd, for at most `timeout`; then drains
    /// whatever became readable, so pending rings are consumed.
    fn poll_fds(&self, fds: &[&OwnedFd], timeout: Option<Duration>) {
        let mut pfds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::IN))
            .chain(std::iter::once(PollFd::new(&self.interrupt, PollFlags::IN)))
            .collect();
        // A timeout too long to represent is no timeout.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let left = deadline.map(|d| timespec(d.saturating_duration_since(Instant::now())));
            match poll(&mut pfds, left.as_ref()) {
                Err(rustix::io::Errno::INTR) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                }
                _ => break,
            }
        }
        // Drain only what is readable: a read of an empty eventfd is a wasted syscall on
        // the path of every blocked round trip.
        let ready: Vec<bool> = pfds.iter().map(|p| !p.revents().is_empty()).collect();
        drop(pfds);
        let all = fds.iter().copied().chain(std::iter::once(&self.interrupt));
        for (fd, _) in all.zip(ready).filter(|(_, r)| *r) {
            drain(fd);
        }
    }
}

impl Doorbell for GuestDoorbell {
    fn own_id(&self) -> u16 {
        self.own_id
    }

    fn ring(&self, peer: u16) {
        self.regs.ring_doorbell(peer, 0);
        // We just handed the peer work; its answer is likely soon.
        self.reset_backoff();
    }

    fn wait(&self, timeout: Option<Duration>) {
        match &self.wake {
            Wake::Msix(vfio) => {
                let fds: Vec<&OwnedFd> = vfio.vectors().iter().collect();
                self.wait_edges(&fds, timeout);
            }
            Wake::Polling { backoff_ns } => {
                let cur = Duration::from_nanos(backoff_ns.load(Ordering::Relaxed));
                let next = (cur * 2).min(POLL_MAX);
                backoff_ns.store(next.as_nanos() as u64, Ordering::Relaxed);
                let nap = timeout.map_or(cur, |t| t.min(cur));
                // Sleep on the interrupt eventfd so `interrupt` cuts the nap short.
                self.poll_fds(&[], Some(nap));
            }
        }
    }

    fn interrupt(&self) {
        self.reset_backoff();
        let _ = rustix::io::write(self.interrupt.as_fd(), &1u64.to_ne_bytes());
    }

    fn can_wait(&self) -> bool {
        matches!(self.wake, Wake::Msix(_))
    }

    fn peer_present(&self, _peer: u16) -> Option<bool> {
        None
    }
}

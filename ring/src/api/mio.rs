//! Sessions and listeners as `mio::event::Source`s (the `mio` feature; Linux only).
//!
//! mio waits on file descriptors, and a session has none: its readiness is a callback
//! ([`Session::set_notify`]). Each [`MioSession`] and [`MioListener`] therefore owns an
//! eventfd that its callback signals, and registers that. This module is the one place
//! in the crate with a file descriptor (through `rustix`); the rest knows no operating
//! system.
//!
//! Every readiness is reported as *readable*, for reading and writing alike (an eventfd
//! cannot say which; the callback cannot either: a credit frame or a reset concerns
//! both). Use them as mio's own sockets, edge-triggered: on an event for the token, read
//! (and write, if you have something to write) until `WouldBlock`. A `WouldBlock` clears
//! the eventfd and looks once more, so that nothing that arrived in between is missed.
//!
//! ```
//! use ivring::mio::{MioListener, MioSession};
//! use ivring::{doorbell::local, Config, Endpoint, SharedRegion};
//! use mio::{Events, Interest, Poll, Token};
//! use std::io::{Read, Write};
//! use std::sync::Arc;
//!
//! let region = SharedRegion::heap(1 << 20);
//! let (a, b) = local::pair();
//! let host = Endpoint::host(region.clone(), Arc::new(a), Config::default()).unwrap();
//! let guest = Endpoint::guest(region, Arc::new(b), Config::default()).unwrap();
//!
//! let mut poll = Poll::new()?;
//! let mut listener = MioListener::new(guest.listen(7)?)?;
//! poll.registry().register(&mut listener, Token(0), Interest::READABLE)?;
//! let mut client = host.connect(7)?;
//! client.write_all(b"hi")?;
//!
//! let mut events = Events::with_capacity(8);
//! let mut accepted = None;
//! let mut got = Vec::new();
//! while got.len() < 2 {
//!     poll.poll(&mut events, Some(std::time::Duration::from_secs(10)))?;
//!     if accepted.is_none() {
//!         match listener.accept() {
//!             Ok(mut s) => {
//!                 poll.registry().register(&mut s, Token(1), Interest::READABLE)?;
//!                 accepted = Some(s);
//!             }
//!             Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
//!             Err(e) => return Err(e),
//!         }
//!     }
//!     if let Some(s) = accepted.as_mut() {
//!         let mut b = [0u8; 16];
//!         loop {
//!             match s.read(&mut b) {
//!                 Ok(n) => got.extend_from_slice(&b[..n]),
//!                 Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
//!                 Err(e) => return Err(e),
//!             }
//!         }
//!     }
//! }
//! assert_eq!(got, b"hi");
//! # Ok::<(), std::io::Error>(())
//! ```

use crate::runtime::Patience;
use crate::shm::sync::{AtomicBool, Ordering};
use crate::{Listener, Session};
use ::mio::event::Source;
use ::mio::unix::SourceFd;
use ::mio::{Interest, Registry, Token};
use rustix::event::{eventfd, EventfdFlags};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::io;
use std::net::Shutdown;
use std::sync::Arc;

/// An eventfd that a readiness callback signals, at most once between two clears.
struct Signal {
    fd: OwnedFd,
    /// Signalled and not cleared since: further signals skip the syscall (a busy session
    /// calls its callback for every frame, with the link locked).
    pending: AtomicBool,
}

impl Signal {
    fn new() -> io::Result<Arc<Signal>> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Arc::new(Signal {
            fd,
            pending: AtomicBool::new(false),
        }))
    }

    fn signal(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // Only fails when the counter would overflow: it is readable then anyway.
            let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
        }
    }

    /// Makes the fd unreadable until the next signal. The caller looks at the session
    /// again afterwards: a signal skipped because `pending` was still set came from a
    /// callback that ran, with the link locked, before that look takes the lock.
    fn clear(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut b);
        self.pending.store(false, Ordering::SeqCst);
    }

    fn notifier(self: &Arc<Signal>) -> crate::link::Notifier {
        let me = self.clone();
        Arc::new(move || me.signal())
    }
}

/// On `WouldBlock`, clears the signal and tries once more (see the module docs).
fn retry_cleared<T>(signal: &Signal, mut attempt: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    match attempt() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            signal.clear();
            attempt()
        }
        r => r,
    }
}

fn register_fd(
    fd: BorrowedFd<'_>,
    registry: &Registry,
    token: Token,
    interests: Interest,
    again: bool,
) -> io::Result<()> {
    // Every readiness is readable on the eventfd (module docs): ask for that alone.
    let _ = interests;
    let raw = fd.as_raw_fd();
    if again {
        SourceFd(&raw).reregister(registry, token, Interest::READABLE)
    } else {
        SourceFd(&raw).register(registry, token, Interest::READABLE)
    }
}

/// `AsFd` and mio's `Source` for a wrapper whose `signal` field holds its eventfd.
macro_rules! signal_source {
    ($t:ty) => {
        impl AsFd for $t {
            fn as_fd(&self) -> BorrowedFd<'_> {
                self.signal.fd.as_fd()
            }
        }

        impl Source for $t {
            fn register(
                &mut self,
                registry: &Registry,
                token: Token,
                interests: Interest,
            ) -> io::Result<()> {
                register_fd(self.signal.fd.as_fd(), registry, token, interests, false)
            }

            fn reregister(
                &mut self,
                registry: &Registry,
                token: Token,
                interests: Interest,
            ) -> io::Result<()> {
                register_fd(self.signal.fd.as_fd(), registry, token, interests, true)
            }

            fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
                SourceFd(&self.signal.fd.as_raw_fd()).deregister(registry)
            }
        }
    };
}

/// A non-blocking [`Session`] that mio can wait on: `Read + Write` (also through `&`),
/// `mio::event::Source`. Its registration reports readable whenever the session may
/// have become readable or writable (data, EOF, credit, ring space, a reset).
pub struct MioSession {
    session: Session,
    signal: Arc<Signal>,
}

impl std::fmt::Debug for MioSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MioSession").field(&self.session).finish()
    }
}

impl MioSession {
    /// Wraps `session` (switched to non-blocking), taking its readiness callback. The fd
    /// starts readable, so that a first poll looks at data that came before.
    pub fn new(mut session: Session) -> io::Result<MioSession> {
        let signal = Signal::new()?;
        session.set_notify(signal.notifier())?;
        session.set_nonblocking(true);
        signal.signal();
        Ok(MioSession { session, signal })
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Closes the read half, the write half, or both (as `TcpStream::shutdown`).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.session.shutdown(how)
    }
}

impl io::Read for &MioSession {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        retry_cleared(&self.signal, || {
            self.session.read_shared(buf, Patience::Now)
        })
    }
}

impl io::Write for &MioSession {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        retry_cleared(&self.signal, || {
            self.session.write_shared(buf, Patience::Now)
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Read for MioSession {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl io::Write for MioSession {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

signal_source!(MioSession);

/// A non-blocking [`Listener`] that mio can wait on: its registration reports readable
/// when a session may be waiting to be accepted.
pub struct MioListener {
    listener: Listener,
    signal: Arc<Signal>,
}

impl std::fmt::Debug for MioListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MioListener")
            .field("port", &self.listener.port())
            .finish()
    }
}

impl MioListener {
    /// Wraps `listener` (switched to non-blocking), taking its readiness callback. The
    /// fd starts readable, so that sessions already in the backlog are seen.
    pub fn new(mut listener: Listener) -> io::Result<MioListener> {
        let signal = Signal::new()?;
        listener.set_notify(signal.notifier());
        listener.set_nonblocking(true);
        signal.signal();
        Ok(MioListener { listener, signal })
    }

    /// The port.
    pub fn port(&self) -> u32 {
        self.listener.port()
    }

    /// The next session, as a [`MioSession`] (register it next), or `WouldBlock`.
    pub fn accept(&self) -> io::Result<MioSession> {
        retry_cleared(&self.signal, || self.listener.accept()).and_then(MioSession::new)
    }
}

signal_source!(MioListener);

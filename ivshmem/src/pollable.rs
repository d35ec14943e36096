//! A session with a pollable file descriptor, for poll/epoll/mio/tokio event loops.
//!
//! tokio programs need no fd: `ivring::tokio::AsyncSession` is `AsyncRead + AsyncWrite`
//! itself. mio programs can register `ivring::mio::MioSession` directly.

use crate::error::HostError;
use crate::sys::EventFd;
use ivring::Session;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

/// A non-blocking [`Session`] whose [`AsFd`] becomes readable whenever the session may
/// have become readable or writable (data, EOF, credit, a reset).
///
/// Use it edge-style: when the fd polls readable, call [`PollableSession::clear`], then
/// read (and write) until `WouldBlock`.
pub struct PollableSession {
    session: Session,
    event: Arc<EventFd>,
}

impl PollableSession {
    /// Wraps `session` (switched to non-blocking). The fd starts readable so that a first
    /// poll looks at data that arrived before.
    pub fn new(mut session: Session) -> Result<PollableSession, HostError> {
        let event = Arc::new(EventFd::new()?);
        let signal = event.clone();
        session
            .set_notify(Arc::new(move || signal.signal()))
            .map_err(|e| HostError::Io {
                what: "watch session".into(),
                source: e,
            })?;
        session.set_nonblocking(true);
        event.signal();
        Ok(PollableSession { session, event })
    }

    /// Consumes the pending readiness signal; call before reading until `WouldBlock`.
    pub fn clear(&self) {
        self.event.drain();
    }

    /// The session.
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }
}

impl AsFd for PollableSession {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }
}

impl io::Read for PollableSession {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.session.read(buf)
    }
}

impl io::Write for PollableSession {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.session.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.session.flush()
    }
}

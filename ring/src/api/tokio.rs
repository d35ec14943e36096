//! Async sessions and listeners for tokio (the `tokio` feature).
//!
//! [`AsyncSession`] is `tokio::io::AsyncRead + AsyncWrite` (with vectored writes, and
//! `shutdown` as a half-close: the peer reads EOF); [`AsyncListener::accept`] and
//! [`AsyncSession::connect`] are the async forms of [`Listener::accept`] and
//! [`Endpoint::connect`]. The types own a non-blocking [`Session`] or [`Listener`] of
//! any [`Endpoint`], host or guest role alike.
//!
//! A task waiting on a session or a listener costs nothing until something arrives for
//! it: the session's readiness callback ([`Session::set_notify`]), run by whichever
//! thread reads the ring, wakes the stored wakers of the tasks that wait to read or to
//! write (data, EOF, credit, ring space, a reset), and a listener's callback
//! ([`Listener::set_notify`]) wakes the tasks waiting to accept. Nothing polls on a
//! timer.
//!
//! The endpoint's [`WaitMode`](crate::WaitMode) holds for async calls as for blocking
//! ones, up to the point where a blocking call would sleep: under `Adaptive` (and `Poll`)
//! a read or write that finds nothing to do spins on the ring for at most
//! [`Config::spin`](crate::Config::spin) (50 us by default) before its task sleeps, so a
//! stream or a round trip in progress moves at the blocking API's speed; under `Block`
//! it never spins, and every wait costs two thread hand-offs (the endpoint's keeper reads
//! the ring, the runtime runs the task), about what a blocking round trip costs in
//! `Block`. A session that stays idle costs one spin when its task first waits, then
//! nothing. Async programs that serve many mostly idle sessions on one runtime thread,
//! and would rather not spend the spin, use `Block` endpoints. Under `Poll` the peer
//! never rings: a task that sleeps is woken only as often as the keeper polls (20 us to
//! 1 ms apart).
//!
//! Errors are those of the blocking API: reads return `Ok(0)` at the peer's shutdown or
//! close; writes then fail with `BrokenPipe`; a link reset (the peer restarted or left)
//! fails every open session with `ConnectionReset`; a connect to a port nobody listens on
//! fails with `ConnectionRefused`, and one that gets no answer in
//! [`Config::connect_timeout`](crate::Config::connect_timeout) with `TimedOut`.
//!
//! # Cancel safety
//!
//! Every future and `poll_*` method here takes what it returns (bytes, a session) only in
//! the same step that returns it, so dropping one half way loses nothing:
//! - reading (`AsyncReadExt::read`, `poll_read`): a dropped read took no byte; the
//!   next read returns it;
//! - writing (`AsyncWriteExt::write`, `poll_write`): a dropped write sent no byte
//!   (but `write_all` may have sent part of its buffer, as with any `AsyncWrite`);
//! - [`AsyncListener::accept`]: a dropped accept took no session from the backlog;
//! - [`AsyncSession::connect`]: a dropped connect withdraws its open request (the peer
//!   sees the session closed if it had already accepted it).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use ivring::tokio::{AsyncListener, AsyncSession};
//! use ivring::{doorbell::local, Config, Endpoint, SharedRegion};
//! use std::sync::Arc;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let region = SharedRegion::heap(1 << 20);
//! let (a, b) = local::pair();
//! let host = Endpoint::host(region.clone(), Arc::new(a), Config::default()).unwrap();
//! let guest = Endpoint::guest(region, Arc::new(b), Config::default()).unwrap();
//!
//! let listener = AsyncListener::bind(&guest, 7)?;
//! let server = tokio::spawn(async move {
//!     let mut s = listener.accept().await?;
//!     let mut got = Vec::new();
//!     s.read_to_end(&mut got).await?;
//!     s.write_all(&got).await?;
//!     std::io::Result::Ok(())
//! });
//! let mut c = AsyncSession::connect(&host, 7).await?;
//! c.write_all(b"hello").await?;
//! c.shutdown().await?; // the server reads EOF after "hello"
//! let mut echo = Vec::new();
//! c.read_to_end(&mut echo).await?;
//! assert_eq!(echo, b"hello");
//! server.await.unwrap()?;
//! # Ok(())
//! # }
//! ```

use crate::link::Notifier;
use crate::runtime::Patience;
use crate::{Endpoint, Listener, Session, SessionOptions};
use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use atomic_waker::AtomicWaker;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The tasks waiting on one session: one reader and one writer at a time (a session's
/// halves may be in two tasks).
#[derive(Default)]
struct SessionWakers {
    read: AtomicWaker,
    write: AtomicWaker,
}

impl SessionWakers {
    /// The session's readiness callback. It cannot tell reading from writing (a credit
    /// frame, a reset and EOF concern both), so it wakes both; a task woken for nothing
    /// tries once and waits again.
    fn notifier(self: &Arc<Self>) -> Notifier {
        let w = self.clone();
        Arc::new(move || {
            w.read.wake();
            w.write.wake();
        })
    }
}

/// The session and its wakers, shared by the halves of a split.
struct Inner {
    session: Session,
    wakers: Arc<SessionWakers>,
}

/// Runs `attempt`, spinning first as the endpoint's wait mode allows
/// ([`Patience::Spin`]: a stream keeps moving without a wakeup through the keeper and the
/// runtime); on `WouldBlock`, registers the task and tries once more without spinning, so
/// that readiness that came between the attempt and the registration is not lost (the
/// callback of that readiness ran before the registration and woke nobody).
fn poll_io<T>(
    waker: &AtomicWaker,
    cx: &mut Context<'_>,
    mut attempt: impl FnMut(Patience) -> io::Result<T>,
) -> Poll<io::Result<T>> {
    match attempt(Patience::Spin) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        r => return Poll::Ready(r),
    }
    waker.register(cx.waker());
    match attempt(Patience::Now) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        r => Poll::Ready(r),
    }
}

impl Inner {
    fn new(session: Session) -> io::Result<Inner> {
        let wakers = Arc::new(SessionWakers::default());
        session.set_notify(wakers.notifier())?;
        Ok(Inner { session, wakers })
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let n = std::task::ready!(poll_io(&self.wakers.read, cx, |p| {
            self.session.read_shared(buf.initialize_unfilled(), p)
        }))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        poll_io(&self.wakers.write, cx, |p| {
            self.session.write_shared(buf, p)
        })
    }

    fn poll_write_vectored(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_io(&self.wakers.write, cx, |p| {
            self.session.write_vectored_shared(bufs, p)
        })
    }

    fn poll_shutdown(&self) -> Poll<io::Result<()>> {
        Poll::Ready(self.session.shutdown(Shutdown::Write))
    }
}

/// An async session: a socket-like byte stream (or message pipe) to the peer, as
/// [`Session`] but `tokio::io::AsyncRead + AsyncWrite`. See the [module docs](self) for
/// wakeups, errors and cancel safety.
///
/// `AsyncWriteExt::shutdown` is a half-close (the peer reads EOF, and can still write);
/// dropping the session closes it. Message sessions ([`SessionOptions::message`]) keep
/// the boundary of each write (a vectored write is one message); once the peer's credit
/// admits a message, its write may wait briefly for ring space, as a message is never
/// abandoned half way.
pub struct AsyncSession {
    inner: Inner,
}

impl std::fmt::Debug for AsyncSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AsyncSession")
            .field(&self.inner.session)
            .finish()
    }
}

impl AsyncSession {
    /// Opens a stream session to the peer's listener on `port`: waits (without
    /// blocking a thread) for the link to come up and for the peer to answer, at most
    /// [`Config::connect_timeout`](crate::Config::connect_timeout) (`TimedOut`);
    /// `ConnectionRefused` when nothing listens there. Needs a runtime with the time
    /// driver (for that timeout).
    ///
    /// Cancel safe: a dropped connect withdraws its open request.
    pub async fn connect(endpoint: &Endpoint, port: u32) -> io::Result<AsyncSession> {
        AsyncSession::connect_with(endpoint, port, SessionOptions::default()).await
    }

    /// [`AsyncSession::connect`] with options.
    pub async fn connect_with(
        endpoint: &Endpoint,
        port: u32,
        opts: SessionOptions,
    ) -> io::Result<AsyncSession> {
        let wakers = Arc::new(SessionWakers::default());
        let mut connecting = endpoint.connect_nonblocking(port, opts, wakers.notifier());
        let deadline = ::tokio::time::Instant::from_std(connecting.deadline());
        let answered = poll_fn(|cx| {
            // Registered before the attempt: an answer that comes during it wakes us.
            wakers.write.register(cx.waker());
            match connecting.poll_connect() {
                Ok(Some(s)) => Poll::Ready(Ok(s)),
                Ok(None) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            }
        });
        match ::tokio::time::timeout_at(deadline, answered).await {
            // The session's callback is already `wakers`' (given to the connect).
            Ok(Ok(session)) => Ok(AsyncSession {
                inner: Inner { session, wakers },
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("ivring: connect to port {port} timed out (the peer did not answer)"),
            )),
        }
    }

    /// Wraps a session (of either role, accepted or connected): makes it non-blocking
    /// and takes its readiness callback. `ConnectionReset` if the link has reset since
    /// it was opened.
    pub fn from_session(mut session: Session) -> io::Result<AsyncSession> {
        session.set_nonblocking(true);
        Ok(AsyncSession {
            inner: Inner::new(session)?,
        })
    }

    /// The session id (unique on this link for the life of the process).
    pub fn id(&self) -> u64 {
        self.inner.session.id()
    }

    /// The port the session was opened on.
    pub fn port(&self) -> u32 {
        self.inner.session.port()
    }

    /// Whether message boundaries are kept.
    pub fn is_message(&self) -> bool {
        self.inner.session.is_message()
    }

    /// Borrowed halves, to read and write at once (say with `tokio::join!`) in one task.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (
            ReadHalf { inner: &self.inner },
            WriteHalf { inner: &self.inner },
        )
    }

    /// Owned halves, to read and write from two tasks. Dropping the write half shuts the
    /// write direction down (the peer reads EOF); the session closes when both are gone.
    pub fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        let inner = Arc::new(self.inner);
        (
            OwnedReadHalf {
                inner: inner.clone(),
            },
            OwnedWriteHalf {
                inner,
                shutdown_on_drop: true,
            },
        )
    }
}

impl TryFrom<Session> for AsyncSession {
    type Error = io::Error;
    fn try_from(session: Session) -> io::Result<AsyncSession> {
        AsyncSession::from_session(session)
    }
}

impl AsyncRead for AsyncSession {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for AsyncSession {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Writes go straight to the ring: nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A half-close: the peer reads EOF after the data sent before.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_shutdown()
    }
}

/// The read half of [`AsyncSession::split`].
#[derive(Debug)]
pub struct ReadHalf<'a> {
    inner: &'a Inner,
}

/// The write half of [`AsyncSession::split`]; `shutdown` is a half-close.
#[derive(Debug)]
pub struct WriteHalf<'a> {
    inner: &'a Inner,
}

/// The read half of [`AsyncSession::into_split`].
#[derive(Debug)]
pub struct OwnedReadHalf {
    inner: Arc<Inner>,
}

/// The write half of [`AsyncSession::into_split`]. Dropping it shuts the write
/// direction down (the peer reads EOF), as tokio's `TcpStream` halves do.
#[derive(Debug)]
pub struct OwnedWriteHalf {
    inner: Arc<Inner>,
    shutdown_on_drop: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.session.fmt(f)
    }
}

/// [`OwnedReadHalf::reunite`] was given halves of two different sessions.
#[derive(Debug)]
pub struct ReuniteError(pub OwnedReadHalf, pub OwnedWriteHalf);

impl std::fmt::Display for ReuniteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ivring: the halves are of two different sessions")
    }
}

impl std::error::Error for ReuniteError {}

impl OwnedReadHalf {
    /// The session back from its two halves (without shutting anything down).
    pub fn reunite(self, mut other: OwnedWriteHalf) -> Result<AsyncSession, ReuniteError> {
        if !Arc::ptr_eq(&self.inner, &other.inner) {
            return Err(ReuniteError(self, other));
        }
        other.shutdown_on_drop = false;
        let inner = other.inner.clone();
        drop(other);
        drop(self);
        match Arc::try_unwrap(inner) {
            Ok(inner) => Ok(AsyncSession { inner }),
            Err(_) => unreachable!("both halves were given back"),
        }
    }
}

impl OwnedWriteHalf {
    /// The session back from its two halves (see [`OwnedReadHalf::reunite`]).
    pub fn reunite(self, other: OwnedReadHalf) -> Result<AsyncSession, ReuniteError> {
        other.reunite(self)
    }
}

impl Drop for OwnedWriteHalf {
    fn drop(&mut self) {
        if self.shutdown_on_drop {
            // A reset or closed session needs no shutdown: nothing to report it to.
            let _ = self.inner.session.shutdown(Shutdown::Write);
        }
    }
}

macro_rules! read_half {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                self.inner.poll_read(cx, buf)
            }
        }
    };
}

macro_rules! write_half {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.inner.poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                self.inner.poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }

            fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.inner.poll_shutdown()
            }
        }
    };
}

read_half!(ReadHalf<'_>);
read_half!(OwnedReadHalf);
write_half!(WriteHalf<'_>);
write_half!(OwnedWriteHalf);

/// The tasks waiting to accept on one listener (any number of them: all are woken, and
/// those that find the backlog empty wait again).
#[derive(Default)]
struct AcceptWakers(Mutex<Vec<Waker>>);

impl AcceptWakers {
    fn register(&self, waker: &Waker) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
    }

    fn wake_all(&self) {
        let list = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for w in list {
            w.wake();
        }
    }
}

/// An async listener: accepts the sessions the peer opens on one port, as [`Listener`].
/// Dropping it stops listening and closes the sessions not yet accepted.
pub struct AsyncListener {
    listener: Listener,
    wakers: Arc<AcceptWakers>,
}

impl std::fmt::Debug for AsyncListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncListener")
            .field("port", &self.listener.port())
            .finish()
    }
}

impl AsyncListener {
    /// Listens on `port` of `endpoint` (`AddrInUse` if the port has a listener).
    pub fn bind(endpoint: &Endpoint, port: u32) -> io::Result<AsyncListener> {
        Ok(AsyncListener::from_listener(endpoint.listen(port)?))
    }

    /// Wraps a listener (say one made before [`Endpoint::attach`]), making it
    /// non-blocking and taking its readiness callback.
    pub fn from_listener(mut listener: Listener) -> AsyncListener {
        listener.set_nonblocking(true);
        let wakers = Arc::new(AcceptWakers::default());
        let w = wakers.clone();
        listener.set_notify(Arc::new(move || w.wake_all()));
        AsyncListener { listener, wakers }
    }

    /// The port.
    pub fn port(&self) -> u32 {
        self.listener.port()
    }

    /// Waits for the next session the peer opens. `NotConnected` once the endpoint is
    /// closed. Any number of tasks may wait at once.
    ///
    /// Cancel safe: a session is taken from the backlog only by the call that returns it,
    /// so a dropped accept loses none.
    pub async fn accept(&self) -> io::Result<AsyncSession> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Polls for the next session; on `Pending`, the task is woken when one may be there.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<AsyncSession>> {
        loop {
            let r = match self.listener.accept() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wakers.register(cx.waker());
                    match self.listener.accept() {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                        r => r,
                    }
                }
                r => r,
            };
            match r.and_then(AsyncSession::from_session) {
                // A session reset while it waited in the backlog (the link reset between
                // the pop and the wrap): nothing to hand out, take the next.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl From<Listener> for AsyncListener {
    fn from(listener: Listener) -> AsyncListener {
        AsyncListener::from_listener(listener)
    }
}

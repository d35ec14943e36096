//! Sockets over the link: [`Endpoint`], [`Listener`] and [`Session`], each a handle on
//! the runtime (`crate::runtime`), which drives the link (`crate::link`).

use crate::config::Config;
use crate::link::rx::{Lent, LEND_FROM, LEND_TOTAL_MIN};
use crate::link::tx::{step, Framed, WriteStep, COPY_UNLOCKED_MIN};
use crate::link::{reset_error, Actions, Link, State, Stats};
use crate::runtime::{DriveNext, Keeper, KeeperState, Patience, Shared, WaitOn};
use crate::shm::doorbell::Doorbell;
use crate::shm::layout::{LayoutError, Role};
use crate::shm::region::SharedRegion;
use std::io;
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Who runs the keeper, once attached.
    keeper: Mutex<Keeper>,
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
        let shared = Shared::new(role, region, doorbell, cfg)?;
        Ok(Endpoint {
            shared,
            keeper: Mutex::new(Keeper::None),
        })
    }

    /// Attaches (PROTOCOL.md §3) and starts following the peer. Does nothing if attached.
    pub fn attach(&self) {
        let mut keeper = self.keeper.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*keeper, Keeper::None) {
            return;
        }
        self.shared.attach();
        *keeper = Keeper::Thread(self.shared.spawn_keeper());
    }

    /// Attaches (PROTOCOL.md §3) without a keeper thread: the program runs the keeper's
    /// rounds through the returned [`Driver`], from a thread of its own that may drive
    /// many endpoints (one daemon serving many links). `None` if already attached.
    ///
    /// Nothing then waits on the doorbell but the driver: blocked callers of this
    /// endpoint sleep until the driver's rounds wake them, so their wakeups cost a hand-off
    /// more than with a keeper thread (async sessions, which never wait on the doorbell,
    /// lose nothing).
    pub fn attach_driven(&self) -> Option<Driver> {
        let mut keeper = self.keeper.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*keeper, Keeper::None) {
            return None;
        }
        self.shared.set_driven();
        self.shared.attach();
        *keeper = Keeper::Driven;
        Some(Driver {
            state: KeeperState::new(&self.shared),
            shared: self.shared.clone(),
        })
    }

    /// Whether both sides are attached and have acknowledged each other.
    pub fn is_up(&self) -> bool {
        self.shared.lock().is_up()
    }

    /// Waits until the link is up; `false` on timeout.
    pub fn wait_up(&self, timeout: Duration) -> bool {
        self.shared
            .wait_for(Some(Instant::now() + timeout), Patience::Wait, |l, _| {
                Ok(l.is_up().then_some(()))
            })
            .is_ok()
    }

    /// Counters about the peer's behaviour and the endpoint's wakeups, and the last link
    /// error.
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.lock().stats().clone();
        stats.late_wakeups = self.shared.late_wakeups();
        stats
    }

    /// Number of sessions open (or opening) on this link.
    pub fn session_count(&self) -> usize {
        self.shared.lock().session_count()
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
        self.shared.lock().max_payload()
    }

    /// Accepts sessions opened by the peer on `port`.
    pub fn listen(&self, port: u32) -> io::Result<Listener> {
        let mut link = self.shared.lock();
        if !link.listen(port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("ivring: port {port} already has a listener"),
            ));
        }
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
        sh.wait_for(Some(deadline), Patience::Wait, |l, _| {
            Ok(l.is_up().then_some(()))
        })
        .map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                "ivring: the peer is not attached to the shared region",
            ),
            _ => e,
        })?;
        let (id, gen) = {
            let mut link = sh.lock();
            let mut out = Actions::default();
            let id = link.open(port, opts.message, &mut out)?;
            let gen = link.gen();
            sh.act(&link, out);
            (id, gen)
        };
        let r = sh.wait_for(Some(deadline), Patience::Wait, |l, _| {
            if l.gen() != gen {
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
                if link.gen() == gen {
                    let mut out = Actions::default();
                    link.close(id, &mut out);
                    sh.act(&link, out);
                }
                Err(e)
            }
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let keeper = std::mem::replace(
            self.keeper.get_mut().unwrap_or_else(|x| x.into_inner()),
            Keeper::None,
        );
        self.shared.shut_down(keeper);
    }
}

/// Runs the keeper of an endpoint attached with [`Endpoint::attach_driven`]: the work a
/// keeper thread would do (follow the peer, read the ring, wake waiters, keep the
/// heartbeat), one round per call, so that one thread of the program can drive many
/// endpoints, each woken by its own doorbell and by one timer for all.
///
/// Call [`Driver::drive`] when the endpoint's doorbell has rung or was interrupted (drain
/// it first: a driven endpoint never waits on it itself), and no later than the deadline
/// the last call returned. Each call is a few microseconds and never blocks (it takes the
/// link's lock briefly). Dropping the driver stops nothing: the endpoint detaches when it
/// is dropped, and `drive` then returns `None`.
pub struct Driver {
    shared: Arc<Shared>,
    state: KeeperState,
}

impl Driver {
    /// One round (or a few, while each finds more work) of the keeper's work; when to run
    /// again. `None` once the endpoint is gone: forget the driver.
    pub fn drive(&mut self, now: Instant) -> Option<DriveNext> {
        self.shared.drive(&mut self.state, now)
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
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
        link.set_listener_notify(self.port, notify);
        self.shared.watch_for_callbacks();
    }

    fn accept_inner(&self, deadline: Option<Instant>) -> io::Result<Session> {
        let port = self.port;
        let sh = &self.shared;
        sh.wait_locked_on(
            WaitOn::Accept,
            deadline,
            Patience::nonblocking(self.nonblocking),
            |l, _| {
                let gen = l.gen();
                Ok(l.accept(port)
                    .map(|(id, message)| Session::new(sh.clone(), id, gen, port, message)))
            },
        )
        .map(|(_, s)| s)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut link = self.shared.lock();
        let mut out = Actions::default();
        link.unlisten(self.port, &mut out);
        self.shared.act(&link, out);
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
        if l.gen() != self.gen {
            return Err(reset_error(l));
        }
        Ok(())
    }

    /// Closes the read half, the write half, or both (as `TcpStream::shutdown`).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut link = self.shared.lock();
        self.check(&link)?;
        let mut out = Actions::default();
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            link.shutdown_write(self.id, &mut out)?;
        }
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            let s = link.session(self.id)?;
            s.rd_shut = true;
            // Discard and credit what is buffered.
            let mut sink = vec![0u8; 64 << 10];
            while let Some(n) = link.read_discard(self.id, &mut sink, &mut out)? {
                if n == 0 {
                    break;
                }
            }
        }
        self.shared.act(&link, out);
        Ok(())
    }

    pub(crate) fn deadline(t: Option<Duration>) -> Option<Instant> {
        t.map(|t| Instant::now() + t)
    }

    fn write_stream(&self, buf: &[u8], patience: Patience) -> io::Result<usize> {
        let id = self.id;
        let gen = self.gen;
        let unlocked = buf.len() >= COPY_UNLOCKED_MIN;
        let sh = &self.shared;
        let framed = sh.wait_session(
            id,
            Self::deadline(self.write_timeout),
            patience,
            |l, out| {
                if l.gen() != gen {
                    return Err(reset_error(l));
                }
                match step(l, id, buf, false, true, unlocked, out)? {
                    WriteStep::Wrote(f) => {
                        // With a thread waiting for the lock, the head is left to it
                        // (`LinkGuard`): many queued writers, one store.
                        if let Framed::Copied(_) = f {
                            if !sh.leave_head(l) {
                                l.publish(out);
                            }
                        }
                        Ok(Some(f))
                    }
                    WriteStep::Wait => Ok(None),
                }
            },
        )?;
        Ok(self.finish_frame(framed, buf))
    }

    /// Copies a reserved frame's payload (outside the lock); the bytes written.
    fn finish_frame(&self, framed: Framed, buf: &[u8]) -> usize {
        match framed {
            Framed::Copied(n) => n,
            Framed::Reserved(slot, n) => {
                self.shared.copy_reserved(slot, &buf[..n]);
                n
            }
        }
    }

    /// Writes the slices as consecutive frames and publishes them with one store of the
    /// head (one ring of the peer at most): what fits now, at least one byte once the
    /// call may return.
    fn write_stream_vectored(
        &self,
        bufs: &[io::IoSlice<'_>],
        patience: Patience,
    ) -> io::Result<usize> {
        let id = self.id;
        let gen = self.gen;
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        self.shared.wait_session(
            id,
            Self::deadline(self.write_timeout),
            patience,
            |l, out| {
                if l.gen() != gen {
                    return Err(reset_error(l));
                }
                let mut total = 0;
                for b in bufs.iter().filter(|b| !b.is_empty()) {
                    // Every frame copied under the lock: the slices go out with one
                    // store of the head.
                    match step(l, id, b, false, true, false, out) {
                        Ok(WriteStep::Wrote(Framed::Copied(n))) => {
                            total += n;
                            if n < b.len() {
                                break;
                            }
                        }
                        Ok(WriteStep::Wait | WriteStep::Wrote(Framed::Reserved(..))) => break,
                        // What was written is reported; the error comes again next call.
                        Err(_) if total > 0 => break,
                        Err(e) => return Err(e),
                    }
                }
                if total == 0 {
                    return Ok(None);
                }
                l.publish(out);
                Ok(Some(total))
            },
        )
    }

    fn write_message(&self, buf: &[u8], patience: Patience) -> io::Result<usize> {
        let id = self.id;
        let gen = self.gen;
        let sh = self.shared.clone();
        let deadline = Self::deadline(self.write_timeout);
        // The whole message's credit first, so the peer can always take all of it.
        let first = sh.wait_session(id, deadline, patience, |l, out| {
            if l.gen() != gen {
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
            if s.credit() < buf.len() as u64 {
                return Ok(None);
            }
            // The first frame goes in the same pass: a message that fits one frame
            // takes one pass through the lock, as a stream write does.
            match step(l, id, buf, true, false, buf.len() >= COPY_UNLOCKED_MIN, out)? {
                WriteStep::Wrote(f) => {
                    if matches!(f, Framed::Copied(n) if n == buf.len()) && !sh.leave_head(l) {
                        l.publish(out);
                    }
                    Ok(Some(Some(f)))
                }
                WriteStep::Wait => {
                    l.publish(out);
                    Ok(Some(None))
                }
            }
        })?;
        let mut off = 0;
        if let Some(f) = first {
            off = self.finish_frame(f, buf);
            if off == buf.len() {
                // Published: under the lock (or by the thread it was left to), or by the
                // last copy of a reserved frame.
                return Ok(off);
            }
        }
        loop {
            // A message may not be abandoned half way, yet a peer that granted credit
            // and then stopped reading must not hold us past the deadline: at the
            // deadline with part of the message sent, the session is reset.
            let r = sh.wait_session(id, deadline, Patience::Wait, |l, out| {
                if l.gen() != gen {
                    return Err(reset_error(l));
                }
                match step(
                    l,
                    id,
                    &buf[off..],
                    true,
                    false,
                    buf.len() - off >= COPY_UNLOCKED_MIN,
                    out,
                )? {
                    WriteStep::Wrote(f) => Ok(Some(f)),
                    WriteStep::Wait => {
                        l.publish(out);
                        Ok(None)
                    }
                }
            });
            let n = match r {
                Ok(f) => self.finish_frame(f, &buf[off..]),
                Err(e) => {
                    let mut link = sh.lock();
                    if off > 0 && e.kind() == io::ErrorKind::TimedOut && link.gen() == gen {
                        let mut out = Actions::default();
                        match link.reset_session(id, "message write timed out half way", &mut out) {
                            Ok(()) => {
                                link.publish(&mut out);
                                sh.act(&link, out);
                            }
                            Err(f) => sh.fault(&mut link, f),
                        }
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
        let mut out = Actions::default();
        link.publish(&mut out);
        sh.act(&link, out);
        Ok(buf.len())
    }
}

impl Session {
    /// Reads from whichever of `sessions` (all of one endpoint) has data first, in the order
    /// the peer sent it, as `recvmsg` on an unconnected socket: the event loop over many
    /// sessions without a poll of each. A frame that fits `buf` is copied once, straight
    /// out of the ring. Returns which session (its index in `sessions`) and what a read
    /// of it returned: bytes, `Ok(0)` at its EOF, or its error (`ConnectionReset`, ...).
    ///
    /// A session at its EOF reads `Ok(0)` again each time, as a socket does: an event
    /// loop takes it out of the set it passes.
    ///
    /// Waits up to `timeout` (`None`: for ever; `Some(Duration::ZERO)`: not at all, then
    /// `WouldBlock`), spinning first as the wait mode says; `TimedOut` when it passes.
    /// `InvalidInput` when `sessions` is empty or holds sessions of two endpoints.
    pub fn read_any(
        sessions: &[&Session],
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> io::Result<(usize, io::Result<usize>)> {
        let mut got = Vec::with_capacity(1);
        Self::read_any_up_to(sessions, buf, 1, &mut got, timeout)?;
        got.pop()
            .ok_or_else(|| io::Error::other("ivring: read_any returned nothing"))
    }

    /// As [`Session::read_any`], many frames at once, as `recvmmsg`: every frame of
    /// `sessions` in ring order that fits what is left of `buf` (a message whole in one
    /// frame is one result), up to the first that a batch cannot take (it does not fit,
    /// it ends its session, or it starts a message of several frames: the next call
    /// returns it). `got` is cleared, then gets one (index in `sessions`, read) per result, in
    /// order; the bytes of each `Ok(n)` follow those of the results before it in `buf`.
    /// Returns how many results there are (at least one). One lock, one index store and
    /// one doorbell for the whole batch: an event loop over many sessions moves small
    /// frames at the cost of one session's large reads.
    pub fn read_any_many(
        sessions: &[&Session],
        buf: &mut [u8],
        got: &mut Vec<(usize, io::Result<usize>)>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        Self::read_any_up_to(sessions, buf, usize::MAX, got, timeout)
    }

    fn read_any_up_to(
        sessions: &[&Session],
        buf: &mut [u8],
        max: usize,
        got: &mut Vec<(usize, io::Result<usize>)>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        got.clear();
        let Some(first) = sessions.first() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ivring: read_any takes one or more sessions",
            ));
        };
        let shared = &first.shared;
        if sessions.iter().any(|s| !Arc::ptr_eq(&s.shared, shared)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ivring: read_any takes sessions of one endpoint",
            ));
        }
        let ids: Vec<u64> = sessions.iter().map(|s| s.id).collect();
        let patience = if timeout == Some(Duration::ZERO) {
            Patience::Now
        } else {
            Patience::Wait
        };
        shared
            .wait_locked_on(
                WaitOn::Link,
                Session::deadline(timeout),
                patience,
                |l, out| {
                    // Sessions the link's reset ended: what the peer sent before it, then
                    // their error, as their own reads give.
                    for (i, s) in sessions.iter().enumerate() {
                        if l.gen() != s.gen {
                            got.push(match l.read_ended(s.gen, s.id, buf) {
                                Some(n) => (i, Ok(n)),
                                None => (i, Err(reset_error(l))),
                            });
                            return Ok(Some(1));
                        }
                    }
                    l.read_any(&ids, buf, max, got, out);
                    Ok((!got.is_empty()).then_some(got.len()))
                },
            )
            .map(|(_, n)| n)
    }

    /// A read through a shared reference, for the async and event-loop wrappers (whose
    /// read and write halves work one session from two tasks).
    pub(crate) fn read_shared(&self, buf: &mut [u8], patience: Patience) -> io::Result<usize> {
        let id = self.id;
        let gen = self.gen;
        // Frames of 1 KiB and more are lent by the read and copied out after it, without
        // the lock, when the buffer has room for enough of them to pay for the second
        // pass through the lock (the size from which a write copies outside it).
        let mut lent =
            (buf.len() >= COPY_UNLOCKED_MIN).then(|| Lent::new(LEND_FROM, LEND_TOTAL_MIN));
        let read =
            self.shared
                .wait_session(id, Self::deadline(self.read_timeout), patience, |l, out| {
                    if l.gen() != gen {
                        // Data and EOF the peer sent before the link reset are still read.
                        return match l.read_ended(gen, id, buf) {
                            Some(n) => Ok(Some(n)),
                            None => Err(reset_error(l)),
                        };
                    }
                    if let Some(n) = l.read_direct(id, buf, lent.as_mut(), out)? {
                        return Ok(Some(n));
                    }
                    l.read(id, buf, out)
                });
        match lent.as_mut().and_then(Lent::take) {
            None => read,
            Some((loan, copies)) => self.shared.copy_lent(gen, loan, copies, buf, read),
        }
    }

    /// A vectored write through a shared reference: a stream session's slices go out as
    /// consecutive frames published at once; a message session's make one message (as
    /// `writev` on a `SOCK_SEQPACKET` socket).
    pub(crate) fn write_vectored_shared(
        &self,
        bufs: &[io::IoSlice<'_>],
        patience: Patience,
    ) -> io::Result<usize> {
        if self.message {
            let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.write_shared(&whole, patience)
        } else {
            self.write_stream_vectored(bufs, patience)
        }
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

    /// Stream sessions: the slices go out as consecutive frames, published with one
    /// store of the ring's head (one doorbell ring at most), which makes many small
    /// writes cheaper than one call each. Message sessions: one message of all the slices.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.write_vectored_shared(bufs, Patience::nonblocking(self.nonblocking))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads through a shared reference (as `&TcpStream`): one thread may read while another
/// writes the same session, each waiting as the session's timeouts and blocking mode say.
impl io::Read for &Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_shared(buf, Patience::nonblocking(self.nonblocking))
    }
}

/// Writes through a shared reference (as `&TcpStream`).
impl io::Write for &Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_shared(buf, Patience::nonblocking(self.nonblocking))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.write_vectored_shared(bufs, Patience::nonblocking(self.nonblocking))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut link = self.shared.lock();
        if link.gen() == self.gen {
            let mut out = Actions::default();
            link.close(self.id, &mut out);
            self.shared.act(&link, out);
        } else {
            link.forget_ended(self.gen, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{wire::mock::pattern, Config, Endpoint, WaitMode};
    use std::io::{Read, Write};
    use std::time::Duration;

    /// A host and a guest endpoint over 256 KiB of heap, 16 KiB session buffers.
    fn heap_pair(wait: WaitMode) -> (Endpoint, Endpoint) {
        let cfg = Config {
            wait,
            buf_size: 16 << 10,
            ..Config::default()
        };
        crate::test_watchdog::endpoint_pair(256 << 10, cfg)
    }

    /// Writes `total` pattern bytes of session `id` through `s`.
    fn send(mut s: &crate::Session, id: u64, total: u64) {
        let mut buf = vec![0u8; 3000];
        let mut pos = 0;
        while pos < total {
            let n = (total - pos).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(id, pos + i as u64);
            }
            s.write_all(&buf[..n]).unwrap();
            pos += n as u64;
        }
    }

    /// Reads `total` pattern bytes of session `id` through `s`, checking each.
    fn receive(mut s: &crate::Session, id: u64, total: u64) {
        let mut buf = vec![0u8; 5000];
        let mut pos = 0;
        while pos < total {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {pos} of {total} bytes");
            for (i, &b) in buf[..n].iter().enumerate() {
                assert_eq!(b, pattern(id, pos + i as u64), "byte {}", pos + i as u64);
            }
            pos += n as u64;
        }
    }

    /// An event loop over many sessions with `read_any`: stream and message sessions
    /// interleaved in one ring, frames larger and smaller than the buffer, every byte in
    /// order per session, every message whole, each EOF reported once, in every mode.
    #[test]
    fn read_any_serves_many_sessions_in_order_with_their_eofs() {
        let _watchdog = crate::test_watchdog::watchdog(
            "read_any_serves_many_sessions_in_order_with_their_eofs",
            20,
        );
        read_any_loop(6, false);
    }

    /// As above with `read_any_many`, over more sessions than a set scans for its ids:
    /// every byte in order, every message whole and alone, each EOF once at the end.
    #[test]
    fn read_any_many_batches_frames_of_many_sessions_and_keeps_messages_whole() {
        let _watchdog = crate::test_watchdog::watchdog(
            "read_any_many_batches_frames_of_many_sessions_and_keeps_messages_whole",
            20,
        );
        read_any_loop(20, true);
    }

    /// Frames of many sessions already in the ring come out of `read_any_many` many to a
    /// call, each session's bytes in order, never more than the buffer holds.
    #[test]
    fn read_any_many_takes_what_is_waiting_in_few_calls() {
        let _watchdog =
            crate::test_watchdog::watchdog("read_any_many_takes_what_is_waiting_in_few_calls", 20);
        for wait in [WaitMode::Poll, WaitMode::Block, WaitMode::Adaptive] {
            let (host, guest) = heap_pair(wait);
            let l = guest.listen(9).unwrap();
            let n = 20;
            let mut tx = Vec::new();
            let mut rx = Vec::new();
            for _ in 0..n {
                tx.push(host.connect(9).unwrap());
                rx.push(l.accept().unwrap());
            }
            // Three rounds of 1000 bytes to each: 60 frames, within every window.
            for round in 0..3u64 {
                for (k, s) in tx.iter_mut().enumerate() {
                    let data: Vec<u8> = (0..1000)
                        .map(|j| pattern(k as u64, round * 1000 + j))
                        .collect();
                    s.write_all(&data).unwrap();
                }
            }
            let set: Vec<&crate::Session> = rx.iter().collect();
            let mut got = vec![Vec::new(); n];
            let mut results = Vec::new();
            // Room for two and a half frames.
            let mut buf = vec![0u8; 2500];
            let mut calls = 0;
            while got.iter().map(Vec::len).sum::<usize>() < 3 * 1000 * n {
                let count = crate::Session::read_any_many(
                    &set,
                    &mut buf,
                    &mut results,
                    Some(Duration::from_secs(20)),
                )
                .unwrap();
                calls += 1;
                assert!(count >= 1, "a batch returns at least one result");
                let mut at = 0;
                for (i, r) in results.drain(..) {
                    let m = r.unwrap();
                    got[i].extend_from_slice(&buf[at..at + m]);
                    at += m;
                }
                assert!(at <= buf.len(), "{at} bytes in a buffer of {}", buf.len());
            }
            assert!(
                calls < 3 * n,
                "{calls} calls for {} frames in {wait:?}",
                3 * n
            );
            for (k, g) in got.iter().enumerate() {
                assert!(
                    g.iter()
                        .enumerate()
                        .all(|(j, &b)| b == pattern(k as u64, j as u64)),
                    "session {k} bytes in {wait:?}"
                );
            }
        }
    }

    /// An event loop reads `n` sessions (even ones streams, odd ones messages) with
    /// `read_any`, or with `read_any_many` when `batch`, in each wait mode.
    fn read_any_loop(n: usize, batch: bool) {
        for wait in [WaitMode::Poll, WaitMode::Block, WaitMode::Adaptive] {
            let (host, guest) = heap_pair(wait);
            let l = guest.listen(9).unwrap();
            let mut tx = Vec::new();
            let mut rx = Vec::new();
            for k in 0..n {
                let opts = crate::SessionOptions {
                    message: k % 2 == 1,
                };
                tx.push(host.connect_with(9, opts).unwrap());
                rx.push(l.accept().unwrap());
            }
            let writer = std::thread::spawn(move || {
                let mut pos = vec![0u64; tx.len()];
                let mut lens = vec![Vec::new(); tx.len()];
                for round in 0..400usize {
                    let k = round * 7 % tx.len();
                    let len = 1 + round * 131 % 7000;
                    let data: Vec<u8> = (0..len as u64)
                        .map(|j| pattern(k as u64, pos[k] + j))
                        .collect();
                    tx[k].write_all(&data).unwrap();
                    pos[k] += len as u64;
                    lens[k].push(len);
                }
                (pos, lens)
            });
            // The loop's set: a session leaves it at its EOF (which it would report again).
            let mut open: Vec<usize> = (0..n).collect();
            let mut got = vec![Vec::new(); n];
            let mut msg_lens = vec![Vec::new(); n];
            let mut eof = vec![false; n];
            // Messages are at most 7000 bytes: a read of 8 KiB takes each whole.
            let mut buf = vec![0u8; 8 << 10];
            let mut results = Vec::new();
            // The writer drops its sessions when done: each ends with EOF.
            while !open.is_empty() {
                let set: Vec<&crate::Session> = open.iter().map(|&k| &rx[k]).collect();
                let timeout = Some(Duration::from_secs(20));
                if batch {
                    let count =
                        crate::Session::read_any_many(&set, &mut buf, &mut results, timeout)
                            .unwrap();
                    assert_eq!(count, results.len());
                    assert!(count >= 1, "a batch returns at least one result");
                } else {
                    results.clear();
                    results.push(crate::Session::read_any(&set, &mut buf, timeout).unwrap());
                }
                let mut at = 0;
                let mut ended = Vec::new();
                for (i, r) in results.drain(..) {
                    let k = open[i];
                    assert!(!eof[k], "a result after EOF on session {k}");
                    match r.unwrap() {
                        0 => {
                            eof[k] = true;
                            ended.push(i);
                        }
                        m => {
                            got[k].extend_from_slice(&buf[at..at + m]);
                            if k % 2 == 1 {
                                msg_lens[k].push(m);
                            }
                            at += m;
                        }
                    }
                }
                ended.sort_unstable();
                for i in ended.into_iter().rev() {
                    open.remove(i);
                }
            }
            let (sent, lens) = writer.join().unwrap();
            for k in 0..n {
                assert_eq!(got[k].len() as u64, sent[k], "session {k} in {wait:?}");
                assert!(
                    got[k]
                        .iter()
                        .enumerate()
                        .all(|(j, &b)| b == pattern(k as u64, j as u64)),
                    "session {k} bytes in {wait:?}"
                );
                if k % 2 == 1 {
                    assert_eq!(msg_lens[k], lens[k], "session {k}'s messages in {wait:?}");
                }
            }
            let all: Vec<&crate::Session> = rx.iter().collect();
            assert!(
                matches!(
                    crate::Session::read_any(&all, &mut buf, Some(Duration::ZERO)),
                    Ok((_, Ok(0)))
                ),
                "a session at EOF reads EOF again"
            );
        }
    }

    /// A session read and written at once from two threads on each side, through shared
    /// references: every byte arrives, in order, both ways, in every wait mode.
    #[test]
    fn a_session_is_read_and_written_at_once_through_shared_references() {
        let _watchdog = crate::test_watchdog::watchdog(
            "a_session_is_read_and_written_at_once_through_shared_references",
            20,
        );
        for wait in [WaitMode::Poll, WaitMode::Block, WaitMode::Adaptive] {
            let (host, guest) = heap_pair(wait);
            let l = guest.listen(9).unwrap();
            let mut h = host.connect(9).unwrap();
            let mut g = l.accept().unwrap();
            for s in [&mut h, &mut g] {
                s.set_read_timeout(Some(Duration::from_secs(30)));
                s.set_write_timeout(Some(Duration::from_secs(30)));
            }
            let total = 4 << 20;
            std::thread::scope(|t| {
                t.spawn(|| send(&h, 1, total));
                t.spawn(|| receive(&h, 2, total));
                t.spawn(|| send(&g, 2, total));
                t.spawn(|| receive(&g, 1, total));
            });
        }
    }
}

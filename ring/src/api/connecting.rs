//! Connecting without blocking: [`Endpoint::connect_nonblocking`] and [`Connecting`], for
//! event loops and async runtimes.

use crate::api::endpoint::Session;
use crate::link::reset_error;
use crate::link::{Actions, Notifier, State};
use crate::runtime::Shared;
use crate::{Endpoint, SessionOptions};
use std::io;
use std::sync::Arc;
use std::time::Instant;

/// A session being opened: [`Connecting::poll_connect`] finishes it without blocking.
///
/// The callback given to [`Endpoint::connect_nonblocking`] runs whenever
/// `poll_connect` may have something new to say (the link came up, the peer accepted
/// or refused, the link reset, the endpoint closed), and stays the session's readiness
/// callback afterwards (as [`Session::set_notify`]). Dropping a `Connecting` that has
/// not finished withdraws the open: the peer sees the session closed.
pub struct Connecting {
    shared: Arc<Shared>,
    port: u32,
    opts: SessionOptions,
    notify: Notifier,
    deadline: Instant,
    /// The session id and link generation, once the open is sent (the link was up).
    opened: Option<(u64, u64)>,
    /// Our entry among the link-up callbacks while the link is down.
    up_token: Option<u64>,
    /// A session or an error was returned.
    done: bool,
}

impl Endpoint {
    /// Starts opening a session to the peer's listener on `port` without blocking.
    /// `notify` must be cheap and must not call into the endpoint (it runs with the link
    /// locked). Nothing times out by itself: [`Connecting::deadline`] is when the
    /// blocking [`Endpoint::connect`] would give up (`Config::connect_timeout`), for the
    /// caller's own timer.
    pub fn connect_nonblocking(
        &self,
        port: u32,
        opts: SessionOptions,
        notify: Arc<dyn Fn() + Send + Sync>,
    ) -> Connecting {
        let shared = self.shared().clone();
        shared.watch_for_callbacks();
        Connecting {
            deadline: Instant::now() + shared.cfg.connect_timeout,
            shared,
            port,
            opts,
            notify,
            opened: None,
            up_token: None,
            done: false,
        }
    }
}

impl Connecting {
    /// When a blocking connect would have failed with `TimedOut`.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The port being connected to.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// `Ok(Some(session))` once the peer accepted, `Ok(None)` while waiting (the callback
    /// runs when that may change), or the error a blocking connect would give:
    /// `ConnectionRefused` when nothing listens on the port, `ConnectionReset` when the
    /// link reset meanwhile, `NotConnected` when the endpoint closed. Once it has
    /// returned a session or an error, it returns `NotConnected`.
    pub fn poll_connect(&mut self) -> io::Result<Option<Session>> {
        if self.done {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "ivring: connect already finished",
            ));
        }
        let r = self.attempt();
        if !matches!(r, Ok(None)) {
            self.done = true;
        }
        r
    }

    fn attempt(&mut self) -> io::Result<Option<Session>> {
        let sh = self.shared.clone();
        let mut link = sh.lock();
        if link.is_closed() {
            self.withdraw(&mut link);
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "ivring: endpoint closed",
            ));
        }
        // What the peer sent may be the answer: move the ring once, as non-blocking
        // calls do, rather than wait for the keeper.
        sh.pump_and_wake(&mut link, Instant::now());
        let Some((id, gen)) = self.opened else {
            if !link.is_up() {
                if self.up_token.is_none() {
                    self.up_token = Some(link.on_up(self.notify.clone()));
                }
                return Ok(None);
            }
            if let Some(t) = self.up_token.take() {
                link.cancel_on_up(t);
            }
            let mut out = Actions::default();
            let id = link.open(self.port, self.opts.message, &mut out)?;
            let gen = link.gen();
            link.session(id)?.notify = Some(self.notify.clone());
            self.opened = Some((id, gen));
            sh.act(&link, out);
            return Ok(None);
        };
        if link.gen() != gen {
            self.opened = None;
            return Err(reset_error(&link));
        }
        let state = match link.session(id) {
            Ok(s) => s.state.clone(),
            Err(e) => {
                self.withdraw(&mut link);
                return Err(e);
            }
        };
        match state {
            State::Connecting => Ok(None),
            State::Open => {
                self.opened = None;
                drop(link);
                Ok(Some(Session::new(
                    sh,
                    id,
                    gen,
                    self.port,
                    self.opts.message,
                )))
            }
            State::Refused | State::Reset(_) => {
                // (A reset session is reported by `session` above.)
                self.withdraw(&mut link);
                Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "ivring: port {} refused the session (nothing listens there, or its backlog or the session limit is full)",
                        self.port
                    ),
                ))
            }
        }
    }

    /// Forgets the open (closing the session if it was sent) and the link-up callback.
    fn withdraw(&mut self, link: &mut crate::link::Link) {
        if let Some(t) = self.up_token.take() {
            link.cancel_on_up(t);
        }
        if let Some((id, gen)) = self.opened.take() {
            if link.gen() == gen {
                let mut out = Actions::default();
                link.close(id, &mut out);
                self.shared.act(link, out);
            }
        }
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if self.opened.is_none() && self.up_token.is_none() {
            return;
        }
        let sh = self.shared.clone();
        let mut link = sh.lock();
        self.withdraw(&mut link);
    }
}

impl std::fmt::Debug for Connecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connecting")
            .field("port", &self.port)
            .field("opened", &self.opened)
            .finish()
    }
}

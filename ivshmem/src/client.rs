//! An ivshmem client that joins a server as QEMU does (see `IVSHMEM.md`, "The ivshmem
//! server protocol"), and the eventfd [`Doorbell`] built on what it receives.
//!
//! After the handshake a background thread keeps reading the socket for joins and leaves.
//! It never writes: the server takes any readability of our socket as our leaving.

use crate::error::{HostError, Result};
use crate::sys::{self, EventFd};
use ivring::{Doorbell, SharedRegion};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a [`Client`] joins.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long the whole handshake may take.
    pub handshake_timeout: Duration,
    /// Accept shared memory that is not sealed against shrinking: a plain memfd or POSIX
    /// shm object (QEMU's `ivshmem-server -M`) or a file (`-m DIR`). Only for a server
    /// you trust: any process holding the fd can shrink it. Such a mapping is guarded: a
    /// touch of a shrunk page, which would raise SIGBUS, replaces the mapping with private
    /// memory and ends the link instead of the process ([`Client::memory_lost`]).
    pub allow_unsealed: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            handshake_timeout: Duration::from_secs(5),
            allow_unsealed: false,
        }
    }
}

/// After our own first vector, messages still arriving within this quiet period belong to
/// the handshake (the protocol does not say how many vectors there are).
const HANDSHAKE_QUIET: Duration = Duration::from_millis(50);

/// A server sends the whole handshake at once. When nothing follows the shared memory for
/// this long, it has no vectors for us (QEMU's `ivshmem-server -n 0`): no doorbells.
const NO_VECTORS_QUIET: Duration = Duration::from_millis(250);

/// A peer of an ivshmem server: our id, the shared memory, and the doorbell.
#[derive(Debug)]
pub struct Client {
    id: u16,
    region: SharedRegion,
    path: PathBuf,
    bell: Arc<ClientDoorbell>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// The eventfd doorbell of a [`Client`]: rings other peers' vector 0 and waits on ours.
///
/// From a server with no vectors it has nothing to ring or wait on: waits are short
/// sleeps and [`Doorbell::can_wait`] is false, so the link polls; and as such a server
/// announces no joins, [`Doorbell::peer_present`] cannot tell and says `None`.
#[derive(Debug)]
pub struct ClientDoorbell {
    id: u16,
    /// Our vector 0: the others ring it. `None` from a server without vectors.
    own0: Option<EventFd>,
    /// Our other vectors, kept open (not waited on).
    own_more: Mutex<Vec<EventFd>>,
    /// Private: [`Doorbell::interrupt`] and membership changes signal it.
    intr: EventFd,
    /// Epoll instances watching `own0` and `intr` edge-triggered, one per waiter at a
    /// time (the keeper and a caller on the bell may wait at once): a wait is one
    /// `epoll_wait`, where a `poll` then a `read` to drain cost a 64-byte round trip
    /// in block mode about 0.9 us of its 13 (a C ping-pong of the two ways to wait).
    /// Each instance sees every ring, as each `poll` did.
    waits: Mutex<Vec<sys::Epoll>>,
    peers: Mutex<BTreeMap<u16, Vec<EventFd>>>,
    changed: Condvar,
    server_alive: AtomicBool,
    /// The memory was shrunk under us and replaced by private memory: the link is over.
    memory_lost: AtomicBool,
}

/// The server's first three messages (QEMU's ivshmem-spec): the protocol version (0), our
/// peer id, and the shared memory (-1 with its fd). Our id and the memory's fd.
fn read_greeting(path: &Path, sock: &UnixStream, deadline: Instant) -> Result<(u16, OwnedFd)> {
    let proto = |detail: &str| HostError::Protocol {
        path: path.to_path_buf(),
        detail: detail.into(),
    };
    let next = |what: &str| -> Result<(i64, Option<OwnedFd>)> {
        let left = deadline.saturating_duration_since(Instant::now());
        if !sys::poll_readable(&[sock.as_fd()], Some(left))?[0] {
            return Err(HostError::HandshakeTimeout {
                path: path.to_path_buf(),
            });
        }
        sys::recv_msg(sock.as_fd())?.ok_or_else(|| {
            proto(&format!(
                "the server closed the connection before sending {what}"
            ))
        })
    };
    match next("the protocol version")? {
        (0, None) => {}
        (version, None) => {
            return Err(HostError::BadVersion {
                path: path.to_path_buf(),
                version,
            })
        }
        _ => return Err(proto("the version message carried an fd")),
    }
    let id = match next("our peer id")? {
        (id, None) => u16::try_from(id).map_err(|_| proto(&format!("bad peer id ({id})")))?,
        _ => return Err(proto("the peer id message carried an fd")),
    };
    match next("the shared memory")? {
        (-1, Some(fd)) => Ok((id, fd)),
        _ => Err(proto("expected the shared memory (-1 with an fd)")),
    }
}

impl Client {
    /// Joins the ivshmem server at `path` with [`ConnectOptions::default`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Self::connect_with(path, &ConnectOptions::default())
    }

    /// The shared memory of the ivshmem server at `path`, for looking at a link from
    /// outside: joins, takes the memory from the handshake and leaves at once, without
    /// waiting for the eventfds or ever ringing anyone. The server, and through it every
    /// peer (QEMU included), still sees a peer join and leave: the protocol has no other
    /// way to hand out the memory. Checks the seals as [`Client::connect_with`] does.
    pub fn fetch_memory(path: impl AsRef<Path>, opts: &ConnectOptions) -> Result<OwnedFd> {
        let path = path.as_ref().to_path_buf();
        let sock = Self::connect_socket(&path)?;
        let deadline = Instant::now() + opts.handshake_timeout;
        let (_, memfd) = read_greeting(&path, &sock, deadline)?;
        if !opts.allow_unsealed {
            sys::check_memfd(memfd.as_fd(), "the ivshmem server's shared memory")?;
        }
        Ok(memfd)
    }

    /// Connects to the server's socket, saying what is wrong with the path if it fails.
    fn connect_socket(path: &Path) -> Result<UnixStream> {
        UnixStream::connect(path).map_err(|e| {
            use std::os::unix::fs::FileTypeExt;
            match std::fs::metadata(path) {
                Ok(md) if !md.file_type().is_socket() => HostError::NotAServerSocket {
                    path: path.to_path_buf(),
                },
                Err(_) if e.kind() == std::io::ErrorKind::NotFound => HostError::NoServer {
                    path: path.to_path_buf(),
                },
                _ => HostError::io(
                    format!(
                        "connect to ivshmem server {} (is it running?)",
                        path.display()
                    ),
                    e,
                ),
            }
        })
    }

    /// Joins the ivshmem server at `path`: reads the version (must be 0), our id, the
    /// shared memory (validated and mapped), the other peers' and our own eventfds.
    pub fn connect_with(path: impl AsRef<Path>, opts: &ConnectOptions) -> Result<Client> {
        let path = path.as_ref().to_path_buf();
        let sock = Self::connect_socket(&path)?;
        let deadline = Instant::now() + opts.handshake_timeout;
        let (id, shm) = read_greeting(&path, &sock, deadline)?;
        let proto = |detail: &str| HostError::Protocol {
            path: path.clone(),
            detail: detail.into(),
        };
        let what = format!("from ivshmem server {}", path.display());
        let shrunk = Arc::new(EventFd::new()?);
        let region = match crate::shm::check_memfd(shm.as_fd()) {
            Ok(()) => crate::shm::map_fd(shm.as_fd(), &what)?,
            // Unsealed, and trusted: a shrink then ends the link instead of the process.
            Err(HostError::NotSealed { .. } | HostError::NotMemfd { .. })
                if opts.allow_unsealed =>
            {
                crate::shm::map_fd_guarded(shm.as_fd(), &what, shrunk.clone())?
            }
            Err(e) => return Err(e),
        };
        drop(shm);

        // Peers' vectors, then ours. We do not know N: after our first vector we take
        // whatever follows within a short quiet period, and the thread takes the rest. A
        // longer silence before any vector of ours means the server has none (N = 0).
        let mut peers = Peers::default();
        let mut own: Vec<EventFd> = Vec::new();
        let mut alive = true;
        loop {
            let quiet = if own.is_empty() {
                NO_VECTORS_QUIET
            } else {
                HANDSHAKE_QUIET
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if !sys::poll_readable(&[sock.as_fd()], Some(quiet.min(left)))?[0] {
                if own.is_empty() && left <= quiet {
                    return Err(HostError::HandshakeTimeout { path });
                }
                break;
            }
            match sys::recv_msg(sock.as_fd()) {
                Ok(Some((val, fd))) => {
                    peers.apply(id, val, fd, &mut own);
                }
                Ok(None) if own.is_empty() => {
                    return Err(proto(
                        "the server closed the connection during the handshake",
                    ))
                }
                Ok(None) => {
                    alive = false;
                    break;
                }
                Err(e) if own.is_empty() => return Err(e),
                Err(_) => {
                    alive = false;
                    break;
                }
            }
        }
        let mut own = own.into_iter();
        let own0 = own.next();
        let bell = Arc::new(ClientDoorbell {
            id,
            own0,
            own_more: Mutex::new(own.collect()),
            intr: EventFd::new()?,
            waits: Mutex::new(Vec::new()),
            peers: Mutex::new(peers.map),
            changed: Condvar::new(),
            server_alive: AtomicBool::new(alive),
            memory_lost: AtomicBool::new(false),
        });
        let stop = Arc::new(EventFd::new()?);
        let thread = {
            let (bell, stop) = (bell.clone(), stop.clone());
            let sock = alive.then_some(sock);
            Some(
                std::thread::Builder::new()
                    .name(format!("ivshmem-client-{id}"))
                    .spawn(move || listen(sock, &bell, &stop, &shrunk))
                    .map_err(|e| HostError::io("spawn ivshmem client thread", e))?,
            )
        };
        Ok(Client {
            id,
            region,
            path,
            bell,
            stop,
            thread,
        })
    }

    /// Our peer id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The socket path of the server.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared memory (a clone; it stays mapped while any clone lives).
    pub fn region(&self) -> SharedRegion {
        self.region.clone()
    }

    /// How many vectors (eventfds) the server gave us; 0 from a server without doorbells
    /// (then the link polls, see [`ClientDoorbell`]).
    pub fn vectors(&self) -> usize {
        usize::from(self.bell.own0.is_some()) + lock(&self.bell.own_more).len()
    }

    /// The doorbell for the ring.
    pub fn doorbell(&self) -> Arc<ClientDoorbell> {
        self.bell.clone()
    }

    /// Whether the server is still connected. After it dies the memory and the eventfds
    /// we hold keep working, but joins and leaves are no longer heard of.
    pub fn server_alive(&self) -> bool {
        self.bell.server_alive()
    }

    /// Whether the shared memory was shrunk under us (possible only when joined with
    /// [`ConnectOptions::allow_unsealed`]): it has then been replaced by private memory
    /// and the link is over.
    pub fn memory_lost(&self) -> bool {
        self.bell.memory_lost()
    }

    /// Ids of the other peers present now, ascending.
    pub fn peers(&self) -> Vec<u16> {
        self.bell.other_peers()
    }

    /// Waits until some other peer is present (`None` for `timeout`: no limit) and returns
    /// the lowest such id; `None` on timeout.
    pub fn wait_for_peer(&self, timeout: Option<Duration>) -> Option<u16> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut peers = lock(&self.bell.peers);
        loop {
            if let Some(&p) = peers.keys().find(|&&p| p != self.id) {
                return Some(p);
            }
            peers = match deadline {
                None => self
                    .bell
                    .changed
                    .wait(peers)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.bell
                        .changed
                        .wait_timeout(peers, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Our socket is closed: the server announces our leave; we hear nothing more.
        self.bell.mark_server_gone();
    }
}

/// Membership as learnt from the server's messages.
#[derive(Default)]
struct Peers {
    map: BTreeMap<u16, Vec<EventFd>>,
}

/// What one server message changed.
#[derive(PartialEq)]
enum Change {
    None,
    Membership,
}

impl Peers {
    /// Applies one message: a peer's vector (a join at its first), a leave, or one of our
    /// own vectors (pushed to `own`). Nonsense (a bad id) is dropped, fd closed.
    fn apply(
        &mut self,
        own_id: u16,
        val: i64,
        fd: Option<OwnedFd>,
        own: &mut Vec<EventFd>,
    ) -> Change {
        let Ok(id) = u16::try_from(val) else {
            return Change::None;
        };
        match fd {
            Some(fd) if id == own_id => {
                own.push(EventFd::from_owned(fd));
                Change::None
            }
            Some(fd) => {
                let v = self.map.entry(id).or_default();
                v.push(EventFd::from_owned(fd));
                if v.len() == 1 {
                    Change::Membership
                } else {
                    Change::None
                }
            }
            None => {
                if self.map.remove(&id).is_some() {
                    Change::Membership
                } else {
                    Change::None
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The background thread: applies joins and leaves until stopped or the server goes
/// (`sock` is `None` once it has gone), and ends the link if the memory is shrunk.
fn listen(mut sock: Option<UnixStream>, bell: &ClientDoorbell, stop: &EventFd, shrunk: &EventFd) {
    loop {
        let mut fds = vec![stop.as_fd(), shrunk.as_fd()];
        fds.extend(sock.as_ref().map(|s| s.as_fd()));
        let Ok(ready) = sys::poll_readable(&fds, None) else {
            bell.mark_server_gone();
            return;
        };
        if ready[0] {
            return;
        }
        if ready[1] {
            shrunk.drain();
            bell.memory_lost.store(true, Ordering::Release);
            bell.changed.notify_all();
            bell.interrupt();
        }
        if ready.get(2) != Some(&true) {
            continue;
        }
        let Some(s) = &sock else { continue };
        match sys::recv_msg(s.as_fd()) {
            Ok(Some((val, fd))) => {
                let mut own = Vec::new();
                let change = {
                    let mut guard = lock(&bell.peers);
                    let mut p = Peers {
                        map: std::mem::take(&mut *guard),
                    };
                    let c = p.apply(bell.id, val, fd, &mut own);
                    *guard = p.map;
                    c
                };
                lock(&bell.own_more).extend(own);
                if change == Change::Membership {
                    bell.changed.notify_all();
                    bell.interrupt();
                }
            }
            // End of stream or a broken message: the server is gone or untrustworthy.
            Ok(None) | Err(_) => {
                sock = None;
                bell.mark_server_gone();
            }
        }
    }
}

impl ClientDoorbell {
    /// Whether the server connection is still up.
    pub fn server_alive(&self) -> bool {
        self.server_alive.load(Ordering::Acquire)
    }

    /// Whether the shared memory was shrunk under us (joined unsealed): then it has been
    /// replaced by private memory, and the link is over.
    pub fn memory_lost(&self) -> bool {
        self.memory_lost.load(Ordering::Acquire)
    }

    fn mark_server_gone(&self) {
        self.server_alive.store(false, Ordering::Release);
        // Take the lock so a `wait_for_peer` between its check and its wait is not missed.
        drop(lock(&self.peers));
        self.changed.notify_all();
        self.interrupt();
    }

    fn other_peers(&self) -> Vec<u16> {
        lock(&self.peers)
            .keys()
            .copied()
            .filter(|&p| p != self.id)
            .collect()
    }

    /// An epoll instance of `waits` for one wait, or a new one watching `own0` and
    /// `intr`; `None` if none can be made.
    fn take_wait(&self, own0: &EventFd) -> Option<sys::Epoll> {
        if let Some(ep) = lock(&self.waits).pop() {
            return Some(ep);
        }
        let ep = sys::Epoll::new().ok()?;
        ep.add_edge(own0.as_fd(), 0).ok()?;
        ep.add_edge(self.intr.as_fd(), 1).ok()?;
        Some(ep)
    }
}

impl Doorbell for ClientDoorbell {
    fn own_id(&self) -> u16 {
        self.id
    }

    fn ring(&self, peer: u16) {
        if let Some(v) = lock(&self.peers).get(&peer).and_then(|v| v.first()) {
            v.signal();
        }
    }

    fn wait(&self, timeout: Option<Duration>) {
        let Some(own0) = &self.own0 else {
            // Nothing rings us: a short sleep (as `Polling` does) that `interrupt` cuts.
            let t = timeout.unwrap_or(Duration::from_millis(1));
            if let Ok([true]) = sys::poll_readable(&[self.intr.as_fd()], Some(t)).as_deref() {
                self.intr.drain();
            }
            return;
        };
        if let Some(ep) = self.take_wait(own0) {
            // An error (or EINTR) returns early, which the contract allows.
            let _ = ep.wait_any(timeout);
            lock(&self.waits).push(ep);
            return;
        }
        // No epoll instance to be had (out of fds): poll, and drain what is readable.
        // A poll error (EINTR is retried inside) leaves us returning early, which the
        // contract allows.
        match sys::poll_readable(&[own0.as_fd(), self.intr.as_fd()], timeout) {
            Ok(ready) => {
                if ready.first() == Some(&true) {
                    own0.drain();
                }
                if ready.get(1) == Some(&true) {
                    self.intr.drain();
                }
            }
            Err(_) => {
                own0.drain();
                self.intr.drain();
            }
        }
    }

    fn interrupt(&self) {
        self.intr.signal();
    }

    /// False from a server without vectors: nothing would wake a wait, so the link polls.
    fn can_wait(&self) -> bool {
        self.own0.is_some()
    }

    /// `Some(true)` while the server lists `peer`, `Some(false)` once it is not listed (it
    /// left, or never joined), `None` after the server connection is gone, or from a server
    /// without vectors, which announces leaves but no joins (we cannot tell).
    /// After the memory was lost, no other peer counts as present: the link ends.
    fn peer_present(&self, peer: u16) -> Option<bool> {
        if self.memory_lost() {
            return Some(peer == self.id);
        }
        if !self.server_alive() || self.own0.is_none() {
            return None;
        }
        Some(peer == self.id || lock(&self.peers).contains_key(&peer))
    }
}

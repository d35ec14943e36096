//! An ivshmem server speaking QEMU's protocol (see `IVSHMEM.md`, "The ivshmem server
//! protocol"): it hands every peer the shared memory and the eventfds of every other peer,
//! and tells the others when a peer joins or leaves.
//!
//! Peer ids rotate as in QEMU's own server: each new peer gets the next free id after the
//! last one given, wrapping, so a peer that rejoins gets a new id and a stale ring to its
//! old id reaches no one. Ids change on every reconnect: the transport publishes current
//! ids in shared memory.
//!
//! Id 0 is never given on the main socket. It belongs to the VM socket
//! ([`Server::with_vm_socket`]), if any: QEMU migrates an ivshmem-doorbell device only
//! with `master=on`, and refuses `master=on` unless the server gave it id 0 ("master must
//! connect to the server before any peers", `hw/misc/ivshmem-pci.c`). The server cannot
//! tell QEMU from a host program on one socket (the protocol runs server to client only),
//! so the VM gets a socket of its own: whoever connects there is the VM and gets 0, one at
//! a time; host programs join on the main socket with ids from 1, in any order, before or
//! after the VM.
//!
//! The memory is a memfd sealed against shrinking and growing, so no peer can truncate it
//! under another's mapping.

use crate::error::{HostError, Result};
use crate::sys::{self, EventFd};
use ivring::SharedRegion;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{info, warn};

/// How many peers one server serves by default; more are refused (and logged to stderr).
/// See [`Server::with_max_peers`].
pub const MAX_PEERS: usize = 64;
/// How many vectors (eventfds per peer) a server hands out at most.
pub const MAX_VECTORS: usize = 64;
/// The runtime directory of the packaged units (systemd's `RuntimeDirectory=ivring`),
/// created by [`prepare_socket_dir`] when missing.
pub const RUNTIME_DIR: &str = "/run/ivring";

/// How long a send to one peer may block before that peer counts as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A bound (listening) ivshmem server. [`Server::run`] serves; dropping it removes its
/// socket file.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    /// (device, inode) of our socket file, so we never remove someone else's.
    ident: Option<(u64, u64)>,
    listener: UnixListener,
    memfd: OwnedFd,
    size: u64,
    vectors: usize,
    stop: Arc<EventFd>,
    /// The id given last; the next peer gets the next free one after it.
    last_id: AtomicU16,
    max_peers: usize,
    /// The VM socket: whoever connects there gets id 0 ([`Server::with_vm_socket`]).
    vm: Option<VmSocket>,
}

/// The second socket of [`Server::with_vm_socket`].
#[derive(Debug)]
struct VmSocket {
    path: PathBuf,
    ident: Option<(u64, u64)>,
    listener: UnixListener,
}

/// The peer id the VM socket hands out: the one QEMU requires of a `master=on` device.
pub const VM_ID: u16 = 0;

/// One connected peer, as the server sees it.
struct Peer {
    id: u16,
    sock: UnixStream,
    /// Vector i of this peer: others write it to ring the peer; the peer reads it.
    vectors: Vec<EventFd>,
}

impl Server {
    /// Creates a sealed memfd of `size` bytes (a power of two from 64 KiB to 1 GiB) and
    /// listens at `path` (mode 0600) for peers, each given `vectors` eventfds (1 to 64).
    ///
    /// If `path` exists: a socket someone accepts on is [`HostError::SocketInUse`]; a
    /// stale socket is replaced; anything else is [`HostError::NotASocket`] and is left as is.
    pub fn bind(path: impl AsRef<Path>, size: u64, vectors: usize) -> Result<Server> {
        let path = path.as_ref().to_path_buf();
        if vectors == 0 || vectors > MAX_VECTORS {
            return Err(HostError::BadVectors {
                vectors,
                max: MAX_VECTORS,
            });
        }
        crate::shm::validate_size("shared memory", size)?;
        prepare_socket_dir(&path)?;
        let memfd = crate::shm::create_sealed_memfd("ivring", size)?;
        clear_stale_socket(&path)?;
        let listener = sys::bind_unix_0600(&path)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| HostError::io("make listener non-blocking", e))?;
        Ok(Server {
            ident: sys::path_identity(&path),
            path,
            listener,
            memfd,
            size,
            vectors,
            stop: Arc::new(EventFd::new()?),
            last_id: AtomicU16::new(0),
            max_peers: MAX_PEERS,
            vm: None,
        })
    }

    /// Also listens at `path` (mode 0600, as the main socket) for the VM: a peer that
    /// connects there gets id 0 ([`VM_ID`]), the id QEMU requires of an ivshmem-doorbell
    /// device with `master=on`, the only mode it migrates and snapshots. One VM at a time:
    /// a second connection while id 0 is taken is refused (and logged). Host programs keep
    /// joining on the main socket. Same rules as [`Server::bind`] for an existing file.
    pub fn with_vm_socket(mut self, path: impl AsRef<Path>) -> Result<Server> {
        let path = path.as_ref().to_path_buf();
        if path == self.path {
            return Err(HostError::io(
                format!("bind VM socket {}", path.display()),
                io::Error::other("it is the main socket: give the VM a path of its own"),
            ));
        }
        prepare_socket_dir(&path)?;
        clear_stale_socket(&path)?;
        let listener = sys::bind_unix_0600(&path)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| HostError::io("make VM listener non-blocking", e))?;
        self.vm = Some(VmSocket {
            ident: sys::path_identity(&path),
            path,
            listener,
        });
        Ok(self)
    }

    /// The VM socket, if any.
    pub fn vm_socket(&self) -> Option<&Path> {
        self.vm.as_ref().map(|v| v.path.as_path())
    }

    /// Serves at most `max` peers (clamped to 1 ..= 65535) instead of [`MAX_PEERS`].
    pub fn with_max_peers(mut self, max: usize) -> Server {
        self.max_peers = max.clamp(1, u16::MAX as usize);
        self
    }

    /// Widens (or narrows) the socket file (and the VM socket's) to `mode` and, if given,
    /// hands it to group `gid`, so that a QEMU running as another user can connect. The
    /// socket is 0600 from its creation until this is called.
    pub fn set_socket_access(&self, mode: u32, gid: Option<u32>) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let paths = std::iter::once(&self.path).chain(self.vm.as_ref().map(|v| &v.path));
        for path in paths {
            if let Some(gid) = gid {
                std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                    HostError::io(format!("chown {} to group {gid}", path.display()), e)
                })?;
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| HostError::io(format!("chmod {mode:o} {}", path.display()), e))?;
        }
        Ok(())
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the shared memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of vectors (eventfds) per peer.
    pub fn vectors(&self) -> usize {
        self.vectors
    }

    /// The shared memory fd (a sealed memfd).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Maps the shared memory into this process (a program embedding the server).
    pub fn region(&self) -> Result<SharedRegion> {
        crate::shm::map_memfd(self.memfd.as_fd())
    }

    /// Serves peers until stopped through a [`ServerHandle`] (see [`Server::spawn`]), on
    /// the calling thread; call it from one thread at a time. Peers connected when it
    /// returns are disconnected. Errors only if polling itself fails; a misbehaving peer
    /// is just disconnected, and a peer that does not take a message within 1 s counts as gone.
    pub fn run(&self) -> Result<()> {
        let mut peers: Vec<Peer> = Vec::new();
        loop {
            // stop, main listener, VM listener (when there is one), then the peers
            let ready = {
                let mut fds: Vec<BorrowedFd<'_>> = vec![self.stop.as_fd(), self.listener.as_fd()];
                fds.extend(self.vm.as_ref().map(|v| v.listener.as_fd()));
                fds.extend(peers.iter().map(|p| p.sock.as_fd()));
                sys::poll_readable(&fds, None)?
            };
            if ready[0] {
                return Ok(());
            }
            let first_peer = if self.vm.is_some() { 3 } else { 2 };
            // A peer never writes: any readability (data or EOF) is a disconnect.
            let gone: Vec<u16> = peers
                .iter()
                .zip(&ready[first_peer..])
                .filter(|(_, r)| **r)
                .map(|(p, _)| p.id)
                .collect();
            remove_peers(&self.path, &mut peers, gone);
            if ready[1] {
                self.accept_all(&mut peers, &self.listener, false);
            }
            if let Some(vm) = self.vm.as_ref().filter(|_| ready[2]) {
                self.accept_all(&mut peers, &vm.listener, true);
            }
        }
    }

    /// Accepts every pending connection on `listener` (the VM socket's when `vm`).
    fn accept_all(&self, peers: &mut Vec<Peer>, listener: &UnixListener, vm: bool) {
        loop {
            let sock = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("ivshmem server {}: accept: {e}", self.path.display());
                    return;
                }
            };
            if peers.len() >= self.max_peers {
                warn!(
                    "ivshmem server {}: refusing a peer: already {} peers connected (the \
                     limit); disconnect one first",
                    self.path.display(),
                    self.max_peers
                );
                continue;
            }
            if vm && peers.iter().any(|p| p.id == VM_ID) {
                warn!(
                    "ivshmem server {}: refusing a second VM on the VM socket: peer {VM_ID} is \
                     taken by the VM connected there; stop that VM first, or give each VM \
                     a server of its own",
                    self.path.display()
                );
                refuse(&sock);
                continue;
            }
            let id = if vm { Some(VM_ID) } else { None };
            if let Err(e) = self.add_peer(peers, sock, id) {
                warn!(
                    "ivshmem server {}: new peer dropped: {e}",
                    self.path.display()
                );
            }
        }
    }

    /// Hands a new peer the memory and everyone's eventfds, then announces it to the others.
    /// `id`: the VM's ([`VM_ID`]); `None`: the next free one from 1.
    fn add_peer(&self, peers: &mut Vec<Peer>, sock: UnixStream, id: Option<u16>) -> Result<()> {
        let id = match id {
            Some(id) => id,
            None => {
                // Only `run` (one thread) touches it; the atomic just keeps `Server` Sync.
                let last = self.last_id.load(Ordering::Relaxed);
                let id = (1..=u16::MAX)
                    .map(|k| ((u32::from(last) + u32::from(k) - 1) % 65535 + 1) as u16)
                    .find(|id| peers.iter().all(|p| p.id != *id))
                    .expect("fewer than 65535 peers");
                self.last_id.store(id, Ordering::Relaxed);
                id
            }
        };
        sock.set_nonblocking(false)
            .and_then(|()| sock.set_write_timeout(Some(SEND_TIMEOUT)))
            .map_err(|e| HostError::io("set up peer socket", e))?;
        let vectors = (0..self.vectors)
            .map(|_| EventFd::new())
            .collect::<Result<Vec<_>>>()?;
        let s = sock.as_fd();
        let send = |val: i64, fd: Option<BorrowedFd<'_>>| {
            sys::send_msg(s, val, fd)
                .map_err(|e| HostError::io(format!("send handshake to peer {id}"), e))
        };
        send(0, None)?;
        send(id.into(), None)?;
        send(-1, Some(self.memfd.as_fd()))?;
        for p in peers.iter() {
            for v in &p.vectors {
                send(p.id.into(), Some(v.as_fd()))?;
            }
        }
        for v in &vectors {
            send(id.into(), Some(v.as_fd()))?;
        }
        let mut failed = Vec::new();
        for p in peers.iter() {
            for v in &vectors {
                if sys::send_msg(p.sock.as_fd(), id.into(), Some(v.as_fd())).is_err() {
                    failed.push(p.id);
                    break;
                }
            }
        }
        peers.push(Peer { id, sock, vectors });
        info!("ivshmem server {}: peer {id} joined", self.path.display());
        remove_peers(&self.path, peers, failed);
        Ok(())
    }

    /// Runs the server on a thread of its own.
    pub fn spawn(self) -> ServerHandle {
        let stop = self.stop.clone();
        let path = self.path.clone();
        let thread = std::thread::Builder::new()
            .name("ivshmem-server".into())
            .spawn(move || self.run())
            .expect("spawn ivshmem server thread");
        ServerHandle {
            stop,
            path,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Remove the socket file only if it is still ours (not replaced by a newer server).
        if self.ident.is_some() && sys::path_identity(&self.path) == self.ident {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(vm) = &self.vm {
            if vm.ident.is_some() && sys::path_identity(&vm.path) == vm.ident {
                let _ = std::fs::remove_file(&vm.path);
            }
        }
    }
}

/// Turns a client away so that it fails at once: QEMU waits forever at device realize
/// when its server closes the socket before sending an id (it reads on after EOF), but
/// gives up on an id it cannot take ("server sent invalid ID message").
fn refuse(sock: &UnixStream) {
    let _ = sock.set_write_timeout(Some(SEND_TIMEOUT));
    let _ = sys::send_msg(sock.as_fd(), 0, None);
    let _ = sys::send_msg(sock.as_fd(), -2, None);
}

/// Removes the peers `gone` (closing their sockets and eventfds) and announces each leave
/// to the rest; a peer the announcement cannot reach is removed in turn.
fn remove_peers(server: &Path, peers: &mut Vec<Peer>, mut gone: Vec<u16>) {
    while let Some(id) = gone.pop() {
        let Some(at) = peers.iter().position(|p| p.id == id) else {
            continue;
        };
        drop(peers.swap_remove(at));
        info!("ivshmem server {}: peer {id} left", server.display());
        for p in peers.iter() {
            if sys::send_msg(p.sock.as_fd(), id.into(), None).is_err() && !gone.contains(&p.id) {
                gone.push(p.id);
            }
        }
    }
}

/// Makes sure the directory `socket` goes in exists: [`RUNTIME_DIR`] is created (mode
/// 0755, as systemd's `RuntimeDirectory=` would); any other missing directory is a
/// [`HostError::NoSocketDir`] naming it.
pub fn prepare_socket_dir(socket: &Path) -> Result<()> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    if dir.is_dir() {
        return Ok(());
    }
    if dir == Path::new(RUNTIME_DIR) {
        use std::os::unix::fs::DirBuilderExt;
        return std::fs::DirBuilder::new()
            .mode(0o755)
            .create(dir)
            .or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| HostError::io(format!("create {RUNTIME_DIR}"), e));
    }
    // The deepest missing ancestor is what to create first; name the whole path anyway.
    Err(HostError::NoSocketDir { dir: dir.into() })
}

/// Looks a group up by number, or by name through the system's name service (so LDAP and
/// sssd groups are found as well as those in `/etc/group`).
pub fn resolve_group(group: &str) -> Result<u32> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    match sys::group_id(group) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(HostError::NoSuchGroup { name: group.into() }),
        Err(e) => Err(HostError::io(format!("look up group {group:?}"), e)),
    }
}

/// Makes `path` free to bind: nothing there, or a stale socket (removed). A live socket
/// or a non-socket is an error, and a non-socket is never touched.
fn clear_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(HostError::io(format!("stat {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(HostError::NotASocket { path: path.into() });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(HostError::SocketInUse { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| HostError::io(format!("remove stale socket {}", path.display()), e)),
        Err(e) => Err(HostError::io(format!("probe socket {}", path.display()), e)),
    }
}

/// Controls a server running on its own thread; dropping it stops the server.
#[derive(Debug)]
pub struct ServerHandle {
    stop: Arc<EventFd>,
    path: PathBuf,
    thread: Option<JoinHandle<Result<()>>>,
}

impl ServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server, disconnects every peer and removes the socket file. Returns the
    /// error that ended the server early, if any.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.signal();
        match thread.join() {
            Ok(r) => r,
            Err(_) => Err(HostError::io(
                "ivshmem server thread",
                io::Error::other("it panicked"),
            )),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

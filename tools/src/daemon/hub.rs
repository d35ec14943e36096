//! The daemon's ivshmem servers: every VM's server socket, and every peer connected to
//! it, served by one thread polling them all (the protocol is in `IVSHMEM.md`, "The
//! ivshmem server protocol"; [`ivring_ivshmem::server::Server`] serves one socket the same way).
//!
//! Each VM's server also has one peer inside the daemon, with no socket: the daemon's own
//! endpoint of that VM's link ([`HubBell`], its [`ivring::Doorbell`]). Its eventfds are
//! handed to the other peers like any peer's, and the hub tells it of joins and leaves
//! directly, so no thread per VM listens to a server socket.
//!
//! The hub never blocks on a peer: every socket is non-blocking, and a peer whose socket
//! cannot take a message at once (it does not read) is disconnected. Nothing of a link's
//! data passes through here: a VM that floods its doorbell or scribbles its memory costs
//! the hub nothing; one that connects and disconnects in a loop costs it a few syscalls
//! per connection, and at most `max_peers` of its connections are kept.

use super::fdstore::{self, FdStore};
use ivring::Doorbell;
use ivring_ivshmem::sys::{self, EventFd};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{info, warn};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The doorbell of the daemon's own endpoint on one VM's link: our vectors are eventfds
/// the hub hands to the other peers; theirs come from the hub as they join and leave.
#[derive(Debug)]
pub struct HubBell {
    id: u16,
    /// Our vectors: the others ring vector 0; the rest are handed out and never waited on.
    own: Vec<Arc<EventFd>>,
    /// [`Doorbell::interrupt`] and membership changes signal it.
    intr: EventFd,
    /// Vector 0 of every other peer, by id.
    peers: Mutex<BTreeMap<u16, Arc<EventFd>>>,
    /// The VM's server was removed: no peer counts as present any more.
    closed: std::sync::atomic::AtomicBool,
}

impl HubBell {
    /// A doorbell for peer `id` with `vectors` fresh eventfds.
    pub(crate) fn new(id: u16, vectors: usize) -> ivring_ivshmem::Result<HubBell> {
        let own = (0..vectors)
            .map(|_| EventFd::new())
            .collect::<ivring_ivshmem::Result<Vec<_>>>()?;
        HubBell::with_vectors(id, own)
    }

    /// A doorbell for peer `id` with the eventfds `own` (kept across a daemon restart).
    pub(crate) fn with_vectors(id: u16, own: Vec<EventFd>) -> ivring_ivshmem::Result<HubBell> {
        if own.is_empty() {
            return Err(ivring_ivshmem::HostError::io(
                "restore the daemon's doorbell",
                io::Error::other("no vectors"),
            ));
        }
        Ok(HubBell {
            id,
            own: own.into_iter().map(Arc::new).collect(),
            intr: EventFd::new()?,
            peers: Mutex::new(BTreeMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Our vectors (to keep them in the fd store).
    pub(crate) fn own_vectors(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.own.iter().map(|v| v.as_fd())
    }

    /// Vector 0, which the other peers ring: what the driver of the daemon's endpoint
    /// watches, with [`HubBell::interrupt_fd`] ([`super::links`]).
    pub(crate) fn vector0_fd(&self) -> BorrowedFd<'_> {
        self.own[0].as_fd()
    }

    /// The interrupt ([`Doorbell::interrupt`], joins and leaves): the ring's call for its
    /// driver sooner than the deadline it gave.
    pub(crate) fn interrupt_fd(&self) -> BorrowedFd<'_> {
        self.intr.as_fd()
    }

    /// Consumes the rings of vector 0 (before a drive that answers them).
    pub(crate) fn drain_vector0(&self) {
        self.own[0].drain();
    }

    /// Consumes the interrupts (before a drive that answers them).
    pub(crate) fn drain_interrupt(&self) {
        self.intr.drain();
    }

    /// The ids of the other peers connected now (QEMU, guest-role programs, host programs).
    pub fn peers(&self) -> Vec<u16> {
        lock(&self.peers).keys().copied().collect()
    }

    fn joined(&self, id: u16, vector0: Option<Arc<EventFd>>) {
        if let Some(v) = vector0 {
            lock(&self.peers).insert(id, v);
        }
        self.intr.signal();
    }

    fn left(&self, id: u16) {
        lock(&self.peers).remove(&id);
        self.intr.signal();
    }

    fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        lock(&self.peers).clear();
        self.intr.signal();
    }
}

impl Doorbell for HubBell {
    fn own_id(&self) -> u16 {
        self.id
    }

    fn ring(&self, peer: u16) {
        if let Some(v) = lock(&self.peers).get(&peer) {
            v.signal();
        }
    }

    fn wait(&self, timeout: Option<Duration>) {
        // Drain only what is readable (a read of an empty eventfd is a wasted syscall).
        match sys::poll_readable(&[self.own[0].as_fd(), self.intr.as_fd()], timeout) {
            Ok(ready) => {
                if ready[0] {
                    self.own[0].drain();
                }
                if ready[1] {
                    self.intr.drain();
                }
            }
            Err(_) => {
                self.own[0].drain();
                self.intr.drain();
            }
        }
    }

    fn interrupt(&self) {
        self.intr.signal();
    }

    fn peer_present(&self, peer: u16) -> Option<bool> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Some(peer == self.id);
        }
        Some(peer == self.id || lock(&self.peers).contains_key(&peer))
    }
}

/// One peer connected to a VM's server socket.
pub(crate) struct Peer {
    pub id: u16,
    pub sock: UnixStream,
    pub vectors: Vec<Arc<EventFd>>,
}

/// One VM's ivshmem server, as the hub serves it.
pub(crate) struct VmServer {
    pub name: String,
    pub path: PathBuf,
    /// (device, inode) of the socket file, so we never remove someone else's.
    pub ident: Option<(u64, u64)>,
    pub listener: UnixListener,
    pub memfd: Arc<OwnedFd>,
    pub vectors: usize,
    pub max_peers: usize,
    /// The daemon's own peer (`None` when the daemon does not take the host side).
    pub local: Option<Arc<HubBell>>,
    last_id: u16,
    peers: Vec<Peer>,
    store: Arc<FdStore>,
}

impl VmServer {
    /// A server for `listener` (non-blocking, already bound at `path`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        path: PathBuf,
        listener: UnixListener,
        memfd: Arc<OwnedFd>,
        vectors: usize,
        max_peers: usize,
        local: Option<Arc<HubBell>>,
        store: Arc<FdStore>,
    ) -> VmServer {
        VmServer {
            store,
            ident: sys::path_identity(&path),
            last_id: local.as_ref().map_or(0, |l| l.id),
            name,
            path,
            listener,
            memfd,
            vectors,
            max_peers,
            local,
            peers: Vec::new(),
        }
    }

    /// Takes up peers that were connected before the daemon restarted (from the fd
    /// store), with their ids and eventfds.
    pub fn with_peers(mut self, peers: Vec<Peer>) -> VmServer {
        for p in peers {
            if let Some(l) = &self.local {
                l.joined(p.id, p.vectors.first().cloned());
            }
            self.last_id = self.last_id.max(p.id);
            info!("vm {}: peer {} taken up again", self.name, p.id);
            self.peers.push(p);
        }
        self
    }

    /// Ids of the peers connected through the socket.
    fn ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.peers
            .iter()
            .map(|p| p.id)
            .chain(self.local.as_ref().map(|l| l.id))
    }

    fn accept_all(&mut self) {
        loop {
            let sock = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vm {}: ivshmem server: accept: {e}", self.name);
                    return;
                }
            };
            if self.peers.len() >= self.max_peers {
                warn!(
                    "vm {}: ivshmem server: refusing a peer: already {} connected (the VM's \
                     limit, `vm add --max-peers`); disconnect one first",
                    self.name, self.max_peers
                );
                continue;
            }
            if let Err(e) = self.add_peer(sock) {
                warn!("vm {}: ivshmem server: new peer dropped: {e}", self.name);
            }
        }
    }

    fn add_peer(&mut self, sock: UnixStream) -> io::Result<()> {
        // The VM gets id 0 while it is free: the id QEMU requires of an ivshmem-doorbell
        // device with master=on, the one mode it migrates (README, "Migration, snapshots
        // and pauses"). The daemon's side has its own id, and nobody else joins a VM's
        // socket but the guest side, so 0 is free whenever the VM's QEMU starts. Any
        // further peer rotates through the other ids, as QEMU's own server does.
        let id = if self.ids().all(|p| p != ivring_ivshmem::server::VM_ID) {
            ivring_ivshmem::server::VM_ID
        } else {
            let last = self.last_id;
            let id = (1..=u16::MAX)
                .map(|k| ((u32::from(last) + u32::from(k) - 1) % 65535 + 1) as u16)
                .find(|id| self.ids().all(|p| p != *id))
                .ok_or_else(|| io::Error::other("no free peer id"))?;
            self.last_id = id;
            id
        };
        // Non-blocking: a peer that does not take its messages at once is dropped, and
        // never holds up the other VMs.
        sock.set_nonblocking(true)?;
        let vectors = (0..self.vectors)
            .map(|_| EventFd::new().map(Arc::new).map_err(io::Error::other))
            .collect::<io::Result<Vec<_>>>()?;
        let s = sock.as_fd();
        let send = |val: i64, fd: Option<BorrowedFd<'_>>| sys::send_msg(s, val, fd);
        send(0, None)?;
        send(id.into(), None)?;
        send(-1, Some(self.memfd.as_fd()))?;
        if let Some(l) = &self.local {
            for v in &l.own {
                send(l.id.into(), Some(v.as_fd()))?;
            }
        }
        for p in &self.peers {
            for v in &p.vectors {
                send(p.id.into(), Some(v.as_fd()))?;
            }
        }
        for v in &vectors {
            send(id.into(), Some(v.as_fd()))?;
        }
        let mut failed = Vec::new();
        for p in &self.peers {
            for v in &vectors {
                if sys::send_msg(p.sock.as_fd(), id.into(), Some(v.as_fd())).is_err() {
                    failed.push(p.id);
                    break;
                }
            }
        }
        if let Some(l) = &self.local {
            l.joined(id, vectors.first().cloned());
        }
        if self.store.enabled() {
            self.store
                .put(&fdstore::peer_sock_name(&self.name, id), sock.as_fd());
            for (k, v) in vectors.iter().enumerate() {
                self.store
                    .put(&fdstore::peer_vec_name(&self.name, id, k), v.as_fd());
            }
        }
        self.peers.push(Peer { id, sock, vectors });
        info!("vm {}: peer {id} joined", self.name);
        self.remove_peers(failed);
        Ok(())
    }

    fn remove_peers(&mut self, mut gone: Vec<u16>) {
        while let Some(id) = gone.pop() {
            let Some(at) = self.peers.iter().position(|p| p.id == id) else {
                continue;
            };
            let p = self.peers.swap_remove(at);
            if self.store.enabled() {
                self.store.remove(&fdstore::peer_sock_name(&self.name, id));
                for k in 0..p.vectors.len() {
                    self.store
                        .remove(&fdstore::peer_vec_name(&self.name, id, k));
                }
            }
            drop(p);
            info!("vm {}: peer {id} left", self.name);
            if let Some(l) = &self.local {
                l.left(id);
            }
            for p in &self.peers {
                if sys::send_msg(p.sock.as_fd(), id.into(), None).is_err() && !gone.contains(&p.id)
                {
                    gone.push(p.id);
                }
            }
        }
    }
}

impl Drop for VmServer {
    fn drop(&mut self) {
        self.store.remove_vm(&self.name);
        if let Some(l) = &self.local {
            l.close();
        }
        if self.ident.is_some() && sys::path_identity(&self.path) == self.ident {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

enum Cmd {
    Add(Box<VmServer>),
    /// Removes the named VM's server; answers with whether it was there.
    Remove(String, mpsc::Sender<bool>),
    /// Answers with each VM's connected peer count.
    Peers(mpsc::Sender<Vec<(String, usize)>>),
    Stop,
}

/// The thread serving every VM's ivshmem socket.
pub(crate) struct Hub {
    cmds: Arc<Mutex<Vec<Cmd>>>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Hub {
    pub fn start() -> ivring_ivshmem::Result<Hub> {
        let cmds = Arc::new(Mutex::new(Vec::new()));
        let wake = Arc::new(EventFd::new()?);
        let thread = {
            let (cmds, wake) = (cmds.clone(), wake.clone());
            std::thread::Builder::new()
                .name("ivring-hub".into())
                .spawn(move || run(&cmds, &wake))
                .map_err(|e| ivring_ivshmem::HostError::io("spawn the ivshmem hub thread", e))?
        };
        Ok(Hub {
            cmds,
            wake,
            thread: Some(thread),
        })
    }

    fn send(&self, c: Cmd) {
        lock(&self.cmds).push(c);
        self.wake.signal();
    }

    /// Starts serving a VM's socket.
    pub fn add(&self, vm: VmServer) {
        self.send(Cmd::Add(Box::new(vm)));
    }

    /// Stops serving a VM's socket: its peers are disconnected and its socket file is
    /// removed by the time this returns.
    pub fn remove(&self, name: &str) -> bool {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Remove(name.into(), tx));
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false)
    }

    /// How many peers each VM's socket has.
    pub fn peers(&self) -> Vec<(String, usize)> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Peers(tx));
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(cmds: &Mutex<Vec<Cmd>>, wake: &EventFd) {
    let mut vms: Vec<VmServer> = Vec::new();
    loop {
        // Which VM and which of its peers (None: the listener) each polled fd is.
        let mut who: Vec<(usize, Option<usize>)> = Vec::new();
        let ready = {
            let mut fds: Vec<BorrowedFd<'_>> = vec![wake.as_fd()];
            for (i, vm) in vms.iter().enumerate() {
                fds.push(vm.listener.as_fd());
                who.push((i, None));
                for (j, p) in vm.peers.iter().enumerate() {
                    fds.push(p.sock.as_fd());
                    who.push((i, Some(j)));
                }
            }
            match sys::poll_readable(&fds, None) {
                Ok(r) => r,
                Err(e) => {
                    warn!("ivshmem hub: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        };
        // A peer never writes: any readability (data or EOF) is a disconnect.
        let mut gone: Vec<Vec<u16>> = vec![Vec::new(); vms.len()];
        let mut accept = vec![false; vms.len()];
        for (&(i, j), _) in who.iter().zip(&ready[1..]).filter(|(_, r)| **r) {
            match j {
                Some(j) => gone[i].push(vms[i].peers[j].id),
                None => accept[i] = true,
            }
        }
        for (i, vm) in vms.iter_mut().enumerate() {
            vm.remove_peers(std::mem::take(&mut gone[i]));
            if accept[i] {
                vm.accept_all();
            }
        }
        if ready[0] {
            wake.drain();
            let todo = std::mem::take(&mut *lock(cmds));
            for c in todo {
                match c {
                    Cmd::Add(vm) => vms.push(*vm),
                    Cmd::Remove(name, tx) => {
                        let at = vms.iter().position(|v| v.name == name);
                        if let Some(at) = at {
                            drop(vms.remove(at));
                        }
                        let _ = tx.send(at.is_some());
                    }
                    Cmd::Peers(tx) => {
                        let _ = tx.send(
                            vms.iter()
                                .map(|v| (v.name.clone(), v.peers.len()))
                                .collect(),
                        );
                    }
                    Cmd::Stop => return,
                }
            }
        }
    }
}

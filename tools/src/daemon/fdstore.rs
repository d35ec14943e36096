//! systemd's file descriptor store (<https://systemd.io/FILE_DESCRIPTOR_STORE/>): what
//! lets the daemon restart without cutting any VM off.
//!
//! QEMU never reconnects its ivshmem chardev, and a running guest keeps the memory and
//! the eventfds it was given. So every fd a VM's link depends on is handed to the service
//! manager as the daemon creates it (`FDSTORE=1` on `$NOTIFY_SOCKET`, one name per fd)
//! and withdrawn when it goes (`FDSTOREREMOVE=1`):
//!
//! | name | fd |
//! |---|---|
//! | `NAME/mem` | the VM's shared memory (sealed memfd) |
//! | `NAME/listen` | the listening ivshmem socket |
//! | `NAME/port/P` | the listening socket of guest port P (the agent's, forwards) |
//! | `NAME/bell/K` | the daemon's own vector K (the eventfds the guest rings) |
//! | `NAME/peer/ID/sock` | the connection of peer ID (QEMU): kept open, QEMU sees no leave |
//! | `NAME/peer/ID/vec/K` | peer ID's vector K (what the daemon rings) |
//!
//! A restarted daemon gets them back (`$LISTEN_FDS`, `$LISTEN_FDNAMES`) and takes each VM
//! up where it was: same memory, same sockets, same peer ids and doorbells. Only the
//! link's sessions end: the daemon's endpoint attaches with a new epoch, the guest sees
//! the host restart and resets its sessions (agent clients reconnect). systemd drops a
//! stored connection by itself when QEMU closes it (POLLHUP).
//!
//! The store lives as long as the unit is not stopped: `systemctl restart` and
//! `Restart=on-failure` keep it, `systemctl stop` discards it (unless
//! `FileDescriptorStorePreserve=yes`, systemd 254 and later).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use tracing::warn;

/// The service manager's fd store, when the daemon runs with `--fd-store` under a
/// manager that has one (`$NOTIFY_SOCKET`).
#[derive(Debug, Default)]
pub struct FdStore {
    sock: Option<UnixDatagram>,
    /// Names stored, so a VM's can all be withdrawn.
    names: Mutex<BTreeSet<String>>,
    /// What the manager handed back at start, not yet taken.
    passed: Mutex<BTreeMap<String, Vec<OwnedFd>>>,
}

impl FdStore {
    /// No store: nothing survives a restart but the VM list.
    pub fn disabled() -> FdStore {
        FdStore::default()
    }

    /// The store of `$NOTIFY_SOCKET` (none without it), with the fds passed back to this
    /// process (`$LISTEN_PID`, `$LISTEN_FDS`, `$LISTEN_FDNAMES`) ready to be taken.
    pub fn from_env() -> FdStore {
        let mut store = FdStore::default();
        if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
            let connected = (|| {
                use std::os::linux::net::SocketAddrExt;
                let bytes = path.as_encoded_bytes();
                let addr = match bytes.strip_prefix(b"@") {
                    Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
                    None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
                };
                let s = UnixDatagram::unbound()?;
                s.connect_addr(&addr)?;
                io::Result::Ok(s)
            })();
            match connected {
                Ok(s) => store.sock = Some(s),
                Err(e) => warn!("fd store: cannot reach $NOTIFY_SOCKET {path:?}: {e}"),
            }
        }
        *store.passed.get_mut().unwrap_or_else(|e| e.into_inner()) = take_listen_fds();
        for name in store
            .passed
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
        {
            store
                .names
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone());
        }
        store
    }

    /// Whether fds are kept across a restart.
    pub fn enabled(&self) -> bool {
        self.sock.is_some()
    }

    /// Hands `fd` to the store as `name` (replacing nothing: names are unique).
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) {
        let Some(sock) = &self.sock else { return };
        let msg = format!("FDSTORE=1\nFDNAME={name}\n");
        let fds = [fd];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        let iov = [IoSlice::new(msg.as_bytes())];
        match rustix::net::sendmsg(sock, &iov, &mut control, rustix::net::SendFlags::empty()) {
            Ok(_) => {
                self.lock_names().insert(name.to_owned());
            }
            Err(e) => warn!(
                "fd store: could not store {name}: {e} (a daemon restart will lose it; is \
                 FileDescriptorStoreMax= large enough?)"
            ),
        }
    }

    /// Withdraws (and so closes in the manager) every fd stored as `name`.
    pub fn remove(&self, name: &str) {
        let Some(sock) = &self.sock else { return };
        if !self.lock_names().remove(name) {
            return;
        }
        let msg = format!("FDSTOREREMOVE=1\nFDNAME={name}\n");
        if let Err(e) = sock.send(msg.as_bytes()) {
            warn!("fd store: could not withdraw {name}: {e}");
        }
    }

    /// Withdraws every fd of VM `vm`.
    pub fn remove_vm(&self, vm: &str) {
        let prefix = format!("{vm}/");
        let names: Vec<String> = self
            .lock_names()
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .cloned()
            .collect();
        for n in names {
            self.remove(&n);
        }
    }

    /// Takes the fd passed back as `name`, if any.
    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        let mut passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
        let v = passed.get_mut(name)?;
        let fd = v.pop();
        if v.is_empty() {
            passed.remove(name);
        }
        fd
    }

    /// Names passed back under `prefix` and not taken yet.
    pub fn passed_names(&self, prefix: &str) -> Vec<String> {
        self.passed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Closes (and withdraws) what was passed back and not taken: VMs no longer listed.
    pub fn drop_untaken(&self) {
        let left: Vec<String> = self
            .passed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for n in left {
            self.remove(&n);
        }
        self.passed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn lock_names(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fds the service manager passed to this process, by name; the environment
/// variables are removed so that children do not take them for theirs.
fn take_listen_fds() -> BTreeMap<String, Vec<OwnedFd>> {
    let mut out: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return out;
    }
    let Some(n) = count.and_then(|c| c.parse::<RawFd>().ok()) else {
        return out;
    };
    let names: Vec<&str> = names.split(':').collect();
    const FIRST: RawFd = 3; // SD_LISTEN_FDS_START
    for i in 0..n.clamp(0, 65536) {
        let raw = FIRST + i;
        if !std::path::Path::new(&format!("/proc/self/fd/{raw}")).exists() {
            continue;
        }
        // SAFETY: the service manager passed fds 3 .. 3+LISTEN_FDS to this process for it
        // to own (sd_listen_fds(3)); LISTEN_PID is ours, so no other code in this process
        // took them, the variables are gone so none will, and /proc shows the fd is open.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
        let name = names.get(i as usize).copied().unwrap_or("unknown");
        out.entry(name.to_owned()).or_default().push(fd);
    }
    out
}

/// The fd's name for peer `id`'s connection.
pub fn peer_sock_name(vm: &str, id: u16) -> String {
    format!("{vm}/peer/{id}/sock")
}

/// The fd's name for peer `id`'s vector `k`.
pub fn peer_vec_name(vm: &str, id: u16, k: usize) -> String {
    format!("{vm}/peer/{id}/vec/{k}")
}

/// Stores `fd` as `name` if the store is on (a convenience for borrowed fds).
pub fn put(store: &FdStore, name: &str, fd: &impl AsFd) {
    store.put(name, fd.as_fd());
}

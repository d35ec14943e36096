//! Every system call of the ivshmem side. Each fd is an [`OwnedFd`] from the moment the
//! kernel hands it to us, so no path leaks or double-closes one.
//!
//! Public for programs that serve ivshmem peers themselves (ivring-host's daemon, which
//! multiplexes many VMs on one thread): eventfds, epoll, sealed memfds and the ivshmem
//! message with its fd. [`crate::Server`] and [`crate::Client`] need none of it.

use crate::error::{HostError, Result};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{MemfdFlags, Mode, SealFlags};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

/// An eventfd (`EFD_CLOEXEC | EFD_NONBLOCK`): a counter that reads as "rung" when non-zero.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// Creates a fresh, unsignalled eventfd.
    pub fn new() -> Result<Self> {
        let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
        rustix::event::eventfd(0, flags)
            .map(EventFd)
            .map_err(|e| HostError::io("create eventfd", e))
    }

    /// Wraps an eventfd received from a peer. Nothing checks that it is one: writes to
    /// anything else fail, and those failures are ignored like a missing peer.
    pub fn from_owned(fd: OwnedFd) -> Self {
        EventFd(fd)
    }

    /// Adds 1 to the counter. Never blocks; errors (a full counter, a peer's fd that is
    /// not an eventfd) are dropped, as a doorbell to a missing peer is.
    pub fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        loop {
            match rustix::io::write(&self.0, &one) {
                Err(Errno::INTR) => continue,
                _ => return,
            }
        }
    }

    /// Resets the counter to 0 (consumes pending signals). EAGAIN (not signalled) is fine.
    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        loop {
            match rustix::io::read(&self.0, &mut buf) {
                Err(Errno::INTR) => continue,
                _ => return,
            }
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Waits until any of `fds` is readable (or hung up / in error), or `timeout` passes
/// (`None`: forever). Returns which fds are ready; all false on timeout. Retries EINTR
/// with the remaining time.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Result<Vec<bool>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ts = left.map(|l| Timespec {
            tv_sec: l.as_secs().min(i64::MAX as u64) as _,
            tv_nsec: l.subsec_nanos() as _,
        });
        match rustix::event::poll(&mut pfds, ts.as_ref()) {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(HostError::io("poll", e)),
        }
    }
    let ready = PollFlags::IN | PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL;
    Ok(pfds.iter().map(|p| p.revents().intersects(ready)).collect())
}

/// Size in bytes of the file behind `fd`.
pub(crate) fn fd_size(fd: BorrowedFd<'_>) -> Result<u64> {
    let st = rustix::fs::fstat(fd).map_err(|e| HostError::io("fstat shared memory", e))?;
    Ok(st.st_size as u64)
}

/// A memfd of `size` bytes sealed against shrinking, growing and further sealing, so no
/// one who receives it can truncate it under a mapping (which would SIGBUS the mapper).
pub fn create_sealed_memfd(name: &str, size: u64) -> Result<OwnedFd> {
    // MFD_NOEXEC_SEAL (Linux 6.3) keeps the memory from ever being executed, and newer
    // kernels warn about memfds created without saying either way; older ones refuse the
    // flag with EINVAL.
    let flags = MemfdFlags::ALLOW_SEALING | MemfdFlags::CLOEXEC;
    let fd = match rustix::fs::memfd_create(name, flags | MemfdFlags::NOEXEC_SEAL) {
        Err(Errno::INVAL) => rustix::fs::memfd_create(name, flags),
        r => r,
    }
    .map_err(|e| HostError::io("memfd_create", e))?;
    rustix::fs::ftruncate(&fd, size)
        .map_err(|e| HostError::io(format!("size memfd to {size} bytes"), e))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(|e| HostError::io("seal memfd", e))?;
    Ok(fd)
}

/// Checks that `fd` is a memfd (or shmem file) sealed against shrinking.
pub fn check_memfd(fd: BorrowedFd<'_>, what: &str) -> Result<()> {
    match rustix::fs::fcntl_get_seals(fd) {
        Err(Errno::INVAL) => Err(HostError::NotMemfd { what: what.into() }),
        Err(e) => Err(HostError::io(format!("F_GET_SEALS on {what}"), e)),
        Ok(seals) if !seals.contains(SealFlags::SHRINK) => {
            Err(HostError::NotSealed { what: what.into() })
        }
        Ok(_) => Ok(()),
    }
}

/// Creates a listening UNIX stream socket at `path` whose file is never wider than 0600:
/// on Linux the socket file takes the mode of the socket inode (masked by the umask), so
/// we narrow the inode before `bind`, and chmod the file afterwards as well.
pub(crate) fn bind_unix_0600(path: &Path) -> Result<UnixListener> {
    let what = || format!("bind socket {}", path.display());
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| HostError::io("create socket", e))?;
    let mode = Mode::from_raw_mode(0o600);
    // Best effort: not every kernel lets a socket inode be chmodded; the chmod below is the
    // guarantee, this narrows the window before it.
    let _ = rustix::fs::fchmod(&fd, mode);
    let addr = SocketAddrUnix::new(path).map_err(|e| HostError::io(what(), e))?;
    rustix::net::bind(&fd, &addr).map_err(|e| HostError::io(what(), e))?;
    if let Err(e) = rustix::fs::chmod(path, mode) {
        let _ = std::fs::remove_file(path);
        return Err(HostError::io(format!("chmod 0600 {}", path.display()), e));
    }
    rustix::net::listen(&fd, 64)
        .map_err(|e| HostError::io(format!("listen on {}", path.display()), e))?;
    Ok(UnixListener::from(fd))
}

/// Device and inode of `path` (not following symlinks), to recognise our own socket file.
pub fn path_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// Sends one ivshmem message: a little-endian i64, with `fd` attached when given.
/// Retries EINTR and short writes (the fd goes with the first byte); never raises SIGPIPE.
pub fn send_msg(sock: BorrowedFd<'_>, val: i64, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let bytes = val.to_le_bytes();
    let mut sent = 0;
    let fds = fd.map(|f| [f]);
    while sent < bytes.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if sent == 0 {
            if let Some(fds) = &fds {
                control.push(SendAncillaryMessage::ScmRights(fds));
            }
        }
        let iov = [IoSlice::new(&bytes[sent..])];
        match rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives one ivshmem message: `Ok(None)` at a clean end of stream, else the value and
/// the fd that came with it. A message with more than one fd, or whose control data was
/// truncated (MSG_CTRUNC), is an error and every fd received is closed. Retries EINTR and
/// short reads. A receive timeout on the socket shows as `Io` with `WouldBlock`.
pub(crate) fn recv_msg(sock: BorrowedFd<'_>) -> Result<Option<(i64, Option<OwnedFd>)>> {
    let mut bytes = [0u8; 8];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut truncated = false;
    while got < bytes.len() {
        // Room for more fds than allowed, so a sender of two is seen as such, not as CTRUNC.
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut bytes[got..])];
        let res = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC);
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(iter) = msg {
                fds.extend(iter);
            }
        }
        // Anything else left in `control` (none expected) is closed when it drops.
        match res {
            Ok(m) => {
                truncated |= m.flags.contains(ReturnFlags::CTRUNC);
                if m.bytes == 0 {
                    if got == 0 && fds.is_empty() && !truncated {
                        return Ok(None);
                    }
                    return Err(HostError::io(
                        "receive ivshmem message",
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "stream ended inside a message",
                        ),
                    ));
                }
                got += m.bytes;
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(HostError::io("receive ivshmem message", e)),
        }
    }
    if truncated || fds.len() > 1 {
        let count = fds.len();
        drop(fds);
        return Err(HostError::BadFds { count, truncated });
    }
    Ok(Some((i64::from_le_bytes(bytes), fds.pop())))
}

/// The id of the group named `name`, looked up through the system's name service (NSS:
/// `/etc/group`, and LDAP, sssd or systemd-userdb groups where configured). `Ok(None)`
/// when no such group exists.
pub(crate) fn group_id(name: &str) -> io::Result<Option<u32>> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "group name holds a NUL"))?;
    let mut buf = vec![0u8; 1024];
    loop {
        let mut grp = MaybeUninit::<libc::group>::uninit();
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `cname` is NUL-terminated, `grp`
        // is writable storage for one `group`, `buf` is writable for `buf.len()` bytes and
        // `found` is a writable pointer. The strings the result points at live in `buf`;
        // only the gid (a plain integer) is read from it, before `buf` changes.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                grp.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Ok(None),
            // SAFETY: getgrnam_r returned 0 with a non-null result, which points at `grp`,
            // now initialized.
            0 => return Ok(Some(unsafe { (*found).gr_gid })),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            // Some NSS modules report "no such group" as one of these instead of 0.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            rc => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

/// An epoll instance (`EPOLL_CLOEXEC`): level-triggered interest in fds, each reported
/// with a `u64` of the caller's choosing.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// Creates an epoll instance watching nothing.
    pub fn new() -> Result<Epoll> {
        rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)
            .map(|fd| Epoll { fd })
            .map_err(|e| HostError::io("epoll_create", e))
    }

    fn flags(readable: bool) -> rustix::event::epoll::EventFlags {
        if readable {
            rustix::event::epoll::EventFlags::IN
        } else {
            // Nothing asked for: an eventfd then never shows (it has no error or hang-up).
            rustix::event::epoll::EventFlags::empty()
        }
    }

    /// Watches `fd` for readability, reported as `key`.
    pub fn add(&self, fd: BorrowedFd<'_>, key: u64) -> io::Result<()> {
        rustix::event::epoll::add(
            &self.fd,
            fd,
            rustix::event::epoll::EventData::new_u64(key),
            Epoll::flags(true),
        )
        .map_err(io::Error::from)
    }

    /// Starts (`readable`) or stops watching `fd`'s readability; it stays registered.
    pub fn watch(&self, fd: BorrowedFd<'_>, key: u64, readable: bool) -> io::Result<()> {
        rustix::event::epoll::modify(
            &self.fd,
            fd,
            rustix::event::epoll::EventData::new_u64(key),
            Epoll::flags(readable),
        )
        .map_err(io::Error::from)
    }

    /// Watches `fd` edge-triggered: each time its wait queue is woken (for an eventfd,
    /// each write to it) the next [`Epoll::wait_any`] returns, whether or not anyone
    /// read the fd in between, so an eventfd watched this way is never drained.
    pub fn add_edge(&self, fd: BorrowedFd<'_>, key: u64) -> io::Result<()> {
        rustix::event::epoll::add(
            &self.fd,
            fd,
            rustix::event::epoll::EventData::new_u64(key),
            rustix::event::epoll::EventFlags::IN | rustix::event::epoll::EventFlags::ET,
        )
        .map_err(io::Error::from)
    }

    /// Waits until a watched fd is ready or `timeout` passes (`None`: forever; rounded up
    /// to the millisecond, at most about 24 days). EINTR returns early.
    pub fn wait_any(&self, timeout: Option<Duration>) -> Result<()> {
        let mut events = [MaybeUninit::<rustix::event::epoll::Event>::uninit(); 4];
        let ts = timeout.map(|l| Timespec {
            tv_sec: l.as_secs().min(i32::MAX as u64 / 1000) as _,
            tv_nsec: l.subsec_nanos() as _,
        });
        match rustix::event::epoll::wait(&self.fd, &mut events, ts.as_ref()) {
            Ok(_) | Err(Errno::INTR) => Ok(()),
            Err(e) => Err(HostError::io("epoll_wait", e)),
        }
    }

    /// Forgets `fd`.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        rustix::event::epoll::delete(&self.fd, fd).map_err(io::Error::from)
    }

    /// Waits until a watched fd is ready or `timeout` passes (`None`: forever; rounded up
    /// to the millisecond), and puts the keys of the ready fds in `keys` (cleared first; at
    /// most 128, the rest are reported by the next call). EINTR returns none.
    pub fn wait(&self, keys: &mut Vec<u64>, timeout: Option<Duration>) -> Result<()> {
        keys.clear();
        let mut events = [MaybeUninit::<rustix::event::epoll::Event>::uninit(); 128];
        let ts = timeout.map(|l| Timespec {
            tv_sec: l.as_secs().min(i32::MAX as u64 / 1000) as _,
            tv_nsec: l.subsec_nanos() as _,
        });
        match rustix::event::epoll::wait(&self.fd, &mut events, ts.as_ref()) {
            Ok((ready, _)) => keys.extend(ready.iter().map(|e| e.data.u64())),
            Err(Errno::INTR) => {}
            Err(e) => return Err(HostError::io("epoll_wait", e)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn send_raw(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let n = rustix::net::sendmsg(
            sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
        assert_eq!(n, bytes.len());
    }

    #[test]
    fn message_round_trip_with_and_without_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        let efd = EventFd::new().unwrap();
        send_msg(a.as_fd(), -1, Some(efd.as_fd())).unwrap();
        send_msg(a.as_fd(), 0x1234_5678_9abc, None).unwrap();
        let (v, fd) = recv_msg(b.as_fd()).unwrap().unwrap();
        assert_eq!(v, -1);
        // The received fd is the same eventfd: signalling it makes ours readable.
        EventFd::from_owned(fd.unwrap()).signal();
        assert!(poll_readable(&[efd.as_fd()], Some(Duration::ZERO)).unwrap()[0]);
        let (v, fd) = recv_msg(b.as_fd()).unwrap().unwrap();
        assert_eq!(v, 0x1234_5678_9abc);
        assert!(fd.is_none());
        drop(a);
        assert!(recv_msg(b.as_fd()).unwrap().is_none(), "clean EOF");
    }

    #[test]
    fn short_reads_are_joined_and_fd_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let efd = EventFd::new().unwrap();
        let bytes = 7i64.to_le_bytes();
        send_raw(&a, &bytes[..3], &[efd.as_fd()]);
        send_raw(&a, &bytes[3..], &[]);
        let (v, fd) = recv_msg(b.as_fd()).unwrap().unwrap();
        assert_eq!(v, 7);
        assert!(fd.is_some());
    }

    #[test]
    fn two_fds_in_one_message_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let (e1, e2) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        send_raw(&a, &5i64.to_le_bytes(), &[e1.as_fd(), e2.as_fd()]);
        match recv_msg(b.as_fd()) {
            Err(HostError::BadFds { count: 2, .. }) => {}
            other => panic!("expected BadFds, got {other:?}"),
        }
    }

    #[test]
    fn eof_inside_a_message_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        send_raw(&a, &[1, 2, 3], &[]);
        drop(a);
        assert!(recv_msg(b.as_fd()).is_err());
    }

    #[test]
    fn socket_file_takes_the_mode_set_before_bind() {
        // What makes `bind_unix_0600` umask-safe: the file is born 0600 (or narrower, by
        // the umask), never wider, before the chmod that follows.
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ivring-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600)).unwrap();
        rustix::net::bind(&fd, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode & !0o600, 0, "socket born with mode {mode:o}");
    }

    #[test]
    fn sealed_memfd_has_its_seals() {
        let fd = create_sealed_memfd("t", 1 << 16).unwrap();
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        assert!(
            rustix::fs::ftruncate(&fd, 1 << 12).is_err(),
            "shrinking must fail"
        );
        assert_eq!(fd_size(fd.as_fd()).unwrap(), 1 << 16);
    }

    #[test]
    fn memfd_sealed_against_exec_where_the_kernel_can() {
        let fd = create_sealed_memfd("t", 1 << 16).unwrap();
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        let kernel_knows =
            rustix::fs::memfd_create("probe", MemfdFlags::CLOEXEC | MemfdFlags::NOEXEC_SEAL)
                .is_ok();
        assert_eq!(seals.contains(SealFlags::EXEC), kernel_knows, "{seals:?}");
    }

    #[test]
    fn groups_through_the_name_service() {
        // `root` is group 0 on every Linux system; the lookup goes through NSS.
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-ivring-test").unwrap(), None);
        assert!(group_id("bad\0name").is_err());
    }
}

//! Mapping the shared memory: a memfd from the ivshmem server (doorbell mode) or a file
//! under /dev/shm that QEMU maps with `memory-backend-file` (plain mode).
//!
//! Every mapping is validated first: a power of two from [`MIN_REGION`] to [`MAX_REGION`]
//! bytes. A memfd must also be sealed against shrinking, so no one can truncate it under
//! us (touching a truncated mapping raises SIGBUS). A plain file cannot be sealed; only
//! map files that you own.

use crate::error::{HostError, Result};
use crate::sys;
use ivring::SharedRegion;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// The smallest region ivring accepts: 64 KiB.
pub const MIN_REGION: u64 = 64 << 10;
/// The largest region ivring accepts: 1 GiB.
pub const MAX_REGION: u64 = 1 << 30;

/// Checks that `size` is a power of two from 64 KiB to 1 GiB; `what` names the region in
/// the error, which suggests the nearest usable size.
pub fn validate_size(what: &str, size: u64) -> Result<usize> {
    if is_region_size(size) {
        return Ok(size as usize);
    }
    Err(HostError::BadSize {
        what: what.into(),
        size,
        suggest: short_size(nearest_region_size(size)),
    })
}

/// Whether ivring can use a region of `size` bytes: a power of two from 64 KiB to 1 GiB.
pub fn is_region_size(size: u64) -> bool {
    size.is_power_of_two() && (MIN_REGION..=MAX_REGION).contains(&size)
}

/// The usable region size nearest to `size` from above (or 1 GiB).
pub fn nearest_region_size(size: u64) -> u64 {
    size.clamp(MIN_REGION, MAX_REGION)
        .next_power_of_two()
        .min(MAX_REGION)
}

/// `n` bytes as a size argument: "4M", "64K", "1G", or plain bytes.
pub fn short_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

/// `n` bytes for people: "64 KiB", "4 MiB", "1 GiB", "100 B" (the largest unit that
/// divides it exactly).
pub fn human_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// Creates a memfd of `size` bytes (validated) sealed with `F_SEAL_SHRINK | F_SEAL_GROW |
/// F_SEAL_SEAL`, as the server hands out.
pub fn create_sealed_memfd(name: &str, size: u64) -> Result<OwnedFd> {
    validate_size(&format!("memfd {name}"), size)?;
    sys::create_sealed_memfd(name, size)
}

/// Checks that `fd` is a memfd sealed against shrinking, so it is safe to map: a
/// [`HostError::NotMemfd`] for anything else (a pipe, a file on disk), a
/// [`HostError::NotSealed`] for a memfd or shmem file without `F_SEAL_SHRINK`.
pub fn check_memfd(fd: BorrowedFd<'_>) -> Result<()> {
    sys::check_memfd(fd, "shared-memory fd")
}

/// Owner of a mapping, kept alive by every clone of the region made from it.
struct Mapping {
    /// Dropped first: unregistered before the memory is unmapped.
    _guard: Option<crate::shrink::Guard>,
    _map: MmapRaw,
}

/// Maps the whole of `fd` shared and read-write after validating its size; `what` names
/// it in errors. Does not check seals: see [`map_memfd`].
pub fn map_fd(fd: BorrowedFd<'_>, what: &str) -> Result<SharedRegion> {
    map_fd_with(fd, what, None)
}

/// [`map_fd`] for memory that others may shrink: a fault on a shrunk page replaces the
/// mapping with private memory and rings `shrunk` instead of killing the process (see
/// the `shrink` module).
pub(crate) fn map_fd_guarded(
    fd: BorrowedFd<'_>,
    what: &str,
    shrunk: Arc<sys::EventFd>,
) -> Result<SharedRegion> {
    map_fd_with(fd, what, Some(shrunk))
}

fn map_fd_with(
    fd: BorrowedFd<'_>,
    what: &str,
    shrunk: Option<Arc<sys::EventFd>>,
) -> Result<SharedRegion> {
    let size = validate_size(what, sys::fd_size(fd)?)?;
    let map = MmapOptions::new()
        .len(size)
        .map_raw(&fd)
        .map_err(|e| HostError::io(format!("mmap {what}"), e))?;
    let base = map.as_mut_ptr();
    let len = map.len();
    let guard = shrunk.and_then(|n| crate::shrink::register(base, len, n));
    let owner = Arc::new(Mapping {
        _guard: guard,
        _map: map,
    });
    // SAFETY: `base` is a fresh shared read-write mapping of `len` bytes, page-aligned, and
    // `owner` keeps it mapped for as long as any clone of the region lives. Nothing in this
    // process holds references into it. If the file shrank later we would fault, which is
    // why the callers check seals (memfd), guard the mapping (memory joined unsealed), or
    // document that the file must be ours (plain).
    Ok(unsafe { SharedRegion::new(base, len, owner) })
}

/// A private (copy-on-write) mapping, unmapped on drop.
struct PrivateMapping {
    base: *mut std::ffi::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing about it is tied to a
// thread, and it is only unmapped (in drop) once no clone of the region refers to it.
unsafe impl Send for PrivateMapping {}
// SAFETY: as above; the owner gives no access to the memory itself.
unsafe impl Sync for PrivateMapping {}

impl Drop for PrivateMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned, and the region's clones,
        // which hold this owner, are all gone.
        let _ = unsafe { rustix::mm::munmap(self.base, self.len) };
    }
}

/// Maps the whole of `fd` private (copy-on-write) after validating its size: the pages
/// show what the other processes write, and nothing written through this mapping (this
/// crate's readers write nothing) could ever reach them. For looking at a link from
/// outside (the `status` commands of ivring-host and ivring-guest). `what` names it in errors.
pub fn map_fd_private(fd: BorrowedFd<'_>, what: &str) -> Result<SharedRegion> {
    use rustix::mm::{MapFlags, ProtFlags};
    let len = validate_size(what, sys::fd_size(fd)?)?;
    // SAFETY: a new mapping at an address the kernel chooses, so no existing memory is
    // affected; private, so no write through it reaches the file or its other mappers.
    let base = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
            fd,
            0,
        )
    }
    .map_err(|e| HostError::io(format!("mmap {what}"), e))?;
    let owner = Arc::new(PrivateMapping { base, len });
    // SAFETY: `base` is a fresh private read-write mapping of `len` bytes, page-aligned;
    // `owner` keeps it mapped while any clone of the region lives, and nothing in this
    // process holds references into it. The callers map sealed memfds or files whose
    // owners they trust, as for the shared mappings.
    Ok(unsafe { SharedRegion::new(base.cast(), len, owner) })
}

/// [`map_fd_private`] of a file opened read-only (a plain file, or a guest's sysfs
/// `resource2`).
pub fn map_file_private(path: &Path) -> Result<SharedRegion> {
    let file =
        File::open(path).map_err(|e| HostError::io(format!("open {}", path.display()), e))?;
    map_fd_private(file.as_fd(), &path.display().to_string())
}

/// Maps a memfd after checking that it is sealed against shrinking and validating its size.
pub fn map_memfd(fd: BorrowedFd<'_>) -> Result<SharedRegion> {
    check_memfd(fd)?;
    map_fd(fd, "memfd")
}

/// Maps an existing file (plain mode: the `mem-path` of QEMU's `memory-backend-file`).
pub fn map_file(path: &Path) -> Result<SharedRegion> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            let e = match e.kind() {
                std::io::ErrorKind::NotFound => std::io::Error::new(
                    e.kind(),
                    "no such file: give its size (--size) to create it, or start first the \
                     program that creates it (QEMU's memory-backend-file)",
                ),
                _ => e,
            };
            HostError::io(format!("open {}", path.display()), e)
        })?;
    map_fd(file.as_fd(), &path.display().to_string())
}

/// Opens `path` read-write, creating it (mode 0600) with `size` bytes if it does not
/// exist. An existing file keeps its size, which must then equal `size`.
pub fn open_or_create_file(path: &Path, size: u64) -> Result<File> {
    let name = path.display().to_string();
    validate_size(&name, size)?;
    let open = |create: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if create {
            o.create_new(true).mode(0o600);
        }
        o.open(path)
    };
    let file = match open(true) {
        Ok(f) => {
            f.set_len(size)
                .map_err(|e| HostError::io(format!("size {name} to {size} bytes"), e))?;
            return Ok(f);
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            open(false).map_err(|e| HostError::io(format!("open {name}"), e))?
        }
        Err(e) => return Err(HostError::io(format!("create {name}"), e)),
    };
    let have = sys::fd_size(file.as_fd())?;
    if have != size {
        validate_size(&name, have)?;
        return Err(HostError::io(
            format!("open {name}"),
            std::io::Error::other(format!(
                "it is {have} bytes, not the {size} asked for; pass its size or remove it"
            )),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_words() {
        assert_eq!(human_size(64 << 10), "64 KiB");
        assert_eq!(human_size(4 << 20), "4 MiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size((1 << 20) + (1 << 10)), "1025 KiB");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(short_size(3 << 20), "3M");
        assert_eq!(nearest_region_size(3 << 20), 4 << 20);
        assert_eq!(nearest_region_size(1), MIN_REGION);
        assert_eq!(nearest_region_size(u64::MAX), MAX_REGION);
        assert!(is_region_size(64 << 10) && !is_region_size(32 << 10));
    }
}

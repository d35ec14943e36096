//! The shared region: memory another process writes whenever it likes.
//!
//! [`SharedRegion`] owns a pointer and a length and hands out only bounds-checked
//! operations: atomic 64-bit words and copies into or out of private buffers. It never
//! gives out a `&[u8]` or `&mut [u8]` into the region, because the peer may change those
//! bytes under us; every value read from it is a private copy that the caller checks.
//!
//! Offsets passed to these methods come from our own validated state, never straight
//! from the peer, so an out-of-range offset is a bug in this crate and panics.

use crate::shm::sync::{AtomicU64, Ordering};
use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// A region of memory shared with a peer process: an ivshmem BAR2, a memfd mapping, or
/// heap memory in tests.
#[derive(Clone)]
pub struct SharedRegion {
    base: *mut u8,
    len: usize,
    /// Keeps the backing memory (a mapping, a heap block) alive as long as any clone.
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the region is only accessed through atomics and raw copies whose races with
// the peer are part of the protocol; nothing in it is tied to a thread.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; `&SharedRegion` offers no access that is not already cross-process safe.
unsafe impl Sync for SharedRegion {}

impl fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegion")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

/// Heap memory standing in for a shared region (tests, loopback benches).
struct HeapBlock {
    #[cfg_attr(not(loom), allow(dead_code))]
    words: Box<[AtomicU64]>,
}

impl SharedRegion {
    /// Wraps memory that another process may share.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, aligned to 8 bytes, for as
    /// long as `owner` (and so every clone of the result) lives. Other code in this process
    /// must not hold references into it; other processes may write it at any time.
    pub unsafe fn new(base: *mut u8, len: usize, owner: Arc<dyn Any + Send + Sync>) -> Self {
        assert_eq!(base as usize % 8, 0, "shared region must be 8-byte aligned");
        SharedRegion {
            base,
            len,
            _owner: owner,
        }
    }

    /// A zeroed heap block of `len` bytes (rounded up to 8) standing in for shared memory.
    pub fn heap(len: usize) -> Self {
        let words: Box<[AtomicU64]> = (0..len.div_ceil(8)).map(|_| AtomicU64::new(0)).collect();
        let base = words.as_ptr() as *mut u8;
        let block = Arc::new(HeapBlock { words });
        // SAFETY: `base` points at `len` bytes (rounded up to 8) of the boxed words, which
        // `block` keeps alive; AtomicU64 is 8-aligned and allows shared mutation.
        unsafe { SharedRegion::new(base, len, block) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn check(&self, off: usize, n: usize) {
        assert!(
            off <= self.len && n <= self.len - off,
            "shared region access {off}+{n} outside {}",
            self.len
        );
    }

    #[cfg(not(loom))]
    #[inline]
    fn word(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        assert_eq!(off % 8, 0, "unaligned shared word at {off}");
        // SAFETY: in bounds and 8-aligned (checked above; base is 8-aligned). An AtomicU64
        // may be shared and mutated concurrently, including by another process, so this
        // reference never observes a value that Rust assumes stable.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    #[cfg(loom)]
    #[inline]
    fn word(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        assert_eq!(off % 8, 0, "unaligned shared word at {off}");
        let block = self
            ._owner
            .downcast_ref::<HeapBlock>()
            .expect("loom runs only on heap regions");
        &block.words[off / 8]
    }

    /// Loads the 64-bit word at `off` (8-aligned).
    #[inline]
    pub fn load_u64(&self, off: usize, order: Ordering) -> u64 {
        self.word(off).load(order)
    }

    /// Stores the 64-bit word at `off` (8-aligned).
    #[inline]
    pub fn store_u64(&self, off: usize, val: u64, order: Ordering) {
        self.word(off).store(val, order)
    }

    /// Copies `buf.len()` bytes at `off` out of the region into a private buffer.
    ///
    /// The bytes may be changing while they are copied; the caller must treat the copy as
    /// untrusted input and validate it.
    #[inline]
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        self.check(off, buf.len());
        #[cfg(not(loom))]
        // SAFETY: the source range is inside the region (checked) and the destination is a
        // private buffer, so they cannot overlap. A concurrent write by the peer can only
        // give us torn bytes, which the caller validates; no reference into the region is made.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(off), buf.as_mut_ptr(), buf.len())
        }
        #[cfg(loom)]
        for (i, b) in buf.iter_mut().enumerate() {
            let at = off + i;
            *b = (self.word(at & !7).load(Ordering::Relaxed) >> ((at & 7) * 8)) as u8;
        }
    }

    /// Appends the `len` bytes at `off` to `out` (as [`SharedRegion::read`], without
    /// zeroing the room first).
    #[inline]
    pub fn read_append(&self, off: usize, len: usize, out: &mut Vec<u8>) {
        #[cfg(not(loom))]
        {
            self.check(off, len);
            out.reserve(len);
            let start = out.len();
            // SAFETY: the source range is inside the region (checked); the destination is
            // the vector's spare capacity, reserved above, private and not overlapping.
            // Every one of the `len` bytes is written before the length covers them; torn
            // bytes from a concurrent peer write are validated by the caller as in `read`.
            unsafe {
                std::ptr::copy_nonoverlapping(self.base.add(off), out.as_mut_ptr().add(start), len);
                out.set_len(start + len);
            }
        }
        #[cfg(loom)]
        {
            let start = out.len();
            out.resize(start + len, 0);
            self.read(off, &mut out[start..]);
        }
    }

    /// Copies `buf` into the region at `off`.
    #[inline]
    pub fn write(&self, off: usize, buf: &[u8]) {
        self.check(off, buf.len());
        #[cfg(not(loom))]
        // SAFETY: the destination range is inside the region (checked); the source is a
        // private buffer. Only this side writes these bytes under the ring protocol; a peer
        // that writes them anyway can only corrupt data it will itself read and validate.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.base.add(off), buf.len())
        }
        #[cfg(loom)]
        for (i, b) in buf.iter().enumerate() {
            let at = off + i;
            let w = self.word(at & !7);
            let shift = (at & 7) * 8;
            let old = w.load(Ordering::Relaxed);
            w.store(
                (old & !(0xff << shift)) | ((*b as u64) << shift),
                Ordering::Relaxed,
            );
        }
    }

    /// Sets `n` bytes at `off` to zero.
    pub fn zero(&self, off: usize, n: usize) {
        self.check(off, n);
        const ZEROS: [u8; 256] = [0; 256];
        let mut done = 0;
        while done < n {
            let chunk = (n - done).min(ZEROS.len());
            self.write(off + done, &ZEROS[..chunk]);
            done += chunk;
        }
    }
}

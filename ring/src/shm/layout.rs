//! The shared layout: where every word and ring lives in the region (PROTOCOL.md §1).
//!
//! The geometry is a pure function of the region size and the layout version, so neither
//! side has to trust the other's description of it: the host writes the header for
//! diagnostics and for a guest to recognise a laid-out region, and the guest checks that
//! the header says exactly what it computed itself.

use crate::shm::region::SharedRegion;
use crate::shm::sync::Ordering;
use std::time::{Duration, Instant};

/// `b"ivring\0\0"` read as a little-endian u64: the first word of a laid-out region.
pub const MAGIC: u64 = u64::from_le_bytes(*b"ivring\0\0");
/// The layout and wire format version this crate speaks.
pub const VERSION: u32 = 1;
/// Smallest region ivring works in.
pub const MIN_REGION: usize = 64 << 10;
/// Largest region ivring works in.
pub const MAX_REGION: usize = 1 << 30;
/// Bytes before the first ring: the header and both side blocks.
pub const CONTROL_SIZE: usize = 4096;
/// Records (frames and padding) start and end on this alignment.
pub const RECORD_ALIGN: u64 = 16;
/// One line of the layout: each side block word group sits on its own 128-byte line
/// (two 64-byte cache lines, as adjacent-line prefetch pairs them).
pub const LINE: usize = 128;

/// Header word offsets (host writes, both read).
pub(crate) mod header {
    pub const MAGIC: usize = 0;
    /// `version as u64 | (CONTROL_SIZE as u64) << 32`
    pub const VERSION: usize = 8;
    pub const REGION_SIZE: usize = 16;
    pub const H2G_OFFSET: usize = 24;
    pub const H2G_CAPACITY: usize = 32;
    pub const G2H_OFFSET: usize = 40;
    pub const G2H_CAPACITY: usize = 48;
}

/// Offset of the host's side block.
pub const HOST_BLOCK: usize = 4 * LINE;
/// Offset of the guest's side block.
pub const GUEST_BLOCK: usize = 8 * LINE;

/// Word offsets inside a side block. Every word is written only by the side that owns the
/// block, and read by both. Public so that tools can show what each side published (e.g.
/// `ivring-guest probe` reads the host's `EPOCH` and `PEER_ID` at `HOST_BLOCK + ...`).
pub mod side {
    use super::LINE;
    /// Line 0: who is attached.
    /// The owner's epoch: bumped at every attach and every local reset; 0 = never attached.
    pub const EPOCH: usize = 0;
    /// `PEER_ID_VALID | ivshmem peer id`.
    pub const PEER_ID: usize = 8;
    /// Bumped by the owner every heartbeat period while attached.
    pub const HEARTBEAT: usize = 16;
    /// The other side's epoch that the owner has reset its indices for (PROTOCOL.md §3).
    pub const ACK: usize = 24;
    /// 1 if the owner polls: it never sets `RX_NEED_WAKEUP` or `TX_NEED_SPACE`, so the
    /// other side may publish and release without the wakeup fences and never rings it.
    /// Read once per epoch; any other value means "may sleep".
    pub const POLLS: usize = 32;
    /// 1 if the owner numbers its armings: each time it sets `RX_NEED_WAKEUP` it stores a
    /// new nonzero number, and arms afresh before every sleep that counts on a ring, so
    /// the other side may ring once per number. Read once per epoch; any other value
    /// means "ring on every publish that finds `RX_NEED_WAKEUP` nonzero".
    pub const ARMINGS: usize = 40;
    /// Line 1: write index of the ring the owner writes (free-running byte count).
    pub const TX_HEAD: usize = LINE;
    /// Line 2: read index of the ring the owner reads (free-running byte count).
    pub const RX_TAIL: usize = 2 * LINE;
    /// Line 3: nonzero while the owner is about to sleep waiting for data (ring me on
    /// publish): the number of that arming if it says so in `ARMINGS`.
    pub const RX_NEED_WAKEUP: usize = 3 * LINE;
    /// Line 3: 0, or the reader tail position the owner's blocked writer is waiting for.
    pub const TX_NEED_SPACE: usize = 3 * LINE + 8;
}

/// Set in the `PEER_ID` word when the id beside it is meaningful.
pub const PEER_ID_VALID: u64 = 1 << 32;

/// Which side of the link a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Lays out the region; writes the host-to-guest ring.
    Host,
    /// Waits for a laid-out region; writes the guest-to-host ring.
    Guest,
}

impl Role {
    /// The other side.
    pub fn other(self) -> Role {
        match self {
            Role::Host => Role::Guest,
            Role::Guest => Role::Host,
        }
    }
    pub(crate) fn own_block(self) -> usize {
        match self {
            Role::Host => HOST_BLOCK,
            Role::Guest => GUEST_BLOCK,
        }
    }
    pub(crate) fn peer_block(self) -> usize {
        match self {
            Role::Host => GUEST_BLOCK,
            Role::Guest => HOST_BLOCK,
        }
    }
    /// Low bit of the session ids this side opens.
    pub(crate) fn id_bit(self) -> u64 {
        match self {
            Role::Host => 0,
            Role::Guest => 1,
        }
    }
}

/// Where the two rings lie in a region of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Region size in bytes.
    pub region_size: u64,
    /// Offset of the host-to-guest ring's data.
    pub h2g_offset: u64,
    /// Bytes in each ring (a multiple of [`RECORD_ALIGN`]).
    pub capacity: u64,
    /// Offset of the guest-to-host ring's data.
    pub g2h_offset: u64,
}

/// Why a region cannot carry ivring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// Not a power of two between [`MIN_REGION`] and [`MAX_REGION`].
    BadSize(u64),
    /// The first word is neither zero (not laid out yet) nor [`MAGIC`].
    BadMagic(u64),
    /// Laid out by a different layout version.
    BadVersion(u32),
    /// The header disagrees with the geometry for this size.
    BadHeader(&'static str),
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutError::BadSize(n) => write!(
                f,
                "shared region is {n} bytes; ivring needs a power of two from 64 KiB to 1 GiB"
            ),
            LayoutError::BadMagic(m) => write!(
                f,
                "shared region starts with {m:#018x}, not the ivring magic: is another program using this memory?"
            ),
            LayoutError::BadVersion(v) => write!(
                f,
                "shared region has ivring layout version {v}, this build speaks {VERSION}: run the same ivring version on both sides"
            ),
            LayoutError::BadHeader(what) => {
                write!(f, "shared region header is inconsistent ({what})")
            }
        }
    }
}

impl std::error::Error for LayoutError {}

impl Geometry {
    /// The geometry for a region of `size` bytes.
    pub fn for_size(size: usize) -> Result<Geometry, LayoutError> {
        if !size.is_power_of_two() || !(MIN_REGION..=MAX_REGION).contains(&size) {
            return Err(LayoutError::BadSize(size as u64));
        }
        let capacity = ((size - CONTROL_SIZE) as u64 / 2) & !(RECORD_ALIGN - 1);
        Ok(Geometry {
            region_size: size as u64,
            h2g_offset: CONTROL_SIZE as u64,
            capacity,
            g2h_offset: CONTROL_SIZE as u64 + capacity,
        })
    }

    /// Largest payload of one frame: small enough that a record always fits an empty ring
    /// whatever the padding, large enough to amortise the header.
    pub fn max_payload(&self) -> usize {
        ((self.capacity / 4).min(64 << 10) - 16) as usize
    }

    /// Offset of the data of the ring `role` writes.
    pub(crate) fn tx_offset(&self, role: Role) -> usize {
        match role {
            Role::Host => self.h2g_offset as usize,
            Role::Guest => self.g2h_offset as usize,
        }
    }

    /// Offset of the data of the ring `role` reads.
    pub(crate) fn rx_offset(&self, role: Role) -> usize {
        match role {
            Role::Host => self.g2h_offset as usize,
            Role::Guest => self.h2g_offset as usize,
        }
    }

    /// Writes the header (host only). The magic goes last, with Release, so a guest that
    /// sees it (Acquire in [`Geometry::read_header`]) sees every other header word.
    pub(crate) fn write_header(&self, region: &SharedRegion) {
        let w = |off, v| region.store_u64(off, v, Ordering::Relaxed);
        w(
            header::VERSION,
            VERSION as u64 | (CONTROL_SIZE as u64) << 32,
        );
        w(header::REGION_SIZE, self.region_size);
        w(header::H2G_OFFSET, self.h2g_offset);
        w(header::H2G_CAPACITY, self.capacity);
        w(header::G2H_OFFSET, self.g2h_offset);
        w(header::G2H_CAPACITY, self.capacity);
        // SYNC POINT header: Release pairs with the Acquire load of MAGIC in read_header.
        region.store_u64(header::MAGIC, MAGIC, Ordering::Release);
    }

    /// Reads and checks the header: `Ok(None)` while nobody has laid the region out.
    pub fn read_header(region: &SharedRegion) -> Result<Option<Geometry>, LayoutError> {
        let expect = Geometry::for_size(region.len())?;
        // SYNC POINT header: Acquire pairs with the Release store in write_header.
        let magic = region.load_u64(header::MAGIC, Ordering::Acquire);
        if magic == 0 {
            return Ok(None);
        }
        if magic != MAGIC {
            return Err(LayoutError::BadMagic(magic));
        }
        let r = |off| region.load_u64(off, Ordering::Relaxed);
        let version = r(header::VERSION);
        if version as u32 != VERSION {
            return Err(LayoutError::BadVersion(version as u32));
        }
        if version >> 32 != CONTROL_SIZE as u64 {
            return Err(LayoutError::BadHeader("control size"));
        }
        if r(header::REGION_SIZE) != expect.region_size {
            return Err(LayoutError::BadHeader("region size"));
        }
        if r(header::H2G_OFFSET) != expect.h2g_offset
            || r(header::G2H_OFFSET) != expect.g2h_offset
            || r(header::H2G_CAPACITY) != expect.capacity
            || r(header::G2H_CAPACITY) != expect.capacity
        {
            return Err(LayoutError::BadHeader("ring offsets"));
        }
        Ok(Some(expect))
    }

    /// What a program about to wait in [`Geometry::await_header`] should tell its user:
    /// `None` when the header is laid out right, not laid out yet, or beyond repair (the
    /// region's size is wrong).
    pub fn header_wait_notice(region: &SharedRegion, bound: Duration) -> Option<String> {
        match Geometry::read_header(region) {
            Ok(_) | Err(LayoutError::BadSize(_)) => None,
            Err(e) => Some(format!(
                "{e}; waiting up to {bound:?} for the host program to lay it out again"
            )),
        }
    }

    /// [`Geometry::read_header`], waiting up to `bound` while the header is wrong: a
    /// peer may have overwritten it, and the host rewrites it once per heartbeat period.
    /// A region of the wrong size fails at once; a header still wrong after `bound` is
    /// reported as it was last read.
    pub fn await_header(
        region: &SharedRegion,
        bound: Duration,
    ) -> Result<Option<Geometry>, LayoutError> {
        let deadline = Instant::now() + bound;
        loop {
            match Geometry::read_header(region) {
                Err(LayoutError::BadSize(n)) => return Err(LayoutError::BadSize(n)),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
                ok => return ok,
            }
        }
    }
}

const _: () = {
    assert!(side::TX_NEED_SPACE + 8 <= 4 * LINE);
    assert!(HOST_BLOCK >= header::G2H_CAPACITY + 8);
    assert!(HOST_BLOCK + 4 * LINE <= GUEST_BLOCK);
    assert!(GUEST_BLOCK + 4 * LINE <= CONTROL_SIZE);
    assert!(CONTROL_SIZE.is_multiple_of(LINE));
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert!(Geometry::for_size(32 << 10).is_err());
        assert!(Geometry::for_size(3 << 20).is_err());
        assert!(Geometry::for_size(2 << 30).is_err());
        let g = Geometry::for_size(64 << 10).unwrap();
        assert_eq!(g.capacity % RECORD_ALIGN, 0);
        assert!(g.g2h_offset + g.capacity <= g.region_size);
        let g = Geometry::for_size(1 << 30).unwrap();
        assert_eq!(g.max_payload(), (64 << 10) - 16);
    }

    #[test]
    fn header_round_trip_and_rejects() {
        let r = SharedRegion::heap(64 << 10);
        assert_eq!(Geometry::read_header(&r), Ok(None));
        let g = Geometry::for_size(64 << 10).unwrap();
        g.write_header(&r);
        assert_eq!(Geometry::read_header(&r), Ok(Some(g)));
        r.store_u64(header::VERSION, 7, Ordering::Relaxed);
        assert_eq!(Geometry::read_header(&r), Err(LayoutError::BadVersion(7)));
        r.store_u64(header::MAGIC, 0xdead, Ordering::Relaxed);
        assert_eq!(
            Geometry::read_header(&r),
            Err(LayoutError::BadMagic(0xdead))
        );
        let small = SharedRegion::heap(4096);
        assert_eq!(
            Geometry::read_header(&small),
            Err(LayoutError::BadSize(4096))
        );
    }
}

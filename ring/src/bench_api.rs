//! Crate internals for the criterion benches in `benches/` (not a stable API).

use crate::shm::layout::{Geometry, Role};
use crate::shm::region::SharedRegion;
use crate::wire::frame::{Header, Kind};
use crate::wire::ring::{Consumer, Producer};

/// One SPSC ring on heap memory: the host's writing half and the guest's reading half.
pub struct RingPair {
    tx: Producer,
    rx: Consumer,
    max_payload: usize,
}

impl RingPair {
    /// A ring in a heap region of `region_size` bytes (a power of two, 64 KiB or more).
    pub fn new(region_size: usize) -> RingPair {
        let region = SharedRegion::heap(region_size);
        let g = Geometry::for_size(region_size).expect("region size");
        let tx = Producer::new(
            region.clone(),
            g.tx_offset(Role::Host),
            g.capacity,
            Role::Host.own_block(),
            Role::Host.peer_block(),
        );
        let rx = Consumer::new(
            region,
            g.rx_offset(Role::Guest),
            g.capacity,
            Role::Guest.own_block(),
            Role::Guest.peer_block(),
        );
        RingPair {
            tx,
            rx,
            max_payload: g.max_payload(),
        }
    }

    /// Writes one Data frame without publishing; `false` when the ring is full.
    #[inline]
    pub fn push(&mut self, session: u64, payload: &[u8]) -> bool {
        let h = Header {
            kind: Kind::Data,
            flags: 0,
            len: payload.len() as u32,
            session,
        };
        self.tx.push(&h, payload).expect("heap ring indices")
    }

    /// Stores the head (and the wakeup check), as a writer does after a batch.
    #[inline]
    pub fn publish(&mut self) -> bool {
        self.tx.publish()
    }

    /// Copies the next frame's payload into `buf`: its session and length, or `None`
    /// when the ring is empty. Releases the space at once.
    #[inline]
    pub fn pop(&mut self, buf: &mut [u8]) -> Option<(u64, usize)> {
        if !self.rx.has_cached() && self.rx.available().expect("heap ring indices") == 0 {
            return None;
        }
        let rec = self.rx.next(self.max_payload).expect("valid frame")?;
        let n = rec.header.len as usize;
        self.rx.read_payload(rec.payload_at, &mut buf[..n]);
        self.rx.consume(&rec.header);
        self.rx.release();
        Some((rec.header.session, n))
    }
}

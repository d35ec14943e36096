//! How a link wakes its peer and is woken: the doorbell a transport hands to the ring.
//!
//! A doorbell carries no data and coalesces (ten rings may read as one): it only ever
//! means "look at the shared state again". All truth lives in shared memory.

use std::time::Duration;

/// The signalling half of a link, supplied by the transport: eventfds on the host, the
/// ivshmem Doorbell register and MSI-X (or polling) in a guest, a condvar in tests.
pub trait Doorbell: Send + Sync {
    /// Our own ivshmem peer id, published in our side block so the peer knows whom to ring.
    fn own_id(&self) -> u16;

    /// Rings vector 0 of peer `peer`. Never blocks; a peer that does not exist is ignored.
    fn ring(&self, peer: u16);

    /// Blocks until our doorbell rings, [`Doorbell::interrupt`] is called, or `timeout`
    /// passes (`None`: no limit). Consumes pending rings. May return early for no reason.
    fn wait(&self, timeout: Option<Duration>);

    /// Makes a current or the next [`Doorbell::wait`] return at once (from another thread).
    fn interrupt(&self);

    /// Whether rings from the peer really wake [`Doorbell::wait`]. When false (ivshmem-plain,
    /// a guest without VFIO) the link polls with backoff instead of relying on them.
    fn can_wait(&self) -> bool {
        true
    }

    /// What the transport knows of peer `peer`: `Some(false)` once it has left (the ivshmem
    /// server said so), `Some(true)` while present, `None` when the transport cannot tell.
    fn peer_present(&self, peer: u16) -> Option<bool> {
        let _ = peer;
        None
    }
}

/// An in-process doorbell pair (tests, single-process loopback). Peer ids are 0 and 1.
pub mod local {
    use super::Doorbell;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    #[derive(Default)]
    struct Bell {
        rung: Mutex<bool>,
        cv: Condvar,
    }

    impl Bell {
        fn ring(&self) {
            *self.rung.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.cv.notify_all();
        }
    }

    /// One end of a [`pair`].
    pub struct LocalDoorbell {
        id: u16,
        own: Arc<Bell>,
        peer: Arc<Bell>,
        peer_present: Arc<Mutex<[bool; 2]>>,
    }

    /// Two doorbells ringing each other: ids 0 and 1.
    pub fn pair() -> (LocalDoorbell, LocalDoorbell) {
        let a = Arc::new(Bell::default());
        let b = Arc::new(Bell::default());
        let present = Arc::new(Mutex::new([true, true]));
        (
            LocalDoorbell {
                id: 0,
                own: a.clone(),
                peer: b.clone(),
                peer_present: present.clone(),
            },
            LocalDoorbell {
                id: 1,
                own: b,
                peer: a,
                peer_present: present,
            },
        )
    }

    impl LocalDoorbell {
        /// Marks this end as gone (or back), as an ivshmem server would report it, and
        /// wakes the other end so it notices.
        pub fn set_present(&self, present: bool) {
            self.peer_present.lock().unwrap_or_else(|e| e.into_inner())[self.id as usize] = present;
            self.peer.ring();
        }
    }

    impl Doorbell for LocalDoorbell {
        fn own_id(&self) -> u16 {
            self.id
        }
        fn ring(&self, peer: u16) {
            if peer == 1 - self.id {
                self.peer.ring();
            }
        }
        fn wait(&self, timeout: Option<Duration>) {
            let mut rung = self.own.rung.lock().unwrap_or_else(|e| e.into_inner());
            if !*rung {
                rung = match timeout {
                    Some(t) => {
                        self.own
                            .cv
                            .wait_timeout(rung, t)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => self.own.cv.wait(rung).unwrap_or_else(|e| e.into_inner()),
                };
            }
            *rung = false;
        }
        fn interrupt(&self) {
            self.own.ring();
        }
        fn peer_present(&self, peer: u16) -> Option<bool> {
            let p = self.peer_present.lock().unwrap_or_else(|e| e.into_inner());
            p.get(peer as usize).copied()
        }
    }
}

/// A doorbell for links with none (ivshmem-plain, a shared file): rings do nothing and
/// waits are short sleeps, so the link polls shared memory with backoff.
#[derive(Default)]
pub struct Polling {
    interrupted: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Polling {
    /// A polling doorbell.
    pub fn new() -> Polling {
        Polling::default()
    }
}

impl Doorbell for Polling {
    fn own_id(&self) -> u16 {
        0
    }
    fn ring(&self, _peer: u16) {}
    fn wait(&self, timeout: Option<Duration>) {
        let t = timeout.unwrap_or(Duration::from_millis(1));
        let mut i = self.interrupted.lock().unwrap_or_else(|e| e.into_inner());
        if !*i {
            i = self
                .cv
                .wait_timeout(i, t)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *i = false;
    }
    fn interrupt(&self) {
        *self.interrupted.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
    fn can_wait(&self) -> bool {
        false
    }
}

//! ivring: a lock-free ring pair in ivshmem shared memory, with framed, explicitly
//! opened and closed sessions.
//!
//! This crate knows no operating system: it runs on any [`SharedRegion`] with any
//! [`Doorbell`], so its tests run on heap memory. The wire format is in `PROTOCOL.md`.
//!
//! An [`Endpoint`] is one side of a link; [`Endpoint::listen`] and [`Endpoint::connect`]
//! give [`Session`]s, which are `std::io::Read + Write` and behave like sockets.
//!
//! Features: `tokio` adds async sessions and listeners (`ivring::tokio`), `mio` adds
//! `mio::event::Source` for them (`ivring::mio`, Linux only: the one place in this crate
//! with a file descriptor).
//!
//! # Layers
//!
//! Each imports only those before it:
//! - `shm`: the region (every access a bounds-checked copy, never a reference), the
//!   [`Doorbell`] trait, the layout of the header and the side blocks, and the one atomics shim (`shm/sync.rs`)
//!   that every atomic of the crate comes from, so loom sees them all;
//! - `wire`: frames (`wire/frame.rs`) and the SPSC byte ring (`wire/ring.rs`);
//! - `link`: one link's state, single-threaded, without locks, threads or a clock (time
//!   comes in as an argument): the handshake and liveness (`link/mod.rs`), receiving
//!   (`link/rx.rs`: demux, reads through the session's buffer or straight from the ring,
//!   the credit we grant), transmitting (`link/tx.rs`: control frames, Data frames,
//!   publishing, waiting for space) and zero-copy parking (`link/park.rs`). Each call
//!   says what must happen next in the `Actions` it is given (ring the peer, wake these
//!   sessions' callers, wait for ring space); the link does none of it itself;
//! - `runtime`: the only owner of locks, threads (the keeper), spinning and waiting on
//!   the doorbell; it acts on the link's `Actions`. The keeper reads the ring for callers
//!   that do not (sleepers, callbacks, queued control frames) and keeps out of the way
//!   of callers that read it themselves;
//! - `api`: [`Endpoint`], [`Listener`], [`Session`], zero-copy slots and views,
//!   [`Readiness`], and the `tokio` and `mio` wrappers.
//!
//! One byte, from [`Session::write`](std::io::Write::write) to the peer's
//! [`Session::read`](std::io::Read::read), is copied in four files: `api/endpoint.rs`
//! (`write_stream` hands the caller's slice on; `write_message` for a message session)
//! → `link/tx.rs` (`step`, `write_frame`:
//! one frame within the credit, then `publish`) → `wire/ring.rs` (`Producer::push`
//! copies it into the ring; a write of 16 KiB or more takes `Producer::reserve_copy`
//! instead and copies after the runtime's lock is released, the head stored once the
//! copy is done; on the other side `Consumer` finds it) → `link/rx.rs`
//! (`read_direct` copies it straight into the reader's buffer, `read_any` into an event
//! loop's buffer with the frames of other sessions after it, or `pump` into the
//! session's buffer and `read` from there: a message of several frames, or data behind
//! what the session already holds). Frames of 1 KiB or more that
//! `read_direct` meets it lends instead (`Consumer::lend`), and when they add up to
//! 16 KiB `runtime/mod.rs` (`copy_lent`) copies them out after the lock is released, as
//! the write side does (fewer it copies at once: a loan costs a second pass through the
//! lock).
//! Beside it, `runtime/mod.rs` (`wait_locked_on`) decides when a call that found no
//! credit, space or data tries again, and `wire/frame.rs` is the 16-byte header in
//! front of it.
#![deny(missing_docs)]

// Layers, each importing only those before it in this order: shm (the region, the
// doorbell trait, the layout, the atomics), wire (frames, the byte ring, the mock peer),
// link (a state machine over one region), runtime (locks, threads, waiting), api.
mod api;
mod link;
mod runtime;
mod shm;
mod wire;

mod config;

#[doc(hidden)]
pub mod bench_api;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(all(test, loom))]
mod loom_tests;

#[cfg(all(feature = "mio", target_os = "linux"))]
pub use api::mio;
#[cfg(feature = "tokio")]
pub use api::tokio;
pub use api::zerocopy;
pub use shm::doorbell;
pub use shm::{layout, region};
pub use wire::frame;
#[doc(hidden)]
pub use wire::mock;

pub use api::connecting::Connecting;
pub use api::endpoint::{Driver, Endpoint, Listener, Session, SessionOptions};
pub use api::ready::{IdleWait, Readiness};
pub use config::{Config, WaitMode};
pub use link::Stats;
pub use runtime::DriveNext;
pub use shm::doorbell::Doorbell;
pub use shm::layout::{Geometry, LayoutError, Role};
pub use shm::region::SharedRegion;

/// For the unit tests that wait: a bug fails them in seconds instead of stalling the run.
#[cfg(test)]
pub(crate) mod test_watchdog {
    use crate::{doorbell::local, Config, Endpoint, SharedRegion};
    use std::sync::Arc;
    use std::time::Duration;

    /// A host and a guest endpoint over `size` bytes of heap. A connect gives up after 3
    /// s rather than the default 10: a bug that leaves an Open unanswered then fails the
    /// tests that connect in seconds.
    pub(crate) fn endpoint_pair(size: usize, mut cfg: Config) -> (Endpoint, Endpoint) {
        cfg.connect_timeout = cfg.connect_timeout.min(Duration::from_secs(3));
        let region = SharedRegion::heap(size);
        let (a, b) = local::pair();
        let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
        let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
        (host, guest)
    }

    /// Aborts the test binary, naming `test`, if the guard is still alive after `secs`.
    pub(crate) fn watchdog(test: &'static str, secs: u64) -> std::sync::mpsc::Sender<()> {
        let (done, rx) = std::sync::mpsc::channel::<()>();
        let limit = std::time::Duration::from_secs(secs);
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                // Straight to stderr: the test's captured output is lost at the abort.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "{test}: still running after {limit:?}: a wait that never ends"
                );
                std::process::abort();
            }
        });
        done
    }
}

//! Pieces shared by the tests that play a hostile peer by hand (`hostile.rs`,
//! `recovery.rs`): a seeded generator, the byte pattern senders use, and [`Hostile`], the
//! crate's mock peer (`ivring::mock`), driven word by word through the shared region.
#![allow(dead_code)] // each test file uses its own subset

pub mod damage;
#[allow(unused_imports)] // not every test file draws random numbers
pub use damage::Rng;

#[allow(unused_imports)] // each test file uses its own subset
pub use ivring::mock::{pattern, write_header, MockPeer as Hostile, MockSess as HostileSess};

/// Fails the whole test binary if the guard is still alive after `limit`: a test whose
/// wait never ends (a lost wakeup, a missed EOF) fails in seconds instead of stalling the
/// run. Drop the guard when the test is done (keep it in a `_guard` binding).
pub fn watchdog(test: &'static str, limit: std::time::Duration) -> Watchdog {
    let (done, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // Straight to the process's stderr: eprintln! here would go to the test's
            // captured output (a spawned thread inherits the capture), lost at the abort.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{test}: still running after {limit:?}: a wait that never ends"
            );
            std::process::abort();
        }
    });
    Watchdog { _done: done }
}

/// See [`watchdog`].
pub struct Watchdog {
    _done: std::sync::mpsc::Sender<()>,
}

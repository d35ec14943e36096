//! Helpers shared by the two-process tests.
#![allow(dead_code)] // each test file uses its own subset

use ivring::{Endpoint, Session, SessionOptions};
use std::io::ErrorKind;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `ivring-host` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ivring-host");

/// A second `ivring-host peer` process, killed when dropped (also when a test fails).
pub struct Peer(pub Child);

impl Peer {
    /// Starts `ivring-host peer --role ROLE --join SOCK`.
    pub fn start(sock: &Path, role: &str) -> Peer {
        Peer(
            Command::new(BIN)
                .args(["peer", "--role", role, "--join"])
                .arg(sock)
                .stdin(Stdio::null())
                .spawn()
                .expect("start peer process"),
        )
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects, retrying briefly on ConnectionRefused (a peer restarted by the test may be
/// reached through the old link's last moments).
pub fn connect(ep: &Endpoint, port: u32, message: bool) -> Session {
    let t0 = Instant::now();
    loop {
        match ep.connect_with(port, SessionOptions { message }) {
            Err(e)
                if e.kind() == ErrorKind::ConnectionRefused
                    && t0.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            r => return r.unwrap(),
        }
    }
}

//! A peer that closes its sessions and leaves at once: what it sent before is delivered.

mod common;

use ivring::{doorbell::local, Config, Endpoint, SessionOptions, SharedRegion};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

fn pair() -> (Endpoint, Endpoint) {
    let region = SharedRegion::heap(1 << 20);
    let (a, b) = local::pair();
    let host = Endpoint::host(region.clone(), Arc::new(a), Config::default()).unwrap();
    let guest = Endpoint::guest(region, Arc::new(b), Config::default()).unwrap();
    (host, guest)
}

#[test]
fn data_and_eof_before_the_peer_leaves_are_read() {
    let _guard = common::watchdog(
        "data_and_eof_before_the_peer_leaves_are_read",
        Duration::from_secs(60),
    );
    for _ in 0..20 {
        let (host, guest) = pair();
        let l = guest.listen(7).unwrap();
        let mut s = host.connect(7).unwrap();
        let mut g = l.accept_timeout(Duration::from_secs(5)).unwrap();
        let mut m = host
            .connect_with(7, SessionOptions { message: true })
            .unwrap();
        let mut gm = l.accept_timeout(Duration::from_secs(5)).unwrap();
        // A session the peer did not finish is reset as before.
        let mut open = host.connect(7).unwrap();
        let mut go = l.accept_timeout(Duration::from_secs(5)).unwrap();
        open.write_all(b"unfinished").unwrap();

        s.write_all(b"last words").unwrap();
        drop(s);
        m.write_all(b"one").unwrap();
        m.write_all(b"two").unwrap();
        m.shutdown(Shutdown::Write).unwrap();
        drop(host);

        let mut got = Vec::new();
        g.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
        assert_eq!(g.read(&mut [0u8; 8]).unwrap(), 0);
        let mut b = [0u8; 8];
        assert_eq!(gm.read(&mut b).unwrap(), 3);
        assert_eq!(&b[..3], b"one");
        assert_eq!(gm.read(&mut b).unwrap(), 3);
        assert_eq!(&b[..3], b"two");
        assert_eq!(gm.read(&mut b).unwrap(), 0);
        let mut rest = Vec::new();
        let err = loop {
            match go.read(&mut b) {
                Ok(n) if n > 0 => rest.extend_from_slice(&b[..n]),
                other => break other,
            }
        };
        assert_eq!(err.unwrap_err().kind(), ErrorKind::ConnectionReset);
        assert!(b"unfinished".starts_with(&rest));
        drop((g, gm, go));
    }
}

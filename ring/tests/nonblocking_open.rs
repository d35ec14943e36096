//! The non-blocking building blocks under the async and mio types, without a runtime:
//! `Listener::set_notify` and `Endpoint::connect_nonblocking` / `Connecting`.

mod common;

use ivring::{doorbell::local, Config, Endpoint, Role, SessionOptions, SharedRegion};
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn counter() -> (Arc<AtomicUsize>, Arc<dyn Fn() + Send + Sync>) {
    let n = Arc::new(AtomicUsize::new(0));
    let m = n.clone();
    (
        n,
        Arc::new(move || {
            m.fetch_add(1, Ordering::SeqCst);
        }),
    )
}

/// Waits (at most 10 s) until `f` holds.
fn until(mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_connect_finishes_without_blocking_and_the_listener_is_notified() {
    let _guard = common::watchdog(
        "a_connect_finishes_without_blocking_and_the_listener_is_notified",
        Duration::from_secs(60),
    );
    let region = SharedRegion::heap(1 << 20);
    let (a, b) = local::pair();
    let host = Endpoint::host(region.clone(), Arc::new(a), Config::default()).unwrap();
    // The guest attaches only later: the connect waits for the link to come up.
    let guest = Endpoint::unattached(Role::Guest, region, Arc::new(b), Config::default()).unwrap();
    let mut listener = guest.listen(9).unwrap();
    listener.set_nonblocking(true);
    let (backlog_news, on_backlog) = counter();
    listener.set_notify(on_backlog);
    assert_eq!(listener.accept().unwrap_err().kind(), ErrorKind::WouldBlock);

    let (connect_news, on_connect) = counter();
    let mut c = host.connect_nonblocking(9, SessionOptions::default(), on_connect);
    assert!(c.poll_connect().unwrap().is_none());
    guest.attach();
    // Called when the link came up, and again when the peer accepted.
    let mut session = None;
    until(|| {
        if connect_news.load(Ordering::SeqCst) > 0 {
            session = c.poll_connect().unwrap();
        }
        session.is_some()
    });
    assert!(backlog_news.load(Ordering::SeqCst) > 0);
    let mut g = listener.accept().unwrap();
    let mut s = session.unwrap();
    s.write_all(b"ok").unwrap();
    let mut b = [0u8; 2];
    g.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ok");
    // Finished: the same Connecting says so rather than opening again.
    assert_eq!(
        c.poll_connect().unwrap_err().kind(),
        ErrorKind::NotConnected
    );

    // Refused, as the blocking connect.
    let (news, notify) = counter();
    let mut r = host.connect_nonblocking(10, SessionOptions::default(), notify);
    let mut refused = None;
    until(|| {
        match r.poll_connect() {
            Ok(None) => {}
            Ok(Some(_)) => panic!("connected to a port nobody listens on"),
            Err(e) => refused = Some(e.kind()),
        }
        refused.is_some()
    });
    assert_eq!(refused, Some(ErrorKind::ConnectionRefused));
    assert!(news.load(Ordering::SeqCst) > 0);
    drop(s);
    drop(g);
    until(|| host.session_count() == 0);

    // The endpoint closes: the listener hears of it, and accept says NotConnected.
    let before = backlog_news.load(Ordering::SeqCst);
    drop(guest);
    assert!(backlog_news.load(Ordering::SeqCst) > before);
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        ErrorKind::NotConnected
    );
}

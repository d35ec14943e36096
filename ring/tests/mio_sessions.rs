//! Sessions and listeners registered with mio (the `mio` feature): one event loop accepts
//! 16 sessions and echoes 1 MiB on each, reading and writing only when mio says so.

mod common;

use ivring::mio::{MioListener, MioSession};
use ivring::{doorbell::local, Config, Endpoint, SharedRegion};
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SESSIONS: usize = 16;
const BYTES: usize = 1 << 20;

struct Echo {
    session: MioSession,
    /// Read but not yet written back.
    pending: Vec<u8>,
    eof: bool,
}

/// Works one session until it would block both ways; whether it is finished.
fn work(e: &mut Echo) -> bool {
    let mut buf = [0u8; 32 << 10];
    loop {
        let mut progress = false;
        if !e.pending.is_empty() {
            match e.session.write(&e.pending) {
                Ok(n) => {
                    e.pending.drain(..n);
                    progress = true;
                }
                Err(x) if x.kind() == ErrorKind::WouldBlock => {}
                Err(x) => panic!("write: {x}"),
            }
        }
        if !e.eof && e.pending.len() < (256 << 10) {
            match e.session.read(&mut buf) {
                Ok(0) => {
                    e.eof = true;
                    progress = true;
                }
                Ok(n) => {
                    e.pending.extend_from_slice(&buf[..n]);
                    progress = true;
                }
                Err(x) if x.kind() == ErrorKind::WouldBlock => {}
                Err(x) => panic!("read: {x}"),
            }
        }
        if e.eof && e.pending.is_empty() {
            e.session
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            return true;
        }
        if !progress {
            return false;
        }
    }
}

#[test]
fn a_mio_loop_accepts_and_echoes() {
    let _guard = common::watchdog("a_mio_loop_accepts_and_echoes", Duration::from_secs(60));
    let region = SharedRegion::heap(4 << 20);
    let (a, b) = local::pair();
    let host = Endpoint::host(region.clone(), Arc::new(a), Config::default()).unwrap();
    let guest = Endpoint::guest(region, Arc::new(b), Config::default()).unwrap();
    assert!(host.wait_up(Duration::from_secs(20)));
    assert!(guest.wait_up(Duration::from_secs(20)));

    let mut poll = Poll::new().unwrap();
    let mut listener = MioListener::new(guest.listen(7).unwrap()).unwrap();
    poll.registry()
        .register(&mut listener, Token(0), Interest::READABLE)
        .unwrap();

    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let mut s = host.connect(7).unwrap();
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..BYTES).map(|j| (j * 13 + i) as u8).collect();
                // A chunk at a time, each read back before the next (one thread).
                let mut back = vec![0u8; 64 << 10];
                for chunk in data.chunks(64 << 10) {
                    s.write_all(chunk).unwrap();
                    s.read_exact(&mut back[..chunk.len()]).unwrap();
                    assert!(&back[..chunk.len()] == chunk, "session {i}: echo differs");
                }
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            })
        })
        .collect();

    let mut echoes: HashMap<usize, Echo> = HashMap::new();
    let mut next = 1;
    let mut done = 0;
    let mut events = Events::with_capacity(64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < SESSIONS {
        assert!(Instant::now() < deadline, "the loop stalled");
        poll.poll(&mut events, Some(Duration::from_secs(10)))
            .unwrap();
        for ev in events.iter() {
            if ev.token() == Token(0) {
                loop {
                    match listener.accept() {
                        Ok(mut session) => {
                            poll.registry()
                                .register(&mut session, Token(next), Interest::READABLE)
                                .unwrap();
                            echoes.insert(
                                next,
                                Echo {
                                    session,
                                    pending: Vec::new(),
                                    eof: false,
                                },
                            );
                            next += 1;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            } else if let Some(e) = echoes.get_mut(&ev.token().0) {
                if work(e) {
                    let mut e = echoes.remove(&ev.token().0).unwrap();
                    poll.registry().deregister(&mut e.session).unwrap();
                    done += 1;
                }
            }
        }
        // A session accepted in this round may have data already: its fd starts
        // readable, so mio reports it on the next poll.
    }
    for c in clients {
        c.join().unwrap();
    }
}

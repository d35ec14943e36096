//! Random sequences of socket operations on a host/guest pair, checked against a simple
//! model: bytes arrive in order per session and direction (messages whole or truncated),
//! EOF after the peer's shutdown or close, BrokenPipe after our shutdown or the peer's
//! close, ConnectionRefused with no listener, AddrInUse on a second listen, and
//! ConnectionReset on every old session after either side restarts.

mod common;

use ivring::doorbell::local::{self, LocalDoorbell};
use ivring::{Config, Endpoint, Listener, Session, SessionOptions, SharedRegion};
use proptest::prelude::*;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(60);
/// One case under the watchdog: a few dozen operations, each well under a second.
const CASE_LIMIT: Duration = Duration::from_secs(30);
/// Unread bytes per direction stay under this, so a write never waits for credit:
/// 150 KiB plus a quarter buffer of uncredited reads is below the 256 KiB buffer.
const MAX_UNREAD: usize = 150 << 10;

#[derive(Clone, Debug)]
enum Op {
    Listen {
        side: usize,
        port: u32,
    },
    Connect {
        side: usize,
        port: u32,
        message: bool,
    },
    Write {
        pair: usize,
        side: usize,
        len: usize,
    },
    Read {
        pair: usize,
        side: usize,
        len: usize,
    },
    ShutdownWrite {
        pair: usize,
        side: usize,
    },
    Drop {
        pair: usize,
        side: usize,
    },
    Restart {
        side: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let side = 0usize..2;
    // Port 0 always has listeners (see World::new); 1 and 2 only after a Listen op.
    let port = 0u32..3;
    prop_oneof![
        1 => (side.clone(), port.clone()).prop_map(|(side, port)| Op::Listen { side, port }),
        4 => (side.clone(), prop_oneof![2 => Just(0u32), 1 => port], any::<bool>())
            .prop_map(|(side, port, message)| Op::Connect { side, port, message }),
        5 => (any::<usize>(), side.clone(), 1usize..20_000)
            .prop_map(|(pair, side, len)| Op::Write { pair, side, len }),
        5 => (any::<usize>(), side.clone(), 1usize..20_000)
            .prop_map(|(pair, side, len)| Op::Read { pair, side, len }),
        1 => (any::<usize>(), side.clone()).prop_map(|(pair, side)| Op::ShutdownWrite { pair, side }),
        1 => (any::<usize>(), side.clone()).prop_map(|(pair, side)| Op::Drop { pair, side }),
        1 => side.prop_map(|side| Op::Restart { side }),
    ]
}

fn pattern(tag: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            ((i ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0x2545_f491_4f6c_dd1d)
                >> 56) as u8
        })
        .collect()
}

/// One session as the model sees it. Index 0 is the host's end, 1 the guest's.
struct Pair {
    ends: [Option<Session>; 2],
    message: bool,
    /// Bytes (or messages) in flight towards each side.
    inbound: [VecDeque<Vec<u8>>; 2],
    wr_shut: [bool; 2],
    dropped: [bool; 2],
    /// This side has read EOF after the peer's close (so it has certainly seen the close).
    saw_close: [bool; 2],
    /// A write on this side has failed with BrokenPipe (it stays failed).
    broken: [bool; 2],
    /// Either side restarted since this session opened.
    reset: bool,
    /// The peer had shut down or closed before it restarted: if the close arrived before
    /// the restart, this side keeps reading the data sent before it, then EOF (as a
    /// socket does after a FIN); if not, reads fail with ConnectionReset. Either is right.
    maybe_ended: [bool; 2],
}

impl Pair {
    fn unread(&self, side: usize) -> usize {
        self.inbound[side].iter().map(Vec::len).sum()
    }
}

struct World {
    region: SharedRegion,
    bells: [Arc<LocalDoorbell>; 2],
    eps: [Option<Endpoint>; 2],
    listeners: [HashMap<u32, Listener>; 2],
    pairs: Vec<Pair>,
    tag: u64,
}

fn endpoint(w: &World, side: usize) -> Endpoint {
    // A heartbeat loss must not end a session in this model: the machine is noisy.
    let cfg = Config {
        peer_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let r = if side == 0 {
        Endpoint::host(w.region.clone(), w.bells[0].clone(), cfg)
    } else {
        Endpoint::guest(w.region.clone(), w.bells[1].clone(), cfg)
    };
    r.unwrap_or_else(|e| panic!("endpoint: {e}"))
}

fn kind<T>(r: &std::io::Result<T>) -> Option<ErrorKind> {
    r.as_ref().err().map(|e| e.kind())
}

impl World {
    fn new() -> World {
        let (a, b) = local::pair();
        let mut w = World {
            region: SharedRegion::heap(256 << 10),
            bells: [Arc::new(a), Arc::new(b)],
            eps: [None, None],
            listeners: [HashMap::new(), HashMap::new()],
            pairs: Vec::new(),
            tag: 0,
        };
        w.eps[0] = Some(endpoint(&w, 0));
        w.eps[1] = Some(endpoint(&w, 1));
        for e in w.eps.iter().flatten() {
            assert!(e.wait_up(PATIENCE));
        }
        for side in 0..2 {
            w.listen0(side);
        }
        w
    }

    fn listen0(&mut self, side: usize) {
        let l = self.ep(side).listen(0).expect("listen on port 0");
        self.listeners[side].insert(0, l);
    }

    fn ep(&self, side: usize) -> &Endpoint {
        self.eps[side].as_ref().expect("endpoint")
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Listen { side, port } => {
                let r = self.ep(side).listen(port);
                match self.listeners[side].entry(port) {
                    Entry::Occupied(_) => {
                        prop_assert_eq!(kind(&r), Some(ErrorKind::AddrInUse));
                    }
                    Entry::Vacant(v) => {
                        let l = r.map_err(|e| TestCaseError::fail(format!("listen: {e}")))?;
                        v.insert(l);
                    }
                }
            }
            Op::Connect {
                side,
                port,
                message,
            } => {
                let r = self.ep(side).connect_with(port, SessionOptions { message });
                let Some(l) = self.listeners[1 - side].get(&port) else {
                    prop_assert_eq!(kind(&r), Some(ErrorKind::ConnectionRefused));
                    return Ok(());
                };
                let mut s = r.map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
                let mut t = l
                    .accept_timeout(PATIENCE)
                    .map_err(|e| TestCaseError::fail(format!("accept: {e}")))?;
                prop_assert_eq!(t.is_message(), message);
                for x in [&mut s, &mut t] {
                    x.set_read_timeout(Some(PATIENCE));
                    x.set_write_timeout(Some(PATIENCE));
                }
                let ends = if side == 0 { [s, t] } else { [t, s] };
                self.pairs.push(Pair {
                    ends: ends.map(Some),
                    message,
                    inbound: [VecDeque::new(), VecDeque::new()],
                    wr_shut: [false; 2],
                    dropped: [false; 2],
                    saw_close: [false; 2],
                    broken: [false; 2],
                    reset: false,
                    maybe_ended: [false; 2],
                });
            }
            Op::Write { pair, side, len } => {
                let Some(p) = self.pick(pair, side) else {
                    return Ok(());
                };
                let peer = 1 - side;
                if !p.reset && !p.dropped[peer] && p.unread(peer) + len > MAX_UNREAD {
                    return Ok(());
                }
                self.tag += 1;
                let data = pattern(self.tag, len);
                let n = self.pairs.len();
                let p = &mut self.pairs[pair % n];
                let s = p.ends[side].as_mut().expect("end");
                let r = if p.message {
                    s.write(&data).map(|n| {
                        assert_eq!(n, len, "a message is written whole");
                    })
                } else {
                    s.write_all(&data)
                };
                if p.reset {
                    prop_assert_eq!(kind(&r), Some(ErrorKind::ConnectionReset));
                } else if p.wr_shut[side] || p.broken[side] || p.saw_close[side] {
                    prop_assert_eq!(kind(&r), Some(ErrorKind::BrokenPipe));
                } else if p.dropped[peer] {
                    // The close may still be on its way: either outcome, and a failure sticks.
                    match kind(&r) {
                        None => {}
                        Some(ErrorKind::BrokenPipe) => p.broken[side] = true,
                        Some(k) => prop_assert!(false, "write after peer close: {:?}", k),
                    }
                } else {
                    prop_assert_eq!(kind(&r), None, "{:?}", r);
                    p.inbound[peer].push_back(data);
                }
            }
            Op::Read { pair, side, len } => {
                let Some(p) = self.pick(pair, side) else {
                    return Ok(());
                };
                let peer = 1 - side;
                let s = p.ends[side].as_mut().expect("end");
                let mut buf = vec![0u8; len];
                if p.reset && p.maybe_ended[side] {
                    match s.read(&mut buf) {
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                            p.maybe_ended[side] = false;
                        }
                        Err(e) => prop_assert!(false, "read of an ended session: {e}"),
                        Ok(0) => prop_assert!(p.inbound[side].is_empty(), "EOF before the data"),
                        Ok(n) => {
                            // Whatever comes is the start of what the peer sent.
                            let mut expect = Vec::new();
                            for f in &p.inbound[side] {
                                expect.extend_from_slice(f);
                            }
                            prop_assert!(n <= expect.len() && buf[..n] == expect[..n]);
                            let mut k = n;
                            while k > 0 {
                                let f = p.inbound[side].front_mut().expect("checked");
                                let t = if p.message { f.len() } else { k.min(f.len()) };
                                f.drain(..t.min(f.len()));
                                k -= t.min(k);
                                if f.is_empty() {
                                    p.inbound[side].pop_front();
                                }
                            }
                        }
                    }
                } else if p.reset {
                    prop_assert_eq!(kind(&s.read(&mut buf)), Some(ErrorKind::ConnectionReset));
                } else if let Some(front) = p.inbound[side].front_mut() {
                    let n = s
                        .read(&mut buf)
                        .map_err(|e| TestCaseError::fail(format!("read: {e}")))?;
                    if p.message {
                        let want = front.len().min(len);
                        prop_assert_eq!(n, want, "message read length");
                        prop_assert!(buf[..n] == front[..n], "message bytes differ");
                        p.inbound[side].pop_front();
                    } else {
                        // A stream read returns at most what one write carried here only
                        // if the reader is fast; accept any prefix of what is in flight.
                        prop_assert!(n >= 1 && n <= len);
                        let mut expect = Vec::with_capacity(n);
                        while expect.len() < n {
                            let Some(f) = p.inbound[side].front_mut() else {
                                prop_assert!(false, "read more than was written");
                                unreachable!();
                            };
                            let k = (n - expect.len()).min(f.len());
                            expect.extend(f.drain(..k));
                            if f.is_empty() {
                                p.inbound[side].pop_front();
                            }
                        }
                        prop_assert!(buf[..n] == expect[..], "stream bytes differ");
                    }
                } else if p.wr_shut[peer] || p.dropped[peer] {
                    let r = s.read(&mut buf);
                    prop_assert_eq!(r.as_ref().ok().copied(), Some(0), "EOF: {:?}", r);
                    if p.dropped[peer] {
                        p.saw_close[side] = true;
                    }
                } else {
                    s.set_nonblocking(true);
                    let r = s.read(&mut buf);
                    s.set_nonblocking(false);
                    prop_assert_eq!(kind(&r), Some(ErrorKind::WouldBlock), "{:?}", r);
                }
            }
            Op::ShutdownWrite { pair, side } => {
                let Some(p) = self.pick(pair, side) else {
                    return Ok(());
                };
                let r = p.ends[side]
                    .as_ref()
                    .expect("end")
                    .shutdown(Shutdown::Write);
                if p.reset {
                    prop_assert_eq!(kind(&r), Some(ErrorKind::ConnectionReset));
                } else {
                    prop_assert_eq!(kind(&r), None);
                    p.wr_shut[side] = true;
                }
            }
            Op::Drop { pair, side } => {
                let Some(p) = self.pick(pair, side) else {
                    return Ok(());
                };
                p.ends[side] = None;
                p.dropped[side] = true;
                self.pairs.retain(|p| p.ends.iter().any(Option::is_some));
            }
            Op::Restart { side } => {
                self.listeners[side].clear();
                self.eps[side] = None;
                let e = endpoint(self, side);
                // Up on the new endpoint means the survivor acknowledged its new epoch,
                // so the survivor has reset every old session by now.
                prop_assert!(e.wait_up(PATIENCE), "link did not come back up");
                self.eps[side] = Some(e);
                self.listen0(side);
                for p in &mut self.pairs {
                    // Either end (the survivor's, or the restarted side's old one) whose peer
                    // had finished sending may be kept as ended.
                    for end in 0..2 {
                        if !p.reset && (p.dropped[1 - end] || p.wr_shut[1 - end]) {
                            p.maybe_ended[end] = true;
                        }
                    }
                    p.reset = true;
                }
            }
        }
        Ok(())
    }

    /// The pair `i` (modulo), if it has an end on `side`.
    fn pick(&mut self, i: usize, side: usize) -> Option<&mut Pair> {
        if self.pairs.is_empty() {
            return None;
        }
        let n = self.pairs.len();
        let p = &mut self.pairs[i % n];
        p.ends[side].is_some().then_some(p)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sessions_follow_the_model(ops in proptest::collection::vec(op(), 1..20)) {
        // Per case (a failing case is run again while shrinking): a wait that never ends
        // fails the run in seconds rather than after PATIENCE per wait.
        let _guard = common::watchdog("sessions_follow_the_model (one case)", CASE_LIMIT);
        let mut w = World::new();
        for op in &ops {
            w.run(op)?;
        }
    }
}

//! Recovery from a peer that scribbled on the shared region and left (PROTOCOL.md §1, §3,
//! §6).
//!
//! One victim `Endpoint` lives through many rounds. In each round the honest peer of the
//! other role detaches, and a hostile peer of that role (driven by hand, `common::Hostile`)
//! attaches to the victim or does not, damages the region and leaves; then a fresh honest
//! `Endpoint` of that role attaches to the same region and must have a working link.
//!
//! Damage: every word of the header (offsets 0..56) and of both side blocks, each with 0,
//! 1, `u64::MAX`, `1 << 63`, `u32::MAX`, the word's current value ± 1, `MAGIC`, the victim's
//! epoch + 1 and random values (round-robin over words and values, so every pair is hit
//! within 313 rounds); several words at once; garbage in both rings; well-formed frames
//! (Open, Accept, Data, Credit with the session ids the next peers will use) planted in
//! both rings and published through either side's `TX_HEAD` word.
//!
//! Scenarios: damage while the link is down (the hostile peer never completes the
//! handshake); damage after the handshake, then leaving without detaching (the victim learns
//! from the successor's new epoch, or from its heartbeat timeout when the successor comes
//! later than that); leaving in the middle of a write (half a record written, its head
//! published part-way or not at all); damage and staying, heartbeating, for 50-300 ms
//! while the victim uses a session on that link; damage and coming back at once as an
//! honest `Endpoint` of the same role.
//!
//! Bound: from the moment the fresh honest peer is created until checksummed data has
//! moved both ways, in a session opened by each side (stream or message mode, 1-8 KiB
//! each way), at most [`BOUND`] = 5 s. Both sides beat every 20 ms and time the peer out
//! after 300 ms of silence. The time taken is printed per damage kind and per scenario
//! (never asserted beyond the bound).
//!
//! Asserted besides: every byte read is the pattern its sender wrote; no session or byte
//! planted by the hostile peer reaches the successor or the victim in the successor's epoch
//! (every session must open with the current round's nonce); the victim's sessions on the
//! hostile link only ever read the hostile peer's pattern (unless the damage rewrote that
//! peer's own ring or head: then what it rewrote is what it sent) and end with
//! ConnectionReset; no thread of the process panics; the victim's session count and the
//! process's RSS stay bounded.
//!
//! Failing rounds are collected (scenario, target, value, symptom) and reported together;
//! the victim is rebuilt after one, so that one failure does not hide the others.
//!
//! `IVRING_RECOVERY_ROUNDS` sets the rounds per victim role (default 100),
//! `IVRING_RECOVERY_SEED` the seed.

mod common;

use common::damage::{words, Value, VALUES};
use common::{pattern, Hostile, HostileSess, Rng};
use ivring::doorbell::local::{self, LocalDoorbell};
use ivring::frame::{CreditArgs, Header, Kind, OpenArgs, FLAG_EOR, HEADER_LEN};
use ivring::layout::{side, GUEST_BLOCK, HOST_BLOCK};
use ivring::{Config, Endpoint, Listener, Role, Session, SessionOptions, SharedRegion};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The tests here measure the process (RSS): run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Panics in any thread of the process (the endpoints' keepers included).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// How long a fresh honest peer may take to have a working link.
const BOUND: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_millis(20);
const PEER_TIMEOUT: Duration = Duration::from_millis(300);
const REGION: usize = 64 << 10;
/// Where the honest peers exchange data (the hostile peer plants Opens for it too).
const PORT_ROUND: u32 = 11;
/// Where the victim opens sessions to the hostile peer.
const PORT_HOSTILE: u32 = 12;
/// First word of every honest session.
const PROLOGUE_MAGIC: &[u8; 8] = b"RECOVERY";
const PROLOGUE_LEN: usize = 48;
const MAX_MESSAGE: usize = 2048;

fn cfg() -> Config {
    Config {
        heartbeat: HEARTBEAT,
        peer_timeout: PEER_TIMEOUT,
        buf_size: 8 << 10,
        max_sessions: 16,
        backlog: 4,
        connect_timeout: BOUND,
        // A fresh guest that finds the header damaged waits this long for the host.
        layout_wait: BOUND,
        ..Config::default()
    }
}

fn other(role: Role) -> Role {
    match role {
        Role::Host => Role::Guest,
        Role::Guest => Role::Host,
    }
}

fn block_of(role: Role) -> usize {
    match role {
        Role::Host => HOST_BLOCK,
        Role::Guest => GUEST_BLOCK,
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

#[derive(Clone, Debug)]
enum Damage {
    Word {
        name: String,
        at: usize,
        value: Value,
    },
    Words(Vec<(String, usize, Value)>),
    RingGarbage,
    PlantedFrames,
}

impl Damage {
    /// Whether the damage may rewrite bytes that the side owning `block` published in its
    /// ring, or move its head over records already read (a replay).
    fn rewrites_ring_of(&self, block: usize) -> bool {
        let head = block + side::TX_HEAD;
        match self {
            Damage::RingGarbage | Damage::PlantedFrames => true,
            Damage::Word { at, .. } => *at == head,
            Damage::Words(ws) => ws.iter().any(|(_, at, _)| *at == head),
        }
    }

    /// The kind the recovery figures are grouped by.
    fn kind(&self) -> String {
        match self {
            Damage::Word { name, .. } => name.clone(),
            Damage::Words(_) => "several words".into(),
            Damage::RingGarbage => "ring garbage".into(),
            Damage::PlantedFrames => "planted frames".into(),
        }
    }

    /// Round `round`'s damage: four rounds in five hit one word (every word, then every
    /// value, round-robin), the fifth several words or a ring.
    fn for_round(round: u64, seed: u64, rng: &mut Rng) -> Damage {
        let words = words();
        if round % 5 == 4 {
            return match (round / 5) % 3 {
                0 => Damage::Words(
                    (0..2 + rng.below(5))
                        .map(|_| {
                            let (name, at) = words[rng.below(words.len() as u64) as usize].clone();
                            (name, at, VALUES[rng.below(VALUES.len() as u64) as usize])
                        })
                        .collect(),
                ),
                1 => Damage::RingGarbage,
                _ => Damage::PlantedFrames,
            };
        }
        let j = round / 5 * 4 + round % 5 + seed % 1000;
        let (name, at) = words[(j % words.len() as u64) as usize].clone();
        // Each next pass over the words shifts the values by 2 (coprime with their 10), so
        // the 250 (word, value) pairs all come within 250 single-word rounds.
        let value = VALUES[((j + 2 * (j / words.len() as u64)) % VALUES.len() as u64) as usize];
        Damage::Word { name, at, value }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    /// Damage without ever completing the handshake, leave.
    DownThenLeave,
    /// Handshake, damage, leave without detaching.
    UpThenLeave,
    /// Handshake, damage, leave half-way through writing a record.
    LeaveMidWrite,
    /// Handshake, damage, stay (heartbeating, serving) for a while, leave.
    DamageAndStay,
    /// Damage, leave, come back at once as an honest endpoint.
    LeaveAndReturn,
}

impl Scenario {
    fn pick(rng: &mut Rng) -> Scenario {
        match rng.below(20) {
            0..=4 => Scenario::DownThenLeave,
            5..=9 => Scenario::UpThenLeave,
            10..=12 => Scenario::LeaveMidWrite,
            13..=15 => Scenario::DamageAndStay,
            _ => Scenario::LeaveAndReturn,
        }
    }
}

/// How a victim session on the hostile link ended.
#[derive(Debug)]
enum HostileLinkEnd {
    /// Never opened (the hostile link was gone already).
    NotOpened,
    /// Reset after reading this many bytes; `rewritten` names the first byte that was not
    /// the pattern the hostile peer sent in order (it rewrote bytes it had published).
    Reset {
        bytes: u64,
        rewritten: Option<String>,
    },
    Other(String),
}

/// The victim's side of one round's world.
struct World {
    victim_role: Role,
    region: SharedRegion,
    victim: Arc<Endpoint>,
    /// The doorbell end the hostile and honest peers take in turn.
    bell: Arc<LocalDoorbell>,
    /// The honest peer of the last round, its listener, and the victim's listener for it.
    honest: Option<(Endpoint, Listener, Listener)>,
    /// Victim sessions opened on hostile links, and those that then read the hostile
    /// peer's bytes (all must end with ConnectionReset).
    hostile_sessions: u64,
    hostile_sessions_with_data: u64,
    /// Of those, sessions that read bytes the hostile peer rewrote in its ring.
    hostile_sessions_rewritten: u64,
}

impl World {
    fn new(victim_role: Role) -> World {
        let region = SharedRegion::heap(REGION);
        let (a, b) = local::pair();
        let (vb, pb) = match victim_role {
            Role::Host => (a, b),
            Role::Guest => (b, a),
        };
        let victim = Endpoint::new(victim_role, region.clone(), Arc::new(vb), cfg())
            .expect("victim endpoint");
        World {
            victim_role,
            region,
            victim: Arc::new(victim),
            bell: Arc::new(pb),
            honest: None,
            hostile_sessions: 0,
            hostile_sessions_with_data: 0,
            hostile_sessions_rewritten: 0,
        }
    }

    fn victim_block(&self) -> usize {
        block_of(self.victim_role)
    }
}

/// What a round learnt.
struct RoundOutcome {
    /// Time from the successor's creation to data moved both ways.
    working_after: Duration,
}

/// An honest session's plan: the opener sends `up` bytes, the acceptor answers `down`.
#[derive(Clone, Copy, Debug)]
struct Plan {
    round: u64,
    nonce: u64,
    seed: u64,
    up: usize,
    down: usize,
    message: bool,
}

impl Plan {
    fn new(round: u64, rng: &mut Rng) -> Plan {
        Plan {
            round,
            nonce: rng.next(),
            seed: rng.next(),
            up: 1024 + rng.below(7 << 10) as usize,
            down: 1024 + rng.below(7 << 10) as usize,
            message: rng.chance(2),
        }
    }

    fn prologue(&self) -> [u8; PROLOGUE_LEN] {
        let mut p = [0u8; PROLOGUE_LEN];
        p[..8].copy_from_slice(PROLOGUE_MAGIC);
        for (i, w) in [
            self.round,
            self.nonce,
            self.seed,
            self.up as u64,
            self.down as u64,
        ]
        .iter()
        .enumerate()
        {
            p[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        p
    }
}

/// Message sizes for `total` bytes of stream `seed` (both ends compute the same).
fn message_sizes(seed: u64, total: usize) -> Vec<usize> {
    let mut rng = Rng(seed | 1);
    let mut v = Vec::new();
    let mut left = total;
    while left > 0 {
        let n = (1 + rng.below(MAX_MESSAGE as u64) as usize).min(left);
        v.push(n);
        left -= n;
    }
    v
}

fn pattern_bytes(seed: u64, from: usize, n: usize) -> Vec<u8> {
    (from..from + n).map(|i| pattern(seed, i as u64)).collect()
}

fn send(s: &mut Session, seed: u64, total: usize, message: bool) -> Result<(), String> {
    if message {
        let mut pos = 0;
        for n in message_sizes(seed, total) {
            let m = pattern_bytes(seed, pos, n);
            let w = s.write(&m).map_err(|e| format!("message write: {e}"))?;
            if w != n {
                return Err(format!("message write took {w} of {n} bytes"));
            }
            pos += n;
        }
    } else {
        s.write_all(&pattern_bytes(seed, 0, total))
            .map_err(|e| format!("stream write: {e}"))?;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))
}

fn receive(s: &mut Session, seed: u64, total: usize, message: bool) -> Result<(), String> {
    let mut buf = vec![0u8; 16 << 10];
    let mut pos = 0usize;
    let sizes = if message {
        message_sizes(seed, total)
    } else {
        Vec::new()
    };
    let mut k = 0;
    loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read at byte {pos} of {total}: {e}"))?;
        if n == 0 {
            break;
        }
        if message {
            match sizes.get(k) {
                Some(&want) if want == n => {}
                w => return Err(format!("message {k} is {n} bytes, expected {w:?}")),
            }
            k += 1;
        }
        if pos + n > total {
            return Err(format!("{} bytes, expected {total}", pos + n));
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(seed, (pos + i) as u64)) {
            return Err(format!(
                "byte {} is {:#04x}, not the sender's pattern {:#04x}",
                pos + i,
                buf[i],
                pattern(seed, (pos + i) as u64)
            ));
        }
        pos += n;
    }
    if pos != total {
        return Err(format!("EOF after {pos} bytes, expected {total}"));
    }
    Ok(())
}

fn set_timeouts(s: &mut Session) {
    s.set_read_timeout(Some(BOUND));
    s.set_write_timeout(Some(BOUND));
}

/// Opens a session to `ep`'s peer and runs `plan` from the opener's end.
fn open_and_exchange(ep: &Endpoint, plan: Plan, deadline: Instant) -> Result<(), String> {
    let opts = SessionOptions {
        message: plan.message,
    };
    // The peer's listener may come a moment after the link is up.
    let mut s = loop {
        match ep.connect_with(PORT_ROUND, opts) {
            Ok(s) => break s,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(format!("connect: {e}")),
        }
    };
    set_timeouts(&mut s);
    let p = plan.prologue();
    let w = s.write(&p).map_err(|e| format!("prologue: {e}"))?;
    if w != p.len() {
        s.write_all(&p[w..]).map_err(|e| format!("prologue: {e}"))?;
    }
    send(&mut s, plan.seed, plan.up, plan.message)?;
    receive(&mut s, plan.seed ^ 1, plan.down, plan.message).map_err(|e| format!("answer: {e}"))
}

/// Accepts one session on `l`, which must open with `plan`'s prologue, and serves it.
fn accept_and_exchange(l: &Listener, plan: Plan) -> Result<(), String> {
    let mut s = l
        .accept_timeout(BOUND)
        .map_err(|e| format!("accept: {e}"))?;
    set_timeouts(&mut s);
    if s.is_message() != plan.message {
        return Err(format!(
            "accepted a session (id {}) of the wrong mode: a session the current peer never opened",
            s.id()
        ));
    }
    let mut p = [0u8; PROLOGUE_LEN];
    if plan.message {
        let mut buf = vec![0u8; 16 << 10];
        let n = s.read(&mut buf).map_err(|e| format!("prologue: {e}"))?;
        if n != PROLOGUE_LEN {
            return Err(format!(
                "first message of session {} is {n} bytes: a session the current peer never opened",
                s.id()
            ));
        }
        p.copy_from_slice(&buf[..n]);
    } else {
        s.read_exact(&mut p).map_err(|e| format!("prologue: {e}"))?;
    }
    if p != plan.prologue() {
        return Err(format!(
            "session {} opened with {:02x?}, not this round's prologue: \
             a session or bytes the current peer never sent",
            s.id(),
            &p[..24]
        ));
    }
    receive(&mut s, plan.seed, plan.up, plan.message)?;
    send(&mut s, plan.seed ^ 1, plan.down, plan.message).map_err(|e| format!("answer: {e}"))
}

/// Frames that look like the start of the next peers' sessions: Opens for the round port,
/// Accepts, Data with a plausible prologue, Credits, for the first ids either side opens.
fn planted_frames(round: u64, rng: &mut Rng) -> Vec<(Header, Vec<u8>)> {
    let mut v = Vec::new();
    for seq in 1..=3u64 {
        for bit in [0, 1] {
            let id = seq << 1 | bit;
            let open = OpenArgs {
                port: PORT_ROUND,
                message: rng.chance(2),
                buf_alloc: 8 << 10,
            };
            let credit = CreditArgs {
                fwd_cnt: 0,
                buf_alloc: 1 << 20,
            };
            let mut fake = Plan::new(round, rng).prologue().to_vec();
            fake.extend((0..rng.below(256)).map(|i| pattern(id, i)));
            for (kind, flags, payload) in [
                (Kind::Open, 0, open.encode().to_vec()),
                (Kind::Accept, 0, credit.encode().to_vec()),
                (Kind::Data, if rng.chance(2) { FLAG_EOR } else { 0 }, fake),
                (Kind::Credit, 0, credit.encode().to_vec()),
            ] {
                let h = Header {
                    kind,
                    flags,
                    len: payload.len() as u32,
                    session: id,
                };
                v.push((h, payload));
            }
        }
    }
    v
}

/// Writes `frames` as records from offset 0 of the ring at `ring`; returns their length.
fn write_records(
    region: &SharedRegion,
    ring: usize,
    cap: u64,
    frames: &[(Header, Vec<u8>)],
) -> u64 {
    let mut at = 0u64;
    for (h, payload) in frames {
        let rec = ivring::frame::record_len(payload.len()) as u64;
        if at + rec > cap {
            break;
        }
        region.write(ring + at as usize, &h.encode());
        region.write(ring + at as usize + HEADER_LEN, payload);
        let pad = rec as usize - HEADER_LEN - payload.len();
        if pad > 0 {
            region.zero(ring + at as usize + HEADER_LEN + payload.len(), pad);
        }
        at += rec;
    }
    at
}

/// Does `damage` to the region through the hostile peer.
fn apply_damage(h: &mut Hostile, damage: &Damage, victim_block: usize, round: u64, rng: &mut Rng) {
    let region = h.region.clone();
    let cap = h.cap();
    // The victim writes the ring the hostile peer reads, and publishes it in its TX_HEAD.
    let (victim_ring, hostile_ring) = (h.rx_ring, h.tx_ring);
    match damage {
        Damage::Word { at, value, .. } => {
            let v = value.resolve(&region, *at, victim_block, rng);
            region.store_u64(*at, v, Ordering::Release);
        }
        Damage::Words(ws) => {
            for (_, at, value) in ws {
                let v = value.resolve(&region, *at, victim_block, rng);
                region.store_u64(*at, v, Ordering::Release);
            }
        }
        Damage::RingGarbage => {
            for (ring, head_word) in [
                (victim_ring, victim_block + side::TX_HEAD),
                (hostile_ring, h.own + side::TX_HEAD),
            ] {
                let n = 16 * (1 + rng.below(cap / 16)) as usize;
                let off = 16 * rng.below((cap - n as u64) / 16 + 1) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                region.write(ring + off, &bytes);
                if rng.chance(2) {
                    let head = match rng.below(3) {
                        0 => (off + n) as u64,
                        1 => 16 * rng.below(cap / 16),
                        _ => rng.next(),
                    };
                    region.store_u64(head_word, head, Ordering::Release);
                }
            }
        }
        Damage::PlantedFrames => {
            // In the victim's ring from offset 0, published through the victim's TX_HEAD:
            // what a fresh reader starting at tail 0 would take as the victim's first frames.
            let frames = planted_frames(round, rng);
            let n = write_records(&region, victim_ring, cap, &frames);
            region.store_u64(victim_block + side::TX_HEAD, n, Ordering::Release);
            // In our own ring: at offset 0 with our TX_HEAD over them, or at our head.
            let frames = planted_frames(round, rng);
            if rng.chance(2) {
                let n = write_records(&region, hostile_ring, cap, &frames);
                h.store(side::TX_HEAD, n);
            } else {
                for (hd, payload) in &frames {
                    if !h.push(hd.kind, hd.flags, hd.session, payload) {
                        break;
                    }
                }
                h.publish();
            }
        }
    }
    h.ring();
}

/// Makes the hostile peer attach properly; false if the victim never answers.
fn handshake(h: &mut Hostile, rng: &mut Rng) -> bool {
    // A random first epoch, or the one after what the block holds (a plain restart).
    let old = h.load(h.own, side::EPOCH);
    h.epoch = if rng.chance(2) { rng.next() } else { old };
    h.restart();
    let t0 = Instant::now();
    while t0.elapsed() < BOUND {
        if h.follow() {
            return true;
        }
        thread::sleep(Duration::from_micros(200));
    }
    false
}

/// Answers the victim's Opens with Accepts and sends some pattern data on open sessions.
fn serve_victim(h: &mut Hostile, rng: &mut Rng) {
    h.drain();
    for (id, buf_alloc) in std::mem::take(&mut h.victim_opens) {
        let c = CreditArgs {
            fwd_cnt: 0,
            buf_alloc: 8 << 10,
        };
        if h.push(Kind::Accept, 0, id, &c.encode()) {
            h.sessions.insert(
                id,
                HostileSess {
                    sent: 0,
                    peer_fwd: 0,
                    buf_alloc,
                },
            );
        }
    }
    let ids: Vec<u64> = h.sessions.keys().copied().collect();
    for id in ids {
        let n = rng.below(1500) as usize;
        h.send_data(id, n, false, false);
    }
    h.publish();
}

/// A victim session on the hostile link: reads (checking every byte against the pattern
/// the hostile peer sends) and writes until the link resets it.
fn victim_session_on_hostile_link(victim: Arc<Endpoint>, seed: u64) -> JoinHandle<HostileLinkEnd> {
    thread::spawn(move || {
        let mut rng = Rng(seed | 1);
        let mut s = match victim.connect(PORT_HOSTILE) {
            Ok(s) => s,
            // The hostile link may be gone already: then there is nothing to check.
            Err(e) => {
                return match e.kind() {
                    ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::TimedOut => HostileLinkEnd::NotOpened,
                    _ => HostileLinkEnd::Other(format!("connect: {e}")),
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(20)));
        s.set_write_timeout(Some(Duration::from_millis(20)));
        let deadline = Instant::now() + 3 * BOUND;
        let mut buf = vec![0u8; 16 << 10];
        let mut pos = 0u64;
        let mut rewritten = None;
        while Instant::now() < deadline {
            if rng.chance(4) {
                match s.write_all(&[0x55; 64]) {
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                        return HostileLinkEnd::Reset {
                            bytes: pos,
                            rewritten,
                        }
                    }
                    Ok(()) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::BrokenPipe) => {}
                    Err(e) => return HostileLinkEnd::Other(format!("write: {e}")),
                }
            }
            match s.read(&mut buf) {
                Ok(0) => return HostileLinkEnd::Other("EOF instead of ConnectionReset".into()),
                Ok(n) => {
                    if rewritten.is_none() {
                        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(s.id(), pos + i as u64))
                        {
                            rewritten = Some(format!(
                                "byte {} of session {} is not the pattern the hostile peer sent",
                                pos + i as u64,
                                s.id()
                            ));
                        }
                    }
                    pos += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return HostileLinkEnd::Reset {
                        bytes: pos,
                        rewritten,
                    }
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                Err(e) => return HostileLinkEnd::Other(format!("read: {e}")),
            }
        }
        HostileLinkEnd::Other(format!(
            "still open {:?} after it started, with no ConnectionReset",
            3 * BOUND
        ))
    })
}

/// Waits until the hostile peer has accepted an Open from the victim (or gives up).
fn wait_victim_session(h: &mut Hostile, rng: &mut Rng) {
    let t0 = Instant::now();
    while h.sessions.is_empty() && t0.elapsed() < Duration::from_millis(500) {
        h.follow();
        serve_victim(h, rng);
        thread::sleep(Duration::from_micros(300));
    }
}

/// Checks that no further session waits on `l` (nothing the current peer did not open).
fn no_stray_session(l: &Listener, who: &str) -> Result<(), String> {
    match l.accept_timeout(Duration::from_millis(1)) {
        Ok(s) => Err(format!(
            "{who} accepted a session (id {}, message {}) the current peer never opened",
            s.id(),
            s.is_message()
        )),
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::ConnectionReset) => Ok(()),
        Err(e) => Err(format!("{who} accept: {e}")),
    }
}

/// One round; `Err` describes the failure.
fn round(
    w: &mut World,
    round: u64,
    scenario: Scenario,
    damage: &Damage,
    rng: &mut Rng,
) -> Result<RoundOutcome, String> {
    let hostile_role = other(w.victim_role);
    // The last honest peer leaves cleanly, after a last look for stray sessions.
    if let Some((ep, l, vl)) = w.honest.take() {
        no_stray_session(&l, "the last honest peer")?;
        no_stray_session(&vl, "the victim")?;
        drop(vl);
        drop(l);
        drop(ep);
    }

    // The hostile peer.
    w.bell.set_present(true);
    let down = scenario == Scenario::DownThenLeave
        || (scenario == Scenario::LeaveAndReturn && rng.chance(2));
    // A hostile host lays the region out when it shakes hands (a guest needs that to answer).
    let lay_out = !down || rng.chance(2);
    let mut h = Hostile::laying_out(w.region.clone(), hostile_role, w.bell.clone(), lay_out);
    let mut sessions = Vec::new();
    if down {
        // Maybe publish an epoch, never acknowledge the victim's.
        if rng.chance(2) {
            h.epoch = rng.next();
            h.restart();
        }
        apply_damage(&mut h, damage, w.victim_block(), round, rng);
    } else {
        if !handshake(&mut h, rng) {
            return Err(format!(
                "the victim never acknowledged a new peer's handshake within {BOUND:?}"
            ));
        }
        if scenario != Scenario::LeaveAndReturn || rng.chance(2) {
            sessions.push(victim_session_on_hostile_link(w.victim.clone(), rng.next()));
            wait_victim_session(&mut h, rng);
        }
        serve_victim(&mut h, rng);
        apply_damage(&mut h, damage, w.victim_block(), round, rng);
        match scenario {
            Scenario::LeaveMidWrite => leave_mid_write(&mut h, rng),
            Scenario::DamageAndStay => {
                let until = Instant::now() + Duration::from_millis(50 + rng.below(250));
                let mut asked = false;
                while Instant::now() < until {
                    if h.follow() {
                        serve_victim(&mut h, rng);
                        if !asked && rng.chance(20) {
                            // A second session, opened while the damage is in place.
                            sessions
                                .push(victim_session_on_hostile_link(w.victim.clone(), rng.next()));
                            asked = true;
                        }
                    }
                    thread::sleep(Duration::from_millis(2));
                }
            }
            _ => {}
        }
    }
    drop(h);

    // Leaving: the transport reports it, and the successor comes at once, soon, or after
    // the victim's heartbeat timeout.
    if scenario != Scenario::LeaveAndReturn {
        if rng.chance(2) {
            w.bell.set_present(false);
        }
        let pause = match rng.below(10) {
            0..=5 => Duration::ZERO,
            6..=8 => Duration::from_millis(rng.below(30)),
            _ => PEER_TIMEOUT + Duration::from_millis(50),
        };
        thread::sleep(pause);
    }

    // The fresh honest peer.
    let t0 = Instant::now();
    let deadline = t0 + BOUND;
    w.bell.set_present(true);
    let honest = Endpoint::unattached(hostile_role, w.region.clone(), w.bell.clone(), cfg())
        .map_err(|e| format!("the fresh {hostile_role:?} failed at start-up: {e}"))?;
    // Listening before attaching: anything planted that it ever reads shows up here.
    let honest_listener = honest.listen(PORT_ROUND).expect("listen");
    honest.attach();
    if !honest.wait_up(BOUND) {
        let st = honest.stats();
        return Err(format!(
            "the fresh {hostile_role:?}'s link was not up after {BOUND:?} \
             (its last error: {:?}; the victim's: {:?})",
            st.last_error,
            w.victim.stats().last_error
        ));
    }
    let victim_listener = w.victim.listen(PORT_ROUND).expect("victim listen");
    let from_honest = Plan::new(round, rng);
    let from_victim = Plan::new(round, rng);
    let (a, b, c, d) = thread::scope(|sc| {
        let honest = &honest;
        let victim = &*w.victim;
        let hl = &honest_listener;
        let vl = &victim_listener;
        let a = sc.spawn(move || open_and_exchange(honest, from_honest, deadline));
        let b = sc.spawn(move || accept_and_exchange(vl, from_honest));
        let c = sc.spawn(move || open_and_exchange(victim, from_victim, deadline));
        let d = sc.spawn(move || accept_and_exchange(hl, from_victim));
        (
            a.join().expect("honest opener"),
            b.join().expect("victim acceptor"),
            c.join().expect("victim opener"),
            d.join().expect("honest acceptor"),
        )
    });
    let working_after = t0.elapsed();
    let mode = |p: &Plan| if p.message { "message" } else { "stream" };
    a.map_err(|e| {
        format!(
            "session opened by the fresh peer ({}): {e}",
            mode(&from_honest)
        )
    })?;
    b.map_err(|e| format!("victim accepting ({}): {e}", mode(&from_honest)))?;
    c.map_err(|e| format!("session opened by the victim ({}): {e}", mode(&from_victim)))?;
    d.map_err(|e| format!("fresh peer accepting ({}): {e}", mode(&from_victim)))?;
    if working_after > BOUND {
        return Err(format!(
            "the fresh peer's link worked only after {working_after:?} (bound {BOUND:?})"
        ));
    }
    no_stray_session(&honest_listener, "the fresh peer")?;
    no_stray_session(&victim_listener, "the victim")?;
    for s in sessions {
        match s.join().expect("victim session on the hostile link") {
            HostileLinkEnd::NotOpened => {}
            HostileLinkEnd::Reset { bytes, rewritten } => {
                w.hostile_sessions += 1;
                w.hostile_sessions_with_data += u64::from(bytes > 0);
                if let Some(e) = rewritten {
                    // Bytes the peer rewrote in its own ring after publishing them, or a
                    // head it moved over records already read, are what it sent: only a
                    // damage that did so may explain them.
                    if !damage.rewrites_ring_of(block_of(hostile_role)) {
                        return Err(format!("victim session on the hostile link: {e}"));
                    }
                    w.hostile_sessions_rewritten += 1;
                }
            }
            HostileLinkEnd::Other(e) => {
                return Err(format!("victim session on the hostile link: {e}"))
            }
        }
    }
    w.honest = Some((honest, honest_listener, victim_listener));
    Ok(RoundOutcome { working_after })
}

/// Writes half a record (a Data frame for an open session) and leaves: its head published
/// over the header only, part of the payload, or not at all.
fn leave_mid_write(h: &mut Hostile, rng: &mut Rng) {
    let cap = h.cap();
    let vt = h.load(h.victim, side::RX_TAIL);
    let len = 256 + 16 * rng.below(200) as usize;
    let rec = ivring::frame::record_len(len) as u64;
    let off = h.head % cap;
    // The victim's tail can be ahead of our head (it has not followed our restart yet):
    // then there is no room to count.
    let used = h.head.checked_sub(vt);
    if cap - off < rec || used.is_none_or(|used| used + rec > cap) {
        return;
    }
    let id = h.sessions.keys().next().copied().unwrap_or(1 << 1);
    let hd = Header {
        kind: Kind::Data,
        flags: 0,
        len: len as u32,
        session: id,
    };
    h.region.write(h.tx_ring + off as usize, &hd.encode());
    let written = 16 * rng.below(len as u64 / 16) as usize;
    let sent = h.sessions.get(&id).map_or(0, |s| s.sent);
    let payload: Vec<u8> = (0..written as u64).map(|i| pattern(id, sent + i)).collect();
    h.region
        .write(h.tx_ring + off as usize + HEADER_LEN, &payload);
    match rng.below(3) {
        0 => h.store(side::TX_HEAD, h.head + HEADER_LEN as u64),
        1 => h.store(side::TX_HEAD, h.head + (HEADER_LEN + written) as u64),
        _ => {}
    }
    h.ring();
}

fn rounds() -> u64 {
    std::env::var("IVRING_RECOVERY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn seed() -> u64 {
    std::env::var("IVRING_RECOVERY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x2545_f491_4f6c_dd1d)
}

fn print_figures(title: &str, by: &BTreeMap<String, Vec<Duration>>) {
    eprintln!("{title}: n, median, max time until the fresh peer's link worked");
    for (k, v) in by {
        let mut v = v.clone();
        v.sort();
        eprintln!(
            "  {k:<22} {:>5} {:>9.1} ms {:>9.1} ms",
            v.len(),
            v[v.len() / 2].as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        );
    }
}

fn run(victim_role: Role) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    count_panics();
    let panics0 = PANICS.load(Ordering::SeqCst);
    let rounds = rounds();
    let seed = seed();
    eprintln!(
        "recovery, victim {victim_role:?}: {rounds} rounds, IVRING_RECOVERY_SEED={seed}, \
         bound {BOUND:?}, heartbeat {HEARTBEAT:?}, peer timeout {PEER_TIMEOUT:?}"
    );
    let mut rng = Rng(seed ^ (victim_role as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let rss0 = rss_bytes();
    let mut max_rss = rss0;
    let mut w = World::new(victim_role);
    let mut failures = Vec::new();
    let mut by_damage: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut by_scenario: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let start = Instant::now();
    let test = match victim_role {
        Role::Host => "victim_host_recovers_from_hostile_guests (one round)",
        Role::Guest => "victim_guest_recovers_from_hostile_hosts (one round)",
    };
    for r in 0..rounds {
        // Per round: a round that never ends (a lost wakeup, a peer never declared gone)
        // fails the run in a minute, however many rounds there are.
        let _round = common::watchdog(test, Duration::from_secs(60));
        let damage = Damage::for_round(r, seed, &mut rng);
        let scenario = Scenario::pick(&mut rng);
        match round(&mut w, r, scenario, &damage, &mut rng) {
            Ok(o) => {
                by_damage
                    .entry(damage.kind())
                    .or_default()
                    .push(o.working_after);
                by_scenario
                    .entry(format!("{scenario:?}"))
                    .or_default()
                    .push(o.working_after);
            }
            Err(e) => {
                let msg = format!("round {r}: {scenario:?}, {damage:?}: {e}");
                eprintln!("FAILED {msg}");
                failures.push(msg);
                // Start over with a fresh victim so the next rounds test something.
                w = World::new(victim_role);
            }
        }
        let n = w.victim.session_count();
        assert!(
            n <= cfg().max_sessions,
            "round {r}: victim has {n} sessions"
        );
        let rss = rss_bytes();
        max_rss = max_rss.max(rss);
        assert!(
            rss < rss0 + (256 << 20),
            "round {r}: RSS grew from {rss0} to {rss}"
        );
    }
    let _end = common::watchdog(test, Duration::from_secs(60));
    let (hostile_sessions, with_data, rewritten) = (
        w.hostile_sessions,
        w.hostile_sessions_with_data,
        w.hostile_sessions_rewritten,
    );
    drop(w);
    eprintln!(
        "recovery, victim {victim_role:?}: {rounds} rounds in {:?}, {} failed; RSS {} -> max {} MiB; \
         victim sessions on hostile links reset: {hostile_sessions} ({with_data} after reading \
         the hostile peer's data, {rewritten} of them bytes it rewrote in its ring)",
        start.elapsed(),
        failures.len(),
        rss0 >> 20,
        max_rss >> 20
    );
    print_figures(&format!("victim {victim_role:?}, by damage"), &by_damage);
    print_figures(
        &format!("victim {victim_role:?}, by scenario"),
        &by_scenario,
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics0,
        "a thread panicked (see above)"
    );
    assert!(
        failures.is_empty(),
        "{} of {rounds} rounds failed (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn victim_host_recovers_from_hostile_guests() {
    run(Role::Host);
}

#[test]
fn victim_guest_recovers_from_hostile_hosts() {
    run(Role::Guest);
}

//! Recovery through the real ivshmem server from a peer that scribbled on the shared
//! memory and left (PROTOCOL.md §1, §3, §6).
//!
//! A victim link (this process, joined to an `ivring-host` server socket with
//! [`HostLink`]) lives through many rounds. In each round the last honest peer leaves
//! (killed, if it was a process; detached, if in this process); a hostile peer of the other
//! role joins the server as an ivshmem client (memfd and eventfds over the UNIX socket),
//! maps the memory, sometimes completes the handshake, writes one or several words of the
//! header, the host block or the guest block, and leaves by closing its socket (the server
//! tells the victim). Then a fresh honest peer of that role joins: every other round an
//! `ivring-host peer` process (the victim opens sessions to its services, and it opens one
//! back to say hello), otherwise a [`HostLink`] in this process (sessions opened from both
//! sides to each other's services). Checksummed data must move both ways, in stream and
//! in message sessions, within [`BOUND`] = 5 s of the fresh peer's start (the victim beats
//! every 20 ms and times a silent peer out after 300 ms; the process peer uses the
//! defaults). The time taken is printed per damaged word; it is never asserted beyond the
//! bound. It includes the fresh peer's join of the server, of which about 50 ms is the
//! client waiting for the server's messages to go quiet (`client.rs`, HANDSHAKE_QUIET).
//!
//! Words and values: every word of the header (offsets 0..56) and of both side blocks,
//! with 0, 1, `u64::MAX`, `1 << 63`, `u32::MAX`, its current value ± 1, `MAGIC`, the
//! victim's epoch + 1 and random values, round-robin (every pair within 313 rounds),
//! and several words at once in one round of five.
//!
//! Failing rounds are collected (word, value, how the hostile peer behaved, symptom) and
//! reported together; a fresh server and victim are set up after one.
//!
//! `IVRING_RECOVERY_ROUNDS` sets the rounds per victim role (default 100),
//! `IVRING_RECOVERY_SEED` the seed.

use ivring::layout::{side, CONTROL_SIZE, GUEST_BLOCK, HOST_BLOCK, MAGIC, PEER_ID_VALID, VERSION};
use ivring::{Config, Doorbell, Endpoint, Geometry, Role, SessionOptions, SharedRegion};
use ivring_host::attach::{Attach, HostLink};
use ivring_host::{Client, Server, ServerHandle};
use ivring_tools::demo::PORT_HELLO;
use ivring_tools::services::{self, pattern, StreamHash, PORT_CHECK, PORT_ECHO, PORT_SOURCE};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Once};
use std::thread;
use std::time::{Duration, Instant};

mod common;
use common::BIN;
#[path = "../../ring/tests/common/damage.rs"]
mod damage;
use damage::{words, Rng, Value, VALUES};

/// Panics in any thread of this process (the endpoints' keepers included).
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
const SIZE: u64 = 256 << 10;

fn cfg() -> Config {
    Config {
        heartbeat: HEARTBEAT,
        peer_timeout: PEER_TIMEOUT,
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

fn role_arg(role: Role) -> &'static str {
    match role {
        Role::Host => "host",
        Role::Guest => "guest",
    }
}

/// The words a round damages: one (round-robin over words and values) or several.
fn damage_for(round: u64, seed: u64, rng: &mut Rng) -> Vec<(String, usize, Value)> {
    let words = words();
    if round % 5 == 4 {
        return (0..2 + rng.below(5))
            .map(|_| {
                let (name, at) = words[rng.below(words.len() as u64) as usize].clone();
                (name, at, VALUES[rng.below(VALUES.len() as u64) as usize])
            })
            .collect();
    }
    let j = round / 5 * 4 + round % 5 + seed % 1000;
    let (name, at) = words[(j % words.len() as u64) as usize].clone();
    // Each pass over the words shifts the values by 2 (coprime with their 10).
    let value = VALUES[((j + 2 * (j / words.len() as u64)) % VALUES.len() as u64) as usize];
    vec![(name, at, value)]
}

fn damage_kind(d: &[(String, usize, Value)]) -> String {
    if d.len() == 1 {
        d[0].0.clone()
    } else {
        "several words".into()
    }
}

/// A hostile peer: an ivshmem client of the server writing the shared words by hand.
struct HostileClient {
    client: Client,
    region: SharedRegion,
    role: Role,
    own: usize,
    peer: usize,
    epoch: u64,
}

impl HostileClient {
    fn join(sock: &PathBuf, role: Role) -> Result<HostileClient, String> {
        let client =
            Client::connect(sock).map_err(|e| format!("hostile peer could not join: {e}"))?;
        let region = client.region();
        Ok(HostileClient {
            client,
            region,
            role,
            own: block_of(role),
            peer: block_of(other(role)),
            epoch: 0,
        })
    }

    fn store(&self, word: usize, v: u64) {
        self.region.store_u64(self.own + word, v, Ordering::Release);
    }

    fn load_peer(&self, word: usize) -> u64 {
        self.region.load_u64(self.peer + word, Ordering::Acquire)
    }

    fn ring_victim(&self) {
        let w = self.load_peer(side::PEER_ID);
        if w & PEER_ID_VALID != 0 {
            self.client.doorbell().ring(w as u16);
        }
    }

    /// Writes the header as a host does (PROTOCOL.md §1), magic last.
    fn lay_out(&self) {
        let g = Geometry::for_size(self.region.len()).expect("region size");
        let w = |off: usize, v: u64| self.region.store_u64(off, v, Ordering::Relaxed);
        w(8, VERSION as u64 | (CONTROL_SIZE as u64) << 32);
        w(16, g.region_size);
        w(24, g.h2g_offset);
        w(32, g.capacity);
        w(40, g.g2h_offset);
        w(48, g.capacity);
        self.region.store_u64(0, MAGIC, Ordering::Release);
    }

    /// Publishes a new epoch with zeroed indices (PROTOCOL.md §3).
    fn announce(&mut self, rng: &mut Rng) {
        if self.role == Role::Host {
            self.lay_out();
        }
        for w in [
            side::TX_HEAD,
            side::RX_TAIL,
            side::RX_NEED_WAKEUP,
            side::TX_NEED_SPACE,
            side::ACK,
            side::POLLS,
        ] {
            self.store(w, 0);
        }
        self.store(side::PEER_ID, PEER_ID_VALID | self.client.id() as u64);
        self.epoch = rng.next() | 1;
        self.store(side::EPOCH, self.epoch);
        self.ring_victim();
    }

    /// Completes the handshake: acknowledges the victim's epoch and waits for its
    /// acknowledgement of ours, heartbeating meanwhile.
    fn handshake(&mut self, rng: &mut Rng) -> bool {
        self.announce(rng);
        let t0 = Instant::now();
        let mut acked = 0;
        let mut beat = 0u64;
        while t0.elapsed() < BOUND {
            beat += 1;
            self.store(side::HEARTBEAT, beat);
            let ve = self.load_peer(side::EPOCH);
            if ve != 0 && ve != acked {
                self.store(side::TX_HEAD, 0);
                self.store(side::RX_TAIL, 0);
                self.store(side::ACK, ve);
                acked = ve;
                self.ring_victim();
            }
            if ve != 0 && acked == ve && self.load_peer(side::ACK) == self.epoch {
                return true;
            }
            thread::sleep(Duration::from_micros(500));
        }
        false
    }
}

/// The honest peer of a round.
enum Honest {
    InProcess(HostLink),
    Process { child: Child, stderr: PathBuf },
}

impl Honest {
    /// What a failed process peer said, for the failure report.
    fn describe(&mut self) -> String {
        match self {
            Honest::InProcess(l) => format!("its last error: {:?}", l.stats().last_error),
            Honest::Process { child, stderr } => {
                let status = child.try_wait().ok().flatten();
                let err = std::fs::read_to_string(&*stderr).unwrap_or_default();
                format!(
                    "process {}: {}; stderr: {:?}",
                    child.id(),
                    status.map_or("running".to_string(), |s| s.to_string()),
                    err.trim()
                )
            }
        }
    }
}

impl Drop for Honest {
    fn drop(&mut self) {
        if let Honest::Process { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A server and the victim joined to it.
struct World {
    dir: PathBuf,
    sock: PathBuf,
    victim_role: Role,
    victim: Option<HostLink>,
    server: Option<ServerHandle>,
    /// Greetings the process peers sent to the victim's PORT_HELLO.
    hellos: mpsc::Receiver<String>,
    honest: Option<Honest>,
}

impl World {
    fn new(victim_role: Role, generation: u32) -> World {
        let dir = std::env::temp_dir().join(format!(
            "ivring-t-recovery-{}-{}-{generation}",
            role_arg(victim_role),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ivshmem.sock");
        let server = Server::bind(&sock, SIZE, 1).unwrap().spawn();
        let (tx, hellos) = mpsc::channel();
        let victim = HostLink::open_with(victim_role, &Attach::Join(sock.clone()), cfg(), |ep| {
            services::spawn_all(ep)?;
            let l = ep.listen(PORT_HELLO)?;
            thread::spawn(move || {
                while let Ok(mut s) = l.accept() {
                    s.set_read_timeout(Some(BOUND));
                    let mut got = String::new();
                    if s.read_to_string(&mut got).is_ok() && tx.send(got).is_err() {
                        return;
                    }
                }
            });
            Ok(())
        })
        .expect("victim joins the server");
        World {
            dir,
            sock,
            victim_role,
            victim: Some(victim),
            server: Some(server),
            hellos,
            honest: None,
        }
    }

    fn victim(&self) -> &Endpoint {
        self.victim.as_ref().expect("victim")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.honest.take();
        self.victim.take();
        self.server.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Connects to `port`, retrying while the link still belongs to an earlier peer (refused,
/// or reset when the victim learns of the new one) until `deadline`.
fn connect(
    ep: &Endpoint,
    port: u32,
    message: bool,
    deadline: Instant,
) -> Result<ivring::Session, String> {
    loop {
        match ep.connect_with(port, SessionOptions { message }) {
            Ok(mut s) => {
                s.set_read_timeout(Some(BOUND));
                s.set_write_timeout(Some(BOUND));
                return Ok(s);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                ) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(2))
            }
            Err(e) => return Err(format!("connect to port {port}: {e}")),
        }
    }
}

/// Sends `len` pattern bytes of stream `seed` to the check service; the count and hash
/// it answers must match.
fn check_send(ep: &Endpoint, seed: u64, len: usize, deadline: Instant) -> Result<(), String> {
    let mut s = connect(ep, PORT_CHECK, false, deadline)?;
    let mut buf = vec![0u8; len];
    pattern(seed, 0, &mut buf);
    let mut h = StreamHash::default();
    h.update(&buf);
    let io = |e: std::io::Error| format!("check service: {e}");
    s.write_all(&buf).map_err(io)?;
    s.shutdown(Shutdown::Write).map_err(io)?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).map_err(io)?;
    let count = u64::from_le_bytes(reply[..8].try_into().unwrap());
    let hash = u64::from_le_bytes(reply[8..].try_into().unwrap());
    if count != len as u64 || hash != h.finish() {
        return Err(format!(
            "check service counted {count} bytes (sent {len}) with hash {hash:#x} (expected {:#x})",
            h.finish()
        ));
    }
    Ok(())
}

/// Asks the source service for `len` bytes of stream `seed` and checks every byte.
fn source_recv(ep: &Endpoint, seed: u64, len: usize, deadline: Instant) -> Result<(), String> {
    let mut s = connect(ep, PORT_SOURCE, false, deadline)?;
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&(len as u64).to_le_bytes());
    req[8..].copy_from_slice(&seed.to_le_bytes());
    let io = |e: std::io::Error| format!("source service: {e}");
    s.write_all(&req).map_err(io)?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(io)?;
    let mut want = vec![0u8; len];
    pattern(seed, 0, &mut want);
    if got != want {
        let at = got.iter().zip(&want).position(|(a, b)| a != b);
        return Err(format!(
            "source service sent {} bytes (asked {len}), first wrong byte at {at:?}",
            got.len()
        ));
    }
    Ok(())
}

/// Sends messages of pattern bytes to the echo service; each must come back whole.
fn echo_messages(ep: &Endpoint, seed: u64, rng: &mut Rng, deadline: Instant) -> Result<(), String> {
    let mut s = connect(ep, PORT_ECHO, true, deadline)?;
    let io = |e: std::io::Error| format!("echo service: {e}");
    let mut back = vec![0u8; 64 << 10];
    let mut off = 0u64;
    for _ in 0..1 + rng.below(4) {
        let mut m = vec![0u8; 1 + rng.below(4096) as usize];
        pattern(seed, off, &mut m);
        off += m.len() as u64;
        let w = s.write(&m).map_err(io)?;
        if w != m.len() {
            return Err(format!("message write took {w} of {} bytes", m.len()));
        }
        let n = s.read(&mut back).map_err(io)?;
        if back[..n] != m[..] {
            return Err(format!(
                "echoed message of {n} bytes differs from the {} sent",
                m.len()
            ));
        }
    }
    Ok(())
}

/// Moves checksummed data both ways in sessions `ep` opens: stream to the peer, stream
/// from it, messages both ways.
fn exchange_from(ep: &Endpoint, seed: u64, deadline: Instant) -> Result<(), String> {
    let mut rng = Rng(seed | 1);
    check_send(ep, seed, 1 + rng.below(16 << 10) as usize, deadline)?;
    source_recv(ep, seed ^ 0x55, 1 + rng.below(16 << 10) as usize, deadline)?;
    echo_messages(ep, seed ^ 0xaa, &mut rng, deadline)
}

#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Never completes the handshake (sometimes publishes an epoch).
    Down,
    /// Completes the handshake, then damages.
    Up,
}

/// One round; `Err` describes the failure.
fn round(
    w: &mut World,
    r: u64,
    damage: &[(String, usize, Value)],
    behaviour: Behaviour,
    rng: &mut Rng,
) -> Result<Duration, String> {
    let role = other(w.victim_role);
    w.honest.take();

    let mut h = HostileClient::join(&w.sock, role)?;
    match behaviour {
        Behaviour::Down => {
            if role == Role::Host && rng.chance(2) {
                h.lay_out();
            }
            if rng.chance(2) {
                h.announce(rng);
            }
        }
        Behaviour::Up => {
            if !h.handshake(rng) {
                return Err(format!(
                    "the victim never acknowledged a new peer's handshake within {BOUND:?} \
                     (its last error: {:?})",
                    w.victim().stats().last_error
                ));
            }
        }
    }
    let victim_block = block_of(w.victim_role);
    for (_, at, value) in damage {
        let v = value.resolve(&h.region, *at, victim_block, rng);
        h.region.store_u64(*at, v, Ordering::Release);
    }
    h.ring_victim();
    // Leaving: closing the socket makes the server announce it.
    drop(h);

    let t0 = Instant::now();
    let deadline = t0 + BOUND;
    let seed = rng.next();
    if r.is_multiple_of(2) {
        let stderr = w.dir.join(format!("peer-{r}.stderr"));
        let child = Command::new(BIN)
            .args(["peer", "--hello", "--role", role_arg(role), "--join"])
            .arg(&w.sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start peer process");
        let pid = child.id();
        let mut honest = Honest::Process { child, stderr };
        let hello = format!("hello from pid {pid}");
        let checked = exchange_from(w.victim(), seed, deadline).and_then(|()| loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match w.hellos.recv_timeout(left) {
                Ok(m) if m == hello => break Ok(()),
                Ok(_) => continue, // an earlier process's greeting
                Err(_) => break Err(format!("no \"{hello}\" within {BOUND:?}")),
            }
        });
        if let Err(e) = checked {
            return Err(format!(
                "fresh {role:?} process: {e} ({}; victim's last error: {:?})",
                honest.describe(),
                w.victim().stats().last_error
            ));
        }
        w.honest = Some(honest);
    } else {
        let link = HostLink::open_with(role, &Attach::Join(w.sock.clone()), cfg(), |ep| {
            services::spawn_all(ep)
        })
        .map_err(|e| format!("the fresh {role:?} failed at start-up: {e}"))?;
        if !link.wait_up(BOUND) {
            let mut honest = Honest::InProcess(link);
            return Err(format!(
                "the fresh {role:?}'s link was not up after {BOUND:?} ({}; victim's: {:?})",
                honest.describe(),
                w.victim().stats().last_error
            ));
        }
        let (a, b) = thread::scope(|sc| {
            let victim = w.victim();
            let ours = sc.spawn(move || exchange_from(victim, seed, deadline));
            let theirs = exchange_from(&link, seed ^ 0x1234, deadline);
            (ours.join().expect("victim's sessions"), theirs)
        });
        a.map_err(|e| format!("sessions the victim opened: {e}"))?;
        b.map_err(|e| format!("sessions the fresh {role:?} opened: {e}"))?;
        w.honest = Some(Honest::InProcess(link));
    }
    let took = t0.elapsed();
    if took > BOUND {
        return Err(format!("the link worked only after {took:?}"));
    }
    Ok(took)
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
            "  {k:<26} {:>5} {:>9.1} ms {:>9.1} ms",
            v.len(),
            v[v.len() / 2].as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        );
    }
}

fn run(victim_role: Role) {
    count_panics();
    let rounds = rounds();
    let seed = seed();
    eprintln!(
        "recovery through the server, victim {victim_role:?}: {rounds} rounds, \
         IVRING_RECOVERY_SEED={seed}, bound {BOUND:?}"
    );
    let mut rng = Rng(seed ^ (victim_role as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut generation = 0;
    let mut w = World::new(victim_role, generation);
    let mut failures = Vec::new();
    let mut by_damage: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut by_peer: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let start = Instant::now();
    for r in 0..rounds {
        let damage = damage_for(r, seed, &mut rng);
        let behaviour = if rng.chance(2) {
            Behaviour::Down
        } else {
            Behaviour::Up
        };
        match round(&mut w, r, &damage, behaviour, &mut rng) {
            Ok(took) => {
                by_damage
                    .entry(damage_kind(&damage))
                    .or_default()
                    .push(took);
                let peer = if r.is_multiple_of(2) {
                    "process"
                } else {
                    "in-process"
                };
                by_peer
                    .entry(format!("{behaviour:?}, {peer}"))
                    .or_default()
                    .push(took);
            }
            Err(e) => {
                let what: Vec<String> = damage
                    .iter()
                    .map(|(n, _, v)| format!("{n} = {v:?}"))
                    .collect();
                let msg = format!(
                    "round {r}: hostile peer {behaviour:?}, {}, fresh peer {}: {e}",
                    what.join(", "),
                    if r.is_multiple_of(2) {
                        "process"
                    } else {
                        "in-process"
                    }
                );
                eprintln!("FAILED {msg}");
                failures.push(msg);
                drop(w);
                generation += 1;
                w = World::new(victim_role, generation);
            }
        }
    }
    drop(w);
    eprintln!(
        "recovery through the server, victim {victim_role:?}: {rounds} rounds in {:?}, {} failed",
        start.elapsed(),
        failures.len()
    );
    print_figures(&format!("victim {victim_role:?}, by damage"), &by_damage);
    print_figures(
        &format!("victim {victim_role:?}, by hostile behaviour and fresh peer"),
        &by_peer,
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
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
fn victim_host_recovers_from_hostile_guests_through_the_server() {
    run(Role::Host);
}

#[test]
fn victim_guest_recovers_from_hostile_hosts_through_the_server() {
    run(Role::Guest);
}

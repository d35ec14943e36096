//! One link's state: the handshake, the two ring halves and every session on them.
//! Receiving is in `rx.rs`, transmitting in `tx.rs`, zero-copy parking in `park.rs`.
//!
//! All of it sits behind one mutex in the runtime (`crate::runtime`); nothing here
//! blocks, sleeps, reads a clock or imports the runtime or the API. What must happen
//! after a call (ring the peer, wake callers) goes into the [`Actions`] the call is
//! given, for the runtime to do.
//! Everything read from shared memory is read once, checked, and used from the local
//! copy (PROTOCOL.md §6).

pub(crate) mod park;
pub(crate) mod rx;
pub(crate) mod tx;

use crate::config::{Config, WaitMode};
use crate::shm::layout::{side, Geometry, Role, PEER_ID_VALID};
use crate::shm::region::SharedRegion;
use crate::shm::sync::Ordering;
use crate::wire::frame::FrameError;
use crate::wire::frame::{Header, Kind, OpenArgs};
use crate::wire::ring::{BadIndex, Consumer, Producer};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::time::Instant;

/// Counters a link keeps about its peer's behaviour.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Frames for sessions that are not open, dropped unread.
    pub frames_dropped: u64,
    /// Times every session was reset (peer restart, peer gone, corruption).
    pub link_resets: u64,
    /// Sessions reset alone (a peer that broke the session protocol, or said Reset).
    pub session_resets: u64,
    /// Times the peer corrupted the ring or its indices.
    pub corruptions: u64,
    /// Open requests refused (no listener, backlog or session limit).
    pub opens_refused: u64,
    /// The most recent reason for a reset of the link, if any.
    pub last_error: Option<String>,
    /// Blocked calls that slept until their safety limit (100 ms) and then found what
    /// they waited for, and frames a callback or a blocked call waited for that the
    /// endpoint's own thread read only after sleeping to its limit: wakeups lost between
    /// the threads of this endpoint or by a peer that did not ring when asked. 0 on a
    /// healthy link; counted by the runtime, not the link.
    pub late_wakeups: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    Connecting,
    Open,
    Refused,
    Reset(String),
}

pub(crate) struct Sess {
    pub state: State,
    pub message: bool,
    pub(crate) rx: Vec<u8>,
    pub(crate) rx_pos: usize,
    pub(crate) msgs: VecDeque<usize>,
    pub(crate) partial: usize,
    /// The peer will send no more (Shutdown or Close seen).
    pub rx_eof: bool,
    /// We shut our read side: arriving data is dropped (but credited).
    pub rd_shut: bool,
    pub(crate) buf_alloc: u32,
    pub(crate) received: u64,
    pub(crate) fwd_cnt: u64,
    pub(crate) fwd_sent: u64,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u64,
    pub(crate) tx_cnt: u64,
    /// The peer closed: writes fail with BrokenPipe.
    pub peer_closed: bool,
    /// We sent Shutdown.
    pub wr_shut: bool,
    /// Called whenever the session may have become readable or writable (pollable fds).
    pub notify: Option<Notifier>,
    /// Listed in `Link::space_notify` (its non-blocking write found the ring full).
    pub(crate) space_notify: bool,
    /// `fwd_cnt` when the reader last ran dry: a reader that slept in one dry spell and
    /// consumed (nearly) a whole buffer before the next was held back by its size.
    pub(crate) fwd_at_dry: u64,
    /// A caller of the session slept (not spun) since `fwd_at_dry`.
    pub(crate) slept: bool,
    /// The reader takes frames in place (`link::park`): pump parks them in the ring.
    pub(crate) in_place: bool,
    /// A call of the session returned `WouldBlock` and its caller waits for `notify`
    /// ([`Link::await_callback`]); cleared when the callback runs.
    pub(crate) awaited: bool,
}

/// A readiness callback: must be cheap and must not call back into the endpoint.
pub type Notifier = std::sync::Arc<dyn Fn() + Send + Sync>;

impl Sess {
    fn new(message: bool, buf_alloc: u32, state: State) -> Sess {
        Sess {
            state,
            message,
            rx: Vec::new(),
            rx_pos: 0,
            msgs: VecDeque::new(),
            partial: 0,
            rx_eof: false,
            rd_shut: false,
            buf_alloc,
            received: 0,
            fwd_cnt: 0,
            fwd_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            peer_closed: false,
            wr_shut: false,
            notify: None,
            space_notify: false,
            fwd_at_dry: 0,
            slept: false,
            in_place: false,
            awaited: false,
        }
    }

    pub(crate) fn buffered(&self) -> usize {
        self.rx.len() - self.rx_pos
    }

    /// Bytes we may still send before the peer's buffer is full.
    pub fn credit(&self) -> u64 {
        (self.peer_buf_alloc as u64).saturating_sub(self.tx_cnt - self.peer_fwd_cnt)
    }

    pub fn peer_buf_alloc(&self) -> u32 {
        self.peer_buf_alloc
    }

    /// Whether a read would return something (data, a message, or EOF).
    pub fn readable(&self) -> bool {
        if self.message {
            !self.msgs.is_empty() || self.rx_eof || self.rd_shut
        } else {
            self.buffered() > 0 || self.rx_eof || self.rd_shut
        }
    }

    /// Copies out what a read returns; the count of bytes consumed for credit.
    fn take(&mut self, buf: &mut [u8]) -> (usize, usize) {
        if self.message {
            let Some(m) = self.msgs.pop_front() else {
                return (0, 0);
            };
            let n = m.min(buf.len());
            buf[..n].copy_from_slice(&self.rx[self.rx_pos..self.rx_pos + n]);
            self.rx_pos += m;
            self.compact();
            (n, m)
        } else {
            let n = self.buffered().min(buf.len());
            buf[..n].copy_from_slice(&self.rx[self.rx_pos..self.rx_pos + n]);
            self.rx_pos += n;
            self.compact();
            (n, n)
        }
    }

    fn compact(&mut self) {
        if self.rx_pos == self.rx.len() {
            self.rx.clear();
            self.rx_pos = 0;
        } else if self.rx_pos > self.rx.len() / 2 && self.rx_pos > 4096 {
            self.rx.drain(..self.rx_pos);
            self.rx_pos = 0;
        }
    }
}

#[derive(Default)]
pub(crate) struct Listen {
    pub backlog: VecDeque<u64>,
    /// Called when a session joins the backlog, and when the link resets or the endpoint
    /// closes (`Listener::set_notify`): an accept that would block may succeed now.
    pub notify: Option<Notifier>,
}

/// Why the link stopped: every session of the epoch ends with `ConnectionReset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The peer published a new epoch (it restarted); the link has already followed it
    /// (sessions reset, indices zeroed, the epoch acknowledged) and waits for the peer.
    PeerRestarted {
        /// The peer's new epoch, as read (once) for this decision.
        epoch: u64,
    },
    /// The peer broke the ring (counted in [`Stats::corruptions`]). Calls for a local
    /// reset.
    Corrupt(Corruption),
    /// The peer is gone. Calls for a local reset.
    PeerGone(Gone),
}

/// What of the ring the peer broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Corruption {
    /// An index of its own (our receive head, or its read tail of our ring) out of range
    /// of ours.
    Index(BadIndex),
    /// A record header in our receive ring.
    Record(FrameError),
}

/// How we learned that the peer is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gone {
    /// The transport (the ivshmem server) said it left.
    LeftServer,
    /// Its heartbeat stood still for this long (`Config::peer_timeout`).
    HeartbeatStopped(std::time::Duration),
}

impl Fault {
    /// Whether this side must start a new epoch (the peer did not already).
    pub(crate) fn needs_local_reset(&self) -> bool {
        !matches!(self, Fault::PeerRestarted { .. })
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::PeerRestarted { .. } => f.write_str("peer restarted"),
            Fault::Corrupt(Corruption::Index(bad)) => write!(
                f,
                "peer corrupted the ring: index {} against ours {}",
                bad.peer_index, bad.own_index
            ),
            Fault::Corrupt(Corruption::Record(e)) => write!(f, "peer corrupted the ring: {e}"),
            Fault::PeerGone(Gone::LeftServer) => f.write_str("peer left the ivshmem server"),
            Fault::PeerGone(Gone::HeartbeatStopped(t)) => {
                write!(f, "peer heartbeat stopped for {t:?}")
            }
        }
    }
}

/// What the runtime must do after calls into the link, which does no I/O and wakes
/// nobody itself. Every call that may need something done takes `out` and adds to it;
/// the runtime acts on it once the call returns (ringing with the lock held, waking
/// after it is released).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct Actions {
    /// Ring the peer's doorbell ([`Link::doorbell_target`]): it asked to be rung for
    /// what we published or released, or the link state changed.
    pub ring_peer: bool,
    /// Wake the callers of these sessions' stripes: frames concerned them (all after a
    /// reset of the link).
    pub wake: Stripes,
    /// A write found the ring full (or control frames queued ahead of it): its caller
    /// waits for space with the other such writers, woken one at a time.
    pub wait_space: bool,
    /// The ring takes records again after a reset's stale copies finished: wake the
    /// writers waiting for space.
    pub space_back: bool,
    /// A callback ran for a caller that waited for it ([`Link::await_callback`]): the
    /// runtime tells from this whether the one who ran it came late.
    pub awaited_callback: bool,
    /// Every session was reset: every caller must look again, the one waiting on the
    /// doorbell too (it would otherwise learn at the peer's next ring).
    pub reset: bool,
}

pub(crate) struct Link {
    role: Role,
    region: SharedRegion,
    geom: Geometry,
    max_payload: usize,
    cfg: Config,
    own: usize,
    peer: usize,
    /// Our epoch: the one copy that counts (the word in the region is only its image,
    /// which a peer may have overwritten).
    epoch: u64,
    /// Our ivshmem peer id, as published in `PEER_ID`.
    own_id: Option<u16>,
    /// `attach` has run and `detach` has not: our words are in the region.
    attached: bool,
    /// The link changed outside `check_peer` (an index check found the peer's new
    /// epoch and followed it); `check_peer` reports it.
    followed_restart: bool,
    /// The peer epoch we have reset our indices for and acknowledged.
    peer_acked: u64,
    /// While `check_peer` drains what the peer's old incarnation published: the epoch it
    /// read, which an index fault inside acts on rather than reading it again.
    epoch_in_hand: Option<u64>,
    /// Both sides have acknowledged each other's epoch: traffic may flow.
    up: bool,
    /// The host has laid the region out (always true on the host).
    laid_out: bool,
    /// Bumped at every reset of all sessions: a session of an older generation is reset.
    gen: u64,
    peer_id: Option<u16>,
    /// The transport has reported the current peer present at least once.
    peer_seen_present: bool,
    heartbeat: u64,
    last_beat: Instant,
    peer_beat: u64,
    peer_beat_at: Instant,
    tx: Producer,
    rx: Consumer,
    /// A Data frame left in the ring for an in-place reader (`link::park`).
    parked: Option<crate::link::park::Parked>,
    sessions: HashMap<u64, Sess, SessionIds>,
    /// Sessions the peer had finished (Shutdown or Close) when the link reset, by
    /// (generation, id): their data is still read, then EOF. Dropping the Session removes it.
    ended: HashMap<(u64, u64), Sess>,
    listeners: HashMap<u32, Listen>,
    next_seq: u64,
    highest_peer_seq: u64,
    /// Control frames waiting for ring space, in order.
    pending: VecDeque<(Header, [u8; 16])>,
    stats: Stats,
    /// Set once the endpoint is dropped.
    closed: bool,
    /// Sessions whose non-blocking writes found the ring full: their notify callbacks
    /// run when space comes back (no frame of theirs may arrive to say so).
    space_notify: Vec<u64>,
    /// Callers waiting for the link to come up without blocking (`Connecting`), by
    /// token: called when it comes up and when the endpoint closes.
    up_notify: HashMap<u64, Notifier>,
    next_up_token: u64,
    /// Where `read_any` starts looking at what its sessions hold: one past the session it
    /// served from there last.
    held_turn: usize,
    /// The map of the last large set `read_any` was given: an event loop passes the same
    /// set call after call, and building the map took more than the lookups it served.
    set_cache: Option<rx::SetCache>,
    /// Receive buffers of ended sessions, emptied, for the next sessions to open: a new
    /// session's first window otherwise lands in freshly mapped pages, and the kernel's
    /// page clearing took half the CPU while 256 new sessions started.
    spare_rx: Vec<Vec<u8>>,
    spare_rx_bytes: usize,
    /// A buffer was kept or taken since the last heartbeat; when that last happened.
    spare_rx_used: bool,
    spare_rx_quiet_since: Instant,
}

const MAX_PENDING_CONTROL: usize = 1 << 16;
/// Most receive buffers of ended sessions a link keeps for new ones.
const SPARE_RX_BUFFERS: usize = 1024;
/// Most bytes the kept buffers hold, in windows of `Config::max_buf_size`.
const SPARE_RX_WINDOWS: usize = 32;
/// Kept buffers that no session took or gave back for this long are freed: a burst of
/// sessions long past gives its memory back.
const SPARE_RX_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

impl Link {
    /// A link over `region`, not attached; `now` starts the heartbeat clocks (the link
    /// reads no clock: time comes in with the calls that need it).
    pub fn new(
        role: Role,
        region: SharedRegion,
        geom: Geometry,
        cfg: Config,
        now: Instant,
    ) -> Link {
        let own = role.own_block();
        let peer = role.peer_block();
        let tx = Producer::new(
            region.clone(),
            geom.tx_offset(role),
            geom.capacity,
            own,
            peer,
        );
        let rx = Consumer::new(
            region.clone(),
            geom.rx_offset(role),
            geom.capacity,
            own,
            peer,
        );
        Link {
            role,
            region,
            max_payload: geom.max_payload(),
            geom,
            cfg,
            own,
            peer,
            epoch: first_epoch(),
            own_id: None,
            attached: false,
            followed_restart: false,
            peer_acked: 0,
            epoch_in_hand: None,
            up: false,
            laid_out: role == Role::Host,
            gen: 1,
            peer_id: None,
            peer_seen_present: false,
            heartbeat: 0,
            last_beat: now,
            peer_beat: 0,
            peer_beat_at: now,
            tx,
            rx,
            sessions: HashMap::with_hasher(SessionIds::new()),
            ended: HashMap::new(),
            listeners: HashMap::new(),
            next_seq: 1,
            highest_peer_seq: 0,
            pending: VecDeque::new(),
            stats: Stats::default(),
            closed: false,
            parked: None,
            space_notify: Vec::new(),
            up_notify: HashMap::new(),
            next_up_token: 0,
            held_turn: 0,
            set_cache: None,
            spare_rx: Vec::new(),
            spare_rx_bytes: 0,
            spare_rx_used: false,
            spare_rx_quiet_since: now,
        }
    }

    /// A new session of the link, with a spare receive buffer if one is kept.
    fn new_session(&mut self, message: bool, state: State) -> Sess {
        let mut s = Sess::new(message, self.cfg.buf_size, state);
        if let Some(rx) = self.spare_rx.pop() {
            self.spare_rx_bytes -= rx.capacity();
            self.spare_rx_used = true;
            s.rx = rx;
        }
        s
    }

    /// Keeps an ended session's receive buffer for a new one, up to
    /// [`SPARE_RX_BUFFERS`] buffers holding at most [`SPARE_RX_WINDOWS`] of the largest
    /// window in all: what many sessions held at once stays for the next many, and a
    /// burst long past holds no more than that.
    fn keep_rx(&mut self, mut s: Sess) {
        let cap = s.rx.capacity();
        let budget = SPARE_RX_WINDOWS * self.cfg.max_buf_size.max(self.cfg.buf_size) as usize;
        if cap == 0 || self.spare_rx.len() >= SPARE_RX_BUFFERS || self.spare_rx_bytes + cap > budget
        {
            return;
        }
        s.rx.clear();
        self.spare_rx_bytes += cap;
        self.spare_rx_used = true;
        self.spare_rx.push(std::mem::take(&mut s.rx));
    }

    /// At each heartbeat: frees the kept buffers once none was kept or taken for
    /// [`SPARE_RX_IDLE`].
    fn age_spare_rx(&mut self, now: Instant) {
        if std::mem::take(&mut self.spare_rx_used) {
            self.spare_rx_quiet_since = now;
        } else if !self.spare_rx.is_empty()
            && now.duration_since(self.spare_rx_quiet_since) >= SPARE_RX_IDLE
        {
            self.spare_rx = Vec::new();
            self.spare_rx_bytes = 0;
        }
    }

    fn load_peer(&self, word: usize, order: Ordering) -> u64 {
        self.region.load_u64(self.peer + word, order)
    }

    fn store_own(&self, word: usize, v: u64, order: Ordering) {
        self.region.store_u64(self.own + word, v, order)
    }

    /// Attaches (or re-attaches after a local reset): zeroes our indices, withdraws our
    /// acknowledgement, then publishes a new epoch (PROTOCOL.md §3).
    pub fn attach(&mut self, own_id: Option<u16>, out: &mut Actions) {
        self.own_id = own_id;
        self.attached = true;
        self.tx.reset();
        self.rx.reset();
        self.up = false;
        self.peer_acked = 0;
        self.epoch = next_epoch(self.epoch);
        self.restore_own_words();
        out.ring_peer = true;
    }

    /// Writes every word this side owns from its local copy (PROTOCOL.md §3): the header
    /// (host), then the side block, the epoch last. A peer may have written anything
    /// there, and a side never reads its own words back, so this is how it repairs them:
    /// at every attach, whenever the peer's epoch moves, and once per heartbeat period.
    /// Every value is one the peer has already seen or is about to see, so rewriting an
    /// intact word changes nothing for it.
    fn restore_own_words(&self) {
        if !self.attached || self.closed {
            return;
        }
        if self.role == Role::Host {
            self.geom.write_header(&self.region);
        }
        self.tx.restore_words();
        self.rx.restore_words();
        self.store_own(
            side::PEER_ID,
            self.own_id.map_or(0, |id| PEER_ID_VALID | id as u64),
            Ordering::Relaxed,
        );
        self.store_own(side::POLLS, u64::from(self.polls()), Ordering::Relaxed);
        self.store_own(side::ARMINGS, 1, Ordering::Relaxed);
        self.store_own(side::HEARTBEAT, self.heartbeat, Ordering::Relaxed);
        // SYNC POINT ack (as in check_peer): our indices, stored above, are what we
        // acknowledged with.
        self.store_own(side::ACK, self.peer_acked, Ordering::Release);
        // SYNC POINT epoch: Release pairs with the Acquire load of the peer's EPOCH in
        // check_peer: our zeroed indices, ack, `POLLS` and `ARMINGS` are visible before the
        // epoch.
        self.store_own(side::EPOCH, self.epoch, Ordering::Release);
    }

    /// Leaves the link for good: the peer resets its sessions at once.
    pub fn detach(&mut self, out: &mut Actions) {
        self.reset_all("endpoint closed", out);
        self.store_own(side::ACK, 0, Ordering::Relaxed);
        self.store_own(side::PEER_ID, 0, Ordering::Relaxed);
        self.epoch = next_epoch(self.epoch);
        // SYNC POINT epoch (as in restore_own_words).
        self.store_own(side::EPOCH, self.epoch, Ordering::Release);
        out.ring_peer = true;
        self.closed = true;
        self.attached = false;
        self.notify_up_watchers();
    }

    /// Runs the callbacks of callers waiting for the link to come up (or to close).
    fn notify_up_watchers(&self) {
        for n in self.up_notify.values() {
            n();
        }
    }

    /// Ends every session with ConnectionReset and forgets every buffered byte.
    fn reset_all(&mut self, why: &str, out: &mut Actions) {
        if !self.sessions.is_empty() || self.up {
            self.stats.link_resets += 1;
        }
        self.stats.last_error = Some(why.to_string());
        for s in self.sessions.values_mut() {
            if let Some(n) = &s.notify {
                s.awaited = false;
                n();
            }
        }
        for l in self.listeners.values() {
            if let Some(n) = &l.notify {
                n();
            }
        }
        // A session the peer finished before the reset keeps what it sent (as a socket
        // keeps the data before a FIN); the others are reset. Not yet accepted ones go.
        let queued: HashSet<u64> = self
            .listeners
            .values()
            .flat_map(|l| l.backlog.iter().copied())
            .collect();
        let gen = self.gen;
        let all: Vec<(u64, Sess)> = self.sessions.drain().collect();
        for (id, s) in all {
            if s.state == State::Open && s.rx_eof && !queued.contains(&id) {
                self.ended.insert((gen, id), s);
            } else {
                self.keep_rx(s);
            }
        }
        for l in self.listeners.values_mut() {
            l.backlog.clear();
        }
        self.pending.clear();
        self.parked = None;
        out.wake = Stripes::ALL;
        out.reset = true;
        self.gen += 1;
        self.up = false;
    }

    /// A local reset: every session ends, and a new epoch makes the peer start over too.
    pub fn local_reset(&mut self, why: &str, out: &mut Actions) {
        self.reset_all(why, out);
        let acked = self.peer_acked;
        self.attach(self.own_id, out);
        // Keep acknowledging the peer's current epoch: a live peer only has to see our
        // new epoch and answer it; a dead one never will.
        self.peer_acked = acked;
        // SYNC POINT ack: Release pairs with the peer's Acquire load of our ACK in
        // check_peer; our indices were zeroed in attach before this store.
        self.store_own(side::ACK, acked, Ordering::Release);
    }

    /// Follows the peer's epoch and acknowledgement; brings the link up or down.
    /// Returns whether anything changed.
    pub fn check_peer(&mut self, now: Instant, out: &mut Actions) -> bool {
        let mut changed = std::mem::take(&mut self.followed_restart);
        if !self.laid_out {
            match Geometry::read_header(&self.region) {
                Ok(Some(g)) if g == self.geom => self.laid_out = true,
                Ok(_) => return changed,
                Err(e) => {
                    let msg = e.to_string();
                    if self.stats.last_error.as_deref() != Some(&msg) {
                        self.stats.last_error = Some(msg);
                    }
                    return changed;
                }
            }
        }
        // SYNC POINT epoch: Acquire pairs with the peer's Release store in
        // restore_own_words.
        let peer_epoch = self.load_peer(side::EPOCH, Ordering::Acquire);
        if peer_epoch != self.peer_acked {
            if self.role == Role::Guest {
                // The host may have re-laid the region out; check the header again.
                match Geometry::read_header(&self.region) {
                    Ok(Some(g)) if g == self.geom => {}
                    other => {
                        self.laid_out = false;
                        if let Err(e) = other {
                            self.stats.last_error = Some(e.to_string());
                        }
                        if self.up {
                            self.reset_all("host re-laid the region out", out);
                        }
                        return true;
                    }
                }
            }
            let acked = self.peer_acked;
            if self.up || !self.sessions.is_empty() {
                // First take what the old incarnation published before it moved its epoch:
                // a peer that closed its sessions and left published those frames first.
                // A bad index here is the restarted peer's zeroed head: index_fault
                // follows the epoch read above (not a second read), and that stands.
                self.epoch_in_hand = Some(peer_epoch);
                let _ = self.pump(now, out);
                self.epoch_in_hand = None;
            }
            if self.peer_acked == acked {
                self.follow_epoch(peer_epoch, out);
            }
            changed = true;
        }
        if !self.up && peer_epoch != 0 && peer_epoch == self.peer_acked {
            // SYNC POINT ack (the Acquire side).
            let peer_ack = self.load_peer(side::ACK, Ordering::Acquire);
            if peer_ack == self.epoch {
                self.up = true;
                self.read_peer_id();
                // Written before the peer's EPOCH (Release), read after our Acquire of it.
                let polls = self.load_peer(side::POLLS, Ordering::Relaxed) == 1;
                self.tx.peer_polls = polls;
                self.rx.peer_polls = polls;
                self.tx.peer_numbers_armings =
                    self.load_peer(side::ARMINGS, Ordering::Relaxed) == 1;
                self.peer_seen_present = false;
                self.peer_beat = self.load_peer(side::HEARTBEAT, Ordering::Relaxed);
                self.peer_beat_at = now;
                changed = true;
                self.notify_up_watchers();
            }
        }
        changed
    }

    /// The peer published `peer_epoch` (it attached or restarted): ends every session of
    /// the old epoch, brings both ring halves to empty and acknowledges it (PROTOCOL.md
    /// §3). Acts on the one value read by the caller: a peer that moves its epoch again
    /// is followed again, never half-followed.
    fn follow_epoch(&mut self, peer_epoch: u64, out: &mut Actions) {
        if self.up || !self.sessions.is_empty() {
            self.reset_all("peer restarted", out);
        }
        self.up = false;
        self.tx.reset();
        self.rx.reset();
        // Session ids are unique within an epoch only: a new incarnation counts from 1.
        self.highest_peer_seq = 0;
        self.peer_acked = peer_epoch;
        // Our words as we mean them, the acknowledgement among them: a peer that found
        // them overwritten (and acknowledged a stranger's epoch) sees ours move and
        // acknowledges again. SYNC POINT ack: the Release store of ACK in it pairs with
        // the peer's Acquire load of our ACK: our indices are zero before it sees it.
        self.restore_own_words();
        self.read_peer_id();
        out.ring_peer = true;
    }

    fn read_peer_id(&mut self) {
        self.peer_id = peer_id_in(self.load_peer(side::PEER_ID, Ordering::Relaxed));
    }

    /// Bumps our heartbeat when due. Spinning waiters call it too: with many of them the
    /// keeper can go without the CPU or the lock for longer than the peer's timeout.
    /// The heartbeat goes out with every other word we own: once per period each is
    /// rewritten from its local copy, so that whatever a peer left there is repaired
    /// within a period, whether or not anyone attaches.
    pub fn beat_own(&mut self, now: Instant) {
        if now.duration_since(self.last_beat) >= self.cfg.heartbeat {
            self.heartbeat = self.heartbeat.wrapping_add(1);
            self.last_beat = now;
            self.restore_own_words();
            self.age_spare_rx(now);
        }
    }

    /// Bumps our heartbeat when due and checks the peer's; `Err` once the peer is gone.
    pub fn beat(&mut self, now: Instant, peer_present: Option<bool>) -> Result<(), Fault> {
        self.beat_own(now);
        if !self.up {
            return Ok(());
        }
        // The server's news of a join can arrive after the peer is already up in shared
        // memory: only a peer once seen present and then gone counts as gone.
        match peer_present {
            Some(true) => self.peer_seen_present = true,
            Some(false) if self.peer_seen_present => {
                return Err(Fault::PeerGone(Gone::LeftServer));
            }
            _ => {}
        }
        let b = self.load_peer(side::HEARTBEAT, Ordering::Relaxed);
        if b != self.peer_beat {
            self.peer_beat = b;
            self.peer_beat_at = now;
        } else if now.duration_since(self.peer_beat_at) > self.cfg.peer_timeout {
            return Err(Fault::PeerGone(Gone::HeartbeatStopped(
                self.cfg.peer_timeout,
            )));
        }
        Ok(())
    }

    /// A bad index is a restart if the peer's epoch moved, corruption otherwise.
    /// The epoch is read once, and the link acts on that one read: following it here,
    /// rather than leaving it to `check_peer`'s own read, means a peer that moves its
    /// epoch away and back cannot have a bad index taken for a restart and then the link
    /// brought back up on the old indices.
    pub(crate) fn index_fault(&mut self, bad: BadIndex, out: &mut Actions) -> Fault {
        // SYNC POINT epoch: Acquire pairs with the peer's Release store in
        // restore_own_words (or the one read by check_peer, whose decision this is).
        let peer_epoch = match self.epoch_in_hand {
            Some(e) => e,
            None => self.load_peer(side::EPOCH, Ordering::Acquire),
        };
        if peer_epoch != self.peer_acked {
            // The restarted peer's zeroed index: not the peer's fault.
            self.follow_epoch(peer_epoch, out);
            self.followed_restart = true;
            return Fault::PeerRestarted { epoch: peer_epoch };
        }
        self.corrupt(Corruption::Index(bad))
    }

    /// Counts a corruption; the fault that calls for the local reset.
    pub(crate) fn corrupt(&mut self, what: Corruption) -> Fault {
        self.stats.corruptions += 1;
        Fault::Corrupt(what)
    }

    /// Whom to ring when [`Actions::ring_peer`] says so: the peer's ivshmem id, as last
    /// read (or read now, before the link is up).
    pub fn doorbell_target(&self) -> Option<u16> {
        self.peer_id
            .or_else(|| peer_id_in(self.load_peer(side::PEER_ID, Ordering::Relaxed)))
    }

    /// Whether this side polls (`WaitMode::Poll`), as it tells the peer in `side::POLLS`.
    pub(crate) fn polls(&self) -> bool {
        self.cfg.wait == WaitMode::Poll
    }

    // ---- session operations (the caller has checked the generation) ----

    pub fn open(&mut self, port: u32, message: bool, out: &mut Actions) -> Result<u64, io::Error> {
        if self.sessions.len() >= self.cfg.max_sessions {
            return Err(io::Error::other(format!(
                "ivring: {} sessions already open on this link (Config::max_sessions)",
                self.cfg.max_sessions
            )));
        }
        let id = self.next_seq << 1 | self.role.id_bit();
        self.next_seq += 1;
        let s = self.new_session(message, State::Connecting);
        self.sessions.insert(id, s);
        let args = OpenArgs {
            port,
            message,
            buf_alloc: self.cfg.buf_size,
        };
        self.send_ctrl(Kind::Open, id, Some(args.encode()), out)
            .map_err(|f| self.fault_to_io(f, out))?;
        Ok(id)
    }

    /// Acts on a fault a session operation found, and gives the error its caller
    /// returns: a fault that calls for a local reset gets it here, at once, so that the
    /// link's other sessions end too rather than run on over a ring the peer broke.
    pub fn fault_to_io(&mut self, f: Fault, out: &mut Actions) -> io::Error {
        if f.needs_local_reset() {
            self.local_reset(&f.to_string(), out);
        }
        io::Error::new(io::ErrorKind::ConnectionReset, format!("ivring: {f}"))
    }

    /// The state check shared by every session operation.
    pub fn session(&mut self, id: u64) -> io::Result<&mut Sess> {
        session_in(&mut self.sessions, id)
    }
}

/// The ivshmem peer id a `PEER_ID` word holds: `PEER_ID_VALID | id` exactly (a word with
/// any other bit set is a peer's scribble, not an id to ring).
fn peer_id_in(word: u64) -> Option<u16> {
    (word >> 16 == PEER_ID_VALID >> 16).then_some(word as u16)
}

/// [`Link::session`] on the map alone, so that the ring can be borrowed beside it.
pub(super) fn session_in(
    sessions: &mut HashMap<u64, Sess, SessionIds>,
    id: u64,
) -> io::Result<&mut Sess> {
    let s = sessions
        .get_mut(&id)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "ivring: session is closed"))?;
    match &s.state {
        State::Reset(why) => Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("ivring: {why}"),
        )),
        _ => Ok(s),
    }
}

#[cfg(feature = "fuzzing")]
impl Link {
    /// Panics if the peer has made us hold more than the limits allow (fuzzing only).
    pub fn check_bounds(&self) {
        assert!(
            self.sessions.len() <= self.cfg.max_sessions,
            "too many sessions"
        );
        assert!(
            self.pending.len() <= MAX_PENDING_CONTROL,
            "too many control frames"
        );
        for l in self.listeners.values() {
            assert!(
                l.backlog.len() <= self.cfg.backlog,
                "backlog over its limit"
            );
        }
        for s in self.sessions.values() {
            let cap = s.buf_alloc as usize;
            assert!(s.rx.len() <= 2 * cap + 8192, "receive buffer over credit");
            assert!(s.msgs.len() <= cap + 1, "message queue over credit");
            assert!(
                s.received - s.fwd_cnt <= cap as u64,
                "held bytes over credit"
            );
        }
    }
}

/// The epoch after `epoch` (never 0, which means "never attached").
fn next_epoch(epoch: u64) -> u64 {
    epoch.wrapping_add(1).max(1)
}

/// Where a link's epochs start: a random value, so that a new incarnation's first epoch
/// differs from whatever the peer acknowledged of an earlier one without reading our old
/// `EPOCH` word back from the region (a peer may have written anything there). 48 bits
/// keep it readable in tools and leave 2^48 restarts before it could wrap.
fn first_epoch() -> u64 {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(0xe90c_u64);
    (r & ((1 << 48) - 1)).max(1)
}

/// Hashes session ids for the session table, which every read and write looks up: a
/// multiply and a shift instead of SipHash (which took 5-10 % of a 64-byte write). The
/// peer picks half the ids, so the hash is keyed with a random per-link value it cannot
/// see, and the table holds at most `Config::max_sessions` entries.
#[derive(Clone)]
pub struct SessionIds {
    key: u64,
}

impl SessionIds {
    fn new() -> SessionIds {
        use std::hash::BuildHasher;
        SessionIds {
            key: std::collections::hash_map::RandomState::new().hash_one(0x5e55_1011u64) | 1,
        }
    }
}

impl std::hash::BuildHasher for SessionIds {
    type Hasher = SessionIdHasher;
    fn build_hasher(&self) -> SessionIdHasher {
        SessionIdHasher {
            key: self.key,
            h: 0,
        }
    }
}

/// See [`SessionIds`].
pub struct SessionIdHasher {
    key: u64,
    h: u64,
}

impl std::hash::Hasher for SessionIdHasher {
    fn finish(&self) -> u64 {
        self.h
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used for u64 keys; kept correct for any other.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        let p = ((x ^ self.h) ^ self.key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // Fold the high half in: hashbrown takes the bucket from the low bits and its
        // tag from the top seven.
        self.h = p ^ (p >> 29) ^ self.key.rotate_left(17);
        self.h = self.h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }
}

/// Wait stripes: callers of the sessions sharing a stripe sleep on one condvar and are
/// woken together. 256 of them: up to 256 sessions of one side each get their own.
pub(crate) const STRIPES: usize = 256;

/// The wait stripe of session `id`. The low bit of an id only says which side opened it,
/// so it is left out: one side's sessions spread over all the stripes, not half.
pub(crate) fn stripe_of(id: u64) -> usize {
    ((id >> 1) % STRIPES as u64) as usize
}

/// A set of wait stripes.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub(crate) struct Stripes([u64; STRIPES / 64]);

impl Stripes {
    pub(crate) const ALL: Stripes = Stripes([!0; STRIPES / 64]);

    pub(crate) fn add(&mut self, stripe: usize) {
        self.0[stripe / 64 % (STRIPES / 64)] |= 1 << (stripe % 64);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The stripes in the set, in order.
    pub(crate) fn iter(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(i, mut w)| {
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros() as usize;
                    w &= w - 1;
                    i * 64 + b
                })
            })
        })
    }
}

/// What the runtime and the API see of a link: its state, read-only, and the small
/// operations they ask of it.
impl Link {
    /// The generation: bumped at every reset of all sessions.
    pub(crate) fn gen(&self) -> u64 {
        self.gen
    }

    /// Both sides attached and acknowledged each other: traffic may flow.
    pub(crate) fn is_up(&self) -> bool {
        self.up
    }

    /// The endpoint was dropped.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// A Data frame waits in the ring for an in-place reader.
    pub(crate) fn has_parked(&self) -> bool {
        self.parked.is_some()
    }

    /// The peer's ivshmem id, once it has published one.
    pub(crate) fn peer_id(&self) -> Option<u16> {
        self.peer_id
    }

    /// Largest payload of one frame.
    pub(crate) fn max_payload(&self) -> usize {
        self.max_payload
    }

    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The open sessions' ids (for the fuzzing harness).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn session_ids(&self) -> Vec<u64> {
        self.sessions.keys().copied().collect()
    }

    /// The shared region (in-place views read from it; slots write to it).
    pub(crate) fn region(&self) -> &SharedRegion {
        &self.region
    }

    /// Some listener has a session waiting to be accepted.
    pub(crate) fn backlog_waiting(&self) -> bool {
        self.listeners.values().any(|l| !l.backlog.is_empty())
    }

    /// Starts listening on `port`; false if something listens there already.
    pub(crate) fn listen(&mut self, port: u32) -> bool {
        if self.listeners.contains_key(&port) {
            return false;
        }
        self.listeners.insert(port, Listen::default());
        true
    }

    /// Stops listening on `port`, closing the sessions not yet accepted.
    pub(crate) fn unlisten(&mut self, port: u32, out: &mut Actions) {
        if let Some(l) = self.listeners.remove(&port) {
            for id in l.backlog {
                self.close(id, out);
            }
        }
    }

    /// The callback of the listener on `port`.
    pub(crate) fn set_listener_notify(&mut self, port: u32, notify: Notifier) {
        if let Some(l) = self.listeners.get_mut(&port) {
            l.notify = Some(notify);
        }
    }

    /// The next session waiting on `port`: (id, whether it keeps message boundaries).
    pub(crate) fn accept(&mut self, port: u32) -> Option<(u64, bool)> {
        let id = self.listeners.get_mut(&port)?.backlog.pop_front()?;
        let s = self.sessions.get(&id)?;
        Some((id, s.message))
    }

    /// Calls `notify` when the link comes up (and when the endpoint closes); the token
    /// withdraws it.
    pub(crate) fn on_up(&mut self, notify: Notifier) -> u64 {
        let token = self.next_up_token;
        self.next_up_token += 1;
        self.up_notify.insert(token, notify);
        token
    }

    pub(crate) fn cancel_on_up(&mut self, token: u64) {
        self.up_notify.remove(&token);
    }

    /// Forgets a session the peer had finished when the link reset, once its reader is
    /// gone.
    pub(crate) fn forget_ended(&mut self, gen: u64, id: u64) {
        if let Some(s) = self.ended.remove(&(gen, id)) {
            self.keep_rx(s);
        }
    }
}

/// The error of a session that the link's reset ended.
pub(crate) fn reset_error(l: &Link) -> io::Error {
    let why = l
        .stats
        .last_error
        .clone()
        .unwrap_or_else(|| "link reset".into());
    io::Error::new(io::ErrorKind::ConnectionReset, format!("ivring: {why}"))
}

/// The handshake and the liveness rules of `check_peer`, `follow_epoch`, `reset_all` and
/// `index_fault`, one step at a time: a link driven by hand against the crate's mock peer
/// over one heap region, no threads and no clock, so that every step is checked exactly
/// (what `check_peer` returns, what the link acknowledged, what it counted).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::doorbell::Polling;
    use crate::shm::layout::{header, LayoutError, CONTROL_SIZE, VERSION};
    use crate::wire::frame::CreditArgs;
    use crate::wire::mock::{write_header, MockPeer};
    use std::sync::Arc;

    const REGION: usize = 64 << 10;

    /// A link of `role`, attached, and the peer that plays the other side (a host peer
    /// lays the region out only if `lay_out`).
    fn victim_with(role: Role, lay_out: bool) -> (Link, MockPeer) {
        victim_in(role, lay_out, REGION)
    }

    pub(super) fn victim_in(role: Role, lay_out: bool, size: usize) -> (Link, MockPeer) {
        victim_cfg(role, lay_out, size, Config::default())
    }

    /// As [`victim_in`], with `cfg` for the link.
    pub(super) fn victim_cfg(
        role: Role,
        lay_out: bool,
        size: usize,
        cfg: Config,
    ) -> (Link, MockPeer) {
        let region = SharedRegion::heap(size);
        let geom = Geometry::for_size(size).unwrap();
        let peer = MockPeer::laying_out(
            region.clone(),
            role.other(),
            Arc::new(Polling::new()),
            lay_out,
        );
        let mut link = Link::new(role, region, geom, cfg, Instant::now());
        link.attach(Some(0), &mut Actions::default());
        (link, peer)
    }

    fn victim(role: Role) -> (Link, MockPeer) {
        victim_with(role, true)
    }

    fn check(l: &mut Link) -> bool {
        l.check_peer(Instant::now(), &mut Actions::default())
    }

    /// One of the link's own words, as the peer reads it.
    pub(super) fn own(l: &Link, word: usize) -> u64 {
        l.region.load_u64(l.own + word, Ordering::Acquire)
    }

    /// Writes Data frames of 1 KiB, then of 16 bytes (a control frame's size), until
    /// the ring is full (the peer reads nothing), then publishes them: how many.
    pub(super) fn fill(l: &mut Link, id: u64) -> usize {
        let mut out = Actions::default();
        let mut frames = 0;
        for size in [1024, 16] {
            while l
                .write_frame(id, &vec![1; size], false, true, false, &mut out)
                .unwrap()
                .is_some()
            {
                frames += 1;
            }
        }
        l.publish(&mut out);
        assert!(frames > 0);
        frames
    }

    /// The peer (re)starts and the link comes up with it.
    pub(super) fn up(l: &mut Link, peer: &mut MockPeer) {
        peer.restart();
        assert!(check(l), "the peer's new epoch is a change");
        assert!(peer.follow(), "the link acknowledged the peer's epoch");
        assert!(check(l), "the peer's acknowledgement is a change");
        assert!(l.up);
        assert!(!check(l), "nothing changed");
    }

    /// A `PEER_ID` word names a peer to ring only as `PEER_ID_VALID | id`: a word with
    /// the flag missing or any other bit set names none; before the link has read the
    /// word, the doorbell target is read from it.
    #[test]
    fn a_peer_id_word_is_the_valid_flag_and_16_bits_and_nothing_else() {
        let (l, peer) = victim(Role::Host);
        for (word, id) in [
            (PEER_ID_VALID | 5, Some(5)),
            (PEER_ID_VALID | 0xffff, Some(0xffff)),
            (PEER_ID_VALID, Some(0)),
            (5, None),
            (0, None),
            (PEER_ID_VALID | 1 << 16 | 5, None),
            (PEER_ID_VALID << 1 | PEER_ID_VALID | 5, None),
            (u64::MAX, None),
        ] {
            assert_eq!(peer_id_in(word), id, "{word:#x}");
            peer.store(side::PEER_ID, word);
            assert_eq!(l.doorbell_target(), id, "{word:#x}");
        }
        // Once the link is up, the id read then is the one rung, whatever the word says.
        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        let id = l.doorbell_target();
        assert!(id.is_some());
        peer.store(side::PEER_ID, PEER_ID_VALID | 77);
        assert_eq!(l.doorbell_target(), id);
    }

    /// A set of wait stripes holds exactly the stripes added, in order.
    #[test]
    fn a_stripe_set_holds_the_stripes_added() {
        assert!(Stripes::default().is_empty());
        assert_eq!(Stripes::ALL.iter().count(), STRIPES);
        for stripes in [
            vec![0],
            vec![63],
            vec![64],
            vec![255],
            vec![1, 64, 130, 255],
        ] {
            let mut set = Stripes::default();
            for &s in stripes.iter().rev() {
                set.add(s);
                set.add(s);
            }
            assert!(!set.is_empty());
            assert_eq!(set.iter().collect::<Vec<_>>(), stripes);
        }
        assert_eq!(
            stripe_of(2 * 300 + 1),
            300 - STRIPES,
            "the side bit left out"
        );
    }

    /// The heartbeat: ours goes out each period; the peer is gone when its heartbeat
    /// stands still past the timeout, or when the server says it left after saying it
    /// was there (not before: the news of a join may come late).
    #[test]
    fn a_peer_is_gone_when_its_heartbeat_stops_or_it_leaves_the_server() {
        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        let t0 = Instant::now();
        let timeout = l.cfg.peer_timeout;
        let ours = own(&l, side::HEARTBEAT);
        assert_eq!(l.beat(t0 + l.cfg.heartbeat, None), Ok(()));
        assert!(own(&l, side::HEARTBEAT) > ours, "ours went out");

        peer.store(side::HEARTBEAT, 1000);
        assert_eq!(l.beat(t0, None), Ok(()), "it moved");
        assert_eq!(
            l.beat(t0 + timeout, None),
            Ok(()),
            "still within the timeout"
        );
        peer.store(side::HEARTBEAT, 1001);
        let ms = std::time::Duration::from_millis(1);
        let later = t0 + timeout + ms;
        assert_eq!(l.beat(later, None), Ok(()), "it moved again");
        assert_eq!(
            l.beat(later + timeout + ms, None),
            Err(Fault::PeerGone(Gone::HeartbeatStopped(timeout)))
        );

        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        assert_eq!(
            l.beat(t0, Some(false)),
            Ok(()),
            "never seen: the join is late"
        );
        assert_eq!(l.beat(t0, Some(true)), Ok(()));
        assert_eq!(
            l.beat(t0, Some(false)),
            Err(Fault::PeerGone(Gone::LeftServer))
        );
    }

    /// A stream reader's buffer gives back what was read: all of it once it is all read,
    /// the front once more than half of it and more than 4 KiB is read (so a reader
    /// that reads in small pieces does not keep a buffer growing for ever), and nothing
    /// before that (moving the rest costs a copy).
    #[test]
    fn a_receive_buffer_gives_back_what_was_read() {
        // (bytes buffered, bytes read, what is left at the buffer's front)
        for (held, read, compacted) in [
            (10_000, 10_000, true),
            (10_000, 6_000, true),
            (10_000, 5_000, false),
            (6_000, 4_096, false),
        ] {
            let mut s = Sess::new(false, 1 << 20, State::Open);
            s.rx = (0..held).map(|i| i as u8).collect();
            let mut buf = vec![0; read];
            assert_eq!(s.take(&mut buf), (read, read));
            assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
            let (len, pos) = if compacted {
                (held - read, 0)
            } else {
                (held, read)
            };
            assert_eq!(
                (s.rx.len(), s.rx_pos),
                (len, pos),
                "{held} held, {read} read"
            );
            assert_eq!(s.buffered(), held - read);
            assert_eq!(
                s.rx[s.rx_pos..].first().copied(),
                (held > read).then_some(read as u8)
            );
        }
    }

    /// Each side acknowledges the other's epoch, and the link comes up only once the peer
    /// has acknowledged ours; `check_peer` says exactly when something changed.
    #[test]
    fn the_link_comes_up_once_both_epochs_are_acknowledged() {
        for role in [Role::Host, Role::Guest] {
            let (mut l, mut peer) = victim(role);
            assert!(!check(&mut l), "{role:?}: no peer yet");
            assert_eq!(own(&l, side::ACK), 0);
            peer.restart();
            assert!(check(&mut l), "{role:?}: the peer's epoch is a change");
            assert!(!l.up);
            assert_eq!(own(&l, side::ACK), peer.epoch, "{role:?}");
            assert!(
                !check(&mut l),
                "{role:?}: the peer has not acknowledged ours"
            );
            assert!(!l.up);
            // A stranger's epoch acknowledged is no acknowledgement.
            peer.store(side::ACK, l.epoch.wrapping_add(1));
            assert!(!check(&mut l), "{role:?}: a wrong acknowledgement");
            assert!(!l.up);
            assert!(peer.follow());
            assert!(check(&mut l), "{role:?}: the link came up");
            assert!(l.up);
            assert!(!check(&mut l), "{role:?}: nothing changed since");
            assert!(!check(&mut l), "{role:?}: nothing changed since");
            assert!(l.up);
            // Coming up the first time resets nothing.
            assert_eq!(l.stats.link_resets, 0, "{role:?}");
            assert_eq!(l.stats.last_error, None, "{role:?}");
            assert_eq!(l.gen, 1, "{role:?}");
        }
    }

    /// The peer's promises, `POLLS` and `ARMINGS`, are read when the link comes up:
    /// exactly 1 means the peer polls, and numbers its armings (one ring per number). Our
    /// own `ARMINGS` says 1.
    #[test]
    fn the_peers_promise_words_are_read_when_the_link_comes_up() {
        for word in [0, 1, 2, 7] {
            let (mut l, mut peer) = victim(Role::Host);
            peer.store(side::POLLS, word);
            peer.store(side::ARMINGS, word);
            up(&mut l, &mut peer);
            let promised = word == 1;
            assert_eq!(l.tx.peer_polls, promised, "POLLS = {word}");
            assert_eq!(l.rx.peer_polls, promised, "POLLS = {word}");
            assert_eq!(l.tx.peer_numbers_armings, promised, "ARMINGS = {word}");
            assert_eq!(own(&l, side::ARMINGS), 1);
        }
    }

    /// The header is the host's own word: a guest that scribbles on it does not stop the
    /// host from following the guest's epochs (the host repairs it at its next heartbeat).
    #[test]
    fn the_host_does_not_read_its_header_back() {
        let (mut l, mut peer) = victim(Role::Host);
        l.region.store_u64(header::MAGIC, 0xbad, Ordering::Relaxed);
        peer.restart();
        assert!(check(&mut l));
        assert_eq!(own(&l, side::ACK), peer.epoch);
        assert!(peer.follow());
        assert!(check(&mut l));
        assert!(l.up);
        assert_eq!(l.stats.last_error, None);
    }

    /// A guest follows no epoch until the host has laid the region out; a bad header is
    /// the link's last error.
    #[test]
    fn a_guest_waits_for_a_valid_header() {
        let (mut l, mut peer) = victim_with(Role::Guest, false);
        assert!(!check(&mut l));
        peer.restart();
        assert!(!check(&mut l), "an epoch without a header");
        assert!(!l.laid_out);
        assert_eq!(own(&l, side::ACK), 0);
        l.region.store_u64(header::MAGIC, 0xbad, Ordering::Relaxed);
        assert!(!check(&mut l), "an epoch beside a bad header");
        assert_eq!(own(&l, side::ACK), 0);
        assert_eq!(
            l.stats.last_error,
            Some(LayoutError::BadMagic(0xbad).to_string())
        );
        write_header(&l.region, &l.geom);
        assert!(check(&mut l), "the header is there: the epoch is followed");
        assert!(l.laid_out);
        assert_eq!(own(&l, side::ACK), peer.epoch);
        assert!(peer.follow());
        assert!(check(&mut l));
        assert!(l.up);
    }

    /// A host that restarts with a header this guest cannot use: the guest resets the
    /// link and follows no epoch until the header is right again.
    #[test]
    fn a_guest_follows_no_epoch_over_a_bad_header() {
        let (mut l, mut peer) = victim(Role::Guest);
        up(&mut l, &mut peer);
        let old = peer.epoch;
        let bad = VERSION + 1;
        l.region.store_u64(
            header::VERSION,
            bad as u64 | (CONTROL_SIZE as u64) << 32,
            Ordering::Relaxed,
        );
        peer.restart();
        assert!(check(&mut l), "the link went down");
        assert!(!l.up);
        assert!(!l.laid_out);
        assert_eq!(l.stats.link_resets, 1);
        assert_eq!(
            l.stats.last_error.as_deref(),
            Some("host re-laid the region out")
        );
        assert_eq!(own(&l, side::ACK), old, "the new epoch is not acknowledged");
        assert!(!check(&mut l), "nothing changed");
        assert_eq!(own(&l, side::ACK), old);
        assert_eq!(
            l.stats.last_error,
            Some(LayoutError::BadVersion(bad).to_string())
        );
        write_header(&l.region, &l.geom);
        assert!(check(&mut l));
        assert_eq!(own(&l, side::ACK), peer.epoch);
        assert!(peer.follow());
        assert!(check(&mut l));
        assert!(l.up);
        assert_eq!(l.stats.link_resets, 1);
    }

    /// A peer restart while the link is up resets it once, even with no session open.
    #[test]
    fn a_peer_restart_resets_an_up_link() {
        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        peer.restart();
        assert!(check(&mut l));
        assert!(!l.up);
        assert_eq!(own(&l, side::ACK), peer.epoch);
        assert_eq!(l.stats.link_resets, 1);
        assert_eq!(l.stats.last_error.as_deref(), Some("peer restarted"));
        assert_eq!(l.gen, 2);
        assert!(peer.follow());
        assert!(check(&mut l));
        assert!(l.up);
        assert_eq!(l.stats.link_resets, 1);
    }

    /// What the peer published before it moved its epoch (as a leaving peer does: its head
    /// stays) is read before the epoch is followed, sessions or not.
    #[test]
    fn frames_published_before_an_epoch_move_are_read() {
        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        assert!(peer.push(Kind::Data, 0, 1001 << 1 | 1, b"last words"));
        peer.publish();
        peer.epoch += 1;
        peer.store(side::ACK, 0);
        peer.store(side::EPOCH, peer.epoch);
        assert!(check(&mut l));
        assert!(!l.up);
        assert_eq!(
            l.stats.frames_dropped, 1,
            "the frame was read (and dropped)"
        );
        assert_eq!(own(&l, side::ACK), peer.epoch);
        assert_eq!(l.stats.link_resets, 1);
    }

    /// A local reset counts a link reset only if it ended something: an up link or
    /// sessions.
    #[test]
    fn a_local_reset_of_a_down_link_counts_no_link_reset() {
        let (mut l, mut peer) = victim(Role::Host);
        l.local_reset("first", &mut Actions::default());
        assert_eq!(l.stats.link_resets, 0);
        assert_eq!(l.stats.last_error.as_deref(), Some("first"));
        up(&mut l, &mut peer);
        l.local_reset("second", &mut Actions::default());
        assert_eq!(l.stats.link_resets, 1);
        assert_eq!(l.stats.last_error.as_deref(), Some("second"));
        assert!(!l.up);
    }

    /// A session the peer opens on port 7 (a message session if `message`), with a
    /// 1 MiB buffer of its own, accepted.
    pub(super) fn accepted(l: &mut Link, peer: &mut MockPeer, seq: u64, message: bool) -> u64 {
        const PORT: u32 = 7;
        let _ = l.listen(PORT);
        let id = seq << 1 | l.role.other().id_bit();
        let args = OpenArgs {
            port: PORT,
            message,
            buf_alloc: 1 << 20,
        };
        assert!(peer.push(Kind::Open, 0, id, &args.encode()));
        peer.publish();
        l.pump(Instant::now(), &mut Actions::default()).unwrap();
        assert_eq!(l.accept(PORT), Some((id, message)));
        id
    }

    /// What the peer sent on a session the link accepted, left unread in its buffer.
    pub(super) fn accepted_with_data(
        l: &mut Link,
        peer: &mut MockPeer,
        seq: u64,
        bytes: usize,
    ) -> u64 {
        let id = accepted(l, peer, seq, false);
        let mut out = Actions::default();
        let mut sent = 0;
        while sent < bytes {
            let n = (bytes - sent).min(1024);
            if peer.push(Kind::Data, 0, id, &vec![7u8; n]) {
                sent += n;
            } else {
                peer.publish();
                // Each pump takes 16 KiB of data at most.
                while l.pump(Instant::now(), &mut out).unwrap() {}
                peer.drain();
            }
        }
        peer.publish();
        while l.pump(Instant::now(), &mut out).unwrap() {}
        assert_eq!(l.sessions[&id].buffered(), bytes);
        id
    }

    /// A session reset whose Reset frame finds our ring broken by a peer that restarted:
    /// following the restart zeroes the ring under the pump, which must stop there with
    /// the restart, not consume the frame it held into the new epoch's ring (the index
    /// then ran behind and the next read underflowed: found by the fuzzer).
    #[test]
    fn a_session_reset_that_meets_a_restart_stops_the_pump() {
        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        let mut out = Actions::default();
        let id = accepted_with_data(&mut l, &mut peer, 1, 0);
        // Our ring full (the peer reads nothing), so the Reset must look at its tail.
        while l
            .write_frame(id, &[1], false, true, false, &mut out)
            .unwrap()
            .is_some()
        {}
        l.publish(&mut out);
        assert!(!l.has_pending());
        // A credit for bytes we never sent breaks the session's protocol; a frame behind it.
        let bad = CreditArgs {
            fwd_cnt: l.sessions[&id].tx_cnt + 1,
            buf_alloc: 1 << 20,
        };
        assert!(peer.push(Kind::Credit, 0, id, &bad.encode()));
        assert!(peer.push(Kind::Data, 0, id, b"after"));
        peer.publish();
        // The peer restarts meanwhile: its tail of our ring is zeroed, not where we are.
        peer.epoch += 1;
        peer.store(side::RX_TAIL, 3);
        peer.store(side::EPOCH, peer.epoch);
        let got = l.pump(Instant::now(), &mut out);
        assert_eq!(got, Err(Fault::PeerRestarted { epoch: peer.epoch }));
        assert!(!l.up);
        assert_eq!(l.rx_position(), 0, "the new epoch's ring, from its start");
        assert_eq!(l.stats.session_resets, 1);
        assert!(check(&mut l), "check_peer reports the followed restart");
    }

    /// A direct read that lent less than 16 KiB copies it itself, under the lock: no
    /// loan is left for a second pass through it, and the ring's space goes back at
    /// once. From 16 KiB the loan stays for the caller.
    #[test]
    fn a_direct_read_keeps_no_small_loan() {
        let (mut l, mut peer) = victim_in(Role::Host, true, 1 << 20);
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 0);
        let mut buf = vec![0u8; 1 << 20];
        let mut out = Actions::default();
        for (frames, kept) in [(3u8, false), (4, true)] {
            for i in 0..frames {
                assert!(peer.push(Kind::Data, 0, id, &[i; 4096]));
            }
            peer.publish();
            let mut lent = rx::Lent::new(1024, rx::LEND_TOTAL_MIN);
            let n = l.read_direct(id, &mut buf, Some(&mut lent), &mut out);
            assert_eq!(n.unwrap(), Some(frames as usize * 4096));
            match lent.take() {
                Some((loan, copies)) => {
                    assert!(kept, "{frames} frames lent");
                    assert_eq!(copies.len(), frames as usize);
                    assert!(own(&l, side::RX_TAIL) < l.rx_position(), "the tail waits");
                    l.give_back(loan, &mut out);
                }
                None => {
                    assert!(!kept, "{frames} frames copied");
                    assert!((0..frames).all(|i| buf[i as usize * 4096..][..4096] == [i; 4096]));
                }
            }
            assert_eq!(
                own(&l, side::RX_TAIL),
                l.rx_position(),
                "the space handed back"
            );
            peer.drain();
        }
    }

    /// A pump copies 64 KiB of data at most (and one frame at least): what is left stays
    /// in the ring for the session's own read or the next pump, in order.
    #[test]
    fn a_pump_copies_64_kib_at_most() {
        let (mut l, mut peer) = victim_in(Role::Host, true, 1 << 20);
        up(&mut l, &mut peer);
        let id = accepted_with_data(&mut l, &mut peer, 1, 0);
        for i in 0..140u8 {
            assert!(peer.push(Kind::Data, 0, id, &[i; 1024]));
        }
        peer.publish();
        let mut out = Actions::default();
        let mut seen = Vec::new();
        while l.pump(Instant::now(), &mut out).unwrap() {
            seen.push(l.sessions[&id].buffered());
        }
        assert_eq!(seen, [64 << 10, 128 << 10, 140 << 10], "64, 64, then 12");
        let rx = &l.sessions[&id].rx;
        assert!((0..140u8).all(|i| rx[i as usize * 1024..][..1024] == [i; 1024]));
    }

    /// A closed session's receive buffer, emptied, serves the next session to open, and
    /// one the peer opens: no new session starts its window in fresh pages.
    #[test]
    fn an_ended_sessions_receive_buffer_serves_the_next_session() {
        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        let mut out = Actions::default();
        let first = accepted_with_data(&mut l, &mut peer, 1, 100 << 10);
        let cap = l.sessions[&first].rx.capacity();
        assert!(cap >= 100 << 10);
        l.close(first, &mut out);
        assert_eq!((l.spare_rx.len(), l.spare_rx_bytes), (1, cap));
        let mine = l.open(9, false, &mut out).unwrap();
        assert_eq!(l.sessions[&mine].rx.capacity(), cap, "the kept buffer");
        assert_eq!(l.sessions[&mine].buffered(), 0, "emptied");
        assert_eq!((l.spare_rx.len(), l.spare_rx_bytes), (0, 0));
        let other = l.open(9, false, &mut out).unwrap();
        assert_eq!(l.sessions[&other].rx.capacity(), 0, "none left to share");
        // A session the peer opens takes one too; and a link reset keeps the buffers of
        // the sessions it ends.
        l.close(mine, &mut out);
        let theirs = accepted_with_data(&mut l, &mut peer, 2, 10 << 10);
        assert!(l.sessions[&theirs].rx.capacity() >= cap);
        l.local_reset("test", &mut out);
        assert!(l.sessions.is_empty());
        assert_eq!(l.spare_rx.len(), 1, "the one with a buffer");
        assert!(l.spare_rx_bytes >= cap);
    }

    /// Kept buffers that no session took or gave back for `SPARE_RX_IDLE` are freed at a
    /// heartbeat; any use starts the wait again.
    #[test]
    fn kept_receive_buffers_are_freed_once_unused() {
        let (mut l, _peer) = victim(Role::Host);
        let hb = l.cfg.heartbeat;
        let mut s = Sess::new(false, 1 << 10, State::Open);
        s.rx = Vec::with_capacity(4096);
        l.keep_rx(s);
        let t0 = l.last_beat + hb;
        l.beat_own(t0);
        assert_eq!(l.spare_rx.len(), 1, "just kept");
        l.beat_own(t0 + SPARE_RX_IDLE - hb);
        assert_eq!(l.spare_rx.len(), 1, "not unused long enough");
        // Taken and given back: the wait starts again.
        let taken = l.new_session(false, State::Open);
        l.keep_rx(taken);
        let t1 = t0 + SPARE_RX_IDLE;
        l.beat_own(t1);
        l.beat_own(t1 + SPARE_RX_IDLE - hb);
        assert_eq!(l.spare_rx.len(), 1);
        l.beat_own(t1 + SPARE_RX_IDLE);
        assert!(l.spare_rx.is_empty(), "freed");
        assert_eq!(l.spare_rx_bytes, 0);
    }

    /// The kept buffers are bounded in number and in bytes; what does not fit is freed.
    #[test]
    fn kept_receive_buffers_are_bounded() {
        let (mut l, _peer) = victim(Role::Host);
        let with = |cap: usize| {
            let mut s = Sess::new(false, 1 << 10, State::Open);
            s.rx = Vec::with_capacity(cap);
            s
        };
        for _ in 0..SPARE_RX_BUFFERS + 10 {
            l.keep_rx(with(16));
        }
        assert_eq!(l.spare_rx.len(), SPARE_RX_BUFFERS);
        l.keep_rx(with(0));
        assert_eq!(
            l.spare_rx.len(),
            SPARE_RX_BUFFERS,
            "an empty buffer is not kept"
        );

        let (mut l, _peer) = victim(Role::Host);
        let window = l.cfg.max_buf_size as usize;
        for _ in 0..SPARE_RX_WINDOWS + 3 {
            l.keep_rx(with(window));
        }
        assert_eq!(l.spare_rx.len(), SPARE_RX_WINDOWS);
        assert!(l.spare_rx_bytes <= SPARE_RX_WINDOWS * window);
        assert_eq!(
            l.spare_rx_bytes,
            l.spare_rx.iter().map(|b| b.capacity()).sum::<usize>()
        );
    }

    /// A bad index is corruption while the peer's epoch stands, and the peer's restart
    /// (followed at once, nothing counted) once it has moved.
    #[test]
    fn a_bad_index_is_corruption_unless_the_epoch_moved() {
        let garbage = 3 * Geometry::for_size(REGION).unwrap().capacity;
        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        peer.store(side::TX_HEAD, garbage);
        let got = l.pump(Instant::now(), &mut Actions::default());
        assert!(
            matches!(got, Err(Fault::Corrupt(Corruption::Index(_)))),
            "{got:?}"
        );
        assert_eq!(l.stats.corruptions, 1);
        assert_eq!(own(&l, side::ACK), peer.epoch);

        let (mut l, mut peer) = victim(Role::Host);
        up(&mut l, &mut peer);
        peer.epoch += 1;
        peer.store(side::TX_HEAD, garbage);
        peer.store(side::ACK, 0);
        peer.store(side::EPOCH, peer.epoch);
        let got = l.pump(Instant::now(), &mut Actions::default());
        assert_eq!(got, Err(Fault::PeerRestarted { epoch: peer.epoch }));
        assert_eq!(l.stats.corruptions, 0);
        assert_eq!(l.stats.link_resets, 1);
        assert_eq!(own(&l, side::ACK), peer.epoch);
        assert!(!l.up);
        assert!(check(&mut l), "check_peer reports the followed restart");
        assert!(!check(&mut l));
    }
}

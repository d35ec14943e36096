//! Tunables of a link.

use std::time::Duration;

/// How a blocked reader or writer waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Spin for [`Config::spin`], then sleep until the doorbell rings.
    Adaptive,
    /// Never sleep: lowest latency, one core busy while waiting.
    Poll,
    /// Sleep at once: no spinning at all.
    Block,
}

/// Tunables of a link; `Config::default()` suits most uses.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often this side bumps its heartbeat.
    pub heartbeat: Duration,
    /// A peer whose heartbeat has not moved for this long is declared gone and its
    /// sessions reset. Generous enough for a loaded host or a TCG guest.
    pub peer_timeout: Duration,
    /// Receive buffer per session (the credit granted to the peer) when it opens, in bytes.
    pub buf_size: u32,
    /// Largest receive buffer a stream session grows to (a message session keeps
    /// `buf_size`, its largest message). A stream session's buffer doubles when its
    /// reader sleeps for data and then reads a whole buffer before running dry again (the
    /// peer was held back by the buffer's size: the bandwidth-delay product of a link
    /// whose wakeups are slow); the growth of all sessions of a link together stays
    /// under four times this, each open stream session taking at most an equal share.
    /// The buffers of ended sessions are kept, emptied, for the next sessions to open: at
    /// most 32 times this in all (128 MiB at the defaults), and freed after 10 s in which
    /// no session took or gave one back, so a burst of sessions long past holds nothing.
    pub max_buf_size: u32,
    /// Most sessions open at once on this link.
    pub max_sessions: usize,
    /// Most opened-but-not-accepted sessions per listener.
    pub backlog: usize,
    /// How long `connect` waits for the peer to attach and answer.
    pub connect_timeout: Duration,
    /// How blocked readers and writers wait.
    pub wait: WaitMode,
    /// How long an adaptive waiter spins before sleeping.
    pub spin: Duration,
    /// How long a guest endpoint, when it starts, waits for a header that is not
    /// ivring's to be laid out again: a peer before it may have overwritten it, and the
    /// host rewrites its words once per heartbeat period (within its `peer_timeout` of
    /// a peer leaving unannounced). Still wrong after this, the region is reported as not
    /// ivring's.
    pub layout_wait: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat: Duration::from_millis(100),
            peer_timeout: Duration::from_secs(1),
            buf_size: 256 << 10,
            max_buf_size: 4 << 20,
            max_sessions: 4096,
            backlog: 128,
            connect_timeout: Duration::from_secs(10),
            wait: WaitMode::Adaptive,
            spin: Duration::from_micros(50),
            layout_wait: Duration::from_secs(5),
        }
    }
}

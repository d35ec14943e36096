//! What a link looks like from outside: the header and the words each side publishes,
//! read twice a moment apart (to see which heartbeats move), and the state they add up
//! to. Reads only: the region handed in should be a private mapping
//! ([`ivring_ivshmem::shm::map_fd_private`]), so that nothing this process does can reach the
//! shared memory.

use ivring::layout::{side, GUEST_BLOCK, HOST_BLOCK, PEER_ID_VALID};
use ivring::{Geometry, SharedRegion};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long [`read`] watches the heartbeats by default: a few heartbeat periods.
pub const WATCH: Duration = Duration::from_millis(350);

/// The words one side publishes in its block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// Its epoch: bumped at every attach and reset; 0 = never attached.
    pub epoch: u64,
    /// Its ivshmem peer id, if it published one.
    pub peer_id: Option<u16>,
    /// Its heartbeat counter at the second look.
    pub heartbeat: u64,
    /// Whether the heartbeat moved between the two looks.
    pub alive: bool,
    /// The other side's epoch it has reset its indices for.
    pub ack: u64,
    /// Whether it polls (never sleeps on the doorbell).
    pub polls: bool,
    /// Bytes it has written into the ring it writes (free-running).
    pub tx_head: u64,
    /// Bytes it has consumed from the ring it reads (free-running).
    pub rx_tail: u64,
    /// Whether it is about to sleep waiting for data (asks to be rung).
    pub rx_need_wakeup: bool,
    /// The reader position its blocked writer waits for, if any.
    pub tx_need_space: Option<u64>,
}

/// The words of one side block, as loaded.
#[derive(Clone, Copy)]
struct Words {
    epoch: u64,
    peer_id: u64,
    heartbeat: u64,
    ack: u64,
    polls: u64,
    tx_head: u64,
    rx_tail: u64,
    rx_need_wakeup: u64,
    tx_need_space: u64,
}

/// The state of a link, from its words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Both sides attached, alive, and each acknowledges the other's epoch.
    Up,
    /// One side is attached and alive; the other is not (yet, or any more).
    Waiting {
        /// The side that is there: "host" or "guest".
        present: &'static str,
    },
    /// Both alive, but one has not yet acknowledged the other's epoch: the link is
    /// re-forming after a restart or a reset.
    Reset,
    /// No heartbeat on either side.
    Down,
    /// No host program has laid the region out yet.
    Empty,
    /// The header is not ivring's (or is damaged): why.
    Unusable(String),
}

impl State {
    /// One word for scripts: up, waiting, reset, down, empty, unusable.
    pub fn word(&self) -> &'static str {
        match self {
            State::Up => "up",
            State::Waiting { .. } => "waiting",
            State::Reset => "reset",
            State::Down => "down",
            State::Empty => "empty",
            State::Unusable(_) => "unusable",
        }
    }
}

/// A link as [`read`] found it.
#[derive(Clone, Debug)]
pub struct LinkStatus {
    /// What was read: a socket, file or device.
    pub what: String,
    /// The region's size in bytes.
    pub size: u64,
    /// Bytes in each ring, once laid out.
    pub ring_capacity: Option<u64>,
    /// The state the words add up to.
    pub state: State,
    /// The host's block.
    pub host: Side,
    /// The guest's block.
    pub guest: Side,
}

fn side_words(region: &SharedRegion, block: usize) -> Words {
    let load = |off| region.load_u64(block + off, Ordering::Acquire);
    Words {
        epoch: load(side::EPOCH),
        peer_id: load(side::PEER_ID),
        heartbeat: load(side::HEARTBEAT),
        ack: load(side::ACK),
        polls: load(side::POLLS),
        tx_head: load(side::TX_HEAD),
        rx_tail: load(side::RX_TAIL),
        rx_need_wakeup: load(side::RX_NEED_WAKEUP),
        tx_need_space: load(side::TX_NEED_SPACE),
    }
}

fn side(first: Words, w: Words) -> Side {
    Side {
        epoch: w.epoch,
        peer_id: (w.peer_id & PEER_ID_VALID != 0).then_some(w.peer_id as u16),
        heartbeat: w.heartbeat,
        alive: w.heartbeat != first.heartbeat || w.epoch != first.epoch,
        ack: w.ack,
        polls: w.polls == 1,
        tx_head: w.tx_head,
        rx_tail: w.rx_tail,
        rx_need_wakeup: w.rx_need_wakeup == 1,
        tx_need_space: (w.tx_need_space != 0).then_some(w.tx_need_space),
    }
}

/// Reads the link in `region` (named `what` in the output), looking twice `watch` apart.
pub fn read(region: &SharedRegion, what: impl Into<String>, watch: Duration) -> LinkStatus {
    let first = (
        side_words(region, HOST_BLOCK),
        side_words(region, GUEST_BLOCK),
    );
    std::thread::sleep(watch);
    let header = Geometry::read_header(region);
    let host = side(first.0, side_words(region, HOST_BLOCK));
    let guest = side(first.1, side_words(region, GUEST_BLOCK));
    let attached = |s: &Side| s.alive && s.epoch != 0;
    let state = match &header {
        Err(e) => State::Unusable(e.to_string()),
        Ok(None) => State::Empty,
        Ok(Some(_)) => match (attached(&host), attached(&guest)) {
            (true, true) if host.ack == guest.epoch && guest.ack == host.epoch => State::Up,
            (true, true) => State::Reset,
            (true, false) => State::Waiting { present: "host" },
            (false, true) => State::Waiting { present: "guest" },
            (false, false) => State::Down,
        },
    };
    LinkStatus {
        what: what.into(),
        size: region.len() as u64,
        ring_capacity: header.ok().flatten().map(|g| g.capacity),
        state,
        host,
        guest,
    }
}

impl LinkStatus {
    /// The status as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let side = |s: &Side| {
            serde_json::json!({
                "epoch": s.epoch,
                "peer_id": s.peer_id,
                "heartbeat": s.heartbeat,
                "alive": s.alive,
                "ack": s.ack,
                "polls": s.polls,
                "tx_head": s.tx_head,
                "rx_tail": s.rx_tail,
                "rx_need_wakeup": s.rx_need_wakeup,
                "tx_need_space": s.tx_need_space,
            })
        };
        let detail = match &self.state {
            State::Waiting { present } => Some(format!("only the {present} is attached")),
            State::Unusable(why) => Some(why.clone()),
            _ => None,
        };
        serde_json::json!({
            "link": self.what,
            "state": self.state.word(),
            "detail": detail,
            "size": self.size,
            "ring_capacity": self.ring_capacity,
            "host": side(&self.host),
            "guest": side(&self.guest),
        })
    }

    /// The status for people, a few lines.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let state = match &self.state {
            State::Up => "up".to_string(),
            State::Waiting { present } => {
                format!("waiting: only the {present} is attached")
            }
            State::Reset => "reset: both attached, the link is re-forming".into(),
            State::Down => "down: no heartbeat on either side".into(),
            State::Empty => "empty: no host program has laid the region out".into(),
            State::Unusable(why) => format!("unusable: {why}"),
        };
        let _ = writeln!(out, "link    {}", self.what);
        let _ = writeln!(out, "state   {state}");
        let _ = write!(
            out,
            "memory  {}",
            ivring_ivshmem::shm::human_size(self.size)
        );
        if let Some(c) = self.ring_capacity {
            let _ = write!(
                out,
                " (rings of {} each)",
                ivring_ivshmem::shm::human_size(c)
            );
        }
        let _ = writeln!(out);
        for (name, s) in [("host", &self.host), ("guest", &self.guest)] {
            let _ = writeln!(
                out,
                "{name:<7} peer id {}, epoch {}, acknowledges epoch {}, heartbeat {} ({}){}",
                s.peer_id.map_or("none".into(), |i| i.to_string()),
                s.epoch,
                s.ack,
                s.heartbeat,
                if s.alive { "moving" } else { "still" },
                if s.polls { ", polls" } else { "" }
            );
            let _ = writeln!(
                out,
                "        wrote {} B, read {} B{}{}",
                s.tx_head,
                s.rx_tail,
                if s.rx_need_wakeup {
                    ", waiting for data"
                } else {
                    ""
                },
                s.tx_need_space
                    .map_or(String::new(), |t| format!(", writer waiting for tail {t}"))
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivring::doorbell::local;
    use ivring::{Config, Endpoint};
    use std::sync::Arc;

    #[test]
    fn states_from_the_words() {
        let region = SharedRegion::heap(1 << 20);
        let st = read(&region, "heap", Duration::from_millis(1));
        assert_eq!(st.state, State::Empty);
        let (a, b) = local::pair();
        let host = Endpoint::host(region.clone(), Arc::new(a), Config::default()).unwrap();
        let st = read(&region, "heap", WATCH);
        assert_eq!(
            st.state,
            State::Waiting { present: "host" },
            "{}",
            st.text()
        );
        let guest = Endpoint::guest(region.clone(), Arc::new(b), Config::default()).unwrap();
        assert!(host.wait_up(Duration::from_secs(5)));
        let st = read(&region, "heap", WATCH);
        assert_eq!(st.state, State::Up, "{}", st.text());
        assert_eq!(st.host.ack, st.guest.epoch);
        assert_eq!(st.to_json()["state"], "up");
        {
            use std::io::{Read, Write};
            let l = guest.listen(7).unwrap();
            let mut a = host.connect(7).unwrap();
            let mut b = l.accept().unwrap();
            a.write_all(&[7u8; 1000]).unwrap();
            let mut got = [0u8; 1000];
            b.read_exact(&mut got).unwrap();
        }
        let st = read(&region, "heap", Duration::from_millis(1));
        assert!(st.host.tx_head >= 1000, "{}", st.text());
        assert!(st.guest.rx_tail >= 1000, "{}", st.text());
        assert_eq!(st.to_json()["host"]["tx_head"], st.host.tx_head);
        assert_eq!(
            st.ring_capacity,
            Some(Geometry::for_size(1 << 20).unwrap().capacity)
        );
        drop(guest);
        let st = read(&region, "heap", WATCH);
        assert_eq!(
            st.state,
            State::Waiting { present: "host" },
            "{}",
            st.text()
        );
        drop(host);
        let st = read(&region, "heap", WATCH);
        assert_eq!(st.state, State::Down, "{}", st.text());
        region.store_u64(0, 0x4141, Ordering::Relaxed);
        let st = read(&region, "heap", Duration::from_millis(1));
        assert!(matches!(st.state, State::Unusable(_)), "{}", st.text());
    }
}

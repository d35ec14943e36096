//! Where a peer can do damage, and with what: every word of the header and of both side
//! blocks (PROTOCOL.md §1), and the values worth writing there. Shared by the recovery
//! rounds on the heap (`ring/tests/recovery.rs`) and through the ivshmem server
//! (`host/tests/recovery_server.rs`, which includes this file by path).
#![allow(dead_code)] // each test file uses its own subset

use ivring::layout::{side, GUEST_BLOCK, HOST_BLOCK, MAGIC};
use ivring::SharedRegion;
use std::sync::atomic::Ordering;

/// xorshift64*: deterministic for a seed.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

pub const HEADER_WORDS: [(&str, usize); 7] = [
    ("magic", 0),
    ("version", 8),
    ("region_size", 16),
    ("h2g_offset", 24),
    ("h2g_capacity", 32),
    ("g2h_offset", 40),
    ("g2h_capacity", 48),
];

pub const SIDE_WORDS: [(&str, usize); 9] = [
    ("EPOCH", side::EPOCH),
    ("PEER_ID", side::PEER_ID),
    ("HEARTBEAT", side::HEARTBEAT),
    ("ACK", side::ACK),
    ("POLLS", side::POLLS),
    ("TX_HEAD", side::TX_HEAD),
    ("RX_TAIL", side::RX_TAIL),
    ("RX_NEED_WAKEUP", side::RX_NEED_WAKEUP),
    ("TX_NEED_SPACE", side::TX_NEED_SPACE),
];

/// Every word a side owns: (name, region offset).
pub fn words() -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = HEADER_WORDS
        .iter()
        .map(|&(n, off)| (format!("header.{n}"), off))
        .collect();
    for (b, base) in [("host", HOST_BLOCK), ("guest", GUEST_BLOCK)] {
        for &(n, off) in &SIDE_WORDS {
            v.push((format!("{b}.{n}"), base + off));
        }
    }
    v
}

#[derive(Clone, Copy, Debug)]
pub enum Value {
    Zero,
    One,
    Max,
    TopBit,
    U32Max,
    CurrentPlus1,
    CurrentMinus1,
    Magic,
    VictimEpochPlus1,
    Random,
}

pub const VALUES: [Value; 10] = [
    Value::Zero,
    Value::One,
    Value::Max,
    Value::TopBit,
    Value::U32Max,
    Value::CurrentPlus1,
    Value::CurrentMinus1,
    Value::Magic,
    Value::VictimEpochPlus1,
    Value::Random,
];

impl Value {
    pub fn resolve(
        self,
        region: &SharedRegion,
        at: usize,
        victim_block: usize,
        rng: &mut Rng,
    ) -> u64 {
        let current = region.load_u64(at, Ordering::Acquire);
        match self {
            Value::Zero => 0,
            Value::One => 1,
            Value::Max => u64::MAX,
            Value::TopBit => 1 << 63,
            Value::U32Max => u32::MAX as u64,
            Value::CurrentPlus1 => current.wrapping_add(1),
            Value::CurrentMinus1 => current.wrapping_sub(1),
            Value::Magic => MAGIC,
            Value::VictimEpochPlus1 => region
                .load_u64(victim_block + side::EPOCH, Ordering::Acquire)
                .wrapping_add(1),
            Value::Random => rng.next(),
        }
    }
}

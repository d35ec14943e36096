//! ivring: a lock-free ring pair in ivshmem shared memory, with framed, explicitly
//! opened and closed sessions.
//!
//! This crate knows no operating system: it runs on any [`SharedRegion`] with any
//! [`Doorbell`], so its tests run on heap memory. The wire format is in `PROTOCOL.md`.
#![deny(missing_docs)]

pub mod doorbell;
pub mod region;
mod sync;

pub use doorbell::Doorbell;
pub use region::SharedRegion;

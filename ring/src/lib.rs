//! ivring: a lock-free ring pair in ivshmem shared memory, with framed, explicitly
//! opened and closed sessions.
//!
//! This crate knows no operating system: it runs on any [`SharedRegion`] with any
//! [`Doorbell`], so its tests run on heap memory. The wire format is in `PROTOCOL.md`.
//!
//! An [`Endpoint`] is one side of a link; [`Endpoint::listen`] and [`Endpoint::connect`]
//! give [`Session`]s, which are `std::io::Read + Write` and behave like sockets.
//!
//! Features: `tokio` adds async sessions and listeners (`ivring::tokio`), `mio` adds
//! `mio::event::Source` for them (`ivring::mio`, Linux only: the one place in this crate
//! with a file descriptor).
#![deny(missing_docs)]

#[doc(hidden)]
pub mod bench_api;
mod config;
mod connecting;
pub mod doorbell;
mod endpoint;
mod fastpath;
pub mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
mod link;
#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(feature = "mio", target_os = "linux"))]
pub mod mio;
mod ready;
pub mod region;
mod ring;
mod sync;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod zerocopy;

pub use config::{Config, WaitMode};
pub use connecting::Connecting;
pub use doorbell::Doorbell;
pub use endpoint::{Endpoint, Listener, Session, SessionOptions};
pub use layout::{Geometry, LayoutError, Role};
pub use link::Stats;
pub use ready::{IdleWait, Readiness};
pub use region::SharedRegion;

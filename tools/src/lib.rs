//! The command-line tools of ivring, shared by the `ivring-host` and `ivring-guest`
//! binaries: not a library API (the libraries are `ivring-ivshmem`, re-exported by
//! `ivring-host`, and `ivring-guest`).
//!
//! - [`bench`](mod@bench), [`demo`], [`checks`]: `ivring-host bench`, `demo` and
//!   `check`, and `ivring-guest check`;
//! - [`services`]: the test and bench services a peer offers (echo, sink, source, check);
//! - [`bridge`]: the relays between UNIX sockets and ivring sessions (`ivring-host
//!   bridge`, `ivring-guest bridge` in [`bridge::guest`]);
//! - [`daemon`]: `ivring-host daemon` and `ivring-host vm`;
//! - [`status`], [`logging`], [`notify`], [`cli`]: what every command shares.
#![deny(missing_docs)]

pub mod bench;
pub mod bridge;
pub mod checks;
pub mod cli;
pub mod daemon;
pub mod demo;
pub mod logging;
pub mod notify;
pub mod services;
pub mod status;

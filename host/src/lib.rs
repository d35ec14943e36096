//! Host side of ivring: an ivshmem server and client speaking QEMU's protocol, eventfd
//! doorbells, and mappings of the shared memory.
//!
//! The library is [`ivring_ivshmem`], re-exported under the paths it always had
//! (`ivring_host::{Server, Client, HostLink, Attach, PollableSession}`,
//! `ivring_host::attach::HostLink`, `ivring_host::shm`, ...). The `ivring-host` command
//! and everything only it needs (bench, demo, checks, services, bridge, daemon: the
//! unpublished `ivring-tools` crate, clap, anyhow) sit behind the default `cli` feature:
//! with `default-features = false` a program links the library and none of those.
//!
//! ```
//! use ivring::Doorbell;
//! use ivring_host::{Client, Server};
//! use std::sync::atomic::Ordering;
//!
//! let dir = std::env::temp_dir().join(format!("ivring-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let sock = dir.join("ivshmem.sock");
//! let server = Server::bind(&sock, 1 << 20, 1)?.spawn();
//! let a = Client::connect(&sock)?;
//! let b = Client::connect(&sock)?;
//! a.region().store_u64(0, 42, Ordering::Release);
//! assert_eq!(b.region().load_u64(0, Ordering::Acquire), 42);
//! assert_eq!(b.wait_for_peer(Some(std::time::Duration::from_secs(5))), Some(a.id()));
//! a.doorbell().ring(b.id());
//! b.doorbell().wait(Some(std::time::Duration::from_secs(5)));
//! drop((a, b));
//! server.shutdown()?;
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub use ivring_ivshmem::{attach, client, error, pollable, server, shm};

pub use ivring_ivshmem::{
    Attach, Client, ClientDoorbell, ConnectOptions, HostError, HostLink, PollableSession, Result,
    Server, ServerHandle,
};

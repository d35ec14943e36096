//! QEMU's ivshmem for ivring: an ivshmem server and client speaking QEMU's protocol,
//! eventfd doorbells, mappings of the shared memory (sealed memfds, shared files), and
//! [`HostLink`], an [`ivring::Endpoint`] attached to all that.
//!
//! This is the crate a program links to talk to a QEMU guest: it depends on neither
//! clap nor anyhow nor an async runtime. `ivring-host` re-exports it.
//!
//! ```
//! use ivring::Doorbell;
//! use ivring_ivshmem::{Client, Server};
//! use std::sync::atomic::Ordering;
//!
//! let dir = std::env::temp_dir().join(format!("ivring-ivshmem-doc-{}", std::process::id()));
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

pub mod attach;
pub mod client;
pub mod error;
pub mod pollable;
pub mod server;
pub mod shm;
mod shrink;
pub mod sys;

pub use attach::{Attach, HostLink};
pub use client::{Client, ClientDoorbell, ConnectOptions};
pub use error::{HostError, Result};
pub use pollable::PollableSession;
pub use server::{Server, ServerHandle};

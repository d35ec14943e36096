//! Host side of ivring: an ivshmem server and client speaking QEMU's protocol, eventfd
//! doorbells, and mappings of the shared memory.
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

// The ivshmem side lives in ivring-ivshmem; its modules keep their paths here.
pub use ivring_ivshmem::{attach, client, pollable, server, shm};
use ivring_ivshmem::sys;

pub mod bench;
pub mod bridge;
pub mod checks;
pub mod daemon;
pub mod demo;
pub mod error;
pub mod logging;
pub mod notify;
pub mod services;
pub mod status;

pub use attach::{Attach, HostLink};
pub use client::{Client, ClientDoorbell, ConnectOptions};
pub use error::{HostError, Result};
pub use pollable::PollableSession;
pub use server::{Server, ServerHandle};

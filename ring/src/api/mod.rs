//! The API layer: sockets ([`endpoint`]), zero-copy slots and views, readiness,
//! non-blocking connects, and the async (`tokio`) and event-loop (`mio`) wrappers, all
//! handles on the runtime.

pub mod connecting;
pub mod endpoint;
#[cfg(all(feature = "mio", target_os = "linux"))]
pub mod mio;
pub mod ready;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod zerocopy;

//! The wire layer: frames (header and control payloads), the SPSC byte ring that
//! carries them, and a mock peer that writes both by hand, over the shared-memory layer.

pub mod frame;
#[doc(hidden)]
pub mod mock;
pub(crate) mod ring;

//! The wire layer: frames (header and control payloads) and the SPSC byte ring that
//! carries them, both over the shared-memory layer.

pub mod frame;
pub(crate) mod ring;

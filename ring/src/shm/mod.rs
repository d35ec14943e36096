//! The shared-memory layer: the region (every access a copy, never a reference), the
//! layout of the header and the two side blocks, and the one atomics shim.

pub mod layout;
pub mod region;
pub(crate) mod sync;

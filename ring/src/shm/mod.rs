//! The shared-memory layer, what the platform gives the crate: the region (every access a
//! copy, never a reference) and the doorbell (the trait; the program supplies it), the
//! layout of the header and the two side blocks, and the one atomics shim.

pub mod doorbell;
pub mod layout;
pub mod region;
pub(crate) mod sync;

//! The one place atomics come from, so loom can stand in for them (`RUSTFLAGS="--cfg loom"`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU64, Ordering};
// Only the `mio` feature's readiness signal uses it.
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::atomic::AtomicBool;
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::atomic::AtomicBool;

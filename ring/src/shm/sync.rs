//! The one place atomics come from, so loom can stand in for them (`RUSTFLAGS="--cfg loom"`):
//! those of the shared memory and those of the runtime's in-process state alike.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

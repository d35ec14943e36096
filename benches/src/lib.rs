//! Benchmarks for ivring.

//! Deterministic cluster simulation: the seeded simulator and the checkers it runs.
pub mod cluster;
pub mod kv;
pub mod linearizability;

//! Paxwasm: a replicated application platform. Multi-Paxos orders commands; a
//! deterministic WebAssembly module applies them on every replica.
//!
//! See ARCHITECTURE.md at the repository root for the map of the code.

pub mod api;
pub mod cli;
pub mod examples;
pub mod machine;
pub mod net;
pub mod node;
pub mod paxos;
pub mod sim;
pub mod storage;

//! The sans-IO Multi-Paxos core. It owns ballots, slots, roles, the leader lease,
//! batching, the pipelining window, commit learning, catch-up and client dedup.
//!
//! It never reads a clock, opens a socket, spawns a thread or draws unseeded
//! randomness: time comes in as `Event::Tick`, randomness from a seed given at
//! construction, and every effect leaves as an `Action` for the runtime to perform.
//! It does not know what commands mean (the state machine behind the `Applier` does).

pub mod apply;
pub mod config;
pub mod dedup;
pub mod params;
pub mod replica;
pub mod rng;
pub mod types;

#[cfg(test)]
mod reconfig_tests;
#[cfg(test)]
mod tests;

pub use apply::{Applier, ApplierStateError, ApplyContext, StateMachine, STALE_RESULT};
pub use config::{Configuration, Membership};
pub use dedup::{DedupCheck, DedupTable, DEDUP_CLIENTS_MAX};
pub use params::{Params, LEASE_SAFETY_MARGIN_TICKS};
pub use replica::{Replica, Status};
pub use rng::SplitMix64;
pub use types::*;

//! The replica runtime: wires paxos, storage, net, machine and api together for one
//! replica. It owns the core task (the only owner of the `paxos::Replica` and the
//! applier), the binary encodings of peer messages and stored entries, and the
//! `NodeApi` implementation the HTTP API calls. It never speaks HTTP or JSON (that is
//! `api`) and never interprets application commands (that is the Wasm module).

pub mod app;
mod bootstrap;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod handle;
pub mod members;
pub mod probe;
mod runtime;
mod service;
pub mod snapshot;
pub mod transfer;
pub mod upgrade;

pub use config::NodeConfig;
pub use service::{idempotency_key, start, Node, Running, REMOVED_READINESS};

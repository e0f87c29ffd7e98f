//! The replica runtime: wires paxos, storage, net, machine and api together.

pub mod codec;
pub mod handle;

//! The Paxwasm guest SDK (see ABI.md).

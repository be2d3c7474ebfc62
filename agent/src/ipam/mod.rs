//! IPAM: every container an address, never the same one twice.
//!
//! The range is a ring of ranges owned by peers ([`ring`]); initial ownership is
//! decided by agreement ([`paxos`]) or seeded; the rest of the state machine is
//! [`core`]. Owns: address ownership and allocations. Uses the mesh's `ipam`
//! channel. Must not touch: the data path, DNS, Docker.

pub mod core;
pub mod paxos;
pub mod ring;

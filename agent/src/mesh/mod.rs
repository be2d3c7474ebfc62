//! The mesh: peers, authenticated encrypted connections, topology gossip,
//! routes, and named gossip channels for the other subsystems.
//!
//! Generic: it knows nothing of IPAM, DNS or Docker; they register a
//! [`node::Gossiper`] per channel.

pub mod node;
pub mod peer;
pub mod sim;
pub mod topology;

pub use node::{Gossip, GossipError, Gossiper};
pub use peer::PeerName;

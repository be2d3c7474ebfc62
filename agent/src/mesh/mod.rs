//! The mesh: peers, authenticated encrypted connections, topology gossip,
//! routes, and named gossip channels for the other subsystems.
//!
//! Generic: it knows nothing of IPAM, DNS or Docker; they register a
//! [`Gossiper`] per channel on the [`MeshBuilder`], which starts the actor
//! ([`Mesh`]) and hands out [`MeshHandle`]s. The rooms:
//!
//! - `handle`: the builder, the running mesh and its handle (the public face).
//! - `actor`: the I/O shell, one task: listener, dials, connection bookkeeping.
//! - `conn`: one connection's tasks; `wire`: its bytes (preamble, Noise, frames).
//! - `close`: why connections end ([`CloseReason`], the metric labels).
//! - `targets`: the sans-IO dial plan (targets, backoff, connection limit,
//!   the duplicate-connection rule).
//! - `node`, `topology`, `peer`: the sans-IO gossip core, its CRDT, identities.
//! - `status`: what `weft status` shows, built from the actor's state.
//! - `sim`, `timed`: in-memory networks of nodes for tests and benchmarks.
//!
//! Owns the control port and everything said over it. Must not touch the data
//! path, IPAM, DNS or Docker: it only carries their channels.

mod actor;
pub mod close;
pub mod conn;
mod handle;
pub mod node;
pub mod peer;
pub mod sim;
mod status;
pub mod targets;
pub mod timed;
pub mod topology;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

/// The newest control-protocol version this build speaks (for status output).
pub use wire::VERSION_MAX as PROTOCOL_VERSION;
pub use close::CloseReason;
pub use handle::{Mesh, MeshBuilder, MeshHandle};
pub use node::{Gossip, GossipError, Gossiper};
pub use peer::PeerName;
pub use status::{ConnState, ConnStatus, MeshStatus, PeerConnStatus, PeerStatus};

/// Weave's control port.
pub const DEFAULT_PORT: u16 = 6783;
/// Weave's default connection limit.
pub const DEFAULT_CONN_LIMIT: usize = 100;
/// How often a few random neighbours get a full anti-entropy round.
pub const ANTI_ENTROPY_INTERVAL: Duration = Duration::from_secs(5);
/// Backoff between dials of an unreachable target: this unit, doubled per
/// failure (the first retry waits a second)...
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// ...up to this, so a peer that comes back is found within half a minute.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a peer whose agent stopped on purpose keeps its routes and endpoints
/// on the other peers (its data path keeps forwarding meanwhile).
pub const DEFAULT_HOLD: Duration = Duration::from_secs(600);
/// Shortest time between two prunes of the topology (each is a graph walk).
pub const PRUNE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a stopping agent waits for its last words to leave.
pub const STOP_DRAIN: Duration = Duration::from_secs(2);
/// Accepted connections that have not finished their handshake, in all:
/// more are closed at once (a stranger cannot hold the agent's descriptors
/// and memory with half-open connections). Each lasts at most
/// [`conn::HANDSHAKE_TIMEOUT`].
pub const MAX_PENDING: usize = 64;
/// ...and from one source address.
pub const MAX_PENDING_PER_SOURCE: usize = 8;
/// Limits on what a peer may claim in the topology (a bigger claim is refused
/// and costs the sender its connection): peers in one update...
pub const MAX_PEERS: usize = 10_000;
/// ...and connections one peer lists.
pub const MAX_CONNECTIONS_PER_PEER: usize = 10_000;

/// Settings of the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub name: PeerName,
    pub nickname: String,
    /// Random per start.
    pub uid: u64,
    /// First version of this peer's topology entry (above any earlier one).
    pub version: u64,
    pub listen: SocketAddr,
    pub password: Option<String>,
    /// Addresses (`host` or `host:port`) to keep connected to.
    pub peers: Vec<String>,
    pub conn_limit: usize,
    /// Learn peers of peers from the topology and connect to them.
    pub discovery: bool,
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
    /// Our data-plane (underlay) address, announced in the topology.
    pub data_addr: Option<Ipv4Addr>,
    /// How long a paused, unreachable peer is held (see [`DEFAULT_HOLD`]).
    pub hold: Duration,
}

impl MeshConfig {
    /// Defaults for a peer called `name`.
    pub fn new(name: PeerName, nickname: impl Into<String>) -> Self {
        MeshConfig {
            name,
            nickname: nickname.into(),
            uid: rand::random(),
            version: now_micros(),
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            password: None,
            peers: Vec::new(),
            conn_limit: DEFAULT_CONN_LIMIT,
            discovery: true,
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            data_addr: None,
            hold: DEFAULT_HOLD,
        }
    }
}

/// Microseconds since the epoch: a version start above any earlier incarnation's.
pub fn now_micros() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64)
}

/// Why the mesh could not start or do something.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot listen on {addr}: {source} (is another weft running? pass --port)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the mesh has stopped")]
    Stopped,
    #[error(transparent)]
    Gossip(#[from] GossipError),
}

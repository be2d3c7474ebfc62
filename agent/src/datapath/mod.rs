//! The data path: what moves container packets, programmed by the agent and
//! running without it.
//!
//! Callers see only the [`Datapath`] trait: endpoints (a container's interface
//! with its addresses) are attached and detached, remote endpoints are announced
//! with the host they live on, and hosts are reached directly or through a relay.
//! Hosts are named by their underlay IPv4 address, the one thing every backend
//! needs to send to them. Backends: [`ebpf`] (TC programs + VXLAN, the default);
//! the Open vSwitch kernel datapath and a user-space fallback fit the same trait.
//!
//! This module is a leaf: it knows nothing of the mesh, IPAM, DNS or Docker.

pub mod abi;
pub mod ebpf;
mod error;
pub mod netlink;
pub mod netns;

pub use error::{BoxError, DatapathError, EndpointReason, ErrorKind, errno};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use async_trait::async_trait;
use ipnet::Ipv4Net;
use serde::Serialize;

/// Bytes VXLAN adds on the underlay: outer IPv4 (20) + UDP (8) + VXLAN (8) +
/// inner Ethernet (14). Endpoint MTU = underlay MTU − this, so that encapsulated
/// packets are never fragmented.
pub const VXLAN_OVERHEAD: u32 = 50;

/// Weave's port for the fast data path's VXLAN, kept so firewall rules carry over.
pub const DEFAULT_VXLAN_PORT: u16 = 6784;

/// The VXLAN network identifier weft uses unless told otherwise.
pub const DEFAULT_VNI: u32 = 0x77_6674; // "wft"

/// The name of the container-side interface, as in Weave.
pub const DEFAULT_ENDPOINT_IFNAME: &str = "ethwe";

/// A container interface to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Unique on this host (a container id, or any name); names the host-side veth.
    pub id: String,
    /// The container's network namespace (`/proc/PID/ns/net`, `/run/netns/NAME`).
    pub netns: PathBuf,
    /// Interface name inside the container.
    pub ifname: String,
    /// Addresses with the overlay's prefix (the prefix gives the on-link route).
    pub addrs: Vec<Ipv4Net>,
    /// Extra routes through the interface (e.g. the multicast range).
    pub routes: Vec<Ipv4Net>,
    /// MAC of the container's interface; derived from the first address if `None`.
    pub mac: Option<[u8; 6]>,
}

impl LocalEndpoint {
    /// An endpoint named `id` in `netns` with `addrs`, defaults otherwise.
    pub fn new(id: impl Into<String>, netns: impl Into<PathBuf>, addrs: Vec<Ipv4Net>) -> Self {
        LocalEndpoint {
            id: id.into(),
            netns: netns.into(),
            ifname: DEFAULT_ENDPOINT_IFNAME.into(),
            addrs,
            routes: Vec::new(),
            mac: None,
        }
    }
}

/// An endpoint as attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachedEndpoint {
    pub id: String,
    /// Host-side interface name and index.
    pub host_ifname: String,
    pub host_ifindex: u32,
    #[serde(serialize_with = "serialize_mac")]
    pub mac: [u8; 6],
    pub addrs: Vec<Ipv4Addr>,
    pub mtu: u32,
}

/// An endpoint that lives on another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RemoteEndpoint {
    pub addr: Ipv4Addr,
    #[serde(serialize_with = "serialize_mac")]
    pub mac: [u8; 6],
    /// The underlay address of its host.
    pub host: Ipv4Addr,
    /// Learned by the data path from its traffic, not (yet) announced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learned: bool,
}

/// Packet and byte counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// What the data path did, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Per path: arp_reply, local, encap, decap, relay, pass, bcast.
    pub paths: BTreeMap<&'static str, Count>,
    /// Per drop reason.
    pub drops: BTreeMap<&'static str, Count>,
}

impl Stats {
    /// Packets counted on a path (0 if none).
    pub fn path(&self, name: &str) -> u64 {
        self.paths.get(name).map_or(0, |c| c.packets)
    }

    /// Packets dropped for a reason (0 if none).
    pub fn dropped(&self, reason: &str) -> u64 {
        self.drops.get(reason).map_or(0, |c| c.packets)
    }
}

/// The operations every backend provides.
#[async_trait]
pub trait Datapath: Send + Sync {
    /// The backend's name (`ebpf`, `ovs`, `sleeve`).
    fn name(&self) -> &'static str;

    /// The MTU endpoints get.
    fn endpoint_mtu(&self) -> u32;

    /// This host's underlay address (what peers send to).
    fn local_address(&self) -> Ipv4Addr;

    /// Creates the endpoint's interface in its namespace and starts forwarding to
    /// and from it.
    async fn attach_endpoint(&self, ep: &LocalEndpoint) -> Result<AttachedEndpoint, DatapathError>;

    /// Removes an endpoint: its traffic stops and its interface is deleted.
    /// Idempotent: for an endpoint whose interface vanished (its namespace went)
    /// what is left of it is cleared.
    async fn detach_endpoint(&self, id: &str) -> Result<(), DatapathError>;

    /// The endpoints attached on this host (also those found at start-up).
    async fn local_endpoints(&self) -> Result<Vec<AttachedEndpoint>, DatapathError>;

    /// Adds or updates an endpoint of another host.
    async fn set_remote_endpoint(&self, ep: &RemoteEndpoint) -> Result<(), DatapathError>;

    /// Forgets an endpoint of another host.
    async fn remove_remote_endpoint(&self, addr: Ipv4Addr) -> Result<(), DatapathError>;

    /// The remote endpoints currently programmed.
    async fn remote_endpoints(&self) -> Result<Vec<RemoteEndpoint>, DatapathError>;

    /// A host this one reaches directly.
    async fn add_peer_host(&self, host: Ipv4Addr) -> Result<(), DatapathError>;

    /// A host reached through `via` (a relay, in a partial mesh).
    async fn set_next_hop(&self, host: Ipv4Addr, via: Ipv4Addr) -> Result<(), DatapathError>;

    /// A host no longer reachable: traffic to its endpoints is dropped (counted).
    async fn remove_peer_host(&self, host: Ipv4Addr) -> Result<(), DatapathError>;

    /// The hosts programmed, with their next hops.
    async fn peer_hosts(&self) -> Result<BTreeMap<Ipv4Addr, Ipv4Addr>, DatapathError>;

    /// Sets the broadcast trees: per origin host (`0.0.0.0` = this one), the hosts
    /// its multicast and broadcast packets are passed on to. Replaces all trees.
    async fn set_broadcast(&self, trees: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> Result<(), DatapathError>;

    /// Counters since the data path was created (they survive agent restarts).
    async fn stats(&self) -> Result<Stats, DatapathError>;

    /// Removes everything this host's data path made (endpoints, devices,
    /// kernel state): `weft reset`.
    async fn reset(&self) -> Result<(), DatapathError>;
}

/// The MAC weft gives an endpoint with address `addr`: `0a:58` + the address, as
/// Kubernetes does: locally administered, unicast, and the same address always
/// gets the same MAC (stale ARP caches heal themselves).
pub fn mac_for(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn serialize_mac<S: serde::Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_mac(mac))
}

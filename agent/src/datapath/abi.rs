//! Rust mirrors of `ebpf/lib/abi.h` and `ebpf/lib/drop_reasons.h`: the only
//! structures shared with the kernel programs. Sizes are asserted here and in C, so
//! a field added on one side only fails the build.
#![expect(unsafe_code, reason = "aya::Pod impls for the #[repr(C)] ABI structs")]

use std::net::Ipv4Addr;

/// `WEFT_ABI_VERSION`: pins created by another ABI are replaced, never adopted.
pub const ABI_VERSION: u32 = 2;

/// `WEFT_EP_LOCAL`: the endpoint lives on this host.
pub const EP_LOCAL: u16 = 0x1;
/// `WEFT_EP_HOST_NS`: local, with its veth peer in the host's own netns.
pub const EP_HOST_NS: u16 = 0x2;
/// `WEFT_EP_LEARNED`: remote, learned by the data path from a packet before the
/// agent announced it (see `learn_remote` in ebpf/lib/common.h).
pub const EP_LEARNED: u16 = 0x4;

/// `WEFT_MAX_ENDPOINTS`.
pub const MAX_ENDPOINTS: u32 = 65536;
/// `WEFT_MAX_PEERS`.
pub const MAX_PEERS: u32 = 4096;
/// `WEFT_MAX_UNDERLAY_IPS`.
pub const MAX_UNDERLAY_IPS: u32 = 64;
/// `WEFT_MAX_LOCAL`: local endpoints that receive multicast.
pub const MAX_LOCAL: u32 = 256;
/// `WEFT_MAX_BCAST_FANOUT`: children per broadcast tree node.
pub const MAX_BCAST_FANOUT: usize = 31;

/// `struct weft_ip4`: an IPv4 address, octets in wire order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ip4 {
    pub octets: [u8; 4],
}

impl From<Ipv4Addr> for Ip4 {
    fn from(addr: Ipv4Addr) -> Self {
        Ip4 { octets: addr.octets() }
    }
}

impl From<Ip4> for Ipv4Addr {
    fn from(addr: Ip4) -> Self {
        Ipv4Addr::from(addr.octets)
    }
}

/// `struct weft_endpoint` (ENDPOINTS value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub ifindex: u32,
    pub host: Ip4,
    pub mac: [u8; 6],
    pub flags: u16,
}

/// `struct weft_peer` (PEERS value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub next_hop: Ip4,
    /// Underlay device towards `next_hop` for in-program encapsulation; 0 = the
    /// VXLAN device.
    pub ifindex: u32,
    /// Our address on that device (the outer source).
    pub src: Ip4,
    pub flags: u32,
}

/// `struct weft_config` (`CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub abi_version: u32,
    pub vni: u32,
    pub local_ip: Ip4,
    pub vxlan_ifindex: u32,
    /// Network byte order, as the programs compare it with the UDP header.
    pub vxlan_port_be: u16,
    pub flags: u16,
    pub _pad: u32,
}

/// `struct weft_local` (LOCAL_EPS value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Local {
    pub ifindex: u32,
    pub flags: u32,
}

/// `struct weft_bcast` (BCAST value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bcast {
    pub count: u32,
    pub hosts: [Ip4; MAX_BCAST_FANOUT],
}

/// `struct weft_counter` (COUNTERS value, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(size_of::<Ip4>() == 4);
const _: () = assert!(size_of::<Endpoint>() == 16);
const _: () = assert!(size_of::<Peer>() == 16);
const _: () = assert!(size_of::<Config>() == 24);
const _: () = assert!(size_of::<Counter>() == 16);
const _: () = assert!(size_of::<Local>() == 8);
const _: () = assert!(size_of::<Bcast>() == 4 + 4 * MAX_BCAST_FANOUT);

// SAFETY: #[repr(C)], only integer fields, no padding (sizes asserted above).
unsafe impl aya::Pod for Ip4 {}
// SAFETY: as above.
unsafe impl aya::Pod for Endpoint {}
// SAFETY: as above.
unsafe impl aya::Pod for Peer {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for Counter {}
// SAFETY: as above.
unsafe impl aya::Pod for Local {}
// SAFETY: as above.
unsafe impl aya::Pod for Bcast {}

/// COUNTERS indexes of the paths (`WEFT_CNT_*`), with the names the agent shows.
pub const PATHS: &[(u32, &str)] = &[
    (0, "arp_reply"),
    (1, "local"),
    (2, "encap"),
    (3, "decap"),
    (4, "relay"),
    (5, "pass"),
    (6, "bcast"),
];

/// `WEFT_CNT_DROP_BASE`: drop reason `r` (negative) is counted at `DROP_BASE - r`.
pub const DROP_BASE: u32 = 16;
/// `WEFT_CNT_MAX`.
pub const COUNTER_SLOTS: u32 = 48;

/// `DROP_*` codes of `drop_reasons.h`, positive, with the names the agent shows.
pub const DROP_REASONS: &[(u32, &str)] = &[
    (1, "malformed"),
    (2, "unsupported_protocol"),
    (3, "unknown_destination"),
    (4, "no_route_to_host"),
    (5, "arp_unknown_target"),
    (6, "arp_ignored"),
    (7, "wrong_vni"),
    (8, "no_tunnel_metadata"),
    (9, "ttl_exceeded"),
    (10, "encap_failed"),
    (11, "multicast_unsupported"),
];

/// The name of drop reason `code` (positive).
pub fn drop_reason_name(code: u32) -> &'static str {
    DROP_REASONS.iter().find(|(c, _)| *c == code).map_or("unknown", |(_, n)| n)
}

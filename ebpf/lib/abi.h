/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ONLY structs and constants shared between the kernel programs and the agent.
 * Every struct has explicit padding, no bool or enum, and a size asserted here and
 * mirrored (with the same assertion) in agent/src/datapath/abi.rs.
 * Change anything here => bump WEFT_ABI_VERSION: a restarted agent that finds pins
 * with another ABI version replaces them instead of adopting them.
 */
#ifndef WEFT_ABI_H
#define WEFT_ABI_H

#include <linux/types.h>

#define WEFT_ABI_VERSION 2

/* Map sizes: the agent refuses to attach more than these. */
#define WEFT_MAX_ENDPOINTS 65536
#define WEFT_MAX_PEERS 4096
#define WEFT_MAX_UNDERLAY_IPS 64
#define WEFT_MAX_LOCAL 256        /* local endpoints that receive multicast */
#define WEFT_MAX_BCAST_FANOUT 31  /* children per broadcast tree node */
#define WEFT_BCAST_TTL 16         /* hops a multicast may take: ends transient loops */


/* An IPv4 address as `bpftool map dump` shows it: four octets in wire order.
 * The programs read and write it as one __be32 (ip4_get/ip4_set in common.h). */
struct weft_ip4 {
	__u8 octets[4];
};

/* ENDPOINTS value, keyed by the endpoint's overlay IPv4 address (struct weft_ip4). */
struct weft_endpoint {
	__u32 ifindex; /* local: ifindex of the host-side veth; remote: 0 */
	struct weft_ip4 host; /* remote: underlay IPv4 of the owning host; local: 0.0.0.0 */
	__u8 mac[6];   /* the endpoint's MAC, used to answer ARP */
	__u16 flags;   /* WEFT_EP_* */
};
_Static_assert(sizeof(struct weft_endpoint) == 16, "weft_endpoint ABI");

/* The endpoint lives on this host. */
#define WEFT_EP_LOCAL 0x1
/* Local, but its veth peer sits in the host's own netns (the host's overlay address):
 * bpf_redirect_peer() only crosses netns, so deliver with bpf_redirect() to egress. */
#define WEFT_EP_HOST_NS 0x2
/* Remote, learned by the data path from a packet that came from that host before
 * the agent's announcement arrived; the announcement replaces it. */
#define WEFT_EP_LEARNED 0x4

/* PEERS value, keyed by a remote host's underlay IPv4 (struct weft_ip4). */
struct weft_peer {
	struct weft_ip4 next_hop; /* underlay IPv4 the packet is sent to (== key unless relayed) */
	__u32 ifindex;            /* underlay device towards next_hop for in-program
				   * encapsulation; 0 = use the VXLAN device */
	struct weft_ip4 src;      /* our address on that device: the outer source */
	__u32 flags;              /* reserved, 0 */
};
_Static_assert(sizeof(struct weft_peer) == 16, "weft_peer ABI");

/* CONFIG[0]: per-host settings, written by the agent before any endpoint is attached. */
struct weft_config {
	__u32 abi_version;   /* WEFT_ABI_VERSION of the agent that created the pins */
	__u32 vni;           /* VXLAN network identifier (24 bits) */
	struct weft_ip4 local_ip; /* this host's main underlay IPv4 (informational) */
	__u32 vxlan_ifindex; /* the external-mode VXLAN device */
	__u16 vxlan_port;    /* UDP destination port (network order) */
	__u16 flags;         /* reserved, 0 */
	__u32 _pad;
};
_Static_assert(sizeof(struct weft_config) == 24, "weft_config ABI");

/* LOCAL_EPS value: a local endpoint multicast and broadcast are copied to
 * (ifindex 0 = free slot). */
struct weft_local {
	__u32 ifindex; /* host-side veth */
	__u32 flags;   /* WEFT_EP_* */
};
_Static_assert(sizeof(struct weft_local) == 8, "weft_local ABI");

/* BCAST value, keyed by the broadcast's origin host (0.0.0.0 = this host): the
 * hosts (PEERS keys) a multicast or broadcast packet from that origin is passed
 * on to, i.e. this host's children in the origin's broadcast tree. */
struct weft_bcast {
	__u32 count;
	struct weft_ip4 hosts[WEFT_MAX_BCAST_FANOUT];
};

/* COUNTERS value (per CPU). */
struct weft_counter {
	__u64 packets; /* wire packets: a GSO skb counts as its segments */
	__u64 bytes;
};
_Static_assert(sizeof(struct weft_counter) == 16, "weft_counter ABI");

/* COUNTERS indexes for the paths a packet can take. */
#define WEFT_CNT_ARP_REPLY 0   /* ARP request answered from ENDPOINTS */
#define WEFT_CNT_LOCAL 1       /* endpoint -> endpoint on this host */
#define WEFT_CNT_ENCAP 2       /* endpoint -> remote host */
#define WEFT_CNT_DECAP 3       /* remote host -> endpoint on this host */
#define WEFT_CNT_RELAY 4       /* remote host -> another remote host (partial mesh) */
#define WEFT_CNT_PASS 5        /* handed to the host's stack (not ours, or the VXLAN fallback) */
#define WEFT_CNT_BCAST 6       /* multicast/broadcast replicated (counted once per packet) */
#define WEFT_CNT_PATHS 16
/* Drops are counted at WEFT_CNT_DROP_BASE + (-reason), reasons in drop_reasons.h. */
#define WEFT_CNT_DROP_BASE 16
#define WEFT_CNT_MAX 48

#endif

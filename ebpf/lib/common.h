/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Helpers shared by every attach point: parsing, the endpoint lookups, delivery to a
 * local endpoint, sending to a remote host (through the VXLAN device, or encapsulated
 * in the program itself), and the single exit path that counts and redirects.
 *
 * Handlers never call a redirect helper themselves: they fill a struct weft_fwd and
 * return TC_ACT_REDIRECT (or a negative DROP_* code, or TC_ACT_OK). weft_finish()
 * acts on it. That keeps the decision inspectable: ebpf/tests/probe.c calls the same
 * handlers and records the decision for the PROG_TEST_RUN tests.
 */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "compat.h"
#include "abi.h"
#include "drop_reasons.h"
#include "maps.h"

#define __weft_inline static __always_inline

/* How weft_finish() hands a packet on. */
#define FWD_PEER 1   /* bpf_redirect_peer(): into the veth peer in another netns */
#define FWD_EGRESS 2 /* bpf_redirect(): out of a device (VXLAN, or back to the sender) */
#define FWD_NEIGH 3  /* bpf_redirect_neigh(): out of the underlay, L2 resolved by the kernel */

/* Handler verdict: not overlay traffic; let the next TCX program (or the stack) have it. */
#define WEFT_NEXT 0x1000
/* Handler verdict: copies went out (multicast); the original is done with. */
#define WEFT_CONSUMED 0x1001

struct weft_fwd {
	__u32 how;     /* FWD_* */
	__u32 ifindex; /* where to */
	__u32 counter; /* WEFT_CNT_* path to count it under */
};

/* Outer headers added by in-program VXLAN encapsulation: IPv4 + UDP + VXLAN + inner Ethernet. */
#define WEFT_ENCAP_LEN (sizeof(struct iphdr) + sizeof(struct udphdr) + sizeof(struct weft_vxlanhdr) + ETH_HLEN)
#define WEFT_OUTER_TTL 64
#define IP_MF_OFFSET_MASK 0x3fff

__weft_inline __be32 ip4_get(const struct weft_ip4 *a)
{
	__be32 v;
	__builtin_memcpy(&v, a, sizeof(v));
	return v;
}

__weft_inline const struct weft_config *weft_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&CONFIG, &zero);
}

__weft_inline const struct weft_endpoint *lookup_endpoint(__be32 addr)
{
	return bpf_map_lookup_elem(&ENDPOINTS, &addr);
}

__weft_inline void count(__u32 idx, __u32 segs, __u32 bytes)
{
	struct weft_counter *c = bpf_map_lookup_elem(&COUNTERS, &idx);

	if (c) {
		c->packets += segs ? segs : 1;
		c->bytes += bytes;
	}
}

/*
 * The one exit path. `ret` is a handler's verdict; segs/len are the packet as it
 * arrived (so a counter shows the traffic, not our headers).
 */
__weft_inline int weft_finish(int ret, const struct weft_fwd *fwd, __u32 segs, __u32 len)
{
	if (ret < 0) {
		__u32 reason = -ret;

		if (reason > DROP_REASON_MAX)
			reason = -DROP_MALFORMED;
		count(WEFT_CNT_DROP_BASE + reason, segs, len);
		return TC_ACT_SHOT;
	}
	if (ret == WEFT_NEXT)
		return TC_ACT_UNSPEC; /* == TCX_NEXT */
	if (ret == WEFT_CONSUMED) {
		count(fwd->counter, segs, len);
		return TC_ACT_SHOT;
	}
	if (ret == TC_ACT_OK) {
		count(WEFT_CNT_PASS, segs, len);
		return TC_ACT_OK;
	}
	if (ret != TC_ACT_REDIRECT)
		return ret;
	count(fwd->counter, segs, len);
	switch (fwd->how) {
	case FWD_PEER:
		return bpf_redirect_peer(fwd->ifindex, 0);
	case FWD_EGRESS:
		return bpf_redirect(fwd->ifindex, 0);
	case FWD_NEIGH:
		return bpf_redirect_neigh(fwd->ifindex, NULL, 0, 0);
	}
	return TC_ACT_SHOT;
}

/* A local endpoint: straight into its netns (or out of its veth, for the host's own). */
__weft_inline int deliver_local(const struct weft_endpoint *ep, struct weft_fwd *fwd, __u32 counter)
{
	fwd->how = (ep->flags & WEFT_EP_HOST_NS) ? FWD_EGRESS : FWD_PEER;
	fwd->ifindex = ep->ifindex;
	fwd->counter = counter;
	return TC_ACT_REDIRECT;
}

__weft_inline __u16 csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

__weft_inline __u16 ipv4_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma clang loop unroll(full)
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return csum_fold(sum);
}

/*
 * Encapsulate in the program: grow the packet by WEFT_ENCAP_LEN right after its
 * Ethernet header and write outer IPv4/UDP/VXLAN plus the original Ethernet header
 * as the inner one. The ENCAP flags mark the skb as a UDP tunnel packet, so a GSO
 * super-packet stays one skb until the underlay device (or software GSO) segments
 * it. FIXED_GSO keeps the inner MSS: the endpoint's MTU already leaves room for the
 * outer headers. The outer MACs are filled by bpf_redirect_neigh().
 */
__weft_inline int encap_direct(struct __sk_buff *skb, const struct weft_config *cfg,
			       const struct weft_peer *peer, struct weft_fwd *fwd, __u32 counter)
{
	struct {
		struct iphdr ip;
		struct udphdr udp;
		struct weft_vxlanhdr vx;
		struct ethhdr eth;
	} __attribute__((packed)) h;
	struct iphdr ip = {};
	__u32 hash, len;
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
		      BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
		      BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);

	if (bpf_skb_load_bytes(skb, 0, &h.eth, ETH_HLEN) < 0)
		return DROP_MALFORMED;
	/* Source port from the inner flow, like the kernel's VXLAN: spreads flows over
	 * the underlay's ECMP paths and the receiver's RSS queues. */
	hash = bpf_get_hash_recalc(skb);
	if (bpf_skb_adjust_room(skb, WEFT_ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0)
		return DROP_ENCAP_FAILED;
	len = skb->len - ETH_HLEN;

	ip.version = 4;
	ip.ihl = 5;
	ip.tot_len = bpf_htons(len > 0xffff ? 0xffff : len);
	ip.ttl = WEFT_OUTER_TTL;
	ip.protocol = IPPROTO_UDP;
	ip.saddr = ip4_get(&peer->src);
	ip.daddr = ip4_get(&peer->next_hop);
	ip.check = ipv4_csum(&ip);
	h.ip = ip;
	h.udp.source = bpf_htons(0xc000 | ((hash ^ (hash >> 16)) & 0x3fff));
	h.udp.dest = cfg->vxlan_port;
	h.udp.len = bpf_htons((len - sizeof(struct iphdr)) & 0xffff);
	h.udp.check = 0; /* optional for IPv4; the kernel's VXLAN default too */
	h.vx.flags = bpf_htonl(WEFT_VXLAN_FLAG_VNI);
	h.vx.vni = bpf_htonl(cfg->vni << 8);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) < 0)
		return DROP_ENCAP_FAILED;

	fwd->how = FWD_NEIGH;
	fwd->ifindex = peer->ifindex;
	fwd->counter = counter;
	return TC_ACT_REDIRECT;
}

/* To a remote host: look up how to reach it, then encapsulate. */
__weft_inline int to_host(struct __sk_buff *skb, const struct weft_endpoint *ep,
			  struct weft_fwd *fwd, __u32 counter)
{
	const struct weft_config *cfg = weft_config();
	const struct weft_peer *peer = bpf_map_lookup_elem(&PEERS, &ep->host);
	struct bpf_tunnel_key key = {};

	if (!peer)
		return DROP_NO_PEER;
	if (!cfg)
		return DROP_NO_PEER;
	if (peer->ifindex)
		return encap_direct(skb, cfg, peer, fwd, counter);

	key.remote_ipv4 = bpf_ntohl(ip4_get(&peer->next_hop));
	key.tunnel_id = cfg->vni;
	key.tunnel_ttl = WEFT_OUTER_TTL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return DROP_ENCAP_FAILED;
	fwd->how = FWD_EGRESS;
	fwd->ifindex = cfg->vxlan_ifindex;
	fwd->counter = counter;
	return TC_ACT_REDIRECT;
}

/*
 * A relay is a routing hop: decrement the inner TTL so that hosts whose routes
 * briefly disagree cannot bounce a packet forever.
 */
__weft_inline int relay_dec_ttl(struct __sk_buff *skb, __u32 ip_off)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ip_off;
	__be16 old, new;

	if ((void *)(ip + 1) > data_end)
		return DROP_MALFORMED;
	if (ip->ttl <= 1)
		return DROP_TTL_EXCEEDED;
	old = *(__be16 *)&ip->ttl;
	ip->ttl--;
	new = *(__be16 *)&ip->ttl;
	if (bpf_l3_csum_replace(skb, ip_off + offsetof(struct iphdr, check), old, new, sizeof(new)) < 0)
		return DROP_MALFORMED;
	return 0;
}

/*
 * A packet for a local endpoint came from host `from` (outer source, network
 * order) with an overlay source address this host does not know yet: the new
 * container's announcement is still on its way (gossip takes milliseconds, its
 * first SYN does not wait). Remember where it lives so the answer (and the ARP
 * before it) goes out at once instead of being dropped until TCP retries a
 * second later. Only from hosts we peer with; never over an existing entry.
 */
__weft_inline void learn_remote(__be32 src, const __u8 *src_mac, __be32 from)
{
	struct weft_endpoint ep = {};

	if (lookup_endpoint(src) || !bpf_map_lookup_elem(&PEERS, &from))
		return;
	__builtin_memcpy(&ep.host, &from, sizeof(from));
	__builtin_memcpy(ep.mac, src_mac, ETH_ALEN);
	ep.flags = WEFT_EP_LEARNED;
	bpf_map_update_elem(&ENDPOINTS, &src, &ep, BPF_NOEXIST);
}

/*
 * An IPv4 packet that arrived from the overlay (already decapsulated, Ethernet
 * first): deliver it to a local endpoint or relay it towards its host. `from`:
 * the outer source address (network order).
 */
__weft_inline int from_overlay_ipv4(struct __sk_buff *skb, struct weft_fwd *fwd, __be32 from)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	const struct weft_endpoint *ep;
	int ret;

	if ((void *)(ip + 1) > data_end)
		return DROP_MALFORMED;
	ep = lookup_endpoint(ip->daddr);
	if (!ep)
		return DROP_UNKNOWN_DST;
	if (ep->flags & WEFT_EP_LOCAL) {
		learn_remote(ip->saddr, eth->h_source, from);
		return deliver_local(ep, fwd, WEFT_CNT_DECAP);
	}
	ret = relay_dec_ttl(skb, ETH_HLEN);
	if (ret < 0)
		return ret;
	return to_host(skb, ep, fwd, WEFT_CNT_RELAY);
}

#endif

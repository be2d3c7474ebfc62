// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Underlay program: TC ingress (TCX) of the underlay interface, direct mode only.
 * VXLAN packets addressed to this host on our port and VNI are decapsulated right
 * here and go straight into the endpoint's netns, skipping the UDP socket, the VXLAN
 * device and its GRO cells; packets to relay get a new outer header and go back out.
 * The host's own traffic is not touched (TCX_NEXT), and a VXLAN packet this program
 * does not finish (inner ARP, unknown destination, relay without a direct route)
 * continues to the VXLAN device, whose program (overlay.c) decides and counts.
 */
#include "lib/common.h"

struct weft_outer {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
	struct weft_vxlanhdr vx;
	struct ethhdr inner_eth;
	struct iphdr inner_ip;
} __attribute__((packed));

#define INNER_ETH_OFF (ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr) + sizeof(struct weft_vxlanhdr))
#define INNER_IP_OFF (INNER_ETH_OFF + ETH_HLEN)

/* Relay: point the outer header at the next hop, from us. */
__weft_inline int underlay_relay(struct __sk_buff *skb, const struct weft_peer *peer, struct weft_fwd *fwd)
{
	struct iphdr ip;
	__be16 zero = 0;
	int ret = relay_dec_ttl(skb, INNER_IP_OFF);

	if (ret < 0)
		return ret;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return DROP_MALFORMED;
	ip.saddr = ip4_get(&peer->src);
	ip.daddr = ip4_get(&peer->next_hop);
	ip.ttl = WEFT_OUTER_TTL;
	ip.check = 0;
	ip.check = ipv4_csum(&ip);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip) + offsetof(struct udphdr, check), &zero,
				sizeof(zero), 0) < 0)
		return DROP_ENCAP_FAILED;
	fwd->how = FWD_NEIGH;
	fwd->ifindex = peer->ifindex;
	fwd->counter = WEFT_CNT_RELAY;
	return TC_ACT_REDIRECT;
}

__weft_inline int underlay_handle(struct __sk_buff *skb, struct weft_fwd *fwd)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const struct weft_config *cfg = weft_config();
	struct weft_outer *o = data;
	const struct weft_endpoint *ep;
	const struct weft_peer *peer;
	__u8 macs[2 * ETH_ALEN];

	if (!cfg)
		return WEFT_NEXT;
	if ((void *)(o + 1) > data_end)
		return WEFT_NEXT;
	if (o->eth.h_proto != bpf_htons(ETH_P_IP) || o->ip.ihl != 5 || o->ip.protocol != IPPROTO_UDP ||
	    (o->ip.frag_off & bpf_htons(IP_MF_OFFSET_MASK)) || o->udp.dest != cfg->vxlan_port)
		return WEFT_NEXT;
	/* Only for this host: a router forwarding someone else's VXLAN keeps doing so. */
	if (!bpf_map_lookup_elem(&UNDERLAY_IPS, &o->ip.daddr))
		return WEFT_NEXT;
	if (o->vx.flags != bpf_htonl(WEFT_VXLAN_FLAG_VNI) || o->vx.vni != bpf_htonl(cfg->vni << 8))
		return WEFT_NEXT; /* another VXLAN network on this host: the stack's */
	/* From here on it is ours; what we do not finish goes to the VXLAN device. */
	if (o->inner_eth.h_proto != bpf_htons(ETH_P_IP) || o->inner_ip.ihl < 5)
		return TC_ACT_OK;
	ep = lookup_endpoint(o->inner_ip.daddr);
	if (!ep)
		return TC_ACT_OK;
	if (!(ep->flags & WEFT_EP_LOCAL)) {
		peer = bpf_map_lookup_elem(&PEERS, &ep->host);
		if (!peer || !peer->ifindex)
			return TC_ACT_OK;
		return underlay_relay(skb, peer, fwd);
	}
	/* Keep the inner MACs, so the endpoint sees the frame its peer sent. Copied to
	 * the stack first: storing may reallocate the packet under a packet pointer. */
	__builtin_memcpy(macs, &o->inner_eth, sizeof(macs));
	learn_remote(o->inner_ip.saddr, macs + ETH_ALEN, o->ip.saddr);
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0)
		return DROP_MALFORMED;
	if (bpf_skb_adjust_room(skb, -(int)(INNER_IP_OFF - ETH_HLEN), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO) < 0)
		return DROP_MALFORMED;
	return deliver_local(ep, fwd, WEFT_CNT_DECAP);
}

#ifndef WEFT_NO_ENTRY
SEC("classifier")
int weft_underlay(struct __sk_buff *skb)
{
	struct weft_fwd fwd = {};
	__u32 segs = skb->gso_segs, len = skb->len;

	return weft_finish(underlay_handle(skb, &fwd), &fwd, segs, len);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
#endif

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Overlay program: TC ingress (TCX) of the host's external-mode VXLAN device, i.e.
 * every packet the kernel decapsulated for us. Delivered into the local endpoint's
 * netns, or relayed towards the destination's host when this host is a hop in a
 * partial mesh.
 */
#include "lib/common.h"
#include "lib/bcast.h"

/* Multicast from another host: to every local endpoint, then on down the
 * origin's tree (the origin is the host of the inner source address). */
__weft_inline int overlay_bcast(struct __sk_buff *skb, const struct weft_config *cfg,
				const struct bpf_tunnel_key *key, __be32 src, struct weft_fwd *fwd)
{
	const struct weft_endpoint *sender = lookup_endpoint(src);
	struct weft_ip4 origin;

	bcast_local(skb, 0);
	if (sender && !(sender->flags & WEFT_EP_LOCAL) && key->tunnel_ttl > 1) {
		origin = sender->host;
		bcast_remote(skb, cfg, &origin, key->tunnel_ttl - 1);
	}
	fwd->counter = WEFT_CNT_BCAST;
	return WEFT_CONSUMED;
}

__weft_inline int overlay_handle(struct __sk_buff *skb, struct weft_fwd *fwd)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const struct weft_config *cfg = weft_config();
	struct ethhdr *eth = data;
	struct bpf_tunnel_key key = {};

	if (!cfg)
		return DROP_BAD_VNI;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return DROP_NO_TUNNEL;
	if (key.tunnel_id != cfg->vni)
		return DROP_BAD_VNI;
	if ((void *)(eth + 1) > data_end)
		return DROP_MALFORMED;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return DROP_UNSUPPORTED;
	{
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return DROP_MALFORMED;
		if (is_multicast_or_broadcast(ip->daddr))
			return overlay_bcast(skb, cfg, &key, ip->saddr, fwd);
	}
	return from_overlay_ipv4(skb, fwd, bpf_htonl(key.remote_ipv4));
}

#ifndef WEFT_NO_ENTRY
SEC("classifier")
int weft_overlay(struct __sk_buff *skb)
{
	struct weft_fwd fwd = {};
	__u32 segs = skb->gso_segs, len = skb->len;

	return weft_finish(overlay_handle(skb, &fwd), &fwd, segs, len);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
#endif

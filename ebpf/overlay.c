// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Overlay program: TC ingress (TCX) of the host's external-mode VXLAN device, i.e.
 * every packet the kernel decapsulated for us. Delivered into the local endpoint's
 * netns, or relayed towards the destination's host when this host is a hop in a
 * partial mesh.
 */
#include "lib/common.h"

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
	return from_overlay_ipv4(skb, fwd);
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

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Endpoint program: TC ingress (TCX) of the host-side veth of every endpoint, i.e.
 * every packet a container sends. ARP is answered here; IPv4 goes straight into a
 * local endpoint's netns or out to the endpoint's host; multicast and broadcast
 * are replicated (lib/bcast.h); anything else is dropped.
 */
#include "lib/common.h"
#include "lib/arp.h"
#include "lib/bcast.h"

/* Multicast or broadcast from a local endpoint: to the other local endpoints
 * and down this host's broadcast tree. */
__weft_inline int endpoint_bcast(struct __sk_buff *skb, struct weft_fwd *fwd)
{
	const struct weft_config *cfg = weft_config();
	const struct weft_ip4 self = {};

	if (!cfg)
		return DROP_MULTICAST;
	bcast_local(skb, skb->ifindex);
	bcast_remote(skb, cfg, &self, WEFT_BCAST_TTL);
	fwd->counter = WEFT_CNT_BCAST;
	return WEFT_CONSUMED;
}

__weft_inline int endpoint_ipv4(struct __sk_buff *skb, struct weft_fwd *fwd)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	const struct weft_endpoint *ep;

	if ((void *)(ip + 1) > data_end || ip->ihl < 5)
		return DROP_MALFORMED;
	if (is_multicast_or_broadcast(ip->daddr))
		return endpoint_bcast(skb, fwd);
	ep = lookup_endpoint(ip->daddr);
	if (!ep)
		return DROP_UNKNOWN_DST;
	if (ep->flags & WEFT_EP_LOCAL)
		return deliver_local(ep, fwd, WEFT_CNT_LOCAL);
	return to_host(skb, ep, fwd, WEFT_CNT_ENCAP);
}

__weft_inline int endpoint_handle(struct __sk_buff *skb, struct weft_fwd *fwd)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return DROP_MALFORMED;
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP):
		return endpoint_ipv4(skb, fwd);
	case bpf_htons(ETH_P_ARP):
		return arp_respond(skb, fwd);
	}
	return DROP_UNSUPPORTED;
}

#ifndef WEFT_NO_ENTRY
SEC("classifier")
int weft_endpoint(struct __sk_buff *skb)
{
	struct weft_fwd fwd = {};
	__u32 segs = skb->gso_segs, len = skb->len;

	return weft_finish(endpoint_handle(skb, &fwd), &fwd, segs, len);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
#endif

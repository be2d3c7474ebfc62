/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ARP answered from ENDPOINTS, so no ARP request ever crosses the network: the
 * request is turned into the reply in place and sent back out of the veth it came in.
 */
#ifndef WEFT_ARP_H
#define WEFT_ARP_H

#include "common.h"

__weft_inline int arp_respond(struct __sk_buff *skb, struct weft_fwd *fwd)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct weft_arphdr *arp = (void *)(eth + 1);
	const struct weft_endpoint *ep;
	__u8 mac[ETH_ALEN];
	__be32 sip, tip;

	if ((void *)(arp + 1) > data_end)
		return DROP_MALFORMED;
	if (arp->ar_hrd != bpf_htons(WEFT_ARPHRD_ETHER) || arp->ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->ar_hln != ETH_ALEN || arp->ar_pln != 4 || arp->ar_op != bpf_htons(WEFT_ARPOP_REQUEST))
		return DROP_ARP_IGNORED;
	sip = arp->ar_sip;
	tip = arp->ar_tip;
	/* Gratuitous ARP announces, it does not ask. */
	if (sip == tip)
		return DROP_ARP_IGNORED;
	ep = lookup_endpoint(tip);
	if (!ep)
		return DROP_ARP_UNKNOWN;
	/* A duplicate-address probe for the asker's own address must stay unanswered. */
	if ((ep->flags & WEFT_EP_LOCAL) && ep->ifindex == skb->ifindex)
		return DROP_ARP_IGNORED;
	__builtin_memcpy(mac, ep->mac, ETH_ALEN);

	__builtin_memcpy(eth->h_dest, arp->ar_sha, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	arp->ar_op = bpf_htons(WEFT_ARPOP_REPLY);
	__builtin_memcpy(arp->ar_tha, arp->ar_sha, ETH_ALEN);
	arp->ar_tip = sip;
	__builtin_memcpy(arp->ar_sha, mac, ETH_ALEN);
	arp->ar_sip = tip;

	fwd->how = FWD_EGRESS;
	fwd->ifindex = skb->ifindex;
	fwd->counter = WEFT_CNT_ARP_REPLY;
	return TC_ACT_REDIRECT;
}

#endif

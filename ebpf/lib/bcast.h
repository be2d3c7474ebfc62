/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Multicast and broadcast: replicated in the kernel. A copy goes to every local
 * endpoint (but the sender), and one per child host in the origin's broadcast
 * tree, through the VXLAN device with a tunnel key per copy. The tree comes from
 * the mesh's routes, so every host passes a packet on to the hosts below it and
 * each host gets it once; the tunnel TTL (WEFT_BCAST_TTL hops) ends any loop that
 * disagreeing trees could make while the topology converges.
 */
#ifndef WEFT_BCAST_H
#define WEFT_BCAST_H

#include "common.h"

__weft_inline int is_multicast_or_broadcast(__be32 addr)
{
	return (bpf_ntohl(addr) & 0xf0000000) == 0xe0000000 || addr == 0xffffffff;
}

/* A copy to every local endpoint but the one on `except`. */
__weft_inline void bcast_local(struct __sk_buff *skb, __u32 except)
{
	for (__u32 i = 0; i < WEFT_MAX_LOCAL; i++) {
		__u32 slot = i;
		const struct weft_local *l = bpf_map_lookup_elem(&LOCAL_EPS, &slot);

		if (!l || !l->ifindex || l->ifindex == except)
			continue;
		/* Out of the host-side veth: into the endpoint's netns. */
		bpf_clone_redirect(skb, l->ifindex, 0);
	}
}

/* A copy to each child host of `origin`'s tree, with `ttl` hops left. */
__weft_inline void bcast_remote(struct __sk_buff *skb, const struct weft_config *cfg,
				const struct weft_ip4 *origin, __u8 ttl)
{
	const struct weft_bcast *tree = bpf_map_lookup_elem(&BCAST, origin);

	if (!tree)
		return;
	for (__u32 i = 0; i < WEFT_MAX_BCAST_FANOUT; i++) {
		const struct weft_peer *peer;
		struct bpf_tunnel_key key = {};

		if (i >= tree->count)
			break;
		peer = bpf_map_lookup_elem(&PEERS, &tree->hosts[i]);
		if (!peer)
			continue;
		key.remote_ipv4 = bpf_ntohl(ip4_get(&peer->next_hop));
		key.tunnel_id = cfg->vni;
		key.tunnel_ttl = ttl;
		if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
			continue;
		bpf_clone_redirect(skb, cfg->vxlan_ifindex, 0);
	}
}

#endif

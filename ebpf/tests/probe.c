// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Test-only programs for the BPF_PROG_TEST_RUN tests (tests/src/bpf_unit.rs).
 *
 * PROG_TEST_RUN returns the verdict and the packet, but not where a redirect would
 * have gone or what tunnel metadata was attached. These probes call the very same
 * handlers the real programs call, then record the forwarding decision and the skb's
 * tunnel key in PROBE_OUT, and leave through the same exit path (so they count).
 * They share the pinned maps with the real programs.
 */
#define WEFT_NO_ENTRY
#include "../endpoint.c"
#include "../overlay.c"
#include "../underlay.c"

struct probe_out {
	__s32 verdict;     /* handler return: TC_ACT_* or DROP_* */
	__u32 how;         /* FWD_* */
	__u32 ifindex;
	__u32 counter;
	__u32 has_tunnel;  /* a tunnel key is attached to the skb */
	__u32 tunnel_id;
	__u32 tunnel_dst;  /* remote IPv4 the key sends to (host order, as bpf_tunnel_key) */
	__u32 tunnel_ttl;
};

/* Input for probe_overlay: the tunnel metadata the VXLAN device would have attached. */
struct probe_tunnel_in {
	__u32 tunnel_id;
	__u32 remote;
	__u32 ttl;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_out);
} PROBE_OUT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_tunnel_in);
} PROBE_IN SEC(".maps");

/* Records the decision, then takes the real exit path (counters, redirect helpers). */
static __always_inline int record(struct __sk_buff *skb, int verdict, const struct weft_fwd *fwd,
				  __u32 segs, __u32 len)
{
	__u32 zero = 0;
	struct probe_out *out = bpf_map_lookup_elem(&PROBE_OUT, &zero);
	struct bpf_tunnel_key key = {};

	if (!out)
		return TC_ACT_SHOT;
	out->verdict = verdict;
	out->how = fwd->how;
	out->ifindex = fwd->ifindex;
	out->counter = fwd->counter;
	/* A key set for transmit reads back with the destination in local_ipv4. */
	out->has_tunnel = bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0;
	out->tunnel_id = key.tunnel_id;
	out->tunnel_dst = key.local_ipv4;
	out->tunnel_ttl = key.tunnel_ttl;
	return weft_finish(verdict, fwd, segs, len);
}

SEC("classifier")
int probe_endpoint(struct __sk_buff *skb)
{
	struct weft_fwd fwd = {};
	__u32 segs = skb->gso_segs, len = skb->len;

	return record(skb, endpoint_handle(skb, &fwd), &fwd, segs, len);
}

SEC("classifier")
int probe_overlay(struct __sk_buff *skb)
{
	struct weft_fwd fwd = {};
	struct bpf_tunnel_key key = {};
	__u32 zero = 0;
	struct probe_tunnel_in *in = bpf_map_lookup_elem(&PROBE_IN, &zero);
	__u32 segs = skb->gso_segs, len = skb->len;

	if (!in)
		return TC_ACT_SHOT;
	/* What the VXLAN device attaches on receive: the remote as the key's source. */
	key.tunnel_id = in->tunnel_id;
	key.local_ipv4 = in->remote;
	key.tunnel_ttl = in->ttl;
	if (in->tunnel_id && bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return TC_ACT_SHOT;
	return record(skb, overlay_handle(skb, &fwd), &fwd, segs, len);
}

SEC("classifier")
int probe_underlay(struct __sk_buff *skb)
{
	struct weft_fwd fwd = {};
	__u32 segs = skb->gso_segs, len = skb->len;

	return record(skb, underlay_handle(skb, &fwd), &fwd, segs, len);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

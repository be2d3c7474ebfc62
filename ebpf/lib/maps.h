/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map the programs use. All are pinned by name under the per-host pin
 * directory (/sys/fs/bpf/weft/<host>/), so the objects of all attach points share
 * them and a restarted agent finds them again. Names are UPPER_CASE, <= 15 chars.
 */
#ifndef WEFT_MAPS_H
#define WEFT_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "abi.h"

/* Every overlay address this host can deliver to: local endpoints and remote ones. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_ENDPOINTS);
	__type(key, struct weft_ip4);
	__type(value, struct weft_endpoint);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ENDPOINTS SEC(".maps");

/* How to reach each remote host: directly, or through a relay (partial mesh). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_PEERS);
	__type(key, struct weft_ip4);
	__type(value, struct weft_peer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} PEERS SEC(".maps");

/* This host's addresses on the underlay devices that carry the underlay program:
 * a VXLAN packet for one of them is ours to decapsulate. Value: the device. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_UNDERLAY_IPS);
	__type(key, struct weft_ip4);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} UNDERLAY_IPS SEC(".maps");

/* Local endpoints that get a copy of multicast and broadcast packets. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, WEFT_MAX_LOCAL);
	__type(key, __u32);
	__type(value, struct weft_local);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} LOCAL_EPS SEC(".maps");

/* Broadcast trees: per origin host, the hosts to pass its multicast on to. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEFT_MAX_PEERS + 1);
	__type(key, struct weft_ip4);
	__type(value, struct weft_bcast);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} BCAST SEC(".maps");

/* One entry: this host's settings. An array lookup with a constant key is inlined
 * by the verifier into a plain load, so reading it per packet costs nothing, and
 * unlike load-time globals a restarted agent can read it back to adopt the pins. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weft_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CONFIG SEC(".maps");

/* Packets and bytes per path and per drop reason, per CPU (no atomics). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEFT_CNT_MAX);
	__type(key, __u32);
	__type(value, struct weft_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} COUNTERS SEC(".maps");

#endif

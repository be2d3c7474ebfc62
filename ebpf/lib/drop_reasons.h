/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Why a packet was dropped. Handlers return these (negative) codes; the one exit
 * path in common.h counts them at COUNTERS[WEFT_CNT_DROP_BASE - code].
 * Mirrored, with names, in agent/src/datapath/abi.rs (DropReason).
 */
#ifndef WEFT_DROP_REASONS_H
#define WEFT_DROP_REASONS_H

#define DROP_MALFORMED -1     /* too short or inconsistent headers */
#define DROP_UNSUPPORTED -2   /* not IPv4 or ARP (IPv6, LLDP, ...) */
#define DROP_UNKNOWN_DST -3   /* destination is not an endpoint of the overlay */
#define DROP_NO_PEER -4       /* destination's host has no route (not connected) */
#define DROP_ARP_UNKNOWN -5   /* ARP request for an address no endpoint has */
#define DROP_ARP_IGNORED -6   /* ARP that is not a request, gratuitous, or asks for itself */
#define DROP_BAD_VNI -7       /* VXLAN packet for another network */
#define DROP_NO_TUNNEL -8     /* packet on the VXLAN device without tunnel metadata */
#define DROP_TTL_EXCEEDED -9  /* relayed too often: routes disagree (transient loop) */
#define DROP_ENCAP_FAILED -10 /* the kernel refused to grow or write the packet */
#define DROP_MULTICAST -11    /* broadcast / multicast: not carried by the fast path */
#define DROP_REASON_MAX 11

#endif

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Definitions newer than the uapi headers of Debian 12's linux-libc-dev (6.1). */
#ifndef WEFT_COMPAT_H
#define WEFT_COMPAT_H

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7) /* Linux 6.3 */
#endif

/* <linux/if_arp.h> drags glibc in under -target bpf: the ARP header, Ethernet/IPv4 only. */
struct weft_arphdr {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
	__u8 ar_sha[6];
	__be32 ar_sip;
	__u8 ar_tha[6];
	__be32 ar_tip;
} __attribute__((packed));

#define WEFT_ARPHRD_ETHER 1
#define WEFT_ARPOP_REQUEST 1
#define WEFT_ARPOP_REPLY 2

struct weft_vxlanhdr {
	__be32 flags; /* 0x08000000: the VNI is valid */
	__be32 vni;   /* VNI << 8 */
};
#define WEFT_VXLAN_FLAG_VNI 0x08000000

#endif

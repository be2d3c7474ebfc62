//! BPF_PROG_TEST_RUN tests of the kernel programs, one per path: build a packet,
//! seed the maps, run the program, check the verdict, the packet, the counters and
//! (through ebpf/tests/probe.c) where the packet would have gone.
#![allow(unsafe_code, reason = "aya::Pod for the probe's result struct")]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use weft::datapath::abi::{self, Config, Endpoint, Ip4, Peer};
use weft::datapath::ebpf::{objects, read_stats};
use weft::datapath::{Stats, mac_for};
use weft_tests::{root_or_skip, unique};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCX_NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC, -1

const FWD_PEER: u32 = 1;
const FWD_EGRESS: u32 = 2;
const FWD_NEIGH: u32 = 3;

const VNI: u32 = 0x123456;
const PORT: u16 = 6784;
const VXLAN_IFINDEX: u32 = 77;
const LOOPBACK: u32 = 1;

const HOST_A: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1); // this host
const HOST_B: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const HOST_C: Ipv4Addr = Ipv4Addr::new(192, 168, 9, 3); // reached through B
const LOCAL_1: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 1);
const LOCAL_2: Ipv4Addr = Ipv4Addr::new(10, 32, 0, 2);
const REMOTE_B: Ipv4Addr = Ipv4Addr::new(10, 40, 0, 1);
const REMOTE_C: Ipv4Addr = Ipv4Addr::new(10, 44, 0, 1);

/// `struct probe_out` of ebpf/tests/probe.c.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ProbeOut {
    verdict: i32,
    how: u32,
    ifindex: u32,
    counter: u32,
    has_tunnel: u32,
    tunnel_id: u32,
    tunnel_dst: u32,
    tunnel_ttl: u32,
}
// SAFETY: repr(C), integers only, no padding.
unsafe impl aya::Pod for ProbeOut {}

/// `struct probe_tunnel_in`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ProbeIn {
    tunnel_id: u32,
    remote: u32,
    ttl: u32,
    _pad: u32,
}
// SAFETY: as above.
unsafe impl aya::Pod for ProbeIn {}

/// The real programs and the probes, sharing maps pinned in a private directory.
struct Bpf {
    pins: PathBuf,
    endpoint: SchedClassifier,
    overlay: SchedClassifier,
    underlay: SchedClassifier,
    probe: Ebpf,
}

impl Drop for Bpf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

fn load_prog(pins: &Path, object: &[u8], name: &str) -> SchedClassifier {
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(pins).load(object).expect("load object");
    let prog: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into().expect("classifier");
    prog.load().expect("verifier");
    let pin = pins.join(name);
    prog.pin(&pin).expect("pin");
    SchedClassifier::from_pin(&pin).expect("from pin")
}

impl Bpf {
    /// Loads everything and seeds the maps: this host is HOST_A with LOCAL_1 and
    /// LOCAL_2 (ifindex 41, 42); REMOTE_B lives on HOST_B, REMOTE_C on HOST_C,
    /// which is reached through HOST_B. `direct`: peers use in-program encap.
    fn new(direct: bool) -> Bpf {
        weft::datapath::ebpf::ensure_bpffs().expect("bpffs");
        let pins = Path::new("/sys/fs/bpf").join(unique("unit"));
        std::fs::create_dir_all(&pins).unwrap();
        let endpoint = load_prog(&pins, objects::ENDPOINT, "weft_endpoint");
        let overlay = load_prog(&pins, objects::OVERLAY, "weft_overlay");
        let underlay = load_prog(&pins, objects::UNDERLAY, "weft_underlay");
        let mut probe = EbpfLoader::new().default_map_pin_directory(&pins).load(objects::PROBE).expect("probe");
        for name in ["probe_endpoint", "probe_overlay", "probe_underlay"] {
            let prog: &mut SchedClassifier = probe.program_mut(name).unwrap().try_into().unwrap();
            prog.load().expect("probe verifier");
        }
        let bpf = Bpf { pins, endpoint, overlay, underlay, probe };

        let mut config: Array<MapData, Config> = Array::try_from(bpf.map("CONFIG")).unwrap();
        let cfg = Config {
            abi_version: abi::ABI_VERSION,
            vni: VNI,
            local_ip: HOST_A.into(),
            vxlan_ifindex: VXLAN_IFINDEX,
            vxlan_port_be: PORT.to_be(),
            flags: 0,
            _pad: 0,
        };
        config.set(0, cfg, 0).unwrap();
        let mut eps: HashMap<MapData, Ip4, Endpoint> = HashMap::try_from(bpf.map("ENDPOINTS")).unwrap();
        for (addr, ifindex) in [(LOCAL_1, 41), (LOCAL_2, 42)] {
            let ep = Endpoint { ifindex, host: Ip4::default(), mac: mac_for(addr), flags: abi::EP_LOCAL };
            eps.insert(Ip4::from(addr), ep, 0).unwrap();
        }
        for (addr, host) in [(REMOTE_B, HOST_B), (REMOTE_C, HOST_C)] {
            let ep = Endpoint { ifindex: 0, host: host.into(), mac: mac_for(addr), flags: 0 };
            eps.insert(Ip4::from(addr), ep, 0).unwrap();
        }
        let mut peers: HashMap<MapData, Ip4, Peer> = HashMap::try_from(bpf.map("PEERS")).unwrap();
        let ifindex = if direct { 5 } else { 0 };
        for (host, via) in [(HOST_B, HOST_B), (HOST_C, HOST_B)] {
            let peer = Peer { next_hop: via.into(), ifindex, src: HOST_A.into(), flags: 0 };
            peers.insert(Ip4::from(host), peer, 0).unwrap();
        }
        let mut ips: HashMap<MapData, Ip4, u32> = HashMap::try_from(bpf.map("UNDERLAY_IPS")).unwrap();
        ips.insert(Ip4::from(HOST_A), 5, 0).unwrap();
        bpf
    }

    fn map(&self, name: &str) -> Map {
        let data = MapData::from_pin(self.pins.join(name)).expect("pinned map");
        match name {
            "CONFIG" => Map::Array(data),
            "COUNTERS" => Map::PerCpuArray(data),
            _ => Map::HashMap(data),
        }
    }

    fn stats(&self) -> Stats {
        let counters: PerCpuArray<MapData, abi::Counter> = PerCpuArray::try_from(self.map("COUNTERS")).unwrap();
        read_stats(&counters).unwrap()
    }

    fn probe_prog(&mut self, name: &str) -> &mut SchedClassifier {
        self.probe.program_mut(name).unwrap().try_into().unwrap()
    }

    /// Runs a probe and returns its record.
    fn probe(&mut self, name: &str, packet: &[u8]) -> ProbeOut {
        let mut out = vec![0u8; packet.len() + 256];
        run(self.probe_prog(name), packet, &mut out);
        let map: Array<&MapData, ProbeOut> = Array::try_from(self.probe.map("PROBE_OUT").unwrap()).unwrap();
        map.get(&0, 0).unwrap()
    }

    fn set_tunnel_in(&mut self, tunnel: ProbeIn) {
        let mut map: Array<&mut MapData, ProbeIn> =
            Array::try_from(self.probe.map_mut("PROBE_IN").unwrap()).unwrap();
        map.set(0, tunnel, 0).unwrap();
    }
}

/// Runs `prog` on `packet`; returns the verdict and the packet afterwards.
fn run(prog: &SchedClassifier, packet: &[u8], out: &mut [u8]) -> (u32, usize) {
    let opts = TestRunOptions { data_in: Some(packet), data_out: Some(out), ..Default::default() };
    let result = prog.test_run(opts).expect("PROG_TEST_RUN");
    (result.return_value, result.data_size_out as usize)
}

fn run_prog(prog: &SchedClassifier, packet: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 256];
    let (verdict, len) = run(prog, packet, &mut out);
    out.truncate(len);
    (verdict, out)
}

// ---- packets ----

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];

fn eth(dst: [u8; 6], src: [u8; 6], proto: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src);
    p.extend_from_slice(&proto.to_be_bytes());
    p
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, proto, 0, 0];
    let len = (20 + payload.len()) as u16;
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An ICMP echo frame from `src` to `dst`.
fn frame(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    let icmp = [8u8, 0, 0xf7, 0xfe, 0, 1, 0, 0, b'w', b'e', b'f', b't'];
    let mut p = eth(mac_for(dst), mac_for(src), 0x0800);
    p.extend(ipv4(src, dst, 1, ttl, &icmp));
    p
}

fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut p = eth([0xff; 6], sender_mac, 0x0806);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&sender_mac);
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    p
}

/// `inner` wrapped in VXLAN from `src` to `dst` with `vni`.
fn vxlan(src: Ipv4Addr, dst: Ipv4Addr, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&PORT.to_be_bytes());
    udp.extend_from_slice(&((8 + 8 + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&0x0800_0000u32.to_be_bytes());
    udp.extend_from_slice(&(vni << 8).to_be_bytes());
    udp.extend_from_slice(inner);
    let mut p = eth([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2], 0x0800);
    p.extend(ipv4(src, dst, 17, 64, &udp));
    p
}

fn addr_at(p: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[off], p[off + 1], p[off + 2], p[off + 3])
}

// ---- tests ----

#[test]
fn arp_request_is_answered_from_the_endpoint_map() {
    if !root_or_skip("arp") {
        return;
    }
    let mut bpf = Bpf::new(false);
    let request = arp_request(MAC_A, LOCAL_1, REMOTE_B);
    let (verdict, reply) = run_prog(&bpf.endpoint, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(reply.len(), request.len());
    assert_eq!(&reply[0..6], &MAC_A, "reply goes to the asker");
    assert_eq!(&reply[6..12], &mac_for(REMOTE_B), "from the target's MAC");
    assert_eq!(&reply[20..22], &[0, 2], "ARP reply opcode");
    assert_eq!(&reply[22..28], &mac_for(REMOTE_B), "sender hardware address = answer");
    assert_eq!(addr_at(&reply, 28), REMOTE_B);
    assert_eq!(&reply[32..38], &MAC_A);
    assert_eq!(addr_at(&reply, 38), LOCAL_1);
    assert_eq!(bpf.stats().path("arp_reply"), 1);

    let out = bpf.probe("probe_endpoint", &request);
    assert_eq!((out.how, out.ifindex), (FWD_EGRESS, LOOPBACK), "back out of the veth it came in");
}

#[test]
fn arp_for_unknown_gratuitous_or_own_address_is_not_answered() {
    if !root_or_skip("arp_unknown") {
        return;
    }
    let bpf = Bpf::new(false);
    let (verdict, _) = run_prog(&bpf.endpoint, &arp_request(MAC_A, LOCAL_1, Ipv4Addr::new(10, 32, 9, 9)));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(bpf.stats().dropped("arp_unknown_target"), 1);
    let (verdict, _) = run_prog(&bpf.endpoint, &arp_request(MAC_A, LOCAL_1, LOCAL_1));
    assert_eq!(verdict, TC_ACT_SHOT, "gratuitous ARP is not answered");
    assert_eq!(bpf.stats().dropped("arp_ignored"), 1);
    assert_eq!(bpf.stats().path("arp_reply"), 0);
}

#[test]
fn local_destination_is_redirected_into_its_namespace() {
    if !root_or_skip("local") {
        return;
    }
    let mut bpf = Bpf::new(false);
    let packet = frame(LOCAL_1, LOCAL_2, 64);
    let (verdict, out) = run_prog(&bpf.endpoint, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, packet, "a local delivery does not touch the packet");
    assert_eq!(bpf.stats().path("local"), 1);
    let out = bpf.probe("probe_endpoint", &packet);
    assert_eq!((out.how, out.ifindex), (FWD_PEER, 42), "redirect_peer into LOCAL_2's veth peer");
}

#[test]
fn remote_destination_gets_the_right_tunnel_key() {
    if !root_or_skip("encap_device") {
        return;
    }
    let mut bpf = Bpf::new(false);
    let packet = frame(LOCAL_1, REMOTE_B, 64);
    let (verdict, out) = run_prog(&bpf.endpoint, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, packet, "the VXLAN device encapsulates, not the program");
    assert_eq!(bpf.stats().path("encap"), 1);
    let out = bpf.probe("probe_endpoint", &packet);
    assert_eq!((out.how, out.ifindex), (FWD_EGRESS, VXLAN_IFINDEX));
    assert_eq!(out.has_tunnel, 1);
    assert_eq!(out.tunnel_id, VNI);
    assert_eq!(Ipv4Addr::from(out.tunnel_dst), HOST_B);
    assert_eq!(out.tunnel_ttl, 64);
    // A destination behind a relay is sent to the relay.
    let out = bpf.probe("probe_endpoint", &frame(LOCAL_1, REMOTE_C, 64));
    assert_eq!(Ipv4Addr::from(out.tunnel_dst), HOST_B, "HOST_C is reached through HOST_B");
}

#[test]
fn remote_destination_is_encapsulated_in_the_program() {
    if !root_or_skip("encap_direct") {
        return;
    }
    let mut bpf = Bpf::new(true);
    let packet = frame(LOCAL_1, REMOTE_B, 64);
    let (verdict, out) = run_prog(&bpf.endpoint, &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), packet.len() + 50, "IPv4 + UDP + VXLAN + inner Ethernet");
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, out.len() - 14, "outer total length");
    assert_eq!(ip[8], 64, "outer TTL");
    assert_eq!(ip[9], 17, "UDP");
    assert_eq!(checksum(ip), 0, "outer header checksum is valid");
    assert_eq!(addr_at(ip, 12), HOST_A);
    assert_eq!(addr_at(ip, 16), HOST_B);
    let udp = &out[34..42];
    assert!(u16::from_be_bytes([udp[0], udp[1]]) >= 0xc000, "source port from the flow hash");
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), PORT);
    assert_eq!(u16::from_be_bytes([udp[4], udp[5]]) as usize, out.len() - 34);
    assert_eq!(&out[42..46], &[0x08, 0, 0, 0], "VNI-valid flag");
    assert_eq!(&out[46..50], &(VNI << 8).to_be_bytes());
    assert_eq!(&out[50..], &packet[..], "the original frame is the inner frame");
    assert_eq!(bpf.stats().path("encap"), 1);
    let out = bpf.probe("probe_endpoint", &packet);
    assert_eq!((out.how, out.ifindex), (FWD_NEIGH, 5), "out of the underlay device, L2 by the kernel");
    assert_eq!(out.has_tunnel, 0);
}

#[test]
fn overlay_relays_towards_the_next_hop() {
    if !root_or_skip("relay_device") {
        return;
    }
    let mut bpf = Bpf::new(false);
    bpf.set_tunnel_in(ProbeIn { tunnel_id: VNI, remote: u32::from(HOST_B), ttl: 60, _pad: 0 });
    // Arrived from HOST_B for REMOTE_C, whose host we reach through HOST_B... in
    // this map HOST_C's next hop is HOST_B: the relay re-encapsulates towards it.
    let packet = frame(LOCAL_1, REMOTE_C, 64);
    let out = bpf.probe("probe_overlay", &packet);
    assert_eq!(out.verdict, TC_ACT_REDIRECT as i32);
    assert_eq!((out.how, out.ifindex), (FWD_EGRESS, VXLAN_IFINDEX));
    assert_eq!(out.has_tunnel, 1);
    assert_eq!(out.tunnel_id, VNI);
    assert_eq!(Ipv4Addr::from(out.tunnel_dst), HOST_B);
    assert_eq!(bpf.stats().path("relay"), 1);

    // And a packet for a local endpoint is delivered.
    let out = bpf.probe("probe_overlay", &frame(REMOTE_B, LOCAL_2, 64));
    assert_eq!((out.verdict, out.how, out.ifindex), (TC_ACT_REDIRECT as i32, FWD_PEER, 42));
    assert_eq!(bpf.stats().path("decap"), 1);
}

#[test]
fn relay_decrements_ttl_and_drops_at_one() {
    if !root_or_skip("relay_ttl") {
        return;
    }
    let mut bpf = Bpf::new(true);
    let inner = frame(REMOTE_B, REMOTE_C, 9);
    let (verdict, out) = run_prog(&bpf.underlay, &vxlan(HOST_B, HOST_A, VNI, &inner));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(addr_at(&out, 14 + 12), HOST_A, "relayed from us");
    assert_eq!(addr_at(&out, 14 + 16), HOST_B, "to the next hop towards HOST_C");
    assert_eq!(checksum(&out[14..34]), 0, "outer checksum");
    let inner_ip = &out[64..84];
    assert_eq!(inner_ip[8], 8, "inner TTL decremented");
    assert_eq!(checksum(inner_ip), 0, "inner checksum updated");
    assert_eq!(bpf.stats().path("relay"), 1);
    let out = bpf.probe("probe_underlay", &vxlan(HOST_B, HOST_A, VNI, &inner));
    assert_eq!((out.how, out.ifindex), (FWD_NEIGH, 5));

    let (verdict, _) = run_prog(&bpf.underlay, &vxlan(HOST_B, HOST_A, VNI, &frame(REMOTE_B, REMOTE_C, 1)));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(bpf.stats().dropped("ttl_exceeded"), 1);
}

#[test]
fn underlay_decapsulates_straight_into_the_endpoint() {
    if !root_or_skip("decap_direct") {
        return;
    }
    let mut bpf = Bpf::new(true);
    let inner = frame(REMOTE_B, LOCAL_2, 64);
    let (verdict, out) = run_prog(&bpf.underlay, &vxlan(HOST_B, HOST_A, VNI, &inner));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, inner, "exactly the frame the sender sent");
    assert_eq!(bpf.stats().path("decap"), 1);
    let out = bpf.probe("probe_underlay", &vxlan(HOST_B, HOST_A, VNI, &inner));
    assert_eq!((out.how, out.ifindex), (FWD_PEER, 42));
}

#[test]
fn underlay_leaves_other_traffic_alone() {
    if !root_or_skip("underlay_other") {
        return;
    }
    let bpf = Bpf::new(true);
    let inner = frame(REMOTE_B, LOCAL_2, 64);
    for (what, packet) in [
        ("another VNI", vxlan(HOST_B, HOST_A, VNI + 1, &inner)),
        ("not addressed to this host", vxlan(HOST_B, Ipv4Addr::new(192, 168, 0, 99), VNI, &inner)),
        ("plain host traffic", frame(HOST_B, HOST_A, 64)),
        ("a runt", vec![0u8; 20]),
    ] {
        let (verdict, out) = run_prog(&bpf.underlay, &packet);
        assert_eq!(verdict, TCX_NEXT, "{what}: next program / the stack");
        assert_eq!(out, packet, "{what}: untouched");
    }
    // Ours, but for nobody here: handed to the VXLAN device's program to count.
    let (verdict, _) = run_prog(&bpf.underlay, &vxlan(HOST_B, HOST_A, VNI, &frame(REMOTE_B, LOCAL_1, 64)));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let unknown = frame(REMOTE_B, Ipv4Addr::new(10, 32, 7, 7), 64);
    let (verdict, _) = run_prog(&bpf.underlay, &vxlan(HOST_B, HOST_A, VNI, &unknown));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(bpf.stats().path("pass"), 1);
    assert_eq!(bpf.stats().path("decap"), 1);
}

#[test]
fn unknown_destination_is_dropped_and_counted() {
    if !root_or_skip("unknown_dst") {
        return;
    }
    let bpf = Bpf::new(false);
    let (verdict, _) = run_prog(&bpf.endpoint, &frame(LOCAL_1, Ipv4Addr::new(10, 32, 7, 7), 64));
    assert_eq!(verdict, TC_ACT_SHOT);
    let stats = bpf.stats();
    assert_eq!(stats.dropped("unknown_destination"), 1);
    assert_eq!(stats.drops["unknown_destination"].bytes, 14 + 20 + 12);
    assert_eq!(stats.path("local") + stats.path("encap"), 0);
}

#[test]
fn other_drops_are_counted_by_reason() {
    if !root_or_skip("drops") {
        return;
    }
    let mut bpf = Bpf::new(false);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // (PROG_TEST_RUN itself refuses frames shorter than their IPv4 header.)
        ("malformed", {
            let mut p = frame(LOCAL_1, LOCAL_2, 64);
            p[14] = 0x44; // IHL 4: shorter than an IPv4 header can be
            p
        }),
        ("unsupported_protocol", eth(mac_for(LOCAL_2), MAC_A, 0x86dd).into_iter().chain([0u8; 40]).collect()),
    ];
    for (reason, packet) in cases {
        let (verdict, _) = run_prog(&bpf.endpoint, &packet);
        assert_eq!(verdict, TC_ACT_SHOT, "{reason}");
        assert_eq!(bpf.stats().dropped(reason), 1, "{reason} counted");
    }
    // Multicast is replicated, not dropped: with no tree and no other endpoint
    // registered there is nothing to copy to, and the packet counts as handled.
    let (verdict, _) = run_prog(&bpf.endpoint, &frame(LOCAL_1, Ipv4Addr::new(224, 0, 0, 251), 64));
    assert_eq!(verdict, TC_ACT_SHOT, "the original is consumed");
    assert_eq!(bpf.stats().path("bcast"), 1);
    assert_eq!(bpf.stats().dropped("multicast_unsupported"), 0);
    // A host with no route: the endpoint is known, its host is not a peer.
    let mut peers: HashMap<MapData, Ip4, Peer> = HashMap::try_from(bpf.map("PEERS")).unwrap();
    peers.remove(&Ip4::from(HOST_B)).unwrap();
    let (verdict, _) = run_prog(&bpf.endpoint, &frame(LOCAL_1, REMOTE_B, 64));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(bpf.stats().dropped("no_route_to_host"), 1);
    // The real overlay program only takes what the VXLAN device decapsulated.
    let (verdict, _) = run_prog(&bpf.overlay, &frame(REMOTE_B, LOCAL_2, 64));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(bpf.stats().dropped("no_tunnel_metadata"), 1);
    // The overlay refuses another network's VNI.
    bpf.set_tunnel_in(ProbeIn { tunnel_id: VNI + 1, remote: u32::from(HOST_B), ttl: 60, _pad: 0 });
    let out = bpf.probe("probe_overlay", &frame(REMOTE_B, LOCAL_2, 64));
    assert_eq!(out.verdict, -7, "DROP_BAD_VNI");
}

/// The ENDPOINTS entry for `addr`, if any.
fn endpoint_entry(bpf: &Bpf, addr: Ipv4Addr) -> Option<Endpoint> {
    let eps: HashMap<MapData, Ip4, Endpoint> = HashMap::try_from(bpf.map("ENDPOINTS")).unwrap();
    eps.get(&Ip4::from(addr), 0).ok()
}

#[test]
fn a_new_remote_address_is_learned_from_its_first_packet() {
    if !root_or_skip("learn_remote") {
        return;
    }
    let newcomer = Ipv4Addr::new(10, 40, 0, 9);
    let stranger_host = Ipv4Addr::new(192, 168, 0, 99);
    for direct in [true, false] {
        let mut bpf = Bpf::new(direct);
        let deliver = |bpf: &mut Bpf, from_host: Ipv4Addr, inner: &[u8]| {
            if direct {
                run_prog(&bpf.underlay, &vxlan(from_host, HOST_A, VNI, inner)).0
            } else {
                bpf.set_tunnel_in(ProbeIn { tunnel_id: VNI, remote: u32::from(from_host), ttl: 60, _pad: 0 });
                bpf.probe("probe_overlay", inner).verdict as u32
            }
        };
        // From a host we do not peer with: delivered, nothing learned.
        assert_eq!(deliver(&mut bpf, stranger_host, &frame(newcomer, LOCAL_2, 64)), TC_ACT_REDIRECT);
        assert!(endpoint_entry(&bpf, newcomer).is_none(), "learned from a stranger (direct={direct})");
        // From HOST_B: the answer can go back before the announcement arrives.
        assert_eq!(deliver(&mut bpf, HOST_B, &frame(newcomer, LOCAL_2, 64)), TC_ACT_REDIRECT);
        let learned = endpoint_entry(&bpf, newcomer).expect("learned");
        assert_eq!(Ipv4Addr::from(learned.host), HOST_B, "direct={direct}");
        assert_eq!((learned.mac, learned.flags, learned.ifindex), (mac_for(newcomer), abi::EP_LEARNED, 0));
        let reply = frame(LOCAL_2, newcomer, 64);
        let (verdict, _) = run_prog(&bpf.endpoint, &reply);
        assert_eq!(verdict, TC_ACT_REDIRECT, "the reply is encapsulated towards HOST_B");
        assert_eq!(bpf.stats().dropped("unknown_destination"), 0);
        // Known entries are never overwritten by traffic (REMOTE_C lives on HOST_C).
        deliver(&mut bpf, HOST_B, &frame(REMOTE_C, LOCAL_2, 64));
        assert_eq!(Ipv4Addr::from(endpoint_entry(&bpf, REMOTE_C).unwrap().host), HOST_C);
        deliver(&mut bpf, HOST_B, &frame(LOCAL_1, LOCAL_2, 64));
        assert_eq!(endpoint_entry(&bpf, LOCAL_1).unwrap().flags, abi::EP_LOCAL, "a local entry stays local");
    }
}

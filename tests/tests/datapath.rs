//! The eBPF data path programmed through the library, hosts as namespaces: every
//! pair of containers talks, same host and across hosts, in both encapsulation
//! modes; no ARP crosses the underlay; the MTU is exact; detach stops traffic; a
//! partial mesh relays; a restart adopts the pins without duplicates or loss; a
//! start that fails, or is abandoned, on a fresh host leaves the kernel as it
//! was and never touches an adopted data path; a reset with no agent removes
//! one host's data path and nothing else.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use ipnet::Ipv4Net;
use weft::datapath::abi::MAX_UNDERLAY_IPS;
use weft::datapath::ebpf::{
    AttachMethod, CLSACT_HANDLE, CLSACT_PRIORITY, EbpfDatapath, EbpfOptions, Encap, TcAttach, host_ifname, reset_host,
};
use weft::datapath::{Datapath, DatapathError, ErrorKind, LocalEndpoint, RemoteEndpoint, Stats, mac_for};
use weft_tests::{Capture, Host, Netns, Underlay, in_ns, root_or_skip, tcp_transfer, wait_until};

struct Container {
    ns: Netns,
    addr: Ipv4Net,
    host: usize,
}

impl Container {
    fn ip(&self) -> Ipv4Addr {
        self.addr.addr()
    }
}

/// An encapsulation and how the programs are attached (`auto`, i.e. TCX on
/// this kernel, unless a test asks for clsact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    encap: Encap,
    attach: TcAttach,
}

impl From<Encap> for Mode {
    fn from(encap: Encap) -> Self {
        Mode { encap, attach: TcAttach::Auto }
    }
}

/// `encap` with the programs attached as clsact filters (what kernels before 6.6 get).
fn clsact(encap: Encap) -> Mode {
    Mode { encap, attach: TcAttach::Clsact }
}

fn options(host: &Host, mode: impl Into<Mode>) -> EbpfOptions {
    let mode = mode.into();
    let mut opts = EbpfOptions::new(host.name.clone());
    opts.underlay = Some(host.iface.clone());
    opts.encap = mode.encap;
    opts.tc_attach = mode.attach;
    opts
}

/// Runs `work` with host `h`'s data path (started, i.e. adopted, each time).
fn with_dp<T, F>(host: &Host, mode: impl Into<Mode>, work: F) -> T
where
    T: Send + 'static,
    F: AsyncFnOnce(EbpfDatapath) -> T + Send + 'static,
{
    let opts = options(host, mode);
    in_ns(&host.ns, move || async move {
        let dp = EbpfDatapath::start(opts).await.expect("start data path");
        work(dp).await
    })
}

fn stats(host: &Host, mode: impl Into<Mode>) -> Stats {
    with_dp(host, mode, async |dp| dp.stats().await.expect("stats"))
}

/// Attaches each container on its host and tells every host about the others.
/// `next_hops[(h, o)]` is the underlay address host h sends host o's traffic to,
/// when that is not o's own address (a relay, or o's address on another link).
fn program(hosts: &[Host], containers: &[Container], mode: impl Into<Mode>, next_hops: &BTreeMap<(usize, usize), Ipv4Addr>) {
    let mode = mode.into();
    for (h, host) in hosts.iter().enumerate() {
        let locals: Vec<(String, std::path::PathBuf, Ipv4Net)> = containers
            .iter()
            .filter(|c| c.host == h)
            .map(|c| (c.ns.name().to_string(), c.ns.path(), c.addr))
            .collect();
        let peers: Vec<(Ipv4Addr, Ipv4Addr)> = (0..hosts.len())
            .filter(|o| *o != h)
            .map(|o| (hosts[o].ip, *next_hops.get(&(h, o)).unwrap_or(&hosts[o].ip)))
            .collect();
        let remotes: Vec<RemoteEndpoint> = containers
            .iter()
            .filter(|c| c.host != h)
            .map(|c| RemoteEndpoint { addr: c.ip(), mac: mac_for(c.ip()), host: hosts[c.host].ip, learned: false })
            .collect();
        with_dp(host, mode, async move |dp| {
            for (id, netns, addr) in locals {
                dp.attach_endpoint(&LocalEndpoint::new(id, netns, vec![addr])).await.expect("attach");
            }
            for (peer, via) in peers {
                if peer == via {
                    dp.add_peer_host(peer).await.expect("peer");
                } else {
                    dp.set_next_hop(peer, via).await.expect("next hop");
                }
            }
            for remote in remotes {
                dp.set_remote_endpoint(&remote).await.expect("remote endpoint");
            }
        });
    }
}

fn containers(hosts: usize, per_host: usize) -> Vec<Container> {
    let mut out = Vec::new();
    for h in 0..hosts {
        for c in 0..per_host {
            let addr = Ipv4Net::new(Ipv4Addr::new(10, 32 + h as u8, 0, c as u8 + 1), 12).unwrap();
            out.push(Container { ns: Netns::new(&format!("c{h}{c}")), addr, host: h });
        }
    }
    out
}

struct Cluster {
    underlay: Underlay,
    hosts: Vec<Host>,
    containers: Vec<Container>,
}

fn lan_cluster(mode: impl Into<Mode>, mtu: u32) -> Cluster {
    let mut underlay = Underlay::with_mtu(mtu);
    let hosts: Vec<Host> = (0..3).map(|i| underlay.host(&format!("h{i}"))).collect();
    let containers = containers(3, 2);
    program(&hosts, &containers, mode, &BTreeMap::new());
    Cluster { underlay, hosts, containers }
}

fn all_pairs(mode: Mode) {
    let cluster = lan_cluster(mode, 1500);
    let mut port = 5000;
    for a in &cluster.containers {
        for b in &cluster.containers {
            if a.addr == b.addr {
                continue;
            }
            assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)), "{} -> {} ping", a.addr, b.addr);
            port += 1;
            assert!(tcp_transfer(&b.ns, b.ip(), &a.ns, port, 4 << 20), "{} -> {} TCP", a.addr, b.addr);
        }
    }
    // Every path the traffic took was counted on the fast path.
    let s = stats(&cluster.hosts[0], mode);
    assert!(s.path("local") > 0 && s.path("encap") > 0 && s.path("decap") > 0 && s.path("arp_reply") > 0, "{s:?}");
    // Attached the one way asked for, never both.
    let host = &cluster.hosts[0];
    let veth = host_ifname(cluster.containers[0].ns.name());
    let (tcx, filters) = if mode.attach == TcAttach::Clsact { (0, 1) } else { (1, 0) };
    for dev in ["weft-vxlan", veth.as_str()] {
        assert_eq!(tcx_programs(&host.ns, dev).len(), tcx, "{mode:?}: TCX programs on {dev}");
        assert_eq!(clsact_filters(&host.ns, dev).len(), filters, "{mode:?}: clsact filters on {dev}");
    }
    if mode.encap == Encap::Direct {
        // Decapsulated by the underlay program: nothing fell back to the device.
        assert_eq!(s.path("pass"), 0, "{s:?}");
    }
}

#[test]
fn all_pairs_direct() {
    if !root_or_skip("all_pairs_direct") {
        return;
    }
    all_pairs(Encap::Direct.into());
}

#[test]
fn all_pairs_device() {
    if !root_or_skip("all_pairs_device") {
        return;
    }
    all_pairs(Encap::Device.into());
}

#[test]
fn all_pairs_direct_clsact() {
    if !root_or_skip("all_pairs_direct_clsact") {
        return;
    }
    all_pairs(clsact(Encap::Direct));
}

#[test]
fn all_pairs_device_clsact() {
    if !root_or_skip("all_pairs_device_clsact") {
        return;
    }
    all_pairs(clsact(Encap::Device));
}

/// Captures on the LAN while fresh containers (empty ARP caches) talk across hosts.
#[test]
fn no_arp_crosses_the_underlay() {
    if !root_or_skip("no_arp") {
        return;
    }
    for encap in [Encap::Direct, Encap::Device] {
        let cluster = lan_cluster(encap, 1500);
        // Every switch port: a bridge device itself sees only floods and its own frames.
        let mut capture = Capture::start(cluster.underlay.switch(), "any", &[]);
        for a in &cluster.containers {
            for b in &cluster.containers {
                if a.host != b.host {
                    assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)), "{} -> {}", a.addr, b.addr);
                }
            }
        }
        let encapsulated = capture.stop_and_read(&["-nn", "-T", "vxlan", "udp", "port", "6784"]);
        assert!(encapsulated.contains("ICMP echo request"), "{encap:?}: the pings crossed the LAN:\n{encapsulated}");
        assert!(!encapsulated.contains("ARP"), "{encap:?}: ARP inside VXLAN:\n{encapsulated}");
        let arp = capture.read(&["-nn", "arp"]);
        assert!(!arp.contains(" 10."), "{encap:?}: ARP for overlay addresses on the underlay:\n{arp}");
    }
}

#[test]
fn largest_unfragmented_ping_fits_the_computed_mtu() {
    if !root_or_skip("mtu") {
        return;
    }
    for underlay_mtu in [1500, 1400] {
        let cluster = lan_cluster(Encap::Direct, underlay_mtu);
        let mtu = underlay_mtu - 50;
        let (a, b) = (&cluster.containers[0], &cluster.containers[2]);
        assert_eq!(link_mtu(&a.ns), mtu, "detected MTU");
        assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)));
        let largest = mtu - 28; // IPv4 + ICMP headers
        assert!(a.ns.ping_df(b.ip(), largest), "underlay {underlay_mtu}: {largest} bytes with DF must pass");
        assert!(!a.ns.ping_df(b.ip(), largest + 1), "underlay {underlay_mtu}: one byte more must fail");
    }
}

#[test]
fn an_explicit_mtu_overrides_the_detected_one() {
    if !root_or_skip("mtu_override") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    let c = Netns::new("c");
    let mut opts = options(&host, Encap::Direct);
    opts.mtu = Some(1300);
    let netns = c.path();
    in_ns(&host.ns, move || async move {
        let dp = EbpfDatapath::start(opts).await.expect("start");
        let net: Ipv4Net = "10.32.0.1/12".parse().unwrap();
        dp.attach_endpoint(&LocalEndpoint::new("m", netns, vec![net])).await.expect("attach");
    });
    assert_eq!(link_mtu(&c), 1300);
}

#[test]
fn detaching_an_endpoint_stops_its_traffic() {
    if !root_or_skip("detach") {
        return;
    }
    let cluster = lan_cluster(Encap::Direct, 1500);
    let (a, b, local) = (&cluster.containers[0], &cluster.containers[2], &cluster.containers[1]);
    assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)));
    assert!(local.ns.ping_within(b.ip(), Duration::from_secs(3)));
    let id = b.ns.name().to_string();
    let removed = with_dp(&cluster.hosts[b.host], Encap::Direct, async move |dp| {
        dp.detach_endpoint(&id).await.expect("detach");
        dp.local_endpoints().await.expect("list").len()
    });
    assert_eq!(removed, 1, "one endpoint left on that host");
    assert!(!b.ns.succeeds("ip", &["link", "show", "ethwe"]), "the container's interface is gone");
    assert!(!a.ns.ping(b.ip()), "remote traffic to a detached endpoint stops");
    assert!(!local.ns.ping(b.ip()), "same-host traffic too");
    let s = stats(&cluster.hosts[b.host], Encap::Direct);
    assert!(s.dropped("unknown_destination") > 0, "the host that lost it counts the drops: {s:?}");
    // The others still talk.
    assert!(a.ns.ping(cluster.containers[3].ip()));
}

/// A–B–C with no A–C underlay link: A reaches C's containers through B.
#[test]
fn partial_mesh_relays_through_the_middle_host() {
    if !root_or_skip("partial_mesh") {
        return;
    }
    for encap in [Encap::Direct, Encap::Device] {
        let mut underlay = Underlay::new();
        let mut a = underlay.isolated_host("pa");
        let mut b = underlay.isolated_host("pb");
        let mut c = underlay.isolated_host("pc");
        let (_, b_on_ab) = underlay.link(&mut a, &mut b);
        let (b_on_bc, _) = underlay.link(&mut b, &mut c);
        assert!(!a.ns.succeeds("ping", &["-c", "1", "-W", "1", &c.ip.to_string()]), "no A–C underlay path");
        let hosts = vec![a, b, c];
        let containers = containers(3, 1);
        // A sends C's traffic to B; C sends A's to B, and reaches B itself at
        // B's address on the B–C link.
        let mut hops = BTreeMap::new();
        hops.insert((0, 2), b_on_ab);
        hops.insert((2, 0), b_on_bc);
        hops.insert((2, 1), b_on_bc);
        program(&hosts, &containers, encap, &hops);
        let (ca, cc) = (&containers[0], &containers[2]);
        assert!(ca.ns.ping_within(cc.ip(), Duration::from_secs(3)), "{encap:?}: A -> C through B");
        assert!(cc.ns.ping_within(ca.ip(), Duration::from_secs(3)), "{encap:?}: C -> A through B");
        assert!(tcp_transfer(&cc.ns, cc.ip(), &ca.ns, 5100, 2 << 20), "{encap:?}: TCP A -> C");
        let relayed = stats(&hosts[1], encap).path("relay");
        assert!(relayed > 0, "{encap:?}: B relayed");
    }
}

/// MTU of `ethwe` in `ns` (sysfs would show the mounting namespace's devices).
fn link_mtu(ns: &Netns) -> u32 {
    let out = ns.ip(&["-o", "link", "show", "ethwe"]);
    out.split_whitespace().skip_while(|w| *w != "mtu").nth(1).and_then(|m| m.parse().ok()).expect("mtu")
}

fn tcx_programs(ns: &Netns, ifname: &str) -> Vec<String> {
    let netns = weft::datapath::netns::Netns::open(ns.path()).unwrap();
    let ifname = ifname.to_string();
    std::thread::spawn(move || {
        netns.enter().unwrap();
        SchedClassifier::query_tcx(&ifname, TcAttachType::Ingress)
            .map(|(_, progs)| progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()).collect())
            .unwrap_or_default()
    })
    .join()
    .unwrap()
}

/// The programs of weft's clsact filters (its priority and handle) on
/// `ifname`'s ingress, as `tc filter show` lists them.
fn clsact_filters(ns: &Netns, ifname: &str) -> Vec<String> {
    let handle = format!("handle {CLSACT_HANDLE:#x} ");
    let pref = format!(" pref {CLSACT_PRIORITY} ");
    all_filters(ns, ifname)
        .iter()
        .filter(|line| line.contains(&handle) && line.contains(&pref))
        .filter_map(|line| line.split(&handle).nth(1)?.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Every filter line (with a handle) on `ifname`'s ingress, weft's or not.
fn all_filters(ns: &Netns, ifname: &str) -> Vec<String> {
    let out = ns.cmd("tc").args(["filter", "show", "dev", ifname, "ingress"]).output().expect("tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("filter") && (l.contains(" handle ") || l.contains(" fh ")))
        .map(str::to_string)
        .collect()
}

/// What runs on a device's ingress, attached as `mode` says.
fn attached(ns: &Netns, ifname: &str, mode: Mode) -> Vec<String> {
    if mode.attach == TcAttach::Clsact { clsact_filters(ns, ifname) } else { tcx_programs(ns, ifname) }
}

/// Restarting (re-creating the data path, as a restarted agent does) adopts the
/// pins (and, with clsact, replaces weft's filters in place): no second program,
/// link or filter anywhere, and no packet lost meanwhile.
fn restart_adopts(mode: Mode) {
    let cluster = lan_cluster(mode, 1500);
    let (a, b) = (&cluster.containers[0], &cluster.containers[2]);
    assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)));
    let host = &cluster.hosts[0];
    let veth = host_ifname(a.ns.name());
    let before: Vec<Vec<String>> =
        ["eth0", "weft-vxlan", veth.as_str()].iter().map(|i| attached(&host.ns, i, mode)).collect();
    assert_eq!(before, vec![vec!["weft_underlay"], vec!["weft_overlay"], vec!["weft_endpoint"]]);

    // A steady ping (every 10 ms) across the restarts: not one reply may be missing.
    let ping = a
        .ns
        .cmd("ping")
        .args(["-c", "150", "-i", "0.01", "-q", &b.ip().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    for _ in 0..3 {
        let n = with_dp(host, mode, async |dp| dp.local_endpoints().await.expect("list").len());
        assert_eq!(n, 2, "the endpoints are found again");
    }
    let out = ping.wait_with_output().expect("ping");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("150 received"), "no loss across restarts:\n{summary}");

    let after: Vec<Vec<String>> =
        ["eth0", "weft-vxlan", veth.as_str()].iter().map(|i| attached(&host.ns, i, mode)).collect();
    assert_eq!(after, before, "no duplicate programs, links or filters");
    if mode.attach == TcAttach::Clsact {
        for dev in ["eth0", "weft-vxlan", veth.as_str()] {
            assert_eq!(all_filters(&host.ns, dev).len(), 1, "{dev}: one filter, weft's");
            assert!(tcx_programs(&host.ns, dev).is_empty(), "{dev}: no TCX link besides");
        }
    }
    let progs = std::fs::read_dir(host.pin_dir()).unwrap().flatten().filter(|e| {
        e.file_name().to_string_lossy().starts_with("prog_")
    });
    assert_eq!(progs.count(), 3, "three pinned programs");
}

#[test]
fn restart_adopts_pins_without_duplicates_or_loss() {
    if !root_or_skip("adopt") {
        return;
    }
    restart_adopts(Encap::Direct.into());
}

#[test]
fn restart_adopts_filters_without_duplicates_or_loss_clsact() {
    if !root_or_skip("adopt_clsact") {
        return;
    }
    restart_adopts(clsact(Encap::Direct));
}

/// An agent that used TCX restarted with clsact (and back): the traffic goes
/// on, and each time exactly one attachment runs each program.
#[test]
fn switching_between_tcx_and_clsact_keeps_one_attachment_and_the_traffic_clsact() {
    if !root_or_skip("switch_clsact") {
        return;
    }
    let cluster = lan_cluster(Encap::Direct, 1500);
    let (a, b) = (&cluster.containers[0], &cluster.containers[2]);
    assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)));
    let host = &cluster.hosts[0];
    let veth = host_ifname(a.ns.name());
    for (mode, want) in [(clsact(Encap::Direct), AttachMethod::Clsact), (Encap::Direct.into(), AttachMethod::Tcx)] {
        let method = with_dp(host, mode, async |dp| dp.attach_method());
        assert_eq!(method, want);
        for dev in ["eth0", "weft-vxlan", veth.as_str()] {
            let (tcx, filters) = (tcx_programs(&host.ns, dev), clsact_filters(&host.ns, dev));
            assert_eq!(tcx.len() + filters.len(), 1, "{want}: {dev}: TCX {tcx:?}, clsact {filters:?}");
            assert_eq!(filters.len(), usize::from(want == AttachMethod::Clsact), "{want}: {dev}");
        }
        assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)), "{want}: traffic flows");
    }
}

/// With no agent at all (the data path object dropped, every fd closed), the
/// pins alone keep the traffic flowing.
#[test]
fn traffic_flows_with_no_agent() {
    if !root_or_skip("no_agent") {
        return;
    }
    let cluster = lan_cluster(Encap::Direct, 1500);
    // `program` dropped every EbpfDatapath already; nothing of ours is open.
    for (a, b) in [(0, 2), (0, 1), (5, 3)] {
        let (a, b) = (&cluster.containers[a], &cluster.containers[b]);
        assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)));
        assert!(wait_until(Duration::from_secs(1), || tcp_transfer(&b.ns, b.ip(), &a.ns, 5200, 1 << 20)));
    }
}

/// Whether `ns` has an interface called `name`.
fn has_link(ns: &Netns, name: &str) -> bool {
    ns.succeeds("ip", &["link", "show", name])
}

/// Starts host `host`'s data path with `opts` and returns why it failed.
fn start_error(host: &Host, opts: EbpfOptions) -> DatapathError {
    in_ns(&host.ns, move || async move { EbpfDatapath::start(opts).await.err() }).expect("the start must fail")
}

/// Gives the host's underlay more addresses than the underlay program's map
/// takes (`UNDERLAY_IPS`, WEFT_MAX_UNDERLAY_IPS entries): a direct-mode start
/// then fails writing the last one, after it pinned the TCX link on the
/// underlay — the step the bug left behind. (A real limit, not a test hook: if
/// it is ever lifted, these tests need another late failure.)
fn overfill_underlay_addresses(host: &Host) {
    for i in 0..MAX_UNDERLAY_IPS {
        host.ns.ip(&["addr", "add", &format!("10.99.{}.{}/32", i / 200, i % 200 + 1), "dev", &host.iface]);
    }
}

fn is_underlay_map_full(err: &DatapathError) -> bool {
    // E2BIG: the hash map is full.
    matches!(err, DatapathError::Bpf { op, .. } if op == "update UNDERLAY_IPS") && err.errno() == Some(7)
}

#[test]
fn a_fresh_start_that_fails_after_pinning_the_underlay_link_leaves_nothing() {
    if !root_or_skip("fresh_start_fails_late") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    overfill_underlay_addresses(&host);
    let err = start_error(&host, options(&host, Encap::Direct));
    assert!(is_underlay_map_full(&err), "the start failed where intended: {err}");
    assert!(!host.pin_dir().exists(), "no pin directory left");
    assert!(!has_link(&host.ns, "weft-vxlan"), "no VXLAN device left");
    // Checked at once: start returns only once the kernel has let go of the link.
    assert_eq!(tcx_programs(&host.ns, &host.iface), Vec::<String>::new(), "no TCX program left on the underlay");
}

#[test]
fn a_start_that_adopted_pins_keeps_them_when_it_fails() {
    if !root_or_skip("adopting_start_fails") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    with_dp(&host, Encap::Direct, async |dp| assert!(dp.started_fresh()));
    overfill_underlay_addresses(&host);
    let err = start_error(&host, options(&host, Encap::Direct));
    assert!(is_underlay_map_full(&err), "{err}");
    assert!(host.pin_dir().join("PEERS").exists(), "the adopted pins stay");
    assert!(has_link(&host.ns, "weft-vxlan"), "the VXLAN device stays");
    assert_eq!(tcx_programs(&host.ns, &host.iface), vec!["weft_underlay"], "the underlay keeps its program");
}

#[test]
fn a_fresh_start_that_meets_a_foreign_device_removes_only_what_it_made() {
    if !root_or_skip("fresh_start_foreign_vxlan") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    // Not weft's: a bridge where the VXLAN device should be (no dummy module here).
    host.ns.ip(&["link", "add", "weft-vxlan", "type", "bridge"]);
    let err = start_error(&host, options(&host, Encap::Direct));
    assert!(matches!(&err, DatapathError::Netlink(_)) && err.kind() == ErrorKind::BadSettings, "{err:?}");
    assert!(!host.pin_dir().exists(), "the programs and maps it pinned are gone");
    assert!(host.ns.ip(&["-d", "link", "show", "weft-vxlan"]).contains("bridge"), "the foreign device stays");
    assert_eq!(tcx_programs(&host.ns, &host.iface), Vec::<String>::new());
}

#[test]
fn an_mtu_the_devices_cannot_take_is_refused_before_anything_is_made() {
    if !root_or_skip("mtu_too_large") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    let mut opts = options(&host, Encap::Direct);
    opts.mtu = Some(100_000);
    let err = start_error(&host, opts);
    assert!(matches!(err, DatapathError::MtuTooLarge { mtu: 100_000, .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::BadSettings);
    assert!(!host.pin_dir().exists());
    assert!(!has_link(&host.ns, "weft-vxlan"));
    assert_eq!(tcx_programs(&host.ns, &host.iface), Vec::<String>::new());
}

#[test]
fn abandoning_a_fresh_start_removes_everything_it_made() {
    if !root_or_skip("abandon_fresh") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    let c = Netns::new("c");
    let opts = options(&host, Encap::Direct);
    let netns = c.path();
    let veth = host_ifname("ab");
    in_ns(&host.ns, move || async move {
        let dp = EbpfDatapath::start(opts).await.expect("start");
        assert!(dp.started_fresh());
        let net: Ipv4Net = "10.32.0.1/12".parse().unwrap();
        dp.attach_endpoint(&LocalEndpoint::new("ab", netns, vec![net])).await.expect("attach");
        dp.abandon().await.expect("abandon");
    });
    assert!(!host.pin_dir().exists(), "no pins");
    assert!(!has_link(&host.ns, "weft-vxlan"), "no VXLAN device");
    assert!(!has_link(&host.ns, &veth), "no endpoint veth");
    assert!(!has_link(&c, "ethwe"), "the container's interface went with it");
    assert_eq!(tcx_programs(&host.ns, &host.iface), Vec::<String>::new(), "no program on the underlay");
}

#[test]
fn abandoning_an_adopting_start_removes_nothing() {
    if !root_or_skip("abandon_adopted") {
        return;
    }
    let cluster = lan_cluster(Encap::Direct, 1500);
    let (a, b) = (&cluster.containers[0], &cluster.containers[2]);
    assert!(a.ns.ping_within(b.ip(), Duration::from_secs(3)));
    let host = &cluster.hosts[0];
    let fresh = with_dp(host, Encap::Direct, async |dp| {
        let fresh = dp.started_fresh();
        dp.abandon().await.expect("abandon");
        fresh
    });
    assert!(!fresh, "the second start adopted the pins");
    assert!(host.pin_dir().join("PEERS").exists(), "the pins stay");
    assert!(has_link(&host.ns, "weft-vxlan"), "the VXLAN device stays");
    assert_eq!(tcx_programs(&host.ns, &host.iface), vec!["weft_underlay"]);
    assert_eq!(tcx_programs(&host.ns, &host_ifname(a.ns.name())), vec!["weft_endpoint"]);
    assert!(a.ns.ping(b.ip()), "and traffic still flows");
}

#[test]
fn reset_without_an_agent_removes_one_hosts_data_path_and_nothing_else() {
    if !root_or_skip("reset_host") {
        return;
    }
    let cluster = lan_cluster(Encap::Direct, 1500);
    let host = &cluster.hosts[0];
    // The host's own overlay interface (`weft expose`): both ends in the host.
    let host_ns = host.ns.path();
    with_dp(host, Encap::Direct, async move |dp| {
        let mut ep = LocalEndpoint::new("weft:host", host_ns, vec!["10.32.100.1/12".parse().unwrap()]);
        ep.ifname = "weft".into();
        dp.attach_endpoint(&ep).await.expect("attach the host");
    });
    // Not weft's: a veth pair with no weft alias.
    host.ns.ip(&["link", "add", "other0", "type", "veth", "peer", "name", "other1"]);

    let opts = options(host, Encap::Direct);
    let again = opts.clone();
    let report = in_ns(&host.ns, move || async move { reset_host(&opts).await.expect("reset") });
    let mut ids: Vec<&str> = report.endpoints.iter().map(|e| e.id.as_str()).collect();
    ids.sort();
    let mut want = vec![cluster.containers[0].ns.name(), cluster.containers[1].ns.name(), "weft:host"];
    want.sort();
    assert_eq!(ids, want, "{report}");
    assert_eq!(report.vxlan.as_deref(), Some("weft-vxlan"));
    assert_eq!(report.pin_dir.as_deref(), Some(host.pin_dir().as_path()));
    assert_eq!(report.detached, vec![host.iface.clone()], "the underlay's link went with the pins");

    assert!(!host.pin_dir().exists());
    assert!(!has_link(&host.ns, "weft-vxlan"));
    assert!(!has_link(&host.ns, "weft"), "the host's own interface is gone");
    for c in &cluster.containers[..2] {
        assert!(!has_link(&c.ns, "ethwe"), "{}: the container's interface is gone", c.addr);
    }
    assert_eq!(tcx_programs(&host.ns, &host.iface), Vec::<String>::new());
    assert!(has_link(&host.ns, "other0"), "a veth that is not weft's stays");

    // The other hosts' pins and traffic are untouched.
    for other in &cluster.hosts[1..] {
        assert!(other.pin_dir().join("PEERS").exists(), "{}: pins stay", other.name);
    }
    let (c, d) = (&cluster.containers[2], &cluster.containers[4]);
    assert!(c.ns.ping_within(d.ip(), Duration::from_secs(3)), "the other hosts still talk");

    let second = in_ns(&host.ns, move || async move { reset_host(&again).await.expect("reset again") });
    assert!(second.is_empty(), "a second reset finds nothing: {second}");
}

/// Adds a filter that is not weft's to `ifname`'s clsact ingress (and the
/// qdisc, if missing): a u32 match at another priority.
fn add_foreign_filter(ns: &Netns, ifname: &str) {
    let _ = ns.cmd("tc").args(["qdisc", "add", "dev", ifname, "clsact"]).stderr(Stdio::null()).status();
    let ok = ns
        .succeeds("tc", &["filter", "add", "dev", ifname, "ingress", "prio", "3", "protocol", "ip", "u32", "match", "u32", "0", "0", "classid", "1:2"]);
    assert!(ok, "add a foreign filter on {ifname}");
}

#[test]
fn a_fresh_start_that_fails_after_attaching_the_underlay_filter_leaves_nothing_clsact() {
    if !root_or_skip("fresh_start_fails_late_clsact") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    add_foreign_filter(&host.ns, &host.iface);
    let foreign = all_filters(&host.ns, &host.iface);
    overfill_underlay_addresses(&host);
    let err = start_error(&host, options(&host, clsact(Encap::Direct)));
    assert!(is_underlay_map_full(&err), "the start failed where intended: {err}");
    assert!(!host.pin_dir().exists(), "no pin directory left");
    assert!(!has_link(&host.ns, "weft-vxlan"), "no VXLAN device left");
    assert_eq!(clsact_filters(&host.ns, &host.iface), Vec::<String>::new(), "no weft filter left on the underlay");
    assert_eq!(all_filters(&host.ns, &host.iface), foreign, "the foreign filter stays, alone");
    assert_eq!(tcx_programs(&host.ns, &host.iface), Vec::<String>::new());
}

#[test]
fn a_start_that_adopted_filters_keeps_them_when_it_fails_clsact() {
    if !root_or_skip("adopting_start_fails_clsact") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    with_dp(&host, clsact(Encap::Direct), async |dp| assert!(dp.started_fresh()));
    overfill_underlay_addresses(&host);
    let err = start_error(&host, options(&host, clsact(Encap::Direct)));
    assert!(is_underlay_map_full(&err), "{err}");
    assert!(host.pin_dir().join("PEERS").exists(), "the adopted pins stay");
    assert_eq!(clsact_filters(&host.ns, &host.iface), vec!["weft_underlay"], "the underlay keeps its filter");
    assert_eq!(clsact_filters(&host.ns, "weft-vxlan"), vec!["weft_overlay"]);
}

#[test]
fn abandoning_a_fresh_start_removes_everything_it_made_clsact() {
    if !root_or_skip("abandon_fresh_clsact") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("h");
    let c = Netns::new("c");
    let opts = options(&host, clsact(Encap::Direct));
    let netns = c.path();
    let veth = host_ifname("abc");
    in_ns(&host.ns, move || async move {
        let dp = EbpfDatapath::start(opts).await.expect("start");
        assert!(dp.started_fresh());
        assert_eq!(dp.attach_method(), AttachMethod::Clsact);
        let net: Ipv4Net = "10.32.0.1/12".parse().unwrap();
        dp.attach_endpoint(&LocalEndpoint::new("abc", netns, vec![net])).await.expect("attach");
        dp.abandon().await.expect("abandon");
    });
    assert!(!host.pin_dir().exists(), "no pins");
    assert!(!has_link(&host.ns, "weft-vxlan"), "no VXLAN device");
    assert!(!has_link(&host.ns, &veth), "no endpoint veth");
    assert_eq!(all_filters(&host.ns, &host.iface), Vec::<String>::new(), "no filter on the underlay");
}

#[test]
fn reset_without_an_agent_removes_weft_filters_and_nothing_else_clsact() {
    if !root_or_skip("reset_host_clsact") {
        return;
    }
    let cluster = lan_cluster(clsact(Encap::Direct), 1500);
    let host = &cluster.hosts[0];
    add_foreign_filter(&host.ns, &host.iface);
    assert_eq!(clsact_filters(&host.ns, &host.iface), vec!["weft_underlay"]);
    let handle = format!("handle {CLSACT_HANDLE:#x} ");
    let foreign: Vec<String> = all_filters(&host.ns, &host.iface).into_iter().filter(|l| !l.contains(&handle)).collect();
    assert!(!foreign.is_empty(), "the foreign filter is there");

    let opts = options(host, clsact(Encap::Direct));
    let again = opts.clone();
    let report = in_ns(&host.ns, move || async move { reset_host(&opts).await.expect("reset") });
    assert_eq!(report.endpoints.len(), 2, "{report}");
    assert_eq!(report.detached, vec![host.iface.clone()], "the underlay's filter went: {report}");
    assert!(!host.pin_dir().exists());
    assert!(!has_link(&host.ns, "weft-vxlan"));
    assert_eq!(clsact_filters(&host.ns, &host.iface), Vec::<String>::new(), "weft's filter is gone");
    assert_eq!(all_filters(&host.ns, &host.iface), foreign, "the foreign filter stays, alone");

    // The other hosts' filters and traffic are untouched.
    for other in &cluster.hosts[1..] {
        assert_eq!(clsact_filters(&other.ns, &other.iface), vec!["weft_underlay"], "{}", other.name);
    }
    let (c, d) = (&cluster.containers[2], &cluster.containers[4]);
    assert!(c.ns.ping_within(d.ip(), Duration::from_secs(3)), "the other hosts still talk");

    let second = in_ns(&host.ns, move || async move { reset_host(&again).await.expect("reset again") });
    assert!(second.is_empty(), "a second reset finds nothing: {second}");
}

//! `cargo xtask bench datapath`: container-to-container throughput, latency and
//! CPU cost across two hosts, for the underlay itself, the kernel baseline Flannel
//! uses (bridge + static VXLAN), and weft's two encapsulation modes — all set up
//! side by side and measured interleaved, round after round, so the machine's noise
//! hits every configuration alike. Medians and ratios are reported.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ipnet::Ipv4Net;
use weft::datapath::ebpf::{EbpfDatapath, EbpfOptions, Encap};
use weft::datapath::{Datapath, LocalEndpoint, RemoteEndpoint, mac_for};

use super::{Table, median};
use crate::cleanup::Proc;
use crate::{Host, Netns, Underlay, in_ns, run, wait_until};


/// One way of connecting a client namespace to a server address.
struct Config {
    name: &'static str,
    client: Netns,
    server: Netns,
    server_addr: Ipv4Addr,
    _hosts: Vec<Host>,
    _underlay: Option<Underlay>,
    iperf: Option<Proc>,
    /// For weft: the pin directory of the hosts, to read counters.
    pins: Vec<std::path::PathBuf>,
}

fn two_hosts() -> (Underlay, Host, Host) {
    let mut underlay = Underlay::new();
    let a = underlay.host("ba");
    let b = underlay.host("bb");
    (underlay, a, b)
}

/// The underlay itself: host to host, no overlay, no veth.
fn underlay_config() -> Config {
    let (underlay, a, b) = two_hosts();
    Config {
        name: "underlay",
        client: a.ns.alias(),
        server: b.ns.alias(),
        server_addr: b.ip,
        _hosts: vec![a, b],
        _underlay: Some(underlay),
        iperf: None,
        pins: Vec::new(),
    }
}

/// Flannel's kernel baseline: a bridge per host, a VXLAN device on it with a
/// static flood entry towards the other host, containers on the bridge.
fn bridge_config() -> Config {
    let (underlay, a, b) = two_hosts();
    let mut containers = Vec::new();
    for (host, other, addr) in [(&a, &b, "10.201.0.1/24"), (&b, &a, "10.201.0.2/24")] {
        let ns = &host.ns;
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&[
            "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789", "local", &host.ip.to_string(),
            "nolearning", "dev", "eth0",
        ]);
        ns.ip(&["link", "set", "vx0", "master", "br0", "up"]);
        ns.ip(&["link", "set", "br0", "up"]);
        ns.run("bridge", &["fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", &other.ip.to_string()]);
        let c = Netns::new("bc");
        run(Command::new("ip").args([
            "link", "add", "bv0", "netns", ns.name(), "mtu", "1450", "type", "veth", "peer", "name", "eth0",
            "netns", c.name(), "mtu", "1450",
        ]));
        ns.ip(&["link", "set", "bv0", "master", "br0", "up"]);
        c.ip(&["addr", "add", addr, "dev", "eth0"]);
        c.ip(&["link", "set", "eth0", "up"]);
        containers.push(c);
    }
    let server = containers.pop().unwrap();
    let client = containers.pop().unwrap();
    Config {
        name: "bridge+vxlan",
        client,
        server,
        server_addr: Ipv4Addr::new(10, 201, 0, 2),
        _hosts: vec![a, b],
        _underlay: Some(underlay),
        iperf: None,
        pins: Vec::new(),
    }
}

fn weft_config(encap: Encap, name: &'static str) -> Config {
    let (underlay, a, b) = two_hosts();
    let client = Netns::new("wc");
    let server = Netns::new("ws");
    let (ca, sa): (Ipv4Net, Ipv4Net) = ("10.32.0.1/12".parse().unwrap(), "10.40.0.1/12".parse().unwrap());
    for (host, other, me, them, ns) in [(&a, &b, ca, sa, &client), (&b, &a, sa, ca, &server)] {
        let mut opts = EbpfOptions::new(host.name.clone());
        opts.underlay = Some(host.iface.clone());
        opts.encap = encap;
        let (netns, peer) = (ns.path(), other.ip);
        in_ns(&host.ns, move || async move {
            let dp = EbpfDatapath::start(opts).await.expect("data path");
            dp.attach_endpoint(&LocalEndpoint::new("bench", netns, vec![me])).await.expect("attach");
            dp.add_peer_host(peer).await.expect("peer");
            let remote = RemoteEndpoint { addr: them.addr(), mac: mac_for(them.addr()), host: peer, learned: false };
            dp.set_remote_endpoint(&remote).await.expect("remote");
        });
    }
    let pins = vec![a.pin_dir(), b.pin_dir()];
    Config {
        name,
        client,
        server,
        server_addr: sa.addr(),
        _hosts: vec![a, b],
        _underlay: Some(underlay),
        iperf: None,
        pins,
    }
}

/// Busy and total jiffies of all CPUs (/proc/stat).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn ticks_per_second() -> f64 {
    100.0 // USER_HZ on Linux
}

struct Sample {
    gbps_1: f64,
    gbps_2: f64,
    rtt_ms: f64,
    cpu_s_per_gbit: f64,
}

impl Config {
    fn start_server(&mut self) {
        let child = Proc::spawn_killed(
            format!("stopping iperf3 server in {}", self.server.name()),
            self.server
                .cmd("iperf3")
                .args(["-s", "-B", &self.server_addr.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("iperf3 server");
        self.iperf = Some(child);
        let addr = self.server_addr;
        assert!(
            wait_until(Duration::from_secs(10), || self.client.ping(addr)),
            "{}: the client cannot reach {addr}",
            self.name
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    /// One iperf3 run: (Gbit/s received, CPU seconds busy, Gbit moved).
    fn iperf(&self, streams: u32, seconds: u32) -> (f64, f64, f64) {
        let before = cpu_jiffies();
        let out = self
            .client
            .cmd("iperf3")
            .args(["-c", &self.server_addr.to_string(), "-t", &seconds.to_string(), "-P", &streams.to_string(), "-J"])
            .output()
            .expect("iperf3 client");
        let after = cpu_jiffies();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
        let busy = (after.0 - before.0) as f64 / ticks_per_second();
        let gbits = bps * f64::from(seconds) / 1e9;
        (bps / 1e9, busy, gbits)
    }

    fn ping_ms(&self) -> f64 {
        let out = self.client.run("ping", &["-c", "50", "-i", "0.005", "-q", &self.server_addr.to_string()]);
        // rtt min/avg/max/mdev = 0.030/0.045/0.090/0.010 ms
        out.lines()
            .find(|l| l.contains("min/avg/max"))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.trim().split('/').nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }

    fn sample(&self, seconds: u32) -> Sample {
        let (gbps_1, busy, gbits) = self.iperf(1, seconds);
        let (gbps_2, ..) = self.iperf(2, seconds);
        Sample { gbps_1, gbps_2, rtt_ms: self.ping_ms(), cpu_s_per_gbit: busy / gbits.max(1e-9) }
    }

    /// Packets weft's programs handed to the host stack instead of forwarding
    /// them themselves: the only way a data packet could reach user space.
    fn passed_to_stack(&self) -> u64 {
        self.pins
            .iter()
            .map(|pins| {
                let data = aya::maps::MapData::from_pin(pins.join("COUNTERS")).expect("COUNTERS pin");
                let counters = aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).expect("map");
                weft::datapath::ebpf::read_stats(&counters).expect("stats").path("pass")
            })
            .sum()
    }
}

/// Runs the benchmark and prints the table and the summary line.
pub fn run_bench(rounds: u32, seconds: u32) {
    let mut configs = vec![
        underlay_config(),
        bridge_config(),
        weft_config(Encap::Device, "weft device"),
        weft_config(Encap::Direct, "weft direct"),
    ];
    for c in &mut configs {
        c.start_server();
    }
    let passed_before: Vec<u64> = configs.iter().map(Config::passed_to_stack).collect();
    let mut samples: Vec<Vec<Sample>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Rotate the order each round so no configuration always goes first.
        for k in 0..configs.len() {
            let i = (k + round as usize) % configs.len();
            let s = configs[i].sample(seconds);
            eprintln!(
                "round {} {:<13} {:6.2} Gbit/s  {:6.2} Gbit/s (2 streams)  rtt {:.3} ms  cpu {:.3} s/Gbit",
                round + 1,
                configs[i].name,
                s.gbps_1,
                s.gbps_2,
                s.rtt_ms,
                s.cpu_s_per_gbit
            );
            samples[i].push(s);
        }
    }
    let agent_packets: u64 =
        configs.iter().zip(&passed_before).map(|(c, before)| c.passed_to_stack() - before).sum();

    let med = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    let mut table = Table::new(&["configuration", "1 stream Gbit/s", "2 streams Gbit/s", "RTT ms", "CPU s/Gbit"]);
    for (i, c) in configs.iter().enumerate() {
        table.row(vec![
            c.name.to_string(),
            format!("{:.2}", med(i, |s| s.gbps_1)),
            format!("{:.2}", med(i, |s| s.gbps_2)),
            format!("{:.3}", med(i, |s| s.rtt_ms)),
            format!("{:.3}", med(i, |s| s.cpu_s_per_gbit)),
        ]);
    }
    println!("{table}");
    println!("medians of {rounds} interleaved rounds of {seconds} s; CPU is all cores busy time per Gbit moved");
    let (underlay, bridge, weft) = (0, 1, 3);
    println!(
        "bench datapath: weft_over_bridge={:.2} weft_over_underlay={:.2} cpu_per_gbit_over_bridge={:.2} rtt_extra_ms={:.3} agent_packets={}",
        med(weft, |s| s.gbps_1) / med(bridge, |s| s.gbps_1),
        med(weft, |s| s.gbps_1) / med(underlay, |s| s.gbps_1),
        med(weft, |s| s.cpu_s_per_gbit) / med(bridge, |s| s.cpu_s_per_gbit),
        med(weft, |s| s.rtt_ms) - med(bridge, |s| s.rtt_ms),
        agent_packets
    );
}

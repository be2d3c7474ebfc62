//! DNS with real clients (`dig`) against real agents, a real upstream (dnsmasq on
//! the host's loopback), and garbage.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use weft_tests::agent::Agent;
use weft_tests::{Host, Netns, Underlay, on_thread_in, root_or_skip, unique, wait_until};

/// Where every test agent also serves DNS (in its host's namespace).
const DNS: &str = "127.0.0.2";

/// A dnsmasq upstream on `addr`:53 inside `ns`, answering `example.test`.
struct Upstream {
    child: Child,
}

impl Upstream {
    fn start(ns: &Netns, addr: &str, answer: &str) -> Upstream {
        let child = ns
            .cmd("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--port=53",
                &format!("--listen-address={addr}"),
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--pid-file=",
                &format!("--address=/example.test/{answer}"),
                "--ptr-record=7.2.0.192.in-addr.arpa,upstream.example.test",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base)");
        let up = Upstream { child };
        assert!(wait_until(Duration::from_secs(5), || dig(ns, addr, &["+short", "example.test"]).contains(answer)));
        up
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dig @server ARGS` inside `ns`; stdout.
fn dig(ns: &Netns, server: &str, args: &[&str]) -> String {
    let out = ns.cmd("dig").arg(format!("@{server}")).args(["+time=2", "+tries=1"]).args(args).output().expect("dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(ns: &Netns, server: &str, name: &str) -> Vec<String> {
    let mut v: Vec<String> = dig(ns, server, &["+short", name]).lines().map(str::to_string).collect();
    v.sort();
    v
}

fn status(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn resolv_conf(servers: &[&str]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}-resolv.conf", unique("dns")));
    std::fs::write(&path, servers.iter().map(|s| format!("nameserver {s}\n")).collect::<String>()).unwrap();
    path
}

fn dns_agent(host: &Host, peers: &[Ipv4Addr], n: usize, resolv: &std::path::Path) -> Agent {
    let init = format!("consensus={n}");
    Agent::launch(
        host,
        peers,
        &[
            "--ipalloc-init",
            &init,
            "--dns-listen-address",
            &format!("{DNS}:53"),
            "--resolv-conf",
            resolv.to_str().unwrap(),
        ],
    )
}

#[test]
fn every_rule_on_one_host() {
    if !root_or_skip("dns_rules") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("d");
    let _up = Upstream::start(&host.ns, "127.0.0.1", "192.0.2.7");
    let resolv = resolv_conf(&["127.0.0.1"]);
    let agent = dns_agent(&host, &[], 1, &resolv);
    agent.cli(&["dns-add", "10.32.0.5", "web"]);
    agent.cli(&["dns-add", "10.32.0.6", "web"]);
    agent.cli(&["dns-add", "10.32.0.7", "-h", "db.weave.local"]);
    let ns = &host.ns;
    assert_eq!(short(ns, DNS, "web.weave.local"), vec!["10.32.0.5", "10.32.0.6"], "A: every address");
    assert_eq!(short(ns, DNS, "WEB.Weave.LOCAL"), vec!["10.32.0.5", "10.32.0.6"], "case-insensitive");
    assert_eq!(short(ns, DNS, "web"), vec!["10.32.0.5", "10.32.0.6"], "unqualified: completed with the domain");
    let answer = dig(ns, DNS, &["+noall", "+answer", "db.weave.local"]);
    assert!(answer.contains("\t1\tIN\tA\t10.32.0.7"), "TTL 1 s: {answer}");
    let aaaa = dig(ns, DNS, &["web.weave.local", "AAAA"]);
    assert_eq!(status(&aaaa), "NOERROR", "known name, other type: {aaaa}");
    assert!(aaaa.contains("ANSWER: 0"), "{aaaa}");
    let nx = dig(ns, DNS, &["nothere.weave.local"]);
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    assert!(dig(ns, DNS, &["+short", "-x", "10.32.0.7"]).contains("db.weave.local."), "PTR from the table");
    assert!(dig(ns, DNS, &["+short", "-x", "192.0.2.7"]).contains("upstream.example.test."), "other PTR upstream");
    assert_eq!(short(ns, DNS, "example.test"), vec!["192.0.2.7"], "forwarded over UDP");
    assert!(dig(ns, DNS, &["+tcp", "+short", "example.test"]).contains("192.0.2.7"), "and over TCP");
    assert!(dig(ns, DNS, &["+tcp", "+short", "web.weave.local"]).contains("10.32.0.5"), "ours over TCP");

    // Removal, then the resolv.conf changing under the agent.
    agent.cli(&["dns-remove", "10.32.0.5", "web"]);
    assert_eq!(short(ns, DNS, "web.weave.local"), vec!["10.32.0.6"]);
    let _up2 = Upstream::start(ns, "127.0.0.3", "192.0.2.99");
    std::fs::write(&resolv, "nameserver 127.0.0.3\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || short(ns, DNS, "example.test") == vec!["192.0.2.99"]),
        "re-read when it changes"
    );
    // Never to itself: with only ourselves listed, an answer (SERVFAIL) comes at once.
    std::fs::write(&resolv, format!("nameserver {DNS}\n")).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let start = Instant::now();
    let own = dig(ns, DNS, &["example.test"]);
    assert_eq!(status(&own), "SERVFAIL", "{own}");
    assert!(start.elapsed() < Duration::from_secs(1), "no loop through ourselves");
    let s = agent.cli(&["status", "dns"]);
    assert!(s.contains("web.weave.local.") && s.contains("db.weave.local."), "{s}");
    let _ = std::fs::remove_file(resolv);
}

/// The overlay address of `agent`'s host (the `weft` interface).
fn host_overlay_addr(agent: &Agent) -> String {
    let ok = wait_until(Duration::from_secs(20), || agent.cli(&["ps"]).lines().any(|l| l.starts_with("weft:host ")));
    assert!(ok, "the host joined the overlay:\n{}", agent.log());
    let ps = agent.cli(&["ps"]);
    let line = ps.lines().find(|l| l.starts_with("weft:host ")).unwrap().to_string();
    line.split_whitespace().nth(2).unwrap().to_string()
}

#[test]
fn names_cross_hosts_and_containers_ask_their_host() {
    if !root_or_skip("dns_hosts") {
        return;
    }
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..3).map(|i| underlay.host(&format!("n{i}"))).collect();
    let resolv = resolv_conf(&["127.0.0.1"]);
    let mut agents: Vec<Agent> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| dns_agent(h, if i == 0 { &[] } else { std::slice::from_ref(&hosts[0].ip) }, 3, &resolv))
        .collect();
    assert!(wait_until(Duration::from_secs(20), || agents.iter().all(|a| a.peers().len() == 3)));
    // A container on host 0, registered under its name.
    let c0 = Netns::new("c0");
    agents[0].cli(&["attach", "--netns", c0.path().to_str().unwrap(), "--id", "dataproducer-1", "--dns-name", "dataproducer"]);
    let addr0 = agents[0].cli(&["ps"]).lines().find(|l| l.starts_with("dataproducer-1")).unwrap().split_whitespace().nth(2).unwrap().to_string();
    let start = Instant::now();
    let everywhere = wait_until(Duration::from_secs(5), || {
        hosts.iter().all(|h| short(&h.ns, DNS, "dataproducer") == vec![addr0.clone()])
    });
    assert!(everywhere, "answers on every host");
    eprintln!("name propagated to 3 hosts in {:?}", start.elapsed());
    // A container on host 2 asks its own host over the overlay.
    let c2 = Netns::new("c2");
    agents[2].cli(&["attach", "--netns", c2.path().to_str().unwrap(), "--id", "httpserver-1"]);
    let dns2 = host_overlay_addr(&agents[2]);
    assert!(
        wait_until(Duration::from_secs(10), || short(&c2, &dns2, "dataproducer") == vec![addr0.clone()]),
        "a container resolves through its host's overlay address {dns2}"
    );
    // The agent restarts: the names come back (persisted), everywhere.
    agents[0].kill9();
    agents[0].start();
    assert!(wait_until(Duration::from_secs(20), || agents[0].peers().len() == 3));
    assert!(
        wait_until(Duration::from_secs(10), || hosts.iter().all(|h| short(&h.ns, DNS, "dataproducer") == vec![addr0.clone()])),
        "the name is back after the restart"
    );
    // Container death (detach) removes the name everywhere.
    agents[0].cli(&["detach", "dataproducer-1"]);
    assert!(
        wait_until(Duration::from_secs(5), || hosts.iter().all(|h| status(&dig(&h.ns, DNS, &["dataproducer.weave.local"])) == "NXDOMAIN")),
        "removed everywhere"
    );
    // A peer that leaves takes its names with it.
    agents[1].cli(&["dns-add", "10.32.9.9", "-h", "leaving.weave.local"]);
    assert!(wait_until(Duration::from_secs(5), || short(&hosts[0].ns, DNS, "leaving") == vec!["10.32.9.9"]));
    agents[1].kill9();
    assert!(
        wait_until(Duration::from_secs(5), || status(&dig(&hosts[0].ns, DNS, &["leaving.weave.local"])) == "NXDOMAIN"),
        "its names went with it"
    );
    let _ = std::fs::remove_file(resolv);
}

#[test]
fn a_hundred_containers_truncate_over_udp_and_come_whole_over_tcp() {
    if !root_or_skip("dns_truncation") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("t");
    let resolv = resolv_conf(&["127.0.0.1"]);
    let agent = dns_agent(&host, &[], 1, &resolv);
    for i in 0..100 {
        agent.http("PUT", &format!("/name/c{i}/10.32.1.{}?fqdn=crowd.weave.local", i + 1));
    }
    let udp = dig(&host.ns, DNS, &["+noedns", "+ignore", "crowd.weave.local"]);
    assert!(udp.contains(" tc") || udp.contains("tc "), "UDP answer flagged truncated: {udp}");
    let tcp = dig(&host.ns, DNS, &["+tcp", "+short", "crowd.weave.local"]);
    assert_eq!(tcp.lines().count(), 100, "all 100 over TCP");
    let edns = dig(&host.ns, DNS, &["+bufsize=4096", "+ignore", "+short", "crowd.weave.local"]);
    assert_eq!(edns.lines().count(), 100, "and over UDP with a big enough EDNS buffer");
    let _ = std::fs::remove_file(resolv);
}

#[test]
fn answers_are_shuffled_so_each_address_leads_about_a_third_of_the_time() {
    if !root_or_skip("dns_shuffle") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("s");
    let resolv = resolv_conf(&["127.0.0.1"]);
    let agent = dns_agent(&host, &[], 1, &resolv);
    for i in 1..=3 {
        agent.cli(&["dns-add", &format!("10.32.2.{i}"), "-h", "dataproducer.weave.local"]);
    }
    // 300 queries from one client socket; count which address comes first.
    let firsts = on_thread_in(&host.ns, || {
        use hickory_free_query::*;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut counts = std::collections::BTreeMap::new();
        for id in 0..300u16 {
            sock.send_to(&query(id, "dataproducer.weave.local"), (DNS, 53)).unwrap();
            let mut buf = [0u8; 512];
            let n = sock.recv(&mut buf).unwrap();
            *counts.entry(first_a(&buf[..n])).or_insert(0) += 1;
        }
        counts
    })
    .join()
    .unwrap();
    assert_eq!(firsts.len(), 3, "all three lead sometimes: {firsts:?}");
    // Binomial(300, 1/3): mean 100, sd 8.2; 5 sd either way fails once in millions.
    for (addr, n) in &firsts {
        assert!((59..=141).contains(n), "{addr:?} first {n} times of 300: {firsts:?}");
    }
    let _ = std::fs::remove_file(resolv);
}

/// A hand-made query and the first A record of an answer (no DNS library in tests).
mod hickory_free_query {
    pub fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    /// Skips a (possibly compressed) name starting at `i`; returns the index after it.
    fn skip_name(msg: &[u8], mut i: usize) -> Option<usize> {
        loop {
            let len = *msg.get(i)?;
            if len == 0 {
                return Some(i + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Some(i + 2); // a pointer ends the name
            }
            i += usize::from(len) + 1;
        }
    }

    /// The first A record's address: skips the question, then reads the answer.
    pub fn first_a(msg: &[u8]) -> Option<[u8; 4]> {
        let after_question = skip_name(msg, 12)? + 4; // type, class
        let after_name = skip_name(msg, after_question)?;
        let rd = after_name + 2 + 2 + 4 + 2; // type, class, ttl, rdlength
        msg.get(rd..rd + 4).map(|b| [b[0], b[1], b[2], b[3]])
    }
}

#[test]
fn garbage_floods_and_oversized_packets_never_stop_the_server() {
    if !root_or_skip("dns_garbage") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("g");
    let resolv = resolv_conf(&["127.0.0.1"]);
    let mut agent = dns_agent(&host, &[], 1, &resolv);
    agent.cli(&["dns-add", "10.32.3.3", "-h", "alive.weave.local"]);
    on_thread_in(&host.ns, || {
        use std::io::Write;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Deterministic pseudo-random packets: a bounded fuzz run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..3000 {
            let len = (next() % 600) as usize;
            let mut pkt: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 3 == 0 && len > 12 {
                // A plausible header with garbage after it.
                pkt[2] = 0x01;
                pkt[5] = 1;
            }
            let _ = sock.send_to(&pkt, (DNS, 53));
        }
        // Truncated and oversized.
        let q = super_query();
        for cut in 0..q.len() {
            let _ = sock.send_to(&q[..cut], (DNS, 53));
        }
        let _ = sock.send_to(&vec![0xabu8; 65000], (DNS, 53));
        // A flood of real queries, not waiting for answers.
        for id in 0..5000u16 {
            let mut q = super_query();
            q[..2].copy_from_slice(&id.to_be_bytes());
            let _ = sock.send_to(&q, (DNS, 53));
        }
        // TCP: garbage, a lying length, a half message.
        for junk in [vec![0xffu8; 3000], vec![0x40, 0x00, 1, 2, 3], vec![0x00, 0x1d, 0x12]] {
            if let Ok(mut s) = std::net::TcpStream::connect((DNS, 53)) {
                let _ = s.write_all(&junk);
            }
        }
    })
    .join()
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || short(&host.ns, DNS, "alive.weave.local") == vec!["10.32.3.3"]),
        "still answering"
    );
    assert!(agent.exited().is_none(), "still running");
    assert!(dig(&host.ns, DNS, &["+tcp", "+short", "alive.weave.local"]).contains("10.32.3.3"), "TCP too");
    let _ = std::fs::remove_file(resolv);
}

fn super_query() -> Vec<u8> {
    hickory_free_query::query(7, "alive.weave.local")
}

/// `dig` from `src` in `ns` to `server`, with `args`.
fn dig_from(ns: &Netns, src: &str, server: &str, args: &[&str]) -> String {
    let mut all = vec!["-b", src];
    all.extend_from_slice(args);
    dig(ns, server, &all)
}

#[test]
fn strangers_get_refused_the_overlay_is_forwarded_and_rd_is_honoured() {
    if !root_or_skip("dns_open_resolver") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("or");
    let _up = Upstream::start(&host.ns, "127.0.0.1", "192.0.2.7");
    let resolv = resolv_conf(&["127.0.0.1"]);
    // The DNS also listens on a /32 of the host (not the subnet of the link
    // the stranger comes over).
    host.ns.ip(&["addr", "add", "203.0.113.1/32", "dev", "lo"]);
    let agent = Agent::launch(
        &host,
        &[],
        &[
            "--ipalloc-init",
            "consensus=1",
            "--dns-listen-address",
            &format!("{DNS}:53"),
            "--dns-listen-address",
            "203.0.113.1:53",
            "--resolv-conf",
            resolv.to_str().unwrap(),
        ],
    );
    agent.cli(&["dns-add", "10.32.3.3", "-h", "known.weave.local"]);
    // Another machine on a link of the host: a stranger (192.0.2.2) and, on
    // the same link, a source in the overlay range (10.32.250.2).
    let outside = Netns::new("out");
    host.ns.ip(&["link", "add", "wtout0", "type", "veth", "peer", "name", "wtout1", "netns", outside.name()]);
    host.ns.ip(&["addr", "add", "192.0.2.1/30", "dev", "wtout0"]);
    host.ns.ip(&["link", "set", "wtout0", "up"]);
    host.ns.ip(&["route", "add", "10.32.250.2/32", "dev", "wtout0"]);
    outside.ip(&["addr", "add", "192.0.2.2/30", "dev", "wtout1"]);
    outside.ip(&["addr", "add", "10.32.250.2/32", "dev", "wtout1"]);
    outside.ip(&["link", "set", "wtout1", "up"]);
    outside.ip(&["route", "add", "203.0.113.1/32", "via", "192.0.2.1"]);
    let server = "203.0.113.1";
    let stranger = dig_from(&outside, "192.0.2.2", server, &["example.test"]);
    assert_eq!(status(&stranger), "REFUSED", "a stranger's recursion: {stranger}");
    assert!(!stranger.contains("192.0.2.7"), "{stranger}");
    let ours = dig_from(&outside, "192.0.2.2", server, &["+short", "known.weave.local"]);
    assert!(ours.contains("10.32.3.3"), "the domain is answered for everyone: {ours}");
    let container = dig_from(&outside, "10.32.250.2", server, &["+short", "example.test"]);
    assert!(container.contains("192.0.2.7"), "the overlay is forwarded for: {container}");
    let no_rd = dig_from(&outside, "10.32.250.2", server, &["+nordflag", "example.test"]);
    assert_eq!(status(&no_rd), "REFUSED", "RD clear: not forwarded: {no_rd}");
    let no_rd_ours = dig_from(&outside, "10.32.250.2", server, &["+nordflag", "+short", "known.weave.local"]);
    assert!(no_rd_ours.contains("10.32.3.3"), "RD clear: what we know is answered: {no_rd_ours}");
    assert!(dig(&host.ns, DNS, &["+short", "example.test"]).contains("192.0.2.7"), "this host is forwarded for");
    let (_, metrics) = agent.http("GET", "/metrics");
    let refused = metrics.lines().find(|l| l.starts_with("weft_dns_queries_total{reason=\"refused\"}")).unwrap_or_default();
    assert!(refused.ends_with(" 2"), "both refusals counted: {refused}");
    let _ = std::fs::remove_file(resolv);
}

#[test]
fn a_flood_of_forwards_to_a_silent_upstream_keeps_fds_and_memory_bounded() {
    if !root_or_skip("dns_forward_flood") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("ff");
    // An upstream that never answers: a socket nobody reads.
    let (tx, rx) = std::sync::mpsc::channel();
    let silent = on_thread_in(&host.ns, move || {
        let s = std::net::UdpSocket::bind("127.0.0.9:53").expect("silent upstream");
        tx.send(()).ok();
        std::thread::sleep(Duration::from_secs(40));
        drop(s);
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("silent upstream bound");
    let resolv = resolv_conf(&["127.0.0.9"]);
    let agent = dns_agent(&host, &[], 1, &resolv);
    let pid = agent.pid();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let kb = |field: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (fds_before, rss_before) = (fds(), kb("VmRSS:"));
    // 60k queries for names nobody has, from 64 loopback sources (each within
    // its rate limit: the bound on forwards in flight is what holds).
    let flood = on_thread_in(&host.ns, || {
        let mut sent = 0u32;
        let socks: Vec<std::net::UdpSocket> =
            (1..=64u8).filter_map(|i| std::net::UdpSocket::bind((Ipv4Addr::new(127, 0, 3, i), 0)).ok()).collect();
        for n in 0..60_000u32 {
            let mut q = hickory_free_query::query((n & 0xffff) as u16, &format!("n{n}.flood.test"));
            q[2] |= 0x01; // RD
            if socks[n as usize % socks.len()].send_to(&q, (DNS, 53)).is_ok() {
                sent += 1;
            }
            if n % 2000 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        sent
    });
    let mut max_fds = 0;
    while !flood.is_finished() {
        max_fds = max_fds.max(fds());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = flood.join().expect("flood");
    for _ in 0..20 {
        max_fds = max_fds.max(fds());
        std::thread::sleep(Duration::from_millis(100));
    }
    let peak = kb("VmHWM:");
    let (_, metrics) = agent.http("GET", "/metrics");
    let line = |k: &str| metrics.lines().find(|l| l.starts_with(k)).unwrap_or_default().to_string();
    eprintln!(
        "sent {sent}; fds {fds_before} before, max {max_fds}; RSS {rss_before} kB before, peak {peak} kB; {}; {}",
        line("weft_dns_queries_total{reason=\"overloaded\"}"),
        line("weft_dns_forwards_in_flight")
    );
    assert!(max_fds < fds_before + 100, "file descriptors bounded: {fds_before} → {max_fds}");
    assert!(peak.saturating_sub(rss_before) < 200 * 1024, "memory bounded: {rss_before} kB → peak {peak} kB");
    assert!(!line("weft_dns_queries_total{reason=\"overloaded\"}").ends_with(" 0"), "the excess was counted");
    agent.cli(&["dns-add", "10.32.3.4", "-h", "after.weave.local"]);
    assert!(wait_until(Duration::from_secs(5), || short(&host.ns, DNS, "after.weave.local") == vec!["10.32.3.4"]), "still answering");
    drop(silent);
    let _ = std::fs::remove_file(resolv);
}

//! `cargo xtask demo`: a simulated three-host cluster in network namespaces, a
//! weft agent on each host, two containers per host, and proof that it works:
//! every pair pings and moves a TCP stream, and traffic keeps flowing when an
//! agent stops.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use weft_tests::agent::Agent;
use weft_tests::{Host, Netns, Underlay, root_or_skip, tcp_transfer, wait_until};

const HOSTS: usize = 3;
const PER_HOST: usize = 2;

struct Container {
    ns: Netns,
    host: usize,
    addr: std::net::Ipv4Addr,
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn main() {
    if !root_or_skip("weft demo") {
        std::process::exit(1);
    }
    println!("weft demo: {HOSTS} hosts (network namespaces on one LAN), a weft agent on each, {PER_HOST} containers per host");

    step("hosts and agents");
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..HOSTS).map(|i| underlay.host(&format!("host{}", i + 1))).collect();
    let started = Instant::now();
    let mut agents: Vec<Agent> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let peers = if i == 0 { vec![] } else { vec![hosts[0].ip] };
            Agent::launch(h, &peers, &["--ipalloc-init", "consensus=3"])
        })
        .collect();
    let meshed = wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.established() == HOSTS - 1));
    if !meshed {
        eprintln!("the mesh did not form:\n{}", agents[0].cli(&["status", "peers"]));
        std::process::exit(1);
    }
    for (h, a) in hosts.iter().zip(&agents) {
        println!("  {:<16} underlay {:<13} agent {} ", h.name, h.ip, a.name);
    }
    println!("  full mesh of {HOSTS} peers in {:.1?} (each agent was given only the first host)", started.elapsed());

    step("containers");
    let mut containers = Vec::new();
    for h in 0..HOSTS {
        for c in 0..PER_HOST {
            let addr = std::net::Ipv4Addr::new(10, 32, h as u8 + 1, c as u8 + 1);
            let ns = Netns::new(&format!("c{}{}", h + 1, c + 1));
            agents[h].attach(&ns, &format!("{addr}/12"));
            println!("  {:<16} on {:<16} ethwe {addr}/12", ns.name(), hosts[h].name);
            containers.push(Container { ns, host: h, addr });
        }
    }
    let n = containers.len();
    let known = wait_until(Duration::from_secs(20), || {
        agents.iter().enumerate().all(|(h, a)| {
            let r = a.dp_remotes();
            containers.iter().filter(|c| c.host != h).all(|c| r.contains(&c.addr.to_string()))
        })
    });
    println!("  every host's data path knows the {n} endpoints: {known}");

    step("ping, every pair (same host and across hosts)");
    let (mut ok, mut total) = (0, 0);
    for a in &containers {
        let mut row = String::new();
        for b in &containers {
            if a.addr == b.addr {
                row.push_str("  - ");
                continue;
            }
            total += 1;
            let pinged = a.ns.ping_within(b.addr, Duration::from_secs(3));
            ok += usize::from(pinged);
            row.push_str(if pinged { " ok " } else { "FAIL" });
        }
        println!("  {:<15}{row}", a.addr);
    }
    println!("  {ok}/{total} pairs answered");

    step("TCP, every pair, 4 MiB each");
    let (mut tcp_ok, mut port) = (0, 7000);
    let t0 = Instant::now();
    for a in &containers {
        for b in &containers {
            if a.addr != b.addr {
                port += 1;
                tcp_ok += usize::from(tcp_transfer(&b.ns, b.addr, &a.ns, port, 4 << 20));
            }
        }
    }
    println!("  {tcp_ok}/{total} streams arrived intact ({} MiB in {:.1?})", 4 * total, t0.elapsed());

    step("what the kernel did (host1's counters; no packet went through the agent)");
    let report = agents[0].report();
    let paths = &report["datapath"]["stats"]["paths"];
    for p in ["arp_reply", "local", "encap", "decap", "relay", "pass"] {
        println!("  {p:<10} {:>8} packets", paths[p]["packets"].as_u64().unwrap_or(0));
    }

    step("stop host2's agent: the data path keeps forwarding");
    agents[1].stop();
    let across: Vec<(&Container, &Container)> = containers
        .iter()
        .flat_map(|a| containers.iter().map(move |b| (a, b)))
        .filter(|(a, b)| a.host != b.host && (a.host == 1 || b.host == 1))
        .collect();
    let still = across.iter().filter(|(a, b)| a.ns.ping(b.addr)).count();
    println!("  {still}/{} pairs to and from host2 still answer with its agent stopped", across.len());
    agents[1].start();
    let back = wait_until(Duration::from_secs(20), || agents[1].established() == HOSTS - 1);
    println!("  agent restarted and adopted its pinned data path: rejoined the mesh = {back}");

    let success = ok == total && tcp_ok == total && still == across.len() && back;
    println!("\n{}", if success { "weft works: every pair talks, across hosts, in the kernel." } else { "SOMETHING FAILED (see above)" });

    if std::io::stdin().is_terminal() {
        println!("\nThe cluster is up. In another terminal, for example:");
        println!("  nsenter --net=/run/netns/{} {} status", hosts[0].name, weft_tests::agent::weft_bin().display());
        println!("  nsenter --net=/run/netns/{} ping {}", containers[0].ns.name(), containers[n - 1].addr);
        println!("  bpftool map dump pinned /sys/fs/bpf/weft/{}/ENDPOINTS", hosts[0].name);
        println!("Press Enter to tear it down.");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    drop(containers);
    drop(agents);
    drop(hosts);
    drop(underlay);
    if !success {
        std::process::exit(1);
    }
}

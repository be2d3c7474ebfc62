//! `cargo xtask demo`: the reference demo (../shared/reference/) on a simulated
//! cluster. Three hosts (network namespaces on one LAN), each with its own
//! Docker Engine and weft agent; through weft's Docker API proxy each runs the
//! guide's `dataproducer` and `httpserver`, and the blog's `hit-counter` with
//! one `redis` for all. Then every httpserver is fetched several times and the
//! answers show data producers on different hosts, found by name.
//!
//! Enter at the end, Ctrl-C, SIGTERM or a closed terminal (SIGHUP) at any
//! point tear it all down the same way ([`weft_tests::cleanup`]).
//! `WEFT_DEMO_SMALL=1` runs two hosts without Redis (the teardown tests use it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use weft_tests::demo::{self, http_get, producer_message};
use weft_tests::docker::{BUSYBOX, DockerHost};
use weft_tests::{Underlay, cleanup, root_or_skip, wait_until};

fn step(what: &str) {
    println!("\n== {what}");
}

/// Stops the demo: tears everything down (the same steps as Enter or Ctrl-C)
/// and exits with 1.
fn fail(what: &str) -> ! {
    eprintln!("SOMETHING FAILED: {what}");
    cleanup::teardown();
    std::process::exit(1);
}

fn main() {
    if !root_or_skip("weft demo") {
        std::process::exit(1);
    }
    // Ctrl-C, SIGTERM and SIGHUP tear down from here on.
    cleanup::install();
    let small = std::env::var_os("WEFT_DEMO_SMALL").is_some_and(|v| v == "1");
    let (n_hosts, fetches): (usize, usize) = if small { (2, 6) } else { (3, 6) };
    println!("weft demo: {n_hosts} hosts (network namespaces on one LAN), each with its own dockerd and weft agent");

    step("hosts, Docker engines, agents");
    let started = Instant::now();
    let mut lan = Underlay::new();
    let consensus = format!("consensus={n_hosts}");
    let mut hosts: Vec<DockerHost> = Vec::new();
    for i in 0..n_hosts {
        let peers = hosts.first().map(|h| vec![h.host.ip]).unwrap_or_default();
        let host = lan.host(&format!("host{}", i + 1));
        // A host that forwards, as a Docker host does (dockerd runs with
        // --ip-forward=false and would not set it): otherwise every `docker run`
        // warns "IPv4 forwarding is disabled". Per namespace, read by dockerd at
        // its start.
        host.ns.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        hosts.push(DockerHost::launch_on(host, &peers, &["--ipalloc-init", &consensus]));
    }
    if !wait_until(Duration::from_secs(30), || hosts.iter().all(|h| h.agent.established() == n_hosts - 1)) {
        fail(&format!("the mesh did not form:\n{}", hosts[0].agent.cli(&["status", "peers"])));
    }
    // Short names for the output (the namespaces have unique ones).
    let label = |h: &DockerHost| format!("host{}", hosts.iter().position(|x| std::ptr::eq(x, h)).unwrap_or(0) + 1);
    for h in &hosts {
        println!("  {:<6} netns {:<16} underlay {:<13} DOCKER_HOST={}", label(h), h.host.name, h.host.ip, h.proxy);
    }
    println!("  {n_hosts} dockerds up, agents in a full mesh after {:.1?} (each was given only host1)", started.elapsed());

    step("images, built locally (no registry)");
    for h in &hosts {
        if let Err(e) = demo::build_apps(&mut h.proxied()) {
            fail(&e);
        }
    }
    println!("  {} built with `docker build` through the proxy on every host (busybox: sh, nc, httpd)", demo::APPS);
    let redis = if small { Err("WEFT_DEMO_SMALL=1".to_string()) } else { demo::load_redis(&hosts[0].dockerd) };
    match &redis {
        Ok(()) => println!("  {} from Debian's redis-server on host1", weft_tests::docker::REDIS),
        Err(e) => println!("  no Redis image ({e}): the hit counter is left out"),
    }

    step("containers, started with the docker CLI through weft's proxy");
    let t0 = Instant::now();
    for h in &hosts {
        for (name, cmd) in [("dataproducer", demo::dataproducer_cmd()), ("httpserver", demo::httpserver_cmd())] {
            let mut args = vec!["run", "-d", "--name", name];
            args.extend(cmd);
            h.docker_ok(&args);
        }
        if redis.is_ok() {
            let mut args = vec!["run", "-d", "--name", "hit-counter"];
            args.extend(demo::hit_counter_cmd());
            h.docker_ok(&args);
        }
    }
    if redis.is_ok() {
        let mut args = vec!["run", "-d", "--name", "redis"];
        args.extend(demo::redis_cmd());
        hosts[0].docker_ok(&args);
    }
    // Attaching follows Docker's start event; wait for every container (and the
    // host's own overlay address) before showing them.
    let expected = if redis.is_ok() { 3 } else { 2 };
    let attached = wait_until(Duration::from_secs(20), || {
        hosts.iter().enumerate().all(|(i, h)| {
            let ps = h.agent.cli(&["ps"]);
            ps.lines().count() == 1 + expected + usize::from(redis.is_ok() && i == 0)
        })
    });
    if !attached {
        let ps: Vec<String> = hosts.iter().map(|h| h.agent.cli(&["ps"])).collect();
        fail(&format!("not every container was attached:\n{}\n{}", ps.join("\n"), hosts[n_hosts - 1].agent.log()));
    }
    let mut host_of: BTreeMap<String, String> = BTreeMap::new();
    for h in &hosts {
        println!("  {}: weft ps", label(h));
        for line in h.agent.cli(&["ps"]).lines() {
            println!("    {line}");
            for w in line.split_whitespace().filter(|w| w.parse::<std::net::Ipv4Addr>().is_ok()) {
                host_of.insert(w.to_string(), label(h));
            }
        }
    }
    let everywhere = wait_until(Duration::from_secs(20), || hosts.iter().all(|h| h.agent.dns_lookup("dataproducer").len() == n_hosts));
    println!("  every host's DNS knows the {n_hosts} data producers: {everywhere} ({:.1?} after the first docker run)", t0.elapsed());
    if !everywhere {
        fail("names did not spread");
    }


    step("DNS: the guide's `dig +short dataproducer`, from a container, twice (answers shuffled)");
    for _ in 0..2 {
        let out = hosts[1].docker(&["run", "--rm", BUSYBOX, "nslookup", "dataproducer"]);
        let addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("Address: "))
            .map(str::to_string)
            .collect();
        println!("  {}", addrs.join("  "));
    }

    step(&format!("fetch every httpserver {fetches} times (from each host's own namespace)"));
    let mut producers_seen: BTreeSet<String> = BTreeSet::new();
    let mut answered = 0;
    for h in &hosts {
        let Some(addr) = h.addrs_of("httpserver").first().and_then(|a| a.parse().ok()) else { fail("httpserver has no address") };
        println!("  {} httpserver http://{addr}/", label(h));
        for _ in 0..fetches {
            let page = http_get(&h.host.ns, addr, "/");
            match page.as_deref().and_then(producer_message) {
                Some(msg) if msg.starts_with("Hi, this is the data producer in ") => {
                    answered += 1;
                    let ip = msg.rsplit(' ').next().unwrap_or_default().to_string();
                    let on = host_of.get(&ip).cloned().unwrap_or_else(|| "?".into());
                    println!("    {msg}   (on {on})");
                    producers_seen.insert(on);
                }
                _ => println!("    no answer: {page:?}"),
            }
        }
    }
    let total = n_hosts * fetches;
    println!("  {answered}/{total} answered, by data producers on {} hosts: {}", producers_seen.len(), producers_seen.iter().cloned().collect::<Vec<_>>().join(", "));
    let mut success = answered == total && producers_seen.len() >= 2;

    if redis.is_ok() {
        step("the hit counter: one redis on host1, a hit-counter on every host, found by name");
        let mut counts = Vec::new();
        for h in &hosts {
            let Some(addr) = h.addrs_of("hit-counter").first().and_then(|a| a.parse().ok()) else { fail("hit-counter has no address") };
            for _ in 0..2 {
                let page = http_get(&h.host.ns, addr, "/").unwrap_or_default();
                println!("  {}: {}", label(h), page.trim());
                counts.push(page.split("seen ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<u64>().ok()));
            }
        }
        let counted = counts.iter().all(Option::is_some) && counts.windows(2).all(|w| w[0] < w[1]);
        println!("  every hit counted once, in order: {counted}");
        success &= counted;
    }

    step("what the kernel did (host1's data path; no packet went through the agent)");
    let report = hosts[0].agent.report();
    let paths = &report["datapath"]["stats"]["paths"];
    for p in ["arp_reply", "local", "encap", "decap", "pass"] {
        println!("  {p:<10} {:>8} packets", paths[p]["packets"].as_u64().unwrap_or(0));
    }

    println!(
        "\n{}",
        if success {
            "weft works: containers started with plain docker commands find each other by name, across hosts, load-balanced."
        } else {
            "SOMETHING FAILED (see above)"
        }
    );
    if std::io::stdin().is_terminal() {
        println!("\nThe cluster is up. In another terminal, for example:");
        println!("  DOCKER_HOST={} docker ps", hosts[0].proxy);
        println!("  DOCKER_HOST={} docker run --rm {BUSYBOX} nslookup httpserver", hosts[1].proxy);
        println!("  nsenter --net=/run/netns/{} {} status", hosts[0].host.name, weft_tests::agent::weft_bin().display());
        println!("Press Enter (or Ctrl-C) to tear it down.");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    cleanup::teardown();
    drop(hosts);
    drop(lan);
    if !success {
        std::process::exit(1);
    }
}

//! `cargo xtask bench attach`: what weft adds to `docker run`. The time from
//! `docker run` to the application having reached a peer by name (the client
//! connects at its first instruction, gets the server's answer and exits),
//! against the same container with `--network none` (no attach, no weft-wait:
//! the proxy leaves it alone, the name does not resolve and nc exits at once).
//! Also against the default network with weft told to stay away
//! (`WEFT_CIDR=none`), since Docker's `none` network costs time of its own.
//! All through the proxy, interleaved, on a two-host cluster with the server
//! on the other host.

use std::time::{Duration, Instant};

use super::{Table, median, percentile};
use crate::docker::{BUSYBOX, DockerHost};
use crate::{Underlay, wait_until};

pub fn run_bench(runs: u32) {
    let mut lan = Underlay::new();
    let two = ["--ipalloc-init", "consensus=2"];
    let a = DockerHost::launch(&mut lan, "a", &[], &two);
    let b = DockerHost::launch(&mut lan, "b", &[a.host.ip], &two);
    assert!(wait_until(Duration::from_secs(20), || a.agent.established() == 1 && b.agent.established() == 1), "mesh");
    a.docker_ok(&["run", "-d", "--init", "--name", "server", BUSYBOX, "nc", "-ll", "-p", "4540", "-e", "hostname", "-i"]);
    let server = a.attached_addrs("server");
    assert_eq!(server.len(), 1, "server attached");
    let ok = wait_until(Duration::from_secs(10), || {
        b.agent.dns_lookup("server") == server
    });
    assert!(ok, "the name reaches host b");


    let client = ["run", "--rm", BUSYBOX, "nc", "-w", "5", "server", "4540"];
    let none = ["run", "--rm", "--network", "none", BUSYBOX, "nc", "-w", "5", "server", "4540"];
    // Docker's `none` network has costs of its own; the default network with
    // weft told to stay away (WEFT_CIDR=none) is the other baseline.
    let unattached = ["run", "--rm", "-e", "WEFT_CIDR=none", BUSYBOX, "nc", "-w", "5", "server", "4540"];
    // Warm up: image layers, the first IPAM space on b.
    assert_eq!(b.docker_ok(&client), server[0]);
    let _ = b.docker(&none);

    let (mut weft, mut bare, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    let mut failures = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let out = b.docker(&client);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == server[0] {
            weft.push(ms);
        } else {
            failures += 1;
        }
        let t = Instant::now();
        let _ = b.docker(&none);
        bare.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let _ = b.docker(&unattached);
        plain.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Packets the data paths dropped for want of an entry: what a race
    // between a new container's first packets and its announcement costs.
    let unknown: u64 = [&a, &b]
        .iter()
        .map(|h| h.agent.report()["datapath"]["stats"]["drops"]["unknown_destination"]["packets"].as_u64().unwrap_or(0))
        .sum();
    let (wm, nm, pm) = (median(weft.clone()), median(bare.clone()), median(plain.clone()));
    let mut table = Table::new(&["docker run", "median ms", "p90 ms", "runs"]);
    table.row(vec!["on weft (attach + wait + DNS + TCP to the other host)".into(), format!("{wm:.0}"), format!("{:.0}", percentile(weft.clone(), 90.0)), weft.len().to_string()]);
    table.row(vec!["--network none (same container)".into(), format!("{nm:.0}"), format!("{:.0}", percentile(bare, 90.0)), runs.to_string()]);
    table.row(vec!["-e WEFT_CIDR=none (default network, not attached)".into(), format!("{pm:.0}"), format!("{:.0}", percentile(plain, 90.0)), runs.to_string()]);
    println!("{table}");
    println!("interleaved runs through the proxy on host b, server on host a; {failures} weft runs did not reach the server; {unknown} packets dropped for an unknown destination");
    println!(
        "bench attach: added_ms={:.0} added_over_unattached_ms={:.0} weft_ms={wm:.0} none_ms={nm:.0} unattached_ms={pm:.0} failures={failures}",
        wm - nm,
        wm - pm
    );
}

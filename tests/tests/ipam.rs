//! IPAM with real agents: parallel allocations, partitions, crashes, rmpeer,
//! automatic reclaim, claims, seeds and observers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use weft_tests::agent::{Agent, http_in};
use weft_tests::{Host, Underlay, root_or_skip, wait_until};

/// `n` agents on a LAN, all told the first host and `consensus=n` (plus `extra`).
fn cluster(n: usize, extra: &[&str]) -> (Underlay, Vec<Host>, Vec<Agent>) {
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..n).map(|i| underlay.host(&format!("i{i}"))).collect();
    let init = format!("consensus={n}");
    let mut args = vec!["--ipalloc-init", init.as_str(), "--ipalloc-range", "10.32.0.0/16"];
    args.extend_from_slice(extra);
    let agents: Vec<Agent> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Agent::launch(h, if i == 0 { &[] } else { std::slice::from_ref(&hosts[0].ip) }, &args))
        .collect();
    assert!(wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.peers().len() == n)), "mesh of {n}");
    (underlay, hosts, agents)
}

fn allocate(agent: &Agent, id: &str) -> Result<Ipv4Addr, String> {
    let (code, body) = agent.http("POST", &format!("/ip/{id}"));
    if code != 200 {
        return Err(format!("{code}: {}", body.trim()));
    }
    body.trim().split('/').next().and_then(|a| a.parse().ok()).ok_or_else(|| format!("bad answer {body:?}"))
}

/// Every allocation every agent holds: address → (agent, id).
fn all_allocations(agents: &[&Agent]) -> Vec<(Ipv4Addr, usize, String)> {
    let mut out = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let r = a.report();
        for (id, addrs) in r["ipam"]["allocations"].as_object().cloned().unwrap_or_default() {
            for addr in addrs.as_array().cloned().unwrap_or_default() {
                out.push((addr.as_str().unwrap().parse().unwrap(), i, id.clone()));
            }
        }
    }
    out
}

fn assert_no_duplicates(allocs: &[(Ipv4Addr, usize, String)]) {
    let mut seen: BTreeMap<Ipv4Addr, (usize, &str)> = BTreeMap::new();
    for (a, i, id) in allocs {
        if let Some(prev) = seen.insert(*a, (*i, id)) {
            panic!("{a} allocated twice: agent {} {} and agent {i} {id}", prev.0, prev.1);
        }
    }
}

/// Who owns how much, as one agent sees it.
#[test]
fn a_thousand_parallel_allocations_never_duplicate() {
    if !root_or_skip("ipam_parallel") {
        return;
    }
    let (_u, _hosts, agents) = cluster(5, &[]);
    let total = 1000;
    let per_thread = total / (agents.len() * 4);
    let results: Vec<Vec<Ipv4Addr>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, a) in agents.iter().enumerate() {
            for t in 0..4 {
                let ns = a.netns().alias();
                handles.push(s.spawn(move || {
                    (0..per_thread)
                        .map(|k| {
                            let (code, body) = http_in(&ns, "POST", &format!("/ip/c{i}-{t}-{k}"));
                            assert_eq!(code, 200, "allocation failed: {body}");
                            body.trim().split('/').next().unwrap().parse().unwrap()
                        })
                        .collect::<Vec<Ipv4Addr>>()
                }));
            }
        }
        handles.into_iter().map(|h| h.join().expect("allocator thread")).collect()
    });
    let all: Vec<Ipv4Addr> = results.into_iter().flatten().collect();
    assert_eq!(all.len(), total);
    let unique: BTreeSet<&Ipv4Addr> = all.iter().collect();
    assert_eq!(unique.len(), total, "no address handed out twice");
    assert!(all.iter().all(|a| a.octets()[..2] == [10, 32]), "all inside the range");
    let refs: Vec<&Agent> = agents.iter().collect();
    assert_no_duplicates(&all_allocations(&refs));
}

/// Drops all traffic between `host` and the addresses in `others` (nftables in
/// the test's own namespace), or removes that again.
fn cut(host: &Host, others: &[Ipv4Addr]) {
    let set = others.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    host.ns.run("nft", &["add", "table", "inet", "weftcut"]);
    host.ns.run("nft", &["add chain inet weftcut in { type filter hook input priority -300; policy accept; }"]);
    host.ns.run("nft", &["add chain inet weftcut out { type filter hook output priority -300; policy accept; }"]);
    host.ns.run("nft", &[&format!("add rule inet weftcut in ip saddr {{ {set} }} drop")]);
    host.ns.run("nft", &[&format!("add rule inet weftcut out ip daddr {{ {set} }} drop")]);
}

fn heal(host: &Host) {
    host.ns.run("nft", &["delete", "table", "inet", "weftcut"]);
}

#[test]
fn a_partition_allocates_on_both_sides_and_heals_without_duplicates() {
    if !root_or_skip("ipam_partition") {
        return;
    }
    let (_u, hosts, agents) = cluster(4, &["--ipalloc-reclaim-after", "never"]);
    // Decide the ring and spread some allocations first.
    for (i, a) in agents.iter().enumerate() {
        allocate(a, &format!("before{i}")).expect("allocation before the partition");
    }
    let (left, right) = ([0, 1], [2, 3]);
    for &l in &left {
        cut(&hosts[l], &right.iter().map(|r| hosts[*r].ip).collect::<Vec<_>>());
    }
    for &r in &right {
        cut(&hosts[r], &left.iter().map(|l| hosts[*l].ip).collect::<Vec<_>>());
    }
    assert!(
        wait_until(Duration::from_secs(10), || agents.iter().all(|a| a.peers().len() == 2)),
        "each side sees only itself"
    );
    // Both sides allocate, more than their own share: space moves within a side.
    for round in 0..60 {
        for (i, a) in agents.iter().enumerate() {
            allocate(a, &format!("during{i}-{round}")).expect("allocation during the partition");
        }
    }
    for h in &hosts {
        heal(h);
    }
    assert!(wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.peers().len() == 4)), "healed");
    let refs: Vec<&Agent> = agents.iter().collect();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let first = agents[0].ownership();
            agents.iter().all(|a| a.ownership() == first)
        }),
        "every ring identical after healing"
    );
    let all = all_allocations(&refs);
    // Each host's own overlay address is an allocation too (id weft:host).
    let containers = all.iter().filter(|(_, _, id)| id != "weft:host").count();
    assert_eq!(containers, 4 + 4 * 60);
    assert_no_duplicates(&all);
}

#[test]
fn kill9_and_restart_keep_every_allocation() {
    if !root_or_skip("ipam_kill9") {
        return;
    }
    let (_u, _hosts, mut agents) = cluster(2, &[]);
    let before: Vec<Ipv4Addr> = (0..50).map(|k| allocate(&agents[1], &format!("k{k}")).unwrap()).collect();
    agents[1].kill9();
    agents[1].start();
    for (k, addr) in before.iter().enumerate() {
        let (code, body) = agents[1].http("GET", &format!("/ip/k{k}"));
        assert_eq!(code, 200, "{body}");
        assert_eq!(body.trim().split('/').next().unwrap(), addr.to_string(), "k{k} kept its address");
    }
    // Asking again gives the same; new ones never collide with the old.
    assert_eq!(allocate(&agents[1], "k7").unwrap(), before[7]);
    let after: BTreeSet<Ipv4Addr> = (0..50).map(|k| allocate(&agents[1], &format!("n{k}")).unwrap()).collect();
    assert!(after.iter().all(|a| !before.contains(a)), "nothing handed out twice after the crash");
}

/// A peer stopped on purpose (`weft stop`) still forwards for its containers,
/// which keep their addresses: `rmpeer` refuses it and says why, unless
/// `--force`. A peer name nobody knows is an error, not "0 taken over".
#[test]
fn rmpeer_refuses_a_stopped_peer_unless_forced_and_an_unknown_one() {
    if !root_or_skip("ipam_rmpeer_stopped") {
        return;
    }
    let (_u, _hosts, mut agents) = cluster(2, &["--ipalloc-reclaim-after", "never"]);
    allocate(&agents[1], "kept").unwrap();
    let stopped = agents[1].name.clone();
    assert!(wait_until(Duration::from_secs(10), || agents[0].ownership().get(&stopped).copied().unwrap_or(0) > 0));
    agents[1].stop();
    assert!(
        wait_until(Duration::from_secs(10), || agents[0].report()["router"]["held"].as_array().is_some_and(|h| !h.is_empty())),
        "held: {}",
        agents[0].report()["router"]
    );
    let refused = agents[0].try_cli(&["rmpeer", &stopped]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("stopped on purpose") && err.contains("--force"), "{err}");
    assert!(agents[0].ownership().get(&stopped).copied().unwrap_or(0) > 0, "its space stays its own");
    let unknown = agents[0].try_cli(&["rmpeer", "02:00:00:00:00:99"]);
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success() && err.contains("unknown peer"), "{err}");
    let forced = agents[0].cli(&["rmpeer", "--force", &stopped]);
    assert!(forced.contains("addresses taken over"), "{forced}");
    assert!(wait_until(Duration::from_secs(10), || !agents[0].ownership().contains_key(&stopped)), "forced: taken over");
}

#[test]
fn rmpeer_takes_over_a_dead_peers_space() {
    if !root_or_skip("ipam_rmpeer") {
        return;
    }
    let (_u, _hosts, mut agents) = cluster(3, &["--ipalloc-reclaim-after", "never"]);
    allocate(&agents[0], "x").unwrap();
    let dead = agents[2].name.clone();
    assert!(wait_until(Duration::from_secs(10), || agents[0].ownership().get(&dead).copied().unwrap_or(0) > 0));
    // rmpeer refuses a live peer.
    let live = agents[0].try_cli(&["rmpeer", &agents[1].name]);
    assert!(!live.status.success() && String::from_utf8_lossy(&live.stderr).contains("reachable"));
    agents[2].kill9();
    assert!(wait_until(Duration::from_secs(5), || agents[0].peers().len() == 2));
    let out = agents[0].cli(&["rmpeer", &dead]);
    assert!(out.contains("addresses taken over"), "{out}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            agents[..2].iter().all(|a| !a.ownership().contains_key(&dead))
        }),
        "the dead peer owns nothing anywhere"
    );
    let total: u64 = agents[1].ownership().values().sum();
    assert_eq!(total, 65536, "the whole range is still owned");
    // Its space is usable (after the settle period).
    let status = agents[0].cli(&["status", "ipam"]);
    assert!(status.contains("Status: ready"), "{status}");
}

#[test]
fn a_dead_peers_space_is_reclaimed_automatically_by_exactly_one_peer() {
    if !root_or_skip("ipam_reclaim") {
        return;
    }
    let (_u, _hosts, mut agents) = cluster(4, &["--ipalloc-reclaim-after", "2s"]);
    allocate(&agents[0], "x").unwrap();
    let dead = agents[3].name.clone();
    assert!(wait_until(Duration::from_secs(10), || agents.iter().all(|a| a.ownership().len() == 4)));
    let before = agents[0].ownership();
    agents[3].kill9();
    let reclaimed = wait_until(Duration::from_secs(20), || {
        agents[..3].iter().all(|a| !a.ownership().contains_key(&dead))
    });
    assert!(reclaimed, "reclaimed after the grace period");
    let after = agents[0].ownership();
    let gainers: Vec<&String> = after.iter().filter(|(p, n)| before.get(*p).is_some_and(|b| *n > b)).map(|(p, _)| p).collect();
    assert_eq!(gainers.len(), 1, "exactly one peer took the space: {before:?} -> {after:?}");
    let smallest = agents[..3].iter().map(|a| a.name.clone()).min().unwrap();
    assert_eq!(gainers[0], &smallest, "the live peer with the smallest name");
    assert_eq!(after.values().sum::<u64>(), 65536);
    for a in &agents[1..3] {
        assert_eq!(a.ownership(), after, "every live peer agrees");
    }
}

#[test]
fn a_minority_never_reclaims() {
    if !root_or_skip("ipam_minority") {
        return;
    }
    let (_u, hosts, agents) = cluster(4, &["--ipalloc-reclaim-after", "1s"]);
    allocate(&agents[0], "x").unwrap();
    assert!(wait_until(Duration::from_secs(10), || agents.iter().all(|a| a.ownership().len() == 4)));
    // Host 0 alone against three: it must not take their space.
    cut(&hosts[0], &hosts[1..].iter().map(|h| h.ip).collect::<Vec<_>>());
    for h in &hosts[1..] {
        cut(h, &[hosts[0].ip]);
    }
    std::thread::sleep(Duration::from_secs(6));
    let lonely = agents[0].ownership();
    assert_eq!(lonely.len(), 4, "the minority side reclaimed nothing: {lonely:?}");
    for h in &hosts {
        heal(h);
    }
}

#[test]
fn a_claim_against_a_stopped_peer_answers_at_once() {
    if !root_or_skip("ipam_claim") {
        return;
    }
    let (_u, _hosts, mut agents) = cluster(2, &["--ipalloc-reclaim-after", "never"]);
    allocate(&agents[0], "x").unwrap();
    assert!(wait_until(Duration::from_secs(10), || agents[0].ownership().len() == 2));
    // An address in agent 1's half: the ring is cut in name order.
    let theirs = if agents[1].name < agents[0].name { "10.32.100.7" } else { "10.32.200.7" };
    agents[1].stop();
    let start = Instant::now();
    let (code, body) = agents[0].http("PUT", &format!("/ip/mine/{theirs}"));
    assert!(start.elapsed() < Duration::from_secs(3), "answered in {:?}", start.elapsed());
    assert_ne!(code, 200);
    assert!(body.contains("not reachable") && body.contains("rmpeer"), "{body}");
}

#[test]
fn differently_seeded_peers_refuse_each_other_and_keep_running() {
    if !root_or_skip("ipam_seed") {
        return;
    }
    let mut underlay = Underlay::new();
    let (ha, hb) = (underlay.host("sa"), underlay.host("sb"));
    let name_a = weft_tests::agent::peer_name("seed-a");
    let name_b = weft_tests::agent::peer_name("seed-b");
    let mut a = Agent::launch(&ha, &[], &["--name", &name_a, "--ipalloc-init", &format!("seed={name_a}")]);
    let mut b = Agent::launch(&hb, &[ha.ip], &["--name", &name_b, "--ipalloc-init", &format!("seed={name_b}")]);
    let refused = wait_until(Duration::from_secs(10), || {
        a.log().contains("refusing the address space") || b.log().contains("refusing the address space")
    });
    assert!(refused, "a clear message:\n{}\n{}", a.log(), b.log());
    let log = format!("{}{}", a.log(), b.log());
    assert!(log.contains("--ipalloc-init"), "the message says what to do");
    std::thread::sleep(Duration::from_secs(1));
    assert!(a.exited().is_none() && b.exited().is_none(), "both keep running");
    assert!(allocate(&a, "x").is_ok() && allocate(&b, "y").is_ok(), "and keep serving their own");
    let status = a.cli(&["status", "ipam"]);
    let status_b = b.cli(&["status", "ipam"]);
    assert!(status.contains("Conflict") || status_b.contains("Conflict"), "{status}{status_b}");
}

#[test]
fn an_observer_triggers_the_election_but_gets_no_vote_and_no_space() {
    if !root_or_skip("ipam_observer") {
        return;
    }
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..3).map(|i| underlay.host(&format!("o{i}"))).collect();
    let voter = ["--ipalloc-init", "consensus=2", "--ipalloc-range", "10.32.0.0/16"];
    let a = Agent::launch(&hosts[0], &[], &voter);
    let b = Agent::launch(&hosts[1], &[hosts[0].ip], &voter);
    let obs = Agent::launch(&hosts[2], &[hosts[0].ip], &["--ipalloc-init", "observer", "--ipalloc-range", "10.32.0.0/16"]);
    assert!(wait_until(Duration::from_secs(20), || [&a, &b, &obs].iter().all(|x| x.peers().len() == 3)));
    // Nobody allocated yet: the observer's request starts the election.
    let addr = allocate(&obs, "watcher").expect("the observer gets an address (by donation)");
    assert!(addr.octets()[..2] == [10, 32]);
    let owners = a.ownership();
    assert!(owners.contains_key(&a.name) && owners.contains_key(&b.name), "{owners:?}");
    let observer_share = owners.get(&obs.name).copied().unwrap_or(0);
    // The ring was cut between the two voters only; the observer then got a
    // donation: half of one voter's free half.
    assert!(observer_share <= 65536 / 4, "the observer was not in the value; it got a donation at most: {owners:?}");
}

//! Real agents, one per namespace host: the mesh forms, traffic flows on every
//! pair, a line relays, a killed agent disappears and comes back, a stopped one
//! keeps forwarding, passwords are enforced and hide the control traffic, and
//! garbage at every protocol stage only costs its own connection.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::Duration;

use weft_tests::agent::{Agent, weft_in, weft_unprivileged};
use weft_tests::{Capture, Host, Netns, Underlay, on_thread_in, root_or_skip, tcp_transfer, wait_until};

/// A fixed container address per host, away from the starts of the ring's
/// ranges (where each host's own overlay address is allocated).
fn overlay_addr(h: usize) -> String {
    format!("10.{}.100.1/12", 32 + h)
}

fn overlay_ip(h: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 32 + h as u8, 100, 1)
}

/// `n` hosts on a LAN, each with an agent (all given the first host as peer) and
/// one attached container.
fn lan(n: usize, extra: &[&str]) -> (Underlay, Vec<Host>, Vec<Agent>, Vec<Netns>) {
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..n).map(|i| underlay.host(&format!("m{i}"))).collect();
    let first = hosts[0].ip;
    // Every peer must agree on the consensus size (Paxos quorums must intersect).
    let init = format!("consensus={n}");
    let mut args: Vec<&str> = vec!["--ipalloc-init", &init];
    args.extend_from_slice(extra);
    let agents: Vec<Agent> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Agent::launch(h, if i == 0 { &[] } else { std::slice::from_ref(&first) }, &args))
        .collect();
    let containers: Vec<Netns> = (0..n).map(|i| Netns::new(&format!("k{i}"))).collect();
    // Fixed addresses are claimed from their owners: the mesh must be up first
    // (a claim against an unreachable owner fails at once, by design).
    wait_mesh(&agents.iter().collect::<Vec<_>>());
    for (i, a) in agents.iter().enumerate() {
        a.attach(&containers[i], &overlay_addr(i));
    }
    (underlay, hosts, agents, containers)
}

/// Waits until every agent sees every other as a peer.
fn wait_mesh(agents: &[&Agent]) {
    let n = agents.len();
    assert!(
        wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.peers().len() == n)),
        "the mesh of {n} forms"
    );
}

fn wait_full_mesh(agents: &[Agent]) {
    let n = agents.len();
    let ok = wait_until(Duration::from_secs(30), || {
        agents.iter().enumerate().all(|(i, a)| {
            let remotes = a.dp_remotes();
            a.peers().len() == n
                && a.established() == n - 1
                && (0..n).filter(|j| *j != i).all(|j| remotes.contains(&overlay_ip(j).to_string()))
        })
    });
    if !ok {
        for a in agents {
            eprintln!(
                "{}: peers {:?} established {} remotes {:?}\n{}",
                a.nickname,
                a.peers(),
                a.established(),
                a.dp_remotes(),
                a.cli(&["status", "peers"])
            );
        }
    }
    assert!(ok, "a full mesh of {n} forms, every data path knows every remote endpoint");
}

#[test]
fn five_agents_form_a_full_mesh_and_every_pair_talks() {
    if !root_or_skip("five_agents") {
        return;
    }
    let (_u, _hosts, agents, containers) = lan(5, &[]);
    wait_full_mesh(&agents);
    let mut port = 6000;
    for a in 0..5 {
        for b in 0..5 {
            if a == b {
                continue;
            }
            assert!(containers[a].ping_within(overlay_ip(b), Duration::from_secs(5)), "{a} -> {b} ping");
            port += 1;
            assert!(tcp_transfer(&containers[b], overlay_ip(b), &containers[a], port, 1 << 20), "{a} -> {b} TCP");
        }
    }
    // The status tables say so, in Weave's words.
    let status = agents[0].cli(&["status"]);
    assert!(status.contains("Peers: 5 (with 20 established connections)"), "{status}");
    let conns = agents[0].cli(&["status", "connections"]);
    assert_eq!(conns.lines().filter(|l| l.contains("established")).count(), 4, "{conns}");
    let targets = agents[1].cli(&["status", "targets"]);
    assert!(targets.contains("192.168.0.1:6783"), "{targets}");
}

#[test]
fn metrics_are_served_in_prometheus_format() {
    if !root_or_skip("metrics") {
        return;
    }
    let (_u, _hosts, agents, containers) = lan(2, &[]);
    wait_full_mesh(&agents);
    assert!(containers[0].ping_within(overlay_ip(1), Duration::from_secs(5)));
    let body = agents[0].http("GET", "/metrics").1;
    assert!(body.contains(r#"weft_connections{state="established",type="ebpf",encryption="no"} 1"#), "{body}");
    assert!(body.contains("# TYPE weft_connection_terminations counter"), "{body}");
    assert!(body.contains(r#"weft_datapath_packets_total{path="encap"}"#), "{body}");
    assert!(body.contains("weft_peers 2"), "{body}");
}

/// Three hosts in a line, A–B–C (no A–C link), an agent on each (A and C
/// given only B), meshed.
struct Line {
    _underlay: Underlay,
    /// A, B, C (their namespaces live as long as this).
    hosts: [Host; 3],
    /// B's address on the A–B link.
    b_for_a: Ipv4Addr,
    agents: [Agent; 3],
}

fn line(label: &str) -> Line {
    let mut underlay = Underlay::new();
    let mut a = underlay.isolated_host(&format!("{label}a"));
    let mut b = underlay.isolated_host(&format!("{label}b"));
    let mut c = underlay.isolated_host(&format!("{label}c"));
    let (_, b_for_a) = underlay.link(&mut a, &mut b);
    let (b_for_c, _) = underlay.link(&mut b, &mut c);
    let three = ["--ipalloc-init", "consensus=3"];
    let agent_b = Agent::launch(&b, &[], &three);
    let agent_a = Agent::launch(&a, &[b_for_a], &three);
    let agent_c = Agent::launch(&c, &[b_for_c], &three);
    wait_mesh(&[&agent_a, &agent_b, &agent_c]);
    Line { _underlay: underlay, hosts: [a, b, c], b_for_a, agents: [agent_a, agent_b, agent_c] }
}

#[test]
fn a_line_relays_through_the_middle() {
    if !root_or_skip("line") {
        return;
    }
    let Line { _underlay, hosts, b_for_a, agents: [agent_a, agent_b, agent_c] } = line("l");
    let (ka, kc) = (Netns::new("ka"), Netns::new("kc"));
    agent_a.attach(&ka, &overlay_addr(0));
    agent_c.attach(&kc, &overlay_addr(2));
    let relayed = wait_until(Duration::from_secs(30), || agent_a.dp_remotes().contains(&overlay_ip(2).to_string()));
    assert!(relayed, "A learns C's endpoint through B:\n{}", agent_a.cli(&["status", "peers"]));
    let dp_hosts = agent_a.dp_hosts();
    assert!(dp_hosts.contains(&(hosts[2].ip.to_string(), b_for_a.to_string())), "A reaches C through B: {dp_hosts:?}");
    assert!(ka.ping_within(overlay_ip(2), Duration::from_secs(5)), "A -> C through B");
    assert!(kc.ping_within(overlay_ip(0), Duration::from_secs(5)), "C -> A through B");
    assert!(tcp_transfer(&kc, overlay_ip(2), &ka, 6100, 1 << 20));
    let report = agent_b.report();
    assert!(report["datapath"]["stats"]["paths"]["relay"]["packets"].as_u64().unwrap_or(0) > 0, "B relayed");
}

#[test]
fn a_killed_agent_leaves_everyones_status_and_data_path_and_rejoins() {
    if !root_or_skip("kill9") {
        return;
    }
    let (_u, hosts, mut agents, containers) = lan(3, &[]);
    wait_full_mesh(&agents);
    assert!(containers[0].ping_within(overlay_ip(2), Duration::from_secs(5)));
    let victim = agents[2].name.clone();
    let victim_host = hosts[2].ip.to_string();
    // Survivors remove nothing during their own start-up grace (three heartbeat
    // timeouts, 3 s here): measure the removal once they are past it.
    std::thread::sleep(Duration::from_secs(3));
    agents[2].kill9();
    // Heartbeat 0.2 s, timeout 1 s; the kernel's FIN usually tells sooner.
    let gone = wait_until(Duration::from_secs(3), || {
        agents[..2].iter().all(|a| {
            !a.peers().contains(&victim)
                && !a.dp_hosts().iter().any(|(h, _)| *h == victim_host)
                && !a.dp_remotes().contains(&overlay_ip(2).to_string())
        })
    });
    assert!(gone, "the killed peer is gone from status and data path on every other peer");
    assert!(!containers[0].ping(overlay_ip(2)), "its endpoints are unreachable");

    agents[2].start();
    let back = wait_until(Duration::from_secs(30), || {
        agents[..2].iter().all(|a| a.peers().contains(&victim) && a.dp_remotes().contains(&overlay_ip(2).to_string()))
    });
    assert!(back, "it rejoins on restart, with its endpoint (found again in the kernel)");
    assert!(containers[0].ping_within(overlay_ip(2), Duration::from_secs(5)));
    assert!(containers[2].ping_within(overlay_ip(1), Duration::from_secs(5)));
}

#[test]
fn a_stopped_agent_leaves_traffic_flowing_and_a_restart_adopts_without_duplicates() {
    if !root_or_skip("stop") {
        return;
    }
    let (_u, hosts, mut agents, containers) = lan(2, &[]);
    wait_full_mesh(&agents);
    assert!(containers[0].ping_within(overlay_ip(1), Duration::from_secs(5)));
    let before = tcx_summary(&hosts[1]);
    agents[1].stop();
    // Both ways, across and after the stop.
    for _ in 0..3 {
        assert!(containers[0].ping(overlay_ip(1)), "A -> B with B's agent stopped");
        assert!(containers[1].ping(overlay_ip(0)), "B -> A with B's agent stopped");
        assert!(tcp_transfer(&containers[1], overlay_ip(1), &containers[0], 6200, 1 << 20));
    }
    let status = agents[0].cli(&["status", "peers"]);
    assert!(status.contains(&agents[1].name), "a stopped peer is held, not dropped:\n{status}");
    // A steady ping both ways (every 20 ms) across the restart: none may be lost.
    let pings: Vec<_> = [(0, 1), (1, 0)]
        .iter()
        .map(|&(from, to)| {
            containers[from]
                .cmd("ping")
                .args(["-c", "150", "-i", "0.02", "-q", &overlay_ip(to).to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("ping")
        })
        .collect();
    agents[1].start();
    assert!(wait_until(Duration::from_secs(20), || agents[1].established() == 1));
    for p in pings {
        let out = String::from_utf8_lossy(&p.wait_with_output().expect("ping").stdout).into_owned();
        assert!(out.contains("150 received"), "no loss across the restart:\n{out}");
    }
    assert_eq!(tcx_summary(&hosts[1]), before, "the restarted agent adopted the pins: no duplicate programs or links");
    assert!(containers[1].ping(overlay_ip(0)));
}

/// Every TCX program on every device of `host`, as `device:program` lines.
fn tcx_summary(host: &Host) -> Vec<String> {
    let out = host.ns.run("ip", &["-o", "link", "show"]);
    let devices: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_string()))
        .collect();
    let netns = weft::datapath::netns::Netns::open(host.ns.path()).unwrap();
    std::thread::spawn(move || {
        netns.enter().unwrap();
        let mut lines = Vec::new();
        for d in devices {
            if let Ok((_, progs)) = aya::programs::SchedClassifier::query_tcx(&d, aya::programs::TcAttachType::Ingress) {
                for p in progs {
                    lines.push(format!("{d}:{}:{}", p.name_as_str().unwrap_or("?"), p.id()));
                }
            }
        }
        lines.sort();
        lines
    })
    .join()
    .unwrap()
}

#[test]
fn a_wrong_password_is_refused_on_both_sides_with_a_clear_message() {
    if !root_or_skip("password") {
        return;
    }
    let mut underlay = Underlay::new();
    let (ha, hb) = (underlay.host("pa"), underlay.host("pb"));
    let a = Agent::launch(&ha, &[], &["--password", "one"]);
    let b = Agent::launch(&hb, &[ha.ip], &["--password", "two"]);
    let refused = wait_until(Duration::from_secs(10), || {
        a.log().contains("password differs") && b.log().contains("password probably differs")
    });
    assert!(refused, "both sides say why:\nA:\n{}\nB:\n{}", a.log(), b.log());
    let conns = b.cli(&["status", "connections"]);
    assert!(conns.contains("failed") && conns.contains("password"), "shown as failed: {conns}");
    assert_eq!(a.established() + b.established(), 0, "never half-connected");
    assert_eq!(a.peers().len(), 1);
}

/// With a password, nothing recognisable crosses the wire; without one, the
/// same capture shows the nickname (the check can fail).
#[test]
fn control_traffic_is_not_plaintext_with_a_password() {
    if !root_or_skip("encrypted") {
        return;
    }
    for password in [None, Some("correct horse battery staple")] {
        let mut underlay = Underlay::new();
        let (ha, hb) = (underlay.host("ea"), underlay.host("eb"));
        let mut capture = Capture::start(underlay.switch(), "any", &["tcp", "port", "6783"]);
        let extra: Vec<&str> = password.map_or_else(Vec::new, |p| vec!["--password", p]);
        let a = Agent::launch(&ha, &[], &extra);
        let b = Agent::launch(&hb, &[ha.ip], &extra);
        assert!(wait_until(Duration::from_secs(10), || a.established() == 1 && b.established() == 1));
        let visible = |dump: &str| dump.contains(&a.nickname) || dump.contains(&b.nickname);
        // On a loaded machine tcpdump can lag: wait until the capture holds the
        // connection's start (SYN) and its handshake data, then read all of it.
        let seen = wait_until(Duration::from_secs(10), || {
            let dump = capture.read(&["-nn", "-A"]);
            dump.contains("Flags [S]") && dump.contains("Flags [P.]") && (password.is_some() || visible(&dump))
        });
        std::thread::sleep(Duration::from_millis(500));
        let dump = capture.stop_and_read(&["-nn", "-A"]);
        assert!(seen && dump.contains(".6783"), "the capture saw the control connection from its start:\n{dump}");
        let visible = visible(&dump);
        match password {
            None => assert!(visible, "without a password the nickname is visible (control)"),
            Some(_) => assert!(!visible, "with a password the control traffic is not plaintext"),
        }
    }
}

/// Raw TCP from a namespace to the agent's port: sends `bytes`, reads until close.
fn poke(from: &Netns, to: Ipv4Addr, bytes: Vec<u8>) {
    on_thread_in(from, move || {
        if let Ok(mut s) = std::net::TcpStream::connect((to, 6783)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let _ = s.write_all(&bytes);
            let mut sink = [0u8; 4096];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
    })
    .join()
    .unwrap();
}

#[test]
fn garbage_at_every_stage_costs_only_its_own_connection() {
    if !root_or_skip("garbage") {
        return;
    }
    use weft::mesh::wire::{self, Frame, Hello};
    let mut underlay = Underlay::new();
    let (ha, hb, hx) = (underlay.host("ga"), underlay.host("gb"), underlay.host("gx"));
    let a = Agent::launch(&ha, &[], &[]);
    let b = Agent::launch(&hb, &[ha.ip], &[]);
    assert!(wait_until(Duration::from_secs(10), || a.established() == 1));

    // Stage 1: not a preamble; a truncated preamble; a preamble then noise.
    poke(&hx.ns, ha.ip, b"GET / HTTP/1.1\r\n\r\n".to_vec());
    poke(&hx.ns, ha.ip, wire::preamble(false)[..5].to_vec());
    let mut noisy = wire::preamble(false).to_vec();
    noisy.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    poke(&hx.ns, ha.ip, noisy);
    // An absurd frame length.
    let mut huge = wire::preamble(false).to_vec();
    huge.extend(u32::MAX.to_be_bytes());
    poke(&hx.ns, ha.ip, huge);

    // Stage 2: a proper hello, then gossip payloads the channels cannot decode.
    let target = ha.ip;
    on_thread_in(&hx.ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            for payload in [vec![0xffu8; 64], Vec::new(), b"\x01\x02".to_vec()] {
                let mut s = tokio::net::TcpStream::connect((target, 6783)).await.unwrap();
                let (_, cipher) = wire::handshake(&mut s, None, true).await.unwrap();
                let (r, w) = s.into_split();
                let (mut reader, mut writer) = wire::framed(r, w, cipher);
                let hello = Hello {
                    name: "02:99:99:99:99:99".parse().unwrap(),
                    nickname: "mallory".into(),
                    uid: 1,
                    listen_port: 6783,
                    data_addr: None,
                };
                writer.write(&Frame::Hello(hello)).await.unwrap();
                let _ = reader.read().await;
                let bad = weft::mesh::Gossip::Channel { channel: "endpoints".into(), payload };
                let _ = writer.write(&Frame::Gossip(bad)).await;
                // The agent hangs up on us.
                let closed = tokio::time::timeout(Duration::from_secs(5), async {
                    while reader.read().await.is_ok() {}
                })
                .await;
                assert!(closed.is_ok(), "the connection is closed");
            }
        });
    })
    .join()
    .unwrap();

    // The agent lives, still serves, still has its real peer, and said why.
    let mut a = a;
    assert!(a.exited().is_none(), "the agent survived");
    assert_eq!(a.established(), 1, "the real peer's connection is untouched");
    let log = a.log();
    assert!(log.contains("not a weft peer"), "logged: not a weft peer");
    assert!(log.contains("larger than"), "logged: frame too large");
    assert!(log.contains("cannot decode"), "logged: undecodable gossip");
    drop(b);
}

#[test]
fn bad_launch_settings_fail_with_one_clear_line_and_leave_nothing_behind() {
    if !root_or_skip("bad_launch") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("bl");
    let state = weft_tests::cleanup::TempPath::new(&weft_tests::unique("bl-state"));
    let state_arg = state.display().to_string();
    let common = ["--state-dir", state_arg.as_str(), "--pin-name", host.name.as_str(), "--name", "02:00:00:00:0b:0b"];
    let check = |args: &[&str], expect: &str| {
        let mut all = vec!["launch"];
        all.extend_from_slice(args);
        all.extend_from_slice(&common);
        let out = weft_in(&host.ns, &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().filter(|l| l.starts_with("weft:")).collect::<Vec<_>>();
        assert!(!out.status.success(), "{args:?} must fail");
        assert_eq!(line.len(), 1, "one line:\n{stderr}");
        assert!(line[0].contains(expect), "{args:?}: {stderr}");
        // Nothing half-configured: no VXLAN device, no pins.
        assert!(!host.ns.succeeds("ip", &["link", "show", "weft-vxlan"]), "{args:?} left a VXLAN device");
        assert!(!host.pin_dir().exists(), "{args:?} left pins");
    };
    check(&["--iface", "nosuchif0"], "unknown underlay interface nosuchif0");
    host.ns.ip(&["route", "add", "10.40.0.0/16", "dev", "eth0"]);
    check(&["--iface", "eth0"], "overlaps the route to 10.40.0.0/16 on eth0");
    check(&["--iface", "eth0", "--ipalloc-range", "10.100.0.0/16", "--mtu", "100"], "--mtu 100: the endpoint MTU must be between 576");
    check(&["--iface", "eth0", "--ipalloc-range", "10.100.0.0/16", "--mtu", "100000"], "--mtu 100000");
    let out = weft_unprivileged(&host.ns, &["launch", "--iface", "eth0"]).output().expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("needs root"), "{stderr}");
    assert!(!host.pin_dir().exists());
    drop(state);
}

/// Joins `group` in `ns` and counts datagrams carrying `tag` for `window`.
fn multicast_receiver(ns: &Netns, group: Ipv4Addr, local: Ipv4Addr, tag: &'static str) -> std::thread::JoinHandle<usize> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = on_thread_in(ns, move || {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", 7777)).expect("bind");
        sock.join_multicast_v4(&group, &local).expect("join");
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        ready_tx.send(()).unwrap();
        let (mut n, deadline) = (0, std::time::Instant::now() + Duration::from_secs(4));
        let mut buf = [0u8; 1500];
        while std::time::Instant::now() < deadline {
            if let Ok(len) = sock.recv(&mut buf)
                && &buf[..len] == tag.as_bytes() {
                    n += 1;
                }
        }
        n
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("receiver ready");
    handle
}

fn multicast_send(ns: &Netns, group: Ipv4Addr, tag: &'static str, count: usize) {
    on_thread_in(ns, move || {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
        for _ in 0..count {
            sock.send_to(tag.as_bytes(), (group, 7777)).expect("send (needs the 224.0.0.0/4 route)");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .join()
    .unwrap();
}

#[test]
fn multicast_reaches_every_member_once_on_every_host() {
    if !root_or_skip("multicast") {
        return;
    }
    let (_u, _hosts, agents, containers) = lan(3, &[]);
    wait_full_mesh(&agents);
    // A second container on the sender's host: same-host copies too.
    let neighbour = Netns::new("kn");
    agents[0].attach(&neighbour, "10.32.100.2/12");
    assert!(wait_until(Duration::from_secs(10), || agents[1].dp_remotes().contains(&"10.32.100.2".to_string())));
    std::thread::sleep(Duration::from_millis(500));
    let group = Ipv4Addr::new(239, 1, 2, 3);
    let receivers: Vec<_> = [(&containers[1], overlay_ip(1)), (&containers[2], overlay_ip(2)), (&neighbour, Ipv4Addr::new(10, 32, 100, 2))]
        .iter()
        .map(|(ns, ip)| multicast_receiver(ns, group, *ip, "weft-mcast"))
        .collect();
    multicast_send(&containers[0], group, "weft-mcast", 5);
    let got: Vec<usize> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
    assert_eq!(got, vec![5, 5, 5], "each member gets each datagram exactly once (remote, remote, same host)");
    let sent = agents[0].report()["datapath"]["stats"]["paths"]["bcast"]["packets"].as_u64().unwrap_or(0);
    assert!(sent >= 5, "replicated by the sender's data path");
}

#[test]
fn multicast_follows_the_broadcast_tree_through_a_relay() {
    if !root_or_skip("multicast_line") {
        return;
    }
    let Line { _underlay, hosts: _hosts, agents: [agent_a, agent_b, agent_c], .. } = line("m");
    let (ka, kb, kc) = (Netns::new("ka"), Netns::new("kb"), Netns::new("kc"));
    agent_a.attach(&ka, &overlay_addr(0));
    agent_b.attach(&kb, &overlay_addr(1));
    agent_c.attach(&kc, &overlay_addr(2));
    let knows = |a: &Agent, others: [usize; 2]| {
        let r = a.dp_remotes();
        others.iter().all(|j| r.contains(&overlay_ip(*j).to_string()))
    };
    assert!(wait_until(Duration::from_secs(30), || knows(&agent_a, [1, 2]) && knows(&agent_c, [0, 1])));
    std::thread::sleep(Duration::from_millis(500));
    let group = Ipv4Addr::new(239, 9, 9, 9);
    let rb = multicast_receiver(&kb, group, overlay_ip(1), "tree");
    let rc = multicast_receiver(&kc, group, overlay_ip(2), "tree");
    multicast_send(&ka, group, "tree", 4);
    assert_eq!((rb.join().unwrap(), rc.join().unwrap()), (4, 4), "B gets it, and passes it on to C, once each");
}

#[test]
fn both_sides_learn_the_route_without_waiting_for_anti_entropy() {
    if !root_or_skip("first_frames") {
        return;
    }
    // The peer sends its first frames (topology, channel states) right after its
    // handshake; they used to reach the agent before it had registered the
    // connection and were dropped, so one side learned the route only at the next
    // anti-entropy round (5 s). Several fresh pairs, each well under one round.
    for round in 0..5 {
        let mut u = Underlay::new();
        let (ha, hb) = (u.host("a"), u.host("b"));
        let a = Agent::launch(&ha, &[], &[]);
        let b = Agent::launch(&hb, &[ha.ip], &[]);
        let both = wait_until(Duration::from_secs(3), || {
            a.dp_hosts().iter().any(|(h, _)| *h == hb.ip.to_string()) && b.dp_hosts().iter().any(|(h, _)| *h == ha.ip.to_string())
        });
        assert!(both, "round {round}: a route each way before any anti-entropy round\n--- a\n{}\n--- b\n{}", a.log(), b.log());
    }
}

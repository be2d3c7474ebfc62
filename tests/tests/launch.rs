//! Launch is all or nothing: a second `weft launch` on a host whose agent runs
//! is refused before it touches anything (the running data path keeps
//! forwarding), a launch with a flag that cannot work exits 64 and leaves no
//! pins and no links, and `weft reset --force` cleans a host whose agent is
//! not running.

use std::net::Ipv4Addr;
use std::time::Duration;

use weft_tests::agent::{Agent, weft_in};
use weft_tests::{Netns, Underlay, root_or_skip, wait_until};

/// Two hosts with agents and one container each (10.32.100.1 on host 0,
/// 10.33.100.1 on host 1), pinging each other.
struct Pair {
    _underlay: Underlay,
    hosts: Vec<weft_tests::Host>,
    agents: Vec<Agent>,
    containers: Vec<Netns>,
}

fn container_ip(h: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 32 + h as u8, 100, 1)
}

fn pair(label: &str) -> Pair {
    pair_with(label, &[])
}

/// [`pair`] with `extra` flags for both agents.
fn pair_with(label: &str, extra: &[&str]) -> Pair {
    let mut underlay = Underlay::new();
    let hosts: Vec<weft_tests::Host> = (0..2).map(|i| underlay.host(&format!("{label}{i}"))).collect();
    let first = hosts[0].ip;
    let init: Vec<&str> = ["--ipalloc-init", "consensus=2"].into_iter().chain(extra.iter().copied()).collect();
    let agents: Vec<Agent> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Agent::launch(h, if i == 0 { &[] } else { std::slice::from_ref(&first) }, init.as_slice()))
        .collect();
    assert!(wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.peers().len() == 2)), "the mesh forms");
    let containers: Vec<Netns> = (0..2).map(|i| Netns::new(&format!("{label}c{i}"))).collect();
    for (i, a) in agents.iter().enumerate() {
        a.attach(&containers[i], &format!("{}/12", container_ip(i)));
    }
    assert!(containers[0].ping_within(container_ip(1), Duration::from_secs(10)), "the containers reach each other");
    Pair { _underlay: underlay, hosts, agents, containers }
}

/// `weft ARGS...` in `ns`: (exit code, stderr).
fn weft(ns: &Netns, args: &[&str]) -> (Option<i32>, String) {
    let out = weft_in(ns, args);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_second_launch_is_refused_and_the_data_path_keeps_forwarding() {
    if !root_or_skip("second_launch") {
        return;
    }
    let p = pair("sl");
    let (host, agent) = (&p.hosts[0], &p.agents[0]);
    // A steady ping across all the attempts: none may be lost.
    let ping = p.containers[0]
        .cmd("ping")
        .args(["-c", "100", "-i", "0.02", "-q", &container_ip(1).to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    let running = format!("weft is already running on this host (pid {}, API 127.0.0.1:6784)", agent.pid());
    let iface = host.iface.as_str();
    let state = agent.state_dir().display().to_string();
    let other_state = weft_tests::cleanup::TempPath::new(&weft_tests::unique("sl-state"));
    let other = other_state.display().to_string();
    // The same state directory (the usual case: `weft launch` twice).
    let (code, err) = weft(&host.ns, &["launch", "--state-dir", &state, "--iface", iface, "--pin-name", &host.name, "--no-docker"]);
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains(&running), "{err}");
    // Another state directory, the same data path (pin directory).
    let (code, err) = weft(&host.ns, &["launch", "--state-dir", &other, "--iface", iface, "--pin-name", &host.name, "--no-docker"]);
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains(&running), "{err}");
    // Nothing shared but the host's ports: refused on the API's port, before
    // any pin of its own exists.
    let fresh_pins = format!("{}-2", host.name);
    let (code, err) = weft(&host.ns, &["launch", "--state-dir", &other, "--iface", iface, "--pin-name", &fresh_pins, "--no-docker"]);
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains("cannot serve the API on 127.0.0.1:6784"), "{err}");
    assert!(!host.pin_dir().with_file_name(&fresh_pins).exists(), "the refused launch pinned nothing");
    let out = String::from_utf8_lossy(&ping.wait_with_output().expect("ping").stdout).into_owned();
    assert!(out.contains("100 received"), "no packet lost while the second launches were refused:\n{out}");
    assert!(host.pin_dir().exists(), "the running agent's pins are untouched");
    assert!(agent.try_cli(&["status"]).status.success(), "the running agent still answers");
    assert!(p.containers[1].ping(container_ip(0)));
    drop(other_state);
}

#[test]
fn reset_force_cleans_a_host_whose_agent_is_stopped_and_never_a_running_one() {
    if !root_or_skip("reset_force") {
        return;
    }
    let mut p = pair("rf");
    let pin_root = weft::datapath::ebpf::DEFAULT_PIN_ROOT;
    // A running agent whose API is not the one asked: the locks refuse.
    let (host1, agent1) = (&p.hosts[1], &p.agents[1]);
    let state1 = agent1.state_dir().display().to_string();
    let (code, err) = weft(
        &host1.ns,
        &["--api", "127.0.0.1:1", "reset", "--force", "--state-dir", &state1, "--pin-root", pin_root, "--pin-name", &host1.name],
    );
    assert_ne!(code, Some(0));
    assert!(err.contains(&format!("weft is already running on this host (pid {}", agent1.pid())), "{err}");
    assert!(host1.pin_dir().exists() && agent1.state_dir().exists(), "a running agent's data path and state stay");

    // Stopped on purpose: its data path keeps forwarding until reset --force.
    p.agents[0].stop();
    let host0 = &p.hosts[0];
    assert!(p.containers[0].ping(container_ip(1)), "forwarding with the agent stopped");
    let state0 = p.agents[0].state_dir().display().to_string();
    let out = weft_in(&host0.ns, &["reset", "--force", "--state-dir", &state0, "--pin-root", pin_root, "--pin-name", &host0.name]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("removed the state directory"), "{stdout}");
    assert!(!host0.pin_dir().exists(), "pins removed:\n{stdout}");
    assert!(!p.agents[0].state_dir().exists(), "state removed");
    assert!(!host0.ns.succeeds("ip", &["link", "show", "weft-vxlan"]), "VXLAN device removed");
    let links = host0.ns.ip(&["-d", "-o", "link", "show"]);
    assert!(!links.contains("alias weft:"), "no endpoint interface left:\n{links}");
    assert!(!p.containers[0].ping(container_ip(1)), "the host is off the overlay");
    assert!(host1.pin_dir().exists(), "the other host's data path is untouched");
    // Idempotent: nothing left to remove is not an error.
    let again = weft_in(&host0.ns, &["reset", "--force", "--state-dir", &state0, "--pin-root", pin_root, "--pin-name", &host0.name]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
}

/// weft's clsact filters on `ifname`'s ingress (`tc filter show`).
fn weft_filters(ns: &Netns, ifname: &str) -> Vec<String> {
    let out = ns.cmd("tc").args(["filter", "show", "dev", ifname, "ingress"]).output().expect("tc");
    let handle = format!("handle {:#x} ", weft::datapath::ebpf::CLSACT_HANDLE);
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&handle)).map(str::to_string).collect()
}

/// `--tc-attach clsact` (what kernels before 6.6 get by themselves): `weft
/// status` says so, a killed agent's filters keep forwarding, the restarted
/// agent adopts them without losing a packet or adding a filter, and `weft
/// reset --force` removes them.
#[test]
fn an_agent_on_clsact_says_so_survives_kill_and_restart_and_resets_clean_clsact() {
    if !root_or_skip("launch_clsact") {
        return;
    }
    let mut p = pair_with("lc", &["--tc-attach", "clsact"]);
    let status = p.agents[0].cli(&["status"]);
    assert!(status.contains("ebpf (direct encapsulation, clsact attach)"), "{status}");
    assert!(status.contains("TCX available; bpf_redirect_peer, bpf_redirect_neigh found"), "the probes: {status}");
    assert_eq!(p.agents[0].report()["info"]["tc_attach"], "clsact", "the report says it too");
    let host0 = &p.hosts[0];
    assert_eq!(weft_filters(&host0.ns, &host0.iface).len(), 1, "weft's filter on the underlay");

    let ping = p.containers[0]
        .cmd("ping")
        .args(["-c", "300", "-i", "0.02", "-q", &container_ip(1).to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    p.agents[0].kill9();
    std::thread::sleep(Duration::from_millis(500));
    p.agents[0].start();
    let out = ping.wait_with_output().expect("ping");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("300 received"), "no loss across kill -9 and restart:\n{summary}");
    let host0 = &p.hosts[0];
    assert_eq!(weft_filters(&host0.ns, &host0.iface).len(), 1, "still one filter after the restart");
    assert_eq!(weft_filters(&host0.ns, "weft-vxlan").len(), 1);

    p.agents[0].stop();
    let state0 = p.agents[0].state_dir().display().to_string();
    let pin_root = weft::datapath::ebpf::DEFAULT_PIN_ROOT;
    let out = weft_in(&host0.ns, &["reset", "--force", "--state-dir", &state0, "--pin-root", pin_root, "--pin-name", &host0.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(weft_filters(&host0.ns, &host0.iface), Vec::<String>::new(), "reset removed weft's filter");
    assert!(!p.containers[0].ping(container_ip(1)), "the host is off the overlay");
    let host1 = &p.hosts[1];
    assert_eq!(weft_filters(&host1.ns, &host1.iface).len(), 1, "the other host keeps its filter");
}

/// At boot weft may start before Docker has made docker0: a
/// `--dns-listen-address` that no interface has yet does not fail the launch;
/// it is served as soon as the address appears. A port already taken still
/// fails the launch (exit 69) and leaves nothing.
#[test]
fn a_dns_listen_address_that_appears_later_is_served_then() {
    if !root_or_skip("dns_later") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("dl");
    let later = "198.18.7.1";
    let agent = Agent::launch(&host, &[], &["--ipalloc-init", "consensus=1", "--dns-listen-address", &format!("{later}:53")]);
    agent.cli(&["dns-add", "10.32.0.9", "late"]);
    assert!(
        wait_until(Duration::from_secs(10), || agent.log().contains("no interface has this address yet")),
        "the wait is said:\n{}",
        agent.log()
    );
    let dig = || {
        let out = host.ns.cmd("dig").args([&format!("@{later}"), "+time=1", "+tries=1", "+short", "late.weave.local"]).output().expect("dig");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // What docker0 coming up does: the address appears on an interface.
    host.ns.ip(&["link", "add", "dl-br0", "type", "bridge"]);
    host.ns.ip(&["addr", "add", &format!("{later}/24"), "dev", "dl-br0"]);
    host.ns.ip(&["link", "set", "dl-br0", "up"]);
    assert!(wait_until(Duration::from_secs(10), || dig() == "10.32.0.9"), "served once the address exists: {:?}\n{}", dig(), agent.log());
    // A port in use is not waited for: that launch fails as before.
    let other = underlay.host("dl2");
    other.ns.ip(&["link", "set", "lo", "up"]);
    let blocker = weft_tests::cleanup::Proc::spawn_killed(
        "stopping the port blocker",
        other.ns.cmd("python3").args(["-c", "import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 5353)); print('ok', flush=True); time.sleep(60)"]).stdout(std::process::Stdio::piped()),
    )
    .expect("python3");
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(blocker.take_stdout().expect("stdout")), &mut line);
    assert_eq!(line.trim(), "ok", "the port is taken");
    let state_dir = weft_tests::cleanup::TempPath::new(&weft_tests::unique("dl-state"));
    let state = state_dir.path().display().to_string();
    let (code, err) = weft(&other.ns, &["launch", "--no-docker", "--iface", &other.iface, "--pin-name", &other.name, "--state-dir", &state, "--dns-listen-address", "127.0.0.1:5353"]);
    assert_ne!(code, Some(0), "a DNS port in use fails the launch: {err}");
    assert!(err.contains("127.0.0.1:5353"), "and says which: {err}");
    assert!(!other.pin_dir().exists(), "nothing left behind");
}

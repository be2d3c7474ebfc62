//! Hostile input and load against a real agent (issue 13): file descriptors
//! run out, strangers hold connections and send huge frame lengths before any
//! handshake, web pages try the API. Traffic stays inside the test's own
//! namespaces (the agent's host and its loopback).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use weft_tests::agent::Agent;
use weft_tests::{Host, Underlay, on_thread_in, root_or_skip, wait_until};

/// The mesh's port (the agents run with the default).
const MESH: u16 = 6783;
/// Where the fd test's Docker proxy listens.
const PROXY: u16 = 12375;

fn one_host(label: &str) -> (Underlay, Host, Agent) {
    let mut underlay = Underlay::new();
    let host = underlay.host(label);
    let agent = Agent::launch(&host, &[], &["--ipalloc-init", "consensus=1"]);
    (underlay, host, agent)
}

/// A `/proc/PID/status` field in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A TCP connection from `src` (a loopback address) to `dst`, made in the
/// calling thread's namespace.
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((src, 0)).into())?;
    socket.connect_timeout(&dst.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// The agent's counter `weft_connection_terminations{reason=...}`.
fn terminations(agent: &Agent, reason: &str) -> u64 {
    let (_, metrics) = agent.http("GET", "/metrics");
    let key = format!("weft_connection_terminations_total{{reason=\"{reason}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&key)?.trim().parse().ok()).unwrap_or(0)
}

/// A raw HTTP request with extra header lines to the API, from the host.
fn api_request(host: &Host, method: &str, path: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(body);
    on_thread_in(&host.ns, move || -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], 6784)), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        // A server may answer (413) before it has read the whole body.
        let _ = s.write_all(&req);
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((code, body))
    })
    .join()
    .expect("http thread")
    .expect("API answers")
}

#[test]
fn out_of_file_descriptors_the_agent_pauses_instead_of_spinning_and_recovers() {
    if !root_or_skip("fd_exhaustion") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("fd");
    // The Docker API proxy listens too (on TCP; no Docker behind it is needed
    // for its accept loop).
    let docker = std::env::temp_dir().join(format!("{}-docker.sock", weft_tests::unique("fd")));
    let docker_host = format!("unix://{}", docker.display());
    let agent = Agent::launch(
        &host,
        &[],
        &["--ipalloc-init", "consensus=1", "--docker-host", &docker_host, "--proxy-listen", &format!("tcp://127.0.0.1:{PROXY}")],
    );
    let pid = agent.pid();
    // Settled first: the host's own overlay address is allocated and saved
    // (IPAM that cannot save its state stops the agent, by design).
    assert!(wait_until(Duration::from_secs(20), || agent.cli(&["ps"]).contains("weft:host")), "the host is on the overlay");
    std::thread::sleep(Duration::from_secs(2));
    let before = agent.log().lines().count();
    // A few descriptors to spare: the flood uses them up.
    let limit = open_fds(pid) + 16;
    let set = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")])
        .status()
        .expect("prlimit");
    assert!(set.success(), "prlimit --nofile on the agent");
    // 200 connections each to the mesh, the API and the proxy, held for four seconds:
    // the backlogs fill, accept fails with EMFILE over and over.
    let flood = on_thread_in(&host.ns, || {
        let mut held = Vec::new();
        for port in [MESH, 6784, PROXY] {
            for _ in 0..200 {
                if let Ok(s) = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)) {
                    held.push(s);
                }
            }
        }
        std::thread::sleep(Duration::from_secs(4));
        held.len()
    });
    let held = flood.join().expect("flood");
    let log = agent.log();
    let during: Vec<&str> = log.lines().skip(before).collect();
    let accept_lines = during.iter().filter(|l| l.contains("accept failed")).count();
    eprintln!("held {held} connections; {} log lines during the flood, {accept_lines} about failed accepts", during.len());
    assert!(accept_lines >= 1, "the failures are logged:\n{}", during.join("\n"));
    assert!(during.len() < 200, "the log stays small: {} lines", during.len());
    assert!(accept_lines <= 6, "one line per listener per episode, not per failure: {accept_lines}:\n{}", during.join("\n"));
    // Everything closed: the API answers again, and says how long it lasted.
    assert!(wait_until(Duration::from_secs(10), || agent.try_cli(&["status"]).status.success()), "the API answers again");
    assert!(wait_until(Duration::from_secs(5), || agent.log().contains("accepting connections again")), "recovery is logged");
}

#[test]
fn huge_frame_lengths_before_the_handshake_cost_no_memory() {
    if !root_or_skip("preauth_memory") {
        return;
    }
    let (_u, host, agent) = one_host("pm");
    let pid = agent.pid();
    let rss_before = status_kb(pid, "VmRSS:");
    // 40 strangers (each from its own loopback address, so the per-source cap
    // does not hide the frame limit): preamble, a 32 MiB length, then data.
    let senders: Vec<_> = (0..40u8)
        .map(|i| {
            on_thread_in(&host.ns, move || -> usize {
                let Ok(mut s) = connect_from(Ipv4Addr::new(127, 0, 1, 10 + i), SocketAddr::from(([127, 0, 0, 1], MESH))) else {
                    return 0;
                };
                let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                let mut first = weft::mesh::wire::preamble(false).to_vec();
                first.extend_from_slice(&((32u32 << 20) - 1).to_be_bytes());
                if s.write_all(&first).is_err() {
                    return 0;
                }
                let chunk = vec![0u8; 1 << 20];
                let mut sent = 0;
                while sent < 32 << 20 {
                    match s.write(&chunk) {
                        Ok(n) => sent += n,
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
                sent
            })
        })
        .collect();
    let sent: usize = senders.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    let peak = status_kb(pid, "VmHWM:");
    let rss_after = status_kb(pid, "VmRSS:");
    eprintln!("sent {} MiB; agent RSS {rss_before} kB before, {rss_after} kB after, peak {peak} kB", sent >> 20);
    assert!(peak.saturating_sub(rss_before) < 200 * 1024, "the agent buffered what strangers sent: peak {peak} kB, {rss_before} kB before");
    assert!(agent.log().contains("for a frame before the handshake completes"), "the log says which limit");
    assert!(agent.try_cli(&["status"]).status.success());
}

#[test]
fn half_open_connections_are_capped_and_a_real_peer_still_connects() {
    if !root_or_skip("half_open") {
        return;
    }
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..2).map(|i| underlay.host(&format!("ho{i}"))).collect();
    let init = ["--ipalloc-init", "consensus=2"];
    let a = Agent::launch(&hosts[0], &[], &init);
    // 500 connections that never say a word, from one address.
    let flood = on_thread_in(&hosts[0].ns, || {
        let mut held = Vec::new();
        for _ in 0..500 {
            if let Ok(s) = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], MESH)), Duration::from_secs(1)) {
                held.push(s);
            }
        }
        // Closed at once: EOF before the agent's preamble. Kept: the preamble
        // arrives and then nothing.
        let mut closed = 0;
        for s in &mut held {
            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
            let mut buf = [0u8; 8];
            match s.read(&mut buf) {
                Ok(0) => closed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
                _ => {}
            }
        }
        (held, closed)
    });
    let (held, closed) = flood.join().expect("flood");
    eprintln!("{} connections made, {closed} closed at once by the agent", held.len());
    assert!(closed >= 450, "the excess half-open connections are closed at once: {closed} of {}", held.len());
    let refused = terminations(&a, "pending_handshake_limit");
    assert!(refused >= 450, "and counted: {refused}");
    // A real peer connects while the strangers still hold theirs.
    let b = Agent::launch(&hosts[1], &[hosts[0].ip], &init);
    assert!(wait_until(Duration::from_secs(20), || a.peers().len() == 2 && b.peers().len() == 2), "the real peer connects");
    drop(held);
}

#[test]
fn bytes_after_a_hello_close_the_connection_loudly() {
    if !root_or_skip("hello_trailing") {
        return;
    }
    let (_u, host, agent) = one_host("tr");
    let hello = weft::mesh::wire::Frame::Hello(weft::mesh::wire::Hello {
        name: "02:00:00:00:13:13".parse().expect("peer name"),
        nickname: "stranger".into(),
        uid: 7,
        listen_port: MESH,
        data_addr: None,
    });
    let mut body = hello.encode().expect("encode");
    body.extend_from_slice(b"xyz");
    let mut bytes = weft::mesh::wire::preamble(false).to_vec();
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&body);
    on_thread_in(&host.ns, move || {
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], MESH))).expect("connect");
        s.write_all(&bytes).expect("send");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    })
    .join()
    .expect("client");
    assert!(
        wait_until(Duration::from_secs(5), || agent.log().contains("3 trailing bytes after a hello frame")),
        "the refusal says why:\n{}",
        agent.log()
    );
    assert_eq!(agent.peers().len(), 1, "the stranger never joined");
}

#[test]
fn the_api_refuses_web_pages_and_rebound_names() {
    if !root_or_skip("api_origin") {
        return;
    }
    let (_u, host, agent) = one_host("ao");
    let (code, body) = api_request(&host, "POST", "/ip/evil1", "Host: 127.0.0.1:6784\r\nOrigin: http://evil.example\r\n", b"");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("cross-origin"), "{body}");
    let (code, body) = api_request(&host, "POST", "/ip/evil2", "Host: evil.example:6784\r\n", b"");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not this host's loopback"), "{body}");
    // Nothing was allocated for either.
    for id in ["evil1", "evil2"] {
        let (code, body) = agent.http("GET", &format!("/ip/{id}"));
        assert_ne!(code, 200, "no address for {id}: {body}");
    }
    // A plain local client works, with any loopback spelling.
    for h in ["localhost:6784", "127.0.0.1", "[::1]:6784"] {
        let (code, body) = api_request(&host, "POST", "/ip/plain", &format!("Host: {h}\r\n"), b"");
        assert_eq!(code, 200, "Host {h}: {body}");
    }
    let (code, _) = api_request(&host, "POST", "/connect", "Host: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n", &vec![b'a'; 2 << 20]);
    assert_eq!(code, 413, "a body over the limit");
    agent.cli(&["status"]);
    assert!(agent.cli(&["ps"]).contains("plain") || agent.http("GET", "/ip/plain").0 == 200);
}

/// Kills the agent we started on Drop (by its pid), and removes its files.
struct OwnAgent {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for OwnAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", std::fs::read_to_string(self.dir.join("log")).unwrap_or_default());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_api_is_served_on_a_unix_socket_and_the_cli_uses_it() {
    if !root_or_skip("api_unix") {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.host("au");
    let dir = std::env::temp_dir().join(weft_tests::unique("au"));
    std::fs::create_dir_all(&dir).expect("dir");
    let api = format!("unix://{}", dir.join("weft-api.sock").display());
    let log = std::fs::File::create(dir.join("log")).expect("log");
    let bin = weft_tests::agent::weft_bin();
    let name = weft_tests::agent::peer_name(&weft_tests::unique("au"));
    let state = dir.join("state").display().to_string();
    let child = host
        .ns
        .cmd(bin.to_str().expect("utf-8"))
        .args(["launch", "--api", &api, "--name", &name, "--iface", &host.iface, "--pin-name", &host.name])
        .args(["--no-docker", "--ipalloc-init", "consensus=1", "--state-dir", &state])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn weft launch");
    let agent = OwnAgent { child, dir };
    let cli = |args: &[&str]| host.ns.cmd(bin.to_str().expect("utf-8")).env("WEFT_API", &api).args(args).output().expect("weft");
    assert!(wait_until(Duration::from_secs(20), || cli(&["status"]).status.success()), "the CLI reaches the agent over WEFT_API={api}");
    let ps = cli(&["--api", &api, "ps"]);
    assert!(ps.status.success(), "--api unix:// too: {}", String::from_utf8_lossy(&ps.stderr));
    // No TCP API when a unix socket is given.
    assert!(!cli(&["--api", "127.0.0.1:6784", "status"]).status.success(), "no TCP API");
    let path = api.trim_start_matches("unix://").to_string();
    let origin = host.ns.run("curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", &path, "-H", "Origin: http://evil.example", "http://localhost/status"]);
    assert_eq!(origin.trim(), "403", "browser origins refused on the socket too");
    drop(agent);
}

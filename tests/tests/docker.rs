//! Docker with a real Docker Engine per simulated host (Debian's dockerd in the
//! host's namespace) and real weft agents: attach from events, the API proxy,
//! DNS names, addresses, and the real docker CLI through the proxy.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use weft_tests::docker::{BUSYBOX, DockerHost};
use weft_tests::{Underlay, root_or_skip, wait_until};

const TWO: &[&str] = &["--ipalloc-init", "consensus=2"];

fn two_hosts() -> (Underlay, DockerHost, DockerHost) {
    let mut lan = Underlay::new();
    let a = DockerHost::launch(&mut lan, "a", &[], TWO);
    let b = DockerHost::launch(&mut lan, "b", &[a.host.ip], TWO);
    assert!(wait_until(Duration::from_secs(20), || a.agent.established() == 1 && b.agent.established() == 1));
    (lan, a, b)
}

/// A server on `h` answering every connection on 4540 with its hostname -i.
fn start_server(h: &DockerHost, name: &str) {
    h.docker_ok(&["run", "-d", "--init", "--name", name, BUSYBOX, "nc", "-ll", "-p", "4540", "-e", "hostname", "-i"]);
}

fn lookup(h: &DockerHost, name: &str) -> Vec<String> {
    h.agent.dns_lookup(name)
}

#[test]
fn containers_on_two_hosts_find_each_other_by_name() {
    if !root_or_skip("containers_on_two_hosts_find_each_other_by_name") {
        return;
    }
    let (_lan, a, b) = two_hosts();
    start_server(&a, "server");
    let server = a.attached_addrs("server");
    assert_eq!(server.len(), 1, "server attached: {}", a.agent.cli(&["ps"]));
    // Its name reaches the other host's DNS.
    assert!(wait_until(Duration::from_secs(10), || lookup(&b, "server") == server));
    // A client on b: the proxy gave it weft's DNS and made it wait for ethwe,
    // so connecting at its first instruction works.
    let answer = b.docker_ok(&["run", "--rm", "--name", "client", BUSYBOX, "nc", "-w", "5", "server", "4540"]);
    assert_eq!(answer, server[0], "the server answers with its overlay address (its /etc/hosts)");
    // Names, search domain and resolver inside the container.
    let conf = b.docker_ok(&["run", "--rm", BUSYBOX, "cat", "/etc/resolv.conf"]);
    assert!(conf.contains("search weave.local"), "{conf}");
    let fqdn = b.docker_ok(&["run", "--rm", "--name", "asker", BUSYBOX, "nslookup", "server.weave.local"]);
    assert!(fqdn.contains(&server[0]), "{fqdn}");
    let me = b.docker_ok(&["run", "--rm", "--name", "myself", BUSYBOX, "hostname", "-f"]);
    assert_eq!(me, "myself.weave.local");
}

#[test]
fn the_first_instruction_already_has_the_network() {
    if !root_or_skip("the_first_instruction_already_has_the_network") {
        return;
    }
    let (_lan, a, b) = two_hosts();
    start_server(&a, "server");
    let server = a.attached_addrs("server");
    assert!(wait_until(Duration::from_secs(10), || lookup(&b, "server") == server));
    // The entrypoint itself is the client: no shell, no sleep, no retry.
    for i in 0..6 {
        let out = b.docker(&["run", "--rm", "--entrypoint", "nc", BUSYBOX, "-w", "5", "server", "4540"]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == server[0],
            "run {i}: {:?} {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            b.agent.log()
        );
    }
    // Created through the proxy, started through the real socket: still waits.
    let id = b.docker_ok(&["create", "--name", "later", BUSYBOX, "nc", "-w", "5", "server", "4540"]);
    let out = b.dockerd.docker(&["start", "-a", &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), server[0], "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn death_removes_the_name_and_frees_the_address() {
    if !root_or_skip("death_removes_the_name_and_frees_the_address") {
        return;
    }
    let (_lan, a, b) = two_hosts();
    a.docker_ok(&["run", "-d", "--init", "--name", "brief", BUSYBOX, "sleep", "1000"]);
    let addrs = a.attached_addrs("brief");
    assert_eq!(addrs.len(), 1);
    let id = a.dockerd.docker_ok(&["inspect", "-f", "{{.Id}}", "brief"]);
    assert!(wait_until(Duration::from_secs(10), || lookup(&b, "brief") == addrs));
    assert_eq!(a.agent.http("GET", &format!("/ip/{id}")).0, 200);
    a.docker_ok(&["stop", "-t", "1", "brief"]);
    assert!(wait_until(Duration::from_secs(10), || lookup(&a, "brief").is_empty() && lookup(&b, "brief").is_empty()));
    assert!(wait_until(Duration::from_secs(5), || a.agent.http("GET", &format!("/ip/{id}")).0 == 404), "address released");
    assert!(a.addrs_of("brief").is_empty(), "detached: {}", a.agent.cli(&["ps"]));
    // Started again: attached again (the address is free for anyone meanwhile).
    a.docker_ok(&["start", "brief"]);
    assert!(wait_until(Duration::from_secs(10), || a.addrs_of("brief").len() == 1));
    a.docker_ok(&["rm", "-f", "brief"]);
    assert!(wait_until(Duration::from_secs(10), || lookup(&b, "brief").is_empty()));
}

#[test]
fn short_lived_containers_leave_nothing_behind() {
    if !root_or_skip("short_lived_containers_leave_nothing_behind") {
        return;
    }
    let mut lan = Underlay::new();
    let a = DockerHost::launch(&mut lan, "a", &[], &[]);
    // Through the real socket: the start event may be inspected after the
    // container ended (Pid 0).
    for i in 0..8 {
        a.dockerd.docker_ok(&["run", "--rm", "--name", &format!("flash{i}"), BUSYBOX, "true"]);
    }
    assert!(wait_until(Duration::from_secs(10), || {
        let r = a.agent.report();
        let allocs = r["ipam"]["allocations"].as_object().map_or(0, |m| m.keys().filter(|k| k.len() == 64).count());
        allocs == 0 && a.agent.cli(&["ps"]).lines().all(|l| l.starts_with("weft:"))
    }), "report: {}\nlog:\n{}", a.agent.report(), a.agent.log());
    assert!(!a.agent.log().contains("panicked"));
}

#[test]
fn agent_restart_keeps_addresses_and_catches_up() {
    if !root_or_skip("agent_restart_keeps_addresses_and_catches_up") {
        return;
    }
    let (_lan, mut a, b) = two_hosts();
    a.docker_ok(&["run", "-d", "--init", "--name", "stays", BUSYBOX, "sleep", "1000"]);
    a.docker_ok(&["run", "-d", "--init", "--name", "dies", BUSYBOX, "sleep", "1000"]);
    let stays = a.attached_addrs("stays");
    assert!(wait_until(Duration::from_secs(10), || lookup(&b, "dies").len() == 1 && lookup(&b, "stays") == stays));
    a.agent.stop();
    // While the agent is away: one container dies, one starts (through the
    // real socket: no proxy while the agent is down).
    a.dockerd.docker_ok(&["rm", "-f", "dies"]);
    a.dockerd.docker_ok(&["run", "-d", "--init", "--name", "newcomer", BUSYBOX, "sleep", "1000"]);
    a.agent.start();
    assert!(wait_until(Duration::from_secs(15), || a.addrs_of("newcomer").len() == 1), "{}", a.agent.log());
    assert_eq!(a.addrs_of("stays"), stays, "same address after the restart");
    assert!(wait_until(Duration::from_secs(15), || lookup(&b, "dies").is_empty() && lookup(&b, "newcomer").len() == 1));
    assert_eq!(lookup(&b, "stays"), stays);
    // And it still works end to end.
    b.docker_ok(&["run", "-d", "--init", "--name", "server", BUSYBOX, "nc", "-ll", "-p", "4540", "-e", "hostname", "-i"]);
    let server = b.attached_addrs("server");
    let got = a.dockerd.docker_ok(&["exec", "stays", "nc", "-w", "5", &server[0], "4540"]);
    assert_eq!(got, server[0]);
}

#[test]
fn weft_attach_detach_and_ps() {
    if !root_or_skip("weft_attach_detach_and_ps") {
        return;
    }
    let mut lan = Underlay::new();
    let a = DockerHost::launch(&mut lan, "a", &[], &[]);
    // WEFT_CIDR=none: not attached automatically.
    a.docker_ok(&["run", "-d", "--init", "-e", "WEFT_CIDR=none", "--name", "manual", BUSYBOX, "sleep", "1000"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.addrs_of("manual").is_empty());
    let out = a.agent.cli(&["attach", "net:10.40.0.0/16", "manual"]);
    assert!(out.contains("10.40."), "{out}");
    let ps = a.agent.cli(&["ps"]);
    let line = ps.lines().find(|l| l.ends_with(" manual")).unwrap_or_else(|| panic!("ps: {ps}"));
    assert!(line.contains(" 0a:58:0a:28:") && line.contains("10.40."), "{line}");
    let inside = a.dockerd.docker_ok(&["exec", "manual", "ip", "-4", "addr", "show", "ethwe"]);
    assert!(inside.contains("10.40."), "{inside}");
    let routes = a.dockerd.docker_ok(&["exec", "manual", "ip", "route"]);
    assert!(routes.contains("10.32.0.0/12 dev ethwe") && routes.contains("224.0.0.0/4 dev ethwe"), "{routes}");
    let twice = a.agent.try_cli(&["attach", "manual"]);
    assert!(!twice.status.success() && String::from_utf8_lossy(&twice.stderr).contains("attached already"), "attached twice is refused");
    a.agent.cli(&["detach", "manual"]);
    assert!(a.addrs_of("manual").is_empty());
    let gone = a.dockerd.docker(&["exec", "manual", "ip", "link", "show", "ethwe"]);
    assert!(!gone.status.success());
    let err = a.agent.try_cli(&["attach", "no-such-container"]);
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("no such container"));
}

/// The docker CLI through the proxy behaves as against the real socket.
#[test]
fn the_docker_cli_works_through_the_proxy() {
    if !root_or_skip("the_docker_cli_works_through_the_proxy") {
        return;
    }
    let mut lan = Underlay::new();
    let a = DockerHost::launch(&mut lan, "a", &[], &[]);
    // run --rm, exit codes
    assert_eq!(a.docker_ok(&["run", "--rm", BUSYBOX, "echo", "hello"]), "hello");
    let failed = a.docker(&["run", "--rm", BUSYBOX, "sh", "-c", "exit 7"]);
    assert_eq!(failed.status.code(), Some(7));
    // run -i: stdin through, half-close ends it
    let mut child = a
        .proxied()
        .args(["run", "--rm", "-i", BUSYBOX, "sh", "-c", "wc -c; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&vec![b'x'; 100_000]).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(), ["100000", "done"]);
    // run -t in a pseudo-terminal
    let tty = std::process::Command::new("script")
        .args(["-qec", &format!("docker run --rm -t {BUSYBOX} sh -c 'tty; stty size'"), "/dev/null"])
        .env("DOCKER_HOST", &a.proxy)
        .output()
        .unwrap();
    let tty_out = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success() && tty_out.contains("/dev/pts/"), "{tty_out}");
    // exec, attach, logs -f, wait
    // Created with stdin attached (StdinOnce): an attach's half-close ends the
    // container's stdin. With `run -d -i` Docker would instead end the attach
    // stream at once and drop whatever the container still prints.
    a.docker_ok(&["create", "-i", "-a", "stdin", "-a", "stdout", "--name", "talker", BUSYBOX, "sh", "-c", "while read l; do echo got $l; done; echo bye"]);
    a.docker_ok(&["start", "talker"]);
    assert_eq!(a.docker_ok(&["exec", "talker", "echo", "from-exec"]), "from-exec");
    let mut exec_i = a.proxied().args(["exec", "-i", "talker", "cat"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    exec_i.stdin.take().unwrap().write_all(b"through exec\n").unwrap();
    assert_eq!(String::from_utf8_lossy(&exec_i.wait_with_output().unwrap().stdout), "through exec\n");
    let mut logs = a.proxied().args(["logs", "-f", "talker"]).stdout(Stdio::piped()).spawn().unwrap();
    let waiter = a.proxied().args(["wait", "talker"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut attach = a.proxied().args(["attach", "talker"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut stdin = attach.stdin.take().unwrap();
    stdin.write_all(b"one\ntwo\n").unwrap();
    drop(stdin); // half-close: the container's stdin ends, it says bye and exits
    let attached = attach.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&attached.stdout), "got one\ngot two\nbye\n");
    let code = waiter.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0");
    let mut followed = String::new();
    logs.stdout.take().unwrap().read_to_string(&mut followed).unwrap();
    assert!(logs.wait().unwrap().success(), "logs -f ends when the container does");
    assert_eq!(followed, "got one\ngot two\nbye\n", "logs -f streamed to the end");
    // events: streamed as they happen
    let mut events = a
        .proxied()
        .args(["events", "--filter", "type=container", "--filter", "event=start", "--format", "{{.Actor.Attributes.name}}"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a.docker_ok(&["run", "--rm", "--name", "evented", BUSYBOX, "true"]);
    let mut line = [0u8; 8];
    let mut stdout = events.stdout.take().unwrap();
    stdout.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"evented\n");
    let _ = events.kill();
    let _ = events.wait();
    // build: the context streams up, the output streams down
    let ctx = weft_tests::cleanup::TempPath::dir(&weft_tests::unique("ctx")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {BUSYBOX}\nCOPY big /big\nRUN wc -c /big > /size\nCMD [\"cat\", \"/size\"]\n")).unwrap();
    std::fs::write(ctx.join("big"), vec![7u8; 8 << 20]).unwrap();
    let build = a.proxied().args(["build", "-q", "-t", "weft-test/built"]).arg(ctx.path()).env("DOCKER_BUILDKIT", "0").output().unwrap();
    drop(ctx);
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    assert_eq!(a.docker_ok(&["run", "--rm", "weft-test/built"]), "8388608 /big");
    // unversioned paths (bollard sends these) pass too
    let (status, body) = raw(&a.proxy, b"GET /containers/json HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n");
    assert!(status.contains(" 200 "), "{status} {body}");
}

/// Sends raw bytes to the proxy socket and reads the answer (status line, rest).
fn raw(proxy: &str, request: &[u8]) -> (String, String) {
    let path = proxy.strip_prefix("unix://").unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (status, rest) = text.split_once("\r\n").unwrap_or((&text, ""));
    (status.to_string(), rest.to_string())
}

fn create_request(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn bad_requests_get_clear_errors_and_the_proxy_keeps_serving() {
    if !root_or_skip("bad_requests_get_clear_errors_and_the_proxy_keeps_serving") {
        return;
    }
    let mut lan = Underlay::new();
    let mut a = DockerHost::launch(&mut lan, "a", &[], &[]);
    // Malformed JSON: Docker's own error comes back.
    let (status, body) = raw(&a.proxy, &create_request(b"{\"Image\": \"x\", "));
    assert!(status.contains(" 400 ") || status.contains(" 500 "), "{status}");
    assert!(body.contains("message"), "{body}");
    // Hostile shapes.
    for b in [&b"[1,2,3]"[..], b"{\"Image\":\"weft-test/busybox\",\"HostConfig\":5}", b"{\"Image\":\"weft-test/busybox\",\"Env\":\"x\"}", b"null"] {
        let (status, body) = raw(&a.proxy, &create_request(b));
        assert!(!status.contains(" 201 ") && !status.is_empty(), "{} -> {status} {body}", String::from_utf8_lossy(b));
    }
    // A null HostConfig on create is Docker's "none given": it works.
    let (status, body) = raw(&a.proxy, &create_request(b"{\"Image\":\"weft-test/busybox\",\"Cmd\":[\"true\"],\"HostConfig\":null}"));
    assert!(status.contains(" 201 "), "{status} {body}");
    // Start with a hostile HostConfig body: Docker decides.
    let id = a.docker_ok(&["create", BUSYBOX, "true"]);
    for body in [&b"{\"HostConfig\": null}"[..], b"{\"Binds\": 5}", b"\x00\x01garbage"] {
        let mut req = format!(
            "POST /v1.41/containers/{id}/start HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        let (status, _) = raw(&a.proxy, &req);
        assert!(status.starts_with("HTTP/1.1 "), "an HTTP answer: {status:?}");
    }
    // A huge chunked create body: refused by the proxy, clearly.
    let path = a.proxy.strip_prefix("unix://").unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /containers/create HTTP/1.1\r\nHost: docker\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n").unwrap();
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0;
    for _ in 0..16 {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err() || s.write_all(&chunk).is_err() || s.write_all(b"\r\n").is_err() {
            break;
        }
        sent += 1;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("weft proxy"), "after {sent} MiB: {answer}");
    // Garbage that is not HTTP at all.
    let (status, _) = raw(&a.proxy, b"\x16\x03\x01 not http at all\r\n\r\n");
    assert!(status.contains(" 400"), "{status}");
    // Still serving, and still attaching.
    assert_eq!(a.docker_ok(&["run", "--rm", BUSYBOX, "sh", "-c", "ip -4 -o addr show ethwe | wc -l"]), "1");
    assert!(a.agent.exited().is_none());
}

#[test]
fn legacy_hijack_without_upgrade_header() {
    if !root_or_skip("legacy_hijack_without_upgrade_header") {
        return;
    }
    let mut lan = Underlay::new();
    let a = DockerHost::launch(&mut lan, "a", &[], &[]);
    let id = a.docker_ok(&["create", "-i", "-a", "stdin", "-a", "stdout", BUSYBOX, "sh", "-c", "read l; echo got $l"]);
    a.docker_ok(&["start", &id]);
    let path = a.proxy.strip_prefix("unix://").unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Old clients: no Upgrade header; Docker answers 200 and the connection is raw.
    s.write_all(format!("POST /v1.24/containers/{id}/attach?stream=1&stdin=1&stdout=1 HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n").as_bytes()).unwrap();
    let started = Instant::now();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && started.elapsed() < Duration::from_secs(10) {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    s.write_all(b"hijacked\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // Multiplexed stdout frame: 8-byte header, then the text.
    let logs = a.docker(&["logs", &id]);
    let state = a.docker(&["inspect", "-f", "{{json .State}} {{json .Config}}", &id]);
    assert!(String::from_utf8_lossy(&rest).contains("got hijacked"), "{:?} {logs:?} {state:?}", String::from_utf8_lossy(&rest));
}

#[test]
fn the_reference_demo_runs() {
    if !root_or_skip("the_reference_demo_runs") {
        return;
    }
    // `cargo xtask demo` as a user runs it (not interactive: no pause at the end).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-demo"))
        .env("WEFT_BIN", weft_tests::agent::weft_bin())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Hi, this is the data producer in 10."), "{text}");
    assert!(text.contains("I have been seen 6 times"), "the hit counter counted every hit: {text}");
}

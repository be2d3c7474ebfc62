//! `cargo xtask bench dns`: dnsperf against weft and against dnsmasq serving the
//! same names on the same machine, interleaved: queries per second at
//! saturation, and latency percentiles at a fixed rate (so queueing does not
//! decide them). Then the time from registering a name on one of 5 hosts until
//! every other host answers it.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{Table, median, percentile};
use crate::agent::Agent;
use crate::cleanup::{Proc, TempPath};
use crate::{Host, Netns, Underlay, unique, wait_until};

const NAMES: usize = 100;
const WEFT: &str = "127.0.0.2";
const DNSMASQ: &str = "127.0.0.3";

struct Run {
    qps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// dnsperf at saturation for `seconds`: queries per second.
fn saturate(ns: &Netns, server: &str, queries: &str, seconds: u32) -> f64 {
    let out = ns
        .cmd("dnsperf")
        .args(["-s", server, "-d", queries, "-l", &seconds.to_string(), "-c", "4", "-q", "200"])
        .output()
        .expect("dnsperf (apt-get install dnsperf)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// dnsperf at `rate` queries/s for `seconds`: (p50, p99) latency in µs.
fn latency(ns: &Netns, server: &str, queries: &str, rate: u32, seconds: u32) -> (f64, f64) {
    let out = ns
        .cmd("dnsperf")
        .args(["-s", server, "-d", queries, "-l", &seconds.to_string(), "-Q", &rate.to_string(), "-v"])
        .output()
        .expect("dnsperf");
    let lat: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("> NOERROR"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .map(|s| s * 1e6)
        .collect();
    (median(lat.clone()), percentile(lat, 99.0))
}

fn start_dnsmasq(ns: &Netns, hosts_file: &std::path::Path) -> Proc {
    let child = Proc::spawn_killed(
        format!("stopping dnsmasq in {}", ns.name()),
        ns.cmd("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--port=53",
            &format!("--listen-address={DNSMASQ}"),
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--cache-size=10000",
            &format!("--addn-hosts={}", hosts_file.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null()),
    )
    .expect("dnsmasq (apt-get install dnsmasq-base)");
    std::thread::sleep(Duration::from_millis(500));
    child
}

/// Milliseconds from registering a name on host 0 until every other host answers.
fn propagation(rounds: usize) -> f64 {
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..5).map(|i| underlay.host(&format!("p{i}"))).collect();
    let agents: Vec<Agent> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let peers = if i == 0 { vec![] } else { vec![hosts[0].ip] };
            Agent::launch(h, &peers, &["--ipalloc-init", "consensus=5", "--dns-listen-address", &format!("{WEFT}:53"), "--log", "warn"])
        })
        .collect();
    assert!(wait_until(Duration::from_secs(30), || agents.iter().all(|a| a.peers().len() == 5)));
    let mut samples = Vec::new();
    for r in 0..rounds {
        let name = format!("prop{r}.weave.local");
        let waiters: Vec<_> = hosts[1..]
            .iter()
            .map(|h| {
                let name = name.clone();
                crate::on_thread_in(&h.ns, move || {
                    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let q = query(&name);
                    while Instant::now() < deadline {
                        let _ = sock.send_to(&q, (WEFT, 53));
                        let mut buf = [0u8; 512];
                        if let Ok(n) = sock.recv(&mut buf) {
                            // ANCOUNT > 0: answered.
                            if n > 7 && u16::from_be_bytes([buf[6], buf[7]]) > 0 {
                                return Some(Instant::now());
                            }
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    None
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        let (code, body) = agents[0].http("PUT", &format!("/name/c{r}/10.32.7.{}?fqdn={name}", r + 1));
        assert_eq!(code, 200, "{body}");
        let done: Vec<Option<Instant>> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        let last = done.iter().map(|d| d.expect("every host answers")).max().unwrap();
        samples.push(last.duration_since(start).as_secs_f64() * 1e3);
    }
    median(samples)
}

fn query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Runs the benchmark and prints the table and the summary line.
pub fn run_bench(rounds: u32, seconds: u32) {
    let mut underlay = Underlay::new();
    let host = underlay.host("dns");
    let agent = Agent::launch(&host, &[], &["--ipalloc-init", "consensus=1", "--dns-listen-address", &format!("{WEFT}:53"), "--log", "warn"]);
    let hosts_file = TempPath::new(&format!("{}-hosts", unique("bench")));
    let queries = TempPath::new(&format!("{}-queries", unique("bench")));
    {
        let mut hf = std::fs::File::create(&hosts_file).unwrap();
        let mut qf = std::fs::File::create(&queries).unwrap();
        for n in 0..NAMES {
            for k in 0..3u8 {
                let addr = Ipv4Addr::new(10, 32, n as u8, k + 1);
                writeln!(hf, "{addr} svc{n}.weave.local").unwrap();
                let (code, body) = agent.http("PUT", &format!("/name/c{n}-{k}/{addr}?fqdn=svc{n}.weave.local"));
                assert_eq!(code, 200, "{body}");
            }
            writeln!(qf, "svc{n}.weave.local A").unwrap();
        }
    }
    let dnsmasq = start_dnsmasq(&host.ns, &hosts_file);
    let q = queries.to_str().unwrap();
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..2 {
            let i = (k + round as usize) % 2;
            let server = if i == 0 { WEFT } else { DNSMASQ };
            let qps = saturate(&host.ns, server, q, seconds);
            let (p50_us, p99_us) = latency(&host.ns, server, q, 5000, seconds);
            eprintln!(
                "round {} {:<8} {qps:>9.0} q/s   p50 {p50_us:.0} µs   p99 {p99_us:.0} µs",
                round + 1,
                if i == 0 { "weft" } else { "dnsmasq" }
            );
            runs[i].push(Run { qps, p50_us, p99_us });
        }
    }
    drop(dnsmasq);
    drop((hosts_file, queries));
    let m = |i: usize, f: fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
    let mut table = Table::new(&["server", "queries/s (saturated)", "p50 µs @5k/s", "p99 µs @5k/s"]);
    for (i, name) in ["weft", "dnsmasq"].iter().enumerate() {
        table.row(vec![
            name.to_string(),
            format!("{:.0}", m(i, |r| r.qps)),
            format!("{:.0}", m(i, |r| r.p50_us)),
            format!("{:.0}", m(i, |r| r.p99_us)),
        ]);
    }
    println!("{table}");
    println!("{NAMES} names x 3 addresses each; medians of {rounds} interleaved rounds of {seconds} s; dnsperf shares the 2 cores");
    let prop = propagation(5);
    println!("a name registered on one of 5 hosts answers on all the others after {prop:.1} ms (median of 5)");
    println!(
        "bench dns: qps_over_dnsmasq={:.2} p99_over_dnsmasq={:.2} weft_qps={:.0} propagate_5_hosts_ms={prop:.1}",
        m(0, |r| r.qps) / m(1, |r| r.qps),
        m(0, |r| r.p99_us) / m(1, |r| r.p99_us),
        m(0, |r| r.qps)
    );
}

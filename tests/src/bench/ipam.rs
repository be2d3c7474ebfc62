//! `cargo xtask bench ipam`: allocation latency and throughput on real agents.
//! Local: `POST /ip/{id}` answered from the agent's own ranges (persisted before
//! the answer). Remote: `PUT /ip/{id}/{addr}` for addresses the other peer owns,
//! each a request over the mesh, a donation and the ring's gossip back.
//! Throughput: 8 clients allocating at once (group commit shares the fsyncs).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::{Table, median, percentile};
use crate::agent::Agent;
use crate::{Host, Underlay, wait_until};

/// Runs the benchmark and prints the table and the summary line.
pub fn run_bench() {
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..2).map(|i| underlay.host(&format!("b{i}"))).collect();
    let args = ["--ipalloc-init", "consensus=2", "--ipalloc-range", "10.32.0.0/16", "--log", "warn"];
    let a = Agent::launch(&hosts[0], &[], &args);
    let b = Agent::launch(&hosts[1], &[hosts[0].ip], &args);
    assert!(wait_until(Duration::from_secs(20), || a.peers().len() == 2 && b.peers().len() == 2));
    let (code, body) = a.http("POST", "/ip/warmup");
    assert_eq!(code, 200, "{body}");

    // One client thread inside a's namespace: the timings are the agent's
    // (HTTP over loopback included), not the harness's.
    let local: Vec<f64> = crate::on_thread_in(a.netns(), || {
        (0..500)
            .map(|k| {
                let t = Instant::now();
                let (code, body) = request("POST", &format!("/ip/l{k}"));
                assert_eq!(code, 200, "{body}");
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect()
    })
    .join()
    .expect("client");

    // Addresses in b's half (the ring is cut in name order).
    let theirs = if b.name < a.name { 0u8 } else { 128u8 };
    let remote: Vec<f64> = crate::on_thread_in(a.netns(), move || {
        (0..50u8)
            .map(|k| {
                let addr = Ipv4Addr::new(10, 32, theirs + 10 + k / 4, 10 + k);
                let t = Instant::now();
                let (code, body) = request("PUT", &format!("/ip/r{k}/{addr}"));
                assert_eq!(code, 200, "claim of {addr}: {body}");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect()
    })
    .join()
    .expect("client");

    let (threads, per) = (8, 250);
    let t = Instant::now();
    let clients: Vec<_> = (0..threads)
        .map(|th| {
            crate::on_thread_in(a.netns(), move || {
                for k in 0..per {
                    let (code, body) = request("POST", &format!("/ip/t{th}-{k}"));
                    assert_eq!(code, 200, "{body}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let allocs_per_s = f64::from(threads * per) / t.elapsed().as_secs_f64();

    let mut table = Table::new(&["measure", "p50", "p99", "samples"]);
    table.row(vec![
        "local allocation (µs)".into(),
        format!("{:.0}", median(local.clone())),
        format!("{:.0}", percentile(local.clone(), 99.0)),
        local.len().to_string(),
    ]);
    table.row(vec![
        "space from another peer (ms)".into(),
        format!("{:.2}", median(remote.clone())),
        format!("{:.2}", percentile(remote.clone(), 99.0)),
        remote.len().to_string(),
    ]);
    println!("{table}");
    println!("throughput: {allocs_per_s:.0} allocations/s with {threads} concurrent clients (each persisted before its answer)");
    println!(
        "bench ipam: local_p50_us={:.0} local_p99_us={:.0} remote_p50_ms={:.2} allocs_per_s={allocs_per_s:.0}",
        median(local.clone()),
        percentile(local, 99.0),
        median(remote)
    );
}

/// One HTTP request to the agent of the calling thread's namespace.
fn request(method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect("127.0.0.1:6784").expect("API");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: weft\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

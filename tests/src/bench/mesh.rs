//! `cargo xtask bench mesh`: how the mesh scales. In the timed simulation (the
//! agent's own gossip code, 1 ms links, real CPU cost per message): time for 10,
//! 100 and 1000 peers to agree on the topology after all start at once, each
//! dialing ⌈log₂ N⌉ random others; the bytes each peer receives for that and for
//! one later change. Then 10 real agents in namespaces: launch to full mesh.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use weft::mesh::timed::TimedSim;

use super::Table;
use crate::agent::Agent;
use crate::{Host, Underlay, wait_until};

struct SimResult {
    n: usize,
    degree: f64,
    converge_s: f64,
    bytes_per_peer_converge: f64,
    bytes_per_peer_per_change: f64,
    wall_s: f64,
}

fn simulate(n: usize, seed: u64) -> SimResult {
    let wall = Instant::now();
    let k = (n as f64).log2().ceil().max(1.0) as usize;
    let mut t = TimedSim::new(n, seed, 0.001, 5.0);
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..n {
        for _ in 0..k {
            let j = rng.random_range(0..n);
            t.connect(i, j);
        }
    }
    // One network: join any separate components.
    let mut seen = vec![false; n];
    let mut roots = Vec::new();
    for i in 0..n {
        if !seen[i] {
            for j in t.sim.component(i) {
                seen[j] = true;
            }
            roots.push(i);
        }
    }
    for w in roots.windows(2) {
        t.connect(w[0], w[1]);
    }
    let degree = 2.0 * t.sim.links().len() as f64 / n as f64;
    let converge_s = t.converge(0.05, 300.0).unwrap_or(f64::NAN);
    let bytes_per_peer_converge = t.bytes() as f64 / n as f64;

    // One change (a new connection), without the background anti-entropy.
    t.stop_ticks();
    t.run_until(f64::INFINITY);
    let before = t.bytes();
    let (a, b) = loop {
        let (a, b) = (rng.random_range(0..n), rng.random_range(0..n));
        if a != b && !t.sim.linked(a, b) {
            break (a, b);
        }
    };
    t.connect(a, b);
    t.run_until(f64::INFINITY);
    let bytes_per_peer_per_change = (t.bytes() - before) as f64 / n as f64;
    SimResult {
        n,
        degree,
        converge_s,
        bytes_per_peer_converge,
        bytes_per_peer_per_change,
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

/// Ten real agents, launched together, each told only the first host.
fn real_launch(n: usize) -> f64 {
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (0..n).map(|i| underlay.host(&format!("r{i}"))).collect();
    let first = hosts[0].ip;
    let start = Instant::now();
    let agents: Vec<Agent> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let peers = if i == 0 { vec![] } else { vec![first] };
                s.spawn(move || Agent::launch(h, &peers, &[]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("launch")).collect()
    });
    let formed = wait_until(Duration::from_secs(60), || agents.iter().all(|a| a.established() == n - 1));
    let took = start.elapsed().as_secs_f64();
    assert!(formed, "the real mesh did not form");
    took
}

/// Runs the benchmark and prints the table and the summary line.
pub fn run_bench() {
    let mut results = Vec::new();
    for n in [10, 100, 1000] {
        let r = simulate(n, 42);
        eprintln!("simulated {n} peers in {:.1} s of CPU", r.wall_s);
        results.push(r);
    }
    let mut table = Table::new(&[
        "peers",
        "avg degree",
        "converge (simulated s)",
        "bytes/peer to converge",
        "bytes/peer per change",
    ]);
    for r in &results {
        table.row(vec![
            r.n.to_string(),
            format!("{:.1}", r.degree),
            format!("{:.3}", r.converge_s),
            format!("{:.0}", r.bytes_per_peer_converge),
            format!("{:.0}", r.bytes_per_peer_per_change),
        ]);
    }
    println!("{table}");
    println!("each peer dials ceil(log2 N) random peers at t=0; 1 ms links; processing at measured CPU cost");
    let real = real_launch(10);
    println!("10 real agents in network namespaces: launch to full mesh in {real:.2} s");
    let by = |n: usize| results.iter().find(|r| r.n == n).expect("simulated");
    println!(
        "bench mesh: converge_100_s={:.3} converge_1000_s={:.3} bytes_per_peer_per_change_1000={:.0} launch_to_mesh_10_real_s={:.2}",
        by(100).converge_s,
        by(1000).converge_s,
        by(1000).bytes_per_peer_per_change,
        real
    );
}

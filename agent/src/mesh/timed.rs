//! A timed simulation for `cargo xtask bench mesh`: the [`Sim`] network with
//! per-link latency, and each node handling one message at a time at the real
//! CPU cost of doing so (measured), flushing its topology updates once its ready
//! work is done (as the agent does), pruning at most every 250 ms, and running
//! anti-entropy every tick. Reports simulated time to convergence and bytes.
//!
//! Owns simulated time only; the nodes are the agent's own, untouched.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::node::{Gossip, Outbox};
use super::sim::Sim;

enum Event {
    Deliver { from: usize, to: usize, msg: Gossip },
    Flush(usize),
    Prune(usize),
    Tick(usize),
}

struct Pending {
    at: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    // A min-heap on (time, sequence).
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.total_cmp(&self.at).then(other.seq.cmp(&self.seq))
    }
}

/// The timed network.
pub struct TimedSim {
    pub sim: Sim,
    /// Simulated seconds.
    pub now: f64,
    busy: Vec<f64>,
    flush_scheduled: Vec<bool>,
    prune_scheduled: Vec<bool>,
    last_prune: Vec<f64>,
    heap: BinaryHeap<Pending>,
    seq: u64,
    /// One-way latency of a link, seconds.
    pub latency: f64,
    /// Anti-entropy period, seconds (0 = none).
    pub tick: f64,
    rng: StdRng,
    in_flight: usize,
}

/// The prune interval of the agent.
const PRUNE: f64 = 0.25;

impl TimedSim {
    /// `n` peers, one-way `latency` seconds, anti-entropy every `tick` seconds.
    pub fn new(n: usize, seed: u64, latency: f64, tick: f64) -> Self {
        let mut t = TimedSim {
            sim: Sim::new(n, seed),
            now: 0.0,
            busy: vec![0.0; n],
            flush_scheduled: vec![false; n],
            prune_scheduled: vec![false; n],
            last_prune: vec![0.0; n],
            heap: BinaryHeap::new(),
            seq: 0,
            latency,
            tick,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            in_flight: 0,
        };
        if tick > 0.0 {
            for i in 0..n {
                let at = t.rng.random_range(0.0..tick);
                t.push(at, Event::Tick(i));
            }
        }
        t
    }

    fn push(&mut self, at: f64, event: Event) {
        self.seq += 1;
        if matches!(event, Event::Deliver { .. }) {
            self.in_flight += 1;
        }
        self.heap.push(Pending { at, seq: self.seq, event });
    }

    fn send(&mut self, from: usize, at: f64, out: &mut Outbox) {
        for (to, msg) in out.drain() {
            let to = self.sim.index_of(to);
            let delay = self.latency * self.rng.random_range(0.5..1.5);
            self.push(at + delay, Event::Deliver { from, to, msg });
        }
    }

    fn after_work(&mut self, i: usize) {
        if self.sim.nodes[i].has_pending() && !self.flush_scheduled[i] {
            self.flush_scheduled[i] = true;
            let at = self.busy[i];
            self.push(at, Event::Flush(i));
        }
        if self.sim.nodes[i].needs_prune() && !self.prune_scheduled[i] {
            self.prune_scheduled[i] = true;
            let at = self.busy[i].max(self.last_prune[i] + PRUNE);
            self.push(at, Event::Prune(i));
        }
    }

    /// Connects `a` and `b` at the current time (after a TCP + handshake delay).
    pub fn connect(&mut self, a: usize, b: usize) {
        let at = self.now + 3.0 * self.latency;
        for i in [a, b] {
            self.busy[i] = self.busy[i].max(at);
        }
        if let Some((mut oa, mut ob)) = self.sim.connect_raw(a, b) {
            self.send(a, at, &mut oa);
            self.send(b, at, &mut ob);
            self.after_work(a);
            self.after_work(b);
        }
    }

    /// Processes events up to simulated time `until`, or until no message is in
    /// flight and `until` is infinite.
    pub fn run_until(&mut self, until: f64) {
        while let Some(p) = self.heap.peek() {
            if p.at > until || (until.is_infinite() && self.in_flight == 0 && !self.work_scheduled()) {
                break;
            }
            let p = self.heap.pop().expect("peeked");
            self.now = p.at;
            match p.event {
                Event::Deliver { from, to, msg } => {
                    self.in_flight -= 1;
                    // Over a link that is gone, the message is lost.
                    if !self.sim.linked(from, to) {
                        continue;
                    }
                    let start = p.at.max(self.busy[to]);
                    let name = self.sim.name(from);
                    let mut out = Outbox::default();
                    self.sim.bytes_received[to] += postcard::to_stdvec(&msg).map_or(0, |b| b.len() as u64);
                    self.sim.delivered += 1;
                    let t0 = Instant::now();
                    let _ = self.sim.nodes[to].receive(name, msg, &mut out);
                    self.busy[to] = start + t0.elapsed().as_secs_f64();
                    let at = self.busy[to];
                    self.send(to, at, &mut out);
                    self.after_work(to);
                }
                Event::Flush(i) => {
                    if p.at < self.busy[i] {
                        // Still busy: flush once the ready work is done.
                        let at = self.busy[i];
                        self.push(at, Event::Flush(i));
                        continue;
                    }
                    self.flush_scheduled[i] = false;
                    let mut out = Outbox::default();
                    let t0 = Instant::now();
                    self.sim.nodes[i].flush(&mut out);
                    self.busy[i] = p.at + t0.elapsed().as_secs_f64();
                    let at = self.busy[i];
                    self.send(i, at, &mut out);
                }
                Event::Prune(i) => {
                    self.prune_scheduled[i] = false;
                    let t0 = Instant::now();
                    self.sim.nodes[i].prune();
                    self.last_prune[i] = p.at;
                    self.busy[i] = p.at.max(self.busy[i]) + t0.elapsed().as_secs_f64();
                    self.after_work(i);
                }
                Event::Tick(i) => {
                    let mut out = Outbox::default();
                    let mut rng = StdRng::seed_from_u64(self.rng.random());
                    self.sim.nodes[i].tick(&mut rng, &mut out);
                    let at = p.at.max(self.busy[i]);
                    self.send(i, at, &mut out);
                    self.after_work(i);
                    let next = p.at + self.tick;
                    self.push(next, Event::Tick(i));
                }
            }
        }
        if until.is_finite() {
            self.now = self.now.max(until);
        }
    }

    fn work_scheduled(&self) -> bool {
        self.flush_scheduled.iter().chain(&self.prune_scheduled).any(|s| *s)
    }

    /// Runs until every peer agrees (checked every `every` seconds) or `limit`
    /// simulated seconds pass; returns the time it took.
    pub fn converge(&mut self, every: f64, limit: f64) -> Option<f64> {
        let start = self.now;
        while self.now - start < limit {
            let next = self.now + every;
            self.run_until(next);
            if self.in_flight == 0 && self.sim.check_converged().is_ok() {
                return Some(self.now - start);
            }
        }
        None
    }

    /// Stops the anti-entropy ticks (to measure what one change costs alone).
    pub fn stop_ticks(&mut self) {
        let heap = std::mem::take(&mut self.heap);
        self.heap = heap.into_iter().filter(|p| !matches!(p.event, Event::Tick(_))).collect();
        self.tick = 0.0;
    }

    /// Total bytes received by all peers.
    pub fn bytes(&self) -> u64 {
        self.sim.bytes_received.iter().sum()
    }
}

//! An in-memory network of [`Node`]s: the mesh's sans-IO core with messages
//! delivered in random order over links that can be cut and healed. Used by the
//! convergence tests and by `cargo xtask bench mesh`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::node::{Gossip, GossipError, Gossiper, Node, Outbox};
use super::peer::PeerName;
use super::topology::PeerEntry;

/// A simulated network.
pub struct Sim {
    pub nodes: Vec<Node>,
    names: Vec<PeerName>,
    index: BTreeMap<PeerName, usize>,
    links: BTreeSet<(usize, usize)>,
    queue: Vec<(usize, usize, Gossip)>,
    rng: StdRng,
    /// Bytes each node has received (postcard-encoded messages).
    pub bytes_received: Vec<u64>,
    /// Messages delivered so far.
    pub delivered: u64,
    /// The test channel of each node.
    pub sets: Vec<Arc<SetGossiper>>,
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    /// `n` unconnected peers; `seed` makes the run reproducible.
    pub fn new(n: usize, seed: u64) -> Sim {
        let mut nodes = Vec::new();
        let mut names = Vec::new();
        let mut sets = Vec::new();
        for i in 0..n {
            let name = PeerName::new(0x0200_0000_0000 + i as u64);
            let mut node = Node::new(name, format!("p{i}"), i as u64, 1, None);
            let set = Arc::new(SetGossiper::default());
            node.add_channel("set", set.clone());
            nodes.push(node);
            names.push(name);
            sets.push(set);
        }
        let index = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        Sim {
            nodes,
            names,
            index,
            links: BTreeSet::new(),
            queue: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            bytes_received: vec![0; n],
            delivered: 0,
            sets,
        }
    }

    /// The name of peer `i`.
    pub fn name(&self, i: usize) -> PeerName {
        self.names[i]
    }

    fn enqueue(&mut self, from: usize, out: &mut Outbox) {
        for (to, msg) in out.drain() {
            let to = self.index[&to];
            self.queue.push((from, to, msg));
        }
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 6783))
    }

    /// The index of peer `name`.
    pub fn index_of(&self, name: PeerName) -> usize {
        self.index[&name]
    }

    /// Whether `a` and `b` are connected.
    pub fn linked(&self, a: usize, b: usize) -> bool {
        self.links.contains(&key(a, b))
    }

    /// Establishes a connection and returns both ends' outboxes, unflushed (for
    /// the timed simulation); `None` if they were connected already.
    pub fn connect_raw(&mut self, a: usize, b: usize) -> Option<(Outbox, Outbox)> {
        if a == b || !self.links.insert(key(a, b)) {
            return None;
        }
        let (mut oa, mut ob) = (Outbox::default(), Outbox::default());
        let (na, nb) = (self.names[a], self.names[b]);
        self.nodes[a].connection_up(nb, Self::addr(b), true, &mut oa);
        self.nodes[b].connection_up(na, Self::addr(a), false, &mut ob);
        Some((oa, ob))
    }

    /// Establishes a connection between `a` and `b`.
    pub fn connect(&mut self, a: usize, b: usize) {
        if a == b || !self.links.insert(key(a, b)) {
            return;
        }
        let mut out = Outbox::default();
        let (na, nb) = (self.names[a], self.names[b]);
        self.nodes[a].connection_up(nb, Self::addr(b), true, &mut out);
        self.nodes[a].flush(&mut out);
        self.enqueue(a, &mut out);
        self.nodes[b].connection_up(na, Self::addr(a), false, &mut out);
        self.nodes[b].flush(&mut out);
        self.enqueue(b, &mut out);
    }

    /// Cuts the connection between `a` and `b` (messages in flight are lost).
    pub fn disconnect(&mut self, a: usize, b: usize) {
        if !self.links.remove(&key(a, b)) {
            return;
        }
        self.queue.retain(|(f, t, _)| key(*f, *t) != key(a, b));
        let mut out = Outbox::default();
        let (na, nb) = (self.names[a], self.names[b]);
        self.nodes[a].connection_down(nb);
        self.nodes[a].flush(&mut out);
        self.enqueue(a, &mut out);
        self.nodes[b].connection_down(na);
        self.nodes[b].flush(&mut out);
        self.enqueue(b, &mut out);
    }

    /// The links currently up.
    pub fn links(&self) -> &BTreeSet<(usize, usize)> {
        &self.links
    }

    /// Delivers one message picked at random (so messages are reordered).
    pub fn step(&mut self) -> bool {
        if self.queue.is_empty() {
            return false;
        }
        let i = self.rng.random_range(0..self.queue.len());
        let (from, to, msg) = self.queue.swap_remove(i);
        self.bytes_received[to] += postcard::to_stdvec(&msg).map_or(0, |b| b.len() as u64);
        self.delivered += 1;
        let mut out = Outbox::default();
        // In the simulation every message is well formed; refusals are bugs.
        if let Err(e) = self.nodes[to].receive(self.names[from], msg, &mut out) {
            assert!(matches!(e, GossipError::NoRoute(_)), "node {to} refused a message: {e}");
        }
        self.nodes[to].flush(&mut out);
        self.enqueue(to, &mut out);
        true
    }

    /// Delivers messages until none is left (or `max` were delivered).
    pub fn run(&mut self, max: u64) -> u64 {
        let mut n = 0;
        while n < max && self.step() {
            n += 1;
        }
        n
    }

    /// One tick on every node (anti-entropy), then delivery until quiet.
    pub fn tick_all(&mut self) {
        for i in 0..self.nodes.len() {
            let mut out = Outbox::default();
            let mut rng = StdRng::seed_from_u64(self.rng.random());
            self.nodes[i].tick(&mut rng, &mut out);
            self.nodes[i].flush(&mut out);
            self.enqueue(i, &mut out);
        }
        self.run(u64::MAX);
    }

    /// Adds `item` to peer `i`'s set and gossips it.
    pub fn add_item(&mut self, i: usize, item: u64) {
        if self.sets[i].insert(item) {
            let mut out = Outbox::default();
            self.nodes[i].gossip("set", postcard::to_stdvec(&vec![item]).expect("encode"), &mut out);
            self.enqueue(i, &mut out);
        }
    }

    fn adjacency(&self) -> Vec<Vec<usize>> {
        let mut adj = vec![Vec::new(); self.nodes.len()];
        for &(a, b) in &self.links {
            adj[a].push(b);
            adj[b].push(a);
        }
        adj
    }

    fn distances_in(adj: &[Vec<usize>], from: usize) -> BTreeMap<usize, usize> {
        let mut dist = BTreeMap::from([(from, 0)]);
        let mut queue = VecDeque::from([from]);
        while let Some(p) = queue.pop_front() {
            for &q in &adj[p] {
                if !dist.contains_key(&q) {
                    dist.insert(q, dist[&p] + 1);
                    queue.push_back(q);
                }
            }
        }
        dist
    }

    /// Peers `i` can reach over the real links.
    pub fn component(&self, i: usize) -> BTreeSet<usize> {
        Self::distances_in(&self.adjacency(), i).into_keys().collect()
    }

    /// Checks that every peer knows exactly the peers of its component with their
    /// latest entries, and routes along shortest paths of the real graph.
    /// Returns a description of the first disagreement.
    pub fn check_converged(&mut self) -> Result<(), String> {
        let adj = self.adjacency();
        let all: Vec<BTreeMap<usize, usize>> = (0..self.nodes.len()).map(|i| Self::distances_in(&adj, i)).collect();
        for i in 0..self.nodes.len() {
            self.nodes[i].prune();
            let dist = &all[i];
            let component: BTreeSet<usize> = dist.keys().copied().collect();
            let expected: BTreeMap<PeerName, PeerEntry> =
                component.iter().map(|&j| (self.names[j], self.nodes[j].own().clone())).collect();
            let known: BTreeMap<PeerName, PeerEntry> =
                self.nodes[i].topology().entries().map(|e| (e.name, e.clone())).collect();
            if known != expected {
                let missing: Vec<_> = expected.keys().filter(|k| known.get(*k) != expected.get(*k)).collect();
                let extra: Vec<_> = known.keys().filter(|k| !expected.contains_key(*k)).collect();
                return Err(format!("peer {i}: stale or missing {missing:?}, extra {extra:?}"));
            }
            let routes = self.nodes[i].routes().clone();
            for &j in &component {
                if j == i {
                    continue;
                }
                let hop = routes.unicast.get(&self.names[j]).ok_or(format!("peer {i}: no route to {j}"))?;
                let h = self.index[hop];
                let via = &all[h];
                if dist.get(&h) != Some(&1) || via.get(&j).map(|d| d + 1) != dist.get(&j).copied() {
                    return Err(format!("peer {i}: route to {j} via {h} is not a shortest path"));
                }
            }
            if routes.unicast.len() != component.len() - 1 {
                return Err(format!("peer {i}: routes to peers outside its component"));
            }
        }
        Ok(())
    }
}

/// A grow-only set of numbers: the test channel.
#[derive(Default)]
pub struct SetGossiper {
    items: Mutex<BTreeSet<u64>>,
}

impl SetGossiper {
    /// Adds an item; true if it was new.
    pub fn insert(&self, item: u64) -> bool {
        self.items.lock().expect("lock").insert(item)
    }

    /// The items.
    pub fn items(&self) -> BTreeSet<u64> {
        self.items.lock().expect("lock").clone()
    }
}

impl Gossiper for SetGossiper {
    fn full_state(&self) -> Vec<u8> {
        postcard::to_stdvec(&self.items.lock().expect("lock").iter().copied().collect::<Vec<u64>>())
            .expect("encode")
    }

    fn on_gossip(&self, _from: PeerName, update: &[u8]) -> Result<Option<Vec<u8>>, GossipError> {
        let items: Vec<u64> = postcard::from_bytes(update)
            .map_err(|e| GossipError::Decode { channel: "set".into(), detail: e.to_string() })?;
        let mut set = self.items.lock().expect("lock");
        let new: Vec<u64> = items.into_iter().filter(|i| set.insert(*i)).collect();
        Ok(if new.is_empty() { None } else { Some(postcard::to_stdvec(&new).expect("encode")) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each peer dials a few random others, in random order, while messages fly.
    fn random_mesh(sim: &mut Sim, n: usize, degree: usize, rng: &mut StdRng) {
        let mut events: Vec<(usize, usize)> = Vec::new();
        for a in 0..n {
            for _ in 0..degree {
                events.push((a, rng.random_range(0..n)));
            }
        }
        // Random connect order, interleaved with random amounts of delivery.
        for i in (1..events.len()).rev() {
            events.swap(i, rng.random_range(0..=i));
        }
        for (a, b) in events {
            sim.connect(a, b);
            let burst = rng.random_range(0..20);
            sim.run(burst);
        }
    }

    fn settle(sim: &mut Sim) {
        sim.run(u64::MAX);
        sim.tick_all();
        sim.tick_all();
    }

    #[test]
    fn two_hundred_peers_converge_through_partitions_and_heals() {
        for seed in [1, 2, 3] {
            let n = 200;
            let mut rng = StdRng::seed_from_u64(seed);
            let mut sim = Sim::new(n, seed);
            random_mesh(&mut sim, n, 3, &mut rng);
            // Make sure it is one network (join the components in a chain).
            let mut roots: Vec<usize> = Vec::new();
            for i in 0..n {
                if roots.iter().all(|r| !sim.component(*r).contains(&i)) {
                    roots.push(i);
                }
            }
            for w in roots.windows(2) {
                sim.connect(w[0], w[1]);
            }
            settle(&mut sim);
            sim.check_converged().unwrap_or_else(|e| panic!("seed {seed}, initial: {e}"));

            // Channel state reaches everyone.
            for i in 0..10 {
                sim.add_item(i * 7, i as u64);
            }
            settle(&mut sim);
            for s in &sim.sets {
                assert_eq!(s.items().len(), 10, "seed {seed}: the set reached every peer");
            }

            // Partition: peers below n/2 on one side; cut every link across.
            let cut: Vec<(usize, usize)> =
                sim.links().iter().copied().filter(|(a, b)| (*a < n / 2) != (*b < n / 2)).collect();
            for &(a, b) in &cut {
                sim.disconnect(a, b);
                sim.run(rng.random_range(0..50));
            }
            // Updates on both sides during the partition.
            sim.add_item(0, 1000);
            sim.add_item(n - 1, 2000);
            settle(&mut sim);
            sim.check_converged().unwrap_or_else(|e| panic!("seed {seed}, partitioned: {e}"));
            assert!(sim.nodes[0].topology().get(sim.name(n - 1)).is_none(), "the other side is pruned");

            // Heal, in random order, interleaved with delivery.
            for &(a, b) in cut.iter().rev() {
                sim.connect(a, b);
                sim.run(rng.random_range(0..50));
            }
            settle(&mut sim);
            sim.check_converged().unwrap_or_else(|e| panic!("seed {seed}, healed: {e}"));
            for s in &sim.sets {
                assert_eq!(s.items().len(), 12, "seed {seed}: both sides' updates everywhere");
            }
        }
    }

    #[test]
    fn unicast_and_broadcast_reach_their_peers_along_the_routes() {
        #[derive(Default)]
        struct Inbox(Mutex<Vec<(PeerName, Vec<u8>)>>);
        impl Gossiper for Inbox {
            fn full_state(&self) -> Vec<u8> {
                Vec::new()
            }
            fn on_gossip(&self, _: PeerName, _: &[u8]) -> Result<Option<Vec<u8>>, GossipError> {
                Ok(None)
            }
            fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
                self.0.lock().unwrap().push((src, msg.to_vec()));
                Ok(())
            }
            fn on_broadcast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
                self.0.lock().unwrap().push((src, msg.to_vec()));
                Ok(())
            }
        }
        // A line: 0 - 1 - 2 - 3 - 4, plus 1 - 3.
        let mut sim = Sim::new(5, 9);
        let inboxes: Vec<Arc<Inbox>> = (0..5).map(|_| Arc::new(Inbox::default())).collect();
        for (i, inbox) in inboxes.iter().enumerate() {
            sim.nodes[i].add_channel("inbox", inbox.clone());
        }
        for (a, b) in [(0, 1), (1, 2), (2, 3), (3, 4), (1, 3)] {
            sim.connect(a, b);
        }
        sim.run(u64::MAX);
        sim.check_converged().unwrap();
        let mut out = Outbox::default();
        let dst = sim.name(4);
        sim.nodes[0].unicast("inbox", dst, b"hello".to_vec(), &mut out).unwrap();
        sim.enqueue(0, &mut out);
        sim.nodes[2].broadcast("inbox", b"all".to_vec(), &mut out);
        sim.enqueue(2, &mut out);
        sim.run(u64::MAX);
        assert_eq!(inboxes[4].0.lock().unwrap().iter().filter(|(_, m)| m == b"hello").count(), 1);
        for (i, inbox) in inboxes.iter().enumerate() {
            let got = inbox.0.lock().unwrap().iter().filter(|(_, m)| m == b"all").count();
            assert_eq!(got, if i == 2 { 0 } else { 1 }, "peer {i} gets the broadcast exactly once");
        }
    }
}

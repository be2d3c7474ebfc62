//! An in-memory network of [`Node`]s: the mesh's sans-IO core with messages
//! delivered in random order over links that can be cut and healed. Used by the
//! convergence tests and by `cargo xtask bench mesh`.
//!
//! Links come in two kinds. [`Sim::connect`] makes one that is up at both ends
//! at once. [`Sim::dial`] makes a connection whose two ends finish their
//! handshakes in random order amid the other traffic; each end then applies the
//! agent's own [`admit`] (the duplicate-connection rule), and an end that drops
//! a connection tells the other, later. Messages travel over one connection: a
//! message that reaches an end still in its handshake waits for it, and one
//! that reaches a closed end is lost, as over TCP.
//!
//! Owns the simulated network; the nodes and the rules are the agent's own,
//! never re-implemented here.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::node::{Gossip, GossipError, Gossiper, Node, Outbox};
use super::peer::PeerName;
use super::targets::{Admission, ConnId, admit};
use super::topology::PeerEntry;

/// One end of a simulated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Handshaking,
    /// Registered: the node uses it for the peer.
    Up,
    Closed,
}

/// A simulated connection.
#[derive(Debug)]
struct SimConn {
    dialer: usize,
    acceptor: usize,
    /// The dialer's end, then the acceptor's.
    ends: [End; 2],
    /// Messages that reached an end before its handshake finished: (the
    /// receiving end's node, the message).
    held: Vec<(usize, Gossip)>,
}

impl SimConn {
    fn side(&self, node: usize) -> usize {
        usize::from(node != self.dialer)
    }

    fn other(&self, node: usize) -> usize {
        if node == self.dialer { self.acceptor } else { self.dialer }
    }
}

/// Something on its way.
#[derive(Debug)]
enum Transit {
    Message { from: usize, to: usize, conn: ConnId, msg: Gossip },
    /// Node `at` finishes its handshake of `conn`.
    Handshake { conn: ConnId, at: usize },
    /// Node `at` learns that the other end closed `conn`.
    Closed { conn: ConnId, at: usize },
}

/// A simulated network.
pub struct Sim {
    pub nodes: Vec<Node>,
    names: Vec<PeerName>,
    index: BTreeMap<PeerName, usize>,
    /// Pairs whose ends both have a connection to each other up.
    links: BTreeSet<(usize, usize)>,
    conns: BTreeMap<ConnId, SimConn>,
    /// Per node, the connection it uses for each peer.
    registered: Vec<BTreeMap<PeerName, ConnId>>,
    next_conn: ConnId,
    queue: Vec<Transit>,
    rng: StdRng,
    /// Bytes each node has received (postcard-encoded messages).
    pub bytes_received: Vec<u64>,
    /// Messages delivered so far.
    pub delivered: u64,
    /// The test channel of each node.
    pub sets: Vec<Arc<SetGossiper>>,
    /// Connections the duplicate rule closed (counted at each end).
    pub duplicates_closed: u64,
    /// Connections an end was using when the other end closed them.
    pub closed_in_use: u64,
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// How a simulated mesh has not converged (peers by index).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Divergence {
    #[error("peer {peer}: stale or missing {missing:?}, extra {extra:?}")]
    Topology { peer: usize, missing: Vec<PeerName>, extra: Vec<PeerName> },
    #[error("peer {peer}: no route to {to}")]
    NoRoute { peer: usize, to: usize },
    #[error("peer {peer}: route to {to} via {via} is not a shortest path")]
    NotShortest { peer: usize, to: usize, via: usize },
    #[error("peer {peer}: routes to peers outside its component")]
    RoutesOutside { peer: usize },
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
            conns: BTreeMap::new(),
            registered: vec![BTreeMap::new(); n],
            next_conn: 0,
            queue: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            bytes_received: vec![0; n],
            delivered: 0,
            sets,
            duplicates_closed: 0,
            closed_in_use: 0,
        }
    }

    /// The name of peer `i`.
    pub fn name(&self, i: usize) -> PeerName {
        self.names[i]
    }

    /// Queues `from`'s messages over the connections it uses; a message for a
    /// peer it has none to is lost (the agent drops it too).
    fn enqueue(&mut self, from: usize, out: &mut Outbox) {
        for (to, msg) in out.drain() {
            let Some(&conn) = self.registered[from].get(&to) else { continue };
            let to = self.index[&to];
            self.queue.push(Transit::Message { from, to, conn, msg });
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

    fn new_conn(&mut self, dialer: usize, acceptor: usize, ends: End) -> ConnId {
        self.next_conn += 1;
        self.conns.insert(self.next_conn, SimConn { dialer, acceptor, ends: [ends; 2], held: Vec::new() });
        self.next_conn
    }

    fn relink(&mut self, a: usize, b: usize) {
        if self.registered[a].contains_key(&self.names[b]) && self.registered[b].contains_key(&self.names[a]) {
            self.links.insert(key(a, b));
        } else {
            self.links.remove(&key(a, b));
        }
    }

    /// A connection up at both ends at once.
    fn open(&mut self, a: usize, b: usize) {
        let id = self.new_conn(a, b, End::Up);
        self.registered[a].insert(self.names[b], id);
        self.registered[b].insert(self.names[a], id);
        self.links.insert(key(a, b));
    }

    /// Establishes a connection and returns both ends' outboxes, unflushed (for
    /// the timed simulation); `None` if they were connected already.
    pub fn connect_raw(&mut self, a: usize, b: usize) -> Option<(Outbox, Outbox)> {
        if a == b || self.linked(a, b) {
            return None;
        }
        self.open(a, b);
        let (mut oa, mut ob) = (Outbox::default(), Outbox::default());
        let (na, nb) = (self.names[a], self.names[b]);
        self.nodes[a].connection_up(nb, Self::addr(b), true, &mut oa);
        self.nodes[b].connection_up(na, Self::addr(a), false, &mut ob);
        Some((oa, ob))
    }

    /// Establishes a connection between `a` and `b`.
    pub fn connect(&mut self, a: usize, b: usize) {
        if a == b || self.linked(a, b) {
            return;
        }
        self.open(a, b);
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
        self.queue.retain(|t| !matches!(t, Transit::Message { from, to, .. } if key(*from, *to) == key(a, b)));
        for (i, j) in [(a, b), (b, a)] {
            if let Some(id) = self.registered[i].remove(&self.names[j])
                && let Some(c) = self.conns.get_mut(&id)
            {
                let side = c.side(i);
                c.ends[side] = End::Closed;
            }
        }
        let mut out = Outbox::default();
        let (na, nb) = (self.names[a], self.names[b]);
        self.nodes[a].connection_down(nb);
        self.nodes[a].flush(&mut out);
        self.enqueue(a, &mut out);
        self.nodes[b].connection_down(na);
        self.nodes[b].flush(&mut out);
        self.enqueue(b, &mut out);
    }

    /// `a` dials `b`: a new connection whose two ends finish their handshakes
    /// in random order amid the other traffic.
    pub fn dial(&mut self, a: usize, b: usize) -> ConnId {
        let id = self.new_conn(a, b, End::Handshaking);
        self.queue.push(Transit::Handshake { conn: id, at: a });
        self.queue.push(Transit::Handshake { conn: id, at: b });
        id
    }

    /// The connection `a` uses for `b`.
    pub fn connection(&self, a: usize, b: usize) -> Option<ConnId> {
        self.registered[a].get(&self.names[b]).copied()
    }

    /// Who dialed connection `id`.
    pub fn dialer(&self, id: ConnId) -> Option<usize> {
        self.conns.get(&id).map(|c| c.dialer)
    }

    /// The links currently up.
    pub fn links(&self) -> &BTreeSet<(usize, usize)> {
        &self.links
    }

    /// Delivers one message (or handshake, or close) picked at random, so
    /// everything is reordered.
    pub fn step(&mut self) -> bool {
        if self.queue.is_empty() {
            return false;
        }
        let i = self.rng.random_range(0..self.queue.len());
        match self.queue.swap_remove(i) {
            Transit::Message { from, to, conn, msg } => self.arrive(from, to, conn, msg),
            Transit::Handshake { conn, at } => self.handshake(conn, at),
            Transit::Closed { conn, at } => self.closed(conn, at),
        }
        true
    }

    fn arrive(&mut self, from: usize, to: usize, conn: ConnId, msg: Gossip) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        match c.ends[c.side(to)] {
            End::Up => self.deliver(from, to, msg),
            End::Handshaking => c.held.push((to, msg)),
            End::Closed => {}
        }
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Gossip) {
        self.bytes_received[to] += postcard::to_stdvec(&msg).map_or(0, |b| b.len() as u64);
        self.delivered += 1;
        let mut out = Outbox::default();
        // In the simulation every message is well formed; refusals are bugs.
        if let Err(e) = self.nodes[to].receive(self.names[from], msg, &mut out) {
            assert!(matches!(e, GossipError::NoRoute(_)), "node {to} refused a message: {e}");
        }
        self.nodes[to].flush(&mut out);
        self.enqueue(to, &mut out);
    }

    /// Node `at` finished its handshake of `conn`: it decides as the agent does.
    fn handshake(&mut self, conn: ConnId, at: usize) {
        let Some(c) = self.conns.get(&conn) else { return };
        // The other end closed it first: this handshake failed.
        if c.ends[c.side(at)] != End::Handshaking {
            return;
        }
        let other = c.other(at);
        let outbound = at == c.dialer;
        let (me, peer) = (self.names[at], self.names[other]);
        let existing = self.registered[at].get(&peer).map(|id| (*id, self.conns.get(id).is_some_and(|e| e.dialer == at)));
        let mut out = Outbox::default();
        match admit(me, peer, outbound, existing, self.registered[at].len(), usize::MAX) {
            Admission::Accept => {
                self.up(conn, at);
                self.nodes[at].connection_up(peer, Self::addr(other), outbound, &mut out);
            }
            Admission::KeepExisting(_) => {
                self.duplicates_closed += 1;
                self.shut(conn, at);
            }
            Admission::Replace { old } => {
                self.duplicates_closed += 1;
                self.shut(old, at);
                self.up(conn, at);
                self.nodes[at].resync(peer, &mut out);
            }
            refused @ (Admission::Myself | Admission::OverLimit) => panic!("no limit and no self-dials here: {refused:?}"),
        }
        self.nodes[at].flush(&mut out);
        self.enqueue(at, &mut out);
    }

    /// `at` registers `conn`; what waited for its handshake is on its way.
    fn up(&mut self, conn: ConnId, at: usize) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let side = c.side(at);
        c.ends[side] = End::Up;
        let other = c.other(at);
        let (held, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut c.held).into_iter().partition(|(to, _)| *to == at);
        c.held = rest;
        self.registered[at].insert(self.names[other], conn);
        self.relink(at, other);
        for (_, msg) in held {
            self.queue.push(Transit::Message { from: other, to: at, conn, msg });
        }
    }

    /// `at` closes its end of `conn`; the other end learns later.
    fn shut(&mut self, conn: ConnId, at: usize) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let side = c.side(at);
        c.ends[side] = End::Closed;
        c.held.retain(|(to, _)| *to != at);
        let (other, other_open) = (c.other(at), c.ends[1 - side] != End::Closed);
        if self.registered[at].get(&self.names[other]) == Some(&conn) {
            self.registered[at].remove(&self.names[other]);
            self.relink(at, other);
        }
        if other_open {
            self.queue.push(Transit::Closed { conn, at: other });
        }
    }

    /// The other end closed `conn`: if `at` was using it, the peer is gone
    /// (for now) as far as `at` knows.
    fn closed(&mut self, conn: ConnId, at: usize) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let side = c.side(at);
        let was = c.ends[side];
        c.ends[side] = End::Closed;
        c.held.retain(|(to, _)| *to != at);
        let other = c.other(at);
        if was == End::Up {
            self.closed_in_use += 1;
            let peer = self.names[other];
            self.registered[at].remove(&peer);
            self.relink(at, other);
            let mut out = Outbox::default();
            self.nodes[at].connection_down(peer);
            self.nodes[at].flush(&mut out);
            self.enqueue(at, &mut out);
        }
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
    /// Returns the first disagreement.
    pub fn check_converged(&mut self) -> Result<(), Divergence> {
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
                return Err(Divergence::Topology { peer: i, missing: missing.into_iter().copied().collect(), extra: extra.into_iter().copied().collect() });
            }
            let routes = self.nodes[i].routes().clone();
            for &j in &component {
                if j == i {
                    continue;
                }
                let hop = routes.unicast.get(&self.names[j]).ok_or(Divergence::NoRoute { peer: i, to: j })?;
                let h = self.index[hop];
                let via = &all[h];
                if dist.get(&h) != Some(&1) || via.get(&j).map(|d| d + 1) != dist.get(&j).copied() {
                    return Err(Divergence::NotShortest { peer: i, to: j, via: h });
                }
            }
            if routes.unicast.len() != component.len() - 1 {
                return Err(Divergence::RoutesOutside { peer: i });
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

    /// Both ends of many pairs dial each other at once, amid traffic and in
    /// random order. After the duplicate rule each pair keeps exactly one
    /// connection, the same at both ends (the one the smaller name dialed),
    /// and the mesh converges over those.
    #[test]
    fn both_ends_dialing_at_once_keep_one_connection_per_pair_and_converge() {
        for seed in [1, 2, 3, 4, 5] {
            let n = 40;
            let mut rng = StdRng::seed_from_u64(seed);
            let mut sim = Sim::new(n, seed);
            // A chain (one network), then random pairs.
            let mut pairs: BTreeSet<(usize, usize)> = (0..n - 1).map(|i| (i, i + 1)).collect();
            while pairs.len() < 150 {
                let (a, b) = (rng.random_range(0..n), rng.random_range(0..n));
                if a != b {
                    pairs.insert(key(a, b));
                }
            }
            let mut dials: Vec<(usize, usize)> = pairs.iter().flat_map(|&(a, b)| [(a, b), (b, a)]).collect();
            for i in (1..dials.len()).rev() {
                dials.swap(i, rng.random_range(0..=i));
            }
            for (a, b) in dials {
                sim.dial(a, b);
                let burst = rng.random_range(0..10);
                sim.run(burst);
            }
            settle(&mut sim);
            for &(a, b) in &pairs {
                let (at_a, at_b) = (sim.connection(a, b), sim.connection(b, a));
                assert!(at_a.is_some() && at_a == at_b, "seed {seed}: {a} and {b} use one connection: {at_a:?}, {at_b:?}");
                assert_eq!(sim.dialer(at_a.unwrap()), Some(a.min(b)), "seed {seed}: the smaller name's dial survives");
            }
            assert_eq!(sim.links(), &pairs, "seed {seed}: no other links");
            for i in 0..n {
                let degree = pairs.iter().filter(|(a, b)| *a == i || *b == i).count();
                assert_eq!(sim.registered[i].len(), degree, "seed {seed}: peer {i} has one connection per neighbour");
            }
            assert!(sim.duplicates_closed >= pairs.len() as u64, "seed {seed}: the rule decided every pair");
            sim.check_converged().unwrap_or_else(|e| panic!("seed {seed}: {e} ({} connections were closed under a peer using them)", sim.closed_in_use));
            // And gossip flows over the connections that survived.
            for i in 0..5 {
                sim.add_item(i * 7, i as u64);
            }
            settle(&mut sim);
            for s in &sim.sets {
                assert_eq!(s.items().len(), 5, "seed {seed}: the set reached every peer");
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

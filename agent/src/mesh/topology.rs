//! The topology: who is connected to whom, as a state-based CRDT.
//!
//! Each peer publishes one [`PeerEntry`]: its connections and data-plane address,
//! with a version only it increases. [`Topology::merge`] keeps, per peer, the
//! entry with the highest `(version, uid)` (ties broken by content, so merging is
//! a true join: commutative, associative, idempotent). Routes use only links both
//! ends list as established. Peers nobody reachable lists are pruned locally
//! ([`Topology::prune`]); a peer that comes back publishes a higher version.
//!
//! Owns the merge, reachability and route computations. Must not touch I/O or
//! know who is connected right now: that arrives as entries.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::peer::PeerName;

/// One connection as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnEntry {
    /// The other end's address as this peer reaches it (TCP).
    pub addr: SocketAddr,
    /// This peer dialed it.
    pub outbound: bool,
}

/// What a peer publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerEntry {
    pub name: PeerName,
    pub nickname: String,
    /// Random per process start: tells incarnations apart in status output.
    pub uid: u64,
    /// Increased by the owner on every change; never reused across restarts.
    pub version: u64,
    /// The underlay address other hosts encapsulate to.
    pub data_addr: Option<Ipv4Addr>,
    /// Established connections.
    pub connections: BTreeMap<PeerName, ConnEntry>,
    /// Its agent stopped on purpose and its data path keeps forwarding: peers
    /// keep its endpoints and routes (for a hold period) instead of dropping them.
    #[serde(default)]
    pub paused: bool,
}

impl PeerEntry {
    /// Whether `other` supersedes `self` (a total order over entries of one peer).
    fn superseded_by(&self, other: &PeerEntry) -> bool {
        (other.version, other.uid, other) > (self.version, self.uid, self)
    }
}

/// Every peer's latest entry, as far as this peer knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    peers: BTreeMap<PeerName, PeerEntry>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry of `name`, if known.
    pub fn get(&self, name: PeerName) -> Option<&PeerEntry> {
        self.peers.get(&name)
    }

    /// All entries.
    pub fn entries(&self) -> impl Iterator<Item = &PeerEntry> {
        self.peers.values()
    }

    /// Number of peers known.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True if no peer is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Merges one entry; returns true if it was new to us.
    pub fn merge_entry(&mut self, entry: &PeerEntry) -> bool {
        match self.peers.get(&entry.name) {
            Some(current) if !current.superseded_by(entry) => false,
            _ => {
                self.peers.insert(entry.name, entry.clone());
                true
            }
        }
    }

    /// Merges `other` in; returns the entries that were new to us (to pass on).
    pub fn merge(&mut self, other: &Topology) -> Vec<PeerEntry> {
        other.peers.values().filter(|e| self.merge_entry(e)).cloned().collect()
    }

    /// A topology made of `entries`.
    pub fn from_entries(entries: impl IntoIterator<Item = PeerEntry>) -> Self {
        let mut t = Topology::new();
        for e in entries {
            t.merge_entry(&e);
        }
        t
    }

    /// Whether `a` and `b` both list the other: only such links carry traffic.
    pub fn symmetric(&self, a: PeerName, b: PeerName) -> bool {
        let lists = |x: PeerName, y: PeerName| self.peers.get(&x).is_some_and(|e| e.connections.contains_key(&y));
        lists(a, b) && lists(b, a)
    }

    /// Neighbours of `p` over symmetric links, in name order (deterministic trees).
    pub fn neighbours(&self, p: PeerName) -> Vec<PeerName> {
        self.peers
            .get(&p)
            .map(|e| e.connections.keys().copied().filter(|q| self.symmetric(p, *q)).collect())
            .unwrap_or_default()
    }

    /// Every peer's neighbours over symmetric links, in name order.
    pub fn adjacency(&self) -> BTreeMap<PeerName, Vec<PeerName>> {
        self.peers.keys().map(|p| (*p, self.neighbours(*p))).collect()
    }

    /// Removes one peer (a paused peer whose hold expired); true if it was known.
    pub fn remove(&mut self, name: PeerName) -> bool {
        self.peers.remove(&name).is_some()
    }

    /// Peers reachable from `me` over symmetric links (including `me`).
    pub fn reachable(&self, me: PeerName) -> BTreeSet<PeerName> {
        bfs(&self.adjacency(), me).into_keys().collect()
    }

    /// Drops every peer `me` cannot reach, except paused ones (their data paths
    /// still forward); returns the names dropped.
    pub fn prune(&mut self, me: PeerName) -> Vec<PeerName> {
        let keep = self.reachable(me);
        let gone: Vec<PeerName> =
            self.peers.values().filter(|e| !keep.contains(&e.name) && !e.paused).map(|e| e.name).collect();
        for p in &gone {
            self.peers.remove(p);
        }
        gone
    }

    /// Routes from `me`'s point of view.
    pub fn routes(&self, me: PeerName) -> Routes {
        let adjacency = self.adjacency();
        let tree = bfs(&adjacency, me);
        let mut unicast = BTreeMap::new();
        for &dst in tree.keys() {
            if dst == me {
                continue;
            }
            // Walk up to the child of `me` on the path.
            let mut hop = dst;
            while let Some(&up) = tree.get(&hop)
                && up != me
            {
                hop = up;
            }
            unicast.insert(dst, hop);
        }
        Routes { me, unicast, adjacency, broadcast: BTreeMap::new() }
    }
}

/// Breadth-first tree from `root`: each reached peer's parent (root maps to itself).
fn bfs(adjacency: &BTreeMap<PeerName, Vec<PeerName>>, root: PeerName) -> BTreeMap<PeerName, PeerName> {
    let mut parent = BTreeMap::new();
    if !adjacency.contains_key(&root) {
        return parent;
    }
    parent.insert(root, root);
    let mut queue = VecDeque::from([root]);
    while let Some(p) = queue.pop_front() {
        for &q in adjacency.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if let std::collections::btree_map::Entry::Vacant(v) = parent.entry(q) {
                v.insert(p);
                queue.push_back(q);
            }
        }
    }
    parent
}

/// Where to send things from one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Routes {
    me: PeerName,
    /// Destination → the neighbour to hand it to (shortest path).
    pub unicast: BTreeMap<PeerName, PeerName>,
    #[serde(skip)]
    adjacency: BTreeMap<PeerName, Vec<PeerName>>,
    /// Broadcast origin → the neighbours to pass it on to (children in the
    /// origin's breadth-first tree, which every peer computes the same way);
    /// filled in per origin when first asked.
    #[serde(skip)]
    broadcast: BTreeMap<PeerName, Vec<PeerName>>,
}

impl Routes {
    /// Where a broadcast from `origin` goes next from here.
    pub fn broadcast(&mut self, origin: PeerName) -> &[PeerName] {
        let (me, adjacency) = (self.me, &self.adjacency);
        self.broadcast.entry(origin).or_insert_with(|| {
            bfs(adjacency, origin)
                .into_iter()
                .filter(|(child, parent)| *parent == me && *child != me)
                .map(|(child, _)| child)
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(i: u64) -> PeerName {
        PeerName::new(i + 1)
    }

    fn entry(i: u64, version: u64, conns: &[u64]) -> PeerEntry {
        PeerEntry {
            name: name(i),
            nickname: format!("p{i}"),
            uid: 7,
            version,
            data_addr: None,
            paused: false,
            connections: conns
                .iter()
                .map(|c| (name(*c), ConnEntry { addr: "127.0.0.1:6783".parse().unwrap(), outbound: i < *c }))
                .collect(),
        }
    }

    fn arb_entry() -> impl Strategy<Value = PeerEntry> {
        (0u64..5, 0u64..4, 0u64..3, proptest::collection::btree_set(0u64..5, 0..4), any::<bool>()).prop_map(
            |(i, version, uid, conns, paused)| {
                let mut e = entry(i, version, &conns.into_iter().collect::<Vec<_>>());
                e.uid = uid;
                e.paused = paused;
                e
            },
        )
    }

    fn arb_topology() -> impl Strategy<Value = Topology> {
        proptest::collection::vec(arb_entry(), 0..8).prop_map(Topology::from_entries)
    }

    fn merged(a: &Topology, b: &Topology) -> Topology {
        let mut t = a.clone();
        t.merge(b);
        t
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_topology(), b in arb_topology()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }

        #[test]
        fn merge_is_associative(a in arb_topology(), b in arb_topology(), c in arb_topology()) {
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        }

        #[test]
        fn merge_is_idempotent(a in arb_topology(), b in arb_topology()) {
            let ab = merged(&a, &b);
            prop_assert_eq!(merged(&ab, &b), ab.clone());
            prop_assert_eq!(merged(&a, &a), a);
        }

        #[test]
        fn merge_reports_exactly_what_changed(a in arb_topology(), b in arb_topology()) {
            let mut t = a.clone();
            let new = t.merge(&b);
            for e in &new {
                prop_assert_eq!(t.get(e.name), Some(e));
                prop_assert!(a.get(e.name) != Some(e));
            }
            for e in a.entries() {
                if !new.iter().any(|n| n.name == e.name) {
                    prop_assert_eq!(t.get(e.name), Some(e));
                }
            }
        }
    }

    #[test]
    fn routes_use_only_symmetric_links() {
        // 0-1, 1-2 symmetric; 2 claims 3 but 3 does not claim 2.
        let t = Topology::from_entries([
            entry(0, 1, &[1]),
            entry(1, 1, &[0, 2]),
            entry(2, 1, &[1, 3]),
            entry(3, 1, &[]),
        ]);
        let r = t.routes(name(0));
        assert_eq!(r.unicast.get(&name(1)), Some(&name(1)));
        assert_eq!(r.unicast.get(&name(2)), Some(&name(1)), "2 is reached through 1");
        assert_eq!(r.unicast.get(&name(3)), None, "a one-sided link is not a link");
        let mut r = r;
        assert_eq!(r.broadcast(name(0)), &[name(1)]);
        assert_eq!(t.routes(name(1)).broadcast(name(0)), &[name(2)], "1 passes 0's broadcasts to 2");
        let mut t = t;
        assert_eq!(t.prune(name(0)), vec![name(3)]);
        // A paused peer stays while unreachable, until removed.
        let mut paused = entry(4, 1, &[]);
        paused.paused = true;
        t.merge_entry(&paused);
        assert!(t.prune(name(0)).is_empty());
        assert!(t.get(name(4)).is_some());
        assert!(t.remove(name(4)));
    }
}

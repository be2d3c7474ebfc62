//! The sans-IO core of the mesh: one peer's view and its reactions.
//!
//! A [`Node`] is driven by events (a connection came up or went down, a message
//! arrived, time passed) and answers with messages to send to neighbours
//! ([`Outbox`]). It does no I/O, so the same code runs in the agent (behind TCP
//! connections) and in the in-memory simulation of hundreds of peers.
//!
//! Gossip: a change is flooded to neighbours, and each peer passes on only what
//! was new to it. Every tick, a few random neighbours get an anti-entropy round:
//! topology version digests (answered with what the other side lacks) and each
//! channel's full state. Unicast messages follow shortest paths; broadcasts follow
//! the origin's breadth-first tree.
//!
//! Owns this peer's entry, the topology, the channels and what gossip means.
//! Must not touch sockets, clocks or which connections to keep: the actor
//! tells it when a connection is up or down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use super::peer::PeerName;
use super::topology::{ConnEntry, PeerEntry, Routes, Topology};

/// How many random neighbours get an anti-entropy round per tick.
pub const ANTI_ENTROPY_FANOUT: usize = 3;

/// A message between neighbours (the payload of a data frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gossip {
    /// Topology entries (answering a `Want` or a `Digest`).
    Topology(Vec<PeerEntry>),
    /// "I have these `(peer, version, uid)`": the receiver asks (`Want`) for the
    /// ones newer than its own. Changes spread this way, so each peer downloads
    /// a changed entry once, however many neighbours announce it.
    Have(Vec<(PeerName, u64, u64)>),
    /// "Send me these peers' entries."
    Want(Vec<PeerName>),
    /// Anti-entropy: the sender's `(peer, version, uid)`s. The receiver sends back
    /// the entries the sender lacks and, if `reply` and the sender has newer
    /// ones, its own digest (with `reply` false) to get them.
    Digest { versions: Vec<(PeerName, u64, u64)>, reply: bool },
    /// A channel's update (a delta or its full state), flooded.
    Channel { channel: String, payload: Vec<u8> },
    /// A message for one peer, passed along the shortest path.
    Unicast { channel: String, src: PeerName, dst: PeerName, payload: Vec<u8> },
    /// A message from `src` for every peer, passed along `src`'s broadcast tree.
    Broadcast { channel: String, src: PeerName, payload: Vec<u8> },
}

/// Why a gossip payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("channel {channel}: cannot decode the update: {detail}")]
    Decode { channel: String, detail: String },
    #[error("channel {channel}: {detail}")]
    Rejected { channel: String, detail: String },
    #[error("unknown gossip channel {0:?}")]
    UnknownChannel(String),
    #[error("no route to peer {0}")]
    NoRoute(PeerName),
}

/// The state a subsystem shares over the mesh (`ipam`, `dns`, `endpoints`).
/// Calls come from the mesh's task and must not block: merge and return.
pub trait Gossiper: Send + Sync + 'static {
    /// The complete state (anti-entropy, new neighbours).
    fn full_state(&self) -> Vec<u8>;
    /// Merges an update from neighbour `from`; returns what was new to this peer
    /// (to pass on), or `None`.
    fn on_gossip(&self, from: PeerName, update: &[u8]) -> Result<Option<Vec<u8>>, GossipError>;
    /// A message addressed to this peer.
    fn on_unicast(&self, _src: PeerName, _msg: &[u8]) -> Result<(), GossipError> {
        Ok(())
    }
    /// A broadcast from `src`.
    fn on_broadcast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        self.on_gossip(src, msg).map(|_| ())
    }
    /// Peers that left the topology (their state can go).
    fn on_peers_gone(&self, _peers: &[PeerName]) {}
}

/// Messages to send, by neighbour.
#[derive(Debug, Default)]
pub struct Outbox {
    pub messages: Vec<(PeerName, Gossip)>,
}

impl Outbox {
    fn send(&mut self, to: PeerName, msg: Gossip) {
        self.messages.push((to, msg));
    }

    /// Takes the messages out.
    pub fn drain(&mut self) -> Vec<(PeerName, Gossip)> {
        std::mem::take(&mut self.messages)
    }
}

/// One peer's view of the mesh.
pub struct Node {
    own: PeerEntry,
    topology: Topology,
    channels: BTreeMap<String, Arc<dyn Gossiper>>,
    routes: Option<Routes>,
    /// The topology changed since the last prune.
    unpruned: bool,
    /// Topology entries to announce to each neighbour at the next
    /// [`Node::flush`]: changes that come in bursts cost one message.
    pending: BTreeMap<PeerName, BTreeSet<PeerName>>,
}

impl Node {
    /// A node named `me`; `version` is the first version its entry gets (use a
    /// value above any earlier incarnation's, e.g. the clock in microseconds).
    pub fn new(me: PeerName, nickname: String, uid: u64, version: u64, data_addr: Option<Ipv4Addr>) -> Self {
        let own = PeerEntry { name: me, nickname, uid, version, data_addr, connections: BTreeMap::new(), paused: false };
        let mut topology = Topology::new();
        topology.merge_entry(&own);
        Node { own, topology, channels: BTreeMap::new(), routes: None, unpruned: false, pending: BTreeMap::new() }
    }

    /// This peer's name.
    pub fn me(&self) -> PeerName {
        self.own.name
    }

    /// This peer's entry.
    pub fn own(&self) -> &PeerEntry {
        &self.own
    }

    /// Registers a channel.
    pub fn add_channel(&mut self, name: &str, gossiper: Arc<dyn Gossiper>) {
        self.channels.insert(name.to_string(), gossiper);
    }

    /// The topology as known here.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The neighbours (established connections).
    pub fn neighbours(&self) -> Vec<PeerName> {
        self.own.connections.keys().copied().collect()
    }

    /// Routes from here (computed when first needed after a change).
    pub fn routes(&mut self) -> &mut Routes {
        let me = self.me();
        self.routes.get_or_insert_with(|| self.topology.routes(me))
    }

    fn changed(&mut self) {
        self.routes = None;
        self.unpruned = true;
    }

    /// Whether the topology changed since the last [`Node::prune`] (the agent
    /// prunes soon after changes; the simulation at ticks).
    pub fn needs_prune(&self) -> bool {
        self.unpruned
    }

    fn publish_own(&mut self) {
        self.own.version += 1;
        self.topology.merge_entry(&self.own);
        self.changed();
        let me = self.me();
        for n in self.neighbours() {
            self.pending.entry(n).or_default().insert(me);
        }
    }

    /// Announces the changed entries to each neighbour (latest versions).
    pub fn flush(&mut self, out: &mut Outbox) {
        for (n, names) in std::mem::take(&mut self.pending) {
            if !self.own.connections.contains_key(&n) {
                continue;
            }
            let have: Vec<(PeerName, u64, u64)> =
                names.iter().filter_map(|p| self.topology.get(*p)).map(|e| (e.name, e.version, e.uid)).collect();
            if !have.is_empty() {
                out.send(n, Gossip::Have(have));
            }
        }
    }

    /// Whether entries are waiting for [`Node::flush`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A connection to `peer` is established (both sides authenticated).
    pub fn connection_up(&mut self, peer: PeerName, addr: SocketAddr, outbound: bool, out: &mut Outbox) {
        self.own.connections.insert(peer, ConnEntry { addr, outbound });
        self.publish_own();
        self.resync(peer, out);
    }

    /// Sends `peer` everything we know (topology, then every channel's full
    /// state): for a new neighbour, and when the connection to one was swapped
    /// for another, since what went over the dropped one may be lost.
    pub fn resync(&mut self, peer: PeerName, out: &mut Outbox) {
        let all: BTreeSet<PeerName> = self.topology.entries().map(|e| e.name).collect();
        self.pending.entry(peer).or_default().extend(all);
        for (name, ch) in &self.channels {
            out.send(peer, Gossip::Channel { channel: name.clone(), payload: ch.full_state() });
        }
    }

    /// The connection to `peer` is gone.
    pub fn connection_down(&mut self, peer: PeerName) {
        self.pending.remove(&peer);
        if self.own.connections.remove(&peer).is_some() {
            self.publish_own();
            self.prune();
        }
    }

    /// Updates this peer's data-plane address.
    pub fn set_data_addr(&mut self, addr: Option<Ipv4Addr>) {
        if self.own.data_addr != addr {
            self.own.data_addr = addr;
            self.publish_own();
        }
    }

    /// Announces that this peer's agent is stopping on purpose while its data
    /// path keeps forwarding (see [`PeerEntry::paused`]). The entry is pushed
    /// whole: a stopping peer cannot wait for neighbours to ask for it.
    pub fn pause(&mut self, out: &mut Outbox) {
        self.own.paused = true;
        self.publish_own();
        self.pending.clear();
        for n in self.neighbours() {
            out.send(n, Gossip::Topology(vec![self.own.clone()]));
        }
    }

    /// Peers that are paused and unreachable: held, not dropped.
    pub fn held(&self) -> Vec<PeerName> {
        let reachable = self.topology.reachable(self.me());
        self.topology.entries().filter(|e| e.paused && !reachable.contains(&e.name)).map(|e| e.name).collect()
    }

    /// Drops a held peer for good (its hold expired) and tells the channels.
    pub fn forget_peer(&mut self, name: PeerName) {
        if name != self.me() && self.topology.remove(name) {
            self.changed();
            for ch in self.channels.values() {
                ch.on_peers_gone(&[name]);
            }
        }
    }

    /// Drops peers no longer reachable and tells the channels; returns them.
    pub fn prune(&mut self) -> Vec<PeerName> {
        let gone = self.topology.prune(self.me());
        self.unpruned = false;
        if !gone.is_empty() {
            self.routes = None;
            for ch in self.channels.values() {
                ch.on_peers_gone(&gone);
            }
        }
        gone
    }

    /// Handles a message from neighbour `from`.
    pub fn receive(&mut self, from: PeerName, msg: Gossip, out: &mut Outbox) -> Result<(), GossipError> {
        match msg {
            Gossip::Topology(entries) => {
                let mut new = Vec::new();
                for e in entries {
                    // Our own entry is ours alone: a stale copy of it is ignored.
                    if e.name == self.me() {
                        continue;
                    }
                    if self.topology.merge_entry(&e) {
                        new.push(e);
                    }
                }
                if !new.is_empty() {
                    self.changed();
                    for n in self.neighbours() {
                        if n != from {
                            self.pending.entry(n).or_default().extend(new.iter().map(|e| e.name));
                        }
                    }
                }
                Ok(())
            }
            Gossip::Have(versions) => {
                let want: Vec<PeerName> = versions
                    .into_iter()
                    .filter(|(p, v, u)| {
                        *p != self.me() && self.topology.get(*p).is_none_or(|e| (e.version, e.uid) < (*v, *u))
                    })
                    .map(|(p, _, _)| p)
                    .collect();
                if !want.is_empty() {
                    out.send(from, Gossip::Want(want));
                }
                Ok(())
            }
            Gossip::Want(names) => {
                let entries: Vec<PeerEntry> = names.iter().filter_map(|p| self.topology.get(*p)).cloned().collect();
                if !entries.is_empty() {
                    out.send(from, Gossip::Topology(entries));
                }
                Ok(())
            }
            Gossip::Digest { versions, reply } => {
                let theirs: BTreeMap<PeerName, (u64, u64)> =
                    versions.into_iter().map(|(p, v, u)| (p, (v, u))).collect();
                let missing: Vec<PeerEntry> = self
                    .topology
                    .entries()
                    .filter(|e| theirs.get(&e.name).is_none_or(|(v, u)| (*v, *u) < (e.version, e.uid)))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    out.send(from, Gossip::Topology(missing));
                }
                let they_have_newer = theirs.iter().any(|(p, (v, u))| {
                    self.topology.get(*p).is_none_or(|e| (e.version, e.uid) < (*v, *u))
                });
                if reply && they_have_newer {
                    out.send(from, Gossip::Digest { versions: self.digest(), reply: false });
                }
                Ok(())
            }
            Gossip::Channel { channel, payload } => {
                let ch = self.channel(&channel)?;
                if let Some(delta) = ch.on_gossip(from, &payload)? {
                    for n in self.neighbours() {
                        if n != from {
                            out.send(n, Gossip::Channel { channel: channel.clone(), payload: delta.clone() });
                        }
                    }
                }
                Ok(())
            }
            Gossip::Unicast { channel, src, dst, payload } => {
                if dst == self.me() {
                    return self.channel(&channel)?.on_unicast(src, &payload);
                }
                let hop = self.routes().unicast.get(&dst).copied().ok_or(GossipError::NoRoute(dst))?;
                out.send(hop, Gossip::Unicast { channel, src, dst, payload });
                Ok(())
            }
            Gossip::Broadcast { channel, src, payload } => {
                let children = self.routes().broadcast(src).to_vec();
                for c in children {
                    if c != from {
                        out.send(c, Gossip::Broadcast { channel: channel.clone(), src, payload: payload.clone() });
                    }
                }
                self.channel(&channel)?.on_broadcast(src, &payload)
            }
        }
    }

    fn channel(&self, name: &str) -> Result<Arc<dyn Gossiper>, GossipError> {
        self.channels.get(name).cloned().ok_or_else(|| GossipError::UnknownChannel(name.to_string()))
    }

    fn digest(&self) -> Vec<(PeerName, u64, u64)> {
        self.topology.entries().map(|e| (e.name, e.version, e.uid)).collect()
    }

    /// Periodic work: prune, then an anti-entropy round with a few random neighbours.
    pub fn tick<R: rand::Rng + ?Sized>(&mut self, rng: &mut R, out: &mut Outbox) {
        self.prune();
        let neighbours = self.neighbours();
        let chosen: Vec<PeerName> = neighbours.sample(rng, ANTI_ENTROPY_FANOUT).copied().collect();
        for n in chosen {
            out.send(n, Gossip::Digest { versions: self.digest(), reply: true });
            for (name, ch) in &self.channels {
                out.send(n, Gossip::Channel { channel: name.clone(), payload: ch.full_state() });
            }
        }
    }

    /// A local change of a channel's state: flood `delta` to the neighbours.
    pub fn gossip(&mut self, channel: &str, delta: Vec<u8>, out: &mut Outbox) {
        for n in self.neighbours() {
            out.send(n, Gossip::Channel { channel: channel.to_string(), payload: delta.clone() });
        }
    }

    /// Sends `payload` to peer `dst` on `channel`.
    pub fn unicast(&mut self, channel: &str, dst: PeerName, payload: Vec<u8>, out: &mut Outbox) -> Result<(), GossipError> {
        let src = self.me();
        if dst == src {
            return self.channel(channel)?.on_unicast(src, &payload);
        }
        let hop = self.routes().unicast.get(&dst).copied().ok_or(GossipError::NoRoute(dst))?;
        out.send(hop, Gossip::Unicast { channel: channel.to_string(), src, dst, payload });
        Ok(())
    }

    /// Sends `payload` to every peer along this peer's broadcast tree.
    pub fn broadcast(&mut self, channel: &str, payload: Vec<u8>, out: &mut Outbox) {
        let src = self.me();
        let children = self.routes().broadcast(src).to_vec();
        for c in children {
            out.send(c, Gossip::Broadcast { channel: channel.to_string(), src, payload: payload.clone() });
        }
    }
}

//! What `weft status` shows of the mesh: [`MeshStatus`] and its parts, and
//! [`build`], the pure function that makes one from the actor's state.
//!
//! Owns the status types (their JSON is the API's) and how they are derived.
//! Must not touch sockets or the actor: it reads the node, the target table and
//! the connections it is given, and the time it is told.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use serde::Serialize;

use super::node::Node;
use super::peer::PeerName;
use super::targets::{TargetState, Targets};
use super::topology::PeerEntry;

/// One peer as shown by `weft status peers`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: PeerName,
    pub nickname: String,
    pub uid: u64,
    pub version: u64,
    pub data_addr: Option<Ipv4Addr>,
    /// Its agent stopped on purpose; its data path keeps forwarding.
    pub paused: bool,
    /// Its connections: (peer, nickname if known, address, outbound, established both ways).
    pub connections: Vec<PeerConnStatus>,
}

/// A connection as listed by a peer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerConnStatus {
    pub name: PeerName,
    pub nickname: Option<String>,
    pub addr: SocketAddr,
    pub outbound: bool,
    pub established: bool,
}

/// State of one of our connections or connection attempts.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    Established,
    Connecting,
    Failed,
}

/// One of our connections (or a target we are trying), for `weft status connections`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnStatus {
    pub addr: String,
    pub state: ConnState,
    pub outbound: bool,
    pub peer: Option<PeerName>,
    pub nickname: Option<String>,
    pub encrypted: bool,
    /// Why it failed, or when it will be retried.
    pub info: String,
}

/// What the mesh looks like from here.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MeshStatus {
    pub name: Option<PeerName>,
    pub nickname: String,
    pub encrypted: bool,
    pub peers: Vec<PeerStatus>,
    pub connections: Vec<ConnStatus>,
    pub targets: Vec<String>,
    /// Destination peer → next hop peer.
    pub routes: BTreeMap<PeerName, PeerName>,
    /// Paused peers we cannot reach: their routes and endpoints are kept.
    pub held: Vec<PeerName>,
    /// Per broadcast origin, the neighbours this peer passes its broadcasts to.
    pub broadcast: BTreeMap<PeerName, Vec<PeerName>>,
    /// How often connections ended, by reason label (see
    /// [`super::CloseReason::label`]; for metrics).
    pub terminations: BTreeMap<String, u64>,
    /// Increases whenever the topology or routes change.
    pub generation: u64,
}

impl MeshStatus {
    /// The topology entry of `name` as a status line.
    pub fn peer(&self, name: PeerName) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }
}

/// One established connection, as status shows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Link<'a> {
    pub peer: PeerName,
    pub nickname: &'a str,
    pub addr: SocketAddr,
    pub outbound: bool,
    pub encrypted: bool,
}

/// The actor's state that status shows, besides the node.
#[derive(Debug)]
pub(super) struct Snapshot<'a> {
    pub nickname: &'a str,
    pub encrypted: bool,
    pub links: Vec<Link<'a>>,
    pub targets: &'a Targets,
    pub terminations: &'a BTreeMap<&'static str, u64>,
    pub now: Instant,
}

/// The status now, given the one published before (`prev`): the generation
/// moves on, and the broadcast trees are recomputed, only when the peers or
/// routes changed.
pub(super) fn build(prev: &MeshStatus, node: &mut Node, snap: Snapshot<'_>) -> MeshStatus {
    let topology = node.topology();
    let nick = |p: PeerName| topology.get(p).map(|e| e.nickname.clone());
    let peers: Vec<PeerStatus> = topology
        .entries()
        .map(|e: &PeerEntry| PeerStatus {
            name: e.name,
            nickname: e.nickname.clone(),
            uid: e.uid,
            version: e.version,
            data_addr: e.data_addr,
            paused: e.paused,
            connections: e
                .connections
                .iter()
                .map(|(p, c)| PeerConnStatus {
                    name: *p,
                    nickname: nick(*p),
                    addr: c.addr,
                    outbound: c.outbound,
                    established: topology.symmetric(e.name, *p),
                })
                .collect(),
        })
        .collect();
    let mut connections: Vec<ConnStatus> = snap
        .links
        .iter()
        .map(|c| ConnStatus {
            addr: c.addr.to_string(),
            state: ConnState::Established,
            outbound: c.outbound,
            peer: Some(c.peer),
            nickname: Some(c.nickname.to_string()),
            encrypted: c.encrypted,
            info: if c.encrypted { "encrypted".into() } else { "unencrypted".into() },
        })
        .collect();
    for (addr, t) in snap.targets.iter() {
        let (state, info) = match (t.state, &t.last_error) {
            (TargetState::Connected(_) | TargetState::Myself, _) => continue,
            (TargetState::Dialing(_), _) => (ConnState::Connecting, "connecting".to_string()),
            (TargetState::Idle, Some(e)) => {
                let wait = t.next_try.saturating_duration_since(snap.now);
                (ConnState::Failed, format!("{e}, retry in {wait:.0?}"))
            }
            (TargetState::Idle, None) => (ConnState::Connecting, "pending".into()),
        };
        connections.push(ConnStatus {
            addr: addr.to_string(),
            state,
            outbound: true,
            peer: None,
            nickname: None,
            encrypted: false,
            info,
        });
    }
    connections.sort_by(|a, b| (a.state, &a.addr).cmp(&(b.state, &b.addr)));
    let me = node.me();
    let routes = node.routes().unicast.clone();
    let changed = prev.peers != peers || prev.routes != routes;
    let (generation, broadcast) = if changed {
        // Every peer's tree from here: one walk per origin, so only on change.
        let r = node.routes();
        let broadcast = routes.keys().copied().chain([me]).map(|o| (o, r.broadcast(o).to_vec())).collect();
        (prev.generation + 1, broadcast)
    } else {
        (prev.generation, prev.broadcast.clone())
    };
    MeshStatus {
        name: Some(me),
        nickname: snap.nickname.to_string(),
        encrypted: snap.encrypted,
        peers,
        connections,
        targets: snap.targets.iter().filter(|(_, t)| t.state != TargetState::Myself).map(|(a, _)| a.to_string()).collect(),
        routes,
        held: node.held(),
        broadcast,
        terminations: snap.terminations.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::node::Outbox;
    use crate::mesh::targets::{Backoff, TargetSource};
    use rand::SeedableRng;
    use std::collections::BTreeSet;

    #[test]
    fn status_shows_connections_and_targets_and_counts_generations_on_change() {
        let (a, b) = (PeerName::new(0x0200_0000_0001), PeerName::new(0x0200_0000_0002));
        let mut node = Node::new(a, "a".into(), 1, 1, None);
        let now = Instant::now();
        let mut targets = Targets::new(Backoff::DEFAULT, 6783);
        for t in ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"] {
            targets.add(t, TargetSource::Given, now);
        }
        let dials = targets.due(now, 0, 10, &BTreeSet::new(), {
            let mut n = 0;
            move || {
                n += 1;
                n
            }
        });
        // .2 connected, .3 failed, .4 still dialing, .5 is ourselves.
        targets.dial_connected(&dials[0].target, dials[0].id, dials[0].id);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        targets.dial_failed(&dials[1].target, dials[1].id, "refused".into(), now, &mut rng);
        targets.dial_reached_myself(&dials[3].target, dials[3].id);
        let terminations = BTreeMap::from([("closed", 2)]);
        let links = vec![Link { peer: b, nickname: "b", addr: "10.0.0.2:6783".parse().unwrap(), outbound: true, encrypted: false }];
        let snap = |links: Vec<Link<'static>>, targets| Snapshot {
            nickname: "a",
            encrypted: false,
            links,
            targets,
            terminations: &terminations,
            now,
        };

        let first = build(&MeshStatus::default(), &mut node, snap(Vec::new(), &targets));
        assert_eq!(first.generation, 1, "the first status is a change");
        let same = build(&first, &mut node, snap(Vec::new(), &targets));
        assert_eq!(same.generation, 1, "nothing changed");

        node.connection_up(b, "10.0.0.2:6783".parse().unwrap(), true, &mut Outbox::default());
        let s = build(&same, &mut node, snap(links, &targets));
        assert_eq!(s.generation, 2);
        assert_eq!(s.targets, ["10.0.0.2:6783", "10.0.0.3:6783", "10.0.0.4:6783"], "not ourselves");
        let rows: Vec<(&str, ConnState, &str)> = s.connections.iter().map(|c| (c.addr.as_str(), c.state, c.info.as_str())).collect();
        assert_eq!(rows[0], ("10.0.0.2:6783", ConnState::Established, "unencrypted"));
        assert_eq!(rows[1], ("10.0.0.4:6783", ConnState::Connecting, "connecting"));
        assert_eq!((rows[2].0, rows[2].1), ("10.0.0.3:6783", ConnState::Failed));
        assert!(rows[2].2.starts_with("refused, retry in "), "{}", rows[2].2);
        assert_eq!(rows.len(), 3);
        assert_eq!(s.terminations, BTreeMap::from([("closed".to_string(), 2)]));
        assert_eq!(s.broadcast.get(&a), Some(&Vec::new()), "b lists no link back yet: no route, no tree");
    }
}

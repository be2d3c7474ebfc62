//! The endpoint table: per peer, one versioned list of its endpoints.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::mesh::{GossipError, Gossiper, PeerName};

/// Most endpoints one peer may announce (more is refused as bogus).
pub const MAX_ENDPOINTS_PER_PEER: usize = 65_536;

/// One endpoint as gossiped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
}

/// One peer's endpoints at a version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerEndpoints {
    pub peer: PeerName,
    pub version: u64,
    pub endpoints: Vec<EndpointRecord>,
}

/// The table, shared by the mesh (as a [`Gossiper`]) and the programmer.
pub struct EndpointTable {
    me: PeerName,
    state: Mutex<BTreeMap<PeerName, PeerEndpoints>>,
    changed: watch::Sender<u64>,
}

impl EndpointTable {
    /// An empty table for peer `me`; our own entry starts at `version`.
    pub fn new(me: PeerName, version: u64) -> Self {
        let own = PeerEndpoints { peer: me, version, endpoints: Vec::new() };
        EndpointTable { me, state: Mutex::new(BTreeMap::from([(me, own)])), changed: watch::channel(0).0 }
    }

    /// A receiver that changes whenever the table does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The table's lock. A poisoned one means code holding it panicked — a bug
    /// (the panic is in the log); the map itself is never left half-changed, so
    /// it is used as it is.
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PeerName, PeerEndpoints>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Sets our own endpoints; returns the delta to gossip if they changed.
    pub fn set_local(&self, mut endpoints: Vec<EndpointRecord>) -> Option<Vec<u8>> {
        endpoints.sort();
        endpoints.dedup();
        let mut state = self.lock();
        let me = self.me;
        let own = state.entry(me).or_insert_with(|| PeerEndpoints { peer: me, version: 0, endpoints: Vec::new() });
        if own.endpoints == endpoints {
            return None;
        }
        own.version += 1;
        own.endpoints = endpoints;
        let delta = encode(std::slice::from_ref(own));
        drop(state);
        self.bump();
        Some(delta)
    }

    /// Every other peer's endpoints.
    pub fn remote_entries(&self, me: PeerName) -> BTreeMap<PeerName, Vec<EndpointRecord>> {
        let state = self.lock();
        state.iter().filter(|(p, _)| **p != me).map(|(p, e)| (*p, e.endpoints.clone())).collect()
    }

    /// Every peer's endpoints (for `weft report`).
    pub fn all(&self) -> Vec<PeerEndpoints> {
        self.lock().values().cloned().collect()
    }
}

fn encode(entries: &[PeerEndpoints]) -> Vec<u8> {
    postcard::to_stdvec(entries).expect("postcard encodes these plain derived types into a Vec (a bug otherwise)")
}

impl Gossiper for EndpointTable {
    fn full_state(&self) -> Vec<u8> {
        let state = self.lock();
        encode(&state.values().cloned().collect::<Vec<_>>())
    }

    fn on_gossip(&self, _from: PeerName, update: &[u8]) -> Result<Option<Vec<u8>>, GossipError> {
        let entries: Vec<PeerEndpoints> = postcard::from_bytes(update)
            .map_err(|e| GossipError::Decode { channel: super::CHANNEL.into(), detail: e.to_string() })?;
        if entries.iter().any(|e| e.endpoints.len() > MAX_ENDPOINTS_PER_PEER) {
            return Err(GossipError::Rejected {
                channel: super::CHANNEL.into(),
                detail: "a peer announced more endpoints than a host can have".into(),
            });
        }
        let mut state = self.lock();
        let mut new = Vec::new();
        for e in entries {
            // Our own entry is ours alone.
            if e.peer == self.me {
                continue;
            }
            let newer = state.get(&e.peer).is_none_or(|cur| (cur.version, &cur.endpoints) < (e.version, &e.endpoints));
            if newer {
                state.insert(e.peer, e.clone());
                new.push(e);
            }
        }
        drop(state);
        if new.is_empty() {
            return Ok(None);
        }
        self.bump();
        Ok(Some(encode(&new)))
    }

    fn on_peers_gone(&self, peers: &[PeerName]) {
        let mut state = self.lock();
        let before = state.len();
        for p in peers {
            if *p != self.me {
                state.remove(p);
            }
        }
        let changed = state.len() != before;
        drop(state);
        if changed {
            self.bump();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_entries_win_and_gone_peers_leave() {
        let (a, b) = (PeerName::new(1), PeerName::new(2));
        let ta = EndpointTable::new(a, 10);
        let tb = EndpointTable::new(b, 10);
        let rec = EndpointRecord { addr: Ipv4Addr::new(10, 32, 0, 1), mac: [1; 6] };
        let delta = tb.set_local(vec![rec]).expect("changed");
        assert!(tb.set_local(vec![rec]).is_none(), "no change, no gossip");
        let passed_on = ta.on_gossip(b, &delta).unwrap();
        assert!(passed_on.is_some());
        assert!(ta.on_gossip(b, &delta).unwrap().is_none(), "old news is not passed on");
        assert_eq!(ta.remote_entries(a)[&b], vec![rec]);
        // An older full state does not undo it.
        let stale = encode(&[PeerEndpoints { peer: b, version: 3, endpoints: vec![] }]);
        assert!(ta.on_gossip(b, &stale).unwrap().is_none());
        ta.on_peers_gone(&[b]);
        assert!(ta.remote_entries(a).is_empty());
        assert!(ta.on_gossip(b, b"\xff\xff\xff garbage").is_err());
    }
}

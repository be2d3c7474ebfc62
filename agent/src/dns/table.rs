//! The name table: every container name in the network, replicated by gossip.
//!
//! An entry is `(origin peer, container, address, name)` with a version and,
//! once removed, a tombstone (the origin's clock, seconds). Only the origin
//! changes its entries; merges keep the highest version. The origin is also the
//! authority on its own entries: one it does not recognise (a stale copy kept by
//! another peer while it restarted, say) it tombstones with a higher version, so
//! a removed name cannot come back. Tombstones are dropped after a retention
//! period plus a tolerance for clock skew; a peer that leaves takes its entries
//! with it. Lookups read an index swapped in atomically on every change.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use arc_swap::ArcSwap;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{LowerName, Name, RData, Record};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::mesh::{GossipError, Gossiper, PeerName};

/// How long a tombstone is kept, and how far clocks may disagree.
pub const TOMBSTONE_RETENTION_S: u64 = 10 * 60;
pub const CLOCK_SKEW_S: u64 = 5 * 60;
/// Most names one peer may announce (more is refused as bogus).
pub const MAX_ENTRIES: usize = 1 << 20;

/// The identity of an entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub origin: PeerName,
    pub container: String,
    pub addr: Ipv4Addr,
    /// Fully qualified, lowercase, with the trailing dot: `dataproducer.weave.local.`
    pub name: String,
}

/// Its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entry {
    pub version: u64,
    /// When it was removed (origin's clock), if it was.
    pub tombstone: Option<u64>,
}

/// A lookup index of the live entries.
#[derive(Debug, Default)]
pub struct Index {
    pub by_name: HashMap<String, Vec<Ipv4Addr>>,
    pub by_addr: HashMap<Ipv4Addr, Vec<String>>,
    /// The A records of each name, built once per change so a query clones
    /// nothing (the server shuffles references to them).
    pub records: HashMap<LowerName, Vec<Record>>,
}

/// The table, shared by the mesh (as a [`Gossiper`]) and the DNS server.
pub struct NameTable {
    me: PeerName,
    /// TTL of the records in the index.
    ttl: AtomicU32,
    entries: Mutex<BTreeMap<Key, Entry>>,
    index: ArcSwap<Index>,
    changed: watch::Sender<u64>,
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `name` as a table name: lowercase, fully qualified (`domain` appended to a
/// name without dots), with the trailing dot.
pub fn normalize(name: &str, domain: &str) -> String {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if name.contains('.') { format!("{name}.") } else { format!("{name}.{domain}.") }
}

impl NameTable {
    /// An empty table for peer `me`.
    pub fn new(me: PeerName) -> Self {
        NameTable {
            me,
            ttl: AtomicU32::new(super::DEFAULT_TTL),
            entries: Mutex::new(BTreeMap::new()),
            index: ArcSwap::from_pointee(Index::default()),
            changed: watch::channel(0).0,
        }
    }

    /// The current lookup index.
    pub fn index(&self) -> Arc<Index> {
        self.index.load_full()
    }

    /// The current lookup index, without touching its reference count (for the
    /// query path; do not hold it long).
    pub fn index_guard(&self) -> arc_swap::Guard<Arc<Index>> {
        self.index.load()
    }

    /// Sets the TTL of answers (rebuilds the index).
    pub fn set_ttl(&self, ttl: u32) {
        self.ttl.store(ttl, Ordering::Relaxed);
        let entries = self.entries.lock().expect("table lock");
        self.reindex(&entries);
    }

    /// A receiver that changes whenever the table does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn reindex(&self, entries: &BTreeMap<Key, Entry>) {
        let mut index = Index::default();
        for (k, e) in entries {
            if e.tombstone.is_none() {
                index.by_name.entry(k.name.clone()).or_default().push(k.addr);
                index.by_addr.entry(k.addr).or_default().push(k.name.clone());
            }
        }
        for v in index.by_name.values_mut() {
            v.sort();
            v.dedup();
        }
        let ttl = self.ttl.load(Ordering::Relaxed);
        for (name, addrs) in &index.by_name {
            if let Ok(n) = Name::from_str(name) {
                let records = addrs.iter().map(|a| Record::from_rdata(n.clone(), ttl, RData::A(A(*a)))).collect();
                index.records.insert(LowerName::from(&n), records);
            }
        }
        for v in index.by_addr.values_mut() {
            v.sort();
            v.dedup();
        }
        self.index.store(Arc::new(index));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Our own entries (to persist).
    pub fn local(&self) -> Vec<(Key, Entry)> {
        let entries = self.entries.lock().expect("table lock");
        entries.iter().filter(|(k, _)| k.origin == self.me).map(|(k, e)| (k.clone(), *e)).collect()
    }

    /// Restores our own entries (after a restart).
    pub fn restore(&self, local: Vec<(Key, Entry)>) {
        let mut entries = self.entries.lock().expect("table lock");
        for (k, e) in local {
            if k.origin == self.me {
                entries.insert(k, e);
            }
        }
        self.reindex(&entries);
    }

    /// Adds `name` for `addr` of `container`; returns the delta to gossip.
    pub fn add(&self, container: &str, addr: Ipv4Addr, name: &str) -> Option<Vec<u8>> {
        let key = Key { origin: self.me, container: container.to_string(), addr, name: name.to_string() };
        let mut entries = self.entries.lock().expect("table lock");
        let version = match entries.get(&key) {
            Some(e) if e.tombstone.is_none() => return None,
            Some(e) => e.version + 1,
            None => 1,
        };
        let entry = Entry { version, tombstone: None };
        entries.insert(key.clone(), entry);
        self.reindex(&entries);
        Some(encode(&[(key, entry)]))
    }

    /// Removes our entries matching `container` and, if given, `addr` and `name`;
    /// returns the delta to gossip.
    pub fn remove(&self, container: &str, addr: Option<Ipv4Addr>, name: Option<&str>) -> Option<Vec<u8>> {
        let mut entries = self.entries.lock().expect("table lock");
        let now = now_s();
        let mut delta = Vec::new();
        for (k, e) in entries.iter_mut() {
            if k.origin == self.me
                && k.container == container
                && addr.is_none_or(|a| a == k.addr)
                && name.is_none_or(|n| n == k.name)
                && e.tombstone.is_none()
            {
                e.version += 1;
                e.tombstone = Some(now);
                delta.push((k.clone(), *e));
            }
        }
        if delta.is_empty() {
            return None;
        }
        self.reindex(&entries);
        Some(encode(&delta))
    }

    /// Live entries (for `weft status dns`).
    pub fn live(&self) -> Vec<Key> {
        let entries = self.entries.lock().expect("table lock");
        entries.iter().filter(|(_, e)| e.tombstone.is_none()).map(|(k, _)| k.clone()).collect()
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.index().by_name.values().map(Vec::len).sum()
    }

    /// True if no name is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops tombstones past retention; returns how many.
    pub fn collect_garbage(&self) -> usize {
        let mut entries = self.entries.lock().expect("table lock");
        let horizon = now_s().saturating_sub(TOMBSTONE_RETENTION_S + CLOCK_SKEW_S);
        let before = entries.len();
        entries.retain(|_, e| e.tombstone.is_none_or(|t| t > horizon));
        before - entries.len()
    }

    /// Merges entries; returns (what was new, what we assert back as origin).
    fn merge(&self, incoming: Vec<(Key, Entry)>) -> (Entries, Entries) {
        let mut entries = self.entries.lock().expect("table lock");
        let (mut new, mut asserted) = (Vec::new(), Vec::new());
        for (k, e) in incoming {
            if k.origin == self.me {
                // Ours: our copy is the truth. A different or unknown one is
                // answered with our state (or a tombstone) at a higher version.
                let ours = entries.get(&k).copied();
                if ours != Some(e) && ours.is_none_or(|o| o.version <= e.version) {
                    let fixed = Entry {
                        version: e.version + 1,
                        tombstone: ours.map_or(Some(now_s()), |o| o.tombstone),
                    };
                    entries.insert(k.clone(), fixed);
                    asserted.push((k, fixed));
                }
                continue;
            }
            let newer = entries.get(&k).is_none_or(|cur| (cur.version, cur.tombstone) < (e.version, e.tombstone));
            if newer {
                entries.insert(k.clone(), e);
                new.push((k, e));
            }
        }
        if !new.is_empty() || !asserted.is_empty() {
            self.reindex(&entries);
        }
        (new, asserted)
    }
}

fn encode(entries: &[(Key, Entry)]) -> Vec<u8> {
    postcard::to_stdvec(entries).expect("entries encode")
}

/// Entries as they travel and are stored.
type Entries = Vec<(Key, Entry)>;

/// The mesh side of the table; asserted entries go out through `assert_tx`.
pub struct TableGossiper {
    pub table: Arc<NameTable>,
    pub assert_tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
}

impl Gossiper for TableGossiper {
    fn full_state(&self) -> Vec<u8> {
        let entries = self.table.entries.lock().expect("table lock");
        let all: Vec<(Key, Entry)> = entries.iter().map(|(k, e)| (k.clone(), *e)).collect();
        encode(&all)
    }

    fn on_gossip(&self, _from: PeerName, update: &[u8]) -> Result<Option<Vec<u8>>, GossipError> {
        let incoming: Vec<(Key, Entry)> = postcard::from_bytes(update)
            .map_err(|e| GossipError::Decode { channel: super::CHANNEL.into(), detail: e.to_string() })?;
        if incoming.len() > MAX_ENTRIES {
            return Err(GossipError::Rejected { channel: super::CHANNEL.into(), detail: "too many names".into() });
        }
        let (new, asserted) = self.table.merge(incoming);
        if !asserted.is_empty() {
            let _ = self.assert_tx.send(encode(&asserted));
        }
        Ok(if new.is_empty() { None } else { Some(encode(&new)) })
    }

    fn on_peers_gone(&self, peers: &[PeerName]) {
        let mut entries = self.table.entries.lock().expect("table lock");
        let before = entries.len();
        entries.retain(|k, _| !peers.contains(&k.origin) || k.origin == self.table.me);
        if entries.len() != before {
            self.table.reindex(&entries);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gossiper(t: &Arc<NameTable>) -> (TableGossiper, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (TableGossiper { table: t.clone(), assert_tx: tx }, rx)
    }

    #[test]
    fn names_replicate_and_removals_win() {
        let (a, b) = (PeerName::new(1), PeerName::new(2));
        let (ta, tb) = (Arc::new(NameTable::new(a)), Arc::new(NameTable::new(b)));
        let (gb, _) = gossiper(&tb);
        let name = normalize("DataProducer", "weave.local.");
        assert_eq!(name, "dataproducer.weave.local.");
        let d = ta.add("c1", Ipv4Addr::new(10, 32, 0, 1), &name).unwrap();
        assert!(ta.add("c1", Ipv4Addr::new(10, 32, 0, 1), &name).is_none(), "no change, no delta");
        assert!(gb.on_gossip(a, &d).unwrap().is_some());
        assert_eq!(tb.index().by_name[&name], vec![Ipv4Addr::new(10, 32, 0, 1)]);
        let full_before = {
            let (ga, _) = gossiper(&ta);
            ga.full_state()
        };
        let r = ta.remove("c1", None, None).unwrap();
        gb.on_gossip(a, &r).unwrap();
        assert!(!tb.index().by_name.contains_key(&name), "removed everywhere");
        assert!(tb.index().by_addr.is_empty(), "PTR skips tombstones");
        // An old full state does not bring it back.
        assert!(gb.on_gossip(a, &full_before).unwrap().is_none());
        assert!(!tb.index().by_name.contains_key(&name));
        gb.on_peers_gone(&[a]);
        assert!(tb.live().is_empty());
        assert!(gb.on_gossip(a, b"\xff\xff").is_err());
    }

    #[test]
    fn the_origin_tombstones_a_stale_copy_of_its_own_name() {
        let (a, b) = (PeerName::new(1), PeerName::new(2));
        let (ta, tb) = (Arc::new(NameTable::new(a)), Arc::new(NameTable::new(b)));
        let (gb, _) = gossiper(&tb);
        let d = ta.add("gone", Ipv4Addr::new(10, 32, 0, 9), "gone.weave.local.").unwrap();
        gb.on_gossip(a, &d).unwrap();
        // a restarts without that entry; b still has it and gossips it back.
        let fresh = Arc::new(NameTable::new(a));
        let (gfresh, mut asserted) = gossiper(&fresh);
        gfresh.on_gossip(b, &gb.full_state()).unwrap();
        assert!(fresh.live().is_empty(), "not resurrected at its origin");
        let correction = asserted.try_recv().expect("the origin answers with a tombstone");
        gb.on_gossip(a, &correction).unwrap();
        assert!(tb.live().is_empty(), "and the tombstone reaches the others");
    }
}

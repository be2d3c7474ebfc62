//! The maps the agent writes and the programs read: opening them from their
//! pins, and every typed read and write of them (endpoints, peers, underlay
//! addresses, the multicast list, broadcast trees, config, counters).
//!
//! Entries are what the kernel forwards by, so the rules about them live here:
//! an address of a local endpoint is never overwritten by a remote one, the
//! multicast list has one slot per local endpoint. Must not touch: devices,
//! programs, links.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use tracing::warn;

use super::pins::PinDir;
use crate::datapath::abi::{self, Bcast, Config, Counter, Endpoint, Ip4, Local, Peer};
use crate::datapath::{Count, DatapathError, EndpointReason, RemoteEndpoint, Stats};

/// The maps of one host, opened from its pins.
pub(super) struct Maps {
    endpoints: HashMap<MapData, Ip4, Endpoint>,
    peers: HashMap<MapData, Ip4, Peer>,
    underlay_ips: HashMap<MapData, Ip4, u32>,
    local_eps: Array<MapData, Local>,
    bcast: HashMap<MapData, Ip4, Bcast>,
    counters: PerCpuArray<MapData, Counter>,
}

fn open_map(pins: &PinDir, name: &str) -> Result<MapData, DatapathError> {
    MapData::from_pin(pins.map(name)).map_err(|e| DatapathError::bpf(format!("open map {name}"), e))
}

fn typed<T>(name: &str, result: Result<T, MapError>) -> Result<T, DatapathError> {
    result.map_err(|e| DatapathError::bpf(format!("open map {name}"), e))
}

fn update(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |e| DatapathError::bpf(format!("update {map}"), e)
}

impl Maps {
    /// Opens the pinned maps (the programs' loading pinned them).
    pub fn open(pins: &PinDir) -> Result<Self, DatapathError> {
        Ok(Maps {
            endpoints: typed("ENDPOINTS", HashMap::try_from(Map::HashMap(open_map(pins, "ENDPOINTS")?)))?,
            peers: typed("PEERS", HashMap::try_from(Map::HashMap(open_map(pins, "PEERS")?)))?,
            underlay_ips: typed("UNDERLAY_IPS", HashMap::try_from(Map::HashMap(open_map(pins, "UNDERLAY_IPS")?)))?,
            local_eps: typed("LOCAL_EPS", Array::try_from(Map::Array(open_map(pins, "LOCAL_EPS")?)))?,
            bcast: typed("BCAST", HashMap::try_from(Map::HashMap(open_map(pins, "BCAST")?)))?,
            counters: typed("COUNTERS", PerCpuArray::try_from(Map::PerCpuArray(open_map(pins, "COUNTERS")?)))?,
        })
    }

    /// The entries of local endpoints.
    pub fn local_entries(&self) -> Vec<(Ip4, Endpoint)> {
        self.endpoints.iter().filter_map(Result::ok).filter(|(_, e)| e.flags & abi::EP_LOCAL != 0).collect()
    }

    /// Adds a local endpoint: its addresses, and a slot in the multicast list.
    /// An address held by another local endpoint is refused.
    pub fn add_local(
        &mut self,
        id: &str,
        addrs: &[Ipv4Addr],
        ifindex: u32,
        mac: [u8; 6],
        host_ns: bool,
    ) -> Result<(), DatapathError> {
        let flags = abi::EP_LOCAL | if host_ns { abi::EP_HOST_NS } else { 0 };
        for addr in addrs {
            let key = Ip4::from(*addr);
            if let Ok(existing) = self.endpoints.get(&key, 0)
                && existing.flags & abi::EP_LOCAL != 0
            {
                return Err(DatapathError::AddressInUse { addr: *addr, ifindex: existing.ifindex });
            }
            let value = Endpoint { ifindex, host: Ip4::default(), mac, flags };
            self.endpoints.insert(key, value, 0).map_err(update("ENDPOINTS"))?;
        }
        let free = (0..abi::MAX_LOCAL).find(|slot| self.local_eps.get(slot, 0).is_ok_and(|l| l.ifindex == 0));
        let slot = free.ok_or_else(|| DatapathError::Endpoint {
            id: id.to_string(),
            reason: EndpointReason::TooManyEndpoints { max: abi::MAX_LOCAL },
        })?;
        let local = Local { ifindex, flags: u32::from(flags & abi::EP_HOST_NS) };
        self.local_eps.set(slot, local, 0).map_err(update("LOCAL_EPS"))
    }

    /// Removes what a local endpoint on `ifindex` has in the maps.
    pub fn remove_local(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let keys: Vec<Ip4> = self
            .local_entries()
            .into_iter()
            .filter(|(_, ep)| ep.ifindex == ifindex)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.endpoints.remove(&key).map_err(update("ENDPOINTS"))?;
        }
        for slot in 0..abi::MAX_LOCAL {
            if self.local_eps.get(&slot, 0).is_ok_and(|l| l.ifindex == ifindex) {
                self.local_eps.set(slot, Local::default(), 0).map_err(update("LOCAL_EPS"))?;
            }
        }
        Ok(())
    }

    /// Keeps only the local endpoints on `live` veths: entries of others are
    /// dropped and the multicast list is rebuilt from `live`.
    pub fn retain_local(&mut self, live: &[u32]) -> Result<(), DatapathError> {
        let entries = self.local_entries();
        for (key, _) in entries.iter().filter(|(_, ep)| !live.contains(&ep.ifindex)) {
            let _ = self.endpoints.remove(key);
        }
        let wanted: Vec<Local> = live
            .iter()
            .map(|ifindex| {
                let host_ns = entries.iter().any(|(_, e)| e.ifindex == *ifindex && e.flags & abi::EP_HOST_NS != 0);
                Local { ifindex: *ifindex, flags: if host_ns { u32::from(abi::EP_HOST_NS) } else { 0 } }
            })
            .collect();
        for slot in 0..abi::MAX_LOCAL {
            let value = wanted.get(slot as usize).copied().unwrap_or_default();
            self.local_eps.set(slot, value, 0).map_err(update("LOCAL_EPS"))?;
        }
        Ok(())
    }

    /// Adds or updates an endpoint of another host; a local endpoint's address
    /// is refused.
    pub fn set_remote(&mut self, ep: &RemoteEndpoint) -> Result<(), DatapathError> {
        let key = Ip4::from(ep.addr);
        if let Ok(existing) = self.endpoints.get(&key, 0)
            && existing.flags & abi::EP_LOCAL != 0
        {
            return Err(DatapathError::AddressInUse { addr: ep.addr, ifindex: existing.ifindex });
        }
        let value = Endpoint { ifindex: 0, host: ep.host.into(), mac: ep.mac, flags: 0 };
        self.endpoints.insert(key, value, 0).map_err(update("ENDPOINTS"))
    }

    /// Forgets an endpoint of another host (a local one stays).
    pub fn remove_remote(&mut self, addr: Ipv4Addr) -> Result<(), DatapathError> {
        let key = Ip4::from(addr);
        match self.endpoints.get(&key, 0) {
            Ok(e) if e.flags & abi::EP_LOCAL == 0 => self.endpoints.remove(&key).map_err(update("ENDPOINTS")),
            _ => Ok(()),
        }
    }

    pub fn remotes(&self) -> Vec<RemoteEndpoint> {
        self.endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, e)| e.flags & abi::EP_LOCAL == 0)
            .map(|(k, e)| RemoteEndpoint {
                addr: k.into(),
                mac: e.mac,
                host: e.host.into(),
                learned: e.flags & abi::EP_LEARNED != 0,
            })
            .collect()
    }

    pub fn set_peer(&mut self, host: Ipv4Addr, peer: Peer) -> Result<(), DatapathError> {
        self.peers.insert(Ip4::from(host), peer, 0).map_err(update("PEERS"))
    }

    pub fn remove_peer(&mut self, host: Ipv4Addr) -> Result<(), DatapathError> {
        match self.peers.remove(&Ip4::from(host)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(update("PEERS")(e)),
        }
    }

    /// Host → peer entry.
    pub fn peers(&self) -> Vec<(Ipv4Addr, Peer)> {
        self.peers.iter().filter_map(Result::ok).map(|(k, p)| (k.into(), p)).collect()
    }

    /// Teaches the underlay program that `addr` on device `ifindex` is ours.
    pub fn add_underlay_ip(&mut self, addr: Ipv4Addr, ifindex: u32) -> Result<(), DatapathError> {
        self.underlay_ips.insert(Ip4::from(addr), ifindex, 0).map_err(update("UNDERLAY_IPS"))
    }

    /// Replaces all broadcast trees (writing only what changed).
    pub fn set_broadcast(&mut self, trees: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> Result<(), DatapathError> {
        let have: Vec<Ip4> = self.bcast.keys().filter_map(Result::ok).collect();
        for key in have {
            if !trees.contains_key(&Ipv4Addr::from(key)) {
                self.bcast.remove(&key).map_err(update("BCAST"))?;
            }
        }
        for (origin, hosts) in trees {
            let mut value = Bcast::default();
            for (slot, host) in value.hosts.iter_mut().zip(hosts) {
                *slot = Ip4::from(*host);
            }
            value.count = hosts.len().min(abi::MAX_BCAST_FANOUT) as u32;
            if hosts.len() > abi::MAX_BCAST_FANOUT {
                warn!(%origin, children = hosts.len(), "broadcast tree wider than the data path takes; the rest get no multicast from here");
            }
            let key = Ip4::from(*origin);
            if self.bcast.get(&key, 0).ok() != Some(value) {
                self.bcast.insert(key, value, 0).map_err(update("BCAST"))?;
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> Result<Stats, DatapathError> {
        read_stats(&self.counters)
    }
}

/// Writes the load-time settings the programs read (`CONFIG[0]`).
pub(super) fn write_config(pins: &PinDir, config: Config) -> Result<(), DatapathError> {
    let mut map: Array<MapData, Config> = typed("CONFIG", Array::try_from(Map::Array(open_map(pins, "CONFIG")?)))?;
    map.set(0, config, 0).map_err(|e| DatapathError::bpf("write CONFIG", e))
}

/// Sums the per-CPU counters.
pub fn read_stats(counters: &PerCpuArray<MapData, Counter>) -> Result<Stats, DatapathError> {
    let sum = |index: u32| -> Result<Count, DatapathError> {
        let values = counters.get(&index, 0).map_err(|e| DatapathError::bpf("read COUNTERS", e))?;
        Ok(values.iter().fold(Count::default(), |acc, c| Count {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    };
    let mut stats = Stats::default();
    for (index, name) in abi::PATHS {
        stats.paths.insert(name, sum(*index)?);
    }
    for (code, name) in abi::DROP_REASONS {
        let count = sum(abi::DROP_BASE + code)?;
        if count.packets > 0 {
            stats.drops.insert(name, count);
        }
    }
    Ok(stats)
}

//! The `endpoints` gossip channel and the data-path programmer.
//!
//! Every peer publishes its local endpoints (overlay address, MAC) as one
//! versioned entry; entries merge by highest version and leave with their peer.
//! The [`Programmer`] turns the topology (who is reachable, through which
//! neighbour, at which underlay address) and this table into data-path state:
//! next hops per host and remote endpoints — and removes what is gone.
//!
//! Owns: the endpoint table. Must not touch: IPAM, DNS, Docker.

pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::datapath::{Datapath, DatapathError, RemoteEndpoint};
use crate::mesh::{ConnState, MeshBuilder, MeshHandle, MeshStatus, PeerName};
use crate::task::Task;

pub use table::{EndpointRecord, EndpointTable};

/// The gossip channel's name.
pub const CHANNEL: &str = "endpoints";

/// What the data path should hold, computed from the mesh and the table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Host (underlay address) → next hop address.
    pub hosts: BTreeMap<Ipv4Addr, Ipv4Addr>,
    pub remotes: BTreeMap<Ipv4Addr, RemoteEndpoint>,
    /// Broadcast trees: origin host (`0.0.0.0` = us) → hosts to pass it on to.
    pub broadcast: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
}

/// Computes the desired data-path state (pure: unit-tested directly). `have`
/// is what the data path routes now: a held peer (stopped on purpose, data path
/// still forwarding) keeps its route and endpoints as they are.
pub fn desired(
    me: PeerName,
    status: &MeshStatus,
    table: &BTreeMap<PeerName, Vec<EndpointRecord>>,
    have: &BTreeMap<Ipv4Addr, Ipv4Addr>,
) -> Desired {
    let data_addr: BTreeMap<PeerName, Ipv4Addr> =
        status.peers.iter().filter_map(|p| p.data_addr.map(|a| (p.name, a))).collect();
    // The underlay address of each neighbour, as we reach it.
    let neighbour_addr: BTreeMap<PeerName, Ipv4Addr> = status
        .connections
        .iter()
        .filter(|c| c.state == ConnState::Established)
        .filter_map(|c| {
            let addr: SocketAddr = c.addr.parse().ok()?;
            match (c.peer, addr) {
                (Some(p), SocketAddr::V4(a)) => Some((p, *a.ip())),
                _ => None,
            }
        })
        .collect();
    let mut d = Desired::default();
    for (peer, hop) in &status.routes {
        if *peer == me {
            continue;
        }
        let (Some(host), Some(via)) = (data_addr.get(peer), neighbour_addr.get(hop)) else { continue };
        // A neighbour is reached at the address we connected to; a relayed peer
        // through its first hop's.
        d.hosts.insert(*host, *via);
        for ep in table.get(peer).map(Vec::as_slice).unwrap_or_default() {
            d.remotes.insert(ep.addr, RemoteEndpoint { addr: ep.addr, mac: ep.mac, host: *host, learned: false });
        }
    }
    for (origin, children) in &status.broadcast {
        let key = if *origin == me { Some(Ipv4Addr::UNSPECIFIED) } else { data_addr.get(origin).copied() };
        let hosts: Vec<Ipv4Addr> =
            children.iter().filter_map(|c| data_addr.get(c)).filter(|h| d.hosts.contains_key(h)).copied().collect();
        if let (Some(key), false) = (key, hosts.is_empty()) {
            d.broadcast.insert(key, hosts);
        }
    }
    for peer in &status.held {
        let Some(host) = data_addr.get(peer) else { continue };
        let Some(via) = have.get(host) else { continue };
        d.hosts.insert(*host, *via);
        for ep in table.get(peer).map(Vec::as_slice).unwrap_or_default() {
            d.remotes.insert(ep.addr, RemoteEndpoint { addr: ep.addr, mac: ep.mac, host: *host, learned: false });
        }
    }
    d
}

/// Makes this peer's endpoint table and registers its gossip channel.
pub fn register(mesh: &mut MeshBuilder, version: u64) -> Arc<EndpointTable> {
    let table = Arc::new(EndpointTable::new(mesh.handle().name(), version));
    mesh.add_channel(CHANNEL, table.clone());
    table
}

/// Starts the programmer. Until `removals_after` nothing is removed: a restarted
/// agent finds the pinned routes of its previous run and must not drop them
/// before its mesh re-forms.
pub fn spawn(
    dp: Arc<dyn Datapath>,
    mesh: MeshHandle,
    table: Arc<EndpointTable>,
    removals_after: std::time::Instant,
) -> Task<DatapathError> {
    let programmer = Programmer { dp, mesh, table, removals_after, learned: BTreeMap::new() };
    Task::spawn("programmer", tracing::info_span!("programmer"), CancellationToken::new(), move |c| programmer.run(c))
}

/// Keeps the data path in line with the mesh and the endpoint table.
struct Programmer {
    dp: Arc<dyn Datapath>,
    mesh: MeshHandle,
    table: Arc<EndpointTable>,
    removals_after: std::time::Instant,
    /// Entries the data path learned from traffic, and when this programmer
    /// first saw each: kept for [`LEARNED_GRACE`] so the announcement can catch
    /// up, then dropped unless announced by then.
    learned: BTreeMap<Ipv4Addr, std::time::Instant>,
}

/// How long a learned entry nobody announced stays (a container that lived
/// shorter than gossip takes, or traffic from an address that went away).
pub const LEARNED_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

impl Programmer {
    /// Runs until `cancel`; a failed programming round is retried on the next
    /// change (or within ten seconds).
    async fn run(mut self, cancel: CancellationToken) -> Result<(), DatapathError> {
        let mut status = self.mesh.status();
        let mut changes = self.table.subscribe();
        loop {
            let snapshot = status.borrow_and_update().clone();
            if let Err(e) = self.apply(&snapshot).await {
                warn!(error = %e, "programming the data path failed; retrying on the next change");
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = status.changed() => if r.is_err() { return Ok(()) },
                r = changes.changed() => if r.is_err() { return Ok(()) },
                // Catch up even without changes (routes of the kernel may move),
                // and right when the start-up grace ends.
                _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
                _ = tokio::time::sleep_until(self.removals_after.into()), if std::time::Instant::now() < self.removals_after => {}
            }
        }
    }

    async fn apply(&mut self, status: &MeshStatus) -> Result<(), DatapathError> {
        let me = self.mesh.name();
        let have_hosts = self.dp.peer_hosts().await?;
        let want = desired(me, status, &self.table.remote_entries(me), &have_hosts);
        for (host, via) in &want.hosts {
            if have_hosts.get(host) != Some(via) {
                info!(%host, %via, "route to host");
                if host == via {
                    self.dp.add_peer_host(*host).await?;
                } else {
                    self.dp.set_next_hop(*host, *via).await?;
                }
            }
        }
        self.dp.set_broadcast(&want.broadcast).await?;
        let have: BTreeMap<Ipv4Addr, RemoteEndpoint> =
            self.dp.remote_endpoints().await?.into_iter().map(|r| (r.addr, r)).collect();
        for (addr, r) in &want.remotes {
            if have.get(addr) != Some(r) {
                debug!(%addr, host = %r.host, "remote endpoint");
                if let Err(e) = self.dp.set_remote_endpoint(r).await {
                    warn!(%addr, error = %e, "cannot program a remote endpoint");
                }
            }
        }
        if std::time::Instant::now() < self.removals_after {
            return Ok(());
        }
        for host in have_hosts.keys() {
            if !want.hosts.contains_key(host) {
                info!(%host, "host unreachable: removing its route");
                self.dp.remove_peer_host(*host).await?;
            }
        }
        let now = std::time::Instant::now();
        let learned = &mut self.learned;
        learned.retain(|a, _| have.get(a).is_some_and(|r| r.learned) && !want.remotes.contains_key(a));
        let gone: BTreeSet<&Ipv4Addr> = have
            .iter()
            .filter(|(a, _)| !want.remotes.contains_key(*a))
            .filter(|(a, r)| !r.learned || now.duration_since(*learned.entry(**a).or_insert(now)) >= LEARNED_GRACE)
            .map(|(a, _)| a)
            .collect();
        for addr in gone {
            debug!(%addr, "remote endpoint gone");
            self.dp.remove_remote_endpoint(*addr).await?;
        }
        Ok(())
    }
}

/// Publishes the local endpoints into the table and over the mesh.
pub async fn announce_local(dp: &dyn Datapath, table: &EndpointTable, mesh: &MeshHandle) {
    match dp.local_endpoints().await {
        Ok(eps) => {
            let records: Vec<EndpointRecord> = eps
                .iter()
                .flat_map(|e| e.addrs.iter().map(|a| EndpointRecord { addr: *a, mac: e.mac }))
                .collect();
            if let Some(delta) = table.set_local(records) {
                let _ = mesh.gossip(CHANNEL, delta).await;
            }
        }
        Err(e) => warn!(error = %e, "cannot list local endpoints"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{ConnStatus, PeerStatus};

    fn peer(n: u64, addr: [u8; 4]) -> PeerStatus {
        PeerStatus {
            name: PeerName::new(n),
            nickname: format!("p{n}"),
            uid: 1,
            version: 1,
            data_addr: Some(Ipv4Addr::from(addr)),
            paused: false,
            connections: Vec::new(),
        }
    }

    #[test]
    fn relayed_hosts_go_through_their_first_hops_address() {
        let (a, b, c) = (PeerName::new(1), PeerName::new(2), PeerName::new(3));
        let status = MeshStatus {
            peers: vec![peer(1, [192, 168, 1, 1]), peer(2, [192, 168, 1, 2]), peer(3, [192, 168, 2, 3])],
            connections: vec![ConnStatus {
                addr: "192.168.1.2:6783".into(),
                state: ConnState::Established,
                outbound: true,
                peer: Some(b),
                nickname: None,
                encrypted: false,
                info: String::new(),
            }],
            routes: BTreeMap::from([(b, b), (c, b)]),
            broadcast: BTreeMap::from([(a, vec![b]), (c, vec![]), (b, vec![])]),
            ..Default::default()
        };
        let ep = |x: u8| EndpointRecord { addr: Ipv4Addr::new(10, 32, 0, x), mac: [0, 0, 0, 0, 0, x] };
        let table = BTreeMap::from([(b, vec![ep(2)]), (c, vec![ep(3)]), (a, vec![ep(1)])]);
        let d = desired(a, &status, &table, &BTreeMap::new());
        assert_eq!(d.hosts[&Ipv4Addr::new(192, 168, 1, 2)], Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(d.hosts[&Ipv4Addr::new(192, 168, 2, 3)], Ipv4Addr::new(192, 168, 1, 2), "C through B");
        assert_eq!(d.remotes[&Ipv4Addr::new(10, 32, 0, 3)].host, Ipv4Addr::new(192, 168, 2, 3));
        assert!(!d.remotes.contains_key(&Ipv4Addr::new(10, 32, 0, 1)), "our own are local");
        assert_eq!(d.broadcast[&Ipv4Addr::UNSPECIFIED], vec![Ipv4Addr::new(192, 168, 1, 2)], "ours go to B");
        assert!(!d.broadcast.contains_key(&Ipv4Addr::new(192, 168, 2, 3)), "C's stop here");

        // C stops on purpose and is no longer reachable: its route stays as it was.
        let mut status = status;
        status.routes.remove(&c);
        status.held = vec![c];
        let have = BTreeMap::from([(Ipv4Addr::new(192, 168, 2, 3), Ipv4Addr::new(192, 168, 1, 2))]);
        let d = desired(a, &status, &table, &have);
        assert_eq!(d.hosts[&Ipv4Addr::new(192, 168, 2, 3)], Ipv4Addr::new(192, 168, 1, 2));
        assert!(d.remotes.contains_key(&Ipv4Addr::new(10, 32, 0, 3)), "held endpoints stay");
        // Without a route programmed before, a held peer gets none.
        assert!(!desired(a, &status, &table, &BTreeMap::new()).hosts.contains_key(&Ipv4Addr::new(192, 168, 2, 3)));
    }
}

//! DNS: a name for every container, replicated by gossip, load-balanced by
//! shuffling (WeaveDNS). The name table is [`table`]; [`server`] answers with
//! hickory-server; [`upstream`] forwards what is not ours.
//!
//! Owns: the names. Uses the mesh's `dns` channel. Must not touch: the data
//! path, IPAM, Docker.

pub mod server;
pub mod table;
pub mod upstream;

/// The gossip channel's name.
pub const CHANNEL: &str = "dns";
/// Weave's domain.
pub const DEFAULT_DOMAIN: &str = "weave.local.";
/// Weave's TTL: short, so clients ask again and spread over the addresses.
pub const DEFAULT_TTL: u32 = 1;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::mesh::MeshHandle;
use crate::state::StateStore;
use table::{Entry, Key, NameTable};

/// The state directory section holding our own names.
const SECTION: &str = "dns";

/// What the API and the Docker integration use.
#[derive(Clone)]
pub struct DnsHandle {
    pub table: Arc<NameTable>,
    pub domain: String,
    pub counters: Arc<server::Counters>,
    mesh: MeshHandle,
    store: Arc<StateStore>,
    handler: server::Handler,
    cancel: CancellationToken,
}

/// Loads our names from the state directory into a new table.
pub fn open_table(me: crate::mesh::PeerName, store: &StateStore) -> Result<Arc<NameTable>, crate::state::StateError> {
    let table = Arc::new(NameTable::new(me));
    if let Some(local) = store.section::<Vec<(Key, Entry)>>(SECTION)? {
        table.restore(local);
    }
    Ok(table)
}

impl DnsHandle {
    /// Starts the DNS service: corrections go out, listeners on `listen`.
    pub async fn start(
        table: Arc<NameTable>,
        asserted: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
        domain: &str,
        ttl: u32,
        resolv_conf: &std::path::Path,
        listen: &[SocketAddr],
        mesh: MeshHandle,
        store: Arc<StateStore>,
        cancel: CancellationToken,
    ) -> Result<Self, String> {
        let counters = Arc::new(server::Counters::default());
        let upstream = upstream::Upstream::new(resolv_conf, listen.to_vec());
        let handler = server::Handler::new(table.clone(), domain, ttl, upstream, counters.clone())?;
        let dns = DnsHandle {
            table,
            domain: table::normalize(domain, ""),
            counters,
            mesh,
            store,
            handler,
            cancel,
        };
        for addr in listen {
            dns.listen(*addr).await.map_err(|e| format!("cannot serve DNS on {addr}: {e} (pass another --dns-listen-address)"))?;
        }
        // The table's corrections of stale copies of our names.
        let (mesh, store2, table2, cancel2) = (dns.mesh.clone(), dns.store.clone(), dns.table.clone(), dns.cancel.clone());
        let mut asserted = asserted;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel2.cancelled() => return,
                    d = asserted.recv() => match d {
                        Some(delta) => {
                            persist(&store2, &table2);
                            let _ = mesh.gossip(CHANNEL, delta).await;
                        }
                        None => return,
                    },
                    _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {
                        table2.collect_garbage();
                    }
                }
            }
        });
        Ok(dns)
    }

    /// Serves on one more address (UDP and TCP).
    pub async fn listen(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let local = server::listen(addr, self.handler.clone(), self.cancel.child_token()).await?;
        info!(%local, domain = %self.domain, "DNS serving");
        Ok(local)
    }

    /// The fully qualified name for a container name or hostname.
    pub fn fqdn(&self, name: &str) -> String {
        table::normalize(name, &self.domain)
    }

    /// Adds names and gossips them.
    pub async fn add(&self, container: &str, addrs: &[std::net::Ipv4Addr], name: &str) {
        let fqdn = self.fqdn(name);
        let deltas: Vec<Vec<u8>> = addrs.iter().filter_map(|a| self.table.add(container, *a, &fqdn)).collect();
        if !deltas.is_empty() {
            persist(&self.store, &self.table);
            for d in deltas {
                let _ = self.mesh.gossip(CHANNEL, d).await;
            }
        }
    }

    /// Removes names (all of `container`'s, or only those matching).
    pub async fn remove(&self, container: &str, addr: Option<std::net::Ipv4Addr>, name: Option<&str>) -> bool {
        let fqdn = name.map(|n| self.fqdn(n));
        match self.table.remove(container, addr, fqdn.as_deref()) {
            Some(delta) => {
                persist(&self.store, &self.table);
                let _ = self.mesh.gossip(CHANNEL, delta).await;
                true
            }
            None => false,
        }
    }
}

fn persist(store: &StateStore, table: &NameTable) {
    if let Err(e) = store.set_section(SECTION, &table.local()) {
        warn!(error = %e, "cannot save the DNS names");
    }
}

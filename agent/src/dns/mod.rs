//! DNS: a name for every container, replicated by gossip, load-balanced by
//! shuffling (WeaveDNS). The name table is [`table`]; [`server`] answers with
//! hickory-server; [`upstream`] forwards what is not ours.
//!
//! [`spawn`] loads this peer's names from the state directory, registers the
//! `dns` gossip channel and starts the task that writes the names to disk (group
//! commit, off the runtime) and sends the table's corrections of stale copies.
//! Serving is separate ([`DnsHandle::serve`]): the listen sockets are bound by the
//! launch before anything else ([`server::bind`]).
//!
//! Owns: the names. Uses the mesh's `dns` channel and the state store. Must not
//! touch: the data path, IPAM, Docker.

pub mod policy;
pub mod server;
pub mod table;
pub mod upstream;

/// The gossip channel's name.
pub const CHANNEL: &str = "dns";
/// Weave's domain.
pub const DEFAULT_DOMAIN: &str = "weave.local.";
/// Weave's TTL: short, so clients ask again and spread over the addresses.
pub const DEFAULT_TTL: u32 = 1;
/// How often tombstones past their retention are dropped.
const GARBAGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hickory_proto::rr::Name;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::mesh::{MeshBuilder, MeshHandle};
use crate::state::{StateError, StateStore};
use crate::task::{Task, TaskError};
use table::{Entry, Key, NameTable, TableGossiper};

/// The state directory section holding our own names.
const SECTION: &str = "dns";

/// Settings of DNS (validated by `config`).
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The domain, fully qualified, lowercase (`weave.local.`).
    pub domain: Name,
    pub ttl: u32,
    /// Where the upstream resolvers are read from.
    pub resolv_conf: PathBuf,
    /// Answer queries (false with `--no-dns`: the names are still kept and
    /// gossiped, so this peer passes them on).
    pub serve: bool,
    /// The listen addresses the user gave: never forwarded to (a resolv.conf
    /// that names weft itself would loop); their subnets are forwarded for.
    pub listen: Vec<SocketAddr>,
    /// The overlay range (`--ipalloc-range`): its sources are forwarded for.
    pub overlay: ipnet::Ipv4Net,
}

impl DnsConfig {
    /// Checks a `--dns-domain` value.
    pub fn parse_domain(domain: &str) -> Result<Name, DnsError> {
        let text = table::normalize(domain, "");
        let name = Name::from_str(&text).map_err(|source| DnsError::Domain { given: domain.to_string(), source })?;
        Ok(name.to_lowercase())
    }
}

/// Why DNS could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("invalid --dns-domain {given:?}: {source}; give a domain such as weave.local.")]
    Domain {
        given: String,
        #[source]
        source: hickory_proto::ProtoError,
    },
    #[error("cannot serve DNS on {addr}: {source} (pass another --dns-listen-address)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS is off (--no-dns)")]
    Off,
}

/// The running DNS subsystem; its owner stops it.
pub struct DnsService {
    handle: DnsHandle,
    task: Task<DnsError>,
}

impl DnsService {
    /// A handle for the API, attach and Docker.
    pub fn handle(&self) -> DnsHandle {
        self.handle.clone()
    }

    /// Whether the writer ended on its own (its error comes from [`Self::shutdown`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops serving, writes what is not on disk yet, and ends.
    pub async fn shutdown(self) -> Result<(), TaskError<DnsError>> {
        self.handle.cancel.cancel();
        self.task.shutdown().await
    }
}

/// Group commit of our names: writers bump `wanted` and wait until `written`
/// reaches it; one write covers every change made before it started.
struct Commits {
    wanted: AtomicU64,
    kick: Notify,
    written: watch::Sender<u64>,
}

impl Commits {
    /// Asks for a write and waits for it, unless the writer is stopping.
    async fn commit(&self, stopping: &CancellationToken) {
        let generation = self.wanted.fetch_add(1, Ordering::AcqRel) + 1;
        self.kick.notify_one();
        let mut written = self.written.subscribe();
        tokio::select! {
            _ = written.wait_for(|w| *w >= generation) => {}
            // The writer's last write covers this change; nobody waits for it.
            _ = stopping.cancelled() => {}
        }
    }
}

/// What the API, attach and Docker use.
#[derive(Clone)]
pub struct DnsHandle {
    table: Arc<NameTable>,
    domain_text: String,
    counters: Arc<server::Counters>,
    handler: Option<server::Handler>,
    commits: Arc<Commits>,
    mesh: MeshHandle,
    cancel: CancellationToken,
}

/// Loads our names, registers the `dns` channel on `mesh` and starts the writer.
pub fn spawn(config: DnsConfig, store: Arc<StateStore>, mesh: &mut MeshBuilder) -> Result<DnsService, DnsError> {
    let table = Arc::new(NameTable::new(mesh.handle().name()));
    if let Some(local) = store.section::<Vec<(Key, Entry)>>(SECTION)? {
        table.restore(local);
    }
    let (assert_tx, asserted) = mpsc::unbounded_channel();
    mesh.add_channel(CHANNEL, Arc::new(TableGossiper { table: table.clone(), assert_tx }));
    let counters = Arc::new(server::Counters::default());
    let domain_text = config.domain.to_ascii();
    let handler = config.serve.then(|| {
        let upstream = upstream::Upstream::new(&config.resolv_conf, config.listen.clone());
        let listen: Vec<std::net::IpAddr> = config.listen.iter().map(SocketAddr::ip).collect();
        let recursion = policy::Recursion::new(config.overlay, &listen);
        server::Handler::new(table.clone(), &config.domain, config.ttl, upstream, counters.clone(), recursion)
    });
    let commits = Arc::new(Commits { wanted: AtomicU64::new(0), kick: Notify::new(), written: watch::channel(0).0 });
    let cancel = CancellationToken::new();
    let handle = DnsHandle {
        table: table.clone(),
        domain_text,
        counters,
        handler,
        commits: commits.clone(),
        mesh: mesh.handle(),
        cancel: cancel.clone(),
    };
    let writer = Writer { table, store, commits, mesh: mesh.handle() };
    let task = Task::spawn("dns", tracing::info_span!("dns"), cancel.child_token(), move |c| writer.run(asserted, c));
    Ok(DnsService { handle, task })
}

/// Writes our names to disk (in a blocking task) and passes on corrections.
struct Writer {
    table: Arc<NameTable>,
    store: Arc<StateStore>,
    commits: Arc<Commits>,
    mesh: MeshHandle,
}

impl Writer {
    async fn run(self, mut asserted: mpsc::UnboundedReceiver<Vec<u8>>, cancel: CancellationToken) -> Result<(), DnsError> {
        let mut garbage = tokio::time::interval(GARBAGE_INTERVAL);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.commits.kick.notified() => self.write().await,
                delta = asserted.recv() => match delta {
                    // A stale copy of one of our names was corrected: the new
                    // version is on disk before the peers hear it.
                    Some(delta) => {
                        self.commits.wanted.fetch_add(1, Ordering::AcqRel);
                        self.write().await;
                        let _ = self.mesh.gossip(CHANNEL, delta).await;
                    }
                    None => break,
                },
                _ = garbage.tick() => {
                    self.table.collect_garbage();
                }
            }
        }
        // What was asked for before the stop is written.
        if self.commits.wanted.load(Ordering::Acquire) > *self.commits.written.borrow() {
            self.write().await;
        }
        Ok(())
    }

    /// One write of our names, covering every commit asked for so far. A write
    /// that fails is logged and the callers go on: names are re-added from the
    /// running containers at the next start.
    async fn write(&self) {
        let upto = self.commits.wanted.load(Ordering::Acquire);
        let local = self.table.local();
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.set_section(SECTION, &local)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot save the DNS names"),
            Err(e) => warn!(error = %e, "the DNS names writer failed"),
        }
        self.commits.written.send_modify(|w| *w = (*w).max(upto));
    }
}

impl DnsHandle {
    /// Serves on bound sockets (UDP and TCP); `--no-dns` refuses.
    pub fn serve(&self, bound: server::Bound) -> Result<SocketAddr, DnsError> {
        let addr = bound.local_addr();
        let handler = self.handler.clone().ok_or(DnsError::Off)?;
        handler.allow_subnet_of(addr.ip());
        let local = server::serve(bound, handler, self.cancel.child_token()).map_err(|source| DnsError::Listen { addr, source })?;
        info!(%local, domain = %self.domain_text, "DNS serving");
        Ok(local)
    }

    /// Binds and serves one more address (this host's overlay address, once known).
    pub fn listen(&self, addr: SocketAddr) -> Result<SocketAddr, DnsError> {
        let bound = server::bind(addr).map_err(|source| DnsError::Listen { addr, source })?;
        self.serve(bound)
    }

    /// Whether queries are answered (not `--no-dns`).
    pub fn serving(&self) -> bool {
        self.handler.is_some()
    }

    /// The domain (`weave.local.`).
    pub fn domain(&self) -> &str {
        &self.domain_text
    }

    /// Queries answered, by outcome.
    pub fn counters(&self) -> &server::Counters {
        &self.counters
    }

    /// Live names in the table (all hosts).
    pub fn entries(&self) -> usize {
        self.table.len()
    }

    /// Every live name (all hosts), for `weft status dns`.
    pub fn names(&self) -> Vec<Key> {
        self.table.live()
    }

    /// The fully qualified name for a container name or hostname.
    pub fn fqdn(&self, name: &str) -> String {
        table::normalize(name, &self.domain_text)
    }

    /// The addresses of a name (a bare name is in our domain).
    pub fn lookup(&self, name: &str) -> Vec<Ipv4Addr> {
        self.table.index().by_name.get(&self.fqdn(name)).cloned().unwrap_or_default()
    }

    /// The ids of this peer's containers that have live names.
    pub fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> =
            self.table.local().into_iter().filter(|(_, e)| e.tombstone.is_none()).map(|(k, _)| k.container).collect();
        ids.dedup();
        ids
    }

    /// Adds names, writes them to disk, then gossips them.
    pub async fn add(&self, container: &str, addrs: &[Ipv4Addr], name: &str) {
        let fqdn = self.fqdn(name);
        let deltas: Vec<Vec<u8>> = addrs.iter().filter_map(|a| self.table.add(container, *a, &fqdn)).collect();
        if !deltas.is_empty() {
            self.commits.commit(&self.cancel).await;
            for d in deltas {
                let _ = self.mesh.gossip(CHANNEL, d).await;
            }
        }
    }

    /// Removes names (all of `container`'s, or only those matching); says
    /// whether any was removed.
    pub async fn remove(&self, container: &str, addr: Option<Ipv4Addr>, name: Option<&str>) -> bool {
        let fqdn = name.map(|n| self.fqdn(n));
        match self.table.remove(container, addr, fqdn.as_deref()) {
            Some(delta) => {
                self.commits.commit(&self.cancel).await;
                let _ = self.mesh.gossip(CHANNEL, delta).await;
                true
            }
            None => false,
        }
    }
}

//! Wiring: one agent per host, every socket bound and every saved state read
//! before the kernel is touched, the subsystems started, the API served; then
//! wait for a stop and drain everything under one deadline. Stopping never
//! tears the data path down: pinned programs keep forwarding until an agent
//! starts again and adopts them.
//!
//! Launch is all or nothing: what can fail (the lock, a port in use, a state
//! file that does not fit the flags, the range overlapping a route) fails before
//! the data path is started, and nothing after it can fail — so a failed launch
//! leaves the kernel as it found it (and the data path itself undoes a start
//! that fails half-way on a fresh host).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, AgentInfo, Ctx};
use crate::attach::{Attacher, ContainerRuntime, Spec};
use crate::config::LaunchConfig;
use crate::datapath::ebpf::EbpfDatapath;
use crate::datapath::netlink::Netlink;
use crate::datapath::{Datapath, DatapathError, ErrorKind as DatapathErrorKind};
use crate::dns::DnsError;
use crate::lock::{HostLock, LockError};
use crate::mesh::{self, MeshBuilder, PeerName};
use crate::state::{StateError, StateStore};
use crate::task::{Task, TaskError};

/// How long stopping may take in all: each subsystem gets what is left.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How many heartbeats the mesh gets to re-form after a start before the
/// programmer may remove what a previous run left programmed.
const PROGRAMMER_GRACE_HEARTBEATS: u32 = 15;

/// Why the agent could not run. Each says what to do; [`AppError::exit_code`]
/// gives the sysexits code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("weft launch needs root (network namespaces, eBPF, netlink): run it as root")]
    NotRoot,
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Mesh(#[from] mesh::MeshError),
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Proxy(#[from] crate::docker::proxy::BindError),
    #[error(transparent)]
    Api(#[from] api::BindError),
    #[error("address range {range} overlaps the route to {route} on {iface}; pass --ipalloc-range with a range no host route uses")]
    RangeOverlap { range: Ipv4Net, route: Ipv4Net, iface: String },
    #[error("the {task} subsystem stopped on its own (its error is in the log above), so weft stopped; the data path keeps forwarding")]
    Subsystem { task: &'static str },
}

/// Exit codes of `weft launch` (sysexits.h), documented in `weft launch --help`.
pub mod exit {
    /// A flag or argument is wrong (EX_USAGE).
    pub const USAGE: u8 = 64;
    /// A state file cannot be read (EX_DATAERR).
    pub const DATA: u8 = 65;
    /// Something weft needs is taken or missing: another agent runs, a port is in
    /// use (EX_UNAVAILABLE).
    pub const UNAVAILABLE: u8 = 69;
    /// A bug (EX_SOFTWARE).
    pub const SOFTWARE: u8 = 70;
    /// The kernel refused (netlink, eBPF) (EX_OSERR).
    pub const OS: u8 = 71;
    /// Reading or writing a file failed (EX_IOERR).
    pub const IO: u8 = 74;
    /// Not root, or not allowed (EX_NOPERM).
    pub const NO_PERMISSION: u8 = 77;
}

impl AppError {
    /// The exit code (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        use crate::ipam::IpamError;
        match self {
            AppError::NotRoot => exit::NO_PERMISSION,
            AppError::Lock(LockError::Held { .. })
            | AppError::Mesh(_)
            | AppError::Dns(DnsError::Listen { .. })
            | AppError::Proxy(_)
            | AppError::Api(_) => exit::UNAVAILABLE,
            AppError::Lock(LockError::Io { .. })
            | AppError::State(StateError::Io { .. })
            | AppError::Ipam(IpamError::State(StateError::Io { .. }))
            | AppError::Dns(DnsError::State(StateError::Io { .. })) => exit::IO,
            AppError::State(StateError::Corrupt { .. } | StateError::Newer { .. })
            | AppError::Ipam(IpamError::State(StateError::Corrupt { .. } | StateError::Newer { .. }))
            | AppError::Dns(DnsError::State(StateError::Corrupt { .. } | StateError::Newer { .. })) => exit::DATA,
            AppError::RangeOverlap { .. }
            | AppError::Ipam(IpamError::RangeChanged { .. } | IpamError::SubnetOutside { .. })
            | AppError::Dns(DnsError::Domain { .. }) => exit::USAGE,
            AppError::Datapath(e) => match e.kind() {
                DatapathErrorKind::BadSettings | DatapathErrorKind::InvalidRequest => exit::USAGE,
                DatapathErrorKind::NotPermitted => exit::NO_PERMISSION,
                DatapathErrorKind::LimitReached | DatapathErrorKind::System => exit::OS,
            },
            AppError::Ipam(_) | AppError::Dns(_) | AppError::Subsystem { .. } => exit::SOFTWARE,
        }
    }
}

/// The peer name: `--name`, else the one persisted, else from /etc/machine-id.
fn peer_name(config: &LaunchConfig, store: &StateStore) -> Result<PeerName, AppError> {
    if let Some(name) = config.name {
        store.update(|s| s.peer_name = Some(name))?;
        return Ok(name);
    }
    if let Some(name) = store.load()?.peer_name {
        return Ok(name);
    }
    let name = match std::fs::read_to_string("/etc/machine-id") {
        Ok(id) if !id.trim().is_empty() => PeerName::from_machine_id(&id),
        _ => PeerName::random(),
    };
    store.update(|s| s.peer_name = Some(name))?;
    Ok(name)
}

/// Refuses an overlay range that overlaps a route of the host (other than the
/// default route and weft's own).
pub async fn check_range(nl: &Netlink, range: Ipv4Net) -> Result<(), AppError> {
    let links = nl.links().await.map_err(DatapathError::from)?;
    let ours = |index: u32| {
        links.iter().find(|l| l.index == index).is_some_and(|l| {
            l.alias.as_deref().is_some_and(|a| a.starts_with("weft:")) || l.name.starts_with("weft")
        })
    };
    for r in nl.routes().await.map_err(DatapathError::from)? {
        if r.table != 254 || r.dst.prefix_len() == 0 {
            continue;
        }
        if r.oif.is_some_and(ours) {
            continue;
        }
        if range.contains(&r.dst.network()) || r.dst.contains(&range.network()) {
            let iface = r
                .oif
                .and_then(|i| links.iter().find(|l| l.index == i))
                .map_or_else(|| "?".to_string(), |l| l.name.clone());
            return Err(AppError::RangeOverlap { range, route: r.dst, iface });
        }
    }
    Ok(())
}

/// Runs the agent until SIGINT, SIGTERM or `weft stop`.
pub async fn run(config: LaunchConfig) -> Result<(), AppError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AppError::NotRoot);
    }
    let started = Instant::now();
    let (lock, store, name) = claim_host(&config)?;
    let bound = bind_all(&config, name, &store).await?;
    check_range(&Netlink::connect().map_err(DatapathError::from)?, config.ipam.range).await?;
    let agent = start(&config, name, store, bound, started).await?;
    info!(peer = %name, nickname = %config.nickname, api = %agent.api_addr, mesh = %agent.mesh_addr, "weft is running");

    let failed = wait_for_stop(&agent).await;
    info!("stopping: the data path keeps forwarding until the next start");
    let leaving = *agent.reset.borrow() && failed.is_none();
    let dp = agent.stop(leaving).await;
    if let Some(task) = failed {
        return Err(AppError::Subsystem { task });
    }
    if leaving {
        // Leaving for good: the data path and the state go too.
        dp.reset().await?;
        std::fs::remove_dir_all(&config.state_dir)
            .map_err(|source| StateError::Io { path: config.state_dir.clone(), source })?;
        info!("reset: addresses handed over, data path and state removed");
    }
    drop(lock);
    Ok(())
}

/// This host is ours (the locks), and who we are (the state file).
fn claim_host(config: &LaunchConfig) -> Result<(HostLock, Arc<StateStore>, PeerName), AppError> {
    let lock = HostLock::state_dir(&config.state_dir, Some(config.api.clone()))?;
    let store = Arc::new(StateStore::open(&config.state_dir)?);
    let name = peer_name(config, &store)?;
    let opts = config.datapath_options(name);
    let lock = lock.and_pins(&opts.pin_dir(), Some(config.api.clone()))?;
    Ok((lock, store, name))
}

/// Every listening socket, bound before anything else: a port in use fails the
/// launch before the kernel is touched.
struct Bound {
    api: api::ApiListener,
    mesh: MeshBuilder,
    dns: Vec<crate::dns::server::Bound>,
    /// DNS listen addresses no interface has yet (docker0 comes up after weft
    /// at boot): served once they appear.
    dns_later: Vec<SocketAddr>,
    proxy: Vec<crate::docker::proxy::Bound>,
}

async fn bind_all(config: &LaunchConfig, name: PeerName, store: &StateStore) -> Result<Bound, AppError> {
    let api = api::bind(&config.api).await?;
    let saved = store.update(|s| {
        for p in &config.mesh.peers {
            if !s.peers.contains(p) {
                s.peers.push(p.clone());
            }
        }
        s.peers.clone()
    })?;
    let mesh = MeshBuilder::bind(config.mesh_config(name, mesh::now_micros(), &saved)).await?;
    let (mut dns, mut dns_later) = (Vec::new(), Vec::new());
    if config.dns.serve {
        for addr in &config.dns.listen {
            match crate::dns::server::bind(*addr) {
                Ok(b) => dns.push(b),
                // Not an address of this host (yet): a port in use or a bad
                // address still fails here; a missing one is waited for.
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => dns_later.push(*addr),
                Err(source) => return Err(DnsError::Listen { addr: *addr, source }.into()),
            }
        }
    }
    let proxy = match &config.docker {
        Some(d) => crate::docker::proxy::bind(&d.proxy).await?,
        None => Vec::new(),
    };
    Ok(Bound { api, mesh, dns, dns_later, proxy })
}

/// Everything that runs, in the order it stops.
struct Running {
    shutdown: CancellationToken,
    reset: watch::Receiver<bool>,
    api_addr: api::ApiAddr,
    mesh_addr: SocketAddr,
    dp: Arc<dyn Datapath>,
    api: Task<std::io::Error>,
    docker: Option<crate::docker::DockerService>,
    expose: Option<Task<std::convert::Infallible>>,
    dns_later: Option<Task<std::convert::Infallible>>,
    discovery: Option<Task<crate::discovery::SourceError>>,
    programmer: Task<DatapathError>,
    dns: crate::dns::DnsService,
    ipam: crate::ipam::IpamService,
    mesh: mesh::Mesh,
}

async fn start(
    config: &LaunchConfig,
    name: PeerName,
    store: Arc<StateStore>,
    bound: Bound,
    started: Instant,
) -> Result<Running, AppError> {
    let Bound { api: api_listener, mesh: mut builder, dns: dns_bound, dns_later, proxy: proxy_bound } = bound;
    // The subsystems that read saved state come first: a state that does not fit
    // the flags fails here, before the data path exists.
    let table = crate::endpoints::register(&mut builder, mesh::now_micros());
    let (discovery_tx, discovery_rx) = watch::channel(None);
    let ipam = crate::ipam::spawn(config.ipam_config(name), store.clone(), &mut builder, discovery_rx)?;
    let dns = crate::dns::spawn(config.dns.clone(), store.clone(), &mut builder)?;
    let dns_handle = dns.handle();
    for b in dns_bound {
        dns_handle.serve(b)?;
    }
    let dns_later = (!dns_later.is_empty()).then(|| spawn_dns_later(dns_handle.clone(), dns_later));

    // The data path: from here on nothing fails (so nothing has to be undone;
    // a start that fails half-way undoes itself on a fresh host).
    let ebpf = EbpfDatapath::start(config.datapath_options(name)).await?;
    let underlay = ebpf.underlay().name.clone();
    let tc_attach = ebpf.attach_method().to_string();
    let kernel = ebpf.kernel_summary();
    let dp: Arc<dyn Datapath> = Arc::new(ebpf);
    builder.set_data_addr(Some(dp.local_address()));
    let mesh_addr = builder.local_addr();
    let mesh = builder.start();
    let mesh_handle = mesh.handle();
    crate::endpoints::announce_local(dp.as_ref(), &table, &mesh_handle).await;

    let discovery = config.discovery.as_ref().and_then(|d| {
        // `config` checked that this build has the source.
        let source = crate::discovery::source(d.kind, &d.settings).ok().flatten()?;
        Some(crate::discovery::spawn(source, mesh_handle.clone(), d.given.clone(), discovery_tx, d.interval))
    });
    let dns_for_attach = dns_handle.serving().then(|| dns_handle.clone());
    let attacher = Attacher::new(dp.clone(), ipam.handle(), table.clone(), mesh_handle.clone(), dns_for_attach.clone(), config.ipam.range);
    // This host's overlay address: where containers find weft's DNS.
    let (host_addr_tx, host_addr_rx) = watch::channel(None);
    let expose = config.expose.then(|| spawn_expose(attacher.clone(), dns_for_attach.clone(), host_addr_tx));
    let docker = config.docker.as_ref().map(|d| {
        let wait_binary = match crate::docker::install_wait_binary(&config.state_dir) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!(error = %e, dir = %config.state_dir.display(), "cannot install weft-wait: containers created through the proxy will not wait for ethwe");
                None
            }
        };
        let docker_config = crate::docker::DockerConfig {
            socket: d.socket.clone(),
            naming: d.naming.clone(),
            multicast_route: d.multicast_route,
            rewrite_hosts: d.rewrite_hosts,
            wait_binary,
        };
        let dns_server = if dns_for_attach.is_some() { host_addr_rx } else { watch::channel(None).1 };
        crate::docker::spawn(docker_config, attacher.clone(), dns_server, proxy_bound)
    });
    let removals_after = Instant::now() + config.mesh.heartbeat * PROGRAMMER_GRACE_HEARTBEATS;
    let programmer = crate::endpoints::spawn(dp.clone(), mesh_handle.clone(), table.clone(), removals_after);

    let info = Arc::new(AgentInfo {
        version: env!("CARGO_PKG_VERSION"),
        discovery: config.mesh.discovery,
        trusted_subnets: config.trusted_subnets.clone(),
        conn_limit: config.mesh.conn_limit,
        encap: format!("{:?}", config.datapath.encap).to_lowercase(),
        tc_attach,
        kernel,
        underlay,
        ipalloc_range: config.ipam.range,
    });
    let shutdown = CancellationToken::new();
    let (reset_tx, reset_rx) = watch::channel(false);
    let api_addr = api_listener.local_addr().unwrap_or_else(|| config.api.clone());
    let ctx = Ctx {
        mesh: mesh_handle,
        dp: dp.clone(),
        table,
        store,
        ipam: ipam.handle(),
        dns: dns_for_attach,
        attacher,
        docker: docker.as_ref().map(|d| Arc::new(d.handle()) as Arc<dyn ContainerRuntime>),
        shutdown: shutdown.clone(),
        reset: Arc::new(reset_tx),
        started,
        info,
    };
    let api = api::spawn(api_listener, ctx);
    Ok(Running {
        shutdown,
        reset: reset_rx,
        api_addr,
        mesh_addr,
        dp,
        api,
        docker,
        expose,
        dns_later,
        discovery,
        programmer,
        dns,
        ipam,
        mesh,
    })
}

impl Running {
    /// The first subsystem whose task ended although nobody stopped it.
    fn ended(&self) -> Option<&'static str> {
        let ended = [
            ("api", self.api.is_finished()),
            ("docker", self.docker.as_ref().is_some_and(crate::docker::DockerService::is_finished)),
            // It only ends when stopped: ended on its own, it panicked.
            ("discovery", self.discovery.as_ref().is_some_and(Task::is_finished)),
            ("programmer", self.programmer.is_finished()),
            ("dns", self.dns.is_finished()),
            ("ipam", self.ipam.is_finished()),
            ("mesh", self.mesh.is_finished()),
        ];
        ended.into_iter().find(|(_, done)| *done).map(|(name, _)| name)
    }

    /// Stops everything, the API first and the mesh last, within
    /// [`DRAIN_TIMEOUT`]; logs what did not stop cleanly. `leaving` (`weft
    /// reset`): the peers drop this one at once; else they are told that its
    /// data path keeps forwarding. Returns the data path, which stays.
    async fn stop(self, leaving: bool) -> Arc<dyn Datapath> {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        report("api", self.api.shutdown_within(left()).await);
        if let Some(d) = self.docker {
            report("docker", bounded(left(), d.shutdown()).await);
        }
        if let Some(t) = self.expose {
            report("expose", t.shutdown_within(left()).await);
        }
        if let Some(t) = self.dns_later {
            report("dns-later", t.shutdown_within(left()).await);
        }
        if let Some(t) = self.discovery {
            report("discovery", t.shutdown_within(left()).await);
        }
        report("programmer", self.programmer.shutdown_within(left()).await);
        report("dns", bounded(left(), self.dns.shutdown()).await);
        report("ipam", bounded(left(), self.ipam.shutdown()).await);
        let mesh = if leaving { self.mesh.leave().await } else { self.mesh.stop().await };
        report("mesh", mesh);
        self.dp
    }
}

/// A shutdown future under the time that is left.
async fn bounded<E: std::error::Error + 'static>(
    left: Duration,
    f: impl std::future::Future<Output = Result<(), TaskError<E>>>,
) -> Result<(), TaskError<E>> {
    tokio::time::timeout(left, f).await.unwrap_or(Err(TaskError::Timeout { name: "shutdown", after: left }))
}

fn report<E: std::error::Error + 'static>(what: &str, result: Result<(), TaskError<E>>) {
    if let Err(e) = result {
        warn!(task = what, error = %e, "did not stop cleanly");
    }
}

/// `weft reset --force` when no agent answers: takes the host's locks (so no
/// agent runs, or one would hold them), removes this host's data path and the
/// state directory. Says what it removed.
pub async fn reset_offline(args: &crate::cli::ResetArgs) -> Result<String, AppError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AppError::NotRoot);
    }
    let lock = HostLock::state_dir(&args.state_dir, None)?;
    // A state file that cannot be read is no reason to keep the data path.
    let saved = StateStore::open(&args.state_dir).ok().and_then(|s| s.load().ok()).and_then(|s| s.peer_name);
    let pin_name = args.pin_name.clone().or_else(|| saved.map(|n| n.to_string().replace(':', "")));
    let mut out = String::new();
    let lock = match pin_name {
        Some(pin_name) => {
            let mut opts = crate::datapath::ebpf::EbpfOptions::new(pin_name);
            opts.pin_root = args.pin_root.clone();
            let lock = lock.and_pins(&opts.pin_dir(), None)?;
            let report = crate::datapath::ebpf::reset_host(&opts).await?;
            out.push_str(&format!("{report}\n"));
            lock
        }
        None => {
            out.push_str("no peer name in the state directory and no --pin-name: the data path is left as it is\n");
            lock
        }
    };
    match std::fs::remove_dir_all(&args.state_dir) {
        Ok(()) => out.push_str(&format!("removed the state directory {}\n", args.state_dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(StateError::Io { path: args.state_dir.clone(), source }.into()),
    }
    drop(lock);
    Ok(out)
}

/// The endpoint id of the host's own overlay interface.
pub const HOST_ENDPOINT: &str = "weft:host";
/// Its name in the host.
pub const HOST_IFNAME: &str = "weft";

/// How often a DNS listen address that is not on any interface yet is tried.
const DNS_LATER_EVERY: Duration = Duration::from_secs(1);

/// Serves DNS on `addrs` once they exist on an interface (`--dns-listen-address
/// 172.17.0.1:53` at boot, before Docker made docker0): said once, then tried
/// every second; any other error is logged and that address given up.
fn spawn_dns_later(dns: crate::dns::DnsHandle, addrs: Vec<SocketAddr>) -> Task<std::convert::Infallible> {
    Task::spawn("dns-later", tracing::info_span!("dns-later"), CancellationToken::new(), move |cancel| async move {
        for addr in &addrs {
            warn!(%addr, "DNS: no interface has this address yet (docker0 not up?); serving it once it appears");
        }
        let mut waiting = addrs;
        while !waiting.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(DNS_LATER_EVERY) => {}
            }
            waiting.retain(|addr| match dns.listen(*addr) {
                Ok(_) => false,
                Err(crate::dns::DnsError::Listen { source, .. }) if source.kind() == std::io::ErrorKind::AddrNotAvailable => true,
                Err(e) => {
                    warn!(%addr, error = %e, "DNS: cannot serve this address; giving it up");
                    false
                }
            });
        }
        Ok(())
    })
}

/// Gives this host an address on the overlay (Weave's `expose`): an endpoint
/// whose other end is in the host's own namespace, so containers can reach the
/// host and its DNS server. Waits for IPAM (which may wait for agreement).
fn spawn_expose(
    a: Attacher,
    dns: Option<crate::dns::DnsHandle>,
    addr_tx: watch::Sender<Option<Ipv4Addr>>,
) -> Task<std::convert::Infallible> {
    Task::spawn("expose", tracing::info_span!("expose"), CancellationToken::new(), move |cancel| async move {
        expose(a, dns, addr_tx, cancel).await;
        Ok(())
    })
}

async fn expose(
    a: Attacher,
    dns: Option<crate::dns::DnsHandle>,
    addr_tx: watch::Sender<Option<Ipv4Addr>>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let addr = match a.endpoint(HOST_ENDPOINT).await {
        Some(ep) => ep.addrs.first().copied(),
        None => loop {
            backoff = (backoff * 2).min(Duration::from_secs(5));
            let mut spec = Spec::new(HOST_ENDPOINT, "/proc/self/ns/net");
            spec.ifname = HOST_IFNAME.into();
            spec.multicast_route = false;
            let got = tokio::select! {
                _ = cancel.cancelled() => return,
                r = a.attach(&spec) => r,
            };
            match got {
                Ok(ep) => {
                    info!(addresses = ?ep.addrs, "this host is on the overlay as {HOST_IFNAME}");
                    break ep.addrs.first().copied();
                }
                Err(e) if e.is_retryable() => {
                    warn!(error = %e, "no overlay address for this host yet; retrying in {backoff:?}");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot put this host on the overlay");
                    return;
                }
            }
        },
    };
    if let (Some(dns), Some(addr)) = (&dns, addr)
        && let Err(e) = dns.listen(SocketAddr::from((addr, 53)))
    {
        warn!(%addr, error = %e, "cannot serve DNS on the overlay address");
        return;
    }
    let _ = addr_tx.send(addr);
}

/// How often the agent checks that its subsystems still run.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Waits for SIGTERM, SIGINT, `weft stop` — or a subsystem that ended on its
/// own (returned: the agent stops rather than run without it).
async fn wait_for_stop(agent: &Running) -> Option<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    if term.is_none() || int.is_none() {
        // Without signal handlers the agent still stops through the API.
        warn!("cannot handle SIGTERM/SIGINT; stop the agent with `weft stop`");
    }
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tokio::select! {
            _ = agent.shutdown.cancelled() => return None,
            Some(()) = async { term.as_mut()?.recv().await } => { info!("SIGTERM"); return None; }
            Some(()) = async { int.as_mut()?.recv().await } => { info!("SIGINT"); return None; }
            _ = watch.tick() => {
                if let Some(task) = agent.ended() {
                    warn!(task, "a subsystem stopped on its own; stopping the agent");
                    return Some(task);
                }
            }
        }
    }
}

//! Wiring: validate the launch settings, start the subsystems, serve the API,
//! wait for a stop, drain. Stopping never tears the data path down: pinned
//! programs keep forwarding until an agent starts again and adopts them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, AgentInfo, Ctx};
use crate::attach::{AttachError, Attacher, Spec};
use crate::cli::LaunchArgs;
use crate::datapath::ebpf::{EbpfDatapath, EbpfOptions};
use crate::datapath::netlink::Netlink;
use crate::datapath::{Datapath, DatapathError};
use crate::endpoints::{self, EndpointTable, Programmer};
use crate::mesh::{self, MeshConfig, PeerName};
use crate::state::{StateError, StateStore};

/// Why the agent could not run. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("weft launch needs root (network namespaces, eBPF, netlink): run it as root")]
    NotRoot,
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Mesh(#[from] mesh::MeshError),
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    #[error("cannot serve the API on {addr}: {source} (is another weft running? pass --api)")]
    Api {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("address range {range} overlaps the route to {route} on {iface}; pass --ipalloc-range with a range no host route uses")]
    RangeOverlap { range: Ipv4Net, route: Ipv4Net, iface: String },
}

impl AppError {
    /// Exit code: 64 for bad usage (sysexits EX_USAGE), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Usage(_)
            | AppError::RangeOverlap { .. }
            | AppError::Ipam(crate::ipam::IpamError::SubnetOutside { .. } | crate::ipam::IpamError::RangeChanged { .. }) => 64,
            _ => 1,
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "weft".into())
}

/// The peer name: `--name`, else the one persisted, else from /etc/machine-id.
fn peer_name(args: &LaunchArgs, store: &StateStore) -> Result<PeerName, AppError> {
    if let Some(name) = &args.name {
        let name: PeerName = name.parse().map_err(|e: mesh::peer::BadPeerName| AppError::Usage(e.to_string()))?;
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
pub async fn run(args: LaunchArgs, api_addr: SocketAddr) -> Result<(), AppError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AppError::NotRoot);
    }
    if !(0.05..=60.0).contains(&args.heartbeat) {
        return Err(AppError::Usage(format!("--heartbeat {} must be between 0.05 and 60 seconds", args.heartbeat)));
    }
    let started = Instant::now();
    let store = Arc::new(StateStore::open(&args.state_dir)?);
    let name = peer_name(&args, &store)?;
    let nickname = args.nickname.clone().unwrap_or_else(hostname);

    let nl = Netlink::connect().map_err(DatapathError::from)?;
    check_range(&nl, args.ipalloc_range).await?;

    let ipam_config = crate::ipam::IpamConfig {
        me: name,
        range: args.ipalloc_range,
        default_subnet: args.ipalloc_default_subnet.unwrap_or(args.ipalloc_range),
        init: args.ipalloc_init.clone().unwrap_or(crate::ipam::core::Init::Consensus(distinct_peers(&args.peers) + 1)),
        reclaim_after: args.ipalloc_reclaim_after.0,
    };
    let (ipam_gossiper, ipam_pending) = crate::ipam::open(&ipam_config, &store)?;

    let mut opts = EbpfOptions::new(args.pin_name.clone().unwrap_or_else(|| name.to_string().replace(':', "")));
    opts.pin_root = args.pin_root.clone();
    opts.underlay = args.iface.clone();
    opts.local_ip = args.advertise_address;
    opts.mtu = args.mtu;
    opts.encap = args.encap;
    opts.port = args.vxlan_port;
    let ebpf = EbpfDatapath::start(opts).await?;
    let underlay = ebpf.underlay().name.to_string();
    let dp: Arc<dyn Datapath> = Arc::new(ebpf);

    let version = mesh::now_micros();
    let table = Arc::new(EndpointTable::new(name, version));
    let names = crate::dns::open_table(name, &store)?;
    let (assert_tx, assert_rx) = tokio::sync::mpsc::unbounded_channel();
    let names_gossiper = Arc::new(crate::dns::table::TableGossiper { table: names.clone(), assert_tx });
    let mut peers = args.peers.clone();
    let saved = store.update(|s| {
        for p in &args.peers {
            if !s.peers.contains(p) {
                s.peers.push(p.clone());
            }
        }
        s.peers.clone()
    })?;
    for p in saved {
        if !peers.contains(&p) {
            peers.push(p);
        }
    }
    let mut config = MeshConfig::new(name, nickname.clone());
    config.version = version;
    config.listen = SocketAddr::from((args.host, args.port));
    config.password = args.password.clone().filter(|p| !p.is_empty());
    config.peers = peers;
    config.conn_limit = args.conn_limit;
    config.discovery = !args.no_discovery;
    config.heartbeat = config_heartbeat(args.heartbeat);
    config.heartbeat_timeout = config.heartbeat * 5;
    config.data_addr = Some(dp.local_address());
    let mut builder = mesh::MeshBuilder::bind(config).await?;
    builder.add_channel(endpoints::CHANNEL, table.clone());
    builder.add_channel(crate::ipam::CHANNEL, ipam_gossiper);
    builder.add_channel(crate::dns::CHANNEL, names_gossiper);
    let mesh_service = builder.start();
    let mesh = mesh_service.handle();

    endpoints::announce_local(dp.as_ref(), &table, &mesh).await;
    let shutdown = CancellationToken::new();
    // Without a discovery source a gone peer is judged by the mesh alone.
    let (discovery_tx, discovery_rx) = tokio::sync::watch::channel(None);
    let settings = crate::discovery::Settings { peer_group_tag: args.aws_peer_group_tag.clone(), ecs_cluster: args.aws_ecs_cluster.clone() };
    if let Some(source) = crate::discovery::source(args.discovery, &settings).map_err(AppError::Usage)? {
        if !(args.discovery_interval.is_finite() && args.discovery_interval >= 0.1) {
            return Err(AppError::Usage("--discovery-interval must be at least 0.1 seconds".into()));
        }
        let interval = Duration::from_secs_f64(args.discovery_interval);
        // Peers the user gave (as addresses) stay targets whatever the group says.
        let given = args.peers.iter().filter_map(|p| p.split(':').next().and_then(|h| h.parse().ok())).collect();
        tokio::spawn(crate::discovery::run(source, mesh.clone(), given, discovery_tx, interval, shutdown.child_token()));
    }
    let ipam = crate::ipam::spawn(ipam_config, ipam_pending, store.clone(), mesh.clone(), discovery_rx, shutdown.child_token());
    let dns = if args.no_dns {
        None
    } else {
        let dns = crate::dns::DnsHandle::start(
            names.clone(),
            assert_rx,
            &args.dns_domain,
            args.dns_ttl,
            &args.resolv_conf,
            &args.dns_listen_address,
            mesh.clone(),
            store.clone(),
            shutdown.child_token(),
        )
        .await
        .map_err(AppError::Usage)?;
        Some(dns)
    };
    let attacher = Attacher {
        dp: dp.clone(),
        ipam: ipam.clone(),
        table: table.clone(),
        mesh: mesh.clone(),
        dns: dns.clone(),
        range: args.ipalloc_range,
    };
    // This host's overlay address: where containers find weft's DNS.
    let (host_addr_tx, host_addr_rx) = tokio::sync::watch::channel(None);
    if !args.no_expose {
        tokio::spawn(expose(attacher.clone(), host_addr_tx, shutdown.child_token()));
    }
    let docker = if args.no_docker {
        None
    } else {
        let dns_server = if dns.is_some() { host_addr_rx } else { tokio::sync::watch::channel(None).1 };
        Some(start_docker(&args, attacher.clone(), dns_server, shutdown.child_token()).await?)
    };
    // Three heartbeat timeouts for the mesh to re-form before the programmer may
    // remove what a previous run left programmed.
    let grace = config_heartbeat(args.heartbeat) * 15;
    let programmer = Programmer {
        dp: dp.clone(),
        mesh: mesh.clone(),
        table: table.clone(),
        removals_after: Instant::now() + grace,
        learned: Default::default(),
    };
    let prog_task = tokio::spawn(programmer.run(shutdown.child_token()));

    let info = Arc::new(AgentInfo {
        version: env!("CARGO_PKG_VERSION"),
        discovery: !args.no_discovery,
        trusted_subnets: args.trusted_subnets.clone(),
        conn_limit: args.conn_limit,
        encap: format!("{:?}", args.encap).to_lowercase(),
        underlay,
        ipalloc_range: args.ipalloc_range,
    });
    let (reset_tx, reset_rx) = tokio::sync::watch::channel(false);
    let ctx = Ctx {
        mesh: mesh.clone(),
        dp: dp.clone(),
        table: table.clone(),
        store: store.clone(),
        ipam: ipam.clone(),
        dns: dns.clone(),
        attacher,
        docker,
        shutdown: shutdown.clone(),
        reset: Arc::new(reset_tx),
        started,
        info,
    };
    let local = api::serve(api_addr, ctx, shutdown.child_token())
        .await
        .map_err(|source| AppError::Api { addr: api_addr, source })?;
    info!(peer = %name, %nickname, api = %local, mesh = %mesh.local_addr(), "weft is running");

    wait_for_stop(&shutdown).await;
    info!("stopping: the data path keeps forwarding until the next start");
    shutdown.cancel();
    if *reset_rx.borrow() {
        // Leaving for good: no pause, the peers drop this one.
        if let Err(e) = mesh_service.leave().await {
            warn!(error = %e, "the mesh did not stop cleanly");
        }
        dp.reset().await?;
        std::fs::remove_dir_all(&args.state_dir)
            .map_err(|source| crate::state::StateError::Io { path: args.state_dir.clone(), source })?;
        info!("reset: addresses handed over, data path and state removed");
    } else if let Err(e) = mesh_service.stop().await {
        warn!(error = %e, "the mesh did not stop cleanly");
    }
    if tokio::time::timeout(Duration::from_secs(5), prog_task).await.is_err() {
        warn!("the data-path programmer did not stop in time");
    }
    Ok(())
}

/// The endpoint id of the host's own overlay interface.
pub const HOST_ENDPOINT: &str = "weft:host";
/// Its name in the host.
pub const HOST_IFNAME: &str = "weft";

/// Gives this host an address on the overlay (Weave's `expose`): an endpoint
/// whose other end is in the host's own namespace, so containers can reach the
/// host and its DNS server. Waits for IPAM (which may wait for agreement).
async fn expose(a: Attacher, addr_tx: tokio::sync::watch::Sender<Option<std::net::Ipv4Addr>>, cancel: CancellationToken) {
    let existing = a.dp.local_endpoints().await.ok().and_then(|eps| eps.into_iter().find(|e| e.id == HOST_ENDPOINT));
    let mut backoff = Duration::from_millis(100);
    let addr = match existing {
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
                Err(AttachError::Unavailable(e)) => {
                    warn!(error = %e, "no overlay address for this host yet; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                }
                Err(AttachError::Invalid(e)) => {
                    warn!(error = %e, "cannot put this host on the overlay");
                    return;
                }
            }
        },
    };
    if let (Some(dns), Some(addr)) = (&a.dns, addr)
        && let Err(e) = dns.listen(std::net::SocketAddr::from((addr, 53))).await {
            warn!(%addr, error = %e, "cannot serve DNS on the overlay address");
            return;
        }
    let _ = addr_tx.send(addr);
}

/// The Docker watcher and proxy, with weft-wait installed in the state directory.
async fn start_docker(
    args: &LaunchArgs,
    attacher: Attacher,
    dns_server: tokio::sync::watch::Receiver<Option<std::net::Ipv4Addr>>,
    cancel: CancellationToken,
) -> Result<crate::docker::DockerHandle, AppError> {
    let socket = args.docker_host.strip_prefix("unix://").ok_or_else(|| {
        AppError::Usage(format!("--docker-host {}: only unix:///PATH sockets are supported", args.docker_host))
    })?;
    let wait_binary = match crate::docker::install_wait_binary(&args.state_dir) {
        Ok(p) => Some(p),
        Err(e) => {
            warn!(error = %e, dir = %args.state_dir.display(), "cannot install weft-wait: containers created through the proxy will not wait for ethwe");
            None
        }
    };
    let config = crate::docker::DockerConfig {
        socket: socket.into(),
        proxy: if args.no_proxy { Vec::new() } else { args.proxy_listen.clone() },
        naming: crate::docker::container::Naming {
            domain: args.dns_domain.clone(),
            hostname_from_label: args.hostname_from_label.clone(),
        },
        multicast_route: !args.no_multicast_route,
        rewrite_hosts: !args.no_rewrite_hosts,
        wait_binary,
    };
    crate::docker::start(config, attacher, dns_server, cancel).await.map_err(AppError::Usage)
}

/// How many different peers were given (`host` and `host:6783` are one).
fn distinct_peers(peers: &[String]) -> usize {
    let normal: std::collections::BTreeSet<String> =
        peers.iter().map(|p| p.strip_suffix(":6783").unwrap_or(p).to_string()).collect();
    normal.len()
}

fn config_heartbeat(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds)
}

async fn wait_for_stop(shutdown: &CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
}

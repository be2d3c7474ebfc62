//! `weft launch` flags → one validated [`LaunchConfig`] holding every
//! subsystem's settings, before anything is touched (no socket, no file, no
//! kernel state). A flag that cannot work is refused here, with what to do
//! (exit 64), so a launch never fails half-way over something it could have
//! known at the start.
//!
//! Owns: the checks and defaults of the launch flags. Uses: the subsystems'
//! config types. Must not touch: anything outside the process.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::cli::LaunchArgs;
use crate::datapath::ebpf::{EbpfOptions, Encap, TcAttach};
use crate::discovery;
use crate::api::ApiAddr;
use crate::dns::{DnsConfig, DnsError};
use crate::docker::Listen;
use crate::docker::container::Naming;
use crate::ipam::core::Init;
use crate::mesh::{MeshConfig, PeerName};

/// Heartbeats faster than this cost CPU for nothing; slower than the upper
/// bound and a dead peer takes minutes to notice.
pub const HEARTBEAT_RANGE: std::ops::RangeInclusive<f64> = 0.05..=60.0;
/// Discovery rounds closer than this would hammer the cloud API.
pub const MIN_DISCOVERY_INTERVAL: f64 = 0.1;
/// IPv4's smallest MTU every link must carry.
pub const MIN_MTU: u32 = 576;
/// The largest endpoint MTU: an IPv4 packet plus VXLAN must fit 65535 bytes.
pub const MAX_MTU: u32 = 65535 - crate::datapath::VXLAN_OVERHEAD;
/// Heartbeats missed before a connection counts as dead.
pub const HEARTBEATS_TO_TIMEOUT: u32 = 5;

/// A launch flag that cannot work, with what to do. Exit code 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--heartbeat {given} must be between {} and {} seconds", HEARTBEAT_RANGE.start(), HEARTBEAT_RANGE.end())]
    Heartbeat { given: f64 },
    #[error("--discovery-interval {given} must be at least {MIN_DISCOVERY_INTERVAL} seconds")]
    DiscoveryInterval { given: f64 },
    #[error(transparent)]
    Discovery(#[from] discovery::Unavailable),
    #[error("--docker-host {given}: only unix:///PATH sockets are supported")]
    DockerHost { given: String },
    #[error("--mtu {given}: the endpoint MTU must be between {MIN_MTU} and {MAX_MTU} (default: the underlay's MTU minus 50)")]
    Mtu { given: u32 },
    #[error("--name {given}: {source}")]
    Name {
        given: String,
        #[source]
        source: crate::mesh::peer::BadPeerName,
    },
    #[error("--ipalloc-default-subnet {subnet} is not inside --ipalloc-range {range}")]
    SubnetOutside { subnet: Ipv4Net, range: Ipv4Net },
    #[error(transparent)]
    DnsDomain(DnsError),
    #[error("--conn-limit must be at least 1")]
    ConnLimit,
    #[error("--vxlan-port must not be 0")]
    VxlanPort,
    #[error("--api {given}: the API answers on loopback only; give 127.0.0.1:PORT or unix:///PATH")]
    ApiNotLoopback { given: ApiAddr },
}

/// The mesh's settings, but for the peer name and version (known once the
/// state directory is read).
#[derive(Debug, Clone)]
pub struct MeshSettings {
    pub listen: SocketAddr,
    pub password: Option<String>,
    /// Peers given on the command line.
    pub peers: Vec<String>,
    pub conn_limit: usize,
    /// Connect to peers learned from other peers.
    pub discovery: bool,
    pub heartbeat: Duration,
}

/// The data path's settings, but for the pin directory name (the peer name by
/// default).
#[derive(Debug, Clone)]
pub struct DatapathSettings {
    pub pin_root: PathBuf,
    pub pin_name: Option<String>,
    pub underlay: Option<String>,
    pub local_ip: Option<Ipv4Addr>,
    pub mtu: Option<u32>,
    pub encap: Encap,
    pub tc_attach: TcAttach,
    pub port: u16,
}

/// IPAM's settings, but for the peer name.
#[derive(Debug, Clone)]
pub struct IpamSettings {
    pub range: Ipv4Net,
    pub default_subnet: Ipv4Net,
    pub init: Init,
    pub reclaim_after: Option<Duration>,
}

/// The Docker integration's settings.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    pub socket: PathBuf,
    /// Where the API proxy listens (none: no proxy).
    pub proxy: Vec<Listen>,
    pub naming: Naming,
    pub multicast_route: bool,
    pub rewrite_hosts: bool,
}

/// Where else to find peers.
#[derive(Debug, Clone)]
pub struct DiscoverySettings {
    pub kind: discovery::Kind,
    pub settings: discovery::Settings,
    pub interval: Duration,
    /// Peers the user gave (as addresses): they stay targets whatever the
    /// source says.
    pub given: BTreeSet<Ipv4Addr>,
}

/// Everything `weft launch` was asked for, checked.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub state_dir: PathBuf,
    /// `--name`, if given.
    pub name: Option<PeerName>,
    pub nickname: String,
    /// The HTTP API's address (loopback).
    pub api: ApiAddr,
    pub mesh: MeshSettings,
    pub datapath: DatapathSettings,
    pub ipam: IpamSettings,
    pub dns: DnsConfig,
    /// `None` with `--no-docker`.
    pub docker: Option<DockerSettings>,
    /// `None` without `--discovery`.
    pub discovery: Option<DiscoverySettings>,
    /// Give this host an address on the overlay (not `--no-expose`).
    pub expose: bool,
    pub trusted_subnets: Vec<Ipv4Net>,
}

impl LaunchConfig {
    /// Checks `args` (and the global `--api`); touches nothing.
    pub fn from_args(args: &LaunchArgs, api: ApiAddr) -> Result<LaunchConfig, ConfigError> {
        if !HEARTBEAT_RANGE.contains(&args.heartbeat) {
            return Err(ConfigError::Heartbeat { given: args.heartbeat });
        }
        if !api.is_local() {
            return Err(ConfigError::ApiNotLoopback { given: api });
        }
        if args.conn_limit == 0 {
            return Err(ConfigError::ConnLimit);
        }
        if args.vxlan_port == 0 {
            return Err(ConfigError::VxlanPort);
        }
        if let Some(mtu) = args.mtu
            && !(MIN_MTU..=MAX_MTU).contains(&mtu)
        {
            return Err(ConfigError::Mtu { given: mtu });
        }
        let name = match &args.name {
            Some(given) => {
                Some(given.parse().map_err(|source| ConfigError::Name { given: given.clone(), source })?)
            }
            None => None,
        };
        let range = args.ipalloc_range;
        let default_subnet = args.ipalloc_default_subnet.unwrap_or(range);
        if !range.contains(&default_subnet) {
            return Err(ConfigError::SubnetOutside { subnet: default_subnet, range });
        }
        let discovery = match args.discovery {
            discovery::Kind::None => None,
            kind => {
                discovery::available(kind)?;
                let interval = args.discovery_interval;
                if !(interval.is_finite() && interval >= MIN_DISCOVERY_INTERVAL) {
                    return Err(ConfigError::DiscoveryInterval { given: interval });
                }
                Some(DiscoverySettings {
                    kind,
                    settings: discovery::Settings {
                        peer_group_tag: args.aws_peer_group_tag.clone(),
                        ecs_cluster: args.aws_ecs_cluster.clone(),
                    },
                    interval: Duration::from_secs_f64(interval),
                    given: args.peers.iter().filter_map(|p| p.split(':').next().and_then(|h| h.parse().ok())).collect(),
                })
            }
        };
        let docker = if args.no_docker {
            None
        } else {
            let socket = args
                .docker_host
                .strip_prefix("unix://")
                .ok_or_else(|| ConfigError::DockerHost { given: args.docker_host.clone() })?;
            Some(DockerSettings {
                socket: socket.into(),
                proxy: if args.no_proxy { Vec::new() } else { args.proxy_listen.clone() },
                naming: Naming { domain: args.dns_domain.clone(), hostname_from_label: args.hostname_from_label.clone() },
                multicast_route: !args.no_multicast_route,
                rewrite_hosts: !args.no_rewrite_hosts,
            })
        };
        let dns = DnsConfig {
            domain: DnsConfig::parse_domain(&args.dns_domain).map_err(ConfigError::DnsDomain)?,
            ttl: args.dns_ttl,
            resolv_conf: args.resolv_conf.clone(),
            serve: !args.no_dns,
            listen: if args.no_dns { Vec::new() } else { args.dns_listen_address.clone() },
            overlay: range,
        };
        Ok(LaunchConfig {
            state_dir: args.state_dir.clone(),
            name,
            nickname: args.nickname.clone().unwrap_or_else(hostname),
            api,
            mesh: MeshSettings {
                listen: SocketAddr::from((args.host, args.port)),
                password: args.password.clone().filter(|p| !p.is_empty()),
                peers: args.peers.clone(),
                conn_limit: args.conn_limit,
                discovery: !args.no_discovery,
                heartbeat: Duration::from_secs_f64(args.heartbeat),
            },
            datapath: DatapathSettings {
                pin_root: args.pin_root.clone(),
                pin_name: args.pin_name.clone(),
                underlay: args.iface.clone(),
                local_ip: args.advertise_address,
                mtu: args.mtu,
                encap: args.encap,
                tc_attach: args.tc_attach,
                port: args.vxlan_port,
            },
            ipam: IpamSettings {
                range,
                default_subnet,
                // With a discovery source the group sizes the agreement (no
                // number to get right on every host); else the peers given.
                init: args.ipalloc_init.clone().unwrap_or_else(|| {
                    if discovery.is_some() { Init::Discovery } else { Init::Consensus(distinct_peers(&args.peers) + 1) }
                }),
                reclaim_after: args.ipalloc_reclaim_after.0,
            },
            dns,
            docker,
            discovery,
            expose: !args.no_expose,
            trusted_subnets: args.trusted_subnets.clone(),
        })
    }

    /// The pin directory's name: `--pin-name`, else the peer name without colons.
    pub fn pin_name(&self, name: PeerName) -> String {
        self.datapath.pin_name.clone().unwrap_or_else(|| name.to_string().replace(':', ""))
    }

    /// The eBPF backend's options for peer `name`.
    pub fn datapath_options(&self, name: PeerName) -> EbpfOptions {
        let d = &self.datapath;
        let mut opts = EbpfOptions::new(self.pin_name(name));
        opts.pin_root = d.pin_root.clone();
        opts.underlay = d.underlay.clone();
        opts.local_ip = d.local_ip;
        opts.mtu = d.mtu;
        opts.encap = d.encap;
        opts.tc_attach = d.tc_attach;
        opts.port = d.port;
        opts
    }

    /// The mesh's config for peer `name`, with the peers saved from earlier runs.
    pub fn mesh_config(&self, name: PeerName, version: u64, saved_peers: &[String]) -> MeshConfig {
        let m = &self.mesh;
        let mut config = MeshConfig::new(name, self.nickname.clone());
        config.version = version;
        config.listen = m.listen;
        config.password = m.password.clone();
        config.peers = m.peers.clone();
        for p in saved_peers {
            if !config.peers.contains(p) {
                config.peers.push(p.clone());
            }
        }
        config.conn_limit = m.conn_limit;
        config.discovery = m.discovery;
        config.heartbeat = m.heartbeat;
        config.heartbeat_timeout = m.heartbeat * HEARTBEATS_TO_TIMEOUT;
        config
    }

    /// IPAM's config for peer `name`.
    pub fn ipam_config(&self, name: PeerName) -> crate::ipam::IpamConfig {
        let i = &self.ipam;
        crate::ipam::IpamConfig {
            me: name,
            range: i.range,
            default_subnet: i.default_subnet,
            init: i.init.clone(),
            reclaim_after: i.reclaim_after,
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "weft".into())
}

/// How many different peers were given (`host` and `host:6783` are one).
fn distinct_peers(peers: &[String]) -> usize {
    let port = format!(":{}", crate::mesh::DEFAULT_PORT);
    let normal: BTreeSet<&str> = peers.iter().map(|p| p.strip_suffix(port.as_str()).unwrap_or(p)).collect();
    normal.len()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<LaunchConfig, ConfigError> {
        let cli = Cli::try_parse_from(["weft", "launch"].iter().chain(args)).expect("clap accepts it");
        let Command::Launch(launch) = cli.command else { panic!("not a launch") };
        LaunchConfig::from_args(&launch, cli.api)
    }

    #[test]
    fn defaults_are_weaves() {
        let c = parse(&["10.0.0.2", "10.0.0.3:6783", "10.0.0.2:6783"]).unwrap();
        assert_eq!(c.ipam.range.to_string(), "10.32.0.0/12");
        assert_eq!(c.ipam.init, Init::Consensus(3), "two distinct peers given plus this one");
        assert_eq!(c.mesh.listen.port(), 6783);
        assert_eq!(c.api.to_string(), "127.0.0.1:6784");
        assert_eq!(c.dns.domain.to_ascii(), "weave.local.");
        assert!(c.discovery.is_none() && c.docker.is_some() && c.expose);
        let mesh = c.mesh_config(PeerName::new(1), 5, &["10.0.0.9".into(), "10.0.0.2".into()]);
        assert_eq!(mesh.peers, vec!["10.0.0.2", "10.0.0.3:6783", "10.0.0.2:6783", "10.0.0.9"]);
        assert_eq!(mesh.heartbeat_timeout, Duration::from_secs(5));
        assert_eq!(c.pin_name("be:23:00:00:00:01".parse().unwrap()), "be2300000001");
    }

    #[test]
    fn every_bad_flag_is_refused_before_anything_starts() {
        let refused = |args: &[&str], needle: &str| {
            let e = parse(args).expect_err("refused").to_string();
            assert!(e.contains(needle), "{args:?}: {e}");
        };
        refused(&["--mtu", "100000"], "--mtu 100000");
        refused(&["--mtu", "100"], "between 576");
        refused(&["--heartbeat", "0"], "--heartbeat");
        refused(&["--heartbeat", "NaN"], "--heartbeat");
        refused(&["--docker-host", "tcp://1.2.3.4:2375"], "only unix");
        refused(&["--name", "nonsense"], "--name nonsense");
        refused(&["--ipalloc-range", "10.32.0.0/12", "--ipalloc-default-subnet", "10.64.0.0/16"], "not inside");
        refused(&["--dns-domain", "bad..domain"], "--dns-domain");
        refused(&["--conn-limit", "0"], "--conn-limit");
        refused(&["--vxlan-port", "0"], "--vxlan-port");
        refused(&["--api", "0.0.0.0:6784"], "loopback");
        #[cfg(feature = "aws")]
        refused(&["--discovery", "aws-asg", "--discovery-interval", "0.01"], "--discovery-interval");
        #[cfg(not(feature = "aws"))]
        refused(&["--discovery", "aws-asg"], "features aws");
        // Off switches make the other flags of that subsystem moot.
        assert!(parse(&["--no-docker", "--docker-host", "tcp://x:1"]).is_ok());
    }
}

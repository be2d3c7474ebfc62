//! Command-line definitions only (clap). Weave's verbs and flags where they apply.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;

use crate::datapath::ebpf::{Encap, TcAttach};

/// `weft --version`: the version and the optional features this build has
/// (deploy/ecs/setup.sh refuses a binary without `aws`).
const LONG_VERSION: &str = if cfg!(feature = "aws") {
    concat!(env!("CARGO_PKG_VERSION"), "\nfeatures: aws")
} else {
    concat!(env!("CARGO_PKG_VERSION"), "\nfeatures: none (no --discovery aws-asg: build with `cargo build --release --features aws`)")
};

/// weft: a container overlay network for Linux hosts (the successor to Weave Net).
#[derive(Debug, Parser)]
#[command(name = "weft", version, long_version = LONG_VERSION, about, propagate_version = true)]
pub struct Cli {
    /// The local agent's HTTP API.
    /// 127.0.0.1:PORT, tcp://127.0.0.1:PORT or unix:///PATH.
    #[arg(long, global = true, env = "WEFT_API", default_value = "127.0.0.1:6784")]
    pub api: crate::api::ApiAddr,

    #[command(subcommand)]
    pub command: Command,
}

/// `weft launch --help`: what its exit codes mean (sysexits.h).
const LAUNCH_EXIT_CODES: &str = "Exit codes:
  0   stopped (weft stop, SIGTERM, SIGINT)
  64  a flag is wrong (or contradicts the saved state): the message says which
  65  the state file cannot be read
  69  something weft needs is taken: another agent runs on this host, a port is in use
  70  a bug: please report it with the log
  71  the kernel refused (netlink, eBPF)
  74  reading or writing the state directory failed
  77  not root, or not permitted";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent on this host (foreground), connecting to PEERs.
    #[command(after_help = LAUNCH_EXIT_CODES)]
    Launch(Box<LaunchArgs>),
    /// Stop the local agent. The data path keeps forwarding.
    Stop,
    /// Add peers to connect to (and keep connected).
    Connect {
        /// Replace the peers given so far instead of adding.
        #[arg(long)]
        replace: bool,
        /// host or host:port
        #[arg(required_unless_present = "replace")]
        peers: Vec<String>,
    },
    /// Stop connecting to peers (existing connections stay until they drop).
    Forget {
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Show the agent's state.
    Status {
        /// peers | connections | targets | endpoints | datapath
        what: Option<String>,
    },
    /// Everything the agent knows, as JSON.
    Report,
    /// Attach a container to the overlay: `[ADDR...] CONTAINER` (a Docker
    /// container's name or id), or `--netns NS [ADDR...]` (any namespace).
    Attach(AttachArgs),
    /// Take over the address space of a peer that is gone for good.
    Rmpeer {
        /// Its name (aa:bb:cc:dd:ee:ff) or nickname.
        peer: String,
        /// Also a peer stopped on purpose (`weft stop`), whose data path still
        /// forwards for containers that keep their addresses: only when that
        /// host is gone for good.
        #[arg(long)]
        force: bool,
    },
    /// Leave the network for good: hand this peer's addresses to another peer,
    /// remove the data path and the state, and stop.
    Reset(ResetArgs),
    /// Detach a container from the overlay (its addresses are released).
    Detach {
        /// A Docker container's name or id, or the id given at `attach --netns`.
        id: String,
    },
    /// List the attached containers: id, MAC, addresses (and Docker name).
    Ps,
    /// Print the `export DOCKER_HOST=...` that sends the docker CLI through
    /// weft's Docker API proxy: `eval $(weft env)`.
    Env {
        /// Print the command that restores the previous DOCKER_HOST instead.
        #[arg(long)]
        restore: bool,
    },
    /// Print the docker CLI flag for the proxy: `docker $(weft config) ps`.
    Config,
    /// Add DNS names: `IP... CONTAINER` (its name) or `IP... -h FQDN`.
    DnsAdd(DnsArgs),
    /// Remove DNS names: `IP... CONTAINER`, `CONTAINER`, or `IP... -h FQDN`.
    DnsRemove(DnsArgs),
    /// Look a name up in the DNS table.
    DnsLookup {
        name: String,
    },
}

/// `weft launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Peers to connect to: host or host:port.
    pub peers: Vec<String>,

    /// Encrypt and authenticate the control plane with this password.
    #[arg(long, env = "WEFT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// This peer's name (aa:bb:cc:dd:ee:ff); default: from /etc/machine-id.
    #[arg(long)]
    pub name: Option<String>,

    /// A readable name for this peer; default: the hostname.
    #[arg(long)]
    pub nickname: Option<String>,

    /// TCP port for control connections.
    #[arg(long, default_value_t = crate::mesh::DEFAULT_PORT)]
    pub port: u16,

    /// Address to listen on for control connections.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: Ipv4Addr,

    /// Most control connections to keep.
    #[arg(long, default_value_t = crate::mesh::DEFAULT_CONN_LIMIT)]
    pub conn_limit: usize,

    /// Do not connect to peers learned from other peers.
    #[arg(long)]
    pub no_discovery: bool,

    /// Where else to find peers: `aws-asg` asks AWS for this instance's Auto
    /// Scaling group (or `weave:peerGroupName` tag, or ECS cluster), periodically
    /// (needs a weft built with the `aws` feature).
    #[arg(long, env = "WEFT_DISCOVERY", value_enum, default_value = "none")]
    pub discovery: crate::discovery::Kind,

    /// Seconds between two discovery rounds.
    #[arg(long, env = "WEFT_DISCOVERY_INTERVAL", default_value_t = 30.0)]
    pub discovery_interval: f64,

    /// With `--discovery aws-asg`: instances with the same value of this tag
    /// are one group, whatever their Auto Scaling group (empty: off).
    #[arg(long, env = "WEFT_AWS_PEER_GROUP_TAG", default_value = "weave:peerGroupName")]
    pub aws_peer_group_tag: String,

    /// With `--discovery aws-asg`: the ECS cluster whose Auto Scaling groups
    /// (tagged weft:ecs-cluster=NAME) are one group; default: ECS_CLUSTER from
    /// /etc/ecs/ecs.config, if any.
    #[arg(long, env = "WEFT_ECS_CLUSTER")]
    pub aws_ecs_cluster: Option<String>,

    /// Subnets whose peers need no encryption (accepted for Weave compatibility;
    /// the data path is not encrypted yet, so it changes nothing today).
    #[arg(long, value_delimiter = ',')]
    pub trusted_subnets: Vec<Ipv4Net>,

    /// The underlay interface; default: the interface of the default route.
    #[arg(long)]
    pub iface: Option<String>,

    /// This host's underlay address; default: the first IPv4 of --iface.
    #[arg(long)]
    pub advertise_address: Option<Ipv4Addr>,

    /// Endpoint MTU; default: the underlay's MTU minus 50 (VXLAN).
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,

    /// Encapsulation: direct (in the TC program) or device (the VXLAN device).
    #[arg(long, default_value = "direct")]
    pub encap: Encap,

    /// How the TC programs are attached: auto (TCX where the kernel has it,
    /// 6.6+; else clsact), tcx, or clsact (netlink filters, any kernel).
    #[arg(long, default_value = "auto")]
    pub tc_attach: TcAttach,

    /// VXLAN UDP port.
    #[arg(long, default_value_t = crate::datapath::DEFAULT_VXLAN_PORT)]
    pub vxlan_port: u16,

    /// The overlay's address range (containers' addresses come from it).
    #[arg(long, default_value = "10.32.0.0/12")]
    pub ipalloc_range: Ipv4Net,

    /// The subnet containers get addresses in unless they ask for another;
    /// default: the whole range.
    #[arg(long)]
    pub ipalloc_default_subnet: Option<Ipv4Net>,

    /// How the range is first divided: consensus=N (agreement among the first N
    /// peers; default N = the peers given here plus this one), seed=PEER,PEER...
    /// (those peers own it from the start), or observer (never owns space first).
    #[arg(long)]
    pub ipalloc_init: Option<crate::ipam::core::Init>,

    /// Take over the space of a peer gone (unreachable, not in discovery) this
    /// long, e.g. 30m, 90s, 2h; "never" leaves it to `weft rmpeer`.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub ipalloc_reclaim_after: MaybeDuration,

    /// The DNS domain containers get names in.
    #[arg(long, default_value = crate::dns::DEFAULT_DOMAIN)]
    pub dns_domain: String,

    /// TTL of DNS answers, seconds (short: clients ask again and spread out).
    #[arg(long, default_value_t = crate::dns::DEFAULT_TTL)]
    pub dns_ttl: u32,

    /// Also serve DNS on this address (repeatable), e.g. 127.0.0.1:53.
    #[arg(long)]
    pub dns_listen_address: Vec<SocketAddr>,

    /// Where the upstream resolvers are read from (re-read when it changes).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// No DNS server.
    #[arg(long)]
    pub no_dns: bool,

    /// Do not give this host an address on the overlay (it then cannot reach
    /// containers, and DNS is served only on --dns-listen-address).
    #[arg(long)]
    pub no_expose: bool,

    /// Where identity and known peers are kept.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,

    /// bpffs directory for this host's pins (several simulated hosts share one bpffs).
    #[arg(long, default_value = crate::datapath::ebpf::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,

    /// Name of this host's pin directory; default: the peer name.
    #[arg(long, env = "WEFT_PIN_NAME")]
    pub pin_name: Option<String>,

    /// Seconds between heartbeats (the timeout is five of them).
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat: f64,

    /// Docker's API socket: containers it starts are attached.
    #[arg(long, env = "WEFT_DOCKER_HOST", default_value = crate::docker::DEFAULT_DOCKER_HOST)]
    pub docker_host: String,

    /// No Docker integration (no event watcher, no proxy).
    #[arg(long)]
    pub no_docker: bool,

    /// Where the Docker API proxy listens (repeatable): unix:///PATH or
    /// tcp://ADDRESS:PORT.
    #[arg(long, default_value = crate::docker::DEFAULT_PROXY)]
    pub proxy_listen: Vec<crate::docker::Listen>,

    /// No Docker API proxy (containers are still attached from Docker's events).
    #[arg(long)]
    pub no_proxy: bool,

    /// Name containers in DNS after this label when they have it, e.g.
    /// com.amazonaws.ecs.container-name on ECS.
    #[arg(long)]
    pub hostname_from_label: Option<String>,

    /// Do not route multicast (224.0.0.0/4) through containers' ethwe.
    #[arg(long)]
    pub no_multicast_route: bool,

    /// Leave containers' /etc/hosts as Docker wrote it.
    #[arg(long)]
    pub no_rewrite_hosts: bool,

    /// Log filter (tracing syntax), e.g. info,weft=debug.
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,
}

/// `weft reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// When no agent answers: remove this host's data path (endpoint
    /// interfaces, the VXLAN device, pinned programs and maps) and the state
    /// directory directly. Its addresses are not handed over: `weft rmpeer` it
    /// from another peer.
    #[arg(long)]
    pub force: bool,

    /// The agent's state directory (as given to `weft launch`).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,

    /// The bpffs directory of the pins (as given to `weft launch`).
    #[arg(long, default_value = crate::datapath::ebpf::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,

    /// The pin directory's name (as given to `weft launch`); default: the peer
    /// name in the state directory.
    #[arg(long, env = "WEFT_PIN_NAME")]
    pub pin_name: Option<String>,
}

/// `weft attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// A network namespace instead of a Docker container: a path
    /// (/proc/PID/ns/net, /run/netns/NAME) or a name in /run/netns.
    #[arg(long)]
    pub netns: Option<String>,

    /// An id for the endpoint (with --netns); default: the namespace's name.
    #[arg(long)]
    pub id: Option<String>,

    /// Addresses, then the container (without --netns). An address is
    /// 10.32.1.5/12 (that one), net:CIDR (one allocated in a subnet) or
    /// net:default; none given: one allocated in the default subnet.
    #[arg(required_unless_present = "netns")]
    pub args: Vec<String>,

    /// Interface name inside the container.
    #[arg(long, default_value = crate::datapath::DEFAULT_ENDPOINT_IFNAME)]
    pub ifname: String,

    /// Do not route multicast (224.0.0.0/4) through the interface.
    #[arg(long)]
    pub no_multicast_route: bool,

    /// Register this name in DNS for the container's addresses.
    #[arg(long)]
    pub dns_name: Option<String>,
}

/// `weft dns-add` / `weft dns-remove` (Weave's `-h FQDN`, so help is `--help`).
#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct DnsArgs {
    /// Addresses, then (optionally) a container.
    pub args: Vec<String>,

    /// A hostname instead of the container's name.
    #[arg(short = 'h', long = "hostname")]
    pub hostname: Option<String>,

    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

/// A duration, or none (`never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaybeDuration(pub Option<std::time::Duration>);

/// A duration flag that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: use e.g. 30m, 90s, 2h or never")]
pub struct BadDuration(pub String);

/// `30m`, `90s`, `2h`, `500ms`, or `never`.
pub fn parse_duration(s: &str) -> Result<MaybeDuration, BadDuration> {
    if s == "never" {
        return Ok(MaybeDuration(None));
    }
    let bad = || BadDuration(s.to_string());
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    std::time::Duration::try_from_secs_f64(secs).map(|d| MaybeDuration(Some(d))).map_err(|_| bad())
}

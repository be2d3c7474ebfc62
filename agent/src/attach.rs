//! Putting one endpoint on the overlay, and taking it off: addresses from IPAM,
//! the interface from the data path, the announcement to the mesh, names in DNS.
//! `weft attach` (the API) and the Docker integration share it, so a container
//! attached either way is the same thing.
//!
//! Uses: datapath, ipam, endpoints, dns. Must not touch: Docker, the API. The
//! container runtime is reached through [`ContainerRuntime`], which `app` wires.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::datapath::{AttachedEndpoint, Datapath, DatapathError, ErrorKind as DatapathErrorKind, LocalEndpoint};
use crate::dns::DnsHandle;
use crate::endpoints::{self, EndpointTable};
use crate::ipam::{IpamError, IpamHandle};
use crate::mesh::MeshHandle;

/// The multicast range, routed through `ethwe` by default (as Weave did).
pub const MULTICAST: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4);

/// What an endpoint asks of IPAM: an address, or one allocated in a subnet
/// (`None`: the default subnet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Addr(Ipv4Net),
    In(Option<Ipv4Net>),
}

/// Why an address word could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WantsError {
    #[error("invalid subnet in {given:?}: use net:10.40.0.0/16 (a subnet of the overlay range)")]
    Subnet { given: String },
    #[error("invalid address {given:?}: use ADDR/PREFIX (10.32.1.5/12), ip:ADDR/PREFIX, net:SUBNET, net:default or none")]
    Address { given: String },
}

/// Parses Weave's address syntax, as given to `weft attach` or in a container's
/// `WEFT_CIDR`/`WEAVE_CIDR`: `10.32.1.5/12` or `ip:10.32.1.5/12` (that address),
/// `net:10.40.0.0/16` (one allocated in that subnet), `net:default` (one in the
/// default subnet). No words at all means one address in the default subnet.
pub fn parse_wants<S: AsRef<str>>(words: &[S]) -> Result<Vec<Want>, WantsError> {
    if words.is_empty() {
        return Ok(vec![Want::In(None)]);
    }
    words
        .iter()
        .map(|w| {
            let w = w.as_ref();
            if w == "net:default" {
                return Ok(Want::In(None));
            }
            if let Some(net) = w.strip_prefix("net:") {
                return net
                    .parse()
                    .map(|n: Ipv4Net| Want::In(Some(n.trunc())))
                    .map_err(|_| WantsError::Subnet { given: w.to_string() });
            }
            let addr = w.strip_prefix("ip:").unwrap_or(w);
            addr.parse().map(Want::Addr).map_err(|_| WantsError::Address { given: w.to_string() })
        })
        .collect()
}

/// What the caller should make of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (bad address, already attached, unknown
    /// container): asking again will not help (HTTP 400/404).
    Invalid,
    /// Something that passes: IPAM waiting for agreement or space, the
    /// container runtime not answering, the agent stopping (HTTP 503; retried).
    Unavailable,
    /// This host failed (netlink, eBPF): HTTP 500.
    Internal,
}

/// Why a container runtime (Docker) could not do what attach asked.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no such container: {container}")]
    NoSuchContainer { container: String },
    #[error("container {container} is not running")]
    NotRunning { container: String },
    #[error("container {container} is attached already (addresses {addrs:?}): detach it first")]
    AlreadyAttached { container: String, addrs: Vec<Ipv4Addr> },
    #[error("cannot reach the container runtime: {source} (is dockerd running? see --docker-host)")]
    Unreachable {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the container runtime refused: {source}")]
    Refused {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the container integration is off (--no-docker): attach a namespace with --netns")]
    Off,
}

/// Why an attach or detach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Wants(#[from] WantsError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("the agent is stopping")]
    Stopping,
}

impl AttachError {
    /// What the caller should make of it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AttachError::Wants(_) => ErrorKind::Invalid,
            // Conditions that pass: agreement, a peer that comes back or joins
            // (a fresh peer owns no space until a reachable peer donates some).
            AttachError::Ipam(e) if e.is_retryable() => ErrorKind::Unavailable,
            AttachError::Ipam(_) => ErrorKind::Invalid,
            AttachError::Datapath(e) => match e.kind() {
                DatapathErrorKind::InvalidRequest | DatapathErrorKind::BadSettings => ErrorKind::Invalid,
                DatapathErrorKind::LimitReached => ErrorKind::Unavailable,
                DatapathErrorKind::NotPermitted | DatapathErrorKind::System => ErrorKind::Internal,
            },
            AttachError::Runtime(RuntimeError::Unreachable { .. }) | AttachError::Stopping => ErrorKind::Unavailable,
            AttachError::Runtime(_) => ErrorKind::Invalid,
        }
    }

    /// True when trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }
}

/// A container runtime as attach sees it (Docker; `app` wires it). The API
/// reaches containers only through this, so it names no Docker type.
#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// `weft attach [ADDR...] CONTAINER`: by name or id.
    async fn attach(&self, container: &str, addrs: Vec<String>) -> Result<AttachedEndpoint, AttachError>;
    /// `weft detach CONTAINER`.
    async fn detach(&self, container: &str) -> Result<(), AttachError>;
    /// Container ids → names, for `weft ps`.
    async fn names(&self) -> HashMap<String, String>;
    /// Where its API proxy listens (for `weft env`).
    fn proxy_addresses(&self) -> Vec<String>;
}

/// One endpoint to attach.
#[derive(Clone)]
pub struct Spec {
    /// Unique on this host: the container id, or a name the user chose.
    pub id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub wants: Vec<Want>,
    pub multicast_route: bool,
    /// DNS names for its addresses (container name, hostname...).
    pub dns_names: Vec<String>,
    /// Runs with the addresses once IPAM gave them, before the interface exists
    /// (the Docker integration writes the container's /etc/hosts here, so it is
    /// right before the application can see the interface).
    pub before_link: Option<BeforeLink>,
}

/// See [`Spec::before_link`].
pub type BeforeLink = Arc<dyn Fn(&[Ipv4Net]) + Send + Sync>;

impl Spec {
    /// An endpoint `id` in `netns`, one address in the default subnet, `ethwe`,
    /// multicast routed, no names.
    pub fn new(id: impl Into<String>, netns: impl Into<PathBuf>) -> Spec {
        Spec {
            id: id.into(),
            netns: netns.into(),
            ifname: crate::datapath::DEFAULT_ENDPOINT_IFNAME.into(),
            wants: vec![Want::In(None)],
            multicast_route: true,
            dns_names: Vec::new(),
            before_link: None,
        }
    }
}

/// Attaching and detaching endpoints: the one way to put something on the
/// overlay (the API, Docker and the host's own `expose` share it).
#[derive(Clone)]
pub struct Attacher {
    dp: Arc<dyn Datapath>,
    ipam: IpamHandle,
    table: Arc<EndpointTable>,
    mesh: MeshHandle,
    dns: Option<DnsHandle>,
    /// The overlay's whole range: routed through the interface when an address
    /// comes from a smaller subnet, so every endpoint can reach every other.
    range: Ipv4Net,
}

impl Attacher {
    /// An attacher over these subsystems; `range` is the overlay's range.
    pub fn new(
        dp: Arc<dyn Datapath>,
        ipam: IpamHandle,
        table: Arc<EndpointTable>,
        mesh: MeshHandle,
        dns: Option<DnsHandle>,
        range: Ipv4Net,
    ) -> Self {
        Attacher { dp, ipam, table, mesh, dns, range }
    }

    /// Gets the addresses, creates the interface, announces it, adds the names.
    /// Nothing is left half-done: on failure the addresses are released.
    pub async fn attach(&self, spec: &Spec) -> Result<AttachedEndpoint, AttachError> {
        let addrs = self.addresses(&spec.id, &spec.wants).await?;
        if let Some(f) = &spec.before_link {
            f(&addrs);
        }
        let mut ep = LocalEndpoint::new(spec.id.clone(), spec.netns.clone(), addrs.clone());
        ep.ifname = spec.ifname.clone();
        if !addrs.iter().any(|a| a.trunc().contains(&self.range)) {
            ep.routes.push(self.range);
        }
        if spec.multicast_route {
            ep.routes.push(MULTICAST);
        }
        let attached = match self.dp.attach_endpoint(&ep).await {
            Ok(a) => a,
            Err(e) => {
                // Keep the addresses of an endpoint attached already: they are its own.
                if self.endpoint(&spec.id).await.is_none() {
                    let _ = self.ipam.release(&spec.id).await;
                }
                return Err(e.into());
            }
        };
        endpoints::announce_local(self.dp.as_ref(), &self.table, &self.mesh).await;
        self.add_names(&spec.id, &attached.addrs, &spec.dns_names).await;
        Ok(attached)
    }

    /// Registers `names` for `id`'s addresses (idempotent).
    pub async fn add_names(&self, id: &str, addrs: &[Ipv4Addr], names: &[String]) {
        if let Some(dns) = &self.dns {
            for name in names {
                dns.add(id, addrs, name).await;
            }
        }
    }

    /// The endpoint `id`, if it has an interface on this host.
    pub async fn endpoint(&self, id: &str) -> Option<AttachedEndpoint> {
        self.dp.local_endpoints().await.ok().and_then(|eps| eps.into_iter().find(|e| e.id == id))
    }

    /// Whether `id` has an interface on this host.
    pub async fn is_attached(&self, id: &str) -> bool {
        self.endpoint(id).await.is_some()
    }

    /// The endpoints attached on this host.
    pub async fn endpoints(&self) -> Result<Vec<AttachedEndpoint>, AttachError> {
        Ok(self.dp.local_endpoints().await?)
    }

    /// Every id this host holds something for: an interface, addresses or
    /// names (what a reconcile must check against the running containers).
    pub async fn known_ids(&self) -> BTreeSet<String> {
        let mut known = BTreeSet::new();
        if let Ok(eps) = self.dp.local_endpoints().await {
            known.extend(eps.into_iter().map(|e| e.id));
        }
        if let Ok(status) = self.ipam.status().await {
            known.extend(status.allocations.into_keys());
        }
        if let Some(dns) = &self.dns {
            known.extend(dns.containers());
        }
        known
    }

    /// Removes the interface (or what is left of it: a container's veth goes
    /// with its namespace), releases the addresses, removes the names, tells the
    /// peers. Idempotent.
    pub async fn detach(&self, id: &str) -> Result<(), AttachError> {
        self.dp.detach_endpoint(id).await?;
        self.ipam.release(id).await?;
        if let Some(dns) = &self.dns {
            dns.remove(id, None, None).await;
        }
        endpoints::announce_local(self.dp.as_ref(), &self.table, &self.mesh).await;
        Ok(())
    }

    /// Gets addresses for `id` (allocating or claiming); releases them all if any
    /// fails, so nothing is half-allocated.
    async fn addresses(&self, id: &str, wants: &[Want]) -> Result<Vec<Ipv4Net>, AttachError> {
        let mut got = Vec::new();
        for want in wants {
            let r = match *want {
                Want::Addr(net) => self.ipam.claim(id, net.addr()).await.map(|_| net),
                Want::In(subnet) => self.ipam.allocate(id, subnet).await,
            };
            match r {
                Ok(net) => got.push(net),
                Err(e) => {
                    if !self.is_attached(id).await {
                        let _ = self.ipam.release(id).await;
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weave_address_syntax() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        assert_eq!(parse_wants::<&str>(&[]).unwrap(), vec![Want::In(None)]);
        assert_eq!(
            parse_wants(&["10.32.1.5/12", "ip:10.40.0.9/16", "net:10.40.0.1/16", "net:default"]).unwrap(),
            vec![
                Want::Addr(net("10.32.1.5/12")),
                Want::Addr(net("10.40.0.9/16")),
                Want::In(Some(net("10.40.0.0/16"))),
                Want::In(None)
            ]
        );
        for bad in ["10.32.1.5", "net:", "net:10.40.0.0", "ip:", "nonsense", "10.32.1.500/12"] {
            let e = parse_wants(&[bad]).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}

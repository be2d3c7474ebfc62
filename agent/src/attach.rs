//! Putting one endpoint on the overlay, and taking it off: addresses from IPAM,
//! the interface from the data path, the announcement to the mesh, names in DNS.
//! `weft attach` (the API) and the Docker integration share it, so a container
//! attached either way is the same thing.
//!
//! Uses: datapath, ipam, endpoints, dns. Must not touch: Docker, the API.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::datapath::{AttachedEndpoint, Datapath, LocalEndpoint};
use crate::endpoints::{self, EndpointTable};
use crate::ipam::core::AllocError;
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

/// Parses Weave's address syntax, as given to `weft attach` or in a container's
/// `WEFT_CIDR`/`WEAVE_CIDR`: `10.32.1.5/12` or `ip:10.32.1.5/12` (that address),
/// `net:10.40.0.0/16` (one allocated in that subnet), `net:default` (one in the
/// default subnet). No words at all means one address in the default subnet.
pub fn parse_wants<S: AsRef<str>>(words: &[S]) -> Result<Vec<Want>, String> {
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
                return net.parse().map(|n: Ipv4Net| Want::In(Some(n.trunc()))).map_err(|_| {
                    format!("invalid subnet in {w:?}: use net:10.40.0.0/16 (a subnet of the overlay range)")
                });
            }
            let addr = w.strip_prefix("ip:").unwrap_or(w);
            addr.parse().map(Want::Addr).map_err(|_| {
                format!("invalid address {w:?}: use ADDR/PREFIX (10.32.1.5/12), ip:ADDR/PREFIX, net:SUBNET, net:default or none")
            })
        })
        .collect()
}

/// Why an attach or detach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The request itself is wrong (bad address, already attached, ...).
    #[error("{0}")]
    Invalid(String),
    /// IPAM cannot answer yet (waiting for agreement, or stopping): try again.
    #[error("{0}")]
    Unavailable(String),
}

impl From<IpamError> for AttachError {
    fn from(e: IpamError) -> Self {
        match e {
            // Conditions that pass: agreement, a peer that comes back or joins
            // (a fresh peer owns no space until a reachable peer donates some).
            IpamError::Stopped
            | IpamError::Timeout(..)
            | IpamError::Alloc(AllocError::Exhausted(_) | AllocError::OwnerUnreachable { .. } | AllocError::NoRing) => {
                AttachError::Unavailable(e.to_string())
            }
            e => AttachError::Invalid(e.to_string()),
        }
    }
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
    #[allow(clippy::type_complexity)]
    pub before_link: Option<Arc<dyn Fn(&[Ipv4Net]) + Send + Sync>>,
}

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

/// Everything attaching touches.
#[derive(Clone)]
pub struct Attacher {
    pub dp: Arc<dyn Datapath>,
    pub ipam: IpamHandle,
    pub table: Arc<EndpointTable>,
    pub mesh: MeshHandle,
    pub dns: Option<crate::dns::DnsHandle>,
    /// The overlay's whole range: routed through the interface when an address
    /// comes from a smaller subnet, so every endpoint can reach every other.
    pub range: Ipv4Net,
}

impl Attacher {
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
                if !self.is_attached(&spec.id).await {
                    let _ = self.ipam.release(&spec.id).await;
                }
                return Err(AttachError::Invalid(e.to_string()));
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

    /// Whether `id` has an interface on this host.
    pub async fn is_attached(&self, id: &str) -> bool {
        self.dp.local_endpoints().await.is_ok_and(|eps| eps.iter().any(|e| e.id == id))
    }

    /// Removes the interface (or what is left of it: a container's veth goes
    /// with its namespace), releases the addresses, removes the names, tells the
    /// peers. Idempotent.
    pub async fn detach(&self, id: &str) -> Result<(), AttachError> {
        self.dp.detach_endpoint(id).await.map_err(|e| AttachError::Invalid(e.to_string()))?;
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
            let e = parse_wants(&[bad]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}

//! Local endpoints: checking a request, creating the veth pair and putting the
//! endpoint program on it, entering the container's namespace to finish its end,
//! detaching, listing, and clearing what is left of endpoints whose veth went
//! with their container.
//!
//! An attach is all or nothing: a failure removes the veth, its link pin and its
//! map entries. Must not touch: peers, the VXLAN device, the underlay.

use ipnet::Ipv4Net;
use tracing::{debug, info};

use super::{ALIAS_PREFIX, EbpfDatapath, endpoint_id, host_ifname, load, lock};
use crate::datapath::abi::{Endpoint, Ip4};
use crate::datapath::netlink::{Link, Netlink, is_valid_ifname};
use crate::datapath::netns::{Netns, NetnsError, in_netns};
use crate::datapath::{AttachedEndpoint, DatapathError, EndpointReason, LocalEndpoint, mac_for};

/// The longest endpoint id: it becomes the veth's alias (IFALIASZ is 256).
const MAX_ID_LEN: usize = 200;

/// The first thing wrong with an endpoint request, if any.
fn check(ep: &LocalEndpoint) -> Result<(), EndpointReason> {
    if ep.id.is_empty() || ep.id.len() > MAX_ID_LEN || ep.id.contains('\0') {
        return Err(EndpointReason::BadId);
    }
    if ep.addrs.is_empty() {
        return Err(EndpointReason::NoAddresses);
    }
    if !is_valid_ifname(&ep.ifname) {
        return Err(EndpointReason::BadInterfaceName);
    }
    Ok(())
}

impl EbpfDatapath {
    pub(super) async fn attach_local(&self, ep: &LocalEndpoint) -> Result<AttachedEndpoint, DatapathError> {
        let fail = |reason| DatapathError::Endpoint { id: ep.id.clone(), reason };
        check(ep).map_err(fail)?;
        let host_name = host_ifname(&ep.id);
        let _ops = self.endpoint_ops.lock().await;
        if let Some(existing) = self.nl.link(&host_name).await? {
            return Err(fail(EndpointReason::AlreadyAttached { host_ifname: existing.name }));
        }
        let ns = Netns::open(&ep.netns).map_err(|e| match e {
            NetnsError::Open { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                fail(EndpointReason::NoSuchNamespace { path })
            }
            e => e.into(),
        })?;
        let mac = ep.mac.unwrap_or_else(|| mac_for(ep.addrs[0].addr()));
        match self.attach_inner(ep, &host_name, &ns, mac).await {
            Ok(attached) => {
                lock(&self.attached).insert(host_name);
                info!(id = %ep.id, veth = %attached.host_ifname, addrs = ?attached.addrs, "endpoint attached");
                Ok(attached)
            }
            Err(e) => {
                // Nothing half-done stays behind: the veth (and with it the
                // container end and the TCX link) goes, and so do map entries.
                if let Ok(Some(link)) = self.nl.link(&host_name).await {
                    let _ = lock(&self.maps).remove_local(link.index);
                    let _ = self.nl.delete_link(link.index).await;
                }
                let _ = std::fs::remove_file(self.pins.endpoint_link(&host_name));
                Err(e)
            }
        }
    }

    async fn attach_inner(
        &self,
        ep: &LocalEndpoint,
        host_name: &str,
        ns: &Netns,
        mac: [u8; 6],
    ) -> Result<AttachedEndpoint, DatapathError> {
        let same_ns = ns.inode()? == Netns::current()?.inode()?;
        let link = self
            .nl
            .create_veth(host_name, &format!("{ALIAS_PREFIX}{}", ep.id), &ep.ifname, ns, mac, self.mtu)
            .await
            .map_err(|e| {
                // The host end's name is free (checked under the lock), so an
                // existing name is the container's.
                let e = DatapathError::from(e);
                if e.errno() == Some(libc::EEXIST) {
                    DatapathError::Endpoint {
                        id: ep.id.clone(),
                        reason: EndpointReason::InterfaceExists { ifname: ep.ifname.clone() },
                    }
                } else {
                    e
                }
            })?;
        disable_ipv6(host_name);
        // Forwarding first, address last: once the container has its address,
        // everything it sends is already handled.
        load::attach(&mut lock(&self.progs).endpoint, host_name, &self.pins.endpoint_link(host_name), self.method)?;
        let addrs: Vec<_> = ep.addrs.iter().map(Ipv4Net::addr).collect();
        lock(&self.maps).add_local(&ep.id, &addrs, link.index, mac, same_ns)?;
        let (ifname, nets, routes) = (ep.ifname.clone(), ep.addrs.clone(), ep.routes.clone());
        in_netns(&ep.netns, move || async move {
            let nl = Netlink::connect()?;
            let inner = nl.require_link(&ifname).await?;
            disable_ipv6(&ifname);
            // Up, routes, then addresses: an application waiting for the
            // interface to have an address (weft-wait) finds it complete.
            nl.set_up(inner.index).await?;
            for route in routes {
                nl.add_route(route, inner.index).await?;
            }
            for net in nets {
                nl.add_address(inner.index, net).await?;
            }
            Ok::<_, DatapathError>(())
        })
        .await??;
        Ok(AttachedEndpoint {
            id: ep.id.clone(),
            host_ifname: link.name,
            host_ifindex: link.index,
            mac,
            addrs,
            mtu: self.mtu,
        })
    }

    pub(super) async fn detach_local(&self, id: &str) -> Result<(), DatapathError> {
        let host_name = host_ifname(id);
        let _ops = self.endpoint_ops.lock().await;
        let Some(link) = self.nl.link(&host_name).await? else {
            // Its veth went with the container's namespace: clear what is left.
            self.prune_vanished().await?;
            lock(&self.attached).remove(&host_name);
            return Ok(());
        };
        lock(&self.maps).remove_local(link.index)?;
        let pin = self.pins.endpoint_link(&host_name);
        if pin.exists() {
            std::fs::remove_file(&pin).map_err(super::pins::io_err("unpin", &pin))?;
        }
        self.nl.delete_link(link.index).await?;
        lock(&self.attached).remove(&host_name);
        info!(%id, veth = %host_name, "endpoint detached");
        Ok(())
    }

    pub(super) async fn list_local(&self) -> Result<Vec<AttachedEndpoint>, DatapathError> {
        let links = self.nl.links().await?;
        let entries = lock(&self.maps).local_entries();
        let mut out = Vec::new();
        for link in &links {
            let Some(id) = endpoint_id(link) else {
                continue;
            };
            let mine: Vec<&(Ip4, Endpoint)> = entries.iter().filter(|(_, e)| e.ifindex == link.index).collect();
            let mut addrs: Vec<_> = mine.iter().map(|(k, _)| std::net::Ipv4Addr::from(*k)).collect();
            addrs.sort();
            let mac = mine.first().map_or([0; 6], |(_, e)| e.mac);
            out.push(AttachedEndpoint {
                id: id.to_string(),
                host_ifname: link.name.clone(),
                host_ifindex: link.index,
                mac,
                addrs,
                mtu: link.mtu,
            });
        }
        Ok(out)
    }

    /// Drops what is left of endpoints whose veth vanished (a container's
    /// namespace went, and its veth with it): link pins, address entries, slots in
    /// the multicast list. Returns the endpoint links that exist.
    pub(super) async fn prune_vanished(&self) -> Result<Vec<Link>, DatapathError> {
        let ours: Vec<Link> = self.nl.links().await?.into_iter().filter(|l| endpoint_id(l).is_some()).collect();
        for pin in self.pins.endpoint_links()? {
            if !ours.iter().any(|l| l.name == pin.device) {
                debug!(veth = %pin.device, "dropping the link pin of a vanished endpoint");
                let _ = std::fs::remove_file(&pin.pin);
            }
        }
        let live: Vec<u32> = ours.iter().map(|l| l.index).collect();
        lock(&self.maps).retain_local(&live)?;
        Ok(ours)
    }
}

/// Endpoints speak IPv4 only: without IPv6 on the veths there is no router
/// solicitation and DAD noise for the programs to drop.
fn disable_ipv6(ifname: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        debug!(%path, error = %e, "could not disable IPv6");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, ifname: &str, addrs: &[&str]) -> LocalEndpoint {
        let mut ep = LocalEndpoint::new(id, "/proc/self/ns/net", addrs.iter().map(|a| a.parse().unwrap()).collect());
        ep.ifname = ifname.into();
        ep
    }

    #[test]
    fn bad_requests_are_named() {
        assert_eq!(check(&ep("c1", "ethwe", &["10.32.0.1/12"])), Ok(()));
        assert_eq!(check(&ep("", "ethwe", &["10.32.0.1/12"])), Err(EndpointReason::BadId));
        assert_eq!(check(&ep(&"x".repeat(201), "ethwe", &["10.32.0.1/12"])), Err(EndpointReason::BadId));
        assert_eq!(check(&ep("a\0b", "ethwe", &["10.32.0.1/12"])), Err(EndpointReason::BadId));
        assert_eq!(check(&ep("c1", "ethwe", &[])), Err(EndpointReason::NoAddresses));
        for ifname in ["", "eth/0", "eth 0", "eth:0", "..", "sixteen-chars-xx"] {
            assert_eq!(check(&ep("c1", ifname, &["10.32.0.1/12"])), Err(EndpointReason::BadInterfaceName), "{ifname:?}");
        }
    }
}

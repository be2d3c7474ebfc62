//! The eBPF backend: TC programs on every endpoint's host-side veth, on the
//! external-mode VXLAN device and, in direct mode, on the underlay device —
//! attached as TCX links where the kernel has TCX (6.6+), else as cls_bpf
//! filters on the clsact qdisc (`clsact.rs`; also `--tc-attach clsact`).
//!
//! Everything the kernel needs lives in bpffs under `/sys/fs/bpf/weft/<host>/`
//! (`pins.rs` has the layout). So traffic keeps flowing with no agent running,
//! and a starting agent adopts what is pinned: programs whose object hash
//! matches are reused, links of an older build are switched to the new programs
//! atomically (`bpf_link_update`), links of vanished devices are dropped. The
//! endpoints themselves are recovered from the kernel: host-side veths carry the
//! alias `weft:<endpoint id>`.
//!
//! Files: [`EbpfDatapath`] and its [`Datapath`] impl here; starting, adopting and
//! abandoning in `start.rs`; endpoints in `endpoints.rs`; removing a host's data
//! path (also with no agent) in `reset.rs`; settings in `options.rs`; pins,
//! programs and maps in `pins.rs`, `load.rs`, `maps.rs`.
//!
//! Must be created and used from threads in the host's network namespace (TC
//! attachment resolves interface names there). Knows nothing of the mesh, IPAM,
//! DNS or Docker.

mod clsact;
mod endpoints;
mod load;
mod maps;
mod options;
mod pins;
mod reset;
mod start;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tracing::{info, warn};

pub use load::objects;
pub use maps::read_stats;
pub use clsact::{HANDLE as CLSACT_HANDLE, PRIORITY as CLSACT_PRIORITY};
pub use options::{AttachMethod, ETH_MAX_MTU, EbpfOptions, Encap, MAX_VNI, MIN_MTU, TcAttach, endpoint_mtu};
pub use pins::{DEFAULT_PIN_ROOT, ensure_bpffs};
pub use reset::{RemovedEndpoint, ResetReport, reset_host};

use super::abi::Peer;
use super::netlink::{Link, Netlink};
use super::{AttachedEndpoint, Datapath, DatapathError, LocalEndpoint, RemoteEndpoint, Stats};
use load::Programs;
use maps::Maps;
use pins::PinDir;

/// The alias prefix that marks a host-side veth as a weft endpoint.
const ALIAS_PREFIX: &str = "weft:";

/// FNV-1a: a stable name for a program build, and for endpoint veths.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// Host-side veth name of endpoint `id`: short (IFNAMSIZ is 16) and stable.
pub fn host_ifname(id: &str) -> String {
    format!("wv{:012x}", fnv1a(id.as_bytes()) & 0xffff_ffff_ffff)
}

/// The endpoint id of a host-side veth (from its `weft:` alias), if it is one.
fn endpoint_id(link: &Link) -> Option<&str> {
    link.alias.as_deref().and_then(|a| a.strip_prefix(ALIAS_PREFIX))
}

/// Locks one of the data path's std mutexes, poisoned or not. They guard only
/// handles (of maps, of programs, the names of veths made): what the handles
/// lead to lives in the kernel, where a panic halfway through an update leaves
/// things no worse than an error halfway through does, and the handles
/// themselves cannot be left half-changed. So a lock a panicking thread held is
/// as good as any, and taking it must not turn one panic into a panic in every
/// later call.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The eBPF data path of one host. Must be created and used from a thread in the
/// host's network namespace (TC attachment resolves interface names there).
///
/// Made by [`EbpfDatapath::start`]; see there for what a failed start leaves
/// behind (nothing, on a fresh host) and [`EbpfDatapath::abandon`] for undoing a
/// start when a later launch step fails.
pub struct EbpfDatapath {
    opts: EbpfOptions,
    nl: Netlink,
    pins: PinDir,
    underlay: Link,
    local_ip: Ipv4Addr,
    mtu: u32,
    vxlan: Link,
    /// How the programs are attached (what `opts.tc_attach` resolved to).
    method: AttachMethod,
    progs: Mutex<Programs>,
    maps: Mutex<Maps>,
    /// Serialises attaching, detaching and pruning endpoints: a prune must not
    /// take the entries of an endpoint being attached for a vanished one's.
    endpoint_ops: tokio::sync::Mutex<()>,
    /// What a fresh start made (`None` when it adopted a pin directory).
    undo: Option<start::Undo>,
    /// Host-side veths attached through this value and not detached since:
    /// what [`EbpfDatapath::abandon`] deletes besides what the start made.
    attached: Mutex<BTreeSet<String>>,
}

impl EbpfDatapath {
    /// The pin directory of this host.
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// The underlay interface.
    pub fn underlay(&self) -> &Link {
        &self.underlay
    }

    /// The VXLAN device.
    pub fn vxlan(&self) -> &Link {
        &self.vxlan
    }

    /// How the TC programs are attached on this host.
    pub fn attach_method(&self) -> AttachMethod {
        self.method
    }

    /// The kernel and what the start's probes found in it, for status output.
    pub fn kernel_summary(&self) -> String {
        clsact::kernel_summary()
    }

    /// Runs the underlay program on device `ifindex` and teaches it the device's
    /// addresses (direct mode).
    async fn ensure_underlay(&self, ifindex: u32) -> Result<(), DatapathError> {
        let link = self.nl.link_by_index(ifindex).await?.ok_or_else(|| {
            DatapathError::bpf("attach the underlay program", format!("interface {ifindex} vanished"))
        })?;
        let addrs = self.nl.ipv4_addresses(ifindex).await?;
        load::attach(&mut lock(&self.progs).underlay, &link.name, &self.pins.underlay_link(&link.name), self.method)?;
        let mut maps = lock(&self.maps);
        for net in addrs {
            maps.add_underlay_ip(net.addr(), ifindex)?;
        }
        Ok(())
    }

    /// Programs how to reach `host`: through `next_hop`, out of the device the
    /// kernel's route to `next_hop` uses, from our address there.
    async fn set_peer(&self, host: Ipv4Addr, next_hop: Ipv4Addr) -> Result<(), DatapathError> {
        let route = self.nl.route_to(next_hop).await?;
        let mut peer = Peer { next_hop: next_hop.into(), ifindex: 0, src: self.local_ip.into(), flags: 0 };
        match route.as_ref().and_then(|r| r.oif.map(|oif| (oif, r.prefsrc))) {
            Some((oif, prefsrc)) => {
                if let Some(src) = prefsrc {
                    peer.src = src.into();
                }
                if self.opts.encap == Encap::Direct {
                    self.ensure_underlay(oif).await?;
                    peer.ifindex = oif;
                }
            }
            None => warn!(%host, %next_hop, "no route to the next hop; its traffic goes to the VXLAN device"),
        }
        lock(&self.maps).set_peer(host, peer)
    }
}

#[async_trait]
impl Datapath for EbpfDatapath {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn endpoint_mtu(&self) -> u32 {
        self.mtu
    }

    fn local_address(&self) -> Ipv4Addr {
        self.local_ip
    }

    async fn attach_endpoint(&self, ep: &LocalEndpoint) -> Result<AttachedEndpoint, DatapathError> {
        self.attach_local(ep).await
    }

    async fn detach_endpoint(&self, id: &str) -> Result<(), DatapathError> {
        self.detach_local(id).await
    }

    async fn local_endpoints(&self) -> Result<Vec<AttachedEndpoint>, DatapathError> {
        self.list_local().await
    }

    async fn set_remote_endpoint(&self, ep: &RemoteEndpoint) -> Result<(), DatapathError> {
        lock(&self.maps).set_remote(ep)
    }

    async fn remove_remote_endpoint(&self, addr: Ipv4Addr) -> Result<(), DatapathError> {
        lock(&self.maps).remove_remote(addr)
    }

    async fn remote_endpoints(&self) -> Result<Vec<RemoteEndpoint>, DatapathError> {
        Ok(lock(&self.maps).remotes())
    }

    async fn add_peer_host(&self, host: Ipv4Addr) -> Result<(), DatapathError> {
        self.set_peer(host, host).await
    }

    async fn set_next_hop(&self, host: Ipv4Addr, via: Ipv4Addr) -> Result<(), DatapathError> {
        self.set_peer(host, via).await
    }

    async fn remove_peer_host(&self, host: Ipv4Addr) -> Result<(), DatapathError> {
        lock(&self.maps).remove_peer(host)
    }

    async fn peer_hosts(&self) -> Result<BTreeMap<Ipv4Addr, Ipv4Addr>, DatapathError> {
        Ok(lock(&self.maps).peers().into_iter().map(|(host, p)| (host, p.next_hop.into())).collect())
    }

    async fn set_broadcast(&self, trees: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> Result<(), DatapathError> {
        lock(&self.maps).set_broadcast(trees)
    }

    async fn stats(&self) -> Result<Stats, DatapathError> {
        lock(&self.maps).stats()
    }

    async fn reset(&self) -> Result<(), DatapathError> {
        let _ops = self.endpoint_ops.lock().await;
        let report = reset::remove_host(&self.nl, &self.pins, &self.opts.vxlan_name).await?;
        lock(&self.attached).clear();
        info!(%report, "data path removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_veth_names_are_stable_and_fit_ifnamsiz() {
        let name = host_ifname("4f3c2b1a0e9d");
        assert_eq!(name, host_ifname("4f3c2b1a0e9d"));
        assert_ne!(name, host_ifname("4f3c2b1a0e9e"));
        assert_eq!(name.len(), 14);
        assert!(crate::datapath::netlink::is_valid_ifname(&name));
    }

    #[test]
    fn a_poisoned_lock_still_opens() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let m = mutex.clone();
        let _ = std::thread::spawn(move || {
            let _held = m.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}

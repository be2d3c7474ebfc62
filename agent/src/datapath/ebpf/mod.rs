//! The eBPF backend: TC programs (TCX links) on every endpoint's host-side veth,
//! on the external-mode VXLAN device and, in direct mode, on the underlay device.
//!
//! Everything the kernel needs lives in bpffs under `/sys/fs/bpf/weft/<host>/`:
//! the maps (`ENDPOINTS`, `PEERS`, `UNDERLAY_IPS`, `CONFIG`, `COUNTERS`), the
//! programs (`prog_<name>_<hash>`) and the links (`link_overlay`,
//! `link_underlay_<device>`, `links/<veth>`). So traffic keeps flowing with no agent running, and a
//! starting agent adopts what is pinned: programs whose object hash matches are
//! reused, links of an older build are switched to the new programs atomically
//! (`bpf_link_update`), links of vanished devices are dropped. The endpoints
//! themselves are recovered from the kernel: host-side veths carry the alias
//! `weft:<endpoint id>`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::EbpfLoader;
use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use super::abi::{self, Bcast, Config, Counter, Endpoint, Ip4, Local, Peer};
use super::netlink::{Link, Netlink};
use super::netns::{Netns, in_netns};
use super::{
    AttachedEndpoint, Count, Datapath, DatapathError, LocalEndpoint, RemoteEndpoint, Stats,
    VXLAN_OVERHEAD, mac_for,
};

/// The compiled programs (built from ebpf/ by build.rs).
pub mod objects {
    /// `ebpf/endpoint.c`.
    pub static ENDPOINT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/endpoint.o"));
    /// `ebpf/overlay.c`.
    pub static OVERLAY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay.o"));
    /// `ebpf/underlay.c`.
    pub static UNDERLAY: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/underlay.o"));
    /// `ebpf/tests/probe.c`: test-only probes for the PROG_TEST_RUN tests.
    pub static PROBE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe.o"));
}

/// Where pins live, one directory per host (several simulated hosts share bpffs).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/weft";

/// Pins of the underlay program's links: `link_underlay_<device>`.
const UNDERLAY_LINK_PREFIX: &str = "link_underlay_";

/// The alias prefix that marks a host-side veth as a weft endpoint.
const ALIAS_PREFIX: &str = "weft:";

/// `BPF_FS_MAGIC`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How packets to remote hosts are encapsulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// In the TC program itself (`bpf_skb_adjust_room` + `bpf_redirect_neigh`), and
    /// decapsulated at the underlay's ingress straight into the endpoint: no
    /// VXLAN device or UDP socket on the fast path. Wire-compatible with VXLAN.
    #[default]
    Direct,
    /// Through the external-mode VXLAN device (`bpf_skb_set_tunnel_key`).
    Device,
}

impl std::str::FromStr for Encap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Encap::Direct),
            "device" | "vxlan" => Ok(Encap::Device),
            _ => Err(format!("unknown encapsulation {s:?}: use direct or device")),
        }
    }
}

/// Settings of the eBPF backend.
#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// Names the pin directory; unique per host sharing a bpffs.
    pub host: String,
    /// Parent of the per-host pin directories.
    pub pin_root: PathBuf,
    /// The underlay interface; `None` = the interface of the default route.
    pub underlay: Option<String>,
    /// This host's underlay address; `None` = the underlay interface's first IPv4.
    pub local_ip: Option<Ipv4Addr>,
    /// Name of the VXLAN device.
    pub vxlan_name: String,
    /// VXLAN UDP port.
    pub port: u16,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Endpoint MTU; `None` = underlay MTU − 50.
    pub mtu: Option<u32>,
    /// Encapsulation mode.
    pub encap: Encap,
}

impl EbpfOptions {
    /// Defaults for a host called `host`.
    pub fn new(host: impl Into<String>) -> Self {
        EbpfOptions {
            host: host.into(),
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            underlay: None,
            local_ip: None,
            vxlan_name: "weft-vxlan".into(),
            port: super::DEFAULT_VXLAN_PORT,
            vni: super::DEFAULT_VNI,
            mtu: None,
            encap: Encap::default(),
        }
    }
}

struct Programs {
    endpoint: SchedClassifier,
    overlay: SchedClassifier,
    underlay: SchedClassifier,
}

struct Maps {
    endpoints: HashMap<MapData, Ip4, Endpoint>,
    peers: HashMap<MapData, Ip4, Peer>,
    underlay_ips: HashMap<MapData, Ip4, u32>,
    local_eps: Array<MapData, Local>,
    bcast: HashMap<MapData, Ip4, Bcast>,
    counters: PerCpuArray<MapData, Counter>,
}

/// The eBPF data path of one host. Must be created and used from a thread in the
/// host's network namespace (TCX attachment resolves interface names there).
pub struct EbpfDatapath {
    opts: EbpfOptions,
    nl: Netlink,
    pin_dir: PathBuf,
    underlay: Link,
    local_ip: Ipv4Addr,
    mtu: u32,
    vxlan: Link,
    progs: Mutex<Programs>,
    maps: Mutex<Maps>,
    /// Serialises attaching, detaching and pruning endpoints: a prune must not
    /// take the entries of an endpoint being attached for a vanished one's.
    endpoint_ops: tokio::sync::Mutex<()>,
}

fn bpf_err(op: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> DatapathError {
    let op = op.into();
    move |e| DatapathError::Bpf { op, detail: e.to_string() }
}

/// Maps an aya error to ours, recognising missing privileges.
fn aya_err<E: std::error::Error>(op: &str, e: E) -> DatapathError {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail = format!("{detail}: {s}");
        source = s.source();
    }
    if detail.contains("Operation not permitted") || detail.contains("os error 1)") {
        return DatapathError::NotPermitted { what: op.to_string() };
    }
    DatapathError::Bpf { op: op.to_string(), detail }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError {
    let path = path.to_path_buf();
    move |source| DatapathError::Io { op, path, source }
}

/// FNV-1a: a stable name for a program build, and for endpoint veths.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// Host-side veth name of endpoint `id`: short (IFNAMSIZ is 16) and stable.
pub fn host_ifname(id: &str) -> String {
    format!("wv{:012x}", fnv1a(id.as_bytes()) & 0xffff_ffff_ffff)
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let path = Path::new("/sys/fs/bpf");
    if let Ok(st) = nix::sys::statfs::statfs(path)
        && st.filesystem_type().0 == BPF_FS_MAGIC {
            return Ok(());
        }
    nix::mount::mount(Some("bpf"), path, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).map_err(
        |e| match e {
            nix::Error::EPERM | nix::Error::EACCES => {
                DatapathError::NotPermitted { what: "mounting bpffs at /sys/fs/bpf".into() }
            }
            e => DatapathError::Io { op: "mount bpffs at", path: path.into(), source: e.into() },
        },
    )
}

/// Removes a pin directory and everything in it (unpinning detaches links that no
/// process holds).
fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatapathError::Io { op: "remove pins", path: dir.into(), source: e }),
    }
}

impl EbpfDatapath {
    /// Sets the host up (or adopts what a previous agent left pinned).
    pub async fn start(opts: EbpfOptions) -> Result<Self, DatapathError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(DatapathError::NotPermitted { what: "the eBPF data path".into() });
        }
        let nl = Netlink::connect()?;
        let underlay = resolve_underlay(&nl, opts.underlay.as_deref()).await?;
        let local_ip = match opts.local_ip {
            Some(ip) => ip,
            None => nl
                .ipv4_addresses(underlay.index)
                .await?
                .first()
                .map(|n| n.addr())
                .ok_or_else(|| DatapathError::NoUnderlayAddress { name: underlay.name.clone() })?,
        };
        let mtu = opts.mtu.unwrap_or(underlay.mtu.saturating_sub(VXLAN_OVERHEAD));
        if mtu < 576 {
            return Err(DatapathError::MtuTooSmall { mtu });
        }

        ensure_bpffs()?;
        let pin_dir = opts.pin_root.join(&opts.host);
        std::fs::create_dir_all(pin_dir.join("links")).map_err(io_err("create pin directory", &pin_dir))?;
        check_abi(&pin_dir)?;
        std::fs::create_dir_all(pin_dir.join("links")).map_err(io_err("create pin directory", &pin_dir))?;
        let mut progs = load_programs(&pin_dir)?;
        let maps = open_maps(&pin_dir)?;

        let vxlan = nl.ensure_vxlan(&opts.vxlan_name, opts.port, mtu).await?;
        write_config(&pin_dir, &opts, local_ip, vxlan.index)?;
        attach(&mut progs.overlay, &vxlan.name, &pin_dir.join("link_overlay"))?;
        if opts.encap == Encap::Device {
            // Switched from direct mode: the underlay programs must go.
            for entry in std::fs::read_dir(&pin_dir).map_err(io_err("read", &pin_dir))?.flatten() {
                if entry.file_name().to_string_lossy().starts_with(UNDERLAY_LINK_PREFIX) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }

        let dp = EbpfDatapath {
            opts,
            nl,
            pin_dir,
            underlay,
            local_ip,
            mtu,
            vxlan,
            progs: Mutex::new(progs),
            maps: Mutex::new(maps),
            endpoint_ops: tokio::sync::Mutex::new(()),
        };
        if dp.opts.encap == Encap::Direct {
            dp.ensure_underlay(dp.underlay.index).await?;
        }
        dp.reconcile().await?;
        info!(
            host = %dp.opts.host, underlay = %dp.underlay.name, local_ip = %dp.local_ip, mtu = dp.mtu,
            encap = ?dp.opts.encap, pins = %dp.pin_dir.display(), "eBPF data path ready"
        );
        Ok(dp)
    }

    /// The pin directory of this host.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The underlay interface.
    pub fn underlay(&self) -> &Link {
        &self.underlay
    }

    /// The VXLAN device.
    pub fn vxlan(&self) -> &Link {
        &self.vxlan
    }

    /// Brings pins and kernel in line after a start: endpoint veths found are
    /// (re)attached, links and entries of vanished ones are dropped, peers get the
    /// current encapsulation mode.
    async fn reconcile(&self) -> Result<(), DatapathError> {
        let ours = self.prune_vanished().await?;
        {
            let mut progs = self.progs.lock().expect("progs lock");
            for link in &ours {
                attach(&mut progs.endpoint, &link.name, &self.link_pin(&link.name))?;
            }
        }
        let peers: Vec<(Ip4, Peer)> = {
            let maps = self.maps.lock().expect("maps lock");
            maps.peers.iter().filter_map(Result::ok).collect()
        };
        // Routes or the mode may have changed while no agent ran.
        for (host, peer) in peers {
            self.set_peer(host.into(), peer.next_hop.into()).await?;
        }
        Ok(())
    }

    /// Drops what is left of endpoints whose veth vanished (a container's
    /// namespace went, and its veth with it): link pins, address entries, slots in
    /// the multicast list. Returns the endpoint links that exist.
    async fn prune_vanished(&self) -> Result<Vec<Link>, DatapathError> {
        let links = self.nl.links().await?;
        let ours: Vec<Link> = links
            .into_iter()
            .filter(|l| l.alias.as_deref().is_some_and(|a| a.starts_with(ALIAS_PREFIX)))
            .collect();
        let links_dir = self.pin_dir.join("links");
        let entries = std::fs::read_dir(&links_dir).map_err(io_err("read", &links_dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !ours.iter().any(|l| l.name == name) {
                debug!(veth = %name, "dropping the link pin of a vanished endpoint");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let live: Vec<u32> = ours.iter().map(|l| l.index).collect();
        let mut maps = self.maps.lock().expect("maps lock");
        let stale: Vec<Ip4> = maps
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, ep)| ep.flags & abi::EP_LOCAL != 0 && !live.contains(&ep.ifindex))
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            let _ = maps.endpoints.remove(&key);
        }
        // The multicast list is rebuilt from the endpoints that exist.
        let wanted: Vec<Local> = ours
            .iter()
            .map(|l| {
                let host_ns = maps
                    .endpoints
                    .iter()
                    .filter_map(Result::ok)
                    .any(|(_, e)| e.ifindex == l.index && e.flags & abi::EP_HOST_NS != 0);
                Local { ifindex: l.index, flags: if host_ns { u32::from(abi::EP_HOST_NS) } else { 0 } }
            })
            .collect();
        for slot in 0..abi::MAX_LOCAL {
            let value = wanted.get(slot as usize).copied().unwrap_or_default();
            maps.local_eps.set(slot, value, 0).map_err(|e| aya_err("update LOCAL_EPS", e))?;
        }
        Ok(ours)
    }

    /// Runs the underlay program on device `ifindex` and teaches it the device's
    /// addresses (direct mode).
    async fn ensure_underlay(&self, ifindex: u32) -> Result<(), DatapathError> {
        let link = self.nl.link_by_index(ifindex).await?.ok_or_else(|| DatapathError::Bpf {
            op: "attach the underlay program".into(),
            detail: format!("interface {ifindex} vanished"),
        })?;
        let addrs = self.nl.ipv4_addresses(ifindex).await?;
        {
            let mut progs = self.progs.lock().expect("progs lock");
            let pin = self.pin_dir.join(format!("{UNDERLAY_LINK_PREFIX}{}", link.name));
            attach(&mut progs.underlay, &link.name, &pin)?;
        }
        let mut maps = self.maps.lock().expect("maps lock");
        for net in addrs {
            maps.underlay_ips.insert(Ip4::from(net.addr()), ifindex, 0).map_err(|e| aya_err("update UNDERLAY_IPS", e))?;
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
        let mut maps = self.maps.lock().expect("maps lock");
        maps.peers.insert(Ip4::from(host), peer, 0).map_err(|e| aya_err("update PEERS", e))
    }

    fn link_pin(&self, ifname: &str) -> PathBuf {
        self.pin_dir.join("links").join(ifname)
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
            .await?;
        disable_ipv6(host_name);
        // Forwarding first, address last: once the container has its address,
        // everything it sends is already handled.
        {
            let mut progs = self.progs.lock().expect("progs lock");
            attach(&mut progs.endpoint, host_name, &self.link_pin(host_name))?;
        }
        let flags = abi::EP_LOCAL | if same_ns { abi::EP_HOST_NS } else { 0 };
        {
            let mut maps = self.maps.lock().expect("maps lock");
            for net in &ep.addrs {
                let key = Ip4::from(net.addr());
                if let Ok(existing) = maps.endpoints.get(&key, 0)
                    && existing.flags & abi::EP_LOCAL != 0 {
                        return Err(DatapathError::AddressInUse { addr: net.addr(), ifindex: existing.ifindex });
                    }
                let value = Endpoint { ifindex: link.index, host: Ip4::default(), mac, flags };
                maps.endpoints.insert(key, value, 0).map_err(|e| aya_err("update ENDPOINTS", e))?;
            }
            let free = (0..abi::MAX_LOCAL).find(|slot| maps.local_eps.get(slot, 0).is_ok_and(|l| l.ifindex == 0));
            let slot = free.ok_or_else(|| DatapathError::Endpoint {
                id: ep.id.clone(),
                reason: format!("this host already has {} endpoints, the most weft supports", abi::MAX_LOCAL),
            })?;
            let local = Local { ifindex: link.index, flags: u32::from(flags & abi::EP_HOST_NS) };
            maps.local_eps.set(slot, local, 0).map_err(|e| aya_err("update LOCAL_EPS", e))?;
        }
        let (ifname, addrs, routes) = (ep.ifname.clone(), ep.addrs.clone(), ep.routes.clone());
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
            for net in addrs {
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
            addrs: ep.addrs.iter().map(Ipv4Net::addr).collect(),
            mtu: self.mtu,
        })
    }

    fn remove_local_entries(&self, ifindex: u32) -> Result<(), DatapathError> {
        let mut maps = self.maps.lock().expect("maps lock");
        let keys: Vec<Ip4> = maps
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, ep)| ep.flags & abi::EP_LOCAL != 0 && ep.ifindex == ifindex)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            maps.endpoints.remove(&key).map_err(|e| aya_err("update ENDPOINTS", e))?;
        }
        for slot in 0..abi::MAX_LOCAL {
            if maps.local_eps.get(&slot, 0).is_ok_and(|l| l.ifindex == ifindex) {
                maps.local_eps.set(slot, Local::default(), 0).map_err(|e| aya_err("update LOCAL_EPS", e))?;
            }
        }
        Ok(())
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
        let fail = |reason: &str| DatapathError::Endpoint { id: ep.id.clone(), reason: reason.into() };
        if ep.id.is_empty() || ep.id.len() > 200 || ep.id.contains('\0') {
            return Err(fail("the id must be 1 to 200 characters, without NUL"));
        }
        if ep.addrs.is_empty() {
            return Err(fail("an endpoint needs at least one address"));
        }
        if ep.ifname.is_empty() || ep.ifname.len() > 15 || ep.ifname.contains(['/', ' ', '\0']) {
            return Err(fail("the interface name must be 1 to 15 characters, no '/' or space"));
        }
        let host_name = host_ifname(&ep.id);
        let _ops = self.endpoint_ops.lock().await;
        if let Some(existing) = self.nl.link(&host_name).await? {
            return Err(fail(&format!("already attached (host interface {})", existing.name)));
        }
        let ns = Netns::open(&ep.netns)?;
        let mac = ep.mac.unwrap_or_else(|| mac_for(ep.addrs[0].addr()));
        match self.attach_inner(ep, &host_name, &ns, mac).await {
            Ok(attached) => {
                info!(id = %ep.id, veth = %attached.host_ifname, addrs = ?attached.addrs, "endpoint attached");
                Ok(attached)
            }
            Err(e) => {
                // Nothing half-done stays behind: the veth (and with it the
                // container end and the TCX link) goes, and so do map entries.
                if let Ok(Some(link)) = self.nl.link(&host_name).await {
                    let _ = self.remove_local_entries(link.index);
                    let _ = self.nl.delete_link(link.index).await;
                }
                let _ = std::fs::remove_file(self.link_pin(&host_name));
                Err(e)
            }
        }
    }

    async fn detach_endpoint(&self, id: &str) -> Result<(), DatapathError> {
        let host_name = host_ifname(id);
        let _ops = self.endpoint_ops.lock().await;
        let Some(link) = self.nl.link(&host_name).await? else {
            // Its veth went with the container's namespace: clear what is left.
            self.prune_vanished().await?;
            return Ok(());
        };
        self.remove_local_entries(link.index)?;
        let pin = self.link_pin(&host_name);
        if pin.exists() {
            std::fs::remove_file(&pin).map_err(io_err("unpin", &pin))?;
        }
        self.nl.delete_link(link.index).await?;
        info!(%id, veth = %host_name, "endpoint detached");
        Ok(())
    }

    async fn local_endpoints(&self) -> Result<Vec<AttachedEndpoint>, DatapathError> {
        let links = self.nl.links().await?;
        let entries: Vec<(Ip4, Endpoint)> = {
            let maps = self.maps.lock().expect("maps lock");
            maps.endpoints.iter().filter_map(Result::ok).filter(|(_, e)| e.flags & abi::EP_LOCAL != 0).collect()
        };
        let mut out = Vec::new();
        for link in links {
            let Some(id) = link.alias.as_deref().and_then(|a| a.strip_prefix(ALIAS_PREFIX)) else {
                continue;
            };
            let mine: Vec<&(Ip4, Endpoint)> = entries.iter().filter(|(_, e)| e.ifindex == link.index).collect();
            let mut addrs: Vec<Ipv4Addr> = mine.iter().map(|(k, _)| Ipv4Addr::from(*k)).collect();
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

    async fn set_remote_endpoint(&self, ep: &RemoteEndpoint) -> Result<(), DatapathError> {
        let mut maps = self.maps.lock().expect("maps lock");
        let key = Ip4::from(ep.addr);
        if let Ok(existing) = maps.endpoints.get(&key, 0)
            && existing.flags & abi::EP_LOCAL != 0 {
                return Err(DatapathError::AddressInUse { addr: ep.addr, ifindex: existing.ifindex });
            }
        let value = Endpoint { ifindex: 0, host: ep.host.into(), mac: ep.mac, flags: 0 };
        maps.endpoints.insert(key, value, 0).map_err(|e| aya_err("update ENDPOINTS", e))
    }

    async fn remove_remote_endpoint(&self, addr: Ipv4Addr) -> Result<(), DatapathError> {
        let mut maps = self.maps.lock().expect("maps lock");
        let key = Ip4::from(addr);
        match maps.endpoints.get(&key, 0) {
            Ok(e) if e.flags & abi::EP_LOCAL == 0 => {
                maps.endpoints.remove(&key).map_err(|e| aya_err("update ENDPOINTS", e))
            }
            _ => Ok(()),
        }
    }

    async fn remote_endpoints(&self) -> Result<Vec<RemoteEndpoint>, DatapathError> {
        let maps = self.maps.lock().expect("maps lock");
        Ok(maps
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, e)| e.flags & abi::EP_LOCAL == 0)
            .map(|(k, e)| RemoteEndpoint {
                addr: k.into(),
                mac: e.mac,
                host: e.host.into(),
                learned: e.flags & abi::EP_LEARNED != 0,
            })
            .collect())
    }

    async fn add_peer_host(&self, host: Ipv4Addr) -> Result<(), DatapathError> {
        self.set_peer(host, host).await
    }

    async fn set_next_hop(&self, host: Ipv4Addr, via: Ipv4Addr) -> Result<(), DatapathError> {
        self.set_peer(host, via).await
    }

    async fn remove_peer_host(&self, host: Ipv4Addr) -> Result<(), DatapathError> {
        let mut maps = self.maps.lock().expect("maps lock");
        match maps.peers.remove(&Ip4::from(host)) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(aya_err("update PEERS", e)),
        }
    }

    async fn peer_hosts(&self) -> Result<BTreeMap<Ipv4Addr, Ipv4Addr>, DatapathError> {
        let maps = self.maps.lock().expect("maps lock");
        Ok(maps.peers.iter().filter_map(Result::ok).map(|(k, p)| (k.into(), p.next_hop.into())).collect())
    }

    async fn set_broadcast(&self, trees: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) -> Result<(), DatapathError> {
        let mut maps = self.maps.lock().expect("maps lock");
        let have: Vec<Ip4> = maps.bcast.keys().filter_map(Result::ok).collect();
        for key in have {
            if !trees.contains_key(&Ipv4Addr::from(key)) {
                maps.bcast.remove(&key).map_err(|e| aya_err("update BCAST", e))?;
            }
        }
        for (origin, hosts) in trees {
            let mut value = Bcast::default();
            for (slot, host) in value.hosts.iter_mut().zip(hosts) {
                *slot = Ip4::from(*host);
            }
            value.count = hosts.len().min(abi::MAX_BCAST_FANOUT) as u32;
            if hosts.len() > abi::MAX_BCAST_FANOUT {
                warn!(%origin, children = hosts.len(), "broadcast tree wider than the data path takes; the rest get no multicast from here");
            }
            let key = Ip4::from(*origin);
            if maps.bcast.get(&key, 0).ok() != Some(value) {
                maps.bcast.insert(key, value, 0).map_err(|e| aya_err("update BCAST", e))?;
            }
        }
        Ok(())
    }

    async fn stats(&self) -> Result<Stats, DatapathError> {
        let maps = self.maps.lock().expect("maps lock");
        read_stats(&maps.counters)
    }

    async fn reset(&self) -> Result<(), DatapathError> {
        for ep in self.local_endpoints().await? {
            self.nl.delete_link(ep.host_ifindex).await?;
        }
        self.nl.delete_link(self.vxlan.index).await?;
        // Unpinning detaches the links (no process holds them) and frees the maps.
        remove_pins(&self.pin_dir)?;
        info!(pins = %self.pin_dir.display(), "data path removed");
        Ok(())
    }
}

/// Sums the per-CPU counters.
pub fn read_stats(counters: &PerCpuArray<MapData, Counter>) -> Result<Stats, DatapathError> {
    let sum = |index: u32| -> Result<Count, DatapathError> {
        let values = counters.get(&index, 0).map_err(|e| aya_err("read COUNTERS", e))?;
        Ok(values.iter().fold(Count::default(), |acc, c| Count {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    };
    let mut stats = Stats::default();
    for (index, name) in abi::PATHS {
        stats.paths.insert(name, sum(*index)?);
    }
    for (code, name) in abi::DROP_REASONS {
        let count = sum(abi::DROP_BASE + code)?;
        if count.packets > 0 {
            stats.drops.insert(name, count);
        }
    }
    Ok(stats)
}

/// The interface given, or the one of the default route.
async fn resolve_underlay(nl: &Netlink, name: Option<&str>) -> Result<Link, DatapathError> {
    if let Some(name) = name {
        return match nl.link(name).await? {
            Some(link) => Ok(link),
            None => {
                let available: Vec<String> =
                    nl.links().await?.into_iter().map(|l| l.name).filter(|n| n != "lo").collect();
                Err(DatapathError::UnknownUnderlay { name: name.into(), available: available.join(", ") })
            }
        };
    }
    let default = nl
        .routes()
        .await?
        .into_iter()
        .find(|r| r.dst.prefix_len() == 0 && r.table == 254 && r.oif.is_some())
        .ok_or(DatapathError::NoUnderlay)?;
    nl.link_by_index(default.oif.expect("filtered")).await?.ok_or(DatapathError::NoUnderlay)
}

/// Pins made by an agent with another ABI are not adoptable: remove them.
fn check_abi(pin_dir: &Path) -> Result<(), DatapathError> {
    let pin = pin_dir.join("CONFIG");
    if !pin.exists() {
        return Ok(());
    }
    let version = MapData::from_pin(&pin)
        .ok()
        .and_then(|m| Array::<MapData, Config>::try_from(Map::Array(m)).ok())
        .and_then(|a| a.get(&0, 0).ok())
        .map(|c| c.abi_version);
    if version == Some(abi::ABI_VERSION) || version == Some(0) {
        return Ok(());
    }
    warn!(pins = %pin_dir.display(), found = ?version, want = abi::ABI_VERSION,
        "pinned data path has another ABI version: replacing it (traffic pauses briefly)");
    remove_pins(pin_dir)
}

/// Loads (or adopts) the three programs, pinned as `prog_<name>_<hash>`.
fn load_programs(pin_dir: &Path) -> Result<Programs, DatapathError> {
    let load = |name: &str, prog_name: &str, object: &[u8]| -> Result<SchedClassifier, DatapathError> {
        let pin = pin_dir.join(format!("prog_{name}_{:016x}", fnv1a(object)));
        if !pin.exists() {
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(pin_dir)
                .load(object)
                .map_err(|e| aya_err(&format!("load {name} program"), e))?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(prog_name)
                .ok_or_else(|| DatapathError::Bpf { op: format!("load {name}"), detail: "program missing".into() })?
                .try_into()
                .map_err(|e| aya_err(&format!("load {name} program"), e))?;
            prog.load().map_err(|e| aya_err(&format!("verify {name} program"), e))?;
            prog.pin(&pin).map_err(|e| aya_err(&format!("pin {name} program"), e))?;
            debug!(program = name, pin = %pin.display(), "loaded");
        }
        let prog = SchedClassifier::from_pin(&pin).map_err(|e| aya_err(&format!("open {name} program"), e))?;
        // Programs of older builds go once nothing uses them: their links are
        // switched to this one by attach().
        let prefix = format!("prog_{name}_");
        if let Ok(entries) = std::fs::read_dir(pin_dir) {
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if file.starts_with(&prefix) && entry.path() != pin {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(prog)
    };
    Ok(Programs {
        endpoint: load("endpoint", "weft_endpoint", objects::ENDPOINT)?,
        overlay: load("overlay", "weft_overlay", objects::OVERLAY)?,
        underlay: load("underlay", "weft_underlay", objects::UNDERLAY)?,
    })
}

fn open_map(pin_dir: &Path, name: &str) -> Result<MapData, DatapathError> {
    MapData::from_pin(pin_dir.join(name)).map_err(|e| aya_err(&format!("open map {name}"), e))
}

fn open_maps(pin_dir: &Path) -> Result<Maps, DatapathError> {
    let wrap = |name: &'static str| bpf_err(format!("open map {name}"));
    Ok(Maps {
        endpoints: HashMap::try_from(Map::HashMap(open_map(pin_dir, "ENDPOINTS")?))
            .map_err(|e| wrap("ENDPOINTS")(&e))?,
        peers: HashMap::try_from(Map::HashMap(open_map(pin_dir, "PEERS")?)).map_err(|e| wrap("PEERS")(&e))?,
        underlay_ips: HashMap::try_from(Map::HashMap(open_map(pin_dir, "UNDERLAY_IPS")?))
            .map_err(|e| wrap("UNDERLAY_IPS")(&e))?,
        local_eps: Array::try_from(Map::Array(open_map(pin_dir, "LOCAL_EPS")?)).map_err(|e| wrap("LOCAL_EPS")(&e))?,
        bcast: HashMap::try_from(Map::HashMap(open_map(pin_dir, "BCAST")?)).map_err(|e| wrap("BCAST")(&e))?,
        counters: PerCpuArray::try_from(Map::PerCpuArray(open_map(pin_dir, "COUNTERS")?))
            .map_err(|e| wrap("COUNTERS")(&e))?,
    })
}

fn write_config(pin_dir: &Path, opts: &EbpfOptions, local_ip: Ipv4Addr, vxlan_ifindex: u32) -> Result<(), DatapathError> {
    let mut config: Array<MapData, Config> = Array::try_from(Map::Array(open_map(pin_dir, "CONFIG")?))
        .map_err(|e| bpf_err("open map CONFIG")(&e))?;
    let value = Config {
        abi_version: abi::ABI_VERSION,
        vni: opts.vni,
        local_ip: local_ip.into(),
        vxlan_ifindex,
        vxlan_port_be: opts.port.to_be(),
        flags: 0,
        _pad: 0,
    };
    config.set(0, value, 0).map_err(|e| aya_err("write CONFIG", e))
}

/// Makes sure `prog` runs on `ifname`'s ingress through a link pinned at `pin`:
/// adopts a live pinned link (switching it to `prog` atomically if it runs an
/// older build), replaces a dead one, or creates one.
fn attach(prog: &mut SchedClassifier, ifname: &str, pin: &Path) -> Result<(), DatapathError> {
    let prog_id = prog.info().map_err(|e| aya_err("program info", e))?.id();
    if let Ok(pinned) = PinnedLink::from_pin(pin) {
        let fd_link = FdLink::from(pinned);
        let link_prog = fd_link.info().map(|i| i.program_id()).ok();
        let attached: Vec<u32> = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
            .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if let Some(link_prog) = link_prog.filter(|id| attached.contains(id)) {
            if link_prog != prog_id {
                let link = SchedClassifierLink::try_from(fd_link).map_err(|e| aya_err("adopt link", e))?;
                let id = prog.attach_to_link(link).map_err(|e| aya_err(&format!("update link on {ifname}"), e))?;
                // The pin keeps the (same, updated) link; our handle may go.
                drop(prog.take_link(id));
                info!(%ifname, "switched to the new program build");
            }
            return Ok(());
        }
        // The device went away (and came back): the pinned link is defunct.
        std::fs::remove_file(pin).map_err(io_err("unpin", pin))?;
    }
    let id = prog
        .attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .map_err(|e| aya_err(&format!("attach to {ifname}"), e))?;
    let link = prog.take_link(id).map_err(|e| aya_err("take link", e))?;
    let fd_link = FdLink::try_from(link).map_err(|e| aya_err("link fd", e))?;
    fd_link.pin(pin).map_err(|e| aya_err(&format!("pin link of {ifname}"), e))?;
    Ok(())
}

/// Endpoints speak IPv4 only: without IPv6 on the veths there is no router
/// solicitation and DAD noise for the programs to drop.
fn disable_ipv6(ifname: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        debug!(%path, error = %e, "could not disable IPv6");
    }
}

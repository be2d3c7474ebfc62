//! rtnetlink helpers every backend needs: links (veth, VXLAN), addresses, routes.
//! A [`Netlink`] is bound to the namespace it was opened in.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use super::netns::Netns;

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0} (weft needs root / CAP_NET_ADMIN)")]
    Connect(#[source] std::io::Error),
    #[error("{op}: {source}")]
    Request {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no network interface named {0}")]
    NoSuchLink(String),
    #[error("{name} exists but is not {expected}; remove it or choose another name")]
    Conflict { name: String, expected: String },
}

type Result<T> = std::result::Result<T, NetlinkError>;

/// Whether Linux takes `name` as an interface name (the kernel's
/// `dev_valid_name`): 1 to 15 bytes (IFNAMSIZ less the NUL), not `.` or `..`,
/// no `/`, `:`, whitespace or NUL.
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

fn req(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Request { op, source }
}

/// A cls_bpf filter on a clsact qdisc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfFilter {
    pub priority: u16,
    pub handle: u32,
    /// The program's name as the filter carries it.
    pub name: Option<String>,
    pub prog_id: Option<u32>,
}

/// The facts about a link that weft uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// The largest MTU the device takes (`IFLA_MAX_MTU`), when the kernel says.
    pub max_mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub kind: Option<InfoKind>,
    pub alias: Option<String>,
    pub up: bool,
    /// VXLAN only: (UDP port, external/collect-metadata mode).
    pub vxlan: Option<(u16, bool)>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mtu: 0,
            max_mtu: None,
            mac: None,
            kind: None,
            alias: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            vxlan: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                // 0 means "no limit known" (devices that do not set max_mtu).
                LinkAttribute::MaxMtu(m) if *m > 0 => link.max_mtu = Some(*m),
                LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                let port = v.iter().find_map(|x| match x {
                                    InfoVxlan::Port(p) => Some(*p),
                                    _ => None,
                                });
                                let external = v.iter().any(|x| matches!(x, InfoVxlan::CollectMetadata(true)));
                                link.vxlan = Some((port.unwrap_or(0), external));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// An IPv4 route of the main table, as far as weft cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    /// The source address the kernel prefers on this route.
    pub prefsrc: Option<Ipv4Addr>,
    pub table: u32,
    pub kind: RouteType,
}

/// A netlink connection bound to the namespace it was opened in.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
    /// One dump at a time: the kernel answers a second dump on a socket that is
    /// still dumping with EBUSY, and this connection is shared by every task.
    dumping: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Netlink {
    /// Opens a connection in the calling thread's namespace; its I/O task runs on
    /// the current tokio runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Netlink { handle, dumping: Default::default() })
    }

    /// The link called `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for a name that does not exist.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(req(format!("look up link {name}"))(e)),
        }
    }

    /// The link called `name`, or a clear error.
    pub async fn require_link(&self, name: &str) -> Result<Link> {
        self.link(name).await?.ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))
    }

    /// The link with ifindex `index`, if any.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(req(format!("look up link {index}"))(e)),
        }
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let _one_dump = self.dumping.lock().await;
        let msgs: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(req("list links"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// The cls_bpf filters on link `index`'s clsact ingress (none if it has no
    /// clsact qdisc or is gone).
    pub async fn ingress_bpf_filters(&self, index: u32) -> Result<Vec<BpfFilter>> {
        use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
        let _one_dump = self.dumping.lock().await;
        let Ok(index) = i32::try_from(index) else { return Ok(Vec::new()) };
        let msgs: Vec<rtnetlink::packet_route::tc::TcMessage> =
            match self.handle.traffic_filter(index).get().ingress().execute().try_collect().await {
                Ok(msgs) => msgs,
                // No such device, or no clsact qdisc on it: no filters.
                Err(rtnetlink::Error::NetlinkError(e))
                    if [-libc::ENODEV, -libc::EINVAL, -libc::ENOENT].contains(&e.raw_code()) =>
                {
                    return Ok(Vec::new());
                }
                Err(e) => return Err(req(format!("list TC filters of link {index}"))(e)),
            };
        let mut out = Vec::new();
        for msg in msgs {
            let mut filter = BpfFilter {
                priority: (msg.header.info >> 16) as u16,
                handle: u32::from(msg.header.handle),
                name: None,
                prog_id: None,
            };
            let mut is_bpf = false;
            for attr in &msg.attributes {
                match attr {
                    TcAttribute::Kind(kind) => is_bpf = kind == "bpf",
                    TcAttribute::Options(opts) => {
                        for opt in opts {
                            match opt {
                                TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => filter.name = Some(n.clone()),
                                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.prog_id = Some(*id),
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            // The dump also lists each priority's (handle 0) head entry.
            if is_bpf && filter.handle != 0 {
                out.push(filter);
            }
        }
        Ok(out)
    }

    /// Makes sure an external-mode (collect-metadata) VXLAN device called `name`
    /// exists on `port`, up, with `mtu`; returns it. An existing device of another
    /// kind or configuration is an error, not silently replaced.
    pub async fn ensure_vxlan(&self, name: &str, port: u16, mtu: u32) -> Result<Link> {
        if let Some(link) = self.link(name).await? {
            if link.kind != Some(InfoKind::Vxlan) || link.vxlan != Some((port, true)) {
                return Err(NetlinkError::Conflict {
                    name: name.into(),
                    expected: format!("an external-mode VXLAN device on UDP port {port}"),
                });
            }
            if link.mtu != mtu || !link.up {
                self.set_link(LinkUnspec::new_with_index(link.index).mtu(mtu).up())
                    .await?;
            }
            return self.require_link(name).await;
        }
        // VNI 0 is ignored in external mode: the programs choose it per packet.
        let msg = LinkVxlan::new(name, 0)
            .port(port)
            .collect_metadata(true)
            .learning(false)
            .mtu(mtu)
            .up()
            .build();
        self.handle.link().add(msg).execute().await.map_err(req(format!("create VXLAN device {name}")))?;
        self.require_link(name).await
    }

    /// Creates a veth pair: `host_name` here, `peer_name` directly inside `peer_ns`
    /// (so its name cannot clash with anything in this namespace), both with
    /// `mtu`, the peer with `peer_mac`; the host end is up, the peer is brought up
    /// by the caller (a veth cannot open before its peer is registered: ENOTCONN).
    /// `alias` labels the host end.
    pub async fn create_veth(
        &self,
        host_name: &str,
        alias: &str,
        peer_name: &str,
        peer_ns: &Netns,
        peer_mac: [u8; 6],
        mtu: u32,
    ) -> Result<Link> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .mtu(mtu)
            .address(peer_mac.to_vec())
            .setns_by_fd(peer_ns.file().as_raw_fd())
            .build();
        let msg = LinkVeth::new(host_name, peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req(format!("create veth {host_name} <-> {peer_name} in {}", peer_ns.path().display())))?;
        let link = self.require_link(host_name).await?;
        if let Err(e) = self.set_link(LinkUnspec::new_with_index(link.index).alias(alias)).await {
            let _ = self.delete_link(link.index).await;
            return Err(e);
        }
        self.require_link(host_name).await
    }

    /// Applies a link change.
    pub async fn set_link(&self, builder: LinkMessageBuilder<LinkUnspec>) -> Result<()> {
        let msg = builder.build();
        let index = msg.header.index;
        self.handle.link().set(msg).execute().await.map_err(req(format!("change link {index}")))
    }

    /// Sets a link up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.set_link(LinkUnspec::new_with_index(index).up()).await
    }

    /// Deletes a link; a link that is already gone is fine.
    pub async fn delete_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(req(format!("delete link {index}"))(e)),
        }
    }

    /// Adds an IPv4 address (with its prefix) to a link; an existing one is fine.
    pub async fn add_address(&self, index: u32, net: Ipv4Net) -> Result<()> {
        match self.handle.address().add(index, IpAddr::V4(net.addr()), net.prefix_len()).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(req(format!("add address {net} to link {index}"))(e)),
        }
    }

    /// The IPv4 addresses of a link, with prefixes.
    pub async fn ipv4_addresses(&self, index: u32) -> Result<Vec<Ipv4Net>> {
        let _one_dump = self.dumping.lock().await;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(req(format!("list addresses of link {index}")))?;
        let mut out = Vec::new();
        for msg in msgs {
            if msg.header.index != index {
                continue;
            }
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(a)) = attr
                    && let Ok(net) = Ipv4Net::new(*a, msg.header.prefix_len) {
                        out.push(net);
                    }
            }
        }
        out.dedup();
        Ok(out)
    }

    /// Adds a route to `dst` out of link `oif` (scope link); an existing one is fine.
    pub async fn add_route(&self, dst: Ipv4Net, oif: u32) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(oif)
            .scope(rtnetlink::packet_route::route::RouteScope::Link)
            .build();
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(req(format!("add route {dst} via link {oif}"))(e)),
        }
    }

    /// The IPv4 routes of every table.
    pub async fn routes(&self) -> Result<Vec<Route>> {
        let _one_dump = self.dumping.lock().await;
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(req("list routes"))?;
        Ok(msgs.iter().filter_map(route_from_message).collect())
    }

    /// The route the kernel would use to reach `dst` (`ip route get`).
    pub async fn route_to(&self, dst: Ipv4Addr) -> Result<Option<Route>> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, 32).build();
        let mut routes = self.handle.route().get(msg).execute();
        match routes.try_next().await {
            Ok(Some(m)) => Ok(route_from_message(&m)),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::ENETUNREACH || e.raw_code() == -libc::EHOSTUNREACH =>
            {
                Ok(None)
            }
            Err(e) => Err(req(format!("look up the route to {dst}"))(e)),
        }
    }
}

fn route_from_message(msg: &RouteMessage) -> Option<Route> {
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut oif = None;
    let mut gateway = None;
    let mut prefsrc = None;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::PrefSource(RouteAddress::Inet(p)) => prefsrc = Some(*p),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if msg.header.address_family != rtnetlink::packet_route::AddressFamily::Inet {
        return None;
    }
    let dst = Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?;
    Some(Route { dst, oif, gateway, prefsrc, table, kind: msg.header.kind })
}

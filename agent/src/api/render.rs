//! Human-readable status, as `weft status ...` prints it (Weave's layout).

use std::fmt::Write;

use super::AgentInfo;
use crate::datapath::{AttachedEndpoint, Datapath, Stats, format_mac};
use crate::endpoints::table::PeerEndpoints;
use crate::mesh::{ConnState, MeshStatus, PeerName};

fn who(name: PeerName, nickname: Option<&str>) -> String {
    match nickname {
        Some(n) => format!("{name}({n})"),
        None => name.to_string(),
    }
}

/// `weft status`.
pub fn status(s: &MeshStatus, info: &AgentInfo, dp: &dyn Datapath, stats: Option<&Stats>) -> String {
    let mut out = String::new();
    let established = s.connections.iter().filter(|c| c.state == ConnState::Established).count();
    let failed = s.connections.iter().filter(|c| c.state == ConnState::Failed).count();
    let links: usize = s.peers.iter().map(|p| p.connections.iter().filter(|c| c.established).count()).sum();
    let name = s.name.map(|n| who(n, Some(&s.nickname))).unwrap_or_default();
    let rows: Vec<(&str, String)> = vec![
        ("Version", format!("weft {}", info.version)),
        ("", String::new()),
        ("Service", "router".into()),
        ("Protocol", format!("weft {}", crate::mesh::PROTOCOL_VERSION)),
        ("Name", name),
        ("Encryption", if s.encrypted { "enabled".into() } else { "disabled".into() }),
        ("PeerDiscovery", if info.discovery { "enabled".into() } else { "disabled".into() }),
        ("Targets", s.targets.len().to_string()),
        (
            "Connections",
            format!("{} ({established} established, {failed} failed)", s.connections.len()),
        ),
        ("Peers", format!("{} (with {links} established connections)", s.peers.len())),
        ("TrustedSubnets", if info.trusted_subnets.is_empty() {
            "none".into()
        } else {
            info.trusted_subnets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        }),
        ("", String::new()),
        ("Service", "datapath".into()),
        ("Mode", format!("{} ({} encapsulation, {} attach)", dp.name(), info.encap, info.tc_attach)),
        ("Kernel", info.kernel.clone()),
        ("Underlay", format!("{} {}", info.underlay, dp.local_address())),
        ("EndpointMTU", dp.endpoint_mtu().to_string()),
        ("Range", info.ipalloc_range.to_string()),
    ];
    for (k, v) in rows {
        if k.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "{k:>15}: {v}");
        }
    }
    if let Some(st) = stats {
        let paths: Vec<String> = st.paths.iter().map(|(k, c)| format!("{k} {}", c.packets)).collect();
        let _ = writeln!(out, "{:>15}: {}", "Packets", paths.join(", "));
        let drops: u64 = st.drops.values().map(|c| c.packets).sum();
        let _ = writeln!(out, "{:>15}: {drops}", "Dropped");
    }
    out
}

/// `weft status peers`.
pub fn peers(s: &MeshStatus) -> String {
    let mut out = String::new();
    for p in &s.peers {
        let _ = writeln!(out, "{}", who(p.name, Some(&p.nickname)));
        for c in &p.connections {
            let arrow = if c.outbound { "->" } else { "<-" };
            let state = if c.established { "established" } else { "pending" };
            let _ = writeln!(out, "   {arrow} {:<21} {:<40} {state}", c.addr, who(c.name, c.nickname.as_deref()));
        }
    }
    out
}

/// `weft status connections`.
pub fn connections(s: &MeshStatus) -> String {
    let mut out = String::new();
    for c in &s.connections {
        let arrow = if c.outbound { "->" } else { "<-" };
        let state = match c.state {
            ConnState::Established => "established",
            ConnState::Connecting => "connecting",
            ConnState::Failed => "failed",
        };
        let peer = c.peer.map(|p| who(p, c.nickname.as_deref())).unwrap_or_default();
        let _ = writeln!(out, "{arrow} {:<21} {state:<12} {:<12} {peer}", c.addr, c.info);
    }
    out
}

/// `weft status targets`.
pub fn targets(s: &MeshStatus) -> String {
    s.targets.iter().map(|t| format!("{t}\n")).collect()
}

/// `weft status endpoints`: the gossiped endpoint table.
pub fn endpoint_table(entries: &[PeerEndpoints], s: &MeshStatus) -> String {
    let mut out = String::new();
    for e in entries {
        let nick = s.peers.iter().find(|p| p.name == e.peer).map(|p| p.nickname.as_str());
        for ep in &e.endpoints {
            let _ = writeln!(out, "{:<16} {}  {}", ep.addr, format_mac(&ep.mac), who(e.peer, nick));
        }
    }
    out
}

/// `weft status datapath`: counters per path and drop reason.
pub fn datapath(st: &Stats) -> String {
    let mut out = String::from("PATH                  PACKETS        BYTES\n");
    for (k, c) in &st.paths {
        let _ = writeln!(out, "{k:<20} {:>9} {:>12}", c.packets, c.bytes);
    }
    if !st.drops.is_empty() {
        out.push_str("\nDROPPED               PACKETS        BYTES\n");
        for (k, c) in &st.drops {
            let _ = writeln!(out, "{k:<20} {:>9} {:>12}", c.packets, c.bytes);
        }
    }
    out
}

/// `weft ps`: id, MAC, addresses (Weave's layout).
/// `weft ps`: one line per endpoint, as Weave printed it (a container's short
/// id, MAC, addresses), plus the Docker name when there is one.
pub fn ps(eps: &[AttachedEndpoint], docker_names: &std::collections::HashMap<String, String>) -> String {
    let mut out = String::new();
    for e in eps {
        let addrs: Vec<String> = e.addrs.iter().map(ToString::to_string).collect();
        let _ = write!(out, "{} {} {}", crate::docker::short(&e.id), format_mac(&e.mac), addrs.join(" "));
        match docker_names.get(&e.id) {
            Some(name) => {
                let _ = writeln!(out, " {name}");
            }
            None => out.push('\n'),
        }
    }
    out
}

/// `weft status ipam`.
pub fn ipam(s: &crate::ipam::IpamStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:>15}: {}", "Range", s.range);
    let _ = writeln!(out, "{:>15}: {}", "DefaultSubnet", s.default_subnet);
    if !s.waiting_for.is_empty() {
        let (known, quorum) = s.consensus.unwrap_or((0, 0));
        let _ = writeln!(out, "{:>15}: waiting for {} ({known} voters known, {quorum} needed)", "Status", s.waiting_for);
    } else {
        let _ = writeln!(out, "{:>15}: ready", "Status");
    }
    let _ = writeln!(out, "{:>15}: {} here", "Allocated", s.used);
    let _ = writeln!(out, "{:>15}: {:.1}%", "Unreachable", s.unreachable_percent);
    if let Some(c) = &s.conflict {
        let _ = writeln!(out, "{:>15}: {c}", "Conflict");
    }
    if !s.peers.is_empty() {
        let _ = writeln!(out, "\n{:<40} {:>10} {:>10} {:>10}  REACHABLE", "PEER", "OWNED", "USED", "FREE");
        for p in &s.peers {
            let _ = writeln!(
                out,
                "{:<40} {:>10} {:>10} {:>10}  {}",
                who(p.peer, p.nickname.as_deref()),
                p.owned,
                p.owned.saturating_sub(p.free),
                p.free,
                if p.reachable { "yes" } else { "no" }
            );
        }
    }
    out
}

/// `weft status dns`.
pub fn dns(dns: &crate::dns::DnsHandle, s: &MeshStatus) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let c = dns.counters();
    let _ = writeln!(out, "{:>15}: {}", "Domain", dns.domain());
    let _ = writeln!(out, "{:>15}: {}", "Entries", dns.entries());
    let _ = writeln!(
        out,
        "{:>15}: {} answered, {} NXDOMAIN, {} forwarded, {} failed",
        "Queries",
        c.answered.load(Relaxed),
        c.nxdomain.load(Relaxed),
        c.forwarded.load(Relaxed),
        c.failed.load(Relaxed)
    );
    out.push('\n');
    for k in dns.names() {
        let nick = s.peers.iter().find(|p| p.name == k.origin).map(|p| p.nickname.as_str());
        let _ = writeln!(out, "{:<32} {:<16} {:<24} {}", k.name, k.addr, k.container, who(k.origin, nick));
    }
    out
}

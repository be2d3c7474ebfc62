//! Removing a host's data path from the kernel: by a running agent
//! (`Datapath::reset`) and with no agent at all ([`reset_host`], for
//! `weft reset --force`). Both go through [`remove_host`].
//!
//! Only weft's own things are removed, recognised by what only weft makes:
//! veths whose alias is `weft:<endpoint id>` (their container ends, the host's
//! own `weft` interface among them, go with them), an external-mode VXLAN device
//! of the configured name, and this host's pin directory — never the pin root or
//! another host's directory. Unpinning detaches the TCX links (on the underlay,
//! in direct mode), since no process holds them; weft's clsact filters (kernels
//! without TCX) are deleted by weft's priority and handle. The clsact qdisc
//! stays: it may serve other programs, and does nothing empty.

use std::fmt;
use std::path::PathBuf;

use rtnetlink::packet_route::link::InfoKind;
use serde::Serialize;
use tracing::{info, warn};

use super::{clsact, load};
use super::options::EbpfOptions;
use super::pins::PinDir;
use super::start::is_weft_vxlan;
use super::endpoint_id;
use crate::datapath::DatapathError;
use crate::datapath::netlink::Netlink;

/// An endpoint whose veth was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemovedEndpoint {
    /// The endpoint id (from the veth's alias).
    pub id: String,
    /// The host-side veth.
    pub host_ifname: String,
}

/// What a reset removed. Empty when there was nothing of weft's to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResetReport {
    /// Endpoints whose veth pairs were deleted.
    pub endpoints: Vec<RemovedEndpoint>,
    /// The VXLAN device, if it was deleted.
    pub vxlan: Option<String>,
    /// The pin directory, if it was removed.
    pub pin_dir: Option<PathBuf>,
    /// Devices that still ran a pinned link until the pins went (the underlay).
    pub detached: Vec<String>,
    /// Devices with weft's names that are not weft's, left as they are.
    pub left_alone: Vec<String>,
}

impl ResetReport {
    /// True if nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.vxlan.is_none() && self.pin_dir.is_none() && self.detached.is_empty()
    }
}

impl fmt::Display for ResetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.endpoints.is_empty() {
            let names: Vec<String> = self.endpoints.iter().map(|e| format!("{} ({})", e.id, e.host_ifname)).collect();
            parts.push(format!("endpoints {}", names.join(", ")));
        }
        if let Some(vxlan) = &self.vxlan {
            parts.push(format!("VXLAN device {vxlan}"));
        }
        if let Some(dir) = &self.pin_dir {
            parts.push(format!("pins {}", dir.display()));
        }
        if !self.detached.is_empty() {
            parts.push(format!("programs on {}", self.detached.join(", ")));
        }
        if parts.is_empty() {
            write!(f, "nothing of weft's was here")?;
        } else {
            write!(f, "removed {}", parts.join("; "))?;
        }
        if !self.left_alone.is_empty() {
            write!(f, "; left alone (not weft's): {}", self.left_alone.join(", "))?;
        }
        Ok(())
    }
}

/// Removes this host's data path with no agent running: endpoint veths, the
/// VXLAN device, the pin directory (which detaches the TCX links). Works in the
/// calling thread's network namespace, which must be the host's. Idempotent: a
/// second call finds nothing and returns an empty report. Removes only weft's
/// own things (see the module docs); other hosts' pin directories stay.
pub async fn reset_host(opts: &EbpfOptions) -> Result<ResetReport, DatapathError> {
    opts.check()?;
    if !nix::unistd::geteuid().is_root() {
        return Err(DatapathError::NotPermitted { what: "removing the data path".into() });
    }
    let nl = Netlink::connect()?;
    let report = remove_host(&nl, &PinDir::new(opts.pin_dir()), &opts.vxlan_name).await?;
    info!(host = %opts.host, %report, "data path reset");
    Ok(report)
}

/// Removes the endpoints, the VXLAN device `vxlan_name` and the pins of one host.
pub(super) async fn remove_host(nl: &Netlink, pins: &PinDir, vxlan_name: &str) -> Result<ResetReport, DatapathError> {
    let mut report = ResetReport::default();
    for link in nl.links().await? {
        let Some(id) = endpoint_id(&link) else { continue };
        if link.kind != Some(InfoKind::Veth) {
            warn!(device = %link.name, alias = ?link.alias, "has a weft alias but is no veth: leaving it");
            report.left_alone.push(link.name.clone());
            continue;
        }
        // The container end (or the host's `weft` interface) goes with it.
        nl.delete_link(link.index).await?;
        report.endpoints.push(RemovedEndpoint { id: id.to_string(), host_ifname: link.name.clone() });
    }
    match nl.link(vxlan_name).await? {
        Some(link) if is_weft_vxlan(&link) => {
            nl.delete_link(link.index).await?;
            report.vxlan = Some(link.name);
        }
        Some(link) => {
            warn!(device = %link.name, "is not an external-mode VXLAN device, so not weft's: leaving it");
            report.left_alone.push(link.name);
        }
        None => {}
    }
    // What still runs now is on devices weft did not make (the underlay):
    // note it, so as to return only once the kernel has let go.
    let running: Vec<(String, u32)> = pins
        .link_pins(vxlan_name)
        .into_iter()
        .filter_map(|l| Some((l.device, load::pinned_link_program(&l.pin)?)))
        .filter(|(device, prog)| load::tcx_ingress(device).contains(prog))
        .collect();
    // Attached through clsact (kernels without TCX, or --tc-attach clsact):
    // the programs are cls_bpf filters, not links, and unpinning does not
    // remove them. They go by weft's priority and handle; the clsact qdisc
    // stays (see clsact.rs).
    let filtered = clsact::remove_filters(nl, None).await?;
    if pins.remove()? {
        report.pin_dir = Some(pins.path().to_path_buf());
    }
    load::wait_detached(&running).await;
    report.detached = running.into_iter().map(|(device, _)| device).collect();
    for device in filtered {
        if !report.detached.contains(&device) {
            report.detached.push(device);
        }
    }
    Ok(report)
}

//! The clsact attachment, for kernels without TCX (< 6.6): the same programs as
//! cls_bpf filters (direct action) on a device's clsact ingress, added through
//! netlink at weft's own priority and handle. Choosing between TCX and clsact
//! (a probe, not a version string) and the probe for the helpers the programs
//! need are here too.
//!
//! A filter lives as long as its device, not as long as the agent: like a pinned
//! TCX link, it keeps forwarding with no agent. A starting agent replaces the
//! filter at weft's priority and handle in place (one `RTM_NEWTFILTER` without
//! `NLM_F_EXCL`: cls_bpf swaps the program under RCU, no packet is lost) and
//! adds it only if there is none, so there is never a second one. weft's filters
//! are recognised by that priority and handle (and a `weft_` program name);
//! others' filters are never touched.
//!
//! The clsact qdisc itself is added when missing and never removed: other
//! programs may use it, an empty one does nothing, and the kernel removes it
//! with its device.
//!
//! Must not touch: pins, maps, devices.

use aya::programs::links::Link as _;
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{ProgramType, SchedClassifier, TcAttachType};
use aya::sys::{BpfHelper, is_helper_supported};
use tracing::{debug, info};

use super::options::{AttachMethod, TcAttach};
use crate::datapath::DatapathError;
use crate::datapath::netlink::Netlink;

/// weft's filter priority: first, as TCX's `LinkOrder::first()`.
pub const PRIORITY: u16 = 1;

/// weft's filter handle: "weft" in ASCII.
pub const HANDLE: u32 = 0x7765_6674;

/// The program names weft's filters carry.
const NAME_PREFIX: &str = "weft_";

/// Whether the kernel has TCX: a TCX query on `lo` fails (EINVAL) where the
/// attach type is unknown.
pub(super) fn has_tcx() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

/// `uname -r`, for messages.
pub(super) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|r| r.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// What the start's probes found, for `weft status`: the kernel release, and
/// whether it has TCX (the helpers it needs it has, or the start failed).
pub(super) fn kernel_summary() -> String {
    let tcx = if has_tcx() { "TCX available" } else { "no TCX" };
    format!("{} ({tcx}; bpf_redirect_peer, bpf_redirect_neigh found)", kernel_release())
}

/// What `asked` means on this kernel; `--tc-attach tcx` where there is no TCX is
/// refused.
pub(super) fn resolve(asked: TcAttach) -> Result<AttachMethod, DatapathError> {
    let method = match asked {
        TcAttach::Clsact => AttachMethod::Clsact,
        TcAttach::Tcx | TcAttach::Auto if has_tcx() => AttachMethod::Tcx,
        TcAttach::Auto => AttachMethod::Clsact,
        TcAttach::Tcx => {
            return Err(DatapathError::KernelTooOld {
                kernel: kernel_release(),
                feature: "TCX".into(),
                user: "--tc-attach tcx".into(),
                needs: "6.6",
                hint: "; use --tc-attach auto or clsact".into(),
            });
        }
    };
    debug!(?asked, %method, "TC attach method");
    Ok(method)
}

/// The helpers weft's programs call that are newer than the rest (all else is
/// in 4.x kernels): the newest one sets the oldest kernel weft runs on.
const NEWEST_HELPERS: [(BpfHelper, &str, &str); 2] = [
    (BpfHelper::BPF_FUNC_redirect_neigh, "bpf_redirect_neigh", "5.10"),
    (BpfHelper::BPF_FUNC_redirect_peer, "bpf_redirect_peer", "5.10"),
];

/// Refuses a kernel whose TC programs lack a helper weft's programs call, with
/// a message that says so (not the verifier's "unknown func" later). A probe
/// that cannot run says nothing: loading the programs tells then.
pub(super) fn check_helpers() -> Result<(), DatapathError> {
    for (helper, name, needs) in NEWEST_HELPERS {
        if let Ok(false) = is_helper_supported(ProgramType::SchedClassifier, helper) {
            return Err(DatapathError::KernelTooOld {
                kernel: kernel_release(),
                feature: format!("the {name} helper"),
                user: "weft's eBPF data path".into(),
                needs,
                hint: String::new(),
            });
        }
    }
    Ok(())
}

fn weft_options() -> TcAttachOptions {
    TcAttachOptions::Netlink(NlOptions { priority: PRIORITY, handle: TcHandle::from(HANDLE), ..Default::default() })
}

/// Makes sure `prog` runs on `ifname`'s clsact ingress as weft's filter:
/// replaces the program of the filter there (atomically), or adds the filter
/// (and the qdisc, if missing).
pub(super) fn attach(prog: &mut SchedClassifier, ifname: &str) -> Result<(), DatapathError> {
    let existing = SchedClassifierLink::attached(ifname, TcAttachType::Ingress, PRIORITY, TcHandle::from(HANDLE), None)
        .map_err(|e| DatapathError::bpf(format!("attach to {ifname}"), e))?;
    // Without NLM_F_CREATE: fails if there is no such filter yet.
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        Err(replace_error) => {
            // An existing qdisc is an error here too (EEXIST); the attach says
            // whether there is none.
            let qdisc = tc::qdisc_add_clsact(ifname);
            prog.attach_with_options(ifname, TcAttachType::Ingress, weft_options()).map_err(|e| {
                debug!(%ifname, %replace_error, ?qdisc, "replacing weft's filter failed too");
                DatapathError::bpf(format!("attach a clsact filter to {ifname}"), e)
            })?
        }
    };
    // The filter outlives this process: the handle must not detach it on drop.
    let link = prog.take_link(id).map_err(|e| DatapathError::bpf("take link", e))?;
    std::mem::forget(link);
    Ok(())
}

/// Removes weft's filter from `ifname`'s clsact ingress, if there is one.
/// Returns whether there was.
pub(super) fn detach(ifname: &str) -> bool {
    SchedClassifierLink::attached(ifname, TcAttachType::Ingress, PRIORITY, TcHandle::from(HANDLE), None)
        .ok()
        .is_some_and(|link| link.detach().is_ok())
}

/// Whether a filter is weft's.
fn is_weft(f: &crate::datapath::netlink::BpfFilter) -> bool {
    f.priority == PRIORITY && f.handle == HANDLE && f.name.as_deref().is_some_and(|n| n.starts_with(NAME_PREFIX))
}

/// Removes weft's filters from every device of the namespace, or only those
/// running program `only` (by name). Returns the devices they were on.
pub(super) async fn remove_filters(nl: &Netlink, only: Option<&str>) -> Result<Vec<String>, DatapathError> {
    let mut removed = Vec::new();
    for link in nl.links().await? {
        let ours = nl
            .ingress_bpf_filters(link.index)
            .await?
            .into_iter()
            .any(|f| is_weft(&f) && only.is_none_or(|name| f.name.as_deref() == Some(name)));
        if ours && detach(&link.name) {
            removed.push(link.name);
        }
    }
    if !removed.is_empty() {
        info!(devices = ?removed, "removed weft's clsact filters");
    }
    Ok(removed)
}

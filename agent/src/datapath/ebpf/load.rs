//! The programs: loading them (or adopting the pinned ones of the same build)
//! and running them on a device's ingress — through a pinned TCX link (or
//! adopting that link, switched atomically to a new build), or as weft's
//! clsact filter (`clsact.rs`) on kernels without TCX.
//!
//! Must not touch: devices (netlink) or map contents.

use std::path::Path;
use std::time::{Duration, Instant};

use aya::EbpfLoader;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use tracing::{debug, info, warn};

use super::clsact;
use super::options::AttachMethod;
use super::pins::{PinDir, io_err};
use crate::datapath::DatapathError;

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

/// How long unpinned links may take to leave a device. The kernel frees a link
/// whose last pin goes after an RCU grace period and a workqueue pass: usually
/// milliseconds, longer on a loaded machine.
const DETACH_TIMEOUT: Duration = Duration::from_secs(3);

/// The three programs, opened from their pins.
pub(super) struct Programs {
    pub endpoint: SchedClassifier,
    pub overlay: SchedClassifier,
    pub underlay: SchedClassifier,
}

/// Loads (or adopts) the three programs, pinned as `prog_<name>_<hash>`.
pub(super) fn load_programs(pins: &PinDir) -> Result<Programs, DatapathError> {
    let load = |name: &str, prog_name: &str, object: &[u8]| -> Result<SchedClassifier, DatapathError> {
        let pin = pins.program(name, object);
        if !pin.exists() {
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(pins.path())
                .load(object)
                .map_err(|e| DatapathError::bpf(format!("load {name} program"), e))?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(prog_name)
                .ok_or_else(|| {
                    DatapathError::bpf(format!("load {name}"), format!("the object has no program {prog_name}"))
                })?
                .try_into()
                .map_err(|e| DatapathError::bpf(format!("load {name} program"), e))?;
            prog.load().map_err(|e| DatapathError::bpf(format!("verify {name} program"), e))?;
            prog.pin(&pin).map_err(|e| DatapathError::bpf(format!("pin {name} program"), e))?;
            debug!(program = name, pin = %pin.display(), "loaded");
        }
        let prog = SchedClassifier::from_pin(&pin).map_err(|e| DatapathError::bpf(format!("open {name} program"), e))?;
        // Programs of older builds go once nothing uses them: their links are
        // switched to this one by attach().
        pins.remove_other_programs(name, &pin);
        Ok(prog)
    };
    Ok(Programs {
        endpoint: load("endpoint", "weft_endpoint", super::objects::ENDPOINT)?,
        overlay: load("overlay", "weft_overlay", super::objects::OVERLAY)?,
        underlay: load("underlay", "weft_underlay", super::objects::UNDERLAY)?,
    })
}

/// The ids of the programs on `ifname`'s TCX ingress (none if it is gone).
pub(super) fn tcx_ingress(ifname: &str) -> Vec<u32> {
    SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
        .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
        .unwrap_or_default()
}

/// The program a pinned link runs, if the pin is a live link.
pub(super) fn pinned_link_program(pin: &Path) -> Option<u32> {
    let link = FdLink::from(PinnedLink::from_pin(pin).ok()?);
    link.info().ok().map(|i| i.program_id())
}

/// Makes sure `prog` runs on `ifname`'s ingress, attached by `method`, and
/// only so: a TCX link left by an agent that used clsact, or a filter left by
/// one that used TCX, goes once the new attachment is in place (TCX runs
/// before clsact and its verdict ends the hook, so nothing is seen twice).
pub(super) fn attach(
    prog: &mut SchedClassifier,
    ifname: &str,
    pin: &Path,
    method: AttachMethod,
) -> Result<(), DatapathError> {
    match method {
        AttachMethod::Tcx => {
            attach_tcx(prog, ifname, pin)?;
            if clsact::detach(ifname) {
                info!(%ifname, "removed weft's clsact filter: TCX runs the program now");
            }
        }
        AttachMethod::Clsact => {
            clsact::attach(prog, ifname)?;
            if pin.symlink_metadata().is_ok() {
                std::fs::remove_file(pin).map_err(io_err("unpin", pin))?;
                info!(%ifname, "unpinned weft's TCX link: the clsact filter runs the program now");
            }
        }
    }
    Ok(())
}

/// Makes sure `prog` runs on `ifname`'s ingress through a link pinned at `pin`:
/// adopts a live pinned link (switching it to `prog` atomically if it runs an
/// older build), replaces a dead one, or creates one.
fn attach_tcx(prog: &mut SchedClassifier, ifname: &str, pin: &Path) -> Result<(), DatapathError> {
    let prog_id = prog.info().map_err(|e| DatapathError::bpf("program info", e))?.id();
    if let Ok(pinned) = PinnedLink::from_pin(pin) {
        let fd_link = FdLink::from(pinned);
        let link_prog = fd_link.info().map(|i| i.program_id()).ok();
        let attached = tcx_ingress(ifname);
        if let Some(link_prog) = link_prog.filter(|id| attached.contains(id)) {
            if link_prog != prog_id {
                let link = SchedClassifierLink::try_from(fd_link).map_err(|e| DatapathError::bpf("adopt link", e))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| DatapathError::bpf(format!("update link on {ifname}"), e))?;
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
        .map_err(|e| DatapathError::bpf(format!("attach to {ifname}"), e))?;
    let link = prog.take_link(id).map_err(|e| DatapathError::bpf("take link", e))?;
    let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::bpf("link fd", e))?;
    fd_link.pin(pin).map_err(|e| DatapathError::bpf(format!("pin link of {ifname}"), e))?;
    Ok(())
}

/// Waits until none of `gone` (device, program id) runs on its device any more,
/// so that whoever removed their pins returns with the kernel as it will stay.
/// A device that vanished counts as done. Gives up (with a warning) after
/// [`DETACH_TIMEOUT`]: the links still go, later.
pub(super) async fn wait_detached(gone: &[(String, u32)]) {
    let deadline = Instant::now() + DETACH_TIMEOUT;
    let mut left: Vec<&(String, u32)> = gone.iter().collect();
    loop {
        left.retain(|(device, prog)| tcx_ingress(device).contains(prog));
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            warn!(devices = ?left, "unpinned TCX links are still attached; the kernel removes them later");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

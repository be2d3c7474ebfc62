//! Starting a host's data path, all or nothing, and abandoning a start.
//!
//! The rule: a start that finds **no pin directory** for its host is *fresh*.
//! If a fresh start fails at any step, it removes everything it made before
//! returning the error — the pin directory (and the pin root if it made that),
//! so the TCX links on the underlay and the VXLAN device go with their pins, and
//! weft's clsact filters are deleted (the clsact qdisc stays, see `clsact.rs`); the
//! VXLAN device if it created it (or its MTU and state, if it changed an
//! existing one) — and the kernel is left as it was found. A start that finds
//! the pin directory *adopts* it (a running or a stopped-but-still-forwarding
//! agent's data path, whose traffic must not stop): if it fails, it leaves
//! everything as it is — the pins, the devices, and what it added itself, which
//! the next start adopts in turn. A directory whose pins had another ABI was
//! found too: its replacement is not removed either.
//!
//! The same rule covers a later launch step failing after a successful start:
//! [`EbpfDatapath::abandon`] removes what a fresh start made (and the endpoints
//! attached through it since) and leaves an adopted data path alone.
//!
//! Everything checkable without touching the host (names, port, VNI, MTU) is
//! checked before anything is made. bpffs is mounted if missing and stays
//! mounted: it is the system's, not weft's.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::link::InfoKind;
use tracing::{debug, info, warn};

use super::clsact;
use super::load::{self, load_programs};
use super::options::AttachMethod;
use super::maps::{Maps, write_config};
use super::options::{EbpfOptions, Encap, endpoint_mtu};
use super::pins::{self, PinDir, ensure_bpffs};
use super::{EbpfDatapath, lock};
use crate::datapath::abi::{self, Config};
use crate::datapath::netlink::{Link, Netlink};
use crate::datapath::DatapathError;

/// The VXLAN device as a fresh start found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VxlanBefore {
    /// There was none: the start created it.
    Absent,
    /// There was one. A foreign device makes the start fail untouched; weft's
    /// own (left by a data path whose pins were removed by hand) may get a new
    /// MTU and be brought up, which an undo reverts.
    Present { index: u32, mtu: u32, up: bool },
}

/// What a fresh start made, so that it can be removed again.
#[derive(Debug, Clone)]
pub(super) struct Undo {
    pins: PinDir,
    root: pins::Made,
    vxlan_name: String,
    /// `None` until the start reached the VXLAN step.
    vxlan: Option<VxlanBefore>,
}

impl Undo {
    /// Removes what the start made, and the host-side veths in `veths`
    /// (endpoints attached since). Goes on after a failure and returns the
    /// first one.
    async fn run(&self, nl: &Netlink, veths: &[String]) -> Result<(), DatapathError> {
        let mut first_error = None;
        let mut note = |result: Result<(), DatapathError>| {
            if let Err(e) = result {
                warn!(error = %e, "removing what the data path made");
                first_error.get_or_insert(e);
            }
        };
        for veth in veths {
            // Deleting the host end takes the container end and its TCX link.
            note(async {
                if let Some(link) = nl.link(veth).await? {
                    nl.delete_link(link.index).await?;
                }
                Ok(())
            }
            .await);
        }
        // The links' programs, to wait for below: unpinning detaches a link
        // only once the kernel gets round to freeing it.
        let links: Vec<(String, u32)> = self
            .pins
            .link_pins(&self.vxlan_name)
            .into_iter()
            .filter_map(|l| Some((l.device, load::pinned_link_program(&l.pin)?)))
            .collect();
        // clsact filters are no pins: removed by weft's priority and handle.
        note(clsact::remove_filters(nl, None).await.map(drop));
        note(self.pins.remove().map(drop));
        self.pins.remove_root_if_made(self.root);
        note(self.restore_vxlan(nl).await);
        load::wait_detached(&links).await;
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    async fn restore_vxlan(&self, nl: &Netlink) -> Result<(), DatapathError> {
        match self.vxlan {
            None => Ok(()),
            Some(VxlanBefore::Absent) => match nl.link(&self.vxlan_name).await? {
                // Only a device that is what the start would have made.
                Some(link) if is_weft_vxlan(&link) => {
                    debug!(device = %link.name, "deleting the VXLAN device this start created");
                    Ok(nl.delete_link(link.index).await?)
                }
                _ => Ok(()),
            },
            Some(VxlanBefore::Present { index, mtu, up }) => {
                let Some(now) = nl.link_by_index(index).await? else { return Ok(()) };
                if now.mtu == mtu && now.up == up {
                    return Ok(());
                }
                let change = LinkUnspec::new_with_index(index).mtu(mtu);
                Ok(nl.set_link(if up { change.up() } else { change.down() }).await?)
            }
        }
    }
}

/// Whether `link` is an external-mode VXLAN device, what weft makes.
pub(super) fn is_weft_vxlan(link: &Link) -> bool {
    link.kind == Some(InfoKind::Vxlan) && link.vxlan.is_some_and(|(_, external)| external)
}

impl EbpfDatapath {
    /// Sets the host up, or adopts what a previous agent left pinned. All or
    /// nothing on a fresh host (no pin directory): a failure at any step
    /// removes what this call made before the error is returned. An adopted
    /// pin directory is never removed. See the module docs for the rule.
    pub async fn start(opts: EbpfOptions) -> Result<Self, DatapathError> {
        opts.check()?;
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
        let mtu = endpoint_mtu(opts.mtu, &underlay)?;
        let method = clsact::resolve(opts.tc_attach)?;
        clsact::check_helpers()?;

        // Nothing made so far; from here on, a fresh start undoes what it makes.
        ensure_bpffs()?;
        let pins = PinDir::new(opts.pin_dir());
        let mut undo = (!pins.exists()).then(|| Undo {
            pins: pins.clone(),
            root: pins::Made::default(),
            vxlan_name: opts.vxlan_name.clone(),
            vxlan: None,
        });
        let found = Found { underlay, local_ip, mtu, method };
        match bring_up(opts, nl.clone(), pins, found, &mut undo).await {
            Ok(mut dp) => {
                dp.undo = undo;
                Ok(dp)
            }
            Err(e) => {
                if let Some(undo) = undo {
                    warn!(error = %e, "the data path did not start; removing what this start made");
                    // The start's error is the one to report; the undo's are logged.
                    let _ = undo.run(&nl, &[]).await;
                }
                Err(e)
            }
        }
    }

    /// Whether this data path was started on a host with no pin directory (so
    /// [`EbpfDatapath::abandon`] would remove it).
    pub fn started_fresh(&self) -> bool {
        self.undo.is_some()
    }

    /// Undoes a start when a later launch step failed. After a fresh start:
    /// removes what the start made (pins, TCX links or clsact filters, the VXLAN device it
    /// created) and the endpoints attached through this value, leaving the
    /// kernel as the start found it. After a start that adopted pins: does
    /// nothing (the adopted data path keeps forwarding).
    pub async fn abandon(self) -> Result<(), DatapathError> {
        let Some(undo) = &self.undo else {
            debug!(pins = %self.pins.path().display(), "abandoning an adopted data path: leaving it as it is");
            return Ok(());
        };
        let _ops = self.endpoint_ops.lock().await;
        let veths: Vec<String> = lock(&self.attached).iter().cloned().collect();
        undo.run(&self.nl, &veths).await?;
        info!(pins = %self.pins.path().display(), "data path abandoned: what its start made is removed");
        Ok(())
    }

    /// Brings pins and kernel in line after a start: endpoint veths found are
    /// (re)attached, links and entries of vanished ones are dropped, peers get the
    /// current encapsulation mode.
    async fn reconcile(&self) -> Result<(), DatapathError> {
        let ours = self.prune_vanished().await?;
        {
            let mut progs = lock(&self.progs);
            for link in &ours {
                load::attach(&mut progs.endpoint, &link.name, &self.pins.endpoint_link(&link.name), self.method)?;
            }
        }
        let peers = lock(&self.maps).peers();
        // Routes or the mode may have changed while no agent ran.
        for (host, peer) in peers {
            self.set_peer(host, peer.next_hop.into()).await?;
        }
        Ok(())
    }
}

/// What the checks of a start found out, before anything was made.
struct Found {
    underlay: Link,
    local_ip: Ipv4Addr,
    mtu: u32,
    method: AttachMethod,
}

/// The steps of a start after the checks; `undo` (fresh starts only) learns
/// what is made as it is made.
async fn bring_up(
    opts: EbpfOptions,
    nl: Netlink,
    pins: PinDir,
    found: Found,
    undo: &mut Option<Undo>,
) -> Result<EbpfDatapath, DatapathError> {
    let Found { underlay, local_ip, mtu, method } = found;
    let made = pins.create()?;
    if let Some(undo) = undo.as_mut() {
        undo.root = made;
    }
    pins.check_abi()?;
    // Again: pins of another ABI went, directory and all.
    pins.create()?;
    let mut progs = load_programs(&pins)?;
    let maps = Maps::open(&pins)?;

    if let Some(undo) = undo.as_mut() {
        undo.vxlan = Some(match nl.link(&opts.vxlan_name).await? {
            None => VxlanBefore::Absent,
            Some(l) => VxlanBefore::Present { index: l.index, mtu: l.mtu, up: l.up },
        });
    }
    let vxlan = nl.ensure_vxlan(&opts.vxlan_name, opts.port, mtu).await?;
    write_config(
        &pins,
        Config {
            abi_version: abi::ABI_VERSION,
            vni: opts.vni,
            local_ip: local_ip.into(),
            vxlan_ifindex: vxlan.index,
            vxlan_port_be: opts.port.to_be(),
            flags: 0,
            _pad: 0,
        },
    )?;
    load::attach(&mut progs.overlay, &vxlan.name, &pins.overlay_link(), method)?;
    if opts.encap == Encap::Device {
        // Switched from direct mode: the underlay programs must go.
        pins.remove_underlay_links();
        clsact::remove_filters(&nl, Some("weft_underlay")).await?;
    }

    let dp = EbpfDatapath {
        opts,
        nl,
        pins,
        underlay,
        local_ip,
        mtu,
        vxlan,
        method,
        progs: Mutex::new(progs),
        maps: Mutex::new(maps),
        endpoint_ops: tokio::sync::Mutex::new(()),
        undo: None,
        attached: Mutex::new(Default::default()),
    };
    if dp.opts.encap == Encap::Direct {
        dp.ensure_underlay(dp.underlay.index).await?;
    }
    dp.reconcile().await?;
    info!(
        host = %dp.opts.host, underlay = %dp.underlay.name, local_ip = %dp.local_ip, mtu = dp.mtu,
        encap = ?dp.opts.encap, tc_attach = %dp.method, pins = %dp.pins.path().display(), fresh = undo.is_some(),
        "eBPF data path ready"
    );
    Ok(dp)
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
    let oif = nl
        .routes()
        .await?
        .into_iter()
        .filter(|r| r.dst.prefix_len() == 0 && r.table == 254)
        .find_map(|r| r.oif)
        .ok_or(DatapathError::NoUnderlay)?;
    nl.link_by_index(oif).await?.ok_or(DatapathError::NoUnderlay)
}

//! The eBPF backend's settings ([`EbpfOptions`], [`Encap`]) and the checks on
//! them that run before anything on the host is touched: names that become
//! paths and devices, the VXLAN port and VNI, the endpoint MTU.
//!
//! Must not touch: the kernel (the MTU check reads a [`Link`] it is given).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::pins::DEFAULT_PIN_ROOT;
use crate::datapath::netlink::{Link, is_valid_ifname};
use crate::datapath::{DEFAULT_VNI, DEFAULT_VXLAN_PORT, DatapathError, VXLAN_OVERHEAD};

/// The smallest MTU every IPv4 link must carry (RFC 791's 576-byte datagram).
pub const MIN_MTU: u32 = 576;

/// `ETH_MAX_MTU`: the largest MTU Linux gives any Ethernet-like device (veth,
/// VXLAN). The bound when netlink does not report the underlay's own.
pub const ETH_MAX_MTU: u32 = 65535;

/// The longest pin directory name: a file name (NAME_MAX is 255), with room to spare.
const MAX_HOST_LEN: usize = 200;

/// The largest VXLAN network identifier: the header has 24 bits for it.
pub const MAX_VNI: u32 = 0xff_ffff;

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

/// An `--encap` value that is neither mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown encapsulation {0:?}: use direct or device")]
pub struct BadEncap(pub String);

impl std::str::FromStr for Encap {
    type Err = BadEncap;
    fn from_str(s: &str) -> Result<Self, BadEncap> {
        match s {
            "direct" => Ok(Encap::Direct),
            "device" | "vxlan" => Ok(Encap::Device),
            _ => Err(BadEncap(s.to_string())),
        }
    }
}

/// How the TC programs are attached, as asked for (`--tc-attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// TCX if the kernel has it (6.6+), else clsact.
    #[default]
    Auto,
    /// TCX links, pinned (kernel 6.6+).
    Tcx,
    /// cls_bpf filters on the clsact qdisc, through netlink (any kernel weft runs on).
    Clsact,
}

/// A `--tc-attach` value that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown TC attach method {0:?}: use auto, tcx or clsact")]
pub struct BadTcAttach(pub String);

impl std::str::FromStr for TcAttach {
    type Err = BadTcAttach;
    fn from_str(s: &str) -> Result<Self, BadTcAttach> {
        match s {
            "auto" => Ok(TcAttach::Auto),
            "tcx" => Ok(TcAttach::Tcx),
            "clsact" => Ok(TcAttach::Clsact),
            _ => Err(BadTcAttach(s.to_string())),
        }
    }
}

/// How the TC programs are attached on this host (what [`TcAttach::Auto`]
/// resolved to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMethod {
    /// TCX links pinned under the pin directory.
    Tcx,
    /// cls_bpf filters at weft's priority and handle on the clsact qdisc.
    Clsact,
}

impl std::fmt::Display for AttachMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMethod::Tcx => "tcx",
            AttachMethod::Clsact => "clsact",
        })
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
    /// How the TC programs are attached.
    pub tc_attach: TcAttach,
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
            port: DEFAULT_VXLAN_PORT,
            vni: DEFAULT_VNI,
            mtu: None,
            encap: Encap::default(),
            tc_attach: TcAttach::default(),
        }
    }

    /// Checks what can be checked without looking at the host. The host name
    /// becomes a directory under the pin root that reset removes whole, so it
    /// must be one plain path component: `..` or a `/` would reach other hosts'
    /// pins.
    pub fn check(&self) -> Result<(), DatapathError> {
        let invalid = |option, value: &dyn ToString, reason| DatapathError::InvalidOption {
            option,
            value: value.to_string(),
            reason,
        };
        let host = &self.host;
        if host.is_empty() || host.len() > MAX_HOST_LEN || host == "." || host == ".." || host.contains(['/', '\0']) {
            return Err(invalid(
                "pin directory name",
                host,
                "it must be 1 to 200 characters, not . or .., without '/' or NUL",
            ));
        }
        if !is_valid_ifname(&self.vxlan_name) {
            return Err(invalid(
                "VXLAN device name",
                &self.vxlan_name,
                "an interface name is 1 to 15 characters, no '/', ':' or space",
            ));
        }
        if self.port == 0 {
            return Err(invalid("VXLAN port", &self.port, "use a UDP port from 1 to 65535"));
        }
        if self.vni > MAX_VNI {
            return Err(invalid("VNI", &self.vni, "a VXLAN network identifier has 24 bits (at most 16777215)"));
        }
        Ok(())
    }

    /// This host's pin directory: `<pin root>/<host>`.
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_root.join(&self.host)
    }
}

/// The MTU endpoints get on `underlay`: the one asked for, else the underlay's
/// less [`VXLAN_OVERHEAD`]. Refused if IPv4 cannot use it or if an
/// encapsulated packet of that size could not leave through the underlay at
/// any MTU it takes (nor enter the VXLAN device and veths, which take at most
/// [`ETH_MAX_MTU`]).
pub fn endpoint_mtu(requested: Option<u32>, underlay: &Link) -> Result<u32, DatapathError> {
    let mtu = requested.unwrap_or(underlay.mtu.saturating_sub(VXLAN_OVERHEAD));
    if mtu < MIN_MTU {
        return Err(DatapathError::MtuTooSmall { mtu });
    }
    let underlay_max = underlay.max_mtu.unwrap_or(ETH_MAX_MTU).min(ETH_MAX_MTU);
    let max = underlay_max.saturating_sub(VXLAN_OVERHEAD);
    if mtu > max {
        return Err(DatapathError::MtuTooLarge { mtu, max, underlay: underlay.name.clone(), underlay_max });
    }
    Ok(mtu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(mtu: u32, max_mtu: Option<u32>) -> Link {
        Link {
            index: 2,
            name: "eth0".into(),
            mtu,
            max_mtu,
            mac: None,
            kind: None,
            alias: None,
            up: true,
            vxlan: None,
        }
    }

    #[test]
    fn the_endpoint_mtu_is_the_underlays_less_vxlan_unless_given() {
        assert_eq!(endpoint_mtu(None, &link(1500, Some(9216))).unwrap(), 1450);
        assert_eq!(endpoint_mtu(Some(1300), &link(1500, None)).unwrap(), 1300);
        // Larger than the underlay's current MTU is the user's call (it fragments).
        assert_eq!(endpoint_mtu(Some(9000), &link(1500, Some(9216))).unwrap(), 9000);
    }

    #[test]
    fn an_mtu_no_device_can_take_is_refused() {
        let err = endpoint_mtu(Some(100_000), &link(1500, None)).unwrap_err();
        assert!(matches!(err, DatapathError::MtuTooLarge { max: 65485, underlay_max: 65535, .. }), "{err:?}");
        let err = endpoint_mtu(Some(9200), &link(1500, Some(9216))).unwrap_err();
        assert!(matches!(err, DatapathError::MtuTooLarge { mtu: 9200, max: 9166, .. }), "{err:?}");
        assert_eq!(endpoint_mtu(Some(9166), &link(1500, Some(9216))).unwrap(), 9166);
        assert!(matches!(endpoint_mtu(None, &link(600, None)), Err(DatapathError::MtuTooSmall { mtu: 550 })));
        assert!(matches!(endpoint_mtu(Some(575), &link(1500, None)), Err(DatapathError::MtuTooSmall { .. })));
    }

    #[test]
    fn tc_attach_values_parse() {
        assert_eq!("auto".parse::<TcAttach>().unwrap(), TcAttach::Auto);
        assert_eq!("tcx".parse::<TcAttach>().unwrap(), TcAttach::Tcx);
        assert_eq!("clsact".parse::<TcAttach>().unwrap(), TcAttach::Clsact);
        assert!("netlink".parse::<TcAttach>().is_err());
        assert_eq!(AttachMethod::Clsact.to_string(), "clsact");
    }

    #[test]
    fn settings_that_would_reach_outside_weft_are_refused() {
        assert!(EbpfOptions::new("host1").check().is_ok());
        for host in ["", ".", "..", "../other", "a/b", "a\0b"] {
            let err = EbpfOptions::new(host).check().unwrap_err();
            assert!(matches!(err, DatapathError::InvalidOption { option: "pin directory name", .. }), "{host:?}");
        }
        let mut opts = EbpfOptions::new("h");
        opts.vxlan_name = "a-name-too-long-for-linux".into();
        assert!(opts.check().is_err());
        let mut opts = EbpfOptions::new("h");
        opts.port = 0;
        assert!(opts.check().is_err());
        let mut opts = EbpfOptions::new("h");
        opts.vni = MAX_VNI + 1;
        assert!(opts.check().is_err());
        opts.vni = MAX_VNI;
        assert!(opts.check().is_ok());
    }
}

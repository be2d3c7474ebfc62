//! Why a data-path operation failed, and whose fault it was.
//!
//! Causes stay typed: a kernel error keeps its whole source chain, and missing
//! privileges are recognised from the errno found in that chain ([`errno`]),
//! never from message text. [`DatapathError::kind`] tells the caller's mistakes
//! (a bad endpoint spec: HTTP 400) from settings that do not fit the host (exit
//! 64) and from the system's failures (HTTP 500/503).
//!
//! Must not know: HTTP, exit codes or any caller — it only classifies.

use std::error::Error as StdError;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::{VXLAN_OVERHEAD, netlink, netns};

/// A cause kept for its source chain (an aya, nix or I/O error).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a data path operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A netlink request (links, addresses, routes) failed.
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    /// Work in another network namespace could not run.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// A BPF operation (load, pin, attach, map access) failed; `source` is aya's error.
    #[error("eBPF: {op}: {}", Chain(source.as_ref()))]
    Bpf {
        /// What weft was doing ("attach to eth0", "update PEERS").
        op: String,
        /// aya's error, with its syscall and errno below it.
        #[source]
        source: BoxError,
    },
    /// A file operation (pins, bpffs, sysctl) failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What weft was doing.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `--iface` names no interface of this host.
    #[error("unknown underlay interface {name}: no such network interface here; pass --iface with one of: {available}")]
    UnknownUnderlay {
        /// The name given.
        name: String,
        /// The interfaces there are (without `lo`), comma-separated.
        available: String,
    },
    /// The underlay interface has no address to send from.
    #[error("underlay interface {name} has no IPv4 address; give it one or pass --iface")]
    NoUnderlayAddress {
        /// The underlay interface.
        name: String,
    },
    /// No `--iface` and no default route to find the underlay by.
    #[error("cannot tell which interface is the underlay (no default route); pass --iface")]
    NoUnderlay,
    /// The endpoint MTU is below what IPv4 requires.
    #[error("MTU {mtu} is too small for IPv4 (at least 576)")]
    MtuTooSmall {
        /// The MTU asked for (or computed from the underlay).
        mtu: u32,
    },
    /// The endpoint MTU is more than the devices can take.
    #[error(
        "MTU {mtu} is too large: {underlay} carries at most {underlay_max}, so endpoints get at most {max} \
         ({VXLAN_OVERHEAD} bytes go to VXLAN); pass a smaller --mtu"
    )]
    MtuTooLarge {
        /// The MTU asked for.
        mtu: u32,
        /// The largest endpoint MTU.
        max: u32,
        /// The underlay interface.
        underlay: String,
        /// The underlay's largest MTU (as netlink reports it, else Linux's 65535).
        underlay_max: u32,
    },
    /// The kernel lacks a feature the data path needs (found by a probe at start).
    #[error("the kernel ({kernel}) lacks {feature}, which {user} needs (Linux {needs} or later){hint}")]
    KernelTooOld {
        /// `uname -r`, for the message only.
        kernel: String,
        /// What is missing ("TCX", "the bpf_redirect_peer helper").
        feature: String,
        /// What needs it ("--tc-attach tcx", "weft's data path").
        user: String,
        /// The first Linux version that has it.
        needs: &'static str,
        /// What to do instead (starts with "; "), or empty.
        hint: String,
    },
    /// A setting of the eBPF backend is invalid (checked before anything is touched).
    #[error("invalid {option} {value:?}: {reason}")]
    InvalidOption {
        /// The setting.
        option: &'static str,
        /// Its value.
        value: String,
        /// What a valid one looks like.
        reason: &'static str,
    },
    /// An endpoint cannot be attached as asked.
    #[error("endpoint {id}: {reason}")]
    Endpoint {
        /// The endpoint's id.
        id: String,
        /// What is wrong.
        reason: EndpointReason,
    },
    /// The address belongs to a local endpoint already.
    #[error("address {addr} is already used by local endpoint on interface {ifindex}")]
    AddressInUse {
        /// The address.
        addr: Ipv4Addr,
        /// The host-side veth of the endpoint that has it.
        ifindex: u32,
    },
    /// weft lacks the privileges for an operation.
    #[error("permission denied: {what} needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF); run weft as root")]
    NotPermitted {
        /// The operation.
        what: String,
    },
}

/// What is wrong with an endpoint asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointReason {
    /// The id is empty, too long or contains NUL.
    #[error("the id must be 1 to 200 characters, without NUL")]
    BadId,
    /// No address given.
    #[error("an endpoint needs at least one address")]
    NoAddresses,
    /// The container-side interface name is not one Linux takes.
    #[error("the interface name must be 1 to 15 characters, no '/', ':' or space")]
    BadInterfaceName,
    /// An endpoint with this id is attached already.
    #[error("already attached (host interface {host_ifname})")]
    AlreadyAttached {
        /// Its host-side veth.
        host_ifname: String,
    },
    /// The container has an interface of that name already.
    #[error("its namespace already has an interface named {ifname}")]
    InterfaceExists {
        /// The container-side interface name.
        ifname: String,
    },
    /// The endpoint's network namespace does not exist (its container is gone).
    #[error("network namespace {} does not exist", path.display())]
    NoSuchNamespace {
        /// The path given.
        path: PathBuf,
    },
    /// The host has as many endpoints as the data path's multicast list holds.
    #[error("this host already has {max} endpoints, the most weft supports")]
    TooManyEndpoints {
        /// The limit (`WEFT_MAX_LOCAL`).
        max: u32,
    },
}

/// Whose fault a [`DatapathError`] is: what a caller needs to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was wrong (bad endpoint spec, already attached, address in
    /// use, namespace gone): asking again the same way fails again. HTTP 400/409.
    InvalidRequest,
    /// A limit of the data path is reached (too many endpoints): the request is
    /// fine but the host is full. HTTP 503.
    LimitReached,
    /// The launch settings do not fit this host (unknown underlay, MTU out of
    /// range, a foreign device where weft's should be). Exit 64.
    BadSettings,
    /// weft lacks privileges. Run it as root.
    NotPermitted,
    /// The kernel or the system failed. HTTP 500.
    System,
}

impl DatapathError {
    /// Whose fault this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DatapathError::Endpoint { reason: EndpointReason::TooManyEndpoints { .. }, .. } => ErrorKind::LimitReached,
            DatapathError::Endpoint { .. } | DatapathError::AddressInUse { .. } => ErrorKind::InvalidRequest,
            DatapathError::UnknownUnderlay { .. }
            | DatapathError::NoUnderlayAddress { .. }
            | DatapathError::NoUnderlay
            | DatapathError::MtuTooSmall { .. }
            | DatapathError::MtuTooLarge { .. }
            | DatapathError::InvalidOption { .. }
            | DatapathError::KernelTooOld { .. }
            | DatapathError::Netlink(netlink::NetlinkError::Conflict { .. }) => ErrorKind::BadSettings,
            DatapathError::NotPermitted { .. } => ErrorKind::NotPermitted,
            other if is_permission(errno(other)) => ErrorKind::NotPermitted,
            _ => ErrorKind::System,
        }
    }

    /// True for the caller's mistakes (a bad endpoint spec, an endpoint already
    /// attached, an address in use), false for limits and system failures.
    pub fn is_invalid_request(&self) -> bool {
        self.kind() == ErrorKind::InvalidRequest
    }

    /// The errno behind this error, if a syscall or netlink answer caused it.
    pub fn errno(&self) -> Option<i32> {
        errno(self)
    }

    /// Wraps an aya (or any) error from operation `op`; an EPERM or EACCES
    /// anywhere in its source chain makes it [`DatapathError::NotPermitted`].
    pub(crate) fn bpf(op: impl Into<String>, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        let op = op.into();
        if is_permission(errno(source.as_ref())) {
            return DatapathError::NotPermitted { what: op };
        }
        DatapathError::Bpf { op, source }
    }
}

fn is_permission(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EPERM | libc::EACCES))
}

/// The errno behind `err`: looked for in `err` itself, then down its
/// `source()` chain. Knows the error types weft meets that carry one
/// (`std::io::Error`, nix's `Errno`, aya's syscall, map, program and netlink
/// errors, rtnetlink's netlink answers), including aya's `#[error(transparent)]`
/// variants that hold an `io::Error` without exposing it as a source.
pub fn errno(err: &(dyn StdError + 'static)) -> Option<i32> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(code) = own_errno(e) {
            return Some(code);
        }
        next = e.source();
    }
    None
}

fn own_errno(e: &(dyn StdError + 'static)) -> Option<i32> {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        // A custom io::Error hides its inner error from source().
        return io.raw_os_error().or_else(|| io.get_ref().and_then(|inner| errno(inner)));
    }
    if let Some(code) = e.downcast_ref::<nix::errno::Errno>() {
        return Some(*code as i32);
    }
    if let Some(call) = e.downcast_ref::<aya::sys::SyscallError>() {
        return call.io_error.raw_os_error();
    }
    if let Some(program) = e.downcast_ref::<aya::programs::ProgramError>() {
        return program_errno(program);
    }
    if let Some(tc) = e.downcast_ref::<aya::programs::tc::TcError>() {
        return tc_errno(tc);
    }
    if let Some(map) = e.downcast_ref::<aya::maps::MapError>() {
        return map_errno(map);
    }
    if let Some(nl) = e.downcast_ref::<aya::sys::NetlinkError>() {
        return nl.raw_os_error();
    }
    if let Some(rtnetlink::Error::NetlinkError(msg)) = e.downcast_ref() {
        // Netlink answers carry the negated errno.
        return msg.raw_code().checked_neg().filter(|c| *c > 0);
    }
    None
}

// aya's `#[error(transparent)]` variants forward `source()` to their inner
// error's source, so the inner error (an io::Error, or another transparent
// wrapper) never shows in the chain: they are peeled here.

fn program_errno(e: &aya::programs::ProgramError) -> Option<i32> {
    use aya::programs::ProgramError;
    match e {
        ProgramError::IOError(io) | ProgramError::LoadError { io_error: io, .. } => io.raw_os_error(),
        ProgramError::SyscallError(call) => call.io_error.raw_os_error(),
        ProgramError::TcError(tc) => tc_errno(tc),
        ProgramError::MapError(map) => map_errno(map),
        ProgramError::NetlinkError(nl) => nl.raw_os_error(),
        other => other.source().and_then(errno),
    }
}

fn tc_errno(e: &aya::programs::tc::TcError) -> Option<i32> {
    use aya::programs::tc::TcError;
    match e {
        TcError::IoError(io) => io.raw_os_error(),
        TcError::NetlinkError(nl) => nl.raw_os_error(),
        other => other.source().and_then(errno),
    }
}

fn map_errno(e: &aya::maps::MapError) -> Option<i32> {
    use aya::maps::MapError;
    match e {
        MapError::IoError(io) => io.raw_os_error(),
        MapError::SyscallError(call) => call.io_error.raw_os_error(),
        other => other.source().and_then(errno),
    }
}

/// Displays an error and its sources, `: `-separated (what main prints is the
/// top error's Display only, so the cause must be in it).
struct Chain<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syscall(errno: i32) -> aya::sys::SyscallError {
        aya::sys::SyscallError { call: "bpf_link_create", io_error: std::io::Error::from_raw_os_error(errno) }
    }

    #[test]
    fn eperm_anywhere_in_the_chain_is_not_permitted() {
        let e = DatapathError::bpf("attach to eth0", aya::programs::ProgramError::SyscallError(syscall(libc::EPERM)));
        assert!(matches!(&e, DatapathError::NotPermitted { what } if what == "attach to eth0"), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::NotPermitted);

        let e = DatapathError::bpf("open map PEERS", aya::maps::MapError::SyscallError(syscall(libc::EACCES)));
        assert!(matches!(e, DatapathError::NotPermitted { .. }), "{e:?}");

        // io::Error held transparently (not a source) is found too.
        let e = aya::programs::ProgramError::IOError(std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(errno(&e), Some(libc::EPERM));
        let e = aya::programs::ProgramError::TcError(aya::programs::tc::TcError::IoError(
            std::io::Error::from_raw_os_error(libc::EACCES),
        ));
        assert_eq!(errno(&e), Some(libc::EACCES));
        assert_eq!(errno(&nix::errno::Errno::EPERM), Some(libc::EPERM));
    }

    #[test]
    fn other_errors_keep_their_cause_and_errno() {
        let e = DatapathError::bpf("update UNDERLAY_IPS", aya::maps::MapError::SyscallError(syscall(libc::E2BIG)));
        let DatapathError::Bpf { op, source } = &e else { panic!("{e:?}") };
        assert_eq!(op, "update UNDERLAY_IPS");
        assert!(source.downcast_ref::<aya::maps::MapError>().is_some(), "the cause stays typed");
        assert_eq!(e.errno(), Some(libc::E2BIG));
        assert_eq!(e.kind(), ErrorKind::System);
        let text = e.to_string();
        assert!(text.starts_with("eBPF: update UNDERLAY_IPS: `bpf_link_create` failed: "), "{text}");
        assert!(text.contains("os error 7"), "the errno is in the message: {text}");
        // A message that merely says "Operation not permitted" is not an EPERM.
        let e = DatapathError::bpf("load", std::io::Error::other("Operation not permitted (os error 1)"));
        assert!(matches!(e, DatapathError::Bpf { .. }), "{e:?}");
    }

    #[test]
    fn the_callers_mistakes_are_invalid_requests_and_failures_are_not() {
        let endpoint = |reason| DatapathError::Endpoint { id: "c1".into(), reason };
        for reason in [
            EndpointReason::BadId,
            EndpointReason::NoAddresses,
            EndpointReason::BadInterfaceName,
            EndpointReason::AlreadyAttached { host_ifname: "wv0".into() },
            EndpointReason::InterfaceExists { ifname: "ethwe".into() },
            EndpointReason::NoSuchNamespace { path: "/proc/1/ns/net".into() },
        ] {
            assert!(endpoint(reason.clone()).is_invalid_request(), "{reason:?}");
        }
        assert!(DatapathError::AddressInUse { addr: Ipv4Addr::new(10, 32, 0, 1), ifindex: 3 }.is_invalid_request());
        let full = endpoint(EndpointReason::TooManyEndpoints { max: 256 });
        assert_eq!(full.kind(), ErrorKind::LimitReached);
        assert!(!full.is_invalid_request());
        assert_eq!(DatapathError::MtuTooSmall { mtu: 100 }.kind(), ErrorKind::BadSettings);
        assert_eq!(DatapathError::NoUnderlay.kind(), ErrorKind::BadSettings);
        let conflict = netlink::NetlinkError::Conflict { name: "weft-vxlan".into(), expected: "VXLAN".into() };
        assert_eq!(DatapathError::from(conflict).kind(), ErrorKind::BadSettings);
        let io = DatapathError::Io {
            op: "remove pins",
            path: "/sys/fs/bpf/weft/h".into(),
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        };
        assert_eq!(io.kind(), ErrorKind::System);
        let denied = DatapathError::Io {
            op: "remove pins",
            path: "/sys/fs/bpf/weft/h".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(denied.kind(), ErrorKind::NotPermitted);
    }
}

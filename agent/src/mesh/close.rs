//! Why control connections end: [`ConnError`] says what happened (for logs and
//! `weft status connections`), [`CloseReason`] which of the few reasons that
//! metrics count it is, decided by variant, never by message text.
//!
//! Owns the reason labels. Must not touch connections or counters: the actor
//! closes and counts.

use std::time::Duration;

use super::node::GossipError;
use super::peer::PeerName;
use super::wire::WireError;

/// Why a connection ended, as counted in `weft_connection_terminations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CloseReason {
    /// The passwords differ, or only one side has one.
    Authentication,
    /// The peer was silent for the heartbeat timeout.
    HeartbeatTimeout,
    /// A second connection to a connected peer: one of the two went.
    Duplicate,
    /// Refused: the connection limit was reached.
    ConnectionLimit,
    /// Closed at once on accept: too many connections (from this address, or in
    /// all) had not finished their handshake.
    PendingLimit,
    /// The peer hung up.
    Closed,
    /// The peer sent something the protocol does not allow.
    ProtocolError,
    /// The peer did not read what we sent fast enough.
    SendQueueFull,
    /// Anything else: I/O errors, timeouts, names that do not resolve.
    Error,
}

impl CloseReason {
    /// Every reason.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Authentication,
        CloseReason::HeartbeatTimeout,
        CloseReason::Duplicate,
        CloseReason::ConnectionLimit,
        CloseReason::PendingLimit,
        CloseReason::Closed,
        CloseReason::ProtocolError,
        CloseReason::SendQueueFull,
        CloseReason::Error,
    ];

    /// The metric label (and [`super::MeshStatus::terminations`] key). These
    /// strings are part of the metrics interface: dashboards use them.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Authentication => "authentication",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::Duplicate => "duplicate",
            CloseReason::ConnectionLimit => "connection_limit",
            CloseReason::PendingLimit => "pending_handshake_limit",
            CloseReason::Closed => "closed",
            CloseReason::ProtocolError => "protocol_error",
            // Counted with the other errors, as it always was.
            CloseReason::SendQueueFull | CloseReason::Error => "error",
        }
    }
}

impl WireError {
    /// Which reason this failure counts as.
    pub fn close_reason(&self) -> CloseReason {
        match self {
            WireError::Closed => CloseReason::Closed,
            WireError::PeerWantsPassword
            | WireError::PeerHasNoPassword
            | WireError::BadPassword
            | WireError::ClosedDuringAuth => CloseReason::Authentication,
            WireError::NotWeft(_)
            | WireError::Version { .. }
            | WireError::Noise(_)
            | WireError::FrameTooLarge { .. }
            | WireError::Trailing { .. }
            | WireError::Malformed(_) => CloseReason::ProtocolError,
            WireError::Io(_) | WireError::Encode(_) | WireError::Timeout(_) => CloseReason::Error,
        }
    }
}

/// Something a connected peer sent that we refuse: the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolViolation {
    #[error("a second hello")]
    SecondHello,
    #[error("topology update larger than any real mesh")]
    Oversized,
    #[error(transparent)]
    Gossip(#[from] GossipError),
}

/// Why a connection ended, or never started.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The handshake, a read or a write failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("closed by the peer")]
    ClosedByPeer,
    #[error("no heartbeat for {0:?}")]
    NoHeartbeat(Duration),
    #[error("cannot resolve {target}")]
    Resolve {
        target: String,
        /// `None` when the name resolved to no IPv4 address.
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("duplicate connection to {peer}")]
    Duplicate { peer: PeerName },
    #[error("connection limit of {limit} reached")]
    ConnectionLimit { limit: usize },
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolViolation),
    #[error("send queue full: the peer is not keeping up")]
    SendQueueFull,
    #[error("connection lost while sending")]
    WriterGone,
}

impl ConnError {
    /// Which reason this counts as.
    pub fn reason(&self) -> CloseReason {
        match self {
            ConnError::Wire(e) => e.close_reason(),
            ConnError::ClosedByPeer => CloseReason::Closed,
            ConnError::NoHeartbeat(_) => CloseReason::HeartbeatTimeout,
            ConnError::Duplicate { .. } => CloseReason::Duplicate,
            ConnError::ConnectionLimit { .. } => CloseReason::ConnectionLimit,
            ConnError::Protocol(_) => CloseReason::ProtocolError,
            ConnError::SendQueueFull => CloseReason::SendQueueFull,
            ConnError::Resolve { .. } | ConnError::WriterGone => CloseReason::Error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_metric_interface() {
        let labels: Vec<&str> = CloseReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "authentication",
                "heartbeat_timeout",
                "duplicate",
                "connection_limit",
                "pending_handshake_limit",
                "closed",
                "protocol_error",
                "error",
                "error"
            ]
        );
    }

    #[test]
    fn failures_map_to_reasons_by_kind() {
        let io = || std::io::Error::other("boom");
        let cases: Vec<(ConnError, &str)> = vec![
            (WireError::BadPassword.into(), "authentication"),
            (WireError::ClosedDuringAuth.into(), "authentication"),
            (WireError::PeerWantsPassword.into(), "authentication"),
            (WireError::PeerHasNoPassword.into(), "authentication"),
            (WireError::Closed.into(), "closed"),
            (ConnError::ClosedByPeer, "closed"),
            (ConnError::NoHeartbeat(Duration::from_secs(5)), "heartbeat_timeout"),
            (ConnError::Duplicate { peer: PeerName::new(1) }, "duplicate"),
            (ConnError::ConnectionLimit { limit: 3 }, "connection_limit"),
            (WireError::NotWeft(*b"GET ").into(), "protocol_error"),
            (WireError::FrameTooLarge { len: 1 << 40, limit: crate::mesh::wire::MAX_FRAME }.into(), "protocol_error"),
            (WireError::Malformed("x".into()).into(), "protocol_error"),
            (ProtocolViolation::SecondHello.into(), "protocol_error"),
            (ProtocolViolation::Oversized.into(), "protocol_error"),
            (ProtocolViolation::Gossip(GossipError::UnknownChannel("x".into())).into(), "protocol_error"),
            // Words in a message never decide: a gossip error about passwords
            // is still a protocol error.
            (
                ProtocolViolation::Gossip(GossipError::Rejected { channel: "ipam".into(), detail: "password limit heartbeat".into() })
                    .into(),
                "protocol_error",
            ),
            (WireError::Io(io()).into(), "error"),
            (WireError::Timeout("handshake").into(), "error"),
            (ConnError::Resolve { target: "x:1".into(), source: Some(io()) }, "error"),
            (ConnError::SendQueueFull, "error"),
            (ConnError::WriterGone, "error"),
        ];
        for (error, label) in cases {
            assert_eq!(error.reason().label(), label, "{error}");
        }
    }
}

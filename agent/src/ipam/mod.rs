//! IPAM: every container an address, never the same one twice.
//!
//! The range is a ring of ranges owned by peers ([`ring`]); initial ownership is
//! decided by agreement ([`paxos`]) or seeded; the state machine is [`core`] and
//! the rules that decide whose space may be taken over are [`policy`] — all
//! three pure. The I/O is in two private rooms: `gossiper` (what the mesh calls
//! on the `ipam` channel) and `actor` (the task that batches requests, persists
//! before it answers or gossips, and keeps the clocks).
//!
//! This file is the front door: the settings, the errors, the status, the
//! [`IpamHandle`] other modules use and [`spawn`], which loads the state and
//! starts the task. Beyond loading the state it holds no logic.
//!
//! Reclaiming safely: a dead peer's ranges are taken over automatically only
//! when (1) it has been unreachable for the grace period and is absent from
//! discovery, (2) this peer can reach a strict majority of the peers owning
//! space in the ring — at most one side of a partition can — and (3) this peer
//! has the smallest name among the peers it reaches, so one peer on that side
//! acts (see [`policy::Reclaimer`]). Views can briefly disagree, so reclaimed
//! ranges also settle before use: a second reclaimer's entries tie with ours,
//! the ring's order picks one owner (the other yields instead of refusing the
//! gossip as a conflict), and neither allocates, grants a claim or donates
//! from them until the settle period is over.
//!
//! Owns: address ownership and allocations. Uses the mesh and the state file.
//! Must not touch: the data path, DNS, Docker.

mod actor;
pub mod core;
mod gossiper;
pub mod paxos;
pub mod policy;
pub mod ring;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::actor::{Actor, Request};
use self::core::{AddrRequest, AllocError, Init, Ipam, Persisted};
use self::gossiper::{IpamGossiper, Shared};
use crate::mesh::{MeshBuilder, PeerName};
use crate::state::{StateError, StateStore};
use crate::task::{Task, TaskError};

/// The gossip channel's name.
pub const CHANNEL: &str = "ipam";
/// The state directory section.
const SECTION: &str = "ipam";
/// How long an allocation or claim may wait (for agreement or space).
pub const WAIT: Duration = Duration::from_secs(30);
/// How long reclaimed ranges settle before they are allocated from: long
/// enough for gossip to carry a second reclaimer's entries across the majority
/// side (a few rounds of the mesh's gossip), short enough not to be noticed.
pub const SETTLE: Duration = Duration::from_secs(3);
/// The default grace period before a gone peer's space is reclaimed.
pub const DEFAULT_RECLAIM_AFTER: Duration = Duration::from_secs(30 * 60);
/// Requests queued for the actor before askers wait for room.
const QUEUE: usize = 4096;
/// How long [`IpamService::shutdown`] waits for the task: longer than the
/// retries of a failing state write (about 3 s), so a stop does not cut one.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// What the discovery source (if one runs) last said about the group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovered {
    /// The members' underlay addresses, for the reclaim rule.
    pub members: BTreeSet<Ipv4Addr>,
    /// How many hosts the group should have (at least the members, this host
    /// included; more while instances are still starting): sizes the agreement
    /// with [`Init::Discovery`].
    pub group_size: usize,
}

/// Settings of IPAM.
#[derive(Debug, Clone)]
pub struct IpamConfig {
    /// This peer.
    pub me: PeerName,
    /// The whole overlay range (`--ipalloc-range`).
    pub range: Ipv4Net,
    /// Where addresses come from unless a subnet is asked for (`--ipalloc-default-subnet`).
    pub default_subnet: Ipv4Net,
    /// How initial ownership is decided (`--ipalloc-init`).
    pub init: Init,
    /// Reclaim the space of peers gone this long (None: only `weft rmpeer`).
    pub reclaim_after: Option<Duration>,
}

/// Why IPAM could not start, or could not do what was asked. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The state file could not be read at start.
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the state directory holds addresses from range {saved}, but --ipalloc-range is {given}: launch with the same range, or `weft reset` this peer first")]
    RangeChanged { saved: Ipv4Net, given: Ipv4Net },
    #[error("--ipalloc-default-subnet {subnet} is not inside --ipalloc-range {range}")]
    SubnetOutside { subnet: Ipv4Net, range: Ipv4Net },
    #[error("IPAM has stopped (the agent is stopping, or IPAM failed: see its log)")]
    Stopped,
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("timed out after {after:?} waiting for {waiting_for}; try again (`weft status ipam` shows what it waits for)")]
    Timeout { after: Duration, waiting_for: &'static str },
    #[error("peer {peer} is reachable: stop it (or `weft reset` it) before taking its addresses")]
    PeerReachable { peer: PeerName },
    #[error("a peer cannot rmpeer itself; use `weft reset`")]
    RmpeerSelf,
    #[error("peer {peer} was stopped on purpose (`weft stop`): its data path still forwards for its containers, which keep their addresses, so taking its space would hand them out twice; start its agent again, `weft reset` it, or if that host is gone for good: `weft rmpeer --force`")]
    PeerStopped { peer: PeerName },
    #[error("unknown peer {given:?}: give its name (one of {}) or a nickname of a known peer", comma_separated(known))]
    UnknownPeer { given: String, known: Vec<PeerName> },
    #[error("{count} addresses are still allocated here; detach the containers first")]
    StillAllocated { count: usize },
    /// A state write kept failing: IPAM stopped rather than answer with state
    /// a restart would forget.
    #[error("cannot save the IPAM state ({source}), so IPAM stopped rather than hand out addresses a restart would forget: free space or fix the state directory, then restart weft")]
    Persist {
        #[source]
        source: StateError,
    },
    #[error("saving the IPAM state did not finish ({source}); a bug if it panicked: please report it with the log")]
    PersistAborted {
        #[source]
        source: tokio::task::JoinError,
    },
}

impl IpamError {
    /// Whether the same request may succeed later, unchanged: true when the
    /// request is fine and the condition is IPAM's — most pass on their own
    /// (agreement pending, a peer away or not yet joined, no space yet, IPAM
    /// stopping), a few need the operator (a state file that cannot be written
    /// or was damaged); false for the caller's own mistakes (a bad address or
    /// subnet, an address in use, a live peer to rmpeer) and for launch flags
    /// that must change. The API answers 503 for the first, 400 for the second.
    pub fn is_retryable(&self) -> bool {
        match self {
            // This agent's own condition, not the request's.
            IpamError::Stopped
            | IpamError::Timeout { .. }
            | IpamError::State(_)
            | IpamError::Persist { .. }
            | IpamError::PersistAborted { .. } => true,
            IpamError::Alloc(e) => match e {
                AllocError::Exhausted(_)
                | AllocError::OwnerUnreachable { .. }
                | AllocError::NoRing
                | AllocError::Unowned { .. } => true,
                AllocError::OutsideRange { .. }
                | AllocError::InUse { .. }
                | AllocError::Reserved { .. }
                | AllocError::ClaimRefused { .. } => false,
            },
            IpamError::RangeChanged { .. }
            | IpamError::SubnetOutside { .. }
            | IpamError::PeerReachable { .. }
            | IpamError::RmpeerSelf
            | IpamError::PeerStopped { .. }
            | IpamError::UnknownPeer { .. }
            | IpamError::StillAllocated { .. } => false,
        }
    }
}

fn comma_separated(peers: &[PeerName]) -> String {
    peers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// One peer's share, for `weft status ipam`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerSpace {
    /// The peer.
    pub peer: PeerName,
    /// Its nickname, if the topology knows it.
    pub nickname: Option<String>,
    /// Addresses it owns.
    pub owned: u64,
    /// Of those, free as it last said.
    pub free: u64,
    /// Whether this peer reaches it now.
    pub reachable: bool,
}

/// The state of IPAM.
#[derive(Debug, Clone, Serialize)]
pub struct IpamStatus {
    /// The whole range.
    pub range: Ipv4Net,
    /// The default subnet.
    pub default_subnet: Ipv4Net,
    /// What allocations wait for ("" when they do not).
    pub waiting_for: String,
    /// Voters known and quorum, while undecided.
    pub consensus: Option<(usize, usize)>,
    /// Addresses allocated on this peer.
    pub used: usize,
    /// Every owner's share.
    pub peers: Vec<PeerSpace>,
    /// Share of the range owned by unreachable peers, percent.
    pub unreachable_percent: f64,
    /// The last ring conflict refused (a peer seeded differently), if any.
    pub conflict: Option<String>,
    /// This peer's allocations: id → addresses.
    pub allocations: BTreeMap<String, Vec<Ipv4Addr>>,
}

/// The handle other modules use: requests to the IPAM task.
#[derive(Clone, Debug)]
pub struct IpamHandle {
    tx: mpsc::Sender<Request>,
}

impl IpamHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, IpamError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| IpamError::Stopped)?;
        rx.await.map_err(|_| IpamError::Stopped)
    }

    /// An address for `id` in `subnet` (the default subnet if `None`), with the
    /// subnet's prefix.
    pub async fn allocate(&self, id: &str, subnet: Option<Ipv4Net>) -> Result<Ipv4Net, IpamError> {
        self.ask(|reply| Request::Address { req: AddrRequest::Allocate { id: id.into(), subnet }, reply }).await?
    }

    /// Claims `addr` for `id`.
    pub async fn claim(&self, id: &str, addr: Ipv4Addr) -> Result<Ipv4Net, IpamError> {
        self.ask(|reply| Request::Address { req: AddrRequest::Claim { id: id.into(), addr }, reply }).await?
    }

    /// Releases `id`'s addresses; returns them.
    pub async fn release(&self, id: &str) -> Result<Vec<Ipv4Addr>, IpamError> {
        self.ask(|reply| Request::Release { id: id.into(), reply }).await
    }

    /// `id`'s addresses.
    pub async fn lookup(&self, id: &str) -> Result<Vec<Ipv4Net>, IpamError> {
        self.ask(|reply| Request::Lookup { id: id.into(), reply }).await
    }

    /// The status.
    pub async fn status(&self) -> Result<IpamStatus, IpamError> {
        self.ask(|reply| Request::Status { reply }).await
    }

    /// Takes a dead peer's space over (`weft rmpeer`); `peer` is a name or
    /// nickname. A peer stopped on purpose is refused unless `force`.
    pub async fn rmpeer(&self, peer: &str, force: bool) -> Result<u64, IpamError> {
        self.ask(|reply| Request::RmPeer { peer: peer.into(), force, reply }).await?
    }

    /// Gives all of this peer's space to another peer (`weft reset`).
    pub async fn give_away(&self) -> Result<u64, IpamError> {
        self.ask(|reply| Request::GiveAway { reply }).await?
    }
}

/// Loads the saved state, or starts afresh; refuses settings that contradict it.
fn load(config: &IpamConfig, store: &StateStore) -> Result<Ipam, IpamError> {
    if !config.range.contains(&config.default_subnet) {
        return Err(IpamError::SubnetOutside { subnet: config.default_subnet, range: config.range });
    }
    Ok(match store.section::<Persisted>(SECTION)? {
        Some(saved) if saved.ring.range != config.range.trunc() => {
            return Err(IpamError::RangeChanged { saved: saved.ring.range, given: config.range });
        }
        Some(saved) => Ipam::restore(config.me, config.default_subnet, config.init.clone(), saved),
        None => Ipam::new(config.me, config.range, config.default_subnet, config.init.clone()),
    })
}

/// Starts IPAM: loads (or creates) its state, registers the `ipam` gossip
/// channel on `mesh` (so it exists before the first connection), and spawns
/// its task. Fails before anything is registered or spawned if the settings
/// contradict the saved state. `discovery` lists the underlay addresses the
/// discovery source sees (`None` when none runs), for the reclaim rule.
pub fn spawn(
    config: IpamConfig,
    store: Arc<StateStore>,
    mesh: &mut MeshBuilder,
    discovery: watch::Receiver<Option<Discovered>>,
) -> Result<IpamService, IpamError> {
    let ipam = load(&config, &store)?;
    let (shared, unicasts) = Shared::new(ipam);
    mesh.add_channel(CHANNEL, Arc::new(IpamGossiper(shared.clone())));
    let (tx, rx) = mpsc::channel(QUEUE);
    let actor = Actor::new(config, shared, store, mesh.handle(), discovery);
    let task = Task::spawn("ipam", tracing::info_span!("ipam"), CancellationToken::new(), move |cancel| {
        actor.run(rx, unicasts, cancel)
    });
    Ok(IpamService { handle: IpamHandle { tx }, task })
}

/// The running IPAM; its owner stops it. Dropped without [`IpamService::shutdown`],
/// the task still ends once every [`IpamHandle`] is gone.
#[derive(Debug)]
pub struct IpamService {
    handle: IpamHandle,
    task: Task<IpamError>,
}

impl IpamService {
    /// A handle for the other subsystems.
    pub fn handle(&self) -> IpamHandle {
        self.handle.clone()
    }

    /// Stops the task and returns how it ended: its error if a state write
    /// kept failing ([`IpamError::Persist`]), a panic, or a stop that took
    /// longer than a few seconds. Requests still waiting are answered
    /// [`IpamError::Stopped`].
    pub async fn shutdown(self) -> Result<(), TaskError<IpamError>> {
        self.task.shutdown_within(STOP_WITHIN).await
    }

    /// Whether the task ended on its own (its error comes from [`Self::shutdown`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::MeshConfig;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("a valid network")
    }

    fn config(range: &str) -> IpamConfig {
        IpamConfig {
            me: PeerName::new(0x0200_0000_0001),
            range: net(range),
            default_subnet: net(range),
            init: Init::Consensus(1),
            reclaim_after: None,
        }
    }

    fn temp_dir(what: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("weft-ipam-{what}-{}-{}", std::process::id(), rand::random::<u32>()))
    }

    async fn builder() -> MeshBuilder {
        let mut mesh = MeshConfig::new(PeerName::new(0x0200_0000_0001), "test");
        mesh.listen = "127.0.0.1:0".parse().expect("an address");
        MeshBuilder::bind(mesh).await.expect("bind port 0")
    }

    fn no_discovery() -> watch::Receiver<Option<Discovered>> {
        watch::channel(None).1
    }

    #[tokio::test]
    async fn spawn_serves_persists_and_shuts_down_cleanly() {
        let dir = temp_dir("spawn");
        let store = Arc::new(StateStore::open(&dir).expect("state dir"));
        let mut b = builder().await;
        let service = spawn(config("10.32.0.0/24"), store.clone(), &mut b, no_discovery()).expect("spawn");
        let mesh = b.start();
        let ipam = service.handle();
        let got = ipam.allocate("c1", None).await.expect("a lone peer with consensus=1 decides alone");
        assert_eq!(got, net("10.32.0.1/24"));
        assert!(service.shutdown().await.is_ok(), "a clean stop");
        assert!(matches!(ipam.lookup("c1").await, Err(IpamError::Stopped)), "handles outlive the task, and say so");
        mesh.leave().await.expect("mesh stops");

        // A second start resumes the allocation from the state file.
        let mut b = builder().await;
        let service = spawn(config("10.32.0.0/24"), store.clone(), &mut b, no_discovery()).expect("respawn");
        let mesh = b.start();
        assert_eq!(service.handle().lookup("c1").await.expect("lookup"), vec![got]);
        assert!(service.shutdown().await.is_ok());
        mesh.leave().await.expect("mesh stops");

        // Settings the saved state contradicts are refused at spawn, before any task runs.
        let mut b = builder().await;
        let err = spawn(config("10.40.0.0/24"), store.clone(), &mut b, no_discovery()).unwrap_err();
        assert!(matches!(err, IpamError::RangeChanged { .. }) && !err.is_retryable(), "{err}");
        assert!(err.to_string().contains("--ipalloc-range"), "{err}");
        let mut outside = config("10.32.0.0/24");
        outside.default_subnet = net("10.99.0.0/24");
        let err = spawn(outside, store, &mut b, no_discovery()).unwrap_err();
        assert!(matches!(err, IpamError::SubnetOutside { .. }), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_state_write_that_keeps_failing_stops_ipam_with_its_error() {
        let dir = temp_dir("persist");
        let store = Arc::new(StateStore::open(&dir).expect("state dir"));
        let mut b = builder().await;
        let service = spawn(config("10.32.0.0/24"), store, &mut b, no_discovery()).expect("spawn");
        let mesh = b.start();
        // The state directory vanishes: no write can succeed (root ignores modes).
        std::fs::remove_dir_all(&dir).expect("remove the state dir");
        let err = service.handle().allocate("c1", None).await.unwrap_err();
        assert!(matches!(err, IpamError::Stopped), "never answered with an address that is not on disk: {err}");
        match service.shutdown().await {
            Err(TaskError::Failed(IpamError::Persist { source })) => {
                assert!(source.to_string().contains(&dir.display().to_string()), "{source}")
            }
            other => panic!("the write error comes back through shutdown: {other:?}"),
        }
        mesh.leave().await.expect("mesh stops");
    }

    #[test]
    fn retryable_errors_are_the_ones_that_pass() {
        let peer = PeerName::new(0x0200_0000_0002);
        let addr = Ipv4Addr::new(10, 32, 0, 5);
        let subnet = net("10.32.0.0/24");
        for e in [
            IpamError::Stopped,
            IpamError::Timeout { after: WAIT, waiting_for: "agreement on the address space" },
            IpamError::Alloc(AllocError::Exhausted(subnet)),
            IpamError::Alloc(AllocError::OwnerUnreachable { addr, peer }),
            IpamError::Alloc(AllocError::NoRing),
        ] {
            assert!(e.is_retryable(), "{e}");
        }
        for e in [
            IpamError::Alloc(AllocError::OutsideRange { subnet, range: subnet }),
            IpamError::Alloc(AllocError::InUse { addr, by: "c1".into() }),
            IpamError::Alloc(AllocError::Reserved { addr, subnet }),
            IpamError::Alloc(AllocError::ClaimRefused { addr, peer, reason: "it is in use by c1".into() }),
            IpamError::PeerReachable { peer },
            IpamError::RmpeerSelf,
            IpamError::UnknownPeer { given: "x".into(), known: vec![peer] },
            IpamError::StillAllocated { count: 2 },
            IpamError::RangeChanged { saved: subnet, given: net("10.40.0.0/24") },
            IpamError::SubnetOutside { subnet, range: subnet },
        ] {
            assert!(!e.is_retryable(), "{e}");
        }
    }
}

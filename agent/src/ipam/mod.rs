//! IPAM: every container an address, never the same one twice.
//!
//! The range is a ring of ranges owned by peers ([`ring`]); initial ownership is
//! decided by agreement ([`paxos`]) or seeded; the state machine is [`core`].
//! This module is its shell: an actor that batches requests, persists before it
//! answers or gossips (group commit), talks to other peers over the mesh's
//! `ipam` channel, and reclaims the space of peers that are gone for good.
//!
//! Reclaiming safely: a dead peer's ranges are taken over automatically only
//! when (1) it has been unreachable for the grace period and is absent from
//! discovery, (2) this peer can reach a strict majority of the peers owning
//! space in the ring — at most one side of a partition can — and (3) this peer
//! has the smallest name among the peers it reaches, so one peer on that side
//! acts. Views can briefly disagree, so reclaimed ranges also settle before use:
//! a second reclaimer's entries tie with ours at the same version, the ring's
//! order picks one owner, and neither allocates from them until that is seen.
//!
//! Owns: address ownership and allocations. Uses the mesh. Must not touch: the
//! data path, DNS, Docker.

pub mod core;
pub mod paxos;
pub mod policy;
pub mod ring;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::core::{AddrRequest, AllocError, Effect, GossipState, Init, Ipam, Msg, Outcome, Persisted};
use self::policy::Reclaimer;
use crate::mesh::{GossipError, Gossiper, MeshHandle, MeshStatus, PeerName};
use crate::state::StateStore;

/// The gossip channel's name.
pub const CHANNEL: &str = "ipam";
/// The state directory section.
const SECTION: &str = "ipam";
/// How long an allocation or claim may wait (for agreement or space).
pub const WAIT: Duration = Duration::from_secs(30);
/// How long an unanswered space request is waited for before asking another peer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a stalled election waits before this peer proposes again.
const REPROPOSE: Duration = Duration::from_secs(5);
/// How long reclaimed ranges settle before they are allocated from.
pub const SETTLE: Duration = Duration::from_secs(3);
/// The default grace period before a gone peer's space is reclaimed.
pub const DEFAULT_RECLAIM_AFTER: Duration = Duration::from_secs(30 * 60);

/// Settings of IPAM.
#[derive(Debug, Clone)]
pub struct IpamConfig {
    pub me: PeerName,
    pub range: Ipv4Net,
    pub default_subnet: Ipv4Net,
    pub init: Init,
    /// Reclaim the space of peers gone this long (None: only `weft rmpeer`).
    pub reclaim_after: Option<Duration>,
}

/// Why IPAM could not start, or could not do what was asked. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The state file could not be read at start.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("the state directory holds addresses from range {saved}, but --ipalloc-range is {given}: launch with the same range, or `weft reset` this peer first")]
    RangeChanged { saved: Ipv4Net, given: Ipv4Net },
    #[error("--ipalloc-default-subnet {subnet} is not inside --ipalloc-range {range}")]
    SubnetOutside { subnet: Ipv4Net, range: Ipv4Net },
    #[error("IPAM has stopped")]
    Stopped,
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("timed out after {after:?} waiting for {waiting_for}; try again (`weft status ipam` shows what it waits for)")]
    Timeout { after: Duration, waiting_for: &'static str },
    #[error("peer {peer} is reachable: stop it (or `weft reset` it) before taking its addresses")]
    PeerReachable { peer: PeerName },
    #[error("a peer cannot rmpeer itself; use `weft reset`")]
    RmpeerSelf,
    #[error("unknown peer {given:?}: give its name (one of {}) or a nickname of a known peer", comma_separated(known))]
    UnknownPeer { given: String, known: Vec<PeerName> },
    #[error("{count} addresses are still allocated here; detach the containers first")]
    StillAllocated { count: usize },
}

impl IpamError {
    /// Whether the same request may succeed later, unchanged: true for
    /// conditions of the cluster or of this agent that pass (agreement pending,
    /// a peer away or not yet joined, no space yet, IPAM stopping), false for
    /// the caller's own mistakes (a bad address or subnet, an address in use, a
    /// live peer to rmpeer) and launch flags that must change. The API answers
    /// 503 for the first, 400 for the second.
    pub fn is_retryable(&self) -> bool {
        match self {
            IpamError::Stopped | IpamError::Timeout { .. } | IpamError::State(_) => true,
            IpamError::Alloc(e) => match e {
                AllocError::Exhausted(_) | AllocError::OwnerUnreachable { .. } | AllocError::NoRing => true,
                AllocError::OutsideRange { .. }
                | AllocError::InUse { .. }
                | AllocError::Reserved { .. }
                | AllocError::ClaimRefused { .. } => false,
            },
            IpamError::RangeChanged { .. }
            | IpamError::SubnetOutside { .. }
            | IpamError::PeerReachable { .. }
            | IpamError::RmpeerSelf
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
    pub peer: PeerName,
    pub nickname: Option<String>,
    pub owned: u64,
    pub free: u64,
    pub reachable: bool,
}

/// The state of IPAM.
#[derive(Debug, Clone, Serialize)]
pub struct IpamStatus {
    pub range: Ipv4Net,
    pub default_subnet: Ipv4Net,
    /// What allocations wait for ("" when they do not).
    pub waiting_for: String,
    /// Voters known and quorum, while undecided.
    pub consensus: Option<(usize, usize)>,
    /// Addresses allocated on this peer.
    pub used: usize,
    pub peers: Vec<PeerSpace>,
    /// Share of the range owned by unreachable peers, percent.
    pub unreachable_percent: f64,
    /// The last ring conflict refused (a peer seeded differently), if any.
    pub conflict: Option<String>,
    pub allocations: BTreeMap<String, Vec<Ipv4Addr>>,
}

enum Request {
    Address { req: AddrRequest, reply: oneshot::Sender<Result<Ipv4Net, IpamError>> },
    Release { id: String, reply: oneshot::Sender<Vec<Ipv4Addr>> },
    Lookup { id: String, reply: oneshot::Sender<Vec<Ipv4Net>> },
    Status { reply: oneshot::Sender<IpamStatus> },
    RmPeer { peer: String, reply: oneshot::Sender<Result<u64, IpamError>> },
    GiveAway { reply: oneshot::Sender<Result<u64, IpamError>> },
}

/// What the mesh's callbacks share with the actor.
struct Shared {
    ipam: Mutex<Ipam>,
    /// The gossip handler found something to persist or pass on.
    dirty: Notify,
    /// ... and our own state changed in a way the peers must hear (Paxos).
    gossip_due: std::sync::atomic::AtomicBool,
    unicasts: mpsc::UnboundedSender<(PeerName, Msg)>,
    conflict: Mutex<Option<String>>,
}

/// The mesh side of IPAM.
pub struct IpamGossiper(Arc<Shared>);

impl Gossiper for IpamGossiper {
    fn full_state(&self) -> Vec<u8> {
        let state = self.0.ipam.lock().expect("ipam lock").gossip_state();
        postcard::to_stdvec(&state).expect("state encodes")
    }

    fn on_gossip(&self, from: PeerName, update: &[u8]) -> Result<Option<Vec<u8>>, GossipError> {
        let state: GossipState = postcard::from_bytes(update)
            .map_err(|e| GossipError::Decode { channel: CHANNEL.into(), detail: e.to_string() })?;
        let mut ipam = self.0.ipam.lock().expect("ipam lock");
        let mut effects = Vec::new();
        match ipam.on_gossip(&state, &mut effects) {
            Ok(changed) => {
                let forward = changed.then(|| postcard::to_stdvec(&ipam.gossip_state()).expect("state encodes"));
                drop(ipam);
                if effects.contains(&Effect::Gossip) {
                    self.0.gossip_due.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if changed || !effects.is_empty() {
                    self.0.dirty.notify_one();
                }
                Ok(forward)
            }
            Err(e) => {
                let msg = format!("refusing the address space of peer {from}: {e}");
                warn!("{msg}");
                *self.0.conflict.lock().expect("conflict lock") = Some(msg);
                Err(GossipError::Rejected { channel: CHANNEL.into(), detail: e.to_string() })
            }
        }
    }

    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        let msg: Msg = postcard::from_bytes(msg)
            .map_err(|e| GossipError::Decode { channel: CHANNEL.into(), detail: e.to_string() })?;
        let _ = self.0.unicasts.send((src, msg));
        Ok(())
    }

    fn on_peers_gone(&self, _peers: &[PeerName]) {
        self.0.dirty.notify_one();
    }
}

/// The handle other modules use.
#[derive(Clone)]
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

    /// Takes a dead peer's space over (`weft rmpeer`); `peer` is a name or nickname.
    pub async fn rmpeer(&self, peer: &str) -> Result<u64, IpamError> {
        self.ask(|reply| Request::RmPeer { peer: peer.into(), reply }).await?
    }

    /// Gives all of this peer's space to another peer (`weft reset`).
    pub async fn give_away(&self) -> Result<u64, IpamError> {
        self.ask(|reply| Request::GiveAway { reply }).await?
    }
}

/// Loads (or creates) the IPAM state; returns the gossiper for the mesh and the
/// parts the actor needs once the mesh is up.
pub fn open(config: &IpamConfig, store: &StateStore) -> Result<(Arc<dyn Gossiper>, Pending), IpamError> {
    if !config.range.contains(&config.default_subnet) {
        return Err(IpamError::SubnetOutside { subnet: config.default_subnet, range: config.range });
    }
    let ipam = match store.section::<Persisted>(SECTION)? {
        Some(saved) if saved.ring.range != config.range.trunc() => {
            return Err(IpamError::RangeChanged { saved: saved.ring.range, given: config.range });
        }
        Some(saved) => Ipam::restore(config.me, config.default_subnet, config.init.clone(), saved),
        None => Ipam::new(config.me, config.range, config.default_subnet, config.init.clone()),
    };
    let (utx, urx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        ipam: Mutex::new(ipam),
        dirty: Notify::new(),
        gossip_due: std::sync::atomic::AtomicBool::new(false),
        unicasts: utx,
        conflict: Mutex::new(None),
    });
    Ok((Arc::new(IpamGossiper(shared.clone())), Pending { shared, unicasts: urx }))
}

/// What [`open`] prepared for [`spawn`].
pub struct Pending {
    shared: Arc<Shared>,
    unicasts: mpsc::UnboundedReceiver<(PeerName, Msg)>,
}

/// Starts the actor.
pub fn spawn(
    config: IpamConfig,
    pending: Pending,
    store: Arc<StateStore>,
    mesh: MeshHandle,
    discovery: watch::Receiver<Option<BTreeSet<Ipv4Addr>>>,
    cancel: CancellationToken,
) -> IpamHandle {
    let (tx, rx) = mpsc::channel(4096);
    let reclaimer = config.reclaim_after.map(Reclaimer::new);
    let actor = Actor {
        config,
        shared: pending.shared,
        store,
        mesh,
        discovery,
        waiting: Vec::new(),
        asked_at: BTreeMap::new(),
        reclaimer,
        election_started: None,
        settle_at: None,
    };
    tokio::spawn(actor.run(rx, pending.unicasts, cancel));
    IpamHandle { tx }
}

/// An address request waiting for agreement, space or an owner's answer.
struct Waiter {
    req: AddrRequest,
    deadline: Instant,
    reply: oneshot::Sender<Result<Ipv4Net, IpamError>>,
}

/// Answers to send once the batch is on disk.
type Replies = Vec<Box<dyn FnOnce() + Send>>;

/// Tries `w` once ([`Ipam::try_request`]); answers it if it is done, failed or
/// out of time, else hands it back to wait on. Both a new request and a
/// waiting one go through here.
fn attempt(
    ipam: &mut Ipam,
    w: Waiter,
    reach: &BTreeSet<PeerName>,
    now: Instant,
    effects: &mut Vec<Effect>,
    replies: &mut Replies,
) -> Option<Waiter> {
    let answer = match ipam.try_request(&w.req, reach, effects) {
        Ok(Outcome::Done(net)) => Ok(net),
        Ok(Outcome::Wait(why)) if now >= w.deadline => {
            ipam.give_up(&w.req);
            Err(IpamError::Timeout { after: WAIT, waiting_for: why })
        }
        Ok(Outcome::Wait(_)) => return Some(w),
        Err(e) => Err(e.into()),
    };
    let reply = w.reply;
    replies.push(Box::new(move || {
        let _ = reply.send(answer);
    }));
    None
}

struct Actor {
    config: IpamConfig,
    shared: Arc<Shared>,
    store: Arc<StateStore>,
    mesh: MeshHandle,
    discovery: watch::Receiver<Option<BTreeSet<Ipv4Addr>>>,
    waiting: Vec<Waiter>,
    asked_at: BTreeMap<Ipv4Net, Instant>,
    /// The automatic reclaim rule and its clocks (None: only `weft rmpeer`).
    reclaimer: Option<Reclaimer>,
    election_started: Option<Instant>,
    settle_at: Option<Instant>,
}

/// Effects gathered over a batch.
#[derive(Default)]
struct Batch {
    persist: bool,
    gossip: bool,
    unicasts: Vec<(PeerName, Msg)>,
}

impl Batch {
    fn add(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Persist => self.persist = true,
                Effect::Gossip => self.gossip = true,
                Effect::Unicast(p, m) => self.unicasts.push((p, m)),
            }
        }
    }
}

fn reachable(status: &MeshStatus, me: PeerName) -> BTreeSet<PeerName> {
    status.routes.keys().copied().chain([me]).collect()
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        mut unicasts: mpsc::UnboundedReceiver<(PeerName, Msg)>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let shared = self.shared.clone();
        loop {
            let mut batch = Batch::default();
            let mut replies: Replies = Vec::new();
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = rx.recv() => match r {
                    Some(req) => {
                        self.request(req, &mut batch, &mut replies);
                        // Group commit: everything ready goes into one write.
                        for _ in 0..1024 {
                            match rx.try_recv() {
                                Ok(req) => self.request(req, &mut batch, &mut replies),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                Some((src, msg)) = unicasts.recv() => {
                    let mut effects = Vec::new();
                    self.shared.ipam.lock().expect("ipam lock").on_unicast(src, msg, &mut effects);
                    batch.add(effects);
                }
                _ = shared.dirty.notified() => {
                    // Gossip merged something: it may be a decided ring or a
                    // donation; it is persisted with the next write.
                    batch.persist = true;
                    batch.gossip = shared.gossip_due.swap(false, std::sync::atomic::Ordering::Relaxed);
                }
                _ = tick.tick() => self.tick(&mut batch),
            }
            self.retry_waiting(&mut batch, &mut replies);
            self.flush(batch).await;
            for reply in replies {
                reply();
            }
        }
    }

    fn request(&mut self, req: Request, batch: &mut Batch, replies: &mut Replies) {
        let status = self.mesh.status().borrow().clone();
        let reach = reachable(&status, self.config.me);
        let shared = self.shared.clone();
        let mut ipam = shared.ipam.lock().expect("ipam lock");
        let mut effects = Vec::new();
        let now = Instant::now();
        match req {
            Request::Address { req, reply } => {
                let waiter = Waiter { req, deadline: now + WAIT, reply };
                if let Some(w) = attempt(&mut ipam, waiter, &reach, now, &mut effects, replies) {
                    self.note_waiting(&ipam, w.req.subnet());
                    self.waiting.push(w);
                }
            }
            Request::Release { id, reply } => {
                let released = ipam.release(&id, &mut effects);
                replies.push(Box::new(move || {
                    let _ = reply.send(released);
                }));
            }
            Request::Lookup { id, reply } => {
                let _ = reply.send(ipam.lookup_nets(&id));
            }
            Request::Status { reply } => {
                drop(ipam);
                let s = self.status(&status);
                let _ = reply.send(s);
                return;
            }
            Request::RmPeer { peer, reply } => {
                let nicknames = status.peers.iter().map(|p| (p.name, p.nickname.as_str()));
                let owners = ipam.ring().ownership().into_keys();
                let target = policy::rmpeer_target(&peer, self.config.me, &reach, nicknames, owners);
                let result = target.map(|dead| {
                    let moved = ipam.reclaim(dead, &mut effects);
                    info!(peer = %dead, addresses = moved, "took over a removed peer's addresses");
                    moved
                });
                if result.as_ref().is_ok_and(|m| *m > 0) {
                    self.settle_at = Some(Instant::now() + SETTLE);
                }
                replies.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
            Request::GiveAway { reply } => {
                let heir = policy::heir(self.config.me, &reach, &ipam.ring().ownership(), ipam.used());
                let result = heir.map(|heir| heir.map_or(0, |heir| ipam.give_all(heir, &mut effects)));
                replies.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
        }
        drop(ipam);
        batch.add(effects);
    }

    fn note_waiting(&mut self, ipam: &Ipam, subnet: Option<Ipv4Net>) {
        if ipam.ring().is_empty() {
            self.election_started.get_or_insert_with(Instant::now);
        } else {
            let subnet = subnet.unwrap_or(ipam.default_subnet()).trunc();
            self.asked_at.entry(subnet).or_insert_with(Instant::now);
        }
    }

    fn retry_waiting(&mut self, batch: &mut Batch, replies: &mut Replies) {
        if self.waiting.is_empty() {
            return;
        }
        let status = self.mesh.status().borrow().clone();
        let reach = reachable(&status, self.config.me);
        let mut ipam = self.shared.ipam.lock().expect("ipam lock");
        let mut effects = Vec::new();
        let now = Instant::now();
        let mut still = Vec::new();
        for w in std::mem::take(&mut self.waiting) {
            still.extend(attempt(&mut ipam, w, &reach, now, &mut effects, replies));
        }
        self.waiting = still;
        drop(ipam);
        batch.add(effects);
    }

    fn tick(&mut self, batch: &mut Batch) {
        let status = self.mesh.status().borrow().clone();
        let reach = reachable(&status, self.config.me);
        if let Some(reclaimer) = &mut self.reclaimer {
            for p in &status.peers {
                if let Some(a) = p.data_addr {
                    reclaimer.saw_address(p.name, a);
                }
            }
        }
        let shared = self.shared.clone();
        let mut ipam = shared.ipam.lock().expect("ipam lock");
        let mut effects = Vec::new();
        if ipam.refresh_free() {
            effects.push(Effect::Persist);
            effects.push(Effect::Gossip);
        }
        // An election that stalls (its proposer went away) is restarted.
        if ipam.ring().is_empty() && !self.waiting.is_empty() {
            if self.election_started.is_some_and(|t| t.elapsed() > REPROPOSE) {
                ipam.repropose(&mut effects);
                self.election_started = Some(Instant::now());
            }
        } else {
            self.election_started = None;
        }
        // A peer that never answered a space request: ask another.
        let now = Instant::now();
        for (subnet, at) in std::mem::take(&mut self.asked_at) {
            if now.duration_since(at) > ASK_TIMEOUT {
                ipam.cancel_ask(subnet);
            } else {
                self.asked_at.insert(subnet, at);
            }
        }
        if self.settle_at.is_some_and(|t| now >= t) {
            ipam.settle();
            self.settle_at = None;
        }
        self.auto_reclaim(&mut ipam, &reach, &mut effects);
        drop(ipam);
        batch.add(effects);
    }

    /// The automatic reclaim rule ([`policy::Reclaimer`]): this shell only
    /// passes the time and what it sees, and applies the decision.
    fn auto_reclaim(&mut self, ipam: &mut Ipam, reach: &BTreeSet<PeerName>, effects: &mut Vec<Effect>) {
        let Some(reclaimer) = &mut self.reclaimer else { return };
        let now = Instant::now();
        let owners: BTreeSet<PeerName> = ipam.ring().ownership().into_keys().collect();
        let discovered = self.discovery.borrow().clone();
        let view = policy::View { now, me: self.config.me, owners: &owners, reachable: reach, discovered: discovered.as_ref() };
        for p in reclaimer.due(&view) {
            let moved = ipam.reclaim(p, effects);
            if moved > 0 {
                let grace = reclaimer.grace();
                info!(peer = %p, addresses = moved, "reclaimed the address space of a peer gone longer than {grace:?}");
                self.settle_at = Some(now + SETTLE);
            }
        }
    }

    fn status(&self, mesh: &MeshStatus) -> IpamStatus {
        let reach = reachable(mesh, self.config.me);
        let ipam = self.shared.ipam.lock().expect("ipam lock");
        let owned = ipam.ring().ownership();
        let free = ipam.ring().free_by_peer();
        let total: u64 = owned.values().sum();
        let unreachable: u64 = owned.iter().filter(|(p, _)| !reach.contains(p)).map(|(_, n)| n).sum();
        let nick = |p: &PeerName| mesh.peers.iter().find(|s| s.name == *p).map(|s| s.nickname.clone());
        IpamStatus {
            range: ipam.range(),
            default_subnet: ipam.default_subnet(),
            waiting_for: ipam.waiting_for().to_string(),
            consensus: ipam.consensus(),
            used: ipam.used(),
            peers: owned
                .iter()
                .map(|(p, n)| PeerSpace {
                    peer: *p,
                    nickname: nick(p),
                    owned: *n,
                    free: free.get(p).copied().unwrap_or(0),
                    reachable: reach.contains(p),
                })
                .collect(),
            unreachable_percent: if total == 0 { 0.0 } else { 100.0 * unreachable as f64 / total as f64 },
            conflict: self.shared.conflict.lock().expect("conflict lock").clone(),
            allocations: ipam.allocations(),
        }
    }

    async fn flush(&mut self, batch: Batch) {
        if batch.persist || batch.gossip {
            let (persisted, state) = {
                let ipam = self.shared.ipam.lock().expect("ipam lock");
                (ipam.persisted(), ipam.gossip_state())
            };
            if batch.persist {
                let store = self.store.clone();
                let written = tokio::task::spawn_blocking(move || store.set_section(SECTION, &persisted)).await;
                if let Err(e) = written.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                    warn!(error = %e, "cannot save the IPAM state");
                }
            }
            if batch.gossip {
                let _ = self.mesh.gossip(CHANNEL, postcard::to_stdvec(&state).expect("state encodes")).await;
            }
        }
        for (peer, msg) in batch.unicasts {
            let bytes = postcard::to_stdvec(&msg).expect("messages encode");
            if let Err(e) = self.mesh.unicast(CHANNEL, peer, bytes).await {
                warn!(%peer, error = %e, "cannot reach a peer for IPAM");
            }
        }
    }
}

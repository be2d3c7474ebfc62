//! The shell of IPAM: one task that does the [`Ipam`] state machine's I/O. It
//! batches requests (group commit), writes the state before it answers,
//! gossips or sends anything (so nothing is said that a restart would forget),
//! retries waiting requests whenever something changed, keeps the clocks
//! (elections, space requests, settling, reclaim) and applies what [`policy`]
//! decides.
//!
//! Owns: the request queue, the timers, the `ipam` section of the state file.
//! Must not touch: the rules themselves (they are in [`super::core`] and
//! [`policy`], where tests reach them), the data path, DNS, Docker.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::core::{AddrRequest, Effect, Ipam, Msg, Outcome};
use super::gossiper::{Shared, encode};
use super::policy::{self, Reclaimer};
use super::{CHANNEL, Discovered, IpamConfig, IpamError, IpamStatus, PeerSpace, SECTION, SETTLE, WAIT};
use crate::mesh::{MeshHandle, MeshStatus, PeerName};
use crate::state::StateStore;

/// How long an unanswered space request is waited for before asking another peer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a stalled election waits before this peer proposes again.
const REPROPOSE: Duration = Duration::from_secs(5);
/// How often the clocks are looked at: a second is fine against timeouts of seconds.
const TICK: Duration = Duration::from_secs(1);
/// Requests taken into one batch at most, so a flood cannot starve the ticks.
const BATCH_MAX: usize = 1024;
/// Tries of a state write before IPAM stops: a disk briefly full or busy gets
/// [`PERSIST_BACKOFF`] doubling in between (about 3 s in all) to recover.
const PERSIST_TRIES: u32 = 5;
/// The first pause between two tries of a failed state write.
const PERSIST_BACKOFF: Duration = Duration::from_millis(200);

/// What [`super::IpamHandle`] asks the actor.
pub(super) enum Request {
    Address { req: AddrRequest, reply: oneshot::Sender<Result<Ipv4Net, IpamError>> },
    Release { id: String, reply: oneshot::Sender<Vec<Ipv4Addr>> },
    Lookup { id: String, reply: oneshot::Sender<Vec<Ipv4Net>> },
    Status { reply: oneshot::Sender<IpamStatus> },
    RmPeer { peer: String, force: bool, reply: oneshot::Sender<Result<u64, IpamError>> },
    GiveAway { reply: oneshot::Sender<Result<u64, IpamError>> },
}

/// An address request waiting for agreement, space or an owner's answer.
struct Waiter {
    req: AddrRequest,
    deadline: Instant,
    reply: oneshot::Sender<Result<Ipv4Net, IpamError>>,
}

/// Answers to send once the batch is on disk.
#[derive(Default)]
struct Replies(Vec<Box<dyn FnOnce() + Send>>);

impl Replies {
    fn push<T: Send + 'static>(&mut self, reply: oneshot::Sender<T>, value: T) {
        self.0.push(Box::new(move || {
            // The asker may have given up waiting: nobody to tell.
            let _ = reply.send(value);
        }));
    }

    fn send(self) {
        for reply in self.0 {
            reply();
        }
    }
}

/// Tries `w` once ([`Ipam::try_request`]); answers it if it is done, failed or
/// out of time, else hands it back to wait on. A new request and a waiting one
/// both go through here.
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
    replies.push(w.reply, answer);
    None
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

/// The peers this one reaches, itself included.
fn reachable(status: &MeshStatus, me: PeerName) -> BTreeSet<PeerName> {
    status.routes.keys().copied().chain([me]).collect()
}

pub(super) struct Actor {
    config: IpamConfig,
    shared: Arc<Shared>,
    store: Arc<StateStore>,
    mesh: MeshHandle,
    discovery: watch::Receiver<Option<Discovered>>,
    waiting: Vec<Waiter>,
    asked_at: BTreeMap<Ipv4Net, Instant>,
    /// The automatic reclaim rule and its clocks (None: only `weft rmpeer`).
    reclaimer: Option<Reclaimer>,
    election_started: Option<Instant>,
    settle_at: Option<Instant>,
}

impl Actor {
    pub(super) fn new(
        config: IpamConfig,
        shared: Arc<Shared>,
        store: Arc<StateStore>,
        mesh: MeshHandle,
        discovery: watch::Receiver<Option<Discovered>>,
    ) -> Self {
        Actor {
            reclaimer: config.reclaim_after.map(Reclaimer::new),
            config,
            shared,
            store,
            mesh,
            discovery,
            waiting: Vec::new(),
            asked_at: BTreeMap::new(),
            election_started: None,
            settle_at: None,
        }
    }

    /// Serves until `cancel` fires or every handle is gone. Ends with an error
    /// only when the state cannot be written: answering without it could hand
    /// an address out twice after a restart.
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        mut unicasts: mpsc::UnboundedReceiver<(PeerName, Msg)>,
        cancel: CancellationToken,
    ) -> Result<(), IpamError> {
        let mut tick = tokio::time::interval(TICK);
        let shared = self.shared.clone();
        loop {
            let mut batch = Batch::default();
            let mut replies = Replies::default();
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = rx.recv() => match r {
                    Some(req) => {
                        self.request(req, &mut batch, &mut replies);
                        // Group commit: everything ready goes into one write.
                        for _ in 0..BATCH_MAX {
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
                    self.shared.lock().on_unicast(src, msg, &mut effects);
                    batch.add(effects);
                }
                _ = shared.dirtied() => {
                    // Gossip merged something: it may be a decided ring or a
                    // donation; it is persisted with the next write.
                    batch.persist = true;
                    batch.gossip = shared.take_gossip_due();
                }
                _ = tick.tick() => self.tick(&mut batch),
            }
            self.retry_waiting(&mut batch, &mut replies);
            // On an error the replies are dropped: the askers hear "stopped".
            self.flush(batch).await?;
            replies.send();
        }
        Ok(())
    }

    fn request(&mut self, req: Request, batch: &mut Batch, replies: &mut Replies) {
        let status = self.mesh.status().borrow().clone();
        let reach = reachable(&status, self.config.me);
        let shared = self.shared.clone();
        let mut ipam = shared.lock();
        let mut effects = Vec::new();
        self.size_from_discovery(&mut ipam, &mut effects);
        let now = Instant::now();
        match req {
            Request::Address { req, reply } => {
                let waiter = Waiter { req, deadline: now + WAIT, reply };
                if let Some(w) = attempt(&mut ipam, waiter, &reach, now, &mut effects, replies) {
                    self.note_waiting(&ipam, w.req.subnet(), now);
                    self.waiting.push(w);
                }
            }
            Request::Release { id, reply } => replies.push(reply, ipam.release(&id, &mut effects)),
            Request::Lookup { id, reply } => {
                // Nothing changes: answered at once.
                let _ = reply.send(ipam.lookup_nets(&id));
            }
            Request::Status { reply } => {
                drop(ipam);
                let _ = reply.send(self.status(&status));
                return;
            }
            Request::RmPeer { peer, force, reply } => {
                let nicknames = status.peers.iter().map(|p| (p.name, p.nickname.as_str()));
                let owners = ipam.ring().ownership().into_keys();
                let held: BTreeSet<PeerName> = if force { BTreeSet::new() } else { status.held.iter().copied().collect() };
                let result = policy::rmpeer_target(&peer, self.config.me, &reach, &held, nicknames, owners).map(|dead| {
                    let moved = ipam.reclaim(dead, &mut effects);
                    info!(peer = %dead, addresses = moved, "took over a removed peer's addresses");
                    moved
                });
                if result.as_ref().is_ok_and(|m| *m > 0) {
                    self.settle_at = Some(now + SETTLE);
                }
                replies.push(reply, result);
            }
            Request::GiveAway { reply } => {
                let heir = policy::heir(self.config.me, &reach, &ipam.ring().ownership(), ipam.used());
                let result = heir.map(|heir| heir.map_or(0, |heir| ipam.give_all(heir, &mut effects)));
                replies.push(reply, result);
            }
        }
        drop(ipam);
        batch.add(effects);
    }

    fn note_waiting(&mut self, ipam: &Ipam, subnet: Option<Ipv4Net>, now: Instant) {
        if ipam.ring().is_empty() {
            self.election_started.get_or_insert(now);
        } else {
            let subnet = subnet.unwrap_or(ipam.default_subnet()).trunc();
            self.asked_at.entry(subnet).or_insert(now);
        }
    }

    fn retry_waiting(&mut self, batch: &mut Batch, replies: &mut Replies) {
        if self.waiting.is_empty() {
            return;
        }
        let status = self.mesh.status().borrow().clone();
        let reach = reachable(&status, self.config.me);
        let mut ipam = self.shared.lock();
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
        let mut ipam = shared.lock();
        let mut effects = Vec::new();
        self.size_from_discovery(&mut ipam, &mut effects);
        if ipam.refresh_free() {
            effects.push(Effect::Persist);
            effects.push(Effect::Gossip);
        }
        let now = Instant::now();
        // An election that stalls (its proposer went away) is restarted.
        if ipam.ring().is_empty() && !self.waiting.is_empty() {
            if self.election_started.is_some_and(|t| now.saturating_duration_since(t) > REPROPOSE) {
                ipam.repropose(&mut effects);
                self.election_started = Some(now);
            }
        } else {
            self.election_started = None;
        }
        // A peer that never answered a space request: ask another.
        for (subnet, at) in std::mem::take(&mut self.asked_at) {
            if now.saturating_duration_since(at) > ASK_TIMEOUT {
                ipam.cancel_ask(subnet);
            } else {
                self.asked_at.insert(subnet, at);
            }
        }
        if self.settle_at.is_some_and(|t| now >= t) {
            ipam.settle();
            self.settle_at = None;
        }
        self.auto_reclaim(&mut ipam, &reach, now, &mut effects);
        drop(ipam);
        batch.add(effects);
    }

    /// With `Init::Discovery`, the agreement's quorum follows the group's size
    /// as discovery reports it (see [`Ipam::size_from_discovery`]).
    fn size_from_discovery(&self, ipam: &mut Ipam, effects: &mut Vec<Effect>) {
        let size = self.discovery.borrow().as_ref().map_or(0, |d: &Discovered| d.group_size);
        if ipam.size_from_discovery(size, effects) {
            info!(group_size = size, quorum = ?ipam.consensus().map(|(_, q)| q), "IPAM: the discovery group sizes the agreement on the range");
        }
    }

    /// The automatic reclaim rule ([`policy::Reclaimer`]): this shell only
    /// passes the time and what it sees, and applies the decision.
    fn auto_reclaim(&mut self, ipam: &mut Ipam, reach: &BTreeSet<PeerName>, now: Instant, effects: &mut Vec<Effect>) {
        let Some(reclaimer) = &mut self.reclaimer else { return };
        let owners: BTreeSet<PeerName> = ipam.ring().ownership().into_keys().collect();
        let discovered = self.discovery.borrow().as_ref().map(|d| d.members.clone());
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
        let ipam = self.shared.lock();
        let owned = ipam.ring().ownership();
        let free = ipam.ring().free_by_peer();
        let total: u64 = owned.values().sum();
        let unreachable: u64 = owned.iter().filter(|(p, _)| !reach.contains(p)).map(|(_, n)| n).sum();
        let nick = |p: &PeerName| mesh.peer(*p).map(|s| s.nickname.clone());
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
            conflict: self.shared.conflict(),
            allocations: ipam.allocations(),
        }
    }

    /// Does a batch's effects in their order: write, then gossip, then send.
    async fn flush(&mut self, batch: Batch) -> Result<(), IpamError> {
        if batch.persist || batch.gossip {
            let (persisted, state) = {
                let ipam = self.shared.lock();
                (ipam.persisted(), ipam.gossip_state())
            };
            if batch.persist {
                self.persist(persisted).await?;
            }
            if batch.gossip {
                // Fails only once the mesh has stopped: nobody left to tell.
                let _ = self.mesh.gossip(CHANNEL, encode(&state)).await;
            }
        }
        for (peer, msg) in batch.unicasts {
            if let Err(e) = self.mesh.unicast(CHANNEL, peer, encode(&msg)).await {
                warn!(%peer, error = %e, "cannot reach a peer for IPAM");
            }
        }
        Ok(())
    }

    /// Writes the state, trying again a few times before giving up.
    async fn persist(&self, persisted: super::core::Persisted) -> Result<(), IpamError> {
        let persisted = Arc::new(persisted);
        let mut pause = PERSIST_BACKOFF;
        let mut attempt = 1;
        loop {
            let (store, state) = (self.store.clone(), persisted.clone());
            match tokio::task::spawn_blocking(move || store.set_section(SECTION, &*state)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(source)) if attempt >= PERSIST_TRIES => return Err(IpamError::Persist { source }),
                Ok(Err(e)) => warn!(error = %e, attempt, "cannot save the IPAM state; trying again in {pause:?}"),
                Err(source) => return Err(IpamError::PersistAborted { source }),
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            attempt += 1;
        }
    }
}

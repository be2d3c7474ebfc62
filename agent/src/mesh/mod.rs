//! The mesh: peers, authenticated encrypted connections, topology gossip,
//! routes, and named gossip channels for the other subsystems.
//!
//! Generic: it knows nothing of IPAM, DNS or Docker; they register a
//! [`Gossiper`] per channel. [`spawn`] starts the actor that owns the sans-IO
//! [`node::Node`], listens on TCP 6783, dials targets with exponential backoff,
//! resolves duplicate connections, enforces the connection limit, and publishes
//! a [`MeshStatus`] on a watch channel.

pub mod close;
pub mod conn;
pub mod node;
pub mod peer;
pub mod sim;
pub mod targets;
pub mod timed;
pub mod topology;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use node::{Gossip, GossipError, Gossiper};
pub use peer::PeerName;

use conn::{ConnEvent, ConnSettings, Established};
use node::{Node, Outbox};
use topology::{PeerEntry, Topology};
use crate::task::{Task, TaskError};
use wire::{Frame, Hello};

/// Weave's control port.
pub const DEFAULT_PORT: u16 = 6783;
/// Weave's default connection limit.
pub const DEFAULT_CONN_LIMIT: usize = 100;
/// How often a few random neighbours get a full anti-entropy round.
pub const ANTI_ENTROPY_INTERVAL: Duration = Duration::from_secs(5);
/// Backoff between dials of an unreachable target: doubling up to the cap.
pub const BACKOFF_START: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a peer whose agent stopped on purpose keeps its routes and endpoints
/// on the other peers (its data path keeps forwarding meanwhile).
pub const DEFAULT_HOLD: Duration = Duration::from_secs(600);
/// Shortest time between two prunes of the topology (each is a graph walk).
pub const PRUNE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a stopping agent waits for its last words to leave.
pub const STOP_DRAIN: Duration = Duration::from_secs(2);
/// Limits on what a peer may claim in the topology (a bigger claim is refused).
pub const MAX_PEERS: usize = 10_000;
pub const MAX_CONNECTIONS_PER_PEER: usize = 10_000;

/// Settings of the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub name: PeerName,
    pub nickname: String,
    /// Random per start.
    pub uid: u64,
    /// First version of this peer's topology entry (above any earlier one).
    pub version: u64,
    pub listen: SocketAddr,
    pub password: Option<String>,
    /// Addresses (`host` or `host:port`) to keep connected to.
    pub peers: Vec<String>,
    pub conn_limit: usize,
    /// Learn peers of peers from the topology and connect to them.
    pub discovery: bool,
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
    /// Our data-plane (underlay) address, announced in the topology.
    pub data_addr: Option<Ipv4Addr>,
    /// How long a paused, unreachable peer is held (see [`DEFAULT_HOLD`]).
    pub hold: Duration,
}

impl MeshConfig {
    /// Defaults for a peer called `name`.
    pub fn new(name: PeerName, nickname: impl Into<String>) -> Self {
        MeshConfig {
            name,
            nickname: nickname.into(),
            uid: rand::random(),
            version: now_micros(),
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            password: None,
            peers: Vec::new(),
            conn_limit: DEFAULT_CONN_LIMIT,
            discovery: true,
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            data_addr: None,
            hold: DEFAULT_HOLD,
        }
    }
}

/// Microseconds since the epoch: a version start above any earlier incarnation's.
pub fn now_micros() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64)
}

/// Why the mesh could not start or do something.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot listen on {addr}: {source} (is another weft running? pass --port)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the mesh has stopped")]
    Stopped,
    #[error(transparent)]
    Gossip(#[from] GossipError),
}

/// One peer as shown by `weft status peers`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: PeerName,
    pub nickname: String,
    pub uid: u64,
    pub version: u64,
    pub data_addr: Option<Ipv4Addr>,
    /// Its agent stopped on purpose; its data path keeps forwarding.
    pub paused: bool,
    /// Its connections: (peer, nickname if known, address, outbound, established both ways).
    pub connections: Vec<PeerConnStatus>,
}

/// A connection as listed by a peer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerConnStatus {
    pub name: PeerName,
    pub nickname: Option<String>,
    pub addr: SocketAddr,
    pub outbound: bool,
    pub established: bool,
}

/// State of one of our connections or connection attempts.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    Established,
    Connecting,
    Failed,
}

/// One of our connections (or a target we are trying), for `weft status connections`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnStatus {
    pub addr: String,
    pub state: ConnState,
    pub outbound: bool,
    pub peer: Option<PeerName>,
    pub nickname: Option<String>,
    pub encrypted: bool,
    /// Why it failed, or when it will be retried.
    pub info: String,
}

/// What the mesh looks like from here.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MeshStatus {
    pub name: Option<PeerName>,
    pub nickname: String,
    pub encrypted: bool,
    pub peers: Vec<PeerStatus>,
    pub connections: Vec<ConnStatus>,
    pub targets: Vec<String>,
    /// Destination peer → next hop peer.
    pub routes: BTreeMap<PeerName, PeerName>,
    /// Paused peers we cannot reach: their routes and endpoints are kept.
    pub held: Vec<PeerName>,
    /// Per broadcast origin, the neighbours this peer passes its broadcasts to.
    pub broadcast: BTreeMap<PeerName, Vec<PeerName>>,
    /// How often connections ended, by reason (for metrics).
    pub terminations: BTreeMap<String, u64>,
    /// Increases whenever the topology or routes change.
    pub generation: u64,
}

impl MeshStatus {
    /// The topology entry of `name` as a status line.
    pub fn peer(&self, name: PeerName) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }
}

enum Command {
    Connect { addrs: Vec<String>, replace: bool },
    Forget { addrs: Vec<String> },
    Gossip { channel: String, delta: Vec<u8> },
    Broadcast { channel: String, payload: Vec<u8> },
    Unicast { channel: String, dst: PeerName, payload: Vec<u8>, reply: oneshot::Sender<Result<(), GossipError>> },
    SetDataAddr(Option<Ipv4Addr>),
    Topology(oneshot::Sender<Topology>),
    Stop(oneshot::Sender<()>),
}

/// The handle other modules use.
#[derive(Clone)]
pub struct MeshHandle {
    cmd: mpsc::Sender<Command>,
    status: watch::Receiver<MeshStatus>,
    name: PeerName,
    local: SocketAddr,
}

impl MeshHandle {
    /// This peer's name.
    pub fn name(&self) -> PeerName {
        self.name
    }

    /// The address the mesh listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The latest status (and a receiver to watch it).
    pub fn status(&self) -> watch::Receiver<MeshStatus> {
        self.status.clone()
    }

    async fn send(&self, c: Command) -> Result<(), MeshError> {
        self.cmd.send(c).await.map_err(|_| MeshError::Stopped)
    }

    /// Adds targets (`weft connect`); `replace` drops the others first.
    pub async fn connect(&self, addrs: Vec<String>, replace: bool) -> Result<(), MeshError> {
        self.send(Command::Connect { addrs, replace }).await
    }

    /// Removes targets (`weft forget`).
    pub async fn forget(&self, addrs: Vec<String>) -> Result<(), MeshError> {
        self.send(Command::Forget { addrs }).await
    }

    /// A local change of `channel`'s state, flooded to all peers.
    pub async fn gossip(&self, channel: &str, delta: Vec<u8>) -> Result<(), MeshError> {
        self.send(Command::Gossip { channel: channel.into(), delta }).await
    }

    /// A message to every peer along this peer's broadcast tree.
    pub async fn broadcast(&self, channel: &str, payload: Vec<u8>) -> Result<(), MeshError> {
        self.send(Command::Broadcast { channel: channel.into(), payload }).await
    }

    /// A message to one peer, routed over the topology.
    pub async fn unicast(&self, channel: &str, dst: PeerName, payload: Vec<u8>) -> Result<(), MeshError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Unicast { channel: channel.into(), dst, payload, reply }).await?;
        Ok(rx.await.map_err(|_| MeshError::Stopped)??)
    }

    /// Changes the data-plane address this peer announces.
    pub async fn set_data_addr(&self, addr: Option<Ipv4Addr>) -> Result<(), MeshError> {
        self.send(Command::SetDataAddr(addr)).await
    }

    /// A copy of the topology as known here.
    pub async fn topology(&self) -> Result<Topology, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Topology(tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)
    }
}

/// A mesh whose listener is bound but whose actor has not started: subsystems
/// take its [`MeshHandle`] (commands wait in the queue until [`MeshBuilder::start`])
/// and register their gossip channels, so every channel exists before the first
/// connection.
pub struct MeshBuilder {
    config: MeshConfig,
    listener: TcpListener,
    local: SocketAddr,
    channels: Vec<(String, Arc<dyn Gossiper>)>,
    cmd_rx: mpsc::Receiver<Command>,
    status_tx: watch::Sender<MeshStatus>,
    handle: MeshHandle,
}

impl MeshBuilder {
    /// Binds the control port (before anything else is touched, so a port in
    /// use fails the launch early).
    pub async fn bind(config: MeshConfig) -> Result<MeshBuilder, MeshError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| MeshError::Listen { addr: config.listen, source })?;
        let local = listener.local_addr().map_err(|source| MeshError::Listen { addr: config.listen, source })?;
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (status_tx, status_rx) = watch::channel(MeshStatus::default());
        let handle = MeshHandle { cmd: cmd_tx, status: status_rx, name: config.name, local };
        Ok(MeshBuilder { config, listener, local, channels: Vec::new(), cmd_rx, status_tx, handle })
    }

    /// The address the mesh listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The handle (usable at once; commands run once the mesh starts).
    pub fn handle(&self) -> MeshHandle {
        self.handle.clone()
    }

    /// Registers a gossip channel.
    pub fn add_channel(&mut self, name: &str, gossiper: Arc<dyn Gossiper>) {
        self.channels.push((name.to_string(), gossiper));
    }

    /// The data-plane address this peer announces.
    pub fn set_data_addr(&mut self, addr: Option<Ipv4Addr>) {
        self.config.data_addr = addr;
    }

    /// Starts the actor: listens, dials the targets, gossips.
    pub fn start(self) -> Mesh {
        let MeshBuilder { config, listener, local, channels, cmd_rx, status_tx, handle } = self;
        let mut node = Node::new(config.name, config.nickname.clone(), config.uid, config.version, config.data_addr);
        for (name, g) in channels {
            node.add_channel(&name, g);
        }
        let (ev_tx, ev_rx) = mpsc::channel(4096);
        let settings = ConnSettings {
            password: config.password.clone(),
            hello: Hello {
                name: config.name,
                nickname: config.nickname.clone(),
                uid: config.uid,
                listen_port: local.port(),
                data_addr: config.data_addr,
            },
            heartbeat: config.heartbeat,
            heartbeat_timeout: config.heartbeat_timeout,
        };
        let span = tracing::info_span!("mesh", peer = %config.name);
        let mut actor = Actor {
            node,
            config,
            settings,
            conns: BTreeMap::new(),
            targets: BTreeMap::new(),
            next_id: 1,
            events: ev_tx,
            status: status_tx,
            last_prune: Instant::now(),
            discovered_at: 0,
            held_since: BTreeMap::new(),
            terminations: BTreeMap::new(),
            generation: 0,
            rng: rand::SeedableRng::seed_from_u64(rand::random()),
        };
        for addr in actor.config.peers.clone() {
            actor.add_target(addr, TargetSource::Given);
        }
        let task = Task::spawn("mesh", span, CancellationToken::new(), move |cancel| actor.run(listener, cmd_rx, ev_rx, cancel));
        Mesh { handle, task }
    }
}

/// The running mesh; its owner stops it.
pub struct Mesh {
    handle: MeshHandle,
    task: Task<MeshError>,
}

impl Mesh {
    /// A handle for the other subsystems.
    pub fn handle(&self) -> MeshHandle {
        self.handle.clone()
    }

    /// Stops on purpose: tells the peers this host's data path keeps forwarding
    /// (they hold its routes and endpoints), lets that reach them, then closes.
    pub async fn stop(self) -> Result<(), TaskError<MeshError>> {
        let (tx, rx) = oneshot::channel();
        if self.handle.send(Command::Stop(tx)).await.is_ok() {
            let _ = tokio::time::timeout(STOP_DRAIN * 2, rx).await;
        }
        self.task.shutdown_within(STOP_DRAIN).await
    }

    /// Leaves at once (`weft reset`): connections close, peers drop this one.
    pub async fn leave(self) -> Result<(), TaskError<MeshError>> {
        self.task.shutdown_within(STOP_DRAIN).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetSource {
    Given,
    Discovered,
}

#[derive(Debug)]
struct Target {
    source: TargetSource,
    /// Dial in flight (connection id).
    dialing: Option<u64>,
    /// Connected (connection id).
    connected: Option<u64>,
    attempts: u32,
    next_try: Instant,
    last_error: Option<String>,
    /// It turned out to be ourselves.
    is_self: bool,
}

struct Conn {
    peer: PeerName,
    nickname: String,
    addr: SocketAddr,
    /// The peer's listen address (for status and discovery).
    listen: SocketAddr,
    outbound: bool,
    encrypted: bool,
    target: Option<String>,
    tx: mpsc::Sender<Frame>,
    cancel: CancellationToken,
    drained: Option<oneshot::Receiver<()>>,
}

struct Actor {
    node: Node,
    config: MeshConfig,
    settings: ConnSettings,
    conns: BTreeMap<u64, Conn>,
    targets: BTreeMap<String, Target>,
    next_id: u64,
    events: mpsc::Sender<ConnEvent>,
    status: watch::Sender<MeshStatus>,
    last_prune: Instant,
    /// The generation discovery last looked at.
    discovered_at: u64,
    held_since: BTreeMap<PeerName, Instant>,
    terminations: BTreeMap<String, u64>,
    generation: u64,
    rng: rand::rngs::StdRng,
}

/// `host` → `host:6783`; `host:port` stays.
fn with_port(addr: &str, port: u16) -> String {
    if addr.parse::<SocketAddr>().is_ok() || addr.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        addr.to_string()
    } else {
        format!("{addr}:{port}")
    }
}

fn termination_reason(reason: &str) -> &'static str {
    if reason.contains("password") || reason.contains("authentication") {
        "authentication"
    } else if reason.contains("heartbeat") {
        "heartbeat_timeout"
    } else if reason.contains("duplicate") {
        "duplicate"
    } else if reason.contains("limit") {
        "connection_limit"
    } else if reason.contains("closed by the peer") || reason.contains("shutting down") {
        "closed"
    } else if reason.contains("malformed") || reason.contains("channel") || reason.contains("frame") {
        "protocol_error"
    } else {
        "error"
    }
}

impl Actor {
    async fn run(
        mut self,
        listener: TcpListener,
        mut cmds: mpsc::Receiver<Command>,
        mut events: mpsc::Receiver<ConnEvent>,
        cancel: CancellationToken,
    ) -> Result<(), MeshError> {
        info!(name = %self.config.name, nickname = %self.config.nickname, listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            encrypted = self.config.password.is_some(), "mesh started");
        let mut dial_tick = tokio::time::interval(Duration::from_millis(200));
        let mut gossip_tick = tokio::time::interval(ANTI_ENTROPY_INTERVAL);
        self.publish();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let id = self.next_id();
                        conn::accept(id, stream, addr, self.settings.clone(), self.events.clone());
                    }
                    Err(e) => warn!(error = %e, "accept failed"),
                },
                Some(cmd) = cmds.recv() => {
                    if let Command::Stop(done) = cmd {
                        self.stop().await;
                        let _ = done.send(());
                        break;
                    }
                    self.command(cmd);
                }
                Some(ev) = events.recv() => {
                    self.event(ev);
                    // Handle what else is ready before sending topology updates:
                    // a burst of changes goes out as one message per neighbour.
                    for _ in 0..256 {
                        match events.try_recv() {
                            Ok(ev) => self.event(ev),
                            Err(_) => break,
                        }
                    }
                }
                _ = dial_tick.tick() => {
                    // New peers of peers are dialed as soon as they are known.
                    if self.discovered_at != self.generation {
                        self.discovered_at = self.generation;
                        self.discover();
                    }
                    self.dial_due();
                }
                _ = gossip_tick.tick() => {
                    let mut out = Outbox::default();
                    self.node.tick(&mut self.rng, &mut out);
                    self.flush(out);
                    self.discover();
                    self.expire_held();
                }
            }
            self.flush_topology();
            self.publish();
        }
        for (_, c) in std::mem::take(&mut self.conns) {
            c.cancel.cancel();
        }
        info!("mesh stopped");
        Ok(())
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn add_target(&mut self, addr: String, source: TargetSource) {
        let addr = with_port(&addr, DEFAULT_PORT);
        let entry = self.targets.entry(addr).or_insert(Target {
            source,
            dialing: None,
            connected: None,
            attempts: 0,
            next_try: Instant::now(),
            last_error: None,
            is_self: false,
        });
        if source == TargetSource::Given {
            entry.source = TargetSource::Given;
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { addrs, replace } => {
                if replace {
                    self.targets.retain(|_, t| t.source != TargetSource::Given);
                }
                for a in addrs {
                    self.add_target(a, TargetSource::Given);
                }
            }
            Command::Forget { addrs } => {
                for a in addrs {
                    self.targets.remove(&with_port(&a, DEFAULT_PORT));
                }
            }
            Command::Gossip { channel, delta } => {
                let mut out = Outbox::default();
                self.node.gossip(&channel, delta, &mut out);
                self.flush(out);
            }
            Command::Broadcast { channel, payload } => {
                let mut out = Outbox::default();
                self.node.broadcast(&channel, payload, &mut out);
                self.flush(out);
            }
            Command::Unicast { channel, dst, payload, reply } => {
                let mut out = Outbox::default();
                let r = self.node.unicast(&channel, dst, payload, &mut out);
                self.flush(out);
                let _ = reply.send(r);
            }
            Command::SetDataAddr(addr) => {
                self.node.set_data_addr(addr);
                self.settings.hello.data_addr = addr;
            }
            Command::Topology(reply) => {
                let _ = reply.send(self.node.topology().clone());
            }
            Command::Stop(_) => unreachable!("handled in run"),
        }
    }

    /// Pauses, lets every connection write what is queued, then returns.
    async fn stop(&mut self) {
        let mut out = Outbox::default();
        self.node.pause(&mut out);
        self.flush(out);
        let conns = std::mem::take(&mut self.conns);
        let mut waits = Vec::new();
        for (_, mut c) in conns {
            // Dropping the sender ends the writer once the queue is empty.
            drop(c.tx);
            if let Some(d) = c.drained.take() {
                waits.push((c.cancel, d));
            }
        }
        let _ = tokio::time::timeout(STOP_DRAIN, futures::future::join_all(waits.iter_mut().map(|(_, d)| d))).await;
        for (cancel, _) in waits {
            cancel.cancel();
        }
        info!("told the peers this host's data path keeps forwarding");
    }

    /// Tracks paused, unreachable peers and drops those held too long.
    fn expire_held(&mut self) {
        let now = Instant::now();
        let held: BTreeSet<PeerName> = self.node.held().into_iter().collect();
        self.held_since.retain(|p, _| held.contains(p));
        for p in held {
            let since = *self.held_since.entry(p).or_insert(now);
            if now.duration_since(since) > self.config.hold {
                info!(peer = %p, "a stopped peer did not come back in time: dropping its routes and endpoints");
                self.node.forget_peer(p);
                self.held_since.remove(&p);
            }
        }
    }

    fn conn_for(&self, peer: PeerName) -> Option<u64> {
        self.conns.iter().find(|(_, c)| c.peer == peer).map(|(id, _)| *id)
    }

    fn event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Handshaken { id, target, addr, result } => self.handshaken(id, target, addr, result),
            ConnEvent::Frame { id, frame } => {
                let Some(peer) = self.conns.get(&id).map(|c| c.peer) else { return };
                let result = match frame {
                    Frame::Gossip(g) => self.receive(peer, g),
                    Frame::Hello(_) => Err("a second hello".to_string()),
                    Frame::Heartbeat => Ok(()),
                };
                if let Err(reason) = result {
                    warn!(%peer, %reason, "closing the connection: the peer sent something we refuse");
                    self.close(id, &format!("protocol error: {reason}"));
                }
            }
            ConnEvent::Closed { id, reason } => self.close(id, &reason),
        }
    }

    fn receive(&mut self, peer: PeerName, g: Gossip) -> Result<(), String> {
        let too_big = match &g {
            Gossip::Topology(entries) => {
                entries.len() > MAX_PEERS || entries.iter().any(|e| e.connections.len() > MAX_CONNECTIONS_PER_PEER)
            }
            Gossip::Have(v) | Gossip::Digest { versions: v, .. } => v.len() > MAX_PEERS,
            Gossip::Want(v) => v.len() > MAX_PEERS,
            _ => false,
        };
        if too_big {
            return Err("topology update larger than any real mesh".into());
        }
        let mut out = Outbox::default();
        let result = self.node.receive(peer, g, &mut out);
        self.flush(out);
        match result {
            Ok(()) => Ok(()),
            // A unicast we cannot route yet is dropped, not a reason to hang up.
            Err(GossipError::NoRoute(dst)) => {
                debug!(%dst, "dropping a unicast with no route");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn handshaken(&mut self, id: u64, target: Option<String>, addr: SocketAddr, result: Result<Box<Established>, wire::WireError>) {
        if let Some(t) = target.as_ref().and_then(|t| self.targets.get_mut(t)) {
            t.dialing = None;
        }
        let est = match result {
            Ok(est) => est,
            Err(e) => {
                let reason = e.to_string();
                match &target {
                    Some(t) => warn!(target = %t, %reason, "cannot connect"),
                    None => warn!(from = %addr, %reason, "refused an incoming connection"),
                }
                *self.terminations.entry(termination_reason(&reason).into()).or_default() += 1;
                self.target_failed(target.as_deref(), reason);
                return;
            }
        };
        let hello = est.hello.clone();
        let refuse = |this: &mut Self, reason: String| {
            est.cancel.cancel();
            *this.terminations.entry(termination_reason(&reason).into()).or_default() += 1;
            this.target_failed(target.as_deref(), reason);
        };
        if hello.name == self.config.name {
            if let Some(t) = target.as_ref().and_then(|t| self.targets.get_mut(t)) {
                t.is_self = true;
            }
            est.cancel.cancel();
            return;
        }
        // Two connections to one peer (both dialed): keep the one dialed by the
        // peer with the smaller name. Both ends apply the same rule.
        if let Some(existing) = self.conn_for(hello.name) {
            let existing_outbound = self.conns[&existing].outbound;
            let keep_new = if self.config.name < hello.name { est.outbound } else { !est.outbound };
            if !keep_new || existing_outbound == est.outbound {
                debug!(peer = %hello.name, "duplicate connection: keeping the existing one");
                if let Some(t) = target.as_ref().and_then(|t| self.targets.get_mut(t)) {
                    t.connected = Some(existing);
                    t.attempts = 0;
                }
                est.cancel.cancel();
                return;
            }
            // Swap the transport under the same peer: no topology flap.
            let old = self.conns.remove(&existing).expect("exists");
            old.cancel.cancel();
            debug!(peer = %hello.name, "duplicate connection: switching to the one the smaller name dialed");
            let peer = hello.name;
            self.register(id, est, target, addr);
            // What either side sent over the dropped connection may be lost.
            let mut out = Outbox::default();
            self.node.resync(peer, &mut out);
            self.flush(out);
            return;
        }
        if self.conns.len() >= self.config.conn_limit {
            refuse(self, format!("connection limit of {} reached", self.config.conn_limit));
            return;
        }
        self.register(id, est, target, addr);
        let conn = &self.conns[&id];
        let (listen, outbound) = (conn.listen, conn.outbound);
        info!(peer = %hello.name, nickname = %hello.nickname, %addr, encrypted = conn.encrypted, "connection established");
        let mut out = Outbox::default();
        self.node.connection_up(hello.name, listen, outbound, &mut out);
        // May close this very connection (its writer may already be gone).
        self.flush(out);
    }

    fn register(&mut self, id: u64, est: Box<Established>, target: Option<String>, addr: SocketAddr) {
        let hello = &est.hello;
        let listen = SocketAddr::new(addr.ip(), hello.listen_port);
        if let Some(t) = target.as_ref().and_then(|t| self.targets.get_mut(t)) {
            t.connected = Some(id);
            t.attempts = 0;
            t.last_error = None;
        }
        self.conns.insert(
            id,
            Conn {
                peer: hello.name,
                nickname: hello.nickname.clone(),
                addr,
                listen,
                outbound: est.outbound,
                encrypted: est.encrypted,
                target,
                tx: est.tx,
                cancel: est.cancel,
                drained: Some(est.drained),
            },
        );
    }

    fn target_failed(&mut self, target: Option<&str>, reason: String) {
        let Some(t) = target.and_then(|t| self.targets.get_mut(t)) else { return };
        t.attempts = t.attempts.saturating_add(1);
        let backoff = BACKOFF_START.saturating_mul(1 << t.attempts.min(8)).min(BACKOFF_MAX);
        let jitter = rand::random_range(0.75..1.25);
        t.next_try = Instant::now() + backoff.mul_f64(jitter);
        t.last_error = Some(reason);
    }

    fn close(&mut self, id: u64, reason: &str) {
        let Some(c) = self.conns.remove(&id) else { return };
        c.cancel.cancel();
        *self.terminations.entry(termination_reason(reason).into()).or_default() += 1;
        info!(peer = %c.peer, nickname = %c.nickname, addr = %c.addr, %reason, "connection closed");
        if let Some(t) = c.target.as_ref().and_then(|t| self.targets.get_mut(t)) {
            t.connected = None;
            t.next_try = Instant::now() + BACKOFF_START;
            t.last_error = Some(reason.to_string());
        }
        // The peer may still be connected over another connection (a swap).
        if self.conn_for(c.peer).is_none() {
            self.node.connection_down(c.peer);
        }
    }

    /// Sends the topology entries the node owes its neighbours.
    fn flush_topology(&mut self) {
        if self.node.has_pending() {
            let mut out = Outbox::default();
            self.node.flush(&mut out);
            self.flush(out);
        }
    }

    fn flush(&mut self, mut out: Outbox) {
        for (to, msg) in out.drain() {
            let Some(id) = self.conn_for(to) else { continue };
            let conn = &self.conns[&id];
            match conn.tx.try_send(Frame::Gossip(msg)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let peer = conn.peer;
                    warn!(%peer, "send queue full: the peer is not keeping up");
                    self.close(id, "send queue full");
                }
                // The writer already stopped (the socket failed or the peer hung up).
                Err(mpsc::error::TrySendError::Closed(_)) => self.close(id, "connection lost while sending"),
            }
        }
    }

    fn connected_peers(&self) -> BTreeSet<PeerName> {
        self.conns.values().map(|c| c.peer).collect()
    }

    /// Learns peers of peers (their listen addresses in the topology).
    fn discover(&mut self) {
        if !self.config.discovery {
            return;
        }
        let connected = self.connected_peers();
        let me = self.config.name;
        let mut found = Vec::new();
        for e in self.node.topology().entries() {
            for (peer, c) in &e.connections {
                if *peer != me && !connected.contains(peer) {
                    found.push(c.addr.to_string());
                }
            }
        }
        for addr in found {
            if !self.targets.contains_key(&addr) {
                self.add_target(addr, TargetSource::Discovered);
            }
        }
        // Discovered targets of peers no longer in the topology go away.
        let known: BTreeSet<String> = self
            .node
            .topology()
            .entries()
            .flat_map(|e| e.connections.values().map(|c| c.addr.to_string()))
            .collect();
        self.targets.retain(|a, t| t.source == TargetSource::Given || t.connected.is_some() || known.contains(a));
    }

    fn dial_due(&mut self) {
        let now = Instant::now();
        let connected: BTreeSet<SocketAddr> = self.conns.values().flat_map(|c| [c.addr, c.listen]).collect();
        let pending = self.targets.values().filter(|t| t.dialing.is_some()).count();
        let mut budget = self.config.conn_limit.saturating_sub(self.conns.len() + pending);
        let due: Vec<String> = self
            .targets
            .iter()
            .filter(|(_, t)| t.dialing.is_none() && t.connected.is_none() && !t.is_self && t.next_try <= now)
            .map(|(a, _)| a.clone())
            .collect();
        for target in due {
            if budget == 0 {
                break;
            }
            let Ok(addr) = target.parse::<SocketAddr>() else {
                // A name: resolve it off the actor's task.
                self.resolve_and_dial(target);
                budget -= 1;
                continue;
            };
            if connected.contains(&addr) {
                continue;
            }
            let id = self.next_id();
            let t = self.targets.get_mut(&target).expect("due targets exist");
            t.dialing = Some(id);
            conn::dial(id, target, addr, self.settings.clone(), self.events.clone());
            budget -= 1;
        }
    }

    fn resolve_and_dial(&mut self, target: String) {
        let id = self.next_id();
        if let Some(t) = self.targets.get_mut(&target) {
            t.dialing = Some(id);
        }
        let (settings, events) = (self.settings.clone(), self.events.clone());
        tokio::spawn(async move {
            match tokio::net::lookup_host(&target).await.map(|mut a| a.find(SocketAddr::is_ipv4)) {
                Ok(Some(addr)) => conn::dial(id, target, addr, settings, events),
                Ok(None) | Err(_) => {
                    let result = Err(wire::WireError::Io(std::io::Error::other(format!("cannot resolve {target}"))));
                    let addr = SocketAddr::from(([0, 0, 0, 0], 0));
                    let _ = events.send(ConnEvent::Handshaken { id, target: Some(target), addr, result }).await;
                }
            }
        });
    }

    fn publish(&mut self) {
        // Peers that became unreachable through others' updates leave soon, not
        // only at the next tick.
        if self.node.needs_prune() && self.last_prune.elapsed() >= PRUNE_INTERVAL {
            self.node.prune();
            self.last_prune = Instant::now();
        }
        let topology = self.node.topology();
        let nick = |p: PeerName| topology.get(p).map(|e| e.nickname.clone());
        let peers: Vec<PeerStatus> = topology
            .entries()
            .map(|e: &PeerEntry| PeerStatus {
                name: e.name,
                nickname: e.nickname.clone(),
                uid: e.uid,
                version: e.version,
                data_addr: e.data_addr,
                paused: e.paused,
                connections: e
                    .connections
                    .iter()
                    .map(|(p, c)| PeerConnStatus {
                        name: *p,
                        nickname: nick(*p),
                        addr: c.addr,
                        outbound: c.outbound,
                        established: topology.symmetric(e.name, *p),
                    })
                    .collect(),
            })
            .collect();
        let now = Instant::now();
        let mut connections: Vec<ConnStatus> = self
            .conns
            .values()
            .map(|c| ConnStatus {
                addr: c.addr.to_string(),
                state: ConnState::Established,
                outbound: c.outbound,
                peer: Some(c.peer),
                nickname: Some(c.nickname.clone()),
                encrypted: c.encrypted,
                info: if c.encrypted { "encrypted".into() } else { "unencrypted".into() },
            })
            .collect();
        for (addr, t) in &self.targets {
            if t.connected.is_some() || t.is_self {
                continue;
            }
            let (state, info) = match (&t.dialing, &t.last_error) {
                (Some(_), _) => (ConnState::Connecting, "connecting".to_string()),
                (None, Some(e)) => {
                    let wait = t.next_try.saturating_duration_since(now);
                    (ConnState::Failed, format!("{e}, retry in {:.0?}", wait))
                }
                (None, None) => (ConnState::Connecting, "pending".into()),
            };
            connections.push(ConnStatus {
                addr: addr.clone(),
                state,
                outbound: true,
                peer: None,
                nickname: None,
                encrypted: false,
                info,
            });
        }
        connections.sort_by(|a, b| (a.state, &a.addr).cmp(&(b.state, &b.addr)));
        let routes = self.node.routes().unicast.clone();
        let generation_input = (peers.clone(), routes.clone());
        let old = self.status.borrow();
        let changed = (old.peers.clone(), old.routes.clone()) != generation_input;
        let mut broadcast = old.broadcast.clone();
        drop(old);
        if changed {
            self.generation += 1;
            // Every peer's tree from here: one walk per origin, so only on change.
            let origins: Vec<PeerName> = routes.keys().copied().chain([self.config.name]).collect();
            let r = self.node.routes();
            broadcast = origins.into_iter().map(|o| (o, r.broadcast(o).to_vec())).collect();
        }
        let status = MeshStatus {
            name: Some(self.config.name),
            nickname: self.config.nickname.clone(),
            encrypted: self.config.password.is_some(),
            peers,
            connections,
            targets: self.targets.iter().filter(|(_, t)| !t.is_self).map(|(a, _)| a.clone()).collect(),
            routes,
            held: self.node.held(),
            broadcast,
            terminations: self.terminations.clone(),
            generation: self.generation,
        };
        self.status.send_replace(status);
    }
}

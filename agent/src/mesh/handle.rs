//! How the other subsystems use the mesh: [`MeshBuilder`] binds the port and
//! collects the gossip channels, [`Mesh`] is the running mesh its owner stops,
//! and [`MeshHandle`] (cheap to clone) sends it commands and watches its status.
//!
//! Owns the command channel and the mesh's task. Must not touch connections or
//! the node: every command is carried out by the actor.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::actor::Actor;
use super::node::{GossipError, Gossiper, Node};
use super::peer::PeerName;
use super::status::MeshStatus;
use super::topology::Topology;
use super::{MeshConfig, MeshError, STOP_DRAIN};
use crate::task::{Task, TaskError};

/// Commands queued before the actor runs (or while it is busy) wait here.
const COMMAND_QUEUE: usize = 1024;

/// What a [`MeshHandle`] asks of the actor.
pub(super) enum Command {
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
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
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
        let span = tracing::info_span!("mesh", peer = %config.name);
        let stop = CancellationToken::new();
        let (actor, events) = Actor::new(config, node, local, status_tx, stop.clone());
        let task = Task::spawn("mesh", span, stop, move |_| actor.run(listener, cmd_rx, events));
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

    /// Whether the actor ended on its own (its error comes from [`Self::stop`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
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

//! The mesh's I/O shell: one task that owns the [`Node`], the listener, the
//! established connections and the [`Targets`], and runs the event loop. It
//! accepts (through the shared [`Acceptor`], which pauses when `accept` fails), dials what the targets say is due,
//! admits handshaken connections by [`admit`], hands frames to the node and the
//! node's messages to the connections, and publishes the status.
//!
//! Owns the connections' bookkeeping (ids, send queues, tokens, spans) and the
//! clock and randomness the pure parts are given. Must not decide policy:
//! which connections to make or keep is `targets`', what gossip means is
//! `node`'s, what status shows is `status`'.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info, warn};

use crate::accept::Acceptor;

use super::close::{CloseReason, ConnError, ProtocolViolation};
use super::conn::{self, ConnEvent, ConnSettings, Established};
use super::handle::Command;
use super::node::{Gossip, GossipError, Node, Outbox};
use super::peer::PeerName;
use super::status::{self, Link, MeshStatus, Snapshot};
use super::targets::{Admission, Backoff, ConnId, Dial, TargetSource, Targets, admit};
use super::wire::{Frame, Hello};
use super::{
    ANTI_ENTROPY_INTERVAL, DEFAULT_PORT, MAX_CONNECTIONS_PER_PEER, MAX_PEERS, MAX_PENDING, MAX_PENDING_PER_SOURCE, MeshConfig, MeshError, PRUNE_INTERVAL,
    STOP_DRAIN,
};

/// How often due targets are dialed (and new peers of peers looked for): new
/// peers are dialed soon after they are known.
const DIAL_INTERVAL: Duration = Duration::from_millis(200);
/// Connection events waiting for the actor; the connection tasks wait when
/// it is full.
const EVENT_QUEUE: usize = 4096;
/// Events handled in one go before topology updates go out, so that a burst of
/// changes costs one message per neighbour, while commands still get a turn.
const EVENT_BATCH: usize = 256;
/// While incoming connections are refused for [`MAX_PENDING`], a line this often.
const PENDING_REMIND: Duration = Duration::from_secs(60);

/// One established connection.
struct Conn {
    peer: PeerName,
    nickname: String,
    addr: SocketAddr,
    /// The peer's listen address (for status and discovery).
    listen: SocketAddr,
    outbound: bool,
    encrypted: bool,
    tx: mpsc::Sender<Frame>,
    cancel: CancellationToken,
    drained: Option<oneshot::Receiver<()>>,
    /// The connection's span: what the actor logs about it goes there.
    span: Span,
}

pub(super) struct Actor {
    node: Node,
    config: MeshConfig,
    settings: ConnSettings,
    conns: BTreeMap<ConnId, Conn>,
    targets: Targets,
    next_id: ConnId,
    events: mpsc::Sender<ConnEvent>,
    status: watch::Sender<MeshStatus>,
    /// Stops the actor; the connections' tokens are its children.
    stop: CancellationToken,
    last_prune: Instant,
    /// The status generation discovery last looked at.
    discovered_at: u64,
    generation: u64,
    held_since: BTreeMap<PeerName, Instant>,
    /// Connections ended, by [`CloseReason::label`].
    terminations: BTreeMap<&'static str, u64>,
    rng: StdRng,
    /// Accepted connections whose handshake has not finished, and their source.
    pending: BTreeMap<ConnId, IpAddr>,
    /// Refusals for [`MAX_PENDING`]: how many, and when last logged.
    pending_refused: u64,
    pending_logged: Option<Instant>,
}

impl Actor {
    /// The actor for `node`, listening on `local`, with the configured peers as
    /// targets; its connection events arrive on the receiver given back.
    pub(super) fn new(
        config: MeshConfig,
        node: Node,
        local: SocketAddr,
        status: watch::Sender<MeshStatus>,
        stop: CancellationToken,
    ) -> (Actor, mpsc::Receiver<ConnEvent>) {
        let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
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
        let now = Instant::now();
        let mut targets = Targets::new(Backoff::DEFAULT, DEFAULT_PORT);
        for addr in &config.peers {
            targets.add(addr, TargetSource::Given, now);
        }
        let actor = Actor {
            node,
            config,
            settings,
            conns: BTreeMap::new(),
            targets,
            next_id: 1,
            events,
            status,
            stop,
            last_prune: now,
            discovered_at: 0,
            generation: 0,
            held_since: BTreeMap::new(),
            terminations: BTreeMap::new(),
            rng: StdRng::seed_from_u64(rand::random()),
            pending: BTreeMap::new(),
            pending_refused: 0,
            pending_logged: None,
        };
        (actor, events_rx)
    }

    pub(super) async fn run(
        mut self,
        listener: TcpListener,
        mut cmds: mpsc::Receiver<Command>,
        mut events: mpsc::Receiver<ConnEvent>,
    ) -> Result<(), MeshError> {
        info!(name = %self.config.name, nickname = %self.config.nickname, listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            encrypted = self.config.password.is_some(), "mesh started");
        let mut dial_tick = tokio::time::interval(DIAL_INTERVAL);
        let mut gossip_tick = tokio::time::interval(ANTI_ENTROPY_INTERVAL);
        let stop = self.stop.clone();
        let mut acceptor = Acceptor::new(listener, "mesh");
        self.publish();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                (stream, addr) = acceptor.accept() => self.accepted(stream, addr),
                Some(cmd) = cmds.recv() => {
                    if let Some(done) = self.command(cmd) {
                        self.stop_gracefully().await;
                        let _ = done.send(());
                        break;
                    }
                }
                Some(ev) = events.recv() => {
                    self.event(ev);
                    // Handle what else is ready before sending topology updates:
                    // a burst of changes goes out as one message per neighbour.
                    for _ in 0..EVENT_BATCH {
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

    fn next_id(&mut self) -> ConnId {
        self.next_id += 1;
        self.next_id
    }

    fn count(&mut self, reason: CloseReason) {
        *self.terminations.entry(reason.label()).or_default() += 1;
    }

    fn accepted(&mut self, stream: TcpStream, addr: SocketAddr) {
        let from_source = self.pending.values().filter(|ip| **ip == addr.ip()).count();
        if self.pending.len() >= MAX_PENDING || from_source >= MAX_PENDING_PER_SOURCE {
            // Closed at once (dropping the stream): no task, no buffer.
            drop(stream);
            self.count(CloseReason::PendingLimit);
            self.pending_refused += 1;
            let now = Instant::now();
            if self.pending_logged.is_none_or(|at| now.duration_since(at) >= PENDING_REMIND) {
                self.pending_logged = Some(now);
                warn!(from = %addr, pending = self.pending.len(), from_source, refused = self.pending_refused,
                    "closing incoming connections at once: {MAX_PENDING} in all or {MAX_PENDING_PER_SOURCE} from one address have not finished their handshake (one line a minute while it lasts)");
            }
            return;
        }
        let id = self.next_id();
        self.pending.insert(id, addr.ip());
        conn::accept(id, stream, addr, self.settings.clone(), self.events.clone(), &self.stop);
    }

    /// Carries out a command; gives back the acknowledgement of a stop (the
    /// caller stops).
    fn command(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Connect { addrs, replace } => self.targets.connect(addrs, replace, Instant::now()),
            Command::Forget { addrs } => self.targets.forget(addrs),
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
            Command::Stop(done) => return Some(done),
        }
        None
    }

    /// Pauses, lets every connection write what is queued, then returns.
    async fn stop_gracefully(&mut self) {
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

    fn conn_for(&self, peer: PeerName) -> Option<(ConnId, &Conn)> {
        self.conns.iter().find(|(_, c)| c.peer == peer).map(|(id, c)| (*id, c))
    }

    fn event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Handshaken { id, target, addr, span, result } => {
                self.pending.remove(&id);
                self.handshaken(id, target, addr, span, result);
            }
            ConnEvent::Frame { id, frame } => {
                let Some(peer) = self.conns.get(&id).map(|c| c.peer) else { return };
                let result = match frame {
                    Frame::Gossip(g) => self.receive(peer, g),
                    Frame::Hello(_) => Err(ProtocolViolation::SecondHello),
                    Frame::Heartbeat => Ok(()),
                };
                if let Err(violation) = result {
                    let span = self.conns.get(&id).map_or_else(Span::none, |c| c.span.clone());
                    span.in_scope(|| warn!(%peer, reason = %violation, "closing the connection: the peer sent something we refuse"));
                    self.close(id, violation.into());
                }
            }
            ConnEvent::Closed { id, error } => self.close(id, error),
        }
    }

    fn receive(&mut self, peer: PeerName, g: Gossip) -> Result<(), ProtocolViolation> {
        let too_big = match &g {
            Gossip::Topology(entries) => {
                entries.len() > MAX_PEERS || entries.iter().any(|e| e.connections.len() > MAX_CONNECTIONS_PER_PEER)
            }
            Gossip::Have(v) | Gossip::Digest { versions: v, .. } => v.len() > MAX_PEERS,
            Gossip::Want(v) => v.len() > MAX_PEERS,
            _ => false,
        };
        if too_big {
            return Err(ProtocolViolation::Oversized);
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
            Err(e) => Err(e.into()),
        }
    }

    fn handshaken(
        &mut self,
        id: ConnId,
        target: Option<String>,
        addr: SocketAddr,
        span: Span,
        result: Result<Box<Established>, ConnError>,
    ) {
        let now = Instant::now();
        let est = match result {
            Ok(est) => est,
            Err(error) => {
                span.in_scope(|| match &target {
                    Some(t) => warn!(target = %t, reason = %error, "cannot connect"),
                    None => warn!(from = %addr, reason = %error, "refused an incoming connection"),
                });
                self.count(error.reason());
                if let Some(t) = &target {
                    self.targets.dial_failed(t, id, error.to_string(), now, &mut self.rng);
                }
                return;
            }
        };
        let peer = est.hello.name;
        let existing = self.conn_for(peer).map(|(id, c)| (id, c.outbound));
        match admit(self.config.name, peer, est.outbound, existing, self.conns.len(), self.config.conn_limit) {
            Admission::Myself => {
                span.in_scope(|| debug!("the connection reached this very peer: closing it"));
                est.cancel.cancel();
                if let Some(t) = &target {
                    self.targets.dial_reached_myself(t, id);
                }
            }
            Admission::KeepExisting(existing) => {
                let error = ConnError::Duplicate { peer };
                span.in_scope(|| debug!(reason = %error, "closing the new connection: keeping the existing one"));
                est.cancel.cancel();
                self.count(error.reason());
                if let Some(t) = &target {
                    self.targets.dial_connected(t, id, existing);
                }
            }
            Admission::Replace { old } => {
                // Swap the transport under the same peer: no topology flap.
                if let Some(dropped) = self.conns.remove(&old) {
                    dropped.cancel.cancel();
                    dropped.span.in_scope(|| debug!("duplicate connection: switching to the one the smaller name dialed"));
                }
                self.count(CloseReason::Duplicate);
                self.targets.connection_replaced(old, id);
                self.register(id, *est, target.as_deref(), addr, span);
                // What either side sent over the dropped connection may be lost.
                let mut out = Outbox::default();
                self.node.resync(peer, &mut out);
                self.flush(out);
            }
            Admission::OverLimit => {
                let error = ConnError::ConnectionLimit { limit: self.config.conn_limit };
                span.in_scope(|| debug!(reason = %error, "refusing the connection"));
                est.cancel.cancel();
                self.count(error.reason());
                if let Some(t) = &target {
                    self.targets.dial_failed(t, id, error.to_string(), now, &mut self.rng);
                }
            }
            Admission::Accept => {
                let listen = SocketAddr::new(addr.ip(), est.hello.listen_port);
                let outbound = est.outbound;
                span.in_scope(|| {
                    info!(peer = %peer, nickname = %est.hello.nickname, %addr, encrypted = est.encrypted, "connection established")
                });
                self.register(id, *est, target.as_deref(), addr, span);
                let mut out = Outbox::default();
                self.node.connection_up(peer, listen, outbound, &mut out);
                // May close this very connection (its writer may already be gone).
                self.flush(out);
            }
        }
    }

    fn register(&mut self, id: ConnId, est: Established, target: Option<&str>, addr: SocketAddr, span: Span) {
        let Established { hello, encrypted, outbound, tx, cancel, drained } = est;
        if let Some(t) = target {
            self.targets.dial_connected(t, id, id);
        }
        let listen = SocketAddr::new(addr.ip(), hello.listen_port);
        let conn = Conn {
            peer: hello.name,
            nickname: hello.nickname,
            addr,
            listen,
            outbound,
            encrypted,
            tx,
            cancel,
            drained: Some(drained),
            span,
        };
        self.conns.insert(id, conn);
    }

    fn close(&mut self, id: ConnId, error: ConnError) {
        let Some(c) = self.conns.remove(&id) else { return };
        c.cancel.cancel();
        self.count(error.reason());
        c.span.in_scope(|| info!(peer = %c.peer, nickname = %c.nickname, addr = %c.addr, reason = %error, "connection closed"));
        self.targets.connection_closed(id, &error.to_string(), Instant::now());
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
            let Some((id, conn)) = self.conn_for(to) else { continue };
            match conn.tx.try_send(Frame::Gossip(msg)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    conn.span.in_scope(|| warn!(peer = %to, "send queue full: the peer is not keeping up"));
                    self.close(id, ConnError::SendQueueFull);
                }
                // The writer already stopped (the socket failed or the peer hung up).
                Err(TrySendError::Closed(_)) => self.close(id, ConnError::WriterGone),
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
        let seen = self.node.topology().entries().flat_map(|e| e.connections.iter().map(|(p, c)| (*p, c.addr)));
        self.targets.learn(self.config.name, seen, &connected, Instant::now());
    }

    fn dial_due(&mut self) {
        let connected: BTreeSet<SocketAddr> = self.conns.values().flat_map(|c| [c.addr, c.listen]).collect();
        let mut next_id = self.next_id;
        let dials = self.targets.due(Instant::now(), self.conns.len(), self.config.conn_limit, &connected, || {
            next_id += 1;
            next_id
        });
        self.next_id = next_id;
        for Dial { id, target, addr } in dials {
            conn::dial(id, target, addr, self.settings.clone(), self.events.clone(), &self.stop);
        }
    }

    fn publish(&mut self) {
        // Peers that became unreachable through others' updates leave soon, not
        // only at the next tick.
        if self.node.needs_prune() && self.last_prune.elapsed() >= PRUNE_INTERVAL {
            self.node.prune();
            self.last_prune = Instant::now();
        }
        let links = self
            .conns
            .values()
            .map(|c| Link { peer: c.peer, nickname: &c.nickname, addr: c.addr, outbound: c.outbound, encrypted: c.encrypted })
            .collect();
        let snapshot = Snapshot {
            nickname: &self.config.nickname,
            encrypted: self.config.password.is_some(),
            links,
            targets: &self.targets,
            terminations: &self.terminations,
            now: Instant::now(),
        };
        let status = status::build(&self.status.borrow(), &mut self.node, snapshot);
        self.generation = status.generation;
        self.status.send_replace(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{ConnState, MeshBuilder, MeshStatus};

    /// Two agents on loopback given each other: both dial at once, and the
    /// duplicate rule leaves one connection, the one the smaller name dialed,
    /// seen the same way from both ends.
    #[tokio::test]
    async fn two_meshes_dialing_each_other_at_once_keep_one_connection() {
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("weft=debug").try_init();
        let (small, big) = (PeerName::new(0x0200_0000_0001), PeerName::new(0x0200_0000_0002));
        let config = |name, nick| {
            let mut c = MeshConfig::new(name, nick);
            c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            c.heartbeat = Duration::from_millis(100);
            c.heartbeat_timeout = Duration::from_millis(1000);
            c
        };
        let a = MeshBuilder::bind(config(small, "small")).await.unwrap();
        let b = MeshBuilder::bind(config(big, "big")).await.unwrap();
        a.handle().connect(vec![b.local_addr().to_string()], false).await.unwrap();
        b.handle().connect(vec![a.local_addr().to_string()], false).await.unwrap();
        let (a, b) = (a.start(), b.start());
        let (mut sa, mut sb) = (a.handle().status(), b.handle().status());
        let established = |s: &MeshStatus| s.connections.iter().filter(|c| c.state == ConnState::Established).count();
        let settled = |s: &MeshStatus| established(s) == 1 && s.connections.len() == 1 && s.routes.len() == 1;
        tokio::time::timeout(Duration::from_secs(10), async {
            while !(settled(&sa.borrow()) && settled(&sb.borrow())) {
                tokio::select! {
                    r = sa.changed() => r.unwrap(),
                    r = sb.changed() => r.unwrap(),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("one connection each:\n{:#?}\n{:#?}", sa.borrow().connections, sb.borrow().connections));
        // Past a few heartbeats, still the one connection, dialed by the smaller name.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (sa, sb) = (sa.borrow().clone(), sb.borrow().clone());
        assert!(settled(&sa) && settled(&sb), "{:#?}\n{:#?}", sa.connections, sb.connections);
        assert!(sa.connections[0].outbound && !sb.connections[0].outbound, "the smaller name's dial survives");
        assert_eq!(sa.connections[0].peer, Some(big));
        assert_eq!(sb.connections[0].peer, Some(small));
        let duplicates = |s: &MeshStatus| s.terminations.get("duplicate").copied().unwrap_or(0);
        assert!(duplicates(&sa) + duplicates(&sb) >= 1, "the second connection was closed as a duplicate");
        a.leave().await.unwrap();
        b.leave().await.unwrap();
    }
}

//! One control connection: dial (resolving a name first) or accept,
//! handshake, then a reader and a writer task that talk to the mesh actor
//! through events. Heartbeats go out every interval; a connection silent for
//! the timeout is closed.
//!
//! Owns the connection's tasks, each in a `conn` span (connection id, remote
//! address, and the peer once its hello arrives), all stopped by the
//! connection's token, a child of the mesh's. Must not touch the mesh's state:
//! what to do with a connection is the actor's call.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, field, info_span};

use super::close::ConnError;
use super::targets::ConnId;
use super::wire::{self, Frame, FrameReader, FrameWriter, Hello, WireError};

/// How long a dial may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the handshake (preamble, Noise, hellos) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for one connection before it counts as stuck and is closed.
pub const SEND_QUEUE: usize = 4096;

/// What the connection tasks tell the mesh actor.
#[derive(Debug)]
pub enum ConnEvent {
    /// Handshake finished (or failed). `target` is the address dialed, if we
    /// dialed; `span` is the connection's (for the actor's logs about it).
    Handshaken {
        id: ConnId,
        target: Option<String>,
        addr: SocketAddr,
        span: Span,
        result: Result<Box<Established>, ConnError>,
    },
    /// A frame arrived.
    Frame { id: ConnId, frame: Frame },
    /// The connection ended.
    Closed { id: ConnId, error: ConnError },
}

/// A connection whose handshake succeeded.
#[derive(Debug)]
pub struct Established {
    pub hello: Hello,
    pub encrypted: bool,
    pub outbound: bool,
    /// Frames to send.
    pub tx: mpsc::Sender<Frame>,
    /// Stops the connection's tasks.
    pub cancel: CancellationToken,
    /// Fires when the writer has sent everything queued (after `tx` is dropped).
    pub drained: tokio::sync::oneshot::Receiver<()>,
}

/// Settings every connection shares.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    pub password: Option<String>,
    pub hello: Hello,
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
}

/// The address a connection that never got one is reported with.
const NO_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

fn conn_span(id: ConnId) -> Span {
    info_span!("conn", id, remote = field::Empty, peer = field::Empty)
}

/// Runs `task` in `span` until it ends or `cancel` fires.
fn spawn_until(cancel: CancellationToken, span: Span, task: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(
        async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                () = task => {}
            }
        }
        .instrument(span),
    );
}

/// Dials `target` (at `addr`, or resolved first when `None`) and runs the
/// handshake; `stop` (the mesh's token) ends it at any stage.
pub fn dial(
    id: ConnId,
    target: String,
    addr: Option<SocketAddr>,
    settings: ConnSettings,
    events: mpsc::Sender<ConnEvent>,
    stop: &CancellationToken,
) {
    let span = conn_span(id);
    let cancel = stop.child_token();
    let task = {
        let (span, cancel) = (span.clone(), cancel.clone());
        async move {
            let resolved = match addr {
                Some(addr) => Ok(addr),
                None => resolve(&target).await,
            };
            let (addr, result) = match resolved {
                Ok(addr) => {
                    span.record("remote", field::display(addr));
                    let result = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
                        Ok(Ok(stream)) => start(id, stream, true, settings, events.clone(), cancel).await,
                        Ok(Err(e)) => Err(WireError::Io(e).into()),
                        Err(_) => Err(WireError::Timeout("connecting").into()),
                    };
                    (addr, result)
                }
                Err(e) => (NO_ADDR, Err(e)),
            };
            announce(id, Some(target), addr, span, result, events).await;
        }
    };
    spawn_until(cancel, span, task);
}

/// The first IPv4 address of `target` (`host:port`).
async fn resolve(target: &str) -> Result<SocketAddr, ConnError> {
    match tokio::net::lookup_host(target).await {
        Ok(mut addrs) => addrs.find(SocketAddr::is_ipv4).ok_or_else(|| ConnError::Resolve { target: target.into(), source: None }),
        Err(source) => Err(ConnError::Resolve { target: target.into(), source: Some(source) }),
    }
}

/// Runs the handshake on an accepted connection; `stop` as for [`dial`].
pub fn accept(
    id: ConnId,
    stream: TcpStream,
    addr: SocketAddr,
    settings: ConnSettings,
    events: mpsc::Sender<ConnEvent>,
    stop: &CancellationToken,
) {
    let span = conn_span(id);
    span.record("remote", field::display(addr));
    let cancel = stop.child_token();
    let task = {
        let (span, cancel) = (span.clone(), cancel.clone());
        async move {
            let result = start(id, stream, false, settings, events.clone(), cancel).await;
            announce(id, None, addr, span, result, events).await;
        }
    };
    spawn_until(cancel, span, task);
}

/// Tells the agent how the handshake went, and only then starts reading frames:
/// the agent drops frames of connections it does not know yet, and the peer
/// sends its first ones (topology, channel states) right after its handshake.
async fn announce(
    id: ConnId,
    target: Option<String>,
    addr: SocketAddr,
    span: Span,
    result: Result<Started, ConnError>,
    events: mpsc::Sender<ConnEvent>,
) {
    match result {
        Ok(Started { established, reader, timeout }) => {
            let cancel = established.cancel.clone();
            let reading = span.clone();
            let told = events.send(ConnEvent::Handshaken { id, target, addr, span, result: Ok(established) }).await;
            if told.is_ok() {
                tokio::spawn(read_loop(id, reader, timeout, events, cancel).instrument(reading));
            }
        }
        Err(e) => {
            let _ = events.send(ConnEvent::Handshaken { id, target, addr, span, result: Err(e) }).await;
        }
    }
}

/// A connection past its handshake, not reading yet.
struct Started {
    established: Box<Established>,
    reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    timeout: Duration,
}

async fn start(
    id: ConnId,
    mut stream: TcpStream,
    outbound: bool,
    settings: ConnSettings,
    events: mpsc::Sender<ConnEvent>,
    cancel: CancellationToken,
) -> Result<Started, ConnError> {
    let _ = stream.set_nodelay(true);
    let handshake = async {
        let (_version, cipher) = wire::handshake(&mut stream, settings.password.as_deref(), outbound).await?;
        let encrypted = cipher.is_some();
        let (r, w) = stream.into_split();
        let (mut reader, mut writer) = wire::framed(r, w, cipher);
        writer.write(&Frame::Hello(settings.hello.clone())).await?;
        match reader.read().await? {
            Frame::Hello(hello) => {
                reader.authenticated();
                Ok((hello, encrypted, reader, writer))
            }
            other => Err(WireError::Malformed(format!("expected a hello, got {other:?}"))),
        }
    };
    let (hello, encrypted, reader, writer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| WireError::Timeout("handshake"))??;
    Span::current().record("peer", field::display(hello.name));
    debug!(nickname = %hello.nickname, encrypted, "handshake complete");
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    let (drained_tx, drained) = tokio::sync::oneshot::channel();
    tokio::spawn(write_loop(id, writer, rx, settings.heartbeat, events, cancel.clone(), drained_tx).instrument(Span::current()));
    let established = Box::new(Established { hello, encrypted, outbound, tx, cancel, drained });
    Ok(Started { established, reader, timeout: settings.heartbeat_timeout })
}

async fn read_loop(
    id: ConnId,
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    timeout: Duration,
    events: mpsc::Sender<ConnEvent>,
    cancel: CancellationToken,
) {
    let error = loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(timeout, reader.read()) => r,
        };
        match frame {
            Ok(Ok(Frame::Heartbeat)) => {}
            Ok(Ok(frame)) => {
                if events.send(ConnEvent::Frame { id, frame }).await.is_err() {
                    return;
                }
            }
            Ok(Err(WireError::Closed)) => break ConnError::ClosedByPeer,
            Ok(Err(e)) => break ConnError::Wire(e),
            Err(_) => break ConnError::NoHeartbeat(timeout),
        }
    };
    cancel.cancel();
    let _ = events.send(ConnEvent::Closed { id, error }).await;
}

async fn write_loop(
    id: ConnId,
    mut writer: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Frame>,
    heartbeat: Duration,
    events: mpsc::Sender<ConnEvent>,
    cancel: CancellationToken,
    drained: tokio::sync::oneshot::Sender<()>,
) {
    let mut ticker = tokio::time::interval(heartbeat);
    let error = loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => Frame::Heartbeat,
            f = rx.recv() => match f {
                Some(f) => f,
                // Closed by the actor: everything queued has been written.
                None => {
                    let _ = drained.send(());
                    return;
                }
            },
        };
        if let Err(e) = writer.write(&frame).await {
            break ConnError::Wire(e);
        }
    };
    cancel.cancel();
    let _ = events.send(ConnEvent::Closed { id, error }).await;
}

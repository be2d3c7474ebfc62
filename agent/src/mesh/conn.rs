//! One control connection: dial or accept, handshake, then a reader and a writer
//! task that talk to the mesh actor through events. Heartbeats go out every
//! interval; a connection silent for the timeout is closed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
    /// Handshake finished (or failed). `target` is the address dialed, if we dialed.
    Handshaken {
        id: u64,
        target: Option<String>,
        addr: SocketAddr,
        result: Result<Box<Established>, WireError>,
    },
    /// A frame arrived.
    Frame { id: u64, frame: Frame },
    /// The connection ended.
    Closed { id: u64, reason: String },
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

/// Dials `target` (resolved to `addr`) and runs the handshake.
pub fn dial(id: u64, target: String, addr: SocketAddr, settings: ConnSettings, events: mpsc::Sender<ConnEvent>) {
    tokio::spawn(async move {
        let result = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => start(id, stream, true, settings, events.clone()).await,
            Ok(Err(e)) => Err(WireError::Io(e)),
            Err(_) => Err(WireError::Timeout("connecting")),
        };
        announce(id, Some(target), addr, result, events).await;
    });
}

/// Runs the handshake on an accepted connection.
pub fn accept(id: u64, stream: TcpStream, addr: SocketAddr, settings: ConnSettings, events: mpsc::Sender<ConnEvent>) {
    tokio::spawn(async move {
        let result = start(id, stream, false, settings, events.clone()).await;
        announce(id, None, addr, result, events).await;
    });
}

/// Tells the agent how the handshake went, and only then starts reading frames:
/// the agent drops frames of connections it does not know yet, and the peer
/// sends its first ones (topology, channel states) right after its handshake.
async fn announce(id: u64, target: Option<String>, addr: SocketAddr, result: Result<Started, WireError>, events: mpsc::Sender<ConnEvent>) {
    match result {
        Ok(Started { established, reader, timeout }) => {
            let cancel = established.cancel.clone();
            let told = events.send(ConnEvent::Handshaken { id, target, addr, result: Ok(established) }).await;
            if told.is_ok() {
                tokio::spawn(read_loop(id, reader, timeout, events, cancel));
            }
        }
        Err(e) => {
            let _ = events.send(ConnEvent::Handshaken { id, target, addr, result: Err(e) }).await;
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
    id: u64,
    mut stream: TcpStream,
    outbound: bool,
    settings: ConnSettings,
    events: mpsc::Sender<ConnEvent>,
) -> Result<Started, WireError> {
    let _ = stream.set_nodelay(true);
    let handshake = async {
        let (_version, cipher) = wire::handshake(&mut stream, settings.password.as_deref(), outbound).await?;
        let encrypted = cipher.is_some();
        let (r, w) = stream.into_split();
        let (mut reader, mut writer) = wire::framed(r, w, cipher);
        writer.write(&Frame::Hello(settings.hello.clone())).await?;
        match reader.read().await? {
            Frame::Hello(hello) => Ok((hello, encrypted, reader, writer)),
            other => Err(WireError::Malformed(format!("expected a hello, got {other:?}"))),
        }
    };
    let (hello, encrypted, reader, writer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| WireError::Timeout("handshake"))??;
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    let cancel = CancellationToken::new();
    let (drained_tx, drained) = tokio::sync::oneshot::channel();
    tokio::spawn(write_loop(id, writer, rx, settings.heartbeat, events, cancel.clone(), drained_tx));
    let established = Box::new(Established { hello, encrypted, outbound, tx, cancel, drained });
    Ok(Started { established, reader, timeout: settings.heartbeat_timeout })
}

async fn read_loop(
    id: u64,
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    timeout: Duration,
    events: mpsc::Sender<ConnEvent>,
    cancel: CancellationToken,
) {
    let reason = loop {
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
            Ok(Err(WireError::Closed)) => break "closed by the peer".to_string(),
            Ok(Err(e)) => break e.to_string(),
            Err(_) => break format!("no heartbeat for {timeout:?}"),
        }
    };
    cancel.cancel();
    let _ = events.send(ConnEvent::Closed { id, reason }).await;
}

async fn write_loop(
    id: u64,
    mut writer: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Frame>,
    heartbeat: Duration,
    events: mpsc::Sender<ConnEvent>,
    cancel: CancellationToken,
    drained: tokio::sync::oneshot::Sender<()>,
) {
    let mut ticker = tokio::time::interval(heartbeat);
    let reason = loop {
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
            break e.to_string();
        }
    };
    cancel.cancel();
    let _ = events.send(ConnEvent::Closed { id, reason }).await;
}

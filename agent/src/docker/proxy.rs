//! The Docker API proxy: `DOCKER_HOST=unix:///var/run/weft/weft.sock` and the
//! docker CLI (or ECS, or anything that speaks Docker's API) gets containers
//! that are on the overlay from their first instruction.
//!
//! Only `POST /containers/create` is changed (see [`super::create`]); every
//! other request passes through untouched over its own upstream connection:
//! versioned and unversioned paths, streamed request bodies (`build`), streamed
//! responses (`wait`, `events`, `logs -f`: frames are passed on as they come,
//! never buffered), `101` upgrades (`attach`, `exec`, `run -it`: the two
//! connections are joined byte for byte, half-close included) and the legacy
//! hijack without an `Upgrade:` header (spliced raw; like every Docker client
//! does, it must be the first request of its connection).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::create::{self, ImageConfig, Outcome};
use crate::accept::Acceptor;

/// Largest create request read (they are a few kilobytes; Docker's own config
/// limits are far below this).
pub const MAX_CREATE_BODY: usize = 4 << 20;
/// Largest request head (request line and headers).
const MAX_HEAD: usize = 64 << 10;
/// Largest image description read to learn its entrypoint.
const MAX_IMAGE_JSON: usize = 4 << 20;

/// Where the proxy listens: `unix:///path` or `tcp://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// A `--proxy-listen` value that is not an address the proxy can take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadListen {
    #[error("{0:?}: give a path, e.g. unix:///var/run/weft/weft.sock")]
    NoPath(String),
    #[error("{0:?}: use tcp://ADDRESS:PORT, e.g. tcp://127.0.0.1:12375")]
    BadTcp(String),
    #[error("{0:?}: use unix:///PATH or tcp://ADDRESS:PORT")]
    Scheme(String),
}

impl std::str::FromStr for Listen {
    type Err = BadListen;
    fn from_str(s: &str) -> Result<Self, BadListen> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(BadListen::NoPath(s.into()));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp://") {
            return a.parse().map(Listen::Tcp).map_err(|_| BadListen::BadTcp(s.into()));
        }
        Err(BadListen::Scheme(s.into()))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix://{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// What every connection needs.
pub struct Proxy {
    /// Docker's own socket.
    pub upstream: PathBuf,
    /// The create rewrite's options; the DNS server changes once this host is on
    /// the overlay.
    pub options: tokio::sync::watch::Receiver<create::Options>,
}

/// One bound proxy listener, not serving yet (a launch binds everything before
/// it touches the kernel).
#[derive(Debug)]
pub enum Bound {
    Unix { listener: tokio::net::UnixListener, path: PathBuf },
    Tcp { listener: tokio::net::TcpListener, local: std::net::SocketAddr },
}

impl Bound {
    /// The address as `weft env` shows it (a TCP port 0 resolved).
    pub fn listen(&self) -> Listen {
        match self {
            Bound::Unix { path, .. } => Listen::Unix(path.clone()),
            Bound::Tcp { local, .. } => Listen::Tcp(*local),
        }
    }
}

/// Why the proxy could not listen.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve the Docker API proxy on {listen}: {source} (pass --proxy-listen, or --no-proxy)")]
pub struct BindError {
    pub listen: Listen,
    #[source]
    pub source: std::io::Error,
}

/// Binds every address (must run inside a tokio runtime).
pub async fn bind(listen: &[Listen]) -> Result<Vec<Bound>, BindError> {
    let mut bound = Vec::new();
    for l in listen {
        let err = |source| BindError { listen: l.clone(), source };
        bound.push(match l {
            Listen::Unix(path) => Bound::Unix { listener: bind_unix(path).map_err(err)?, path: path.clone() },
            Listen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
                let local = listener.local_addr().map_err(err)?;
                Bound::Tcp { listener, local }
            }
        });
    }
    Ok(bound)
}

/// Serves on every bound listener until `cancel`; a unix socket is removed when
/// it stops. Returns the addresses.
pub fn serve(proxy: Arc<Proxy>, bound: Vec<Bound>, cancel: CancellationToken) -> Vec<Listen> {
    let addrs: Vec<Listen> = bound.iter().map(Bound::listen).collect();
    for b in bound {
        let (proxy, cancel) = (proxy.clone(), cancel.clone());
        match b {
            Bound::Unix { listener, path } => {
                tokio::spawn(async move {
                    let mut acceptor = Acceptor::new(listener, "docker proxy");
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            (s, _) = acceptor.accept() => { tokio::spawn(connection(proxy.clone(), s)); }
                        }
                    }
                    let _ = std::fs::remove_file(&path);
                });
            }
            Bound::Tcp { listener, .. } => {
                tokio::spawn(async move {
                    let mut acceptor = Acceptor::new(listener, "docker proxy");
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            (s, _) = acceptor.accept() => { let _ = s.set_nodelay(true); tokio::spawn(connection(proxy.clone(), s)); }
                        }
                    }
                });
            }
        }
    }
    info!(listen = ?addrs.iter().map(ToString::to_string).collect::<Vec<_>>(), upstream = %proxy.upstream.display(), "Docker API proxy serving");
    addrs
}

/// A unix socket as Docker's own: mode 0660, group `docker` if there is one.
fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a previous run (nothing answers on it) is replaced.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another process (another weft?)", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Ok(Some(group)) = nix::unistd::Group::from_name("docker") {
        let _ = nix::unistd::chown(path, None, Some(group.gid));
    }
    Ok(listener)
}

/// One client connection.
async fn connection<S>(proxy: Arc<Proxy>, mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Read the first request's head to see whether it is a legacy hijack.
    let mut head = BytesMut::with_capacity(4096);
    let parsed = loop {
        match client.read_buf(&mut head).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let upgrade = req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("upgrade"));
                break Some((req.method.unwrap_or("").to_string(), req.path.unwrap_or("").to_string(), upgrade));
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => continue,
            // Too big or not HTTP: hyper answers it with a proper error.
            _ => break None,
        }
    };
    if let Some((method, path, false)) = &parsed
        && method == "POST" && is_hijack(route(path.split('?').next().unwrap_or(""))) {
            return splice(&proxy.upstream, client, head.freeze()).await;
        }
    let io = TokioIo::new(Rewind { prefix: head.freeze(), inner: client });
    let svc = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(handle(&proxy, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .serve_connection(io, svc)
        .with_upgrades()
        .await
    {
        debug!(error = %e, "proxy: client connection ended");
    }
}

/// The path without Docker's `/vX.Y` prefix.
fn route(path: &str) -> &str {
    if let Some(rest) = path.strip_prefix("/v")
        && let Some(i) = rest.find('/') {
            let version = &rest[..i];
            if !version.is_empty() && version.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return &rest[i..];
            }
        }
    path
}

/// Endpoints after which Docker turns the connection into a raw stream.
fn is_hijack(route: &str) -> bool {
    let parts: Vec<&str> = route.trim_end_matches('/').split('/').collect();
    matches!(parts.as_slice(), ["", "containers", _, "attach"] | ["", "exec", _, "start"])
}

/// Legacy hijack: the request as read so far goes up, then both directions are
/// copied until each side closes (half-close passed on).
async fn splice<S>(upstream: &Path, mut client: S, head: Bytes)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = match UnixStream::connect(upstream).await {
        Ok(u) => u,
        Err(e) => {
            let body = docker_error(&format!("weft proxy: cannot reach Docker at {}: {e} (is dockerd running?)", upstream.display()));
            let _ = client
                .write_all(
                    format!("HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                        .as_bytes(),
                )
                .await;
            let _ = client.write_all(&body).await;
            return;
        }
    };
    if up.write_all(&head).await.is_err() {
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut up).await {
        debug!(error = %e, "proxy: hijacked stream ended");
    }
}

type ProxyBody = Either<Incoming, Full<Bytes>>;

fn docker_error(message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "message": message })).expect("encodes")
}

/// An error in Docker's format (`{"message": ...}`): the CLI prints it as
/// "Error response from daemon: ...".
fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(docker_error(message)))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn handle(proxy: &Proxy, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() == Method::POST && route(req.uri().path()) == "/containers/create" {
        return create(proxy, req).await;
    }
    forward(proxy, req).await
}

/// Sends a request to Docker over a new connection; for a 101 answer, joins the
/// two upgraded connections.
async fn forward<B>(proxy: &Proxy, mut req: Request<B>) -> Response<ProxyBody>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client_upgrade = req.headers().contains_key(header::UPGRADE).then(|| hyper::upgrade::on(&mut req));
    if !req.headers().contains_key(header::HOST) {
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("docker"));
    }
    let mut resp = match send(&proxy.upstream, req).await {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                            debug!(error = %e, "proxy: upgraded stream ended");
                        }
                    }
                    Err(e) => debug!(error = %e, "proxy: upgrade failed"),
                }
            });
        }
    resp.map(Either::Left)
}

/// Why a request could not be passed to Docker.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("weft proxy: cannot reach Docker at {path}: {source} (is dockerd running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("weft proxy: talking to Docker: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("weft proxy: Docker did not answer: {0}")]
    Send(#[source] hyper::Error),
}

async fn send<B>(upstream: &Path, req: Request<B>) -> Result<Response<Incoming>, UpstreamError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = UnixStream::connect(upstream)
        .await
        .map_err(|source| UpstreamError::Connect { path: upstream.to_path_buf(), source })?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "proxy: upstream connection ended");
        }
    });
    sender.send_request(req).await.map_err(UpstreamError::Send)
}

/// `POST /containers/create`: read the (small) body, rewrite it for weft, pass
/// it on. A body that is not JSON goes on untouched: Docker's error comes back.
async fn create(proxy: &Proxy, req: Request<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let bytes = match Limited::new(body, MAX_CREATE_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("weft proxy: container create request over {} MiB; a container's configuration is far smaller", MAX_CREATE_BODY >> 20),
            );
        }
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &format!("weft proxy: reading the request: {e}")),
    };
    let name = parts.uri.query().and_then(|q| {
        q.split('&').find_map(|kv| kv.strip_prefix("name=")).map(percent_decode)
    });
    let options = proxy.options.borrow().clone();
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(mut v) => {
            let image = match create::image_needed(&v, &options) {
                Some(image) => image_config(&proxy.upstream, &image).await,
                None => None,
            };
            match create::rewrite(&mut v, name.as_deref(), image.as_ref(), &options) {
                Outcome::Rewritten(what) => {
                    debug!(name = ?name, ?what, "proxy: create rewritten");
                    Bytes::from(serde_json::to_vec(&v).expect("JSON encodes"))
                }
                Outcome::Untouched(why) => {
                    debug!(name = ?name, %why, "proxy: create passed on as it is");
                    bytes
                }
            }
        }
        Err(e) => {
            debug!(error = %e, "proxy: create body is not JSON; Docker will say so");
            bytes
        }
    };
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    forward(proxy, Request::from_parts(parts, Full::new(body))).await
}

/// The entrypoint and command of a local image; `None` if Docker does not have
/// it (yet: `docker run` pulls and creates again).
async fn image_config(upstream: &Path, image: &str) -> Option<ImageConfig> {
    if image.is_empty() || image.bytes().any(|b| b <= b' ' || b == b'?' || b == b'#' || b == b'%') {
        return None;
    }
    let req = Request::get(format!("/images/{image}/json"))
        .header(header::HOST, "docker")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = send(upstream, req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = Limited::new(resp.into_body(), MAX_IMAGE_JSON).collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok().map(|v| ImageConfig::from_inspect(&v))
}

/// `%XX` and `+` decoding for a query value.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A stream with bytes already read put back in front.
struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_with_and_without_version() {
        assert_eq!(route("/v1.41/containers/create"), "/containers/create");
        assert_eq!(route("/containers/create"), "/containers/create");
        assert_eq!(route("/v1/x"), "/x");
        assert_eq!(route("/volumes/create"), "/volumes/create");
        assert_eq!(route("/vx/containers"), "/vx/containers");
        assert!(is_hijack("/containers/abc/attach") && is_hijack("/exec/abc/start/"));
        assert!(!is_hijack("/containers/abc/attach/ws") && !is_hijack("/containers/abc/start"));
    }

    #[test]
    fn listen_addresses() {
        assert_eq!("unix:///run/weft.sock".parse(), Ok(Listen::Unix("/run/weft.sock".into())));
        assert_eq!("tcp://127.0.0.1:12375".parse(), Ok(Listen::Tcp("127.0.0.1:12375".parse().unwrap())));
        for bad in ["unix://", "tcp://x", "/run/weft.sock", "http://a"] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("web%2D1+x"), "web-1 x");
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("a%zz"), "a%zz");
    }
}

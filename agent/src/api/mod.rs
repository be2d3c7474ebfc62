//! The local HTTP API (127.0.0.1:6784), with Weave's paths where they apply:
//! `/status`, `/status/{peers,connections,targets,...}` (text, as the CLI prints
//! it), `/report` (JSON), `/connect`, `/forget`, `/metrics` (Prometheus), plus
//! `/stop`, `/attach`, `/detach` and `/ps`. The CLI is a thin client of it.
//!
//! Only for clients on this host: a request whose `Host` is not a loopback
//! name or address (DNS rebinding) or that carries an `Origin` (a web page in
//! a browser) is refused with 403, as Docker, Consul and Prometheus do; a body
//! over [`MAX_BODY`] is refused with 413.

pub mod client;
pub mod metrics;
pub mod render;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::task::Task;

use crate::attach::{AttachError, Attacher, ContainerRuntime, ErrorKind, RuntimeError, Spec, parse_wants};
use crate::datapath::Datapath;
use crate::endpoints::{self, EndpointTable};
use crate::ipam::{IpamError, IpamHandle};
use crate::mesh::MeshHandle;
use crate::state::StateStore;

/// What the handlers reach.
#[derive(Clone)]
pub struct Ctx {
    pub mesh: MeshHandle,
    pub dp: Arc<dyn Datapath>,
    pub table: Arc<EndpointTable>,
    pub store: Arc<StateStore>,
    pub ipam: IpamHandle,
    /// `None` with `--no-dns`.
    pub dns: Option<crate::dns::DnsHandle>,
    pub attacher: Attacher,
    /// `None` with `--no-docker`.
    pub docker: Option<Arc<dyn ContainerRuntime>>,
    pub shutdown: CancellationToken,
    /// Set by `/reset`: the agent removes its data path and state as it stops.
    pub reset: Arc<tokio::sync::watch::Sender<bool>>,
    pub started: Instant,
    pub info: Arc<AgentInfo>,
}

/// Facts about the agent for status output.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub version: &'static str,
    pub discovery: bool,
    pub trusted_subnets: Vec<Ipv4Net>,
    pub conn_limit: usize,
    pub encap: String,
    /// How the TC programs are attached: `tcx` or `clsact`.
    pub tc_attach: String,
    /// The kernel release and the features the data path probed.
    pub kernel: String,
    pub underlay: String,
    pub ipalloc_range: Ipv4Net,
}

/// An error answered as `status` with a one-line message.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// The largest request body the API reads: the biggest real one (an attach
/// with its names) is a few hundred bytes.
pub const MAX_BODY: usize = 1 << 20;

/// Whether `host` (a `Host` header: name or address, with or without a port)
/// names this host's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6] or [v6]:port
        match rest.split_once(']') {
            Some((addr, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok()) => addr,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses what a web page could send through a browser: any `Origin`, and a
/// `Host` that is not loopback (a rebound name pointing at 127.0.0.1).
async fn local_clients_only(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
        return ApiError(
            StatusCode::FORBIDDEN,
            format!("refused: a cross-origin request (Origin: {origin}); the weft API serves programs on this host, not web pages"),
        )
        .into_response();
    }
    if let Some(host) = headers.get(header::HOST) {
        let host = String::from_utf8_lossy(host.as_bytes()).into_owned();
        if !is_loopback_host(&host) {
            return ApiError(
                StatusCode::FORBIDDEN,
                format!("refused: Host {host:?} is not this host's loopback (DNS rebinding?); use localhost or 127.0.0.1"),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// The routes, behind the local-clients-only check and the body limit.
pub fn router(ctx: Ctx) -> Router {
    routes(ctx)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(local_clients_only))
}

fn routes(ctx: Ctx) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/status/{what}", get(status_of))
        .route("/report", get(report))
        .route("/connect", post(connect))
        .route("/forget", post(forget))
        .route("/metrics", get(metrics::handler))
        .route("/stop", post(stop))
        .route("/attach", post(attach))
        .route("/detach", post(detach))
        .route("/ps", get(ps))
        .route("/proxy", get(proxy))
        .route("/ip/{id}", post(ip_allocate).get(ip_lookup).delete(ip_release))
        .route("/ip/{id}/{addr}", put(ip_claim))
        .route("/ip/{id}/{net}/{prefix}", post(ip_allocate_in))
        .route("/peer/{peer}", delete(rmpeer))
        .route("/name/{container}/{ip}", put(dns_add).delete(dns_remove))
        .route("/name/{name}", get(dns_lookup).delete(dns_remove_container))
        .route("/reset", post(reset))
        .with_state(ctx)
}

/// Where the API is served (`--api`, `WEFT_API`): `127.0.0.1:6784` or
/// `tcp://127.0.0.1:6784` (loopback only), or `unix:///run/weft/weft-api.sock`.
/// Written as given, so lock files and messages keep the TCP form bare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ApiAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// An `--api` value that is neither form.
#[derive(Debug, thiserror::Error)]
#[error("--api {given:?}: give 127.0.0.1:PORT, tcp://127.0.0.1:PORT or unix:///PATH (an absolute path)")]
pub struct ApiAddrError {
    pub given: String,
}

impl std::str::FromStr for ApiAddr {
    type Err = ApiAddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ApiAddrError { given: s.to_string() };
        if let Some(path) = s.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            return if path.is_absolute() { Ok(ApiAddr::Unix(path)) } else { Err(err()) };
        }
        s.strip_prefix("tcp://").unwrap_or(s).parse().map(ApiAddr::Tcp).map_err(|_| err())
    }
}

impl std::fmt::Display for ApiAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiAddr::Tcp(a) => write!(f, "{a}"),
            ApiAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl TryFrom<String> for ApiAddr {
    type Error = ApiAddrError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ApiAddr> for String {
    fn from(a: ApiAddr) -> String {
        a.to_string()
    }
}

impl ApiAddr {
    /// Whether only this host can reach it (loopback, or a unix socket).
    pub fn is_local(&self) -> bool {
        match self {
            ApiAddr::Tcp(a) => a.ip().is_loopback(),
            ApiAddr::Unix(_) => true,
        }
    }
}

/// Why the API could not listen.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve the API on {addr}: {source} (is another weft running? pass --api)")]
pub struct BindError {
    pub addr: ApiAddr,
    #[source]
    pub source: std::io::Error,
}

/// A bound API socket.
#[derive(Debug)]
pub enum ApiListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl ApiListener {
    /// Where it listens (a TCP port 0 resolved).
    pub fn local_addr(&self) -> Option<ApiAddr> {
        match self {
            ApiListener::Tcp(l) => l.local_addr().ok().map(ApiAddr::Tcp),
            ApiListener::Unix(_, p) => Some(ApiAddr::Unix(p.clone())),
        }
    }
}

/// A unix socket only root (the agent's user) may use: the API can stop the
/// agent and hand out addresses. A socket left by a previous run (nothing
/// answers on it) is replaced.
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("{} is in use", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Binds the API's address (a launch binds everything before it touches the
/// kernel).
pub async fn bind(addr: &ApiAddr) -> Result<ApiListener, BindError> {
    let err = |source| BindError { addr: addr.clone(), source };
    match addr {
        ApiAddr::Tcp(a) => tokio::net::TcpListener::bind(a).await.map(ApiListener::Tcp).map_err(err),
        ApiAddr::Unix(p) => bind_unix(p).map(|l| ApiListener::Unix(l, p.clone())).map_err(err),
    }
}

/// Serves the API on `listener` until the task is stopped (a unix socket is
/// removed then).
pub fn spawn(listener: ApiListener, ctx: Ctx) -> Task<std::io::Error> {
    let span = tracing::info_span!("api", addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
    Task::spawn("api", span, CancellationToken::new(), move |cancel| async move {
        match listener {
            ApiListener::Tcp(l) => {
                let acceptor = crate::accept::Acceptor::new(l, "api");
                axum::serve(acceptor, router(ctx)).with_graceful_shutdown(cancel.cancelled_owned()).await
            }
            ApiListener::Unix(l, path) => {
                let acceptor = crate::accept::Acceptor::new(l, "api");
                let served = axum::serve(acceptor, router(ctx)).with_graceful_shutdown(cancel.cancelled_owned()).await;
                let _ = std::fs::remove_file(&path);
                served
            }
        }
    })
}

async fn status(State(ctx): State<Ctx>) -> Response {
    let dp = ctx.dp.stats().await.ok();
    let status = ctx.mesh.status().borrow().clone();
    text(render::status(&status, &ctx.info, ctx.dp.as_ref(), dp.as_ref()))
}

async fn status_of(State(ctx): State<Ctx>, Path(what): Path<String>) -> Result<Response, ApiError> {
    let status = ctx.mesh.status().borrow().clone();
    Ok(text(match what.as_str() {
        "peers" => render::peers(&status),
        "connections" => render::connections(&status),
        "targets" => render::targets(&status),
        "endpoints" => render::endpoint_table(&ctx.table.all(), &status),
        "datapath" => render::datapath(&ctx.dp.stats().await.map_err(internal)?),
        "ipam" => render::ipam(&ctx.ipam.status().await.map_err(internal)?),
        "dns" => match &ctx.dns {
            Some(dns) => render::dns(dns, &status),
            None => "DNS is off (--no-dns)\n".to_string(),
        },
        other => {
            return Err(bad_request(format!(
                "unknown status {other:?}: use peers, connections, targets, endpoints, datapath, ipam or dns"
            )));
        }
    }))
}

/// `weft report`.
#[derive(Serialize)]
struct Report {
    version: &'static str,
    uptime_seconds: u64,
    router: crate::mesh::MeshStatus,
    info: AgentInfo,
    datapath: DatapathReport,
    endpoints: Vec<endpoints::table::PeerEndpoints>,
    ipam: crate::ipam::IpamStatus,
}

#[derive(Serialize)]
struct DatapathReport {
    backend: &'static str,
    underlay_address: std::net::Ipv4Addr,
    endpoint_mtu: u32,
    local_endpoints: Vec<crate::datapath::AttachedEndpoint>,
    remote_endpoints: Vec<crate::datapath::RemoteEndpoint>,
    hosts: std::collections::BTreeMap<std::net::Ipv4Addr, std::net::Ipv4Addr>,
    stats: crate::datapath::Stats,
}

async fn report(State(ctx): State<Ctx>) -> Result<Json<Report>, ApiError> {
    let dp = &ctx.dp;
    // Cloned first: a watch guard must not be held across the awaits below.
    let router = ctx.mesh.status().borrow().clone();
    Ok(Json(Report {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: ctx.started.elapsed().as_secs(),
        router,
        info: (*ctx.info).clone(),
        datapath: DatapathReport {
            backend: dp.name(),
            underlay_address: dp.local_address(),
            endpoint_mtu: dp.endpoint_mtu(),
            local_endpoints: dp.local_endpoints().await.map_err(internal)?,
            remote_endpoints: dp.remote_endpoints().await.map_err(internal)?,
            hosts: dp.peer_hosts().await.map_err(internal)?,
            stats: dp.stats().await.map_err(internal)?,
        },
        endpoints: ctx.table.all(),
        ipam: ctx.ipam.status().await.map_err(internal)?,
    }))
}

fn form_values(form: &[(String, String)], key: &str) -> Vec<String> {
    form.iter().filter(|(k, _)| k == key).map(|(_, v)| v.trim().to_string()).filter(|v| !v.is_empty()).collect()
}

async fn connect(State(ctx): State<Ctx>, Form(form): Form<Vec<(String, String)>>) -> Result<Response, ApiError> {
    let peers = form_values(&form, "peer");
    let replace = form_values(&form, "replace").iter().any(|v| v == "true" || v == "1");
    if peers.is_empty() && !replace {
        return Err(bad_request("give at least one peer=host[:port]"));
    }
    for p in &peers {
        validate_peer(p)?;
    }
    ctx.mesh.connect(peers.clone(), replace).await.map_err(internal)?;
    ctx.store
        .update(|s| {
            if replace {
                s.peers.clear();
            }
            for p in &peers {
                if !s.peers.contains(p) {
                    s.peers.push(p.clone());
                }
            }
        })
        .map_err(internal)?;
    Ok(text(String::new()))
}

async fn forget(State(ctx): State<Ctx>, Form(form): Form<Vec<(String, String)>>) -> Result<Response, ApiError> {
    let peers = form_values(&form, "peer");
    if peers.is_empty() {
        return Err(bad_request("give at least one peer=host[:port]"));
    }
    ctx.mesh.forget(peers.clone()).await.map_err(internal)?;
    ctx.store.update(|s| s.peers.retain(|p| !peers.contains(p))).map_err(internal)?;
    Ok(text(String::new()))
}

/// A peer address must be `host` or `host:port` with a sane host.
fn validate_peer(p: &str) -> Result<(), ApiError> {
    let host = match p.rsplit_once(':') {
        Some((h, port)) => {
            port.parse::<u16>().map_err(|_| bad_request(format!("invalid port in {p:?}")))?;
            h
        }
        None => p,
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if ok { Ok(()) } else { Err(bad_request(format!("invalid peer address {p:?}: expected host or host:port"))) }
}

async fn stop(State(ctx): State<Ctx>) -> Response {
    info!("stop requested over the API");
    ctx.shutdown.cancel();
    text("stopping\n".into())
}

/// `POST /attach`: a Docker container (`container`), or a namespace (`netns`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AttachRequest {
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub netns: Option<String>,
    pub id: Option<String>,
    /// `10.32.1.5/12` (that address), `net:10.40.0.0/16` (one allocated in that
    /// subnet), or nothing (one allocated in the default subnet).
    #[serde(default)]
    pub addrs: Vec<String>,
    pub ifname: Option<String>,
    /// Skip the route for multicast (224.0.0.0/4) through the interface.
    #[serde(default)]
    pub no_multicast_route: bool,
    /// A DNS name for the container's addresses.
    #[serde(default)]
    pub dns_name: Option<String>,
}

/// `POST /detach`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DetachRequest {
    pub id: String,
}

/// `/run/netns/NAME` for a bare name, the path otherwise.
fn netns_path(netns: &str) -> PathBuf {
    if netns.contains('/') { PathBuf::from(netns) } else { PathBuf::from("/run/netns").join(netns) }
}

/// The status for a failed attach, detach or address request: 503 for what
/// passes (the CLI and Docker's worker retry), 404 for an unknown container,
/// 400 for other mistakes of the caller, 500 for this host's failures.
fn attach_error(e: AttachError) -> ApiError {
    let status = match (&e, e.kind()) {
        (AttachError::Runtime(RuntimeError::NoSuchContainer { .. }), _) => StatusCode::NOT_FOUND,
        (_, ErrorKind::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
        (_, ErrorKind::Invalid) => StatusCode::BAD_REQUEST,
        (_, ErrorKind::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string())
}

fn ipam_error(e: IpamError) -> ApiError {
    attach_error(e.into())
}

fn docker_of(ctx: &Ctx) -> Result<&Arc<dyn ContainerRuntime>, ApiError> {
    ctx.docker.as_ref().ok_or_else(|| attach_error(RuntimeError::Off.into()))
}

async fn attach(State(ctx): State<Ctx>, Json(req): Json<AttachRequest>) -> Result<Response, ApiError> {
    let attached = match (&req.container, &req.netns) {
        (Some(container), None) => docker_of(&ctx)?.attach(container, req.addrs.clone()).await.map_err(attach_error)?,
        (None, Some(netns)) => {
            let path = netns_path(netns);
            let id = req.id.clone().unwrap_or_else(|| {
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| netns.clone())
            });
            let mut spec = Spec::new(id, path);
            spec.wants = parse_wants(&req.addrs).map_err(|e| attach_error(e.into()))?;
            if let Some(ifname) = &req.ifname {
                spec.ifname = ifname.clone();
            }
            spec.multicast_route = !req.no_multicast_route;
            spec.dns_names = req.dns_name.iter().cloned().collect();
            ctx.attacher.attach(&spec).await.map_err(attach_error)?
        }
        _ => return Err(bad_request("give either a container or a network namespace (--netns)")),
    };
    Ok(text(render::ps(&[attached], &Default::default())))
}

async fn detach(State(ctx): State<Ctx>, Json(req): Json<DetachRequest>) -> Result<Response, ApiError> {
    // An endpoint of that id, else a Docker container of that name or id.
    if ctx.attacher.is_attached(&req.id).await || ctx.docker.is_none() {
        ctx.attacher.detach(&req.id).await.map_err(attach_error)?;
    } else {
        docker_of(&ctx)?.detach(&req.id).await.map_err(attach_error)?;
    }
    Ok(text(String::new()))
}

/// `POST /ip/{id}`: an address in the default subnet (Weave's API), as CIDR text.
async fn ip_allocate(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let net = ctx.ipam.allocate(&id, None).await.map_err(ipam_error)?;
    Ok(text(format!("{net}\n")))
}

/// `POST /ip/{id}/{net}/{prefix}`: an address in that subnet.
async fn ip_allocate_in(
    State(ctx): State<Ctx>,
    Path((id, net, prefix)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let subnet: Ipv4Net = format!("{net}/{prefix}").parse().map_err(|_| bad_request(format!("invalid subnet {net}/{prefix}")))?;
    let got = ctx.ipam.allocate(&id, Some(subnet)).await.map_err(ipam_error)?;
    Ok(text(format!("{got}\n")))
}

/// `PUT /ip/{id}/{addr}`: claims an address (e.g. a restarted container's).
async fn ip_claim(State(ctx): State<Ctx>, Path((id, addr)): Path<(String, String)>) -> Result<Response, ApiError> {
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| bad_request(format!("invalid address {addr:?}")))?;
    let net = ctx.ipam.claim(&id, addr).await.map_err(ipam_error)?;
    Ok(text(format!("{net}\n")))
}

/// `GET /ip/{id}`: its addresses.
async fn ip_lookup(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let nets = ctx.ipam.lookup(&id).await.map_err(ipam_error)?;
    if nets.is_empty() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no address for {id}")));
    }
    Ok(text(nets.iter().map(|n| format!("{n}\n")).collect()))
}

/// `DELETE /ip/{id}`: releases its addresses.
async fn ip_release(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Response, ApiError> {
    ctx.ipam.release(&id).await.map_err(ipam_error)?;
    Ok(text(String::new()))
}

/// `DELETE /peer/{peer}[?force=true]`: `weft rmpeer`.
async fn rmpeer(State(ctx): State<Ctx>, Path(peer): Path<String>, Query(q): Query<RmpeerQuery>) -> Result<Response, ApiError> {
    let moved = ctx.ipam.rmpeer(&peer, q.force).await.map_err(ipam_error)?;
    Ok(text(format!("{moved} addresses taken over from {peer}\n")))
}

#[derive(Debug, Default, serde::Deserialize)]
struct RmpeerQuery {
    #[serde(default)]
    force: bool,
}

/// `POST /reset`: give the addresses away, tear the data path down, stop.
async fn reset(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    for ep in ctx.dp.local_endpoints().await.map_err(internal)? {
        let _ = ctx.dp.detach_endpoint(&ep.id).await;
        let _ = ctx.ipam.release(&ep.id).await;
    }
    let moved = ctx.ipam.give_away().await.map_err(ipam_error)?;
    // Let the peers hear of it before the mesh goes.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let _ = ctx.reset.send(true);
    ctx.shutdown.cancel();
    Ok(text(format!("gave {moved} addresses to the other peers; removing the data path and state\n")))
}

async fn ps(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    let names = match &ctx.docker {
        Some(d) => d.names().await,
        None => Default::default(),
    };
    Ok(text(render::ps(&ctx.attacher.endpoints().await.map_err(attach_error)?, &names)))
}

/// `GET /proxy`: where the Docker API proxy listens, one per line.
async fn proxy(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    let addrs = docker_of(&ctx)?.proxy_addresses();
    if addrs.is_empty() {
        return Err(ApiError(StatusCode::NOT_FOUND, "the Docker API proxy is off (--no-proxy)".into()));
    }
    Ok(text(addrs.iter().map(|a| format!("{a}\n")).collect()))
}

fn dns_of(ctx: &Ctx) -> Result<&crate::dns::DnsHandle, ApiError> {
    ctx.dns.as_ref().ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "DNS is off (--no-dns)".into()))
}

fn parse_ip(ip: &str) -> Result<std::net::Ipv4Addr, ApiError> {
    ip.parse().map_err(|_| bad_request(format!("invalid address {ip:?}")))
}

/// `PUT /name/{container}/{ip}?fqdn=NAME` (Weave's API).
async fn dns_add(
    State(ctx): State<Ctx>,
    Path((container, ip)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let dns = dns_of(&ctx)?;
    let name = q.get("fqdn").filter(|n| !n.trim().is_empty()).ok_or_else(|| bad_request("give the name: ?fqdn=NAME"))?;
    if name.len() > 253 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_') {
        return Err(bad_request(format!("invalid DNS name {name:?}")));
    }
    dns.add(&container, &[parse_ip(&ip)?], name).await;
    Ok(text(String::new()))
}

/// `DELETE /name/{container}/{ip}[?fqdn=NAME]`.
async fn dns_remove(
    State(ctx): State<Ctx>,
    Path((container, ip)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let dns = dns_of(&ctx)?;
    dns.remove(&container, Some(parse_ip(&ip)?), q.get("fqdn").map(String::as_str)).await;
    Ok(text(String::new()))
}

/// `DELETE /name/{container}`: all of its names.
async fn dns_remove_container(State(ctx): State<Ctx>, Path(container): Path<String>) -> Result<Response, ApiError> {
    dns_of(&ctx)?.remove(&container, None, None).await;
    Ok(text(String::new()))
}

/// `GET /name/{name}`: the addresses of a name.
async fn dns_lookup(State(ctx): State<Ctx>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let dns = dns_of(&ctx)?;
    let addrs = dns.lookup(&name);
    if addrs.is_empty() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("{} not found", dns.fqdn(&name))));
    }
    Ok(text(addrs.iter().map(|a| format!("{a}\n")).collect()))
}

#[cfg(test)]
mod tests {
    use super::{ApiAddr, is_loopback_host};

    #[test]
    fn api_addresses_in_both_forms() {
        assert_eq!("127.0.0.1:6784".parse::<ApiAddr>().unwrap(), ApiAddr::Tcp("127.0.0.1:6784".parse().unwrap()));
        assert_eq!("tcp://127.0.0.1:1".parse::<ApiAddr>().unwrap().to_string(), "127.0.0.1:1");
        let unix: ApiAddr = "unix:///run/weft/weft-api.sock".parse().unwrap();
        assert_eq!(unix, ApiAddr::Unix("/run/weft/weft-api.sock".into()));
        assert_eq!(unix.to_string(), "unix:///run/weft/weft-api.sock");
        assert!(unix.is_local());
        assert!("unix://relative.sock".parse::<ApiAddr>().is_err());
        assert!(!"0.0.0.0:6784".parse::<ApiAddr>().unwrap().is_local());
    }

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in ["localhost", "localhost:6784", "LOCALHOST.", "api.localhost", "127.0.0.1", "127.0.0.1:6784", "127.9.9.9:1", "[::1]", "[::1]:6784"] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in ["evil.example", "evil.example:6784", "10.32.0.1:6784", "[::2]:6784", "127.0.0.1:x", "localhost.evil.example", "[::1]x", ""] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}

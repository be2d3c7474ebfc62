//! Docker: containers started on this host are put on the overlay.
//!
//! - The watcher follows Docker's event stream (bollard): a container that
//!   starts is attached (address from IPAM, `ethwe` in its namespace, DNS names,
//!   its /etc/hosts), one that dies is detached (address released, names
//!   removed). At start and after every reconnect it reconciles with what is
//!   running, so restarts of the agent or of dockerd lose nothing and running
//!   containers keep their addresses.
//! - The API proxy ([`proxy`]) rewrites container creation so the application
//!   starts only once `ethwe` is up, with weft's DNS.
//!
//! Events of one container are handled in order by one task; containers are
//! handled in parallel.
//!
//! Uses: attach (ipam, datapath, dns). Must not touch: the mesh's internals.

pub mod container;
pub mod create;
pub mod proxy;

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bollard::Docker;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::attach::{AttachError, Attacher, ContainerRuntime, RuntimeError, Spec};
use crate::task::{Task, TaskError};
use crate::datapath::AttachedEndpoint;
use container::{Facts, Naming, Plan, is_container_id};
pub use proxy::Listen;

/// The freestanding helper put in front of entrypoints (built by agent/build.rs).
pub const WAIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/weft-wait"));

/// Docker's default socket.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// The proxy's default socket (Weave's was /var/run/weave/weave.sock).
pub const DEFAULT_PROXY: &str = "unix:///var/run/weft/weft.sock";

/// How the Docker integration runs.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Docker's socket.
    pub socket: PathBuf,
    pub naming: Naming,
    pub multicast_route: bool,
    /// Write the overlay address into containers' /etc/hosts.
    pub rewrite_hosts: bool,
    /// Where weft-wait is installed on the host (bind-mounted into containers).
    pub wait_binary: Option<PathBuf>,
}

/// Writes weft-wait into `dir` (if it differs) and returns its path.
pub fn install_wait_binary(dir: &std::path::Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("weft-wait");
    if std::fs::read(&path).ok().as_deref() != Some(WAIT_BINARY) {
        let tmp = dir.join(".weft-wait.tmp");
        std::fs::write(&tmp, WAIT_BINARY)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

/// Why the Docker integration stopped. It waits for Docker rather than fail,
/// so today nothing ends it but a stop; the type keeps the owned-task shape.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker socket {socket}: {source}")]
    Client {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
}

/// What the per-container task is asked to do.
enum Job {
    /// It started (or is running at reconcile): attach if it should be.
    Started,
    /// It died or was removed: detach.
    Gone,
    /// `weft attach [ADDR...] CONTAINER`.
    Attach { addrs: Vec<String>, reply: oneshot::Sender<Result<AttachedEndpoint, AttachError>> },
    /// `weft detach CONTAINER`.
    Detach { reply: oneshot::Sender<Result<(), AttachError>> },
}

/// The Docker integration's handle (for the API, as a [`ContainerRuntime`]).
#[derive(Clone)]
pub struct DockerHandle(Arc<Inner>);

struct Inner {
    /// Made once Docker's socket exists (the watcher waits for it).
    client: OnceLock<Docker>,
    attacher: Attacher,
    config: DockerConfig,
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
    /// The per-container tasks: stopped and waited for at shutdown.
    tracker: TaskTracker,
    proxy: Vec<Listen>,
    cancel: CancellationToken,
}

/// The running Docker integration; its owner stops it.
pub struct DockerService {
    handle: DockerHandle,
    task: Task<DockerError>,
}

impl DockerService {
    /// A handle for the API.
    pub fn handle(&self) -> DockerHandle {
        self.handle.clone()
    }

    /// Whether the watcher ended on its own (its error comes from [`Self::shutdown`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the watcher, the proxy and every container task; waits for them.
    pub async fn shutdown(self) -> Result<(), TaskError<DockerError>> {
        self.handle.0.cancel.cancel();
        let result = self.task.shutdown().await;
        let tracker = &self.handle.0.tracker;
        tracker.close();
        tracker.wait().await;
        result
    }
}

/// Starts the watcher and serves the proxy on the `proxy` listeners (bound by
/// the launch). Docker need not be running, nor its socket exist: the watcher
/// waits for it (and says so once).
pub fn spawn(
    config: DockerConfig,
    attacher: Attacher,
    dns_server: watch::Receiver<Option<Ipv4Addr>>,
    proxy: Vec<proxy::Bound>,
) -> DockerService {
    let cancel = CancellationToken::new();
    let listening = if proxy.is_empty() {
        Vec::new()
    } else {
        let options = proxy_options(&config, dns_server, cancel.clone());
        let p = Arc::new(proxy::Proxy { upstream: config.socket.clone(), options });
        proxy::serve(p, proxy, cancel.clone())
    };
    let handle = DockerHandle(Arc::new(Inner {
        client: OnceLock::new(),
        attacher,
        config,
        workers: Mutex::new(HashMap::new()),
        tracker: TaskTracker::new(),
        proxy: listening,
        cancel: cancel.clone(),
    }));
    let watcher = handle.clone();
    let task = Task::spawn("docker", tracing::info_span!("docker"), cancel.child_token(), move |c| watcher.watch(c));
    DockerService { handle, task }
}

/// The create rewrite's options, following this host's overlay address (the
/// DNS server containers are given).
fn proxy_options(
    config: &DockerConfig,
    mut dns_server: watch::Receiver<Option<Ipv4Addr>>,
    cancel: CancellationToken,
) -> watch::Receiver<create::Options> {
    let base = create::Options {
        naming: config.naming.clone(),
        dns_server: *dns_server.borrow(),
        wait_binary: config.wait_binary.as_ref().map(|p| p.display().to_string()),
    };
    let (tx, rx) = watch::channel(base);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = dns_server.changed() => if r.is_err() { return },
            }
            let server = *dns_server.borrow_and_update();
            tx.send_modify(|o| o.dns_server = server);
        }
    });
    rx
}

/// A poisoned workers lock means a worker panicked while registering: a bug,
/// but the map itself stays consistent, so keep going.
fn workers(inner: &Inner) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Job>>> {
    inner.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait::async_trait]
impl ContainerRuntime for DockerHandle {
    async fn attach(&self, container: &str, addrs: Vec<String>) -> Result<AttachedEndpoint, AttachError> {
        let id = self.resolve(container).await?;
        let (reply, rx) = oneshot::channel();
        self.dispatch(&id, Job::Attach { addrs, reply });
        rx.await.map_err(|_| AttachError::Stopping)?
    }

    async fn detach(&self, container: &str) -> Result<(), AttachError> {
        let id = self.resolve(container).await?;
        let (reply, rx) = oneshot::channel();
        self.dispatch(&id, Job::Detach { reply });
        rx.await.map_err(|_| AttachError::Stopping)?
    }

    async fn names(&self) -> HashMap<String, String> {
        let Some(client) = self.0.client.get() else { return HashMap::new() };
        let opts = bollard::query_parameters::ListContainersOptions { all: true, ..Default::default() };
        match client.list_containers(Some(opts)).await {
            Ok(list) => list
                .into_iter()
                .filter_map(|c| {
                    let name = c.names?.first()?.trim_start_matches('/').to_string();
                    Some((c.id?, name))
                })
                .collect(),
            Err(_) => HashMap::new(),
        }
    }

    fn proxy_addresses(&self) -> Vec<String> {
        self.0.proxy.iter().map(ToString::to_string).collect()
    }
}

impl DockerHandle {
    fn client(&self) -> Result<&Docker, RuntimeError> {
        self.0.client.get().ok_or_else(|| RuntimeError::Unreachable {
            source: format!("no Docker socket at {} yet", self.0.config.socket.display()).into(),
        })
    }

    async fn resolve(&self, container: &str) -> Result<String, RuntimeError> {
        match self.client()?.inspect_container(container, None).await {
            Ok(c) => c.id.ok_or_else(|| RuntimeError::NoSuchContainer { container: container.to_string() }),
            Err(e) => Err(runtime_error(container, e)),
        }
    }

    /// Hands a job to the container's task (started on first use; it ends when
    /// the container is removed).
    fn dispatch(&self, id: &str, job: Job) {
        let mut workers = workers(&self.0);
        let job = match workers.get(id) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // The receiver is right here: the send cannot fail.
        let _ = tx.send(job);
        workers.insert(id.to_string(), tx);
        let span = tracing::info_span!("container", id = %short(id));
        self.0.tracker.spawn(self.clone().worker(id.to_string(), rx).instrument(span));
    }

    async fn worker(self, id: String, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut retry: Option<Duration> = None;
        loop {
            let job = match retry {
                None => tokio::select! {
                    _ = self.0.cancel.cancelled() => return,
                    j = rx.recv() => j,
                },
                // An attach waits for IPAM: try again later, unless something
                // newer arrives first.
                Some(delay) => tokio::select! {
                    _ = self.0.cancel.cancelled() => return,
                    j = rx.recv() => j,
                    _ = tokio::time::sleep(delay) => Some(Job::Started),
                },
            };
            let Some(job) = job else { return };
            let was_gone = matches!(job, Job::Gone);
            match job {
                Job::Started => match self.started(&id, None).await {
                    Err(e) if e.is_retryable() => {
                        let next = retry.map_or(Duration::from_millis(500), |d| (d * 2).min(Duration::from_secs(10)));
                        info!(error = %e, retry_in = ?next, "container not attached yet");
                        retry = Some(next);
                        continue;
                    }
                    Err(e) => warn!(error = %e, "cannot attach container"),
                    Ok(_) => {}
                },
                Job::Gone => {
                    if let Err(e) = self.gone(&id).await {
                        warn!(error = %e, "cannot detach container");
                    }
                }
                Job::Attach { addrs, reply } => {
                    let r = match self.started(&id, Some(&addrs)).await {
                        Ok(Some(a)) => Ok(a),
                        Ok(None) => Err(RuntimeError::NotRunning { container: short(&id).to_string() }.into()),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
                Job::Detach { reply } => {
                    let _ = reply.send(self.gone(&id).await);
                }
            }
            retry = None;
            // Removed containers never come back: the task ends. A job sent in
            // between starts a new task (the send fails once rx is gone).
            if was_gone && self.removed(&id).await {
                let mut workers = workers(&self.0);
                if rx.is_empty() {
                    workers.remove(&id);
                    return;
                }
            }
        }
    }

    /// Whether Docker no longer knows the container.
    async fn removed(&self, id: &str) -> bool {
        let Ok(client) = self.client() else { return false };
        matches!(
            client.inspect_container(id, None).await,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
        )
    }

    /// Attaches a running container as its plan says (or as `weft attach` asks);
    /// `Ok(None)`: it is not for weft, or not running.
    async fn started(&self, id: &str, manual: Option<&[String]>) -> Result<Option<AttachedEndpoint>, AttachError> {
        let facts = match self.client()?.inspect_container(id, None).await {
            Ok(c) => Facts::from_inspect(&c),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                self.gone(id).await?;
                return Ok(None);
            }
            Err(e) => return Err(runtime_error(id, e).into()),
        };
        let manual = manual.map(|a| a.to_vec());
        match container::plan(&facts, &self.0.config.naming, manual.as_deref())? {
            Plan::Gone => {
                debug!("ended before it could be attached");
                self.gone(id).await?;
                Ok(None)
            }
            Plan::Skip(why) => {
                debug!(name = %facts.name, %why, "not attaching");
                Ok(None)
            }
            Plan::Attach { wants, names } => {
                if let Some(ep) = self.0.attacher.endpoint(id).await {
                    if manual.is_some() {
                        return Err(RuntimeError::AlreadyAttached { container: facts.name, addrs: ep.addrs }.into());
                    }
                    // Still attached from before (an agent restart): same
                    // addresses; make sure its names are there.
                    self.0.attacher.add_names(id, &ep.addrs, &names).await;
                    return Ok(Some(ep));
                }
                let mut spec = Spec::new(id, format!("/proc/{}/ns/net", facts.pid));
                spec.wants = wants;
                spec.dns_names = names;
                spec.multicast_route = self.0.config.multicast_route;
                if self.0.config.rewrite_hosts
                    && let Some(path) = facts.hosts_path.clone()
                {
                    let (host, domain) = (facts.hostname.clone(), facts.domainname.clone());
                    spec.before_link = Some(Arc::new(move |addrs: &[ipnet::Ipv4Net]| {
                        if let Some(a) = addrs.first() {
                            write_hosts(&path, a.addr(), &host, &domain);
                        }
                    }));
                }
                let ep = self.0.attacher.attach(&spec).await?;
                info!(name = %facts.name, addrs = ?ep.addrs, "container attached");
                Ok(Some(ep))
            }
        }
    }

    /// Takes a container off the overlay (idempotent).
    async fn gone(&self, id: &str) -> Result<(), AttachError> {
        let had = self.0.attacher.is_attached(id).await;
        self.0.attacher.detach(id).await?;
        if had {
            info!(container = %short(id), "container detached");
        }
        Ok(())
    }

    /// Waits for Docker's socket, then follows its events until cancelled,
    /// reconnecting as needed.
    async fn watch(self, cancel: CancellationToken) -> Result<(), DockerError> {
        let mut backoff = Duration::from_millis(250);
        let mut told = false;
        let socket = self.0.config.socket.display().to_string();
        loop {
            if self.0.client.get().is_none() {
                match Docker::connect_with_unix(&socket, 30, bollard::API_DEFAULT_VERSION) {
                    Ok(client) => {
                        let _ = self.0.client.set(client);
                    }
                    Err(e) => {
                        if !told {
                            warn!(docker = %socket, error = %e, "no Docker socket yet; containers are attached once Docker runs (or pass --docker-host, or --no-docker)");
                            told = true;
                        }
                        tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            // Events from one second before the listing on: none is missed
            // between the two (handling them twice is harmless).
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(1))
                .unwrap_or(0);
            match self.reconcile().await {
                Ok(n) => {
                    info!(docker = %socket, running = n, "watching Docker");
                    told = false;
                    backoff = Duration::from_millis(250);
                    if self.follow(since, &cancel).await {
                        return Ok(());
                    }
                }
                Err(e) if !told => {
                    warn!(docker = %socket, error = %e, "cannot reach Docker; containers are attached once it answers");
                    told = true;
                }
                Err(e) => debug!(error = %e, "Docker still not reachable"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Follows the event stream until it ends; true when cancelled.
    async fn follow(&self, since: u64, cancel: &CancellationToken) -> bool {
        let Ok(client) = self.client() else { return false };
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["start".into(), "die".into(), "destroy".into()]),
        ]);
        let opts = bollard::query_parameters::EventsOptions { since: Some(since.to_string()), until: None, filters: Some(filters) };
        let mut events = client.events(Some(opts));
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return true,
                n = events.next() => n,
            };
            match next {
                Some(Ok(ev)) => self.on_event(ev),
                Some(Err(e)) => {
                    warn!(error = %e, "Docker's event stream failed; reconnecting");
                    return false;
                }
                None => {
                    warn!("Docker's event stream ended (dockerd restarting?); reconnecting");
                    return false;
                }
            }
        }
    }

    fn on_event(&self, ev: bollard::models::EventMessage) {
        let Some(id) = ev.actor.and_then(|a| a.id).filter(|id| is_container_id(id)) else { return };
        match ev.action.as_deref() {
            Some("start") => self.dispatch(&id, Job::Started),
            Some("die" | "destroy") => self.dispatch(&id, Job::Gone),
            _ => {}
        }
    }

    /// Attaches what runs; detaches, releases and unnames what does not (it
    /// ended while the agent or the event stream was away). Returns how many run.
    async fn reconcile(&self) -> Result<usize, RuntimeError> {
        let list = self
            .client()?
            .list_containers(Some(bollard::query_parameters::ListContainersOptions::default()))
            .await
            .map_err(|e| RuntimeError::Unreachable { source: Box::new(e) })?;
        let running: BTreeSet<String> = list.into_iter().filter_map(|c| c.id).collect();
        for id in &running {
            self.dispatch(id, Job::Started);
        }
        let known = self.0.attacher.known_ids().await;
        for id in known.iter().filter(|id| is_container_id(id) && !running.contains(*id)) {
            self.dispatch(id, Job::Gone);
        }
        Ok(running.len())
    }
}

/// Puts the overlay address into the container's /etc/hosts (in place: Docker
/// bind-mounts the file, a rename would not be seen).
fn write_hosts(path: &str, addr: Ipv4Addr, hostname: &str, domainname: &str) {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let content = container::hosts_file(&existing, addr, hostname, domainname);
    if let Err(e) = std::fs::write(path, content) {
        warn!(%path, error = %e, "cannot write the container's /etc/hosts");
    }
}

/// What a failed Docker call means for attach.
fn runtime_error(container: &str, e: bollard::errors::Error) -> RuntimeError {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. } => {
            RuntimeError::NoSuchContainer { container: container.to_string() }
        }
        e @ bollard::errors::Error::DockerResponseServerError { .. } => RuntimeError::Refused { source: Box::new(e) },
        e => RuntimeError::Unreachable { source: Box::new(e) },
    }
}

/// Docker's short id.
pub fn short(id: &str) -> &str {
    if is_container_id(id) { &id[..12] } else { id }
}

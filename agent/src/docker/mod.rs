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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::attach::{AttachError, Attacher, Spec};
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
    /// Where the API proxy listens (none: no proxy).
    pub proxy: Vec<Listen>,
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

/// What the per-container task is asked to do.
enum Job {
    /// It started (or is running at reconcile): attach if it should be.
    Started,
    /// It died or was removed: detach.
    Gone,
    /// `weft attach [ADDR...] CONTAINER`.
    Attach { addrs: Vec<String>, reply: oneshot::Sender<Result<AttachedEndpoint, String>> },
    /// `weft detach CONTAINER`.
    Detach { reply: oneshot::Sender<Result<(), String>> },
}

/// The Docker integration's handle (for the API).
#[derive(Clone)]
pub struct DockerHandle(Arc<Inner>);

struct Inner {
    client: Docker,
    attacher: Attacher,
    config: DockerConfig,
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
    proxy: Mutex<Vec<Listen>>,
    cancel: CancellationToken,
}

/// Starts the watcher and the proxy. Docker need not be running: the watcher
/// waits for it (and says so once).
pub async fn start(
    config: DockerConfig,
    attacher: Attacher,
    dns_server: watch::Receiver<Option<Ipv4Addr>>,
    cancel: CancellationToken,
) -> Result<DockerHandle, String> {
    let socket = config.socket.display().to_string();
    let client = Docker::connect_with_unix(&socket, 30, bollard::API_DEFAULT_VERSION)
        .map_err(|e| format!("Docker socket {socket}: {e}"))?;
    let handle = DockerHandle(Arc::new(Inner {
        client,
        attacher,
        config: config.clone(),
        workers: Mutex::new(HashMap::new()),
        proxy: Mutex::new(Vec::new()),
        cancel: cancel.clone(),
    }));
    if !config.proxy.is_empty() {
        let options = proxy_options(&config, dns_server, cancel.clone());
        let proxy = Arc::new(proxy::Proxy { upstream: config.socket.clone(), options });
        let bound = proxy::serve(proxy, &config.proxy, cancel.clone())
            .await
            .map_err(|e| format!("cannot serve the Docker API proxy on {:?}: {e} (pass --proxy-listen, or --no-proxy)", config.proxy.iter().map(ToString::to_string).collect::<Vec<_>>()))?;
        *handle.0.proxy.lock().expect("proxy lock") = bound;
    }
    tokio::spawn(handle.clone().watch());
    Ok(handle)
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

impl DockerHandle {
    /// Where the proxy listens (for `weft env`).
    pub fn proxy_addresses(&self) -> Vec<String> {
        self.0.proxy.lock().expect("proxy lock").iter().map(ToString::to_string).collect()
    }

    /// `weft attach [ADDR...] CONTAINER`: by name or id.
    pub async fn attach(&self, container: &str, addrs: Vec<String>) -> Result<AttachedEndpoint, String> {
        let id = self.resolve(container).await?;
        let (reply, rx) = oneshot::channel();
        self.dispatch(&id, Job::Attach { addrs, reply });
        rx.await.map_err(|_| "the agent is stopping".to_string())?
    }

    /// `weft detach CONTAINER`.
    pub async fn detach(&self, container: &str) -> Result<(), String> {
        let id = self.resolve(container).await?;
        let (reply, rx) = oneshot::channel();
        self.dispatch(&id, Job::Detach { reply });
        rx.await.map_err(|_| "the agent is stopping".to_string())?
    }

    /// Container ids → names, for `weft ps`.
    pub async fn names(&self) -> HashMap<String, String> {
        let opts = bollard::query_parameters::ListContainersOptions { all: true, ..Default::default() };
        match self.0.client.list_containers(Some(opts)).await {
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

    async fn resolve(&self, container: &str) -> Result<String, String> {
        match self.0.client.inspect_container(container, None).await {
            Ok(c) => c.id.ok_or_else(|| format!("Docker did not say which container {container:?} is")),
            Err(e) => Err(docker_error(container, &e)),
        }
    }

    /// Hands a job to the container's task (started on first use; it ends when
    /// the container is removed).
    fn dispatch(&self, id: &str, job: Job) {
        let mut workers = self.0.workers.lock().expect("workers lock");
        let job = match workers.get(id) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(job).expect("receiver alive");
        workers.insert(id.to_string(), tx);
        tokio::spawn(self.clone().worker(id.to_string(), rx));
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
                    Err(AttachError::Unavailable(e)) => {
                        let next = retry.map_or(Duration::from_millis(500), |d| (d * 2).min(Duration::from_secs(10)));
                        info!(container = %short(&id), error = %e, retry_in = ?next, "container not attached yet");
                        retry = Some(next);
                        continue;
                    }
                    Err(AttachError::Invalid(e)) => warn!(container = %short(&id), error = %e, "cannot attach container"),
                    Ok(_) => {}
                },
                Job::Gone => {
                    if let Err(e) = self.gone(&id).await {
                        warn!(container = %short(&id), error = %e, "cannot detach container");
                    }
                }
                Job::Attach { addrs, reply } => {
                    let r = match self.started(&id, Some(&addrs)).await {
                        Ok(Some(a)) => Ok(a),
                        Ok(None) => Err("Docker says it is not running".to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = reply.send(r);
                }
                Job::Detach { reply } => {
                    let _ = reply.send(self.gone(&id).await.map_err(|e| e.to_string()));
                }
            }
            retry = None;
            // Removed containers never come back: the task ends. A job sent in
            // between starts a new task (the send fails once rx is gone).
            if was_gone && self.removed(&id).await {
                let mut workers = self.0.workers.lock().expect("workers lock");
                if rx.is_empty() {
                    workers.remove(&id);
                    return;
                }
            }
        }
    }

    /// Whether Docker no longer knows the container.
    async fn removed(&self, id: &str) -> bool {
        matches!(
            self.0.client.inspect_container(id, None).await,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
        )
    }

    /// Attaches a running container as its plan says (or as `weft attach` asks);
    /// `Ok(None)`: it is not for weft, or not running.
    async fn started(&self, id: &str, manual: Option<&[String]>) -> Result<Option<AttachedEndpoint>, AttachError> {
        let facts = match self.0.client.inspect_container(id, None).await {
            Ok(c) => Facts::from_inspect(&c),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                self.gone(id).await?;
                return Ok(None);
            }
            Err(e) => return Err(AttachError::Unavailable(docker_error(id, &e))),
        };
        let manual = manual.map(|a| a.to_vec());
        match container::plan(&facts, &self.0.config.naming, manual.as_deref()) {
            Plan::Gone => {
                debug!(container = %short(id), "ended before it could be attached");
                self.gone(id).await?;
                Ok(None)
            }
            Plan::Skip(why) => {
                debug!(container = %short(id), name = %facts.name, %why, "not attaching");
                Ok(None)
            }
            Plan::Attach { wants, names } => {
                let existing = self.0.attacher.dp.local_endpoints().await.ok().and_then(|eps| eps.into_iter().find(|e| e.id == id));
                if let Some(ep) = existing {
                    if manual.is_some() {
                        return Err(AttachError::Invalid(format!(
                            "{} is attached already (addresses {:?}): detach it first",
                            facts.name, ep.addrs
                        )));
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
                    && let Some(path) = facts.hosts_path.clone() {
                        let (host, domain) = (facts.hostname.clone(), facts.domainname.clone());
                        spec.before_link = Some(Arc::new(move |addrs: &[ipnet::Ipv4Net]| {
                            if let Some(a) = addrs.first() {
                                write_hosts(&path, a.addr(), &host, &domain);
                            }
                        }));
                    }
                let ep = self.0.attacher.attach(&spec).await?;
                info!(container = %short(id), name = %facts.name, addrs = ?ep.addrs, "container attached");
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

    /// Follows Docker's events until cancelled, reconnecting as needed.
    async fn watch(self) {
        let mut backoff = Duration::from_millis(250);
        let mut told = false;
        let socket = self.0.config.socket.display().to_string();
        loop {
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
                    let filters = HashMap::from([
                        ("type".to_string(), vec!["container".to_string()]),
                        ("event".to_string(), vec!["start".into(), "die".into(), "destroy".into()]),
                    ]);
                    let opts = bollard::query_parameters::EventsOptions { since: Some(since.to_string()), until: None, filters: Some(filters) };
                    let mut events = self.0.client.events(Some(opts));
                    loop {
                        let next = tokio::select! {
                            _ = self.0.cancel.cancelled() => return,
                            n = events.next() => n,
                        };
                        match next {
                            Some(Ok(ev)) => self.on_event(ev),
                            Some(Err(e)) => {
                                warn!(error = %e, "Docker's event stream failed; reconnecting");
                                break;
                            }
                            None => {
                                warn!("Docker's event stream ended (dockerd restarting?); reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) if !told => {
                    warn!(docker = %socket, error = %e, "cannot reach Docker; containers are attached once it answers");
                    told = true;
                }
                Err(e) => debug!(error = %e, "Docker still not reachable"),
            }
            tokio::select! {
                _ = self.0.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
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
    async fn reconcile(&self) -> Result<usize, String> {
        let list = self
            .0
            .client
            .list_containers(Some(bollard::query_parameters::ListContainersOptions::default()))
            .await
            .map_err(|e| e.to_string())?;
        let running: BTreeSet<String> = list.into_iter().filter_map(|c| c.id).collect();
        for id in &running {
            self.dispatch(id, Job::Started);
        }
        let a = &self.0.attacher;
        let mut known: BTreeSet<String> = BTreeSet::new();
        if let Ok(eps) = a.dp.local_endpoints().await {
            known.extend(eps.into_iter().map(|e| e.id));
        }
        if let Ok(status) = a.ipam.status().await {
            known.extend(status.allocations.into_keys());
        }
        if let Some(dns) = &a.dns {
            known.extend(dns.table.local().into_iter().filter(|(_, e)| e.tombstone.is_none()).map(|(k, _)| k.container));
        }
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

fn docker_error(container: &str, e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. } => {
            format!("no such container: {container}")
        }
        bollard::errors::Error::DockerResponseServerError { message, .. } => format!("Docker: {message}"),
        e => format!("cannot reach Docker: {e} (is dockerd running? --docker-host)"),
    }
}

/// Docker's short id.
pub fn short(id: &str) -> &str {
    if is_container_id(id) { &id[..12] } else { id }
}

//! Forwarding what is not ours to the resolvers in /etc/resolv.conf: re-read
//! when the file changes, never ourselves, over UDP (TCP when the answer is
//! truncated or the client asked over TCP), with a timeout per server.
//!
//! Bounded: UDP queries go out over one shared set of [`UDP_SOCKETS`] sockets
//! per address family (bound on first use, one receive task and buffer each;
//! answers are matched by query id and server), and at most
//! [`MAX_IN_FLIGHT`] forwards run at once ([`Upstream::permit`]): a flood of
//! queries to a silent upstream costs a bounded number of tasks, sockets and
//! buffers (it was a socket, a 64 KiB buffer and a task per query, unbounded:
//! 60k queries took 1.28 GB and every file descriptor).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::debug;

/// How long one upstream server gets to answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Forwards in flight at most; more are answered SERVFAIL at once (and
/// counted): 256 queries of a few hundred bytes, enough for a busy host.
pub const MAX_IN_FLIGHT: usize = 256;
/// Sockets forwarded UDP queries share (per address family): several source
/// ports make spoofed answers harder to place than one would.
pub const UDP_SOCKETS: usize = 16;
/// How often the resolv.conf file is checked for changes.
const RECHECK: Duration = Duration::from_secs(1);

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream resolver in {0} (other than weft itself)")]
    NoServers(String),
    #[error("no upstream resolver answered: {0}")]
    Failed(String),
}

struct Cached {
    checked: Instant,
    modified: Option<SystemTime>,
    servers: Vec<SocketAddr>,
}

/// The upstream resolvers.
pub struct Upstream {
    path: PathBuf,
    exclude: Vec<SocketAddr>,
    cache: Mutex<Cached>,
    permits: Arc<Semaphore>,
    v4: OnceCell<SocketSet>,
    v6: OnceCell<SocketSet>,
}

/// Queries waiting for an answer on a [`SocketSet`], by the id they were sent with.
type Waiting = Arc<Mutex<HashMap<u16, (SocketAddr, oneshot::Sender<Vec<u8>>)>>>;

/// The shared UDP sockets of one address family and the queries waiting on them.
struct SocketSet {
    sockets: Vec<Arc<UdpSocket>>,
    waiting: Waiting,
}

impl SocketSet {
    async fn bind(v6: bool) -> std::io::Result<SocketSet> {
        let bind: SocketAddr = if v6 { SocketAddr::from(([0u16; 8], 0)) } else { SocketAddr::from(([0u8; 4], 0)) };
        let waiting: Waiting = Arc::default();
        let mut sockets = Vec::with_capacity(UDP_SOCKETS);
        for _ in 0..UDP_SOCKETS {
            let socket = Arc::new(UdpSocket::bind(bind).await?);
            tokio::spawn(receive(socket.clone(), waiting.clone()));
            sockets.push(socket);
        }
        Ok(SocketSet { sockets, waiting })
    }
}

/// Hands the answers arriving on `socket` to the queries waiting for them;
/// anything else (late, spoofed, from another server) is dropped.
async fn receive(socket: Arc<UdpSocket>, waiting: Waiting) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "upstream receive error");
                // Errors on an unconnected UDP socket (ICMP unreachable) are
                // per datagram; a pause keeps a persistent one from spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(id) = buf.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else { continue };
        if n < 12 {
            continue;
        }
        let Ok(mut waiting) = waiting.lock() else { return };
        if waiting.get(&id).is_some_and(|(server, _)| *server == from)
            && let Some((_, tx)) = waiting.remove(&id)
        {
            let _ = tx.send(buf[..n].to_vec());
        }
    }
}

/// Removes a query from the waiting list however its wait ends.
struct WaitGuard<'a> {
    waiting: &'a Waiting,
    id: u16,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&self.id);
        }
    }
}

/// The `nameserver` lines of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let addr = words.next()?;
            let addr = addr.split('%').next()?; // drop an IPv6 scope
            addr.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

impl Upstream {
    /// Resolvers from `path`, never one of `exclude` (our own listen addresses).
    pub fn new(path: impl Into<PathBuf>, exclude: Vec<SocketAddr>) -> Self {
        let past = Instant::now().checked_sub(RECHECK * 2).unwrap_or_else(Instant::now);
        Upstream {
            path: path.into(),
            exclude,
            cache: Mutex::new(Cached { checked: past, modified: None, servers: Vec::new() }),
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            v4: OnceCell::new(),
            v6: OnceCell::new(),
        }
    }

    /// A place among the [`MAX_IN_FLIGHT`] forwards, if one is free.
    pub fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Forwards running now.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.permits.available_permits()
    }

    /// One UDP exchange with `server` over the shared sockets: the query is
    /// sent with a fresh id (written into `q`), the answer matched on it.
    async fn udp_exchange(&self, server: SocketAddr, q: &mut [u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let cell = if server.is_ipv4() { &self.v4 } else { &self.v6 };
        let set = cell.get_or_try_init(|| SocketSet::bind(server.is_ipv6())).await?;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut waiting = set.waiting.lock().map_err(|_| std::io::Error::other("upstream lock poisoned"))?;
            // At most MAX_IN_FLIGHT of 65536 ids are taken: a few tries find a free one.
            let id = (0..64).map(|_| rand::random::<u16>()).find(|id| !waiting.contains_key(id));
            let id = id.ok_or_else(|| std::io::Error::other("no free query id"))?;
            waiting.insert(id, (server, tx));
            id
        };
        let _guard = WaitGuard { waiting: &set.waiting, id };
        q[..2].copy_from_slice(&id.to_be_bytes());
        let socket = &set.sockets[usize::from(id) % set.sockets.len()];
        socket.send_to(q, server).await?;
        let answer = rx.await.map_err(|_| std::io::Error::other("upstream receiver stopped"))?;
        Ok((id, answer))
    }

    fn is_self(&self, s: &SocketAddr) -> bool {
        self.exclude.iter().any(|e| {
            *e == *s || (e.ip().is_unspecified() && e.port() == s.port() && (s.ip().is_loopback() || s.ip().is_unspecified()))
        })
    }

    /// The servers now (the file is re-read when it changed).
    pub fn servers(&self) -> Vec<SocketAddr> {
        let mut cache = self.cache.lock().expect("upstream lock");
        if cache.checked.elapsed() >= RECHECK {
            cache.checked = Instant::now();
            let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
            if modified != cache.modified || cache.servers.is_empty() {
                cache.modified = modified;
                let text = std::fs::read_to_string(&self.path).unwrap_or_default();
                cache.servers = parse_resolv_conf(&text).into_iter().filter(|s| !self.is_self(s)).collect();
                debug!(path = %self.path.display(), servers = ?cache.servers, "upstream resolvers");
            }
        }
        cache.servers.clone()
    }

    /// Forwards `query` (a whole DNS message) and returns the answer, with the
    /// query's ID restored.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Result<Vec<u8>, UpstreamError> {
        if query.len() < 12 {
            return Err(UpstreamError::Failed("query too short".into()));
        }
        let servers = self.servers();
        if servers.is_empty() {
            return Err(UpstreamError::NoServers(self.path.display().to_string()));
        }
        let original_id = [query[0], query[1]];
        let mut q = query.to_vec();
        let mut errors = Vec::new();
        for server in servers {
            let attempt = async {
                if !tcp {
                    let (id, answer) = self.udp_exchange(server, &mut q).await?;
                    // TC set: the full answer needs TCP.
                    if answer.len() > 2 && answer[2] & 0x02 != 0 {
                        return tcp_exchange(server, &q, id).await;
                    }
                    Ok(answer)
                } else {
                    let id: u16 = rand::random();
                    q[..2].copy_from_slice(&id.to_be_bytes());
                    tcp_exchange(server, &q, id).await
                }
            };
            match tokio::time::timeout(TIMEOUT, attempt).await {
                Ok(Ok(mut answer)) => {
                    answer[..2].copy_from_slice(&original_id);
                    return Ok(answer);
                }
                Ok(Err(e)) => errors.push(format!("{server}: {e}")),
                Err(_) => errors.push(format!("{server}: timed out")),
            }
        }
        Err(UpstreamError::Failed(errors.join("; ")))
    }
}

async fn tcp_exchange(server: SocketAddr, q: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    let len = u16::try_from(q.len()).map_err(|_| std::io::Error::other("query too long"))?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(q).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    if buf.len() < 12 || buf[..2] != id.to_be_bytes() {
        return Err(std::io::Error::other("answer does not match the query"));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lines() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:2\n";
        let servers = parse_resolv_conf(text);
        assert_eq!(servers, vec!["10.0.0.2:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]);
        let up = Upstream::new("/nonexistent", vec!["10.0.0.2:53".parse().unwrap()]);
        assert!(up.is_self(&"10.0.0.2:53".parse().unwrap()), "never to itself");
        assert!(up.servers().is_empty());
    }
}

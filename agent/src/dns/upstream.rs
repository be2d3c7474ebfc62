//! Forwarding what is not ours to the resolvers in /etc/resolv.conf: re-read
//! when the file changes, never ourselves, over UDP (TCP when the answer is
//! truncated or the client asked over TCP), with a timeout per server.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

/// How long one upstream server gets to answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);
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
        Upstream { path: path.into(), exclude, cache: Mutex::new(Cached { checked: past, modified: None, servers: Vec::new() }) }
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
        let id: u16 = rand::random();
        q[..2].copy_from_slice(&id.to_be_bytes());
        let mut errors = Vec::new();
        for server in servers {
            let attempt = async {
                if !tcp {
                    let answer = udp_exchange(server, &q, id).await?;
                    // TC set: the full answer needs TCP.
                    if answer.len() > 2 && answer[2] & 0x02 != 0 {
                        return tcp_exchange(server, &q, id).await;
                    }
                    Ok(answer)
                } else {
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

async fn udp_exchange(server: SocketAddr, q: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(q).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Anything else on this socket (a late or spoofed datagram) is ignored.
        if n >= 12 && buf[..2] == id.to_be_bytes() {
            buf.truncate(n);
            return Ok(buf);
        }
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

//! The one accept loop every listener of the agent uses (mesh, Docker proxy,
//! HTTP API, DNS over TCP is hickory's own): an `accept` that fails for want of
//! resources (out of file descriptors, `EMFILE`/`ENFILE`, or of memory) pauses
//! accepting, 5 ms doubling to 1 s, instead of retrying at once (which spun at
//! 170 % CPU and wrote millions of log lines), and logs one line per episode of
//! failures, a reminder a minute while it lasts, and a line with the count when
//! accepting works again. A connection that died in the backlog
//! (`ECONNABORTED`, ...) is skipped without a pause.
//!
//! Owns the pause and its log lines. Must not decide anything about the
//! connections it hands out.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// The first pause after a failed accept: short, since a few descriptors are
/// often freed at once (a burst of clients closing).
pub const BACKOFF_START: Duration = Duration::from_millis(5);
/// The longest pause: a listener that recovers is serving again within a second.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While accepts keep failing, a reminder in the log this often.
pub const REMIND: Duration = Duration::from_secs(60);

/// A listener [`Acceptor`] can drive (tokio's TCP and unix listeners).
pub trait Listen: Send + Sync + 'static {
    type Io: Send + 'static;
    type Addr: Send + 'static;
    fn accept_once(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listen for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept_once(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        self.accept()
    }
}

impl Listen for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept_once(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        self.accept()
    }
}

/// Whether a failed accept concerns one connection only (it went away in the
/// backlog): the next accept may well succeed at once.
fn connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

/// Pauses between failed accepts, doubling, and the log lines of an episode.
/// Pure: the clock is given.
#[derive(Debug)]
pub struct Backoff {
    /// Failed accepts in this episode.
    failures: u64,
    /// When this episode started.
    since: Option<Instant>,
    /// The next pause.
    pause: Duration,
    /// When this episode was last logged.
    logged: Option<Instant>,
}

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    pub pause: Duration,
    /// Log it (the first failure of an episode, then every [`REMIND`]).
    pub log: bool,
    /// Failures in the episode so far.
    pub failures: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Backoff { failures: 0, since: None, pause: BACKOFF_START, logged: None }
    }

    /// An accept failed at `now`.
    pub fn failed(&mut self, now: Instant) -> Pause {
        self.failures += 1;
        self.since.get_or_insert(now);
        let pause = self.pause;
        self.pause = (self.pause * 2).min(BACKOFF_MAX);
        let log = self.logged.is_none_or(|at| now.duration_since(at) >= REMIND);
        if log {
            self.logged = Some(now);
        }
        Pause { pause, log, failures: self.failures }
    }

    /// An accept succeeded at `now`: the failures of the episode it ends and
    /// how long it lasted, if there was one.
    pub fn succeeded(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let ended = self.since.map(|since| (self.failures, now.duration_since(since)));
        *self = Backoff::new();
        ended
    }
}

/// A listener with the pause: `accept` never fails, it waits.
pub struct Acceptor<L> {
    listener: L,
    /// What listens, for the log ("mesh", "api", ...).
    what: &'static str,
    backoff: Backoff,
    /// Accepting resumes then. Kept here so that `accept` is cancel-safe: a
    /// `select!` that drops it mid-pause does not shorten the pause.
    paused_until: Option<tokio::time::Instant>,
}

impl<L: Listen> Acceptor<L> {
    pub fn new(listener: L, what: &'static str) -> Self {
        Acceptor { listener, what, backoff: Backoff::new(), paused_until: None }
    }

    /// The listener (for its local address).
    pub fn listener(&self) -> &L {
        &self.listener
    }

    /// The next connection. Cancel-safe.
    pub async fn accept(&mut self) -> (L::Io, L::Addr) {
        loop {
            if let Some(until) = self.paused_until {
                tokio::time::sleep_until(until).await;
                self.paused_until = None;
            }
            match self.listener.accept_once().await {
                Ok(conn) => {
                    if let Some((failures, lasted)) = self.backoff.succeeded(Instant::now()) {
                        info!(listener = self.what, failures, lasted = ?lasted, "accepting connections again");
                    }
                    return conn;
                }
                Err(error) if connection_error(&error) => {
                    debug!(listener = self.what, %error, "a connection went away before it was accepted");
                }
                Err(error) => {
                    let p = self.backoff.failed(Instant::now());
                    if p.log {
                        warn!(listener = self.what, %error, failures = p.failures,
                            "accept failed (out of file descriptors? raise the limit, `ulimit -n`): pausing accepts, {BACKOFF_START:?} doubling to {BACKOFF_MAX:?}; one line a minute until it recovers");
                    }
                    self.paused_until = Some(tokio::time::Instant::now() + p.pause);
                }
            }
        }
    }
}

impl axum::serve::Listener for Acceptor<tokio::net::TcpListener> {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        Acceptor::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl axum::serve::Listener for Acceptor<tokio::net::UnixListener> {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        Acceptor::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_accepts_pause_longer_up_to_a_second_and_log_once_per_episode() {
        let mut b = Backoff::new();
        let t0 = Instant::now();
        let mut pauses = Vec::new();
        let mut logs = 0;
        // A thousand failures over about seventeen minutes.
        for i in 0..1000u32 {
            let p = b.failed(t0 + Duration::from_secs(u64::from(i)));
            pauses.push(p.pause);
            logs += usize::from(p.log);
        }
        let ms = |n| Duration::from_millis(n);
        assert_eq!(pauses[..9], [ms(5), ms(10), ms(20), ms(40), ms(80), ms(160), ms(320), ms(640), ms(1000)]);
        assert!(pauses.iter().all(|p| *p <= BACKOFF_MAX));
        assert_eq!(logs, 17, "the first failure, then a reminder a minute");
        assert_eq!(b.succeeded(t0 + Duration::from_secs(1000)), Some((1000, Duration::from_secs(1000))), "the episode's count");
        assert_eq!(b.succeeded(t0), None);
        // A new episode starts from the shortest pause and is logged again.
        assert_eq!(b.failed(t0), Pause { pause: BACKOFF_START, log: true, failures: 1 });
        assert_eq!(b.failed(t0), Pause { pause: BACKOFF_START * 2, log: false, failures: 2 });
    }

    #[test]
    fn only_resource_errors_pause() {
        assert!(connection_error(&io::Error::from(io::ErrorKind::ConnectionAborted)));
        assert!(!connection_error(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!connection_error(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!connection_error(&io::Error::from_raw_os_error(libc::ENOBUFS)));
    }
}

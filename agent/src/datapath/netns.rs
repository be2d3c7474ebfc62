//! Running code inside another network namespace.
//!
//! A namespace belongs to a thread, and tokio moves tasks between threads, so a
//! namespace is never entered from async code: [`in_netns`] runs the work on a
//! fresh std thread that enters the namespace first (with its own current-thread
//! runtime for netlink), and the thread ends with the work.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Why work could not run in a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source} (weft needs root / CAP_SYS_ADMIN)")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start a runtime inside network namespace {path}: {source}")]
    Runtime {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread working in network namespace {path} panicked")]
    Panicked { path: PathBuf },
}

/// An opened network namespace (keeps it alive while open).
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    /// Opens `/run/netns/NAME`, `/proc/PID/ns/net` or any other nsfs path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file =
            File::open(&path).map_err(|source| NetnsError::Open { path: path.clone(), source })?;
        Ok(Netns { path, file })
    }

    /// The namespace this thread is in.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace file (for `IFLA_NET_NS_FD`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The namespace's identity (nsfs inode): equal for two paths of one namespace.
    pub fn inode(&self) -> Result<u64, NetnsError> {
        self.file
            .metadata()
            .map(|m| m.ino())
            .map_err(|source| NetnsError::Open { path: self.path.clone(), source })
    }

    /// Moves the calling thread into this namespace. Only for threads that exist
    /// for that purpose (see the module docs).
    pub fn enter(&self) -> Result<(), NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { path: self.path.clone(), source })
    }
}

/// Runs `work` on a new thread inside `netns` and returns its result. `work` gets
/// a current-thread tokio runtime, so it can open netlink sockets (they stay bound
/// to the namespace they were opened in).
pub async fn in_netns<F, Fut, T>(netns: &Path, work: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let ns = Netns::open(netns)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let path = ns.path.clone();
    std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || {
            let result = (|| {
                ns.enter()?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| NetnsError::Runtime { path: ns.path.clone(), source })?;
                Ok(runtime.block_on(work()))
            })();
            let _ = tx.send(result);
        })
        .map_err(|source| NetnsError::Runtime { path: path.clone(), source })?;
    rx.await.unwrap_or(Err(NetnsError::Panicked { path }))
}

//! One agent per host: `weft launch` (and `weft reset --force`) hold exclusive
//! `flock`s on a lock file in the state directory and on one per data path (a
//! host's pin directory), before anything else is touched. A second launch finds
//! them held and says which agent runs, instead of failing half-way after
//! pinning programs of its own. The kernel drops the locks when the process
//! ends, however it ends (kill -9 included), so a stale lock cannot exist.
//!
//! Owns: the lock files. Must not touch: anything else.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use crate::api::ApiAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Where the per-data-path locks live (tmpfs: gone at boot, like the pins'
/// owners).
pub const LOCK_DIR: &str = "/run/weft/locks";

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// Its API, if it is an agent (`reset --force` has none).
    pub api: Option<ApiAddr>,
}

/// Why the locks could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("weft is already running on this host ({}); stop it first (`weft stop`)", describe(.holder))]
    Held { path: PathBuf, holder: Option<Holder> },
    #[error("lock file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn describe(holder: &Option<Holder>) -> String {
    match holder {
        Some(Holder { pid, api: Some(api) }) => format!("pid {pid}, API {api}"),
        Some(Holder { pid, api: None }) => format!("pid {pid}"),
        None => "another process holds its lock".into(),
    }
}

/// The held locks; dropping it releases them.
#[derive(Debug)]
pub struct HostLock {
    locks: Vec<(PathBuf, Flock<File>)>,
}

impl HostLock {
    /// Takes the state directory's lock (the directory is created if missing).
    pub fn state_dir(dir: &Path, api: Option<ApiAddr>) -> Result<HostLock, LockError> {
        std::fs::create_dir_all(dir).map_err(|source| LockError::Io { path: dir.into(), source })?;
        let mut lock = HostLock { locks: Vec::new() };
        lock.take(&dir.join("weft.lock"), api)?;
        Ok(lock)
    }

    /// Also takes the lock of the data path whose pins are in `pin_dir`.
    pub fn and_pins(mut self, pin_dir: &Path, api: Option<ApiAddr>) -> Result<HostLock, LockError> {
        let path = pin_lock_path(pin_dir);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| LockError::Io { path: parent.into(), source })?;
        }
        self.take(&path, api)?;
        Ok(self)
    }

    fn take(&mut self, path: &Path, api: Option<ApiAddr>) -> Result<(), LockError> {
        let io = |source| LockError::Io { path: path.into(), source };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io)?;
        let mut held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => held,
            Err((mut file, nix::Error::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held { path: path.into(), holder: serde_json::from_str(&text).ok() });
            }
            Err((_, e)) => return Err(io(e.into())),
        };
        let me = Holder { pid: std::process::id(), api };
        let text = serde_json::to_string(&me).unwrap_or_default();
        held.set_len(0).map_err(io)?;
        held.rewind().map_err(io)?;
        held.write_all(text.as_bytes()).map_err(io)?;
        self.locks.push((path.into(), held));
        Ok(())
    }
}

/// The lock file of a pin directory: one file per directory, named after its
/// path (simulated hosts share one bpffs, each with its own pin directory).
pub fn pin_lock_path(pin_dir: &Path) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    Path::new(LOCK_DIR).join(format!("{name}.lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_api() {
        let dir = std::env::temp_dir().join(format!("weft-lock-{}-{}", std::process::id(), rand::random::<u32>()));
        let api: ApiAddr = "127.0.0.1:6784".parse().unwrap();
        let first = HostLock::state_dir(&dir, Some(api.clone())).unwrap();
        // flock is per open file: a second open in this process conflicts too.
        let e = HostLock::state_dir(&dir, None).unwrap_err();
        assert!(
            matches!(&e, LockError::Held { holder: Some(Holder { pid, api: Some(a) }), .. } if *pid == std::process::id() && *a == api),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("pid {}, API 127.0.0.1:6784", std::process::id())), "{e}");
        drop(first);
        let again = HostLock::state_dir(&dir, None).unwrap();
        drop(again);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pin_locks_are_per_directory() {
        assert_ne!(pin_lock_path(Path::new("/sys/fs/bpf/weft/a")), pin_lock_path(Path::new("/sys/fs/bpf/weft/b")));
        assert!(pin_lock_path(Path::new("/sys/fs/bpf/weft/a")).starts_with(LOCK_DIR));
    }
}

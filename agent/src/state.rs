//! The state directory: one file, `state.json`, written atomically (write a
//! temporary file, fsync, rename over the old one, fsync the directory), so a
//! crash at any moment leaves either the old state or the new one.
//!
//! It holds the peer's identity, the peers it was told to connect to, and one
//! section per subsystem (IPAM keeps its ring and allocations there); this module
//! knows nothing of what a section contains.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::mesh::PeerName;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({detail}); move it away to start afresh (this peer then gets a new identity unless --name is given)")]
    Corrupt { path: PathBuf, detail: String },
}

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// This peer's name, once chosen.
    pub peer_name: Option<PeerName>,
    /// Peers given with `launch` / `connect` (and not forgotten).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Subsystems' sections, by name.
    #[serde(default)]
    pub sections: BTreeMap<String, serde_json::Value>,
}

/// The state file of one agent.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    path: PathBuf,
    lock: Mutex<()>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { path, source }
}

impl StateStore {
    /// Opens (creating) the directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let path = dir.join("state.json");
        Ok(StateStore { dir, path, lock: Mutex::new(()) })
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state (empty if there is none yet).
    pub fn load(&self) -> Result<State, StateError> {
        let _guard = self.lock.lock().expect("state lock");
        self.load_unlocked()
    }

    fn load_unlocked(&self) -> Result<State, StateError> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StateError::Corrupt { path: self.path.clone(), detail: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io(&self.path)(e)),
        }
    }

    /// Changes the state and writes it atomically.
    pub fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> Result<T, StateError> {
        let _guard = self.lock.lock().expect("state lock");
        let mut state = self.load_unlocked()?;
        let out = change(&mut state);
        self.write(&state)?;
        Ok(out)
    }

    /// One subsystem's section, if present.
    pub fn section<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StateError> {
        let state = self.load()?;
        match state.sections.get(name) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| StateError::Corrupt { path: self.path.clone(), detail: format!("section {name}: {e}") }),
        }
    }

    /// Replaces one subsystem's section.
    pub fn set_section<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let value = serde_json::to_value(value).expect("sections serialize");
        self.update(|s| {
            s.sections.insert(name.to_string(), value);
        })
    }

    fn write(&self, state: &State) -> Result<(), StateError> {
        let tmp = self.dir.join(".state.json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_corruption() {
        let dir = std::env::temp_dir().join(format!("weft-state-{}-{}", std::process::id(), rand::random::<u32>()));
        let store = StateStore::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
        store.update(|s| s.peers.push("10.0.0.1".into())).unwrap();
        store.set_section("ipam", &vec![1, 2, 3]).unwrap();
        let again = StateStore::open(&dir).unwrap();
        assert_eq!(again.load().unwrap().peers, vec!["10.0.0.1".to_string()]);
        assert_eq!(again.section::<Vec<u32>>("ipam").unwrap(), Some(vec![1, 2, 3]));
        fs::write(again.path(), b"{ not json").unwrap();
        let err = again.load().unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("move it away"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}

//! The state directory: one file, `state.json`, written atomically (write a
//! temporary file, fsync, rename over the old one, fsync the directory), so a
//! crash at any moment leaves either the old state or the new one.
//!
//! It holds the peer's identity, the peers it was told to connect to, and one
//! section per subsystem (IPAM keeps its ring and allocations there); this module
//! knows nothing of what a section contains.
//!
//! The file carries a schema version (a newer one is refused: that weft knows
//! what it wrote, this one does not) and a checksum of its contents, so a file
//! damaged on disk or changed by hand (an `allocations` emptied) is noticed
//! instead of silently forgetting addresses. Each write keeps the previous
//! generation as `state.json.prev` (a hard link, no copy); a current file that
//! does not parse or fails its checksum is set aside as `state.json.damaged`
//! and the previous generation is used, with a loud log line.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blake2::{Blake2s256, Digest};
use serde::{Deserialize, Serialize};
use tracing::error;

use crate::mesh::PeerName;

/// The schema this weft writes. 0 is a file from before versioning (same
/// layout, no checksum): read as it is, written as the current version.
pub const STATE_VERSION: u32 = 1;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({detail}), and so is its previous generation {path}.prev: restore it from a backup, or move both away to start afresh (this peer then gets a new identity unless --name is given, and its addresses must be reclaimed with `weft rmpeer` on another peer)")]
    Corrupt { path: PathBuf, detail: String },
    #[error("state file {path} was written by a newer weft (state version {found}; this one reads up to {STATE_VERSION}): run that version, or a newer one")]
    Newer { path: PathBuf, found: u32 },
}

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The schema version ([`STATE_VERSION`] when written; 0 when absent).
    #[serde(default)]
    pub version: u32,
    /// BLAKE2s of the file's contents without this field (absent before versioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
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

    fn prev_path(&self) -> PathBuf {
        self.dir.join("state.json.prev")
    }

    fn load_unlocked(&self) -> Result<State, StateError> {
        let detail = match read_checked(&self.path)? {
            Checked::Good(state) => return Ok(state),
            // The previous generation is linked before the new file is renamed
            // in, so state.json is never missing mid-write: a lone .prev means
            // the current file was removed on purpose.
            Checked::Missing => return Ok(State::default()),
            Checked::Damaged(detail) => detail,
        };
        match read_checked(&self.prev_path())? {
            Checked::Good(prev) => {
                let aside = self.dir.join("state.json.damaged");
                let _ = fs::copy(&self.path, &aside);
                error!(
                    path = %self.path.display(),
                    problem = %detail,
                    kept_as = %aside.display(),
                    "THE STATE FILE IS DAMAGED: using its previous generation state.json.prev instead; the last change before it may be lost — check `weft status ipam` and the containers' addresses"
                );
                Ok(prev)
            }
            Checked::Missing | Checked::Damaged(_) => Err(StateError::Corrupt { path: self.path.clone(), detail }),
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
        let mut state = state.clone();
        state.version = STATE_VERSION;
        state.checksum = Some(checksum(&state));
        let bytes = serde_json::to_vec_pretty(&state).expect("state serializes");
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        // The current generation becomes the previous one (a second name for
        // the same file, swapped in atomically), then the new one replaces it.
        let prev_tmp = self.dir.join(".state.json.prev.tmp");
        let _ = fs::remove_file(&prev_tmp);
        match fs::hard_link(&self.path, &prev_tmp) {
            Ok(()) => fs::rename(&prev_tmp, self.prev_path()).map_err(io(&self.prev_path()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&prev_tmp)(e)),
        }
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }
}

/// What reading one generation gave.
enum Checked {
    Good(State),
    Missing,
    /// Why it cannot be used.
    Damaged(String),
}

fn read_checked(path: &Path) -> Result<Checked, StateError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checked::Missing),
        Err(e) => return Err(io(path)(e)),
    };
    let mut state: State = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => return Ok(Checked::Damaged(e.to_string())),
    };
    if state.version > STATE_VERSION {
        return Err(StateError::Newer { path: path.to_path_buf(), found: state.version });
    }
    match state.checksum.take() {
        Some(sum) if sum != checksum(&state) => Ok(Checked::Damaged("its checksum does not match its contents: damaged on disk or changed by hand".into())),
        None if state.version > 0 => Ok(Checked::Damaged("it has no checksum".into())),
        _ => Ok(Checked::Good(state)),
    }
}

/// BLAKE2s over the state as serialized without its checksum.
fn checksum(state: &State) -> String {
    let mut plain = state.clone();
    plain.checksum = None;
    let bytes = serde_json::to_vec(&plain).expect("state serializes");
    Blake2s256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
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
        // The previous generation (before the section was set) is used.
        let prev = again.load().expect("falls back to the previous generation");
        assert_eq!(prev.peers, vec!["10.0.0.1".to_string()]);
        assert!(prev.sections.is_empty(), "the generation before the last write");
        assert!(dir.join("state.json.damaged").exists(), "the damaged file is kept");
        // Both damaged: refused, with what to do.
        fs::write(dir.join("state.json.prev"), b"{ nor this").unwrap();
        let err = again.load().unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("backup"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    fn store() -> (PathBuf, StateStore) {
        let dir = std::env::temp_dir().join(format!("weft-state-{}-{}", std::process::id(), rand::random::<u32>()));
        let store = StateStore::open(&dir).unwrap();
        (dir, store)
    }

    #[test]
    fn a_section_changed_by_hand_is_noticed_and_the_previous_generation_used() {
        let (dir, store) = store();
        store.set_section("ipam", &serde_json::json!({"allocations": {"c1": ["10.32.0.1"]}})).unwrap();
        store.set_section("ipam", &serde_json::json!({"allocations": {"c1": ["10.32.0.1"], "c2": ["10.32.0.2"]}})).unwrap();
        // Someone empties the allocations (the JSON stays valid).
        let text = fs::read_to_string(store.path()).unwrap();
        let emptied = text.replace("\"c1\"", "\"x1\"");
        assert_ne!(text, emptied);
        fs::write(store.path(), emptied).unwrap();
        let got = store.section::<serde_json::Value>("ipam").unwrap().unwrap();
        assert_eq!(got, serde_json::json!({"allocations": {"c1": ["10.32.0.1"]}}), "the previous generation, not the edited one");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_newer_version_is_refused_and_an_unversioned_file_is_read() {
        let (dir, store) = store();
        fs::write(store.path(), br#"{"version": 99, "peer_name": null, "peers": [], "sections": {}, "future": 1}"#).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StateError::Newer { found: 99, .. }), "{err}");
        assert!(err.to_string().contains("newer weft"), "{err}");
        // A file from before versioning: read as it is, written versioned.
        fs::write(store.path(), br#"{"peer_name": null, "peers": ["10.0.0.9"], "sections": {}}"#).unwrap();
        assert_eq!(store.load().unwrap().peers, vec!["10.0.0.9".to_string()]);
        store.update(|s| s.peers.push("10.0.0.10".into())).unwrap();
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("\"version\": 1") && text.contains("\"checksum\""), "{text}");
        assert_eq!(store.load().unwrap().peers.len(), 2);
        fs::remove_dir_all(dir).unwrap();
    }
}

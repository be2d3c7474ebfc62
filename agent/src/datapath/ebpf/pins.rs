//! One host's pin directory under bpffs: its layout, making and removing it,
//! the ABI check that decides whether what is pinned can be adopted, and
//! mounting bpffs itself.
//!
//! Layout of `<pin root>/<host>/`:
//!
//! | pin | what |
//! |---|---|
//! | `CONFIG`, `ENDPOINTS`, `PEERS`, `UNDERLAY_IPS`, `LOCAL_EPS`, `BCAST`, `COUNTERS` | the maps (aya pins them by name) |
//! | `prog_<name>_<hash>` | the programs; `<hash>` is the object's FNV-1a, so a new build gets a new pin |
//! | `link_overlay` | the overlay program's TCX link on the VXLAN device |
//! | `link_underlay_<device>` | the underlay program's link on `<device>` (direct mode) |
//! | `links/<veth>` | the endpoint program's link on an endpoint's host-side veth |
//!
//! Unpinning a link detaches it once nothing else holds it (weft keeps no link
//! fds), which is how pins are removed from the kernel. Must not touch: devices
//! or the contents of maps.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use tracing::warn;

use super::fnv1a;
use crate::datapath::DatapathError;
use crate::datapath::abi::{self, Config};

/// Where pins live, one directory per host (several simulated hosts share bpffs).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/weft";

/// Where bpffs is mounted on every distribution weft runs on.
const BPFFS: &str = "/sys/fs/bpf";

/// `BPF_FS_MAGIC` from `<linux/magic.h>`: what statfs says bpffs is.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Pins of the underlay program's links: `link_underlay_<device>`.
const UNDERLAY_LINK_PREFIX: &str = "link_underlay_";

/// The overlay program's link on the VXLAN device.
const OVERLAY_LINK: &str = "link_overlay";

/// The directory of the endpoint links.
const ENDPOINT_LINKS: &str = "links";

pub(super) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError {
    let path = path.to_path_buf();
    move |source| DatapathError::Io { op, path, source }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let path = Path::new(BPFFS);
    if let Ok(st) = nix::sys::statfs::statfs(path)
        && st.filesystem_type().0 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), path, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).map_err(|e| match e
    {
        nix::Error::EPERM | nix::Error::EACCES => {
            DatapathError::NotPermitted { what: "mounting bpffs at /sys/fs/bpf".into() }
        }
        e => DatapathError::Io { op: "mount bpffs at", path: path.into(), source: e.into() },
    })
}

/// A link pin and the device its link runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LinkPin {
    pub device: String,
    pub pin: PathBuf,
}

/// What [`PinDir::create`] made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Made {
    /// The pin root did not exist either.
    pub root: bool,
}

/// The pin directory of one host.
#[derive(Debug, Clone)]
pub(super) struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    pub fn new(dir: PathBuf) -> Self {
        PinDir { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory is there (whatever is in it).
    pub fn exists(&self) -> bool {
        self.dir.symlink_metadata().is_ok()
    }

    /// Makes the directory and `links/` (and the pin root if missing).
    pub fn create(&self) -> Result<Made, DatapathError> {
        let root_existed = self.dir.parent().is_none_or(|root| root.symlink_metadata().is_ok());
        let links = self.dir.join(ENDPOINT_LINKS);
        std::fs::create_dir_all(&links).map_err(io_err("create pin directory", &links))?;
        Ok(Made { root: !root_existed })
    }

    /// Removes the directory and everything in it (unpinning detaches links
    /// that no process holds). Returns whether there was one.
    pub fn remove(&self) -> Result<bool, DatapathError> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(DatapathError::Io { op: "remove pins", path: self.dir.clone(), source: e }),
        }
    }

    /// Removes the pin root if [`PinDir::create`] made it and it is empty now
    /// (other hosts' pins keep it).
    pub fn remove_root_if_made(&self, made: Made) {
        if let (true, Some(root)) = (made.root, self.dir.parent()) {
            let _ = std::fs::remove_dir(root);
        }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The pin of program `name` built from `object`.
    pub fn program(&self, name: &str, object: &[u8]) -> PathBuf {
        self.dir.join(format!("prog_{name}_{:016x}", fnv1a(object)))
    }

    /// Removes pins of program `name` other than `keep` (older builds; they go
    /// once nothing uses them).
    pub fn remove_other_programs(&self, name: &str, keep: &Path) {
        let prefix = format!("prog_{name}_");
        for entry in self.entries(&self.dir) {
            if entry.file_name().to_string_lossy().starts_with(&prefix) && entry.path() != keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    pub fn overlay_link(&self) -> PathBuf {
        self.dir.join(OVERLAY_LINK)
    }

    pub fn underlay_link(&self, device: &str) -> PathBuf {
        self.dir.join(format!("{UNDERLAY_LINK_PREFIX}{device}"))
    }

    pub fn endpoint_link(&self, veth: &str) -> PathBuf {
        self.dir.join(ENDPOINT_LINKS).join(veth)
    }

    /// The underlay program's link pins.
    pub fn underlay_links(&self) -> Vec<LinkPin> {
        self.entries(&self.dir)
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let device = name.strip_prefix(UNDERLAY_LINK_PREFIX)?.to_string();
                Some(LinkPin { device, pin: entry.path() })
            })
            .collect()
    }

    /// The endpoint program's link pins.
    pub fn endpoint_links(&self) -> Result<Vec<LinkPin>, DatapathError> {
        let dir = self.dir.join(ENDPOINT_LINKS);
        let entries = std::fs::read_dir(&dir).map_err(io_err("read", &dir))?;
        Ok(entries
            .flatten()
            .map(|entry| LinkPin { device: entry.file_name().to_string_lossy().into_owned(), pin: entry.path() })
            .collect())
    }

    /// Every link pin: overlay (on `vxlan`), underlay, endpoints.
    pub fn link_pins(&self, vxlan: &str) -> Vec<LinkPin> {
        let mut pins = Vec::new();
        let overlay = self.overlay_link();
        if overlay.exists() {
            pins.push(LinkPin { device: vxlan.to_string(), pin: overlay });
        }
        pins.extend(self.underlay_links());
        pins.extend(self.endpoint_links().unwrap_or_default());
        pins
    }

    /// Unpins the underlay program's links (switched to device mode: the
    /// underlay programs must go).
    pub fn remove_underlay_links(&self) {
        for link in self.underlay_links() {
            let _ = std::fs::remove_file(link.pin);
        }
    }

    /// Pins made by an agent with another ABI are not adoptable: removes them.
    pub fn check_abi(&self) -> Result<(), DatapathError> {
        let pin = self.map("CONFIG");
        if !pin.exists() {
            return Ok(());
        }
        let version = MapData::from_pin(&pin)
            .ok()
            .and_then(|m| Array::<MapData, Config>::try_from(Map::Array(m)).ok())
            .and_then(|a| a.get(&0, 0).ok())
            .map(|c| c.abi_version);
        // 0: the CONFIG map was made but never written (a start stopped early).
        if version == Some(abi::ABI_VERSION) || version == Some(0) {
            return Ok(());
        }
        warn!(pins = %self.dir.display(), found = ?version, want = abi::ABI_VERSION,
            "pinned data path has another ABI version: replacing it (traffic pauses briefly)");
        self.remove().map(drop)
    }

    fn entries(&self, dir: &Path) -> impl Iterator<Item = std::fs::DirEntry> {
        std::fs::read_dir(dir).into_iter().flatten().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch pin root (a plain directory: the layout needs no bpffs),
    /// removed on Drop, also when the test fails.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn link_pins_are_found_by_their_layout() {
        let scratch = Scratch(std::env::temp_dir().join(format!("weft-pins-{}", std::process::id())));
        let root = &scratch.0;
        let pins = PinDir::new(root.join("host"));
        assert!(!pins.exists());
        assert_eq!(pins.create().unwrap(), Made { root: true });
        for file in ["link_overlay", "link_underlay_eth0", "link_underlay_eth1", "links/wv1", "prog_underlay_1", "PEERS"] {
            std::fs::write(pins.path().join(file), "").unwrap();
        }
        let mut underlay: Vec<String> = pins.underlay_links().into_iter().map(|l| l.device).collect();
        underlay.sort();
        assert_eq!(underlay, ["eth0", "eth1"]);
        let mut all: Vec<String> = pins.link_pins("weft-vxlan").into_iter().map(|l| l.device).collect();
        all.sort();
        assert_eq!(all, ["eth0", "eth1", "weft-vxlan", "wv1"]);
        pins.remove_underlay_links();
        assert!(pins.underlay_links().is_empty());
        assert!(pins.path().join("PEERS").exists(), "only link pins went");
        assert!(pins.remove().unwrap());
        assert!(!pins.remove().unwrap(), "removing twice is fine");
        pins.remove_root_if_made(Made { root: true });
        assert!(!root.exists());
    }
}

//! A real systemd, booted in a container (systemd-nspawn) inside one of the
//! test's simulated hosts, to run weft's unit and user data as an instance
//! would. The container's root is a fresh directory with the machine's /usr
//! bound read-only (Debian's merged /usr gives it every program), an empty
//! writable /usr/local, and the host's network namespace: what runs in it is
//! on the test's underlay and nowhere else. Dropped: powered off (SIGKILL if it
//! does not stop), its directory removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cleanup::{self, Proc, TempPath};
use crate::{Netns, unique, wait_until};

/// A booted container (powered off at drop or teardown).
pub struct Machine {
    pub root: PathBuf,
    // Dropped in this order: the container, then its files.
    nspawn: Proc,
    log: TempPath,
    _root: TempPath,
}

impl Machine {
    /// A root directory to fill before [`Machine::boot`]: /etc with the
    /// machine's users, an empty machine id (systemd makes one), the usual
    /// merged-/usr links.
    pub fn prepare(label: &str) -> TempPath {
        let dir = TempPath::dir(&unique(label)).expect("container root");
        let root = dir.path();
        for d in ["etc/systemd/system/multi-user.target.wants", "var/lib", "tmp", "root", "run", "usr", "proc", "sys", "dev"] {
            std::fs::create_dir_all(root.join(d)).expect("container dirs");
        }
        for (link, to) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
            std::os::unix::fs::symlink(to, root.join(link)).expect("usr links");
        }
        for f in ["os-release", "passwd", "group", "nsswitch.conf"] {
            let _ = std::fs::copy(Path::new("/etc").join(f), root.join("etc").join(f));
        }
        std::fs::write(root.join("etc/machine-id"), "").expect("machine-id");
        dir
    }

    /// Writes `unit` as /etc/systemd/system/`name` in `root`, enabled.
    pub fn install_unit(root: &Path, name: &str, unit: &str) {
        let path = root.join("etc/systemd/system").join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("unit dir");
        }
        std::fs::write(&path, unit).expect("unit");
        if !name.contains('/') {
            let _ = std::os::unix::fs::symlink(format!("/etc/systemd/system/{name}"), root.join("etc/systemd/system/multi-user.target.wants").join(name));
        }
    }

    /// Boots systemd in `root`, in `netns`, with every capability and bpffs
    /// (what an agent on a host has). `binds` are extra `SRC:DST` read-only binds.
    pub fn boot(root: TempPath, netns: &Netns, binds: &[String]) -> Machine {
        // nspawn keeps its propagation directory under /run/systemd/nspawn and
        // removes it only from a tmpfs; this machine's /run is not one.
        let prop = Path::new("/run/systemd/nspawn");
        std::fs::create_dir_all(prop).expect("/run/systemd/nspawn");
        let mounted = Command::new("mountpoint").arg("-q").arg(prop).status().is_ok_and(|s| s.success());
        if !mounted {
            let _ = Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(prop).status();
        }
        let log = TempPath::new(&format!("{}.console.log", root.path().file_name().and_then(|n| n.to_str()).unwrap_or("machine")));
        let console = std::fs::File::create(log.path()).expect("console log");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args(["-q", "--register=no", "--keep-unit", "--console=pipe", "--capability=all"])
            .arg(format!("--directory={}", root.path().display()))
            .arg(format!("--network-namespace-path={}", netns.path().display()))
            .args(["--bind-ro=/usr", "--tmpfs=/usr/local", "--bind=/sys/fs/bpf", "--system-call-filter=bpf perf_event_open"])
            .args(binds.iter().map(|b| format!("--bind-ro={b}")))
            .arg("--boot")
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("log"))
            .stderr(console);
        let label = format!("powering off the container {}", root.path().display());
        let nspawn = Proc::spawn(label, &mut cmd, power_off).expect("systemd-nspawn (apt-get install systemd-container)");
        Machine { root: root.path().to_path_buf(), nspawn, log, _root: root }
    }

    /// The container's console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The container's PID 1 (systemd), once it runs.
    pub fn init_pid(&self) -> Option<u32> {
        let nspawn = self.nspawn.id();
        let children = std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
        children.split_whitespace().filter_map(|p| p.parse().ok()).next()
    }

    /// The pids of processes in the container whose command is `comm`.
    pub fn pids_of(&self, comm: &str) -> Vec<u32> {
        let Some(init) = self.init_pid() else { return Vec::new() };
        let Ok(init_ns) = std::fs::read_link(format!("/proc/{init}/ns/pid")) else { return Vec::new() };
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let same_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|ns| ns == init_ns);
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if same_ns && name.trim() == comm {
                found.push(pid);
            }
        }
        found
    }

    /// `systemctl ARGS` inside the container (through its PID 1's namespaces).
    pub fn systemctl(&self, args: &[&str]) -> String {
        self.inside("systemctl", args)
    }

    /// The container's journal (the last 200 lines), for failure messages.
    pub fn journal(&self) -> String {
        self.inside("journalctl", &["--no-pager", "-n", "200"])
    }

    /// `program ARGS` inside the container; its output.
    pub fn inside(&self, program: &str, args: &[&str]) -> String {
        let Some(init) = self.init_pid() else { return "(the container does not run)".into() };
        let out = Command::new("nsenter")
            .args(["-t", &init.to_string(), "-m", "-u", "-i", "-p", "-n", "--", program])
            .args(args)
            .output();
        out.map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))).unwrap_or_default()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- console of {} ----\n{}", self.root.display(), self.console());
        }
    }
}

/// SIGTERM asks nspawn to power the container off; SIGKILL if it does not
/// within 15 s (2 s once teardown hurries).
fn power_off(child: &mut Child) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let within = if cleanup::hurry() { Duration::from_secs(2) } else { Duration::from_secs(15) };
    if !wait_until(within, || child.try_wait().ok().flatten().is_some()) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

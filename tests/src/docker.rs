//! A real Docker Engine per simulated host: Debian's `dockerd`, started inside
//! the host's namespace with its own data, exec root and socket, so several run
//! side by side. Images are made locally (no registry): busybox in a rootfs tar,
//! `docker import`ed. Stopped and everything removed on Drop or at teardown
//! ([`crate::cleanup`]): dockerd first (it stops its containers), then whatever
//! is left under its directory (containerd, shims, containers if it had to be
//! killed; mounts), then the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::cleanup::{self, Proc, TempPath};
use crate::{Host, Netns, unique, wait_until};

/// The image every test container uses: busybox (sh, nc, httpd, wget,
/// nslookup...) and nothing else.
pub const BUSYBOX: &str = "weft-test/busybox";

/// A dockerd of one host.
pub struct Dockerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    ns: Netns,
    /// Dropped first: stops dockerd and what it started.
    _child: Proc,
    /// Then the directory, with the mounts under it.
    _dir: TempPath,
}

impl Dockerd {
    /// Starts dockerd in `host`'s namespace (as ENVIRONMENT.md says: no iptables,
    /// no forwarding changes, no bridge: containers have only loopback until weft
    /// attaches them) and loads the busybox image.
    pub fn start(host: &Host) -> Dockerd {
        let tmp = TempPath::dir(&unique("dk")).expect("docker dir");
        let dir = tmp.path().to_path_buf();
        let sock = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd log");
        let theirs = dir.clone();
        // The containers' cgroups under a name of ours, so what a killed
        // container leaves there can be told from anyone else's and removed.
        let cgroup = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let child = Proc::spawn(
            format!("stopping dockerd of {} and its containers", host.name),
            host.ns
                .cmd("dockerd")
                .arg(format!("--host=unix://{}", sock.display()))
                .arg(format!("--data-root={}", dir.join("data").display()))
                .arg(format!("--exec-root={}", dir.join("exec").display()))
                .arg(format!("--pidfile={}", dir.join("docker.pid").display()))
                .args(["--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"])
                .args(["--shutdown-timeout=1", "--log-level=warn"])
                .arg(format!("--cgroup-parent=/{cgroup}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
            move |child| stop_dockerd(child, &theirs),
        )
        .expect("spawn dockerd (apt-get install docker.io; cargo xtask test installs it)");
        let d = Dockerd { dir, sock, ns: host.ns.alias(), _child: child, _dir: tmp };
        let up = wait_until(Duration::from_secs(60), || d.docker(&["version"]).status.success());
        assert!(up, "dockerd did not start:\n{}", d.log());
        d.load_busybox();
        d
    }

    /// `unix://` + the socket, for `--docker-host` and `DOCKER_HOST`.
    pub fn host_arg(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// The namespace dockerd runs in.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The docker CLI against this dockerd's own socket.
    pub fn cli(&self) -> Command {
        docker_cli(&self.host_arg())
    }

    /// Runs the docker CLI against the real socket.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.cli().args(args).stdin(Stdio::null()).output().expect("run docker")
    }

    /// Runs the docker CLI and returns stdout, panicking on failure.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// dockerd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    fn load_busybox(&self) {
        self.import(busybox_rootfs(), BUSYBOX, &["ENV PATH=/bin", "CMD [\"/bin/sh\"]"]);
    }

    /// `docker import`s a rootfs tar as `image` with Dockerfile `changes`.
    pub fn import(&self, tar: &Path, image: &str, changes: &[&str]) {
        let mut cmd = self.cli();
        cmd.arg("import");
        for c in changes {
            cmd.args(["--change", c]);
        }
        let out = cmd.arg(tar).arg(image).output().expect("docker import");
        assert!(out.status.success(), "docker import {image}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The docker CLI talking to `host` (`unix://...`), killed after two minutes so
/// a hang fails the test instead of stalling the suite.
pub fn docker_cli(host: &str) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "120", "docker"]);
    cmd.env("DOCKER_HOST", host).env_remove("DOCKER_CONTEXT");
    // No stray config (contexts, credential helpers) from the machine.
    cmd.env("DOCKER_CONFIG", std::env::temp_dir().join("weft-test-docker-config"));
    cmd
}

/// Kills the containers first (dockerd's own shutdown gives each 10 s after a
/// SIGTERM their busybox PID 1 ignores), then SIGTERM: dockerd stops
/// containerd. If it has not ended within 20 s (or at once when teardown
/// hurries), SIGKILL, and then everything still running from its exec root
/// (containerd, the shims and the containers below them), and the containers'
/// cgroups (a killed container leaves its own). The mounts under the directory
/// go with it ([`TempPath`]).
fn stop_dockerd(child: &mut Child, dir: &Path) {
    if !cleanup::hurry() {
        kill_containers(&format!("unix://{}", dir.join("docker.sock").display()));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let ended = wait_until(Duration::from_secs(20), || cleanup::hurry() || child.try_wait().ok().flatten().is_some());
    if !ended || cleanup::hurry() {
        cleanup::kill_and_reap(child);
    }
    // containerd and its shims name the exec root (`--config`, `-address`);
    // the agent, which names dockerd's socket, is not among them.
    cleanup::kill_processes_under(&dir.join("exec"));
    if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
        cleanup::remove_cgroups(name);
    }
}

/// `docker kill` every running container of `host`, a few seconds at most.
fn kill_containers(host: &str) {
    // Like docker_cli, with 5 s instead of two minutes: this is teardown.
    let docker = |args: &[&str]| {
        Command::new("timeout")
            .args(["-k", "1", "5", "docker"])
            .args(args)
            .env("DOCKER_HOST", host)
            .env_remove("DOCKER_CONTEXT")
            .env("DOCKER_CONFIG", std::env::temp_dir().join("weft-test-docker-config"))
            .stdin(Stdio::null())
            .output()
    };
    let Ok(ps) = docker(&["ps", "-q"]) else { return };
    let ids: Vec<String> = String::from_utf8_lossy(&ps.stdout).split_whitespace().map(str::to_string).collect();
    if !ids.is_empty() {
        let mut args = vec!["kill"];
        args.extend(ids.iter().map(String::as_str));
        let _ = docker(&args);
    }
}

/// A rootfs tar of busybox with its applets linked: made once per busybox
/// binary and kept in the temp directory (2 MB) for every later test process.
pub fn busybox_rootfs() -> &'static Path {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let busybox = busybox_binary();
        let meta = std::fs::metadata(busybox).expect("busybox metadata");
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        cached_tar(&format!("weft-busybox-{}-{mtime}.tar", meta.len()), |root| {
            busybox_tree(root);
            Ok(())
        })
        .expect("busybox rootfs")
    })
}

fn busybox_binary() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox (apt-get install busybox-static; cargo xtask test installs it)")
}

/// busybox and its applets, a passwd and a group file under `root`.
fn busybox_tree(root: &Path) {
    let busybox = busybox_binary();
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs");
    for d in ["etc", "tmp", "proc", "sys", "dev", "www", "root", "data"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dir");
    }
    std::fs::copy(busybox, bin.join("busybox")).expect("copy busybox");
    let list = Command::new(busybox).arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("group");
}

/// A tar in the temp directory named `name`, made by `fill` (given an empty
/// directory) the first time; written under a unique name and renamed, so
/// parallel processes never see half a tar.
fn cached_tar(name: &str, fill: impl FnOnce(&Path) -> Result<(), String>) -> Result<PathBuf, String> {
    let tar = std::env::temp_dir().join(name);
    if tar.exists() {
        return Ok(tar);
    }
    let root = TempPath::dir(&unique("rootfs")).map_err(|e| e.to_string())?;
    let filled = fill(&root);
    let tmp = TempPath::new(&format!("{}.tar", unique("rootfs")));
    let packed = filled.and_then(|()| {
        let out = Command::new("tar").arg("-C").arg(root.path()).arg("-cf").arg(tmp.path()).arg(".").output().map_err(|e| e.to_string())?;
        if out.status.success() { Ok(()) } else { Err(format!("tar: {}", String::from_utf8_lossy(&out.stderr))) }
    });
    drop(root);
    packed?;
    std::fs::rename(tmp.path(), &tar).map_err(|e| e.to_string())?;
    Ok(tar)
}

/// The Redis image of the second reference app.
pub const REDIS: &str = "weft-demo/redis";

/// Debian's packages for Redis (downloaded with `apt-get download`, unpacked,
/// not installed on the machine).
const REDIS_PACKAGES: &[&str] = &["redis-tools", "libjemalloc2", "liblzf1", "libatomic1"];

/// A rootfs with Debian's redis-server, every library it links (resolved with
/// ldd) and busybox. Made once and cached in the temp directory; an error says
/// what failed (no Debian mirror, no ldd...).
pub fn redis_rootfs() -> Result<PathBuf, String> {
    cached_tar("weft-redis-rootfs.tar", |root| {
        busybox_tree(root);
        let debs = TempPath::dir(&unique("debs")).map_err(|e| e.to_string())?;
        let result = (|| {
            let out = Command::new("apt-get").arg("download").args(REDIS_PACKAGES).current_dir(debs.path()).output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!("apt-get download {}: {}", REDIS_PACKAGES.join(" "), String::from_utf8_lossy(&out.stderr)));
            }
            for deb in std::fs::read_dir(debs.path()).map_err(|e| e.to_string())? {
                let deb = deb.map_err(|e| e.to_string())?.path();
                let out = Command::new("dpkg").arg("-x").arg(&deb).arg(root).output().map_err(|e| e.to_string())?;
                if !out.status.success() {
                    return Err(format!("dpkg -x {}: {}", deb.display(), String::from_utf8_lossy(&out.stderr)));
                }
            }
            Ok(())
        })();
        drop(debs);
        result?;
        // Debian's redis-server is redis-check-rdb under another name.
        let server = root.join("usr/bin/redis-server");
        let _ = std::fs::remove_file(&server);
        std::os::unix::fs::symlink("redis-check-rdb", &server).map_err(|e| e.to_string())?;
        // Every library it links, from the unpacked packages or the machine.
        let libdir = root.join("usr/lib/x86_64-linux-gnu").display().to_string() + ":" + &root.join("usr/lib/aarch64-linux-gnu").display().to_string();
        let out = Command::new("ldd").arg(root.join("usr/bin/redis-check-rdb")).env("LD_LIBRARY_PATH", libdir).output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.contains("not found") {
            return Err(format!("ldd redis-server: {text}{}", String::from_utf8_lossy(&out.stderr)));
        }
        for lib in text.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/'))) {
            let lib = Path::new(lib);
            if lib.starts_with(root) {
                continue;
            }
            let dst = root.join(lib.strip_prefix("/").unwrap_or(lib));
            std::fs::create_dir_all(dst.parent().expect("lib dir")).map_err(|e| e.to_string())?;
            std::fs::copy(lib, &dst).map_err(|e| format!("copy {}: {e}", lib.display()))?;
        }
        Ok(())
    })
}

/// A simulated host running dockerd and a weft agent with its Docker API proxy.
/// Dropped in this order: agent, dockerd, host.
pub struct DockerHost {
    pub agent: crate::agent::Agent,
    pub dockerd: Dockerd,
    pub host: Host,
    /// `unix://...` of the proxy.
    pub proxy: String,
}

impl DockerHost {
    /// A host on `underlay` with dockerd and an agent connecting to `peers`.
    pub fn launch(underlay: &mut crate::Underlay, label: &str, peers: &[std::net::Ipv4Addr], extra: &[&str]) -> DockerHost {
        DockerHost::launch_on(underlay.host(label), peers, extra)
    }

    /// dockerd and an agent on `host`, which is already on an underlay.
    pub fn launch_on(host: Host, peers: &[std::net::Ipv4Addr], extra: &[&str]) -> DockerHost {
        let dockerd = Dockerd::start(&host);
        let proxy = format!("unix://{}", dockerd.dir.join("weft.sock").display());
        let docker_host = dockerd.host_arg();
        let mut args = vec!["--docker-host", &docker_host, "--proxy-listen", &proxy];
        args.extend_from_slice(extra);
        let agent = crate::agent::Agent::launch(&host, peers, &args);
        DockerHost { agent, dockerd, host, proxy }
    }

    /// The docker CLI through weft's proxy.
    pub fn proxied(&self) -> Command {
        docker_cli(&self.proxy)
    }

    /// Runs the docker CLI through the proxy.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.proxied().args(args).stdin(Stdio::null()).output().expect("run docker")
    }

    /// Through the proxy; stdout, panicking on failure.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} (through the proxy) failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent.log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The overlay addresses of a running container, waiting (up to 10 s) for
    /// weft to attach it: attaching follows Docker's start event, so `docker run
    /// -d` may return first (the application itself waits in weft-wait).
    pub fn attached_addrs(&self, container: &str) -> Vec<String> {
        let mut addrs = Vec::new();
        wait_until(Duration::from_secs(10), || {
            addrs = self.addrs_of(container);
            !addrs.is_empty()
        });
        addrs
    }

    /// The overlay addresses of a container as `weft ps` shows them now.
    pub fn addrs_of(&self, container: &str) -> Vec<String> {
        let id = self.dockerd.docker_ok(&["inspect", "-f", "{{.Id}}", container]);
        let short = &id[..12.min(id.len())];
        self.agent
            .cli(&["ps"])
            .lines()
            .find(|l| l.starts_with(short))
            .map(|l| l.split_whitespace().skip(2).filter(|w| w.parse::<std::net::Ipv4Addr>().is_ok()).map(str::to_string).collect())
            .unwrap_or_default()
    }
}

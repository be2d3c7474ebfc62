//! Real `weft` agents in simulated hosts: launched with `weft launch` inside a
//! host's namespace (unique name, state directory and pin directory per test),
//! driven with the real CLI, killed by the pid we started on Drop or at
//! teardown ([`crate::cleanup`]), its state directory and log removed after.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::cleanup::{self, Cleanup, Proc};
use crate::{Host, Netns, unique, wait_until};

/// The `weft` binary under test: `$WEFT_BIN`, or `weft` next to the test binary.
pub fn weft_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WEFT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/weft
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("weft");
    assert!(bin.exists(), "{} not built: run `cargo build -p weft` (cargo xtask test does)", bin.display());
    bin
}

/// A unique peer name for a test agent (`02:..` is locally administered).
pub fn peer_name(label: &str) -> String {
    let h = label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let b = h.to_be_bytes();
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[3], b[4], b[5], b[6], b[7])
}

/// A running (or stopped) agent.
pub struct Agent {
    ns: Netns,
    pub name: String,
    pub nickname: String,
    pub pin_name: String,
    state_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    /// Extra environment (AWS endpoints and credentials in the AWS tests).
    pub env: Vec<(String, String)>,
    child: Option<Proc>,
    /// Removes the state directory and the log (after the process is gone).
    _files: Cleanup,
}

impl Agent {
    /// Launches an agent on `host` connecting to `peers`, with `extra` flags.
    pub fn launch(host: &Host, peers: &[Ipv4Addr], extra: &[&str]) -> Agent {
        Agent::launch_with_env(host, peers, extra, &[])
    }

    /// [`Agent::launch`] with extra environment variables.
    pub fn launch_with_env(host: &Host, peers: &[Ipv4Addr], extra: &[&str], env: &[(String, String)]) -> Agent {
        let id = unique("ag");
        let mut args: Vec<String> = vec!["launch".into()];
        args.extend(peers.iter().map(ToString::to_string));
        let nickname = host.name.clone();
        // A caller may choose the name (e.g. to seed IPAM with it).
        let given = extra.iter().position(|a| *a == "--name").and_then(|i| extra.get(i + 1));
        let name = given.map_or_else(|| peer_name(&id), |n| n.to_string());
        if given.is_none() {
            args.push("--name".into());
            args.push(name.clone());
        }
        for (k, v) in [
            ("--nickname", nickname.as_str()),
            ("--iface", host.iface.as_str()),
            ("--pin-name", host.name.as_str()),
            ("--heartbeat", "0.2"),
            ("--log", "info,weft=debug"),
        ] {
            // The caller's own value wins.
            if !extra.contains(&k) {
                args.push(k.into());
                args.push(v.into());
            }
        }
        // Docker only where the test runs a dockerd for this host (the
        // machine's own Docker, if any, is not the test's).
        if !extra.contains(&"--docker-host") {
            args.push("--no-docker".into());
        }
        let state_dir = std::env::temp_dir().join(format!("{id}-state"));
        args.push("--state-dir".into());
        args.push(state_dir.display().to_string());
        args.extend(extra.iter().map(ToString::to_string));
        let log = std::env::temp_dir().join(format!("{id}.log"));
        let (dir, file) = (state_dir.clone(), log.clone());
        let files = cleanup::register(format!("removing {}", state_dir.display()), move || {
            cleanup::remove_tree(&dir);
            cleanup::remove_tree(&file);
        });
        let mut agent = Agent {
            ns: host.ns.alias(),
            name,
            nickname,
            pin_name: host.name.clone(),
            state_dir,
            log,
            args,
            env: env.to_vec(),
            child: None,
            _files: files,
        };
        agent.start();
        agent
    }

    /// Starts the process (again) with the same arguments and state.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Proc::spawn_killed(
            format!("stopping agent {} ({})", self.nickname, self.name),
            self.ns
                .cmd(weft_bin().to_str().expect("utf-8 path"))
                .args(&self.args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        )
        .expect("spawn weft launch");
        self.child = Some(child);
        let ready = wait_until(Duration::from_secs(20), || {
            self.exited().is_some() || self.try_cli(&["status"]).status.success()
        });
        assert!(ready && self.exited().is_none(), "agent did not start:\n{}", self.log());
    }

    /// `weft dns-lookup NAME`: the addresses (none when the name is unknown).
    pub fn dns_lookup(&self, name: &str) -> Vec<String> {
        match self.try_cli(&["dns-lookup", name]) {
            o if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect(),
            _ => Vec::new(),
        }
    }

    /// IPAM: how many addresses each peer owns, as this agent sees it.
    pub fn ownership(&self) -> std::collections::BTreeMap<String, u64> {
        let r = self.report();
        r["ipam"]["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| Some((p["peer"].as_str()?.to_string(), p["owned"].as_u64()?)))
            .collect()
    }

    /// The exit status, if the process ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_ref().and_then(Proc::try_wait)
    }

    /// The namespace the agent runs in (its host's).
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The state directory it was launched with.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Runs `weft ARGS` (the CLI) in the agent's namespace.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        self.ns.cmd(weft_bin().to_str().expect("utf-8")).args(args).output().expect("run weft")
    }

    /// Runs `weft ARGS`, panicking on failure; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "weft {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One HTTP request to the agent's API (from inside its namespace):
    /// returns the status code and the body.
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        http_in(&self.ns, method, path)
    }

    /// `weft report` as JSON.
    pub fn report(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli(&["report"])).expect("report is JSON")
    }

    /// Peer names in this agent's topology.
    pub fn peers(&self) -> Vec<String> {
        let r = self.report();
        r["router"]["peers"].as_array().map_or_else(Vec::new, |ps| {
            ps.iter().filter_map(|p| p["name"].as_str().map(str::to_string)).collect()
        })
    }

    /// Established connections of this agent.
    pub fn established(&self) -> usize {
        let r = self.report();
        r["router"]["connections"]
            .as_array()
            .map_or(0, |cs| cs.iter().filter(|c| c["state"] == "established").count())
    }

    /// Hosts programmed in this agent's data path: underlay address → next hop.
    pub fn dp_hosts(&self) -> Vec<(String, String)> {
        let r = self.report();
        r["datapath"]["hosts"]
            .as_object()
            .map_or_else(Vec::new, |m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").into())).collect())
    }

    /// Remote endpoint addresses programmed in this agent's data path.
    pub fn dp_remotes(&self) -> Vec<String> {
        let r = self.report();
        r["datapath"]["remote_endpoints"]
            .as_array()
            .map_or_else(Vec::new, |a| a.iter().filter_map(|e| e["addr"].as_str().map(str::to_string)).collect())
    }

    /// Attaches container `ns` with `addr` (a CIDR).
    pub fn attach(&self, ns: &Netns, addr: &str) -> String {
        self.cli(&["attach", "--netns", ns.path().to_str().expect("utf-8"), "--id", ns.name(), addr])
    }

    /// SIGKILL: the agent dies without a word.
    pub fn kill9(&mut self) {
        // Dropping the process's guard kills and reaps it.
        self.child.take();
    }

    /// `weft stop` and wait for the process to end.
    pub fn stop(&mut self) {
        self.cli(&["stop"]);
        let child = self.child.take().expect("running");
        let ended = child.wait_timeout(Duration::from_secs(10)).is_some();
        drop(child);
        assert!(ended, "agent did not stop within 10 s:\n{}", self.log());
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- log of agent {} ({}) ----\n{}", self.nickname, self.name, self.log());
        }
        // `_files` drops next: the state directory and the log go.
    }
}

/// Runs `weft ARGS` as a one-off command in `ns` (e.g. a launch that must fail).
pub fn weft_in(ns: &Netns, args: &[&str]) -> Output {
    ns.cmd(weft_bin().to_str().expect("utf-8")).args(args).output().expect("run weft")
}

/// Builds a command running the `weft` binary as an unprivileged user in `ns`.
pub fn weft_unprivileged(ns: &Netns, args: &[&str]) -> Command {
    let mut cmd = ns.cmd("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(weft_bin()).args(args);
    cmd
}

/// One HTTP/1.1 request to the agent's API (127.0.0.1:6784) inside `ns`.
pub fn http_in(ns: &Netns, method: &str, path: &str) -> (u16, String) {
    crate::http_request(ns, ([127, 0, 0, 1], 6784).into(), method, path, "").expect("API")
}

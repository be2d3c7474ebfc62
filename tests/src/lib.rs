//! Test harness: network namespaces as hosts and containers, an underlay between
//! them, and helpers to run commands inside them.
//!
//! Every namespace, device and pin directory a test makes has a unique name (pid +
//! counter) and is removed on Drop, also when the test fails, so tests run in
//! parallel and a crashed run leaves nothing behind. Traffic stays inside the
//! namespaces made here. Every guard registers its undo with [`cleanup`], so
//! SIGINT, SIGTERM and SIGHUP undo the same, newest first. Processes are entered with `nsenter --net=` (never
//! `ip netns exec`, which remounts /sys and hides bpffs).

pub mod agent;
pub mod aws;
pub mod bench;
pub mod cleanup;
pub mod demo;
pub mod docker;
pub mod systemd;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cleanup::{Cleanup, Proc, TempPath};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or test process) uses: `wt<pid>x<n><label>`.
pub fn unique(label: &str) -> String {
    format!("wt{}x{}{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), label)
}

/// True when running as root; otherwise prints why the test is skipped. CI runs
/// as root, so nothing skips there.
pub fn root_or_skip(test: &str) -> bool {
    if nix_euid() == 0 {
        return true;
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces, eBPF); run `cargo xtask test` as root");
    false
}

fn nix_euid() -> u32 {
    // SAFETY-free: read from /proc to avoid a libc dependency here.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(2).and_then(|u| u.parse().ok()))
        .unwrap_or(u32::MAX)
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ip ARGS...` in the test's own namespace.
pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A network namespace that exists as long as this value.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Deletes the namespace; [`Cleanup::none`] for an [`Netns::alias`].
    _cleanup: Cleanup,
}

impl Netns {
    /// Creates `wt<pid>x<n><label>` with loopback up.
    pub fn new(label: &str) -> Netns {
        let name = unique(label);
        let theirs = name.clone();
        let undo = move || {
            let _ = Command::new("ip").args(["netns", "del", &theirs]).stderr(Stdio::null()).status();
        };
        let (cleanup, ()) = cleanup::create(format!("removing netns {name}"), undo, || {
            ip(&["netns", "add", &name]);
            run(Command::new("nsenter").arg(format!("--net=/run/netns/{name}")).args(["--", "ip", "link", "set", "lo", "up"]));
        });
        Netns { name, _cleanup: cleanup }
    }

    /// A second handle on the same namespace that does not delete it.
    pub fn alias(&self) -> Netns {
        Netns { name: self.name.clone(), _cleanup: Cleanup::none() }
    }

    /// The name under /run/netns.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        cmd
    }

    /// Runs `program ARGS` inside, panicking on failure; returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        String::from_utf8_lossy(&run(self.cmd(program).args(args)).stdout).into_owned()
    }

    /// Runs `program ARGS` inside and says whether it succeeded.
    pub fn succeeds(&self, program: &str, args: &[&str]) -> bool {
        self.cmd(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `ip ARGS` inside.
    pub fn ip(&self, args: &[&str]) -> String {
        self.run("ip", args)
    }

    /// Whether one ping to `dst` gets an answer within a second.
    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        self.succeeds("ping", &["-c", "1", "-W", "1", "-q", &dst.to_string()])
    }

    /// Whether a ping of `size` payload bytes with DF set gets through.
    pub fn ping_df(&self, dst: Ipv4Addr, size: u32) -> bool {
        self.succeeds("ping", &["-c", "1", "-W", "1", "-q", "-M", "do", "-s", &size.to_string(), &dst.to_string()])
    }

    /// Pings until one answer arrives or `timeout` passes.
    pub fn ping_within(&self, dst: Ipv4Addr, timeout: Duration) -> bool {
        wait_until(timeout, || self.ping(dst))
    }
}

/// A simulated host: a namespace with one or more underlay interfaces.
#[derive(Debug)]
pub struct Host {
    pub ns: Netns,
    /// The unique host name (pin directory name).
    pub name: String,
    /// Address on the first underlay interface.
    pub ip: Ipv4Addr,
    /// Name of the first underlay interface.
    pub iface: String,
    links: u32,
    /// Removes the pin directory: pins outlive namespaces, they are this
    /// host's to remove.
    _pins: Cleanup,
}

impl Host {
    /// A host on namespace `ns`, its pin directory named after it.
    fn on(ns: Netns, ip: Ipv4Addr, iface: &str) -> Host {
        let name = ns.name().to_string();
        let pins = pin_dir_of(&name);
        let cleanup = cleanup::register(format!("removing pins {}", pins.display()), move || {
            let _ = std::fs::remove_dir_all(&pins);
        });
        Host { ns, name, ip, iface: iface.into(), links: 0, _pins: cleanup }
    }

    /// The pin directory the data path of this host uses.
    pub fn pin_dir(&self) -> PathBuf {
        pin_dir_of(&self.name)
    }
}

fn pin_dir_of(name: &str) -> PathBuf {
    Path::new(weft::datapath::ebpf::DEFAULT_PIN_ROOT).join(name)
}

/// The network between hosts: a LAN (a bridge in its own namespace) and any
/// number of point-to-point links.
#[derive(Debug)]
pub struct Underlay {
    switch: Netns,
    hosts: u32,
    subnets: u32,
    /// MTU of the underlay devices.
    pub mtu: u32,
}

impl Underlay {
    /// An empty LAN with MTU 1500.
    pub fn new() -> Underlay {
        Self::with_mtu(1500)
    }

    /// An empty LAN with the given MTU.
    pub fn with_mtu(mtu: u32) -> Underlay {
        let switch = Netns::new("sw");
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        Underlay { switch, hosts: 0, subnets: 1, mtu }
    }

    /// A host on the LAN (192.168.0.N/24 on `eth0`).
    pub fn host(&mut self, label: &str) -> Host {
        let addr = Ipv4Addr::new(192, 168, 0, self.hosts as u8 + 1);
        self.host_at(label, addr)
    }

    /// A host on the LAN with address `addr` (in 192.168.0.0/24, not taken).
    pub fn host_at(&mut self, label: &str, addr: Ipv4Addr) -> Host {
        self.hosts += 1;
        let n = self.hosts;
        let ns = Netns::new(label);
        let port = format!("p{n}");
        ip(&[
            "link", "add", "eth0", "netns", ns.name(), "mtu", &self.mtu.to_string(), "type", "veth", "peer",
            "name", &port, "netns", self.switch.name(), "mtu", &self.mtu.to_string(),
        ]);
        self.switch.ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        Host::on(ns, addr, "eth0")
    }

    /// A host with no LAN interface: it is reached only through [`Underlay::link`].
    pub fn isolated_host(&mut self, label: &str) -> Host {
        Host::on(Netns::new(label), Ipv4Addr::UNSPECIFIED, "")
    }

    /// A point-to-point link between two hosts on a subnet of its own; returns
    /// their addresses on it. A host's first link becomes its main address if it
    /// has no LAN interface.
    pub fn link(&mut self, a: &mut Host, b: &mut Host) -> (Ipv4Addr, Ipv4Addr) {
        self.subnets += 1;
        let subnet = self.subnets as u8;
        let (ia, ib) = (format!("l{}", a.links), format!("l{}", b.links));
        a.links += 1;
        b.links += 1;
        ip(&[
            "link", "add", &ia, "netns", a.ns.name(), "mtu", &self.mtu.to_string(), "type", "veth", "peer", "name",
            &ib, "netns", b.ns.name(), "mtu", &self.mtu.to_string(),
        ]);
        let (aa, ab) = (Ipv4Addr::new(192, 168, subnet, 1), Ipv4Addr::new(192, 168, subnet, 2));
        for (host, iface, addr) in [(&mut *a, &ia, aa), (&mut *b, &ib, ab)] {
            host.ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", iface]);
            host.ns.ip(&["link", "set", iface, "up"]);
            if host.ip.is_unspecified() {
                host.ip = addr;
                host.iface = iface.clone();
            }
        }
        (aa, ab)
    }

    /// The switch namespace (to capture LAN traffic).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `work` on a thread inside `ns` with a runtime, blocking until done.
pub fn in_ns<F, Fut, T>(ns: &Netns, work: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(weft::datapath::netns::in_netns(&ns.path(), work)).expect("enter namespace")
}

/// A packet capture (tcpdump) on an interface inside a namespace, written to a
/// temporary pcap file that is removed on Drop.
#[derive(Debug)]
pub struct Capture {
    child: Option<Proc>,
    file: TempPath,
}

impl Capture {
    /// Starts capturing on `iface` in `ns` and returns once tcpdump listens.
    pub fn start(ns: &Netns, iface: &str, filter: &[&str]) -> Capture {
        use std::io::{BufRead, BufReader};
        let file = TempPath::new(&format!("{}.pcap", unique("cap")));
        let child = Proc::spawn_killed(
            format!("stopping tcpdump on {iface} in {}", ns.name()),
            ns.cmd("tcpdump")
                .args(["-i", iface, "--immediate-mode", "-U", "-n", "-w"])
                .arg(file.path())
                .args(filter)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .expect("tcpdump (apt-get install tcpdump)");
        let stderr = child.take_stderr().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("tcpdump did not start listening");
        Capture { child: Some(child), file }
    }

    /// Stops the capture and decodes it with `tcpdump -r FILE ARGS`.
    pub fn stop_and_read(&mut self, args: &[&str]) -> String {
        if let Some(child) = self.child.take() {
            std::thread::sleep(Duration::from_millis(200));
            // tcpdump flushes its file on SIGINT.
            child.signal(nix::sys::signal::Signal::SIGINT);
            child.wait_timeout(Duration::from_secs(10));
        }
        self.read(args)
    }

    /// Decodes the capture so far with `tcpdump -r FILE ARGS`.
    pub fn read(&self, args: &[&str]) -> String {
        let out = Command::new("tcpdump").arg("-r").arg(self.file.path()).args(args).output().expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}


/// One HTTP/1.1 request from inside `ns` to `addr` (connection closed after
/// it): the status code and the body.
pub fn http_request(ns: &Netns, addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    on_thread_in(ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(req.as_bytes())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((code, body))
    })
    .join()
    .expect("http thread")
}

/// Runs `work` on a new std thread inside `ns` (blocking socket code).
pub fn on_thread_in<T: Send + 'static>(ns: &Netns, work: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let netns = weft::datapath::netns::Netns::open(ns.path()).expect("open netns");
    std::thread::spawn(move || {
        netns.enter().expect("enter netns");
        work()
    })
}

/// Moves `bytes` over one TCP connection from `client` to `server_addr`:`port`
/// in `server`, and checks every byte arrived intact.
pub fn tcp_transfer(server: &Netns, server_addr: Ipv4Addr, client: &Netns, port: u16, bytes: usize) -> bool {
    use std::io::{Read, Write};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let srv = on_thread_in(server, move || -> std::io::Result<(usize, u64)> {
        let listener = std::net::TcpListener::bind((server_addr, port))?;
        ready_tx.send(()).ok();
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut total, mut sum) = (0usize, 0u64);
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok((total, sum));
            }
            total += n;
            sum = buf[..n].iter().fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(5)).is_err() {
        return false;
    }
    let cli = on_thread_in(client, move || -> std::io::Result<u64> {
        let mut conn = std::net::TcpStream::connect_timeout(&(server_addr, port).into(), Duration::from_secs(5))?;
        conn.set_write_timeout(Some(Duration::from_secs(10)))?;
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 + 3) as u8).collect();
        let (mut left, mut sum) = (bytes, 0u64);
        while left > 0 {
            let n = left.min(chunk.len());
            conn.write_all(&chunk[..n])?;
            sum = chunk[..n].iter().fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
            left -= n;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        Ok(sum)
    });
    let sent = cli.join().ok().and_then(Result::ok);
    let got = srv.join().ok().and_then(Result::ok);
    matches!((sent, got), (Some(s), Some((n, r))) if n == bytes && r == s)
}

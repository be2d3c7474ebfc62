//! Ctrl-C, a closed terminal or a second signal leave nothing behind: the demo
//! (`WEFT_DEMO_SMALL=1`: two hosts, each with a dockerd, containers and a weft
//! agent) runs in a pseudo-terminal as a person would run it, is interrupted the
//! way a terminal interrupts it (a ^C byte, the terminal closed), and afterwards
//! nothing with its prefix (`wt<pid>x`) is left: no namespace, mount, pin
//! directory, process (agents, dockerd, containerd, shims, containers) or temp
//! file.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_tests::{agent::weft_bin, root_or_skip, wait_until};

const DEMO: &str = env!("CARGO_BIN_EXE_weft-demo");

/// The demo on a pty: its output so far, and the terminal's other end.
struct Terminal {
    child: Child,
    output: Arc<Mutex<String>>,
    /// `Some(bytes)` types them; `None` closes the terminal (a hangup).
    keys: Sender<Option<Vec<u8>>>,
}

impl Terminal {
    /// Starts the small demo as the session leader of a new pty (`setsid --ctty`:
    /// the pty is its controlling terminal, so ^C is SIGINT and closing it is
    /// SIGHUP).
    fn demo() -> Terminal {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        // openpty's descriptors are inherited by default: the demo (and every
        // process it starts) would hold the master open, and closing ours would
        // hang nothing up.
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).expect("close-on-exec pty");
        }
        let slave = |what| Stdio::from(pty.slave.try_clone().unwrap_or_else(|e| panic!("pty {what}: {e}")));
        let child = Command::new("setsid")
            .arg("--ctty")
            .arg(DEMO)
            .env("WEFT_DEMO_SMALL", "1")
            .env("WEFT_BIN", weft_bin())
            .stdin(slave("stdin"))
            .stdout(slave("stdout"))
            .stderr(slave("stderr"))
            .spawn()
            .expect("start the demo (setsid from util-linux)");
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).expect("non-blocking pty");
        let output = Arc::new(Mutex::new(String::new()));
        let (keys, rx) = channel();
        let out = Arc::clone(&output);
        std::thread::spawn(move || terminal_thread(master, &out, &rx));
        Terminal { child, output, keys }
    }

    fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Waits until the output shows `text`; panics (with the output) if the demo
    /// ends first or `timeout` passes.
    fn wait_for(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(text) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the demo ended ({status}) before {text:?}:\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "no {text:?} within {timeout:?}:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_keys(&self, bytes: &[u8]) {
        let _ = self.keys.send(Some(bytes.to_vec()));
    }

    fn close(&self) {
        let _ = self.keys.send(None);
    }

    /// The demo's exit status, if it ends within `timeout`.
    fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Terminal {
    /// A test that fails while the demo runs stops it with SIGTERM (it tears
    /// itself down), SIGKILL if that does not end it.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if self.exit_within(Duration::from_secs(90)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads the pty into `out` and types what `keys` says, until the demo's side
/// is closed or the test hangs up.
fn terminal_thread(mut master: std::fs::File, out: &Mutex<String>, keys: &Receiver<Option<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Ok(mut o) = out.lock() {
                    o.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // EIO: every process of the demo's side has closed it.
            Err(_) => return,
        }
        match keys.try_recv() {
            Ok(Some(bytes)) => {
                let _ = master.write_all(&bytes);
            }
            // Dropping the last descriptor of the master is the hangup.
            Ok(None) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Everything on the machine that carries `prefix`: namespaces, mounts, pin
/// directories, temp entries, and processes whose command line, root or working
/// directory names it (agents, dockerd, containerd and shims by their paths,
/// containers by their root under dockerd's directory), plus `pids` still alive.
fn leftovers(prefix: &str, pids: &[(i32, String)]) -> Vec<String> {
    let mut found = Vec::new();
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.starts_with(prefix))
            .collect()
    };
    found.extend(names("/run/netns").into_iter().map(|n| format!("netns {n}")));
    found.extend(names(weft::datapath::ebpf::DEFAULT_PIN_ROOT).into_iter().map(|n| format!("pin directory {n}")));
    let tmp = std::env::temp_dir();
    found.extend(names(&tmp.display().to_string()).into_iter().map(|n| format!("temp entry {n}")));
    // The containers' cgroups (dockerd's --cgroup-parent), per hierarchy.
    found.extend(names("/sys/fs/cgroup").into_iter().map(|n| format!("cgroup {n}")));
    for ctrl in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        let dir = ctrl.path().display().to_string();
        found.extend(names(&dir).into_iter().map(|n| format!("cgroup {dir}/{n}")));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    found.extend(mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.contains(prefix)).map(|m| format!("mount {m}")));
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if !weft_tests::cleanup::running(pid) {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        let link = |l: &str| std::fs::read_link(entry.path().join(l)).map(|p| p.display().to_string()).unwrap_or_default();
        let (root, cwd) = (link("root"), link("cwd"));
        if [&cmdline, &root, &cwd].iter().any(|s| s.contains(prefix)) {
            found.push(format!("process {pid}: {cmdline} (root {root}, cwd {cwd})"));
        } else if let Some((_, start)) = pids.iter().find(|(p, _)| *p == pid)
            && start_time(pid).as_deref() == Some(start.as_str())
        {
            found.push(format!("process {pid} (seen during the demo): {cmdline}"));
        }
    }
    found
}

/// A process's start time (field 22 of stat), to tell it from a reused pid.
fn start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19).map(str::to_string)
}

/// Every process of the demo now: its descendants, and what its prefix names
/// with theirs (the shims and containers, which containerd starts detached).
fn processes_of(demo: u32, prefix: &str) -> Vec<(i32, String)> {
    let tmp_prefix = std::env::temp_dir().join(prefix);
    let mut pids = weft_tests::cleanup::processes_under(&tmp_prefix);
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if let Some(ppid) = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|p| p.parse::<i32>().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut tree = vec![demo as i32];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    pids.extend(tree.into_iter().skip(1));
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter().filter_map(|p| Some((p, start_time(p)?))).collect()
}

/// Best effort, so a failed test does not leave its debris to the next.
fn sweep(prefix: &str, pids: &[(i32, String)]) {
    for (pid, start) in pids {
        if start_time(*pid).as_deref() == Some(start.as_str()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    weft_tests::cleanup::kill_processes_under(&std::env::temp_dir().join(prefix));
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = Command::new("ip").args(["netns", "del"]).arg(entry.file_name()).status();
        }
    }
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            weft_tests::cleanup::remove_cgroups(&name);
        }
    }
    for root in [std::env::temp_dir(), Path::new(weft::datapath::ebpf::DEFAULT_PIN_ROOT).to_path_buf()] {
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                weft_tests::cleanup::remove_tree(&entry.path());
            }
        }
    }
}

/// The demo's hosts forward IPv4 as Docker hosts do: a `docker run` on them,
/// as the demo suggests trying, does not warn "IPv4 forwarding is disabled".
fn no_forwarding_warning(output: &str) {
    let host = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("DOCKER_HOST=")?.strip_suffix(" docker ps"))
        .unwrap_or_else(|| panic!("no DOCKER_HOST line:\n{output}"));
    let out = weft_tests::docker::docker_cli(host)
        .args(["run", "--rm", weft_tests::docker::BUSYBOX, "true"])
        .stdin(Stdio::null())
        .output()
        .expect("docker run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "docker run through the demo's proxy: {stderr}");
    assert!(!stderr.contains("forwarding"), "docker run warns: {stderr}");
}

/// How the demo is interrupted.
enum Interrupt {
    /// Enter at the prompt: the normal end, the same steps.
    EnterAtPrompt,
    /// ^C at the "Press Enter" prompt.
    CtrlCAtPrompt,
    /// ^C while containers are being started.
    CtrlCMidSetup,
    /// ^C while the first hosts, dockerds and agents are being made.
    CtrlCEarly,
    /// The terminal closed at the prompt.
    HangupAtPrompt,
    /// ^C at the prompt, then the terminal closed while it tears down.
    CtrlCThenHangup,
}

fn interrupt_demo(test: &str, how: Interrupt) {
    if !root_or_skip(test) {
        return;
    }
    let mut term = Terminal::demo();
    let prefix = format!("wt{}x", term.child.id());
    let setup = Duration::from_secs(300);
    match how {
        Interrupt::CtrlCMidSetup => {
            term.wait_for("== containers", setup);
            std::thread::sleep(Duration::from_millis(700));
        }
        Interrupt::CtrlCEarly => {
            term.wait_for("== hosts", setup);
            // dockerd of host1 starting, or host2 being made.
            std::thread::sleep(Duration::from_millis(1500));
        }
        _ => term.wait_for("Press Enter", setup),
    }
    if matches!(how, Interrupt::CtrlCAtPrompt) {
        no_forwarding_warning(&term.output());
    }
    let pids = processes_of(term.child.id(), &prefix);
    let least = if matches!(how, Interrupt::CtrlCEarly) { 1 } else { 4 };
    assert!(pids.len() >= least, "the demo runs no dockerds and agents? {pids:?}\n{}", term.output());
    let expected_code = match how {
        Interrupt::HangupAtPrompt => {
            term.close();
            128 + 1
        }
        Interrupt::CtrlCThenHangup => {
            term.type_keys(b"\x03");
            term.wait_for("tearing down", Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(300));
            term.close();
            128 + 2
        }
        Interrupt::EnterAtPrompt => {
            term.type_keys(b"\n");
            0
        }
        Interrupt::CtrlCAtPrompt | Interrupt::CtrlCMidSetup | Interrupt::CtrlCEarly => {
            term.type_keys(b"\x03");
            128 + 2
        }
    };
    let status = term.exit_within(Duration::from_secs(150));
    let output = term.output();
    let Some(status) = status else {
        let _ = term.child.kill();
        let _ = term.child.wait();
        sweep(&prefix, &pids);
        panic!("the demo did not end within 150 s of the signal:\n{output}");
    };
    eprintln!("---- demo output ----\n{output}\n---- exit: {status} ----");
    // The terminal is gone after a hangup: its last lines cannot be read.
    if !matches!(how, Interrupt::HangupAtPrompt) {
        assert!(output.contains("tearing down"), "no progress shown:\n{output}");
    }
    // What is left may take a moment to go (a process being reaped by init).
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(5), || {
        left = leftovers(&prefix, &pids);
        left.is_empty()
    });
    if !clean {
        sweep(&prefix, &pids);
    }
    assert!(clean, "left behind after {status}:\n  {}\n---- demo output ----\n{output}", left.join("\n  "));
    assert_eq!(status.code(), Some(expected_code), "exit status\n{output}");
}

#[test]
fn teardown_on_enter_at_the_prompt_leaves_nothing() {
    interrupt_demo("teardown_on_enter_at_the_prompt_leaves_nothing", Interrupt::EnterAtPrompt);
}

#[test]
fn teardown_on_ctrl_c_at_the_prompt_leaves_nothing() {
    interrupt_demo("teardown_on_ctrl_c_at_the_prompt_leaves_nothing", Interrupt::CtrlCAtPrompt);
}

#[test]
fn teardown_on_ctrl_c_mid_setup_leaves_nothing() {
    interrupt_demo("teardown_on_ctrl_c_mid_setup_leaves_nothing", Interrupt::CtrlCMidSetup);
}

#[test]
fn teardown_on_ctrl_c_while_the_hosts_are_made_leaves_nothing() {
    interrupt_demo("teardown_on_ctrl_c_while_the_hosts_are_made_leaves_nothing", Interrupt::CtrlCEarly);
}

#[test]
fn teardown_on_a_closed_terminal_at_the_prompt_leaves_nothing() {
    interrupt_demo("teardown_on_a_closed_terminal_at_the_prompt_leaves_nothing", Interrupt::HangupAtPrompt);
}

#[test]
fn teardown_on_a_terminal_closed_while_tearing_down_leaves_nothing() {
    interrupt_demo("teardown_on_a_terminal_closed_while_tearing_down_leaves_nothing", Interrupt::CtrlCThenHangup);
}

/// Not a test on its own: what [`teardown_of_a_test_killed_at_its_time_limit_leaves_nothing`]
/// runs in a child process. It makes a host with an agent and a capture, a
/// thread that panics holding a namespace, and waits to be killed.
#[test]
#[ignore = "run by teardown_of_a_test_killed_at_its_time_limit_leaves_nothing"]
fn held_until_killed() {
    let mut lan = weft_tests::Underlay::new();
    let host = lan.host("held");
    let _agent = weft_tests::agent::Agent::launch(&host, &[], &[]);
    let _capture = weft_tests::Capture::start(&host.ns, "eth0", &[]);
    let (tx, rx) = channel();
    let panicked = std::thread::spawn(move || {
        let ns = weft_tests::Netns::new("thread");
        let _ = tx.send(ns.path());
        assert!(ns.name().is_empty(), "a panic in a thread, holding {}", ns.name());
    })
    .join();
    assert!(panicked.is_err());
    let held = rx.recv().expect("the thread's namespace");
    assert!(!held.exists(), "the panicking thread's namespace {} is gone", held.display());
    println!("HOLDING");
    std::thread::sleep(Duration::from_secs(600));
}

/// A test binary killed at nextest's time limit (SIGTERM) tears down what it
/// holds: agent, capture, namespaces, pins, temp files.
#[test]
fn teardown_of_a_test_killed_at_its_time_limit_leaves_nothing() {
    if !root_or_skip("teardown_of_a_test_killed_at_its_time_limit_leaves_nothing") {
        return;
    }
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "held_until_killed", "--ignored", "--nocapture"])
        .env("WEFT_BIN", weft_bin())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the holding test");
    let prefix = format!("wt{}x", child.id());
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let mut reader = std::io::BufReader::new(stdout);
        while std::io::BufRead::read_line(&mut reader, &mut out).is_ok_and(|n| n > 0) {
            if out.contains("HOLDING") {
                let _ = tx.send(());
            }
        }
    });
    let holding = rx.recv_timeout(Duration::from_secs(120)).is_ok();
    let pids = processes_of(child.id(), &prefix);
    let before = leftovers(&prefix, &[]);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(5), || {
        left = leftovers(&prefix, &pids);
        left.is_empty()
    });
    if !clean {
        sweep(&prefix, &pids);
    }
    assert!(holding, "the holding test did not get going:\n{stderr}");
    assert!(before.iter().any(|l| l.starts_with("netns")) && !pids.is_empty(), "it held nothing? {before:?}");
    assert!(clean, "left behind after {status:?}:\n  {}\n{stderr}", left.join("\n  "));
    assert_eq!(status.and_then(|s| s.code()), Some(128 + 15), "{stderr}");
    assert!(stderr.contains("tearing down"), "{stderr}");
}

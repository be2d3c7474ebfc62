//! `cargo xtask clean`: removes what earlier test, demo or bench runs that
//! crashed or were killed (SIGKILL, a CI time limit) left on the machine.
//!
//! The harness (tests/src) names everything it makes `wt<pid>x<n><label>`, with
//! the pid of the process that made it: network namespaces (/run/netns), pin
//! directories (/sys/fs/bpf/weft), entries in the temp directory (agent state
//! directories and logs, dockerd directories, captures, image build contexts).
//! Devices live only inside those namespaces. Only names of that shape whose
//! pid no longer runs are touched — never a live run's, never anything else.
//! Processes are the dead run's when their command line names one of its temp
//! entries (agents, dockerd, containerd and its shims) or they run inside one
//! of its namespaces; the containers below a shim go with it. They are killed
//! by pid (SIGKILL), then mounts, namespaces, the containers' cgroups (named
//! after their dockerd's directory), pins and files are removed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where the agent pins its programs and maps (`weft::datapath::ebpf::DEFAULT_PIN_ROOT`).
const PIN_ROOT: &str = "/sys/fs/bpf/weft";
const NETNS_DIR: &str = "/run/netns";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The pid in a harness name `wt<pid>x<n>...`, if `name` has that shape.
pub fn harness_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("wt")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let after = rest[digits..].strip_prefix('x')?;
    if digits == 0 || !after.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    rest[..digits].parse().ok()
}

fn alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// A harness name whose creating process is gone.
fn orphaned(name: &str) -> bool {
    harness_pid(name).is_some_and(|pid| !alive(pid))
}

fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
        .collect()
}

/// Removes every leftover of dead runs; returns one line per thing removed.
pub fn clean() -> Vec<String> {
    let tmp = std::env::temp_dir();
    let mut removed = Vec::new();

    // Processes first: they hold mounts, namespaces and files.
    let netns_inodes: BTreeSet<u64> = entries(Path::new(NETNS_DIR))
        .into_iter()
        .filter(|(n, _)| orphaned(n))
        .filter_map(|(_, p)| Some(std::os::linux::fs::MetadataExt::st_ino(&std::fs::metadata(p).ok()?)))
        .collect();
    let procs = processes();
    let tmp_prefix = format!("{}/", tmp.display());
    let names_dead_entry = |cmdline: &[String]| {
        cmdline.iter().any(|arg| {
            arg.match_indices(&tmp_prefix).any(|(i, _)| orphaned(&arg[i + tmp_prefix.len()..]))
        })
    };
    let mut doomed: Vec<u32> = procs
        .iter()
        .filter(|p| p.pid != std::process::id())
        .filter(|p| names_dead_entry(&p.cmdline) || p.netns.is_some_and(|i| netns_inodes.contains(&i)))
        .map(|p| p.pid)
        .collect();
    // What runs below them (containers below their shims).
    let mut i = 0;
    while i < doomed.len() {
        let parent = doomed[i];
        for p in procs.iter().filter(|p| p.ppid == parent) {
            if !doomed.contains(&p.pid) {
                doomed.push(p.pid);
            }
        }
        i += 1;
    }
    for pid in &doomed {
        let what = procs.iter().find(|p| p.pid == *pid).map(|p| p.cmdline.join(" ")).unwrap_or_default();
        if Command::new("kill").args(["-KILL", &pid.to_string()]).status().is_ok_and(|s| s.success()) {
            removed.push(format!("process {pid}: {}", shorten(&what)));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while doomed.iter().any(|p| running(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }

    // Mounts under dead runs' temp entries (dockerd's netns handles, layers), deepest first.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.strip_prefix(&tmp_prefix).is_some_and(orphaned))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts.dedup();
    for m in mounts {
        if Command::new("umount").args(["-l", m]).status().is_ok_and(|s| s.success()) {
            removed.push(format!("mount {m}"));
        }
    }

    for (name, _) in entries(Path::new(NETNS_DIR)).into_iter().filter(|(n, _)| orphaned(n)) {
        if Command::new("ip").args(["netns", "del", &name]).status().is_ok_and(|s| s.success()) {
            removed.push(format!("netns {name}"));
        }
    }
    // Cgroups of killed containers: the harness's dockerds put them under
    // `--cgroup-parent=/<their directory's name>`, in every hierarchy.
    let mut cgroup_roots = vec![PathBuf::from(CGROUP_ROOT)];
    cgroup_roots.extend(entries(Path::new(CGROUP_ROOT)).into_iter().map(|(_, p)| p).filter(|p| p.is_dir()));
    for root in cgroup_roots {
        for (_, path) in entries(&root).into_iter().filter(|(n, p)| orphaned(n) && p.is_dir()) {
            if rmdir_tree(&path) {
                removed.push(format!("cgroup {}", path.display()));
            }
        }
    }
    for (root, what) in [(Path::new(PIN_ROOT), "pin directory"), (tmp.as_path(), "temp entry")] {
        for (_, path) in entries(root).into_iter().filter(|(n, _)| orphaned(n)) {
            let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            match gone {
                Ok(()) => removed.push(format!("{what} {}", path.display())),
                // Removed meanwhile by its owner, which has exited since.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("cargo xtask clean: cannot remove {}: {e}", path.display()),
            }
        }
    }
    removed
}

/// Removes an (empty) cgroup and those below it, deepest first: rmdir only,
/// cgroupfs's files go with their directory. False if it is still there
/// (a process still in it).
fn rmdir_tree(dir: &Path) -> bool {
    for (_, sub) in entries(dir).into_iter().filter(|(_, p)| p.is_dir()) {
        rmdir_tree(&sub);
    }
    std::fs::remove_dir(dir).is_ok()
}

/// Exists and is not a zombie (a killed process waiting for its parent).
fn running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).is_some_and(|state| state != "Z")
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 120 { format!("{}…", s.chars().take(120).collect::<String>()) } else { s.to_string() }
}

struct ProcInfo {
    pid: u32,
    ppid: u32,
    cmdline: Vec<String>,
    /// The inode of its network namespace.
    netns: Option<u64>,
}

fn processes() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    for (name, path) in entries(Path::new("/proc")) {
        let Ok(pid) = name.parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces.
        let Some(ppid) = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok()) else {
            continue;
        };
        let raw = std::fs::read(path.join("cmdline")).unwrap_or_default();
        let cmdline = raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let netns = std::fs::read_link(path.join("ns/net"))
            .ok()
            .and_then(|l| l.to_str()?.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok());
        out.push(ProcInfo { pid, ppid, cmdline, netns });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_harness_names_carry_a_pid() {
        assert_eq!(harness_pid("wt1234x0sw"), Some(1234));
        assert_eq!(harness_pid("wt1234x17host1-state"), Some(1234));
        assert_eq!(harness_pid("wt1234x5dk/exec/containerd"), Some(1234));
        for other in ["wt", "wtx1", "wt12x", "wt12xy", "wt12", "weft-busybox-1-2.tar", "wtf123x1", "xwt12x1"] {
            assert_eq!(harness_pid(other), None, "{other}");
        }
    }

    #[test]
    fn a_live_runs_names_are_not_orphaned() {
        assert!(!orphaned(&format!("wt{}x0sw", std::process::id())));
        assert!(!orphaned("wt1x0sw"), "pid 1 runs");
        assert!(!orphaned("not-ours"));
    }

    fn root() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
        if !root {
            eprintln!("SKIPPED clean removes only dead runs' debris: needs root");
        }
        root
    }

    fn ok(cmd: &mut Command) {
        assert!(cmd.status().is_ok_and(|s| s.success()), "{cmd:?}");
    }

    /// Debris of a run that was SIGKILLed (a pid above pid_max: surely gone)
    /// beside a live run's (ours): clean removes the first, all of it, and
    /// leaves the second alone.
    #[test]
    fn clean_removes_only_dead_runs_debris() {
        if !root() {
            return;
        }
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
        let dead = format!("wt{}x", pid_max + 7);
        let live = format!("wt{}x", std::process::id());
        let tmp = std::env::temp_dir();
        for p in [&dead, &live] {
            ok(Command::new("ip").args(["netns", "add", &format!("{p}0sw")]));
            std::fs::create_dir_all(tmp.join(format!("{p}1dk/exec"))).unwrap();
            std::fs::write(tmp.join(format!("{p}2ag.log")), "log").unwrap();
            std::fs::create_dir_all(Path::new(PIN_ROOT).join(format!("{p}3host1"))).unwrap();
        }
        // A killed container's cgroup below a dead dockerd's parent cgroup.
        let cgroup_hierarchy = ["memory", "pids", ""].iter().map(|c| Path::new(CGROUP_ROOT).join(c)).find(|p| p.join("cgroup.procs").exists());
        let dead_cgroup = cgroup_hierarchy.as_ref().map(|h| h.join(format!("{dead}1dk")));
        let live_cgroup = cgroup_hierarchy.as_ref().map(|h| h.join(format!("{live}1dk")));
        for c in dead_cgroup.iter().chain(&live_cgroup) {
            std::fs::create_dir_all(c.join("0123abcd")).unwrap();
        }
        // A mount under the dead run's dockerd directory, a "containerd" naming
        // it, a "container" below that, and a process inside its namespace.
        let mnt = tmp.join(format!("{dead}1dk/exec/netns"));
        std::fs::create_dir_all(&mnt).unwrap();
        ok(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&mnt));
        use std::os::unix::process::CommandExt;
        let sock = tmp.join(format!("{dead}1dk/exec/containerd.sock"));
        let mut containerd = Command::new("sh").arg0(&sock).args(["-c", "sleep 600 & wait"]).spawn().unwrap();
        let mut in_ns = Command::new("nsenter").arg(format!("--net=/run/netns/{dead}0sw")).args(["sleep", "600"]).spawn().unwrap();
        let mut live_proc = Command::new("sleep").arg0(tmp.join(format!("{live}1dk/dockerd"))).arg("600").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));

        let removed = clean();
        let exited = |c: &mut std::process::Child| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        };
        let (containerd_gone, in_ns_gone) = (exited(&mut containerd), exited(&mut in_ns));
        let live_alive = live_proc.try_wait().ok().flatten().is_none();
        let _ = live_proc.kill();
        let _ = live_proc.wait();
        let dead_left: Vec<String> = [
            format!("/run/netns/{dead}0sw"),
            tmp.join(format!("{dead}1dk")).display().to_string(),
            tmp.join(format!("{dead}2ag.log")).display().to_string(),
            format!("{PIN_ROOT}/{dead}3host1"),
        ]
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect();
        let live_kept = Path::new(&format!("/run/netns/{live}0sw")).exists()
            && tmp.join(format!("{live}1dk")).exists()
            && tmp.join(format!("{live}2ag.log")).exists()
            && Path::new(PIN_ROOT).join(format!("{live}3host1")).exists();
        let _ = Command::new("ip").args(["netns", "del", &format!("{live}0sw")]).status();
        let _ = std::fs::remove_dir_all(tmp.join(format!("{live}1dk")));
        let _ = std::fs::remove_file(tmp.join(format!("{live}2ag.log")));
        let _ = std::fs::remove_dir_all(Path::new(PIN_ROOT).join(format!("{live}3host1")));
        let still_mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&dead);
        let cgroup_left = dead_cgroup.as_ref().is_some_and(|c| c.exists());
        let live_cgroup_kept = live_cgroup.as_ref().is_none_or(|c| c.join("0123abcd").exists());
        if let Some(c) = &live_cgroup {
            rmdir_tree(c);
        }

        assert!(dead_left.is_empty(), "left: {dead_left:?}; removed: {removed:#?}");
        assert!(containerd_gone && in_ns_gone, "processes of the dead run still run; removed: {removed:#?}");
        assert!(!still_mounted, "a mount of the dead run is left");
        assert!(!cgroup_left, "the dead run's cgroup is left: {removed:#?}");
        assert!(live_kept && live_alive && live_cgroup_kept, "a live run's debris was touched: {removed:#?}");
    }
}

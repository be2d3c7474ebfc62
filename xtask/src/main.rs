//! `cargo xtask`: the project's commands.
//!
//! - `cargo xtask build-ebpf`         compile ebpf/ with clang-19 into target/ebpf
//! - `cargo xtask test [FILTER]`      install what is missing, run every test (or those matching FILTER)
//! - `cargo xtask demo`               install, build, run the simulated multi-host demo
//! - `cargo xtask bench NAME`         run a benchmark (datapath, ...)
//! - `cargo xtask clean`              remove what crashed or killed runs left (see clean.rs)
//!
//! Tests, demo and benchmarks need root: network namespaces and eBPF.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

mod clean;

/// Debian packages every test, the demo or a benchmark needs.
const PACKAGES: &[&str] = &[
    "clang-19",
    "llvm-19",
    "bpftool",
    "libbpf-dev",
    "linux-libc-dev",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "tcpdump",
    "nftables",
    "dnsutils",
    "dnsmasq-base",
    "dnsperf",
    "procps",
    // Docker: a real engine per simulated host; busybox is the test image.
    "docker.io",
    "containerd",
    "runc",
    "tini",
    "busybox-static",
    // AWS: moto, awscli and cfn-lint from PyPI in a venv (see aws_venv).
    "python3-venv",
    // The ECS user data and the systemd unit, booted under a real systemd.
    "systemd-container",
    "curl",
];

/// The PyPI packages of the AWS tests.
const PYPI: &[&str] = &["moto[server]", "awscli", "cfn-lint"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-ebpf") => build_ebpf(),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("install-deps") => install_deps(PACKAGES),
        Some("clean") => clean(),
        _ => {
            eprintln!(
                "usage: cargo xtask build-ebpf | test [FILTER...] | demo | bench NAME | clean | install-deps"
            );
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    xtask::workspace_root()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn build_ebpf() -> Result<()> {
    let out = target_dir().join("ebpf");
    let objects = xtask::build_ebpf(&root().join("ebpf"), &out)?;
    for object in objects {
        let size = std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0);
        println!("{} ({size} bytes)", object.display());
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("1");
    if euid != "0" {
        bail!("{what} needs root (network namespaces, eBPF, apt): run it as root");
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the Debian packages that are missing (apt-get update first if the
/// package lists are stale).
fn install_deps(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root("installing packages")?;
    eprintln!("installing {}", missing.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if install().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    // Stale lists give 404s: refresh once and retry.
    let update = Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update"]).status()?;
    if !update.success() || !install()?.success() {
        bail!("apt-get could not install {}", missing.join(" "));
    }
    Ok(())
}

fn mount_bpffs() -> Result<()> {
    let mounted = Command::new("mountpoint").args(["-q", "/sys/fs/bpf"]).status()?.success();
    if !mounted {
        let ok = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?.success();
        if !ok {
            bail!("cannot mount bpffs at /sys/fs/bpf");
        }
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Replaces this process with `cmd`: a Ctrl-C or a closed terminal then
/// reaches the demo, bench or test runner alone, which tears down before it
/// exits, instead of also ending xtask and giving the shell back mid-teardown.
fn exec(cmd: &mut Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let error = cmd.exec();
    Err(error).with_context(|| format!("cannot run {cmd:?}"))
}

fn has_nextest() -> bool {
    cargo().args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success())
}

/// Prepares the machine for tests, the demo and benchmarks.
fn prepare(what: &str) -> Result<()> {
    require_root(what)?;
    install_deps(PACKAGES)?;
    mount_bpffs()?;
    xtask::check_toolchain()?;
    Ok(())
}

/// The venv with moto, awscli and cfn-lint for the AWS tests (outside the
/// clone, so it is made once per machine): `WEFT_AWS_VENV` or
/// /var/cache/weft/aws-venv. Made if missing.
fn aws_venv() -> Result<PathBuf> {
    let dir = std::env::var_os("WEFT_AWS_VENV").map_or_else(|| PathBuf::from("/var/cache/weft/aws-venv"), PathBuf::from);
    let ready = ["bin/moto_server", "bin/aws", "bin/cfn-lint"].iter().all(|b| dir.join(b).exists());
    if ready {
        return Ok(dir);
    }
    eprintln!("installing {} into {}", PYPI.join(" "), dir.display());
    // In place (a venv's scripts name its python by path); an interrupted
    // install lacks one of the scripts above and is simply redone.
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(dir.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check"]).args(PYPI))?;
    Ok(dir)
}

/// Removes what earlier runs that crashed or were killed left, saying what.
fn clean() -> Result<()> {
    require_root("cargo xtask clean")?;
    report_clean();
    Ok(())
}

fn report_clean() {
    let removed = clean::clean();
    if removed.is_empty() {
        eprintln!("clean: nothing left by earlier runs");
    } else {
        eprintln!("clean: removed {} things earlier runs left behind:", removed.len());
        for r in removed {
            eprintln!("  {r}");
        }
    }
}

fn test(filters: &[String]) -> Result<()> {
    prepare("cargo xtask test")?;
    // Debris of killed runs (namespaces, pins, dockerds) would disturb this one.
    report_clean();
    let venv = aws_venv()?;
    // The integration tests run the agent binary; cargo builds a package's
    // binaries only for that package's own tests, so build it explicitly. With
    // the `aws` feature (the AWS tests need it), the same for every crate so
    // nothing is built twice.
    run(cargo().args(["build", "-p", "weft", "--bin", "weft", "--features", "weft/aws"]))?;
    // Lints are part of the suite: a warning fails it.
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--features", "weft/aws", "--", "-D", "warnings"]))?;
    if has_nextest() {
        // Every test in its own process: namespaces entered by one cannot leak
        // into another, and a crash takes one test down, not the run.
        exec(cargo()
            .args(["nextest", "run", "--workspace", "--features", "weft/aws", "--no-fail-fast", "--profile", "ci"])
            .args(filters)
            .env("WEFT_AWS_VENV", &venv))
    } else {
        eprintln!("cargo-nextest not found: falling back to cargo test");
        let mut cmd = cargo();
        cmd.args(["test", "--workspace", "--features", "weft/aws", "--no-fail-fast"]).env("WEFT_AWS_VENV", &venv);
        if let Some(filter) = filters.first() {
            cmd.arg(filter);
        }
        exec(&mut cmd)
    }
}

fn demo(args: &[String]) -> Result<()> {
    prepare("cargo xtask demo")?;
    run(cargo().args(["build", "--release", "-p", "weft", "-p", "weft-tests", "--bin", "weft", "--bin", "weft-demo"]))?;
    let bin = target_dir().join("release");
    exec(Command::new(bin.join("weft-demo")).args(args).env("WEFT_BIN", bin.join("weft")))
}

fn bench(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        bail!("usage: cargo xtask bench NAME (datapath, mesh, ipam, dns, attach)");
    };
    prepare("cargo xtask bench")?;
    run(cargo().args(["build", "--release", "-p", "weft", "-p", "weft-tests", "--bin", "weft", "--bin", "weft-bench"]))?;
    let bin = target_dir().join("release");
    exec(Command::new(bin.join("weft-bench")).arg(name).args(&args[1..]).env("WEFT_BIN", bin.join("weft")))
}

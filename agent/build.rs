//! Compiles ebpf/ with the same code as `cargo xtask build-ebpf`, so a plain
//! `cargo build` embeds programs that match the sources; and builds weft-wait
//! (agent/wait/), the freestanding helper the Docker proxy puts in containers.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let src = manifest.parent().expect("agent/ is in the workspace").join("ebpf");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-changed={}", src.display());
    if let Err(error) = xtask::build_ebpf(&src, &out) {
        // One clear line (cargo shows it) instead of a panic backtrace.
        eprintln!("error: building the eBPF programs: {error}");
        std::process::exit(1);
    }
    let wait = manifest.join("wait/weft-wait.rs");
    println!("cargo:rerun-if-changed={}", wait.display());
    if let Err(error) = build_wait(&wait, &out.join("weft-wait")) {
        eprintln!("error: building weft-wait: {error}");
        std::process::exit(1);
    }
}

/// A static, libc-free executable of a few kilobytes: it runs in any image.
fn build_wait(src: &Path, out: &Path) -> Result<(), String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").map_err(|e| format!("TARGET: {e}"))?;
    let mut cmd = Command::new(&rustc);
    cmd.args(["--edition", "2024", "--crate-type", "bin", "--crate-name", "weft_wait", "--target", &target])
        .args(["-C", "panic=abort", "-C", "opt-level=s", "-C", "relocation-model=static"])
        .args(["-C", "target-feature=+crt-static", "-C", "strip=symbols", "-C", "debuginfo=0"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .args(["-C", "link-arg=-Wl,--gc-sections", "-C", "link-arg=-Wl,--build-id=none"])
        .arg("-o")
        .arg(out)
        .arg(src)
        // Cargo's own flags for the agent (coverage, sanitizers) do not apply here.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    let res = cmd.output().map_err(|e| format!("cannot run {rustc}: {e}"))?;
    if !res.status.success() {
        return Err(String::from_utf8_lossy(&res.stderr).into_owned());
    }
    Ok(())
}

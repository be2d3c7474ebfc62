//! Compiles ebpf/ with the same code as `cargo xtask build-ebpf`, so a plain
//! `cargo build` embeds programs that match the sources.

use std::path::PathBuf;

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
}

//! Build logic shared by `cargo xtask` and `agent/build.rs`: compiling the eBPF
//! programs in `ebpf/` with clang-19. Kept free of dependencies so the agent's
//! build script stays cheap.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel programs: one C file per attach point, plus the test probe.
pub const EBPF_OBJECTS: &[&str] = &["endpoint", "overlay", "underlay", "tests/probe"];

/// The clang the programs are built and tested with (Debian's `clang-19`).
pub const CLANG: &str = "clang-19";

/// Why the eBPF programs could not be built.
#[derive(Debug)]
pub enum BuildError {
    /// A tool or header is missing; `package` is the Debian package that has it.
    Missing { what: String, package: &'static str },
    /// clang ran and failed.
    Compile { source: PathBuf, stderr: String },
    /// clang could not be started or the output could not be written.
    Io { op: String, error: std::io::Error },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Missing { what, package } => write!(
                f,
                "{what} not found: install it with `apt-get install {package}` \
                 (`cargo xtask test` and `cargo xtask demo` install it for you)"
            ),
            BuildError::Compile { source, stderr } => {
                write!(f, "{CLANG} failed on {}:\n{stderr}", source.display())
            }
            BuildError::Io { op, error } => write!(f, "{op}: {error}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// Files whose presence says the eBPF toolchain is installed, with their packages.
const REQUIRED: &[(&str, &str)] = &[
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
    ("/usr/include/linux/bpf.h", "linux-libc-dev"),
    ("/usr/include/x86_64-linux-gnu/asm/types.h", "linux-libc-dev"),
];

/// Checks that clang-19 and the headers are present.
pub fn check_toolchain() -> Result<(), BuildError> {
    let clang = Command::new(CLANG).arg("--version").output();
    if !matches!(clang, Ok(ref out) if out.status.success()) {
        return Err(BuildError::Missing { what: CLANG.into(), package: "clang-19" });
    }
    for (file, package) in REQUIRED {
        if !Path::new(file).exists() {
            return Err(BuildError::Missing { what: (*file).into(), package });
        }
    }
    Ok(())
}

/// Compiles every program in `src` (the `ebpf/` folder) into `out/<name>.o` and
/// returns the objects' paths. `<name>` is the file name without folders, so
/// `tests/probe.c` becomes `out/probe.o`.
pub fn build_ebpf(src: &Path, out: &Path) -> Result<Vec<PathBuf>, BuildError> {
    check_toolchain()?;
    std::fs::create_dir_all(out)
        .map_err(|error| BuildError::Io { op: format!("create {}", out.display()), error })?;
    let mut objects = Vec::new();
    for name in EBPF_OBJECTS {
        let source = src.join(format!("{name}.c"));
        let stem = Path::new(name).file_name().expect("object names have a file name");
        let object = out.join(stem).with_extension("o");
        let output = Command::new(CLANG)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Wextra", "-Werror"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-I")
            .arg(src.join("include"))
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .output()
            .map_err(|error| BuildError::Io { op: format!("run {CLANG}"), error })?;
        if !output.status.success() {
            return Err(BuildError::Compile {
                source,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        objects.push(object);
    }
    Ok(objects)
}

/// The workspace root (the folder above `xtask/`).
pub fn workspace_root() -> PathBuf {
    // The run-time value first (`cargo run` sets it): with build output shared
    // between checkouts (CARGO_TARGET_DIR outside the clone) a binary built from
    // another checkout can be reused, and its compile-time path names that one.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.parent().expect("xtask lives one level below the workspace root").to_path_buf()
}

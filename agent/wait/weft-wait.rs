//! weft-wait: runs a container's application only once its overlay interface is
//! ready, so the application's first packet already goes over weft.
//!
//! The Docker API proxy bind-mounts this program into containers it creates as
//! `/w/w` and puts it in front of the entrypoint (Weave's `weavewait` did the
//! same). It waits until `ethwe` is up, has its carrier and has an IPv4 address
//! (weft adds the address last, after the routes), then `execve`s the original
//! command in place: same pid, same environment, same file descriptors, so
//! signals, exit codes and `docker attach` behave as without it.
//!
//! It must run in any image (busybox, distroless, `FROM scratch`), so it is built
//! freestanding: no libc, a few raw system calls, a static executable of a few
//! kilobytes (see `agent/build.rs`). x86_64 and aarch64.
//!
//! `WEFT_CIDR=none` (or `WEAVE_CIDR=none`) in the environment: no wait.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

#[cfg(target_arch = "x86_64")]
global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call weft_wait_main",
    "ud2",
);

#[cfg(target_arch = "aarch64")]
global_asm!(
    ".globl _start",
    "_start:",
    "mov x29, #0",
    "mov x30, #0",
    "mov x0, sp",
    "bl weft_wait_main",
    "brk #0",
);

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const WRITE: usize = 1;
    pub const CLOSE: usize = 3;
    pub const IOCTL: usize = 16;
    pub const NANOSLEEP: usize = 35;
    pub const SOCKET: usize = 41;
    pub const EXECVE: usize = 59;
    pub const EXIT_GROUP: usize = 231;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const WRITE: usize = 64;
    pub const CLOSE: usize = 57;
    pub const IOCTL: usize = 29;
    pub const NANOSLEEP: usize = 101;
    pub const SOCKET: usize = 198;
    pub const EXECVE: usize = 221;
    pub const EXIT_GROUP: usize = 94;
}

#[cfg(target_arch = "x86_64")]
unsafe fn syscall3(n: usize, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a, in("rsi") b, in("rdx") c,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

#[cfg(target_arch = "aarch64")]
unsafe fn syscall3(n: usize, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    unsafe {
        asm!("svc 0", in("x8") n, inlateout("x0") a as isize => ret, in("x1") b, in("x2") c, options(nostack));
    }
    ret
}

const AF_INET: usize = 2;
const SOCK_DGRAM: usize = 2;
const SOCK_CLOEXEC: usize = 0o2000000;
const SIOCGIFFLAGS: usize = 0x8913;
const SIOCGIFADDR: usize = 0x8915;
const IFF_UP: u16 = 0x1;
const IFF_RUNNING: u16 = 0x40;
const ENOENT: isize = 2;
const EACCES: isize = 13;
const ENOTDIR: isize = 20;

const IFNAME: &[u8] = b"ethwe";
/// Between two looks at the interface.
const POLL_NS: usize = 2_000_000;
/// After this many looks (10 s), say once what we wait for.
const TELL_AFTER: usize = 5_000;

fn write(fd: usize, s: &[u8]) {
    unsafe { syscall3(nr::WRITE, fd, s.as_ptr() as usize, s.len()) };
}

fn exit(code: usize) -> ! {
    loop {
        unsafe { syscall3(nr::EXIT_GROUP, code, 0, 0) };
    }
}

fn sleep_ns(ns: usize) {
    let ts = [0usize, ns];
    unsafe { syscall3(nr::NANOSLEEP, ts.as_ptr() as usize, 0, 0) };
}

/// A NUL-terminated C string as bytes (without the NUL).
unsafe fn cstr<'a>(p: *const u8) -> &'a [u8] {
    let mut n = 0;
    unsafe {
        // Volatile: keeps the optimiser from calling strlen, which is not here.
        while core::ptr::read_volatile(p.add(n)) != 0 {
            n += 1;
        }
        core::slice::from_raw_parts(p, n)
    }
}

/// Whether the interface is up, has carrier and an IPv4 address.
fn ready(fd: usize) -> bool {
    // struct ifreq: 16 bytes of name, then a 24-byte union.
    let mut ifr = [0u8; 40];
    ifr[..IFNAME.len()].copy_from_slice(IFNAME);
    if unsafe { syscall3(nr::IOCTL, fd, SIOCGIFFLAGS, ifr.as_mut_ptr() as usize) } != 0 {
        return false;
    }
    let flags = u16::from_ne_bytes([ifr[16], ifr[17]]);
    if flags & (IFF_UP | IFF_RUNNING) != IFF_UP | IFF_RUNNING {
        return false;
    }
    unsafe { syscall3(nr::IOCTL, fd, SIOCGIFADDR, ifr.as_mut_ptr() as usize) == 0 }
}

fn wait_for_interface() {
    let fd = unsafe { syscall3(nr::SOCKET, AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0) };
    if fd < 0 {
        write(2, b"weft-wait: cannot open a socket to look at ethwe; starting without waiting\n");
        return;
    }
    let fd = fd as usize;
    let mut looks = 0;
    while !ready(fd) {
        looks += 1;
        if looks == TELL_AFTER {
            write(2, b"weft-wait: still waiting for the ethwe interface (is the weft agent running on this host?)\n");
        }
        sleep_ns(POLL_NS);
    }
    unsafe { syscall3(nr::CLOSE, fd, 0, 0) };
}

/// The value of `NAME=` in the environment.
unsafe fn getenv<'a>(envp: *const *const u8, name: &[u8]) -> Option<&'a [u8]> {
    let mut i = 0;
    loop {
        let p = unsafe { *envp.add(i) };
        if p.is_null() {
            return None;
        }
        let kv = unsafe { cstr(p) };
        if kv.len() > name.len() && kv[name.len()] == b'=' && &kv[..name.len()] == name {
            return Some(&kv[name.len() + 1..]);
        }
        i += 1;
    }
}

/// `execve`, searching `PATH` for a name without a slash as execvp does.
unsafe fn exec(argv: *const *const u8, envp: *const *const u8) -> ! {
    let file = unsafe { cstr(*argv) };
    if file.contains(&b'/') || file.is_empty() {
        let e = unsafe { syscall3(nr::EXECVE, *argv as usize, argv as usize, envp as usize) };
        fail(file, e);
    }
    let path = unsafe { getenv(envp, b"PATH") }.unwrap_or(b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mut buf = [0u8; 4096];
    let mut last = -ENOENT;
    for dir in path.split(|b| *b == b':') {
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let len = dir.len() + 1 + file.len();
        if len + 1 > buf.len() {
            continue;
        }
        buf[..dir.len()].copy_from_slice(dir);
        buf[dir.len()] = b'/';
        buf[dir.len() + 1..len].copy_from_slice(file);
        buf[len] = 0;
        let e = unsafe { syscall3(nr::EXECVE, buf.as_ptr() as usize, argv as usize, envp as usize) };
        match -e {
            ENOENT | ENOTDIR => {}
            EACCES => last = e,
            _ => fail(file, e),
        }
    }
    fail(file, last)
}

fn fail(file: &[u8], e: isize) -> ! {
    write(2, b"weft-wait: cannot run ");
    write(2, file);
    write(2, if -e == ENOENT { b": not found\n".as_slice() } else { b": permission denied or not executable\n" });
    exit(if -e == ENOENT { 127 } else { 126 })
}

/// # Safety
/// Called once, from `_start`, with the initial stack pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn weft_wait_main(sp: *const usize) -> ! {
    let argc = unsafe { *sp };
    let argv = unsafe { sp.add(1) } as *const *const u8;
    let envp = unsafe { argv.add(argc + 1) };
    if argc < 2 {
        write(2, b"usage: weft-wait COMMAND [ARG...]: waits for ethwe, then runs COMMAND\n");
        exit(127);
    }
    let none = |name: &[u8]| unsafe { getenv(envp, name) }.is_some_and(|v| v.trim_ascii() == b"none");
    if !(none(b"WEFT_CIDR") || none(b"WEAVE_CIDR")) {
        wait_for_interface();
    }
    unsafe { exec(argv.add(1), envp) }
}

// What the compiler may call for copies and clears (no libc here).
#[unsafe(no_mangle)]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        // Volatile: keeps the optimiser from turning this loop into a call to itself.
        unsafe { core::ptr::write_volatile(dst.add(i), *src.add(i)) };
        i += 1;
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        unsafe { core::ptr::write_volatile(dst.add(i), c as u8) };
        i += 1;
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

#[unsafe(no_mangle)]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}

// libcore is built with unwinding tables that name this; nothing unwinds here.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    write(2, b"weft-wait: internal error\n");
    exit(127)
}

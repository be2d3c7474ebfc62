//! The run's teardown: one process-wide stack of cleanup actions, so what the
//! harness makes (namespaces, pin directories, agents, dockerds, temp
//! directories) is undone however the run ends.
//!
//! Every guard of the harness ([`crate::Netns`], [`crate::Host`],
//! [`crate::agent::Agent`], [`crate::docker::Dockerd`], [`TempPath`], [`Proc`])
//! registers its undo action here when it creates its resource and holds a
//! [`Cleanup`] token. Dropping the token (a normal end, a panic unwinding) runs
//! that one action; SIGINT, SIGTERM or SIGHUP run every action still registered,
//! newest first, each bounded in time, and then exit with 128 + the signal
//! number. Both paths run the same closure: there is one copy of each undo.
//! A second signal during teardown sets [`hurry`]: actions that wait (a dockerd
//! stopping its containers) cut their waits short and kill instead, still
//! leaving nothing behind.
//!
//! Creation goes through [`create`], which registers the undo *before* making the
//! resource and keeps teardown from starting while a resource is half made, so a
//! signal in the middle of setup cannot leak what was being made.
//!
//! This module owns the stack, the signal thread and the panic hook (which keeps
//! a thread that panics because teardown took its resources away quiet and
//! parked until the process exits). It knows nothing of what the actions do.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

type Action = Box<dyn FnOnce() + Send + 'static>;

struct Entry {
    id: u64,
    label: String,
    action: Action,
}

#[derive(Default)]
struct State {
    /// Registered actions, oldest first.
    entries: Vec<Entry>,
    next_id: u64,
    /// A signal arrived: the signal thread owns the stack from now on.
    tearing_down: bool,
    /// Threads inside [`create`] or running an action outside the signal thread.
    busy: usize,
}

static STATE: Mutex<State> = Mutex::new(State { entries: Vec::new(), next_id: 1, tearing_down: false, busy: 0 });
static CHANGED: Condvar = Condvar::new();
static HURRY: AtomicBool = AtomicBool::new(false);
static INSTALLED: OnceLock<()> = OnceLock::new();

thread_local! {
    /// How deep this thread is inside [`create`].
    static CREATING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// How long one teardown step may take before teardown moves on (it says so).
const STEP_BOUND: Duration = Duration::from_secs(40);
/// The same after a second signal.
const STEP_BOUND_HURRIED: Duration = Duration::from_secs(10);
/// How long teardown waits for a resource being made, or an action another
/// thread is running, to finish.
const BUSY_BOUND: Duration = Duration::from_secs(30);

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// True once a second signal asked teardown to go faster: waits should end and
/// processes be killed instead.
pub fn hurry() -> bool {
    HURRY.load(Ordering::Relaxed)
}

/// True once a signal started the teardown.
pub fn tearing_down() -> bool {
    state().tearing_down
}

/// Parks this thread for good: teardown owns the run and ends the process.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// A registered undo action; dropping it (or [`Cleanup::run`]) runs the action
/// once, unless teardown already did.
#[must_use = "dropping the token runs the cleanup at once"]
pub struct Cleanup {
    id: u64,
}

impl std::fmt::Debug for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cleanup#{}", self.id)
    }
}

impl Cleanup {
    /// A token that undoes nothing.
    pub fn none() -> Cleanup {
        Cleanup { id: 0 }
    }

    /// Runs the action now (the same as dropping the token).
    pub fn run(self) {
        drop(self);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.id == 0 {
            return;
        }
        let entry = {
            let mut st = state();
            if st.tearing_down {
                // The signal thread runs it, in order; the process ends after.
                drop(st);
                park_forever();
            }
            let Some(pos) = st.entries.iter().position(|e| e.id == self.id) else { return };
            st.busy += 1;
            st.entries.remove(pos)
        };
        let _busy = Busy;
        (entry.action)();
    }
}

/// Counts this thread as busy until dropped (also on unwind).
struct Busy;

impl Drop for Busy {
    fn drop(&mut self) {
        state().busy -= 1;
        CHANGED.notify_all();
    }
}

/// Registers `undo` for something that already exists (or needs no making).
pub fn register(label: impl Into<String>, undo: impl FnOnce() + Send + 'static) -> Cleanup {
    create(label, undo, || ()).0
}

/// Registers `undo`, then runs `make` (which creates what `undo` removes).
/// Teardown does not start while `make` runs, and `undo` is registered first, so
/// whatever `make` got done, even halfway before a panic, is undone. Blocks for
/// good if teardown has started (the process is ending).
pub fn create<T>(label: impl Into<String>, undo: impl FnOnce() + Send + 'static, make: impl FnOnce() -> T) -> (Cleanup, T) {
    install();
    let token = {
        let mut st = state();
        if st.tearing_down {
            drop(st);
            park_forever();
        }
        let id = st.next_id;
        st.next_id += 1;
        st.busy += 1;
        st.entries.push(Entry { id, label: label.into(), action: Box::new(undo) });
        Cleanup { id }
    };
    let _busy = Busy;
    CREATING.with(|c| c.set(c.get() + 1));
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            CREATING.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
    let _depth = Depth;
    let made = make();
    (token, made)
}

/// Runs every registered action now, newest first, saying so on stderr with
/// progress: the demo's and the benches' normal end, the same steps a signal
/// runs. If a signal starts the teardown meanwhile, its thread takes over.
pub fn teardown() {
    drain(false);
}

/// Pops and runs actions until none is left (also those registered meanwhile),
/// each on its own thread, bounded in time. Off the signal thread, each step
/// counts as busy (a signal's teardown waits for it), and a signal's teardown,
/// once started, takes over.
fn drain(on_signal: bool) {
    let started = Instant::now();
    let total = state().entries.len();
    if total > 0 && !on_signal {
        say(&format!("tearing down… ({total} steps)"));
    }
    let mut n = 0;
    loop {
        let entry = {
            let mut st = state();
            if st.tearing_down && !on_signal {
                drop(st);
                park_forever();
            }
            let Some(entry) = st.entries.pop() else { break };
            if !on_signal {
                st.busy += 1;
            }
            entry
        };
        let busy = if on_signal { None } else { Some(Busy) };
        n += 1;
        let t0 = Instant::now();
        let label = entry.label;
        let (tx, rx) = std::sync::mpsc::channel();
        let action = entry.action;
        let spawned = std::thread::Builder::new().name("teardown".into()).spawn(move || {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(action)).is_ok();
            let _ = tx.send(ok);
        });
        let bound = if hurry() { STEP_BOUND_HURRIED } else { STEP_BOUND };
        let outcome = match spawned {
            Err(e) => format!("could not run: {e}"),
            Ok(_) => match recv_bounded(&rx, bound) {
                Some(true) => format!("{:.1?}", t0.elapsed()),
                Some(false) => "failed (see above)".into(),
                None => format!("still running after {bound:?}: moving on"),
            },
        };
        drop(busy);
        say(&format!("  [{n}/{}] {label} … {outcome}", total.max(n)));
    }
    if n > 0 {
        say(&format!("torn down in {:.1?}", started.elapsed()));
    }
}

/// Waits for the step's result, waking early to shorten the bound after a
/// second signal.
fn recv_bounded(rx: &std::sync::mpsc::Receiver<bool>, bound: Duration) -> Option<bool> {
    let t0 = Instant::now();
    loop {
        let limit = if hurry() { bound.min(STEP_BOUND_HURRIED) } else { bound };
        let left = limit.checked_sub(t0.elapsed())?;
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(ok) => return Some(ok),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Some(false),
        }
    }
}

/// A progress line on stderr; a closed terminal (SIGHUP) is no reason to stop.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The signal path: waits for half-made resources and running actions, runs
/// the rest, exits with 128 + `signo`.
fn teardown_on_signal(name: &str, signo: i32) -> ! {
    {
        let mut st = state();
        st.tearing_down = true;
        say(&format!("\n{name}: tearing down… (again to hurry)"));
        let deadline = Instant::now() + BUSY_BOUND;
        while st.busy > 0 && Instant::now() < deadline && !hurry() {
            st = CHANGED.wait_timeout(st, Duration::from_millis(200)).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
    drain(true);
    let _ = std::io::stdout().flush();
    std::process::exit(128 + signo);
}

/// Starts the signal thread and the panic hook (once per process; [`create`]
/// calls it). Returns once the signal handlers are in place.
pub fn install() {
    INSTALLED.get_or_init(|| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || signal_thread(ready_tx));
        if spawned.is_ok() {
            let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if tearing_down() {
                // Teardown took this thread's resources away; its panic is noise.
                // Inside `create` it must unwind (teardown waits for it);
                // elsewhere it waits here for the process to end.
                if CREATING.with(std::cell::Cell::get) == 0 {
                    park_forever();
                }
                return;
            }
            previous(info);
        }));
    });
}

fn signal_thread(ready: std::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("weft-tests: no signal handling ({e}): a Ctrl-C leaves things behind"));
            return;
        }
    };
    rt.block_on(async move {
        let kinds = [("SIGINT", 2, SignalKind::interrupt()), ("SIGTERM", 15, SignalKind::terminate()), ("SIGHUP", 1, SignalKind::hangup())];
        let mut streams = Vec::new();
        for (name, no, kind) in kinds {
            match signal(kind) {
                Ok(s) => streams.push((name, no, s)),
                Err(e) => say(&format!("weft-tests: cannot handle {name} ({e})")),
            }
        }
        let _ = ready.send(());
        let mut first = true;
        loop {
            let next = futures_first(&mut streams).await;
            let Some((name, no)) = next else { return };
            if first {
                first = false;
                let _ = std::thread::Builder::new().name("teardown".into()).spawn(move || teardown_on_signal(name, no));
            } else if !HURRY.swap(true, Ordering::Relaxed) {
                say(&format!("{name} again: hurrying (killing instead of waiting; still removing everything)"));
            }
        }
    });
}

/// The first of the signal streams to fire.
async fn futures_first(streams: &mut [(&'static str, i32, tokio::signal::unix::Signal)]) -> Option<(&'static str, i32)> {
    if streams.is_empty() {
        return None;
    }
    std::future::poll_fn(|cx| {
        for (name, no, s) in streams.iter_mut() {
            if let std::task::Poll::Ready(got) = s.poll_recv(cx) {
                return std::task::Poll::Ready(got.map(|()| (*name, *no)));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// A child process of the run, killed (or stopped the way its owner said) when
/// dropped or at teardown. Started in its own process group, so a Ctrl-C in
/// the terminal reaches only the run, which then stops it in order.
pub struct Proc {
    child: Arc<Mutex<Option<Child>>>,
    pid: u32,
    _cleanup: Cleanup,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proc({})", self.pid)
    }
}

fn lock_child(c: &Mutex<Option<Child>>) -> MutexGuard<'_, Option<Child>> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Proc {
    /// Spawns `cmd`; `stop` ends it (at drop or teardown).
    pub fn spawn(label: impl Into<String>, cmd: &mut Command, stop: impl FnOnce(&mut Child) + Send + 'static) -> std::io::Result<Proc> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let slot: Arc<Mutex<Option<Child>>> = Arc::new(Mutex::new(None));
        let theirs = Arc::clone(&slot);
        let undo = move || {
            if let Some(mut child) = lock_child(&theirs).take() {
                stop(&mut child);
            }
        };
        let (cleanup, spawned) = create(label, undo, || -> std::io::Result<u32> {
            let child = cmd.spawn()?;
            let pid = child.id();
            *lock_child(&slot) = Some(child);
            Ok(pid)
        });
        Ok(Proc { child: slot, pid: spawned?, _cleanup: cleanup })
    }

    /// Spawns `cmd`, killed with SIGKILL at drop or teardown.
    pub fn spawn_killed(label: impl Into<String>, cmd: &mut Command) -> std::io::Result<Proc> {
        Proc::spawn(label, cmd, kill_and_reap)
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The exit status, if it ended (and was reaped).
    pub fn try_wait(&self) -> Option<ExitStatus> {
        lock_child(&self.child).as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for it to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        crate::wait_until(timeout, || {
            status = self.try_wait();
            status.is_some()
        });
        status
    }

    /// The child's piped stdout, once.
    pub fn take_stdout(&self) -> Option<std::process::ChildStdout> {
        lock_child(&self.child).as_mut().and_then(|c| c.stdout.take())
    }

    /// The child's piped stderr, once.
    pub fn take_stderr(&self) -> Option<std::process::ChildStderr> {
        lock_child(&self.child).as_mut().and_then(|c| c.stderr.take())
    }

    /// Sends `signal` if it still runs (not reaped, so the pid is still ours).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let mut child = lock_child(&self.child);
        if let Some(c) = child.as_mut()
            && c.try_wait().ok().flatten().is_none()
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal);
        }
    }
}

/// SIGKILL and reap (a child already reaped is left alone).
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A path in the temp directory removed (with whatever is mounted under it)
/// at drop or teardown.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    _cleanup: Cleanup,
}

impl TempPath {
    /// `<temp>/<name>`, to be made by its user (a file, a state directory).
    pub fn new(name: &str) -> TempPath {
        let path = std::env::temp_dir().join(name);
        let theirs = path.clone();
        let cleanup = register(format!("removing {}", path.display()), move || remove_tree(&theirs));
        TempPath { path, _cleanup: cleanup }
    }

    /// `<temp>/<name>`, made now as a directory.
    pub fn dir(name: &str) -> std::io::Result<TempPath> {
        let path = std::env::temp_dir().join(name);
        let theirs = path.clone();
        let (cleanup, made) =
            create(format!("removing {}", path.display()), move || remove_tree(&theirs), || std::fs::create_dir_all(&path));
        made?;
        Ok(TempPath { path, _cleanup: cleanup })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

/// Unmounts everything mounted at or under `path` (deepest first), then
/// removes it, file or directory.
pub fn remove_tree(path: &Path) {
    for m in mounts_under(path) {
        let _ = Command::new("umount").args(["-l"]).arg(&m).status();
    }
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// Mount points at or under `path`, deepest first.
pub fn mounts_under(path: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = path.display().to_string();
    let mut ours: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == dir || m.starts_with(&format!("{dir}/")))
        .map(str::to_string)
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
    ours.dedup();
    ours
}

/// Processes whose command line names something under `dir` (containerd and
/// its shims started by a dockerd whose directories are there) and every
/// process below them (the containers): the pids, for SIGKILL.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let dir = dir.display().to_string();
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    let mut roots = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| String::from_utf8_lossy(arg).contains(&dir)) {
            roots.push(pid);
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        if let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut all = roots;
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            if !all.contains(child) {
                all.push(*child);
            }
        }
        i += 1;
    }
    all
}

/// SIGKILLs [`processes_under`] `dir` and waits (bounded) until they are gone.
pub fn kill_processes_under(dir: &Path) {
    let pids = processes_under(dir);
    for pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    crate::wait_until(Duration::from_secs(5), || pids.iter().all(|p| !running(*p)));
}

/// The process exists and is not a zombie (killed, waiting to be reaped: it
/// holds nothing any more).
pub fn running(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).is_some_and(|state| state != "Z")
}

/// Removes the cgroup `name` (a harness name, directly under the root of each
/// hierarchy: `/sys/fs/cgroup/<name>` on cgroup v2, `/sys/fs/cgroup/<ctrl>/<name>`
/// on v1) and the empty cgroups below it, deepest first. A cgroup that still
/// has processes stays (rmdir refuses).
pub fn remove_cgroups(name: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![root.join(name)];
    for ctrl in std::fs::read_dir(root).into_iter().flatten().flatten() {
        candidates.push(ctrl.path().join(name));
    }
    for c in candidates.into_iter().filter(|c| c.is_dir()) {
        rmdir_tree(&c);
    }
}

fn rmdir_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            rmdir_tree(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

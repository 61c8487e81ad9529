//! Child processes, bounded: the binary under test, temp dirs, waits that
//! end, and `python3 -c` snippets. Every child is killed on timeout.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long one CGI run (or `python3 -c` snippet) may take before it is killed.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a bot or a server may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the bounded waits look again.
pub(super) const POLL: Duration = Duration::from_millis(10);

/// The binary under test: cargo's build, or the one `TOURNEY_REGISTER_BIN`
/// names (scripts/test runs suites again against the build that ships,
/// which is linked differently).
pub fn bin() -> PathBuf {
    match std::env::var_os("TOURNEY_REGISTER_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_tourney-register")),
    }
}

/// The binary under test with a cleared environment but for `PATH`, so
/// nothing from the test run's environment (`REGISTER_*`, `RUST_LOG`) leaks in.
pub(super) fn bin_command() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// Runs the binary with `args` and `env` on top of [`bin_command`]'s cleared
/// environment, stdin /dev/null; killed after `timeout`. The flag says
/// whether it was killed.
pub fn run_bin(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> (Output, bool) {
    let mut cmd = bin_command();
    cmd.args(args).envs(env.iter().copied());
    run_bounded(&mut cmd, None, timeout)
}

/// A fresh directory under `std::env::temp_dir()`, removed on drop; kept
/// (and its path printed) when `TOURNEY_TEST_KEEP_TMP` is set in the
/// environment of the test run.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `tag` goes into the name; keep it short (unix socket paths are
    /// limited to 107 bytes).
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("trt-{tag}-{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temp dir {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as `&str`, handy for env values such as `REGISTER_STATE_DIR`.
    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("UTF-8 temp dir path")
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TOURNEY_TEST_KEEP_TMP").is_some() {
            eprintln!("[support] keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A fresh [`TempDir`] the relay accepts as `REGISTER_STATE_DIR`: the store
/// refuses a directory that is not private (mode 0700, this user's).
pub fn private_dir(tag: &str) -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new(tag);
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod 0700 {}: {e}", dir.path().display()));
    dir
}

/// As [`wait_bounded`], and a child still running at `timeout` is killed
/// and reaped (a `Child` dropped is neither), so a test that then panics
/// leaves nothing behind.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let status = wait_bounded(child, timeout);
    if status.is_none() {
        kill_and_reap(child);
    }
    status
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(POLL),
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

/// Polls `cond` every 10 ms until it holds (true) or `timeout` passes
/// (false). `cond` is always tried at least once.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// One read or receive from a socket, with the socket's read timeout set
/// by `set_timeout` to what is left until `deadline`, tried again when
/// interrupted. The kernel does not resume a socket call that has a timeout
/// after the process was stopped or frozen for a moment: the call fails
/// with `Interrupted` (CI runs here have seen it, twice). A full timeout on
/// every try could wait for ever under repeated freezes; `deadline` cannot.
/// Past it: `TimedOut`.
pub fn read_by<T>(
    deadline: Instant,
    mut set_timeout: impl FnMut(Duration) -> io::Result<()>,
    mut read: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        set_timeout(left)?;
        match read() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// SIGKILL (if still running) and reap. Never panics.
pub(super) fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Sends a signal by name (`"TERM"`, `"INT"`, `"HUP"`, `"KILL"`, ...) with kill(1),
/// so the tests need no libc.
pub fn send_signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg("-s")
        .arg(sig)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running kill(1)");
    // A process that already exited makes kill fail; that is not our problem here.
    let _ = status;
}

/// Runs `cmd` with `input` on stdin (or /dev/null), collecting stdout and
/// stderr; kills it after `timeout`. The flag says whether it was killed.
pub fn run_bounded(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> (Output, bool) {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let writer = input.map(|data| {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        // Errors (e.g. EPIPE when the child does not read) are the test's to notice.
        thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let out_reader = drain_in_thread(child.stdout.take().expect("piped stdout"));
    let err_reader = drain_in_thread(child.stderr.take().expect("piped stderr"));
    let (status, timed_out) = match wait_bounded(&mut child, timeout) {
        Some(status) => (status, false),
        None => {
            kill_and_reap(&mut child);
            (child.wait().expect("reaping"), true)
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    (
        Output {
            status,
            stdout,
            stderr,
        },
        timed_out,
    )
}

fn drain_in_thread<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

pub(super) fn read_text(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Runs a Python snippet: `python3 -c CODE ARGS...` with `input` on stdin,
/// bounded by [`RUN_TIMEOUT`]. Panics if it does not finish in time.
pub fn python(code: &str, args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(code)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let (out, timed_out) = run_bounded(&mut cmd, Some(input), RUN_TIMEOUT);
    assert!(
        !timed_out,
        "python snippet did not finish in {RUN_TIMEOUT:?}; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

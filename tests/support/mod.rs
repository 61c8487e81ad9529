//! Shared harness for the integration tests (`mod support;`).
//!
//! Independent of the crate's own code: the FastCGI client, the CGI output
//! parser and the little JSON reader here are written from the specs, so a
//! bug in `src/` cannot hide behind the same bug in the tests. Std only, but
//! for `libc` ([`RefusingPort`]: std cannot bind without listening) and
//! `sha2` ([`fingerprint`]).
//!
//! Everything that waits is bounded, and every child process is owned by a
//! value that kills it on drop, so a failing (panicking) test leaves nothing
//! running. When a test panics, the drops also print the child's stderr.
//!
//! Pieces:
//! - [`bin`], [`run_cgi`], [`run_cgi_raw`]: the binary in CGI mode.
//! - [`Bot`]: the Python stand-in for the discord cog (`tests/peer/bot.py`).
//! - [`RefusingPort`]: an address where nothing listens, kept that way.
//! - [`HttpLike`], [`parse_cgi`]: CGI-form output (`Status:` + headers + body).
//! - Test data and checks shared by the suites: [`unique`], [`fingerprint`],
//!   [`unescape`], [`title_text`], [`message_text`],
//!   [`assert_security_headers`], [`assert_answer_page`], [`assert_log`].
//! - FastCGI client: [`fcgi_request`], [`fcgi_get`], [`get_params`],
//!   [`write_record`], [`read_record`], [`encode_pairs`], [`decode_pairs`], ...
//! - [`Fd0Server`] (listening socket as fd 0, as mod_fcgid / spawn-fcgi do)
//!   and [`ListenServer`] (`--listen ADDR`); both deref to [`Server`].
//! - [`python`]: run a `python3 -c` snippet (pickle work without Rust deps).
//! - [`Json`], [`parse_json`]: enough JSON to read the bot's replies and records.

#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// How long a bot may take to print its `listening on` line.
pub const BOT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one CGI run (or `python3 -c` snippet) may take before it is killed.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// Read/write timeout on every connection a server helper hands out.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a `--listen` server may take to start listening.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit after SIGTERM in [`Server::stop`].
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(10);

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tourney-register"))
}

/// The binary under test with a cleared environment but for `PATH`, so
/// nothing from the test run's environment (`REGISTER_*`, `RUST_LOG`) leaks in.
fn bin_command() -> Command {
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

/// `tests/peer/bot.py`.
pub fn bot_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peer/bot.py")
}

// ---------------------------------------------------------------------------
// Temp dirs and child processes
// ---------------------------------------------------------------------------

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

/// SIGKILL (if still running) and reap. Never panics.
fn kill_and_reap(child: &mut Child) {
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

fn read_text(path: &Path) -> String {
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

// ---------------------------------------------------------------------------
// The bot peer
// ---------------------------------------------------------------------------

/// What `tests/peer/bot.py` answers with `approve` or `slow` (no `--message`).
pub const APPROVED: &str = "You're registered, welcome to the tournament!";
/// What `tests/peer/bot.py` answers with `refuse` (no `--message`).
pub const REFUSED: &str = "You're already signed up!";
/// What [`Bot::received`] equals when the bot was never contacted.
pub const NOTHING: [(&str, &str); 0] = [];

/// One message as the bot recorded it (see `tests/peer/bot.py`).
///
/// Compares equal to `("state", "code")` when it decoded cleanly with those
/// values, so `assert_eq!(bot.received(), [("s", "c")])` works.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub state: String,
    pub code: String,
    /// The keys of the decoded dict, sorted (normally `["code", "state"]`).
    pub keys: Vec<String>,
    /// Bytes the bot read before EOF.
    pub raw_len: usize,
    /// `"json"` or `"pickle"`: what the bot was started with.
    pub wire: String,
    /// Set when the message did not decode (or lacked/mistyped a field);
    /// `state` and `code` are then empty.
    pub error: Option<String>,
}

impl PartialEq<(&str, &str)> for Received {
    fn eq(&self, other: &(&str, &str)) -> bool {
        self.error.is_none() && self.state == other.0 && self.code == other.1
    }
}

impl Received {
    fn from_line(line: &str) -> Received {
        let json = match parse_json(line) {
            Ok(j) => j,
            Err(e) => {
                return Received {
                    error: Some(format!("unreadable record line {line:?}: {e}")),
                    ..Received::default()
                };
            }
        };
        let text = |k: &str| json.get(k).and_then(Json::as_str).unwrap_or("").to_string();
        Received {
            state: text("state"),
            code: text("code"),
            keys: json
                .get("keys")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            raw_len: json.get("raw_len").and_then(Json::as_f64).unwrap_or(0.0) as usize,
            wire: text("wire"),
            error: json.get("error").and_then(Json::as_str).map(str::to_string),
        }
    }
}

/// A running `tests/peer/bot.py`, killed on drop.
pub struct Bot {
    child: Child,
    addr: String,
    dir: TempDir,
    record: PathBuf,
    stderr: PathBuf,
}

impl Bot {
    /// `wire`: `json` | `pickle`; `behaviour`: `approve` | `refuse` | `silent` |
    /// `early-close` | `garbage` | `oversize` | `slow` | `echo`. TCP on 127.0.0.1.
    pub fn start(wire: &str, behaviour: &str) -> Bot {
        Bot::start_with(wire, behaviour, &[])
    }

    /// As [`Bot::start`] with extra bot.py arguments, e.g.
    /// `&["--delay", "0.5"]`, `&["--message", "<b>&\"'"]`, `&["--unix", path]`.
    pub fn start_with(wire: &str, behaviour: &str, extra: &[&str]) -> Bot {
        Bot::launch(TempDir::new("bot"), wire, behaviour, extra)
    }

    /// A bot listening on a unix socket in its own temp dir.
    pub fn start_unix(wire: &str, behaviour: &str) -> Bot {
        Bot::start_unix_with(wire, behaviour, &[])
    }

    pub fn start_unix_with(wire: &str, behaviour: &str, extra: &[&str]) -> Bot {
        let dir = TempDir::new("bot");
        let path = dir.join("bot.sock");
        let path = path.to_str().expect("UTF-8 temp dir path").to_string();
        let mut args = vec!["--unix", path.as_str()];
        args.extend_from_slice(extra);
        Bot::launch(dir, wire, behaviour, &args)
    }

    fn launch(dir: TempDir, wire: &str, behaviour: &str, extra: &[&str]) -> Bot {
        let record = dir.join("received.jsonl");
        let stderr = dir.join("stderr.log");
        let mut cmd = Command::new("python3");
        cmd.arg(bot_script())
            .args(["--wire", wire, "--behaviour", behaviour, "--record"])
            .arg(&record)
            .args(extra)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("bot stderr file"));
        let mut child = cmd.spawn().expect("spawning python3 tests/peer/bot.py");

        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout);
            let mut first = String::new();
            let _ = lines.read_line(&mut first);
            let _ = tx.send(first);
            // Keep draining so the bot can never block on a full pipe.
            let _ = io::copy(&mut lines, &mut io::sink());
        });
        let line = rx.recv_timeout(BOT_START_TIMEOUT).unwrap_or_default();
        let addr = match line.trim_end().strip_prefix("listening on ") {
            Some(addr) if !addr.is_empty() => addr.to_string(),
            _ => {
                kill_and_reap(&mut child);
                panic!(
                    "bot ({wire} {behaviour} {extra:?}) did not report `listening on` within \
                     {BOT_START_TIMEOUT:?}; stdout line {line:?}; stderr:\n{}",
                    read_text(&stderr)
                );
            }
        };
        Bot {
            child,
            addr,
            dir,
            record,
            stderr,
        }
    }

    /// `127.0.0.1:PORT` or `unix:/path`: usable as `REGISTER_BOT_ADDR`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The TCP port, if the bot listens on TCP.
    pub fn port(&self) -> Option<u16> {
        if self.addr.starts_with("unix:") {
            return None;
        }
        self.addr.rsplit(':').next().and_then(|p| p.parse().ok())
    }

    /// The socket path, if the bot listens on a unix socket.
    pub fn unix_path(&self) -> Option<&Path> {
        self.addr.strip_prefix("unix:").map(Path::new)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every message recorded so far (complete lines only), in arrival order.
    pub fn received(&self) -> Vec<Received> {
        let text = read_text(&self.record);
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete.lines().map(Received::from_line).collect()
    }

    /// Waits (bounded) until at least `n` messages are recorded, then returns
    /// them all. Returns what is there after `timeout` either way.
    pub fn wait_received(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut got = Vec::new();
        wait_until(timeout, || {
            got = self.received();
            got.len() >= n
        });
        got
    }

    pub fn stderr_text(&self) -> String {
        read_text(&self.stderr)
    }

    /// SIGTERM, then a bounded wait; panics (after SIGKILL) if it hangs.
    pub fn stop(&mut self) -> ExitStatus {
        send_signal(self.child.id(), "TERM");
        match wait_bounded(&mut self.child, STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                kill_and_reap(&mut self.child);
                panic!("bot ignored SIGTERM; stderr:\n{}", self.stderr_text());
            }
        }
    }

    /// SIGKILL: the bot vanishes mid-whatever, as a crashed cog would.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if thread::panicking() {
            eprintln!(
                "[support] bot {} stderr:\n{}",
                self.addr,
                self.stderr_text()
            );
        }
    }
}

/// A TCP port on 127.0.0.1 that refuses connections for as long as this
/// value lives: a socket bound to it but never listening. Unlike a port
/// that was bound and released, nobody else can start listening there
/// while a test counts on it being closed. (Binding without listening
/// needs libc: std's `TcpListener::bind` listens at once.)
pub struct RefusingPort {
    _fd: OwnedFd,
    port: u16,
    addr: String,
}

impl RefusingPort {
    /// Binds a fresh socket to `127.0.0.1:0`; panics if a connection to the
    /// port it got is not refused.
    pub fn new() -> RefusingPort {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh socket nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_in is plain data; zeroed is valid.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid sockaddr_in of length len.
        let rc = unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) };
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        // SAFETY: valid out-pointers of the right size.
        let rc =
            unsafe { libc::getsockname(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) };
        assert_eq!(rc, 0, "getsockname: {}", io::Error::last_os_error());
        let port = u16::from_be(sa.sin_port);
        let addr = format!("127.0.0.1:{port}");
        assert!(
            TcpStream::connect(&addr).is_err(),
            "{addr} accepted a connection"
        );
        RefusingPort {
            _fd: owned,
            port,
            addr,
        }
    }

    /// `127.0.0.1:PORT`: usable as `REGISTER_BOT_ADDR`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The port. It stays closed only while `self` lives: drop `self` just
    /// before something of the test's own is to listen there.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A free `127.0.0.1` port (bound to 0, then dropped).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------------------
// CGI-form output
// ---------------------------------------------------------------------------

/// A parsed CGI-form response (`Status: NNN reason` + headers + CRLF CRLF + body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLike {
    pub status: u16,
    /// The reason phrase of the `Status:` line (empty if none was sent).
    pub reason: String,
    /// Every header but `Status`, in order, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body, lossily decoded as UTF-8.
    pub body: String,
    /// The body exactly as sent.
    pub body_bytes: Vec<u8>,
}

impl HttpLike {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header called `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Parses CGI output; panics with the output shown if it is malformed.
pub fn parse_cgi(bytes: &[u8]) -> HttpLike {
    try_parse_cgi(bytes).unwrap_or_else(|e| {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
        panic!(
            "malformed CGI output: {e}\n--- output ({} bytes) ---\n{shown}",
            bytes.len()
        )
    })
}

/// Parses CGI output strictly: header lines end in CRLF, each is
/// `Name: value` with a token name, at most one `Status`, and the head ends
/// with an empty line. A missing `Status` means 200.
pub fn try_parse_cgi(bytes: &[u8]) -> Result<HttpLike, String> {
    let end = find(bytes, b"\r\n\r\n").ok_or("no CRLF CRLF after the headers")?;
    let head = std::str::from_utf8(&bytes[..end]).map_err(|e| format!("head is not UTF-8: {e}"))?;
    let body_bytes = bytes[end + 4..].to_vec();
    let mut status = None;
    let mut reason = String::new();
    let mut headers = Vec::new();
    for line in head.split("\r\n") {
        if line.contains(['\r', '\n']) {
            return Err(format!("bare CR or LF in header line {line:?}"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line without a colon: {line:?}"))?;
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || !name.chars().all(token) {
            return Err(format!("bad header name {name:?}"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("Status") {
            if status.is_some() {
                return Err("more than one Status header".into());
            }
            let (code, why) = value.split_once(' ').unwrap_or((value, ""));
            if code.len() != 3 {
                return Err(format!("bad Status value {value:?}"));
            }
            status = Some(
                code.parse::<u16>()
                    .map_err(|_| format!("bad Status value {value:?}"))?,
            );
            reason = why.to_string();
        } else {
            headers.push((name.to_string(), value.to_string()));
        }
    }
    Ok(HttpLike {
        status: status.unwrap_or(200),
        reason,
        headers,
        body: String::from_utf8_lossy(&body_bytes).into_owned(),
        body_bytes,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One run of the binary in CGI mode.
#[derive(Debug)]
pub struct CgiRun {
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub status: ExitStatus,
    pub elapsed: Duration,
    /// True if it was killed after [`RUN_TIMEOUT`].
    pub timed_out: bool,
}

impl CgiRun {
    /// Panics (showing stderr) if the run was killed after [`RUN_TIMEOUT`].
    pub fn assert_finished(&self) {
        assert!(
            !self.timed_out,
            "CGI run did not finish within {RUN_TIMEOUT:?}; stderr:\n{}",
            self.stderr
        );
    }

    /// Stdout parsed as CGI output; panics (showing stdout and stderr) if
    /// it is malformed.
    pub fn http(&self) -> HttpLike {
        try_parse_cgi(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "malformed CGI output: {e}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&self.stdout),
                self.stderr
            )
        })
    }
}

/// Runs the binary as CGI: `env_clear()` + `PATH` + `env`, stdin /dev/null,
/// killed after [`RUN_TIMEOUT`]. Values are raw bytes (for non-UTF-8 tests).
pub fn run_cgi_raw(env: &[(&str, &[u8])]) -> CgiRun {
    let mut cmd = bin_command();
    for (name, value) in env {
        cmd.env(name, OsStr::from_bytes(value));
    }
    let started = Instant::now();
    let (out, timed_out) = run_bounded(&mut cmd, None, RUN_TIMEOUT);
    CgiRun {
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status,
        elapsed: started.elapsed(),
        timed_out,
    }
}

/// Runs the binary as CGI and parses its output; panics (showing stderr) if
/// it hangs or prints something that is not CGI output.
pub fn run_cgi(env: &[(&str, &str)]) -> (HttpLike, String, ExitStatus) {
    let raw: Vec<(&str, &[u8])> = env.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    let run = run_cgi_raw(&raw);
    run.assert_finished();
    (run.http(), run.stderr, run.status)
}

// ---------------------------------------------------------------------------
// Test data, pages and logs
// ---------------------------------------------------------------------------

/// A long, unique, random-looking string: `prefix` then lowercase hex, `len`
/// bytes in all. Distinct in every call, in every process, so runs never see
/// each other's answers and a leak into a log cannot be mistaken for
/// anything else.
pub fn unique(prefix: &str, len: usize) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let seed = RandomState::new();
    let mut out = prefix.to_string();
    while out.len() < len {
        let mut h = seed.build_hasher();
        h.write_usize(NEXT.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(len);
    out
}

/// The README's code fingerprint, as the relay logs it (`code=...`): the
/// first 8 hex digits of SHA-256(code).
pub fn fingerprint(code: &str) -> String {
    Sha256::digest(code.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Undoes HTML escaping (named and numeric references), to find a text as
/// the player reads it without depending on which escape form is used.
pub fn unescape(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The unescaped text between the first `open` and the next `close`;
/// panics (showing the page) if either is missing.
pub fn element_text(body: &str, open: &str, close: &str) -> String {
    let start = body
        .find(open)
        .unwrap_or_else(|| panic!("no {open} in page:\n{body}"))
        + open.len();
    let end = body[start..]
        .find(close)
        .unwrap_or_else(|| panic!("unterminated {open} in page:\n{body}"));
    unescape(&body[start..start + end])
}

/// The `<h1>` text of the built-in page, unescaped.
pub fn title_text(body: &str) -> String {
    element_text(body, "<h1>", "</h1>")
}

/// The text of `<p id="message">…</p>` on the built-in page, unescaped.
pub fn message_text(body: &str) -> String {
    element_text(body, "<p id=\"message\">", "</p>")
}

/// The headers every page of the relay carries (README, Responses), each
/// exactly once.
pub fn assert_security_headers(h: &HttpLike) {
    assert_security_headers_in(&h.headers, "");
}

/// [`assert_security_headers`] on a header list of any response (`name`,
/// `value` pairs; names case-insensitive), e.g. one read through Apache.
/// `context` starts every failure message.
pub fn assert_security_headers_in(headers: &[(String, String)], context: &str) {
    let one = |name: &str| {
        let all: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            all.len(),
            1,
            "{context}{name} headers: {all:?} in {headers:?}"
        );
        all[0].to_string()
    };
    assert_eq!(
        one("Content-Type"),
        "text/html; charset=utf-8",
        "{context}Content-Type"
    );
    assert_eq!(one("Cache-Control"), "no-store", "{context}Cache-Control");
    assert_eq!(
        one("Referrer-Policy"),
        "no-referrer",
        "{context}Referrer-Policy"
    );
    assert_eq!(
        one("X-Content-Type-Options"),
        "nosniff",
        "{context}X-Content-Type-Options"
    );
    let csp = one("Content-Security-Policy");
    assert!(
        csp.contains("frame-ancestors 'none'"),
        "{context}CSP {csp:?}"
    );
    assert!(csp.contains("default-src 'none'"), "{context}CSP {csp:?}");
}

/// The built-in page for a bot's answer: 200 OK with the security headers,
/// the check mark (`ok`) or the cross and not the other, the matching title,
/// exactly `message`, no "Try again", and a Content-Length that is the
/// body's length.
pub fn assert_answer_page(h: &HttpLike, ok: bool, message: &str) {
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.reason, "OK");
    assert_security_headers(h);
    let (mark, other, title) = if ok {
        (
            "aria-label=\"Success\"",
            "aria-label=\"Failure\"",
            "You're signed up",
        )
    } else {
        (
            "aria-label=\"Failure\"",
            "aria-label=\"Success\"",
            "Sign-up failed",
        )
    };
    assert!(h.body.contains(mark), "want {mark}:\n{}", h.body);
    assert!(!h.body.contains(other), "both marks:\n{}", h.body);
    assert_eq!(title_text(&h.body), title);
    assert_eq!(message_text(&h.body), message);
    assert!(!h.body.contains("Try again"), "{}", h.body);
    let len: usize = h
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert_eq!(len, h.body_bytes.len());
}

/// The relay's per-request (`outcome=`) lines in `log`.
pub fn outcome_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("outcome=")).collect()
}

/// Checks a relay's log after `n` requests: exactly `n` `outcome=` lines,
/// the last an INFO line with `status=STATUS`, `ms=N` and `code=` the
/// [`fingerprint`] of `code` (without a code: `-` or some fingerprint);
/// and none of the `secrets`, nor the last 24 bytes of one, anywhere in `log`.
pub fn assert_log(log: &str, n: usize, status: u16, code: Option<&str>, secrets: &[&str]) {
    let lines = outcome_lines(log);
    assert_eq!(
        lines.len(),
        n,
        "want exactly {n} outcome= line(s); log:\n{log}"
    );
    let line = *lines.last().expect("no outcome= line");
    assert!(line.contains(" INFO "), "not an info line: {line}");
    assert!(
        line.split_whitespace()
            .any(|w| w == format!("status={status}")),
        "want status={status}: {line}"
    );
    assert!(
        line.split_whitespace().any(|w| w
            .strip_prefix("ms=")
            .is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))),
        "no ms=N: {line}"
    );
    let logged = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("code="))
        .unwrap_or_else(|| panic!("no code= field: {line}"));
    match code {
        Some(code) => {
            assert_eq!(logged.len(), 8, "code= is not 8 hex digits: {line}");
            assert!(
                logged
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "code= is not 8 hex digits: {line}"
            );
            assert_eq!(logged, fingerprint(code), "fingerprint of the code: {line}");
        }
        None => assert!(
            logged == "-" || logged.len() == 8,
            "code= neither - nor a fingerprint: {line}"
        ),
    }
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(
            !log.contains(secret),
            "the log contains a secret {secret:?}:\n{log}"
        );
        // A truncated copy would be just as bad.
        let tail = &secret[secret.len().saturating_sub(24)..];
        assert!(
            !log.contains(tail),
            "the log contains part of a secret {tail:?}:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------
// FastCGI client (from the FastCGI 1.0 spec, not from src/)
// ---------------------------------------------------------------------------

pub const FCGI_VERSION_1: u8 = 1;
pub const FCGI_BEGIN_REQUEST: u8 = 1;
pub const FCGI_ABORT_REQUEST: u8 = 2;
pub const FCGI_END_REQUEST: u8 = 3;
pub const FCGI_PARAMS: u8 = 4;
pub const FCGI_STDIN: u8 = 5;
pub const FCGI_STDOUT: u8 = 6;
pub const FCGI_STDERR: u8 = 7;
pub const FCGI_DATA: u8 = 8;
pub const FCGI_GET_VALUES: u8 = 9;
pub const FCGI_GET_VALUES_RESULT: u8 = 10;
pub const FCGI_UNKNOWN_TYPE: u8 = 11;

pub const FCGI_RESPONDER: u16 = 1;
pub const FCGI_AUTHORIZER: u16 = 2;
pub const FCGI_FILTER: u16 = 3;
pub const FCGI_KEEP_CONN: u8 = 1;

pub const FCGI_REQUEST_COMPLETE: u8 = 0;
pub const FCGI_CANT_MPX_CONN: u8 = 1;
pub const FCGI_OVERLOADED: u8 = 2;
pub const FCGI_UNKNOWN_ROLE: u8 = 3;

/// Largest content of one record.
pub const FCGI_MAX_CONTENT: usize = 65535;

/// One record's bytes with explicit padding. Panics if `content` is too long.
pub fn record_bytes(kind: u8, id: u16, content: &[u8], padding: u8) -> Vec<u8> {
    assert!(
        content.len() <= FCGI_MAX_CONTENT,
        "record content of {} bytes",
        content.len()
    );
    let len = content.len() as u16;
    let mut out = Vec::with_capacity(8 + content.len() + padding as usize);
    out.push(FCGI_VERSION_1);
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(padding);
    out.push(0);
    out.extend_from_slice(content);
    out.extend(std::iter::repeat_n(0u8, padding as usize));
    out
}

/// Padding that brings `len` to a multiple of 8, as real web servers send.
pub fn padding_for(len: usize) -> u8 {
    ((8 - len % 8) % 8) as u8
}

/// Writes one record, padded to a multiple of 8 bytes.
pub fn write_record<W: Write + ?Sized>(
    w: &mut W,
    kind: u8,
    id: u16,
    content: &[u8],
) -> io::Result<()> {
    w.write_all(&record_bytes(kind, id, content, padding_for(content.len())))
}

/// Writes one record with the given padding length.
pub fn write_record_padded<W: Write + ?Sized>(
    w: &mut W,
    kind: u8,
    id: u16,
    content: &[u8],
    padding: u8,
) -> io::Result<()> {
    w.write_all(&record_bytes(kind, id, content, padding))
}

/// Reads one record: `None` at a clean EOF (or a reset) on a record boundary.
/// Panics on a timeout, a truncated record or a version other than 1.
pub fn read_record<R: Read + ?Sized>(r: &mut R) -> Option<(u8, u16, Vec<u8>)> {
    try_read_record(r).unwrap_or_else(|e| panic!("reading a FastCGI record: {e}"))
}

/// As [`read_record`], with errors returned.
pub fn try_read_record<R: Read + ?Sized>(r: &mut R) -> io::Result<Option<(u8, u16, Vec<u8>)>> {
    let mut header = [0u8; 8];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {got} bytes of a record header"),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && got == 0 => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    if header[0] != FCGI_VERSION_1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record version {} (header {header:?})", header[0]),
        ));
    }
    let kind = header[1];
    let id = u16::from_be_bytes([header[2], header[3]]);
    let len = u16::from_be_bytes([header[4], header[5]]) as usize;
    let padding = header[6] as usize;
    let mut body = vec![0u8; len + padding];
    r.read_exact(&mut body).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("record type {kind} id {id}: {len}+{padding} body bytes: {e}"),
        )
    })?;
    body.truncate(len);
    Ok(Some((kind, id, body)))
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 128 {
        out.push(len as u8);
    } else {
        assert!(len < (1 << 31), "name-value length {len}");
        out.extend_from_slice(&(len as u32 | 0x8000_0000).to_be_bytes());
    }
}

/// Owned name-value pairs (FastCGI params, GET_VALUES results).
pub type Params = Vec<(Vec<u8>, Vec<u8>)>;

/// FastCGI name-value pair encoding (1-byte lengths below 128, else 4 bytes).
pub fn encode_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in pairs {
        push_len(&mut out, name.len());
        push_len(&mut out, value.len());
        out.extend_from_slice(name);
        out.extend_from_slice(value);
    }
    out
}

/// Inverse of [`encode_pairs`].
pub fn decode_pairs(mut bytes: &[u8]) -> Result<Params, String> {
    fn take_len(bytes: &mut &[u8]) -> Result<usize, String> {
        let first = *bytes.first().ok_or("truncated length")?;
        if first < 128 {
            *bytes = &bytes[1..];
            return Ok(first as usize);
        }
        if bytes.len() < 4 {
            return Err("truncated 4-byte length".into());
        }
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) & 0x7fff_ffff;
        *bytes = &bytes[4..];
        Ok(len as usize)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let name_len = take_len(&mut bytes)?;
        let value_len = take_len(&mut bytes)?;
        if bytes.len() < name_len + value_len {
            return Err(format!(
                "pair of {name_len}+{value_len} bytes with {} left",
                bytes.len()
            ));
        }
        let (name, rest) = bytes.split_at(name_len);
        let (value, rest) = rest.split_at(value_len);
        out.push((name.to_vec(), value.to_vec()));
        bytes = rest;
    }
    Ok(out)
}

/// The body of a BEGIN_REQUEST record.
pub fn begin_request_body(role: u16, flags: u8) -> [u8; 8] {
    let r = role.to_be_bytes();
    [r[0], r[1], flags, 0, 0, 0, 0, 0]
}

/// Appends `kind` records carrying `data` in chunks, then the empty record
/// that ends the stream.
pub fn push_stream(out: &mut Vec<u8>, kind: u8, id: u16, data: &[u8]) {
    for chunk in data.chunks(FCGI_MAX_CONTENT) {
        out.extend(record_bytes(kind, id, chunk, padding_for(chunk.len())));
    }
    out.extend(record_bytes(kind, id, &[], 0));
}

/// All the records of one responder request: BEGIN_REQUEST, PARAMS (+ end),
/// STDIN (+ end).
pub fn request_bytes(id: u16, params: &[(&[u8], &[u8])], stdin: &[u8], keep_conn: bool) -> Vec<u8> {
    let flags = if keep_conn { FCGI_KEEP_CONN } else { 0 };
    let mut out = record_bytes(
        FCGI_BEGIN_REQUEST,
        id,
        &begin_request_body(FCGI_RESPONDER, flags),
        0,
    );
    push_stream(&mut out, FCGI_PARAMS, id, &encode_pairs(params));
    push_stream(&mut out, FCGI_STDIN, id, stdin);
    out
}

/// Sends one whole request in a single write.
pub fn send_request<W: Write + ?Sized>(
    w: &mut W,
    id: u16,
    params: &[(&[u8], &[u8])],
    stdin: &[u8],
    keep_conn: bool,
) -> io::Result<()> {
    w.write_all(&request_bytes(id, params, stdin, keep_conn))?;
    w.flush()
}

/// What came back for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FcgiReply {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub app_status: u32,
    pub protocol_status: u8,
    /// An empty STDOUT record (end of stream) came before END_REQUEST.
    pub stdout_ended: bool,
}

impl FcgiReply {
    /// The STDOUT stream parsed as CGI output (panics if malformed).
    pub fn http(&self) -> HttpLike {
        parse_cgi(&self.stdout)
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Reads until END_REQUEST for each of `ids` (multiplexed in any order) and
/// returns the replies in the order of `ids`. Any record for another id, any
/// management record, or EOF first is an error.
pub fn try_read_replies<R: Read + ?Sized>(
    r: &mut R,
    ids: &[u16],
) -> Result<Vec<FcgiReply>, String> {
    let mut replies = vec![FcgiReply::default(); ids.len()];
    let mut done = vec![false; ids.len()];
    while done.contains(&false) {
        let (kind, id, content) = match try_read_record(r) {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                return Err(format!(
                    "connection closed before END_REQUEST; waiting for {ids:?}, done {done:?}"
                ));
            }
            Err(e) => return Err(format!("reading reply records: {e}")),
        };
        let Some(i) = ids.iter().position(|&x| x == id) else {
            return Err(format!(
                "record type {kind} for request id {id} while waiting for {ids:?}: {:?}",
                String::from_utf8_lossy(&content)
            ));
        };
        if done[i] {
            return Err(format!(
                "record type {kind} for request {id} after its END_REQUEST"
            ));
        }
        let reply = &mut replies[i];
        match kind {
            FCGI_STDOUT if content.is_empty() => reply.stdout_ended = true,
            FCGI_STDOUT if reply.stdout_ended => {
                return Err(format!(
                    "STDOUT data for request {id} after its end-of-stream record"
                ));
            }
            FCGI_STDOUT => reply.stdout.extend_from_slice(&content),
            FCGI_STDERR => reply.stderr.extend_from_slice(&content),
            FCGI_END_REQUEST => {
                if content.len() != 8 {
                    return Err(format!("END_REQUEST body of {} bytes", content.len()));
                }
                reply.app_status =
                    u32::from_be_bytes([content[0], content[1], content[2], content[3]]);
                reply.protocol_status = content[4];
                done[i] = true;
            }
            other => return Err(format!("unexpected record type {other} for request {id}")),
        }
    }
    Ok(replies)
}

/// [`try_read_replies`] for several ids; panics on error.
pub fn read_replies<R: Read + ?Sized>(r: &mut R, ids: &[u16]) -> Vec<FcgiReply> {
    try_read_replies(r, ids).unwrap_or_else(|e| panic!("{e}"))
}

/// Reads the reply to request `id`; panics on error.
pub fn read_reply<R: Read + ?Sized>(r: &mut R, id: u16) -> FcgiReply {
    try_read_reply(r, id).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_read_reply<R: Read + ?Sized>(r: &mut R, id: u16) -> Result<FcgiReply, String> {
    try_read_replies(r, &[id]).map(|mut v| v.remove(0))
}

/// One responder request (empty STDIN) and its reply.
pub fn fcgi_request<S: Read + Write>(
    stream: &mut S,
    request_id: u16,
    params: &[(&[u8], &[u8])],
    keep_conn: bool,
) -> FcgiReply {
    send_request(stream, request_id, params, &[], keep_conn)
        .unwrap_or_else(|e| panic!("sending FastCGI request {request_id}: {e}"));
    read_reply(stream, request_id)
}

/// `fcgi_request` with [`get_params`]`(query)`.
pub fn fcgi_get<S: Read + Write>(
    stream: &mut S,
    request_id: u16,
    query: &str,
    keep_conn: bool,
) -> FcgiReply {
    let params = get_params(query);
    fcgi_request(stream, request_id, &as_pairs(&params), keep_conn)
}

/// Sends GET_VALUES for `names` and returns the GET_VALUES_RESULT pairs.
pub fn get_values<S: Read + Write>(stream: &mut S, names: &[&[u8]]) -> Params {
    let pairs: Vec<(&[u8], &[u8])> = names.iter().map(|n| (*n, &b""[..])).collect();
    write_record(stream, FCGI_GET_VALUES, 0, &encode_pairs(&pairs)).expect("sending GET_VALUES");
    match read_record(stream) {
        Some((FCGI_GET_VALUES_RESULT, 0, content)) => {
            decode_pairs(&content).unwrap_or_else(|e| panic!("GET_VALUES_RESULT body: {e}"))
        }
        other => panic!("expected GET_VALUES_RESULT for id 0, got {other:?}"),
    }
}

/// The params Apache's mod_fcgid sends for `GET /register?QUERY`.
pub fn get_params(query: &str) -> Params {
    method_params_bytes("GET", query.as_bytes())
}

/// As [`get_params`] with any method and a raw-bytes query.
pub fn method_params_bytes(method: &str, query: &[u8]) -> Params {
    let mut uri = b"/register".to_vec();
    if !query.is_empty() {
        uri.push(b'?');
        uri.extend_from_slice(query);
    }
    let pairs: [(&str, &[u8]); 16] = [
        ("GATEWAY_INTERFACE", b"CGI/1.1"),
        ("SERVER_SOFTWARE", b"Apache/2.4"),
        ("SERVER_PROTOCOL", b"HTTP/1.1"),
        ("SERVER_NAME", b"tourney.example"),
        ("SERVER_PORT", b"443"),
        ("HTTPS", b"on"),
        ("REQUEST_SCHEME", b"https"),
        ("REMOTE_ADDR", b"127.0.0.1"),
        ("REMOTE_PORT", b"50000"),
        ("REQUEST_METHOD", method.as_bytes()),
        ("SCRIPT_NAME", b"/register"),
        ("PATH_INFO", b""),
        ("QUERY_STRING", query),
        ("REQUEST_URI", &uri),
        ("CONTENT_LENGTH", b""),
        ("HTTP_HOST", b"tourney.example"),
    ];
    pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect()
}

/// Replaces (or adds) one param.
pub fn set_param(params: &mut Params, name: &str, value: &[u8]) {
    match params.iter_mut().find(|(n, _)| n == name.as_bytes()) {
        Some(pair) => pair.1 = value.to_vec(),
        None => params.push((name.as_bytes().to_vec(), value.to_vec())),
    }
}

/// Borrows owned params in the shape [`fcgi_request`] takes.
pub fn as_pairs(params: &[(Vec<u8>, Vec<u8>)]) -> Vec<(&[u8], &[u8])> {
    params
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect()
}

// ---------------------------------------------------------------------------
// FastCGI servers
// ---------------------------------------------------------------------------

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Endpoint {
    /// The `--listen` / `REGISTER_BOT_ADDR` spelling: `unix:/path` or `IP:PORT`.
    pub fn spec(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp(a) => a.to_string(),
        }
    }

    /// Connects, with [`IO_TIMEOUT`] read/write timeouts.
    pub fn connect(&self) -> io::Result<Conn> {
        let conn = match self {
            Endpoint::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
            Endpoint::Tcp(a) => Conn::Tcp(TcpStream::connect_timeout(a, IO_TIMEOUT)?),
        };
        conn.set_timeouts(Some(IO_TIMEOUT))?;
        Ok(conn)
    }

    /// Whether the kernel shows a listening socket here (Linux `/proc/net`);
    /// `None` if that cannot be told.
    fn kernel_says_listening(&self) -> Option<bool> {
        match self {
            Endpoint::Unix(path) => {
                let table = fs::read_to_string("/proc/net/unix").ok()?;
                let want = path.to_str()?;
                Some(table.lines().skip(1).any(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
                    cols.len() >= 8
                        && cols[7] == want
                        && u32::from_str_radix(cols[3], 16).is_ok_and(|f| f & 0x1_0000 != 0)
                }))
            }
            Endpoint::Tcp(addr) => {
                let file = if addr.is_ipv4() {
                    "/proc/net/tcp"
                } else {
                    "/proc/net/tcp6"
                };
                let table = fs::read_to_string(file).ok()?;
                let port = format!(":{:04X}", addr.port());
                Some(table.lines().skip(1).any(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    // sl local_address rem_address st ...; st 0A = LISTEN.
                    cols.len() >= 4 && cols[1].ends_with(&port) && cols[3] == "0A"
                }))
            }
        }
    }
}

/// A client connection to a server helper.
#[derive(Debug)]
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        }
    }

    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// True if the peer has closed: a read returns EOF (or a reset) within `wait`.
    /// Any data read is discarded.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let _ = self.set_read_timeout(Some(wait));
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + wait;
        let closed = loop {
            match self.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) if Instant::now() < deadline => continue,
                Ok(_) => break false,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        let _ = self.set_read_timeout(Some(IO_TIMEOUT));
        closed
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// A running FastCGI server process (the common part of [`Fd0Server`] and
/// [`ListenServer`]); killed on drop.
pub struct Server {
    child: Child,
    endpoint: Endpoint,
    stderr: PathBuf,
    stdout: PathBuf,
    dir: TempDir,
}

impl Server {
    fn spawn(
        dir: TempDir,
        endpoint: Endpoint,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Stdio,
    ) -> Server {
        let stderr = dir.join("stderr.log");
        let stdout = dir.join("stdout.log");
        let mut cmd = bin_command();
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(stdin)
            .stdout(File::create(&stdout).expect("server stdout file"))
            .stderr(File::create(&stderr).expect("server stderr file"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin().display()));
        Server {
            child,
            endpoint,
            stderr,
            stdout,
            dir,
        }
    }

    /// Connects (read/write timeouts [`IO_TIMEOUT`]); panics on failure.
    pub fn connect(&self) -> Conn {
        self.endpoint.connect().unwrap_or_else(|e| {
            panic!(
                "connecting to {}: {e}\nstderr:\n{}",
                self.endpoint.spec(),
                self.stderr_text()
            )
        })
    }

    pub fn try_connect(&self) -> io::Result<Conn> {
        self.endpoint.connect()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `unix:/path` or `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.endpoint.spec()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's own temp dir (stderr.log, stdout.log, the socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends a signal by name (`"TERM"`, `"HUP"`, ...).
    pub fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }

    /// SIGTERM, then wait at most `timeout`; `None` if it is still running.
    pub fn stop_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        self.signal("TERM");
        wait_bounded(&mut self.child, timeout)
    }

    /// Waits at most `timeout` for the process to exit by itself.
    pub fn wait_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_bounded(&mut self.child, timeout)
    }

    /// SIGTERM and wait [`STOP_TIMEOUT`]; panics (after SIGKILL) if it hangs.
    pub fn stop(&mut self) -> ExitStatus {
        match self.stop_within(STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                kill_and_reap(&mut self.child);
                panic!(
                    "server did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.stderr_text()
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }

    pub fn stderr_text(&self) -> String {
        read_text(&self.stderr)
    }

    /// Anything the server wrote to its stdout (should stay empty in FastCGI modes).
    pub fn stdout_text(&self) -> String {
        read_text(&self.stdout)
    }

    /// Waits (bounded) for `needle` to appear in stderr.
    pub fn wait_stderr_contains(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr_text().contains(needle))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if thread::panicking() {
            eprintln!(
                "[support] server {} stderr:\n{}",
                self.endpoint.spec(),
                self.stderr_text()
            );
        }
    }
}

/// The binary with a listening socket as fd 0, as mod_fcgid and spawn-fcgi
/// start it. Derefs to [`Server`] (`connect`, `stop`, `stderr_text`, ...).
pub struct Fd0Server(Server);

impl Fd0Server {
    /// A unix socket in a fresh temp dir; `env_clear()` + PATH + `env`.
    pub fn start(env: &[(&str, &str)]) -> Fd0Server {
        let dir = TempDir::new("fd0");
        let path = dir.join("fcgi.sock");
        let listener =
            UnixListener::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        let stdin = Stdio::from(OwnedFd::from(listener));
        Fd0Server(Server::spawn(dir, Endpoint::Unix(path), &[], env, stdin))
    }

    /// A TCP socket on 127.0.0.1 (spawn-fcgi style).
    pub fn start_tcp(env: &[(&str, &str)]) -> Fd0Server {
        let dir = TempDir::new("fd0");
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let stdin = Stdio::from(OwnedFd::from(listener));
        Fd0Server(Server::spawn(dir, Endpoint::Tcp(addr), &[], env, stdin))
    }
}

impl Deref for Fd0Server {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl DerefMut for Fd0Server {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}

/// `tourney-register --listen ADDR`, waited on (bounded) until it listens.
/// Derefs to [`Server`].
pub struct ListenServer(Server);

impl ListenServer {
    /// `kind`: `"unix"` (socket in a fresh temp dir) or `"tcp"` (127.0.0.1, free port).
    pub fn start(kind: &str, env: &[(&str, &str)]) -> ListenServer {
        ListenServer::start_with(kind, env, &[])
    }

    pub fn start_unix(env: &[(&str, &str)]) -> ListenServer {
        ListenServer::start("unix", env)
    }

    pub fn start_tcp(env: &[(&str, &str)]) -> ListenServer {
        ListenServer::start("tcp", env)
    }

    /// As [`ListenServer::start`] with extra arguments after `--listen ADDR`.
    pub fn start_with(kind: &str, env: &[(&str, &str)], extra: &[&str]) -> ListenServer {
        // A free TCP port can be taken by someone else before the server
        // binds it; retry a couple of times in that case only.
        let attempts = if kind == "tcp" { 3 } else { 1 };
        let mut last_err = String::new();
        for _ in 0..attempts {
            let dir = TempDir::new("lsn");
            let endpoint = match kind {
                "unix" => Endpoint::Unix(dir.join("fcgi.sock")),
                "tcp" => Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port()))),
                other => panic!("ListenServer kind {other:?}: use \"unix\" or \"tcp\""),
            };
            let spec = endpoint.spec();
            let mut args = vec!["--listen", spec.as_str()];
            args.extend_from_slice(extra);
            let mut server = Server::spawn(dir, endpoint, &args, env, Stdio::null());
            match wait_listening(&mut server) {
                Ok(()) => return ListenServer(server),
                Err(e) => {
                    let in_use = server.stderr_text().to_lowercase().contains("in use");
                    last_err = e;
                    if !in_use {
                        break;
                    }
                }
            }
        }
        panic!("{last_err}");
    }
}

/// Bounded wait until the server listens: its `listening on` log line, or
/// the kernel's socket table, or (without /proc) a probe connection.
fn wait_listening(server: &mut Server) -> Result<(), String> {
    let deadline = Instant::now() + SERVER_START_TIMEOUT;
    loop {
        if server.stderr_text().contains("listening on") {
            return Ok(());
        }
        match server.endpoint.kernel_says_listening() {
            Some(true) => return Ok(()),
            Some(false) => {}
            None => {
                if server.endpoint.connect().is_ok() {
                    return Ok(());
                }
            }
        }
        if let Some(status) = server.try_wait() {
            return Err(format!(
                "server --listen {} exited ({status}) before listening; stderr:\n{}",
                server.endpoint.spec(),
                server.stderr_text()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "server --listen {} not listening after {SERVER_START_TIMEOUT:?}; stderr:\n{}",
                server.endpoint.spec(),
                server.stderr_text()
            ));
        }
        thread::sleep(POLL);
    }
}

impl Deref for ListenServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl DerefMut for ListenServer {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}

// ---------------------------------------------------------------------------
// Just enough JSON
// ---------------------------------------------------------------------------

/// A parsed JSON value (objects keep their key order).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }
}

/// Parses one JSON document (RFC 8259; surrogate pairs joined).
pub fn parse_json(text: &str) -> Result<Json, String> {
    let mut p = JsonParser {
        s: text.as_bytes(),
        i: 0,
    };
    let value = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing data at byte {}", p.i));
    }
    Ok(value)
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }

    fn eat(&mut self, lit: &[u8]) -> bool {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 128 {
            return self.err("nesting too deep");
        }
        self.ws();
        match self.s.get(self.i) {
            None => self.err("unexpected end"),
            Some(b'n') if self.eat(b"null") => Ok(Json::Null),
            Some(b't') if self.eat(b"true") => Ok(Json::Bool(true)),
            Some(b'f') if self.eat(b"false") => Ok(Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b"]") {
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat(b",") {
                        continue;
                    }
                    if self.eat(b"]") {
                        return Ok(Json::Arr(items));
                    }
                    return self.err("expected , or ]");
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.eat(b"}") {
                    return Ok(Json::Obj(members));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return self.err("expected a key");
                    }
                    let key = self.string()?;
                    self.ws();
                    if !self.eat(b":") {
                        return self.err("expected :");
                    }
                    members.push((key, self.value(depth + 1)?));
                    self.ws();
                    if self.eat(b",") {
                        continue;
                    }
                    if self.eat(b"}") {
                        return Ok(Json::Obj(members));
                    }
                    return self.err("expected , or }");
                }
            }
            Some(c) if *c == b'-' || c.is_ascii_digit() => self.number(),
            Some(_) => self.err("unexpected character"),
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        while self.i < self.s.len()
            && matches!(
                self.s[self.i],
                b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
            )
        {
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
        text.parse::<f64>()
            .map(Json::Num)
            .map_err(|_| format!("bad number {text:?} at byte {start}"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .s
            .get(self.i..self.i + 4)
            .ok_or("truncated \\u escape")?;
        let text = std::str::from_utf8(digits).map_err(|e| e.to_string())?;
        let v = u32::from_str_radix(text, 16).map_err(|_| format!("bad \\u escape {text:?}"))?;
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.s.len() && !matches!(self.s[self.i], b'"' | b'\\' | 0..=0x1f) {
                self.i += 1;
            }
            // The input came from a &str, and we stopped on ASCII: valid UTF-8.
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?);
            match self.s.get(self.i) {
                None => return self.err("unterminated string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let Some(&esc) = self.s.get(self.i) else {
                        return self.err("unterminated escape");
                    };
                    self.i += 1;
                    match esc {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) && self.eat(b"\\u") {
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return self.err("unpaired surrogate");
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            match char::from_u32(code) {
                                Some(c) => out.push(c),
                                None => return self.err("unpaired surrogate"),
                            }
                        }
                        _ => return self.err("bad escape"),
                    }
                }
                Some(_) => return self.err("control character in string"),
            }
        }
    }
}

//! A private Apache for end-to-end tests, and a small HTTP/1.1 client.
//!
//! Std only. The configuration comes from
//! `scripts/apache-instance` (which `Include`s the deployable files in
//! `apache/` verbatim); Apache runs in the foreground in its own process
//! group, and [`Apache`]'s drop stops it (SIGTERM, bounded wait, then
//! SIGKILL to the whole group), also when the test panics.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::cgi::find;
use super::ports::free_port;
use super::process::bin;
use super::process::read_by;
use super::process::read_text;

/// How long Apache may take to answer its first request.
pub const APACHE_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long Apache may take to exit after SIGTERM before it is killed.
pub const APACHE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect, read and write timeout of [`http`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

const POLL: Duration = Duration::from_millis(20);

/// How Apache runs the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `apache/tourney-register.conf`: mod_fcgid starts the binary.
    Fcgid,
    /// `apache/tourney-register-proxy.conf`: mod_proxy_fcgi to a `--listen` relay.
    Proxy,
    /// `apache/tourney-register-cgi.conf`: mod_cgid runs the binary per request.
    Cgi,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fcgid => "fcgid",
            Mode::Proxy => "proxy",
            Mode::Cgi => "cgi",
        }
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/apache-instance`.
pub fn instance_script() -> PathBuf {
    repo().join("scripts/apache-instance")
}

/// Where `apache2` is, or a panic that says how to install it: these tests
/// must never pass by skipping.
pub fn apache2() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join("apache2");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "apache2 is not installed, so the Apache end-to-end tests cannot run. \
         On Debian: apt-get install apache2 libapache2-mod-fcgid (as .ci/run does)"
    );
}

fn require_module(name: &str) {
    let path = Path::new("/usr/lib/apache2/modules").join(format!("mod_{name}.so"));
    assert!(
        path.is_file(),
        "{} is missing: install it (Debian: apt-get install apache2 libapache2-mod-fcgid)",
        path.display()
    );
}

/// A fresh directory under the temp dir, world-traversable (Apache's
/// children run as www-data when the tests run as root).
fn fresh_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("trt-{tag}-{}-{n}", std::process::id()));
        match fs::create_dir(&path) {
            // Canonical, as scripts/apache-instance writes it into instance.txt.
            Ok(()) => return fs::canonicalize(&path).unwrap_or(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("cannot create {}: {e}", path.display()),
        }
    }
}

/// A running private Apache on 127.0.0.1; stopped on drop.
pub struct Apache {
    child: Child,
    dir: PathBuf,
    port: u16,
    mode: Mode,
    stopped: bool,
}

impl Apache {
    /// Starts Apache in `mode` with `scripts/apache-instance` options such as
    /// `["--bot-addr", "127.0.0.1:9", "--bot-timeout", "1"]` (the binary and
    /// port are filled in), and waits (bounded) until it answers. Retries on
    /// another port if the chosen one was taken meanwhile.
    pub fn start(mode: Mode, options: &[&str]) -> Apache {
        apache2();
        match mode {
            Mode::Fcgid => require_module("fcgid"),
            Mode::Proxy => require_module("proxy_fcgi"),
            Mode::Cgi => require_module("cgid"),
        }
        let mut last = String::new();
        for _ in 0..3 {
            match Apache::try_start(mode, options) {
                Ok(apache) => return apache,
                Err((msg, port_taken)) => {
                    last = msg;
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        panic!("{last}");
    }

    fn try_start(mode: Mode, options: &[&str]) -> Result<Apache, (String, bool)> {
        let dir = fresh_dir(&format!("apache-{}", mode.name()));
        let port = free_port();
        let out = File::create(dir.join("apache2.out")).expect("apache2.out");
        let err = out.try_clone().expect("apache2.out");
        let mut cmd = Command::new("python3");
        cmd.arg(instance_script())
            .arg("run")
            .arg(&dir)
            .args(["--mode", mode.name(), "--port", &port.to_string()])
            .arg("--bin")
            .arg(bin())
            .args(options)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group, so a stuck Apache and everything it
            // started (mod_fcgid's processes) can be killed together.
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", instance_script().display()));
        let mut apache = Apache {
            child,
            dir,
            port,
            mode,
            stopped: false,
        };
        let deadline = Instant::now() + APACHE_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = apache.child.try_wait() {
                apache.stopped = true;
                let log = apache.diagnostics();
                let taken = log.contains("Address already in use");
                return Err((
                    format!(
                        "Apache ({}) exited ({status}) before answering:\n{log}",
                        mode.name()
                    ),
                    taken,
                ));
            }
            // Another instance may hold the port (both were handed the same
            // free one): only our own instance.txt counts.
            if let Ok(resp) = try_http(
                port,
                b"GET /instance.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                true,
            ) && resp.status == 200
                && resp.body == apache.dir.as_os_str().as_encoded_bytes()
            {
                return Ok(apache);
            }
            if Instant::now() >= deadline {
                let log = apache.diagnostics();
                return Err((
                    format!(
                        "Apache ({}) did not answer on 127.0.0.1:{port} within {APACHE_START_TIMEOUT:?}:\n{log}",
                        mode.name()
                    ),
                    false,
                ));
            }
            thread::sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The instance directory (httpd.conf, logs/, run/, state/, htdocs/).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn error_log(&self) -> String {
        read_text(&self.dir.join("logs/error.log"))
    }

    pub fn access_log(&self) -> String {
        read_text(&self.dir.join("logs/access.log"))
    }

    /// Every regular file under the instance directory with its bytes
    /// (sockets and unreadable files are left out).
    pub fn files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        files_under(&self.dir)
    }

    /// `GET target` with `Connection: close`.
    pub fn get(&self, target: &str) -> HttpResponse {
        self.request("GET", target, &[], b"")
    }

    /// One request with extra headers (raw bytes allowed) and a body.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> HttpResponse {
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n").into_bytes();
        for (name, value) in headers {
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(value);
            raw.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() || method == "POST" {
            raw.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        raw.extend_from_slice(b"Connection: close\r\n\r\n");
        raw.extend_from_slice(body);
        self.raw(&raw, method == "HEAD")
    }

    /// Sends `raw` as is and reads the answer; panics (with Apache's error
    /// log) if there is none.
    pub fn raw(&self, raw: &[u8], head: bool) -> HttpResponse {
        let result =
            try_http(self.port, raw, true).and_then(|r| if head { Ok(r) } else { r.dechunked() });
        result.unwrap_or_else(|e| {
            panic!(
                "HTTP request to Apache ({}) on port {} failed: {e}\nrequest: {:?}\n{}",
                self.mode.name(),
                self.port,
                String::from_utf8_lossy(&raw[..raw.len().min(300)]),
                self.diagnostics()
            )
        })
    }

    /// The tail of the error log and the launcher's output.
    pub fn diagnostics(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- {}/logs/error.log (tail) ---\n{}\n--- apache2.out ---\n{}",
            self.dir.display(),
            tail(self.error_log()),
            tail(read_text(&self.dir.join("apache2.out")))
        )
    }

    /// SIGTERM, wait at most [`APACHE_STOP_TIMEOUT`], then SIGKILL the whole
    /// process group. True if Apache exited on SIGTERM in time.
    pub fn stop(&mut self) -> bool {
        if self.stopped {
            return true;
        }
        self.stopped = true;
        let pid = self.child.id();
        signal(&pid.to_string(), "TERM");
        let deadline = Instant::now() + APACHE_STOP_TIMEOUT;
        let clean = loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                _ => break false,
            }
        };
        // Whatever is left of the group: children that outlived their parent.
        signal(&format!("-{pid}"), "KILL");
        if !clean {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        clean
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        let clean = self.stop();
        if thread::panicking() || !clean {
            eprintln!(
                "[apache] {} instance (stopped cleanly: {clean}):\n{}",
                self.mode.name(),
                self.diagnostics()
            );
        }
        if std::env::var_os("TOURNEY_TEST_KEEP_TMP").is_some() {
            eprintln!("[apache] keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// kill(1) with a signal name; `target` may be `-PGID`.
pub(super) fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, "--", target])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Every regular file under `dir` (recursively) with its bytes.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(bytes) = fs::read(&path)
            {
                // Regular files only: sockets and pipes are not is_file().
                out.push((path, bytes));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------

/// One HTTP response, as read off the wire.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub reason: String,
    /// In order, names as sent, values trimmed (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    /// Everything after the head (de-chunked unless it was a HEAD).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn dechunked(mut self) -> io::Result<HttpResponse> {
        let chunked = self
            .header("Transfer-Encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            self.body = dechunk(&self.body)?;
        }
        Ok(self)
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Decodes a complete `Transfer-Encoding: chunked` body (trailers ignored).
pub fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end =
            find(data, b"\r\n").ok_or_else(|| bad("chunk size line without CRLF".into()))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
        let size = usize::from_str_radix(&size_text, 16)
            .map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(bad("truncated chunk".into()));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Sends `raw` to 127.0.0.1:`port` and reads the whole answer (the request
/// should say `Connection: close`). With `half_close`, the request side is
/// shut once `raw` is sent; without, it stays open as a browser's does (nginx
/// takes a half-close for a player who has gone). Every step is bounded by
/// [`HTTP_TIMEOUT`], the whole answer by one deadline.
pub fn try_http(port: u16, raw: &[u8], half_close: bool) -> io::Result<HttpResponse> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    // A server may answer and close before it has read everything (a 414
    // for a huge request line): a failed write still leaves its answer to read.
    let write_error = stream.write_all(raw).err();
    if half_close {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let mut data = Vec::new();
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut buf = [0u8; 16384];
    loop {
        let read = read_by(
            deadline,
            |left| stream.set_read_timeout(Some(left)),
            || (&stream).read(&mut buf),
        );
        match read {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            // A reset after a complete answer (Apache closing a lingering
            // connection) still leaves the answer readable.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !data.is_empty() => break,
            Err(e) => return Err(write_error.unwrap_or(e)),
        }
    }
    match (parse_response(&data), write_error) {
        (Err(_), Some(e)) => Err(e),
        (result, _) => result,
    }
}

/// Parses a raw HTTP/1.x response (head + whatever followed it).
pub fn parse_response(data: &[u8]) -> io::Result<HttpResponse> {
    let end = find(data, b"\r\n\r\n").ok_or_else(|| {
        bad(format!(
            "no end of headers in {} bytes: {:?}",
            data.len(),
            String::from_utf8_lossy(&data[..data.len().min(200)])
        ))
    })?;
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("bad status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("header line without a colon: {line:?}")))?;
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok(HttpResponse {
        status,
        reason,
        headers,
        body: data[end + 4..].to_vec(),
    })
}

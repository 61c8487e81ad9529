//! The binary in CGI mode, and CGI-form output (`Status:` + headers + body).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::process::{RUN_TIMEOUT, bin_command, run_bounded};

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

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
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

/// One CGI run of `GET ?query` with `env` on top: the page and stderr;
/// panics unless it exited 0.
pub fn cgi_get(env: &[(&str, &str)], query: &str) -> (HttpLike, String) {
    let mut all = vec![("REQUEST_METHOD", "GET"), ("QUERY_STRING", query)];
    all.extend_from_slice(env);
    let (page, stderr, status) = run_cgi(&all);
    assert!(status.success(), "CGI exit {status}; stderr:\n{stderr}");
    (page, stderr)
}

//! The bot peer: `tests/peer/bot.py`, the Python stand-in for the Discord
//! cog, and what it recorded.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::json::{Json, parse_json};
use super::process::{
    STOP_TIMEOUT, TempDir, kill_and_reap, read_text, send_signal, wait_bounded, wait_until,
};

/// How long a bot may take to print its `listening on` line.
pub const BOT_START_TIMEOUT: Duration = Duration::from_secs(10);

/// `tests/peer/bot.py`.
pub fn bot_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peer/bot.py")
}

/// What `tests/peer/bot.py` answers with `approve` or `slow` (no `--message`).
pub const APPROVED: &str = "You're registered, welcome to the tournament!";
/// [`APPROVED`] as the page's autoescaping shows it.
pub const APPROVED_HTML: &str = "You&#x27;re registered, welcome to the tournament!";
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
    /// Holds the record and the socket; removed on drop.
    _dir: TempDir,
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
        // Each TCP bot gets an address of its own in 127.0.0.0/8. The suites
        // run in parallel, and a relay still retrying a killed bot's port
        // must not reach a new bot that the kernel gave the same port.
        let host = own_loopback_host();
        let placed = ["--unix", "--host", "--port"]
            .iter()
            .any(|flag| extra.contains(flag));
        let own_host = ["--host", host.as_str()];
        let record = dir.join("received.jsonl");
        let stderr = dir.join("stderr.log");
        let mut cmd = Command::new("python3");
        cmd.arg(bot_script())
            .args(["--wire", wire, "--behaviour", behaviour, "--record"])
            .arg(&record)
            .args(extra)
            .args(if placed { &[][..] } else { &own_host[..] })
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
            _dir: dir,
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

    /// Asserts that each of `sent` reached the bot exactly once, with
    /// `state` and as a well-formed message, and that nothing else did
    /// (waiting, bounded, for the last to be recorded, then a moment more:
    /// a repeat recorded after the last code sent counts as much as one
    /// before it).
    pub fn assert_received_each_once(&self, sent: &[String], state: &str) {
        self.wait_received(sent.len(), Duration::from_secs(10));
        thread::sleep(Duration::from_millis(200));
        let mut got: Vec<String> = self
            .received()
            .into_iter()
            .map(|r| {
                assert_eq!(r.error, None, "{r:?}");
                assert_eq!(r.state, state);
                r.code
            })
            .collect();
        let mut sent = sent.to_vec();
        got.sort();
        sent.sort();
        let twice: Vec<&String> = got
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| &w[0])
            .collect();
        assert!(
            twice.is_empty(),
            "codes that reached the bot twice: {twice:?}"
        );
        assert_eq!(
            got.len(),
            sent.len(),
            "the bot received {} messages for {} codes sent",
            got.len(),
            sent.len()
        );
        assert!(got == sent, "the bot's codes differ from those sent");
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

/// A loopback address no other bot of this test run is likely to have:
/// 127.x.y.z with x, y, z from 1 to 254, picked at random.
fn own_loopback_host() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let r = h.finish();
    let octet = |shift: u32| 1 + (r >> shift) % 254;
    format!("127.{}.{}.{}", octet(0), octet(8), octet(16))
}

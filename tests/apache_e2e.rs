//! End to end through a real Apache 2.4: a private instance on a free
//! loopback port, configured by `scripts/apache-instance` from the files in
//! `apache/` (included verbatim), in front of the Python bot peer.
//!
//! Every scenario runs twice: under mod_fcgid (`apache/tourney-register.conf`,
//! Apache starts the binary) and under mod_proxy_fcgi
//! (`apache/tourney-register-proxy.conf`, the test starts
//! `tourney-register --listen unix:...`). One more test covers the mod_cgi
//! fallback. If apache2 or its modules are missing, every test fails with
//! the install command: none of them passes by skipping.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::apache::{self, Apache, HttpResponse, Mode};
use crate::support::{self, APPROVED_HTML, Bot, ListenServer, RefusingPort, TempDir, fingerprint};
const REFUSED_HTML: &str = "You&#x27;re already signed up!";
/// How long a log line may take to show up after its answer.
const LOG_WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------

/// A random-looking string over `alphabet`: distinct in every call, so a
/// leak into a log cannot be mistaken for anything else.
fn random(len: usize, alphabet: &[u8]) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut x =
        nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
            alphabet[(r >> 33) as usize % alphabet.len()] as char
        })
        .collect()
}

const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const HEX: &[u8] = b"0123456789abcdef";

/// Shaped like an osu! authorization code (long, hex after a fixed prefix).
fn code() -> String {
    format!("def50200{}", random(600, HEX))
}

/// Shaped like a random state token.
fn state() -> String {
    random(43, B64URL)
}

/// Shaped like a Fernet token (what the cog uses as state): base64url
/// ending in `=`.
fn fernet_state() -> String {
    format!("gAAAAAB{}=", random(112, B64URL))
}

fn link(code: &str, state: &str) -> String {
    format!("/register?code={code}&state={state}")
}

// ---------------------------------------------------------------------------
// A site: Apache + (proxy mode) the relay + the bot
// ---------------------------------------------------------------------------

/// Relay settings that differ from the defaults; they reach the relay
/// through Apache's configuration (Defines) or, in proxy mode, through the
/// `--listen` process's environment.
#[derive(Default, Clone, Copy)]
struct Settings {
    bot_timeout: Option<&'static str>,
    bot_retry: Option<&'static str>,
    wire: Option<&'static str>,
}

/// Fields drop in order: Apache first, then the relay, then the bot.
struct Site {
    apache: Apache,
    relay: Option<ListenServer>,
    _state: TempDir,
    /// Every code and state sent, to look for in the logs at the end.
    secrets: Vec<String>,
}

impl Site {
    fn start(mode: Mode, bot_addr: &str, settings: Settings) -> Site {
        let state = TempDir::new("state");
        let state_dir = state.join("replay");
        let state_dir = state_dir.to_str().expect("UTF-8 temp path").to_string();
        let mut relay = None;
        let mut options: Vec<String> = vec!["--bot-addr".into(), bot_addr.into()];
        match mode {
            Mode::Proxy => {
                let mut env = vec![
                    ("REGISTER_BOT_ADDR", bot_addr),
                    ("REGISTER_STATE_DIR", state_dir.as_str()),
                    ("RUST_LOG", "info"),
                ];
                if let Some(v) = settings.bot_timeout {
                    env.push(("REGISTER_BOT_TIMEOUT", v));
                }
                if let Some(v) = settings.bot_retry {
                    env.push(("REGISTER_BOT_RETRY", v));
                }
                if let Some(v) = settings.wire {
                    env.push(("REGISTER_WIRE", v));
                }
                let server = ListenServer::start_unix(&env);
                let socket = server
                    .addr()
                    .strip_prefix("unix:")
                    .expect("a unix socket")
                    .to_string();
                // Apache's children run as www-data when the tests run as
                // root (the systemd unit uses Group=www-data instead).
                fs::set_permissions(&socket, fs::Permissions::from_mode(0o666))
                    .expect("chmod the relay's socket");
                options.extend(["--backend".into(), server.addr()]);
                relay = Some(server);
            }
            Mode::Fcgid | Mode::Cgi => {
                options.extend(["--state-dir".into(), state_dir.clone()]);
                for (flag, value) in [
                    ("--bot-timeout", settings.bot_timeout),
                    ("--bot-retry", settings.bot_retry),
                    ("--wire", settings.wire),
                ] {
                    if let Some(v) = value {
                        options.extend([flag.into(), v.into()]);
                    }
                }
            }
        }
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let apache = Apache::start(mode, &options);
        Site {
            apache,
            relay,
            _state: state,
            secrets: Vec::new(),
        }
    }

    fn mode(&self) -> Mode {
        self.apache.mode()
    }

    /// GET a sign-in link, remembering its code and state as secrets.
    fn sign_in(&mut self, code: &str, state: &str) -> HttpResponse {
        self.secrets.push(code.to_string());
        self.secrets.push(state.to_string());
        self.apache.get(&link(code, state))
    }

    /// Where the relay's per-request lines go: Apache's error log under
    /// mod_fcgid and mod_cgi, the relay's stderr (the journal, in
    /// production) under mod_proxy_fcgi.
    fn relay_log(&self) -> String {
        match &self.relay {
            Some(relay) => relay.stderr_text(),
            None => self.apache.error_log(),
        }
    }

    /// Waits (bounded) for the relay's line for `code`: `outcome=OUTCOME
    /// status=STATUS ms=N code=FINGERPRINT`.
    fn assert_logged(&self, code: Option<&str>, outcome: &str, status: u16) {
        let fp = code.map(fingerprint).unwrap_or_else(|| "-".to_string());
        let start = format!("outcome={outcome} status={status} ms=");
        let end = format!(" code={fp}");
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            let log = self.relay_log();
            if log
                .lines()
                .any(|l| l.contains(&start) && l.trim_end().ends_with(&end))
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "[{}] no log line `{start}... {end}` within {LOG_WAIT:?}; log:\n{log}",
                    self.mode().name()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// No code or state (nor a 16-character piece of one) in Apache's error
    /// log or any other file of the instance, nor in the relay's logs.
    fn assert_no_secrets(&self) {
        assert!(
            !self.secrets.is_empty(),
            "no secrets recorded: the check would be empty"
        );
        // The access log must show the requests, or its share of the
        // check below would be empty (Apache writes it after answering).
        assert!(
            support::wait_until(Duration::from_secs(30), || self
                .apache
                .access_log()
                .contains("/register")),
            "[{}] no /register request in the access log:\n{}",
            self.mode().name(),
            self.apache.access_log()
        );
        let mut files = self.apache.files();
        if let Some(relay) = &self.relay {
            files.extend(apache::files_under(relay.dir()));
        }
        let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
        assert!(
            names.iter().any(|n| n.ends_with("logs/error.log")),
            "the error log is missing from {names:?}"
        );
        for secret in &self.secrets {
            let mut needles = vec![secret.clone(), secret.replace('=', "%3D")];
            needles.push(secret[..16].to_string());
            needles.push(secret[secret.len() - 16..].to_string());
            for (path, bytes) in &files {
                for needle in &needles {
                    assert!(
                        support::find(bytes, needle.as_bytes()).is_none(),
                        "[{}] {} contains {:?}... ({} bytes of a code or state)",
                        self.mode().name(),
                        path.display(),
                        &needle[..needle.len().min(24)],
                        needle.len()
                    );
                }
            }
        }
    }
}

/// The headers every page of the relay carries, each once, as Apache
/// passes them on.
fn assert_page_headers(mode: Mode, r: &HttpResponse) {
    support::assert_security_headers_in(&r.headers, &format!("[{}] ", mode.name()));
}

fn assert_status(mode: Mode, r: &HttpResponse, status: u16, what: &str) {
    assert_eq!(
        r.status,
        status,
        "[{}] {what}: got {} {}\n{}",
        mode.name(),
        r.status,
        r.reason,
        r.text()
    );
}

/// Runs a scenario once per mode, as two tests in a module named after it.
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn fcgid() {
                    super::$name(super::Mode::Fcgid);
                }
                #[test]
                fn proxy() {
                    super::$name(super::Mode::Proxy);
                }
            }
        )*
    };
}

both_modes!(
    success_page,
    odd_states_and_header_bytes,
    refusal_page,
    cancel_and_bad_input,
    bot_down,
    bot_silent,
    bot_garbage,
    pickle_wire,
);

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// The player signs in: the bot gets exactly the code and state, the page
/// shows the bot's message with the relay's headers, a repeat of the link
/// gets the same answer without a second delivery, and the log has one line
/// per request but no code or state.
fn success_page(mode: Mode) {
    let bot = Bot::start("json", "approve");
    let mut site = Site::start(mode, bot.addr(), Settings::default());
    let (c1, s1) = (code(), state());

    let r = site.sign_in(&c1, &s1);
    assert_status(mode, &r, 200, "approved sign-in");
    assert_page_headers(mode, &r);
    let body = r.text();
    assert!(body.contains(APPROVED_HTML), "[{}] {body}", mode.name());
    assert!(
        body.contains("aria-label=\"Success\""),
        "[{}] {body}",
        mode.name()
    );
    assert_eq!(
        bot.received(),
        [(s1.as_str(), c1.as_str())],
        "[{}]",
        mode.name()
    );
    site.assert_logged(Some(&c1), "approved", 200);

    // A double tap: the first answer again, the bot asked once.
    let again = site.sign_in(&c1, &s1);
    assert_status(mode, &again, 200, "repeated link");
    assert!(again.text().contains(APPROVED_HTML));
    assert_eq!(
        bot.received().len(),
        1,
        "[{}] the code went to the bot twice",
        mode.name()
    );
    site.assert_logged(Some(&c1), "approved-replayed", 200);

    // /register/ (trailing slash) is the same address.
    let (c2, s2) = (code(), state());
    site.secrets.extend([c2.clone(), s2.clone()]);
    let r = site.apache.get(&format!("/register/?code={c2}&state={s2}"));
    assert_status(mode, &r, 200, "/register/");
    assert_eq!(
        bot.received(),
        [(s1.as_str(), c1.as_str()), (s2.as_str(), c2.as_str())],
        "[{}]",
        mode.name()
    );
    site.assert_logged(Some(&c2), "approved", 200);
    site.assert_no_secrets();
}

/// Fernet-style states ending in `=` (raw and as `%3D`), a User-Agent with a
/// raw Latin-1 byte, and a HEAD that must not spend the code.
fn odd_states_and_header_bytes(mode: Mode) {
    let bot = Bot::start("json", "approve");
    let mut site = Site::start(mode, bot.addr(), Settings::default());
    let name = mode.name();

    let (c1, s1) = (code(), fernet_state());
    let r = site.sign_in(&c1, &s1);
    assert_status(mode, &r, 200, "state ending in a raw =");

    let (c2, s2) = (code(), fernet_state());
    site.secrets.extend([c2.clone(), s2.clone()]);
    let encoded = s2.replace('=', "%3D");
    let r = site.apache.get(&link(&c2, &encoded));
    assert_status(mode, &r, 200, "state ending in %3D");

    let (c3, s3) = (code(), state());
    site.secrets.extend([c3.clone(), s3.clone()]);
    let ua: &[u8] = b"Mozilla/5.0 (X11; Linux) caf\xe9/1.0";
    let r = site
        .apache
        .request("GET", &link(&c3, &s3), &[("User-Agent", ua)], b"");
    assert_status(mode, &r, 200, "Latin-1 byte in User-Agent");
    assert!(r.text().contains(APPROVED_HTML), "[{name}] {}", r.text());

    assert_eq!(
        bot.received(),
        [
            (s1.as_str(), c1.as_str()),
            (s2.as_str(), c2.as_str()),
            (s3.as_str(), c3.as_str())
        ],
        "[{name}]"
    );
    assert!(s1.ends_with('=') && s2.ends_with('='));

    // HEAD (a link preview): an answer without a body, and the bot is not asked.
    let (c4, s4) = (code(), state());
    site.secrets.extend([c4.clone(), s4.clone()]);
    let r = site.apache.request("HEAD", &link(&c4, &s4), &[], b"");
    assert!(r.status < 500, "[{name}] HEAD: {} {}", r.status, r.reason);
    assert!(
        r.body.is_empty(),
        "[{name}] HEAD answered with a body: {}",
        r.text()
    );
    site.assert_logged(Some(&c4), "head", 200);
    assert_eq!(bot.received().len(), 3, "[{name}] HEAD reached the bot");
    // The code is still good afterwards.
    let r = site.apache.get(&link(&c4, &s4));
    assert_status(mode, &r, 200, "GET after HEAD");
    assert_eq!(bot.received().len(), 4, "[{name}]");
    site.assert_no_secrets();
}

/// The bot refuses: a cross and its message.
fn refusal_page(mode: Mode) {
    let bot = Bot::start("json", "refuse");
    let mut site = Site::start(mode, bot.addr(), Settings::default());
    let (c, s) = (code(), state());
    let r = site.sign_in(&c, &s);
    assert_status(mode, &r, 200, "refused sign-in");
    assert_page_headers(mode, &r);
    let body = r.text();
    assert!(body.contains(REFUSED_HTML), "[{}] {body}", mode.name());
    assert!(
        body.contains("aria-label=\"Failure\""),
        "[{}] {body}",
        mode.name()
    );
    assert_eq!(bot.received(), [(s.as_str(), c.as_str())]);
    site.assert_logged(Some(&c), "refused", 200);
    site.assert_no_secrets();
}

/// Cancel on osu!'s page, and the bad-input rows: none reaches the bot.
fn cancel_and_bad_input(mode: Mode) {
    let bot = Bot::start("json", "approve");
    let mut site = Site::start(mode, bot.addr(), Settings::default());
    let name = mode.name();
    let s = state();
    let c = code();
    site.secrets.extend([s.clone(), c.clone()]);

    let r = site.apache.get(&format!(
        "/register?error=access_denied&error_description=The+resource+owner+or+authorization+server+denied+the+request.&state={s}"
    ));
    assert!(r.status < 500, "[{name}] cancel: {} {}", r.status, r.reason);
    assert_page_headers(mode, &r);
    assert!(r.text().contains("cancelled"), "[{name}] {}", r.text());
    site.assert_logged(None, "denied", r.status);

    let rows: Vec<(String, u16, &str)> = vec![
        (format!("/register?state={s}"), 400, "missing-param"),
        (
            format!("/register?code={c}&code={c}&state={s}"),
            400,
            "repeated-param",
        ),
        (
            format!("/register?code=%zz{c}&state={s}"),
            400,
            "bad-encoding",
        ),
        (
            format!("/register?code={c}%E9&state={s}"),
            400,
            "bad-encoding",
        ),
        (
            format!("/register?code={}&state={s}", "a".repeat(5000)),
            400,
            "value-too-long",
        ),
        (format!("/register/x?code={c}&state={s}"), 404, "not-found"),
    ];
    for (target, status, outcome) in &rows {
        let r = site.apache.get(target);
        assert_status(
            mode,
            &r,
            *status,
            &format!("{outcome}: {}", &target[..target.len().min(60)]),
        );
        assert_page_headers(mode, &r);
        site.assert_logged(None, outcome, *status);
    }

    // Longer than any sign-in link: Apache (8190-byte request line) or the relay turns it away.
    let r = site
        .apache
        .get(&format!("/register?code={}&state={s}", "b".repeat(12_000)));
    assert!(
        r.status == 414 || r.status == 400,
        "[{name}] very long link: {} {}",
        r.status,
        r.reason
    );

    let r = site.apache.request(
        "POST",
        &link(&c, &s),
        &[("Content-Type", b"application/x-www-form-urlencoded")],
        b"code=x&state=y",
    );
    assert_status(mode, &r, 405, "POST");
    assert_eq!(r.header("Allow"), Some("GET, HEAD"), "[{name}] {r:?}");
    site.assert_logged(None, "bad-method", 405);

    // /registerfoo is not ours at all (Apache's own 404).
    let r = site.apache.get(&format!("/registerfoo?code={c}&state={s}"));
    assert_status(mode, &r, 404, "/registerfoo");
    assert!(
        r.header("Content-Security-Policy").is_none(),
        "[{name}] /registerfoo reached the relay"
    );

    assert!(
        bot.received().is_empty(),
        "[{name}] the bot was contacted: {:?}",
        bot.received()
    );
    site.assert_no_secrets();
}

/// Nothing listens at the bot's address: 503 and a Try again button. The
/// port is held (bound, never listening) for the whole test, so no bot of a
/// test running in parallel can get it and receive this test's code.
fn bot_down(mode: Mode) {
    let down = RefusingPort::new();
    let settings = Settings {
        bot_retry: Some("0.5"),
        ..Settings::default()
    };
    let mut site = Site::start(mode, down.addr(), settings);
    let (c, s) = (code(), state());
    let r = site.sign_in(&c, &s);
    assert_status(mode, &r, 503, "bot down");
    assert_page_headers(mode, &r);
    assert!(
        r.text().contains("Try again"),
        "[{}] {}",
        mode.name(),
        r.text()
    );
    site.assert_logged(Some(&c), "bot-unavailable", 503);
    site.assert_no_secrets();
}

/// The bot reads and never answers: 504 after REGISTER_BOT_TIMEOUT (1 s
/// here, set through Apache's configuration), well before the default 10 s.
fn bot_silent(mode: Mode) {
    let bot = Bot::start("json", "silent");
    let settings = Settings {
        bot_timeout: Some("1"),
        ..Settings::default()
    };
    let mut site = Site::start(mode, bot.addr(), settings);
    let (c, s) = (code(), state());
    let started = Instant::now();
    let r = site.sign_in(&c, &s);
    let took = started.elapsed();
    assert_status(mode, &r, 504, "silent bot");
    assert_page_headers(mode, &r);
    assert!(
        took < Duration::from_secs(6),
        "[{}] 504 took {took:?}: REGISTER_BOT_TIMEOUT=1 did not reach the relay",
        mode.name()
    );
    assert_eq!(bot.received(), [(s.as_str(), c.as_str())]);
    site.assert_logged(Some(&c), "bot-timeout", 504);
    site.assert_no_secrets();
}

/// The bot answers with bytes that are not a reply: 502.
fn bot_garbage(mode: Mode) {
    let bot = Bot::start("json", "garbage");
    let mut site = Site::start(mode, bot.addr(), Settings::default());
    let (c, s) = (code(), state());
    let r = site.sign_in(&c, &s);
    assert_status(mode, &r, 502, "garbage from the bot");
    assert_page_headers(mode, &r);
    assert_eq!(bot.received(), [(s.as_str(), c.as_str())]);
    site.assert_logged(Some(&c), "bot-invalid-reply", 502);
    site.assert_no_secrets();
}

/// REGISTER_WIRE=pickle reaches the relay: a cog written for the old Flask
/// relay gets its pickled dict.
fn pickle_wire(mode: Mode) {
    let bot = Bot::start("pickle", "approve");
    let settings = Settings {
        wire: Some("pickle"),
        ..Settings::default()
    };
    let mut site = Site::start(mode, bot.addr(), settings);
    let (c, s) = (code(), state());
    let r = site.sign_in(&c, &s);
    assert_status(mode, &r, 200, "pickle wire");
    assert!(
        r.text().contains(APPROVED_HTML),
        "[{}] {}",
        mode.name(),
        r.text()
    );
    let got = bot.received();
    assert_eq!(got, [(s.as_str(), c.as_str())]);
    assert_eq!(got[0].wire, "pickle");
    site.assert_no_secrets();
}

/// The plain CGI fallback (`apache/tourney-register-cgi.conf`) serves the
/// same pages.
#[test]
fn cgi_fallback() {
    let bot = Bot::start("json", "approve");
    let mut site = Site::start(Mode::Cgi, bot.addr(), Settings::default());
    let (c, s) = (code(), fernet_state());
    let r = site.sign_in(&c, &s);
    assert_status(Mode::Cgi, &r, 200, "CGI sign-in");
    assert_page_headers(Mode::Cgi, &r);
    assert!(r.text().contains(APPROVED_HTML), "{}", r.text());
    assert_eq!(bot.received(), [(s.as_str(), c.as_str())]);
    site.assert_logged(Some(&c), "approved", 200);
    let r = site.apache.get(&format!("/register/x?code={c}&state={s}"));
    assert_status(Mode::Cgi, &r, 404, "CGI /register/x");
    let r = site.apache.request("HEAD", &link(&code(), &s), &[], b"");
    assert!(r.status < 500 && r.body.is_empty(), "CGI HEAD: {r:?}");
    assert_eq!(bot.received().len(), 1);
    site.assert_no_secrets();
}

/// The instance really runs the files from apache/, and Apache's children
/// really are stopped with it.
#[test]
fn instance_uses_the_deployable_files_and_stops_cleanly() {
    let bot = Bot::start("json", "approve");
    let mut site = Site::start(Mode::Fcgid, bot.addr(), Settings::default());
    let conf = fs::read_to_string(site.apache.dir().join("httpd.conf")).expect("httpd.conf");
    let shipped = fs::canonicalize(apache::repo().join("apache/tourney-register.conf"))
        .expect("apache/tourney-register.conf");
    assert!(
        conf.contains(&format!("Include \"{}\"", shipped.display())),
        "httpd.conf does not include {}:\n{conf}",
        shipped.display()
    );
    assert!(
        !conf.contains("FcgidCmdOptions"),
        "httpd.conf repeats the shipped settings:\n{conf}"
    );
    let (c, s) = (code(), state());
    assert_status(Mode::Fcgid, &site.sign_in(&c, &s), 200, "sign-in");
    let pgid = site.apache.pid();
    assert!(site.apache.stop(), "Apache did not stop on SIGTERM in time");
    // Nothing of its process group (mod_fcgid's relays included) is left.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_in_group(pgid);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left running after stop: {left:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(bot.received(), [(s.as_str(), c.as_str())]);
}

/// PIDs (with names) whose process group is `pgid`, from /proc.
fn processes_in_group(pgid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) =
            fs::read_to_string(PathBuf::from("/proc").join(pid.to_string()).join("stat"))
        else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may hold spaces or parens.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat[stat.find('(').map_or(0, |i| i + 1)..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
            && fields.first() != Some(&"Z")
        {
            out.push((pid, comm));
        }
    }
    out
}

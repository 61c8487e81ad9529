//! A real browser: headless Chromium, driven over WebDriver by Debian's
//! chromedriver, loads the success and failure pages through a private
//! Apache with mod_fcgid, at a phone viewport (390×844, where most players
//! click from the Discord app) and a desktop one. It checks what a player
//! would: the bot's message is on screen and the page does not scroll
//! sideways. Screenshots are kept under target/screenshots/.
//!
//! Then an accessibility audit: axe-core (see `support::axe`) runs in every
//! kind of page the relay renders, each at the phone's and the desktop's
//! size, in light and in dark mode (emulated over the DevTools protocol),
//! and any violation of the WCAG 2.0/2.1 A and AA rules or axe's best
//! practices fails the test with the rule, the element and axe's figures.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::apache::{self, Apache, Mode};
use crate::support::axe;
use crate::support::{
    Bot, ListenServer, RefusingPort, TempDir, as_pairs, free_port, get_params, get_values, read_by,
    send_request, wait_until,
};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The Discord app's browser on a phone, where most players click.
const DISCORD_PHONE_UA: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 Discord/200.0";

/// A long word with no break in it: the page must wrap it, not scroll.
const LONG_WORD: &str =
    "Registered_as_an_exceedingly_long_osu_username_that_never_breaks_0123456789";

struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the browser check needs Debian's chromium and chromium-driver (scripts/install-deps test)"
            );
        }
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting chromedriver: {e}"));
        let driver = Driver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(status) = driver.call("GET", "/status", None)
                && status["value"]["ready"] == json!(true)
            {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// One WebDriver command over a fresh HTTP/1.1 connection, bounded.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        // chromedriver may keep the connection open: read by Content-Length.
        let mut raw = Vec::new();
        let mut buf = [0u8; 16384];
        let (head, body) = loop {
            let n = read_by(
                deadline,
                |left| stream.set_read_timeout(Some(left)),
                || (&stream).read(&mut buf),
            )
            .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before the answer".into());
            }
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            match length {
                Some(len) if body.len() >= len => {
                    break (head.to_string(), body[..len].to_string());
                }
                Some(_) => continue,
                None if head
                    .to_ascii_lowercase()
                    .contains("transfer-encoding: chunked") =>
                {
                    if body.ends_with("0\r\n\r\n") {
                        let body = apache::dechunk(body.as_bytes())
                            .map_err(|e| format!("chunked answer: {e}"))?;
                        break (
                            head.to_string(),
                            String::from_utf8_lossy(&body).into_owned(),
                        );
                    }
                }
                None => return Err(format!("no Content-Length in {head}")),
            }
        };
        let value: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if head.starts_with("HTTP/1.1 200") {
            Ok(value)
        } else {
            Err(format!("{head}\n{value}"))
        }
    }

    fn session(&self, args: &[String], mobile: Option<(u32, u32)>) -> Session<'_> {
        let mut options = json!({ "binary": CHROMIUM, "args": args });
        if let Some((width, height)) = mobile {
            options["mobileEmulation"] = json!({
                "deviceMetrics": { "width": width, "height": height, "pixelRatio": 3.0, "mobile": true, "touch": true },
                "userAgent": DISCORD_PHONE_UA
            });
        }
        let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": options } } });
        let created = self
            .call("POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("new session: {e}"));
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id: {created}"))
            .to_string();
        Session { driver: self, id }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl Session<'_> {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let full = format!("/session/{}{path}", self.id);
        self.driver
            .call(method, &full, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))["value"]
            .clone()
    }

    fn open(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// What a player would see of the page: the message's box against the
    /// viewport, and how wide the document is.
    fn layout(&self) -> Value {
        let script = "const m = document.getElementById('message'); const r = m.getBoundingClientRect(); \
             const s = getComputedStyle(m); \
             return { text: m.innerText, title: document.querySelector('h1').innerText, \
             top: r.top, bottom: r.bottom, left: r.left, right: r.right, width: r.width, height: r.height, \
             visibility: s.visibility, display: s.display, opacity: s.opacity, \
             innerWidth: window.innerWidth, innerHeight: window.innerHeight, \
             scrollWidth: document.documentElement.scrollWidth, \
             ok: document.querySelector('svg[aria-label=Success]') !== null };";
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// A script run in the page by WebDriver (`execute/sync`).
    fn execute(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// [`Session::execute`], its error returned.
    fn try_execute(&self, script: &str) -> Result<Value, String> {
        let path = format!("/session/{}/execute/sync", self.id);
        let body = json!({ "script": script, "args": [] });
        self.driver
            .call("POST", &path, Some(&body))
            .map(|answer| answer["value"].clone())
    }

    /// A script that calls back when done (`execute/async`).
    fn execute_async(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// A DevTools protocol command, through chromedriver.
    fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(json!({ "cmd": cmd, "params": params })),
        )
    }

    /// Shows the page loaded now at `viewport`'s size (a phone's with touch
    /// and its pixel ratio, as `mobileEmulation` does) in `scheme`.
    fn emulate(&self, viewport: &Viewport, scheme: Scheme) {
        let (mobile, (width, height)) = match (viewport.mobile, viewport.window) {
            (Some(size), _) => (true, size),
            (None, Some(size)) => (false, size),
            (None, None) => panic!("viewport {} has no size", viewport.name),
        };
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "mobile": mobile,
                    "deviceScaleFactor": if mobile { 3.0 } else { 1.0 } }),
        );
        self.cdp(
            "Emulation.setTouchEmulationEnabled",
            json!({ "enabled": mobile, "maxTouchPoints": 5 }),
        );
        self.cdp(
            "Emulation.setEmulatedMedia",
            json!({ "media": "", "features": [{ "name": "prefers-color-scheme", "value": scheme.name() }] }),
        );
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().unwrap_or_default());
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .call("DELETE", &format!("/session/{}", self.id), None);
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn screenshots_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("screenshots");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

fn chromium_args(profile: &TempDir, window: Option<(u32, u32)>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", profile.path().display()));
    if let Some((w, h)) = window {
        args.push(format!("--window-size={w},{h}"));
    }
    args
}

const PHONE: Viewport = Viewport {
    name: "phone",
    mobile: Some((390, 844)),
    window: None,
    width: 390,
};
const DESKTOP: Viewport = Viewport {
    name: "desktop",
    mobile: None,
    window: Some((1280, 800)),
    width: 1280,
};

struct Viewport {
    name: &'static str,
    /// Emulated phone metrics (width, height).
    mobile: Option<(u32, u32)>,
    /// Desktop window size.
    window: Option<(u32, u32)>,
    width: u32,
}

/// Opens the page for a code and checks what the player sees: the bot's
/// message, whole and on screen, the right symbol, no sideways scroll.
fn check_page(session: &Session<'_>, viewport: &Viewport, url: &str, message: &str, ok: bool) {
    session.open(url);
    let layout = session.layout();
    let what = format!("{} {url}: {layout}", viewport.name);
    let num = |k: &str| {
        layout[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {what}"))
    };
    assert_eq!(layout["text"], json!(message), "{what}");
    assert_eq!(layout["ok"], json!(ok), "{what}");
    assert_eq!(num("innerWidth") as u32, viewport.width, "{what}");
    assert!(
        num("width") > 0.0 && num("height") > 0.0,
        "message has no size: {what}"
    );
    assert!(
        num("top") >= 0.0 && num("bottom") <= num("innerHeight"),
        "message off screen: {what}"
    );
    assert!(
        num("left") >= 0.0 && num("right") <= num("innerWidth"),
        "message cut at the side: {what}"
    );
    assert_eq!(layout["visibility"], json!("visible"), "{what}");
    assert!(
        num("scrollWidth") <= num("innerWidth"),
        "horizontal scroll: {what}"
    );
}

#[test]
fn pages_read_well_on_a_phone_and_a_desktop() {
    // The demo bot refuses states that start with "taken" and approves the rest.
    let bot = Bot::start("json", "demo");
    let apache = Apache::start(Mode::Fcgid, &["--bot-addr", bot.addr()]);
    let driver = Driver::start();
    let shots = screenshots_dir();
    let pages = [
        (
            "success",
            "player",
            true,
            "You're registered, welcome to the tournament!",
        ),
        ("failure", "taken", false, "You're already signed up!"),
    ];
    let mut n = 0;
    for viewport in [PHONE, DESKTOP] {
        let profile = TempDir::new("chromium");
        let session = driver.session(&chromium_args(&profile, viewport.window), viewport.mobile);
        for (page, state_prefix, ok, message) in pages {
            n += 1;
            let code = format!("browser-code-{}-{n}", viewport.name);
            let state = format!("{state_prefix}-gAAAAABbrowser{n}=");
            let url = format!(
                "http://127.0.0.1:{}/register?code={code}&state={}",
                apache.port(),
                state.replace('=', "%3D")
            );
            check_page(&session, &viewport, &url, message, ok);
            session.screenshot(&shots.join(format!("{page}-{}.png", viewport.name)));
            let got = bot.wait_received(n, Duration::from_secs(10));
            assert_eq!(
                got.last().map(|r| (r.state.as_str(), r.code.as_str())),
                Some((state.as_str(), code.as_str()))
            );
        }
    }
    assert_eq!(
        bot.received().len(),
        n,
        "each page load delivered its code once"
    );
}

#[test]
fn a_long_unbroken_message_wraps_instead_of_scrolling() {
    let message = format!("Registered as {LONG_WORD}!");
    let bot = Bot::start_with("json", "echo", &["--message", &message]);
    let apache = Apache::start(Mode::Fcgid, &["--bot-addr", bot.addr()]);
    let driver = Driver::start();
    let profile = TempDir::new("chromium");
    let session = driver.session(&chromium_args(&profile, PHONE.window), PHONE.mobile);
    let url = format!(
        "http://127.0.0.1:{}/register?code=long-word-code&state=s",
        apache.port()
    );
    check_page(&session, &PHONE, &url, &message, true);
    session.screenshot(&screenshots_dir().join("long-message-phone.png"));
    assert_eq!(bot.received(), [("s", "long-word-code")]);
}

// ---------------------------------------------------------------------------
// Accessibility: axe-core in every page the program renders
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Scheme {
    Light,
    Dark,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Light => "light",
            Scheme::Dark => "dark",
        }
    }
}

/// How the browser gets to a page.
enum Visit {
    /// A link followed: GET.
    Get(String),
    /// A form on a page of the same site (without the relay's policy)
    /// posted to the relay.
    Post { form_page: String },
}

/// The page a visit must show: its status, headline, message, mark and
/// retry button, and the relay's `outcome=` name for it.
struct Expect {
    status: u16,
    title: &'static str,
    message: String,
    ok: bool,
    retry: bool,
    outcome: &'static str,
}

impl Expect {
    fn failure(status: u16, outcome: &'static str, title: &'static str, message: &str) -> Expect {
        Expect {
            status,
            title,
            message: message.to_string(),
            ok: false,
            retry: false,
            outcome,
        }
    }
}

const LINK_DOES_NOT_WORK: &str = "This link doesn't work";
const NOTHING_LOST: &str = "Your sign-in was not used yet, so nothing is lost.";

/// The pages kept as phone screenshots in dark mode (under
/// target/screenshots/audit/; each costs half a second).
const DARK_SCREENSHOTS: [&str; 3] = ["approved", "refused", "bot-down"];

/// What the browser shows of the page, and of its own state: the status
/// of the navigation, the texts, the viewport width, the colour scheme the
/// page sees and the background it painted.
const LOOK: &str = "const nav = performance.getEntriesByType('navigation')[0]; \
     const text = (s) => { const e = document.querySelector(s); return e ? e.innerText : null; }; \
     return { status: nav ? nav.responseStatus : null, title: text('h1'), doc_title: document.title, \
     message: text('#message'), ok: document.querySelector('svg[aria-label=Success]') !== null, \
     retry: [...document.querySelectorAll('a')].some((a) => a.innerText.trim() === 'Try again'), \
     content_type: document.contentType, width: window.innerWidth, \
     dark: matchMedia('(prefers-color-scheme: dark)').matches, \
     background: getComputedStyle(document.body).backgroundColor, has_axe: !!window.axe };";

/// Whether an inline script added to the page runs: never under the
/// relay's Content-Security-Policy.
const INLINE_SCRIPT_RUNS: &str = "delete document.documentElement.dataset.inlineRan; \
     const s = document.createElement('script'); \
     s.textContent = 'document.documentElement.dataset.inlineRan = \"yes\"'; \
     document.head.appendChild(s); s.remove(); \
     const ran = document.documentElement.dataset.inlineRan === 'yes'; \
     delete document.documentElement.dataset.inlineRan; return ran;";

/// Runs axe in each page at each size and scheme, and keeps count.
struct Auditor<'a> {
    session: &'a Session<'a>,
    axe: String,
    version: String,
    shots: PathBuf,
    pages: usize,
    runs: usize,
    rules: std::collections::BTreeSet<String>,
    failures: Vec<String>,
}

impl<'a> Auditor<'a> {
    fn new(session: &'a Session<'a>, axe: String) -> Auditor<'a> {
        let shots = screenshots_dir().join("audit");
        std::fs::create_dir_all(&shots).unwrap_or_else(|e| panic!("{}: {e}", shots.display()));
        Auditor {
            session,
            axe,
            version: axe::pinned_version(),
            shots,
            pages: 0,
            runs: 0,
            rules: Default::default(),
            failures: Vec::new(),
        }
    }

    /// Opens one page, checks it is the page `expect` describes (and that
    /// the relay logged it so in `log`), then audits it phone and desktop,
    /// light and dark.
    fn page(&mut self, name: &str, visit: &Visit, expect: &Expect, log: &dyn Fn() -> String) {
        let logged = |log: &str| {
            let want = format!("outcome={} status={} ", expect.outcome, expect.status);
            log.lines().filter(|l| l.contains(&want)).count()
        };
        let before = logged(&log());
        self.session.emulate(&PHONE, Scheme::Light);
        match visit {
            Visit::Get(url) => self.session.open(url),
            Visit::Post { form_page } => {
                self.session.open(form_page);
                // The control for the policy check below: a page without
                // the relay's policy runs an added inline script.
                assert_eq!(
                    self.session.execute(INLINE_SCRIPT_RUNS),
                    json!(true),
                    "{name}: inline scripts do not run even without a policy"
                );
                self.session.execute("document.forms[0].submit();");
                // A script run while the next page loads may fail: not there yet.
                let arrived = wait_until(Duration::from_secs(20), || {
                    self.session
                        .try_execute(LOOK)
                        .is_ok_and(|look| look["title"].is_string() && look["status"] != json!(200))
                });
                assert!(arrived, "{name}: the posted form led nowhere");
            }
        }
        assert!(
            wait_until(Duration::from_secs(10), || logged(&log()) > before),
            "{name}: the relay logged no `outcome={} status={}`:\n{}",
            expect.outcome,
            expect.status,
            log()
        );
        let mut backgrounds = Vec::new();
        for viewport in [PHONE, DESKTOP] {
            for scheme in [Scheme::Light, Scheme::Dark] {
                self.session.emulate(&viewport, scheme);
                let what = format!("{name} ({} {})", viewport.name, scheme.name());
                let look = self.session.execute(LOOK);
                self.check_look(&what, &look, expect, &viewport, scheme);
                backgrounds.push((scheme.name(), look["background"].clone()));
                if look["has_axe"] != json!(true) {
                    let loaded = self.session.execute(&axe::inject_script(&self.axe));
                    assert_eq!(loaded, json!(self.version), "{what}: axe did not load");
                }
                let audit = axe::Audit::from_value(&self.session.execute_async(&axe::run_script()));
                self.record(&what, &audit);
                if viewport.mobile.is_some()
                    && matches!(scheme, Scheme::Dark)
                    && DARK_SCREENSHOTS.contains(&name)
                {
                    let file = format!("{name}-{}-{}.png", viewport.name, scheme.name());
                    self.session.screenshot(&self.shots.join(file));
                }
            }
        }
        // The emulated scheme reaches the page's CSS, so both were audited.
        let light: Vec<_> = backgrounds.iter().filter(|b| b.0 == "light").collect();
        let dark: Vec<_> = backgrounds.iter().filter(|b| b.0 == "dark").collect();
        assert!(
            light.iter().all(|l| dark.iter().all(|d| l.1 != d.1)),
            "{name}: the same background light and dark: {backgrounds:?}"
        );
        assert_eq!(
            self.session.execute(INLINE_SCRIPT_RUNS),
            json!(false),
            "{name}: an inline script ran: the Content-Security-Policy is not in force"
        );
        self.pages += 1;
    }

    fn check_look(
        &self,
        what: &str,
        look: &Value,
        expect: &Expect,
        viewport: &Viewport,
        scheme: Scheme,
    ) {
        assert_eq!(look["status"], json!(expect.status), "{what}: {look}");
        assert_eq!(look["title"], json!(expect.title), "{what}: {look}");
        assert_eq!(look["doc_title"], json!(expect.title), "{what}: {look}");
        assert_eq!(look["message"], json!(expect.message), "{what}: {look}");
        assert_eq!(look["ok"], json!(expect.ok), "{what}: {look}");
        assert_eq!(look["retry"], json!(expect.retry), "{what}: {look}");
        assert_eq!(look["content_type"], json!("text/html"), "{what}: {look}");
        assert_eq!(look["width"], json!(viewport.width), "{what}: {look}");
        let dark = matches!(scheme, Scheme::Dark);
        assert_eq!(look["dark"], json!(dark), "{what}: {look}");
    }

    fn record(&mut self, what: &str, audit: &axe::Audit) {
        assert_eq!(audit.version, self.version, "{what}");
        let rules = audit.rules();
        assert!(
            rules.len() >= axe::MIN_RULES,
            "{what}: axe checked only {} rules: {rules:?}",
            rules.len()
        );
        // Contrast was measured, not skipped: the page has text.
        assert!(
            audit.passes.iter().any(|r| r == "color-contrast")
                || audit.violations.iter().any(|f| f.id == "color-contrast"),
            "{what}: color-contrast was not decided:\n{}",
            audit.incomplete_report()
        );
        self.rules.extend(rules.into_iter().map(str::to_string));
        self.runs += 1;
        if !audit.incomplete.is_empty() {
            eprintln!(
                "[axe] {what}: undecided (not counted as failures):\n{}",
                audit.incomplete_report()
            );
        }
        if !audit.violations.is_empty() {
            self.failures.push(format!(
                "{what}: {} violation(s)\n{}",
                audit.violations.len(),
                audit.violations_report()
            ));
        }
    }

    /// Fails with every violation found; prints the counts, also when the
    /// test passes (straight to stderr, which the test harness does not
    /// capture), so every run of the suite shows them.
    fn finish(self) {
        let _ = writeln!(
            std::io::stderr(),
            "accessibility audit: axe-core {}, {} pages x 2 sizes x 2 colour schemes = {} runs, \
             {} distinct rules checked ({} tags: {}), {} run(s) with violations",
            self.version,
            self.pages,
            self.runs,
            self.rules.len(),
            axe::TAGS.len(),
            axe::TAGS.join(" "),
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "accessibility violations:\n{}",
            self.failures.join("\n")
        );
    }
}

/// Every kind of page the program renders — an answer, approved, refused
/// and replayed; osu!'s cancel and error; each 4xx; each 5xx of a bot that
/// is down, slow or garbled; the unconfirmed page; the connection cap's
/// 503; the 500 of a broken setting — served as a player gets them
/// (through Apache: status, headers and policy included), and audited
/// with axe-core at a phone's and a desktop's size, light and dark.
#[test]
fn every_page_passes_an_accessibility_audit_light_and_dark() {
    // First, so that a missing axe-core fails at once.
    let axe = axe::source();
    let demo_bot = Bot::start("json", "demo");
    let down = RefusingPort::new();
    let slow = Bot::start_with("json", "slow", &["--delay", "30"]);
    let garbage = Bot::start("json", "garbage");
    let failing_bots = [down.addr(), slow.addr(), garbage.addr()];
    let capped = CappedRelay::start();
    thread::scope(|s| {
        // The browser starts while the first Apache does; the others start
        // while the first one's pages are audited.
        let demo = s.spawn(|| {
            // The relay's own 414 needs a longer request line than Apache's default.
            Apache::start(
                Mode::Fcgid,
                &[
                    "--bot-addr",
                    demo_bot.addr(),
                    "--directive",
                    "LimitRequestLine 16384",
                ],
            )
        });
        let others = s.spawn(|| {
            let failing = failing_bots
                .map(|bot| Apache::start(Mode::Fcgid, &["--bot-addr", bot, "--bot-timeout", "1"]));
            let proxy = Apache::start(Mode::Proxy, &["--backend", &capped.relay.addr()]);
            // CGI with a template that does not load.
            let cgi = Apache::start(
                Mode::Cgi,
                &[
                    "--bot-addr",
                    "127.0.0.1:9",
                    "--template",
                    "/nonexistent/page.html",
                ],
            );
            (failing, proxy, cgi)
        });
        let driver = Driver::start();
        let profile = TempDir::new("chromium");
        let session = driver.session(&chromium_args(&profile, DESKTOP.window), None);
        session.cdp(
            "Emulation.setUserAgentOverride",
            json!({ "userAgent": DISCORD_PHONE_UA }),
        );
        let mut audit = Auditor::new(&session, axe);
        audit_answers_and_links(&mut audit, &joined(demo), &demo_bot);
        let (failing, proxy, cgi) = joined(others);
        audit_bot_failures(&mut audit, &failing);
        audit_unconfirmed_and_overloaded(&mut audit, &proxy, &capped);
        audit.page(
            "misconfigured",
            &Visit::Get(format!(
                "http://127.0.0.1:{}/register?code=c&state=s",
                cgi.port()
            )),
            &Expect::failure(
                500,
                "misconfigured",
                "Sign-ups are not set up correctly",
                "The server's configuration has an error.",
            ),
            &|| cgi.error_log(),
        );
        audit.finish();
    });
}

fn joined<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The bot's answers (approved, refused, the same link again), osu!'s
/// cancel and error, and every link the relay turns away.
fn audit_answers_and_links(audit: &mut Auditor<'_>, apache: &Apache, bot: &Bot) {
    let log = || apache.error_log();
    let base = format!("http://127.0.0.1:{}/register", apache.port());
    let approved = format!("{base}?code=audit-approved&state=player-s");
    let welcome = "You're registered, welcome to the tournament!";
    let answer = |ok, message: &str, outcome| Expect {
        status: 200,
        title: if ok {
            "You're signed up"
        } else {
            "Sign-up failed"
        },
        message: message.to_string(),
        ok,
        retry: false,
        outcome,
    };
    audit.page(
        "approved",
        &Visit::Get(approved.clone()),
        &answer(true, welcome, "approved"),
        &log,
    );
    audit.page(
        "refused",
        &Visit::Get(format!("{base}?code=audit-refused&state=taken-s")),
        &answer(false, "You're already signed up!", "refused"),
        &log,
    );
    // The same link again (a reload, a second tap): the first answer.
    audit.page(
        "replayed",
        &Visit::Get(approved),
        &answer(true, welcome, "approved-replayed"),
        &log,
    );
    audit.page(
        "cancelled",
        &Visit::Get(format!(
            "{base}?error=access_denied&error_description=The+resource+owner+denied+the+request.&state=s"
        )),
        &Expect::failure(
            200,
            "denied",
            "Sign-in cancelled",
            "You cancelled the osu! sign-in, so you are not signed up.",
        ),
        &log,
    );
    audit.page(
        "osu-error",
        &Visit::Get(format!(
            "{base}?error=server_error&error_description=Try+later.&state=s"
        )),
        &Expect::failure(
            400,
            "denied",
            "osu! sign-in failed",
            "osu! said: Try later. (server_error)",
        ),
        &log,
    );
    let turned_away = [
        (
            "missing-state",
            format!("{base}?code=c"),
            400,
            "missing-param",
            "The link has no state.",
        ),
        (
            "repeated",
            format!("{base}?code=a&code=b&state=s"),
            400,
            "repeated-param",
            "The link gives code more than once.",
        ),
        (
            "bad-encoding",
            format!("{base}?code=%FF&state=s"),
            400,
            "bad-encoding",
            "The link is damaged: it is not properly encoded.",
        ),
        (
            "value-too-long",
            format!("{base}?code={}&state=s", "c".repeat(4097)),
            400,
            "value-too-long",
            "The link's code is too long.",
        ),
        (
            "query-too-long",
            format!("{base}?code=c&state=s&pad={}", "p".repeat(8200)),
            414,
            "query-too-long",
            "The link is too long to be a sign-in link.",
        ),
        (
            "not-found",
            format!("{base}/elsewhere?code=c&state=s"),
            404,
            "not-found",
            "There is nothing at this address.",
        ),
    ];
    for (name, url, status, outcome, message) in turned_away {
        audit.page(
            name,
            &Visit::Get(url),
            &Expect::failure(status, outcome, LINK_DOES_NOT_WORK, message),
            &log,
        );
    }
    let form = apache.dir().join("htdocs/post.html");
    std::fs::write(
        &form,
        "<!doctype html><title>post</title><form method=post action=\"/register?code=posted&amp;state=s\"></form>",
    )
    .unwrap_or_else(|e| panic!("{}: {e}", form.display()));
    audit.page(
        "bad-method",
        &Visit::Post {
            form_page: format!("http://127.0.0.1:{}/post.html", apache.port()),
        },
        &Expect::failure(
            405,
            "bad-method",
            LINK_DOES_NOT_WORK,
            "This address only answers GET requests.",
        ),
        &log,
    );
    assert_eq!(
        bot.received(),
        [("player-s", "audit-approved"), ("taken-s", "audit-refused")],
        "the bot got each code once, and nothing from the other pages"
    );
}

/// A bot that is down (503, with "Try again"), too slow (504), or answers
/// garbage (502): one Apache each, in that order.
fn audit_bot_failures(audit: &mut Auditor<'_>, apaches: &[Apache; 3]) {
    let failures = [
        (
            "bot-down",
            503,
            "bot-unavailable",
            "The bot is not available",
            NOTHING_LOST,
        ),
        (
            "bot-timeout",
            504,
            "bot-timeout",
            "The bot did not answer in time",
            "Your sign-up may or may not have gone through.",
        ),
        (
            "bot-garbage",
            502,
            "bot-invalid-reply",
            "Something went wrong",
            "The bot gave an answer this page could not read.",
        ),
    ];
    for (apache, (name, status, outcome, title, message)) in apaches.iter().zip(failures) {
        let url = format!(
            "http://127.0.0.1:{}/register?code=audit-{name}&state=s",
            apache.port()
        );
        let expect = Expect {
            retry: status == 503,
            ..Expect::failure(status, outcome, title, message)
        };
        audit.page(name, &Visit::Get(url), &expect, &|| apache.error_log());
    }
}

/// A `--listen` relay (for mod_proxy_fcgi) that serves one connection at
/// most, its replay store and its bot.
struct CappedRelay {
    relay: ListenServer,
    bot: Bot,
    /// The replay store, made by the relay (it must be private to it).
    store: String,
    _state: TempDir,
}

impl CappedRelay {
    fn start() -> CappedRelay {
        let bot = Bot::start("json", "approve");
        let state = TempDir::new("audit-state");
        let store = state.join("replay").to_string_lossy().into_owned();
        let relay = ListenServer::start_unix(&[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", &store),
            ("REGISTER_MAX_CONNS", "1"),
            ("RUST_LOG", "info"),
        ]);
        let addr = relay.addr();
        let socket = addr.strip_prefix("unix:").expect("a unix socket");
        // Apache's children run as www-data when the tests run as root.
        std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap_or_else(|e| panic!("chmod {socket}: {e}"));
        CappedRelay {
            relay,
            bot,
            store,
            _state: state,
        }
    }
}

/// Behind mod_proxy_fcgi: a code whose delivery was cut short by a killed
/// relay (502, unconfirmed), then the relay at its connection cap (503).
fn audit_unconfirmed_and_overloaded(
    audit: &mut Auditor<'_>,
    apache: &Apache,
    capped: &CappedRelay,
) {
    let base = format!("http://127.0.0.1:{}/register", apache.port());
    let log = || capped.relay.stderr_text();
    // Another relay on the same store takes the code to a slow bot and is
    // killed before the bot answers.
    let slow = Bot::start_with("json", "slow", &["--delay", "30"]);
    let mut killed = ListenServer::start_unix(&[
        ("REGISTER_BOT_ADDR", slow.addr()),
        ("REGISTER_STATE_DIR", &capped.store),
        ("REGISTER_BOT_TIMEOUT", "60"),
    ]);
    let mut conn = killed.connect();
    let params = get_params("code=audit-unconfirmed&state=s");
    send_request(&mut conn, 1, &as_pairs(&params), &[], false).expect("sending the request");
    assert_eq!(slow.wait_received(1, Duration::from_secs(15)).len(), 1);
    killed.kill();
    audit.page(
        "unconfirmed",
        &Visit::Get(format!("{base}?code=audit-unconfirmed&state=s")),
        &Expect::failure(
            502,
            "unconfirmed",
            "Your sign-up could not be confirmed",
            "This sign-in link was already used, and the bot may have your sign-up, but its answer was lost.",
        ),
        &log,
    );
    // The only connection held, by a FastCGI client that asked for the
    // relay's values and stays.
    let mut holder = capped.relay.connect();
    let _ = get_values(&mut holder, &[b"FCGI_MPXS_CONNS"]);
    audit.page(
        "overloaded",
        &Visit::Get(format!("{base}?code=audit-overloaded&state=s")),
        &Expect {
            retry: true,
            ..Expect::failure(503, "overloaded", "Too many sign-ups at once", NOTHING_LOST)
        },
        &log,
    );
    assert_eq!(slow.received().len(), 1, "the code reached the bot once");
    assert!(
        capped.bot.received().is_empty(),
        "{:?}",
        capped.bot.received()
    );
}

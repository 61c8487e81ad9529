//! A real browser: headless Chromium, driven over WebDriver by Debian's
//! chromedriver, loads the success and failure pages through a private
//! Apache with mod_fcgid, at a phone viewport (390×844, where most players
//! click from the Discord app) and a desktop one. It checks what a player
//! would: the bot's message is on screen and the page does not scroll
//! sideways. Screenshots are kept under target/screenshots/.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::apache::{self, Apache, Mode};
use crate::support::{Bot, TempDir, free_port};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

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
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
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
            let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
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
                "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 Discord/200.0"
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

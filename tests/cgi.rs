//! The built binary in CGI mode (environment in, CGI response on stdout),
//! against the Python bot peer: every row of the README's Responses table
//! that CGI can show, the page's headers and escaping, the configuration
//! errors, the command line, and the one log line per request.
//!
//! Every run gets its own replay store (`REGISTER_STATE_DIR` in a fresh temp
//! dir) and its own long random-looking code and state, so runs never see
//! each other's answers and the log check for "never the code or the state"
//! means something.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// What a Fernet token from the bot looks like (urlsafe base64, `=` padded).
const FERNET_BODY: &str = "gAAAAABnQ2x5c3RhdGVfZm9yX3RvdXJuZXlfcmVnaXN0ZXJfdGVzdHM";

// ---------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------

/// An OAuth code as osu! hands them out (long), unique to this test.
fn new_code() -> String {
    unique("def50200", 96)
}

/// A state without `=` (the Fernet cases have their own test).
fn new_state() -> String {
    unique("gAAAAAB", 64)
}

/// One CGI run's result.
struct Run {
    http: HttpLike,
    stderr: String,
    elapsed: Duration,
}

/// The CGI environment of one site: its bot, its replay store, its settings.
struct Cgi {
    _store: TempDir,
    env: Vec<(String, Vec<u8>)>,
}

impl Cgi {
    /// A site whose bot is at `bot_addr`, with a fresh replay store.
    fn new(bot_addr: &str) -> Cgi {
        let store = private_dir("cgist");
        let env = vec![
            (
                "REGISTER_BOT_ADDR".to_string(),
                bot_addr.as_bytes().to_vec(),
            ),
            (
                "REGISTER_STATE_DIR".to_string(),
                store.path_str().as_bytes().to_vec(),
            ),
            // Bounds every run, whatever goes wrong with the bot.
            ("REGISTER_BOT_TIMEOUT".to_string(), b"8".to_vec()),
            ("REGISTER_BOT_RETRY".to_string(), b"0.3".to_vec()),
            ("GATEWAY_INTERFACE".to_string(), b"CGI/1.1".to_vec()),
            ("SCRIPT_NAME".to_string(), b"/register".to_vec()),
        ];
        Cgi { _store: store, env }
    }

    /// Sets (or replaces) one variable.
    fn set(mut self, name: &str, value: &str) -> Cgi {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    fn get(&self, query: &str) -> Run {
        self.run("GET", "", query.as_bytes())
    }

    /// Runs the binary once; asserts it finished, exited 0 and printed
    /// well-formed CGI output.
    fn run(&self, method: &str, path_info: &str, query: &[u8]) -> Run {
        let mut env: Vec<(&str, &[u8])> = self
            .env
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        env.push(("REQUEST_METHOD", method.as_bytes()));
        env.push(("PATH_INFO", path_info.as_bytes()));
        env.push(("QUERY_STRING", query));
        let run = run_cgi_raw(&env);
        run.assert_finished();
        assert!(
            run.status.success(),
            "CGI must exit 0 whatever the HTTP status: {:?}; stderr:\n{}",
            run.status,
            run.stderr
        );
        Run {
            http: run.http(),
            stderr: run.stderr,
            elapsed: run.elapsed,
        }
    }
}

/// Asserts a rejected request: status, headers, a failure page, the log
/// line, and that the bot heard nothing.
fn assert_rejected(run: &Run, status: u16, bot: &Bot, secrets: &[&str]) {
    let h = &run.http;
    assert_eq!(
        h.status, status,
        "body:\n{}\nstderr:\n{}",
        h.body, run.stderr
    );
    assert_security_headers(h);
    assert!(h.body.contains("aria-label=\"Failure\""), "{}", h.body);
    assert!(!h.body.contains(APPROVED) && !h.body.contains("You&#x27;re registered"));
    for s in secrets {
        assert!(!h.body.contains(s), "page shows a secret {s:?}");
    }
    assert_log(&run.stderr, 1, status, None, secrets);
    assert_eq!(bot.received(), NOTHING, "the bot must not be contacted");
}

/// Asserts the success page with `message` ([`assert_answer_page`]).
fn assert_success_page(run: &Run, message: &str) {
    let h = &run.http;
    assert_eq!(h.status, 200, "body:\n{}\nstderr:\n{}", h.body, run.stderr);
    assert_answer_page(h, true, message);
}

/// Asserts the failure page for a refusal with `message` ([`assert_answer_page`]).
fn assert_refusal_page(run: &Run, message: &str) {
    let h = &run.http;
    assert_eq!(h.status, 200, "body:\n{}\nstderr:\n{}", h.body, run.stderr);
    assert_answer_page(h, false, message);
}

fn query(code: &str, state: &str) -> String {
    format!("code={code}&state={state}")
}

/// A bounded run of the binary with arguments (no CGI environment).
fn run_args(args: &[&str]) -> std::process::Output {
    let (out, timed_out) = run_bin(args, &[], RUN_TIMEOUT);
    assert!(!timed_out, "{args:?} did not finish");
    out
}

/// A one-shot fake bot for replies bot.py cannot produce: accepts one
/// connection, reads the message to EOF, writes `reply`, closes. Returns
/// the address and a handle yielding the message bytes.
fn raw_bot(reply: Vec<u8>) -> (String, thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    listener.set_nonblocking(true).expect("nonblocking");
    let handle = thread::spawn(move || {
        // Bounded: a relay that never connects leaves an empty message.
        let deadline = Instant::now() + RUN_TIMEOUT;
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Err(_) => return Vec::new(),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut msg = Vec::new();
        let _ = s.read_to_end(&mut msg);
        let _ = s.write_all(&reply);
        let _ = s.shutdown(Shutdown::Write);
        msg
    });
    (addr, handle)
}

// ---------------------------------------------------------------------------
// The bot answers
// ---------------------------------------------------------------------------

fn approve_and_refuse(wire: &str) {
    let bot = Bot::start(wire, "approve");
    let site = Cgi::new(bot.addr()).set("REGISTER_WIRE", wire);
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    assert_success_page(&run, APPROVED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
    let got = &bot.received()[0];
    assert_eq!(got.keys, ["code", "state"], "exactly the two keys");
    assert_eq!(got.wire, wire);
    assert_log(&run.stderr, 1, 200, Some(&code), &[&code, &state]);
    assert!(run.stderr.contains("outcome=approved "), "{}", run.stderr);

    let bot = Bot::start(wire, "refuse");
    let site = Cgi::new(bot.addr()).set("REGISTER_WIRE", wire);
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    assert_refusal_page(&run, REFUSED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
    assert_eq!(bot.received()[0].keys, ["code", "state"]);
    assert_log(&run.stderr, 1, 200, Some(&code), &[&code, &state]);
    assert!(run.stderr.contains("outcome=refused "), "{}", run.stderr);
}

#[test]
fn json_approve_and_refuse() {
    approve_and_refuse("json");
}

#[test]
fn pickle_approve_and_refuse() {
    approve_and_refuse("pickle");
}

#[test]
fn json_is_the_default_wire() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    assert_success_page(&site.get(&query(&code, &state)), APPROVED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
    assert_eq!(bot.received()[0].error, None);
}

#[test]
fn non_ascii_values_and_messages_survive_both_wires() {
    for wire in ["json", "pickle"] {
        let message = "Willkommen, Zoë! 登録完了 ✓";
        let bot = Bot::start_with(wire, "approve", &["--message", message]);
        let site = Cgi::new(bot.addr()).set("REGISTER_WIRE", wire);
        let code = new_code();
        let base = new_state();
        let state = format!("{base}-é😀");
        // é = %C3%A9, 😀 = %F0%9F%98%80
        let q = format!("code={code}&state={base}-%C3%A9%F0%9F%98%80");
        let run = site.get(&q);
        assert_success_page(&run, message);
        assert_eq!(bot.received(), [(state.as_str(), code.as_str())], "{wire}");
    }
}

#[test]
fn bot_on_a_unix_socket() {
    for wire in ["json", "pickle"] {
        let bot = Bot::start_unix(wire, "approve");
        assert!(bot.addr().starts_with("unix:/"));
        let site = Cgi::new(bot.addr()).set("REGISTER_WIRE", wire);
        let (code, state) = (new_code(), new_state());
        let run = site.get(&query(&code, &state));
        assert_success_page(&run, APPROVED);
        assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
        assert_log(&run.stderr, 1, 200, Some(&code), &[&code, &state]);
    }
}

#[test]
fn same_code_again_gets_the_first_answer_without_the_bot() {
    let bot = Bot::start("json", "refuse");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    let first = site.get(&query(&code, &state));
    assert_refusal_page(&first, REFUSED);
    let again = site.get(&query(&code, &state));
    assert_refusal_page(&again, REFUSED);
    assert_eq!(again.http.body, first.http.body);
    assert_eq!(
        bot.received(),
        [(state.as_str(), code.as_str())],
        "a repeat must not reach the bot"
    );
    assert_log(&again.stderr, 1, 200, Some(&code), &[&code, &state]);
}

#[test]
fn unknown_parameters_are_ignored_and_plus_is_a_space() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    let q = format!("utm_source=discord&code={code}&&x=1&x=2&flag&state={state}+tail%2Bplus");
    let run = site.get(&q);
    assert_success_page(&run, APPROVED);
    let want_state = format!("{state} tail+plus");
    assert_eq!(bot.received(), [(want_state.as_str(), code.as_str())]);
}

#[test]
fn fernet_state_padding_raw_or_percent_encoded_reaches_the_bot_unchanged() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let mut want = Vec::new();
    for (i, spelled) in ["==", "%3D%3D", "%3d%3D", "=%3D"].iter().enumerate() {
        let token = format!("{FERNET_BODY}{i}{}", unique("", 40));
        let code = new_code();
        let run = site.get(&format!("code={code}&state={token}{spelled}"));
        assert_success_page(&run, APPROVED);
        let state = format!("{token}==");
        assert_log(&run.stderr, 1, 200, Some(&code), &[&code, &token]);
        want.push((state, code));
    }
    // Also with the state first and a single `=`.
    let token = format!("{FERNET_BODY}x{}", unique("", 40));
    let code = new_code();
    let run = site.get(&format!("state={token}%3D&code={code}"));
    assert_success_page(&run, APPROVED);
    want.push((format!("{token}="), code));

    let got = bot.received();
    let want: Vec<(&str, &str)> = want.iter().map(|(s, c)| (s.as_str(), c.as_str())).collect();
    assert_eq!(got, want);
}

#[test]
fn html_in_the_bot_message_is_escaped() {
    let nasty = r#"<script>alert(1)</script> & "x" 'y' <img src=x onerror=alert(2)>"#;
    for wire in ["json", "pickle"] {
        let bot = Bot::start_with(wire, "echo", &["--message", nasty]);
        let site = Cgi::new(bot.addr()).set("REGISTER_WIRE", wire);
        let (code, state) = (new_code(), new_state());
        let run = site.get(&query(&code, &state));
        assert_success_page(&run, nasty);
        let body = &run.http.body;
        assert!(!body.contains("<script"), "unescaped script:\n{body}");
        assert!(!body.contains("<img"), "unescaped img:\n{body}");
        assert!(!body.contains("\"x\""), "unescaped quotes:\n{body}");
        assert!(!body.contains("& "), "unescaped ampersand:\n{body}");
        assert!(body.contains("&lt;script&gt;"), "{body}");
        assert!(body.contains("&amp;"), "{body}");
        assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
    }
}

#[test]
fn an_empty_bot_message_still_renders() {
    let bot = Bot::start_with("json", "refuse", &["--message", ""]);
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    assert_refusal_page(&run, "");
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

// ---------------------------------------------------------------------------
// Cancel and osu! errors
// ---------------------------------------------------------------------------

#[test]
fn cancel_never_contacts_the_bot() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    for q in [
        format!(
            "error=access_denied&error_description=The+resource+owner+or+authorization+server+denied+the+request.&state={}",
            new_state()
        ),
        format!("error=access_denied&state={}", new_state()),
        "error=access_denied".to_string(),
    ] {
        let run = site.get(&q);
        let h = &run.http;
        assert_eq!(h.status, 200, "{q}: {}", h.body);
        assert_security_headers(h);
        assert_eq!(title_text(&h.body), "Sign-in cancelled", "{q}");
        assert!(h.body.contains("aria-label=\"Failure\""));
        assert_log(&run.stderr, 1, 200, None, &[]);
        assert!(run.stderr.contains("outcome=denied "), "{}", run.stderr);
    }
    assert_eq!(bot.received(), NOTHING, "a cancel must never reach the bot");
}

#[test]
fn other_osu_errors_are_400_with_the_escaped_description() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let state = new_state();
    let run = site.get(&format!(
        "error=server_error&error_description=%3Cb%3Eosu%21+is+down%3C%2Fb%3E+%26+sad&state={state}&code={}",
        new_code()
    ));
    let h = &run.http;
    assert_eq!(h.status, 400, "{}", h.body);
    assert_security_headers(h);
    assert_eq!(title_text(&h.body), "osu! sign-in failed");
    assert!(
        message_text(&h.body).contains("<b>osu! is down</b> & sad"),
        "{}",
        h.body
    );
    assert!(!h.body.contains("<b>osu!"), "description not escaped");
    assert_log(&run.stderr, 1, 400, None, &[&state]);
    assert_eq!(bot.received(), NOTHING);
}

// ---------------------------------------------------------------------------
// Requests turned away before the bot
// ---------------------------------------------------------------------------

#[test]
fn missing_or_empty_code_or_state_is_400() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    for (q, what) in [
        (String::new(), "code"),
        (format!("state={state}"), "code"),
        (format!("code={code}"), "state"),
        (format!("code=&state={state}"), "code"),
        (format!("code={code}&state="), "state"),
        (format!("code={code}&state"), "state"),
        (format!("error=&code={code}"), "state"),
    ] {
        let run = site.get(&q);
        assert_rejected(&run, 400, &bot, &[&code, &state]);
        assert!(
            message_text(&run.http.body).contains(what),
            "{q}: message should name {what}: {}",
            run.http.body
        );
    }
}

#[test]
fn a_parameter_given_twice_is_400() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    for q in [
        format!("code={code}&code={code}&state={state}"),
        format!("code={code}&state={state}&state={state}"),
        format!("code={code}&%63ode=other&state={state}"),
        format!("error=access_denied&error=access_denied&state={state}"),
        format!("error=access_denied&error_description=a&error_description=b&state={state}"),
        format!("code={code}&state={state}&error=x&error=y"),
    ] {
        let run = site.get(&q);
        assert_rejected(&run, 400, &bot, &[&code, &state]);
        assert!(
            message_text(&run.http.body).contains("more than once"),
            "{q}: {}",
            run.http.body
        );
    }
}

#[test]
fn bad_percent_encoding_or_non_utf8_is_400() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    let mut queries: Vec<Vec<u8>> = [
        format!("code=%zz{code}&state={state}"),
        format!("code={code}%4&state={state}"),
        format!("code={code}&state={state}%"),
        format!("code={code}%FF&state={state}"),
        format!("code={code}&state={state}%C3"),
        format!("code={code}&state={state}%C0%AF"),
        format!("code={code}&state={state}%ED%A0%80"),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    // Raw bytes that are not UTF-8, straight in QUERY_STRING.
    let mut latin1 = format!("code={code}caf").into_bytes();
    latin1.push(0xe9);
    latin1.extend_from_slice(format!("&state={state}").as_bytes());
    queries.push(latin1);
    let mut raw_state = format!("code={code}&state={state}").into_bytes();
    raw_state.extend_from_slice(b"\xff\xfe");
    queries.push(raw_state);
    for q in queries {
        let run = site.run("GET", "", &q);
        assert_rejected(&run, 400, &bot, &[&code, &state]);
        assert!(
            message_text(&run.http.body).contains("not properly encoded"),
            "{}: {}",
            String::from_utf8_lossy(&q),
            run.http.body
        );
    }
}

#[test]
fn value_over_4096_bytes_is_400_and_query_over_8192_is_414() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let state = new_state();

    // Exactly 4096 bytes is fine and reaches the bot whole.
    let code = unique("def50200", 4096);
    let run = site.get(&query(&code, &state));
    assert_success_page(&run, APPROVED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);

    // 4097 is not (also when the length only shows once decoded).
    let long = unique("def50200", 4097);
    let run = site.get(&query(&long, &state));
    assert_eq!(run.http.status, 400, "{}", run.http.body);
    assert_security_headers(&run.http);
    assert!(message_text(&run.http.body).contains("too long"));
    assert_log(&run.stderr, 1, 400, None, &[&long, &state]);

    let long_state = unique("gAAAAAB", 4097);
    let run = site.get(&query(&new_code(), &long_state));
    assert_eq!(run.http.status, 400);
    assert!(message_text(&run.http.body).contains("state"));

    // A query of exactly 8192 bytes is served; 8193 is 414.
    let code2 = new_code();
    let base = format!("code={code2}&state={state}&pad=");
    let exact = format!("{base}{}", "p".repeat(8192 - base.len()));
    assert_eq!(exact.len(), 8192);
    let run = site.get(&exact);
    assert_success_page(&run, APPROVED);
    let over = format!("{exact}p");
    let code3 = new_code();
    let over = over.replacen(&code2, &code3, 1);
    assert_eq!(over.len(), 8193);
    let run = site.get(&over);
    assert_eq!(run.http.status, 414, "{}", run.http.body);
    assert_security_headers(&run.http);
    assert_log(&run.stderr, 1, 414, None, &[&code3, &state]);

    assert_eq!(
        bot.received(),
        [
            (state.as_str(), code.as_str()),
            (state.as_str(), code2.as_str())
        ],
        "only the in-limit requests reach the bot"
    );
}

#[test]
fn methods_other_than_get_and_head_are_405_with_allow() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "get"] {
        let run = site.run(method, "", query(&code, &state).as_bytes());
        assert_rejected(&run, 405, &bot, &[&code, &state]);
        assert_eq!(run.http.header("Allow"), Some("GET, HEAD"), "{method}");
    }
}

#[test]
fn head_answers_without_a_body_and_does_not_spend_the_code() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    let run = site.run("HEAD", "", query(&code, &state).as_bytes());
    let h = &run.http;
    assert!(h.status < 500, "HEAD status {}", h.status);
    assert_eq!(h.status, 200);
    assert_security_headers(h);
    assert!(h.body_bytes.is_empty(), "HEAD body: {:?}", h.body);
    assert_log(&run.stderr, 1, 200, Some(&code), &[&code, &state]);
    assert_eq!(bot.received(), NOTHING, "HEAD must not contact the bot");

    // The code is still good for the real click.
    let run = site.get(&query(&code, &state));
    assert_success_page(&run, APPROVED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);

    // HEAD of a bad link keeps its status, still without a body.
    let run = site.run("HEAD", "", b"state=only");
    assert_eq!(run.http.status, 400);
    assert!(run.http.body_bytes.is_empty());
    assert_eq!(bot.received().len(), 1);
}

#[test]
fn path_info_other_than_empty_or_slash_is_404() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    for path in ["/x", "/register", "//", "/%2F"] {
        let run = site.run("GET", path, query(&code, &state).as_bytes());
        assert_rejected(&run, 404, &bot, &[&code, &state]);
    }
    let run = site.run("GET", "/", query(&code, &state).as_bytes());
    assert_success_page(&run, APPROVED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

// ---------------------------------------------------------------------------
// The bot misbehaves
// ---------------------------------------------------------------------------

#[test]
fn bot_down_is_503_with_a_try_again_link() {
    let down = RefusingPort::new();
    let site = Cgi::new(down.addr()).set("REGISTER_BOT_RETRY", "0.2");
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    let h = &run.http;
    assert_eq!(h.status, 503, "{}", h.body);
    assert_security_headers(h);
    assert!(h.body.contains("aria-label=\"Failure\""));
    assert!(h.body.contains("href=\"\""), "Try again link: {}", h.body);
    assert!(h.body.contains("Try again"), "{}", h.body);
    assert!(!h.body.contains(&code) && !h.body.contains(&state));
    assert_log(&run.stderr, 1, 503, Some(&code), &[&code, &state]);
    // Retried for the window, but not much longer.
    assert!(
        run.elapsed >= Duration::from_millis(100) && run.elapsed < Duration::from_secs(6),
        "{:?}",
        run.elapsed
    );
}

#[test]
fn after_a_503_the_same_code_reaches_the_bot_once_it_is_up() {
    let dir = TempDir::new("late");
    let path = dir.join("bot.sock");
    let path = path.to_str().unwrap();
    let site = Cgi::new(&format!("unix:{path}")).set("REGISTER_BOT_RETRY", "0.2");
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    assert_eq!(run.http.status, 503, "{}", run.http.body);

    let bot = Bot::start_with("json", "approve", &["--unix", path]);
    let run = site.get(&query(&code, &state));
    assert_success_page(&run, APPROVED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

#[test]
fn bot_silent_past_the_timeout_is_504() {
    let bot = Bot::start("json", "silent");
    let site = Cgi::new(bot.addr()).set("REGISTER_BOT_TIMEOUT", "1");
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    let h = &run.http;
    assert_eq!(h.status, 504, "{}", h.body);
    assert_security_headers(h);
    assert!(!h.body.contains("Try again"));
    assert!(
        run.elapsed >= Duration::from_millis(900) && run.elapsed < Duration::from_secs(6),
        "took {:?}",
        run.elapsed
    );
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
    assert_log(&run.stderr, 1, 504, Some(&code), &[&code, &state]);
}

fn bad_reply_is_502(wire: &str, behaviour: &str) {
    let bot = Bot::start(wire, behaviour);
    let site = Cgi::new(bot.addr()).set("REGISTER_WIRE", wire);
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    let h = &run.http;
    assert_eq!(h.status, 502, "{wire} {behaviour}: {}", h.body);
    assert_security_headers(h);
    assert!(h.body.contains("aria-label=\"Failure\""));
    assert!(!h.body.contains("Try again"));
    assert!(!h.body.contains("xxxxxxxx"), "oversize text shown");
    assert!(run.elapsed < Duration::from_secs(6), "{:?}", run.elapsed);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
    assert_log(&run.stderr, 1, 502, Some(&code), &[&code, &state]);
}

#[test]
fn bot_closing_early_is_502() {
    bad_reply_is_502("json", "early-close");
    bad_reply_is_502("pickle", "early-close");
}

#[test]
fn bot_garbage_is_502() {
    bad_reply_is_502("json", "garbage");
    bad_reply_is_502("pickle", "garbage");
}

#[test]
fn bot_oversize_reply_is_502() {
    bad_reply_is_502("json", "oversize");
    bad_reply_is_502("pickle", "oversize");
}

#[test]
fn reply_shapes_unknown_fields_ignored_wrong_types_refused() {
    let cases: [(&[u8], u16, &str); 5] = [
        (
            br#"{"success": true, "message": "hi there", "extra": [1, {"a": null}]}"#,
            200,
            "json",
        ),
        (br#"{"success": "yes", "message": "m"}"#, 502, "json"),
        (br#"{"success": true}"#, 502, "json"),
        // pickle protocol 0: os.system("true") -- a callable is refused.
        (b"cos\nsystem\n(S'true'\ntR.", 502, "pickle"),
        // A dict whose message is built by calling builtins.str.
        (
            b"(dp0\nVsuccess\np1\nI01\nsVmessage\np2\ncbuiltins\nstr\n(S'x'\ntRs.",
            502,
            "pickle",
        ),
    ];
    for (reply, status, wire) in cases {
        check_raw_reply(reply, status, wire);
    }
}

/// Runs one request against [`raw_bot`] replying `reply`; asserts the
/// headers, the log line, and (for JSON) that the bot got the code and
/// state. Returns the page.
fn run_raw_reply(reply: &[u8], wire: &str) -> Run {
    let (addr, got) = raw_bot(reply.to_vec());
    let site = Cgi::new(&addr).set("REGISTER_WIRE", wire);
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    assert_security_headers(&run.http);
    let msg = got.join().expect("raw bot thread");
    assert!(!msg.is_empty(), "the relay sent nothing");
    if wire == "json" {
        let j = parse_json(std::str::from_utf8(&msg).unwrap()).unwrap();
        assert_eq!(j.get("code").and_then(Json::as_str), Some(code.as_str()));
        assert_eq!(j.get("state").and_then(Json::as_str), Some(state.as_str()));
    }
    assert_log(
        &run.stderr,
        1,
        run.http.status,
        Some(&code),
        &[&code, &state],
    );
    run
}

/// [`run_raw_reply`], asserting the status (and the page for a 200).
fn check_raw_reply(reply: &[u8], status: u16, wire: &str) {
    let run = run_raw_reply(reply, wire);
    let shown = String::from_utf8_lossy(reply);
    assert_eq!(
        run.http.status, status,
        "{wire} reply {shown:?}: {}",
        run.http.body
    );
    if status == 200 {
        assert_success_page(&run, "hi there");
    }
}

#[test]
fn a_reply_that_is_not_a_dict_is_502() {
    // The README's reply is an object / dict. A JSON array or a pickled
    // list or tuple in the same order is not a reply, and must not show
    // the player a check mark.
    let replies: [(&[u8], &str); 3] = [
        (br#"[true, "hi there"]"#, "json"),
        (b"(lp0\nI01\naVhi there\np1\na.", "pickle"),
        (b"(I01\nVhi there\np0\ntp1\n.", "pickle"),
    ];
    let got: Vec<(String, u16, String)> = replies
        .iter()
        .map(|(reply, wire)| {
            let run = run_raw_reply(reply, wire);
            let title = title_text(&run.http.body);
            (
                String::from_utf8_lossy(reply).into_owned(),
                run.http.status,
                title,
            )
        })
        .collect();
    let bad: Vec<_> = got.iter().filter(|(_, status, _)| *status != 502).collect();
    assert!(
        bad.is_empty(),
        "non-dict replies not refused (reply, status, title): {bad:?}"
    );
}

#[test]
fn a_pickle_with_a_builtin_container_in_an_unknown_field_is_plain_data() {
    // pickle.dumps({'success': True, 'message': 'hi there', 'extra': {1, 2}},
    // protocol=2): the set is spelled `__builtin__.set` + REDUCE, which
    // serde-pickle rebuilds as data without calling anything (README: the
    // reply is plain data; other globals such as os.system are refused,
    // see reply_shapes_unknown_fields_ignored_wrong_types_refused).
    let reply = b"\x80\x02}q\x00(X\x07\x00\x00\x00successq\x01\x88X\x07\x00\x00\x00messageq\x02\
                  X\x08\x00\x00\x00hi thereq\x03X\x05\x00\x00\x00extraq\x04c__builtin__\nset\nq\x05\
                  ]q\x06(K\x01K\x02e\x85q\x07Rq\x08u.";
    let python_says = python(
        "import pickle,sys; d=pickle.loads(sys.stdin.buffer.read()); print(sorted(d['extra']), d['message'])",
        &[],
        reply,
    );
    assert_eq!(
        String::from_utf8_lossy(&python_says.stdout).trim(),
        "[1, 2] hi there",
        "the test pickle itself: {python_says:?}"
    );
    let run = run_raw_reply(reply, "pickle");
    assert_eq!(run.http.status, 200, "{}", title_text(&run.http.body));
    assert!(run.http.body.contains("hi there"));
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Asserts the 500 "misconfigured" page, a stderr line naming `var`, and
/// no contact with the bot.
fn assert_misconfigured(run: &Run, var: &str, bot: &Bot, secrets: &[&str]) {
    let h = &run.http;
    assert_eq!(h.status, 500, "{}\nstderr:\n{}", h.body, run.stderr);
    assert_security_headers(h);
    assert!(h.body.contains("aria-label=\"Failure\""));
    assert_eq!(title_text(&h.body), "Sign-ups are not set up correctly");
    assert!(
        run.stderr.lines().any(|l| l.contains(var)),
        "stderr should name {var}:\n{}",
        run.stderr
    );
    for s in secrets {
        assert!(!run.stderr.contains(s) && !h.body.contains(s));
    }
    assert_eq!(bot.received(), NOTHING);
}

#[test]
fn bad_configuration_values_answer_500_naming_the_variable() {
    let bot = Bot::start("json", "approve");
    let (code, state) = (new_code(), new_state());
    for (var, value) in [
        ("REGISTER_WIRE", "xml"),
        ("REGISTER_BOT_TIMEOUT", "abc"),
        ("REGISTER_BOT_RETRY", "-1"),
        ("REGISTER_BOT_ADDR", "no-port-here"),
        ("REGISTER_REPLAY_TTL", "forever"),
    ] {
        let site = Cgi::new(bot.addr()).set(var, value);
        let run = site.get(&query(&code, &state));
        assert_misconfigured(&run, var, &bot, &[&code, &state]);
        let line = run.stderr.lines().find(|l| l.contains(var)).unwrap();
        assert!(line.contains(value), "names the bad value: {line}");
    }
}

#[test]
fn broken_or_missing_template_answers_500() {
    let bot = Bot::start("json", "approve");
    let dir = TempDir::new("tpl");
    let broken = dir.join("broken.html");
    std::fs::write(&broken, "<p>{% if ok %}unclosed {{ message }}</p>").unwrap();
    let bad_filter = dir.join("filter.html");
    std::fs::write(&bad_filter, "<p>{{ message | no_such_filter }}</p>").unwrap();
    let missing = dir.join("missing.html");
    let (code, state) = (new_code(), new_state());
    for path in [&broken, &bad_filter, &missing] {
        let site = Cgi::new(bot.addr()).set("REGISTER_TEMPLATE", path.to_str().unwrap());
        let run = site.get(&query(&code, &state));
        assert_misconfigured(&run, "REGISTER_TEMPLATE", &bot, &[&code, &state]);
    }
}

#[test]
fn a_configuration_error_is_still_one_outcome_line() {
    // README: one info line per request, whatever the outcome.
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr()).set("REGISTER_WIRE", "xml");
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    assert_eq!(run.http.status, 500);
    assert_log(&run.stderr, 1, 500, None, &[&code, &state]);
}

#[test]
fn custom_template_is_used_and_autoescaped() {
    let nasty = r#"<script>alert(1)</script> & "x""#;
    let bot = Bot::start_with("json", "echo", &["--message", nasty]);
    let dir = TempDir::new("tpl");
    // A .txt name: autoescaping must not depend on the extension.
    let path = dir.join("page.txt");
    std::fs::write(
        &path,
        "<main class=\"{{ 'ok' if ok else 'bad' }}\" data-status=\"{{ status }}\">\
         <h2>{{ title }}</h2><p>{{ message }}</p>\
         {% if retry %}<a href=\"\">again</a>{% endif %}</main>",
    )
    .unwrap();
    let site = Cgi::new(bot.addr()).set("REGISTER_TEMPLATE", path.to_str().unwrap());
    let (code, state) = (new_code(), new_state());
    let run = site.get(&query(&code, &state));
    let h = &run.http;
    assert_eq!(h.status, 200, "{}", h.body);
    assert_security_headers(h);
    assert!(!h.body.contains("<script"), "not escaped: {}", h.body);
    assert_eq!(
        unescape(&h.body),
        format!(
            "<main class=\"ok\" data-status=\"200\"><h2>You're signed up</h2><p>{nasty}</p></main>"
        ),
        "raw body: {}",
        h.body
    );
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);

    // The same template renders a 503 with its retry link.
    let refusing = RefusingPort::new();
    let down = Cgi::new(refusing.addr())
        .set("REGISTER_TEMPLATE", path.to_str().unwrap())
        .set("REGISTER_BOT_RETRY", "0.1");
    let run = down.get(&query(&new_code(), &new_state()));
    assert_eq!(run.http.status, 503, "{}\n{}", run.http.body, run.stderr);
    assert!(
        run.http
            .body
            .starts_with("<main class=\"bad\" data-status=\"503\">")
    );
    assert!(run.http.body.contains("<a href=\"\">again</a>"));
}

// ---------------------------------------------------------------------------
// Every page carries the headers; one log line per request
// ---------------------------------------------------------------------------

#[test]
fn every_kind_of_page_has_the_security_headers_and_one_log_line() {
    let bot = Bot::start("json", "approve");
    let site = Cgi::new(bot.addr());
    let (code, state) = (new_code(), new_state());
    let q = query(&code, &state);
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("GET", "", b"state=s".to_vec(), 400),
        ("GET", "", format!("{q}&code=again").into_bytes(), 400),
        ("GET", "", b"code=%zz&state=s".to_vec(), 400),
        (
            "GET",
            "",
            format!("code=c&x={}", "y".repeat(9000)).into_bytes(),
            414,
        ),
        ("POST", "", q.clone().into_bytes(), 405),
        ("GET", "/x", q.clone().into_bytes(), 404),
        ("GET", "", b"error=access_denied&state=s".to_vec(), 200),
        ("GET", "", b"error=invalid_scope&state=s".to_vec(), 400),
        ("HEAD", "", q.clone().into_bytes(), 200),
        ("GET", "", q.clone().into_bytes(), 200),
    ];
    for (method, path, query, status) in cases {
        let run = site.run(method, path, &query);
        assert_eq!(
            run.http.status,
            status,
            "{method} {path} {}",
            String::from_utf8_lossy(&query)
        );
        assert_security_headers(&run.http);
        assert_log(&run.stderr, 1, status, None, &[&code, &state]);
        let len: usize = run
            .http
            .header("Content-Length")
            .map(|v| v.parse().expect("numeric Content-Length"))
            .expect("Content-Length");
        if method == "HEAD" {
            assert!(run.http.body_bytes.is_empty());
            assert!(len > 0, "HEAD keeps the GET's Content-Length");
        } else {
            assert_eq!(len, run.http.body_bytes.len());
        }
    }
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

#[test]
fn help_and_version_exit_0() {
    for arg in ["--help", "-h"] {
        let out = run_args(&[arg]);
        assert!(out.status.success(), "{arg}: {:?}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--listen"), "{arg}: {text}");
        assert!(text.contains("REGISTER_BOT_ADDR"), "{arg}: {text}");
        assert!(!text.contains("Status:"), "{arg} answered as CGI: {text}");
    }
    for arg in ["--version", "-V"] {
        let out = run_args(&[arg]);
        assert!(out.status.success(), "{arg}: {:?}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.trim(),
            format!("tourney-register {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn unknown_argument_exits_2() {
    for args in [
        &["--frobnicate"][..],
        &["extra"],
        &["--listen"],
        &["--listen", ""],
    ] {
        let out = run_args(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Usage"), "{args:?}: {err}");
    }
    let err = String::from_utf8_lossy(&run_args(&["--frobnicate"]).stderr).into_owned();
    assert!(err.contains("--frobnicate"), "names the argument: {err}");
}

#[test]
fn a_run_by_hand_without_request_method_is_a_get() {
    let bot = Bot::start("json", "approve");
    let store = private_dir("hand");
    let (code, state) = (new_code(), new_state());
    let q = query(&code, &state);
    let started = Instant::now();
    let (http, stderr, status) = run_cgi(&[
        ("QUERY_STRING", &q),
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
    ]);
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(http.status, 200, "{}\n{stderr}", http.body);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

// ---------------------------------------------------------------------------
// The process's start (the program starts without std's runtime)
// ---------------------------------------------------------------------------

/// A web server that went away before reading the answer: writing it fails
/// (EPIPE), and the process still ends normally, the code delivered once,
/// rather than being killed by SIGPIPE.
#[test]
fn a_reader_that_went_away_costs_the_answer_not_the_process() {
    let bot = Bot::start("json", "approve");
    let store = private_dir("epipe");
    let (code, state) = (new_code(), new_state());
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(bin())
        .env_clear()
        .envs([
            ("REQUEST_METHOD", "GET"),
            ("QUERY_STRING", query(&code, &state).as_str()),
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
        ])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_or_kill(&mut child, RUN_TIMEOUT).expect("the CGI run ends");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("cannot write the response"), "{stderr}");
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

/// Started with stdin, stdout and stderr closed (as a careless daemon
/// might), the program must not let the replay store's files take those
/// numbers: the answer would be written into its table. The table still
/// answers the same code afterwards, without the bot.
#[test]
fn closed_standard_streams_never_become_the_stores_files() {
    let bot = Bot::start("json", "approve");
    let store = private_dir("closedfds");
    let (code, state) = (new_code(), new_state());
    let q = query(&code, &state);
    let env = [
        ("REQUEST_METHOD", "GET"),
        ("QUERY_STRING", q.as_str()),
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
    ];
    let mut child = Command::new("/bin/sh")
        .args(["-c", "exec \"$0\" <&- >&- 2>&-"])
        .arg(bin())
        .env_clear()
        .envs(env)
        .spawn()
        .unwrap();
    let status = wait_or_kill(&mut child, RUN_TIMEOUT).expect("the CGI run ends");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
    let (again, _) = cgi_get(&env[2..], &q);
    assert_answer_page(&again, true, APPROVED);
    assert_eq!(bot.received().len(), 1, "a repeat must not reach the bot");
    let names: Vec<_> = std::fs::read_dir(store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["replay.table"], "{names:?}");
}

//! Exactly-once delivery of each code: a repeat of a code within
//! `REGISTER_REPLAY_TTL` gets the first answer and never reaches the bot
//! again, whether it comes later or at the same time, from the same process
//! or another one sharing `REGISTER_STATE_DIR`; a failed delivery is not
//! stored; the store holds nothing in clear; a broken store costs the
//! duplicate protection, never the registration.
//!
//! Every run gets a fresh store (`REGISTER_STATE_DIR` in a [`TempDir`]):
//! the default store is shared by every run on the machine.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// The 504 page's message.
const TIMED_OUT: &str = "Your sign-up may or may not have gone through.";
/// The 503 page's message.
const NOT_USED: &str = "Your sign-in was not used yet, so nothing is lost.";

/// A Fernet-looking state whose `=` padding travels as `%3D`.
const STATE_Q: &str = "gAAAAABnStateOfPlayer42_xyz%3D%3D";
const STATE: &str = "gAAAAABnStateOfPlayer42_xyz==";

fn query(code: &str) -> String {
    format!("code={code}&state={STATE_Q}")
}

/// The text as the page's autoescaping shows it.
fn html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#x27;")
}

/// Asserts the status, the icon (check mark or cross) and the message.
fn assert_page(page: &HttpLike, status: u16, ok: bool, message: &str) {
    assert_eq!(page.status, status, "status; body:\n{}", page.body);
    let icon = if ok {
        "aria-label=\"Success\""
    } else {
        "aria-label=\"Failure\""
    };
    assert!(
        page.body.contains(icon),
        "page lacks {icon}; body:\n{}",
        page.body
    );
    let shown = format!("<p id=\"message\">{}</p>", html(message));
    assert!(
        page.body.contains(&shown),
        "page lacks {shown:?}; body:\n{}",
        page.body
    );
}

fn assert_approved(page: &HttpLike) {
    assert_page(page, 200, true, APPROVED);
}

/// The environment of one relay: the bot, a private store, plus `extra`.
fn relay_env<'a>(
    bot_addr: &'a str,
    store: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("REGISTER_BOT_ADDR", bot_addr),
        ("REGISTER_STATE_DIR", store),
    ];
    env.extend_from_slice(extra);
    env
}

fn codes(bot: &Bot) -> Vec<String> {
    bot.received()
        .into_iter()
        .map(|r| {
            assert_eq!(r.error, None, "bot got an undecodable message: {r:?}");
            assert_eq!(r.state, STATE, "state as the bot got it");
            r.code
        })
        .collect()
}

// ---------------------------------------------------------------------------
// (a) sequential repeats
// ---------------------------------------------------------------------------

/// CGI: the second run is pointed at a bot that would refuse, so a page
/// showing the approval can only come from the store.
#[test]
fn sequential_repeat_via_cgi_replays_the_first_answer() {
    let store = private_dir("st");
    let approver = Bot::start("json", "approve");
    let refuser = Bot::start("json", "refuse");
    let q = query("seq-cgi-code-1");

    let (first, _) = cgi_get(&relay_env(approver.addr(), store.path_str(), &[]), &q);
    assert_approved(&first);
    let (second, _) = cgi_get(&relay_env(refuser.addr(), store.path_str(), &[]), &q);
    assert_approved(&second);
    // A third, pointed at the first bot again, for good measure.
    let (third, _) = cgi_get(&relay_env(approver.addr(), store.path_str(), &[]), &q);
    assert_approved(&third);

    assert_eq!(codes(&approver), ["seq-cgi-code-1"]);
    assert_eq!(codes(&refuser), Vec::<String>::new());

    // Another code is not caught by the first one's entry.
    let (other, _) = cgi_get(
        &relay_env(refuser.addr(), store.path_str(), &[]),
        &query("seq-cgi-code-2"),
    );
    assert_page(&other, 200, false, REFUSED);
    assert_eq!(codes(&refuser), ["seq-cgi-code-2"]);
}

/// FastCGI on fd 0 (mod_fcgid): repeats on new connections to the same
/// process, then on a second process sharing the store.
#[test]
fn sequential_repeat_via_fastcgi_fd0_replays_the_first_answer() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let env = relay_env(bot.addr(), store.path_str(), &[]);
    let q = query("seq-fd0-code");
    let mut one = Fd0Server::start(&env);
    for _ in 0..3 {
        assert_approved(&one.get(&q).http());
    }
    assert_eq!(codes(&bot), ["seq-fd0-code"]);

    let mut two = Fd0Server::start(&env);
    assert_approved(&two.get(&q).http());
    assert_eq!(codes(&bot), ["seq-fd0-code"]);
    assert!(one.stop().success());
    assert!(two.stop().success());
}

/// `--listen`: repeats on one kept connection and on new ones.
#[test]
fn sequential_repeat_via_listen_replays_the_first_answer() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let mut server = ListenServer::start_unix(&relay_env(bot.addr(), store.path_str(), &[]));
    let q = query("seq-listen-code");
    let mut kept = server.connect();
    for id in 1..=3 {
        let reply = fcgi_get(&mut kept, id, &q, true);
        assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE);
        assert_approved(&reply.http());
    }
    assert_approved(&server.get(&q).http());
    assert_eq!(codes(&bot), ["seq-listen-code"]);
    assert!(server.stop().success());
}

// ---------------------------------------------------------------------------
// (b) a refusal is replayed too
// ---------------------------------------------------------------------------

#[test]
fn refusal_then_repeat_shows_the_same_refusal_without_a_second_contact() {
    let store = private_dir("st");
    let refuser = Bot::start("json", "refuse");
    let approver = Bot::start("json", "approve");
    let q = query("refused-code");

    let (first, _) = cgi_get(&relay_env(refuser.addr(), store.path_str(), &[]), &q);
    assert_page(&first, 200, false, REFUSED);
    // The repeat would be approved if it reached a bot: it must not.
    let (second, _) = cgi_get(&relay_env(approver.addr(), store.path_str(), &[]), &q);
    assert_page(&second, 200, false, REFUSED);
    let (third, _) = cgi_get(&relay_env(refuser.addr(), store.path_str(), &[]), &q);
    assert_page(&third, 200, false, REFUSED);

    assert_eq!(codes(&refuser), ["refused-code"]);
    assert_eq!(codes(&approver), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// (c), (d) concurrent repeats
// ---------------------------------------------------------------------------

/// Ten requests with the same code at once on a `--listen` server, the bot
/// taking 0.5 s: one delivery, ten identical success pages.
#[test]
fn concurrent_repeats_in_one_process_reach_the_bot_once() {
    const N: usize = 10;
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "0.5"]);
    let mut server = ListenServer::start_tcp(&relay_env(bot.addr(), store.path_str(), &[]));
    let server_ref = &server;
    let barrier = Barrier::new(N);
    let q = query("concurrent-code");
    let started = Instant::now();
    // Connected before the threads start: one that failed to connect
    // would leave the others waiting at the barrier for ever.
    let conns: Vec<Conn> = (0..N).map(|_| server_ref.connect()).collect();
    let pages: Vec<HttpLike> = thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let (barrier, q) = (&barrier, &q);
                s.spawn(move || {
                    barrier.wait();
                    let reply = fcgi_get(&mut conn, 1, q, false);
                    assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE);
                    reply.http()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    assert_eq!(pages.len(), N);
    for page in &pages {
        assert_approved(page);
    }
    assert!(
        pages.iter().all(|p| p.body == pages[0].body),
        "the pages differ"
    );
    // Every page came after a bot answer was known, so this count is final.
    assert_eq!(codes(&bot), ["concurrent-code"]);
    // The repeats waited for the one delivery instead of making their own.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(server.stop().success());
}

/// Two mod_fcgid processes (fd 0) sharing a store get the same code at
/// the same time: one delivery, both pages the same.
#[test]
fn concurrent_repeats_across_two_fd0_processes_reach_the_bot_once() {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "0.5"]);
    let env = relay_env(bot.addr(), store.path_str(), &[]);
    let mut servers = [Fd0Server::start(&env), Fd0Server::start(&env)];
    let q = query("two-process-code");
    let barrier = Barrier::new(servers.len());
    // Connected before the threads start: one that failed to connect
    // would leave the other waiting at the barrier for ever.
    let conns: Vec<Conn> = servers.iter().map(|server| server.connect()).collect();
    let pages: Vec<HttpLike> = thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let (barrier, q) = (&barrier, &q);
                s.spawn(move || {
                    barrier.wait();
                    fcgi_get(&mut conn, 1, q, false).http()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for page in &pages {
        assert_approved(page);
    }
    assert_eq!(pages[0].body, pages[1].body);
    assert_eq!(codes(&bot), ["two-process-code"]);
    for server in &mut servers {
        assert!(server.stop().success());
    }
}

/// One fd-0 process serves one connection at a time: repeats queued
/// behind a delivery that timed out are read only after it failed, and
/// get its 504 without the code going to the bot again.
#[test]
fn repeats_queued_behind_a_failed_delivery_in_one_fd0_process_are_not_sent() {
    const N: usize = 4;
    let store = private_dir("st");
    let bot = Bot::start("json", "silent");
    let env = relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_BOT_TIMEOUT", "1")],
    );
    let mut server = Fd0Server::start(&env);
    let q = query("queued-behind-code");
    let pages: Vec<HttpLike> = thread::scope(|s| {
        let first = s.spawn(|| server.get(&q).http());
        assert_eq!(
            bot.wait_received(1, Duration::from_secs(5)).len(),
            1,
            "the first request never reached the bot"
        );
        let repeats: Vec<_> = (1..N).map(|_| s.spawn(|| server.get(&q).http())).collect();
        let mut pages = vec![first.join().unwrap()];
        pages.extend(repeats.into_iter().map(|h| h.join().unwrap()));
        pages
    });
    for page in &pages {
        assert_page(page, 504, false, TIMED_OUT);
    }
    assert_eq!(
        codes(&bot),
        ["queued-behind-code"],
        "the code reached the bot again"
    );
    assert!(server.stop().success());
}

/// Four CGI processes started at once with the same code.
#[test]
fn concurrent_repeats_across_cgi_processes_reach_the_bot_once() {
    const N: usize = 4;
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "0.5"]);
    let env = relay_env(bot.addr(), store.path_str(), &[]);
    let q = query("cgi-burst-code");
    let barrier = Barrier::new(N);
    let pages: Vec<HttpLike> = thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let (barrier, q, env) = (&barrier, &q, &env);
                s.spawn(move || {
                    barrier.wait();
                    cgi_get(env, q).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for page in &pages {
        assert_approved(page);
    }
    assert_eq!(codes(&bot), ["cgi-burst-code"]);
}

// ---------------------------------------------------------------------------
// (e) a failed delivery is not stored
// ---------------------------------------------------------------------------

#[test]
fn a_failed_delivery_is_not_stored_so_the_reload_delivers() {
    let store = private_dir("st");
    let refusing = RefusingPort::new();
    let down = refusing.addr().to_string();
    let port = refusing.port().to_string();
    let env = relay_env(&down, store.path_str(), &[("REGISTER_BOT_RETRY", "0")]);
    let q = query("bot-was-down-code");

    let (first, _) = cgi_get(&env, &q);
    assert_page(&first, 503, false, NOT_USED);
    assert!(first.body.contains("Try again"), "{}", first.body);

    // The bot comes up on the address that was down: the port is let go
    // just for it (should anyone else take it meanwhile, the bot cannot
    // start and the test fails; nothing else can get the code).
    drop(refusing);
    let bot = Bot::start_with("json", "approve", &["--port", &port]);
    assert_eq!(bot.addr(), down);
    let (reload, _) = cgi_get(&env, &q);
    assert_approved(&reload);
    assert_eq!(codes(&bot), ["bot-was-down-code"]);
    // And from now on it is the stored answer.
    let (again, _) = cgi_get(&env, &q);
    assert_approved(&again);
    assert_eq!(codes(&bot), ["bot-was-down-code"]);
}

// ---------------------------------------------------------------------------
// (f) expiry
// ---------------------------------------------------------------------------

/// `REGISTER_REPLAY_TTL=1`: an immediate repeat is replayed; once the entry
/// has expired the code goes to the bot again (here a bot with another
/// message, so the page shows which answer it is).
#[test]
fn after_the_ttl_the_same_code_is_delivered_again() {
    let store = private_dir("st");
    let first_bot = Bot::start("json", "approve");
    let second_msg = "Second delivery answered";
    let second_bot = Bot::start_with("json", "approve", &["--message", second_msg]);
    let ttl = [("REGISTER_REPLAY_TTL", "1")];
    let q = query("ttl-code");

    let (first, _) = cgi_get(&relay_env(first_bot.addr(), store.path_str(), &ttl), &q);
    let answered = Instant::now();
    assert_approved(&first);
    let second_env = relay_env(second_bot.addr(), store.path_str(), &ttl);
    let (repeat, _) = cgi_get(&second_env, &q);
    assert!(
        answered.elapsed() < Duration::from_millis(900),
        "the immediate repeat came too late to test the replay"
    );
    assert_approved(&repeat);
    assert_eq!(codes(&second_bot), Vec::<String>::new());

    // Repeat until the second bot gets it; bounded, and never before the TTL.
    let deadline = answered + Duration::from_secs(6);
    let page = loop {
        let (page, _) = cgi_get(&second_env, &q);
        if !codes(&second_bot).is_empty() {
            break page;
        }
        assert_approved(&page);
        assert!(
            Instant::now() < deadline,
            "still replayed {:?} after a 1 s TTL",
            answered.elapsed()
        );
        thread::sleep(Duration::from_millis(200));
    };
    let waited = answered.elapsed();
    assert!(waited >= Duration::from_secs(1), "expired after {waited:?}");
    assert_page(&page, 200, true, second_msg);
    assert_eq!(codes(&first_bot), ["ttl-code"]);
    assert_eq!(codes(&second_bot), ["ttl-code"]);
}

// ---------------------------------------------------------------------------
// (g) nothing in clear
// ---------------------------------------------------------------------------

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for item in fs::read_dir(dir).unwrap() {
        let path = item.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        }
        out.push(path);
    }
}

#[test]
fn the_store_holds_no_code_or_state_in_clear() {
    let tmp = TempDir::new("st");
    // Left for the relay to create, so its mode is the relay's choice.
    let dir = tmp.join("store");
    let dir_str = dir.to_str().unwrap();
    let approver = Bot::start("json", "approve");
    let refuser = Bot::start("json", "refuse");
    let code_a = "def50200SecretCodeAlpha0123456789";
    let code_b = "def50200SecretCodeBravo9876543210";
    let (page, _) = cgi_get(&relay_env(approver.addr(), dir_str, &[]), &query(code_a));
    assert_approved(&page);
    let mut server = Fd0Server::start(&relay_env(refuser.addr(), dir_str, &[]));
    assert_page(&server.get(&query(code_b)).http(), 200, false, REFUSED);
    // A replay too, in case reading leaves something behind.
    assert_approved(&server.get(&query(code_a)).http());
    assert!(server.stop().success());
    assert_eq!(codes(&approver), [code_a]);
    assert_eq!(codes(&refuser), [code_b]);

    let mut files = Vec::new();
    walk(&dir, &mut files);
    assert!(!files.is_empty(), "the store should hold the answers");
    let secrets = [code_a, code_b, STATE, "StateOfPlayer42", "SecretCode"];
    let meta = fs::metadata(&dir).unwrap();
    assert_eq!(meta.mode() & 0o077, 0, "store dir mode {:o}", meta.mode());
    for path in &files {
        let name = path.strip_prefix(&dir).unwrap().to_string_lossy();
        let body = if path.is_dir() {
            Vec::new()
        } else {
            fs::read(path).unwrap()
        };
        let text = String::from_utf8_lossy(&body);
        for secret in secrets {
            assert!(!name.contains(secret), "file name {name:?} holds {secret}");
            assert!(!text.contains(secret), "file {name:?} holds {secret}");
        }
        let mode = fs::metadata(path).unwrap().mode();
        assert_eq!(mode & 0o077, 0, "{name:?} has mode {mode:o}");
    }
    // The answers themselves are there (by hash), or replay could not work.
    let all: String = files
        .iter()
        .filter(|p| p.is_file())
        .map(|p| String::from_utf8_lossy(&fs::read(p).unwrap()).into_owned())
        .collect();
    assert!(all.contains(REFUSED) && all.contains(APPROVED), "{all}");
}

// (h) A misconfigured or broken store: tests/store.rs.

// ---------------------------------------------------------------------------
// (i) a repeat while the first is in flight past the bound
// ---------------------------------------------------------------------------

/// Sends the first request, waits until the bot has it, waits `lag` more,
/// then sends the repeat; returns both pages, the repeat's time, and what
/// the bot received.
fn silent_bot_repeat(lag: Duration) -> (HttpLike, HttpLike, Duration, Vec<String>) {
    let store = private_dir("st");
    let bot = Bot::start("json", "silent");
    let mut server = ListenServer::start_unix(&relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_BOT_TIMEOUT", "1")],
    ));
    let q = query("in-flight-code");
    let (first, second, repeat_took) = thread::scope(|s| {
        let first = s.spawn(|| server.get(&q).http());
        assert_eq!(
            bot.wait_received(1, Duration::from_secs(5)).len(),
            1,
            "the first request never reached the bot"
        );
        thread::sleep(lag);
        let started = Instant::now();
        let second = server.get(&q).http();
        let took = started.elapsed();
        (first.join().unwrap(), second, took)
    });
    // A second delivery, if any, has been recorded by now: the repeat's
    // answer came after its exchange ended.
    let got = codes(&bot);
    assert!(server.stop().success());
    (first, second, repeat_took, got)
}

/// What the repeat must get: the first answer's 504, no second delivery,
/// within its own 1 s bound plus a margin.
fn assert_one_delivery_two_504s(
    first: &HttpLike,
    second: &HttpLike,
    took: Duration,
    got: &[String],
) {
    assert_eq!(got, ["in-flight-code"], "the code reached the bot twice");
    assert_page(first, 504, false, TIMED_OUT);
    assert_page(second, 504, false, TIMED_OUT);
    assert!(
        took < Duration::from_millis(1800),
        "the repeat took {took:?}"
    );
}

/// The repeat arrives right after the first reached the bot.
#[test]
fn a_repeat_right_behind_a_silent_delivery_gets_504_without_a_second_contact() {
    let (first, second, took, got) = silent_bot_repeat(Duration::ZERO);
    assert_one_delivery_two_504s(&first, &second, took, &got);
}

/// The repeat arrives half-way through the first one's 1 s bound (a reload
/// while the page is still loading).
#[test]
fn a_repeat_mid_flight_of_a_silent_delivery_gets_504_without_a_second_contact() {
    let (first, second, took, got) = silent_bot_repeat(Duration::from_millis(500));
    assert_one_delivery_two_504s(&first, &second, took, &got);
}

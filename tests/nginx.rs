//! nginx in front of one `--listen` relay, through the shipped snippet
//! (`apache/nginx-tourney-register.conf`) in a private nginx: a sign-up
//! burst of [`BURST`] players at the same moment, each with a code of
//! their own, against a bot that answers after 300 ms and queues a deep
//! backlog (as the README's bot snippet asks).
//!
//! The relay is started the way systemd starts a service, with a soft
//! limit of 1024 open files. Each of its connections may hold two
//! descriptors (nginx's and the bot's), so it serves the burst at once,
//! with no 503 "overloaded", only because it raised its own limit.
//!
//! Zero errors, every player shown the success page, every code at the
//! bot exactly once; everything bounded, nothing timed.

use std::io;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use crate::support::apache::{HttpResponse, try_http};
use crate::support::*;

/// Players at once: nginx holds them all, and so does the relay.
const BURST: usize = 2000;
const STATE_Q: &str = "gAAAAABnNginxState%3D";
/// Stack of each player thread: it holds one answer buffer.
const CLIENT_STACK: usize = 256 * 1024;

fn code(i: usize) -> String {
    format!("nginx-burst-{i:04}")
}

/// Why a player did not see the success page, if they did not.
fn check(answer: io::Result<HttpResponse>) -> Result<(), String> {
    let answer = answer.map_err(|e| format!("request: {e}"))?;
    success_or_why(answer.status, &answer.text())
}

/// The soft limit on open files of process `pid`.
fn soft_files_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[test]
fn a_burst_of_sign_ups_through_nginx_reaches_the_bot_once_each() {
    // A socket per player, and a margin for the bot, nginx's pipes and the
    // suites running beside this one.
    require_open_files(BURST as u64 + 1024);
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "0.3", "--backlog", "4096"]);
    let mut relay = ListenServer::start_with_files_limit(
        "unix",
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
        ],
        1024,
    );
    // The limit is raised before the accepting begins, which the log says.
    assert!(
        relay.wait_stderr_contains("listening on", Duration::from_secs(10)),
        "{}",
        relay.stderr_text()
    );
    let raised = soft_files_limit(relay.pid());
    assert!(
        raised.is_some_and(|n| n >= 2 * BURST as u64),
        "the relay's soft limit on open files is {raised:?}"
    );
    let nginx = Nginx::start(&relay.endpoint().spec(), BURST);
    let port = nginx.port();

    let start = Arc::new(Barrier::new(BURST));
    let players: Vec<_> = (0..BURST)
        .map(|i| {
            let start = start.clone();
            thread::Builder::new()
                .name(format!("player-{i}"))
                .stack_size(CLIENT_STACK)
                .spawn(move || {
                    let raw = format!(
                        "GET /register?code={}&state={STATE_Q} HTTP/1.1\r\n\
                         Host: localhost\r\nConnection: close\r\n\r\n",
                        code(i)
                    );
                    start.wait();
                    // The request side stays open, as a browser's does: nginx
                    // takes a half-close for a player who has gone.
                    check(try_http(port, raw.as_bytes(), false))
                })
                .expect("spawning a player thread")
        })
        .collect();
    let outcomes: Vec<(String, Result<(), String>)> = players
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let outcome = p
                .join()
                .unwrap_or_else(|_| Err("the player thread panicked".into()));
            (code(i), outcome)
        })
        .collect();

    if let Some((failed, why)) = failures(&outcomes) {
        panic!(
            "{failed} of {BURST} players did not see the success page: {why}\nnginx:\n{}",
            nginx.error_log()
        );
    }

    // Every code reached the bot exactly once, and nothing else did.
    let sent: Vec<String> = (0..BURST).map(code).collect();
    bot.assert_received_each_once(&sent, "gAAAAABnNginxState=");

    // Nobody was turned away, and nothing went wrong on the way.
    let log = relay.stderr_text();
    let complaints = complaints(&log);
    assert!(
        complaints.is_empty(),
        "the relay complained:\n{complaints:#?}"
    );
    assert_eq!(
        log.matches("outcome=approved status=200").count(),
        BURST,
        "the relay's answers"
    );
    let nginx_log = nginx.error_log();
    assert!(
        !["[error]", "[crit]", "[alert]", "[emerg]"]
            .iter()
            .any(|level| nginx_log.contains(level)),
        "nginx:\n{nginx_log}"
    );
    assert!(relay.stop().success(), "{}", relay.stderr_text());
}

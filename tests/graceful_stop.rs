//! Graceful stop and the FastCGI-side bounds: SIGTERM lets a
//! request the bot already has finish and then exits 0, refusing new work;
//! a stalled web server cannot pin a connection; `--listen` answers past its
//! connection cap with "overloaded"; oversized params or bodies get a 400
//! without the bot being contacted.
//!
//! Every server gets a fresh store (`REGISTER_STATE_DIR` in a [`TempDir`]).

use std::io::Write;
use std::path::Path;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

const STATE_Q: &str = "gAAAAABnStopState%3D";

fn query(code: &str) -> String {
    format!("code={code}&state={STATE_Q}")
}

/// Asserts a complete success page: END_REQUEST "complete", STDOUT ended,
/// 200, the check mark and the bot's message.
fn assert_approved(reply: &FcgiReply) {
    assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE, "{reply:?}");
    assert!(reply.stdout_ended, "STDOUT not ended: {reply:?}");
    let page = reply.http();
    assert_eq!(page.status, 200, "body:\n{}", page.body);
    assert!(
        page.body.contains("aria-label=\"Success\""),
        "{}",
        page.body
    );
    let shown = format!("<p id=\"message\">{}</p>", APPROVED.replace('\'', "&#x27;"));
    assert!(page.body.contains(&shown), "{}", page.body);
    assert!(page.body.trim_end().ends_with("</html>"), "{}", page.body);
}

fn codes(bot: &Bot) -> Vec<String> {
    bot.received()
        .into_iter()
        .map(|r| {
            assert_eq!(r.error, None, "{r:?}");
            r.code
        })
        .collect()
}

/// Sends one request on a fresh connection and reads its reply, errors
/// returned rather than panicking.
fn try_get(server: &Server, id: u16, query: &str, keep_conn: bool) -> Result<FcgiReply, String> {
    let mut conn = server.try_connect().map_err(|e| format!("connect: {e}"))?;
    let params = get_params(query);
    send_request(&mut conn, id, &as_pairs(&params), &[], keep_conn)
        .map_err(|e| format!("send: {e}"))?;
    try_read_reply(&mut conn, id)
}

fn get(server: &Server, query: &str) -> FcgiReply {
    try_get(server, 1, query, false).unwrap_or_else(|e| {
        panic!(
            "request to {}: {e}\nserver stderr:\n{}",
            server.addr(),
            server.stderr_text()
        )
    })
}

// ---------------------------------------------------------------------------
// SIGTERM during a slow bot reply
// ---------------------------------------------------------------------------

/// How long a server may take to exit after SIGTERM when the bot still
/// owes at most 1 s.
const STOP_BOUND: Duration = Duration::from_secs(4);

/// Sends a request, waits until the bot has its code, sends SIGTERM, runs
/// `after_signal` (while the bot is still sleeping), and returns the reply
/// and how long the server took to exit after the signal.
fn sigterm_mid_request(
    server: &mut Server,
    bot: &Bot,
    sig: &str,
    after_signal: impl FnOnce(&Server),
) -> (FcgiReply, Duration) {
    let q = query("stop-code");
    let server_ref = &*server;
    let (reply, signalled) = thread::scope(|s| {
        let pending = s.spawn(|| get(server_ref, &q));
        let got = bot.wait_received(1, Duration::from_secs(5));
        assert_eq!(got.len(), 1, "the request never reached the bot");
        let signalled = Instant::now();
        server_ref.signal(sig);
        after_signal(server_ref);
        (pending.join().unwrap(), signalled)
    });
    let status = server.wait_within(STOP_BOUND).unwrap_or_else(|| {
        panic!(
            "no exit within {STOP_BOUND:?} of SIG{sig}; stderr:\n{}",
            server.stderr_text()
        )
    });
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert_eq!(status.code(), Some(0));
    (reply, took)
}

#[test]
fn sigterm_during_a_slow_reply_fd0_answers_then_exits_0() {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "1"]);
    let mut server = Fd0Server::start(&[
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
    ]);
    let (reply, took) = sigterm_mid_request(&mut server, &bot, "TERM", |server| {
        // A request that comes after the stop is not taken on: the kernel
        // may queue the connection, but it is closed unanswered.
        let late = try_get(server, 1, &query("late-code"), false);
        assert!(
            late.is_err(),
            "a request after SIGTERM was answered: {late:?}"
        );
    });
    assert_approved(&reply);
    assert!(took < STOP_BOUND, "{took:?}");
    assert!(server.try_connect().is_err(), "still accepting after exit");
    assert_eq!(codes(&bot), ["stop-code"]);
}

fn sigterm_during_a_slow_reply_listen(kind: &str, sig: &str) {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "1"]);
    let mut server = ListenServer::start(
        kind,
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
        ],
    );
    let (reply, took) = sigterm_mid_request(&mut server, &bot, sig, |server| {
        // The listener goes at once, while the request is still in flight.
        let refused = wait_until(Duration::from_millis(800), || {
            let gone = match server.endpoint() {
                Endpoint::Unix(path) => !Path::new(path).exists(),
                Endpoint::Tcp(_) => true,
            };
            gone && server.try_connect().is_err()
        });
        assert!(refused, "still accepting connections after SIGTERM");
    });
    assert_approved(&reply);
    assert!(took < STOP_BOUND, "{took:?}");
    assert!(server.try_connect().is_err(), "still accepting after exit");
    assert_eq!(codes(&bot), ["stop-code"]);
}

#[test]
fn sigterm_during_a_slow_reply_listen_unix_answers_then_exits_0() {
    sigterm_during_a_slow_reply_listen("unix", "TERM");
}

#[test]
fn sigterm_during_a_slow_reply_listen_tcp_answers_then_exits_0() {
    sigterm_during_a_slow_reply_listen("tcp", "TERM");
}

/// SIGHUP (a closed terminal, an operator expecting a reload) stops as
/// gracefully: its default would end the process with the answer unsent.
#[test]
fn sighup_during_a_slow_reply_listen_answers_then_exits_0() {
    sigterm_during_a_slow_reply_listen("unix", "HUP");
}

/// mod_fcgid keeps its connection to an fd-0 process open between
/// requests; a stop must not wait for the web server to close it.
#[test]
fn sigterm_with_an_idle_keep_alive_connection_fd0_exits_promptly() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let mut server = Fd0Server::start(&[
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
    ]);
    let mut kept = server.connect();
    assert_approved(&fcgi_get(&mut kept, 1, &query("keep-code"), true));
    let signalled = Instant::now();
    let status = server.stop_within(Duration::from_secs(2));
    let took = signalled.elapsed();
    assert!(
        status.is_some(),
        "fd-0 server still running {took:?} after SIGTERM with an idle kept connection"
    );
    assert!(status.unwrap().success(), "exit status {status:?}");
    assert!(kept.closed_within(Duration::from_secs(1)));
    assert_eq!(codes(&bot), ["keep-code"]);
}

/// A launcher may hand over a non-blocking listening socket: the fd-0
/// process then waits for connections all the same (no retry loop that
/// logs while idle), answers each, and still stops at once.
#[test]
fn a_non_blocking_fd0_socket_is_waited_on_and_stopped() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let mut server = Fd0Server::start_nonblocking(&[
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
    ]);
    // Idle long enough for a retrying accept to have logged many times.
    thread::sleep(Duration::from_millis(300));
    for code in ["nb-one", "nb-two"] {
        assert_approved(&server.get(&query(code)));
    }
    let status = server.stop_within(Duration::from_secs(2));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    let log = server.stderr_text();
    assert!(!log.contains("accept failed"), "{log}");
    assert_eq!(codes(&bot), ["nb-one", "nb-two"]);
}

/// Between connections an fd-0 process waits in a blocking accept, with
/// nothing else to wake it: SIGTERM (and SIGINT, SIGUSR1) must end that
/// wait, not the next connection. Several stops in a row, after one
/// request and after none, at whatever point of the loop they land.
#[test]
fn a_stop_signal_ends_the_fd0_wait_for_a_connection() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    for (round, sig) in ["TERM", "INT", "USR1", "TERM"].into_iter().enumerate() {
        let mut server = Fd0Server::start(&[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
        ]);
        if round % 2 == 0 {
            assert_approved(&get(&server, &query(&format!("wait-{round}"))));
        }
        // Not a synchronisation: the process is waiting for a connection
        // by now, or about to, and either way must stop.
        thread::sleep(Duration::from_millis(100));
        server.signal(sig);
        let status = server.wait_within(Duration::from_secs(2));
        assert!(
            status.is_some(),
            "fd-0 server still waiting 2 s after SIG{sig}; stderr:\n{}",
            server.stderr_text()
        );
        assert_eq!(status.unwrap().code(), Some(0));
    }
    assert_eq!(codes(&bot), ["wait-0", "wait-2"]);
}

#[test]
fn sigterm_with_an_idle_keep_alive_connection_listen_exits_promptly() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let mut server = ListenServer::start_unix(&[
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
    ]);
    let mut kept = server.connect();
    assert_approved(&fcgi_get(&mut kept, 1, &query("keep-code"), true));
    let status = server.stop_within(Duration::from_secs(2));
    assert!(
        status.is_some(),
        "--listen server still running 2 s after SIGTERM with an idle kept connection"
    );
    assert!(status.unwrap().success(), "exit status {status:?}");
    assert!(kept.closed_within(Duration::from_secs(1)));
}

// ---------------------------------------------------------------------------
// A stalled FastCGI peer
// ---------------------------------------------------------------------------

/// Ways a web server can stall mid-record: half a record header; a whole
/// BEGIN_REQUEST then a PARAMS record cut short.
fn stalls() -> Vec<(&'static str, Vec<u8>)> {
    let begin = record_bytes(
        FCGI_BEGIN_REQUEST,
        1,
        &begin_request_body(FCGI_RESPONDER, 0),
        0,
    );
    let params = encode_pairs(&as_pairs(&get_params(&query("stalled-code"))));
    let mut mid_params = begin.clone();
    let record = record_bytes(FCGI_PARAMS, 1, &params, 0);
    mid_params.extend_from_slice(&record[..record.len() / 2]);
    vec![
        ("half a record header", begin[..4].to_vec()),
        ("half a PARAMS record", mid_params),
    ]
}

/// The server must drop a connection stalled for REGISTER_FCGI_TIMEOUT=1
/// within this long (1 s plus a margin), and not much before 1 s.
const STALL_CLOSE_BOUND: Duration = Duration::from_millis(2500);
const STALL_CLOSE_AT_LEAST: Duration = Duration::from_millis(900);

fn stall_env<'a>(bot: &'a Bot, store: &'a TempDir) -> [(&'a str, &'a str); 3] {
    [
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
        ("REGISTER_FCGI_TIMEOUT", "1"),
    ]
}

#[test]
fn a_stalled_peer_is_dropped_and_others_are_served_meanwhile_listen() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let mut server = ListenServer::start_unix(&stall_env(&bot, &store));
    for (i, (what, bytes)) in stalls().into_iter().enumerate() {
        let mut stalled = server.connect();
        stalled.write_all(&bytes).unwrap();
        let stalled_at = Instant::now();
        // Another connection is served while the stalled one is open.
        let code = format!("other-{i}");
        assert_approved(&get(&server, &query(&code)));
        let served_after = stalled_at.elapsed();
        assert!(
            stalled.closed_within(STALL_CLOSE_BOUND + Duration::from_millis(500)),
            "{what}: the stalled connection is still open"
        );
        let closed_after = stalled_at.elapsed();
        assert!(
            served_after < closed_after,
            "{what}: the other request waited for the stall ({served_after:?})"
        );
        assert!(
            (STALL_CLOSE_AT_LEAST..STALL_CLOSE_BOUND).contains(&closed_after),
            "{what}: closed after {closed_after:?}"
        );
    }
    // And it still serves afterwards.
    assert_approved(&get(&server, &query("after-stalls")));
    assert_eq!(codes(&bot), ["other-0", "other-1", "after-stalls"]);
    assert!(server.stop().success());
}

/// fd 0 serves one connection at a time: the next one is served once the
/// stalled one has been dropped, within the bound.
#[test]
fn a_stalled_peer_is_dropped_and_the_next_is_served_fd0() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let mut server = Fd0Server::start(&stall_env(&bot, &store));
    for (i, (what, bytes)) in stalls().into_iter().enumerate() {
        let mut stalled = server.connect();
        stalled.write_all(&bytes).unwrap();
        let stalled_at = Instant::now();
        let code = format!("next-{i}");
        let server_ref = &*server;
        let (closed_after, served_after, reply) = thread::scope(|s| {
            let next = s.spawn(|| {
                let r = get(server_ref, &query(&code));
                (stalled_at.elapsed(), r)
            });
            assert!(
                stalled.closed_within(STALL_CLOSE_BOUND + Duration::from_millis(500)),
                "{what}: the stalled connection is still open"
            );
            let closed_after = stalled_at.elapsed();
            let (served_after, reply) = next.join().unwrap();
            (closed_after, served_after, reply)
        });
        assert!(
            (STALL_CLOSE_AT_LEAST..STALL_CLOSE_BOUND).contains(&closed_after),
            "{what}: closed after {closed_after:?}"
        );
        assert_approved(&reply);
        assert!(
            served_after < STALL_CLOSE_BOUND + Duration::from_millis(500),
            "{what}: the next request took {served_after:?}"
        );
    }
    assert_eq!(codes(&bot), ["next-0", "next-1"]);
    assert!(server.stop().success());
}

// ---------------------------------------------------------------------------
// The connection cap
// ---------------------------------------------------------------------------

fn connection_cap(kind: &str) {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "1"]);
    let mut server = ListenServer::start(
        kind,
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
            ("REGISTER_MAX_CONNS", "2"),
        ],
    );
    let server_ref = &*server;
    thread::scope(|s| {
        let busy: Vec<_> = ["busy-a", "busy-b"]
            .into_iter()
            .map(|code| {
                s.spawn(move || {
                    let mut conn = server_ref.connect();
                    let params = get_params(&query(code));
                    send_request(&mut conn, 1, &as_pairs(&params), &[], false).unwrap();
                    let reply = try_read_reply(&mut conn, 1);
                    // Wait for the server to close it, so its slot is free.
                    let closed = conn.closed_within(Duration::from_secs(2));
                    (reply, closed)
                })
            })
            .collect();
        assert_eq!(
            bot.wait_received(2, Duration::from_secs(5)).len(),
            2,
            "the two busy requests never reached the bot"
        );
        // Both slots are taken: the third is told so at once.
        let asked = Instant::now();
        let third = try_get(server_ref, 1, &query("over-cap"), false)
            .unwrap_or_else(|e| panic!("no overload answer: {e}"));
        assert!(
            asked.elapsed() < Duration::from_millis(700),
            "the overload answer took {:?}",
            asked.elapsed()
        );
        assert!(
            third.protocol_status == FCGI_OVERLOADED || !third.stdout.is_empty(),
            "neither FCGI_OVERLOADED nor a page: {third:?}"
        );
        if !third.stdout.is_empty() {
            let page = third.http();
            assert_eq!(page.status, 503, "body:\n{}", page.body);
        }
        for handle in busy {
            let (reply, closed) = handle.join().unwrap();
            assert_approved(&reply.unwrap_or_else(|e| panic!("busy request: {e}")));
            assert!(closed, "the server did not close a finished connection");
        }
    });
    // The slots are free again.
    let barrier = Barrier::new(2);
    thread::scope(|s| {
        let handles: Vec<_> = ["after-a", "after-b"]
            .into_iter()
            .map(|code| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    get(server_ref, &query(code))
                })
            })
            .collect();
        for h in handles {
            assert_approved(&h.join().unwrap());
        }
    });
    let mut got = codes(&bot);
    got.sort();
    assert_eq!(got, ["after-a", "after-b", "busy-a", "busy-b"]);
    assert!(server.stop().success());
}

#[test]
fn past_the_connection_cap_listen_unix_answers_overloaded() {
    connection_cap("unix");
}

#[test]
fn past_the_connection_cap_listen_tcp_answers_overloaded() {
    connection_cap("tcp");
}

// ---------------------------------------------------------------------------
// Caps on params and body
// ---------------------------------------------------------------------------

/// One request with a padding param of `pad` bytes and a body of `body`
/// bytes; returns the reply (or the error reading it).
fn padded_request(
    server: &Server,
    code: &str,
    pad: usize,
    body: usize,
) -> Result<FcgiReply, String> {
    let mut params = get_params(&query(code));
    set_param(&mut params, "HTTP_X_PADDING", &vec![b'p'; pad]);
    if body > 0 {
        set_param(&mut params, "CONTENT_LENGTH", body.to_string().as_bytes());
    }
    let mut conn = server.connect();
    send_request(&mut conn, 1, &as_pairs(&params), &vec![b'b'; body], false)
        .map_err(|e| format!("send: {e}"))?;
    try_read_reply(&mut conn, 1)
}

fn assert_too_large(reply: Result<FcgiReply, String>, what: &str) {
    let reply = reply.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
    let page = reply.http();
    assert_eq!(page.status, 400, "{what}: body:\n{}", page.body);
    assert!(!page.body.contains(APPROVED), "{what}: {}", page.body);
}

fn caps(kind: &str) {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let mut server = ListenServer::start(
        kind,
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
        ],
    );
    // Under the caps: served, so the refusals below are about size.
    assert_approved(&padded_request(&server, "params-60k", 60 * 1024, 0).unwrap());
    assert_approved(&padded_request(&server, "body-60k", 0, 60 * 1024).unwrap());
    // Over them: 400, and the bot never hears of the code.
    assert_too_large(
        padded_request(&server, "params-70k", 70 * 1024, 0),
        "params over 64 KiB",
    );
    assert_too_large(
        padded_request(&server, "body-70k", 0, 70 * 1024),
        "body over 64 KiB",
    );
    // The server is fine afterwards.
    assert_approved(&get(&server, &query("after-caps")));
    assert_eq!(codes(&bot), ["params-60k", "body-60k", "after-caps"]);
    assert!(server.stop().success());
}

#[test]
fn params_or_body_over_64k_get_400_without_the_bot_listen_unix() {
    caps("unix");
}

#[test]
fn params_or_body_over_64k_get_400_without_the_bot_listen_tcp() {
    caps("tcp");
}

/// Past the cap and past the connections being turned away, a flood waits
/// in the listener's queue: every connection gets an answer (the page or
/// "overloaded"), none is closed with nothing, and every code that was
/// answered with the page reached the bot once.
#[test]
fn a_flood_past_both_caps_is_answered_not_dropped() {
    const FLOOD: usize = 100; // 2 served + 64 turned away at once + the rest queued
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "0.5"]);
    let mut server = ListenServer::start(
        "unix",
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
            ("REGISTER_MAX_CONNS", "2"),
        ],
    );
    let server_ref = &*server;
    let barrier = Barrier::new(FLOOD);
    let replies: Vec<(String, Result<FcgiReply, String>)> = thread::scope(|s| {
        let handles: Vec<_> = (0..FLOOD)
            .map(|i| {
                let barrier = &barrier;
                s.spawn(move || {
                    let code = format!("flood-{i}");
                    barrier.wait();
                    let reply = try_get(server_ref, 1, &query(&code), false);
                    (code, reply)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut approved = Vec::new();
    for (code, reply) in replies {
        let reply = reply.unwrap_or_else(|e| {
            panic!(
                "{code}: no answer ({e}); server stderr:\n{}",
                server.stderr_text()
            )
        });
        if reply.protocol_status == FCGI_OVERLOADED && reply.stdout.is_empty() {
            continue;
        }
        let page = reply.http();
        match page.status {
            200 => {
                assert_approved(&reply);
                approved.push(code);
            }
            503 => assert!(page.body.contains("Try again"), "{}", page.body),
            other => panic!("{code}: status {other}:\n{}", page.body),
        }
    }
    assert!(approved.len() >= 2, "only {} served", approved.len());
    let mut got = codes(&bot);
    got.sort();
    approved.sort();
    assert_eq!(got, approved, "the bot got other codes than those answered");
    assert!(server.stop().success());
}

/// One peer that sends management records as fast as it can and reads
/// every answer never makes its socket block: it must not keep the others
/// from being served while it goes on.
#[test]
fn a_peer_that_never_lets_up_does_not_starve_the_others() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let server = ListenServer::start(
        "unix",
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
        ],
    );
    let server_ref = &*server;
    let done = AtomicBool::new(false);
    let hog_bound = Duration::from_secs(30);
    let (reply, hog_cut_short) = thread::scope(|s| {
        let mut hog = server_ref.connect();
        let mut reader = hog.try_clone().expect("cloning the hog's connection");
        let done = &done;
        let feeder = s.spawn(move || {
            let one = record_bytes(
                FCGI_GET_VALUES,
                0,
                &encode_pairs(&[(b"FCGI_MAX_CONNS", b"")]),
                0,
            );
            let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 2000).collect();
            let started = Instant::now();
            while !done.load(Ordering::SeqCst) && started.elapsed() < hog_bound {
                if hog.write_all(&burst).is_err() {
                    break;
                }
            }
            done.load(Ordering::SeqCst)
        });
        let drainer = s.spawn(move || {
            let mut sink = vec![0u8; 64 * 1024];
            while !done.load(Ordering::SeqCst) {
                match std::io::Read::read(&mut reader, &mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        // The hog is under way; a player signs up meanwhile.
        thread::sleep(Duration::from_millis(300));
        let reply = try_get(server_ref, 1, &query("while-hogged"), false);
        done.store(true, Ordering::SeqCst);
        let cut_short = feeder.join().unwrap();
        drainer.join().unwrap();
        (reply, cut_short)
    });
    assert_approved(&reply.unwrap_or_else(|e| panic!("no answer while hogged: {e}")));
    assert!(
        hog_cut_short,
        "the sign-up was answered only after the hog stopped on its own"
    );
    assert_eq!(codes(&bot), ["while-hogged"]);
}

/// Peers that each send most of a request's params and then nothing are
/// bounded one by one by the FastCGI limits, but not in sum: past the
/// relay's budget for requests being received, connections still sending
/// one are let go, and a player is served all the same.
#[test]
fn many_half_sent_requests_are_bounded_in_sum() {
    const PEERS: usize = 600;
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let server = ListenServer::start(
        "unix",
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
        ],
    );
    let big = "x".repeat(60_000);
    let params = encode_pairs(&[(b"HTTP_X_FILLER", big.as_bytes())]);
    let mut peers = Vec::new();
    for _ in 0..PEERS {
        let mut conn = server.connect();
        let mut bytes = record_bytes(
            FCGI_BEGIN_REQUEST,
            1,
            &begin_request_body(FCGI_RESPONDER, 0),
            0,
        );
        bytes.extend(record_bytes(FCGI_PARAMS, 1, &params, 0));
        if conn.write_all(&bytes).is_ok() {
            peers.push(conn);
        }
    }
    // A player meanwhile, whose request arrives in two pieces: the relay
    // lets go of those holding the most, not of whoever read last.
    let mut player = server.connect();
    let mut params = get_params(&query("beside-the-hoard"));
    // Big enough to push the sum past the budget whoever else is there,
    // small enough to hold less than any one of the hoard.
    params.push((b"HTTP_COOKIE".to_vec(), vec![b'c'; 45_000]));
    let request = request_bytes(1, &as_pairs(&params), &[], false);
    let (first, rest) = request.split_at(request.len() - 200);
    let cut = |e| panic!("the player's connection was let go mid-request: {e}");
    player.write_all(first).unwrap_or_else(cut);
    thread::sleep(Duration::from_millis(100));
    player.write_all(rest).unwrap_or_else(cut);
    let reply = try_read_reply(&mut player, 1).unwrap_or_else(|e| {
        panic!(
            "the player in two pieces got no answer: {e}\n{}",
            server.stderr_text()
        )
    });
    assert_approved(&reply);
    let mut cut = 0;
    for conn in &mut peers {
        if conn.closed_within(Duration::from_millis(5)) {
            cut += 1;
        }
    }
    assert!(
        cut > 0,
        "{PEERS} half-sent requests of 60 kB all kept; server stderr:\n{}",
        server.stderr_text()
    );
    assert!(
        server
            .stderr_text()
            .contains("requests being received hold over"),
        "{}",
        server.stderr_text()
    );
    assert_eq!(codes(&bot), ["beside-the-hoard"]);
}

/// Past the cap the answer goes out as soon as the first record's header
/// is in, while the web server may still be writing the rest of its
/// request: that rest is read, not refused with a broken pipe (Apache's
/// mod_proxy_fcgi then shows its own empty 503 instead of the page).
#[test]
fn an_over_cap_request_still_being_written_gets_the_overload_page() {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "2"]);
    let server = ListenServer::start(
        "unix",
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
            ("REGISTER_MAX_CONNS", "1"),
        ],
    );
    let server_ref = &*server;
    thread::scope(|s| {
        let busy = s.spawn(|| get(server_ref, &query("holding-the-slot")));
        assert_eq!(
            bot.wait_received(1, Duration::from_secs(5)).len(),
            1,
            "the busy request never reached the bot"
        );
        let mut late = server_ref.connect();
        let params = get_params(&query("over-cap-in-pieces"));
        let request = request_bytes(1, &as_pairs(&params), &[], false);
        let (begin, rest) = request.split_at(16);
        late.write_all(begin).unwrap();
        thread::sleep(Duration::from_millis(50));
        late.write_all(rest)
            .unwrap_or_else(|e| panic!("the rest of the request was refused: {e}"));
        let reply = try_read_reply(&mut late, 1).unwrap_or_else(|e| panic!("no answer: {e}"));
        assert_eq!(reply.http().status, 503, "{reply:?}");
        assert!(reply.http().body.contains("Try again"), "{reply:?}");
        assert_approved(&busy.join().unwrap());
    });
    assert_eq!(codes(&bot), ["holding-the-slot"]);
}

/// The relay's resident memory, from `/proc`.
fn resident_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading the relay's /proc status: {e}"));
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in:\n{status}"));
    kib * 1024
}

/// A peer that keeps answers waiting unread but reads them steadily gets
/// everything it asks for, yet the relay holds only what is still unread:
/// answers already sent do not pile up in its memory, however much the
/// peer takes in all.
#[test]
fn a_slow_steady_reader_does_not_grow_the_relay() {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Generous: the relay itself takes a few MiB.
    const BOUND: usize = 32 << 20;
    /// What the peer reads in all: past the bound, so memory that kept
    /// every answer sent would cross it.
    const TO_READ: usize = BOUND + (8 << 20);
    /// The peer's reading pace, well below what the relay answers at (a
    /// debug build, some 20 MB/s), so that answers always wait for it.
    const RATE: f64 = 8.0 * 1024.0 * 1024.0;
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let server = ListenServer::start(
        "unix",
        &[
            ("REGISTER_BOT_ADDR", bot.addr()),
            ("REGISTER_STATE_DIR", store.path_str()),
        ],
    );
    let pid = server.pid();
    let conn = server.connect();
    let mut writer = conn.try_clone().expect("cloning the peer's connection");
    let mut reader = conn.try_clone().expect("cloning the peer's connection");
    writer.set_timeouts(None).unwrap();
    let done = AtomicBool::new(false);
    let (read, peak) = thread::scope(|s| {
        let done = &done;
        s.spawn(move || {
            // A management record of a type the relay does not know: each
            // one is answered (FCGI_UNKNOWN_TYPE).
            let one = record_bytes(99, 0, &[], 0);
            let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 4096).collect();
            while !done.load(Ordering::SeqCst) && writer.write_all(&burst).is_ok() {}
        });
        let sampler = s.spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::SeqCst) {
                peak = peak.max(resident_bytes(pid));
                thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        let mut sink = vec![0u8; 64 * 1024];
        let mut read = 0usize;
        let started = Instant::now();
        let time_bound = Duration::from_secs(30);
        while read < TO_READ && started.elapsed() < time_bound {
            match std::io::Read::read(&mut reader, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
            let due = Duration::from_secs_f64(read as f64 / RATE);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                thread::sleep(ahead);
            }
        }
        done.store(true, Ordering::SeqCst);
        // Ends the writer's blocked write.
        let _ = conn.shutdown(std::net::Shutdown::Both);
        (read, sampler.join().unwrap())
    });
    assert!(
        read >= TO_READ,
        "the peer read only {read} bytes of answers; server stderr:\n{}",
        server.stderr_text()
    );
    assert!(
        peak < BOUND,
        "the relay grew to {} MiB while the peer read {} MiB",
        peak >> 20,
        read >> 20
    );
}

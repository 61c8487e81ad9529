//! Web-server peers that misbehave slowly: each may hold the relay only
//! for bounded time, and none may delay another's answer.
//!
//! - A request that trickles in (one byte at a time, each well within the
//!   FastCGI timeout) is dropped once the whole request overruns it.
//! - A connection that only sends management records, or records for a
//!   request that never began, is dropped once idle past the timeout.
//! - Idle connections past the `--listen` connection cap do not queue a
//!   real request behind them: it is answered at once.

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// REGISTER_FCGI_TIMEOUT in these tests, in seconds.
const TIMEOUT_SECS: u64 = 2;
/// Between two bytes of a trickling peer: well under the timeout, so
/// only a bound on the whole request can catch it.
const TRICKLE: Duration = Duration::from_millis(400);
/// How late past the timeout a peer may be dropped on a loaded machine.
const MARGIN: Duration = Duration::from_millis(2500);

fn env<'a>(
    bot: &'a Bot,
    store: &'a TempDir,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
        ("REGISTER_FCGI_TIMEOUT", "2"),
    ];
    env.extend_from_slice(extra);
    env
}

fn timeout() -> Duration {
    Duration::from_secs(TIMEOUT_SECS)
}

/// Sends `bytes` one at a time, `TRICKLE` apart, until the server closes
/// the connection; returns how long after the first byte it did (`None`:
/// not within the timeout and the margin).
fn trickle(conn: &mut Conn, bytes: &[u8]) -> Option<Duration> {
    let first = Instant::now();
    for byte in bytes {
        if conn.write_all(&[*byte]).is_err() || conn.closed_within(TRICKLE) {
            return Some(first.elapsed());
        }
        if first.elapsed() > timeout() + MARGIN {
            return None;
        }
    }
    None
}

/// A whole GET request with a long query, so trickling it takes far
/// longer than the timeout.
fn long_request(code: &str) -> Vec<u8> {
    let query = format!("code={code}&state=trickled-state&pad={}", "x".repeat(200));
    let params = get_params(&query);
    request_bytes(1, &as_pairs(&params), &[], false)
}

fn served(server: &Server, code: &str) -> FcgiReply {
    let mut conn = server.connect();
    fcgi_get(&mut conn, 1, &format!("code={code}&state=s"), false)
}

fn assert_approved(reply: &FcgiReply) {
    assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE, "{reply:?}");
    assert_answer_page(&reply.http(), true, APPROVED);
}

fn trickling_request_is_dropped(server: &Server, bot: &Bot) {
    let mut conn = server.connect();
    let bytes = long_request("trickled-code");
    assert!(
        TRICKLE * bytes.len() as u32 > timeout() * 4,
        "the request would arrive within the timeout anyway"
    );
    let closed_after =
        trickle(&mut conn, &bytes).unwrap_or_else(|| panic!("a trickling request was read whole"));
    assert!(
        closed_after >= timeout() - Duration::from_millis(100) && closed_after < timeout() + MARGIN,
        "dropped after {closed_after:?}"
    );
    // Nothing reached the bot, and others are served.
    assert_approved(&served(server, "after-trickle"));
    assert_eq!(
        bot.received()
            .into_iter()
            .map(|r| r.code)
            .collect::<Vec<_>>(),
        ["after-trickle"]
    );
}

#[test]
fn a_trickling_request_is_dropped_within_its_deadline_listen() {
    let (bot, store) = (Bot::start("json", "approve"), private_dir("peers"));
    let mut server = ListenServer::start_unix(&env(&bot, &store, &[]));
    trickling_request_is_dropped(&server, &bot);
    assert!(server.stop().success());
}

#[test]
fn a_trickling_request_is_dropped_within_its_deadline_fd0() {
    let (bot, store) = (Bot::start("json", "approve"), private_dir("peers"));
    let mut server = Fd0Server::start(&env(&bot, &store, &[]));
    trickling_request_is_dropped(&server, &bot);
    assert!(server.stop().success());
}

#[test]
fn endless_management_records_and_strays_count_against_the_idle_deadline() {
    let (bot, store) = (Bot::start("json", "approve"), private_dir("peers"));
    let mut server = ListenServer::start_unix(&env(&bot, &store, &[]));
    let mut get_values = Vec::new();
    write_record(
        &mut get_values,
        FCGI_GET_VALUES,
        0,
        &encode_pairs(&[(b"FCGI_MPXS_CONNS", b"")]),
    )
    .unwrap();
    let mut stray = Vec::new();
    write_record(&mut stray, FCGI_PARAMS, 9, &encode_pairs(&[(b"A", b"b")])).unwrap();
    for (what, record) in [("GET_VALUES", get_values), ("a stray record", stray)] {
        let mut conn = server.connect();
        let opened = Instant::now();
        // Whole records, one every TRICKLE: each is answered or ignored,
        // none buys more time.
        let closed_after = loop {
            if conn.write_all(&record).is_err() || conn.closed_within(TRICKLE) {
                break opened.elapsed();
            }
            assert!(
                opened.elapsed() < timeout() + MARGIN,
                "{what}: still open after {:?}",
                opened.elapsed()
            );
        };
        assert!(
            closed_after >= timeout() - Duration::from_millis(100),
            "{what}: dropped after {closed_after:?}"
        );
    }
    assert_approved(&served(&server, "after-management"));
    assert!(server.stop().success());
}

#[test]
fn idle_connections_past_the_cap_do_not_delay_a_real_request() {
    const HOLDERS: usize = 2;
    const PAST_THE_CAP: usize = 44;
    let (bot, store) = (Bot::start("json", "approve"), private_dir("peers"));
    // A long timeout: the idle connections stay for the whole test.
    let mut server = ListenServer::start_unix(&env(
        &bot,
        &store,
        &[("REGISTER_MAX_CONNS", "2"), ("REGISTER_FCGI_TIMEOUT", "60")],
    ));
    // Every connection thread held by a connection that says nothing…
    let holders: Vec<Conn> = (0..HOLDERS).map(|_| server.connect()).collect();
    thread::sleep(Duration::from_millis(200));
    // …and a crowd more past the cap, also silent.
    let crowd: Vec<Conn> = (0..PAST_THE_CAP).map(|_| server.connect()).collect();
    let asked = Instant::now();
    let mut conn = server.connect();
    let reply = fcgi_get(&mut conn, 1, "code=real-code&state=s", false);
    let took = asked.elapsed();
    // Answered, not queued behind the crowd: told to try again at once.
    assert_eq!(reply.protocol_status, FCGI_OVERLOADED, "{reply:?}");
    let page = reply.http();
    assert_eq!(page.status, 503, "{}", page.body);
    assert!(page.body.contains("Try again"), "{}", page.body);
    assert!(
        took < Duration::from_secs(3),
        "the real request waited {took:?} behind {PAST_THE_CAP} idle connections"
    );
    assert!(bot.received().is_empty());
    // The overload answer is logged like every other.
    assert!(
        server.wait_stderr_contains("outcome=overloaded status=503", Duration::from_secs(5)),
        "{}",
        server.stderr_text()
    );
    // Once the holders leave, requests are served again.
    drop(holders);
    drop(crowd);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = served(&server, "after-the-crowd");
        if reply.protocol_status == FCGI_REQUEST_COMPLETE {
            assert_approved(&reply);
            break;
        }
        assert!(Instant::now() < deadline, "still overloaded: {reply:?}");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(server.stop().success());
}

//! The built binary as a FastCGI responder: with a listening socket as
//! fd 0 (mod_fcgid, spawn-fcgi; unix and TCP) and as `--listen` server
//! (unix and TCP), driven by the FastCGI client in `support`, against the
//! Python bot peer. Each test asserts what the bot received and what the
//! page says.
//!
//! Every server gets its own replay store (`REGISTER_STATE_DIR` in a fresh
//! temp dir) and every request its own long random-looking code.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::ops::{Deref, DerefMut};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// How long a server may take to close a connection it should drop.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------

/// A code about as long as osu!'s (so QUERY_STRING needs a 4-byte length).
fn new_code() -> String {
    unique("def50200", 1000)
}

fn new_state() -> String {
    unique("gAAAAAB", 140)
}

fn query(code: &str, state: &str) -> String {
    format!("code={code}&state={state}")
}

/// A request that completed normally: protocol status, app status, the
/// STDOUT stream ended, nothing on STDERR. Returns the parsed page.
fn completed(reply: &FcgiReply) -> HttpLike {
    assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE, "{reply:?}");
    assert_eq!(reply.app_status, 0, "app status of an answered request");
    assert!(reply.stdout_ended, "STDOUT not ended before END_REQUEST");
    assert!(reply.stderr.is_empty(), "STDERR: {}", reply.stderr_text());
    let h = reply.http();
    assert_security_headers(&h);
    h
}

/// Either kind of server, so one test body can run against all four.
enum AnyServer {
    Fd0(Fd0Server),
    Listen(ListenServer),
}

impl Deref for AnyServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        match self {
            AnyServer::Fd0(s) => s,
            AnyServer::Listen(s) => s,
        }
    }
}

impl DerefMut for AnyServer {
    fn deref_mut(&mut self) -> &mut Server {
        match self {
            AnyServer::Fd0(s) => s,
            AnyServer::Listen(s) => s,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Fd0Unix,
    Fd0Tcp,
    ListenUnix,
    ListenTcp,
}

const ALL_KINDS: [Kind; 4] = [
    Kind::Fd0Unix,
    Kind::Fd0Tcp,
    Kind::ListenUnix,
    Kind::ListenTcp,
];

/// A server of `kind` for the bot at `bot_addr`, with its own replay store
/// (returned, to keep alive) and `extra` settings.
fn start(kind: Kind, bot_addr: &str, extra: &[(&str, &str)]) -> (AnyServer, TempDir) {
    let store = private_dir("fcst");
    let mut env: Vec<(&str, &str)> = vec![
        ("REGISTER_BOT_ADDR", bot_addr),
        ("REGISTER_STATE_DIR", store.path_str()),
        ("REGISTER_BOT_TIMEOUT", "8"),
        ("REGISTER_BOT_RETRY", "0.3"),
    ];
    for (name, value) in extra {
        env.retain(|(n, _)| n != name);
        env.push((name, value));
    }
    let server = match kind {
        Kind::Fd0Unix => AnyServer::Fd0(Fd0Server::start(&env)),
        Kind::Fd0Tcp => AnyServer::Fd0(Fd0Server::start_tcp(&env)),
        Kind::ListenUnix => AnyServer::Listen(ListenServer::start_unix(&env)),
        Kind::ListenTcp => AnyServer::Listen(ListenServer::start_tcp(&env)),
    };
    (server, store)
}

/// After whatever a connection did: the process is alive and a fresh
/// connection is served (success page, the bot gets exactly that code).
fn assert_still_serves(server: &mut Server, bot: &Bot, why: &str) {
    assert!(
        server.try_wait().is_none(),
        "server died after {why}; stderr:\n{}",
        server.stderr_text()
    );
    let before = bot.received().len();
    let (code, state) = (new_code(), new_state());
    let mut conn = server.connect();
    let reply = fcgi_get(&mut conn, 1, &query(&code, &state), false);
    assert_answer_page(&completed(&reply), true, APPROVED);
    let got = bot.received();
    assert_eq!(got.len(), before + 1, "after {why}: {got:?}");
    assert_eq!(got[before], (state.as_str(), code.as_str()), "after {why}");
}

// ---------------------------------------------------------------------------
// Approve / refuse, json / pickle, every transport
// ---------------------------------------------------------------------------

fn approve_and_refuse(kind: Kind) {
    for wire in ["json", "pickle"] {
        for (behaviour, ok, message) in [("approve", true, APPROVED), ("refuse", false, REFUSED)] {
            let bot = Bot::start(wire, behaviour);
            let (server, _store) = start(kind, bot.addr(), &[("REGISTER_WIRE", wire)]);
            let (code, state) = (new_code(), new_state());
            let mut conn = server.connect();
            let reply = fcgi_get(&mut conn, 1, &query(&code, &state), false);
            assert_answer_page(&completed(&reply), ok, message);
            let got = bot.received();
            assert_eq!(got, [(state.as_str(), code.as_str())], "{kind:?} {wire}");
            assert_eq!(got[0].keys, ["code", "state"]);
            assert_eq!(got[0].wire, wire);
            // Without keep_conn the server closes the connection.
            assert!(
                conn.closed_within(CLOSE_WAIT),
                "{kind:?}: connection left open"
            );
            assert_log(&server.stderr_text(), 1, 200, Some(&code), &[&code, &state]);
            assert_eq!(server.stdout_text(), "", "stdout must stay empty");
        }
    }
}

#[test]
fn fd0_unix_approve_and_refuse_json_and_pickle() {
    approve_and_refuse(Kind::Fd0Unix);
}

#[test]
fn fd0_tcp_approve_and_refuse_json_and_pickle() {
    approve_and_refuse(Kind::Fd0Tcp);
}

#[test]
fn listen_unix_approve_and_refuse_json_and_pickle() {
    approve_and_refuse(Kind::ListenUnix);
}

#[test]
fn listen_tcp_approve_and_refuse_json_and_pickle() {
    approve_and_refuse(Kind::ListenTcp);
}

#[test]
fn bot_failures_map_to_gateway_statuses_over_fastcgi() {
    let silent = Bot::start("json", "silent");
    let garbage = Bot::start("pickle", "garbage");
    let refusing = RefusingPort::new();
    let down = refusing.addr().to_string();
    for (addr, wire, status) in [
        (silent.addr(), "json", 504),
        (garbage.addr(), "pickle", 502),
        (down.as_str(), "json", 503),
    ] {
        let (server, _store) = start(
            Kind::ListenUnix,
            addr,
            &[
                ("REGISTER_WIRE", wire),
                ("REGISTER_BOT_TIMEOUT", "1"),
                ("REGISTER_BOT_RETRY", "0.2"),
            ],
        );
        let (code, state) = (new_code(), new_state());
        let started = Instant::now();
        let reply = fcgi_get(&mut server.connect(), 1, &query(&code, &state), false);
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
        let h = completed(&reply);
        assert_eq!(h.status, status, "{}", h.body);
        assert_eq!(h.body.contains("Try again"), status == 503);
        assert_log(
            &server.stderr_text(),
            1,
            status,
            Some(&code),
            &[&code, &state],
        );
    }
    assert_eq!(silent.received().len(), 1);
    assert_eq!(garbage.received().len(), 1);
}

#[test]
fn head_has_no_body_and_post_with_a_body_is_405() {
    let bot = Bot::start("json", "approve");
    let (server, _store) = start(Kind::Fd0Unix, bot.addr(), &[]);
    let (code, state) = (new_code(), new_state());
    let q = query(&code, &state);

    let params = method_params_bytes("HEAD", q.as_bytes());
    let reply = fcgi_request(&mut server.connect(), 1, &as_pairs(&params), false);
    let h = completed(&reply);
    assert_eq!(h.status, 200);
    assert!(h.body_bytes.is_empty(), "HEAD body {:?}", h.body);

    let mut params = method_params_bytes("POST", q.as_bytes());
    set_param(&mut params, "CONTENT_LENGTH", b"11");
    set_param(
        &mut params,
        "CONTENT_TYPE",
        b"application/x-www-form-urlencoded",
    );
    let mut conn = server.connect();
    send_request(&mut conn, 1, &as_pairs(&params), b"code=c&s=s&", false).unwrap();
    let reply = read_reply(&mut conn, 1);
    let h = completed(&reply);
    assert_eq!(h.status, 405, "{}", h.body);
    assert_eq!(h.header("Allow"), Some("GET, HEAD"));
    assert_eq!(bot.received(), NOTHING);

    // The code was spent by neither.
    let reply = fcgi_get(&mut server.connect(), 1, &q, false);
    assert_answer_page(&completed(&reply), true, APPROVED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

// ---------------------------------------------------------------------------
// Params as bytes: the Latin-1 User-Agent
// ---------------------------------------------------------------------------

fn latin1_params_keep_the_query(kind: Kind) {
    let bot = Bot::start("json", "approve");
    let (server, _store) = start(kind, bot.addr(), &[]);
    let (code, state) = (new_code(), new_state());
    let mut params = get_params(&query(&code, &state));
    set_param(&mut params, "HTTP_USER_AGENT", b"caf\xe9");
    set_param(&mut params, "HTTP_ACCEPT_LANGUAGE", b"fr-FR,\xff\xfe;q=0.9");
    set_param(&mut params, "HTTP_COOKIE", b"name=\xc3(\x80");
    // Even a name that is not UTF-8.
    params.insert(0, (b"HTTP_X_\xe9\xe8".to_vec(), b"\xe0".to_vec()));
    let reply = fcgi_request(&mut server.connect(), 1, &as_pairs(&params), false);
    assert_answer_page(&completed(&reply), true, APPROVED);
    assert_eq!(
        bot.received(),
        [(state.as_str(), code.as_str())],
        "{kind:?}: the bot must get the exact code and state"
    );
    assert_log(&server.stderr_text(), 1, 200, Some(&code), &[&code, &state]);
}

#[test]
fn fd0_latin1_user_agent_keeps_the_query() {
    latin1_params_keep_the_query(Kind::Fd0Unix);
}

#[test]
fn listen_latin1_user_agent_keeps_the_query() {
    latin1_params_keep_the_query(Kind::ListenTcp);
}

#[test]
fn params_spread_over_tiny_padded_records() {
    let bot = Bot::start("pickle", "approve");
    let (server, _store) = start(Kind::Fd0Tcp, bot.addr(), &[("REGISTER_WIRE", "pickle")]);
    let (code, state) = (new_code(), new_state());
    let params = get_params(&query(&code, &state));
    let stream = encode_pairs(&as_pairs(&params));
    let id = 0xfffe;
    let mut bytes = record_bytes(
        FCGI_BEGIN_REQUEST,
        id,
        &begin_request_body(FCGI_RESPONDER, 0),
        3,
    );
    // Record sizes 1, 2, 3, ... so pairs and lengths straddle records.
    let (mut at, mut size) = (0, 1);
    while at < stream.len() {
        let end = (at + size).min(stream.len());
        bytes.extend(record_bytes(
            FCGI_PARAMS,
            id,
            &stream[at..end],
            (size % 7) as u8,
        ));
        at = end;
        size += 1;
    }
    bytes.extend(record_bytes(FCGI_PARAMS, id, &[], 5));
    bytes.extend(record_bytes(FCGI_STDIN, id, &[], 0));
    let mut conn = server.connect();
    // Trickle it in pieces too.
    for chunk in bytes.chunks(333) {
        conn.write_all(chunk).unwrap();
        conn.flush().unwrap();
    }
    let reply = read_reply(&mut conn, id);
    assert_answer_page(&completed(&reply), true, APPROVED);
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

// ---------------------------------------------------------------------------
// Connection handling: keep_conn, GET_VALUES, multiplexing, abort
// ---------------------------------------------------------------------------

fn keep_conn_serves_several_requests(kind: Kind) {
    let bot = Bot::start("json", "approve");
    let (server, _store) = start(kind, bot.addr(), &[]);
    let mut conn = server.connect();
    let mut want = Vec::new();
    for (i, (id, keep)) in [(1, true), (1, true), (7, false)].into_iter().enumerate() {
        let (code, state) = (new_code(), new_state());
        let reply = fcgi_get(&mut conn, id, &query(&code, &state), keep);
        assert_answer_page(&completed(&reply), true, APPROVED);
        want.push((state, code));
        let got = bot.received();
        assert_eq!(got.len(), i + 1);
        assert_eq!(got[i], (want[i].0.as_str(), want[i].1.as_str()));
    }
    // The last request did not ask to keep the connection.
    assert!(conn.closed_within(CLOSE_WAIT), "{kind:?}: not closed");
    assert_eq!(outcome_lines(&server.stderr_text()).len(), 3);
}

#[test]
fn fd0_keep_conn_serves_several_requests_on_one_connection() {
    keep_conn_serves_several_requests(Kind::Fd0Unix);
}

#[test]
fn listen_keep_conn_serves_several_requests_on_one_connection() {
    keep_conn_serves_several_requests(Kind::ListenTcp);
}

#[test]
fn get_values_and_unknown_management_records() {
    let bot = Bot::start("json", "approve");
    for kind in [Kind::Fd0Unix, Kind::ListenUnix] {
        let (server, _store) = start(kind, bot.addr(), &[("REGISTER_MAX_CONNS", "7")]);
        let mut conn = server.connect();
        let got = get_values(
            &mut conn,
            &[
                b"FCGI_MPXS_CONNS",
                b"FCGI_MAX_CONNS",
                b"FCGI_MAX_REQS",
                b"NO_SUCH_VALUE",
            ],
        );
        let value = |name: &[u8]| {
            got.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(value(b"FCGI_MPXS_CONNS").as_deref(), Some("0"), "{got:?}");
        let max: usize = value(b"FCGI_MAX_CONNS")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("FCGI_MAX_CONNS in {got:?}"));
        assert!(max >= 1);
        if matches!(kind, Kind::ListenUnix) {
            assert_eq!(max, 7, "REGISTER_MAX_CONNS is what --listen accepts");
        }
        assert!(value(b"FCGI_MAX_REQS").is_some(), "{got:?}");
        assert_eq!(value(b"NO_SUCH_VALUE"), None, "unknown names are left out");

        // An unknown management record type gets UNKNOWN_TYPE naming it.
        write_record(&mut conn, 42, 0, b"whatever").unwrap();
        let rec = read_record(&mut conn).expect("UNKNOWN_TYPE record");
        assert_eq!((rec.0, rec.1), (FCGI_UNKNOWN_TYPE, 0), "{rec:?}");
        assert_eq!(rec.2.len(), 8);
        assert_eq!(rec.2[0], 42);

        // The connection still carries a request afterwards.
        let (code, state) = (new_code(), new_state());
        let reply = fcgi_get(&mut conn, 3, &query(&code, &state), false);
        assert_answer_page(&completed(&reply), true, APPROVED);
        assert_eq!(
            bot.received().last().unwrap(),
            &(state.as_str(), code.as_str())
        );
    }
}

fn second_request_on_a_connection_is_cant_mpx(kind: Kind) {
    let bot = Bot::start("json", "approve");
    let (server, _store) = start(kind, bot.addr(), &[]);
    let (code1, state1) = (new_code(), new_state());
    let (code2, state2) = (new_code(), new_state());
    let mut conn = server.connect();

    // Request 1: everything but the end of its STDIN.
    let mut first = record_bytes(
        FCGI_BEGIN_REQUEST,
        1,
        &begin_request_body(FCGI_RESPONDER, FCGI_KEEP_CONN),
        0,
    );
    push_stream(
        &mut first,
        FCGI_PARAMS,
        1,
        &encode_pairs(&as_pairs(&get_params(&query(&code1, &state1)))),
    );
    conn.write_all(&first).unwrap();
    // Request 2, complete, on the same connection.
    send_request(
        &mut conn,
        2,
        &as_pairs(&get_params(&query(&code2, &state2))),
        &[],
        true,
    )
    .unwrap();
    let refused = read_reply(&mut conn, 2);
    assert_eq!(refused.protocol_status, FCGI_CANT_MPX_CONN, "{refused:?}");
    assert!(refused.stdout.is_empty(), "no answer for request 2");

    // Request 1 completes normally.
    write_record(&mut conn, FCGI_STDIN, 1, &[]).unwrap();
    let reply = read_reply(&mut conn, 1);
    assert_answer_page(&completed(&reply), true, APPROVED);
    assert_eq!(
        bot.received(),
        [(state1.as_str(), code1.as_str())],
        "only request 1 reaches the bot"
    );
    assert!(!server.stderr_text().contains(&fingerprint(&code2)));
}

#[test]
fn fd0_multiplexed_request_gets_cant_mpx_conn() {
    second_request_on_a_connection_is_cant_mpx(Kind::Fd0Unix);
}

#[test]
fn listen_multiplexed_request_gets_cant_mpx_conn() {
    second_request_on_a_connection_is_cant_mpx(Kind::ListenTcp);
}

fn abort_before_completion_never_contacts_the_bot(kind: Kind) {
    for keep in [false, true] {
        let bot = Bot::start("json", "approve");
        let (mut server, _store) = start(kind, bot.addr(), &[]);
        let (code, state) = (new_code(), new_state());
        let flags = if keep { FCGI_KEEP_CONN } else { 0 };
        let mut bytes = record_bytes(
            FCGI_BEGIN_REQUEST,
            9,
            &begin_request_body(FCGI_RESPONDER, flags),
            0,
        );
        let params = get_params(&query(&code, &state));
        push_stream(
            &mut bytes,
            FCGI_PARAMS,
            9,
            &encode_pairs(&as_pairs(&params)),
        );
        bytes.extend(record_bytes(FCGI_ABORT_REQUEST, 9, &[], 0));
        let mut conn = server.connect();
        conn.write_all(&bytes).unwrap();
        let reply = read_reply(&mut conn, 9);
        assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE, "{reply:?}");
        assert!(
            reply.stdout.is_empty(),
            "an aborted request has no page: {reply:?}"
        );
        let (code2, state2) = (new_code(), new_state());
        if keep {
            // A straggler of the aborted request is ignored; the next
            // request on the same connection is served.
            write_record(&mut conn, FCGI_STDIN, 9, &[]).unwrap();
            let reply = fcgi_get(&mut conn, 10, &query(&code2, &state2), false);
            assert_answer_page(&completed(&reply), true, APPROVED);
        } else {
            assert!(conn.closed_within(CLOSE_WAIT), "not closed after abort");
            assert!(server.try_wait().is_none(), "server died after an abort");
            let reply = fcgi_get(&mut server.connect(), 10, &query(&code2, &state2), false);
            assert_answer_page(&completed(&reply), true, APPROVED);
        }
        // The later request is the only one the bot ever saw.
        assert_eq!(
            bot.received(),
            [(state2.as_str(), code2.as_str())],
            "{kind:?} keep_conn={keep}"
        );
        assert!(!server.stderr_text().contains(&fingerprint(&code)));
        assert_log(
            &server.stderr_text(),
            1,
            200,
            Some(&code2),
            &[&code, &state, &code2, &state2],
        );
    }
}

#[test]
fn fd0_abort_before_completion_never_contacts_the_bot() {
    abort_before_completion_never_contacts_the_bot(Kind::Fd0Unix);
}

#[test]
fn listen_abort_before_completion_never_contacts_the_bot() {
    abort_before_completion_never_contacts_the_bot(Kind::ListenUnix);
}

// ---------------------------------------------------------------------------
// Bad input on the socket: no crash, the next connection is served
// ---------------------------------------------------------------------------

/// Byte streams that are not (valid) FastCGI, each sent on its own
/// connection and followed by a half-close.
fn garbage_streams() -> Vec<(&'static str, Vec<u8>)> {
    let begin = |flags| {
        record_bytes(
            FCGI_BEGIN_REQUEST,
            1,
            &begin_request_body(FCGI_RESPONDER, flags),
            0,
        )
    };
    // Deterministic noise (xorshift), with a plausible first byte.
    let mut x: u32 = 0x9e37_79b9;
    let noise: Vec<u8> = (0..4096)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i == 0 { 1 } else { x as u8 }
        })
        .collect();
    let mut truncated_content = record_bytes(FCGI_PARAMS, 1, &[7u8; 100], 0);
    truncated_content.truncate(8 + 10);
    let mut begin_then_cut = begin(0);
    begin_then_cut.extend(&record_bytes(FCGI_PARAMS, 1, b"\x0b\x05QUERY_STRI", 0)[..12]);
    let mut short_begin = record_bytes(FCGI_BEGIN_REQUEST, 1, &[0, 1, 0], 0);
    short_begin.extend(begin(0));
    let mut huge_padding = begin(0);
    huge_padding.extend(record_bytes(FCGI_PARAMS, 1, b"", 255));
    huge_padding.truncate(huge_padding.len() - 200);
    vec![
        (
            "an HTTP request",
            b"GET /register?code=x&state=y HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("FastCGI version 2", {
            let mut r = record_bytes(
                FCGI_BEGIN_REQUEST,
                1,
                &begin_request_body(FCGI_RESPONDER, 0),
                0,
            );
            r[0] = 2;
            r
        }),
        ("half a header", vec![1, 1, 0]),
        ("a truncated record body", truncated_content),
        ("a request cut mid-params", begin_then_cut),
        ("a 3-byte BEGIN_REQUEST body", short_begin),
        ("padding cut short", huge_padding),
        ("random bytes", noise),
        ("zeros", vec![0u8; 1000]),
        ("nothing at all", Vec::new()),
    ]
}

fn garbage_does_not_stop_the_server(kind: Kind) {
    let bot = Bot::start("json", "approve");
    let (mut server, _store) = start(kind, bot.addr(), &[]);
    for (what, bytes) in garbage_streams() {
        let mut conn = server.connect();
        // The server may close as soon as it sees the first bad byte.
        let _ = conn.write_all(&bytes);
        let _ = conn.shutdown(Shutdown::Write);
        assert!(
            conn.closed_within(CLOSE_WAIT),
            "{kind:?}: connection with {what} not closed"
        );
        assert_still_serves(&mut server, &bot, what);
    }
    assert_eq!(bot.received().len(), garbage_streams().len());
    assert_eq!(server.stdout_text(), "");
}

#[test]
fn fd0_garbage_on_a_connection_does_not_stop_the_server() {
    garbage_does_not_stop_the_server(Kind::Fd0Unix);
}

#[test]
fn listen_garbage_on_a_connection_does_not_stop_the_server() {
    garbage_does_not_stop_the_server(Kind::ListenTcp);
}

#[test]
fn a_refused_request_s_answer_arrives_whole_over_tcp() {
    // Over TCP, closing a connection with the peer's bytes still unread
    // makes the kernel reset it, and the 400 already sent is lost.
    let bot = Bot::start("json", "approve");
    for kind in [Kind::Fd0Tcp, Kind::ListenTcp] {
        let (server, _store) = start(kind, bot.addr(), &[]);
        for round in 0..2 {
            let mut conn = server.connect();
            // 600 PARAMS records of 136 bytes: past the 64 KiB cap before
            // their end, with more still on the way.
            let mut bytes = record_bytes(
                FCGI_BEGIN_REQUEST,
                1,
                &begin_request_body(FCGI_RESPONDER, 0),
                0,
            );
            let pair = encode_pairs(&[(b"A", &[b'B'; 127])]);
            for _ in 0..600 {
                bytes.extend(record_bytes(FCGI_PARAMS, 1, &pair, 0));
            }
            conn.write_all(&bytes).unwrap();
            let reply = try_read_reply(&mut conn, 1)
                .unwrap_or_else(|e| panic!("{kind:?} round {round}: {e}"));
            assert_eq!(reply.http().status, 400, "{kind:?}: {}", reply.http().body);
            // The connection ends with a close, not a reset.
            let mut rest = Vec::new();
            let end = conn.read_to_end(&mut rest);
            assert!(end.is_ok(), "{kind:?} round {round}: {end:?}");
        }
        assert!(bot.received().is_empty(), "{:?}", bot.received());
    }
}

#[test]
fn malformed_requests_get_protocol_answers_without_the_bot() {
    let bot = Bot::start("json", "approve");
    for kind in [Kind::Fd0Tcp, Kind::ListenUnix] {
        let (mut server, _store) = start(kind, bot.addr(), &[]);

        // Params whose pair length points far past the end: a 400, not the bot.
        let mut conn = server.connect();
        let mut bytes = record_bytes(
            FCGI_BEGIN_REQUEST,
            4,
            &begin_request_body(FCGI_RESPONDER, 0),
            0,
        );
        let mut pairs = encode_pairs(&[(b"REQUEST_METHOD", b"GET")]);
        pairs.extend_from_slice(&[0x80, 0xff, 0xff, 0xff, 0x01, b'x']);
        push_stream(&mut bytes, FCGI_PARAMS, 4, &pairs);
        push_stream(&mut bytes, FCGI_STDIN, 4, &[]);
        conn.write_all(&bytes).unwrap();
        let reply = read_reply(&mut conn, 4);
        assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE);
        assert_eq!(reply.http().status, 400, "{kind:?}: {}", reply.http().body);

        // Params over 64 KiB: refused, connection closed.
        let mut conn = server.connect();
        let (code, state) = (new_code(), new_state());
        let mut params = get_params(&query(&code, &state));
        set_param(&mut params, "HTTP_COOKIE", &vec![b'c'; 70 * 1024]);
        send_request(&mut conn, 5, &as_pairs(&params), &[], false).unwrap();
        let reply = read_reply(&mut conn, 5);
        assert!(
            reply.http().status >= 400,
            "{kind:?}: oversized params answered {}",
            reply.http().status
        );
        assert!(conn.closed_within(CLOSE_WAIT));

        // A role other than responder.
        let mut conn = server.connect();
        conn.write_all(&record_bytes(
            FCGI_BEGIN_REQUEST,
            6,
            &begin_request_body(FCGI_AUTHORIZER, 0),
            0,
        ))
        .unwrap();
        let reply = read_reply(&mut conn, 6);
        assert_eq!(reply.protocol_status, FCGI_UNKNOWN_ROLE, "{reply:?}");

        // Records for a request that never began are ignored; a request
        // after them on the same connection is served.
        let mut conn = server.connect();
        let mut bytes = Vec::new();
        push_stream(
            &mut bytes,
            FCGI_PARAMS,
            5,
            &encode_pairs(&as_pairs(&get_params("code=ghost&state=ghost"))),
        );
        push_stream(&mut bytes, FCGI_STDIN, 5, &[]);
        bytes.extend(record_bytes(FCGI_DATA, 5, b"data", 0));
        conn.write_all(&bytes).unwrap();
        let (code2, state2) = (new_code(), new_state());
        let reply = fcgi_get(&mut conn, 6, &query(&code2, &state2), false);
        assert_answer_page(&completed(&reply), true, APPROVED);
        assert_eq!(
            bot.received().last().unwrap(),
            &(state2.as_str(), code2.as_str())
        );
        assert!(
            !bot.received()
                .iter()
                .any(|r| r.code == "ghost" || r.code == code)
        );

        assert_still_serves(&mut server, &bot, "malformed requests");
    }
    assert_eq!(
        bot.received().len(),
        4,
        "only the good requests: {:?}",
        bot.received()
    );
}

#[test]
fn fd0_stalled_connection_is_dropped_and_the_next_is_served() {
    let bot = Bot::start("json", "approve");
    let (server, _store) = start(Kind::Fd0Unix, bot.addr(), &[("REGISTER_FCGI_TIMEOUT", "1")]);
    // A web server that stalls mid-record: half a header, then nothing.
    let mut stalled = server.connect();
    stalled.write_all(&[1, 1, 0]).unwrap();
    let started = Instant::now();
    let (code, state) = (new_code(), new_state());
    let reply = fcgi_get(&mut server.connect(), 1, &query(&code, &state), false);
    assert_answer_page(&completed(&reply), true, APPROVED);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "next connection waited {:?}",
        started.elapsed()
    );
    assert!(
        stalled.closed_within(CLOSE_WAIT),
        "the stalled connection was kept"
    );
    assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
}

// ---------------------------------------------------------------------------
// --listen: concurrency and the connection cap
// ---------------------------------------------------------------------------

#[test]
fn listen_serves_concurrent_connections() {
    const N: usize = 20;
    let bot = Bot::start_with("json", "approve", &["--delay", "0.5"]);
    let (server, _store) = start(Kind::ListenTcp, bot.addr(), &[]);
    let endpoint = server.endpoint().clone();
    let started = Instant::now();
    let handles: Vec<_> = (0..N)
        .map(|_| {
            let endpoint = endpoint.clone();
            thread::spawn(move || {
                let (code, state) = (new_code(), new_state());
                let mut conn = endpoint.connect().expect("connect");
                let reply = fcgi_get(&mut conn, 1, &query(&code, &state), false);
                (code, state, reply)
            })
        })
        .collect();
    let mut want = Vec::new();
    for h in handles {
        let (code, state, reply) = h.join().expect("client thread");
        assert_answer_page(&completed(&reply), true, APPROVED);
        want.push((state, code));
    }
    let elapsed = started.elapsed();
    // One after another would take N x 0.5 s = 10 s.
    assert!(
        elapsed < Duration::from_secs(8),
        "not concurrent: {elapsed:?}"
    );
    let got = bot.wait_received(N, Duration::from_secs(5));
    let mut got: Vec<(String, String)> = got
        .into_iter()
        .map(|r| {
            assert_eq!(r.error, None);
            (r.state, r.code)
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "each code exactly once");
    assert_eq!(outcome_lines(&server.stderr_text()).len(), N);
}

#[test]
fn listen_past_the_connection_cap_answers_overloaded() {
    let bot = Bot::start("json", "approve");
    let (mut server, _store) = start(Kind::ListenUnix, bot.addr(), &[("REGISTER_MAX_CONNS", "1")]);
    // Hold the only slot: a connection being served (GET_VALUES answered).
    let mut holder = server.connect();
    let _ = get_values(&mut holder, &[b"FCGI_MPXS_CONNS"]);
    let (code, state) = (new_code(), new_state());
    let mut conn = server.connect();
    let reply = fcgi_get(&mut conn, 1, &query(&code, &state), false);
    assert_eq!(reply.protocol_status, FCGI_OVERLOADED, "{reply:?}");
    assert_eq!(reply.http().status, 503);
    assert_eq!(bot.received(), NOTHING);
    // Once the slot is free, connections are served again.
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, state) = (new_code(), new_state());
        let reply = fcgi_get(&mut server.connect(), 1, &query(&code, &state), false);
        if reply.protocol_status == FCGI_REQUEST_COMPLETE {
            assert_answer_page(&completed(&reply), true, APPROVED);
            assert_eq!(bot.received(), [(state.as_str(), code.as_str())]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still overloaded after the slot was freed"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(server.try_wait().is_none());
}

// ---------------------------------------------------------------------------
// Start-up errors and stopping
// ---------------------------------------------------------------------------

#[test]
fn listen_with_a_bad_setting_exits_2_naming_it() {
    let dir = TempDir::new("badcfg");
    let template = dir.join("broken.html");
    std::fs::write(&template, "{% for x in %}").unwrap();
    let template = template.to_str().unwrap();
    for (var, value) in [
        ("REGISTER_BOT_TIMEOUT", "abc"),
        ("REGISTER_WIRE", "xml"),
        ("REGISTER_MAX_CONNS", "0"),
        ("REGISTER_TEMPLATE", template),
    ] {
        let sock = dir.join(&format!("{var}.sock"));
        let addr = format!("unix:{}", sock.display());
        let (out, timed_out) = run_bin(
            &["--listen", &addr],
            &[(var, value), ("REGISTER_STATE_DIR", "off")],
            Duration::from_secs(10),
        );
        assert!(!timed_out, "{var}={value}: still running");
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.lines().any(|l| l.contains(var)),
            "{var}={value}: stderr does not name it:\n{err}"
        );
        assert!(out.stdout.is_empty());
        assert!(!sock.exists(), "{var}={value}: bound {addr} anyway");
    }
}

#[test]
fn fd0_with_a_bad_setting_exits_2_naming_it() {
    let mut server = Fd0Server::start(&[
        ("REGISTER_BOT_TIMEOUT", "abc"),
        ("REGISTER_STATE_DIR", "off"),
    ]);
    let status = server
        .wait_within(Duration::from_secs(10))
        .expect("fd0 server with a bad setting kept running");
    assert_eq!(status.code(), Some(2), "{status:?}");
    assert!(
        server.stderr_text().contains("REGISTER_BOT_TIMEOUT"),
        "{}",
        server.stderr_text()
    );
}

#[test]
fn listen_at_an_address_in_use_fails_cleanly() {
    // TCP: somebody else holds the port.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (out, timed_out) = run_bin(
        &["--listen", &addr],
        &[("REGISTER_STATE_DIR", "off")],
        Duration::from_secs(10),
    );
    assert!(!timed_out);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "stderr should name the address: {err}");
    assert!(!err.contains("panicked"), "{err}");

    // Unix: another relay is serving on the socket; it keeps serving.
    let bot = Bot::start("json", "approve");
    let (mut first, _store) = start(Kind::ListenUnix, bot.addr(), &[]);
    let spec = first.addr();
    let (out, timed_out) = run_bin(
        &["--listen", &spec],
        &[("REGISTER_STATE_DIR", "off")],
        Duration::from_secs(10),
    );
    assert!(!timed_out);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&spec), "stderr should name the address: {err}");
    assert_still_serves(&mut first, &bot, "a second server tried the same socket");
}

#[test]
fn sigterm_stops_idle_servers_with_status_0() {
    let bot = Bot::start("json", "approve");
    for kind in ALL_KINDS {
        let (mut server, _store) = start(kind, bot.addr(), &[]);
        // Serve one request first so the server is surely up and running.
        let (code, state) = (new_code(), new_state());
        let reply = fcgi_get(&mut server.connect(), 1, &query(&code, &state), false);
        assert_answer_page(&completed(&reply), true, APPROVED);
        // Idle: nothing in flight to wait for.
        let status = server
            .stop_within(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{kind:?} ignored SIGTERM"));
        assert!(
            status.success(),
            "{kind:?}: {status:?}\n{}",
            server.stderr_text()
        );
    }
    assert_eq!(bot.received().len(), ALL_KINDS.len());
}

/// `--listen unix:PATH` replaces a stale socket, never anything else: a
/// mistyped path must not cost a file, now or when the relay stops.
#[test]
fn listen_on_a_path_that_is_not_a_socket_refuses_and_keeps_the_file() {
    let dir = TempDir::new("notsock");
    let file = dir.join("precious.txt");
    std::fs::write(&file, "precious").unwrap();
    let spec = format!("unix:{}", file.display());
    let (out, killed) = run_bin(
        &["--listen", &spec],
        &[("REGISTER_STATE_DIR", dir.join("st").to_str().unwrap())],
        RUN_TIMEOUT,
    );
    assert!(!killed, "still running with a file at its socket path");
    assert!(!out.status.success(), "started over a regular file");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

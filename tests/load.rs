//! Bounded load test on loopback: 2,000 requests with distinct
//! codes over 50 kept FastCGI connections (`FCGI_KEEP_CONN`, 40 requests
//! one after another on each, as mod_proxy_fcgi with connection reuse
//! sends them) through `--listen`, against a bot that takes 100 ms per
//! answer. Zero errors, every page a success page, every code received by
//! the bot exactly once; the whole run bounded in time.
//!
//! The Python peer (asyncio, one task per connection) sleeps concurrently,
//! so 50 exchanges in flight cost it 100 ms, not 5 s: the floor for the
//! run is 40 × 100 ms = 4 s.
//!
//! Then the same kind of load against a relay that is stopped and resumed
//! every few milliseconds, in both modes.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

const CONNS: usize = 50;
const PER_CONN: usize = 40;
const TOTAL: usize = CONNS * PER_CONN;
/// The whole run, bot and server start included.
const BOUND: Duration = Duration::from_secs(120);
const STATE_Q: &str = "gAAAAABnLoadState%3D";

fn code(tag: &str, conn: usize, i: usize) -> String {
    format!("{tag}-{conn:02}-{i:03}")
}

/// Why one request did not end in a success page, if it did not.
fn check(reply: Result<FcgiReply, String>) -> Result<(), String> {
    let reply = reply?;
    if reply.protocol_status != FCGI_REQUEST_COMPLETE || !reply.stdout_ended {
        return Err(format!(
            "protocol status {}, stdout ended {}",
            reply.protocol_status, reply.stdout_ended
        ));
    }
    let page = try_parse_cgi(&reply.stdout)?;
    success_or_why(page.status, &page.body)
}

/// One client: a kept connection, `per_conn` requests in turn, codes
/// `tag-CONN-I`. Returns each code with its outcome; a broken connection
/// fails the rest of its codes.
fn client(
    endpoint: Endpoint,
    conn_no: usize,
    per_conn: usize,
    tag: &str,
) -> Vec<(String, Result<(), String>)> {
    let mut results = Vec::with_capacity(per_conn);
    let mut conn = match endpoint.connect() {
        Ok(c) => Some(c),
        Err(e) => {
            let why = format!("connect: {e}");
            return (0..per_conn)
                .map(|i| (code(tag, conn_no, i), Err(why.clone())))
                .collect();
        }
    };
    for i in 0..per_conn {
        let code = code(tag, conn_no, i);
        let Some(stream) = conn.as_mut() else {
            results.push((code, Err("connection lost earlier".into())));
            continue;
        };
        let id = (i + 1) as u16;
        let params = get_params(&format!("code={code}&state={STATE_Q}"));
        let reply = send_request(stream, id, &as_pairs(&params), &[], true)
            .map_err(|e| format!("send: {e}"))
            .and_then(|()| try_read_reply(stream, id));
        if reply.is_err() {
            conn = None;
        }
        results.push((code, check(reply)));
    }
    results
}

#[test]
fn two_thousand_distinct_codes_over_fifty_connections_reach_the_bot_once_each() {
    let started = Instant::now();
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "0.1"]);
    let mut server = ListenServer::start_tcp(&[
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
        ("REGISTER_MAX_CONNS", "64"),
    ]);

    let load_started = Instant::now();
    let outcomes = run_clients(&server, CONNS, PER_CONN, "load", started + BOUND);
    let load_took = load_started.elapsed();
    assert_eq!(outcomes.len(), TOTAL);
    assert_each_code_reached_the_bot_once(outcomes, &bot);
    assert_stops_without_complaint(&mut server);
    eprintln!(
        "load: {TOTAL} requests over {CONNS} connections in {load_took:?} \
         ({:.0} req/s); whole test {:?}",
        TOTAL as f64 / load_took.as_secs_f64(),
        started.elapsed()
    );
    assert!(started.elapsed() < BOUND, "took {:?}", started.elapsed());
}

/// `conns` clients at once, each with `per_conn` requests on a kept
/// connection (codes `tag-CONN-I`): every code with its outcome. Past
/// `deadline` the test fails, showing the end of the relay's log.
fn run_clients(
    server: &Server,
    conns: usize,
    per_conn: usize,
    tag: &'static str,
    deadline: Instant,
) -> Vec<(String, Result<(), String>)> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    for conn_no in 0..conns {
        let (tx, endpoint) = (tx.clone(), server.endpoint().clone());
        thread::Builder::new()
            .name(format!("client-{conn_no}"))
            .spawn(move || {
                let _ = tx.send(client(endpoint, conn_no, per_conn, tag));
            })
            .expect("spawning a client thread");
    }
    drop(tx);
    let mut outcomes = Vec::with_capacity(conns * per_conn);
    for done in 0..conns {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(results) => outcomes.extend(results),
            Err(e) => panic!(
                "{done} of {conns} clients done after {:?} ({e}); relay stderr tail:\n{}",
                started.elapsed(),
                tail(&server.stderr_text(), 20)
            ),
        }
    }
    outcomes
}

/// Every request saw its success page (the failures, grouped, if not), and
/// every code sent reached the bot exactly once, and nothing else did.
fn assert_each_code_reached_the_bot_once(outcomes: Vec<(String, Result<(), String>)>, bot: &Bot) {
    if let Some((failed, why)) = failures(&outcomes) {
        panic!("{failed} of {} requests failed: {why}", outcomes.len());
    }
    let sent: Vec<String> = outcomes.into_iter().map(|(c, _)| c).collect();
    bot.assert_received_each_once(&sent, "gAAAAABnLoadState=");
}

/// The relay stops with status 0 and has logged no warning or error.
fn assert_stops_without_complaint(server: &mut Server) {
    let status = server.stop();
    assert!(status.success(), "exit status {status}");
    let log = server.stderr_text();
    let complaints = complaints(&log);
    assert!(
        complaints.is_empty(),
        "the relay complained:\n{complaints:#?}"
    );
}

/// Stops and resumes a process again and again (SIGSTOP, 5 ms, SIGCONT,
/// 20 ms) until [`Freezer::finish`], as a machine that freezes its
/// processes for a moment now and then does, only far more often.
struct Freezer {
    pid: u32,
    looping: Child,
}

impl Freezer {
    fn start(pid: u32) -> Freezer {
        let looping = Command::new("sh")
            .args([
                "-c",
                "while kill -s STOP \"$1\" && sleep 0.005 && kill -s CONT \"$1\"; do
                   echo stopped; sleep 0.02
                 done",
                "freezer",
                &pid.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the stop-and-resume loop");
        Freezer { pid, looping }
    }

    /// Ends the loop, resumes the process, and says how many times it was
    /// stopped and resumed.
    fn finish(mut self) -> usize {
        self.end();
        let mut out = String::new();
        if let Some(mut stdout) = self.looping.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        out.lines().count()
    }

    fn end(&mut self) {
        let _ = self.looping.kill();
        let _ = self.looping.wait();
        send_signal(self.pid, "CONT");
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.end();
    }
}

/// `conns` clients of `per_conn` requests each against `server` while it
/// is stopped and resumed again and again: every request gets its success
/// page, every code reaches the bot once, the relay complains of nothing.
fn serve_while_frozen_again_and_again(
    server: &mut Server,
    bot: &Bot,
    conns: usize,
    per_conn: usize,
) {
    let freezer = Freezer::start(server.pid());
    let started = Instant::now();
    let outcomes = run_clients(server, conns, per_conn, "frozen", started + BOUND);
    let stops = freezer.finish();
    // The load ran across many stops, not beside them.
    assert!(
        stops >= 20,
        "the relay was stopped only {stops} times in {:?}",
        started.elapsed()
    );
    let requests = outcomes.len();
    assert_each_code_reached_the_bot_once(outcomes, bot);
    assert_stops_without_complaint(server);
    eprintln!(
        "{requests} requests over {conns} connections while the relay was stopped {stops} times, in {:?}",
        started.elapsed()
    );
}

#[test]
fn a_listen_relay_stopped_and_resumed_again_and_again_loses_nothing() {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "0.05"]);
    let mut server = ListenServer::start_tcp(&[
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
    ]);
    serve_while_frozen_again_and_again(&mut server, &bot, 20, 30);
}

#[test]
fn an_fd0_relay_stopped_and_resumed_again_and_again_loses_nothing() {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "0.01"]);
    let mut server = Fd0Server::start(&[
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", store.path_str()),
    ]);
    serve_while_frozen_again_and_again(&mut server, &bot, 4, 40);
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

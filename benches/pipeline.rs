//! The in-process path of one request, without sockets: parse the
//! callback, encode the message for the bot, decode its reply, render the
//! page; the replay store's first delivery and repeat; one exchange with
//! a bot over loopback TCP. Run with
//! `cargo bench --bench pipeline`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tourney_register::bot::{self, BotReply};
use tourney_register::config::{BotAddr, Config, Wire};
use tourney_register::http::Request;
use tourney_register::outcome::Outcome;
use tourney_register::page::Page;
use tourney_register::redirect;
use tourney_register::relay::Relay;
use tourney_register::replay::Delivery;
use tourney_register::replay::Store;

/// A code and state of the sizes osu! and the bot really produce.
fn request() -> Request {
    let code = "def50200".repeat(128);
    let state = "gAAAAABnR2VhdGVzdF9zdGF0ZV9mb3JfYmVuY2htYXJraW5nX3B1cnBvc2VzX29ubHk%3D";
    Request {
        method: b"GET".to_vec(),
        path_info: Vec::new(),
        query: format!("code={code}&state={state}").into_bytes(),
    }
}

fn pipeline(c: &mut Criterion) {
    let req = request();
    let page = Page::built_in();
    let reply = BotReply {
        success: true,
        message: "You're registered, welcome to the tournament!".into(),
    };
    let json_reply = serde_json::to_vec(&reply).unwrap_or_default();
    let pickle_reply =
        serde_pickle::to_vec(&reply, serde_pickle::SerOptions::new()).unwrap_or_default();

    c.bench_function("parse callback", |b| {
        b.iter(|| redirect::parse(black_box(&req)))
    });
    let answered = Outcome::Answered {
        reply: reply.clone(),
        delivery: Delivery::First,
    };
    c.bench_function("render success page", |b| {
        b.iter(|| page.respond(black_box(&answered)).to_cgi_bytes(false))
    });
    for (wire, name, bytes) in [
        (Wire::Json, "json", &json_reply),
        (Wire::Pickle, "pickle", &pickle_reply),
    ] {
        c.bench_function(&format!("encode message ({name})"), |b| {
            b.iter(|| bot::encode(wire, black_box("state="), black_box("code")))
        });
        c.bench_function(&format!("decode reply ({name})"), |b| {
            b.iter(|| bot::decode(wire, black_box(bytes)))
        });
        let mut config = Config::from_lookup(|_| None).unwrap_or_else(|e| panic!("{e}"));
        config.wire = wire;
        config.state_dir = None;
        let relay = Relay::new(config).unwrap_or_else(|e| panic!("{e}"));
        c.bench_function(&format!("whole request, bot in process ({name})"), |b| {
            b.iter(|| {
                relay
                    .handle_with(black_box(&req), |state, code| {
                        let _message = bot::encode(wire, state, code);
                        bot::decode(wire, bytes)
                    })
                    .to_cgi_bytes(false)
            })
        });
    }
}

/// One request through the FastCGI layer in memory: records parsed by
/// the connection state machine, a fixed answer encoded back, by the
/// blocking driver over an in-memory stream.
fn fastcgi_connection(c: &mut Criterion) {
    use tourney_register::fastcgi::{
        Duplex, RecordType, Role, begin_request_body, encode_pair, encode_record, encode_stream,
        serve_connection,
    };
    use tourney_register::http::Response;
    use tourney_register::limits::Limits;

    let req = request();
    let mut params = Vec::new();
    for (name, value) in [
        (&b"REQUEST_METHOD"[..], &b"GET"[..]),
        (b"QUERY_STRING", &req.query),
        (
            b"HTTP_USER_AGENT",
            b"Mozilla/5.0 (Linux; Android 14) Discord",
        ),
    ] {
        encode_pair(name, value, &mut params);
    }
    let mut input = Vec::new();
    let begin = begin_request_body(Role::Responder.into(), false);
    encode_record(RecordType::BeginRequest, 1, &begin, &mut input);
    encode_stream(RecordType::Params, 1, &params, &mut input);
    encode_record(RecordType::Stdin, 1, &[], &mut input);
    let answer = Response {
        status: 200,
        headers: vec![("Content-Type", "text/html; charset=utf-8".into())],
        body: vec![b'x'; 4000],
    };
    let handler = |_: &Request| answer.clone();
    let limits = Limits::default();
    c.bench_function("fastcgi request in memory", |b| {
        b.iter(|| {
            let mut stream = Duplex::new(black_box(input.clone()));
            let _ = serve_connection(&mut stream, &handler, &limits);
            stream.output
        })
    });
}

/// The replay store's first delivery of a code (lock, look up, save the
/// answer), with the bot answering in process. The directory is under
/// target/, on the same file system as a real store would be, since the
/// cost is mostly the file system's: `REGISTER_STATE_DIR` (or
/// `BENCH_STATE_DIR`) picks another.
fn store(c: &mut Criterion) {
    let dir = std::env::var_os("BENCH_STATE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/store-bench")
        });
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(parent) = dir.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let store =
        Store::open(&dir, Duration::from_secs(600), 100_000).unwrap_or_else(|e| panic!("{e}"));
    let reply = BotReply {
        success: true,
        message: "You're registered, welcome to the tournament!".into(),
    };
    let code = "def50200".repeat(128);
    let mut group = c.benchmark_group("replay store");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    let mut n = 0u64;
    group.bench_function("first delivery", |b| {
        b.iter(|| {
            n += 1;
            store.deliver_once(&format!("{code}{n}"), Duration::from_secs(1), || {
                Ok(reply.clone())
            })
        })
    });
    group.bench_function("repeat (replayed)", |b| {
        b.iter(|| {
            store.deliver_once(&format!("{code}1"), Duration::from_secs(1), || {
                Ok(reply.clone())
            })
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// One exchange with a bot over loopback TCP (connect, send, half-close,
/// read the reply to EOF), the peer a thread answering at once. Wall time
/// of both ends, so mostly the kernel's: the relay's own share is about
/// half.
fn exchange(c: &mut Criterion) {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let reply = br#"{"success":true,"message":"You're registered, welcome to the tournament!"}"#;
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            buf.clear();
            if conn.read_to_end(&mut buf).is_ok() {
                let _ = conn.write_all(reply);
            }
        }
    });
    let mut config = Config::from_lookup(|_| None).unwrap_or_else(|e| panic!("{e}"));
    config.bot_addr = BotAddr::Tcp(vec![addr]);
    let code = "def50200".repeat(128);
    let mut group = c.benchmark_group("bot");
    group.sample_size(30);
    group.bench_function("exchange over loopback TCP", |b| {
        b.iter(|| bot::exchange(&config, "state=", black_box(&code)))
    });
    // The same, timed by the CPU the calling thread uses (user and kernel,
    // the loopback's packet work included), which the peer thread and
    // other load on the machine hardly change: what one exchange costs
    // the relay.
    group.bench_function("exchange over loopback TCP, relay thread CPU", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu();
            for _ in 0..iters {
                let _ = black_box(bot::exchange(&config, "state=", black_box(&code)));
            }
            thread_cpu().saturating_sub(start)
        })
    });
    group.finish();
}

/// CPU time used so far by the calling thread.
fn thread_cpu() -> Duration {
    tourney_register::sys::thread_cpu_time()
}

criterion_group!(benches, pipeline, fastcgi_connection, store, exchange);
criterion_main!(benches);

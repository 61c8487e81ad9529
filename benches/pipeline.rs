//! The in-process path of one request, without sockets: parse the
//! callback, encode the message for the bot, decode its reply, render the
//! page. Run with `cargo bench --bench pipeline`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tourney_register::bot::{self, BotReply};
use tourney_register::callback;
use tourney_register::config::{Config, Wire};
use tourney_register::http::Request;
use tourney_register::page::{Outcome, Page};
use tourney_register::relay::Relay;

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
        b.iter(|| callback::parse(black_box(&req)))
    });
    c.bench_function("render success page", |b| {
        b.iter(|| {
            page.respond(black_box(&Outcome::Answered(&reply)))
                .to_cgi_bytes(false)
        })
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

criterion_group!(benches, pipeline);
criterion_main!(benches);

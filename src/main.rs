//! The `tourney-register` executable: picks CGI, FastCGI on fd 0 or a
//! FastCGI server from how it was started, and hands each request to the
//! relay.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use tourney_register::cgi;
use tourney_register::config::Config;
use tourney_register::fastcgi::Limits;
use tourney_register::page::{Outcome, Page};
use tourney_register::relay::Relay;
use tourney_register::server::{self, Listener};

const USAGE: &str = "\
tourney-register: finishes an osu! OAuth sign-up and hands the code to the tournament bot.

Usage:
  tourney-register                    CGI, or FastCGI when fd 0 is a listening socket (mod_fcgid)
  tourney-register --listen ADDR      FastCGI server on HOST:PORT or unix:/path (mod_proxy_fcgi, nginx)
  tourney-register --help | --version

By hand:
  QUERY_STRING='code=abc&state=xyz' REQUEST_METHOD=GET tourney-register

Settings (environment):
  REGISTER_BOT_ADDR      host:port or unix:/path of the bot       [127.0.0.1:7865]
  REGISTER_BOT_TIMEOUT   seconds for the whole exchange with it   [10]
  REGISTER_BOT_RETRY     seconds a refused connection is retried  [2]
  REGISTER_WIRE          json, or pickle for the old cog          [json]
  REGISTER_TEMPLATE      Jinja2 template for the page             [built in]
  REGISTER_REPLAY_TTL    seconds a code's answer is replayed      [600]
  REGISTER_STATE_DIR     replay store directory, or off           [$TMPDIR/tourney-register-UID]
  REGISTER_MAX_CONNS     --listen connection cap                  [256]
  REGISTER_FCGI_TIMEOUT  seconds a web server may stall a record  [30]
  RUST_LOG               log filter (stderr)                      [info]
";

enum Mode {
    Auto,
    Listen(String),
}

fn main() -> ExitCode {
    let mode = match parse_args(std::env::args().skip(1)) {
        Ok(Some(mode)) => mode,
        Ok(None) => return ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("tourney-register: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    match mode {
        Mode::Listen(addr) => {
            let Some(relay) = start() else {
                return ExitCode::from(2);
            };
            let listener = match Listener::bind(&addr) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("cannot listen on {addr}: {e}");
                    return ExitCode::from(2);
                }
            };
            let (limits, io_timeout, grace) = serving(&relay);
            // glibc gives each new thread its own malloc arena (up to 8 per
            // core), each holding on to freed memory: with a few hundred
            // connection threads that is most of the process's memory. The
            // pipeline allocates little, so two shared arenas cost no speed.
            // SAFETY: mallopt only tunes the allocator; no thread runs yet.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
            finish(server::serve_pool(
                Arc::new(relay),
                listener,
                Arc::new(limits),
                io_timeout,
                grace,
            ))
        }
        Mode::Auto => match Listener::from_stdin() {
            Some(listener) => {
                let Some(relay) = start() else {
                    return ExitCode::from(2);
                };
                let (limits, io_timeout, _) = serving(&relay);
                finish(server::serve_serial(&relay, listener, &limits, io_timeout))
            }
            None => run_cgi(),
        },
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Mode>, String> {
    let mut mode = Mode::Auto;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("tourney-register {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--listen" => match args.next() {
                Some(addr) if !addr.is_empty() => mode = Mode::Listen(addr),
                _ => return Err("--listen needs HOST:PORT or unix:/path".into()),
            },
            other => match other.strip_prefix("--listen=") {
                Some(addr) if !addr.is_empty() => mode = Mode::Listen(addr.to_string()),
                _ => return Err(format!("unknown argument {other:?}")),
            },
        }
    }
    Ok(Some(mode))
}

fn init_logging() {
    let pid = std::process::id();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "[{} {} tourney-register:{pid}] {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        })
        .target(env_logger::Target::Stderr)
        .init();
}

/// Reads and checks the settings once, for the FastCGI modes: a bad one
/// stops the start with a message naming it.
fn start() -> Option<Relay> {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return None;
        }
    };
    match Relay::new(config) {
        Ok(relay) => Some(relay),
        Err(e) => {
            log::error!("{e}");
            None
        }
    }
}

fn serving(relay: &Relay) -> (Limits, std::time::Duration, std::time::Duration) {
    let c = relay.config();
    let limits = Limits {
        max_conns: c.max_conns,
        ..Limits::default()
    };
    // A stop waits for the slowest request in flight: a full retry window
    // and a full exchange, plus a margin for writing the answer.
    let grace = c.bot_retry + c.bot_timeout + std::time::Duration::from_secs(1);
    (limits, c.fcgi_timeout, grace)
}

fn finish(result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run_cgi() -> ExitCode {
    let started = std::time::Instant::now();
    let req = cgi::request_from_env();
    let relay = Config::from_env()
        .map_err(|e| e.to_string())
        .and_then(|c| Relay::new(c).map_err(|e| e.to_string()));
    let response = match relay {
        Ok(relay) => relay.handle(&req),
        Err(e) => {
            log::error!("{e}");
            let response = Page::built_in().respond(&Outcome::Misconfigured);
            log::info!(
                "outcome=misconfigured status={} ms={} code=-",
                response.status,
                started.elapsed().as_millis()
            );
            response
        }
    };
    if let Err(e) = cgi::write_response(&req, &response) {
        log::error!("cannot write the response: {e}");
    }
    ExitCode::SUCCESS
}

//! The `tourney-register` executable: picks CGI, FastCGI on an inherited
//! socket or a FastCGI server from how it was started, and hands each
//! request to the relay.

#![deny(unsafe_code)]
// The process starts at the C `main` below, not through std's runtime (see
// there); a test build keeps the test harness's entry point.
#![cfg_attr(not(test), no_main)]

use std::fmt;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use tourney_register::config::Config;
use tourney_register::limits::Limits;
use tourney_register::net::Listener;
use tourney_register::outcome::Outcome;
use tourney_register::page::Page;
use tourney_register::relay::{self, Relay};
use tourney_register::server::{self, Status};
use tourney_register::systemd::{self, PassedSocket};
use tourney_register::{cgi, sys};

const USAGE: &str = "\
tourney-register: finishes an osu! OAuth sign-up and hands the code to the tournament bot.

Usage:
  tourney-register                    CGI, or FastCGI when fd 0 is a listening socket (mod_fcgid),
                                      or a FastCGI server on the socket systemd passes (LISTEN_FDS)
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
  REGISTER_REPLAY_MAX    codes the replay store keeps at most     [100000]
  REGISTER_MAX_CONNS     --listen connection cap                  [4096, or the files limit's]
  REGISTER_FCGI_TIMEOUT  seconds per request or idle connection   [30]
  RUST_LOG               log filter (stderr)                      [info]
";

/// The process's entry point, called by the C library's start-up code.
///
/// Std's own start (`fn main`) sets up a handler that reports a main
/// thread's stack overflow, and finds the stack's bounds for it by reading
/// all of `/proc/self/maps`: 20 system calls (18 at start, 2 at exit) that
/// each CGI request, a process of its own, would pay for.
/// A stack overflow here ends the process by SIGSEGV instead of a message.
/// What the program needs from std's start is done by
/// [`sys::prepare_process`]; `std::env::args` works without it (glibc
/// hands the arguments to std before `main`).
#[allow(unsafe_code)] // `no_mangle` names the symbol the C library calls
#[cfg_attr(not(test), unsafe(no_mangle))]
#[cfg_attr(test, allow(dead_code))]
extern "C" fn main() -> std::ffi::c_int {
    sys::prepare_process();
    let code = match run(std::env::args().skip(1)) {
        Ok(()) => 0,
        Err(failure) => {
            match &failure {
                Failure::Usage(_) => eprintln!("tourney-register: {failure}\n\n{USAGE}"),
                _ => log::error!("{failure}"),
            }
            failure.exit_code()
        }
    };
    // Std's start would flush stdout at exit; the C library's exit does not
    // know Rust's buffer.
    let _ = std::io::stdout().flush();
    code.into()
}

/// Why the program stops short.
enum Failure {
    /// A command line that cannot be used.
    Usage(String),
    /// A setting, the template or the replay store's directory that
    /// cannot be used (FastCGI modes).
    Start(String),
    /// The service manager passed a socket that cannot be served.
    Activation(String),
    /// The `--listen` address cannot be bound.
    Listen { addr: String, error: std::io::Error },
    /// Serving failed (signals could not be set up, the listener broke).
    Serve(std::io::Error),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_)
            | Failure::Start(_)
            | Failure::Activation(_)
            | Failure::Listen { .. } => 2,
            Failure::Serve(_) => 1,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(msg) | Failure::Start(msg) | Failure::Activation(msg) => {
                f.write_str(msg)
            }
            Failure::Listen { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
            Failure::Serve(error) => write!(f, "{error}"),
        }
    }
}

/// What the command line asked for.
enum Mode {
    /// CGI, or FastCGI when fd 0 is a listening socket.
    Auto,
    /// `--listen ADDR`.
    Listen(String),
}

/// Where requests come from, once the mode is known.
enum Transport {
    /// One request from the environment.
    Cgi,
    /// FastCGI connections.
    FastCgi(Socket),
}

/// Where FastCGI connections come from.
enum Socket {
    /// A listening socket handed over as fd 0 (mod_fcgid, spawn-fcgi):
    /// one connection at a time.
    Inherited(Listener),
    /// An address to bind (`--listen`): many connections at once.
    Listen(String),
    /// The socket a service manager passed as fd 3 (socket activation):
    /// served exactly as `--listen`.
    Activated(PassedSocket),
}

/// The whole program; every way it stops short is a [`Failure`].
fn run(args: impl Iterator<Item = String>) -> Result<(), Failure> {
    let Some(mode) = parse_args(args).map_err(Failure::Usage)? else {
        return Ok(());
    };
    init_logging();
    // First, before anything opens a file that could take fd 3.
    let passed = systemd::take_listen_socket().map_err(Failure::Activation)?;
    let transport = match (mode, passed) {
        (Mode::Listen(_), Some(_)) => {
            return Err(Failure::Activation(
                "--listen given, but the service manager passed a socket too: use one".into(),
            ));
        }
        (Mode::Auto, Some(passed)) => Transport::FastCgi(Socket::Activated(passed)),
        (Mode::Listen(addr), None) => Transport::FastCgi(Socket::Listen(addr)),
        (Mode::Auto, None) => match Listener::from_stdin() {
            Some(listener) => Transport::FastCgi(Socket::Inherited(listener)),
            None => Transport::Cgi,
        },
    };
    let started = Instant::now();
    let relay = Config::from_env()
        .map_err(|e| e.to_string())
        .and_then(|c| Relay::new(c).map_err(|e| e.to_string()));
    let socket = match transport {
        Transport::Cgi => {
            run_cgi(relay, started);
            return Ok(());
        }
        Transport::FastCgi(socket) => socket,
    };
    // A bad setting stops the start, before anything is bound.
    let relay = relay.map_err(Failure::Start)?;
    let limits = Limits::from_config(relay.config());
    let status = Arc::new(Status::default());
    match socket {
        Socket::Inherited(listener) => {
            relay.start_housekeeping();
            server::serve_serial(&relay, listener, &limits, status)
        }
        Socket::Listen(addr) => {
            let listener =
                Listener::bind(&addr).map_err(|error| Failure::Listen { addr, error })?;
            tourney_register::event::deepen_backlog(&listener);
            serve_concurrently(relay, listener, &limits, status)
        }
        Socket::Activated(PassedSocket { listener, name }) => {
            log::info!(
                "socket {name:?} on fd {} from the service manager",
                systemd::LISTEN_FDS_START
            );
            serve_concurrently(relay, listener, &limits, status)
        }
    }
    .map_err(Failure::Serve)
}

fn serve_concurrently(
    relay: Relay,
    listener: Listener,
    limits: &Limits,
    status: Arc<Status>,
) -> std::io::Result<()> {
    relay.start_housekeeping();
    let limits = tourney_register::event::fit_descriptor_limit(*limits);
    tourney_register::event::serve(&relay, listener, &limits, status)
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

/// CGI: one answer on stdout, and exit status 0 whatever it is; a
/// configuration error is a 500 page.
fn run_cgi(relay: Result<Relay, String>, started: Instant) {
    let req = cgi::request_from_env();
    let response = match &relay {
        Ok(relay) => relay.handle(&req),
        Err(e) => {
            log::error!("{e}");
            relay::answer(&Page::built_in(), &Outcome::Misconfigured, started, None)
        }
    };
    if let Err(e) = cgi::write_response(&req, &response) {
        log::error!("cannot write the response: {e}");
    }
    // The web server has the whole answer once the standard streams are
    // let go; the housekeeping step after it delays no one. A step can
    // only be logged where nobody reads: the long-running modes log theirs.
    if let Ok(relay) = &relay {
        if let Err(e) = sys::release_standard_streams() {
            log::warn!("cannot let go of the standard streams, no housekeeping: {e}");
            return;
        }
        relay.housekeep();
    }
}

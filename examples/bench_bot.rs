//! A fast stand-in for the tournament bot, for `scripts/bench`.
//!
//! The Python test peer would be the bottleneck of a benchmark, so this one
//! is Rust, std plus serde_json: a fixed pool of threads that all block in
//! `accept()` on one loopback listener (no thread is spawned per
//! connection), each reading the relay's `{"state": S, "code": C}` to EOF,
//! optionally sleeping `--delay-ms` (the bot's osu! calls), replying
//! `{"success": true, "message": "..."}` and closing.
//!
//! Every code received is counted. On SIGTERM or SIGINT (or, with
//! `--until-stdin-eof`, when stdin closes) it prints one JSON line and
//! exits 0:
//!
//! ```text
//! {"received":N,"distinct":D,"duplicates":N-D,"duplicate_codes":K,"malformed":M,"connections":C}
//! ```
//!
//! `duplicates` counts deliveries beyond the first of a code; a relay that
//! delivers every code exactly once gives 0.
//!
//! ```sh
//! cargo run --release --example bench_bot -- --addr 127.0.0.1:7865 --delay-ms 300
//! ```

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use serde::Deserialize;

/// The relay's message is a few hundred bytes; anything past this is not one.
const MAX_MESSAGE: usize = 64 * 1024;
/// A relay that stalls mid-message frees its thread after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const USAGE: &str = "\
bench_bot: a fast JSON-wire bot for benchmarks (loopback only).

Usage: bench_bot [--addr 127.0.0.1:PORT | --unix PATH] [--delay-ms N] [--threads N]
                 [--message TEXT] [--summary PATH] [--until-stdin-eof]

  --addr             where to listen; port 0 picks one           [127.0.0.1:7865]
  --unix             listen on this Unix socket instead (REGISTER_BOT_ADDR=unix:PATH)
  --delay-ms         milliseconds to wait before each reply       [0]
  --threads          connections served at once                   [64, or 512 with a delay]
  --message          the reply's message                          [a welcome text]
  --summary          also write the summary JSON to this file
  --until-stdin-eof  stop when stdin closes, as well as on SIGTERM/SIGINT

Prints `listening on ADDR` on stderr when ready, and the summary JSON on
stdout when stopped.
";

struct Args {
    addr: SocketAddr,
    unix: Option<PathBuf>,
    delay: Duration,
    threads: Option<usize>,
    message: String,
    summary: Option<PathBuf>,
    until_stdin_eof: bool,
}

#[derive(Deserialize)]
struct Message {
    code: String,
    #[allow(dead_code)]
    state: String,
}

#[derive(Default)]
struct Stats {
    codes: Mutex<HashMap<String, u32>>,
    malformed: AtomicU64,
    connections: AtomicU64,
}

impl Stats {
    fn summary(&self) -> String {
        let codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        let received: u64 = codes.values().map(|&n| u64::from(n)).sum();
        let distinct = codes.len() as u64;
        let duplicate_codes = codes.values().filter(|&&n| n > 1).count();
        serde_json::json!({
            "received": received,
            "distinct": distinct,
            "duplicates": received - distinct,
            "duplicate_codes": duplicate_codes,
            "malformed": self.malformed.load(Ordering::SeqCst),
            "connections": self.connections.load(Ordering::SeqCst),
        })
        .to_string()
    }
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(msg) => {
            eprintln!("bench_bot: {msg}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let bound = match &args.unix {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map(Listener::Unix)
        }
        None => TcpListener::bind(args.addr).map(Listener::Tcp),
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_bot: cannot listen: {e}");
            std::process::exit(2);
        }
    };
    // A burst of relays connecting at once must not overflow std's
    // default backlog; listen() again on a listening socket resizes it.
    let _ = match &listener {
        Listener::Tcp(l) => tourney_register::sys::relisten(l, 4096),
        Listener::Unix(l) => tourney_register::sys::relisten(l, 4096),
    };
    let local = match (&listener, &args.unix) {
        (Listener::Tcp(l), _) => l.local_addr().unwrap_or(args.addr).to_string(),
        (Listener::Unix(_), Some(path)) => format!("unix:{}", path.display()),
        (Listener::Unix(_), None) => "unix".into(),
    };

    let stats = Arc::new(Stats::default());
    let listener = Arc::new(listener);
    let reply = serde_json::json!({"success": true, "message": args.message})
        .to_string()
        .into_bytes();
    let reply: Arc<[u8]> = reply.into();
    let threads = args
        .threads
        .unwrap_or(if args.delay.is_zero() { 64 } else { 512 });
    for _ in 0..threads {
        let (listener, stats, reply) = (listener.clone(), stats.clone(), reply.clone());
        let delay = args.delay;
        let spawned = thread::Builder::new()
            .name("conn".into())
            .stack_size(64 * 1024)
            .spawn(move || serve(&listener, &stats, &reply, delay));
        if let Err(e) = spawned {
            eprintln!("bench_bot: cannot start a thread: {e}");
            std::process::exit(2);
        }
    }

    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench_bot: cannot handle signals: {e}");
            std::process::exit(2);
        }
    };
    let tx = stop_tx.clone();
    thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = tx.send(());
        }
    });
    if args.until_stdin_eof {
        let tx = stop_tx.clone();
        thread::spawn(move || {
            let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
            let _ = tx.send(());
        });
    }
    eprintln!(
        "bench_bot: listening on {local} (delay {} ms, {threads} threads)",
        args.delay.as_millis()
    );

    let _ = stop_rx.recv();
    let summary = stats.summary();
    if let Some(path) = &args.summary
        && let Err(e) = std::fs::write(path, format!("{summary}\n"))
    {
        eprintln!("bench_bot: cannot write {}: {e}", path.display());
    }
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{summary}");
    let _ = out.flush();
    // The pool threads are blocked in accept(); leave without joining them.
    std::process::exit(0);
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
        }
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn serve(listener: &Listener, stats: &Stats, reply: &[u8], delay: Duration) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bench_bot: accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        buf.clear();
        if let Err(e) = answer(stream, stats, reply, delay, &mut buf) {
            eprintln!("bench_bot: connection failed: {e}");
        }
    }
}

fn answer(
    mut stream: Conn,
    stats: &Stats,
    reply: &[u8],
    delay: Duration,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    stream.set_timeouts(IO_TIMEOUT)?;
    // The relay half-closes after its message: read to EOF, bounded.
    (&mut stream)
        .take(MAX_MESSAGE as u64 + 1)
        .read_to_end(buf)?;
    match serde_json::from_slice::<Message>(buf) {
        Ok(msg) if buf.len() <= MAX_MESSAGE => {
            let mut codes = stats.codes.lock().unwrap_or_else(|p| p.into_inner());
            *codes.entry(msg.code).or_insert(0) += 1;
        }
        _ => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
    }
    if !delay.is_zero() {
        thread::sleep(delay);
    }
    stream.write_all(reply)?;
    stream.shutdown_write();
    Ok(())
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 7865)),
        unix: None,
        delay: Duration::ZERO,
        threads: None,
        message: "You're registered, welcome to the tournament!".into(),
        summary: None,
        until_stdin_eof: false,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "--addr" => {
                let v = value("--addr")?;
                parsed.addr = v
                    .parse()
                    .map_err(|_| format!("--addr {v:?}: use IP:PORT"))?;
                if !parsed.addr.ip().is_loopback() {
                    return Err(format!("--addr {v:?}: loopback addresses only"));
                }
            }
            "--unix" => parsed.unix = Some(PathBuf::from(value("--unix")?)),
            "--delay-ms" => {
                let v = value("--delay-ms")?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("--delay-ms {v:?}: a whole number"))?;
                parsed.delay = Duration::from_millis(ms);
            }
            "--threads" => {
                let v = value("--threads")?;
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|&n| (1..=4096).contains(&n))
                    .ok_or_else(|| format!("--threads {v:?}: 1 to 4096"))?;
                parsed.threads = Some(n);
            }
            "--message" => parsed.message = value("--message")?,
            "--summary" => parsed.summary = Some(PathBuf::from(value("--summary")?)),
            "--until-stdin-eof" => parsed.until_stdin_eof = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(parsed))
}

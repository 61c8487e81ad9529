//! The program under a service manager: socket activation through Debian's
//! own `systemd-socket-activate` (no systemd as PID 1 needed), readiness
//! and stop datagrams on a socket of the test's own, a restart under load
//! with the socket held the way systemd holds it, and the operator's tools
//! `cgi-fcgi` (libfcgi-bin) and `spawn-fcgi`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// Bound on anything a test waits for here (a start, a datagram, a stop).
const WAIT: Duration = Duration::from_secs(30);
/// The soft limit on open files systemd starts a service with.
const SERVICE_SOFT_FILES: u64 = 1024;

/// A child process (the relay, possibly through a launcher), killed on drop;
/// its stderr goes to a file in `dir`.
struct Proc {
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, dir: &Path, tag: &str) -> Proc {
        let stderr = dir.join(format!("{tag}.stderr"));
        cmd.stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Proc { child, stderr }
    }

    fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        assert!(
            wait_until(WAIT, || self.stderr_text().contains(needle)),
            "no {needle:?} in the log within {WAIT:?}:\n{}",
            self.stderr_text()
        );
    }

    /// SIGTERM and a bounded wait for the exit.
    fn stop(&mut self) -> ExitStatus {
        send_signal(self.child.id(), "TERM");
        wait_bounded(&mut self.child, WAIT).unwrap_or_else(|| {
            panic!(
                "no exit within {WAIT:?} of SIGTERM:\n{}",
                self.stderr_text()
            )
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("[systemd test] stderr:\n{}", self.stderr_text());
        }
    }
}

fn require_tool(name: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} not found: install {package} (scripts/install-deps test does)"
    );
}

/// `systemd-socket-activate -l ADDR` starting the binary with `env`, as a
/// `.socket` unit would (the launcher binds, then execs the relay with the
/// socket as fd 3 and LISTEN_FDS/LISTEN_PID naming it).
fn socket_activate(listen: &str, env: &[(&str, &str)], dir: &Path) -> Proc {
    require_tool("systemd-socket-activate", "systemd");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(listen).arg("--fdname=fcgi");
    for (k, v) in env {
        cmd.arg(format!("--setenv={k}={v}"));
    }
    cmd.arg(bin()).stdin(Stdio::null());
    // As systemd starts a service: whatever this test process's own limit.
    with_soft_files_limit(&mut cmd, SERVICE_SOFT_FILES);
    let proc = Proc::spawn(&mut cmd, dir, "relay");
    // Bound; like systemd, the launcher starts the relay on the first
    // connection.
    proc.wait_log("Listening on");
    proc
}

fn relay_env<'a>(bot: &'a Bot, state: &'a TempDir) -> Vec<(&'a str, &'a str)> {
    vec![
        ("REGISTER_BOT_ADDR", bot.addr()),
        ("REGISTER_STATE_DIR", state.path_str()),
        ("RUST_LOG", "info"),
    ]
}

fn approved_once(endpoint: &Endpoint, bot: &Bot, already: usize) {
    let code = unique("code", 24);
    let state = unique("state", 40);
    let mut conn = endpoint
        .connect()
        .expect("connecting to the activated socket");
    let reply = fcgi_get(&mut conn, 1, &format!("code={code}&state={state}"), false);
    assert_answer_page(&reply.http(), true, APPROVED);
    let got = bot.wait_received(already + 1, WAIT);
    assert_eq!(got.len(), already + 1, "{got:?}");
    assert_eq!(got[already], (state.as_str(), code.as_str()));
}

#[test]
fn socket_activation_on_a_unix_socket_is_served_and_left_in_place() {
    let bot = Bot::start("json", "approve");
    let dir = TempDir::new("act");
    let state = private_dir("st");
    let path = dir.join("fcgi.sock");
    let mut relay = socket_activate(path.to_str().unwrap(), &relay_env(&bot, &state), dir.path());
    let endpoint = Endpoint::Unix(path.clone());
    // Concurrent, as with --listen: a second connection is answered while
    // the first (which started the relay) is still open.
    let held = endpoint.connect().expect("first connection");
    approved_once(&endpoint, &bot, 0);
    let log = relay.stderr_text();
    // LISTEN_FDNAMES (--fdname, FileDescriptorName= in a .socket unit).
    assert!(
        log.contains("socket \"fcgi\" on fd 3 from the service manager"),
        "{log}"
    );
    // The cap follows from the open-files limit the relay raised itself.
    let listening = format!("listening on unix:{} (up to ", path.display());
    let cap = log
        .split_once(&listening)
        .and_then(|(_, rest)| rest.split_once(" connections)"))
        .and_then(|(n, _)| n.parse::<usize>().ok());
    // Started with systemd's 1024 that would be (1024 - 64 - 64) / 2 = 448;
    // raised, it is the default cap whenever the hard limit allows it.
    let (_, hard) = files_limit().expect("getrlimit");
    let room = hard.min(2 * 4096 + 64 + 64);
    let raised = ((room - 64 - 64) / 2).min(4096) as usize;
    assert!(cap.is_some_and(|n| n >= 256), "{log}");
    assert_eq!(cap, Some(raised), "hard limit {hard}: {log}");
    drop(held);
    approved_once(&endpoint, &bot, 1);
    assert!(relay.stop().success(), "{}", relay.stderr_text());
    // The socket belongs to the manager: the relay must not unlink it.
    assert!(path.exists(), "the relay removed the manager's socket");
}

#[test]
fn socket_activation_on_tcp() {
    let bot = Bot::start("json", "approve");
    let dir = TempDir::new("act");
    let state = private_dir("st");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut relay = socket_activate(&addr.to_string(), &relay_env(&bot, &state), dir.path());
    approved_once(&Endpoint::Tcp(addr), &bot, 0);
    assert!(relay.stop().success(), "{}", relay.stderr_text());
}

/// The relay started by `sh`, which passes the socket it got as stdin on as
/// fd 3 and exports its own pid (exec keeps it) as LISTEN_PID: what a
/// service manager does between fork and exec.
fn start_with_fd3(
    socket: OwnedFd,
    extra_sh: &str,
    env: &[(&str, &str)],
    dir: &Path,
    tag: &str,
) -> Proc {
    let script =
        format!("export LISTEN_PID=$$ LISTEN_FDS=1; {extra_sh} exec \"$0\" 3<&0 0</dev/null");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::from(socket));
    Proc::spawn(&mut cmd, dir, tag)
}

#[test]
fn a_passed_socket_that_cannot_be_served_stops_the_start() {
    let dir = TempDir::new("act");
    let cases: [(&str, &str); 3] = [
        ("", "not an open socket"),
        ("LISTEN_FDS=2;", "passed 2 sockets"),
        ("LISTEN_FDS=x;", "LISTEN_FDS=\"x\""),
    ];
    for (i, (extra, want)) in cases.into_iter().enumerate() {
        // A regular file where the socket should be, or a wrong count.
        let file = File::open(bin()).expect("opening the binary");
        let mut relay = start_with_fd3(
            OwnedFd::from(file),
            extra,
            &[("REGISTER_STATE_DIR", "off")],
            dir.path(),
            &format!("bad{i}"),
        );
        let status = wait_bounded(&mut relay.child, WAIT).expect("the relay should exit");
        assert_eq!(status.code(), Some(2), "{extra}: {}", relay.stderr_text());
        assert!(
            relay.stderr_text().contains(want),
            "{extra}: {}",
            relay.stderr_text()
        );
    }
    // A datagram socket is no listening stream socket either.
    let (a, _b) = std::os::unix::net::UnixDatagram::pair().expect("datagram pair");
    let mut relay = start_with_fd3(OwnedFd::from(a), "", &[], dir.path(), "dgram");
    let status = wait_bounded(&mut relay.child, WAIT).expect("the relay should exit");
    assert_eq!(status.code(), Some(2), "{}", relay.stderr_text());
    assert!(
        relay.stderr_text().contains("not a stream socket"),
        "{}",
        relay.stderr_text()
    );
}

#[test]
fn activation_variables_for_another_process_are_ignored() {
    // LISTEN_PID names someone else: CGI mode, as without the variables.
    let (out, killed) = run_bin(
        &[],
        &[
            ("LISTEN_PID", "1"),
            ("LISTEN_FDS", "1"),
            ("REQUEST_METHOD", "GET"),
            ("QUERY_STRING", ""),
            ("REGISTER_STATE_DIR", "off"),
        ],
        WAIT,
    );
    assert!(!killed);
    assert!(out.status.success());
    assert_eq!(parse_cgi(&out.stdout).status, 400);
}

/// A datagram socket of the test's own standing in for systemd's notify socket.
struct NotifySocket {
    sock: UnixDatagram,
}

impl NotifySocket {
    fn at(addr: &std::os::unix::net::SocketAddr) -> NotifySocket {
        let sock = UnixDatagram::bind_addr(addr).expect("binding the notify socket");
        NotifySocket { sock }
    }

    /// The next datagram (bounded by [`WAIT`]).
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = read_by(
            Instant::now() + WAIT,
            |left| self.sock.set_read_timeout(Some(left)),
            || self.sock.recv(&mut buf),
        )
        .unwrap_or_else(|e| panic!("no datagram from the relay within {WAIT:?}: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Datagrams until one contains `needle`; returns that one.
    fn until(&self, needle: &str) -> String {
        loop {
            let msg = self.next();
            if msg.contains(needle) {
                return msg;
            }
        }
    }
}

#[test]
fn readiness_status_and_stop_reach_the_notify_socket() {
    let bot = Bot::start_with("json", "approve", &["--delay", "0.05"]);
    let dir = TempDir::new("ntf");
    let state = private_dir("st");
    let notify_path = dir.join("notify");
    let notify = NotifySocket::at(
        &std::os::unix::net::SocketAddr::from_pathname(&notify_path).expect("path"),
    );
    let sock = dir.join("fcgi.sock");
    let mut env = relay_env(&bot, &state);
    env.push(("NOTIFY_SOCKET", notify_path.to_str().unwrap()));
    let mut relay = socket_activate(sock.to_str().unwrap(), &env, dir.path());

    // The first connection starts the relay; it is ready before it answers.
    let endpoint = Endpoint::Unix(sock.clone());
    approved_once(&endpoint, &bot, 0);
    let ready = notify.next();
    assert_eq!(
        ready,
        format!(
            "READY=1\nSTATUS=0 requests served, 0 in flight; listening on unix:{}",
            sock.display()
        )
    );
    approved_once(&endpoint, &bot, 1);
    let status = notify.until("STATUS=2 requests served");
    assert_eq!(
        status,
        format!(
            "STATUS=2 requests served, 0 in flight; listening on unix:{}",
            sock.display()
        )
    );
    assert!(relay.stop().success(), "{}", relay.stderr_text());
    let stopping = notify.until("STOPPING=1");
    assert!(
        stopping
            .starts_with("STOPPING=1\nSTATUS=stopping: 0 in flight to finish; 2 requests served"),
        "{stopping}"
    );
}

#[test]
fn notify_socket_in_the_abstract_namespace_with_listen() {
    use std::os::linux::net::SocketAddrExt;
    let bot = Bot::start("json", "approve");
    let state = private_dir("st");
    let name = format!("trt-notify-{}", unique("n", 12));
    let notify = NotifySocket::at(
        &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name"),
    );
    let at_name = format!("@{name}");
    let mut env = relay_env(&bot, &state);
    env.push(("NOTIFY_SOCKET", &at_name));
    let mut server = ListenServer::start_unix(&env);
    assert!(notify.next().starts_with("READY=1\n"));
    server.stop();
    assert!(notify.until("STOPPING=1").starts_with("STOPPING=1\n"));
}

#[test]
fn readiness_waits_out_a_full_notify_socket() {
    let bot = Bot::start("json", "approve");
    let dir = TempDir::new("ntf");
    let state = private_dir("st");
    let notify_path = dir.join("notify");
    let notify = NotifySocket::at(
        &std::os::unix::net::SocketAddr::from_pathname(&notify_path).expect("path"),
    );
    // Fill the manager's queue, as a busy systemd's may be at start.
    let filler = UnixDatagram::unbound().expect("datagram socket");
    filler.set_nonblocking(true).expect("non-blocking");
    let mut queued = 0;
    while filler.send_to(b"FILLER=1", &notify_path).is_ok() {
        queued += 1;
        assert!(queued < 100_000, "the notify socket never filled up");
    }
    let sock = dir.join("fcgi.sock");
    let mut env = relay_env(&bot, &state);
    env.push(("NOTIFY_SOCKET", notify_path.to_str().unwrap()));
    let mut relay = socket_activate(sock.to_str().unwrap(), &env, dir.path());
    approved_once(&Endpoint::Unix(sock.clone()), &bot, 0);
    relay.wait_log("notify socket is full; trying READY=1 again");
    // Room again: READY=1 still arrives, after the fillers.
    for _ in 0..queued {
        assert_eq!(notify.next(), "FILLER=1");
    }
    assert!(notify.until("READY=1").starts_with("READY=1\n"));
    assert!(relay.stop().success(), "{}", relay.stderr_text());
    assert!(notify.until("STOPPING=1").starts_with("STOPPING=1\n"));
}

/// `systemctl restart` with the socket held by systemd, twice, under steady
/// load: the old process stops accepting, finishes and exits; connections
/// that arrive meanwhile wait in the socket's backlog for the next one.
fn restart_under_load(unix: bool) {
    const CLIENTS: usize = 6;
    let bot = Bot::start_with("json", "approve", &["--delay", "0.05"]);
    let dir = TempDir::new("rst");
    let state = private_dir("st");
    // The listening socket, held here as systemd holds it.
    let (socket, endpoint): (OwnedFd, Endpoint) = if unix {
        let path = dir.join("fcgi.sock");
        let l = UnixListener::bind(&path).expect("binding");
        (OwnedFd::from(l), Endpoint::Unix(path))
    } else {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = l.local_addr().expect("addr");
        (OwnedFd::from(l), Endpoint::Tcp(addr))
    };
    let env = relay_env(&bot, &state);
    let start = |generation: usize| {
        let fd = socket.try_clone().expect("dup of the socket");
        let p = start_with_fd3(fd, "", &env, dir.path(), &format!("gen{generation}"));
        p.wait_log("listening on");
        p
    };

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sent = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut relay = start(1);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, done, failures, sent, endpoint) = (
                stop.clone(),
                done.clone(),
                failures.clone(),
                sent.clone(),
                endpoint.clone(),
            );
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let code = unique("code", 24);
                    let state = unique("state", 40);
                    let result = endpoint
                        .connect()
                        .map_err(|e| e.to_string())
                        .and_then(|mut c| {
                            let params = get_params(&format!("code={code}&state={state}"));
                            send_request(&mut c, 1, &as_pairs(&params), &[], false)
                                .map_err(|e| e.to_string())?;
                            try_read_reply(&mut c, 1)
                        });
                    match result.map(|r| r.http()) {
                        Ok(h) if h.status == 200 && message_text(&h.body) == APPROVED => {
                            sent.lock().unwrap().push((state, code));
                        }
                        Ok(h) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{} {}", h.status, h.body)),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let mut logs = Vec::new();
    for generation in 2..=3 {
        let target = done.load(Ordering::SeqCst) + 40;
        assert!(
            wait_until(WAIT, || done.load(Ordering::SeqCst) >= target),
            "load stalled"
        );
        // systemctl restart: stop (SIGTERM, wait for the exit), then start.
        let status = relay.stop();
        assert!(status.success(), "{status}: {}", relay.stderr_text());
        logs.push(relay.stderr_text());
        // With no process at all, a request still gets in: it waits in the
        // socket's backlog and the next process answers it.
        let code = unique("gap", 24);
        let state = unique("state", 40);
        let mut gap = endpoint
            .connect()
            .expect("connecting while no process runs");
        let params = get_params(&format!("code={code}&state={state}"));
        send_request(&mut gap, 1, &as_pairs(&params), &[], false)
            .expect("sending into the backlog");
        relay = start(generation);
        let h = read_reply(&mut gap, 1).http();
        assert_eq!(h.status, 200, "{}", h.body);
        assert_eq!(message_text(&h.body), APPROVED);
        sent.lock().unwrap().push((state, code));
        done.fetch_add(1, Ordering::SeqCst);
    }
    let target = done.load(Ordering::SeqCst) + 40;
    assert!(
        wait_until(WAIT, || done.load(Ordering::SeqCst) >= target),
        "load stalled"
    );
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client thread");
    }
    assert!(relay.stop().success());
    logs.push(relay.stderr_text());

    let failures = failures.lock().unwrap();
    let sent = sent.lock().unwrap();
    let total = done.load(Ordering::SeqCst);
    eprintln!(
        "restart under load ({}): {total} requests, {} failed, 3 processes, served {:?}",
        if unix { "unix" } else { "tcp" },
        failures.len(),
        logs.iter()
            .map(|l| outcome_lines(l).len())
            .collect::<Vec<_>>()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(sent.len(), total);
    // Each process served part of the load: the restarts happened mid-load.
    for (i, log) in logs.iter().enumerate() {
        assert!(
            !outcome_lines(log).is_empty(),
            "process {} served nothing:\n{log}",
            i + 1
        );
    }
    let received = bot.wait_received(total, WAIT);
    assert_eq!(received.len(), total, "each code once at the bot");
    let got: HashSet<(String, String)> = received
        .iter()
        .map(|r| (r.state.clone(), r.code.clone()))
        .collect();
    let want: HashSet<(String, String)> = sent.iter().cloned().collect();
    assert_eq!(got.len(), total, "a code reached the bot twice");
    assert_eq!(got, want);
}

#[test]
fn restart_under_load_loses_nothing_on_a_unix_socket() {
    restart_under_load(true);
}

#[test]
fn restart_under_load_loses_nothing_on_tcp() {
    restart_under_load(false);
}

// ------------------------------------------------------- the operator's tools

/// libfcgi's `cgi-fcgi -bind -connect ADDR` with a CGI environment: what an
/// operator runs to check a live service.
fn cgi_fcgi(connect: &str, query: &str) -> HttpLike {
    require_tool("cgi-fcgi", "libfcgi-bin");
    let mut cmd = Command::new("cgi-fcgi");
    cmd.args(["-bind", "-connect", connect])
        .env_clear()
        .env("REQUEST_METHOD", "GET")
        .env("QUERY_STRING", query)
        .env("SCRIPT_NAME", "/register")
        .env("SERVER_PROTOCOL", "HTTP/1.1");
    let (out, killed) = run_bounded(&mut cmd, None, WAIT);
    assert!(!killed, "cgi-fcgi hung");
    assert!(
        out.status.success(),
        "cgi-fcgi: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_cgi(&out.stdout)
}

#[test]
fn cgi_fcgi_checks_a_socket_activated_relay() {
    let bot = Bot::start("json", "approve");
    let dir = TempDir::new("cfc");
    let state = private_dir("st");
    let sock = dir.join("fcgi.sock");
    let mut relay = socket_activate(sock.to_str().unwrap(), &relay_env(&bot, &state), dir.path());
    let page = cgi_fcgi(sock.to_str().unwrap(), "code=check-code&state=check-state");
    assert_answer_page(&page, true, APPROVED);
    assert_eq!(bot.wait_received(1, WAIT), [("check-state", "check-code")]);
    // A request without a code is answered 400 and never reaches the bot.
    assert_eq!(cgi_fcgi(sock.to_str().unwrap(), "").status, 400);
    assert!(relay.stop().success());
    assert_eq!(bot.received().len(), 1);
}

#[test]
fn spawn_fcgi_runs_the_fd0_mode() {
    require_tool("spawn-fcgi", "spawn-fcgi");
    let bot = Bot::start("json", "approve");
    let dir = TempDir::new("spf");
    let state = private_dir("st");
    let sock = dir.join("fcgi.sock");
    let notify_path = dir.join("notify");
    let notify = NotifySocket::at(
        &std::os::unix::net::SocketAddr::from_pathname(&notify_path).expect("path"),
    );
    // -n: stay in the foreground (exec the program with the socket as fd 0).
    let mut cmd = Command::new("spawn-fcgi");
    cmd.args(["-n", "-s"])
        .arg(&sock)
        .arg("--")
        .arg(bin())
        .env_clear()
        .envs(relay_env(&bot, &state))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null());
    let mut relay = Proc::spawn(&mut cmd, dir.path(), "relay");
    relay.wait_log("serving FastCGI on");
    // libfcgi's client, then the project's own.
    let page = cgi_fcgi(
        sock.to_str().unwrap(),
        "code=spawned-code&state=spawned-state",
    );
    assert_answer_page(&page, true, APPROVED);
    assert_eq!(
        bot.wait_received(1, WAIT),
        [("spawned-state", "spawned-code")]
    );
    approved_once(&Endpoint::Unix(sock.clone()), &bot, 1);
    assert!(relay.stop().success(), "{}", relay.stderr_text());
    // The one-at-a-time mode speaks to a service manager too.
    assert!(notify.next().starts_with("READY=1\n"));
    let stopping = notify.until("STOPPING=1");
    assert!(
        stopping.contains("0 in flight to finish; 2 requests served"),
        "{stopping}"
    );
}

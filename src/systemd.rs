//! The service manager's side of a start and a stop: socket activation
//! (systemd's `sd_listen_fds` protocol) and readiness (`sd_notify`).
//!
//! Socket activation: systemd (or `systemd-socket-activate`) binds the
//! socket of `tourney-register.socket`, starts the program with it as fd 3
//! and says so in `LISTEN_FDS=1` and `LISTEN_PID=<our pid>`. The socket
//! belongs to the manager: it outlives the process, so a restart queues
//! new connections in its backlog instead of refusing them, and the
//! program never unlinks its path.
//!
//! Readiness: with `NOTIFY_SOCKET` set (`Type=notify`), one datagram says
//! `READY=1` once the socket is served and the store open, `STOPPING=1`
//! when a graceful stop begins, and `STATUS=` carries a line for
//! `systemctl status`, refreshed every few seconds when it changed. Without
//! `NOTIFY_SOCKET` nothing is sent and no thread is started.
//!
//! Parsing and formatting are plain functions; the system calls are in
//! `crate::sys`, the counts in [`Status`], the moment a stop begins comes
//! from [`StopSignal`].

use std::os::fd::RawFd;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::net::Listener;
use crate::server::Status;
use crate::server::stop::StopSignal;
use crate::sys;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The variables of the activation protocol, unset once read so that
/// nothing started later takes them for its own.
const ACTIVATION_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// How often the `STATUS=` line is refreshed (only when it changed): one
/// datagram every few seconds at most, never one per request.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);

/// What the activation variables say about this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Nothing passed, or passed to another process (`LISTEN_PID` differs).
    NotActivated,
    /// `names.len()` sockets from fd 3 on; a name is empty when the
    /// manager gave none.
    Sockets {
        /// One name per socket.
        names: Vec<String>,
    },
}

/// Reads the activation variables as `sd_listen_fds` does. `pid` is this
/// process's id: the variables are for the process they name only.
pub fn parse_activation(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    pid: u32,
) -> Result<Activation, String> {
    let Some(listen_pid) = listen_pid else {
        return Ok(Activation::NotActivated);
    };
    match listen_pid.trim().parse::<u32>() {
        Ok(p) if p == pid => {}
        Ok(_) => return Ok(Activation::NotActivated),
        Err(_) => return Err(format!("LISTEN_PID={listen_pid:?} is not a process id")),
    }
    let Some(listen_fds) = listen_fds else {
        return Ok(Activation::NotActivated);
    };
    let count = match listen_fds.trim().parse::<usize>() {
        // More than a few hundred would be a manager gone wrong.
        Ok(n) if n <= 1024 => n,
        _ => return Err(format!("LISTEN_FDS={listen_fds:?} is not a socket count")),
    };
    if count == 0 {
        return Ok(Activation::NotActivated);
    }
    let given: Vec<String> = listen_fdnames
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    // Names that do not match the count are ignored, as sd_listen_fds_with_names does.
    let names = if given.len() == count {
        given
    } else {
        vec![String::new(); count]
    };
    Ok(Activation::Sockets { names })
}

/// The listening socket the service manager handed over.
pub struct PassedSocket {
    /// The socket, served as `--listen` serves its own.
    pub listener: Listener,
    /// `FileDescriptorName=` of the socket unit (default: the unit's name).
    pub name: String,
}

/// Takes the socket the service manager passed to this process, if any,
/// and unsets the activation variables. An error names what is wrong
/// (several sockets, a socket that is not a listening stream socket).
/// Call it first thing, before any thread starts or any file is opened.
pub fn take_listen_socket() -> Result<Option<PassedSocket>, String> {
    let var = |name: &str| std::env::var(name).ok();
    let activation = parse_activation(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    if ACTIVATION_VARS
        .iter()
        .any(|n| std::env::var_os(n).is_some())
        && !sys::unset_env_if_single_threaded(&ACTIVATION_VARS)
    {
        // Harmless: they name this process's pid, no child's.
        log::debug!("more than one thread: leaving the LISTEN_* variables set");
    }
    let names = match activation? {
        Activation::NotActivated => return Ok(None),
        Activation::Sockets { names } => names,
    };
    if names.len() != 1 {
        return Err(format!(
            "the service manager passed {} sockets (LISTEN_FDS); tourney-register serves \
             exactly one: give its .socket unit one ListenStream=",
            names.len()
        ));
    }
    let fd = LISTEN_FDS_START;
    let bad = |e: String| format!("passed fd {fd}: {e}");
    check_listening_stream(
        sys::socket_option(fd, libc::SO_ACCEPTCONN),
        sys::socket_option(fd, libc::SO_TYPE),
        sys::socket_option(fd, libc::SO_DOMAIN),
    )
    .map_err(bad)?;
    sys::set_cloexec(fd).map_err(|e| bad(e.to_string()))?;
    // The socket and its path belong to the manager: an inherited listener
    // is never unlinked.
    let listener = Listener::inherited(fd).ok_or_else(|| bad("not a listening socket".into()))?;
    Ok(Some(PassedSocket {
        listener,
        name: names.into_iter().next().unwrap_or_default(),
    }))
}

/// Whether a socket's options describe a listening stream socket this
/// program can serve; `Ok(true)` for a Unix socket, `Ok(false)` for TCP.
pub fn check_listening_stream(
    accepting: Option<libc::c_int>,
    kind: Option<libc::c_int>,
    domain: Option<libc::c_int>,
) -> Result<bool, String> {
    let (Some(accepting), Some(kind), Some(domain)) = (accepting, kind, domain) else {
        return Err("not an open socket".into());
    };
    if kind != libc::SOCK_STREAM {
        return Err("not a stream socket (use ListenStream=, not ListenDatagram=)".into());
    }
    if accepting == 0 {
        return Err("a stream socket that is not listening".into());
    }
    match domain {
        libc::AF_UNIX => Ok(true),
        libc::AF_INET | libc::AF_INET6 => Ok(false),
        other => Err(format!("socket family {other}, not Unix or TCP")),
    }
}

// ---------------------------------------------------------------- sd_notify

/// Where `NOTIFY_SOCKET` points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A socket file.
    Path(std::path::PathBuf),
    /// `@name`: a socket in the abstract namespace (Linux).
    Abstract(Vec<u8>),
}

/// Reads `NOTIFY_SOCKET`'s value. `None` when unset, empty or of a kind
/// this program does not speak (e.g. `vsock:`), which it logs.
pub fn parse_notify_socket(value: Option<&str>) -> Option<NotifyTarget> {
    let value = value?;
    if value.starts_with('/') {
        Some(NotifyTarget::Path(value.into()))
    } else if let Some(name) = value.strip_prefix('@')
        && !name.is_empty()
    {
        Some(NotifyTarget::Abstract(name.as_bytes().to_vec()))
    } else {
        None
    }
}

/// The `STATUS=` text: what `systemctl status` shows under the unit.
pub fn status_text(listening: &str, served: u64, in_flight: usize, stopping: bool) -> String {
    let requests = if served == 1 { "request" } else { "requests" };
    if stopping {
        format!(
            "stopping: {in_flight} in flight to finish; {served} {requests} served on {listening}"
        )
    } else {
        format!("{served} {requests} served, {in_flight} in flight; listening on {listening}")
    }
}

/// The datagram for "ready": readiness and a first status line.
pub fn ready_message(listening: &str) -> String {
    format!("READY=1\nSTATUS={}", status_text(listening, 0, 0, false))
}

/// The datagram for "a graceful stop began".
pub fn stopping_message(listening: &str, served: u64, in_flight: usize) -> String {
    format!(
        "STOPPING=1\nSTATUS={}",
        status_text(listening, served, in_flight, true)
    )
}

/// How often, and how far apart, `READY=1` and `STOPPING=1` are tried
/// while the manager's queue is full: a lost `READY=1` would have a
/// `Type=notify` service killed at its start time-out. Status lines are
/// sent once.
const RELIABLE_TRIES: u32 = 10;
const RELIABLE_PAUSE: Duration = Duration::from_millis(500);

/// A connection to the service manager's notify socket.
struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    listening: String,
    /// Whether `STOPPING=1` went out (or was given up on); held while it
    /// is being sent, so the process does not exit in the middle.
    stop_told: Mutex<bool>,
}

impl Notifier {
    fn from_env(listening: &str) -> Option<Notifier> {
        let raw = std::env::var("NOTIFY_SOCKET").ok();
        let target = parse_notify_socket(raw.as_deref());
        if target.is_none() && raw.as_deref().is_some_and(|v| !v.is_empty()) {
            log::warn!("NOTIFY_SOCKET={raw:?}: not a path or @name; not notifying");
        }
        let addr = match target? {
            NotifyTarget::Path(p) => SocketAddr::from_pathname(p),
            NotifyTarget::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
        };
        let made = UnixDatagram::unbound().and_then(|sock| {
            // A full queue at the manager must never stall a request or
            // a stop beyond the bounded retries.
            sock.set_nonblocking(true)?;
            Ok(sock)
        });
        match (made, addr) {
            (Ok(sock), Ok(addr)) => Some(Notifier {
                sock,
                addr,
                listening: listening.to_string(),
                stop_told: Mutex::new(false),
            }),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("NOTIFY_SOCKET={raw:?}: {e}; not notifying");
                None
            }
        }
    }

    fn try_send(&self, message: &str) -> std::io::Result<()> {
        self.sock
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(drop)
    }

    /// One try: for status lines, which the next one replaces.
    fn send(&self, message: &str) {
        if let Err(e) = self.try_send(message) {
            log::warn!("cannot notify the service manager: {e}");
        }
    }

    /// Tries again while the manager's queue is full, up to
    /// [`RELIABLE_TRIES`] times.
    fn send_reliably(&self, message: &str) {
        let what = message.lines().next().unwrap_or_default();
        for attempt in 1..=RELIABLE_TRIES {
            match self.try_send(message) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if attempt == 1 {
                        log::warn!(
                            "the service manager's notify socket is full; trying {what} again"
                        );
                    }
                    thread::sleep(RELIABLE_PAUSE);
                }
                Err(e) => {
                    log::warn!("cannot notify the service manager ({what}): {e}");
                    return;
                }
            }
        }
        log::warn!("cannot notify the service manager ({what}): its notify socket stayed full");
    }

    fn ready(&self) {
        self.send_reliably(&ready_message(&self.listening));
    }

    /// `STOPPING=1`, once, whoever asks first: the notify thread when the
    /// signal arrives, or the server when its accept loop ends.
    fn stopping(&self, status: &Status) {
        let mut told = self.stop_told.lock().unwrap_or_else(|p| p.into_inner());
        if !*told {
            *told = true;
            let message = stopping_message(&self.listening, status.served(), status.in_flight());
            self.send_reliably(&message);
        }
    }
}

/// The server's line to the service manager: [`Notify::stopping`] when
/// a stop begins. Does nothing without `NOTIFY_SOCKET`.
pub struct Notify {
    notifier: Option<Arc<Notifier>>,
    status: Arc<Status>,
}

impl Notify {
    /// Says `STOPPING=1` unless it was said already; returns once it is
    /// sent (bounded), so the process can exit.
    pub fn stopping(&self) {
        if let Some(n) = &self.notifier {
            n.stopping(&self.status);
        }
    }
}

/// Tells the service manager (`NOTIFY_SOCKET`) that `listening` is served:
/// `READY=1`; then, on a thread of its own, `STOPPING=1` the moment `stop`
/// is signalled, and every [`STATUS_EVERY`] a `STATUS=` line from `status`
/// if its figures changed. The requests themselves pay nothing. Without
/// `NOTIFY_SOCKET` it does nothing and starts no thread.
pub fn notify_ready(listening: &str, stop: &StopSignal, status: Arc<Status>) -> Notify {
    let Some(notifier) = Notifier::from_env(listening).map(Arc::new) else {
        return Notify {
            notifier: None,
            status,
        };
    };
    let watcher = match stop.watcher() {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("no stop notification before the accepting ends: {e}");
            None
        }
    };
    let (n, s) = (notifier.clone(), status.clone());
    let started = thread::Builder::new()
        .name("notify".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            n.ready();
            report(&n, watcher, &s);
        });
    if let Err(e) = started {
        log::warn!("no status updates for the service manager: {e}");
        notifier.send(&ready_message(listening));
    }
    Notify {
        notifier: Some(notifier),
        status,
    }
}

/// The notify thread: lives until the process exits.
fn report(notifier: &Notifier, mut watcher: Option<UnixStream>, status: &Status) {
    let mut last = (0, 0, false);
    loop {
        match &watcher {
            Some(w) => {
                let mut fds = [sys::pollfd(w, libc::POLLIN)];
                match sys::poll(&mut fds, Some(STATUS_EVERY)) {
                    Ok(0) => {}
                    Ok(_) => {
                        watcher = None;
                        notifier.stopping(status);
                        last = (status.served(), status.in_flight(), true);
                        continue;
                    }
                    Err(e) => {
                        log::warn!("cannot watch for the stop to tell the service manager: {e}");
                        watcher = None;
                    }
                }
            }
            None => thread::sleep(STATUS_EVERY),
        }
        let stopping = *notifier.stop_told.lock().unwrap_or_else(|p| p.into_inner());
        let now = (status.served(), status.in_flight(), stopping);
        if now != last {
            notifier.send(&format!(
                "STATUS={}",
                status_text(&notifier.listening, now.0, now.1, now.2)
            ));
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_for_this_process() {
        assert_eq!(
            parse_activation(Some("42"), Some("1"), None, 42),
            Ok(Activation::Sockets {
                names: vec![String::new()]
            })
        );
        assert_eq!(
            parse_activation(Some("42"), Some("2"), Some("fcgi:admin"), 42),
            Ok(Activation::Sockets {
                names: vec!["fcgi".into(), "admin".into()]
            })
        );
        // A name count that does not match is ignored, the sockets are not.
        assert_eq!(
            parse_activation(Some("42"), Some("1"), Some("a:b"), 42),
            Ok(Activation::Sockets {
                names: vec![String::new()]
            })
        );
    }

    #[test]
    fn activation_for_someone_else_or_nobody() {
        for (pid, fds) in [
            (None, Some("1")),
            (Some("41"), Some("1")),
            (Some("42"), None),
            (Some("42"), Some("0")),
        ] {
            assert_eq!(
                parse_activation(pid, fds, None, 42),
                Ok(Activation::NotActivated),
                "{pid:?} {fds:?}"
            );
        }
    }

    #[test]
    fn activation_garbage_is_an_error() {
        assert!(parse_activation(Some("x"), Some("1"), None, 42).is_err());
        assert!(parse_activation(Some("42"), Some("one"), None, 42).is_err());
        assert!(parse_activation(Some("42"), Some("-1"), None, 42).is_err());
        assert!(parse_activation(Some("42"), Some("100000"), None, 42).is_err());
    }

    #[test]
    fn only_listening_stream_sockets_are_served() {
        let ok = Some(1);
        let stream = Some(libc::SOCK_STREAM);
        assert_eq!(
            check_listening_stream(ok, stream, Some(libc::AF_UNIX)),
            Ok(true)
        );
        assert_eq!(
            check_listening_stream(ok, stream, Some(libc::AF_INET6)),
            Ok(false)
        );
        assert!(check_listening_stream(Some(0), stream, Some(libc::AF_UNIX)).is_err());
        assert!(check_listening_stream(ok, Some(libc::SOCK_DGRAM), Some(libc::AF_UNIX)).is_err());
        assert!(check_listening_stream(ok, stream, Some(libc::AF_NETLINK)).is_err());
        assert!(check_listening_stream(None, None, None).is_err());
    }

    #[test]
    fn notify_socket_kinds() {
        assert_eq!(
            parse_notify_socket(Some("/run/systemd/notify")),
            Some(NotifyTarget::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_notify_socket(Some("@/org/freedesktop/systemd1/notify/1")),
            Some(NotifyTarget::Abstract(
                b"/org/freedesktop/systemd1/notify/1".to_vec()
            ))
        );
        for v in [
            None,
            Some(""),
            Some("@"),
            Some("relative"),
            Some("vsock:2:1"),
        ] {
            assert_eq!(parse_notify_socket(v), None, "{v:?}");
        }
    }

    #[test]
    fn messages() {
        assert_eq!(
            ready_message("unix:/run/tourney-register/fcgi.sock"),
            "READY=1\nSTATUS=0 requests served, 0 in flight; \
             listening on unix:/run/tourney-register/fcgi.sock"
        );
        assert_eq!(
            stopping_message("127.0.0.1:9000", 1, 2),
            "STOPPING=1\nSTATUS=stopping: 2 in flight to finish; 1 request served on 127.0.0.1:9000"
        );
        assert_eq!(
            status_text("fd 3", 12, 3, false),
            "12 requests served, 3 in flight; listening on fd 3"
        );
    }
}

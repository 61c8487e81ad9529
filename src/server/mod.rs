//! The FastCGI accept loops.
//!
//! Two shapes, one per deployment:
//! - an inherited listening socket, fd 0 (mod_fcgid, spawn-fcgi): the web
//!   server gives each process one request at a time, so the loop serves
//!   connections in turn on the main thread ([`serve_serial`]);
//! - `--listen` (mod_proxy_fcgi, nginx): one long-lived process serves
//!   many connections at once on one thread, with an event loop
//!   ([`crate::event::serve`]).
//!
//! With `NOTIFY_SOCKET` set, both tell the service manager ([`systemd`])
//! when they serve, when a stop begins, and how many requests they served.
//!
//! A stop signal ([`stop`]) ends the accepting; requests in flight
//! finish, bounded by the bot timeout, and the process exits 0. A code the
//! bot has received always gets its answer back to the player.

pub mod counter;
pub mod stop;

use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use log::{info, warn};

use crate::fastcgi;
use crate::http::{Request, Response};
use crate::limits::Limits;
use crate::net::{Listener, Stream};
use crate::relay::Relay;
use crate::sys;
use crate::systemd;
use counter::{Counter, Registration, lock};
use stop::StopSignal;

/// What the server is doing, for whoever reports on it (a log line, a
/// service manager's status).
#[derive(Debug, Default)]
pub struct Status {
    in_flight: Arc<Counter>,
    served: AtomicU64,
    stopping: AtomicBool,
}

impl Status {
    /// Requests inside the pipeline right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Requests answered by the pipeline since start.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Whether a stop began: no new connections are accepted.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Runs the pipeline on one request, counted.
    fn handle(&self, relay: &Relay, req: &Request) -> Response {
        let _in_flight = self.in_flight.register();
        let response = relay.handle(req);
        self.served.fetch_add(1, Ordering::SeqCst);
        response
    }

    /// Marks the stop as begun: no new connections are accepted.
    pub(crate) fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Counts a request inside the pipeline until the guard is dropped
    /// (for a driver that runs the pipeline in steps).
    pub(crate) fn request_began(&self) -> Registration {
        self.in_flight.register()
    }

    /// Counts an answered request.
    pub(crate) fn request_answered(&self) {
        self.served.fetch_add(1, Ordering::SeqCst);
    }
}

/// Serves connections from an inherited listener one after another until
/// stopped.
pub fn serve_serial(
    relay: &Relay,
    listener: Listener,
    limits: &Limits,
    status: Arc<Status>,
) -> io::Result<()> {
    let stop = StopSignal::install(stop::Signals::Child)?;
    // The wait for a connection is a plain blocking accept, with no poll
    // beside it for the stop: the stop thread interrupts the accept with a
    // signal instead, for as long as it goes on.
    sys::install_interrupt_signal()?;
    let accepting = Arc::new(AtomicBool::new(false));
    // The connection being served, by descriptor: a handle of its own (a
    // dup) would cost two system calls per connection. It is cleared,
    // under the lock, before the connection closes.
    let current: Arc<Mutex<Option<RawFd>>> = Arc::default();
    let watcher = stop.watcher()?;
    let waiter = Waiter {
        current: current.clone(),
        accepting: accepting.clone(),
        main: sys::this_thread(),
        status: status.clone(),
    };
    thread::Builder::new()
        .name("stop".into())
        .stack_size(64 * 1024)
        .spawn(move || waiter.end_waits_on_stop(watcher))?;
    let handler = |req: &Request| status.handle(relay, req);
    let listening = listener.describe();
    info!("serving FastCGI on {listening}");
    let notify = systemd::notify_ready(&listening, &stop, status.clone());
    while let Some(mut stream) = next_connection(&stop, &listener, &accepting)? {
        *lock(&current) = Some(stream.as_raw_fd());
        if let Err(e) = fastcgi::serve_connection(&mut stream, &handler, limits) {
            info!("FastCGI connection ended: {e}");
        }
        *lock(&current) = None;
    }
    status.begin_stopping();
    notify.stopping();
    info!("stop requested, exiting");
    Ok(())
}

/// The next connection, or `None` once a stop was asked for. `accepting`
/// is set while the accept may block, for the stop thread to interrupt.
fn next_connection(
    stop: &StopSignal,
    listener: &Listener,
    accepting: &AtomicBool,
) -> io::Result<Option<Stream>> {
    let mut pause = Duration::from_millis(10);
    loop {
        accepting.store(true, Ordering::SeqCst);
        // Looked at after `accepting` is set: a stop that comes later
        // finds it set, and interrupts the accept until it returns.
        if stop.requested() {
            accepting.store(false, Ordering::SeqCst);
            return Ok(None);
        }
        let accepted = match listener.accept_interruptible() {
            // A launcher may hand over a non-blocking socket (systemd's
            // NonBlocking=yes): wait for a connection, interruptibly too.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sys::wait_acceptable(listener).and(Err(io::ErrorKind::Interrupted.into()))
            }
            other => other,
        };
        accepting.store(false, Ordering::SeqCst);
        match accepted {
            Ok(stream) => return Ok(Some(stream)),
            // Also after a wait for a non-blocking listener: accept again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Failures that pass (a client gone before accept, out of file
            // descriptors for a moment); the growing pause keeps a lasting
            // one from spinning a core or flooding the log.
            Err(e) => {
                warn!(
                    "accept failed, trying again in {} ms: {e}",
                    pause.as_millis()
                );
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// What the stop thread of the fd-0 loop needs to end its waits.
struct Waiter {
    current: Arc<Mutex<Option<RawFd>>>,
    accepting: Arc<AtomicBool>,
    main: sys::ThreadId,
    status: Arc<Status>,
}

impl Waiter {
    /// Waits for a stop signal, then interrupts the loop's accept while it
    /// waits, and ends the current connection's reading side as soon as no
    /// request is in the pipeline. A web server that keeps an idle
    /// connection open (FCGI_KEEP_CONN) would otherwise hold the process
    /// until its idle deadline. Only reading is shut: an answer being
    /// written still goes out whole.
    fn end_waits_on_stop(self, watcher: std::os::unix::net::UnixStream) {
        if stop::wait_for_stop(watcher).is_err() {
            return;
        }
        loop {
            if self.accepting.load(Ordering::SeqCst) {
                // The main thread lives as long as the process.
                sys::interrupt(self.main);
            }
            if let Some(fd) = *lock(&self.current)
                && self.status.in_flight() == 0
            {
                // The lock is held: the connection is open (see serve_serial).
                sys::shutdown_read(fd);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

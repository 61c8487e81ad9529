//! The FastCGI accept loops and the graceful stop.
//!
//! Two shapes, one per deployment:
//! - fd 0 (mod_fcgid, spawn-fcgi): the web server gives each process one
//!   request at a time, so the loop serves connections in turn on the main
//!   thread; no thread is spawned per request.
//! - `--listen` (mod_proxy_fcgi, nginx): one long-lived process serves
//!   many connections at once from a pool of threads that grows on demand
//!   up to `REGISTER_MAX_CONNS` and then stays, so a burst pays for thread
//!   creation once; past the cap a connection is answered "overloaded".
//!
//! SIGTERM (mod_fcgid's and systemd's stop), SIGINT and SIGUSR1 stop
//! accepting; requests in flight finish, bounded by the bot timeout, and
//! the process exits 0. A code the bot has received always gets its
//! answer back to the player.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::fastcgi::{self, Limits};
use crate::net::Stream;
use crate::page::Outcome;
use crate::relay::Relay;

/// Signals that ask for a graceful stop.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

/// Stack for each connection thread: the pipeline is shallow, and a small
/// stack keeps a few hundred threads cheap.
const STACK: usize = 256 * 1024;

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    /// The listening socket a web server handed over as fd 0, if any.
    pub fn from_stdin() -> Option<Listener> {
        let accepting = sockopt(0, libc::SO_ACCEPTCONN)?;
        if accepting == 0 {
            return None;
        }
        let domain = sockopt(0, libc::SO_DOMAIN)?;
        // SAFETY: fd 0 is a listening socket that nothing else in this
        // process uses; ownership moves to the listener.
        let fd = unsafe { OwnedFd::from_raw_fd(0) };
        Some(if domain == libc::AF_UNIX {
            Listener::Unix(UnixListener::from(fd), None)
        } else {
            Listener::Tcp(TcpListener::from(fd))
        })
    }

    /// Binds `HOST:PORT` or `unix:/path`. A stale socket file left by a
    /// crash is replaced; a live one (something answers) is not.
    pub fn bind(spec: &str) -> io::Result<Listener> {
        if let Some(path) = spec.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening there",
                ));
            }
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path)?;
            return Ok(Listener::Unix(listener, Some(path)));
        }
        Ok(Listener::Tcp(TcpListener::bind(spec)?))
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Listener::Unix(_, Some(p)) => format!("unix:{}", p.display()),
            Listener::Unix(_, None) => "fd 0".into(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(path)) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size; a bad fd only errors.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &mut value as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Wakes the accept loop when a stop signal arrives.
struct StopSignal {
    flag: Arc<AtomicBool>,
    wake: UnixStream,
}

impl StopSignal {
    fn install() -> io::Result<StopSignal> {
        let flag = Arc::new(AtomicBool::new(false));
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        for sig in STOP_SIGNALS {
            signal_hook::flag::register(sig, flag.clone())?;
            signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
        }
        Ok(StopSignal { flag, wake })
    }

    /// A socket that becomes readable when a stop signal arrives, for a
    /// thread other than the accept loop.
    fn watcher(&self) -> io::Result<UnixStream> {
        let (watcher, notify) = UnixStream::pair()?;
        for sig in STOP_SIGNALS {
            signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
        }
        if self.requested() {
            let _ = (&notify).write(&[1]);
        }
        Ok(watcher)
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The next connection, with its timeouts set, or `None` once a stop
    /// was asked for.
    fn next_connection(
        &self,
        listener: &Listener,
        io_timeout: Duration,
    ) -> io::Result<Option<Stream>> {
        while self.wait_for_connection(listener)? {
            match listener.accept() {
                Ok(stream) => {
                    let _ = stream.set_timeouts(io_timeout);
                    return Ok(Some(stream));
                }
                // Failures that pass (a client gone before accept, out of
                // file descriptors for a moment); the pause keeps a lasting
                // one from spinning a core.
                Err(e) => {
                    warn!("accept failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
        Ok(None)
    }

    /// Blocks until the listener has a connection (true) or a stop was
    /// asked for (false).
    fn wait_for_connection(&self, listener: &Listener) -> io::Result<bool> {
        loop {
            if self.requested() {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd {
                    fd: listener.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if fds[1].revents != 0 {
                let mut sink = [0u8; 64];
                let _ = (&self.wake).read(&mut sink);
                continue;
            }
            if fds[0].revents != 0 {
                return Ok(true);
            }
        }
    }
}

/// Serves connections from fd 0 one after another until stopped.
pub fn serve_serial(
    relay: &Relay,
    listener: Listener,
    limits: &Limits,
    io_timeout: Duration,
) -> io::Result<()> {
    let stop = StopSignal::install()?;
    let serving = Arc::new(Serving::default());
    let watcher = stop.watcher()?;
    let watched = serving.clone();
    thread::Builder::new()
        .name("stop".into())
        .stack_size(64 * 1024)
        .spawn(move || watched.end_idle_on_stop(watcher))?;
    let handler = |req: &crate::http::Request| {
        serving.busy.store(true, Ordering::SeqCst);
        let response = relay.handle(req);
        serving.busy.store(false, Ordering::SeqCst);
        response
    };
    info!("serving FastCGI on {}", listener.describe());
    while let Some(mut stream) = stop.next_connection(&listener, io_timeout)? {
        *lock(&serving.conn) = Some(stream.fd());
        if let Err(e) = fastcgi::serve_connection(&mut stream, &handler, limits) {
            info!("FastCGI connection ended: {e}");
        }
        *lock(&serving.conn) = None;
    }
    info!("stop requested, exiting");
    Ok(())
}

/// The connection the serial loop is on, for the stop watcher.
#[derive(Default)]
struct Serving {
    conn: Mutex<Option<RawFd>>,
    /// A request is inside the pipeline (possibly talking to the bot).
    busy: AtomicBool,
}

impl Serving {
    /// Waits for a stop signal, then ends the current connection's reading
    /// side as soon as no request is in the pipeline. A web server that
    /// keeps an idle connection open (FCGI_KEEP_CONN) would otherwise hold
    /// the process until its read timeout. Only reading is shut: an answer
    /// being written still goes out whole.
    fn end_idle_on_stop(&self, mut watcher: UnixStream) {
        let mut byte = [0u8; 1];
        while let Err(e) = watcher.read(&mut byte) {
            if e.kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
        loop {
            {
                // Holding the lock while shutting down means the fd cannot be
                // closed and reused by the loop in between.
                let conn = lock(&self.conn);
                if let Some(fd) = *conn
                    && !self.busy.load(Ordering::SeqCst)
                {
                    // SAFETY: fd is the open connection, kept open while the lock is held.
                    unsafe { libc::shutdown(fd, libc::SHUT_RD) };
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How long the acceptor, at the cap, waits for a thread to come free.
const FREE_WAIT: Duration = Duration::from_millis(100);

/// Closes a connection whose request was not read in full without
/// resetting it: over TCP, closing with unread input sends a reset, and the
/// web server could lose the answer just written. Bounded by a short wait.
fn linger(mut stream: Stream) {
    // A Unix socket never resets: the answer stays readable.
    if matches!(stream, Stream::Unix(_))
        || stream.shutdown_write().is_err()
        || stream.set_timeouts(Duration::from_millis(50)).is_err()
    {
        return;
    }
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_millis(100);
    while Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => return,
        }
    }
}

/// The pool's shared state: waiting connections and how many threads
/// there are and how many are waiting for work.
struct Pool {
    queue: Mutex<PoolState>,
    /// A connection is waiting for a thread.
    ready: Condvar,
    /// A thread is waiting for a connection (signalled only when the
    /// acceptor waits for one, to keep the common path free of wake-ups).
    freed: Condvar,
    /// Requests inside the pipeline right now.
    in_flight: AtomicUsize,
    /// Connections being served (a request in flight, its answer being
    /// written, or a keep-alive connection waiting for the next).
    active: AtomicUsize,
}

struct PoolState {
    waiting: VecDeque<Stream>,
    threads: usize,
    idle: usize,
    closed: bool,
    /// The acceptor is at the cap, waiting on `freed` for a thread.
    acceptor_waiting: bool,
}

/// Serves connections concurrently until stopped, then lets requests in
/// flight finish within `grace`.
pub fn serve_pool(
    relay: Arc<Relay>,
    listener: Listener,
    limits: Arc<Limits>,
    io_timeout: Duration,
    grace: Duration,
) -> io::Result<()> {
    let stop = StopSignal::install()?;
    let pool = Arc::new(Pool {
        queue: Mutex::new(PoolState {
            waiting: VecDeque::new(),
            threads: 0,
            idle: 0,
            closed: false,
            acceptor_waiting: false,
        }),
        ready: Condvar::new(),
        freed: Condvar::new(),
        in_flight: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
    });
    let max = limits.max_conns;
    let busy = relay
        .page()
        .respond(&Outcome::Overloaded)
        .to_cgi_bytes(false);
    info!(
        "listening on {} (up to {max} connections)",
        listener.describe()
    );
    let mut workers = Vec::new();
    while let Some(mut stream) = stop.next_connection(&listener, io_timeout)? {
        let mut state = lock(&pool.queue);
        if state.idle > state.waiting.len() {
            state.waiting.push_back(stream);
            drop(state);
            pool.ready.notify_one();
        } else if state.threads < max {
            state.threads += 1;
            state.waiting.push_back(stream);
            drop(state);
            let (shared, relay, limits) = (pool.clone(), relay.clone(), limits.clone());
            match thread::Builder::new()
                .name("fcgi".into())
                .stack_size(STACK)
                .spawn(move || worker(&shared, &relay, &limits))
            {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    error!("cannot start a connection thread: {e}");
                    lock(&pool.queue).threads -= 1;
                }
            }
        } else {
            // Every thread is taken. One may be a moment from taking its next
            // connection, so wait a little for it before calling this one
            // overloaded.
            state.acceptor_waiting = true;
            let (mut state, _) = pool
                .freed
                .wait_timeout_while(state, FREE_WAIT, |s| s.idle <= s.waiting.len())
                .unwrap_or_else(|p| p.into_inner());
            state.acceptor_waiting = false;
            if state.idle > state.waiting.len() {
                state.waiting.push_back(stream);
                drop(state);
                pool.ready.notify_one();
                continue;
            }
            drop(state);
            warn!("at the cap of {max} connections: answering one connection 'overloaded'");
            // Bounded: the reject reads at most one record header, with a short timeout.
            let _ = stream.set_timeouts(Duration::from_millis(500));
            if fastcgi::reject_overloaded(&mut stream, &busy).is_ok() {
                linger(stream);
            }
        }
    }
    info!("stop requested: no new connections; finishing requests in flight");
    drop(listener);
    lock(&pool.queue).closed = true;
    pool.ready.notify_all();
    let deadline = Instant::now() + grace;
    while pool.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let left = pool.in_flight.load(Ordering::SeqCst);
    if left > 0 {
        warn!(
            "{left} requests still in flight after {} ms; exiting anyway",
            grace.as_millis()
        );
    }
    // Answers are written right after the pipeline returns; give those
    // writes a moment. A keep-alive connection still open after it is
    // idle, with no request of its own to lose.
    let deadline = Instant::now() + Duration::from_secs(1);
    while pool.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    drop(workers);
    info!("stopped");
    Ok(())
}

fn worker(pool: &Pool, relay: &Relay, limits: &Limits) {
    let handler = |req: &crate::http::Request| {
        pool.in_flight.fetch_add(1, Ordering::SeqCst);
        let response = relay.handle(req);
        pool.in_flight.fetch_sub(1, Ordering::SeqCst);
        response
    };
    loop {
        let mut stream = {
            let mut state = lock(&pool.queue);
            state.idle += 1;
            if state.acceptor_waiting {
                pool.freed.notify_one();
            }
            loop {
                if let Some(s) = state.waiting.pop_front() {
                    state.idle -= 1;
                    break s;
                }
                if state.closed {
                    state.idle -= 1;
                    state.threads -= 1;
                    return;
                }
                state = pool.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        pool.active.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = fastcgi::serve_connection(&mut stream, &handler, limits) {
            info!("FastCGI connection ended: {e}");
        }
        drop(stream);
        pool.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes a lock even if a thread panicked while holding it: the state is
/// counters and a queue, always left consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

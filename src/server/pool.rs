//! The `--listen` connection pool: threads that grow on demand up to
//! [`Limits::max_conns`] and then stay, so a burst pays for thread creation
//! once. Past the cap a connection is turned away "overloaded" on a
//! thread of its own, so the accept loop never waits on a peer.
//!
//! Every count is held by a [`Registration`] guard, so no path can forget
//! to give it back (the shape of tiny_http's `task_pool.rs`).

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::Status;
use crate::fastcgi;
use crate::limits::Limits;
use crate::net::Stream;
use crate::relay::Relay;

/// Stack for each connection thread: the pipeline is shallow, and a small
/// stack keeps a few hundred threads cheap.
const STACK: usize = 256 * 1024;
/// Stack for a thread turning a connection away: it only reads a header
/// and writes a page.
const TURN_AWAY_STACK: usize = 64 * 1024;
/// How long a connection over the cap waits for a thread to come free
/// (one may be a moment from taking its next connection) before it is
/// turned away.
const FREE_WAIT: Duration = Duration::from_millis(100);

/// A number of things in progress.
#[derive(Debug, Default)]
pub struct Counter(AtomicUsize);

impl Counter {
    /// How many right now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Counts one more until the guard is dropped.
    pub fn register(self: &Arc<Counter>) -> Registration {
        self.0.fetch_add(1, Ordering::SeqCst);
        Registration(self.clone())
    }

    /// Counts one more, unless there are `cap` already.
    pub fn try_register(self: &Arc<Counter>, cap: usize) -> Option<Registration> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        Some(Registration(self.clone()))
    }
}

/// One counted thing; dropping it counts it out.
#[derive(Debug)]
pub struct Registration(Arc<Counter>);

impl Drop for Registration {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connections waiting for a thread, and the threads.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Stream>,
    /// Threads started and not yet ended.
    threads: usize,
    /// Threads waiting for a connection.
    idle: usize,
    /// No more connections come: idle threads end.
    closed: bool,
    /// Turn-away threads waiting on `freed`.
    hoping: usize,
}

impl Queue {
    fn has_free_thread(&self) -> bool {
        self.idle > self.waiting.len()
    }
}

struct Shared {
    queue: Mutex<Queue>,
    /// A connection is waiting for a thread.
    ready: Condvar,
    /// A thread is waiting for a connection (signalled only when someone
    /// hopes for one, to keep the common path free of wake-ups).
    freed: Condvar,
    relay: Arc<Relay>,
    limits: Limits,
    status: Arc<Status>,
    /// Connections being turned away right now.
    turning_away: Arc<Counter>,
}

/// The pool of connection threads.
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// An empty pool; threads start as connections come.
    pub fn new(relay: Arc<Relay>, limits: Limits, status: Arc<Status>) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                ready: Condvar::new(),
                freed: Condvar::new(),
                relay,
                limits,
                status,
                turning_away: Arc::new(Counter::default()),
            }),
        }
    }

    /// Hands a connection to a thread, starting one if all are busy and
    /// the cap allows, or to a thread that turns it away. Never waits on
    /// a peer.
    pub fn dispatch(&self, stream: Stream) {
        let shared = &self.shared;
        let mut queue = lock(&shared.queue);
        if queue.has_free_thread() {
            queue.waiting.push_back(stream);
            drop(queue);
            shared.ready.notify_one();
        } else if queue.threads < shared.limits.max_conns {
            queue.threads += 1;
            queue.waiting.push_back(stream);
            drop(queue);
            let worker = shared.clone();
            if let Err(e) = thread::Builder::new()
                .name("fcgi".into())
                .stack_size(STACK)
                .spawn(move || worker.work())
            {
                // Busy threads may not come free for long: turn it away.
                error!("cannot start a connection thread: {e}");
                let mut queue = lock(&shared.queue);
                queue.threads -= 1;
                let left = queue.waiting.pop_back();
                drop(queue);
                if let Some(stream) = left {
                    self.turn_away(stream);
                }
            }
        } else {
            drop(queue);
            self.turn_away(stream);
        }
    }

    /// Turns a connection over the cap away on a thread of its own, or,
    /// past [`Limits::max_turning_away`] of those, closes it unanswered.
    fn turn_away(&self, stream: Stream) {
        let shared = &self.shared;
        let Some(slot) = shared
            .turning_away
            .try_register(shared.limits.max_turning_away)
        else {
            warn!(
                "at the cap of {} connections and turning away as many as allowed: closing one unanswered",
                shared.limits.max_conns
            );
            return;
        };
        let shared = shared.clone();
        let spawned = thread::Builder::new()
            .name("turn-away".into())
            .stack_size(TURN_AWAY_STACK)
            .spawn(move || {
                let _slot = slot;
                shared.turn_away(stream);
            });
        if let Err(e) = spawned {
            warn!("cannot start a thread to turn a connection away, closing it: {e}");
        }
    }

    /// Serves every connection accepted before the stop, within `grace`:
    /// those still queued for a thread, those whose request is being read,
    /// and requests in the pipeline. A connection with no request a second
    /// after the last request ended is an idle keep-alive one, with nothing
    /// to lose (answers are written right after the pipeline returns).
    /// Under socket activation the connections not yet accepted stay in
    /// the manager's socket for the next process.
    pub fn finish(self, grace: Duration) {
        let shared = &self.shared;
        lock(&shared.queue).closed = true;
        shared.ready.notify_all();
        let started = Instant::now();
        let mut last_busy = started;
        loop {
            let queued = !lock(&shared.queue).waiting.is_empty();
            let in_flight = shared.status.in_flight();
            if queued || in_flight > 0 {
                last_busy = Instant::now();
            } else if shared.status.open_connections() == 0
                || last_busy.elapsed() >= Duration::from_secs(1)
            {
                return;
            }
            if started.elapsed() >= grace {
                warn!(
                    "{in_flight} requests still in flight after {} ms; exiting anyway",
                    grace.as_millis()
                );
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Shared {
    /// A connection thread: serves connections from the queue until the
    /// pool closes.
    fn work(&self) {
        let handler = |req: &crate::http::Request| self.status.handle(&self.relay, req);
        while let Some((mut stream, _open)) = self.next_connection() {
            if let Err(e) = fastcgi::serve_connection(&mut stream, &handler, &self.limits) {
                info!("FastCGI connection ended: {e}");
            }
        }
    }

    /// The next connection, counted as open before the queue's lock is let
    /// go: a stop that finds the queue empty then still sees it.
    fn next_connection(&self) -> Option<(Stream, Registration)> {
        let mut queue = lock(&self.queue);
        queue.idle += 1;
        if queue.hoping > 0 {
            self.freed.notify_all();
        }
        loop {
            if let Some(stream) = queue.waiting.pop_front() {
                queue.idle -= 1;
                return Some((stream, self.status.open.register()));
            }
            if queue.closed {
                queue.idle -= 1;
                queue.threads -= 1;
                return None;
            }
            queue = self.ready.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Queues a connection over the cap if a thread comes free within
    /// [`FREE_WAIT`]; otherwise answers it "overloaded" (a 503 page and
    /// `FCGI_OVERLOADED`), logged like every answer.
    fn turn_away(&self, mut stream: Stream) {
        let queue = lock(&self.queue);
        let mut queue = if queue.has_free_thread() {
            queue
        } else {
            let mut queue = queue;
            queue.hoping += 1;
            let (mut queue, _) = self
                .freed
                .wait_timeout_while(queue, FREE_WAIT, |q| !q.has_free_thread() && !q.closed)
                .unwrap_or_else(|p| p.into_inner());
            queue.hoping -= 1;
            queue
        };
        if queue.has_free_thread() && !queue.closed {
            queue.waiting.push_back(stream);
            drop(queue);
            self.ready.notify_one();
            return;
        }
        drop(queue);
        warn!(
            "at the cap of {} connections: turning one away",
            self.limits.max_conns
        );
        let deadline = Instant::now() + self.limits.turn_away_timeout;
        let _ = stream.set_write_timeout(self.limits.turn_away_timeout);
        let busy = || self.relay.overloaded().to_cgi_bytes(false);
        if let Ok(true) = fastcgi::reject_overloaded(&mut stream, busy, deadline) {
            linger(stream);
        }
    }
}

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

/// Takes a lock even if a thread panicked while holding it: what the
/// server locks (counters, a queue, the current connection) is always left
/// consistent.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::config::Config;
    use crate::fastcgi::{RecordType, Role, encode_record, parse_header};

    fn relay() -> Arc<Relay> {
        let mut config = Config::from_lookup(|_| None).unwrap();
        config.state_dir = None;
        Arc::new(Relay::new(config).unwrap())
    }

    fn begin_request(id: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let body = fastcgi::begin_request_body(Role::Responder.into(), false);
        encode_record(RecordType::BeginRequest, id, &body, &mut out);
        out
    }

    /// (type, id, content) of each record in `bytes`.
    fn records(mut bytes: &[u8]) -> Vec<(u8, u16, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((raw, rest)) = bytes.split_first_chunk::<8>() {
            let h = parse_header(raw).unwrap();
            let (content, rest) = rest.split_at(h.body_len());
            out.push((
                h.kind,
                h.request_id,
                content[..usize::from(h.content_length)].to_vec(),
            ));
            bytes = rest;
        }
        out
    }

    #[test]
    fn past_the_cap_connections_are_turned_away_each_on_its_own() {
        let limits = Limits {
            max_conns: 1,
            ..Limits::default()
        };
        let status = Arc::new(Status::default());
        let pool = Pool::new(relay(), limits, status.clone());
        // A silent connection takes the only thread, and another waits
        // past the cap without a word.
        let (_holder, held) = UnixStream::pair().unwrap();
        pool.dispatch(Stream::Unix(held));
        let (mut silent, quiet) = UnixStream::pair().unwrap();
        pool.dispatch(Stream::Unix(quiet));
        // A real request behind them is answered "overloaded" all the same.
        let (mut client, server_end) = UnixStream::pair().unwrap();
        pool.dispatch(Stream::Unix(server_end));
        client.write_all(&begin_request(7)).unwrap();
        // The rest of the request is never read, so the end may come as a
        // reset, after the answer.
        let mut answer = Vec::new();
        let _ = client.read_to_end(&mut answer);
        let recs = records(&answer);
        let stdout: Vec<u8> = recs
            .iter()
            .filter(|r| r.0 == RecordType::Stdout as u8)
            .flat_map(|r| r.2.clone())
            .collect();
        assert!(stdout.starts_with(b"Status: 503 "), "{recs:?}");
        let end = recs.last().unwrap();
        assert_eq!((end.0, end.1), (RecordType::EndRequest as u8, 7));
        assert_eq!(end.2[4], fastcgi::ProtocolStatus::Overloaded as u8);
        // The silent one is closed unanswered once its time is up.
        let mut rest = Vec::new();
        silent.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(status.in_flight(), 0);
        assert_eq!(status.served(), 0);
    }

    #[test]
    fn registrations_count_in_and_out() {
        let c = Arc::new(Counter::default());
        let a = c.register();
        let b = c.register();
        assert_eq!(c.get(), 2);
        drop(a);
        assert_eq!(c.get(), 1);
        drop(b);
        assert_eq!(c.get(), 0);
    }

    #[test]
    fn try_register_stops_at_the_cap() {
        let c = Arc::new(Counter::default());
        let a = c.try_register(2).unwrap();
        let _b = c.try_register(2).unwrap();
        assert!(c.try_register(2).is_none());
        drop(a);
        assert!(c.try_register(2).is_some());
        assert_eq!(c.get(), 1);
    }
}

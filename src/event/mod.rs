//! The `--listen` server (and the socket-activated one): every connection
//! on one thread, driven by an epoll event loop (mio).
//!
//! A thread per connection costs a stack and a scheduler slot per player
//! waiting on the bot; a sign-up burst of thousands at once waits almost
//! entirely on the bot, so one thread that keeps every connection's state
//! as data serves them all. Each connection is the FastCGI core's state
//! machine ([`Connection`]: bytes in, requests and answers out, deadlines
//! as data), a step of the pipeline ([`Relay::admit`], [`Relay::claim`],
//! [`Relay::conclude`]) and, while its code is with the bot, an
//! [`Exchange`]. Nothing here waits: each socket is read or written until
//! it would block, and the loop sleeps until a socket is ready or the
//! earliest deadline in [`Timers`] comes.
//!
//! Bounds: [`Limits::max_conns`] connections are served at once; past it,
//! up to [`Limits::max_turning_away`] more are answered "overloaded" (the
//! 503 page and `FCGI_OVERLOADED`), and any beyond wait in the kernel's
//! accept queue until a connection ends. A connection gets
//! [`STEP_TURNS`] moves per wake-up, so none can hold the loop.
//! Every connection has a deadline whatever it does: reading a request
//! (the FastCGI core's), the bot (its timeout), writing an answer
//! ([`Limits::write_timeout`]), and output a peer does not read stops
//! further reading past [`OUT_CAP`]. A connection's send buffer holds
//! only what its peer has not read yet: at most [`OUT_CAP`] plus the
//! answers to one read, that is one page (about 4 KiB, more only by the
//! bot's message) or, for management records, at most twice a read of
//! 16 KiB (an 8-byte record of an unknown type has a 16-byte
//! answer). With the buffers' spare room and the request being read,
//! peers that never read hold about 90 KiB each (2,000 of them took
//! 177 MiB), some 360 MiB at the default cap of
//! [`DEFAULT_MAX_CONNS`](crate::limits::DEFAULT_MAX_CONNS) connections,
//! and each for at most [`Limits::write_timeout`].
//!
//! A stop signal ends the accepting (under socket activation the
//! connections not yet accepted stay queued for the next process); the
//! requests in flight finish within [`Limits::stop_grace`], and
//! connections with nothing in flight for a second are closed.

pub mod exchange;
pub mod socket;
pub mod timer;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::bot::{BotError, BotReply};
use crate::fastcgi::{Connection, HEADER_LEN, Step, TurnAway, encode_overloaded, turn_away};
use crate::limits::Limits;
use crate::net::Listener;
use crate::relay::{Admission, Claimed, Relay, Signup};
use crate::replay::{BUSY_PAUSE, BUSY_PAUSE_MAX, Delivery, Ticket, Undelivered};
use crate::server::Status;
use crate::server::counter::Registration;
use crate::server::stop::{Signals, StopSignal};
use crate::{sys, systemd};
pub use exchange::{Exchange, Progress};
use socket::{BotDialer, Sock};
pub use timer::Timers;

/// How much one read takes from a web server's connection (one buffer
/// for the whole loop).
const READ_SIZE: usize = 16 * 1024;
/// Readiness events taken per wait.
const EVENTS: usize = 1024;
const LISTENER: Token = Token(usize::MAX);
const STOP: Token = Token(usize::MAX - 1);
/// The timer key of the pause after a failed accept.
const ACCEPT_KEY: usize = usize::MAX;
/// Answers a peer has not read yet, past which nothing more is read
/// from it (each management record it sends has an answer). Answers are
/// a few KiB, so this only keeps a peer that does not read from making
/// the relay hold much for it.
pub const OUT_CAP: usize = 32 * 1024;
/// How long a peer whose request was refused may go on sending, and how
/// much of it is read and dropped, before the close (closing with unread
/// input would reset a TCP connection and lose the answer).
const DRAIN_TIME: Duration = Duration::from_secs(1);
const DRAIN_BYTES: usize = 4 * 1024 * 1024;
/// How long a connection turned away is read after its answer, for the
/// same reason.
const LINGER: Duration = Duration::from_millis(100);
/// During a stop, a connection with nothing in flight for this long is
/// an idle keep-alive one, with nothing to lose.
const STOP_IDLE: Duration = Duration::from_secs(1);
/// The most memory all connections together may hold for requests they
/// are still sending (each one is bounded by the FastCGI limits, 64 KiB
/// of params; a web server sends a request whole, so this is reached only
/// by peers that send parts and wait).
const REQUEST_BYTES_BUDGET: usize = 32 << 20;
/// How often a warning a flood repeats may be logged.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How many moves a connection makes per wake-up (a read is at most
/// [`READ_SIZE`]) before the others get theirs.
const STEP_TURNS: usize = 64;
/// How often a stop looks whether it is done.
const STOP_CHECK: Duration = Duration::from_millis(20);
/// First pause after a failed accept; doubles up to a second.
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);

/// Gives a listener this process bound the deepest accept queue the
/// kernel allows (`net.core.somaxconn`): a web server opens a burst of
/// connections at once, and a TCP connection past a full queue is retried
/// only a second later. (A socket from the service manager keeps the
/// backlog its unit sets.)
pub fn deepen_backlog(listener: &Listener) {
    let deepened = match listener {
        Listener::Tcp(l) => sys::relisten(l, -1),
        Listener::Unix(l, _) => sys::relisten(l, -1),
    };
    if let Err(e) = deepened {
        warn!("cannot deepen the listener's accept queue: {e}");
    }
}

/// Raises this process's soft limit on open descriptors (up to the hard
/// limit) to what serving at `limits` may hold — a service starts with
/// 1024 — and lowers the connection cap, with a warning, when even the
/// hard limit is too low for it.
pub fn fit_descriptor_limit(limits: Limits) -> Limits {
    let wanted = limits.descriptors();
    let (soft, hard) = match sys::open_files_limit() {
        Ok(found) => found,
        Err(e) => {
            warn!("cannot read the limit on open files: {e}");
            return limits;
        }
    };
    let mut got = soft;
    if soft < wanted {
        match sys::set_open_files_limit(wanted) {
            Ok(()) => got = wanted.min(hard),
            Err(e) => warn!("cannot raise the limit on open files from {soft}: {e}"),
        }
    }
    let fitted = limits.within_descriptors(got);
    if fitted.max_conns < limits.max_conns {
        warn!(
            "the limit on open files is {got} (hard limit {hard}): serving up to {} connections, not {}",
            fitted.max_conns, limits.max_conns
        );
    }
    fitted
}

/// Serves `listener` on this thread until a stop signal, then lets what
/// is in flight finish within [`Limits::stop_grace`].
pub fn serve(
    relay: &Relay,
    listener: Listener,
    limits: &Limits,
    status: Arc<Status>,
) -> io::Result<()> {
    let stop = StopSignal::install(Signals::Service)?;
    let watcher = stop.watcher()?;
    watcher.set_nonblocking(true)?;
    // Edge-triggered: the listener is accepted from until it would block,
    // which a blocking one never says.
    match &listener {
        Listener::Tcp(l) => l.set_nonblocking(true)?,
        Listener::Unix(l, _) => l.set_nonblocking(true)?,
    }
    let poll = Poll::new()?;
    poll.registry().register(
        &mut SourceFd(&watcher.as_raw_fd()),
        STOP,
        Interest::READABLE,
    )?;
    poll.registry().register(
        &mut SourceFd(&listener.as_raw_fd()),
        LISTENER,
        Interest::READABLE,
    )?;
    let listening = listener.describe();
    info!(
        "listening on {listening} (up to {} connections)",
        limits.max_conns
    );
    let notify = systemd::notify_ready(&listening, &stop, status.clone());
    let mut event_loop = EventLoop {
        relay,
        limits: *limits,
        status: status.clone(),
        poll,
        timers: Timers::new(),
        conns: Vec::new(),
        free: Vec::new(),
        generation: 0,
        serving: 0,
        turning_away: 0,
        buf: vec![0; READ_SIZE],
        listener: Some(listener),
        accept_pause: ACCEPT_PAUSE,
        accept_paused: false,
        full: false,
        held: 0,
        cap_warning: Throttle::default(),
        full_warning: Throttle::default(),
        budget_warning: Throttle::default(),
    };
    let mut events = Events::with_capacity(EVENTS);
    let mut stopping: Option<Stopping> = None;
    loop {
        let now = Instant::now();
        let mut timeout = event_loop
            .timers
            .earliest()
            .map(|at| at.saturating_duration_since(now));
        if stopping.is_some() {
            timeout = Some(timeout.map_or(STOP_CHECK, |t| t.min(STOP_CHECK)));
        }
        match event_loop.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            // Taken afresh for each: a round may be long, and a deadline
            // must pass when its time comes, whatever else is ready.
            let now = Instant::now();
            match event.token() {
                LISTENER => event_loop.accept(now),
                STOP => {
                    let mut sink = [0u8; 64];
                    while matches!((&watcher).read(&mut sink), Ok(n) if n > 0) {}
                }
                token => {
                    let (slot, generation, bot) = from_token(token);
                    // An event fetched in this batch for a connection
                    // closed since then must not act on the one now in its
                    // slot (a stale end of the bot's reply would cut the
                    // new one's short).
                    if !event_loop.current(slot, generation) {
                        continue;
                    }
                    // A bot socket that only became writable (its connect
                    // done, with the message already out) has nothing to
                    // read.
                    if bot
                        && !(event.is_readable() || event.is_read_closed() || event.is_error())
                        && !event_loop.sending_to_bot(slot)
                    {
                        continue;
                    }
                    if bot && event.is_read_closed() {
                        event_loop.bot_ended(slot);
                    }
                    event_loop.drive(slot, now);
                }
            }
        }
        let now = Instant::now();
        for key in event_loop.timers.due(now) {
            if key == ACCEPT_KEY {
                event_loop.accept_paused = false;
                event_loop.accept(now);
            } else {
                event_loop.drive(key, now);
            }
        }
        if stopping.is_none() && stop.requested() {
            status.begin_stopping();
            notify.stopping();
            info!("stop requested: no new connections; finishing requests in flight");
            event_loop.stop_accepting();
            stopping = Some(Stopping {
                since: now,
                last_busy: now,
            });
        }
        if let Some(s) = &mut stopping {
            if event_loop.busy() {
                s.last_busy = now;
            } else if event_loop.open() == 0 || now - s.last_busy >= STOP_IDLE {
                break;
            }
            if now - s.since >= limits.stop_grace {
                warn!(
                    "{} requests still in flight and {} connections still being written to after {} ms; exiting anyway",
                    status.in_flight(),
                    event_loop.writing(),
                    limits.stop_grace.as_millis()
                );
                break;
            }
        }
    }
    info!("stopped");
    Ok(())
}

/// A stop under way.
struct Stopping {
    since: Instant,
    /// When something was last in flight.
    last_busy: Instant,
}

/// Bits of a connection's token for its generation: which of the
/// connections that have had its slot it is. The lowest bit says which
/// of its two sockets, the bits between hold its slot.
const GENERATION_BITS: u32 = usize::BITS / 4;
/// Generations go round below the highest, so that no connection's token
/// is [`LISTENER`] or [`STOP`]. A stale event could name a new connection
/// only if this many were taken in while one batch of events was handled.
const GENERATIONS: usize = (1 << GENERATION_BITS) - 1;
const SLOT_BITS: u32 = usize::BITS - 1 - GENERATION_BITS;

fn token(slot: usize, generation: usize, bot: bool) -> Token {
    Token(generation << (SLOT_BITS + 1) | slot << 1 | usize::from(bot))
}

fn peer_token(slot: usize, generation: usize) -> Token {
    token(slot, generation, false)
}

fn bot_token(slot: usize, generation: usize) -> Token {
    token(slot, generation, true)
}

/// A connection's slot, generation, and whether the token is its bot
/// socket's.
fn from_token(Token(t): Token) -> (usize, usize, bool) {
    (
        (t >> 1) & ((1 << SLOT_BITS) - 1),
        t >> (SLOT_BITS + 1),
        t & 1 == 1,
    )
}

struct EventLoop<'a> {
    relay: &'a Relay,
    limits: Limits,
    status: Arc<Status>,
    poll: Poll,
    timers: Timers,
    /// The connections, by slot; a connection's tokens are [`peer_token`]
    /// and [`bot_token`], its timer key its slot (cancelled when it
    /// closes).
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// The generation the next connection gets.
    generation: usize,
    serving: usize,
    turning_away: usize,
    buf: Vec<u8>,
    /// `None` once a stop began.
    listener: Option<Listener>,
    accept_pause: Duration,
    accept_paused: bool,
    /// Both caps reached: accepting waits for a connection to end.
    full: bool,
    /// What the connections' FastCGI cores hold, in bytes.
    held: usize,
    cap_warning: Throttle,
    full_warning: Throttle,
    budget_warning: Throttle,
}

/// At most one log line per [`WARN_EVERY`] for a condition a flood can
/// repeat thousands of times a second, with a count of the others.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    since: u64,
}

impl Throttle {
    /// When a line may go out, what to add to it: how many times it was
    /// held back since the last one, if any.
    fn allow(&mut self, now: Instant) -> Option<String> {
        if self.last.is_some_and(|last| now < last + WARN_EVERY) {
            self.since += 1;
            return None;
        }
        self.last = Some(now);
        Some(match std::mem::take(&mut self.since) {
            0 => String::new(),
            n => format!(" ({n} more since the last such line)"),
        })
    }
}

/// One web server connection.
struct Conn {
    sock: Sock,
    /// Part of its tokens, told apart from those of the connections that
    /// had its slot before.
    generation: usize,
    fcgi: Connection,
    /// Answers to send, from `sent` on.
    out: Vec<u8>,
    sent: usize,
    /// While output waits for the peer: when it must be gone.
    write_by: Option<Instant>,
    phase: Phase,
    /// Counted among those served, not those being turned away.
    served: bool,
    /// What its FastCGI core held when last looked at, counted in
    /// [`EventLoop::held`].
    held: usize,
    /// Registered with the poll (from the first time it would block).
    watched: bool,
    /// A read or write on it would have blocked in this step.
    blocked: bool,
}

/// Where a connection is.
enum Phase {
    /// The FastCGI core reads requests and sends answers.
    Serving,
    /// A sign-up waits for its code's entry in the replay store.
    Claiming(Box<Claiming>),
    /// A sign-up's code is with the bot.
    Exchanging(Box<Exchanging>),
    /// The rest of the output goes out, then the connection closes.
    Closing,
    /// A refused request's peer is read and dropped until it closes.
    Draining { until: Instant, left: usize },
    /// Over the cap: the first record header decides the answer.
    TurningAway {
        by: Instant,
        first: [u8; HEADER_LEN],
        got: usize,
    },
    /// Turned away and answered: the peer's rest is read and dropped.
    Lingering { until: Instant, shut: bool },
}

struct Claiming {
    signup: Signup,
    _in_flight: Registration,
    deadline: Instant,
    pause: Duration,
}

struct Exchanging {
    signup: Signup,
    _in_flight: Registration,
    ticket: Option<Ticket>,
    exchange: Exchange<Sock>,
}

/// What a connection does after one move.
enum Next {
    Again,
    Wait(Instant),
    Close,
}

impl EventLoop<'_> {
    fn open(&self) -> usize {
        self.serving + self.turning_away
    }

    /// Whether anything is in flight: a request in the pipeline, or an
    /// answer still being written.
    fn busy(&self) -> bool {
        self.status.in_flight() > 0 || self.writing() > 0
    }

    /// Connections with an answer not yet all written.
    fn writing(&self) -> usize {
        self.conns
            .iter()
            .flatten()
            .filter(|c| c.sent < c.out.len() && !matches!(c.phase, Phase::Lingering { .. }))
            .count()
    }

    /// Whether the connection in `slot` is of `generation`.
    fn current(&self, slot: usize, generation: usize) -> bool {
        matches!(self.conns.get(slot), Some(Some(c)) if c.generation == generation)
    }

    /// Tells connection `slot`'s exchange that the bot shut its side.
    fn bot_ended(&mut self, slot: usize) {
        if let Some(Some(Conn {
            phase: Phase::Exchanging(x),
            ..
        })) = self.conns.get_mut(slot)
        {
            x.exchange.bot_ended();
        }
    }

    /// Whether connection `slot`'s exchange with the bot is still sending.
    fn sending_to_bot(&self, slot: usize) -> bool {
        match self.conns.get(slot) {
            Some(Some(Conn {
                phase: Phase::Exchanging(x),
                ..
            })) => x.exchange.sending(),
            _ => false,
        }
    }

    fn stop_accepting(&mut self) {
        if let Some(listener) = self.listener.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&listener.as_raw_fd()));
        }
        self.timers.cancel(ACCEPT_KEY);
    }

    /// Accepts every queued connection, as long as there is room: past
    /// both caps the rest wait in the kernel's accept queue (deep, see
    /// [`deepen_backlog`]) until a connection ends, instead of being
    /// closed unanswered.
    fn accept(&mut self, now: Instant) {
        while !self.accept_paused {
            let Some(listener) = &self.listener else {
                return;
            };
            if self.serving >= self.limits.max_conns
                && self.turning_away >= self.limits.max_turning_away
            {
                if !self.full
                    && let Some(more) = self.full_warning.allow(now)
                {
                    warn!(
                        "at the cap of {} connections and turning away as many as allowed: \
                         new connections wait in the listener's queue{more}",
                        self.limits.max_conns
                    );
                }
                self.full = true;
                return;
            }
            match socket::accept(listener) {
                Ok(sock) => {
                    self.accept_pause = ACCEPT_PAUSE;
                    self.admit(sock, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A client gone before it was accepted.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                // Failures that pass (out of descriptors for a moment):
                // the growing pause keeps a lasting one from spinning a
                // core or flooding the log.
                Err(e) => {
                    warn!(
                        "accept failed, trying again in {} ms: {e}",
                        self.accept_pause.as_millis()
                    );
                    self.timers.set(ACCEPT_KEY, now + self.accept_pause);
                    self.accept_paused = true;
                    self.accept_pause = (self.accept_pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Takes a new connection in: served, or turned away ([`Self::accept`]
    /// takes none past both caps).
    fn admit(&mut self, sock: Sock, now: Instant) {
        let (phase, served) = if self.serving < self.limits.max_conns {
            self.serving += 1;
            (Phase::Serving, true)
        } else {
            debug_assert!(self.turning_away < self.limits.max_turning_away);
            // Once per spell of overload, not once per connection: a flood
            // must not flood the log too (each answer is logged anyway).
            if self.turning_away == 0
                && let Some(more) = self.cap_warning.allow(now)
            {
                warn!(
                    "at the cap of {} connections: turning new ones away{more}",
                    self.limits.max_conns
                );
            }
            self.turning_away += 1;
            let by = now + self.limits.turn_away_timeout;
            (
                Phase::TurningAway {
                    by,
                    first: [0; HEADER_LEN],
                    got: 0,
                },
                false,
            )
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        // Its request is usually there already, and its answer usually
        // fits the socket's buffer: it is read at once (the timer brings it
        // round in this same turn of the loop), and watched by the poll
        // only once a read or a write on it would block.
        let generation = self.generation;
        self.generation = (generation + 1) % GENERATIONS;
        self.conns[slot] = Some(Conn {
            sock,
            generation,
            fcgi: Connection::new(self.limits, now),
            out: Vec::new(),
            sent: 0,
            write_by: None,
            phase,
            served,
            held: 0,
            watched: false,
            blocked: false,
        });
        self.timers.set(slot, now);
    }

    fn uncount(&mut self, served: bool) {
        if served {
            self.serving -= 1;
        } else {
            self.turning_away -= 1;
        }
    }

    /// Moves connection `slot` as far as it goes at `now`.
    fn drive(&mut self, slot: usize, now: Instant) {
        let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let mut wake = self.step(&mut conn, slot, now);
        if wake.is_some() && conn.blocked && !conn.watched {
            match conn.sock.register(
                self.poll.registry(),
                peer_token(slot, conn.generation),
                socket::BOTH,
            ) {
                Ok(()) => conn.watched = true,
                Err(e) => {
                    warn!("cannot watch a connection, closing it: {e}");
                    wake = None;
                }
            }
        }
        conn.blocked = false;
        let held = conn.fcgi.held();
        self.held = self.held - conn.held + held;
        conn.held = held;
        match wake {
            Some(wake) => {
                self.timers.set(slot, wake);
                self.conns[slot] = Some(conn);
            }
            None => self.close(slot, conn, now),
        }
        // Each connection's request is bounded by the FastCGI limits, but
        // thousands of peers each sending most of one and then nothing
        // would add up: past the budget, the connections holding the most
        // go first. A web server sends a request whole and small, so those
        // are the ones sending parts and waiting.
        while self.held > REQUEST_BYTES_BUDGET {
            let Some(largest) = self.largest_holder() else {
                break;
            };
            let Some(conn) = self.conns[largest].take() else {
                break;
            };
            if let Some(dropped) = self.budget_warning.allow(now) {
                warn!(
                    "requests being received hold over {} MiB: closing the connections that hold \
                     the most{dropped}",
                    REQUEST_BYTES_BUDGET >> 20
                );
            }
            self.close(largest, conn, now);
        }
    }

    /// The connection holding the most for a request it is still sending.
    /// One whose code is with the store or the bot, or whose answer is
    /// being written out, is never let go for this: its player's answer
    /// would be lost. An answer still unread while its peer sends the next
    /// request does not protect it: a web server reads an answer whole
    /// before it sends the next request on a connection, so only a peer
    /// holding bytes on purpose does both.
    fn largest_holder(&self) -> Option<usize> {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| {
                c.held > 0
                    && !matches!(
                        c.phase,
                        Phase::Claiming(..) | Phase::Exchanging(..) | Phase::Closing
                    )
            })
            .max_by_key(|(_, c)| c.held)
            .map(|(i, _)| i)
    }

    /// Lets connection `slot` go.
    fn close(&mut self, slot: usize, conn: Conn, now: Instant) {
        self.held -= conn.held;
        self.timers.cancel(slot);
        self.uncount(conn.served);
        self.free.push(slot);
        // Dropped here: its sockets close (and leave the poll); a ticket
        // still held leaves its intent behind.
        drop(conn);
        // Room again: the queue sends no new readiness for the
        // connections already waiting in it.
        if self.full {
            self.full = false;
            self.accept(now);
        }
    }

    /// Sends what waits, then moves the phase on until something would
    /// block: the time to be woken at the latest, or `None` to close.
    fn step(&mut self, conn: &mut Conn, slot: usize, now: Instant) -> Option<Instant> {
        for _ in 0..STEP_TURNS {
            if conn.sent < conn.out.len() {
                match conn.sock.write(&conn.out[conn.sent..]) {
                    Ok(0) => return None,
                    Ok(n) => {
                        conn.sent += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.blocked = true;
                        let by = *conn.write_by.get_or_insert(now + self.limits.write_timeout);
                        if now >= by {
                            info!("FastCGI connection ended: the peer read no answer in time");
                            return None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        info!("FastCGI connection ended: {e}");
                        return None;
                    }
                }
            } else if conn.sent > 0 {
                // Sent whole: the buffer goes, so an idle keep-alive
                // connection holds none.
                conn.out = Vec::new();
                conn.sent = 0;
                conn.write_by = None;
            }
            match self.advance(conn, slot, now) {
                Next::Again => {}
                Next::Wait(at) => return Some(conn.write_by.map_or(at, |w| w.min(at))),
                Next::Close => return None,
            }
        }
        // A peer that keeps sending and reading as fast as it can never
        // makes a socket block: it gets its turns and goes to the back of
        // the line (the timer at once brings it back after the others).
        Some(now)
    }

    /// One move of the connection's phase.
    fn advance(&mut self, conn: &mut Conn, slot: usize, now: Instant) -> Next {
        let pending = conn.out.len() - conn.sent;
        match std::mem::replace(&mut conn.phase, Phase::Closing) {
            Phase::Serving => {
                conn.phase = Phase::Serving;
                if pending > OUT_CAP {
                    return Next::Wait(conn.write_by.unwrap_or(now));
                }
                let step = conn.fcgi.next(now);
                let answered = take_output(conn);
                match step {
                    // Answers to management records go out before the wait.
                    Step::Read { .. } if answered => Next::Again,
                    Step::Read { deadline } => match conn.sock.read(&mut self.buf) {
                        Ok(n) => {
                            conn.fcgi.feed(&self.buf[..n], now);
                            Next::Again
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            conn.blocked = true;
                            Next::Wait(deadline)
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => Next::Again,
                        Err(e) => {
                            info!("FastCGI connection ended: {e}");
                            Next::Close
                        }
                    },
                    Step::Request(request) => {
                        match self.relay.admit(&request) {
                            Admission::Answered(response) => {
                                self.status.request_answered();
                                let cgi = response.to_cgi_bytes(request.is_head());
                                conn.fcgi.respond(&cgi, now);
                                take_output(conn);
                            }
                            Admission::Signup(signup) => {
                                conn.phase = Phase::Claiming(Box::new(Claiming {
                                    signup,
                                    _in_flight: self.status.request_began(),
                                    deadline: now + self.relay.config().bot_timeout,
                                    pause: BUSY_PAUSE,
                                }));
                            }
                        }
                        Next::Again
                    }
                    Step::Close(end) => {
                        if let Err(e) = end {
                            info!("FastCGI connection ended: {e}");
                        }
                        conn.phase = if conn.fcgi.ended_unread() {
                            Phase::Draining {
                                until: now + DRAIN_TIME,
                                left: DRAIN_BYTES,
                            }
                        } else {
                            Phase::Closing
                        };
                        Next::Again
                    }
                }
            }
            Phase::Claiming(mut claiming) => match self.relay.claim(&claiming.signup) {
                Claimed::Done(result) => {
                    self.conclude(conn, claiming.signup, result, now);
                    Next::Again
                }
                Claimed::Deliver(ticket) => {
                    let config = self.relay.config();
                    let Claiming {
                        signup, _in_flight, ..
                    } = *claiming;
                    let exchange = Exchange::new(
                        config.wire,
                        self.relay.message(&signup),
                        now,
                        config.bot_retry,
                        config.bot_timeout,
                    );
                    conn.phase = Phase::Exchanging(Box::new(Exchanging {
                        signup,
                        _in_flight,
                        ticket,
                        exchange,
                    }));
                    Next::Again
                }
                Claimed::Busy(busy) => {
                    if now >= claiming.deadline {
                        self.conclude(conn, claiming.signup, Err(busy.given_up()), now);
                        return Next::Again;
                    }
                    let at = (now + claiming.pause).min(claiming.deadline);
                    claiming.pause = (claiming.pause * 2).min(BUSY_PAUSE_MAX);
                    conn.phase = Phase::Claiming(claiming);
                    Next::Wait(at)
                }
            },
            Phase::Exchanging(mut exchanging) => {
                let mut dialer = BotDialer {
                    addr: &self.relay.config().bot_addr,
                    registry: self.poll.registry(),
                    token: bot_token(slot, conn.generation),
                };
                match exchanging.exchange.advance(now, &mut dialer) {
                    Progress::Wait(at) => {
                        conn.phase = Phase::Exchanging(exchanging);
                        Next::Wait(at)
                    }
                    Progress::Done(result) => {
                        let Exchanging { signup, ticket, .. } = *exchanging;
                        if let Some(ticket) = ticket {
                            ticket.finish(&result);
                        }
                        self.conclude(conn, signup, first(result), now);
                        Next::Again
                    }
                }
            }
            Phase::Closing => {
                if pending > 0 {
                    return Next::Wait(conn.write_by.unwrap_or(now));
                }
                Next::Close
            }
            Phase::Draining { until, left } => {
                if pending > 0 {
                    conn.phase = Phase::Draining { until, left };
                    return Next::Wait(conn.write_by.unwrap_or(now));
                }
                match conn.sock.read(&mut self.buf) {
                    Ok(0) => Next::Close,
                    Ok(n) if n >= left => Next::Close,
                    Ok(n) => {
                        conn.phase = Phase::Draining {
                            until,
                            left: left - n,
                        };
                        Next::Again
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && now < until => {
                        conn.blocked = true;
                        conn.phase = Phase::Draining { until, left };
                        Next::Wait(until)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        conn.phase = Phase::Draining { until, left };
                        Next::Again
                    }
                    Err(_) => Next::Close,
                }
            }
            Phase::TurningAway {
                by,
                mut first,
                mut got,
            } => match turn_away(&first[..got]) {
                TurnAway::NeedMore => match conn.sock.read(&mut first[got..]) {
                    Ok(0) => Next::Close,
                    Ok(n) => {
                        got += n;
                        conn.phase = Phase::TurningAway { by, first, got };
                        Next::Again
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && now < by => {
                        conn.blocked = true;
                        conn.phase = Phase::TurningAway { by, first, got };
                        Next::Wait(by)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        conn.phase = Phase::TurningAway { by, first, got };
                        Next::Again
                    }
                    Err(_) => Next::Close,
                },
                TurnAway::Answer(id) => {
                    let busy = self.relay.overloaded().to_cgi_bytes(false);
                    encode_overloaded(id, &busy, &mut conn.out);
                    conn.phase = Phase::Lingering {
                        until: now + self.limits.turn_away_timeout.min(LINGER),
                        shut: false,
                    };
                    Next::Again
                }
                TurnAway::Ignore => Next::Close,
            },
            Phase::Lingering { until, shut } => {
                if pending > 0 {
                    conn.phase = Phase::Lingering { until, shut };
                    return Next::Wait(conn.write_by.unwrap_or(now));
                }
                // The answer may go out before the peer has sent its whole
                // request (it is answered on the first record's header):
                // closing now would reset a TCP connection, and a web server
                // still writing to a Unix socket would fail on a broken pipe
                // and show its own error instead of the answer. So the rest
                // is read and dropped until the peer ends, for a moment.
                if !shut && conn.sock.shutdown_write().is_err() {
                    return Next::Close;
                }
                conn.phase = Phase::Lingering { until, shut: true };
                match conn.sock.read(&mut self.buf) {
                    // Only until the moment is over, whatever is read: a
                    // peer that always has more ready must not keep its
                    // turning-away place.
                    Ok(n) if n > 0 && now < until => Next::Again,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && now < until => {
                        conn.blocked = true;
                        Next::Wait(until)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => Next::Again,
                    _ => Next::Close,
                }
            }
        }
    }

    /// Answers a sign-up and goes back to serving the connection.
    fn conclude(
        &self,
        conn: &mut Conn,
        signup: Signup,
        result: Result<(BotReply, Delivery), Undelivered>,
        now: Instant,
    ) {
        let response = self.relay.conclude(signup, result);
        self.status.request_answered();
        conn.fcgi.respond(&response.to_cgi_bytes(false), now);
        take_output(conn);
        conn.phase = Phase::Serving;
    }
}

/// The bot's answer as this request's own delivery.
fn first(result: Result<BotReply, BotError>) -> Result<(BotReply, Delivery), Undelivered> {
    result
        .map(|reply| (reply, Delivery::First))
        .map_err(Undelivered::Bot)
}

/// Moves the FastCGI core's output to the connection's send buffer;
/// whether there was any. What was already sent goes first, so the buffer
/// holds only what the peer has not read: a peer that always leaves some
/// unread, but reads on, would otherwise keep every answer it was ever
/// sent.
fn take_output(conn: &mut Conn) -> bool {
    if conn.fcgi.output().is_empty() {
        return false;
    }
    if conn.sent > 0 {
        conn.out.drain(..conn.sent);
        conn.sent = 0;
    }
    let output = conn.fcgi.take_output();
    if conn.out.is_empty() {
        conn.out = output;
    } else {
        conn.out.extend_from_slice(&output);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A served connection over one end of a socket pair.
    fn conn(now: Instant) -> Conn {
        let (ours, _theirs) = mio::net::UnixStream::pair().unwrap();
        Conn {
            sock: Sock::Unix(ours),
            generation: 0,
            fcgi: Connection::new(Limits::default(), now),
            out: Vec::new(),
            sent: 0,
            write_by: None,
            phase: Phase::Serving,
            served: false,
            held: 0,
            watched: false,
            blocked: false,
        }
    }

    #[test]
    fn the_send_buffer_keeps_only_what_is_not_sent() {
        let now = Instant::now();
        let mut conn = conn(now);
        // Answers partly sent: the peer reads, but never all of it.
        conn.out = vec![1; 3000];
        conn.sent = 2000;
        // A management record of a type the core does not know: its
        // answer is 16 bytes.
        conn.fcgi.feed(&[1, 99, 0, 0, 0, 0, 0, 0], now);
        assert!(matches!(conn.fcgi.next(now), Step::Read { .. }));
        assert!(take_output(&mut conn));
        assert_eq!(conn.sent, 0);
        assert_eq!(conn.out.len(), 1000 + 16);
        assert_eq!(conn.out[..1000], [1; 1000]);
        assert_eq!(conn.out[1000..1002], [1, 11]);
        assert!(conn.fcgi.output().is_empty());
        // Nothing new: nothing moves.
        conn.sent = 500;
        assert!(!take_output(&mut conn));
        assert_eq!((conn.sent, conn.out.len()), (500, 1016));
    }

    #[test]
    fn a_token_names_its_connection_and_no_other() {
        let slots = [0, 1, 4095, 1 << 20];
        let generations = [0, 1, GENERATIONS - 1];
        let mut seen = std::collections::HashSet::new();
        for slot in slots {
            for generation in generations {
                for bot in [false, true] {
                    let t = token(slot, generation, bot);
                    assert_eq!(from_token(t), (slot, generation, bot));
                    assert!(t != LISTENER && t != STOP, "{t:?}");
                    assert!(seen.insert(t), "{t:?} twice");
                }
            }
        }
        assert_eq!(peer_token(7, 3), token(7, 3, false));
        assert_eq!(bot_token(7, 3), token(7, 3, true));
    }
}

//! The exchange with the bot as a state machine, for the event loop:
//! connect (without blocking; refusals retried within the retry window,
//! as [`crate::bot::exchange`] does), send the message, half-close, read
//! the reply to its end, at most [`MAX_REPLY`] bytes — all by one
//! deadline. It is driven by [`Exchange::advance`] whenever its socket may
//! have moved or its wake-up time came, and never waits itself: every
//! call does what it can without blocking and says when to call again.
//!
//! The sockets come from a [`Dialer`], so the whole machine runs in tests
//! against scripted sockets.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::bot::{
    self, BotError, BotReply, MAX_REPLY, REFUSED_PAUSE, REFUSED_PAUSE_MAX, io_error, retryable,
};
use crate::config::Wire;

/// A Unix socket whose listener's backlog is full refuses to queue
/// (EAGAIN) instead of waiting as a TCP one does: the connect is tried
/// again after a pause that grows from this to [`FULL_PAUSE_MAX`].
const FULL_PAUSE: Duration = Duration::from_millis(2);
const FULL_PAUSE_MAX: Duration = Duration::from_millis(20);
/// The reply buffer's first size; it doubles as the reply grows.
const REPLY_START: usize = 512;

/// A non-blocking connection to the bot. Until its connect is done a
/// write would block; a connect that failed shows as the first write's
/// error (no system call is spent asking in between).
pub trait BotSocket: Read + Write {
    /// Ends the sending side: the bot reads end of stream.
    fn shutdown_write(&mut self) -> io::Result<()>;
}

/// Opens connections to the bot's addresses without waiting.
pub trait Dialer {
    /// The socket type it opens.
    type Socket: BotSocket;
    /// How many addresses the bot has (a host name may resolve to several).
    fn targets(&self) -> usize;
    /// Begins a connection to address `target` (below [`Dialer::targets`]),
    /// watched for readability only: a message of a few hundred bytes
    /// nearly always goes out at once.
    fn dial(&mut self, target: usize) -> io::Result<Self::Socket>;
    /// Watches `socket` for writability too, once a write would block.
    fn watch_writable(&mut self, socket: &mut Self::Socket) -> io::Result<()>;
}

/// What the driver does after [`Exchange::advance`].
#[derive(Debug)]
pub enum Progress {
    /// Call again when the socket is ready, or at this time at the latest.
    Wait(Instant),
    /// The exchange is over.
    Done(Result<BotReply, BotError>),
}

enum Phase<S> {
    /// About to open a connection to `target`.
    Dial,
    /// Waiting before the next attempt (a refusal, or a full backlog).
    Pause(Instant),
    /// Connecting: nothing written yet, so a write's error is the
    /// connect's.
    Connecting(S),
    Sending(S, usize),
    Receiving(S),
    Over,
}

/// One code's exchange with the bot.
pub struct Exchange<S> {
    wire: Wire,
    message: Vec<u8>,
    deadline: Instant,
    retry_until: Instant,
    refused_pause: Duration,
    full_pause: Duration,
    target: usize,
    phase: Phase<S>,
    reply: Vec<u8>,
    /// The bot has shut its side of the current socket (the poll said
    /// so): a read that drains the socket then has the whole reply, and
    /// the read of the end of stream is not needed.
    ended: bool,
    /// The current socket is watched for writability.
    watching_writable: bool,
}

impl<S: BotSocket> Exchange<S> {
    /// An exchange of `message` that began at `now`: refusals are retried
    /// until `now + retry`, and everything is over by `now + timeout`.
    pub fn new(
        wire: Wire,
        message: Vec<u8>,
        now: Instant,
        retry: Duration,
        timeout: Duration,
    ) -> Exchange<S> {
        Exchange {
            wire,
            message,
            deadline: now + timeout,
            retry_until: now + retry,
            refused_pause: REFUSED_PAUSE,
            full_pause: FULL_PAUSE,
            target: 0,
            phase: Phase::Dial,
            reply: Vec::new(),
            ended: false,
            watching_writable: false,
        }
    }

    /// The poll says the bot has shut its side of the current socket.
    pub fn bot_ended(&mut self) {
        self.ended = true;
    }

    /// Whether it is still connecting or sending: only then does its
    /// socket becoming writable matter.
    pub fn sending(&self) -> bool {
        matches!(
            self.phase,
            Phase::Dial | Phase::Pause(_) | Phase::Connecting(_) | Phase::Sending(..)
        )
    }

    /// Does all that can be done at `now` without blocking.
    pub fn advance<D: Dialer<Socket = S>>(&mut self, now: Instant, dialer: &mut D) -> Progress {
        loop {
            if matches!(self.phase, Phase::Over) {
                return Progress::Done(Err(BotError::Timeout));
            }
            if now >= self.deadline {
                // Before a byte of the message has left, the code is still
                // the player's to send again: not sent, not a timeout.
                let err = match self.phase {
                    Phase::Dial | Phase::Pause(_) | Phase::Connecting(_) => {
                        BotError::Unavailable(bot::not_connected())
                    }
                    _ => BotError::Timeout,
                };
                return self.end(Err(err));
            }
            match std::mem::replace(&mut self.phase, Phase::Over) {
                Phase::Over => {}
                Phase::Pause(until) if now < until => {
                    self.phase = Phase::Pause(until);
                    return Progress::Wait(until.min(self.deadline));
                }
                Phase::Pause(_) | Phase::Dial => match dialer.dial(self.target) {
                    Ok(socket) => {
                        self.watching_writable = false;
                        self.ended = false;
                        self.phase = Phase::Connecting(socket);
                    }
                    Err(e) => {
                        if let Some(done) = self.failed_connect(e, now, dialer.targets()) {
                            return done;
                        }
                    }
                },
                Phase::Connecting(mut socket) => match socket.write(&self.message) {
                    Ok(0) => return self.end(Err(BotError::Closed)),
                    Ok(n) => {
                        self.full_pause = FULL_PAUSE;
                        self.phase = Phase::Sending(socket, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = self.watch_writable(&mut socket, dialer) {
                            // Nothing was sent.
                            return self.end(Err(BotError::Unavailable(e)));
                        }
                        self.phase = Phase::Connecting(socket);
                        return Progress::Wait(self.deadline);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        self.phase = Phase::Connecting(socket);
                    }
                    // Refused, reset, or the bot gone before a byte left:
                    // the code was not sent.
                    Err(e) => {
                        if let Some(done) = self.failed_connect(e, now, dialer.targets()) {
                            return done;
                        }
                    }
                },
                Phase::Sending(mut socket, sent) => {
                    if sent == self.message.len() {
                        // The bot reads to EOF: the half-close makes it answer.
                        if let Err(e) = socket.shutdown_write() {
                            return self.end(Err(io_error(e)));
                        }
                        self.reply = Vec::new();
                        self.phase = Phase::Receiving(socket);
                        // Nothing can be there yet: the bot answers after
                        // the end of the message, and its socket says when.
                        return Progress::Wait(self.deadline);
                    }
                    match socket.write(&self.message[sent..]) {
                        Ok(0) => return self.end(Err(BotError::Closed)),
                        Ok(n) => self.phase = Phase::Sending(socket, sent + n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if let Err(e) = self.watch_writable(&mut socket, dialer) {
                                return self.end(Err(io_error(e)));
                            }
                            self.phase = Phase::Sending(socket, sent);
                            return Progress::Wait(self.deadline);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                            self.phase = Phase::Sending(socket, sent);
                        }
                        Err(e) => return self.end(Err(io_error(e))),
                    }
                }
                Phase::Receiving(mut socket) => {
                    // Grown by doubling, to one byte past the cap at most:
                    // that byte is how an over-long reply shows.
                    let len = self.reply.len();
                    let more = len.max(REPLY_START).min(MAX_REPLY + 1 - len);
                    self.reply.resize(len + more, 0);
                    let got = socket.read(&mut self.reply[len..]);
                    self.reply.truncate(len + got.as_ref().map_or(0, |n| *n));
                    match got {
                        Ok(0) => {
                            let reply = std::mem::take(&mut self.reply);
                            return self.end(bot::decode(self.wire, &reply));
                        }
                        Ok(_) if self.reply.len() > MAX_REPLY => {
                            return self.end(Err(BotError::TooLarge));
                        }
                        // Less than there was room for, after the bot's end.
                        Ok(n) if self.ended && n < more => {
                            let reply = std::mem::take(&mut self.reply);
                            return self.end(bot::decode(self.wire, &reply));
                        }
                        Ok(_) => self.phase = Phase::Receiving(socket),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.phase = Phase::Receiving(socket);
                            return Progress::Wait(self.deadline);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                            self.phase = Phase::Receiving(socket);
                        }
                        Err(e) => return self.end(Err(io_error(e))),
                    }
                }
            }
        }
    }

    /// Has the dialer watch the socket for writability, once per socket.
    fn watch_writable<D: Dialer<Socket = S>>(
        &mut self,
        socket: &mut S,
        dialer: &mut D,
    ) -> io::Result<()> {
        if !self.watching_writable {
            dialer.watch_writable(socket)?;
            self.watching_writable = true;
        }
        Ok(())
    }

    /// After a connect to the current target failed: the next address at
    /// once, or, past the last, a pause and the first again while the
    /// retry window lasts. `Some` when the exchange is over.
    fn failed_connect(&mut self, e: io::Error, now: Instant, targets: usize) -> Option<Progress> {
        if e.kind() == io::ErrorKind::WouldBlock {
            // The bot's backlog is full: a wait, bounded by the deadline.
            self.phase = Phase::Pause(now + self.full_pause);
            self.full_pause = (self.full_pause * 2).min(FULL_PAUSE_MAX);
            return None;
        }
        if e.kind() == io::ErrorKind::TimedOut {
            // The kernel gave up on the handshake: nothing was sent.
            return Some(self.end(Err(BotError::Unavailable(e))));
        }
        if self.target + 1 < targets {
            self.target += 1;
            self.phase = Phase::Dial;
            return None;
        }
        self.target = 0;
        let pause = self.refused_pause;
        if !retryable(&e) || now + pause > self.retry_until || now + pause >= self.deadline {
            return Some(self.end(Err(BotError::Unavailable(e))));
        }
        self.refused_pause = (pause * 2).min(REFUSED_PAUSE_MAX);
        self.phase = Phase::Pause(now + pause);
        None
    }

    /// Ends the exchange (its socket, if any, is closed) with `result`.
    fn end(&mut self, result: Result<BotReply, BotError>) -> Progress {
        self.phase = Phase::Over;
        self.reply = Vec::new();
        Progress::Done(result)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// What a scripted socket's next read, write or connect check does.
    #[derive(Debug)]
    enum Act {
        Data(Vec<u8>),
        Block,
        Fail(io::ErrorKind),
    }

    #[derive(Default)]
    struct Fake {
        reads: VecDeque<Act>,
        writes: VecDeque<Act>,
        written: Vec<u8>,
        half_closed: bool,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.reads.pop_front() {
                None => Ok(0),
                Some(Act::Data(mut d)) => {
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    if n < d.len() {
                        self.reads.push_front(Act::Data(d.split_off(n)));
                    }
                    Ok(n)
                }
                Some(Act::Block) => Err(io::ErrorKind::WouldBlock.into()),
                Some(Act::Fail(k)) => Err(k.into()),
            }
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            assert!(!self.half_closed, "written after the half-close");
            match self.writes.pop_front() {
                None => {
                    self.written.extend_from_slice(buf);
                    Ok(buf.len())
                }
                Some(Act::Data(d)) => {
                    // Takes as many bytes as `d` is long.
                    let n = d.len().min(buf.len());
                    self.written.extend_from_slice(&buf[..n]);
                    Ok(n)
                }
                Some(Act::Block) => Err(io::ErrorKind::WouldBlock.into()),
                Some(Act::Fail(k)) => Err(k.into()),
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl BotSocket for Fake {
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.half_closed = true;
            Ok(())
        }
    }

    /// Hands out scripted sockets, or errors, in turn; keeps what each
    /// socket was sent once the exchange drops it.
    struct Dial {
        targets: usize,
        plan: VecDeque<io::Result<Fake>>,
        dialed: Vec<usize>,
        /// Sockets watched for writability.
        watched: usize,
    }

    impl Dialer for Dial {
        type Socket = Fake;
        fn targets(&self) -> usize {
            self.targets
        }
        fn dial(&mut self, target: usize) -> io::Result<Fake> {
            self.dialed.push(target);
            self.plan
                .pop_front()
                .unwrap_or_else(|| Err(io::ErrorKind::ConnectionRefused.into()))
        }
        fn watch_writable(&mut self, _: &mut Fake) -> io::Result<()> {
            self.watched += 1;
            Ok(())
        }
    }

    fn dial(plan: Vec<io::Result<Fake>>) -> Dial {
        Dial {
            targets: 1,
            plan: plan.into(),
            dialed: Vec::new(),
            watched: 0,
        }
    }

    const REPLY: &[u8] = br#"{"success": true, "message": "welcome"}"#;

    fn exchange(t0: Instant) -> Exchange<Fake> {
        Exchange::new(
            Wire::Json,
            b"{\"state\":\"s\",\"code\":\"c\"}".to_vec(),
            t0,
            Duration::from_secs(2),
            Duration::from_secs(10),
        )
    }

    fn wait(p: Progress) -> Instant {
        match p {
            Progress::Wait(at) => at,
            Progress::Done(r) => panic!("over early: {r:?}"),
        }
    }

    fn done(p: Progress) -> Result<BotReply, BotError> {
        match p {
            Progress::Done(r) => r,
            Progress::Wait(at) => panic!("still waiting, until {at:?}"),
        }
    }

    /// Once the poll said the bot shut its side, a read that drains the
    /// socket ends the reply: no read of the end of stream follows. Before
    /// that, a reply that looks whole is not taken.
    #[test]
    fn a_drained_read_after_the_bots_end_is_the_whole_reply() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(10);
        // A read of the end of stream would hit Fail and show as Closed.
        let sock = Fake {
            reads: [Act::Data(REPLY.to_vec()), Act::Fail(io::ErrorKind::Other)].into(),
            ..Fake::default()
        };
        let mut d = dial(vec![Ok(sock)]);
        let mut x = exchange(t0);
        // Sent and half-closed: the reply is read once the poll says so.
        assert_eq!(wait(x.advance(t0, &mut d)), deadline);
        x.bot_ended();
        assert_eq!(done(x.advance(t0, &mut d)).unwrap().message, "welcome");
        // Without the poll's word, the same reply is read on to its end.
        let sock = Fake {
            reads: [Act::Data(REPLY.to_vec()), Act::Block].into(),
            ..Fake::default()
        };
        let mut d = dial(vec![Ok(sock)]);
        let mut x = exchange(t0);
        assert_eq!(wait(x.advance(t0, &mut d)), deadline);
        assert_eq!(wait(x.advance(t0, &mut d)), deadline);
        assert_eq!(done(x.advance(t0, &mut d)).unwrap().message, "welcome");
    }

    #[test]
    fn sends_half_closes_and_reads_the_reply_to_its_end() {
        let t0 = Instant::now();
        let sock = Fake {
            // Still connecting, then a short write, then a full buffer.
            writes: [Act::Block, Act::Data(vec![0; 5]), Act::Block].into(),
            reads: [
                Act::Block,
                Act::Data(REPLY[..10].to_vec()),
                Act::Block,
                Act::Data(REPLY[10..].to_vec()),
            ]
            .into(),
            ..Fake::default()
        };
        let mut d = dial(vec![Ok(sock)]);
        let mut x = exchange(t0);
        let deadline = t0 + Duration::from_secs(10);
        // Connecting, then a short write, then the send buffer is full,
        // then the half-close (the reply comes later), then no reply yet,
        // then half of it: each a wait on the socket.
        for sending in [true, true, true, false, false] {
            assert_eq!(x.sending(), sending);
            assert!(x.sending() || x.reply.is_empty());
            assert_eq!(wait(x.advance(t0, &mut d)), deadline);
        }
        assert!(!x.sending());
        // Two writes blocked: the socket was watched for writability once.
        assert_eq!(d.watched, 1);
        let reply = done(x.advance(t0, &mut d)).unwrap();
        assert_eq!(
            reply,
            BotReply {
                success: true,
                message: "welcome".into()
            }
        );
        assert_eq!(d.dialed, vec![0]);
    }

    #[test]
    fn refusals_are_retried_within_the_window_with_growing_pauses() {
        let t0 = Instant::now();
        let refused = || Err(io::ErrorKind::ConnectionRefused.into());
        let sock = Fake {
            reads: [Act::Data(REPLY.to_vec())].into(),
            ..Fake::default()
        };
        let mut d = dial(vec![refused(), refused(), Ok(sock)]);
        let mut x = exchange(t0);
        let first = wait(x.advance(t0, &mut d));
        assert_eq!(first, t0 + Duration::from_millis(25));
        // Woken early (a stray event): still pausing.
        assert_eq!(wait(x.advance(t0, &mut d)), first);
        let second = wait(x.advance(first, &mut d));
        assert_eq!(second, first + Duration::from_millis(50));
        assert_eq!(
            wait(x.advance(second, &mut d)),
            t0 + Duration::from_secs(10)
        );
        assert!(done(x.advance(second, &mut d)).is_ok());
        assert_eq!(d.dialed, vec![0, 0, 0]);
    }

    #[test]
    fn a_refusal_past_the_window_is_unavailable_and_sends_nothing() {
        let t0 = Instant::now();
        let mut d = dial(vec![]);
        let mut x = exchange(t0);
        let mut now = t0;
        let err = loop {
            match x.advance(now, &mut d) {
                Progress::Wait(at) => now = at,
                Progress::Done(r) => break r.unwrap_err(),
            }
        };
        assert!(matches!(err, BotError::Unavailable(_)), "{err:?}");
        assert!(now <= t0 + Duration::from_secs(2));
        assert!(d.dialed.len() > 3);
    }

    #[test]
    fn a_refused_connect_in_progress_counts_as_a_refusal_and_tries_every_address() {
        let t0 = Instant::now();
        let failing = Fake {
            writes: [Act::Block, Act::Fail(io::ErrorKind::ConnectionRefused)].into(),
            ..Fake::default()
        };
        let sock = Fake {
            reads: [Act::Data(REPLY.to_vec())].into(),
            ..Fake::default()
        };
        let mut d = Dial {
            targets: 2,
            plan: [Ok(failing), Ok(sock)].into(),
            dialed: Vec::new(),
            watched: 0,
        };
        let mut x = exchange(t0);
        assert_eq!(wait(x.advance(t0, &mut d)), t0 + Duration::from_secs(10));
        assert_eq!(wait(x.advance(t0, &mut d)), t0 + Duration::from_secs(10));
        assert!(done(x.advance(t0, &mut d)).is_ok());
        assert_eq!(d.dialed, vec![0, 1]);
    }

    #[test]
    fn a_full_unix_backlog_is_a_wait_bounded_by_the_deadline() {
        let t0 = Instant::now();
        let mut d = dial(
            (0..10_000)
                .map(|_| Err(io::ErrorKind::WouldBlock.into()))
                .collect(),
        );
        let mut x = exchange(t0);
        let mut now = t0;
        let mut waits = Vec::new();
        let err = loop {
            match x.advance(now, &mut d) {
                Progress::Wait(at) => {
                    waits.push(at - now);
                    now = at;
                }
                Progress::Done(r) => break r.unwrap_err(),
            }
        };
        // Long past the retry window, the code never left: not sent, as
        // the blocking exchange says of a backlog that stays full.
        assert!(
            matches!(&err, BotError::Unavailable(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err:?}"
        );
        assert_eq!(now, t0 + Duration::from_secs(10));
        assert_eq!(waits[0], Duration::from_millis(2));
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(20)));
    }

    #[test]
    fn a_silent_bot_times_out_at_the_deadline() {
        let t0 = Instant::now();
        let sock = Fake {
            reads: (0..3).map(|_| Act::Block).collect(),
            ..Fake::default()
        };
        let mut d = dial(vec![Ok(sock)]);
        let mut x = exchange(t0);
        let deadline = wait(x.advance(t0, &mut d));
        assert_eq!(deadline, t0 + Duration::from_secs(10));
        assert_eq!(
            wait(x.advance(t0 + Duration::from_secs(9), &mut d)),
            deadline
        );
        assert!(matches!(
            done(x.advance(deadline, &mut d)),
            Err(BotError::Timeout)
        ));
        // And stays over.
        assert!(matches!(
            done(x.advance(deadline, &mut d)),
            Err(BotError::Timeout)
        ));
    }

    #[test]
    fn bad_ends_of_a_reply() {
        let t0 = Instant::now();
        type Expected = fn(&BotError) -> bool;
        let cases: Vec<(Vec<Act>, Expected)> = vec![
            (vec![], |e| matches!(e, BotError::Closed)),
            (vec![Act::Fail(io::ErrorKind::ConnectionReset)], |e| {
                matches!(e, BotError::Closed)
            }),
            (vec![Act::Data(b"[true, \"x\"]".to_vec())], |e| {
                matches!(e, BotError::Invalid(_))
            }),
            (
                (0..20).map(|_| Act::Data(vec![b' '; 4096])).collect(),
                |e| matches!(e, BotError::TooLarge),
            ),
        ];
        for (reads, expected) in cases {
            let sock = Fake {
                reads: reads.into(),
                ..Fake::default()
            };
            let mut d = dial(vec![Ok(sock)]);
            let mut x = exchange(t0);
            wait(x.advance(t0, &mut d));
            let err = done(x.advance(t0, &mut d)).unwrap_err();
            assert!(expected(&err), "{err:?}");
        }
    }

    #[test]
    fn the_whole_message_goes_out_before_the_half_close() {
        let t0 = Instant::now();
        struct Keep(std::rc::Rc<std::cell::RefCell<Vec<u8>>>, Fake);
        impl Read for Keep {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                self.1.read(b)
            }
        }
        impl Write for Keep {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = self.1.write(b)?;
                self.0.borrow_mut().extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl BotSocket for Keep {
            fn shutdown_write(&mut self) -> io::Result<()> {
                self.1.shutdown_write()
            }
        }
        struct One(Option<Keep>);
        impl Dialer for One {
            type Socket = Keep;
            fn targets(&self) -> usize {
                1
            }
            fn dial(&mut self, _: usize) -> io::Result<Keep> {
                self.0.take().ok_or(io::ErrorKind::ConnectionRefused.into())
            }
            fn watch_writable(&mut self, _: &mut Keep) -> io::Result<()> {
                Ok(())
            }
        }
        let sent = std::rc::Rc::default();
        let fake = Fake {
            writes: [Act::Data(vec![0; 3]), Act::Data(vec![0; 4])].into(),
            reads: [Act::Data(REPLY.to_vec())].into(),
            ..Fake::default()
        };
        let mut d = One(Some(Keep(std::rc::Rc::clone(&sent), fake)));
        let mut x = Exchange::new(
            Wire::Json,
            b"{\"state\":\"s\",\"code\":\"c\"}".to_vec(),
            t0,
            Duration::from_secs(2),
            Duration::from_secs(10),
        );
        wait(x.advance(t0, &mut d));
        assert!(done(x.advance(t0, &mut d)).is_ok());
        assert_eq!(
            sent.borrow().as_slice(),
            b"{\"state\":\"s\",\"code\":\"c\"}"
        );
    }
}

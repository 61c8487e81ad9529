//! One FastCGI connection as a state machine: fed bytes and the time,
//! it yields whole requests and encodes answers into an output buffer. It
//! never touches a socket, so it can be driven by a blocking loop
//! ([`super::serve_connection`]) or an event loop alike, and tested
//! without either.

use std::fmt;
use std::time::Instant;

use super::wire::{
    FLAG_KEEP_CONN, HEADER_LEN, Header, ProtocolStatus, RecordType, Role, encode_end_request,
    encode_pair, encode_record, encode_stream, parse_header, parse_pairs,
};
use crate::http::{Request, Response};
use crate::limits::Limits;

/// `appStatus` of an END_REQUEST after a CGI response went out on STDOUT.
const APP_ANSWERED: u32 = 0;
/// `appStatus` of an END_REQUEST for a request that ended without one
/// (aborted, or refused by protocol status). Web servers only log it.
const APP_UNANSWERED: u32 = 1;

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send [`Connection::output`], then wait for more bytes and
    /// [`Connection::feed`] them; past `deadline` the connection is
    /// over (call [`Connection::next`] again and it says so).
    Read {
        /// When waiting must stop.
        deadline: Instant,
    },
    /// A whole request arrived: send [`Connection::output`], answer it,
    /// and pass the answer to [`Connection::respond`].
    Request(Request),
    /// Send [`Connection::output`], then close the connection.
    Close(Result<(), Error>),
}

/// Why a connection ended other than cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The peer closed the connection inside a record.
    ClosedMidRecord,
    /// The peer closed the connection inside a request.
    ClosedMidRequest,
    /// A record header that is not FastCGI version 1.
    BadVersion,
    /// A BEGIN_REQUEST whose content is shorter than 8 bytes.
    ShortBeginRequest,
    /// A request or the wait between requests took longer than its
    /// limit.
    TimedOut,
    /// [`Connection::next`] was called while a request waited for its
    /// answer.
    Unanswered,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::ClosedMidRecord => "FastCGI connection closed mid-record",
            Error::ClosedMidRequest => "FastCGI connection closed mid-request",
            Error::BadVersion => "not a FastCGI version 1 record",
            Error::ShortBeginRequest => "short FastCGI BEGIN_REQUEST",
            Error::TimedOut => "FastCGI peer too slow: past its deadline",
            Error::Unanswered => "FastCGI request left unanswered",
        })
    }
}

impl std::error::Error for Error {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between requests.
    Idle,
    /// Receiving request `id`'s params and body.
    Receiving {
        id: u16,
        keep_conn: bool,
        stdin_len: usize,
    },
    /// Request `id` was handed out and waits for its answer.
    Answering { id: u16, keep_conn: bool },
    /// Nothing more is read.
    Done,
}

/// What the unparsed input starts with.
enum Front {
    /// A whole record, with this header.
    Whole(Header),
    /// Part of a record, or nothing.
    Partial,
    /// A record header that is not version 1.
    BadVersion,
}

/// One connection's protocol state.
pub struct Connection {
    limits: Limits,
    /// Bytes received and not yet parsed: `input[start..]`.
    input: Vec<u8>,
    start: usize,
    /// When the first byte of the record at `input[start]` arrived.
    record_began: Instant,
    /// When the latest bytes arrived.
    last_fed: Instant,
    eof: bool,
    /// The input buffers were given back: nothing more is read.
    released: bool,
    state: State,
    /// The PARAMS stream of the request being received.
    params: Vec<u8>,
    output: Vec<u8>,
    /// When the current wait (between requests, or for the rest of a
    /// request) is over.
    deadline: Instant,
    /// How the connection ends once `state` is `Done`.
    end: Result<(), Error>,
    /// A request was refused with the peer still sending it.
    refused: bool,
}

impl Connection {
    /// A connection accepted at `now`.
    pub fn new(limits: Limits, now: Instant) -> Connection {
        Connection {
            limits,
            input: Vec::new(),
            start: 0,
            record_began: now,
            last_fed: now,
            eof: false,
            released: false,
            state: State::Idle,
            params: Vec::new(),
            output: Vec::new(),
            deadline: now + limits.idle_timeout,
            end: Ok(()),
            refused: false,
        }
    }

    /// Hands over bytes that arrived at `now`; empty `bytes` is the end of
    /// the stream.
    pub fn feed(&mut self, bytes: &[u8], now: Instant) {
        if self.released {
            return;
        }
        if bytes.is_empty() {
            self.eof = true;
            return;
        }
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
            self.record_began = now;
        }
        self.input.extend_from_slice(bytes);
        self.last_fed = now;
    }

    /// Bytes of a request still being received: bytes not yet parsed and
    /// the params gathered so far (zero between requests, and once a
    /// request is whole), for a server that bounds them over all its
    /// connections. The buffers' capacity is at most twice this, or the
    /// largest request the connection has had.
    pub fn held(&self) -> usize {
        self.input.len() - self.start + self.params.len()
    }

    /// Bytes to send to the peer.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Forgets the output once it was sent.
    pub fn clear_output(&mut self) {
        self.output.clear();
    }

    /// Hands the output over, its memory with it: for a driver that keeps
    /// output of its own while a peer is slow to read, so the core does
    /// not also keep room for as much.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// The next thing to do, having processed every whole record fed so
    /// far. `now` only decides whether waiting for more is still allowed.
    pub fn next(&mut self, now: Instant) -> Step {
        loop {
            match self.state {
                State::Done => return Step::Close(self.end),
                State::Answering { .. } => return self.finish(Err(Error::Unanswered)),
                State::Idle | State::Receiving { .. } => {}
            }
            let header = match self.front() {
                Front::Whole(header) => header,
                Front::BadVersion => return self.finish(Err(Error::BadVersion)),
                Front::Partial if self.eof => {
                    let end = match self.state {
                        _ if self.start < self.input.len() => Err(Error::ClosedMidRecord),
                        State::Receiving { .. } => Err(Error::ClosedMidRequest),
                        _ => Ok(()),
                    };
                    return self.finish(end);
                }
                Front::Partial => {
                    let deadline = self.read_deadline();
                    if now >= deadline {
                        return self.finish(Err(Error::TimedOut));
                    }
                    self.compact();
                    return Step::Read { deadline };
                }
            };
            let content_start = self.start + HEADER_LEN;
            let content_end = content_start + usize::from(header.content_length);
            let began = self.record_began;
            self.start = content_start + header.body_len();
            // The next record's first byte came with the latest bytes at
            // the earliest: count from then, in the peer's favour.
            self.record_began = self.last_fed;
            let content = std::mem::take(&mut self.input);
            let step = self.record(header, &content[content_start..content_end], began);
            if !self.released {
                self.input = content;
            }
            if let Some(step) = step {
                return step;
            }
        }
    }

    /// Takes the answer to the request handed out by [`Step::Request`]
    /// (`cgi`: a response in CGI form), at `now`.
    pub fn respond(&mut self, cgi: &[u8], now: Instant) {
        let State::Answering { id, keep_conn } = self.state else {
            return;
        };
        encode_stream(RecordType::Stdout, id, cgi, &mut self.output);
        encode_end_request(
            id,
            APP_ANSWERED,
            ProtocolStatus::RequestComplete,
            &mut self.output,
        );
        self.end_request(keep_conn, now);
    }

    /// When waiting for more must stop: the current deadline, and no later
    /// than a request's budget after the first byte of a record that has
    /// begun to arrive (a BEGIN_REQUEST trickled in is already a request).
    fn read_deadline(&self) -> Instant {
        if self.start < self.input.len() {
            self.deadline
                .min(self.record_began + self.limits.request_timeout)
        } else {
            self.deadline
        }
    }

    /// What the unparsed input starts with.
    fn front(&self) -> Front {
        let Some((raw, body)) = self.input[self.start..].split_first_chunk::<HEADER_LEN>() else {
            return Front::Partial;
        };
        match parse_header(raw) {
            None => Front::BadVersion,
            Some(header) if body.len() >= header.body_len() => Front::Whole(header),
            Some(_) => Front::Partial,
        }
    }

    /// Drops parsed bytes, so the buffer holds at most one partial record
    /// and one read.
    fn compact(&mut self) {
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
    }

    fn finish(&mut self, end: Result<(), Error>) -> Step {
        self.state = State::Done;
        self.end = end;
        self.release();
        Step::Close(end)
    }

    /// Whether the connection ended on a refused request that its peer may
    /// still be sending: closing it with unread bytes would make a TCP
    /// peer's kernel discard the answer (a reset), so the driver reads and
    /// drops the rest, within a bound, before closing.
    pub fn ended_unread(&self) -> bool {
        self.refused
    }

    /// Gives the input buffers back: nothing more is read. (In `--listen`
    /// mode hundreds of connections wait on the bot at once, each holding
    /// its own.)
    fn release(&mut self) {
        self.released = true;
        self.input = Vec::new();
        self.start = 0;
        self.params = Vec::new();
    }

    fn end_request(&mut self, keep_conn: bool, now: Instant) {
        if keep_conn {
            self.state = State::Idle;
            self.deadline = now + self.limits.idle_timeout;
            // Bytes already here waited on the answer, not on the peer.
            self.record_began = now;
            self.last_fed = self.last_fed.max(now);
        } else {
            self.state = State::Done;
            self.end = Ok(());
            self.release();
        }
    }

    /// Acts on one record; `Some` when the driver must act.
    fn record(&mut self, header: Header, content: &[u8], began: Instant) -> Option<Step> {
        let id = header.request_id;
        let kind = RecordType::from_byte(header.kind);
        if id == 0 {
            self.management_reply(header.kind, content);
            return None;
        }
        let State::Receiving {
            id: active,
            keep_conn,
            stdin_len,
        } = self.state
        else {
            // Idle: only a BEGIN_REQUEST means anything; the rest are
            // stragglers of an aborted or refused request, or ids that
            // never began.
            if kind == Some(RecordType::BeginRequest) {
                return self.begin(id, content, began);
            }
            return None;
        };
        if id != active {
            if kind == Some(RecordType::BeginRequest) {
                encode_end_request(
                    id,
                    APP_UNANSWERED,
                    ProtocolStatus::CantMpxConn,
                    &mut self.output,
                );
            }
            return None;
        }
        match kind {
            Some(RecordType::Params) => {
                if self.params.len() + content.len() > self.limits.max_params_bytes {
                    return Some(self.refuse(id, "params over the cap"));
                }
                self.params.extend_from_slice(content);
            }
            Some(RecordType::Stdin) if content.is_empty() => {
                let request = request_of(id, &self.params);
                self.params.clear();
                self.state = State::Answering { id, keep_conn };
                if !keep_conn {
                    // Nothing after the last request is read.
                    self.release();
                }
                match request {
                    Some(request) => return Some(Step::Request(request)),
                    None => {
                        let answer = plain_text(400, "malformed FastCGI params\n");
                        // Answered here, without the handler.
                        self.respond(&answer, self.last_fed);
                        return (!keep_conn).then_some(Step::Close(Ok(())));
                    }
                }
            }
            Some(RecordType::Stdin) => {
                let stdin_len = stdin_len.saturating_add(content.len());
                if stdin_len > self.limits.max_stdin_bytes {
                    return Some(self.refuse(id, "body over the cap"));
                }
                self.state = State::Receiving {
                    id,
                    keep_conn,
                    stdin_len,
                };
            }
            Some(RecordType::AbortRequest) => {
                encode_end_request(
                    id,
                    APP_UNANSWERED,
                    ProtocolStatus::RequestComplete,
                    &mut self.output,
                );
                self.end_request(keep_conn, self.last_fed);
                if !keep_conn {
                    return Some(Step::Close(Ok(())));
                }
            }
            // Nothing else means anything to a responder (a repeated
            // BEGIN_REQUEST, DATA, or records only an application sends).
            _ => {}
        }
        None
    }

    fn begin(&mut self, id: u16, content: &[u8], began: Instant) -> Option<Step> {
        let [role_hi, role_lo, flags, _, _, _, _, _, ..] = *content else {
            return Some(self.finish(Err(Error::ShortBeginRequest)));
        };
        let keep_conn = flags & FLAG_KEEP_CONN != 0;
        if u16::from_be_bytes([role_hi, role_lo]) != u16::from(Role::Responder) {
            encode_end_request(
                id,
                APP_UNANSWERED,
                ProtocolStatus::UnknownRole,
                &mut self.output,
            );
            if keep_conn {
                return None;
            }
            return Some(self.finish(Ok(())));
        }
        self.params.clear();
        self.state = State::Receiving {
            id,
            keep_conn,
            stdin_len: 0,
        };
        // The whole request, from its first byte, has its own budget.
        self.deadline = began + self.limits.request_timeout;
        None
    }

    /// Answers a request that went over a cap and ends the connection: the
    /// rest of its stream is unread, so the connection cannot carry another.
    fn refuse(&mut self, id: u16, why: &str) -> Step {
        log::warn!("fastcgi: request {id}: {why}, answered 400 and closing");
        self.refused = true;
        encode_stream(
            RecordType::Stdout,
            id,
            &plain_text(400, "request too large\n"),
            &mut self.output,
        );
        encode_end_request(
            id,
            APP_ANSWERED,
            ProtocolStatus::RequestComplete,
            &mut self.output,
        );
        self.finish(Ok(()))
    }

    /// The answer to a record with request id 0.
    fn management_reply(&mut self, kind: u8, content: &[u8]) {
        if kind == u8::from(RecordType::GetValues) {
            let result = get_values_result(content, &self.limits);
            encode_record(RecordType::GetValuesResult, 0, &result, &mut self.output);
        } else {
            encode_record(
                RecordType::UnknownType,
                0,
                &[kind, 0, 0, 0, 0, 0, 0, 0],
                &mut self.output,
            );
        }
    }
}

/// What to do with a connection turned away at the connection cap,
/// given the first bytes it sent.
#[derive(Debug, PartialEq, Eq)]
pub enum TurnAway {
    /// Fewer than a record header's bytes so far.
    NeedMore,
    /// It opened with a BEGIN_REQUEST for this request id: answer it with
    /// [`encode_overloaded`].
    Answer(u16),
    /// It opened with something else: close it unanswered.
    Ignore,
}

/// Looks at the first record header of a connection over the cap, and
/// only that: web servers open with BEGIN_REQUEST, and a peer that
/// trickles anything longer must not hold the one turning it away.
pub fn turn_away(first: &[u8]) -> TurnAway {
    let Some(raw) = first.first_chunk::<HEADER_LEN>() else {
        return TurnAway::NeedMore;
    };
    match parse_header(raw) {
        Some(h) if h.kind == u8::from(RecordType::BeginRequest) && h.request_id != 0 => {
            TurnAway::Answer(h.request_id)
        }
        _ => TurnAway::Ignore,
    }
}

/// Appends the answer to request `id` over the cap: `busy` (a response in
/// CGI form, the 503 page) on STDOUT, then END_REQUEST with
/// `FCGI_OVERLOADED`.
pub fn encode_overloaded(id: u16, busy: &[u8], out: &mut Vec<u8>) {
    encode_stream(RecordType::Stdout, id, busy, out);
    encode_end_request(id, APP_ANSWERED, ProtocolStatus::Overloaded, out);
}

/// The request a complete PARAMS stream describes, or `None` (logged)
/// when it does not parse.
fn request_of(id: u16, params: &[u8]) -> Option<Request> {
    let request = parse_pairs(params).map(Request::from_params);
    if request.is_none() {
        log::warn!("fastcgi: request {id}: malformed params, answered 400");
    }
    request
}

/// A short plain-text answer in CGI form, for what the core answers itself.
pub(super) fn plain_text(status: u16, body: &str) -> Vec<u8> {
    let resp = Response {
        status,
        headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
        body: body.as_bytes().to_vec(),
    };
    resp.to_cgi_bytes(false)
}

/// The known variables among those asked for, each once whatever the
/// query repeats, so the answer always fits in one record.
fn get_values_result(query: &[u8], limits: &Limits) -> Vec<u8> {
    let asked = parse_pairs(query).unwrap_or_default();
    let max = limits.max_conns.to_string();
    let known: [(&[u8], &[u8]); 3] = [
        (b"FCGI_MAX_CONNS", max.as_bytes()),
        // One request per connection, so as many requests as connections.
        (b"FCGI_MAX_REQS", max.as_bytes()),
        (b"FCGI_MPXS_CONNS", b"0"),
    ];
    let mut result = Vec::new();
    for (name, value) in known {
        if asked.iter().any(|&(n, _)| n == name) {
            encode_pair(name, value, &mut result);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fastcgi::wire::begin_request_body;

    const IDLE: Duration = Duration::from_secs(30);
    const REQUEST: Duration = Duration::from_secs(10);

    fn limits() -> Limits {
        Limits {
            idle_timeout: IDLE,
            request_timeout: REQUEST,
            ..Limits::default()
        }
    }

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    fn begin(id: u16, keep_conn: bool) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(
            RecordType::BeginRequest,
            id,
            &begin_request_body(Role::Responder.into(), keep_conn),
            &mut out,
        );
        out
    }

    /// BEGIN_REQUEST, an empty PARAMS stream and an empty body.
    fn request(id: u16, keep_conn: bool) -> Vec<u8> {
        let mut out = begin(id, keep_conn);
        encode_record(RecordType::Params, id, &[], &mut out);
        encode_record(RecordType::Stdin, id, &[], &mut out);
        out
    }

    fn get_values() -> Vec<u8> {
        let mut query = Vec::new();
        encode_pair(b"FCGI_MPXS_CONNS", b"", &mut query);
        let mut out = Vec::new();
        encode_record(RecordType::GetValues, 0, &query, &mut out);
        out
    }

    fn waits_until(conn: &mut Connection, now: Instant) -> Instant {
        match conn.next(now) {
            Step::Read { deadline } => deadline,
            other => panic!("expected a read, got {other:?}"),
        }
    }

    #[test]
    fn an_idle_connection_has_its_deadline_from_accept() {
        let t0 = Instant::now();
        let mut conn = Connection::new(limits(), t0);
        assert_eq!(waits_until(&mut conn, t0), t0 + IDLE);
        assert_eq!(waits_until(&mut conn, secs(t0, 29.9)), t0 + IDLE);
        assert_eq!(conn.next(t0 + IDLE), Step::Close(Err(Error::TimedOut)));
        // And stays closed.
        conn.feed(&request(1, false), t0 + IDLE);
        assert_eq!(conn.next(t0 + IDLE), Step::Close(Err(Error::TimedOut)));
    }

    #[test]
    fn a_trickling_request_is_dropped_at_its_deadline_from_its_first_byte() {
        let t0 = Instant::now();
        let mut conn = Connection::new(limits(), t0);
        let mut bytes = request(1, false).into_iter();
        // The first byte comes at 5 s, then one every 0.9 s: every read is
        // quick, the whole request is not.
        let first = secs(t0, 5.0);
        let mut now = first;
        loop {
            let Some(byte) = bytes.next() else {
                panic!("the whole request arrived in time");
            };
            conn.feed(&[byte], now);
            now += Duration::from_millis(900);
            match conn.next(now) {
                Step::Read { deadline } => assert_eq!(deadline, first + REQUEST),
                Step::Close(end) => {
                    assert_eq!(end, Err(Error::TimedOut));
                    break;
                }
                Step::Request(_) => panic!("served a request past its deadline"),
            }
        }
        let late = now - (first + REQUEST);
        assert!(late < Duration::from_millis(900), "dropped {late:?} late");
        assert!(conn.output().is_empty());
    }

    #[test]
    fn management_records_do_not_restart_the_idle_deadline() {
        let t0 = Instant::now();
        let mut conn = Connection::new(limits(), t0);
        for s in [1.0, 10.0, 29.0] {
            conn.feed(&get_values(), secs(t0, s));
            assert_eq!(waits_until(&mut conn, secs(t0, s)), t0 + IDLE);
            assert!(!conn.output().is_empty(), "GET_VALUES unanswered");
            conn.clear_output();
        }
        // Records for a request id that never began count the same.
        let mut stray = Vec::new();
        encode_record(RecordType::Params, 7, b"\x01\x01ab", &mut stray);
        conn.feed(&stray, secs(t0, 29.5));
        assert_eq!(waits_until(&mut conn, secs(t0, 29.5)), t0 + IDLE);
        assert_eq!(conn.next(t0 + IDLE), Step::Close(Err(Error::TimedOut)));
    }

    #[test]
    fn management_records_inside_a_request_do_not_extend_it() {
        let t0 = Instant::now();
        let mut conn = Connection::new(limits(), t0);
        conn.feed(&begin(1, false), secs(t0, 2.0));
        assert_eq!(waits_until(&mut conn, secs(t0, 2.0)), secs(t0, 12.0));
        conn.feed(&get_values(), secs(t0, 11.0));
        assert_eq!(waits_until(&mut conn, secs(t0, 11.0)), secs(t0, 12.0));
        assert_eq!(conn.next(secs(t0, 12.0)), Step::Close(Err(Error::TimedOut)));
    }

    #[test]
    fn the_idle_deadline_restarts_after_each_answer() {
        let t0 = Instant::now();
        let mut conn = Connection::new(limits(), t0);
        conn.feed(&request(1, true), secs(t0, 1.0));
        assert!(matches!(conn.next(secs(t0, 1.0)), Step::Request(_)));
        // The handler took 20 s (a slow bot): not the peer's fault.
        conn.respond(b"Status: 200 OK\r\n\r\n", secs(t0, 21.0));
        assert_eq!(waits_until(&mut conn, secs(t0, 21.0)), secs(t0, 51.0));
        conn.feed(&request(2, false), secs(t0, 50.0));
        assert!(matches!(conn.next(secs(t0, 50.0)), Step::Request(_)));
        conn.respond(b"Status: 200 OK\r\n\r\n", secs(t0, 50.0));
        assert_eq!(conn.next(secs(t0, 50.0)), Step::Close(Ok(())));
    }

    #[test]
    fn what_arrived_in_time_is_served_even_if_looked_at_late() {
        let t0 = Instant::now();
        let mut conn = Connection::new(limits(), t0);
        conn.feed(&request(1, false), secs(t0, 29.0));
        // A busy machine gets to it after the idle deadline.
        assert!(matches!(conn.next(secs(t0, 40.0)), Step::Request(_)));
    }

    #[test]
    fn asking_again_before_answering_is_an_error() {
        let t0 = Instant::now();
        let mut conn = Connection::new(limits(), t0);
        conn.feed(&request(1, true), t0);
        assert!(matches!(conn.next(t0), Step::Request(_)));
        assert_eq!(conn.next(t0), Step::Close(Err(Error::Unanswered)));
    }

    #[test]
    fn the_last_request_gives_its_buffers_back() {
        let t0 = Instant::now();
        let mut conn = Connection::new(limits(), t0);
        let mut input = request(1, false);
        input.extend(request(2, false));
        conn.feed(&input, t0);
        assert!(matches!(conn.next(t0), Step::Request(_)));
        assert_eq!(conn.input.capacity(), 0);
        assert_eq!(conn.params.capacity(), 0);
        conn.respond(b"Status: 200 OK\r\n\r\n", t0);
        assert_eq!(conn.next(t0), Step::Close(Ok(())));
    }

    #[test]
    fn turn_away_looks_at_the_first_header_only() {
        let busy = b"Status: 503\r\n\r\n";
        let req = request(9, false);
        assert_eq!(turn_away(&req[..7]), TurnAway::NeedMore);
        assert_eq!(turn_away(&req[..8]), TurnAway::Answer(9));
        let mut out = Vec::new();
        encode_overloaded(9, busy, &mut out);
        assert!(out.windows(busy.len()).any(|w| w == busy));
        assert_eq!(
            &out[out.len() - 8..][4..5],
            &[ProtocolStatus::Overloaded as u8]
        );
        assert_eq!(turn_away(&get_values()), TurnAway::Ignore);
        assert_eq!(
            turn_away(b"\x02\x01\x00\x01\x00\x08\x00\x00"),
            TurnAway::Ignore
        );
    }
}

//! The blocking driver: a [`Connection`] over a stream whose reads and
//! writes block, each read bounded by the connection's current deadline.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::conn::{self, Connection, Step, TurnAway, encode_overloaded, turn_away};
use super::wire::HEADER_LEN;
use crate::http::{Request, Response};
use crate::limits::Limits;

/// How much one read asks for.
const READ_SIZE: usize = 8 * 1024;

/// A stream whose blocking reads and writes can be bounded.
pub trait TimedStream: Read + Write {
    /// Bounds each following read.
    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()>;
    /// Bounds each following write.
    fn set_write_timeout(&mut self, timeout: Duration) -> io::Result<()>;
    /// Reads what is there without waiting; `None` when nothing is, or
    /// when the stream cannot tell (then a bounded read follows).
    fn read_now(&mut self, _buf: &mut [u8]) -> Option<io::Result<usize>> {
        None
    }
    /// Writes what fits without waiting; `None` when nothing fits, or
    /// when the stream cannot tell (then a bounded write follows).
    fn write_now(&mut self, _buf: &[u8]) -> Option<io::Result<usize>> {
        None
    }
}

/// Serves requests on one connection until it closes, keep_conn ends, a
/// deadline passes, or an error.
///
/// The handler is called at most once per BEGIN_REQUEST, after the whole
/// request (params and body) has arrived. End of stream between requests
/// is a clean close and returns `Ok`; end of stream inside a record or a
/// request, a record that is not version 1, a short BEGIN_REQUEST body and
/// a peer past its deadline return an error. A request over a cap in
/// `limits` is answered `400 Bad Request` and the connection closed with
/// `Ok`. Each answer goes out in one write.
pub fn serve_connection<S: TimedStream>(
    stream: &mut S,
    handler: &dyn Fn(&Request) -> Response,
    limits: &Limits,
) -> io::Result<()> {
    let mut conn = Connection::new(*limits, Instant::now());
    let mut buf = vec![0u8; READ_SIZE];
    // Socket options cost a system call each: the write bound is set only
    // when a reply does not fit at once, the read bound only when its
    // value changes (never within the same millisecond) and data is not
    // already there.
    let mut write_bound = false;
    let mut read_bound: Option<Duration> = None;
    loop {
        let step = conn.next(Instant::now());
        // One write per reply: unbuffered record-by-record writes were
        // measured as a major cost.
        if !conn.output().is_empty() {
            let out = conn.output();
            let sent = match stream.write_now(out) {
                Some(r) => r?,
                None => 0,
            };
            if sent < out.len() {
                if !write_bound {
                    stream.set_write_timeout(limits.write_timeout)?;
                    write_bound = true;
                }
                stream.write_all(&out[sent..])?;
            }
            stream.flush()?;
            conn.clear_output();
        }
        match step {
            Step::Read { deadline } => {
                let got = match stream.read_now(&mut buf) {
                    Some(r) => r,
                    None => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        // A zero timeout means "block forever" to the socket API.
                        let left = left.max(Duration::from_millis(1));
                        if read_bound.is_none_or(|b| b.abs_diff(left) >= Duration::from_millis(1)) {
                            stream.set_read_timeout(left)?;
                            read_bound = Some(left);
                        }
                        stream.read(&mut buf)
                    }
                };
                match got {
                    Ok(n) => conn.feed(&buf[..n], Instant::now()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Step::Request(request) => {
                let cgi = handler(&request).to_cgi_bytes(request.is_head());
                conn.respond(&cgi, Instant::now());
            }
            Step::Close(end) => {
                if conn.ended_unread() {
                    drain(stream);
                }
                return end.map_err(io_error);
            }
        }
    }
}

/// Reads and drops what a peer still sends after its request was refused,
/// until it closes, for at most [`DRAIN_TIME`] and [`DRAIN_BYTES`].
fn drain<S: TimedStream>(stream: &mut S) {
    let until = Instant::now() + DRAIN_TIME;
    let mut sink = vec![0u8; READ_SIZE];
    let mut left = DRAIN_BYTES;
    while left > 0 {
        let wait = until.saturating_duration_since(Instant::now());
        if wait.is_zero() || stream.set_read_timeout(wait).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// How long a refused peer may go on sending before the connection closes.
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// How much of a refused request is read and dropped at most.
const DRAIN_BYTES: usize = 4 * 1024 * 1024;

/// For a connection over the cap: read its first record header by
/// `deadline`; if it opened with BEGIN_REQUEST, answer it `busy()` (a
/// response in CGI form, the 503 page) with protocol status
/// `FCGI_OVERLOADED`, and return true. A connection that opens otherwise,
/// or closes first, is left unanswered, and `busy` is not called.
pub fn reject_overloaded<S: TimedStream>(
    stream: &mut S,
    busy: impl FnOnce() -> Vec<u8>,
    deadline: Instant,
) -> io::Result<bool> {
    let mut first = [0; HEADER_LEN];
    let mut got = 0;
    loop {
        match turn_away(&first[..got]) {
            TurnAway::NeedMore => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                stream.set_read_timeout(left)?;
                match stream.read(&mut first[got..]) {
                    Ok(0) => return Ok(false),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            TurnAway::Answer(id) => {
                let busy = busy();
                let mut out = Vec::with_capacity(busy.len() + 64);
                encode_overloaded(id, &busy, &mut out);
                stream.write_all(&out)?;
                stream.flush()?;
                return Ok(true);
            }
            TurnAway::Ignore => return Ok(false),
        }
    }
}

fn io_error(e: conn::Error) -> io::Error {
    let kind = match e {
        conn::Error::ClosedMidRecord | conn::Error::ClosedMidRequest => {
            io::ErrorKind::UnexpectedEof
        }
        conn::Error::BadVersion | conn::Error::ShortBeginRequest => io::ErrorKind::InvalidData,
        conn::Error::TimedOut => io::ErrorKind::TimedOut,
        conn::Error::Unanswered => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

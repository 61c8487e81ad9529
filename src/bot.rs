//! Talking to the bot: one connection per code, one message each way.
//!
//! The relay sends `{"state": S, "code": C}`, shuts down its write side so
//! the bot's `await reader.read()` sees EOF, then reads the bot's
//! `{"success": bool, "message": str}`, which ends at EOF (a reply that
//! already decodes whole is taken without waiting for it). Every step
//! shares one deadline, so a hung bot costs a player at most
//! `REGISTER_BOT_TIMEOUT`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{BotAddr, Config, Wire};
use crate::net::Stream;
use crate::{scan, sys};

/// Largest reply read from the bot; anything longer is not a reply.
pub const MAX_REPLY: usize = 64 * 1024;

/// The bot's answer about one code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotReply {
    /// Whether the player is signed up.
    pub success: bool,
    /// What the bot has to say to the player.
    pub message: String,
}

/// Why no answer came from the bot.
#[derive(Debug)]
pub enum BotError {
    /// Nothing accepted the connection within the retry window, or no
    /// connection was made by the deadline: the code was never sent, so
    /// the player can simply try again.
    Unavailable(io::Error),
    /// No full answer before the deadline.
    Timeout,
    /// The bot closed the connection, or reset it, before a full answer.
    Closed,
    /// The bot answered with something that is not a reply.
    Invalid(String),
    /// The answer was longer than [`MAX_REPLY`].
    TooLarge,
}

/// What kind of failure a [`BotError`] is, without its details: small
/// and `Copy`, for whoever must remember or report it (the replay store,
/// the outcome of a request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// See [`BotError::Unavailable`].
    Unavailable,
    /// See [`BotError::Timeout`].
    Timeout,
    /// See [`BotError::Closed`].
    Closed,
    /// See [`BotError::Invalid`].
    Invalid,
    /// See [`BotError::TooLarge`].
    TooLarge,
}

impl FailureKind {
    /// The error again, for a request that waited on a delivery that
    /// ended this way (its details stayed with the request that saw them).
    pub fn error(self) -> BotError {
        match self {
            FailureKind::Unavailable => {
                BotError::Unavailable(io::ErrorKind::ConnectionRefused.into())
            }
            FailureKind::Timeout => BotError::Timeout,
            FailureKind::Closed => BotError::Closed,
            FailureKind::Invalid => {
                BotError::Invalid("the delivery this request waited for got it".into())
            }
            FailureKind::TooLarge => BotError::TooLarge,
        }
    }

    /// One byte for the replay store; 0 is left for "none".
    pub fn to_byte(self) -> u8 {
        match self {
            FailureKind::Unavailable => 1,
            FailureKind::Timeout => 2,
            FailureKind::Closed => 3,
            FailureKind::Invalid => 4,
            FailureKind::TooLarge => 5,
        }
    }

    /// The kind [`FailureKind::to_byte`] gave `byte`, if any.
    pub fn from_byte(byte: u8) -> Option<FailureKind> {
        Some(match byte {
            1 => FailureKind::Unavailable,
            2 => FailureKind::Timeout,
            3 => FailureKind::Closed,
            4 => FailureKind::Invalid,
            5 => FailureKind::TooLarge,
            _ => return None,
        })
    }
}

impl BotError {
    /// The kind of this failure.
    pub fn kind(&self) -> FailureKind {
        match self {
            BotError::Unavailable(_) => FailureKind::Unavailable,
            BotError::Timeout => FailureKind::Timeout,
            BotError::Closed => FailureKind::Closed,
            BotError::Invalid(_) => FailureKind::Invalid,
            BotError::TooLarge => FailureKind::TooLarge,
        }
    }
}

impl fmt::Display for BotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BotError::Unavailable(e) => write!(f, "bot not reachable: {e}"),
            BotError::Timeout => write!(f, "bot did not answer in time"),
            BotError::Closed => write!(f, "bot closed the connection without an answer"),
            BotError::Invalid(why) => write!(f, "bot answered something unreadable: {why}"),
            BotError::TooLarge => write!(f, "bot answer longer than {MAX_REPLY} bytes"),
        }
    }
}

impl std::error::Error for BotError {}

#[derive(Serialize)]
struct Message<'a> {
    state: &'a str,
    code: &'a str,
}

/// The message for one code, in the configured wire format.
pub fn encode(wire: Wire, state: &str, code: &str) -> Vec<u8> {
    let msg = Message { state, code };
    let encoded = match wire {
        Wire::Json => Ok(json_message(state, code)),
        // Protocol 3 is what every Python 3 reads; the struct becomes a
        // dict of str to str, as the Flask relay's pickle.dumps made.
        Wire::Pickle => {
            serde_pickle::to_vec(&msg, serde_pickle::SerOptions::new()).map_err(|e| e.to_string())
        }
    };
    // Two strings into a map cannot fail to serialize in either format.
    encoded.unwrap_or_default()
}

/// `{"state":S,"code":C}` byte for byte as serde_json writes it (a test
/// holds the two together), with runs of plain text copied whole: the
/// code is a kilobyte that needs no escaping.
fn json_message(state: &str, code: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(state.len() + code.len() + 32);
    out.extend_from_slice(b"{\"state\":");
    json_string(&mut out, state);
    out.extend_from_slice(b",\"code\":");
    json_string(&mut out, code);
    out.push(b'}');
    out
}

/// A JSON string as serde_json escapes it: `"` and `\\`, the five short
/// escapes, `\u00xx` for the other control characters, the rest as is.
fn json_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    let any =
        |w: u64| scan::has_below(w, 0x20) | scan::has_byte(w, b'"') | scan::has_byte(w, b'\\');
    out.push(b'"');
    let mut rest = s.as_bytes();
    loop {
        let plain = scan::first(rest, any, escaped);
        out.extend_from_slice(&rest[..plain]);
        let Some(&b) = rest.get(plain) else { break };
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            _ => b'u',
        };
        out.extend_from_slice(&[b'\\', short]);
        if short == b'u' {
            out.extend_from_slice(&[
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]);
        }
        rest = &rest[plain + 1..];
    }
    out.push(b'"');
}

/// The most containers, marks and memo reads a pickle reply may make: one dict
/// is a reply, and a few more leave room for fields the relay ignores,
/// not for nesting deep enough to overflow the decoder's stack nor for
/// copies that would make the decoder's work much more than the reply.
pub const PICKLE_CONTAINERS: usize = 64;

/// Reads the bot's reply: an object (a dict in pickle) with `success` and
/// `message`; unknown fields are ignored.
///
/// A pickle is read as plain data only. serde-pickle never imports or
/// calls anything: the few builtins it knows (`set`, `frozenset`,
/// `bytearray`, …) it rebuilds as data, and any other global is an error,
/// so a reply cannot make the relay run code. How deep it may nest and
/// how many values it may copy are bounded before it is decoded
/// ([`PICKLE_CONTAINERS`], [`crate::pickle`]).
pub fn decode(wire: Wire, bytes: &[u8]) -> Result<BotReply, BotError> {
    if bytes.is_empty() {
        return Err(BotError::Closed);
    }
    let invalid = |e: &dyn fmt::Display| BotError::Invalid(loggable(&e.to_string()));
    match wire {
        Wire::Json => {
            // serde would also take `[true, "msg"]` for the struct; the
            // protocol is an object, and an object starts with a brace.
            if bytes.trim_ascii_start().first() != Some(&b'{') {
                return Err(BotError::Invalid("reply is not a JSON object".into()));
            }
            serde_json::from_slice(bytes).map_err(|e| invalid(&e))
        }
        Wire::Pickle => {
            // Before the decoder, which recurses as deep as the pickle nests
            // and copies whatever the pickle uses twice.
            match crate::pickle::containers(bytes) {
                Ok(n) if n <= PICKLE_CONTAINERS => {}
                Ok(n) => {
                    return Err(BotError::Invalid(format!(
                        "reply makes {n} containers, marks and memo reads (a reply is one dict)"
                    )));
                }
                Err(e) => return Err(BotError::Invalid(e)),
            }
            let value = serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new())
                .map_err(|e| invalid(&e))?;
            if !matches!(value, serde_pickle::Value::Dict(_)) {
                return Err(BotError::Invalid("reply is not a dict".into()));
            }
            serde_pickle::from_value(value).map_err(|e| invalid(&e))
        }
    }
}

/// At most this much of a decoder's complaint goes into the log.
const WHY_CHARS: usize = 200;

/// A decoder's complaint as one short log line: it may quote the bot's
/// bytes, and a hostile bot must not write control characters (a `\r`
/// and a terminal escape could paint a forged line) or a line of many
/// kilobytes into the operator's log.
fn loggable(why: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    for c in why.chars() {
        if chars >= WHY_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            for e in c.escape_default() {
                out.push(e);
                chars += 1;
            }
        } else {
            out.push(c);
            chars += 1;
        }
    }
    out
}

/// Delivers one code to the bot and returns its answer, all within
/// `config.bot_timeout`.
///
/// The socket is non-blocking and every wait is a `poll` bounded by the
/// one deadline: connect, send and reply need no socket timeouts set. On
/// loopback the handshake is done within `connect` and the message fits
/// the fresh socket's buffer, so the only wait is for the reply.
pub fn exchange(config: &Config, state: &str, code: &str) -> Result<BotReply, BotError> {
    let deadline = Instant::now() + config.bot_timeout;
    let message = encode(config.wire, state, code);
    let conn = connect_and_send(&config.bot_addr, config.bot_retry, &message, deadline)?;
    read_reply(&conn, config.wire, deadline)
}

/// Why an attempt to connect and send failed.
enum Attempt {
    /// Nothing of the message left this host (refused, no such socket):
    /// the connection may be tried again.
    NotSent(io::Error),
    /// A failure once some of the message may have left.
    Failed(BotError),
}

/// First pause after a refused connection to the bot; it doubles up to
/// [`REFUSED_PAUSE_MAX`] (here and in the event loop's exchange).
pub(crate) const REFUSED_PAUSE: Duration = Duration::from_millis(25);
pub(crate) const REFUSED_PAUSE_MAX: Duration = Duration::from_millis(250);

/// Connects and sends the message, then half-closes. Refusals are tried
/// again until `retry` has passed, because a bot that is restarting
/// refuses for a second or two and a player's click should survive that.
fn connect_and_send(
    addr: &BotAddr,
    retry: Duration,
    message: &[u8],
    deadline: Instant,
) -> Result<Stream, BotError> {
    let retry_until = Instant::now() + retry;
    let mut pause = REFUSED_PAUSE;
    loop {
        // Only a connection that took nothing of the message comes back
        // here: past the deadline the code has still not left.
        if remaining(deadline).is_err() {
            return Err(BotError::Unavailable(not_connected()));
        }
        let attempt = match addr {
            BotAddr::Tcp(addrs) => send_tcp(addrs, message, deadline),
            BotAddr::Unix(path) => send_unix(path, message, deadline),
        };
        match attempt {
            Ok(conn) => {
                // The bot reads to EOF, so the half-close is what makes it answer.
                conn.shutdown_write().map_err(io_error)?;
                return Ok(conn);
            }
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::NotSent(e)) => {
                let now = Instant::now();
                if !retryable(&e) || now + pause > retry_until || now + pause >= deadline {
                    return Err(BotError::Unavailable(e));
                }
                thread::sleep(pause);
                pause = (pause * 2).min(REFUSED_PAUSE_MAX);
            }
        }
    }
}

/// Tries each address in turn until one takes the message, by the
/// deadline: none is tried past it.
fn send_tcp(addrs: &[SocketAddr], message: &[u8], deadline: Instant) -> Result<Stream, Attempt> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address");
    for addr in addrs {
        if Instant::now() >= deadline {
            break;
        }
        let conn = match sys::start_connect_tcp(addr) {
            Ok(s) => Stream::Tcp(s),
            Err(e) => {
                last = e;
                continue;
            }
        };
        match send_message(&conn, message, deadline) {
            Ok(()) => return Ok(conn),
            Err(Attempt::NotSent(e)) => last = e,
            Err(failed) => return Err(failed),
        }
    }
    Err(Attempt::NotSent(last))
}

/// A Unix connect is made at once, or refused, or finds the bot's accept
/// backlog full: then it is tried again, briefly paused, until the deadline.
fn send_unix(path: &Path, message: &[u8], deadline: Instant) -> Result<Stream, Attempt> {
    let mut pause = Duration::from_millis(1);
    let conn = loop {
        match sys::start_connect_unix(path) {
            Ok(s) => break Stream::Unix(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Attempt::NotSent(not_connected()));
                }
                thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(Attempt::NotSent(e)),
        }
    };
    send_message(&conn, message, deadline)?;
    Ok(conn)
}

/// Sends the whole message on a non-blocking socket whose connection may
/// still be under way, waiting for room (or for the handshake) by the
/// deadline. An error before the first byte is `NotSent`: a refused
/// connection surfaces here, and so does one whose handshake never ended
/// (a firewall that drops it, a backlog that stays full): the deadline
/// passing before the first byte left is not a timeout of the bot's, the
/// code was never sent.
fn send_message(conn: &Stream, message: &[u8], deadline: Instant) -> Result<(), Attempt> {
    let mut sent = 0;
    while sent < message.len() {
        match sys::send_now(conn, &message[sent..]) {
            Some(Ok(n)) => sent += n,
            Some(Err(e)) if sent == 0 => return Err(Attempt::NotSent(e)),
            Some(Err(e)) => return Err(Attempt::Failed(io_error(e))),
            None => match sys::wait_ready(conn, libc::POLLOUT, deadline) {
                Ok(Some(_)) => {}
                Ok(None) if sent == 0 => return Err(Attempt::NotSent(not_connected())),
                Ok(None) => return Err(Attempt::Failed(BotError::Timeout)),
                Err(e) if sent == 0 => return Err(Attempt::NotSent(e)),
                Err(e) => return Err(Attempt::Failed(io_error(e))),
            },
        }
    }
    Ok(())
}

/// Reads the reply by the deadline. The reply ends at the bot's end of
/// stream, as on the old wire, and the `poll` before a read already tells
/// whether the bot has shut its side (`POLLRDHUP`): a read that then
/// drains the socket has the whole reply, and the read of the end of
/// stream itself is left out. A reply that looks whole before the bot has
/// shut its side is not taken: the event loop reads to the end of stream
/// too, and a bot's reply must not be an answer in one mode and a timeout
/// in the other, or an answer or a refusal depending on how TCP cut it.
fn read_reply(conn: &Stream, wire: Wire, deadline: Instant) -> Result<BotReply, BotError> {
    // A typical reply fits in 512 bytes; a longer one doubles the
    // buffer up to the cap.
    let mut reply = vec![0u8; 512];
    let mut len = 0;
    // Right after the half-close the bot has not answered yet: wait first.
    let mut wait = true;
    // The bot has shut its side: all it sent is in the socket.
    let mut ended = false;
    loop {
        if wait {
            match sys::wait_ready(conn, libc::POLLIN | libc::POLLRDHUP, deadline) {
                Ok(Some(events)) => ended = events & (libc::POLLRDHUP | libc::POLLHUP) != 0,
                Ok(None) => return Err(BotError::Timeout),
                Err(e) => return Err(io_error(e)),
            }
        }
        if len == reply.len() {
            reply.resize((len * 2).min(MAX_REPLY + 1), 0);
        }
        let room = reply.len() - len;
        match sys::recv_now(conn, &mut reply[len..]) {
            None => wait = true,
            Some(Err(e)) => return Err(io_error(e)),
            Some(Ok(0)) => return decode(wire, &reply[..len]),
            Some(Ok(n)) => {
                len += n;
                if len > MAX_REPLY {
                    return Err(BotError::TooLarge);
                }
                // Less than asked for: the socket is drained. After the
                // bot shut its side that is the whole reply; before, the
                // next read waits for more or for the end.
                if n < room && ended {
                    return decode(wire, &reply[..len]);
                }
                wait = n < room;
            }
        }
    }
}

/// Time left before the deadline, never zero (a zero timeout means
/// "block forever" to the socket API).
fn remaining(deadline: Instant) -> Result<Duration, BotError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        Err(BotError::Timeout)
    } else {
        Ok(left)
    }
}

/// Why a code never left: no connection took it by the deadline.
pub(crate) fn not_connected() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "no connection to the bot was made in time; the code was not sent",
    )
}

pub(crate) fn io_error(e: io::Error) -> BotError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => BotError::Timeout,
        _ => BotError::Closed,
    }
}

pub(crate) fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// What the decoder quotes of a hostile reply reaches the log as one
    /// short line without control characters.
    #[test]
    fn a_decoder_complaint_is_one_short_clean_line() {
        let mut bytes = b"I\r\x1b[2K[2026-01-01T00:00:00Z INFO x] outcome=approved ".to_vec();
        bytes.extend(std::iter::repeat_n(b'x', 60_000));
        bytes.extend(b"\n.");
        let Err(BotError::Invalid(why)) = decode(Wire::Pickle, &bytes) else {
            panic!("a literal that is no number was read");
        };
        assert!(!why.chars().any(char::is_control), "{why:?}");
        assert!(
            why.chars().count() <= WHY_CHARS + 1,
            "{} chars",
            why.chars().count()
        );
        assert!(why.contains("\\r\\u{1b}[2K"), "{why}");
        assert_eq!(loggable("plain"), "plain");
    }

    #[test]
    fn a_failure_kind_rebuilds_its_error() {
        let errors = [
            BotError::Unavailable(io::ErrorKind::ConnectionRefused.into()),
            BotError::Timeout,
            BotError::Closed,
            BotError::Invalid("x".into()),
            BotError::TooLarge,
        ];
        let mut bytes = Vec::new();
        for e in errors {
            let kind = e.kind();
            bytes.push(kind.to_byte());
            assert_eq!(FailureKind::from_byte(kind.to_byte()), Some(kind));
            assert_eq!(kind.error().kind(), kind);
        }
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 5, "two kinds share a byte");
        assert_eq!(FailureKind::from_byte(0), None);
        assert_eq!(FailureKind::from_byte(6), None);
    }

    #[test]
    fn json_round_trip() {
        let bytes = encode(Wire::Json, "st=", "co\"de");
        assert_eq!(bytes, br#"{"state":"st=","code":"co\"de"}"#);
        let reply = decode(
            Wire::Json,
            br#"{"success":true,"message":"hi <b>","extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(
            reply,
            BotReply {
                success: true,
                message: "hi <b>".into()
            }
        );
    }

    #[test]
    fn json_rejects_wrong_shapes() {
        for bad in [
            &b"null"[..],
            b"{}",
            br#"{"success":"yes","message":"m"}"#,
            br#"{"success":true}"#,
            b"not json{",
        ] {
            assert!(
                matches!(decode(Wire::Json, bad), Err(BotError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(decode(Wire::Json, b""), Err(BotError::Closed)));
    }

    #[test]
    fn pickle_request_is_a_python_dict() {
        let bytes = encode(Wire::Pickle, "s", "c");
        // PROTO 3 header, then a dict built of the two short strings.
        assert_eq!(&bytes[..2], b"\x80\x03");
        let back: std::collections::BTreeMap<String, String> =
            serde_pickle::from_slice(&bytes, serde_pickle::DeOptions::new()).unwrap();
        assert_eq!(back.get("state").map(String::as_str), Some("s"));
        assert_eq!(back.get("code").map(String::as_str), Some("c"));
    }

    #[test]
    fn pickle_reply_from_python() {
        // pickle.dumps({'success': True, 'message': 'ok'}) on Python 3.11 (protocol 4).
        let py = b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x07success\x94\x88\x8c\x07message\x94\x8c\x02ok\x94u.";
        assert_eq!(
            decode(Wire::Pickle, py).unwrap(),
            BotReply {
                success: true,
                message: "ok".into()
            }
        );
    }

    #[test]
    fn pickle_reply_must_be_a_dict() {
        // pickle.dumps([True, 'ok'])
        let list = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00]\x94(\x88\x8c\x02ok\x94e.";
        assert!(matches!(
            decode(Wire::Pickle, list),
            Err(BotError::Invalid(_))
        ));
    }

    #[test]
    fn pickle_reply_cannot_name_a_callable() {
        // pickle.dumps of os.system('true'): a GLOBAL plus a REDUCE.
        let evil = b"cos\nsystem\n(Vtrue\ntR.";
        assert!(matches!(
            decode(Wire::Pickle, evil),
            Err(BotError::Invalid(_))
        ));
    }

    fn config_for(addr: BotAddr, timeout_ms: u64, retry_ms: u64) -> Config {
        let mut c = Config::from_lookup(|_| None).unwrap();
        c.bot_addr = addr;
        c.bot_timeout = Duration::from_millis(timeout_ms);
        c.bot_retry = Duration::from_millis(retry_ms);
        c
    }

    /// A peer on loopback TCP for one exchange: it accepts, reads the
    /// relay's message to its end, then hands the connection to `then`.
    fn peer_after_the_message(
        then: impl FnOnce(TcpStream) + Send + 'static,
    ) -> (SocketAddr, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut msg = Vec::new();
            s.read_to_end(&mut msg).unwrap();
            then(s);
        });
        (addr, peer)
    }

    #[test]
    fn refused_past_retry_is_unavailable() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let c = config_for(BotAddr::Tcp(vec![port]), 2000, 100);
        let started = Instant::now();
        let err = exchange(&c, "s", "c").unwrap_err();
        assert!(matches!(err, BotError::Unavailable(_)), "{err}");
        assert_eq!(Outcome::BotFailed(err.kind()).status(), 503);
        assert!(started.elapsed() < Duration::from_millis(1500));
    }

    #[test]
    fn missing_unix_socket_is_unavailable() {
        let c = config_for(BotAddr::Unix("/nonexistent/bot.sock".into()), 500, 0);
        assert!(matches!(
            exchange(&c, "s", "c"),
            Err(BotError::Unavailable(_))
        ));
    }

    #[test]
    fn in_thread_peer_over_tcp_and_unix() {
        fn serve(mut s: impl Read + Write) -> Vec<u8> {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(br#"{"success":false,"message":"already"}"#)
                .unwrap();
            got
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || serve(listener.accept().unwrap().0));
        let c = config_for(BotAddr::Tcp(vec![addr]), 5000, 0);
        let reply = exchange(&c, "st", "co").unwrap();
        assert!(!reply.success);
        assert_eq!(peer.join().unwrap(), br#"{"state":"st","code":"co"}"#);

        let dir = std::env::temp_dir().join(format!("tr-bot-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("bot.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let peer = thread::spawn(move || serve(listener.accept().unwrap().0));
        let c = config_for(BotAddr::Unix(path.clone()), 5000, 0);
        assert_eq!(exchange(&c, "a", "b").unwrap().message, "already");
        assert_eq!(peer.join().unwrap(), br#"{"state":"a","code":"b"}"#);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A connect that never completes is given up at the deadline, and
    /// the code, which never left, is unsent (503, try again), not a
    /// timeout of the bot's (504, which would also be kept for repeats).
    #[test]
    fn a_connect_that_hangs_is_unsent_within_the_bound() {
        // A listener that never accepts, its queue full: Linux drops
        // further SYNs, so a connect hangs until its timeout.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        crate::sys::relisten(&listener, 0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                Ok(s) => fillers.push(s),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}"),
            }
        }
        assert!(fillers.len() < 4, "the listener's queue never filled");
        let c = config_for(BotAddr::Tcp(vec![addr]), 300, 0);
        let started = Instant::now();
        let err = exchange(&c, "s", "c").unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(&err, BotError::Unavailable(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
        assert_eq!(Outcome::BotFailed(err.kind()).status(), 503);
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }

    #[test]
    fn a_reply_of_exactly_the_limit_is_read_whole() {
        let (addr, peer) = peer_after_the_message(|mut s| {
            // {"success":true,"message":"xxx…"} padded to MAX_REPLY bytes.
            let head = br#"{"success":true,"message":""#;
            let mut body = head.to_vec();
            body.resize(MAX_REPLY - 2, b'x');
            body.extend_from_slice(br#""}"#);
            s.write_all(&body).unwrap();
        });
        let c = config_for(BotAddr::Tcp(vec![addr]), 5000, 0);
        let reply = exchange(&c, "s", "c").unwrap();
        assert!(reply.success);
        assert_eq!(reply.message.len(), MAX_REPLY - 2 - 27);
        peer.join().unwrap();
    }

    #[test]
    fn silent_peer_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            thread::sleep(Duration::from_millis(600));
            drop(s);
        });
        let c = config_for(BotAddr::Tcp(vec![addr]), 200, 0);
        let err = exchange(&c, "s", "c").unwrap_err();
        assert!(matches!(err, BotError::Timeout), "{err}");
        assert_eq!(Outcome::BotFailed(err.kind()).status(), 504);
        peer.join().unwrap();
    }

    #[test]
    fn oversize_reply() {
        let (addr, peer) = peer_after_the_message(|mut s| {
            let _ = s.write_all(&vec![b' '; MAX_REPLY + 1]);
        });
        let c = config_for(BotAddr::Tcp(vec![addr]), 5000, 0);
        assert!(matches!(exchange(&c, "s", "c"), Err(BotError::TooLarge)));
        peer.join().unwrap();
    }

    /// A peer that writes `reply` after reading the message, then keeps
    /// the connection open until `hold` says so.
    fn peer_holding_open(
        reply: Vec<u8>,
    ) -> (
        SocketAddr,
        std::sync::mpsc::Sender<()>,
        thread::JoinHandle<()>,
    ) {
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let (addr, peer) = peer_after_the_message(move |mut s| {
            s.write_all(&reply).unwrap();
            let _ = held.recv();
        });
        (addr, hold, peer)
    }

    /// A pickle nested thousands deep (a few kilobytes) is refused before
    /// the decoder, whose recursion it would overflow.
    #[test]
    fn a_deeply_nested_pickle_is_refused_not_a_crash() {
        let depth = 20_000;
        let mut bytes = b"\x80\x02".to_vec();
        bytes.extend(std::iter::repeat_n(b']', depth));
        bytes.extend(std::iter::repeat_n(b'a', depth - 1));
        bytes.push(b'.');
        match decode(Wire::Pickle, &bytes) {
            Err(BotError::Invalid(why)) => assert!(why.contains("containers"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// `{'success': True, 'message': 'x', 'junk': junk}` (protocol 2),
    /// whose `junk` pickles to `list`.
    fn reply_with_junk(list: &[u8]) -> Vec<u8> {
        let mut bytes = b"\x80\x02}q\x00(X\x07\x00\x00\x00successq\x01\x88\
            X\x07\x00\x00\x00messageq\x02X\x01\x00\x00\x00xq\x03\
            X\x04\x00\x00\x00junkq\x04"
            .to_vec();
        bytes.extend(list);
        bytes.extend(b"u.");
        bytes
    }

    /// A reply of a hundred bytes whose list doubles with each DUP and
    /// APPEND, or of a few kilobytes that reads one long string back from
    /// the memo a thousand times, is refused before the decoder copies
    /// anything. Python reads both; 16 doublings keep the decoder quick if
    /// the check is missing.
    #[test]
    fn a_pickle_that_copies_its_values_is_refused() {
        let doubled = reply_with_junk(&[b"]".as_slice(), &b"2a".repeat(16)].concat());
        let mut flood = b"]q\x05(X\x00\x10\x00\x00".to_vec();
        flood.extend([b'm'; 4096]);
        flood.extend(b"q\x06");
        flood.extend(b"h\x06".repeat(1000));
        flood.push(b'e');
        for bytes in [doubled, reply_with_junk(&flood)] {
            match decode(Wire::Pickle, &bytes) {
                Err(BotError::Invalid(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        // The same reply without the copies is an answer.
        let plain = reply_with_junk(b"]q\x05");
        assert!(matches!(decode(Wire::Pickle, &plain), Ok(r) if r.success && r.message == "x"));
    }

    /// The reply ends at the bot's end of stream, as on the old wire: one
    /// that looks whole but is held open is no answer by the deadline,
    /// whatever its length (512 bytes fills the first read exactly).
    #[test]
    fn a_reply_counts_only_at_the_end_of_stream() {
        let pickle = serde_pickle::to_vec(
            &BotReply {
                success: false,
                message: "taken".into(),
            },
            serde_pickle::SerOptions::new(),
        )
        .unwrap();
        let json = |len: usize| {
            let head = br#"{"success":true,"message":""#.len() + br#""}"#.len();
            format!(
                r#"{{"success":true,"message":"{}"}}"#,
                "m".repeat(len - head)
            )
            .into_bytes()
        };
        for (wire, reply) in [
            (Wire::Json, json(64)),
            (Wire::Json, json(512)),
            (Wire::Json, json(513)),
            (Wire::Pickle, pickle),
        ] {
            let (addr, hold, peer) = peer_holding_open(reply.clone());
            let mut c = config_for(BotAddr::Tcp(vec![addr]), 300, 0);
            c.wire = wire;
            let got = exchange(&c, "s", "c");
            hold.send(()).unwrap();
            peer.join().unwrap();
            assert!(
                matches!(got, Err(BotError::Timeout)),
                "{} bytes: {got:?}",
                reply.len()
            );
            // The same bytes followed by the end of stream are the answer.
            assert!(decode(wire, &reply).is_ok());
        }
    }

    /// Bytes after a whole reply make it no reply, and a reply in pieces is
    /// read whole; without the end of stream an unfinished one times out.
    #[test]
    fn trailing_bytes_are_refused_and_pieces_are_joined() {
        let serve = |pieces: Vec<&'static [u8]>| {
            let (addr, peer) = peer_after_the_message(move |mut s| {
                for piece in pieces {
                    s.write_all(piece).unwrap();
                    s.flush().unwrap();
                    thread::sleep(Duration::from_millis(20));
                }
            });
            let c = config_for(BotAddr::Tcp(vec![addr]), 30_000, 0);
            let got = exchange(&c, "s", "c");
            peer.join().unwrap();
            got
        };
        let r = serve(vec![br#"{"success":true,"message":"x"}}"#]);
        assert!(matches!(r, Err(BotError::Invalid(_))), "{r:?}");
        let r = serve(vec![br#"{"success":true,"message":"x"} {}"#]);
        assert!(matches!(r, Err(BotError::Invalid(_))), "{r:?}");
        let r = serve(vec![br#"{"success":true,"#, br#""message":"}"#, br#"x"}"#]);
        assert_eq!(r.unwrap().message, "}x");
        // A reply that fills the first read exactly, then the end of stream.
        for len in [511, 512, 513, 1024] {
            let head = br#"{"success":true,"message":""#.len() + br#""}"#.len();
            let reply = format!(
                r#"{{"success":true,"message":"{}"}}"#,
                "m".repeat(len - head)
            );
            let r = serve(vec![reply.into_bytes().leak()]);
            assert_eq!(r.unwrap().message.len(), len - head, "{len}");
        }
        // A pickle is whole at its STOP, and refused with bytes after it.
        let reply = BotReply {
            success: true,
            message: "a.b.".into(),
        };
        let pickle = serde_pickle::to_vec(&reply, serde_pickle::SerOptions::new()).unwrap();
        assert_eq!(decode(Wire::Pickle, &pickle).unwrap(), reply);
        let trailing = [pickle.as_slice(), b"."].concat();
        assert!(matches!(
            decode(Wire::Pickle, &trailing),
            Err(BotError::Invalid(_))
        ));
        for cut in 1..pickle.len() {
            assert!(decode(Wire::Pickle, &pickle[..cut]).is_err(), "{cut}");
        }
        let (addr, hold, peer) = peer_holding_open(br#"{"success":true,"message":"x""#.to_vec());
        let c = config_for(BotAddr::Tcp(vec![addr]), 300, 0);
        let r = exchange(&c, "s", "c");
        hold.send(()).unwrap();
        peer.join().unwrap();
        assert!(matches!(r, Err(BotError::Timeout)), "{r:?}");
    }

    /// A Unix bot whose accept backlog is full: the connect is tried again
    /// until the deadline, never past it, and gets through once there is room.
    #[test]
    fn a_unix_bot_with_a_full_backlog() {
        let dir = std::env::temp_dir().join(format!("tr-bot-backlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("bot.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        crate::sys::relisten(&listener, 0).unwrap();
        let mut fillers = Vec::new();
        while fillers.len() < 8 {
            match crate::sys::start_connect_unix(&path) {
                Ok(s) => fillers.push(s),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                    break;
                }
            }
        }
        assert!(fillers.len() < 8, "the backlog never filled");
        let c = config_for(BotAddr::Unix(path.clone()), 300, 0);
        let started = Instant::now();
        let r = exchange(&c, "s", "c");
        let took = started.elapsed();
        // The code never left: unsent, as for a TCP connect that hangs.
        assert!(
            matches!(&r, Err(BotError::Unavailable(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{r:?}"
        );
        assert!(took >= Duration::from_millis(290), "{took:?}");
        // Room made while the relay waits: the code gets through.
        let c = config_for(BotAddr::Unix(path.clone()), 30_000, 0);
        let r = thread::scope(|s| {
            let relay = s.spawn(|| exchange(&c, "s", "c"));
            for _ in 0..fillers.len() {
                drop(listener.accept().unwrap());
            }
            let (mut conn, _) = listener.accept().unwrap();
            let mut msg = Vec::new();
            conn.read_to_end(&mut msg).unwrap();
            assert_eq!(msg, br#"{"state":"s","code":"c"}"#);
            conn.write_all(br#"{"success":true,"message":"room"}"#)
                .unwrap();
            drop(conn);
            relay.join().unwrap()
        });
        assert_eq!(r.unwrap().message, "room");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_json_message_is_serde_json_s_byte_for_byte() {
        let every_ascii: String = (0u8..0x80).map(char::from).collect();
        for text in [
            "",
            "plain-code_0123.xyz~",
            "gAAAAABn==",
            every_ascii.as_str(),
            "ünï \u{7f} \u{2028} 😀 \"q\" \\ /",
        ] {
            for (state, code) in [(text, "c"), ("s", text), (text, text)] {
                let serde = serde_json::to_vec(&Message { state, code }).unwrap();
                assert_eq!(encode(Wire::Json, state, code), serde, "{text:?}");
            }
        }
    }
}

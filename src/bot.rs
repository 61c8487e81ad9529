//! Talking to the bot: one connection per code, one message each way.
//!
//! The relay sends `{"state": S, "code": C}`, shuts down its write side so
//! the bot's `await reader.read()` sees EOF, then reads the bot's
//! `{"success": bool, "message": str}` to EOF. Every step shares one
//! deadline, so a hung bot costs a player at most `REGISTER_BOT_TIMEOUT`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{BotAddr, Config, Wire};
use crate::net::Stream;
use crate::sys;

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
    /// Nothing accepted the connection within the retry window: the code
    /// was never sent, so the player can simply try again.
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
        Wire::Json => serde_json::to_vec(&msg).map_err(|e| e.to_string()),
        // Protocol 3 is what every Python 3 reads; the struct becomes a
        // dict of str to str, as the Flask relay's pickle.dumps made.
        Wire::Pickle => {
            serde_pickle::to_vec(&msg, serde_pickle::SerOptions::new()).map_err(|e| e.to_string())
        }
    };
    // Two strings into a map cannot fail to serialize in either format.
    encoded.unwrap_or_default()
}

/// Reads the bot's reply: an object (a dict in pickle) with `success` and
/// `message`; unknown fields are ignored.
///
/// A pickle is read as plain data only. serde-pickle never imports or
/// calls anything: the few builtins it knows (`set`, `frozenset`,
/// `bytearray`, …) it rebuilds as data, and any other global is an error,
/// so a reply cannot make the relay run code.
pub fn decode(wire: Wire, bytes: &[u8]) -> Result<BotReply, BotError> {
    if bytes.is_empty() {
        return Err(BotError::Closed);
    }
    let invalid = |e: &dyn fmt::Display| BotError::Invalid(e.to_string());
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
            let value = serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new())
                .map_err(|e| invalid(&e))?;
            if !matches!(value, serde_pickle::Value::Dict(_)) {
                return Err(BotError::Invalid("reply is not a dict".into()));
            }
            serde_pickle::from_value(value).map_err(|e| invalid(&e))
        }
    }
}

/// Delivers one code to the bot and returns its answer, all within
/// `config.bot_timeout`.
pub fn exchange(config: &Config, state: &str, code: &str) -> Result<BotReply, BotError> {
    let deadline = Instant::now() + config.bot_timeout;
    let mut conn = connect(&config.bot_addr, config.bot_retry, deadline)?;
    let message = encode(config.wire, state, code);
    let reply = talk(&mut conn, &message, deadline)?;
    decode(config.wire, &reply)
}

fn talk(conn: &mut Stream, message: &[u8], deadline: Instant) -> Result<Vec<u8>, BotError> {
    conn.set_write_timeout(remaining(deadline)?)
        .map_err(io_error)?;
    conn.write_all(message).map_err(io_error)?;
    // The bot reads to EOF, so the half-close is what makes it answer.
    conn.shutdown_write().map_err(io_error)?;
    // Read straight into the reply, grown as needed: no 8 KiB buffer on
    // the stack of each thread (in --listen mode, hundreds of them, whose
    // touched stack pages stay resident).
    let mut reply = vec![0u8; 512];
    let mut len = 0;
    loop {
        conn.set_read_timeout(remaining(deadline)?)
            .map_err(io_error)?;
        if len == reply.len() {
            reply.resize((len * 2).min(MAX_REPLY + 1), 0);
        }
        let n = match conn.read(&mut reply[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e)),
        };
        if n == 0 {
            reply.truncate(len);
            return Ok(reply);
        }
        len += n;
        if len > MAX_REPLY {
            return Err(BotError::TooLarge);
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

fn io_error(e: io::Error) -> BotError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => BotError::Timeout,
        _ => BotError::Closed,
    }
}

/// Connects, retrying refusals until `retry` has passed, because a bot
/// that is restarting refuses for a second or two and a player's click
/// should survive that.
fn connect(addr: &BotAddr, retry: Duration, deadline: Instant) -> Result<Stream, BotError> {
    let retry_until = Instant::now() + retry;
    let mut pause = Duration::from_millis(25);
    loop {
        let left = remaining(deadline)?;
        let result = match addr {
            BotAddr::Tcp(addrs) => connect_tcp(addrs, left).map(Stream::Tcp),
            BotAddr::Unix(path) => connect_unix(path, left).map(Stream::Unix),
        };
        match result {
            Ok(conn) => return Ok(conn),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(BotError::Timeout);
            }
            Err(e) => {
                let now = Instant::now();
                if !retryable(&e) || now + pause > retry_until || now + pause >= deadline {
                    return Err(BotError::Unavailable(e));
                }
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        }
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound | io::ErrorKind::ConnectionReset
    )
}

fn connect_tcp(addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address");
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(s) => {
                // One small write each way: Nagle would only add delay.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A Unix socket connect blocks while the bot's accept backlog is full;
/// [`sys::connect_unix`] bounds it.
fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    sys::connect_unix(path, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;
    use std::net::TcpListener;

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

    #[test]
    fn a_connect_that_hangs_times_out_within_the_bound() {
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
        assert!(matches!(err, BotError::Timeout), "{err}");
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }

    #[test]
    fn a_reply_of_exactly_the_limit_is_read_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut msg = Vec::new();
            s.read_to_end(&mut msg).unwrap();
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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            let _ = s.write_all(&vec![b' '; MAX_REPLY + 1]);
        });
        let c = config_for(BotAddr::Tcp(vec![addr]), 5000, 0);
        assert!(matches!(exchange(&c, "s", "c"), Err(BotError::TooLarge)));
        peer.join().unwrap();
    }
}

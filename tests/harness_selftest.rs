//! Checks the test harness itself: the Python bot peer, the FastCGI / CGI /
//! JSON and server helpers in `support`, and that every suite in `tests/` is
//! compiled into the test binary. Only the server helpers' test starts the
//! binary under test, as it has nothing else to drive.

use std::io::{Cursor, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// Sends `msg` the way the relay does (write, half-close) and reads to EOF.
fn exchange_tcp(addr: &str, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect to bot");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("reply to EOF");
    reply
}

fn json_reply(bytes: &[u8]) -> (bool, String) {
    let text = std::str::from_utf8(bytes).expect("UTF-8 reply");
    let j = parse_json(text).unwrap_or_else(|e| panic!("reply {text:?}: {e}"));
    (
        j.get("success").and_then(Json::as_bool).expect("success"),
        j.get("message")
            .and_then(Json::as_str)
            .expect("message")
            .to_string(),
    )
}

/// Client side in Python so the pickles are real `pickle.dumps` output:
/// connects, sends the pickled dict, half-closes, prints the unpickled
/// reply as JSON (or `{"raw_len": n}` with `--raw`).
const PICKLE_CLIENT: &str = r#"
import json, pickle, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
msg = json.loads(sys.argv[2])
with socket.create_connection((host, int(port)), timeout=10) as s:
    s.sendall(pickle.dumps(msg))
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
print(json.dumps(pickle.loads(data)))
"#;

fn pickle_exchange(addr: &str, msg_json: &str) -> (bool, String) {
    let out = python(PICKLE_CLIENT, &[addr, msg_json], b"");
    assert!(
        out.status.success(),
        "pickle client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_reply(out.stdout.trim_ascii())
}

// ---------------------------------------------------------------------------
// bot.py
// ---------------------------------------------------------------------------

#[test]
fn json_approve_roundtrip() {
    let bot = Bot::start("json", "approve");
    assert!(bot.port().is_some(), "addr {}", bot.addr());
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert_eq!(json_reply(&reply), (true, APPROVED.to_string()));
    assert_eq!(bot.received(), [("s", "c")]);
    let r = &bot.received()[0];
    assert_eq!(r.keys, ["code", "state"]);
    assert_eq!(r.raw_len, 24);
    assert_eq!(r.wire, "json");
    assert_eq!(r.error, None);
}

#[test]
fn pickle_approve_roundtrip() {
    let bot = Bot::start("pickle", "approve");
    let (ok, message) = pickle_exchange(bot.addr(), r#"{"state":"s","code":"c"}"#);
    assert!(ok);
    assert_eq!(message, APPROVED);
    assert_eq!(bot.received(), [("s", "c")]);
    assert_eq!(bot.received()[0].wire, "pickle");
}

#[test]
fn pickle_reply_is_default_protocol_pickle() {
    // The reply bytes themselves must be what pickle.dumps(reply) gives.
    let bot = Bot::start("pickle", "refuse");
    let code = r#"
import pickle, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=10) as s:
    s.sendall(pickle.dumps({"state": "s", "code": "c"}))
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
expected = pickle.dumps({"success": False, "message": "You're already signed up!"})
print("same" if data == expected else repr(data))
"#;
    let out = python(code, &[bot.addr()], b"");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "same",
        "{out:?}"
    );
}

#[test]
fn refuse_and_message_override() {
    let bot = Bot::start("json", "refuse");
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert_eq!(
        json_reply(&reply),
        (false, "You're already signed up!".to_string())
    );

    let bot = Bot::start_with("json", "approve", &["--message", "custom"]);
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert_eq!(json_reply(&reply), (true, "custom".to_string()));
}

#[test]
fn echo_sends_the_message_text_not_the_secrets() {
    let nasty = "<b>&\"'</b>";
    let bot = Bot::start_with("json", "echo", &["--message", nasty]);
    let reply = exchange_tcp(bot.addr(), br#"{"state":"SECRET-S","code":"SECRET-C"}"#);
    let (ok, message) = json_reply(&reply);
    assert!(ok);
    assert_eq!(message, nasty);

    let bot = Bot::start("json", "echo");
    let reply = exchange_tcp(bot.addr(), br#"{"state":"SECRET-S","code":"SECRET-C"}"#);
    let (_, message) = json_reply(&reply);
    assert!(message.contains('<') && message.contains('&') && message.contains('"'));
    assert!(!String::from_utf8_lossy(&reply).contains("SECRET"));
}

#[test]
fn the_exactly_once_check_catches_a_repeat_a_gap_and_a_stranger() {
    let bot = Bot::start("json", "approve");
    for code in ["a", "b", "b"] {
        exchange_tcp(
            bot.addr(),
            format!(r#"{{"state":"s","code":"{code}"}}"#).as_bytes(),
        );
    }
    let check = |sent: &[&str], state: &str| {
        let sent: Vec<String> = sent.iter().map(|c| c.to_string()).collect();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bot.assert_received_each_once(&sent, state)
        }))
        .is_ok()
    };
    // "b" came twice, whatever was sent.
    assert!(!check(&["a", "b"], "s"));
    assert!(!check(&["a", "b", "b"], "s"));
    // A code sent but not received, or received but not sent.
    assert!(!check(&["a", "b", "c"], "s"));
    assert!(!check(&["b"], "s"));
    // Another state.
    assert!(!check(&["a", "b"], "t"));

    let clean = Bot::start("json", "approve");
    for code in ["a", "b"] {
        exchange_tcp(
            clean.addr(),
            format!(r#"{{"state":"s","code":"{code}"}}"#).as_bytes(),
        );
    }
    clean.assert_received_each_once(&["b".to_string(), "a".to_string()], "s");

    // A repeat that comes in a moment after the last code sent.
    let late = Bot::start("json", "approve");
    let send = |code: &str| {
        exchange_tcp(
            late.addr(),
            format!(r#"{{"state":"s","code":"{code}"}}"#).as_bytes(),
        );
    };
    send("a");
    let caught = thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(100));
            send("b");
            thread::sleep(Duration::from_millis(50));
            send("a");
        });
        let sent = ["a".to_string(), "b".to_string()];
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            late.assert_received_each_once(&sent, "s")
        }))
        .is_err()
    });
    assert!(caught, "a repeat after the last code sent went unseen");
}

#[test]
fn early_close_sends_nothing() {
    let bot = Bot::start("json", "early-close");
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert!(reply.is_empty(), "{reply:?}");
    assert_eq!(bot.received(), [("s", "c")]);
}

#[test]
fn garbage_does_not_decode() {
    let bot = Bot::start("json", "garbage");
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert_eq!(reply, b"not json{");

    let bot = Bot::start("pickle", "garbage");
    let out = python(
        r#"
import pickle, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=10) as s:
    s.sendall(pickle.dumps({"state": "s", "code": "c"}))
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
sys.stdout.buffer.write(data)
"#,
        &[bot.addr()],
        b"",
    );
    assert_eq!(out.stdout, b"\x80\x04not a pickle at all");
    assert_eq!(bot.received(), [("s", "c")]);
}

#[test]
fn oversize_is_big_and_well_formed() {
    let bot = Bot::start("json", "oversize");
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert!(reply.len() >= 100 * 1024, "{} bytes", reply.len());
    let (ok, message) = json_reply(&reply);
    assert!(ok);
    assert_eq!(message.len(), 100 * 1024);
}

#[test]
fn silent_keeps_the_connection_open_and_records_first() {
    let bot = Bot::start("json", "silent");
    let mut s = TcpStream::connect(bot.addr()).unwrap();
    s.write_all(br#"{"state":"s","code":"c"}"#).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    // Recorded although no reply will ever come.
    assert_eq!(bot.wait_received(1, Duration::from_secs(10)), [("s", "c")]);
    let mut buf = [0u8; 16];
    let err = read_by(
        Instant::now() + Duration::from_millis(500),
        |left| s.set_read_timeout(Some(left)),
        || (&s).read(&mut buf),
    )
    .expect_err("silent bot must not reply or close");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err:?}"
    );
}

#[test]
fn delay_is_applied_before_replying() {
    let bot = Bot::start_with("json", "slow", &["--delay", "0.5"]);
    let started = Instant::now();
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(json_reply(&reply), (true, APPROVED.to_string()));
    // Recorded before the delay, not after.
    assert_eq!(bot.received(), [("s", "c")]);

    let bot = Bot::start_with("json", "refuse", &["--delay", "0.3"]);
    let started = Instant::now();
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!json_reply(&reply).0);
}

#[test]
fn undecodable_or_malformed_messages_are_recorded_as_errors() {
    let bot = Bot::start("json", "approve");
    let reply = exchange_tcp(bot.addr(), b"{not json");
    assert!(reply.is_empty(), "no reply to an undecodable message");
    let reply = exchange_tcp(bot.addr(), br#"{"state":1,"code":"c"}"#);
    assert!(reply.is_empty());
    let got = bot.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.error.is_some()), "{got:?}");
    assert_eq!(got[0].raw_len, 9);
    assert!(
        got[1].error.as_deref().unwrap().contains("state"),
        "{got:?}"
    );
    assert!(got[0] != ("", ""));

    // json to a pickle bot, and a pickle carrying bytes instead of str.
    let bot = Bot::start("pickle", "approve");
    let reply = exchange_tcp(bot.addr(), br#"{"state":"s","code":"c"}"#);
    assert!(reply.is_empty());
    let out = python(
        r#"
import pickle, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=10) as s:
    s.sendall(pickle.dumps({"state": b"s", "code": "c"}))
    s.shutdown(socket.SHUT_WR)
    print(len(s.recv(65536)))
"#,
        &[bot.addr()],
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    let got = bot.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[1].error.as_deref().unwrap().contains("bytes"),
        "{got:?}"
    );
}

#[test]
fn unicode_and_extra_keys_are_recorded_faithfully() {
    let bot = Bot::start("json", "approve");
    let msg = r#"{"state":"\u00e9\ud83d\ude00\"\\","code":"c","extra":1}"#;
    let reply = exchange_tcp(bot.addr(), msg.as_bytes());
    assert!(json_reply(&reply).0);
    let got = bot.received();
    assert_eq!(got, [("é😀\"\\", "c")]);
    assert_eq!(got[0].keys, ["code", "extra", "state"]);
}

#[test]
fn unix_socket_bot() {
    let bot = Bot::start_unix("json", "approve");
    let path = bot.unix_path().expect("unix bot").to_path_buf();
    assert_eq!(bot.addr(), format!("unix:{}", path.display()));
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(br#"{"state":"s","code":"c"}"#).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    assert_eq!(json_reply(&reply), (true, APPROVED.to_string()));
    assert_eq!(bot.received(), [("s", "c")]);
}

#[test]
fn many_concurrent_connections() {
    let bot = Bot::start_with("json", "slow", &["--delay", "0.2"]);
    let started = Instant::now();
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let addr = bot.addr().to_string();
            thread::spawn(move || {
                let msg = format!(r#"{{"state":"s{i}","code":"c{i}"}}"#);
                json_reply(&exchange_tcp(&addr, msg.as_bytes()))
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap().0);
    }
    // Served concurrently, not one after another (40 x 0.2 s = 8 s).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let mut states: Vec<String> = bot.received().into_iter().map(|r| r.state).collect();
    states.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    want.sort();
    assert_eq!(states, want);
}

#[test]
fn bot_exits_cleanly_on_sigterm_even_with_a_silent_connection_open() {
    let mut bot = Bot::start("json", "silent");
    let mut s = TcpStream::connect(bot.addr()).unwrap();
    s.write_all(br#"{"state":"s","code":"c"}"#).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    bot.wait_received(1, Duration::from_secs(10));
    let status = bot.stop();
    assert!(status.success(), "{status:?}: {}", bot.stderr_text());

    let mut bot = Bot::start_unix("pickle", "approve");
    let path = bot.unix_path().unwrap().to_path_buf();
    assert!(bot.stop().success());
    assert!(!path.exists(), "socket file left behind");
}

#[test]
fn closed_port_refuses() {
    let port = RefusingPort::new();
    let addr = port.addr();
    assert!(addr.starts_with("127.0.0.1:"));
    assert_eq!(addr, format!("127.0.0.1:{}", port.port()));
    assert!(TcpStream::connect(addr).is_err());
    // While it lives, nobody else can listen there.
    assert!(
        std::net::TcpListener::bind(addr).is_err(),
        "{addr} could be taken by another listener"
    );
    assert!(TcpStream::connect(addr).is_err());
}

/// SIGKILL, as a crashed cog: the process is gone and its port refuses.
#[test]
fn a_killed_bot_is_gone_and_refuses() {
    let mut bot = Bot::start("json", "approve");
    let proc_dir = PathBuf::from(format!("/proc/{}", bot.pid()));
    assert!(proc_dir.exists(), "{} missing", proc_dir.display());
    bot.kill();
    assert!(!proc_dir.exists(), "{} still there", proc_dir.display());
    assert!(
        TcpStream::connect(bot.addr()).is_err(),
        "a killed bot accepts"
    );
}

// ---------------------------------------------------------------------------
// FastCGI client
// ---------------------------------------------------------------------------

/// An in-memory stream: reads come from canned server output, writes are kept.
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Dribble one byte at a time to exercise partial reads.
        let n = buf.len().min(1);
        self.input.read(&mut buf[..n])
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn end_request(app_status: u32, protocol_status: u8) -> Vec<u8> {
    let mut body = app_status.to_be_bytes().to_vec();
    body.extend([protocol_status, 0, 0, 0]);
    body
}

#[test]
fn records_round_trip() {
    let mut buf = Vec::new();
    let sizes = [0usize, 1, 7, 8, 9, 127, 128, 1000, 65535];
    for (i, &n) in sizes.iter().enumerate() {
        let content: Vec<u8> = (0..n).map(|b| (b * 31 + i) as u8).collect();
        write_record(&mut buf, FCGI_STDOUT, i as u16 + 1, &content).unwrap();
        assert_eq!(buf.len() % 8, 0, "padded to 8");
    }
    write_record_padded(&mut buf, FCGI_STDERR, 0xfffe, b"odd", 255).unwrap();
    let mut r = Cursor::new(buf);
    for (i, &n) in sizes.iter().enumerate() {
        let (kind, id, content) = read_record(&mut r).expect("record");
        assert_eq!((kind, id, content.len()), (FCGI_STDOUT, i as u16 + 1, n));
        assert!(
            content
                .iter()
                .enumerate()
                .all(|(b, &v)| v == (b * 31 + i) as u8)
        );
    }
    assert_eq!(
        read_record(&mut r),
        Some((FCGI_STDERR, 0xfffe, b"odd".to_vec()))
    );
    assert_eq!(read_record(&mut r), None, "clean EOF");

    // Header layout, byte for byte.
    assert_eq!(
        record_bytes(FCGI_PARAMS, 0x0102, b"abc", 5),
        [1, 4, 1, 2, 0, 3, 5, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]
    );
    // Truncated record and wrong version are errors, not EOF.
    assert!(try_read_record(&mut Cursor::new(vec![1u8, 6, 0, 1, 0, 4, 0, 0, b'x'])).is_err());
    assert!(try_read_record(&mut Cursor::new(vec![1u8, 6, 0])).is_err());
    assert!(try_read_record(&mut Cursor::new(vec![2u8, 6, 0, 1, 0, 0, 0, 0])).is_err());
}

#[test]
fn pairs_round_trip() {
    let long_name = vec![b'N'; 200];
    let long_value = vec![b'v'; 70_000];
    let pairs: Vec<(&[u8], &[u8])> = vec![
        (b"REQUEST_METHOD", b"GET"),
        (b"EMPTY", b""),
        (&long_name, b"x"),
        (b"BIG", &long_value),
        (b"BIN", b"\x00\xff\r\n"),
    ];
    let bytes = encode_pairs(&pairs);
    assert_eq!(&bytes[..2], [14, 3]);
    let back = decode_pairs(&bytes).unwrap();
    assert_eq!(as_pairs(&back), pairs);
    // 127 is the last 1-byte length; 128 takes 4 bytes with the high bit set.
    assert_eq!(encode_pairs(&[(&[b'a'; 127][..], b"")])[..2], [127, 0]);
    assert_eq!(
        encode_pairs(&[(&[b'a'; 128][..], b"")])[..5],
        [0x80, 0, 0, 128, 0]
    );
    assert!(decode_pairs(&[5, 0, b'a']).is_err());
}

#[test]
fn request_bytes_are_what_a_web_server_sends() {
    let params = get_params("code=abc&state=xyz");
    let long = vec![b'q'; 70_000]; // PARAMS split over two records
    let mut with_long = params.clone();
    set_param(&mut with_long, "QUERY_STRING", &long);
    let bytes = request_bytes(7, &as_pairs(&with_long), b"", true);
    let mut r = Cursor::new(bytes);

    let (kind, id, body) = read_record(&mut r).unwrap();
    assert_eq!((kind, id), (FCGI_BEGIN_REQUEST, 7));
    assert_eq!(body, begin_request_body(FCGI_RESPONDER, FCGI_KEEP_CONN));
    assert_eq!(body, [0, 1, 1, 0, 0, 0, 0, 0]);

    let mut stream = Vec::new();
    let mut params_records = 0;
    loop {
        let (kind, id, body) = read_record(&mut r).unwrap();
        assert_eq!((kind, id), (FCGI_PARAMS, 7));
        params_records += 1;
        if body.is_empty() {
            break;
        }
        stream.extend(body);
    }
    assert_eq!(params_records, 3, "two data records and the empty one");
    let decoded = decode_pairs(&stream).unwrap();
    assert_eq!(decoded, with_long);
    assert_eq!(read_record(&mut r), Some((FCGI_STDIN, 7, Vec::new())));
    assert_eq!(read_record(&mut r), None);

    let no_keep = request_bytes(1, &as_pairs(&params), b"", false);
    assert_eq!(no_keep[8..16], begin_request_body(FCGI_RESPONDER, 0));

    // The other roles of the spec, for requests the relay must refuse.
    assert_eq!(
        begin_request_body(FCGI_AUTHORIZER, 0),
        [0, 2, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(begin_request_body(FCGI_FILTER, 0), [0, 3, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn get_params_look_like_mod_fcgid() {
    let params = get_params("code=a&state=b");
    let get = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };
    assert_eq!(get("REQUEST_METHOD").as_deref(), Some("GET"));
    assert_eq!(get("QUERY_STRING").as_deref(), Some("code=a&state=b"));
    assert_eq!(get("SCRIPT_NAME").as_deref(), Some("/register"));
    assert_eq!(get("PATH_INFO").as_deref(), Some(""));
    assert_eq!(
        get("REQUEST_URI").as_deref(),
        Some("/register?code=a&state=b")
    );
    let head = method_params_bytes("HEAD", b"");
    assert!(head.contains(&(b"REQUEST_METHOD".to_vec(), b"HEAD".to_vec())));
    assert!(head.contains(&(b"REQUEST_URI".to_vec(), b"/register".to_vec())));
}

#[test]
fn fcgi_request_collects_a_reply() {
    let mut server = Vec::new();
    write_record(
        &mut server,
        FCGI_STDOUT,
        3,
        b"Status: 404 Not Found\r\nContent-Type: text/html\r\n",
    )
    .unwrap();
    write_record(&mut server, FCGI_STDERR, 3, b"a warning").unwrap();
    write_record(
        &mut server,
        FCGI_STDOUT,
        3,
        b"Content-Length: 4\r\n\r\nnope",
    )
    .unwrap();
    write_record(&mut server, FCGI_STDOUT, 3, b"").unwrap();
    write_record(
        &mut server,
        FCGI_END_REQUEST,
        3,
        &end_request(0, FCGI_REQUEST_COMPLETE),
    )
    .unwrap();
    let mut s = Duplex {
        input: Cursor::new(server),
        output: Vec::new(),
    };
    let reply = fcgi_get(&mut s, 3, "code=a&state=b", false);
    assert_eq!(reply.app_status, 0);
    assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE);
    assert!(reply.stdout_ended);
    assert_eq!(reply.stderr_text(), "a warning");
    let http = reply.http();
    assert_eq!(http.status, 404);
    assert_eq!(http.reason, "Not Found");
    assert_eq!(http.header("content-type"), Some("text/html"));
    assert_eq!(http.body, "nope");
    // What went out is exactly one request.
    assert_eq!(
        s.output,
        request_bytes(3, &as_pairs(&get_params("code=a&state=b")), b"", false)
    );
}

#[test]
fn multiplexed_replies_and_protocol_errors() {
    let mut server = Vec::new();
    write_record(&mut server, FCGI_STDOUT, 2, b"two").unwrap();
    write_record(&mut server, FCGI_STDOUT, 1, b"one").unwrap();
    write_record(&mut server, FCGI_STDOUT, 2, b"").unwrap();
    write_record(
        &mut server,
        FCGI_END_REQUEST,
        2,
        &end_request(7, FCGI_REQUEST_COMPLETE),
    )
    .unwrap();
    write_record(
        &mut server,
        FCGI_END_REQUEST,
        1,
        &end_request(0, FCGI_OVERLOADED),
    )
    .unwrap();
    let replies = read_replies(&mut Cursor::new(server), &[1, 2]);
    assert_eq!(replies[0].stdout, b"one");
    assert!(!replies[0].stdout_ended);
    assert_eq!(replies[0].protocol_status, FCGI_OVERLOADED);
    assert_eq!(replies[1].stdout, b"two");
    assert_eq!(replies[1].app_status, 7);

    // A record for an id nobody asked about.
    let mut server = Vec::new();
    write_record(&mut server, FCGI_STDOUT, 9, b"x").unwrap();
    assert!(try_read_reply(&mut Cursor::new(server), 1).is_err());
    // EOF before END_REQUEST.
    let mut server = Vec::new();
    write_record(&mut server, FCGI_STDOUT, 1, b"x").unwrap();
    assert!(
        try_read_reply(&mut Cursor::new(server), 1)
            .unwrap_err()
            .contains("closed")
    );
    // STDOUT after its end.
    let mut server = Vec::new();
    write_record(&mut server, FCGI_STDOUT, 1, b"").unwrap();
    write_record(&mut server, FCGI_STDOUT, 1, b"late").unwrap();
    assert!(try_read_reply(&mut Cursor::new(server), 1).is_err());
}

#[test]
fn get_values_client() {
    let mut server = Vec::new();
    let result = encode_pairs(&[(b"FCGI_MPXS_CONNS", b"0"), (b"FCGI_MAX_CONNS", b"16")]);
    write_record(&mut server, FCGI_GET_VALUES_RESULT, 0, &result).unwrap();
    let mut s = Duplex {
        input: Cursor::new(server),
        output: Vec::new(),
    };
    let got = get_values(&mut s, &[b"FCGI_MPXS_CONNS", b"FCGI_MAX_CONNS"]);
    assert_eq!(got[1], (b"FCGI_MAX_CONNS".to_vec(), b"16".to_vec()));
    let (kind, id, body) = read_record(&mut Cursor::new(s.output)).unwrap();
    assert_eq!((kind, id), (FCGI_GET_VALUES, 0));
    assert_eq!(
        decode_pairs(&body).unwrap(),
        [
            (b"FCGI_MPXS_CONNS".to_vec(), Vec::new()),
            (b"FCGI_MAX_CONNS".to_vec(), Vec::new())
        ]
    );
}

// ---------------------------------------------------------------------------
// CGI output and JSON parsing
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Server helpers
// ---------------------------------------------------------------------------

/// A client connection against a listener of the test's own: a clone
/// writes on the same connection, and `closed_within` sees the peer go.
#[test]
fn conn_clones_share_the_connection() {
    let dir = TempDir::new("conn");
    let path = dir.join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let endpoint = Endpoint::Unix(path.clone());
    assert_eq!(endpoint.spec(), format!("unix:{}", path.display()));
    let conn = endpoint.connect().unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut clone = conn.try_clone().unwrap();
    clone.write_all(b"through the clone").unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"through the clone");
    drop(peer);
    assert!(clone.closed_within(Duration::from_secs(10)));
}

/// The server helpers on the binary itself: its `listening on` line, the
/// process behind `pid`, and `kill` leaving nothing that accepts.
#[test]
fn listen_server_helpers_drive_the_binary() {
    let mut server = ListenServer::start_unix(&[("REGISTER_STATE_DIR", "off")]);
    assert!(
        server.wait_stderr_contains("listening on", SERVER_START_TIMEOUT),
        "{}",
        server.stderr_text()
    );
    let exe = std::fs::read_link(format!("/proc/{}/exe", server.pid())).unwrap();
    assert_eq!(exe.canonicalize().unwrap(), bin().canonicalize().unwrap());
    server.kill();
    assert!(server.try_wait().is_some(), "not reaped after kill");
    assert!(server.try_connect().is_err(), "a killed server accepts");
}

// ---------------------------------------------------------------------------
// CGI output and JSON
// ---------------------------------------------------------------------------

#[test]
fn cgi_output_parsing() {
    let http = parse_cgi(b"Status: 502 Bad Gateway\r\nContent-Type: text/html; charset=utf-8\r\nX-A: 1\r\nx-a: 2\r\n\r\n<p>\xff</p>");
    assert_eq!(http.status, 502);
    assert_eq!(http.reason, "Bad Gateway");
    assert_eq!(
        http.header("CONTENT-TYPE"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(http.header_all("X-A"), ["1", "2"]);
    assert_eq!(http.header("Status"), None);
    assert_eq!(http.body_bytes, b"<p>\xff</p>");
    assert_eq!(http.body, "<p>\u{fffd}</p>");

    let http = parse_cgi(b"Content-Type: text/plain\r\n\r\n");
    assert_eq!(http.status, 200, "no Status means 200");
    assert!(http.body.is_empty());

    for bad in [
        &b"Status: 200 OK\n\n"[..],
        b"Status: 200 OK\r\nBroken\r\n\r\n",
        b"Status: 200 OK\r\nStatus: 200 OK\r\n\r\n",
        b"Status: 20 OK\r\n\r\n",
        b"Status: 200 OK\r\nBad Name: x\r\n\r\n",
        b"Status: 200 OK\r\nA: b\nC: d\r\n\r\n",
    ] {
        assert!(
            try_parse_cgi(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn json_parsing() {
    let j = parse_json(
        r#" {"a": [1, -2.5e3, true, false, null], "b": "x\"\\\/\n\u0041\ud83d\ude00", "c": {}} "#,
    )
    .unwrap();
    assert_eq!(
        j.get("a").and_then(Json::as_array).map(|a| a.len()),
        Some(5)
    );
    assert_eq!(
        j.get("a").unwrap().as_array().unwrap()[1].as_f64(),
        Some(-2500.0)
    );
    assert_eq!(j.get("b").and_then(Json::as_str), Some("x\"\\/\nA😀"));
    assert_eq!(j.get("c"), Some(&serde_json::json!({})));
    for bad in [
        "",
        "{",
        "[1,]",
        "{\"a\" 1}",
        "\"\\ud800\"",
        "1 2",
        "\"\u{1}\"",
        "nul",
    ] {
        assert!(parse_json(bad).is_err(), "{bad:?}");
    }
}

/// Every `tests/*.rs` file is a module of `tests/tests.rs`: with
/// `autotests = false`, a suite without its `mod` line would never be
/// compiled, and its tests would be lost without a word.
#[test]
fn every_suite_is_compiled() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let root = std::fs::read_to_string(dir.join("tests.rs")).expect("reading tests/tests.rs");
    let declared: Vec<&str> = root
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mod ")?.strip_suffix(';'))
        .collect();
    let mut suites = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("reading tests/") {
        let path = entry.expect("tests/ entry").path();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if path.extension().is_some_and(|e| e == "rs") && stem != "tests" {
            suites.push(stem.to_string());
        }
    }
    assert!(
        suites.len() >= 9,
        "found only {suites:?} in {}",
        dir.display()
    );
    for suite in &suites {
        assert!(
            declared.contains(&suite.as_str()),
            "tests/{suite}.rs has no `mod {suite};` line in tests/tests.rs: its tests never run"
        );
    }
    assert!(declared.contains(&"support"), "{declared:?}");
}

/// The harness is written from the specs, never from `src/`: a bug in the
/// crate's FastCGI or CGI code must not be able to hide behind the same bug
/// in the client that tests it.
#[test]
fn the_harness_does_not_use_the_crate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("reading tests/support") {
        let path = entry.expect("tests/support entry").path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            !text.contains("tourney_register"),
            "{} uses the crate under test",
            path.display()
        );
        files += 1;
    }
    assert!(files >= 10, "only {files} files in {}", dir.display());
}

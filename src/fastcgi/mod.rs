//! A small FastCGI 1.0 responder: an I/O-free connection state machine
//! ([`Connection`]) and a blocking driver for it ([`serve_connection`]).
//!
//! The project speaks FastCGI itself rather than through the `fastcgi`
//! crate for two reasons. That crate decodes params as UTF-8 and drops
//! *all* of them when one is not, so a browser sending a Latin-1
//! `User-Agent` cost the player the query string. And it panics on
//! malformed records, taking the worker down with the connection. Here
//! params stay bytes from the socket to [`Request::from_params`], and every
//! length read off the wire is checked before it is used: a bad stream ends
//! its connection with an error, never with a panic.
//!
//! What is supported is what a web server in front of a responder uses:
//!
//! * the `RESPONDER` role, one request at a time per connection, with or
//!   without `FCGI_KEEP_CONN`;
//! * `FCGI_GET_VALUES` for `FCGI_MAX_CONNS`, `FCGI_MAX_REQS` and
//!   `FCGI_MPXS_CONNS`;
//! * `FCGI_ABORT_REQUEST` for a request whose handler has not run yet.
//!
//! The rest gets the answer the specification asks for: other roles
//! `FCGI_UNKNOWN_ROLE`, a second concurrent request `FCGI_CANT_MPX_CONN`,
//! management records we do not know `FCGI_UNKNOWN_TYPE`. The request body
//! (STDIN) is read and thrown away, since the relay only looks at the query
//! string.
//!
//! Memory and time are bounded ([`Limits`]): params and body have caps, a
//! record holds at most 64 KiB, a whole request has a deadline from its
//! first byte, and so has the wait between requests; management records
//! and records for other request ids count against the same deadline.
//! [`Connection`] reports its deadline; the driver waits no longer. Any
//! I/O error, timeouts included, ends the connection.
//!
//! The `appStatus` of an END_REQUEST record is 0 when a CGI response went
//! out on STDOUT and 1 when the request ended without one (aborted, or
//! refused by protocol status). Web servers only log it.

mod blocking;
mod conn;
mod duplex;
mod wire;

pub use blocking::{TimedStream, reject_overloaded, serve_connection};
pub use conn::{Connection, Error, Step, TurnAway, encode_overloaded, turn_away};
pub use duplex::Duplex;
pub use wire::{
    FLAG_KEEP_CONN, HEADER_LEN, Header, ProtocolStatus, RecordType, Role, begin_request_body,
    encode_end_request, encode_pair, encode_record, encode_stream, parse_header, parse_pairs,
};

#[cfg(doc)]
use crate::http::Request;
#[cfg(doc)]
use crate::limits::Limits;

#[cfg(test)]
mod tests {
    use super::*;

    use std::cell::{Cell, RefCell};
    use std::io::{self, Read, Write};
    use std::time::{Duration, Instant};

    use crate::http::{Request, Response};
    use crate::limits::Limits;

    const BEGIN_REQUEST: u8 = RecordType::BeginRequest as u8;
    const ABORT_REQUEST: u8 = RecordType::AbortRequest as u8;
    const END_REQUEST: u8 = RecordType::EndRequest as u8;
    const PARAMS: u8 = RecordType::Params as u8;
    const STDIN: u8 = RecordType::Stdin as u8;
    const STDOUT: u8 = RecordType::Stdout as u8;
    const GET_VALUES: u8 = RecordType::GetValues as u8;
    const GET_VALUES_RESULT: u8 = RecordType::GetValuesResult as u8;
    const UNKNOWN_TYPE: u8 = RecordType::UnknownType as u8;
    const ROLE_RESPONDER: u16 = Role::Responder as u16;
    const REQUEST_COMPLETE: u8 = ProtocolStatus::RequestComplete as u8;
    const CANT_MPX_CONN: u8 = ProtocolStatus::CantMpxConn as u8;
    const OVERLOADED: u8 = ProtocolStatus::Overloaded as u8;
    const UNKNOWN_ROLE: u8 = ProtocolStatus::UnknownRole as u8;

    use super::conn::plain_text;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn begin(id: u16, role: u16, keep_conn: bool, out: &mut Vec<u8>) {
        encode_record(BEGIN_REQUEST, id, &begin_request_body(role, keep_conn), out);
    }

    fn params_stream(id: u16, pairs: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
        let mut buf = Vec::new();
        for (n, v) in pairs {
            assert!(encode_pair(n, v, &mut buf));
        }
        encode_stream(RecordType::Params, id, &buf, out);
    }

    /// A complete responder request with an empty body.
    fn request(id: u16, keep_conn: bool, pairs: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
        begin(id, ROLE_RESPONDER, keep_conn, out);
        params_stream(id, pairs, out);
        encode_record(STDIN, id, &[], out);
    }

    fn get(query: &[u8]) -> Vec<(&'static [u8], &[u8])> {
        vec![(b"REQUEST_METHOD", b"GET"), (b"QUERY_STRING", query)]
    }

    /// Splits output into (kind, id, content) records, failing on any
    /// malformed one.
    fn records(mut bytes: &[u8]) -> Vec<(u8, u16, Vec<u8>)> {
        let mut recs = Vec::new();
        while !bytes.is_empty() {
            let (raw, rest) = bytes.split_first_chunk::<HEADER_LEN>().unwrap();
            let h = parse_header(raw).unwrap();
            let len = usize::from(h.content_length);
            let pad = usize::from(h.padding_length);
            recs.push((h.kind, h.request_id, rest[..len].to_vec()));
            bytes = &rest[len + pad..];
        }
        recs
    }

    fn stdout_of(recs: &[(u8, u16, Vec<u8>)], id: u16) -> Vec<u8> {
        recs.iter()
            .filter(|r| r.0 == STDOUT && r.1 == id)
            .flat_map(|r| r.2.iter().copied())
            .collect()
    }

    fn end_body(app: u32, proto: u8) -> Vec<u8> {
        let mut body = app.to_be_bytes().to_vec();
        body.extend_from_slice(&[proto, 0, 0, 0]);
        body
    }

    fn ok_response(req: &Request) -> Response {
        Response {
            status: 200,
            headers: vec![("Content-Type", "text/plain".into())],
            body: req.query.clone(),
        }
    }

    /// Serves `input` with a handler that records what it saw.
    fn serve(input: Vec<u8>, limits: &Limits) -> (io::Result<()>, Vec<Request>, Vec<u8>) {
        let seen = RefCell::new(Vec::new());
        let handler = |req: &Request| {
            seen.borrow_mut().push(req.clone());
            ok_response(req)
        };
        let mut duplex = Duplex::new(input);
        let result = serve_connection(&mut duplex, &handler, limits);
        (result, seen.into_inner(), duplex.output)
    }

    #[test]
    fn header_round_trip_and_bad_version() {
        let mut out = Vec::new();
        encode_record(STDIN, 0x1234, b"abc", &mut out);
        assert_eq!(out, b"\x01\x05\x12\x34\x00\x03\x00\x00abc");
        let raw: [u8; 8] = out[..8].try_into().unwrap();
        let h = parse_header(&raw).unwrap();
        assert_eq!(
            h,
            Header {
                kind: STDIN,
                request_id: 0x1234,
                content_length: 3,
                padding_length: 0
            }
        );
        assert_eq!(parse_header(b"\x02\x05\x00\x01\x00\x00\x00\x00"), None);
    }

    #[test]
    fn long_content_is_split_and_empty_content_is_one_record() {
        let mut out = Vec::new();
        encode_record(STDOUT, 1, &vec![7; 70_000], &mut out);
        let recs = records(&out);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].2.len(), 65535);
        assert_eq!(recs[1].2.len(), 70_000 - 65535);
        out.clear();
        encode_record(STDOUT, 1, &[], &mut out);
        assert_eq!(out, b"\x01\x06\x00\x01\x00\x00\x00\x00");
    }

    #[test]
    fn pairs_short_and_long_lengths() {
        let long = vec![b'x'; 200];
        let mut buf = Vec::new();
        assert!(encode_pair(b"A", b"", &mut buf));
        assert!(encode_pair(b"LONG", &long, &mut buf));
        assert_eq!(&buf[..3], b"\x01\x00A");
        assert_eq!(&buf[3..8], b"\x04\x80\x00\x00\xc8");
        let pairs = parse_pairs(&buf).unwrap();
        assert_eq!(
            pairs,
            vec![(&b"A"[..], &b""[..]), (&b"LONG"[..], &long[..])]
        );
        assert_eq!(parse_pairs(b""), Some(vec![]));
    }

    #[test]
    fn pairs_pointing_past_the_buffer_are_rejected() {
        assert_eq!(parse_pairs(b"\x05\x00abc"), None);
        assert_eq!(parse_pairs(b"\x01\x05ab"), None);
        assert_eq!(parse_pairs(b"\x80\x00"), None);
        assert_eq!(parse_pairs(b"\x01"), None);
        assert_eq!(parse_pairs(b"\xff\xff\xff\xff\x00"), None);
    }

    #[test]
    fn simple_request() {
        let mut input = Vec::new();
        request(1, false, &get(b"code=abc&state=xyz"), &mut input);
        let (result, seen, output) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, b"GET");
        let recs = records(&output);
        let body = String::from_utf8(stdout_of(&recs, 1)).unwrap();
        assert!(body.starts_with("Status: 200 OK\r\n"), "{body}");
        assert!(body.ends_with("\r\n\r\ncode=abc&state=xyz"), "{body}");
        let n = recs.len();
        assert_eq!(recs[n - 2], (STDOUT, 1, vec![]));
        assert_eq!(recs[n - 1], (END_REQUEST, 1, end_body(0, REQUEST_COMPLETE)));
    }

    #[test]
    fn latin1_param_does_not_drop_the_query() {
        let mut input = Vec::new();
        let pairs: &[(&[u8], &[u8])] = &[
            (b"HTTP_USER_AGENT", b"caf\xe9"),
            (b"REQUEST_METHOD", b"GET"),
            (b"QUERY_STRING", b"code=a%E9&state=b"),
            (b"HTTP_X_\xff", b"\x80"),
        ];
        request(1, false, pairs, &mut input);
        let (result, seen, _) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].query, b"code=a%E9&state=b");
    }

    #[test]
    fn params_split_mid_pair_across_records() {
        let mut pairs = Vec::new();
        for (n, v) in get(b"code=c&state=s") {
            encode_pair(n, v, &mut pairs);
        }
        let mut input = Vec::new();
        begin(3, ROLE_RESPONDER, false, &mut input);
        for piece in pairs.chunks(5) {
            encode_record(PARAMS, 3, piece, &mut input);
        }
        encode_record(PARAMS, 3, &[], &mut input);
        encode_record(STDIN, 3, b"ignored body", &mut input);
        encode_record(STDIN, 3, &[], &mut input);
        let (result, seen, _) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen[0].query, b"code=c&state=s");
    }

    #[test]
    fn padding_is_skipped() {
        let mut input = Vec::new();
        // BEGIN_REQUEST with 3 bytes of padding.
        input.extend_from_slice(
            b"\x01\x01\x00\x01\x00\x08\x03\x00\x00\x01\x00\x00\x00\x00\x00\x00ppp",
        );
        params_stream(1, &get(b"q=1"), &mut input);
        encode_record(STDIN, 1, &[], &mut input);
        let (result, seen, _) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen[0].query, b"q=1");
    }

    #[test]
    fn keep_conn_serves_two_requests_then_clean_eof() {
        let mut input = Vec::new();
        request(1, true, &get(b"n=1"), &mut input);
        request(2, true, &get(b"n=2"), &mut input);
        let (result, seen, output) = serve(input, &Limits::default());
        result.unwrap();
        let queries: Vec<_> = seen.iter().map(|r| r.query.clone()).collect();
        assert_eq!(queries, vec![b"n=1".to_vec(), b"n=2".to_vec()]);
        let recs = records(&output);
        assert!(stdout_of(&recs, 1).ends_with(b"n=1"));
        assert!(stdout_of(&recs, 2).ends_with(b"n=2"));
        let ends = recs.iter().filter(|r| r.0 == END_REQUEST).count();
        assert_eq!(ends, 2);
    }

    #[test]
    fn one_write_per_request_even_for_long_output() {
        let handler = |_: &Request| Response {
            status: 200,
            headers: vec![],
            body: vec![b'x'; 100_000],
        };
        let mut input = Vec::new();
        request(1, true, &get(b""), &mut input);
        request(2, false, &get(b""), &mut input);
        let mut duplex = Duplex::new(input);
        serve_connection(&mut duplex, &handler, &Limits::default()).unwrap();
        assert_eq!(duplex.writes, 2);
        let recs = records(&duplex.output);
        assert!(stdout_of(&recs, 1).ends_with(&[b'x'; 100_000]));
        assert!(stdout_of(&recs, 2).ends_with(&[b'x'; 100_000]));
    }

    #[test]
    fn a_trickling_socket_reads_the_same() {
        let mut input = Vec::new();
        request(1, true, &get(b"n=1"), &mut input);
        request(2, false, &get(b"n=2"), &mut input);
        let mut whole = Duplex::new(input.clone());
        serve_connection(&mut whole, &ok_response, &Limits::default()).unwrap();
        let mut trickle = Duplex::chunked(input, vec![1]);
        serve_connection(&mut trickle, &ok_response, &Limits::default()).unwrap();
        assert_eq!(whole.output, trickle.output);
    }

    #[test]
    fn without_keep_conn_the_rest_is_not_read() {
        let mut input = Vec::new();
        request(1, false, &get(b"n=1"), &mut input);
        request(2, false, &get(b"n=2"), &mut input);
        let (result, seen, _) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn head_leaves_out_the_body() {
        let mut input = Vec::new();
        let pairs: &[(&[u8], &[u8])] = &[(b"REQUEST_METHOD", b"HEAD"), (b"QUERY_STRING", b"abc")];
        request(1, false, pairs, &mut input);
        let (result, _, output) = serve(input, &Limits::default());
        result.unwrap();
        let body = String::from_utf8(stdout_of(&records(&output), 1)).unwrap();
        assert!(body.ends_with("Content-Length: 3\r\n\r\n"), "{body}");
    }

    #[test]
    fn get_values_answers_known_names_once() {
        let mut query = Vec::new();
        for name in [
            &b"FCGI_MPXS_CONNS"[..],
            b"FCGI_MAX_CONNS",
            b"NOPE",
            b"FCGI_MAX_CONNS",
        ] {
            encode_pair(name, b"", &mut query);
        }
        let mut input = Vec::new();
        encode_record(GET_VALUES, 0, &query, &mut input);
        let limits = Limits {
            max_conns: 12,
            ..Limits::default()
        };
        let (result, seen, output) = serve(input, &limits);
        result.unwrap();
        assert!(seen.is_empty());
        let recs = records(&output);
        assert_eq!(recs.len(), 1);
        assert_eq!((recs[0].0, recs[0].1), (GET_VALUES_RESULT, 0));
        let pairs = parse_pairs(&recs[0].2).unwrap();
        assert_eq!(
            pairs,
            vec![
                (&b"FCGI_MAX_CONNS"[..], &b"12"[..]),
                (&b"FCGI_MPXS_CONNS"[..], &b"0"[..])
            ]
        );
    }

    #[test]
    fn unknown_management_type() {
        let mut input = Vec::new();
        encode_record(42, 0, b"whatever", &mut input);
        request(1, false, &get(b"x"), &mut input);
        let (result, seen, output) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen.len(), 1);
        let recs = records(&output);
        assert_eq!(recs[0], (UNKNOWN_TYPE, 0, vec![42, 0, 0, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn unknown_role() {
        let mut input = Vec::new();
        begin(1, 2, false, &mut input);
        let (result, seen, output) = serve(input, &Limits::default());
        result.unwrap();
        assert!(seen.is_empty());
        assert_eq!(
            records(&output),
            vec![(END_REQUEST, 1, end_body(1, UNKNOWN_ROLE))]
        );
    }

    #[test]
    fn unknown_role_with_keep_conn_goes_on() {
        let mut input = Vec::new();
        begin(1, 3, true, &mut input);
        encode_record(PARAMS, 1, b"\x01\x01ab", &mut input);
        request(2, false, &get(b"after"), &mut input);
        let (result, seen, _) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].query, b"after");
    }

    #[test]
    fn second_request_id_is_refused_and_the_first_served() {
        let mut input = Vec::new();
        begin(1, ROLE_RESPONDER, false, &mut input);
        begin(2, ROLE_RESPONDER, false, &mut input);
        encode_record(PARAMS, 2, b"\x01\x01ab", &mut input);
        params_stream(1, &get(b"first"), &mut input);
        encode_record(STDIN, 2, &[], &mut input);
        encode_record(STDIN, 1, &[], &mut input);
        let (result, seen, output) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].query, b"first");
        let recs = records(&output);
        assert_eq!(recs[0], (END_REQUEST, 2, end_body(1, CANT_MPX_CONN)));
        assert!(stdout_of(&recs, 1).ends_with(b"first"));
        assert!(stdout_of(&recs, 2).is_empty());
    }

    #[test]
    fn abort_before_handler() {
        let calls = Cell::new(0);
        let handler = |req: &Request| {
            calls.set(calls.get() + 1);
            ok_response(req)
        };
        let mut input = Vec::new();
        begin(1, ROLE_RESPONDER, true, &mut input);
        params_stream(1, &get(b"aborted"), &mut input);
        encode_record(ABORT_REQUEST, 1, &[], &mut input);
        encode_record(STDIN, 1, &[], &mut input);
        let mut duplex = Duplex::new(input);
        serve_connection(&mut duplex, &handler, &Limits::default()).unwrap();
        assert_eq!(calls.get(), 0);
        assert_eq!(
            records(&duplex.output),
            vec![(END_REQUEST, 1, end_body(1, REQUEST_COMPLETE))]
        );
    }

    #[test]
    fn params_over_the_cap_get_400_and_close() {
        let limits = Limits {
            max_params_bytes: 32,
            ..Limits::default()
        };
        let mut input = Vec::new();
        request(1, true, &[(b"QUERY_STRING", &[b'q'; 40])], &mut input);
        request(2, true, &get(b"never"), &mut input);
        let (result, seen, output) = serve(input, &limits);
        result.unwrap();
        assert!(seen.is_empty());
        let recs = records(&output);
        let body = String::from_utf8(stdout_of(&recs, 1)).unwrap();
        assert!(body.starts_with("Status: 400 Bad Request\r\n"), "{body}");
        assert!(body.contains("Content-Type: text/plain"), "{body}");
        assert_eq!(
            recs.last().unwrap(),
            &(END_REQUEST, 1, end_body(0, REQUEST_COMPLETE))
        );
        assert!(stdout_of(&recs, 2).is_empty());
    }

    #[test]
    fn params_exactly_at_the_cap_are_fine() {
        let mut pairs = Vec::new();
        for (n, v) in get(b"x=1") {
            encode_pair(n, v, &mut pairs);
        }
        let limits = Limits {
            max_params_bytes: pairs.len(),
            ..Limits::default()
        };
        let mut input = Vec::new();
        request(1, false, &get(b"x=1"), &mut input);
        let (result, seen, _) = serve(input, &limits);
        result.unwrap();
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn body_is_discarded_and_capped() {
        let mut input = Vec::new();
        begin(1, ROLE_RESPONDER, false, &mut input);
        params_stream(1, &get(b"b"), &mut input);
        encode_record(STDIN, 1, &[0; 10], &mut input);
        encode_record(STDIN, 1, &[0; 10], &mut input);
        encode_record(STDIN, 1, &[], &mut input);
        let fits = Limits {
            max_stdin_bytes: 20,
            ..Limits::default()
        };
        let (result, seen, _) = serve(input.clone(), &fits);
        result.unwrap();
        assert_eq!(seen.len(), 1);
        let over = Limits {
            max_stdin_bytes: 19,
            ..Limits::default()
        };
        let (result, seen, output) = serve(input, &over);
        result.unwrap();
        assert!(seen.is_empty());
        assert!(stdout_of(&records(&output), 1).starts_with(b"Status: 400 "));
    }

    #[test]
    fn malformed_params_get_400_without_handler() {
        let mut input = Vec::new();
        begin(1, ROLE_RESPONDER, true, &mut input);
        encode_record(PARAMS, 1, b"\x0c\x03QUERY_STRING", &mut input);
        encode_record(PARAMS, 1, &[], &mut input);
        encode_record(STDIN, 1, &[], &mut input);
        request(2, false, &get(b"next"), &mut input);
        let (result, seen, output) = serve(input, &Limits::default());
        result.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].query, b"next");
        assert!(stdout_of(&records(&output), 1).starts_with(b"Status: 400 "));
    }

    #[test]
    fn truncated_streams_end_without_panic() {
        let mut input = Vec::new();
        request(1, false, &get(b"code=abc&state=xyz"), &mut input);
        for cut in 0..input.len() {
            let (result, seen, _) = serve(input[..cut].to_vec(), &Limits::default());
            assert!(seen.is_empty(), "cut at {cut}");
            // Only a cut at a record boundary before BEGIN is a clean close.
            assert_eq!(result.is_ok(), cut == 0, "cut at {cut}: {result:?}");
        }
    }

    #[test]
    fn bad_version_and_short_begin_are_errors() {
        let (result, _, _) = serve(
            b"\x00\x01\x00\x01\x00\x00\x00\x00".to_vec(),
            &Limits::default(),
        );
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut input = Vec::new();
        encode_record(BEGIN_REQUEST, 1, &[0, 1, 0], &mut input);
        let (result, _, _) = serve(input, &Limits::default());
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn read_errors_end_the_connection() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        impl Write for Failing {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl TimedStream for Failing {
            fn set_read_timeout(&mut self, _: Duration) -> io::Result<()> {
                Ok(())
            }
            fn set_write_timeout(&mut self, _: Duration) -> io::Result<()> {
                Ok(())
            }
        }
        let result = serve_connection(&mut Failing, &ok_response, &Limits::default());
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn overloaded_gets_503() {
        let mut input = Vec::new();
        request(5, false, &get(b"x"), &mut input);
        let mut duplex = Duplex::new(input);
        reject_overloaded(&mut duplex, || plain_text(503, "busy, try again\n"), far()).unwrap();
        let recs = records(&duplex.output);
        let body = String::from_utf8(stdout_of(&recs, 5)).unwrap();
        assert!(
            body.starts_with("Status: 503 Service Unavailable\r\n"),
            "{body}"
        );
        assert!(body.ends_with("busy, try again\n"), "{body}");
        assert_eq!(
            recs.last().unwrap(),
            &(END_REQUEST, 5, end_body(0, OVERLOADED))
        );
        assert_eq!(duplex.writes, 1);
    }

    #[test]
    fn overloaded_without_begin_first_is_left_alone() {
        let mut input = Vec::new();
        encode_record(GET_VALUES, 0, &[], &mut input);
        request(1, false, &get(b"x"), &mut input);
        for input in [
            vec![],
            b"\x01\x01\x00".to_vec(),
            b"\x07\x01\x00\x01\x00\x08\x00\x00".to_vec(),
            input,
        ] {
            let mut duplex = Duplex::new(input);
            reject_overloaded(&mut duplex, || b"Status: 503\r\n\r\n".to_vec(), far()).unwrap();
            assert!(duplex.output.is_empty());
        }
    }
}

//! A small FastCGI 1.0 responder over any `Read + Write` stream.
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
//! Memory and time are bounded: params and body have caps ([`Limits`]), a
//! record holds at most 64 KiB, and the caller's socket timeouts bound every
//! read and write. Any I/O error, timeouts included, ends the connection.
//!
//! The `appStatus` of an END_REQUEST record is 0 when a CGI response went
//! out on STDOUT and 1 when the request ended without one (aborted, or
//! refused by protocol status). Web servers only log it.

use std::io::{self, BufRead, BufReader, Read, Write};

use crate::http::{Request, Response};

/// Size of a record header.
pub const HEADER_LEN: usize = 8;

pub const BEGIN_REQUEST: u8 = 1;
pub const ABORT_REQUEST: u8 = 2;
pub const END_REQUEST: u8 = 3;
pub const PARAMS: u8 = 4;
pub const STDIN: u8 = 5;
pub const STDOUT: u8 = 6;
pub const GET_VALUES: u8 = 9;
pub const GET_VALUES_RESULT: u8 = 10;
pub const UNKNOWN_TYPE: u8 = 11;

/// The only role served.
pub const ROLE_RESPONDER: u16 = 1;
/// BEGIN_REQUEST flag: keep the connection open after this request.
pub const FLAG_KEEP_CONN: u8 = 1;

/// END_REQUEST protocol statuses.
pub const REQUEST_COMPLETE: u8 = 0;
pub const CANT_MPX_CONN: u8 = 1;
pub const OVERLOADED: u8 = 2;
pub const UNKNOWN_ROLE: u8 = 3;

const VERSION: u8 = 1;
const MAX_CONTENT: usize = u16::MAX as usize;
/// A pair length is 31 bits on the wire.
const MAX_PAIR_LEN: usize = 0x7fff_ffff;
const APP_ANSWERED: u32 = 0;
const APP_UNANSWERED: u32 = 1;

/// Caps on what one request may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Total PARAMS payload of one request. Past it the request is answered
    /// `400 Bad Request` without calling the handler, and the connection
    /// is closed.
    pub max_params_bytes: usize,
    /// Total STDIN payload of one request, which is read and discarded.
    /// Past it the request is refused like an oversized PARAMS stream.
    pub max_stdin_bytes: usize,
    /// Reported as `FCGI_MAX_CONNS` and `FCGI_MAX_REQS`; the acceptor is
    /// the one that enforces it.
    pub max_conns: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_params_bytes: 64 * 1024,
            max_stdin_bytes: 64 * 1024,
            max_conns: 256,
        }
    }
}

/// A record header, checked to be FastCGI version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub request_id: u16,
    pub content_length: u16,
    pub padding_length: u8,
}

/// Parses a record header, or returns `None` when its version is not 1.
pub fn parse_header(bytes: &[u8; HEADER_LEN]) -> Option<Header> {
    let [
        version,
        kind,
        id_hi,
        id_lo,
        len_hi,
        len_lo,
        padding_length,
        _reserved,
    ] = *bytes;
    (version == VERSION).then_some(Header {
        kind,
        request_id: u16::from_be_bytes([id_hi, id_lo]),
        content_length: u16::from_be_bytes([len_hi, len_lo]),
        padding_length,
    })
}

/// Splits a FastCGI name-value pair stream into pairs.
///
/// Returns `None` when a length is cut short or points past the end of
/// `buf`, so a caller never acts on half a stream.
pub fn parse_pairs(mut buf: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut pairs = Vec::new();
    while !buf.is_empty() {
        let (name_len, rest) = split_len(buf)?;
        let (value_len, rest) = split_len(rest)?;
        let (name, rest) = rest.split_at_checked(name_len)?;
        let (value, rest) = rest.split_at_checked(value_len)?;
        pairs.push((name, value));
        buf = rest;
    }
    Some(pairs)
}

/// Reads one pair length: a byte below 128, or four bytes with the top
/// bit set.
fn split_len(buf: &[u8]) -> Option<(usize, &[u8])> {
    match buf {
        [b0, rest @ ..] if *b0 < 0x80 => Some((usize::from(*b0), rest)),
        [b0, b1, b2, b3, rest @ ..] => {
            let len = u32::from_be_bytes([b0 & 0x7f, *b1, *b2, *b3]);
            Some((usize::try_from(len).ok()?, rest))
        }
        _ => None,
    }
}

/// Appends `content` as records of type `kind`, without padding.
///
/// Content over 65535 bytes is split over several records, which is right
/// for the stream types (STDOUT and the like). Empty content gives one
/// empty record, which is how a stream ends.
pub fn encode_record(kind: u8, request_id: u16, content: &[u8], out: &mut Vec<u8>) {
    let mut chunks = content.chunks(MAX_CONTENT);
    let first = chunks.next().unwrap_or_default();
    for chunk in std::iter::once(first).chain(chunks) {
        let [id_hi, id_lo] = request_id.to_be_bytes();
        // chunks() keeps every chunk within a u16.
        let [len_hi, len_lo] = (chunk.len() as u16).to_be_bytes();
        out.extend_from_slice(&[VERSION, kind, id_hi, id_lo, len_hi, len_lo, 0, 0]);
        out.extend_from_slice(chunk);
    }
}

/// Appends one name-value pair.
///
/// FastCGI cannot express a name or value longer than 2³¹ − 1 bytes; such
/// a pair is not written and `false` is returned.
pub fn encode_pair(name: &[u8], value: &[u8], out: &mut Vec<u8>) -> bool {
    if name.len() > MAX_PAIR_LEN || value.len() > MAX_PAIR_LEN {
        return false;
    }
    encode_len(name.len(), out);
    encode_len(value.len(), out);
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    true
}

fn encode_len(len: usize, out: &mut Vec<u8>) {
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => out.push(short),
        // The caller checked len <= MAX_PAIR_LEN, so it fits in 31 bits.
        _ => out.extend_from_slice(&(len as u32 | 0x8000_0000).to_be_bytes()),
    }
}

/// Serves requests on one connection until it closes, keep_conn ends, or
/// an error.
///
/// The handler is called at most once per BEGIN_REQUEST, after the whole
/// request (params and body) has arrived. End of stream between requests
/// is a clean close and returns `Ok`; end of stream inside a record or a
/// request, a record that is not version 1 and a short BEGIN_REQUEST body
/// return an error. A request over a cap in `limits` is answered
/// `400 Bad Request` and the connection closed with `Ok`.
pub fn serve_connection<S: Read + Write>(
    stream: &mut S,
    handler: &dyn Fn(&Request) -> Response,
    limits: &Limits,
) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    // Reused across records and requests, so a kept connection does not
    // grow them again for every request.
    let mut content = Vec::new();
    let mut params = Vec::new();
    let mut out = Vec::new();
    let mut active: Option<Active> = None;
    loop {
        let Some(header) = next_record(&mut reader, &mut content)? else {
            return match active {
                None => Ok(()),
                Some(_) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "FastCGI connection closed mid-request",
                )),
            };
        };
        let id = header.request_id;
        out.clear();
        if id == 0 {
            management_reply(header.kind, &content, limits, &mut out);
            send(reader.get_mut(), &out)?;
            continue;
        }
        let Some(mut req) = active.filter(|a| a.id == id) else {
            if header.kind != BEGIN_REQUEST {
                // Not the request in progress: stragglers of an aborted or
                // refused one, or an id that never began.
                continue;
            }
            if active.is_some() {
                end_request(id, APP_UNANSWERED, CANT_MPX_CONN, &mut out);
                send(reader.get_mut(), &out)?;
                continue;
            }
            let (role, keep_conn) = parse_begin(&content)?;
            if role == ROLE_RESPONDER {
                params.clear();
                active = Some(Active {
                    id,
                    keep_conn,
                    stdin_len: 0,
                });
                continue;
            }
            end_request(id, APP_UNANSWERED, UNKNOWN_ROLE, &mut out);
            send(reader.get_mut(), &out)?;
            if keep_conn {
                continue;
            }
            return Ok(());
        };
        match header.kind {
            PARAMS => {
                if params.len() + content.len() > limits.max_params_bytes {
                    return refuse(reader.get_mut(), id, "params over the cap", &mut out);
                }
                params.extend_from_slice(&content);
            }
            STDIN if content.is_empty() && !req.keep_conn => {
                // The connection's last request: nothing after it is read,
                // so the read buffer and the record buffers are given back
                // before the handler waits on the bot (in --listen mode
                // hundreds of threads wait at once, each holding its own).
                let request = request_of(id, &params);
                drop((content, params));
                let stream = reader.into_inner();
                answer(id, request, handler, &mut out);
                return send(stream, &out);
            }
            STDIN if content.is_empty() => {
                answer(id, request_of(id, &params), handler, &mut out);
                send(reader.get_mut(), &out)?;
                active = None;
            }
            STDIN => {
                req.stdin_len = req.stdin_len.saturating_add(content.len());
                if req.stdin_len > limits.max_stdin_bytes {
                    return refuse(reader.get_mut(), id, "body over the cap", &mut out);
                }
                active = Some(req);
            }
            ABORT_REQUEST => {
                end_request(id, APP_UNANSWERED, REQUEST_COMPLETE, &mut out);
                send(reader.get_mut(), &out)?;
                if !req.keep_conn {
                    return Ok(());
                }
                active = None;
            }
            // Nothing else means anything to a responder (a repeated
            // BEGIN_REQUEST, DATA, or records only an application sends).
            _ => {}
        }
    }
}

/// For an acceptor that is at its connection cap: read the first
/// BEGIN_REQUEST (bounded by the socket's timeout), answer `busy` (a
/// response in CGI form, the caller's 503 page) and END_REQUEST with
/// protocol status `FCGI_OVERLOADED`, then return.
///
/// Only the first record header is read. Web servers open with
/// BEGIN_REQUEST, and the acceptor calling this must not be held by a peer
/// that trickles anything longer; a connection that opens otherwise, or
/// closes first, is left unanswered.
pub fn reject_overloaded<S: Read + Write>(stream: &mut S, busy: &[u8]) -> io::Result<()> {
    let mut raw = [0; HEADER_LEN];
    if let Err(e) = stream.read_exact(&mut raw) {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => Ok(()),
            _ => Err(e),
        };
    }
    match parse_header(&raw) {
        Some(h) if h.kind == BEGIN_REQUEST && h.request_id != 0 => {
            let mut out = Vec::with_capacity(busy.len() + 64);
            encode_stream(STDOUT, h.request_id, busy, &mut out);
            end_request(h.request_id, APP_ANSWERED, OVERLOADED, &mut out);
            send(stream, &out)
        }
        _ => Ok(()),
    }
}

/// The request in progress on a connection.
#[derive(Clone, Copy, Debug)]
struct Active {
    id: u16,
    keep_conn: bool,
    stdin_len: usize,
}

/// Reads the next record into `content` (padding dropped) and returns its
/// header, or `None` at a clean end of stream between records.
fn next_record<R: BufRead>(reader: &mut R, content: &mut Vec<u8>) -> io::Result<Option<Header>> {
    loop {
        match reader.fill_buf() {
            Ok([]) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let mut raw = [0; HEADER_LEN];
    reader.read_exact(&mut raw)?;
    let header = parse_header(&raw).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "not a FastCGI version 1 record")
    })?;
    let len = usize::from(header.content_length);
    content.clear();
    content.resize(len + usize::from(header.padding_length), 0);
    reader.read_exact(content)?;
    content.truncate(len);
    Ok(Some(header))
}

/// Role and keep_conn flag of a BEGIN_REQUEST body.
fn parse_begin(content: &[u8]) -> io::Result<(u16, bool)> {
    match content {
        [role_hi, role_lo, flags, _, _, _, _, _, ..] => Ok((
            u16::from_be_bytes([*role_hi, *role_lo]),
            flags & FLAG_KEEP_CONN != 0,
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short FastCGI BEGIN_REQUEST",
        )),
    }
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

/// Runs the handler on a complete request (a malformed one is answered
/// 400) and encodes its response.
fn answer(
    id: u16,
    request: Option<Request>,
    handler: &dyn Fn(&Request) -> Response,
    out: &mut Vec<u8>,
) {
    let cgi = match request {
        Some(req) => handler(&req).to_cgi_bytes(req.is_head()),
        None => plain_text(400, "malformed FastCGI params\n"),
    };
    encode_stream(STDOUT, id, &cgi, out);
    end_request(id, APP_ANSWERED, REQUEST_COMPLETE, out);
}

/// Answers a request that went over a cap and ends the connection: the
/// rest of its stream is unread, so the connection cannot carry another.
fn refuse<W: Write>(stream: &mut W, id: u16, why: &str, out: &mut Vec<u8>) -> io::Result<()> {
    log::warn!("fastcgi: request {id}: {why}, answered 400 and closing");
    encode_stream(STDOUT, id, &plain_text(400, "request too large\n"), out);
    end_request(id, APP_ANSWERED, REQUEST_COMPLETE, out);
    send(stream, out)
}

fn plain_text(status: u16, body: &str) -> Vec<u8> {
    let resp = Response {
        status,
        headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
        body: body.as_bytes().to_vec(),
    };
    resp.to_cgi_bytes(false)
}

/// The answer to a record with request id 0.
fn management_reply(kind: u8, content: &[u8], limits: &Limits, out: &mut Vec<u8>) {
    if kind == GET_VALUES {
        encode_record(
            GET_VALUES_RESULT,
            0,
            &get_values_result(content, limits),
            out,
        );
    } else {
        encode_record(UNKNOWN_TYPE, 0, &[kind, 0, 0, 0, 0, 0, 0, 0], out);
    }
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

/// A whole stream: the data, then the empty record that ends it.
fn encode_stream(kind: u8, id: u16, data: &[u8], out: &mut Vec<u8>) {
    if !data.is_empty() {
        encode_record(kind, id, data, out);
    }
    encode_record(kind, id, &[], out);
}

fn end_request(id: u16, app_status: u32, protocol_status: u8, out: &mut Vec<u8>) {
    let [a0, a1, a2, a3] = app_status.to_be_bytes();
    encode_record(
        END_REQUEST,
        id,
        &[a0, a1, a2, a3, protocol_status, 0, 0, 0],
        out,
    );
}

/// One write per reply: unbuffered record-by-record writes were measured
/// as a major cost.
fn send<W: Write>(stream: &mut W, out: &[u8]) -> io::Result<()> {
    stream.write_all(out)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::cell::{Cell, RefCell};
    use std::io::Cursor;

    /// Input from a byte string, output into a Vec, counting writes.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
        writes: usize,
        /// Most bytes one read returns, to mimic a trickling socket.
        read_size: usize,
    }

    impl Duplex {
        fn new(input: Vec<u8>) -> Duplex {
            Duplex {
                input: Cursor::new(input),
                output: Vec::new(),
                writes: 0,
                read_size: usize::MAX,
            }
        }
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.read_size);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn begin(id: u16, role: u16, keep_conn: bool, out: &mut Vec<u8>) {
        let [r0, r1] = role.to_be_bytes();
        let flags = if keep_conn { FLAG_KEEP_CONN } else { 0 };
        encode_record(BEGIN_REQUEST, id, &[r0, r1, flags, 0, 0, 0, 0, 0], out);
    }

    fn params_stream(id: u16, pairs: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
        let mut buf = Vec::new();
        for (n, v) in pairs {
            assert!(encode_pair(n, v, &mut buf));
        }
        encode_stream(PARAMS, id, &buf, out);
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
        let mut trickle = Duplex::new(input);
        trickle.read_size = 1;
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
        let result = serve_connection(&mut Failing, &ok_response, &Limits::default());
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn overloaded_gets_503() {
        let mut input = Vec::new();
        request(5, false, &get(b"x"), &mut input);
        let mut duplex = Duplex::new(input);
        reject_overloaded(&mut duplex, &plain_text(503, "busy, try again\n")).unwrap();
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
            reject_overloaded(&mut duplex, b"Status: 503\r\n\r\n").unwrap();
            assert!(duplex.output.is_empty());
        }
    }
}

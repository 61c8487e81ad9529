//! A FastCGI client written from the FastCGI 1.0 specification, not from
//! `src/`: a bug in the crate's protocol code cannot hide behind the same
//! bug here.

use std::io::{self, Read, Write};

use super::cgi::{HttpLike, parse_cgi};

pub const FCGI_VERSION_1: u8 = 1;
pub const FCGI_BEGIN_REQUEST: u8 = 1;
pub const FCGI_ABORT_REQUEST: u8 = 2;
pub const FCGI_END_REQUEST: u8 = 3;
pub const FCGI_PARAMS: u8 = 4;
pub const FCGI_STDIN: u8 = 5;
pub const FCGI_STDOUT: u8 = 6;
pub const FCGI_STDERR: u8 = 7;
pub const FCGI_DATA: u8 = 8;
pub const FCGI_GET_VALUES: u8 = 9;
pub const FCGI_GET_VALUES_RESULT: u8 = 10;
pub const FCGI_UNKNOWN_TYPE: u8 = 11;

pub const FCGI_RESPONDER: u16 = 1;
pub const FCGI_AUTHORIZER: u16 = 2;
pub const FCGI_FILTER: u16 = 3;
pub const FCGI_KEEP_CONN: u8 = 1;

pub const FCGI_REQUEST_COMPLETE: u8 = 0;
pub const FCGI_CANT_MPX_CONN: u8 = 1;
pub const FCGI_OVERLOADED: u8 = 2;
pub const FCGI_UNKNOWN_ROLE: u8 = 3;

/// Largest content of one record.
pub const FCGI_MAX_CONTENT: usize = 65535;

/// One record's bytes with explicit padding. Panics if `content` is too long.
pub fn record_bytes(kind: u8, id: u16, content: &[u8], padding: u8) -> Vec<u8> {
    assert!(
        content.len() <= FCGI_MAX_CONTENT,
        "record content of {} bytes",
        content.len()
    );
    let len = content.len() as u16;
    let mut out = Vec::with_capacity(8 + content.len() + padding as usize);
    out.push(FCGI_VERSION_1);
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.push(padding);
    out.push(0);
    out.extend_from_slice(content);
    out.extend(std::iter::repeat_n(0u8, padding as usize));
    out
}

/// Padding that brings `len` to a multiple of 8, as real web servers send.
pub fn padding_for(len: usize) -> u8 {
    ((8 - len % 8) % 8) as u8
}

/// Writes one record, padded to a multiple of 8 bytes.
pub fn write_record<W: Write + ?Sized>(
    w: &mut W,
    kind: u8,
    id: u16,
    content: &[u8],
) -> io::Result<()> {
    w.write_all(&record_bytes(kind, id, content, padding_for(content.len())))
}

/// Writes one record with the given padding length.
pub fn write_record_padded<W: Write + ?Sized>(
    w: &mut W,
    kind: u8,
    id: u16,
    content: &[u8],
    padding: u8,
) -> io::Result<()> {
    w.write_all(&record_bytes(kind, id, content, padding))
}

/// Reads one record: `None` at a clean EOF (or a reset) on a record boundary.
/// Panics on a timeout, a truncated record or a version other than 1.
pub fn read_record<R: Read + ?Sized>(r: &mut R) -> Option<(u8, u16, Vec<u8>)> {
    try_read_record(r).unwrap_or_else(|e| panic!("reading a FastCGI record: {e}"))
}

/// As [`read_record`], with errors returned.
pub fn try_read_record<R: Read + ?Sized>(r: &mut R) -> io::Result<Option<(u8, u16, Vec<u8>)>> {
    let mut header = [0u8; 8];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {got} bytes of a record header"),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && got == 0 => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    if header[0] != FCGI_VERSION_1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record version {} (header {header:?})", header[0]),
        ));
    }
    let kind = header[1];
    let id = u16::from_be_bytes([header[2], header[3]]);
    let len = u16::from_be_bytes([header[4], header[5]]) as usize;
    let padding = header[6] as usize;
    let mut body = vec![0u8; len + padding];
    r.read_exact(&mut body).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("record type {kind} id {id}: {len}+{padding} body bytes: {e}"),
        )
    })?;
    body.truncate(len);
    Ok(Some((kind, id, body)))
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 128 {
        out.push(len as u8);
    } else {
        assert!(len < (1 << 31), "name-value length {len}");
        out.extend_from_slice(&(len as u32 | 0x8000_0000).to_be_bytes());
    }
}

/// Owned name-value pairs (FastCGI params, GET_VALUES results).
pub type Params = Vec<(Vec<u8>, Vec<u8>)>;

/// FastCGI name-value pair encoding (1-byte lengths below 128, else 4 bytes).
pub fn encode_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in pairs {
        push_len(&mut out, name.len());
        push_len(&mut out, value.len());
        out.extend_from_slice(name);
        out.extend_from_slice(value);
    }
    out
}

/// Inverse of [`encode_pairs`].
pub fn decode_pairs(mut bytes: &[u8]) -> Result<Params, String> {
    fn take_len(bytes: &mut &[u8]) -> Result<usize, String> {
        let first = *bytes.first().ok_or("truncated length")?;
        if first < 128 {
            *bytes = &bytes[1..];
            return Ok(first as usize);
        }
        if bytes.len() < 4 {
            return Err("truncated 4-byte length".into());
        }
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) & 0x7fff_ffff;
        *bytes = &bytes[4..];
        Ok(len as usize)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let name_len = take_len(&mut bytes)?;
        let value_len = take_len(&mut bytes)?;
        if bytes.len() < name_len + value_len {
            return Err(format!(
                "pair of {name_len}+{value_len} bytes with {} left",
                bytes.len()
            ));
        }
        let (name, rest) = bytes.split_at(name_len);
        let (value, rest) = rest.split_at(value_len);
        out.push((name.to_vec(), value.to_vec()));
        bytes = rest;
    }
    Ok(out)
}

/// The body of a BEGIN_REQUEST record.
pub fn begin_request_body(role: u16, flags: u8) -> [u8; 8] {
    let r = role.to_be_bytes();
    [r[0], r[1], flags, 0, 0, 0, 0, 0]
}

/// Appends `kind` records carrying `data` in chunks, then the empty record
/// that ends the stream.
pub fn push_stream(out: &mut Vec<u8>, kind: u8, id: u16, data: &[u8]) {
    for chunk in data.chunks(FCGI_MAX_CONTENT) {
        out.extend(record_bytes(kind, id, chunk, padding_for(chunk.len())));
    }
    out.extend(record_bytes(kind, id, &[], 0));
}

/// All the records of one responder request: BEGIN_REQUEST, PARAMS (+ end),
/// STDIN (+ end).
pub fn request_bytes(id: u16, params: &[(&[u8], &[u8])], stdin: &[u8], keep_conn: bool) -> Vec<u8> {
    let flags = if keep_conn { FCGI_KEEP_CONN } else { 0 };
    let mut out = record_bytes(
        FCGI_BEGIN_REQUEST,
        id,
        &begin_request_body(FCGI_RESPONDER, flags),
        0,
    );
    push_stream(&mut out, FCGI_PARAMS, id, &encode_pairs(params));
    push_stream(&mut out, FCGI_STDIN, id, stdin);
    out
}

/// Sends one whole request in a single write.
pub fn send_request<W: Write + ?Sized>(
    w: &mut W,
    id: u16,
    params: &[(&[u8], &[u8])],
    stdin: &[u8],
    keep_conn: bool,
) -> io::Result<()> {
    w.write_all(&request_bytes(id, params, stdin, keep_conn))?;
    w.flush()
}

/// What came back for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FcgiReply {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub app_status: u32,
    pub protocol_status: u8,
    /// An empty STDOUT record (end of stream) came before END_REQUEST.
    pub stdout_ended: bool,
}

impl FcgiReply {
    /// The STDOUT stream parsed as CGI output (panics if malformed).
    pub fn http(&self) -> HttpLike {
        parse_cgi(&self.stdout)
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Reads until END_REQUEST for each of `ids` (multiplexed in any order) and
/// returns the replies in the order of `ids`. Any record for another id, any
/// management record, or EOF first is an error.
pub fn try_read_replies<R: Read + ?Sized>(
    r: &mut R,
    ids: &[u16],
) -> Result<Vec<FcgiReply>, String> {
    let mut replies = vec![FcgiReply::default(); ids.len()];
    let mut done = vec![false; ids.len()];
    while done.contains(&false) {
        let (kind, id, content) = match try_read_record(r) {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                return Err(format!(
                    "connection closed before END_REQUEST; waiting for {ids:?}, done {done:?}"
                ));
            }
            Err(e) => return Err(format!("reading reply records: {e}")),
        };
        let Some(i) = ids.iter().position(|&x| x == id) else {
            return Err(format!(
                "record type {kind} for request id {id} while waiting for {ids:?}: {:?}",
                String::from_utf8_lossy(&content)
            ));
        };
        if done[i] {
            return Err(format!(
                "record type {kind} for request {id} after its END_REQUEST"
            ));
        }
        let reply = &mut replies[i];
        match kind {
            FCGI_STDOUT if content.is_empty() => reply.stdout_ended = true,
            FCGI_STDOUT if reply.stdout_ended => {
                return Err(format!(
                    "STDOUT data for request {id} after its end-of-stream record"
                ));
            }
            FCGI_STDOUT => reply.stdout.extend_from_slice(&content),
            FCGI_STDERR => reply.stderr.extend_from_slice(&content),
            FCGI_END_REQUEST => {
                if content.len() != 8 {
                    return Err(format!("END_REQUEST body of {} bytes", content.len()));
                }
                reply.app_status =
                    u32::from_be_bytes([content[0], content[1], content[2], content[3]]);
                reply.protocol_status = content[4];
                done[i] = true;
            }
            other => return Err(format!("unexpected record type {other} for request {id}")),
        }
    }
    Ok(replies)
}

/// [`try_read_replies`] for several ids; panics on error.
pub fn read_replies<R: Read + ?Sized>(r: &mut R, ids: &[u16]) -> Vec<FcgiReply> {
    try_read_replies(r, ids).unwrap_or_else(|e| panic!("{e}"))
}

/// Reads the reply to request `id`; panics on error.
pub fn read_reply<R: Read + ?Sized>(r: &mut R, id: u16) -> FcgiReply {
    try_read_reply(r, id).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_read_reply<R: Read + ?Sized>(r: &mut R, id: u16) -> Result<FcgiReply, String> {
    try_read_replies(r, &[id]).map(|mut v| v.remove(0))
}

/// One responder request (empty STDIN) and its reply.
pub fn fcgi_request<S: Read + Write>(
    stream: &mut S,
    request_id: u16,
    params: &[(&[u8], &[u8])],
    keep_conn: bool,
) -> FcgiReply {
    send_request(stream, request_id, params, &[], keep_conn)
        .unwrap_or_else(|e| panic!("sending FastCGI request {request_id}: {e}"));
    read_reply(stream, request_id)
}

/// `fcgi_request` with [`get_params`]`(query)`.
pub fn fcgi_get<S: Read + Write>(
    stream: &mut S,
    request_id: u16,
    query: &str,
    keep_conn: bool,
) -> FcgiReply {
    let params = get_params(query);
    fcgi_request(stream, request_id, &as_pairs(&params), keep_conn)
}

/// Sends GET_VALUES for `names` and returns the GET_VALUES_RESULT pairs.
pub fn get_values<S: Read + Write>(stream: &mut S, names: &[&[u8]]) -> Params {
    let pairs: Vec<(&[u8], &[u8])> = names.iter().map(|n| (*n, &b""[..])).collect();
    write_record(stream, FCGI_GET_VALUES, 0, &encode_pairs(&pairs)).expect("sending GET_VALUES");
    match read_record(stream) {
        Some((FCGI_GET_VALUES_RESULT, 0, content)) => {
            decode_pairs(&content).unwrap_or_else(|e| panic!("GET_VALUES_RESULT body: {e}"))
        }
        other => panic!("expected GET_VALUES_RESULT for id 0, got {other:?}"),
    }
}

/// The params Apache's mod_fcgid sends for `GET /register?QUERY`.
pub fn get_params(query: &str) -> Params {
    method_params_bytes("GET", query.as_bytes())
}

/// As [`get_params`] with any method and a raw-bytes query.
pub fn method_params_bytes(method: &str, query: &[u8]) -> Params {
    let mut uri = b"/register".to_vec();
    if !query.is_empty() {
        uri.push(b'?');
        uri.extend_from_slice(query);
    }
    let pairs: [(&str, &[u8]); 16] = [
        ("GATEWAY_INTERFACE", b"CGI/1.1"),
        ("SERVER_SOFTWARE", b"Apache/2.4"),
        ("SERVER_PROTOCOL", b"HTTP/1.1"),
        ("SERVER_NAME", b"tourney.example"),
        ("SERVER_PORT", b"443"),
        ("HTTPS", b"on"),
        ("REQUEST_SCHEME", b"https"),
        ("REMOTE_ADDR", b"127.0.0.1"),
        ("REMOTE_PORT", b"50000"),
        ("REQUEST_METHOD", method.as_bytes()),
        ("SCRIPT_NAME", b"/register"),
        ("PATH_INFO", b""),
        ("QUERY_STRING", query),
        ("REQUEST_URI", &uri),
        ("CONTENT_LENGTH", b""),
        ("HTTP_HOST", b"tourney.example"),
    ];
    pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect()
}

/// Replaces (or adds) one param.
pub fn set_param(params: &mut Params, name: &str, value: &[u8]) {
    match params.iter_mut().find(|(n, _)| n == name.as_bytes()) {
        Some(pair) => pair.1 = value.to_vec(),
        None => params.push((name.as_bytes().to_vec(), value.to_vec())),
    }
}

/// Borrows owned params in the shape [`fcgi_request`] takes.
pub fn as_pairs(params: &[(Vec<u8>, Vec<u8>)]) -> Vec<(&[u8], &[u8])> {
    params
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect()
}

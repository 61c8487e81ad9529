//! The FastCGI 1.0 wire format: record headers, name-value pairs, and
//! the numbers the specification gives names to.

/// Size of a record header.
pub const HEADER_LEN: usize = 8;
/// BEGIN_REQUEST flag: keep the connection open after this request.
pub const FLAG_KEEP_CONN: u8 = 1;

const VERSION: u8 = 1;
const MAX_CONTENT: usize = u16::MAX as usize;
/// A pair length is 31 bits on the wire.
const MAX_PAIR_LEN: usize = 0x7fff_ffff;

/// The record types of FastCGI 1.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// Opens a request: role and flags.
    BeginRequest = 1,
    /// The web server gives up on a request.
    AbortRequest = 2,
    /// Closes a request: app status and protocol status.
    EndRequest = 3,
    /// The CGI variables, as a stream of name-value pairs.
    Params = 4,
    /// The request body, as a stream.
    Stdin = 5,
    /// The response, as a stream.
    Stdout = 6,
    /// Error output, as a stream (not sent by this program).
    Stderr = 7,
    /// The filter role's extra data (not used by a responder).
    Data = 8,
    /// A management query for the application's variables.
    GetValues = 9,
    /// The answer to [`RecordType::GetValues`].
    GetValuesResult = 10,
    /// The answer to a management record of a type not known here.
    UnknownType = 11,
}

impl RecordType {
    /// The type a header's byte names, if it is one of FastCGI 1.0's.
    pub fn from_byte(byte: u8) -> Option<RecordType> {
        use RecordType::*;
        [
            BeginRequest,
            AbortRequest,
            EndRequest,
            Params,
            Stdin,
            Stdout,
            Stderr,
            Data,
            GetValues,
            GetValuesResult,
            UnknownType,
        ]
        .into_iter()
        .find(|t| *t as u8 == byte)
    }
}

impl From<RecordType> for u8 {
    fn from(t: RecordType) -> u8 {
        t as u8
    }
}

/// The roles a BEGIN_REQUEST can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Role {
    /// Answer a request: the only role served here.
    Responder = 1,
    /// Decide whether a request is allowed.
    Authorizer = 2,
    /// Transform a file.
    Filter = 3,
}

impl From<Role> for u16 {
    fn from(r: Role) -> u16 {
        r as u16
    }
}

/// The protocol status of an END_REQUEST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ProtocolStatus {
    /// The request ended normally (or was aborted).
    RequestComplete = 0,
    /// A second concurrent request on a connection that takes one.
    CantMpxConn = 1,
    /// The application is out of capacity.
    Overloaded = 2,
    /// A role other than the responder's.
    UnknownRole = 3,
}

impl From<ProtocolStatus> for u8 {
    fn from(s: ProtocolStatus) -> u8 {
        s as u8
    }
}

/// A record header, checked to be FastCGI version 1. `kind` stays the
/// raw byte: an unknown type is answered by echoing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The record type's byte (see [`RecordType`]).
    pub kind: u8,
    /// 0 for management records.
    pub request_id: u16,
    /// Bytes of content after the header.
    pub content_length: u16,
    /// Bytes of padding after the content.
    pub padding_length: u8,
}

impl Header {
    /// Content and padding together: the bytes after the header.
    pub fn body_len(&self) -> usize {
        usize::from(self.content_length) + usize::from(self.padding_length)
    }
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

/// Appends `content` as records of type `kind` (a [`RecordType`], or any
/// byte), without padding.
///
/// Content over 65535 bytes is split over several records, which is right
/// for the stream types (STDOUT and the like). Empty content gives one
/// empty record, which is how a stream ends.
pub fn encode_record(kind: impl Into<u8>, request_id: u16, content: &[u8], out: &mut Vec<u8>) {
    let kind = kind.into();
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

/// A whole stream: the data, then the empty record that ends it.
pub fn encode_stream(kind: RecordType, id: u16, data: &[u8], out: &mut Vec<u8>) {
    if !data.is_empty() {
        encode_record(kind, id, data, out);
    }
    encode_record(kind, id, &[], out);
}

/// Appends an END_REQUEST record.
pub fn encode_end_request(id: u16, app_status: u32, status: ProtocolStatus, out: &mut Vec<u8>) {
    let [a0, a1, a2, a3] = app_status.to_be_bytes();
    encode_record(
        RecordType::EndRequest,
        id,
        &[a0, a1, a2, a3, status.into(), 0, 0, 0],
        out,
    );
}

/// The content of a BEGIN_REQUEST record.
pub fn begin_request_body(role: u16, keep_conn: bool) -> [u8; 8] {
    let [r0, r1] = role.to_be_bytes();
    let flags = if keep_conn { FLAG_KEEP_CONN } else { 0 };
    [r0, r1, flags, 0, 0, 0, 0, 0]
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

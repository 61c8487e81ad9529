//! Property tests: whatever bytes arrive on a FastCGI connection, the
//! connection state machine ends (no panic, no hang), yields at most one
//! request per BEGIN_REQUEST, and writes only well-formed records; the
//! blocking driver over an in-memory stream does exactly what the state
//! machine says.

use std::cell::Cell;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tourney_register::fastcgi::{
    self, Connection, Duplex, FLAG_KEEP_CONN, HEADER_LEN, RecordType, Role, Step,
};
use tourney_register::http::{Request, Response};
use tourney_register::limits::Limits;

const BEGIN_REQUEST: u8 = RecordType::BeginRequest as u8;
const ABORT_REQUEST: u8 = RecordType::AbortRequest as u8;
const END_REQUEST: u8 = RecordType::EndRequest as u8;
const PARAMS: u8 = RecordType::Params as u8;
const STDIN: u8 = RecordType::Stdin as u8;
const STDOUT: u8 = RecordType::Stdout as u8;
const GET_VALUES: u8 = RecordType::GetValues as u8;
const ROLE_RESPONDER: u16 = Role::Responder as u16;

struct Outcome {
    result: Result<(), fastcgi::Error>,
    calls: usize,
    output: Vec<u8>,
}

fn answer(req: &Request) -> Response {
    Response {
        status: 200,
        headers: vec![("Content-Type", "text/plain".into())],
        body: req.query.clone(),
    }
}

/// Feeds `input` to a connection state machine in chunks of the given
/// sizes (cycled; none: all at once), answering every request it yields.
/// No clock moves: deadlines never pass.
fn serve_chunked(input: Vec<u8>, chunks: Vec<usize>, limits: &Limits) -> Outcome {
    let now = Instant::now();
    let mut conn = Connection::new(*limits, now);
    let mut rest = &input[..];
    let mut sizes = chunks.iter().copied().cycle();
    let mut calls = 0;
    let mut output = Vec::new();
    loop {
        let step = conn.next(now);
        output.extend_from_slice(conn.output());
        conn.clear_output();
        match step {
            Step::Read { .. } => {
                let n = sizes.next().unwrap_or(usize::MAX).min(rest.len());
                let (chunk, after) = rest.split_at(n);
                conn.feed(chunk, now);
                rest = after;
            }
            Step::Request(req) => {
                calls += 1;
                conn.respond(&answer(&req).to_cgi_bytes(req.is_head()), now);
            }
            Step::Close(result) => {
                return Outcome {
                    result,
                    calls,
                    output,
                };
            }
        }
    }
}

fn serve(input: Vec<u8>, limits: &Limits) -> Outcome {
    serve_chunked(input, Vec::new(), limits)
}

/// The records a reader would frame in `bytes`, up to the first bad or
/// cut-off one: an upper bound on what the server can have acted on.
fn framed(mut bytes: &[u8]) -> Vec<fastcgi::Header> {
    let mut headers = Vec::new();
    while let Some((raw, rest)) = bytes.split_first_chunk::<HEADER_LEN>() {
        let Some(h) = fastcgi::parse_header(raw) else {
            break;
        };
        headers.push(h);
        let len = usize::from(h.content_length) + usize::from(h.padding_length);
        bytes = rest.get(len..).unwrap_or_default();
    }
    headers
}

fn begins(bytes: &[u8]) -> usize {
    framed(bytes)
        .iter()
        .filter(|h| h.kind == BEGIN_REQUEST && h.request_id != 0)
        .count()
}

/// The output must be whole, version 1, unpadded records only of the
/// types a responder sends.
fn assert_well_formed(output: &[u8]) -> Result<(), TestCaseError> {
    let mut bytes = output;
    while !bytes.is_empty() {
        let (raw, rest) = bytes
            .split_first_chunk::<HEADER_LEN>()
            .ok_or_else(|| fail("cut header"))?;
        let h = fastcgi::parse_header(raw).ok_or_else(|| fail("bad version"))?;
        prop_assert_eq!(h.padding_length, 0);
        prop_assert!(
            [
                STDOUT,
                END_REQUEST,
                RecordType::GetValuesResult as u8,
                RecordType::UnknownType as u8
            ]
            .contains(&h.kind),
            "unexpected type {}",
            h.kind
        );
        bytes = rest
            .get(usize::from(h.content_length)..)
            .ok_or_else(|| fail("cut content"))?;
    }
    Ok(())
}

fn fail(why: &str) -> TestCaseError {
    TestCaseError::fail(why.to_string())
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        prop_oneof![Just(64 * 1024), 0usize..64],
        prop_oneof![Just(64 * 1024), 0usize..64],
        0usize..100,
    )
        .prop_map(|(p, s, c)| Limits {
            max_params_bytes: p,
            max_stdin_bytes: s,
            max_conns: c,
            ..Limits::default()
        })
}

fn begin_body(role: u16, keep_conn: bool) -> Vec<u8> {
    let [r0, r1] = role.to_be_bytes();
    vec![
        r0,
        r1,
        if keep_conn { FLAG_KEEP_CONN } else { 0 },
        0,
        0,
        0,
        0,
        0,
    ]
}

fn pairs_bytes() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just(b"REQUEST_METHOD".to_vec()),
        Just(b"QUERY_STRING".to_vec()),
        Just(b"PATH_INFO".to_vec()),
        prop::collection::vec(any::<u8>(), 0..8),
    ];
    let value = prop_oneof![
        Just(b"GET".to_vec()),
        Just(b"HEAD".to_vec()),
        prop::collection::vec(any::<u8>(), 0..200),
    ];
    prop::collection::vec((name, value), 0..5).prop_map(|pairs| {
        let mut out = Vec::new();
        for (n, v) in pairs {
            assert!(fastcgi::encode_pair(&n, &v, &mut out));
        }
        out
    })
}

/// One record, mostly of the kinds a web server sends, in plausible order
/// or not.
fn record() -> impl Strategy<Value = Vec<u8>> {
    let id = 0u16..4;
    prop_oneof![
        (id.clone(), 0u16..4, any::<bool>()).prop_map(|(id, role, keep)| {
            let mut out = Vec::new();
            fastcgi::encode_record(BEGIN_REQUEST, id, &begin_body(role, keep), &mut out);
            out
        }),
        (id.clone(), pairs_bytes()).prop_map(|(id, pairs)| {
            let mut out = Vec::new();
            fastcgi::encode_record(PARAMS, id, &pairs, &mut out);
            out
        }),
        (
            id.clone(),
            prop_oneof![Just(PARAMS), Just(STDIN), Just(ABORT_REQUEST)]
        )
            .prop_map(|(id, kind)| {
                let mut out = Vec::new();
                fastcgi::encode_record(kind, id, &[], &mut out);
                out
            }),
        (id.clone(), prop::collection::vec(any::<u8>(), 1..40)).prop_map(|(id, body)| {
            let mut out = Vec::new();
            fastcgi::encode_record(STDIN, id, &body, &mut out);
            out
        }),
        pairs_bytes().prop_map(|query| {
            let mut out = Vec::new();
            fastcgi::encode_record(GET_VALUES, 0, &query, &mut out);
            out
        }),
        // Anything at all behind a version 1 header, padding included.
        (
            any::<u8>(),
            id,
            prop::collection::vec(any::<u8>(), 0..24),
            0u8..8
        )
            .prop_map(|(kind, id, content, pad)| {
                let mut out = Vec::new();
                fastcgi::encode_record(kind, id, &content, &mut out);
                out[6] = pad;
                out.extend(std::iter::repeat_n(0, usize::from(pad)));
                out
            }),
    ]
}

/// A record that begins no request: management records (id 0) of any
/// type, and records other than BEGIN_REQUEST for ids that never began.
fn stray() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        pairs_bytes().prop_map(|query| {
            let mut out = Vec::new();
            fastcgi::encode_record(GET_VALUES, 0, &query, &mut out);
            out
        }),
        (
            any::<u8>().prop_filter("not BEGIN_REQUEST", |k| *k != BEGIN_REQUEST),
            0u16..4,
            prop::collection::vec(any::<u8>(), 0..24)
        )
            .prop_map(|(kind, id, content)| {
                let mut out = Vec::new();
                fastcgi::encode_record(kind, id, &content, &mut out);
                out
            }),
    ]
}

/// Feeds `input` in chunks (sizes cycled) after gaps (cycled, in ms),
/// answering every request at once, and checks that no wait the
/// connection asks for ends later than the idle and request limits
/// allow after the last progress (accept, or an answer). Returns how
/// many requests it served.
fn paced(input: &[u8], chunks: &[usize], gaps_ms: &[u64]) -> Result<usize, TestCaseError> {
    let limits = Limits {
        idle_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(3),
        ..Limits::default()
    };
    let mut now = Instant::now();
    let mut conn = Connection::new(limits, now);
    let mut progress = now;
    let mut served = 0;
    let mut rest = input;
    let mut sizes = chunks.iter().copied().cycle();
    let mut gaps = gaps_ms.iter().copied().cycle();
    loop {
        match conn.next(now) {
            Step::Read { deadline } => {
                prop_assert!(deadline > now);
                prop_assert!(
                    deadline <= progress + limits.idle_timeout + limits.request_timeout,
                    "waits {:?} past its last progress",
                    deadline - progress
                );
                // The next bytes come after a gap, unless the deadline
                // passes first.
                let at = now + Duration::from_millis(gaps.next().unwrap_or(0));
                if at >= deadline {
                    now = deadline;
                    continue;
                }
                now = at;
                let n = sizes.next().unwrap_or(1).min(rest.len());
                let (chunk, after) = rest.split_at(n);
                conn.feed(chunk, now);
                rest = after;
            }
            Step::Request(req) => {
                served += 1;
                conn.respond(&answer(&req).to_cgi_bytes(req.is_head()), now);
                progress = now;
            }
            Step::Close(_) => return Ok(served),
        }
        conn.clear_output();
    }
}

/// Stray records mixed with whole requests, so the handler is reached
/// from every state the strays leave behind.
fn records() -> impl Strategy<Value = Vec<u8>> {
    let whole = (
        1u16..4,
        any::<bool>(),
        pairs_bytes(),
        prop::collection::vec(any::<u8>(), 0..30),
    )
        .prop_map(|(id, keep, pairs, body)| request(id, keep, &pairs, &body));
    prop::collection::vec(prop_oneof![3 => record(), 1 => whole], 0..20)
        .prop_map(|recs| recs.concat())
}

/// One well-formed request, params split mid-pair.
fn request(id: u16, keep_conn: bool, pairs: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    fastcgi::encode_record(
        BEGIN_REQUEST,
        id,
        &begin_body(ROLE_RESPONDER, keep_conn),
        &mut out,
    );
    for piece in pairs.chunks(7) {
        fastcgi::encode_record(PARAMS, id, piece, &mut out);
    }
    fastcgi::encode_record(PARAMS, id, &[], &mut out);
    if !body.is_empty() {
        fastcgi::encode_record(STDIN, id, body, &mut out);
    }
    fastcgi::encode_record(STDIN, id, &[], &mut out);
    out
}

/// Well-formed keep_conn requests, the last one closing the connection,
/// and the offset where each request ends.
fn valid_stream() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    prop::collection::vec(
        (
            1u16..100,
            pairs_bytes(),
            prop::collection::vec(any::<u8>(), 0..30),
        ),
        1..4,
    )
    .prop_map(|requests| {
        let n = requests.len();
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for (i, (id, pairs, body)) in requests.into_iter().enumerate() {
            out.extend(request(id, i + 1 < n, &pairs, &body));
            ends.push(out.len());
        }
        (out, ends)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(330))]

    #[test]
    fn random_bytes(input in prop::collection::vec(any::<u8>(), 0..512), limits in limits()) {
        let out = serve(input.clone(), &limits);
        prop_assert!(out.calls <= begins(&input));
        assert_well_formed(&out.output)?;
    }

    #[test]
    fn random_records(input in records(), limits in limits(), chunks in prop::collection::vec(1usize..50, 0..4)) {
        let out = serve_chunked(input.clone(), chunks, &limits);
        prop_assert!(out.calls <= begins(&input));
        assert_well_formed(&out.output)?;
    }

    #[test]
    fn truncated_valid_streams(
        (input, ends) in valid_stream(),
        at_boundary in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        // Cuts between requests are rare by chance but are the clean closes.
        let cut = if at_boundary { ends[cut.index(ends.len())] } else { cut.index(input.len() + 1) };
        let out = serve(input[..cut].to_vec(), &Limits::default());
        // Exactly the requests that arrived whole are served.
        prop_assert_eq!(out.calls, ends.iter().filter(|&&end| end <= cut).count());
        let between_requests = cut == 0 || ends.contains(&cut);
        prop_assert_eq!(out.result.is_ok(), between_requests, "{:?}", out.result);
        assert_well_formed(&out.output)?;
    }

    #[test]
    fn mutated_valid_streams(
        (input, _) in valid_stream(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        limits in limits(),
    ) {
        let mut input = input;
        for (at, byte) in edits {
            let i = at.index(input.len());
            input[i] = byte;
        }
        let out = serve(input.clone(), &limits);
        prop_assert!(out.calls <= begins(&input));
        assert_well_formed(&out.output)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(330))]

    /// Valid requests are all served, and how the bytes trickle in does not
    /// change a thing.
    #[test]
    fn valid_streams_any_chunking((input, ends) in valid_stream(), chunks in prop::collection::vec(1usize..20, 1..4)) {
        let whole = serve(input.clone(), &Limits::default());
        let n = ends.len();
        prop_assert!(whole.result.is_ok(), "{:?}", whole.result);
        prop_assert_eq!(whole.calls, n);
        let end_records = framed(&whole.output).iter().filter(|h| h.kind == END_REQUEST).count();
        prop_assert_eq!(end_records, n);
        let trickled = serve_chunked(input, chunks, &Limits::default());
        prop_assert!(trickled.result.is_ok());
        prop_assert_eq!(trickled.calls, n);
        prop_assert_eq!(trickled.output, whole.output);
    }

    /// However the bytes are paced, the connection never waits longer
    /// than the idle limit for a request to begin plus the request limit
    /// for it to end, counted from accept or from its last answer.
    #[test]
    fn deadlines_bound_every_wait(
        input in records(),
        chunks in prop::collection::vec(1usize..200, 1..4),
        gaps_ms in prop::collection::vec(0u64..6_000, 1..6),
    ) {
        paced(&input, &chunks, &gaps_ms)?;
    }

    /// Management records and records for request ids that never began,
    /// however many and however paced, buy no time: such a peer is gone
    /// within the same bound.
    #[test]
    fn strays_buy_no_time(
        strays in prop::collection::vec(stray(), 1..40),
        chunks in prop::collection::vec(1usize..200, 1..4),
        gaps_ms in prop::collection::vec(0u64..3_000, 1..6),
    ) {
        let input = strays.concat();
        let served = paced(&input, &chunks, &gaps_ms)?;
        prop_assert_eq!(served, 0);
    }

    /// The blocking driver over an in-memory stream, however the bytes
    /// trickle in, answers exactly as the state machine does, and ends the
    /// same way.
    #[test]
    fn the_driver_does_what_the_core_says(input in records(), limits in limits(), chunks in prop::collection::vec(1usize..50, 0..4)) {
        let core = serve(input.clone(), &limits);
        let calls = Cell::new(0);
        let handler = |req: &Request| {
            calls.set(calls.get() + 1);
            answer(req)
        };
        let mut duplex = Duplex::chunked(input, chunks);
        let result = fastcgi::serve_connection(&mut duplex, &handler, &limits);
        prop_assert_eq!(&duplex.output, &core.output);
        prop_assert_eq!(calls.get(), core.calls);
        prop_assert_eq!(result.is_ok(), core.result.is_ok());
    }

    /// The busy answer goes only to a connection that opens with
    /// BEGIN_REQUEST, whatever follows.
    #[test]
    fn overloaded_any_bytes(input in prop_oneof![prop::collection::vec(any::<u8>(), 0..64), records()]) {
        let mut duplex = Duplex::new(input.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        let _ = fastcgi::reject_overloaded(&mut duplex, || b"Status: 503\r\n\r\nbusy".to_vec(), deadline);
        assert_well_formed(&duplex.output)?;
        let opens_with_begin = framed(&input)
            .first()
            .is_some_and(|h| h.kind == BEGIN_REQUEST && h.request_id != 0);
        prop_assert_eq!(!duplex.output.is_empty(), opens_with_begin);
    }
}

//! Reading the OAuth redirect osu! sends the player back with: `/register?code=C&state=S`, or
//! `?error=access_denied&error_description=…&state=S` when the player
//! pressed Cancel on osu!'s page.
//!
//! Parsing is strict on purpose. A lenient parser that keeps `%zz` as
//! text, or takes the last of two `code=` values, would forward something
//! the player never sent; a clear 400 is better than a confusing failure
//! from the bot.

use std::fmt;

use crate::http::Request;
use crate::scan;

/// Longest single value accepted, decoded. Real codes are about 1 KB and
/// states about 140 bytes.
pub const MAX_VALUE: usize = 4096;
/// Longest query string accepted, raw.
pub const MAX_QUERY: usize = 8192;

/// What osu! sent the player back with. Its `Debug` leaves the code and
/// the state out.
#[derive(Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The player signed in: the code is for the bot to exchange.
    Authorized {
        /// The single-use OAuth code.
        code: String,
        /// The bot's encrypted token naming the player.
        state: String,
    },
    /// osu! reported an error instead (`access_denied` when the player
    /// pressed Cancel).
    Denied {
        /// osu!'s error code.
        error: String,
        /// osu!'s explanation, if it gave one.
        description: Option<String>,
    },
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Redirect::Authorized { .. } => f.write_str("Authorized { .. }"),
            Redirect::Denied { error, description } => f
                .debug_struct("Denied")
                .field("error", error)
                .field("description", description)
                .finish(),
        }
    }
}

/// Why a request was turned away before the bot was contacted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// A method other than GET or HEAD.
    MethodNotAllowed,
    /// A path below `/register` other than `/`.
    NotFound,
    /// A query string over [`MAX_QUERY`] bytes.
    QueryTooLong,
    /// The named parameter is over [`MAX_VALUE`] bytes.
    ValueTooLong(&'static str),
    /// Bad percent-encoding, or bytes that are not UTF-8 once decoded.
    BadEncoding,
    /// The named parameter is missing or empty.
    Missing(&'static str),
    /// The named parameter is given more than once.
    Repeated(&'static str),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::MethodNotAllowed => write!(f, "This address only answers GET requests."),
            RequestError::NotFound => write!(f, "There is nothing at this address."),
            RequestError::QueryTooLong => write!(f, "The link is too long to be a sign-in link."),
            RequestError::ValueTooLong(name) => write!(f, "The link's {name} is too long."),
            RequestError::BadEncoding => {
                write!(f, "The link is damaged: it is not properly encoded.")
            }
            RequestError::Missing(name) => write!(f, "The link has no {name}."),
            RequestError::Repeated(name) => write!(f, "The link gives {name} more than once."),
        }
    }
}

impl std::error::Error for RequestError {}

/// Checks the method, path and query of a request and pulls out what
/// osu! sent. Unknown parameters are ignored, so a future osu! that adds
/// one does not break sign-ups.
pub fn parse(req: &Request) -> Result<Redirect, RequestError> {
    if req.method != b"GET" && req.method != b"HEAD" {
        return Err(RequestError::MethodNotAllowed);
    }
    if !(req.path_info.is_empty() || req.path_info == b"/") {
        return Err(RequestError::NotFound);
    }
    if req.query.len() > MAX_QUERY {
        return Err(RequestError::QueryTooLong);
    }
    let mut fields = Fields::default();
    for pair in req.query.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        let name = decode(name)?;
        let slot = match name.as_str() {
            "code" => (&mut fields.code, "code"),
            "state" => (&mut fields.state, "state"),
            "error" => (&mut fields.error, "error"),
            "error_description" => (&mut fields.description, "error_description"),
            _ => continue,
        };
        if value.len() > 3 * MAX_VALUE {
            return Err(RequestError::ValueTooLong(slot.1));
        }
        let value = decode(value)?;
        if value.len() > MAX_VALUE {
            return Err(RequestError::ValueTooLong(slot.1));
        }
        if slot.0.is_some() {
            return Err(RequestError::Repeated(slot.1));
        }
        *slot.0 = Some(value);
    }
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    if let Some(error) = nonempty(fields.error) {
        return Ok(Redirect::Denied {
            error,
            description: nonempty(fields.description),
        });
    }
    let code = nonempty(fields.code).ok_or(RequestError::Missing("code"))?;
    let state = nonempty(fields.state).ok_or(RequestError::Missing("state"))?;
    Ok(Redirect::Authorized { code, state })
}

#[derive(Default)]
struct Fields {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    description: Option<String>,
}

/// Decodes one `application/x-www-form-urlencoded` component (the form
/// RFC 6749 gives redirect parameters): `+` is a space, `%XX` a byte, and
/// the result must be UTF-8. A raw `=` inside a value, as in a Fernet
/// token's padding, is kept as it is.
pub fn decode(raw: &[u8]) -> Result<String, RequestError> {
    let mut out = Vec::with_capacity(raw.len());
    // Runs without `+` or `%` (a whole code, usually) are copied at once.
    let mut plain = 0;
    let mut i = 0;
    let special = |b: u8| b == b'+' || b == b'%';
    let any = |w: u64| scan::has_byte(w, b'+') | scan::has_byte(w, b'%');
    while i < raw.len() {
        i += scan::first(&raw[i..], any, special);
        if i == raw.len() {
            break;
        }
        out.extend_from_slice(&raw[plain..i]);
        if raw[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            let hi = raw.get(i + 1).and_then(|&b| hex(b));
            let lo = raw.get(i + 2).and_then(|&b| hex(b));
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(RequestError::BadEncoding),
            }
            i += 3;
        }
        plain = i;
    }
    out.extend_from_slice(&raw[plain..]);
    String::from_utf8(out).map_err(|_| RequestError::BadEncoding)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(query: &str) -> Result<Redirect, RequestError> {
        parse(&Request {
            method: b"GET".to_vec(),
            path_info: Vec::new(),
            query: query.as_bytes().to_vec(),
        })
    }

    fn authorized(code: &str, state: &str) -> Result<Redirect, RequestError> {
        Ok(Redirect::Authorized {
            code: code.into(),
            state: state.into(),
        })
    }

    const FERNET: &str = "gAAAAABlX2Vb0123456789abcdefghijklmnopqrstuvwxyz-_ABCDEF==";

    #[test]
    fn code_and_state() {
        assert_eq!(get("code=abc&state=xyz"), authorized("abc", "xyz"));
        assert_eq!(get("state=xyz&code=abc"), authorized("abc", "xyz"));
    }

    #[test]
    fn fernet_padding_raw_or_encoded_reaches_the_bot_unchanged() {
        assert_eq!(
            get(&format!("code=c&state={FERNET}")),
            authorized("c", FERNET)
        );
        let encoded = FERNET.replace('=', "%3D");
        assert_eq!(
            get(&format!("code=c&state={encoded}")),
            authorized("c", FERNET)
        );
        let lower = FERNET.replace('=', "%3d");
        assert_eq!(
            get(&format!("code=c&state={lower}")),
            authorized("c", FERNET)
        );
    }

    #[test]
    fn form_encoding() {
        assert_eq!(get("code=a+b%2Bc&state=%C3%A9"), authorized("a b+c", "é"));
    }

    #[test]
    fn unknown_and_empty_pairs_are_ignored() {
        assert_eq!(get("&code=c&&x=1&x=2&state=s&flag"), authorized("c", "s"));
    }

    #[test]
    fn cancel() {
        assert_eq!(
            get("error=access_denied&error_description=The+resource+owner+denied&state=s"),
            Ok(Redirect::Denied {
                error: "access_denied".into(),
                description: Some("The resource owner denied".into()),
            })
        );
        assert_eq!(
            get("error=access_denied"),
            Ok(Redirect::Denied {
                error: "access_denied".into(),
                description: None
            })
        );
        // An error wins over a code: osu! said the sign-in failed.
        assert!(matches!(
            get("error=server_error&code=c&state=s"),
            Ok(Redirect::Denied { .. })
        ));
    }

    #[test]
    fn missing_or_empty() {
        assert_eq!(get(""), Err(RequestError::Missing("code")));
        assert_eq!(get("state=s"), Err(RequestError::Missing("code")));
        assert_eq!(get("code=c"), Err(RequestError::Missing("state")));
        assert_eq!(get("code=&state=s"), Err(RequestError::Missing("code")));
        assert_eq!(get("code=c&state"), Err(RequestError::Missing("state")));
        assert_eq!(get("error=&code=c"), Err(RequestError::Missing("state")));
    }

    #[test]
    fn repeated() {
        assert_eq!(
            get("code=a&code=a&state=s"),
            Err(RequestError::Repeated("code"))
        );
        assert_eq!(
            get("code=a&state=s&state=t"),
            Err(RequestError::Repeated("state"))
        );
        assert_eq!(
            get("code=a&%63ode=b&state=s"),
            Err(RequestError::Repeated("code"))
        );
    }

    #[test]
    fn bad_encoding() {
        for q in [
            "code=%zz&state=s",
            "code=%4&state=s",
            "code=c&state=%",
            "code=%FF&state=s",
            "code=%C3&state=s",
        ] {
            assert_eq!(get(q), Err(RequestError::BadEncoding), "{q}");
        }
        let raw = Request {
            method: b"GET".to_vec(),
            path_info: Vec::new(),
            query: b"code=caf\xe9&state=s".to_vec(),
        };
        assert_eq!(parse(&raw), Err(RequestError::BadEncoding));
    }

    #[test]
    fn sizes() {
        let long = "a".repeat(MAX_VALUE);
        assert_eq!(get(&format!("code={long}&state=s")), authorized(&long, "s"));
        let longer = "a".repeat(MAX_VALUE + 1);
        assert_eq!(
            get(&format!("code={longer}&state=s")),
            Err(RequestError::ValueTooLong("code"))
        );
        let query = format!("code=c&state=s&pad={}", "x".repeat(MAX_QUERY));
        assert_eq!(get(&query), Err(RequestError::QueryTooLong));
    }

    #[test]
    fn method_and_path() {
        let mut req = Request {
            method: b"POST".to_vec(),
            path_info: Vec::new(),
            query: b"code=c&state=s".to_vec(),
        };
        assert_eq!(parse(&req), Err(RequestError::MethodNotAllowed));
        req.method = b"HEAD".to_vec();
        assert_eq!(parse(&req), authorized("c", "s"));
        req.path_info = b"/".to_vec();
        assert_eq!(parse(&req), authorized("c", "s"));
        req.path_info = b"/x".to_vec();
        assert_eq!(parse(&req), Err(RequestError::NotFound));
    }

    /// The byte-at-a-time decoder this one replaced, as the reference.
    fn decode_bytewise(raw: &[u8]) -> Result<String, RequestError> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'+' => out.push(b' '),
                b'%' => match (
                    raw.get(i + 1).and_then(|&b| hex(b)),
                    raw.get(i + 2).and_then(|&b| hex(b)),
                ) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 2;
                    }
                    _ => return Err(RequestError::BadEncoding),
                },
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| RequestError::BadEncoding)
    }

    #[test]
    fn decoding_runs_at_once_is_decoding_byte_by_byte() {
        let pieces: [&[u8]; 12] = [
            b"", b"a", b"+", b"%", b"%4", b"%41", b"%zz", b"%c3", b"%A9", b"=", b"\xff", b"~-_.",
        ];
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let raw = [a, b, c].concat();
                    assert_eq!(decode(&raw), decode_bytewise(&raw), "{raw:?}");
                }
            }
        }
    }
}

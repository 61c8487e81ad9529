//! Plain CGI: one request from the environment, one answer on stdout.
//!
//! Used by mod_cgi as a fallback and by people testing by hand:
//! `QUERY_STRING='code=abc&state=xyz' REQUEST_METHOD=GET tourney-register`.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStringExt;

use crate::http::{Request, Response};

/// The request described by the CGI variables. A missing REQUEST_METHOD
/// (a person at a shell) means GET.
pub fn request_from_env() -> Request {
    let var = |name| {
        std::env::var_os(name)
            .map(OsString::into_vec)
            .unwrap_or_default()
    };
    let mut method = var("REQUEST_METHOD");
    if method.is_empty() {
        method = b"GET".to_vec();
    }
    Request {
        method,
        path_info: var("PATH_INFO"),
        query: var("QUERY_STRING"),
    }
}

/// Prints the response in one write; the exit status stays 0 whatever the
/// HTTP status, as CGI expects.
pub fn write_response(req: &Request, resp: &Response) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(&resp.to_cgi_bytes(req.is_head()))?;
    out.flush()
}

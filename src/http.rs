//! The two plain types every transport speaks: what arrived and what goes back.
//!
//! CGI and FastCGI hand the program the same params (REQUEST_METHOD,
//! QUERY_STRING, PATH_INFO), so both adapters build a [`Request`] and print a
//! [`Response`] in CGI form; the pipeline never sees a socket.

use std::io::{self, Write};

/// The parts of a CGI-style request the relay looks at, kept as raw bytes:
/// a web server passes header values through unchanged, and one stray
/// Latin-1 byte must not cost the player the query string.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `REQUEST_METHOD`.
    pub method: Vec<u8>,
    /// `PATH_INFO`: what follows `/register` in the path.
    pub path_info: Vec<u8>,
    /// `QUERY_STRING`, still percent-encoded.
    pub query: Vec<u8>,
}

/// Leaves the query out (it holds the code and the state): a request
/// printed in a log line or a panic message gives away no secret.
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &String::from_utf8_lossy(&self.method))
            .field("path_info", &String::from_utf8_lossy(&self.path_info))
            .field("query", &format_args!("<{} bytes>", self.query.len()))
            .finish()
    }
}

impl Request {
    /// Builds a request from CGI/FastCGI name-value pairs, ignoring the rest.
    pub fn from_params<'a, I>(params: I) -> Request
    where
        I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
    {
        let mut req = Request::default();
        for (name, value) in params {
            match name {
                b"REQUEST_METHOD" => req.method = value.to_vec(),
                b"PATH_INFO" => req.path_info = value.to_vec(),
                b"QUERY_STRING" => req.query = value.to_vec(),
                _ => {}
            }
        }
        req
    }

    /// Whether it is a HEAD request, answered without a body.
    pub fn is_head(&self) -> bool {
        self.method == b"HEAD"
    }
}

/// A finished answer: status, headers and body, ready to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// Header names and values, in order; Content-Length is added when
    /// it is written.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name`, ignoring case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Writes the response in CGI form (`Status:` line, headers, blank
    /// line, body), which both CGI stdout and FastCGI STDOUT carry.
    /// With `head_only` the body is left out but Content-Length still
    /// tells its size, as HTTP asks of a HEAD answer.
    pub fn write_cgi<W: Write>(&self, out: &mut W, head_only: bool) -> io::Result<()> {
        write!(out, "Status: {} {}\r\n", self.status, reason(self.status))?;
        for (name, value) in &self.headers {
            write!(out, "{name}: {value}\r\n")?;
        }
        write!(out, "Content-Length: {}\r\n\r\n", self.body.len())?;
        if !head_only {
            out.write_all(&self.body)?;
        }
        Ok(())
    }

    /// The CGI form as one buffer, so a transport can send it in one write.
    pub fn to_cgi_bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 512);
        // Writing into a Vec cannot fail.
        let _ = self.write_cgi(&mut out, head_only);
        out
    }
}

/// The reason phrase for every status this program sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        414 => "URI Too Long",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_code_and_state_out() {
        let req = Request {
            method: b"GET".to_vec(),
            path_info: Vec::new(),
            query: b"code=secretcode&state=secretstate".to_vec(),
        };
        let shown = format!("{req:?}");
        assert!(
            shown.contains("GET") && shown.contains("33 bytes"),
            "{shown}"
        );
        assert!(!shown.contains("secret"), "{shown}");
        let redirect = crate::redirect::parse(&req).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(!format!("{redirect:?}").contains("secret"));
    }

    #[test]
    fn params_are_taken_as_bytes() {
        let ua: &[u8] = b"caf\xe9";
        let req = Request::from_params([
            (&b"HTTP_USER_AGENT"[..], ua),
            (&b"REQUEST_METHOD"[..], &b"GET"[..]),
            (&b"QUERY_STRING"[..], &b"code=a&state=b"[..]),
        ]);
        assert_eq!(req.method, b"GET");
        assert_eq!(req.query, b"code=a&state=b");
        assert!(req.path_info.is_empty());
    }

    #[test]
    fn cgi_form_has_status_headers_and_length() {
        let resp = Response {
            status: 404,
            headers: vec![("Content-Type", "text/plain".into())],
            body: b"nope".to_vec(),
        };
        let text = String::from_utf8(resp.to_cgi_bytes(false)).unwrap();
        assert_eq!(
            text,
            "Status: 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nnope"
        );
        let head = String::from_utf8(resp.to_cgi_bytes(true)).unwrap();
        assert!(head.ends_with("Content-Length: 4\r\n\r\n"));
    }
}

//! What the player sees: the built-in page's texts and the headers every
//! page carries.

use super::bot::APPROVED_HTML;
use super::cgi::HttpLike;

/// Undoes HTML escaping (named and numeric references), to find a text as
/// the player reads it without depending on which escape form is used.
pub fn unescape(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The unescaped text between the first `open` and the next `close`;
/// panics (showing the page) if either is missing.
pub fn element_text(body: &str, open: &str, close: &str) -> String {
    let start = body
        .find(open)
        .unwrap_or_else(|| panic!("no {open} in page:\n{body}"))
        + open.len();
    let end = body[start..]
        .find(close)
        .unwrap_or_else(|| panic!("unterminated {open} in page:\n{body}"));
    unescape(&body[start..start + end])
}

/// The `<h1>` text of the built-in page, unescaped.
pub fn title_text(body: &str) -> String {
    element_text(body, "<h1>", "</h1>")
}

/// The text of `<p id="message">…</p>` on the built-in page, unescaped.
pub fn message_text(body: &str) -> String {
    element_text(body, "<p id=\"message\">", "</p>")
}

/// The headers every page of the relay carries (README, Responses), each
/// exactly once.
pub fn assert_security_headers(h: &HttpLike) {
    assert_security_headers_in(&h.headers, "");
}

/// [`assert_security_headers`] on a header list of any response (`name`,
/// `value` pairs; names case-insensitive), e.g. one read through Apache.
/// `context` starts every failure message.
pub fn assert_security_headers_in(headers: &[(String, String)], context: &str) {
    let one = |name: &str| {
        let all: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            all.len(),
            1,
            "{context}{name} headers: {all:?} in {headers:?}"
        );
        all[0].to_string()
    };
    assert_eq!(
        one("Content-Type"),
        "text/html; charset=utf-8",
        "{context}Content-Type"
    );
    assert_eq!(one("Cache-Control"), "no-store", "{context}Cache-Control");
    assert_eq!(
        one("Referrer-Policy"),
        "no-referrer",
        "{context}Referrer-Policy"
    );
    assert_eq!(
        one("X-Content-Type-Options"),
        "nosniff",
        "{context}X-Content-Type-Options"
    );
    let csp = one("Content-Security-Policy");
    assert!(
        csp.contains("frame-ancestors 'none'"),
        "{context}CSP {csp:?}"
    );
    assert!(csp.contains("default-src 'none'"), "{context}CSP {csp:?}");
}

/// Why a page with `status` and `body` is not the success page for the
/// bot's [`APPROVED`](super::bot::APPROVED) answer, if it is not: for runs
/// that gather every player's outcome before they report.
pub fn success_or_why(status: u16, body: &str) -> Result<(), String> {
    let shown = format!("<p id=\"message\">{APPROVED_HTML}</p>");
    if status != 200 || !body.contains("aria-label=\"Success\"") || !body.contains(&shown) {
        let head: String = body.chars().take(300).collect();
        return Err(format!("status {status}: {head}"));
    }
    Ok(())
}

/// The built-in page for a bot's answer: 200 OK with the security headers,
/// the check mark (`ok`) or the cross and not the other, the matching title,
/// exactly `message`, no "Try again", and a Content-Length that is the
/// body's length.
pub fn assert_answer_page(h: &HttpLike, ok: bool, message: &str) {
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.reason, "OK");
    assert_security_headers(h);
    let (mark, other, title) = if ok {
        (
            "aria-label=\"Success\"",
            "aria-label=\"Failure\"",
            "You're signed up",
        )
    } else {
        (
            "aria-label=\"Failure\"",
            "aria-label=\"Success\"",
            "Sign-up failed",
        )
    };
    assert!(h.body.contains(mark), "want {mark}:\n{}", h.body);
    assert!(!h.body.contains(other), "both marks:\n{}", h.body);
    assert_eq!(title_text(&h.body), title);
    assert_eq!(message_text(&h.body), message);
    assert!(!h.body.contains("Try again"), "{}", h.body);
    let len: usize = h
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert_eq!(len, h.body_bytes.len());
}

/// Many players' outcomes (each code, and `Err(why)` for one that did not
/// see its page), failures grouped by why: how many failed, and per
/// reason the count and the first three codes. `None` when none failed.
pub fn failures(outcomes: &[(String, Result<(), String>)]) -> Option<(usize, String)> {
    let mut by_why: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (code, outcome) in outcomes {
        if let Err(why) = outcome {
            by_why.entry(why).or_default().push(code);
        }
    }
    if by_why.is_empty() {
        return None;
    }
    let failed = by_why.values().map(Vec::len).sum();
    let summary: Vec<_> = by_why
        .iter()
        .map(|(why, codes)| (why, codes.len(), &codes[..codes.len().min(3)]))
        .collect();
    Some((failed, format!("{summary:#?}")))
}

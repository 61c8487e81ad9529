//! The page a player sees, and the headers every page carries.
//!
//! One template serves every outcome; it is given a small, flat context
//! (`ok`, `title`, `message`, `hint`, `retry`, `status`) so an organiser's
//! own template (REGISTER_TEMPLATE) can re-brand the page without knowing
//! the program. Autoescaping is always on, whatever the file is called:
//! the message comes from the bot and error texts from osu!.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::{AutoEscape, Environment, context};

use crate::http::Response;
use crate::outcome::Outcome;

const BUILT_IN: &str = include_str!("page.html");

/// The policy allows the page's own inline CSS and SVG and nothing else:
/// no scripts, no external fetches, no framing, no form posts.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; \
                       base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What one page shows: the flat context every template gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View<'a> {
    /// Check mark (true) or cross (false).
    pub ok: bool,
    /// The short headline.
    pub title: &'a str,
    /// The bot's message, or what went wrong.
    pub message: Cow<'a, str>,
    /// What to do next.
    pub hint: Option<&'a str>,
    /// Show a "Try again" link: the code is unused.
    pub retry: bool,
    /// The HTTP status, for a template that wants to show it.
    pub status: u16,
}

/// A template that failed to load or render at start.
#[derive(Debug)]
pub struct TemplateError {
    /// The template's path.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "REGISTER_TEMPLATE={:?} cannot be used: {}",
            self.path.display(),
            self.reason
        )
    }
}

impl std::error::Error for TemplateError {}

/// The page renderer, built once at start.
pub struct Page(Source);

enum Source {
    /// The built-in page, rendered directly (compiling a template costs a
    /// CGI start more than rendering it), cut at its tags once: a request
    /// only copies.
    BuiltIn(Vec<Piece>),
    /// An operator's template.
    Template(Box<Environment<'static>>),
}

impl Page {
    /// The page built into the program.
    pub fn built_in() -> Page {
        Page(Source::BuiltIn(cut_built_in()))
    }

    /// Loads an organiser's template and renders it once with every kind
    /// of outcome, so that a broken template stops the start instead of
    /// failing each request.
    pub fn from_file(path: &Path) -> Result<Page, TemplateError> {
        let err = |reason: String| TemplateError {
            path: path.to_path_buf(),
            reason,
        };
        let source = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let page = Page::from_source(source).map_err(|e| err(e.to_string()))?;
        for ok in [true, false] {
            let sample = View {
                ok,
                title: "Title",
                message: "Message".into(),
                hint: Some("Hint"),
                retry: !ok,
                status: 200,
            };
            page.render(&sample).map_err(|e| err(e.to_string()))?;
        }
        Ok(page)
    }

    fn from_source(source: String) -> Result<Page, minijinja::Error> {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.add_template_owned("page", source)?;
        Ok(Page(Source::Template(Box::new(env))))
    }

    /// The full response for an outcome.
    pub fn respond(&self, outcome: &Outcome) -> Response {
        let view = outcome.view();
        let body = self
            .render(&view)
            // A template that rendered at start renders now; should it not,
            // the player still gets the message.
            .unwrap_or_else(|_| plain_fallback(view.title, &view.message));
        let mut headers = vec![
            ("Content-Type", "text/html; charset=utf-8".to_string()),
            ("Cache-Control", "no-store".to_string()),
            ("Referrer-Policy", "no-referrer".to_string()),
            ("X-Content-Type-Options", "nosniff".to_string()),
            ("Content-Security-Policy", CSP.to_string()),
        ];
        if view.status == 405 {
            headers.push(("Allow", "GET, HEAD".to_string()));
        }
        Response {
            status: view.status,
            headers,
            body: body.into_bytes(),
        }
    }

    /// Renders one view with the template.
    pub fn render(&self, view: &View<'_>) -> Result<String, minijinja::Error> {
        let View {
            ok,
            title,
            message,
            hint,
            retry,
            status,
        } = view;
        let env = match &self.0 {
            Source::BuiltIn(pieces) => return Ok(render_built_in(pieces, view)),
            Source::Template(env) => env,
        };
        env.get_template("page")?.render(context! {
            ok => *ok,
            title => *title,
            message => message.as_ref(),
            hint => *hint,
            retry => *retry,
            status => *status,
        })
    }
}

/// A piece of the built-in template: text, a `{{ x }}`, or a `{% … %}`.
#[derive(Clone, Copy, Debug)]
enum Piece {
    Text(&'static str),
    Title,
    Message,
    Hint,
    /// A `{{ x }}` of another name: nothing.
    Nothing,
    IfOk,
    IfHint,
    IfRetry,
    Else,
    /// `endif`, or any other tag: what follows is shown.
    End,
}

/// The built-in template cut at its tags: the text between them, each
/// `{{ x }}` and each `{% if %}`, `{% else %}`, `{% endif %}`, the file's
/// final newline dropped. A `{` that opens no tag is text.
fn cut_built_in() -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rest = BUILT_IN.strip_suffix('\n').unwrap_or(BUILT_IN);
    while let Some(open) = rest.find('{') {
        let tag = &rest[open..];
        let Some(end) = tag
            .starts_with("{{")
            .then(|| tag.find("}}"))
            .or_else(|| tag.starts_with("{%").then(|| tag.find("%}")))
            .flatten()
        else {
            pieces.push(Piece::Text(&rest[..=open]));
            rest = &rest[open + 1..];
            continue;
        };
        pieces.push(Piece::Text(&rest[..open]));
        let inner = tag[2..end].trim();
        rest = &tag[end + 2..];
        pieces.push(if tag.starts_with("{{") {
            match inner {
                "title" => Piece::Title,
                "message" => Piece::Message,
                "hint" => Piece::Hint,
                _ => Piece::Nothing,
            }
        } else {
            match inner {
                "if ok" => Piece::IfOk,
                "if hint" => Piece::IfHint,
                "if retry" => Piece::IfRetry,
                "else" => Piece::Else,
                _ => Piece::End,
            }
        });
    }
    pieces.push(Piece::Text(rest));
    pieces.retain(|p| !matches!(p, Piece::Text("")));
    pieces
}

/// The built-in template rendered by hand, byte for byte what minijinja
/// makes of it (a test holds the two together): each `{{ x }}` escaped as
/// minijinja's HTML autoescape does, each `{% if %}` taken or not.
fn render_built_in(pieces: &[Piece], view: &View<'_>) -> String {
    let mut out = String::with_capacity(BUILT_IN.len() + 2 * view.message.len() + 64);
    // Skipping the text of an `{% if %}` that is not taken.
    let mut skipping = false;
    for piece in pieces {
        match *piece {
            Piece::Text(text) if !skipping => out.push_str(text),
            Piece::Title if !skipping => escape_into(&mut out, view.title),
            Piece::Message if !skipping => escape_into(&mut out, &view.message),
            Piece::Hint if !skipping => escape_into(&mut out, view.hint.unwrap_or("")),
            Piece::Text(_) | Piece::Title | Piece::Message | Piece::Hint | Piece::Nothing => {}
            Piece::IfOk => skipping = !view.ok,
            Piece::IfHint => skipping = view.hint.is_none_or(str::is_empty),
            Piece::IfRetry => skipping = !view.retry,
            Piece::Else => skipping = !skipping,
            Piece::End => skipping = false,
        }
    }
    out
}

/// minijinja's HTML autoescape, into `out`: runs of plain text are
/// copied whole.
fn escape_into(out: &mut String, s: &str) {
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let entity = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#x27;",
            b'/' => "&#x2f;",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        out.push_str(entity);
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
}

fn plain_fallback(title: &str, message: &str) -> String {
    format!(
        "<!doctype html><meta charset=\"utf-8\"><title>{0}</title><h1>{0}</h1><p>{1}</p>",
        escape(title),
        escape(message)
    )
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::{BotReply, FailureKind};
    use crate::redirect::RequestError;
    use crate::replay::Delivery;

    fn answered(reply: &BotReply) -> Outcome {
        Outcome::Answered {
            reply: reply.clone(),
            delivery: Delivery::First,
        }
    }

    fn body(r: &Response) -> String {
        String::from_utf8(r.body.clone()).unwrap()
    }

    #[test]
    fn the_built_in_page_renders_as_its_template_does() {
        let template = Page::from_source(BUILT_IN.to_string()).unwrap();
        let texts = [
            "",
            "plain",
            "<script>alert('x')</script> & \"q\" /path",
            "ünï{{ok}}{% if %}",
        ];
        let mut seen = 0;
        for ok in [true, false] {
            for retry in [true, false] {
                for hint in [None, Some(""), Some("Try <i>later</i>/now")] {
                    for text in texts {
                        let view = View {
                            ok,
                            title: text,
                            message: text.into(),
                            hint,
                            retry,
                            status: 200,
                        };
                        let direct = Page::built_in().render(&view).unwrap();
                        assert_eq!(direct, template.render(&view).unwrap(), "{view:?}");
                        seen += 1;
                    }
                }
            }
        }
        assert_eq!(seen, 48);
    }

    #[test]
    fn success_and_refusal() {
        let page = Page::built_in();
        let ok = BotReply {
            success: true,
            message: "Welcome, <b>Tom & \"Jerry\"</b>!".into(),
        };
        let r = page.respond(&answered(&ok));
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert!(b.contains("aria-label=\"Success\""));
        assert!(
            b.contains("Welcome, &lt;b&gt;Tom &amp; &quot;Jerry&quot;&lt;&#x2f;b&gt;!"),
            "{b}"
        );
        assert!(!b.contains("<b>Tom"));
        let no = BotReply {
            success: false,
            message: "You're already signed up!".into(),
        };
        let r = page.respond(&answered(&no));
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert!(b.contains("aria-label=\"Failure\""));
        assert!(b.contains("You&#x27;re already signed up!"));
        assert!(!b.contains("Try again"));
    }

    #[test]
    fn every_page_has_the_security_headers() {
        let page = Page::built_in();
        let r = page.respond(&Outcome::Rejected(RequestError::MethodNotAllowed));
        assert_eq!(r.status, 405);
        assert_eq!(r.header("Allow"), Some("GET, HEAD"));
        for outcome in [
            Outcome::Rejected(RequestError::Missing("code")),
            Outcome::BotFailed(FailureKind::Timeout),
            Outcome::Misconfigured,
        ] {
            let r = page.respond(&outcome);
            assert_eq!(r.header("Content-Type"), Some("text/html; charset=utf-8"));
            assert_eq!(r.header("Cache-Control"), Some("no-store"));
            assert_eq!(r.header("Referrer-Policy"), Some("no-referrer"));
            assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
            assert!(
                r.header("Content-Security-Policy")
                    .unwrap()
                    .contains("frame-ancestors 'none'")
            );
        }
    }

    #[test]
    fn unavailable_offers_a_retry_that_does_not_carry_the_code() {
        let page = Page::built_in();
        let r = page.respond(&Outcome::BotFailed(FailureKind::Unavailable));
        assert_eq!(r.status, 503);
        assert!(body(&r).contains("<a class=\"button\" href=\"\">Try again</a>"));
        assert_eq!(
            page.respond(&Outcome::BotFailed(FailureKind::Timeout))
                .status,
            504
        );
        assert_eq!(
            page.respond(&Outcome::BotFailed(FailureKind::Closed))
                .status,
            502
        );
    }

    #[test]
    fn denied_pages() {
        let page = Page::built_in();
        let r = page.respond(&Outcome::Denied {
            error: "access_denied".into(),
            description: Some(
                "The resource owner or authorization server denied the request.".into(),
            ),
        });
        assert_eq!(r.status, 200);
        assert!(body(&r).contains("Sign-in cancelled"));
        let r = page.respond(&Outcome::Denied {
            error: "server_error".into(),
            description: Some("<script>x</script>".into()),
        });
        assert_eq!(r.status, 400);
        assert!(body(&r).contains("&lt;script&gt;"));
    }

    #[test]
    fn built_in_page_is_self_contained() {
        let b = body(&Page::built_in().respond(&Outcome::Misconfigured));
        for external in [
            "http:", "https:", "url(", "@import", "<script", "<link", "<img", "src=",
        ] {
            assert!(!b.contains(external), "{external}");
        }
        assert!(b.contains("name=\"viewport\""));
    }

    /// The palette's value of `--name` in the first rule of `css`.
    fn colour(css: &str, name: &str) -> [f64; 3] {
        let at = css.find(&format!("{name}: #")).unwrap() + name.len() + 3;
        let hex: String = css[at..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        let hex = match hex.len() {
            3 => hex.chars().flat_map(|c| [c, c]).collect(),
            6 => hex,
            _ => panic!("{name}: #{hex}"),
        };
        let channel = |i: usize| f64::from(u8::from_str_radix(&hex[i..i + 2], 16).unwrap()) / 255.0;
        [channel(0), channel(2), channel(4)]
    }

    /// WCAG 2 contrast ratio of two sRGB colours.
    fn contrast(a: [f64; 3], b: [f64; 3]) -> f64 {
        let luminance = |c: [f64; 3]| {
            let lin = |v: f64| {
                if v <= 0.03928 {
                    v / 12.92
                } else {
                    ((v + 0.055) / 1.055).powf(2.4)
                }
            };
            0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2])
        };
        let (la, lb) = (luminance(a), luminance(b));
        (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
    }

    /// The browser test audits the rendered page; this holds the palette
    /// to WCAG AA (4.5:1 for text) where no browser runs.
    #[test]
    fn every_text_colour_stands_out_light_and_dark() {
        let light = &BUILT_IN[BUILT_IN.find(":root {").unwrap()..];
        let dark = &BUILT_IN[BUILT_IN.find("prefers-color-scheme: dark").unwrap()..];
        let pairs = [
            ("--text", "--bg"),
            ("--text", "--card"),
            ("--muted", "--card"),
            ("--on-link", "--link"),
        ];
        for (scheme, css) in [("light", light), ("dark", dark)] {
            for (fg, bg) in pairs {
                let ratio = contrast(colour(css, fg), colour(css, bg));
                assert!(ratio >= 4.5, "{scheme}: {fg} on {bg} is {ratio:.2}:1");
            }
        }
        // The formula, on the figure axe-core gave for the old dark button
        // (white on --link: 2.41:1, truncated).
        assert!((contrast([1.0; 3], colour(dark, "--link")) - 2.415).abs() < 0.005);
    }

    #[test]
    fn custom_template() {
        let dir = std::env::temp_dir().join(format!("tr-page-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.txt");
        std::fs::write(
            &good,
            "<p class={{ 'ok' if ok else 'bad' }}>{{ message }}</p>",
        )
        .unwrap();
        let page = Page::from_file(&good).unwrap();
        let reply = BotReply {
            success: false,
            message: "<i>".into(),
        };
        assert_eq!(
            body(&page.respond(&answered(&reply))),
            "<p class=bad>&lt;i&gt;</p>"
        );

        let broken = dir.join("broken.html");
        std::fs::write(&broken, "{% if ok %}unclosed").unwrap();
        let err = Page::from_file(&broken).err().unwrap();
        assert!(err.to_string().starts_with("REGISTER_TEMPLATE="), "{err}");
        let fails_at_render = dir.join("render.html");
        std::fs::write(&fails_at_render, "{{ message | no_such_filter }}").unwrap();
        assert!(Page::from_file(&fails_at_render).is_err());
        assert!(Page::from_file(&dir.join("missing.html")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

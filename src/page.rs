//! The page a player sees, and the headers every page carries.
//!
//! One template serves every outcome; it is given a small, flat context
//! (`ok`, `title`, `message`, `hint`, `retry`, `status`) so an organiser's
//! own template (REGISTER_TEMPLATE) can re-brand the page without knowing
//! the program. Autoescaping is always on, whatever the file is called:
//! the message comes from the bot and error texts from osu!.

use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::{AutoEscape, Environment, context};

use crate::bot::{BotError, BotReply};
use crate::callback::RequestError;
use crate::http::Response;

const BUILT_IN: &str = include_str!("page.html");

/// The policy allows the page's own inline CSS and SVG and nothing else:
/// no scripts, no external fetches, no framing, no form posts.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; \
                       base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What happened to a request, as far as the page is concerned.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// The bot answered; `success` picks the check mark or the cross.
    Answered(&'a BotReply),
    /// osu! reported an error instead of a code (`access_denied` on Cancel).
    Denied {
        error: &'a str,
        description: Option<&'a str>,
    },
    Rejected(&'a RequestError),
    BotFailed(&'a BotError),
    /// `--listen` is at its connection cap; nothing reached the pipeline.
    Overloaded,
    /// A HEAD request for a valid link: answered without spending the code.
    Probed,
    /// The relay is misconfigured (CGI mode only: FastCGI refuses to start).
    Misconfigured,
}

impl Outcome<'_> {
    pub fn status(&self) -> u16 {
        match self {
            Outcome::Answered(_) | Outcome::Probed => 200,
            Outcome::Denied { error, .. } if *error == "access_denied" => 200,
            Outcome::Denied { .. } => 400,
            Outcome::Rejected(e) => e.status(),
            Outcome::BotFailed(e) => e.status(),
            Outcome::Overloaded => 503,
            Outcome::Misconfigured => 500,
        }
    }
}

/// A template that failed to load or render at start.
#[derive(Debug)]
pub struct TemplateError {
    pub path: PathBuf,
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
pub struct Page {
    env: Environment<'static>,
}

impl Page {
    pub fn built_in() -> Page {
        // The built-in template is tested; failing to compile it is a bug
        // caught by the test suite, never by a player.
        Page::from_source(BUILT_IN.to_string()).unwrap_or_else(|e| panic!("built-in page: {e}"))
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
            page.try_render(ok, "Title", "Message", Some("Hint"), !ok, 200)
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(page)
    }

    fn from_source(source: String) -> Result<Page, minijinja::Error> {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.add_template_owned("page", source)?;
        Ok(Page { env })
    }

    /// The full response for an outcome.
    pub fn respond(&self, outcome: &Outcome<'_>) -> Response {
        let status = outcome.status();
        let view = view(outcome);
        let body = self
            .try_render(
                view.ok,
                view.title,
                &view.message,
                view.hint,
                view.retry,
                status,
            )
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
        if status == 405 {
            headers.push(("Allow", "GET, HEAD".to_string()));
        }
        Response {
            status,
            headers,
            body: body.into_bytes(),
        }
    }

    fn try_render(
        &self,
        ok: bool,
        title: &str,
        message: &str,
        hint: Option<&str>,
        retry: bool,
        status: u16,
    ) -> Result<String, minijinja::Error> {
        self.env.get_template("page")?.render(context! {
            ok, title, message, hint, retry, status,
        })
    }
}

struct View<'a> {
    ok: bool,
    title: &'a str,
    message: String,
    hint: Option<&'a str>,
    retry: bool,
}

const BACK_TO_DISCORD: &str = "Ask the bot in Discord for a new sign-up link.";

fn view<'a>(outcome: &Outcome<'a>) -> View<'a> {
    let fail = |title, message: String, hint| View {
        ok: false,
        title,
        message,
        hint,
        retry: false,
    };
    match outcome {
        Outcome::Answered(reply) if reply.success => View {
            ok: true,
            title: "You're signed up",
            message: reply.message.clone(),
            hint: Some("You can close this page and go back to Discord."),
            retry: false,
        },
        Outcome::Answered(reply) => fail(
            "Sign-up failed",
            reply.message.clone(),
            Some("If this looks wrong, ask an organiser in Discord."),
        ),
        Outcome::Denied { error, .. } if *error == "access_denied" => fail(
            "Sign-in cancelled",
            "You cancelled the osu! sign-in, so you are not signed up.".to_string(),
            Some(BACK_TO_DISCORD),
        ),
        Outcome::Denied { error, description } => fail(
            "osu! sign-in failed",
            match description {
                Some(d) => format!("osu! said: {d} ({error})"),
                None => format!("osu! said: {error}"),
            },
            Some(BACK_TO_DISCORD),
        ),
        Outcome::Rejected(e) => fail(
            "This link doesn't work",
            e.to_string(),
            Some("Use the sign-up link the bot sent you in Discord."),
        ),
        Outcome::BotFailed(BotError::Unavailable(_)) => View {
            ok: false,
            title: "The bot is not available",
            message: "Your sign-in was not used yet, so nothing is lost.".to_string(),
            hint: Some("Wait a moment, then try again."),
            retry: true,
        },
        Outcome::BotFailed(BotError::Timeout) => fail(
            "The bot did not answer in time",
            "Your sign-up may or may not have gone through.".to_string(),
            Some("Check your Discord messages from the bot, or ask an organiser."),
        ),
        Outcome::BotFailed(_) => fail(
            "Something went wrong",
            "The bot gave an answer this page could not read.".to_string(),
            Some("Check your Discord messages from the bot, or ask an organiser."),
        ),
        Outcome::Overloaded => View {
            ok: false,
            title: "Too many sign-ups at once",
            message: "Your sign-in was not used yet, so nothing is lost.".to_string(),
            hint: Some("Wait a few seconds, then try again."),
            retry: true,
        },
        Outcome::Probed => View {
            ok: true,
            title: "Sign-up link",
            message: "Open this link in your browser to finish signing up.".to_string(),
            hint: None,
            retry: false,
        },
        Outcome::Misconfigured => fail(
            "Sign-ups are not set up correctly",
            "The server's configuration has an error.".to_string(),
            Some("Please tell an organiser."),
        ),
    }
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

    fn body(r: &Response) -> String {
        String::from_utf8(r.body.clone()).unwrap()
    }

    #[test]
    fn success_and_refusal() {
        let page = Page::built_in();
        let ok = BotReply {
            success: true,
            message: "Welcome, <b>Tom & \"Jerry\"</b>!".into(),
        };
        let r = page.respond(&Outcome::Answered(&ok));
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
        let r = page.respond(&Outcome::Answered(&no));
        assert_eq!(r.status, 200);
        let b = body(&r);
        assert!(b.contains("aria-label=\"Failure\""));
        assert!(b.contains("You&#x27;re already signed up!"));
        assert!(!b.contains("Try again"));
    }

    #[test]
    fn every_page_has_the_security_headers() {
        let page = Page::built_in();
        let r = page.respond(&Outcome::Rejected(&RequestError::MethodNotAllowed));
        assert_eq!(r.status, 405);
        assert_eq!(r.header("Allow"), Some("GET, HEAD"));
        for outcome in [
            Outcome::Rejected(&RequestError::Missing("code")),
            Outcome::BotFailed(&BotError::Timeout),
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
        let e = BotError::Unavailable(std::io::ErrorKind::ConnectionRefused.into());
        let r = page.respond(&Outcome::BotFailed(&e));
        assert_eq!(r.status, 503);
        assert!(body(&r).contains("<a class=\"button\" href=\"\">Try again</a>"));
        assert_eq!(
            page.respond(&Outcome::BotFailed(&BotError::Timeout)).status,
            504
        );
        assert_eq!(
            page.respond(&Outcome::BotFailed(&BotError::Closed)).status,
            502
        );
    }

    #[test]
    fn denied_pages() {
        let page = Page::built_in();
        let r = page.respond(&Outcome::Denied {
            error: "access_denied",
            description: Some("The resource owner or authorization server denied the request."),
        });
        assert_eq!(r.status, 200);
        assert!(body(&r).contains("Sign-in cancelled"));
        let r = page.respond(&Outcome::Denied {
            error: "server_error",
            description: Some("<script>x</script>"),
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
            body(&page.respond(&Outcome::Answered(&reply))),
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

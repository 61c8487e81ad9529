//! The request pipeline: parse the callback, decide, talk to the bot,
//! render. Transports call [`Relay::handle`] and print what it returns.

use std::time::Instant;

use log::info;
use sha2::{Digest, Sha256};

use crate::bot::{self, BotError, BotReply};
use crate::callback::{self, Callback};
use crate::config::Config;
use crate::http::{Request, Response};
use crate::page::{Outcome, Page, TemplateError};
use crate::replay::{Delivery, Store};

/// Everything a request needs, built once at start and shared by all
/// threads.
pub struct Relay {
    config: Config,
    page: Page,
    store: Option<Store>,
}

impl Relay {
    /// Loads the page template and opens the replay store. A store that
    /// cannot be opened is logged and left out: sign-ups still work, only
    /// the duplicate protection is lost.
    pub fn new(config: Config) -> Result<Relay, TemplateError> {
        let page = match &config.template {
            Some(path) => Page::from_file(path)?,
            None => Page::built_in(),
        };
        let store = config.state_dir.as_ref().and_then(|dir| {
            match Store::open(dir, config.replay_ttl) {
                Ok(store) => Some(store),
                Err(e) => {
                    log::warn!(
                        "replay store {} unusable, repeats of a code will reach the bot again: {e}",
                        dir.display()
                    );
                    None
                }
            }
        });
        Ok(Relay {
            config,
            page,
            store,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn page(&self) -> &Page {
        &self.page
    }

    /// Answers one request, delivering its code to the configured bot.
    pub fn handle(&self, req: &Request) -> Response {
        self.handle_with(req, |state, code| bot::exchange(&self.config, state, code))
    }

    /// Answers one request, delivering its code through `deliver`, so the
    /// whole pipeline can be tested without a socket.
    pub fn handle_with<F>(&self, req: &Request, deliver: F) -> Response
    where
        F: FnOnce(&str, &str) -> Result<BotReply, BotError>,
    {
        let started = Instant::now();
        let (response, outcome, code) = self.decide(req, deliver);
        info!(
            "outcome={outcome} status={} ms={} code={}",
            response.status,
            started.elapsed().as_millis(),
            code.as_deref().map(fingerprint).as_deref().unwrap_or("-"),
        );
        response
    }

    /// The response, a short outcome name for the log, and the code if
    /// the request carried one.
    fn decide<F>(&self, req: &Request, deliver: F) -> (Response, &'static str, Option<String>)
    where
        F: FnOnce(&str, &str) -> Result<BotReply, BotError>,
    {
        let (code, state) = match callback::parse(req) {
            Err(e) => return (self.page.respond(&Outcome::Rejected(&e)), e.outcome(), None),
            Ok(Callback::Denied { error, description }) => {
                let outcome = Outcome::Denied {
                    error: &error,
                    description: description.as_deref(),
                };
                return (self.page.respond(&outcome), "denied", None);
            }
            Ok(Callback::Authorized { code, state }) => (code, state),
        };
        // A HEAD (a link checker, a preview) must not spend the code.
        if req.is_head() {
            return (self.page.respond(&Outcome::Probed), "head", Some(code));
        }
        let result = match &self.store {
            Some(store) => {
                store.deliver_once(&code, self.config.bot_timeout, || deliver(&state, &code))
            }
            None => deliver(&state, &code).map(|reply| (reply, Delivery::First)),
        };
        match result {
            Ok((reply, delivery)) => {
                let outcome = match (reply.success, delivery) {
                    (true, Delivery::First) => "approved",
                    (false, Delivery::First) => "refused",
                    (true, Delivery::Replayed) => "approved-replayed",
                    (false, Delivery::Replayed) => "refused-replayed",
                };
                (
                    self.page.respond(&Outcome::Answered(&reply)),
                    outcome,
                    Some(code),
                )
            }
            Err(e) => {
                log::warn!("code={}: {e}", fingerprint(&code));
                (
                    self.page.respond(&Outcome::BotFailed(&e)),
                    e.outcome(),
                    Some(code),
                )
            }
        }
    }
}

/// The first 8 hex digits of the code's SHA-256: enough to follow one
/// player's request through the logs, useless for redeeming the code.
pub fn fingerprint(code: &str) -> String {
    let digest = Sha256::digest(code.as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn relay() -> Relay {
        let mut config = Config::from_lookup(|_| None).unwrap_or_else(|e| panic!("{e}"));
        config.state_dir = None;
        Relay::new(config).unwrap_or_else(|e| panic!("{e}"))
    }

    fn get(query: &str) -> Request {
        Request {
            method: b"GET".to_vec(),
            path_info: Vec::new(),
            query: query.as_bytes().to_vec(),
        }
    }

    fn body(r: &Response) -> String {
        String::from_utf8_lossy(&r.body).into_owned()
    }

    /// Runs a request with a bot that answers `answer` and records what it got.
    fn run(
        req: &Request,
        answer: Result<BotReply, BotError>,
    ) -> (Response, Option<(String, String)>) {
        let got = Cell::new(None);
        let resp = relay().handle_with(req, |state, code| {
            got.set(Some((state.to_string(), code.to_string())));
            answer
        });
        (resp, got.into_inner())
    }

    fn reply(success: bool, message: &str) -> Result<BotReply, BotError> {
        Ok(BotReply {
            success,
            message: message.into(),
        })
    }

    #[test]
    fn approved_and_refused_reach_the_bot_once_and_show_its_message() {
        let (r, got) = run(&get("code=C1&state=S%3D"), reply(true, "Welcome aboard"));
        assert_eq!(got, Some(("S=".into(), "C1".into())));
        assert_eq!(r.status, 200);
        assert!(body(&r).contains("Welcome aboard"));
        assert!(body(&r).contains("aria-label=\"Success\""));

        let (r, got) = run(
            &get("code=C2&state=S="),
            reply(false, "You're already signed up!"),
        );
        assert_eq!(got, Some(("S=".into(), "C2".into())));
        assert_eq!(r.status, 200);
        assert!(body(&r).contains("You&#x27;re already signed up!"));
        assert!(body(&r).contains("aria-label=\"Failure\""));
    }

    #[test]
    fn bad_requests_never_reach_the_bot() {
        let cases: [(&[u8], &[u8], &str, u16); 9] = [
            (b"GET", b"", "state=s", 400),
            (b"GET", b"", "code=&state=s", 400),
            (b"GET", b"", "code=a&code=b&state=s", 400),
            (b"GET", b"", "code=%zz&state=s", 400),
            (b"GET", b"", "code=%ff&state=s", 400),
            (b"POST", b"", "code=c&state=s", 405),
            (b"GET", b"/x", "code=c&state=s", 404),
            (b"HEAD", b"", "code=c&state=s", 200),
            (
                b"GET",
                b"",
                "error=access_denied&error_description=no&state=s",
                200,
            ),
        ];
        for (method, path, query, status) in cases {
            let req = Request {
                method: method.to_vec(),
                path_info: path.to_vec(),
                query: query.as_bytes().to_vec(),
            };
            let (r, got) = run(&req, reply(true, "should not be shown"));
            assert_eq!(got, None, "{query}");
            assert_eq!(r.status, status, "{query}");
            assert!(!body(&r).contains("should not be shown"));
        }
        let long = format!("code={}&state=s", "c".repeat(4097));
        assert_eq!(run(&get(&long), reply(true, "")).0.status, 400);
        let longer = format!("code=c&state=s&x={}", "c".repeat(9000));
        assert_eq!(run(&get(&longer), reply(true, "")).0.status, 414);
    }

    #[test]
    fn cancel_says_so() {
        let (r, _) = run(&get("error=access_denied&state=s"), reply(true, ""));
        assert!(body(&r).contains("cancelled"));
    }

    #[test]
    fn bot_failures_map_to_gateway_statuses() {
        let refused = BotError::Unavailable(std::io::ErrorKind::ConnectionRefused.into());
        let cases = [
            (refused, 503),
            (BotError::Timeout, 504),
            (BotError::Closed, 502),
            (BotError::Invalid("x".into()), 502),
            (BotError::TooLarge, 502),
        ];
        for (err, status) in cases {
            let (r, got) = run(&get("code=secretcode&state=secretstate"), Err(err));
            assert!(got.is_some());
            assert_eq!(r.status, status);
            let b = body(&r);
            assert!(!b.contains("secretcode") && !b.contains("secretstate"));
            assert_eq!(b.contains("Try again"), status == 503);
        }
    }

    #[test]
    fn fingerprint_is_eight_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf...
        assert_eq!(fingerprint("abc"), "ba7816bf");
    }
}

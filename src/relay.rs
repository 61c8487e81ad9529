//! The request pipeline: read the redirect, decide, talk to the bot (or
//! replay its answer), render, log one line. Transports call
//! [`Relay::handle`] and send what it returns.

use std::time::{Instant, SystemTime};

use log::info;

use crate::bot::{self, BotError, BotReply};
use crate::config::Config;
use crate::fingerprint::fingerprint;
use crate::http::{Request, Response};
use crate::outcome::Outcome;
use crate::page::{Page, TemplateError};
use crate::redirect::{self, Redirect};
use crate::replay::{Begin, Busy, Delivery, OpenError, Store, Ticket, Undelivered};

/// Everything a request needs, built once at start.
pub struct Relay {
    config: Config,
    page: Page,
    store: Option<Store>,
}

/// Why the relay cannot start: a template or a store directory that
/// cannot be used. One line, naming the setting.
#[derive(Debug)]
pub enum StartError {
    /// The page template cannot be used.
    Template(TemplateError),
    /// `REGISTER_STATE_DIR` is not a directory the store may use.
    StateDir(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Template(e) => write!(f, "{e}"),
            StartError::StateDir(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for StartError {}

impl Relay {
    /// Loads the page template and opens the replay store. A store
    /// directory that is not the store's own (a symlink, not private,
    /// others' files in it) stops the start; a store that cannot be used
    /// for want of space or a writable disk is logged and left out:
    /// sign-ups still work, only the duplicate protection is lost.
    pub fn new(config: Config) -> Result<Relay, StartError> {
        let page = match &config.template {
            Some(path) => Page::from_file(path).map_err(StartError::Template)?,
            None => Page::built_in(),
        };
        let store = match &config.state_dir {
            None => None,
            Some(dir) => match Store::open(dir, config.replay_ttl, config.replay_max) {
                Ok(store) => Some(store),
                Err(OpenError::Refused(why)) => return Err(StartError::StateDir(why)),
                Err(OpenError::Broken(e)) => {
                    log::warn!(
                        "replay store {} unusable, repeats of a code will reach the bot again: {e}",
                        dir.display()
                    );
                    None
                }
            },
        };
        Ok(Relay {
            config,
            page,
            store,
        })
    }

    /// The settings it was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Long-running modes: expired replay entries are zeroed by a
    /// background thread.
    pub fn start_housekeeping(&self) {
        if let Some(store) = &self.store {
            store.start_housekeeping();
        }
    }

    /// CGI, once the response is out: one bounded housekeeping step.
    pub fn housekeep(&self) {
        if let Some(store) = &self.store
            && let Err(e) = store.housekeep()
        {
            log::warn!("replay store: housekeeping failed: {e}");
        }
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
        let (outcome, code) = self.decide(req, deliver);
        answer(&self.page, &outcome, started, code.as_deref())
    }

    /// The answer to a connection turned away at the connection cap,
    /// logged like every other.
    pub fn overloaded(&self) -> Response {
        answer(&self.page, &Outcome::Overloaded, Instant::now(), None)
    }

    /// What became of the request, and its code if it carried one.
    fn decide<F>(&self, req: &Request, deliver: F) -> (Outcome, Option<String>)
    where
        F: FnOnce(&str, &str) -> Result<BotReply, BotError>,
    {
        let signup = match self.admit_outcome(req) {
            Ok(signup) => signup,
            Err((outcome, code)) => return (outcome, code),
        };
        let result = match &self.store {
            Some(store) => store.deliver_once(&signup.code, self.config.bot_timeout, || {
                deliver(&signup.state, &signup.code)
            }),
            None => deliver(&signup.state, &signup.code)
                .map(|reply| (reply, Delivery::First))
                .map_err(Undelivered::Bot),
        };
        (self.outcome_of(&signup, result), Some(signup.code))
    }

    /// The request's code and state, or what to answer without the bot.
    fn admit_outcome(&self, req: &Request) -> Result<Signup, (Outcome, Option<String>)> {
        let (code, state) = match redirect::parse(req) {
            Err(e) => return Err((Outcome::Rejected(e), None)),
            Ok(Redirect::Denied { error, description }) => {
                return Err((Outcome::Denied { error, description }, None));
            }
            Ok(Redirect::Authorized { code, state }) => (code, state),
        };
        // A HEAD (a link checker, a preview) must not spend the code.
        if req.is_head() {
            return Err((Outcome::Probed, Some(code)));
        }
        Ok(Signup {
            code,
            state,
            started: Instant::now(),
            asked: SystemTime::now(),
        })
    }

    fn outcome_of(
        &self,
        signup: &Signup,
        result: Result<(BotReply, Delivery), Undelivered>,
    ) -> Outcome {
        match result {
            Ok((reply, delivery)) => Outcome::Answered { reply, delivery },
            Err(Undelivered::Bot(e)) => {
                log::warn!("code={}: {e}", fingerprint(&signup.code));
                Outcome::BotFailed(e.kind())
            }
            Err(Undelivered::Unconfirmed) => Outcome::Unconfirmed,
        }
    }

    // The same pipeline in steps, for a driver that never blocks (the
    // event loop): admit, claim (again while busy), exchange with the
    // bot itself, conclude.

    /// Reads a request: the answer when it needs no bot, or the sign-up
    /// whose code is to be delivered.
    pub fn admit(&self, req: &Request) -> Admission {
        let started = Instant::now();
        match self.admit_outcome(req) {
            Ok(signup) => Admission::Signup(signup),
            Err((outcome, code)) => {
                Admission::Answered(answer(&self.page, &outcome, started, code.as_deref()))
            }
        }
    }

    /// Claims the sign-up's code in the replay store without waiting.
    pub fn claim(&self, signup: &Signup) -> Claimed {
        let Some(store) = &self.store else {
            return Claimed::Deliver(None);
        };
        match store.begin(&signup.code, signup.asked) {
            Begin::Done(result) => Claimed::Done(result),
            Begin::Deliver(ticket) => Claimed::Deliver(Some(ticket)),
            Begin::Busy(busy) => Claimed::Busy(busy),
        }
    }

    /// The message that carries the sign-up's code to the bot.
    pub fn message(&self, signup: &Signup) -> Vec<u8> {
        bot::encode(self.config.wire, &signup.state, &signup.code)
    }

    /// The answer to a sign-up, logged like every other.
    pub fn conclude(
        &self,
        signup: Signup,
        result: Result<(BotReply, Delivery), Undelivered>,
    ) -> Response {
        let outcome = self.outcome_of(&signup, result);
        answer(&self.page, &outcome, signup.started, Some(&signup.code))
    }
}

/// A request whose code is to reach the bot. Its `Debug` shows neither
/// the code nor the state.
pub struct Signup {
    code: String,
    state: String,
    started: Instant,
    /// When it was asked, for the replay store.
    asked: SystemTime,
}

impl std::fmt::Debug for Signup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signup(code={})", fingerprint(&self.code))
    }
}

/// What [`Relay::admit`] made of a request.
#[derive(Debug)]
pub enum Admission {
    /// Answered without the bot (a bad request, a cancel, a HEAD).
    Answered(Response),
    /// A code to deliver.
    Signup(Signup),
}

/// What [`Relay::claim`] found.
#[derive(Debug)]
pub enum Claimed {
    /// Answered from the replay store: a replay, or a delivery that
    /// cannot be confirmed.
    Done(Result<(BotReply, Delivery), Undelivered>),
    /// This request delivers the code; the ticket (none without a store)
    /// keeps the outcome.
    Deliver(Option<Ticket>),
    /// Someone else holds the code's entry (a delivery in flight), or its
    /// bucket: try again shortly; past the request's deadline,
    /// [`Busy::given_up`] is the answer.
    Busy(Busy),
}

/// The response for `outcome`, and its one log line: outcome, status,
/// milliseconds since `started` and the code's fingerprint, never the code.
/// Every answer the program gives goes through here.
pub fn answer(page: &Page, outcome: &Outcome, started: Instant, code: Option<&str>) -> Response {
    let response = page.respond(outcome);
    info!(
        "outcome={} status={} ms={} code={}",
        outcome.log_name(),
        response.status,
        started.elapsed().as_millis(),
        code.map(fingerprint).as_deref().unwrap_or("-"),
    );
    response
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

    /// A delivery that dies mid-way (here a panic, which releases the
    /// entry's lock as a killed process does) leaves its intent; the same
    /// code again, in another relay on the same store, is not delivered.
    #[test]
    fn a_code_whose_delivery_died_is_unconfirmed_not_sent_again() {
        let dir = std::env::temp_dir().join(format!("tr-relay-died-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let with_store = || {
            let mut config = Config::from_lookup(|_| None).unwrap_or_else(|e| panic!("{e}"));
            config.state_dir = Some(dir.clone());
            Relay::new(config).unwrap_or_else(|e| panic!("{e}"))
        };
        let req = get("code=dies-mid-way&state=s");
        let first = with_store();
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            first.handle_with(&req, |_, _| panic!("killed mid-delivery"))
        }));
        assert!(died.is_err());
        let called = Cell::new(false);
        let r = with_store().handle_with(&req, |_, _| {
            called.set(true);
            reply(true, "second delivery")
        });
        assert!(!called.get(), "the code was sent again");
        assert_eq!(r.status, 502);
        assert!(body(&r).contains("could not be confirmed"));
        let _ = std::fs::remove_dir_all(&dir);
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
}

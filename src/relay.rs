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

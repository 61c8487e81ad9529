//! What became of one request, and everything that follows from it: the
//! HTTP status, the name in the log line and what the page shows.
//!
//! The steps of the pipeline report in their own terms ([`RequestError`]
//! from the redirect, [`FailureKind`] from the bot or the replay store);
//! this is the one place that turns them into HTTP.

use std::borrow::Cow;

use crate::bot::{BotReply, FailureKind};
use crate::page::View;
use crate::redirect::RequestError;
use crate::replay::Delivery;

/// What happened to a request.
#[derive(Debug)]
pub enum Outcome {
    /// The bot answered, just now or earlier for the same code.
    Answered {
        /// The bot's answer; `success` picks the check mark or the cross.
        reply: BotReply,
        /// Whether it came from the bot just now or from the replay store.
        delivery: Delivery,
    },
    /// osu! reported an error instead of a code (`access_denied` on Cancel).
    Denied {
        /// osu!'s error code.
        error: String,
        /// osu!'s explanation, if any.
        description: Option<String>,
    },
    /// The request was turned away before the bot was contacted.
    Rejected(RequestError),
    /// No answer came from the bot.
    BotFailed(FailureKind),
    /// An earlier request with this code began its delivery and its
    /// process died before the bot's answer was kept: the bot may have the
    /// code, so it was not sent again.
    Unconfirmed,
    /// `--listen` is at its connection cap; nothing reached the pipeline.
    Overloaded,
    /// A HEAD request for a valid link: answered without spending the code.
    Probed,
    /// The relay is misconfigured (CGI mode only: FastCGI refuses to start).
    Misconfigured,
}

const BACK_TO_DISCORD: &str = "Ask the bot in Discord for a new sign-up link.";
const CHECK_DISCORD: &str = "Check your Discord messages from the bot, or ask an organiser.";
const NOTHING_LOST: &str = "Your sign-in was not used yet, so nothing is lost.";

impl Outcome {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Outcome::Answered { .. } | Outcome::Probed => 200,
            Outcome::Denied { error, .. } if error == "access_denied" => 200,
            Outcome::Denied { .. } => 400,
            Outcome::Rejected(e) => match e {
                RequestError::MethodNotAllowed => 405,
                RequestError::NotFound => 404,
                RequestError::QueryTooLong => 414,
                RequestError::ValueTooLong(_)
                | RequestError::BadEncoding
                | RequestError::Missing(_)
                | RequestError::Repeated(_) => 400,
            },
            Outcome::BotFailed(kind) => match kind {
                FailureKind::Unavailable => 503,
                FailureKind::Timeout => 504,
                FailureKind::Closed | FailureKind::Invalid | FailureKind::TooLarge => 502,
            },
            // The state upstream is unknown, as for a bot that closed early.
            Outcome::Unconfirmed => 502,
            Outcome::Overloaded => 503,
            Outcome::Misconfigured => 500,
        }
    }

    /// The short name in the log line's `outcome=`.
    pub fn log_name(&self) -> &'static str {
        match self {
            Outcome::Answered { reply, delivery } => match (reply.success, delivery) {
                (true, Delivery::First) => "approved",
                (false, Delivery::First) => "refused",
                (true, Delivery::Replayed) => "approved-replayed",
                (false, Delivery::Replayed) => "refused-replayed",
            },
            Outcome::Denied { .. } => "denied",
            Outcome::Rejected(e) => match e {
                RequestError::MethodNotAllowed => "bad-method",
                RequestError::NotFound => "not-found",
                RequestError::QueryTooLong => "query-too-long",
                RequestError::ValueTooLong(_) => "value-too-long",
                RequestError::BadEncoding => "bad-encoding",
                RequestError::Missing(_) => "missing-param",
                RequestError::Repeated(_) => "repeated-param",
            },
            Outcome::BotFailed(kind) => match kind {
                FailureKind::Unavailable => "bot-unavailable",
                FailureKind::Timeout => "bot-timeout",
                FailureKind::Closed => "bot-closed",
                FailureKind::Invalid => "bot-invalid-reply",
                FailureKind::TooLarge => "bot-reply-too-large",
            },
            Outcome::Unconfirmed => "unconfirmed",
            Outcome::Overloaded => "overloaded",
            Outcome::Probed => "head",
            Outcome::Misconfigured => "misconfigured",
        }
    }

    /// What the page shows.
    pub fn view(&self) -> View<'_> {
        let status = self.status();
        let fail = |title, message: Cow<'static, str>, hint| View {
            ok: false,
            title,
            message,
            hint,
            retry: false,
            status,
        };
        let retry = |title, hint| View {
            ok: false,
            title,
            message: NOTHING_LOST.into(),
            hint: Some(hint),
            retry: true,
            status,
        };
        match self {
            Outcome::Answered { reply, .. } if reply.success => View {
                ok: true,
                title: "You're signed up",
                message: reply.message.as_str().into(),
                hint: Some("You can close this page and go back to Discord."),
                retry: false,
                status,
            },
            Outcome::Answered { reply, .. } => View {
                message: reply.message.as_str().into(),
                ..fail(
                    "Sign-up failed",
                    "".into(),
                    Some("If this looks wrong, ask an organiser in Discord."),
                )
            },
            Outcome::Denied { error, .. } if error == "access_denied" => fail(
                "Sign-in cancelled",
                "You cancelled the osu! sign-in, so you are not signed up.".into(),
                Some(BACK_TO_DISCORD),
            ),
            Outcome::Denied { error, description } => fail(
                "osu! sign-in failed",
                match description {
                    Some(d) => format!("osu! said: {d} ({error})").into(),
                    None => format!("osu! said: {error}").into(),
                },
                Some(BACK_TO_DISCORD),
            ),
            Outcome::Rejected(e) => fail(
                "This link doesn't work",
                e.to_string().into(),
                Some("Use the sign-up link the bot sent you in Discord."),
            ),
            Outcome::BotFailed(FailureKind::Unavailable) => {
                retry("The bot is not available", "Wait a moment, then try again.")
            }
            Outcome::BotFailed(FailureKind::Timeout) => fail(
                "The bot did not answer in time",
                "Your sign-up may or may not have gone through.".into(),
                Some(CHECK_DISCORD),
            ),
            Outcome::BotFailed(_) => fail(
                "Something went wrong",
                "The bot gave an answer this page could not read.".into(),
                Some(CHECK_DISCORD),
            ),
            Outcome::Unconfirmed => fail(
                "Your sign-up could not be confirmed",
                "This sign-in link was already used, and the bot may have your sign-up, \
                 but its answer was lost."
                    .into(),
                Some(
                    "Check your Discord messages from the bot. If there is nothing there, \
                     start the sign-up again from the bot's link.",
                ),
            ),
            Outcome::Overloaded => retry(
                "Too many sign-ups at once",
                "Wait a few seconds, then try again.",
            ),
            Outcome::Probed => View {
                ok: true,
                title: "Sign-up link",
                message: "Open this link in your browser to finish signing up.".into(),
                hint: None,
                retry: false,
                status,
            },
            Outcome::Misconfigured => fail(
                "Sign-ups are not set up correctly",
                "The server's configuration has an error.".into(),
                Some("Please tell an organiser."),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_map_to_client_statuses() {
        let cases = [
            (RequestError::QueryTooLong, 414),
            (RequestError::ValueTooLong("code"), 400),
            (RequestError::MethodNotAllowed, 405),
            (RequestError::NotFound, 404),
            (RequestError::BadEncoding, 400),
            (RequestError::Missing("code"), 400),
            (RequestError::Repeated("state"), 400),
        ];
        for (e, status) in cases {
            assert_eq!(Outcome::Rejected(e).status(), status);
        }
    }

    #[test]
    fn every_failure_kind_has_a_gateway_status_and_its_own_name() {
        let kinds = [
            (FailureKind::Unavailable, 503, "bot-unavailable"),
            (FailureKind::Timeout, 504, "bot-timeout"),
            (FailureKind::Closed, 502, "bot-closed"),
            (FailureKind::Invalid, 502, "bot-invalid-reply"),
            (FailureKind::TooLarge, 502, "bot-reply-too-large"),
        ];
        for (kind, status, name) in kinds {
            let outcome = Outcome::BotFailed(kind);
            assert_eq!(outcome.status(), status);
            assert_eq!(outcome.log_name(), name);
            assert_eq!(outcome.view().retry, kind == FailureKind::Unavailable);
            assert_eq!(outcome.view().status, status);
        }
    }

    #[test]
    fn unconfirmed_is_a_502_that_sends_the_player_to_discord_without_a_retry() {
        let o = Outcome::Unconfirmed;
        assert_eq!((o.status(), o.log_name()), (502, "unconfirmed"));
        let v = o.view();
        assert!(!v.ok && !v.retry);
        assert_eq!(v.status, 502);
        let hint = v.hint.unwrap_or_default();
        assert!(hint.contains("Discord messages"), "{hint}");
        assert!(hint.contains("start the sign-up again"), "{hint}");
    }

    #[test]
    fn overloaded_is_a_503_with_a_retry_and_its_own_name() {
        let o = Outcome::Overloaded;
        assert_eq!((o.status(), o.log_name()), (503, "overloaded"));
        let v = o.view();
        assert!(v.retry && !v.ok);
    }

    #[test]
    fn answers_name_their_delivery() {
        let answered = |success, delivery| Outcome::Answered {
            reply: BotReply {
                success,
                message: "m".into(),
            },
            delivery,
        };
        assert_eq!(answered(true, Delivery::First).log_name(), "approved");
        assert_eq!(answered(false, Delivery::First).log_name(), "refused");
        assert_eq!(
            answered(true, Delivery::Replayed).log_name(),
            "approved-replayed"
        );
        assert_eq!(
            answered(false, Delivery::Replayed).log_name(),
            "refused-replayed"
        );
        let refused = answered(false, Delivery::First);
        let v = refused.view();
        assert_eq!((v.ok, v.message.as_ref(), v.status), (false, "m", 200));
    }
}

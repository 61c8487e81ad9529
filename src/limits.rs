//! Every bound on what a web server's connection may make the program
//! hold, in one place. Each field names the one module that enforces it.

use std::time::Duration;

use crate::config::Config;

/// The bounds on FastCGI connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections with `--listen` (`REGISTER_MAX_CONNS`),
    /// also reported as `FCGI_MAX_CONNS` and `FCGI_MAX_REQS`. Enforced by
    /// [`crate::event`]: past it a connection is answered
    /// "overloaded".
    pub max_conns: usize,
    /// Total PARAMS payload of one request; past it the request is
    /// answered `400 Bad Request` and the connection closed. Enforced by
    /// [`crate::fastcgi::Connection`].
    pub max_params_bytes: usize,
    /// Total STDIN payload of one request (read and thrown away); past
    /// it, as for PARAMS. Enforced by [`crate::fastcgi::Connection`].
    pub max_stdin_bytes: usize,
    /// A whole request, from the first byte of its BEGIN_REQUEST to its
    /// last STDIN record (`REGISTER_FCGI_TIMEOUT`). Enforced by
    /// [`crate::fastcgi::Connection`].
    pub request_timeout: Duration,
    /// A connection between requests: from accept, or from the last
    /// answer, to the first byte of the next request. Management records
    /// and records for other request ids do not restart it. Enforced by
    /// [`crate::fastcgi::Connection`].
    pub idle_timeout: Duration,
    /// Writing one answer. Enforced by [`crate::fastcgi::serve_connection`].
    pub write_timeout: Duration,
    /// Connections being turned away at once, past [`Limits::max_conns`];
    /// past both, a connection is closed unanswered. Enforced by
    /// [`crate::event`].
    pub max_turning_away: usize,
    /// How long a turned-away connection may take to send its first
    /// record header. Enforced by [`crate::event`].
    pub turn_away_timeout: Duration,
    /// How long a stop waits for requests in flight: a full retry window
    /// and a full exchange with the bot, plus a margin for writing the
    /// answer. Enforced by [`crate::event`].
    pub stop_grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_conns: 256,
            max_params_bytes: 64 * 1024,
            max_stdin_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_turning_away: 64,
            turn_away_timeout: Duration::from_millis(500),
            stop_grace: Duration::from_secs(13),
        }
    }
}

impl Limits {
    /// The limits the settings ask for.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            max_conns: config.max_conns,
            request_timeout: config.fcgi_timeout,
            idle_timeout: config.fcgi_timeout,
            write_timeout: config.fcgi_timeout,
            stop_grace: config.bot_retry + config.bot_timeout + Duration::from_secs(1),
            ..Limits::default()
        }
    }
}

//! Every bound on what a web server's connection may make the program
//! hold, in one place. Each field names the modules that enforce it.

use std::time::Duration;

use crate::config::Config;

/// The connection cap when `REGISTER_MAX_CONNS` is not set and the limit
/// on open files allows it: far more than a sign-up burst brings at once.
pub const DEFAULT_MAX_CONNS: usize = 4096;
/// Descriptors a connection may hold: the web server's and the bot's.
pub const DESCRIPTORS_PER_CONN: u64 = 2;
/// Descriptors kept for all else: the listener, the poll, the stop
/// signal's sockets, the replay store, the log, the service manager's
/// socket.
pub const DESCRIPTORS_SPARE: u64 = 64;

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
    /// Writing one answer. Enforced by [`crate::fastcgi::serve_connection`]
    /// and, with `--listen`, by [`crate::event`].
    pub write_timeout: Duration,
    /// Connections being turned away at once, past [`Limits::max_conns`];
    /// past both, a new connection waits in the listener's queue until
    /// one ends. Enforced by [`crate::event`].
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
            max_conns: DEFAULT_MAX_CONNS,
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
            max_conns: config.max_conns.unwrap_or(DEFAULT_MAX_CONNS),
            request_timeout: config.fcgi_timeout,
            idle_timeout: config.fcgi_timeout,
            write_timeout: config.fcgi_timeout,
            stop_grace: config.bot_retry + config.bot_timeout + Duration::from_secs(1),
            ..Limits::default()
        }
    }

    /// How many descriptors serving at these limits may hold at once.
    pub fn descriptors(&self) -> u64 {
        DESCRIPTORS_PER_CONN * self.max_conns as u64
            + self.max_turning_away as u64
            + DESCRIPTORS_SPARE
    }

    /// These limits with the connection cap lowered, if need be, so that
    /// serving never holds more than `available` descriptors (a cap of at
    /// least one connection all the same).
    pub fn within_descriptors(self, available: u64) -> Limits {
        let room = available.saturating_sub(self.max_turning_away as u64 + DESCRIPTORS_SPARE)
            / DESCRIPTORS_PER_CONN;
        Limits {
            max_conns: self
                .max_conns
                .min(usize::try_from(room).unwrap_or(usize::MAX))
                .max(1),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_descriptors_it_may_use() {
        let wanted = Limits {
            max_conns: DEFAULT_MAX_CONNS,
            ..Limits::default()
        };
        // systemd's soft limit, before the process raises it.
        let at_1024 = wanted.within_descriptors(1024);
        assert_eq!(at_1024.max_conns, (1024 - 64 - 64) / 2);
        assert!(at_1024.descriptors() <= 1024);
        // Raised to what the default needs: the default whole.
        let raised = wanted.within_descriptors(wanted.descriptors());
        assert_eq!(raised, wanted);
        assert_eq!(wanted.within_descriptors(1 << 20), wanted);
        // A limit too small for anything still serves one.
        assert_eq!(wanted.within_descriptors(10).max_conns, 1);
        // 2,000 at once need about 4,000 descriptors.
        let burst = Limits {
            max_conns: 2000,
            ..Limits::default()
        };
        assert_eq!(burst.descriptors(), 4000 + 64 + 64);
    }
}

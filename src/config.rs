//! Configuration, read once from the process environment at start.
//!
//! Apache hands settings to the program through `FcgidInitialEnv` or
//! `SetEnv`, a systemd unit through `Environment=`, a person through a
//! shell. Every value is checked here, before the first request, so a typo
//! is one clear line in the error log instead of a broken sign-up later.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Every environment variable the program reads as a setting, in the order
/// `--help`, the man page and the README list them (tests check all three,
/// and `Config::from_lookup`, against this). `RUST_LOG` is read by the
/// logger, the rest here. A new setting is a line here, in `--help`, in the
/// man page and in the README's table.
pub const VARIABLES: &[&str] = &[
    "REGISTER_BOT_ADDR",
    "REGISTER_BOT_TIMEOUT",
    "REGISTER_BOT_RETRY",
    "REGISTER_WIRE",
    "REGISTER_TEMPLATE",
    "REGISTER_REPLAY_TTL",
    "REGISTER_STATE_DIR",
    "REGISTER_REPLAY_MAX",
    "REGISTER_MAX_CONNS",
    "REGISTER_FCGI_TIMEOUT",
    "RUST_LOG",
];

/// Where the bot listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BotAddr {
    /// Resolved at start so that no request waits on a name lookup.
    Tcp(Vec<SocketAddr>),
    /// A Unix socket's path.
    Unix(PathBuf),
}

impl fmt::Display for BotAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BotAddr::Tcp(addrs) => match addrs.first() {
                Some(a) => write!(f, "{a}"),
                None => write!(f, "(no address)"),
            },
            BotAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How the two messages are encoded on the bot's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// UTF-8 JSON objects.
    Json,
    /// Python's pickle, so a cog written for the old Flask relay works
    /// unchanged. Replies are decoded as plain data only.
    Pickle,
}

/// Every `REGISTER_*` setting, checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the bot listens (`REGISTER_BOT_ADDR`).
    pub bot_addr: BotAddr,
    /// Bound on the whole exchange with the bot: connect, send, reply.
    pub bot_timeout: Duration,
    /// How long a refused connection is retried, for a bot that restarts.
    pub bot_retry: Duration,
    /// The bot's wire format (`REGISTER_WIRE`).
    pub wire: Wire,
    /// An organiser's page template (`REGISTER_TEMPLATE`); `None`: the
    /// built-in page.
    pub template: Option<PathBuf>,
    /// How long a code's answer is replayed to a repeat of the same code.
    pub replay_ttl: Duration,
    /// `None` turns the replay store off (REGISTER_STATE_DIR=off).
    pub state_dir: Option<PathBuf>,
    /// How many codes the replay store keeps at most; its size on disk
    /// follows from it.
    pub replay_max: usize,
    /// Cap on concurrent connections in `--listen` mode; `None`: as many
    /// as the limit on open files allows, up to
    /// [`crate::limits::DEFAULT_MAX_CONNS`].
    pub max_conns: Option<usize>,
    /// Bound on a web server's FastCGI request, on the wait between its
    /// requests and on each write, so a server that stalls or trickles
    /// cannot hold the relay's connection, or its one serial process, for
    /// ever.
    pub fcgi_timeout: Duration,
}

/// A setting that cannot be used, named so the operator can fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The variable's name.
    pub var: &'static str,
    /// Its value.
    pub value: String,
    /// What it may be.
    pub allowed: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={:?} is not valid: {}",
            self.var, self.value, self.allowed
        )
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Reads settings through `lookup`, so tests need not touch the
    /// process environment. An empty value counts as unset, as it does
    /// for most programs run from Apache configuration.
    pub fn from_lookup<F>(lookup: F) -> Result<Config, ConfigError>
    where
        F: Fn(&str) -> Option<String>,
    {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let bot_addr = match get("REGISTER_BOT_ADDR") {
            Some(v) => parse_addr(&v)?,
            None => BotAddr::Tcp(vec![SocketAddr::from(([127, 0, 0, 1], 7865))]),
        };
        let bot_timeout = seconds(
            get("REGISTER_BOT_TIMEOUT"),
            "REGISTER_BOT_TIMEOUT",
            10.0,
            false,
        )?;
        let bot_retry = seconds(get("REGISTER_BOT_RETRY"), "REGISTER_BOT_RETRY", 2.0, true)?;
        let wire = match get("REGISTER_WIRE").as_deref().map(str::trim) {
            None | Some("json") => Wire::Json,
            Some("pickle") => Wire::Pickle,
            Some(other) => {
                return Err(ConfigError {
                    var: "REGISTER_WIRE",
                    value: other.to_string(),
                    allowed: "json or pickle",
                });
            }
        };
        let template = get("REGISTER_TEMPLATE").map(PathBuf::from);
        let replay_ttl = seconds(
            get("REGISTER_REPLAY_TTL"),
            "REGISTER_REPLAY_TTL",
            600.0,
            true,
        )?;
        let state_dir = match get("REGISTER_STATE_DIR") {
            Some(v) if v.trim() == "off" => None,
            Some(v) => Some(PathBuf::from(v)),
            None => Some(default_state_dir()),
        };
        let replay_max = match get("REGISTER_REPLAY_MAX") {
            None => 100_000,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (8..=1_000_000).contains(&n) => n,
                _ => {
                    return Err(ConfigError {
                        var: "REGISTER_REPLAY_MAX",
                        value: v,
                        allowed: "a whole number of codes from 8 to 1000000",
                    });
                }
            },
        };
        let max_conns = match get("REGISTER_MAX_CONNS") {
            None => None,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=10_000).contains(&n) => Some(n),
                _ => {
                    return Err(ConfigError {
                        var: "REGISTER_MAX_CONNS",
                        value: v,
                        allowed: "a whole number from 1 to 10000",
                    });
                }
            },
        };
        let fcgi_timeout = seconds(
            get("REGISTER_FCGI_TIMEOUT"),
            "REGISTER_FCGI_TIMEOUT",
            30.0,
            false,
        )?;
        Ok(Config {
            fcgi_timeout,
            bot_addr,
            bot_timeout,
            bot_retry,
            wire,
            template,
            replay_ttl,
            state_dir,
            replay_max,
            max_conns,
        })
    }
}

/// The store's default home: private to the user the relay runs as, so
/// two sites' relays on one machine do not share answers by accident.
fn default_state_dir() -> PathBuf {
    let uid = crate::sys::effective_uid();
    std::env::temp_dir().join(format!("tourney-register-{uid}"))
}

fn parse_addr(value: &str) -> Result<BotAddr, ConfigError> {
    let value = value.trim();
    let bad = |allowed| ConfigError {
        var: "REGISTER_BOT_ADDR",
        value: value.to_string(),
        allowed,
    };
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() || !path.starts_with('/') {
            return Err(bad("unix: followed by an absolute socket path"));
        }
        return Ok(BotAddr::Unix(PathBuf::from(path)));
    }
    // Demand an explicit port: a bare host would silently mean port 0.
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
        _ => {
            return Err(bad(
                "host:port (e.g. 127.0.0.1:7865) or unix:/path/to/socket",
            ));
        }
    }
    match value.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err(bad("a host name that resolves"))
            } else {
                Ok(BotAddr::Tcp(addrs))
            }
        }
        Err(_) => Err(bad("a host name that resolves, with a port")),
    }
}

fn seconds(
    value: Option<String>,
    var: &'static str,
    default: f64,
    zero_ok: bool,
) -> Result<Duration, ConfigError> {
    let Some(value) = value else {
        return Ok(Duration::from_secs_f64(default));
    };
    let allowed = if zero_ok {
        "a number of seconds from 0 to 86400 (decimals allowed)"
    } else {
        "a number of seconds above 0, at most 86400 (decimals allowed)"
    };
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s <= 86_400.0 && (s > 0.0 || (zero_ok && s == 0.0)) => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(ConfigError {
            var,
            value,
            allowed,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(
            c.bot_addr,
            BotAddr::Tcp(vec!["127.0.0.1:7865".parse().unwrap()])
        );
        assert_eq!(c.bot_timeout, Duration::from_secs(10));
        assert_eq!(c.bot_retry, Duration::from_secs(2));
        assert_eq!(c.wire, Wire::Json);
        assert_eq!(c.template, None);
        assert_eq!(c.replay_ttl, Duration::from_secs(600));
        assert!(c.state_dir.unwrap().starts_with(std::env::temp_dir()));
        assert_eq!(c.max_conns, None);
        assert_eq!(c.replay_max, 100_000);
        assert_eq!(c.fcgi_timeout, Duration::from_secs(30));
    }

    #[test]
    fn good_values() {
        let c = cfg(&[
            ("REGISTER_BOT_ADDR", "unix:/run/bot.sock"),
            ("REGISTER_BOT_TIMEOUT", "0.5"),
            ("REGISTER_BOT_RETRY", "0"),
            ("REGISTER_WIRE", "pickle"),
            ("REGISTER_TEMPLATE", "/etc/page.html"),
            ("REGISTER_STATE_DIR", "off"),
            ("REGISTER_MAX_CONNS", "8"),
            ("REGISTER_REPLAY_MAX", "64"),
        ])
        .unwrap();
        assert_eq!(c.bot_addr, BotAddr::Unix("/run/bot.sock".into()));
        assert_eq!(c.bot_timeout, Duration::from_millis(500));
        assert_eq!(c.bot_retry, Duration::ZERO);
        assert_eq!(c.wire, Wire::Pickle);
        assert_eq!(c.template, Some(PathBuf::from("/etc/page.html")));
        assert_eq!(c.state_dir, None);
        assert_eq!(c.max_conns, Some(8));
        assert_eq!(c.replay_max, 64);
        let c = cfg(&[("REGISTER_BOT_ADDR", "localhost:9")]).unwrap();
        assert!(matches!(c.bot_addr, BotAddr::Tcp(ref a) if a.iter().all(|a| a.port() == 9)));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            ("REGISTER_BOT_ADDR", "127.0.0.1"),
            ("REGISTER_BOT_ADDR", "127.0.0.1:0"),
            ("REGISTER_BOT_ADDR", "127.0.0.1:99999"),
            ("REGISTER_BOT_ADDR", "unix:relative.sock"),
            ("REGISTER_BOT_ADDR", "no such host.invalid:80"),
            ("REGISTER_BOT_TIMEOUT", "0"),
            ("REGISTER_BOT_TIMEOUT", "-1"),
            ("REGISTER_BOT_TIMEOUT", "ten"),
            ("REGISTER_BOT_TIMEOUT", "NaN"),
            ("REGISTER_BOT_RETRY", "-0.1"),
            ("REGISTER_WIRE", "xml"),
            ("REGISTER_REPLAY_TTL", "forever"),
            ("REGISTER_MAX_CONNS", "0"),
            ("REGISTER_REPLAY_MAX", "7"),
            ("REGISTER_REPLAY_MAX", "1000001"),
            ("REGISTER_REPLAY_MAX", "lots"),
        ];
        for (var, value) in cases {
            let err = cfg(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{var}={value}");
            let text = err.to_string();
            assert!(text.starts_with(var), "{text}");
        }
    }

    #[test]
    fn variables_are_the_ones_read() {
        let asked = std::cell::RefCell::new(Vec::new());
        Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_string());
            None
        })
        .unwrap();
        let mut asked = asked.into_inner();
        asked.sort();
        asked.dedup();
        let mut listed: Vec<String> = VARIABLES
            .iter()
            .filter(|v| **v != "RUST_LOG")
            .map(|v| v.to_string())
            .collect();
        listed.sort();
        assert_eq!(asked, listed);
    }

    #[test]
    fn empty_counts_as_unset() {
        let c = cfg(&[("REGISTER_WIRE", ""), ("REGISTER_BOT_TIMEOUT", " ")]).unwrap();
        assert_eq!(c.wire, Wire::Json);
        assert_eq!(c.bot_timeout, Duration::from_secs(10));
    }
}

//! The shared harness of the integration tests, one module per concern.
//!
//! Independent of the crate's own code: the FastCGI client and the CGI output
//! parser are written from the specs, so a bug in `src/` cannot hide behind
//! the same bug in the tests.
//!
//! Everything that waits is bounded, and every child process is owned by a
//! value that kills it on drop, so a failing (panicking) test leaves nothing
//! running. When a test panics, the drops also print the child's stderr.
//!
//! - [`process`]: the binary under test ([`bin`], [`run_bin`]), [`TempDir`],
//!   bounded waits, [`python`] snippets.
//! - [`bot`]: [`Bot`], the Python stand-in for the Discord cog
//!   (`tests/peer/bot.py`), and what it [`Received`].
//! - [`files`]: [`raise_files_limit`], [`require_open_files`]: this process
//!   may hold the sockets the suites open at once.
//! - [`ports`]: [`free_port`], and [`RefusingPort`], an address where nothing
//!   listens, kept that way.
//! - [`cgi`]: [`run_cgi`], [`run_cgi_raw`]; [`HttpLike`], [`parse_cgi`] for
//!   CGI-form output (`Status:` + headers + body).
//! - [`secrets`]: [`unique`] codes and states, and their [`fingerprint`].
//! - [`page`]: what the player reads ([`title_text`], [`message_text`]) and
//!   [`assert_answer_page`], [`assert_security_headers`].
//! - [`log`]: [`assert_log`], one `outcome=` line per request, no secret.
//! - [`fcgi`]: the FastCGI client ([`fcgi_get`], [`fcgi_request`],
//!   [`write_record`], [`read_record`], [`encode_pairs`], ...).
//! - [`server`]: [`Fd0Server`] (a listening socket as fd 0, as mod_fcgid and
//!   spawn-fcgi start it) and [`ListenServer`] (`--listen ADDR`); both deref
//!   to [`Server`].
//! - [`json`]: [`parse_json`] into serde_json's [`Json`] value.
//! - [`apache`]: a private Apache and a small HTTP/1.1 client.
//! - [`nginx`]: a private nginx in front of a relay, with the shipped snippet.
//! - [`axe`]: axe-core, the accessibility rules the browser test runs in
//!   each page.

pub mod apache;
pub mod axe;
pub mod bot;
pub mod cgi;
pub mod fcgi;
pub mod files;
pub mod json;
pub mod log;
pub mod nginx;
pub mod page;
pub mod ports;
pub mod process;
pub mod secrets;
pub mod server;

pub use bot::*;
pub use cgi::*;
pub use fcgi::*;
pub use files::*;
pub use json::*;
pub use log::*;
pub use nginx::*;
pub use page::*;
pub use ports::*;
pub use process::*;
pub use secrets::*;
pub use server::*;

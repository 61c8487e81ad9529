//! The integration tests, in one binary: one build and one link for all of
//! them, and one run that keeps both cores busy to the end.
//!
//! Each module is a suite; `support` is the harness they share. A new suite
//! is a file `tests/NAME.rs` and a `mod NAME;` line here (cargo does not pick
//! up `tests/*.rs` on its own: `autotests = false`); `use crate::support::*;`
//! gives it the harness. `harness_selftest::every_suite_is_compiled` fails
//! while a file in `tests/` has no `mod` line.
//!
//! One suite: `cargo test --test integration cgi::`.

mod support;

mod apache_e2e;
mod bench_script;
mod browser;
mod cgi;
mod docs;
mod exactly_once;
mod fastcgi;
mod fastcgi_fuzz;
mod graceful_stop;
mod harness_selftest;
mod load;
mod nginx;
mod peers;
mod store;
mod systemd;

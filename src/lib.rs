//! `tourney-register` finishes a player's osu! OAuth sign-up: it takes the
//! redirect to `/register?code=…&state=…`, hands the code to the
//! tournament's Discord bot, and shows the player the bot's answer.
//!
//! The request pipeline ([`relay`]) is plain functions over plain types
//! ([`http`], [`outcome`]); the transports ([`cgi`], [`fastcgi`] with
//! [`server`] and, for `--listen`, [`event`]) are thin adapters around it. System calls live in [`sys`],
//! the only module allowed `unsafe`.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bot;
pub mod cgi;
pub mod config;
pub mod event;
pub mod fastcgi;
pub mod fingerprint;
pub mod http;
pub mod limits;
pub mod net;
pub mod outcome;
pub mod page;
pub mod pickle;
pub mod redirect;
pub mod relay;
pub mod replay;
pub mod scan;
pub mod server;
pub mod sys;
pub mod systemd;

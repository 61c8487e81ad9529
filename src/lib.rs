//! `tourney-register` finishes a player's osu! OAuth sign-up: it takes the
//! redirect to `/register?code=…&state=…`, hands the code to the
//! tournament's Discord bot, and shows the player the bot's answer.
//!
//! The request pipeline ([`relay`]) is plain functions over plain types
//! ([`http`]); the transports ([`cgi`], [`fastcgi`] with [`server`]) are
//! thin adapters around it.

pub mod bot;
pub mod callback;
pub mod cgi;
pub mod config;
pub mod fastcgi;
pub mod http;
pub mod net;
pub mod page;
pub mod relay;
pub mod replay;
pub mod server;

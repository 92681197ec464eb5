//! The subcommands, one module each.

pub mod agent;
pub mod bundle;
pub mod demo;
pub mod entry;
pub mod server;
pub mod svid;
pub mod token;
pub mod trust_domain;

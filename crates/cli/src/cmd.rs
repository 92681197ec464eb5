//! The subcommands, one module each.

pub mod agent;
pub mod auth;
pub mod bundle;
pub mod cluster;
pub mod demo;
pub mod demo_cluster;
pub mod demo_net;
pub mod encryption;
pub mod endpoint;
pub mod entry;
pub mod monitor;
pub mod netd;
pub mod observe;
pub mod policy;
pub mod policy_repo;
pub mod server;
pub mod svid;
pub mod token;
pub mod trust_domain;

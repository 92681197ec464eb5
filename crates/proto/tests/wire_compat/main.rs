//! Wire compatibility of our `.proto` files with the upstream SPIFFE Workload API and SPIRE
//! Delegated Identity API, checked against the `spiffe` and `spire-api` crates' own generated code.
//!
//! spire-api exposes its message types, so those are encoded on one side and decoded on the other
//! (`messages`). spiffe keeps its generated types private, so its public client talks to a server
//! built on our generated code (`workload`); spire-api's generated client does the same
//! (`delegated`), which also proves the gRPC paths match.

#![allow(clippy::unwrap_used)]

mod delegated;
mod descriptor;
mod messages;
mod reflection;
mod support;
mod workload;

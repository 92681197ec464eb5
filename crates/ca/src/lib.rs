//! sigil's certificate authority: CA keys and certificates (self-signed or under an upstream CA),
//! X.509-SVID and JWT-SVID signing, SPIRE-style rotation, and the trust bundle it publishes.
//!
//! The crate is synchronous: state sits behind std locks that are never held across an `.await`
//! by callers, and every state change is written to a [`JournalStore`] before it becomes visible.
#![forbid(unsafe_code)]

mod authority;
mod ca;
mod config;
mod csr;
mod error;
mod journal;
mod keyfile;
mod profile;
mod upstream;

pub use ca::{AuthorityStatus, Ca, CaStatus, JwtSvid, RotationOutcome, X509Svid};
pub use config::{CaConfig, Clock, KeyType, SystemClock, UpstreamAuthority};
pub use csr::csr_spiffe_id;
pub use error::CaError;
pub use journal::{JournalStore, MemoryJournal};

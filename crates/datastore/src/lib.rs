//! sigil-server's SQL store (registration entries, attested agents, join tokens, bundles, CA journal),
//! SQLite by default, behind the [`DataStore`] trait so other databases can follow.
#![forbid(unsafe_code)]

mod error;
mod model;
mod sqlite;
mod store;

pub use error::DataStoreError;
pub use model::{
    AgentFilter, AttestedAgent, EntryFilter, JoinToken, SelectorMatch, StoredBundle, TokenOutcome,
};
/// The registry types the store keeps, re-exported for the server's convenience.
pub use sigil_registry::{Entry, MAX_SELECTOR_VALUE_LEN, Selector, SelectorError};
pub use sqlite::SqliteStore;
pub use store::DataStore;

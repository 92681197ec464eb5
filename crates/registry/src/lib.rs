//! sigil's registration vocabulary, shared by the server, its datastore, the agent and the attestors:
//! registration entries and the selectors that match workloads and nodes. Types only, no I/O.
#![forbid(unsafe_code)]

mod entry;
pub mod k8s;
mod selector;

pub use entry::Entry;
pub use selector::{MAX_SELECTOR_VALUE_LEN, Selector, SelectorError};

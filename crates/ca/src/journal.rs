//! Where the CA records its authorities between restarts: a pluggable byte store and the JSON document kept in it.

use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// Durable storage for the CA journal (a datastore row, a file, or memory in tests).
pub trait JournalStore: Send + Sync {
    /// The last saved journal, or `None` when nothing was ever saved.
    fn load(&self) -> Result<Option<Vec<u8>>, String>;
    /// Replaces the journal; must be durable when it returns `Ok`.
    fn save(&self, data: &[u8]) -> Result<(), String>;
}

/// A journal kept in memory, for tests and one-shot tools.
#[derive(Debug, Default)]
pub struct MemoryJournal {
    data: Mutex<Option<Vec<u8>>>,
}

impl MemoryJournal {
    /// An empty journal.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes last saved, if any.
    pub fn contents(&self) -> Option<Vec<u8>> {
        self.data
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl JournalStore for MemoryJournal {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.contents())
    }

    fn save(&self, data: &[u8]) -> Result<(), String> {
        *self.data.lock().unwrap_or_else(PoisonError::into_inner) = Some(data.to_vec());
        Ok(())
    }
}

/// Version of the journal document layout written by this code.
pub(crate) const JOURNAL_VERSION: u32 = 1;

/// The whole journal document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JournalDoc {
    pub version: u32,
    pub trust_domain: String,
    pub bundle_sequence: u64,
    pub authorities: Vec<JournalAuthority>,
}

/// Role of an authority in rotation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AuthorityState {
    Active,
    Prepared,
    Old,
}

/// One authority: its CA certificate, where its keys are, and how long its SVIDs live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JournalAuthority {
    pub state: AuthorityState,
    /// CA certificate, DER in standard base64.
    pub cert_der: String,
    /// Certificates above the CA (upstream CA, intermediates, root), DER in base64; empty when self-signed.
    #[serde(default)]
    pub upstream_chain_der: Vec<String>,
    pub key_file: String,
    pub jwt_key_id: String,
    pub jwt_key_file: String,
    /// Uncompressed EC point of the JWT key, base64, to detect a swapped key file.
    pub jwt_public_key: String,
    /// Unix seconds at or after which every SVID this authority signed has expired.
    #[serde(default)]
    pub latest_svid_expiry: Option<u64>,
}

//! The `DataStore` trait the server codes against; synchronous, so async callers use `spawn_blocking`.

use sigil_spiffe::{SpiffeId, TrustDomain};

use crate::{
    AgentFilter, AttestedAgent, DataStoreError, Entry, EntryFilter, JoinToken, StoredBundle,
    TokenOutcome,
};

/// Persistent storage for everything sigil-server must remember across restarts.
pub trait DataStore: Send + Sync {
    /// Creates all entries in one transaction, or none: assigns missing IDs, revision 0 and `created_at`;
    /// an entry equal to a stored one or an earlier one in the batch fails with `AlreadyExists`.
    fn create_entries(&self, entries: Vec<Entry>) -> Result<Vec<Entry>, DataStoreError>;

    /// The entry with this ID, if any.
    fn get_entry(&self, id: &str) -> Result<Option<Entry>, DataStoreError>;

    /// One page of the entries matching `filter` in a stable order, and the token of the next page
    /// (`None` on the last); `page_size` 0 returns all, an empty token means the first page.
    fn list_entries(
        &self,
        filter: &EntryFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<Entry>, Option<String>), DataStoreError>;

    /// How many entries match `filter`.
    fn count_entries(&self, filter: &EntryFilter) -> Result<u64, DataStoreError>;

    /// Replaces the entry with `entry.id` (keeping `created_at`), bumping its revision; with
    /// `expected_revision`, fails unless the stored revision is that one.
    fn update_entry(
        &self,
        entry: Entry,
        expected_revision: Option<i64>,
    ) -> Result<Entry, DataStoreError>;

    /// Deletes an entry and returns what it held.
    fn delete_entry(&self, id: &str) -> Result<Entry, DataStoreError>;

    /// Moves every entry's SPIFFE ID and parent ID from trust domain `from` to `to` (same paths) in one
    /// transaction, bumping revisions; returns how many entries changed.
    fn rewrite_trust_domain(
        &self,
        from: &TrustDomain,
        to: &TrustDomain,
    ) -> Result<u64, DataStoreError>;

    /// Creates or replaces an attested agent.
    fn upsert_agent(&self, agent: &AttestedAgent) -> Result<(), DataStoreError>;

    /// The attested agent with this ID, if any.
    fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>, DataStoreError>;

    /// The agents matching `filter`, ordered by SPIFFE ID.
    fn list_agents(&self, filter: &AgentFilter) -> Result<Vec<AttestedAgent>, DataStoreError>;

    /// Records an agent's new X.509-SVID.
    fn update_agent_svid(
        &self,
        id: &SpiffeId,
        serial: &str,
        expires_at: i64,
    ) -> Result<(), DataStoreError>;

    /// Records a renewed agent X.509-SVID as pending: the current serial stays valid until the agent
    /// presents the new one ([`DataStore::promote_agent_serial`]).
    fn record_agent_renewal(
        &self,
        id: &SpiffeId,
        new_serial: &str,
        expires_at: i64,
    ) -> Result<(), DataStoreError>;

    /// Makes `serial` the agent's current serial if it is the pending one; returns whether it was.
    fn promote_agent_serial(&self, id: &SpiffeId, serial: &str) -> Result<bool, DataStoreError>;

    /// Bans or unbans an agent.
    fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<(), DataStoreError>;

    /// Forgets an agent.
    fn delete_agent(&self, id: &SpiffeId) -> Result<(), DataStoreError>;

    /// Stores a new join token; an existing value fails with `JoinTokenExists`.
    fn create_join_token(&self, token: &JoinToken) -> Result<(), DataStoreError>;

    /// Atomically uses a join token; a used token is kept (until pruned) so reuse is told apart from an
    /// unknown token, and an expired one (`expires_at <= now`) is not consumed.
    fn consume_join_token(&self, token: &str, now: i64) -> Result<TokenOutcome, DataStoreError>;

    /// Deletes tokens (used or not) that expired before `expired_before`; returns how many.
    fn prune_join_tokens(&self, expired_before: i64) -> Result<u64, DataStoreError>;

    /// Creates or replaces the bundle of `bundle.trust_domain`.
    fn set_bundle(&self, bundle: &StoredBundle) -> Result<(), DataStoreError>;

    /// The bundle of a trust domain, if any.
    fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>, DataStoreError>;

    /// All bundles, ordered by trust domain.
    fn list_bundles(&self) -> Result<Vec<StoredBundle>, DataStoreError>;

    /// Deletes the bundle of a trust domain.
    fn delete_bundle(&self, td: &TrustDomain) -> Result<(), DataStoreError>;

    /// The CA journal (key and certificate history) of a trust domain, if saved.
    fn load_ca_journal(&self, td: &TrustDomain) -> Result<Option<Vec<u8>>, DataStoreError>;

    /// Saves (replaces) the CA journal of a trust domain.
    fn save_ca_journal(&self, td: &TrustDomain, data: &[u8]) -> Result<(), DataStoreError>;

    /// A server-wide setting, if set.
    fn get_meta(&self, key: &str) -> Result<Option<String>, DataStoreError>;

    /// Sets a server-wide setting.
    fn set_meta(&self, key: &str, value: &str) -> Result<(), DataStoreError>;
}

//! `SqliteStore`: the `DataStore` on one SQLite file in WAL mode, with one connection for writes and one
//! for reads so listing does not wait for a write transaction.

mod entries;
mod migrations;
mod records;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use sigil_spiffe::{SpiffeId, TrustDomain};

use crate::{
    AgentFilter, AttestedAgent, DataStore, DataStoreError, Entry, EntryFilter, JoinToken,
    StoredBundle, TokenOutcome,
};

/// How long a statement waits for another process's lock before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite implementation of [`DataStore`]; cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
}

impl SqliteStore {
    /// The schema version this build creates and understands.
    pub const SCHEMA_VERSION: i64 = migrations::MIGRATIONS.len() as i64;

    /// Opens (creating if needed) the database file at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, DataStoreError> {
        let open_err = |source| DataStoreError::Open {
            path: path.to_path_buf(),
            cause: source,
        };
        let mut writer = Connection::open(path).map_err(open_err)?;
        configure(&writer).map_err(open_err)?;
        let mode: String = writer
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Still crash-safe (rollback journal, synchronous=FULL); readers just wait for writers.
            tracing::warn!(path = %path.display(), %mode, "SQLite refused WAL mode; using its journal mode instead");
        }
        migrations::migrate(&mut writer, migrations::MIGRATIONS)?;

        let reader = Connection::open(path).map_err(open_err)?;
        configure(&reader).map_err(open_err)?;
        reader
            .pragma_update(None, "query_only", true)
            .map_err(open_err)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
        })
    }

    /// The database file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs SQLite's integrity and foreign-key checks; `Corrupt` lists what they found.
    pub fn check_integrity(&self) -> Result<(), DataStoreError> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let mut problems: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        if problems == ["ok"] {
            problems.clear();
        }
        let mut stmt = conn.prepare("PRAGMA foreign_key_check")?;
        let orphans = stmt.query_map([], |r| {
            Ok(format!(
                "row of {} refers to a missing {} row",
                r.get::<_, String>(0)?,
                r.get::<_, String>(2)?
            ))
        })?;
        for orphan in orphans {
            problems.push(orphan?);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DataStoreError::Corrupt {
                what: format!("database {}", self.path.display()),
                value: problems.join("; "),
            })
        }
    }

    fn write(&self) -> MutexGuard<'_, Connection> {
        lock(&self.writer)
    }

    fn read(&self) -> MutexGuard<'_, Connection> {
        lock(&self.reader)
    }
}

/// Per-connection settings; `synchronous=FULL` makes each commit durable across power loss, not just
/// process crashes.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA cache_size = -32768;",
    )
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while the lock was held dropped its transaction, which rolled back: the connection is sound.
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl DataStore for SqliteStore {
    fn create_entries(&self, entries: Vec<Entry>) -> Result<Vec<Entry>, DataStoreError> {
        entries::create(&mut self.write(), entries, unix_now())
    }

    fn get_entry(&self, id: &str) -> Result<Option<Entry>, DataStoreError> {
        entries::get(&mut self.read(), id)
    }

    fn list_entries(
        &self,
        filter: &EntryFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<(Vec<Entry>, Option<String>), DataStoreError> {
        entries::list(&mut self.read(), filter, page_size, page_token)
    }

    fn count_entries(&self, filter: &EntryFilter) -> Result<u64, DataStoreError> {
        entries::count(&self.read(), filter)
    }

    fn update_entry(
        &self,
        entry: Entry,
        expected_revision: Option<i64>,
    ) -> Result<Entry, DataStoreError> {
        entries::update(&mut self.write(), entry, expected_revision)
    }

    fn delete_entry(&self, id: &str) -> Result<Entry, DataStoreError> {
        entries::delete(&mut self.write(), id)
    }

    fn rewrite_trust_domain(
        &self,
        from: &TrustDomain,
        to: &TrustDomain,
    ) -> Result<u64, DataStoreError> {
        entries::rewrite_trust_domain(&mut self.write(), from, to)
    }

    fn upsert_agent(&self, agent: &AttestedAgent) -> Result<(), DataStoreError> {
        records::upsert_agent(&self.write(), agent)
    }

    fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>, DataStoreError> {
        records::get_agent(&self.read(), id)
    }

    fn list_agents(&self, filter: &AgentFilter) -> Result<Vec<AttestedAgent>, DataStoreError> {
        records::list_agents(&self.read(), filter)
    }

    fn update_agent_svid(
        &self,
        id: &SpiffeId,
        serial: &str,
        expires_at: i64,
    ) -> Result<(), DataStoreError> {
        records::update_agent_svid(&self.write(), id, serial, expires_at)
    }

    fn record_agent_renewal(
        &self,
        id: &SpiffeId,
        new_serial: &str,
        expires_at: i64,
    ) -> Result<(), DataStoreError> {
        records::record_agent_renewal(&self.write(), id, new_serial, expires_at)
    }

    fn promote_agent_serial(&self, id: &SpiffeId, serial: &str) -> Result<bool, DataStoreError> {
        records::promote_agent_serial(&self.write(), id, serial)
    }

    fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<(), DataStoreError> {
        records::set_agent_banned(&self.write(), id, banned)
    }

    fn delete_agent(&self, id: &SpiffeId) -> Result<(), DataStoreError> {
        records::delete_agent(&self.write(), id)
    }

    fn create_join_token(&self, token: &JoinToken) -> Result<(), DataStoreError> {
        records::create_join_token(&self.write(), token)
    }

    fn consume_join_token(&self, token: &str, now: i64) -> Result<TokenOutcome, DataStoreError> {
        records::consume_join_token(&mut self.write(), token, now)
    }

    fn prune_join_tokens(&self, expired_before: i64) -> Result<u64, DataStoreError> {
        records::prune_join_tokens(&self.write(), expired_before)
    }

    fn set_bundle(&self, bundle: &StoredBundle) -> Result<(), DataStoreError> {
        records::set_bundle(&self.write(), bundle)
    }

    fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>, DataStoreError> {
        records::get_bundle(&self.read(), td)
    }

    fn list_bundles(&self) -> Result<Vec<StoredBundle>, DataStoreError> {
        records::list_bundles(&self.read())
    }

    fn delete_bundle(&self, td: &TrustDomain) -> Result<(), DataStoreError> {
        records::delete_bundle(&self.write(), td)
    }

    fn load_ca_journal(&self, td: &TrustDomain) -> Result<Option<Vec<u8>>, DataStoreError> {
        records::load_ca_journal(&self.read(), td)
    }

    fn save_ca_journal(&self, td: &TrustDomain, data: &[u8]) -> Result<(), DataStoreError> {
        records::save_ca_journal(&self.write(), td, data)
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, DataStoreError> {
        records::get_meta(&self.read(), key)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), DataStoreError> {
        records::set_meta(&self.write(), key, value)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pragma(conn: &Connection, name: &str) -> i64 {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn connections_are_durable_and_the_reader_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("ds.sqlite")).unwrap();
        for conn in [store.write(), store.read()] {
            assert_eq!(pragma(&conn, "synchronous"), 2, "FULL");
            assert_eq!(pragma(&conn, "foreign_keys"), 1);
            assert_eq!(pragma(&conn, "busy_timeout"), 5000);
        }
        assert!(store.read().execute("DELETE FROM meta", []).is_err());
        assert!(store.write().execute("DELETE FROM meta", []).is_ok());
    }
}

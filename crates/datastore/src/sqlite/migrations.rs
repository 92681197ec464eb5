//! Schema migrations: an ordered list of SQL scripts; `PRAGMA user_version` counts those applied.

use rusqlite::{Connection, TransactionBehavior};

use crate::DataStoreError;

/// Migration `i` takes the schema from version `i` to `i + 1`. Never edit a released one: append.
pub(super) const MIGRATIONS: &[&str] = &[
    // Version 1. `entries.seq` is the stable listing order and the compact key selectors hang off;
    // `selectors_key` (the sorted selectors joined by '\n', which no selector can hold) lets the database
    // itself refuse two entries with the same SPIFFE ID, parent and selector set.
    r#"
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    selectors_key TEXT NOT NULL,
    x509_svid_ttl INTEGER NOT NULL,
    jwt_svid_ttl INTEGER NOT NULL,
    dns_names TEXT NOT NULL,
    admin INTEGER NOT NULL,
    downstream INTEGER NOT NULL,
    federates_with TEXT NOT NULL,
    hint TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX entries_identity ON entries (spiffe_id, parent_id, selectors_key);
CREATE INDEX entries_parent_id ON entries (parent_id);
CREATE INDEX entries_hint ON entries (hint);

CREATE TABLE entry_selectors (
    entry_seq INTEGER NOT NULL REFERENCES entries (seq) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (entry_seq, kind, value)
) STRICT, WITHOUT ROWID;
CREATE INDEX entry_selectors_kind_value ON entry_selectors (kind, value);

CREATE TABLE agents (
    spiffe_id TEXT PRIMARY KEY,
    attestation_type TEXT NOT NULL,
    serial TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    banned INTEGER NOT NULL,
    selectors TEXT NOT NULL,
    can_reattest INTEGER NOT NULL
) STRICT;

CREATE TABLE join_tokens (
    token TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
) STRICT;
CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at);

CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY,
    json TEXT NOT NULL,
    sequence INTEGER NOT NULL
) STRICT;

CREATE TABLE ca_journal (
    trust_domain TEXT PRIMARY KEY,
    data BLOB NOT NULL
) STRICT;

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
"#,
    // Version 2. The serial of a renewed agent SVID not yet presented (see `AttestedAgent::pending_serial`).
    "ALTER TABLE agents ADD COLUMN pending_serial TEXT;",
];

/// Brings the schema up to `migrations.len()`, one transaction per step; refuses a newer schema.
pub(super) fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), DataStoreError> {
    let supported = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    loop {
        // IMMEDIATE takes the write lock before reading the version, so two processes opening the same
        // file cannot both apply a step.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > supported {
            return Err(DataStoreError::SchemaTooNew { found, supported });
        }
        let Some(sql) = usize::try_from(found).ok().and_then(|v| migrations.get(v)) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        // The version lives in the database header, which commits (or not) with the step itself.
        tx.pragma_update(None, "user_version", found + 1)?;
        tx.commit()?;
        tracing::info!(
            from = found,
            to = found + 1,
            "applied datastore schema migration"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn applies_only_missing_steps_and_refuses_newer() {
        let mut conn = Connection::open_in_memory().unwrap();
        let v1 = "CREATE TABLE a (x INTEGER);";
        let v2 = "INSERT INTO a VALUES (7);";
        migrate(&mut conn, &[v1]).unwrap();
        assert_eq!(version(&conn), 1);
        // Re-running v1 would fail (table exists): reaching v2 proves v1 was skipped.
        migrate(&mut conn, &[v1, v2]).unwrap();
        migrate(&mut conn, &[v1, v2]).unwrap();
        assert_eq!(version(&conn), 2);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM a", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1, "v2 ran exactly once");
        let err = migrate(&mut conn, &[v1]).unwrap_err();
        assert!(
            matches!(
                err,
                DataStoreError::SchemaTooNew {
                    found: 2,
                    supported: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn failed_step_leaves_version_unchanged() {
        let mut conn = Connection::open_in_memory().unwrap();
        let bad = "CREATE TABLE b (x INTEGER); NOT SQL;";
        assert!(migrate(&mut conn, &[bad]).is_err());
        assert_eq!(version(&conn), 0);
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'b'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "the half-applied step was rolled back");
    }

    #[test]
    fn real_migrations_apply() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, MIGRATIONS).unwrap();
        assert_eq!(version(&conn), MIGRATIONS.len() as i64);
    }
}

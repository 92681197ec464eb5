//! Agents, join tokens, bundles, CA journals and meta settings: small tables, one row per record.

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};
use sigil_spiffe::{SpiffeId, TrustDomain};

use crate::{
    AgentFilter, AttestedAgent, DataStoreError, JoinToken, Selector, StoredBundle, TokenOutcome,
};

fn not_found(kind: &'static str, id: impl ToString) -> DataStoreError {
    DataStoreError::NotFound {
        kind,
        id: id.to_string(),
    }
}

fn require_changed(
    changed: usize,
    kind: &'static str,
    id: impl ToString,
) -> Result<(), DataStoreError> {
    if changed == 0 {
        Err(not_found(kind, id))
    } else {
        Ok(())
    }
}

pub(super) fn upsert_agent(conn: &Connection, agent: &AttestedAgent) -> Result<(), DataStoreError> {
    let mut selectors = agent.selectors.clone();
    selectors.sort();
    selectors.dedup();
    let selectors = serde_json::to_string(&selectors).map_err(|source| DataStoreError::Encode {
        what: "agent selectors",
        cause: source,
    })?;
    conn.prepare_cached(
        "INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, banned, selectors, can_reattest,
             pending_serial)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (spiffe_id) DO UPDATE SET attestation_type = excluded.attestation_type,
             serial = excluded.serial, expires_at = excluded.expires_at, banned = excluded.banned,
             selectors = excluded.selectors, can_reattest = excluded.can_reattest,
             pending_serial = excluded.pending_serial",
    )?
    .execute(params![
        agent.spiffe_id.as_str(),
        agent.attestation_type,
        agent.serial,
        agent.expires_at,
        agent.banned,
        selectors,
        agent.can_reattest,
        agent.pending_serial,
    ])?;
    Ok(())
}

const AGENT_COLUMNS: &str = "spiffe_id, attestation_type, serial, expires_at, banned, selectors, can_reattest, pending_serial";

fn read_agent(row: &Row<'_>) -> Result<AttestedAgent, DataStoreError> {
    let id: String = row.get(0)?;
    let spiffe_id = SpiffeId::parse(&id).map_err(|_| DataStoreError::Corrupt {
        what: "agents.spiffe_id".to_string(),
        value: id.clone(),
    })?;
    let selectors: String = row.get(5)?;
    let selectors =
        serde_json::from_str::<Vec<Selector>>(&selectors).map_err(|_| DataStoreError::Corrupt {
            what: format!("selectors of agent {id}"),
            value: selectors,
        })?;
    Ok(AttestedAgent {
        spiffe_id,
        attestation_type: row.get(1)?,
        serial: row.get(2)?,
        expires_at: row.get(3)?,
        banned: row.get(4)?,
        selectors,
        can_reattest: row.get(6)?,
        pending_serial: row.get(7)?,
    })
}

pub(super) fn get_agent(
    conn: &Connection,
    id: &SpiffeId,
) -> Result<Option<AttestedAgent>, DataStoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE spiffe_id = ?1"
    ))?;
    let mut rows = stmt.query([id.as_str()])?;
    rows.next()?.map(read_agent).transpose()
}

pub(super) fn list_agents(
    conn: &Connection,
    filter: &AgentFilter,
) -> Result<Vec<AttestedAgent>, DataStoreError> {
    let mut sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE 1 = 1");
    let mut params = Vec::new();
    if let Some(kind) = &filter.attestation_type {
        sql.push_str(" AND attestation_type = ?");
        params.push(Value::Text(kind.clone()));
    }
    if let Some(banned) = filter.banned {
        sql.push_str(" AND banned = ?");
        params.push(Value::Integer(banned.into()));
    }
    sql.push_str(" ORDER BY spiffe_id");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(params))?;
    let mut agents = Vec::new();
    while let Some(row) = rows.next()? {
        agents.push(read_agent(row)?);
    }
    Ok(agents)
}

pub(super) fn update_agent_svid(
    conn: &Connection,
    id: &SpiffeId,
    serial: &str,
    expires_at: i64,
) -> Result<(), DataStoreError> {
    let changed = conn
        .prepare_cached("UPDATE agents SET serial = ?2, expires_at = ?3 WHERE spiffe_id = ?1")?
        .execute(params![id.as_str(), serial, expires_at])?;
    require_changed(changed, "agent", id)
}

pub(super) fn record_agent_renewal(
    conn: &Connection,
    id: &SpiffeId,
    new_serial: &str,
    expires_at: i64,
) -> Result<(), DataStoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE agents SET pending_serial = ?2, expires_at = ?3 WHERE spiffe_id = ?1",
        )?
        .execute(params![id.as_str(), new_serial, expires_at])?;
    require_changed(changed, "agent", id)
}

pub(super) fn promote_agent_serial(
    conn: &Connection,
    id: &SpiffeId,
    serial: &str,
) -> Result<bool, DataStoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE agents SET serial = pending_serial, pending_serial = NULL
             WHERE spiffe_id = ?1 AND pending_serial = ?2",
        )?
        .execute(params![id.as_str(), serial])?;
    Ok(changed == 1)
}

pub(super) fn set_agent_banned(
    conn: &Connection,
    id: &SpiffeId,
    banned: bool,
) -> Result<(), DataStoreError> {
    let changed = conn
        .prepare_cached("UPDATE agents SET banned = ?2 WHERE spiffe_id = ?1")?
        .execute(params![id.as_str(), banned])?;
    require_changed(changed, "agent", id)
}

pub(super) fn delete_agent(conn: &Connection, id: &SpiffeId) -> Result<(), DataStoreError> {
    let changed = conn
        .prepare_cached("DELETE FROM agents WHERE spiffe_id = ?1")?
        .execute([id.as_str()])?;
    require_changed(changed, "agent", id)
}

pub(super) fn create_join_token(
    conn: &Connection,
    token: &JoinToken,
) -> Result<(), DataStoreError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO join_tokens (token, expires_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?
        .execute(params![token.token, token.expires_at])?;
    if inserted == 0 {
        return Err(DataStoreError::JoinTokenExists {
            token: token.token.clone(),
        });
    }
    Ok(())
}

pub(super) fn consume_join_token(
    conn: &mut Connection,
    token: &str,
    now: i64,
) -> Result<TokenOutcome, DataStoreError> {
    // IMMEDIATE: the check and the mark happen under the write lock, so two agents racing with the same
    // token cannot both see it unused.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let row: Option<(i64, Option<i64>)> = tx
        .prepare_cached("SELECT expires_at, used_at FROM join_tokens WHERE token = ?1")?
        .query_row([token], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let outcome = match row {
        None => TokenOutcome::Unknown,
        Some((_, Some(_))) => TokenOutcome::AlreadyUsed,
        Some((expires_at, None)) if expires_at <= now => TokenOutcome::Expired,
        Some((expires_at, None)) => {
            tx.prepare_cached("UPDATE join_tokens SET used_at = ?2 WHERE token = ?1")?
                .execute(params![token, now])?;
            TokenOutcome::Consumed(JoinToken {
                token: token.to_string(),
                expires_at,
            })
        }
    };
    tx.commit()?;
    Ok(outcome)
}

pub(super) fn prune_join_tokens(
    conn: &Connection,
    expired_before: i64,
) -> Result<u64, DataStoreError> {
    let deleted = conn
        .prepare_cached("DELETE FROM join_tokens WHERE expires_at < ?1")?
        .execute([expired_before])?;
    Ok(deleted as u64)
}

pub(super) fn set_bundle(conn: &Connection, bundle: &StoredBundle) -> Result<(), DataStoreError> {
    conn.prepare_cached(
        "INSERT INTO bundles (trust_domain, json, sequence) VALUES (?1, ?2, ?3)
         ON CONFLICT (trust_domain) DO UPDATE SET json = excluded.json, sequence = excluded.sequence",
    )?
    // SQLite integers are signed: store the u64's bits as they are, read back below the same way.
    .execute(params![bundle.trust_domain.as_str(), bundle.json, bundle.sequence as i64])?;
    Ok(())
}

fn read_bundle(row: &Row<'_>) -> Result<StoredBundle, DataStoreError> {
    let td: String = row.get(0)?;
    let trust_domain = TrustDomain::parse(&td).map_err(|_| DataStoreError::Corrupt {
        what: "bundles.trust_domain".to_string(),
        value: td,
    })?;
    Ok(StoredBundle {
        trust_domain,
        json: row.get(1)?,
        sequence: row.get::<_, i64>(2)? as u64,
    })
}

pub(super) fn get_bundle(
    conn: &Connection,
    td: &TrustDomain,
) -> Result<Option<StoredBundle>, DataStoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT trust_domain, json, sequence FROM bundles WHERE trust_domain = ?1",
    )?;
    let mut rows = stmt.query([td.as_str()])?;
    rows.next()?.map(read_bundle).transpose()
}

pub(super) fn list_bundles(conn: &Connection) -> Result<Vec<StoredBundle>, DataStoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT trust_domain, json, sequence FROM bundles ORDER BY trust_domain")?;
    let mut rows = stmt.query([])?;
    let mut bundles = Vec::new();
    while let Some(row) = rows.next()? {
        bundles.push(read_bundle(row)?);
    }
    Ok(bundles)
}

pub(super) fn delete_bundle(conn: &Connection, td: &TrustDomain) -> Result<(), DataStoreError> {
    let changed = conn
        .prepare_cached("DELETE FROM bundles WHERE trust_domain = ?1")?
        .execute([td.as_str()])?;
    require_changed(changed, "bundle", td)
}

pub(super) fn load_ca_journal(
    conn: &Connection,
    td: &TrustDomain,
) -> Result<Option<Vec<u8>>, DataStoreError> {
    Ok(conn
        .prepare_cached("SELECT data FROM ca_journal WHERE trust_domain = ?1")?
        .query_row([td.as_str()], |r| r.get(0))
        .optional()?)
}

pub(super) fn save_ca_journal(
    conn: &Connection,
    td: &TrustDomain,
    data: &[u8],
) -> Result<(), DataStoreError> {
    conn.prepare_cached(
        "INSERT INTO ca_journal (trust_domain, data) VALUES (?1, ?2)
         ON CONFLICT (trust_domain) DO UPDATE SET data = excluded.data",
    )?
    .execute(params![td.as_str(), data])?;
    Ok(())
}

pub(super) fn get_meta(conn: &Connection, key: &str) -> Result<Option<String>, DataStoreError> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?)
}

pub(super) fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<(), DataStoreError> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([key, value])?;
    Ok(())
}

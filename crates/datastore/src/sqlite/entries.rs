//! Registration entries: rows in `entries`, their selectors in `entry_selectors`, filters compiled to SQL,
//! and pages read with one query for entries plus one for their selectors.

use rusqlite::types::{ToSql, Value};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};
use sigil_spiffe::{SpiffeId, TrustDomain};

use crate::{DataStoreError, Entry, EntryFilter, Selector, SelectorMatch};

const ENTRY_COLUMNS: &str = "e.seq, e.id, e.spiffe_id, e.parent_id, e.x509_svid_ttl, e.jwt_svid_ttl, \
     e.dns_names, e.admin, e.downstream, e.federates_with, e.hint, e.expires_at, e.revision, e.created_at";

/// The canonical text of a sorted, deduplicated selector set; '\n' cannot occur inside a selector, so
/// two sets have the same key exactly when they are equal.
fn selectors_key(selectors: &[Selector]) -> String {
    let mut key = String::new();
    for (i, s) in selectors.iter().enumerate() {
        if i > 0 {
            key.push('\n');
        }
        key.push_str(&s.kind);
        key.push(':');
        key.push_str(&s.value);
    }
    key
}

fn normalized(selectors: &[Selector]) -> Vec<Selector> {
    let mut set = selectors.to_vec();
    set.sort();
    set.dedup();
    set
}

/// Sorts and dedups the selectors, then rejects what no workload could ever match.
fn normalize(entry: &mut Entry, index: usize) -> Result<(), DataStoreError> {
    entry.selectors.sort();
    entry.selectors.dedup();
    if entry.selectors.is_empty() {
        // Without selectors an entry would match every workload under its parent.
        return Err(DataStoreError::InvalidEntry {
            index,
            spiffe_id: entry.spiffe_id.clone(),
            reason: "an entry needs at least one selector",
        });
    }
    Ok(())
}

/// The column values of an entry that need encoding before binding.
struct Encoded<'a> {
    spiffe_id: &'a str,
    parent_id: &'a str,
    key: String,
    dns_names: String,
    federates_with: String,
}

impl<'a> Encoded<'a> {
    fn new(entry: &'a Entry) -> Result<Self, DataStoreError> {
        let encode = |what, r: serde_json::Result<String>| {
            r.map_err(|source| DataStoreError::Encode {
                what,
                cause: source,
            })
        };
        Ok(Encoded {
            spiffe_id: entry.spiffe_id.as_str(),
            parent_id: entry.parent_id.as_str(),
            key: selectors_key(&entry.selectors),
            dns_names: encode("entry dns_names", serde_json::to_string(&entry.dns_names))?,
            federates_with: encode(
                "entry federates_with",
                serde_json::to_string(&entry.federates_with),
            )?,
        })
    }

    /// Parameters `?1`..`?12`, shared by `INSERT_ENTRY` and `UPDATE_ENTRY`.
    fn params<'b>(&'b self, e: &'b Entry) -> Vec<&'b dyn ToSql> {
        vec![
            &self.spiffe_id,
            &self.parent_id,
            &self.key,
            &e.x509_svid_ttl,
            &e.jwt_svid_ttl,
            &self.dns_names,
            &e.admin,
            &e.downstream,
            &self.federates_with,
            &e.hint,
            &e.expires_at,
            &e.revision,
        ]
    }
}

const INSERT_ENTRY: &str =
    "INSERT INTO entries (spiffe_id, parent_id, selectors_key, x509_svid_ttl,
        jwt_svid_ttl, dns_names, admin, downstream, federates_with, hint, expires_at, revision, id,
        created_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

const UPDATE_ENTRY: &str = "UPDATE entries SET spiffe_id = ?1, parent_id = ?2, selectors_key = ?3,
        x509_svid_ttl = ?4, jwt_svid_ttl = ?5, dns_names = ?6, admin = ?7, downstream = ?8,
        federates_with = ?9, hint = ?10, expires_at = ?11, revision = ?12
    WHERE seq = ?13";

const INSERT_SELECTOR: &str =
    "INSERT INTO entry_selectors (entry_seq, kind, value) VALUES (?1, ?2, ?3)";

/// The ID of the entry with this SPIFFE ID, parent and selector set, if there is one.
fn find_equal(
    conn: &Connection,
    spiffe_id: &str,
    parent_id: &str,
    key: &str,
) -> Result<Option<String>, DataStoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT id FROM entries WHERE spiffe_id = ?1 AND parent_id = ?2 AND selectors_key = ?3",
        )?
        .query_row([spiffe_id, parent_id, key], |r| r.get(0))
        .optional()?)
}

fn insert_selectors(
    stmt: &mut rusqlite::Statement<'_>,
    seq: i64,
    selectors: &[Selector],
) -> Result<(), DataStoreError> {
    for s in selectors {
        stmt.execute(params![seq, s.kind, s.value])?;
    }
    Ok(())
}

fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _)
        if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// Explains a unique-constraint failure on inserting `entry`: which stored entry it clashes with.
fn explain_conflict(
    conn: &Connection,
    index: usize,
    entry: &Entry,
    enc: &Encoded<'_>,
    err: rusqlite::Error,
) -> DataStoreError {
    let existing = match find_equal(conn, enc.spiffe_id, enc.parent_id, &enc.key) {
        Ok(Some(id)) => Some(id),
        Ok(None) => match seq_of(conn, &entry.id) {
            Ok(Some(_)) => Some(entry.id.clone()),
            Ok(None) => None,
            Err(e) => return e,
        },
        Err(e) => return e,
    };
    match existing {
        Some(existing_id) => DataStoreError::AlreadyExists {
            index,
            spiffe_id: entry.spiffe_id.clone(),
            existing_id,
        },
        None => err.into(),
    }
}

pub(super) fn create(
    conn: &mut Connection,
    entries: Vec<Entry>,
    now: i64,
) -> Result<Vec<Entry>, DataStoreError> {
    // Any early return drops `tx`, which rolls the whole batch back.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut created = Vec::with_capacity(entries.len());
    {
        let mut insert_entry = tx.prepare_cached(INSERT_ENTRY)?;
        let mut insert_selector = tx.prepare_cached(INSERT_SELECTOR)?;
        for (index, mut entry) in entries.into_iter().enumerate() {
            normalize(&mut entry, index)?;
            if entry.id.is_empty() {
                entry.id = uuid::Uuid::new_v4().to_string();
            }
            entry.revision = 0;
            entry.created_at = now;
            let enc = Encoded::new(&entry)?;
            let mut params = enc.params(&entry);
            params.push(&entry.id);
            params.push(&entry.created_at);
            // The unique indexes on id and (spiffe_id, parent_id, selectors_key) detect duplicates, among
            // stored entries and earlier ones of this batch alike; only a failure needs a look-up.
            let seq = match insert_entry.insert(&params[..]) {
                Ok(seq) => seq,
                Err(e) if is_unique_violation(&e) => {
                    return Err(explain_conflict(&tx, index, &entry, &enc, e));
                }
                Err(e) => return Err(e.into()),
            };
            insert_selectors(&mut insert_selector, seq, &entry.selectors)?;
            drop(params);
            created.push(entry);
        }
    }
    tx.commit()?;
    Ok(created)
}

fn seq_of(conn: &Connection, id: &str) -> Result<Option<i64>, DataStoreError> {
    Ok(conn
        .prepare_cached("SELECT seq FROM entries WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?)
}

fn parse_id(text: String, what: impl FnOnce() -> String) -> Result<SpiffeId, DataStoreError> {
    SpiffeId::parse(&text).map_err(|_| DataStoreError::Corrupt {
        what: what(),
        value: text,
    })
}

fn parse_json<T: serde::de::DeserializeOwned + Default>(
    text: String,
    what: impl FnOnce() -> String,
) -> Result<T, DataStoreError> {
    if text == "[]" {
        return Ok(T::default());
    }
    serde_json::from_str(&text).map_err(|_| DataStoreError::Corrupt {
        what: what(),
        value: text,
    })
}

/// Decodes a row selected with `ENTRY_COLUMNS`; selectors are attached separately.
fn read_entry(row: &Row<'_>) -> Result<(i64, Entry), DataStoreError> {
    let id: String = row.get(1)?;
    let spiffe_id = parse_id(row.get(2)?, || format!("spiffe_id of entry {id:?}"))?;
    let parent_id = parse_id(row.get(3)?, || format!("parent_id of entry {id:?}"))?;
    let dns_names = parse_json(row.get(6)?, || format!("dns_names of entry {id:?}"))?;
    let federates_with = parse_json(row.get(9)?, || format!("federates_with of entry {id:?}"))?;
    let entry = Entry {
        spiffe_id,
        parent_id,
        selectors: Vec::new(),
        x509_svid_ttl: row.get(4)?,
        jwt_svid_ttl: row.get(5)?,
        dns_names,
        admin: row.get(7)?,
        downstream: row.get(8)?,
        federates_with,
        hint: row.get(10)?,
        expires_at: row.get(11)?,
        revision: row.get(12)?,
        created_at: row.get(13)?,
        id,
    };
    Ok((row.get(0)?, entry))
}

fn read_selector(kind: String, value: String, entry: &Entry) -> Result<Selector, DataStoreError> {
    Selector::new(kind, value).map_err(|e| DataStoreError::Corrupt {
        what: format!("selector of entry {:?}", entry.id),
        value: e.to_string(),
    })
}

/// One entry by ID, with its selectors.
fn fetch(conn: &Connection, id: &str) -> Result<Option<(i64, Entry)>, DataStoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.id = ?1"
    ))?;
    let mut rows = stmt.query([id])?;
    let Some((seq, mut entry)) = rows.next()?.map(read_entry).transpose()? else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT kind, value FROM entry_selectors WHERE entry_seq = ?1 ORDER BY kind, value",
    )?;
    let mut rows = stmt.query([seq])?;
    while let Some(row) = rows.next()? {
        let selector = read_selector(row.get(0)?, row.get(1)?, &entry)?;
        entry.selectors.push(selector);
    }
    Ok(Some((seq, entry)))
}

pub(super) fn get(conn: &mut Connection, id: &str) -> Result<Option<Entry>, DataStoreError> {
    // One read transaction, so the entry and its selectors come from the same snapshot.
    let tx = conn.transaction()?;
    Ok(fetch(&tx, id)?.map(|(_, e)| e))
}

/// `(kind = ? AND value = ?) OR ...` over `set`, with `col` prefixing the column names.
fn any_of(set: &[Selector], col: &str, params: &mut Vec<Value>) -> String {
    let mut sql = String::new();
    for (i, s) in set.iter().enumerate() {
        if i > 0 {
            sql.push_str(" OR ");
        }
        sql.push_str(&format!("({col}kind = ? AND {col}value = ?)"));
        params.push(Value::Text(s.kind.clone()));
        params.push(Value::Text(s.value.clone()));
    }
    sql
}

/// The filter as ` AND ...` conditions on `entries e`, and their parameters in order.
fn filter_sql(filter: &EntryFilter) -> (String, Vec<Value>) {
    let mut sql = String::new();
    let mut params = Vec::new();
    if let Some(id) = &filter.spiffe_id {
        sql.push_str(" AND e.spiffe_id = ?");
        params.push(Value::Text(id.to_string()));
    }
    if let Some(id) = &filter.parent_id {
        sql.push_str(" AND e.parent_id = ?");
        params.push(Value::Text(id.to_string()));
    }
    if let Some(hint) = &filter.hint {
        sql.push_str(" AND e.hint = ?");
        params.push(Value::Text(hint.clone()));
    }
    let Some((selectors, mode)) = &filter.selectors else {
        return (sql, params);
    };
    let set = normalized(selectors);
    match (mode, set.is_empty()) {
        (SelectorMatch::Exact, _) => {
            sql.push_str(" AND e.selectors_key = ?");
            params.push(Value::Text(selectors_key(&set)));
        }
        // Nothing can share a selector with the empty set.
        (SelectorMatch::Any, true) => sql.push_str(" AND 0"),
        (SelectorMatch::Any, false) => {
            let any = any_of(&set, "", &mut params);
            sql.push_str(&format!(
                " AND e.seq IN (SELECT entry_seq FROM entry_selectors WHERE {any})"
            ));
        }
        // Every set contains the empty set.
        (SelectorMatch::Superset, true) => {}
        (SelectorMatch::Superset, false) => {
            // (entry_seq, kind, value) is the primary key, so the count is of distinct matches.
            let any = any_of(&set, "", &mut params);
            sql.push_str(&format!(
                " AND e.seq IN (SELECT entry_seq FROM entry_selectors WHERE {any} \
                 GROUP BY entry_seq HAVING COUNT(*) = {})",
                set.len()
            ));
        }
        (SelectorMatch::Subset, true) => sql.push_str(
            " AND NOT EXISTS (SELECT 1 FROM entry_selectors s WHERE s.entry_seq = e.seq)",
        ),
        (SelectorMatch::Subset, false) => {
            // Candidates share a selector with the filter (found through the (kind, value) index; stored
            // entries are never empty); then none of theirs may fall outside it.
            let any = any_of(&set, "", &mut params);
            let any_s = any_of(&set, "s.", &mut params);
            sql.push_str(&format!(
                " AND e.seq IN (SELECT entry_seq FROM entry_selectors WHERE {any}) \
                 AND NOT EXISTS (SELECT 1 FROM entry_selectors s WHERE s.entry_seq = e.seq AND NOT ({any_s}))"
            ));
        }
    }
    (sql, params)
}

fn parse_token(token: Option<&str>) -> Result<i64, DataStoreError> {
    match token {
        None | Some("") => Ok(0),
        Some(t) => t
            .parse::<i64>()
            .ok()
            .filter(|seq| *seq >= 0)
            .ok_or_else(|| DataStoreError::BadPageToken {
                token: t.to_string(),
            }),
    }
}

pub(super) fn list(
    conn: &mut Connection,
    filter: &EntryFilter,
    page_size: usize,
    page_token: Option<&str>,
) -> Result<(Vec<Entry>, Option<String>), DataStoreError> {
    let after = parse_token(page_token)?;
    let (cond, cond_params) = filter_sql(filter);
    // One row more than the page tells whether another page follows; -1 is SQLite's "no limit".
    let limit = match page_size {
        0 => -1,
        n => i64::try_from(n).unwrap_or(i64::MAX - 1) + 1,
    };
    let mut params = Vec::with_capacity(cond_params.len() + 2);
    params.push(Value::Integer(after));
    params.extend(cond_params);
    params.push(Value::Integer(limit));
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.seq > ?{cond} ORDER BY e.seq LIMIT ?"
    );

    let tx = conn.transaction()?;
    let mut page = Vec::new();
    {
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(params))?;
        while let Some(row) = rows.next()? {
            page.push(read_entry(row)?);
        }
    }
    let mut next = None;
    if page_size > 0 && page.len() > page_size {
        page.truncate(page_size);
        next = page.last().map(|(seq, _)| seq.to_string());
    }
    attach_selectors(&tx, &mut page, cond.is_empty())?;
    Ok((page.into_iter().map(|(_, e)| e).collect(), next))
}

/// Fills in the selectors of `page` (sorted by seq) with one query, merged by seq.
fn attach_selectors(
    conn: &Connection,
    page: &mut [(i64, Entry)],
    unfiltered: bool,
) -> Result<(), DataStoreError> {
    let (Some(first), Some(last)) = (page.first().map(|p| p.0), page.last().map(|p| p.0)) else {
        return Ok(());
    };
    let len = i64::try_from(page.len()).unwrap_or(i64::MAX);
    // A range scan of the clustered primary key is cheapest when the page covers most of its range (always
    // when unfiltered); a sparse filtered page asks for its seqs alone.
    let dense = unfiltered || last - first < len.saturating_mul(2);
    let mut stmt;
    let mut rows = if dense {
        stmt = conn.prepare_cached(
            "SELECT entry_seq, kind, value FROM entry_selectors WHERE entry_seq BETWEEN ?1 AND ?2 \
             ORDER BY entry_seq, kind, value",
        )?;
        stmt.query([first, last])?
    } else {
        let seqs: Vec<i64> = page.iter().map(|p| p.0).collect();
        let seqs = serde_json::to_string(&seqs).map_err(|source| DataStoreError::Encode {
            what: "page entry list",
            cause: source,
        })?;
        stmt = conn.prepare_cached(
            "SELECT entry_seq, kind, value FROM entry_selectors \
             WHERE entry_seq IN (SELECT value FROM json_each(?1)) ORDER BY entry_seq, kind, value",
        )?;
        stmt.query([seqs])?
    };
    let mut i = 0;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        while i < page.len() && page[i].0 < seq {
            i += 1;
        }
        let Some((at, entry)) = page.get_mut(i) else {
            break;
        };
        if *at == seq {
            let selector = read_selector(row.get(1)?, row.get(2)?, entry)?;
            entry.selectors.push(selector);
        }
    }
    Ok(())
}

pub(super) fn count(conn: &Connection, filter: &EntryFilter) -> Result<u64, DataStoreError> {
    let (cond, params) = filter_sql(filter);
    let n: i64 = conn
        .prepare_cached(&format!("SELECT COUNT(*) FROM entries e WHERE 1 = 1{cond}"))?
        .query_row(params_from_iter(params), |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(super) fn update(
    conn: &mut Connection,
    mut entry: Entry,
    expected_revision: Option<i64>,
) -> Result<Entry, DataStoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stored: Option<(i64, i64, i64)> = tx
        .prepare_cached("SELECT seq, revision, created_at FROM entries WHERE id = ?1")?
        .query_row([&entry.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((seq, revision, created_at)) = stored else {
        return Err(DataStoreError::NotFound {
            kind: "entry",
            id: entry.id,
        });
    };
    if let Some(expected) = expected_revision.filter(|r| *r != revision) {
        return Err(DataStoreError::RevisionMismatch {
            id: entry.id,
            expected,
            actual: revision,
        });
    }
    normalize(&mut entry, 0)?;
    entry.revision = revision + 1;
    entry.created_at = created_at;
    let enc = Encoded::new(&entry)?;
    if let Some(existing_id) =
        find_equal(&tx, enc.spiffe_id, enc.parent_id, &enc.key)?.filter(|other| *other != entry.id)
    {
        return Err(DataStoreError::AlreadyExists {
            index: 0,
            spiffe_id: entry.spiffe_id.clone(),
            existing_id,
        });
    }
    let mut params = enc.params(&entry);
    params.push(&seq);
    tx.prepare_cached(UPDATE_ENTRY)?.execute(&params[..])?;
    tx.prepare_cached("DELETE FROM entry_selectors WHERE entry_seq = ?1")?
        .execute([seq])?;
    insert_selectors(
        &mut *tx.prepare_cached(INSERT_SELECTOR)?,
        seq,
        &entry.selectors,
    )?;
    drop(params);
    tx.commit()?;
    Ok(entry)
}

pub(super) fn delete(conn: &mut Connection, id: &str) -> Result<Entry, DataStoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some((seq, entry)) = fetch(&tx, id)? else {
        return Err(DataStoreError::NotFound {
            kind: "entry",
            id: id.to_string(),
        });
    };
    // entry_selectors rows go with it (ON DELETE CASCADE).
    tx.prepare_cached("DELETE FROM entries WHERE seq = ?1")?
        .execute([seq])?;
    tx.commit()?;
    Ok(entry)
}

pub(super) fn rewrite_trust_domain(
    conn: &mut Connection,
    from: &TrustDomain,
    to: &TrustDomain,
) -> Result<u64, DataStoreError> {
    if from == to {
        return Ok(0);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let td_id = from.id().to_string();
    // Trust domain names cannot hold GLOB's special characters (* ? [ ]), so the pattern is literal.
    let under_td = format!("{td_id}/*");
    let mut candidates = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT seq, id, spiffe_id, parent_id, selectors_key FROM entries
             WHERE spiffe_id = ?1 OR spiffe_id GLOB ?2 OR parent_id = ?1 OR parent_id GLOB ?2
             ORDER BY seq",
        )?;
        let mut rows = stmt.query([&td_id, &under_td])?;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let id: String = row.get(1)?;
            let spiffe_id = parse_id(row.get(2)?, || format!("spiffe_id of entry {id:?}"))?;
            let parent_id = parse_id(row.get(3)?, || format!("parent_id of entry {id:?}"))?;
            let key: String = row.get(4)?;
            candidates.push((seq, id, spiffe_id, parent_id, key));
        }
    }
    let moved = |id: SpiffeId| {
        if id.trust_domain_name() == from.as_str() {
            id.with_trust_domain(to)
        } else {
            id
        }
    };
    let mut changed = 0u64;
    for (seq, id, spiffe_id, parent_id, key) in candidates {
        let (spiffe_id, parent_id) = (moved(spiffe_id), moved(parent_id));
        // The target's IDs are all outside `from`, so its holder (if any) is not moving away: a real clash.
        if let Some(existing_id) = find_equal(&tx, spiffe_id.as_str(), parent_id.as_str(), &key)?
            .filter(|other| *other != id)
        {
            return Err(DataStoreError::AlreadyExists {
                index: 0,
                spiffe_id,
                existing_id,
            });
        }
        tx.prepare_cached(
            "UPDATE entries SET spiffe_id = ?2, parent_id = ?3, revision = revision + 1 WHERE seq = ?1",
        )?
        .execute(params![seq, spiffe_id.as_str(), parent_id.as_str()])?;
        changed += 1;
    }
    tx.commit()?;
    tracing::info!(%from, %to, entries = changed, "moved registration entries to another trust domain");
    Ok(changed)
}

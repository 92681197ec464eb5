//! Agents, join tokens, bundles, CA journals and meta settings; reopening, migrations and bad databases.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use sigil_datastore::{
    AgentFilter, AttestedAgent, DataStore, DataStoreError, Entry, EntryFilter, JoinToken, Selector,
    SqliteStore, StoredBundle, TokenOutcome,
};
use sigil_spiffe::{SpiffeId, TrustDomain};

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("ds.sqlite")).unwrap();
    (dir, store)
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn agent(path: &str, attestation_type: &str) -> AttestedAgent {
    AttestedAgent {
        spiffe_id: id(&format!("spiffe://td/spire/agent/{path}")),
        attestation_type: attestation_type.to_string(),
        serial: "0a1b".to_string(),
        expires_at: 1_000,
        banned: false,
        selectors: vec![Selector::parse("aws:region:eu").unwrap()],
        can_reattest: true,
        pending_serial: None,
    }
}

fn user_version(path: &Path) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn agents_crud_and_filters() {
    let (_dir, store) = open();
    let mut a = agent("a", "join_token");
    a.selectors = ["z:1", "a:2", "z:1"]
        .iter()
        .map(|s| Selector::parse(s).unwrap())
        .collect();
    let b = agent("b", "x509pop");
    let c = agent("c", "join_token");
    for x in [&a, &b, &c] {
        store.upsert_agent(x).unwrap();
    }
    let a_stored = store.get_agent(&a.spiffe_id).unwrap().unwrap();
    assert_eq!(
        a_stored.selectors,
        [
            Selector::parse("a:2").unwrap(),
            Selector::parse("z:1").unwrap()
        ]
    );
    assert_eq!(store.get_agent(&b.spiffe_id).unwrap().unwrap(), b);
    assert_eq!(
        store
            .get_agent(&id("spiffe://td/spire/agent/none"))
            .unwrap(),
        None
    );

    // Upsert replaces every field.
    let mut b2 = b.clone();
    b2.serial = "ff".to_string();
    b2.expires_at = 2_000;
    b2.can_reattest = false;
    b2.selectors.clear();
    store.upsert_agent(&b2).unwrap();
    assert_eq!(store.get_agent(&b.spiffe_id).unwrap().unwrap(), b2);

    store
        .update_agent_svid(&c.spiffe_id, "c0ffee", 3_000)
        .unwrap();
    store.set_agent_banned(&c.spiffe_id, true).unwrap();
    let c_stored = store.get_agent(&c.spiffe_id).unwrap().unwrap();
    assert_eq!(
        (
            c_stored.serial.as_str(),
            c_stored.expires_at,
            c_stored.banned
        ),
        ("c0ffee", 3_000, true)
    );

    let list = |f: AgentFilter| -> Vec<String> {
        store
            .list_agents(&f)
            .unwrap()
            .into_iter()
            .map(|a| a.spiffe_id.path().to_string())
            .collect()
    };
    assert_eq!(
        list(AgentFilter::default()),
        ["/spire/agent/a", "/spire/agent/b", "/spire/agent/c"]
    );
    let join = || Some("join_token".to_string());
    assert_eq!(
        list(AgentFilter {
            attestation_type: join(),
            banned: None
        }),
        ["/spire/agent/a", "/spire/agent/c"]
    );
    assert_eq!(
        list(AgentFilter {
            attestation_type: None,
            banned: Some(true)
        }),
        ["/spire/agent/c"]
    );
    assert_eq!(
        list(AgentFilter {
            attestation_type: join(),
            banned: Some(false)
        }),
        ["/spire/agent/a"]
    );
    assert!(
        list(AgentFilter {
            attestation_type: Some("k8s".into()),
            banned: None
        })
        .is_empty()
    );

    store.delete_agent(&a.spiffe_id).unwrap();
    assert_eq!(store.get_agent(&a.spiffe_id).unwrap(), None);
    let ghost = a.spiffe_id.clone();
    let is_not_found = |r: Result<(), DataStoreError>| matches!(r, Err(DataStoreError::NotFound { kind: "agent", id }) if id == ghost.as_str());
    assert!(is_not_found(store.delete_agent(&ghost)));
    assert!(is_not_found(store.update_agent_svid(&ghost, "01", 1)));
    assert!(is_not_found(store.set_agent_banned(&ghost, true)));
}

#[test]
fn join_tokens_are_single_use() {
    let (_dir, store) = open();
    let token = |t: &str, expires_at| JoinToken {
        token: t.to_string(),
        expires_at,
    };
    store.create_join_token(&token("good", 100)).unwrap();
    store.create_join_token(&token("late", 50)).unwrap();
    let err = store.create_join_token(&token("good", 200)).unwrap_err();
    assert!(
        matches!(&err, DataStoreError::JoinTokenExists { token } if token == "good"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("good"),
        "the secret stays out of messages: {err}"
    );

    // In order: (token, now, outcome). Expired from `expires_at` on, and an expired token is
    // not used up.
    let uses = [
        ("good", 99, TokenOutcome::Consumed(token("good", 100))),
        ("good", 99, TokenOutcome::AlreadyUsed),
        ("nope", 0, TokenOutcome::Unknown),
        ("late", 50, TokenOutcome::Expired),
        ("late", 60, TokenOutcome::Expired),
        ("late", 49, TokenOutcome::Consumed(token("late", 50))),
    ];
    for (t, now, want) in uses {
        assert_eq!(
            store.consume_join_token(t, now).unwrap(),
            want,
            "{t} at {now}"
        );
    }

    store.create_join_token(&token("fresh", 500)).unwrap();
    // Strictly before: the token expiring at 100 survives a prune at 100.
    assert_eq!(store.prune_join_tokens(100).unwrap(), 1);
    assert_eq!(
        store.consume_join_token("late", 0).unwrap(),
        TokenOutcome::Unknown
    );
    assert_eq!(
        store.consume_join_token("good", 0).unwrap(),
        TokenOutcome::AlreadyUsed
    );
    assert_eq!(store.prune_join_tokens(101).unwrap(), 1);
    assert_eq!(
        store.consume_join_token("fresh", 0).unwrap(),
        TokenOutcome::Consumed(token("fresh", 500))
    );
}

#[test]
fn racing_consumers_get_one_token_once() {
    let (_dir, store) = open();
    let store = std::sync::Arc::new(store);
    store
        .create_join_token(&JoinToken {
            token: "t".into(),
            expires_at: 10,
        })
        .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || store.consume_join_token("t", 0).unwrap())
        })
        .collect();
    let outcomes: Vec<TokenOutcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let consumed = outcomes
        .iter()
        .filter(|o| matches!(o, TokenOutcome::Consumed(_)))
        .count();
    assert_eq!(consumed, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, TokenOutcome::Consumed(_) | TokenOutcome::AlreadyUsed))
    );
}

#[test]
fn bundles_crud() {
    let (_dir, store) = open();
    let bundle = |t: &str, json: &str, sequence| StoredBundle {
        trust_domain: td(t),
        json: json.to_string(),
        sequence,
    };
    store
        .set_bundle(&bundle("b.org", "{\"keys\":[]}", 1))
        .unwrap();
    store.set_bundle(&bundle("a.org", "{}", u64::MAX)).unwrap();
    assert_eq!(
        store.get_bundle(&td("a.org")).unwrap().unwrap(),
        bundle("a.org", "{}", u64::MAX),
        "full u64 range"
    );
    store
        .set_bundle(&bundle("b.org", "{\"keys\":[1]}", 2))
        .unwrap();
    assert_eq!(
        store.get_bundle(&td("b.org")).unwrap().unwrap(),
        bundle("b.org", "{\"keys\":[1]}", 2),
        "replaced"
    );
    assert_eq!(store.get_bundle(&td("c.org")).unwrap(), None);
    assert_eq!(
        store.list_bundles().unwrap(),
        [
            bundle("a.org", "{}", u64::MAX),
            bundle("b.org", "{\"keys\":[1]}", 2)
        ]
    );
    store.delete_bundle(&td("a.org")).unwrap();
    assert_eq!(store.list_bundles().unwrap().len(), 1);
    let err = store.delete_bundle(&td("a.org")).unwrap_err();
    assert!(
        matches!(&err, DataStoreError::NotFound { kind: "bundle", id } if id == "a.org"),
        "{err}"
    );
}

#[test]
fn ca_journal_and_meta() {
    let (_dir, store) = open();
    let (a, b) = (td("a.org"), td("b.org"));
    assert_eq!(store.load_ca_journal(&a).unwrap(), None);
    store.save_ca_journal(&a, &[0, 1, 0, 255]).unwrap();
    store.save_ca_journal(&b, b"other").unwrap();
    assert_eq!(store.load_ca_journal(&a).unwrap().unwrap(), [0, 1, 0, 255]);
    store.save_ca_journal(&a, b"").unwrap();
    assert_eq!(store.load_ca_journal(&a).unwrap().unwrap(), b"");
    assert_eq!(store.load_ca_journal(&b).unwrap().unwrap(), b"other");

    assert_eq!(store.get_meta("k").unwrap(), None);
    store.set_meta("k", "v1").unwrap();
    store.set_meta("k", "v2").unwrap();
    store.set_meta("other", "").unwrap();
    assert_eq!(store.get_meta("k").unwrap().as_deref(), Some("v2"));
    assert_eq!(store.get_meta("other").unwrap().as_deref(), Some(""));
}

#[test]
fn data_survives_reopen_and_migrations_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds.sqlite");
    let entry = {
        let store = SqliteStore::open(&path).unwrap();
        let e = Entry::new(
            id("spiffe://td/w"),
            id("spiffe://td/p"),
            vec![Selector::parse("unix:uid:1").unwrap()],
        );
        let created = store.create_entries(vec![e]).unwrap().remove(0);
        store.upsert_agent(&agent("a", "join_token")).unwrap();
        store
            .create_join_token(&JoinToken {
                token: "t".into(),
                expires_at: 9,
            })
            .unwrap();
        store
            .set_bundle(&StoredBundle {
                trust_domain: td("td"),
                json: "{}".into(),
                sequence: 3,
            })
            .unwrap();
        store.save_ca_journal(&td("td"), b"journal").unwrap();
        store.set_meta("k", "v").unwrap();
        created
    };
    assert_eq!(user_version(&path), SqliteStore::SCHEMA_VERSION);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(conn);
    for _ in 0..3 {
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(user_version(&path), SqliteStore::SCHEMA_VERSION);
        assert_eq!(store.get_entry(&entry.id).unwrap().unwrap(), entry);
        assert_eq!(store.count_entries(&EntryFilter::default()).unwrap(), 1);
        assert_eq!(
            store.get_agent(&agent("a", "").spiffe_id).unwrap().unwrap(),
            agent("a", "join_token")
        );
        assert_eq!(store.get_bundle(&td("td")).unwrap().unwrap().sequence, 3);
        assert_eq!(
            store.load_ca_journal(&td("td")).unwrap().unwrap(),
            b"journal"
        );
        assert_eq!(store.get_meta("k").unwrap().as_deref(), Some("v"));
        store.check_integrity().unwrap();
    }
    // The token was kept unused across reopens; consuming it on the last store shows it.
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.consume_join_token("t", 0).unwrap(),
        TokenOutcome::Consumed(JoinToken {
            token: "t".into(),
            expires_at: 9
        })
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds.sqlite");
    drop(SqliteStore::open(&path).unwrap());
    let newer = SqliteStore::SCHEMA_VERSION + 5;
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();
    let Err(err) = SqliteStore::open(&path) else {
        panic!("opened a database with schema version {newer}");
    };
    assert!(
        matches!(err, DataStoreError::SchemaTooNew { found, supported } if found == newer && supported == SqliteStore::SCHEMA_VERSION),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&newer.to_string()) && msg.contains(&SqliteStore::SCHEMA_VERSION.to_string()),
        "{msg}"
    );
    assert_eq!(user_version(&path), newer, "left untouched");
}

#[test]
fn unopenable_paths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("ds.sqlite");
    let Err(err) = SqliteStore::open(&path) else {
        panic!("opened {}", path.display());
    };
    assert!(
        matches!(&err, DataStoreError::Open { path: p, .. } if *p == path),
        "{err}"
    );
    assert!(err.to_string().contains("missing-dir"), "{err}");

    let garbage = dir.path().join("garbage.sqlite");
    std::fs::write(&garbage, vec![b'x'; 8192]).unwrap();
    assert!(SqliteStore::open(&garbage).is_err(), "not a database");
}

#[test]
fn stored_values_that_no_longer_parse_are_reported_as_corrupt() {
    let (dir, store) = open();
    let e = Entry::new(
        id("spiffe://td/w"),
        id("spiffe://td/p"),
        vec![Selector::parse("unix:uid:1").unwrap()],
    );
    let created = store.create_entries(vec![e]).unwrap().remove(0);
    store.upsert_agent(&agent("a", "join_token")).unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("ds.sqlite")).unwrap();
    conn.execute("UPDATE entries SET parent_id = 'http://nope'", [])
        .unwrap();
    conn.execute("UPDATE agents SET selectors = '[\"NoColon\"]'", [])
        .unwrap();

    let err = store.get_entry(&created.id).unwrap_err();
    assert!(
        matches!(&err, DataStoreError::Corrupt { what, value } if what.contains("parent_id") && what.contains(&created.id) && value == "http://nope"),
        "{err}"
    );
    assert!(
        store
            .list_entries(&EntryFilter::default(), 0, None)
            .is_err()
    );
    let err = store.list_agents(&AgentFilter::default()).unwrap_err();
    assert!(
        matches!(&err, DataStoreError::Corrupt { value, .. } if value.contains("NoColon")),
        "{err}"
    );

    conn.execute("UPDATE entries SET parent_id = 'spiffe://td/p'", [])
        .unwrap();
    conn.execute("UPDATE entry_selectors SET kind = 'Bad'", [])
        .unwrap();
    let err = store.get_entry(&created.id).unwrap_err();
    assert!(
        matches!(&err, DataStoreError::Corrupt { what, .. } if what.contains("selector")),
        "{err}"
    );
}

//! Crash safety: a writer process killed with SIGKILL mid-stream leaves whole batches and a sound file.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sigil_datastore::{DataStore, Entry, EntryFilter, Selector, SqliteStore};
use sigil_spiffe::SpiffeId;

/// Set (to the database path) in the re-executed test binary, which then acts as the writer.
const WRITER_ENV: &str = "SIGIL_DATASTORE_CRASH_WRITER";
const BATCH: u64 = 100;

/// Writes batches until killed; bounded so a writer that outlives its test still stops.
fn writer(path: &Path) {
    let store = SqliteStore::open(path).unwrap();
    for batch in 0..10_000 {
        let entries = (0..BATCH)
            .map(|i| {
                Entry::new(
                    SpiffeId::parse(&format!("spiffe://td/crash/{batch}/{i}")).unwrap(),
                    SpiffeId::parse("spiffe://td/agent").unwrap(),
                    vec![
                        Selector::parse(&format!("unix:uid:{i}")).unwrap(),
                        Selector::parse("k8s:ns:crash").unwrap(),
                    ],
                )
            })
            .collect();
        store.create_entries(entries).unwrap();
    }
}

#[test]
fn killed_writer_leaves_whole_batches() {
    if let Some(path) = std::env::var_os(WRITER_ENV) {
        writer(Path::new(&path));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds.sqlite");
    // Create the schema first so the reader below never races the writer's migration.
    let reader = SqliteStore::open(&path).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_writer_leaves_whole_batches",
            "--nocapture",
        ])
        .env(WRITER_ENV, &path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has committed several batches and is surely in the middle of more.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = 0;
    while seen < 3 * BATCH {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("writer exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "writer made no progress: {seen} entries"
        );
        seen = reader.count_entries(&EntryFilter::default()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on Unix: no destructors, no clean close.
    child.wait().unwrap();
    drop(reader);

    let store = SqliteStore::open(&path).unwrap();
    store.check_integrity().unwrap();
    let count = store.count_entries(&EntryFilter::default()).unwrap();
    assert!(
        count >= seen,
        "committed batches were lost: {count} < {seen}"
    );
    assert_eq!(
        count % BATCH,
        0,
        "a partial batch survived: {count} entries"
    );
    let (entries, _) = store
        .list_entries(&EntryFilter::default(), 0, None)
        .unwrap();
    assert_eq!(entries.len() as u64, count);
    assert!(
        entries.iter().all(|e| e.selectors.len() == 2),
        "every entry kept its selectors"
    );
    // The store still takes writes after the crash.
    let more = Entry::new(
        SpiffeId::parse("spiffe://td/after").unwrap(),
        SpiffeId::parse("spiffe://td/agent").unwrap(),
        vec![Selector::parse("unix:uid:1").unwrap()],
    );
    store.create_entries(vec![more]).unwrap();
}

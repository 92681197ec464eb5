//! kill -9 of the server while `entry create --data` batches are in flight: after a restart on the same
//! data directory the CA is the same, every acknowledged batch is there, and no batch is half-written.

#[path = "support/cli.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use sigil_test_util::{ServerProcess, sigil_bin};
use support::{TD, data_entry, entries, entry_count, field, ok, pem_certs};

/// Entries per batch.
const BATCH: usize = 50;
/// Concurrent writers, so that a batch is almost always on its way when the kill lands.
const WRITERS: usize = 2;
/// Crash and restart at least this many times...
const MIN_CYCLES: usize = 3;
/// ...and at most this many while no kill has yet cut a request off mid-way.
const MAX_CYCLES: usize = 8;
/// Upper bound on batches over the whole test, so the writers stop even if the kill never comes.
const MAX_BATCHES: usize = 2_000;
/// How long to wait for a writer's event before giving up.
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

fn parent() -> String {
    format!("spiffe://{TD}/sigil/agent/join_token/x")
}

fn spiffe_id(batch: usize, i: usize) -> String {
    format!("spiffe://{TD}/crash/b{batch}/e{i}")
}

/// The `--data` entries of batch number `batch`: distinct SPIFFE IDs, selector unix:uid:N.
fn batch_entries(batch: usize) -> Vec<Value> {
    (0..BATCH)
        .map(|i| {
            data_entry(
                &spiffe_id(batch, i),
                &parent(),
                &format!("uid:{}", batch * BATCH + i),
            )
        })
        .collect()
}

/// Batch and index of an entry from its SPIFFE ID.
fn position_of(spiffe_id: &str) -> Option<(usize, usize)> {
    let rest = spiffe_id.strip_prefix(&format!("spiffe://{TD}/crash/b"))?;
    let (batch, i) = rest.split_once("/e")?;
    Some((batch.parse().ok()?, i.parse().ok()?))
}

/// A batch the writers sent, and how its CLI run ended.
struct Outcome {
    batch: usize,
    ok: bool,
    /// The CLI had connected when the server died: the request was cut off, not refused at the door.
    in_flight: bool,
}

/// A writer's report that one batch's CLI exited.
struct Done {
    batch: usize,
    ok: bool,
    stderr: String,
}

/// Sends batches until told to stop; each batch is one `sigil entry create --data` process.
fn writer(
    socket: PathBuf,
    dir: PathBuf,
    next: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    events: mpsc::Sender<Done>,
) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let batch = next.fetch_add(1, Ordering::SeqCst);
        if batch >= MAX_BATCHES {
            break;
        }
        let path =
            support::write_data(&dir, &format!("batch-{batch}.json"), &batch_entries(batch))?;
        let out = Command::new(sigil_bin())
            .args(["entry", "create", "--output", "json", "--data"])
            .arg(&path)
            .arg("--admin-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .output()?;
        let ok = out.status.success();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        outcomes.push(Outcome {
            batch,
            ok,
            in_flight: !ok && !stderr.contains("cannot connect"),
        });
        let _ = events.send(Done { batch, ok, stderr });
    }
    Ok(outcomes)
}

/// Runs writers until more than `kill_after` batches succeeded, then kills the server with SIGKILL;
/// returns every batch the writers sent.
fn write_then_crash(
    server: &mut ServerProcess,
    dir: &Path,
    next: &Arc<AtomicUsize>,
    kill_after: usize,
) -> anyhow::Result<Vec<Outcome>> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (socket, dir, next, stop, tx) = (
                server.admin_socket.clone(),
                dir.to_path_buf(),
                next.clone(),
                stop.clone(),
                tx.clone(),
            );
            std::thread::spawn(move || writer(socket, dir, next, stop, tx))
        })
        .collect();
    drop(tx);

    // Until the kill every batch must succeed: the server is up and the input is valid. The kill comes
    // as one batch completes, when the other writer is somewhere in the middle of its own.
    let mut succeeded = 0;
    let waited = loop {
        match rx.recv_timeout(EVENT_TIMEOUT) {
            Err(e) => break Err(anyhow::anyhow!("no progress from the writers: {e}")),
            Ok(Done {
                batch,
                ok: false,
                stderr,
            }) => {
                break Err(anyhow::anyhow!(
                    "batch {batch} failed before the crash: {stderr}"
                ));
            }
            Ok(Done { .. }) => {
                succeeded += 1;
                if succeeded > kill_after {
                    break Ok(());
                }
            }
        }
    };
    stop.store(true, Ordering::SeqCst);
    server.kill9();
    let mut all = Vec::new();
    for h in handles {
        let outcomes = h
            .join()
            .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
        all.extend(outcomes);
    }
    waited?;
    Ok(all)
}

/// Every batch sent is there whole or not at all, every acknowledged batch is there, nothing else is.
fn check_batches(server: &ServerProcess, sent: &BTreeMap<usize, bool>) -> anyhow::Result<()> {
    let count = entry_count(server)?;
    assert_eq!(
        count % BATCH as i64,
        0,
        "{count} entries: a batch was half-written"
    );
    let list = entries(server, &[])?;
    assert_eq!(list.len() as i64, count);
    let mut per_batch: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for e in &list {
        let id = field(e, "spiffe_id")?;
        let (batch, i) = position_of(id).with_context(|| format!("unexpected entry {e}"))?;
        assert!(
            sent.contains_key(&batch),
            "entry {id} of a batch never sent"
        );
        assert_eq!(field(e, "parent_id")?, parent());
        assert_eq!(
            e["selectors"],
            serde_json::json!([{ "type": "unix", "value": format!("uid:{}", batch * BATCH + i) }]),
            "{e}"
        );
        per_batch.entry(batch).or_default().insert(i);
    }
    for (batch, acked) in sent {
        let have = per_batch.get(batch).map_or(0, BTreeSet::len);
        assert!(
            have == 0 || have == BATCH,
            "batch {batch} has {have} of {BATCH} entries after the crash"
        );
        if *acked {
            assert_eq!(have, BATCH, "batch {batch} was acknowledged but is missing");
        }
    }
    Ok(())
}

#[test]
fn kill9_during_batches_loses_no_acknowledged_batch_and_splits_none() -> anyhow::Result<()> {
    let mut server = ServerProcess::start(&[])?;
    let dir = tempfile::tempdir()?;
    let ca_before = pem_certs(&ok(&server, &["bundle", "show"])?)?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut sent = BTreeMap::new();
    let mut in_flight = 0;
    let mut cycles = 0;
    // A kill may land between requests; crash again (a bounded number of times) until one has cut a
    // batch off mid-request.
    while cycles < MIN_CYCLES || (in_flight == 0 && cycles < MAX_CYCLES) {
        let outcomes = write_then_crash(&mut server, dir.path(), &next, cycles % 3)?;
        cycles += 1;
        in_flight += outcomes.iter().filter(|o| o.in_flight).count();
        sent.extend(outcomes.iter().map(|o| (o.batch, o.ok)));
        server
            .spawn()
            .with_context(|| format!("restart after crash {cycles}"))?;
        let ca_after = pem_certs(&ok(&server, &["bundle", "show"])?)?;
        assert_eq!(ca_after, ca_before, "the CA changed across a crash");
        check_batches(&server, &sent)?;
    }
    let acked = sent.values().filter(|ok| **ok).count();
    assert!(
        acked >= cycles,
        "each cycle has at least one acknowledged batch"
    );
    eprintln!(
        "{cycles} crashes, {} batches sent, {acked} acknowledged, {in_flight} cut off mid-request",
        sent.len()
    );

    // The store still takes writes after the crashes.
    let batch = next.fetch_add(1, Ordering::SeqCst);
    let path = support::write_data(dir.path(), "after.json", &batch_entries(batch))?;
    ok(
        &server,
        &[
            "entry",
            "create",
            "--data",
            path.to_str().unwrap_or_default(),
        ],
    )?;
    sent.insert(batch, true);
    check_batches(&server, &sent)?;
    if server.terminate()? {
        Ok(())
    } else {
        bail!(
            "server did not exit cleanly on SIGTERM; log:\n{}",
            server.log_text()
        )
    }
}

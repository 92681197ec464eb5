use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use super::*;

fn flow(port: u32, verdict: fpb::Verdict) -> fpb::Flow {
    fpb::Flow {
        time: Some(prost_types::Timestamp {
            seconds: 1_796_469_743,
            nanos: 0,
        }),
        verdict: verdict as i32,
        node_name: "node-a".into(),
        l4: Some(fpb::Layer4 {
            protocol: Some(fpb::layer4::Protocol::Tcp(fpb::Tcp {
                source_port: 40000,
                destination_port: port,
                flags: None,
            })),
        }),
        ..Default::default()
    }
}

fn config(path: PathBuf) -> ExportConfig {
    ExportConfig {
        path,
        max_size_bytes: 10 * 1_048_576,
        max_backups: 5,
        allowlist: vec![],
        denylist: vec![],
        queue: 1024,
    }
}

/// Waits (bounded) until the writer accounted for `n` events.
fn settle(x: &Exporter, n: u64) {
    let start = Instant::now();
    loop {
        let c = x.counters();
        let done = c.exported.load(Ordering::Relaxed)
            + c.write_errors.load(Ordering::Relaxed)
            + c.dropped.load(Ordering::Relaxed);
        if done >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "writer stuck at {done}/{n}"
        );
        std::thread::yield_now();
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn flows_are_written_in_hubbles_exporter_shape_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.log");
    let (x, t) = Exporter::start(&config(path.clone()), "node-a").unwrap();
    x.flow(
        &flow(80, fpb::Verdict::Forwarded),
        flow(80, fpb::Verdict::Forwarded).time,
    );
    x.lost(
        fpb::LostEvent {
            source: fpb::LostEventSource::PerfEventRingBuffer as i32,
            num_events_lost: 3,
            cpu: None,
        },
        None,
    );
    drop(x);
    t.join().unwrap();
    let v = lines(&path);
    assert_eq!(v.len(), 2);
    assert_eq!(v[0]["node_name"], "node-a");
    assert_eq!(v[0]["time"], "2026-12-05T11:22:23Z");
    assert_eq!(v[0]["flow"]["verdict"], "FORWARDED");
    assert_eq!(v[0]["flow"]["l4"]["TCP"]["destination_port"], 80);
    assert_eq!(v[1]["lost_events"]["num_events_lost"], "3");
    assert_eq!(v[1]["node_name"], "node-a");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn the_file_rotates_by_size_keeping_max_backups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.log");
    let mut cfg = config(path.clone());
    cfg.max_size_bytes = 2_000;
    cfg.max_backups = 2;
    let (x, t) = Exporter::start(&cfg, "node-a").unwrap();
    for i in 0..100 {
        x.flow(&flow(1000 + i, fpb::Verdict::Forwarded), None);
    }
    settle(&x, 100);
    let c = Arc::clone(x.counters());
    drop(x);
    t.join().unwrap();
    assert_eq!(c.exported.load(Ordering::Relaxed), 100);
    assert!(c.rotations.load(Ordering::Relaxed) >= 3);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["flows.log", "flows.log.1", "flows.log.2"]);
    for n in &names {
        let p = dir.path().join(n);
        assert!(std::fs::metadata(&p).unwrap().len() <= 2_000, "{n} too big");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The newest flows are in the live file, older ones in .1, then .2, in order.
    let port = |v: &serde_json::Value| v["flow"]["l4"]["TCP"]["destination_port"].as_u64().unwrap();
    let live = lines(&path);
    let one = lines(&dir.path().join("flows.log.1"));
    assert_eq!(port(live.last().unwrap()), 1099);
    assert_eq!(port(one.last().unwrap()) + 1, port(&live[0]));
}

#[test]
fn allowlist_and_denylist_decide_what_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.log");
    let mut cfg = config(path.clone());
    cfg.allowlist = parse_filter_list(
        "allow",
        r#"{"verdict":["DROPPED"]} {"destination_port":["80"]}"#,
    )
    .unwrap();
    cfg.denylist = parse_filter_list("deny", r#"[{"destination_port":["9999"]}]"#).unwrap();
    let (x, t) = Exporter::start(&cfg, "node-a").unwrap();
    x.flow(&flow(80, fpb::Verdict::Forwarded), None); // allowed by port
    x.flow(&flow(81, fpb::Verdict::Forwarded), None); // neither
    x.flow(&flow(81, fpb::Verdict::Dropped), None); // allowed by verdict
    x.flow(&flow(9999, fpb::Verdict::Dropped), None); // denied
    let c = Arc::clone(x.counters());
    drop(x);
    t.join().unwrap();
    let ports: Vec<u64> = lines(&path)
        .iter()
        .map(|v| v["flow"]["l4"]["TCP"]["destination_port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, vec![80, 81]);
    assert_eq!(c.filtered_out.load(Ordering::Relaxed), 2);
}

#[test]
fn a_full_queue_drops_and_counts_every_event_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.log");
    let mut cfg = config(path.clone());
    cfg.queue = 1;
    let (x, t) = Exporter::start(&cfg, "node-a").unwrap();
    let n = 20_000u64;
    let f = flow(80, fpb::Verdict::Forwarded);
    for _ in 0..n {
        x.flow(&f, None);
    }
    settle(&x, n);
    let c = Arc::clone(x.counters());
    drop(x);
    t.join().unwrap();
    let exported = c.exported.load(Ordering::Relaxed);
    let dropped = c.dropped.load(Ordering::Relaxed);
    assert!(dropped > 0, "a queue of 1 cannot keep up with {n} events");
    assert_eq!(exported + dropped, n);
    assert_eq!(lines(&path).len() as u64, exported);
}

#[test]
fn hostile_paths_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let msg = |p: &Path| {
        Exporter::start(&config(p.to_path_buf()), "n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    // A symlink to a file elsewhere (e.g. /etc/shadow).
    let target = dir.path().join("target");
    std::fs::write(&target, "x").unwrap();
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = msg(&link);
    assert!(
        e.starts_with("hubble_export_file_path: invalid value") && e.contains("symlink"),
        "{e}"
    );
    // A directory others can write to (even sticky: they could plant the rotated names).
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let e = msg(&shared.join("f.log"));
    assert!(e.contains("writable by group or others"), "{e}");
    // A file with another hard link (it would write into the other name's file).
    let other = dir.path().join("other");
    std::fs::write(&other, "").unwrap();
    let hard = dir.path().join("hard.log");
    std::fs::hard_link(&other, &hard).unwrap();
    assert!(msg(&hard).contains("hard links"), "{}", msg(&hard));
    // A directory as the file, a relative path, a missing directory.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert!(msg(&sub).contains("not a regular file"), "{}", msg(&sub));
    assert!(msg(Path::new("flows.log")).contains("absolute"));
    assert!(msg(&dir.path().join("missing/f.log")).contains("its directory"));
    // Nothing was created or changed.
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");
    assert!(!shared.join("f.log").exists());
    // Control: a plain file in the private directory works, and a loose mode is tightened.
    let ok = dir.path().join("ok.log");
    std::fs::write(&ok, "").unwrap();
    std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (x, t) = Exporter::start(&config(ok.clone()), "n").unwrap();
    drop(x);
    t.join().unwrap();
    assert_eq!(
        std::fs::metadata(&ok).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn bad_filter_lists_name_the_flag_index_and_value() {
    for (text, want) in [
        ("{", "allow: invalid value \"{\": not JSON"),
        (
            "[1]",
            "allow[0]: invalid value 1: a FlowFilter is a JSON object",
        ),
        (
            r#"{"no_such":[1]}"#,
            "allow[0]: invalid value {\"no_such\":[1]}",
        ),
        (r#"{"verdict":["MAYBE"]}"#, "allow[0]: invalid value"),
    ] {
        let e = parse_filter_list("allow", text).expect_err(text);
        assert!(e.starts_with(want), "{e}");
    }
    assert_eq!(parse_filter_list("allow", "").unwrap(), vec![]);
}

//! Attestation of real peers over a Unix socket: this process, a child under another uid, a dead child, and
//! a fake procfs for the parsing and hashing rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/client.rs"]
mod client;

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use nix::unistd::{Gid, Group, Uid, User, getegid, geteuid, getgroups};
use sigil_attestor::{
    AttestError, AttestedUnixStream, PeerIdentity, Selector, UnixAttestor, WorkloadAttestor,
    accept_stream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

const NOBODY: u32 = 65534;

#[test]
#[ignore = "helper: run as a child process by the tests in this file"]
fn client_helper() {
    client::run_client_if_asked();
}

/// Test binaries are large (~64 MiB unoptimized) and could outgrow the default limit.
fn roomy() -> UnixAttestor {
    UnixAttestor::default().with_max_hash_bytes(1 << 30)
}

fn strings(selectors: &[Selector]) -> BTreeSet<String> {
    selectors.iter().map(ToString::to_string).collect()
}

/// The `unix:` selectors expected for these ids, groups and executable.
fn expected(uid: u32, gid: u32, groups: &[u32], exe: &Path, sha: Option<&str>) -> BTreeSet<String> {
    let mut want = BTreeSet::from([
        format!("unix:uid:{uid}"),
        format!("unix:gid:{gid}"),
        format!("unix:path:{}", exe.display()),
    ]);
    if let Some(u) = User::from_uid(Uid::from_raw(uid)).unwrap() {
        want.insert(format!("unix:user:{}", u.name));
    }
    if let Some(g) = Group::from_gid(Gid::from_raw(gid)).unwrap() {
        want.insert(format!("unix:group:{}", g.name));
    }
    for &sg in groups {
        want.insert(format!("unix:supplementary_gid:{sg}"));
        if let Some(g) = Group::from_gid(Gid::from_raw(sg)).unwrap() {
            want.insert(format!("unix:supplementary_group:{}", g.name));
        }
    }
    if let Some(sha) = sha {
        want.insert(format!("unix:sha256:{sha}"));
    }
    want
}

async fn accept(listener: &UnixListener) -> UnixStream {
    tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("no connection within 10 s")
        .unwrap()
        .0
}

#[tokio::test]
async fn attests_this_process_over_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let _client = UnixStream::connect(&path).await.unwrap();
    let server_side = accept(&listener).await;

    let peer = PeerIdentity::from_unix_stream(&server_side).unwrap();
    assert_eq!(peer.pid, std::process::id() as i32);
    assert_eq!(peer.uid, geteuid().as_raw());
    assert_eq!(peer.gid, getegid().as_raw());
    assert!(peer.is_alive());

    let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    let groups: Vec<u32> = getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
    let sha = client::sha256_file(&exe);
    let got = roomy().attest(&peer).unwrap();
    assert_eq!(
        strings(&got),
        expected(peer.uid, peer.gid, &groups, &exe, Some(&sha))
    );
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(got, sorted, "selectors come sorted");

    // An executable over the hashing limit loses only its sha256 selector.
    let small = UnixAttestor::default().with_max_hash_bytes(1024);
    let got = small.attest(&peer).unwrap();
    assert_eq!(
        strings(&got),
        expected(peer.uid, peer.gid, &groups, &exe, None)
    );
}

#[tokio::test]
async fn accept_stream_hands_tonic_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let mut incoming = Box::pin(accept_stream(UnixListener::bind(&path).unwrap()));
    let mut client = UnixStream::connect(&path).await.unwrap();
    let mut conn: AttestedUnixStream =
        tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();

    let info = conn.connect_info();
    let peer = info.0.as_ref().expect("peer identified");
    assert_eq!(peer.pid, std::process::id() as i32);
    assert_eq!(conn.peer_info().0.as_ref().unwrap().uid, geteuid().as_raw());

    // The wrapper is a transparent byte stream in both directions.
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    conn.write_all(b"pong").await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn attests_a_child_then_refuses_once_it_exited() {
    let as_nobody = client::have_root("running the client child as nobody");
    let (_bin_dir, bin) = client::linked_test_binary();
    let dir = client::socket_dir();
    let path = dir.path().join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    client::open_socket_to_all(&path);

    let ids = as_nobody.then_some((NOBODY, NOBODY));
    let mut child = client::spawn_client(&bin, &path, ids);
    let server_side = accept(&listener).await;
    let peer = PeerIdentity::from_unix_stream(&server_side).unwrap();
    assert_eq!(peer.pid, child.id() as i32);
    let (uid, gid) = ids.unwrap_or((geteuid().as_raw(), getegid().as_raw()));
    assert_eq!((peer.uid, peer.gid), (uid, gid));

    let got = roomy().attest(&peer).unwrap();
    // Rust's Command drops supplementary groups when root switches uid; otherwise the child inherits ours.
    let groups: Vec<u32> = if as_nobody {
        Vec::new()
    } else {
        getgroups().unwrap().iter().map(|g| g.as_raw()).collect()
    };
    assert_eq!(
        strings(&got),
        expected(uid, gid, &groups, &bin, Some(&client::sha256_file(&bin)))
    );

    child.kill().unwrap();
    client::wait_until_exited(&peer);
    assert!(!peer.is_alive());
    // A zombie, not yet reaped: its PID is still taken, but it is no longer the workload.
    let err = UnixAttestor::default().attest(&peer).unwrap_err();
    assert!(
        matches!(err, AttestError::ProcessExited { pid } if pid == peer.pid),
        "{err:?}"
    );
    child.wait().unwrap();
    // Reaped: the PID is free for reuse.
    let err = UnixAttestor::default().attest(&peer).unwrap_err();
    assert!(
        matches!(err, AttestError::ProcessExited { pid } if pid == peer.pid),
        "{err:?}"
    );
    assert!(err.to_string().contains(&peer.pid.to_string()), "{err}");
}

#[test]
fn fake_procfs_drives_groups_path_and_hash() {
    let me = PeerIdentity::from_pid(std::process::id() as i32).unwrap();
    let root = tempfile::tempdir().unwrap();
    let pid_dir = root.path().join(me.pid.to_string());
    std::fs::create_dir(&pid_dir).unwrap();
    std::fs::write(
        pid_dir.join("status"),
        "Name:\tx\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t4242 4242 4343 \n",
    )
    .unwrap();
    let exe = root.path().join("workload");
    std::fs::write(&exe, b"#!/bin/true\n").unwrap();
    symlink(&exe, pid_dir.join("exe")).unwrap();
    let attestor = UnixAttestor::default()
        .with_max_hash_bytes(12)
        .with_proc_root(root.path());

    // A snapshot taken through the real /proc cannot be compared with the fake procfs: refused, the exec
    // check is never skipped.
    let err = attestor.attest(&me).unwrap_err();
    assert!(
        matches!(&err, AttestError::ExeSnapshotElsewhere { snapshot, attestor, .. }
            if snapshot == Path::new("/proc") && attestor == root.path()),
        "{err:?}"
    );
    let me = me.with_exe_snapshot_through(root.path());
    let got = strings(&attestor.attest(&me).unwrap());
    let sha = client::sha256_file(&exe);
    assert_eq!(
        got,
        expected(me.uid, me.gid, &[4242, 4343], &exe, Some(&sha)),
        "duplicates in Groups: collapse"
    );

    // The limit is inclusive (12 bytes above were hashed); one byte over it: no sha256, everything else stays.
    std::fs::write(&exe, b"#!/bin/true \n").unwrap();
    let got = strings(&attestor.attest(&me).unwrap());
    assert_eq!(got, expected(me.uid, me.gid, &[4242, 4343], &exe, None));

    // A malformed status file is an error naming the pid, the file and the line.
    std::fs::write(
        pid_dir.join("status"),
        "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\tx\n",
    )
    .unwrap();
    let err = attestor.attest(&me).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            AttestError::ProcParse {
                field: "Groups",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        text.contains(&format!("{}/status", pid_dir.display())) && text.contains("Groups:\\tx"),
        "{text}"
    );

    // A missing /proc entry is an I/O error naming the path (the process itself is alive).
    let empty = tempfile::tempdir().unwrap();
    let err = UnixAttestor::default()
        .with_proc_root(empty.path())
        .attest(&me)
        .unwrap_err();
    assert!(
        matches!(&err, AttestError::Proc { op: "opening", path, .. } if path == &empty.path().join(me.pid.to_string())),
        "{err:?}"
    );
}

/// The stream re-check: the executable seen through the (fake) procfs changes to another file → refused;
/// unchanged → accepted.
#[test]
fn ensure_same_exe_sees_an_exec() {
    let root = tempfile::tempdir().unwrap();
    let me = PeerIdentity::from_pid(std::process::id() as i32).unwrap();
    let pid_dir = root.path().join(me.pid.to_string());
    std::fs::create_dir(&pid_dir).unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::write(&a, b"a").unwrap();
    std::fs::write(&b, b"b").unwrap();
    symlink(&a, pid_dir.join("exe")).unwrap();
    let me = me.with_exe_snapshot_through(root.path());
    me.ensure_same_exe().unwrap();
    std::fs::remove_file(pid_dir.join("exe")).unwrap();
    symlink(&b, pid_dir.join("exe")).unwrap();
    let err = me.ensure_same_exe().unwrap_err();
    assert!(
        matches!(err, AttestError::ExeChanged { pid } if pid == me.pid),
        "{err:?}"
    );
    // The real /proc: this test process has not exec'd.
    PeerIdentity::from_pid(std::process::id() as i32)
        .unwrap()
        .ensure_same_exe()
        .unwrap();
}

//! SPIRE issue 6035, reproduced: a workload connects and exits, another process gets its PID, and attestation
//! of the captured peer must fail rather than describe the newcomer. Kept in its own test binary because
//! steering the next PID (via `ns_last_pid`) is disturbed by other tests spawning processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/client.rs"]
mod client;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sigil_attestor::{AttestError, PeerIdentity, UnixAttestor, WorkloadAttestor};
use tokio::net::UnixListener;

const NS_LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";

#[test]
#[ignore = "helper: run as a child process by the tests in this file"]
fn client_helper() {
    client::run_client_if_asked();
}

/// Starts `sleep` as PID `pid` by setting the last allocated PID just below it; `None` if another process
/// took the PID first on every try.
fn spawn_with_pid(pid: i32) -> Option<Child> {
    for _ in 0..50 {
        std::fs::write(NS_LAST_PID, (pid - 1).to_string()).unwrap();
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        if child.id() as i32 == pid {
            return Some(child);
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    None
}

#[tokio::test]
async fn a_reused_pid_is_never_attested_as_the_workload() {
    if !client::have_root("steering PIDs through ns_last_pid") {
        return;
    }
    let dir = client::socket_dir();
    let path = dir.path().join("api.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut workload = client::spawn_client(&exe, &path, None);
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let peer = PeerIdentity::from_unix_stream(&stream).unwrap();
    let pid = peer.pid;
    assert_eq!(pid, workload.id() as i32);

    // The kernel property the attestor relies on: a /proc/<pid> directory fd keeps naming the process it was
    // opened for.
    let workload_dir = std::fs::File::open(format!("/proc/{pid}")).unwrap();
    assert_eq!(
        nix::fcntl::readlinkat(&workload_dir, "exe").unwrap(),
        exe.as_os_str()
    );

    workload.kill().unwrap();
    workload.wait().unwrap();
    let Some(mut impostor) = spawn_with_pid(pid) else {
        panic!("could not start a process with the freed pid {pid} in 50 tries");
    };
    // The reuse is real: a lookup by number now finds the impostor.
    let impostor_exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_ne!(impostor_exe, exe);
    assert!(impostor_exe.ends_with("sleep"), "{impostor_exe:?}");
    let stale = nix::fcntl::readlinkat(&workload_dir, "exe");
    assert!(
        stale.is_err(),
        "old /proc dir fd shows the impostor: {stale:?}"
    );

    let result = UnixAttestor::default().attest(&peer);
    impostor.kill().unwrap();
    impostor.wait().unwrap();
    match result {
        Err(AttestError::ProcessExited { pid: p }) => assert_eq!(p, pid),
        other => panic!("attested pid {pid} after reuse: {other:?}"),
    }

    // `from_pid` on the same number, by contrast, names the new process: the caller's number is its claim.
    let Some(mut again) = spawn_with_pid(pid) else {
        panic!("could not start a second process with pid {pid}");
    };
    let by_pid = PeerIdentity::from_pid(pid).unwrap();
    let selectors = UnixAttestor::default().attest(&by_pid).unwrap();
    again.kill().unwrap();
    again.wait().unwrap();
    let sleep_path = PathBuf::from(&impostor_exe);
    assert!(
        selectors
            .iter()
            .any(|s| s.value == format!("path:{}", sleep_path.display())),
        "{selectors:?}"
    );
}

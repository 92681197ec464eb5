//! Shared by the test binaries: a client process (the test binary itself, re-run under another name) that
//! connects to a socket and stays connected, so tests can attest a process other than their own.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sigil_attestor::PeerIdentity;

/// Set in a child's environment to the socket it should connect to.
pub const CLIENT_ENV: &str = "SIGIL_ATTESTOR_TEST_CLIENT";

/// The body of each test binary's ignored `client_helper` test: connect, then block until the parent goes.
pub fn run_client_if_asked() {
    let Some(path) = std::env::var_os(CLIENT_ENV) else {
        return;
    };
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut buf = [0u8; 1];
    let _ = std::io::Read::read(&mut s, &mut buf);
}

/// Whether the test may use root-only facilities; without root it skips with a message, except under CI.
pub fn have_root(what: &str) -> bool {
    sigil_test_util::can_run_as_root(what)
}

/// Hard-links the running test binary into a fresh world-readable directory beside it as `attest-client`,
/// so a child runs a distinct path with the same content.
pub fn linked_test_binary() -> (tempfile::TempDir, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.path().join("attest-client");
    std::fs::hard_link(&exe, &link).unwrap();
    (dir, link)
}

/// A world-accessible directory for a socket that a child running as `nobody` can connect to.
pub fn socket_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Opens the socket file to everyone (connecting needs write permission on it).
pub fn open_socket_to_all(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// Runs `exe`'s ignored `client_helper` test against `socket`, as `uid`/`gid` if given.
pub fn spawn_client(exe: &Path, socket: &Path, ids: Option<(u32, u32)>) -> Child {
    let mut cmd = Command::new(exe);
    cmd.args(["--ignored", "--exact", "client_helper", "--test-threads=1"])
        .env(CLIENT_ENV, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some((uid, gid)) = ids {
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, gid);
    }
    cmd.spawn().unwrap()
}

/// Blocks until the pidfd reports the process exited, or panics after 10 s.
pub fn wait_until_exited(peer: &PeerIdentity) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let fd = peer.pidfd().expect("peer has a pidfd");
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let n = poll(
        &mut fds,
        PollTimeout::try_from(Duration::from_secs(10)).unwrap(),
    )
    .unwrap();
    assert_eq!(n, 1, "pid {} did not exit within 10 s", peer.pid);
}

/// The expected digest comes from coreutils, an implementation independent of the one under test.
pub fn sha256_file(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sha256sum {}: {out:?}",
        path.display()
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

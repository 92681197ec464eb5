//! Socket and data directories cannot be hijacked through a parent (issue 8, item 5), against the
//! real `sigil` processes: another user pre-creates a directory on the way (as in `/tmp/sigil-agent/`),
//! a group/other-writable ancestor, a symlinked ancestor into another user's directory, a socket of
//! another user that the CLI is pointed at. Each attack has its control. Needs root (to act as
//! `nobody` with setpriv); skips otherwise, fails under CI=true.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sigil_test_util::{AgentProcess, ServerProcess, free_port, sigil_bin};

const NOBODY: u32 = 65534;

fn can_run() -> bool {
    sigil_test_util::can_run_as_root_and("the socket_dirs test", || {
        Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
            .then(|| "needs setpriv (util-linux)".to_owned())
    })
}

/// A command run as uid/gid 65534 (nobody) with no supplementary groups.
fn as_nobody(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
    ])
    .arg(program);
    c
}

/// A path directly under /tmp unique to this test process; removed on drop.
struct TmpPath(PathBuf);

impl TmpPath {
    fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!("/tmp/sigil-h8-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_file(&p);
        TmpPath(p)
    }
}

impl Drop for TmpPath {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// `nobody` creates the directory `dir` (mode 0755), as an unprivileged user can under /tmp.
fn plant_dir(dir: &Path) -> anyhow::Result<()> {
    let out = as_nobody(Path::new("/bin/mkdir")).arg(dir).output()?;
    anyhow::ensure!(out.status.success(), "mkdir as nobody: {out:?}");
    anyhow::ensure!(std::fs::metadata(dir)?.uid() == NOBODY);
    Ok(())
}

/// Runs `sigil server run` with the given data dir and admin socket; it must exit (refusing) quickly.
fn server_run_output(data_dir: &Path, admin_socket: &Path) -> anyhow::Result<Output> {
    let mut child = Command::new(sigil_bin())
        .args(["server", "run", "--data-dir"])
        .arg(data_dir)
        .arg("--admin-socket")
        .arg(admin_socket)
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "server did not refuse to start; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

fn assert_refused(out: &Output, names: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "start must be refused; stderr:\n{err}"
    );
    for n in names {
        assert!(err.contains(n), "stderr must name {n:?}:\n{err}");
    }
}

/// A server started with `admin_socket` and a data dir under `root` becomes healthy.
fn server_starts(root: &Path, admin_socket: &Path) -> anyhow::Result<()> {
    let mut child = Command::new(sigil_bin())
        .args(["server", "run", "--data-dir"])
        .arg(root.join("data"))
        .arg("--admin-socket")
        .arg(admin_socket)
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let r = wait_healthy(&mut child, admin_socket);
    let _ = child.kill();
    let out = child.wait_with_output()?;
    r.map_err(|e| anyhow::anyhow!("{e}; stderr:\n{}", String::from_utf8_lossy(&out.stderr)))
}

fn wait_healthy(child: &mut Child, admin_socket: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            anyhow::bail!("server exited with {s}");
        }
        let out = Command::new(sigil_bin())
            .args(["server", "healthcheck", "--admin-socket"])
            .arg(admin_socket)
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "not healthy after 30 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn directory_planted_by_another_user_on_the_way_is_refused() -> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    // The attack of the issue: an unprivileged user pre-creates the daemon's directory under /tmp
    // (here the parent of the socket directory), so the directory the root daemon creates inside it
    // could later be renamed away and replaced by a relay.
    let planted = TmpPath::new("planted");
    plant_dir(&planted.0)?;
    let owner = format!("uid {NOBODY}");
    let mine = tempfile::tempdir()?;

    // The server's admin socket below it.
    let out = server_run_output(
        &mine.path().join("data"),
        &planted.0.join("private").join("api.sock"),
    )?;
    assert_refused(
        &out,
        &["admin_socket", &planted.0.display().to_string(), &owner],
    );
    assert!(
        !planted.0.join("private").exists(),
        "nothing may be created inside the planted directory"
    );

    // The server's data directory (CA keys, datastore) below it.
    let out = server_run_output(&planted.0.join("data"), &mine.path().join("admin.sock"))?;
    assert_refused(
        &out,
        &["data_dir", &planted.0.display().to_string(), &owner],
    );
    assert!(!planted.0.join("data").exists());

    // The agent's public Workload API socket below it (the issue's /tmp/sigil-agent/ case).
    let server = ServerProcess::start(&[])?;
    let bundle = mine.path().join("bundle.pem");
    std::fs::write(&bundle, server.cli(&["bundle", "show"])?.stdout)?;
    let out = Command::new(sigil_bin())
        .args(["agent", "run", "--server-address", &server.addr()])
        .arg("--trust-bundle")
        .arg(&bundle)
        .args(["--join-token", "unused"])
        .arg("--data-dir")
        .arg(mine.path().join("agent-data"))
        .arg("--socket-path")
        .arg(planted.0.join("public").join("api.sock"))
        .arg("--admin-socket-path")
        .arg(mine.path().join("agent-private").join("admin.sock"))
        .stdin(Stdio::null())
        .output()?;
    assert_refused(
        &out,
        &["socket_path", &planted.0.display().to_string(), &owner],
    );

    // Control: the same layout in a chain owned by root (root's temp dir under the sticky /tmp) works,
    // creating the directories on the way 0755 and the socket's own 0700.
    let admin = mine.path().join("run/sigil/server/private/api.sock");
    server_starts(mine.path(), &admin)?;
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.mode() & 0o7777);
    assert_eq!(mode(&mine.path().join("run/sigil"))?, 0o755);
    assert_eq!(mode(&mine.path().join("run/sigil/server/private"))?, 0o700);
    Ok(())
}

#[test]
fn group_or_other_writable_ancestor_without_sticky_bit_is_refused() -> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    // Root-owned but world-writable without the sticky bit: any user may rename what is inside.
    let shared = TmpPath::new("shared");
    std::fs::create_dir(&shared.0)?;
    std::fs::set_permissions(&shared.0, std::fs::Permissions::from_mode(0o777))?;
    let mine = tempfile::tempdir()?;
    let admin = shared.0.join("server").join("private").join("api.sock");
    let out = server_run_output(&mine.path().join("data"), &admin)?;
    assert_refused(
        &out,
        &[
            &shared.0.display().to_string(),
            "without the sticky bit",
            "777",
        ],
    );
    // Group-writable only is refused too.
    std::fs::set_permissions(&shared.0, std::fs::Permissions::from_mode(0o775))?;
    let out = server_run_output(&mine.path().join("data"), &admin)?;
    assert_refused(&out, &[&shared.0.display().to_string(), "775"]);

    // Control: with the sticky bit (like /tmp itself) the root-owned directory is fine.
    std::fs::set_permissions(&shared.0, std::fs::Permissions::from_mode(0o1777))?;
    server_starts(mine.path(), &admin)
}

#[test]
fn symlinked_ancestor_into_another_users_directory_is_refused() -> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    let planted = TmpPath::new("linktarget");
    plant_dir(&planted.0)?;
    let mine = tempfile::tempdir()?;
    // Root's own link, but it leads into nobody's directory.
    let link = mine.path().join("run");
    std::os::unix::fs::symlink(&planted.0, &link)?;
    let out = server_run_output(
        &mine.path().join("data"),
        &link.join("private").join("api.sock"),
    )?;
    assert_refused(
        &out,
        &[&planted.0.display().to_string(), &format!("uid {NOBODY}")],
    );
    assert!(!planted.0.join("private").exists());

    // A link planted by nobody in the sticky /tmp, even one pointing at root's own directory.
    let theirs = TmpPath::new("theirlink");
    let out = as_nobody(Path::new("/bin/ln"))
        .arg("-s")
        .arg(mine.path())
        .arg(&theirs.0)
        .output()?;
    anyhow::ensure!(out.status.success(), "ln -s as nobody: {out:?}");
    let out = server_run_output(
        &mine.path().join("data"),
        &theirs.0.join("private").join("api.sock"),
    )?;
    assert_refused(
        &out,
        &[&theirs.0.display().to_string(), &format!("uid {NOBODY}")],
    );

    // Control: root's link to root's directory (like /var/run -> /run) is followed.
    let real = mine.path().join("real");
    std::fs::create_dir(&real)?;
    let ok_link = mine.path().join("var-run");
    std::os::unix::fs::symlink(&real, &ok_link)?;
    server_starts(mine.path(), &ok_link.join("private").join("api.sock"))
}

#[test]
fn cli_refuses_a_socket_of_another_user() -> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    // nobody runs a real sigil server of its own (another CA) in its own directory under /tmp.
    let theirs = TmpPath::new("relay");
    plant_dir(&theirs.0)?;
    let relay_socket = theirs.0.join("private").join("api.sock");
    let mut relay = as_nobody(&sigil_bin())
        .args(["server", "run", "--data-dir"])
        .arg(theirs.0.join("data"))
        .arg("--admin-socket")
        .arg(&relay_socket)
        .arg("--bind")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // Its own user can use it: the check is about who owns the socket, not about root.
    let ready = (|| -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(s) = relay.try_wait()? {
                anyhow::bail!("nobody's server exited with {s}");
            }
            let out = as_nobody(&sigil_bin())
                .args(["server", "healthcheck", "--admin-socket"])
                .arg(&relay_socket)
                .output()?;
            if out.status.success() {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "nobody's server not healthy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    let result = (|| -> anyhow::Result<()> {
        ready?;
        assert_eq!(std::fs::symlink_metadata(&relay_socket)?.uid(), NOBODY);
        // In nobody's directory: refused because of the directory.
        let out = Command::new(sigil_bin())
            .args(["server", "healthcheck", "--admin-socket"])
            .arg(&relay_socket)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("{}: owned by uid {NOBODY}", theirs.0.display())),
            "{err}"
        );
        // nobody moves its listening socket straight into /tmp (root-owned, sticky): every directory on
        // the way is trusted now, only the socket itself is not.
        let moved = TmpPath::new("relay.sock");
        let out = as_nobody(Path::new("/bin/mv"))
            .arg(&relay_socket)
            .arg(&moved.0)
            .output()?;
        anyhow::ensure!(out.status.success(), "mv as nobody: {out:?}");
        let relay_socket = moved.0.clone();
        let want = [
            format!("{}: socket owned by uid {NOBODY}", relay_socket.display()),
            "refusing to connect".to_string(),
        ];
        let check = |out: Output| {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!out.status.success(), "root's CLI must refuse:\n{err}");
            for w in &want {
                assert!(err.contains(w.as_str()), "stderr must name {w:?}:\n{err}");
            }
        };
        // Admin API client.
        check(
            Command::new(sigil_bin())
                .args(["server", "healthcheck", "--admin-socket"])
                .arg(&relay_socket)
                .output()?,
        );
        check(
            Command::new(sigil_bin())
                .args(["entry", "show", "--admin-socket"])
                .arg(&relay_socket)
                .output()?,
        );
        // Workload API client, by flag and by SPIFFE_ENDPOINT_SOCKET.
        check(
            Command::new(sigil_bin())
                .args(["agent", "api", "fetch", "x509", "--socket-path"])
                .arg(&relay_socket)
                .output()?,
        );
        check(
            Command::new(sigil_bin())
                .args(["agent", "api", "fetch", "x509"])
                .env(
                    "SPIFFE_ENDPOINT_SOCKET",
                    format!("unix://{}", relay_socket.display()),
                )
                .output()?,
        );
        // The race the path check alone leaves open: the socket the CLI checked is root's, but the one
        // it connects to is served by nobody. Root chowns nobody's socket file to itself, so the path
        // check passes; the peer's credentials (SO_PEERCRED) still say nobody and are refused.
        std::os::unix::fs::chown(&relay_socket, Some(0), Some(0))?;
        assert!(sigil_daemon::check_socket(&relay_socket).is_ok());
        let want_peer = [
            format!(
                "{}: served by a process of uid {NOBODY}",
                relay_socket.display()
            ),
            "refusing to use it".to_string(),
        ];
        let check_peer = |out: Output| {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!out.status.success(), "root's CLI must refuse:\n{err}");
            for w in &want_peer {
                assert!(err.contains(w.as_str()), "stderr must name {w:?}:\n{err}");
            }
        };
        check_peer(
            Command::new(sigil_bin())
                .args(["server", "healthcheck", "--admin-socket"])
                .arg(&relay_socket)
                .output()?,
        );
        check_peer(
            Command::new(sigil_bin())
                .args(["agent", "api", "fetch", "x509"])
                .env(
                    "SPIFFE_ENDPOINT_SOCKET",
                    format!("unix://{}", relay_socket.display()),
                )
                .output()?,
        );
        // The connector on its own (the one the CLI and the tests' admin client use).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match rt.block_on(sigil_daemon::connect_trusted(&relay_socket)) {
            Err(sigil_daemon::DirError::UntrustedPeer { peer, .. }) => assert_eq!(peer, NOBODY),
            other => panic!("nobody's socket must be refused by its peer, got {other:?}"),
        }
        let e = rt
            .block_on(sigil_e2e::admin_channel(&relay_socket))
            .expect_err("the tests' admin client must refuse nobody's socket too");
        assert!(
            format!("{e:#}").contains("served by a process of uid"),
            "{e:#}"
        );
        // Control: root's own server and agent are used.
        let server = ServerProcess::start(&[])?;
        let out = server.cli(&["server", "healthcheck"])?;
        assert!(out.status.success(), "{out:?}");
        let agent = AgentProcess::start(&server, &[])?;
        let out = Command::new(sigil_bin())
            .args(["agent", "healthcheck", "--socket-path"])
            .arg(&agent.socket)
            .output()?;
        assert!(out.status.success(), "{out:?}");
        Ok(())
    })();
    let _ = relay.kill();
    let _ = relay.wait();
    result
}

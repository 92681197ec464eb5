//! gRPC interop on every Unix socket: Python `grpcio` (gRPC C-core, the core of py-spiffe and of the C++,
//! Ruby and PHP clients) with its default channel options calls the real server admin API, Workload API,
//! Delegated Identity API and netd API. C-core sends the socket path as `:authority`
//! (`tmp%2F...%2Fapi.sock`), which `h2` alone resets with PROTOCOL_ERROR (so every call failed with
//! INTERNAL); each case here asserts success and the documented error codes.
//!
//! Stubs are generated at test time from the repo's `.proto` files with `grpc_tools.protoc`; the client is
//! `tests/python/grpc_interop.py`. `scripts/ensure-deps.sh` installs `grpcio` and `grpcio-tools`; without
//! them the tests skip with a message, and under `CI=true` a skip is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use sigil_test_util::{AgentProcess, NetdProcess, ServerProcess};

const TD: &str = "identity.example.com";

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn can_run(needs_root: bool) -> bool {
    let python = || match Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "python3 cannot import grpc/grpc_tools (run scripts/ensure-deps.sh): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run python3: {e}")),
    };
    let what = "the gRPC interop test";
    if needs_root {
        sigil_test_util::can_run_as_root_and(what, python)
    } else {
        sigil_test_util::skip_unless(what, python())
    }
}

/// Python stubs for every `.proto` in `crates/proto/proto`, generated into a temporary directory.
struct Stubs {
    dir: tempfile::TempDir,
}

impl Stubs {
    fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/proto/proto");
        let mut files = Vec::new();
        collect_protos(&protos, &protos, &mut files)?;
        let out = Command::new("python3")
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&protos)
            .arg(format!("--python_out={}", dir.path().display()))
            .arg(format!("--grpc_python_out={}", dir.path().display()))
            .args(&files)
            .output()
            .context("running grpc_tools.protoc")?;
        if !out.status.success() {
            bail!(
                "grpc_tools.protoc failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Stubs { dir })
    }

    /// Runs one client case against `target` from `cwd`; returns its JSON line.
    fn call(&self, cwd: &Path, target: &str, case: &str, args: &[&str]) -> anyhow::Result<Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_interop.py");
        let out = Command::new("python3")
            .arg(&script)
            .arg(self.dir.path())
            .arg(target)
            .arg(case)
            .args(args)
            .current_dir(cwd)
            .output()
            .context("running the grpcio client")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{case} against {target} exited with {}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("{case}: not one JSON line: {stdout:?}"))
    }

    /// Repeats a call until its code is `code` (the agent learns new entries asynchronously).
    fn call_until(
        &self,
        cwd: &Path,
        target: &str,
        case: &str,
        args: &[&str],
        code: &str,
    ) -> anyhow::Result<Value> {
        let start = Instant::now();
        loop {
            let v = self.call(cwd, target, case, args)?;
            if v["code"] == code {
                return Ok(v);
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("{case} against {target}: still {v} after 20 s, wanted {code}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn collect_protos(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            collect_protos(root, &p, out)?;
        } else if p.extension().is_some_and(|x| x == "proto") {
            out.push(p.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// The three ways a grpcio user names a socket: `unix:<absolute>`, `unix://<absolute>` and
/// `unix:<relative>` (run from `base`). Returns (cwd, target) pairs.
fn targets(socket: &Path, base: &Path) -> Vec<(PathBuf, String)> {
    let rel = socket.strip_prefix(base).expect("socket under base");
    vec![
        (base.to_path_buf(), format!("unix:{}", socket.display())),
        (base.to_path_buf(), format!("unix://{}", socket.display())),
        (base.to_path_buf(), format!("unix:{}", rel.display())),
    ]
}

fn entry(server: &ServerProcess, spiffe: &str, parent: &str, selector: &str) -> anyhow::Result<()> {
    let out = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        spiffe,
        "--parent-id",
        parent,
        "--selector",
        selector,
    ])?;
    if !out.status.success() {
        bail!(
            "entry create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn agent_id(agent: &AgentProcess) -> String {
    format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().unwrap_or_default()
    )
}

fn server() -> anyhow::Result<ServerProcess> {
    ServerProcess::start(&[])
}

#[test]
fn workload_api_serves_grpcio_clients() -> anyhow::Result<()> {
    if !can_run(false) {
        return Ok(());
    }
    let stubs = Stubs::generate()?;
    let server = server()?;
    let agent = AgentProcess::start(&server, &[])?;
    let base = agent.root.path();
    let abs = format!("unix:{}", agent.socket.display());
    // Only another uid is registered at first.
    entry(
        &server,
        &format!("spiffe://{TD}/someone-else"),
        &agent_id(&agent),
        &format!("unix:uid:{}", uid() + 777),
    )?;

    // Documented errors: no security header → InvalidArgument; an unregistered caller → PermissionDenied.
    let v = stubs.call(base, &abs, "workload-x509", &["no-header"])?;
    assert_eq!(v["code"], "INVALID_ARGUMENT", "{v}");
    let v = stubs.call(base, &abs, "workload-x509", &[])?;
    assert_eq!(v["code"], "PERMISSION_DENIED", "{v}");
    // The standard health service answers anyone on the public socket.
    let v = stubs.call(base, &abs, "health", &["SpiffeWorkloadAPI"])?;
    assert_eq!(v["status"], "SERVING", "{v}");
    let v = stubs.call(base, &abs, "workload-jwt", &["aud"])?;
    assert_eq!(v["code"], "PERMISSION_DENIED", "{v}");

    // Registered: the SVID is served, whatever form the target takes.
    let me = format!("spiffe://{TD}/python");
    entry(
        &server,
        &me,
        &agent_id(&agent),
        &format!("unix:uid:{}", uid()),
    )?;
    let v = stubs.call_until(base, &abs, "workload-x509", &[], "OK")?;
    assert_eq!(v["spiffe_ids"], serde_json::json!([me]), "{v}");
    for (cwd, target) in targets(&agent.socket, base) {
        let v = stubs.call(&cwd, &target, "workload-x509", &[])?;
        assert_eq!(v["code"], "OK", "{target}: {v}");
        assert_eq!(v["spiffe_ids"], serde_json::json!([me]), "{target}: {v}");
        let v = stubs.call(&cwd, &target, "workload-x509", &["no-header"])?;
        assert_eq!(v["code"], "INVALID_ARGUMENT", "{target}: {v}");
    }
    let v = stubs.call(base, &abs, "workload-jwt", &["aud"])?;
    assert_eq!(v["code"], "OK", "{v}");
    assert_eq!(v["spiffe_ids"], serde_json::json!([me]), "{v}");
    let v = stubs.call(base, &abs, "workload-bundles", &[])?;
    assert_eq!(v["code"], "OK", "{v}");
    assert_eq!(
        v["trust_domains"],
        serde_json::json!([format!("spiffe://{TD}")]),
        "{v}"
    );
    Ok(())
}

#[test]
fn delegated_identity_api_serves_grpcio_clients() -> anyhow::Result<()> {
    if !can_run(false) {
        return Ok(());
    }
    let stubs = Stubs::generate()?;
    let server = server()?;
    let delegate = format!("spiffe://{TD}/delegate");
    let good = AgentProcess::start(&server, &["--authorized-delegate", &delegate])?;
    let bad = AgentProcess::start(
        &server,
        &["--authorized-delegate", &format!("spiffe://{TD}/not-me")],
    )?;
    let target_uid = (uid() + 778).to_string();
    for a in [&good, &bad] {
        entry(
            &server,
            &delegate,
            &agent_id(a),
            &format!("unix:uid:{}", uid()),
        )?;
        entry(
            &server,
            &format!("spiffe://{TD}/endpoint"),
            &agent_id(a),
            &format!("unix:uid:{target_uid}"),
        )?;
    }

    // The authorized delegate gets the target's SVID on every target form.
    let abs = format!("unix:{}", good.admin_socket.display());
    let v = stubs.call_until(
        good.root.path(),
        &abs,
        "delegated-x509",
        &[&target_uid],
        "OK",
    )?;
    assert_eq!(
        v["spiffe_ids"],
        serde_json::json!([format!("spiffe://{TD}/endpoint")]),
        "{v}"
    );
    for (cwd, target) in targets(&good.admin_socket, good.root.path()) {
        let v = stubs.call(&cwd, &target, "delegated-x509", &[&target_uid])?;
        assert_eq!(v["code"], "OK", "{target}: {v}");
    }

    // The same caller, once its own SVID has reached the other agent, is not a delegate there.
    stubs.call_until(
        bad.root.path(),
        &format!("unix:{}", bad.socket.display()),
        "workload-x509",
        &[],
        "OK",
    )?;
    for (cwd, target) in targets(&bad.admin_socket, bad.root.path()) {
        let v = stubs.call(&cwd, &target, "delegated-x509", &[&target_uid])?;
        assert_eq!(v["code"], "PERMISSION_DENIED", "{target}: {v}");
    }
    Ok(())
}

#[test]
fn server_admin_api_serves_grpcio_clients() -> anyhow::Result<()> {
    if !can_run(false) {
        return Ok(());
    }
    let stubs = Stubs::generate()?;
    let server = server()?;
    let base = server.root.path();
    let parent = format!("spiffe://{TD}/sigil/server");
    let created = format!("spiffe://{TD}/from-python");
    let mut first = true;
    for (cwd, target) in targets(&server.admin_socket, base) {
        let v = stubs.call(&cwd, &target, "admin-list-entries", &[])?;
        assert_eq!(v["code"], "OK", "{target}: {v}");
        let h = stubs.call(&cwd, &target, "health", &["sigil.admin.v1.Entries"])?;
        assert_eq!(h["status"], "SERVING", "{target}: {h}");
        if first {
            assert_eq!(v["spiffe_ids"], serde_json::json!([]), "{v}");
            let v = stubs.call(
                &cwd,
                &target,
                "admin-create-entry",
                &[&created, &parent, "unix:uid:4242"],
            )?;
            assert_eq!(v["code"], "OK", "{v}");
            first = false;
        } else {
            assert_eq!(v["spiffe_ids"], serde_json::json!([created]), "{v}");
        }
        // Bad input → InvalidArgument naming the field.
        let v = stubs.call(
            &cwd,
            &target,
            "admin-create-entry",
            &["not-a-spiffe-id", &parent, "unix:uid:4242"],
        )?;
        assert_eq!(v["code"], "INVALID_ARGUMENT", "{target}: {v}");
        assert!(
            v["details"]
                .as_str()
                .unwrap_or_default()
                .contains("spiffe_id"),
            "{v}"
        );
    }
    Ok(())
}

#[test]
fn netd_api_serves_grpcio_clients() -> anyhow::Result<()> {
    if !can_run(true) {
        return Ok(());
    }
    let stubs = Stubs::generate()?;
    let netd = NetdProcess::start("grpcio", 217, 41)?;
    let base = netd.root.path();
    for (cwd, target) in targets(&netd.api_socket, base) {
        let v = stubs.call(&cwd, &target, "netd-status", &[])?;
        assert_eq!(v["code"], "OK", "{target}: {v}");
        assert_eq!(v["node_name"], "e2e", "{v}");
        assert_eq!(v["pod_cidr"], netd.pod_cidr, "{v}");
        // The standard health service, for the daemon and for one of its services.
        for service in ["", "sigil.netd.v1.Endpoints"] {
            let v = stubs.call(&cwd, &target, "health", &[service])?;
            assert_eq!(v["code"], "OK", "{target}: {v}");
            assert_eq!(v["status"], "SERVING", "{v}");
        }
        let v = stubs.call(&cwd, &target, "health", &["no.such.Service"])?;
        assert_eq!(v["code"], "NOT_FOUND", "{target}: {v}");
        let v = stubs.call(&cwd, &target, "netd-list-endpoints", &[])?;
        assert_eq!(v["code"], "OK", "{target}: {v}");
        assert_eq!(v["names"], serde_json::json!([]), "{v}");
        // Bad input → InvalidArgument naming the field; nothing is created.
        let v = stubs.call(&cwd, &target, "netd-create-endpoint", &["bad name!"])?;
        assert_eq!(v["code"], "INVALID_ARGUMENT", "{target}: {v}");
        assert!(
            v["details"].as_str().unwrap_or_default().contains("name"),
            "{v}"
        );
    }
    Ok(())
}

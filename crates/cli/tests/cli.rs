//! The `sigil` binary's flag handling and failure reporting, without a server.

use std::process::{Command, Output};

fn sigil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(args)
        .env_remove("SIGIL_ADMIN_SOCKET")
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap_or_else(|e| panic!("cannot run sigil: {e}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const CREATE: [&str; 6] = [
    "entry",
    "create",
    "--spiffe-id",
    "spiffe://td/w",
    "--parent-id",
    "spiffe://td/a",
];

#[test]
fn bad_selector_names_flag_and_value() {
    let o = sigil(&[&CREATE[..], &["--selector", "unix"]].concat());
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("--selector") && err.contains("\"unix\" is not type:value"),
        "{err}"
    );
}

#[test]
fn node_and_parent_id_are_exclusive() {
    let o = sigil(&[&CREATE[..], &["--node"]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--node"), "{}", stderr(&o));
}

#[test]
fn data_excludes_field_flags() {
    let o = sigil(&["entry", "create", "--data", "x.json", "--hint", "h"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--data"), "{}", stderr(&o));
}

#[test]
fn negative_numbers_and_hyphen_names_reach_the_server() {
    // The flag parser lets them through (exit 1 at the connection, not 2 at parsing), so that the
    // server's refusal can name the field and the value.
    for extra in [
        ["--x509-svid-ttl", "-5"],
        ["--jwt-svid-ttl", "-1"],
        ["--entry-expiry", "-10"],
        ["--dns", "-bad.example"],
    ] {
        let o = sigil(
            &[
                &CREATE[..],
                &extra[..],
                &["--admin-socket", "/nonexistent/api.sock"],
            ]
            .concat(),
        );
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("/nonexistent/api.sock"),
            "{extra:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn bad_data_file_is_reported_before_connecting() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("entries.json");
    std::fs::write(
        &path,
        r#"{"entries":[{"spiffe_id":"spiffe://td/w","jwt_svid_ttl":"1h"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let o = sigil(&[
        "entry",
        "create",
        "--admin-socket",
        "/nonexistent/api.sock",
        "--data",
        &path.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with("Error: --data "), "{err}");
    assert!(err.contains("entries[0].jwt_svid_ttl"), "{err}");
}

#[test]
fn missing_fields_are_named() {
    let o = sigil(&["entry", "create", "--parent-id", "spiffe://td/a"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--spiffe-id is required"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unreachable_server_names_the_socket_and_the_fix() {
    let o = sigil(&["entry", "show", "--admin-socket", "/nonexistent/api.sock"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/api.sock"), "{err}");
    assert!(err.contains("sigil server run"), "{err}");
}

#[test]
fn healthcheck_fails_with_exit_1_when_no_server() {
    let o = sigil(&[
        "server",
        "healthcheck",
        "--admin-socket",
        "/nonexistent/api.sock",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert!(
        stderr(&o).starts_with("Server is unhealthy: "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn admin_socket_comes_from_the_environment_too() {
    let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["agent", "list"])
        .env("SIGIL_ADMIN_SOCKET", "/nonexistent/env.sock")
        .output()
        .unwrap_or_else(|e| panic!("cannot run sigil: {e}"));
    assert!(
        stderr(&o).contains("/nonexistent/env.sock"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn agent_healthcheck_fails_with_exit_1_naming_the_socket() {
    let o = sigil(&["agent", "healthcheck", "--socket-path", "/nonexistent"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let err = stderr(&o);
    assert!(err.starts_with("Agent is unhealthy: "), "{err}");
    assert!(err.contains("/nonexistent"), "{err}");
    assert!(err.contains("sigil agent run"), "{err}");
}

#[test]
fn workload_socket_comes_from_spiffe_endpoint_socket() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(["agent", "api", "fetch", "x509"])
            .env("SPIFFE_ENDPOINT_SOCKET", value)
            .output()
            .unwrap_or_else(|e| panic!("cannot run sigil: {e}"))
    };
    let o = run("unix:///nonexistent/env-api.sock");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/env-api.sock"),
        "{}",
        stderr(&o)
    );
    let o = run("tcp://127.0.0.1:8000");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.starts_with("Error: SPIFFE_ENDPOINT_SOCKET: ")
            && err.contains("\"tcp://127.0.0.1:8000\""),
        "{err}"
    );
}

//! `sigil policy trace|validate` end to end: the real binary on policy files written to a
//! temporary directory, checking the text output's last line and the JSON fields, and that bad
//! input exits non-zero naming the flag or field and the value. Needs `target/debug/sigil`
//! (`cargo build -p sigil-cli`), no daemon.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;
use sigil_test_util::sigil_bin;

const NS: &str = "io.kubernetes.pod.namespace=prod";

const DB: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-ingress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: '5432', protocol: TCP}]}]
  - fromEndpoints:
    - matchLabels: {"spiffe.io/spiffe-id": "spiffe://example.org/ns/prod/sa/reporting"}
    toPorts: [{ports: [{port: '5432', protocol: TCP}]}]
  - fromEntities: [world]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: batch}}]
    toPorts: [{ports: [{port: '8000', endPort: 8100, protocol: TCP}]}]
"#;

const WEB: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-egress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
  - toCIDR: [10.0.0.0/8]
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules: {http: [{method: GET, path: "/v1/.*"}]}
  - toEndpoints: [{matchLabels: {app: payments}}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
    authentication: {mode: required}
  - toEndpoints: [{matchLabels: {k8s-app: kube-dns, io.kubernetes.pod.namespace: kube-system}}]
    toPorts: [{ports: [{port: '53', protocol: UDP}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 80}]
"#;

const NO_DEBUG: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-debug}
spec:
  endpointSelector: {}
  enableDefaultDeny: {ingress: false, egress: false}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {debug: 'true'}}]
"#;

/// A policy directory: db.yaml, web.yml (two documents), no-debug.yaml, and a non-YAML file
/// that must be ignored.
fn policy_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("db.yaml"), DB)?;
    std::fs::write(dir.path().join("web.yml"), WEB)?;
    std::fs::write(dir.path().join("no-debug.yaml"), NO_DEBUG)?;
    std::fs::write(dir.path().join("README.txt"), "not a policy: {")?;
    Ok(dir)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn sigil(args: &[&str]) -> anyhow::Result<Run> {
    let bin = sigil_bin();
    if !bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build -p sigil-cli`",
            bin.display()
        );
    }
    let out = Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("temporary path is not UTF-8")
}

/// `sigil policy trace --policies <dir> <flow...>`: the text output's last line and the JSON.
fn trace(policies: &[&Path], flow: &[&str]) -> anyhow::Result<(String, Value)> {
    let mut args = vec!["policy", "trace"];
    for p in policies {
        args.extend(["--policies", path(p)?]);
    }
    args.extend(flow);
    let text = sigil(&args)?;
    if text.code != Some(0) {
        bail!("{args:?} exited {:?}: {}", text.code, text.stderr);
    }
    let last = text
        .stdout
        .trim_end()
        .lines()
        .last()
        .unwrap_or("")
        .to_owned();
    args.extend(["--output", "json"]);
    let json = sigil(&args)?;
    if json.code != Some(0) {
        bail!("{args:?} exited {:?}: {}", json.code, json.stderr);
    }
    let v: Value = serde_json::from_str(&json.stdout)
        .with_context(|| format!("JSON output of {args:?}: {}", json.stdout))?;
    // Text and JSON must agree.
    let upper = v["verdict"].as_str().unwrap_or("").to_ascii_uppercase();
    if last != format!("Final verdict: {upper}") {
        bail!("text says {last:?}, JSON says {upper:?}");
    }
    Ok((last, v))
}

fn ep(labels: &str) -> String {
    format!("{labels},{NS}")
}

/// The deciding rules of one direction as `policy-name rule-path action`.
fn decided(v: &Value, direction: &str) -> Vec<String> {
    v[direction]["decided_by"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    format!(
                        "{} {} {}",
                        m["policy"]["name"].as_str().unwrap_or("?"),
                        m["rule"].as_str().unwrap_or("?"),
                        m["action"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

const ALLOWED: &str = "Final verdict: ALLOWED";
const DENIED: &str = "Final verdict: DENIED";

#[test]
fn allow_by_label_both_directions() -> anyhow::Result<()> {
    let dir = policy_dir()?;
    let (web, db) = (ep("app=web"), ep("app=db"));
    let (last, v) = trace(
        &[dir.path()],
        &["--src", &web, "--dst", &db, "--dport", "5432"],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(v["l7_redirect"], false);
    assert_eq!(v["auth_required"], false);
    assert_eq!(v["egress"]["verdict"], "allowed");
    assert_eq!(v["ingress"]["verdict"], "allowed");
    assert_eq!(decided(&v, "egress"), ["web-egress spec.egress[0] allow"]);
    assert_eq!(decided(&v, "ingress"), ["db-ingress spec.ingress[0] allow"]);
    assert_eq!(v["protocol"], 6, "PROTO defaults to TCP");

    // Another port: the destination's ingress is in default deny, no rule decides.
    let (last, v) = trace(
        &[dir.path()],
        &["--src", &web, "--dst", &db, "--dport", "5433"],
    )?;
    assert_eq!(last, DENIED);
    assert_eq!(v["ingress"]["verdict"], "denied");
    assert_eq!(v["ingress"]["enforced"], true);
    assert!(decided(&v, "ingress").is_empty());
    assert_eq!(v["egress"]["verdict"], "allowed");

    // The text names the deciding policy and rule.
    let out = sigil(&[
        "policy",
        "trace",
        "--policies",
        path(dir.path())?,
        "--src",
        &web,
        "--dst",
        &db,
        "--dport",
        "5432/tcp",
    ])?;
    assert!(
        out.stdout
            .contains("CiliumNetworkPolicy/prod/db-ingress spec.ingress[0]"),
        "{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn allow_by_spiffe_id() -> anyhow::Result<()> {
    let dir = policy_dir()?;
    let db = ep("app=db");
    // The value holds ':', '/' and '='.
    let reporting = ep("spiffe.io/spiffe-id=spiffe://example.org/ns/prod/sa/reporting");
    let (last, v) = trace(
        &[dir.path()],
        &["--src", &reporting, "--dst", &db, "--dport", "5432"],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(decided(&v, "ingress"), ["db-ingress spec.ingress[1] allow"]);
    assert!(
        v["src"]["labels"]
            .as_str()
            .unwrap_or("")
            .contains("spiffe:spiffe.io/spiffe-id=spiffe://example.org/ns/prod/sa/reporting"),
        "{v}"
    );

    let other = ep("spiffe:spiffe.io/spiffe-id=spiffe://example.org/ns/prod/sa/other=x");
    let (last, _) = trace(
        &[dir.path()],
        &["--src", &other, "--dst", &db, "--dport", "5432"],
    )?;
    assert_eq!(last, DENIED);
    Ok(())
}

#[test]
fn deny_beats_allow() -> anyhow::Result<()> {
    let dir = policy_dir()?;
    let debug_web = ep("app=web,debug=true");
    let (last, v) = trace(
        &[dir.path()],
        &[
            "--src",
            &debug_web,
            "--dst",
            &ep("app=db"),
            "--dport",
            "5432",
        ],
    )?;
    assert_eq!(last, DENIED);
    assert_eq!(v["ingress"]["verdict"], "denied");
    assert_eq!(
        decided(&v, "ingress"),
        ["no-debug spec.ingressDeny[0] deny"]
    );
    // Its egress is still allowed: only the ingress side has the deny.
    assert_eq!(v["egress"]["verdict"], "allowed");
    Ok(())
}

#[test]
fn entity_world_and_cidr_peers() -> anyhow::Result<()> {
    let dir = policy_dir()?;
    let db = ep("app=db");
    let (last, v) = trace(
        &[dir.path()],
        &["--src-entity", "world", "--dst", &db, "--dport", "443"],
    )?;
    assert_eq!(last, ALLOWED);
    // An entity has no policy of its own.
    assert_eq!(v["egress"]["applies"], false);
    assert_eq!(v["src"]["kind"], "entity");
    assert_eq!(decided(&v, "ingress"), ["db-ingress spec.ingress[2] allow"]);
    let (last, _) = trace(
        &[dir.path()],
        &["--src-entity", "world", "--dst", &db, "--dport", "5432"],
    )?;
    assert_eq!(last, DENIED);

    // An outside address is part of `world`.
    let (last, v) = trace(
        &[dir.path()],
        &["--src-cidr", "203.0.113.9", "--dst", &db, "--dport", "443"],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(v["src"]["kind"], "cidr");

    // toCIDR: inside the prefix allowed, outside denied by the egress default deny.
    let web = ep("app=web");
    let (last, v) = trace(
        &[dir.path()],
        &["--src", &web, "--dst-cidr", "10.1.2.3", "--dport", "9999"],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(decided(&v, "egress"), ["web-egress spec.egress[1] allow"]);
    assert_eq!(v["ingress"]["applies"], false);
    let (last, v) = trace(
        &[dir.path()],
        &[
            "--src",
            &web,
            "--dst-cidr",
            "203.0.113.9",
            "--dport",
            "9999",
        ],
    )?;
    assert_eq!(last, DENIED);
    assert_eq!(v["egress"]["verdict"], "denied");

    // Between two entities nothing applies.
    let (last, _) = trace(
        &[dir.path()],
        &[
            "--src-entity",
            "host",
            "--dst-entity",
            "remote-node",
            "--dport",
            "1",
        ],
    )?;
    assert_eq!(last, ALLOWED);
    Ok(())
}

#[test]
fn port_range_and_protocol() -> anyhow::Result<()> {
    let dir = policy_dir()?;
    let (batch, db) = (ep("app=batch"), ep("app=db"));
    for (port, want) in [
        ("7999", DENIED),
        ("8000", ALLOWED),
        ("8050", ALLOWED),
        ("8100", ALLOWED),
        ("8101", DENIED),
        ("8050/udp", DENIED),
    ] {
        let (last, _) = trace(
            &[dir.path()],
            &["--src", &batch, "--dst", &db, "--dport", port],
        )?;
        assert_eq!(last, want, "port {port}");
    }

    // UDP rule: 53/udp allowed, 53 (TCP) not.
    let (web, dns) = (
        ep("app=web"),
        "k8s-app=kube-dns,io.kubernetes.pod.namespace=kube-system",
    );
    let (last, v) = trace(
        &[dir.path()],
        &["--src", &web, "--dst", dns, "--dport", "53/UDP"],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(v["protocol"], 17);
    let (last, _) = trace(
        &[dir.path()],
        &["--src", &web, "--dst", dns, "--dport", "53"],
    )?;
    assert_eq!(last, DENIED);
    Ok(())
}

#[test]
fn l7_redirect_and_auth_required() -> anyhow::Result<()> {
    let dir = policy_dir()?;
    let web = ep("app=web");
    // web → api: Cilium egress with an HTTP rule, NetworkPolicy ingress on 80.
    let (last, v) = trace(
        &[dir.path()],
        &["--src", &web, "--dst", &ep("app=api"), "--dport", "80"],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(v["l7_redirect"], true);
    assert_eq!(v["egress"]["l7_redirect"], true);
    assert_eq!(v["auth_required"], false);
    assert_eq!(
        decided(&v, "ingress"),
        ["api-from-web spec.ingress[0] allow"]
    );
    // The NetworkPolicy admits only web.
    let (last, _) = trace(
        &[dir.path()],
        &[
            "--src",
            &ep("app=batch"),
            "--dst",
            &ep("app=api"),
            "--dport",
            "80",
        ],
    )?;
    assert_eq!(last, DENIED);

    let (last, v) = trace(
        &[dir.path()],
        &[
            "--src",
            &web,
            "--dst",
            &ep("app=payments"),
            "--dport",
            "443",
        ],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(v["auth_required"], true);
    assert_eq!(v["l7_redirect"], false);
    Ok(())
}

#[test]
fn empty_directory_allows_and_several_paths_load_as_one_set() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    let (last, v) = trace(
        &[empty.path()],
        &["--src", "app=a", "--dst", "app=b", "--dport", "1"],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(v["egress"]["enforced"], false);
    assert_eq!(v["ingress"]["enforced"], false);

    // Two files given separately, plus the empty directory: db's ingress and web's egress.
    let dir = policy_dir()?;
    let files: Vec<PathBuf> = ["db.yaml", "web.yml"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    let (last, v) = trace(
        &[&files[0], &files[1], empty.path()],
        &[
            "--src",
            &ep("app=web"),
            "--dst",
            &ep("app=db"),
            "--dport",
            "5432",
        ],
    )?;
    assert_eq!(last, ALLOWED);
    assert_eq!(
        v["ingress"]["selected_by"],
        serde_json::json!(["CiliumNetworkPolicy/prod/db-ingress"])
    );
    Ok(())
}

/// Runs a command that must fail; returns its standard error.
fn fails(args: &[&str]) -> anyhow::Result<String> {
    let r = sigil(args)?;
    if matches!(r.code, Some(0) | None) {
        bail!("{args:?} exited {:?}; stdout: {}", r.code, r.stdout);
    }
    if !r.stdout.is_empty() {
        bail!("{args:?} failed but printed {:?}", r.stdout);
    }
    Ok(r.stderr)
}

#[test]
fn bad_policy_fails_with_file_and_field_path() -> anyhow::Result<()> {
    let dir = policy_dir()?;
    std::fs::write(
        dir.path().join("zz-bad.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad, namespace: prod}\n\
         spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: '99999'}]}]\n",
    )?;
    let d = path(dir.path())?;
    let flow = ["--src", "app=a", "--dst", "app=b", "--dport", "80"];
    let err = fails(&[&["policy", "trace", "--policies", d][..], &flow].concat())?;
    for want in [
        "zz-bad.yaml",
        "document 1",
        "spec.ingress[0].toPorts[0].ports[0].port",
        "99999",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    let err = fails(&["policy", "validate", d])?;
    assert!(
        err.contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "{err}"
    );

    // Not YAML at all; and a path that does not exist.
    let broken = dir.path().join("broken.yml");
    std::fs::write(&broken, "kind: [unclosed\n")?;
    let err = fails(
        &[
            &["policy", "trace", "--policies", path(&broken)?][..],
            &flow,
        ]
        .concat(),
    )?;
    assert!(err.contains("broken.yml"), "{err}");
    let missing = dir.path().join("missing.yaml");
    let err = fails(
        &[
            &["policy", "trace", "--policies", path(&missing)?][..],
            &flow,
        ]
        .concat(),
    )?;
    assert!(
        err.contains("--policies") && err.contains("missing.yaml"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_flags_name_the_flag_and_value() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    let d = path(empty.path())?;
    let base = ["policy", "trace", "--policies", d];
    for (flags, want) in [
        (
            ["--src", "app=a,,b", "--dst", "app=b", "--dport", "80"],
            ["--src", "app=a,,b"],
        ),
        (
            ["--src", "bad key=x", "--dst", "app=b", "--dport", "80"],
            ["--src", "bad key=x"],
        ),
        (
            ["--src-entity", "cluster", "--dst", "app=b", "--dport", "80"],
            ["--src-entity", "cluster"],
        ),
        (
            ["--src", "app=a", "--dst-entity", "moon", "--dport", "80"],
            ["--dst-entity", "moon"],
        ),
        (
            [
                "--src",
                "app=a",
                "--dst-cidr",
                "10.0.0.0/8",
                "--dport",
                "80",
            ],
            ["--dst-cidr", "10.0.0.0/8"],
        ),
        (
            ["--src-cidr", "300.1.1.1", "--dst", "app=b", "--dport", "80"],
            ["--src-cidr", "300.1.1.1"],
        ),
        (
            ["--src", "app=a", "--dst", "app=b", "--dport", "70000"],
            ["--dport", "70000"],
        ),
        (
            ["--src", "app=a", "--dst", "app=b", "--dport", "80/icmp"],
            ["--dport", "80/icmp"],
        ),
        (
            ["--src", "app=a", "--dst", "app=b", "--dport", "http"],
            ["--dport", "http"],
        ),
    ] {
        let err = fails(&[&base[..], &flags].concat())?;
        for w in want {
            assert!(err.contains(w), "missing {w:?} in {err}");
        }
    }
    // Exactly one source and one destination.
    let err = fails(
        &[
            &base[..],
            &[
                "--src",
                "a=b",
                "--src-entity",
                "host",
                "--dst",
                "a=c",
                "--dport",
                "1",
            ],
        ]
        .concat(),
    )?;
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fails(&[&base[..], &["--src", "a=b", "--dport", "1"]].concat())?;
    assert!(err.contains("--dst"), "{err}");
    Ok(())
}

#[test]
fn validate_lists_documents() -> anyhow::Result<()> {
    let dir = policy_dir()?;
    let r = sigil(&["policy", "validate", path(dir.path())?])?;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", r.stdout);
    assert!(
        lines[0].starts_with("CiliumNetworkPolicy prod/db-ingress: 1 rule ("),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("CiliumClusterwideNetworkPolicy no-debug: 1 rule ("),
        "{}",
        lines[1]
    );
    assert!(
        lines[3].starts_with("NetworkPolicy prod/api-from-web: 1 rule ("),
        "{}",
        lines[3]
    );
    assert!(lines[3].ends_with("web.yml, document 2)"), "{}", lines[3]);
    assert_eq!(lines[4], "4 documents valid");

    let r = sigil(&["policy", "validate", path(dir.path())?, "--output", "json"])?;
    let v: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(v["valid"], 4);
    assert_eq!(v["documents"][2]["name"], "web-egress");
    assert_eq!(v["documents"][2]["rules"], 1);
    Ok(())
}

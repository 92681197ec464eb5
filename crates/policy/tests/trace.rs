//! `trace` and `load_path`: both directions, peers that are entities or addresses, the
//! deciding rules, JSON and text output, and loading files and directories.
#![allow(clippy::unwrap_used)]

#[path = "support/helpers.rs"]
mod helpers;

use helpers::*;
use sigil_policy::{
    EnforcementMode, Peer, PolicyError, TraceVerdict, load_path, load_paths, parse_dport, trace,
    trace_with_mode,
};

const POLICIES: &str = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-ingress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: '5432', protocol: TCP}]}]
  - fromEntities: [world]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-debug}
spec:
  endpointSelector: {}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {debug: 'true'}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-egress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
  - toCIDR: [10.0.0.0/8]
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET}]}}]
    authentication: {mode: required}
";

fn ep(s: &str) -> Peer {
    Peer::endpoint(s).unwrap()
}

const WEB: &str = "app=web,io.kubernetes.pod.namespace=prod";
const DB: &str = "app=db,io.kubernetes.pod.namespace=prod";

#[test]
fn allowed_by_both_directions() {
    let d = docs(POLICIES);
    let r = trace(&d, &ep(WEB), &ep(DB), 5432, TCP);
    assert_eq!(r.verdict, TraceVerdict::Allowed);
    assert_eq!(r.egress.decided_by[0].policy.name, "web-egress");
    assert_eq!(r.egress.decided_by[0].rule, "spec.egress[0]");
    assert_eq!(r.ingress.decided_by[0].policy.name, "db-ingress");
    assert!(r.ingress.enforced && r.egress.enforced);
    assert_eq!(
        r.ingress.selected_by,
        vec![
            "CiliumNetworkPolicy/prod/db-ingress".to_owned(),
            "CiliumClusterwideNetworkPolicy/no-debug".to_owned()
        ]
    );
    let text = r.to_string();
    assert!(text.ends_with("Final verdict: ALLOWED"), "{text}");
    assert!(text.contains("db-ingress spec.ingress[0]"), "{text}");
}

#[test]
fn denied_by_default_or_by_a_deny_rule() {
    let d = docs(POLICIES);
    let r = trace(&d, &ep(WEB), &ep(DB), 5433, TCP);
    assert_eq!(r.verdict, TraceVerdict::Denied);
    assert_eq!(r.egress.verdict, TraceVerdict::Allowed);
    assert_eq!(r.ingress.verdict, TraceVerdict::Denied);
    assert!(r.ingress.decided_by.is_empty());
    assert!(
        r.ingress.reason.contains("default deny"),
        "{}",
        r.ingress.reason
    );
    assert!(r.to_string().ends_with("Final verdict: DENIED"));

    let r = trace(&d, &ep(&format!("{WEB},debug=true")), &ep(DB), 5432, TCP);
    assert_eq!(r.verdict, TraceVerdict::Denied);
    assert_eq!(r.ingress.decided_by[0].policy.name, "no-debug");
    assert_eq!(r.ingress.decided_by[0].rule, "spec.ingressDeny[0]");

    // The source's egress can deny too.
    let r = trace(
        &d,
        &ep(WEB),
        &ep("app=other,io.kubernetes.pod.namespace=prod"),
        80,
        TCP,
    );
    assert_eq!(
        (r.verdict, r.egress.verdict, r.ingress.verdict),
        (
            TraceVerdict::Denied,
            TraceVerdict::Denied,
            TraceVerdict::Allowed
        )
    );
}

#[test]
fn flags_and_json_output() {
    let d = docs(POLICIES);
    let r = trace(
        &d,
        &ep(WEB),
        &ep("app=api,io.kubernetes.pod.namespace=prod"),
        80,
        TCP,
    );
    assert_eq!(r.verdict, TraceVerdict::Allowed);
    assert!(r.l7_redirect && r.auth_required);
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(v["l7_redirect"], true);
    assert_eq!(v["auth_required"], true);
    assert_eq!(v["egress"]["verdict"], "allowed");
    assert_eq!(v["egress"]["decided_by"][0]["policy"]["name"], "web-egress");
    assert_eq!(v["egress"]["decided_by"][0]["action"], "allow");
    assert_eq!(v["ingress"]["applies"], true);
    // Denied flows carry no flags.
    let r = trace(
        &d,
        &ep(WEB),
        &ep("app=api,io.kubernetes.pod.namespace=prod"),
        81,
        TCP,
    );
    assert!(!r.l7_redirect && !r.auth_required);
    assert_eq!(serde_json::to_value(&r).unwrap()["verdict"], "denied");
}

#[test]
fn entity_and_cidr_peers_have_no_policy_of_their_own() {
    let d = docs(POLICIES);
    let world = Peer::entity("world").unwrap();
    let r = trace(&d, &world, &ep(DB), 443, TCP);
    assert_eq!(r.verdict, TraceVerdict::Allowed);
    assert!(!r.egress.applies);
    assert_eq!(r.src.kind, "entity");
    assert_eq!(
        trace(&d, &world, &ep(DB), 5432, TCP).verdict,
        TraceVerdict::Denied
    );

    // An address in a policy's CIDR gets a CIDR identity; others are world.
    let r = trace(&d, &ep(WEB), &Peer::cidr("10.1.2.3").unwrap(), 80, TCP);
    assert_eq!(r.verdict, TraceVerdict::Allowed);
    assert!(
        r.dst.labels.contains("cidr:10.1.2.3/32"),
        "{}",
        r.dst.labels
    );
    assert!(!r.ingress.applies);
    let r = trace(&d, &ep(WEB), &Peer::cidr("192.168.1.1").unwrap(), 80, TCP);
    assert_eq!(r.verdict, TraceVerdict::Denied);
    assert_eq!(r.dst.labels, "reserved:world");
    // A CIDR source reaches db's world rule (CIDR identities are part of world).
    assert_eq!(
        trace(&d, &Peer::cidr("10.9.9.9").unwrap(), &ep(DB), 443, TCP).verdict,
        TraceVerdict::Allowed
    );
    // Host: not selected by any rule for egress; db does not allow it.
    assert_eq!(
        trace(&d, &Peer::entity("host").unwrap(), &ep(DB), 5432, TCP).verdict,
        TraceVerdict::Denied
    );
}

#[test]
fn peers_and_ports_from_text() {
    let Peer::Endpoint(l) =
        Peer::endpoint("app=web,k8s:tier=fe,spiffe.io/spiffe-id=spiffe://td/a=b:c").unwrap()
    else {
        panic!()
    };
    assert_eq!(
        l.to_string(),
        "k8s:app=web,spiffe:spiffe.io/spiffe-id=spiffe://td/a=b:c,k8s:tier=fe"
    );
    assert!(matches!(
        Peer::entity("cluster"),
        Err(PolicyError::Peer { .. })
    ));
    assert!(matches!(
        Peer::cidr("10.0.0.0/8"),
        Err(PolicyError::Peer { .. })
    ));
    assert!(Peer::endpoint("").is_err());
    assert_eq!(parse_dport("80").unwrap(), (80, TCP));
    assert_eq!(parse_dport("53/udp").unwrap(), (53, UDP));
    assert_eq!(parse_dport("9/SCTP").unwrap(), (9, SCTP));
    assert!(parse_dport("http").is_err());
    assert!(parse_dport("80/icmp").is_err());
    assert!(parse_dport("70000").is_err());
}

#[test]
fn modes_and_no_policies() {
    let d = docs(POLICIES);
    assert_eq!(
        trace(&[], &ep(WEB), &ep(DB), 1, TCP).verdict,
        TraceVerdict::Allowed
    );
    assert_eq!(
        trace_with_mode(&[], EnforcementMode::Always, &ep(WEB), &ep(DB), 1, TCP).verdict,
        TraceVerdict::Denied
    );
    let r = trace_with_mode(
        &d,
        EnforcementMode::Never,
        &ep(&format!("{WEB},debug=true")),
        &ep(DB),
        1,
        TCP,
    );
    assert_eq!(r.verdict, TraceVerdict::Allowed);
}

#[test]
fn load_files_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (first, rest) = POLICIES.split_once("---\n").unwrap();
    std::fs::write(p.join("b.yml"), rest).unwrap();
    std::fs::write(p.join("a.yaml"), first).unwrap();
    std::fs::write(p.join("notes.txt"), "not yaml: [").unwrap();
    std::fs::create_dir(p.join("sub")).unwrap();
    std::fs::write(p.join("sub/c.yaml"), "not yaml: [").unwrap();
    let docs = load_path(p).unwrap();
    let names: Vec<&str> = docs.iter().map(|d| d.id.name.as_str()).collect();
    assert_eq!(names, vec!["db-ingress", "no-debug", "web-egress"]);
    assert!(docs[0].origin.ends_with("a.yaml") && docs[2].origin.ends_with("b.yml"));
    assert_eq!(load_path(&p.join("a.yaml")).unwrap().len(), 1);

    let empty = tempfile::tempdir().unwrap();
    assert!(load_path(empty.path()).unwrap().is_empty());
    assert!(matches!(
        load_path(&p.join("missing")),
        Err(PolicyError::Io { .. })
    ));

    // The same policy in two files is one import's duplicate.
    assert!(matches!(
        load_paths(&[p.join("a.yaml"), p.to_path_buf()]),
        Err(PolicyError::Duplicate { .. })
    ));

    // An invalid document anywhere rejects the load and names its file.
    std::fs::write(p.join("c.yaml"), "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEntities: [moon]}]\n").unwrap();
    let err = load_path(p).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("c.yaml: document 1 (\"bad\"): spec.ingress[0].fromEntities[0]"),
        "{msg}"
    );
}

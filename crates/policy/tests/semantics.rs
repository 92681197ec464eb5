//! One table per semantic rule: the expected verdicts, checked on the direct evaluator and on
//! the compiled maps (which must also agree with each other on every other flow).
#![allow(clippy::unwrap_used)]

#[path = "support/helpers.rs"]
mod helpers;

use helpers::*;
use sigil_labels::Labels;
use sigil_policy::{Direction, EnforcementMode, Verdict, evaluate};

const WEB: u32 = 256; // app=web, ns prod
const DB: u32 = 257; // app=db, ns prod
const WEB_DEV: u32 = 258; // app=web, ns dev
const API: u32 = 259; // app=api, ns prod, with a SPIFFE ID
const DB_TEAM_A: u32 = 260; // app=db, ns dev, namespace label team=a
const NO_NS: u32 = 261; // app=web, no namespace label
const HOST: u32 = 1;
const WORLD: u32 = 2;
const UNMANAGED: u32 = 3;
const HEALTH: u32 = 4;
const INIT: u32 = 5;
const REMOTE_NODE: u32 = 6;
const KUBE_APISERVER: u32 = 7;
const INGRESS: u32 = 8;
const CIDR_10: u32 = (1 << 24) | 1; // 10.1.2.3/32
const CIDR_192: u32 = (1 << 24) | 2; // 192.168.1.1/32

fn world() -> Vec<(u32, Labels)> {
    vec![
        (
            WEB,
            labels("k8s:app=web,k8s:io.kubernetes.pod.namespace=prod"),
        ),
        (
            DB,
            labels("k8s:app=db,k8s:io.kubernetes.pod.namespace=prod"),
        ),
        (
            WEB_DEV,
            labels("k8s:app=web,k8s:io.kubernetes.pod.namespace=dev"),
        ),
        (
            API,
            labels(
                "k8s:app=api,k8s:io.kubernetes.pod.namespace=prod,spiffe:spiffe.io/spiffe-id=spiffe://example.org/ns/prod/sa/api",
            ),
        ),
        (
            DB_TEAM_A,
            labels(
                "k8s:app=db,k8s:io.kubernetes.pod.namespace=dev,k8s:io.cilium.k8s.namespace.labels.team=a",
            ),
        ),
        (NO_NS, labels("k8s:app=web")),
        (HOST, labels("reserved:host")),
        (WORLD, labels("reserved:world")),
        (UNMANAGED, labels("reserved:unmanaged")),
        (HEALTH, labels("reserved:health")),
        (INIT, labels("reserved:init")),
        (REMOTE_NODE, labels("reserved:remote-node")),
        (KUBE_APISERVER, labels("reserved:kube-apiserver")),
        (INGRESS, labels("reserved:ingress")),
        (CIDR_10, labels("cidr:10.1.2.3/32,reserved:world")),
        (CIDR_192, labels("cidr:192.168.1.1/32,reserved:world")),
    ]
}

const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;
const A: Verdict = Verdict::ALLOWED;
const D: Verdict = Verdict::DENIED;
const L7: Verdict = Verdict {
    allowed: true,
    l7_redirect: true,
    auth_required: false,
};
const AUTH: Verdict = Verdict {
    allowed: true,
    l7_redirect: false,
    auth_required: true,
};

/// (endpoint, direction, remote, protocol, port, expected)
type Case = (u32, Direction, u32, u8, u16, Verdict);

fn check_mode(yaml: &str, mode: EnforcementMode, cases: &[Case]) {
    let docs = docs(yaml);
    let ids = world();
    let lab = |n: u32| {
        ids.iter()
            .find(|(i, _)| *i == n)
            .map(|(_, l)| l.clone())
            .unwrap()
    };
    let engine = engine(mode, &ids, &docs);
    for &(ep, dir, remote, proto, port, want) in cases {
        let ev = evaluate(&docs, mode, &lab(ep), dir, &lab(remote), proto, port);
        assert_eq!(
            ev.verdict, want,
            "evaluator: {ep} {dir} from/to {remote} {proto}/{port}\n{yaml}"
        );
        let got = engine.lookup(id(ep), dir, id(remote), proto, port);
        assert_eq!(
            got,
            Some(want),
            "engine: {ep} {dir} from/to {remote} {proto}/{port}\n{yaml}"
        );
    }
    assert_agree(&engine, &docs, mode, &ids);
}

fn check(yaml: &str, cases: &[Case]) {
    check_mode(yaml, EnforcementMode::Default, cases);
}

fn cnp(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec:\n{spec}"
    )
}

fn ccnp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

fn np(ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n, namespace: {ns}}}\nspec:\n{spec}"
    )
}

#[test]
fn namespaced_selectors_get_the_policy_namespace() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 80, A),
            (DB, IN, WEB_DEV, TCP, 80, D),
            (DB, IN, NO_NS, TCP, 80, D),
            // The subject is limited to prod too: db in dev is not selected, so not enforced.
            (DB_TEAM_A, IN, WEB_DEV, TCP, 80, A),
        ],
    );
    // A subject naming another namespace is overridden by the policy's own.
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db, 'k8s:io.kubernetes.pod.namespace': dev}}\n  ingress: [{}]\n",
    );
    check(
        &y,
        &[(DB, IN, WEB, TCP, 80, D), (DB_TEAM_A, IN, WEB, TCP, 80, A)],
    );
}

#[test]
fn a_selector_naming_a_namespace_keeps_it() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web, io.kubernetes.pod.namespace: dev}}]\n",
    );
    check(
        &y,
        &[(DB, IN, WEB_DEV, TCP, 80, A), (DB, IN, WEB, TCP, 80, D)],
    );
    // Selecting namespace labels also crosses namespaces.
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.team: a}}]\n",
    );
    check(
        &y,
        &[(DB, IN, DB_TEAM_A, TCP, 80, A), (DB, IN, WEB, TCP, 80, D)],
    );
    // Reserved labels are never scoped.
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {'reserved:host': ''}}]\n",
    );
    check(&y, &[(DB, IN, HOST, TCP, 80, A), (DB, IN, WEB, TCP, 80, D)]);
}

#[test]
fn clusterwide_empty_peer_selector_means_any_pod_with_a_namespace() {
    let y = ccnp(
        "c",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 80, A),
            (DB, IN, WEB_DEV, TCP, 80, A),
            (DB_TEAM_A, IN, WEB, TCP, 80, A),
            (DB, IN, NO_NS, TCP, 80, D),
            (DB, IN, WORLD, TCP, 80, D),
            (DB, IN, HOST, TCP, 80, D),
        ],
    );
}

#[test]
fn network_policy_namespace_selector_uses_namespace_labels() {
    let y = np(
        "prod",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: a}}}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, DB_TEAM_A, TCP, 80, A),
            (DB, IN, WEB, TCP, 80, D),
            (DB, IN, WEB_DEV, TCP, 80, D),
        ],
    );
    let y = np(
        "prod",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{namespaceSelector: {}}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB_DEV, TCP, 80, A),
            (DB, IN, WEB, TCP, 80, A),
            (DB, IN, NO_NS, TCP, 80, D),
            (DB, IN, WORLD, TCP, 80, D),
        ],
    );
    // podSelector and namespaceSelector in one peer: both must hold.
    let y = np(
        "prod",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchLabels: {app: web}}}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, DB_TEAM_A, TCP, 80, D),
            (DB, IN, WEB_DEV, TCP, 80, D),
        ],
    );
    // podSelector alone: the policy's namespace.
    let y = np(
        "prod",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 5432, A),
            (DB, IN, WEB, UDP, 5432, D),
            (DB, IN, WEB, TCP, 80, D),
            (DB, IN, WEB_DEV, TCP, 5432, D),
        ],
    );
}

#[test]
fn default_deny_per_direction_once_selected() {
    // Ingress section only: ingress enforced, egress open.
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 80, D),
            (DB, IN, API, TCP, 80, A),
            (DB, OUT, WEB, TCP, 80, A),
            (WEB, IN, DB, TCP, 80, A),
        ],
    );
    // A deny section alone also enforces the direction.
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  egressDeny:\n  - toEntities: [world]\n",
    );
    check(
        &y,
        &[
            (DB, OUT, WORLD, TCP, 80, D),
            (DB, OUT, WEB, TCP, 80, D),
            (DB, IN, WEB, TCP, 80, A),
        ],
    );
}

#[test]
fn enable_default_deny_false_keeps_the_direction_open() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  enableDefaultDeny: {ingress: false}\n  ingressDeny:\n  - fromEntities: [world]\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET}]}}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB_DEV, TCP, 443, A),
            (DB, IN, WORLD, TCP, 443, D),
            (DB, IN, CIDR_10, TCP, 443, D),
            (DB, IN, WEB, TCP, 80, L7),
            (DB, IN, WEB_DEV, TCP, 80, A),
        ],
    );
    // Another policy asking for default deny wins.
    let y2 = format!(
        "{y}---\n{}",
        ccnp(
            "dd",
            "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{}]\n"
        )
    );
    check(
        &y2,
        &[(DB, IN, WEB_DEV, TCP, 443, D), (DB, IN, WEB, TCP, 80, L7)],
    );
    // Explicitly enabled without a section.
    let y3 = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  enableDefaultDeny: {egress: true}\n  ingress: []\n",
    );
    check(
        &y3,
        &[(DB, OUT, WEB, TCP, 80, D), (DB, IN, WEB, TCP, 80, A)],
    );
}

#[test]
fn cilium_empty_ingress_rule_allows_nothing() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 80, D),
            (DB, IN, WORLD, TCP, 80, D),
            (DB, IN, HOST, ICMP, 0, D),
        ],
    );
    // An explicitly empty peer list selects nobody, even with ports.
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: []\n    toPorts: [{ports: [{port: '80'}]}]\n",
    );
    check(&y, &[(DB, IN, WEB, TCP, 80, D)]);
    // No peers but ports: every peer on those ports.
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - toPorts: [{ports: [{port: '80'}]}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WORLD, TCP, 80, A),
            (DB, IN, WEB_DEV, UDP, 80, A),
            (DB, IN, WEB, TCP, 81, D),
        ],
    );
}

#[test]
fn network_policy_empty_rule_allows_everything() {
    let y = np(
        "prod",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 80, A),
            (DB, IN, WORLD, UDP, 53, A),
            (DB, IN, CIDR_10, ICMP, 0, A),
            (DB, IN, HOST, TCP, 1, A),
        ],
    );
    // No rules at all: default deny on ingress (policyTypes defaults to Ingress).
    let y = np("prod", "  podSelector: {matchLabels: {app: db}}\n");
    check(&y, &[(DB, IN, WEB, TCP, 80, D), (DB, OUT, WEB, TCP, 80, A)]);
    // policyTypes Egress only: the ingress rules are ignored, egress is denied.
    let y = np(
        "prod",
        "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n",
    );
    check(
        &y,
        &[
            (DB, OUT, WEB, TCP, 80, D),
            (DB, IN, WORLD, TCP, 80, A),
            (WEB_DEV, OUT, WEB, TCP, 80, A),
        ],
    );
}

#[test]
fn deny_beats_allow_across_policies_and_kinds() {
    let allow = np(
        "prod",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{}]\n",
    );
    let deny = ccnp(
        "deny-web",
        "  endpointSelector: {}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n",
    );
    let y = format!("{allow}---\n{deny}");
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 80, D),
            (DB, IN, WEB, TCP, 81, A),
            (DB, IN, WEB_DEV, TCP, 80, D),
            (DB, IN, API, TCP, 80, A),
        ],
    );
    // An L4-only deny against an L3 allow and an L7 allow.
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n  - fromEndpoints: [{matchLabels: {app: api}}]\n    toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{}]}}]\n  ingressDeny:\n  - toPorts: [{ports: [{port: '8080', protocol: TCP}]}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 8080, D),
            (DB, IN, API, TCP, 8080, D),
            (DB, IN, WEB, TCP, 8081, A),
            (DB, IN, WEB, ICMP, 0, A),
        ],
    );
}

#[test]
fn cidr_rules_never_match_label_identities() {
    let y = ccnp(
        "c",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromCIDR: [0.0.0.0/0]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 80, D),
            (DB, IN, HOST, TCP, 80, D),
            (DB, IN, WORLD, TCP, 80, A),
            (DB, IN, CIDR_10, TCP, 80, A),
            (DB, IN, CIDR_192, TCP, 80, A),
        ],
    );
    let y = ccnp(
        "c",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromCIDR: [10.0.0.0/8]\n",
    );
    check(
        &y,
        &[
            (DB, IN, CIDR_10, TCP, 80, A),
            (DB, IN, CIDR_192, TCP, 80, D),
            (DB, IN, WORLD, TCP, 80, D),
        ],
    );
    let y = ccnp(
        "c",
        "  endpointSelector: {matchLabels: {app: db}}\n  egress:\n  - toCIDRSet: [{cidr: 0.0.0.0/0, except: [192.168.0.0/16]}]\n",
    );
    check(
        &y,
        &[
            (DB, OUT, CIDR_10, TCP, 80, A),
            (DB, OUT, CIDR_192, TCP, 80, D),
            (DB, OUT, WORLD, TCP, 80, D),
            (DB, OUT, WEB, TCP, 80, D),
        ],
    );
    let y = np(
        "prod",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}}]\n",
    );
    check(
        &y,
        &[(DB, IN, CIDR_10, TCP, 80, A), (DB, IN, WEB, TCP, 80, D)],
    );
}

#[test]
fn entities_select_their_identities() {
    let all_remotes = [
        WEB,
        DB,
        WEB_DEV,
        API,
        DB_TEAM_A,
        NO_NS,
        HOST,
        WORLD,
        UNMANAGED,
        HEALTH,
        INIT,
        REMOTE_NODE,
        KUBE_APISERVER,
        INGRESS,
        CIDR_10,
        CIDR_192,
    ];
    let labelled = [WEB, DB, WEB_DEV, API, DB_TEAM_A, NO_NS];
    let table: Vec<(&str, Vec<u32>)> = vec![
        ("host", vec![HOST]),
        ("remote-node", vec![REMOTE_NODE]),
        ("kube-apiserver", vec![KUBE_APISERVER]),
        ("ingress", vec![INGRESS]),
        ("init", vec![INIT]),
        ("health", vec![HEALTH]),
        ("unmanaged", vec![UNMANAGED]),
        ("world", vec![WORLD, CIDR_10, CIDR_192]),
        ("none", vec![]),
        (
            "cluster",
            labelled
                .iter()
                .copied()
                .chain([
                    HOST,
                    UNMANAGED,
                    HEALTH,
                    INIT,
                    REMOTE_NODE,
                    KUBE_APISERVER,
                    INGRESS,
                ])
                .collect(),
        ),
        ("all", all_remotes.to_vec()),
    ];
    for (entity, members) in table {
        let y = ccnp(
            "e",
            &format!(
                "  endpointSelector: {{matchLabels: {{app: db}}}}\n  ingress:\n  - fromEntities: [{entity}]\n"
            ),
        );
        let cases: Vec<Case> = all_remotes
            .iter()
            .map(|&r| (DB, IN, r, TCP, 80, if members.contains(&r) { A } else { D }))
            .collect();
        check(&y, &cases);
    }
}

#[test]
fn enforcement_modes() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n  enableDefaultDeny: {ingress: false}\n",
    );
    check_mode(
        &y,
        EnforcementMode::Default,
        &[
            (DB, IN, WEB, TCP, 80, D),
            (DB, IN, API, TCP, 80, A),
            (WEB, IN, DB, TCP, 80, A),
        ],
    );
    check_mode(
        &y,
        EnforcementMode::Always,
        &[
            (DB, IN, WEB, TCP, 80, D),
            (DB, IN, API, TCP, 80, D),
            (WEB, IN, DB, TCP, 80, D),
            (WEB, OUT, DB, TCP, 80, D),
        ],
    );
    check_mode(
        &y,
        EnforcementMode::Never,
        &[
            (DB, IN, WEB, TCP, 80, A),
            (DB, IN, API, TCP, 80, A),
            (WEB, OUT, DB, TCP, 80, A),
        ],
    );
}

#[test]
fn l7_and_authentication_flags() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET, path: /api}]}}]\n  - fromEndpoints: [{matchLabels: {app: api}}]\n    authentication: {mode: required}\n  - fromEndpoints: [{matchLabels: {app: api}}]\n    toPorts: [{ports: [{port: '53', protocol: ANY}], rules: {dns: [{matchPattern: '*'}]}}]\n",
    );
    let both = Verdict {
        allowed: true,
        l7_redirect: true,
        auth_required: true,
    };
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 80, L7),
            (DB, IN, WEB, TCP, 81, D),
            (DB, IN, API, TCP, 80, AUTH),
            (DB, IN, API, UDP, 53, both),
            (DB, IN, API, ICMP, 0, AUTH),
        ],
    );
}

#[test]
fn port_ranges_protocols_and_port_zero() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '1000', endPort: 2000, protocol: TCP}, {port: '53', protocol: ANY}, {port: '0', protocol: SCTP}]}]\n  - fromEndpoints: [{matchLabels: {app: api}}]\n",
    );
    check(
        &y,
        &[
            (DB, IN, WEB, TCP, 999, D),
            (DB, IN, WEB, TCP, 1000, A),
            (DB, IN, WEB, TCP, 1500, A),
            (DB, IN, WEB, TCP, 2000, A),
            (DB, IN, WEB, TCP, 2001, D),
            (DB, IN, WEB, UDP, 1500, D),
            (DB, IN, WEB, UDP, 53, A),
            (DB, IN, WEB, SCTP, 53, A),
            (DB, IN, WEB, TCP, 53, A),
            (DB, IN, WEB, ICMP, 53, D),
            (DB, IN, WEB, SCTP, 9, A),
            (DB, IN, API, ICMP, 0, A),
            (DB, IN, API, UDP, 9, A),
        ],
    );
}

#[test]
fn spiffe_ids_are_selectable() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {spiffe.io/spiffe-id: 'spiffe://example.org/ns/prod/sa/api'}}]\n",
    );
    check(&y, &[(DB, IN, API, TCP, 80, A), (DB, IN, WEB, TCP, 80, D)]);
}

#[test]
fn egress_rules_and_fqdns() {
    let y = cnp(
        "prod",
        "  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: db}}]\n    toPorts: [{ports: [{port: '5432', protocol: TCP}]}]\n  - toFQDNs: [{matchName: example.com}]\n    toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n",
    );
    // FQDN peers are stored but select no identity yet.
    check(
        &y,
        &[
            (WEB, OUT, DB, TCP, 5432, A),
            (WEB, OUT, DB, TCP, 443, D),
            (WEB, OUT, WORLD, TCP, 443, D),
            (WEB, IN, DB, TCP, 5432, A),
        ],
    );
}

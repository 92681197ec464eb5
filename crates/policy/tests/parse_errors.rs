//! One fixture per validation rule: each breaks exactly one rule and the error must name the
//! document (index and name), the field path and the offending value.
#![allow(clippy::unwrap_used, clippy::useless_format)] // format! keeps every fixture in one shape

use sigil_policy::{PolicyError, Problem, parse_documents, parse_str};

fn cnp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: prod\nspec:\n{spec}"
    )
}

fn np(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: prod\nspec:\n{spec}"
    )
}

/// Parses `yaml`, expects exactly one document error and checks its parts.
fn expect(yaml: &str, index: usize, name: Option<&str>, path: &str, needle: &str) {
    let err = parse_str(yaml).expect_err("expected an error");
    let errs = err.document_errors();
    assert_eq!(errs.len(), 1, "{err}");
    let e = &errs[0];
    assert_eq!(e.index, index, "{err}");
    assert_eq!(e.name.as_deref(), name, "{err}");
    assert_eq!(e.path, path, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    assert!(msg.contains(path), "message {msg:?} lacks the path");
    if let Some(n) = name {
        assert!(msg.contains(n), "message {msg:?} lacks the name");
    }
}

const SEL: &str = "  endpointSelector: {matchLabels: {app: web}}\n";

#[test]
fn cilium_field_errors() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{SEL}  ingress:\n  - toPorts:\n    - ports:\n      - port: '99999'\n"),
            "spec.ingress[0].toPorts[0].ports[0].port",
            "\"99999\": out of range",
        ),
        (
            format!("{SEL}  ingress:\n  - toPorts:\n    - ports:\n      - port: 70000\n"),
            "spec.ingress[0].toPorts[0].ports[0].port",
            "70000",
        ),
        (
            format!("{SEL}  ingress:\n  - toPorts:\n    - ports:\n      - port: http\n"),
            "spec.ingress[0].toPorts[0].ports[0].port",
            "named port \"http\"",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - toPorts:\n    - ports:\n      - {{port: '80', protocol: HTTP}}\n"
            ),
            "spec.ingress[0].toPorts[0].ports[0].protocol",
            "\"HTTP\"",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - toPorts:\n    - ports:\n      - {{port: '80', endPort: 79}}\n"
            ),
            "spec.ingress[0].toPorts[0].ports[0].endPort",
            "79: endPort must not be below port 80",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - toPorts:\n    - ports:\n      - {{port: '0', endPort: 90}}\n"
            ),
            "spec.ingress[0].toPorts[0].ports[0].endPort",
            "needs a non-zero port",
        ),
        (
            format!("{SEL}  ingress:\n  - fromEndpoint: [{{}}]\n"),
            "spec.ingress[0].fromEndpoint",
            "unknown field \"fromEndpoint\"",
        ),
        (
            format!("{SEL}  ingress:\n  - fromCIDR: ['10.0.0.0/33']\n"),
            "spec.ingress[0].fromCIDR[0]",
            "\"10.0.0.0/33\"",
        ),
        (
            format!(
                "{SEL}  egress:\n  - toCIDRSet:\n    - {{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}\n"
            ),
            "spec.egress[0].toCIDRSet[0].except[0]",
            "\"192.168.0.0/16\": except must lie inside cidr 10.0.0.0/8",
        ),
        (
            format!("{SEL}  egress:\n  - toEntities: [everything]\n"),
            "spec.egress[0].toEntities[0]",
            "\"everything\": unknown entity",
        ),
        (
            format!(
                "  endpointSelector:\n    matchExpressions:\n    - {{key: app, operator: Like, values: [a]}}\n  ingress: [{{}}]\n"
            ),
            "spec.endpointSelector.matchExpressions[0].operator",
            "\"Like\"",
        ),
        (
            format!(
                "  endpointSelector:\n    matchExpressions:\n    - {{key: app, operator: In}}\n  ingress: [{{}}]\n"
            ),
            "spec.endpointSelector.matchExpressions[0].values",
            "needs at least one value",
        ),
        (
            format!(
                "  endpointSelector:\n    matchExpressions:\n    - {{key: app, operator: Exists, values: [a]}}\n  ingress: [{{}}]\n"
            ),
            "spec.endpointSelector.matchExpressions[0].values",
            "takes no values",
        ),
        (
            format!(
                "  endpointSelector:\n    matchLabels:\n      'bad key!': x\n  ingress: [{{}}]\n"
            ),
            "spec.endpointSelector.matchLabels.bad key!",
            "\"bad key!\"",
        ),
        (
            format!("  endpointSelector:\n    matchLabels:\n      app: 3.5\n  ingress: [{{}}]\n"),
            "spec.endpointSelector.matchLabels.app",
            "expected a string, found 3.5",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - fromEntities: [world]\n    authentication: {{mode: sometimes}}\n"
            ),
            "spec.ingress[0].authentication.mode",
            "\"sometimes\"",
        ),
        (
            format!("{SEL}  ingress: [{{}}]\n  enableDefaultDeny: {{ingress: 'no'}}\n"),
            "spec.enableDefaultDeny.ingress",
            "expected true or false, found \"no\"",
        ),
        (
            "  ingress: [{}]\n".to_owned(),
            "spec.endpointSelector",
            "missing required field",
        ),
        (
            format!("{SEL}  description: hello\n"),
            "spec",
            "needs at least one of ingress, ingressDeny, egress, egressDeny",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - toPorts:\n    - ports: [{{port: '0', protocol: TCP}}]\n      rules: {{http: [{{}}]}}\n"
            ),
            "spec.ingress[0].toPorts[0].rules",
            "L7 rules need a specific port",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - toPorts:\n    - ports: [{{port: '80', protocol: UDP}}]\n      rules: {{http: [{{}}]}}\n"
            ),
            "spec.ingress[0].toPorts[0].rules",
            "need protocol TCP",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - toPorts:\n    - ports: [{{port: '80', endPort: 90, protocol: TCP}}]\n      rules: {{http: [{{}}]}}\n"
            ),
            "spec.ingress[0].toPorts[0].rules",
            "single port",
        ),
        (
            format!(
                "{SEL}  ingressDeny:\n  - toPorts:\n    - ports: [{{port: '80'}}]\n      rules: {{http: [{{}}]}}\n"
            ),
            "spec.ingressDeny[0].toPorts[0].rules",
            "deny rules take no L7 rules",
        ),
        (
            format!("{SEL}  egressDeny:\n  - toFQDNs: [{{matchName: a.com}}]\n"),
            "spec.egressDeny[0].toFQDNs",
            "not supported",
        ),
        (
            "  nodeSelector: {}\n  ingress: [{}]\n".to_owned(),
            "spec.nodeSelector",
            "host policies",
        ),
        (
            format!("{SEL}  egress:\n  - toServices: [{{k8sService: {{serviceName: x}}}}]\n"),
            "spec.egress[0].toServices",
            "not supported",
        ),
        (
            format!("{SEL}  egress:\n  - toFQDNs: [{{}}]\n"),
            "spec.egress[0].toFQDNs[0]",
            "needs matchName or matchPattern",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - toPorts:\n    - ports: [{{port: '80', protocol: TCP}}]\n      rules: {{http: [{{method: GET, verb: x}}]}}\n"
            ),
            "spec.ingress[0].toPorts[0].rules.http[0].verb",
            "unknown field \"verb\"",
        ),
        (
            format!(
                "{SEL}  ingress:\n  - toPorts:\n    - ports: [{{port: '9092', protocol: TCP}}]\n      rules: {{kafka: [{{role: destroy}}]}}\n"
            ),
            "spec.ingress[0].toPorts[0].rules.kafka[0].role",
            "\"destroy\"",
        ),
        (
            format!("{SEL}  ingress: {{fromEntities: [world]}}\n"),
            "spec.ingress",
            "expected a list",
        ),
    ];
    for (spec, path, needle) in cases {
        let yaml = cnp("pol-a", &spec);
        expect(&yaml, 1, Some("pol-a"), path, needle);
    }
}

#[test]
fn network_policy_field_errors() {
    let cases: Vec<(&str, &str, &str)> = vec![
        (
            "  ingress: [{}]\n",
            "spec.podSelector",
            "missing required field",
        ),
        (
            "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8}\n      podSelector: {}\n",
            "spec.ingress[0].from[0]",
            "ipBlock cannot be combined",
        ),
        (
            "  podSelector: {}\n  ingress:\n  - from: [{}]\n",
            "spec.ingress[0].from[0]",
            "a peer needs podSelector",
        ),
        (
            "  podSelector: {}\n  policyTypes: [Inbound]\n",
            "spec.policyTypes[0]",
            "\"Inbound\": expected Ingress or Egress",
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{protocol: ANY, port: 80}]\n",
            "spec.ingress[0].ports[0].protocol",
            "\"ANY\"",
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{port: http}]\n",
            "spec.ingress[0].ports[0].port",
            "named port",
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{endPort: 90}]\n",
            "spec.ingress[0].ports[0].endPort",
            "non-zero port",
        ),
        (
            "  podSelector: {}\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/4]}\n",
            "spec.egress[0].to[0].ipBlock.except[0]",
            "must lie inside",
        ),
        (
            "  podSelector: {}\n  ingress:\n  - fromEndpoints: []\n",
            "spec.ingress[0].fromEndpoints",
            "unknown field",
        ),
        (
            "  podSelector: {matchLabels: {'k8s:app': x}}\n",
            "spec.podSelector.matchLabels.k8s:app",
            "invalid character ':'",
        ),
    ];
    for (spec, path, needle) in cases {
        expect(&np("np-a", spec), 1, Some("np-a"), path, needle);
    }
    let specs = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {podSelector: {}}\nspecs: []\n";
    expect(specs, 1, Some("x"), "specs", "unknown field");
}

#[test]
fn document_level_errors() {
    expect(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
        1,
        Some("p"),
        "kind",
        "\"Pod\": unsupported kind",
    );
    expect(
        "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {}\n",
        1,
        Some("p"),
        "apiVersion",
        "needs apiVersion cilium.io/v2",
    );
    expect(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {namespace: a}\nspec: {}\n",
        1,
        None,
        "metadata.name",
        "missing required field",
    );
    expect(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: Bad_Name}\nspec: {}\n",
        1,
        Some("Bad_Name"),
        "metadata.name",
        "DNS subdomain",
    );
    expect(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a, namespace: 'x.y'}\nspec: {}\n",
        1,
        Some("a"),
        "metadata.namespace",
        "\"x.y\"",
    );
    expect(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\n",
        1,
        Some("a"),
        "spec",
        "missing",
    );
    expect(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspecs: []\n",
        1,
        Some("a"),
        "specs",
        "at least one rule",
    );
    expect(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspex: {}\n",
        1,
        Some("a"),
        "spex",
        "unknown field \"spex\"",
    );
    expect("- a\n- b\n", 1, None, "", "expected an object");
    // The path of a rule inside specs.
    let y = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: cw}\nspecs:\n- endpointSelector: {}\n  ingress: [{}]\n- endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: '-1'}]}]\n";
    expect(
        y,
        1,
        Some("cw"),
        "specs[1].egress[0].toPorts[0].ports[0].port",
        "\"-1\"",
    );
}

#[test]
fn one_bad_document_rejects_the_whole_import() {
    let good = cnp("good", &format!("{SEL}  ingress: [{{}}]\n"));
    let bad = cnp(
        "bad",
        &format!("{SEL}  ingress:\n  - fromEntities: [moon]\n"),
    );
    let worse = cnp("worse", &format!("{SEL}  egress:\n  - toCIDR: [nope]\n"));
    let text = format!(
        "{good}---\n{bad}---\n{good2}---\n{worse}",
        good2 = good.replace("good", "good2")
    );
    let err = parse_documents(&text, "policies.yaml").unwrap_err();
    let errs = err.document_errors();
    assert_eq!(errs.len(), 2, "{err}");
    assert_eq!((errs[0].index, errs[0].name.as_deref()), (2, Some("bad")));
    assert_eq!((errs[1].index, errs[1].name.as_deref()), (4, Some("worse")));
    assert!(
        err.to_string()
            .starts_with("policies.yaml: document 2 (\"bad\"): spec.ingress[0].fromEntities[0]")
    );
    assert!(
        matches!(errs[1].problem, Problem::InvalidValue { ref value, .. } if value == "\"nope\"")
    );
}

#[test]
fn yaml_syntax_and_duplicates() {
    let err = parse_documents("a: [\n", "x.yaml").unwrap_err();
    assert!(
        matches!(err, PolicyError::Yaml { ref origin, .. } if origin == "x.yaml"),
        "{err}"
    );
    let one = cnp("same", &format!("{SEL}  ingress: [{{}}]\n"));
    let err = parse_str(&format!("{one}---\n{one}")).unwrap_err();
    assert!(matches!(err, PolicyError::Duplicate { .. }), "{err}");
    assert!(
        err.to_string().contains("CiliumNetworkPolicy/prod/same"),
        "{err}"
    );
    // Same name in another namespace or kind is a different policy.
    let other = one.replace("namespace: prod", "namespace: dev");
    assert_eq!(parse_str(&format!("{one}---\n{other}")).unwrap().len(), 2);
}

#[test]
fn accepted_inputs() {
    // Ports as numbers or strings; both spec and specs; empty documents skipped; metadata
    // extras ignored; TLS and serverNames stored.
    let y = format!(
        "---\n---\n{}\nspecs:\n- endpointSelector: {{}}\n  egress: [{{toEntities: [world]}}]\n",
        cnp(
            "a",
            &format!("{SEL}  ingress:\n  - toPorts:\n    - ports: [{{port: 80, protocol: TCP}}, {{port: '443', protocol: TCP}}]\n      serverNames: [a.example]\n      terminatingTLS: {{secret: {{name: s}}}}\n      rules: {{http: [{{method: GET, path: /x, headers: ['X-A: 1'], headerMatches: [{{name: X-B, value: b, mismatch: LOG}}]}}]}}\n")
        )
        .replace("  namespace: prod\n", "  namespace: prod\n  labels: {a: b}\n  uid: 1234\n")
    );
    let docs = parse_str(&y).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].index, 1);
    assert_eq!(docs[0].rules.len(), 2);
    assert_eq!(docs[0].rules[1].path, "specs[0]");
}

#[test]
fn yaml_scalars_follow_yaml_1_2() {
    // `n`, `no`, `on` are strings (not YAML 1.1 booleans); label values may be unquoted
    // integers or booleans.
    let y = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: n, namespace: on}\nspec:\n  endpointSelector: {matchLabels: {version: 2, canary: true, tier: no}}\n  ingress: [{}]\n";
    let d = parse_str(y).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d[0].id.name, "n");
    assert_eq!(d[0].id.namespace.as_deref(), Some("on"));
    let text = d[0].rules[0].subject.to_string();
    for want in [
        "any:version in (2)",
        "any:canary in (true)",
        "any:tier in (no)",
    ] {
        assert!(text.contains(want), "{text} lacks {want}");
    }
    // A YAML 1.1 boolean where a boolean is required is refused with the value.
    let y = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n  enableDefaultDeny: {ingress: no}\n";
    expect(
        y,
        1,
        Some("a"),
        "spec.enableDefaultDeny.ingress",
        "found \"no\"",
    );
    // Duplicate keys are an error of the whole input.
    let y = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nmetadata: {name: b}\nspec: {}\n";
    assert!(matches!(parse_str(y), Err(PolicyError::Yaml { .. })));
}

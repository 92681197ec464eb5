//! Derivation of SPIFFE IDs and entry selectors in each mode, and the refusal of bad modes, templates
//! and endpoint values by field and value.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::*;

fn ep(name: &str, ns: &str, sa: &str, labels: &[&str]) -> EndpointRecord {
    EndpointRecord {
        name: name.into(),
        namespace: ns.into(),
        pod_labels: labels.iter().map(|s| s.to_string()).collect(),
        spiffe_id: None,
        service_account: sa.into(),
        uid: "0b3c0c9e-1111-4222-8333-444455556666".into(),
        spiffe_source: Default::default(),
        svid_expires_at: None,
        classic_identity: None,
        identity: 0,
        cluster_pending: false,
        ipv4: Ipv4Addr::new(10, 0, 0, 2),
        ipv6: Ipv6Addr::LOCALHOST,
        host_index: 2,
        endpoint_id: 7,
        host_interface: "lxc0".into(),
        netns_name: "n".into(),
        netns_path: PathBuf::from("/run/netns/n"),
        interface: "eth0".into(),
    }
}

fn deriver(mode: &str, template: Option<&str>) -> Deriver {
    Deriver {
        mode: SpiffeIdMode::parse(mode, template).expect("mode"),
        trust_domain: TrustDomain::parse("example.org").expect("td"),
        cluster: "east".into(),
    }
}

fn sels(d: &Derived) -> Vec<String> {
    d.selectors.iter().map(ToString::to_string).collect()
}

fn derive(d: &Deriver, e: &EndpointRecord, n: Option<u32>) -> Derived {
    d.derive(e, n).expect("derive").expect("derived mode")
}

#[test]
fn registered_mode_derives_nothing() {
    let d = deriver("registered", None);
    assert!(!d.mode.is_derived());
    assert_eq!(
        d.derive(&ep("a", "default", "web", &[]), Some(300)),
        Ok(None)
    );
}

#[test]
fn istio_is_namespace_and_service_account() {
    let d = deriver("istio", None);
    let got = derive(
        &d,
        &ep("a", "prod", "web", &["app=web", "tier=fe"]),
        Some(300),
    );
    assert_eq!(
        got.spiffe_id.to_string(),
        "spiffe://example.org/ns/prod/sa/web"
    );
    assert_eq!(sels(&got), ["k8s:ns:prod", "k8s:sa:web"]);
    // Labels, name and identity do not change it: one entry serves every pod of the account.
    let other = derive(&d, &ep("b", "prod", "web", &["app=x"]), Some(301));
    assert_eq!(other, got);
}

#[test]
fn opaque_is_the_classic_identity_and_its_labels() {
    let d = deriver("opaque", None);
    let got = derive(
        &d,
        &ep("a", "default", "web", &["app=web", "k8s:tier=fe"]),
        Some(4321),
    );
    assert_eq!(
        got.spiffe_id.to_string(),
        "spiffe://example.org/identity/4321"
    );
    assert_eq!(
        sels(&got),
        [
            "k8s:ns:default",
            "k8s:pod-label:app:web",
            "k8s:pod-label:tier:fe"
        ]
    );
    // The service account is not an identity label, so it is not a selector.
    let other_sa = derive(
        &d,
        &ep("b", "default", "db", &["app=web", "tier=fe"]),
        Some(4321),
    );
    assert_eq!(other_sa, got);
}

#[test]
fn opaque_refuses_labels_no_selector_can_match_and_a_missing_identity() {
    let d = deriver("opaque", None);
    let e = d
        .derive(&ep("a", "default", "web", &["spiffe:x=y"]), Some(300))
        .expect_err("spiffe label");
    let text = e.to_string();
    assert!(
        text.contains("endpoint \"a\"") && text.contains("labels") && text.contains("spiffe:x=y"),
        "{text}"
    );
    let e = d
        .derive(&ep("a", "default", "web", &["app=web"]), None)
        .expect_err("no identity");
    assert!(e.to_string().contains("no numeric identity"), "{e}");
}

#[test]
fn verbose_default_template() {
    let d = deriver("verbose", None);
    let got = derive(&d, &ep("a", "default", "web", &["app=shop", "v=2"]), None);
    assert_eq!(
        got.spiffe_id.to_string(),
        "spiffe://example.org/cluster/east/ns/default/sa/web/app/shop"
    );
    assert_eq!(
        sels(&got),
        ["k8s:ns:default", "k8s:pod-label:app:shop", "k8s:sa:web"]
    );
}

#[test]
fn verbose_selectors_follow_the_placeholders_used() {
    let d = deriver("verbose", Some("/{cluster}/app/{app}"));
    let got = derive(&d, &ep("a", "ns1", "web", &["app=shop"]), None);
    assert_eq!(
        got.spiffe_id.to_string(),
        "spiffe://example.org/east/app/shop"
    );
    // No namespace in the ID, so none in the selectors: every namespace's `shop` shares it.
    assert_eq!(sels(&got), ["k8s:pod-label:app:shop"]);
    let d = deriver("verbose", Some("/pods/{namespace}/{name}"));
    let got = derive(&d, &ep("db-0", "ns1", "web", &[]), None);
    assert_eq!(
        got.spiffe_id.to_string(),
        "spiffe://example.org/pods/ns1/db-0"
    );
    assert_eq!(sels(&got), ["k8s:ns:ns1", "k8s:pod-name:db-0"]);
}

#[test]
fn verbose_refuses_an_endpoint_without_the_app_label_or_with_a_value_outside_spiffe_paths() {
    let d = deriver("verbose", None);
    let e = d
        .derive(&ep("a", "default", "web", &["tier=fe"]), None)
        .expect_err("no app");
    let text = e.to_string();
    assert!(
        text.contains("endpoint \"a\"")
            && text.contains("no app label")
            && text.contains("tier=fe"),
        "{text}"
    );
    // `%` is a valid label value character nowhere, but a service account may hold what a path may not.
    let e = d
        .derive(&ep("a", "default", "Web Svc", &["app=shop"]), None)
        .expect_err("bad path");
    let text = e.to_string();
    assert!(
        text.contains("spiffe_id_template")
            && text.contains("spiffe://example.org/cluster/east/ns/default/sa/Web Svc/app/shop")
            && text.contains("not a valid SPIFFE ID"),
        "{text}"
    );
}

#[test]
fn bad_modes_and_templates_are_named_with_their_value() {
    let cases: &[(&str, Option<&str>, &str, &str)] = &[
        (
            "spire",
            None,
            "spiffe_id_mode",
            "registered, istio, opaque or verbose",
        ),
        ("Istio", None, "spiffe_id_mode", "registered, istio"),
        (
            "istio",
            Some("/{namespace}"),
            "spiffe_id_template",
            "only used with spiffe_id_mode verbose",
        ),
        (
            "verbose",
            Some("/ns/{nmespace}"),
            "spiffe_id_template",
            "unknown placeholder {nmespace}",
        ),
        (
            "verbose",
            Some("/ns/{namespace"),
            "spiffe_id_template",
            "unclosed '{'",
        ),
        (
            "verbose",
            Some("/ns/namespace}"),
            "spiffe_id_template",
            "unmatched '}'",
        ),
        (
            "verbose",
            Some("/ns/{{namespace}}"),
            "spiffe_id_template",
            "unclosed '{'",
        ),
        (
            "verbose",
            Some("/cluster/{cluster}"),
            "spiffe_id_template",
            "uses no endpoint attribute",
        ),
        (
            "verbose",
            Some("ns/{namespace}"),
            "spiffe_id_template",
            "valid SPIFFE ID path",
        ),
        (
            "verbose",
            Some("/ns//{namespace}"),
            "spiffe_id_template",
            "valid SPIFFE ID path",
        ),
        (
            "verbose",
            Some("/ns/{namespace}/"),
            "spiffe_id_template",
            "valid SPIFFE ID path",
        ),
        (
            "verbose",
            Some("/ns?/{namespace}"),
            "spiffe_id_template",
            "valid SPIFFE ID path",
        ),
        (
            "verbose",
            Some(""),
            "spiffe_id_template",
            "uses no endpoint attribute",
        ),
    ];
    for (mode, template, field, reason) in cases {
        let e = SpiffeIdMode::parse(mode, *template).expect_err(&format!("{mode} {template:?}"));
        let text = e.to_string();
        let value = template.unwrap_or(mode);
        assert!(
            text.starts_with(&format!("{field}: invalid value {value:?}: "))
                && text.contains(reason),
            "{mode} {template:?}: {text}"
        );
    }
}

#[test]
fn cluster_names_must_be_path_segments() {
    check_cluster("east-1.prod_x").expect("valid");
    for bad in ["", ".", "..", "a/b", "a b", "é"] {
        let e = check_cluster(bad).expect_err(bad);
        assert!(
            e.to_string()
                .starts_with(&format!("cluster_name: invalid value {bad:?}")),
            "{e}"
        );
    }
}

#[test]
fn the_svid_used_is_the_one_of_the_derived_id() {
    let id = SpiffeId::parse("spiffe://example.org/identity/7").expect("id");
    let offered = [
        "spiffe://example.org/identity/5",
        "spiffe://example.org/identity/7",
    ];
    assert_eq!(pick_svid(&id, offered), Some(1));
    assert_eq!(pick_svid(&id, ["spiffe://example.org/identity/5"]), None);
}

mod config {
    use std::path::Path;

    use crate::config::{Config, DEFAULT_AGENT_WORKLOAD_SOCKET, RunArgs};

    fn load(args: RunArgs) -> anyhow::Result<Config> {
        Config::from_layers(&args, |p: Option<&Path>| {
            sigil_daemon::Layers::with_env("netd", p, Default::default())
        })
    }

    fn istio() -> RunArgs {
        RunArgs {
            spiffe_id_mode: Some("istio".into()),
            trust_domain: Some("example.org".into()),
            agent_spiffe_id: Some("spiffe://example.org/sigil/agent/join_token/x".into()),
            server_address: Some("127.0.0.1:8081".into()),
            ..RunArgs::default()
        }
    }

    #[test]
    fn registered_is_the_default_and_registers_nothing() {
        let c = load(RunArgs::default()).expect("config");
        assert_eq!(c.spiffe_ids.mode.name(), "registered");
        assert!(c.spiffe_ids.registrar.is_none());
    }

    #[test]
    fn derived_modes_get_their_defaults() {
        let c = load(istio()).expect("config");
        let r = c.spiffe_ids.registrar.expect("registrar");
        assert_eq!(r.deriver.cluster, "default");
        assert_eq!(r.grace, std::time::Duration::from_secs(30));
        assert_eq!(
            r.agent_workload_socket,
            Path::new(DEFAULT_AGENT_WORKLOAD_SOCKET)
        );
        assert_eq!(
            r.agent_spiffe_id.to_string(),
            "spiffe://example.org/sigil/agent/join_token/x"
        );
    }

    #[test]
    fn bad_or_missing_values_stop_start_up_by_name_and_value() {
        let cases: Vec<(RunArgs, &str)> = vec![
            (
                RunArgs {
                    spiffe_id_mode: Some("cilium".into()),
                    ..RunArgs::default()
                },
                "spiffe_id_mode: invalid value \"cilium\": registered, istio, opaque or verbose",
            ),
            (
                RunArgs {
                    spiffe_id_mode: Some("verbose".into()),
                    spiffe_id_template: Some("/x/{pod}".into()),
                    ..istio()
                },
                "spiffe_id_template: invalid value \"/x/{pod}\": unknown placeholder {pod}",
            ),
            (
                RunArgs {
                    trust_domain: None,
                    ..istio()
                },
                "trust_domain: required with spiffe_id_mode istio",
            ),
            (
                RunArgs {
                    agent_spiffe_id: None,
                    ..istio()
                },
                "agent_spiffe_id: required with spiffe_id_mode istio",
            ),
            (
                RunArgs {
                    server_address: None,
                    ..istio()
                },
                "server_address: required with spiffe_id_mode istio",
            ),
            (
                RunArgs {
                    server_address: Some("localhost".into()),
                    ..istio()
                },
                "server_address: invalid value \"localhost\" from flag: want HOST:PORT",
            ),
            (
                RunArgs {
                    agent_spiffe_id: Some("spiffe://other.org/agent".into()),
                    ..istio()
                },
                "agent_spiffe_id: invalid value \"spiffe://other.org/agent\": not in trust_domain example.org",
            ),
            (
                RunArgs {
                    trust_domain: Some("Bad_TD".into()),
                    ..istio()
                },
                "trust_domain: invalid value \"Bad_TD\" from flag",
            ),
            (
                RunArgs {
                    cluster_name: Some("a/b".into()),
                    ..istio()
                },
                "cluster_name: invalid value \"a/b\"",
            ),
            (
                RunArgs {
                    derived_entry_grace: Some("soon".into()),
                    ..istio()
                },
                "derived_entry_grace: invalid value \"soon\" from flag",
            ),
        ];
        for (args, want) in cases {
            let e = load(args).expect_err(want);
            assert!(
                format!("{e:#}").starts_with(want),
                "want {want:?}, got {e:#}"
            );
        }
    }
}

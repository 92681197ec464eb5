//! The registrar's pure parts: which entries the endpoints need, and what a round does about the
//! entries netd owns (create, adopt, replace, delete after the grace period).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use sigil_spiffe::TrustDomain;

use super::*;
use crate::spiffe_id::SpiffeIdMode;
use crate::state::EndpointRecord;

fn ep(name: &str, ns: &str, sa: &str, labels: &[&str], identity: u32) -> EndpointRecord {
    EndpointRecord {
        name: name.into(),
        namespace: ns.into(),
        pod_labels: labels.iter().map(|s| s.to_string()).collect(),
        spiffe_id: None,
        service_account: sa.into(),
        uid: format!("uid-{name}"),
        spiffe_source: Default::default(),
        svid_expires_at: None,
        classic_identity: None,
        identity,
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

fn snap(eps: Vec<EndpointRecord>) -> Snapshot {
    let mut s = Snapshot::default();
    for e in eps {
        let mut labels: Vec<String> = e
            .labels()
            .expect("labels")
            .iter()
            .map(ToString::to_string)
            .collect();
        labels.sort();
        s.identities.insert(e.identity, labels.clone());
        s.endpoints.insert(e.name.clone(), (e, labels));
    }
    s
}

fn deriver(mode: &str, template: Option<&str>) -> Deriver {
    Deriver {
        mode: SpiffeIdMode::parse(mode, template).expect("mode"),
        trust_domain: TrustDomain::parse("example.org").expect("td"),
        cluster: "c1".into(),
    }
}

#[test]
fn one_entry_per_derived_id_whatever_the_number_of_endpoints() {
    let s = snap(vec![
        ep("a", "default", "web", &["app=web"], 300),
        ep("b", "default", "web", &["app=web", "v=2"], 301),
        ep("c", "default", "db", &["app=db"], 302),
    ]);
    let w = wanted(&s, &deriver("istio", None));
    assert!(w.errors.is_empty(), "{:?}", w.errors);
    assert_eq!(
        w.entries.into_iter().collect::<Vec<_>>(),
        [
            (
                "spiffe://example.org/ns/default/sa/db".to_string(),
                vec!["k8s:ns:default".to_string(), "k8s:sa:db".into()]
            ),
            (
                "spiffe://example.org/ns/default/sa/web".to_string(),
                vec!["k8s:ns:default".to_string(), "k8s:sa:web".into()]
            ),
        ]
    );
    assert_eq!(wanted(&s, &deriver("registered", None)), Wanted::default());
}

#[test]
fn opaque_uses_the_identity_of_the_labels_without_the_spiffe_label() {
    // b already carries a SPIFFE label: its own identity (401) is not the opaque number; the identity
    // of its labels without it (400, shared with a) is.
    let a = ep("a", "default", "web", &["app=web"], 400);
    let mut b = ep("b", "default", "web", &["app=web"], 401);
    b.spiffe_id = Some("spiffe://example.org/identity/400".into());
    let s = snap(vec![a, b]);
    let w = wanted(&s, &deriver("opaque", None));
    assert!(w.errors.is_empty(), "{:?}", w.errors);
    assert_eq!(
        w.entries.into_iter().collect::<Vec<_>>(),
        [(
            "spiffe://example.org/identity/400".to_string(),
            vec!["k8s:ns:default".to_string(), "k8s:pod-label:app:web".into()]
        )]
    );
}

#[test]
fn endpoints_that_cannot_derive_are_reported_and_get_no_entry() {
    let s = snap(vec![
        ep("ok", "default", "web", &["app=shop"], 300),
        ep("noapp", "default", "web", &["tier=x"], 301),
    ]);
    let w = wanted(&s, &deriver("verbose", None));
    assert_eq!(w.entries.len(), 1);
    assert_eq!(w.errors.len(), 1);
    assert!(
        w.errors[0].to_string().contains("endpoint \"noapp\""),
        "{}",
        w.errors[0]
    );
}

#[test]
fn colliding_verbose_ids_keep_the_first_endpoint() {
    let s = snap(vec![
        ep("a", "x-y", "web", &["app=z"], 300),
        ep("b", "x", "web", &["app=y-z"], 301),
    ]);
    let w = wanted(&s, &deriver("verbose", Some("/{namespace}-{app}")));
    assert_eq!(w.entries.len(), 1);
    assert_eq!(
        w.entries["spiffe://example.org/x-y-z"],
        ["k8s:ns:x-y", "k8s:pod-label:app:z"]
    );
    assert_eq!(w.errors.len(), 1);
    assert!(
        w.errors[0].to_string().contains("endpoint \"b\""),
        "{}",
        w.errors[0]
    );
}

fn owned(id: &str, spiffe: &str, sels: &[&str]) -> Owned {
    Owned {
        id: id.into(),
        spiffe_id: spiffe.into(),
        selectors: sels.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn plan_creates_adopts_replaces_and_deletes_after_the_grace() {
    let grace = Duration::from_secs(30);
    let t0 = Instant::now();
    let mut since = HashMap::new();
    let mut want = BTreeMap::new();
    want.insert("spiffe://td/a".to_string(), vec!["k8s:ns:a".to_string()]);
    want.insert("spiffe://td/b".to_string(), vec!["k8s:ns:b".to_string()]);
    let have = [
        owned("1", "spiffe://td/a", &["k8s:ns:a"]),    // adopted
        owned("2", "spiffe://td/a", &["k8s:ns:a"]),    // duplicate: deleted
        owned("3", "spiffe://td/b", &["k8s:ns:old"]),  // stale selectors: replaced
        owned("4", "spiffe://td/gone", &["k8s:ns:g"]), // unwanted: waits out the grace
    ];
    let p = plan(&want, &have, &mut since, t0, grace);
    assert_eq!(
        p.create,
        [("spiffe://td/b".to_string(), vec!["k8s:ns:b".to_string()])]
    );
    assert_eq!(p.delete, ["2", "3"]);
    assert_eq!(p.waiting, [("4".to_string(), t0 + grace)]);

    // Still unwanted just before the end of the grace: kept; after it: deleted.
    let have = [
        owned("1", "spiffe://td/a", &["k8s:ns:a"]),
        owned("5", "spiffe://td/b", &["k8s:ns:b"]),
        owned("4", "spiffe://td/gone", &["k8s:ns:g"]),
    ];
    let p = plan(
        &want,
        &have,
        &mut since,
        t0 + grace - Duration::from_millis(1),
        grace,
    );
    assert!(p.create.is_empty() && p.delete.is_empty(), "{p:?}");
    let p = plan(&want, &have, &mut since, t0 + grace, grace);
    assert_eq!(p.delete, ["4"]);
}

#[test]
fn an_identity_back_within_the_grace_keeps_its_entry() {
    let grace = Duration::from_secs(30);
    let t0 = Instant::now();
    let mut since = HashMap::new();
    let have = [owned("1", "spiffe://td/a", &["k8s:ns:a"])];
    let p = plan(&BTreeMap::new(), &have, &mut since, t0, grace);
    assert_eq!(p.waiting.len(), 1);
    let mut want = BTreeMap::new();
    want.insert("spiffe://td/a".to_string(), vec!["k8s:ns:a".to_string()]);
    let p = plan(
        &want,
        &have,
        &mut since,
        t0 + Duration::from_secs(10),
        grace,
    );
    assert_eq!(p, Plan::default());
    // Leaving again starts a new grace period, not the old one.
    let p = plan(
        &BTreeMap::new(),
        &have,
        &mut since,
        t0 + Duration::from_secs(40),
        grace,
    );
    assert_eq!(p.waiting, [("1".to_string(), t0 + Duration::from_secs(70))]);
}

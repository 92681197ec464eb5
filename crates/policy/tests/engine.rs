//! The compiler's own promises: the selector cache follows identities incrementally, deltas
//! touch only affected entries, port ranges become masked entries, maps are shared.
#![allow(clippy::unwrap_used)]

#[path = "support/helpers.rs"]
mod helpers;

use helpers::*;
use sigil_policy::{
    Direction, EnforcementMode, PolicyEngine, PolicyEntry, PolicyId, PolicyKey, PolicyKind, Verdict,
};

const ALLOW_WEB_TO_DB: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-db, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '5432', protocol: TCP}]}]\n";

fn web(n: u32) -> (u32, sigil_labels::Labels) {
    (
        n,
        labels(&format!(
            "k8s:app=web,k8s:io.kubernetes.pod.namespace=prod,k8s:pod-hash=h{n}"
        )),
    )
}

fn db(n: u32) -> (u32, sigil_labels::Labels) {
    (
        n,
        labels(&format!(
            "k8s:app=db,k8s:io.kubernetes.pod.namespace=prod,k8s:pod-hash=h{n}"
        )),
    )
}

fn key(
    identity: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
    port_prefix_len: u8,
) -> PolicyKey {
    PolicyKey {
        identity,
        direction,
        protocol,
        port,
        port_prefix_len,
    }
}

#[test]
fn selector_cache_follows_identities() {
    let mut e = PolicyEngine::new(EnforcementMode::Default);
    e.upsert_policies(docs(ALLOW_WEB_TO_DB));
    let cache = e.selector_cache();
    assert_eq!(cache.len(), 2, "{cache:?}");
    assert!(cache.iter().all(|(_, ids)| ids.is_empty()));

    e.add_identity(id(300), web(300).1);
    e.add_identity(id(400), db(400).1);
    let find = |e: &PolicyEngine, prefix: &str| {
        e.selector_cache()
            .into_iter()
            .find(|(k, _)| k.starts_with(prefix))
            .unwrap()
            .1
    };
    assert_eq!(find(&e, "peer:"), vec![id(300)]);
    assert_eq!(find(&e, "subject:"), vec![id(400)]);
    e.add_identity(id(301), web(301).1);
    assert_eq!(find(&e, "peer:"), vec![id(300), id(301)]);
    assert_eq!(e.selector_cache_matches(), 3);
    e.remove_identity(id(300));
    assert_eq!(find(&e, "peer:"), vec![id(301)]);

    // Selectors leave the cache with the last rule using them.
    e.delete_policy(&PolicyId::new(
        PolicyKind::CiliumNetworkPolicy,
        Some("prod"),
        "web-db",
    ));
    assert!(e.selector_cache().is_empty());
}

#[test]
fn adding_an_identity_touches_only_affected_entries() {
    let ids = vec![web(300), web(301), db(400), db(401)];
    let d = docs(ALLOW_WEB_TO_DB);
    let mut e = engine(EnforcementMode::Default, &ids, &d);
    let web_map_before = e.policy_map(id(300)).unwrap();

    let web_db = PolicyId::new(PolicyKind::CiliumNetworkPolicy, Some("prod"), "web-db");
    let deltas = e.add_identity(id(302), web(302).1);
    // Both db endpoints get exactly one new key for the new peer; the new endpoint gets its
    // map; no other endpoint is touched.
    let want = PolicyKey {
        identity: 302,
        direction: Direction::Ingress,
        protocol: TCP,
        port: 5432,
        port_prefix_len: 16,
    };
    for ep in [400, 401] {
        let c = deltas.for_endpoint(id(ep));
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].key, want);
        let new = c[0].new.unwrap();
        assert_eq!(
            e.rule_for_cookie(new.rule_cookie),
            Some((web_db.clone(), "spec.ingress[0]".to_owned()))
        );
        let allow = PolicyEntry {
            rule_cookie: new.rule_cookie,
            ..PolicyEntry::default()
        };
        assert_eq!((c[0].old, c[0].new), (None, Some(allow)));
    }
    assert!(deltas.for_endpoint(id(300)).is_empty() && deltas.for_endpoint(id(301)).is_empty());
    let new_map = deltas.for_endpoint(id(302));
    assert_eq!(new_map.len(), web_map_before.len());
    assert!(new_map.iter().all(|c| c.old.is_none()));
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(302), TCP, 5432),
        allowed()
    );
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(302), TCP, 5433),
        denied()
    );

    // An identity no selector matches: only its own map appears.
    let deltas = e.add_identity(
        id(500),
        labels("k8s:app=cache,k8s:io.kubernetes.pod.namespace=prod"),
    );
    assert_eq!(deltas.endpoints.len(), 1);
    assert_eq!(deltas.endpoints[0].endpoint, id(500));

    // Removing a peer removes exactly its keys.
    let deltas = e.remove_identity(id(302));
    for ep in [400, 401] {
        let c = deltas.for_endpoint(id(ep));
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].key, c[0].new), (want, None));
    }
    assert!(deltas.for_endpoint(id(302)).iter().all(|c| c.new.is_none()));
    assert_eq!(e.lookup(id(302), Direction::Ingress, id(400), TCP, 1), None);
}

#[test]
fn policy_changes_report_minimal_deltas() {
    let ids = vec![web(300), db(400), db(401)];
    let mut e = engine(EnforcementMode::Default, &ids, &[]);
    let mut shadow = Shadow::default();
    let mut e2 = PolicyEngine::new(EnforcementMode::Default);
    shadow.apply(&e2.add_identities(ids.iter().map(|(i, l)| (id(*i), l.clone()))));

    let deltas = e.upsert_policies(docs(ALLOW_WEB_TO_DB));
    shadow.apply(&e2.upsert_policies(docs(ALLOW_WEB_TO_DB)));
    shadow.assert_matches(&e2);
    // db endpoints: the allow-all ingress entry goes, the web entry comes; web untouched.
    for ep in [400, 401] {
        let c = deltas.for_endpoint(id(ep));
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(
            c.iter()
                .any(|c| c.key == key(0, Direction::Ingress, 0, 0, 0) && c.new.is_none())
        );
        assert!(
            c.iter()
                .any(|c| c.key == key(300, Direction::Ingress, TCP, 5432, 16) && c.old.is_none())
        );
    }
    assert!(deltas.for_endpoint(id(300)).is_empty());
    // Both db endpoints share one compiled map (and one change list).
    assert_eq!(e.distinct_maps(), 2);

    // Re-applying the same document changes nothing.
    assert!(e.upsert_policies(docs(ALLOW_WEB_TO_DB)).is_empty());

    // Changing the port changes one key per db endpoint.
    let changed = ALLOW_WEB_TO_DB.replace("5432", "5433");
    let deltas = e.upsert_policies(docs(&changed));
    shadow.apply(&e2.upsert_policies(docs(&changed)));
    assert_eq!(deltas.total_changes(), 4);
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 5433),
        allowed()
    );
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 5432),
        denied()
    );

    // Deleting restores allow-all.
    let pid = PolicyId::new(PolicyKind::CiliumNetworkPolicy, Some("prod"), "web-db");
    let deltas = e.delete_policy(&pid);
    shadow.apply(&e2.delete_policy(&pid));
    shadow.assert_matches(&e2);
    assert_eq!(deltas.total_changes(), 4);
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 1),
        allowed()
    );
    assert!(e.delete_policy(&pid).is_empty());
    assert_eq!(e.distinct_maps(), 1);
}

#[test]
fn port_ranges_become_masked_entries() {
    let y = ALLOW_WEB_TO_DB.replace("{port: '5432', protocol: TCP}", "{port: '1000', endPort: 1999, protocol: TCP}, {port: '80', endPort: 81, protocol: UDP}, {port: '0', protocol: SCTP}");
    let e = engine(EnforcementMode::Default, &[web(300), db(400)], &docs(&y));
    let map = e.policy_map(id(400)).unwrap();
    let ingress: Vec<PolicyKey> = map
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| k.direction == Direction::Ingress)
        .collect();
    // 1000..=1999 is 1000/13 1008/12 1024/7 1536/8 1792/9 1920/10 1984/12; 80..=81 is 80/15.
    let mut tcp: Vec<(u16, u8)> = ingress
        .iter()
        .filter(|k| k.protocol == TCP)
        .map(|k| (k.port, k.port_prefix_len))
        .collect();
    tcp.sort_unstable();
    assert_eq!(
        tcp,
        vec![
            (1000, 13),
            (1008, 12),
            (1024, 7),
            (1536, 8),
            (1792, 9),
            (1920, 10),
            (1984, 12)
        ]
    );
    assert!(ingress.contains(&key(300, Direction::Ingress, UDP, 80, 15)));
    assert!(ingress.contains(&key(300, Direction::Ingress, SCTP, 0, 0)));
    assert_eq!(ingress.len(), 9);
    assert_eq!(
        key(300, Direction::Ingress, UDP, 80, 15).lpm_prefix_len(),
        23
    );
    assert_eq!(key(0, Direction::Ingress, 0, 0, 0).lpm_prefix_len(), 0);
    // Egress is not enforced: one allow-all wildcard entry.
    let egress: Vec<(PolicyKey, PolicyEntry)> = map
        .iter()
        .copied()
        .filter(|(k, _)| k.direction == Direction::Egress)
        .collect();
    assert_eq!(
        egress,
        vec![(key(0, Direction::Egress, 0, 0, 0), PolicyEntry::default())]
    );
    let udp = e
        .map_entry(id(400), &key(300, Direction::Ingress, UDP, 80, 15))
        .unwrap();
    assert!(!udp.deny && !udp.l7_redirect && !udp.auth_required);
    assert_eq!(
        e.rule_for_cookie(udp.rule_cookie)
            .map(|(p, path)| (p.name, path)),
        Some(("web-db".to_owned(), "spec.ingress[0]".to_owned()))
    );
    assert_eq!(e.map_len(id(400)), 10);
}

#[test]
fn deny_and_flags_are_resolved_into_entries() {
    // A wildcard deny on a port shadows identity allows; auth on an L3 rule reaches a
    // narrower wildcard entry through the identity's own copy of that prefix.
    let y = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    authentication: {mode: required}\n  - toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n  ingressDeny:\n  - toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n";
    let e = engine(EnforcementMode::Default, &[web(300), db(400)], &docs(y));
    let auth = Verdict {
        allowed: true,
        l7_redirect: false,
        auth_required: true,
    };
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 443),
        Some(auth)
    );
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 80),
        Some(auth)
    );
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 22),
        denied()
    );
    assert_eq!(
        e.map_entry(id(400), &key(300, Direction::Ingress, TCP, 443, 16))
            .map(|v| v.auth_required),
        Some(true)
    );
}

#[test]
fn unknown_endpoints_and_identity_zero() {
    let mut e = engine(
        EnforcementMode::Default,
        &[web(300)],
        &docs(ALLOW_WEB_TO_DB),
    );
    assert_eq!(e.lookup(id(999), Direction::Ingress, id(300), TCP, 1), None);
    assert!(e.add_identity(id(0), labels("k8s:app=db")).is_empty());
    // Reserved identities other than health, init and ingress and CIDR identities have no map.
    e.add_identity(id(1), labels("reserved:host"));
    e.add_identity(id((1 << 24) | 5), labels("cidr:10.0.0.1/32,reserved:world"));
    e.add_identity(id(4), labels("reserved:health"));
    assert_eq!(e.endpoints(), vec![id(4), id(300)]);
    assert_eq!(e.identity_count(), 4);
}

#[test]
fn relabelled_identity_and_mode_changes() {
    let mut e = engine(
        EnforcementMode::Default,
        &[web(300), db(400)],
        &docs(ALLOW_WEB_TO_DB),
    );
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 5432),
        allowed()
    );
    // 300 becomes a db: it loses its entry in 400's map and gets the db map.
    e.add_identity(id(300), db(300).1);
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 5432),
        denied()
    );
    assert_eq!(e.policy_map(id(300)), e.policy_map(id(400)));

    let deltas = e.set_mode(EnforcementMode::Never);
    assert!(!deltas.is_empty());
    assert_eq!(
        e.lookup(id(400), Direction::Ingress, id(300), TCP, 5432),
        allowed()
    );
    e.set_mode(EnforcementMode::Always);
    assert_eq!(
        e.lookup(id(400), Direction::Egress, id(300), TCP, 1),
        denied()
    );
    assert_eq!(e.mode(), EnforcementMode::Always);
}

#[test]
fn engine_and_results_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<PolicyEngine>();
    shareable::<sigil_policy::PolicyDeltas>();
    shareable::<sigil_policy::Document>();
    shareable::<sigil_policy::TraceResult>();
}

#[test]
fn rule_cookies_name_the_deciding_rule() {
    // Two allows and a deny cover TCP 22 from web; the entry names the deny. The allow-only
    // port names one of the allow rules, the same one whichever policy arrives first.
    let allows = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: allows, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n  - toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n";
    let deny = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: no-ssh, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n";
    let ids = [web(300), db(400)];
    let a = engine(
        EnforcementMode::Default,
        &ids,
        &[docs(allows), docs(deny)].concat(),
    );
    let b = engine(
        EnforcementMode::Default,
        &ids,
        &[docs(deny), docs(allows)].concat(),
    );
    assert_eq!(a.policy_map(id(400)), b.policy_map(id(400)));

    let ssh = a
        .map_entry(id(400), &key(300, Direction::Ingress, TCP, 22, 16))
        .unwrap();
    assert!(ssh.deny);
    let no_ssh = PolicyId::new(PolicyKind::CiliumNetworkPolicy, Some("prod"), "no-ssh");
    assert_eq!(
        a.rule_for_cookie(ssh.rule_cookie),
        Some((no_ssh.clone(), "spec.ingressDeny[0]".to_owned()))
    );
    let any = a
        .map_entry(id(400), &key(300, Direction::Ingress, 0, 0, 0))
        .unwrap();
    assert!(!any.deny);
    assert_eq!(
        a.rule_for_cookie(any.rule_cookie)
            .map(|(p, path)| (p.name, path)),
        Some(("allows".to_owned(), "spec.ingress[0]".to_owned()))
    );
    assert_eq!(a.rule_for_cookie(0), None);

    // The cookie lives as long as its policy.
    let mut a = a;
    a.delete_policy(&no_ssh);
    assert_eq!(a.rule_for_cookie(ssh.rule_cookie), None);
    assert!(a.rule_cookies().all(|(_, p, _)| p.name == "allows"));
}

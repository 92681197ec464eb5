//! The identity-relevant label filter: Cilium's defaults and custom patterns.

use sigil_labels::{Label, LabelError, LabelFilter, Labels};

fn l(s: &str) -> Label {
    Label::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn default_filter_follows_cilium() {
    let f = LabelFilter::default();
    let kept = [
        "k8s:app=web",
        "k8s:job-name=backup",
        "k8s:app.kubernetes.io/name=web",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:io.cilium.k8s.namespace.labels.team=a",
        "k8s:io.cilium.k8s.policy.cluster=c1",
        "k8s:io.cilium.k8s.policy.serviceaccount=sa",
        "reserved:host",
        "spiffe:spiffe.io/spiffe-id=spiffe://td/web",
        "cidr:10.0.0.0/8",
        "unspec:tier=front",
    ];
    for s in kept {
        assert!(f.is_relevant(&l(s)), "{s} should be kept");
    }
    let dropped = [
        "k8s:io.kubernetes.pod.name=web-1",
        "k8s:io.kubernetes.pod.uid=123",
        "k8s:kubernetes.io/hostname=n1",
        "k8s:statefulset.kubernetes.io/pod-name=db-0",
        "k8s:apps.kubernetes.io/pod-index=0",
        "k8s:batch.kubernetes.io/job-completion-index=3",
        "k8s:batch.kubernetes.io/controller-uid=abc",
        "k8s:beta.kubernetes.io/arch=amd64",
        "k8s:k8s.io/foo=bar",
        "k8s:pod-template-generation=2",
        "k8s:pod-template-hash=5d9f",
        "k8s:controller-revision-hash=7c8",
        "k8s:annotation.foo=bar",
        "k8s:controller-uid=abc",
        "k8s:etcd_node=e1",
        "unspec:pod-template-hash=5d9f",
    ];
    for s in dropped {
        assert!(!f.is_relevant(&l(s)), "{s} should be dropped");
    }
    let all = Labels::parse_list(
        "k8s:app=web,k8s:pod-template-hash=1,k8s:io.kubernetes.pod.namespace=ns,\
         spiffe:spiffe.io/spiffe-id=spiffe://td/web",
    )
    .expect("fixture");
    let relevant = all.identity_relevant(&f);
    assert_eq!(
        relevant.sorted_string(),
        "k8s:app=web;k8s:io.kubernetes.pod.namespace=ns;spiffe:spiffe.io/spiffe-id=spiffe://td/web"
    );
    assert_eq!(all.identity_relevant(&LabelFilter::keep_all()), all);
}

#[test]
fn include_patterns_keep_only_matches() {
    let f = LabelFilter::from_patterns(&strings(&["k8s:app"]), &[]).expect("valid");
    let cases = [
        ("k8s:app=web", true),
        ("k8s:application=x", true), // prefix match, as in Cilium
        ("unspec:app=web", false),   // the pattern names a source
        ("k8s:env=prod", false),
        ("k8s:app.kubernetes.io/name=web", true), // added with any include, as in Cilium
        ("k8s:io.kubernetes.pod.namespace=ns", true), // always kept
        ("k8s:io.cilium.k8s.namespace.labels.team=a", true),
        ("reserved:world", true),
        ("spiffe:spiffe.io/spiffe-id=spiffe://td/x", true),
        ("cidr:10.0.0.0/8", true),
    ];
    for (s, want) in cases {
        assert_eq!(f.is_relevant(&l(s)), want, "{s}");
    }
}

#[test]
fn longest_pattern_wins_and_exclude_wins_ties() {
    let f = LabelFilter::from_patterns(&strings(&["app", "!app.secret"]), &[]).expect("valid");
    assert!(f.is_relevant(&l("app=x")));
    assert!(!f.is_relevant(&l("app.secret.key=x")));
    assert!(!f.is_relevant(&l("env=x")));

    let f = LabelFilter::from_patterns(
        &strings(&["io.kubernetes.custom"]),
        &strings(&["io.kubernetes"]),
    )
    .expect("valid");
    assert!(f.is_relevant(&l("io.kubernetes.custom.x=1")));
    assert!(!f.is_relevant(&l("io.kubernetes.other=1")));

    let f = LabelFilter::from_patterns(&strings(&["app"]), &strings(&["app"])).expect("valid");
    assert!(!f.is_relevant(&l("app=x")));
}

#[test]
fn exclude_pattern_spellings() {
    // With or without '!', source before or after it, Cilium's regex spellings.
    let f = LabelFilter::from_patterns(
        &strings(&["k8s:!secret", "!k8s:token"]),
        &strings(&["hash", "!annotation.*", "k8s:pod\\.name"]),
    )
    .expect("valid");
    let cases = [
        ("k8s:secret=1", false),
        ("unspec:secret=1", true),
        ("k8s:token=1", false),
        ("unspec:token=1", true),
        ("k8s:hash=1", false),
        ("k8s:hashes=1", false),
        ("k8s:annotation.x=1", false),
        ("k8s:pod.name=1", false),
        ("k8s:app=web", true), // no include pattern: everything else is kept
    ];
    for (s, want) in cases {
        assert_eq!(f.is_relevant(&l(s)), want, "{s}");
    }
    let f = LabelFilter::from_patterns(&strings(&["reserved:.*", "k8s:*"]), &strings(&["*"]))
        .expect("valid");
    assert!(f.is_relevant(&l("k8s:app=web")));
    assert!(!f.is_relevant(&l("unspec:app=web")));
}

#[test]
fn dollar_asks_for_the_exact_key() {
    let f = LabelFilter::from_patterns(
        &strings(&["k8s:app$", "k8s:name"]),
        &strings(&["name\\.x$"]),
    )
    .expect("valid");
    assert!(f.is_relevant(&l("k8s:app=web")));
    assert!(!f.is_relevant(&l("k8s:application=web")));
    assert!(f.is_relevant(&l("k8s:name.y=1")));
    assert!(!f.is_relevant(&l("k8s:name.x=1")));
    assert!(f.is_relevant(&l("k8s:name.xy=1")));
}

#[test]
fn bad_patterns_are_rejected_naming_the_pattern() {
    for bad in [
        "",
        " ",
        "!",
        "k8s:!",
        "app[0-9]+",
        "a b",
        "foo:bar",
        "(app)",
    ] {
        for (inc, exc) in [(strings(&[bad]), vec![]), (vec![], strings(&[bad]))] {
            let err = LabelFilter::from_patterns(&inc, &exc).expect_err(bad);
            assert!(
                matches!(&err, LabelError::InvalidPattern { pattern, .. } if pattern == bad),
                "{err:?}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")));
        }
    }
}

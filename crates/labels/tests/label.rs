//! Label and label-set parsing, formatting and helpers.

use std::net::IpAddr;

use proptest::prelude::*;
use sigil_labels::{Label, LabelError, Labels, SPIFFE_ID_KEY, Source, cidr_label, spiffe_label};

#[test]
fn parse_accepts_good_labels() {
    let cases: &[(&str, Source, &str, &str)] = &[
        ("app=web", Source::Unspec, "app", "web"),
        ("app", Source::Unspec, "app", ""),
        ("k8s:app=web", Source::K8s, "app", "web"),
        ("k8s:app", Source::K8s, "app", ""),
        ("k8s:app=", Source::K8s, "app", ""),
        ("any:app=x", Source::Any, "app", "x"),
        ("unspec:app=x", Source::Unspec, "app", "x"),
        ("reserved:host", Source::Reserved, "host", ""),
        ("reserved:remote-node", Source::Reserved, "remote-node", ""),
        (
            "k8s:io.kubernetes.pod.namespace=default",
            Source::K8s,
            "io.kubernetes.pod.namespace",
            "default",
        ),
        ("k8s:a.b/c-d_E9=1", Source::K8s, "a.b/c-d_E9", "1"),
        (
            "spiffe:spiffe.io/spiffe-id=spiffe://example.org/ns/default/sa/web",
            Source::Spiffe,
            SPIFFE_ID_KEY,
            "spiffe://example.org/ns/default/sa/web",
        ),
        // The value may hold '=' and ':'; a ':' after the first '=' is not a source separator.
        ("app=a=b", Source::Unspec, "app", "a=b"),
        ("app=x:y", Source::Unspec, "app", "x:y"),
        ("k8s:app=x:y=z/w", Source::K8s, "app", "x:y=z/w"),
        ("cidr:10.0.0.0/8", Source::Cidr, "10.0.0.0/8", ""),
        // IPv6 prefixes: ':' in a cidr key is written '-', as Cilium does.
        ("cidr:2001:db8::/32", Source::Cidr, "2001-db8--/32", ""),
        ("cidr:2001-db8--/32", Source::Cidr, "2001-db8--/32", ""),
        ("app=caf\u{e9}", Source::Unspec, "app", "caf\u{e9}"),
    ];
    for (input, source, key, value) in cases {
        let l = Label::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(l, Label::new(*source, *key, *value), "{input}");
        assert_eq!(input.parse::<Label>().ok(), Some(l), "FromStr {input}");
    }
}

#[test]
fn parse_rejects_bad_labels_naming_the_input() {
    type Check = fn(&LabelError) -> bool;
    let cases: &[(&str, Check)] = &[
        ("", |e| matches!(e, LabelError::EmptyKey { .. })),
        ("=web", |e| matches!(e, LabelError::EmptyKey { .. })),
        ("k8s:", |e| matches!(e, LabelError::EmptyKey { .. })),
        ("k8s:=x", |e| matches!(e, LabelError::EmptyKey { .. })),
        // Unknown or miscased source: not a source, so the ':' lands in the key.
        ("foo:app=web", |e| {
            matches!(e, LabelError::InvalidKey { ch: ':', .. })
        }),
        ("K8S:app=web", |e| {
            matches!(e, LabelError::InvalidKey { ch: ':', .. })
        }),
        ("app name=x", |e| {
            matches!(e, LabelError::InvalidKey { ch: ' ', .. })
        }),
        ("k8s:app$=x", |e| {
            matches!(e, LabelError::InvalidKey { ch: '$', .. })
        }),
        ("k8s:caf\u{e9}=x", |e| {
            matches!(e, LabelError::InvalidKey { ch: '\u{e9}', .. })
        }),
        ("app=we b", |e| {
            matches!(e, LabelError::InvalidValue { ch: ' ', .. })
        }),
        ("app=a,b", |e| {
            matches!(e, LabelError::InvalidValue { ch: ',', .. })
        }),
        ("app=a;b", |e| {
            matches!(e, LabelError::InvalidValue { ch: ';', .. })
        }),
        ("app=\tx", |e| {
            matches!(e, LabelError::InvalidValue { ch: '\t', .. })
        }),
        ("app=x\u{7f}", |e| {
            matches!(e, LabelError::InvalidValue { ch: '\u{7f}', .. })
        }),
    ];
    for (input, check) in cases {
        let err = Label::parse(input).expect_err(input);
        assert!(check(&err), "{input}: unexpected error {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{input:?}")),
            "{input}: message {msg}"
        );
    }
}

#[test]
fn source_round_trips_and_rejects_unknown() {
    for s in Source::ALL {
        assert_eq!(s.as_str().parse::<Source>(), Ok(s));
        assert_eq!(s.to_string(), s.as_str());
    }
    let names: Vec<_> = Source::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        ["k8s", "reserved", "cidr", "spiffe", "unspec", "any"]
    );
    for bad in ["", "K8s", "kubernetes", "k8s "] {
        let err = bad.parse::<Source>().expect_err(bad);
        assert_eq!(err, LabelError::UnknownSource { value: bad.into() });
        assert!(err.to_string().contains(&format!("{bad:?}")));
    }
}

#[test]
fn display_omits_empty_value() {
    assert_eq!(
        Label::new(Source::Reserved, "host", "").to_string(),
        "reserved:host"
    );
    assert_eq!(
        Label::new(Source::K8s, "app", "web").to_string(),
        "k8s:app=web"
    );
    assert_eq!(
        Label::parse("app=web").map(|l| l.to_string()),
        Ok("unspec:app=web".into())
    );
}

#[test]
fn parse_list_table() {
    assert!(Labels::parse_list("").is_ok_and(|l| l.is_empty()));
    assert!(Labels::parse_list("  ").is_ok_and(|l| l.is_empty()));

    let l = Labels::parse_list("k8s:app=web, env=prod ,spiffe:spiffe.io/spiffe-id=spiffe://td/x")
        .expect("valid list");
    assert_eq!(l.len(), 3);
    assert_eq!(l.get("app"), Some(&Label::new(Source::K8s, "app", "web")));
    assert_eq!(
        l.get("env"),
        Some(&Label::new(Source::Unspec, "env", "prod"))
    );
    assert_eq!(l.get(SPIFFE_ID_KEY), Some(&spiffe_label("spiffe://td/x")));

    // One label per key: the later one wins.
    let l = Labels::parse_list("k8s:app=a,unspec:app=b").expect("valid list");
    assert_eq!(l.len(), 1);
    assert_eq!(l.get("app"), Some(&Label::new(Source::Unspec, "app", "b")));

    for (input, index) in [("a=1,,b=2", 1), ("a=1,", 1), (",a=1", 0), ("a=1, ,b", 1)] {
        let err = Labels::parse_list(input).expect_err(input);
        assert_eq!(
            err,
            LabelError::EmptyListItem {
                input: input.into(),
                index
            }
        );
        assert!(err.to_string().contains(&format!("{input:?}")));
    }
    let err = Labels::parse_list("a=1,foo:b=2").expect_err("bad item");
    assert!(
        matches!(&err, LabelError::InvalidKey { input, .. } if input == "foo:b=2"),
        "{err:?}"
    );
}

#[test]
fn label_set_operations() {
    let mut l = Labels::new();
    assert!(l.is_empty());
    assert_eq!(l.insert(Label::new(Source::K8s, "c", "d")), None);
    assert_eq!(l.insert(Label::new(Source::K8s, "a", "b")), None);
    assert_eq!(
        l.insert(Label::new(Source::K8s, "a", "z")),
        Some(Label::new(Source::K8s, "a", "b"))
    );
    l.insert(Label::new(Source::K8s, "a", "b"));
    assert_eq!(l.sorted_string(), "k8s:a=b;k8s:c=d");
    assert_eq!(l.to_string(), "k8s:a=b,k8s:c=d");
    assert!(l.has_source(Source::K8s));
    assert!(!l.has_source(Source::Spiffe));
    assert!(l.contains(&Label::new(Source::K8s, "a", "b")));
    assert!(!l.contains(&Label::new(Source::Unspec, "a", "b")));
    assert!(!l.contains(&Label::new(Source::K8s, "a", "x")));
    let keys: Vec<_> = l.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(keys, ["a", "c"]);

    // Insertion order does not matter for equality, hashing or the canonical string.
    let other: Labels = [
        Label::new(Source::K8s, "a", "b"),
        Label::new(Source::K8s, "c", "d"),
    ]
    .into_iter()
    .rev()
    .collect();
    assert_eq!(other, l);
    assert_eq!(other.sorted_string(), l.sorted_string());

    assert_eq!(l.remove("a"), Some(Label::new(Source::K8s, "a", "b")));
    assert_eq!(l.remove("a"), None);
    assert_eq!(l.len(), 1);
    assert_ne!(other, l);
}

#[test]
fn spiffe_and_cidr_helpers() {
    let l = spiffe_label("spiffe://example.org/web");
    assert_eq!(
        l.to_string(),
        "spiffe:spiffe.io/spiffe-id=spiffe://example.org/web"
    );
    assert_eq!(Label::parse(&l.to_string()), Ok(l));

    let cases: &[(&str, u8, &str)] = &[
        ("10.1.2.3", 8, "cidr:10.0.0.0/8"),
        ("10.1.2.3", 32, "cidr:10.1.2.3/32"),
        ("10.1.2.3", 0, "cidr:0.0.0.0/0"),
        ("2001:db8::1", 32, "cidr:2001-db8--/32"),
        ("2001:db8::1", 128, "cidr:2001-db8--1/128"),
        ("2001:db8::1", 0, "cidr:--/0"),
    ];
    for (addr, len, want) in cases {
        let addr: IpAddr = addr.parse().expect("test address");
        let l = cidr_label(addr, *len).expect("valid prefix");
        assert_eq!(l.to_string(), *want);
        assert_eq!(Label::parse(want), Ok(l));
    }
    for (addr, len) in [("10.0.0.0", 33u8), ("::", 129)] {
        let addr: IpAddr = addr.parse().expect("test address");
        let err = cidr_label(addr, len).expect_err("too long");
        assert_eq!(
            err,
            LabelError::InvalidPrefixLength {
                addr: addr.to_string(),
                prefix_len: len
            }
        );
    }
}

fn arb_label() -> impl Strategy<Value = Label> {
    (
        prop::sample::select(Source::ALL.to_vec()),
        "[A-Za-z0-9._/-]{1,24}",
        // Printable ASCII without ',' and ';', plus some non-ASCII.
        "[!-+\\--:<-~\u{e9}\u{20ac}]{0,24}",
    )
        .prop_map(|(s, k, v)| Label::new(s, k, v))
}

proptest! {
    #[test]
    fn parse_display_round_trip(l in arb_label()) {
        prop_assert_eq!(Label::parse(&l.to_string()), Ok(l));
    }

    #[test]
    fn list_display_round_trip(ls in prop::collection::vec(arb_label(), 0..8)) {
        let set: Labels = ls.into_iter().collect();
        prop_assert_eq!(Labels::parse_list(&set.to_string()), Ok(set));
    }

    #[test]
    fn parse_never_panics(s in "\\PC{0,40}") {
        let _ = Label::parse(&s);
        let _ = Labels::parse_list(&s);
    }
}

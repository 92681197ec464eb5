//! Selector semantics: each operator, source-specific against source-less keys, the wildcard,
//! errors and the canonical form.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use sigil_labels::{LabelError, Labels, Operator, Requirement, Selector, SelectorKey, Source};

type Expr = (String, Operator, Vec<String>);
/// Name, matchLabels, matchExpressions, expected match.
type Case = (&'static str, BTreeMap<String, String>, Vec<Expr>, bool);

fn ml(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ex(key: &str, op: Operator, values: &[&str]) -> Expr {
    (
        key.to_owned(),
        op,
        values.iter().map(|v| (*v).to_owned()).collect(),
    )
}

fn endpoint() -> Labels {
    Labels::parse_list(
        "k8s:app=web,k8s:env=prod,unspec:tier=front,k8s:flag,\
         spiffe:spiffe.io/spiffe-id=spiffe://td/web",
    )
    .expect("fixture labels")
}

#[test]
fn selector_semantics_table() {
    use Operator::*;
    let cases: Vec<Case> = vec![
        ("wildcard", ml(&[]), vec![], true),
        ("matchLabels hit", ml(&[("app", "web")]), vec![], true),
        (
            "matchLabels wrong value",
            ml(&[("app", "db")]),
            vec![],
            false,
        ),
        (
            "matchLabels missing key",
            ml(&[("missing", "x")]),
            vec![],
            false,
        ),
        (
            "matchLabels same source",
            ml(&[("k8s:app", "web")]),
            vec![],
            true,
        ),
        (
            "matchLabels any source",
            ml(&[("any:app", "web")]),
            vec![],
            true,
        ),
        (
            "matchLabels other source",
            ml(&[("spiffe:app", "web")]),
            vec![],
            false,
        ),
        (
            "matchLabels unspec source",
            ml(&[("unspec:tier", "front")]),
            vec![],
            true,
        ),
        (
            "matchLabels k8s vs unspec",
            ml(&[("k8s:tier", "front")]),
            vec![],
            false,
        ),
        ("matchLabels empty value", ml(&[("flag", "")]), vec![], true),
        (
            "spiffe id no source",
            ml(&[("spiffe.io/spiffe-id", "spiffe://td/web")]),
            vec![],
            true,
        ),
        (
            "spiffe id spiffe source",
            ml(&[("spiffe:spiffe.io/spiffe-id", "spiffe://td/web")]),
            vec![],
            true,
        ),
        (
            "spiffe id k8s source",
            ml(&[("k8s:spiffe.io/spiffe-id", "spiffe://td/web")]),
            vec![],
            false,
        ),
        (
            "spiffe id other",
            ml(&[("spiffe.io/spiffe-id", "spiffe://td/db")]),
            vec![],
            false,
        ),
        (
            "all matchLabels must hold",
            ml(&[("app", "web"), ("env", "dev")]),
            vec![],
            false,
        ),
        ("In hit", ml(&[]), vec![ex("app", In, &["db", "web"])], true),
        ("In miss", ml(&[]), vec![ex("app", In, &["db"])], false),
        ("In absent", ml(&[]), vec![ex("missing", In, &["x"])], false),
        (
            "In k8s source",
            ml(&[]),
            vec![ex("k8s:app", In, &["web"])],
            true,
        ),
        (
            "In other source",
            ml(&[]),
            vec![ex("reserved:app", In, &["web"])],
            false,
        ),
        (
            "NotIn other value",
            ml(&[]),
            vec![ex("app", NotIn, &["db"])],
            true,
        ),
        (
            "NotIn own value",
            ml(&[]),
            vec![ex("app", NotIn, &["db", "web"])],
            false,
        ),
        (
            "NotIn absent key",
            ml(&[]),
            vec![ex("missing", NotIn, &["x"])],
            true,
        ),
        (
            "NotIn other source is absent",
            ml(&[]),
            vec![ex("spiffe:app", NotIn, &["web"])],
            true,
        ),
        ("Exists", ml(&[]), vec![ex("app", Exists, &[])], true),
        (
            "Exists empty value",
            ml(&[]),
            vec![ex("flag", Exists, &[])],
            true,
        ),
        (
            "Exists absent",
            ml(&[]),
            vec![ex("missing", Exists, &[])],
            false,
        ),
        (
            "Exists same source",
            ml(&[]),
            vec![ex("k8s:app", Exists, &[])],
            true,
        ),
        (
            "Exists other source",
            ml(&[]),
            vec![ex("spiffe:app", Exists, &[])],
            false,
        ),
        (
            "DoesNotExist absent",
            ml(&[]),
            vec![ex("missing", DoesNotExist, &[])],
            true,
        ),
        (
            "DoesNotExist present",
            ml(&[]),
            vec![ex("app", DoesNotExist, &[])],
            false,
        ),
        (
            "DoesNotExist other source",
            ml(&[]),
            vec![ex("spiffe:app", DoesNotExist, &[])],
            true,
        ),
        (
            "labels and expressions",
            ml(&[("app", "web")]),
            vec![ex("env", NotIn, &["dev"]), ex("tier", Exists, &[])],
            true,
        ),
        (
            "one failing expression",
            ml(&[("app", "web")]),
            vec![ex("env", NotIn, &["dev"]), ex("env", DoesNotExist, &[])],
            false,
        ),
    ];
    let labels = endpoint();
    for (name, match_labels, exprs, want) in cases {
        let sel = Selector::new(&match_labels, &exprs).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(sel.matches(&labels), want, "{name}: {sel}");
    }
}

#[test]
fn wildcard_matches_everything() {
    let sel = Selector::wildcard();
    assert!(sel.is_wildcard());
    assert!(sel.matches(&Labels::new()));
    assert!(sel.matches(&endpoint()));
    assert_eq!(Selector::new(&ml(&[]), &[]), Ok(Selector::wildcard()));
    assert_eq!(sel.canonical(), "{}");
    assert!(!Selector::new(&ml(&[("a", "b")]), &[]).is_ok_and(|s| s.is_wildcard()));
    // Requirements that select nothing on an empty set.
    let sel = Selector::new(&ml(&[("app", "web")]), &[]).expect("valid");
    assert!(!sel.matches(&Labels::new()));
}

#[test]
fn selector_errors_name_key_and_operator() {
    let cases: Vec<(Expr, LabelError)> = vec![
        (
            ex("app", Operator::In, &[]),
            LabelError::MissingValues {
                key: "any:app".into(),
                op: Operator::In,
            },
        ),
        (
            ex("k8s:app", Operator::NotIn, &[]),
            LabelError::MissingValues {
                key: "k8s:app".into(),
                op: Operator::NotIn,
            },
        ),
        (
            ex("app", Operator::Exists, &["x"]),
            LabelError::UnexpectedValues {
                key: "any:app".into(),
                op: Operator::Exists,
                values: vec!["x".into()],
            },
        ),
        (
            ex("app", Operator::DoesNotExist, &["x", "y"]),
            LabelError::UnexpectedValues {
                key: "any:app".into(),
                op: Operator::DoesNotExist,
                values: vec!["x".into(), "y".into()],
            },
        ),
    ];
    for (expr, want) in cases {
        let err = Selector::new(&ml(&[]), std::slice::from_ref(&expr)).expect_err("invalid");
        assert_eq!(err, want);
        let msg = err.to_string();
        assert!(
            msg.contains("app") && msg.contains(expr.1.as_str()),
            "{msg}"
        );
    }
    for bad_key in ["", "foo:app", "app name", "k8s:"] {
        let err = Selector::new(&ml(&[(bad_key, "v")]), &[]).expect_err(bad_key);
        assert!(
            matches!(
                err,
                LabelError::EmptyKey { .. } | LabelError::InvalidKey { .. }
            ),
            "{bad_key}: {err:?}"
        );
        assert!(err.to_string().contains(&format!("{bad_key:?}")));
        let err =
            Selector::new(&ml(&[]), &[ex(bad_key, Operator::Exists, &[])]).expect_err(bad_key);
        assert!(err.to_string().contains(&format!("{bad_key:?}")));
    }
}

#[test]
fn operator_and_key_parsing() {
    for op in [
        Operator::In,
        Operator::NotIn,
        Operator::Exists,
        Operator::DoesNotExist,
    ] {
        assert_eq!(op.as_str().parse::<Operator>(), Ok(op));
    }
    for bad in ["in", "notin", "Equals", ""] {
        assert_eq!(
            bad.parse::<Operator>(),
            Err(LabelError::UnknownOperator { value: bad.into() })
        );
    }
    let k = |s: &str| SelectorKey::parse(s).expect(s);
    assert_eq!(
        k("app"),
        SelectorKey {
            source: Source::Any,
            key: "app".into()
        }
    );
    assert_eq!(
        k("any:app"),
        SelectorKey {
            source: Source::Any,
            key: "app".into()
        }
    );
    assert_eq!(
        k("k8s:app"),
        SelectorKey {
            source: Source::K8s,
            key: "app".into()
        }
    );
    assert_eq!(k("spiffe:spiffe.io/spiffe-id").source, Source::Spiffe);
}

fn hash_of(s: &Selector) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

#[test]
fn canonical_form_is_order_independent_and_distinguishing() {
    let a = Selector::new(
        &ml(&[("app", "web")]),
        &[
            ex("k8s:env", Operator::NotIn, &["test", "dev"]),
            ex("tier", Operator::Exists, &[]),
        ],
    )
    .expect("valid");
    let b = Selector::new(
        &ml(&[]),
        &[
            ex("tier", Operator::Exists, &[]),
            ex("k8s:env", Operator::NotIn, &["dev", "test", "dev"]),
            ex("app", Operator::In, &["web"]),
        ],
    )
    .expect("valid");
    assert_eq!(a, b);
    assert_eq!(hash_of(&a), hash_of(&b));
    assert_eq!(a.canonical(), b.canonical());
    assert_eq!(
        a.canonical(),
        "any:app in (web), k8s:env notin (dev,test), any:tier"
    );
    assert_eq!(a.to_string(), a.canonical());
    assert_eq!(a.requirements().len(), 3);

    // with_requirement gives the same selector as building it in one go.
    let ns = Requirement::new(
        SelectorKey::parse("k8s:io.kubernetes.pod.namespace").expect("key"),
        Operator::In,
        ["default".to_owned()],
    )
    .expect("valid");
    let c = a.clone().with_requirement(ns.clone());
    let d = Selector::new(
        &ml(&[
            ("k8s:io.kubernetes.pod.namespace", "default"),
            ("app", "web"),
        ]),
        &[
            ex("k8s:env", Operator::NotIn, &["dev", "test"]),
            ex("tier", Operator::Exists, &[]),
        ],
    )
    .expect("valid");
    assert_eq!(c, d);
    assert_eq!(c.canonical(), d.canonical());
    assert!(c.requirements().contains(&ns));
    // Adding a requirement twice changes nothing.
    assert_eq!(c.clone().with_requirement(ns), c);

    // Different selectors, different strings; value escaping keeps "a,b" apart from a and b.
    let distinct = [
        Selector::wildcard(),
        Selector::new(&ml(&[("app", "web")]), &[]).expect("valid"),
        Selector::new(&ml(&[("k8s:app", "web")]), &[]).expect("valid"),
        Selector::new(&ml(&[]), &[ex("app", Operator::NotIn, &["web"])]).expect("valid"),
        Selector::new(&ml(&[]), &[ex("app", Operator::In, &["a", "b"])]).expect("valid"),
        Selector::new(&ml(&[]), &[ex("app", Operator::In, &["a,b"])]).expect("valid"),
        Selector::new(&ml(&[]), &[ex("app", Operator::Exists, &[])]).expect("valid"),
        Selector::new(&ml(&[]), &[ex("app", Operator::DoesNotExist, &[])]).expect("valid"),
    ];
    let strings: BTreeSet<String> = distinct.iter().map(Selector::canonical).collect();
    assert_eq!(strings.len(), distinct.len(), "{strings:?}");
    let set: BTreeSet<&Selector> = distinct.iter().collect();
    assert_eq!(set.len(), distinct.len());
}

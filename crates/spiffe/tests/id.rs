//! SPIFFE ID parsing: one fixture per rejection rule of the SPIFFE-ID standard, and a parse/format property.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use sigil_spiffe::id::{MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN};
use sigil_spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

fn err(s: &str) -> SpiffeIdError {
    match SpiffeId::parse(s) {
        Ok(id) => panic!("{s:?} was accepted as {id}"),
        Err(e) => e,
    }
}

fn value(s: &str) -> String {
    s.to_string()
}

#[test]
fn accepts_valid_ids() {
    let id = SpiffeId::parse("spiffe://example.org/ns/web-1/sa_x.y").unwrap();
    assert_eq!(id.trust_domain_name(), "example.org");
    assert_eq!(id.path(), "/ns/web-1/sa_x.y");
    assert!(!id.is_trust_domain_id());
    let td_id = SpiffeId::parse("spiffe://my-td_1.example").unwrap();
    assert!(td_id.is_trust_domain_id());
    assert_eq!(td_id.path(), "");
    // Dots are only forbidden as whole segments.
    SpiffeId::parse("spiffe://example.org/.a/..b/c.").unwrap();
    // Path characters may be uppercase, trust domain characters may not.
    SpiffeId::parse("spiffe://example.org/UPPER").unwrap();
}

#[test]
fn rejects_empty() {
    assert_eq!(err(""), SpiffeIdError::Empty);
}

#[test]
fn rejects_wrong_scheme() {
    for s in [
        "SPIFFE://example.org/a",
        "Spiffe://example.org/a",
        "http://example.org/a",
        "spiffe:/example.org/a",
        "example.org/a",
    ] {
        assert_eq!(
            err(s),
            SpiffeIdError::WrongScheme { value: value(s) },
            "{s}"
        );
    }
}

#[test]
fn rejects_missing_trust_domain() {
    for s in ["spiffe://", "spiffe:///path"] {
        assert_eq!(
            err(s),
            SpiffeIdError::MissingTrustDomain { value: value(s) },
            "{s}"
        );
    }
}

#[test]
fn rejects_uppercase_trust_domain() {
    let s = "spiffe://Example.org/a";
    assert_eq!(
        err(s),
        SpiffeIdError::BadTrustDomainChar {
            value: value(s),
            found: 'E'
        }
    );
}

#[test]
fn rejects_bad_trust_domain_char() {
    let s = "spiffe://exa!mple.org/a";
    assert_eq!(
        err(s),
        SpiffeIdError::BadTrustDomainChar {
            value: value(s),
            found: '!'
        }
    );
}

#[test]
fn rejects_port() {
    let s = "spiffe://example.org:8080/a";
    assert_eq!(err(s), SpiffeIdError::PortNotAllowed { value: value(s) });
}

#[test]
fn rejects_userinfo() {
    for s in [
        "spiffe://user@example.org/a",
        "spiffe://user:pass@example.org/a",
    ] {
        assert_eq!(
            err(s),
            SpiffeIdError::UserInfoNotAllowed { value: value(s) },
            "{s}"
        );
    }
}

#[test]
fn rejects_percent_encoding_in_trust_domain() {
    let s = "spiffe://ex%61mple.org/a";
    assert_eq!(
        err(s),
        SpiffeIdError::PercentEncodingNotAllowed { value: value(s) }
    );
}

#[test]
fn rejects_percent_encoding_in_path() {
    let s = "spiffe://example.org/a%2Fb";
    assert_eq!(
        err(s),
        SpiffeIdError::PercentEncodingNotAllowed { value: value(s) }
    );
}

#[test]
fn trust_domain_length_limit() {
    let ok = "a".repeat(MAX_TRUST_DOMAIN_LEN);
    SpiffeId::parse(&format!("spiffe://{ok}/x")).unwrap();
    TrustDomain::parse(&ok).unwrap();
    let long = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
    let s = format!("spiffe://{long}/x");
    assert_eq!(
        err(&s),
        SpiffeIdError::TrustDomainTooLong {
            value: s.clone(),
            len: 256
        }
    );
    assert_eq!(
        TrustDomain::parse(&long),
        Err(SpiffeIdError::TrustDomainTooLong {
            value: long.clone(),
            len: 256
        })
    );
}

#[test]
fn rejects_empty_segment() {
    let s = "spiffe://example.org/a//b";
    assert_eq!(err(s), SpiffeIdError::EmptySegment { value: value(s) });
}

#[test]
fn rejects_dot_segments() {
    for s in [
        "spiffe://example.org/.",
        "spiffe://example.org/..",
        "spiffe://example.org/a/./b",
        "spiffe://example.org/a/../b",
    ] {
        assert_eq!(err(s), SpiffeIdError::DotSegment { value: value(s) }, "{s}");
    }
}

#[test]
fn rejects_trailing_slash() {
    for s in ["spiffe://example.org/", "spiffe://example.org/a/"] {
        assert_eq!(
            err(s),
            SpiffeIdError::TrailingSlash { value: value(s) },
            "{s}"
        );
    }
}

#[test]
fn rejects_bad_path_char() {
    for (s, found) in [
        ("spiffe://example.org/a b", ' '),
        ("spiffe://example.org/a*b", '*'),
        ("spiffe://example.org/caf\u{e9}", '\u{e9}'),
    ] {
        assert_eq!(
            err(s),
            SpiffeIdError::BadPathChar {
                value: value(s),
                found
            },
            "{s}"
        );
    }
}

#[test]
fn rejects_query() {
    let s = "spiffe://example.org/a?x=1";
    assert_eq!(err(s), SpiffeIdError::QueryNotAllowed { value: value(s) });
}

#[test]
fn rejects_fragment() {
    let s = "spiffe://example.org/a#frag";
    assert_eq!(
        err(s),
        SpiffeIdError::FragmentNotAllowed { value: value(s) }
    );
}

/// An ID of exactly `len` bytes made of 100-byte path segments.
fn id_of_len(len: usize) -> String {
    let mut s = String::from("spiffe://example.org");
    while s.len() < len {
        let room = len - s.len() - 1;
        s.push('/');
        s.push_str(&"p".repeat(room.clamp(1, 100)));
    }
    assert_eq!(s.len(), len);
    s
}

#[test]
fn id_length_limit() {
    let ok = id_of_len(MAX_ID_LEN);
    assert_eq!(SpiffeId::parse(&ok).unwrap().as_str(), ok);
    let long = id_of_len(MAX_ID_LEN + 1);
    assert_eq!(err(&long), SpiffeIdError::TooLong { len: 2049 });
}

#[test]
fn trust_domain_parse_forms() {
    assert_eq!(
        TrustDomain::parse("example.org").unwrap().as_str(),
        "example.org"
    );
    assert_eq!(
        TrustDomain::parse("spiffe://example.org").unwrap().as_str(),
        "example.org"
    );
    assert!(matches!(
        TrustDomain::parse(""),
        Err(SpiffeIdError::MissingTrustDomain { .. })
    ));
    assert!(matches!(
        TrustDomain::parse("Example.org"),
        Err(SpiffeIdError::BadTrustDomainChar { found: 'E', .. })
    ));
}

#[test]
fn id_with_path_requires_leading_slash() {
    let td = TrustDomain::parse("example.org").unwrap();
    assert_eq!(
        td.id_with_path("/ns/web").unwrap().as_str(),
        "spiffe://example.org/ns/web"
    );
    assert_eq!(td.id_with_path("").unwrap(), td.id());
    // Without the slash the "path" would have become part of the trust domain name.
    assert_eq!(
        td.id_with_path("foo"),
        Err(SpiffeIdError::BadPathChar {
            value: "spiffe://example.orgfoo".into(),
            found: 'f'
        })
    );
}

#[test]
fn with_trust_domain_keeps_path() {
    let id = SpiffeId::parse("spiffe://old.org/ns/a").unwrap();
    let td = TrustDomain::parse("new.org").unwrap();
    let moved = id.with_trust_domain(&td);
    assert_eq!(moved.as_str(), "spiffe://new.org/ns/a");
    assert_eq!(moved.trust_domain(), td);
    assert_eq!(moved.path(), "/ns/a");
}

#[test]
fn serde_round_trip_and_rejection() {
    let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, "\"spiffe://example.org/a\"");
    assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/\"").is_err());
    assert!(serde_json::from_str::<TrustDomain>("\"Bad.org\"").is_err());
}

fn trust_domain_strategy() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}

fn path_strategy() -> impl Strategy<Value = String> {
    let segment = "[a-zA-Z0-9._-]{1,20}".prop_filter("dot segment", |s| s != "." && s != "..");
    prop::collection::vec(segment, 0..6)
        .prop_map(|segs| segs.iter().map(|s| format!("/{s}")).collect())
}

proptest! {
    #[test]
    fn parse_of_format_is_identity(td in trust_domain_strategy(), path in path_strategy()) {
        let text = format!("spiffe://{td}{path}");
        let id = SpiffeId::parse(&text).unwrap();
        prop_assert_eq!(id.trust_domain_name(), td.as_str());
        prop_assert_eq!(id.path(), path.as_str());
        let again = SpiffeId::parse(&id.to_string()).unwrap();
        prop_assert_eq!(&again, &id);
        let built = TrustDomain::parse(&td).unwrap().id_with_path(&path).unwrap();
        prop_assert_eq!(built, id);
    }

    #[test]
    fn parse_never_panics(s in "\\PC{0,64}") {
        let _ = SpiffeId::parse(&s);
        let _ = TrustDomain::parse(&s);
    }
}

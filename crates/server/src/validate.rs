//! Conversion of admin API messages into datastore values, rejecting bad input with the field and value.

use sigil_datastore::{Entry, Selector};
use sigil_proto::admin::v1 as pb;
use sigil_spiffe::{SpiffeId, TrustDomain};

/// A validation failure: the field path and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field path, e.g. `entries[2].spiffe_id`.
    pub field: String,
    /// What is wrong, quoting the value.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error under a prefix such as `entries[3]`.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

/// Most items one batch request may carry: bounds the work and memory a single request can cause.
pub const MAX_BATCH: usize = 10_000;

/// Rejects a batch of more than [`MAX_BATCH`] items, naming the field.
pub fn batch_len(field: &str, len: usize) -> Result<(), FieldError> {
    if len > MAX_BATCH {
        return Err(FieldError::new(
            field,
            format!("{len} items exceed the limit of {MAX_BATCH} per request; split the batch"),
        ));
    }
    Ok(())
}

/// The reserved path under which sigil names its own agents and server.
pub const RESERVED_PATH: &str = "/sigil";

/// Parses a SPIFFE ID field that must belong to `td`.
pub fn spiffe_id_in(field: &str, value: &str, td: &TrustDomain) -> Result<SpiffeId, FieldError> {
    let id = SpiffeId::parse(value)
        .map_err(|e| FieldError::new(field, format!("invalid SPIFFE ID {value:?}: {e}")))?;
    if id.trust_domain_name() != td.as_str() {
        return Err(FieldError::new(
            field,
            format!(
                "{value:?} is not in this server's trust domain {:?}",
                td.as_str()
            ),
        ));
    }
    Ok(id)
}

fn is_reserved(id: &SpiffeId) -> bool {
    let p = id.path();
    p == RESERVED_PATH || p.starts_with("/sigil/")
}

/// Refuses a SPIFFE ID under the reserved `/sigil` path (the server's and the agents' own IDs), which only
/// sigil itself issues: every minting path (entries, admin mints, agent signing) goes through this.
pub fn not_reserved(field: &str, id: &SpiffeId) -> Result<(), FieldError> {
    if is_reserved(id) {
        return Err(FieldError::new(
            field,
            format!(
                "{:?} is under the reserved path {RESERVED_PATH}/, which only sigil issues to its server and agents",
                id.as_str()
            ),
        ));
    }
    Ok(())
}

/// Selector types whose values sigil understands, and the keys each accepts.
fn check_known_selector(field: &str, s: &Selector) -> Result<(), FieldError> {
    if s.kind != "unix" {
        return Ok(());
    }
    let (key, val) = s.value.split_once(':').ok_or_else(|| {
        FieldError::new(
            field,
            format!(
                "unknown selector syntax {:?}: unix selectors are unix:<key>:<value>",
                s.to_string()
            ),
        )
    })?;
    let ok = match key {
        "uid" | "gid" | "supplementary_gid" => val.parse::<u32>().is_ok(),
        "user" | "group" => !val.is_empty(),
        "path" => val.starts_with('/'),
        "sha256" => val.len() == 64 && val.bytes().all(|b| b.is_ascii_hexdigit()),
        _ => {
            return Err(FieldError::new(
                field,
                format!(
                    "unknown selector {:?}: unix keys are uid, user, gid, group, supplementary_gid, path, sha256",
                    s.to_string()
                ),
            ));
        }
    };
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("invalid value in selector {:?}", s.to_string()),
        ))
    }
}

/// Parses one selector message.
pub fn selector(field: &str, s: &pb::Selector) -> Result<Selector, FieldError> {
    let sel = Selector::new(&s.r#type, &s.value).map_err(|e| {
        FieldError::new(
            field,
            format!(
                "unknown selector syntax {:?}: {e}",
                format!("{}:{}", s.r#type, s.value)
            ),
        )
    })?;
    check_known_selector(field, &sel)?;
    Ok(sel)
}

fn ttl(field: &str, v: Option<i32>) -> Result<u32, FieldError> {
    match v {
        None => Ok(0),
        Some(n) if n > 0 => Ok(n as u32),
        Some(n) => Err(FieldError::new(
            field,
            format!(
                "invalid TTL {n}: must be greater than 0 seconds (omit it for the server default)"
            ),
        )),
    }
}

/// Checks a DNS name (optionally a leading `*.` wildcard).
pub fn dns_name(field: &str, name: &str) -> Result<(), FieldError> {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let bad = || FieldError::new(field, format!("invalid DNS name {name:?}"));
    if bare.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in bare.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad());
        }
    }
    Ok(())
}

/// What a parent ID may refer to, given the current catalog.
pub trait ParentLookup {
    /// Whether some entry (stored or earlier in the same batch) has this SPIFFE ID.
    fn is_entry_id(&self, id: &SpiffeId) -> bool;
}

/// Validates an entry message into a datastore entry (id, revision and created_at copied as given).
pub fn entry(
    e: &pb::Entry,
    td: &TrustDomain,
    server_id: &SpiffeId,
    parents: &dyn ParentLookup,
) -> Result<Entry, FieldError> {
    let spiffe_id = spiffe_id_in("spiffe_id", &e.spiffe_id, td)?;
    if spiffe_id.is_trust_domain_id() {
        return Err(FieldError::new(
            "spiffe_id",
            format!(
                "{:?} has no path; an entry's SPIFFE ID needs one (e.g. {}/workload)",
                e.spiffe_id, e.spiffe_id
            ),
        ));
    }
    if is_reserved(&spiffe_id) {
        return Err(FieldError::new(
            "spiffe_id",
            format!(
                "{:?} is under the reserved path {RESERVED_PATH}/",
                e.spiffe_id
            ),
        ));
    }
    let parent_id = spiffe_id_in("parent_id", &e.parent_id, td)?;
    let parent_known = &parent_id == server_id
        || parent_id.path().starts_with("/sigil/agent/")
        || parents.is_entry_id(&parent_id);
    if !parent_known {
        return Err(FieldError::new(
            "parent_id",
            format!(
                "unknown parent {:?}: not the server ({server_id}), an agent (spiffe://{}/sigil/agent/...), or the SPIFFE ID of an entry",
                e.parent_id,
                td.as_str()
            ),
        ));
    }
    if parent_id == spiffe_id {
        return Err(FieldError::new(
            "parent_id",
            format!("{:?} is the entry's own SPIFFE ID", e.parent_id),
        ));
    }
    if e.selectors.is_empty() {
        return Err(FieldError::new(
            "selectors",
            "at least one selector is required",
        ));
    }
    let mut selectors = Vec::with_capacity(e.selectors.len());
    for (i, s) in e.selectors.iter().enumerate() {
        selectors.push(selector(&format!("selectors[{i}]"), s)?);
    }
    selectors.sort();
    selectors.dedup();
    for (i, d) in e.dns_names.iter().enumerate() {
        dns_name(&format!("dns_names[{i}]"), d)?;
    }
    let mut federates_with = Vec::new();
    for (i, f) in e.federates_with.iter().enumerate() {
        let field = format!("federates_with[{i}]");
        let t = TrustDomain::parse(f)
            .map_err(|err| FieldError::new(&field, format!("invalid trust domain {f:?}: {err}")))?;
        if &t == td {
            return Err(FieldError::new(
                field,
                format!("{f:?} is this server's own trust domain"),
            ));
        }
        federates_with.push(t);
    }
    if e.hint.len() > 1024 {
        return Err(FieldError::new(
            "hint",
            format!("{} bytes, longer than 1024", e.hint.len()),
        ));
    }
    if e.expires_at < 0 {
        return Err(FieldError::new(
            "expires_at",
            format!("invalid expiry {}: must be a unix time or 0", e.expires_at),
        ));
    }
    Ok(Entry {
        id: e.id.clone(),
        spiffe_id,
        parent_id,
        selectors,
        x509_svid_ttl: ttl("x509_svid_ttl", e.x509_svid_ttl)?,
        jwt_svid_ttl: ttl("jwt_svid_ttl", e.jwt_svid_ttl)?,
        dns_names: e.dns_names.clone(),
        admin: e.admin,
        downstream: e.downstream,
        federates_with,
        hint: e.hint.clone(),
        expires_at: e.expires_at,
        revision: e.revision_number,
        created_at: e.created_at,
    })
}

/// Checks an entry id supplied by a client (entries may carry their own ids, as in SPIRE).
pub fn entry_id(field: &str, id: &str) -> Result<(), FieldError> {
    if id.is_empty()
        || id.len() > 255
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(FieldError::new(field, format!("invalid entry id {id:?}")));
    }
    Ok(())
}

/// Converts a datastore entry into its API message.
pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: crate::grpc::selectors_to_pb(&e.selectors),
        x509_svid_ttl: (e.x509_svid_ttl > 0).then_some(e.x509_svid_ttl as i32),
        jwt_svid_ttl: (e.jwt_svid_ttl > 0).then_some(e.jwt_svid_ttl as i32),
        dns_names: e.dns_names.clone(),
        admin: e.admin,
        downstream: e.downstream,
        federates_with: e.federates_with.iter().map(|t| t.to_string()).collect(),
        hint: e.hint.clone(),
        expires_at: e.expires_at,
        revision_number: e.revision,
        created_at: e.created_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoEntries;
    impl ParentLookup for NoEntries {
        fn is_entry_id(&self, _: &SpiffeId) -> bool {
            false
        }
    }

    fn good() -> pb::Entry {
        pb::Entry {
            spiffe_id: "spiffe://td/web".into(),
            parent_id: "spiffe://td/sigil/agent/join_token/x".into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            ..Default::default()
        }
    }

    fn check(e: pb::Entry) -> Result<Entry, FieldError> {
        let td = TrustDomain::parse("td").expect("td");
        let server = td.id_with_path("/sigil/server").expect("id");
        entry(&e, &td, &server, &NoEntries)
    }

    #[test]
    fn batch_len_names_the_field_and_the_limit() {
        assert!(batch_len("params", MAX_BATCH).is_ok());
        let e = batch_len("params", MAX_BATCH + 1).expect_err("over the limit");
        assert_eq!(e.field, "params");
        assert!(
            e.message.contains("10001") && e.message.contains("10000"),
            "{e}"
        );
    }

    #[test]
    fn a_good_entry_passes() {
        let e = check(good()).expect("valid");
        assert_eq!(e.selectors[0].to_string(), "unix:uid:1000");
        assert_eq!(e.x509_svid_ttl, 0);
    }

    #[test]
    fn each_bad_field_is_named_with_its_value() {
        type Mutation = Box<dyn Fn(&mut pb::Entry)>;
        let cases: Vec<(Mutation, &str, &str)> = vec![
            (
                Box::new(|e| e.spiffe_id = "http://td/x".into()),
                "spiffe_id",
                "http://td/x",
            ),
            (
                Box::new(|e| e.spiffe_id = "spiffe://td".into()),
                "spiffe_id",
                "has no path",
            ),
            (
                Box::new(|e| e.spiffe_id = "spiffe://other/x".into()),
                "spiffe_id",
                "not in this server's trust domain",
            ),
            (
                Box::new(|e| e.spiffe_id = "spiffe://td/sigil/agent/y".into()),
                "spiffe_id",
                "reserved",
            ),
            (
                Box::new(|e| e.parent_id = "spiffe://td/nobody".into()),
                "parent_id",
                "unknown parent \"spiffe://td/nobody\"",
            ),
            (
                Box::new(|e| e.selectors.clear()),
                "selectors",
                "at least one",
            ),
            (
                Box::new(|e| e.selectors[0].r#type = String::new()),
                "selectors[0]",
                "unknown selector syntax",
            ),
            (
                Box::new(|e| e.selectors[0].value = "uid:abc".into()),
                "selectors[0]",
                "uid:abc",
            ),
            (
                Box::new(|e| e.selectors[0].value = "colour:red".into()),
                "selectors[0]",
                "unknown selector",
            ),
            (
                Box::new(|e| e.x509_svid_ttl = Some(0)),
                "x509_svid_ttl",
                "invalid TTL 0",
            ),
            (
                Box::new(|e| e.jwt_svid_ttl = Some(-5)),
                "jwt_svid_ttl",
                "invalid TTL -5",
            ),
            (
                Box::new(|e| e.dns_names = vec!["bad name".into()]),
                "dns_names[0]",
                "bad name",
            ),
            (
                Box::new(|e| e.federates_with = vec!["td".into()]),
                "federates_with[0]",
                "own trust domain",
            ),
            (Box::new(|e| e.expires_at = -1), "expires_at", "-1"),
        ];
        for (mutate, field, needle) in cases {
            let mut e = good();
            mutate(&mut e);
            let err = check(e).expect_err("must be rejected");
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        }
    }
}

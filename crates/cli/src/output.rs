//! How results are shown: SPIRE-style text blocks, or JSON with SPIFFE IDs as strings and times as both
//! unix seconds and RFC 3339.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Serialize;
use sigil_proto::admin::v1::{Agent, Bundle, Entry, Selector};

/// `--output`, taken by every command that prints a result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable text.
    #[default]
    Text,
    /// JSON on one line.
    Json,
}

/// The `--output` flag.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// Prints `value` as JSON on standard output.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// RFC 3339 (UTC, seconds) of a unix time; `None` for 0, which the API uses for "unset".
pub fn rfc3339(unix: i64) -> Option<String> {
    let secs = u64::try_from(unix).ok().filter(|s| *s > 0)?;
    let t = UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
    Some(humantime::format_rfc3339_seconds(t).to_string())
}

/// How long until `unix`, e.g. `59m 58s`, or how long ago it passed.
pub fn remaining(unix: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let diff = unix.saturating_sub(now);
    let d = Duration::from_secs(diff.unsigned_abs());
    if diff >= 0 {
        format!("in {}", humantime::format_duration(d))
    } else {
        format!("expired {} ago", humantime::format_duration(d))
    }
}

/// PEM-encodes DER blocks with the given label.
pub fn pem(label: &str, ders: &[impl AsRef<[u8]>]) -> String {
    let mut out = String::new();
    for der in ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let _ = writeln!(out, "-----BEGIN {label}-----");
        // base64 output is ASCII, so slicing at any byte index is on a char boundary.
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        let _ = writeln!(out, "-----END {label}-----");
    }
    out
}

/// A selector as JSON.
#[derive(Debug, Serialize)]
pub struct SelectorJson {
    #[serde(rename = "type")]
    kind: String,
    value: String,
}

fn selectors_json(s: &[Selector]) -> Vec<SelectorJson> {
    s.iter()
        .map(|s| SelectorJson {
            kind: s.r#type.clone(),
            value: s.value.clone(),
        })
        .collect()
}

/// A registration entry as JSON (the field names of the `--data` file, plus server-assigned ones).
#[derive(Debug, Serialize)]
pub struct EntryJson {
    id: String,
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<SelectorJson>,
    x509_svid_ttl: Option<i32>,
    jwt_svid_ttl: Option<i32>,
    dns_names: Vec<String>,
    admin: bool,
    downstream: bool,
    federates_with: Vec<String>,
    hint: String,
    expires_at: i64,
    expires_at_rfc3339: Option<String>,
    revision_number: i64,
    created_at: i64,
    created_at_rfc3339: Option<String>,
}

impl From<&Entry> for EntryJson {
    fn from(e: &Entry) -> Self {
        EntryJson {
            id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            parent_id: e.parent_id.clone(),
            selectors: selectors_json(&e.selectors),
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            dns_names: e.dns_names.clone(),
            admin: e.admin,
            downstream: e.downstream,
            federates_with: e.federates_with.clone(),
            hint: e.hint.clone(),
            expires_at: e.expires_at,
            expires_at_rfc3339: rfc3339(e.expires_at),
            revision_number: e.revision_number,
            created_at: e.created_at,
            created_at_rfc3339: rfc3339(e.created_at),
        }
    }
}

/// Entries as JSON: `{"entries": [...]}`, the shape `entry create --data` reads back.
pub fn entries_json(entries: &[Entry]) -> serde_json::Value {
    let list: Vec<EntryJson> = entries.iter().map(EntryJson::from).collect();
    serde_json::json!({ "entries": list })
}

fn ttl_text(ttl: Option<i32>) -> String {
    ttl.map_or_else(|| "default".to_string(), |t| t.to_string())
}

/// An entry as SPIRE lays it out, ending with a blank line.
pub fn entry_text(e: &Entry) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Entry ID         : {}", e.id);
    let _ = writeln!(s, "SPIFFE ID        : {}", e.spiffe_id);
    let _ = writeln!(s, "Parent ID        : {}", e.parent_id);
    let _ = writeln!(s, "Revision         : {}", e.revision_number);
    let _ = writeln!(s, "X509-SVID TTL    : {}", ttl_text(e.x509_svid_ttl));
    let _ = writeln!(s, "JWT-SVID TTL     : {}", ttl_text(e.jwt_svid_ttl));
    if let Some(t) = rfc3339(e.expires_at) {
        let _ = writeln!(s, "Expiration time  : {t}");
    }
    for sel in &e.selectors {
        let _ = writeln!(s, "Selector         : {}:{}", sel.r#type, sel.value);
    }
    for dns in &e.dns_names {
        let _ = writeln!(s, "DNS name         : {dns}");
    }
    if e.admin {
        let _ = writeln!(s, "Admin            : true");
    }
    if e.downstream {
        let _ = writeln!(s, "Downstream       : true");
    }
    for td in &e.federates_with {
        let _ = writeln!(s, "FederatesWith    : {td}");
    }
    if !e.hint.is_empty() {
        let _ = writeln!(s, "Hint             : {}", e.hint);
    }
    s.push('\n');
    s
}

/// Prints entries in the chosen format, text preceded by `Found N entries`.
pub fn print_entries(entries: &[Entry], format: Format, found_line: bool) -> anyhow::Result<()> {
    match format {
        Format::Json => print_json(&entries_json(entries)),
        Format::Text => {
            if found_line {
                match entries.len() {
                    1 => println!("Found 1 entry"),
                    n => println!("Found {n} entries"),
                }
            }
            for e in entries {
                print!("{}", entry_text(e));
            }
            Ok(())
        }
    }
}

/// An attested agent as JSON.
#[derive(Debug, Serialize)]
pub struct AgentJson {
    spiffe_id: String,
    attestation_type: String,
    x509_svid_serial: String,
    x509_svid_expires_at: i64,
    x509_svid_expires_at_rfc3339: Option<String>,
    banned: bool,
    can_reattest: bool,
    selectors: Vec<SelectorJson>,
}

impl From<&Agent> for AgentJson {
    fn from(a: &Agent) -> Self {
        AgentJson {
            spiffe_id: a.spiffe_id.clone(),
            attestation_type: a.attestation_type.clone(),
            x509_svid_serial: a.x509_svid_serial.clone(),
            x509_svid_expires_at: a.x509_svid_expires_at,
            x509_svid_expires_at_rfc3339: rfc3339(a.x509_svid_expires_at),
            banned: a.banned,
            can_reattest: a.can_reattest,
            selectors: selectors_json(&a.selectors),
        }
    }
}

/// An agent as SPIRE lays it out, ending with a blank line.
pub fn agent_text(a: &Agent) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "SPIFFE ID         : {}", a.spiffe_id);
    let _ = writeln!(s, "Attestation type  : {}", a.attestation_type);
    let expiry = rfc3339(a.x509_svid_expires_at).unwrap_or_else(|| "-".into());
    let _ = writeln!(s, "Expiration time   : {expiry}");
    let _ = writeln!(s, "Serial number     : {}", a.x509_svid_serial);
    let _ = writeln!(s, "Can re-attest     : {}", a.can_reattest);
    let _ = writeln!(s, "Banned            : {}", a.banned);
    for sel in &a.selectors {
        let _ = writeln!(s, "Selector          : {}:{}", sel.r#type, sel.value);
    }
    s.push('\n');
    s
}

/// A bundle as JSON: the SPIFFE bundle document parsed, the X.509 authorities as PEM.
#[derive(Debug, Serialize)]
pub struct BundleJson {
    trust_domain: String,
    sequence_number: i64,
    x509_authorities: Vec<String>,
    spiffe_bundle: serde_json::Value,
}

impl From<&Bundle> for BundleJson {
    fn from(b: &Bundle) -> Self {
        BundleJson {
            trust_domain: b.trust_domain.clone(),
            sequence_number: b.sequence_number,
            x509_authorities: b
                .x509_authorities
                .iter()
                .map(|der| pem("CERTIFICATE", &[der]))
                .collect(),
            // Kept as a string if the server ever sends something that is not JSON.
            spiffe_bundle: serde_json::from_str(&b.spiffe_bundle_json)
                .unwrap_or_else(|_| serde_json::Value::String(b.spiffe_bundle_json.clone())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_render_as_rfc3339_and_zero_is_unset() {
        assert_eq!(rfc3339(0), None);
        assert_eq!(rfc3339(-5), None);
        assert_eq!(
            rfc3339(1_700_000_000).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
    }

    #[test]
    fn pem_wraps_at_64_columns() {
        let p = pem("CERTIFICATE", &[vec![0u8; 100]]);
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last().copied(), Some("-----END CERTIFICATE-----"));
    }

    #[test]
    fn entry_text_uses_spire_layout() {
        let e = Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://td/w".into(),
            parent_id: "spiffe://td/a".into(),
            selectors: vec![Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            jwt_svid_ttl: Some(30),
            admin: true,
            ..Entry::default()
        };
        let t = entry_text(&e);
        assert!(t.contains("Entry ID         : e1\n"), "{t}");
        assert!(t.contains("X509-SVID TTL    : default\n"), "{t}");
        assert!(t.contains("JWT-SVID TTL     : 30\n"), "{t}");
        assert!(t.contains("Selector         : unix:uid:1000\n"), "{t}");
        assert!(t.contains("Admin            : true\n"), "{t}");
        assert!(!t.contains("Downstream"), "{t}");
    }
}

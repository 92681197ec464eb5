//! Parsing of flag values and of the `entry create --data` file; everything else is the server's to check.

use std::path::Path;

use anyhow::Context;
use sigil_proto::admin::v1::{Entry, Selector};

/// Parses a `--selector type:value` flag (the value may itself contain ':').
pub fn selector(s: &str) -> Result<Selector, String> {
    match s.split_once(':') {
        Some((t, v)) if !t.is_empty() && !v.is_empty() => Ok(Selector {
            r#type: t.to_string(),
            value: v.to_string(),
        }),
        _ => Err(format!("{s:?} is not type:value (e.g. unix:uid:1000)")),
    }
}

/// Parses a lifetime flag such as `1h` or `90s` into whole seconds (0 = the server default).
pub fn ttl(s: &str) -> Result<i32, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}; use e.g. 90s, 5m, 1h)"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?} is not a whole number of seconds"));
    }
    i32::try_from(d.as_secs()).map_err(|_| format!("{s:?} is too long (at most {} s)", i32::MAX))
}

/// Reads a file, or standard input when the path is `-`.
pub fn read_input(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read standard input")
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

/// The `--data` file: `{"entries": [...]}`, as `spire-server entry create -data` takes it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    entries: Vec<DataEntry>,
}

/// One entry of the `--data` file. Read-only fields of `entry show --output json` are accepted and
/// ignored, so that its output can be fed back.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DataEntry {
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<DataSelector>,
    x509_svid_ttl: Option<i32>,
    jwt_svid_ttl: Option<i32>,
    dns_names: Vec<String>,
    admin: bool,
    downstream: bool,
    federates_with: Vec<String>,
    hint: String,
    expires_at: i64,
    #[serde(rename = "id")]
    _id: serde::de::IgnoredAny,
    #[serde(rename = "revision_number")]
    _revision_number: serde::de::IgnoredAny,
    #[serde(rename = "created_at")]
    _created_at: serde::de::IgnoredAny,
    #[serde(rename = "created_at_rfc3339")]
    _created_at_rfc3339: serde::de::IgnoredAny,
    #[serde(rename = "expires_at_rfc3339")]
    _expires_at_rfc3339: serde::de::IgnoredAny,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSelector {
    r#type: String,
    value: String,
}

/// Parses the `--data` JSON; an error names the offending field's path (e.g. `entries[1].x509_svid_ttl`).
pub fn entries_json(text: &str) -> anyhow::Result<Vec<Entry>> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let file: DataFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            anyhow::anyhow!("{inner}")
        } else {
            anyhow::anyhow!("{path}: {inner}")
        }
    })?;
    Ok(file
        .entries
        .into_iter()
        .map(|d| Entry {
            spiffe_id: d.spiffe_id,
            parent_id: d.parent_id,
            selectors: d
                .selectors
                .into_iter()
                .map(|s| Selector {
                    r#type: s.r#type,
                    value: s.value,
                })
                .collect(),
            x509_svid_ttl: d.x509_svid_ttl,
            jwt_svid_ttl: d.jwt_svid_ttl,
            dns_names: d.dns_names,
            admin: d.admin,
            downstream: d.downstream,
            federates_with: d.federates_with,
            hint: d.hint,
            expires_at: d.expires_at,
            ..Entry::default()
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn selector_splits_on_the_first_colon() {
        let s = selector("unix:uid:1000").unwrap();
        assert_eq!((s.r#type.as_str(), s.value.as_str()), ("unix", "uid:1000"));
        for bad in ["unix", ":uid", "unix:", ""] {
            let err = selector(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn ttl_takes_whole_seconds_that_fit() {
        assert_eq!(ttl("1h"), Ok(3600));
        assert_eq!(ttl("90s"), Ok(90));
        assert!(ttl("1500ms").unwrap_err().contains("whole number"));
        assert!(ttl("100000000h").unwrap_err().contains("too long"));
        assert!(ttl("soon").unwrap_err().contains("\"soon\""));
    }

    #[test]
    fn data_file_maps_every_field() {
        let text = r#"{"entries":[{
            "spiffe_id":"spiffe://td/w","parent_id":"spiffe://td/a",
            "selectors":[{"type":"unix","value":"uid:1000"}],
            "x509_svid_ttl":200,"jwt_svid_ttl":30,"dns_names":["w.example"],
            "admin":true,"downstream":true,"federates_with":["other.td"],
            "hint":"h","expires_at":1900000000,"id":"ignored","revision_number":3}]}"#;
        let e = entries_json(text).unwrap();
        assert_eq!(e.len(), 1);
        let e = &e[0];
        assert_eq!(e.spiffe_id, "spiffe://td/w");
        assert_eq!(e.parent_id, "spiffe://td/a");
        assert_eq!(e.selectors[0].value, "uid:1000");
        assert_eq!((e.x509_svid_ttl, e.jwt_svid_ttl), (Some(200), Some(30)));
        assert_eq!(e.dns_names, ["w.example"]);
        assert!(e.admin && e.downstream);
        assert_eq!(e.federates_with, ["other.td"]);
        assert_eq!((e.hint.as_str(), e.expires_at), ("h", 1_900_000_000));
        // Server-assigned fields are never sent.
        assert_eq!((e.id.as_str(), e.revision_number), ("", 0));
    }

    #[test]
    fn data_file_errors_name_the_field() {
        let cases = [
            (
                r#"{"entries":[{},{"x509_svid_ttl":"ten"}]}"#,
                "entries[1].x509_svid_ttl",
            ),
            (r#"{"entries":[{"spifee_id":"x"}]}"#, "spifee_id"),
            (
                r#"{"entries":[{"selectors":[{"type":"unix","valu":"x"}]}]}"#,
                "valu",
            ),
            (r#"{"entrys":[]}"#, "entrys"),
            (r#"{"entries":[{"admin":"yes"}]}"#, "entries[0].admin"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", entries_json(text).unwrap_err());
            assert!(err.contains(want), "{err} should name {want}");
        }
        assert!(entries_json("not json").is_err());
    }
}

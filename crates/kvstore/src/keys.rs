//! The key layout under `sigil/<cluster>/` and the validation of the names that go into keys.
//!
//! Label sets appear in keys base64url-encoded (no '/' inside), so a prefix scan of one label
//! set's references can never match another set whose text merely starts the same way.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::KvError;

/// Key builder for one cluster.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    base: String,
}

impl Keys {
    pub(crate) fn new(cluster: &str) -> Self {
        Keys {
            base: format!("sigil/{cluster}/"),
        }
    }

    /// `identities/id/<n>` → canonical label text (the number's owner).
    pub(crate) fn id_prefix(&self) -> String {
        format!("{}identities/id/", self.base)
    }
    pub(crate) fn id(&self, n: u32) -> String {
        format!("{}{n}", self.id_prefix())
    }
    /// `identities/labels/<enc>` → n (the label set's claim on one number).
    pub(crate) fn labels(&self, enc: &str) -> String {
        format!("{}identities/labels/{enc}", self.base)
    }
    /// `identities/value/<enc>/<node>` → n, under the node's lease (a reference).
    pub(crate) fn value_prefix(&self) -> String {
        format!("{}identities/value/", self.base)
    }
    pub(crate) fn refs_of(&self, enc: &str) -> String {
        format!("{}{enc}/", self.value_prefix())
    }
    pub(crate) fn reference(&self, enc: &str, node: &str) -> String {
        format!("{}{node}", self.refs_of(enc))
    }
    /// `nodes/<name>` → NodeInfo JSON, under the node's lease.
    pub(crate) fn node_prefix(&self) -> String {
        format!("{}nodes/", self.base)
    }
    pub(crate) fn node(&self, name: &str) -> String {
        format!("{}{name}", self.node_prefix())
    }
    /// `podcidrs/<addr>-<len>` → node name, under the node's lease.
    pub(crate) fn podcidr_prefix(&self) -> String {
        format!("{}podcidrs/", self.base)
    }
    /// `ipcache/<ip>` → IpCacheEntry JSON, under the hosting node's lease.
    pub(crate) fn ipcache_prefix(&self) -> String {
        format!("{}ipcache/", self.base)
    }
}

/// The key form of a canonical label text.
pub(crate) fn encode_labels(sorted: &str) -> String {
    URL_SAFE_NO_PAD.encode(sorted.as_bytes())
}

/// The end of the range of keys starting with `prefix` (etcd's "prefix" range end).
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Checks a cluster or node name: 1-63 characters of `[a-z0-9.-]`, starting and ending with a
/// letter or digit (a DNS label, as Kubernetes node names and Cilium cluster names are).
pub(crate) fn validate_name(field: &'static str, value: &str) -> Result<(), KvError> {
    if value.is_empty() || value.len() > 63 {
        return Err(KvError::invalid(field, value, "must be 1 to 63 characters"));
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')))
    {
        return Err(KvError::invalid(
            field,
            value,
            format!("character {ch:?} not allowed (only a-z, 0-9, '-', '.')"),
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(value.chars().next()) || !alnum(value.chars().last()) {
        return Err(KvError::invalid(
            field,
            value,
            "must start and end with a letter or digit",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        assert!(validate_name("node_name", "node-1.a").is_ok());
        for bad in ["", "Node", "a/b", "-a", "a-", "a b", &"x".repeat(64)] {
            let e = validate_name("node_name", bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid node_name"), "{e}");
        }
    }

    #[test]
    fn encoded_labels_hold_no_slash_and_prefix_end_is_exclusive() {
        let e = encode_labels("k8s:a=b/c;spiffe:x=spiffe://td/w");
        assert!(!e.contains('/'));
        assert_eq!(prefix_end("a/b/"), b"a/b0".to_vec());
    }
}

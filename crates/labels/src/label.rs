//! Labels as Cilium writes them (`source:key=value`) and sets of them, one label per key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::error::LabelError;
use crate::filter::LabelFilter;

/// Key of the label carrying an endpoint's SPIFFE ID (source `spiffe`).
pub const SPIFFE_ID_KEY: &str = "spiffe.io/spiffe-id";
/// Key of the label carrying a pod's namespace.
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
/// Prefix under which a namespace's own labels are copied onto its pods.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Prefix of the labels Cilium derives for policy (cluster name, service account).
pub const POLICY_PREFIX: &str = "io.cilium.k8s.policy.";
/// Key of the label carrying the cluster name.
pub const POLICY_CLUSTER_KEY: &str = "io.cilium.k8s.policy.cluster";
/// Key of the label carrying a pod's service account.
pub const SERVICE_ACCOUNT_KEY: &str = "io.cilium.k8s.policy.serviceaccount";

/// Where a label comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Kubernetes pod, namespace or derived labels.
    K8s,
    /// Labels of reserved entities (host, world, ...).
    Reserved,
    /// CIDR prefixes of node-local CIDR identities.
    Cidr,
    /// The endpoint's SPIFFE ID.
    Spiffe,
    /// No source given.
    Unspec,
    /// In selectors: any source matches.
    Any,
}

impl Source {
    /// Every source, in order.
    pub const ALL: [Source; 6] = [
        Source::K8s,
        Source::Reserved,
        Source::Cidr,
        Source::Spiffe,
        Source::Unspec,
        Source::Any,
    ];

    /// The source as written before the ':' of a label.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::K8s => "k8s",
            Source::Reserved => "reserved",
            Source::Cidr => "cidr",
            Source::Spiffe => "spiffe",
            Source::Unspec => "unspec",
            Source::Any => "any",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Source {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Source::ALL
            .into_iter()
            .find(|src| src.as_str() == s)
            .ok_or_else(|| LabelError::UnknownSource {
                value: s.to_owned(),
            })
    }
}

/// One label: a source, a key and a (possibly empty) value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    /// Where the label comes from.
    pub source: Source,
    /// The key; unique within a [`Labels`] set.
    pub key: String,
    /// The value, empty for labels such as `reserved:host`.
    pub value: String,
}

impl Label {
    /// Builds a label without checking it; use [`Label::parse`] for untrusted text.
    pub fn new(source: Source, key: impl Into<String>, value: impl Into<String>) -> Self {
        Label {
            source,
            key: key.into(),
            value: value.into(),
        }
    }

    /// Parses `[source:]key[=value]`.
    ///
    /// The text before the first ':' is a source only when that ':' comes before the first '='
    /// and the text is a known source; otherwise the label has no source ([`Source::Unspec`]).
    /// So the value may hold ':', '/' and '=' (`spiffe:spiffe.io/spiffe-id=spiffe://td/x`).
    /// In `cidr:` labels ':' in the key is written '-', as Cilium does for IPv6 prefixes.
    pub fn parse(s: &str) -> Result<Label, LabelError> {
        let (source, rest) = split_source(s);
        let source = source.unwrap_or(Source::Unspec);
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        let key = if source == Source::Cidr {
            key.replace(':', "-")
        } else {
            key.to_owned()
        };
        validate_key(s, &key)?;
        validate_value(s, value)?;
        Ok(Label {
            source,
            key,
            value: value.to_owned(),
        })
    }
}

/// Splits a known source prefix off `s`, if the first ':' precedes the first '='.
pub(crate) fn split_source(s: &str) -> (Option<Source>, &str) {
    if let Some(colon) = s.find(':')
        && s.find('=').is_none_or(|eq| colon < eq)
        && let Ok(source) = s[..colon].parse::<Source>()
    {
        return (Some(source), &s[colon + 1..]);
    }
    (None, s)
}

/// Checks a key against `[A-Za-z0-9._/-]+`; `input` is the text quoted in the error.
pub(crate) fn validate_key(input: &str, key: &str) -> Result<(), LabelError> {
    if key.is_empty() {
        return Err(LabelError::EmptyKey {
            input: input.to_owned(),
        });
    }
    match key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
    {
        Some(ch) => Err(LabelError::InvalidKey {
            input: input.to_owned(),
            key: key.to_owned(),
            ch,
        }),
        None => Ok(()),
    }
}

/// Values exclude ',' (list separator), ';' (canonical-form separator), whitespace and controls.
fn validate_value(input: &str, value: &str) -> Result<(), LabelError> {
    match value
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | ';'))
    {
        Some(ch) => Err(LabelError::InvalidValue {
            input: input.to_owned(),
            value: value.to_owned(),
            ch,
        }),
        None => Ok(()),
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)?;
        if !self.value.is_empty() {
            write!(f, "={}", self.value)?;
        }
        Ok(())
    }
}

impl FromStr for Label {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Label::parse(s)
    }
}

/// The label `spiffe:spiffe.io/spiffe-id=<id>` that carries an endpoint's SPIFFE ID.
pub fn spiffe_label(id: &str) -> Label {
    Label::new(Source::Spiffe, SPIFFE_ID_KEY, id)
}

/// The label `cidr:<prefix>/<len>` of a CIDR, host bits cleared, ':' written '-' (IPv6).
pub fn cidr_label(addr: IpAddr, prefix_len: u8) -> Result<Label, LabelError> {
    let invalid = || LabelError::InvalidPrefixLength {
        addr: addr.to_string(),
        prefix_len,
    };
    let network = match addr {
        IpAddr::V4(v4) => {
            if prefix_len > 32 {
                return Err(invalid());
            }
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            if prefix_len > 128 {
                return Err(invalid());
            }
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    };
    let key = format!("{network}/{prefix_len}").replace(':', "-");
    Ok(Label::new(Source::Cidr, key, ""))
}

/// A set of labels with at most one label per key (as in Cilium), ordered by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels {
    map: BTreeMap<String, Label>,
}

impl Labels {
    /// An empty set.
    pub fn new() -> Self {
        Labels::default()
    }

    /// Parses a comma-separated list of `[source:]key[=value]`; blanks around items are
    /// ignored, an empty string is the empty set, and a later label replaces an earlier one
    /// with the same key.
    pub fn parse_list(s: &str) -> Result<Labels, LabelError> {
        let mut labels = Labels::new();
        if s.trim().is_empty() {
            return Ok(labels);
        }
        for (index, item) in s.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                return Err(LabelError::EmptyListItem {
                    input: s.to_owned(),
                    index,
                });
            }
            labels.insert(Label::parse(item)?);
        }
        Ok(labels)
    }

    /// Adds a label, returning the one it replaced under the same key.
    pub fn insert(&mut self, l: Label) -> Option<Label> {
        self.map.insert(l.key.clone(), l)
    }

    /// Removes and returns the label with this key.
    pub fn remove(&mut self, key: &str) -> Option<Label> {
        self.map.remove(key)
    }

    /// The label with this key, whatever its source.
    pub fn get(&self, key: &str) -> Option<&Label> {
        self.map.get(key)
    }

    /// Whether this exact label (source, key and value) is in the set.
    pub fn contains(&self, l: &Label) -> bool {
        self.map.get(&l.key) == Some(l)
    }

    /// The labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.map.values()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether any label has this source.
    pub fn has_source(&self, s: Source) -> bool {
        self.map.values().any(|l| l.source == s)
    }

    /// The labels that `f` deems relevant for identity.
    pub fn identity_relevant(&self, f: &LabelFilter) -> Labels {
        self.iter().filter(|l| f.is_relevant(l)).cloned().collect()
    }

    /// Canonical text, `k8s:a=b;k8s:c=d` in key order: equal sets give equal strings and,
    /// since values cannot hold ';', different sets give different strings.
    pub fn sorted_string(&self) -> String {
        let mut out = String::new();
        for (i, l) in self.iter().enumerate() {
            if i > 0 {
                out.push(';');
            }
            out.push_str(&l.to_string());
        }
        out
    }
}

impl fmt::Display for Labels {
    /// Comma-separated, the form [`Labels::parse_list`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

impl FromStr for Labels {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Labels::parse_list(s)
    }
}

impl FromIterator<Label> for Labels {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Self {
        let mut labels = Labels::new();
        labels.extend(iter);
        labels
    }
}

impl Extend<Label> for Labels {
    fn extend<I: IntoIterator<Item = Label>>(&mut self, iter: I) {
        for l in iter {
            self.insert(l);
        }
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = &'a Label;
    type IntoIter = std::collections::btree_map::Values<'a, String, Label>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.values()
    }
}

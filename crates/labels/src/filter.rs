//! Which labels count towards an identity: Cilium's default exclusions and `--labels`-style
//! include/exclude patterns.
//!
//! Without a filter every hash- or index-like label (pod-template-hash, pod-name, ...) would
//! give each pod its own identity, which defeats identity-based policy at scale.

use crate::error::LabelError;
use crate::label::{
    Label, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, POLICY_PREFIX, Source, split_source,
    validate_key,
};

/// Cilium's default exclusions ("Limiting Identity-Relevant Labels"), as key prefixes.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "io.kubernetes",
    "kubernetes.io",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/controller-uid",
    "beta.kubernetes.io",
    "k8s.io",
    "pod-template-generation",
    "pod-template-hash",
    "controller-revision-hash",
    "annotation",
    "controller-uid",
    "etcd_node",
];

/// Includes Cilium adds as soon as any include pattern is configured (besides the labels that
/// are always kept, see [`LabelFilter::is_relevant`]).
const AUTO_INCLUDES: &[&str] = &["app.kubernetes.io"];

/// One prefix pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// `None` (or `any:`) matches every source.
    source: Option<Source>,
    prefix: String,
    /// A trailing '$' (regex end anchor) asks for the whole key.
    exact: bool,
    exclude: bool,
}

impl Pattern {
    /// Parses `[!][source:][!]prefix[*|$]`, also accepting Cilium's regex spellings `\.` and a
    /// trailing `.*`, so patterns can be pasted from a Cilium config.
    fn parse(text: &str, exclude_default: bool) -> Result<Pattern, LabelError> {
        let invalid = |reason| LabelError::InvalidPattern {
            pattern: text.to_owned(),
            reason,
        };
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(invalid("empty pattern"));
        }
        let mut exclude = exclude_default;
        if let Some(r) = rest.strip_prefix('!') {
            exclude = true;
            rest = r;
        }
        let (source, r) = split_source(rest);
        rest = r;
        if let Some(r) = rest.strip_prefix('!') {
            exclude = true;
            rest = r;
        }
        let source = source.filter(|s| *s != Source::Any);
        let (rest, exact) = match rest.strip_suffix('$') {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let unescaped = rest.replace("\\.", ".");
        let prefix = unescaped
            .strip_suffix(".*")
            .or_else(|| unescaped.strip_suffix('*'))
            .unwrap_or(&unescaped);
        if prefix.is_empty() {
            if exact || !rest.ends_with('*') {
                return Err(invalid("empty key prefix (write '*' to match every key)"));
            }
        } else if validate_key(text, prefix).is_err() {
            return Err(invalid(
                "only a literal key prefix with an optional trailing '*' or '$' is supported",
            ));
        }
        if exact && prefix.len() != unescaped.len() {
            return Err(invalid("'*' and '$' cannot be combined"));
        }
        Ok(Pattern {
            source,
            prefix: prefix.to_owned(),
            exact,
            exclude,
        })
    }

    /// Longer prefixes are more specific; at equal length an exact key, then a named source.
    fn specificity(&self) -> (usize, bool, bool) {
        (self.prefix.len(), self.exact, self.source.is_some())
    }

    fn matches(&self, l: &Label) -> bool {
        self.source.is_none_or(|s| s == l.source)
            && if self.exact {
                l.key == self.prefix
            } else {
                l.key.starts_with(&self.prefix)
            }
    }
}

/// Decides which labels are identity-relevant.
///
/// Always relevant, whatever the patterns: `reserved:`, `spiffe:` and `cidr:` labels,
/// `io.kubernetes.pod.namespace`, `io.cilium.k8s.namespace.labels.*` and
/// `io.cilium.k8s.policy.*` (policies select on them). Otherwise the most specific matching
/// pattern decides (longest prefix, then one naming a source), an exclude winning a tie; when
/// no pattern matches, the label is relevant unless include patterns exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelFilter {
    patterns: Vec<Pattern>,
    has_include: bool,
}

impl Default for LabelFilter {
    /// Cilium's default: everything except [`DEFAULT_EXCLUDES`].
    fn default() -> Self {
        LabelFilter {
            patterns: DEFAULT_EXCLUDES
                .iter()
                .map(|p| Pattern {
                    source: None,
                    prefix: (*p).to_owned(),
                    exact: false,
                    exclude: true,
                })
                .collect(),
            has_include: false,
        }
    }
}

impl LabelFilter {
    /// A filter from Cilium `--labels`-style patterns `[!][source:]prefix[*|$]`, replacing the
    /// default list. A pattern matches keys that start with its prefix (so `app` also matches
    /// `app.kubernetes.io/name`), as Cilium's start-anchored regexes do; a trailing `*` or `.*`
    /// is allowed and changes nothing, a trailing `$` asks for the exact key.
    /// Patterns in `exclude` exclude with or without '!'; patterns in `include` that start
    /// with '!' exclude too, so a whole Cilium list can be passed as `include`. Once any
    /// include pattern exists only matching labels are kept, and `app.kubernetes.io` is
    /// included too, as Cilium does.
    pub fn from_patterns(include: &[String], exclude: &[String]) -> Result<Self, LabelError> {
        let mut patterns = Vec::with_capacity(include.len() + exclude.len());
        for p in include {
            patterns.push(Pattern::parse(p, false)?);
        }
        for p in exclude {
            patterns.push(Pattern::parse(p, true)?);
        }
        let has_include = patterns.iter().any(|p| !p.exclude);
        if has_include {
            patterns.extend(AUTO_INCLUDES.iter().map(|p| Pattern {
                source: None,
                prefix: (*p).to_owned(),
                exact: false,
                exclude: false,
            }));
        }
        Ok(LabelFilter {
            patterns,
            has_include,
        })
    }

    /// A filter that keeps every label.
    pub fn keep_all() -> Self {
        LabelFilter {
            patterns: Vec::new(),
            has_include: false,
        }
    }

    /// Whether `l` counts towards an identity.
    pub fn is_relevant(&self, l: &Label) -> bool {
        if always_relevant(l) {
            return true;
        }
        let mut best: Option<&Pattern> = None;
        for p in self.patterns.iter().filter(|p| p.matches(l)) {
            best = match best {
                Some(b) if b.specificity() > p.specificity() => Some(b),
                Some(b) if b.specificity() == p.specificity() && b.exclude => Some(b),
                _ => Some(p),
            };
        }
        match best {
            Some(p) => !p.exclude,
            None => !self.has_include,
        }
    }
}

/// Labels that policies depend on, so no pattern may drop them.
fn always_relevant(l: &Label) -> bool {
    matches!(l.source, Source::Reserved | Source::Spiffe | Source::Cidr)
        || l.key == NAMESPACE_KEY
        || l.key.starts_with(NAMESPACE_LABELS_PREFIX)
        || l.key.starts_with(POLICY_PREFIX)
}

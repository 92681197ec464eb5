//! Label selectors (matchLabels, matchExpressions) with Kubernetes semantics and Cilium's
//! source-aware keys: a key without a source matches that key from any source.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use crate::error::LabelError;
use crate::label::{Label, Labels, Source, split_source, validate_key};

/// A matchExpressions operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// The label exists and its value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label exists.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl Operator {
    /// The operator as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        }
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Operator {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "In" => Ok(Operator::In),
            "NotIn" => Ok(Operator::NotIn),
            "Exists" => Ok(Operator::Exists),
            "DoesNotExist" => Ok(Operator::DoesNotExist),
            _ => Err(LabelError::UnknownOperator {
                value: s.to_owned(),
            }),
        }
    }
}

/// The key a requirement looks at: `k8s:app`, `any:app` or `app` (the last two match `app`
/// from any source). Ordered by key, then source, so canonical selectors read by key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SelectorKey {
    /// [`Source::Any`] when the key had no source prefix.
    pub source: Source,
    /// The label key.
    pub key: String,
}

impl SelectorKey {
    /// Parses `[source:]key`.
    pub fn parse(s: &str) -> Result<SelectorKey, LabelError> {
        let (source, key) = split_source(s);
        validate_key(s, key)?;
        Ok(SelectorKey {
            source: source.unwrap_or(Source::Any),
            key: key.to_owned(),
        })
    }

    /// The label in `labels` this key refers to, if present.
    pub fn find<'a>(&self, labels: &'a Labels) -> Option<&'a Label> {
        labels
            .get(&self.key)
            .filter(|l| self.source == Source::Any || l.source == self.source)
    }
}

impl Ord for SelectorKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.key, self.source).cmp(&(&other.key, other.source))
    }
}

impl PartialOrd for SelectorKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SelectorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)
    }
}

impl FromStr for SelectorKey {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SelectorKey::parse(s)
    }
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// The key looked at.
    pub key: SelectorKey,
    /// How the value is tested.
    pub op: Operator,
    /// The values for In and NotIn; empty for Exists and DoesNotExist.
    pub values: BTreeSet<String>,
}

impl Requirement {
    /// A requirement, checking that In/NotIn have values and Exists/DoesNotExist have none.
    pub fn new(
        key: SelectorKey,
        op: Operator,
        values: impl IntoIterator<Item = String>,
    ) -> Result<Requirement, LabelError> {
        let values: BTreeSet<String> = values.into_iter().collect();
        match op {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(LabelError::MissingValues {
                    key: key.to_string(),
                    op,
                });
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(LabelError::UnexpectedValues {
                    key: key.to_string(),
                    op,
                    values: values.into_iter().collect(),
                });
            }
            _ => {}
        }
        Ok(Requirement { key, op, values })
    }

    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        let found = self.key.find(labels);
        match self.op {
            Operator::In => found.is_some_and(|l| self.values.contains(&l.value)),
            Operator::NotIn => found.is_none_or(|l| !self.values.contains(&l.value)),
            Operator::Exists => found.is_some(),
            Operator::DoesNotExist => found.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    /// `k8s:app in (a,b)`, `any:env notin (x)`, `any:tier`, `!any:debug`; values escape
    /// `\ , ( )` and spaces so the text is unambiguous.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let write_values = |f: &mut fmt::Formatter<'_>| -> fmt::Result {
            f.write_str("(")?;
            for (i, v) in self.values.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                for c in v.chars() {
                    if matches!(c, '\\' | ',' | '(' | ')' | ' ') {
                        f.write_str("\\")?;
                    }
                    write!(f, "{c}")?;
                }
            }
            f.write_str(")")
        };
        match self.op {
            Operator::In => {
                write!(f, "{} in ", self.key)?;
                write_values(f)
            }
            Operator::NotIn => {
                write!(f, "{} notin ", self.key)?;
                write_values(f)
            }
            Operator::Exists => write!(f, "{}", self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

/// A conjunction of requirements, kept sorted and without duplicates; empty matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Builds a selector from matchLabels (`key: value`, each an `In` with one value) and
    /// matchExpressions (`key`, operator, values).
    pub fn new(
        match_labels: &BTreeMap<String, String>,
        match_expressions: &[(String, Operator, Vec<String>)],
    ) -> Result<Selector, LabelError> {
        let mut sel = Selector::wildcard();
        for (k, v) in match_labels {
            let r = Requirement::new(SelectorKey::parse(k)?, Operator::In, [v.clone()])?;
            sel.requirements.push(r);
        }
        for (k, op, values) in match_expressions {
            let r = Requirement::new(SelectorKey::parse(k)?, *op, values.iter().cloned())?;
            sel.requirements.push(r);
        }
        sel.normalize();
        Ok(sel)
    }

    /// The selector matching every label set.
    pub fn wildcard() -> Selector {
        Selector::default()
    }

    /// Whether this selector has no requirement and so matches everything.
    pub fn is_wildcard(&self) -> bool {
        self.requirements.is_empty()
    }

    /// This selector with one more requirement (for example a namespace constraint).
    pub fn with_requirement(mut self, r: Requirement) -> Selector {
        self.requirements.push(r);
        self.normalize();
        self
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Stable text: equal selectors give equal strings, different ones different strings.
    pub fn canonical(&self) -> String {
        self.to_string()
    }

    /// The requirements, sorted.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    fn normalize(&mut self) {
        self.requirements.sort();
        self.requirements.dedup();
    }
}

impl fmt::Display for Selector {
    /// `{}` for the wildcard, else the requirements joined by `, `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

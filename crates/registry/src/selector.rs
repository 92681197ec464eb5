//! `Selector`: one `kind:value` fact about a workload or node (e.g. `unix:uid:1000`), validated on creation.

use std::fmt;
use std::str::FromStr;

/// Longest selector value accepted, in bytes.
pub const MAX_SELECTOR_VALUE_LEN: usize = 1024;

/// Why a selector was rejected; every variant carries the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// No `:` separates the kind from the value.
    #[error("selector {input:?}: expected \"kind:value\" (no ':' found)")]
    MissingSeparator { input: String },
    /// The kind is empty.
    #[error("selector {input:?}: kind is empty")]
    EmptyKind { input: String },
    /// The kind holds a character outside `[a-z0-9_-]`.
    #[error(
        "selector {input:?}: kind characters are limited to lowercase letters, digits, '_' and '-' (found {found:?})"
    )]
    BadKindChar { input: String, found: char },
    /// The value is empty.
    #[error("selector {input:?}: value is empty")]
    EmptyValue { input: String },
    /// The value holds a control character.
    #[error("selector {input:?}: value contains control character {found:?}")]
    ControlChar { input: String, found: char },
    /// The value is longer than [`MAX_SELECTOR_VALUE_LEN`]; only the kind is kept, not the long value.
    #[error(
        "selector of kind {kind:?}: value is {len} bytes, longer than the maximum of {MAX_SELECTOR_VALUE_LEN}"
    )]
    ValueTooLong { kind: String, len: usize },
}

/// A validated `kind:value` selector; ordered by kind, then value. Serialized as the string `kind:value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// The selector type, e.g. `unix` or `k8s`.
    pub kind: String,
    /// Everything after the first `:`, e.g. `uid:1000`.
    pub value: String,
}

impl Selector {
    /// Parses `kind:value`, splitting at the first `:` (the value may contain more).
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let Some((kind, value)) = s.split_once(':') else {
            return Err(SelectorError::MissingSeparator {
                input: s.to_string(),
            });
        };
        Self::new(kind, value)
    }

    /// Builds a selector from its parts, checking both.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Result<Self, SelectorError> {
        let (kind, value) = (kind.into(), value.into());
        let input = || format!("{kind}:{value}");
        if kind.is_empty() {
            return Err(SelectorError::EmptyKind { input: input() });
        }
        if let Some(found) = kind
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')))
        {
            return Err(SelectorError::BadKindChar {
                input: input(),
                found,
            });
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue { input: input() });
        }
        if value.len() > MAX_SELECTOR_VALUE_LEN {
            return Err(SelectorError::ValueTooLong {
                kind,
                len: value.len(),
            });
        }
        if let Some(found) = value.chars().find(|c| c.is_control()) {
            return Err(SelectorError::ControlChar {
                input: input(),
                found,
            });
        }
        Ok(Selector { kind, value })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Selector::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_first_colon_and_round_trips() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!((s.kind.as_str(), s.value.as_str()), ("unix", "uid:1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"unix:uid:1000\"");
        assert_eq!(serde_json::from_str::<Selector>(&json).unwrap(), s);
        assert!(serde_json::from_str::<Selector>("\"Unix:x\"").is_err());
    }

    #[test]
    fn each_rule_has_its_error() {
        use SelectorError::*;
        type Check = fn(&SelectorError) -> bool;
        let cases: [(&str, Check); 5] = [
            (
                "unix",
                |e| matches!(e, MissingSeparator { input } if input == "unix"),
            ),
            (":x", |e| matches!(e, EmptyKind { input } if input == ":x")),
            ("Unix:x", |e| matches!(e, BadKindChar { found: 'U', .. })),
            (
                "unix:",
                |e| matches!(e, EmptyValue { input } if input == "unix:"),
            ),
            ("k8s:a\nb", |e| matches!(e, ControlChar { found: '\n', .. })),
        ];
        for (input, check) in cases {
            let err = Selector::parse(input).unwrap_err();
            assert!(check(&err), "{input:?} gave {err:?}");
        }
        let long = "v".repeat(MAX_SELECTOR_VALUE_LEN + 1);
        assert!(matches!(
            Selector::new("k8s", long),
            Err(ValueTooLong { len, .. }) if len == MAX_SELECTOR_VALUE_LEN + 1
        ));
        assert!(Selector::new("k8s", "v".repeat(MAX_SELECTOR_VALUE_LEN)).is_ok());
        assert!(Selector::new("a_b-9", "x").is_ok());
    }

    #[test]
    fn orders_by_kind_then_value() {
        let mut v: Vec<Selector> = ["unix:uid:2", "k8s:ns:a", "unix:uid:1"]
            .iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect();
        v.sort();
        let got: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["k8s:ns:a", "unix:uid:1", "unix:uid:2"]);
    }
}

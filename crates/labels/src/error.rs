//! The one error type of this crate: every variant names the input that was rejected.

use crate::selector::Operator;

/// Why a label, label list, label pattern or selector was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// A source name that is not one of k8s, reserved, cidr, spiffe, unspec, any.
    #[error("unknown label source {value:?} (expected k8s, reserved, cidr, spiffe, unspec or any)")]
    UnknownSource {
        /// The rejected source text.
        value: String,
    },
    /// A label or selector key that is empty.
    #[error("empty key in {input:?}")]
    EmptyKey {
        /// The whole text the key came from.
        input: String,
    },
    /// A key holding a character outside `[A-Za-z0-9._/-]`.
    #[error(
        "invalid character {ch:?} in key {key:?} of {input:?} (allowed: letters, digits, '.', '_', '/', '-'; a source prefix must be k8s, reserved, cidr, spiffe, unspec or any)"
    )]
    InvalidKey {
        /// The whole text the key came from.
        input: String,
        /// The rejected key.
        key: String,
        /// The first offending character.
        ch: char,
    },
    /// A value holding whitespace, a control character, ',' or ';'.
    #[error(
        "invalid character {ch:?} in value {value:?} of {input:?} (whitespace, control characters, ',' and ';' are not allowed)"
    )]
    InvalidValue {
        /// The whole text the value came from.
        input: String,
        /// The rejected value.
        value: String,
        /// The first offending character.
        ch: char,
    },
    /// A CIDR prefix length longer than the address.
    #[error("prefix length {prefix_len} is too long for address {addr}")]
    InvalidPrefixLength {
        /// The address.
        addr: String,
        /// The rejected prefix length.
        prefix_len: u8,
    },
    /// A label list with an empty item, such as `a=b,,c=d`.
    #[error("empty label at position {index} of list {input:?}")]
    EmptyListItem {
        /// The whole list.
        input: String,
        /// Zero-based position of the empty item.
        index: usize,
    },
    /// An operator name other than In, NotIn, Exists, DoesNotExist.
    #[error("unknown selector operator {value:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator {
        /// The rejected operator text.
        value: String,
    },
    /// In or NotIn without any value.
    #[error("selector requirement on key {key:?} with operator {op} needs at least one value")]
    MissingValues {
        /// The requirement's key.
        key: String,
        /// The requirement's operator.
        op: Operator,
    },
    /// Exists or DoesNotExist with values.
    #[error(
        "selector requirement on key {key:?} with operator {op} takes no values, got {values:?}"
    )]
    UnexpectedValues {
        /// The requirement's key.
        key: String,
        /// The requirement's operator.
        op: Operator,
        /// The values that should not be there.
        values: Vec<String>,
    },
    /// A label filter pattern that cannot be used.
    #[error("invalid label filter pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The rejected pattern.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

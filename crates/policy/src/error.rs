//! Errors of this crate: every variant names what was rejected and where.

use std::fmt;
use std::path::PathBuf;

/// Why importing, loading or tracing policies failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text is not YAML (the whole import is rejected).
    #[error("{origin}: invalid YAML: {message}")]
    Yaml {
        /// File name or `<input>`.
        origin: String,
        /// The YAML parser's message, with its location.
        message: String,
    },
    /// One or more documents are invalid; nothing of the import was applied.
    #[error("{}", join_errors(errors))]
    Invalid {
        /// Every document error found, in document order.
        errors: Vec<DocumentError>,
    },
    /// A policy file or directory could not be read.
    #[error("reading {path}: {cause}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The same policy (kind, namespace, name) appears twice in one import.
    #[error("policy {id} is defined twice: in {first} and in {second}")]
    Duplicate {
        /// The policy's identity, `Kind/namespace/name`.
        id: String,
        /// Where it was first defined.
        first: String,
        /// Where it was defined again.
        second: String,
    },
    /// A trace peer that cannot be resolved (unknown entity name, bad labels...).
    #[error("invalid trace peer {value:?}: {reason}")]
    Peer {
        /// The peer as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn join_errors(errors: &[DocumentError]) -> String {
    let mut out = String::new();
    for (i, e) in errors.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&e.to_string());
    }
    out
}

impl PolicyError {
    /// The document errors of an [`PolicyError::Invalid`], empty for other variants.
    pub fn document_errors(&self) -> &[DocumentError] {
        match self {
            PolicyError::Invalid { errors } => errors,
            _ => &[],
        }
    }
}

/// One invalid field of one document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{origin}: document {index}{}: {}{problem}",
    name_part(name),
    path_part(path)
)]
pub struct DocumentError {
    /// File name or `<input>`.
    pub origin: String,
    /// 1-based position of the document in its file (empty documents are not counted).
    pub index: usize,
    /// `metadata.name`, when the document has a readable one.
    pub name: Option<String>,
    /// Path of the offending field, e.g. `spec.ingress[0].toPorts[0].ports[0].port`; empty
    /// for the document itself.
    pub path: String,
    /// What is wrong there.
    pub problem: Problem,
}

fn name_part(name: &Option<String>) -> String {
    match name {
        Some(n) => format!(" ({n:?})"),
        None => String::new(),
    }
}

fn path_part(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A field this kind of document does not have (CRD validation rejects these).
    UnknownField {
        /// The unknown field's name.
        field: String,
        /// The fields allowed at that place.
        allowed: Vec<&'static str>,
    },
    /// A required field is absent.
    Missing,
    /// The field has the wrong type, e.g. a list where an object is expected.
    WrongType {
        /// What was expected.
        expected: &'static str,
        /// The value found, rendered as JSON.
        value: String,
    },
    /// The field's value is not acceptable.
    InvalidValue {
        /// The value, rendered as JSON.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A real Kubernetes/Cilium field that sigil does not implement.
    Unsupported {
        /// Why, and what to do instead.
        reason: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownField { field, allowed } => {
                write!(
                    f,
                    "unknown field {field:?} (expected one of: {})",
                    allowed.join(", ")
                )
            }
            Problem::Missing => f.write_str("missing required field"),
            Problem::WrongType { expected, value } => {
                write!(f, "expected {expected}, found {value}")
            }
            Problem::InvalidValue { value, reason } => write!(f, "invalid value {value}: {reason}"),
            Problem::Unsupported { reason } => write!(f, "not supported: {reason}"),
        }
    }
}

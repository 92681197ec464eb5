//! `TrustDomain` and `SpiffeId`, parsed exactly per the SPIFFE-ID standard; each rejection names its rule.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID (in bytes) that is accepted; the standard requires support up to this length.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME_PREFIX: &str = "spiffe://";

/// Why a SPIFFE ID or trust domain was rejected; every variant carries the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The scheme was not exactly `spiffe://`.
    #[error("{value:?}: scheme must be \"spiffe://\"")]
    WrongScheme { value: String },
    /// No trust domain followed the scheme.
    #[error("{value:?}: trust domain is missing")]
    MissingTrustDomain { value: String },
    /// The trust domain holds a character outside `[a-z0-9.-_]`.
    #[error(
        "{value:?}: trust domain characters are limited to lowercase letters, numbers, dots, dashes and underscores (found {found:?})"
    )]
    BadTrustDomainChar { value: String, found: char },
    /// The trust domain carries a port.
    #[error("{value:?}: trust domain must not include a port")]
    PortNotAllowed { value: String },
    /// The trust domain carries user info.
    #[error("{value:?}: trust domain must not include user info")]
    UserInfoNotAllowed { value: String },
    /// Percent-encoded characters are not allowed anywhere in a SPIFFE ID.
    #[error("{value:?}: percent-encoding is not allowed")]
    PercentEncodingNotAllowed { value: String },
    /// The trust domain is longer than 255 bytes.
    #[error("{value:?}: trust domain is {len} bytes, longer than the maximum of 255")]
    TrustDomainTooLong { value: String, len: usize },
    /// The whole ID is longer than 2048 bytes.
    #[error("SPIFFE ID is {len} bytes, longer than the maximum of 2048")]
    TooLong { len: usize },
    /// The path has an empty segment (`//`).
    #[error("{value:?}: path cannot contain empty segments")]
    EmptySegment { value: String },
    /// The path has a `.` or `..` segment.
    #[error("{value:?}: path cannot contain dot segments (\".\" or \"..\")")]
    DotSegment { value: String },
    /// The path ends with `/`.
    #[error("{value:?}: path cannot have a trailing slash")]
    TrailingSlash { value: String },
    /// A path segment holds a character outside `[a-zA-Z0-9.-_]`.
    #[error(
        "{value:?}: path segment characters are limited to letters, numbers, dots, dashes and underscores (found {found:?})"
    )]
    BadPathChar { value: String, found: char },
    /// A query part (`?`) is present.
    #[error("{value:?}: query is not allowed")]
    QueryNotAllowed { value: String },
    /// A fragment part (`#`) is present.
    #[error("{value:?}: fragment is not allowed")]
    FragmentNotAllowed { value: String },
}

/// A SPIFFE trust domain name, e.g. `example.org`: only valid names can be held.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID, e.g. `spiffe://example.org/ns/web`: only valid IDs can be held.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    td_end: usize,
}

fn is_td_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

fn check_trust_domain(td: &str, whole: &str) -> Result<(), SpiffeIdError> {
    let value = whole.to_string();
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain { value });
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfoNotAllowed { value });
    }
    if td.contains(':') {
        return Err(SpiffeIdError::PortNotAllowed { value });
    }
    if td.contains('%') {
        return Err(SpiffeIdError::PercentEncodingNotAllowed { value });
    }
    if let Some(found) = td.chars().find(|c| !is_td_char(*c)) {
        return Err(SpiffeIdError::BadTrustDomainChar { value, found });
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong {
            value,
            len: td.len(),
        });
    }
    Ok(())
}

/// Checks a path (empty, or starting with `/`) against the segment rules.
fn check_path(path: &str, whole: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let value = whole.to_string();
    if path.contains('%') {
        return Err(SpiffeIdError::PercentEncodingNotAllowed { value });
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::BadPathChar {
            value,
            found: path.chars().next().unwrap_or('?'),
        });
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(if i == last {
                SpiffeIdError::TrailingSlash { value }
            } else {
                SpiffeIdError::EmptySegment { value }
            });
        }
        if *seg == "." || *seg == ".." {
            return Err(SpiffeIdError::DotSegment { value });
        }
        if let Some(found) = seg.chars().find(|c| !is_path_char(*c)) {
            return Err(SpiffeIdError::BadPathChar { value, found });
        }
    }
    Ok(())
}

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or the ID of a trust domain (`spiffe://example.org`).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain {
                value: String::new(),
            });
        }
        if s.contains(":/") {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::BadTrustDomainChar {
                    value: s.to_string(),
                    found: '/',
                });
            }
            return Ok(id.trust_domain());
        }
        check_trust_domain(s, s)?;
        Ok(TrustDomain(s.to_string()))
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself (no path), e.g. `spiffe://example.org`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME_PREFIX}{}", self.0),
            td_end: SCHEME_PREFIX.len() + self.0.len(),
        }
    }

    /// A SPIFFE ID in this trust domain with the given path (which must start with `/`).
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        let whole = format!("{SCHEME_PREFIX}{}{path}", self.0);
        // Without a leading `/` the path would silently extend the trust domain name.
        if let Some(found) = path.chars().next().filter(|c| *c != '/') {
            return Err(SpiffeIdError::BadPathChar {
                value: whole,
                found,
            });
        }
        SpiffeId::parse(&whole)
    }
}

impl SpiffeId {
    /// Parses a SPIFFE ID, naming the rule that failed on rejection.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let Some(rest) = s.strip_prefix(SCHEME_PREFIX) else {
            return Err(SpiffeIdError::WrongScheme {
                value: s.to_string(),
            });
        };
        if s.contains('#') {
            return Err(SpiffeIdError::FragmentNotAllowed {
                value: s.to_string(),
            });
        }
        if s.contains('?') {
            return Err(SpiffeIdError::QueryNotAllowed {
                value: s.to_string(),
            });
        }
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        check_trust_domain(td, s)?;
        check_path(path, s)?;
        Ok(SpiffeId {
            id: s.to_string(),
            td_end: SCHEME_PREFIX.len() + td_len,
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_string())
    }

    /// The trust domain name as a string slice.
    pub fn trust_domain_name(&self) -> &str {
        &self.id[SCHEME_PREFIX.len()..self.td_end]
    }

    /// The path, empty for a trust domain's own ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.td_end..]
    }

    /// True when the ID names the trust domain itself (no path), as a CA's ID must.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The same path in another trust domain (used by trust-domain migration).
    pub fn with_trust_domain(&self, td: &TrustDomain) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME_PREFIX}{}{}", td.as_str(), self.path()),
            td_end: SCHEME_PREFIX.len() + td.as_str().len(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::parse(&s).map_err(serde::de::Error::custom)
    }
}

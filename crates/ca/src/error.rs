//! The one error type of the CA: every variant names what failed and the value involved.

use std::path::PathBuf;
use std::time::Duration;

use sigil_spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A configuration value is out of range.
    #[error("CA config: {field} = {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A key type name is not one of the supported ones.
    #[error("unknown key type {value:?}: expected \"ec-p256\", \"ec-p384\" or \"rsa-2048\"")]
    UnknownKeyType { value: String },
    /// A TTL of zero was requested.
    #[error("{what} TTL must be greater than zero (got {ttl:?})")]
    ZeroTtl { what: &'static str, ttl: Duration },
    /// A file or directory operation failed.
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A private key file could not be parsed (its content is never shown).
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    /// A key file does not hold the key the journal says it does.
    #[error("key file {path} does not match {what} recorded in the CA journal")]
    KeyMismatch { path: PathBuf, what: String },
    /// A journal entry names a key file outside the key directory.
    #[error("CA journal names key file {name:?}, which is not a plain file name")]
    BadKeyFileName { name: String },
    /// The journal store could not be read.
    #[error("loading the CA journal: {reason}")]
    JournalLoad { reason: String },
    /// The journal store could not be written.
    #[error("saving the CA journal: {reason}")]
    JournalSave { reason: String },
    /// The journal content is not a valid CA journal.
    #[error("CA journal is invalid: {reason}")]
    JournalCorrupt { reason: String },
    /// The journal was written for another trust domain.
    #[error(
        "CA journal belongs to trust domain {journal}, but the CA is configured for {configured}"
    )]
    TrustDomainMismatch {
        journal: String,
        configured: TrustDomain,
    },
    /// Key generation failed.
    #[error("generating a {what} key: {reason}")]
    KeyGeneration { what: String, reason: String },
    /// Building or signing a certificate failed.
    #[error("issuing {what}: {reason}")]
    Issue { what: String, reason: String },
    /// A certificate could not be parsed.
    #[error("parsing {what}: {reason}")]
    CertParse { what: String, reason: String },
    /// The CSR could not be parsed.
    #[error("CSR is not a valid PKCS#10 request: {reason}")]
    CsrParse { reason: String },
    /// The CSR's self-signature does not verify.
    #[error("CSR signature does not verify with its own public key: {reason}")]
    CsrSignature { reason: String },
    /// The CSR carries a public key the CA will not certify.
    #[error("CSR public key rejected: {reason}")]
    CsrPublicKey { reason: String },
    /// The CSR does not carry exactly one URI SAN.
    #[error("CSR must carry exactly one URI SAN, found {count}")]
    CsrUriSanCount { count: usize },
    /// The CSR's URI SAN is not a SPIFFE ID.
    #[error("CSR URI SAN {value:?} is not a SPIFFE ID: {cause}")]
    CsrSpiffeId { value: String, cause: SpiffeIdError },
    /// A workload SVID was requested for an ID without a path.
    #[error("{id}: a workload SVID needs a SPIFFE ID with a path")]
    SpiffeIdWithoutPath { id: SpiffeId },
    /// A SVID was requested for an ID in another trust domain.
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignSpiffeId {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    /// A DNS SAN is not a valid DNS name.
    #[error("DNS name {name:?} is not valid")]
    InvalidDnsName { name: String },
    /// A JWT-SVID was requested without an audience.
    #[error("JWT-SVID audience must hold at least one non-empty value (got {audience:?})")]
    BadAudience { audience: Vec<String> },
    /// Encoding a JWT-SVID failed.
    #[error("signing JWT-SVID for {id}: {reason}")]
    Jwt { id: SpiffeId, reason: String },
    /// The active authority cannot sign because it has expired (rotation has not run).
    #[error("active CA {serial_hex} expired at unix time {not_after}; rotation must run first")]
    CaExpired { serial_hex: String, not_after: u64 },
    /// The upstream authority files are unusable.
    #[error("upstream authority {path}: {reason}")]
    Upstream { path: PathBuf, reason: String },
    /// The clock reads a time before the Unix epoch.
    #[error("clock reads a time before the Unix epoch")]
    ClockBeforeEpoch,
}

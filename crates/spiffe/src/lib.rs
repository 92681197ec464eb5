//! SPIFFE core: identifiers, SVID and bundle formats and their validation rules, without I/O.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod der;
pub mod id;
pub mod jwt;
pub mod x509;

pub use bundle::{Bundle, BundleError, BundleSet, JwtAuthority};
pub use id::{SpiffeId, SpiffeIdError, TrustDomain};
pub use jwt::{
    JwtAlgorithm, JwtHeader, JwtSvidClaims, JwtSvidError, parse_jwt_svid_insecure,
    validate_jwt_svid,
};
pub use x509::{
    X509SvidError, check_ca_profile, check_leaf_profile, spiffe_id_of_leaf, verify_x509_svid,
};

/// When an SVID issued at `issued_at` and expiring at `expires_at` is due for renewal: half-way
/// through its life, as SPIRE rotates (an SVID already past its expiry is due at once).
pub fn half_life(
    issued_at: std::time::SystemTime,
    expires_at: std::time::SystemTime,
) -> std::time::SystemTime {
    let life = expires_at.duration_since(issued_at).unwrap_or_default();
    issued_at + life / 2
}

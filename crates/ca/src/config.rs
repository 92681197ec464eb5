//! What the CA is told at start: key type, lifetimes, where keys live, an optional upstream, and a clock.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sigil_spiffe::TrustDomain;

use crate::error::CaError;

/// The key algorithm of CA signing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256.
    #[default]
    EcP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcP384,
    /// RSA 2048-bit with PKCS#1 v1.5 SHA-256 signatures.
    Rsa2048,
}

impl KeyType {
    /// The name used in config files: `ec-p256`, `ec-p384` or `rsa-2048`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ec-p256" => Ok(KeyType::EcP256),
            "ec-p384" => Ok(KeyType::EcP384),
            "rsa-2048" => Ok(KeyType::Rsa2048),
            _ => Err(CaError::UnknownKeyType {
                value: s.to_string(),
            }),
        }
    }
}

impl serde::Serialize for KeyType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for KeyType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A source of the current time, so tests can drive rotation.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// An external CA whose key signs sigil's CA certificates, read from PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAuthority {
    /// The external CA's certificate, then its chain up to a root (leaf-first, PEM).
    pub cert_chain_pem: PathBuf,
    /// The external CA's private key (PKCS#8 PEM, EC or RSA).
    pub key_pem: PathBuf,
}

/// Everything the CA needs to know at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// The trust domain the CA issues for.
    pub trust_domain: TrustDomain,
    /// Key algorithm of new CA keys (JWT keys are always ES256).
    pub key_type: KeyType,
    /// Lifetime of each CA certificate (capped by an upstream's expiry).
    pub ca_ttl: Duration,
    /// X.509-SVID lifetime when the caller gives none.
    pub default_x509_svid_ttl: Duration,
    /// JWT-SVID lifetime when the caller gives none.
    pub default_jwt_svid_ttl: Duration,
    /// Directory holding the CA's private keys (created with mode 0700).
    pub key_dir: PathBuf,
    /// An external CA to chain to; `None` means a self-signed root.
    pub upstream: Option<UpstreamAuthority>,
}

impl CaConfig {
    /// A config with SPIRE's default lifetimes (CA 24 h, X.509-SVID 1 h, JWT-SVID 5 min) and EC P-256 keys.
    pub fn new(trust_domain: TrustDomain, key_dir: PathBuf) -> Self {
        CaConfig {
            trust_domain,
            key_type: KeyType::EcP256,
            ca_ttl: Duration::from_secs(24 * 3600),
            default_x509_svid_ttl: Duration::from_secs(3600),
            default_jwt_svid_ttl: Duration::from_secs(300),
            key_dir,
            upstream: None,
        }
    }

    /// Checks the lifetimes once at start so a bad value stops start-up with its field name.
    pub(crate) fn validate(&self) -> Result<(), CaError> {
        // Rotation works in sixths of the CA lifetime with whole seconds, so a
        // shorter CA would rotate on every tick.
        if self.ca_ttl < Duration::from_secs(60) {
            return Err(CaError::InvalidConfig {
                field: "ca_ttl",
                value: format!("{:?}", self.ca_ttl),
                reason: "must be at least 60s",
            });
        }
        for (field, ttl) in [
            ("default_x509_svid_ttl", self.default_x509_svid_ttl),
            ("default_jwt_svid_ttl", self.default_jwt_svid_ttl),
        ] {
            if ttl.as_secs() == 0 {
                return Err(CaError::InvalidConfig {
                    field,
                    value: format!("{ttl:?}"),
                    reason: "must be at least 1s",
                });
            }
        }
        if self.key_dir.as_os_str().is_empty() {
            return Err(CaError::InvalidConfig {
                field: "key_dir",
                value: String::new(),
                reason: "must name a directory",
            });
        }
        Ok(())
    }
}

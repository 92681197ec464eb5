//! SPIRE's APIs that sigil serves: the Delegated Identity API and the `spire.api.types` messages it
//! uses. The nesting mirrors the protobuf packages exactly, since prost links packages through
//! `super::` paths.

use std::fmt;

/// Package `spire.api`.
pub mod api {
    /// Package `spire.api.types`: messages shared by SPIRE's APIs.
    #[allow(clippy::all, rust_2018_idioms)]
    pub mod types {
        tonic::include_proto!("spire.api.types");
    }

    /// APIs served by a SPIRE agent.
    pub mod agent {
        /// The Delegated Identity API, for trusted delegates fetching identities for workloads.
        pub mod delegatedidentity {
            /// Version 1: messages, the `DelegatedIdentity` server trait and the client.
            #[allow(clippy::all, rust_2018_idioms)]
            pub mod v1 {
                tonic::include_proto!("spire.api.agent.delegatedidentity.v1");
            }
        }
    }
}

// The messages below hold private keys or bearer tokens: their Debug leaves those out so that a
// logged message never leaks them.

impl fmt::Debug for api::types::Jwtsvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwtsvid")
            .field("token", &"<redacted>")
            .field("id", &self.id)
            .field("expires_at", &self.expires_at)
            .field("issued_at", &self.issued_at)
            .field("hint", &self.hint)
            .finish()
    }
}

impl fmt::Debug for api::agent::delegatedidentity::v1::X509svidWithKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509svidWithKey")
            .field("x509_svid", &self.x509_svid)
            .field("x509_svid_key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::api::agent::delegatedidentity::v1::X509svidWithKey;
    use super::api::types::{Jwtsvid, Spiffeid, X509svid};

    #[test]
    fn debug_leaves_out_keys_and_tokens() {
        let id = Spiffeid {
            trust_domain: "example.org".into(),
            path: "/w".into(),
        };
        let jwt = Jwtsvid {
            token: "header.claims.signature".into(),
            id: Some(id.clone()),
            expires_at: 20,
            issued_at: 10,
            hint: "h".into(),
        };
        let text = format!("{jwt:?}");
        assert!(
            text.contains("example.org") && text.contains("20"),
            "{text}"
        );
        assert!(!text.contains("signature"), "{text}");

        let with_key = X509svidWithKey {
            x509_svid: Some(X509svid {
                cert_chain: vec![vec![1]],
                id: Some(id),
                expires_at: 20,
                hint: String::new(),
            }),
            x509_svid_key: b"KEYBYTES".to_vec(),
        };
        let text = format!("{with_key:?}");
        assert!(text.contains("/w"), "{text}");
        assert!(
            !text.contains("75, 69, 89") && !text.contains("KEYBYTES"),
            "{text}"
        );
    }
}

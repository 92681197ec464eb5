//! A minimal node agent for tests: attests over TLS (join token or x509pop), then calls the agent API
//! with mutual TLS using its agent X.509-SVID.

use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use sigil_proto::agent::v1 as pb;
use sigil_proto::agent::v1::node_client::NodeClient;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::{SpiffeId, TrustDomain};
use tonic::transport::Channel;

/// A key pair and a CSR for it, as an agent makes them (the key never leaves the agent).
pub struct KeyAndCsr {
    /// DER CSR.
    pub csr: Vec<u8>,
    /// PKCS#8 private key.
    pub key: PrivatePkcs8KeyDer<'static>,
}

/// Makes an EC P-256 key and a CSR (optionally carrying a URI SAN, which the server ignores).
pub fn key_and_csr(uri: Option<&str>) -> anyhow::Result<KeyAndCsr> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    if let Some(u) = uri {
        params.subject_alt_names = vec![rcgen::SanType::URI(u.try_into()?)];
    }
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndCsr {
        csr: csr.der().to_vec(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    })
}

/// The agent's state: where the server is, what it trusts, and its SVID once attested.
pub struct TestAgent {
    /// Agent API address (`127.0.0.1:port`).
    pub addr: String,
    /// The trust domain.
    pub td: TrustDomain,
    /// Bundles the agent trusts (bootstrap bundle, then what the server sends).
    pub bundles: Arc<ArcSwap<BundleSet>>,
    /// The agent's SVID chain and key once attested.
    pub svid: Option<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>)>,
    /// The agent's SPIFFE ID once attested.
    pub id: Option<SpiffeId>,
}

impl TestAgent {
    /// An unattested agent that trusts `bootstrap` (DER X.509 authorities of `td`).
    pub fn new(addr: &str, td: &TrustDomain, bootstrap: Vec<CertificateDer<'static>>) -> Self {
        let mut b = Bundle::new(td.clone());
        b.x509_authorities = bootstrap;
        let mut set = BundleSet::new();
        set.insert(b);
        TestAgent {
            addr: addr.to_string(),
            td: td.clone(),
            bundles: Arc::new(ArcSwap::from_pointee(set)),
            svid: None,
            id: None,
        }
    }

    /// A gRPC channel over TLS 1.3 to the server (the real agent's connector), with the agent SVID as
    /// client certificate if `mtls`.
    pub async fn channel(&self, mtls: bool) -> anyhow::Result<Channel> {
        let connector = sigil_agent::node::Connector {
            addr: self.addr.clone(),
            td: self.td.clone(),
            bundles: self.bundles.clone(),
            insecure: false,
        };
        let identity = if mtls {
            let (chain, key) = self.svid.as_ref().context("agent is not attested")?;
            let id = self.id.clone().context("agent is not attested")?;
            Some(sigil_agent::node::AgentIdentity {
                id,
                chain: chain.clone(),
                key: key.clone_key(),
                expires_at: std::time::SystemTime::now(),
                issued_at: std::time::SystemTime::now(),
            })
        } else {
            None
        };
        connector.channel(identity.as_ref()).await
    }

    /// A client of the agent API authenticated with the agent SVID.
    pub async fn client(&self) -> anyhow::Result<NodeClient<Channel>> {
        Ok(NodeClient::new(self.channel(true).await?)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }

    fn adopt(
        &mut self,
        result: pb::AttestAgentResult,
        key: PrivatePkcs8KeyDer<'static>,
    ) -> anyhow::Result<()> {
        let chain = result
            .svid_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        self.svid = Some((chain, key));
        self.id = Some(SpiffeId::parse(&result.spiffe_id)?);
        let mut b = Bundle::new(self.td.clone());
        b.x509_authorities = result
            .bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let mut set = BundleSet::new();
        set.insert(b);
        self.bundles.store(Arc::new(set));
        Ok(())
    }

    /// Attests with a join token; on success the agent holds its SVID.
    pub async fn attest_join_token(
        &mut self,
        token: &str,
    ) -> Result<pb::AttestAgentResult, tonic::Status> {
        let kc = key_and_csr(None).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let channel = self
            .channel(false)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
        let mut client = NodeClient::new(channel);
        let req = pb::AttestAgentRequest {
            step: Some(pb::attest_agent_request::Step::Params(pb::AttestParams {
                kind: Some(pb::attest_params::Kind::JoinToken(pb::JoinTokenParams {
                    token: token.to_string(),
                })),
                csr: kc.csr,
            })),
        };
        let mut resp = client
            .attest_agent(futures::stream::iter(vec![req]))
            .await?
            .into_inner();
        let msg = resp
            .message()
            .await?
            .ok_or_else(|| tonic::Status::internal("attestation stream ended without result"))?;
        match msg.step {
            Some(pb::attest_agent_response::Step::Result(r)) => {
                self.adopt(r.clone(), kc.key)
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
                Ok(r)
            }
            _ => Err(tonic::Status::internal("unexpected attestation message")),
        }
    }

    /// Attests by x509pop: presents `chain` and signs the server's nonce with `pop_key`.
    pub async fn attest_x509pop(
        &mut self,
        chain: Vec<Vec<u8>>,
        pop_key: &rcgen::KeyPair,
    ) -> Result<pb::AttestAgentResult, tonic::Status> {
        let internal = |e: anyhow::Error| tonic::Status::internal(format!("{e:#}"));
        let kc = key_and_csr(None).map_err(internal)?;
        let mut client = NodeClient::new(self.channel(false).await.map_err(internal)?);
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(pb::AttestAgentRequest {
            step: Some(pb::attest_agent_request::Step::Params(pb::AttestParams {
                kind: Some(pb::attest_params::Kind::X509pop(pb::X509PopParams {
                    cert_chain: chain,
                })),
                csr: kc.csr,
            })),
        })
        .await
        .map_err(|_| tonic::Status::internal("send"))?;
        let mut resp = client
            .attest_agent(tokio_stream_from(rx))
            .await?
            .into_inner();
        loop {
            let msg = resp.message().await?.ok_or_else(|| {
                tonic::Status::internal("attestation stream ended without result")
            })?;
            match msg.step {
                Some(pb::attest_agent_response::Step::Challenge(nonce)) => {
                    let sig = sign_with(pop_key, &nonce).map_err(internal)?;
                    tx.send(pb::AttestAgentRequest {
                        step: Some(pb::attest_agent_request::Step::ChallengeResponse(sig)),
                    })
                    .await
                    .map_err(|_| tonic::Status::internal("send"))?;
                }
                Some(pb::attest_agent_response::Step::Result(r)) => {
                    self.adopt(r.clone(), kc.key).map_err(internal)?;
                    return Ok(r);
                }
                None => return Err(tonic::Status::internal("empty attestation message")),
            }
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Signs `msg` with an rcgen key (ECDSA P-256 SHA-256, ASN.1), as the x509pop challenge wants.
pub fn sign_with(key: &rcgen::KeyPair, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der())
        .map_err(|e| anyhow::anyhow!("bad key: {e}"))?;
    let sig = kp
        .sign(&SystemRandom::new(), msg)
        .map_err(|e| anyhow::anyhow!("sign: {e}"))?;
    Ok(sig.as_ref().to_vec())
}

//! The agent API (TLS 1.3 over TCP): node attestation, agent SVID renewal, workload SVID signing,
//! JWT-SVIDs, bundles and the stream of authorized entries.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use rustls_pki_types::CertificateDer;
use sha1::Digest;
use sigil_datastore::{AttestedAgent, Selector, TokenOutcome};
use sigil_proto::agent::v1 as pb;
use sigil_proto::agent_refusal::{self as refusal, Reason};
use sigil_spiffe::SpiffeId;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::{AgentView, Change, Revocation};
use crate::grpc::{blocking, bundle_to_pb, ds_status};
use crate::state::{State, unix};
use crate::validate::entry_to_pb;

/// Entries per message of the initial snapshot: keeps messages far below gRPC's 4 MiB default.
pub const SNAPSHOT_CHUNK: usize = 1000;

/// What the TLS layer learned about the peer, attached to every request on the connection.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's verified certificate chain (empty for an anonymous client).
    pub certs: Arc<Vec<CertificateDer<'static>>>,
    /// The peer's TCP address.
    pub addr: Option<std::net::SocketAddr>,
}

/// The agent API implementation.
#[derive(Clone)]
pub struct NodeApi {
    state: Arc<State>,
}

impl NodeApi {
    /// An agent API over `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

/// An authenticated agent making a request.
struct Caller {
    record: AttestedAgent,
    view: AgentView,
}

fn leaf_serial_hex(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert).ok()?;
    Some(hex::encode(c.raw_serial()))
}

impl NodeApi {
    /// Authenticates the caller by its mTLS SVID and the agent record (not evicted, not banned, current SVID).
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let leaf = peer.certs.first().ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: attest first, then connect with the agent X.509-SVID",
            )
        })?;
        let id = sigil_tls::peer_spiffe_id(&peer.certs)
            .ok_or_else(|| Status::unauthenticated("client certificate carries no SPIFFE ID"))?;
        if !id.path().starts_with("/sigil/agent/") {
            return Err(Status::permission_denied(format!(
                "{id} is not an agent identity"
            )));
        }
        let serial = leaf_serial_hex(leaf)
            .ok_or_else(|| Status::unauthenticated("client certificate cannot be parsed"))?;
        let state = self.state.clone();
        let id2 = id.clone();
        let record = blocking(move || state.ds.get_agent(&id2).map_err(ds_status))
            .await?
            .ok_or_else(|| {
                refusal::status(
                    Reason::Evicted,
                    format!("agent {id} is not attested (evicted or unknown): attest again"),
                )
            })?;
        if record.banned {
            return Err(refusal::status(
                Reason::Banned,
                format!("agent {id} is banned"),
            ));
        }
        if record.serial != serial {
            // The SVID of a renewal the agent has not used yet becomes current when it is first presented;
            // until then the previous one keeps working (an agent that died before storing it recovers).
            let pending = record.pending_serial.as_deref() == Some(serial.as_str());
            let promoted = pending && {
                let state = self.state.clone();
                let (id2, serial2) = (id.clone(), serial.clone());
                blocking(move || {
                    state
                        .ds
                        .promote_agent_serial(&id2, &serial2)
                        .map_err(ds_status)
                })
                .await?
            };
            if !promoted {
                return Err(Status::permission_denied(format!(
                    "agent {id}: SVID serial {serial} is not the agent's current one"
                )));
            }
        }
        // After a trust-domain migration, an agent attested in the old domain acts as its new-domain twin.
        let td = self.state.trust_domain();
        let view_id = if id.trust_domain_name() != td.as_str() {
            id.with_trust_domain(&td)
        } else {
            id
        };
        Ok(Caller {
            view: AgentView {
                id: view_id,
                selectors: record.selectors.clone(),
            },
            record,
        })
    }

    fn attest_result(&self, svid: sigil_ca::X509Svid) -> pb::AttestAgentResult {
        let bundle = self.state.own_bundle();
        pb::AttestAgentResult {
            spiffe_id: svid.spiffe_id.to_string(),
            svid_chain: svid.cert_chain.iter().map(|c| c.to_vec()).collect(),
            expires_at: unix(svid.expires_at),
            bundle: bundle.x509_authorities.iter().map(|c| c.to_vec()).collect(),
        }
    }

    /// Signs an agent CSR and records the agent.
    async fn issue_agent_svid(
        &self,
        id: SpiffeId,
        attestation_type: &str,
        selectors: Vec<Selector>,
        can_reattest: bool,
        csr: Vec<u8>,
    ) -> Result<pb::AttestAgentResult, Status> {
        let state = self.state.clone();
        let kind = attestation_type.to_string();
        let svid = blocking(move || {
            let svid = sign_agent_csr(&state, &csr, &id)?;
            state
                .ds
                .upsert_agent(&AttestedAgent {
                    spiffe_id: id,
                    attestation_type: kind,
                    serial: svid.serial_hex.clone(),
                    expires_at: unix(svid.expires_at),
                    banned: false,
                    selectors,
                    can_reattest,
                    pending_serial: None,
                })
                .map_err(ds_status)?;
            Ok(svid)
        })
        .await?;
        tracing::info!(agent = %svid.spiffe_id, attestation_type, "agent attested");
        Ok(self.attest_result(svid))
    }

    async fn refuse_if_banned(&self, id: &SpiffeId) -> Result<(), Status> {
        let state = self.state.clone();
        let id2 = id.clone();
        let existing = blocking(move || state.ds.get_agent(&id2).map_err(ds_status)).await?;
        if existing.is_some_and(|a| a.banned) {
            return Err(refusal::status(
                Reason::Banned,
                format!("agent {id} is banned"),
            ));
        }
        Ok(())
    }

    async fn attest_join_token(
        &self,
        token: String,
        csr: Vec<u8>,
    ) -> Result<pb::AttestAgentResult, Status> {
        if token.is_empty() {
            return Err(Status::invalid_argument("join_token.token: empty"));
        }
        let td = self.state.trust_domain();
        let id = td
            .id_with_path(&format!("/sigil/agent/join_token/{token}"))
            .map_err(|_| Status::permission_denied("join token unknown"))?;
        self.refuse_if_banned(&id).await?;
        let state = self.state.clone();
        let now = self.state.now();
        let outcome =
            blocking(move || state.ds.consume_join_token(&token, now).map_err(ds_status)).await?;
        match outcome {
            TokenOutcome::Consumed(_) => {}
            TokenOutcome::Unknown => {
                return Err(Status::permission_denied("join token unknown"));
            }
            TokenOutcome::AlreadyUsed => {
                return Err(Status::permission_denied("join token already used"));
            }
            TokenOutcome::Expired => {
                return Err(Status::permission_denied("join token expired"));
            }
        }
        self.issue_agent_svid(id, "join_token", vec![], false, csr)
            .await
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Verifies an x509pop chain against the configured roots and returns the fingerprints (hex SHA-1 of the
/// DER) of the CA certificates on the verified path: its intermediates, then its trust anchor.
///
/// Only the path the verifier built counts: certificates the agent sent that are not on it (say, another
/// trusted CA appended to the chain file) contribute nothing, so a node cannot claim a CA that did not
/// issue its certificate.
fn x509pop_verify(
    roots: &[CertificateDer<'static>],
    chain: &[Vec<u8>],
    now: std::time::SystemTime,
) -> Result<Vec<String>, Status> {
    let leaf = chain
        .first()
        .ok_or_else(|| Status::invalid_argument("x509pop.cert_chain: empty"))?;
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let ee = webpki_ee(&leaf_der)?;
    // Each anchor beside the root certificate it came from, to name the anchor the path ends at.
    let (anchors, anchor_roots): (Vec<_>, Vec<_>) = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok().map(|a| (a, r)))
        .unzip();
    let inter: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let path = ee
        .verify_for_usage(
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &inter,
            rustls_pki_types::UnixTime::since_unix_epoch(secs),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            Status::permission_denied(format!(
                "x509pop: certificate does not chain to a trusted CA: {e:?}"
            ))
        })?;
    let fingerprint = |der: &[u8]| hex::encode(sha1::Sha1::digest(der));
    let mut cas: Vec<String> = path
        .intermediate_certificates()
        .map(|c| fingerprint(c.der().as_ref()))
        .collect();
    let anchor = anchors
        .iter()
        .position(|a| std::ptr::eq(a, path.anchor()))
        .and_then(|i| anchor_roots.get(i))
        .ok_or_else(|| {
            Status::internal("x509pop: the verified path's anchor is not a configured root")
        })?;
    cas.push(fingerprint(anchor.as_ref()));
    Ok(cas)
}

fn webpki_ee<'a>(der: &'a CertificateDer<'a>) -> Result<webpki::EndEntityCert<'a>, Status> {
    webpki::EndEntityCert::try_from(der).map_err(|e| {
        Status::invalid_argument(format!("x509pop.cert_chain[0]: invalid certificate: {e:?}"))
    })
}

/// Node selectors of an x509pop agent (as SPIRE names them) and its fingerprint; `path_cas` are the
/// fingerprints of the CAs on the verified path (see [`x509pop_verify`]).
fn x509pop_identity(leaf: &[u8], path_cas: &[String]) -> Result<(String, Vec<Selector>), Status> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| Status::invalid_argument(format!("x509pop.cert_chain[0]: {e}")))?;
    let fingerprint = hex::encode(sha1::Sha1::digest(leaf));
    let mut sels = vec![];
    let mut push = |v: String| {
        if let Ok(s) = Selector::new("x509pop", &v) {
            sels.push(s);
        }
    };
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
    {
        push(format!("subject:cn:{cn}"));
    }
    push(format!("serialnumber:{}", hex::encode(cert.raw_serial())));
    for ca in path_cas {
        push(format!("ca:fingerprint:{ca}"));
    }
    Ok((fingerprint, sels))
}

fn verify_pop_signature(leaf: &[u8], nonce: &[u8], sig: &[u8]) -> Result<(), Status> {
    use aws_lc_rs::signature;
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| Status::invalid_argument(format!("x509pop.cert_chain[0]: {e}")))?;
    let spki = cert.public_key();
    let key = spki.subject_public_key.data.as_ref();
    let alg: &dyn signature::VerificationAlgorithm = match spki.parsed() {
        Ok(x509_parser::public_key::PublicKey::EC(ec)) if ec.key_size() == 384 => {
            &signature::ECDSA_P384_SHA384_ASN1
        }
        Ok(x509_parser::public_key::PublicKey::EC(_)) => &signature::ECDSA_P256_SHA256_ASN1,
        Ok(x509_parser::public_key::PublicKey::RSA(_)) => &signature::RSA_PKCS1_2048_8192_SHA256,
        _ => {
            return Err(Status::invalid_argument(
                "x509pop: unsupported key type (EC P-256, P-384 or RSA)",
            ));
        }
    };
    signature::UnparsedPublicKey::new(alg, key)
        .verify(nonce, sig)
        .map_err(|_| Status::permission_denied("x509pop: challenge signature invalid"))
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    type AttestAgentStream = BoxStream<pb::AttestAgentResponse>;

    async fn attest_agent(
        &self,
        req: Request<Streaming<pb::AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("params: stream ended before parameters"))?;
        let Some(pb::attest_agent_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument(
                "params: the first message must carry params",
            ));
        };
        let api = self.clone();
        let (tx, rx) = mpsc::channel(2);
        match params.kind {
            Some(pb::attest_params::Kind::JoinToken(jt)) => {
                let result = api.attest_join_token(jt.token, params.csr).await;
                api.state.metrics.attestation("join_token", result.is_ok());
                let result = result?;
                let _ = tx
                    .send(Ok(pb::AttestAgentResponse {
                        step: Some(pb::attest_agent_response::Step::Result(result)),
                    }))
                    .await;
            }
            Some(pb::attest_params::Kind::X509pop(pop)) => {
                let m = api.state.metrics.clone();
                let failed = |e: Status| {
                    m.attestation("x509pop", false);
                    e
                };
                let roots = api.state.x509pop_roots.clone().ok_or_else(|| {
                    failed(Status::permission_denied(
                        "x509pop attestation is not enabled on this server",
                    ))
                })?;
                let path_cas = x509pop_verify(&roots, &pop.cert_chain, api.state.clock.now())
                    .map_err(failed)?;
                let leaf = pop.cert_chain[0].clone();
                let (fp, selectors) = x509pop_identity(&leaf, &path_cas).map_err(failed)?;
                let td = api.state.trust_domain();
                let id = td
                    .id_with_path(&format!("/sigil/agent/x509pop/{fp}"))
                    .map_err(|e| failed(Status::internal(e.to_string())))?;
                api.refuse_if_banned(&id).await.map_err(failed)?;
                let nonce: [u8; 32] = rand::random();
                tx.send(Ok(pb::AttestAgentResponse {
                    step: Some(pb::attest_agent_response::Step::Challenge(nonce.to_vec())),
                }))
                .await
                .map_err(|_| Status::cancelled("client went away"))?;
                let csr = params.csr;
                tokio::spawn(async move {
                    let outcome = async {
                        let msg = inbound.message().await?.ok_or_else(|| {
                            Status::invalid_argument("challenge_response: stream ended")
                        })?;
                        let Some(pb::attest_agent_request::Step::ChallengeResponse(sig)) = msg.step
                        else {
                            return Err(Status::invalid_argument(
                                "challenge_response: expected the signed challenge",
                            ));
                        };
                        verify_pop_signature(&leaf, &nonce, &sig)?;
                        api.issue_agent_svid(id, "x509pop", selectors, true, csr)
                            .await
                    }
                    .await;
                    api.state.metrics.attestation("x509pop", outcome.is_ok());
                    let _ = tx
                        .send(outcome.map(|r| pb::AttestAgentResponse {
                            step: Some(pb::attest_agent_response::Step::Result(r)),
                        }))
                        .await;
                });
            }
            None => return Err(Status::invalid_argument("params.kind: missing")),
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let caller = self.caller(&req).await?;
        let csr = req.into_inner().csr;
        let state = self.state.clone();
        let id = caller.record.spiffe_id.clone();
        let svid = blocking(move || {
            let svid = sign_agent_csr(&state, &csr, &id)?;
            state
                .ds
                .record_agent_renewal(&id, &svid.serial_hex, unix(svid.expires_at))
                .map_err(ds_status)?;
            Ok(svid)
        })
        .await?;
        Ok(Response::new(pb::RenewAgentResponse {
            result: Some(self.attest_result(svid)),
        }))
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<pb::BatchNewX509svidRequest>,
    ) -> Result<Response<pb::BatchNewX509svidResponse>, Status> {
        let t0 = std::time::Instant::now();
        let caller = self.caller(&req).await?;
        let params = req.into_inner().params;
        crate::validate::batch_len("params", params.len())?;
        let now = self.state.now();
        let t_auth = t0.elapsed();
        let mut jobs = Vec::with_capacity(params.len());
        let mut results: Vec<Option<pb::X509svidResult>> = vec![None; params.len()];
        for (i, p) in params.into_iter().enumerate() {
            let fail = |code: tonic::Code, msg: String| pb::X509svidResult {
                status_code: code as i32,
                status_message: msg,
                entry_id: p.entry_id.clone(),
                ..Default::default()
            };
            match self.state.catalog.get(&p.entry_id) {
                None => {
                    results[i] = Some(fail(
                        tonic::Code::NotFound,
                        format!("entry_id: no entry {:?}", p.entry_id),
                    ))
                }
                // Entries are validated on creation; this keeps the server's and agents' IDs out of
                // workload SVIDs even for an entry that slipped in some other way (an old database).
                Some(e)
                    if crate::validate::not_reserved("entry.spiffe_id", &e.spiffe_id).is_err() =>
                {
                    results[i] = Some(fail(
                        tonic::Code::PermissionDenied,
                        format!(
                            "entry {:?}: {} is under the reserved path /sigil/",
                            p.entry_id, e.spiffe_id
                        ),
                    ))
                }
                Some(e) if !self.state.catalog.is_authorized(&caller.view, &e, now) => {
                    results[i] = Some(fail(
                        tonic::Code::PermissionDenied,
                        format!(
                            "entry {:?} ({}) is not authorized for agent {}",
                            p.entry_id, e.spiffe_id, caller.view.id
                        ),
                    ))
                }
                Some(e) => jobs.push((i, e, p.csr)),
            }
        }
        // Signing is CPU-bound: split the batch across the blocking pool.
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .max(1);
        let per = jobs.len().div_ceil(workers).max(1);
        let mut handles = Vec::new();
        let mut jobs = jobs.into_iter();
        loop {
            let chunk: Vec<_> = jobs.by_ref().take(per).collect();
            if chunk.is_empty() {
                break;
            }
            let ca = self.state.ca.load_full();
            let metrics = self.state.metrics.clone();
            handles.push(tokio::task::spawn_blocking(move || {
                chunk
                    .into_iter()
                    .map(|(i, e, csr)| {
                        let ttl = (e.x509_svid_ttl > 0)
                            .then(|| Duration::from_secs(e.x509_svid_ttl as u64));
                        let r = match ca.sign_csr(&csr, &e.spiffe_id, &e.dns_names, ttl) {
                            Ok(svid) => {
                                metrics.x509_signed();
                                pb::X509svidResult {
                                    status_code: 0,
                                    status_message: String::new(),
                                    entry_id: e.id.clone(),
                                    spiffe_id: e.spiffe_id.to_string(),
                                    cert_chain: svid
                                        .cert_chain
                                        .iter()
                                        .map(|c| c.to_vec())
                                        .collect(),
                                    expires_at: unix(svid.expires_at),
                                }
                            }
                            Err(err) => pb::X509svidResult {
                                status_code: tonic::Code::InvalidArgument as i32,
                                status_message: format!("csr: {err}"),
                                entry_id: e.id.clone(),
                                ..Default::default()
                            },
                        };
                        (i, r)
                    })
                    .collect::<Vec<_>>()
            }));
        }
        for h in handles {
            for (i, r) in h
                .await
                .map_err(|e| Status::internal(format!("signing worker failed: {e}")))?
            {
                results[i] = Some(r);
            }
        }
        tracing::debug!(
            svids = results.len(),
            caller_us = t_auth.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "batch signed"
        );
        Ok(Response::new(pb::BatchNewX509svidResponse {
            results: results.into_iter().flatten().collect(),
        }))
    }

    async fn new_jwtsvid(
        &self,
        req: Request<pb::NewJwtsvidRequest>,
    ) -> Result<Response<pb::NewJwtsvidResponse>, Status> {
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument(
                "audience: at least one non-empty audience is required",
            ));
        }
        let e =
            self.state.catalog.get(&req.entry_id).ok_or_else(|| {
                Status::not_found(format!("entry_id: no entry {:?}", req.entry_id))
            })?;
        if !self
            .state
            .catalog
            .is_authorized(&caller.view, &e, self.state.now())
        {
            return Err(Status::permission_denied(format!(
                "entry {:?} ({}) is not authorized for agent {}",
                req.entry_id, e.spiffe_id, caller.view.id
            )));
        }
        if crate::validate::not_reserved("entry.spiffe_id", &e.spiffe_id).is_err() {
            return Err(Status::permission_denied(format!(
                "entry {:?}: {} is under the reserved path /sigil/",
                req.entry_id, e.spiffe_id
            )));
        }
        let ttl = (e.jwt_svid_ttl > 0).then(|| Duration::from_secs(e.jwt_svid_ttl as u64));
        let jwt = self
            .state
            .ca
            .load()
            .mint_jwt_svid(&e.spiffe_id, &req.audience, ttl)
            .map_err(|err| Status::internal(err.to_string()))?;
        self.state.metrics.jwt_signed();
        Ok(Response::new(pb::NewJwtsvidResponse {
            token: jwt.token,
            expires_at: unix(jwt.expires_at),
            spiffe_id: e.spiffe_id.to_string(),
        }))
    }

    async fn fetch_bundles(
        &self,
        req: Request<pb::FetchBundlesRequest>,
    ) -> Result<Response<pb::FetchBundlesResponse>, Status> {
        self.caller(&req).await?;
        let mut bundles = vec![bundle_to_pb(&self.state.own_bundle())];
        let state = self.state.clone();
        let fed = blocking(move || {
            state
                .federated_bundles()
                .map_err(|e| Status::internal(format!("{e:#}")))
        })
        .await?;
        bundles.extend(fed.iter().map(bundle_to_pb));
        Ok(Response::new(pb::FetchBundlesResponse { bundles }))
    }

    type SyncEntriesStream = BoxStream<pb::SyncEntriesResponse>;

    async fn sync_entries(
        &self,
        req: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<Self::SyncEntriesStream>, Status> {
        let caller = self.caller(&req).await?;
        // Subscribe before the snapshot so no change falls between the two.
        let changes = self.state.catalog.subscribe();
        let (tx, rx) = mpsc::channel(16);
        let state = self.state.clone();
        tokio::spawn(async move {
            let stream = EntryStream {
                state,
                agent: caller.view,
                agent_record_id: caller.record.spiffe_id,
                sent: HashMap::new(),
                tx,
            };
            stream.run(changes).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One agent's entry stream: a chunked snapshot, then deltas.
struct EntryStream {
    state: Arc<State>,
    agent: AgentView,
    agent_record_id: SpiffeId,
    sent: HashMap<String, i64>,
    tx: mpsc::Sender<Result<pb::SyncEntriesResponse, Status>>,
}

impl EntryStream {
    async fn send(&self, msg: pb::SyncEntriesResponse) -> bool {
        self.tx.send(Ok(msg)).await.is_ok()
    }

    async fn snapshot(&mut self) -> bool {
        let entries = self.state.catalog.authorized(&self.agent, self.state.now());
        let total = entries.len();
        let mut chunks = entries.chunks(SNAPSHOT_CHUNK).peekable();
        if total == 0 {
            return self
                .send(pb::SyncEntriesResponse {
                    snapshot: true,
                    snapshot_complete: true,
                    ..Default::default()
                })
                .await;
        }
        while let Some(chunk) = chunks.next() {
            for e in chunk {
                self.sent.insert(e.id.clone(), e.revision);
            }
            let msg = pb::SyncEntriesResponse {
                entries: chunk.iter().map(|e| entry_to_pb(e)).collect(),
                snapshot: true,
                snapshot_complete: chunks.peek().is_none(),
                ..Default::default()
            };
            if !self.send(msg).await {
                return false;
            }
        }
        true
    }

    /// Recomputes the whole authorized set and sends the difference.
    async fn resync(&mut self) -> bool {
        let entries = self.state.catalog.authorized(&self.agent, self.state.now());
        let mut now_ids = HashMap::with_capacity(entries.len());
        let mut upserts = Vec::new();
        for e in &entries {
            now_ids.insert(e.id.clone(), e.revision);
            if self.sent.get(&e.id) != Some(&e.revision) {
                upserts.push(entry_to_pb(e));
            }
        }
        let removed: Vec<String> = self
            .sent
            .keys()
            .filter(|id| !now_ids.contains_key(*id))
            .cloned()
            .collect();
        self.sent = now_ids;
        if upserts.is_empty() && removed.is_empty() {
            return true;
        }
        let mut first = true;
        let mut iter = upserts.chunks(SNAPSHOT_CHUNK);
        loop {
            let chunk = iter.next();
            if chunk.is_none() && !first {
                break;
            }
            let msg = pb::SyncEntriesResponse {
                entries: chunk.map(|c| c.to_vec()).unwrap_or_default(),
                removed_entry_ids: if first { removed.clone() } else { vec![] },
                ..Default::default()
            };
            first = false;
            if !self.send(msg).await {
                return false;
            }
        }
        true
    }

    async fn run(mut self, mut changes: broadcast::Receiver<Change>) {
        if !self.snapshot().await {
            return;
        }
        loop {
            let change = tokio::select! {
                c = changes.recv() => c,
                _ = self.tx.closed() => return,
            };
            let ok = match change {
                Ok(Change::Upserted { old, new }) => {
                    let structural = self.state.catalog.is_structural(&new)
                        || old.as_ref().is_some_and(|o| {
                            self.state.catalog.is_structural(o) || o.spiffe_id != new.spiffe_id
                        });
                    if structural {
                        self.resync().await
                    } else {
                        let now = self.state.now();
                        if self.state.catalog.is_authorized(&self.agent, &new, now) {
                            self.sent.insert(new.id.clone(), new.revision);
                            self.send(pb::SyncEntriesResponse {
                                entries: vec![entry_to_pb(&new)],
                                ..Default::default()
                            })
                            .await
                        } else if self.sent.remove(&new.id).is_some() {
                            self.send(pb::SyncEntriesResponse {
                                removed_entry_ids: vec![new.id.clone()],
                                ..Default::default()
                            })
                            .await
                        } else {
                            true
                        }
                    }
                }
                Ok(Change::Removed(e)) => {
                    if self.state.catalog.is_structural(&e) || e.parent_id == self.state.server_id()
                    {
                        self.resync().await
                    } else if self.sent.remove(&e.id).is_some() {
                        self.send(pb::SyncEntriesResponse {
                            removed_entry_ids: vec![e.id.clone()],
                            ..Default::default()
                        })
                        .await
                    } else {
                        true
                    }
                }
                Ok(Change::AgentRevoked(id, why)) => {
                    if id == self.agent_record_id {
                        let status = match why {
                            Revocation::Evicted => refusal::status(
                                Reason::Evicted,
                                format!("agent {id} was evicted: attest again"),
                            ),
                            Revocation::Banned => {
                                refusal::status(Reason::Banned, format!("agent {id} was banned"))
                            }
                        };
                        let _ = self.tx.send(Err(status)).await;
                        return;
                    }
                    true
                }
                Ok(Change::BundlesChanged) => {
                    self.send(pb::SyncEntriesResponse {
                        bundles_changed: true,
                        ..Default::default()
                    })
                    .await
                }
                Ok(Change::Resync) => self.resync().await,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(agent = %self.agent.id, missed = n, "entry stream lagged; resyncing");
                    self.resync().await
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if !ok {
                return;
            }
        }
    }
}

/// Signs an agent's CSR for its SPIFFE ID (attestation and renewal alike); a bad CSR is
/// `InvalidArgument` naming the `csr` field.
fn sign_agent_csr(state: &State, csr: &[u8], id: &SpiffeId) -> Result<sigil_ca::X509Svid, Status> {
    let svid = state
        .ca
        .load()
        .sign_csr(csr, id, &[], None)
        .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
    state.metrics.x509_signed();
    Ok(svid)
}

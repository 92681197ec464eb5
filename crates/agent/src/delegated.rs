//! SPIRE's Delegated Identity API on the admin socket: a trusted delegate (e.g. the network daemon) gets
//! SVIDs and bundles on behalf of workloads named by selectors or by PID. Only callers whose attested
//! identity is an authorized delegate are served, re-checked on every update; admin and downstream
//! entries are never served.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sigil_attestor::{PeerIdentity, WorkloadAttestor};
use sigil_proto::spire::api::agent::delegatedidentity::v1 as dpb;
use sigil_proto::spire::api::types as tpb;
use sigil_registry::{Entry, Selector};
use tonic::{Request, Response, Status};

use crate::cache::Cache;
use crate::manager::Manager;
use crate::workload::{attest_caller, caller as caller_identity, jwt_jwks, spawn_watch, x509_der};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Delegated Identity API implementation.
#[derive(Clone)]
pub struct DelegatedApi {
    manager: Arc<Manager>,
    attestor: Arc<dyn WorkloadAttestor>,
}

fn spiffeid(id: &sigil_spiffe::SpiffeId) -> tpb::Spiffeid {
    tpb::Spiffeid {
        trust_domain: id.trust_domain_name().to_string(),
        path: id.path().to_string(),
    }
}

impl DelegatedApi {
    /// A Delegated Identity API over the manager's caches.
    pub fn new(manager: Arc<Manager>, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        Self { manager, attestor }
    }

    /// The gRPC service.
    pub fn into_server(self) -> dpb::delegated_identity_server::DelegatedIdentityServer<Self> {
        dpb::delegated_identity_server::DelegatedIdentityServer::new(self)
    }

    fn cache(&self) -> &Arc<Cache> {
        &self.manager.cache
    }

    /// Checks that the caller (by its selectors) holds an authorized delegate identity.
    fn authorize(&self, caller: &[Selector]) -> Result<(), Status> {
        check_delegate(
            self.cache(),
            &self.manager.config.authorized_delegates,
            caller,
        )
    }

    /// The selectors a request names: exactly one of selectors or pid.
    async fn target_selectors(
        &self,
        selectors: &[tpb::Selector],
        pid: i32,
    ) -> Result<Vec<Selector>, Status> {
        match (selectors.is_empty(), pid) {
            (false, 0) => {
                let mut out = Vec::with_capacity(selectors.len());
                for (i, s) in selectors.iter().enumerate() {
                    out.push(Selector::new(&s.r#type, &s.value).map_err(|e| {
                        Status::invalid_argument(format!(
                            "selectors[{i}]: invalid selector {:?}: {e}",
                            format!("{}:{}", s.r#type, s.value)
                        ))
                    })?);
                }
                out.sort();
                out.dedup();
                Ok(out)
            }
            (true, 0) => Err(Status::invalid_argument(
                "selectors or pid: one of them is required",
            )),
            (true, p) if p > 0 => {
                let attestor = self.attestor.clone();
                let mut sels = tokio::task::spawn_blocking(move || {
                    let peer = PeerIdentity::from_pid(p)?;
                    attestor.attest(&peer)
                })
                .await
                .map_err(|e| Status::internal(format!("attestation worker failed: {e}")))?
                .map_err(|e| {
                    Status::invalid_argument(format!("pid: cannot attest process {p}: {e}"))
                })?;
                sels.sort();
                sels.dedup();
                Ok(sels)
            }
            (true, p) => Err(Status::invalid_argument(format!("pid: invalid value {p}"))),
            (false, p) => Err(Status::invalid_argument(format!(
                "selectors and pid: give one, not both (pid {p} with {} selectors)",
                selectors.len()
            ))),
        }
    }
}

impl DelegatedApi {
    /// Every bundle rendered by `render`, keyed by trust-domain SPIFFE ID, re-sent on change while the
    /// caller stays an authorized delegate.
    async fn bundle_stream<T>(
        &self,
        req: &Request<T>,
        render: fn(&sigil_spiffe::bundle::Bundle) -> Vec<u8>,
    ) -> Result<BoxStream<HashMap<String, Vec<u8>>>, Status> {
        let caller = attest_caller(&self.attestor, req).await?;
        self.authorize(&caller)?;
        let cache = self.cache().clone();
        let c2 = cache.clone();
        let delegates = self.manager.config.authorized_delegates.clone();
        Ok(spawn_watch(caller_identity(req)?, cache, move || {
            if let Err(s) = check_delegate(&c2, &delegates, &caller) {
                return Some(Err(s));
            }
            Some(Ok(c2
                .bundles
                .load()
                .iter()
                .map(|b| (b.trust_domain.id().to_string(), render(b)))
                .collect()))
        }))
    }
}

/// Maps every item of a stream into a response message.
fn map_stream<A: Send + 'static, B: Send + 'static>(
    s: BoxStream<A>,
    f: fn(A) -> B,
) -> BoxStream<B> {
    use futures::StreamExt;
    Box::pin(s.map(move |r| r.map(f)))
}

/// Whether the caller holds an authorized delegate identity (an entry matching its selectors whose SPIFFE
/// ID is in the configured list).
pub fn check_delegate(
    cache: &Cache,
    delegates: &[sigil_spiffe::SpiffeId],
    caller: &[Selector],
) -> Result<(), Status> {
    let ids: Vec<_> = cache
        .matching(caller, true)
        .into_iter()
        .map(|e| e.spiffe_id.clone())
        .collect();
    if ids.iter().any(|id| delegates.contains(id)) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "caller is not an authorized delegate (its identities: [{}])",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

fn unprivileged(cache: &Cache, selectors: &[Selector]) -> Vec<Arc<Entry>> {
    cache.matching(selectors, false)
}

#[tonic::async_trait]
impl dpb::delegated_identity_server::DelegatedIdentity for DelegatedApi {
    type SubscribeToX509SVIDsStream = BoxStream<dpb::SubscribeToX509sviDsResponse>;

    async fn subscribe_to_x509svi_ds(
        &self,
        req: Request<dpb::SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        let caller = attest_caller(&self.attestor, &req).await?;
        self.authorize(&caller)?;
        let peer = caller_identity(&req)?;
        let r = req.into_inner();
        let target = self.target_selectors(&r.selectors, r.pid).await?;
        let cache = self.cache().clone();
        let c2 = cache.clone();
        let delegates = self.manager.config.authorized_delegates.clone();
        let mut guard: Option<crate::cache::Interest> = None;
        let mut guarded: Vec<String> = Vec::new();
        Ok(Response::new(spawn_watch(peer, cache, move || {
            if let Err(s) = check_delegate(&c2, &delegates, &caller) {
                return Some(Err(s));
            }
            let entries = unprivileged(&c2, &target);
            let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
            if ids != guarded {
                guard.replace(c2.interest(&entries));
                guarded = ids;
            }
            let svids = c2.svids_for(&entries)?;
            let mut federates_with: Vec<String> = entries
                .iter()
                .flat_map(|e| e.federates_with.iter().map(|t| t.to_string()))
                .collect();
            federates_with.sort();
            federates_with.dedup();
            Some(Ok(dpb::SubscribeToX509sviDsResponse {
                x509_svids: entries
                    .iter()
                    .zip(svids)
                    .map(|(e, s)| dpb::X509svidWithKey {
                        x509_svid: Some(tpb::X509svid {
                            id: Some(spiffeid(&s.spiffe_id)),
                            cert_chain: s.chain.iter().map(|c| c.to_vec()).collect(),
                            expires_at: s
                                .expires_at
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_secs() as i64)
                                .unwrap_or(0),
                            hint: e.hint.clone(),
                        }),
                        x509_svid_key: s.key.secret_pkcs8_der().to_vec(),
                    })
                    .collect(),
                federates_with,
            }))
        })))
    }

    type SubscribeToX509BundlesStream = BoxStream<dpb::SubscribeToX509BundlesResponse>;

    async fn subscribe_to_x509_bundles(
        &self,
        req: Request<dpb::SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        let bundles = self.bundle_stream(&req, x509_der).await?;
        Ok(Response::new(map_stream(bundles, |ca_certificates| {
            dpb::SubscribeToX509BundlesResponse { ca_certificates }
        })))
    }

    async fn fetch_jwtsvi_ds(
        &self,
        req: Request<dpb::FetchJwtsviDsRequest>,
    ) -> Result<Response<dpb::FetchJwtsviDsResponse>, Status> {
        let caller = attest_caller(&self.attestor, &req).await?;
        self.authorize(&caller)?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument(
                "audience: at least one is required",
            ));
        }
        let target = self.target_selectors(&r.selectors, r.pid).await?;
        let entries = unprivileged(self.cache(), &target);
        let mut svids = Vec::new();
        for e in entries {
            let jwt = self.manager.jwt_svid(&e, &r.audience).await?;
            let secs = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0)
            };
            svids.push(tpb::Jwtsvid {
                token: jwt.token,
                id: Some(spiffeid(&e.spiffe_id)),
                expires_at: secs(jwt.expires_at),
                issued_at: secs(jwt.issued_at),
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(dpb::FetchJwtsviDsResponse { svids }))
    }

    type SubscribeToJWTBundlesStream = BoxStream<dpb::SubscribeToJwtBundlesResponse>;

    async fn subscribe_to_jwt_bundles(
        &self,
        req: Request<dpb::SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        let bundles = self.bundle_stream(&req, jwt_jwks).await?;
        Ok(Response::new(map_stream(bundles, |bundles| {
            dpb::SubscribeToJwtBundlesResponse { bundles }
        })))
    }
}

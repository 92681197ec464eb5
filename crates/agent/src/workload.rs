//! The SPIFFE Workload API (standard gRPC service, no proto package) on the public Unix socket. Every
//! request is attested from the socket's peer credentials; no request is trusted by file permission.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sigil_attestor::{PeerIdentity, PeerInfo, WorkloadAttestor};
use sigil_proto::workload as wpb;
use sigil_registry::{Entry, Selector};
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::{SpiffeId, TrustDomain};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cache::{Cache, CachedSvid};
use crate::manager::Manager;

/// Concurrent workload attestations (each runs on the blocking pool).
static ATTEST_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);

/// The metadata key every Workload API request must carry with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Workload API implementation.
#[derive(Clone)]
pub struct WorkloadApi {
    manager: Arc<Manager>,
    attestor: Arc<dyn WorkloadAttestor>,
}

/// Checks the security header.
pub fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: workload.spiffe.io: true",
        )),
    }
}

/// Attests the caller of a request from its socket peer identity (off the async runtime: it reads /proc).
pub async fn attest_caller<T>(
    attestor: &Arc<dyn WorkloadAttestor>,
    req: &Request<T>,
) -> Result<Vec<Selector>, Status> {
    let peer = caller(req)?;
    let attestor = attestor.clone();
    // Bound the blocking work (it reads /proc and may hash an executable): a burst of callers must not
    // spawn hundreds of threads.
    let _permit = ATTEST_SLOTS
        .acquire()
        .await
        .map_err(|_| Status::internal("attestation closed"))?;
    let mut sels = tokio::task::spawn_blocking(move || attestor.attest(&peer))
        .await
        .map_err(|e| Status::internal(format!("attestation worker failed: {e}")))?
        .map_err(|e| Status::unauthenticated(format!("workload attestation failed: {e}")))?;
    sels.sort();
    sels.dedup();
    Ok(sels)
}

/// The identity of the caller, captured when its connection was accepted.
pub fn caller<T>(req: &Request<T>) -> Result<Arc<PeerIdentity>, Status> {
    let peer = req
        .extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| Status::internal("no peer credentials on this connection"))?;
    peer.0
        .as_ref()
        .map_err(|e| Status::unauthenticated(format!("cannot identify the caller: {e}")))
        .cloned()
}

/// Refuses to push to a caller that no longer runs the executable it was attested with (it exec'd
/// after the stream opened, or died and left the connection to a child): one `fstat` through its pidfd.
fn still_attested(peer: &PeerIdentity) -> Result<(), Status> {
    peer.ensure_same_exe().map_err(|e| {
        tracing::debug!(pid = peer.pid, error = %e, "stream ended: the caller changed");
        Status::unauthenticated(format!("workload attestation no longer holds: {e}"))
    })
}

fn concat(certs: &[rustls_pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

/// JWKS document holding only a bundle's JWT authorities.
pub fn jwt_jwks(b: &Bundle) -> Vec<u8> {
    let mut only = Bundle::new(b.trust_domain.clone());
    only.jwt_authorities = b.jwt_authorities.clone();
    only.sequence = b.sequence;
    only.refresh_hint = b.refresh_hint;
    only.to_json().into_bytes()
}

/// Bundles of the caller's own trust domain and of those its entries federate with, keyed by trust-domain
/// SPIFFE ID and rendered by `render`; the caller must still match an entry.
fn caller_bundles(
    cache: &Cache,
    selectors: &[Selector],
    render: fn(&Bundle) -> Vec<u8>,
) -> Result<HashMap<String, Vec<u8>>, Status> {
    let entries = cache.matching(selectors, true);
    if entries.is_empty() {
        return Err(Status::permission_denied(
            "no identity issued: the caller's registration entries were removed",
        ));
    }
    let set = cache.bundles.load();
    let mut tds = federated(&entries);
    tds.push(cache.td.clone());
    Ok(tds
        .into_iter()
        .filter_map(|t| set.get(&t).map(|b| (t.id().to_string(), render(b))))
        .collect())
}

/// The X.509 authorities of a bundle as concatenated DER.
pub fn x509_der(b: &Bundle) -> Vec<u8> {
    concat(&b.x509_authorities)
}

/// The federated trust domains that a set of entries federates with.
fn federated(entries: &[Arc<Entry>]) -> Vec<TrustDomain> {
    let mut v: Vec<TrustDomain> = entries
        .iter()
        .flat_map(|e| e.federates_with.iter().cloned())
        .collect();
    v.sort();
    v.dedup();
    v
}

fn x509_response(
    td: &TrustDomain,
    bundles: &BundleSet,
    entries: &[Arc<Entry>],
    svids: &[Arc<CachedSvid>],
) -> wpb::X509svidResponse {
    let own = bundles
        .get(td)
        .map(|b| concat(&b.x509_authorities))
        .unwrap_or_default();
    let svids = entries
        .iter()
        .zip(svids)
        .map(|(e, s)| wpb::X509svid {
            spiffe_id: s.spiffe_id.to_string(),
            x509_svid: concat(&s.chain),
            x509_svid_key: s.key.secret_pkcs8_der().to_vec(),
            bundle: own.clone(),
            hint: e.hint.clone(),
        })
        .collect();
    let federated_bundles = federated(entries)
        .into_iter()
        .filter_map(|t| {
            bundles
                .get(&t)
                .map(|b| (t.id().to_string(), concat(&b.x509_authorities)))
        })
        .collect::<HashMap<_, _>>();
    wpb::X509svidResponse {
        svids,
        crl: vec![],
        federated_bundles,
    }
}

impl WorkloadApi {
    /// A Workload API over the manager's caches.
    pub fn new(manager: Arc<Manager>, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        Self { manager, attestor }
    }

    fn cache(&self) -> &Arc<Cache> {
        &self.manager.cache
    }

    /// The bundles stream of `FetchX509Bundles` and `FetchJWTBundles`: the caller's bundles,
    /// each rendered by `render` and wrapped in a response by `wrap`, sent again whenever they
    /// change, until the caller has no entry left.
    async fn bundles_stream<R, T>(
        &self,
        req: &Request<R>,
        render: fn(&Bundle) -> Vec<u8>,
        wrap: fn(HashMap<String, Vec<u8>>) -> T,
    ) -> Result<BoxStream<T>, Status>
    where
        T: PartialEq + Clone + Send + 'static,
    {
        check_header(req)?;
        let selectors = attest_caller(&self.attestor, req).await?;
        self.entries_for(&selectors).await?;
        let cache = self.cache().clone();
        let watched = cache.clone();
        Ok(spawn_watch(caller(req)?, cache, move || {
            Some(caller_bundles(&watched, &selectors, render).map(wrap))
        }))
    }

    /// Entries for an attested caller, or PermissionDenied.
    async fn entries_for(&self, selectors: &[Selector]) -> Result<Vec<Arc<Entry>>, Status> {
        // Right after start, wait (briefly) for the first entry snapshot before judging the caller.
        let mut synced = self.cache().synced.subscribe();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), synced.wait_for(|s| *s)).await;
        let entries = self.cache().matching(selectors, true);
        if entries.is_empty() {
            // The selectors (executable hash, path, groups) stay on the agent: a caller is only told that
            // nothing is registered for it, not how it was seen.
            tracing::debug!(selectors = %selectors.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "), "no registration entry matches the caller");
            return Err(Status::permission_denied(
                "no identity issued: no registration entry matches the caller",
            ));
        }
        Ok(entries)
    }
}

/// Runs a stream that recomputes a message whenever the cache changes and sends it when it differs.
/// Before each computation the caller `peer` must still run the executable it was attested with;
/// otherwise the stream ends with `Unauthenticated`.
pub fn spawn_watch<T, F>(peer: Arc<PeerIdentity>, cache: Arc<Cache>, mut compute: F) -> BoxStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: FnMut() -> Option<Result<T, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let mut version = cache.version.subscribe();
    tokio::spawn(async move {
        let mut last: Option<T> = None;
        loop {
            version.mark_unchanged();
            let next = match still_attested(&peer) {
                Ok(()) => compute(),
                Err(status) => Some(Err(status)),
            };
            match next {
                Some(Ok(msg)) if last.as_ref() != Some(&msg) => {
                    if tx.send(Ok(msg.clone())).await.is_err() {
                        return;
                    }
                    last = Some(msg);
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                None => {}
            }
            tokio::select! {
                changed = version.changed() => if changed.is_err() { return; },
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl wpb::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<wpb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<wpb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let selectors = attest_caller(&self.attestor, &req).await?;
        self.entries_for(&selectors).await?;
        let cache = self.cache().clone();
        let td = cache.td.clone();
        let mut guard: Option<crate::cache::Interest> = None;
        let mut guarded_ids: Vec<String> = Vec::new();
        let c2 = cache.clone();
        let stream = spawn_watch(caller(&req)?, cache, move || {
            let entries = c2.matching(&selectors, true);
            if entries.is_empty() {
                return Some(Err(Status::permission_denied(
                    "no identity issued: the caller's registration entries were removed",
                )));
            }
            let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
            if ids != guarded_ids {
                guard.replace(c2.interest(&entries));
                guarded_ids = ids;
            }
            let svids = c2.svids_for(&entries)?;
            Some(Ok(x509_response(&td, &c2.bundles.load(), &entries, &svids)))
        });
        Ok(Response::new(stream))
    }

    type FetchX509BundlesStream = BoxStream<wpb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<wpb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.bundles_stream(&req, x509_der, |bundles| wpb::X509BundlesResponse {
            crl: vec![],
            bundles,
        })
        .await
        .map(Response::new)
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<wpb::JwtsvidRequest>,
    ) -> Result<Response<wpb::JwtsvidResponse>, Status> {
        check_header(&req)?;
        let selectors = attest_caller(&self.attestor, &req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let mut entries = self.entries_for(&selectors).await?;
        if !r.spiffe_id.is_empty() {
            let want = SpiffeId::parse(&r.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!(
                    "spiffe_id: invalid SPIFFE ID {:?}: {e}",
                    r.spiffe_id
                ))
            })?;
            entries.retain(|e| e.spiffe_id == want);
            if entries.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity issued: the caller is not entitled to {want}"
                )));
            }
        }
        let mut svids = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for e in entries {
            if !seen.insert(e.spiffe_id.clone()) {
                continue;
            }
            let jwt = self.manager.jwt_svid(&e, &r.audience).await?;
            svids.push(wpb::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: jwt.token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(wpb::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = BoxStream<wpb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<wpb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.bundles_stream(&req, jwt_jwks, |bundles| wpb::JwtBundlesResponse {
            bundles,
        })
        .await
        .map(Response::new)
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<wpb::ValidateJwtsvidRequest>,
    ) -> Result<Response<wpb::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        attest_caller(&self.attestor, &req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let set = self.cache().bundles.load();
        let claims = sigil_spiffe::jwt::validate_jwt_svid(
            &r.svid,
            &set,
            std::slice::from_ref(&r.audience),
            crate::unix_now().max(0) as u64,
        )
        .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        Ok(Response::new(wpb::ValidateJwtsvidResponse {
            spiffe_id: claims.spiffe_id.to_string(),
            claims: Some(json_to_struct(&claims.claims)),
        }))
    }
}

/// Converts JSON claims into a protobuf Struct.
pub fn json_to_struct(m: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

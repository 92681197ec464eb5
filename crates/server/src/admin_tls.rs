//! The admin entry API on the TLS listener (SPIRE's model): callers whose X.509-SVID names an entry
//! marked `admin` may manage entries over the network; everyone else gets `PermissionDenied`.

use std::sync::Arc;

use sigil_proto::admin::v1 as pb;
use sigil_proto::admin::v1::entries_server::Entries;
use sigil_spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use crate::admin::Admin;
use crate::agent_api::PeerInfo;
use crate::state::State;

/// The `Entries` service of the admin API behind a per-call check of the caller's SVID.
#[derive(Clone)]
pub struct TlsEntries {
    admin: Admin,
    state: Arc<State>,
}

impl TlsEntries {
    /// The entries of `admin`, for admin workloads over TLS.
    pub fn new(admin: Admin, state: Arc<State>) -> Self {
        Self { admin, state }
    }

    /// The caller's SPIFFE ID when it is an admin workload of this trust domain. Checked on every call,
    /// so removing the admin flag (or the entry) takes effect at once, SVID lifetime notwithstanding.
    fn authorize<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        // The TLS verifier has already checked the chain against the bundles of the ID's trust domain.
        let Some(id) = sigil_tls::peer_spiffe_id(&peer.certs) else {
            return Err(Status::permission_denied(
                "anonymous caller: the admin API over TLS needs the X.509-SVID of an admin entry",
            ));
        };
        let denied = |why: &str| Status::permission_denied(format!("{id} {why}"));
        if id.trust_domain() != self.state.trust_domain() {
            return Err(denied("is not in this server's trust domain"));
        }
        if id.path().starts_with("/sigil/") {
            // Agents and the server itself: node identities are never admins.
            return Err(denied("is a node identity, not an admin workload"));
        }
        let now = self.state.now();
        // The handshake checked validity once; a long-lived connection must not outlive the SVID.
        if peer
            .certs
            .first()
            .and_then(leaf_not_after)
            .is_none_or(|t| t <= now)
        {
            return Err(denied(
                "presented an X.509-SVID that has expired since the handshake",
            ));
        }
        if !self.state.catalog.is_admin(&id, now) {
            return Err(denied("is not the SPIFFE ID of an entry marked admin"));
        }
        Ok(id)
    }
}

/// The leaf's notAfter, in Unix seconds.
fn leaf_not_after(cert: &rustls_pki_types::CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert).ok()?;
    Some(c.validity().not_after.timestamp())
}

#[tonic::async_trait]
impl Entries for TlsEntries {
    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::CreateEntryResponse>, Status> {
        let caller = self.authorize(&req)?;
        let out = self.admin.create_entry(req).await;
        if let Ok(r) = &out {
            let e = r.get_ref().entry.as_ref();
            tracing::info!(%caller, entry = e.map_or("", |e| e.id.as_str()), spiffe_id = e.map_or("", |e| e.spiffe_id.as_str()), "entry created over TLS");
        }
        out
    }

    async fn batch_create_entry(
        &self,
        req: Request<pb::BatchCreateEntryRequest>,
    ) -> Result<Response<pb::BatchCreateEntryResponse>, Status> {
        let caller = self.authorize(&req)?;
        let out = self.admin.batch_create_entry(req).await;
        if let Ok(r) = &out {
            tracing::info!(%caller, entries = r.get_ref().entries.len(), "entries created over TLS");
        }
        out
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.authorize(&req)?;
        self.admin.list_entries(req).await
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::GetEntryResponse>, Status> {
        self.authorize(&req)?;
        self.admin.get_entry(req).await
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::UpdateEntryResponse>, Status> {
        let caller = self.authorize(&req)?;
        let out = self.admin.update_entry(req).await;
        if let Ok(r) = &out {
            let id = r.get_ref().entry.as_ref().map_or("", |e| e.id.as_str());
            tracing::info!(%caller, entry = id, "entry updated over TLS");
        }
        out
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let caller = self.authorize(&req)?;
        let out = self.admin.delete_entry(req).await;
        if let Ok(r) = &out {
            let id = r.get_ref().entry.as_ref().map_or("", |e| e.id.as_str());
            tracing::info!(%caller, entry = id, "entry deleted over TLS");
        }
        out
    }

    async fn count_entries(
        &self,
        req: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountEntriesResponse>, Status> {
        self.authorize(&req)?;
        self.admin.count_entries(req).await
    }
}

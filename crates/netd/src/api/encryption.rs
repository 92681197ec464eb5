//! `sigil.netd.v1.Encryption`: the encrypted carrier's peers, key ages and drop counters.

use sigil_proto::netd::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;

#[tonic::async_trait]
impl pb::encryption_server::Encryption for Api {
    async fn get_encryption_status(
        &self,
        _req: Request<pb::GetEncryptionStatusRequest>,
    ) -> Result<Response<pb::EncryptionStatus>, Status> {
        let status = self.encryption.clone().ok_or_else(|| {
            Status::failed_precondition(
                "encryption is disabled on this node: start netd with --encryption spiffe",
            )
        })?;
        let plaintext = tokio::task::spawn_blocking(crate::encryption::plaintext_dropped)
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let (peers, unknown_session, no_session) = status.peers();
        Ok(Response::new(pb::EncryptionStatus {
            mode: "spiffe".to_owned(),
            spiffe_id: status.local_id.to_string(),
            peers: peers
                .into_iter()
                .map(|p| pb::EncryptionPeer {
                    node: p.node,
                    ip: p.ip.to_string(),
                    spiffe_id: p.spiffe_id,
                    key_age_seconds: u64::try_from(now - p.keyed_unix).unwrap_or(0),
                    expires_unix: p.expires_unix,
                    tx_packets: p.stats.tx_packets,
                    tx_bytes: p.stats.tx_bytes,
                    rx_packets: p.stats.rx_packets,
                    rx_bytes: p.stats.rx_bytes,
                    replayed: p.stats.replayed,
                    malformed: p.stats.malformed,
                    unauthenticated: p.stats.unauthenticated,
                    wrong_source: p.stats.wrong_source,
                    identity_not_hosted: p.stats.identity_not_hosted,
                })
                .collect(),
            unknown_session,
            no_session,
            plaintext_dropped: plaintext,
        }))
    }
}

//! Trust-domain migration: entries move to the new domain, a CA is created for it, and the old and new
//! domains stay federated so SVIDs of both validate during the transition (seed 001).

use std::sync::Arc;

use sigil_datastore::{EntryFilter, StoredBundle};
use sigil_spiffe::TrustDomain;

use crate::catalog::Change;
use crate::error::MigrateError;
use crate::state::{META_MIGRATED_FROM, META_TRUST_DOMAIN, State, open_ca, server_id};

/// Moves the server from its current trust domain to `to`; returns the old domain and the entry count.
pub fn migrate(state: &Arc<State>, to: &TrustDomain) -> Result<(TrustDomain, u64), MigrateError> {
    let from = state.trust_domain();
    if &from == to {
        return Err(MigrateError::AlreadyCurrent { to: to.clone() });
    }
    let new_ca = open_ca(&state.config, &state.ds, to, &state.clock)?;
    new_ca.rotate().map_err(MigrateError::Rotation)?;
    let old_ca = state.ca.load_full();
    let old_bundle = old_ca.bundle();
    let count = state.ds.rewrite_trust_domain(&from, to)?;
    // The old domain becomes a federated bundle of the new one, so its SVIDs keep validating.
    state.ds.set_bundle(&StoredBundle {
        trust_domain: from.clone(),
        json: old_bundle.to_json(),
        sequence: old_bundle.sequence,
    })?;
    state.ds.set_meta(META_MIGRATED_FROM, from.as_str())?;
    state.ds.set_meta(META_TRUST_DOMAIN, to.as_str())?;
    state.ca.store(Arc::new(new_ca));
    state.previous_ca.store(Arc::new(Some(old_ca)));
    let (entries, _) = state.ds.list_entries(&EntryFilter::default(), 0, None)?;
    state.catalog.reset(entries, server_id(to));
    state.refresh_bundles()?;
    state.renew_server_svid()?;
    state.catalog.publish(Change::BundlesChanged);
    tracing::info!(%from, %to, entries = count, "trust domain migrated");
    Ok((from, count))
}

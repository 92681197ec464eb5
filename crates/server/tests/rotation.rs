//! CA rotation through the server's state, driven by an injected clock: prepared at 1/2 of the CA's life,
//! active at 5/6, both in the trust bundle the TLS layer and agents use, old one pruned after its last SVID.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_server::{RunArgs, ServerConfig, State};
use sigil_spiffe::TrustDomain;
use sigil_test_util::ManualClock;

const HOUR: Duration = Duration::from_secs(3600);

fn authorities(state: &State) -> usize {
    let td = TrustDomain::parse("identity.example.com").expect("td");
    state
        .bundles
        .load()
        .get(&td)
        .map(|b| b.x509_authorities.len())
        .unwrap_or(0)
}

fn stored_authorities(state: &State) -> usize {
    let td = TrustDomain::parse("identity.example.com").expect("td");
    let stored = state
        .ds
        .get_bundle(&td)
        .expect("ds")
        .expect("bundle stored");
    sigil_spiffe::bundle::Bundle::from_json(td, stored.json.as_bytes())
        .expect("stored bundle parses")
        .x509_authorities
        .len()
}

fn issuer_of(chain: &[rustls_pki_types::CertificateDer<'static>]) -> Vec<u8> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(&chain[0]).expect("leaf");
    c.issuer().as_raw().to_vec()
}

#[test]
fn rotation_prepares_activates_and_prunes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = ServerConfig::from_args(&RunArgs {
        data_dir: Some(dir.path().join("data")),
        admin_socket: Some(dir.path().join("admin/api.sock")),
        ca_ttl: Some("6h".into()),
        x509_svid_ttl: Some("1h".into()),
        ..Default::default()
    })?;
    let t0 = SystemTime::now();
    let clock = ManualClock::new(t0);
    let state = State::open(config.clone(), Arc::new(clock.clone()))?;
    let workload = TrustDomain::parse("identity.example.com")?.id_with_path("/w")?;
    assert_eq!(authorities(&state), 1);
    let ca0 = state.ca.load().status().active.serial_hex.clone();

    clock.set(t0 + HOUR * 2 + Duration::from_secs(59 * 60));
    state.tick()?;
    assert!(
        state.ca.load().status().prepared.is_none(),
        "prepared too early"
    );
    assert_eq!(authorities(&state), 1);

    clock.set(t0 + HOUR * 3 + Duration::from_secs(1));
    state.tick()?;
    assert!(
        state.ca.load().status().prepared.is_some(),
        "prepared at 1/2"
    );
    assert_eq!(
        authorities(&state),
        2,
        "prepared CA published in the bundle"
    );
    assert_eq!(stored_authorities(&state), 2, "bundle persisted");
    assert_eq!(state.ca.load().status().active.serial_hex, ca0);

    // Just before 5/6, an SVID from the old authority (1h TTL: lives until ~5h59m).
    clock.set(t0 + HOUR * 4 + Duration::from_secs(59 * 60));
    state.tick()?;
    let (old_svid, _) = state
        .ca
        .load()
        .mint_x509_svid_with_key(&workload, &[], None)?;

    clock.set(t0 + HOUR * 5 + Duration::from_secs(1));
    state.tick()?;
    let status = state.ca.load().status();
    assert_ne!(status.active.serial_hex, ca0, "activated at 5/6");
    assert_eq!(status.old.len(), 1);
    assert_eq!(authorities(&state), 2, "old CA still trusted");
    let (new_svid, _) = state
        .ca
        .load()
        .mint_x509_svid_with_key(&workload, &[], None)?;
    assert_ne!(
        issuer_of(&new_svid.cert_chain),
        issuer_of(&old_svid.cert_chain)
    );

    // While the old authority's last SVID lives, it stays; after, it is pruned.
    clock.set(old_svid.expires_at - Duration::from_secs(60));
    state.tick()?;
    assert_eq!(authorities(&state), 2);
    clock.set(old_svid.expires_at + Duration::from_secs(1));
    state.tick()?;
    assert_eq!(
        authorities(&state),
        1,
        "old CA pruned after its last SVID expired"
    );
    assert_eq!(stored_authorities(&state), 1);

    // A restart keeps the same (new) CA.
    let active = state.ca.load().status().active.serial_hex.clone();
    drop(state);
    let state = State::open(config, Arc::new(clock.clone()))?;
    assert_eq!(state.ca.load().status().active.serial_hex, active);
    Ok(())
}

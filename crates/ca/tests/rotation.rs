//! Rotation on a manual clock, journal persistence across restarts, and key files on disk.

#![allow(clippy::unwrap_used)]

#[path = "util/support.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use sigil_ca::{Ca, CaError, JournalStore, MemoryJournal, RotationOutcome};
use support::*;

fn open(dir: &std::path::Path, clock: &ManualClock, journal: &Arc<MemoryJournal>) -> Ca {
    Ca::open(config(dir), Arc::new(clock.clone()), journal.clone()).unwrap()
}

#[test]
fn rotation_follows_the_spire_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let ca = open(dir.path(), &clock, &journal);
    let first = ca.status().active;
    let b0 = ca.bundle();
    assert_eq!(b0.x509_authorities.len(), 1);
    assert_eq!(b0.jwt_authorities.len(), 1);
    assert_eq!(b0.jwt_authorities[0].key_id, first.jwt_key_id);

    // Before half of the life: nothing to do, however often the tick runs.
    clock.set(at(2 * HOUR + 59 * MIN));
    assert_eq!(ca.rotate().unwrap(), RotationOutcome::default());
    assert!(ca.status().prepared.is_none());
    assert_eq!(ca.bundle(), b0);

    // Half of the life: the next authority is prepared and published, not used.
    clock.set(at(3 * HOUR));
    let out = ca.rotate().unwrap();
    assert!(out.prepared && !out.activated && out.pruned == 0 && out.bundle_changed());
    assert_eq!(
        ca.rotate().unwrap(),
        RotationOutcome::default(),
        "tick is idempotent"
    );
    let status = ca.status();
    let second = status.prepared.clone().expect("prepared");
    assert_eq!(status.active, first);
    let b1 = ca.bundle();
    assert!(b1.sequence > b0.sequence);
    assert_eq!(b1.x509_authorities.len(), 2);
    let kids: Vec<_> = b1
        .jwt_authorities
        .iter()
        .map(|j| j.key_id.clone())
        .collect();
    assert_eq!(
        kids,
        vec![first.jwt_key_id.clone(), second.jwt_key_id.clone()]
    );
    let serials: Vec<_> = b1.x509_authorities.iter().map(|c| serial_of(c)).collect();
    assert_eq!(
        serials,
        vec![first.serial_hex.clone(), second.serial_hex.clone()]
    );

    // Still signed by the first authority until activation.
    clock.set(at(4 * HOUR + 59 * MIN));
    let late = ca
        .sign_csr(
            &csr_for(&id("/late")),
            &id("/late"),
            &[],
            Some(Duration::from_secs(HOUR)),
        )
        .unwrap();
    assert_eq!(chains_to(&late, &b1, at(4 * HOUR + 59 * MIN)), vec![0]);
    let jwt_late = ca
        .mint_jwt_svid(&id("/late"), &["aud".into()], None)
        .unwrap();
    assert!(jwt_late.expires_at < at(5 * HOUR + 59 * MIN));

    // Five sixths: the prepared authority signs, the first becomes old but stays published.
    clock.set(at(5 * HOUR));
    let out = ca.rotate().unwrap();
    assert!(out.activated && !out.prepared && out.pruned == 0 && !out.bundle_changed());
    let status = ca.status();
    assert_eq!(status.active, second);
    assert_eq!(status.old, vec![first.clone()]);
    assert!(status.prepared.is_none());
    let b2 = ca.bundle();
    assert_eq!(
        b2.sequence, b1.sequence,
        "activation does not change the bundle"
    );
    assert_eq!(b2.x509_authorities.len(), 2);
    let fresh = ca
        .sign_csr(&csr_for(&id("/w")), &id("/w"), &[], None)
        .unwrap();
    assert_eq!(chains_to(&fresh, &b2, at(5 * HOUR)), vec![1]);
    let token = ca
        .mint_jwt_svid(&id("/w"), &["aud".into()], None)
        .unwrap()
        .token;
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.kid.as_deref(), Some(second.jwt_key_id.as_str()));

    // The old authority's last SVID expires at 5h59m: it stays until then.
    clock.set(at(5 * HOUR + 30 * MIN));
    assert_eq!(ca.rotate().unwrap().pruned, 0);
    assert_eq!(ca.bundle().x509_authorities.len(), 2);
    assert!(late.expires_at == at(5 * HOUR + 59 * MIN));

    clock.set(at(6 * HOUR));
    let out = ca.rotate().unwrap();
    assert_eq!(out.pruned, 1);
    assert!(out.bundle_changed());
    // The same tick reaches the second authority's own half-life (3h + 3h), so its successor
    // is prepared: the bundle holds the second and third authorities, never the first again.
    assert!(out.prepared);
    let status = ca.status();
    assert!(status.old.is_empty());
    assert_eq!(status.active, second);
    let third = status.prepared.expect("third prepared");
    let b3 = ca.bundle();
    assert!(b3.sequence > b2.sequence);
    let serials: Vec<_> = b3.x509_authorities.iter().map(|c| serial_of(c)).collect();
    assert_eq!(
        serials,
        vec![second.serial_hex.clone(), third.serial_hex.clone()]
    );
    let kids: Vec<_> = b3
        .jwt_authorities
        .iter()
        .map(|j| j.key_id.clone())
        .collect();
    assert_eq!(
        kids,
        vec![second.jwt_key_id.clone(), third.jwt_key_id.clone()]
    );
    // The first authority's key files were deleted; two keys each remain for second and third.
    assert_eq!(files_in(&dir.path().join("keys")).len(), 4);
}

#[test]
fn old_authority_that_signed_nothing_is_pruned_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let ca = open(dir.path(), &clock, &journal);
    clock.set(at(3 * HOUR));
    ca.rotate().unwrap();
    clock.set(at(5 * HOUR));
    let out = ca.rotate().unwrap();
    assert!(out.activated);
    assert_eq!(out.pruned, 1);
    assert_eq!(ca.bundle().x509_authorities.len(), 1);
    assert_eq!(files_in(&dir.path().join("keys")).len(), 2);
}

#[test]
fn a_jwt_svid_keeps_its_authority_published() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let ca = open(dir.path(), &clock, &journal);
    clock.set(at(3 * HOUR));
    ca.rotate().unwrap();
    clock.set(at(4 * HOUR + 58 * MIN));
    let jwt = ca.mint_jwt_svid(&id("/j"), &["a".into()], None).unwrap();
    assert_eq!(jwt.expires_at, at(5 * HOUR + 3 * MIN));
    clock.set(at(5 * HOUR));
    assert_eq!(ca.rotate().unwrap().pruned, 0);
    assert_eq!(ca.bundle().jwt_authorities.len(), 2);
    clock.set(at(5 * HOUR + 3 * MIN));
    assert_eq!(ca.rotate().unwrap().pruned, 1);
    assert_eq!(ca.bundle().jwt_authorities.len(), 1);
}

#[test]
fn restart_keeps_the_same_authorities_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let ca = open(dir.path(), &clock, &journal);
    clock.set(at(3 * HOUR));
    ca.rotate().unwrap();
    clock.set(at(4 * HOUR + 59 * MIN));
    let svid = ca
        .sign_csr(&csr_for(&id("/a")), &id("/a"), &[], None)
        .unwrap();
    let (status, bundle) = (ca.status(), ca.bundle());
    drop(ca);

    let reopened = open(dir.path(), &clock, &journal);
    assert_eq!(reopened.status(), status);
    assert_eq!(reopened.bundle(), bundle);
    let again = reopened
        .sign_csr(&csr_for(&id("/a")), &id("/a"), &[], None)
        .unwrap();
    assert_eq!(chains_to(&again, &bundle, at(4 * HOUR + 59 * MIN)), vec![0]);
    // The same key signs: the new leaf verifies against the CA certificate from before the restart.
    verify(&svid, &reopened.bundle(), at(4 * HOUR + 59 * MIN)).unwrap();

    // The SVID expiry bound survived the restart: the old authority is kept past activation.
    clock.set(at(5 * HOUR + 30 * MIN));
    drop(reopened);
    let third = open(dir.path(), &clock, &journal);
    let st = third.status();
    assert_eq!(st.active, status.prepared.clone().unwrap());
    assert_eq!(st.old, vec![status.active.clone()]);
    assert_eq!(third.bundle().x509_authorities.len(), 2);
}

#[test]
fn key_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let _ca = open(dir.path(), &clock, &journal);
    let keys = dir.path().join("keys");
    let dir_mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let files = files_in(&keys);
    assert_eq!(files.len(), 2, "{files:?}");
    for f in files {
        let meta = std::fs::metadata(keys.join(&f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
        let pem = std::fs::read_to_string(keys.join(&f)).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{f}");
    }
    // The journal names the files but holds no key material.
    let text = String::from_utf8(journal.contents().unwrap()).unwrap();
    assert!(!text.contains("PRIVATE KEY"));
}

#[test]
fn missing_or_swapped_key_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    drop(open(dir.path(), &clock, &journal));
    let keys = dir.path().join("keys");
    let files = files_in(&keys);
    let ca_key = files.iter().find(|f| f.starts_with("x509-ca-")).unwrap();
    let jwt_key = files.iter().find(|f| f.starts_with("jwt-")).unwrap();

    // A CA key file holding another key (here the JWT key) is a mismatch.
    let saved_ca = std::fs::read(keys.join(ca_key)).unwrap();
    std::fs::copy(keys.join(jwt_key), keys.join(ca_key)).unwrap();
    let err = Ca::open(config(dir.path()), Arc::new(clock.clone()), journal.clone()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains(ca_key.as_str()), "{err}");
    std::fs::write(keys.join(ca_key), saved_ca).unwrap();

    std::fs::remove_file(keys.join(jwt_key)).unwrap();
    let err = Ca::open(config(dir.path()), Arc::new(clock.clone()), journal.clone()).unwrap_err();
    assert!(matches!(err, CaError::Io { .. }), "{err}");
    assert!(err.to_string().contains(jwt_key.as_str()), "{err}");
}

#[test]
fn journal_for_another_trust_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    drop(open(dir.path(), &clock, &journal));
    let mut cfg = config(dir.path());
    cfg.trust_domain = sigil_spiffe::TrustDomain::parse("other.org").unwrap();
    let err = Ca::open(cfg, Arc::new(clock.clone()), journal.clone()).unwrap_err();
    assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");

    journal.save(b"{not json").unwrap();
    let err = Ca::open(config(dir.path()), Arc::new(clock), journal).unwrap_err();
    assert!(matches!(err, CaError::JournalCorrupt { .. }), "{err}");
}

#[test]
fn long_downtime_replaces_an_expired_authority_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let ca = open(dir.path(), &clock, &journal);
    let first = ca.status().active;
    let seq = ca.bundle().sequence;
    drop(ca);

    clock.set(at(30 * HOUR));
    let ca = open(dir.path(), &clock, &journal);
    let status = ca.status();
    assert_ne!(status.active.serial_hex, first.serial_hex);
    assert!(
        status.old.is_empty(),
        "the expired authority signed nothing"
    );
    assert!(ca.bundle().sequence > seq);
    let svid = ca
        .sign_csr(&csr_for(&id("/x")), &id("/x"), &[], None)
        .unwrap();
    verify(&svid, &ca.bundle(), at(30 * HOUR)).unwrap();
}

#[test]
fn signing_with_an_expired_authority_is_refused_until_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let ca = open(dir.path(), &clock, &journal);
    clock.set(at(7 * HOUR));
    let err = ca
        .sign_csr(&csr_for(&id("/x")), &id("/x"), &[], None)
        .unwrap_err();
    assert!(matches!(err, CaError::CaExpired { .. }), "{err}");
    let out = ca.rotate().unwrap();
    assert!(out.activated && out.prepared);
    ca.sign_csr(&csr_for(&id("/x")), &id("/x"), &[], None)
        .unwrap();
}

#[test]
fn failed_journal_save_leaves_the_state_unchanged() {
    struct Failing(MemoryJournal, std::sync::atomic::AtomicBool);
    impl JournalStore for Failing {
        fn load(&self) -> Result<Option<Vec<u8>>, String> {
            self.0.load()
        }
        fn save(&self, data: &[u8]) -> Result<(), String> {
            if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("disk full".into());
            }
            self.0.save(data)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(Failing(MemoryJournal::new(), false.into()));
    let ca = Ca::open(config(dir.path()), Arc::new(clock.clone()), journal.clone()).unwrap();
    let before = (ca.status(), ca.bundle());
    journal.1.store(true, std::sync::atomic::Ordering::SeqCst);
    clock.set(at(3 * HOUR));
    let err = ca.rotate().unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_eq!((ca.status(), ca.bundle()), before);
    assert_eq!(
        files_in(&dir.path().join("keys")).len(),
        2,
        "new keys removed"
    );
    journal.1.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(ca.rotate().unwrap().prepared);
}

#[test]
fn config_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at(0)));
    let mut cfg = config(dir.path());
    cfg.default_x509_svid_ttl = Duration::ZERO;
    let err = Ca::open(cfg, clock.clone(), Arc::new(MemoryJournal::new())).unwrap_err();
    assert!(err.to_string().contains("default_x509_svid_ttl"), "{err}");
    let mut cfg = config(dir.path());
    cfg.ca_ttl = Duration::from_secs(1);
    let err = Ca::open(cfg, clock, Arc::new(MemoryJournal::new())).unwrap_err();
    assert!(err.to_string().contains("ca_ttl"), "{err}");
}

#[test]
fn svids_signed_during_activation_stay_verifiable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Ca>();

    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let ca = open(dir.path(), &clock, &journal);
    clock.set(at(3 * HOUR));
    ca.rotate().unwrap();
    // The first authority has signed nothing, so activation may prune it at once: an SVID it
    // signs in the same instant must still be covered by the bundle.
    clock.set(at(5 * HOUR));
    let csr = csr_for(&id("/race"));
    let svids = std::thread::scope(|s| {
        let signers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    (0..40)
                        .map(|_| ca.sign_csr(&csr, &id("/race"), &[], None).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        assert!(ca.rotate().unwrap().activated);
        signers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    ca.rotate().unwrap();
    let bundle = ca.bundle();
    for svid in &svids {
        verify(svid, &bundle, at(5 * HOUR)).unwrap();
    }
}

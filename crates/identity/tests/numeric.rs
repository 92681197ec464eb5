//! Numeric identity ranges and reserved identities.

use sigil_identity::{
    NumericIdentity as Id, reserved_by_name, reserved_identities, reserved_identity_of,
    reserved_labels,
};
use sigil_labels::Labels;

fn labels(s: &str) -> Labels {
    Labels::parse_list(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn reserved_names_and_numbers() {
    let table = [
        ("host", Id::HOST, 1),
        ("world", Id::WORLD, 2),
        ("unmanaged", Id::UNMANAGED, 3),
        ("health", Id::HEALTH, 4),
        ("init", Id::INIT, 5),
        ("remote-node", Id::REMOTE_NODE, 6),
        ("kube-apiserver", Id::KUBE_APISERVER, 7),
        ("ingress", Id::INGRESS, 8),
    ];
    for (name, id, n) in table {
        assert_eq!(id.get(), n);
        assert_eq!(reserved_by_name(name), Some(id));
        assert_eq!(id.reserved_name(), Some(name));
        let want = labels(&format!("reserved:{name}"));
        assert_eq!(reserved_labels(id), Some(want.clone()));
        assert_eq!(reserved_identity_of(&want), Some(id));
        assert!(id.is_reserved() && !id.is_cidr());
    }
    assert_eq!(reserved_identities().len(), table.len());
    assert_eq!(Id::UNKNOWN.get(), 0);
    for bad in ["", "Host", "cluster", "all", "unknown"] {
        assert_eq!(reserved_by_name(bad), None, "{bad}");
    }
    assert_eq!(reserved_labels(Id::UNKNOWN), None);
    assert_eq!(reserved_labels(Id::new(9)), None);
    assert_eq!(reserved_labels(Id::new(256)), None);
}

#[test]
fn reserved_identity_of_label_sets() {
    assert_eq!(
        reserved_identity_of(&labels("reserved:host,k8s:node=n1")),
        Some(Id::HOST)
    );
    assert_eq!(
        reserved_identity_of(&labels("reserved:world,k8s:app=x")),
        None
    );
    assert_eq!(reserved_identity_of(&labels("reserved:world=x")), None);
    assert_eq!(reserved_identity_of(&labels("k8s:host")), None);
    assert_eq!(reserved_identity_of(&labels("reserved:nope")), None);
    assert_eq!(reserved_identity_of(&Labels::new()), None);
}

#[test]
fn ranges() {
    assert!(!Id::UNKNOWN.is_reserved());
    assert!(Id::new(255).is_reserved());
    assert!(!Id::new(Id::MIN_CLUSTER_LOCAL).is_reserved());
    assert_eq!(Id::MAX_CLUSTER_LOCAL, (1 << Id::CLUSTER_ID_SHIFT) - 1);

    let clustered = Id::new((7 << Id::CLUSTER_ID_SHIFT) | 300);
    assert_eq!(clustered.cluster_id(), 7);
    assert!(!clustered.is_cidr() && !clustered.is_reserved());
    assert_eq!(Id::new((255 << 16) | 65535).cluster_id(), 255);
    assert_eq!(Id::new(300).cluster_id(), 0);

    let cidr = Id::new(Id::LOCAL_CIDR_FLAG | 0x07_0001);
    assert!(cidr.is_cidr() && !cidr.is_reserved());
    assert_eq!(
        cidr.cluster_id(),
        0,
        "node-local identities have no cluster"
    );
    assert_eq!(Id::LOCAL_CIDR_FLAG, 16_777_216);
}

#[test]
fn display_and_serde() {
    let id = Id::new(65_536 + 256);
    assert_eq!(id.to_string(), "65792");
    assert_eq!(u32::from(id), 65_792);
    assert_eq!(serde_json::to_string(&id).expect("serialize"), "65792");
    assert_eq!(
        serde_json::from_str::<Id>("65792").expect("deserialize"),
        id
    );
    assert!(serde_json::from_str::<Id>("-1").is_err());
    assert!(serde_json::from_str::<Id>("\"host\"").is_err());
}

//! What readers see: the daemon's state published after every change (endpoints, policies,
//! identities, names for the monitor), read without waiting for the reconciler.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use sigil_policy::PolicyId;

use crate::error::NetdError;
use crate::state::EndpointRecord;

/// The daemon's state as readers see it, published after every change: the monitor names
/// things with it and the API's read-only calls (status, endpoint and policy list/get) answer
/// from it without waiting for the writer.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Endpoints by name, with their identity's labels.
    pub endpoints: BTreeMap<String, (EndpointRecord, Vec<String>)>,
    /// Installed policies, with the YAML of their files.
    pub policies: Vec<PolicyInfo>,
    /// Number of allocated identities (endpoints and CIDRs).
    pub identity_count: usize,
    /// Identity → labels.
    pub identities: HashMap<u32, Vec<String>>,
    /// Address → endpoint name.
    pub addresses: HashMap<IpAddr, String>,
    /// Datapath endpoint id → endpoint name.
    pub endpoint_ids: HashMap<u32, String>,
    /// Rule cookie → `Kind/namespace/name: rule path`.
    pub rules: HashMap<u32, String>,
    /// Cluster mode: other nodes' endpoint addresses and node addresses in the IPCache.
    pub remote_ips: BTreeMap<IpAddr, u32>,
    /// Cluster mode: the hosting node's underlay address (the VXLAN tunnel endpoint) of each
    /// remote entry of [`Snapshot::remote_ips`] that has one.
    pub remote_via: BTreeMap<IpAddr, std::net::Ipv4Addr>,
    /// (local endpoint identity, remote identity; 0 = any) of every installed allow entry that
    /// requires authentication: what the auth manager must authenticate ahead of time.
    pub auth_rules: std::collections::BTreeSet<(u32, u32)>,
    /// Cluster mode: every cluster identity known from etcd.
    pub cluster_ids: std::collections::BTreeSet<u32>,
    /// Node-local CIDR identities of the prefixes policies name.
    pub cidr_identities: Vec<(sigil_policy::IpPrefix, u32)>,
    /// Rule cookie → the policy and rule it stands for (for flows' `*_allowed_by`/`*_denied_by`).
    pub rule_refs: HashMap<u32, RuleRef>,
    /// The daemon's generation when this snapshot was published (flows' policy revision).
    pub revision: u64,
    /// Fill of the kernel maps whose entries the writer counts (map name, entries, capacity);
    /// read by the metrics at scrape time.
    pub map_fill: Vec<(&'static str, u64, u64)>,
    /// Network namespace (nsfs device, inode) → endpoint name; built on the first lookup by namespace
    /// after this snapshot was published (a `stat` per endpoint), so publishing stays as cheap as before.
    netns_index: OnceLock<HashMap<(u64, u64), String>>,
}

/// The policy and rule a cookie stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// The policy.
    pub policy: PolicyId,
    /// The rule's path in its document (e.g. `spec.ingressDeny[0]`).
    pub path: String,
}

impl Snapshot {
    /// Every installed policy (without YAML).
    pub fn list_policies(&self) -> Vec<PolicyInfo> {
        self.policies
            .iter()
            .map(|p| PolicyInfo {
                yaml: Arc::from(""),
                ..p.clone()
            })
            .collect()
    }

    /// One policy by `name`, `namespace/name` or `Kind/namespace/name`, with its file's YAML.
    pub fn get_policy(&self, name: &str) -> Result<PolicyInfo, NetdError> {
        let id = resolve_policy(self.policies.iter().map(|p| &p.id), name)?;
        self.policies
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| NetdError::NotFound {
                what: "policy",
                name: name.to_owned(),
            })
    }

    /// The id of a policy given by `name`, `namespace/name` or `Kind/namespace/name`.
    pub fn resolve_policy(&self, name: &str) -> Result<PolicyId, NetdError> {
        resolve_policy(self.policies.iter().map(|p| &p.id), name)
    }

    /// One endpoint and its identity's labels.
    pub fn get_endpoint(&self, name: &str) -> Result<&(EndpointRecord, Vec<String>), NetdError> {
        self.endpoints.get(name).ok_or_else(|| NetdError::NotFound {
            what: "endpoint",
            name: name.to_owned(),
        })
    }
}

impl Snapshot {
    /// The endpoint whose network namespace is the nsfs file with device `dev` and inode `ino`.
    ///
    /// The index maps namespaces to names as they were when it was built; the hit is checked again
    /// against the endpoint's namespace file now, so an answer never names an endpoint whose namespace
    /// is no longer that one.
    pub fn endpoint_by_netns(
        &self,
        dev: u64,
        ino: u64,
    ) -> Result<&(EndpointRecord, Vec<String>), NetdError> {
        let not_found = || NetdError::NotFound {
            what: "endpoint with network namespace",
            name: format!("dev {dev} inode {ino}"),
        };
        let index = self.netns_index.get_or_init(|| {
            self.endpoints
                .values()
                .filter_map(|(r, _)| Some((nsfs_id(&r.netns_path)?, r.name.clone())))
                .collect()
        });
        let name = index.get(&(dev, ino)).ok_or_else(not_found)?;
        let found = self.endpoints.get(name).ok_or_else(not_found)?;
        if nsfs_id(&found.0.netns_path) != Some((dev, ino)) {
            return Err(not_found());
        }
        Ok(found)
    }
}

/// Device and inode of a namespace file (`/run/netns/<name>`), `None` if it cannot be read.
fn nsfs_id(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// The one policy among `ids` that `name` names.
pub(crate) fn resolve_policy<'a>(
    ids: impl Iterator<Item = &'a PolicyId>,
    name: &str,
) -> Result<PolicyId, NetdError> {
    let hits: Vec<PolicyId> = ids
        .filter(|id| {
            let full = id.to_string();
            let short = match &id.namespace {
                Some(ns) => format!("{ns}/{}", id.name),
                None => id.name.clone(),
            };
            full == name || short == name || id.name == name
        })
        .cloned()
        .collect();
    match hits.as_slice() {
        [] => Err(NetdError::NotFound {
            what: "policy",
            name: name.to_owned(),
        }),
        [one] => Ok(one.clone()),
        many => Err(NetdError::invalid(
            "name",
            name,
            format!(
                "matches {}; give Kind/namespace/name",
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Where an installed policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySource {
    /// Imported through the API.
    Api,
    /// The watched directory.
    Dir,
}

impl PolicySource {
    /// `api` or `dir`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Dir => "dir",
        }
    }
}

/// An installed policy, as listed.
#[derive(Debug, Clone)]
pub struct PolicyInfo {
    /// Its id.
    pub id: PolicyId,
    /// Where it came from.
    pub source: PolicySource,
    /// File name.
    pub origin: String,
    /// Number of rules.
    pub rules: usize,
    /// YAML text of its file (shared by the file's policies).
    pub yaml: Arc<str>,
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn record(name: &str, netns_path: PathBuf) -> EndpointRecord {
        EndpointRecord {
            name: name.to_owned(),
            namespace: "default".into(),
            pod_labels: Vec::new(),
            spiffe_id: None,
            service_account: "default".into(),
            uid: String::new(),
            spiffe_source: Default::default(),
            svid_expires_at: None,
            classic_identity: None,
            identity: 256,
            cluster_pending: false,
            ipv4: "10.0.0.2".parse().expect("ipv4"),
            ipv6: "fd00::2".parse().expect("ipv6"),
            host_index: 2,
            endpoint_id: 7,
            host_interface: "lxc0".into(),
            netns_name: format!("sigil-{name}"),
            netns_path,
            interface: "eth0".into(),
        }
    }

    fn id(path: &Path) -> (u64, u64) {
        nsfs_id(path).expect("stat")
    }

    // Plain files stand in for `/run/netns/<name>`: the lookup only compares device and inode.
    #[test]
    fn finds_the_endpoint_by_namespace_file_and_never_a_stale_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "").expect("a");
        std::fs::write(&b, "").expect("b");
        let mut snap = Snapshot::default();
        for (name, path) in [
            ("a", a.clone()),
            ("b", b.clone()),
            ("gone", dir.path().join("gone")),
        ] {
            snap.endpoints
                .insert(name.into(), (record(name, path), Vec::new()));
        }
        let (dev, ino) = id(&a);
        assert_eq!(snap.endpoint_by_netns(dev, ino).expect("a").0.name, "a");
        let (dev, ino) = id(&b);
        assert_eq!(snap.endpoint_by_netns(dev, ino).expect("b").0.name, "b");
        let err = snap
            .endpoint_by_netns(dev, ino + 1_000_000)
            .expect_err("unknown");
        assert!(matches!(err, NetdError::NotFound { .. }), "{err}");

        // `a`'s namespace file now names another namespace (a new inode): the indexed old one is no
        // longer `a`'s, and is refused rather than answered from the index.
        let (old_dev, old_ino) = id(&a);
        let replacement = dir.path().join("a2");
        std::fs::write(&replacement, "").expect("a2");
        std::fs::rename(&replacement, &a).expect("rename");
        assert_ne!(id(&a), (old_dev, old_ino));
        let err = snap.endpoint_by_netns(old_dev, old_ino).expect_err("stale");
        assert!(matches!(err, NetdError::NotFound { .. }), "{err}");
    }
}

//! The state file: endpoints with their addresses and identities, imported policies, and CIDR
//! identities, written atomically (temp file + rename) after every change so that a restarted
//! daemon adopts the same endpoints with the same identity numbers that the pinned maps hold.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sigil_identity::{Allocator, LocalAllocator, NumericIdentity};
use sigil_labels::{Label, Labels, NAMESPACE_KEY, Source, spiffe_label};
use sigil_registry::Selector;
use sigil_registry::k8s::PodAttributes;

use crate::error::NetdError;

/// File name of the state file in the state directory.
pub const STATE_FILE: &str = "netd-state.json";

/// Where an endpoint's SPIFFE ID (and so its identity) came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpiffeSource {
    /// Identity mode classic: labels only.
    #[default]
    Classic,
    /// `--spiffe-id` given at creation; no agent asked.
    Override,
    /// From an X.509-SVID the agent delivered.
    Registered,
    /// From an X.509-SVID of the entry netd registered for the endpoint's derived SPIFFE ID
    /// (`--spiffe-id-mode istio|opaque|verbose`).
    Derived,
    /// Waiting for the agent: the endpoint holds the reserved `init` identity and a policy that
    /// drops everything.
    Pending,
    /// No SVID (the agent was unreachable past the wait, had no entry, or the entry went):
    /// classic labels until the agent delivers one.
    ClassicFallback,
}

impl SpiffeSource {
    /// `classic`, `override`, `registered`, `derived`, `pending` or `classic-fallback`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Override => "override",
            Self::Registered => "registered",
            Self::Derived => "derived",
            Self::Pending => "pending",
            Self::ClassicFallback => "classic-fallback",
        }
    }

    /// Whether netd asks the agent for this endpoint's SVID.
    pub fn subscribed(self) -> bool {
        matches!(
            self,
            Self::Registered | Self::Derived | Self::Pending | Self::ClassicFallback
        )
    }
}

/// One endpoint as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Endpoint name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod labels as given (`[source:]key=value`; no source means `k8s:`).
    pub pod_labels: Vec<String>,
    /// SPIFFE ID, if any (the override, or the registered SVID's).
    pub spiffe_id: Option<String>,
    /// Where the SPIFFE ID came from (state files from before it existed: `override` with an
    /// ID, else `classic`).
    #[serde(default)]
    pub spiffe_source: SpiffeSource,
    /// NotAfter of the registered X.509-SVID, Unix seconds (the SVID and its key are never
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svid_expires_at: Option<i64>,
    /// `--spiffe-id-mode opaque`: the identity of the endpoint's labels without its SPIFFE
    /// label, on which netd holds a reference while the endpoint lives, so that the number its
    /// SPIFFE ID (`/identity/<n>`) is derived from stays allocated (and the same across
    /// restarts) while the endpoint itself carries the identity of its SPIFFE label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classic_identity: Option<u32>,
    /// Kubernetes service account (`default` in state files from before it existed).
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Stable UID, assigned at creation (empty in state files from before it existed; one is
    /// assigned when the state is loaded).
    #[serde(default)]
    pub uid: String,
    /// Numeric identity.
    pub identity: u32,
    /// Cluster mode: its identity could not be allocated in etcd yet (etcd unreachable); it
    /// holds `init` with a drop-all map until the allocation succeeds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster_pending: bool,
    /// IPv4 address.
    pub ipv4: Ipv4Addr,
    /// IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Host address index in the pod CIDRs (the same for both families).
    pub host_index: u32,
    /// Datapath endpoint id (host veth ifindex).
    pub endpoint_id: u32,
    /// Host-side veth.
    pub host_interface: String,
    /// Namespace name.
    pub netns_name: String,
    /// Namespace path.
    pub netns_path: PathBuf,
    /// Interface inside the namespace.
    pub interface: String,
}

/// A fresh endpoint UID (a random UUID, as Kubernetes gives pods).
pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl EndpointRecord {
    /// The endpoint's attributes for selectors (SPIRE's k8s spellings); pod labels of the
    /// `k8s` source (or none) become `pod-label` selectors.
    pub fn pod_attributes(&self, node_name: &str) -> Result<PodAttributes, NetdError> {
        let mut labels = Vec::new();
        for text in &self.pod_labels {
            let l = Label::parse(text).map_err(|e| NetdError::invalid("labels", text, e))?;
            if matches!(l.source, Source::K8s | Source::Unspec) {
                labels.push((l.key.to_string(), l.value.to_string()));
            }
        }
        Ok(PodAttributes {
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            pod_name: self.name.clone(),
            pod_uid: self.uid.clone(),
            labels,
            node_name: node_name.to_owned(),
        })
    }

    /// The endpoint's selectors, `k8s:…`, sorted.
    pub fn selectors(&self, node_name: &str) -> Result<Vec<Selector>, NetdError> {
        self.pod_attributes(node_name)?
            .selectors()
            .map_err(|e| NetdError::invalid(e.field, &e.value, e.cause))
    }

    /// Whether the endpoint waits for its SVID (it holds the reserved `init` identity).
    pub fn is_pending(&self) -> bool {
        self.spiffe_source == SpiffeSource::Pending || self.cluster_pending
    }

    /// The identity labels: pod labels, the namespace label, the SPIFFE ID label.
    pub fn labels(&self) -> Result<Labels, NetdError> {
        identity_labels(&self.pod_labels, &self.namespace, self.spiffe_id.as_deref())
    }
}

/// Builds an endpoint's identity labels; a label without source becomes `k8s:`.
pub fn identity_labels(
    pod_labels: &[String],
    namespace: &str,
    spiffe_id: Option<&str>,
) -> Result<Labels, NetdError> {
    let mut out = Labels::new();
    for text in pod_labels {
        let l = Label::parse(text).map_err(|e| NetdError::invalid("labels", text, e))?;
        if l.key == NAMESPACE_KEY {
            return Err(NetdError::invalid(
                "labels",
                text,
                "the namespace label comes from --namespace",
            ));
        }
        let l = match l.source {
            Source::Unspec => Label::new(Source::K8s, l.key, l.value),
            Source::K8s | Source::Spiffe => l,
            other => {
                return Err(NetdError::invalid(
                    "labels",
                    text,
                    format!("source {other} cannot be given to an endpoint"),
                ));
            }
        };
        out.insert(l);
    }
    out.insert(Label::new(Source::K8s, NAMESPACE_KEY, namespace));
    if let Some(id) = spiffe_id {
        out.insert(spiffe_label(id));
    }
    Ok(out)
}

/// A policy file imported through the API (kept whole; `policies` says which of its
/// documents are still installed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedFile {
    /// File name given at import.
    pub origin: String,
    /// The YAML text.
    pub yaml: String,
    /// `Kind/namespace/name` of the documents still installed.
    pub policies: Vec<String>,
}

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Endpoints by name.
    pub endpoints: BTreeMap<String, EndpointRecord>,
    /// Policy files imported through the API, in import order.
    pub imported: Vec<ImportedFile>,
    /// CIDR prefix → identity, for prefixes named by policies.
    pub cidr_identities: BTreeMap<String, u32>,
}

impl State {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(dir: &Path) -> Result<Self, NetdError> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(NetdError::io(path, e)),
        };
        let mut state: Self = serde_json::from_str(&text).map_err(|e| NetdError::State {
            path,
            message: e.to_string(),
        })?;
        for rec in state.endpoints.values_mut() {
            if rec.uid.is_empty() {
                rec.uid = new_uid();
            }
            if rec.spiffe_id.is_some() && rec.spiffe_source == SpiffeSource::Classic {
                rec.spiffe_source = SpiffeSource::Override;
            }
        }
        Ok(state)
    }

    /// Writes the state file atomically.
    pub fn save(&self, dir: &Path) -> Result<(), NetdError> {
        std::fs::create_dir_all(dir).map_err(|e| NetdError::io(dir, e))?;
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| NetdError::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(|e| NetdError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| NetdError::io(&path, e))
    }
}

/// Re-allocates recorded identities with their recorded numbers, into a fresh allocator.
///
/// `LocalAllocator` hands out fresh numbers in order (cluster-local from 256, node-local CIDR
/// from 1 above the CIDR flag) and has no way to claim a given one, so the numbers below each
/// recorded one are taken by placeholder label sets (released at the end; reusable after the
/// grace period). The maps pinned in the kernel carry these numbers: a different number would
/// give an endpoint another identity's rights until reconciled. Each item is one reference.
pub fn restore_identities(
    alloc: &LocalAllocator,
    mut items: Vec<(u32, Labels)>,
) -> Result<(), NetdError> {
    items.sort_by_key(|(id, _)| *id);
    let mut next_cluster = NumericIdentity::MIN_CLUSTER_LOCAL;
    let mut next_cidr = NumericIdentity::LOCAL_CIDR_FLAG | 1;
    let mut placeholders = Vec::new();
    let mut n = 0u64;
    for (want, labels) in items {
        let mismatch = |got: u32| NetdError::Restore {
            want,
            got,
            labels: labels.sorted_string(),
        };
        if let Some(got) = alloc.lookup_by_labels(&labels) {
            alloc.allocate(&labels)?;
            if got.get() != want {
                return Err(mismatch(got.get()));
            }
            continue;
        }
        let cidr = want & NumericIdentity::LOCAL_CIDR_FLAG != 0;
        let next = if cidr {
            &mut next_cidr
        } else {
            &mut next_cluster
        };
        while *next < want {
            n += 1;
            let mut ph = Labels::new();
            if cidr {
                ph.insert(Label::new(
                    Source::Cidr,
                    format!("sigil-placeholder-{n}"),
                    "",
                ));
            } else {
                ph.insert(Label::new(
                    Source::Unspec,
                    "sigil.placeholder",
                    n.to_string(),
                ));
            }
            let (p, _) = alloc.allocate(&ph)?;
            if p.get() != *next {
                return Err(mismatch(p.get()));
            }
            placeholders.push(p);
            *next += 1;
        }
        let (got, _) = alloc.allocate(&labels)?;
        if got.get() != want {
            return Err(mismatch(got.get()));
        }
        *next = want + 1;
    }
    for p in placeholders {
        alloc.release(p)?;
    }
    Ok(())
}

/// The label set of a CIDR identity: `cidr:<prefix>` and `reserved:world`.
pub fn cidr_labels(prefix: &sigil_policy::IpPrefix) -> Result<Labels, NetdError> {
    let l = sigil_labels::cidr_label(prefix.addr(), prefix.prefix_len())
        .map_err(|e| NetdError::invalid("cidr", prefix, e))?;
    let mut out = Labels::new();
    out.insert(l);
    out.insert(Label::new(Source::Reserved, "world", ""));
    Ok(out)
}

/// Shorthand for the allocator's identity type.
pub fn nid(id: u32) -> NumericIdentity {
    NumericIdentity::new(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(app: &str) -> Labels {
        identity_labels(&[format!("app={app}")], "default", None).expect("labels")
    }

    #[test]
    fn identities_come_back_with_their_numbers() {
        let alloc = LocalAllocator::new(0, std::time::Duration::from_secs(60));
        let prefix: sigil_policy::IpPrefix = "10.250.0.0/24".parse().expect("prefix");
        let cidr_id = NumericIdentity::LOCAL_CIDR_FLAG | 3;
        let items = vec![
            (258, labels("b")),
            (256, labels("a")),
            (256, labels("a")),
            (cidr_id, cidr_labels(&prefix).expect("cidr labels")),
        ];
        restore_identities(&alloc, items).expect("restore");
        assert_eq!(alloc.lookup_by_labels(&labels("a")), Some(nid(256)));
        assert_eq!(alloc.lookup_by_labels(&labels("b")), Some(nid(258)));
        assert_eq!(
            alloc.lookup_by_labels(&cidr_labels(&prefix).expect("labels")),
            Some(nid(cidr_id))
        );
        // Two references on 256: one release keeps it.
        assert!(!alloc.release(nid(256)).expect("release"));
        // Placeholders are gone and new label sets get fresh numbers above the restored ones.
        assert_eq!(alloc.list().len(), 3);
        let (c, _) = alloc.allocate(&labels("c")).expect("alloc");
        assert_eq!(c.get(), 259);
    }

    #[test]
    fn endpoint_labels_get_k8s_source_namespace_and_spiffe_id() {
        let l = identity_labels(&["app=web".into()], "prod", Some("spiffe://td/web")).expect("ok");
        assert_eq!(
            l.sorted_string(),
            "k8s:app=web;k8s:io.kubernetes.pod.namespace=prod;spiffe:spiffe.io/spiffe-id=spiffe://td/web"
        );
        let e = identity_labels(&["reserved:host".into()], "prod", None).expect_err("reserved");
        assert!(
            e.to_string()
                .starts_with("labels: invalid value \"reserved:host\""),
            "{e}"
        );
        let e = identity_labels(&["io.kubernetes.pod.namespace=x".into()], "p", None)
            .expect_err("ns label");
        assert!(e.to_string().contains("--namespace"), "{e}");
    }

    #[test]
    fn older_state_files_get_a_spiffe_source_and_keys_are_never_recorded() {
        let dir = tempfile::tempdir().expect("tmp");
        let rec = |id: Option<&str>| {
            serde_json::json!({
                "name": "a", "namespace": "default", "pod_labels": ["app=a"],
                "spiffe_id": id, "identity": 256, "ipv4": "10.0.0.2", "ipv6": "fd00::2",
                "host_index": 2, "endpoint_id": 7, "host_interface": "lxc1",
                "netns_name": "sigil-a", "netns_path": "/run/netns/sigil-a", "interface": "eth0"
            })
        };
        let file = serde_json::json!({
            "endpoints": {"a": rec(Some("spiffe://td/a")), "b": rec(None)},
            "imported": [], "cidr_identities": {}
        });
        std::fs::write(dir.path().join(STATE_FILE), file.to_string()).expect("write");
        let s = State::load(dir.path()).expect("load");
        assert_eq!(s.endpoints["a"].spiffe_source, SpiffeSource::Override);
        assert_eq!(s.endpoints["b"].spiffe_source, SpiffeSource::Classic);
        let mut s = s;
        if let Some(r) = s.endpoints.get_mut("b") {
            r.spiffe_source = SpiffeSource::Registered;
            r.spiffe_id = Some("spiffe://td/b".into());
            r.svid_expires_at = Some(1_900_000_000);
        }
        s.save(dir.path()).expect("save");
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).expect("read");
        assert!(text.contains("\"spiffe_source\": \"registered\""), "{text}");
        assert!(!text.contains("key") && !text.contains("BEGIN"), "{text}");
        assert_eq!(State::load(dir.path()).expect("reload"), s);
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(State::load(dir.path()).expect("empty"), State::default());
        let mut s = State::default();
        s.cidr_identities.insert("10.0.0.0/8".into(), 16_777_217);
        s.save(dir.path()).expect("save");
        assert_eq!(State::load(dir.path()).expect("load"), s);
        std::fs::write(dir.path().join(STATE_FILE), "{").expect("write");
        let e = State::load(dir.path()).expect_err("corrupt");
        assert!(e.to_string().contains(STATE_FILE), "{e}");
    }
}

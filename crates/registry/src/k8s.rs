//! The selectors of a pod-like workload in SPIRE's Kubernetes workload attestor spellings
//! (`k8s:ns:…`, `k8s:sa:…`, `k8s:pod-name:…`, `k8s:pod-uid:…`, `k8s:pod-label:<key>:<value>`,
//! `k8s:node-name:…`), so registration entries written for SPIRE's k8s attestor select sigil
//! endpoints unchanged. netd subscribes with them on an endpoint's behalf (Delegated Identity
//! API) and the agent's endpoint attestor produces the same set for processes inside it.

use crate::selector::{Selector, SelectorError};

/// The selector kind of every selector built here.
pub const KIND: &str = "k8s";

/// What a pod-like workload is, as far as selectors go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodAttributes {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Pod (endpoint) name.
    pub pod_name: String,
    /// Stable pod (endpoint) UID.
    pub pod_uid: String,
    /// Pod labels, `(key, value)`.
    pub labels: Vec<(String, String)>,
    /// Node the pod runs on.
    pub node_name: String,
}

/// A selector that could not be formed; names the attribute and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: invalid value {value:?}: {cause}")]
pub struct PodSelectorError {
    /// The attribute (`namespace`, `service_account`, `labels`, …).
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// Why the selector built from it is invalid.
    pub cause: SelectorError,
}

impl PodAttributes {
    /// Every selector of the workload, sorted: namespace, service account, pod name, pod UID,
    /// node name (each when not empty) and one `pod-label` per label.
    pub fn selectors(&self) -> Result<Vec<Selector>, PodSelectorError> {
        let mut out = Vec::with_capacity(5 + self.labels.len());
        let fields = [
            ("namespace", "ns", &self.namespace),
            ("service_account", "sa", &self.service_account),
            ("name", "pod-name", &self.pod_name),
            ("uid", "pod-uid", &self.pod_uid),
            ("node_name", "node-name", &self.node_name),
        ];
        for (field, prefix, value) in fields {
            if value.is_empty() {
                continue;
            }
            out.push(one(field, value, format!("{prefix}:{value}"))?);
        }
        for (key, value) in &self.labels {
            out.push(one(
                "labels",
                &format!("{key}={value}"),
                format!("pod-label:{key}:{value}"),
            )?);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

fn one(
    field: &'static str,
    value: &str,
    selector_value: String,
) -> Result<Selector, PodSelectorError> {
    Selector::new(KIND, selector_value).map_err(|cause| PodSelectorError {
        field,
        value: value.to_owned(),
        cause,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pod() -> PodAttributes {
        PodAttributes {
            namespace: "default".into(),
            service_account: "web".into(),
            pod_name: "frontend".into(),
            pod_uid: "0d6f3c1e-8a57-4bde-9a8f-1d2c3b4a5e6f".into(),
            labels: vec![
                ("app".into(), "frontend".into()),
                ("tier".into(), "web".into()),
            ],
            node_name: "node-1".into(),
        }
    }

    #[test]
    fn spire_k8s_spellings() {
        let got: Vec<String> = pod()
            .selectors()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "k8s:node-name:node-1",
                "k8s:ns:default",
                "k8s:pod-label:app:frontend",
                "k8s:pod-label:tier:web",
                "k8s:pod-name:frontend",
                "k8s:pod-uid:0d6f3c1e-8a57-4bde-9a8f-1d2c3b4a5e6f",
                "k8s:sa:web",
            ]
        );
    }

    #[test]
    fn empty_attributes_give_no_selector() {
        let p = PodAttributes {
            node_name: String::new(),
            labels: vec![],
            ..pod()
        };
        let got = p.selectors().unwrap();
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|s| !s.value.starts_with("node-name")));
    }

    #[test]
    fn a_label_that_cannot_be_a_selector_names_the_field_and_value() {
        let p = PodAttributes {
            labels: vec![("app".into(), "a\u{7}b".into())],
            ..pod()
        };
        let e = p.selectors().unwrap_err();
        assert_eq!(e.field, "labels");
        assert!(
            e.to_string()
                .starts_with("labels: invalid value \"app=a\\u{7}b\""),
            "{e}"
        );
        let long = PodAttributes {
            namespace: "n".repeat(2000),
            ..pod()
        };
        assert_eq!(long.selectors().unwrap_err().field, "namespace");
    }
}

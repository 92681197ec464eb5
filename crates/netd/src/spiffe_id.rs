//! SPIFFE ID formats (`--spiffe-id-mode`): in the derived modes (istio, opaque, verbose) an endpoint's
//! SPIFFE ID is a pure function of its attributes, together with the registration-entry selectors that
//! make this node's agent match every endpoint that derives the same ID.
//!
//! - `istio`: `spiffe://<td>/ns/<namespace>/sa/<service account>`; selectors `k8s:ns`, `k8s:sa`.
//! - `opaque`: `spiffe://<td>/identity/<n>`, `n` the numeric identity of the endpoint's labels without
//!   the SPIFFE label (derived from the labels, never the reverse); selectors `k8s:ns` and one
//!   `k8s:pod-label:<key>:<value>` per pod label, i.e. exactly the labels that give `n`.
//! - `verbose`: a path template (default [`DEFAULT_TEMPLATE`]) over `{cluster}`, `{namespace}`,
//!   `{service_account}`, `{app}` (the `app` pod label) and `{name}` (the endpoint's name); the
//!   selectors are those of the placeholders used (`{cluster}` is this netd's, not a selector).
//!
//! Only opaque entries can overlap: an endpoint whose labels are a superset of another identity's
//! labels also matches that identity's (smaller) entry, so the agent hands it both SVIDs. In derived
//! modes the endpoint's SVID is the one whose ID equals its derived ID ([`pick_svid`]); the other is
//! ignored. Istio and verbose selectors are single-valued attributes, so their entries never overlap.

use std::collections::BTreeSet;
use std::fmt;

use sigil_labels::{Label, Source};
use sigil_registry::Selector;
use sigil_registry::k8s::PodAttributes;
use sigil_spiffe::{SpiffeId, TrustDomain};

use crate::state::EndpointRecord;

/// Default template of the verbose mode.
pub const DEFAULT_TEMPLATE: &str =
    "/cluster/{cluster}/ns/{namespace}/sa/{service_account}/app/{app}";

/// Default cluster name.
pub const DEFAULT_CLUSTER: &str = "default";

/// Why a mode, a template or an endpoint's derived ID is refused; names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdModeError {
    /// A configuration value (mode, template, cluster name) is invalid.
    #[error("{field}: invalid value {value:?}: {reason}")]
    Config {
        /// The configuration key.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// An endpoint's attributes cannot give a SPIFFE ID or selectors in this mode.
    #[error("endpoint {endpoint:?}: {field}: invalid value {value:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// The attribute (`namespace`, `labels`, …) or the template.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// Where endpoints' SPIFFE IDs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffeIdMode {
    /// From entries users register (any path); netd registers nothing.
    Registered,
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    Istio,
    /// `spiffe://<td>/identity/<numeric identity of the labels without the SPIFFE label>`.
    Opaque,
    /// A path template over the endpoint's attributes.
    Verbose(Template),
}

impl SpiffeIdMode {
    /// Parses `--spiffe-id-mode` (with `--spiffe-id-template` for verbose; the template is refused in
    /// the other modes, where it would silently do nothing).
    pub fn parse(mode: &str, template: Option<&str>) -> Result<Self, SpiffeIdModeError> {
        let m = match mode {
            "registered" => Self::Registered,
            "istio" => Self::Istio,
            "opaque" => Self::Opaque,
            "verbose" => {
                return Ok(Self::Verbose(Template::parse(
                    template.unwrap_or(DEFAULT_TEMPLATE),
                )?));
            }
            other => {
                return Err(SpiffeIdModeError::Config {
                    field: "spiffe_id_mode",
                    value: other.to_owned(),
                    reason: "registered, istio, opaque or verbose".into(),
                });
            }
        };
        if let Some(t) = template {
            return Err(SpiffeIdModeError::Config {
                field: "spiffe_id_template",
                value: t.to_owned(),
                reason: format!("only used with spiffe_id_mode verbose, not {mode}"),
            });
        }
        Ok(m)
    }

    /// `registered`, `istio`, `opaque` or `verbose`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Istio => "istio",
            Self::Opaque => "opaque",
            Self::Verbose(_) => "verbose",
        }
    }

    /// Whether netd derives the IDs (and registers their entries).
    pub fn is_derived(&self) -> bool {
        !matches!(self, Self::Registered)
    }
}

/// A placeholder of the verbose template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Var {
    /// `{cluster}`: netd's `--cluster-name`.
    Cluster,
    /// `{namespace}`.
    Namespace,
    /// `{service_account}`.
    ServiceAccount,
    /// `{app}`: the value of the `app` pod label.
    App,
    /// `{name}`: the endpoint's name.
    Name,
}

impl Var {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "cluster" => Self::Cluster,
            "namespace" => Self::Namespace,
            "service_account" => Self::ServiceAccount,
            "app" => Self::App,
            "name" => Self::Name,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(Var),
}

/// A parsed verbose-mode path template: `/` then literal text and `{placeholder}`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A stand-in value for checking a template's literal parts at start.
const SAMPLE: &str = "x";

impl Template {
    /// Parses a template: placeholders are `{cluster}`, `{namespace}`, `{service_account}`, `{app}`,
    /// `{name}`; the literal parts must form a valid SPIFFE ID path, and at least one placeholder other
    /// than `{cluster}` must be used (it is what the entry's selectors match on).
    pub fn parse(text: &str) -> Result<Self, SpiffeIdModeError> {
        let bad = |reason: String| SpiffeIdModeError::Config {
            field: "spiffe_id_template",
            value: text.to_owned(),
            reason,
        };
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Lit(rest.to_owned()));
                    rest = "";
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(bad(format!("unmatched '}}' at {:?}", &rest[i..])));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Lit(rest[..i].to_owned()));
                    }
                    let after = &rest[i + 1..];
                    let end = after
                        .find(['{', '}'])
                        .filter(|j| after.as_bytes()[*j] == b'}')
                        .ok_or_else(|| bad(format!("unclosed '{{' at {:?}", &rest[i..])))?;
                    let name = &after[..end];
                    let var = Var::parse(name).ok_or_else(|| {
                        bad(format!(
                            "unknown placeholder {{{name}}}: use {{cluster}}, {{namespace}}, \
                             {{service_account}}, {{app}} or {{name}}"
                        ))
                    })?;
                    parts.push(Part::Var(var));
                    rest = &after[end + 1..];
                }
            }
        }
        let t = Template {
            text: text.to_owned(),
            parts,
        };
        if !t.vars().iter().any(|v| *v != Var::Cluster) {
            return Err(bad(
                "uses no endpoint attribute ({namespace}, {service_account}, {app} or {name}): \
                 every endpoint would get the same ID"
                    .into(),
            ));
        }
        // The literal parts, with stand-in values, must already make a valid ID path.
        let sample = t.render(|_| SAMPLE);
        TrustDomain::parse("example.org")
            .and_then(|td| td.id_with_path(&sample))
            .map_err(|e| {
                bad(format!(
                    "does not give a valid SPIFFE ID path ({sample:?}): {e}"
                ))
            })?;
        Ok(t)
    }

    /// The placeholders used, each once.
    pub fn vars(&self) -> BTreeSet<Var> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Var(v) => Some(*v),
                Part::Lit(_) => None,
            })
            .collect()
    }

    fn render<'a>(&self, value: impl Fn(Var) -> &'a str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(v) => out.push_str(value(*v)),
            }
        }
        out
    }
}

/// Derives endpoints' SPIFFE IDs in one mode, for one trust domain and cluster.
#[derive(Debug, Clone)]
pub struct Deriver {
    /// The mode.
    pub mode: SpiffeIdMode,
    /// The trust domain of the IDs.
    pub trust_domain: TrustDomain,
    /// The cluster name (`{cluster}`).
    pub cluster: String,
}

/// An endpoint's derived SPIFFE ID and the selectors of its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The entry's selectors, sorted: this node's agent matches every endpoint deriving this ID.
    pub selectors: Vec<Selector>,
}

/// Checks `--cluster-name`: it is a path segment of verbose IDs.
pub fn check_cluster(name: &str) -> Result<(), SpiffeIdModeError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdModeError::Config {
            field: "cluster_name",
            value: name.to_owned(),
            reason: "must be a SPIFFE ID path segment: letters, digits, '.', '-', '_'".into(),
        })
    }
}

/// What derivation reads of an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct EndpointAttrs<'a> {
    /// Name.
    pub name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Service account.
    pub service_account: &'a str,
    /// Pod labels `[source:]key=value`.
    pub pod_labels: &'a [String],
}

impl<'a> From<&'a EndpointRecord> for EndpointAttrs<'a> {
    fn from(r: &'a EndpointRecord) -> Self {
        EndpointAttrs {
            name: &r.name,
            namespace: &r.namespace,
            service_account: &r.service_account,
            pod_labels: &r.pod_labels,
        }
    }
}

impl Deriver {
    /// Checks, before an endpoint is created, that its attributes can give an ID and selectors in
    /// this mode (the opaque number, not known yet, cannot make it fail), so that an endpoint that
    /// could never get its entry is refused whole rather than created half-way.
    pub fn precheck(&self, ep: EndpointAttrs<'_>) -> Result<(), SpiffeIdModeError> {
        self.derive(ep, Some(1)).map(|_| ())
    }

    /// The endpoint's derived ID and entry selectors; `None` in registered mode. `classic_identity` is
    /// the numeric identity of the endpoint's labels without the SPIFFE label (used by opaque only).
    pub fn derive<'a>(
        &self,
        ep: impl Into<EndpointAttrs<'a>>,
        classic_identity: Option<u32>,
    ) -> Result<Option<Derived>, SpiffeIdModeError> {
        let ep: EndpointAttrs<'a> = ep.into();
        let bad = |field: &'static str, value: &str, reason: String| SpiffeIdModeError::Endpoint {
            endpoint: ep.name.to_owned(),
            field,
            value: value.to_owned(),
            reason,
        };
        let mut attrs = PodAttributes {
            namespace: ep.namespace.to_owned(),
            ..PodAttributes::default()
        };
        let path = match &self.mode {
            SpiffeIdMode::Registered => return Ok(None),
            SpiffeIdMode::Istio => {
                attrs.service_account = ep.service_account.to_owned();
                format!("/ns/{}/sa/{}", ep.namespace, ep.service_account)
            }
            SpiffeIdMode::Opaque => {
                for text in ep.pod_labels {
                    let l = Label::parse(text).map_err(|e| bad("labels", text, e.to_string()))?;
                    match l.source {
                        Source::K8s | Source::Unspec => attrs.labels.push((l.key, l.value)),
                        // It is part of the identity but no agent selector can match it.
                        other => {
                            return Err(bad(
                                "labels",
                                text,
                                format!(
                                    "a {other}: label cannot be a selector, so no entry can \
                                     match it in opaque mode"
                                ),
                            ));
                        }
                    }
                }
                let n = classic_identity.ok_or_else(|| {
                    bad(
                        "labels",
                        &ep.pod_labels.join(","),
                        "no numeric identity is allocated for these labels yet".into(),
                    )
                })?;
                format!("/identity/{n}")
            }
            SpiffeIdMode::Verbose(t) => {
                let app = ep.pod_labels.iter().find_map(|text| {
                    let l = Label::parse(text).ok()?;
                    (matches!(l.source, Source::K8s | Source::Unspec) && l.key == "app")
                        .then_some(l.value)
                });
                let vars = t.vars();
                if vars.contains(&Var::ServiceAccount) {
                    attrs.service_account = ep.service_account.to_owned();
                }
                if vars.contains(&Var::Name) {
                    attrs.pod_name = ep.name.to_owned();
                }
                if !vars.contains(&Var::Namespace) {
                    attrs.namespace.clear();
                }
                if vars.contains(&Var::App) {
                    let app = app.as_deref().ok_or_else(|| {
                        bad(
                            "labels",
                            &ep.pod_labels.join(","),
                            format!("has no app label, which spiffe_id_template {t} uses"),
                        )
                    })?;
                    attrs.labels.push(("app".into(), app.to_owned()));
                }
                let app = app.unwrap_or_default();
                t.render(|v| match v {
                    Var::Cluster => &self.cluster,
                    Var::Namespace => ep.namespace,
                    Var::ServiceAccount => ep.service_account,
                    Var::App => &app,
                    Var::Name => ep.name,
                })
            }
        };
        let spiffe_id = self.trust_domain.id_with_path(&path).map_err(|e| {
            let field = match self.mode {
                SpiffeIdMode::Verbose(_) => "spiffe_id_template",
                _ => "spiffe_id",
            };
            bad(
                field,
                &format!("spiffe://{}{path}", self.trust_domain),
                format!("not a valid SPIFFE ID: {e}"),
            )
        })?;
        let selectors = attrs
            .selectors()
            .map_err(|e| bad(e.field, &e.value, e.cause.to_string()))?;
        Ok(Some(Derived {
            spiffe_id,
            selectors,
        }))
    }
}

/// Of the SPIFFE IDs of the SVIDs the agent gives an endpoint, the one to use in a derived mode: the
/// one equal to its derived ID (an opaque endpoint may also match a smaller identity's entry).
pub fn pick_svid<'a>(derived: &SpiffeId, ids: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    ids.into_iter().position(|id| id == derived.to_string())
}

#[cfg(test)]
mod tests;

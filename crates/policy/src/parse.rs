//! Multi-document YAML of NetworkPolicy, CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy, validated field by field and translated into the rule model.
//!
//! Decoding goes YAML → generic value (serde-saphyr) → a hand-written walk that knows every
//! field's path, so an error names the document, the path and the value. Unknown fields are
//! rejected, as the CRDs' structural schemas reject them; real fields that sigil does not
//! implement (`nodeSelector`, `toServices`, `icmps`, ...) are rejected with a reason. Named
//! ports (`port: http`) are rejected too: resolving them needs the pods' container specs.

mod cilium;
mod k8s;
mod walk;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use sigil_labels::{
    NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, Operator, Requirement, Selector, SelectorKey, Source,
};

use crate::error::{DocumentError, PolicyError};
use crate::model::{Document, PolicyId, PolicyKind};
use walk::{Fail, Node, R};

/// Origin name used by [`parse_str`].
pub const INPUT_ORIGIN: &str = "<input>";

/// Parses every document of `text` (`---`-separated YAML); `origin` (a file name) is quoted
/// in errors. Either every document is valid and all are returned, or an error lists every
/// invalid document and nothing is returned. The same policy twice is an error.
pub fn parse_documents(text: &str, origin: &str) -> Result<Vec<Document>, PolicyError> {
    // YAML 1.2 scalars: `n`, `no`, `on` stay strings (a policy named `n` is a name), numbers
    // with leading zeros or underscores stay strings; duplicate keys are an error.
    let options = serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    };
    let values: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| PolicyError::Yaml {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
    let mut docs = Vec::with_capacity(values.len());
    let mut errors = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let index = i + 1;
        match document(v) {
            Ok((id, rules)) => docs.push(Document {
                id,
                origin: origin.to_owned(),
                index,
                rules,
            }),
            Err(fail) => errors.push(DocumentError {
                origin: origin.to_owned(),
                index,
                name: doc_name(v),
                path: fail.path,
                problem: fail.problem,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyError::Invalid { errors });
    }
    check_duplicates(&docs)?;
    Ok(docs)
}

/// [`parse_documents`] with the origin `<input>`.
pub fn parse_str(text: &str) -> Result<Vec<Document>, PolicyError> {
    parse_documents(text, INPUT_ORIGIN)
}

/// Fails when two documents define the same policy.
pub(crate) fn check_duplicates(docs: &[Document]) -> Result<(), PolicyError> {
    let mut seen: HashMap<&PolicyId, &Document> = HashMap::new();
    for d in docs {
        if let Some(first) = seen.insert(&d.id, d) {
            return Err(PolicyError::Duplicate {
                id: d.id.to_string(),
                first: format!("{} document {}", first.origin, first.index),
                second: format!("{} document {}", d.origin, d.index),
            });
        }
    }
    Ok(())
}

fn doc_name(v: &Value) -> Option<String> {
    v.get("metadata")?.get("name")?.as_str().map(str::to_owned)
}

const TOP_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "specs", "status"];
const K8S_API: &str = "networking.k8s.io/v1";
const CILIUM_API: &str = "cilium.io/v2";

fn document(v: &Value) -> R<(PolicyId, Vec<crate::model::Rule>)> {
    let root = Node::root(v);
    let obj = root.object(TOP_FIELDS, &[])?;
    let api_node = obj.required("apiVersion")?;
    let api = api_node.str()?;
    let kind_node = obj.required("kind")?;
    let kind = match kind_node.str()? {
        "NetworkPolicy" => PolicyKind::NetworkPolicy,
        "CiliumNetworkPolicy" => PolicyKind::CiliumNetworkPolicy,
        "CiliumClusterwideNetworkPolicy" => PolicyKind::CiliumClusterwideNetworkPolicy,
        _ => {
            return Err(kind_node.invalid(
                "unsupported kind (expected NetworkPolicy, CiliumNetworkPolicy or \
                 CiliumClusterwideNetworkPolicy)",
            ));
        }
    };
    let want_api = match kind {
        PolicyKind::NetworkPolicy => K8S_API,
        _ => CILIUM_API,
    };
    if api != want_api {
        return Err(api_node.invalid(format!("{kind} needs apiVersion {want_api}")));
    }
    let (name, namespace) = metadata(&obj.required("metadata")?)?;
    let id = match kind {
        PolicyKind::CiliumClusterwideNetworkPolicy => PolicyId::new(kind, None, &name),
        _ => PolicyId::new(kind, Some(namespace.as_deref().unwrap_or("default")), &name),
    };
    let rules = match kind {
        PolicyKind::NetworkPolicy => {
            if let Some(specs) = obj.get("specs") {
                return Err(specs.fail(crate::error::Problem::UnknownField {
                    field: "specs".to_owned(),
                    allowed: vec!["apiVersion", "kind", "metadata", "spec", "status"],
                }));
            }
            vec![k8s::network_policy(&obj.required("spec")?, &id)?]
        }
        _ => cilium::policy(&obj, &id)?,
    };
    Ok((id, rules))
}

/// `metadata`: `name` (required) and `namespace`; other ObjectMeta fields are accepted and
/// ignored (labels, annotations, uid, ...).
fn metadata(n: &Node<'_>) -> R<(String, Option<String>)> {
    let Value::Object(map) = n.v else {
        return Err(n.fail(crate::error::Problem::WrongType {
            expected: "an object",
            value: walk::render(n.v),
        }));
    };
    let field = |k: &str| {
        map.get(k).filter(|v| !v.is_null()).map(|v| Node {
            v,
            path: format!("metadata.{k}"),
        })
    };
    let name_node = field("name").ok_or_else(|| Fail {
        path: "metadata.name".to_owned(),
        problem: crate::error::Problem::Missing,
    })?;
    let name = name_node.str()?;
    if !is_dns_subdomain(name) {
        return Err(name_node.invalid(
            "must be a DNS subdomain: lower-case letters, digits, '-' and '.', starting and \
             ending with a letter or digit, at most 253 characters",
        ));
    }
    let namespace = match field("namespace") {
        Some(ns_node) => {
            let ns = ns_node.str()?;
            if !is_dns_label(ns) {
                return Err(ns_node.invalid(
                    "must be a DNS label: lower-case letters, digits and '-', starting and \
                     ending with a letter or digit, at most 63 characters",
                ));
            }
            Some(ns.to_owned())
        }
        None => None,
    };
    Ok((name.to_owned(), namespace))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// A label selector as written (`matchLabels`, `matchExpressions`), keys as written.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawSelector {
    labels: BTreeMap<String, (String, String)>,
    exprs: Vec<(String, Operator, Vec<String>, String)>,
}

/// Reads a label selector; every key and value is checked here so errors carry the path.
pub(crate) fn raw_selector(n: &Node<'_>) -> R<RawSelector> {
    let obj = n.object(&["matchLabels", "matchExpressions"], &[])?;
    let mut raw = RawSelector::default();
    if let Some(ml) = obj.get("matchLabels") {
        let Value::Object(map) = ml.v else {
            return Err(ml.fail(crate::error::Problem::WrongType {
                expected: "an object of label key to value",
                value: walk::render(ml.v),
            }));
        };
        for (k, v) in map {
            let vn = Node {
                v,
                path: format!("{}.{k}", ml.path),
            };
            // Unquoted numbers and booleans are label values too (`version: 2`).
            let value = match vn.v {
                Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => vn.str()?.to_owned(),
            };
            raw.labels.insert(k.clone(), (value, vn.path.clone()));
        }
    }
    for item in obj.list("matchExpressions")? {
        let e = item.object(&["key", "operator", "values"], &[])?;
        let key_node = e.required("key")?;
        let key = key_node.str()?.to_owned();
        let op_node = e.required("operator")?;
        let op: Operator = op_node
            .str()?
            .parse()
            .map_err(|_| op_node.invalid("expected In, NotIn, Exists or DoesNotExist"))?;
        let values = match e.get("values") {
            Some(v) => v.strings()?,
            None => Vec::new(),
        };
        match op {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(Fail {
                    path: e.path_of("values"),
                    problem: crate::error::Problem::InvalidValue {
                        value: "[]".to_owned(),
                        reason: format!("operator {op} needs at least one value"),
                    },
                });
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(Fail {
                    path: e.path_of("values"),
                    problem: crate::error::Problem::InvalidValue {
                        value: format!("{values:?}"),
                        reason: format!("operator {op} takes no values"),
                    },
                });
            }
            _ => {}
        }
        raw.exprs.push((key, op, values, key_node.path.clone()));
    }
    Ok(raw)
}

impl RawSelector {
    /// Whether no requirement is written.
    pub(crate) fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.exprs.is_empty()
    }

    /// Builds the selector, rewriting every key with `key_map` (e.g. adding `k8s:`), and
    /// dropping keys for which `drop` is true.
    pub(crate) fn build(
        &self,
        key_map: impl Fn(&str) -> String,
        drop: impl Fn(&SelectorKey) -> bool,
    ) -> R<Selector> {
        let mut sel = Selector::wildcard();
        for (k, (v, path)) in &self.labels {
            let key = parse_key(&key_map(k), path)?;
            if drop(&key) {
                continue;
            }
            sel = sel.with_requirement(Requirement {
                key,
                op: Operator::In,
                values: BTreeSet::from([v.clone()]),
            });
        }
        for (k, op, values, path) in &self.exprs {
            let key = parse_key(&key_map(k), path)?;
            if drop(&key) {
                continue;
            }
            sel = sel.with_requirement(Requirement {
                key,
                op: *op,
                values: values.iter().cloned().collect(),
            });
        }
        Ok(sel)
    }
}

fn parse_key(key: &str, path: &str) -> R<SelectorKey> {
    SelectorKey::parse(key).map_err(|e| Fail {
        path: path.to_owned(),
        problem: crate::error::Problem::InvalidValue {
            value: format!("{key:?}"),
            reason: e.to_string(),
        },
    })
}

/// Where a policy applies: its namespace, or the whole cluster.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    Namespaced(&'a str),
    Clusterwide,
}

impl<'a> Scope<'a> {
    pub(crate) fn of(id: &'a PolicyId) -> Scope<'a> {
        match &id.namespace {
            Some(ns) => Scope::Namespaced(ns),
            None => Scope::Clusterwide,
        }
    }
}

fn is_ns_source(s: Source) -> bool {
    matches!(s, Source::K8s | Source::Any)
}

fn namespace_key() -> SelectorKey {
    SelectorKey {
        source: Source::K8s,
        key: NAMESPACE_KEY.to_owned(),
    }
}

/// The requirement `k8s:io.kubernetes.pod.namespace in (ns)`.
pub(crate) fn in_namespace(ns: &str) -> Requirement {
    Requirement {
        key: namespace_key(),
        op: Operator::In,
        values: BTreeSet::from([ns.to_owned()]),
    }
}

/// The requirement that a namespace label exists (any pod, any namespace).
pub(crate) fn has_namespace() -> Requirement {
    Requirement {
        key: namespace_key(),
        op: Operator::Exists,
        values: BTreeSet::new(),
    }
}

/// A peer endpoint selector scoped as Cilium scopes it: left alone when it selects reserved
/// labels or names a namespace; in a namespaced policy limited to the policy's namespace
/// unless it selects namespace labels; in a clusterwide policy limited to endpoints that have
/// a namespace (so `{}` there means "any pod", not "anything").
pub(crate) fn scope_peer(sel: Selector, scope: Scope<'_>) -> Selector {
    let reqs = sel.requirements();
    if reqs.iter().any(|r| r.key.source == Source::Reserved) {
        return sel;
    }
    if reqs
        .iter()
        .any(|r| r.key.key == NAMESPACE_KEY && is_ns_source(r.key.source))
    {
        return sel;
    }
    match scope {
        Scope::Namespaced(ns) => {
            if reqs.iter().any(|r| {
                r.key.key.starts_with(NAMESPACE_LABELS_PREFIX) && is_ns_source(r.key.source)
            }) {
                sel
            } else {
                sel.with_requirement(in_namespace(ns))
            }
        }
        Scope::Clusterwide => sel.with_requirement(has_namespace()),
    }
}

/// A subject selector: in a namespaced policy always limited to the policy's namespace (a
/// `k8s:` namespace match written by the user is replaced, as Cilium does).
pub(crate) fn scope_subject(
    raw: &RawSelector,
    key_map: impl Fn(&str) -> String,
    scope: Scope<'_>,
) -> R<Selector> {
    match scope {
        Scope::Namespaced(ns) => {
            let sel = raw.build(key_map, |k| {
                k.key == NAMESPACE_KEY && k.source == Source::K8s
            })?;
            Ok(sel.with_requirement(in_namespace(ns)))
        }
        Scope::Clusterwide => raw.build(key_map, |_| false),
    }
}

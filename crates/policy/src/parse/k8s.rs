//! `networking.k8s.io/v1` NetworkPolicy, translated the way Cilium translates it: `k8s:`
//! label keys, namespace selectors on `io.cilium.k8s.namespace.labels.*`, `policyTypes`
//! deciding the default-deny directions, and an empty rule meaning "everything".

use sigil_labels::NAMESPACE_LABELS_PREFIX;

use crate::error::Problem;
use crate::model::{
    Action, Direction, PeerSelector, Peers, PerDirection, PolicyId, PortRule, Ports, Protocol,
    Rule, RuleEntry,
};

use super::cilium::{cidr_rule, end_port, port_number};
use super::walk::{Fail, Node, R};
use super::{Scope, has_namespace, raw_selector, scope_peer, scope_subject};

fn k8s_key(k: &str) -> String {
    format!("k8s:{k}")
}

fn ns_label_key(k: &str) -> String {
    format!("k8s:{NAMESPACE_LABELS_PREFIX}{k}")
}

/// The single rule of a NetworkPolicy `spec`.
pub(super) fn network_policy(spec: &Node<'_>, id: &PolicyId) -> R<Rule> {
    let ns = id.namespace.as_deref().unwrap_or("default");
    let scope = Scope::Namespaced(ns);
    let o = spec.object(&["podSelector", "ingress", "egress", "policyTypes"], &[])?;
    let subject = scope_subject(&raw_selector(&o.required("podSelector")?)?, k8s_key, scope)?;
    let ingress = o.list("ingress")?;
    let egress = o.list("egress")?;
    let types = match o.get("policyTypes") {
        Some(pt) => {
            let mut t = PerDirection::default();
            for item in pt.list()? {
                match item.str()? {
                    "Ingress" => t.ingress = true,
                    "Egress" => t.egress = true,
                    _ => return Err(item.invalid("expected Ingress or Egress")),
                }
            }
            t
        }
        // Kubernetes' defaulting: Ingress always, Egress when egress rules are given.
        None => PerDirection {
            ingress: true,
            egress: !egress.is_empty(),
        },
    };
    let mut entries = Vec::new();
    // Rules of a direction missing from policyTypes have no effect.
    if types.ingress {
        for item in &ingress {
            entries.push(entry(item, Direction::Ingress, scope)?);
        }
    }
    if types.egress {
        for item in &egress {
            entries.push(entry(item, Direction::Egress, scope)?);
        }
    }
    Ok(Rule {
        path: spec.path.clone(),
        subject,
        description: None,
        default_deny: types,
        entries,
    })
}

fn entry(n: &Node<'_>, dir: Direction, scope: Scope<'_>) -> R<RuleEntry> {
    let peer_key = match dir {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let o = n.object(
        match dir {
            Direction::Ingress => &["from", "ports"],
            Direction::Egress => &["to", "ports"],
        },
        &[],
    )?;
    let mut peers = Vec::new();
    for p in o.list(peer_key)? {
        peers.push(peer(&p, scope)?);
    }
    let mut ports = Vec::new();
    for p in o.list("ports")? {
        let po = p.object(&["protocol", "port", "endPort"], &[])?;
        let protocol = match po.get("protocol") {
            Some(pn) => match Protocol::parse(pn.str()?) {
                Some(Protocol::Any) | None => {
                    return Err(pn.invalid("expected TCP, UDP or SCTP"));
                }
                Some(proto) => proto,
            },
            None => Protocol::Tcp,
        };
        let port = match po.get("port") {
            Some(pn) => port_number(&pn)?,
            None => 0,
        };
        let end = po.get("endPort").map(|e| end_port(&e, port)).transpose()?;
        ports.push(PortRule::new(protocol, port, end));
    }
    Ok(RuleEntry {
        path: n.path.clone(),
        direction: dir,
        action: Action::Allow,
        // An empty or missing from/to means every peer; missing ports means every port.
        peers: if peers.is_empty() {
            Peers::Any
        } else {
            Peers::Only(peers)
        },
        ports: if ports.is_empty() {
            Ports::Any
        } else {
            Ports::Only(ports)
        },
        auth_required: false,
    })
}

fn peer(n: &Node<'_>, scope: Scope<'_>) -> R<PeerSelector> {
    let o = n.object(&["podSelector", "namespaceSelector", "ipBlock"], &[])?;
    let pod = o.get("podSelector");
    let nsel = o.get("namespaceSelector");
    if let Some(block) = o.get("ipBlock") {
        if pod.is_some() || nsel.is_some() {
            return Err(Fail {
                path: n.path.clone(),
                problem: Problem::InvalidValue {
                    value: super::walk::render(n.v),
                    reason: "ipBlock cannot be combined with podSelector or namespaceSelector"
                        .to_owned(),
                },
            });
        }
        let bo = block.object(&["cidr", "except"], &[])?;
        return Ok(PeerSelector::Cidr(cidr_rule(&bo)?));
    }
    let pod_sel = match &pod {
        Some(p) => raw_selector(p)?.build(k8s_key, |_| false)?,
        None => sigil_labels::Selector::wildcard(),
    };
    match nsel {
        Some(ns_node) => {
            let raw = raw_selector(&ns_node)?;
            let mut sel = pod_sel;
            if raw.is_empty() {
                sel = sel.with_requirement(has_namespace());
            } else {
                for r in raw.build(ns_label_key, |_| false)?.requirements() {
                    sel = sel.with_requirement(r.clone());
                }
            }
            Ok(PeerSelector::Endpoints(sel))
        }
        None if pod.is_some() => Ok(PeerSelector::Endpoints(scope_peer(pod_sel, scope))),
        None => Err(n.invalid("a peer needs podSelector, namespaceSelector or ipBlock")),
    }
}

//! The direct evaluator: walks the normalized rules for one flow, with no map and no cache.
//! It is the reference the compiled maps are tested against, so it stays as plain as the
//! semantics it encodes:
//!
//! 1. mode `never`: allowed;
//! 2. collect every entry, of every rule selecting the subject, in the flow's direction,
//!    whose peers match the remote and whose ports match the protocol and port;
//! 3. any deny among them: denied; else any allow: allowed, with authentication required if
//!    any of them requires it, and an L7 redirect if the port one of them matched on is
//!    marked for L7 (below); else denied if the direction is enforced (mode `always`, or a
//!    selecting rule asks for default deny), allowed otherwise.
//!
//! A port is marked for L7 when any allow rule selecting the subject in that direction has
//! L7 rules on exactly that protocol and port (or range): as in Cilium, where all rules on one
//! port share an L4 filter, every peer allowed on a proxied port goes through the proxy
//! (peers without L7 rules of their own get an allow-all L7 policy there).

use std::collections::HashSet;

use serde::Serialize;
use sigil_labels::Labels;

use crate::model::{
    Action, Direction, Document, EnforcementMode, PolicyId, PortKey, Ports, Verdict,
};

/// One rule entry that matched a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleMatch {
    /// The policy it belongs to.
    pub policy: PolicyId,
    /// Its path in the document, e.g. `spec.ingress[0]`.
    pub rule: String,
    /// Allow or deny.
    pub action: Action,
    /// Whether it redirects the flow to the L7 proxy.
    pub l7_redirect: bool,
    /// Whether it requires authentication.
    pub auth_required: bool,
}

/// The result of evaluating one direction of one flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evaluation {
    /// The verdict.
    pub verdict: Verdict,
    /// Whether the direction is in default deny for the subject.
    pub enforced: bool,
    /// The policies with a rule selecting the subject, in order.
    pub selected_by: Vec<PolicyId>,
    /// The entries that decided: the matching denies when denied by a rule, the matching
    /// allows when allowed by rules, empty when the default decided.
    pub decided_by: Vec<RuleMatch>,
}

/// Evaluates one direction of a flow against `docs` (see the module documentation):
/// `subject` is the endpoint whose policy applies, `remote` the peer.
pub fn evaluate<'a>(
    docs: impl IntoIterator<Item = &'a Document>,
    mode: EnforcementMode,
    subject: &Labels,
    direction: Direction,
    remote: &Labels,
    proto: u8,
    port: u16,
) -> Evaluation {
    if mode == EnforcementMode::Never {
        return Evaluation {
            verdict: Verdict::ALLOWED,
            enforced: false,
            selected_by: Vec::new(),
            decided_by: Vec::new(),
        };
    }
    let mut enforced = mode == EnforcementMode::Always;
    let mut selected_by: Vec<PolicyId> = Vec::new();
    let docs: Vec<&Document> = docs.into_iter().collect();
    let mut l7_ports: HashSet<PortKey> = HashSet::new();
    for doc in &docs {
        for rule in doc.rules.iter().filter(|r| r.subject.matches(subject)) {
            for e in rule
                .entries
                .iter()
                .filter(|e| e.direction == direction && e.action == Action::Allow)
            {
                if let Ports::Only(list) = &e.ports {
                    for pr in list.iter().filter(|p| p.l7_redirect()) {
                        l7_ports.extend(pr.port_keys());
                    }
                }
            }
        }
    }
    let mut allows = Vec::new();
    let mut denies = Vec::new();
    for doc in docs {
        for rule in &doc.rules {
            if !rule.subject.matches(subject) {
                continue;
            }
            if !selected_by.contains(&doc.id) {
                selected_by.push(doc.id.clone());
            }
            enforced |= rule.default_deny.get(direction);
            for e in &rule.entries {
                if e.direction != direction || !e.peers.matches(remote) {
                    continue;
                }
                let Some(ports) = e.ports.matching(proto, port) else {
                    continue;
                };
                let allow = e.action == Action::Allow;
                let m = RuleMatch {
                    policy: doc.id.clone(),
                    rule: e.path.clone(),
                    action: e.action,
                    l7_redirect: allow
                        && ports.iter().any(|p| {
                            let (lo, hi) = p.range();
                            l7_ports.contains(&(proto, lo, hi))
                        }),
                    auth_required: allow && e.auth_required,
                };
                if allow {
                    allows.push(m);
                } else {
                    denies.push(m);
                }
            }
        }
    }
    let (verdict, decided_by) = if !denies.is_empty() {
        (Verdict::DENIED, denies)
    } else if !allows.is_empty() {
        let v = Verdict {
            allowed: true,
            l7_redirect: allows.iter().any(|m| m.l7_redirect),
            auth_required: allows.iter().any(|m| m.auth_required),
        };
        (v, allows)
    } else if enforced {
        (Verdict::DENIED, Vec::new())
    } else {
        (Verdict::ALLOWED, Vec::new())
    };
    Evaluation {
        verdict,
        enforced,
        selected_by,
        decided_by,
    }
}

//! `cilium.io/v2` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy: `spec` / `specs`
//! rules with their allow and deny sections, translated with Cilium's documented semantics.

use crate::cidr::IpPrefix;
use crate::error::Problem;
use crate::model::{
    Action, CidrRule, Direction, DnsRule, Entity, FqdnMatch, HeaderMatch, HttpRule, KafkaRule,
    L7Rules, PeerSelector, Peers, PerDirection, PolicyId, PortRule, Ports, Protocol, Rule,
    RuleEntry, TlsContext,
};

use super::walk::{Fail, Node, Obj, R};
use super::{Scope, raw_selector, scope_peer, scope_subject};

const RULE_FIELDS: &[&str] = &[
    "endpointSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "enableDefaultDeny",
    "description",
    "labels",
];
const RULE_UNSUPPORTED: &[(&str, &str)] = &[(
    "nodeSelector",
    "host policies (nodeSelector) are not implemented; select endpoints with endpointSelector",
)];

const INGRESS_FIELDS: &[&str] = &[
    "fromEndpoints",
    "fromEntities",
    "fromCIDR",
    "fromCIDRSet",
    "toPorts",
    "authentication",
];
const INGRESS_DENY_FIELDS: &[&str] = &[
    "fromEndpoints",
    "fromEntities",
    "fromCIDR",
    "fromCIDRSet",
    "toPorts",
];
const EGRESS_FIELDS: &[&str] = &[
    "toEndpoints",
    "toEntities",
    "toCIDR",
    "toCIDRSet",
    "toFQDNs",
    "toPorts",
    "authentication",
];
const EGRESS_DENY_FIELDS: &[&str] = &[
    "toEndpoints",
    "toEntities",
    "toCIDR",
    "toCIDRSet",
    "toPorts",
];
const PEER_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "fromRequires",
        "fromRequires is deprecated in Cilium and not implemented",
    ),
    (
        "toRequires",
        "toRequires is deprecated in Cilium and not implemented",
    ),
    ("fromGroups", "cloud provider groups are not implemented"),
    ("toGroups", "cloud provider groups are not implemented"),
    (
        "fromNodes",
        "node selectors are not implemented; use fromEntities",
    ),
    (
        "toNodes",
        "node selectors are not implemented; use toEntities",
    ),
    (
        "toServices",
        "service selectors are not implemented; select the backends' labels",
    ),
    ("icmps", "ICMP type rules are not implemented"),
];

/// The rules of a CNP or CCNP document: `spec`, then every item of `specs`.
pub(super) fn policy(obj: &Obj<'_>, id: &PolicyId) -> R<Vec<Rule>> {
    let scope = Scope::of(id);
    let mut rules = Vec::new();
    if let Some(spec) = obj.get("spec") {
        rules.push(rule(&spec, scope)?);
    }
    if let Some(specs) = obj.get("specs") {
        let items = specs.list()?;
        if items.is_empty() {
            return Err(specs.invalid("specs must hold at least one rule"));
        }
        for item in items {
            rules.push(rule(&item, scope)?);
        }
    }
    if rules.is_empty() {
        return Err(Fail {
            path: "spec".to_owned(),
            problem: Problem::Missing,
        });
    }
    Ok(rules)
}

fn rule(n: &Node<'_>, scope: Scope<'_>) -> R<Rule> {
    let o = n.object(RULE_FIELDS, RULE_UNSUPPORTED)?;
    let subject = scope_subject(
        &raw_selector(&o.required("endpointSelector")?)?,
        str::to_owned,
        scope,
    )?;
    let description = o.opt_str("description")?;
    if let Some(labels) = o.get("labels") {
        for l in labels.list()? {
            let lo = l.object(&["key", "value", "source"], &[])?;
            lo.required("key")?.str()?;
            lo.opt_str("value")?;
            lo.opt_str("source")?;
        }
    }
    if !["ingress", "ingressDeny", "egress", "egressDeny"]
        .iter()
        .any(|k| o.has(k))
    {
        return Err(
            n.invalid("a rule needs at least one of ingress, ingressDeny, egress, egressDeny")
        );
    }
    let mut entries = Vec::new();
    let mut has = PerDirection::default();
    for (key, dir, action) in [
        ("ingress", Direction::Ingress, Action::Allow),
        ("ingressDeny", Direction::Ingress, Action::Deny),
        ("egress", Direction::Egress, Action::Allow),
        ("egressDeny", Direction::Egress, Action::Deny),
    ] {
        let items = o.list(key)?;
        if !items.is_empty() {
            match dir {
                Direction::Ingress => has.ingress = true,
                Direction::Egress => has.egress = true,
            }
        }
        for item in items {
            entries.push(entry(&item, dir, action, scope)?);
        }
    }
    let mut default_deny = has;
    if let Some(edd) = o.get("enableDefaultDeny") {
        let eo = edd.object(&["ingress", "egress"], &[])?;
        if let Some(v) = eo.get("ingress") {
            default_deny.ingress = v.bool()?;
        }
        if let Some(v) = eo.get("egress") {
            default_deny.egress = v.bool()?;
        }
    }
    Ok(Rule {
        path: n.path.clone(),
        subject,
        description,
        default_deny,
        entries,
    })
}

fn entry(n: &Node<'_>, dir: Direction, action: Action, scope: Scope<'_>) -> R<RuleEntry> {
    let fields = match (dir, action) {
        (Direction::Ingress, Action::Allow) => INGRESS_FIELDS,
        (Direction::Ingress, Action::Deny) => INGRESS_DENY_FIELDS,
        (Direction::Egress, Action::Allow) => EGRESS_FIELDS,
        (Direction::Egress, Action::Deny) => EGRESS_DENY_FIELDS,
    };
    let extra_unsupported: &[(&str, &str)] = match (dir, action) {
        (_, Action::Deny) => &[
            ("authentication", "deny rules take no authentication"),
            ("toFQDNs", "deny rules cannot select FQDNs (as in Cilium)"),
        ],
        (Direction::Ingress, Action::Allow) => &[("fromFQDNs", "Cilium has no fromFQDNs")],
        (Direction::Egress, Action::Allow) => &[],
    };
    let unsupported: Vec<(&str, &str)> = PEER_UNSUPPORTED
        .iter()
        .chain(extra_unsupported)
        .copied()
        .collect();
    let o = n.object(fields, &unsupported)?;
    let p = match dir {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };

    let mut l3_present = false;
    let mut peers = Vec::new();
    if let Some(eps) = o.get(&format!("{p}Endpoints")) {
        l3_present = true;
        for item in eps.list()? {
            let sel = raw_selector(&item)?.build(str::to_owned, |_| false)?;
            peers.push(PeerSelector::Endpoints(scope_peer(sel, scope)));
        }
    }
    if let Some(ents) = o.get(&format!("{p}Entities")) {
        l3_present = true;
        for item in ents.list()? {
            let name = item.str()?;
            let entity = Entity::parse(name).ok_or_else(|| {
                let names: Vec<&str> = Entity::ALL.iter().map(|e| e.as_str()).collect();
                item.invalid(format!(
                    "unknown entity (expected one of: {})",
                    names.join(", ")
                ))
            })?;
            peers.push(PeerSelector::Entity(entity));
        }
    }
    if let Some(cidrs) = o.get(&format!("{p}CIDR")) {
        l3_present = true;
        for item in cidrs.list()? {
            peers.push(PeerSelector::Cidr(CidrRule {
                cidr: prefix(&item)?,
                except: Vec::new(),
            }));
        }
    }
    if let Some(sets) = o.get(&format!("{p}CIDRSet")) {
        l3_present = true;
        for item in sets.list()? {
            let so = item.object(
                &["cidr", "except"],
                &[
                    (
                        "cidrGroupRef",
                        "CiliumCIDRGroup references are not implemented",
                    ),
                    (
                        "cidrGroupSelector",
                        "CiliumCIDRGroup selectors are not implemented",
                    ),
                ],
            )?;
            peers.push(PeerSelector::Cidr(cidr_rule(&so)?));
        }
    }
    if let Some(fqdns) = o.get("toFQDNs") {
        l3_present = true;
        for item in fqdns.list()? {
            let fo = item.object(&["matchName", "matchPattern"], &[])?;
            let m = FqdnMatch {
                match_name: fo.opt_str("matchName")?,
                match_pattern: fo.opt_str("matchPattern")?,
            };
            if m.match_name.is_none() && m.match_pattern.is_none() {
                return Err(item.invalid("needs matchName or matchPattern"));
            }
            peers.push(PeerSelector::Fqdn(m));
        }
    }

    let mut port_rules = Vec::new();
    let port_items = o.list("toPorts")?;
    for item in &port_items {
        to_ports_item(item, action, &mut port_rules)?;
    }
    let ports_present = !port_items.is_empty();

    let auth_required = match o.get("authentication") {
        Some(a) => {
            let ao = a.object(&["mode"], &[])?;
            let mode = ao.required("mode")?;
            match mode.str()? {
                "disabled" => false,
                "required" => true,
                _ => return Err(mode.invalid("expected disabled or required")),
            }
        }
        None => false,
    };

    // Cilium: no L3 field at all + toPorts = every peer on those ports; no L3 and no ports
    // (`{}`) = nothing; an explicitly empty L3 list selects nobody.
    let peers = if l3_present {
        Peers::Only(peers)
    } else if ports_present {
        Peers::Any
    } else {
        Peers::Only(Vec::new())
    };
    let ports = if ports_present {
        Ports::Only(port_rules)
    } else {
        Ports::Any
    };
    Ok(RuleEntry {
        path: n.path.clone(),
        direction: dir,
        action,
        peers,
        ports,
        auth_required,
    })
}

pub(super) fn prefix(n: &Node<'_>) -> R<IpPrefix> {
    let s = n.str()?;
    s.parse::<IpPrefix>()
        .map_err(|e| n.invalid(format!("not a CIDR: {e}")))
}

/// `cidr` plus `except` entries, each of which must lie inside `cidr`.
pub(super) fn cidr_rule(o: &Obj<'_>) -> R<CidrRule> {
    let cidr_node = o.required("cidr")?;
    let cidr = prefix(&cidr_node)?;
    let mut except = Vec::new();
    for e in o.list("except")? {
        let p = prefix(&e)?;
        if !cidr.contains(&p) {
            return Err(e.invalid(format!("except must lie inside cidr {cidr}")));
        }
        except.push(p);
    }
    Ok(CidrRule { cidr, except })
}

fn to_ports_item(n: &Node<'_>, action: Action, out: &mut Vec<PortRule>) -> R<()> {
    let o = match action {
        Action::Deny => n.object(&["ports"], &[("rules", "deny rules take no L7 rules")])?,
        Action::Allow => n.object(
            &[
                "ports",
                "rules",
                "terminatingTLS",
                "originatingTLS",
                "serverNames",
            ],
            &[("listener", "Envoy listener references are not implemented")],
        )?,
    };
    let rules_node = o.get("rules");
    let l7 = rules_node.as_ref().map(l7_rules).transpose()?;
    let terminating_tls = o.get("terminatingTLS").map(|t| tls(&t)).transpose()?;
    let originating_tls = o.get("originatingTLS").map(|t| tls(&t)).transpose()?;
    let server_names = match o.get("serverNames") {
        Some(s) => s.strings()?,
        None => Vec::new(),
    };
    let has_l7 = l7.as_ref().is_some_and(|l| !l.is_empty());
    for p in o.list("ports")? {
        let po = p.object(&["port", "endPort", "protocol"], &[])?;
        let port = match po.get("port") {
            Some(pn) => port_number(&pn)?,
            None => 0,
        };
        let protocol = match po.get("protocol") {
            Some(pn) => Protocol::parse(pn.str()?)
                .ok_or_else(|| pn.invalid("expected TCP, UDP, SCTP or ANY"))?,
            None => Protocol::Any,
        };
        let end_port = po.get("endPort").map(|e| end_port(&e, port)).transpose()?;
        if has_l7 {
            let at = |reason: &str| Fail {
                path: o.path_of("rules"),
                problem: Problem::InvalidValue {
                    value: format!("port {port}"),
                    reason: reason.to_owned(),
                },
            };
            if port == 0 {
                return Err(at("L7 rules need a specific port, not 0 (any)"));
            }
            if end_port.is_some_and(|e| e != port) {
                return Err(at("L7 rules apply to a single port, not a range"));
            }
            let dns_only = l7
                .as_ref()
                .is_some_and(|l| l.http.is_empty() && l.kafka.is_empty());
            if !dns_only && protocol != Protocol::Tcp {
                return Err(at(
                    "HTTP and Kafka rules need protocol TCP (only DNS rules may use UDP or ANY)",
                ));
            }
        }
        out.push(PortRule {
            protocol,
            port,
            end_port,
            l7: l7.clone(),
            terminating_tls: terminating_tls.clone(),
            originating_tls: originating_tls.clone(),
            server_names: server_names.clone(),
        });
    }
    Ok(())
}

/// A port number (number or string of digits); names are refused with the reason.
pub(super) fn port_number(n: &Node<'_>) -> R<u16> {
    let v = n.port_number(65535, |node, name| {
        node.unsupported(format!(
            "named port {name:?}: resolving port names needs the pods' container specs; use the port number"
        ))
    })?;
    u16::try_from(v).map_err(|_| n.invalid("out of range 0..=65535"))
}

/// `endPort`: needs a non-zero `port` not above it.
pub(super) fn end_port(n: &Node<'_>, port: u16) -> R<u16> {
    let v = n.port_number(65535, |node, _| node.invalid("endPort must be a number"))?;
    let e = u16::try_from(v).map_err(|_| n.invalid("out of range 0..=65535"))?;
    if port == 0 {
        return Err(n.invalid("endPort needs a non-zero port"));
    }
    if e < port {
        return Err(n.invalid(format!("endPort must not be below port {port}")));
    }
    Ok(e)
}

fn l7_rules(n: &Node<'_>) -> R<L7Rules> {
    let o = n.object(
        &["http", "dns", "kafka"],
        &[
            ("l7proto", "generic L7 parsers are not implemented"),
            ("l7", "generic L7 rules are not implemented"),
        ],
    )?;
    let mut out = L7Rules::default();
    for h in o.list("http")? {
        let ho = h.object(&["method", "path", "host", "headers", "headerMatches"], &[])?;
        let mut rule = HttpRule {
            method: ho.opt_str("method")?,
            path: ho.opt_str("path")?,
            host: ho.opt_str("host")?,
            headers: match ho.get("headers") {
                Some(v) => v.strings()?,
                None => Vec::new(),
            },
            header_matches: Vec::new(),
        };
        for m in ho.list("headerMatches")? {
            let mo = m.object(
                &["name", "value", "mismatch"],
                &[("secret", "header values from secrets are not implemented")],
            )?;
            let name = mo.required("name")?.str()?.to_owned();
            let mismatch = match mo.get("mismatch") {
                Some(mm) => {
                    let s = mm.str()?;
                    if !["LOG", "ADD", "DELETE", "REPLACE"].contains(&s) {
                        return Err(mm.invalid("expected LOG, ADD, DELETE or REPLACE"));
                    }
                    Some(s.to_owned())
                }
                None => None,
            };
            rule.header_matches.push(HeaderMatch {
                name,
                value: mo.opt_str("value")?,
                mismatch,
            });
        }
        out.http.push(rule);
    }
    for d in o.list("dns")? {
        let dobj = d.object(&["matchName", "matchPattern"], &[])?;
        let rule = DnsRule {
            match_name: dobj.opt_str("matchName")?,
            match_pattern: dobj.opt_str("matchPattern")?,
        };
        if rule.match_name.is_none() && rule.match_pattern.is_none() {
            return Err(d.invalid("needs matchName or matchPattern"));
        }
        out.dns.push(rule);
    }
    for k in o.list("kafka")? {
        let ko = k.object(&["role", "apiKey", "apiVersion", "clientID", "topic"], &[])?;
        let role = match ko.get("role") {
            Some(r) => {
                let s = r.str()?;
                if !["produce", "consume"].contains(&s) {
                    return Err(r.invalid("expected produce or consume"));
                }
                Some(s.to_owned())
            }
            None => None,
        };
        out.kafka.push(KafkaRule {
            role,
            api_key: ko.opt_str("apiKey")?,
            api_version: ko.opt_str("apiVersion")?,
            client_id: ko.opt_str("clientID")?,
            topic: ko.opt_str("topic")?,
        });
    }
    Ok(out)
}

fn tls(n: &Node<'_>) -> R<TlsContext> {
    let o = n.object(&["secret", "trustedCA", "certificate", "privateKey"], &[])?;
    let (secret_namespace, secret_name) = match o.get("secret") {
        Some(s) => {
            let so = s.object(&["namespace", "name"], &[])?;
            (
                so.opt_str("namespace")?,
                Some(so.required("name")?.str()?.to_owned()),
            )
        }
        None => (None, None),
    };
    Ok(TlsContext {
        secret_namespace,
        secret_name,
        trusted_ca: o.opt_str("trustedCA")?,
        certificate: o.opt_str("certificate")?,
        private_key: o.opt_str("privateKey")?,
    })
}

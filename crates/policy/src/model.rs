//! The normalized rule model that NetworkPolicy, CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy documents are all translated into; the evaluator and the
//! compiler only ever see this model.

use std::fmt;

use serde::Serialize;
use sigil_labels::{Label, Labels, Selector, Source};

use crate::cidr::IpPrefix;

/// IANA protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IANA protocol number of SCTP.
pub const PROTO_SCTP: u8 = 132;

/// Traffic direction, seen from the endpoint the policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic received by the endpoint.
    Ingress,
    /// Traffic sent by the endpoint.
    Egress,
}

impl Direction {
    /// Both directions, ingress first.
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The byte of the datapath ABI (`DIR_INGRESS` 0, `DIR_EGRESS` 1 in `bpf/sigil.h`; the
    /// datapath checks the two agree at build time).
    pub const fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        }
    }

    /// Parses the datapath ABI's byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }

    /// `ingress` or `egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of document a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PolicyKind {
    /// `networking.k8s.io/v1 NetworkPolicy`.
    NetworkPolicy,
    /// `cilium.io/v2 CiliumNetworkPolicy`.
    CiliumNetworkPolicy,
    /// `cilium.io/v2 CiliumClusterwideNetworkPolicy`.
    CiliumClusterwideNetworkPolicy,
}

impl PolicyKind {
    /// The `kind` field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What identifies a policy: applying a document with the same id replaces the old one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyId {
    /// The document kind.
    pub kind: PolicyKind,
    /// `metadata.namespace` (default `default`); `None` for clusterwide policies.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl PolicyId {
    /// Builds an id.
    pub fn new(kind: PolicyKind, namespace: Option<&str>, name: &str) -> PolicyId {
        PolicyId {
            kind,
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for PolicyId {
    /// `Kind/namespace/name`, or `Kind/name` for clusterwide policies.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind, ns, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

/// One parsed and normalized policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Kind, namespace and name.
    pub id: PolicyId,
    /// File name or `<input>`.
    pub origin: String,
    /// 1-based position of the document in its origin.
    pub index: usize,
    /// The rules: one for `spec`, one per item of `specs`, one for a NetworkPolicy.
    pub rules: Vec<Rule>,
}

/// Per-direction booleans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PerDirection {
    /// The ingress value.
    pub ingress: bool,
    /// The egress value.
    pub egress: bool,
}

impl PerDirection {
    /// The value for `d`.
    pub fn get(&self, d: Direction) -> bool {
        match d {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// One rule: a subject selector and what it allows and denies in each direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Where the rule is in its document: `spec`, `specs[1]`.
    pub path: String,
    /// The endpoints the rule applies to, namespace constraint already added.
    pub subject: Selector,
    /// `description`, when given.
    pub description: Option<String>,
    /// Whether selecting an endpoint puts it into default deny, per direction: true for a
    /// direction with any allow or deny section unless `enableDefaultDeny` says otherwise
    /// (NetworkPolicy: the directions of `policyTypes`).
    pub default_deny: PerDirection,
    /// Allow and deny entries of both directions, in document order.
    pub entries: Vec<RuleEntry>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Traffic matching the entry is allowed (unless a deny also matches).
    Allow,
    /// Traffic matching the entry is denied, whatever allows it.
    Deny,
}

/// One item of `ingress`, `egress`, `ingressDeny` or `egressDeny`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleEntry {
    /// Path in the document, e.g. `spec.ingress[0]`.
    pub path: String,
    /// Which direction it applies to.
    pub direction: Direction,
    /// Allow or deny.
    pub action: Action,
    /// The remote peers it matches.
    pub peers: Peers,
    /// The ports it matches.
    pub ports: Ports,
    /// `authentication.mode: required`.
    pub auth_required: bool,
}

/// The remote peers an entry matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// Every peer (an L4-only Cilium rule; a NetworkPolicy rule without `from`/`to`).
    Any,
    /// Only peers matched by one of these (an empty list matches nothing).
    Only(Vec<PeerSelector>),
}

impl Peers {
    /// Whether a peer with these labels is matched.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Peers::Any => true,
            Peers::Only(sels) => sels.iter().any(|s| s.matches(labels)),
        }
    }

    /// Whether every peer, known or not, is matched (so a wildcard map entry can be used).
    pub fn is_wildcard(&self) -> bool {
        match self {
            Peers::Any => true,
            Peers::Only(sels) => sels.iter().any(PeerSelector::is_wildcard),
        }
    }
}

/// The ports an entry matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// Every protocol and port (no `toPorts`).
    Any,
    /// Only these (an entry whose `toPorts` lists no port matches no traffic).
    Only(Vec<PortRule>),
}

impl Ports {
    /// The port rules matching a flow, or `None` when no port rule matches.
    pub fn matching(&self, proto: u8, port: u16) -> Option<Vec<&PortRule>> {
        match self {
            Ports::Any => Some(Vec::new()),
            Ports::Only(rules) => {
                let m: Vec<&PortRule> = rules.iter().filter(|r| r.matches(proto, port)).collect();
                if m.is_empty() { None } else { Some(m) }
            }
        }
    }
}

/// An L4 protocol as policies name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    /// TCP (6).
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP (17).
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP (132).
    #[serde(rename = "SCTP")]
    Sctp,
    /// TCP, UDP and SCTP, as Cilium expands `ANY`.
    #[serde(rename = "ANY")]
    Any,
}

impl Protocol {
    /// The protocol numbers this stands for.
    pub fn numbers(self) -> &'static [u8] {
        match self {
            Protocol::Tcp => &[PROTO_TCP],
            Protocol::Udp => &[PROTO_UDP],
            Protocol::Sctp => &[PROTO_SCTP],
            Protocol::Any => &[PROTO_TCP, PROTO_UDP, PROTO_SCTP],
        }
    }

    /// Parses `TCP`, `UDP`, `SCTP`, `ANY` (upper case, as the CRDs spell them).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            "ANY" => Some(Protocol::Any),
            _ => None,
        }
    }

    /// The protocol of an IANA number, when it is one of TCP, UDP, SCTP.
    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            PROTO_TCP => Some(Protocol::Tcp),
            PROTO_UDP => Some(Protocol::Udp),
            PROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Any => "ANY",
        })
    }
}

/// A port filter key: protocol number, first and last port.
pub type PortKey = (u8, u16, u16);

/// One port or port range with its protocol and optional L7 rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// The protocol.
    pub protocol: Protocol,
    /// The port; 0 means every port.
    pub port: u16,
    /// The last port of a range starting at `port`.
    pub end_port: Option<u16>,
    /// L7 rules; when present and non-empty the port is redirected to the L7 proxy.
    pub l7: Option<L7Rules>,
    /// `terminatingTLS`, stored.
    pub terminating_tls: Option<TlsContext>,
    /// `originatingTLS`, stored.
    pub originating_tls: Option<TlsContext>,
    /// `serverNames`, stored.
    pub server_names: Vec<String>,
}

impl PortRule {
    /// A plain port rule (no L7, no TLS).
    pub fn new(protocol: Protocol, port: u16, end_port: Option<u16>) -> PortRule {
        PortRule {
            protocol,
            port,
            end_port,
            l7: None,
            terminating_tls: None,
            originating_tls: None,
            server_names: Vec::new(),
        }
    }

    /// The first and last port covered.
    pub fn range(&self) -> (u16, u16) {
        if self.port == 0 {
            (0, u16::MAX)
        } else {
            (self.port, self.end_port.unwrap_or(self.port).max(self.port))
        }
    }

    /// Whether traffic of this protocol to this port is covered.
    pub fn matches(&self, proto: u8, port: u16) -> bool {
        let (lo, hi) = self.range();
        self.protocol.numbers().contains(&proto) && (lo..=hi).contains(&port)
    }

    /// Whether this rule carries L7 rules (and so marks its port for the L7 proxy).
    pub fn l7_redirect(&self) -> bool {
        self.l7.as_ref().is_some_and(|l7| !l7.is_empty())
    }

    /// The port keys this rule covers, one per protocol number: `(protocol, first, last)`.
    /// Rules with the same key share one L4 filter in Cilium, hence one L7 redirect.
    pub fn port_keys(&self) -> impl Iterator<Item = PortKey> + '_ {
        let (lo, hi) = self.range();
        self.protocol.numbers().iter().map(move |&p| (p, lo, hi))
    }
}

/// Application-layer rules of one port (stored; they mark the port for the proxy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct L7Rules {
    /// `rules.http`.
    pub http: Vec<HttpRule>,
    /// `rules.dns`.
    pub dns: Vec<DnsRule>,
    /// `rules.kafka`.
    pub kafka: Vec<KafkaRule>,
}

impl L7Rules {
    /// Whether no rule of any protocol is given.
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.dns.is_empty() && self.kafka.is_empty()
    }
}

/// One HTTP rule; an empty rule allows every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HttpRule {
    /// Method regex.
    pub method: Option<String>,
    /// Path regex.
    pub path: Option<String>,
    /// Host regex.
    pub host: Option<String>,
    /// Required headers, `Name: value` or `Name`.
    pub headers: Vec<String>,
    /// `headerMatches`.
    pub header_matches: Vec<HeaderMatch>,
}

/// One `headerMatches` item.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    /// Header name.
    pub name: String,
    /// Expected value.
    pub value: Option<String>,
    /// What to do on mismatch (LOG, ADD, DELETE, REPLACE).
    pub mismatch: Option<String>,
}

/// One DNS rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DnsRule {
    /// Exact name.
    pub match_name: Option<String>,
    /// Wildcard pattern.
    pub match_pattern: Option<String>,
}

/// One Kafka rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KafkaRule {
    /// `role` (produce, consume).
    pub role: Option<String>,
    /// `apiKey`.
    pub api_key: Option<String>,
    /// `apiVersion`.
    pub api_version: Option<String>,
    /// `clientID`.
    pub client_id: Option<String>,
    /// `topic`.
    pub topic: Option<String>,
}

/// A TLS context of a port rule (stored only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TlsContext {
    /// `secret.namespace`.
    pub secret_namespace: Option<String>,
    /// `secret.name`.
    pub secret_name: Option<String>,
    /// `trustedCA`.
    pub trusted_ca: Option<String>,
    /// `certificate`.
    pub certificate: Option<String>,
    /// `privateKey`.
    pub private_key: Option<String>,
}

/// One `toFQDNs` item (stored; without a DNS proxy it selects no identity yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FqdnMatch {
    /// Exact name.
    pub match_name: Option<String>,
    /// Wildcard pattern.
    pub match_pattern: Option<String>,
}

/// Cilium's entities: peers named by role rather than by labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Every peer.
    All,
    /// Outside the cluster: `reserved:world` and every CIDR identity.
    World,
    /// Inside the cluster: every label identity plus the reserved host, remote-node, init,
    /// ingress, health, unmanaged and kube-apiserver identities.
    Cluster,
    /// The local host.
    Host,
    /// Endpoints being initialized.
    Init,
    /// The ingress proxy.
    Ingress,
    /// Endpoints not managed by the network plane.
    Unmanaged,
    /// Other nodes.
    RemoteNode,
    /// Health endpoints.
    Health,
    /// Selects nothing.
    None,
    /// The Kubernetes API server.
    KubeApiserver,
}

/// The reserved labels making up the `cluster` entity besides label identities.
const CLUSTER_RESERVED: [&str; 7] = [
    "host",
    "remote-node",
    "init",
    "ingress",
    "health",
    "unmanaged",
    "kube-apiserver",
];

impl Entity {
    /// Every entity, in the order of Cilium's CRD enum.
    pub const ALL: [Entity; 11] = [
        Entity::All,
        Entity::World,
        Entity::Cluster,
        Entity::Host,
        Entity::Init,
        Entity::Ingress,
        Entity::Unmanaged,
        Entity::RemoteNode,
        Entity::Health,
        Entity::None,
        Entity::KubeApiserver,
    ];

    /// The name as written in policies.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::All => "all",
            Entity::World => "world",
            Entity::Cluster => "cluster",
            Entity::Host => "host",
            Entity::Init => "init",
            Entity::Ingress => "ingress",
            Entity::Unmanaged => "unmanaged",
            Entity::RemoteNode => "remote-node",
            Entity::Health => "health",
            Entity::None => "none",
            Entity::KubeApiserver => "kube-apiserver",
        }
    }

    /// The entity named `s`.
    pub fn parse(s: &str) -> Option<Entity> {
        Entity::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// Whether a peer with these labels belongs to this entity.
    pub fn matches(self, labels: &Labels) -> bool {
        match self {
            Entity::All => true,
            Entity::None => false,
            Entity::World => {
                ["world", "world-ipv4", "world-ipv6"]
                    .iter()
                    .any(|n| has_reserved(labels, n))
                    || labels.has_source(Source::Cidr)
            }
            Entity::Cluster => {
                CLUSTER_RESERVED.iter().any(|n| has_reserved(labels, n))
                    || (!labels.is_empty()
                        && !labels.has_source(Source::Reserved)
                        && !labels.has_source(Source::Cidr))
            }
            Entity::Host => has_reserved(labels, "host"),
            Entity::Init => has_reserved(labels, "init"),
            Entity::Ingress => has_reserved(labels, "ingress"),
            Entity::Unmanaged => has_reserved(labels, "unmanaged"),
            Entity::RemoteNode => has_reserved(labels, "remote-node"),
            Entity::Health => has_reserved(labels, "health"),
            Entity::KubeApiserver => has_reserved(labels, "kube-apiserver"),
        }
    }
}

fn has_reserved(labels: &Labels, name: &str) -> bool {
    labels.contains(&Label::new(Source::Reserved, name, ""))
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CIDR peer: addresses in `cidr` but in none of `except`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrRule {
    /// The prefix.
    pub cidr: IpPrefix,
    /// Sub-prefixes taken out.
    pub except: Vec<IpPrefix>,
}

impl CidrRule {
    /// Whether a peer with these labels is matched. Only CIDR identities (by their most
    /// specific `cidr:` label, which must lie in `cidr` and overlap no `except`) and, for a
    /// `/0` without exceptions, `reserved:world` are: label identities never are.
    pub fn matches(&self, labels: &Labels) -> bool {
        match IpPrefix::of_labels(labels) {
            Some(p) => self.cidr.contains(&p) && self.except.iter().all(|e| !e.overlaps(&p)),
            None => {
                self.cidr.is_default()
                    && self.except.is_empty()
                    && has_reserved(labels, "world")
                    && !labels.iter().any(|l| l.source != Source::Reserved)
            }
        }
    }
}

/// One peer selector of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerSelector {
    /// Endpoints by labels (`fromEndpoints`, `podSelector`, `namespaceSelector`).
    Endpoints(Selector),
    /// An entity.
    Entity(Entity),
    /// A CIDR with exceptions (`fromCIDR`, `fromCIDRSet`, `ipBlock`).
    Cidr(CidrRule),
    /// A DNS name (`toFQDNs`); selects nothing until names are resolved.
    Fqdn(FqdnMatch),
}

impl PeerSelector {
    /// Whether a peer with these labels is matched.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            PeerSelector::Endpoints(s) => s.matches(labels),
            PeerSelector::Entity(e) => e.matches(labels),
            PeerSelector::Cidr(c) => c.matches(labels),
            PeerSelector::Fqdn(_) => false,
        }
    }

    /// Whether it matches every peer, known or unknown (`all`).
    pub fn is_wildcard(&self) -> bool {
        matches!(self, PeerSelector::Entity(Entity::All))
    }
}

impl fmt::Display for PeerSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerSelector::Endpoints(s) => write!(f, "endpoints({s})"),
            PeerSelector::Entity(e) => write!(f, "entity({e})"),
            PeerSelector::Cidr(c) => {
                write!(f, "cidr({}", c.cidr)?;
                for e in &c.except {
                    write!(f, " except {e}")?;
                }
                f.write_str(")")
            }
            PeerSelector::Fqdn(q) => write!(
                f,
                "fqdn({})",
                q.match_name
                    .as_deref()
                    .or(q.match_pattern.as_deref())
                    .unwrap_or("")
            ),
        }
    }
}

/// The agent-wide policy enforcement mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    /// An endpoint is default deny in a direction once a rule selecting it asks for it.
    #[default]
    Default,
    /// Every endpoint is default deny in both directions, selected or not.
    Always,
    /// Nothing is enforced: all traffic is allowed, deny rules included.
    Never,
}

impl EnforcementMode {
    /// Parses `default`, `always`, `never`.
    pub fn parse(s: &str) -> Option<EnforcementMode> {
        match s {
            "default" => Some(EnforcementMode::Default),
            "always" => Some(EnforcementMode::Always),
            "never" => Some(EnforcementMode::Never),
            _ => None,
        }
    }
}

/// The outcome for one flow in one direction (or both, in a trace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Verdict {
    /// Whether the traffic passes.
    pub allowed: bool,
    /// Whether it goes through the L7 proxy (only when allowed).
    pub l7_redirect: bool,
    /// Whether mutual authentication is required first (only when allowed).
    pub auth_required: bool,
}

impl Verdict {
    /// Denied, no flags.
    pub const DENIED: Verdict = Verdict {
        allowed: false,
        l7_redirect: false,
        auth_required: false,
    };
    /// Allowed, no flags.
    pub const ALLOWED: Verdict = Verdict {
        allowed: true,
        l7_redirect: false,
        auth_required: false,
    };
}

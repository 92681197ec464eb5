//! A synthetic cluster for the benches: label identities over `app`, `tier`, `team`, namespace
//! and SPIFFE ID labels, spread over cluster IDs once one cluster's 65 280 numbers are used,
//! plus node-local CIDR identities; and CiliumNetworkPolicy documents with label selectors
//! (matchLabels and matchExpressions), cross-namespace peers, port rules and ranges, CIDR sets
//! with exceptions, entities, L7 rules, authentication and some denies.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use sigil_identity::{NumericIdentity, reserved_identities};
use sigil_labels::{Label, Labels, Source, cidr_label, spiffe_label};
use sigil_policy::{Direction, Document, parse_documents};

/// Distinct apps in a large cluster (fewer when there are fewer workloads).
pub const APPS: u32 = 200;
/// Namespaces; app `a` lives in `ns{a % NAMESPACES}`.
pub const NAMESPACES: u32 = 10;
/// Teams; app `a` belongs to `team{a % TEAMS}`.
pub const TEAMS: u32 = 12;
/// Tiers; app `a` is in `TIERS[a % 4]`.
pub const TIERS: [&str; 4] = ["frontend", "backend", "db", "cache"];
/// Label identity numbers per cluster ID (256..=65535).
pub const PER_CLUSTER: u32 = NumericIdentity::MAX_CLUSTER_LOCAL + 1 - 256;

pub const TCP: u8 = 6;

/// Identities and policies of one bench configuration.
pub struct World {
    /// Label identities, then CIDR identities (reserved ones not included).
    pub identities: Vec<(NumericIdentity, Labels)>,
    /// Number of label identities at the front of `identities`.
    pub label_count: u32,
    /// Apps in use.
    pub apps: u32,
    /// Number of policies (one rule each).
    pub rules: u32,
    /// The policies.
    pub docs: Vec<Document>,
}

fn tier(a: u32) -> &'static str {
    TIERS[(a % 4) as usize]
}

fn ns(a: u32) -> String {
    format!("ns{}", a % NAMESPACES)
}

/// The number of label identity `j` (0-based): cluster ID 1, 2, ... as each fills up.
pub fn label_id(j: u32) -> NumericIdentity {
    let cluster = 1 + j / PER_CLUSTER;
    NumericIdentity::new((cluster << NumericIdentity::CLUSTER_ID_SHIFT) | (256 + j % PER_CLUSTER))
}

/// The labels of label identity `j` in a cluster with `apps` apps; `version` keeps every
/// identity distinct, as pods of many deployments' revisions are.
pub fn label_labels(j: u32, apps: u32) -> Labels {
    let a = j % apps;
    let cluster = 1 + j / PER_CLUSTER;
    [
        Label::new(Source::K8s, "app", format!("svc{a}")),
        Label::new(Source::K8s, "tier", tier(a)),
        Label::new(Source::K8s, "team", format!("team{}", a % TEAMS)),
        Label::new(Source::K8s, "version", format!("v{}", j / apps)),
        Label::new(Source::K8s, "io.kubernetes.pod.namespace", ns(a)),
        Label::new(
            Source::K8s,
            "io.cilium.k8s.policy.cluster",
            format!("c{cluster}"),
        ),
        spiffe_label(&format!("spiffe://bench.example/ns/{}/sa/svc{a}", ns(a))),
    ]
    .into_iter()
    .collect()
}

/// The address of CIDR identity `k`: spread over 10.0.0.0/12.
pub fn cidr_addr(k: u32) -> Ipv4Addr {
    let host = k / 16;
    // Each part is reduced below 256 first.
    Ipv4Addr::new(
        10,
        (k % 16) as u8,
        ((host / 256) % 256) as u8,
        (host % 256) as u8,
    )
}

/// CIDR identity `k`: node-local number, `cidr:<addr>/32` and `reserved:world`.
pub fn cidr_identity(k: u32) -> (NumericIdentity, Labels) {
    let id = NumericIdentity::new(NumericIdentity::LOCAL_CIDR_FLAG | (1 + k));
    let cidr = cidr_label(IpAddr::V4(cidr_addr(k)), 32).expect("a /32 of an IPv4 address is valid");
    let labels = [cidr, Label::new(Source::Reserved, "world", "")]
        .into_iter()
        .collect();
    (id, labels)
}

/// Peers of rule `i`: the app whose identities its second ingress entry admits on the port range.
pub fn range_peer(i: u32, apps: u32) -> u32 {
    (i * 7 + 3) % apps
}

/// Peers of rule `i`: the app its egress entry allows on 5432.
pub fn egress_peer(i: u32, apps: u32) -> u32 {
    (i * 13 + 5) % apps
}

/// The port range of rule `i`: 9000 up to 9015..=9127 (a few masked entries each).
pub fn range_end(i: u32) -> u16 {
    // i % 8 < 8, so this is at most 9127.
    9000 + ((i % 8) * 16 + 15) as u16
}

/// The YAML of `rules` CiliumNetworkPolicy documents over `apps` apps.
pub fn policy_yaml(rules: u32, apps: u32) -> String {
    let mut y = String::new();
    for i in 0..rules {
        let a = i % apps;
        let b = range_peer(i, apps);
        let c = egress_peer(i, apps);
        let t1 = i % TEAMS;
        let t2 = (i + 5) % TEAMS;
        let _ = write!(
            y,
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
             metadata: {{name: r{i}, namespace: {ns}}}\nspec:\n\
             \x20 endpointSelector: {{matchLabels: {{app: svc{a}}}}}\n\
             \x20 ingress:\n\
             \x20 - fromEndpoints:\n\
             \x20   - matchLabels: {{tier: {tier}}}\n\
             \x20     matchExpressions: [{{key: team, operator: In, values: [team{t1}, team{t2}]}}]\n\
             \x20   toPorts: [{{ports: [{{port: '{p}', protocol: TCP}}]}}]\n\
             \x20 - fromEndpoints: [{{matchLabels: {{app: svc{b}, io.kubernetes.pod.namespace: {nsb}}}}}]\n\
             \x20   toPorts: [{{ports: [{{port: '9000', endPort: {end}, protocol: TCP}}]}}]\n",
            ns = ns(a),
            tier = TIERS[(i as usize + 1) % 4],
            p = 8000 + i % 100,
            nsb = ns(b),
            end = range_end(i),
        );
        if i % 5 == 0 {
            let o = i % 16;
            let _ = write!(
                y,
                "  - fromCIDRSet: [{{cidr: 10.{o}.0.0/16, except: [10.{o}.255.0/24]}}]\n\
                 \x20   toPorts: [{{ports: [{{port: '443', protocol: TCP}}]}}]\n"
            );
        }
        if i % 11 == 0 {
            y.push_str(
                "  - fromEntities: [world]\n    toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n      \
                 rules: {http: [{method: GET, path: /api/.*}]}\n",
            );
        }
        if i % 7 == 0 {
            let _ = write!(
                y,
                "  ingressDeny:\n  - fromEndpoints:\n    - matchLabels: {{tier: cache}}\n      \
                 matchExpressions: [{{key: team, operator: NotIn, values: [team{t1}]}}]\n    \
                 toPorts: [{{ports: [{{port: '{p}', protocol: TCP}}]}}]\n",
                p = 8000 + i % 100
            );
        }
        let _ = write!(
            y,
            "  egress:\n\
             \x20 - toEndpoints: [{{matchLabels: {{app: svc{c}, io.kubernetes.pod.namespace: {nsc}}}}}]\n\
             \x20   toPorts: [{{ports: [{{port: '5432', protocol: TCP}}]}}]\n",
            nsc = ns(c)
        );
        if i % 3 == 0 {
            y.push_str(
                "    authentication: {mode: required}\n  - toEntities: [kube-apiserver]\n  \
                 - toEndpoints: [{matchLabels: {k8s-app: kube-dns, io.kubernetes.pod.namespace: kube-system}}]\n    \
                 toPorts: [{ports: [{port: '53', protocol: UDP}]}]\n",
            );
        }
    }
    y
}

impl World {
    /// `label_count` label identities, `cidrs` CIDR identities and `rules` policies.
    pub fn new(label_count: u32, cidrs: u32, rules: u32) -> World {
        let apps = APPS.min(label_count).max(1);
        let mut identities: Vec<(NumericIdentity, Labels)> = (0..label_count)
            .map(|j| (label_id(j), label_labels(j, apps)))
            .collect();
        identities.extend((0..cidrs).map(cidr_identity));
        let yaml = policy_yaml(rules, apps);
        let docs = parse_documents(&yaml, "synthetic")
            .unwrap_or_else(|e| panic!("the synthetic policies must parse: {e}"));
        World {
            identities,
            label_count,
            apps,
            rules,
            docs,
        }
    }

    /// Every identity including the reserved ones, as a running agent knows them.
    pub fn all_identities(&self) -> Vec<(NumericIdentity, Labels)> {
        let mut all = reserved_identities();
        all.extend(self.identities.iter().cloned());
        all
    }

    /// A label identity of app `a`, the `m`-th one (wrapping), if the app has any.
    pub fn of_app(&self, a: u32, m: u32) -> Option<NumericIdentity> {
        if a >= self.label_count {
            return None;
        }
        let copies = (self.label_count - 1 - a) / self.apps + 1;
        Some(label_id(a + self.apps * (m % copies)))
    }

    /// `count` flows `(endpoint, direction, remote, proto, port)`, deterministic: a quarter
    /// meant to hit the port-range rule, a quarter the egress rule, the rest random peers and
    /// ports from the policies' port set.
    pub fn flows(&self, count: u32) -> Vec<(NumericIdentity, Direction, NumericIdentity, u8, u16)> {
        let n = self.identities.len() as u32;
        let ports = [80u16, 443, 5432, 8000, 8042, 8099, 9000, 9007, 9100, 22];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            // xorshift64: cheap, deterministic, good enough to scatter the flows.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..count)
            .map(|k| {
                let j = (next() % u64::from(self.label_count)) as u32;
                let ep = label_id(j);
                let a = j % self.apps;
                let r = (next() % 1000) as u32;
                // A rule selecting app a, if there are enough rules for one.
                let rule = (a < self.rules)
                    .then_some(a + self.apps * (r % self.rules.div_ceil(self.apps).max(1)))
                    .filter(|i| *i < self.rules);
                match (k % 4, rule) {
                    (0, Some(i)) => {
                        if let Some(peer) = self.of_app(range_peer(i, self.apps), r) {
                            let port = 9000 + (r as u16 % (range_end(i) - 9000 + 1));
                            return (ep, Direction::Ingress, peer, TCP, port);
                        }
                    }
                    (1, Some(i)) => {
                        if let Some(peer) = self.of_app(egress_peer(i, self.apps), r) {
                            return (ep, Direction::Egress, peer, TCP, 5432);
                        }
                    }
                    _ => {}
                }
                let remote = self.identities[(next() % u64::from(n)) as usize].0;
                let dir = if k % 3 == 0 {
                    Direction::Egress
                } else {
                    Direction::Ingress
                };
                (
                    ep,
                    dir,
                    remote,
                    TCP,
                    ports[(next() % ports.len() as u64) as usize],
                )
            })
            .collect()
    }
}

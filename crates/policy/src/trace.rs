//! `policy trace` as a library: loads policy files, resolves the two peers to labels and
//! evaluates the source's egress and the destination's ingress with the direct evaluator,
//! reporting which policies and rules decided each direction.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sigil_identity::{NumericIdentity, reserved_by_name, reserved_labels};
use sigil_labels::{Label, Labels, SPIFFE_ID_KEY, Source, cidr_label};

use crate::cidr::IpPrefix;
use crate::error::PolicyError;
use crate::eval::{RuleMatch, evaluate};
use crate::model::{
    Direction, Document, EnforcementMode, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerSelector, Peers,
    Protocol,
};
use crate::parse::{check_duplicates, parse_documents};

/// Loads the policies of a file, or of every `*.yaml` / `*.yml` file directly in a directory
/// (not recursive, in file-name order; an empty directory holds no policy). All files are
/// parsed before anything is returned: any invalid document fails the whole load, with every
/// error found.
pub fn load_path(path: &Path) -> Result<Vec<Document>, PolicyError> {
    load_paths(&[path.to_path_buf()])
}

/// [`load_path`] over several paths, as one import (a policy defined twice is an error).
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Document>, PolicyError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| PolicyError::Io {
            path: path.clone(),
            cause: source,
        })?;
        if meta.is_dir() {
            let rd = std::fs::read_dir(path).map_err(|source| PolicyError::Io {
                path: path.clone(),
                cause: source,
            })?;
            let mut found = Vec::new();
            for entry in rd {
                let entry = entry.map_err(|source| PolicyError::Io {
                    path: path.clone(),
                    cause: source,
                })?;
                let p = entry.path();
                let is_yaml = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml");
                if is_yaml && p.is_file() {
                    found.push(p);
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|source| PolicyError::Io {
            path: f.clone(),
            cause: source,
        })?;
        match parse_documents(&text, &f.display().to_string()) {
            Ok(d) => docs.extend(d),
            Err(PolicyError::Invalid { errors: e }) => errors.extend(e),
            Err(other) => return Err(other),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyError::Invalid { errors });
    }
    check_duplicates(&docs)?;
    Ok(docs)
}

/// Parses `PORT[/PROTO]` (`80`, `53/udp`, `9000/SCTP`); the protocol defaults to TCP.
pub fn parse_dport(s: &str) -> Result<(u16, u8), PolicyError> {
    let bad = |reason: &str| PolicyError::Peer {
        value: s.to_owned(),
        reason: reason.to_owned(),
    };
    let (port, proto) = match s.split_once('/') {
        Some((p, proto)) => (p, Some(proto)),
        None => (s, None),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port must be a number in 0..=65535"))?;
    let proto = match proto.map(str::to_ascii_uppercase).as_deref() {
        None | Some("TCP") => PROTO_TCP,
        Some("UDP") => PROTO_UDP,
        Some("SCTP") => PROTO_SCTP,
        Some(_) => return Err(bad("the protocol must be TCP, UDP or SCTP")),
    };
    Ok((port, proto))
}

/// One side of a traced flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// An endpoint with these labels (it has policies of its own).
    Endpoint(Labels),
    /// A reserved entity (host, world, remote-node, ...); no policy of its own.
    Entity(NumericIdentity),
    /// An address outside the cluster; no policy of its own.
    Cidr(IpAddr),
}

impl Peer {
    /// An endpoint from `[source:]key=value,...`. Labels written without a source are taken
    /// as `k8s:` labels (as pod labels are), except `spiffe.io/spiffe-id` which becomes the
    /// `spiffe:` label.
    pub fn endpoint(labels: &str) -> Result<Peer, PolicyError> {
        let parsed = Labels::parse_list(labels).map_err(|e| PolicyError::Peer {
            value: labels.to_owned(),
            reason: e.to_string(),
        })?;
        if parsed.is_empty() {
            return Err(PolicyError::Peer {
                value: labels.to_owned(),
                reason: "an endpoint needs at least one label".to_owned(),
            });
        }
        Ok(Peer::Endpoint(
            parsed
                .iter()
                .map(|l| match l.source {
                    Source::Unspec if l.key == SPIFFE_ID_KEY => {
                        Label::new(Source::Spiffe, l.key.clone(), l.value.clone())
                    }
                    Source::Unspec => Label::new(Source::K8s, l.key.clone(), l.value.clone()),
                    _ => l.clone(),
                })
                .collect(),
        ))
    }

    /// A reserved entity by name: host, world, unmanaged, health, init, remote-node,
    /// kube-apiserver, ingress (`cluster` and `all` are groups, not peers).
    pub fn entity(name: &str) -> Result<Peer, PolicyError> {
        reserved_by_name(name)
            .map(Peer::Entity)
            .ok_or_else(|| PolicyError::Peer {
                value: name.to_owned(),
                reason: "expected one of host, world, unmanaged, health, init, remote-node, \
                     kube-apiserver, ingress"
                    .to_owned(),
            })
    }

    /// An address.
    pub fn cidr(addr: &str) -> Result<Peer, PolicyError> {
        addr.parse().map(Peer::Cidr).map_err(|_| PolicyError::Peer {
            value: addr.to_owned(),
            reason: "not an IP address".to_owned(),
        })
    }

    /// The labels the peer is matched by. An address inside a prefix some policy names gets
    /// its own CIDR identity (`cidr:<addr>/32` plus `reserved:world`); any other address is
    /// `reserved:world`, as in Cilium's IP cache.
    pub fn labels(&self, policies: &[Document]) -> Labels {
        match self {
            Peer::Endpoint(l) => l.clone(),
            Peer::Entity(id) => reserved_labels(*id).unwrap_or_default(),
            Peer::Cidr(ip) => {
                let host = IpPrefix::host(*ip);
                let world = Label::new(Source::Reserved, "world", "");
                let named = policies
                    .iter()
                    .flat_map(|d| &d.rules)
                    .flat_map(|r| &r.entries)
                    .any(|e| match &e.peers {
                        Peers::Only(sels) => sels
                            .iter()
                            .any(|s| matches!(s, PeerSelector::Cidr(c) if c.cidr.contains(&host))),
                        Peers::Any => false,
                    });
                let mut labels = Labels::new();
                if named && let Ok(l) = cidr_label(*ip, host.prefix_len()) {
                    labels.insert(l);
                }
                labels.insert(world);
                labels
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Peer::Endpoint(_) => "endpoint",
            Peer::Entity(_) => "entity",
            Peer::Cidr(_) => "cidr",
        }
    }
}

/// `allowed` or `denied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceVerdict {
    /// The flow passes.
    Allowed,
    /// The flow is dropped.
    Denied,
}

impl TraceVerdict {
    fn of(allowed: bool) -> TraceVerdict {
        if allowed {
            TraceVerdict::Allowed
        } else {
            TraceVerdict::Denied
        }
    }

    fn upper(self) -> &'static str {
        match self {
            TraceVerdict::Allowed => "ALLOWED",
            TraceVerdict::Denied => "DENIED",
        }
    }
}

/// A traced peer as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerReport {
    /// `endpoint`, `entity` or `cidr`.
    pub kind: &'static str,
    /// The labels it was matched by, comma-separated.
    pub labels: String,
}

/// One direction of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectionTrace {
    /// Which direction (the source's egress or the destination's ingress).
    pub direction: Direction,
    /// The verdict of this direction.
    pub verdict: TraceVerdict,
    /// Whether policy applies at all (false for entity and CIDR peers).
    pub applies: bool,
    /// Whether the direction is in default deny.
    pub enforced: bool,
    /// Whether an allowing rule redirects to the L7 proxy.
    pub l7_redirect: bool,
    /// Whether an allowing rule requires authentication.
    pub auth_required: bool,
    /// Policies with a rule selecting the endpoint (`Kind/namespace/name`).
    pub selected_by: Vec<String>,
    /// The rules that decided (empty when the default decided).
    pub decided_by: Vec<RuleMatch>,
    /// One sentence saying why.
    pub reason: String,
}

/// The result of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceResult {
    /// Allowed only if both directions allow.
    pub verdict: TraceVerdict,
    /// Whether the allowed flow is redirected to the L7 proxy (in either direction).
    pub l7_redirect: bool,
    /// Whether the allowed flow requires mutual authentication (in either direction).
    pub auth_required: bool,
    /// The source.
    pub src: PeerReport,
    /// The destination.
    pub dst: PeerReport,
    /// Destination port.
    pub dport: u16,
    /// IANA protocol number.
    pub protocol: u8,
    /// The source's egress.
    pub egress: DirectionTrace,
    /// The destination's ingress.
    pub ingress: DirectionTrace,
}

fn direction_trace(
    policies: &[Document],
    mode: EnforcementMode,
    subject: Option<&Labels>,
    direction: Direction,
    remote: &Labels,
    dport: u16,
    proto: u8,
) -> DirectionTrace {
    let Some(subject) = subject else {
        return DirectionTrace {
            direction,
            verdict: TraceVerdict::Allowed,
            applies: false,
            enforced: false,
            l7_redirect: false,
            auth_required: false,
            selected_by: Vec::new(),
            decided_by: Vec::new(),
            reason: "the peer is not an endpoint and has no policy of its own".to_owned(),
        };
    };
    let ev = evaluate(policies, mode, subject, direction, remote, proto, dport);
    let reason = if mode == EnforcementMode::Never {
        "policy enforcement mode is never".to_owned()
    } else if !ev.decided_by.is_empty() {
        let rules: Vec<String> = ev
            .decided_by
            .iter()
            .map(|m| format!("{} {}", m.policy, m.rule))
            .collect();
        let what = if ev.verdict.allowed {
            "allowed"
        } else {
            "denied"
        };
        format!("{what} by {}", rules.join(", "))
    } else if ev.enforced {
        "no rule matches and the endpoint is in default deny".to_owned()
    } else {
        "no rule puts the endpoint in default deny for this direction".to_owned()
    };
    DirectionTrace {
        direction,
        verdict: TraceVerdict::of(ev.verdict.allowed),
        applies: true,
        enforced: ev.enforced,
        l7_redirect: ev.verdict.l7_redirect,
        auth_required: ev.verdict.auth_required,
        selected_by: ev.selected_by.iter().map(ToString::to_string).collect(),
        decided_by: ev.decided_by,
        reason,
    }
}

/// Traces a flow from `src` to `dst` on `dport`/`proto` in the default enforcement mode.
pub fn trace(policies: &[Document], src: &Peer, dst: &Peer, dport: u16, proto: u8) -> TraceResult {
    trace_with_mode(policies, EnforcementMode::Default, src, dst, dport, proto)
}

/// [`trace`] in a given enforcement mode.
pub fn trace_with_mode(
    policies: &[Document],
    mode: EnforcementMode,
    src: &Peer,
    dst: &Peer,
    dport: u16,
    proto: u8,
) -> TraceResult {
    let src_labels = src.labels(policies);
    let dst_labels = dst.labels(policies);
    let subject = |p: &Peer, l| match p {
        Peer::Endpoint(_) => Some(l),
        _ => None,
    };
    let egress = direction_trace(
        policies,
        mode,
        subject(src, &src_labels),
        Direction::Egress,
        &dst_labels,
        dport,
        proto,
    );
    let ingress = direction_trace(
        policies,
        mode,
        subject(dst, &dst_labels),
        Direction::Ingress,
        &src_labels,
        dport,
        proto,
    );
    let allowed =
        egress.verdict == TraceVerdict::Allowed && ingress.verdict == TraceVerdict::Allowed;
    TraceResult {
        verdict: TraceVerdict::of(allowed),
        l7_redirect: allowed && (egress.l7_redirect || ingress.l7_redirect),
        auth_required: allowed && (egress.auth_required || ingress.auth_required),
        src: PeerReport {
            kind: src.kind(),
            labels: src_labels.to_string(),
        },
        dst: PeerReport {
            kind: dst.kind(),
            labels: dst_labels.to_string(),
        },
        dport,
        protocol: proto,
        egress,
        ingress,
    }
}

impl fmt::Display for TraceResult {
    /// The human-readable trace; the last line is `Final verdict: ALLOWED` or `... DENIED`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = Protocol::from_number(self.protocol)
            .map(|p| p.to_string())
            .unwrap_or_else(|| self.protocol.to_string());
        writeln!(
            f,
            "Tracing {} -> {} on {}/{}",
            self.src.labels, self.dst.labels, self.dport, proto
        )?;
        for (title, d) in [
            ("Egress of the source", &self.egress),
            ("Ingress of the destination", &self.ingress),
        ] {
            writeln!(f)?;
            writeln!(f, "{title}: {}", d.verdict.upper())?;
            writeln!(f, "  {}", d.reason)?;
            if d.applies {
                let sel = if d.selected_by.is_empty() {
                    "none".to_owned()
                } else {
                    d.selected_by.join(", ")
                };
                writeln!(f, "  selected by: {sel}")?;
                writeln!(
                    f,
                    "  default deny: {}",
                    if d.enforced { "yes" } else { "no" }
                )?;
            }
            if d.l7_redirect {
                writeln!(f, "  L7 proxy redirect")?;
            }
            if d.auth_required {
                writeln!(f, "  authentication required")?;
            }
        }
        writeln!(f)?;
        if self.l7_redirect {
            writeln!(f, "L7 redirect: yes")?;
        }
        if self.auth_required {
            writeln!(f, "Authentication required: yes")?;
        }
        write!(f, "Final verdict: {}", self.verdict.upper())
    }
}
